"""Tier 1 (cpu): the row-block backward's weight gradients in ONE launch (``_wgrad_pair_kernel``:
``dw1`` and ``dw2`` (+ ``db``) together) under the interpreter: float64 references, bitwise
equality with the previous two-launch path (``_wgrad`` twice), row splits (equal, unequal, one
side only: each side's fp32 partials summed in the launch by each feature tile's last program, no
``torch.sum`` and no padding), the launch count, and the pricing's launch count
(``_bwd_path_seconds``)."""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import CountLaunches, assert_close_ref
from fastfactor.kernels import monarch as Mk

#: (b, r): b·r = 8 (packed product, HP = 32) and b·r = 16 (dw1 blockwise; Monarch dw2 batched)
SHAPES = {"br8": (4, 2), "br16": (4, 4)}
#: row splits per side, keyed by the side's feature count: none; both sides split, unequally
#: (the side split less often leaves programs idle); only dw2 split; only dw1 split
SPLITS = ["none", "unequal", "dw2_only", "dw1_only"]
M_, K_, N_ = 29, 30, 21          # K, N not divisible by b = 4 (padded features)


def _split_rule(mode, K):
    """A ``wgrad_split`` replacement: rows per split chosen by the side (``F == K`` is dw1)."""
    rows = {"none": (None, None), "unequal": (8, 16), "dw2_only": (None, 8), "dw1_only": (16, None)}[mode]

    def split(M, F, sms, **kw):
        r = rows[0] if F == K else rows[1]
        return (1, M) if r is None else (Mk.cdiv(M, r), r)
    return split


def _two_launch(x, dh, g, hbuf, *, NB, R, kb, nb, strided, w1_dtype, w2_dtype, rowsum):
    """The previous row-block weight gradients: ``_wgrad`` for dw1, then for dw2 (+ db)."""
    dw1, _ = Mk._wgrad(x, dh, (NB, NB * R, kb), (NB * R * kb, 1, kb), NB=NB, R=R, SB=kb,
                       interleaved=False, dtype=w1_dtype)
    dw2, db = Mk._wgrad(g, hbuf, (NB, nb, NB * R), (nb * NB * R, NB * R, 1), NB=NB, R=R, SB=nb,
                        interleaved=strided, dtype=w2_dtype, rowsum=rowsum)
    return dw1, dw2, db


