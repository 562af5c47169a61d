"""Tier 1 (cpu): MonarchLinear and BlockLowRankLinear modules."""

import pytest
import torch
from torch import nn

from conftest import assert_close_ref
from fastfactor.factorize.monarch import monarch_rank_for_ratio
from fastfactor.layers.base import FactorizedLinear
from fastfactor.layers.monarch import BlockLowRankLinear, MonarchLinear

CLASSES = {"monarch": MonarchLinear, "blr": BlockLowRankLinear}


@pytest.mark.parametrize("name", CLASSES, ids=str)
def test_method_and_base(name):
    cls = CLASSES[name]
    assert issubclass(cls, FactorizedLinear)
    assert cls.method == {"monarch": "monarch", "blr": "block_lowrank"}[name]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", CLASSES, ids=str)
def test_constructor_shapes_and_param_count(name, bias):
    m = CLASSES[name](30, 50, nblocks=4, rank=2, bias=bias)
    assert m.w1.shape == (4, 8, 8) and m.w2.shape == (4, 13, 8)
    assert (m.bias is not None) == bias
    assert m.num_weight_params == 4 * 8 * 8 + 4 * 13 * 8 == 2 * 4 * (4 * 8 + 4 * 13)
    assert m.ratio == pytest.approx(m.num_weight_params / (30 * 50))
    assert m(torch.randn(3, 30)).shape == (3, 50)


@pytest.mark.parametrize("name", CLASSES, ids=str)
def test_default_init_matches_linear_scale(name):
    torch.manual_seed(1)
    m = CLASSES[name](256, 192, nblocks=4, rank=8)
    w = m.dense_weight().detach()
    lin_std = (1.0 / 256) ** 0.5 / 3 ** 0.5        # std of U(±1/√in)
    assert 0.6 * lin_std < w.std().item() < 1.6 * lin_std


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", CLASSES, ids=str)
def test_from_linear_to_linear_roundtrip(name, bias):
    cls = CLASSES[name]
    lin = nn.Linear(30, 50, bias=bias)
    m = cls.from_linear(lin, nblocks=4, rank=3)
    x = torch.randn(2, 5, 30)
    y = m(x)
    back = m.to_linear()
    assert isinstance(back, nn.Linear) and back.weight.shape == (50, 30)
    assert_close_ref(back(x), y.double(), torch.float32, reduction=30)
    assert_close_ref(m.forward_unfused(x), y.double(), torch.float32, reduction=30)
    # full rank reproduces the dense layer
    full = cls.from_linear(lin, nblocks=4, rank=8)
    assert_close_ref(full(x), lin(x).double(), torch.float32, reduction=30)
    if bias:
        assert torch.equal(m.bias, lin.bias)


@pytest.mark.parametrize("name", CLASSES, ids=str)
def test_from_linear_rank_ratio_rules(name):
    cls = CLASSES[name]
    lin = nn.Linear(40, 24)
    with pytest.warns(DeprecationWarning, match="without rank= or ratio="):
        assert cls.from_linear(lin, nblocks=2).rank == 1                            # neither: rank 1 (deprecated)
    assert cls.from_linear(lin, nblocks=2, ratio=0.5).rank == monarch_rank_for_ratio(40, 24, 2, 0.5)
    m = cls.from_linear(lin, nblocks=2, ratio=0.5)
    assert m.ratio <= 0.5
    with pytest.raises(ValueError, match=r"rank/ratio: expected exactly one of them, got rank=2, ratio=0.5"):
        cls.from_linear(lin, nblocks=2, rank=2, ratio=0.5)
    with pytest.raises(TypeError, match=r"linear: expected an nn.Linear"):
        cls.from_linear(nn.ReLU(), nblocks=2)


@pytest.mark.parametrize("name", CLASSES, ids=str)
def test_factor_config_rebuilds(name):
    cls = CLASSES[name]
    m = cls.from_linear(nn.Linear(26, 19), nblocks=3, rank=2)
    cfg = m.factor_config()
    assert cfg == dict(in_features=26, out_features=19, nblocks=3, rank=2, bias=True)
    m2 = cls(**cfg)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(4, 26)
    assert torch.equal(m2(x), m(x))


@pytest.mark.parametrize("name", CLASSES, ids=str)
def test_extra_repr(name):
    m = CLASSES[name](30, 50, nblocks=4, rank=2)
    assert repr(m) == (
        f"{type(m).__name__}(in_features=30, out_features=50, nblocks=4, rank=2, "
        f"ratio={m.ratio:.3f}, bias=True)"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", CLASSES, ids=str)
def test_low_precision_module(name, dtype):
    m = CLASSES[name](21, 13, nblocks=3, rank=2, dtype=dtype)
    assert m.w1.dtype == dtype
    x = torch.randn(5, 21, dtype=dtype)
    y = m(x)
    assert y.dtype == dtype
    w64 = m.dense_weight().double()
    assert_close_ref(y, x.double() @ w64.t() + m.bias.double(), dtype, reduction=21)


@pytest.mark.parametrize("name", CLASSES, ids=str)
def test_training_step_reduces_loss(name):
    """Gradients reach every parameter and a few SGD steps fit a linear target."""
    torch.manual_seed(0)
    m = CLASSES[name](12, 10, nblocks=2, rank=2)
    target = CLASSES[name](12, 10, nblocks=2, rank=2)
    x = torch.randn(64, 12)
    with torch.no_grad():
        y = target(x)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (m(x) - y).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(in_features=0, out_features=8, nblocks=2), ValueError, r"in_features: expected an int >= 1, got 0"),
        (dict(in_features=8, out_features=8, nblocks=9), ValueError, r"nblocks: expected an int in \[1, 8\], got 9"),
        (dict(in_features=8, out_features=8, nblocks=2, rank=5), ValueError, r"rank: expected an int in \[1, 4\], got 5"),
        (dict(in_features=8, out_features=8, nblocks=2.0), TypeError, r"nblocks: expected an int, got float"),
        (dict(in_features=8, out_features=8, nblocks=2, bias="yes"), TypeError, r"bias: expected a bool, got str"),
    ],
    ids=["in-zero", "nblocks-too-big", "rank-too-big", "nblocks-float", "bias-str"],
)
def test_constructor_errors(kwargs, exc, msg):
    for cls in CLASSES.values():
        with pytest.raises(exc, match=msg):
            cls(**kwargs)
