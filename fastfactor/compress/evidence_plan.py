"""Evidence for budget planning: uniform vs planned per-module ranks at equal parameters and at equal
predicted latency, on the bundled all-MiniLM-L6-v2 with real text.

Two tasks:

* ``family`` — the labelled 3-class task of :mod:`fastfactor.compress.evidence_objective` (sentences
  of the standard library's docstrings labelled by the family of the module they document), on
  MiniLM with a classification head fine-tuned densely first (cached); metric: held-out accuracy;
  fine-tuning objective ``task``.
* ``fidelity`` — the embedding-fidelity task of :mod:`fastfactor.compress.evidence` (MiniLM's
  mean-pooled sentence embeddings against the uncompressed model's, on held-out docstring
  sentences); metric: mean cosine; fine-tuning objective: hidden-state distillation.

For each task, activation-aware low rank (``init="activation"``) on the 36 block linears:

* **equal parameters**: the targets keep a fraction ``q`` of their weights, either every module at
  ratio ``q`` (*uniform*) or per-module ranks from :func:`fastfactor.plan.solve` under
  ``target_params=q`` (*planned*; whitened scores from the activation Grams of the calibration
  batches the driver uses);
* **equal predicted latency**: the planned allocation under ``target_latency=L``, with ``L`` the
  uniform model's predicted time at ratio ``q`` (the targets' time on an H200 at 16384 tokens,
  forward, bf16, from the ``fastfactor sol`` model: **predicted, not measured**);

each ``offline`` (no fine-tuning) and ``staged`` (``--stage-steps`` after each block's swap, then
``--final-steps``), the same steps and batches for uniform and planned. Every realised model's kept
fraction and predicted time are recomputed from the modules it holds.

Rows go to ``OUT/evidence_plan.json`` as they finish (a rerun skips rows already there), then
``OUT/evidence_plan.md`` and ``OUT/evidence_plan.png`` (matplotlib; skipped with a message
without it) are rewritten.

``--seed S`` runs the compression with another seed (calibration batches, fine-tuning order; the
data, the dense base and the evaluation stay seed 0's), its rows keyed by the seed; ``--jobs`` runs
only the named cells; ``--merge`` takes other runs' rows; the report aggregates the seeds (each
seed's planned − uniform, their mean, how many the plan wins) and, with ``--recompute-latency``,
adds the whole model's predicted fraction (:func:`fastfactor.plan_latency.rest_seconds`). The
output scores are cached on disk (``CACHE/plan-scores``), so a cut-off run does not score again.

``python -m fastfactor.compress.evidence_plan --out docs --cache /tmp/evplan [--threads 1] [--seed 1]``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

TASKS = ("family", "fidelity")
SCHEDULES = ("offline", "staged")
RATIOS = (0.3, 0.5)
CURVE = (0.2, 0.4, 0.7)  # extra parameter budgets, offline only (the plot)
LATENCY = dict(device="h200", tokens=16384, direction="fwd", dtype="bf16")
PREDICTED = "predicted, not measured"


def _key(r):
    seed = r.get("seed", 0)
    return f"{r['task']}|{r['schedule']}|{r['budget_kind']}|{r['q']}|{r['alloc']}" + (f"|s{seed}" if seed else "")


def setup_task(task, args):
    """``(model, data, teacher or None, metric name, objective, dense metric)``."""
    import torch

    from ..train.data import TaskData
    from ..train.loop import Evaluator, Objective, finetune

    if task == "family":
        from .evidence_objective import family_task, load_classifier

        trx, try_, evx, evy, _ = family_task(args.train, args.eval, seed=0)
        tok, model = load_classifier(3, seed=0)
        data = TaskData.from_texts(tok, trx, evx, try_, evy, max_length=32, name="stdlib module family")
        bpath = os.path.join(args.cache, f"base-family-80-{args.train}.pt")
        if os.path.isfile(bpath):
            model.load_state_dict(torch.load(bpath))
        else:
            torch.manual_seed(0)
            finetune(model, Objective.build(model, data, "task"), data, 80, lr=1e-4, batch_size=16, seed=12345,
                     train_embeddings=False)
            os.makedirs(args.cache, exist_ok=True)
            torch.save(model.state_dict(), bpath)
        model.eval()
        dense = Evaluator(data, "cpu")(model)["accuracy"]
        return model, data, None, "accuracy", "task", dense
    from .demo import demo_data, load_minilm

    tok, model = load_minilm()
    data, _ = demo_data(tok, 512, 128, 48, 0)
    return model, data, copy.deepcopy(model).eval(), "cosine", "distill", 1.0


def grams_for(model, data, cfg):
    """The activation Grams the driver's first calibration collects (same batches, same order)."""
    from ..train.data import iterate
    from .calibration import collect_activation_stats
    from .driver import _inputs
    from .targets import select_targets

    it = iterate(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed + 7)
    batches = [b for _, b in zip(range(cfg.calib_batches), it)]
    targets = select_targets(model, cfg.targets, cfg.exclude, cfg.ratio, cfg.module_ratios)
    mods = {t.name: model.get_submodule(t.name) for t in targets}
    return collect_activation_stats(model, mods, batches, lambda m, b: m(**_inputs(m, b, "cpu"))), targets


