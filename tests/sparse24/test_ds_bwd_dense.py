"""The dense factor's side of the dense-sparse backward in one launch (``ds_bwd_dense``,
``_ds_bwd_dense_kernel``): ``dt = g·D``, ``dD = gᵀ·t`` and ``db = Σ_m g`` for a handful of tokens,
``dt``'s column-range partials summed by each rank chunk's last arrival.

Against float64 (fp32 and bf16, every combination of the three outputs, partial rank chunks and
column ranges, strided ``g``/``D``/``t``), with every fresh float buffer filled with NaN; the
counter-reduced launch against the id-order one bit for bit (counters reset and reused); plans
agree and rerun bitwise; the op's backward on this path against float64 and against the library's
launches; the dispatch and the planner (predicted, not measured)."""

from __future__ import annotations

import pytest
import torch

from conftest import CountLaunches, KwargSpy, assert_close_ref, nan_filled_empty
from fastfactor.formats.sparse24 import Sparse24Weight, pack_24, prune_24
from fastfactor.kernels import _config
from fastfactor.kernels import sparse24 as K
from fastfactor.ops import sparse24 as ops

BF16, CUDA = torch.bfloat16, torch.device("cuda")


def _case(M, n, R, dtype, seed, strided=False):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(M, 2 * n if strided else n, generator=gen).to(dtype)
    g = g[:, ::2] if strided else g                 # column stride 2
    d = (torch.randn(n, R + 8 if strided else R, generator=gen) / R ** 0.5).to(dtype)
    d = d[:, :R] if strided else d                  # a row stride other than R
    t = torch.randn(M, R + 3 if strided else R, generator=gen).to(dtype)
    t = t[:, :R] if strided else t
    return g, d, t


def _check(dt, dd, db, g, d, t, dtype, need_dt, need_dd, bias):
    M, n = g.shape
    R = d.shape[1]
    g64 = g.double()
    if need_dt:
        assert dt.dtype == dtype and dt.shape == (M, R)
        assert_close_ref(dt, g64 @ d.double(), dtype, reduction=n, name="dt")
    else:
        assert dt is None
    if need_dd:
        assert dd.dtype == dtype and dd.shape == (n, R)
        assert_close_ref(dd, g64.t() @ t.double(), dtype, reduction=M, name="dD")
    else:
        assert dd is None
    if bias:
        assert db.dtype == dtype and db.shape == (n,)
        assert_close_ref(db, g64.sum(0), dtype, reduction=M, name="db")
    else:
        assert db is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M,n,R,plan,strided", [
    (5, 300, 40, (16, 2), False),     # 3 rank chunks (the last partial) x 2 column ranges (the last partial)
    (16, 200, 100, (32, 4), True),    # 4 chunks, 2 ranges of 128 (the planner's quantum), strided g, D, t
    (3, 130, 24, (32, 1), False),     # one range: no partials; one partial chunk
    (1, 257, 64, (16, 8), False),     # one token, 4 whole chunks, ranges trimmed to 3 (no empty split)
    (33, 140, 48, (64, 2), True),     # BLOCK_M 64, one chunk wider than the rank
])
@pytest.mark.parametrize("need_dt,need_dd,bias", [(True, True, True), (True, False, False), (False, True, True)])
def test_matches_float64(triton_cpu, dtype, M, n, R, plan, strided, need_dt, need_dd, bias):
    g, d, t = _case(M, n, R, dtype, seed=M + n + R, strided=strided)
    with nan_filled_empty():
        dt, dd, db = K.ds_bwd_dense(g, d, t, need_dt, need_dd, bias, plan=plan)
    _check(dt, dd, db, g, d, t, dtype, need_dt, need_dd, bias)


