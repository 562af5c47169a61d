"""Tier 1 (cpu): the row-block backward with ``dw2`` (and ``db``) taken by the ``dx`` launch
(``DW2``: ``g`` read once; ``kernels/monarch.py``, :func:`rows_dw2`) under the interpreter: float64
references for every gradient, both families, every dtype, bias on and off, ``dw1`` needed or
not, odd sizes (padding features), strided ``g``, fresh buffers poisoned with NaN; the launches
(one DW2 row-block launch, then one weight-gradient launch: the pair with ``dw1``, its side B
summing the row-block partials, or that sum alone); the decision and its switch; the pricing."""

import dataclasses

import pytest
import torch

from conftest import CountLaunches, assert_close_ref, assert_monarch_grads, monarch_factors
from fastfactor.kernels import monarch as Mk

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
#: (M, K, N, b, r): N % b != 0 (dw2's padding features; "pad16": past a whole number of the
#: interpreter's 16-feature steps), b·r = 2, 4, 5 and 8
SHAPES = {"odd": (37, 30, 21, 4, 1), "pad16": (29, 35, 48, 5, 1), "r2": (50, 24, 40, 2, 2),
          "br8": (33, 16, 48, 4, 2)}


def _bwd(x, w1, w2, g, strided, has_bias, need_w1, dw2):
    """``monarch_bwd`` on the row-block path with ``FASTFACTOR_MONARCH_DW2`` = ``dw2`` and every
    fresh float buffer filled with NaN; the results and the launches of the DW2 row-block
    launcher, the pair and the single weight-gradient kernels."""
    N = g.shape[1]
    _, h = Mk.monarch_fwd(x, w1, w2, None, N, strided, save_h=True, path="rows")
    saved = (Mk._rows_dw2_tuned, Mk._wgrad_pair_tuned, Mk._wgrad_tuned)
    counts = [CountLaunches(t) for t in saved]
    mp = pytest.MonkeyPatch()
    empty = torch.empty

    def poisoned(*args, **kwargs):   # fresh buffers hold NaN: an element never written shows
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    try:
        mp.setattr(torch, "empty", poisoned)
        mp.setattr(Mk, "ROWS_ONE_LAUNCH_MAX_M", 0)   # these few rows: the row-block partials' form
        mp.setenv("FASTFACTOR_MONARCH_DW2", dw2)
        Mk._rows_dw2_tuned, Mk._wgrad_pair_tuned, Mk._wgrad_tuned = counts
        out = Mk.monarch_bwd(g, x, w1, w2, h, strided, has_bias, need_w1=need_w1, path="rows")
    finally:
        Mk._rows_dw2_tuned, Mk._wgrad_pair_tuned, Mk._wgrad_tuned = saved
        mp.undo()
    return out, tuple(c.n for c in counts)


def _cases():
    out = []
    for fam, strided in (("monarch", True), ("block_lowrank", False)):
        for dn in DTYPES:
            for shape in SHAPES:
                if dn in ("fp32", "bf16") or shape in ("odd", "pad16"):
                    out.append(pytest.param(DTYPES[dn], strided, shape, id=f"{dn}-{fam}-{shape}"))
    return out


@pytest.mark.parametrize("dtype,strided,shape", _cases())
def test_dw2_in_dx_vs_float64(triton_cpu, dtype, strided, shape):
    """dx, dw1, dw2, db against float64 with dw2 and db from the dx launch's row-block partials;
    one DW2 launch and one pair launch (dw1 beside the partials' sum); as close as the pair path."""
    M, K, N, b, r = SHAPES[shape]
    x, w1, w2, _ = (t.detach() for t in monarch_factors(M, K, N, b, r, dtype, seed=3))
    g = torch.randn(M, N, generator=torch.Generator().manual_seed(4)).to(dtype)
    out, (dw2_n, pair_n, single_n) = _bwd(x, w1, w2, g, strided, True, True, "1")
    assert (dw2_n, pair_n, single_n) == (1, 1, 0)
    old, (dw2_old, pair_old, _) = _bwd(x, w1, w2, g, strided, True, True, "0")
    assert (dw2_old, pair_old) == (0, 1)
    ref = Mk.monarch_bwd_ref(g.double(), x.double(), w1.double(), w2.double(), None, strided)
    for name, a, o, e in zip(["dx", "dw1", "dw2", "db"], out, old, ref):
        assert a.dtype == o.dtype and a.shape == o.shape, name
        assert_close_ref(a, e, dtype, reduction=max(M, K, N), name=name)
    assert torch.equal(out[0], old[0]) and torch.equal(out[1], old[1])   # dx, dw1: the same launches' bits
    assert out[2].data_ptr() != out[3].data_ptr()                        # the outputs do not alias


