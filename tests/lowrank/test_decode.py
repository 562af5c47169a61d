"""Tier 1 (cpu): the single-launch decode kernels (``kernels/lowrank.py``: ``decode`` /
``_decode_kernel`` for the forward, ``decode_bwd`` / ``_decode_bwd_kernel`` for the backward) under the Triton interpreter, against float64: odd shapes, strides, every dtype,
one to three rank pieces, both role modes (ticket + counters as on a GPU, program id as in the
interpreter), the saved intermediate, gradcheck, bitwise determinism, opcheck / torch.compile, the
exact counts of ``fastfactor sol`` (each factor read once) and its predicted speed."""

import math

import pytest
import torch
from conftest import DTYPES, assert_close_ref, check_lowrank_vs_float64, lowrank_ref64

import fastfactor
from fastfactor.kernels import _config
from fastfactor.kernels import lowrank as K
from fastfactor.ops.lowrank import _lowrank_fwd

_dt = lambda d: str(d).split(".")[-1]

# (rows, in, out, rank): one, two and three rank pieces (16; 48 = 32 + 16; 112 = 64 + 32 + 16),
# K not a multiple of BLOCK_K, a single row, a full 64-row tile
SHAPES = [(5, 70, 33, 9), (16, 300, 129, 40), (1, 64, 64, 16), (64, 100, 50, 100), (3, 515, 17, 112)]
_id = lambda s: "M{}-K{}-N{}-R{}".format(*s)


@pytest.fixture
def interp():
    if not _config.is_interpreter():
        pytest.skip("TRITON_INTERPRET is not set: the interpreter tier does not run")


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("sync", [False, True], ids=["by-id", "by-ticket"])
def test_decode_vs_float64(shape, dtype, sync):
    M, k, n, r = shape
    torch.manual_seed(M + k + r)
    x = torch.randn(M, 2 * k, dtype=dtype)[:, 1::2]                # non-contiguous rows
    u = (torch.randn(r, n) / math.sqrt(r)).to(dtype).t()           # (n, r) transposed view
    v = (torch.randn(r, k) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, dtype=dtype)
    y, t = K.decode(x, v, u, b, save_t=True, sync=sync)
    assert y.dtype == dtype and y.shape == (M, n)
    assert t.dtype == K.intermediate_dtype(dtype) and t.shape == (M, r)
    assert_close_ref(y, lowrank_ref64(x, u, v, b), dtype, reduction=k, name="y")
    assert_close_ref(t, x.double() @ v.double().t(), dtype, reduction=k, name="t")
    if sync:
        assert K._counters(x.device).tolist() == [0, 0, 0, 0]      # the last program reset them


@pytest.mark.usefixtures("interp")
def test_decode_by_ticket_and_by_id_are_bitwise_equal_and_reproducible():
    """The same roles, the same fixed order of the partial sums: the same bits, run after run."""
    x = torch.randn(7, 333)
    v = torch.randn(40, 333) / 18
    u = torch.randn(90, 40) / 6
    runs = [K.decode(x, v, u, None, True, sync=s) for s in (False, True, True)]
    for y, t in runs[1:]:
        assert torch.equal(y, runs[0][0]) and torch.equal(t, runs[0][1])


@pytest.mark.usefixtures("interp")
def test_decode_without_bias_and_fp16_intermediate_beyond_range():
    x = torch.full((2, 64), 40.0, dtype=torch.float16)
    v = torch.full((1, 64), 40.0, dtype=torch.float16)       # t = 102400 > 65504: kept in fp32
    u = torch.full((3, 1), 1e-3, dtype=torch.float16)
    y, t = K.decode(x, v, u, None, save_t=True)
    assert t.dtype == torch.float32 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), torch.full((2, 3), 102.4), rtol=2e-3, atol=0)


NEEDS = [(True, True, True, True), (False, True, True, False), (True, False, False, True), (True, True, False, False)]


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[3:], ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("sync", [False, True], ids=["by-id", "by-ticket"])
def test_decode_bwd_vs_float64(shape, dtype, sync):
    M, k, n, r = shape
    torch.manual_seed(M * k + r)
    x = torch.randn(M, 2 * k, dtype=dtype)[:, ::2]
    v = (torch.randn(r, k) / math.sqrt(k)).to(dtype)
    u = (torch.randn(r, n) / math.sqrt(r)).to(dtype).t()
    g = torch.randn(n, M, dtype=dtype).t()                          # transposed upstream gradient
    t = (x.double() @ v.double().t()).to(K.intermediate_dtype(dtype))
    for need_x, need_u, need_v, bias in NEEDS:
        dx, du, dv, db = K.decode_bwd(g, x, u, v, t, bias, need_x, need_u, need_v, sync=sync)
        dt = g.double() @ u.double()
        want = dict(dx=dt @ v.double() if need_x else None, du=g.double().t() @ t.double() if need_u else None,
                    dv=dt.t() @ x.double() if need_v else None, db=g.double().sum(0) if bias else None)
        for name, got, red in (("dx", dx, max(n, r)), ("du", du, M), ("dv", dv, max(M, n)), ("db", db, M)):
            if want[name] is None:
                assert got is None, name
            else:
                assert got.dtype == dtype, name
                assert_close_ref(got, want[name], dtype, reduction=red, name=name)
    if sync:
        assert K._counters(x.device).tolist() == [0, 0, 0, 0]


