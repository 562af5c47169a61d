"""The driver's side of modules compressed together (``CompressionConfig.joint``).

Which modules form a group
--------------------------
``joint`` lists group kinds; each kind is a set of sibling names that read the same input:

* ``qkv``: the query / key / value projections of one attention — BERT ``query, key, value``,
  LLaMA / Mistral / OPT ``q_proj, k_proj, v_proj``, DistilBERT ``q_lin, k_lin, v_lin``;
* ``mlp``: the two input projections of a gated MLP — LLaMA ``gate_proj, up_proj``, T5
  ``wi_0, wi_1``;
* ``"a+b[+c...]"``: any other set of sibling module names (all read the same input).

A group is formed inside one parent module when every name of a set is a target there, with the
same ``in_features``. A module that already holds a group fused (GPT-2's ``c_attn`` Conv1D is
``[W_q; W_k; W_v]``) is compressed as it is: its low-rank factors already share one ``V``, at the
same budget as the joint form (reported as a note). A ``joint`` that forms no group and finds no
fused module is an error.

The joint fit and its budget
----------------------------
Separately, member ``i`` (``(n_i, in)``, ratio ``ρ_i``) would keep ``P_i = r_i·(in + n_i)`` weights,
``r_i`` = the family's ``rank_for_ratio(in, n_i, ρ_i)``. The group keeps at most ``P = Σ P_i``:
one rank ``r = min(floor(P / (in + N)), in, N)``, ``N = Σ n_i``, so ``r·(in + N) <= P`` and one
more rank would exceed it. The family's init fits ``[W_1; ...; W_g] (N, in)`` (bias concatenated,
zeros for a member without one) as if it were one module, with the statistics of the group:
``gram`` — the shared input's ``XᵀX`` (the members' Grams must agree: a check that they do read
the same input), ``fisher`` — the members' ``(n_i, in)`` Fisher matrices stacked by rows. So SVD,
Fisher-weighted SVD and activation-aware SVD (and any init a low-rank family registers, e.g. the
autoencoder's) minimize their loss over the group's concatenated output.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..layers.joint import JointLowRankLinear, link_joint
from .targets import DenseView, Target, dense_view, get_module, set_module

#: group kinds -> the sibling-name sets that form one (first name = the leader)
KINDS: Dict[str, Tuple[Tuple[str, ...], ...]] = {
    "qkv": (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin")),
    "mlp": (("gate_proj", "up_proj"), ("wi_0", "wi_1")),
}
#: modules that already hold a kind's group fused in one weight (nothing to do: shared V by construction)
FUSED: Dict[str, Tuple[str, ...]] = {
    "qkv": ("c_attn", "query_key_value", "qkv_proj", "Wqkv"),
    "mlp": ("gate_up_proj",),
}
#: families whose layer is low-rank ``U·V`` (a joint group shares ``V``); a low-rank family added
#: later (the autoencoder) appends its name
JOINT_METHODS: List[str] = ["lowrank", "autoencoder"]


def parse_joint(value) -> List[str]:
    """``"qkv,mlp"`` / ``["qkv", "mlp"]`` / ``None`` -> a checked list of kinds (``TypeError`` /
    ``ValueError`` naming ``joint``)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in (p.strip() for p in value.split(",")) if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"joint: expected a list of group kinds (str) such as ['qkv', 'mlp'], got {value!r}")
    out = []
    for v in value:
        v = v.strip()
        if v in KINDS:
            pass
        elif "+" in v:
            names = v.split("+")
            if len(names) < 2 or not all(n and n.isidentifier() for n in names) or len(set(names)) != len(names):
                raise ValueError(f"joint: {v!r}: expected distinct sibling module names joined by '+', e.g. 'q+k+v'")
        else:
            raise ValueError(f"joint: expected {sorted(KINDS)} or sibling names joined by '+' ('a+b+c'), got {v!r}")
        if v in out:
            raise ValueError(f"joint: {v!r} given twice")
        out.append(v)
    return out


