"""Tier 1 (cpu): the Monarch / block-wise low-rank Triton kernels under the interpreter, against a
float64 reference (outputs and every gradient), on small odd shapes, both kernel paths."""

import pytest
import torch

from conftest import assert_close_ref, monarch_ops, monarch_ref64_grads as ref64, monarch_shape_id
from fastfactor.kernels import monarch as Mk
from fastfactor.ops.monarch import block_lowrank_linear, monarch_linear

OPS = monarch_ops()
PATHS = ["fused", "two_stage", "rows"]
# interpreter tier: fp32, fp16, and bf16 (the kernels upcast their dots under the interpreter)
KDTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (M, K, N, nblocks, rank): in != out, sizes not divisible by nblocks, rank 1 and 2+,
# a rank above the 16-wide rank chunk and an output block above the 16-wide tile (several tiles)
SHAPES = [
    (7, 13, 11, 3, 2),
    (5, 9, 17, 2, 1),
    (11, 20, 37, 2, 17),
]
SHAPE_IDS = [monarch_shape_id(s) for s in SHAPES]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", request.param)
    return request.param


def make(M, K, N, b, r, dtype, bias=True):
    s1, s2 = Mk.factor_shapes(K, N, b, r)
    # scaled so that outputs are O(1) in every dtype
    x = torch.randn(M, K)
    w1 = torch.randn(*s1) / Mk.cdiv(K, b) ** 0.5
    w2 = torch.randn(*s2) / (b * r) ** 0.5
    bb = torch.randn(N) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()
    return cast(x), cast(w1), cast(w2), cast(bb)


def run_and_check(fn, strided, x, w1, w2, bb, N, dtype):
    M, K = x.shape
    b, r = w1.shape[0], w1.shape[1] // w1.shape[0]
    y = fn(x, w1, w2, bb, out_features=N)
    assert y.dtype == dtype and y.shape == (M, N)
    g = torch.randn(M, N).to(dtype)
    leaves = [t for t in (x, w1, w2, bb) if t is not None]
    grads = torch.autograd.grad(y, leaves, g)
    y64, grads64 = ref64(x, w1, w2, bb, N, strided, g)
    red = max(K, b * r)
    assert_close_ref(y, y64, dtype, reduction=red, name="y")
    names = ["dx", "dw1", "dw2", "db"]
    for name, a, e in zip(names, grads, grads64):
        assert_close_ref(a, e, dtype, reduction=max(M, red, N), name=name)


@pytest.mark.parametrize("dtype", KDTYPES.values(), ids=KDTYPES.keys())
@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_kernels_vs_float64(triton_cpu, path, shape, op, dtype):
    M, K, N, b, r = shape
    fn, strided = OPS[op]
    x, w1, w2, bb = make(M, K, N, b, r, dtype, bias=True)
    run_and_check(fn, strided, x, w1, w2, bb, N, dtype)


@pytest.mark.parametrize("op", OPS, ids=str)
def test_kernels_no_bias(triton_cpu, path, op):
    fn, strided = OPS[op]
    x, w1, w2, _ = make(6, 13, 11, 3, 2, torch.float32, bias=False)
    run_and_check(fn, strided, x, w1, w2, None, 11, torch.float32)


@pytest.mark.parametrize("op", OPS, ids=str)
def test_kernels_noncontiguous_leading_dims(triton_cpu, path, op):
    fn, strided = OPS[op]
    M, K, N, b, r = 6, 13, 11, 3, 2
    _, w1, w2, bb = make(M, K, N, b, r, torch.float32)
    base = torch.randn(K, 2, 3 * 2).requires_grad_()
    x = base.permute(1, 2, 0)[:, ::2]                      # (2, 3, K), non-contiguous
    assert not x.is_contiguous()
    w2t = torch.randn(w2.shape[2], w2.shape[1], w2.shape[0]).permute(2, 1, 0).requires_grad_()  # strided factor
    y = fn(x, w1, w2t, bb)
    assert y.shape == (2, 3, N)
    g = torch.randn(2, 3, N)
    gx, gw1, gw2, gb = torch.autograd.grad(y, (x, w1, w2t, bb), g)
    y64, (rx, rw1, rw2, rb) = ref64(x.reshape(-1, K), w1, w2t, bb, N, strided, g.reshape(-1, N))
    assert_close_ref(y.reshape(-1, N), y64, torch.float32, reduction=K, name="y")
    assert_close_ref(gx.reshape(-1, K), rx, torch.float32, reduction=N, name="dx")
    assert_close_ref(gw1, rw1, torch.float32, reduction=N, name="dw1")
    assert_close_ref(gw2, rw2, torch.float32, reduction=K, name="dw2")
    assert_close_ref(gb, rb, torch.float32, reduction=6, name="db")


@pytest.mark.parametrize("which", ["w1", "w2", "bias", "x"])
def test_kernels_partial_gradients(triton_cpu, path, which):
    """Only one input requires grad: the backward takes its reduced paths (dh without dx, db alone)."""
    M, K, N, b, r = 5, 13, 11, 3, 2
    x, w1, w2, bb = (t.detach() for t in make(M, K, N, b, r, torch.float32))
    tensors = dict(x=x, w1=w1, w2=w2, bias=bb)
    tensors[which].requires_grad_()
    y = monarch_linear(tensors["x"], tensors["w1"], tensors["w2"], tensors["bias"])
    g = torch.randn(M, N)
    (grad,) = torch.autograd.grad(y, tensors[which], g)
    _, grads64 = ref64(x, w1, w2, bb, N, True, g)
    idx = ["x", "w1", "w2", "bias"].index(which)
    assert_close_ref(grad, grads64[idx], torch.float32, reduction=max(M, K, N), name=f"d{which}")


