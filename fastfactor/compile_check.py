"""``fastfactor compile-check``: compile every registered Triton kernel x autotune config ahead of
time for sm_80 and sm_90, on a machine without a GPU.

Two specializations of each: ``aligned`` compiles what Triton's runtime builds for the common
call (pointers and sizes divisible by 16, the innermost strides equal to 1: vectorized loads,
tensor-core pipelines), ``generic`` what it builds for odd sizes and arbitrary strides (no hints).

One row per kernel x specialization x constexpr variant x config x target: shared memory (from Triton's
metadata: the dynamic shared memory the launch asks for), registers and the per-thread stack frame
(from ``cuobjdump --dump-resource-usage`` on the cubin, where the tool is found). Triton kernels use
no stack of their own, so a non-zero stack is register spill: those rows are flagged and counted.
Exits non-zero if any compile fails (spills are reported, not failures: the autotuner decides).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

TARGETS = {"sm80": 80, "sm90": 90}


# the cubin helpers live in fastfactor._cubin (shared with fastfactor.sol.sass)
from ._cubin import find_cuobjdump as _find_cuobjdump  # noqa: E402
from ._cubin import resource_usage as _resource_usage  # noqa: E402


def _ast_source(fn, signature: dict, constexprs: dict, unit_args=(), aligned: bool = False):
    """An ``ASTSource`` for ``fn``. ``aligned``: the integer arguments in ``unit_args`` become the
    constant 1, and every pointer and other integer argument is declared divisible by 16."""
    import triton

    sig = dict(signature)
    consts = dict(constexprs)
    if aligned:
        for name in unit_args:
            if name in sig:
                consts[name] = 1
    for k in consts:
        sig[k] = "constexpr"
    # keep the kernel's argument order
    ordered = {name: sig[name] for name in fn.arg_names if name in sig}
    missing = [n for n in fn.arg_names if n not in sig]
    if missing:
        raise ValueError(f"signature of {fn.__name__} lacks arguments {missing}")
    attrs = None
    if aligned:
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, name in enumerate(fn.arg_names)
            if ordered[name] != "constexpr" and (ordered[name].startswith("*") or ordered[name] == "i32")
        }
    try:
        return triton.compiler.ASTSource(fn=fn, signature=ordered, constexprs=consts, attrs=attrs)
    except Exception:  # older Triton keyed constexprs by argument index
        idx = {(fn.arg_names.index(k),): v for k, v in consts.items()}
        return triton.compiler.ASTSource(fn=fn, signature=ordered, constexprs=idx, attrs=attrs)


SPECIALIZATIONS = ("aligned", "generic")

#: largest dynamic shared memory one block may use (bytes, opt-in maximum): A100, H100
MAX_SHARED = {"sm80": 166912, "sm90": 232448}


def _load_registry():
    """Every registered kernel: each family of :mod:`fastfactor.families` names its kernel module,
    and importing that module registered its kernels."""
    from fastfactor import families
    from fastfactor.kernels import _config

    missing = [f.name for f in families.FAMILIES.values()
               if f.kernels is not None
               and not any(n.split(".")[0] == f.kernels.__name__.rsplit(".", 1)[-1] for n in _config.KERNELS)]
    if missing:
        raise RuntimeError(f"compile-check: families {missing} name a kernel module that registered no kernel")
    return _config.KERNELS


def _jobs(kernels, targets, only, specializations):
    """Every (kernel, specialization, dtype, variant, config, target) to compile. The generic
    specialization is compiled for the newest target only: it checks that the kernel compiles
    without alignment hints; the aligned builds carry the resource figures for every target."""
    jobs = []
    for name, spec in sorted(kernels.items()):
        if only and only not in name:
            continue
        for dt in spec.dtypes:
            for spz in specializations:
                tg = targets if spz == "aligned" else targets[-1:]
                for variant in spec.constexprs:
                    space = spec.space(**variant) if callable(spec.space) else spec.space
                    for cfg in space:
                        for tname in tg:
                            jobs.append((name, spz, dt, dict(variant), dict(cfg), tname))
    return jobs


_TOOL = None


def _compile_one(job) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    name, spz, dt, variant, cfg, tname = job
    spec = _load_registry()[name]
    nw, ns = cfg.pop("num_warps", 4), cfg.pop("num_stages", 2)
    consts = {**variant, **cfg}
    row = dict(kernel=name, specialization=spz, target=tname, dtype=dt, config=consts,
               num_warps=nw, num_stages=ns)
    t0 = time.perf_counter()
    try:
        src = _ast_source(spec.fn, spec.signature(dt), consts, spec.unit_args, aligned=spz == "aligned")
        c = triton.compile(src, target=GPUTarget("cuda", TARGETS[tname], 32),
                           options={"num_warps": nw, "num_stages": ns})
        row["shared"] = int(c.metadata.shared)
        row.update(_resource_usage(c.asm["cubin"], _TOOL))
        if row["shared"] > MAX_SHARED[tname]:
            row["ok"] = False
            row["error"] = (f"needs {row['shared']} B of shared memory, more than the "
                            f"{MAX_SHARED[tname]} B a block may have on {tname}")
        else:
            row["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported, counted, non-zero exit
        row["ok"] = False
        msg = str(e).strip().splitlines()
        row["error"] = f"{type(e).__name__}: {msg[0][:200] if msg else ''}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _init_worker(tool):
    global _TOOL
    _TOOL = tool
    os.environ.pop("TRITON_INTERPRET", None)


def run(
    targets=("sm80", "sm90"),
    only: Optional[str] = None,
    out=sys.stdout,
    json_path=None,
    specializations=SPECIALIZATIONS,
    jobs: Optional[int] = None,
) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from fastfactor.kernels import _config

    if _config.is_interpreter():
        print("compile-check: unset TRITON_INTERPRET (kernels are interpreted)", file=out)
        return 2
    kernels = _load_registry()
    tool = _find_cuobjdump()
    work = _jobs(kernels, tuple(targets), only, specializations)
    header = (f"{'kernel':<24} {'spec':<7} {'target':<6} {'variant / config':<66} "
              f"{'smem':>7} {'regs':>5} {'spill':>6} {'s':>5}")
    print(f"triton {triton.__version__}; cuobjdump: {tool or 'not found'}; {len(work)} builds", file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    nproc = jobs or max(1, min(os.cpu_count() or 1, 8))
    if nproc > 1 and len(work) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(nproc, mp_context=mp.get_context("fork"),
                                    initializer=_init_worker, initargs=(tool,)) as ex:
            results = ex.map(_compile_one, work)
            rows = _print_rows(results, out)
    else:
        _init_worker(tool)
        rows = _print_rows(map(_compile_one, work), out)
    failures = sum(not r["ok"] for r in rows)
    n = len(rows)
    spilling = [r for r in rows if r.get("spill")]
    for spz in specializations:
        sp = [r for r in spilling if r["specialization"] == spz]
        if sp:
            print(f"compile-check: {len(sp)} {spz} builds spill registers (stack > 0): "
                  + ", ".join(f"{k} x{sum(r['kernel'] == k for r in sp)}" for k in sorted({r['kernel'] for r in sp})),
                  file=out)
    print(f"compile-check: {n - failures} compiled, {failures} failed "
          f"({len({r['kernel'] for r in rows})} kernels, targets {', '.join(targets)})", file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    if n == 0:
        print("compile-check: no kernel matched", file=out)
        return 1
    return 1 if failures else 0


def _print_rows(results, out) -> list:
    rows = []
    for row in results:
        rows.append(row)
        cfg = row["config"]
        label = ",".join(f"{k}={v}" for k, v in cfg.items() if k not in ("UPCAST",))
        label = f"{row['dtype']} {label} w{row['num_warps']} s{row['num_stages']}"
        lead = f"{row['kernel']:<24} {row['specialization']:<7} {row['target']:<6} {label[:66]:<66}"
        if row["ok"]:
            print(f"{lead} {row['shared']:>7} {row.get('regs', '?'):>5} {row.get('spill', '?'):>6} "
                  f"{row['seconds']:>5}", file=out)
        else:
            print(f"{lead} FAILED {row['error']}", file=out)
        out.flush()
    return rows


def run_from_sol(path: str, targets=("sm80", "sm90"), out=sys.stdout) -> int:
    """Compile exactly the specializations ``fastfactor sol`` recorded (its ``--json``/``--out``
    JSON): each launch's chosen config with the runtime's specialization (ints equal to 1 as
    constants, divisibility by 16 where seen), per target; registers, spill, shared memory and the
    SASS facts of :mod:`fastfactor.sol.sass`. Exits non-zero if a build fails."""
    from .sol.sass import jobs_for, read_launches

    with open(path) as f:
        rows = json.load(f)["rows"]
    seen, jobs = set(), []
    for r in rows:
        for tname in targets:
            for j in jobs_for(r.get("detail", []), TARGETS[tname]):
                key = json.dumps(j, sort_keys=True, default=str)
                if key not in seen:
                    seen.add(key)
                    jobs.append(j)
    facts = read_launches(jobs)
    failed = 0
    print(f"compile-check --from-sol {path}: {len(jobs)} runtime specializations", file=out)
    for j, f in zip(jobs, facts):
        cfg = ",".join(f"{k}={v}" for k, v in j["config"].items())
        if "error" in f:
            failed += 1
            print(f"{j['kernel']:<24} sm{j['arch']} {cfg:<60} FAILED {f['error']}", file=out)
            continue
        print(f"{j['kernel']:<24} sm{j['arch']} {cfg:<60} smem={f.get('shared')} regs={f.get('regs')} "
              f"spill={f.get('spill')} HGMMA={f.get('hgmma')} HMMA={f.get('hmma')} LDG128={f.get('ldg128')} "
              f"LDGSTS128={f.get('ldgsts128')} STG.U16={f.get('stg_u16')} LDL={f.get('ldl')}", file=out)
    print(f"compile-check: {len(jobs) - failed} compiled, {failed} failed (runtime specializations)", file=out)
    return 1 if failed or not jobs else 0


def _main(args) -> int:
    if getattr(args, "from_sol", None):
        return run_from_sol(args.from_sol, tuple(args.targets))
    return run(targets=tuple(args.targets), only=args.only, json_path=args.json,
               specializations=tuple(args.specializations), jobs=args.jobs)


def add_subparser(sub) -> None:
    p = sub.add_parser(
        "compile-check",
        help="compile every Triton kernel x config for sm_80/sm_90 without a GPU",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--targets", nargs="+", default=["sm80", "sm90"], choices=sorted(TARGETS))
    p.add_argument("--only", default=None, help="only kernels whose name contains this string")
    p.add_argument("--specializations", nargs="+", default=list(SPECIALIZATIONS), choices=SPECIALIZATIONS)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiler processes (default: CPU count, at most 8)")
    p.add_argument("--from-sol", default=None, metavar="JSON",
                   help="compile the runtime specializations a `fastfactor sol` JSON recorded instead of the registry grid")
    p.set_defaults(func=_main)
