"""Tier 1 (cpu): the one-launch split 2:4 decode (fp32 partials reduced in the same launch by each
row tile's last program): float64 oracle, the counter path (SYNC) against the id-order path
bitwise, counters reset, the planner against the byte model, and sol's counts of the launch
(scaled per program class == every program)."""

import pytest
import torch

from conftest import assert_close_ref, sol_counts_scaled_and_full, sparse24_case, sparse24_ref64
from fastfactor.formats.sparse24 import pack_24, prune_24
from fastfactor.kernels import _config
from fastfactor.kernels import sparse24 as K


_case = sparse24_case
_ref64 = sparse24_ref64


def _launch(x, values, meta, b, bn, sk, sync, cnt=None):
    """The kernel launched by hand (as sparse24_decode does), ``SYNC`` chosen by the test."""
    M, Kd = x.shape
    N = values.shape[0]
    kps = K._decode_kps(Kd, sk)
    assert -(-Kd // kps) == sk
    mt, smr, smc, m32 = K._meta_arg(meta, Kd)
    y = torch.empty(M, N, dtype=x.dtype)
    ws = torch.empty(sk, M, N, dtype=torch.float32)
    nb = -(-N // bn)
    cnt = torch.zeros(nb, dtype=torch.int32) if cnt is None else cnt
    K._sp_decode_tuned[(nb * sk,)](
        x, values, mt, b if b is not None else y, y, ws, cnt if sync else ws,
        M, N, Kd, kps, sk, x.stride(0), x.stride(1), values.stride(0), values.stride(1),
        smr, smc, y.stride(0), y.stride(1),
        HAS_BIAS=b is not None, SPLIT=sk > 1, SYNC=sync, UPCAST=True, PRECISION="ieee",
        META32=m32, PAIRS=False, PRMT=0, EVEN=K.decode_even(N, Kd, bn),
        BLOCK_N=bn, BLOCK_M=max(16, _config.next_pow2(M)),
    )
    return y, cnt


@pytest.mark.parametrize("m,n,k,bn,sk,bias", [
    (16, 96, 768, 32, 3, True),      # 3 tiles x 3 splits
    (5, 70, 512, 64, 2, False),      # a masked last row tile, 5 tokens
    (16, 128, 768, 128, 3, True),    # the wide tile: one row tile, 3 splits
])
def test_counter_path_matches_id_order_bitwise_and_resets(triton_cpu, m, n, k, bn, sk, bias):
    x, values, meta, b = _case(m, n, k, torch.float32, seed=m + n)
    b = b if bias else None
    y_id, _ = _launch(x, values, meta, b, bn, sk, sync=False)
    y_cnt, cnt = _launch(x, values, meta, b, bn, sk, sync=True)
    assert torch.equal(y_id, y_cnt)
    assert int(cnt.abs().sum()) == 0, "the reducers reset their counters"
    y_again, _ = _launch(x, values, meta, b, bn, sk, sync=True, cnt=cnt)   # reused counters
    assert torch.equal(y_again, y_id)
    assert_close_ref(y_id, _ref64(x, values, meta, b), torch.float32, reduction=k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wide_split_plans_match_float64(triton_cpu, dtype):
    x, values, meta, b = _case(16, 128, 512, dtype, seed=7)
    ref = _ref64(x, values, meta, b)
    outs = [K.sparse24_decode(x, values, meta, b, plan=p) for p in ((128, 2), (64, 2), (32, 1))]
    for y in outs:
        assert_close_ref(y, ref, dtype, reduction=512)
    assert torch.equal(outs[0], K.sparse24_decode(x, values, meta, b, plan=(128, 2)))
    # fp32 output of a 16-bit product (the dense-sparse intermediate)
    y32 = K.sparse24_decode(x, values, meta, None, plan=(128, 2), out_dtype=torch.float32)
    assert y32.dtype == torch.float32
    assert_close_ref(y32, _ref64(x, values, meta, None), dtype, reduction=512)


def _plan_terms(m, n, k, bn, sk):
    """The decode model's terms for one plan, recomputed from its parts."""
    b = K.decode_launch_bytes(m, n, k, bn, sk)
    p = b["programs"]
    f = min(1.0, p / (-(-p // 132) * 132))
    bm = max(16, K.next_pow2(m))
    kps = min(k, K._decode_kps(k, sk))
    wi = min(K.decode_warp_instructions(bn, bm, c["BLOCK_K"], c["num_warps"], kps, sk > 1)[0]
             for c in K.DECODE_SPACE[1:] if K._decode_ok(bn, bm, c["BLOCK_K"], c["num_warps"]))
    issue = wi * p / (132 * 4 * 1.98e9 * f)
    return b, f, issue


def test_planner_is_the_byte_and_issue_model():
    # one launch whatever the split: every plan priced by its bytes and its issue, at the nominal L2
    # figure and at the low end of its range; the pick is robust_pick's
    from fastfactor.kernels import _cost

    BW, L2, L2LOW, LA = K._BW, K._L2BW, K._L2BW_LOW, K._LAUNCH
    assert L2LOW < L2
    for m, n, k in ((16, 4096, 4096), (64, 4096, 4096), (16, 1024, 4096), (32, 3072, 768)):
        plans = K.decode_plans(m, n, k, 132)
        assert len({p[2] for p in plans}) == len(plans) >= 4
        for tn, tl, (bn, sk) in plans:
            b, f, issue = _plan_terms(m, n, k, bn, sk)
            assert tn == pytest.approx(max(b["dram"] / BW, b["l2"] / (L2 * f), issue) + LA)
            assert tl == pytest.approx(max(b["dram"] / BW, b["l2"] / (L2LOW * f), issue) + LA)
            assert tl >= tn
        t, bn, sk = K.decode_plan_cost(m, n, k, 132)
        pick = _cost.robust_pick(plans)
        assert (t, bn, sk) == (pick[0], *pick[2])
        # no launch floor for a reduction: the split costs its partials' bytes only
        assert t < 2 * LA + K.decode_launch_bytes(m, n, k, bn, sk)["dram"] / BW
    # x re-reads against partials: a wide tile reads x 4x less from L2 and stores fp32 partials
    narrow, wide = K.decode_launch_bytes(16, 4096, 4096, 32, 1), K.decode_launch_bytes(16, 4096, 4096, 128, 4)
    assert narrow["x_reread"] == 127 * 16 * 4096 * 2 and wide["x_reread"] == 31 * 16 * 4096 * 2
    assert wide["dram"] - narrow["dram"] == 4 * 16 * 4096 * 4


def test_plan_holds_up_at_the_low_end_of_the_l2_figure():
    """4096², 16 tokens: the narrow plan (32 rows, no split) is the fastest at 9 TB/s of L2 only
    while its 128 reads of x hide under the DRAM time; at 5.5 TB/s it is L2-bound, ~26 % slower
    than the wide plan (128 rows x 4 splits), which is ~5 % slower at 9 TB/s: the wide plan is taken
    (least worst-case regret), and x is re-read 20 % of the launch's DRAM bytes, not 87 %."""
    plans = {p[2]: p[:2] for p in K.decode_plans(16, 4096, 4096, 132)}
    narrow, wide = plans[(32, 1)], plans[(128, 4)]
    assert narrow[0] == min(p[0] for p in plans.values())          # fastest at the nominal figure
    assert wide[1] == min(p[1] for p in plans.values())            # fastest at the low end
    assert 1.2 < narrow[1] / wide[1] < 1.35 and 1.0 < wide[0] / narrow[0] < 1.08
    assert K.decode_plan(16, 4096, 4096, 132) == (128, 4)
    b = K.decode_launch_bytes(16, 4096, 4096, 128, 4)
    assert b["x_reread"] / b["dram"] < 0.25
    # where both figures agree the planner takes that plan (a small S of the dense-sparse product)
    small = K.decode_plans(16, 655, 4096, 132)
    best = min(small)
    assert best[1] == min(p[1] for p in small) and K.decode_plan(16, 655, 4096, 132) == best[2]


def test_robust_pick_rule():
    from fastfactor.kernels._cost import robust_pick

    # (t_nominal, t_low, plan): b loses 3 % at the nominal figure and wins 25 % at the low end
    a, b, c = (1.00, 1.25, "a"), (1.03, 1.00, "b"), (1.50, 1.50, "c")
    assert robust_pick([a, b, c])[2] == "b"
    assert robust_pick([a, c])[2] == "a"
    # equal worst-case regret: the faster at the nominal figure, then the first
    assert robust_pick([(1.0, 1.1, "x"), (1.1, 1.0, "y")])[2] == "x"
    assert robust_pick([(1.0, 1.0, "p"), (1.0, 1.0, "q")])[2] == "p"
    with pytest.raises(ValueError, match="candidates"):
        robust_pick([])


def test_dx_plan_is_the_byte_and_issue_model():
    from fastfactor.kernels import _cost

    for m, n, k in ((16, 4096, 4096), (16, 3072, 768), (64, 4096, 4096)):
        plans = K.dx_decode_plans(m, n, k, 132)
        bm = max(16, K.next_pow2(m))
        for tn, tl, (bk, sk) in plans:
            b = K.dx_decode_launch_bytes(m, n, k, bk, sk)
            p = b["programs"]
            f = min(1.0, p / (-(-p // 132) * 132))
            nps = min(n, K._dxd_nps(n, sk))
            wi = min(K.dx_decode_warp_instructions(bk, bm, c["BLOCK_N"], c["num_warps"], nps, sk > 1)[0]
                     for c in K.DXD_SPACE[1:] if K._dxd_ok(bk, bm, c["BLOCK_N"], c["num_warps"]))
            issue = wi * p / (132 * 4 * 1.98e9 * f)
            assert tn == pytest.approx(max(b["dram"] / K._BW, b["l2"] / (K._L2BW * f), issue) + K._LAUNCH)
            assert tl == pytest.approx(max(b["dram"] / K._BW, b["l2"] / (K._L2BW_LOW * f), issue) + K._LAUNCH)
        pick = _cost.robust_pick(plans)
        assert K.dx_decode_plan_cost(m, n, k, 132) == (pick[0], *pick[2])


def test_sol_counts_of_the_split_decode_scaled_equal_full():
    from fastfactor.sol import record as R

    x, values, meta, b = _case(16, 96, 768, torch.bfloat16, seed=2)
    with R.recording() as rec:
        K.sparse24_decode(x, values, meta, b, plan=(32, 3))
    (launch,) = rec.launches
    assert launch.kernel == "sparse24.decode"
    scaled, full = sol_counts_scaled_and_full(launch, 3 * 3)
    ws = next(v for n, v in full.tensors.items() if n.startswith("ws_ptr"))
    assert ws.store_bytes == 3 * 16 * 96 * 4 and ws.load_bytes == 2 * 16 * 96 * 4
    # the model: the workspace read back in the launch costs its stores only in DRAM bytes
    from fastfactor.sol import model
    from fastfactor.sol.device import H200

    t = model.launch_time(scaled, H200)
    expect = sum(tc.store_bytes if n.startswith("ws_ptr") else
                 (min(tc.unique_bytes, tc.load_bytes) + tc.store_bytes) for n, tc in scaled.tensors.items())
    assert t["dram_bytes"] == pytest.approx(expect)


# ---- dx = g·W at decode sizes (_sp_dx_decode_kernel) ----

def _dx_ref64(g, values, meta):
    return g.double() @ K.unpack_24(values.double(), meta, 2 * values.shape[1])


@pytest.mark.parametrize("m,n,k,plan,dtype", [
    (16, 384, 256, (64, 3), torch.float32),     # 4 column tiles x 3 splits of 128 rows
    (5, 200, 96, (32, 2), torch.bfloat16),      # masked rows, a short last split, codes as words
    (16, 130, 44, (32, 1), torch.float32),      # K = 44: codes as bytes, masked last column tile
    (33, 256, 256, (128, 2), torch.float16),
])
def test_dx_decode_matches_float64(triton_cpu, m, n, k, plan, dtype):
    torch.manual_seed(m + k)
    w = pack_24(prune_24(torch.randn(n, k) / n ** 0.5))
    values, meta = w.values.to(dtype), w.meta
    g = torch.randn(m, n).to(dtype)
    dx = K.sparse24_dx_decode(g, values, meta, plan=plan)
    assert dx.dtype == dtype and dx.shape == (m, k)
    assert_close_ref(dx, _dx_ref64(g, values, meta), dtype, reduction=n)
    if k == 96:    # bitwise repeatable; the public entry takes it at decode sizes
        assert torch.equal(dx, K.sparse24_dx_decode(g, values, meta, plan=plan))
        assert torch.equal(K.sparse24_dx(g, values, meta), K.sparse24_dx_decode(g, values, meta))


def test_dx_decode_mixed_fp32_g_against_fp16_weight(triton_cpu):
    torch.manual_seed(1)
    w = pack_24(prune_24(torch.randn(256, 128) / 16))
    values = w.values.half()
    g = torch.randn(8, 256)                                  # the dense-sparse dt, kept in fp32
    dx = K.sparse24_dx(g, values, w.meta, out_dtype=torch.float16)
    assert dx.dtype == torch.float16
    assert_close_ref(dx, _dx_ref64(g, values, w.meta), torch.float16, reduction=256)


def test_dx_decode_counter_path_bitwise_and_reset(triton_cpu):
    torch.manual_seed(2)
    m, n, k, bk, sk = 16, 384, 256, 64, 3
    w = pack_24(prune_24(torch.randn(n, k)))
    g = torch.randn(m, n)
    mt, smr, smc, m32 = K._meta_arg(w.meta, k)
    outs = []
    nb = k // bk
    for sync in (False, True):
        dx = torch.empty(m, k)
        ws = torch.empty(sk, m, k)
        cnt = torch.zeros(nb, dtype=torch.int32)
        K._sp_dx_decode_tuned[(nb * sk,)](
            g, w.values, mt, dx, dx, dx, dx, ws, cnt if sync else ws, m, n, k, K._dxd_nps(n, sk), sk,
            g.stride(0), g.stride(1), w.values.stride(0), w.values.stride(1), smr, smc, dx.stride(0), dx.stride(1),
            dx.stride(0), dx.stride(1), dx.stride(0), dx.stride(1),
            HAS_DB=False, HAS_DV=False, SPLIT=True, SYNC=sync, UPCAST=True, PRECISION="ieee", META32=m32, PAIRS=False, PRMT=0, MIXED=False,
            BLOCK_M=16, BLOCK_K=bk,
        )
        outs.append(dx)
        assert int(cnt.abs().sum()) == 0
    assert torch.equal(outs[0], outs[1])


def test_dx_planner_and_sol_counts():
    from fastfactor.sol import count as C
    from fastfactor.sol import record as R

    t, bk, sk = K.dx_decode_plan_cost(16, 3072, 768, 132)
    b = K.dx_decode_launch_bytes(16, 3072, 768, bk, sk)
    assert b["programs"] >= 66 and t < 2 * K._LAUNCH   # fills the SMs, one launch
    torch.manual_seed(3)
    w = pack_24(prune_24(torch.randn(384, 256)))
    g = torch.randn(16, 384).bfloat16()
    with R.recording() as rec:
        K.sparse24_dx_decode(g, w.values.bfloat16(), w.meta, plan=(64, 3))
    (launch,) = rec.launches
    assert launch.kernel == "sparse24.dx_decode"
    cfg = launch.candidates[0]
    full, scaled = C.count_launch(launch, cfg, "full"), C.count_launch(launch, cfg, "scaled")
    assert scaled.programs == full.programs == 4 * 3
    for name in full.tensors:
        for f in ("load_bytes", "store_bytes", "load_sectors", "store_sectors", "unique_bytes"):
            assert getattr(scaled.tensors[name], f) == getattr(full.tensors[name], f), (name, f)


@pytest.mark.parametrize("m,n,k,plan,dtype", [(16, 384, 128, (64, 3), torch.float32),
                                             (7, 200, 96, (32, 2), torch.bfloat16)])
def test_dx_decode_bias_gradient_in_the_same_launch(triton_cpu, m, n, k, plan, dtype):
    torch.manual_seed(m)
    w = pack_24(prune_24(torch.randn(n, k) / n ** 0.5))
    values, meta = w.values.to(dtype), w.meta
    g = torch.randn(m, n).to(dtype)
    db = torch.empty(n, dtype=dtype)
    dx = K.sparse24_dx_decode(g, values, meta, plan=plan, db=db)
    assert torch.equal(dx, K.sparse24_dx_decode(g, values, meta, plan=plan))   # db changes nothing else
    assert_close_ref(db, g.double().sum(0), dtype, reduction=m, name="db")
    db2 = torch.empty(n, dtype=dtype)
    K.sparse24_dx_decode(g, values, meta, plan=plan, db=db2)
    assert torch.equal(db, db2)
    with pytest.raises(ValueError, match="db"):
        K.sparse24_dx_decode(g, values, meta, db=torch.empty(n + 1, dtype=dtype))


def test_backward_takes_db_from_the_dx_launch(triton_cpu, monkeypatch):
    from fastfactor.formats.sparse24 import Sparse24Weight
    from fastfactor.ops.sparse24 import sparse24_linear

    monkeypatch.delenv("FASTFACTOR_SPARSE24_BWD_PATH", raising=False)
    torch.manual_seed(5)
    w = pack_24(prune_24(torch.randn(48, 64) / 8))
    x = torch.randn(6, 64, requires_grad=True)
    values = w.values.clone().requires_grad_(True)
    b = torch.randn(48, requires_grad=True)
    seen = []
    real = K.sparse24_dx_decode
    monkeypatch.setattr(K, "sparse24_dx_decode", lambda *a, **kw: seen.append(kw.get("db") is not None) or real(*a, **kw))
    y = sparse24_linear(x, Sparse24Weight(values, w.meta, w.shape), b)
    g = torch.randn_like(y)
    y.backward(g)
    assert seen == [True]
    assert_close_ref(b.grad, g.double().sum(0), torch.float32, reduction=6, name="db")
    dx64 = g.double() @ K.unpack_24(values.detach().double(), w.meta, 64)
    assert_close_ref(x.grad, dx64, torch.float32, reduction=48, name="dx")


def test_unpipelined_configs_only_on_request(monkeypatch):
    """The configs without the cp.async pipeline are compiled (the compile tier) but reach the
    autotuner only with FASTFACTOR_SPARSE24_UNPIPELINED=1; the deterministic config and the
    fallback when nothing fits stay pipelined; a bad value is an error naming the variable."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(_config, "is_interpreter", lambda: False)
    as_cfgs = lambda space: [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                           num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in space]
    stages = lambda cs: sorted({c["num_stages"] if isinstance(c, dict) else c.num_stages for c in cs})
    for space, prune, args in ((K.DECODE_SPACE, K._prune_decode, dict(BLOCK_N=128, BLOCK_M=16)),
                               (K.DXD_SPACE, K._prune_dx_decode, dict(BLOCK_K=64, BLOCK_M=16))):
        assert 1 in stages(space[1:])
        monkeypatch.delenv(K.UNPIPELINED_ENV, raising=False)
        default = prune(as_cfgs(space), args)
        assert default and 1 not in stages(default)
        monkeypatch.setenv(K.UNPIPELINED_ENV, "1")
        both = prune(as_cfgs(space), args)
        assert stages(both) == [1, 3] and [c for c in both if c.num_stages > 1] == default
        monkeypatch.setenv(K.UNPIPELINED_ENV, "0")
        assert prune(as_cfgs(space), args) == default
        monkeypatch.setenv(K.UNPIPELINED_ENV, "yes")
        with pytest.raises(ValueError, match=K.UNPIPELINED_ENV):
            prune(as_cfgs(space), args)
    monkeypatch.delenv(K.UNPIPELINED_ENV)
    # nothing fits 256 rows x 64 tokens: the last pipelined config, as before the unpipelined ones
    (fb,) = K._prune_decode(as_cfgs(K.DECODE_SPACE), dict(BLOCK_N=256, BLOCK_M=64))
    assert fb.num_stages > 1 and fb.kwargs["BLOCK_K"] == 256 and fb.num_warps == 8
    monkeypatch.setenv(K.UNPIPELINED_ENV, "1")
    assert K._prune_decode(as_cfgs(K.DECODE_SPACE), dict(BLOCK_N=256, BLOCK_M=64)) == [fb]
    # the deterministic launch keeps the pipelined default
    assert K._sp_decode_tuned.fixed_config(dict(BLOCK_N=128, BLOCK_M=16)).num_stages > 1
