"""``fastfactor plan``: per-module methods and ranks under a parameter and/or latency budget
(:mod:`fastfactor.plan`).

Data-free (SVD tail-energy scores; other methods scored by factorizing). The budgets are checked on
the model built from ``config.json`` on the meta device before any weight is read (the latency of
every candidate depends on shapes only); then the weights are loaded, scored, and the plan is
printed and (``--out``) written as JSON, which ``fastfactor compress --plan`` and
:func:`fastfactor.plan.apply_plan` execute.

``--target-latency F``: the targets' time at most ``F`` times their dense time, predicted by the
``fastfactor sol`` model on ``--device`` for ``--tokens`` rows per call (``--direction fwd`` for
inference, ``fwd+bwd`` for training), or measured, from a ``fastfactor bench --json`` file run on a
GPU (``--bench``). Predicted figures are labelled so.

Examples::

    fastfactor plan --model DIR --target-params 0.5 --out plan.json
    fastfactor plan --model DIR --target-latency 0.7 --tokens 16384 --device h200 --out plan.json
    fastfactor plan --model DIR --target-params 0.5 --target-latency 0.9 --methods lowrank,sparse24
"""

from __future__ import annotations

import argparse
import os


def parse_budget(text: str, option: str = "--target-params"):
    """``"0.4"`` → the fraction 0.4; ``"120000"`` → the absolute count 120000."""
    s = str(text).strip()
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        raise ValueError(f"{option}: expected a fraction in (0, 1] or an int count, got {text!r}") from None


def add_subparser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="choose per-module methods and ranks under a parameter / latency budget",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model directory (config.json, weights)")
    p.add_argument("--target-params", default=None,
                   help="fraction (0, 1] of the targets' weight parameters (e.g. 0.5) or an int count")
    p.add_argument("--target-latency", default=None,
                   help="fraction (0, 1] of the targets' dense time (sol model, or --bench measurements)")
    p.add_argument("--tokens", type=int, default=16384, help="rows per call for the latency model (default 16384)")
    p.add_argument("--device", default="h200", choices=("h200", "h100"), help="device of the sol model")
    p.add_argument("--direction", default="fwd", choices=("fwd", "fwd+bwd"))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--bench", default=None, help="a fastfactor bench JSON measured on a GPU (replaces the sol model)")
    p.add_argument("--methods", default="lowrank",
                   help="comma-separated families in the grid besides dense (lowrank, monarch, block_lowrank, "
                        "sparse24, dense_sparse)")
    p.add_argument("--targets", nargs="+", default=None, help="module name patterns (glob, or re:REGEX)")
    p.add_argument("--exclude", nargs="+", default=None)
    p.add_argument("--ranks", nargs="+", type=int, default=None,
                   help="candidate ranks (default: the ranks of ratios 0.05 ... 0.9 per module)")
    p.add_argument("--out", default=None, help="write the plan as JSON here")
    p.set_defaults(func=run)
    return p


def _opt(e: Exception) -> Exception:
    msg = str(e).replace("target_params", "--target-params").replace("target_latency", "--target-latency")
    for field in ("methods", "tokens", "bench", "device", "direction", "dtype"):
        if msg.startswith(field + ":"):
            msg = "--" + msg
    return type(e)(msg)


def run(args) -> int:
    import transformers

    from .api import _chosen_targets, _config
    from .compress.cli import meta_model
    from .plan import candidate_grid, check_budgets, plan_model, resolve_latency
    from .plan_latency import latency_model

    if args.target_params is None and args.target_latency is None:
        raise ValueError("--target-params / --target-latency: expected at least one budget")
    budget = None if args.target_params is None else parse_budget(args.target_params)
    lat_budget = None
    if args.target_latency is not None:
        try:
            lat_budget = float(args.target_latency)
        except ValueError:
            raise ValueError(f"--target-latency: expected a fraction in (0, 1], got {args.target_latency!r}") from None
    if not os.path.isdir(args.model):
        raise ValueError(f"--model: expected a local model directory, got {args.model!r}")
    if args.out and os.path.isdir(args.out):
        raise ValueError(f"--out: expected a file path, got the directory {args.out!r}")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    cfg = {k: v for k, v in (("targets", args.targets), ("exclude", args.exclude)) if v is not None}
    try:
        if lat_budget is not None:
            resolve_latency(lat_budget)  # the value, before any time is computed
        lat = None
        if lat_budget is not None or args.bench:
            lat = latency_model(args.device, args.tokens, args.direction, args.dtype, bench=args.bench)
        meta = meta_model(args.model)  # shapes only: the budgets are checked before any weight is read
        targets = _chosen_targets(meta, _config(cfg), None)
        cands = candidate_grid(meta, targets, ranks=args.ranks, methods=methods, latency=lat)
        check_budgets(cands, budget, lat_budget, lat.describe() if lat is not None else None)
    except (TypeError, ValueError) as e:
        raise _opt(e) from None
    config = transformers.AutoConfig.from_pretrained(args.model)
    archs = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), transformers.AutoModel)
    model = cls.from_pretrained(args.model).eval()
    kw = {} if args.ranks is None else {"ranks": args.ranks}
    plan = plan_model(model, budget, cfg, target_latency=lat_budget, latency=lat, methods=methods, **kw)
    what = ", ".join(x for x in (f"parameters {args.target_params}" if budget is not None else "",
                                 f"latency {args.target_latency}" if lat_budget is not None else "") if x)
    print(f"plan for {args.model} ({type(model).__name__}), budget: {what}:")
    print(plan.table())
    if args.out:
        plan.save(args.out)
        print(f"wrote {args.out}")
    return 0
