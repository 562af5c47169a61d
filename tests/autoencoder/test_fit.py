"""The autoencoder bottleneck fit (fastfactor.factorize.autoencoder) against float64 references:
the closed-form start is the principal-subspace optimum, no rank-r map beats it on the fitting
MSE (so neither can the nonlinear form, whose decoder is linear), refinement never worsens the
held-out error, the layers it builds compute what the fit computed, clear errors."""

import math

import pytest
import torch

from fastfactor.factorize import autoencoder as AE
from fastfactor.layers import BottleneckLinear, LowRankLinear


def _problem(n=300, i=29, o=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(i, i, generator=g) / math.sqrt(i)
    x = torch.randn(n, i, generator=g) @ A + 0.7 * torch.randn(i, generator=g)  # correlated, not centred
    W = torch.randn(o, i, generator=g) / math.sqrt(i)
    b = torch.randn(o, generator=g)
    return x, W, b


def _pca64(y, r):
    """Best rank-r affine reconstruction of the rows of y in float64: μ + P_r(y − μ) (by SVD)."""
    y = y.double()
    mu = y.mean(0)
    _, _, vh = torch.linalg.svd(y - mu, full_matrices=False)
    Q = vh[:r].t()
    return mu + (y - mu) @ Q @ Q.t()


@pytest.mark.parametrize("r", [1, 5, 11])
def test_closed_form_is_the_principal_subspace_float64(r):
    x, W, b = _problem()
    bn = AE.closed_form(W, b, x, r, "linear")
    y = x.double() @ W.double().t() + b.double()
    ref = _pca64(y, r)
    got = bn.layer()(x)
    assert isinstance(bn.layer(), LowRankLinear) and bn.layer().rank == r
    err = (got.double() - ref).abs().max().item()
    assert err < 2e-4 * (1 + ref.abs().max().item()), err


def test_closed_form_beats_svd_and_activation_svd():
    """The optimum of the output MSE over rank-r maps with a bias: never worse than plain SVD or the
    activation-aware (whitened, uncentred) SVD, and strictly better here (uncentred inputs)."""
    from fastfactor.factorize import data_aware

    x, W, b = _problem()
    r = 5
    y = x @ W.t() + b
    mse = lambda m: (m(x) - y).double().pow(2).mean().item()
    ae = mse(AE.closed_form(W, b, x, r).layer())
    lin = torch.nn.Linear(29, 23)
    lin.weight.data, lin.bias.data = W.clone(), b.clone()
    svd = mse(LowRankLinear.from_linear(lin, rank=r))
    u, v, _ = data_aware.whitened_svd_factors(W, r, x.double().t() @ x.double())
    act = mse(LowRankLinear.from_factors(u.float(), v.float(), b))
    assert ae <= min(act, svd) * (1 + 1e-6) and ae < 0.99 * act


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh", "identity"])
def test_nonlinear_start_is_near_the_linear_solution_and_never_beats_it(act):
    """The nonlinear start stays in σ's near-linear range (within 15 % of the linear MSE); after
    refinement its held-in MSE is still >= the linear optimum's: the decoder is linear, so every
    output lies in an r-dim affine subspace, where the orthogonal projection is optimal."""
    x, W, b = _problem(seed=1)
    r = 4
    lin = AE.fit_bottleneck(W, b, x, r, form="linear", steps=0, seed=3)
    start = AE.fit_bottleneck(W, b, x, r, form="nonlinear", act=act, steps=0, seed=3)
    assert start.info["heldin_mse"] <= 1.15 * lin.info["heldin_mse"] + 1e-6
    fit = AE.fit_bottleneck(W, b, x, r, form="nonlinear", act=act, steps=40, lr=3e-3, seed=3)
    assert fit.info["heldin_mse"] >= lin.info["heldin_mse"] * (1 - 1e-4)
    assert fit.info["heldout_mse"] <= fit.info["heldout_mse_start"]  # the best held-out state is kept
    m = fit.layer()
    assert isinstance(m, BottleneckLinear) and m.act == act and m.rank == r
    with torch.no_grad():
        torch.testing.assert_close(m(x), fit.forward(x), rtol=0, atol=0)  # the layer computes what was fitted


def test_refinement_keeps_the_best_heldout_state_and_is_deterministic():
    x, W, b = _problem(seed=2)
    a = AE.fit_bottleneck(W, b, x, 3, form="nonlinear", act="tanh", steps=30, lr=1e-2, seed=5)
    c = AE.fit_bottleneck(W, b, x, 3, form="nonlinear", act="tanh", steps=30, lr=1e-2, seed=5)
    assert a.info["heldout_mse"] < a.info["heldout_mse_start"]  # tanh starts off its optimum and improves
    for k in ("E", "c", "D", "d"):
        assert torch.equal(getattr(a, k), getattr(c, k))
    i_in, i_out = AE.split_rows(300, 0.2, 5)
    assert len(i_out) == 60 and sorted(torch.cat([i_in, i_out]).tolist()) == list(range(300))


def test_bottleneck_layer_contract():
    x, W, b = _problem()
    lin = torch.nn.Linear(29, 23)
    lin.weight.data, lin.bias.data = W.clone(), b.clone()
    m = BottleneckLinear.from_linear(lin, ratio=0.3, act="identity")
    r = m.rank
    assert r == math.floor(0.3 * 29 * 23 / 52) and m.num_weight_params == r * 52
    assert m.ratio == pytest.approx(r * 52 / (29 * 23))
    with torch.no_grad():
        m.cb.normal_()
        torch.testing.assert_close(m(x), m.to_linear()(x), rtol=1e-5, atol=1e-5)  # identity: c folds into b
        torch.testing.assert_close(m(x), m.forward_unfused(x), rtol=1e-5, atol=1e-5)
    m2 = BottleneckLinear(29, 23, 4, act="gelu")
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m2.forward_unfused(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="act: a 'gelu' bottleneck is not a linear map"):
        m2.dense_weight()
    assert BottleneckLinear(**m2.factor_config()).factor_config() == m2.factor_config()


def test_bad_input_is_named():
    x, W, b = _problem()
    with pytest.raises(ValueError, match=r"ae_form: expected one of \['linear', 'nonlinear'\], got 'deep'"):
        AE.fit_bottleneck(W, b, x, 3, form="deep")
    with pytest.raises(ValueError, match=r"ae_activation: expected one of .*got 'swish'"):
        AE.fit_bottleneck(W, b, x, 3, form="nonlinear", act="swish")
    with pytest.raises(ValueError, match=r"inputs: expected size 29"):
        AE.fit_bottleneck(W, b, x[:, :5], 3)
    with pytest.raises(ValueError, match=r"rank: expected an int in \[1, 23\], got 24"):
        AE.fit_bottleneck(W, b, x, 24)
    with pytest.raises(ValueError, match="inputs: expected at least 2 calibration rows"):
        AE.fit_bottleneck(W, b, x[:1], 3)
    bad = x.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="inputs: expected finite"):
        AE.fit_bottleneck(W, b, bad, 3)
    with pytest.raises(ValueError, match="lr: expected a finite positive"):
        AE.fit_bottleneck(W, b, x, 3, lr=0.0)
    with pytest.raises(ValueError, match=r"act: expected one of"):
        BottleneckLinear(5, 4, 2, act="swish")
