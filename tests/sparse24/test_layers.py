"""Tier 1 (cpu): Sparse24Linear / DenseSparseLinear modules: forward against their dense weight,
parameter counts, save/load in both modes, and the straight-through factorizer (STF) experiment:
learning the mask beats fixing it at initialization. (The dense-sparse initialization itself is
tested in test_factorize.py.)"""

import math

import pytest
import torch
from torch import nn

from fastfactor.factorize.sparse24 import dense_sparse_num_params, sparse24_num_params
from fastfactor.formats.sparse24 import mask_24, prune_24
from fastfactor.layers.base import FactorizedLinear
from fastfactor.layers.sparse24 import DenseSparseLinear, Sparse24Linear


DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def make(kind, in_f=36, out_f=20, bias=True, dtype=torch.float32):
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    if kind == "sparse24":
        return lin, Sparse24Linear.from_linear(lin)
    return lin, DenseSparseLinear.from_linear(lin, rank=8)


KINDS = ["sparse24", "dense_sparse"]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_dense_weight_and_unfused(kind, bias):
    lin, m = make(kind, bias=bias)
    assert isinstance(m, FactorizedLinear) and m.method == kind
    x = torch.randn(2, 5, 36)
    y = m(x)
    assert y.shape == (2, 5, 20)
    assert torch.allclose(y, m.forward_unfused(x), atol=1e-5)
    ref = m.to_linear()
    assert isinstance(ref, nn.Linear) and (ref.bias is not None) == bias
    assert torch.allclose(y, ref(x), atol=1e-5)
    assert torch.equal(m.dense_weight(), ref.weight)