def _meta_model(task):
    """The model of ``task`` on the meta device (shapes only): MiniLM (fidelity) or MiniLM with a
    3-class classification head (family)."""
    import torch
    import transformers

    from .demo import minilm_path

    cfg = transformers.AutoConfig.from_pretrained(minilm_path())
    with torch.device("meta"):
        if task == "family":
            cfg.num_labels = 3
            return transformers.BertForSequenceClassification(cfg)
        return transformers.BertModel(cfg)


def recompute_latency(rows, lat) -> None:
    """Each row's predicted time again, from the ranks it realised (uniform: ``rank_for_ratio(q)``),
    with the kernels of this checkout (the sol model follows the op code, which may have changed
    between runs); the run's own figure is kept as ``latency_fraction_run``. Also the whole
    model's predicted fraction (``model_fraction``): every linear (the pooler and, for the family
    task, the classifier kept dense), the attention core and the rest under the stated model of
    :func:`fastfactor.plan_latency.rest_seconds` (seq_len 512)."""
    from ..factorize.svd import rank_for_ratio
    from ..plan_latency import linear_specs, make_spec, rest_seconds
    from .targets import select_targets

    fixed = {}
    targets = None
    for task in TASKS:
        meta = _meta_model(task)
        tg = select_targets(meta)
        names = {t.name for t in tg}
        other = [sp for n, sp in linear_specs(meta).items() if n not in names]
        fixed[task] = sum(lat.costs(other)) + rest_seconds(meta, lat)["rest_s"]
        if task == "fidelity":
            targets = tg
    dense = lat.costs([make_spec("dense", t.in_features, t.out_features) for t in targets])
    worst = 0.0
    for r in rows:
        ranks = r.get("ranks") or {t.name: rank_for_ratio(t.in_features, t.out_features, r["q"]) for t in targets}
        ranks = {(n[len("bert."):] if n.startswith("bert.") else n): v for n, v in ranks.items()}  # the classifier
        missing = [t.name for t in targets if t.name not in ranks]
        if missing:
            raise ValueError(f"row {_key(r)}: no rank for {missing[:3]}...")
        specs = [make_spec("dense", t.in_features, t.out_features) if ranks.get(t.name) is None else
                 make_spec("lowrank", t.in_features, t.out_features, rank=ranks[t.name]) for t in targets]
        t_targets = sum(lat.costs(specs))
        frac = t_targets / sum(dense)
        r.setdefault("latency_fraction_run", r["latency_fraction"])
        worst = max(worst, abs(frac - r["latency_fraction_run"]))
        r["latency_fraction"] = frac
        r["model_fraction"] = (fixed[r["task"]] + t_targets) / (fixed[r["task"]] + sum(dense))
    print(f"recomputed predicted times: largest change {worst:.2e} (fraction of dense)")


