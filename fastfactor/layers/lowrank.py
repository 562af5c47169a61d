"""``LowRankLinear``: ``y = (x·Vᵀ)·Uᵀ + b`` with ``U (out, r)``, ``V (r, in)``."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import _validate as V
from ..factorize.svd import resolve_rank, svd_factors
from ..ops.lowrank import lowrank_linear
from .base import FactorizedLinear, linear_weight_and_bias


class LowRankLinear(FactorizedLinear):
    """A rank-``r`` stand-in for ``nn.Linear(in_features, out_features)``.

    Parameters: ``u (out, r)``, ``v (r, in)``, ``bias (out,)``; ``r·(in + out)`` weight parameters,
    so ``ratio = r·(in + out)/(in·out)``. Forward runs :func:`fastfactor.lowrank_linear`.
    """

    method = "lowrank"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        V.check_positive_int("in_features", in_features)
        V.check_positive_int("out_features", out_features)
        V.check_positive_int("rank", rank, minimum=1, maximum=min(in_features, out_features))
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = dict(device=device, dtype=dtype)
        self.u = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.v = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # U·V starts with the variance of nn.Linear's default init: Var(W_ij) = r·Var(u)·Var(v)
        bound_v = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.v, -bound_v, bound_v)
        nn.init.uniform_(self.u, -1.0 / math.sqrt(self.rank), 1.0 / math.sqrt(self.rank))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound_v, bound_v)

    @classmethod
    def from_linear(
        cls, linear: nn.Module, rank: Optional[int] = None, ratio: Optional[float] = None
    ) -> "LowRankLinear":
        """Truncated-SVD factors of ``linear.weight``; give ``rank`` or ``ratio`` (fraction of
        the weight parameters kept, ``r = floor(ratio·in·out/(in+out))``, at least 1)."""
        w, b = linear_weight_and_bias(linear)
        out_f, in_f = w.shape
        r = resolve_rank(in_f, out_f, rank, ratio)
        u, v = svd_factors(w, r)
        return cls.from_factors(u, v, b)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None):
        """Wrap given factors ``u (out, r)``, ``v (r, in)`` (copied) and optional bias."""
        V.check_tensor("u", u, ndim=2)
        V.check_tensor("v", v, ndim=2)
        V.check_dim("u", u, 1, v.shape[0], "rank = v.shape[0]")
        mod = cls(v.shape[1], u.shape[0], v.shape[0], bias=bias is not None, dtype=u.dtype, device=u.device)
        with torch.no_grad():
            mod.u.copy_(u)
            mod.v.copy_(v)
            if bias is not None:
                mod.bias.copy_(bias)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_linear(x, self.u, self.v, self.bias)

    def forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """Two plain matmuls, the intermediate through memory (benchmark baseline)."""
        return torch.nn.functional.linear(torch.nn.functional.linear(x, self.v), self.u, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.u @ self.v

    def factor_config(self) -> dict:
        return dict(
            in_features=self.in_features, out_features=self.out_features,
            rank=self.rank, bias=self.bias is not None,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"ratio={self.ratio:.3f}, bias={self.bias is not None}"
        )
