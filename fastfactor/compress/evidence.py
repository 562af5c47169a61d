"""Measure the README's evidence table on the bundled all-MiniLM-L6-v2 with real text.

Grid: method × ratio ∈ {0.3, 0.5, 0.7} × schedule ∈ {offline, all_at_once, staged}, plus the
low-rank initializations (plain, Fisher-weighted and activation-aware SVD) offline and staged.
Both fine-tuned schedules get the same number of optimizer steps (``staged``: ``stage_steps``
per block × 6 blocks + ``final_steps``; ``all_at_once``: the same total at the end), distilled
from the uncompressed model by hidden-state MSE on standard-library docstring sentences.
Fidelity (mean cosine of mean-pooled embeddings, Spearman ρ of pairwise similarities) is
measured on held-out sentences. ``sparse24`` keeps a fixed 2:4 pattern, so it runs once per
schedule whatever the ratio.

Rows are appended to ``DIR/evidence.json`` as they finish; a rerun skips rows already there (so
methods that appear later can be added), then ``DIR/evidence.md`` is rewritten.

``python -m fastfactor.compress.evidence --out DIR [--methods ...] [--ratios ...]``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

from ..families import FAMILIES, INITS, METHODS
from .demo import demo_data, load_minilm, run_one

RATIOS = (0.3, 0.5, 0.7)
SCHEDULES = ("offline", "all_at_once", "staged")


def _key(r):
    return f"{r['method']}|{r['init']}|{r['ratio']}|{r['schedule']}"


def _fixed(method: str) -> bool:
    """A family whose pattern fixes the kept fraction (2:4): no ratio to sweep."""
    return method in FAMILIES and FAMILIES[method].rank_for_ratio is None


def _init_rank(method: str, init: str) -> int:
    """Position of ``init`` among its family's inits (the default first)."""
    names = INITS[method] if method in FAMILIES else ()
    return names.index(init) if init in names else len(names)


def grid(methods, ratios, schedules, extra_inits=True):
    for m in methods:
        for ratio in (ratios if not _fixed(m) else (0.5,)):
            for s in schedules:
                yield m, "auto", ratio, s
    if extra_inits and "lowrank" in methods:
        for init in INITS["lowrank"][1:]:  # the data-aware low-rank inits
            for ratio in ratios:
                for s in ("offline", "staged"):
                    if s in schedules:
                        yield "lowrank", init, ratio, s


def _f(v, nd=4):
    return "-" if v is None else f"{v:.{nd}f}"


def markdown(rows) -> str:
    from .driver import format_table

    order = {m: i for i, m in enumerate(METHODS)}
    rows = sorted(
        (r for r in rows if "error" not in r),
        key=lambda r: (order.get(r["method"], 99), _init_rank(r["method"], r["init"]) > 0,
                       r["init"], r["ratio"], SCHEDULES.index(r["schedule"])),
    )
    out = []
    for r in rows:
        stages = [c for c in r.get("stage_cosine", [])[:-1] if c is not None] if r["schedule"] == "staged" else []
        out.append([
            r["method"], r["init"], "2:4" if _fixed(r["method"]) else f"{r['ratio']:.1f}", f"{r['kept']:.3f}",
            f"{r['params']:,}", r["schedule"], r["steps"], _f(r["cosine"]), _f(r["spearman"]),
            _f(min(stages)) if stages else "-", f"{r['seconds']:.0f}",
        ])
    return format_table(
        ["method", "init", "ratio", "kept", "params", "schedule", "steps", "cosine", "ρ pairwise",
         "min cos (stages)", "s"], out,
    )


def pivot_markdown(rows) -> str:
    """One line per (method, init, ratio): kept fraction and ``cosine / ρ`` per schedule, plus the
    lowest fidelity seen on the way (staged: after each stage's fine-tuning and right after the
    last swap; all_at_once: right after the swap)."""
    from .driver import format_table

    cells = {}
    for r in rows:
        if "error" in r:
            continue
        cells.setdefault((r["method"], r["init"], r["ratio"]), {})[r["schedule"]] = r
    order = {m: i for i, m in enumerate(METHODS)}
    out = []
    for (m, init, ratio), by in sorted(cells.items(), key=lambda kv: (order.get(kv[0][0], 99), _init_rank(*kv[0][:2]), kv[0][2])):
        any_row = next(iter(by.values()))
        line = [m, init, "2:4" if _fixed(m) else f"{ratio:.1f}", f"{any_row['kept']:.3f}"]
        for s in SCHEDULES:
            r = by.get(s)
            line.append("-" if r is None else f"{_f(r['cosine'], 3)} / {_f(r['spearman'], 3)}")
        worst = []
        for s in ("all_at_once", "staged"):
            r = by.get(s)
            if r is None:
                worst.append("-")
                continue
            vals = [v for v in r.get("stage_cosine", [])[:-1] if v is not None] + [r.get("cosine_swapped")]
            vals = [v for v in vals if v is not None]
            worst.append(_f(min(vals), 3) if vals else "-")
        out.append(line + worst)
    return format_table(
        ["method", "init", "ratio", "kept", "offline cos / ρ", "all_at_once cos / ρ", "staged cos / ρ",
         "worst cos (all_at_once)", "worst cos (staged)"], out,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastfactor.compress.evidence", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    ap.add_argument("--no-extra-inits", action="store_true")
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--eval", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--stage-steps", type=int, default=4)
    ap.add_argument("--final-steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 avoids oversubscription on a busy machine)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .io import atomic_write_text

    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "evidence.json")
    done = {}
    if os.path.isfile(jpath):
        with open(jpath) as f:
            for r in json.load(f)["rows"]:
                if "error" not in r:
                    done[_key(r)] = r
    tok, model = load_minilm()
    data, n_sent = demo_data(tok, args.train, args.eval, args.max_length, args.seed)
    teacher = copy.deepcopy(model).eval()
    n_blocks = len(model.encoder.layer)
    total_steps = args.stage_steps * n_blocks + args.final_steps
    meta = {"args": vars(args), "sentences": n_sent, "total_steps": total_steps, "torch_threads": None}
    import torch

    meta["torch_threads"] = torch.get_num_threads()
    for m, init, ratio, sched in grid(args.methods, args.ratios, args.schedules, not args.no_extra_inits):
        probe = {"method": m, "init": init if init != "auto" else None, "ratio": ratio, "schedule": sched}
        probe["init"] = probe["init"] or INITS[m][0]
        if _key(probe) in done:
            continue
        kw = dict(stage_steps=0, final_steps=0)
        if sched == "staged":
            kw = dict(stage_steps=args.stage_steps, final_steps=args.final_steps)
        elif sched == "all_at_once":
            kw = dict(stage_steps=0, final_steps=total_steps)
        t0 = time.perf_counter()
        row = run_one(model, data, teacher, m, ratio, sched, init=init, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, **kw)
        if "error" in row:
            print(f"{m}: {row['error']}", flush=True)
            continue
        row.pop("report", None)
        done[_key(row)] = row
        print(f"{m:13s} {row['init']:10s} ratio {ratio:.1f} {sched:11s}: cosine {_f(row['cosine'])} "
              f"ρ {_f(row['spearman'])} ({time.perf_counter() - t0:.0f}s)", flush=True)
        atomic_write_text(jpath, json.dumps({"meta": meta, "rows": list(done.values())}, indent=2))
    md = pivot_markdown(list(done.values())) + "\n\n" + markdown(list(done.values()))
    atomic_write_text(os.path.join(args.out, "evidence.md"), md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
