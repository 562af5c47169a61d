"""``BottleneckLinear``: the nonlinear autoencoder bottleneck ``y = σ(x·Vᵀ + c)·Uᵀ + b``.

Stands in for ``nn.Linear(in, out)`` after the autoencoder method's nonlinear form
(:mod:`fastfactor.factorize.autoencoder`): ``V = E·W (r, in)`` is the encoder ``E (r, out)``
folded into the dense weight, ``U = D (out, r)`` the decoder, ``c (r,)`` the encoder's bias
(``E·b`` included), ``b (out,)`` the decoder's. Forward runs
:func:`fastfactor.ops.lowrank_act.lowrank_act_linear` (the fused low-rank chain with the
activation applied on chip).

Parameters counted as the low-rank factors: ``U`` and ``V``, ``r·(in + out)`` (``c`` and ``b``
are biases), so ``ratio = r·(in + out)/(in·out)`` as for :class:`LowRankLinear`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import _validate as V
from ..kernels.lowrank_act import ACTIVATIONS, act_code, act_fwd
from ..ops.lowrank_act import lowrank_act_linear
from .base import FactorizedLinear


class BottleneckLinear(FactorizedLinear):
    """``y = σ(x·Vᵀ + c)·Uᵀ + b`` with ``u (out, r)``, ``v (r, in)``, ``cb (r,)``, ``bias (out,)``
    and ``act`` one of ``relu``, ``gelu`` (tanh approximation), ``silu``, ``tanh``, ``identity``."""

    method = "autoencoder"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        act: str = "relu",
        bias: bool = True,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        V.check_positive_int("in_features", in_features)
        V.check_positive_int("out_features", out_features)
        V.check_positive_int("rank", rank, minimum=1, maximum=min(in_features, out_features))
        act_code(act)
        self.in_features, self.out_features, self.rank, self.act = in_features, out_features, rank, act
        kw = dict(device=device, dtype=dtype)
        self.u = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.v = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.cb = nn.Parameter(torch.empty(rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound_v = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.v, -bound_v, bound_v)
        nn.init.uniform_(self.u, -1.0 / math.sqrt(self.rank), 1.0 / math.sqrt(self.rank))
        nn.init.zeros_(self.cb)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound_v, bound_v)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, cb: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor] = None, act: str = "relu") -> "BottleneckLinear":
        """Wrap given ``u (out, r)``, ``v (r, in)``, ``cb (r,)`` (None: zeros), ``bias (out,)`` (copied)."""
        V.check_tensor("u", u, ndim=2)
        V.check_tensor("v", v, ndim=2)
        V.check_dim("u", u, 1, v.shape[0], "rank = v.shape[0]")
        if cb is not None:
            V.check_tensor("cb", cb, ndim=1)
            V.check_dim("cb", cb, 0, v.shape[0], "rank = v.shape[0]")
        mod = cls(v.shape[1], u.shape[0], v.shape[0], act=act, bias=bias is not None, dtype=u.dtype, device=u.device)
        with torch.no_grad():
            mod.u.copy_(u)
            mod.v.copy_(v)
            mod.cb.copy_(cb) if cb is not None else mod.cb.zero_()
            if bias is not None:
                mod.bias.copy_(bias)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: Optional[int] = None, ratio: Optional[float] = None,
                    act: str = "relu") -> "BottleneckLinear":
        """A data-free start: the truncated-SVD factors ``W ≈ U·V`` with ``c = 0`` (the SVD itself
        for ``act="identity"``). Without data the shift that keeps ``σ`` in its near-linear range is
        unknown, so for a nonlinear ``act`` this is only a shape-correct start: fit with
        :func:`fastfactor.factorize.autoencoder.fit_bottleneck` (the ``autoencoder`` method)."""
        from .lowrank import LowRankLinear

        lr = LowRankLinear.from_linear(linear, rank=rank, ratio=ratio)
        return cls.from_factors(lr.u.detach(), lr.v.detach(), None,
                                None if lr.bias is None else lr.bias.detach(), act=act)

    @property
    def num_weight_params(self) -> int:
        """``U`` and ``V``: ``r·(in + out)`` (the biases ``c`` and ``b`` are not weights)."""
        return self.u.numel() + self.v.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_act_linear(x, self.u, self.v, self.bias, self.cb, act=self.act)

    def forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """Two plain matmuls and the activation between them, in the input dtype."""
        h = torch.nn.functional.linear(x, self.v, self.cb)
        return torch.nn.functional.linear(act_fwd(h, self.act), self.u, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """``U·V`` for ``act="identity"`` (the bias then also carries ``U·c``: see :meth:`to_linear`);
        a nonlinear bottleneck has no dense weight (``TypeError``)."""
        if self.act != "identity":
            raise TypeError(f"act: a {self.act!r} bottleneck is not a linear map and has no dense weight "
                            "(expected act='identity')")
        return self.u @ self.v

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        lin = super().to_linear()
        extra = self.u @ self.cb
        if lin.bias is None:
            lin = nn.Linear(self.in_features, self.out_features, bias=True, device=lin.weight.device,
                            dtype=lin.weight.dtype)
            lin.weight.copy_(self.dense_weight())
            lin.bias.copy_(extra)
        else:
            lin.bias.add_(extra)
        return lin

    def factor_config(self) -> dict:
        return dict(in_features=self.in_features, out_features=self.out_features, rank=self.rank,
                    act=self.act, bias=self.bias is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"act={self.act}, ratio={self.ratio:.3f}, bias={self.bias is not None}")


__all__ = ["BottleneckLinear", "ACTIVATIONS"]
