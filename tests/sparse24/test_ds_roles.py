"""The two-role dense-sparse launch (``ds_roles``, ``_ds_roles_kernel``): ``y = (x·Sᵀ)·Dᵀ + b`` for
a handful of tokens in one launch, producers forming ``t = x·Sᵀ`` chunk by chunk, consumers (after
every producer, by ticket order) multiplying it by their tile of ``D``.

Against float64 (every dtype, bias on/off, ``t`` kept or not, partial chunks and column tiles,
strided ``x`` and ``D``), with every fresh float buffer filled with NaN; the ticket/counter form
against the id-order one bit for bit (counters reset and reused); plans agree and rerun bitwise;
the dispatch and its sequential-phase term (predicted,
not measured). The op on this path, forward and backward: test_ds_rank_split.py."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close_ref, dense_sparse_case, dense_sparse_ref64, nan_filled_empty
from fastfactor.kernels import _config
from fastfactor.kernels import sparse24 as K

BF16, CUDA = torch.bfloat16, torch.device("cuda")


_case, _ref64 = dense_sparse_case, dense_sparse_ref64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M,k,n,R,plan,bias,store_t,strided", [
    (5, 256, 96, 40, (16, 32), True, True, False),     # 3 producers (the last partial) x 3 consumers
    (16, 512, 70, 100, (32, 64), False, False, True),  # 4 producers, a partial consumer tile, strided x and D
    (3, 288, 50, 20, (32, 32), True, True, False),     # one producer; K not a step multiple
    (1, 256, 33, 64, (16, 16), True, False, False),    # one token, 4 whole producers, 3 consumers
    (33, 256, 64, 48, (16, 64), True, True, True),     # BLOCK_M 64
    # producers split over K: each chunk's fp32 partials summed by its last arrival
    (5, 512, 96, 40, (16, 32, 2), True, True, False),  # 2 splits of 256 x 3 chunks
    (16, 640, 70, 100, (32, 64, 3), False, True, True),  # 3 splits asked: 2 of 256 and one of 128
    (33, 300, 64, 48, (16, 64, 4), True, True, True),  # K % 32 != 0 (byte codes): 128 + 128 + a partial 44
])
def test_matches_float64(triton_cpu, dtype, M, k, n, R, plan, bias, store_t, strided):
    x, d, values, meta, b = _case(M, k, n, R, dtype, seed=M + n + R, strided=strided)
    b = b if bias else None
    with nan_filled_empty():
        y, t = K.ds_roles(x, d, values, meta, b, store_t=store_t, plan=plan)
    y64, t64 = _ref64(x, d, values, meta, b, k)
    assert y.dtype == dtype and y.shape == (M, n)
    assert_close_ref(y, y64, dtype, reduction=k + R, name="y")
    if store_t:
        assert t.dtype == K.intermediate_dtype(dtype) and t.shape == (M, R)
        assert_close_ref(t, t64, dtype, reduction=k, name="t")
    else:
        assert t is None


def _launch(x, d, values, meta, b, plan, sync, cnt=None, pre=None):
    """The kernel launched by hand (as ``ds_roles`` does), ``SYNC`` chosen by the test: with it the
    roles come from tickets drawn on the counters and the consumers wait on them; ``pre``: the
    consumers load their first step of ``D`` before the wait (default as ``ds_roles`` decides)."""
    M, k = x.shape
    n, R = d.shape
    br, bn, ks = (tuple(plan) + (1,))[:3]
    ks, kps = K.roles_k_split(k, ks)
    n0, n1 = -(-R // br), -(-n // bn)
    mt, smr, smc, m32 = K._meta_arg(meta, k)
    y, t = torch.empty(M, n, dtype=x.dtype), torch.empty(M, R, dtype=x.dtype)
    ws = torch.full((ks, M, R), float("nan"))
    cnt = torch.zeros(4 + n0, dtype=torch.int32) if cnt is None else cnt
    K._ds_roles_tuned[(n0 * ks + n1,)](
        x, values, mt, d, b, y, t, ws, cnt if sync else t,
        M, k, n, R, n0, n1, ks, kps, x.stride(0), x.stride(1), values.stride(0), values.stride(1), smr, smc,
        d.stride(0), d.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=True, T_FP32=False, SPLIT=ks > 1, SYNC=sync, UPCAST=True, PRECISION="ieee",
        META32=m32, PAIRS=False, PRMT=0, BLOCK_R=br, BLOCK_N=bn, BLOCK_M=16, BLOCK_C=(bc := K.roles_rank_step(R, br, bn, 16)),
        PREFETCH=K.roles_prefetch(bn, bc, 16, x.element_size()) if pre is None else pre,
    )
    return (y, t), cnt


@pytest.mark.parametrize("sync", [False, True], ids=["id-order", "tickets"])
@pytest.mark.parametrize("R", [40, 300])
def test_prefetched_step_changes_no_bits(triton_cpu, sync, R):
    """The consumers' first step of ``D`` loaded before the wait (``PREFETCH``) leaves the products
    and their order as they were: the same bits with and without it, with and without tickets, at
    a rank of one partial 64-wide step and of five (the last partial: masked columns)."""
    x, d, values, meta, b = _case(5, 128, 48, R, torch.float32, seed=23)
    assert K.roles_rank_step(R, 16, 32, 16) == 64
    (off, _), (on, _) = (_launch(x, d, values, meta, b, (16, 32), sync, pre=p) for p in (False, True))
    assert all(torch.equal(a, c) for a, c in zip(off, on))
    assert_close_ref(on[0], _ref64(x, d, values, meta, b, 128)[0], torch.float32, reduction=128 + R)


def test_prefetch_fits_and_is_priced():
    """``roles_prefetch``: the prefetched step beside the first ``t`` step and the fp32 tile within
    the registers (fp32 ``D`` taking twice the slots); the planner prices the prefetched bytes in
    the producers' phase (predicted: 768x3072, 16 tokens, rank 168 3.24 -> 3.11 us)."""
    assert K.roles_prefetch(32, 64, 16) and K.roles_prefetch(32, 64, 64) and K.roles_prefetch(32, 64, 64, elem=4)
    assert not K.roles_prefetch(128, 64, 64) and not K.roles_prefetch(256, 32, 64)
    for bn, bc, bm, e in ((32, 64, 16, 2), (64, 64, 64, 2), (128, 32, 16, 4), (256, 64, 16, 2)):
        assert K.roles_prefetch(bn, bc, bm, e) == (bn * bc * e // 2 + bc * bm + 2 * bn * bm <= K.RS_SLOTS * 32 * 4)
    dev = K._cost.DEFAULT
    args = (dev, 16, 768, 3072, 168, 16, 32, 2, 2, True, 1000.0, 6)
    with_pre, without = K.roles_phase_seconds(*args, 64), K.roles_phase_seconds(*args, 0)
    assert with_pre < without
    # the saving is at most the prefetched bytes' time in the second phase at the consumers' share
    d_pre = 3072 * 64 * 2.0
    assert without - with_pre <= d_pre / (dev.hbm_bw * (3072 / 32) / dev.sms) + 1e-12
    assert K.ds_roles_cost(16, 768, 3072, 168)[0] < 3.2e-6


@pytest.mark.parametrize("plan", [(16, 32), (16, 32, 2)], ids=["whole-K", "K-split"])
def test_ticket_path_matches_id_order_bitwise_and_resets(triton_cpu, plan):
    """With tickets and counters (in the interpreter's id order: the chunks' arrival counters say
    which split is last, as on a GPU) the bits of the id-order form; every counter, the chunks'
    arrival counters included, back at zero; the counters reused."""
    x, d, values, meta, b = _case(7, 256, 80, 72, torch.float32, seed=11)
    ref, _ = _launch(x, d, values, meta, b, plan, sync=False)
    got, cnt = _launch(x, d, values, meta, b, plan, sync=True)
    assert all(torch.equal(a, c) for a, c in zip(ref, got))
    assert cnt.numel() == 4 + 5 and int(cnt.abs().sum()) == 0, "the last program out / each chunk's reducer resets"
    again, _ = _launch(x, d, values, meta, b, plan, sync=True, cnt=cnt)       # reused counters
    assert all(torch.equal(a, c) for a, c in zip(ref, again))
    assert_close_ref(ref[0], _ref64(x, d, values, meta, b, 256)[0], torch.float32, reduction=256 + 72)


def test_plans_agree_and_rerun_bitwise(triton_cpu):
    x, d, values, meta, b = _case(16, 256, 64, 96, BF16, seed=2)
    y64 = _ref64(x, d, values, meta, b, 256)[0]
    outs = [K.ds_roles(x, d, values, meta, b, store_t=True, plan=p) for p in ((16, 64), (32, 32), (64, 16))]
    for y, _ in outs:
        assert_close_ref(y, y64, BF16, reduction=256 + 96)
    for y, t in outs[1:]:              # t's chunks do not depend on the plan: each over all of K
        assert torch.equal(t, outs[0][1])
    again = K.ds_roles(x, d, values, meta, b, store_t=True, plan=(32, 32))
    assert torch.equal(outs[1][0], again[0])
    # a K split sums its partials in a fixed order: the same bits for any rank chunking, rerun
    split = [K.ds_roles(x, d, values, meta, b, store_t=True, plan=p) for p in ((16, 64, 2), (32, 32, 2))]
    assert torch.equal(split[0][1], split[1][1])
    assert_close_ref(split[0][0], y64, BF16, reduction=256 + 96)
    assert torch.equal(split[1][0], K.ds_roles(x, d, values, meta, b, store_t=True, plan=(32, 32, 2))[0])


def test_k_split_sizes():
    """The producers' K split: multiples of 128 inputs (the codes' words, every GPU step), no empty
    split, one split = all of K."""
    assert K.roles_k_split(768, 1) == (1, 768)
    assert K.roles_k_split(768, 6) == (6, 128) and K.roles_k_split(768, 8) == (6, 128)
    assert K.roles_k_split(768, 4) == (3, 256) and K.roles_k_split(300, 4) == (3, 128)
    for k in (128, 300, 768, 3072, 4100):
        for ks in K.ROLES_SPLITS:
            n, kps = K.roles_k_split(k, ks)
            assert n <= ks and (n == 1 or kps % K.ROLES_K_QUANTUM == 0)
            assert (n - 1) * kps < k <= n * kps


def test_same_t_as_the_rank_split(triton_cpu):
    """The intermediate the two one-launch paths keep for the backward is the same bits."""
    x, d, values, meta, b = _case(9, 512, 48, 40, BF16, seed=5)
    t_roles = K.ds_roles(x, d, values, meta, b, store_t=True, plan=(16, 16))[1]
    t_rs = K.ds_rank_split(x, d, values, meta, b, store_t=True, plan=(16, 16))[1]
    assert torch.equal(t_roles, t_rs)


def test_empty_and_rejected_shapes(triton_cpu):
    x, d, values, meta, b = _case(4, 64, 8, 16, torch.float32, seed=0)
    y, t = K.ds_roles(x[:0], d, values, meta, b, store_t=True)
    assert y.shape == (0, 8) and t.shape == (0, 16)
    y, t = K.ds_roles(x, d[:, :0], values[:0], meta[:0], b, store_t=True)
    assert torch.equal(y, b.expand(4, 8)) and t.shape == (4, 0)
    with pytest.raises(ValueError, match="x: ds_roles takes at most 64 rows, got 65"):
        K.ds_roles(torch.randn(65, 64), d, values, meta)


def test_dispatch(on_gpu_model, monkeypatch):
    """From 1 to 64 tokens on BERT-size layers (768 <-> 3072) and on 4096² the two roles are taken
    (predicted faster than the rank split and the decode + cuBLAS pair by more than the margin, with
    the phases in sequence priced): the producers split over ``K`` keep each one's slab of ``S``
    and ``x`` short whatever the input width; where the rank is a large share of a square layer
    the rank split is cheaper (test_ds_rank_split.py); above 64 tokens they are not a candidate."""
    for M, k, n, R in ((16, 768, 3072, 168), (64, 768, 3072, 168), (64, 768, 3072, 336), (32, 768, 3072, 336),
                       (1, 768, 3072, 168), (16, 3072, 768, 168), (64, 3072, 768, 168), (16, 4096, 4096, 655)):
        c = K.ds_path_costs(M, k, n, R, BF16, CUDA)
        assert K.choose_ds_path(M, k, n, R, BF16, CUDA) == "roles", (M, k, n, R, c)
        assert c["roles"] <= K.DS_MARGIN * c["library"] and c["roles"] < c["rank_split"]
    assert K.choose_ds_path(8, 768, 768, 256, BF16, CUDA) == "rank_split"
    assert "roles" not in K.ds_path_costs(65, 768, 3072, 168, BF16, CUDA)
    monkeypatch.setenv("FASTFACTOR_DS_PATH", "roles")
    assert K.choose_ds_path(16, 768, 3072, 336, torch.float16, CUDA) == "roles"
    assert K.choose_ds_path(128, 768, 3072, 336, BF16, CUDA) == "library"          # above 64 tokens


def test_phases_in_sequence_are_priced():
    """The planner's fifth term: with one producer the whole of ``S`` streams through one SM's share
    of the device before any consumer starts, so the plan costs more than its bandwidth terms; the
    low L2 figure never makes a plan faster; the pick fits the registers."""
    plans = K.ds_roles_plans(16, 768, 3072, 168)
    assert plans and all(t_low >= t_nom for t_nom, t_low, _ in plans)
    by = {p: t for t, _, p in plans}
    assert by[(64, 32, 1)] > by[(16, 32, 1)]            # 3 producers against 11
    t, br, bn, ks = K.ds_roles_cost(16, 768, 3072, 168)
    assert (br, bn, ks) in by and K.rs_space(br, bn, 16)
    # at 64 tokens each of the 11 producers reads all of x (96 KiB) at one SM's share: the K split
    # spreads that read over 6x the SMs (predicted 4.70 -> 3.46 us at 768x3072, rank 168)
    by64 = {p: t for t, _, p in K.ds_roles_plans(64, 768, 3072, 168)}
    assert by64[(16, 32, 6)] < 0.8 * by64[(16, 32, 1)]
    assert K.ds_roles_cost(64, 768, 3072, 168)[3] > 1
    dev = K._cost.DEFAULT
    one = K.roles_phase_seconds(dev, 16, 4096, 3072, 64, 64, 32, 2, 2, False, 0.0)   # a single producer
    assert one >= 64 * 4096 * (1 / 2 + 1 / 16) * 2 / (dev.hbm_bw / dev.sms)         # S through one SM's share
    assert K.ds_roles_cost(65, 768, 3072, 168) is None


def test_k_split_switch(monkeypatch):
    """``FASTFACTOR_DS_ROLES_KSPLIT=0`` plans the producers over all of K (what gpu-check times the
    split against); anything but 0/1/auto is refused by name."""
    assert K.ds_roles_cost(64, 768, 3072, 168)[3] > 1
    monkeypatch.setenv("FASTFACTOR_DS_ROLES_KSPLIT", "0")
    assert K.ds_roles_cost(64, 768, 3072, 168)[3] == 1
    monkeypatch.setenv("FASTFACTOR_DS_ROLES_KSPLIT", "yes")
    with pytest.raises(ValueError, match="FASTFACTOR_DS_ROLES_KSPLIT"):
        K.ds_roles_cost(64, 768, 3072, 168)


def test_prefetch_switch(monkeypatch, triton_cpu):
    """``FASTFACTOR_DS_ROLES_PREFETCH=0`` prices and launches the consumers without their
    prefetched step (what gpu-check times it against): slower predicted, the same bits; anything
    but 0/1/auto is refused by name."""
    x, d, values, meta, b = _case(5, 128, 48, 100, BF16, seed=3)
    on_t = K.ds_roles_cost(16, 768, 3072, 168)[0]
    on_y, _ = K.ds_roles(x, d, values, meta, b, plan=(16, 32))
    monkeypatch.setenv(K.PREFETCH_ENV, "0")
    assert not K.roles_prefetch(32, 64, 16) and K.ds_roles_cost(16, 768, 3072, 168)[0] > on_t
    off_y, _ = K.ds_roles(x, d, values, meta, b, plan=(16, 32))
    assert torch.equal(on_y, off_y)
    monkeypatch.setenv(K.PREFETCH_ENV, "yes")
    with pytest.raises(ValueError, match=K.PREFETCH_ENV):
        K.ds_roles_cost(16, 768, 3072, 168)


def test_rank_step():
    """The consumers' step over the rank: 64 wide where the tiles fit, never below the chunk nor
    past the rank's power of two."""
    assert K.roles_rank_step(168, 16, 32, 64) == 64
    assert K.roles_rank_step(20, 16, 32, 16) == 32 and K.roles_rank_step(12, 16, 32, 16) == 16
    assert K.roles_rank_step(168, 64, 32, 16) == 64
    for R, br, bn, bm in ((168, 16, 64, 64), (336, 32, 128, 64), (655, 16, 256, 16)):
        bc = K.roles_rank_step(R, br, bn, bm)
        assert bc >= br and bn * bc + bc * bm + 2 * bn * bm <= 104 * 32 * 4 or bc == br


def test_fixed_config_on_a_gpu_fits_the_plan(monkeypatch):
    monkeypatch.setattr(_config, "is_interpreter", lambda: False)
    for br, bn, bm in ((16, 32, 16), (64, 64, 16), (32, 64, 64)):
        cfg = K._ds_roles_tuned.fixed_config(dict(BLOCK_R=br, BLOCK_N=bn, BLOCK_M=bm))
        assert cfg.kwargs["BLOCK_K"] >= 128 and K._rs_fits(br, bn, bm, cfg.kwargs["BLOCK_K"], cfg.num_warps)
