"""Compress to a budget: per-module low-rank ranks chosen from measured sensitivity.

Three steps, each usable alone:

1. :func:`sensitivity` — for every target module (the driver's ``select_targets``) and every
   candidate rank ``r`` on a grid, plus "keep dense", the **score** of that choice:

   * with an activation Gram ``G = XᵀX`` (``(in, in)``, e.g. from
     :func:`fastfactor.compress.calibration.collect_activation_stats`): let ``S`` be its Cholesky
     factor (``S·Sᵀ = G``, :func:`fastfactor.factorize.data_aware.whitening_factor`) and
     ``σ₁ ≥ σ₂ ≥ …`` the singular values of ``W·S`` (``W``: the ``(out, in)`` weight). The best rank-r
     approximation in the whitened norm (what ``init="activation"`` computes) has error

         score(r) = min_{rank(W')≤r} ‖(W − W')·S‖_F² = ‖(W − W')·Xᵀ‖_F² = Σ_{i>r} σᵢ²

     i.e. the summed squared output error of the module over the calibration tokens (Eckart–Young
     on ``W·S``; closed form, one SVD per module, no factor built);
   * without a Gram (``init="svd"``): the same with ``S = I``, the SVD tail energy of ``W``.

   Keeping the module dense scores 0 and costs ``in·out`` parameters; rank ``r`` costs
   ``r·(in + out)``. Ranks whose factors are not smaller than the dense weight are left out.

2. :func:`solve` — the choice per module minimizing the total score ``Σ score`` subject to
   ``Σ params ≤ budget`` (a multiple-choice knapsack), by dynamic programming over a parameter grid
   of unit ``u``: each choice costs ``⌈params/u⌉`` units, the capacity is ``⌊budget/u⌋`` units. With
   ``u = gcd`` of every choice's parameter count (``exact=True`` in the result) this is exact; when
   that grid would exceed ``max_cells`` cells, ``u`` grows and the answer stays feasible (costs are
   rounded up) but may be slightly sub-optimal (``exact=False``). The realised parameter count never
   exceeds the budget.

3. :class:`BudgetPlan` — the result as data (per module: name, method, rank, params, score), with a
   JSON round trip (:meth:`BudgetPlan.save` / :meth:`BudgetPlan.load`), a table, and
   :meth:`BudgetPlan.to_config`: a :class:`~fastfactor.CompressionConfig` dict whose ``targets`` are the
   compressed modules and whose ``module_ratios`` give each exactly its planned rank.
   :func:`apply_plan` executes it (``factorize_`` data-free, or ``compress`` with data).

``target_params``: a ``float`` in ``(0, 1]`` is a fraction of the targets' dense weight parameters;
an ``int >= 1`` is an absolute count. Bad budgets (bool, NaN, ≤ 0, a float > 1, below the smallest
reachable count) raise before any weight is read.

Not (yet) covered: other methods than low-rank (Monarch, 2:4, dense+sparse) in the grid, and a
latency budget (``target_latency``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

#: default grid: the ranks of these ratios (fraction of each module's dense weight parameters kept)
DEFAULT_RATIOS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: the DP grid is coarsened beyond this many capacity cells
MAX_CELLS = 200_000
PLAN_VERSION = 1


@dataclass
class Choice:
    method: str  #: "lowrank" or "dense"
    rank: Optional[int]  #: None for "dense"
    params: int  #: weight parameters this choice stores
    score: float  #: its predicted error (see the module docstring); 0 for "dense"


@dataclass
class ModuleCandidates:
    name: str
    in_features: int
    out_features: int
    choices: List[Choice]  #: "dense" first, then the ranks in increasing order

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features


def candidate_ranks(in_features: int, out_features: int, ratios: Sequence[float] = DEFAULT_RATIOS,
                    ranks: Optional[Sequence[int]] = None) -> List[int]:
    """Sorted distinct ranks ``r`` with ``1 <= r <= min(in, out)`` and ``r·(in+out) < in·out``:
    ``ranks`` when given, else ``rank_for_ratio`` of each ratio."""
    from .factorize.svd import rank_for_ratio

    if ranks is None:
        rs = [rank_for_ratio(in_features, out_features, float(q)) for q in ratios]
    else:
        rs = []
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
                raise ValueError(f"ranks: expected positive ints, got {r!r}")
            rs.append(int(r))
    lim = min(in_features, out_features)
    return sorted({r for r in rs if r <= lim and r * (in_features + out_features) < in_features * out_features})


def tail_energies(weight: torch.Tensor, gram: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``t`` (float64, length ``min(out, in) + 1``) with ``t[r] = Σ_{i>r} σᵢ²``, ``σ`` the singular
    values of ``W·S`` (``S·Sᵀ = gram``) or of ``W`` when ``gram`` is None: ``t[r]`` is the squared
    (whitened) Frobenius error of the best rank-``r`` approximation of ``weight`` (``(out, in)``)."""
    from .factorize.data_aware import whitening_factor

    w = weight.detach().to(torch.float64)
    if gram is not None:
        if tuple(gram.shape) != (w.shape[1], w.shape[1]):
            raise ValueError(f"gram: expected shape ({w.shape[1]}, {w.shape[1]}), got {tuple(gram.shape)}")
        S, _ = whitening_factor(gram.to(w.device))
        w = w @ S
    s2 = torch.linalg.svdvals(w).pow(2)
    tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])  # tail[i] = Σ_{j>=i} σⱼ²
    return torch.cat([tail, tail.new_zeros(1)])


