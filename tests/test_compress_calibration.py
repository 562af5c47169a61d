"""Calibration statistics and the data-aware initializations, against direct computations."""

import pytest
import torch
from torch import nn

from fastfactor.compress import calibration as C
from fastfactor.factorize.svd import svd_factors


def _correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("out_f,in_f,rank", [(29, 37, 5), (41, 19, 7)], ids=lambda v: str(v))
def test_whitened_svd_beats_plain_svd_on_correlated_inputs(out_f, in_f, rank, dtype):
    x = _correlated_inputs(200, in_f)
    w = torch.randn(out_f, in_f, dtype=torch.float64).to(dtype)
    u, v, how = C.whitened_svd_factors(w, rank, x.t() @ x)
    assert how == "cholesky" and u.dtype == dtype and u.shape == (out_f, rank) and v.shape == (rank, in_f)
    u0, v0 = svd_factors(w, rank)
    err = lambda a, b: torch.linalg.norm((w.double() - a.double() @ b.double()) @ x.t())
    assert err(u, v) < 0.9 * err(u0, v0)
    # and it is optimal: no worse than the plain SVD of W·Xᵀ's row space projected back
    assert err(u, v) <= err(u0, v0)


def test_whitening_fallbacks_for_singular_gram():
    x = _correlated_inputs(5, 17)  # 5 tokens < 17 features: XᵀX has rank 5
    g = x.t() @ x
    s, how = C.whitening_factor(g)
    assert how.startswith("cholesky+ridge") or how == "eigh"
    w = torch.randn(13, 17, dtype=torch.float64)
    u, v, how2 = C.whitened_svd_factors(w, 5, g)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    # rank 5 on a 5-dimensional input space: the compressed layer is exact on these inputs
    torch.testing.assert_close(x @ (u @ v).t(), x @ w.t(), rtol=1e-4, atol=1e-4 * float(w.abs().max() * x.abs().max()))
    # an indefinite matrix (negative eigenvalue) goes to the eigendecomposition path
    bad = torch.diag(torch.tensor([1.0, -5.0, 2.0], dtype=torch.float64))
    s, how = C.whitening_factor(bad)
    assert how == "eigh" and torch.isfinite(s).all()
    with pytest.raises(ValueError, match=r"gram: expected shape \(17, 17\)"):
        C.whitened_svd_factors(w, 5, torch.eye(3))


def test_fisher_svd_weights_rows():
    w = torch.randn(23, 31, dtype=torch.float64)
    fisher = torch.ones(23, 31, dtype=torch.float64)
    fisher[:4] *= 1e4  # four important rows
    u, v = C.fisher_svd_factors(w, 4, fisher)
    u0, v0 = svd_factors(w, 4)
    rows = lambda a, b: torch.linalg.norm((w - a @ b)[:4])
    assert rows(u, v) < 0.05 * rows(u0, v0)
    torch.testing.assert_close(C.fisher_row_weights(fisher), fisher.sum(1).sqrt())
    with pytest.raises(ValueError, match="fisher: expected shape"):
        C.fisher_svd_factors(w, 4, fisher[:3])


def test_collectors_match_direct_computation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(7, 11), nn.Tanh(), nn.Linear(11, 5))
    batches = [torch.randn(3, 4, 7) for _ in range(3)]
    mods = {"0": model[0], "2": model[2]}
    stats = C.collect_activation_stats(model, mods, batches, lambda m, b: m(b))
    x = torch.cat([b.reshape(-1, 7) for b in batches]).double()
    g, n = stats["0"]
    assert n == 36
    torch.testing.assert_close(g, x.t() @ x)
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)  # must survive calibration
    fisher = C.collect_fisher(model, mods, batches, lambda m, b: m(b).pow(2).sum())
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    expect = torch.zeros(5, 11, dtype=torch.float64)
    for b in batches:
        model.zero_grad()
        model(b).pow(2).sum().backward()
        expect += model[2].weight.grad.double() ** 2
    torch.testing.assert_close(fisher["2"], expect)


def test_sparse24_scores():
    w = torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(C.sparse24_scores(w), w.abs())
    f = torch.rand(5, 8, dtype=torch.float64)
    torch.testing.assert_close(C.sparse24_scores(w, "fisher", fisher=f), w * w * f)
    gram = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    torch.testing.assert_close(C.sparse24_scores(w, "activation", gram=gram), w.abs() * gram.diagonal().sqrt())
    with pytest.raises(ValueError, match="gram"):
        C.sparse24_scores(w, "activation")