def test_vector_form_is_taken_where_rows_allow_and_gives_the_same_bits(triton_cpu, monkeypatch):
    """``D_VEC`` (``D``'s and ``dD``'s rows on 16 bytes) exactly when the rank and ``D``'s row stride
    are multiples of 8 (16-bit data), with the bits of the strided form."""
    seen = []
    monkeypatch.setattr(K, "_ds_bwd_dense_tuned", KwargSpy(K._ds_bwd_dense_tuned, "D_VEC", seen))
    for R, stride, want in ((48, 48, True), (48, 56, True), (44, 44, False), (48, 52, False)):
        g, _, t = _case(6, 160, R, BF16, seed=R)
        d = torch.randn(160, stride).to(BF16)[:, :R]
        out = K.ds_bwd_dense(g, d, t, plan=(16, 2))
        assert seen[-1] == want, (R, stride)
        ref = K.ds_bwd_dense(g, d.contiguous().t().contiguous().t(), t, plan=(16, 2))
        assert seen[-1] is False                    # a column-major D: the strided form
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    K.ds_bwd_dense(*_case(6, 160, 48, torch.float32, seed=1), plan=(16, 2))
    assert seen[-1] is False                        # fp32: no 16-bit vectors


def _launch(g, d, t, plan, sync, cnt=None):
    """The kernel launched by hand (as ``ds_bwd_dense`` does), ``SYNC`` chosen by the test."""
    M, n = g.shape
    R = d.shape[1]
    br, sk = plan
    ch, nps = -(-R // br), K._bd_nps(n, sk)
    dt, dd, db = torch.empty(M, R), torch.empty(n, R), torch.empty(n)
    ws = torch.empty(sk, M, R)
    cnt = torch.zeros(ch, dtype=torch.int32) if cnt is None else cnt
    K._ds_bwd_dense_tuned[(ch * sk,)](
        g, d, t, dd, db, dt, ws, cnt if sync else ws,
        M, n, R, nps, sk, g.stride(0), g.stride(1), d.stride(0), d.stride(1), t.stride(0), t.stride(1),
        dd.stride(0), dd.stride(1), dt.stride(0), dt.stride(1),
        HAS_BIAS=True, NEED_DT=True, NEED_DD=True, SPLIT=True, SYNC=sync, UPCAST=True, PRECISION="ieee",
        D_VEC=False, BLOCK_R=br, BLOCK_M=16,
    )
    return (dt, dd, db), cnt


def test_counter_path_matches_id_order_bitwise_and_resets(triton_cpu):
    g, d, t = _case(7, 400, 72, torch.float32, seed=11)
    ref, _ = _launch(g, d, t, (16, 4), sync=False)
    got, cnt = _launch(g, d, t, (16, 4), sync=True)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert int(cnt.abs().sum()) == 0, "the reducers reset their counters"
    again, _ = _launch(g, d, t, (16, 4), sync=True, cnt=cnt)       # reused counters
    assert all(torch.equal(a, b) for a, b in zip(ref, again))
    _check(*ref, g, d, t, torch.float32, True, True, True)


def test_plans_agree_and_rerun_bitwise(triton_cpu):
    g, d, t = _case(16, 520, 96, BF16, seed=2)
    outs = [K.ds_bwd_dense(g, d, t, plan=p) for p in ((16, 1), (32, 4), (64, 2))]
    for o in outs:
        _check(*o, g, d, t, BF16, True, True, True)
    for a, b in zip(outs[1], K.ds_bwd_dense(g, d, t, plan=(32, 4))):
        assert torch.equal(a, b)
    # dD and db do not depend on the plan's split of the columns: each is one product / sum
    for o in outs[1:]:
        assert torch.equal(o[1], outs[0][1]) and torch.equal(o[2], outs[0][2])


def test_empty_and_rejected_shapes(triton_cpu):
    g, d, t = _case(4, 64, 16, torch.float32, seed=0)
    dt, dd, db = K.ds_bwd_dense(g[:0], d, t[:0])
    assert dt.shape == (0, 16) and dd.shape == (64, 16) and db.shape == (64,)
    assert int(dd.abs().sum()) == 0 and int(db.abs().sum()) == 0
    dt, dd, db = K.ds_bwd_dense(g, d[:, :0], t[:, :0])
    assert dt.shape == (4, 0) and dd.shape == (64, 0) and torch.equal(db, g.sum(0))
    with pytest.raises(ValueError, match="g: ds_bwd_dense takes at most 64 rows, got 65"):
        K.ds_bwd_dense(torch.randn(65, 64), d, torch.randn(65, 16))
    with pytest.raises(ValueError, match="all bf16 or all fp32, got g torch.float16"):
        K.ds_bwd_dense(g.half(), d.half(), t.half())
    with pytest.raises(ValueError, match="t None"):
        K.ds_bwd_dense(g, d, None)


def _op_case(M, k, n, R, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    p = pack_24(prune_24(torch.randn(R, k, generator=gen)).to(dtype))
    x = torch.randn(M, k, generator=gen).to(dtype)
    d = (torch.randn(n, R, generator=gen) / R ** 0.5).to(dtype)
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    return x, d, p.values, p.meta, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fwd", ["library", "rank_split"])
def test_op_backward_on_this_path(triton_cpu, monkeypatch, dtype, fwd):
    """``dense_sparse_linear``'s backward with the dense side forced onto the one launch: every
    gradient against float64, one launch of ours in place of the library's three; the same
    gradients as the library's launches within the dtype's rounding."""
    monkeypatch.setenv("FASTFACTOR_DS_PATH", fwd)
    M, k, n, R = 6, 128, 150, 36
    x, d, values, meta, b = _op_case(M, k, n, R, dtype, seed=9)
    gy = torch.randn(M, n).to(dtype)

    def run(mode):
        monkeypatch.setenv("FASTFACTOR_DS_BWD_DENSE", mode)
        leaves = [a.clone().requires_grad_(True) for a in (x, d, values, b)]
        y = ops.dense_sparse_linear(leaves[0], leaves[1], Sparse24Weight(leaves[2], meta, (R, k)), leaves[3])
        y.backward(gy)
        return [a.grad for a in leaves]

    spy = CountLaunches(K._ds_bwd_dense_tuned)
    monkeypatch.setattr(K, "_ds_bwd_dense_tuned", spy)
    ours = run("1")
    assert spy.n == 1
    lib = run("0")
    assert spy.n == 1, "FASTFACTOR_DS_BWD_DENSE=0 keeps the library's launches"
    leaves = [a.detach().double().requires_grad_(True) for a in (x, d, values, b)]
    y64 = (leaves[0] @ K.unpack_24(leaves[2], meta, k).t()) @ leaves[1].t() + leaves[3]
    y64.backward(gy.double())
    for got, other, ref, red, name in zip(ours, lib, [a.grad for a in leaves], (n + R, M * k, M * n, M),
                                          ("dx", "dD", "dS", "db")):
        assert_close_ref(got, ref, dtype, reduction=red, name=name)
        assert_close_ref(other, ref, dtype, reduction=red, name=name + " (library)")


def test_dispatch(on_gpu_model, monkeypatch):
    """A handful of tokens takes the one launch (predicted faster than cuBLAS's two products and the
    sum by more than the margin: three launch floors against one), also for two of the outputs, not
    for one alone; above 64 tokens, for fp16 or when switched off it is not taken."""
    for M, n, R in ((16, 3072, 168), (64, 3072, 336), (16, 4096, 655), (8, 768, 472), (1, 3072, 84)):
        c = K.ds_bwd_dense_cost(M, n, R, BF16)
        assert c is not None and c[0] <= K.DS_MARGIN * K.ds_bwd_dense_library_seconds(M, n, R, BF16), (M, n, R, c)
        assert K.ds_bwd_dense_ok(M, n, R, BF16, True, True, True, CUDA)
    assert K.ds_bwd_dense_ok(16, 3072, 168, BF16, False, True, True, CUDA)         # dD and db (S and x frozen)
    assert K.ds_bwd_dense_ok(16, 3072, 168, torch.float32, True, False, True, CUDA)
    # one output alone is one cuBLAS launch against one of ours: nothing saved, the library stays
    assert not K.ds_bwd_dense_ok(16, 3072, 168, BF16, False, True, False, CUDA)
    assert not K.ds_bwd_dense_ok(16, 3072, 168, BF16, True, False, False, CUDA)
    assert not K.ds_bwd_dense_ok(65, 3072, 168, BF16, True, True, True, CUDA)
    assert not K.ds_bwd_dense_ok(16, 3072, 168, torch.float16, True, True, True, CUDA)
    assert not K.ds_bwd_dense_ok(16, 3072, 168, BF16, False, False, False, CUDA)
    monkeypatch.setenv("FASTFACTOR_DS_BWD_DENSE", "0")
    assert not K.ds_bwd_dense_ok(16, 3072, 168, BF16, True, True, True, CUDA)
    monkeypatch.setenv("FASTFACTOR_DS_BWD_DENSE", "2")
    with pytest.raises(ValueError, match="FASTFACTOR_DS_BWD_DENSE"):
        K.ds_bwd_dense_ok(16, 3072, 168, BF16, True, True, True, CUDA)


def test_plan_prices_bytes_and_fill():
    """The planner's terms: a split stores partials only when ``dt`` is asked; the low L2 figure
    never makes a plan faster; the pick is one of the plans and fits the registers."""
    plans = K.ds_bwd_dense_plans(16, 3072, 168)
    assert plans and all(t_low >= t_nom for t_nom, t_low, _ in plans)
    t, br, sk = K.ds_bwd_dense_cost(16, 3072, 168)
    assert (br, sk) in [p for _, _, p in plans] and K.bd_space(br, 16)
    both = {p: a for a, _, p in plans}
    dd_only = {p: a for a, _, p in K.ds_bwd_dense_plans(16, 3072, 168, need_dt=False)}
    assert all(dd_only[p] <= both[p] for p in both)                  # no D, no dt, no partials
    # at one split the two outputs' bytes decide; more splits fill the SMs
    assert both[(16, 8)] < both[(16, 1)]
    assert K.ds_bwd_dense_cost(65, 3072, 168) is None and K.ds_bwd_dense_cost(16, 3072, 0) is None


def test_fixed_config_on_a_gpu_fits_the_plan(monkeypatch):
    """Deterministic mode on a GPU launches the first GPU config the prune keeps: one within the
    register budget of the planned tiles."""
    monkeypatch.setattr(_config, "is_interpreter", lambda: False)
    for br, bm in ((16, 16), (64, 16), (128, 16), (32, 64), (64, 64)):
        cfg = K._ds_bwd_dense_tuned.fixed_config(dict(BLOCK_R=br, BLOCK_M=bm))
        assert K._bd_fits(br, cfg.kwargs["BLOCK_N"], bm, cfg.num_warps), (br, bm, cfg)


@pytest.mark.perf
@pytest.mark.skipif(not _config.is_interpreter(), reason="counting needs TRITON_INTERPRET=1")
def test_planner_and_sol_agree(monkeypatch):
    """``fastfactor sol``'s price of the launch the op makes at the training row (exact interpreter
    counts) within 25 % of the planner's, and the row's backward is this launch + the sparse
    factor's one."""
    from fastfactor.sol.device import H200
    from fastfactor.sol.rows import RowSpec, evaluate_row

    for var in ("FASTFACTOR_DS_PATH", "FASTFACTOR_SPARSE24_PATH", "FASTFACTOR_DS_BWD_DENSE"):
        monkeypatch.delenv(var, raising=False)
    row = evaluate_row(RowSpec("dense_sparse", 768, 3072, 16, 0.25, "fwd+bwd"), H200)
    launches = [e for e in row["detail"] if e["kernel"] == "sparse24.ds_bwd_dense"]
    # the sparse factor's side: dx and the kept values' gradient from one dx-decode launch (HAS_DV)
    assert len(launches) == 1 and row["kernels"].split(",")[1:] == ["ds_bwd_dense", "dx_decode"]
    R = 168
    ours = K.ds_bwd_dense_cost(16, 3072, R, BF16)[0]
    assert 0.8 <= launches[0]["seconds"] / ours <= 1.25, (launches[0]["seconds"], ours)
