"""Low-rank factorizations of a dense weight ``W (out, in) ≈ U·V``.

* :func:`rank_for_ratio`: ``r = floor(ratio·in·out/(in+out))``, at least 1 — the rank whose
  factors ``U (out, r)`` and ``V (r, in)`` keep the fraction ``ratio`` of ``W``'s parameters.
* :func:`svd_factors`: truncated SVD, ``U = U_r·√Σ_r``, ``V = √Σ_r·V_rᵀ`` (√Σ split into both).
* :func:`weighted_svd_factors`: SVD of ``diag(w)·W`` then un-weighting, the form shared by
  Fisher-weighted SVD (Hsu et al., ICLR 2022: ``w = √I`` with ``I`` the row importances) and other
  row-weighted schemes.

Both go through :func:`truncated_svd`, which picks per shape (``method="auto"``), on the weight's
device (the GPU when the weight is there); factors come back in ``W``'s dtype:

* ``min(out, in) < EXACT_FP64_BELOW`` (512): the exact SVD in float64 (cheap at these sizes, and
  what the small-matrix tests compare against);
* larger, when ``l = r + p <= min(out, in) / 2``: a **randomized truncated SVD** in float32
  (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1): a Gaussian sketch ``Y = W·Ω`` with ``l = r + p``
  columns (oversampling ``p = max(10, r/2)``), ``q = 4`` power iterations re-orthonormalized by QR
  (``Q ← qr(W·qr(Wᵀ·Q))``), then the exact SVD of the small ``B = Qᵀ·W`` (``l × in``), truncated to
  ``r``. Cost ``O((2q+2)·out·in·l)`` instead of ``O(out·in·min(out, in))``;
* otherwise the exact SVD in float32 (float64 is not needed to initialize factors that are then
  stored and trained in fp32/bf16: its singular vectors agree to ~1e-6 relative).

Error bound (HMT 2011, Cor. 10.10, spectral norm, for the projection ``P = Q·Qᵀ`` onto the sketch,
``σ_j`` the singular values of ``W``)::

    E‖W − P·W‖ ≤ [ (1 + √(r/(p−1)))·σ_{r+1}^{2q+1} + (e·√(r+p)/p)·(Σ_{j>r} σ_j^{2(2q+1)})^{1/2} ]^{1/(2q+1)}

and truncating ``P·W`` to rank ``r`` adds at most ``σ_{r+1}`` (HMT §9.4): with ``q = 4`` the tail
enters to the 9th power, so the error is a small factor above the optimal ``σ_{r+1}``. In the
Frobenius norm that the factorization minimizes, the measured ratio
``‖W − U·V‖_F / ‖W − W_r‖_F`` (``W_r`` the exact rank-``r`` truncation, Eckart–Young) is ≤ 1.003 on
Gaussian matrices (the flattest spectra, the hardest case) and on all-MiniLM-L6-v2's weights at
ratios 0.25 and 0.5; ``tests/test_svd_fast.py`` checks ≤ 1.01 against the exact SVD.
``method="exact"`` forces the exact float64 SVD.
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


#: below this ``min(out, in)`` the exact float64 SVD is used
EXACT_FP64_BELOW = 512
#: power iterations of the randomized SVD
POWER_ITERS = 4
SVD_METHODS = ("auto", "exact", "exact_fp32", "randomized")


def oversampling(rank: int) -> int:
    """Extra sketch columns of the randomized SVD: ``max(10, rank // 2)``."""
    return max(10, rank // 2)


def choose_svd(shape, rank: int) -> str:
    """``"exact"`` (float64), ``"randomized"`` (float32) or ``"exact_fp32"`` for a ``(out, in)`` weight
    truncated to ``rank`` (the rule in the module docstring)."""
    small = min(shape)
    if small < EXACT_FP64_BELOW:
        return "exact"
    if rank + oversampling(rank) <= small // 2:
        return "randomized"
    return "exact_fp32"


def randomized_svd(w: torch.Tensor, rank: int, oversample: Optional[int] = None,
                   power_iters: int = POWER_ITERS, seed: int = 0):
    """Randomized truncated SVD of ``w (m, n)`` in ``w``'s dtype on its device (HMT 2011): returns
    ``(U (m, r), S (r,), Vh (r, n))``. Deterministic for a given ``seed`` (the sketch's generator)."""
    m, n = w.shape
    p = oversampling(rank) if oversample is None else oversample
    ell = min(rank + p, m, n)
    tall = m >= n
    a = w if tall else w.t()  # (M, N) with M >= N: the sketch has the short side's columns
    g = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(a.shape[1], ell, generator=g, device=a.device, dtype=a.dtype)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.t() @ q)
        q, _ = torch.linalg.qr(a @ z)
    ub, s, vh = torch.linalg.svd(q.t() @ a, full_matrices=False)
    u = q @ ub[:, :rank]
    s, vh = s[:rank], vh[:rank]
    return (u, s, vh) if tall else (vh.t(), s, u.t())


def truncated_svd(w: torch.Tensor, rank: int, method: str = "auto"):
    """``(U (m, r), S (r,), Vh (r, n))``, the rank-``r`` truncated SVD of ``w`` on its device, by
    ``method`` (``auto``: :func:`choose_svd`; ``exact``: float64; ``exact_fp32``; ``randomized``:
    float32, :func:`randomized_svd`). Float64 inputs stay float64 whatever the method."""
    if method not in SVD_METHODS:
        raise ValueError(f"method: expected one of {SVD_METHODS}, got {method!r}")
    if method == "auto":
        method = choose_svd(tuple(w.shape), rank)
    dt = torch.float64 if (method == "exact" or w.dtype == torch.float64) else torch.float32
    w = w.detach().to(dt)
    if method == "randomized":
        return randomized_svd(w, rank)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank]


def _truncated_svd(w: torch.Tensor, rank: int, method: str = "auto"):
    U, S, Vh = truncated_svd(w, rank, method)
    s = S.sqrt()
    return U * s, s[:, None] * Vh


def svd_factors(weight: torch.Tensor, rank: int, name: str = "weight", method: str = "auto"):
    """``(U (out, r), V (r, in))`` minimizing ``‖W − U·V‖_F`` (Eckart–Young), √Σ split evenly;
    ``method`` as in :func:`truncated_svd` (``auto``: exact float64 below 512, else randomized or
    exact float32, see the module docstring for the error bound)."""
    V.check_tensor(name, weight, ndim=2)
    V.check_finite(name, weight)
    V.check_positive_int("rank", rank, minimum=1, maximum=min(weight.shape))
    u, v = _truncated_svd(weight.detach(), rank, method)
    return u.to(weight.dtype).contiguous(), v.to(weight.dtype).contiguous()


def weighted_svd_factors(
    weight: torch.Tensor, rank: int, row_weights: torch.Tensor, name: str = "weight", method: str = "auto"
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
    wm = w[:, None] * weight.detach().to(torch.float64)
    chosen = choose_svd(tuple(weight.shape), rank) if method == "auto" else method
    if chosen != "exact" and weight.dtype != torch.float64:
        wm = wm.to(torch.float32)  # randomized / exact_fp32 run in float32 (see truncated_svd)
    u, v = _truncated_svd(wm, rank, chosen)
    u = u / w[:, None].to(u.dtype)
    return u.to(weight.dtype).contiguous(), v.to(weight.dtype).contiguous()
