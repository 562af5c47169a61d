"""``fastfactor sol``: speed of light of the bench rows, without a GPU (**predicted, not measured**).

Examples::

    fastfactor sol --preset issue2-lowrank --out profiling/results          # table + JSON + CSV (+ --plot)
    fastfactor sol --methods lowrank --shapes 4096 --tokens 16,16384 --ratios 0.25 --json r.json
    fastfactor sol --preset issue4-sparse24 --device h100 --detail          # per launch, per tensor

For each row: the launches the real op code makes (forward and backward, the dispatcher's path),
counted exactly under the Triton interpreter (bytes per tensor, re-reads, 32-byte sectors, access
widths, tensor-core FLOPs issued against useful ones, programs against SMs), and a lower bound on
an H200 or H100 SXM for ours, ideal cuBLAS dense, and the unfused PyTorch path, with the predicted
speedups. The model is in ``fastfactor/sol/model.py``; device figures and their sources in
``fastfactor/sol/device.py``. Counting needs the Triton interpreter: the command re-executes
itself with ``TRITON_INTERPRET=1`` when the kernels are not interpreted. Counts are cached in
``~/.cache/fastfactor/sol`` (``FASTFACTOR_SOL_CACHE``) by kernel source and specialization.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
from typing import Optional, Sequence

PREDICTED = "predicted, not measured"

COLUMNS = ("method", "shape", "tokens", "direction", "param", "kernels", "predicted_ms", "dense_ms",
           "unfused_ms", "speedup_vs_dense", "speedup_vs_unfused", "speedup_vs_torch24", "flops_ratio", "bound")


def add_subparser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("sol", help="speed of light: exact per-launch counts and a predicted lower bound, no GPU",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(p)
    p.set_defaults(func=main_args)
    return p


def _add_args(p) -> None:
    from ..bench.shapes import SWEEPS

    p.add_argument("--preset", choices=sorted(SWEEPS), help="a bench sweep preset (same rows as fastfactor bench)")
    p.add_argument("--methods", help="comma-separated families (lowrank, monarch, block_lowrank, sparse24, dense_sparse)")
    p.add_argument("--shapes", help="e.g. 4096,768x3072 or a model preset")
    p.add_argument("--tokens", help="token counts, e.g. 16,16384")
    p.add_argument("--ratios", help="ratios for lowrank/dense_sparse")
    p.add_argument("--nblocks", help="block counts for monarch/block_lowrank")
    p.add_argument("--directions", help="fwd,bwd,fwd+bwd (default: the preset's, else fwd,fwd+bwd)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--device", default="h200", choices=("h200", "h100"))
    p.add_argument("--figures", metavar="GPU_CHECK_JSON",
                   help="a gpu-check.json: its measured ceilings (HBM, bf16 rate, L2 -> SM, launch floor) replace "
                        "the leads of the device it ran on, for the model and the dispatchers' path choice "
                        "(FASTFACTOR_DEVICE_FIGURES)")
    p.add_argument("--configs", default="all", choices=("all", "fixed"),
                   help="all: the fastest predicted autotune candidate per launch; fixed: deterministic mode's config")
    p.add_argument("--out", help="folder for sol-<name>.json/.csv/.md (and .png with --plot)")
    p.add_argument("--name", help="file stem under --out (default: the preset)")
    p.add_argument("--json", help="write the rows (with per-launch detail) to this JSON file")
    p.add_argument("--plot", action="store_true", help="also a PNG of predicted speedups (needs matplotlib)")
    p.add_argument("--detail", action="store_true", help="print every launch: config, grid, bound, per-tensor re-reads")
    p.add_argument("--joint", choices=("qkv", "mlp"),
                   help="also the modules compressed together: per low-rank row, its group (qkv: 3 members, mlp: 2) "
                        "as one launch of the shared-V form against the separate layers (fastfactor/sol/joint.py)")
    p.add_argument("--sass", action="store_true",
                   help="also compile each launch's chosen config as the runtime specializes it (sm_90) and read the SASS")


def _specs(args):
    from ..bench.families import FAMILIES, canonical
    from ..bench.shapes import SWEEPS, parse_shapes
    from .rows import RowSpec, sweep_rows

    if args.preset:
        sw = SWEEPS[args.preset]
        dirs = tuple(args.directions.split(",")) if args.directions else None
        specs = sweep_rows(sw, dirs, (args.dtype,))
        if args.methods:
            keep = {canonical(m) for m in args.methods.split(",")}
            specs = [s for s in specs if s.method in keep]
        if args.tokens:
            toks = {int(t) for t in args.tokens.split(",")}
            specs = [s for s in specs if s.tokens in toks]
        return specs
    if not args.methods or not args.shapes or not args.tokens:
        raise ValueError("sol: expected --preset, or --methods, --shapes and --tokens")
    methods = [canonical(m) for m in args.methods.split(",")]
    for m in methods:
        if m not in FAMILIES:
            raise ValueError(f"methods: expected names from {sorted(FAMILIES)}, got {m!r}")
    shapes = parse_shapes(args.shapes)
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        raise ValueError(f"tokens: expected comma-separated integers, got {args.tokens!r}") from None
    dirs = args.directions.split(",") if args.directions else ["fwd", "fwd+bwd"]
    out = []
    for m in methods:
        fam = FAMILIES[m]
        if fam.param_name == "ratio" and args.ratios:
            params = [float(r) for r in args.ratios.split(",")]
        elif fam.param_name == "nblocks" and args.nblocks:
            params = [int(b) for b in args.nblocks.split(",")]
        else:
            params = list(fam.defaults)
        for p in params:
            for s in shapes:
                for M in tokens:
                    for d in dirs:
                        out.append(RowSpec(m, s.in_features, s.out_features, M, p, d, args.dtype))
    return out


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def format_table(rows: Sequence[dict], columns=COLUMNS, markdown: bool = False) -> str:
    cols = [c for c in columns if any(r.get(c) is not None for r in rows)]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(x.ljust(w) for x, w in zip(c, widths)) for c in cells]
    return "\n".join(lines)


def _detail(row: dict) -> str:
    out = []
    for e in row["detail"]:
        terms = " ".join(f"{k}={v * 1e6:.1f}us" for k, v in e["terms"].items())
        out.append(f"    {e['phase']:<3} {e['kernel']:<18} {e['config_label']:<28} grid={e['grid']} "
                   f"programs={e['programs']} red={e['reduction']} {'HGMMA' if e['hgmma'] else 'HMMA'} "
                   f"bound={e['bound']} {terms}")
        it = e.get("issue") or {}
        if it.get("seconds") is None:
            out.append(f"        issue: {it.get('note', 'not computed')}")
        elif "loop" not in it:   # a stated per-instruction model (no SASS read)
            out.append(f"        issue: {it['warp_instructions']:.3g} warp-instr = {e['programs']} programs x "
                       f"{it['per_warp'] * e['config'].get('num_warps', 4):.0f} per program, loop trips "
                       f"{it['trips']} ({it['note']})")
        elif isinstance(it["trips"], list):   # every SASS loop at its trip count
            out.append(f"        issue: {it['warp_instructions']:.3g} warp-instr = {e['programs']} programs x "
                       f"{it['warps']} warps x {it['per_warp']} ({it['note']})")
        else:
            out.append(f"        issue: {it['warp_instructions']:.3g} warp-instr = {e['programs']} programs x "
                       f"{it['warps']} warps x ({it['outside']} + {it['loop']} x {it['trips']}) ({it['note']})")
        for n, t in e["tensors"].items():
            if not (t["load"] or t["store"]):
                continue
            rr = f"reread={t['reread']:.2f}" if t["reread"] else ""
            se = f"sector_eff={t['sector_eff']:.2f}" if t["sector_eff"] else ""
            out.append(f"        {n:<22} size={t['size']:>11} load={t['load']:>13.0f} store={t['store']:>11.0f} "
                       f"{rr} {se} access={t['load_access'] or t['store_access']}B")
    return "\n".join(out)


def meta(args_list=None, device=None) -> dict:
    import triton

    from ..bench.report import git_commit

    commit, dirty = git_commit()
    from .device import get_device

    dev = get_device(device or "h200")
    return dict(schema="fastfactor-sol/1", status=PREDICTED, commit=commit, dirty=dirty,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="fastfactor sol " + " ".join(args_list or sys.argv[1:]),
                triton=triton.__version__, device=dev.name, figures=dev.figures,
                device_figures=dict(sms=dev.sms, hbm_bw=dev.hbm_bw, l2_bytes=dev.l2_bytes, l2_bw=dev.l2_bw,
                                    bf16_rate=dev.bf16_rate, tf32_rate=dev.tf32_rate,
                                    hmma_fraction=dev.hmma_fraction, launch_s=dev.launch_s,
                                    issue_slots_per_sm=dev.issue_slots_per_sm, clock_hz=dev.clock_hz),
                sources=list(dev.sources))


def write_outputs(rows, m: dict, json_path=None, csv_path=None, md_path=None) -> None:
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(meta=m, rows=rows), f, indent=1, default=str)
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["status", "commit", "device"] + list(COLUMNS) + ["issued_flops", "useful_flops", "dram_bytes"])
            for r in rows:
                w.writerow([PREDICTED, m["commit"], m["device"]] + [r.get(c) for c in COLUMNS]
                           + [r.get("issued_flops"), r.get("useful_flops"), r.get("dram_bytes")])
    if md_path:
        with open(md_path, "w") as f:
            figs = "" if m.get("figures", "leads") == "leads" else f", measured figures of {m['figures']}"
            f.write(f"**Model ({PREDICTED})** — {m['device']}{figs}, commit {m['commit'][:12]}, {m['date']}, "
                    f"`{m['command']}`\n\n")
            f.write(format_table(rows, markdown=True) + "\n")


def plot(rows, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    labels = [f"{r['method']} {r['shape']} M={r['tokens']} {r['param']} {r['direction']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.22 * len(rows))))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["speedup_vs_dense"] or 0 for r in rows], 0.4, label="vs dense")
    ax.barh([i - 0.2 for i in y], [r["speedup_vs_unfused"] or 0 for r in rows], 0.4, label="vs unfused")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_xlabel(f"speedup ({PREDICTED})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _interpreted() -> bool:
    from ..kernels import _config

    return _config.is_interpreter()


def _figures_env(args) -> Optional[str]:
    """The value ``FASTFACTOR_DEVICE_FIGURES`` must have for ``args.figures`` (None without it);
    raises ``ValueError`` (the file named) when the file is not a GPU's gpu-check result."""
    if not getattr(args, "figures", None):
        return None
    from ..kernels._cost import read_figures

    path = os.path.abspath(args.figures)
    read_figures(path)
    return path


