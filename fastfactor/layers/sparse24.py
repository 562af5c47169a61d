"""2:4 sparse modules: ``Sparse24Linear`` (``W`` 2:4) and ``DenseSparseLinear`` (``W = D·S``, ``S`` 2:4).

Two modes
---------
* **fixed mask** (default): the sparse matrix is stored packed — kept values as an
  ``nn.Parameter`` ``(rows, in/2)`` and the ``uint8`` metadata ``(rows, ceil(in/8))`` as a buffer —
  and the forward runs the 2:4 kernels (:func:`fastfactor.ops.sparse24.sparse24_linear`,
  :func:`fastfactor.ops.sparse24.dense_sparse_linear`). Training updates the kept values only.
* **mask training** (``train_mask(True)``, the straight-through factorizer of DSFormer): the
  sparse matrix is held dense, its 2:4 mask is recomputed from the current magnitudes in every
  forward, and the gradient passes straight through to every entry
  (:func:`fastfactor.ops.sparse24.ste_24`). ``freeze()`` (or ``train_mask(False)``) packs it
  and returns to the fixed-mask fast path.

Switching modes replaces parameters (packed ↔ dense), so build the optimizer after switching.
``factor_config()`` records the mode (``mask_training``), so ``cls(**m.factor_config())`` +
``load_state_dict`` rebuilds a module in either mode exactly.

Parameter counts (``num_weight_params``; ``ratio = num_weight_params / (in·out)``)
---------------------------------------------------------------------------------
What the module really stores, with the ``uint8`` metadata counted at 16 bits per parameter
(``ceil(bytes / 2)``), see :mod:`fastfactor.factorize.sparse24`:

* ``Sparse24Linear``: ``out·in/2 + ceil(out·ceil(in/8)/2)`` → ratio 0.5625 for ``in % 8 == 0``;
* ``DenseSparseLinear``: ``out·r + r·in/2 + ceil(r·ceil(in/8)/2)``.

In mask-training mode the dense latent matrix is what is stored (``out·in``, resp.
``out·r + r·in``); the ratio of the frozen module is the figure above.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import _validate as V
from ..factorize.sparse24 import (
    dense_sparse_factors,
    max_dense_sparse_rank,
    resolve_dense_sparse_rank,
)
from ..kernels._config import acc_dtype
from ..kernels.sparse24 import mma_codes, mma_codes3, mma_codes3_ok, torch24_meta, torch24_meta_padded, transpose_plan
from ..formats.sparse24 import Sparse24Weight, mask_24, meta_cols, pack_24, prune_24, unpack_24
from ..ops.lowrank import lowrank_linear
from ..ops.sparse24 import dense_sparse_linear_packed, sparse24_linear_packed, ste_24
from .base import FactorizedLinear, linear_weight_and_bias


def _check_in(in_features: int) -> None:
    if in_features % 4:
        raise ValueError(
            f"in_features: expected a multiple of 4 (2:4 groups of 4 consecutive inputs; no "
            f"implicit padding), got {in_features}"
        )


def _acc_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    acc = acc_dtype(a.dtype)
    return (a.to(acc) @ b.to(acc)).to(a.dtype)


class _Sparse24Mixin:
    """Mode switching shared by both modules: the sparse matrix is ``<prefix>values`` +
    ``<prefix>meta`` (fixed) or ``<prefix>dense`` (mask training)."""

    _prefix: str
    mask_training: bool

    def _sparse_rows(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _set_packed(self, w: Sparse24Weight) -> None:
        p = self._prefix
        for name in (p + "dense",):
            if name in self._parameters:
                del self._parameters[name]
        self.register_parameter(p + "values", nn.Parameter(w.values.detach().clone()))
        self.register_buffer(p + "meta", w.meta.detach().clone())
        rows, k = w.shape
        if (rows % 16 == 0 and k % 64 == 0 and w.meta.device.type != "meta"
                and w.values.dtype in (torch.float16, torch.bfloat16)):
            # the codes in the sparse tensor-core decode's fragment order (``mma_codes``; as 3-bit
            # planes where it may read those, ``mma_codes3``, the other width made on first use by
            # a shape that takes it), once per mask (16-bit weights: the only ones it takes; made on
            # first use after a dtype change)
            if mma_codes3_ok(k):
                mma_codes3(getattr(self, p + "meta"), rows, k)
            else:
                mma_codes(getattr(self, p + "meta"), rows, k)
        if rows % 32 == 0 and k % 64 == 0 and w.meta.device.type != "meta":
            # PyTorch's 2:4 layout of the codes, converted once per mask (cached on the buffer),
            # and whether Wᵀ is 2:4 too (dx on sparse tensor cores; ``transpose_plan``)
            torch24_meta(getattr(self, p + "meta"), rows, k)
            if rows % 64 == 0:
                transpose_plan(getattr(self, p + "meta"), rows, k)
        elif p == "s_" and k % 64 == 0 and w.meta.device.type != "meta":
            # dense-sparse S of a rank that is not a multiple of 32: its codes zero-padded to one
            # for PyTorch's 2:4 GEMM (``torch24_meta_padded``), converted once per mask
            torch24_meta_padded(getattr(self, p + "meta"), rows, k)
        self.mask_training = False

    def _set_dense(self, dense: torch.Tensor) -> None:
        p = self._prefix
        if p + "values" in self._parameters:
            del self._parameters[p + "values"]
        if p + "meta" in self._buffers:
            del self._buffers[p + "meta"]
        self.register_parameter(p + "dense", nn.Parameter(dense.detach().clone()))
        self.mask_training = True

    def sparse_weight(self) -> Sparse24Weight:
        """The sparse matrix packed (in mask-training mode: the current mask, packed)."""
        p = self._prefix
        if self.mask_training:
            dense = getattr(self, p + "dense")
            return pack_24(dense.detach(), mask_24(dense.detach()))
        return Sparse24Weight(getattr(self, p + "values"), getattr(self, p + "meta"),
                              (self._sparse_rows(), self.in_features))

    def sparse_dense(self) -> torch.Tensor:
        """The sparse matrix as a dense tensor (zeros at pruned positions); differentiable in
        fixed mode w.r.t. the kept values, and straight-through in mask-training mode."""
        p = self._prefix
        if self.mask_training:
            return ste_24(getattr(self, p + "dense"))
        return unpack_24(getattr(self, p + "values"), getattr(self, p + "meta"), self.in_features)

    @torch.no_grad()
    def train_mask(self, mode: bool = True):
        """``True``: learn the 2:4 mask with the straight-through estimator (the sparse matrix is
        held dense, seeded with its current packed entries). ``False``: :meth:`freeze`."""
        if not isinstance(mode, bool):
            raise TypeError(f"mode: expected a bool, got {type(mode).__name__}")
        if not mode:
            return self.freeze()
        if not self.mask_training:
            self._set_dense(self.sparse_weight().to_dense())
        return self

    @torch.no_grad()
    def freeze(self):
        """Fix the mask at the current 2:4 projection of the dense matrix and pack it (no-op in
        fixed-mask mode). The forward output is unchanged by freezing."""
        if self.mask_training:
            dense = getattr(self, self._prefix + "dense").detach()
            self._set_packed(pack_24(dense, mask_24(dense)))
        return self

    def _sparse_params(self) -> int:
        if self.mask_training:
            return self._sparse_rows() * self.in_features
        return self._sparse_rows() * (self.in_features // 2) + math.ceil(
            self._sparse_rows() * meta_cols(self.in_features) / 2
        )


class Sparse24Linear(_Sparse24Mixin, FactorizedLinear):
    """A 2:4 sparse stand-in for ``nn.Linear(in_features, out_features)``: ``y = x·Wᵀ + b``.

    Fixed mode stores ``values (out, in/2)`` (Parameter) and ``meta (out, ceil(in/8))`` (uint8
    buffer); mask-training mode stores ``dense (out, in)``. ``in_features % 4 == 0``.
    ``num_weight_params = out·in/2 + ceil(out·ceil(in/8)/2)`` (metadata at 16 bits/parameter).
    """

    method = "sparse24"
    _prefix = ""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: Optional[torch.dtype] = None,
        device=None,
        mask_training: bool = False,
    ):
        super().__init__()
        V.check_positive_int("in_features", in_features)
        V.check_positive_int("out_features", out_features)
        _check_in(in_features)
        self.in_features, self.out_features = in_features, out_features
        kw = dict(device=device, dtype=dtype)
        bound = 1.0 / math.sqrt(in_features)
        w = torch.empty(out_features, in_features, **kw).uniform_(-bound, bound)
        self.mask_training = False
        self._set_packed(pack_24(prune_24(w)))
        self.bias = nn.Parameter(torch.empty(out_features, **kw).uniform_(-bound, bound)) if bias else None
        if mask_training:
            self.train_mask(True)

    def _sparse_rows(self) -> int:
        return self.out_features

    @classmethod
    def from_linear(
        cls, linear: nn.Module, scores: Optional[torch.Tensor] = None, *,
        rank: Optional[int] = None, ratio: Optional[float] = None,
    ) -> "Sparse24Linear":
        """2:4 magnitude pruning of ``linear.weight`` (or by ``scores (out, in)``), packed.

        The one ``from_linear`` contract (:mod:`fastfactor.factorize.rank`) with a fixed pattern:
        the 2:4 pattern fixes the kept fraction (half the weights plus metadata, 0.5625), so
        ``ratio`` is accepted and ignored and ``rank`` is refused."""
        if rank is not None:
            raise ValueError(f"rank: 2:4 sparsity has no rank (its pattern fixes the kept fraction), got rank={rank!r}")
        w, b = linear_weight_and_bias(linear)
        out_f, in_f = w.shape
        if in_f % 4:
            raise ValueError(
                f"linear: expected in_features a multiple of 4 for 2:4 sparsity, got weight shape {tuple(w.shape)}"
            )
        return cls.from_sparse(pack_24(prune_24(w.detach(), scores)), b)

    @classmethod
    def from_sparse(cls, w: Sparse24Weight, bias: Optional[torch.Tensor] = None) -> "Sparse24Linear":
        """Wrap a packed weight (copied) and optional bias."""
        if not isinstance(w, Sparse24Weight):
            raise TypeError(f"w: expected a Sparse24Weight, got {type(w).__name__}")
        out_f, in_f = w.shape
        mod = cls(in_f, out_f, bias=bias is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            mod._set_packed(w)
            if bias is not None:
                mod.bias.copy_(bias)
        return mod

    @property
    def num_weight_params(self) -> int:
        return self._sparse_params()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask_training:
            return torch.nn.functional.linear(x, ste_24(self.dense), self.bias)
        return sparse24_linear_packed(x, self.values, self.meta, self.bias)

    def forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """Dense matmul of the expanded weight in the input dtype (benchmark baseline)."""
        return torch.nn.functional.linear(x, self.sparse_dense().to(x.dtype), self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.sparse_dense()

    def factor_config(self) -> dict:
        return dict(
            in_features=self.in_features, out_features=self.out_features,
            bias=self.bias is not None, mask_training=self.mask_training,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern=2:4, "
            f"ratio={self.ratio:.4f}, bias={self.bias is not None}, mask_training={self.mask_training}"
        )


class DenseSparseLinear(_Sparse24Mixin, FactorizedLinear):
    """Dense-sparse (DSFormer) stand-in for ``nn.Linear``: ``y = (x·Sᵀ)·Dᵀ + b`` with ``D (out, r)``
    dense and ``S (r, in)`` 2:4 sparse.

    Fixed mode stores ``d``, ``s_values (r, in/2)`` (Parameters) and ``s_meta (r, ceil(in/8))``
    (uint8 buffer); mask-training mode stores ``d`` and ``s_dense (r, in)``.
    ``num_weight_params = out·r + r·in/2 + ceil(r·ceil(in/8)/2)``; ``1 <= rank <= max(in, out)``.
    """

    method = "dense_sparse"
    _prefix = "s_"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: Optional[torch.dtype] = None,
        device=None,
        mask_training: bool = False,
    ):
        super().__init__()
        V.check_positive_int("in_features", in_features)
        V.check_positive_int("out_features", out_features)
        _check_in(in_features)
        V.check_positive_int("rank", rank, minimum=1, maximum=max_dense_sparse_rank(in_features, out_features))
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = dict(device=device, dtype=dtype)
        # D·S starts with the variance of nn.Linear's default init: half of S survives pruning,
        # Var(W_ij) = r · Var(d) · Var(s) / 2
        bound = 1.0 / math.sqrt(in_features)
        self.d = nn.Parameter(torch.empty(out_features, rank, **kw).uniform_(-1.0 / math.sqrt(rank), 1.0 / math.sqrt(rank)))
        s = torch.empty(rank, in_features, **kw).uniform_(-bound * math.sqrt(2), bound * math.sqrt(2))
        self.mask_training = False
        self._set_packed(pack_24(prune_24(s)))
        self.bias = nn.Parameter(torch.empty(out_features, **kw).uniform_(-bound, bound)) if bias else None
        if mask_training:
            self.train_mask(True)

    def _sparse_rows(self) -> int:
        return self.rank

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        rank: Optional[int] = None,
        ratio: Optional[float] = None,
        init: str = "svd_als",
        als_iters: int = 5,
    ) -> "DenseSparseLinear":
        """Factor ``linear.weight ≈ D·S`` (see :func:`fastfactor.factorize.sparse24.dense_sparse_factors`):
        give ``rank`` or ``ratio`` (``fastfactor.factorize.sparse24.dense_sparse_rank_for_ratio``).
        ``init``: ``"svd_als"`` (default) or ``"svd"``. The module comes back in fixed-mask mode;
        call ``train_mask(True)`` to fine-tune the mask on the task loss (STF)."""
        w, b = linear_weight_and_bias(linear)
        out_f, in_f = w.shape
        if in_f % 4:
            raise ValueError(
                f"linear: expected in_features a multiple of 4 for a 2:4 factor, got weight shape {tuple(w.shape)}"
            )
        r = resolve_dense_sparse_rank(in_f, out_f, rank, ratio)
        d, s, mask = dense_sparse_factors(w, r, init=init, als_iters=als_iters, return_mask=True)
        return cls.from_factors(d, pack_24(s, mask), b)

    @classmethod
    def from_factors(cls, d: torch.Tensor, s: Sparse24Weight, bias: Optional[torch.Tensor] = None):
        """Wrap given factors ``d (out, r)`` and packed ``s (r, in)`` (copied) and optional bias."""
        V.check_tensor("d", d, ndim=2)
        if not isinstance(s, Sparse24Weight):
            raise TypeError(f"s: expected a Sparse24Weight, got {type(s).__name__}")
        if d.shape[1] != s.shape[0]:
            raise ValueError(f"d: expected {s.shape[0]} columns (rank = s.shape[0]), got shape {tuple(d.shape)}")
        mod = cls(s.shape[1], d.shape[0], d.shape[1], bias=bias is not None, dtype=d.dtype, device=d.device)
        with torch.no_grad():
            mod.d.copy_(d)
            mod._set_packed(s.to(d.dtype))
            if bias is not None:
                mod.bias.copy_(bias)
        return mod

    @property
    def num_weight_params(self) -> int:
        return self.d.numel() + self._sparse_params()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask_training:
            return lowrank_linear(x, self.d, ste_24(self.s_dense), self.bias)
        return dense_sparse_linear_packed(x, self.d, self.s_values, self.s_meta, self.bias)

    def forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """Two plain matmuls in the input dtype, ``S`` expanded to dense (benchmark baseline)."""
        F = torch.nn.functional
        return F.linear(F.linear(x, self.sparse_dense().to(x.dtype)), self.d.to(x.dtype), self.bias)

    def dense_weight(self) -> torch.Tensor:
        return _acc_matmul(self.d, self.sparse_dense())

    def factor_config(self) -> dict:
        return dict(
            in_features=self.in_features, out_features=self.out_features, rank=self.rank,
            bias=self.bias is not None, mask_training=self.mask_training,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"pattern=2:4, ratio={self.ratio:.4f}, bias={self.bias is not None}, "
            f"mask_training={self.mask_training}"
        )


__all__ = ["Sparse24Linear", "DenseSparseLinear"]
