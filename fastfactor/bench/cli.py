"""``fastfactor bench``: kernel throughput across compression ratios, and end-to-end models.

Examples::

    fastfactor bench --preset issue2-lowrank --out profiling/results      # one published table
    fastfactor bench --methods lowrank,monarch --shapes bert-base --tokens 16,4096 --json r.json
    fastfactor bench --e2e --e2e-models bert-base,minilm --methods lowrank --ratios 0.25,0.5
    fastfactor bench --list                                               # presets and families

Without a CUDA device the sweep runs the PyTorch reference paths on the CPU in a *small mode*
(small odd shapes, few tokens, fp32, short timing) and marks every figure as a CPU figure;
``--full`` keeps the requested sizes on the CPU anyway.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from . import report
from .families import DIRECTIONS, FAMILIES, canonical
from .shapes import CPU_SMALL, SHAPE_PRESETS, SWEEPS, parse_shapes


def _floats(name: str, spec: str) -> tuple:
    try:
        return tuple(float(s) for s in spec.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected comma-separated numbers, got {spec!r}") from None


def _ints(name: str, spec: str) -> tuple:
    try:
        out = tuple(int(s) for s in spec.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected comma-separated integers, got {spec!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{name}: expected positive integers, got {spec!r}")
    return out


def add_subparser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="benchmark the kernels across compression ratios (and whole models with --e2e)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to sweep")
    g.add_argument("--preset", choices=sorted(SWEEPS), help="a named sweep (issue tables, model shapes)")
    g.add_argument("--methods", help=f"comma-separated families: {','.join(FAMILIES)}")
    g.add_argument("--shapes", help=f"e.g. 768x3072,4096 or presets {','.join(SHAPE_PRESETS)}")
    g.add_argument("--tokens", type=lambda s: _ints("tokens", s), help="token counts M, e.g. 16,4096")
    g.add_argument("--dtypes", help="fp32,fp16,bf16 (default bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--directions", help=f"comma-separated of {','.join(DIRECTIONS)} (default fwd,fwd+bwd)")
    g.add_argument("--ratios", type=lambda s: _floats("ratios", s),
                   help="fractions of weights kept, for lowrank and dense_sparse")
    g.add_argument("--nblocks", type=lambda s: _ints("nblocks", s), help="block counts for monarch/block_lowrank")
    g.add_argument("--block-rank", type=int, default=1, help="rank of each block (monarch/block_lowrank)")
    g.add_argument("--no-bias", action="store_true", help="layers without bias")
    g.add_argument("--joint", choices=("qkv", "mlp"), default=None,
                   help="also time modules compressed together: per low-rank ratio and shape, the group (qkv: 3 "
                        "members, mlp: 2) as one shared-V launch against the separate layers (fastfactor/bench/joint.py)")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    g.add_argument("--full", action="store_true", help="on the CPU, keep the requested sizes (no small mode)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the run (default on the CPU: 1, pinned, so that dense and factorized "
                        "paths are not compared under different thread oversubscription; 0: torch's default)")
    t = p.add_argument_group("timing")
    t.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up (default 25; CPU 5)")
    t.add_argument("--rep-ms", type=float, default=None, help="do_bench repetition time (default 100; CPU 20)")
    t.add_argument("--graph-below-ms", type=float, default=0.1,
                   help="re-time calls faster than this inside a CUDA graph (default 0.1 ms)")
    t.add_argument("--no-cuda-graph", action="store_true", help="never use CUDA-graph timing")
    o = p.add_argument_group("output")
    o.add_argument("--json", help="write rows + metadata (commit, date, device, roofline) as JSON")
    o.add_argument("--csv", help="write rows as CSV")
    o.add_argument("--plot", help="write throughput and speedup vs compression ratio (PNG/PDF/SVG)")
    o.add_argument("--out", help="directory: write <name>.json, <name>.csv and <name>.png there")
    o.add_argument("--name", help="file stem for --out (default: the preset, or 'bench')")
    o.add_argument("--columns", help="table columns (comma-separated field names)")
    o.add_argument("--quiet", action="store_true", help="no progress messages")
    o.add_argument("--list", action="store_true", help="list presets, shape presets and families, then exit")
    e = p.add_argument_group("end-to-end")
    e.add_argument("--e2e", action="store_true", help="time whole compressed models instead of single layers")
    e.add_argument("--e2e-models", default="bert-base,minilm", help="bert-base,minilm")
    e.add_argument("--batch", type=int, default=None, help="sequences per step (default 32; CPU 2)")
    e.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128; CPU 32)")
    p.set_defaults(func=main)
    return p


def _list() -> str:
    lines = ["sweep presets:"]
    for name in sorted(SWEEPS):
        s = SWEEPS[name]
        shapes = ",".join(sh.name for sh in s.shapes)
        params = "; ".join(f"{m}={','.join('2:4' if v is None else f'{v:g}' for v in s.params[m])}" for m in s.methods)
        lines.append(f"  {name:16s} {s.description}\n{'':18s}shapes {shapes}; tokens "
                     f"{','.join(map(str, s.tokens))}; {','.join(s.dtypes)}; {','.join(s.directions)}; {params}")
    lines.append("shape presets:")
    for name, shapes in SHAPE_PRESETS.items():
        lines.append(f"  {name:16s} " + ", ".join(s.describe() for s in shapes))
    lines.append("families:")
    for f in FAMILIES.values():
        lines.append(f"  {f.name:16s} {f.module}.{f.cls}; sweeps {f.param_name or '-'}; unfused baseline: {f.unfused}")
    return "\n".join(lines)


def resolve(args) -> dict:
    """Turn parsed arguments into the sweep (a dict of ``BenchConfig`` fields plus ``small``)."""
    from .runner import BenchConfig

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: expected a CUDA device to be available for --device cuda, got none")
    small = device.type == "cpu" and not args.full
    sweep = SWEEPS[args.preset] if args.preset else None
    methods = tuple(canonical(m.strip()) for m in args.methods.split(",") if m.strip()) if args.methods else (
        sweep.methods if sweep else tuple(FAMILIES))
    for m in methods:
        if m not in FAMILIES:
            raise ValueError(f"methods: expected names from {sorted(FAMILIES)}, got {m!r}")
    params = {m: tuple(sweep.params.get(m, ())) for m in methods} if sweep else {}
    for m in methods:
        pname = FAMILIES[m].param_name
        if pname == "ratio" and args.ratios:
            params[m] = args.ratios
        if pname == "nblocks" and args.nblocks:
            params[m] = args.nblocks
    if args.shapes:
        shapes = tuple(parse_shapes(args.shapes))
    elif small:
        shapes = CPU_SMALL["shapes"]
    elif sweep:
        shapes = sweep.shapes
    else:
        shapes = tuple(SHAPE_PRESETS["bert-base"])
    tokens = args.tokens or (CPU_SMALL["tokens"] if small else (sweep.tokens if sweep else (16, 4096)))
    if args.dtypes:
        dtypes = tuple(report.parse_dtypes(args.dtypes))
    elif small or device.type == "cpu":
        dtypes = tuple(report.parse_dtypes(",".join(CPU_SMALL["dtypes"])))
    else:
        dtypes = tuple(report.parse_dtypes(",".join(sweep.dtypes if sweep else ("bf16",))))
    directions = tuple(d.strip() for d in args.directions.split(",")) if args.directions else (
        sweep.directions if sweep else ("fwd", "fwd+bwd"))
    cpu = device.type == "cpu"
    cfg = BenchConfig(
        methods=methods, shapes=shapes, tokens=tuple(tokens), dtypes=dtypes, directions=directions,
        params=params, device=device, bias=not args.no_bias, block_rank=args.block_rank,
        warmup_ms=args.warmup_ms if args.warmup_ms is not None else (5 if cpu else 25),
        rep_ms=args.rep_ms if args.rep_ms is not None else (20 if cpu else 100),
        graph_below_ms=args.graph_below_ms, use_graph=not args.no_cuda_graph, cpu_figures=cpu,
        name=args.preset or "",
    )
    cfg.check()
    return {"config": cfg, "small": small, "sweep": sweep}


def _outputs(args, stem: str) -> tuple[Optional[str], Optional[str], Optional[str]]:
    import os

    j, c, pl = args.json, args.csv, args.plot
    if args.out:
        j = j or os.path.join(args.out, f"{stem}.json")
        c = c or os.path.join(args.out, f"{stem}.csv")
        pl = pl or os.path.join(args.out, f"{stem}.png")
    return j, c, pl


def main(args, argv: Optional[list] = None) -> int:
    if args.list:
        print(_list())
        return 0
    log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        r = resolve(args)
    except (ValueError, argparse.ArgumentTypeError) as e:
        print(f"fastfactor bench: error: {e}", file=sys.stderr)
        return 2
    cfg, small, sweep = r["config"], r["small"], r["sweep"]
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 0:
        print(f"fastfactor bench: error: --threads: expected an int >= 0, got {threads}", file=sys.stderr)
        return 2
    if cfg.device.type != "cpu":
        return _main(args, argv, cfg, small, sweep, log)
    before = torch.get_num_threads()
    pinned = 1 if threads is None else (threads or before)
    torch.set_num_threads(pinned)
    try:
        return _main(args, argv, cfg, small, sweep, log)
    finally:
        torch.set_num_threads(before)


def _main(args, argv, cfg, small, sweep, log) -> int:
    meta = report.base_meta(cfg.device, cfg.cpu_figures, sweep=args.preset or "", argv=argv)
    if cfg.device.type == "cpu":
        meta["threads"] = torch.get_num_threads()
        meta["note"] += (f" Threads pinned to {meta['threads']} (--threads); min_ms/max_ms give the spread of "
                         "the timed runs: on a shared machine a ratio of medians within that spread is noise.")
    if small:
        meta["note"] += " Small mode: shapes, tokens and dtypes replaced by the cpu-small set (use --full to keep them)."
    stem = args.name or (args.preset or "bench") + ("-e2e" if args.e2e else "") + ("-cpu" if cfg.cpu_figures else "")
    rows, e2e_rows = [], []
    if args.e2e:
        from .e2e import E2E_MODELS, run_e2e

        models = [m.strip() for m in args.e2e_models.split(",") if m.strip()]
        for m in models:
            if m not in E2E_MODELS:
                print(f"fastfactor bench: error: e2e-models: expected names from {E2E_MODELS}, got {m!r}", file=sys.stderr)
                return 2
        batch = args.batch or (2 if small else 32)
        seq = args.seq_len or (32 if small else 128)
        e2e_rows, msgs = run_e2e(
            models, cfg.methods, cfg.params, device=cfg.device, dtype=cfg.dtypes[0], batch=batch,
            seq_len=seq, small=small, cpu_figures=cfg.cpu_figures, block_rank=cfg.block_rank,
            rep_ms=max(cfg.rep_ms, 50 if small else 200), warmup_ms=cfg.warmup_ms, log=log,
        )
        meta["messages"] += msgs
        meta["e2e"] = {"models": models, "batch": batch, "seq_len": seq, "dtype": report.dtype_name(cfg.dtypes[0])}
    else:
        from .runner import Runner
        from .timing import measure_roofline

        log(f"measuring the roofline on {meta['device']} ...")
        roof = measure_roofline(cfg.device, cfg.dtypes, small=small)
        meta["roofline"] = roof.as_dict()
        meta["config"] = {
            "methods": list(cfg.methods), "params": {k: list(v) for k, v in cfg.params.items()},
            "shapes": [s.name for s in cfg.shapes], "tokens": list(cfg.tokens),
            "dtypes": [report.dtype_name(d) for d in cfg.dtypes], "directions": list(cfg.directions),
            "bias": cfg.bias, "warmup_ms": cfg.warmup_ms, "rep_ms": cfg.rep_ms,
            "graph_below_ms": cfg.graph_below_ms if cfg.use_graph else None,
        }
        runner = Runner(cfg, roof, log=log)
        rows = runner.run()
        meta["messages"] += runner.messages
    print(report.banner(meta))
    if rows:
        cols = args.columns.split(",") if args.columns else (
            sweep.columns if sweep and sweep.columns else report.DEFAULT_COLUMNS)
        if "method" not in cols:
            cols = ("method",) + tuple(cols)
        print(report.format_table(rows, cols))
    if e2e_rows:
        print(report.format_table(e2e_rows, (
            "model", "method", "param", "ratio", "model_params", "infer_ms", "infer_tokens_per_s",
            "infer_speedup_vs_dense", "train_ms", "train_tokens_per_s", "train_speedup_vs_dense", "note")))
    if getattr(args, "joint", None) and not args.e2e:
        from .joint import COLUMNS as JCOLUMNS
        from .joint import joint_bench_rows

        jrows = joint_bench_rows(cfg, args.joint, log)
        meta["joint_rows"] = jrows
        print(f"modules compressed together ({args.joint}): one shared-V launch against the separate layers"
              + (" (CPU figures)" if cfg.cpu_figures else ""))
        print(report.format_table(jrows, JCOLUMNS))
    if not rows and not e2e_rows:
        print("no rows: " + "; ".join(meta["messages"]) if meta["messages"] else "no rows")
    j, c, pl = _outputs(args, stem)
    if j:
        report.write_json(j, meta, rows, e2e_rows)
        log(f"wrote {j}")
    if c:
        report.write_csv(c, meta, rows, e2e_rows)
        log(f"wrote {c}")
    if pl:
        if rows:
            why = report.write_plot(pl, meta, rows)
            log(f"plot skipped: {why}" if why else f"wrote {pl}")
        else:
            log("plot skipped: the end-to-end mode has no ratio sweep to plot")
    return 0
