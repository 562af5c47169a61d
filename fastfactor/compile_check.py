"""``fastfactor compile-check``: compile every registered Triton kernel x autotune config ahead of
time for sm_80 and sm_90, on a machine without a GPU.

One row per kernel x constexpr variant x config x target: shared memory (from Triton's
metadata), registers and spill stores/loads (from ``cuobjdump --dump-resource-usage`` on the
cubin, where the tool is found). Exits non-zero if any compile fails.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

TARGETS = {"sm80": 80, "sm90": 90}


def _find_cuobjdump() -> Optional[str]:
    try:
        import triton

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def _resource_usage(cubin: bytes, tool: Optional[str]) -> dict:
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run(
            [tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    finally:
        os.unlink(path)
    res = {}
    m = re.search(r"REG:(\d+)", out)
    if m:
        res["regs"] = int(m.group(1))
    m = re.search(r"STACK:(\d+)", out)
    if m:
        res["stack"] = int(m.group(1))
    # spills show up as local memory use
    m = re.search(r"LOCAL:(\d+)", out)
    if m:
        res["local"] = int(m.group(1))
    return res


def _ast_source(fn, signature: dict, constexprs: dict):
    import triton

    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    # keep the kernel's argument order
    ordered = {name: sig[name] for name in fn.arg_names if name in sig}
    missing = [n for n in fn.arg_names if n not in sig]
    if missing:
        raise ValueError(f"signature of {fn.__name__} lacks arguments {missing}")
    try:
        return triton.compiler.ASTSource(fn=fn, signature=ordered, constexprs=dict(constexprs))
    except Exception:  # older Triton keyed constexprs by argument index
        idx = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
        return triton.compiler.ASTSource(fn=fn, signature=ordered, constexprs=idx)


def run(targets=("sm80", "sm90"), only: Optional[str] = None, out=sys.stdout, json_path=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget

    from fastfactor.kernels import _config

    if _config.is_interpreter():
        print("compile-check: unset TRITON_INTERPRET (kernels are interpreted)", file=out)
        return 2
    for mod in _config.kernel_modules():
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    tool = _find_cuobjdump()
    rows, failures = [], 0
    header = f"{'kernel':<28} {'target':<6} {'variant / config':<72} {'smem':>7} {'regs':>5} {'spill':>6} {'s':>5}"
    print(f"triton {triton.__version__}; cuobjdump: {tool or 'not found'}", file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    for name, spec in sorted(_config.KERNELS.items()):
        if only and only not in name:
            continue
        for dt in spec.dtypes:
            signature = spec.signature(dt)
            for variant in spec.constexprs:
                space = spec.space(**variant) if callable(spec.space) else spec.space
                for cfg in space:
                    cfg = dict(cfg)
                    nw, ns = cfg.pop("num_warps", 4), cfg.pop("num_stages", 2)
                    consts = {**variant, **cfg}
                    label = ",".join(f"{k}={v}" for k, v in consts.items() if k not in ("UPCAST",))
                    label = f"{dt} {label} w{nw} s{ns}"
                    for tname in targets:
                        t0 = time.perf_counter()
                        row = dict(kernel=name, target=tname, dtype=dt, config=consts,
                                   num_warps=nw, num_stages=ns)
                        try:
                            src = _ast_source(spec.fn, signature, consts)
                            c = triton.compile(
                                src, target=GPUTarget("cuda", TARGETS[tname], 32),
                                options={"num_warps": nw, "num_stages": ns},
                            )
                            row["shared"] = int(c.metadata.shared)
                            row.update(_resource_usage(c.asm["cubin"], tool))
                            row["ok"] = True
                        except Exception as e:  # noqa: BLE001 - reported, counted, non-zero exit
                            row["ok"] = False
                            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                            failures += 1
                        row["seconds"] = round(time.perf_counter() - t0, 2)
                        rows.append(row)
                        if row["ok"]:
                            spill = row.get("local", "?")
                            print(
                                f"{name:<28} {tname:<6} {label[:72]:<72} {row['shared']:>7} "
                                f"{row.get('regs', '?'):>5} {spill:>6} {row['seconds']:>5}",
                                file=out,
                            )
                        else:
                            print(f"{name:<28} {tname:<6} {label[:72]:<72} FAILED {row['error']}", file=out)
                        out.flush()
    n = len(rows)
    print(f"compile-check: {n - failures} compiled, {failures} failed "
          f"({len({r['kernel'] for r in rows})} kernels, targets {', '.join(targets)})", file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    if n == 0:
        print("compile-check: no kernel matched", file=out)
        return 1
    return 1 if failures else 0


def _main(args) -> int:
    return run(targets=tuple(args.targets), only=args.only, json_path=args.json)


def add_subparser(sub) -> None:
    p = sub.add_parser(
        "compile-check",
        help="compile every Triton kernel x config for sm_80/sm_90 without a GPU",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--targets", nargs="+", default=["sm80", "sm90"], choices=sorted(TARGETS))
    p.add_argument("--only", default=None, help="only kernels whose name contains this string")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=_main)
