"""Tier 1 (cpu): the row-block backward in ONE launch at one row block (``M <= 32``;
:func:`kernels.monarch.rows_one_launch`): the ``dx`` launch stores ``dw2`` and ``db`` whole from
its ``g`` tiles and the saved ``h`` (``DW2``) and ``dw1`` from ``x`` tiles in stage 2 (``DW1``),
unsplit or with its stage 1 split over a wide ``g`` (``KSPLIT``). Float64 references for every
gradient, both families, every dtype, bias on and off, padding features on both sides, strided
inputs, fresh buffers poisoned with NaN; the launch count; when it is not taken; the pricing."""

import dataclasses

import pytest
import torch

from conftest import CountLaunches, assert_monarch_grads, monarch_factors, nan_filled_empty
from fastfactor.kernels import monarch as Mk

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
#: (M, K, N, b, r): K and N not multiples of b (dw1's and dw2's padding features), b·r = 2 .. 8
SHAPES = {"odd": (7, 30, 21, 4, 1), "r2": (16, 24, 40, 2, 2), "b5": (13, 48, 33, 5, 1),
          "br8": (16, 20, 36, 4, 2)}
LAUNCHERS = ("_rows_tuned", "_rows_dw2_tuned", "_rows_ks_tuned", "_wgrad_pair_tuned", "_wgrad_tuned")


def _bwd(x, w1, w2, g, strided, has_bias, env, need_w1=True, need_w2=True):
    """``monarch_bwd`` (row-block path) under ``env`` with fresh float buffers filled with NaN;
    the results and the launches of each of :data:`LAUNCHERS`."""
    N = g.shape[1]
    _, h = Mk.monarch_fwd(x, w1, w2, None, N, strided, save_h=True, path="rows")
    saved = {n: getattr(Mk, n) for n in LAUNCHERS}
    counts = {n: CountLaunches(t) for n, t in saved.items()}
    mp = pytest.MonkeyPatch()
    try:
        for k, v in env.items():
            mp.setenv(k, v)
        for n, c in counts.items():
            setattr(Mk, n, c)
        with nan_filled_empty():
            out = Mk.monarch_bwd(g, x, w1, w2, h, strided, has_bias, need_w1=need_w1, need_w2=need_w2, path="rows")
    finally:
        for n, t in saved.items():
            setattr(Mk, n, t)
        mp.undo()
    return out, {n: c.n for n, c in counts.items() if c.n}


