"""The fast truncated SVD (``fastfactor.factorize.svd``): randomized where it is accurate enough,
float32 where float64 is not needed, exact float64 for small matrices; its Frobenius error
against the optimal (exact) truncation."""

import pytest
import torch

from fastfactor.factorize.svd import (
    EXACT_FP64_BELOW,
    choose_svd,
    randomized_svd,
    rank_for_ratio,
    svd_factors,
    truncated_svd,
    weighted_svd_factors,
)


def _optimal_error(w, r):
    s = torch.linalg.svdvals(w.double())
    return s[r:].pow(2).sum().sqrt().item()


def _error(w, u, v):
    return torch.linalg.norm(w.double() - u.double() @ v.double()).item()


@pytest.mark.parametrize("shape,ratio", [((300, 263), 0.25), ((263, 520), 0.25), ((301, 301), 0.3)],
                         ids=["tall", "wide", "square"])
def test_randomized_is_within_one_percent_of_the_optimal_error(shape, ratio):
    """Gaussian matrices: the flattest spectra, the hardest case for a sketch."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(*shape, generator=g)
    r = rank_for_ratio(shape[1], shape[0], ratio)
    u, v = svd_factors(w, r, method="randomized")
    assert u.dtype == v.dtype == torch.float32 and u.shape == (shape[0], r) and v.shape == (r, shape[1])
    ratio_err = _error(w, u, v) / _optimal_error(w, r)
    assert 1.0 - 1e-6 <= ratio_err <= 1.01, ratio_err


def test_randomized_on_a_decaying_spectrum_and_deterministic():
    g = torch.Generator().manual_seed(0)
    m, n, r = 320, 280, 30
    a, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    b, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -4, n, dtype=torch.float64)
    w = ((a * s) @ b.t()).float()
    U, S, Vh = truncated_svd(w, r, method="randomized")
    torch.testing.assert_close(S.double(), s[:r], rtol=1e-3, atol=1e-6)
    assert _error(w, U * S, Vh) / _optimal_error(w, r) <= 1.01
    U2, S2, Vh2 = randomized_svd(w, r)
    assert torch.equal(S, S2) and torch.equal(U, U2)  # fixed seed: bitwise repeatable


def test_small_matrices_stay_exact_float64():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, 53, generator=g)
    assert min(w.shape) < EXACT_FP64_BELOW and choose_svd(w.shape, 5) == "exact"
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    u, v = svd_factors(w, 5)
    want = (U[:, :5] * S[:5]) @ Vh[:5]
    torch.testing.assert_close((u.double() @ v.double()), want, rtol=0, atol=1e-6)
    assert _error(w, u, v) == pytest.approx(_optimal_error(w, 5), rel=1e-6)


def test_large_rank_uses_exact_fp32_and_methods_are_named():
    assert choose_svd((1024, 1024), 400) == "exact_fp32"
    assert choose_svd((1024, 4096), 100) == "randomized"
    w = torch.randn(520, 515)
    u, v = svd_factors(w, 300)  # exact_fp32
    assert u.dtype == torch.float32
    assert _error(w, u, v) / _optimal_error(w, 300) <= 1 + 1e-5
    with pytest.raises(ValueError, match="method: expected one of"):
        truncated_svd(w, 3, method="lanczos")


def test_weighted_svd_on_the_fast_path_is_near_optimal_in_its_norm():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(600, 530, generator=g)
    rw = torch.rand(600, generator=g) + 0.5
    r = 60
    assert choose_svd(w.shape, r) == "randomized"
    u, v = weighted_svd_factors(w, r, rw)
    weighted = rw.double()[:, None] * w.double()
    err = torch.linalg.norm(rw.double()[:, None] * (w.double() - u.double() @ v.double())).item()
    assert err / _optimal_error(weighted, r) <= 1.01


def test_lowrank_layer_from_a_large_linear_uses_the_fast_path():
    lin = torch.nn.Linear(700, 530)
    from fastfactor import LowRankLinear

    layer = LowRankLinear.from_linear(lin, ratio=0.2)
    r = layer.rank
    assert choose_svd((530, 700), r) == "randomized"
    w = lin.weight.detach()
    assert _error(w, layer.u.detach(), layer.v.detach()) / _optimal_error(w, r) <= 1.01


def test_activation_aware_svd_on_the_fast_path_is_near_optimal_in_its_norm():
    """``‖(W − U·V)·S‖_F`` (S the whitening factor of the Gram matrix) within 1% of its optimum."""
    from fastfactor.factorize.data_aware import whitened_svd_factors, whitening_factor

    g = torch.Generator().manual_seed(4)
    w = torch.randn(530, 600, generator=g)
    x = torch.randn(900, 600, generator=g) * torch.linspace(0.2, 2.0, 600)
    gram = x.t() @ x
    r = 50
    assert choose_svd(w.shape, r) == "randomized"
    u, v, how = whitened_svd_factors(w, r, gram)
    S, _ = whitening_factor(gram)
    err = torch.linalg.norm((w.double() - u.double() @ v.double()) @ S).item()
    assert err / _optimal_error(w.double() @ S, r) <= 1.01
