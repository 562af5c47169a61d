"""The rank-split dense-sparse launch (``ds_rank_split``, ``_ds_rank_split_kernel``): ``y = (x·Sᵀ)·Dᵀ + b``
for a handful of tokens in one launch, each program forming a chunk of ``t = x·Sᵀ`` whole and its
share of ``y``, the chunks' fp32 partials summed by each column tile's last arrival.

Against float64 (every dtype, bias on/off, ``t`` stored or not, one chunk and several, partial
chunks and column tiles, strided ``x``), with every fresh float buffer filled with NaN; the
counter-reduced launch against the id-order one bit for bit (counters reset); the op on this path
forward and backward; the dispatch (predicted, not measured)."""

from __future__ import annotations

import pytest
import torch

from conftest import KwargSpy, assert_close_ref, dense_sparse_case, dense_sparse_ref64, nan_filled_empty
from fastfactor.formats.sparse24 import Sparse24Weight
from fastfactor.kernels import _config
from fastfactor.kernels import sparse24 as K
from fastfactor.ops import sparse24 as ops

BF16, CUDA = torch.bfloat16, torch.device("cuda")


_case, _ref64 = dense_sparse_case, dense_sparse_ref64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M,k,n,R,plan,bias,store_t,strided", [
    (5, 256, 96, 40, (16, 32), True, True, False),     # 3 chunks (the last partial) x 3 column tiles
    (16, 512, 70, 100, (32, 64), False, False, True),  # 4 chunks, a partial column tile, strided x and D
    (3, 288, 50, 20, (32, 32), True, True, False),     # one chunk: no partials; K not a step multiple
    (1, 256, 33, 64, (16, 16), True, False, False),    # one token, 4 whole chunks
    (33, 256, 64, 48, (16, 64), True, True, True),     # BLOCK_M 64
])
def test_matches_float64(triton_cpu, dtype, M, k, n, R, plan, bias, store_t, strided):
    x, d, values, meta, b = _case(M, k, n, R, dtype, seed=M + n + R, strided=strided)
    b = b if bias else None
    with nan_filled_empty():
        y, t = K.ds_rank_split(x, d, values, meta, b, store_t=store_t, plan=plan)
    y64, t64 = _ref64(x, d, values, meta, b, k)
    assert y.dtype == dtype and y.shape == (M, n)
    assert_close_ref(y, y64, dtype, reduction=k + R, name="y")
    if store_t:
        assert t.dtype == K.intermediate_dtype(dtype) and t.shape == (M, R)
        assert_close_ref(t, t64, dtype, reduction=k, name="t")
    else:
        assert t is None


def test_vector_loads_of_d_take_the_same_values(triton_cpu, monkeypatch):
    """``D_VEC`` (``D``'s rows on 16 bytes: its tile as 16-byte vectors on a GPU) is taken exactly
    when the row stride and the rank are multiples of 8 and gives the bits of the strided form."""
    seen = []
    monkeypatch.setattr(K, "_ds_rank_split_tuned", KwargSpy(K._ds_rank_split_tuned, "D_VEC", seen))
    for R, stride, want in ((48, 48, True), (48, 56, True), (44, 44, False), (48, 52, False)):
        x, _, values, meta, b = _case(4, 256, 40, R, BF16, seed=R)
        d = torch.randn(40, stride).to(BF16)[:, :R]
        y = K.ds_rank_split(x, d, values, meta, b, plan=(16, 32))[0]
        assert seen[-1] == want, (R, stride)
        assert torch.equal(y, K.ds_rank_split(x, d.contiguous().t().contiguous().t(), values, meta, b,
                                              plan=(16, 32))[0])
        assert seen[-1] is False                   # a column-major D: the strided form
        assert_close_ref(y, _ref64(x, d, values, meta, b, 256)[0], BF16, reduction=256 + R)


