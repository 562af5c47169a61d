"""Tier 1 (cpu): the low-rank speed-of-light changes (issue 14) under the Triton interpreter, against
float64: rank pieces (padding to a multiple of 16), deterministic split-K of the GEMM (decode path
and weight gradients), the bias gradient as its own split reduction, the cuBLAS (``torch``) path,
the cost model behind ``choose_path`` and the shape-picked deterministic configs."""

import math

import pytest
import torch
from conftest import DTYPES, assert_close_ref, check_lowrank_vs_float64

import fastfactor
from fastfactor.kernels import _config
from fastfactor.kernels import lowrank as K
from fastfactor.ops.lowrank import _lowrank_bwd, _lowrank_fwd

_dt = lambda d: str(d).split(".")[-1]


# --------------------------------------------------------------------------------------------
# rank padding: a multiple of 16, as up to three power-of-two tiles
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", list(range(1, 260, 7)) + [48, 96, 112, 192, 240, 256])
def test_rank_pieces_pad_to_a_multiple_of_16_never_beyond_a_power_of_two(r):
    pieces = K.rank_pieces(r)
    assert len(pieces) == 3
    used = [p for p in pieces if p]
    assert all(p >= 16 and p & (p - 1) == 0 for p in used)
    total = sum(pieces)
    assert r <= total <= K._pad_rank(r)
    ceil16 = -(-r // 16) * 16
    if len(used) < 3 or total == ceil16:
        assert total == ceil16 or total == K._pad_rank(r)


@pytest.mark.parametrize("r,want", [(48, (32, 16, 0)), (96, (64, 32, 0)), (192, (128, 64, 0)),
                                    (112, (64, 32, 16)), (80, (64, 16, 0)), (5, (16, 0, 0))])
def test_rank_pieces_examples(r, want):
    assert K.rank_pieces(r) == want
    assert K.padded_rank(r) == sum(want)


@pytest.mark.usefixtures("triton_cpu")
@pytest.mark.parametrize("r", [40, 100, 200], ids=lambda r: f"R{r}")  # 2 pieces, 3 pieces, 2 pieces of 128+64+16?
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_chain_with_rank_pieces_vs_float64(r, dtype, monkeypatch):
    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", "fused")
    torch.manual_seed(r)
    k, n = 23, 19
    x = torch.randn(5, 2 * k, dtype=dtype)[:, ::2]       # strided input
    u = (torch.randn(n, r) / math.sqrt(r)).to(dtype)
    v = (torch.randn(r, k) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, dtype=dtype)
    assert sum(1 for p in K.rank_pieces(r) if p) >= 2
    check_lowrank_vs_float64(x, u, v, b, dtype)


@pytest.mark.usefixtures("triton_cpu")
def test_chain_pieces_store_t_matches_reference():
    x, v, u = torch.randn(7, 13), torch.randn(100, 13), torch.randn(9, 100)
    z, t = K.chain(x, v, u, None, store_t=True)
    torch.testing.assert_close(t, x @ v.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, (x @ v.t()) @ u.t(), rtol=1e-4, atol=1e-4)


def test_chain_rejects_padded_rank_beyond_registers():
    assert K.padded_rank(256) == 256 and K.padded_rank(257) > 256
    with pytest.raises(ValueError, match="chain: rank must be <= 256"):
        K.chain(torch.randn(2, 30), torch.randn(257, 30), torch.randn(5, 257))


# --------------------------------------------------------------------------------------------
# split-K GEMM: fixed-order partial sums, no atomics
# --------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("triton_cpu")
@pytest.mark.parametrize("splits", [2, 3, 7], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gemm_split_k_vs_float64(splits, dtype, bias):
    torch.manual_seed(splits)
    a = torch.randn(37, 9, dtype=dtype).t()             # (9, 37) transposed view
    b = torch.randn(37, 2 * 13, dtype=dtype)[:, 1::2]  # (37, 13) strided
    bb = torch.randn(13, dtype=dtype) if bias else None
    c = K.gemm(a, b, bias=bb, splits=splits)
    ref = a.double() @ b.double() + (bb.double() if bias else 0)
    assert c.dtype == dtype
    assert_close_ref(c, ref, dtype, reduction=37, name="c")


@pytest.mark.usefixtures("triton_cpu")
def test_gemm_split_more_splits_than_k_steps_and_fp64():
    a = torch.randn(5, 20, dtype=torch.float64)
    b = torch.randn(20, 3, dtype=torch.float64)
    c = K.gemm(a, b, splits=6)    # 2 steps of BLOCK_K = 16: four splits are empty
    torch.testing.assert_close(c, a @ b, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("triton_cpu")
def test_gemm_split_is_chosen_when_tiles_underfill_and_is_bitwise_reproducible(monkeypatch):
    calls = []
    real = K._reduce

    def spy(ws, bias, c):
        calls.append(ws.shape[0])
        return real(ws, bias, c)

    monkeypatch.setattr(K, "_reduce", spy)
    a, b = torch.randn(6, 200), torch.randn(200, 5)    # one 16x16 tile, 13 K steps, 4 "SMs" on CPU
    c1 = K.gemm(a, b)
    c2 = K.gemm(a, b)
    assert calls and calls[0] > 1, "split-K was not used for an underfilled tile grid"
    assert torch.equal(c1, c2)
    assert_close_ref(c1, a.double() @ b.double(), torch.float32, reduction=200)


def test_split_count_fills_the_sms():
    # decode: x (16, 4096)·Vᵀ (4096, 512) on 132 SMs
    c = K.gemm_config(16, 512, 4096)
    s = K.split_count(16, 512, 4096, c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], 132)
    tiles = math.ceil(16 / c["BLOCK_M"]) * math.ceil(512 / c["BLOCK_N"])
    assert tiles * s >= 132
    assert K.split_count(4096, 4096, 4096, 128, 128, 64, 132) == 1    # enough tiles: no split
    assert K.split_count(16, 16, 16, 16, 16, 16, 132) == 1           # one K step: nothing to split


@pytest.mark.usefixtures("triton_cpu")
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_row_sums_split_vs_float64(splits):
    a = torch.randn(50, 31).t()                      # (31, 50), strided
    got = K.row_sums(a, splits=splits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), a.double().sum(1), rtol=1e-5, atol=1e-5)
    g, rs = K.gemm(a, torch.randn(50, 4), rowsum=True)
    torch.testing.assert_close(rs, a.sum(1), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# the op on every path: decode (split), long-M weight gradients (split), cuBLAS path
# --------------------------------------------------------------------------------------------

@pytest.fixture(params=["two_gemm", "torch"])
def path(request, monkeypatch):
    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", request.param)
    return request.param


# (leading dims, in, out, rank): a decode-like row count with a long K (split of x·Vᵀ), and a
# long M with few outputs (split of dU = gᵀ·t and dV = dtᵀ·x over the rows)
SHAPES = [((3,), 150, 21, 7), ((2, 71), 9, 11, 5)]


@pytest.mark.usefixtures("triton_cpu")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{math.prod(s[0])}-K{s[1]}-N{s[2]}-R{s[3]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_paths_forward_and_grads_vs_float64(path, shape, dtype):
    lead, k, n, r = shape
    torch.manual_seed(k)
    x = torch.randn(*lead, 2 * k, dtype=dtype)[..., ::2]
    u = (torch.randn(n, r) / math.sqrt(r)).to(dtype)
    v = (torch.randn(r, k) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, dtype=dtype)
    check_lowrank_vs_float64(x, u, v, b, dtype)


@pytest.mark.usefixtures("triton_cpu")
def test_fp16_intermediate_beyond_fp16_range_on_split_path(monkeypatch):
    """x·Vᵀ beyond 65504 where y is not: the split partials and the reduced t stay fp32."""
    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", "two_gemm")
    x = torch.full((2, 64), 40.0, dtype=torch.float16)
    v = torch.full((1, 64), 40.0, dtype=torch.float16)       # t = 102400 > 65504
    u = torch.full((3, 1), 1e-3, dtype=torch.float16)
    y = fastfactor.lowrank_linear(x, u, v)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), torch.full((2, 3), 102.4), rtol=2e-3, atol=0)


@pytest.mark.usefixtures("triton_cpu")
def test_gradcheck_float64_split_and_torch_paths(path):
    x = torch.randn(2, 70, dtype=torch.float64, requires_grad=True)   # K = 70: split x·Vᵀ
    u = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 70, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    # fast mode (random projections of the Jacobian): a full one is ~1000 interpreted launches
    assert torch.autograd.gradcheck(fastfactor.lowrank_linear, (x, u, v, b), fast_mode=True)


@pytest.mark.usefixtures("triton_cpu")
def test_backward_bitwise_deterministic_under_set_deterministic(path):
    x = torch.randn(90, 40, requires_grad=True)
    u = torch.randn(6, 5, requires_grad=True)
    v = torch.randn(5, 40, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    g = torch.randn(90, 6)
    runs = []
    with fastfactor.determinism.deterministic(torch_algorithms=False):
        for _ in range(2):
            for t in (x, u, v, b):
                t.grad = None
            y = fastfactor.lowrank_linear(x, u, v, b)
            y.backward(g)
            runs.append([y.detach()] + [t.grad.clone() for t in (x, u, v, b)])
    assert all(torch.equal(p, q) for p, q in zip(*runs))


@pytest.mark.usefixtures("triton_cpu")
def test_opcheck_and_compile_on_the_split_path(monkeypatch):
    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", "two_gemm")
    x = torch.randn(4, 70, requires_grad=True)
    u = torch.randn(6, 3, requires_grad=True)
    v = torch.randn(3, 70, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    torch.library.opcheck(_lowrank_fwd, (x, u, v, b, True))
    g = torch.randn(4, 6)
    t = (x @ v.t()).detach()
    torch.library.opcheck(_lowrank_bwd, (g, x.detach(), u.detach(), v.detach(), t, True, True, True, True))
    torch._dynamo.reset()
    f = torch.compile(fastfactor.lowrank_linear, fullgraph=True, backend="aot_eager", dynamic=False)
    y = f(x, u, v, b)
    torch.testing.assert_close(y, fastfactor.lowrank_linear(x, u, v, b))


# --------------------------------------------------------------------------------------------
# path choice and its cost model
# --------------------------------------------------------------------------------------------

def test_choose_path_forced_and_invalid(monkeypatch):
    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", "torch")
    assert K.choose_path(16, 64, 64, 8) == "torch"
    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", "fused")
    assert K.choose_path(16, 64, 64, 300) == "two_gemm"    # does not fit the registers
    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", "bogus")
    with pytest.raises(ValueError, match="FASTFACTOR_LOWRANK_PATH: expected one of fused, two_gemm, torch"):
        K.choose_path(16, 64, 64, 8)


@pytest.mark.parametrize("d", [4096, 8192])
def test_split_plan_reads_each_factor_once_over_enough_programs(d):
    """Ratio 0.25, M = 16: the split path's main launches have >= 132 programs and U and V come
    from DRAM once (the traffic; whether the path is chosen is the dispatcher's cost question,
    tests/lowrank/test_dispatch.py)."""
    r = d // 8
    launches = K.plan(16, d, d, r, "two_gemm")
    main = [l for l in launches if not l.name.endswith(".reduce")]
    assert all(l.programs >= 132 for l in main), [(l.name, l.programs) for l in launches]
    factors = 2 * r * d * 2
    dram = sum(l.dram_bytes for l in launches)
    assert factors <= dram <= factors * 1.2    # + the fp32 split workspace (S·M·R·4 bytes)


def test_large_m_compute_bound_calls_cublas_and_fp16_never(monkeypatch):
    monkeypatch.delenv("FASTFACTOR_LOWRANK_PATH", raising=False)
    assert K.choose_path(16384, 4096, 4096, 512, torch.bfloat16) == "torch"
    assert K.choose_path(16384, 4096, 4096, 512, torch.float16) != "torch"


def test_deterministic_configs_are_picked_per_shape(monkeypatch):
    skinny = K.gemm_config(16, 512, 4096)
    large = K.gemm_config(16384, 4096, 4096)
    assert skinny["BLOCK_M"] == 16 and large["BLOCK_M"] >= 64
    assert K.chain_config(16, 96)["BLOCK_M"] == 16 and K.chain_config(4096, 96)["BLOCK_M"] >= 64
    monkeypatch.setattr(_config, "is_interpreter", lambda: False)
    monkeypatch.setattr(K, "num_sms", lambda device: 132)    # as on an H100/H200
    a16, a4k = torch.empty(16, 4096), torch.empty(16384, 4096)
    small = K._gemm_tuned.fixed_config(dict(a_ptr=a16, M=16, N=512, K=4096)).kwargs
    big = K._gemm_tuned.fixed_config(dict(a_ptr=a4k, M=16384, N=4096, K=4096)).kwargs
    assert small["BLOCK_M"] == 16 and big["BLOCK_M"] >= 64
    ch = K._chain_tuned.fixed_config(dict(M_BUCKET=16, R0=64, R1=32, R2=0)).kwargs
    assert ch["BLOCK_M"] == 16
