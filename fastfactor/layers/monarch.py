"""``MonarchLinear`` and ``BlockLowRankLinear``: block-diagonal stand-ins for ``nn.Linear``.

Parameters (layout in :mod:`fastfactor.kernels.monarch`): ``w1 (b, b·r, kb)``, ``w2 (b, nb, b·r)``,
``bias (out,)`` with ``kb = ceil(in/b)``, ``nb = ceil(out/b)``; ``b·r·(b·kb + b·nb)`` weight
parameters (the padding of non-divisible sizes is stored, and counted). ``from_linear`` projects a
dense weight optimally (truncated SVD of every sub-block); ``ratio`` chooses the rank by
``r = floor(ratio·in·out / (b²·(kb + nb)))`` clamped to ``[1, min(kb, nb)]``.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar, Optional

import torch
from torch import nn

from .. import _validate as V
from ..factorize.monarch import block_lowrank, max_rank, monarch_project, monarch_rank_for_ratio
from ..factorize.rank import check_rank_or_ratio
from ..kernels.monarch import dense_weight_ref, factor_shapes, monarch_bmm
from ..ops.monarch import block_lowrank_linear, monarch_linear
from .base import FactorizedLinear, linear_weight_and_bias


#: ``from_linear(ratio=)`` warns when the kept fraction falls this far (relative) below the ratio
SHORTFALL_WARN = 0.05


def _warn_if_short(cls_name, in_f, out_f, nblocks, rank, ratio) -> None:
    """The rank is an integer, so a block-diagonal layer can keep noticeably less than ``ratio``
    (e.g. 0.435 of 0.5 on small or oddly shaped layers): say so, with the next rank's fraction."""

    kb, nb = -(-in_f // nblocks), -(-out_f // nblocks)
    per_rank = nblocks * nblocks * (kb + nb)
    kept = rank * per_rank / (in_f * out_f)
    if kept < ratio * (1 - SHORTFALL_WARN):
        nxt = (rank + 1) * per_rank / (in_f * out_f) if rank < min(kb, nb) else None
        warnings.warn(
            f"{cls_name}.from_linear: ratio {ratio:g} asked for a ({out_f}, {in_f}) weight with {nblocks} blocks, "
            f"but rank {rank} keeps {kept:.3f} of the weights (ranks are integers"
            + (f"; rank {rank + 1} would keep {nxt:.3f}" if nxt is not None else "") + "); pass rank= to choose",
            UserWarning, stacklevel=3,
        )


class _BlockDiagonalLinear(FactorizedLinear):
    """Shared body of the two block-diagonal modules (they differ in the output permutation)."""

    _strided: ClassVar[bool] = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int,
        rank: int = 1,
        bias: bool = True,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        V.check_positive_int("in_features", in_features)
        V.check_positive_int("out_features", out_features)
        V.check_positive_int("nblocks", nblocks, minimum=1, maximum=min(in_features, out_features))
        V.check_positive_int("rank", rank, minimum=1, maximum=max_rank(in_features, out_features, nblocks))
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {type(bias).__name__} {bias!r}")
        self.in_features, self.out_features = in_features, out_features
        self.nblocks, self.rank = nblocks, rank
        s1, s2 = factor_shapes(in_features, out_features, nblocks, rank)
        kw = dict(device=device, dtype=dtype)
        self.w1 = nn.Parameter(torch.empty(s1, **kw))
        self.w2 = nn.Parameter(torch.empty(s2, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # W[o, i] = Σ_t w2·w1 over r terms; w1 ~ U(±1/√kb), w2 ~ U(±√(3/(b·r))) give
        # Var(W) = r·(1/(3·kb))·(1/(b·r)) = 1/(3·b·kb) ≈ 1/(3·in), nn.Linear's default variance.
        kb = self.w1.shape[2]
        nn.init.uniform_(self.w1, -1.0 / math.sqrt(kb), 1.0 / math.sqrt(kb))
        bound2 = math.sqrt(3.0 / (self.nblocks * self.rank))
        nn.init.uniform_(self.w2, -bound2, bound2)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def _project(cls, w: torch.Tensor, nblocks: int, rank: int):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        nblocks: int = 4,
        rank: Optional[int] = None,
        ratio: Optional[float] = None,
    ):
        """Optimal projection of ``linear.weight`` (truncated SVD of every sub-block).

        Give exactly one of ``rank`` and ``ratio`` (fraction of the dense weights kept,
        ``r = floor(ratio·in·out / (nblocks²·(kb + nb)))``, clamped to ``[1, min(kb, nb)]``;
        :func:`fastfactor.factorize.monarch.monarch_rank_for_ratio`), the contract of every
        layer (:mod:`fastfactor.factorize.rank`). Neither (``rank = 1``) is deprecated.
        """
        w, b = linear_weight_and_bias(linear)
        out_f, in_f = w.shape
        V.check_positive_int("nblocks", nblocks, minimum=1, maximum=min(in_f, out_f))
        if rank is None and ratio is None:
            warnings.warn(f"{cls.__name__}.from_linear without rank= or ratio= (rank 1) is deprecated; "
                          "pass rank=1", DeprecationWarning, stacklevel=2)
            rank = 1
        check_rank_or_ratio(rank, ratio)
        if ratio is not None:
            rank = monarch_rank_for_ratio(in_f, out_f, nblocks, ratio)
            _warn_if_short(cls.__name__, in_f, out_f, nblocks, rank, ratio)
        w1, w2 = cls._project(w, nblocks, rank)
        mod = cls(in_f, out_f, nblocks, rank, bias=b is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            mod.w1.copy_(w1)
            mod.w2.copy_(w2)
            if b is not None:
                mod.bias.copy_(b)
        return mod

    def dense_weight(self) -> torch.Tensor:
        return dense_weight_ref(self.w1, self.w2, self.in_features, self.out_features, self._strided)

    def forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """Two ``bmm`` with the permutes between them, in ``x``'s dtype (benchmark baseline)."""
        return monarch_bmm(x, self.w1, self.w2, self.bias, self.out_features, self._strided)

    def factor_config(self) -> dict:
        return dict(
            in_features=self.in_features, out_features=self.out_features,
            nblocks=self.nblocks, rank=self.rank, bias=self.bias is not None,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nblocks={self.nblocks}, rank={self.rank}, ratio={self.ratio:.3f}, "
            f"bias={self.bias is not None}"
        )


class MonarchLinear(_BlockDiagonalLinear):
    """Monarch ``y = P₂·L·P₁·R·x + b``: every strided sub-block ``W[s·b + l, j·kb + c]`` has rank
    ``r``. Forward runs :func:`fastfactor.ops.monarch.monarch_linear`."""

    method = "monarch"
    _strided = True

    @classmethod
    def _project(cls, w, nblocks, rank):
        return monarch_project(w, nblocks, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return monarch_linear(x, self.w1, self.w2, self.bias, out_features=self.out_features)


class BlockLowRankLinear(_BlockDiagonalLinear):
    """Block-wise low-rank: every contiguous block ``W[l·nb + s, j·kb + c]`` has rank ``r``.
    Forward runs :func:`fastfactor.ops.monarch.block_lowrank_linear`."""

    method = "block_lowrank"
    _strided = False

    @classmethod
    def _project(cls, w, nblocks, rank):
        return block_lowrank(w, nblocks, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_lowrank_linear(x, self.w1, self.w2, self.bias, out_features=self.out_features)


__all__ = ["MonarchLinear", "BlockLowRankLinear"]
