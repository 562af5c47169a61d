"""Tier 1 (cpu): the row-block kernel with stage 1's reduction split over programs (``KSPLIT``,
few rows over a wide input): the partials of ``h`` summed in a fixed order by each tile's last
arrival (:mod:`kernels._split`), forward and ``dx``, against float64, bitwise reproducible, and the
plan (:func:`kernels.monarch.rows_ksplit_plan`) taken where the model predicts it faster."""

import pytest
import torch

from conftest import assert_close_ref, monarch_factors, monarch_ops, monarch_ref64, monarch_ref64_grads as ref64
from fastfactor.kernels import _config, monarch as Mk

OPS = monarch_ops()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


make = monarch_factors


@pytest.fixture
def spy(monkeypatch):
    """The plans `_rows` launched with (None: unsplit)."""
    plans = []
    orig = Mk.rows_ksplit

    def rec(*a, **k):
        p = orig(*a, **k)
        plans.append(p)
        return p

    monkeypatch.setattr(Mk, "rows_ksplit", rec)
    return plans


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("b,r", [(4, 1), (4, 4)], ids=["packed-b4r1", "blockwise-b4r4"])
def test_ksplit_forward_and_dx_vs_float64(triton_cpu, monkeypatch, spy, op, dtype, bias, b, r):
    """Odd sizes (nblocks 4 divides neither 203 nor 37), 19 rows (two row blocks, masked rows),
    a strided (non-contiguous) x, the split forced: 203 input features in 13 steps of 16. With
    b·r = 16 stage 1 runs block by block (input blocks of 51 features: splits start and end
    inside blocks)."""
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    monkeypatch.setenv("FASTFACTOR_MONARCH_KSPLIT", "1")
    monkeypatch.setenv("FASTFACTOR_MONARCH_FMA", "0")
    fn, strided = OPS[op]
    M, K, N = 19, 203, 37
    x, w1, w2, bb = make(M, K, N, b, r, dtype)
    xs = torch.randn(K, M).to(dtype).t().requires_grad_()      # column-major x
    with torch.no_grad():
        xs.copy_(x)
    g = torch.randn(M, N).to(dtype)
    y = fn(xs, w1, w2, bb if bias else None, out_features=N)
    grads = torch.autograd.grad(y, (xs, w1, w2), g)
    y64, grads64 = ref64(x, w1, w2, bb if bias else None, N, strided, g)
    assert_close_ref(y, y64, dtype, reduction=K, name="y")
    for name, a, e in zip(["dx", "dw1", "dw2"], grads, grads64):
        assert a.dtype == dtype
        assert_close_ref(a, e, dtype, reduction=max(M, K, N), name=name)
    launched = [p for p in spy if p is not None]
    assert launched, "the split stage 1 was not launched"
    assert any(p[3] >= 2 for p in launched)


@pytest.mark.parametrize("op", OPS, ids=str)
def test_ksplit_bitwise_reproducible_and_close_to_unsplit(triton_cpu, monkeypatch, op):
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    monkeypatch.setenv("FASTFACTOR_MONARCH_FMA", "0")
    fn, _ = OPS[op]
    M, K, N, b, r = 7, 150, 24, 2, 2
    x, w1, w2, bb = make(M, K, N, b, r, torch.float32, seed=3)
    outs = []
    for env in ("1", "1", "0"):
        monkeypatch.setenv("FASTFACTOR_MONARCH_KSPLIT", env)
        with torch.no_grad():
            outs.append(fn(x, w1, w2, bb, out_features=N))
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-5)
    assert not torch.equal(outs[0], torch.zeros_like(outs[0]))


def test_ksplit_fp64_workspace(triton_cpu, monkeypatch):
    """float64 inputs keep float64 partials (no rounding through fp32)."""
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    monkeypatch.setenv("FASTFACTOR_MONARCH_KSPLIT", "1")
    fn, strided = OPS["monarch"]
    M, K, N, b, r = 5, 97, 40, 4, 1
    x, w1, w2, bb = make(M, K, N, b, r, torch.float64, seed=5)
    with torch.no_grad():
        y = fn(x, w1, w2, bb, out_features=N)
        y64 = monarch_ref64(x, w1, w2, bb, N, strided)
    torch.testing.assert_close(y, y64, rtol=1e-12, atol=1e-12)


def test_plan_taken_where_predicted_faster():
    """3072 -> 768 at 16 tokens: the unsplit kernel has 6 programs, each reading all of x; the
    plan splits the input and is predicted faster (and under the dense GEMM's time, predicted)."""
    t, plan = Mk.rows_ksplit_plan(16, 3072, 768, 4, 1)
    assert plan is not None
    bm, bn, os_, ks, k_per = plan
    assert ks >= 2 and k_per % Mk.ROWS_KS_QUANTUM == 0 and Mk.cdiv(3072, k_per) == ks
    unsplit = Mk._path_seconds(16, 3072, 768, 4, 1, "rows_unsplit")
    assert t < unsplit
    assert Mk.rows_ksplit(16, 3072, 768, 4, 1, sms=132) == plan
    assert Mk._path_seconds(16, 3072, 768, 4, 1, "rows") == pytest.approx(min(t, unsplit))
    # many rows: the row blocks fill the GPU alone, no split is taken
    assert Mk.rows_ksplit(16384, 3072, 768, 4, 1, sms=132) is None
    # stage 1 per block (b·r >= 16, contiguous input) splits too; the batched stage 1 of Monarch's
    # dx (interleaved input, power-of-two b·r >= 16) does not
    assert Mk.rows_ksplit_ok(4, 4) and Mk.rows_ksplit_plan(16, 3072, 768, 4, 4)[1] is not None
    assert not Mk.rows_ksplit_ok(4, 4, True) and Mk.rows_ksplit_plan(16, 3072, 768, 4, 4, in_interleaved=True) == (float("inf"), None)
    assert Mk.rows_ksplit_ok(3, 8, True)   # not a power of two: the generic stage 1


def test_env_switch(monkeypatch):
    monkeypatch.setenv("FASTFACTOR_MONARCH_KSPLIT", "0")
    assert Mk.rows_ksplit(16, 3072, 768, 4, 1, sms=132) is None
    monkeypatch.setenv("FASTFACTOR_MONARCH_KSPLIT", "yes")
    with pytest.raises(ValueError, match="FASTFACTOR_MONARCH_KSPLIT"):
        Mk.rows_ksplit(16, 3072, 768, 4, 1, sms=132)


def test_sass_builds_the_gpu_variant():
    """`fastfactor sol --sass` compiles a recorded split stage 1 as a GPU runs it: the last arrival
    chosen by int32 counters (SYNC), not the interpreter's program order."""
    from fastfactor.sol.sass import gpu_build

    e = dict(constexprs=dict(KSPLIT=True, SYNC=False, HP=16), signature={"cnt_ptr": "*bf16", "a_ptr": "*bf16"})
    cx, sig = gpu_build(e)
    assert cx["SYNC"] is True and sig["cnt_ptr"] == "*i32" and sig["a_ptr"] == "*bf16"
    cx, _ = gpu_build(dict(constexprs=dict(KSPLIT=False, SYNC=False), signature={}))
    assert cx["SYNC"] is False
