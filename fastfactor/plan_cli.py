"""``fastfactor plan``: per-module low-rank ranks under a parameter budget (:mod:`fastfactor.plan`).

Data-free (SVD tail-energy scores): the budget is checked on the model built from ``config.json``
on the meta device before any weight is read; then the weights are loaded, scored and the plan is
printed and (``--out``) written as JSON, which :func:`fastfactor.plan.apply_plan` executes.
"""

from __future__ import annotations

import argparse
import os


def parse_budget(text: str):
    """``"0.4"`` → the fraction 0.4; ``"120000"`` → the absolute count 120000."""
    s = str(text).strip()
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        raise ValueError(f"--target-params: expected a fraction in (0, 1] or an int count, got {text!r}") from None


def add_subparser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="choose per-module low-rank ranks under a parameter budget",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model directory (config.json, weights)")
    p.add_argument("--target-params", required=True,
                   help="fraction (0, 1] of the targets' weight parameters (e.g. 0.5) or an int count")
    p.add_argument("--targets", nargs="+", default=None, help="module name patterns (glob, or re:REGEX)")
    p.add_argument("--exclude", nargs="+", default=None)
    p.add_argument("--ranks", nargs="+", type=int, default=None,
                   help="candidate ranks (default: the ranks of ratios 0.05 ... 0.9 per module)")
    p.add_argument("--out", default=None, help="write the plan as JSON here")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch
    import transformers

    from .api import _chosen_targets, _config
    from .plan import candidate_ranks, plan_model, resolve_budget

    budget = parse_budget(args.target_params)
    if not os.path.isdir(args.model):
        raise ValueError(f"--model: expected a local model directory, got {args.model!r}")
    if args.out and os.path.isdir(args.out):
        raise ValueError(f"--out: expected a file path, got the directory {args.out!r}")
    cfg = {k: v for k, v in (("targets", args.targets), ("exclude", args.exclude)) if v is not None}
    config = transformers.AutoConfig.from_pretrained(args.model)
    archs = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), transformers.AutoModel)
    with torch.device("meta"):  # shapes only: the budget is checked before any weight is read
        meta = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    targets = _chosen_targets(meta, _config(cfg), None)
    total = sum(t.in_features * t.out_features for t in targets)
    minimum = sum(min([t.in_features * t.out_features] + [r * (t.in_features + t.out_features)
                                                          for r in candidate_ranks(t.in_features, t.out_features,
                                                                                   ranks=args.ranks)])
                  for t in targets)
    try:
        resolve_budget(budget, total, minimum)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("target_params", "--target-params", 1)) from None
    model = cls.from_pretrained(args.model).eval()
    kw = {} if args.ranks is None else {"ranks": args.ranks}
    plan = plan_model(model, budget, cfg, **kw)
    print(f"plan for {args.model} ({type(model).__name__}), budget {args.target_params}:")
    print(plan.table())
    if args.out:
        plan.save(args.out)
        print(f"wrote {args.out}")
    return 0
