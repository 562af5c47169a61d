"""Tier 1 (cpu): the row-block Monarch / block-wise low-rank kernels (``monarch.rows`` for the
forward and dx, ``monarch.wgrad`` for the weight gradients) under the interpreter, beyond what
``test_kernels.py`` runs on every path: split weight-gradient reductions against float64, bitwise
determinism, the two-bmm torch path, and the path choice (bytes and FLOPs, sol's model)."""

import pytest
import torch

from conftest import assert_close_ref, monarch_factors, monarch_ops, monarch_ref64_grads as ref64
from fastfactor.kernels import monarch as Mk

OPS = monarch_ops()


make = monarch_factors


def grads_of(fn, x, w1, w2, bb, N, g):
    y = fn(x, w1, w2, bb, out_features=N)
    return y, torch.autograd.grad(y, (x, w1, w2, bb), g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("op", OPS, ids=str)
def test_rows_split_weight_gradients_vs_float64(triton_cpu, monkeypatch, op, dtype):
    """M = 45 rows with splits of 16 (fixed-order partials summed over 3 splits), odd sizes that
    nblocks = 4 does not divide (padded features), rank 2."""
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    monkeypatch.setattr(Mk, "WGRAD_MIN_ROWS", 1)
    monkeypatch.setattr(Mk, "wgrad_split", lambda M, F, sms, **kw: (Mk.cdiv(M, 16), 16))
    fn, strided = OPS[op]
    M, K, N, b, r = 45, 30, 21, 4, 2
    x, w1, w2, bb = make(M, K, N, b, r, dtype)
    g = torch.randn(M, N).to(dtype)
    y, grads = grads_of(fn, x, w1, w2, bb, N, g)
    y64, grads64 = ref64(x, w1, w2, bb, N, strided, g)
    assert_close_ref(y, y64, dtype, reduction=K, name="y")
    for name, a, e in zip(["dx", "dw1", "dw2", "db"], grads, grads64):
        assert a.dtype == dtype
        assert_close_ref(a, e, dtype, reduction=max(M, K, N), name=name)


def test_wgrad_split_policy():
    # up to 16 x WGRAD_MIN_ROWS rows: one program per feature tile takes the whole reduction
    assert Mk.wgrad_split(4096, 4096, 132) == (1, 4096)
    s, rows = Mk.wgrad_split(16384, 4096, 132)
    assert s > 1 and s * rows >= 16384 and rows >= Mk.WGRAD_MIN_ROWS
    assert Mk.cdiv(4096, 128) * s >= 132  # the long reduction fills the SMs


@pytest.mark.parametrize("op", OPS, ids=str)
def test_rows_bitwise_deterministic(triton_cpu, monkeypatch, op):
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    monkeypatch.setattr(Mk, "wgrad_split", lambda M, F, sms, **kw: (Mk.cdiv(M, 8), 8))
    fn, _ = OPS[op]
    M, K, N, b, r = 19, 12, 16, 4, 1
    outs = []
    for _ in range(2):
        x, w1, w2, bb = make(M, K, N, b, r, torch.float32, seed=3)
        g = torch.randn(M, N, generator=torch.Generator().manual_seed(4))
        y, grads = grads_of(fn, x, w1, w2, bb, N, g)
        outs.append([y.detach(), *grads])
    for a, c in zip(*outs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("op", OPS, ids=str)
def test_rows_gradcheck_float64(triton_cpu, monkeypatch, op):
    """float64 gradcheck through the interpreted row-block kernels (FP64 variant), splits on."""
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    monkeypatch.setattr(Mk, "wgrad_split", lambda M, F, sms, **kw: (Mk.cdiv(M, 4), 4))
    fn, _ = OPS[op]
    M, K, N, b, r = 7, 10, 9, 2, 2
    x, w1, w2, bb = make(M, K, N, b, r, torch.float64, seed=5)
    assert torch.autograd.gradcheck(lambda *a: fn(*a, out_features=N), (x, w1, w2, bb), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("op", OPS, ids=str)
def test_torch_path_forward_vs_float64(triton_cpu, monkeypatch, op, dtype):
    """The two-bmm path the dispatcher may choose for the forward (fp16 keeps h in fp32); the
    backward then runs the two-stage kernels."""
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "torch")
    fn, strided = OPS[op]
    M, K, N, b, r = 6, 13, 11, 3, 2
    x, w1, w2, bb = make(M, K, N, b, r, dtype)
    g = torch.randn(M, N).to(dtype)
    y, grads = grads_of(fn, x, w1, w2, bb, N, g)
    y64, grads64 = ref64(x, w1, w2, bb, N, strided, g)
    assert_close_ref(y, y64, dtype, reduction=K, name="y")
    for name, a, e in zip(["dx", "dw1", "dw2", "db"], grads, grads64):
        assert_close_ref(a, e, dtype, reduction=max(M, K, N), name=name)


def test_choose_path_counts_bytes_and_flops(monkeypatch):
    monkeypatch.delenv("FASTFACTOR_MONARCH_PATH", raising=False)
    # memory-bound Monarch (rank 1, 4 and 8 blocks): x read once, h on chip
    assert Mk.choose_path(16384, 4096, 4096, 4, 1) == "rows"
    assert Mk.choose_path(4096, 4096, 4096, 8, 1, save_h=True) == "rows"
    # b = 16 at rank 1 (h 256 wide, stage 1 unpadded block by block): still the row-block kernel
    assert Mk.choose_path(16384, 4096, 4096, 16, 1) == "rows"
    # h too wide for the row-block kernel (b·b·r > 256): another path
    assert Mk.choose_path(16384, 4096, 4096, 16, 2) != "rows"
    # the choice is the argmin of the predicted times, the two-bmm path included (forward)
    for shape in [(16384, 4096, 4096, 4, 256), (16, 4096, 4096, 16, 1), (4096, 768, 3072, 2, 1)]:
        p = Mk.choose_path(*shape, allow_torch=True)
        assert all(Mk._path_seconds(*shape, p) <= Mk._path_seconds(*shape, q) for q in Mk.PATHS
                   if q != "rows" or Mk.rows_supported(*shape[3:]))
    for p in Mk.PATHS:
        t = Mk._path_seconds(16384, 4096, 4096, 4, 1, p)
        assert t > 0
    # the rows path moves x and y once: at least as fast as every other path here
    t_rows = Mk._path_seconds(16384, 4096, 4096, 4, 1, "rows")
    assert all(t_rows <= Mk._path_seconds(16384, 4096, 4096, 4, 1, p) for p in Mk.PATHS)


def test_choose_path_forced(monkeypatch):
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    assert Mk.choose_path(64, 64, 64, 4, 1) == "rows"
    assert Mk.choose_path(64, 64, 64, 32, 1) == "fused"      # h does not fit: falls back
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "torch")
    assert Mk.choose_path(64, 64, 64, 4, 1, allow_torch=True) == "torch"
    assert Mk.choose_path(64, 64, 64, 4, 1) == "two_stage"   # backward: no torch path
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "sideways")
    with pytest.raises(ValueError, match="FASTFACTOR_MONARCH_PATH: expected one of"):
        Mk.choose_path(64, 64, 64, 4, 1)