@pytest.mark.usefixtures("interp")
def test_decode_bwd_by_ticket_and_by_id_bitwise_equal():
    x, v, u, g = torch.randn(7, 200), torch.randn(40, 200) / 14, torch.randn(90, 40) / 6, torch.randn(7, 90)
    t = x @ v.t()
    a = K.decode_bwd(g, x, u, v, t, True, sync=False)
    for _ in range(2):
        b = K.decode_bwd(g, x, u, v, t, True, sync=True)
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_decode_tiles_limits_and_padding():
    assert K.decode_tiles(65, 4096, 4096, 512) is None          # more rows than one tile
    assert K.decode_tiles(16, 4096, 4096, 1024) is None         # accumulator beyond DECODE_MAX_ACC
    assert K.decode_tiles(64, 4096, 4096, 256) is None
    t = K.decode_tiles(16, 4096, 4096, 512)
    assert (t["R_PAD"], t["N0"] * t["KC"] >= 4096, t["N0"] <= K.DECODE_PRODUCERS) == (512, True, True)
    t = K.decode_tiles(3, 515, 17, 112)
    assert (t["R0"], t["R1"], t["R2"]) == (64, 32, 16)           # a multiple of 16, not 128
    assert (t["N0"] - 1) * t["KC"] < 515 <= t["N0"] * t["KC"]     # every producer has columns
    with pytest.raises(ValueError, match="decode: expected 1 <= M <= 64"):
        K.decode(torch.randn(65, 8), torch.randn(4, 8), torch.randn(8, 4))
    assert K.decode_bwd_tiles(16, 4096, 4096, 512)["N2"] * K.decode_bwd_tiles(16, 4096, 4096, 512)["BLOCK_K"] >= 4096
    assert K.decode_bwd_tiles(16, 4096, 4096, 1024) is None
    with pytest.raises(ValueError, match="decode_bwd: expected"):
        K.decode_bwd(torch.randn(2, 8), torch.randn(2, 8), torch.randn(8, 4), torch.randn(4, 8), None, False)


@pytest.fixture
def decode_path(monkeypatch):
    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", "decode")


