"""Every op under ``torch.autocast``: ``nn.Linear``'s semantics (operands cast to the autocast
dtype, gradients to each parameter in its own dtype), on CPU in bf16, for every family, forward and
backward, against float64; and the driver's fine-tune run under CPU autocast."""

import copy

import pytest
import torch
from torch import nn

import fastfactor
from fastfactor.layers.base import FactorizedLinear

from conftest import assert_close_ref

BF16 = torch.bfloat16

# odd sizes; 2:4 needs in % 4 == 0
FAMILIES = {
    "lowrank": lambda lin: fastfactor.LowRankLinear.from_linear(lin, ratio=0.5),
    "monarch": lambda lin: fastfactor.MonarchLinear.from_linear(lin, nblocks=3, ratio=0.5),
    "block_lowrank": lambda lin: fastfactor.BlockLowRankLinear.from_linear(lin, nblocks=3, ratio=0.5),
    "sparse24": lambda lin: fastfactor.Sparse24Linear.from_linear(lin),
    "dense_sparse": lambda lin: fastfactor.DenseSparseLinear.from_linear(lin, ratio=0.5, init="svd"),
}
# the 2:4 families while learning their mask (straight-through projection of a dense weight)
FAMILIES["sparse24_mask_training"] = FAMILIES["sparse24"]
FAMILIES["dense_sparse_mask_training"] = FAMILIES["dense_sparse"]


def _make(family, k=44, n=37, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    mod = FAMILIES[family](lin)
    if family.endswith("mask_training"):
        mod.train_mask(True)
        assert mod.mask_training
    return mod


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_dtype", [torch.float32, BF16], ids=["x_fp32", "x_bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_module_under_cpu_autocast_matches_float64(family, x_dtype, bias):
    mod = _make(family, bias=bias)
    ref = copy.deepcopy(mod).double()
    k = mod.in_features
    x = torch.randn(2, 5, k, dtype=x_dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16):
        y = mod(x)
    assert y.dtype == BF16, "the output is in the autocast dtype, as nn.Linear's"
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64)
    assert_close_ref(y, y64, BF16, reduction=k, name=f"{family} y")

    g = torch.randn(y.shape, dtype=torch.float64)
    (y.float() * g.float()).sum().backward()
    (y64 * g).sum().backward()
    assert x.grad is not None and x.grad.dtype == x_dtype, "dx in x's own dtype (autocast's cast is differentiable)"
    assert_close_ref(x.grad, x64.grad, BF16, reduction=mod.out_features, name="dx")
    params = dict(mod.named_parameters())
    params64 = dict(ref.named_parameters())
    assert params, family
    for name, p in params.items():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{family}.{name}: no gradient under autocast"
        assert p.grad.dtype == p.dtype == torch.float32, f"{family}.{name}: grad {p.grad.dtype}, param {p.dtype}"
        assert_close_ref(p.grad, params64[name].grad, BF16, reduction=10, name=f"{family}.{name}.grad")


def test_nn_linear_semantics_are_what_we_copy():
    """The behaviour the ops follow, checked on nn.Linear itself (fp32 params, bf16 output, fp32 grads)."""
    lin = nn.Linear(8, 5)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=BF16):
        y = lin(x)
        z = fastfactor.LowRankLinear.from_linear(lin, ratio=1.0)(x)
    assert y.dtype == z.dtype == BF16
    y.sum().backward()
    assert lin.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("op", ["lowrank", "monarch", "block_lowrank", "sparse24", "dense_sparse"])
