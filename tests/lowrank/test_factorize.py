"""Tier 1 (cpu): low-rank factorizations: ratio -> rank, truncated / row-weighted SVD, and the
data-aware ones (Fisher-weighted and activation-aware SVD) against their objectives."""

import math

import pytest
import torch

from fastfactor.factorize import data_aware as D, rank_for_ratio, svd_factors, weighted_svd_factors


@pytest.mark.parametrize("k,n,ratio", [(64, 48, 0.5), (37, 91, 0.25), (10, 10, 0.01), (768, 3072, 0.3)])
def test_rank_for_ratio_formula(k, n, ratio):
    r = rank_for_ratio(k, n, ratio)
    assert r == max(1, math.floor(ratio * k * n / (k + n)))
    if r > 1:
        assert r * (k + n) <= ratio * k * n + 1e-9  # never keeps more than asked
        assert (r + 1) * (k + n) > ratio * k * n    # and is the largest such rank


def test_weighted_svd_prefers_heavy_rows():
    w = torch.randn(40, 30, dtype=torch.float64)
    rw = torch.ones(40, dtype=torch.float64)
    rw[:5] = 100.0
    u, v = weighted_svd_factors(w, 5, rw)
    u0, v0 = svd_factors(w, 5)
    err_w = ((w - u @ v)[:5]).norm()
    err_0 = ((w - u0 @ v0)[:5]).norm()
    assert err_w < 0.1 * err_0  # the heavy rows are reproduced almost exactly
    # and it is the optimum of the weighted objective: no worse than plain SVD under that weighting
    assert (rw[:, None] * (w - u @ v)).norm() <= (rw[:, None] * (w - u0 @ v0)).norm() + 1e-9


def _correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("out_f,in_f,rank", [(29, 37, 5), (41, 19, 7)], ids=lambda v: str(v))
def test_whitened_svd_beats_plain_svd_on_correlated_inputs(out_f, in_f, rank, dtype):
    x = _correlated_inputs(200, in_f)
    w = torch.randn(out_f, in_f, dtype=torch.float64).to(dtype)
    u, v, how = D.whitened_svd_factors(w, rank, x.t() @ x)
    assert how == "cholesky" and u.dtype == dtype and u.shape == (out_f, rank) and v.shape == (rank, in_f)
    u0, v0 = svd_factors(w, rank)
    err = lambda a, b: torch.linalg.norm((w.double() - a.double() @ b.double()) @ x.t())
    assert err(u, v) < 0.9 * err(u0, v0)
    # and it is optimal: no worse than the plain SVD of W·Xᵀ's row space projected back
    assert err(u, v) <= err(u0, v0)


def test_whitening_fallbacks_for_singular_gram():
    x = _correlated_inputs(5, 17)  # 5 tokens < 17 features: XᵀX has rank 5
    g = x.t() @ x
    s, how = D.whitening_factor(g)
    assert how.startswith("cholesky+ridge") or how == "eigh"
    w = torch.randn(13, 17, dtype=torch.float64)
    u, v, how2 = D.whitened_svd_factors(w, 5, g)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    # rank 5 on a 5-dimensional input space: the compressed layer is exact on these inputs
    torch.testing.assert_close(x @ (u @ v).t(), x @ w.t(), rtol=1e-4, atol=1e-4 * float(w.abs().max() * x.abs().max()))
    # an indefinite matrix (negative eigenvalue) goes to the eigendecomposition path
    bad = torch.diag(torch.tensor([1.0, -5.0, 2.0], dtype=torch.float64))
    s, how = D.whitening_factor(bad)
    assert how == "eigh" and torch.isfinite(s).all()
    with pytest.raises(ValueError, match=r"gram: expected shape \(17, 17\)"):
        D.whitened_svd_factors(w, 5, torch.eye(3))


def test_fisher_svd_weights_rows():
    w = torch.randn(23, 31, dtype=torch.float64)
    fisher = torch.ones(23, 31, dtype=torch.float64)
    fisher[:4] *= 1e4  # four important rows
    u, v = D.fisher_svd_factors(w, 4, fisher)
    u0, v0 = svd_factors(w, 4)
    rows = lambda a, b: torch.linalg.norm((w - a @ b)[:4])
    assert rows(u, v) < 0.05 * rows(u0, v0)
    torch.testing.assert_close(D.fisher_row_weights(fisher), fisher.sum(1).sqrt())
    with pytest.raises(ValueError, match="fisher: expected shape"):
        D.fisher_svd_factors(w, 4, fisher[:3])