def sensitivity(model: nn.Module, config=None, *, grams: Optional[Dict[str, object]] = None,
                ratios: Sequence[float] = DEFAULT_RATIOS, ranks: Optional[Sequence[int]] = None,
                targets=None) -> List[ModuleCandidates]:
    """Candidates and scores of every target of ``model`` (see the module docstring).

    ``config``: a CompressionConfig (or dict / path) whose ``targets`` / ``exclude`` pick the modules
    (as in the driver); ``grams``: ``{module name: G}`` or the ``{name: (G, tokens)}`` of
    ``collect_activation_stats``; every target must have one when given. ``targets``: a precomputed
    list of :class:`~fastfactor.compress.targets.Target` (skips the selection). Reads the weights,
    changes nothing."""
    from .api import _chosen_targets, _config
    from .compress.targets import dense_view, get_module

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if targets is None:
        targets = _chosen_targets(model, _config(config), None)
    if grams is not None:
        missing = [t.name for t in targets if t.name not in grams]
        if missing:
            raise ValueError(f"grams: expected a Gram matrix for every target, missing {missing}")
    out = []
    for t in targets:
        view = dense_view(get_module(model, t.name), t.name)
        g = None
        if grams is not None:
            g = grams[t.name]
            g = g[0] if isinstance(g, tuple) else g
        tail = tail_energies(view.weight, g)
        choices = [Choice("dense", None, t.in_features * t.out_features, 0.0)]
        for r in candidate_ranks(t.in_features, t.out_features, ratios, ranks):
            choices.append(Choice("lowrank", r, r * (t.in_features + t.out_features), float(tail[r])))
        out.append(ModuleCandidates(t.name, t.in_features, t.out_features, choices))
    return out


def resolve_budget(target_params, total: int, minimum: int) -> int:
    """The absolute parameter budget of ``target_params`` (see the module docstring) for targets
    holding ``total`` dense weight parameters, whose cheapest plan stores ``minimum``."""
    if isinstance(target_params, bool) or not isinstance(target_params, (int, float, np.integer, np.floating)):
        raise TypeError(f"target_params: expected a fraction (float in (0, 1]) or a count (int >= 1), "
                        f"got {type(target_params).__name__} {target_params!r}")
    if isinstance(target_params, (float, np.floating)):
        if not math.isfinite(target_params):
            raise ValueError(f"target_params: expected a finite fraction in (0, 1], got {target_params}")
        if not 0 < target_params <= 1:
            raise ValueError(f"target_params: expected a fraction in (0, 1] of the targets' {total:,} weight "
                             f"parameters (an int for an absolute count), got {target_params}")
        budget = math.floor(target_params * total)
    else:
        budget = int(target_params)
        if budget < 1:
            raise ValueError(f"target_params: expected an absolute count >= 1, got {budget}")
    if budget < minimum:
        raise ValueError(f"target_params: budget {budget:,} parameters is unreachable: the smallest candidate "
                         f"plan stores {minimum:,} of the targets' {total:,} (add smaller ranks, or raise it)")
    return budget


