"""The ``fastfactor`` command.

Each subcommand lives in its own module exposing ``add_subparser(subparsers)``; the parser built
there sets ``func`` to a callable taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that provide subcommands, in the order they are listed in --help.
SUBCOMMAND_MODULES = [
    "fastfactor.compile_check",
    "fastfactor.compress.cli",
    "fastfactor.bench.cli",
    "fastfactor.sol.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastfactor",
        description="Triton kernels and a compression driver for factorized transformer layers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name or mod_name.startswith(str(e.name) + "."):
                continue  # that subcommand is not part of this build
            raise
        mod.add_subparser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
