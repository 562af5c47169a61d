"""One-launch split reductions, shared by the kernel families.

A launch splits a reduction over ``N_SPLIT`` programs per output tile (so that a few output tiles
still fill the GPU) and sums the splits itself, without a second launch, without atomics on data
and without any program waiting on another:

* every program stores its fp32 partial of the tile in its own slice of a workspace
  ``(N_SPLIT, …)`` and arrives on the tile's int32 counter (:func:`_split_arrive`);
* the tile's **last** program to arrive (on a GPU the counter says which; the interpreter runs
  programs in id order, so there the last split is last) reads the other partials and sums all of
  them in the fixed order ``s = 0, 1, …`` (:func:`_split_total`): the result is bitwise the same
  whichever program arrives last. It then resets the counter to zero for the next launch.

The counters (:func:`split_counters`) are one zeroed int32 buffer per device and stream, shared by
every kernel that uses these helpers: launches on one stream run one after another, and each
tile's reducer leaves its counter at zero.
"""

from __future__ import annotations

import torch

from ._config import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _split_arrive(
        acc,         # this program's fp32 partial of its output tile
        ws_ptr,      # (N_SPLIT, ...) fp32 workspace, one slice of slice_elems per split
        part,        # offsets of the tile inside a slice
        mask,        # validity of the tile's elements
        slice_elems, pid_s,
        cnt_ptr,     # SYNC: int32 arrival counters, one per tile, zero between launches
        tile, N_SPLIT,
        SYNC: tl.constexpr,
    ):
        """Store the partial in slice ``pid_s`` and arrive on the tile's counter; True for the tile's
        last program to arrive (``SYNC``; else its last split: the interpreter runs programs in id
        order). No atomics on data, and no program ever waits."""
        tl.store(ws_ptr + pid_s * slice_elems + part, acc, mask=mask)
        if SYNC:
            tl.debug_barrier()                                   # every thread's partial stored
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            last = arrived == N_SPLIT - 1
        else:
            last = pid_s == N_SPLIT - 1
        return last

    @triton.jit
    def _split_total(acc, ws_ptr, part, mask, slice_elems, pid_s, N_SPLIT,
                     offs,                  # the tile's offsets along AXIS (any 1-D vector of that length)
                     AXIS: tl.constexpr):
        """In the tile's last arrival (:func:`_split_arrive`): the sum of the ``N_SPLIT`` partials (in
        ``acc``'s dtype, the workspace's) in the order ``s = 0, 1, …``, its own from registers (the bits it stored): bitwise the same
        whichever program arrives last (the caller stores it, then resets the tile's counter). (The split
        test is a vector along ``AXIS`` broadcast over the tile: scalar masks or a branch per split
        cost registers, and the generic sm_90 builds spilled.)"""
        tot = tl.zeros(acc.shape, dtype=acc.dtype)
        for s_ in range(0, N_SPLIT):                             # fixed order: bitwise reproducible
            mine = (offs * 0 + s_) == pid_s                      # this split is ours
            if AXIS == 0:
                mine2 = mine[:, None]
            else:
                mine2 = mine[None, :]
            other = tl.load(ws_ptr + s_ * slice_elems + part, mask=mask & ~mine2, other=0.0,
                            cache_modifier=".cg")
            tot += tl.where(mine2, acc, other)
        return tot

    @triton.jit
    def _split_sum(ws_ptr, part, mask, slice_elems, N_SPLIT, like):
        """In a tile's last arrival (:func:`_split_arrive`): the sum of all ``N_SPLIT`` partials,
        its own included, read back from the workspace (the bits it stored) in the order ``s = 0,
        1, …``, in ``like``'s shape and dtype: bitwise the same whichever program arrives last. For
        tiles of any rank (:func:`_split_total` keeps its own partial in registers, 2-D tiles)."""
        tot = tl.zeros(like.shape, dtype=like.dtype)
        for s_ in range(0, N_SPLIT):                             # fixed order: bitwise reproducible
            tot += tl.load(ws_ptr + s_ * slice_elems + part, mask=mask, other=0.0, cache_modifier=".cg")
        return tot


#: ``(device, stream) -> int32 counters`` of the one-launch split reductions
COUNTERS: dict = {}


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` int32 arrival counters for this device and stream: zeroed when made, reset to
    zero by each tile's reducer (launches on one stream run one after another)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = COUNTERS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return buf


def split_buffers(splits: int, tiles: int, shape: tuple, device: torch.device, like: torch.Tensor) -> tuple:
    """``(SPLIT, SYNC, workspace, counters)`` of a one-launch split reduction with ``splits`` splits
    over ``tiles`` output tiles, each split's partials of ``shape``: an fp32 workspace
    ``(splits, *shape)`` and on a GPU the tiles' arrival counters (the interpreter runs programs in
    id order: the last split reduces). Without a split, ``like`` stands in for both buffers (never
    read)."""
    split = splits > 1
    sync = split and device.type == "cuda"
    ws = torch.empty((splits, *shape), device=device, dtype=torch.float32) if split else like
    return split, sync, ws, (split_counters(device, tiles) if sync else ws)