def test_kernels_zero_size_batch(triton_cpu, path):
    _, w1, w2, bb = make(1, 13, 11, 3, 2, torch.float32)
    x = torch.randn(0, 13, requires_grad=True)
    y = monarch_linear(x, w1, w2, bb)
    assert y.shape == (0, 11)
    y.sum().backward()
    assert x.grad.shape == (0, 13)
    assert torch.all(w1.grad == 0) and torch.all(w2.grad == 0) and torch.all(bb.grad == 0)


@pytest.mark.parametrize("op", OPS, ids=str)
def test_kernels_backward_deterministic(triton_cpu, path, op):
    """Same inputs, two backward passes: bitwise-equal gradients (no atomics on the weights)."""
    fn, _ = OPS[op]
    x, w1, w2, bb = make(21, 13, 11, 3, 2, torch.float32)
    g = torch.randn(21, 11)
    runs = [torch.autograd.grad(fn(x, w1, w2, bb), (x, w1, w2, bb), g) for _ in range(2)]
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


def test_kernels_finite_differences(triton_cpu, path):
    """The interpreted kernels' gradients against central finite differences of their own forward
    in fp32 (float64 gradcheck of the kernels is below). The loss <g, y> is linear in each single input, so the difference is exact up to rounding."""
    M, K, N, b, r = 4, 9, 7, 2, 2
    x, w1, w2, bb = make(M, K, N, b, r, torch.float32)
    g = torch.randn(M, N)
    inputs = [x, w1, w2, bb]
    loss = lambda *a: (monarch_linear(*a, out_features=N) * g).sum()
    grads = torch.autograd.grad(loss(*inputs), inputs)
    eps = 1e-2
    for i, (t, gr) in enumerate(zip(inputs, grads)):
        d = torch.randn_like(t)
        with torch.no_grad():
            plus = [u + eps * d if k == i else u for k, u in enumerate(inputs)]
            minus = [u - eps * d if k == i else u for k, u in enumerate(inputs)]
            fd = (loss(*plus) - loss(*minus)) / (2 * eps)
        an = (gr * d).sum()
        assert abs(fd.item() - an.item()) <= 2e-3 * (1 + abs(an.item())), (i, fd.item(), an.item())


@pytest.mark.parametrize("fn", [monarch_linear, block_lowrank_linear], ids=["monarch", "blocklowrank"])
def test_kernels_gradcheck_float64(triton_cpu, path, fn):
    """float64 gradcheck on the interpreted kernels themselves (their FP64 variant: float64
    operands and accumulators), odd sizes not divisible by nblocks, rank 2. ``fast_mode`` checks
    ``vᵀ·J·u`` for random ``u``, ``v`` (a wrong gradient entry fails it with probability 1) with a
    handful of interpreted launches instead of two per input element (~35 s each otherwise)."""
    M, K, N, b, r = 4, 13, 10, 3, 2
    x, w1, w2, bb = (t.detach().double().requires_grad_() for t in make(M, K, N, b, r, torch.float32))
    assert torch.autograd.gradcheck(lambda *a: fn(*a, out_features=N), (x, w1, w2, bb), fast_mode=True)


def test_kernels_inference_saves_nothing(triton_cpu):
    """Under no_grad the forward returns y only (h is not materialised)."""
    from fastfactor.ops.monarch import _monarch_fwd

    x, w1, w2, bb = (t.detach() for t in make(5, 13, 11, 3, 2, torch.float32))
    y, h = _monarch_fwd(x, w1, w2, bb, 11, True, False)
    assert h.numel() == 0
    y2, h2 = _monarch_fwd(x, w1, w2, bb, 11, True, True)
    assert torch.equal(y, y2) and h2.shape == (5, 3 * 3 * 2)


def test_choose_path_rules(monkeypatch):
    monkeypatch.delenv("FASTFACTOR_MONARCH_PATH", raising=False)
    # by predicted time (bytes and FLOPs, sol's device; tests/monarch/test_rows.py has the model)
    assert Mk.choose_path(16, 4096, 4096, 4, 1) == "rows"            # few rows, h 16 wide
    # few rows, h 256 wide: the row-block kernel only with stage 1 split over programs
    assert Mk.choose_path(16, 4096, 4096, 16, 1) == "rows"
    assert Mk._path_seconds(16, 4096, 4096, 16, 1, "rows") < Mk._path_seconds(16, 4096, 4096, 16, 1, "fused") \
        < Mk._path_seconds(16, 4096, 4096, 16, 1, "rows_unsplit")
    assert Mk.choose_path(16384, 3072, 768, 4, 48) == "two_stage"    # h 768 wide: not on chip
    assert Mk.choose_path(16384, 3072, 768, 4, 48, allow_torch=True) == "torch"  # forward: the bmm
    assert Mk.choose_path(16384, 4096, 4096, 2, 1) == "rows"         # x read once
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "bogus")
    with pytest.raises(ValueError, match="FASTFACTOR_MONARCH_PATH: expected one of rows, fused, two_stage, torch, got 'bogus'"):
        Mk.choose_path(16, 8, 8, 2, 1)
