"""The ``reread`` budget (fastfactor/sol/budgets.py) on synthetic rows: the L2-resident rule for
small operands of memory-bound launches, the 1.25x rule for the others."""

from __future__ import annotations

import pytest

from fastfactor.sol import budgets as B
from fastfactor.sol.device import H200

MB = 1e6


def _launch(bound="dram", dram=19.1 * MB, **tensors):
    return dict(kernel="sparse24.decode", phase="fwd", bound=bound, dram_bytes=dram,
                tensors={n: dict(size=s, load=l, reread=l / s) for n, (s, l) in tensors.items()})


def _row(*launches):
    return dict(detail=list(launches))


X = 16 * 4096 * 2          # x (16, 4096) bf16: 128 KiB, L2-resident
W = 16 * MB                # compressed weight values, read once


def test_old_decode_design_fails():
    # 128 row tiles: x read 128x = 16.8 MB, 16.6 MB of it beyond the first read, vs 19.1 MB DRAM
    ok, fig, tgt = B.reread(_row(_launch(x_ptr=(X, 128 * X), vals_ptr=(W, W))), H200)
    assert not ok
    assert "x_ptr" in fig and "87 %" in fig and "25 %" in tgt


def test_wide_tiles_pass():
    # 32 row tiles x 4 K splits: x read 32x = 4.2 MB, 4.1 MB beyond the first, vs 20.2 MB DRAM (20 %)
    ok, fig, _ = B.reread(_row(_launch(dram=20.2 * MB, x_ptr=(X, 32 * X), vals_ptr=(W, W))), H200)
    assert ok, fig


@pytest.mark.parametrize("tiles,ok", [(36, True), (40, False)])
def test_boundary_is_a_quarter_of_the_dram_bytes(tiles, ok):
    dram = 19.1 * MB           # 36 tiles: 4.46 MB = 23 %; 40 tiles: 5.11 MB = 27 %
    assert B.reread(_row(_launch(dram=dram, x_ptr=(X, tiles * X))), H200)[0] is ok


def test_large_operand_keeps_the_125x_rule():
    big = H200.l2_bytes / 4    # above 1/8 of the L2: not L2-resident
    assert B.reread(_row(_launch(dram=100 * MB, a_ptr=(big, 1.2 * big))), H200)[0]
    ok, fig, _ = B.reread(_row(_launch(dram=100 * MB, a_ptr=(big, 1.5 * big))), H200)
    assert not ok and "1.5x" in fig
    # larger than half the L2: re-reads come from DRAM even in a compute-bound launch
    huge = H200.l2_bytes
    assert not B.reread(_row(_launch(bound="mma", a_ptr=(huge, 2 * huge))), H200)[0]


def test_compute_bound_launch_and_small_tensors_are_exempt():
    assert B.reread(_row(_launch(bound="mma", x_ptr=(X, 128 * X))), H200)[0]
    # a streaming launch bound by its instruction issue is not exempt: its re-reads cost L2
    # bandwidth as soon as its issue is cut
    ok, fig, _ = B.reread(_row(_launch(bound="issue", x_ptr=(X, 128 * X))), H200)
    assert not ok and "87 %" in fig
    small = 32 * 1024          # under the 64 KiB streamed threshold
    assert B.reread(_row(_launch(x_ptr=(small, 1000 * small))), H200)[0]


def test_worst_launch_is_reported():
    good = _launch(dram=20.2 * MB, x_ptr=(X, 32 * X))
    bad = dict(_launch(x_ptr=(X, 128 * X)), kernel="sparse24.other")
    ok, fig, _ = B.reread(_row(good, bad), H200)
    assert not ok and fig.startswith("sparse24.other")
