"""Evidence for offline compression (Banaei et al., EACL 2023): factorizations, autoencoder
bottlenecks, modules compressed together — judged with **no fine-tuning** after compression.

Model: the bundled all-MiniLM-L6-v2 (6 BERT blocks, 36 block linears). Text: the labelled family
task of :mod:`fastfactor.compress.evidence_objective` (sentences of the Python standard library's
docstrings labelled ``text`` / ``net`` / ``os`` by the family of the module they document; balanced,
seeded split; real English found on every machine). Two measures, each on held-out sentences:

* **fidelity**: the sentence encoder (``AutoModel``) compressed offline, calibrated on the training
  sentences (no labels); the mean cosine between compressed and original mean-pooled embeddings
  and the Spearman correlation of their pairwise similarities (:class:`fastfactor.train.Evaluator`);
* **classification**: MiniLM with a classification head fine-tuned densely on the task first
  (``--base-steps``, cached), then compressed offline (calibration on the training split, Fisher
  on the task loss) and scored by held-out accuracy.

Variants (``--variants``): ``svd``, ``fisher``, ``activation`` (the ``lowrank`` inits), ``ae-linear``
and ``ae-nonlinear`` (``method="autoencoder"``, when that family is registered), each with
``--joint none`` (every module alone) and ``qkv`` (query/key/value share one ``V`` at the same total
budget, :mod:`fastfactor.compress.joint`); the autoencoder also with ``--scopes module`` and
``block`` (bottlenecks fitted against the block's output). Ratios ``0.3 0.5 0.7``; seeds change the
calibration batches (and the autoencoder's training); SVD is data-free, so it runs once.

Time: ``compress_s`` is the wall time of :func:`fastfactor.compress` minus the time spent in its
evaluations (metrics before and after): calibration + factorization (+ autoencoder training).

Rows are appended to ``OUT/evidence_offline.json`` as they finish (a rerun skips rows already
there; every setting is in the row's key) and ``OUT/evidence_offline.md`` is rewritten at the end.

``nice -n 10 python -m fastfactor.compress.evidence_offline --out docs [--threads 1] [--seeds 0 1]``
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

VARIANTS = ("svd", "fisher", "activation", "ae-linear", "ae-nonlinear")
RATIOS = (0.3, 0.5, 0.7)
TASKS = ("fidelity", "classification")


def variant_config(variant: str, scope: str = "module", ae_steps=None) -> dict:
    """The :class:`CompressionConfig` fields of a variant."""
    if variant in ("svd", "fisher", "activation"):
        if scope != "module":
            raise ValueError(f"scope: {variant!r} has no scope (module only), got {scope!r}")
        return {"method": "lowrank", "init": variant}
    if variant in ("ae-linear", "ae-nonlinear"):
        d = {"method": "autoencoder", "ae_form": variant.split("-")[1], "scope": scope}
        if ae_steps is not None:
            d["ae_steps"] = ae_steps
        return d
    raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")


def _key(r) -> str:
    """A row's identity: every setting, the autoencoder's step count included (rows at different
    step counts are different cells; a row without ``ae_steps`` is a non-autoencoder row)."""
    return "|".join(str(r.get(k)) for k in ("task", "variant", "joint", "scope", "ratio", "seed", "ae_steps"))


def resolved_ae_steps(variant: str, ae_steps=None):
    """The autoencoder step count a run of ``variant`` uses (the config default when not given);
    None for the factorizations."""
    if not variant.startswith("ae-"):
        return None
    if ae_steps is not None:
        return int(ae_steps)
    from .config import CompressionConfig

    return CompressionConfig().ae_steps


class _EvalTimer:
    """Wraps an Evaluator's ``__call__`` to add up the time spent evaluating."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        from ..train import loop

        self._orig = loop.Evaluator.__call__
        timer = self

        def timed(ev, model):
            t0 = time.perf_counter()
            try:
                return timer._orig(ev, model)
            finally:
                timer.seconds += time.perf_counter() - t0

        loop.Evaluator.__call__ = timed
        return self

    def __exit__(self, *exc):
        from ..train import loop

        loop.Evaluator.__call__ = self._orig


