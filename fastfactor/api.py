"""One-call API beside the driver: swap in place, preview the swap, merge back.

* :func:`factorize_` — the torchao-style ``quantize_(model, config, filter_fn)``: replace the chosen
  linear layers of ``model`` by factorized ones (data-free inits: SVD, Monarch projection, 2:4
  magnitude), in place, and return the model;
* :func:`factorize_plan` — the same choice of targets with each target's ``factor_config`` (rank,
  blocks) and parameter counts, from the shapes alone: no weight is read or changed (the CLI's
  ``fastfactor compress --dry-run``);
* :func:`merge_and_unload` — peft's name for the way back: every factorized module becomes the dense
  module it replaced, of its original class (``nn.Linear``, GPT-2's ``Conv1D``), holding the product
  of its factors, and the model loses its fastfactor ``quantization_config``, so plain
  ``save_pretrained`` / ``from_pretrained`` round-trip it. ``revert`` is the same function.

Which modules: with ``filter_fn=None`` the config's ``targets`` / ``exclude`` decide, as in the driver
(default: every linear layer inside the transformer blocks). With ``filter_fn(module, fqn) -> bool``
(``fqn``: the module's qualified name), every ``nn.Linear`` / ``Conv1D`` of the model that the config's
``targets`` match (all of them when ``targets`` is None: the head and ``lm_head`` included, as in
torchao) and ``exclude`` does not is offered to ``filter_fn``, and those it accepts are replaced.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import torch
from torch import nn

FilterFn = Callable[[nn.Module, str], bool]


def _config(config, *, what="config"):
    from .compress.config import CompressionConfig
    from .compress.driver import _as_config

    if config is None:
        return CompressionConfig()
    return _as_config(config)


def _chosen_targets(model: nn.Module, cfg, filter_fn: Optional[FilterFn]):
    """``select_targets`` of the driver, narrowed by ``filter_fn`` (see the module docstring)."""
    from .compress.targets import is_supported_linear, match, select_targets

    if filter_fn is None:
        return select_targets(model, cfg.targets, cfg.exclude, cfg.ratio, cfg.module_ratios)
    if not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable (module, fqn) -> bool or None, got {type(filter_fn).__name__}")
    names = []
    for fqn, mod in model.named_modules():
        if not fqn or not is_supported_linear(mod):
            continue
        if cfg.targets is not None and not any(match(fqn, p) for p in cfg.targets):
            continue
        if any(match(fqn, p) for p in cfg.exclude):
            continue
        if filter_fn(mod, fqn):
            names.append(fqn)
    if not names:
        raise ValueError(f"filter_fn: accepted no nn.Linear / Conv1D module of {type(model).__name__}")
    return select_targets(model, ["re:" + re.escape(n) for n in names], [], cfg.ratio, cfg.module_ratios)


def factorize_(model: nn.Module, config=None, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Replace linear layers of ``model`` by factorized ones, in place; returns ``model``.

    Args:
        model: any ``nn.Module`` (a Hugging Face model, a block, a plain MLP).
        config: a :class:`~fastfactor.CompressionConfig`, a dict of its fields or a JSON/YAML path
            (default ``CompressionConfig()``: low-rank SVD at ratio 0.5). Only the swap is done —
            ``method``, ``ratio``, ``module_ratios``, ``targets``, ``exclude``, ``init``, ``nblocks``,
            ``seed`` are used; the schedule and fine-tuning fields are ignored (use
            :func:`fastfactor.compress` to fine-tune). Inits that need calibration data
            (``fisher``, ``activation``) raise ``ValueError``.
        filter_fn: ``filter_fn(module, fqn) -> bool`` choosing the modules (see the module docstring).

    The factors of each target come from its own dense weight exactly as in the driver's
    ``offline`` schedule (same result as ``fastfactor.compress(model, {..., "schedule": "offline"})``
    for the same targets). The global RNG state is left unchanged and the model keeps its train/eval
    mode. A Hugging Face model records its factorized layers in ``config.quantization_config``
    (:mod:`fastfactor.hf`), so its own ``save_pretrained`` output reloads as this compressed model.
    """
    from .compress.driver import compress
    from .compress.methods import get_method

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    cfg = _config(config)
    needs = get_method(cfg.method).needs.get(cfg.resolved_init, ())
    if needs:
        raise ValueError(
            f"config.init: {cfg.resolved_init!r} needs calibration data ({', '.join(needs)} statistics); "
            "factorize_ is data-free: use fastfactor.compress(model, config, data) or a data-free init"
        )
    targets = _chosen_targets(model, cfg, filter_fn)
    d = cfg.to_dict()
    d.update(schedule="offline", targets=["re:" + re.escape(t.name) for t in targets], exclude=[],
             module_ratios={"re:" + re.escape(t.name): t.ratio for t in targets})
    training = model.training
    with torch.random.fork_rng(devices=[]):
        compress(model, d, None)
    model.train(training)
    return model


