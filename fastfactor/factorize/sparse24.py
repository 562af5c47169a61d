"""2:4 pruning and the dense-sparse factorization ``W ≈ D·S`` (DSFormer, Chand et al. 2023).

* :func:`prune_24`, :func:`mask_24`, :func:`pack_24`: the 2:4 format (re-exported from
  :mod:`fastfactor.formats.sparse24`).
* :func:`dense_sparse_factors`: initialize ``D (out, r)`` and a 2:4 ``S (r, in)`` from a dense
  weight: truncated SVD (``D = U_r·√Σ_r``, ``S = √Σ_r·V_rᵀ``), 2:4 magnitude pruning of ``S``, then
  a few rounds of alternating least squares with the mask held fixed:

  - D-step: ``D = argmin ‖W − D·S‖_F = W·Sᵀ·(S·Sᵀ)⁻¹``;
  - S-step: for every input column ``j`` with kept rows ``K_j`` (the mask of column ``j`` of
    ``S``), ``S[K_j, j] = argmin ‖W[:, j] − D[:, K_j]·S[K_j, j]‖``, i.e. the normal equations
    ``(DᵀD)[K_j, K_j]·s = (DᵀW)[K_j, j]``, solved for all columns at once in batches.

  Each step is an exact least-squares solve (up to a tiny ridge), so ``‖W − D·S‖_F`` never
  increases. Finally every rank-1 pair ``(D[:, k], S[k, :])`` is rescaled to equal norms (the
  product is unchanged), which keeps later training of both factors well conditioned. The mask
  can then be learned on the task loss by the straight-through factorizer
  (``DenseSparseLinear.train_mask(True)``).

Parameter count and ratio (dense-sparse)
----------------------------------------
``D`` stores ``out·r`` values, ``S`` stores ``r·in/2`` kept values plus ``r·ceil(in/8)`` bytes of
metadata (4 bits per group of 4). Metadata is counted in parameter-equivalents of **16 bits**
(the fp16/bf16 storage the 2:4 format is made for), i.e. ``ceil(r·ceil(in/8)/2)`` parameters::

    params(r) = out·r + r·in/2 + ceil(r·ceil(in/8)/2)   (≈ r·(out + 9·in/16))
    ratio     = params(r) / (in·out)

and :func:`dense_sparse_rank_for_ratio` returns the largest ``r >= 1`` with
``params(r) <= ratio·in·out``. A plain 2:4 layer has ``out·in/2 + ceil(out·ceil(in/8)/2)``
parameters, a ratio of 0.5625 (9/16). In fp32 the same metadata is 1/32 rather than 1/16 of a
parameter per input, so the true byte ratio of an fp32 model is slightly lower than reported.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _validate as V
from .rank import resolve
from ..formats.sparse24 import Sparse24Weight, mask_24, meta_cols, pack_24, prune_24

INITS = ("svd_als", "svd")


def sparse24_num_params(in_features: int, out_features: int) -> int:
    """Parameters of a 2:4 ``(out, in)`` weight: kept values + metadata at 16 bits/parameter."""
    return out_features * (in_features // 2) + math.ceil(out_features * meta_cols(in_features) / 2)


def dense_sparse_num_params(in_features: int, out_features: int, rank: int) -> int:
    """``out·r + r·in/2 + ceil(r·ceil(in/8)/2)``: see the module docstring."""
    return out_features * rank + sparse24_num_params(in_features, rank)


def max_dense_sparse_rank(in_features: int, out_features: int) -> int:
    """Largest rank a ``DenseSparseLinear`` accepts: ``max(in, out)``."""
    return max(in_features, out_features)


def dense_sparse_rank_for_ratio(in_features: int, out_features: int, ratio: float) -> int:
    """The largest rank ``r >= 1`` whose dense-sparse factors keep at most ``ratio`` of the
    ``in·out`` dense parameters (formula in the module docstring); at least 1."""
    V.check_positive_int("in_features", in_features)
    V.check_positive_int("out_features", out_features)
    ratio = V.check_ratio("ratio", ratio)
    budget = ratio * in_features * out_features
    per_rank = out_features + in_features / 2 + meta_cols(in_features) / 2
    r = max(1, math.floor(budget / per_rank))
    while r > 1 and dense_sparse_num_params(in_features, out_features, r) > budget:
        r -= 1
    return min(r, max_dense_sparse_rank(in_features, out_features))


def resolve_dense_sparse_rank(
    in_features: int, out_features: int, rank: Optional[int], ratio: Optional[float]
) -> int:
    """``rank`` or the rank for ``ratio`` (exactly one of them), checked against ``max(in, out)``."""
    return resolve(rank, ratio, lambda q: dense_sparse_rank_for_ratio(in_features, out_features, q),
                   max_dense_sparse_rank(in_features, out_features))


def _ridge(g: torch.Tensor) -> float:
    return 1e-10 * float(g.diagonal().abs().mean()) + 1e-300


def _spd_solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve the symmetric positive definite systems ``a·x = rhs`` (batched) by Cholesky.

    Every system here is SPD by construction (a Gram matrix plus a ridge, the identity on pruned
    rows), so Cholesky is the right factorization and half the work of LU. It also avoids MKL's
    batched LU, which printed "Parameter 6 was incorrect on entry to DLASWP" and then hung with
    more than one thread (1536 x 384 layer, rank 200). A system Cholesky rejects (not numerically
    positive definite) falls back to least squares.
    """
    chol, info = torch.linalg.cholesky_ex(a)
    x = torch.cholesky_solve(rhs, chol)
    bad = info != 0
    if bool(bad.any()):
        if a.ndim == 2:
            return torch.linalg.lstsq(a, rhs).solution
        x[bad] = torch.linalg.lstsq(a[bad], rhs[bad]).solution
    return x


