"""The 2:4 backward at a handful of tokens in one launch: ``dx = g·W``, the bias gradient and the
kept values' gradient ``kept(gᵀ·x)`` from the dx-decode kernel (``HAS_DV``), each weight tile
streamed by one program that also forms its dense gradient.

Against float64 (fp32/bf16, splits and partial tiles, strided ``g`` and ``x``) with NaN-filled
fresh buffers; the kept-value gradient bit for bit equal to the kept-value kernel's where both
reduce the tokens in one step; the ops' backward (``sparse24_linear``, ``dense_sparse_linear``) on
and off the fused launch, one launch fewer; the dispatch and the register rule (predicted, not
measured)."""

from __future__ import annotations

import pytest
import torch

from conftest import CountLaunches, assert_close_ref, nan_filled_empty
from fastfactor.formats.sparse24 import Sparse24Weight, pack_24, prune_24
from fastfactor.kernels import _config
from fastfactor.kernels import sparse24 as K
from fastfactor.ops import sparse24 as ops

BF16 = torch.bfloat16


def _case(m, n, k, dtype, seed, strided=False):
    gen = torch.Generator().manual_seed(seed)
    w = pack_24(prune_24(torch.randn(n, k, generator=gen)).to(dtype))
    g = torch.randn(m, 2 * n if strided else n, generator=gen).to(dtype)
    g = g[:, ::2] if strided else g
    x = torch.randn(m, 2 * k if strided else k, generator=gen).to(dtype)
    x = x[:, 1::2] if strided else x
    return w, g, x


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,n,k,plan,strided", [
    (16, 384, 256, (64, 3), False),    # 4 column tiles x 3 weight-row splits (128 rows each)
    (5, 200, 96, (32, 2), True),       # partial splits and column tiles, strided g and x
    (33, 130, 128, (64, 1), False),    # BLOCK_M 64, no split
    (1, 64, 32, (32, 1), False),       # one token
])
def test_matches_float64(triton_cpu, dtype, m, n, k, plan, strided):
    w, g, x = _case(m, n, k, dtype, seed=m + n + k, strided=strided)
    with nan_filled_empty():
        dv = torch.empty(n, k // 2, dtype=dtype)
        db = torch.empty(n, dtype=dtype)
        dx = K.sparse24_dx_decode(g, w.values, w.meta, plan=plan, db=db, x=x, dv=dv)
    wd = K.unpack_24(w.values.double(), w.meta, k)
    assert_close_ref(dx, g.double() @ wd, dtype, reduction=n, name="dx")
    assert_close_ref(db, g.double().sum(0), dtype, reduction=m, name="db")
    dv64 = K.compress_like(g.double().t() @ x.double(), w.meta)
    assert_close_ref(dv, dv64, dtype, reduction=m, name="dv")


def test_same_bits_as_the_two_launches(triton_cpu):
    """Where the kept-value kernel reduces the tokens in one step (M <= its BLOCK_M), the fused
    launch stores the same bits; ``dx`` is the dx-decode's own, with or without the gradient."""
    for dtype in (torch.float32, BF16):
        w, g, x = _case(12, 256, 192, dtype, seed=3)
        dv = torch.empty(256, 96, dtype=dtype)
        dx = K.sparse24_dx_decode(g, w.values, w.meta, plan=(64, 2), x=x, dv=dv)
        assert torch.equal(dv, K.sparse24_dvalues(g, x, w.meta, out_dtype=dtype))
        assert torch.equal(dx, K.sparse24_dx_decode(g, w.values, w.meta, plan=(64, 2)))


def test_rejects_half_the_arguments(triton_cpu):
    w, g, x = _case(4, 64, 32, torch.float32, seed=0)
    with pytest.raises(ValueError, match="x, dv: expected both"):
        K.sparse24_dx_decode(g, w.values, w.meta, x=x)
    with pytest.raises(ValueError, match=r"x, dv: expected shapes \(4, 32\) and \(64, 16\)"):
        K.sparse24_dx_decode(g, w.values, w.meta, x=x, dv=torch.empty(64, 32))
    dv = torch.full((64, 16), float("nan"))
    K.sparse24_dx_decode(g[:0], w.values, w.meta, x=x[:0], dv=dv)
    assert int(dv.abs().sum()) == 0                     # no tokens: a zero gradient


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_sparse24_backward_on_and_off(triton_cpu, monkeypatch, dtype):
    """``sparse24_linear``'s backward with the fused launch forced on and off: every gradient against
    float64, and on it the kept-value kernel is not launched."""
    m, n, k = 6, 96, 64
    w, g, x = _case(m, n, k, dtype, seed=5)
    b = torch.randn(n).to(dtype)

    def run(mode):
        monkeypatch.setenv("FASTFACTOR_SPARSE24_DXDV", mode)
        leaves = [a.clone().requires_grad_(True) for a in (x, w.values, b)]
        y = ops.sparse24_linear(leaves[0], Sparse24Weight(leaves[1], w.meta, (n, k)), leaves[2])
        y.backward(g)
        return [a.grad for a in leaves]

    spy = CountLaunches(K._sp_dv_tuned)
    monkeypatch.setattr(K, "_sp_dv_tuned", spy)
    fused = run("1")
    assert spy.n == 0
    apart = run("0")
    assert spy.n == 1
    leaves = [a.detach().double().requires_grad_(True) for a in (x, w.values, b)]
    y64 = leaves[0] @ K.unpack_24(leaves[1], w.meta, k).t() + leaves[2]
    y64.backward(g.double())
    for got, other, ref, red, name in zip(fused, apart, [a.grad for a in leaves], (n, m, m), ("dx", "dW", "db")):
        assert_close_ref(got, ref, dtype, reduction=red, name=name)
        assert_close_ref(other, ref, dtype, reduction=red, name=name + " (apart)")


def test_dense_sparse_backward_takes_it(triton_cpu, monkeypatch):
    """The dense-sparse library backward's sparse side (``dx = dt·S``, ``dS = kept(dtᵀ·x)``) in one
    launch too, against float64."""
    monkeypatch.setenv("FASTFACTOR_DS_PATH", "library")
    monkeypatch.setenv("FASTFACTOR_SPARSE24_DXDV", "1")
    spy = CountLaunches(K._sp_dv_tuned)
    monkeypatch.setattr(K, "_sp_dv_tuned", spy)
    M, k, n, R = 6, 128, 40, 36
    gen = torch.Generator().manual_seed(9)
    p = pack_24(prune_24(torch.randn(R, k, generator=gen)))
    x = torch.randn(M, k, generator=gen).requires_grad_(True)
    d = (torch.randn(n, R, generator=gen) / 6).requires_grad_(True)
    vals = p.values.clone().requires_grad_(True)
    y = ops.dense_sparse_linear(x, d, Sparse24Weight(vals, p.meta, (R, k)), None)
    gy = torch.randn(M, n, generator=gen)
    y.backward(gy)
    assert spy.n == 0
    leaves = [a.detach().double().requires_grad_(True) for a in (x, d, vals)]
    y64 = (leaves[0] @ K.unpack_24(leaves[2], p.meta, k).t()) @ leaves[1].t()
    y64.backward(gy.double())
    for got, ref, red, name in ((x.grad, leaves[0].grad, n + R, "dx"), (vals.grad, leaves[2].grad, M * n, "dS")):
        assert_close_ref(got, ref, torch.float32, reduction=red, name=name)


def test_dispatch(monkeypatch):
    """Fused where predicted >= 5 % faster than the two launches (a launch floor saved against the
    selection's instructions in the dx loop): BERT-size layers and 4096² at 16 tokens; not at
    4096² and 64 tokens (issue-bound); above 64 tokens never; switched by the environment."""
    monkeypatch.delenv("FASTFACTOR_SPARSE24_DXDV", raising=False)
    for m, n, k in ((16, 3072, 768), (16, 768, 3072), (16, 4096, 4096), (64, 168, 768)):
        fused = K.dx_decode_plan_cost(m, n, k, 132, dv=True)[0]
        apart = K.dx_decode_plan_cost(m, n, k, 132)[0] + K._dvalues_seconds(m, n, k, 2, 132)
        assert K.dx_dv_fused_ok(m, n, k, 132) and fused <= K.DS_MARGIN * apart, (m, n, k, fused, apart)
    assert not K.dx_dv_fused_ok(64, 4096, 4096, 132)
    assert not K.dx_dv_fused_ok(65, 768, 768, 132)
    monkeypatch.setenv("FASTFACTOR_SPARSE24_DXDV", "0")
    assert not K.dx_dv_fused_ok(16, 3072, 768, 132)
    monkeypatch.setenv("FASTFACTOR_SPARSE24_DXDV", "1")
    assert K.dx_dv_fused_ok(64, 4096, 4096, 132)
    monkeypatch.setenv("FASTFACTOR_SPARSE24_DXDV", "yes")
    with pytest.raises(ValueError, match="FASTFACTOR_SPARSE24_DXDV"):
        K.dx_dv_fused_ok(16, 3072, 768, 132)


def test_register_rule_and_prune(monkeypatch):
    """The fused configs leave room for the dense gradient tile: fewer fit than without it, every
    planned tile has one, and the prune keeps only fitting ones on a GPU."""
    for bk, bm in ((32, 16), (64, 16), (128, 16), (32, 64)):
        with_dv, without = K.dxd_space(bk, bm, HAS_DV=True), K.dxd_space(bk, bm)
        assert with_dv and len(with_dv) <= len(without)
        assert all(K._dxd_dv_ok(bk, bm, c["BLOCK_N"], c["num_warps"]) for c in with_dv)
    planned = {p for _, _, p in K.dx_decode_plans(64, 4096, 4096, 132, dv=True)}
    assert planned and all(K.dxd_space(bk, 64, HAS_DV=True) for bk, _ in planned)
    assert not any(bk == 64 for bk, _ in planned)       # no fused config fits 64 columns at 64 tokens
    monkeypatch.setattr(_config, "is_interpreter", lambda: False)
    cfg = K._sp_dx_decode_tuned.fixed_config(dict(BLOCK_K=64, BLOCK_M=16, HAS_DV=True))
    assert K._dxd_dv_ok(64, 16, cfg.kwargs["BLOCK_N"], cfg.num_warps)
