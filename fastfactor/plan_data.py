"""Budget plans as data: :class:`BudgetPlan` (per module: method, setting, parameters, score, time;
the budgets and the latency source), its JSON form, and what executing one needs (:func:`as_plan`,
:func:`check_plan`, :meth:`BudgetPlan.to_configs`). Split from :mod:`fastfactor.plan` (which
re-exports everything here) so that the compression driver can execute a plan without importing
the planner: this module imports only the config, targets and families layers.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from torch import nn

PLAN_VERSION = 2
PREDICTED = "predicted, not measured"


def _base_config(base) -> dict:
    """``base`` (a CompressionConfig, its dict, a JSON/YAML path, or None) as a checked dict."""
    from .compress.config import CompressionConfig

    if base is None:
        return CompressionConfig().to_dict()
    if isinstance(base, CompressionConfig):
        return base.to_dict()
    if isinstance(base, dict):
        return CompressionConfig.from_dict(base).to_dict()
    if isinstance(base, (str, os.PathLike)):
        return CompressionConfig.load(base).to_dict()
    raise TypeError(f"config: expected a CompressionConfig, a dict or a path to a JSON/YAML file, "
                    f"got {type(base).__name__}")


@dataclass
class PlanEntry:
    name: str
    method: str  #: "lowrank" or "dense"
    rank: Optional[int]
    params: int
    score: float
    in_features: int
    out_features: int
    seconds: Optional[float] = None  #: under the plan's latency model (None without one)
    nblocks: Optional[int] = None
    init: Optional[str] = None  #: the init it was scored with and runs with (None: the plan's ``init``)


@dataclass
class BudgetPlan:
    """Per-module ranks under a parameter and/or latency budget (see the module docstring)."""

    budget: Optional[int]  #: the absolute parameter budget the plan meets (None: no parameter budget)
    target_params_dense: int  #: the targets' dense weight parameters
    exact: bool  #: whether the plan is proven optimal (exact grid, or score == lower bound)
    modules: List[PlanEntry] = field(default_factory=list)
    scorer: str = "svd"  #: "whitened" (activation Gram) or "svd"
    init: str = "svd"  #: the lowrank init matching the scorer ("activation" or "svd")
    score_lower_bound: Optional[float] = None  #: no plan within the budgets scores less
    #: the latency budget and its source: fraction, budget_s, dense_s, source, status, device,
    #: tokens, direction, dtype (None without a latency budget)
    latency: Optional[dict] = None
    #: the calibration data the scores were measured on (data name, batches, batch_size, seed,
    #: tokens, scorer, digest of the batches), or None (data-free scores)
    calibration: Optional[dict] = None

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def score(self) -> float:
        return sum(m.score for m in self.modules)

    @property
    def kept(self) -> float:
        return self.params / max(1, self.target_params_dense)

    @property
    def seconds(self) -> Optional[float]:
        """The targets' time under the latency model (None when a module has none)."""
        if any(m.seconds is None for m in self.modules):
            return None
        return sum(m.seconds for m in self.modules)

    @property
    def model_latency_fraction(self) -> Optional[float]:
        """The whole model's predicted time over its dense time (None without the whole-model
        parts: a bench latency source, or no latency model): ``(fixed + plan) / model dense``."""
        w = (self.latency or {}).get("whole_model")
        if not w or self.seconds is None:
            return None
        return (w["fixed_s"] + self.seconds) / w["model_dense_s"]

    @property
    def methods(self) -> List[str]:
        return sorted({m.method for m in self.modules})

    def to_dict(self) -> dict:
        d = {"version": PLAN_VERSION, "budget": self.budget, "target_params_dense": self.target_params_dense,
             "exact": self.exact, "scorer": self.scorer, "init": self.init, "params": self.params,
             "kept": self.kept, "score": self.score, "score_lower_bound": self.score_lower_bound,
             "seconds": self.seconds, "latency": self.latency, "calibration": self.calibration,
             "modules": [asdict(m) for m in self.modules]}
        if self.latency and self.seconds is not None:
            d["latency_fraction"] = self.seconds / self.latency["dense_s"]
        if self.model_latency_fraction is not None:
            d["model_latency_fraction"] = self.model_latency_fraction
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BudgetPlan":
        if not isinstance(d, dict) or "modules" not in d:
            raise ValueError("plan: expected a dict with 'modules' (a BudgetPlan.to_dict())")
        if d.get("version", PLAN_VERSION) not in (1, PLAN_VERSION):
            raise ValueError(f"plan: expected version 1 or {PLAN_VERSION}, got {d.get('version')!r}")
        fields = set(PlanEntry.__dataclass_fields__)
        mods = []
        for m in d["modules"]:
            if not isinstance(m, dict) or set(m) - fields or not {"name", "method", "params"} <= set(m):
                raise ValueError(f"plan: expected module entries with fields {sorted(fields)}, got {m!r}")
            mods.append(PlanEntry(**m))
        for m in mods:
            if m.method not in PLAN_METHODS:
                raise ValueError(f"plan: module {m.name!r}: expected method one of {list(PLAN_METHODS)}, "
                                 f"got {m.method!r}")
        lat = d.get("latency")
        if lat is not None and not (isinstance(lat, dict) and {"budget_s", "dense_s"} <= set(lat)):
            raise ValueError(f"plan: latency: expected a dict with budget_s and dense_s, got {lat!r}")
        return cls(budget=None if d["budget"] is None else int(d["budget"]),
                   target_params_dense=int(d["target_params_dense"]), exact=bool(d["exact"]), modules=mods,
                   scorer=d.get("scorer", "svd"), init=d.get("init", "svd"),
                   score_lower_bound=d.get("score_lower_bound"), latency=lat, calibration=d.get("calibration"))

    def save(self, path: str) -> None:
        from ._io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str) -> "BudgetPlan":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"plan: no such file {path!r}")
        try:
            with open(path) as f:
                d = json.load(f)
        except ValueError as e:
            raise ValueError(f"plan: {path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def table(self) -> str:
        from .compress.report import format_table

        lat = self.latency is not None and self.seconds is not None
        rows = []
        for m in self.modules:
            setting = "-" if m.rank is None else str(m.rank)
            if m.nblocks is not None:
                setting = f"b{m.nblocks} r{m.rank}"
            row = [m.name, f"{m.out_features}x{m.in_features}", m.method, setting, f"{m.params:,}",
                   f"{m.params / (m.in_features * m.out_features):.3f}", f"{m.score:.4g}"]
            if lat:
                row.append(f"{m.seconds * 1e6:.2f}")
            rows.append(row)
        head = ["module", "out x in", "method", "rank", "params", "kept", f"score ({self.scorer})"]
        if lat:
            head.append("us")
        text = format_table(head, rows) + (
            f"\n{len(self.modules)} module(s): {self.params:,} of {self.target_params_dense:,} target weight "
            f"parameters (kept {self.kept:.3f}"
            + (f"; budget {self.budget:,}" if self.budget is not None else "") + "), "
            f"predicted score {self.score:.4g}"
            + ("" if self.exact else f" (coarse grid; no plan scores below {self.score_lower_bound:.4g})"
               if self.score_lower_bound is not None else " (coarse grid)"))
        if self.calibration:
            c = self.calibration
            text += (f"\nscores ({c.get('scorer', self.scorer)}) measured on {c.get('data', 'data')}: "
                     f"{c.get('batches')} batch(es) of {c.get('batch_size')} (seed {c.get('seed')}), "
                     f"{c.get('tokens')} tokens, digest {c.get('digest')}")
        if lat:
            L = self.latency
            budget = ("no latency budget" if L.get("budget_s") is None
                      else f"budget {L['fraction']:g} = {L['budget_s'] * 1e6:.4g} us")
            text += (f"\ntime of the targets: {self.seconds * 1e6:.4g} us = {self.seconds / L['dense_s']:.3f} of "
                     f"dense {L['dense_s'] * 1e6:.4g} us ({budget}); "
                     f"{L.get('status', PREDICTED)}, {L.get('device', '?')}, M={L.get('tokens', '?')} tokens, "
                     f"{L.get('direction', 'fwd')}, {L.get('dtype', 'bf16')}"
                     + (f", from {L['file']}" if L.get("file") else ""))
            W = L.get("whole_model")
            if W:
                tot = W["fixed_s"] + self.seconds
                text += (f"\nwhole model: {tot * 1e6:.4g} us = {self.model_latency_fraction:.3f} of dense "
                         f"{W['model_dense_s'] * 1e6:.4g} us"
                         + (f" (budget {L['fraction_model']:g} of the whole model)" if L.get("scope") == "model" else
                            " (the budget is over the targets)")
                         + f": targets {self.seconds * 1e6:.4g}, {W['other_linears']} other linear(s) "
                         f"{W['other_linears_s'] * 1e6:.4g}, attention {W['attention_s'] * 1e6:.4g}, elementwise "
                         f"{W['elementwise_s'] * 1e6:.4g}, embeddings {W['embeddings_s'] * 1e6:.4g} us at seq_len "
                         f"{W['seq_len']} (attention and the rest: a stated model, fastfactor.plan_latency.REST_MODEL); "
                         f"{L.get('status', PREDICTED)}")
        return text

    def to_config(self, base=None, single: bool = False) -> Optional[dict]:
        """A CompressionConfig dict (``base``'s other fields kept) replacing exactly the planned
        modules, each at its planned setting (through ``module_ratios``; checked); None when every
        module stays dense (``single=True``: an error then, since a run needs a target). A plan
        mixing methods has one config per method (:meth:`to_configs`) and runs in one
        ``compress`` through :meth:`run_config`."""
        cfgs = self.to_configs(base)
        if len(cfgs) > 1:
            raise ValueError(f"plan: mixes methods {[k for k in self.methods if k != 'dense']}: one config per "
                             "method (to_configs); compress(plan=) runs them in one run (run_config)")
        if not cfgs and single:
            raise ValueError("plan: every module stays dense: nothing to compress")
        return cfgs[0] if cfgs else None

    def to_configs(self, base=None) -> List[dict]:
        """One CompressionConfig dict per (method, nblocks, init) of the plan's compressed modules,
        in plan order of first appearance; each replaces exactly its modules at their planned
        setting (``module_ratios`` giving each its planned rank; checked)."""
        return [cfg for cfg, _ in self._groups(base)]

    def _groups(self, base=None) -> List[tuple]:
        from .families import get_family

        base_cfg = _base_config(base)
        groups: Dict[tuple, List[PlanEntry]] = {}
        for m in self.modules:
            if m.method != "dense":
                groups.setdefault((m.method, m.nblocks, m.init), []).append(m)
        out = []
        for (method, nb, planned_init), mods in groups.items():
            cfg = dict(base_cfg)
            ratios = {}
            for m in mods:
                ratios["re:" + re.escape(m.name)] = _ratio_for(m, get_family(method))
            init = cfg.get("init", "auto")
            if cfg.get("method") != method or init == "auto":
                init = planned_init or (self.init if method == "lowrank" else "auto")
            cfg.update(method=method, targets=list(ratios), exclude=[], module_ratios=ratios, init=init)
            if nb is not None:
                cfg["nblocks"] = nb
            out.append((cfg, [m.name for m in mods]))
        return out

    def run_config(self, base=None):
        """What one ``compress`` run of this plan needs: ``(config, per_module)``.

        ``config`` (a CompressionConfig dict, ``base``'s schedule and training settings kept)
        targets every planned compressed module at its planned ratio; ``per_module`` is ``{}`` for a
        plan of one (method, nblocks, init), else ``{module name: its group's config dict}``: the
        driver factorizes each module with its own method, init and block count, in one run (one
        calibration per stage gathering every statistic its modules' inits need). A plan keeping
        every module dense is an error (a run needs a target); so is ``joint`` with mixed methods."""
        groups = self._groups(base)
        if not groups:
            raise ValueError("plan: every module stays dense: nothing to compress")
        if len(groups) == 1:
            return groups[0][0], {}
        run = dict(groups[0][0])
        if run.get("joint"):
            raise ValueError(f"joint: a plan mixing methods ({', '.join(sorted({g[0]['method'] for g in groups}))}) "
                             f"runs every module alone; got joint={run['joint']!r}")
        targets, ratios, per = [], {}, {}
        for cfg, names in groups:
            targets += cfg["targets"]
            ratios.update(cfg["module_ratios"])
            for n in names:
                per[n] = cfg
        run.update(targets=targets, module_ratios=ratios)
        return run, per


PLAN_METHODS = ("dense", "lowrank", "monarch", "block_lowrank", "sparse24", "dense_sparse")


def _ratio_for(m: "PlanEntry", fam) -> float:
    """A ratio whose family formula gives exactly ``m``'s planned setting (checked)."""
    i, o = m.in_features, m.out_features
    if fam.rank_for_ratio is None:  # fixed pattern (2:4): the ratio is ignored
        return 0.5
    # the planned params over the dense ones, nudged up by half a step: floor() lands on the rank
    lo, hi = 1.0 / (i * o), 1.0
    if m.method == "lowrank":
        q = min(1.0, (m.rank + 0.5) * (i + o) / (i * o))
    else:
        q = None
        # smallest ratio giving the rank: bisection on the (monotone) family formula
        kw = {} if m.nblocks is None else {"nblocks": m.nblocks}
        for _ in range(60):
            mid = (lo + hi) / 2
            if fam.rank_for_ratio(i, o, mid, **kw) >= m.rank:
                hi = mid
            else:
                lo = mid
        q = hi
    kw = {} if m.nblocks is None else {"nblocks": m.nblocks}
    if fam.rank_for_ratio(i, o, q, **kw) != m.rank:
        raise ValueError(f"plan: module {m.name!r}: rank {m.rank} has no ratio giving it exactly")
    return q


def as_plan(plan) -> BudgetPlan:
    """A :class:`BudgetPlan` from itself, its dict, or a path to its JSON."""
    if isinstance(plan, BudgetPlan):
        return plan
    if isinstance(plan, dict):
        return BudgetPlan.from_dict(plan)
    if isinstance(plan, (str, os.PathLike)):
        return BudgetPlan.load(os.fspath(plan))
    raise TypeError(f"plan: expected a BudgetPlan, its dict or a path to its JSON, got {type(plan).__name__}")


def fit_names(model: nn.Module, plan: BudgetPlan) -> BudgetPlan:
    """``plan`` with its module names moved under (or out of) the model's base-model prefix when
    that is what makes them names of ``model``: a plan made on a base model (``encoder.layer.0...``
    of ``BertModel``) executed on the same model with a task head (``bert.encoder.layer.0...`` of
    ``BertForSequenceClassification``), or the reverse. A copy when a name changed, else ``plan``."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = {n for n, _ in model.named_modules()}
    if not prefix or all(m.name in names for m in plan.modules):
        return plan
    moved = []
    for m in plan.modules:
        n = m.name
        if n not in names:
            if prefix + "." + n in names:
                n = prefix + "." + n
            elif n.startswith(prefix + ".") and n[len(prefix) + 1:] in names:
                n = n[len(prefix) + 1:]
        moved.append(n)
    if moved == [m.name for m in plan.modules] or any(n not in names for n in moved):
        return plan  # nothing to move, or not this model's modules either way (check_plan says which)
    out = BudgetPlan.from_dict(plan.to_dict())
    for m, n in zip(out.modules, moved):
        m.name = n
    return out


def check_plan(model: nn.Module, plan: BudgetPlan) -> None:
    """Every planned module is a dense linear of ``model`` with the planned shape (shapes only:
    a meta-device model will do)."""
    from .compress.targets import dense_view, get_module, is_supported_linear

    for m in plan.modules:
        try:
            mod = get_module(model, m.name)
        except (AttributeError, KeyError, ValueError) as e:
            raise ValueError(f"plan: module {m.name!r} not found in {type(model).__name__} ({e})") from None
        if not is_supported_linear(mod):
            raise ValueError(f"plan: module {m.name!r}: expected a dense linear layer (an uncompressed model), "
                             f"got {type(mod).__name__}")
        shape = tuple(dense_view(mod, m.name).weight.shape)
        if shape != (m.out_features, m.in_features):
            raise ValueError(f"plan: module {m.name!r}: expected weight (out, in) = "
                             f"{(m.out_features, m.in_features)}, got {shape}")


__all__ = ["PlanEntry", "BudgetPlan", "PLAN_METHODS", "PLAN_VERSION", "as_plan", "check_plan", "fit_names"]