def _solve_d(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``argmin_D ‖W − D·S‖_F`` (ridge-regularized normal equations, float64)."""
    g = s @ s.t()
    g.diagonal().add_(_ridge(g))
    return _spd_solve(g, s @ w.t()).t()


def _solve_s(w: torch.Tensor, d: torch.Tensor, mask: torch.Tensor, max_elems: int = 1 << 24) -> torch.Tensor:
    """Kept entries of ``S`` minimizing ``‖W − D·(mask ⊙ S)‖_F`` for fixed ``D`` (float64).

    Column ``j`` solves ``(DᵀD)[K_j, K_j]·s = (DᵀW)[K_j, j]``; pruned rows get the identity, so
    every system is ``r x r`` and all columns of a chunk are solved in one batched call."""
    r, k = mask.shape
    g = d.t() @ d
    lam = _ridge(g)
    b = d.t() @ w                                                    # (r, in)
    out = torch.zeros((r, k), dtype=w.dtype, device=w.device)
    eye = torch.eye(r, dtype=w.dtype, device=w.device)
    chunk = max(1, max_elems // max(1, r * r))
    for c0 in range(0, k, chunk):
        m = mask[:, c0 : c0 + chunk].t().to(w.dtype)                  # (c, r)
        a = g[None] * (m[:, :, None] * m[:, None, :])                 # masked Gram matrices
        a = a + eye[None] * ((1.0 - m) + lam * m)[:, :, None]
        rhs = (b[:, c0 : c0 + chunk].t() * m)[:, :, None]
        sol = _spd_solve(a, rhs)[..., 0]                               # (c, r)
        out[:, c0 : c0 + chunk] = (sol * m).t()
    return out


def _balance(d: torch.Tensor, s: torch.Tensor):
    nd = d.norm(dim=0)
    ns = s.norm(dim=1)
    alpha = torch.where((nd > 0) & (ns > 0), (nd / ns.clamp_min(1e-300)).sqrt(), torch.ones_like(nd))
    return d / alpha[None, :], s * alpha[:, None]


def dense_sparse_factors(
    weight: torch.Tensor,
    rank: int,
    init: str = "svd_als",
    als_iters: int = 5,
    scores: Optional[torch.Tensor] = None,
    name: str = "weight",
    return_mask: bool = False,
):
    """``(D (out, r), S (r, in))`` with ``S`` 2:4 sparse (dense tensor, zeros at pruned positions),
    in ``weight``'s dtype, approximating ``weight ≈ D·S`` (algorithm in the module docstring).

    init: ``"svd_als"`` (SVD, prune, ``als_iters`` ALS rounds) or ``"svd"`` (SVD and prune only).
    scores: optional ``(r, in)`` importance for choosing the initial mask of ``S`` (default ``|S|``).
    Computation runs in float64 on the weight's device. ``in % 4 == 0`` is required.
    With ``return_mask=True`` the boolean ``(r, in)`` mask of ``S`` comes back third (a kept entry
    may be exactly zero, so the mask is not always ``S != 0``).
    """
    V.check_tensor(name, weight, ndim=2)
    V.check_finite(name, weight)
    out_f, in_f = weight.shape
    if in_f % 4:
        raise ValueError(
            f"{name}: expected in_features (dim 1) a multiple of 4 for a 2:4 factor, got shape {tuple(weight.shape)}"
        )
    V.check_positive_int("rank", rank, minimum=1, maximum=max_dense_sparse_rank(in_f, out_f))
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")
    V.check_positive_int("als_iters", als_iters, minimum=0)
    w = weight.detach().to(torch.float64)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    q = min(rank, S.numel())
    sq = S[:q].sqrt()
    d = torch.zeros((out_f, rank), dtype=w.dtype, device=w.device)
    s = torch.zeros((rank, in_f), dtype=w.dtype, device=w.device)
    d[:, :q] = U[:, :q] * sq
    s[:q] = sq[:, None] * Vh[:q]
    if rank > q:  # more rows than the matrix rank: small random rows, refined by ALS
        gen = torch.Generator(device="cpu").manual_seed(0)
        s[q:] = torch.randn((rank - q, in_f), generator=gen, dtype=w.dtype).to(w.device) * 1e-3
    mask = mask_24(s, scores)
    s = s * mask
    if init == "svd_als":
        for _ in range(als_iters):
            d = _solve_d(w, s)
            s = _solve_s(w, d, mask)
        d, s = _balance(d, s)
    d, s = d.to(weight.dtype).contiguous(), s.to(weight.dtype).contiguous()
    return (d, s, mask) if return_mask else (d, s)


__all__ = [
    "Sparse24Weight",
    "prune_24",
    "mask_24",
    "pack_24",
    "sparse24_num_params",
    "dense_sparse_num_params",
    "dense_sparse_rank_for_ratio",
    "resolve_dense_sparse_rank",
    "dense_sparse_factors",
]
