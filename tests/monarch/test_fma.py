"""The FMA build of the row-block Monarch forward (``rows_fma``): the useful multiply-adds only,
no tensor-core padding (rank-1 blocks), taken where its predicted time, instruction issue
included, is at most the tensor-core build's. Correctness under the interpreter against float64,
the dispatch rule, the per-instruction model against the compiled sm_90 loops (**predicted, not
measured**), and the sol issue term that counts every compiled loop at its trip count."""

import pytest
import torch

from conftest import assert_close_ref, monarch_ops, monarch_ref64_grads as ref64
from fastfactor.kernels import _config
from fastfactor.kernels import monarch as Mk

OPS = monarch_ops()


def make(M, K, N, b, r, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    s1, s2 = Mk.factor_shapes(K, N, b, r)
    x = torch.randn(M, K, generator=g)
    w1 = torch.randn(*s1, generator=g) / Mk.cdiv(K, b) ** 0.5
    w2 = torch.randn(*s2, generator=g) / (b * r) ** 0.5
    bb = torch.randn(N, generator=g) if bias else None
    return [t.to(dtype).requires_grad_() if t is not None else None for t in (x, w1, w2, bb)]


# b·r = 1 .. 8 with power-of-two b and r; odd M, K, N that b does not divide
SHAPES = [(19, 30, 37, 8, 1), (7, 21, 18, 4, 2), (13, 45, 40, 2, 1), (5, 12, 9, 2, 4), (6, 10, 7, 1, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}-b{}-r{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fma_forward_and_training_vs_float64(triton_cpu, monkeypatch, shape, dtype, bias):
    """Forced FMA build, forward (h saved for the backward) and every gradient against float64."""
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    monkeypatch.setenv("FASTFACTOR_MONARCH_FMA", "1")
    M, K, N, b, r = shape
    assert Mk.rows_fma(b, r)
    fn, strided = OPS["monarch"]
    x, w1, w2, bb = make(M, K, N, b, r, dtype, bias=bias)
    g = torch.randn(M, N).to(dtype)
    y = fn(x, w1, w2, bb, out_features=N)
    leaves = [t for t in (x, w1, w2, bb) if t is not None]
    grads = torch.autograd.grad(y, leaves, g)
    y64, grads64 = ref64(x, w1, w2, bb, N, strided, g)
    assert_close_ref(y, y64, dtype, reduction=K, name="y")
    for a, e in zip(grads, grads64):
        assert a.dtype == dtype
        assert_close_ref(a, e, dtype, reduction=max(M, K, N), name="grad")


def test_fma_inference_matches_training_forward(triton_cpu, monkeypatch):
    """The FMA build without h stored gives the same y, bit for bit, as with it."""
    from fastfactor.ops.monarch import _monarch_fwd

    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    monkeypatch.setenv("FASTFACTOR_MONARCH_FMA", "1")
    x, w1, w2, bb = (t.detach() for t in make(11, 24, 20, 4, 1, torch.float32))
    y, h = _monarch_fwd(x, w1, w2, bb, 20, True, False)
    y2, h2 = _monarch_fwd(x, w1, w2, bb, 20, True, True)
    assert h.numel() == 0 and h2.shape == (11, 16)
    assert torch.equal(y, y2)
    # h as the reference saves it ([m, l, j, t], rounded like the kernels)
    _, href = Mk.monarch_bmm(x, w1, w2, bb, 20, True, acc_dtype=torch.float32, return_h=True)
    torch.testing.assert_close(h2, href, rtol=1e-5, atol=1e-5)


def test_fma_against_tensor_core_build(triton_cpu, monkeypatch):
    """The two builds of the same forward agree (fp32, both within rounding of each other)."""
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    fn, _ = OPS["monarch"]
    x, w1, w2, bb = (t.detach() for t in make(17, 40, 36, 4, 1, torch.float32))
    monkeypatch.setenv("FASTFACTOR_MONARCH_FMA", "0")
    y_mma = fn(x, w1, w2, bb, out_features=36)
    monkeypatch.setenv("FASTFACTOR_MONARCH_FMA", "1")
    y_fma = fn(x, w1, w2, bb, out_features=36)
    torch.testing.assert_close(y_fma, y_mma, rtol=1e-4, atol=1e-4)


def test_fma_dispatch_rule(monkeypatch):
    monkeypatch.delenv("FASTFACTOR_MONARCH_FMA", raising=False)
    # no shape: off; the shapes of the perf tier: on where the FMA build is predicted at least as fast
    assert not Mk.rows_fma(4, 1)
    for b, M in ((4, 16384), (4, 4096), (2, 16384), (8, 16), (4, 16), (8, 16384)):
        t = lambda p: Mk._path_seconds(M, 4096, 4096, b, 1, p, 2, 2, False, True)
        assert Mk.rows_fma(b, 1, M=M, K=4096, N=4096) == (t("rows_fma") <= t("rows_mma"))
    assert Mk.rows_fma(4, 1, M=16384, K=4096, N=4096)          # memory-bound: the issue fits under it
    assert not Mk.rows_fma(8, 1, M=16384, K=4096, N=4096)      # b·r = 8: issue-bound, slower
    # the row path's time is the faster of its two builds
    t = lambda p: Mk._path_seconds(16384, 4096, 4096, 4, 1, p)
    assert t("rows") == min(t("rows_fma"), t("rows_mma"))
    # only the Monarch forward (contiguous input, interleaved output), power-of-two b and r, b·r <= 8
    assert not Mk.rows_fma(3, 1, M=16384, K=4096, N=4096)
    assert not Mk.rows_fma(16, 1, M=16384, K=4096, N=4096)
    assert not Mk.rows_fma(4, 1, in_interleaved=True, out_interleaved=False, M=16384, K=4096, N=4096)
    monkeypatch.setenv("FASTFACTOR_MONARCH_FMA", "0")
    assert not Mk.rows_fma(4, 1, M=16384, K=4096, N=4096)
    monkeypatch.setenv("FASTFACTOR_MONARCH_FMA", "1")
    assert Mk.rows_fma(8, 1, M=16384, K=4096, N=4096)


def test_fma_issue_model_shape():
    w, trips = Mk.rows_fma_warp_instructions(4, 1, 1024, 4096, 16, 128, 128, 4)
    assert trips == [4, 8, 32]
    # twice the input blocks' length: about twice the stage-1 instructions
    w2, _ = Mk.rows_fma_warp_instructions(4, 1, 2048, 4096, 16, 128, 128, 4)
    assert 1.3 * w < w2 < 2 * w
    # the output tiles shared by two programs of a row block: about half the stage-2 share each
    w3, t3 = Mk.rows_fma_warp_instructions(4, 1, 1024, 4096, 16, 128, 128, 4, split=2)
    assert t3 == [4, 8, 16] and w3 < w
    from fastfactor.kernels import _cost

    im = _cost.ISSUE_MODELS["monarch.rows"]
    ints = dict(NB=4, R=1, CB=1024, F_OUT=4096)
    cfg = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4)
    assert im(ints, dict(FMA=False), cfg, (1024, 1, 1)) is None
    assert im(ints, dict(FMA=True), cfg, (1024, 1, 1)) == (w, trips)


def test_nested_loop_instructions():
    from fastfactor.sol import model as SM
    from fastfactor.sol import sass as S

    text = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/                   FFMA R3, R4, R5, R3 ;
        /*0030*/              @P0 BRA 0x20 ;
        /*0040*/                   SHFL.BFLY PT, R6, R3, 0x1, 0x1f ;
        /*0050*/              @P1 BRA 0x10 ;
        /*0060*/                   FFMA R7, R8, R9, R7 ;
        /*0070*/              @P2 BRA 0x60 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
    """
    f = S.loop_split(text)
    # outer 0x10..0x50 (own: 0x10, 0x40, 0x50), inner 0x20..0x30, last 0x60..0x70
    assert f["loops"] == [[0x10, 0x50, 3], [0x20, 0x30, 2], [0x60, 0x70, 2]]
    # outside: 0x00, 0x80 -> 2; outer x3, inner 3 x 5, last x 7
    assert SM.nested_loop_instructions(f, [3, 5, 7]) == 2 + 3 * 3 + 2 * 15 + 2 * 7
    assert SM.nested_loop_instructions(f, [3, 5]) is None


@pytest.mark.skipif(not _config.is_interpreter(), reason="counting needs TRITON_INTERPRET=1")
def test_fma_issue_model_against_compiled_sass():
    """sol's row of the perf tier (4096², M = 16384, b = 4): the FMA build is chosen, issues no
    tensor-core FLOPs, and the stated per-instruction model is within -10 % / +35 % of the count of
    its compiled sm_90 loops at their trip counts; both are under the DRAM time (memory-bound)."""
    from fastfactor.sol import budgets
    from fastfactor.sol.device import H200
    from fastfactor.sol.rows import RowSpec, evaluate_row

    row = evaluate_row(RowSpec("monarch", 4096, 4096, 16384, 4, "fwd"), H200)
    (e,) = row["detail"]
    assert e["constexprs"]["FMA"] and e["dot_flops"] == 0 and row["flops_ratio"] == 0
    model_w = e["issue"]["warp_instructions"]
    assert e["terms"]["issue"] < e["terms"]["dram"]
    budgets.attach_sass(row)
    from fastfactor.sol import model as SM

    it = SM.issue_term(e, e["sass"], H200)
    assert isinstance(it["trips"], list), it
    assert 0.9 * it["warp_instructions"] <= model_w <= 1.35 * it["warp_instructions"], (model_w, it)
    assert it["seconds"] < e["terms"]["dram"]