def _evidence_forward(m, b):
    from .driver import _inputs

    return _out(m(**_inputs(m, b, "cpu")))


def _out(o):
    for k in ("logits", "last_hidden_state"):
        if hasattr(o, k):
            return getattr(o, k)
    return o[0]


def _fmt(m, v):
    return f"{100 * v:.1f}" if m == "accuracy" else f"{v:.4f}"


def _fmt_d(m, v):
    return f"{100 * v:+.1f}" if m == "accuracy" else f"{v:+.4f}"


def comparisons(rows):
    """Planned against uniform, per (task, schedule, budget kind, scorer, q): the seeds where both
    ran, each seed's difference, their mean and spread."""
    by = {_key(r): r for r in rows}
    out = []
    for task in TASKS:
        for sched in SCHEDULES:
            for kind in ("params", "latency"):
                for q, alloc in sorted({(r["q"], r["alloc"]) for r in rows if r["task"] == task
                                        and r["budget_kind"] == kind and r["alloc"] != "uniform"}):
                    pairs = []
                    for seed in sorted({r.get("seed", 0) for r in rows}):
                        sfx = f"|s{seed}" if seed else ""
                        u = by.get(f"{task}|{sched}|params|{q}|uniform{sfx}")
                        p = by.get(f"{task}|{sched}|{kind}|{q}|{alloc}{sfx}")
                        if u and p:
                            pairs.append((seed, u, p))
                    if not pairs:
                        continue
                    diffs = [p["value"] - u["value"] for _, u, p in pairs]
                    out.append(dict(task=task, schedule=sched, kind=kind, q=q, alloc=alloc, metric=pairs[0][1]["metric"],
                                    scorer="output" if alloc == "planned-output" else "whitened",
                                    seeds=[s for s, _, _ in pairs], diffs=diffs,
                                    uniform=sum(u["value"] for _, u, _ in pairs) / len(pairs),
                                    planned=sum(p["value"] for _, _, p in pairs) / len(pairs),
                                    mean=sum(diffs) / len(diffs), lo=min(diffs), hi=max(diffs),
                                    wins=sum(d > 0 for d in diffs), u_row=pairs[0][1], p_row=pairs[0][2]))
    return out


def markdown(rows, meta) -> str:
    from .driver import format_table

    comps = comparisons(rows)
    summ = []
    for c in comps:
        m = c["metric"]
        u, p = c["u_row"], c["p_row"]
        mf = lambda r: f"{r['model_fraction']:.3f}" if "model_fraction" in r else "-"  # noqa: E731
        summ.append([c["task"], c["schedule"], c["kind"], c["scorer"], f"{c['q']:.1f}", m,
                     ",".join(map(str, c["seeds"])), _fmt(m, c["uniform"]), _fmt(m, c["planned"]),
                     " / ".join(_fmt_d(m, d) for d in c["diffs"]), _fmt_d(m, c["mean"]),
                     f"{c['wins']}/{len(c['diffs'])}", f"{p['kept']:.3f}",
                     f"{u['latency_fraction']:.3f} / {p['latency_fraction']:.3f}", f"{mf(u)} / {mf(p)}"])
    head = ["task", "schedule", "equal", "scores", "q", "metric", "seeds", "uniform (mean)", "planned (mean)",
            "planned − uniform per seed", "mean", "planned wins", "planned kept", "targets' time* u / p",
            "whole model* u / p"]
    full = []
    for r in sorted(rows, key=lambda r: (TASKS.index(r["task"]), r["schedule"], r["budget_kind"], r["q"],
                                         r["alloc"], r.get("seed", 0))):
        m = r["metric"]
        full.append([r["task"], r["schedule"], r["budget_kind"], r["alloc"], f"{r['q']:.1f}", r.get("seed", 0),
                     _fmt(m, r["value"]), f"{r['kept']:.3f}", f"{r['latency_fraction']:.3f}",
                     f"{r['model_fraction']:.3f}" if "model_fraction" in r else "-",
                     str(r.get("dense_modules", "-"))])
    fhead = ["task", "schedule", "equal", "alloc", "q", "seed", "value", "kept", "targets' time*", "whole model*",
             "dense modules"]
    dense = ", ".join(f"{t}: {v:.4g}" for t, v in meta.get("dense", {}).items())
    return ("`*` time: **" + PREDICTED + "** by the `fastfactor sol` model "
            f"({LATENCY['device'].upper()}, {LATENCY['tokens']} tokens, {LATENCY['direction']}, {LATENCY['dtype']}), "
            "as a fraction of the dense time: of the 36 targets, and of the whole model (every linear, the "
            "attention core at seq_len 512, norms, activations, residual adds, embeddings: the stated model of "
            "`fastfactor.plan_latency.REST_MODEL`). Equal = params: planned under `target_params=q`; equal = "
            "latency: planned under `target_latency` = the uniform model's predicted targets' time at ratio q. "
            "Scores: whitened = per-module activation-weighted error (closed form); output = change of the "
            "model's output (logits / last hidden state) on the calibration batches when only that module is "
            "compressed. Seeds: the compression run's seed (calibration batches, fine-tuning order); the data, "
            "the dense base and the evaluation are seed 0's. Dense: " + dense + "\n\n"
            "## Planned against uniform (per seed, mean, wins)\n\n" + format_table(head, summ)
            + "\n\n## Every run\n\n" + format_table(fhead, full))