def _dp(costs: List[List[int]], scores: List[List[float]], cap: int):
    """Multiple-choice knapsack: one index per group minimizing Σ score with Σ cost ≤ cap (ints).
    Returns the list of chosen indices (None if infeasible)."""
    n = len(costs)
    dp = np.zeros(cap + 1)  # dp[c]: min score of the groups so far within c units
    back = np.zeros((n, cap + 1), dtype=np.int16)
    for m in range(n):
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int16)
        for j, (w, s) in enumerate(zip(costs[m], scores[m])):
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = dp[: cap + 1 - w] + s
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp, back[m] = new, arg
    if not np.isfinite(dp[cap]):
        return None
    picks, c = [0] * n, cap
    for m in range(n - 1, -1, -1):
        j = int(back[m, c])
        picks[m] = j
        c -= costs[m][j]
    return picks


def solve(candidates: List[ModuleCandidates], target_params, *, max_cells: int = MAX_CELLS) -> "BudgetPlan":
    """The per-module choice of least total score within ``target_params`` (see the module docstring)."""
    if not candidates:
        raise ValueError("candidates: expected at least one module")
    total = sum(c.dense_params for c in candidates)
    minimum = sum(min(ch.params for ch in c.choices) for c in candidates)
    budget = resolve_budget(target_params, total, minimum)
    params = [[ch.params for ch in c.choices] for c in candidates]
    unit = 0
    for ps in params:
        for p in ps:
            unit = math.gcd(unit, p)
    unit = max(1, unit)
    exact = budget // unit <= max_cells
    if not exact:
        unit = math.ceil(budget / max_cells)
    costs = [[math.ceil(p / unit) for p in ps] for ps in params]
    picks = _dp(costs, [[ch.score for ch in c.choices] for c in candidates], budget // unit)
    if picks is None:  # only when the coarse grid's rounding lost the cheapest plan
        raise ValueError(f"target_params: budget {budget:,} is too tight for the parameter grid "
                         f"(unit {unit}); raise it or max_cells")
    rows = []
    for c, j in zip(candidates, picks):
        ch = c.choices[j]
        rows.append(PlanEntry(c.name, ch.method, ch.rank, ch.params, ch.score, c.in_features, c.out_features))
    plan = BudgetPlan(budget=budget, target_params_dense=total, exact=exact, modules=rows)
    assert plan.params <= budget, (plan.params, budget)
    return plan


@dataclass
class PlanEntry:
    name: str
    method: str  #: "lowrank" or "dense"
    rank: Optional[int]
    params: int
    score: float
    in_features: int
    out_features: int


@dataclass
class BudgetPlan:
    """Per-module ranks under a parameter budget (see the module docstring)."""

    budget: int  #: the absolute parameter budget the plan meets
    target_params_dense: int  #: the targets' dense weight parameters
    exact: bool  #: whether the solver's grid was exact
    modules: List[PlanEntry] = field(default_factory=list)
    scorer: str = "svd"  #: "whitened" (activation Gram) or "svd"
    init: str = "svd"  #: the lowrank init matching the scorer ("activation" or "svd")

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def score(self) -> float:
        return sum(m.score for m in self.modules)

    @property
    def kept(self) -> float:
        return self.params / max(1, self.target_params_dense)

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "budget": self.budget, "target_params_dense": self.target_params_dense,
                "exact": self.exact, "scorer": self.scorer, "init": self.init, "params": self.params,
                "kept": self.kept, "score": self.score, "modules": [asdict(m) for m in self.modules]}

    @classmethod
    def from_dict(cls, d: dict) -> "BudgetPlan":
        if not isinstance(d, dict) or "modules" not in d:
            raise ValueError("plan: expected a dict with 'modules' (a BudgetPlan.to_dict())")
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise ValueError(f"plan: expected version {PLAN_VERSION}, got {d.get('version')!r}")
        mods = [PlanEntry(**m) for m in d["modules"]]
        for m in mods:
            if m.method not in ("lowrank", "dense"):
                raise ValueError(f"plan: module {m.name!r}: expected method 'lowrank' or 'dense', got {m.method!r}")
        return cls(budget=int(d["budget"]), target_params_dense=int(d["target_params_dense"]),
                   exact=bool(d["exact"]), modules=mods, scorer=d.get("scorer", "svd"), init=d.get("init", "svd"))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> "BudgetPlan":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"plan: no such file {path!r}")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def table(self) -> str:
        from .compress.report import format_table

        rows = [[m.name, f"{m.out_features}x{m.in_features}", m.method, "-" if m.rank is None else str(m.rank),
                 f"{m.params:,}", f"{m.params / (m.in_features * m.out_features):.3f}", f"{m.score:.4g}"]
                for m in self.modules]
        head = ["module", "out x in", "method", "rank", "params", "kept", f"score ({self.scorer})"]
        return format_table(head, rows) + (
            f"\n{len(self.modules)} module(s): {self.params:,} of {self.target_params_dense:,} target weight "
            f"parameters (kept {self.kept:.3f}; budget {self.budget:,}{'' if self.exact else ', coarse grid'}), "
            f"predicted score {self.score:.4g}")

    def to_config(self, base=None) -> Optional[dict]:
        """A CompressionConfig dict (``base``'s other fields kept) replacing exactly the ``lowrank``
        modules, each at its planned rank (through ``module_ratios``; checked); None when every
        module stays dense."""
        from .api import _config
        from .factorize.svd import rank_for_ratio

        cfg = _config(base).to_dict()
        low = [m for m in self.modules if m.method == "lowrank"]
        if not low:
            return None
        ratios = {}
        for m in low:
            i, o = m.in_features, m.out_features
            q = min(1.0, (m.rank + 0.5) * (i + o) / (i * o))  # floor(q·i·o/(i+o)) = rank, away from rounding
            if rank_for_ratio(i, o, q) != m.rank:
                raise ValueError(f"plan: module {m.name!r}: rank {m.rank} has no ratio giving it exactly")
            ratios["re:" + re.escape(m.name)] = q
        init = cfg.get("init", "auto")
        cfg.update(method="lowrank", targets=list(ratios), exclude=[], module_ratios=ratios,
                   init=self.init if init == "auto" or cfg.get("method") != "lowrank" else init)
        return cfg