def test_rows_width():
    assert Mk.rows_width(4, 1) == 16 and Mk.rows_width(2, 1) == 16 and Mk.rows_width(8, 1) == 64
    assert Mk.rows_width(3, 2) == 32 and Mk.rows_width(16, 1) == 256
    assert Mk.rows_supported(16, 1) and not Mk.rows_supported(16, 2) and not Mk.rows_supported(4, 32)


@pytest.mark.parametrize("shape", [(21, 30, 37, 4, 1), (9, 16, 12, 2, 2)], ids=["b4r1", "b2r2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_rows_fma_forward_vs_float64(triton_cpu, monkeypatch, shape, dtype):
    """The FMA formulation of the Monarch forward (``FASTFACTOR_MONARCH_FMA=1``): only the useful
    multiply-adds, no tensor-core padding."""
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    monkeypatch.setenv("FASTFACTOR_MONARCH_FMA", "1")
    M, K, N, b, r = shape
    assert Mk.rows_fma(b, r)
    fn, strided = OPS["monarch"]
    x, w1, w2, bb = make(M, K, N, b, r, dtype)
    g = torch.randn(M, N).to(dtype)
    y, grads = grads_of(fn, x, w1, w2, bb, N, g)
    y64, grads64 = ref64(x, w1, w2, bb, N, strided, g)
    assert_close_ref(y, y64, dtype, reduction=K, name="y")
    for name, a, e in zip(["dx", "dw1", "dw2", "db"], grads, grads64):
        assert_close_ref(a, e, dtype, reduction=max(M, K, N), name=name)


def test_rows_fma_gradcheck_float64(triton_cpu, monkeypatch):
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    monkeypatch.setenv("FASTFACTOR_MONARCH_FMA", "1")
    fn, _ = OPS["monarch"]
    x, w1, w2, bb = make(5, 8, 7, 2, 1, torch.float64, seed=7)
    assert torch.autograd.gradcheck(lambda *a: fn(*a, out_features=7), (x, w1, w2, bb), fast_mode=True)


def test_rows_fma_off_by_default(monkeypatch):
    monkeypatch.delenv("FASTFACTOR_MONARCH_FMA", raising=False)
    assert not Mk.rows_fma(4, 1)
    monkeypatch.setenv("FASTFACTOR_MONARCH_FMA", "1")
    assert Mk.rows_fma(4, 1) and not Mk.rows_fma(3, 1) and not Mk.rows_fma(16, 1)
    assert not Mk.rows_fma(4, 1, in_interleaved=True, out_interleaved=False)


@pytest.mark.parametrize("shape", [(9, 70, 50, 16, 1), (6, 30, 21, 4, 4), (5, 27, 33, 3, 6)],
                         ids=["b16r1", "b4r4", "b3r6"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("op", OPS, ids=str)
def test_rows_blockwise_stage1_vs_float64(triton_cpu, monkeypatch, op, dtype, shape):
    """b·r >= 16: stage 1 one unpadded product per input block, placed into h by an exact 0/1
    product (h up to 256 columns per row: b = 16, rank 1); the contiguous-block weight gradients
    block by block (unpadded), over split row ranges; for power-of-two b and r the interleaved
    (Monarch) sides as batched products over the blocks: the forward's stage 2, dx's stage 1 and
    dw2 (b3r6 takes the packed fallbacks)."""
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    monkeypatch.setattr(Mk, "wgrad_split", lambda M, F, sms, **kw: (Mk.cdiv(M, 4), 4))
    M, K, N, b, r = shape
    assert Mk.rows_supported(b, r)
    fn, strided = OPS[op]
    x, w1, w2, bb = make(M, K, N, b, r, dtype)
    g = torch.randn(M, N).to(dtype)
    y, grads = grads_of(fn, x, w1, w2, bb, N, g)
    y64, grads64 = ref64(x, w1, w2, bb, N, strided, g)
    assert_close_ref(y, y64, dtype, reduction=K, name="y")
    for name, a, e in zip(["dx", "dw1", "dw2", "db"], grads, grads64):
        assert_close_ref(a, e, dtype, reduction=max(M, K, N), name=name)


def test_rows_opcheck_and_compile_fullgraph(triton_cpu, monkeypatch):
    """The custom ops on the row-block path: fake/real agreement (opcheck) and one graph under
    torch.compile (eager backend: the interpreter tier has no inductor GPU codegen)."""
    from fastfactor.ops.monarch import _monarch_bwd, _monarch_fwd, monarch_linear

    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    x, w1, w2, bb = (t.detach() for t in make(5, 20, 24, 4, 1, torch.float32))
    torch.library.opcheck(_monarch_fwd, (x, w1, w2, bb, 24, True, True))
    torch.library.opcheck(_monarch_fwd, (x, w1, w2, None, 24, False, False))
    _, h = _monarch_fwd(x, w1, w2, bb, 24, True, True)
    torch.library.opcheck(_monarch_bwd, (torch.randn(5, 24), x, w1, w2, h, True, True, True, True, True))
    f = torch.compile(lambda *a: monarch_linear(*a).square().sum(), fullgraph=True, backend="eager")
    xx = x.clone().requires_grad_()
    f(xx, w1, w2, bb).backward()
    assert xx.grad.shape == x.shape and torch.isfinite(xx.grad).all()