def plot(rows, path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for i, task in enumerate(TASKS):
        for j, (x, label) in enumerate((("kept", "targets' weights kept (fraction)"),
                                         ("latency_fraction", f"targets' time / dense ({PREDICTED}, H200, M=16384)"))):
            ax = axes[i][j]
            kind = "params" if j == 0 else "latency"
            for sched, ls in (("offline", "-"), ("staged", "--")):
                for alloc, color in (("uniform", "tab:blue"), ("planned", "tab:orange"),
                                     ("planned-output", "tab:green")):
                    if alloc == "planned-output" and j == 1:
                        continue
                    want = "params" if alloc == "uniform" else kind
                    sel = [r for r in rows if r["task"] == task and r["schedule"] == sched and r["alloc"] == alloc
                           and r["budget_kind"] == want]
                    pts = []
                    for q in sorted({r["q"] for r in sel}):
                        rs = [r for r in sel if r["q"] == q]
                        vs = [r["value"] for r in rs]
                        pts.append((sum(r[x] for r in rs) / len(rs), sum(vs) / len(vs), min(vs), max(vs)))
                    if pts:
                        scale = 100 if task == "family" else 1
                        what = alloc if alloc == "uniform" else (
                            f"planned ({'target_params' if j == 0 else 'target_latency'}"
                            f"{', output scores' if alloc == 'planned-output' else ''})")
                        ys = [b * scale for _, b, _, _ in pts]
                        err = [[(b - lo) * scale for _, b, lo, _ in pts], [(hi - b) * scale for _, b, _, hi in pts]]
                        ax.errorbar([a for a, _, _, _ in pts], ys, yerr=err, fmt="o" + ls, color=color, capsize=3,
                                    label=f"{what}, {sched}")
            ax.set_xlabel(label)
            ax.set_ylabel("held-out accuracy (%)" if task == "family" else "embedding cosine to dense")
            ax.set_title(f"{task}: score vs {'parameters' if j == 0 else 'predicted time'} (mean, min-max over seeds)",
                         fontsize=9)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    fig.suptitle("all-MiniLM-L6-v2, activation-aware low rank: uniform vs planned per-module ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastfactor.compress.evidence_plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for evidence_plan.{json,md,png}")
    ap.add_argument("--cache", default=None, help="folder for the dense fine-tuned base (default OUT)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    ap.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    ap.add_argument("--curve", nargs="*", type=float, default=list(CURVE), help="extra budgets, offline only")
    ap.add_argument("--train", type=int, default=200, help="family task: training sentences per class")
    ap.add_argument("--eval", type=int, default=80, help="family task: held-out sentences per class")
    ap.add_argument("--stage-steps", type=int, default=2)
    ap.add_argument("--final-steps", type=int, default=12)
    ap.add_argument("--calib-batches", type=int, default=2)
    ap.add_argument("--output-scores", nargs="*", type=float, default=list(RATIOS),
                    help="budgets also planned on output-change scores (offline and staged)")
    ap.add_argument("--seed", type=int, default=0,
                    help="the compression runs' seed (calibration batches, fine-tuning order; the dense base and "
                         "the data stay those of seed 0)")
    ap.add_argument("--jobs", nargs="*", default=None, metavar="SCHED:KIND:Q:ALLOC",
                    help="run only these cells (e.g. staged:params:0.3:planned-output), in this order")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--merge", nargs="*", default=[], help="also take the rows of these evidence_plan.json files")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the JSON, run nothing")
    ap.add_argument("--recompute-latency", action="store_true",
                    help="recompute every row's predicted time from its ranks with the current kernels")
    args = ap.parse_args(argv)
    args.cache = args.cache or args.out
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ..plan import sensitivity, score_init, solve
    from ..plan_latency import SolLatency, predicted_seconds
    from .config import CompressionConfig
    from .driver import compress
    from .io import atomic_write_text

    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "evidence_plan.json")
    done, meta = {}, {"dense": {}}
    if os.path.isfile(jpath):
        with open(jpath) as f:
            old = json.load(f)
        done = {_key(r): r for r in old["rows"]}
        meta = old["meta"]
    for extra in args.merge:
        with open(extra) as f:
            other = json.load(f)
        for r in other["rows"]:
            done.setdefault(_key(r), r)
        meta.setdefault("dense", {}).update(other["meta"].get("dense", {}))

    def save():
        meta.update(args={k: v for k, v in vars(args).items()}, latency=dict(LATENCY, status=PREDICTED),
                    torch_threads=torch.get_num_threads(), python=sys.version.split()[0])
        atomic_write_text(jpath, json.dumps({"meta": meta, "rows": list(done.values())}, indent=1))

    lat = SolLatency(**LATENCY)
    t_all = time.perf_counter()
    for task in ([] if args.report_only else args.tasks):
        model, data, teacher, metric, objective, dense = setup_task(task, args)
        meta["dense"][task] = dense
        common = dict(method="lowrank", init="activation", stage_unit="block", calib_batches=args.calib_batches,
                      batch_size=16, objective=objective, seed=args.seed)
        if task == "fidelity":
            common["distill_loss"] = "mse"
        probe = CompressionConfig(schedule="offline", **common)
        grams, targets = grams_for(model, data, probe)
        names = [t.name for t in targets]
        t0 = time.perf_counter()
        cands = sensitivity(model, grams=grams, targets=targets, latency=lat)
        print(f"{task}: dense {metric} {dense:.4f}; sensitivity of {len(cands)} modules {time.perf_counter() - t0:.0f}s",
              flush=True)
        dense_s = sum(predicted_seconds(model, names, lat).values())
        dense_params = sum(t.in_features * t.out_features for t in targets)

        def plan_for(kind, q, uniform_latency=None):
            plan = solve(cands, q, None) if kind == "params" else solve(cands, None, uniform_latency,
                                                                         latency_info=lat.describe())
            plan.scorer, plan.init = "whitened", "activation"
            for m in plan.modules:
                if m.method != "dense":
                    m.init = score_init(m.method, True)
            return plan

        jobs = []
        for q in list(args.ratios) + [c for c in args.curve if c not in args.ratios]:
            scheds = args.schedules if q in args.ratios else ["offline"]
            for sched in scheds:
                jobs += [(sched, "params", q, "uniform"), (sched, "params", q, "planned"),
                         (sched, "latency", q, "planned")]
        for q in args.output_scores:
            jobs += [(sched, "params", q, "planned-output") for sched in args.schedules]
        if args.jobs is not None:
            want = [tuple(j.split(":")) for j in args.jobs]
            jobs = [(s_, k_, float(q_), a_) for s_, k_, q_, a_ in want]
        cands_out = None
        uniform_frac = {}
        for sched, kind, q, alloc in jobs:
            row = dict(task=task, schedule=sched, budget_kind=kind, q=q, alloc=alloc, metric=metric)
            if args.seed:
                row["seed"] = args.seed
            if _key(row) in done:
                if alloc == "uniform":
                    uniform_frac[q] = done[_key(row)]["latency_fraction"]
                continue
            steps = dict(stage_steps=args.stage_steps, final_steps=args.final_steps) if sched == "staged" \
                else dict(stage_steps=0, final_steps=0)
            cfg = CompressionConfig(schedule=sched, ratio=q, **steps, **common)
            plan = None
            if alloc == "planned-output":
                if cands_out is None:
                    from ..plan import output_scores
                    from ..train.data import iterate
                    from .driver import _inputs

                    t1 = time.perf_counter()
                    it = iterate(data.train, probe.batch_size, shuffle=True, seed=probe.seed + 7)
                    batches = [b for _, b in zip(range(probe.calib_batches), it)]
                    cands_out = output_scores(model, copy.deepcopy(cands), batches, _evidence_forward, grams,
                                              cache=os.path.join(args.cache, "plan-scores"))
                    print(f"{task}: output scores {time.perf_counter() - t1:.0f}s", flush=True)
                plan = solve(cands_out, q)
                plan.scorer, plan.init = "output", "activation"
                for m in plan.modules:
                    if m.method != "dense":
                        m.init = "activation"
            elif alloc == "planned":
                if kind == "latency":
                    if q not in uniform_frac:
                        print(f"  skip {task} {sched} latency {q}: no uniform row yet", flush=True)
                        continue
                    if uniform_frac[q] >= 1:  # the dense model itself meets it: nothing to plan
                        print(f"  skip {task} {sched} latency {q}: uniform predicted at {uniform_frac[q]:.3f} "
                              "of dense (>= 1)", flush=True)
                        continue
                    row["latency_budget"] = uniform_frac[q]
                    plan = plan_for(kind, q, row["latency_budget"])
                else:
                    plan = plan_for(kind, q)
            t0 = time.perf_counter()
            m2, rep = compress(copy.deepcopy(model), cfg, data, teacher=teacher, evaluate_stages=False, plan=plan)
            secs = predicted_seconds(m2, names, lat)
            held = sum(getattr(m2.get_submodule(n), "num_weight_params", None) or m2.get_submodule(n).weight.numel()
                       for n in names)  # over all 36 targets (a plan's run targets only its compressed ones)
            row.update(value=rep.metrics_after[metric], value_swapped=rep.metrics_offline.get(metric),
                       kept=held / dense_params, latency_fraction=sum(secs.values()) / dense_s,
                       steps=sum(s.train.get("steps", 0) for s in rep.stages), seconds=time.perf_counter() - t0)
            if plan is not None:
                row.update(plan_score=plan.score, plan_exact=plan.exact,
                           dense_modules=sum(1 for m in plan.modules if m.method == "dense"),
                           ranks={m.name: m.rank for m in plan.modules})
                assert row["kept"] <= (q if kind == "params" else 1) + 1e-9
                if kind == "latency":
                    assert row["latency_fraction"] <= row["latency_budget"] * (1 + 1e-9)
            else:
                uniform_frac[q] = row["latency_fraction"]
            done[_key(row)] = row
            print(f"{task} {sched:8s} {kind:7s} q={q:.1f} {alloc:8s}: {metric} {row['value']:.4f} kept {row['kept']:.3f} "
                  f"time {row['latency_fraction']:.3f} ({row['seconds']:.0f}s)", flush=True)
            save()
        del model, teacher
    if args.recompute_latency:
        recompute_latency(list(done.values()), lat)
    if not args.report_only or args.merge or args.recompute_latency:
        save()
    rows = list(done.values())
    md = markdown(rows, meta)
    atomic_write_text(os.path.join(args.out, "evidence_plan.md"), md + "\n")
    msg = plot(rows, os.path.join(args.out, "evidence_plan.png"))
    print(md)
    if msg:
        print(msg)
    print(f"total {time.perf_counter() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
