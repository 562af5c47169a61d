"""Calibration statistics and the data-aware initializations built on them.

Statistics (collected with hooks on the target modules over a few batches):

* **activation Gram** ``G = Σ_batches XᵀX`` ``(in, in)`` of each target's input ``X (tokens, in)``
  (float64, with the token count);
* **Fisher information** ``F = Σ_batches (∂L/∂W)²`` ``(out, in)`` (elementwise, float64) of each
  target's ``(out, in)`` weight; the row importance of Hsu et al. (ICLR 2022) is
  ``I_i = Σ_j F_ij``.

Initializations (pure functions of a weight and a statistic):

* :func:`fisher_svd_factors`: ``SVD(diag(√I)·W)`` then un-weighting (Fisher-weighted SVD);
* :func:`whitened_svd_factors` (activation-aware): minimize ``‖(W − U·V)·Xᵀ‖_F``. With
  ``G = XᵀX = L·Lᵀ`` (Cholesky), ``‖(W − UV)Xᵀ‖_F = ‖(W − UV)·L‖_F``, so truncate the SVD of
  ``W·L = P Σ Qᵀ`` and set ``U = P_r √Σ_r``, ``V = √Σ_r Q_rᵀ L⁻¹``. When ``G`` is not positive
  definite (dead features, fewer tokens than features) we add a growing ridge
  ``λ·mean(diag G)·I`` (λ = 1e-6 … 1e-1); should that still fail, an eigendecomposition with
  eigenvalues clamped to a floor gives the whitening ``S = Q·√Λ`` instead of ``L``;
* :func:`sparse24_scores`: element scores for 2:4 pruning — ``|W|`` (magnitude),
  ``W²·F`` (Fisher, the diagonal second-order saliency), or ``|W_ij|·‖X_j‖`` (activation).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from .. import _validate as V
from ..factorize.svd import weighted_svd_factors
from .targets import is_conv1d


# ============================================================================================
# statistics
# ============================================================================================

@torch.no_grad()
def collect_activation_stats(
    model: nn.Module, modules: Dict[str, nn.Module], batches: Iterable, forward: Callable
) -> Dict[str, Tuple[torch.Tensor, int]]:
    """``{name: (G (in, in) float64, tokens)}`` from the inputs each module sees while
    ``forward(model, batch)`` runs over ``batches``."""
    stats: Dict[str, list] = {}
    hooks = []

    def make_hook(name):
        def hook(mod, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            g, n = stats.get(name, (None, 0))
            gx = x.t() @ x
            stats[name] = (gx if g is None else g + gx, n + x.shape[0])

        return hook

    for name, mod in modules.items():
        hooks.append(mod.register_forward_pre_hook(make_hook(name)))
    was = model.training
    model.eval()
    try:
        for b in batches:
            forward(model, b)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    missing = [n for n in modules if n not in stats]
    if missing:
        raise RuntimeError(f"modules: {missing} saw no input during calibration (not used by forward?)")
    return {k: (v[0], v[1]) for k, v in stats.items()}


def collect_fisher(
    model: nn.Module, modules: Dict[str, nn.Module], batches: Iterable, loss_fn: Callable
) -> Dict[str, torch.Tensor]:
    """``{name: F (out, in) float64}``: accumulated squared gradients of ``loss_fn(model, batch)``
    with respect to each module's weight (``Conv1D`` weights transposed to ``(out, in)``).
    Other parameters' gradients are left untouched (they are saved and restored)."""
    saved = {id(p): p.grad for p in model.parameters()}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    fisher: Dict[str, torch.Tensor] = {}
    weights = {n: m.weight for n, m in modules.items()}
    was = model.training
    model.eval()  # no dropout: the statistic of the deterministic model
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for b in batches:
            for w in weights.values():
                w.grad = None
            loss = loss_fn(model, b)
            loss.backward()
            for n, w in weights.items():
                if w.grad is None:
                    raise RuntimeError(f"modules: {n!r} got no gradient during Fisher calibration")
                g = w.grad.detach().to(torch.float64)
                if is_conv1d(modules[n]):
                    g = g.t()
                fisher[n] = g * g if n not in fisher else fisher[n] + g * g
    finally:
        for p in model.parameters():
            p.grad = saved[id(p)]
            p.requires_grad_(flags[id(p)])
        model.train(was)
    return fisher


# ============================================================================================
# initializations
# ============================================================================================

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
    P, sig, Qh = torch.linalg.svd(w @ S, full_matrices=False)
    s = sig[:rank].sqrt()
    u = P[:, :rank] * s
    b = s[:, None] * Qh[:rank]  # (r, in) = V·S
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
