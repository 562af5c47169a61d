"""Modules compressed together: several linear layers that read the same input share one factor.

Banaei et al. (EACL 2023) compress modules *together*. The members of a group — the query, key and
value projections of one attention, the gate and up projections of a gated MLP — read the same
input ``x``, so their weights can share one input basis::

    [W_1; W_2; ...; W_g]  ≈  [U_1; U_2; ...; U_g] · V          W_i (n_i, in), U_i (n_i, r), V (r, in)

and the model computes ``t = x·Vᵀ`` once for the whole group: **one** chain launch of the fused
low-rank op with the concatenated ``U (N, r)``, ``N = Σ n_i``, writes every member's output, which
is then split along the last dimension (``torch.split``: views, no copy — GPT-2's own fused
``c_attn`` hands out the same kind of views).

Layout
------
* :class:`JointLowRankLinear` stands in for the group's **first** member (the *leader*). It holds
  ``inner``: one factorized layer of shape ``(in, N)`` (a :class:`LowRankLinear`, or any
  :class:`~fastfactor.layers.base.FactorizedLinear` whose forward is one launch, e.g. the
  autoencoder's nonlinear form) with the concatenated bias (zeros for members without one, which
  from then on have a trainable bias), and
  returns its own slice ``[0, n_0)``.
* :class:`JointMemberLinear` stands in for every other member: it holds no parameters, only its
  slice ``[offset, offset + n_i)`` and the name of the leader, its sibling in the same parent
  module. Its forward asks the leader for its slice. The leader is referenced through a plain tuple
  attribute (not a registered submodule), so the state dict holds every tensor once, under the
  leader (``<leader>.inner.u`` ...), ``model.to`` / ``deepcopy`` keep the link (deepcopy's memo maps
  it to the copied leader), and a saved model is rebuilt member by member from the manifest, then
  :func:`link_joint` reconnects the members to their leaders (``load_compressed`` and the Hugging
  Face quantizer call it).

Computing once: the leader's output cache
-----------------------------------------
Hugging Face attention code calls ``self.query(h)``, ``self.key(h)``, ``self.value(h)`` one after
the other with the **same tensor object** ``h`` (the LLaMA MLP: ``gate(x)``, ``up(x)``). The first
member called runs the group's launch on ``x`` and keeps ``(x, outputs, which members took theirs)``
in the leader; each further member called with the *same object* ``x`` takes its slice, and the
entry is dropped once every member has taken its slice. Anything else recomputes: a different input
object (cross-attention, where key/value read the encoder's states: still correct, only not shared),
a member asking twice, or — in eager mode — a change since the entry was made to ``x``'s or a
factor's version counter (an in-place update, an optimizer step), to grad mode or to autocast. So
the cache can only ever return what a fresh computation would.

Under ``torch.compile(fullgraph=True)`` Dynamo traces the same Python: the ``is`` test and the
bookkeeping resolve at trace time, the graph holds one low-rank op per group, and the cache ends
empty (a mutation Dynamo replays). Version counters are not read while compiling (the traced graph
has no in-place update between the members). A group whose members are not all called leaves its
last entry in the leader until the next call (memory of one output; :meth:`JointLowRankLinear.clear_cache`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from .. import _validate as V
from .base import FactorizedLinear


def _layer_class(name: str) -> type:
    """The :class:`FactorizedLinear` subclass called ``name`` (every imported one: the families'
    layers and any registered by user code), not a joint class."""
    classes, todo = {}, [FactorizedLinear]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in (JointLowRankLinear, JointMemberLinear):
                classes.setdefault(sub.__name__, sub)
            todo.append(sub)
    if name not in classes:
        raise ValueError(f"inner_class: expected one of {sorted(classes)}, got {name!r}")
    return classes[name]


def _check_members(names, splits, bias):
    if not isinstance(names, (list, tuple)) or len(names) < 1 or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"names: expected a list of member (sibling module) names, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"names: expected distinct member names, got {list(names)}")
    if not isinstance(splits, (list, tuple)) or len(splits) != len(names):
        raise ValueError(f"splits: expected {len(names)} output sizes (one per member), got {splits!r}")
    for i, s in enumerate(splits):
        V.check_positive_int(f"splits[{i}]", s)
    if isinstance(bias, bool):
        bias = [bias] * len(names)
    if not isinstance(bias, (list, tuple)) or len(bias) != len(names) or not all(isinstance(b, bool) for b in bias):
        raise TypeError(f"bias: expected a bool or one bool per member ({len(names)}), got {bias!r}")
    return list(names), [int(s) for s in splits], [bool(b) for b in bias]


class JointLowRankLinear(FactorizedLinear):
    """The leader of a group of modules compressed together (see the module docstring).

    Stands in for ``nn.Linear(in_features, splits[0])`` (member ``names[0]``); ``inner`` is one
    factorized layer ``(in_features, N = Σ splits)`` holding every member's factors. Its forward
    returns ``inner(x)[..., :splits[0]]`` and keeps the other slices for the members.

    Args:
        in_features: the shared input size.
        out_features: this member's output size (``splits[0]``).
        names: the members' module names (siblings in one parent), the leader first.
        splits: their output sizes ``n_i``.
        bias: per member, whether the dense layer had a bias (recorded). When any member has one,
            ``inner`` holds the concatenated bias and a member without one gets a zero slice there:
            a trainable bias from then on (fine-tuning may change it), which :meth:`to_linear` keeps.
        inner_class, inner_config: the class name (a family's layer) and ``factor_config`` of ``inner``.

    ``num_weight_params`` is the group's stored factors (every member's share: the members
    themselves store nothing); ``ratio`` is the group's ``num_weight_params / (in · N)``.
    """

    method = "joint"

    def __init__(self, in_features: int, out_features: int, names: Sequence[str], splits: Sequence[int],
                 bias=True, inner_class: str = "LowRankLinear", inner_config: Optional[dict] = None,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        V.check_positive_int("in_features", in_features)
        names, splits, bias = _check_members(names, splits, bias)
        if out_features != splits[0]:
            raise ValueError(f"out_features: expected splits[0] = {splits[0]} (the leader's own output), got {out_features}")
        if not isinstance(inner_config, dict):
            raise TypeError(f"inner_config: expected the inner layer's factor_config (a dict), got {inner_config!r}")
        cls = _layer_class(inner_class)
        inner = cls(**inner_config)
        if inner.in_features != in_features or inner.out_features != sum(splits):
            raise ValueError(
                f"inner_config: expected in_features={in_features}, out_features={sum(splits)} (Σ splits), got "
                f"{inner.in_features}, {inner.out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.names, self.splits, self.member_bias = names, splits, bias
        self.inner = inner.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else inner
        self._cache = None

    def __getstate__(self):  # deepcopy / pickle: never the cached activations
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_inner(cls, inner: FactorizedLinear, names: Sequence[str], splits: Sequence[int], bias=True
                   ) -> "JointLowRankLinear":
        """Wrap an already fitted ``inner`` layer ``(in, Σ splits)`` (moved in, not copied)."""
        if not isinstance(inner, FactorizedLinear):
            raise TypeError(f"inner: expected a FactorizedLinear, got {type(inner).__name__}")
        names, splits, bias = _check_members(names, splits, bias)
        with torch.device("meta"):
            mod = cls(inner.in_features, splits[0], names, splits, bias, type(inner).__name__, inner.factor_config())
        mod.inner = inner
        return mod

    def members(self) -> List["JointMemberLinear"]:
        """Fresh :class:`JointMemberLinear` views for members ``1 ..`` (linked to this leader)."""
        out, off = [], self.splits[0]
        for i in range(1, len(self.names)):
            m = JointMemberLinear(self.in_features, self.splits[i], self.names[0], i, off, self.member_bias[i])
            m.link(self)
            out.append(m)
            off += self.splits[i]
        return out

    # ---- the shared computation -------------------------------------------------------------
    def _state(self, x: torch.Tensor):
        """What must not have changed for a cached output to be reused (eager only)."""
        ac = torch.is_autocast_enabled(x.device.type) if hasattr(torch, "is_autocast_enabled") else False
        return (torch.is_grad_enabled(), ac, x._version) + tuple(p._version for p in self.inner.parameters())

    def clear_cache(self) -> None:
        self._cache = None

    def member_output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s output ``x·W_indexᵀ + b_index`` (its slice of ``inner(x)``), from the
        cache when the group's launch already ran on this very ``x`` (see the module docstring)."""
        compiling = torch.compiler.is_compiling()
        c = self._cache
        if c is not None and c[0] is x and not c[2][index] and (compiling or c[3] == self._state(x)):
            used = tuple(u or j == index for j, u in enumerate(c[2]))
            self._cache = None if all(used) else (c[0], c[1], used, c[3])
            return c[1][index]
        y = self.inner(x)
        outs = torch.split(y, self.splits, dim=-1)
        used = tuple(j == index for j in range(len(self.splits)))
        self._cache = None if all(used) else (x, outs, used, None if compiling else self._state(x))
        return outs[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_output(x, 0)

    def forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.forward_unfused(x)[..., : self.splits[0]]

    # ---- FactorizedLinear ----------------------------------------------------------------------
    def group_dense_weight(self) -> torch.Tensor:
        """``[W_1; ...; W_g] (N, in)`` the group's factors represent."""
        return self.inner.dense_weight()

    def member_dense_weight(self, index: int) -> torch.Tensor:
        off = sum(self.splits[:index])
        return self.group_dense_weight()[off: off + self.splits[index]]

    def member_bias_tensor(self, index: int) -> Optional[torch.Tensor]:
        b = getattr(self.inner, "bias", None)
        if b is None:
            return None
        off = sum(self.splits[:index])
        return b[off: off + self.splits[index]]

    def dense_weight(self) -> torch.Tensor:
        return self.member_dense_weight(0)

    @property
    def bias(self):  # the leader's own bias slice (to_linear, dense_view)
        return self.member_bias_tensor(0)

    @property
    def num_weight_params(self) -> int:
        return int(self.inner.num_weight_params)

    @property
    def ratio(self) -> float:
        return self.num_weight_params / float(self.in_features * sum(self.splits))

    @property
    def rank(self) -> Optional[int]:
        return getattr(self.inner, "rank", None)

    def factor_config(self) -> dict:
        return dict(in_features=self.in_features, out_features=self.out_features, names=list(self.names),
                    splits=list(self.splits), bias=list(self.member_bias), inner_class=type(self.inner).__name__,
                    inner_config=self.inner.factor_config())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, members={self.names}, "
                f"splits={self.splits}, group_ratio={self.ratio:.3f}")


