"""Tier 1 (cpu): LowRankLinear: from_linear (truncated SVD, rank= | ratio=), counts, dtype, bad arguments."""

import math

import pytest
import torch
from conftest import DTYPES

import fastfactor


def test_from_linear_is_truncated_svd():
    lin = torch.nn.Linear(37, 29)
    m = fastfactor.LowRankLinear.from_linear(lin, rank=6)
    w = lin.weight.detach().double()
    s = torch.linalg.svdvals(w)
    err = torch.linalg.norm(m.dense_weight().double() - w)
    # Eckart–Young: the error of the best rank-6 approximation is the norm of the tail singular values
    assert abs(err.item() - s[6:].norm().item()) < 1e-4 * s.norm().item()
    # √Σ split evenly: U and V have equal column/row norms
    torch.testing.assert_close(m.u.norm(dim=0), m.v.norm(dim=1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.bias, lin.bias)
    x = torch.randn(5, 37)
    torch.testing.assert_close(m(x), m.to_linear()(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x), m.forward_unfused(x), rtol=1e-5, atol=1e-5)


def test_module_params_ratio_repr():
    lin = torch.nn.Linear(100, 60, bias=False)
    m = fastfactor.LowRankLinear.from_linear(lin, ratio=0.5)
    r = math.floor(0.5 * 100 * 60 / 160)
    assert m.rank == r and m.bias is None
    assert m.num_weight_params == r * 160 == sum(p.numel() for p in m.parameters())
    assert abs(m.ratio - r * 160 / 6000) < 1e-12
    assert f"rank={r}" in repr(m) and "ratio=0.480" in repr(m)
    m2 = fastfactor.LowRankLinear(**m.factor_config())
    m2.load_state_dict(m.state_dict())
    x = torch.randn(3, 100)
    assert torch.equal(m(x), m2(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_module_dtype(dtype):
    lin = torch.nn.Linear(33, 21).to(dtype)
    m = fastfactor.LowRankLinear.from_linear(lin, ratio=0.6)
    assert m.u.dtype == dtype and m(torch.randn(2, 33, dtype=dtype)).dtype == dtype


def test_module_bad_args():
    lin = torch.nn.Linear(20, 10)
    with pytest.raises(ValueError, match=r"rank: expected an int in \[1, 10\], got 11"):
        fastfactor.LowRankLinear.from_linear(lin, rank=11)
    with pytest.raises(ValueError, match="rank/ratio: expected exactly one"):
        fastfactor.LowRankLinear.from_linear(lin, rank=2, ratio=0.5)
    with pytest.raises(ValueError, match=r"ratio: expected a float in \(0, 1\]"):
        fastfactor.LowRankLinear.from_linear(lin, ratio=1.5)
    with pytest.raises(TypeError, match="linear: expected an nn.Linear"):
        fastfactor.LowRankLinear.from_linear(torch.nn.ReLU(), rank=2)
    bad = torch.nn.Linear(20, 10)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight: expected finite values, found 1 NaN/Inf"):
        fastfactor.LowRankLinear.from_linear(bad, rank=2)