@pytest.mark.usefixtures("triton_cpu", "decode_path")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_op_on_decode_path_forward_and_grads_vs_float64(dtype):
    """The forward on the decode kernel (t saved by its reducers), the backward on our GEMMs."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 2 * 150, dtype=dtype)[..., ::2]
    u = (torch.randn(21, 7) / math.sqrt(7)).to(dtype)
    v = (torch.randn(7, 150) / math.sqrt(150)).to(dtype)
    b = torch.randn(21, dtype=dtype)
    assert K.choose_path(6, 150, 21, 7, dtype) == "decode"
    assert K.choose_bwd_path(6, 150, 21, 7, dtype) == "decode"
    assert K.choose_bwd_path(6, 150, 21, 7, dtype, t_saved=False) == "decode"   # forced; falls back inside
    check_lowrank_vs_float64(x, u, v, b, dtype)


@pytest.mark.usefixtures("triton_cpu", "decode_path")
def test_gradcheck_float64_decode_path():
    x = torch.randn(3, 70, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 70, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fastfactor.lowrank_linear, (x, u, v, b), fast_mode=True)


@pytest.mark.usefixtures("triton_cpu", "decode_path")
def test_opcheck_and_compile_on_the_decode_path():
    x = torch.randn(4, 70, requires_grad=True)
    u = torch.randn(6, 3, requires_grad=True)
    v = torch.randn(3, 70, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    torch.library.opcheck(_lowrank_fwd, (x, u, v, b, True))
    torch.library.opcheck(_lowrank_fwd, (x, u, v, None, False))
    torch._dynamo.reset()
    f = torch.compile(fastfactor.lowrank_linear, fullgraph=True, backend="aot_eager", dynamic=False)
    y = f(x, u, v, b)
    torch.testing.assert_close(y, fastfactor.lowrank_linear(x, u, v, b))
    y.sum().backward()
    assert x.grad is not None and u.grad is not None and v.grad is not None and b.grad is not None


@pytest.mark.usefixtures("triton_cpu", "decode_path")
def test_decode_path_bitwise_deterministic_under_set_deterministic():
    x = torch.randn(9, 130)
    u = torch.randn(20, 40)
    v = torch.randn(40, 130)
    with fastfactor.determinism.deterministic(torch_algorithms=False):
        a = fastfactor.lowrank_linear(x, u, v)
        c = fastfactor.lowrank_linear(x, u, v)
    assert torch.equal(a, c)


# --------------------------------------------------------------------------------------------
# what the launch moves and what the model predicts (exact interpreter counts, H200 model)
# --------------------------------------------------------------------------------------------

@pytest.mark.perf
@pytest.mark.usefixtures("interp")
def test_counts_full_and_scaled_agree_and_each_factor_is_read_once():
    """``fastfactor sol`` counts the three roles as classes of programs (``ROLE_MAPS``): the
    scaled count equals the full one, and x, V, U are each loaded exactly once."""
    from fastfactor.sol import count as C
    from fastfactor.sol import record as R

    M, k, n, r = 5, 300, 70, 40
    x, v, u, b = torch.empty(M, k), torch.empty(r, k), torch.empty(n, r), torch.empty(n)
    g, t = torch.empty(M, n), torch.empty(M, r)
    with R.recording(sms=132) as rec:
        K.lowrank_fwd(x, u, v, b, False, path="decode")
        K.lowrank_bwd(g, x, u, v, t, True, path="decode")
    assert [l.kernel for l in rec.launches] == ["lowrank.decode", "lowrank.decode_bwd"]
    for launch in rec.launches:
        cfg = launch.fixed
        full, scaled = C.count_launch(launch, cfg, "full"), C.count_launch(launch, cfg, "scaled")
        for name, tc in full.tensors.items():
            assert scaled.tensors[name].load_bytes == pytest.approx(tc.load_bytes), name
            assert scaled.tensors[name].store_bytes == pytest.approx(tc.store_bytes), name
        assert scaled.dot_flops == pytest.approx(full.dot_flops)
        for name, size in (("x_ptr", x), ("v_ptr", v), ("u_ptr", u)):
            assert full.tensors[name].load_bytes == size.numel() * 4, (launch.kernel, name)
            assert full.tensors[name].unique_bytes == size.numel() * 4, (launch.kernel, name)
        if launch.kernel == "lowrank.decode_bwd":   # each gradient written once
            for name, size in (("dx_ptr", x), ("du_ptr", u), ("dv_ptr", v)):
                assert full.tensors[name].store_bytes == size.numel() * 4, name


@pytest.mark.perf
@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("d", [4096])
def test_decode_row_predicted_2x_dense_reading_each_factor_once(d, monkeypatch):
    """Ratio 0.25, M = 16: the op makes one launch of at least 132 programs, each factor read once,
    and ``fastfactor sol`` predicts it at least 2x dense ``F.linear`` and faster than the unfused
    two matmuls (**predicted, not measured**)."""
    from fastfactor.sol.device import H200
    from fastfactor.sol.rows import RowSpec, evaluate_row

    monkeypatch.delenv("FASTFACTOR_LOWRANK_PATH", raising=False)
    row = evaluate_row(RowSpec("lowrank", d, d, 16, 0.25, "fwd"), H200)
    (e,) = row["detail"]
    assert row["kernels"] == "decode" and e["programs"] >= 132
    for name in ("x_ptr", "v_ptr", "u_ptr"):
        assert e["tensors"][name]["reread"] == pytest.approx(1.0)
    assert row["speedup_vs_dense"] >= 2.0 and row["speedup_vs_unfused"] > 1.0
    assert row["predicted_ms"] / 1e3 == pytest.approx(K.predicted_seconds(16, d, d, d // 8, "decode", 2, H200),
                                                      rel=0.05)
    # forward + backward: two launches in all, U and V each read once by each
    row = evaluate_row(RowSpec("lowrank", d, d, 16, 0.25, "fwd+bwd"), H200)
    assert row["kernels"] == "decode,decode_bwd"
    for e in row["detail"]:
        for name in ("v_ptr", "u_ptr"):
            assert e["tensors"][name]["reread"] == pytest.approx(1.0), (e["kernel"], name)
    bwd = sum(l.seconds(H200) for l in K.plan_bwd(16, d, d, d // 8, "decode", 2, True, dev=H200))
    assert row["predicted_ms"] / 1e3 == pytest.approx(
        K.predicted_seconds(16, d, d, d // 8, "decode", 2, H200) + bwd, rel=0.05)
    assert row["speedup_vs_unfused"] >= 1.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("M,d,r", [(1, 4096, 512), (16, 4096, 512), (64, 768, 96), (13, 3071, 300)])
def test_gpu_decode_repeated_launches_and_cuda_graph(dtype, M, d, r):
    """On a GPU (roles by ticket, waits on counters): many launches in a row and CUDA-graph replays
    all match float64, bitwise the same every time, and leave the counters at zero."""
    x = torch.randn(M, d, device="cuda", dtype=dtype)
    v = (torch.randn(r, d, device="cuda") / math.sqrt(d)).to(dtype)
    u = (torch.randn(d, r, device="cuda") / math.sqrt(r)).to(dtype)
    b = torch.randn(d, device="cuda", dtype=dtype)
    y0, _ = K.decode(x, v, u, b)
    assert_close_ref(y0, lowrank_ref64(x, u, v, b), dtype, reduction=d)
    for _ in range(200):
        y, _ = K.decode(x, v, u, b)
        assert torch.equal(y, y0)
    torch.cuda.synchronize()
    assert K._counters(x.device).tolist() == [0, 0, 0, 0]
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        K.decode(x, v, u, b)                 # warm up (and the counters of this stream) outside capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            yg, _ = K.decode(x, v, u, b)
    for _ in range(20):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(yg, y0)
    # the backward kernel: float64, bitwise repeatable
    gy = torch.randn(M, d, device="cuda", dtype=dtype)
    t = (x.double() @ v.double().t()).to(K.intermediate_dtype(dtype))
    first = K.decode_bwd(gy, x, u, v, t, True)
    dt = gy.double() @ u.double()
    for got, want, red in zip(first, (dt @ v.double(), gy.double().t() @ t.double(), dt.t() @ x.double(),
                                      gy.double().sum(0)), (d, M, d, M)):
        assert_close_ref(got, want, dtype, reduction=red)
    for _ in range(50):
        assert all(torch.equal(a, b) for a, b in zip(first, K.decode_bwd(gy, x, u, v, t, True)))
    torch.cuda.synchronize()
    assert K._counters(x.device).tolist() == [0, 0, 0, 0]


def test_decode_tile_plan_never_predicted_slower_than_the_widest():
    """The decode tiles are the widest unless narrower ones are predicted >= 1 % faster (small
    layers: more, smaller programs); large layers keep the widest; every plan covers K and N."""
    dev = K.COST_DEVICE
    for M, k, n, r in ((16, 768, 768, 192), (16, 768, 768, 96), (16, 768, 768, 48), (64, 768, 3072, 64),
                       (16, 4096, 4096, 512), (16, 4096, 4096, 256), (1, 3072, 768, 128), (3, 515, 17, 112)):
        t = K.decode_tiles(M, k, n, r)
        rp = t["R_PAD"]
        fit = 1 << ((16384 // rp).bit_length() - 1)
        assert t["BLOCK_K"] <= max(16, min(128, fit)) and t["BLOCK_N"] <= max(16, min(64, fit))
        assert (t["N0"] - 1) * t["KC"] < k <= t["N0"] * t["KC"] and t["N0"] <= K.DECODE_PRODUCERS
        assert (t["N2"] - 1) * t["BLOCK_N"] < n <= t["N2"] * t["BLOCK_N"] and t["N1"] == -(-r // 16)
        widest = K._decode_launch_of(
            dict(t, BLOCK_K=max(16, min(128, fit)), BLOCK_N=max(16, min(64, fit)),
                 **dict(zip(("N0", "KC"), K.producer_chunks(k, max(16, min(128, fit))))),
                 N2=-(-n // max(16, min(64, fit)))),
            M, k, n, r, 2, 2, True, dev).seconds(dev)
        mine = K._decode_launch_of(t, M, k, n, r, 2, 2, True, dev).seconds(dev)
        assert mine == widest or mine <= K.DECODE_TILE_MARGIN * widest, (M, k, n, r, t)
    # 768², rank 192, 16 tokens: 48 consumers of 16 rows instead of 12 of 64 (36 -> 72 programs)
    t = K.decode_tiles(16, 768, 768, 192)
    assert (t["BLOCK_N"], t["N0"] + t["N1"] + t["N2"]) == (16, 72)
    # 4096², rank 512: the widest fitting tiles, as before the plan
    t = K.decode_tiles(16, 4096, 4096, 512)
    assert (t["BLOCK_K"], t["BLOCK_N"], t["N0"], t["KC"]) == (32, 32, 32, 128)
    # the producers' chunking by hand: 768 in steps of 64 -> 12 of 64; 4096 / 32 -> 32 of 128;
    # 515 / 16 -> 33 steps, 32 producers of 2 steps -> 17 (the last one partial), none empty
    assert [K.producer_chunks(*a) for a in ((768, 64), (4096, 32), (515, 16))] == [(12, 64), (32, 128), (17, 32)]