def _inputs(shape, dtype, seed, strided_x=False):
    M, K, N, b, r = shape
    x, w1, w2, _ = (t.detach() for t in monarch_factors(M, K, N, b, r, dtype, seed=seed))
    if strided_x:
        x = torch.cat((x, x), 1)[:, ::2]
    g = torch.randn(M, N, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return x, w1, w2, g


def _cases():
    out = []
    for fam, strided in (("monarch", True), ("block_lowrank", False)):
        for dn in DTYPES:
            for shape in SHAPES:
                if dn in ("fp32", "bf16") or shape == "odd":
                    out.append(pytest.param(DTYPES[dn], strided, shape, id=f"{dn}-{fam}-{shape}"))
    return out


@pytest.mark.parametrize("dtype,strided,shape", _cases())
def test_one_launch_vs_float64(triton_cpu, dtype, strided, shape):
    """Every gradient against float64 from ONE launch (the row-block kernel with DW2 and DW1), and
    the same results as the dx + pair launches up to the last bit of their sums."""
    x, w1, w2, g = _inputs(SHAPES[shape], dtype, seed=3)
    out, n = _bwd(x, w1, w2, g, strided, True, {"FASTFACTOR_MONARCH_DW2": "1"})
    assert n == {"_rows_dw2_tuned": 1}
    assert_monarch_grads(out, x, w1, w2, g, strided, dtype)
    old, n_old = _bwd(x, w1, w2, g, strided, True, {"FASTFACTOR_MONARCH_DW2": "0"})
    assert n_old == {"_rows_tuned": 1, "_wgrad_pair_tuned": 1}
    assert torch.equal(out[0], old[0])                                   # dx: the same launch's bits
    assert len({t.data_ptr() for t in out}) == 4                         # the outputs do not alias


@pytest.mark.parametrize("strided", [True, False], ids=["monarch", "block_lowrank"])
def test_one_launch_split_stage1(triton_cpu, strided):
    """With the dx launch's stage 1 split over a wide g (forced): still one launch, the last split
    walking dw2's padding features."""
    shape = (9, 20, 96, 5, 1)            # N = 96 (whole 16-feature steps), 5 blocks of 20: padding in dw2
    dtype = torch.float32
    x, w1, w2, g = _inputs(shape, dtype, seed=5)
    env = {"FASTFACTOR_MONARCH_DW2": "1", "FASTFACTOR_MONARCH_KSPLIT": "1"}
    out, n = _bwd(x, w1, w2, g, strided, True, env)
    assert n == {"_rows_ks_tuned": 1}
    assert_monarch_grads(out, x, w1, w2, g, strided, dtype)


@pytest.mark.parametrize("has_bias", [True, False])
def test_one_launch_strided_x_and_bias(triton_cpu, has_bias):
    """A strided x is read through its strides by stage 2; without the bias db is None."""
    dtype = torch.bfloat16
    x, w1, w2, g = _inputs(SHAPES["r2"], dtype, seed=7, strided_x=True)
    assert not x.is_contiguous()
    out, n = _bwd(x, w1, w2, g, True, has_bias, {"FASTFACTOR_MONARCH_DW2": "1"})
    assert n == {"_rows_dw2_tuned": 1}
    assert_monarch_grads(out, x, w1, w2, g, True, dtype, has_bias=has_bias)


@pytest.mark.parametrize("need_w1,need_w2", [(False, True), (True, False)])
def test_not_taken_without_both_weight_gradients(triton_cpu, need_w1, need_w2):
    """A frozen factor: the usual dx launch and one weight-gradient launch (the model's choice)."""
    dtype = torch.float32
    x, w1, w2, g = _inputs(SHAPES["odd"], dtype, seed=9)
    out, n = _bwd(x, w1, w2, g, True, True, {"FASTFACTOR_MONARCH_DW2": ""}, need_w1, need_w2)
    assert n == {"_rows_tuned": 1, "_wgrad_tuned": 1}
    assert_monarch_grads(out, x, w1, w2, g, True, dtype, need_w1=need_w1, need_w2=need_w2)


def test_one_launch_rules(monkeypatch):
    """Taken at one row block of at most 32 rows with the packed stages, unless switched off."""
    monkeypatch.delenv("FASTFACTOR_MONARCH_DW2", raising=False)
    monkeypatch.delenv("FASTFACTOR_MONARCH_KSPLIT", raising=False)
    assert Mk.rows_one_launch(16, 3072, 768, 4, 1)
    assert Mk.rows_one_launch(16, 768, 3072, 4, 1)
    assert Mk.rows_one_launch(16, 4096, 4096, 8, 1)
    assert not Mk.rows_one_launch(33, 768, 3072, 4, 1)
    assert not Mk.rows_one_launch(16, 768, 3072, 16, 1)                # b·r = 16: no packed stage 1
    monkeypatch.setenv("FASTFACTOR_MONARCH_DW2", "0")
    assert not Mk.rows_one_launch(16, 3072, 768, 4, 1)


def test_one_launch_pricing(monkeypatch):
    """``_bwd_path_seconds`` prices one launch for the backward at 16 rows (one floor), and less
    than the dx + pair launches it replaces."""
    from fastfactor.sol.device import H200

    monkeypatch.delenv("FASTFACTOR_MONARCH_DW2", raising=False)
    M, K, N, b, r = 16, 3072, 768, 4, 1
    slow = dataclasses.replace(H200, launch_s=H200.launch_s + 1e-3)
    dx = lambda dev: Mk._path_seconds(M, N, K, b, r, "rows", save_h=False, strided=False, dev=dev,
                                      in_interleaved=True)
    dx_launches = round((dx(slow) - dx(H200)) / 1e-3)
    t0 = Mk._bwd_path_seconds(M, K, N, b, r, "rows", dev=H200)
    t1 = Mk._bwd_path_seconds(M, K, N, b, r, "rows", dev=slow)
    assert round((t1 - t0) / 1e-3) == dx_launches
    monkeypatch.setenv("FASTFACTOR_MONARCH_DW2", "0")
    assert Mk._bwd_path_seconds(M, K, N, b, r, "rows", dev=H200) > t0
