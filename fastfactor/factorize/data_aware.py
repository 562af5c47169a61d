"""Data-aware factorizations: a dense weight plus calibration statistics -> factors or scores.

The statistics are collected by :mod:`fastfactor.compress.calibration` (hooks over a few batches):
the activation Gram ``G = XᵀX (in, in)`` of a layer's input and the elementwise Fisher
information ``F = Σ (∂L/∂W)² (out, in)``, both float64. Here they are only consumed:

* :func:`fisher_svd_factors`: ``SVD(diag(√I)·W)`` then un-weighting (Fisher-weighted SVD, Hsu et
  al., ICLR 2022), with the row importance ``I_i = Σ_j F_ij`` (:func:`fisher_row_weights`); built
  on :func:`fastfactor.factorize.svd.weighted_svd_factors`;
* :func:`whitened_svd_factors` (activation-aware): minimize ``‖(W − U·V)·Xᵀ‖_F``. With
  ``G = XᵀX = L·Lᵀ`` (Cholesky), ``‖(W − UV)Xᵀ‖_F = ‖(W − UV)·L‖_F``, so truncate the SVD of
  ``W·L = P Σ Qᵀ`` and set ``U = P_r √Σ_r``, ``V = √Σ_r Q_rᵀ L⁻¹``. When ``G`` is not positive
  definite (dead features, fewer tokens than features) a growing ridge
  ``λ·mean(diag G)·I`` (λ = 1e-6 … 1e-1) is added; should that still fail, an eigendecomposition
  with eigenvalues clamped to a floor gives the whitening ``S = Q·√Λ`` instead of ``L``
  (:func:`whitening_factor`);
* :func:`sparse24_scores`: element scores for 2:4 pruning — ``|W|`` (magnitude), ``W²·F``
  (Fisher, the diagonal second-order saliency), or ``|W_ij|·‖X_j‖`` (activation).

All computation is in float64; factors come back in the weight's dtype.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .. import _validate as V
from .svd import choose_svd, truncated_svd, weighted_svd_factors


def fisher_row_weights(fisher: torch.Tensor) -> torch.Tensor:
    """``√I`` with ``I_i = Σ_j F_ij`` (row importance, Hsu et al. 2022)."""
    V.check_tensor("fisher", fisher, ndim=2)
    return fisher.to(torch.float64).sum(1).clamp_min(0).sqrt()


def fisher_svd_factors(weight: torch.Tensor, rank: int, fisher: torch.Tensor):
    """Fisher-weighted SVD: ``(U, V)`` minimizing ``‖diag(√I)(W − UV)‖_F``."""
    V.check_tensor("fisher", fisher, ndim=2)
    if tuple(fisher.shape) != tuple(weight.shape):
        raise ValueError(f"fisher: expected shape {tuple(weight.shape)} (the weight's), got {tuple(fisher.shape)}")
    return weighted_svd_factors(weight, rank, fisher_row_weights(fisher))


def whitening_factor(gram: torch.Tensor) -> Tuple[torch.Tensor, str]:
    """A square ``S`` with ``S·Sᵀ ≈ G`` and ``S`` invertible, and how it was obtained
    (``cholesky``, ``cholesky+ridge(λ)`` or ``eigh``)."""
    V.check_tensor("gram", gram, ndim=2)
    if gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram: expected a square (in, in) matrix, got shape {tuple(gram.shape)}")
    g = gram.detach().to(torch.float64)
    g = 0.5 * (g + g.t())
    scale = float(g.diagonal().mean().abs()) or 1.0
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for lam in (0.0, 1e-6, 1e-4, 1e-2, 1e-1):
        L, info = torch.linalg.cholesky_ex(g + lam * scale * eye)
        if int(info) == 0 and torch.isfinite(L).all() and float(L.diagonal().min()) > 0:
            return L, "cholesky" if lam == 0 else f"cholesky+ridge({lam:g})"
    evals, evecs = torch.linalg.eigh(g)
    floor = max(float(evals.max()) * 1e-6, 1e-12)
    return evecs * evals.clamp_min(floor).sqrt(), "eigh"


def whitened_svd_factors(weight: torch.Tensor, rank: int, gram: torch.Tensor):
    """Activation-aware SVD: ``(U (out, r), V (r, in), how)`` minimizing ``‖(W − UV)·S‖_F`` with
    ``S·Sᵀ = G = XᵀX`` (see the module docstring); factors in ``weight``'s dtype."""
    V.check_tensor("weight", weight, ndim=2)
    V.check_finite("weight", weight)
    V.check_finite("gram", gram)
    V.check_positive_int("rank", rank, minimum=1, maximum=min(weight.shape))
    if tuple(gram.shape) != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"gram: expected shape ({weight.shape[1]}, {weight.shape[1]}) (in_features²), got {tuple(gram.shape)}"
        )
    S, how = whitening_factor(gram)
    w = weight.detach().to(torch.float64)
    ws = w @ S
    method = choose_svd(tuple(ws.shape), rank)  # exact float64 when small, else the fast SVD (svd.py)
    if method != "exact" and weight.dtype != torch.float64:
        ws = ws.to(torch.float32)
    P, sig, Qh = truncated_svd(ws, rank, method)
    P, sig, Qh = P.to(torch.float64), sig.to(torch.float64), Qh.to(torch.float64)
    s = sig.sqrt()
    u = P * s
    b = s[:, None] * Qh  # (r, in) = V·S
    if how.startswith("cholesky"):
        v = torch.linalg.solve_triangular(S, b, upper=False, left=False)
    else:
        v = torch.linalg.solve(S.t(), b.t()).t()
    return u.to(weight.dtype).contiguous(), v.to(weight.dtype).contiguous(), how


def sparse24_scores(weight: torch.Tensor, kind: str = "magnitude", fisher=None, gram=None) -> torch.Tensor:
    """Importance of each weight for 2:4 pruning (higher = keep)."""
    w = weight.detach().to(torch.float64)
    if kind == "magnitude":
        return w.abs()
    if kind == "fisher":
        if fisher is None:
            raise ValueError("fisher: the 'fisher' score needs Fisher statistics")
        return w * w * fisher.to(torch.float64)
    if kind == "activation":
        if gram is None:
            raise ValueError("gram: the 'activation' score needs activation statistics")
        return w.abs() * gram.to(torch.float64).diagonal().clamp_min(0).sqrt()[None, :]
    raise ValueError(f"kind: expected magnitude, fisher or activation, got {kind!r}")