def plan_model(model: nn.Module, target_params, config=None, *, grams=None, ratios=DEFAULT_RATIOS,
               ranks=None, max_cells: int = MAX_CELLS) -> BudgetPlan:
    """:func:`sensitivity` then :func:`solve`; the budget is checked before any weight is read."""
    from .api import _chosen_targets, _config
    from .factorize.svd import rank_for_ratio  # noqa: F401  (import errors surface early)

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    targets = _chosen_targets(model, _config(config), None)
    total = sum(t.in_features * t.out_features for t in targets)
    minimum = 0
    for t in targets:
        rs = candidate_ranks(t.in_features, t.out_features, ratios, ranks)
        minimum += min([t.in_features * t.out_features] + [r * (t.in_features + t.out_features) for r in rs])
    resolve_budget(target_params, total, minimum)  # before any weight is touched
    cands = sensitivity(model, grams=grams, ratios=ratios, ranks=ranks, targets=targets)
    plan = solve(cands, target_params, max_cells=max_cells)
    if grams is not None:
        plan.scorer, plan.init = "whitened", "activation"
    return plan


def apply_plan(model: nn.Module, plan: BudgetPlan, data=None, config=None) -> nn.Module:
    """Execute ``plan`` on ``model`` in place: ``factorize_`` (data-free inits) or, with ``data``,
    ``fastfactor.compress`` with ``config``'s schedule (staged / offline / all_at_once); returns
    the model. Every planned module must be a target of the model with the planned shape."""
    from .api import factorize_
    from .compress.targets import get_module, dense_view

    if isinstance(plan, dict):
        plan = BudgetPlan.from_dict(plan)
    if not isinstance(plan, BudgetPlan):
        raise TypeError(f"plan: expected a BudgetPlan or its dict, got {type(plan).__name__}")
    for m in plan.modules:
        try:
            mod = get_module(model, m.name)
        except (AttributeError, KeyError, ValueError) as e:
            raise ValueError(f"plan: module {m.name!r} not found in {type(model).__name__} ({e})") from None
        shape = tuple(dense_view(mod, m.name).weight.shape)
        if shape != (m.out_features, m.in_features):
            raise ValueError(f"plan: module {m.name!r}: expected weight (out, in) = "
                             f"{(m.out_features, m.in_features)}, got {shape}")
    cfg = plan.to_config(config)
    if cfg is None:
        return model
    if data is None:
        return factorize_(model, cfg)
    from .compress.driver import compress

    compress(model, cfg, data)
    return model


__all__ = ["Choice", "ModuleCandidates", "PlanEntry", "BudgetPlan", "candidate_ranks", "tail_energies",
           "sensitivity", "resolve_budget", "solve", "plan_model", "apply_plan"]