def run_row(model, data, task: str, variant: str, joint: str, scope: str, ratio: float, seed: int,
            calib_batches: int, batch_size: int, ae_steps=None) -> dict:
    """Compress a deep copy of ``model`` offline; one result row."""
    from .config import CompressionConfig
    from .driver import compress

    cfg = CompressionConfig(ratio=ratio, schedule="offline", calib_batches=calib_batches, batch_size=batch_size,
                            seed=seed, joint=[] if joint == "none" else [joint],
                            objective="task" if task == "classification" else "distill",
                            **variant_config(variant, scope, ae_steps))
    t0 = time.perf_counter()
    with _EvalTimer() as et:
        _, rep = compress(copy.deepcopy(model), cfg, data, evaluate_stages=False)
    wall = time.perf_counter() - t0
    m = rep.metrics_after
    row = dict(task=task, variant=variant, joint=joint, scope=scope, ratio=ratio, seed=seed,
               kept=rep.target_ratio, params=rep.params_after, params_before=rep.params_before,
               compress_s=wall - et.seconds, wall_s=wall, joint_groups=len(rep.joint_groups),
               ae_steps=cfg.to_dict().get("ae_steps") if variant.startswith("ae-") else None)
    if task == "classification":
        row.update(accuracy=m.get("accuracy"), accuracy_before=rep.metrics_before.get("accuracy"))
    else:
        row.update(cosine=m.get("cosine"), spearman=m.get("pairwise_spearman"))
    return row


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _sd(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    mu = sum(xs) / len(xs)
    return (sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


def markdown(rows, meta=None) -> str:
    """One table: per (variant, scope, ratio), fidelity cosine / Spearman and accuracy, alone
    (``joint none``) and with shared input bases (``joint qkv``), means over seeds (± sd where two
    or more), the kept fraction and the compression time."""
    from .report import format_table

    cells = {}
    for r in rows:
        cells.setdefault((r["variant"], (r["scope"], r.get("ae_steps")), r["ratio"], r["joint"], r["task"]), []).append(r)

    def cell(key, field, scale=1.0, nd=4):
        rs = cells.get(key)
        if not rs:
            return "-"
        vals = [r.get(field) for r in rs]
        mu, sd = _mean(vals), _sd(vals)
        if mu is None:
            return "-"
        s = f"{scale * mu:.{nd}f}"
        return s + (f" ± {scale * sd:.{nd}f}" if sd is not None else "")

    combos = sorted({(v, s, ra) for v, s, ra, _, _ in cells},
                    key=lambda c: (VARIANTS.index(c[0]) if c[0] in VARIANTS else 99, c[1][0] != "module", c[1][0],
                                   -(c[1][1] or 0), c[2]))
    out = []
    for v, s, ra in combos:
        for j in ("none", "qkv"):
            f, c = (v, s, ra, j, "fidelity"), (v, s, ra, j, "classification")
            if f not in cells and c not in cells:
                continue
            any_rows = cells.get(f) or cells.get(c)
            secs = _mean([r["compress_s"] for r in (cells.get(f, []) + cells.get(c, []))])
            seeds = sorted({r["seed"] for r in any_rows})
            scope, steps = s
            out.append([v, scope + (f" ({steps} steps)" if steps else ""), f"{ra:.1f}", j, f"{any_rows[0]['kept']:.3f}", cell(f, "cosine"), cell(f, "spearman"),
                        cell(c, "accuracy", 100, 1), ",".join(map(str, seeds)), f"{secs:.0f}"])
    head = ["variant", "scope", "ratio", "joint", "kept", "cosine (fidelity)", "pairwise Spearman",
            "accuracy %", "seeds", "compress s"]
    txt = format_table(head, out)
    if meta:
        txt = (f"dense: accuracy {100 * meta.get('base_accuracy', float('nan')):.1f} % (classifier after its own "
               f"fine-tune); fidelity 1.0 by definition. Offline: no fine-tuning after compression.\n\n" + txt)
    return txt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastfactor.compress.evidence_offline",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder of evidence_offline.json / .md")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "fastfactor", "evidence"),
                    help="where the dense classifier's fine-tune is cached")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--joint", nargs="+", default=["none", "qkv"], choices=("none", "qkv"))
    ap.add_argument("--scopes", nargs="+", default=["module", "block"], choices=("module", "block"))
    ap.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--train", type=int, default=200, help="training sentences per class")
    ap.add_argument("--eval", type=int, default=80, help="held-out sentences per class")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--base-steps", type=int, default=80, help="dense fine-tune of the classifier")
    ap.add_argument("--base-lr", type=float, default=1e-4)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ae-steps", type=int, default=None, help="autoencoder training steps (default: the config's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from .. import families
    from ..train.data import TaskData
    from ..train.loop import Evaluator, Objective, finetune
    from .demo import load_minilm
    from .evidence_objective import FAMILIES, family_task, load_classifier
    from .io import atomic_write_text

    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "evidence_offline.json")
    done, runs = {}, []
    if os.path.isfile(jpath):
        with open(jpath) as f:
            old = json.load(f)
        done = {_key(r): r for r in old["rows"]}
        runs = old["meta"].get("runs", [])
    t_all = time.perf_counter()
    trx, try_, evx, evy, counts = family_task(args.train, args.eval, seed=0)
    models, datas = {}, {}
    meta = {"runs": runs + [vars(args)], "sentences": counts, "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "torch": torch.__version__}
    if "fidelity" in args.tasks:
        tok, enc = load_minilm()
        models["fidelity"] = enc
        datas["fidelity"] = TaskData.from_texts(tok, trx, evx, max_length=args.max_length, name="stdlib family (text)")
    if "classification" in args.tasks:
        tok, clf = load_classifier(len(FAMILIES), seed=0)
        data = TaskData.from_texts(tok, trx, evx, try_, evy, max_length=args.max_length, name="stdlib module family")
        os.makedirs(args.cache, exist_ok=True)
        bpath = os.path.join(args.cache, f"base-{args.base_steps}-{args.base_lr}-{args.train}-{args.max_length}.pt")
        if os.path.isfile(bpath):
            clf.load_state_dict(torch.load(bpath))
        else:
            t0 = time.perf_counter()
            finetune(clf, Objective.build(clf, data, "task"), data, args.base_steps, lr=args.base_lr,
                     batch_size=args.batch_size, seed=12345, train_embeddings=False)
            print(f"dense base fine-tune: {args.base_steps} steps, {time.perf_counter() - t0:.0f}s", flush=True)
            torch.save(clf.state_dict(), bpath)
        clf.eval()
        meta["base_accuracy"] = Evaluator(data, "cpu")(clf)["accuracy"]
        print(f"dense classifier: accuracy {meta['base_accuracy']:.4f}", flush=True)
        models["classification"], datas["classification"] = clf, data
    elif os.path.isfile(jpath):
        meta["base_accuracy"] = old["meta"].get("base_accuracy")

    def save():
        atomic_write_text(jpath, json.dumps({"meta": meta, "rows": list(done.values())}, indent=2))

    have_ae = "autoencoder" in families.FAMILIES
    for seed in args.seeds:
        for ratio in args.ratios:
            for variant in args.variants:
                if variant.startswith("ae-") and not have_ae:
                    print(f"skip {variant}: method 'autoencoder' is not registered in this build", flush=True)
                    continue
                if variant == "svd" and seed != args.seeds[0]:
                    continue  # data-free: every seed gives the same factors
                for scope in (args.scopes if variant.startswith("ae-") else ["module"]):
                    for joint in args.joint:
                        for task in args.tasks:
                            key = dict(task=task, variant=variant, joint=joint, scope=scope, ratio=ratio, seed=seed,
                                       ae_steps=resolved_ae_steps(variant, args.ae_steps))
                            if _key(key) in done:
                                continue
                            row = run_row(models[task], datas[task], task, variant, joint, scope, ratio, seed,
                                          args.calib_batches, args.batch_size, args.ae_steps)
                            done[_key(row)] = row
                            score = (f"acc {100 * row['accuracy']:.1f} %" if task == "classification"
                                     else f"cos {row['cosine']:.4f} sp {row['spearman']:.4f}")
                            print(f"seed {seed} ratio {ratio:.1f} {variant:12s} {scope:6s} joint {joint:4s} {task:14s} "
                                  f"{score} kept {row['kept']:.3f} ({row['compress_s']:.0f}s)", flush=True)
                            save()
    save()
    md = markdown(list(done.values()), meta)
    atomic_write_text(os.path.join(args.out, "evidence_offline.md"), md + "\n")
    print(md)
    print(f"total {time.perf_counter() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
