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

Once the reducer has summed the partials, it may drop the tile's lines of the workspace from the L2
without writing them back (:func:`_split_discard`, PTX ``discard.global.L2``): the partials then
never reach DRAM. A line is discarded only where it holds the tile's partials alone (whole 128-byte
lines: the launcher checks, :func:`discard_mode`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ._config import HAS_TRITON, is_interpreter

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

    #: drop one 128-byte line from the L2 without writing it back, where the lane's flag is set
    _DISCARD_ASM = tl.constexpr("{\n\t.reg .pred %pd;\n\tsetp.ne.b32 %pd, $2, 0;\n\t"
                                "@%pd discard.global.L2 [$1], 128;\n\tmov.u32 $0, 0;\n\t}")

    @triton.jit
    def _split_discard(
        wsd_ptr,     # the workspace again, the discards' target (fp32); the interpreter: its shadow
        lines,       # offsets inside a slice of the first element of each 128-byte line of the tile
        mask,        # which of ``lines`` to drop (broadcast against ``lines``): the tile's own only
        slice_elems, N_SPLIT,
        DISCARD: tl.constexpr,   # 2: discard.global.L2; 1: the interpreter's stand-in (counts in the shadow)
    ):
        """In a tile's last arrival, after :func:`_split_sum` / :func:`_split_total` and a CTA
        barrier (every thread's reads of the slices done): drop the tile's lines of every slice from
        the L2 without writing them back (PTX ``discard.global.L2``: the lines then hold undefined
        values, and the partials never cost DRAM bytes). Under the interpreter ``wsd_ptr`` is a
        zeroed shadow of the workspace (:func:`discard_target`) and each dropped line's elements
        are counted there instead: a test sees every partial dropped once, and nothing else."""
        keep = mask & (lines >= 0)
        for s_ in range(0, N_SPLIT):
            p = wsd_ptr + s_ * slice_elems + lines
            if DISCARD == 2:
                tl.inline_asm_elementwise(_DISCARD_ASM, "=r,l,r", [p, keep.to(tl.int32)], dtype=tl.int32,
                                          is_pure=False, pack=1)
            else:                                   # the interpreter runs programs one at a time
                o = tl.arange(0, 32)
                if len(lines.shape) == 1:
                    q = p[:, None] + o[None, :]
                    k2 = keep[:, None]
                else:
                    q = p[:, :, None] + o[None, None, :]
                    k2 = keep[:, :, None]
                tl.store(q, tl.load(q, mask=k2, other=0.0) + 1.0, mask=k2)


def discard_enabled() -> bool:
    """Whether split launches may drop their summed partials from L2 (unless
    ``FASTFACTOR_SPLIT_DISCARD=0``; any value but ``auto``, ``0``, ``1`` is refused)."""
    flag = os.environ.get("FASTFACTOR_SPLIT_DISCARD", "auto")
    if flag not in ("auto", "0", "1"):
        raise ValueError(f"FASTFACTOR_SPLIT_DISCARD: expected one of ('auto', '0', '1'), got {flag!r}")
    return flag != "0"


def discard_mode(split: bool, whole_lines: bool, ws: torch.Tensor) -> int:
    """The ``DISCARD`` constexpr of a split launch: 2 (``discard.global.L2`` on a GPU), 1 (the
    interpreter's stand-in, :func:`_split_discard`) or 0 (keep the lines: no split, a tile whose
    partials do not fill whole 128-byte lines (``whole_lines``), a workspace not 128-byte aligned
    on a GPU, or ``FASTFACTOR_SPLIT_DISCARD=0``)."""
    if not discard_enabled() or not split or not whole_lines:
        return 0
    if is_interpreter() or ws.device.type != "cuda":
        return 1
    return 2 if ws.data_ptr() % 128 == 0 else 0


def discard_target(ws: torch.Tensor, mode: int) -> torch.Tensor:
    """What a split launch passes as its discard target (``wsd_ptr``): the workspace itself on a
    GPU (``mode`` 2, or 0: never touched), a zeroed shadow of it under the interpreter (``mode``
    1: :func:`_split_discard` counts the dropped elements there)."""
    if mode != 1:
        return ws
    # made outside PyTorch's dispatch: an interpreter artifact, not an op of the launch for
    # ``fastfactor sol`` to record
    return torch.from_numpy(np.zeros(tuple(ws.shape), dtype=np.float32))


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