def test_sparse24_from_linear_is_pruned_weight():
    lin, m = make("sparse24")
    assert torch.equal(m.dense_weight(), prune_24(lin.weight.detach()))
    assert torch.equal(m.bias, lin.bias)
    scores = torch.rand(20, 36)
    m2 = Sparse24Linear.from_linear(lin, scores=scores)
    assert torch.equal(m2.dense_weight() != 0, mask_24(lin.weight, scores) & (lin.weight != 0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_IDS.get)
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_module(kind, dtype):
    lin, m = make(kind, dtype=dtype)
    assert m.dense_weight().dtype == dtype
    x = torch.randn(4, 36, dtype=dtype)
    assert torch.allclose(m(x).float(), m.forward_unfused(x).float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("mask_training", [False, True], ids=["fixed", "mask_training"])
@pytest.mark.parametrize("kind", KINDS)
def test_factor_config_rebuilds_exactly(kind, mask_training):
    _, m = make(kind)
    m.train_mask(mask_training)
    cfg = m.factor_config()
    assert cfg["mask_training"] is mask_training
    import json

    json.dumps(cfg)
    m2 = type(m)(**cfg)
    m2.load_state_dict(m.state_dict())    # strict: same keys and shapes
    x = torch.randn(3, 36)
    assert torch.equal(m2(x), m(x))
    assert m2.num_weight_params == m.num_weight_params


def test_num_weight_params_and_ratio():
    _, s = make("sparse24")
    # 20·18 values + 20·ceil(36/8) = 100 bytes of metadata = 50 16-bit parameters
    assert s.num_weight_params == 20 * 18 + 50 == sparse24_num_params(36, 20)
    _, d = make("dense_sparse")
    assert d.num_weight_params == 20 * 8 + 8 * 18 + math.ceil(8 * 5 / 2) == dense_sparse_num_params(36, 20, 8)
    assert d.ratio == d.num_weight_params / (36 * 20)
    assert Sparse24Linear(64, 32).ratio == 0.5625
    d.train_mask(True)
    assert d.num_weight_params == 20 * 8 + 8 * 36   # the dense latent S is what is stored
    assert "ratio=" in repr(d) and "mask_training=True" in repr(d) and "rank=8" in repr(d)


def test_from_linear_rank_larger_than_min_dim():
    lin = nn.Linear(8, 4)
    m = DenseSparseLinear.from_linear(lin, rank=6)
    assert m.rank == 6 and torch.isfinite(m.dense_weight()).all()


@pytest.mark.parametrize("kind", KINDS)
def test_train_mask_and_freeze_keep_the_function(kind):
    _, m = make(kind)
    x = torch.randn(4, 36)
    y = m(x)
    m.train_mask(True)
    assert m.mask_training
    assert torch.allclose(m(x), y, atol=1e-6)
    params = dict(m.named_parameters())
    assert ("dense" if kind == "sparse24" else "s_dense") in params
    m.freeze()
    assert not m.mask_training
    assert torch.allclose(m(x), y, atol=1e-6)
    m.train_mask(False)      # freeze again: no-op
    assert torch.allclose(m(x), y, atol=1e-6)


def test_mask_training_gradient_reaches_pruned_entries():
    _, m = make("dense_sparse")
    m.train_mask(True)
    m(torch.randn(16, 36)).square().sum().backward()
    pruned = ~mask_24(m.s_dense.detach())
    assert (m.s_dense.grad[pruned] != 0).float().mean() > 0.9
    assert m.d.grad is not None


def test_mask_changes_during_stf_and_freeze_packs_the_learned_mask():
    _, m = make("sparse24")
    m.train_mask(True)
    with torch.no_grad():
        m.dense[:, 2] += 10.0     # make a pruned column dominant
    m.freeze()
    assert (m.dense_weight()[:, 2] != 0).all()


def test_fixed_mode_trains_kept_values_only():
    _, m = make("sparse24")
    before = m.dense_weight().detach() != 0
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(8, 36)).square().sum().backward()
    opt.step()
    assert torch.equal((m.dense_weight().detach() != 0) | ~before, torch.ones_like(before))
    assert torch.equal((m.dense_weight().detach() != 0) & ~before, torch.zeros_like(before))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: Sparse24Linear(30, 8), ValueError, "in_features: expected a multiple of 4"),
        (lambda: DenseSparseLinear(30, 8, 4), ValueError, "in_features: expected a multiple of 4"),
        (lambda: DenseSparseLinear(32, 8, 0), ValueError, "rank"),
        (lambda: DenseSparseLinear(32, 8, 33), ValueError, "rank"),
        (lambda: Sparse24Linear.from_linear(nn.Linear(30, 8)), ValueError, "multiple of 4"),
        (lambda: DenseSparseLinear.from_linear(nn.Linear(32, 8)), ValueError, "exactly one"),
        (lambda: DenseSparseLinear.from_linear(nn.Linear(32, 8), ratio=1.5), ValueError, "ratio"),
        (lambda: DenseSparseLinear.from_linear(nn.Linear(32, 8), rank=4, init="magic"), ValueError, "init"),
        (lambda: Sparse24Linear.from_linear(nn.ReLU()), TypeError, "linear"),
        (lambda: Sparse24Linear(32, 8).train_mask("yes"), TypeError, "mode"),
    ],
    ids=["s24-in30", "ds-in30", "ds-rank0", "ds-rank-too-big", "from-linear-in30", "no-rank-or-ratio",
         "ratio-1.5", "bad-init", "not-a-linear", "train-mask-str"],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _regression(kind, seed, stf, steps, ft, lr, in_f=32, out_f=32, rank=8):
    """Fit y = x·W*ᵀ where W* is itself dense-sparse (resp. 2:4), from a random init, with Adam:
    ``steps`` in the chosen mode, then freeze and ``ft`` more steps on the fixed mask (the same
    budget for both arms). Returns the final relative MSE."""
    g = torch.Generator().manual_seed(seed)
    if kind == "dense_sparse":
        w = torch.randn(out_f, rank, generator=g) @ prune_24(torch.randn(rank, in_f, generator=g)) / rank ** 0.5
    else:
        w = prune_24(torch.randn(out_f, in_f, generator=g))
    x = torch.randn(256, in_f, generator=g)
    y = x @ w.t()
    torch.manual_seed(seed + 1000)        # same initial module for both arms
    m = DenseSparseLinear(in_f, out_f, rank, bias=False) if kind == "dense_sparse" else Sparse24Linear(in_f, out_f, bias=False)
    if stf:
        m.train_mask(True)
    for phase, n in ((0, steps), (1, ft)):
        if phase == 1:
            m.freeze()
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        for _ in range(n):
            loss = (m(x) - y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert not m.mask_training
    with torch.no_grad():
        return ((m(x) - y).square().mean() / y.square().mean()).item()


@pytest.mark.slow
def test_stf_beats_fixed_mask_dense_sparse():
    """DSFormer's claim at toy scale. Checked beforehand on 12 seeds: STF won on all 12 with
    loss ratios 0.57-0.85; here 3 seeds must each win by 5 % and on average by 15 %."""
    fixed, stf = [], []
    for seed in range(3):
        fixed.append(_regression("dense_sparse", seed, False, steps=400, ft=100, lr=3e-3))
        stf.append(_regression("dense_sparse", seed, True, steps=400, ft=100, lr=3e-3))
    assert all(s < 0.95 * f for s, f in zip(stf, fixed)), (stf, fixed)
    assert sum(stf) < 0.85 * sum(fixed), (stf, fixed)


def test_stf_beats_fixed_mask_sparse24():
    """A 2:4 target: a random fixed mask cannot represent it (relative loss ~0.53 after 130
    steps), the learned mask closes in on it (~0.15; ~0.01 with more steps)."""
    fixed = _regression("sparse24", 0, False, steps=100, ft=30, lr=1e-2)
    stf = _regression("sparse24", 0, True, steps=100, ft=30, lr=1e-2)
    assert stf < 0.5 * fixed, (stf, fixed)


@pytest.mark.parametrize("mask_training", [False, True], ids=["fixed", "mask_training"])
@pytest.mark.parametrize("kind", KINDS)
def test_module_compiles_fullgraph(kind, mask_training):
    torch._dynamo.reset()
    _, m = make(kind)
    m.train_mask(mask_training)
    x = torch.randn(3, 36, requires_grad=True)
    out = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    out.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ref = m(x)
    ref.sum().backward()
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(gx, x.grad, atol=1e-6)