# --------------------------------------------------------------------------------------------
# the plan: targets, factor configs, parameters — from shapes only
# --------------------------------------------------------------------------------------------

@dataclass
class PlanRow:
    name: str  #: qualified module name
    kind: str  #: "linear" or "conv1d"
    in_features: int
    out_features: int
    ratio: float  #: the ratio asked for this module
    layer_class: str
    factor_config: dict  #: the constructor arguments (rank, nblocks, ...)
    params_before: int  #: dense weight parameters in·out
    params_after: int  #: weight parameters the factors store

    @property
    def kept(self) -> float:
        """The real ratio: ``params_after / params_before``."""
        return self.params_after / max(1, self.params_before)


@dataclass
class FactorizationPlan:
    """What :func:`factorize_` (or the driver) would do to a model, computed without touching it."""

    method: str
    rows: List[PlanRow] = field(default_factory=list)
    model_params: int = 0  #: every parameter of the model before

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.rows)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.rows)

    @property
    def kept(self) -> float:
        return self.params_after / max(1, self.params_before)

    @property
    def model_params_after(self) -> int:
        return self.model_params - self.params_before + self.params_after

    def to_dict(self) -> dict:
        return {
            "method": self.method, "model_params": self.model_params,
            "model_params_after": self.model_params_after, "target_params_before": self.params_before,
            "target_params_after": self.params_after, "kept": self.kept,
            "modules": [dict(asdict(r), kept=r.kept) for r in self.rows],
        }

    def table(self) -> str:
        from .compress.report import format_table

        def cfg(r):
            fc = r.factor_config
            if "inner_config" in fc:  # the leader of modules compressed together
                inner = ", ".join(f"{k}={v}" for k, v in fc["inner_config"].items()
                                  if k not in ("in_features", "out_features", "bias"))
                return f"joint {'+'.join(fc['names'])} -> {fc['inner_class']}({inner}), splits={fc['splits']}"
            return ", ".join(f"{k}={v}" for k, v in r.factor_config.items()
                             if k not in ("in_features", "out_features", "bias"))

        rows = [[r.name, r.kind, f"{r.out_features}x{r.in_features}", f"{r.ratio:g}", r.layer_class, cfg(r),
                 f"{r.params_before:,}", f"{r.params_after:,}", f"{r.kept:.3f}"] for r in self.rows]
        head = ["module", "kind", "out x in", "ratio asked", "layer", "factors", "params before",
                "params after", "kept"]
        total = (f"\n{len(self.rows)} module(s), target weights {self.params_before:,} -> {self.params_after:,} "
                 f"(kept {self.kept:.3f}); model parameters {self.model_params:,} -> {self.model_params_after:,} "
                 f"({self.model_params_after / max(1, self.model_params):.3f})")
        return format_table(head, rows) + total


def _layout(method: str, in_f: int, out_f: int, ratio: float, cfg, bias: bool):
    """``(layer class name, factor_config, weight parameters)`` of ``method`` for one ``(out, in)``
    layer, from the family's declared ``rank_for_ratio`` and its documented parameter count (no
    weight involved); a family registered by user code is fitted on meta tensors instead."""
    from .compress.methods import build_layer, get_method

    spec = get_method(method)
    cls = spec.layer_class()
    nb = cfg.nblocks
    if method == "lowrank":
        from .factorize.svd import resolve_rank

        r = resolve_rank(in_f, out_f, None, ratio)
        fc = dict(in_features=in_f, out_features=out_f, rank=r, bias=bias)
        params = r * (in_f + out_f)
    elif method in ("monarch", "block_lowrank"):
        from .factorize.monarch import monarch_rank_for_ratio

        fc = dict(in_features=in_f, out_features=out_f, nblocks=nb,
                  rank=monarch_rank_for_ratio(in_f, out_f, nb, ratio), bias=bias)
        with torch.device("meta"):  # shapes only
            params = cls(**fc).num_weight_params
    elif method == "sparse24":
        from .factorize.sparse24 import sparse24_num_params

        if in_f % 4:
            raise ValueError(f"in_features: expected a multiple of 4 for 2:4 sparsity, got {in_f}")
        fc = dict(in_features=in_f, out_features=out_f, bias=bias, mask_training=False)
        params = sparse24_num_params(in_f, out_f)
    elif method == "dense_sparse":
        from .factorize.sparse24 import dense_sparse_num_params, resolve_dense_sparse_rank

        if in_f % 4:
            raise ValueError(f"in_features: expected a multiple of 4 for a 2:4 factor, got {in_f}")
        r = resolve_dense_sparse_rank(in_f, out_f, None, ratio)
        fc = dict(in_features=in_f, out_features=out_f, rank=r, bias=bias, mask_training=False)
        params = dense_sparse_num_params(in_f, out_f, r)
    else:  # a family registered by user code: fit it on meta tensors
        from .compress.targets import DenseView

        with torch.device("meta"):
            view = DenseView(torch.empty(out_f, in_f), torch.empty(out_f) if bias else None)
            mod = build_layer(method, view, ratio, cfg.resolved_init, cfg, None)
        fc, params = mod.factor_config(), mod.num_weight_params
    return cls.__name__, fc, int(params)


