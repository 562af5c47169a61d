"""Projection of a dense weight onto the Monarch and block-wise low-rank sets.

Factor layout as in :mod:`fastfactor.kernels.monarch`: ``w1 (b, b·r, kb)``, ``w2 (b, nb, b·r)``
with ``kb = ceil(in / b)``, ``nb = ceil(out / b)``, and

    W[o(l, s), j·kb + c] = Σ_t w2[l, s, j·r + t] · w1[j, l·r + t, c]

where ``o(l, s) = s·b + l`` (Monarch: strided rows) or ``l·nb + s`` (block-wise low-rank:
contiguous rows). Each sub-block ``(l, j)`` of ``W`` (``nb × kb``, zero-padded where ``b`` does not
divide the sizes) is a rank-``r`` product of parameters no other sub-block uses, so the squared
Frobenius error splits into one term per sub-block and the optimal projection is the rank-``r``
truncated SVD of every sub-block (Eckart–Young), with ``√Σ`` split into both factors. This is the
projection of Dao et al. (ICML 2022, Monarch), generalised to rectangular, non-divisible and
rank-``r`` blocks. The padded rows and columns of a sub-block are zero, so its singular vectors
are zero there and the padding of the factors comes out zero.

Ratio → rank
    The factors store ``b·r·(Kp + Np)`` weights (``Kp = b·kb``, ``Np = b·nb``), so keeping the
    fraction ``ratio`` of the dense ``in·out`` weights gives
    ``r = floor(ratio·in·out / (b·(Kp + Np)))``, clamped to ``[1, min(kb, nb)]``
    (:func:`monarch_rank_for_ratio`; the same for both families).

All computation is in float64 on the weight's device; factors come back in ``W``'s dtype.
"""

from __future__ import annotations

import math

import torch

from .. import _validate as V
from ..kernels.monarch import cdiv


def monarch_rank_for_ratio(in_features: int, out_features: int, nblocks: int, ratio: float) -> int:
    """``r = floor(ratio·in·out / (nblocks·(Kp + Np)))`` clamped to ``[1, min(kb, nb)]``, where
    ``kb = ceil(in/nblocks)``, ``nb = ceil(out/nblocks)``, ``Kp = nblocks·kb``, ``Np = nblocks·nb``:
    the rank whose factors keep (at most, unless clamped up to 1) the fraction ``ratio`` of the
    ``in·out`` dense weights."""
    V.check_positive_int("in_features", in_features)
    V.check_positive_int("out_features", out_features)
    V.check_positive_int("nblocks", nblocks)
    ratio = V.check_ratio("ratio", ratio)
    kb, nb = cdiv(in_features, nblocks), cdiv(out_features, nblocks)
    per_rank = nblocks * nblocks * (kb + nb)
    r = math.floor(ratio * in_features * out_features / per_rank)
    return max(1, min(r, kb, nb))


def max_rank(in_features: int, out_features: int, nblocks: int) -> int:
    """The largest useful rank, ``min(ceil(in/nblocks), ceil(out/nblocks))`` (full-rank sub-blocks)."""
    return min(cdiv(in_features, nblocks), cdiv(out_features, nblocks))


def _check(W, nblocks, rank, name):
    V.check_tensor(name, W, ndim=2)
    V.check_finite(name, W)
    out_f, in_f = W.shape
    if out_f == 0 or in_f == 0:
        raise ValueError(f"{name}: expected a non-empty (out, in) matrix, got shape {tuple(W.shape)}")
    V.check_positive_int("nblocks", nblocks, minimum=1, maximum=min(out_f, in_f))
    V.check_positive_int("rank", rank, minimum=1, maximum=max_rank(in_f, out_f, nblocks))


def _blocks(W: torch.Tensor, nblocks: int, strided: bool) -> torch.Tensor:
    """The sub-blocks of ``W`` (zero-padded to ``(b·nb, b·kb)``) as ``(l, j, nb, kb)`` in float64."""
    out_f, in_f = W.shape
    b = nblocks
    kb, nb = cdiv(in_f, b), cdiv(out_f, b)
    Wp = W.detach().to(torch.float64).new_zeros((b * nb, b * kb))
    Wp[:out_f, :in_f] = W.detach().to(torch.float64)
    if strided:
        w4 = Wp.reshape(nb, b, b, kb).permute(1, 0, 2, 3)   # row s·b + l -> (l, s, j, c)
    else:
        w4 = Wp.reshape(b, nb, b, kb)                        # row l·nb + s -> (l, s, j, c)
    return w4.permute(0, 2, 1, 3)                            # (l, j, s, c)


def _project(W: torch.Tensor, nblocks: int, rank: int, strided: bool):
    b, r = nblocks, rank
    blocks = _blocks(W, b, strided)                          # (l, j, nb, kb)
    nb, kb = blocks.shape[2], blocks.shape[3]
    U, S, Vh = torch.linalg.svd(blocks, full_matrices=False)
    s = S[..., :r].sqrt()
    A = U[..., :r] * s[..., None, :]                         # (l, j, nb, r)
    B = s[..., :, None] * Vh[..., :r, :]                     # (l, j, r, kb)
    w2 = A.permute(0, 2, 1, 3).reshape(b, nb, b * r)         # w2[l, s, j·r + t]
    w1 = B.permute(1, 0, 2, 3).reshape(b, b * r, kb)         # w1[j, l·r + t, c]
    return w1.to(W.dtype).contiguous(), w2.to(W.dtype).contiguous()


def monarch_project(W: torch.Tensor, nblocks: int, rank: int = 1, name: str = "W"):
    """Optimal Monarch factors ``(w1, w2)`` of a dense ``W (out, in)`` in the Frobenius norm.

    ``w1 (b, b·r, kb)``, ``w2 (b, nb, b·r)``: the rank-``rank`` truncated SVD of every strided
    sub-block ``W[s·b + l, j·kb + c]`` (rows ``l, l+b, …``; columns ``j·kb … (j+1)·kb − 1``).
    ``name`` (e.g. the module's ``encoder.layer.3.attention.self.query.weight``) names ``W`` in
    errors, such as a NaN/Inf entry.
    """
    _check(W, nblocks, rank, name)
    return _project(W, nblocks, rank, strided=True)


def block_lowrank(W: torch.Tensor, nblocks: int, rank: int, name: str = "W"):
    """Optimal block-wise low-rank factors ``(w1, w2)`` of a dense ``W (out, in)``: the
    rank-``rank`` truncated SVD of every contiguous block ``W[l·nb + s, j·kb + c]``. Same shapes
    as :func:`monarch_project`; ``name`` as there."""
    _check(W, nblocks, rank, name)
    return _project(W, nblocks, rank, strided=False)


def projection_error(W: torch.Tensor, nblocks: int, rank: int, strided: bool = True) -> float:
    """``‖W − proj(W)‖_F`` computed from the discarded singular values (no reconstruction)."""
    _check(W, nblocks, rank, "W")
    S = torch.linalg.svdvals(_blocks(W, nblocks, strided))
    return float(S[..., rank:].pow(2).sum().sqrt())


__all__ = ["monarch_project", "block_lowrank", "monarch_rank_for_ratio", "max_rank", "projection_error"]