class _Sums(TorchDispatchMode):
    """Counts ``aten.sum`` calls."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.sum:
            self.n += 1
        return func(*args, **(kwargs or {}))


def _inputs(M, K, N, b, r, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    s1, s2 = Mk.factor_shapes(K, N, b, r)
    x = torch.randn(M, K, generator=gen).to(dtype)
    w1 = (torch.randn(*s1, generator=gen) / Mk.cdiv(K, b) ** 0.5).to(dtype)
    w2 = (torch.randn(*s2, generator=gen) / (b * r) ** 0.5).to(dtype)
    g = torch.randn(M, N, generator=gen).to(dtype)
    return x, w1, w2, g


def _bwd(x, w1, w2, g, strided, has_bias, need_w1, N, fused=True):
    """``monarch_bwd`` on the row-block path (``h`` saved by the forward); ``fused=False`` runs
    the previous two-launch weight gradients. Returns the results, the launches of the pair and
    the single weight-gradient kernels and the ``aten.sum`` calls of the backward."""
    _, h = Mk.monarch_fwd(x, w1, w2, None, N, strided, save_h=True, path="rows")
    saved = (Mk._wgrad_pair, Mk._wgrad_pair_tuned, Mk._wgrad_tuned, Mk.ROWS_ONE_LAUNCH_MAX_M)
    pair, single = CountLaunches(Mk._wgrad_pair_tuned), CountLaunches(Mk._wgrad_tuned)
    try:
        if not fused:
            Mk._wgrad_pair = _two_launch
        Mk._wgrad_pair_tuned, Mk._wgrad_tuned = pair, single
        Mk.ROWS_ONE_LAUNCH_MAX_M = 0      # these few rows: the weight-gradient launch (test_one_launch_bwd)
        with _Sums() as sums:
            out = Mk.monarch_bwd(g, x, w1, w2, h, strided, has_bias, need_w1=need_w1, path="rows")
    finally:
        Mk._wgrad_pair, Mk._wgrad_pair_tuned, Mk._wgrad_tuned, Mk.ROWS_ONE_LAUNCH_MAX_M = saved
    return out, pair.n, single.n, sums.n


def _cases():
    """Every dtype x family x shape with unequal splits (the padded shared buffer); the other split
    modes in bf16 at b·r = 16 (blockwise dw1, batched Monarch dw2)."""
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
    out = []
    for fam, strided in (("monarch", True), ("block_lowrank", False)):
        for shape in SHAPES:
            for mode in SPLITS:
                for dn, dt in dtypes.items():
                    if mode == "unequal" or (dn == "bf16" and shape == "br16"):
                        out.append(pytest.param(dt, strided, shape, mode, id=f"{dn}-{fam}-{shape}-{mode}"))
    return out


@pytest.mark.parametrize("dtype,strided,shape,splits", _cases())
def test_wgrad_pair_vs_float64_and_two_launches(triton_cpu, monkeypatch, dtype, strided, shape, splits):
    """dw1, dw2, db of the one launch: against float64 (``monarch_bwd_ref``), bitwise equal to
    the two ``_wgrad`` launches, one wgrad launch and no ``torch.sum`` (the splits are summed in
    the launch)."""
    b, r = SHAPES[shape]
    x, w1, w2, g = _inputs(M_, K_, N_, b, r, dtype, seed=10 * SPLITS.index(splits) + list(SHAPES).index(shape))
    monkeypatch.setattr(Mk, "wgrad_split", _split_rule(splits, K_))
    res = {fused: _bwd(x, w1, w2, g, strided, True, True, N_, fused=fused) for fused in (True, False)}
    (dx, dw1, dw2, db), pair_n, single_n, sums = res[True]
    assert (pair_n, single_n) == (1, 0)
    assert sums == 0
    # the previous path: two launches, each summing its own splits
    _, pair_old, single_old, sums_old = res[False]
    assert (pair_old, single_old) == (0, 2)
    assert sums_old == 0
    for name, a, e in zip(["dx", "dw1", "dw2", "db"], (dx, dw1, dw2, db), res[False][0]):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a, e), f"{name} differs from the two-launch path"
        assert torch.equal(torch.signbit(a), torch.signbit(e)), f"{name}: signed zeros differ"
    ref = Mk.monarch_bwd_ref(g.double(), x.double(), w1.double(), w2.double(), None, strided)
    for name, a, e in zip(["dx", "dw1", "dw2", "db"], (dx, dw1, dw2, db), ref):
        assert_close_ref(a, e, dtype, reduction=max(M_, K_, N_), name=name)


@pytest.mark.parametrize("has_bias,need_w1", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("strided", [True, False], ids=["monarch", "block_lowrank"])
def test_wgrad_bias_and_need_w1(triton_cpu, monkeypatch, strided, has_bias, need_w1):
    """Without the bias db is None; without dw1 the one remaining gradient takes ``_wgrad`` (one
    launch either way); bf16, unequal splits, float64 reference and the two-launch bits."""
    dtype, (b, r) = torch.bfloat16, SHAPES["br8"]
    x, w1, w2, g = _inputs(M_, K_, N_, b, r, dtype, seed=11)
    monkeypatch.setattr(Mk, "wgrad_split", _split_rule("unequal", K_))
    out, pair_n, single_n, _ = _bwd(x, w1, w2, g, strided, has_bias, need_w1, N_)
    assert (pair_n, single_n) == ((1, 0) if need_w1 else (0, 1))
    old, *_ = _bwd(x, w1, w2, g, strided, has_bias, need_w1, N_, fused=False)
    ref = Mk.monarch_bwd_ref(g.double(), x.double(), w1.double(), w2.double(), None, strided,
                             need_w1=need_w1, has_bias=has_bias)
    for name, a, o, e in zip(["dx", "dw1", "dw2", "db"], out, old, ref):
        if e is None:
            assert a is None and o is None, name
            continue
        assert torch.equal(a, o), name
        assert_close_ref(a, e, dtype, reduction=max(M_, K_, N_), name=name)


@pytest.mark.parametrize("strided", [True, False], ids=["monarch", "block_lowrank"])
def test_wgrad_pair_real_split_policy(triton_cpu, monkeypatch, strided):
    """The real split policy with ``WGRAD_MIN_ROWS`` lowered (M = 70 > 16 x 4 rows: both sides
    split over the interpreter's 4 SMs); fp32, float64 reference and the two-launch bits."""
    monkeypatch.setattr(Mk, "WGRAD_MIN_ROWS", 4)
    M, K, N, (b, r) = 70, 30, 21, SHAPES["br16"]
    sa = Mk.wgrad_side_split(M, K, b, r, False, 4)[0]
    sb = Mk.wgrad_side_split(M, N, b, r, strided, 4)[0]
    assert sa > 1 and sb > 1
    x, w1, w2, g = _inputs(M, K, N, b, r, torch.float32, seed=2)
    out, pair_n, _, sums = _bwd(x, w1, w2, g, strided, True, True, N)
    assert pair_n == 1 and sums == 0
    old, *_ = _bwd(x, w1, w2, g, strided, True, True, N, fused=False)
    ref = Mk.monarch_bwd_ref(g.double(), x.double(), w1.double(), w2.double(), None, strided)
    for name, a, o, e in zip(["dx", "dw1", "dw2", "db"], out, old, ref):
        assert torch.equal(a, o), name
        assert_close_ref(a, e, torch.float32, reduction=max(M, K, N), name=name)


def test_wgrad_pair_outputs_do_not_alias(triton_cpu, monkeypatch):
    """fp32 with both sides split: the three results are separate tensors (the custom op's
    outputs may not alias)."""
    b, r = SHAPES["br8"]
    x, w1, w2, g = _inputs(M_, K_, N_, b, r, torch.float32, seed=4)
    monkeypatch.setattr(Mk, "wgrad_split", _split_rule("unequal", K_))
    (_, dw1, dw2, db), *_ = _bwd(x, w1, w2, g, True, True, True, N_)
    ptrs = {t.untyped_storage().data_ptr() for t in (dw1, dw2, db)}
    assert len(ptrs) == 3


@pytest.mark.parametrize("M,splits", [(16, False), (16384, True)])
@pytest.mark.parametrize("strided", [True, False], ids=["monarch", "block_lowrank"])
def test_bwd_pricing_counts_one_wgrad_launch(monkeypatch, M, strided, splits):
    """``_bwd_path_seconds('rows')`` grows by exactly one floor per launch it prices: dx (the
    row-block kernel) + ONE weight-gradient launch, split or not (the partials are summed in it)."""
    from fastfactor.sol.device import H200

    monkeypatch.delenv("FASTFACTOR_MONARCH_PATH", raising=False)
    K = N = 4096
    b, r = 4, 1
    assert (Mk.wgrad_side_split(M, K, b, r, False, H200.sms)[0] > 1) == splits
    slow = dataclasses.replace(H200, launch_s=H200.launch_s + 1e-3)
    for need_w1 in (True, False):
        # (dw2=False: the pair launch; dw2 and db from the dx launch are test_dw2_in_dx's)
        t0 = Mk._bwd_path_seconds(M, K, N, b, r, "rows", need_w1=need_w1, strided=strided, dev=H200, dw2=False)
        t1 = Mk._bwd_path_seconds(M, K, N, b, r, "rows", need_w1=need_w1, strided=strided, dev=slow, dw2=False)
        dx_launches = round((Mk._path_seconds(M, N, K, b, r, "rows", save_h=need_w1, strided=False, dev=slow)
                             - Mk._path_seconds(M, N, K, b, r, "rows", save_h=need_w1, strided=False, dev=H200)) / 1e-3)
        assert round((t1 - t0) / 1e-3) == dx_launches + 1


@pytest.mark.parametrize("splits", ["unequal", "dw2_only", "none"])
def test_sol_counts_the_pair_launch(triton_cpu, monkeypatch, splits):
    """``fastfactor sol`` counts the one launch by classes of programs (``ROLE_MAPS_2D``: each
    side's tiles; its splits with rows and its idle ones): the scaled count equals the full one,
    x and g are each loaded exactly once, and each split side stores exactly its splits' partials
    (no padding) and its result once."""
    from fastfactor.sol import count as C
    from fastfactor.sol import record as R

    monkeypatch.setattr(Mk, "wgrad_split", _split_rule(splits, K_))
    monkeypatch.setattr(Mk, "ROWS_ONE_LAUNCH_MAX_M", 0)
    b, r = SHAPES["br16"]
    x, w1, w2, g = _inputs(M_, K_, N_, b, r, torch.float32, seed=6)
    h = torch.empty(M_, b * b * r)
    with R.recording(sms=132) as rec:
        Mk.monarch_bwd(g, x, w1, w2, h, True, True, path="rows")
    (launch,) = [l for l in rec.launches if l.kernel == "monarch.wgrad_pair"]
    cfg = launch.fixed
    full, scaled = C.count_launch(launch, cfg, "full"), C.count_launch(launch, cfg, "scaled")
    assert scaled.classes < full.classes or full.classes <= 4
    for name, tc in full.tensors.items():
        assert scaled.tensors[name].load_bytes == pytest.approx(tc.load_bytes), name
        assert scaled.tensors[name].store_bytes == pytest.approx(tc.store_bytes), name
    assert scaled.dot_flops == pytest.approx(full.dot_flops)
    assert full.tensors["xa_ptr"].load_bytes == x.numel() * 4
    assert full.tensors["gb_ptr"].load_bytes == g.numel() * 4
    # each split side stores exactly its splits' partials (no padding, no shared buffer) and
    # each result once (a split side's by its tiles' reducers)
    sa = _split_rule(splits, K_)(M_, K_, 132)[0]
    sb = _split_rule(splits, K_)(M_, N_, 132)[0]
    t = {n.split("/")[0]: tc for n, tc in full.tensors.items()}
    w1_bytes, w2_bytes = w1.numel() * 4, w2.numel() * 4
    assert t["oa_ptr"].store_bytes == w1_bytes and t["ob_ptr"].store_bytes == w2_bytes
    assert t["rowsum_ptr"].store_bytes == N_ * 4
    if sa > 1:
        assert t["wsa_ptr"].store_bytes == sa * w1_bytes
    if sb > 1:
        assert t["wsb_ptr"].store_bytes == sb * w2_bytes
        assert t["wrs_ptr"].store_bytes == sb * N_ * 4
    assert sum(tc.store_bytes for tc in t.values()) == (w1_bytes * (1 + sa * (sa > 1)) + (w2_bytes + N_ * 4)
                                                         * (1 + sb * (sb > 1)))


def test_sass_builds_the_gpu_variant(triton_cpu, monkeypatch):
    """``fastfactor sol --sass`` compiles a recorded split weight-gradient launch as a GPU runs
    it: each tile's reducer chosen by int32 arrival counters (``SYNC``), not the interpreter's
    program order; an unsplit launch keeps ``SYNC`` off."""
    from fastfactor.sol import record as R
    from fastfactor.sol.sass import gpu_build

    monkeypatch.setattr(Mk, "ROWS_ONE_LAUNCH_MAX_M", 0)
    b, r = SHAPES["br16"]
    x, w1, w2, g = _inputs(M_, K_, N_, b, r, torch.float32, seed=7)
    h = torch.empty(M_, b * b * r)
    for splits, sync in (("dw2_only", True), ("none", False)):
        monkeypatch.setattr(Mk, "wgrad_split", _split_rule(splits, K_))
        with R.recording(sms=132) as rec:
            Mk.monarch_bwd(g, x, w1, w2, h, True, True, path="rows")
        (launch,) = [l for l in rec.launches if l.kernel == "monarch.wgrad_pair"]
        assert launch.constexprs["SYNC"] is False                # the interpreter: program order
        sig = {"cnt_ptr": "*fp32", "xa_ptr": "*fp32"}
        cx, sig = gpu_build(dict(constexprs=launch.constexprs, signature=sig))
        assert cx["SYNC"] is sync and (sig["cnt_ptr"] == "*i32") is sync