def factorize_plan(model: nn.Module, config=None, filter_fn: Optional[FilterFn] = None) -> FactorizationPlan:
    """The targets :func:`factorize_` (and the driver, for ``filter_fn=None``) would replace, each with
    its layer class, ``factor_config`` (rank, blocks) and weight parameters before/after; reads only
    module shapes, so it works on a model built on the meta device (``torch.device("meta")``) and
    never changes ``model``. ``print(plan.table())`` shows it; ``plan.to_dict()`` is JSON-ready."""
    from .compress.targets import get_module

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    cfg = _config(config)
    plan = FactorizationPlan(method=cfg.method, model_params=sum(p.numel() for p in model.parameters()))
    for t in _chosen_targets(model, cfg, filter_fn):
        bias = getattr(get_module(model, t.name), "bias", None) is not None
        try:
            cls_name, fc, params = _layout(cfg.method, t.in_features, t.out_features, t.ratio, cfg, bias)
        except (ValueError, TypeError) as e:
            raise type(e)(f"module {t.name!r}: {e}") from e
        plan.rows.append(PlanRow(t.name, t.kind, t.in_features, t.out_features, t.ratio, cls_name, fc,
                                 t.in_features * t.out_features, params))
    if cfg.joint:
        _plan_joint(model, cfg, plan, filter_fn)
    return plan


def _plan_joint(model: nn.Module, cfg, plan: FactorizationPlan, filter_fn) -> None:
    """Rows of the groups compressed together (``cfg.joint``): the leader holds the group's
    factors (``JointLowRankLinear``), the other members none (``JointMemberLinear``)."""
    from .compress.joint import _ratio_for_rank, find_groups, joint_rank
    from .compress.methods import get_method
    from .layers.joint import JointLowRankLinear

    targets = _chosen_targets(model, cfg, filter_fn)
    groups, _ = find_groups(model, targets, cfg.joint)
    rows = {r.name: r for r in plan.rows}
    family = get_method(cfg.method)
    for g in groups:
        members = [rows[n] for n in g.names]
        in_f, outs = members[0].in_features, [r.out_features for r in members]
        rank, _ = joint_rank(family, in_f, outs, [r.ratio for r in members])
        biases = [bool(r.factor_config.get("bias", True)) for r in members]
        inner_cls, inner_fc, params = _layout(cfg.method, in_f, sum(outs), _ratio_for_rank(family, in_f, sum(outs), rank),
                                              cfg, any(biases))
        with torch.device("meta"):
            lead = JointLowRankLinear(in_f, outs[0], g.children, outs, biases, inner_cls, inner_fc)
        members[0].layer_class, members[0].factor_config, members[0].params_after = \
            "JointLowRankLinear", lead.factor_config(), params
        off = outs[0]
        for i, r in enumerate(members[1:], 1):
            r.layer_class, r.params_after = "JointMemberLinear", 0
            r.factor_config = dict(in_features=in_f, out_features=outs[i], leader=g.children[0], index=i, offset=off,
                                   bias=biases[i])
            off += outs[i]


# --------------------------------------------------------------------------------------------
# merge back
# --------------------------------------------------------------------------------------------

# merge_and_unload lives in fastfactor.hf (transformers' quantizer dequantizes with it, and api
# imports hf, never the other way round); it is re-exported here as part of the one-call API.
from .hf import merge_and_unload  # noqa: E402


#: the name this operation had first (the same function)
revert = merge_and_unload

__all__ = ["factorize_", "factorize_plan", "FactorizationPlan", "PlanRow", "merge_and_unload", "revert"]