def _launch(x, d, values, meta, b, plan, sync, cnt=None):
    """The kernel launched by hand (as ``ds_rank_split`` does), ``SYNC`` chosen by the test."""
    M, k = x.shape
    n, R = d.shape
    br, bn = plan
    ch, nt = -(-R // br), -(-n // bn)
    mt, smr, smc, m32 = K._meta_arg(meta, k)
    y = torch.empty(M, n, dtype=x.dtype)
    ws = torch.empty(ch, M, n, dtype=torch.float32)
    cnt = torch.zeros(nt, dtype=torch.int32) if cnt is None else cnt
    K._ds_rank_split_tuned[(nt * ch,)](
        x, values, mt, d, b, y, y, ws, cnt if sync else ws,
        M, k, n, R, ch, x.stride(0), x.stride(1), values.stride(0), values.stride(1), smr, smc,
        d.stride(0), d.stride(1), y.stride(0), y.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=True, STORE_T=False, T_FP32=False, SPLIT=True, SYNC=sync, UPCAST=True, PRECISION="ieee",
        META32=m32, PAIRS=False, PRMT=0, D_VEC=False, BLOCK_R=br, BLOCK_N=bn, BLOCK_M=16,
    )
    return y, cnt


def test_counter_path_matches_id_order_bitwise_and_resets(triton_cpu):
    x, d, values, meta, b = _case(7, 256, 80, 72, torch.float32, seed=11)
    y_id, _ = _launch(x, d, values, meta, b, (16, 32), sync=False)
    y_cnt, cnt = _launch(x, d, values, meta, b, (16, 32), sync=True)
    assert torch.equal(y_id, y_cnt)
    assert int(cnt.abs().sum()) == 0, "the reducers reset their counters"
    y_again, _ = _launch(x, d, values, meta, b, (16, 32), sync=True, cnt=cnt)      # reused counters
    assert torch.equal(y_again, y_id)
    assert_close_ref(y_id, _ref64(x, d, values, meta, b, 256)[0], torch.float32, reduction=256 + 72)


def test_plans_agree_and_rerun_bitwise(triton_cpu):
    x, d, values, meta, b = _case(16, 256, 64, 96, BF16, seed=2)
    y64 = _ref64(x, d, values, meta, b, 256)[0]
    outs = [K.ds_rank_split(x, d, values, meta, b, plan=p)[0] for p in ((16, 64), (32, 32), (64, 16))]
    for y in outs:
        assert_close_ref(y, y64, BF16, reduction=256 + 96)
    assert torch.equal(outs[1], K.ds_rank_split(x, d, values, meta, b, plan=(32, 32))[0])


def test_prmt_expansion_equals_compare_select_bitwise(triton_cpu, monkeypatch):
    """A chunk of 32 rows x 256-input steps takes the byte permutes (``PRMT_MIN_TILE``) in the
    interpreter's emulation; the compare-and-select form gives the same bits."""
    x, d, values, meta, b = _case(12, 512, 48, 64, BF16, seed=4)
    y1 = K.ds_rank_split(x, d, values, meta, b, plan=(32, 16))[0]
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PRMT", "0")
    y0 = K.ds_rank_split(x, d, values, meta, b, plan=(32, 16))[0]
    assert torch.equal(y1.view(torch.int16), y0.view(torch.int16))


def test_empty_and_rejected_shapes(triton_cpu):
    x, d, values, meta, b = _case(4, 64, 8, 16, torch.float32, seed=0)
    y, t = K.ds_rank_split(x[:0], d, values, meta, b, store_t=True)
    assert y.shape == (0, 8) and t.shape == (0, 16)
    with pytest.raises(ValueError, match="x: ds_rank_split takes at most 64 rows, got 65"):
        K.ds_rank_split(torch.randn(65, 64), d, values, meta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path,launcher", [("rank_split", "ds_rank_split"), ("roles", "ds_roles")])
def test_op_on_a_one_launch_path_forward_and_backward(triton_cpu, monkeypatch, dtype, path, launcher):
    """``dense_sparse_linear`` forced onto the rank split or the two-role launch: ``y`` and every
    gradient against float64 (the backward takes the saved ``t`` the launch stored)."""
    monkeypatch.setenv("FASTFACTOR_DS_PATH", path)
    calls = []
    real = getattr(K, launcher)
    monkeypatch.setattr(K, launcher, lambda *a, **kw: calls.append(kw.get("store_t")) or real(*a, **kw))
    M, k, n, R = 6, 128, 40, 36
    x, d, values, meta, b = _case(M, k, n, R, dtype, seed=9)
    x, d, b = (t.clone().requires_grad_(True) for t in (x, d, b))
    vals = values.clone().requires_grad_(True)
    y = ops.dense_sparse_linear(x, d, Sparse24Weight(vals, meta, (R, k)), b)
    assert calls == [True]
    leaves = [t.detach().double().requires_grad_(True) for t in (x, d, vals, b)]
    y64 = (leaves[0] @ K.unpack_24(leaves[2], meta, k).t()) @ leaves[1].t() + leaves[3]
    assert_close_ref(y, y64, dtype, reduction=k + R, name="y")
    g = torch.randn(M, n).to(dtype)
    y.backward(g)
    y64.backward(g.double())
    for got, ref, red, name in ((x.grad, leaves[0].grad, n + R, "dx"), (d.grad, leaves[1].grad, M * k, "dD"),
                                (vals.grad, leaves[2].grad, M * n, "dS"), (b.grad, leaves[3].grad, M, "db")):
        assert_close_ref(got, ref, dtype, reduction=red, name=name)


def test_dispatch(on_gpu_model, monkeypatch):
    """A handful of tokens on a square layer whose rank is a large share of it (768², rank 256 from
    1 to 8 tokens) takes the rank split (predicted faster than the decode + cuBLAS pair by more than
    the margin, and than the two-role launch); on BERT-size rectangles and 4096² the two-role launch
    with its producers split over ``K`` is cheaper still (test_ds_roles.py); above 64 tokens the
    rank split is not a candidate."""
    for M, k, n, R in ((1, 768, 768, 256), (4, 768, 768, 256), (8, 768, 768, 256)):
        c = K.ds_path_costs(M, k, n, R, BF16, CUDA)
        assert K.choose_ds_path(M, k, n, R, BF16, CUDA) == "rank_split", (M, k, n, R, c)
        assert c["rank_split"] <= K.DS_MARGIN * c["library"] and c["rank_split"] <= c["roles"]
    for M, k, n, R in ((16, 768, 3072, 168), (16, 768, 3072, 336), (16, 3072, 768, 168), (16, 4096, 4096, 655)):
        c = K.ds_path_costs(M, k, n, R, BF16, CUDA)      # cheaper still: the two roles
        assert c["rank_split"] <= K.DS_MARGIN * c["library"] or k == 4096
        assert c["roles"] < c["rank_split"] and K.choose_ds_path(M, k, n, R, BF16, CUDA) == "roles"
    assert "rank_split" not in K.ds_path_costs(65, 768, 3072, 168, BF16, CUDA)
    assert K.ds_rank_split_cost(65, 768, 3072, 168) is None
    # fp16 weighs them against its two-kernel path (test_ds_dispatch.py), or takes them forced
    assert K.choose_ds_path(16, 768, 3072, 336, torch.float16, CUDA) == "roles"
    monkeypatch.setenv("FASTFACTOR_DS_PATH", "rank_split")
    assert K.choose_ds_path(16, 768, 3072, 336, torch.float16, CUDA) == "rank_split"
    assert K.choose_ds_path(128, 768, 3072, 336, BF16, CUDA) == "library"          # above 64 tokens
    assert K.choose_ds_path(128, 768, 3072, 336, torch.float16, CUDA) == "two_kernel"


def test_plan_prices_bytes_and_fill():
    """The planner's terms: one chunk stores no partials; more column tiles re-read ``S``; the pick
    is one of the plans and fits the registers."""
    plans = K.ds_rank_split_plans(16, 768, 3072, 168)
    assert plans and all(t_low >= t_nom for t_nom, t_low, _ in plans)
    t, br, bn = K.ds_rank_split_cost(16, 768, 3072, 168)
    assert (br, bn) in [p for _, _, p in plans] and K.rs_space(br, bn, 16)
    # a rank within one chunk: no partials, so only S, D, x, y and the bias move
    one = {p: (a, b) for a, b, p in K.ds_rank_split_plans(16, 768, 3072, 16)}
    assert (16, 256) in one


def test_fixed_config_on_a_gpu_fits_the_plan(monkeypatch):
    """Deterministic mode on a GPU launches the first GPU config the prune keeps: a step of at
    least 128 inputs (16-byte code rows) within the register budget of the planned tiles."""
    monkeypatch.setattr(_config, "is_interpreter", lambda: False)
    for br, bn, bm in ((16, 256, 16), (64, 64, 16), (32, 64, 64)):
        cfg = K._ds_rank_split_tuned.fixed_config(dict(BLOCK_R=br, BLOCK_N=bn, BLOCK_M=bm))
        assert cfg.kwargs["BLOCK_K"] >= 128 and K._rs_fits(br, bn, bm, cfg.kwargs["BLOCK_K"], cfg.num_warps)
        assert cfg.kwargs in [{k: v for k, v in c.items() if k.startswith("BLOCK")} for c in K.rs_space(br, bn, bm)]