class JointMemberLinear(FactorizedLinear):
    """A member ``index >= 1`` of a group compressed together: a parameter-free view of its slice
    ``[offset, offset + out_features)`` of the leader's output. ``leader`` is the leader's module
    name, a sibling in the same parent (linked by :func:`link_joint`).

    ``num_weight_params`` is 0 (the group's factors are counted once, by the leader)."""

    method = "joint"

    def __init__(self, in_features: int, out_features: int, leader: str, index: int, offset: int, bias: bool = True,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        V.check_positive_int("in_features", in_features)
        V.check_positive_int("out_features", out_features)
        V.check_positive_int("index", index, minimum=1)
        V.check_positive_int("offset", offset, minimum=1)
        if not isinstance(leader, str) or not leader or "." in leader:
            raise ValueError(f"leader: expected the leader's module name (a sibling, no dots), got {leader!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {bias!r}")
        self.in_features, self.out_features = in_features, out_features
        self.leader, self.index, self.offset, self.has_bias = leader, index, offset, bias
        self._joint = ()  # (leader module,) once linked: a tuple, so not a registered submodule

    def link(self, leader: JointLowRankLinear) -> None:
        if not isinstance(leader, JointLowRankLinear):
            raise TypeError(f"leader: expected a JointLowRankLinear, got {type(leader).__name__}")
        i = self.index
        if (i >= len(leader.splits) or leader.splits[i] != self.out_features or sum(leader.splits[:i]) != self.offset
                or leader.in_features != self.in_features or leader.names[0] != self.leader):
            raise ValueError(
                f"leader: {leader.names[0]!r} (members {leader.names}, splits {leader.splits}, in {leader.in_features}) "
                f"does not hold member {i} with {self.out_features} outputs at offset {self.offset}, in {self.in_features}"
            )
        self._joint = (leader,)

    @property
    def leader_module(self) -> JointLowRankLinear:
        if not self._joint:
            raise RuntimeError(
                f"JointMemberLinear (member {self.index} of {self.leader!r}) is not linked to its leader; call "
                "fastfactor.layers.joint.link_joint(model) after building or loading the model"
            )
        return self._joint[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.leader_module.member_output(x, self.index)

    def forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        return self.leader_module.inner.forward_unfused(x)[..., self.offset: self.offset + self.out_features]

    def dense_weight(self) -> torch.Tensor:
        return self.leader_module.member_dense_weight(self.index)

    @property
    def bias(self):
        return self.leader_module.member_bias_tensor(self.index) if self._joint else None

    @property
    def num_weight_params(self) -> int:
        return 0

    @property
    def ratio(self) -> float:
        return self.leader_module.ratio if self._joint else 0.0

    def factor_config(self) -> dict:
        return dict(in_features=self.in_features, out_features=self.out_features, leader=self.leader,
                    index=self.index, offset=self.offset, bias=self.has_bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, leader={self.leader!r}, "
                f"index={self.index}, offset={self.offset}")


def link_joint(model: nn.Module) -> int:
    """Connect every :class:`JointMemberLinear` of ``model`` to its leader (the sibling it names);
    returns how many were linked. ``ValueError`` naming the member when the leader is missing or
    does not hold it."""
    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, JointMemberLinear):
            continue
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        leader = getattr(parent, mod.leader, None)
        if not isinstance(leader, JointLowRankLinear):
            raise ValueError(
                f"module {name!r}: its leader {parent_name + '.' if parent_name else ''}{mod.leader} is "
                f"{type(leader).__name__ if leader is not None else 'missing'}, expected a JointLowRankLinear"
            )
        try:
            mod.link(leader)
        except ValueError as e:
            raise ValueError(f"module {name!r}: {e}") from None
        n += 1
    return n


__all__ = ["JointLowRankLinear", "JointMemberLinear", "link_joint"]