@pytest.mark.parametrize("has_bias,need_w1", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("strided", [True, False], ids=["monarch", "block_lowrank"])
def test_dw2_in_dx_bias_and_need_w1(triton_cpu, strided, has_bias, need_w1):
    """Without the bias db is None (no db partials); without dw1 the partials are summed by the
    one-gradient launch."""
    M, K, N, b, r = SHAPES["odd"]
    dtype = torch.bfloat16
    x, w1, w2, _ = (t.detach() for t in monarch_factors(M, K, N, b, r, dtype, seed=5))
    g = torch.randn(M, N, generator=torch.Generator().manual_seed(6)).to(dtype)
    out, counts = _bwd(x, w1, w2, g, strided, has_bias, need_w1, "1")
    assert counts == (1, int(need_w1), int(not need_w1))
    assert_monarch_grads(out, x, w1, w2, g, strided, dtype, need_w1=need_w1, has_bias=has_bias)


def test_dw2_in_dx_strided_g(triton_cpu):
    """A strided (non-contiguous) g is read through its strides by the DW2 launch."""
    M, K, N, b, r = SHAPES["r2"]
    x, w1, w2, _ = (t.detach() for t in monarch_factors(M, K, N, b, r, torch.float32, seed=8))
    g = torch.randn(M, 2 * N + 1, generator=torch.Generator().manual_seed(9))[:, 1::2]
    assert not g.is_contiguous()
    out, counts = _bwd(x, w1, w2, g, True, True, True, "1")
    assert counts == (1, 1, 0)
    ref = Mk.monarch_bwd_ref(g.double(), x.double(), w1.double(), w2.double(), None, True)
    for name, a, e in zip(["dx", "dw1", "dw2", "db"], out, ref):
        assert_close_ref(a, e, torch.float32, reduction=max(M, K, N), name=name)


def test_dw2_decision_and_switch(monkeypatch):
    """The model takes DW2 at many rows (768x3072 and 4096², 16384 tokens, b = 4), not at a
    handful of rows, not where its row blocks underfill the SMs (4096 tokens: 64 blocks), not
    where the dx launch has no packed stage 1 (b·r = 16); the switch forces it off and on, and
    rejects other values."""
    monkeypatch.delenv("FASTFACTOR_MONARCH_DW2", raising=False)
    assert Mk.rows_dw2(16384, 768, 3072, 4, 1, sms=132)
    assert Mk.rows_dw2(16384, 4096, 4096, 4, 1, sms=132)
    assert not Mk.rows_dw2(16, 768, 3072, 4, 1, sms=132)
    assert not Mk.rows_dw2(4096, 4096, 4096, 4, 1, sms=132)
    assert not Mk.rows_dw2_ok(16384, 768, 3072, 16, 1) and not Mk.rows_dw2(16384, 768, 3072, 16, 1, sms=132)
    monkeypatch.setenv("FASTFACTOR_MONARCH_DW2", "0")
    assert not Mk.rows_dw2(16384, 768, 3072, 4, 1, sms=132)
    monkeypatch.setenv("FASTFACTOR_MONARCH_DW2", "1")
    assert Mk.rows_dw2(4096, 4096, 4096, 4, 1, sms=132)
    assert not Mk.rows_dw2(16384, 768, 3072, 16, 1, sms=132)       # does not exist there
    monkeypatch.setenv("FASTFACTOR_MONARCH_DW2", "yes")
    with pytest.raises(ValueError, match="FASTFACTOR_MONARCH_DW2"):
        Mk.rows_dw2(16384, 768, 3072, 4, 1, sms=132)


@pytest.mark.parametrize("need_w1", [True, False])
def test_dw2_pricing_launches(monkeypatch, need_w1):
    """``_bwd_path_seconds`` prices the dx launch and one weight-gradient launch (one floor each)
    with ``dw2`` True (the partials summed in that launch) or False (the pair launch). At 768x3072,
    16384 tokens, b = 4 the DW2 form is cheaper (g read once)."""
    from fastfactor.sol.device import H200

    monkeypatch.delenv("FASTFACTOR_MONARCH_DW2", raising=False)
    M, K, N, b, r = 16384, 768, 3072, 4, 1
    slow = dataclasses.replace(H200, launch_s=H200.launch_s + 1e-3)
    dx = lambda dev: Mk._path_seconds(M, N, K, b, r, "rows", save_h=need_w1, strided=False, dev=dev,
                                      in_interleaved=True)
    dx_launches = round((dx(slow) - dx(H200)) / 1e-3)      # (as test_wgrad_fused counts them)
    t = {}
    for dw2 in (True, False):
        t0 = Mk._bwd_path_seconds(M, K, N, b, r, "rows", need_w1=need_w1, dev=H200, dw2=dw2)
        t1 = Mk._bwd_path_seconds(M, K, N, b, r, "rows", need_w1=need_w1, dev=slow, dw2=dw2)
        t[dw2] = t0
        assert round((t1 - t0) / 1e-3) == dx_launches + 1
    assert t[True] < t[False]