def test_functional_ops_cast_fp32_operands_under_autocast(op):
    torch.manual_seed(1)
    x = torch.randn(7, 12)
    b = torch.randn(9)
    if op == "lowrank":
        u, v = torch.randn(9, 3), torch.randn(3, 12)
        f = lambda xx: fastfactor.lowrank_linear(xx, u, v, b)  # noqa: E731
        ref = (x.double() @ v.double().t()) @ u.double().t() + b.double()
    elif op in ("monarch", "block_lowrank"):
        w1, w2 = torch.randn(3, 6, 4), torch.randn(3, 3, 6)
        fn = fastfactor.monarch_linear if op == "monarch" else fastfactor.block_lowrank_linear
        f = lambda xx: fn(xx, w1, w2, b)  # noqa: E731
        ref = fn(x.double(), w1.double(), w2.double(), b.double())
    elif op == "sparse24":
        w = fastfactor.ops.sparse24.pack_24(fastfactor.ops.sparse24.prune_24(torch.randn(9, 12)))
        f = lambda xx: fastfactor.sparse24_linear(xx, w, b)  # noqa: E731
        ref = x.double() @ w.to_dense().double().t() + b.double()
    else:
        d = torch.randn(9, 5)
        s = fastfactor.ops.sparse24.pack_24(fastfactor.ops.sparse24.prune_24(torch.randn(5, 12)))
        f = lambda xx: fastfactor.dense_sparse_linear(xx, d, s, b)  # noqa: E731
        ref = (x.double() @ s.to_dense().double().t()) @ d.double().t() + b.double()
    with torch.autocast("cpu", dtype=BF16):
        y = f(x)
    assert y.dtype == BF16
    assert_close_ref(y, ref, BF16, reduction=12, name=op)
    # outside autocast, mixed dtypes are still refused with the argument named
    with pytest.raises(TypeError, match="expected dtype bfloat16"):
        f(x.to(BF16))


def test_autocast_disabled_region_and_float64_are_left_alone():
    lin = nn.Linear(10, 6)
    mod = fastfactor.LowRankLinear.from_linear(lin, ratio=0.5).double()
    x = torch.randn(4, 10, dtype=torch.float64)
    with torch.autocast("cpu", dtype=BF16):
        y = mod(x)  # float64 is not an autocast-eligible dtype: nothing is cast, as for F.linear
        with torch.autocast("cpu", enabled=False):
            y2 = mod(x)
    assert y.dtype == y2.dtype == torch.float64
    torch.testing.assert_close(y, y2)


def test_compile_fullgraph_under_autocast():
    mod = _make("lowrank")
    x = torch.randn(3, mod.in_features)

    def f(x):
        with torch.autocast("cpu", dtype=BF16):
            return mod(x)

    y = torch.compile(f, fullgraph=True, backend="eager")(x)
    assert y.dtype == BF16
    torch.testing.assert_close(y, f(x))


def test_driver_finetune_under_cpu_autocast(monkeypatch):
    """The driver's fine-tune runs its forward under autocast (bf16 on CUDA); the same path on CPU
    through ``FASTFACTOR_CPU_AUTOCAST``: every method trains, losses finite, params stay fp32."""
    import fastfactor.compress as C
    from fastfactor.compress._tiny import tiny_data, tiny_model
    from fastfactor.train import loop

    seen = []
    real = loop._autocast

    def spy(device):
        ctx = real(device)
        seen.append(getattr(ctx, "fast_dtype", None) if getattr(ctx, "_enabled", True) else None)
        return ctx

    monkeypatch.setenv("FASTFACTOR_CPU_AUTOCAST", "bf16")
    monkeypatch.setattr(loop, "_autocast", spy)
    for method in C.available_methods():
        model = tiny_model("bert_cls", intermediate=36)
        cfg = C.CompressionConfig(method=method, ratio=0.5, schedule="all_at_once", final_steps=2, batch_size=8)
        _, rep = C.compress(model, cfg, tiny_data(labels=3))
        fac = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
        assert fac, method
        train = rep.stages[-1].train
        assert train["steps"] == 2 and torch.isfinite(torch.tensor(train["loss_last"])), (method, train)
        assert all(p.dtype == torch.float32 for p in model.parameters()), method
    assert BF16 in seen


def test_cpu_autocast_env_is_checked(monkeypatch):
    from fastfactor.train import loop

    monkeypatch.setenv("FASTFACTOR_CPU_AUTOCAST", "int3")
    with pytest.raises(ValueError, match="FASTFACTOR_CPU_AUTOCAST"):
        loop.cpu_autocast_dtype()
    monkeypatch.setenv("FASTFACTOR_CPU_AUTOCAST", "0")
    assert loop.cpu_autocast_dtype() is None
