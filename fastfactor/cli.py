"""The ``fastfactor`` command.

Each subcommand lives in its own module exposing ``add_subparser(subparsers)``; the parser built
there sets ``func`` to a callable taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that provide subcommands, in the order they are listed in --help.
SUBCOMMAND_MODULES = [
    "fastfactor.compile_check",
    "fastfactor.compress.cli",
    "fastfactor.bench.cli",
    "fastfactor.sol.cli",
    "fastfactor.plan_cli",
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


def _add_debug(parser: argparse.ArgumentParser) -> None:
    if not any("--debug" in a.option_strings for a in parser._actions):
        parser.add_argument("--debug", action="store_true",
                            help="show the full traceback of an error (default: one line)")


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if isinstance(e, (ValueError, TypeError, FileNotFoundError, PermissionError)) and msg:
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def main(argv=None) -> int:
    """Run a subcommand. Errors print one line on stderr (``fastfactor CMD: error: ...``, exit
    status 1) unless ``--debug`` (or ``FASTFACTOR_DEBUG=1``) asks for the traceback; Ctrl-C prints
    what the subcommand says about continuing (``compress``: rerun with ``--resume``), status 130."""
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                _add_debug(sp)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False) or os.environ.get("FASTFACTOR_DEBUG", "") not in ("", "0")
    prog = f"fastfactor {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        hint = getattr(args, "interrupt_hint", None)
        print(f"\n{prog}: " + (hint(args) if hint else "interrupted"), file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug for the traceback
        if debug:
            raise
        known = isinstance(e, (ValueError, TypeError, FileNotFoundError, PermissionError))
        print(f"{prog}: error: {_one_line(e)}" + ("" if known else " (rerun with --debug for the traceback)"),
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