def _name_sets(kind: str) -> Tuple[Tuple[str, ...], ...]:
    return KINDS[kind] if kind in KINDS else (tuple(kind.split("+")),)


@dataclasses.dataclass
class JointGroup:
    """One group: its kind, the parent module's name and the members' qualified names (leader first)."""

    kind: str
    parent: str
    names: List[str]

    @property
    def children(self) -> List[str]:
        return [n.rpartition(".")[2] for n in self.names]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def find_groups(model: nn.Module, targets: Sequence[Target], joint) -> Tuple[List[JointGroup], List[str]]:
    """``(groups, notes)``: the groups among ``targets`` for the kinds in ``joint`` (model order),
    and one note per fused module or incomplete set. ``ValueError`` when ``joint`` is not empty and
    finds neither a group nor a fused module."""
    kinds = parse_joint(joint)
    if not kinds:
        return [], []
    by_name = {t.name: t for t in targets}
    parents: Dict[str, List[str]] = {}
    for t in targets:
        parent, _, child = t.name.rpartition(".")
        parents.setdefault(parent, []).append(child)
    groups, notes, taken = [], [], set()
    for parent, children in parents.items():
        for kind in kinds:
            for fused in FUSED.get(kind, ()):
                if fused in children:
                    notes.append(f"{kind}: {parent + '.' if parent else ''}{fused} already holds the group in one module "
                                 "(its low-rank factors share one V at the same budget)")
            for names in _name_sets(kind):
                present = [n for n in names if n in children]
                if not present:
                    continue
                full = [f"{parent}.{n}" if parent else n for n in names]
                if len(present) < len(names):
                    notes.append(f"{kind}: {parent or '(root)'}: only {present} of {list(names)} are targets; not grouped")
                    continue
                if any(f in taken for f in full):
                    raise ValueError(f"joint: {kind!r}: module(s) {[f for f in full if f in taken]} already in another group")
                ins = {by_name[f].in_features for f in full}
                if len(ins) != 1:
                    raise ValueError(f"joint: {kind!r}: members {full} have different in_features {sorted(ins)}; "
                                     "they cannot read the same input")
                groups.append(JointGroup(kind, parent, full))
                taken.update(full)
    order = {t.name: i for i, t in enumerate(targets)}
    groups.sort(key=lambda g: order[g.names[0]])
    if not groups and not any("already holds" in n for n in notes):
        raise ValueError(
            f"joint: {kinds} formed no group in {type(model).__name__}: no parent holds all of "
            f"{[list(s) for k in kinds for s in _name_sets(k)]} among the targets"
        )
    return groups, notes


