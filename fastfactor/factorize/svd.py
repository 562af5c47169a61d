"""Low-rank factorizations of a dense weight ``W (out, in) ≈ U·V``.

* :func:`rank_for_ratio`: ``r = floor(ratio·in·out/(in+out))``, at least 1 — the rank whose
  factors ``U (out, r)`` and ``V (r, in)`` keep the fraction ``ratio`` of ``W``'s parameters.
* :func:`svd_factors`: truncated SVD, ``U = U_r·√Σ_r``, ``V = √Σ_r·V_rᵀ`` (√Σ split into both).
* :func:`weighted_svd_factors`: SVD of ``diag(w)·W`` then un-weighting, the form shared by
  Fisher-weighted SVD (Hsu et al., ICLR 2022: ``w = √I`` with ``I`` the row importances) and other
  row-weighted schemes.

All computation is in float64 on the weight's device; factors come back in ``W``'s dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _validate as V


def rank_for_ratio(in_features: int, out_features: int, ratio: float) -> int:
    """The rank whose factors keep ``ratio`` of the ``in·out`` weight parameters (at least 1)."""
    ratio = V.check_ratio("ratio", ratio)
    return max(1, math.floor(ratio * in_features * out_features / (in_features + out_features)))


def resolve_rank(in_features: int, out_features: int, rank: Optional[int], ratio: Optional[float]) -> int:
    """``rank`` or the rank for ``ratio`` (exactly one must be given); checked against min(in, out)."""
    from .rank import resolve

    return resolve(rank, ratio, lambda q: rank_for_ratio(in_features, out_features, q),
                   min(in_features, out_features))


def _truncated_svd(w64: torch.Tensor, rank: int):
    U, S, Vh = torch.linalg.svd(w64, full_matrices=False)
    s = S[:rank].sqrt()
    return U[:, :rank] * s, s[:, None] * Vh[:rank]


def svd_factors(weight: torch.Tensor, rank: int, name: str = "weight"):
    """``(U (out, r), V (r, in))`` minimizing ``‖W − U·V‖_F`` (Eckart–Young), √Σ split evenly."""
    V.check_tensor(name, weight, ndim=2)
    V.check_finite(name, weight)
    V.check_positive_int("rank", rank, minimum=1, maximum=min(weight.shape))
    u, v = _truncated_svd(weight.detach().to(torch.float64), rank)
    return u.to(weight.dtype).contiguous(), v.to(weight.dtype).contiguous()


def weighted_svd_factors(
    weight: torch.Tensor, rank: int, row_weights: torch.Tensor, name: str = "weight"
):
    """Row-weighted truncated SVD: minimize ``‖diag(w)·(W − U·V)‖_F``.

    ``row_weights`` (out,) are non-negative; rows with zero weight get a tiny floor so that the
    un-weighting stays finite. Fisher-weighted SVD passes ``w = √I``.
    """
    V.check_tensor(name, weight, ndim=2)
    V.check_finite(name, weight)
    V.check_tensor("row_weights", row_weights, ndim=1)
    V.check_dim("row_weights", row_weights, 0, weight.shape[0], "out_features")
    V.check_finite("row_weights", row_weights)
    V.check_positive_int("rank", rank, minimum=1, maximum=min(weight.shape))
    w = row_weights.detach().to(torch.float64, copy=True).clamp_min(0)
    floor = max(float(w.max()) * 1e-6, 1e-12)
    w = w.clamp_min(floor)
    u, v = _truncated_svd(w[:, None] * weight.detach().to(torch.float64), rank)
    u = u / w[:, None]
    return u.to(weight.dtype).contiguous(), v.to(weight.dtype).contiguous()