def main_args(args) -> int:
    try:
        figures = _figures_env(args)
    except ValueError as e:
        print(f"fastfactor sol: --figures: {e}", file=sys.stderr)
        return 2
    from ..kernels._cost import FIGURES_ENV

    if not _interpreted() or (figures and os.environ.get(FIGURES_ENV) != figures):
        # counting needs interpreted kernels, decided when the kernel modules are imported; the
        # figures too are read at that import
        env = dict(os.environ, TRITON_INTERPRET="1")
        if figures:
            env[FIGURES_ENV] = figures
        cmd = [sys.executable, "-m", "fastfactor.sol.cli"] + list(args._argv if hasattr(args, "_argv") else sys.argv[2:])
        return subprocess.call(cmd, env=env)
    return run(args)


def run(args) -> int:
    from .device import get_device
    from .rows import evaluate_row

    try:
        specs = _specs(args)
    except ValueError as e:
        print(f"fastfactor sol: {e}", file=sys.stderr)
        return 2
    dev = get_device(args.device)
    print(f"fastfactor sol — {dev.name} — {PREDICTED} — {len(specs)} rows — figures: {dev.figures}", flush=True)
    rows, pairs = [], []
    for s in specs:
        try:
            r = evaluate_row(s, dev, configs=args.configs)
        except Exception as e:  # noqa: BLE001 - one row failing is reported, the sweep goes on
            print(f"  {s.key()}: failed ({type(e).__name__}: {e})", flush=True)
            continue
        rows.append(r)
        pairs.append((s, r))
        if args.detail:
            print(format_table([r]).splitlines()[-1])
            print(_detail(r), flush=True)
    if args.sass and rows:
        from .sass import jobs_for, read_launches

        jobs = [j for r in rows for j in jobs_for(r["detail"])]
        facts = iter(read_launches(jobs))
        for r in rows:
            for e in r["detail"]:
                if e.get("signature"):
                    e["sass"] = next(facts)
        from .rows import apply_issue_terms

        for r in rows:
            apply_issue_terms(r, dev)
            if args.detail:
                for e in r["detail"]:
                    it = e["issue"]
                    fig = (f"issue={it['seconds'] * 1e6:.1f}us ({it['warp_instructions']:.3g} warp-instr)"
                           if it["seconds"] is not None else it["note"])
                    print(f"  issue {r['method']} {r['shape']} M={r['tokens']} {r['direction']} {e['kernel']}({e['phase']}): "
                          f"{fig}; bound={e['bound']}")
        for r in rows:
            for e in r["detail"]:
                f = e.get("sass") or {}
                if "error" in f:
                    print(f"  sass {e['kernel']}: {f['error']}")
                elif f:
                    print(f"  sass {r['method']} {r['shape']} M={r['tokens']} {r['direction']} {e['kernel']}({e['phase']}) "
                          f"{e['config_label']}: regs={f.get('regs')} spill={f.get('spill')} smem={f.get('shared')} "
                          f"ctas/SM={f.get('ctas_per_sm')} HGMMA={f.get('hgmma')} HMMA={f.get('hmma')} "
                          f"LDG128={f.get('ldg128')} LDGSTS128={f.get('ldgsts128')} LDG.U16={f.get('ldg_u16')} "
                          f"LDG.U8={f.get('ldg_u8')} STG.U16={f.get('stg_u16')} LDL/STL={f.get('ldl')}/{f.get('stl')} "
                          f"BAR={f.get('bar')} instr={f.get('instructions')}")
    print(format_table(rows))
    print(f"({PREDICTED}: lower bounds from exact counts; device figures in fastfactor/sol/device.py)")
    jrows = []
    if getattr(args, "joint", None):
        from .joint import COLUMNS as JCOLUMNS
        from .joint import joint_rows

        jrows = joint_rows(pairs, args.joint, dev, configs=args.configs)
        print(f"\nmodules compressed together ({args.joint}): one shared-V launch against the separate layers "
              f"({PREDICTED})")
        print(format_table(jrows, columns=JCOLUMNS))
    # the command as typed: `fastfactor sol ARGS` runs here in-process when TRITON_INTERPRET is set
    # (sys.argv = [fastfactor, sol, ARGS]), `python -m fastfactor.sol.cli ARGS` otherwise
    typed = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "sol" else sys.argv[1:]
    m = meta(list(getattr(args, "_argv", typed)), args.device)
    if jrows:
        m["joint_rows"] = jrows
    if args.json:
        write_outputs(rows, m, json_path=args.json)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, "sol-" + (args.name or args.preset or "rows"))
        write_outputs(rows, m, stem + ".json", stem + ".csv", stem + ".md")
        if args.plot:
            msg = plot(rows, stem + ".png")
            if msg:
                print(msg)
        print(f"wrote {stem}.json/.csv/.md")
    elif args.plot:
        print("--plot needs --out")
    return 0 if rows or not specs else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastfactor sol", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(p)
    args = p.parse_args(argv)
    if not _interpreted():
        print("fastfactor sol: set TRITON_INTERPRET=1 (python -m fastfactor.sol.cli does not re-execute)", file=sys.stderr)
        return 2
    from ..kernels._cost import FIGURES_ENV

    try:
        figures = _figures_env(args)
    except ValueError as e:
        print(f"fastfactor sol: --figures: {e}", file=sys.stderr)
        return 2
    if figures and os.environ.get(FIGURES_ENV) != figures:
        print(f"fastfactor sol: --figures: set {FIGURES_ENV}={figures} as well (python -m fastfactor.sol.cli does "
              "not re-execute; the figures are read when the kernels are imported)", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