def joint_rank(family, in_features: int, outs: Sequence[int], ratios: Sequence[float]) -> Tuple[int, int]:
    """``(r, budget)``: the group's rank and the weights the members would keep separately
    (``budget = Σ rank_for_ratio(in, n_i, ρ_i)·(in + n_i)``; ``r = min(floor(budget/(in+N)), in, N)``, >= 1)."""
    if family.rank_for_ratio is None:
        raise ValueError(f"joint: method {family.name!r} has no rank (expected a low-rank method: {JOINT_METHODS})")
    budget = sum(int(family.rank_for_ratio(in_features, n, rho)) * (in_features + n) for n, rho in zip(outs, ratios))
    n_all = sum(outs)
    r = max(1, min(budget // (in_features + n_all), in_features, n_all))
    return int(r), int(budget)


def _ratio_for_rank(family, in_f: int, out_f: int, r: int) -> float:
    """A ratio whose ``rank_for_ratio`` is exactly ``r`` (checked)."""
    rho = min(1.0, (r + 0.5) * (in_f + out_f) / float(in_f * out_f))
    got = int(family.rank_for_ratio(in_f, out_f, rho))
    if got != r:
        lo, hi = 1e-9, 1.0  # bisection on the family's own (monotone) formula
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            if int(family.rank_for_ratio(in_f, out_f, mid)) >= r:
                hi = mid
            else:
                lo = mid
        rho = hi
        got = int(family.rank_for_ratio(in_f, out_f, rho))
        if got != r:
            raise ValueError(f"joint: method {family.name!r} gives no ratio with rank {r} for ({out_f}, {in_f})")
    return rho


def group_stats(group: JointGroup, stats: Dict[str, dict]) -> dict:
    """The group's statistics from its members' (see the module docstring)."""
    per = [stats.get(n) or {} for n in group.names]
    out = {}
    if all(p.get("gram") is not None for p in per):
        g0 = per[0]["gram"]
        for n, p in zip(group.names[1:], per[1:]):
            g = p["gram"]
            if g.shape != g0.shape or not torch.allclose(g.to(torch.float64), g0.to(torch.float64), rtol=1e-6, atol=1e-8):
                raise ValueError(
                    f"joint: {group.names[0]!r} and {n!r} do not read the same input (their calibration Grams differ); "
                    "a shared input basis needs one input — leave them out of `joint`"
                )
        out["gram"] = g0
    if all(p.get("fisher") is not None for p in per):
        out["fisher"] = torch.cat([p["fisher"] for p in per], 0)
    for key in set().union(*[set(p) for p in per]) - {"gram", "fisher"}:  # other statistics: the leader's (shared input)
        out[key] = per[0][key]
    return out


def build_group(model: nn.Module, group: JointGroup, targets: Dict[str, Target], method: str, init: str, config,
                stats: Optional[dict] = None) -> Dict[str, nn.Module]:
    """``{member name: new module}``: the leader (:class:`JointLowRankLinear`) and its members, fitted
    jointly from the members' current dense weights (not yet put into ``model``)."""
    from .. import _validate
    from .methods import build_layer, get_method

    if method not in JOINT_METHODS:
        raise ValueError(f"joint: expected a low-rank method {JOINT_METHODS}, got method={method!r}")
    family = get_method(method)
    views = []
    for n in group.names:
        v = dense_view(get_module(model, n), n)
        _validate.check_finite(f"{n}.weight", v.weight)
        views.append(v)
    in_f = views[0].in_features
    outs = [v.out_features for v in views]
    r, _ = joint_rank(family, in_f, outs, [targets[n].ratio for n in group.names])
    w = torch.cat([v.weight for v in views], 0)
    has_b = [v.bias is not None for v in views]
    b = torch.cat([v.bias if v.bias is not None else v.weight.new_zeros(v.out_features) for v in views]) \
        if any(has_b) else None
    view = DenseView(w, b)
    rho = _ratio_for_rank(family, in_f, sum(outs), r)
    try:
        inner = build_layer(method, view, rho, init, config, group_stats(group, stats or {}))
    except (ValueError, TypeError) as e:
        raise type(e)(f"joint group {group.names}: {e}") from e
    got = getattr(inner, "rank", r)
    if got != r:
        raise ValueError(f"joint group {group.names}: the init built rank {got}, expected {r}")
    leader = JointLowRankLinear.from_inner(inner, group.children, outs, has_b)
    mods = [leader] + leader.members()
    return dict(zip(group.names, mods))


def swap_group(model: nn.Module, group: JointGroup, targets: Dict[str, Target], method: str, init: str, config,
               stats: Optional[dict] = None) -> Dict[str, nn.Module]:
    """:func:`build_group` and put the modules into ``model`` (train/eval mode kept); returns them."""
    new = build_group(model, group, targets, method, init, config, stats)
    for n, m in new.items():
        old = get_module(model, n)
        m.train(old.training)
        set_module(model, n, m)
    link_joint(model)
    return new


__all__ = ["KINDS", "FUSED", "JOINT_METHODS", "JointGroup", "parse_joint", "find_groups", "joint_rank",
           "group_stats", "build_group", "swap_group"]
