"""2:4 semi-structured sparsity, device side: the packed layout's references, the pruning, sparse
linear and fused dense-sparse kernels and their launchers.

The :class:`~fastfactor.formats.sparse24.Sparse24Weight` container, :func:`pack_24`, the public
pruning API (:func:`prune_24`, :func:`mask_24`, with their argument checks) and the conversion to
PyTorch's CUTLASS / semi-structured layout live on the library side, in
:mod:`fastfactor.formats.sparse24`; the layout they share with these kernels is described here.

The 2:4 pattern
---------------
A weight ``W (R, K)`` (``R`` rows = output features, ``K`` = input features) is 2:4 sparse when in
every group of 4 consecutive input elements of a row ``W[r, 4g:4g+4]`` at most 2 are non-zero.
``K`` must be a multiple of 4: there is no implicit padding anywhere (a weight whose input
dimension is not a multiple of 4 is refused with a ``ValueError``; pad it with zero columns and
pad ``x`` the same way if you need such a layer).

Packed form (``fastfactor.formats.sparse24.Sparse24Weight``)
----------------------------------------------------------
* ``values (R, K/2)``, the weight's dtype: for group ``g`` of row ``r``, ``values[r, 2g]`` and
  ``values[r, 2g+1]`` are the entries at in-group positions ``i0 < i1``.
* ``meta (R, ceil(K/8))`` ``uint8``: one 4-bit code per group, ``code = i0 | (i1 << 2)``; byte ``j``
  holds group ``2j`` in bits 0–3 and group ``2j+1`` in bits 4–7 (when ``K/4`` is odd the last
  byte's high nibble is unused and zero). That is 2 bits of index per kept value.

So a packed fp16/bf16 weight moves ``R·K/2·2 + R·K/8 = 1.125·R·K`` bytes against ``2·R·K`` dense:
56.25 % of the dense bytes.

Relation to PyTorch's semi-structured layout: the per-group code is the same nibble that
PyTorch's CUTLASS path computes (``idx0 | idx1 << 2``, lowest index first) and the kept values are
in the same order, so ``values`` *is* CUTLASS's compressed matrix for fp16/bf16. The metadata
differs only in container and order: CUTLASS packs 4 codes into an ``int16`` (our byte pair read
little-endian) and then permutes those ``int16`` words into its interleaved column-major tile
order. ``fastfactor.formats.sparse24.to_cutlass_layout`` does that conversion; ``to_torch_semi_structured`` builds the
``torch.sparse`` tensor subclass (CUTLASS or cuSPARSELt backend) for ``F.linear``. fp32 has no
2:4 tensor-core path in PyTorch (its CUTLASS fp32 format is 1:2), so those two refuse fp32.

Kernels
-------
Every kernel that reads a packed weight expands it on chip: one ``(BLOCK_R, BLOCK_K/2)`` tile of
values (contiguous, coalesced) and the matching ``(BLOCK_R, BLOCK_K/4)`` codes are loaded, the
values are split into the first/second kept entry of each group, and
``W[r, 4g + p] = v0 if p == i0 else v1 if p == i1 else 0`` is formed with two selects before the
tile goes to ``tl.dot``. Device memory only ever sees the compressed bytes.

* ``_prune24_kernel``: 2:4 magnitude (or score) pruning, writes the pruned weight and the mask.
* ``_sp_mm_kernel``: ``y = x·Wᵀ + b``. It computes the transposed tile ``yᵀ = W·xᵀ`` so that the
  expanded weight tile is the left ``tl.dot`` operand as is (no transpose of the expanded tile)
  and the weight rows, not the few token rows, fill the MMA's M dimension at decode sizes.
* ``_sp_dx_kernel``: ``dx = g·W`` (the weight tile is the right operand as is).
* ``_sp_dvalues_kernel``: the gradient of the kept values: the dense tile ``dW = gᵀ·x`` is
  accumulated in fp32, then its entries at the kept positions are selected with the same codes
  (two selects per kept value) and stored compressed. It spends the dense ``2·M·R·K`` FLOPs (a
  tensor-core GEMM) and writes only ``R·K/2`` values.
* ``_ds_chain_kernel``: dense-sparse ``y = (x·Sᵀ)·Dᵀ + b`` with ``S (R, K)`` 2:4 and ``D (N, R)``,
  fused like the low-rank chain (``fastfactor.kernels.lowrank``): the ``(BLOCK_M, R)``
  intermediate ``t = x·Sᵀ`` stays in fp32 registers (computed as ``tᵀ = S·xᵀ``, again so the
  expanded tile needs no transpose), is rounded to ``intermediate_dtype`` (see Precision) and
  multiplied by ``D`` tile by tile. ``R_PAD = next_pow2(R) <= 256``, configs within a register
  budget (``DS_TILE_ELEMS``: no spills on sm_80 / sm_90). The dispatcher (:func:`choose_ds_path`)
  takes it only where predicted >= 5 % faster than the library path (``t = x·Sᵀ`` by sparse24's
  own dispatch, ``t·Dᵀ`` on cuBLAS); larger ranks take the library path or, at a handful of
  tokens, the rank split (figures why in the dense-sparse section below).
* ``_ds_rank_split_kernel``: dense-sparse at ``M <= 64`` tokens, any rank, in **one launch**:
  ``y = Σ_c (x·S_cᵀ)·D_cᵀ`` over chunks of ``BLOCK_R`` rows of ``S``; program = (column tile of
  ``y``, chunk), its chunk of ``t`` formed whole (so rounded as a two-matmul path rounds it), its
  fp32 partial of ``y`` summed with the other chunks' by the tile's last arrival (fixed order, as
  the decode kernel). Planned per shape (:func:`ds_rank_split_plans`); taken where predicted >= 5 %
  faster than the library path's two launches: the BERT-size layers at a handful of tokens (every
  program reads ``x`` and each column tile all of ``S``, so at ``K = 4096`` it loses).
* ``_ds_roles_kernel``: dense-sparse at ``M <= 64`` tokens, any rank, in **one launch of two
  roles** drawn by ticket: producers form ``t = x·Sᵀ`` (``BLOCK_R`` rows of ``S`` each, split over
  ``K`` in ``KS`` pieces whose fp32 partials each chunk's last arrival sums in a fixed order) and
  store it; consumers wait for every producer and multiply ``t`` (from L2) by their ``D`` tile.
  ``x`` is read once per rank chunk, spread over its ``KS`` producers; ``S`` and ``D`` once.
  Planned per shape (:func:`ds_roles_plans`, the phases in sequence priced); the pick at a
  handful of tokens on all but square high-rank layers. The two-kernel path (``_sp_mm_kernel`` / the decode kernel
  for ``t``, then the low-rank family's Triton GEMM) remains for fp16 and when forced.
* ``_sp_decode_kernel``: ``y = x·Wᵀ + b`` for ``M <= 64`` in **one launch**. Programs = (row
  tiles x K splits) planned per shape by :func:`decode_plan` (the model ``fastfactor sol``
  applies: the compressed weight once from DRAM, ``x`` once per row tile from L2, with a split the
  fp32 partials stored and read back from L2, and the instruction issue of the compiled loop,
  :data:`DECODE_ISSUE`); of the plans, the one that holds up at both ends of the unmeasured L2
  bandwidth (:func:`kernels._cost.robust_pick`: at 4096², 16 tokens, 128 rows x 4 splits, ``x``
  read 32x, over 32 rows x 1, ``x`` read 128x and L2-bound below ~8 TB/s). With a split each
  tile's last program to arrive (an int32 counter per tile: no atomics on data) sums the partials
  in the fixed order ``s = 0, 1, …``: bitwise reproducible, no second launch; codes read as
  32-bit words; configs limited to what fits the registers. The dx-decode kernel
  (``_sp_dx_decode_kernel``, ``dx = g·W``) is planned the same way (:data:`DXD_ISSUE`).
* ``_sp_decode_mma_kernel``: ``y = x·Wᵀ + b`` for ``M <= 16`` bf16/fp16 tokens on the **sparse
  tensor cores**, in one launch: each warp issues PTX ``mma.sp`` (``m16n8k32``, inline assembly)
  on the kept values and codes as they are, so nothing is expanded (sm_90 main loop: 0.043
  instructions per weight at 4096², 12 tokens, 128 rows x 4 splits; the expanding decode's best
  is 0.107). Its tensors hold one element per thread whose lane comes from ``%tid.x``, so its
  operands are each lane's fragment registers whatever layout Triton picks; a permutation of
  ``K`` inside each 64-input step (applied to ``W`` and ``x`` alike) makes a lane's four kept
  pairs of a row one 16-byte vector, and the codes are read in fragment order
  (:func:`mma_frag_codes`, the same bytes reordered once per mask, cached on ``meta``). Under the
  interpreter each ``mma.sp`` is emulated from the lanes' registers (``MMA == 1``). Planned like
  the expanding decode (:func:`mma_decode_plans`, :data:`MMA_DECODE_ISSUE`), and taken by
  :func:`sparse24_decode` where it applies (:func:`mma_decode_ok`) and is predicted no slower
  (:func:`mma_decode_wins`); ``FASTFACTOR_SPARSE24_MMA=0`` turns it off. Its split reducer drops
  the summed partials from L2 unwritten (``discard.global.L2``, :func:`kernels._split._split_discard`;
  ``FASTFACTOR_SPLIT_DISCARD=0`` keeps them), so they cost no DRAM bytes.
* The expansion in the decode kernels (``PRMT``, :func:`prmt_mode`): on a GPU each group's two
  output words are byte permutes (``prmt.b32``, inline assembly) of its kept-value pair, with
  selectors looked up from the codes four groups at a time (:func:`_expand24_prmt`,
  :data:`PRMT_TABLES`); under the interpreter the same selection in integer ops (no inline
  assembly there); compare-and-select (:func:`_expand24_pairs`) for forward tiles under
  :data:`PRMT_MIN_TILE` weights, or with ``FASTFACTOR_SPARSE24_PRMT=0``. The forward decode's
  loads drop their masks where every tile is whole (``EVEN``, :func:`decode_even`). sm_90 main
  loops of the forward decode: 0.107-0.137 instructions per weight on the byte-permute tiles the
  planner takes with whole tiles (128x128 at 8 warps: 0.126, 259 a warp and step; 0.153 with
  masks; 0.163 before the selectors were formed in the pairs' layout, 0.22-0.25 with
  compare-and-select). Both need canonical codes (``i0 < i1``, what :func:`pack_24` writes).
* ``_sp_expand_kernel`` / ``_sp_compress_kernel``: ``W`` dense once per step for cuBLAS, and the
  kept entries of a dense ``dW`` from cuBLAS (exact selections).

Codes in the kernels: where ``K % 32 == 0`` and the rows are 4-byte aligned, the launchers pass the
``uint8`` codes viewed as ``int32`` words (``META32``): one 16-byte vector per row and 128 inputs
instead of byte loads; the same bytes, no format change.

Paths (:func:`choose_mm_path`, :func:`choose_bwd_path`): Triton has no sparse tensor-core
instruction, so large-M products go to PyTorch's semi-structured CUTLASS GEMM (forward; fed our
``values`` as they are and the codes reordered once per mask, :func:`torch24_meta`) or to cuBLAS
on the weight expanded once (:func:`expand_24`); the backward's kept-value gradient is
:func:`compress_24` of cuBLAS's ``gᵀ·x``. Ranked by :func:`path_costs` (predicted).

Backward of the dense-sparse product (``g = dL/dy``), library path (bf16 / fp32) / two-kernel path::

    dt  = g·D                     (M, R)   cuBLAS / low-rank GEMM, rounded to intermediate_dtype
    dx  = dt·S                    (M, K)   S expanded once + cuBLAS, PyTorch's 2:4 GEMM on Sᵀ
                                           (transposable mask), or _sp_dx_decode_kernel at M <= 64
    dD  = gᵀ·t                    (N, R)   cuBLAS (db = Σ_m g a library sum) / low-rank GEMM
    dSv = kept entries of dtᵀ·x   (R, K/2) compress_24(cuBLAS dtᵀ·x), or _sp_dvalues_kernel at
                                           M <= 64: an exact selection either way

Precision
    All dots accumulate in fp32; fp32 operands use TF32 only when PyTorch's own
    ``torch.backends.cuda.matmul.allow_tf32`` is on. The rank-``R`` intermediates of the
    dense-sparse product (``t`` forward, ``dt`` backward) are rounded to the input dtype for bf16
    and fp32, and kept in fp32 for fp16 (:func:`intermediate_dtype`, shared with the low-rank
    family): ``x·Sᵀ`` can exceed fp16's range (65504) where ``y`` does not, and ``g·D`` where
    ``dx`` does not. The products that consume them then run on fp32 operands as TF32 (fp16's
    10-bit mantissa, fp32's range) at half the fp16 tensor-core rate: ``_ds_chain_kernel``
    (``T_FP32``), and ``_sp_dx_kernel`` / ``_sp_dvalues_kernel`` with an fp32 ``dt`` against the
    fp16 ``S`` / ``x`` (``MIXED``); the saved ``t`` and ``dt`` take 4 bytes per element. The
    two-kernel path's ``t·Dᵀ``, ``gᵀ·t`` go through the low-rank family's GEMM, which handles the
    mixed dtypes the same way. The references round at the same places, so CPU and kernels agree.
    Under the Triton interpreter the dot operands are upcast to fp32 (``UPCAST``), since the
    interpreter's fp16/bf16 ``tl.dot`` is wrong.

Performance notes are design intent, not measurements: no GPU has run these kernels yet.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch

from ._config import (
    HAS_TRITON,
    KernelSpec,
    Tunable,
    acc_dtype,
    dot_precision,
    m_bucket,
    next_pow2,
    register_kernel,
    row_block_grid,
    upcast_dots,
)
from . import _config, _cost
from ._split import COUNTERS as _DECODE_COUNTERS, discard_enabled, discard_mode, discard_target, split_buffers, split_counters
from .lowrank import FUSED_MAX_R, _pad_rank, gemm, intermediate_dtype

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._split import _split_arrive, _split_discard, _split_sum, _split_total
    from .lowrank import _role_signal, _role_wait, _roles_done   # ticket-ordered roles (one-launch phases)


# ============================================================================================
# The packed layout, in plain PyTorch (the kernels read and write exactly this; the
# Sparse24Weight container, packing, the pruning API and the conversion to PyTorch's layout
# live in fastfactor.formats.sparse24)
# ============================================================================================

def meta_cols(in_features: int) -> int:
    """Columns of the ``uint8`` metadata of a 2:4 weight with ``in_features`` inputs."""
    return (int(in_features) + 7) // 8


def _codes(meta: torch.Tensor, k: int):
    """``(i0, i1)`` int64 ``(rows, K/4)`` from the packed codes."""
    m = meta.to(torch.int64)
    nib = torch.stack((m & 15, m >> 4), dim=-1).reshape(meta.shape[0], 2 * meta.shape[1])[:, : k // 4]
    return nib & 3, nib >> 2


def unpack_24(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """Dense ``(rows, k)`` from packed ``values (rows, k/2)`` and ``meta`` (pure PyTorch)."""
    rows = values.shape[0]
    i0, i1 = _codes(meta, k)
    idx = torch.stack((i0, i1), dim=-1)                                  # (rows, K/4, 2)
    dense = values.new_zeros((rows, k // 4, 4))
    dense.scatter_(-1, idx, values.reshape(rows, k // 4, 2))
    return dense.reshape(rows, k)


def compress_like(dense: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The entries of ``dense (rows, K)`` at the kept positions named by ``meta``: ``(rows, K/2)``.

    Used for gradients: the gradient of the kept values is ``compress_like(dW, meta)``.
    """
    rows, k = dense.shape
    i0, i1 = _codes(meta, k)
    idx = torch.stack((i0, i1), dim=-1)
    return dense.reshape(rows, k // 4, 4).gather(-1, idx).reshape(rows, k // 2)


# ============================================================================================
# References
# ============================================================================================

def mask_24_ref(scores: torch.Tensor) -> torch.Tensor:
    """Boolean 2:4 mask keeping, per group of 4, the 2 largest ``scores`` (ties: lower index).

    Element ``j`` of a group is kept when fewer than 2 elements ``k`` of the group beat it, where
    ``k`` beats ``j`` if ``s_k > s_j`` or (``s_k == s_j`` and ``k < j``). The Triton kernel
    implements the same rule, so the two agree bit for bit.
    """
    rows, k = scores.shape
    s = scores.reshape(rows, k // 4, 4)
    sj = s[..., :, None]
    sk = s[..., None, :]
    pos = torch.arange(4, device=s.device)
    earlier = pos[None, :] < pos[:, None]                                # [j, k]: k < j
    beats = (sk > sj) | ((sk == sj) & earlier)
    return (beats.sum(-1) < 2).reshape(rows, k)


def sparse24_linear_ref(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``y = x·Wᵀ + b`` with ``W = unpack(values, meta)``; fp32 accumulation (fp64 stays fp64).

    x: (..., K), values: (N, K/2), meta: (N, ceil(K/8)) uint8, bias: (N,) -> (..., N) in
    ``out_dtype`` (default x's dtype; the dense-sparse op asks for ``intermediate_dtype``).
    """
    acc = acc_dtype(x.dtype)
    w = unpack_24(values.to(acc), meta, 2 * values.shape[1])
    y = torch.matmul(x.to(acc), w.t())
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(out_dtype or x.dtype)


def sparse24_bwd_ref(g, x, values, meta, has_bias=True, need_x=True, need_values=True):
    """Backward of :func:`sparse24_linear_ref` (``g = dL/dy``), fp32 accumulation (fp64 stays fp64)::

        dx  = g·W                      (M, K)    W = unpack(values, meta)
        dv  = kept entries of gᵀ·x     (N, K/2)  the gradient of the stored values only
        db  = Σ_m g                    (N,)

    g: (M, N), x: (M, K), values: (N, K/2), meta: (N, ceil(K/8)) -> (dx, dv, db), None where not needed.
    """
    acc = acc_dtype(g.dtype)
    g32 = g.to(acc)
    dx = dv = db = None
    if need_x:
        dx = (g32 @ unpack_24(values.to(acc), meta, 2 * values.shape[1])).to(x.dtype)
    if need_values:
        dv = compress_like(g32.t() @ x.to(acc), meta).to(values.dtype)
    if has_bias:
        db = g32.sum(0).to(g.dtype)
    return dx, dv, db


def dense_sparse_linear_ref(
    x: torch.Tensor,
    d: torch.Tensor,
    s_values: torch.Tensor,
    s_meta: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    return_t: bool = False,
):
    """``y = (x·Sᵀ)·Dᵀ + b`` with ``S (R, K)`` 2:4 and ``D (N, R)``; the intermediate is rounded
    to ``intermediate_dtype(x.dtype)`` as the kernels do (the input dtype; fp32 for fp16).
    -> (..., N) in x's dtype, or with ``return_t`` ``(y, t)``, ``t = x·Sᵀ`` in that dtype."""
    acc = acc_dtype(x.dtype)
    inter = intermediate_dtype(x.dtype)
    s = unpack_24(s_values.to(acc), s_meta, 2 * s_values.shape[1])
    t = torch.matmul(x.to(acc), s.t())
    if inter != acc:
        t = t.to(inter).to(acc)
    y = torch.matmul(t, d.to(acc).t())
    if bias is not None:
        y = y + bias.to(acc)
    if return_t:
        return y.to(x.dtype), t.to(inter)
    return y.to(x.dtype)


def dense_sparse_bwd_ref(g, x, d, s_values, s_meta, t=None, has_bias=True, need_x=True, need_d=True, need_s=True):
    """Backward of :func:`dense_sparse_linear_ref` by the formulas of the module docstring
    (``dt = g·D``, ``dx = dt·S``, ``dD = gᵀ·t``, ``dSv`` = kept entries of ``dtᵀ·x``, ``db = Σ g``),
    fp32 accumulation, ``t`` (recomputed when ``None``) and ``dt`` rounded to
    ``intermediate_dtype(x.dtype)`` like the kernels.

    g: (M, N), x: (M, K), d: (N, R), s_values: (R, K/2), t: (M, R) or None -> (dx, dd, ds, db),
    None where not needed.
    """
    acc = acc_dtype(x.dtype)
    g32, x32, d32 = g.to(acc), x.to(acc), d.to(acc)
    s32 = unpack_24(s_values.to(acc), s_meta, 2 * s_values.shape[1])
    inter = intermediate_dtype(x.dtype)
    t32 = t.to(acc) if t is not None else (x32 @ s32.t()).to(inter).to(acc)
    dt = (g32 @ d32).to(inter).to(acc)
    dx = (dt @ s32).to(x.dtype) if need_x else None
    dd = (g32.t() @ t32).to(d.dtype) if need_d else None
    ds = compress_like(dt.t() @ x32, s_meta).to(s_values.dtype) if need_s else None
    db = g32.sum(0).to(g.dtype) if has_bias else None
    return dx, dd, ds, db


# ============================================================================================
# Kernels
# ============================================================================================

# Autotune spaces, each with two named members: *_INTERP, the one config the interpreter runs, and
# *_FIXED, the one deterministic runs launch (kernels._config.Tunable). BLOCK_K is a multiple of 8
# (whole metadata bytes) and every dot dimension is >= 16.
PRUNE_INTERP = dict(BLOCK_R=16, BLOCK_G=8, num_warps=4, num_stages=1)
PRUNE_FIXED = dict(BLOCK_R=32, BLOCK_G=64, num_warps=4, num_stages=1)
PRUNE_SPACE = [
    PRUNE_INTERP,
    PRUNE_FIXED,
    dict(BLOCK_R=64, BLOCK_G=32, num_warps=4, num_stages=1),
]

# y = x·Wᵀ: BLOCK_N weight rows x BLOCK_M token rows per program
MM_INTERP = dict(BLOCK_N=16, BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=2)
MM_FIXED = dict(BLOCK_N=128, BLOCK_M=16, BLOCK_K=128, num_warps=4, num_stages=4)
MM_SPACE = [
    MM_INTERP,
    MM_FIXED,
    dict(BLOCK_N=64, BLOCK_M=16, BLOCK_K=256, num_warps=4, num_stages=3),
    dict(BLOCK_N=128, BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=4),
    dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=256, BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3),
]

# dx = g·W: BLOCK_M x BLOCK_K output tile, reduction over BLOCK_N weight rows
DX_INTERP = dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=16, num_warps=4, num_stages=2)
DX_FIXED = dict(BLOCK_M=16, BLOCK_K=128, BLOCK_N=64, num_warps=4, num_stages=4)
DX_SPACE = [
    DX_INTERP,
    DX_FIXED,
    dict(BLOCK_M=64, BLOCK_K=128, BLOCK_N=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_K=128, BLOCK_N=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_K=256, BLOCK_N=32, num_warps=8, num_stages=3),
]

# dx at decode sizes (M <= 64): BLOCK_K (dx columns) and the N split planned (dx_decode_plan);
# tuned: BLOCK_N, the reduction step over weight rows
DXD_INTERP = dict(BLOCK_N=32, num_warps=4, num_stages=1)
DXD_FIXED = dict(BLOCK_N=64, num_warps=4, num_stages=3)
DXD_SPACE = [
    DXD_INTERP,
    DXD_FIXED,
    dict(BLOCK_N=128, num_warps=4, num_stages=3),
    dict(BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, num_warps=8, num_stages=3),
    # without the cp.async pipeline (as DECODE_SPACE's; 128 rows a step at 8 warps spilled 8 B
    # in the sm_90 build at BLOCK_K 128 / 32 tokens, so not that one)
    dict(BLOCK_N=64, num_warps=4, num_stages=1),
]
#: every N split is a multiple of this (the largest BLOCK_N of the space)
DXD_N_QUANTUM = 128


def _dxd_ok(bk: int, bm: int, bn: int, nw: int) -> bool:
    """Register fit of a dx-decode config (``BLOCK_K`` dx columns, ``BLOCK_M`` tokens, ``BLOCK_N``
    weight rows a step): the expanded ``BLOCK_N x BLOCK_K`` tile, the ``g`` tile ``BLOCK_M x
    BLOCK_N`` and the fp32 ``BLOCK_M x BLOCK_K`` accumulator (two slots an element) at most 144
    16-bit elements a thread, and 8 warps only for weight tiles of at least 8192 elements.
    Calibrated on the byte-permute builds of compile-check (102 builds, sm_90 / sm_80, aligned and
    generic): none spills at or under 144 (K256/M32/N64/w8: 136 a thread, 168 registers);
    K128/M64/N128/w8 (160 a thread) spilled 48 B in the generic sm_90 build, K128/M64/N64/w4 (224)
    88-104 B. (The forward's :func:`_decode_ok` keeps 104: its compare-and-select tiles spilled
    from 112.)"""
    t = 32 * nw
    return bk * bn + bn * bm + 2 * bk * bm <= 144 * t and (nw <= 4 or bk * bn >= 8192)


def _dxd_dv_ok(bk: int, bm: int, bn: int, nw: int) -> bool:
    """Register fit of a dx-decode config that also forms the kept values' gradient (``HAS_DV``):
    :func:`_dxd_ok`'s tiles plus the fp32 ``BLOCK_N x BLOCK_K`` dense gradient of the weight tile
    (two slots an element) and the ``x`` tile, within the same 144 16-bit slots a thread."""
    t = 32 * nw
    return (bk * bn + bn * bm + 2 * bk * bm + 2 * bn * bk + bm * bk <= 144 * t
            and (nw <= 4 or bk * bn >= 8192))


def dxd_space(BLOCK_K: int, BLOCK_M: int, HAS_DV: bool = False, **_) -> list[dict]:
    """dx-decode configs within the register budget of :func:`_dxd_ok` (:func:`_dxd_dv_ok` with
    ``HAS_DV``)."""
    return _fitting_space(DXD_SPACE, BLOCK_K, BLOCK_M, "BLOCK_N", _dxd_dv_ok if HAS_DV else _dxd_ok) or [DXD_SPACE[1]]


def _prune_dx_decode(configs_, named_args, **kwargs):
    dv = kwargs.get("HAS_DV", named_args.get("HAS_DV", False))
    return _prune_fitting(configs_, named_args, kwargs, "BLOCK_K", "BLOCK_N", 64, last=False,
                          ok=_dxd_dv_ok if dv else _dxd_ok)


# dvalues = kept(gᵀ·x): BLOCK_N x BLOCK_K dense tile, reduction over BLOCK_M token rows
DV_INTERP = dict(BLOCK_N=16, BLOCK_K=32, BLOCK_M=16, num_warps=4, num_stages=2)
DV_FIXED = dict(BLOCK_N=64, BLOCK_K=128, BLOCK_M=64, num_warps=4, num_stages=3)
DV_SPACE = [
    DV_INTERP,
    DV_FIXED,
    dict(BLOCK_N=128, BLOCK_K=128, BLOCK_M=32, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_K=64, BLOCK_M=64, num_warps=4, num_stages=4),
    # a few tokens (the decode-size backward): wide weight tiles, so that each program's fixed
    # share (the kept-entry selection, the stores) spreads over more weights (DV_ISSUE)
    dict(BLOCK_N=64, BLOCK_K=256, BLOCK_M=16, num_warps=4, num_stages=3),
    dict(BLOCK_N=128, BLOCK_K=256, BLOCK_M=16, num_warps=8, num_stages=3),
]

#: Per-instruction model of the kept-value gradient kernel (``_sp_dvalues_kernel``), fitted to the
#: sm_90 SASS of 7 builds at 4096², 16 tokens (BLOCK_N 64-128, BLOCK_K 64-256, BLOCK_M 16-64, 4 / 8
#: warps; every build within 10 %), per warp: ``program + acc`` per dense-tile element of a thread
#: (the selection of the kept entries, the stores) ``+ opnd`` per operand element of a thread (the
#: first loads), and per step of ``BLOCK_M`` tokens ``step + step_opnd`` per operand element.
#: At 16 tokens the fixed share dominates: 0.43 instructions per weight at 64x128 tiles, 0.25 at
#: 128x256 (the issue time 7.1 -> 3.9 us at 4096², against 4.45 us of DRAM bytes).
DV_ISSUE = dict(program=128, acc=5.95, opnd=2.12, step=31, step_opnd=1.5)


def dvalues_warp_instructions(BLOCK_N: int, BLOCK_K: int, BLOCK_M: int, num_warps: int, M: int) -> tuple[float, list]:
    """``(warp-instructions of one dvalues program, loop trips)`` by :data:`DV_ISSUE`."""
    m = DV_ISSUE
    t = 32 * num_warps
    opnd = BLOCK_M * (BLOCK_N + BLOCK_K) / t
    trips = max(1, -(-M // BLOCK_M))
    per_warp = m["program"] + m["acc"] * BLOCK_N * BLOCK_K / t + m["opnd"] * opnd + trips * (m["step"] + m["step_opnd"] * opnd)
    return num_warps * per_warp, [trips]

# decode (M <= 64): BLOCK_N and the split are planned per shape (decode_plan); tuned: BLOCK_K
DECODE_INTERP = dict(BLOCK_K=32, num_warps=4, num_stages=1)
DECODE_FIXED = dict(BLOCK_K=256, num_warps=4, num_stages=3)
DECODE_SPACE = [   # BLOCK_K >= 128 on a GPU (_prune_decode): a row's codes are one 16-byte vector
    DECODE_INTERP,
    DECODE_FIXED,
    dict(BLOCK_K=128, num_warps=4, num_stages=4),
    dict(BLOCK_K=128, num_warps=8, num_stages=3),
    dict(BLOCK_K=256, num_warps=8, num_stages=3),
    # without the cp.async pipeline (the autotuner sees them with FASTFACTOR_SPARSE24_UNPIPELINED=1:
    # unpipelined_ok): the async wgmma's register staging and the shared-memory reads of the
    # staged codes and values go (sm_90 main loop at 128x128 / 8 warps: 259 -> 166 instructions a
    # warp and step); whether one step in flight keeps the DRAM rate only a GPU tells. Last, so
    # that the model, blind to stages, keeps the configs above
    dict(BLOCK_K=128, num_warps=8, num_stages=1),
    dict(BLOCK_K=256, num_warps=4, num_stages=1),
]


def _decode_fits(bn: int, bm: int, bk: int, nw: int) -> bool:
    """Per-thread footprint of a decode config within the register file: the expanded weight
    tile, the x tile and the fp32 accumulator (two 16-bit slots an element) at most 104 16-bit
    elements a thread (calibrated on compile-check's sm_90 builds: 104 builds without spill at
    N32/M16/K256/w4; 112 spilled 16 B at N32/M64/K256/w8, 160 at N128/M64/K128/w8, 192 at N64/M64/K128/w4)."""
    t = 32 * nw
    return bn * bk + bk * bm + 2 * bn * bm <= 104 * t


def _decode_ok(bn: int, bm: int, bk: int, nw: int) -> bool:
    """:func:`_decode_fits`, and 8 warps only for weight tiles of at least 8192 elements (the split
    build at N32/M16/K128/w8 spilled 8 B on sm_90 at 80 registers: too little work per warp) and
    steps of at most 128 (the byte-permute builds at K256/w8 spilled: N32 88-136 B on sm_90
    generic, N64 8 B on sm_80)."""
    return _decode_fits(bn, bm, bk, nw) and (nw <= 4 or (bn * bk >= 8192 and bk <= 128))


def _fitting_space(space: list, fixed: int, bm: int, tuned: str, ok=None) -> list[dict]:
    """The GPU configs of a decode-family ``space`` (its first entry is the interpreter's) whose
    tiles fit ``ok`` (:func:`_decode_ok`, or :func:`_dxd_ok`): ``fixed`` is the planned tile side
    passed first, ``tuned`` the config key passed third (decode: BLOCK_N, BLOCK_K; dx-decode:
    BLOCK_K, BLOCK_N)."""
    ok = ok or _decode_ok
    return [c for c in space[1:] if ok(fixed, bm, c[tuned], c["num_warps"])]


#: ``FASTFACTOR_SPARSE24_UNPIPELINED=1`` lets the decode kernels' autotuner time their configs
#: without the cp.async pipeline (``num_stages=1``: fewer instructions a step, one step's loads in
#: flight), which it otherwise never sees (the default until a GPU has timed them: ``make gpu-check``)
UNPIPELINED_ENV = "FASTFACTOR_SPARSE24_UNPIPELINED"


def unpipelined_ok() -> bool:
    """Whether the decode kernels' autotuner may take configs without the pipeline (:data:`UNPIPELINED_ENV`)."""
    return _forced(UNPIPELINED_ENV, ("0", "1")) == "1"


def _prune_fitting(configs_, named_args, kwargs, fixed: str, tuned: str, least: int, last: bool, ok=None):
    """Autotuner prune of a decode-family kernel: on a GPU only configs with ``tuned >= least``
    (16-byte code rows / wide g loads) that fit the registers (``ok``, default
    :func:`_decode_ok`), the unpipelined ones only with :func:`unpipelined_ok`; if none fits,
    the last (``last``) or first pipelined such config."""
    ok = ok or _decode_ok
    f = kwargs.get(fixed, named_args.get(fixed))
    bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M"))
    if _config.is_interpreter():
        return configs_
    wide = [c for c in configs_ if c.kwargs[tuned] >= least]
    piped = [c for c in wide if c.num_stages > 1]
    kept = [c for c in (wide if unpipelined_ok() else piped) if ok(f, bm, c.kwargs[tuned], c.num_warps)]
    return kept or (piped[-1:] if last else piped[:1]) or wide[:1] or configs_


#: most tokens the sparse tensor-core decode takes (two 8-token tiles of the mma)
MMA_DECODE_MAX_M = 16
#: inputs per step of its loop (two k32 chunks; K and every split a multiple of it)
MMA_K_QUANTUM = 64
#: row tile -> (num_warps, 16-row tiles per warp) of the sparse tensor-core decode
MMA_TILES = {16: (1, 1), 32: (2, 1), 64: (4, 1), 128: (4, 2), 256: (8, 2)}
#: the sparse tensor-core decode's configs: one per warp count (its row tile fixes it, MMA_TILES)
MMA_SPACE = [dict(num_warps=4, num_stages=1), dict(num_warps=1, num_stages=1), dict(num_warps=2, num_stages=1),
             dict(num_warps=8, num_stages=1)]


def mma_space(BLOCK_N: int, RT: int, **_) -> list[dict]:
    """The one config of a sparse tensor-core decode build: ``BLOCK_N / (16·RT)`` warps."""
    return [c for c in MMA_SPACE if c["num_warps"] == BLOCK_N // (16 * RT)]


def _prune_mma(configs_, named_args, **kwargs):
    a = {**named_args, **kwargs}
    return [c for c in configs_ if c.num_warps == a["BLOCK_N"] // (16 * a["RT"])]


def decode_space(BLOCK_N: int, BLOCK_M: int, **_) -> list[dict]:
    """The decode configs that fit the registers at this row tile and token block."""
    return _fitting_space(DECODE_SPACE, BLOCK_N, BLOCK_M, "BLOCK_K") or [DECODE_SPACE[3]]


def _prune_decode(configs_, named_args, **kwargs):
    return _prune_fitting(configs_, named_args, kwargs, "BLOCK_N", "BLOCK_K", 128, last=True)


#: every K split is a multiple of this (the largest BLOCK_K of the space)
DECODE_K_QUANTUM = 256


def _prune_wide(configs_, named_args, **kwargs):
    """On a GPU, only configs whose rows of codes are 16-byte vectors (``BLOCK_K >= 128``)."""
    if _config.is_interpreter():
        return configs_
    return [c for c in configs_ if c.kwargs["BLOCK_K"] >= 128] or configs_

# expand W once per step / compress dW: BLOCK_R rows x BLOCK_K columns per program (BLOCK_K >= 128:
# a row's codes are one 16-byte vector of four 32-bit words)
EXPAND_INTERP = dict(BLOCK_R=16, BLOCK_K=32, num_warps=4, num_stages=1)
EXPAND_FIXED = dict(BLOCK_R=32, BLOCK_K=256, num_warps=4, num_stages=1)
EXPAND_SPACE = [   # the interpreter's config is not offered to a GPU (_prune_wide: 4-byte code loads)
    EXPAND_INTERP,
    EXPAND_FIXED,
    dict(BLOCK_R=64, BLOCK_K=128, num_warps=4, num_stages=1),
    dict(BLOCK_R=16, BLOCK_K=512, num_warps=4, num_stages=1),
]

# fused dense-sparse: BLOCK_M token rows; the intermediate is R_PAD x BLOCK_M fp32
DS_INTERP = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=2)
DS_FIXED = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3)
DS_SPACE = [
    DS_INTERP,
    DS_FIXED,
    dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
    # within DS_TILE_ELEMS at R_PAD = 128 / 256
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
]


#: elements per thread of the fused kernel's three register tiles, the fp32 intermediate
#: ``R_PAD x BLOCK_M``, the expanded ``S`` tile ``R_PAD x BLOCK_K`` and the ``D`` tile
#: ``BLOCK_N x R_PAD``: configs above it spill on sm_80 / sm_90 (compile-check: 224-1240 B of stack
#: from 224 elements per thread, e.g. R_PAD = 128 with 16x128x128 at 4 warps; none at <= 160)
DS_TILE_ELEMS = 160


def _ds_fits(bm: int, bn: int, bk: int, nw: int, r_pad: int) -> bool:
    return (bm * r_pad <= 16384 and bk * r_pad <= 16384
            and (bm + bn + bk) * r_pad <= DS_TILE_ELEMS * 32 * nw)


def ds_space(R_PAD: int, **_) -> list[dict]:
    """Configs of the fused dense-sparse kernel within its register budget (``DS_TILE_ELEMS``):
    the fp32 intermediate ``R_PAD x BLOCK_M``, the expanded ``R_PAD x BLOCK_K`` tile and the
    ``BLOCK_N x R_PAD`` tile of ``D``."""
    return [c for c in DS_SPACE if _ds_fits(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], R_PAD)]


#: the rank-split dense-sparse kernel (``_ds_rank_split_kernel``): ``BLOCK_R``, ``BLOCK_N`` and
#: ``BLOCK_M`` are planned per shape (:func:`ds_rank_split_plan`), the reduction step tuned
RS_INTERP = dict(BLOCK_K=32, num_warps=4, num_stages=1)
RS_FIXED = dict(BLOCK_K=128, num_warps=4, num_stages=3)
RS_SPACE = [
    RS_INTERP,
    RS_FIXED,
    dict(BLOCK_K=256, num_warps=4, num_stages=3),
    dict(BLOCK_K=128, num_warps=8, num_stages=3),
]
#: rank chunks and column tiles the rank-split planner weighs
RS_CHUNKS = (16, 32, 64)
RS_TILES = (32, 64, 128, 256)


def _per_split(n: int, splits: int, quantum: int) -> int:
    """Elements per split of a split reduction: ``ceil(n / splits)`` rounded up to ``quantum``."""
    per = -(-n // splits)
    return -(-per // quantum) * quantum


#: register slots (16-bit) a thread of the rank-split / two-role kernels may hold (:func:`_rs_fits`)
RS_SLOTS = 104


def _rs_stage2_slots(bn: int, br: int, bm: int) -> int:
    """16-bit slots of a program's second product: the ``D`` tile ``(bn, br)``, the chunk of
    ``t`` ``(br, bm)`` and the fp32 ``yᵀ`` tile ``(bn, bm)``."""
    return bn * br + br * bm + 2 * bn * bm


def _rs_fits(br: int, bn: int, bm: int, bk: int, nw: int) -> bool:
    """Register footprint of a rank-split config, 16-bit slots a thread (as :func:`_decode_fits`):
    stage 1 holds the expanded ``S`` tile, the ``x`` tile and the fp32 chunk of ``t``; stage 2 the
    ``D`` tile, ``t`` and the fp32 partial of ``y``; the larger of the two within ``RS_SLOTS`` a thread."""
    one = br * bk + bk * bm + 2 * br * bm
    return max(one, _rs_stage2_slots(bn, br, bm)) <= RS_SLOTS * 32 * nw


def rs_space(BLOCK_R: int, BLOCK_N: int, BLOCK_M: int, **_) -> list[dict]:
    """The GPU configs of the rank-split kernel that fit the registers at this plan."""
    return [c for c in RS_SPACE[1:] if _rs_fits(BLOCK_R, BLOCK_N, BLOCK_M, c["BLOCK_K"], c["num_warps"])]


def _prune_rs(configs_, named_args, **kwargs):
    """Autotuner prune of the rank-split kernel: on a GPU the configs with 16-byte code rows
    (``BLOCK_K >= 128``) that fit the registers at the planned tiles (:func:`_rs_fits`); if none
    does (the planner only plans tiles some config fits), :data:`RS_FIXED` (``configs_[1]``: the
    space's first GPU entry)."""
    if _config.is_interpreter():
        return configs_
    get = lambda k: kwargs.get(k, named_args.get(k))
    br, bn, bm = get("BLOCK_R"), get("BLOCK_N"), get("BLOCK_M")
    kept = [c for c in configs_ if c.kwargs["BLOCK_K"] >= 128 and _rs_fits(br, bn, bm, c.kwargs["BLOCK_K"], c.num_warps)]
    return kept or configs_[1:2] or configs_


def _prune_roles(configs_, named_args, **kwargs):
    """Autotuner prune of the two-role kernel: :func:`_prune_rs`, and with a K split only steps
    that divide the producers' ``K_PER_SPLIT`` (a multiple of :data:`ROLES_K_QUANTUM`; any step
    is exact, a step that does not divide it wastes part of the split's last one)."""
    kept = _prune_rs(configs_, named_args, **kwargs)
    kps = kwargs.get("K_PER_SPLIT", named_args.get("K_PER_SPLIT"))
    ks = kwargs.get("KS", named_args.get("KS"))
    if ks and ks > 1 and kps:
        return [c for c in kept if kps % c.kwargs["BLOCK_K"] == 0] or kept
    return kept


#: the two-role launch's producers split ``K`` in multiples of this many inputs (every GPU step of
#: :data:`RS_SPACE` with ``BLOCK_K = 128`` divides them; the codes' 32-bit words need 32), into
#: at most ``max(ROLES_SPLITS)`` splits
ROLES_K_QUANTUM = 128
ROLES_SPLITS = (1, 2, 3, 4, 6, 8)


#: the two-role consumers' widest step over the rank (:func:`roles_rank_step`)
ROLES_C_STEP = 64


def roles_rank_step(R: int, BLOCK_R: int, BLOCK_N: int, BLOCK_M: int) -> int:
    """The consumers' step over the rank (``BLOCK_C``): the widest of ``64, 32, 16`` that is at
    least ``BLOCK_R``, at most ``R`` rounded up to a power of two, and whose ``D`` tile, ``t`` tile
    and fp32 ``yᵀ`` tile fit the registers of 4 warps (:func:`_rs_fits`' rule); ``BLOCK_R`` when
    none does (the planner's tiles fit at ``BLOCK_R``). Wide steps read ``t``'s rows in long runs:
    at rank 168 (a 336-byte row pitch) 16-wide steps touched twice the sectors they read."""
    for bc in (ROLES_C_STEP, 32, 16):
        if BLOCK_R <= bc <= max(BLOCK_R, next_pow2(R)) and _rs_stage2_slots(BLOCK_N, bc, BLOCK_M) <= RS_SLOTS * 32 * 4:
            return bc
    return BLOCK_R


#: ``0`` turns the two-role consumers' prefetch off (launch and planner; what ``make gpu-check``
#: times it against); ``1`` / ``auto`` (default): where it fits (:func:`roles_prefetch`)
PREFETCH_ENV = "FASTFACTOR_DS_ROLES_PREFETCH"


def roles_prefetch(BLOCK_N: int, BLOCK_C: int, BLOCK_M: int, elem: int = 2, allowed: Optional[bool] = None) -> bool:
    """``PREFETCH`` of the two-role launch: the consumer loads the first ``BLOCK_C``-wide step of
    its ``D`` tile before waiting for the producers, where that step, the first ``t`` step and the
    fp32 ``yᵀ`` tile together fit ``RS_SLOTS`` 16-bit slots a thread of 4 warps (:func:`_rs_fits`'
    rule, ``elem / 2`` slots an element of ``D``; the tiles already held while the step is formed,
    so almost always). One step only: builds holding two or more spilled on sm_80 / sm_90 (8-504
    bytes of stack at some producer tiles and steps; compile-check 2026-12-03, Triton 3.9), builds
    holding one did not (60 of 60; under Triton 3.6 one aligned sm_90 build keeps one register on
    the stack: BENCHMARKS.md). ``allowed=False``: never; ``None`` (default): unless
    ``FASTFACTOR_DS_ROLES_PREFETCH=0``."""
    if allowed is None:
        allowed = _forced(PREFETCH_ENV, ("0", "1")) != "0"
    d_extra = BLOCK_N * BLOCK_C * (elem // 2 - 1)      # fp32 D: a second slot an element
    return allowed and _rs_stage2_slots(BLOCK_N, BLOCK_C, BLOCK_M) + d_extra <= RS_SLOTS * 32 * 4


def roles_k_split(K: int, ks: int) -> tuple[int, int]:
    """``(splits, inputs per split)`` of the two-role producers asked for ``ks`` splits of ``K``:
    ``ceil(K / ks)`` rounded up to :data:`ROLES_K_QUANTUM` (``K`` itself for one split), and the
    splits that then hold inputs."""
    if ks <= 1:
        return 1, int(K)
    kps = _per_split(K, ks, ROLES_K_QUANTUM)
    return -(-K // kps), kps


#: the dense-sparse backward's dense-factor launch (``_ds_bwd_dense_kernel``): ``BLOCK_R``,
#: ``BLOCK_M`` and the column splits are planned per shape (:func:`ds_bwd_dense_plans`), the column
#: step ``BLOCK_N`` tuned
BD_INTERP = dict(BLOCK_N=16, num_warps=4, num_stages=1)
BD_FIXED = dict(BLOCK_N=64, num_warps=4, num_stages=3)
BD_SPACE = [
    BD_INTERP,
    BD_FIXED,
    dict(BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_N=128, num_warps=4, num_stages=3),
    dict(BLOCK_N=32, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, num_warps=8, num_stages=3),
]
#: rank chunks and column splits the planner weighs; columns per split: multiples of BD_N_QUANTUM
#: (so of every BLOCK_N of the space)
BD_CHUNKS = (16, 32, 64, 128)
BD_SPLITS = (1, 2, 4, 8, 16, 32)
BD_N_QUANTUM = 128


def _bd_fits(br: int, bn: int, bm: int, nw: int) -> bool:
    """Register footprint of a dense-factor backward config, 16-bit slots a thread (as
    :func:`_rs_fits`): the fp32 ``dD`` tile, the ``D`` tile, the fp32 partial of ``dtᵀ``, the ``g``
    tile and the chunk of ``t``, within 104 a thread."""
    return 2 * bn * br + bn * br + 2 * br * bm + bn * bm + bm * br <= 104 * 32 * nw


def bd_space(BLOCK_R: int, BLOCK_M: int, **_) -> list[dict]:
    """The GPU configs of the dense-factor backward that fit the registers at this plan."""
    return [c for c in BD_SPACE[1:] if _bd_fits(BLOCK_R, c["BLOCK_N"], BLOCK_M, c["num_warps"])]


def _prune_bd(configs_, named_args, **kwargs):
    """Autotuner prune of the dense-factor backward: on a GPU the configs that fit the registers at
    the planned tiles (:func:`_bd_fits`); if none does, :data:`BD_FIXED` (``configs_[1]``)."""
    if _config.is_interpreter():
        return configs_
    get = lambda k: kwargs.get(k, named_args.get(k))
    br, bm = get("BLOCK_R"), get("BLOCK_M")
    kept = [c for c in configs_ if _bd_fits(br, c.kwargs["BLOCK_N"], bm, c.num_warps)]
    return kept or configs_[1:2] or configs_


def _prune_ds(configs_, named_args, **kwargs):
    r_pad = kwargs.get("R_PAD", named_args.get("R_PAD"))
    kept = [c for c in configs_
            if _ds_fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, r_pad)]
    return kept or configs_[:1]


#: The byte-permute expansion (``_expand24_prmt``): the 3-bit pattern index ``(c ^ c >> 1) & 7`` of a
#: canonical code ``c = i0 | i1 << 2`` (``i0 < i1``) -> the source of each in-group slot: 0 = the
#: first kept value, 1 = the second, 2 = zero. The six canonical codes take indices 1-6; 0 and 7
#: (no canonical code) expand to zeros.
PRMT_PATTERNS = {6: (0, 1, 2, 2), 4: (0, 2, 1, 2), 2: (0, 2, 2, 1), 5: (2, 0, 1, 2), 3: (2, 0, 2, 1),
                 1: (2, 2, 0, 1), 0: (2, 2, 2, 2), 7: (2, 2, 2, 2)}


def _prmt_tables() -> tuple:
    """Per slot ``k``, the 8-byte lookup table ``(bytes 0-3, bytes 4-7)`` indexed by the pattern
    index: the ``prmt`` selector byte of that slot (two nibbles: its low and high byte), ``0x10``
    (bytes 0-1 of the pair: the first value), ``0x32`` (bytes 2-3: the second), ``0x54`` (bytes 4-5
    of the zero operand)."""
    byte = lambda src: 0x10 + 0x22 * src
    return tuple((sum(byte(PRMT_PATTERNS[i][k]) << 8 * i for i in range(4)),
                  sum(byte(PRMT_PATTERNS[i][k]) << 8 * (i - 4) for i in range(4, 8))) for k in range(4))


PRMT_TABLES = _prmt_tables()

#: the forward decode takes the byte permutes on a GPU from this many weights per tile (``BLOCK_N·
#: BLOCK_K``): below it the lookups' fixed share costs more than the selects saved (sm_90 SASS of the
#: main loop, PRMT / compare-and-select: 16x256 1.10, 32x128 0.96, 32x256 0.82-1.11, 64x128 0.66-0.80,
#: 128x128 0.66); the dx-decode takes them at every tile (0.85-0.99)
PRMT_MIN_TILE = 8192

if HAS_TRITON:
    _PRMT_MIN_TILE = tl.constexpr(PRMT_MIN_TILE)
    _PT0L, _PT0H = tl.constexpr(PRMT_TABLES[0][0]), tl.constexpr(PRMT_TABLES[0][1])
    _PT1L, _PT1H = tl.constexpr(PRMT_TABLES[1][0]), tl.constexpr(PRMT_TABLES[1][1])
    _PT2L, _PT2H = tl.constexpr(PRMT_TABLES[2][0]), tl.constexpr(PRMT_TABLES[2][1])
    _PT3L, _PT3H = tl.constexpr(PRMT_TABLES[3][0]), tl.constexpr(PRMT_TABLES[3][1])

    @triton.jit
    def _load_codes(
        meta_ptr,    # (R, ceil(K/8)) uint8 codes of the 2:4 matrix, or (R, K/32) int32 words (META32)
        offs_r,      # (BLOCK_R,) row indices of the tile
        mask_r,      # (BLOCK_R,) row validity
        k0,          # first input column of the tile (a multiple of BLOCK_K)
        K,
        stride_mr, stride_mc,   # in elements of meta_ptr's type
        BLOCK_K: tl.constexpr,
        META32: tl.constexpr,
        EVEN: tl.constexpr,   # every row of the tile and columns k0 .. k0+BLOCK_K in the matrix: no masks
    ):
        """``(i0, i1)``, each ``(BLOCK_R, BLOCK_K/4)`` int32, for columns ``k0 .. k0+BLOCK_K``.

        ``META32``: the same bytes read as little-endian 32-bit words (8 codes per word, group
        ``8w + j`` in bits ``4j .. 4j+3``), one ``(BLOCK_R, BLOCK_K/32)`` vector load, then split
        in registers; needs ``K % 32 == 0`` and ``BLOCK_K >= 32``."""
        if META32:
            offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            wptr = meta_ptr + offs_r[:, None] * stride_mr + offs_w[None, :] * stride_mc
            if EVEN:
                word = tl.load(wptr)
            else:
                word = tl.load(wptr, mask=mask_r[:, None] & (offs_w < K // 32)[None, :], other=0)
            shift = (tl.arange(0, 8) * 4)[None, None, :]
            code = tl.reshape((word[:, :, None] >> shift) & 15, (word.shape[0], BLOCK_K // 4))
        else:
            offs_g = k0 // 4 + tl.arange(0, BLOCK_K // 4)
            bptr = meta_ptr + offs_r[:, None] * stride_mr + (offs_g // 2)[None, :] * stride_mc
            if EVEN:
                byte = tl.load(bptr).to(tl.int32)
            else:
                byte = tl.load(bptr, mask=mask_r[:, None] & (offs_g < K // 4)[None, :], other=0).to(tl.int32)
            code = (byte >> ((offs_g % 2) * 4)[None, :]) & 15
        return code & 3, code >> 2

    @triton.jit
    def _expand24(
        vals_ptr,    # (R, K/2) kept values of the 2:4 matrix
        meta_ptr,    # (R, ceil(K/8)) uint8 codes
        offs_r, mask_r, k0, K,
        stride_vr, stride_vc,
        stride_mr, stride_mc,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        META32: tl.constexpr,
    ):
        """The dense tile ``W[offs_r, k0 : k0 + BLOCK_K]`` (``(BLOCK_R, BLOCK_K)``, the values'
        dtype) built on chip from the compressed values and codes."""
        offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        v = tl.load(
            vals_ptr + offs_r[:, None] * stride_vr + offs_v[None, :] * stride_vc,
            mask=mask_r[:, None] & (offs_v[None, :] < K // 2), other=0.0,
        )
        i0, i1 = _load_codes(meta_ptr, offs_r, mask_r, k0, K, stride_mr, stride_mc, BLOCK_K, META32, False)
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_R, BLOCK_K // 4, 2)))
        slot = tl.arange(0, 4)[None, None, :]
        zero = tl.zeros((BLOCK_R, BLOCK_K // 4, 4), dtype=v.dtype)
        w = tl.where(slot == i0[:, :, None], v0[:, :, None], zero)
        w = tl.where(slot == i1[:, :, None], v1[:, :, None], w)
        return tl.reshape(w, (BLOCK_R, BLOCK_K))

    @triton.jit
    def _load_pairs(
        vals_ptr,    # (R, K/2) kept values, 16-bit, rows 4-byte aligned: read as int32 pairs
        offs_r, mask_r, k0, K,
        stride_vr,   # row stride of the values in int32 pairs (= elements / 2)
        BLOCK_K: tl.constexpr,
        EVEN: tl.constexpr,   # the whole tile in the matrix: no masks
    ):
        """The ``(BLOCK_R, BLOCK_K/4)`` int32 pairs ``v0 | v1 << 16`` of the groups of columns
        ``k0 : k0 + BLOCK_K`` (16-byte vectors), zero outside the matrix."""
        offs_g = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        ptr = vals_ptr + offs_r[:, None] * stride_vr + offs_g[None, :]
        if EVEN:
            return tl.load(ptr)
        return tl.load(ptr, mask=mask_r[:, None] & (offs_g < K // 4)[None, :], other=0)

    @triton.jit
    def _expand24_pairs(
        vals_ptr,    # (R, K/2) kept values, 16-bit, rows 4-byte aligned: read as int32 pairs
        meta_ptr,    # codes (see _load_codes)
        offs_r, mask_r, k0, K,
        stride_vr,   # row stride of the values in int32 pairs (= elements / 2)
        stride_mr, stride_mc,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        META32: tl.constexpr,
        EVEN: tl.constexpr,   # the whole tile in the matrix: no masks
    ):
        """:func:`_expand24` for 16-bit values read as one int32 per group (``v0 | v1 << 16``,
        16-byte vectors), each in-group slot formed elementwise on ``(BLOCK_R, BLOCK_K/4)``
        tensors and the four slots joined innermost: no split of the loaded tile."""
        pair = _load_pairs(vals_ptr, offs_r, mask_r, k0, K, stride_vr, BLOCK_K, EVEN)
        i0, i1 = _load_codes(meta_ptr, offs_r, mask_r, k0, K, stride_mr, stride_mc, BLOCK_K, META32, EVEN)
        lo = pair.to(tl.int16)                      # v0's bits (truncation)
        hi = (pair >> 16).to(tl.int16)              # v1's bits
        z = tl.zeros_like(lo)
        s0 = tl.where(i0 == 0, lo, z)
        s1 = tl.where(i0 == 1, lo, tl.where(i1 == 1, hi, z))
        s2 = tl.where(i0 == 2, lo, tl.where(i1 == 2, hi, z))
        s3 = tl.where(i1 == 3, hi, z)
        w = tl.join(tl.join(s0, s2), tl.join(s1, s3))  # (BLOCK_R, BLOCK_K/4, 2, 2): [a, b] = slot a + 2b
        return tl.reshape(w, (BLOCK_R, BLOCK_K))        # int16 bits; the caller bitcasts

    @triton.jit
    def _prmt(a, b, sel, ASM: tl.constexpr):
        """PTX ``prmt.b32 d, a, b, sel`` (default mode), elementwise on int32 tensors: byte ``i`` of
        ``d`` is byte ``sel[4i+2 : 4i]`` of the 8 bytes ``{b, a}`` (``a`` = bytes 0-3). ``ASM``: the
        instruction itself (a GPU build); else the same selection in integer ops (the interpreter:
        no inline assembly there). The sign-replicate bit ``sel[4i+3]`` is never set by the callers
        (the emulation does not model it; ``tests/sparse24/test_prmt.py`` checks the tables)."""
        if ASM:
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            out = tl.zeros_like(sel)
            for i in tl.static_range(4):
                nib = (sel >> (4 * i)) & 7
                src = tl.where(nib < 4, a, b)
                out |= ((src >> ((nib & 3) * 8)) & 0xFF) << (8 * i)
            return out

    @triton.jit
    def _expand24_prmt(
        vals_ptr,    # (R, K/2) kept values, 16-bit, rows 4-byte aligned: read as int32 pairs
        meta_ptr,    # (R, K/32) int32 code words (META32 only)
        offs_r, mask_r, k0, K,
        stride_vr,   # row stride of the values in int32 pairs (= elements / 2)
        stride_mr, stride_mc,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        ASM: tl.constexpr,
        EVEN: tl.constexpr,   # the whole tile in the matrix: no masks
    ):
        """:func:`_expand24_pairs` by byte permutes: each group's two output words (slots 0-1 and
        2-3, two 16-bit entries each) are ``prmt(pair, 0, sel)``, ``sel`` looked up from the group's
        code, four groups per lookup. Per group 5 ``prmt`` (a share of the four table lookups, two
        selector assemblies, two expansions; sm_90 SASS of the forward decode's main loop:
        0.107-0.137 instructions per weight with whole tiles, against 0.217-0.236 for the
        compare-and-select form).

        Layout (what keeps the loop free of shared-memory round trips): the code words are
        broadcast to their two half-words (a new axis, ``(R, K/32, 2)``, not ``join``, whose new
        axis Triton keeps in one thread) and the selectors built on ``(R, K/32, 2, 4)``, so each
        thread forms the selectors of the four groups whose 16-byte value vector it loaded; a
        ``join``/``reshape`` to ``(R, K/16)`` first made Triton move the four looked-up words
        through shared memory (8 ``BAR`` a step). The tables' low words come through
        ``tl.where(K > 0, table, 0)``: a value the compiler cannot fold, so ptxas keeps four
        registers instead of re-materializing a constant before every lookup (16 instructions a
        step at 128x128, 8 warps; ``K > 0`` always holds in a launch).

        The code ``c = i0 | i1 << 2`` becomes a 3-bit pattern index ``(c ^ c >> 1) & 7`` (the six
        canonical codes ``i0 < i1`` map to 1-6; eight groups at once on a code word). Table ``k``
        (:data:`PRMT_TABLES`) gives, per index, the selector byte of slot ``k``: ``0x10`` for
        ``v0`` (bytes 0-1 of the pair), ``0x32`` for ``v1`` (bytes 2-3), ``0x54`` for zero (bytes
        4-5 of the zero operand). Codes that are not canonical (``i0 >= i1``: not produced by
        :func:`pack_24`; ``Sparse24Weight.validate`` finds them) expand differently from the
        compare-and-select form."""
        pair = _load_pairs(vals_ptr, offs_r, mask_r, k0, K, stride_vr, BLOCK_K, EVEN)
        offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        wptr = meta_ptr + offs_r[:, None] * stride_mr + offs_w[None, :] * stride_mc
        if EVEN:
            word = tl.load(wptr)
        else:
            word = tl.load(wptr, mask=mask_r[:, None] & (offs_w < K // 32)[None, :], other=0)
        half = word[:, :, None] >> (tl.arange(0, 2) * 16)[None, None, :]  # (R, K/32, 2): 4 groups each
        idx = (half ^ (half >> 1)) & 0x7777                               # 4 pattern indices
        zero = tl.zeros_like(idx)
        live = K > 0                                       # always true: keeps the tables in registers
        s0 = _prmt(zero + tl.where(live, _PT0L, 0), zero + _PT0H, idx, ASM)  # byte j: slot 0's selector, group j
        s1 = _prmt(zero + tl.where(live, _PT1L, 0), zero + _PT1H, idx, ASM)
        s2 = _prmt(zero + tl.where(live, _PT2L, 0), zero + _PT2H, idx, ASM)
        s3 = _prmt(zero + tl.where(live, _PT3L, 0), zero + _PT3H, idx, ASM)
        z4 = tl.zeros((BLOCK_R, BLOCK_K // 32, 2, 4), dtype=tl.int32)
        jsel = (tl.arange(0, 4) * 0x11 + 0x40)[None, None, None, :] + z4  # byte j of a, byte j of b
        sel_a = tl.reshape(_prmt(s0[:, :, :, None] + z4, s1[:, :, :, None] + z4, jsel, ASM), (BLOCK_R, BLOCK_K // 4))
        sel_b = tl.reshape(_prmt(s2[:, :, :, None] + z4, s3[:, :, :, None] + z4, jsel, ASM), (BLOCK_R, BLOCK_K // 4))
        zp = tl.zeros_like(pair)
        out_a = _prmt(pair, zp, sel_a, ASM)                              # slots 0, 1
        out_b = _prmt(pair, zp, sel_b, ASM)                              # slots 2, 3
        w = tl.reshape(tl.join(out_a, out_b), (BLOCK_R, BLOCK_K // 2))   # 2 entries a word, in order
        return tl.reshape(tl.join(w.to(tl.int16), (w >> 16).to(tl.int16)), (BLOCK_R, BLOCK_K))

    @triton.jit
    def _expand24_tile(
        vals_ptr,    # (R, K/2) kept values (int32 pairs when PAIRS)
        meta_ptr,    # codes (see _load_codes)
        offs_r, mask_r, k0, K,
        stride_vr, stride_vc,   # of vals_ptr's elements (pairs when PAIRS)
        stride_mr, stride_mc,
        like,        # a tensor of the other dot operand: the expanded tile takes its dtype
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        META32: tl.constexpr,
        PAIRS: tl.constexpr,
        USE_PRMT: tl.constexpr,  # with PAIRS: byte permutes (_expand24_prmt), else compare-and-select
        ASM: tl.constexpr,       # the permutes as prmt.b32 (a GPU build)
        EVEN: tl.constexpr,      # the whole tile in the matrix: loads without masks
    ):
        """The dense tile ``W[offs_r, k0 : k0 + BLOCK_K]`` of the decode kernels, by the expansion
        their constexprs choose."""
        if PAIRS:
            if USE_PRMT:
                w = _expand24_prmt(vals_ptr, meta_ptr, offs_r, mask_r, k0, K, stride_vr,
                                   stride_mr, stride_mc, BLOCK_R, BLOCK_K, ASM, EVEN)
            else:
                w = _expand24_pairs(vals_ptr, meta_ptr, offs_r, mask_r, k0, K, stride_vr,
                                    stride_mr, stride_mc, BLOCK_R, BLOCK_K, META32, EVEN)
            w = w.to(like.dtype, bitcast=True)
        else:
            w = _expand24(vals_ptr, meta_ptr, offs_r, mask_r, k0, K,
                          stride_vr, stride_vc, stride_mr, stride_mc, BLOCK_R, BLOCK_K, META32)
        return w

    @triton.jit
    def _prune24_kernel(
        # --- pointers ---
        w_ptr,      # (R, K) weight to prune
        s_ptr,      # (R, K) importance scores; read only when HAS_SCORES (else |w| is used)
        out_ptr,    # (R, K) pruned weight (w at kept positions, 0 elsewhere)
        mask_ptr,   # (R, K) uint8 mask, 1 at kept positions
        # --- dimensions ---
        R, G,       # rows, groups of 4 per row (K = 4·G)
        # --- strides (in elements) ---
        stride_wr, stride_wk,
        stride_sr, stride_sk,
        stride_or, stride_ok,
        stride_mr, stride_mk,
        # --- meta-parameters ---
        HAS_SCORES: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_g = tl.program_id(1)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
        m2 = (offs_r < R)[:, None] & (offs_g < G)[None, :]
        col = offs_g[None, :] * 4
        # the four members of each group, each (BLOCK_R, BLOCK_G)
        wp = w_ptr + offs_r[:, None] * stride_wr
        w0 = tl.load(wp + (col + 0) * stride_wk, mask=m2, other=0.0)
        w1 = tl.load(wp + (col + 1) * stride_wk, mask=m2, other=0.0)
        w2 = tl.load(wp + (col + 2) * stride_wk, mask=m2, other=0.0)
        w3 = tl.load(wp + (col + 3) * stride_wk, mask=m2, other=0.0)
        if HAS_SCORES:
            sp = s_ptr + offs_r[:, None] * stride_sr
            s0 = tl.load(sp + (col + 0) * stride_sk, mask=m2, other=0.0).to(tl.float32)
            s1 = tl.load(sp + (col + 1) * stride_sk, mask=m2, other=0.0).to(tl.float32)
            s2 = tl.load(sp + (col + 2) * stride_sk, mask=m2, other=0.0).to(tl.float32)
            s3 = tl.load(sp + (col + 3) * stride_sk, mask=m2, other=0.0).to(tl.float32)
        else:
            s0 = tl.abs(w0.to(tl.float32))
            s1 = tl.abs(w1.to(tl.float32))
            s2 = tl.abs(w2.to(tl.float32))
            s3 = tl.abs(w3.to(tl.float32))
        # k beats j when s_k > s_j, or s_k == s_j and k < j; keep j when fewer than 2 beat it
        b01 = (s0 >= s1).to(tl.int32)  # 0 beats 1
        b02 = (s0 >= s2).to(tl.int32)
        b03 = (s0 >= s3).to(tl.int32)
        b12 = (s1 >= s2).to(tl.int32)
        b13 = (s1 >= s3).to(tl.int32)
        b23 = (s2 >= s3).to(tl.int32)
        keep0 = ((1 - b01) + (1 - b02) + (1 - b03)) < 2
        keep1 = (b01 + (1 - b12) + (1 - b13)) < 2
        keep2 = (b02 + b12 + (1 - b23)) < 2
        keep3 = (b03 + b13 + b23) < 2
        op = out_ptr + offs_r[:, None] * stride_or
        mp = mask_ptr + offs_r[:, None] * stride_mr
        tl.store(op + (col + 0) * stride_ok, tl.where(keep0, w0, 0.0).to(w0.dtype), mask=m2)
        tl.store(op + (col + 1) * stride_ok, tl.where(keep1, w1, 0.0).to(w0.dtype), mask=m2)
        tl.store(op + (col + 2) * stride_ok, tl.where(keep2, w2, 0.0).to(w0.dtype), mask=m2)
        tl.store(op + (col + 3) * stride_ok, tl.where(keep3, w3, 0.0).to(w0.dtype), mask=m2)
        tl.store(mp + (col + 0) * stride_mk, keep0.to(tl.uint8), mask=m2)
        tl.store(mp + (col + 1) * stride_mk, keep1.to(tl.uint8), mask=m2)
        tl.store(mp + (col + 2) * stride_mk, keep2.to(tl.uint8), mask=m2)
        tl.store(mp + (col + 3) * stride_mk, keep3.to(tl.uint8), mask=m2)

    @triton.jit
    def _sp_mm_kernel(
        # --- pointers ---
        x_ptr,      # (M, K) input rows
        vals_ptr,   # (N, K/2) kept values of the 2:4 weight W (N, K)
        meta_ptr,   # (N, ceil(K/8)) uint8 codes of W
        bias_ptr,   # (N,) bias; read only when HAS_BIAS
        y_ptr,      # (M, N) output y = x·Wᵀ + b
        # --- dimensions ---
        M, N, K,
        M_BUCKET,   # power-of-two bucket of M: autotune key only
        # --- strides (in elements) ---
        stride_xm, stride_xk,
        stride_vn, stride_vc,
        stride_mn, stride_mc,
        stride_ym, stride_yn,
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        UPCAST: tl.constexpr,      # upcast dot operands to fp32 (interpreter)
        PRECISION: tl.constexpr,   # tl.dot input_precision for fp32 operands
        META32: tl.constexpr,      # meta_ptr is the codes as int32 words (see _load_codes)
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        mask_m = offs_m < M
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)     # yᵀ tile
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            w = _expand24(vals_ptr, meta_ptr, offs_n, mask_n, k0, K,
                          stride_vn, stride_vc, stride_mn, stride_mc, BLOCK_N, BLOCK_K, META32)
            xt = tl.load(  # (BLOCK_K, BLOCK_M) = x[m-tile, k-tile]ᵀ
                x_ptr + offs_m[None, :] * stride_xm + kk[:, None] * stride_xk,
                mask=mask_m[None, :] & (kk < K)[:, None], other=0.0,
            )
            if UPCAST:
                w = w.to(tl.float32)
                xt = xt.to(tl.float32)
            acc = tl.dot(w, xt, acc, input_precision=PRECISION)
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc + b[:, None]
        tl.store(
            y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn,
            acc.to(y_ptr.dtype.element_ty),
            mask=mask_m[None, :] & mask_n[:, None],
        )

    @triton.jit
    def _sp_dx_kernel(
        # --- pointers ---
        g_ptr,      # (M, N) upstream gradient dL/dy (or dt of dense-sparse; fp32 when MIXED)
        vals_ptr,   # (N, K/2) kept values of the 2:4 weight W (N, K)
        meta_ptr,   # (N, ceil(K/8)) uint8 codes of W
        dx_ptr,     # (M, K) output dx = g·W
        # --- dimensions ---
        M, N, K,
        # --- strides (in elements) ---
        stride_gm, stride_gn,
        stride_vn, stride_vc,
        stride_mn, stride_mc,
        stride_dm, stride_dk,
        # --- meta-parameters ---
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        META32: tl.constexpr,      # meta_ptr is the codes as int32 words (see _load_codes)
        MIXED: tl.constexpr,       # g and W differ in dtype (fp32 dt x fp16 S): both to fp32
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        k0 = pid_k * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_n0 = tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + offs_n0
            mask_n = offs_n < N
            g = tl.load(
                g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                mask=mask_m[:, None] & mask_n[None, :], other=0.0,
            )
            w = _expand24(vals_ptr, meta_ptr, offs_n, mask_n, k0, K,
                          stride_vn, stride_vc, stride_mn, stride_mc, BLOCK_N, BLOCK_K, META32)
            if UPCAST or MIXED:
                g = g.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(g, w, acc, input_precision=PRECISION)
        tl.store(
            dx_ptr + offs_m[:, None] * stride_dm + offs_k[None, :] * stride_dk,
            acc.to(dx_ptr.dtype.element_ty),
            mask=mask_m[:, None] & (offs_k < K)[None, :],
        )

    @triton.jit
    def _kept_of_tile(
        dw,          # (BLOCK_N, BLOCK_K) fp32: the dense gradient of the weight tile W[n-tile, k-tile]
        meta_ptr,    # (N, ceil(K/8)) uint8 codes of W, or (N, K/32) int32 words (META32)
        dv_ptr,      # (N, K/2) output: the kept values' gradient (packed order)
        offs_n, mask_n, k0, K,
        stride_mn, stride_mc, stride_dn, stride_dc,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        META32: tl.constexpr,
    ):
        """Store the entries of ``dw`` at the tile's kept positions, in packed order, rounded once to
        ``dv``'s dtype: the exact selection of the dense gradient (slots 0..3 of each group; canonical
        codes: ``i0`` in 0..2, ``i1`` in 1..3, two selects per value)."""
        i0, i1 = _load_codes(meta_ptr, offs_n, mask_n, k0, K, stride_mn, stride_mc, BLOCK_K, META32, False)
        q0, q1 = tl.split(tl.reshape(dw, (BLOCK_N, BLOCK_K // 4, 2, 2)))    # slots (0, 2), (1, 3)
        w0, w2 = tl.split(q0)
        w1, w3 = tl.split(q1)
        dv0 = tl.where(i0 == 0, w0, tl.where(i0 == 1, w1, w2))
        dv1 = tl.where(i1 == 3, w3, tl.where(i1 == 2, w2, w1))
        dv = tl.reshape(tl.join(dv0, dv1), (BLOCK_N, BLOCK_K // 2))
        offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        tl.store(
            dv_ptr + offs_n[:, None] * stride_dn + offs_v[None, :] * stride_dc,
            dv.to(dv_ptr.dtype.element_ty),
            mask=mask_n[:, None] & (offs_v < K // 2)[None, :],
        )

    @triton.jit
    def _sp_dx_decode_kernel(
        # --- pointers ---
        g_ptr,      # (M, N) upstream gradient, M <= BLOCK_M (a handful of tokens)
        vals_ptr,   # (N, K/2) kept values of the 2:4 weight W (N, K) (int32 pairs when PAIRS)
        meta_ptr,   # (N, ceil(K/8)) uint8 codes of W, or (N, K/32) int32 words (META32)
        dx_ptr,     # (M, K) output dx = g·W
        db_ptr,     # HAS_DB: (N,) output db = Σ_m g[m, :] (the bias gradient), by column tile 0
        x_ptr,      # HAS_DV: (M, K) the layer's input rows; else unused
        dv_ptr,     # HAS_DV: (N, K/2) output: the kept values' gradient, (gᵀ·x) at the kept positions
        ws_ptr,     # SPLIT: (SPLIT_N, M, K) fp32 partial sums (workspace); else unused
        cnt_ptr,    # SPLIT and SYNC: (K_TILES,) int32 arrival counters, zero between launches
        # --- dimensions ---
        M, N, K,
        N_PER_SPLIT,  # weight rows per split (a multiple of every BLOCK_N of the space)
        SPLIT_N,      # N splits per column tile (programs = K_TILES · SPLIT_N)
        # --- strides (in elements) ---
        stride_gm, stride_gn,
        stride_vn, stride_vc,
        stride_mn, stride_mc,
        stride_dm, stride_dk,
        stride_xm, stride_xk,
        stride_dvn, stride_dvc,
        # --- meta-parameters ---
        HAS_DB: tl.constexpr,      # also the bias gradient (g's column sums, fp32, fixed order)
        HAS_DV: tl.constexpr,      # also the kept values' gradient of the weight tiles it streams
        SPLIT: tl.constexpr,
        SYNC: tl.constexpr,        # as in _sp_decode_kernel
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        META32: tl.constexpr,
        PAIRS: tl.constexpr,
        PRMT: tl.constexpr,        # with PAIRS and META32: 1 byte-permute expansion (emulated), 2 (prmt.b32)
        MIXED: tl.constexpr,       # g fp32 against 16-bit W (the dense-sparse dt): both to fp32
        BLOCK_M: tl.constexpr,     # >= M: every token of the launch
        BLOCK_K: tl.constexpr,     # dx columns per program (planned)
        BLOCK_N: tl.constexpr,     # weight rows per step of the reduction (tuned)
    ):
        """``dx[:, k-tile] = Σ_{n in split} g[:, n]·W[n, k-tile]`` for a few tokens in one launch:
        program ``p`` owns column tile ``p // SPLIT_N`` and weight-row split ``p % SPLIT_N``; it
        streams its slab of the compressed weight once against all ``M`` rows of ``g``. The split
        partials are reduced in the same launch by each tile's last arrival, in the fixed order
        ``s = 0, 1, …`` (as :func:`_sp_decode_kernel`): bitwise reproducible.

        With ``HAS_DV`` the launch is the whole 2:4 backward at a handful of tokens: every weight tile
        ``W[n-tile, k-tile]`` is streamed by exactly one program, which also forms the dense
        gradient of that tile, ``g[:, n-tile]ᵀ·x[:, k-tile]`` (the reduction over the tokens whole:
        one product, rounded once), and stores its entries at the kept positions
        (:func:`_kept_of_tile`, the selection :func:`_sp_dvalues_kernel` makes)."""
        pid = tl.program_id(0)
        pid_k = pid // SPLIT_N
        pid_s = pid % SPLIT_N
        offs_m = tl.arange(0, BLOCK_M)
        k0 = pid_k * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_k = offs_k < K
        n_begin = pid_s * N_PER_SPLIT
        n_end = tl.minimum(N, n_begin + N_PER_SPLIT)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if HAS_DV:          # x[:, k-tile] (BLOCK_M, BLOCK_K): the same for every weight tile of this program
            xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if UPCAST or MIXED:
                xk = xk.to(tl.float32)
        for n0 in range(n_begin, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            g = tl.load(
                g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                mask=mask_m[:, None] & mask_n[None, :], other=0.0,
            )
            if HAS_DB:
                if pid_k == 0:     # each weight row's g column read here anyway: db once per row
                    tl.store(db_ptr + offs_n, tl.sum(g.to(tl.float32), axis=0).to(db_ptr.dtype.element_ty),
                             mask=mask_n)
            w = _expand24_tile(vals_ptr, meta_ptr, offs_n, mask_n, k0, K, stride_vn, stride_vc, stride_mn,
                               stride_mc, g, BLOCK_N, BLOCK_K, META32, PAIRS, PRMT > 0, PRMT == 2, False)
            if UPCAST or MIXED:
                g = g.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(g, w, acc, input_precision=PRECISION)
            if HAS_DV:      # this weight tile's dense gradient gᵀ·x, kept entries stored (one program per tile)
                dw = tl.dot(tl.trans(g), xk, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32),
                            input_precision=PRECISION)                       # (BLOCK_N, BLOCK_K) fp32
                _kept_of_tile(dw, meta_ptr, dv_ptr, offs_n, mask_n, k0, K, stride_mn, stride_mc,
                              stride_dvn, stride_dvc, BLOCK_N, BLOCK_K, META32)
        mask_o = mask_m[:, None] & mask_k[None, :]
        out = dx_ptr + offs_m[:, None] * stride_dm + offs_k[None, :] * stride_dk
        if SPLIT:
            part = offs_m[:, None] * K + offs_k[None, :]          # (M, K) slice, contiguous along k
            last = _split_arrive(acc, ws_ptr, part, mask_o, M * K, pid_s, cnt_ptr, pid_k, SPLIT_N, SYNC)
            if last:
                tot = _split_total(acc, ws_ptr, part, mask_o, M * K, pid_s, SPLIT_N, offs_k, 1)
                tl.store(out, tot.to(dx_ptr.dtype.element_ty), mask=mask_o)
                if SYNC:
                    tl.atomic_xchg(cnt_ptr + pid_k, 0)             # ready for the next launch
        else:
            tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=mask_o)

    @triton.jit
    def _sp_dvalues_kernel(
        # --- pointers ---
        g_ptr,      # (M, N) upstream gradient of the rows of W·xᵀ (dy, or dt for dense-sparse;
                    #   fp32 when MIXED)
        x_ptr,      # (M, K) input rows
        meta_ptr,   # (N, ceil(K/8)) uint8 codes of W (which entries are kept)
        dv_ptr,     # (N, K/2) output: gradient of the kept values, (gᵀ·x) at kept positions
        # --- dimensions ---
        M, N, K,
        # --- strides (in elements) ---
        stride_gm, stride_gn,
        stride_xm, stride_xk,
        stride_mn, stride_mc,
        stride_dn, stride_dc,
        # --- meta-parameters ---
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        META32: tl.constexpr,      # meta_ptr is the codes as int32 words (see _load_codes)
        MIXED: tl.constexpr,       # g and x differ in dtype (fp32 dt x fp16 x): both to fp32
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = pid_k * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_m0 = tl.arange(0, BLOCK_M)
        mask_n = offs_n < N
        mask_k = offs_k < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)       # dense dW tile
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + offs_m0
            mask_m = offs_m < M
            gt = tl.load(  # (BLOCK_N, BLOCK_M) = g[m-tile, n-tile]ᵀ
                g_ptr + offs_m[None, :] * stride_gm + offs_n[:, None] * stride_gn,
                mask=mask_m[None, :] & mask_n[:, None], other=0.0,
            )
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0,
            )
            if UPCAST or MIXED:
                gt = gt.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(gt, x, acc, input_precision=PRECISION)
        # keep the entries at the kept positions, in packed order
        _kept_of_tile(acc, meta_ptr, dv_ptr, offs_n, mask_n, k0, K, stride_mn, stride_mc, stride_dn, stride_dc,
                      BLOCK_N, BLOCK_K, META32)

    @triton.jit
    def _store_split_yt(
        acc,         # (BLOCK_N, BLOCK_M) fp32: this program's yᵀ tile, or its split's partial of it
        out_ptr,     # (M, N) output y
        bias_ptr,    # (N,) bias; read only when HAS_BIAS
        ws_ptr,      # SPLIT: (N_SPLIT, M, N) fp32 partials (workspace)
        cnt_ptr,     # SPLIT and SYNC: int32 arrival counters, one per column tile
        offs_m, offs_n, mask_m, mask_n, M, N,
        stride_om, stride_on,
        pid_s, tile, N_SPLIT,
        HAS_BIAS: tl.constexpr,
        SPLIT: tl.constexpr,
        SYNC: tl.constexpr,
    ):
        """The decode kernels' epilogue: ``y[:, n-tile] = accᵀ (+ b)``; with ``SPLIT`` the partial
        goes to split ``pid_s``'s slice and the tile's last arrival sums the ``N_SPLIT`` slices in
        the order ``s = 0, 1, …`` (:func:`_split_arrive`, :func:`_split_total`), adds the bias,
        stores ``y`` and resets the tile's counter."""
        mask_y = mask_m[None, :] & mask_n[:, None]
        out = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
        if SPLIT:
            part = offs_m[None, :] * N + offs_n[:, None]          # (M, N) slice, contiguous along n
            last = _split_arrive(acc, ws_ptr, part, mask_y, M * N, pid_s, cnt_ptr, tile, N_SPLIT, SYNC)
            if last:
                tot = _split_total(acc, ws_ptr, part, mask_y, M * N, pid_s, N_SPLIT, offs_n, 0)
                if HAS_BIAS:
                    tot = tot + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
                tl.store(out, tot.to(out_ptr.dtype.element_ty), mask=mask_y)
                if SYNC:
                    tl.atomic_xchg(cnt_ptr + tile, 0)              # ready for the next launch
        else:
            if HAS_BIAS:
                acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_y)

    @triton.jit
    def _sp_decode_kernel(
        # --- pointers ---
        x_ptr,      # (M, K) input rows, M <= BLOCK_M (a handful of tokens)
        vals_ptr,   # (N, K/2) kept values of the 2:4 weight W (N, K)
        meta_ptr,   # (N, ceil(K/8)) uint8 codes of W, or (N, K/32) int32 words (META32)
        bias_ptr,   # (N,) bias; read only when HAS_BIAS
        out_ptr,    # (M, N) output y
        ws_ptr,     # SPLIT: (SPLIT_K, M, N) fp32 partial sums (workspace); else unused
        cnt_ptr,    # SPLIT and SYNC: (N_TILES,) int32 arrival counters, zero between launches
        # --- dimensions ---
        M, N, K,
        K_PER_SPLIT,  # inputs per split (a multiple of every BLOCK_K of the space)
        SPLIT_K,      # K splits per row tile (programs = N_TILES · SPLIT_K)
        # --- strides (in elements) ---
        stride_xm, stride_xk,
        stride_vn, stride_vc,
        stride_mn, stride_mc,
        stride_om, stride_on,
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        SPLIT: tl.constexpr,       # SPLIT_K > 1: partials + the fixed-order reduction in this launch
        SYNC: tl.constexpr,        # the reducer of a tile is its last program to arrive (counter; GPU);
                                   # else its last split (the interpreter runs programs in id order)
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        META32: tl.constexpr,
        PAIRS: tl.constexpr,       # vals_ptr is the 16-bit values as int32 pairs (_expand24_pairs)
        PRMT: tl.constexpr,        # with PAIRS and META32: 1 byte-permute expansion (emulated), 2 (prmt.b32,
                                   # tiles of at least PRMT_MIN_TILE weights; compare-and-select below)
        EVEN: tl.constexpr,        # N % BLOCK_N == 0 and K % DECODE_K_QUANTUM == 0: the weight's loads
                                   # and x's columns without masks (every BLOCK_K of the space divides it)
        BLOCK_N: tl.constexpr,     # weight rows per program (the MMA's M side)
        BLOCK_M: tl.constexpr,     # >= M: every token of the launch
        BLOCK_K: tl.constexpr,
    ):
        """Decode ``yᵀ[n-tile] = W[n-tile, k-split]·x[:, k-split]ᵀ`` in **one launch**. Program
        ``p`` owns row tile ``p // SPLIT_K`` and K split ``p % SPLIT_K``; it streams its slab of the
        compressed weight once (16-byte value vectors, 16-byte code words) against all ``M`` tokens,
        so the launch moves the compressed weight once and ``x`` once per row tile.

        With ``SPLIT`` each program stores its fp32 partial in its own slice of the workspace (no
        atomics on data) and arrives on its tile's counter; the tile's last arrival sums the
        ``SPLIT_K`` slices in the order ``s = 0, 1, …`` (its own from registers: the same bits it
        stored), adds the bias, stores ``y`` and resets the counter: bitwise reproducible whichever
        program arrives last, and no program ever waits."""
        pid = tl.program_id(0)
        pid_n = pid // SPLIT_K
        pid_s = pid % SPLIT_K
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        mask_m = offs_m < M
        k_begin = pid_s * K_PER_SPLIT
        k_end = tl.minimum(K, k_begin + K_PER_SPLIT)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)     # yᵀ tile
        for k0 in range(k_begin, k_end, BLOCK_K):
            kk = k0 + offs_k
            xptr = x_ptr + offs_m[None, :] * stride_xm + kk[:, None] * stride_xk  # x[:, k-tile]ᵀ (BLOCK_K, BLOCK_M)
            if EVEN:
                xt = tl.load(xptr, mask=mask_m[None, :], other=0.0)
            else:
                xt = tl.load(xptr, mask=mask_m[None, :] & (kk < K)[:, None], other=0.0)
            w = _expand24_tile(vals_ptr, meta_ptr, offs_n, mask_n, k0, K, stride_vn, stride_vc, stride_mn,
                               stride_mc, xt, BLOCK_N, BLOCK_K, META32, PAIRS,
                               PRMT == 1 or (PRMT == 2 and BLOCK_N * BLOCK_K >= _PRMT_MIN_TILE), PRMT == 2, EVEN)
            if UPCAST:
                w = w.to(tl.float32)
                xt = xt.to(tl.float32)
            acc = tl.dot(w, xt, acc, input_precision=PRECISION)
        _store_split_yt(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, mask_m, mask_n, M, N,
                        stride_om, stride_on, pid_s, pid_n, SPLIT_K, HAS_BIAS, SPLIT, SYNC)

    # ---- the decode on sparse tensor cores (mma.sp): no expansion at all ----------------------
    # PTX ``mma.sp.sync.aligned.m16n8k32.row.col.f32.{bf16,f16}``: D (16x8, fp32) += A (16x32, 2:4
    # sparse, given as its 16x16 kept values and 2-bit indices) · B (32x8), per warp. Fragments
    # (``g = lane >> 2``, ``t = lane & 3``; PTX ISA "sparse mma.m16n8k32 .f16/.bf16", the MLIR
    # nvgpu integration test of that instruction): A's four 32-bit registers hold the kept pairs of
    # logical groups ``t`` and ``t + 4`` of rows ``g`` and ``g + 8`` (``a0`` row g group t, ``a1`` row
    # g+8 group t, ``a2`` row g group t+4, ``a3`` row g+8 group t+4); B's register ``j`` holds
    # ``B[2t + 8j + {0, 1}, g]``; C/D's ``d0, d1`` are ``D[g, 2t + {0, 1}]`` and ``d2, d3`` the
    # same of row ``g + 8``; the metadata register ``e`` of lanes with ``t`` in {0, 1} (sparsity
    # selector 0) holds the codes of groups ``4t .. 4t+3`` of row ``g`` in its low 16 bits and of
    # row ``g + 8`` in its high 16 bits, one nibble ``i0 | i1 << 2`` per group (our code).
    _MMA_SP_BF16 = tl.constexpr(
        "mma.sp.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9, $10, $11}, {$12, $13, $14, $15}, $16, 0x0;")
    _MMA_SP_F16 = tl.constexpr(
        "mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9, $10, $11}, {$12, $13, $14, $15}, $16, 0x0;")

    @triton.jit
    def _thread_ids(S: tl.constexpr, MMA: tl.constexpr):
        """``(S,)`` int32: the CTA thread that holds each element (``%tid.x``; ``MMA == 2``), or under
        the interpreter (``MMA == 1``) the element's index, the same thread it stands for there."""
        if MMA == 2:
            return tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [tl.zeros([S], dtype=tl.int32)],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.arange(0, S)

    _SHFL_BFLY2 = tl.constexpr("shfl.sync.bfly.b32 $0, $1, 2, 0x1f, 0xffffffff;")
    _SHFL_BFLY4 = tl.constexpr("shfl.sync.bfly.b32 $0, $1, 4, 0x1f, 0xffffffff;")

    @triton.jit
    def _shfl_xor(v, LANE: tl.constexpr, NW: tl.constexpr, MMA: tl.constexpr):
        """Each lane's ``v`` from lane ``lane ^ LANE`` (``LANE`` 2 or 4; ``shfl.sync.bfly``);
        emulated by reordering the ``(S,)`` elements under the interpreter (a lane as
        ``(lane // 2LANE, the LANE bit, lane % LANE)``, the middle axis swapped)."""
        if MMA == 2:
            return tl.inline_asm_elementwise(_SHFL_BFLY4 if LANE == 4 else _SHFL_BFLY2, "=r,r",
                                             [v.to(tl.int32, bitcast=True)], dtype=tl.int32, is_pure=False,
                                             pack=1).to(v.dtype, bitcast=True)
        else:
            w = tl.permute(tl.reshape(v, (NW, 32 // (2 * LANE), 2, LANE)), (0, 1, 3, 2))
            lo, hi = tl.split(w)
            return tl.reshape(tl.permute(tl.join(hi, lo), (0, 1, 3, 2)), (NW * 32,))

    @triton.jit
    def _sel(m, a, b):
        """``a`` where the mask ``m`` has bits, else ``b`` (one logic op on a GPU)."""
        return ((a ^ b) & m) ^ b

    @triton.jit
    def _codes3_words(s0, s1, s2):
        """Four ``mma.sp`` metadata words from their three bit-plane words (:func:`mma_frag_codes3`):
        plane ``j`` holds bit ``j`` of group code ``c`` (``0..5``, :data:`CODES3_OF_NIBBLE`) of nibble
        ``n`` of word ``r`` at bit ``4n + r``. The nibble's bits as functions of the code bits (one
        logic op each: ``b0 = c2``, ``b1 = c0 & c1``, ``b2 = ~c0 | c1``, ``b3 = c0 | c1``), then a
        4 x 4 bit transpose inside each nibble across the four words (two stages of selects):
        19 logic ops and shifts for 32 groups."""
        t0 = s2
        t1 = s0 & s1
        t2 = ~s0 | s1
        t3 = s0 | s1
        u0 = _sel(0x33333333, t0, t2 << 2)            # bits r = 0, 1 of b0 and b2
        u2 = _sel(0x33333333, t0 >> 2, t2)            # bits r = 2, 3
        u1 = _sel(0x33333333, t1, t3 << 2)
        u3 = _sel(0x33333333, t1 >> 2, t3)
        return (_sel(0x55555555, u0, u1 << 1), _sel(0x55555555, u0 >> 1, u1),
                _sel(0x55555555, u2, u3 << 1), _sel(0x55555555, u2 >> 1, u3))

    @triton.jit
    def _bits16(w, FP16: tl.constexpr):
        """The two 16-bit halves (low, high) of int32 ``w`` as fp32 values (emulation only)."""
        dt: tl.constexpr = tl.float16 if FP16 else tl.bfloat16
        lo = (w & 0xFFFF).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
        return lo, hi

    @triton.jit
    def _mma_sp_emulated(a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e,
                         NW: tl.constexpr, FP16: tl.constexpr):
        """What one ``mma.sp`` does to the fragments of the ``NW`` warps (elements = threads, see
        the layout above): rebuild each warp's A (16 x 32, expanded from its kept pairs and the codes
        of lanes t = 0, 1), B (32 x 8), multiply in fp32 and hand each lane its D fragment. Used
        under the interpreter only, where it checks the loads' fragment bookkeeping."""
        # A's kept values, (NW, 16, 16): row 8h + g, compressed column 8u + 2t + e
        r0l, r0h = _bits16(tl.reshape(a0, (NW, 8, 4)), FP16)
        r1l, r1h = _bits16(tl.reshape(a1, (NW, 8, 4)), FP16)
        r2l, r2h = _bits16(tl.reshape(a2, (NW, 8, 4)), FP16)
        r3l, r3h = _bits16(tl.reshape(a3, (NW, 8, 4)), FP16)
        top = tl.join(tl.reshape(tl.join(r0l, r0h), (NW, 8, 8)), tl.reshape(tl.join(r2l, r2h), (NW, 8, 8)))
        bot = tl.join(tl.reshape(tl.join(r1l, r1h), (NW, 8, 8)), tl.reshape(tl.join(r3l, r3h), (NW, 8, 8)))
        top = tl.reshape(tl.permute(top, (0, 1, 3, 2)), (NW, 8, 16))
        bot = tl.reshape(tl.permute(bot, (0, 1, 3, 2)), (NW, 8, 16))
        kept = tl.reshape(tl.permute(tl.join(top, bot), (0, 3, 1, 2)), (NW, 16, 16))
        # codes (NW, 16, 8): groups 0-3 from lane t = 0, 4-7 from t = 1; row g low half, g + 8 high
        ew = tl.reshape(e, (NW, 8, 4))
        tt = tl.arange(0, 4)[None, None, :]
        e_t0 = tl.sum(tl.where(tt == 0, ew, 0), axis=2)
        e_t1 = tl.sum(tl.where(tt == 1, ew, 0), axis=2)
        gg = tl.arange(0, 8)[None, None, :]
        word = tl.where(gg < 4, e_t0[:, :, None], e_t1[:, :, None])
        ctop = (word >> ((gg % 4) * 4)) & 15
        cbot = (word >> ((gg % 4) * 4 + 16)) & 15
        code = tl.reshape(tl.permute(tl.join(ctop, cbot), (0, 3, 1, 2)), (NW, 16, 8))
        v0, v1 = tl.split(tl.reshape(kept, (NW, 16, 8, 2)))
        slot = tl.arange(0, 4)[None, None, None, :]
        i0 = (code & 3)[:, :, :, None]
        i1 = (code >> 2)[:, :, :, None]
        w = tl.where(slot == i0, v0[:, :, :, None], tl.where(slot == i1, v1[:, :, :, None], 0.0))
        w = tl.reshape(w, (NW, 16, 32))
        # B (NW, 8 tokens, 32): register j of lane (g, t) holds k = 8j + 2t + {0, 1}
        q0l, q0h = _bits16(tl.reshape(b0, (NW, 8, 4)), FP16)
        q1l, q1h = _bits16(tl.reshape(b1, (NW, 8, 4)), FP16)
        q2l, q2h = _bits16(tl.reshape(b2, (NW, 8, 4)), FP16)
        q3l, q3h = _bits16(tl.reshape(b3, (NW, 8, 4)), FP16)
        k0 = tl.reshape(tl.join(q0l, q0h), (NW, 8, 8))
        k1 = tl.reshape(tl.join(q1l, q1h), (NW, 8, 8))
        k2 = tl.reshape(tl.join(q2l, q2h), (NW, 8, 8))
        k3 = tl.reshape(tl.join(q3l, q3h), (NW, 8, 8))
        bt = tl.join(tl.join(k0, k1), tl.join(k2, k3))                      # (NW, 8, 8, j & 1, j >> 1)
        bt = tl.reshape(tl.permute(bt, (0, 1, 4, 3, 2)), (NW, 8, 32))
        d = tl.dot(w, tl.permute(bt, (0, 2, 1)), input_precision="ieee")   # (NW, 16, 8)
        d = tl.permute(tl.reshape(d, (NW, 2, 8, 4, 2)), (0, 2, 3, 1, 4))   # (warp, g, t, row half, e)
        de0, de1 = tl.split(d)
        d0, d2 = tl.split(de0)
        d1, d3 = tl.split(de1)
        S: tl.constexpr = NW * 32
        return (c0 + tl.reshape(d0, (S,)), c1 + tl.reshape(d1, (S,)),
                c2 + tl.reshape(d2, (S,)), c3 + tl.reshape(d3, (S,)))

    @triton.jit
    def _mma_sp(a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e,
                NW: tl.constexpr, FP16: tl.constexpr, MMA: tl.constexpr):
        """``(d0, d1, d2, d3) = mma.sp(A, B, C, e)`` on each warp's fragments (the layout above):
        the instruction (``MMA == 2``) or its emulation under the interpreter (``MMA == 1``)."""
        if MMA == 2:
            return tl.inline_asm_elementwise(
                _MMA_SP_F16 if FP16 else _MMA_SP_BF16, "=f,=f,=f,=f,r,r,r,r,r,r,r,r,f,f,f,f,r",
                [a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=False, pack=1)
        else:
            return _mma_sp_emulated(a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e, NW, FP16)

    @triton.jit
    def _split4(v):
        """The four columns of ``v (S, 4)`` as ``(S,)`` tensors, in order (in-thread splits: a row
        is one thread's 16-byte vector)."""
        ev, od = tl.split(tl.reshape(v, (v.shape[0], 2, 2)))            # columns 2a, 2a + 1
        w0, w2 = tl.split(ev)
        w1, w3 = tl.split(od)
        return w0, w1, w2, w3

    @triton.jit
    def _mma_x_frags(xw):
        """B fragments of both k32 chunks of a 64-input step for one token: register j of chunk c is
        word ``{0, 16, 2, 18}[j] + 4c`` from the lane's first word ``xw`` (see
        :func:`_sp_decode_mma_kernel`). Two tile accesses of four 4-byte words a lane: the lanes of
        a token interleave (the two parities), so each touches every 32-byte sector of the token's
        step once, and uses all of it."""
        two = tl.arange(0, 4)[None, :] * 2                               # words 0, 2, 4, 6
        c0j0, c0j2, c1j0, c1j2 = _split4(tl.load(xw[:, None] + two))
        c0j1, c0j3, c1j1, c1j3 = _split4(tl.load(xw[:, None] + 16 + two))
        return c0j0, c0j1, c0j2, c0j3, c1j0, c1j1, c1j2, c1j3

    @triton.jit
    def _mma_step(va_a, vb_a, va_b, vb_b, ea0, ea1, eb0, eb1, xw0, xw1,
                  a00, a01, a02, a03, a10, a11, a12, a13, b00, b01, b02, b03, b10, b11, b12, b13,
                  NW: tl.constexpr, FP16: tl.constexpr, MMA: tl.constexpr, RT: tl.constexpr, NT: tl.constexpr):
        """One 64-input step of a warp: its 16-row tile(s) (``va``/``vb``: rows g and g + 8 of tile
        a, and of tile b when ``RT == 2``) against one or two 8-token tiles (``xw0``/``xw1``), with
        the lane's metadata words of chunks 0 and 1 (``ea*`` tile a, ``eb*`` tile b); returns the
        sixteen accumulators (tile a, token tiles 0 and 1, then tile b)."""
        four = tl.arange(0, 4)[None, :]
        pa0, pa1, pa2, pa3 = _split4(tl.load(va_a[:, None] + four))
        pb0, pb1, pb2, pb3 = _split4(tl.load(vb_a[:, None] + four))
        if RT == 2:
            qa0, qa1, qa2, qa3 = _split4(tl.load(va_b[:, None] + four))
            qb0, qb1, qb2, qb3 = _split4(tl.load(vb_b[:, None] + four))
        u0, u1, u2, u3, u4, u5, u6, u7 = _mma_x_frags(xw0)
        if NT == 2:
            w0, w1, w2, w3, w4, w5, w6, w7 = _mma_x_frags(xw1)
        for c in tl.static_range(2):
            if c == 0:
                x00, x01, x02, x03 = u0, u1, u2, u3
                if NT == 2:
                    x10, x11, x12, x13 = w0, w1, w2, w3
            else:
                x00, x01, x02, x03 = u4, u5, u6, u7
                if NT == 2:
                    x10, x11, x12, x13 = w4, w5, w6, w7
            if c == 0:
                f0, f1, f2, f3, fe = pa0, pb0, pa1, pb1, ea0
            else:
                f0, f1, f2, f3, fe = pa2, pb2, pa3, pb3, ea1
            a00, a01, a02, a03 = _mma_sp(f0, f1, f2, f3, x00, x01, x02, x03, a00, a01, a02, a03, fe, NW, FP16, MMA)
            if NT == 2:
                a10, a11, a12, a13 = _mma_sp(f0, f1, f2, f3, x10, x11, x12, x13, a10, a11, a12, a13, fe,
                                             NW, FP16, MMA)
            if RT == 2:
                if c == 0:
                    h0, h1, h2, h3, he = qa0, qb0, qa1, qb1, eb0
                else:
                    h0, h1, h2, h3, he = qa2, qb2, qa3, qb3, eb1
                b00, b01, b02, b03 = _mma_sp(h0, h1, h2, h3, x00, x01, x02, x03, b00, b01, b02, b03, he,
                                             NW, FP16, MMA)
                if NT == 2:
                    b10, b11, b12, b13 = _mma_sp(h0, h1, h2, h3, x10, x11, x12, x13, b10, b11, b12, b13, he,
                                                 NW, FP16, MMA)
        return a00, a01, a02, a03, a10, a11, a12, a13, b00, b01, b02, b03, b10, b11, b12, b13

    @triton.jit
    def _mma_store_y(d0, d1, d2, d3, ra, rb, tok0, out_ptr, out32_ptr, bias_ptr, M, stride_om, row_ok,
                     HAS_BIAS: tl.constexpr, NW: tl.constexpr, MMA: tl.constexpr):
        """Store one tile's D fragments (rows ``ra``/``rb`` = features, columns ``tok0``, ``tok0 + 1`` =
        tokens) into ``y (M, N)`` as 4-byte pairs of neighbouring features: lanes with an odd row
        swap their ``tok0`` values for the partner's ``tok0 + 1`` ones (``lane ^ 4``), so each lane
        holds two adjacent features of one token."""
        odd = (ra & 1) == 1
        r0 = _shfl_xor(tl.where(odd, d0, d1), 4, NW, MMA)
        r1 = _shfl_xor(tl.where(odd, d2, d3), 4, NW, MMA)
        lo_a = tl.where(odd, r0, d0)
        hi_a = tl.where(odd, d1, r0)
        lo_b = tl.where(odd, r1, d2)
        hi_b = tl.where(odd, d3, r1)
        tok = tl.where(odd, tok0 + 1, tok0)
        fa = ra - (ra & 1)
        fb = rb - (rb & 1)
        if HAS_BIAS:
            lo_a += tl.load(bias_ptr + fa).to(tl.float32)
            hi_a += tl.load(bias_ptr + fa + 1).to(tl.float32)
            lo_b += tl.load(bias_ptr + fb).to(tl.float32)
            hi_b += tl.load(bias_ptr + fb + 1).to(tl.float32)
        dt: tl.constexpr = out_ptr.dtype.element_ty
        wa = _pack16(lo_a.to(dt), hi_a.to(dt))                            # features fa, fa + 1
        wb = _pack16(lo_b.to(dt), hi_b.to(dt))
        ok = row_ok & (tok < M)
        tl.store(out32_ptr + tok * (stride_om // 2) + fa // 2, wa, mask=ok)
        tl.store(out32_ptr + tok * (stride_om // 2) + fb // 2, wb, mask=ok)

    @triton.jit
    def _pack16(lo, hi):
        """int32 words holding the 16-bit ``lo`` in bits 0-15 and ``hi`` in bits 16-31."""
        return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)

    @triton.jit
    def _mma_store_part(d0, d1, d2, d3, ra, rb, tok0, ws_ptr, pid_s, M, N, row_ok):
        """One tile's fp32 D fragments into split ``pid_s``'s slice ``(M, N)`` of the workspace."""
        base = ws_ptr + pid_s * M * N
        ok0 = row_ok & (tok0 < M)
        ok1 = row_ok & (tok0 + 1 < M)
        tl.store(base + tok0 * N + ra, d0, mask=ok0)
        tl.store(base + (tok0 + 1) * N + ra, d1, mask=ok1)
        tl.store(base + tok0 * N + rb, d2, mask=ok0)
        tl.store(base + (tok0 + 1) * N + rb, d3, mask=ok1)

    @triton.jit
    def _sp_decode_mma_kernel(
        # --- pointers ---
        x_ptr,      # (M, K/2) int32: the 16-bit input rows, two neighbouring inputs per word
        vals_ptr,   # (N, K/4) int32: the kept-value pairs of the 2:4 weight W (N, K), one per group
        frag_ptr,   # (N/16, K/64, 8, 2, 2) int32: the codes in fragment order (mma_frag_codes);
                    # CODES3: (N/16, K/128, 48) int32 bit planes of them (mma_frag_codes3)
        bias_ptr,   # (N,) bias; read only when HAS_BIAS
        out_ptr,    # (M, N) output y, unit column stride, even row stride
        out32_ptr,  # the same memory as int32 words (two neighbouring features each)
        ws_ptr,     # SPLIT: (SPLIT_K, M, N) fp32 partial sums (workspace); else unused
        wsd_ptr,    # DISCARD: the workspace again, whose summed lines the reducer drops from L2
        cnt_ptr,    # SPLIT and SYNC: (N_TILES,) int32 arrival counters, zero between launches
        # --- dimensions ---
        M, N, K,
        K_PER_SPLIT,  # inputs per split, a multiple of 64 (of 128 with CODES3)
        SPLIT_K,      # K splits per row tile (programs = N_TILES · SPLIT_K)
        # --- strides ---
        stride_xm,    # x's row stride in words (elements / 2)
        stride_vn,    # the values' row stride in pairs (elements / 2)
        stride_om,    # y's row stride in elements
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        SPLIT: tl.constexpr,       # SPLIT_K > 1: partials + the fixed-order reduction in this launch
        SYNC: tl.constexpr,        # as in _sp_decode_kernel
        DISCARD: tl.constexpr,     # SPLIT: 2 drop the summed partials from L2 (1: stand-in), 0 keep (_split_discard)
        MMA: tl.constexpr,         # 2: mma.sp (a GPU build); 1: its emulation (the interpreter)
        FP16: tl.constexpr,        # fp16 operands (else bf16)
        RT: tl.constexpr,          # 16-row tiles per warp (1 or 2)
        NT: tl.constexpr,          # 8-token tiles (1: M <= 8, 2: M <= 16)
        CODES3: tl.constexpr,      # the codes as 3 bits a group (mma_frag_codes3; K, K_PER_SPLIT % 128 == 0)
        BLOCK_N: tl.constexpr,     # rows per program = 16 · RT · num_warps
    ):
        """``y = x·Wᵀ + b`` for ``M <= 16`` tokens on the **sparse tensor cores**: each warp issues
        ``mma.sp`` on the kept values and codes as they are in memory, so nothing is expanded.
        Program ``p`` owns row tile ``p // SPLIT_K`` (``BLOCK_N`` rows: ``RT`` tiles of 16 per warp)
        and K split ``p % SPLIT_K``, and streams its slab once against every token.

        Every tensor here is ``(S,)`` with ``S = 32 · num_warps``: one element per thread, whose lane
        comes from ``%tid.x`` (:func:`_thread_ids`), so the operands are each lane's fragment
        registers whatever layout Triton gives the tensors. A 64-input step is two ``k32`` chunks;
        within the step the mma's logical group ``L`` of chunk ``c`` is input group
        ``σ(c, L) = 4L + 2c`` (``L < 4``) or ``4(L - 4) + 2c + 1`` (a permutation of ``K`` applied
        to ``W`` and ``x`` alike, which leaves ``y`` unchanged), so that a lane's four pairs of a row
        (groups ``4t .. 4t+3``) are one 16-byte vector. The codes come in fragment order
        (:func:`mma_frag_codes`, made once per weight), ``x`` as 4-byte words. With ``CODES3`` the
        codes come as three bit planes for every four metadata words (3 bits a group instead of 4,
        :func:`mma_frag_codes3`), decoded once per two steps (:func:`_codes3_words`); with two
        16-row tiles a warp, lanes ``t = 2, 3`` (whose metadata the instruction ignores) decode
        tile b's and hand them over (``lane ^ 2``).

        Epilogue: without a split, lanes pair up (``lane ^ 4``) so that each stores two adjacent
        features of one token as one 4-byte word; with ``SPLIT`` the fp32 fragments go to the
        program's workspace slice and the tile's last arrival sums the slices in the order
        ``s = 0, 1, …`` (bitwise reproducible), adds the bias and stores ``y``; with ``DISCARD`` it
        then drops the tile's lines of the workspace from the L2 unwritten (:func:`_split_discard`),
        so the partials cost no DRAM bytes."""
        S: tl.constexpr = BLOCK_N // (16 * RT) * 32
        NW: tl.constexpr = BLOCK_N // (16 * RT)
        pid = tl.program_id(0)
        pid_n = pid // SPLIT_K
        pid_s = pid % SPLIT_K
        k_begin = pid_s * K_PER_SPLIT
        k_end = tl.minimum(K, k_begin + K_PER_SPLIT)
        tid = _thread_ids(S, MMA)
        lane = tid & 31
        warp = tid >> 5
        g = lane >> 2
        t = lane & 3
        steps = K // 64
        last16 = N // 16 - 1
        # tile 0 (and 1) of this warp: rows, row validity (tiles past N read the last tile, unstored)
        t16a = pid_n * (BLOCK_N // 16) + warp * RT
        ok_a = t16a <= last16
        t16a = tl.minimum(t16a, last16)
        ra_a = t16a * 16 + g
        va_a = vals_ptr + ra_a * stride_vn + 4 * t + k_begin // 4
        vb_a = va_a + 8 * stride_vn
        e_a = frag_ptr + ((t16a * steps + k_begin // 64) * 8 + g) * 4 + (t & 1) * 2
        t16b = t16a + 1
        ok_b = ok_a & (t16b <= last16)
        t16b = tl.minimum(t16b, last16)
        ra_b = t16b * 16 + g
        va_b = vals_ptr + ra_b * stride_vn + 4 * t + k_begin // 4
        vb_b = va_b + 8 * stride_vn
        e_b = frag_ptr + ((t16b * steps + k_begin // 64) * 8 + g) * 4 + (t & 1) * 2
        # the lane's x words: token g (and g + 8), words 8(t >> 1) + (t & 1) + {0, 2, 16, 18} + 4c
        xw0 = x_ptr + tl.minimum(g, M - 1) * stride_xm + 8 * (t >> 1) + (t & 1) + k_begin // 2
        xw1 = x_ptr + tl.minimum(g + 8, M - 1) * stride_xm + 8 * (t >> 1) + (t & 1) + k_begin // 2
        z = tl.zeros([S], dtype=tl.float32)
        a00, a01, a02, a03, a10, a11, a12, a13 = z, z, z, z, z, z, z, z   # tile 0: token tiles 0, 1
        b00, b01, b02, b03, b10, b11, b12, b13 = z, z, z, z, z, z, z, z   # tile 1
        KSTEP: tl.constexpr = 2 if CODES3 else 1                       # 64-input steps a trip
        if CODES3:
            # the lane's bit-plane codes of a 128-input pair of steps (mma_frag_codes3): tile a's for
            # lanes t = 0, 1; with two tiles a warp, lanes t = 2, 3 decode tile b's for lanes t - 2
            t3 = t16a
            if RT == 2:
                t3 = tl.where(t >= 2, t16b, t16a)
            gt = g * 2 + (t & 1)
            c3 = frag_ptr + (t3 * (K // 128) + k_begin // 128) * 48
        for _k in range(k_begin, k_end, 64 * KSTEP):
            if CODES3:
                s0, s1 = tl.split(tl.load((c3 + 2 * gt)[:, None] + tl.arange(0, 2)[None, :]))
                w0, w1, w2, w3 = _codes3_words(s0, s1, tl.load(c3 + 32 + gt))
                o0, o1, o2, o3 = w0, w1, w2, w3
                if RT == 2:
                    o0 = _shfl_xor(w0, 2, NW, MMA)
                    o1 = _shfl_xor(w1, 2, NW, MMA)
                    o2 = _shfl_xor(w2, 2, NW, MMA)
                    o3 = _shfl_xor(w3, 2, NW, MMA)
                c3 += 48
            for h in tl.static_range(KSTEP):
                if CODES3:
                    if h == 0:
                        ea0, ea1, eb0, eb1 = w0, w1, o0, o1
                    else:
                        ea0, ea1, eb0, eb1 = w2, w3, o2, o3
                else:
                    ea0, ea1 = tl.split(tl.load(e_a[:, None] + tl.arange(0, 2)[None, :]))   # chunks 0, 1
                    eb0, eb1 = ea0, ea1
                    if RT == 2:
                        eb0, eb1 = tl.split(tl.load(e_b[:, None] + tl.arange(0, 2)[None, :]))
                    e_a += 32
                    e_b += 32
                (a00, a01, a02, a03, a10, a11, a12, a13, b00, b01, b02, b03, b10, b11, b12, b13) = _mma_step(
                    va_a, vb_a, va_b, vb_b, ea0, ea1, eb0, eb1, xw0, xw1,
                    a00, a01, a02, a03, a10, a11, a12, a13, b00, b01, b02, b03, b10, b11, b12, b13,
                    NW, FP16, MMA, RT, NT)
                va_a += 16
                vb_a += 16
                va_b += 16
                vb_b += 16
                xw0 += 32
                xw1 += 32
        tok0 = 2 * t
        if SPLIT:
            _mma_store_part(a00, a01, a02, a03, ra_a, ra_a + 8, tok0, ws_ptr, pid_s, M, N, ok_a)
            if NT == 2:
                _mma_store_part(a10, a11, a12, a13, ra_a, ra_a + 8, tok0 + 8, ws_ptr, pid_s, M, N, ok_a)
            if RT == 2:
                _mma_store_part(b00, b01, b02, b03, ra_b, ra_b + 8, tok0, ws_ptr, pid_s, M, N, ok_b)
                if NT == 2:
                    _mma_store_part(b10, b11, b12, b13, ra_b, ra_b + 8, tok0 + 8, ws_ptr, pid_s, M, N, ok_b)
            if SYNC:
                tl.debug_barrier()                                   # every thread's partial stored
                last = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel") == SPLIT_K - 1
            else:
                last = pid_s == SPLIT_K - 1
            if last:
                offs_m = tl.arange(0, 16)
                offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
                part = offs_m[:, None] * N + offs_n[None, :]
                tot = _split_sum(ws_ptr, part, mask, M * N, SPLIT_K, tl.zeros((16, BLOCK_N), dtype=tl.float32))
                if DISCARD > 0:
                    tl.debug_barrier()                               # every thread's reads of the slices done
                    col = pid_n * BLOCK_N + 32 * tl.arange(0, BLOCK_N // 32)      # the tile's lines of a row
                    lines = offs_m[:, None] * N + col[None, :]
                    _split_discard(wsd_ptr, lines, (offs_m < M)[:, None] & (col < N)[None, :], M * N, SPLIT_K,
                                   DISCARD)
                if HAS_BIAS:
                    tot += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
                tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                         tot.to(out_ptr.dtype.element_ty), mask=mask)
                if SYNC:
                    tl.atomic_xchg(cnt_ptr + pid_n, 0)                # ready for the next launch
        else:
            _mma_store_y(a00, a01, a02, a03, ra_a, ra_a + 8, tok0, out_ptr, out32_ptr, bias_ptr, M, stride_om, ok_a,
                         HAS_BIAS, NW, MMA)
            if NT == 2:
                _mma_store_y(a10, a11, a12, a13, ra_a, ra_a + 8, tok0 + 8, out_ptr, out32_ptr, bias_ptr, M, stride_om, ok_a,
                             HAS_BIAS, NW, MMA)
            if RT == 2:
                _mma_store_y(b00, b01, b02, b03, ra_b, ra_b + 8, tok0, out_ptr, out32_ptr, bias_ptr, M, stride_om, ok_b,
                             HAS_BIAS, NW, MMA)
                if NT == 2:
                    _mma_store_y(b10, b11, b12, b13, ra_b, ra_b + 8, tok0 + 8, out_ptr, out32_ptr, bias_ptr, M, stride_om,
                                 ok_b, HAS_BIAS, NW, MMA)

    @triton.jit
    def _sp_expand_kernel(
        # --- pointers ---
        vals_ptr,   # (R, K/2) kept values of the 2:4 matrix W (R, K)
        meta_ptr,   # (R, ceil(K/8)) uint8 codes of W, or (R, K/32) int32 words (META32)
        w_ptr,      # (R, K) output: W dense (zeros at the pruned positions), the values' dtype
        # --- dimensions ---
        R, K,
        # --- strides (in elements) ---
        stride_vr, stride_vc,
        stride_mr, stride_mc,
        stride_wr, stride_wk,
        # --- meta-parameters ---
        META32: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """``W = unpack(values, meta)``: once per step, for the cuBLAS path of large M."""
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        k0 = tl.program_id(1) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_r = offs_r < R
        w = _expand24(vals_ptr, meta_ptr, offs_r, mask_r, k0, K,
                      stride_vr, stride_vc, stride_mr, stride_mc, BLOCK_R, BLOCK_K, META32)
        tl.store(w_ptr + offs_r[:, None] * stride_wr + offs_k[None, :] * stride_wk,
                 w.to(w_ptr.dtype.element_ty), mask=mask_r[:, None] & (offs_k < K)[None, :])

    @triton.jit
    def _sp_compress_kernel(
        # --- pointers ---
        d_ptr,      # (R, K) dense matrix (e.g. dW = gᵀ·x from cuBLAS)
        meta_ptr,   # (R, ceil(K/8)) uint8 codes, or (R, K/32) int32 words (META32)
        v_ptr,      # (R, K/2) output: the entries of d at the kept positions, packed order
        # --- dimensions ---
        R, K,
        # --- strides (in elements) ---
        stride_dr, stride_dk,
        stride_mr, stride_mc,
        stride_vr, stride_vc,
        # --- meta-parameters ---
        META32: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """``values = compress_like(d, meta)``: exact selection, no arithmetic."""
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        k0 = tl.program_id(1) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_r = offs_r < R
        d = tl.load(d_ptr + offs_r[:, None] * stride_dr + offs_k[None, :] * stride_dk,
                    mask=mask_r[:, None] & (offs_k < K)[None, :], other=0.0)
        i0, i1 = _load_codes(meta_ptr, offs_r, mask_r, k0, K, stride_mr, stride_mc, BLOCK_K, META32, False)
        d3 = tl.reshape(d, (BLOCK_R, BLOCK_K // 4, 4))
        slot = tl.arange(0, 4)[None, None, :]
        zero = tl.zeros((BLOCK_R, BLOCK_K // 4, 4), dtype=d.dtype)
        v0 = tl.sum(tl.where(slot == i0[:, :, None], d3, zero), axis=2)   # one non-zero term: exact
        v1 = tl.sum(tl.where(slot == i1[:, :, None], d3, zero), axis=2)
        v = tl.reshape(tl.join(v0, v1), (BLOCK_R, BLOCK_K // 2))
        offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        tl.store(v_ptr + offs_r[:, None] * stride_vr + offs_v[None, :] * stride_vc,
                 v.to(v_ptr.dtype.element_ty), mask=mask_r[:, None] & (offs_v < K // 2)[None, :])

    @triton.jit
    def _ds_intermediate(
        tt,          # (R rows, BLOCK_M) fp32: tᵀ = S·xᵀ of this program's rows of S
        y_ptr,       # the output (its dtype rounds t)
        t_ptr,       # (M, R) intermediate; written only when STORE_T, by the programs with pid_n == 0
        offs_m, offs_r, mask_m, mask_r, stride_tm, stride_tr, pid_n,
        STORE_T: tl.constexpr,
        T_FP32: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """The dense-sparse kernels' ``t``: rounded to ``y``'s dtype as a two-matmul path rounds it
        (kept fp32 with ``T_FP32``: for fp16 inputs ``x·Sᵀ`` may exceed fp16's range), stored for the
        backward by column tile 0 (``STORE_T``), fp32 again with ``UPCAST``."""
        if T_FP32:
            t = tt
        else:
            t = tt.to(y_ptr.dtype.element_ty)
        if STORE_T:
            if pid_n == 0:
                tl.store(t_ptr + offs_m[None, :] * stride_tm + offs_r[:, None] * stride_tr,
                         t.to(t_ptr.dtype.element_ty), mask=mask_m[None, :] & mask_r[:, None])
        if UPCAST:
            t = t.to(tl.float32)
        return t

    @triton.jit
    def _ds_chain_kernel(
        # --- pointers ---
        x_ptr,      # (M, K) input rows
        svals_ptr,  # (R, K/2) kept values of the 2:4 factor S (R, K)
        smeta_ptr,  # (R, ceil(K/8)) uint8 codes of S
        d_ptr,      # (N, R) dense factor D
        bias_ptr,   # (N,) bias; read only when HAS_BIAS
        y_ptr,      # (M, N) output y = (x·Sᵀ)·Dᵀ + b
        t_ptr,      # (M, R) intermediate x·Sᵀ (fp32 when T_FP32); written only when STORE_T
                    #   (programs with pid_n == 0)
        # --- dimensions ---
        M, K, N, R,
        M_BUCKET,   # power-of-two bucket of M: autotune key only
        # --- strides (in elements) ---
        stride_xm, stride_xk,
        stride_sr, stride_sc,
        stride_mr, stride_mc,
        stride_dn, stride_dr,
        stride_ym, stride_yn,
        stride_tm, stride_tr,
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        STORE_T: tl.constexpr,
        T_FP32: tl.constexpr,      # keep the intermediate in fp32 (fp16 inputs: range safety)
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        META32: tl.constexpr,      # smeta_ptr is the codes as int32 words (see _load_codes)
        R_PAD: tl.constexpr,       # next power of two >= R (>= 16)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, R_PAD)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_r = offs_r < R

        # ---- stage 1: tᵀ = S·xᵀ for this row block, fp32 in registers ----
        tt = tl.zeros((R_PAD, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            s = _expand24(svals_ptr, smeta_ptr, offs_r, mask_r, k0, K,
                          stride_sr, stride_sc, stride_mr, stride_mc, R_PAD, BLOCK_K, META32)
            xt = tl.load(
                x_ptr + offs_m[None, :] * stride_xm + kk[:, None] * stride_xk,
                mask=mask_m[None, :] & (kk < K)[:, None], other=0.0,
            )
            if UPCAST:
                s = s.to(tl.float32)
                xt = xt.to(tl.float32)
            tt = tl.dot(s, xt, tt, input_precision=PRECISION)

        t = _ds_intermediate(tt, y_ptr, t_ptr, offs_m, offs_r, mask_m, mask_r, stride_tm, stride_tr, pid_n,
                             STORE_T, T_FP32, UPCAST)

        # ---- stage 2: yᵀ[n-tile, :] = D[n-tile, :]·tᵀ (+ bias) ----
        tiles_per_prog = tl.cdiv(tl.cdiv(N, BLOCK_N), tl.num_programs(1))
        n_begin = pid_n * tiles_per_prog * BLOCK_N
        for i in range(0, tiles_per_prog):
            offs_n = n_begin + i * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            d = tl.load(
                d_ptr + offs_n[:, None] * stride_dn + offs_r[None, :] * stride_dr,
                mask=mask_n[:, None] & mask_r[None, :], other=0.0,
            )
            if UPCAST or T_FP32:  # T_FP32: TF32 dot on the fp32 intermediate
                d = d.to(tl.float32)
            yt = tl.dot(d, t, input_precision=PRECISION)
            if HAS_BIAS:
                b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                yt = yt + b[:, None]
            tl.store(
                y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn,
                yt.to(y_ptr.dtype.element_ty),
                mask=mask_m[None, :] & mask_n[:, None],
            )

    @triton.jit
    def _sparse_t_chunk(
        x_ptr,       # (M, K) input rows
        svals_ptr,   # (R, K/2) kept values of the 2:4 factor S (int32 pairs when PAIRS)
        smeta_ptr,   # codes of S (uint8, or int32 words with META32)
        offs_r, mask_r, offs_m, mask_m,
        k_lo,        # first input column of the product (0, or a K split's start: a multiple of 32)
        k_hi,        # one past its last (K, or the split's end: a multiple of 32 unless it is K)
        stride_xm, stride_xk, stride_sr, stride_sc, stride_mr, stride_mc,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        META32: tl.constexpr,
        PAIRS: tl.constexpr,
        PRMT: tl.constexpr,        # as in _sp_decode_kernel
        BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """``tᵀ[rows, :] = S[rows, k_lo:k_hi]·x[:, k_lo:k_hi]ᵀ``, ``(BLOCK_R, BLOCK_M)`` fp32: a chunk
        of the dense-sparse intermediate over all of ``K`` (``0, K``: the rank-split and two-role
        launches' first product), or one K split's partial of it (the two-role launch's split
        producers). Columns at or past ``k_hi`` are masked off, so a split that is not a multiple of
        ``BLOCK_K`` is still exact (the codes' 32-bit words need ``k_hi % 32 == 0`` or ``k_hi = K``)."""
        offs_k = tl.arange(0, BLOCK_K)
        tt = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            xt = tl.load(  # (BLOCK_K, BLOCK_M) = x[:, k-tile]ᵀ, contiguous along k
                x_ptr + offs_m[None, :] * stride_xm + kk[:, None] * stride_xk,
                mask=mask_m[None, :] & (kk < k_hi)[:, None], other=0.0,
            )
            s = _expand24_tile(svals_ptr, smeta_ptr, offs_r, mask_r, k0, k_hi, stride_sr, stride_sc, stride_mr,
                               stride_mc, xt, BLOCK_R, BLOCK_K, META32, PAIRS,
                               PRMT == 1 or (PRMT == 2 and BLOCK_R * BLOCK_K >= _PRMT_MIN_TILE), PRMT == 2, False)
            if UPCAST:
                s = s.to(tl.float32)
                xt = xt.to(tl.float32)
            tt = tl.dot(s, xt, tt, input_precision=PRECISION)
        return tt

    @triton.jit
    def _ds_rank_split_kernel(
        # --- pointers ---
        x_ptr,      # (M, K) input rows, M <= BLOCK_M (a handful of tokens)
        svals_ptr,  # (R, K/2) kept values of the 2:4 factor S (R, K) (int32 pairs when PAIRS)
        smeta_ptr,  # (R, ceil(K/8)) uint8 codes of S, or (R, K/32) int32 words (META32)
        d_ptr,      # (N, R) dense factor D
        bias_ptr,   # (N,) bias; read only when HAS_BIAS
        y_ptr,      # (M, N) output y = (x·Sᵀ)·Dᵀ + b
        t_ptr,      # (M, R) intermediate x·Sᵀ (fp32 when T_FP32); written only when STORE_T, by the
                    #   programs of column tile 0
        ws_ptr,     # SPLIT: (SPLITS, M, N) fp32 partials of y, one slice per rank chunk (workspace)
        cnt_ptr,    # SPLIT and SYNC: (N_TILES,) int32 arrival counters, zero between launches
        # --- dimensions ---
        M, K, N, R,
        SPLITS,     # rank chunks of BLOCK_R (programs = N_TILES · SPLITS)
        # --- strides (in elements) ---
        stride_xm, stride_xk,
        stride_sr, stride_sc,
        stride_mr, stride_mc,
        stride_dn, stride_dr,
        stride_ym, stride_yn,
        stride_tm, stride_tr,
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        STORE_T: tl.constexpr,
        T_FP32: tl.constexpr,      # keep the intermediate in fp32 (fp16 inputs: range safety)
        SPLIT: tl.constexpr,       # SPLITS > 1: partials + the fixed-order reduction in this launch
        SYNC: tl.constexpr,        # as in _sp_decode_kernel
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        META32: tl.constexpr,
        PAIRS: tl.constexpr,
        PRMT: tl.constexpr,        # as in _sp_decode_kernel
        D_VEC: tl.constexpr,       # D's rows start on 16 bytes (unit column stride, row stride and R multiples
                                   # of 8 elements, base aligned): its tile loads as 16-byte vectors (Triton
                                   # itself only sees integers divisible by 16; a rank such as 168 is not)
        BLOCK_R: tl.constexpr,     # rank chunk: rows of S (and columns of D) per program (planned)
        BLOCK_N: tl.constexpr,     # columns of y per program (planned)
        BLOCK_M: tl.constexpr,     # >= M: every token of the launch
        BLOCK_K: tl.constexpr,     # reduction step of the first product (tuned)
    ):
        """Dense-sparse ``y = (x·Sᵀ)·Dᵀ + b`` for a few tokens in **one launch**, split over the rank:
        ``y = Σ_c (x·S_cᵀ)·D_cᵀ`` over chunks ``c`` of ``BLOCK_R`` rows of ``S``. Program ``p``
        owns column tile ``p // SPLITS`` of ``y`` and chunk ``p % SPLITS``: it forms its chunk of
        ``t = x·Sᵀ`` whole (every ``K``, so ``t`` is rounded exactly as a two-matmul path rounds
        it), multiplies it by its ``(BLOCK_N, BLOCK_R)`` tile of ``D`` and stores the fp32 partial;
        the tile's last arrival sums the ``SPLITS`` partials in the order ``c = 0, 1, …`` (as
        :func:`_sp_decode_kernel`), adds the bias and stores ``y``. ``S`` is read once per column
        tile (from L2 after the first), ``D`` once, ``t`` never leaves the chip: the launch the
        decode kernel and cuBLAS's ``t·Dᵀ`` make two of."""
        pid = tl.program_id(0)
        pid_n = pid // SPLITS
        pid_c = pid % SPLITS
        offs_r = pid_c * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_m = tl.arange(0, BLOCK_M)
        mask_r = offs_r < R
        mask_m = offs_m < M

        # ---- stage 1: this chunk of tᵀ = S_c·xᵀ, (BLOCK_R, BLOCK_M), fp32 ----
        tt = _sparse_t_chunk(x_ptr, svals_ptr, smeta_ptr, offs_r, mask_r, offs_m, mask_m, 0, K, stride_xm, stride_xk,
                             stride_sr, stride_sc, stride_mr, stride_mc, UPCAST, PRECISION, META32, PAIRS, PRMT,
                             BLOCK_R, BLOCK_M, BLOCK_K)
        t = _ds_intermediate(tt, y_ptr, t_ptr, offs_m, offs_r, mask_m, mask_r, stride_tm, stride_tr, pid_n,
                             STORE_T, T_FP32, UPCAST)

        # ---- stage 2: this chunk's share of yᵀ[n-tile] = D[n-tile, c]·t_c ----
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        if D_VEC:     # row offsets multiples of 8; the rank mask constant over 8 columns (R % 8 == 0)
            rows = tl.multiple_of(offs_n * stride_dn, 8)
            d = tl.load(d_ptr + rows[:, None] + offs_r[None, :],
                        mask=mask_n[:, None] & ((offs_r // 8) * 8 < R)[None, :], other=0.0)
        else:
            d = tl.load(d_ptr + offs_n[:, None] * stride_dn + offs_r[None, :] * stride_dr,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        if UPCAST or T_FP32:  # T_FP32: TF32 dot on the fp32 intermediate
            d = d.to(tl.float32)
        acc = tl.dot(d, t, input_precision=PRECISION)        # (BLOCK_N, BLOCK_M) fp32
        _store_split_yt(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, mask_m, mask_n, M, N,
                        stride_ym, stride_yn, pid_c, pid_n, SPLITS, HAS_BIAS, SPLIT, SYNC)

    @triton.jit
    def _ds_bwd_dense_kernel(
        # --- pointers ---
        g_ptr,      # (M, N) output gradient, M <= BLOCK_M (a handful of tokens)
        d_ptr,      # (N, R) dense factor D; read only when NEED_DT
        t_ptr,      # (M, R) the forward's intermediate t = x·Sᵀ; read only when NEED_DD
        dd_ptr,     # (N, R) output dD = gᵀ·t; written only when NEED_DD
        db_ptr,     # (N,) output db = Σ_m g; written only when HAS_BIAS, by the programs of rank chunk 0
        dt_ptr,     # (M, R) output dt = g·D; written only when NEED_DT (with SPLIT by each chunk's last arrival)
        ws_ptr,     # SPLIT: (SPLITS, M, R) fp32 partials of dt, one slice per column range (workspace)
        cnt_ptr,    # SPLIT and SYNC: (CHUNKS,) int32 arrival counters, zero between launches
        # --- dimensions ---
        M, N, R,
        N_PER_SPLIT,  # columns of g per split (a multiple of BD_N_QUANTUM, so of every BLOCK_N)
        SPLITS,       # column ranges per rank chunk (programs = CHUNKS · SPLITS)
        # --- strides (in elements) ---
        stride_gm, stride_gn,
        stride_dn, stride_dr,
        stride_tm, stride_tr,
        stride_ddn, stride_ddr,
        stride_dtm, stride_dtr,
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        NEED_DT: tl.constexpr,
        NEED_DD: tl.constexpr,
        SPLIT: tl.constexpr,       # SPLITS > 1: partials of dt + the fixed-order reduction in this launch
        SYNC: tl.constexpr,        # as in _sp_decode_kernel
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        D_VEC: tl.constexpr,       # D's and dD's rows start on 16 bytes (as in _ds_rank_split_kernel)
        BLOCK_R: tl.constexpr,     # rank chunk: columns of D, dD, t and dt per program (planned)
        BLOCK_M: tl.constexpr,     # >= M: every token of the launch
        BLOCK_N: tl.constexpr,     # column step over g and rows of D (tuned)
    ):
        """The dense factor's side of the dense-sparse backward for a few tokens in **one launch**:
        ``dD = gᵀ·t`` (N, R), ``db = Σ_m g`` (N,) and ``dt = g·D`` (M, R), which cuBLAS and a
        reduction make three launches of. Program ``p`` owns rank chunk ``p // SPLITS`` (columns
        ``c`` of ``D``) and column range ``p % SPLITS`` of ``g``: it walks its range ``BLOCK_N``
        columns at a time, storing ``dD[n, c] = g[:, n]ᵀ·t[:, c]`` (each output once, the reduction
        over the ``M`` tokens whole) and accumulating ``dt[:, c]ᵀ += D[n, c]ᵀ·g[:, n]ᵀ`` in fp32; with
        ``SPLIT`` the chunk's last arrival sums the ``SPLITS`` partials in the order ``s = 0, 1, …``
        (:func:`_store_split_yt`: bitwise reproducible) and stores ``dt``. ``g`` and ``D`` are read
        once from DRAM (``g`` once per chunk from L2), every output written once."""
        pid = tl.program_id(0)
        pid_c = pid // SPLITS
        pid_s = pid % SPLITS
        offs_r = pid_c * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_m = tl.arange(0, BLOCK_M)
        mask_r = offs_r < R
        mask_m = offs_m < M
        if D_VEC:     # the rank mask constant over 8 columns (R % 8 == 0)
            mask_rv = (offs_r // 8) * 8 < R
        else:
            mask_rv = mask_r
        if NEED_DD:
            tc = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,   # (BLOCK_M, BLOCK_R)
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            if UPCAST:
                tc = tc.to(tl.float32)
        dtt = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)       # dtᵀ[c, :], this range's share
        n_begin = pid_s * N_PER_SPLIT
        n_end = tl.minimum(N, n_begin + N_PER_SPLIT)
        for n0 in range(n_begin, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_end
            gt = tl.load(g_ptr + offs_n[:, None] * stride_gn + offs_m[None, :] * stride_gm,   # (BLOCK_N, BLOCK_M) = gᵀ
                         mask=mask_n[:, None] & mask_m[None, :], other=0.0)
            if HAS_BIAS:
                if pid_c == 0:
                    tl.store(db_ptr + offs_n, tl.sum(gt.to(tl.float32), axis=1).to(db_ptr.dtype.element_ty),
                             mask=mask_n)
            if UPCAST:
                gt = gt.to(tl.float32)
            if D_VEC:
                rows_d = tl.multiple_of(offs_n * stride_dn, 8)
                rows_dd = tl.multiple_of(offs_n * stride_ddn, 8)
            else:
                rows_d = offs_n * stride_dn
                rows_dd = offs_n * stride_ddn
            if NEED_DD:
                ddc = tl.dot(gt, tc, input_precision=PRECISION)   # (BLOCK_N, BLOCK_R) fp32
                tl.store(dd_ptr + rows_dd[:, None] + offs_r[None, :] * stride_ddr, ddc.to(dd_ptr.dtype.element_ty),
                         mask=mask_n[:, None] & mask_rv[None, :])
            if NEED_DT:
                d = tl.load(d_ptr + rows_d[:, None] + offs_r[None, :] * stride_dr,               # (BLOCK_N, BLOCK_R)
                            mask=mask_n[:, None] & mask_rv[None, :], other=0.0)
                if UPCAST:
                    d = d.to(tl.float32)
                dtt = tl.dot(tl.trans(d), gt, dtt, input_precision=PRECISION)
        if NEED_DT:
            _store_split_yt(dtt, dt_ptr, dt_ptr, ws_ptr, cnt_ptr, offs_m, offs_r, mask_m, mask_r, M, R,
                            stride_dtm, stride_dtr, pid_s, pid_c, SPLITS, False, SPLIT, SYNC)

    @triton.jit
    def _roles_d_step(
        d_ptr,       # (N, R) dense factor D
        offs_n, mask_n,
        r0,          # first rank of the step
        R, stride_dn, stride_dr,
        BLOCK_C: tl.constexpr,
    ):
        """``D[n-tile, r0 : r0 + BLOCK_C]``, ``(BLOCK_N, BLOCK_C)``, zero past ``R``: one step of the
        two-role consumers."""
        offs_c = r0 + tl.arange(0, BLOCK_C)
        return tl.load(d_ptr + offs_n[:, None] * stride_dn + offs_c[None, :] * stride_dr,
                       mask=mask_n[:, None] & (offs_c < R)[None, :], other=0.0)

    @triton.jit
    def _roles_t_step(
        acc,         # (BLOCK_N, BLOCK_M) fp32 yᵀ tile so far
        d,           # (BLOCK_N, BLOCK_C) the step's D (:func:`_roles_d_step`)
        t_ptr,       # (M, R) contiguous intermediate t, written by the producers of this launch
        offs_m, mask_m,
        r0, R,
        UPCAST: tl.constexpr,
        T_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """``acc + D[n-tile, r0:r0+BLOCK_C]·t[:, r0:r0+BLOCK_C]ᵀ``: one step of the two-role
        consumers (runs of ``t``'s rows of ``2·BLOCK_C`` bytes, read past L1: written moments before
        by other programs)."""
        offs_c = r0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < R
        tc = tl.load(t_ptr + offs_m[None, :] * R + offs_c[:, None],                    # (BLOCK_C, BLOCK_M) = tᵀ
                     mask=mask_m[None, :] & mask_c[:, None], other=0.0, cache_modifier=".cg")
        if UPCAST or T_FP32:  # T_FP32: TF32 dot on the fp32 intermediate
            d = d.to(tl.float32)
            tc = tc.to(tl.float32)
        return tl.dot(d, tc, acc, input_precision=PRECISION)

    @triton.jit
    def _ds_roles_kernel(
        # --- pointers ---
        x_ptr,      # (M, K) input rows, M <= BLOCK_M (a handful of tokens)
        svals_ptr,  # (R, K/2) kept values of the 2:4 factor S (R, K) (int32 pairs when PAIRS)
        smeta_ptr,  # (R, ceil(K/8)) uint8 codes of S, or (R, K/32) int32 words (META32)
        d_ptr,      # (N, R) dense factor D
        bias_ptr,   # (N,) bias; read only when HAS_BIAS
        y_ptr,      # (M, N) output y = (x·Sᵀ)·Dᵀ + b
        t_ptr,      # (M, R) contiguous intermediate t = x·Sᵀ (fp32 when T_FP32, else y's dtype): written by
                    #   the producers (with SPLIT by each chunk's last arrival), read by the consumers (and
                    #   kept as the forward's saved t)
        ws_ptr,     # SPLIT: (KS, M, R) fp32 partials of t, one slice per K split (workspace); else unused
        cnt_ptr,    # SYNC: (4 + N0,) int32 counters (tickets, producers done, -, programs out, then one
                    #   arrival counter per rank chunk with SPLIT), zero between launches
        # --- dimensions ---
        M, K, N, R,
        N0, N1,     # rank chunks (BLOCK_R rows of S each; KS producers each), consumers (BLOCK_N columns of y each)
        KS,         # K splits per rank chunk: producers = N0 · KS
        K_PER_SPLIT,  # input columns per producer (a multiple of 128; K when KS = 1)
        # --- strides (in elements) ---
        stride_xm, stride_xk,
        stride_sr, stride_sc,
        stride_mr, stride_mc,
        stride_dn, stride_dr,
        stride_ym, stride_yn,
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        T_FP32: tl.constexpr,      # the intermediate in fp32 (fp16 inputs: range safety)
        SPLIT: tl.constexpr,       # KS > 1: the producers' fp32 partials summed by each chunk's last arrival
        SYNC: tl.constexpr,        # roles by ticket + waits on counters (GPU); else roles by program id,
                                   # the programs running in id order (the interpreter)
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        META32: tl.constexpr,
        PAIRS: tl.constexpr,
        PRMT: tl.constexpr,        # as in _sp_decode_kernel
        BLOCK_R: tl.constexpr,     # rows of S per producer (planned)
        BLOCK_N: tl.constexpr,     # columns of y per consumer (planned)
        BLOCK_M: tl.constexpr,     # >= M: every token of the launch
        BLOCK_C: tl.constexpr,     # the consumers' step over the rank (roles_rank_step: >= BLOCK_R)
        PREFETCH: tl.constexpr,    # the consumers load their first step of D before they wait (roles_prefetch)
        BLOCK_K: tl.constexpr,     # the producers' reduction step (tuned)
    ):
        """Dense-sparse ``y = (x·Sᵀ)·Dᵀ + b`` for a few tokens in **one launch, two roles**:

        * producers ``p < N0·KS`` (split ``p // N0`` of rank chunk ``c = p % N0``):
          ``t[:, R_c] = x·S[R_c, :]ᵀ`` (``BLOCK_R`` rows of ``S``), over all of ``K`` (``KS = 1``;
          rounded as the two-matmul path rounds ``t``) or over the split's ``K_PER_SPLIT`` columns:
          the fp32 partial goes to the split's slice of ``ws`` and the chunk's last arrival sums the
          ``KS`` slices in the order ``s = 0, 1, …`` (:func:`_store_split_yt`: bitwise the same
          whichever arrives last) and stores ``t``;
        * consumers ``c < N1``: load the first step of their ``D`` tile (``PREFETCH``), wait for
          every producer, then ``y[:, Nc] = t·D[Nc, :]ᵀ (+ b)`` (``BLOCK_C`` ranks a step, in
          order: the prefetch changes when ``D`` is read, not the products).

        A program takes its role from a ticket drawn when it starts (as :func:`lowrank._decode_kernel`),
        so it only waits for programs that started before it: no deadlock whatever the residency,
        no atomics on data. Every producer signals once its stores are made (a chunk's last arrival
        after storing ``t``), so the consumers, waiting for all ``N0·KS``, read every chunk whole.
        ``S`` and ``x`` are read by the producers only (``x`` once per chunk, split among its
        producers: the K split spreads that read over ``KS`` times as many SMs), ``D`` once, ``t``
        stays in L2: the decode launch and cuBLAS's ``t·Dᵀ`` in one."""
        if SYNC:
            ticket = tl.atomic_add(cnt_ptr, 1)
        else:
            ticket = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        if ticket < N0 * KS:
            # ---- producer: BLOCK_R rows of S against its K split: (a partial of) this chunk of tᵀ ----
            chunk = ticket % N0
            split = ticket // N0          # split-major: every chunk's last split comes last in id order
            offs_r = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            k_lo = split * K_PER_SPLIT
            tt = _sparse_t_chunk(x_ptr, svals_ptr, smeta_ptr, offs_r, mask_r, offs_m, mask_m, k_lo,
                                 tl.minimum(K, k_lo + K_PER_SPLIT), stride_xm, stride_xk, stride_sr, stride_sc,
                                 stride_mr, stride_mc, UPCAST, PRECISION, META32, PAIRS, PRMT, BLOCK_R, BLOCK_M,
                                 BLOCK_K)                                      # (BLOCK_R, BLOCK_M) fp32
            _store_split_yt(tt, t_ptr, t_ptr, ws_ptr, cnt_ptr + 4, offs_m, offs_r, mask_m, mask_r, M, R, R, 1,
                            split, chunk, KS, False, SPLIT, SYNC)
            if SYNC:
                _role_signal(cnt_ptr + 1)
        else:
            # ---- consumer: BLOCK_N columns of y, t·D[n-tile, :]ᵀ over the rank BLOCK_C at a time (runs of
            # t's rows of 2·BLOCK_C bytes: with t's odd row pitch, e.g. 168 x 2 B, 16-wide steps touched
            # twice the sectors they read) ----
            offs_n = (ticket - N0 * KS) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            # the first step of D loaded before the wait (PREFETCH): its read overlaps the producers
            if PREFETCH:
                d0 = _roles_d_step(d_ptr, offs_n, mask_n, 0, R, stride_dn, stride_dr, BLOCK_C)
            if SYNC:
                _role_wait(cnt_ptr + 1, N0 * KS)
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)      # yᵀ tile
            # the steps in the order r0 = 0, BLOCK_C, ...: the prefetch moves a read, not a product
            if PREFETCH:
                acc = _roles_t_step(acc, d0, t_ptr, offs_m, mask_m, 0, R, UPCAST, T_FP32, PRECISION, BLOCK_C)
            for r0 in range(BLOCK_C if PREFETCH else 0, R, BLOCK_C):
                d = _roles_d_step(d_ptr, offs_n, mask_n, r0, R, stride_dn, stride_dr, BLOCK_C)
                acc = _roles_t_step(acc, d, t_ptr, offs_m, mask_m, r0, R, UPCAST, T_FP32, PRECISION, BLOCK_C)
            if HAS_BIAS:
                acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                     mask=mask_m[None, :] & mask_n[:, None])
        if SYNC:
            _roles_done(cnt_ptr, N0 * KS + N1)

    # autotuned launchers; in deterministic mode they run one fixed config (kernels._config.Tunable)
    _prune24_tuned = Tunable(_prune24_kernel, PRUNE_SPACE, key=["R", "G"],
                             interpreter=PRUNE_INTERP, deterministic=PRUNE_FIXED)
    _sp_mm_tuned = Tunable(_sp_mm_kernel, MM_SPACE, key=["M_BUCKET", "N", "K"],
                           interpreter=MM_INTERP, deterministic=MM_FIXED)
    _sp_dx_decode_tuned = Tunable(_sp_dx_decode_kernel, DXD_SPACE,
                                  key=["M", "N", "K", "N_PER_SPLIT", "SPLIT_N", "BLOCK_K", "BLOCK_M", "META32",
                                       "HAS_DV"],
                                  prune=_prune_dx_decode, interpreter=DXD_INTERP, deterministic=DXD_FIXED)
    _sp_dx_tuned = Tunable(_sp_dx_kernel, DX_SPACE, key=["M", "N", "K", "MIXED"],
                           interpreter=DX_INTERP, deterministic=DX_FIXED)
    _sp_dv_tuned = Tunable(_sp_dvalues_kernel, DV_SPACE, key=["M", "N", "K", "MIXED"],
                           interpreter=DV_INTERP, deterministic=DV_FIXED)
    _ds_chain_tuned = Tunable(
        _ds_chain_kernel, DS_SPACE,
        key=["M_BUCKET", "K", "N", "R_PAD", "STORE_T", "T_FP32"],
        prune=_prune_ds, interpreter=DS_INTERP, deterministic=DS_FIXED,
    )

    _ds_rank_split_tuned = Tunable(
        _ds_rank_split_kernel, RS_SPACE,
        key=["M", "K", "N", "R", "SPLITS", "BLOCK_R", "BLOCK_N", "BLOCK_M", "STORE_T", "T_FP32", "META32"],
        prune=_prune_rs, interpreter=RS_INTERP, deterministic=RS_FIXED,
    )

    _ds_bwd_dense_tuned = Tunable(
        _ds_bwd_dense_kernel, BD_SPACE,
        key=["M", "N", "R", "N_PER_SPLIT", "SPLITS", "BLOCK_R", "BLOCK_M", "NEED_DT", "NEED_DD", "HAS_BIAS"],
        prune=_prune_bd, interpreter=BD_INTERP, deterministic=BD_FIXED,
    )

    _ds_roles_tuned = Tunable(
        _ds_roles_kernel, RS_SPACE,
        key=["M", "K", "N", "R", "N0", "N1", "KS", "K_PER_SPLIT", "BLOCK_R", "BLOCK_N", "BLOCK_M", "T_FP32",
             "META32"],
        prune=_prune_roles, interpreter=RS_INTERP, deterministic=RS_FIXED,
    )

    _sp_decode_tuned = Tunable(_sp_decode_kernel, DECODE_SPACE,
                               key=["M", "N", "K", "K_PER_SPLIT", "SPLIT_K", "BLOCK_N", "BLOCK_M", "META32"],
                               prune=_prune_decode, interpreter=DECODE_INTERP, deterministic=DECODE_FIXED)
    _sp_decode_mma_tuned = Tunable(_sp_decode_mma_kernel, MMA_SPACE,
                                   key=["M", "N", "K", "K_PER_SPLIT", "SPLIT_K", "BLOCK_N", "RT", "NT"],
                                   prune=_prune_mma, interpreter=MMA_SPACE[0], deterministic=MMA_SPACE[0])
    _sp_expand_tuned = Tunable(_sp_expand_kernel, EXPAND_SPACE, key=["R", "K", "META32"], prune=_prune_wide,
                               interpreter=EXPAND_INTERP, deterministic=EXPAND_FIXED)
    _sp_compress_tuned = Tunable(_sp_compress_kernel, EXPAND_SPACE, key=["R", "K", "META32"], prune=_prune_wide,
                                 interpreter=EXPAND_INTERP, deterministic=EXPAND_FIXED)

    # ---- compile-tier registration (signatures derived from the kernels' arguments) ----
    # Kernels reading codes compile with the codes as 32-bit words (the launchers' choice when
    # K % 32 == 0 and the rows are 4-byte aligned); the byte loads (any K % 4 == 0) compile in
    # mm_u8 and expand_u8 (the same _load_codes branch every kernel shares).
    _U8, _I32 = "u8", "i32"
    _DOT = dict(UPCAST=False, PRECISION="tf32")
    _B, _W = dict(META32=False), dict(META32=True)
    register_kernel(KernelSpec(
        name="sparse24.prune", fn=_prune24_kernel, pointers={"mask_ptr": _U8},
        constexprs=[dict(HAS_SCORES=False), dict(HAS_SCORES=True)], space=PRUNE_SPACE,
    ))
    register_kernel(KernelSpec(
        name="sparse24.mm", fn=_sp_mm_kernel, pointers={"meta_ptr": _I32},
        constexprs=[dict(HAS_BIAS=True, **_DOT, **_W), dict(HAS_BIAS=False, **_DOT, **_W)], space=MM_SPACE,
    ))
    register_kernel(KernelSpec(
        name="sparse24.mm_u8", fn=_sp_mm_kernel, pointers={"meta_ptr": _U8},
        constexprs=[dict(HAS_BIAS=True, **_DOT, **_B)], space=MM_SPACE,
    ))
    register_kernel(KernelSpec(
        name="sparse24.dx", fn=_sp_dx_kernel, pointers={"meta_ptr": _I32},
        constexprs=[dict(MIXED=False, **_DOT, **_W)], space=DX_SPACE,
    ))
    register_kernel(KernelSpec(
        name="sparse24.dx_decode", fn=_sp_dx_decode_kernel,
        pointers={"meta_ptr": _I32, "vals_ptr": _I32, "ws_ptr": "fp32", "cnt_ptr": "i32"},
        constexprs=[dict(BLOCK_K=bk, BLOCK_M=bm, PAIRS=True, PRMT=2, MIXED=False, **_DOT, **_W, HAS_DB=sp, SPLIT=sp,
                         SYNC=sp, HAS_DV=False)
                    for bk, bm in ((32, 16), (64, 16), (128, 16), (256, 16), (128, 32), (256, 32), (64, 64), (128, 64))
                    for sp in (False, True)]
                   + [dict(BLOCK_K=bk, BLOCK_M=bm, PAIRS=True, PRMT=2, MIXED=False, **_DOT, **_W, HAS_DB=True,
                           SPLIT=sp, SYNC=sp, HAS_DV=True)
                      for bk, bm, sp in ((32, 16, True), (64, 16, True), (128, 16, False), (32, 64, True))],
        space=dxd_space,
    ))
    register_kernel(KernelSpec(
        name="sparse24.dvalues", fn=_sp_dvalues_kernel, pointers={"meta_ptr": _I32},
        constexprs=[dict(MIXED=False, **_DOT, **_W)], space=DV_SPACE,
    ))
    _DEC = [dict(BLOCK_N=bn, BLOCK_M=bm, PAIRS=True, PRMT=2, **_DOT, **_W, **extra, EVEN=True)
            for bn, bm in ((32, 16), (64, 16), (128, 16), (64, 64), (128, 64))
            for extra in (dict(HAS_BIAS=True, SPLIT=False, SYNC=False), dict(HAS_BIAS=True, SPLIT=True, SYNC=True))]
    _DEC_PTRS = {"meta_ptr": _I32, "vals_ptr": _I32, "ws_ptr": "fp32", "cnt_ptr": "i32"}
    register_kernel(KernelSpec(
        name="sparse24.decode", fn=_sp_decode_kernel, pointers=_DEC_PTRS,
        constexprs=[c for c in _DEC if c["SPLIT"]], space=decode_space,
    ))
    register_kernel(KernelSpec(
        name="sparse24.decode_y", fn=_sp_decode_kernel, pointers=_DEC_PTRS,
        constexprs=[c for c in _DEC if not c["SPLIT"]], space=decode_space,
    ))
    register_kernel(KernelSpec(   # the decode on sparse tensor cores (mma.sp), bf16 and fp16
        name="sparse24.decode_mma", fn=_sp_decode_mma_kernel,
        pointers={"x_ptr": _I32, "vals_ptr": _I32, "frag_ptr": _I32, "out32_ptr": _I32, "ws_ptr": "fp32",
                  "wsd_ptr": "fp32", "cnt_ptr": "i32"},
        constexprs=[dict(BLOCK_N=bn, RT=MMA_TILES[bn][1], NT=nt, MMA=2, FP16=False, HAS_BIAS=True, SPLIT=sp, SYNC=sp,
                         DISCARD=2 if sp and bn % 32 == 0 else 0, CODES3=c3)
                    for bn in MMA_TILES for nt in (1, 2) for sp in (False, True) for c3 in (True, False)],
        space=mma_space, dtypes=("bf16", "fp16"),
    ))
    register_kernel(KernelSpec(   # a partial row tile or K not a multiple of 256: the masked loads
        name="sparse24.decode_masked", fn=_sp_decode_kernel, pointers=_DEC_PTRS,
        constexprs=[dict(c, EVEN=False) for c in _DEC if c["SPLIT"] and c["BLOCK_N"] in (32, 128)], space=decode_space,
    ))
    register_kernel(KernelSpec(   # the dense-sparse t = x·Sᵀ of fp16 inputs, kept in fp32
        name="sparse24.decode_y_fp16", fn=_sp_decode_kernel,
        pointers={**_DEC_PTRS, "out_ptr": "fp32"},
        constexprs=[dict(BLOCK_N=32, BLOCK_M=16, PAIRS=True, PRMT=2, **_DOT, **_W, HAS_BIAS=False, SPLIT=True, SYNC=True,
                         EVEN=False)],
        space=decode_space, dtypes=("fp16",),
    ))
    register_kernel(KernelSpec(
        name="sparse24.expand", fn=_sp_expand_kernel, pointers={"meta_ptr": _I32},
        constexprs=[dict(_W)], space=EXPAND_SPACE,
    ))
    register_kernel(KernelSpec(
        name="sparse24.expand_u8", fn=_sp_expand_kernel, pointers={"meta_ptr": _U8},
        constexprs=[dict(_B)], space=EXPAND_SPACE,
    ))
    register_kernel(KernelSpec(
        name="sparse24.compress", fn=_sp_compress_kernel, pointers={"meta_ptr": _I32},
        constexprs=[dict(_W)], space=EXPAND_SPACE,
    ))
    register_kernel(KernelSpec(
        name="sparse24.ds_chain", fn=_ds_chain_kernel, pointers={"smeta_ptr": _I32},
        constexprs=[
            dict(HAS_BIAS=True, STORE_T=True, T_FP32=False, R_PAD=64, **_DOT, **_W),
            dict(HAS_BIAS=True, STORE_T=False, T_FP32=False, R_PAD=128, **_DOT, **_W),
            dict(HAS_BIAS=False, STORE_T=False, T_FP32=False, R_PAD=256, **_DOT, **_W),
        ],
        space=ds_space,
    ))
    # fp16 dense-sparse keeps its intermediate in fp32: the fused forward storing an fp32 t, and
    # the backward's dx = dt·S and kept(dtᵀ·x) reading an fp32 dt against fp16 S / x. (t = x·Sᵀ
    # into an fp32 buffer on the two-kernel path differs from sparse24.mm only in its store's cast.)
    register_kernel(KernelSpec(
        name="sparse24.ds_chain_fp16", fn=_ds_chain_kernel,
        pointers={"smeta_ptr": _I32, "t_ptr": "fp32"},
        constexprs=[dict(HAS_BIAS=True, STORE_T=True, T_FP32=True, R_PAD=64, **_DOT, **_W)],
        space=ds_space, dtypes=("fp16",),
    ))
    register_kernel(KernelSpec(
        name="sparse24.ds_rank_split", fn=_ds_rank_split_kernel,
        pointers={"smeta_ptr": _I32, "svals_ptr": _I32, "ws_ptr": "fp32", "cnt_ptr": "i32"},
        constexprs=[dict(BLOCK_R=br, BLOCK_N=bn, BLOCK_M=bm, PAIRS=True, PRMT=2, **_DOT, **_W, HAS_BIAS=True,
                         STORE_T=st, T_FP32=False, SPLIT=True, SYNC=True, D_VEC=True)
                    for br, bn, bm, st in ((16, 256, 16, False), (16, 64, 16, False), (32, 128, 16, True),
                                           (32, 256, 16, False), (64, 64, 16, False), (16, 64, 64, True),
                                           (32, 64, 64, False))]
                   + [dict(BLOCK_R=16, BLOCK_N=128, BLOCK_M=16, PAIRS=True, PRMT=2, **_DOT, **_W, HAS_BIAS=True,
                           STORE_T=False, T_FP32=False, SPLIT=True, SYNC=True, D_VEC=False)],
        space=rs_space,
    ))
    register_kernel(KernelSpec(
        name="sparse24.ds_roles", fn=_ds_roles_kernel,
        pointers={"smeta_ptr": _I32, "svals_ptr": _I32, "ws_ptr": "fp32", "cnt_ptr": "i32"},
        constexprs=[dict(BLOCK_R=br, BLOCK_N=bn, BLOCK_M=bm, BLOCK_C=roles_rank_step(168, br, bn, bm),
                         PREFETCH=pre and roles_prefetch(bn, roles_rank_step(168, br, bn, bm), bm, allowed=True),
                         PAIRS=True, PRMT=2, **_DOT, **_W, HAS_BIAS=hb, T_FP32=False, SPLIT=sp, SYNC=True)
                    for br, bn, bm, hb, sp, pre in ((16, 32, 16, True, False, True), (16, 64, 16, False, False, True),
                                                    (32, 32, 16, True, True, True), (64, 32, 16, True, False, True),
                                                    (16, 32, 64, True, True, True), (32, 64, 64, False, False, True),
                                                    (16, 32, 16, True, True, True), (16, 32, 16, True, True, False))],
        space=rs_space,
    ))
    register_kernel(KernelSpec(
        name="sparse24.ds_bwd_dense", fn=_ds_bwd_dense_kernel, pointers={"ws_ptr": "fp32", "cnt_ptr": "i32"},
        constexprs=[dict(BLOCK_R=br, BLOCK_M=bm, HAS_BIAS=hb, NEED_DT=True, NEED_DD=True, SPLIT=sp, SYNC=sp,
                         D_VEC=dv, **_DOT)
                    for br, bm, hb, sp, dv in ((16, 16, True, True, True), (32, 16, True, True, False),
                                               (64, 16, False, True, True), (128, 16, True, False, True),
                                               (32, 64, True, True, True), (64, 64, True, False, False))]
                   + [dict(BLOCK_R=32, BLOCK_M=16, HAS_BIAS=False, NEED_DT=True, NEED_DD=False, SPLIT=True,
                           SYNC=True, D_VEC=True, **_DOT),
                      dict(BLOCK_R=64, BLOCK_M=16, HAS_BIAS=True, NEED_DT=False, NEED_DD=True, SPLIT=False,
                           SYNC=False, D_VEC=True, **_DOT)],
        space=bd_space,
    ))
    register_kernel(KernelSpec(
        name="sparse24.dx_fp16", fn=_sp_dx_kernel, pointers={"meta_ptr": _I32, "g_ptr": "fp32"},
        constexprs=[dict(MIXED=True, **_DOT, **_W)], space=DX_SPACE, dtypes=("fp16",),
    ))
    register_kernel(KernelSpec(
        name="sparse24.dvalues_fp16", fn=_sp_dvalues_kernel,
        pointers={"meta_ptr": _I32, "g_ptr": "fp32"},
        constexprs=[dict(MIXED=True, **_DOT, **_W)], space=DV_SPACE, dtypes=("fp16",),
    ))


# ============================================================================================
# Launchers
# ============================================================================================

def prune_24_triton(w: torch.Tensor, scores: Optional[torch.Tensor] = None):
    """``(pruned (R, K), mask (R, K) bool)`` with the Triton kernel; any strides."""
    R, K = w.shape
    out = torch.empty((R, K), device=w.device, dtype=w.dtype)
    mask = torch.empty((R, K), device=w.device, dtype=torch.uint8)
    G = K // 4
    if R > 0 and G > 0:
        s = scores if scores is not None else w
        grid = lambda meta: (triton.cdiv(R, meta["BLOCK_R"]), triton.cdiv(G, meta["BLOCK_G"]))
        _prune24_tuned[grid](
            w, s, out, mask, R, G,
            w.stride(0), w.stride(1), s.stride(0), s.stride(1),
            out.stride(0), out.stride(1), mask.stride(0), mask.stride(1),
            HAS_SCORES=scores is not None,
        )
    return out, mask.bool()


def _meta_arg(meta: torch.Tensor, k: int):
    """``(tensor, stride_r, stride_c, META32)`` for a kernel's ``meta_ptr``: the codes as int32
    words (one 16-byte vector per row and 128 inputs) when ``k % 32 == 0`` and the rows are
    4-byte aligned, else the bytes as they are."""
    ok = (
        k % 32 == 0 and meta.ndim == 2 and meta.shape[1] > 0 and meta.stride(1) == 1
        and (meta.shape[0] <= 1 or meta.stride(0) % 4 == 0) and meta.storage_offset() % 4 == 0
    )
    if ok:
        w = meta.view(torch.int32)
        return w, w.stride(0), w.stride(1), True
    return meta, meta.stride(0), meta.stride(1), False


def expand_24(values: torch.Tensor, meta: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dense ``W (R, K)`` from packed ``values (R, K/2)`` and ``meta`` with one Triton launch
    (exact: :func:`unpack_24`). The large-M path expands once per step and calls cuBLAS."""
    R, K = values.shape[0], 2 * values.shape[1]
    w = torch.empty((R, K), device=values.device, dtype=out_dtype or values.dtype)
    if R == 0 or K == 0:
        return w
    mt, smr, smc, m32 = _meta_arg(meta, K)
    grid = lambda m_: (triton.cdiv(R, m_["BLOCK_R"]), triton.cdiv(K, m_["BLOCK_K"]))
    _sp_expand_tuned[grid](
        values, mt, w, R, K,
        values.stride(0), values.stride(1), smr, smc, w.stride(0), w.stride(1),
        META32=m32,
    )
    return w


def compress_24(dense: torch.Tensor, meta: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The entries of ``dense (R, K)`` at ``meta``'s kept positions, ``(R, K/2)`` (exact:
    :func:`compress_like`), one Triton launch: the gradient of the kept values from a dense
    ``dW`` computed by cuBLAS."""
    R, K = dense.shape
    v = torch.empty((R, K // 2), device=dense.device, dtype=out_dtype or dense.dtype)
    if R == 0 or K == 0:
        return v
    mt, smr, smc, m32 = _meta_arg(meta, K)
    grid = lambda m_: (triton.cdiv(R, m_["BLOCK_R"]), triton.cdiv(K, m_["BLOCK_K"]))
    _sp_compress_tuned[grid](
        dense, mt, v, R, K,
        dense.stride(0), dense.stride(1), smr, smc, v.stride(0), v.stride(1),
        META32=m32,
    )
    return v


#: L2 -> SM bytes/s of the decode planners' estimate (kernels/_cost.py, the figure sol uses; a lead)
#: and the low end of its range, where the chosen plan must hold up too (:func:`_cost.robust_pick`)
_L2BW = _cost.DEFAULT.l2_bw
_L2BW_LOW = _cost.DEFAULT.l2_bw_low


def decode_plan(M: int, N: int, K: int, sms: int, elem: int = 2) -> tuple[int, int]:
    """``(BLOCK_N, split_k)`` of the decode launch (see :func:`decode_plan_cost`)."""
    return decode_plan_cost(M, N, K, sms, elem)[1:]


#: row tiles the decode planner considers (a config of each must fit the registers: _decode_fits)
DECODE_TILES = (16, 32, 64, 128)
#: K splits it considers
DECODE_SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)

#: Per-instruction model of the decode kernel (``_sp_decode_kernel``), fitted by least squares to the
#: sm_90 SASS of its 26 register-fitting builds (M 16 / 32 / 64, BLOCK_N 16-128, BLOCK_K 128 / 256,
#: 4 / 8 warps, with and without the split), once with whole tiles (``whole``: ``EVEN``, loads without
#: masks) and once with masked loads (``masked``): per warp and K step, for each expansion (``prmt``:
#: tiles of at least :data:`PRMT_MIN_TILE` weights, 12 builds, every main loop within 5 % (whole) /
#: 8 % (masked) of the fit; ``select``: the compare-and-select form below it, 14 builds, within 6 %):
#: ``elem`` per expanded weight element of a thread, ``wgmma_elem`` added where the tile takes wgmma
#: (``BLOCK_N >= 64``; negative: the wide tiles' fixed costs spread thinner), ``x_elem`` per ``x``
#: element, ``step`` per step; outside the loop ``program`` per warp (``program_split`` with the
#: split), and the reducer's loop ``red + red_elem`` per accumulator element of a thread, ``SPLIT_K``
#: trips in one program of ``SPLIT_K`` (one per program on average). *Predicted*: the model of the
#: compiled code, not a measurement (tests/sparse24/test_decode_issue.py compares it with fresh builds).
DECODE_ISSUE = dict(
    whole=dict(select=dict(elem=5.83, wgmma_elem=0.0, x_elem=1.38, step=28),
               prmt=dict(elem=2.37, wgmma_elem=-0.78, x_elem=0.20, step=167),
               program=291, program_split=474),
    masked=dict(select=dict(elem=5.61, wgmma_elem=0.0, x_elem=1.44, step=56),
                prmt=dict(elem=2.81, wgmma_elem=-0.72, x_elem=0.09, step=173),
                program=362, program_split=548),
    red=16, red_elem=5.15)


def decode_even(N: int, K: int, BLOCK_N: int) -> bool:
    """The decode kernel's ``EVEN``: whole row tiles and ``K`` a multiple of every split and step
    (:data:`DECODE_K_QUANTUM`), so its loads need no masks."""
    return N % BLOCK_N == 0 and K % DECODE_K_QUANTUM == 0


def decode_warp_instructions(BLOCK_N: int, BLOCK_M: int, BLOCK_K: int, num_warps: int,
                             k_per_program: int, split: bool, prmt: Optional[bool] = None,
                             even: bool = True) -> tuple[float, list]:
    """``(warp-instructions of one decode program, loop trips)`` by :data:`DECODE_ISSUE`: the main
    loop ``ceil(k_per_program / BLOCK_K)`` times, then (``split``) the reducer's loop once on
    average. The trips are the build's loops in address order (``fastfactor sol --sass``).
    ``prmt``: the expansion a GPU build takes (default: byte permutes from :data:`PRMT_MIN_TILE`
    weights per tile unless ``FASTFACTOR_SPARSE24_PRMT=0``); ``even``: whole tiles
    (:func:`decode_even`), else the masked loads' figures."""
    m = DECODE_ISSUE
    if prmt is None:
        prmt = prmt_mode(True) > 0 and BLOCK_N * BLOCK_K >= PRMT_MIN_TILE
    v = m["whole" if even else "masked"]
    f = v["prmt" if prmt else "select"]
    t = 32 * num_warps
    e = BLOCK_N * BLOCK_K / t
    loop = f["elem"] * e + (f["wgmma_elem"] * e if BLOCK_N >= 64 else 0.0) + f["x_elem"] * BLOCK_M * BLOCK_K / t + f["step"]
    trips = max(1, -(-k_per_program // BLOCK_K))
    per_warp = trips * loop + (v["program_split"] + m["red"] + m["red_elem"] * BLOCK_N * BLOCK_M / t
                               if split else v["program"])
    return num_warps * per_warp, [trips, 1] if split else [trips]


def _decode_issue_model(ints: dict, constexprs: dict, config: dict, grid) -> Optional[tuple]:
    """:data:`kernels._cost.ISSUE_MODELS` entry of the decode kernel (:func:`decode_warp_instructions`)."""
    kps = min(int(ints["K"]), int(ints["K_PER_SPLIT"]))
    bn, bk = int(constexprs["BLOCK_N"]), int(config["BLOCK_K"])
    return decode_warp_instructions(bn, int(constexprs["BLOCK_M"]), bk, int(config.get("num_warps", 4)), kps,
                                    bool(constexprs.get("SPLIT")),
                                    prmt=int(constexprs.get("PRMT", 0)) > 0 and bn * bk >= PRMT_MIN_TILE,
                                    even=bool(constexprs.get("EVEN")))


_cost.ISSUE_MODELS["sparse24.decode"] = _decode_issue_model
_cost.ISSUE_MODELS["sparse24.dvalues"] = lambda ints, constexprs, config, grid: dvalues_warp_instructions(
    int(config["BLOCK_N"]), int(config["BLOCK_K"]), int(config["BLOCK_M"]), int(config.get("num_warps", 4)), int(ints["M"]))


def _issue_s(warp_instructions: float, programs: int, fill_fraction: float) -> float:
    return _cost.issue_seconds(warp_instructions * programs, _cost.DEFAULT, fill_fraction)


def _plan_times(dram: float, l2: float, issue: float, f: float) -> tuple[float, float]:
    """``(seconds at the nominal L2 figure, seconds at its low end)`` of one planned launch."""
    return tuple(max(dram / _BW, l2 / (bw * f), issue) + _LAUNCH for bw in (_L2BW, _L2BW_LOW))


def _decode_kps(K: int, sk: int) -> int:
    """Inputs per split: ``ceil(K / sk)`` rounded up to :data:`DECODE_K_QUANTUM`."""
    return _per_split(K, sk, DECODE_K_QUANTUM)


def decode_launch_bytes(M: int, N: int, K: int, bn: int, sk: int, elem: int = 2, discard: bool = False,
                        code_bits: int = 4) -> dict:
    """Bytes of one decode launch with row tile ``bn`` and ``sk`` K splits (``_sp_decode_kernel``):
    ``dram`` (the compressed weight, ``x`` and the bias once, ``y``, and with a split the fp32
    partials stored — their reads are L2 hits, written moments before in the same launch; none
    where the reducer drops them from L2 unwritten, ``discard``) and ``l2`` (every load and store
    through L2: ``x`` once per row tile, the partials stored and the ``sk - 1`` other slices read
    back by each tile's reducer). The bias (``N`` elements) is left out, as in :func:`path_costs`,
    so that the two compare like for like. ``code_bits``: bits of codes a group of four inputs
    (4; 3 where the sparse tensor-core decode reads :func:`mma_frag_codes3`)."""
    wbytes = N * K * (elem / 2 + code_bits / 32)
    xbytes, ybytes, bbytes = elem * M * K, elem * M * N, 0.0
    nb = -(-N // bn)
    ws = 4.0 * sk * M * N if sk > 1 else 0.0
    back = ws * (sk - 1) / sk if sk > 1 else 0.0
    return dict(dram=wbytes + xbytes + ybytes + bbytes + (0.0 if discard else ws),
                l2=wbytes + nb * xbytes + ybytes + bbytes + ws + back,
                x_reread=(nb - 1) * xbytes, programs=nb * sk, tiles=nb)


def decode_plans(M: int, N: int, K: int, sms: int, elem: int = 2, prmt: Optional[bool] = None) -> list:
    """Every plan the decode planner weighs: ``(t_nominal, t_low, (BLOCK_N, split_k))`` with the
    predicted seconds of the launch at the nominal L2 figure and at the low end of its range::

        t = max(DRAM bytes / HBM, L2 bytes / (L2 bandwidth · fill), issue) + launch floor

    bytes from :func:`decode_launch_bytes`, issue from :data:`DECODE_ISSUE` with the register-
    fitting config that issues least (one launch whatever the split: the reduction is in it).
    ``prmt``: whether a GPU build takes byte permutes (default: :func:`prmt_mode`)."""
    prmt = prmt_mode(True) > 0 if prmt is None else prmt
    plans = []
    bm = max(16, next_pow2(M))
    for bn in DECODE_TILES:
        cfgs = [c for c in DECODE_SPACE[1:] if _decode_ok(bn, bm, c["BLOCK_K"], c["num_warps"])]
        if not cfgs:
            continue                           # no config of this tile fits the registers
        for sk in DECODE_SPLITS:
            kps = _decode_kps(K, sk)
            if sk > 1 and kps * (sk - 1) >= K:
                continue                       # an empty split
            wi = min(decode_warp_instructions(bn, bm, c["BLOCK_K"], c["num_warps"], min(K, kps), sk > 1,
                                              prmt=prmt and bn * c["BLOCK_K"] >= PRMT_MIN_TILE,
                                              even=decode_even(N, K, bn))[0]
                     for c in cfgs)
            plans.append(_price_decode_plan(M, N, K, bn, sk, sms, elem, wi))
    return plans


def _price_decode_plan(M: int, N: int, K: int, bn: int, sk: int, sms: int, elem: int, wi: float,
                       discard: bool = False, code_bits: int = 4) -> tuple:
    """``(t_nominal, t_low, (bn, sk))`` of a decode launch with row tile ``bn``, ``sk`` K splits and
    ``wi`` warp-instructions a program (``discard``: the reducer drops the partials from L2;
    ``code_bits`` a group read): :func:`decode_launch_bytes` and the busy fraction of one program
    an SM (``_cost.fill``) through :func:`_plan_times`."""
    b = decode_launch_bytes(M, N, K, bn, sk, elem, discard, code_bits)
    p = b["programs"]
    f = min(1.0, p / (-(-p // sms) * sms))
    return _plan_times(b["dram"], b["l2"], _issue_s(wi, p, f), f) + ((bn, sk),)


def decode_plan_cost(M: int, N: int, K: int, sms: int, elem: int = 2) -> tuple[float, int, int]:
    """``(seconds, BLOCK_N, split_k)`` of the decode launch for ``x (M, K)`` against ``W (N, K)``:
    of :func:`decode_plans`, the one :func:`kernels._cost.robust_pick` takes (*predicted*; seconds
    at the nominal L2 figure, what ``fastfactor sol`` reports). Wide row tiles read ``x`` fewer
    times from L2 but need K splits to fill the SMs, whose fp32 partials cost DRAM bytes
    (``sk·M·N·4``); narrow tiles without a split are cheapest at 9 TB/s of L2 but L2-bound below
    ~8 TB/s, so the pick weighs both ends of the unmeasured L2 figure. Cached per shape and
    expansion (the launcher asks at every launch)."""
    return _decode_pick(int(M), int(N), int(K), int(sms), int(elem), prmt_mode(True) > 0)


@functools.lru_cache(maxsize=4096)
def _decode_pick(M: int, N: int, K: int, sms: int, elem: int, prmt: bool) -> tuple[float, int, int]:
    t_nom, _, (bn, sk) = _cost.robust_pick(decode_plans(M, N, K, sms, elem, prmt))
    return t_nom, bn, sk


_config.INTERPRETER_EQUIVALENT["PRMT"] = {2: 1}     # prmt.b32 -> the same selection in integer ops


def prmt_mode(ok: bool) -> int:
    """The decode kernels' expansion (their ``PRMT`` constexpr): 2 = byte permutes (``prmt.b32``,
    :func:`_expand24_prmt`) on a GPU, 1 = the same computation in integer ops under the interpreter
    (which has no inline assembly), 0 = compare-and-select (:func:`_expand24_pairs`), taken where
    ``ok`` is false (codes not read as 32-bit words, values not read as pairs) or
    ``FASTFACTOR_SPARSE24_PRMT=0``."""
    if not ok or _forced("FASTFACTOR_SPARSE24_PRMT", ("0", "1")) == "0":
        return 0
    return 1 if _config.is_interpreter() else 2


def _split_buffers(sk: int, tiles: int, out: torch.Tensor) -> tuple:
    """``(SPLIT, SYNC, workspace, counters)`` of a one-launch split decode writing ``out (M, n)``
    with ``sk`` splits over ``tiles`` output tiles (:func:`kernels._split.split_buffers`)."""
    return split_buffers(sk, tiles, tuple(out.shape), out.device, out)


def _values_arg(values: torch.Tensor, dtype: torch.dtype) -> tuple:
    """``(values as the decode kernels read them, PAIRS)``: 16-bit kept values of ``dtype`` with
    unit column stride and 4-byte aligned rows as one int32 pair per group (``PAIRS``), else as
    they are."""
    pairs = (values.element_size() == 2 and values.dtype == dtype and values.stride(1) == 1
             and (values.shape[0] <= 1 or values.stride(0) % 2 == 0) and values.storage_offset() % 2 == 0)
    return (values.view(torch.int32) if pairs else values), pairs


def sparse24_decode(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, plan: Optional[tuple] = None,
                    out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``y = x·Wᵀ + b`` for ``M <= 64`` token rows in one launch (:func:`decode_plan`; ``plan``
    forces ``(BLOCK_N, split_k)``), in ``out_dtype`` (default ``x``'s). Deterministic: the split
    partials are summed in a fixed order by each row tile's last program."""
    M, K = x.shape
    N = values.shape[0]
    if M > DECODE_MAX_M:
        raise ValueError(f"x: sparse24_decode takes at most {DECODE_MAX_M} rows, got {M}")
    y = torch.empty((M, N), device=x.device, dtype=out_dtype or x.dtype)
    if M == 0 or N == 0:
        return y
    if K == 0:
        y.zero_()
        if bias is not None:
            y += bias
        return y
    if plan is None and mma_decode_ok(x, values, out_dtype) and mma_decode_wins(
            M, N, K, _config.num_sms(x.device), x.element_size()):
        return sparse24_decode_mma(x, values, meta, bias)
    bn, sk = plan or decode_plan(M, N, K, _config.num_sms(x.device), x.element_size())
    kps = _decode_kps(K, sk)
    sk = -(-K // kps)
    bm = max(16, next_pow2(M))
    mt, smr, smc, m32 = _meta_arg(meta, K)
    vt, pairs = _values_arg(values, x.dtype)
    nb = triton.cdiv(N, bn)
    split, sync, ws, cnt = _split_buffers(sk, nb, y)
    _sp_decode_tuned[(nb * sk,)](
        x, vt, mt, bias if bias is not None else y, y, ws, cnt,
        M, N, K, kps, sk,
        x.stride(0), x.stride(1), vt.stride(0), vt.stride(1),
        smr, smc, y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, SPLIT=split, SYNC=sync, UPCAST=upcast_dots(), PRECISION=dot_precision(x.dtype),
        META32=m32, PAIRS=pairs, PRMT=prmt_mode(m32 and pairs), EVEN=decode_even(N, K, bn),
        BLOCK_N=bn, BLOCK_M=bm,
    )
    return y


# ---- the decode on sparse tensor cores (_sp_decode_mma_kernel) ---------------------------------


#: Instruction model of ``_sp_decode_mma_kernel`` on sm_90, per warp, by ``(BLOCK_N, NT)``: its main
#: loop per 64-input step (``step``; ``step_split`` in the split build) and the rest of a program
#: (``program`` without a split; ``program_split`` with it, the reducer's loop counted once, what a
#: program runs on average). Read from the SASS of the compile tier's builds of the kernel
#: (``tests/sparse24/test_decode_mma.py`` compares with fresh ones). *Predicted*: the compiled code,
#: not a measurement.
MMA_DECODE_ISSUE = {
    (16, 1): dict(step=36, program=159, step_split=34, program_split=433),
    (16, 2): dict(step=55, program=207, step_split=55, program_split=462),
    (32, 1): dict(step=34, program=162, step_split=35, program_split=442),
    (32, 2): dict(step=51, program=210, step_split=55, program_split=482),
    (64, 1): dict(step=34, program=162, step_split=35, program_split=442),
    (64, 2): dict(step=51, program=210, step_split=55, program_split=482),
    (128, 1): dict(step=55, program=249, step_split=58, program_split=383),
    (128, 2): dict(step=85, program=326, step_split=88, program_split=419),
    (256, 1): dict(step=59, program=244, step_split=58, program_split=386),
    (256, 2): dict(step=89, program=321, step_split=88, program_split=418),
}

#: :data:`MMA_DECODE_ISSUE` of the builds reading the 3-bit codes (``CODES3``), from their sm_90 SASS:
#: ``step`` / ``step_split`` per *pair* of 64-input steps (the loop's trip; 183 a warp at 128 rows x
#: 16 tokens with the split = 0.045 a weight, against 2 x 88 with the 4-bit codes).
MMA3_DECODE_ISSUE = {
    (16, 1): dict(step=90, program=173, step_split=90, program_split=446),
    (16, 2): dict(step=120, program=216, step_split=120, program_split=475),
    (32, 1): dict(step=90, program=180, step_split=90, program_split=469),
    (32, 2): dict(step=126, program=221, step_split=126, program_split=491),
    (64, 1): dict(step=90, program=180, step_split=90, program_split=469),
    (64, 2): dict(step=126, program=221, step_split=126, program_split=491),
    (128, 1): dict(step=121, program=254, step_split=126, program_split=382),
    (128, 2): dict(step=180, program=329, step_split=183, program_split=416),
    (256, 1): dict(step=121, program=253, step_split=126, program_split=380),
    (256, 2): dict(step=180, program=329, step_split=183, program_split=419),
}

#: What dropping the split partials from L2 adds to a split program of either build (its loops once
#: on average, the rest of the reducer's epilogue), per warp by ``BLOCK_N`` (none at 16 rows: their
#: partials share lines), from the same SASS.
MMA_DISCARD_ISSUE = {16: 0, 32: 109, 64: 112, 128: 112, 256: 111}


def mma_decode_warp_instructions(BLOCK_N: int, M: int, k_per_program: int, split: bool,
                                 discard: bool = False, codes3: bool = False) -> tuple[float, list]:
    """``(warp-instructions of one sparse tensor-core decode program, loop trips)`` by
    :data:`MMA_DECODE_ISSUE` (:data:`MMA3_DECODE_ISSUE` for the 3-bit codes, whose loop runs a
    pair of steps): the main loop ``ceil(k_per_program / 64)`` times (``/ 128``), then (``split``)
    the reducer's loop once on average, and (``discard``) its loop dropping the partials once."""
    nw = MMA_TILES[BLOCK_N][0]
    key = (BLOCK_N, 1 if M <= 8 else 2)
    f = MMA3_DECODE_ISSUE[key] if codes3 else MMA_DECODE_ISSUE[key]
    trips = max(1, -(-k_per_program // (2 * MMA_K_QUANTUM if codes3 else MMA_K_QUANTUM)))
    per_warp = trips * f["step_split" if split else "step"] + f["program_split" if split else "program"]
    if split and discard:
        per_warp += MMA_DISCARD_ISSUE[BLOCK_N]
        return nw * per_warp, [trips, 1, 1]
    return nw * per_warp, [trips, 1] if split else [trips]


def _mma_issue_model(ints: dict, constexprs: dict, config: dict, grid) -> Optional[tuple]:
    """:data:`kernels._cost.ISSUE_MODELS` entry of the sparse tensor-core decode."""
    kps = min(int(ints["K"]), int(ints["K_PER_SPLIT"]))
    return mma_decode_warp_instructions(int(constexprs["BLOCK_N"]), int(ints["M"]), kps, bool(constexprs.get("SPLIT")),
                                        int(constexprs.get("DISCARD", 0)) > 0, bool(constexprs.get("CODES3")))


_cost.ISSUE_MODELS["sparse24.decode_mma"] = _mma_issue_model
_config.INTERPRETER_EQUIVALENT["MMA"] = {2: 1}      # mma.sp / shfl / %tid.x -> their emulation
_config.INTERPRETER_EQUIVALENT["DISCARD"] = {2: 1}  # discard.global.L2 -> drops counted in a shadow (kernels._split)


def _cached_on(meta: torch.Tensor, attr: str, key: tuple, make):
    """``make()``, cached on ``meta`` under ``attr`` and keyed by ``meta``'s version and address with
    ``key``: what is derived from a mask (its layouts for other GEMMs) is made once per mask."""
    full = (meta._version, meta.data_ptr()) + tuple(key)
    hit = getattr(meta, attr, None)
    if hit is not None and hit[0] == full:
        return hit[1]
    out = make()
    try:
        setattr(meta, attr, (full, out))
    except (AttributeError, RuntimeError):  # pragma: no cover - tensors refusing attributes
        pass
    return out


def mma_frag_codes(meta: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """The codes of a 2:4 weight ``(rows, k)`` in the order :func:`_sp_decode_mma_kernel` reads
    them: ``(rows/16, k/64, 8, 2, 2)`` int32, entry ``[b, s, g, p, c]`` the ``mma.sp`` metadata
    register of lane ``4g + p`` (and ``4g + p + 2``) for chunk ``c`` of step ``s`` of row tile
    ``b``: nibble ``i`` of its low half the code of row ``16b + g``, input group
    ``16s + 4i + 2c + p`` (the kernel's permutation ``σ``), its high half the same of row
    ``16b + g + 8``. As many bytes as ``meta``: a reordering, no format change."""
    i0, i1 = _codes(meta, k)
    code = (i0 | (i1 << 2)).reshape(rows // 16, 2, 8, k // 64, 4, 2, 2)   # (b, h, g, s, i, c, p)
    code = code.permute(0, 3, 2, 6, 5, 1, 4)                              # (b, s, g, p, c, h, i)
    shift = (torch.arange(2, device=meta.device)[:, None] * 16 + torch.arange(4, device=meta.device)[None, :] * 4)
    word = (code << shift).sum(dim=(-1, -2))                              # int64, < 2**32
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).contiguous()


#: group code (0..5) of the sparse tensor-core decode's 3-bit codes by ``mma.sp`` metadata nibble
#: ``i0 | i1 << 2``: chosen so that each nibble bit is one logic op of the code bits
#: (:func:`_codes3_words`)
CODES3_OF_NIBBLE = {0x4: 0, 0x8: 1, 0xC: 2, 0xE: 3, 0x9: 5, 0xD: 6}


def mma_frag_codes3(meta: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """The codes of a 2:4 weight ``(rows, k)`` (``k % 128 == 0``) as :func:`_sp_decode_mma_kernel`
    reads them with ``CODES3``: 3 bits a group of four inputs instead of 4 (the six patterns fit
    2.58). ``(rows/16, k/128, 48)`` int32: for row tile ``b`` and steps ``2p, 2p + 1``, lane
    ``(g, t)``'s four fragment words (:func:`mma_frag_codes`: step ``2p`` chunks 0, 1, then step
    ``2p + 1``'s; word ``r``) as three bit planes ``s0, s1, s2`` — bit ``4n + r`` of plane ``j`` is
    bit ``j`` of the code (:data:`CODES3_OF_NIBBLE`) of nibble ``n`` of word ``r`` — stored as
    ``(s0, s1)`` pairs at ``2(2g + t)`` and ``s2`` at ``32 + 2g + t``. Three quarters of the
    bytes of :func:`mma_frag_codes`, decoded exactly (tests)."""
    w = mma_frag_codes(meta, rows, k).to(torch.int64) & 0xFFFFFFFF                  # (b, s, g, t, c)
    w = w.reshape(rows // 16, k // 128, 2, 8, 2, 2).permute(0, 1, 3, 4, 2, 5)     # (b, p, g, t, h, c)
    w = w.reshape(rows // 16, k // 128, 8, 2, 4)                                   # word r = 2h + c
    nib = (w[..., None] >> (4 * torch.arange(8, device=w.device))) & 15            # (b, p, g, t, r, n)
    lut = torch.full((16,), -1, dtype=torch.int64, device=w.device)
    for v, c in CODES3_OF_NIBBLE.items():
        lut[v] = c
    code = lut[nib]
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is None and bool((code < 0).any()):   # (not while ``fastfactor sol`` records)
        raise ValueError("meta: expected 2:4 codes (two distinct kept positions a group), got another pattern")
    pos = 4 * torch.arange(8, device=w.device)[None, :] + torch.arange(4, device=w.device)[:, None]   # (r, n)
    planes = [(((code >> j) & 1) << pos).sum(dim=(-1, -2)) for j in range(3)]     # (b, p, g, t)
    planes = [torch.where(p_ >= 2**31, p_ - 2**32, p_).to(torch.int32) for p_ in planes]
    pairs = torch.stack(planes[:2], dim=-1).reshape(rows // 16, k // 128, 32)
    return torch.cat((pairs, planes[2].reshape(rows // 16, k // 128, 16)), dim=-1).contiguous()


def mma_codes3(meta: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """:func:`mma_frag_codes3`, cached on ``meta`` (keyed by its version): once per mask."""
    return _cached_on(meta, "_fastfactor_mma3", (rows, k), lambda: mma_frag_codes3(meta, rows, k))


def mma_codes3_ok(K: int) -> bool:
    """Whether the sparse tensor-core decode may read the codes as 3 bits a group (``K % 128 ==
    0``, unless ``FASTFACTOR_SPARSE24_CODES3=0``; whether it does: :func:`mma_uses_codes3`)."""
    return K % 128 == 0 and _forced("FASTFACTOR_SPARSE24_CODES3", ("0", "1")) != "0"


def mma_codes(meta: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """:func:`mma_frag_codes`, cached on ``meta`` (keyed by its version): once per mask."""
    return _cached_on(meta, "_fastfactor_mma", (rows, k), lambda: mma_frag_codes(meta, rows, k))


def _aligned(t: torch.Tensor, elems: int) -> bool:
    """Rows of unit column stride whose starts are ``elems``-element aligned."""
    return (t.stride(-1) == 1 and (t.shape[0] <= 1 or t.stride(0) % elems == 0)
            and t.storage_offset() % elems == 0 and t.data_ptr() % (elems * t.element_size()) == 0)


def mma_decode_ok(x: torch.Tensor, values: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> bool:
    """Whether :func:`sparse24_decode` takes the sparse tensor cores: fp16/bf16 ``x`` and values of
    the same dtype, ``M <= 16``, ``N % 16 == 0``, ``K % 64 == 0``, ``x`` rows of 4-byte words and
    16-byte aligned value rows, an output of ``x``'s dtype, a GPU with ``mma.sp`` (sm_80 on),
    unless ``FASTFACTOR_SPARSE24_MMA=0``."""
    M, K = x.shape
    if x.dtype not in (torch.float16, torch.bfloat16) or values.dtype != x.dtype or (out_dtype or x.dtype) != x.dtype:
        return False
    if not mma_decode_shape_ok(M, values.shape[0], K) or not _aligned(x, 2) or not _aligned(values, 8):
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    return True


def mma_decode_plans(M: int, N: int, K: int, sms: int, elem: int = 2, codes3: Optional[bool] = None) -> list:
    """Every plan of the sparse tensor-core decode: ``(t_nominal, t_low, (BLOCK_N, split_k))``, the
    bytes of :func:`decode_launch_bytes` (the same traffic as the expanding decode, the codes at 3
    or 4 bits a group) and the issue of :data:`MMA_DECODE_ISSUE` / :data:`MMA3_DECODE_ISSUE`.
    ``codes3``: the 3-bit codes (default: what the shape takes, :func:`mma_uses_codes3`)."""
    if codes3 is None:
        codes3 = mma_uses_codes3(M, N, K, sms, elem)
    plans = []
    for bn in MMA_TILES:
        for sk in DECODE_SPLITS:
            kps = _per_split(K, sk, 2 * MMA_K_QUANTUM if codes3 else MMA_K_QUANTUM)
            if sk > 1 and kps * (sk - 1) >= K:
                continue                       # an empty split
            wi = mma_decode_warp_instructions(bn, M, min(K, kps), sk > 1, mma_discards(N, bn, sk), codes3)[0]
            plans.append(_price_decode_plan(M, N, K, bn, sk, sms, elem, wi, mma_discards(N, bn, sk),
                                            3 if codes3 else 4))
    return plans


def mma_whole_lines(N: int, BLOCK_N: int) -> bool:
    """Whether a row tile's partials of one token fill whole 128-byte lines of the workspace
    ``(SPLIT_K, M, N)`` fp32 (``N`` and ``BLOCK_N`` multiples of 32), so that its reducer may drop
    them from L2 (:func:`kernels._split.discard_mode`) without touching another tile's."""
    return N % 32 == 0 and BLOCK_N % 32 == 0


def mma_discards(N: int, BLOCK_N: int, sk: int) -> bool:
    """Whether a sparse tensor-core decode launch with ``sk`` splits drops its partials from L2
    (what the planner prices: a GPU launch whose workspace is 128-byte aligned, as PyTorch's
    allocator makes it, unless ``FASTFACTOR_SPLIT_DISCARD=0``)."""
    return sk > 1 and mma_whole_lines(N, BLOCK_N) and discard_enabled()


def mma_decode_plan_cost(M: int, N: int, K: int, sms: int, elem: int = 2) -> tuple[float, int, int]:
    """``(seconds, BLOCK_N, split_k)`` of the sparse tensor-core decode (*predicted*): of
    :func:`mma_decode_plans`, the one :func:`kernels._cost.robust_pick` takes (cached per shape,
    ``FASTFACTOR_SPLIT_DISCARD`` and ``FASTFACTOR_SPARSE24_CODES3``)."""
    return _mma_pick(int(M), int(N), int(K), int(sms), int(elem), os.environ.get("FASTFACTOR_SPLIT_DISCARD", "auto"),
                     os.environ.get("FASTFACTOR_SPARSE24_CODES3", "auto"))[:3]


def mma_uses_codes3(M: int, N: int, K: int, sms: int, elem: int = 2) -> bool:
    """Whether the sparse tensor-core decode reads the 3-bit codes at this shape: where it may
    (:func:`mma_codes3_ok`) and its planned launch with them is predicted no slower than with the
    4-bit codes (a pair of steps a trip and 128-input splits cost small shapes issue slots);
    ``FASTFACTOR_SPARSE24_CODES3=1`` takes them wherever it may."""
    return _mma_pick(int(M), int(N), int(K), int(sms), int(elem), os.environ.get("FASTFACTOR_SPLIT_DISCARD", "auto"),
                     os.environ.get("FASTFACTOR_SPARSE24_CODES3", "auto"))[3]


@functools.lru_cache(maxsize=4096)
def _mma_pick(M: int, N: int, K: int, sms: int, elem: int, discard_flag: str, codes3_flag: str) -> tuple:
    t_nom, _, (bn, sk) = _cost.robust_pick(mma_decode_plans(M, N, K, sms, elem, codes3=False))
    if mma_codes3_ok(K):
        t3, _, (bn3, sk3) = _cost.robust_pick(mma_decode_plans(M, N, K, sms, elem, codes3=True))
        if t3 <= t_nom or _forced("FASTFACTOR_SPARSE24_CODES3", ("0", "1")) == "1":
            return t3, bn3, sk3, True
    return t_nom, bn, sk, False


def mma_decode_shape_ok(M: int, N: int, K: int, elem: int = 2) -> bool:
    """The shape side of :func:`mma_decode_ok` (16-bit operands, ``M <= 16``, ``N % 16 == 0``,
    ``K % 64 == 0``, not turned off), what the planners price by."""
    return (elem == 2 and 0 < M <= MMA_DECODE_MAX_M and N % 16 == 0 and K % MMA_K_QUANTUM == 0
            and _forced("FASTFACTOR_SPARSE24_MMA", ("0", "1")) != "0")


def decode_seconds(M: int, N: int, K: int, sms: int, elem: int = 2, same_dtype: bool = True) -> float:
    """Predicted seconds of :func:`sparse24_decode`'s launch for this shape: the cheaper of the
    expanding decode's planned price and, where it takes the shape (``same_dtype``: the output in
    the operands' dtype), the sparse tensor-core decode's (:func:`mma_decode_wins`)."""
    t = decode_plan_cost(M, N, K, sms, elem)[0]
    if same_dtype and mma_decode_shape_ok(M, N, K, elem):
        return min(t, mma_decode_plan_cost(M, N, K, sms, elem)[0])
    return t


def mma_decode_wins(M: int, N: int, K: int, sms: int, elem: int = 2) -> bool:
    """The sparse tensor-core decode's planned launch predicted no slower than the expanding
    decode's (both the plans :func:`kernels._cost.robust_pick` takes): the dispatch between them."""
    return mma_decode_plan_cost(M, N, K, sms, elem)[0] <= decode_plan_cost(M, N, K, sms, elem)[0]


def sparse24_decode_mma(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, plan: Optional[tuple] = None) -> torch.Tensor:
    """``y = x·Wᵀ + b`` for ``M <= 16`` tokens on the sparse tensor cores (``mma.sp``, one launch,
    :func:`mma_decode_plan_cost`; ``plan`` forces ``(BLOCK_N, split_k)``). The caller checked
    :func:`mma_decode_ok`. Deterministic: split partials summed in a fixed order."""
    M, K = x.shape
    N = values.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    bn, sk = plan or mma_decode_plan_cost(M, N, K, _config.num_sms(x.device), x.element_size())[1:]
    nw, rt = MMA_TILES[bn]
    codes3 = mma_uses_codes3(M, N, K, _config.num_sms(x.device), x.element_size())
    kps = _per_split(K, sk, 2 * MMA_K_QUANTUM if codes3 else MMA_K_QUANTUM)
    sk = -(-K // kps)
    nb = triton.cdiv(N, bn)
    split, sync, ws, cnt = _split_buffers(sk, nb, y)
    discard = discard_mode(split, mma_whole_lines(N, bn), ws)
    xw = x.view(torch.int32)
    vw = values.view(torch.int32)
    _sp_decode_mma_tuned[(nb * sk,)](
        xw, vw, mma_codes3(meta, N, K) if codes3 else mma_codes(meta, N, K), bias if bias is not None else y, y,
        y.view(torch.int32), ws,
        discard_target(ws, discard), cnt,
        M, N, K, kps, sk, xw.stride(0), vw.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, SPLIT=split, SYNC=sync, DISCARD=discard,
        MMA=1 if _config.is_interpreter() else 2,
        FP16=x.dtype == torch.float16, RT=rt, NT=1 if M <= 8 else 2, CODES3=codes3, BLOCK_N=bn,
    )
    return y


def sparse24_mm(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``x (M, K) · Wᵀ (+ bias)`` with ``W`` packed ``values (N, K/2)``, ``meta``; -> ``(M, N)``
    in ``out_dtype`` (default ``x``'s)."""
    M, K = x.shape
    N = values.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=out_dtype or x.dtype)
    if M == 0 or N == 0:
        return y
    if K == 0:
        y.zero_()
        if bias is not None:
            y += bias
        return y
    mt, smr, smc, m32 = _meta_arg(meta, K)
    grid = lambda meta_: (triton.cdiv(N, meta_["BLOCK_N"]), triton.cdiv(M, meta_["BLOCK_M"]))
    _sp_mm_tuned[grid](
        x, values, mt, bias if bias is not None else y, y,
        M, N, K, m_bucket(M),
        x.stride(0), x.stride(1), values.stride(0), values.stride(1),
        smr, smc, y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, UPCAST=upcast_dots(), PRECISION=dot_precision(x.dtype), META32=m32,
    )
    return y


def _precision(a: torch.Tensor, b: torch.Tensor) -> str:
    """``tl.dot`` precision for operands ``a``, ``b``: an fp32 intermediate of fp16 data against
    fp16 runs as TF32 (the precision the fp16 op asks for), else PyTorch's rule for ``a``."""
    if a.dtype != b.dtype and a.dtype == torch.float32:
        return dot_precision(b.dtype)
    return dot_precision(a.dtype)


#: dx column tiles the dx-decode planner considers
DXD_TILES = (32, 64, 128, 256)


def _dxd_nps(N: int, sk: int) -> int:
    return _per_split(N, sk, DXD_N_QUANTUM)


def dx_decode_launch_bytes(M: int, N: int, K: int, bk: int, sk: int, elem: int = 2, dv: bool = False) -> dict:
    """Bytes of one dx-decode launch (``_sp_dx_decode_kernel``) with ``bk`` dx columns per program
    and ``sk`` splits of the weight rows: as :func:`decode_launch_bytes` with the roles of ``x``
    and ``y`` taken by ``g (M, N)``, read once per column tile, and ``dx (M, K)``. ``dv``: also the
    kept values' gradient (``HAS_DV``): ``x (M, K)`` read (its column tile once per program) and the
    ``N x K/2`` gradient stored (its codes read again: L2 hits)."""
    wbytes = N * K * (elem / 2 + 1 / 8)
    gbytes, dxbytes = elem * M * N, elem * M * K
    nb = -(-K // bk)
    # each weight row is read in pieces of bk columns: bk·elem/2 bytes of values and bk/8 of codes
    # per piece, each at least one 32-byte sector through L2
    w_l2 = N * nb * (max(32.0, bk * elem / 2) + max(32.0, bk / 8))
    ws = 4.0 * sk * M * K if sk > 1 else 0.0
    back = ws * (sk - 1) / sk if sk > 1 else 0.0
    xb, dvb = (elem * M * K, N * K / 2 * elem) if dv else (0.0, 0.0)
    codes_l2 = N * nb * max(32.0, bk / 8) if dv else 0.0
    return dict(dram=wbytes + gbytes + dxbytes + ws + xb + dvb,
                l2=w_l2 + nb * gbytes + dxbytes + ws + back + sk * xb + dvb + codes_l2,
                g_reread=(nb - 1) * gbytes, programs=nb * sk, tiles=nb)


#: Per-instruction model of the dx-decode kernel (``_sp_dx_decode_kernel``), fitted to the sm_90 SASS
#: of 11 register-fitting split builds (M 16 / 64, BLOCK_K 32-256, BLOCK_N 64 / 128, 4 / 8 warps),
#: as :data:`DECODE_ISSUE`, per warp and step of ``BLOCK_N`` weight rows: ``elem`` per expanded
#: weight element of a thread (the expanded tile is the dot's right operand), ``g_elem`` per ``g``
#: element, ``step``; outside the loop ``program + program_acc`` per accumulator element of a thread
#: (builds without the split are taken at the same figure: an overestimate of ~150), the reducer's
#: loop ``red + red_acc`` per accumulator element, once per program on average. ``prmt``: the
#: byte-permute expansion (every main loop within 8 %); ``select``: compare-and-select (9 %).
DXD_ISSUE = dict(select=dict(elem=5.8, g_elem=5.1, step=131), prmt=dict(elem=3.9, g_elem=3.6, step=176),
                 program=350, program_acc=12.5, red=11, red_acc=5.4)

#: What forming the kept values' gradient adds to a dx-decode step (``HAS_DV``: the product gᵀ·x of
#: the weight tile, the kept-entry selection, the stores), per warp: ``elem`` per element of the
#: weight tile a thread, ``step``. A rough stated model from five sm_90 builds (BLOCK_K 32-128,
#: BLOCK_N 64 / 128, 4 / 8 warps): the compiled additions spread from +120 (the build ``fastfactor
#: sol`` records at 4096², 16 tokens: its loop 435 against 536 by the model with the kept-value
#: kernel's own per-element figure) to +229..+333 in compile-check's aligned builds of the same
#: tiles (their base loops 204-284); this fit is within 20 % of the recorded build
#: (tests/sparse24/test_decode_issue.py) and under the others by up to 45 %.
DXD_DV_ISSUE = dict(elem=4.0, step=60)


def dx_decode_warp_instructions(BLOCK_K: int, BLOCK_M: int, BLOCK_N: int, num_warps: int,
                                n_per_program: int, split: bool, prmt: Optional[bool] = None,
                                dv: bool = False) -> tuple[float, list]:
    """``(warp-instructions of one dx-decode program, loop trips)`` by :data:`DXD_ISSUE` (``prmt``:
    the expansion; default: byte permutes unless ``FASTFACTOR_SPARSE24_PRMT=0``). ``dv``: the
    launch also forms the kept values' gradient (``HAS_DV``): each step adds
    :data:`DXD_DV_ISSUE` (``elem`` per element of the weight tile a thread, ``step``)."""
    m = DXD_ISSUE
    f = m["prmt" if (prmt_mode(True) > 0 if prmt is None else prmt) else "select"]
    t = 32 * num_warps
    acc = BLOCK_M * BLOCK_K / t
    loop = f["elem"] * BLOCK_N * BLOCK_K / t + f["g_elem"] * BLOCK_M * BLOCK_N / t + f["step"]
    if dv:
        loop += DXD_DV_ISSUE["elem"] * BLOCK_N * BLOCK_K / t + DXD_DV_ISSUE["step"]
    trips = max(1, -(-n_per_program // BLOCK_N))
    per_warp = trips * loop + m["program"] + m["program_acc"] * acc + (m["red"] + m["red_acc"] * acc if split else 0.0)
    return num_warps * per_warp, [trips, 1] if split else [trips]


def _dx_decode_issue_model(ints: dict, constexprs: dict, config: dict, grid) -> Optional[tuple]:
    """:data:`kernels._cost.ISSUE_MODELS` entry of the dx-decode kernel (:func:`dx_decode_warp_instructions`)."""
    nps = min(int(ints["N"]), int(ints["N_PER_SPLIT"]))
    return dx_decode_warp_instructions(int(constexprs["BLOCK_K"]), int(constexprs["BLOCK_M"]), int(config["BLOCK_N"]),
                                       int(config.get("num_warps", 4)), nps, bool(constexprs.get("SPLIT")),
                                       prmt=int(constexprs.get("PRMT", 0)) > 0, dv=bool(constexprs.get("HAS_DV")))


_cost.ISSUE_MODELS["sparse24.dx_decode"] = _dx_decode_issue_model


def dx_decode_plans(M: int, N: int, K: int, sms: int, elem: int = 2, prmt: Optional[bool] = None,
                    dv: bool = False) -> list:
    """Every dx-decode plan: ``(t_nominal, t_low, (BLOCK_K, split))`` by the model of
    :func:`decode_plans` on :func:`dx_decode_launch_bytes` and :data:`DXD_ISSUE` (``dv``: the
    launch that also forms the kept values' gradient)."""
    prmt = prmt_mode(True) > 0 if prmt is None else prmt
    plans = []
    bm = max(16, next_pow2(M))
    ok = _dxd_dv_ok if dv else _dxd_ok
    for bk in DXD_TILES:
        cfgs = [c for c in DXD_SPACE[1:] if ok(bk, bm, c["BLOCK_N"], c["num_warps"])]
        if not cfgs:
            continue
        for sk in DECODE_SPLITS:
            nps = _dxd_nps(N, sk)
            if sk > 1 and nps * (sk - 1) >= N:
                continue
            b = dx_decode_launch_bytes(M, N, K, bk, sk, elem, dv)
            p = b["programs"]
            f = min(1.0, p / (-(-p // sms) * sms))
            wi = min(dx_decode_warp_instructions(bk, bm, c["BLOCK_N"], c["num_warps"], min(N, nps), sk > 1,
                                                 prmt=prmt, dv=dv)[0]
                     for c in cfgs)
            plans.append(_plan_times(b["dram"], b["l2"], _issue_s(wi, p, f), f) + ((bk, sk),))
    return plans


def dx_decode_plan_cost(M: int, N: int, K: int, sms: int, elem: int = 2, dv: bool = False) -> tuple[float, int, int]:
    """``(seconds, BLOCK_K, split)`` of the dx-decode launch: of :func:`dx_decode_plans`, the one
    :func:`kernels._cost.robust_pick` takes (*predicted*, seconds at the nominal L2 figure; cached
    as :func:`decode_plan_cost`). ``dv``: the launch that also forms the kept values' gradient."""
    return _dx_decode_pick(int(M), int(N), int(K), int(sms), int(elem), prmt_mode(True) > 0, bool(dv))


@functools.lru_cache(maxsize=4096)
def _dx_decode_pick(M: int, N: int, K: int, sms: int, elem: int, prmt: bool, dv: bool = False) -> tuple[float, int, int]:
    t_nom, _, (bk, sk) = _cost.robust_pick(dx_decode_plans(M, N, K, sms, elem, prmt, dv))
    return t_nom, bk, sk


def _dvalues_seconds(M: int, N: int, K: int, elem: int, sms: int) -> float:
    """Predicted seconds of the kept-value kernel (:func:`sparse24_dvalues`) at its best GPU config,
    counted from the shapes as :func:`decode_plans` counts (bytes: ``g`` once per column tile, ``x``
    once per row tile, the codes and the gradient once; issue by :data:`DV_ISSUE`)."""
    cd = lambda a, b: -(-a // b)
    best = None
    for c in DV_SPACE[1:]:
        bn, bk, bm, nw = c["BLOCK_N"], c["BLOCK_K"], c["BLOCK_M"], c["num_warps"]
        p = cd(N, bn) * cd(K, bk)
        f = min(1.0, p / (cd(p, sms) * sms))
        g_b, x_b, codes, dvb = float(elem) * M * N, float(elem) * M * K, N * K / 8, N * K / 2 * elem
        dram = g_b + x_b + codes + dvb
        l2 = cd(K, bk) * g_b + cd(N, bn) * x_b + codes + dvb
        t = _plan_times(dram, l2, _issue_s(dvalues_warp_instructions(bn, bk, bm, nw, M)[0], p, f), f)[0]
        best = t if best is None else min(best, t)
    return best


def dx_dv_fused_ok(M: int, N: int, K: int, sms: int, elem: int = 2) -> bool:
    """Whether the 2:4 backward at ``M <= DECODE_MAX_M`` tokens forms ``dx`` and the kept values'
    gradient in one launch (:func:`sparse24_dx_decode` with ``dv``): where predicted at least 5 %
    faster than the dx-decode launch and the kept-value kernel apart (``DS_MARGIN``).
    ``FASTFACTOR_SPARSE24_DXDV=0`` keeps the two launches, ``=1`` takes the one wherever it applies."""
    forced = _forced("FASTFACTOR_SPARSE24_DXDV", ("0", "1"))
    if forced == "0" or not 0 < M <= DECODE_MAX_M or min(N, K) <= 0 or K % 4:
        return False
    if forced == "1":
        return True
    apart = dx_decode_plan_cost(M, N, K, sms, elem)[0] + _dvalues_seconds(M, N, K, elem, sms)
    return dx_decode_plan_cost(M, N, K, sms, elem, dv=True)[0] <= DS_MARGIN * apart


def sparse24_dx_decode(g: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                       out_dtype: Optional[torch.dtype] = None, plan: Optional[tuple] = None,
                       db: Optional[torch.Tensor] = None, x: Optional[torch.Tensor] = None,
                       dv: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dx = g·W`` for ``M <= 64`` rows of ``g (M, N)`` in one launch (:func:`dx_decode_plan_cost`;
    ``plan`` forces ``(BLOCK_K, split)``); deterministic (fixed-order reduction of the splits).
    ``db``: an ``(N,)`` contiguous tensor that receives ``Σ_m g[m, :]`` (summed in fp32, rounded
    once), the bias gradient, computed in the same launch (no separate reduction). ``x`` (the
    layer's input, ``(M, K)``) and ``dv`` (an ``(N, K/2)`` tensor): the same launch also stores the
    kept values' gradient, the entries of ``gᵀ·x`` at the kept positions (as
    :func:`sparse24_dvalues`: one product per weight tile over every token, rounded once)."""
    M, N = g.shape
    K = 2 * values.shape[1]
    if M > DECODE_MAX_M:
        raise ValueError(f"g: sparse24_dx_decode takes at most {DECODE_MAX_M} rows, got {M}")
    if (x is None) != (dv is None):
        raise ValueError("x, dv: expected both (the kept values' gradient in the same launch) or neither, "
                         f"got x {'given' if x is not None else 'None'} and dv {'given' if dv is not None else 'None'}")
    if x is not None and (tuple(x.shape) != (M, K) or tuple(dv.shape) != (N, K // 2)):
        raise ValueError(f"x, dv: expected shapes ({M}, {K}) and ({N}, {K // 2}), got {tuple(x.shape)} and "
                         f"{tuple(dv.shape)}")
    dx = torch.empty((M, K), device=g.device, dtype=out_dtype or g.dtype)
    if db is not None and (db.shape != (N,) or not db.is_contiguous()):
        raise ValueError(f"db: expected a contiguous ({N},) tensor, got {tuple(db.shape)}")
    if M == 0 or K == 0 or N == 0:
        if db is not None:
            db.copy_(g.sum(0, dtype=torch.float32))
        if dv is not None:
            dv.zero_()
        return dx if M == 0 or K == 0 else dx.zero_()
    e = 4 if g.dtype == torch.float32 else 2
    bk, sk = plan or dx_decode_plan_cost(M, N, K, _config.num_sms(g.device), e, dv=dv is not None)[1:]
    nps = _dxd_nps(N, sk)
    sk = -(-N // nps)
    bm = max(16, next_pow2(M))
    mt, smr, smc, m32 = _meta_arg(meta, K)
    vt, pairs = _values_arg(values, g.dtype)
    nb = triton.cdiv(K, bk)
    split, sync, ws, cnt = _split_buffers(sk, nb, dx)
    x_arg, dv_arg = (x, dv) if dv is not None else (dx, dx)
    _sp_dx_decode_tuned[(nb * sk,)](
        g, vt, mt, dx, db if db is not None else dx, x_arg, dv_arg, ws, cnt,
        M, N, K, nps, sk,
        g.stride(0), g.stride(1), vt.stride(0), vt.stride(1),
        smr, smc, dx.stride(0), dx.stride(1), x_arg.stride(0), x_arg.stride(1), dv_arg.stride(0), dv_arg.stride(1),
        HAS_DB=db is not None, HAS_DV=dv is not None, SPLIT=split, SYNC=sync, UPCAST=upcast_dots(),
        PRECISION=_precision(g, values), META32=m32, PAIRS=pairs, PRMT=prmt_mode(m32 and pairs),
        MIXED=g.dtype != values.dtype, BLOCK_M=bm, BLOCK_K=bk,
    )
    return dx


def sparse24_dx(
    g: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """``g (M, N) · W`` with ``W (N, K)`` packed; -> ``(M, K)`` in ``out_dtype`` (default ``g``'s).
    ``g`` may be fp32 against fp16 values (the dense-sparse ``dt``)."""
    M, N = g.shape
    K = 2 * values.shape[1]
    dx = torch.empty((M, K), device=g.device, dtype=out_dtype or g.dtype)
    if M == 0 or K == 0:
        return dx
    if N == 0:
        return dx.zero_()
    if M <= DECODE_MAX_M:      # a handful of rows: the weight streamed once, split to fill the SMs
        return sparse24_dx_decode(g, values, meta, out_dtype)
    mt, smr, smc, m32 = _meta_arg(meta, K)
    grid = lambda meta_: (triton.cdiv(M, meta_["BLOCK_M"]), triton.cdiv(K, meta_["BLOCK_K"]))
    _sp_dx_tuned[grid](
        g, values, mt, dx, M, N, K,
        g.stride(0), g.stride(1), values.stride(0), values.stride(1),
        smr, smc, dx.stride(0), dx.stride(1),
        UPCAST=upcast_dots(), PRECISION=_precision(g, values), META32=m32, MIXED=g.dtype != values.dtype,
    )
    return dx


def sparse24_dvalues(
    g: torch.Tensor, x: torch.Tensor, meta: torch.Tensor, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Kept entries of ``gᵀ·x`` (``g (M, N)``, ``x (M, K)``) at ``meta``'s positions: ``(N, K/2)``
    in ``out_dtype`` (default ``g``'s). ``g`` may be fp32 against an fp16 ``x`` (the dense-sparse
    ``dt``)."""
    M, N = g.shape
    K = x.shape[1]
    dv = torch.empty((N, K // 2), device=g.device, dtype=out_dtype or g.dtype)
    if N == 0 or K == 0:
        return dv
    if M == 0:
        return dv.zero_()
    mt, smr, smc, m32 = _meta_arg(meta, K)
    grid = lambda meta_: (triton.cdiv(N, meta_["BLOCK_N"]), triton.cdiv(K, meta_["BLOCK_K"]))
    _sp_dv_tuned[grid](
        g, x, mt, dv, M, N, K,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1),
        smr, smc, dv.stride(0), dv.stride(1),
        UPCAST=upcast_dots(), PRECISION=_precision(g, x), META32=m32, MIXED=g.dtype != x.dtype,
    )
    return dv


# ============================================================================================
# Paths: our kernels, PyTorch's semi-structured GEMM (sparse tensor cores), or expand + cuBLAS
# ============================================================================================

#: Forward rows up to which the triton kernel (weights expanded on chip, bytes-bound) is taken
#: without a cost comparison.
DECODE_MAX_M = 64

#: Kept for compatibility: ``None`` = choose by the cost estimate (:func:`path_costs`); an int
#: restores the old rule "PyTorch's path from this many rows where eligible"
#: (``fastfactor.ops.sparse24.SPARSE24_TORCH_MIN_M`` overrides it per process).
SPARSE24_TORCH_MIN_M = None

# figures of the chooser's roofline: the device figures of the model shared with ``fastfactor sol``
# (kernels/_cost.py: achievable HBM bytes/s, dense bf16 tensor FLOP/s, per-launch floor); a lower
# bound per path, *predicted*, used only to rank the paths
_BW, _RATE, _LAUNCH = _cost.DEFAULT.hbm_bw, _cost.DEFAULT.bf16_rate, _cost.DEFAULT.launch_s
#: share of the tensor-core rate our expand-on-chip Triton kernels are assumed to reach at large M
#: (HMMA tiles, expansion competing for issue slots: the HMMA share of _cost; cuBLAS at the roofline)
_TRITON_EFF = _cost.DEFAULT.hmma_fraction


def _roof(nbytes: float, flops: float, rate: float) -> float:
    return max(nbytes / _BW, flops / rate) + _LAUNCH


def torch24_eligible(M: int, K_in: int, N: int, dtype: torch.dtype, device) -> bool:
    """PyTorch's semi-structured (CUTLASS) GEMM runs ``x (M, K_in) · Wᵀ`` for a 2:4 ``W (N, K_in)``:
    CUDA sm_80+, fp16/bf16, ``N % 32 == 0``, ``K_in % 64 == 0`` (the sparse operand's tile) and
    ``M % 8 == 0`` (the dense operand's, without padding)."""
    return (
        _config.semi_structured_ok(torch.device(device))   # looked up at call time (sol patches it)
        and dtype in (torch.float16, torch.bfloat16)
        and N >= 32 and N % 32 == 0 and K_in >= 64 and K_in % 64 == 0 and M >= 8 and M % 8 == 0
    )


def path_costs(M: int, K_in: int, N: int, dtype: torch.dtype = torch.bfloat16, what: str = "fwd") -> dict:
    """Predicted seconds (a roofline lower bound, see ``_BW``/``_RATE``) of each way to compute
    one product with the 2:4 ``W (N, K_in)`` and ``M`` token rows:

    * ``fwd``: ``y = x·Wᵀ`` -> ``triton`` (:func:`sparse24_mm`), ``dense`` (:func:`expand_24` once,
      then cuBLAS), ``torch`` (PyTorch's semi-structured GEMM: half the products at the dense
      rate, the compressed weight moved once);
    * ``dx``: ``dx = g·W`` -> ``triton`` (:func:`sparse24_dx`) or ``dense``;
    * ``dvalues``: kept entries of ``gᵀ·x`` -> ``triton`` (:func:`sparse24_dvalues`) or ``dense``
      (cuBLAS ``gᵀ·x`` then :func:`compress_24`).
    """
    e = 4 if dtype == torch.float32 else 2
    rate = _RATE / 2 if dtype == torch.float32 else _RATE
    NK = float(N) * K_in
    packed = NK / 2 * e + NK / 8
    flops = 2.0 * M * N * K_in
    act = float(e) * M * (K_in + N)
    expand = _roof(packed + NK * e, 0.0, rate)
    gemm = _roof(act + NK * e, flops, rate)
    if what == "fwd":
        return {
            "triton": _roof(packed + act, flops, rate * _TRITON_EFF),
            "dense": expand + gemm,
            "torch": _roof(packed + act, flops / 2, rate),
        }
    if what == "dx":   # torch: F.linear(g, Wᵀ) with Wᵀ compressed (a gather per step) + dx made contiguous
        gather = _roof(2 * packed + NK / 2 * 8, 0.0, rate)
        return {"triton": _roof(packed + act, flops, rate * _TRITON_EFF), "dense": expand + gemm,
                "torch": gather + _roof(packed + act, flops / 2, rate) + _roof(2.0 * e * M * K_in, 0.0, rate)}
    if what == "dvalues":
        compress = _roof(NK * e + packed, 0.0, rate)
        return {"triton": _roof(act + packed, flops, rate * _TRITON_EFF), "dense": gemm + compress}
    raise ValueError(f"what: expected 'fwd', 'dx' or 'dvalues', got {what!r}")


def _forced(var: str, allowed: tuple) -> str:
    v = os.environ.get(var, "auto")
    if v not in ("auto",) + allowed:
        raise ValueError(f"{var}: expected one of {('auto',) + allowed}, got {v!r}")
    return v


def choose_mm_path(M: int, K_in: int, N: int, dtype: torch.dtype, device, torch_min_m: Optional[int] = None) -> str:
    """``'decode'``, ``'triton'``, ``'dense'`` or ``'torch'`` for a forward of ``x (M, K_in)``
    against a 2:4 ``W (N, K_in)``.

    * ``M <= DECODE_MAX_M``: ``decode`` (:func:`sparse24_decode`: bytes-bound, the compressed
      weight read once, the reduction split to fill the SMs where that pays), unless ``torch`` is
      eligible and predicted faster (:func:`decode_seconds`: the sparse tensor-core decode where
      it takes the shape, else the expanding decode's plan that holds up at the low end of the L2
      figure, against :func:`path_costs`' ideal roofline of PyTorch's GEMM: at 4096²
      it takes every ``M % 8 == 0`` batch; our decode keeps the others, e.g. 1 or 12 tokens);
    * otherwise the cheapest of :func:`path_costs` ``('fwd')`` among the eligible paths:
      ``torch`` (PyTorch's semi-structured GEMM on sparse tensor cores, :func:`torch24_eligible`),
      ``dense`` (expand once, cuBLAS) and ``triton``. The dense path costs the dense GEMM plus one
      expansion, so it is never chosen where cuBLAS on a dense weight would be faster by more
      than that one pass over the weight.

    ``torch_min_m`` (an int) restores the old threshold rule for ``torch``.
    ``FASTFACTOR_SPARSE24_PATH=decode|triton|dense|torch|auto`` forces a choice (``torch`` only
    where eligible, ``decode`` only for ``M <= DECODE_MAX_M``; else the cost rule).
    """
    forced = _forced("FASTFACTOR_SPARSE24_PATH", ("decode", "triton", "dense", "torch"))
    eligible = torch24_eligible(M, K_in, N, dtype, device)
    if forced in ("triton", "dense") or (forced == "decode" and M <= DECODE_MAX_M):
        return forced
    if forced == "torch" and eligible:
        return "torch"
    if torch_min_m is not None and eligible and M >= torch_min_m:
        return "torch"
    if M <= DECODE_MAX_M:
        # PyTorch's semi-structured GEMM where it is predicted faster than our decode launch(es)
        # (priced as an ideal library): never slower than it.
        if eligible and forced != "decode":
            e = 4 if dtype == torch.float32 else 2
            dev = torch.device(device)
            sms = _config.num_sms(dev) if torch.cuda.is_available() else _cost.DEFAULT.sms
            t_decode = decode_seconds(M, N, K_in, sms, e)
            if path_costs(M, K_in, N, dtype, "fwd")["torch"] < t_decode:
                return "torch"
        return "decode"
    costs = path_costs(M, K_in, N, dtype, "fwd")
    if not eligible:
        costs.pop("torch")
    return min(costs, key=costs.get)


def choose_bwd_path(M: int, K_in: int, N: int, dtype: torch.dtype, what: str,
                    transposable_ok: bool = False) -> str:
    """``'triton'``, ``'dense'`` or (``dx`` only) ``'torch'`` for the backward product ``what``
    (``'dx'`` or ``'dvalues'``) of :func:`path_costs`; ``FASTFACTOR_SPARSE24_BWD_PATH=triton|
    dense|torch|auto`` forces one. ``dx = g·W`` runs on sparse tensor cores (``F.linear(g, Wᵀ)``)
    only when ``Wᵀ`` is 2:4 too (a transposable mask, :func:`transpose_plan`) and PyTorch's path
    takes the shape: the caller says so with ``transposable_ok``."""
    forced = _forced("FASTFACTOR_SPARSE24_BWD_PATH", ("triton", "dense", "torch"))
    if forced in ("triton", "dense"):
        return forced
    if forced == "torch" and transposable_ok:
        return "torch"
    if M <= DECODE_MAX_M:
        return "triton"
    costs = path_costs(M, K_in, N, dtype, what)
    if not transposable_ok:
        costs.pop("torch", None)
    return min(costs, key=costs.get)


def cutlass_meta(meta: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """Our codes ``meta (rows, ceil(k/8))`` in PyTorch's CUTLASS layout: ``(rows, k/16)`` int16,
    4 codes per word (our byte pair read little-endian), words scattered into CUTLASS's
    interleaved tile order. Exact; ``rows % 32 == 0``, ``k % 64 == 0``."""
    from torch.sparse._semi_structured_conversions import _calculate_meta_reordering_scatter_offsets

    m = meta.to(torch.int32)
    word = m[:, 0::2] | (m[:, 1::2] << 8)                             # 4 codes per 16-bit word
    word = torch.where(word >= 1 << 15, word - (1 << 16), word).to(torch.int16)
    ncols = word.shape[1]
    offsets = _calculate_meta_reordering_scatter_offsets(rows, ncols, torch.int16, meta.device)
    out = word.new_empty((rows * ncols,))
    out.scatter_(0, offsets, word.reshape(-1))
    return out.view(rows, ncols)


def torch24_meta(meta: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """:func:`cutlass_meta`, cached on the ``meta`` tensor (keyed by its version): the mask is
    fixed while the values train, so this runs once per mask (at pack time for the modules), never
    per step. The kept values need no conversion: ``values`` *is* CUTLASS's compressed matrix."""
    return _cached_on(meta, "_fastfactor_cutlass", (rows, k), lambda: cutlass_meta(meta, rows, k))


def torch24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x·Wᵀ + b`` on PyTorch's semi-structured GEMM (CUTLASS, sparse tensor cores), from our
    packed tensors: ``yᵀ = W·xᵀ`` with ``W`` the sparse operand, so ``y (M, N)`` is returned as
    the transposed view of a contiguous ``(N, M)`` result (strides ``(1, M)``)."""
    N, K = values.shape[0], 2 * values.shape[1]
    mc = torch24_meta(meta, N, K)
    xt = (x if x.stride(-1) == 1 else x.contiguous()).t()
    v = values if values.is_contiguous() else values.contiguous()
    if bias is None:
        yt = torch._sparse_semi_structured_mm(v, mc, xt)
    else:
        yt = torch._sparse_semi_structured_addmm(bias, v, mc, xt)
    return yt.t()


def transpose_plan(meta: torch.Tensor, rows: int, k: int):
    """``(perm, meta_t)`` when the 2:4 pattern of ``W (rows, k)`` (the positions its codes name)
    is 2:4 along the rows as well (a *transposable* mask, as PyTorch's tile pruning and torchao's
    2:4 training produce), else ``None``. ``Wᵀ`` packed is then ``values_t = cat(values.flatten(),
    [0])[perm]`` (``(k, rows/2)``, completion slots read the appended zero) with the codes
    ``meta_t (k, ceil(rows/8))``: one gather per step, the codes once per mask (cached on
    ``meta``, keyed by its version). Lets ``dx = g·W`` run on sparse tensor cores."""
    return _cached_on(meta, "_fastfactor_transpose", (rows, k), lambda: _transpose_plan(meta, rows, k))


def _transpose_plan(meta: torch.Tensor, rows: int, k: int):
    """:func:`transpose_plan` uncached."""
    plan = None
    if rows % 4 == 0 and k % 4 == 0 and rows > 0 and k > 0:
        i0, i1 = _codes(meta, k)                                        # (rows, k/4)
        slot = torch.arange(4, device=meta.device)
        keep = ((slot == i0[..., None]) | (slot == i1[..., None])).reshape(rows, k)
        kt = keep.t().reshape(k, rows // 4, 4)                          # Wᵀ's groups along rows
        if not bool((kt.sum(-1) > 2).any()):
            # flat index into values of every kept entry of W, at its (row, col)
            src = torch.full((rows, k), rows * k // 2, dtype=torch.int64, device=meta.device)
            cols = (torch.stack((i0, i1), -1) + 4 * torch.arange(k // 4, device=meta.device)[None, :, None])
            src.scatter_(1, cols.reshape(rows, k // 2),
                         torch.arange(rows * k // 2, device=meta.device).reshape(rows, k // 2))
            key_t = (~kt).to(torch.int64) * 4 + slot                    # kept first, then by index
            idx = key_t.argsort(dim=-1)[..., :2].sort(dim=-1).values % 4   # (k, rows/4, 2)
            col_t = idx + 4 * torch.arange(rows // 4, device=meta.device)[None, :, None]
            perm = src.t().gather(1, col_t.reshape(k, rows // 2)).reshape(-1).to(torch.int32)
            code = idx[..., 0] | (idx[..., 1] << 2)
            if code.shape[1] % 2:
                code = torch.cat((code, code.new_zeros((k, 1))), dim=1)
            meta_t = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8).contiguous()
            plan = (perm, meta_t)
    return plan


def transposed_values(values: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``Wᵀ``'s packed values ``(k, rows/2)`` from ``W``'s (:func:`transpose_plan`)."""
    flat = torch.cat((values.reshape(-1), values.new_zeros(1)))
    k = perm.numel() * 2 // values.shape[0]
    return flat[perm.long()].view(k, values.shape[0] // 2)


def sparse24_forward(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, path: Optional[str] = None) -> torch.Tensor:
    """Forward launcher: ``y = x·Wᵀ + b`` by :func:`choose_mm_path` (``path`` forces one)."""
    M, K = x.shape
    N = values.shape[0]
    path = path or choose_mm_path(M, K, N, x.dtype, x.device)
    if path == "torch":
        return torch24_linear(x, values, meta, bias)
    if path == "dense":
        return torch.nn.functional.linear(x, expand_24(values, meta), bias)
    if path == "decode" and M <= DECODE_MAX_M:
        return sparse24_decode(x, values, meta, bias)
    return sparse24_mm(x, values, meta, bias)


def sparse24_backward(g, x, values, meta, need_x: bool, need_values: bool, need_bias: bool = False):
    """Backward launcher: ``(dx, dvalues)`` (``None`` where not needed), each by
    :func:`choose_bwd_path`: ``dx = g·W`` with ``W`` expanded once and cuBLAS, or
    :func:`sparse24_dx`; the kept entries of ``gᵀ·x`` from cuBLAS + :func:`compress_24`, or
    :func:`sparse24_dvalues`. Exact selections either way: the kept values' gradient is the
    dense gradient at the kept positions, rounded once.

    ``need_bias``: returns ``(dx, dvalues, db)`` with ``db = Σ_m g[m, :]`` (fp32 sum rounded
    once to ``g``'s dtype); at decode sizes it comes out of the dx launch itself
    (:func:`sparse24_dx_decode`), else from one reduction."""
    M, N = g.shape
    K = x.shape[1]
    dx = dv = db = None
    # at a handful of tokens dx and the kept values' gradient from one launch where predicted faster
    fuse_dv = (need_x and need_values and x.dtype == values.dtype and M > 0
               and choose_bwd_path(M, K, N, g.dtype, "dvalues") == "triton"
               and dx_dv_fused_ok(M, N, K, _config.num_sms(g.device), 4 if g.dtype == torch.float32 else 2))
    if need_x:
        tp = None
        if M > 0 and torch24_eligible(M, N, K, g.dtype, g.device) and g.dtype == values.dtype:
            tp = transpose_plan(meta, N, K)                   # cached per mask
        path = choose_bwd_path(M, K, N, g.dtype, "dx", tp is not None) if M > 0 else "triton"
        if path == "torch":                                   # dx = g·W = F.linear(g, Wᵀ), Wᵀ 2:4
            dx = torch24_linear(g, transposed_values(values, tp[0]), tp[1]).contiguous()
        elif path == "dense":
            dx = torch.mm(g, expand_24(values, meta, out_dtype=g.dtype))
        elif 0 < M <= DECODE_MAX_M and (need_bias or fuse_dv):   # db (and dv) out of the same launch
            db = torch.empty(N, device=g.device, dtype=g.dtype) if need_bias else None
            if fuse_dv:
                dv = torch.empty((N, K // 2), device=g.device, dtype=values.dtype)
            dx = sparse24_dx_decode(g, values, meta, db=db, x=x if fuse_dv else None, dv=dv)
        else:
            dx = sparse24_dx(g, values, meta)
    if need_bias and db is None:
        db = g.sum(0, dtype=torch.float32).to(g.dtype)
    if need_values and dv is None:
        if M > 0 and choose_bwd_path(M, K, N, g.dtype, "dvalues") == "dense":
            dv = compress_24(torch.mm(g.t(), x), meta, out_dtype=values.dtype)
        else:
            dv = sparse24_dvalues(g, x, meta, out_dtype=values.dtype)
    return (dx, dv, db) if need_bias else (dx, dv)


# ============================================================================================
# Dense-sparse: paths chosen by the shared cost model
# ============================================================================================
#
# y = (x·Sᵀ)·Dᵀ + b, x (M, K), S (R, K) 2:4, D (N, R). Paths:
#
# * ``library``: t = x·Sᵀ by sparse24's own dispatch (:func:`choose_mm_path` on ``S``: PyTorch's
#   semi-structured CUTLASS GEMM where eligible, the decode kernel at a handful of rows, else
#   expand once + cuBLAS), or ``torch_pad``: ``S`` padded with zero rows to a multiple of 32 so
#   that PyTorch's GEMM takes it (codes padded once per mask, values per call); then
#   ``y = F.linear(t, D, b)`` (cuBLAS). Backward: ``dt = g·D``, ``dD = gᵀ·t`` on cuBLAS, ``db`` a
#   library sum, ``dx = dt·S`` and ``dSv = kept(dtᵀ·x)`` by :func:`sparse24_backward` (its own
#   cost dispatch; the kept values' gradient is the exact selection of the dense one).
# * ``fused``: :func:`ds_chain`, ``t`` in registers (``R_PAD <= 256``), one launch.
# * ``two_kernel``: our sparse24 kernels and the low-rank family's Triton GEMM (forced only, and
#   fp16, whose fp32 intermediate cuBLAS cannot take: there is no fp32 x fp16 GEMM). For fp16 at
#   ``M <= 64`` tokens it is priced (:func:`ds_two_kernel_seconds`, a lower bound: its GEMM as
#   ideal cuBLAS) and stands where the library path stands for bf16: the one-launch paths are
#   taken where predicted >= 5 % faster (H200, predicted: 4096², rank 256, 16 tokens, fp16: was
#   the fused kernel, 35.7 µs; two-kernel >= 5.95; now the two roles, 3.61).
#
# The library path is priced by the model ``fastfactor sol`` applies (kernels/_cost.py: cuBLAS and
# PyTorch's 2:4 GEMM ideal, our launches by their bytes/FLOPs and fill); the fused kernel is taken
# only where predicted at least 5 % faster (DS_MARGIN), so a dense-sparse layer is never predicted
# slower than its two-library-products alternative. The two-kernel path is not a candidate: in
# that model our GEMMs (the same bytes and FLOPs, more launches) never beat ideal cuBLAS.
#
# * ``rank_split``: :func:`ds_rank_split`, ``M <= 64`` tokens, any rank, one launch (each program a
#   chunk of ``t`` whole and its share of ``y``, the chunks' partials summed in the launch). Priced
#   by :func:`ds_rank_split_plans` and taken like ``fused`` (at least 5 % faster than the library
#   path; the cheaper of the two where both are). H200, bf16, predicted (library / rank split):
#   768x3072 rank 168, 16 tokens 5.70 / 3.64 us (dense cuBLAS 3.63), 1 token 5.68 / 3.22;
#   rank 336, 16 tokens 5.89 / 4.03; 3072x768 rank 472, 8 tokens 5.79 / 4.50; at 64 tokens or at
#   4096² (every program reads x, each column tile all of S) it loses. Since the two roles split
#   their producers over K it is the cheapest only where the rank is a large share of a square
#   layer at a few tokens (768², rank 192-256, 1-16 tokens; since the consumers load their first
#   step of D before waiting (PREFETCH), rank 256 from 1 to 8 tokens).
# * ``roles``: :func:`ds_roles`, ``M <= 64`` tokens, any rank, one launch of two roles (producers
#   form t chunk by chunk, each rank chunk over ``KS`` K splits whose fp32 partials its last
#   arrival sums in a fixed order; consumers wait for them by ticket order and multiply t by their
#   tile of D). Priced by :func:`ds_roles_plans` with the phases in sequence
#   (:func:`roles_phase_seconds`: each phase at its programs' share of the device) and taken like
#   the others. H200, bf16, predicted (library / rank split / roles unsplit / roles): 768x3072
#   rank 168, 16 tokens 5.70 / 3.64 / 3.47 / 3.24 us (dense cuBLAS 3.63), 64 tokens 5.99 / 7.76 /
#   4.70 / 3.46 (dense 3.71); rank 336, 16 tokens 5.89 / 4.03 / 3.80 / 3.57, 64 tokens 6.24 / 8.27
#   / 5.18 / 3.93; 3072x768 rank 168, 16 tokens 5.50 / 4.86 / - / 3.41; 4096² rank 655, 16 tokens
#   7.12 / 19.2 / - / 4.65. Unsplit, each producer's slab of S and its read of x were as long as
#   K (all of x per producer, at one SM's share): the split makes the two roles the pick from 1 to
#   64 tokens on every shape but the square high-rank one above.
#
# Beyond the rank split, ranks above 256 take the library path: neither the fusion extended past
# rank 256 (the intermediate in shared memory, :func:`ds_chain_seconds` with ``any_rank``) nor a
# two-launch path with a split reduction at a handful of rows (:func:`ds_two_phase_seconds`) is
# predicted faster (H200, bf16, predicted; library with sparse24's one-launch decode kernel):
#
#   shape, rank     M       library   two-phase   fused (any rank)
#   4096², 655      16      7.1 us    8.5 us      56 us
#   4096², 655      64      8.3       15.2        56
#   4096², 655      16384   177       -           361
#   4096², 1310     16      9.0       10.6        108
#   4096², 1310     64      10.1      20.2        108
#   768x3072, 336   16      5.7       6.3         8.9
#   768x3072, 336   64      6.2       8.4         8.9
#
# At a handful of rows the fused grid must split the N tiles over the SMs, each split re-reading
# all of S (the fusion's cost grows with the rank); the two-phase path saves no launch over the
# one-launch decode + cuBLAS, and its second phase re-reads the fp32 partials once per N tile where
# cuBLAS reads t once. At many rows both products are compute-bound and PyTorch's 2:4 GEMM halves
# the first one's FLOPs, which no Triton kernel can (tests/sparse24/test_ds_dispatch.py checks
# these comparisons).

DS_PATHS = ("library", "fused", "rank_split", "roles", "two_kernel")

#: the fused kernel is chosen only when predicted at least this much faster (``t_fused <=
#: DS_MARGIN·t_library``): the analytic counts of :func:`ds_chain_seconds` and the interpreter's of
#: ``fastfactor sol`` agree to some per cent (tests/sparse24/test_ds_dispatch.py), not exactly
DS_MARGIN = 0.95

#: the padded rank multiple PyTorch's semi-structured GEMM takes for the sparse operand's rows
_TORCH24_ROWS = 32


def _ds_elem(dtype) -> int:
    return 4 if dtype == torch.float32 else 2


def _ds_sms(device) -> int:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return _config.num_sms(dev)
    return _cost.DEFAULT.sms


def ds_library_ok(dtype) -> bool:
    """The library path takes bf16 and fp32 (the intermediate in the input dtype); fp16 keeps its
    intermediate in fp32 (range), which cuBLAS cannot multiply with an fp16 operand."""
    return dtype in (torch.bfloat16, torch.float32)


def _s_path_seconds(M: int, K: int, R: int, dtype, path: str, sms: int) -> float:
    """Predicted seconds of ``t = x·Sᵀ`` on sparse24's ``path`` (the figures its chooser ranks by)."""
    if path == "decode":   # t in the input dtype but for fp16 (fp32 there: the expanding decode)
        return decode_seconds(M, R, K, sms, _ds_elem(dtype), same_dtype=dtype != torch.float16)
    return path_costs(M, K, R, dtype, "fwd")[path]


def _pad_seconds(R: int, K: int, dtype) -> float:
    """The per-call copy of ``S``'s values into the zero-padded buffer of ``torch_pad``."""
    r32 = -(-R // _TORCH24_ROWS) * _TORCH24_ROWS
    e = _ds_elem(dtype)
    return _roof(float(R + r32) * (K // 2) * e, 0.0, _RATE)


def _library_only(costs: dict, torch_ok: bool) -> str:
    """The cheaper of ``dense`` (expand once + cuBLAS) and ``torch`` (where ``torch_ok``) in
    sparse24's ``costs``: the dense-sparse library path keeps the products of ``S`` on library
    GEMMs above the decode sizes. (sparse24's roofline prices its Triton GEMMs at 0.6 of the
    tensor rate with every operand moved once; the exact counts ``fastfactor sol`` models add
    their L2 re-reads: at 768x3072, rank 168, M = 16384 it chose ``dvalues`` at 11.4 us
    predicted where sol counts 55.7 us, and the row fell to 0.87x its unfused path.)"""
    keep = {p: c for p, c in costs.items() if p == "dense" or (p == "torch" and torch_ok)}
    return min(keep, key=keep.get)


def ds_bwd_sparse_paths(M: int, K: int, R: int, dtype, transposable_ok: bool = False) -> tuple:
    """``(dx path, dvalues path)`` of the dense-sparse library backward's products with ``S (R,
    K)`` (``dx = dt·S``, ``dSv = kept(dtᵀ·x)``): sparse24's :func:`choose_bwd_path`, its Triton
    kernels kept only at decode sizes (``M <= DECODE_MAX_M``) or where
    ``FASTFACTOR_SPARSE24_BWD_PATH`` forces them; above, the cheaper library path
    (:func:`_library_only`)."""
    forced = _forced("FASTFACTOR_SPARSE24_BWD_PATH", ("triton", "dense", "torch")) != "auto"
    out = []
    for what, tok in (("dx", transposable_ok), ("dvalues", False)):
        p = choose_bwd_path(M, K, R, dtype, what, tok)
        if p == "triton" and not forced and M > DECODE_MAX_M:
            p = _library_only(path_costs(M, K, R, dtype, what), tok)
        out.append(p)
    return tuple(out)


def _t_copy_seconds(M: int, R: int, dtype) -> float:
    """The contiguous copy of a saved ``t`` that PyTorch's 2:4 GEMM returned transposed."""
    return _roof(2.0 * M * R * _ds_elem(dtype), 0.0, _RATE)


def ds_s_plan(M: int, K: int, R: int, dtype, device, save_t: bool = False) -> tuple:
    """``(path, predicted seconds)`` of the dense-sparse ``t = x·Sᵀ`` (``S (R, K)``): sparse24's
    own choice (:func:`choose_mm_path`) and its cost, or ``'torch_pad'`` (``S`` zero-padded to
    ``ceil(R/32)·32`` rows so that PyTorch's semi-structured GEMM takes it) where that is eligible
    and predicted faster, the per-call copy of the values included. ``save_t``: ``t`` is kept for
    the backward, so PyTorch's transposed result costs a contiguous copy (:func:`_t_copy_seconds`)
    and expanding ``S`` once + cuBLAS is taken where that makes it cheaper."""
    path = choose_mm_path(M, K, R, dtype, device)
    forced = _forced("FASTFACTOR_SPARSE24_PATH", ("decode", "triton", "dense", "torch")) != "auto"
    pc = path_costs(M, K, R, dtype, "fwd")
    if path == "triton" and not forced:
        path = _library_only(pc, torch24_eligible(M, K, R, dtype, device))
    copy = _t_copy_seconds(M, R, dtype) if save_t else 0.0
    cost = _s_path_seconds(M, K, R, dtype, path, _ds_sms(device)) + (copy if path == "torch" else 0.0)
    if forced:
        return path, cost
    if path == "torch" and save_t and pc["dense"] < cost:
        path, cost = "dense", pc["dense"]
    r32 = -(-R // _TORCH24_ROWS) * _TORCH24_ROWS
    if path != "torch" and r32 != R and torch24_eligible(M, K, r32, dtype, device):
        pad = path_costs(M, K, r32, dtype, "fwd")["torch"] + _pad_seconds(R, K, dtype) + copy
        if pad < cost:
            return "torch_pad", pad
    return path, cost


def _gemm_seconds(M: int, N: int, K: int, ea: int, eb: int, ec: int, bias: bool, dtype) -> float:
    """A cuBLAS product ``(M, K)·(K, N)`` at the roofline (kernels/_cost.py ``library_seconds``)."""
    nbytes = float(M) * K * ea + float(K) * N * eb + float(M) * N * ec + (N * ec if bias else 0)
    dt = "fp32" if dtype == torch.float32 else "bf16"
    return _cost.library_seconds(nbytes, 2.0 * M * N * K, _cost.DEFAULT, dt)["seconds"]


def ds_chain_seconds(M: int, K: int, N: int, R: int, dtype=torch.bfloat16, bias: bool = True,
                     save_t: bool = False, sms: Optional[int] = None, any_rank: bool = False) -> Optional[float]:
    """Predicted seconds of :func:`ds_chain` at its best fitting config (``None`` above the rank
    limit; ``any_rank``: the same kernel at any rank with every config of ``DS_SPACE``, the
    intermediate in shared memory, registers ignored: a lower bound for extending the fusion past
    rank 256), counted from the shapes the way ``fastfactor sol`` counts the launch: grid
    (:func:`row_block_grid`) ``mb = ceil(M/BLOCK_M)`` row blocks x ``split`` shares of the ``N``
    tiles; every program streams the packed ``S`` (values + codes) and its ``x`` rows, each row
    block all of ``D``; ``y`` (and ``t``) stored once; issued FLOPs on the padded tiles (``R_PAD``
    rows, the first product once per program), HGMMA when the smaller dot M (``min(R_PAD,
    BLOCK_N)``) is >= 64 with 4k warps; then ``kernels/_cost.py`` ``kernel_seconds``."""
    rp = _pad_rank(R)
    if rp > FUSED_MAX_R and not any_rank:
        return None
    dev = _cost.DEFAULT if not sms or sms == _cost.DEFAULT.sms else dataclasses.replace(_cost.DEFAULT, sms=int(sms))
    e = _ds_elem(dtype)
    te = 4 if dtype == torch.float16 else e
    dt = {torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, "bf16")
    cd = lambda a, b: -(-a // b)
    best = None
    for c in (DS_SPACE if any_rank else ds_space(rp)):
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        mb, nt = cd(M, bm), cd(N, bn)
        split = max(1, min(nt, (2 * dev.sms) // mb))
        split = cd(nt, cd(nt, split))
        tpp = cd(nt, split)
        P = mb * split
        x_size, s_size, d_size = float(M) * K * e, R * (K // 2) * e + R * cd(K, 8), float(N) * R * e
        x_load, s_load, d_load = x_size * split, s_size * P, d_size * mb
        y, t = float(M) * N * e, (float(M) * R * te if save_t else 0.0)
        bl = N * e * mb if bias else 0.0
        dram = (_cost.dram_bytes(x_load, x_size, x_size, 0, dev) + _cost.dram_bytes(s_load, s_size, s_size, 0, dev)
                + _cost.dram_bytes(d_load, d_size, d_size, 0, dev) + y + t
                + _cost.dram_bytes(bl, N * e, N * e, 0, dev))
        # the codes of a (row, BLOCK_K) step are BLOCK_K/8 contiguous bytes: a 32-byte sector each
        meta_sectors = R * cd(K, 8) * P * (32.0 / min(32, bk // 8) - 1.0)
        l2 = x_load + s_load + d_load + y + t + bl + meta_sectors
        issued = 2.0 * bm * rp * (cd(K, bk) * bk + tpp * bn) * P
        hg = min(rp, bn) >= 64 and c["num_warps"] % 4 == 0
        s = _cost.kernel_seconds(dram, l2, issued, P, dev, hg, dt)["seconds"]
        best = s if best is None else min(best, s)
    return best


def ds_two_phase_seconds(M: int, K: int, N: int, R: int, dtype=torch.bfloat16, bias: bool = True,
                         sms: Optional[int] = None) -> float:
    """Lower bound (the same model) of the two-phase path with a split reduction for a handful
    of rows and any rank, *not built*: phase 1 writes the fp32 partials of ``t = x·Sᵀ`` over
    ``split`` K chunks (row tiles of ``S`` x splits; ``S`` once from DRAM, ``x`` once per row tile
    from L2); phase 2 (one program per ``BLOCK_N`` columns of ``y``) sums the partials in a fixed
    order, rounds ``t`` and multiplies by its ``D`` tile, adding the bias: every program reads all
    partials (from L2). Best over row tiles 16-128, splits 1-16, ``BLOCK_N`` 32-128. Against the
    library path it saves at most the launch that reduces the decode kernel's partials, and pays
    the partials' re-reads in phase 2 (cuBLAS reads ``t`` once)."""
    dev = _cost.DEFAULT if not sms or sms == _cost.DEFAULT.sms else dataclasses.replace(_cost.DEFAULT, sms=int(sms))
    e = _ds_elem(dtype)
    dt = {torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, "bf16")
    cd = lambda a, b: -(-a // b)
    s_b, x_b, y_b, d_b = R * K * (e / 2 + 1 / 8), float(e) * M * K, float(e) * M * N, float(N) * R * e
    bl = N * e if bias else 0.0
    best = None
    for bn1 in (16, 32, 64, 128):
        nb = cd(R, bn1)
        for sk in (1, 2, 3, 4, 6, 8, 12, 16):
            ws = 4.0 * sk * M * R
            t1 = _cost.kernel_seconds(s_b + x_b + ws, s_b + nb * x_b + ws, 2.0 * max(16, M) * R * K,
                                      nb * sk, dev, False, dt)["seconds"]
            for bn2 in (32, 64, 128):
                p2 = cd(N, bn2)
                t2 = _cost.kernel_seconds(ws + d_b + y_b + bl, p2 * ws + d_b + y_b + p2 * bl,
                                          2.0 * max(16, M) * R * N, p2, dev, False, dt)["seconds"]
                best = t1 + t2 if best is None else min(best, t1 + t2)
    return best


def _ds_one_launch_plans(M: int, K: int, N: int, R: int, dtype, sms: Optional[int], partials: bool):
    """The terms the two one-launch dense-sparse planners share (:func:`ds_rank_split_plans`,
    :func:`ds_roles_plans`): yields ``(terms, BLOCK_R, BLOCK_N, wi)`` for every rank chunk
    ``BLOCK_R`` of :data:`RS_CHUNKS` and column tile ``BLOCK_N`` of :data:`RS_TILES` with a fitting
    config; ``wi`` is the first product's warp instructions by the decode kernel's model
    (:data:`DECODE_ISSUE`, masked loads; with fp32 partials where ``partials`` and more than one
    chunk), the fitting config that issues least (a function: ``wi()`` over all of ``K``, ``wi(k,
    split)`` over ``k`` inputs with or without the split's epilogue). ``terms``: the device at the nominal L2 figure and
    at its low end (``dev``, ``low``), element bytes of the inputs and of ``t`` (``e``, ``te``), the
    rate's dtype (``dt``), the padded rows (``bm``) and the bytes of ``S`` (values + codes), ``D``,
    ``x``, ``y`` and the bias (``s_b``, ``d_b``, ``x_b``, ``y_b``, ``b_b``: bias bytes for a bias)."""
    dev = _cost.DEFAULT if not sms or sms == _cost.DEFAULT.sms else dataclasses.replace(_cost.DEFAULT, sms=int(sms))
    e = _ds_elem(dtype)
    terms = dict(dev=dev, low=dataclasses.replace(dev, l2_bw=dev.l2_bw_low), e=e,
                 te=4 if dtype == torch.float16 else e,
                 dt={torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, "bf16"),
                 bm=max(16, next_pow2(M)), s_b=R * K * (e / 2 + 1 / 8), d_b=float(N) * R * e,
                 x_b=float(e) * M * K, y_b=float(e) * M * N, b_b=N * e)
    prmt = prmt_mode(True) > 0
    for br in RS_CHUNKS:
        split = partials and -(-R // br) > 1
        for bn in RS_TILES:
            cfgs = rs_space(br, bn, terms["bm"])
            if not cfgs:
                continue

            def wi(k: int = K, split: bool = split, cfgs=cfgs, br=br) -> float:
                """The first product's warp instructions over ``k`` inputs (configs whose step
                divides ``k`` where ``k < K``: a K split's), the fitting config that issues least."""
                ok = [c for c in cfgs if k >= K or k % c["BLOCK_K"] == 0] or cfgs
                return min(decode_warp_instructions(br, terms["bm"], c["BLOCK_K"], c["num_warps"], k, split,
                                                    prmt=prmt and br * c["BLOCK_K"] >= PRMT_MIN_TILE, even=False)[0]
                           for c in ok)
            yield terms, br, bn, wi


def ds_rank_split_plans(M: int, K: int, N: int, R: int, dtype=torch.bfloat16, bias: bool = True,
                        save_t: bool = False, sms: Optional[int] = None) -> list:
    """Every plan of the rank-split launch (:func:`ds_rank_split`) at ``M <= DECODE_MAX_M`` tokens:
    ``(t_nominal, t_low, (BLOCK_R, BLOCK_N))``, seconds at the nominal L2 figure and at its low end,
    counted from the shapes as ``fastfactor sol`` counts the launch (*predicted*)::

        t = max(DRAM bytes / HBM, L2 bytes / (L2 bandwidth · fill), tensor FLOPs / rate, issue) + floor

    ``ch = ceil(R / BLOCK_R)`` chunks x ``nt = ceil(N / BLOCK_N)`` column tiles = programs. DRAM:
    ``S`` (values + codes), ``D``, ``x``, ``y``, the bias and ``t`` (``save_t``) once, the fp32
    partials stored (``ch·M·N·4`` with more than one chunk; their reads are L2 hits, written moments
    before in the same launch). L2: ``S`` once per column tile, ``x`` once per program, the partials
    stored and the other ``ch - 1`` read back by each tile's reducer. Issue: the first product's
    loop by the decode kernel's model (:data:`DECODE_ISSUE`, masked loads: it is the same loop
    over ``BLOCK_R`` rows), the fitting config that issues least."""
    cd = lambda a, b: -(-a // b)
    plans = []
    for T, br, bn, wi in _ds_one_launch_plans(M, K, N, R, dtype, sms, partials=True):
        ch, nt = cd(R, br), cd(N, bn)
        P = ch * nt
        s_b, d_b, x_b, y_b = T["s_b"], T["d_b"], T["x_b"], T["y_b"]
        t_b, b_b = (float(T["te"]) * M * R if save_t else 0.0), (T["b_b"] if bias else 0.0)
        ws = 4.0 * ch * M * N if ch > 1 else 0.0
        dram = s_b + d_b + x_b + y_b + t_b + b_b + ws
        l2 = nt * s_b + d_b + P * x_b + y_b + t_b + b_b + ws + ws * (ch - 1) / ch
        flops = 2.0 * T["bm"] * (br * cd(K, 128) * 128 + bn * br) * P
        dev = T["dev"]
        issue = _issue_s(wi(), P, min(1.0, P / (cd(P, dev.sms) * dev.sms)))
        times = tuple(max(_cost.kernel_seconds(dram, l2, flops, P, d, br >= 64, T["dt"])["seconds"], issue + d.launch_s)
                      for d in (dev, T["low"]))
        plans.append(times + ((br, bn),))
    return plans


def ds_rank_split_cost(M: int, K: int, N: int, R: int, dtype=torch.bfloat16, bias: bool = True,
                       save_t: bool = False, sms: Optional[int] = None) -> Optional[tuple]:
    """``(seconds, BLOCK_R, BLOCK_N)`` of the rank-split launch: of :func:`ds_rank_split_plans`, the
    one :func:`kernels._cost.robust_pick` takes (seconds at the nominal L2 figure); ``None`` above
    ``DECODE_MAX_M`` tokens (a handful of rows only: its ``x`` is read by every program)."""
    if M > DECODE_MAX_M or min(M, K, N, R) <= 0:
        return None
    return _rs_pick(int(M), int(K), int(N), int(R), dtype, bool(bias), bool(save_t), sms and int(sms),
                    prmt_mode(True) > 0)


@functools.lru_cache(maxsize=4096)
def _rs_pick(M, K, N, R, dtype, bias, save_t, sms, prmt) -> Optional[tuple]:
    plans = ds_rank_split_plans(M, K, N, R, dtype, bias, save_t, sms)
    if not plans:
        return None
    t_nom, _, (br, bn) = _cost.robust_pick(plans)
    return t_nom, br, bn


def ds_roles_plans(M: int, K: int, N: int, R: int, dtype=torch.bfloat16, bias: bool = True,
                   save_t: bool = False, sms: Optional[int] = None, k_split: bool = True,
                   prefetch: bool = True) -> list:
    """Every plan of the two-role launch (:func:`ds_roles`) at ``M <= DECODE_MAX_M`` tokens:
    ``(t_nominal, t_low, (BLOCK_R, BLOCK_N, KS))``, seconds at the nominal L2 figure and at its low
    end, counted from the shapes as ``fastfactor sol`` counts the launch (*predicted*; the terms of
    :func:`ds_rank_split_plans`).

    ``n0 = ceil(R / BLOCK_R)`` rank chunks of ``KS`` producers each (:data:`ROLES_SPLITS`, split as
    :func:`roles_k_split`; one without ``k_split``) + ``n1 = ceil(N / BLOCK_N)`` consumers = programs
    (their first step of ``D`` prefetched where :func:`roles_prefetch` allows, never without ``prefetch``). DRAM: ``S``, ``x``,
    ``D``, ``y``, the bias and ``t`` (stored by the chunks' last producers; the consumers' reads of
    it are L2 hits, written moments before in the same launch) once, and with a split the fp32
    partials stored (``KS·M·R·4``; read back from L2 by each chunk's last arrival). L2: ``x`` once
    per chunk (each producer its split's columns), ``t`` once per consumer, the partials stored and
    ``KS - 1`` of them read back, the rest once. Issue: the producers' loop over their split by the
    decode kernel's model (:data:`DECODE_ISSUE`, masked loads), the fitting config that issues least.

    The consumers wait for the last producer, so the two phases also run in sequence: a fifth
    term, ``phase(producers) + phase(consumers)`` (:func:`roles_phase_seconds`; the consumers'
    first step of ``D`` read during the first: :func:`roles_prefetch`), each phase's bytes
    (and the producers' issue) at the share of the device its programs occupy (``n / SMs`` of HBM,
    L2 and issue: a program draws no more than its SM's share, conservative where the others
    idle). The K split exists for this term: at 64 tokens the 11 producers of a rank-168 chunking
    each read all of ``x`` at one SM's share; split 6 ways, 66 producers share that read.
    ``fastfactor sol`` prices the launch without it (its generic terms); the dispatcher takes the
    larger."""
    cd = lambda a, b: -(-a // b)
    plans, seen = [], set()
    for T, br, bn, wi in _ds_one_launch_plans(M, K, N, R, dtype, sms, partials=False):
        n0, n1 = cd(R, br), cd(N, bn)
        e, te = T["e"], T["te"]
        s_b, d_b, x_b, y_b = T["s_b"], T["d_b"], T["x_b"], T["y_b"]
        t_b, b_b = float(te) * M * R, (T["b_b"] if bias else 0.0)
        bc = roles_rank_step(R, br, bn, T["bm"])
        pre = bc if roles_prefetch(bn, bc, T["bm"], e, prefetch) else 0
        for ks_asked in (ROLES_SPLITS if k_split else (1,)):
            ks, kps = roles_k_split(K, ks_asked)
            if (br, bn, ks) in seen:
                continue
            seen.add((br, bn, ks))
            P = n0 * ks + n1
            ws = 4.0 * ks * M * R if ks > 1 else 0.0
            dram = s_b + d_b + x_b + y_b + t_b + b_b + ws
            l2 = s_b + d_b + n0 * x_b + y_b + t_b * (1 + n1) + b_b + ws + ws * (ks - 1) / ks
            flops = 2.0 * T["bm"] * (br * cd(kps, 128) * 128 * n0 * ks + bn * n0 * br * n1)
            w = wi(kps, ks > 1)
            dev = T["dev"]
            issue = _issue_s(w, n0 * ks, min(1.0, P / (cd(P, dev.sms) * dev.sms)))
            times = tuple(max(_cost.kernel_seconds(dram, l2, flops, P, d, False, T["dt"])["seconds"],
                              issue + d.launch_s,
                              roles_phase_seconds(d, M, K, N, R, br, bn, e, te, bias, w, ks, pre) + d.launch_s)
                          for d in (dev, T["low"]))
            plans.append(times + ((br, bn, ks),))
    return plans


def roles_phase_seconds(dev, M: int, K: int, N: int, R: int, BLOCK_R: int, BLOCK_N: int, elem: int, t_elem: int,
                        bias: bool, producer_warp_instructions: float, ks: int = 1, pre_ranks: int = 0) -> float:
    """Seconds of the two-role launch's phases in sequence (:func:`ds_roles_plans`; its
    :data:`kernels._cost.PHASE_MODELS` entry): the ``n0·ks`` producers (``S`` once, ``x`` once per
    rank chunk, the split partials stored and read back, ``t`` stored, their issue:
    ``producer_warp_instructions`` each), then the consumers (``D``, ``y`` and the bias once, ``t``
    once each), each phase's DRAM and L2 bytes and issue at the share of the device its programs'
    SMs hold (``n / SMs``).

    ``pre_ranks``: the ranks of ``D`` each consumer loads before it waits (``BLOCK_C`` with
    ``PREFETCH``, :func:`roles_prefetch`): those bytes move in the first phase, at the consumers' share,
    beside the producers' (the two groups' bytes together at most at the whole device's rates),
    and leave the second."""
    cd = lambda a, b: -(-a // b)
    n0, n1 = cd(R, BLOCK_R), cd(N, BLOCK_N)
    s_b, x_b, t_b = R * K * (elem / 2 + 1 / 8), float(elem) * M * K, float(t_elem) * M * R
    ws = 4.0 * ks * M * R if ks > 1 else 0.0
    d_pre = float(N) * min(R, pre_ranks) * elem
    rest = float(N) * R * elem - d_pre + float(elem) * M * N + (N * elem if bias else 0.0)

    def phase(n, dram, l2, issue=0.0):
        share = min(1.0, n / dev.sms)
        return max(dram / (dev.hbm_bw * share), l2 / (dev.l2_bw * share),
                   _cost.issue_seconds(issue * n, dev, share) if issue else 0.0)
    p_dram, p_l2 = s_b + x_b + t_b + ws, s_b + n0 * x_b + t_b + ws * (2 * ks - 1) / ks
    first = phase(n0 * ks, p_dram, p_l2, producer_warp_instructions)
    if d_pre:
        first = max(first, phase(n1, d_pre, d_pre), phase(dev.sms, p_dram + d_pre, p_l2 + d_pre))
    return first + phase(n1, rest, rest + n1 * t_b)


def _roles_phase_model(ints: dict, constexprs: dict, config: dict, device, dtype: str) -> Optional[float]:
    """:data:`kernels._cost.PHASE_MODELS` entry of the two-role launch (:func:`roles_phase_seconds`)."""
    e = 4 if dtype == "fp32" else 2
    te = 4 if constexprs.get("T_FP32") else e
    br, bn, bm = int(constexprs["BLOCK_R"]), int(constexprs["BLOCK_N"]), int(constexprs["BLOCK_M"])
    bk, nw = int(config["BLOCK_K"]), int(config.get("num_warps", 4))
    K = int(ints["K"])
    ks = int(ints.get("KS", 1))
    kps = min(K, int(ints.get("K_PER_SPLIT", K)))
    wi = decode_warp_instructions(br, bm, bk, nw, kps, ks > 1,
                                  prmt=int(constexprs.get("PRMT", 0)) > 0 and br * bk >= PRMT_MIN_TILE, even=False)[0]
    pre = int(constexprs.get("BLOCK_C") or 0) if constexprs.get("PREFETCH") else 0
    return roles_phase_seconds(device, int(ints["M"]), K, int(ints["N"]), int(ints["R"]), br, bn, e, te,
                               bool(constexprs.get("HAS_BIAS")), wi, ks, pre)


_cost.PHASE_MODELS["sparse24.ds_roles"] = _roles_phase_model


def ds_roles_cost(M: int, K: int, N: int, R: int, dtype=torch.bfloat16, bias: bool = True,
                  save_t: bool = False, sms: Optional[int] = None) -> Optional[tuple]:
    """``(seconds, BLOCK_R, BLOCK_N, KS)`` of the two-role launch: of :func:`ds_roles_plans`, the
    one :func:`kernels._cost.robust_pick` takes (seconds at the nominal L2 figure); ``None`` above
    ``DECODE_MAX_M`` tokens or for empty shapes. ``FASTFACTOR_DS_ROLES_KSPLIT=0`` plans the
    producers over all of ``K`` (one split: the launch before the split existed, which ``make
    gpu-check`` times against it); ``FASTFACTOR_DS_ROLES_PREFETCH=0`` prices (and ``ds_roles``
    launches) the consumers without their prefetched step of ``D``."""
    if M > DECODE_MAX_M or min(M, K, N, R) <= 0:
        return None
    return _roles_pick(int(M), int(K), int(N), int(R), dtype, bool(bias), bool(save_t), sms and int(sms),
                       prmt_mode(True) > 0, _forced("FASTFACTOR_DS_ROLES_KSPLIT", ("0", "1")) != "0",
                       _forced(PREFETCH_ENV, ("0", "1")) != "0")


@functools.lru_cache(maxsize=4096)
def _roles_pick(M, K, N, R, dtype, bias, save_t, sms, prmt, k_split=True, prefetch=True) -> Optional[tuple]:
    plans = ds_roles_plans(M, K, N, R, dtype, bias, save_t, sms, k_split, prefetch)
    if not plans:
        return None
    t_nom, _, (br, bn, ks) = _cost.robust_pick(plans)
    return t_nom, br, bn, ks


def _bd_nps(N: int, sk: int) -> int:
    """Columns of ``g`` per split: ``ceil(N / sk)`` rounded up to :data:`BD_N_QUANTUM`."""
    return _per_split(N, sk, BD_N_QUANTUM)


def ds_bwd_dense_plans(M: int, N: int, R: int, dtype=torch.bfloat16, need_dt: bool = True, need_dd: bool = True,
                       bias: bool = True, sms: Optional[int] = None) -> list:
    """Every plan of the dense-factor backward launch (:func:`ds_bwd_dense`) at ``M <=
    DECODE_MAX_M`` tokens: ``(t_nominal, t_low, (BLOCK_R, splits))``, seconds at the nominal L2
    figure and at its low end, counted from the shapes as ``fastfactor sol`` counts the launch
    (*predicted*; the terms of :func:`ds_rank_split_plans`, no issue term: a tensor-core loop).

    ``ch = ceil(R / BLOCK_R)`` chunks x ``sk`` column splits = programs. DRAM: ``g`` once, ``D``
    (``need_dt``), ``t`` and ``dD`` (``need_dd``), ``db`` (``bias``), ``dt`` and with a split its
    fp32 partials stored (``sk·M·R·4`` with ``need_dt``; read back from L2 by each chunk's reducer). L2: ``g`` once
    per chunk, ``t``'s chunk once per program, the rest once, the partials stored and the other
    ``sk - 1`` read back. Issued tensor FLOPs: ``2·BLOCK_M·BLOCK_R`` per column and product."""
    dev = _cost.DEFAULT if not sms or sms == _cost.DEFAULT.sms else dataclasses.replace(_cost.DEFAULT, sms=int(sms))
    low = dataclasses.replace(dev, l2_bw=dev.l2_bw_low)
    e = _ds_elem(dtype)
    dt = "fp32" if dtype == torch.float32 else "bf16"
    cd = lambda a, b: -(-a // b)
    bm = max(16, next_pow2(M))
    g_b = float(e) * M * N
    d_b = float(e) * N * R if need_dt else 0.0
    t_b = float(e) * M * R if need_dd else 0.0
    dd_b = float(e) * N * R if need_dd else 0.0
    db_b = float(e) * N if bias else 0.0
    dt_b = float(e) * M * R if need_dt else 0.0
    products = int(need_dt) + int(need_dd)
    plans = []
    for br in BD_CHUNKS:
        ch = cd(R, br)
        if br > 16 and cd(R, br // 2) == ch:
            continue                           # a wider chunk than the rank needs
        if not bd_space(br, bm):
            continue
        for sk in BD_SPLITS:
            nps = _bd_nps(N, sk)
            if sk > 1 and nps * (sk - 1) >= N:
                continue                       # an empty split
            P = ch * sk
            ws = 4.0 * sk * M * R if sk > 1 and need_dt else 0.0
            dram = g_b + d_b + t_b + dd_b + db_b + dt_b + ws
            l2 = ch * g_b + d_b + sk * t_b + dd_b + db_b + dt_b + ws + ws * (sk - 1) / sk
            flops = 2.0 * bm * br * ch * cd(N, BD_N_QUANTUM) * BD_N_QUANTUM * products
            times = tuple(_cost.kernel_seconds(dram, l2, flops, P, d, False, dt)["seconds"] for d in (dev, low))
            plans.append(times + ((br, sk),))
    return plans


def ds_bwd_dense_cost(M: int, N: int, R: int, dtype=torch.bfloat16, need_dt: bool = True, need_dd: bool = True,
                      bias: bool = True, sms: Optional[int] = None) -> Optional[tuple]:
    """``(seconds, BLOCK_R, splits)`` of the dense-factor backward launch: of
    :func:`ds_bwd_dense_plans`, the one :func:`kernels._cost.robust_pick` takes (seconds at the
    nominal L2 figure); ``None`` above ``DECODE_MAX_M`` tokens, for empty shapes or nothing asked."""
    if M > DECODE_MAX_M or min(M, N, R) <= 0 or not (need_dt or need_dd or bias):
        return None
    return _bd_pick(int(M), int(N), int(R), dtype, bool(need_dt), bool(need_dd), bool(bias), sms and int(sms))


@functools.lru_cache(maxsize=4096)
def _bd_pick(M, N, R, dtype, need_dt, need_dd, bias, sms) -> Optional[tuple]:
    plans = ds_bwd_dense_plans(M, N, R, dtype, need_dt, need_dd, bias, sms)
    if not plans:
        return None
    t_nom, _, (br, sk) = _cost.robust_pick(plans)
    return t_nom, br, sk


def ds_bwd_dense_library_seconds(M: int, N: int, R: int, dtype=torch.bfloat16, need_dt: bool = True,
                                 need_dd: bool = True, bias: bool = True) -> float:
    """Predicted seconds of the library backward's dense side: cuBLAS ``dt = g·D`` and ``dD = gᵀ·t``
    at the roofline and ``g.sum(0)`` (each its own launch), as :func:`dense_sparse_bwd` runs them."""
    e = _ds_elem(dtype)
    out = 0.0
    if need_dt:
        out += _gemm_seconds(M, R, N, e, e, e, False, dtype)
    if need_dd:
        out += _gemm_seconds(N, R, M, e, e, e, False, dtype)
    if bias:
        out += _cost.library_seconds(float(e) * (M * N + N), 0.0, _cost.DEFAULT)["seconds"]
    return out


def ds_bwd_dense_ok(M: int, N: int, R: int, dtype, need_dt: bool, need_dd: bool, bias: bool, device=None) -> bool:
    """Whether the library backward's dense side runs as one launch of ours (:func:`ds_bwd_dense`):
    at ``M <= DECODE_MAX_M`` tokens of bf16 / fp32 where predicted at least 5 % faster than cuBLAS's
    two products and the sum (``DS_MARGIN``). ``FASTFACTOR_DS_BWD_DENSE=0`` keeps the library's
    launches, ``=1`` takes ours wherever it applies."""
    forced = _forced("FASTFACTOR_DS_BWD_DENSE", ("0", "1"))
    if not ds_library_ok(dtype) or forced == "0":
        return False
    c = ds_bwd_dense_cost(M, N, R, dtype, need_dt, need_dd, bias, _ds_sms(device) if device is not None else None)
    if c is None:
        return False
    return forced == "1" or c[0] <= DS_MARGIN * ds_bwd_dense_library_seconds(M, N, R, dtype, need_dt, need_dd, bias)


def _default_device(device):
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ds_path_costs(M: int, K: int, N: int, R: int, dtype=torch.bfloat16, device=None, bias: bool = True,
                  save_t: bool = False) -> dict:
    """Predicted forward seconds of each candidate path: ``library`` (:func:`ds_s_plan` + the
    cuBLAS ``t·Dᵀ``) where the dtype allows it, ``fused`` where the rank fits. ``device``: where
    the product runs (PyTorch's 2:4 GEMM only on CUDA; default the current CUDA device, else CPU)."""
    device = _default_device(device)
    out = {}
    if ds_library_ok(dtype):
        e = _ds_elem(dtype)
        out["library"] = ds_s_plan(M, K, R, dtype, device, save_t)[1] + _gemm_seconds(M, N, R, e, e, e, bias, dtype)
    fused = ds_chain_seconds(M, K, N, R, dtype, bias, save_t, _ds_sms(device))
    if fused is not None:
        out["fused"] = fused
    rs = ds_rank_split_cost(M, K, N, R, dtype, bias, save_t, _ds_sms(device))
    if rs is not None:
        out["rank_split"] = rs[0]
    ro = ds_roles_cost(M, K, N, R, dtype, bias, save_t, _ds_sms(device))
    if ro is not None:
        out["roles"] = ro[0]
    if not ds_library_ok(dtype) and 0 < M <= DECODE_MAX_M and min(K, N, R) > 0:
        out["two_kernel"] = ds_two_kernel_seconds(M, K, N, R, dtype, bias, _ds_sms(device))
    return out


def ds_two_kernel_seconds(M: int, K: int, N: int, R: int, dtype=torch.float16, bias: bool = True,
                          sms: Optional[int] = None) -> float:
    """A lower bound of the two-kernel path (fp16's unfused path: ``t = x·Sᵀ`` into fp32 by our 2:4
    kernel, then ``t·Dᵀ`` by our Triton GEMM), *predicted*: ``t`` at the decode kernel's planned
    price (:func:`decode_plan_cost`) up to ``DS_DECODE_MAX_M`` rows, else :func:`sparse24_mm`'s
    roofline (``path_costs``' ``triton``); the GEMM priced as an ideal cuBLAS product of the fp32
    ``t`` (our GEMM is no faster), so a one-launch path beating this beats the real pair."""
    sms = int(sms or _cost.DEFAULT.sms)
    if M <= DS_DECODE_MAX_M:
        t1 = decode_seconds(M, R, K, sms, _ds_elem(dtype), same_dtype=dtype != torch.float16)
    else:
        t1 = path_costs(M, K, R, dtype, "fwd")["triton"]
    return t1 + _gemm_seconds(M, N, R, 4, _ds_elem(dtype), _ds_elem(dtype), bias, dtype)


def choose_ds_path(M: int, K: int, N: int, R: int, dtype=torch.bfloat16, device=None, bias: bool = True,
                   save_t: bool = False) -> str:
    """``'library'``, ``'fused'``, ``'rank_split'``, ``'roles'`` or ``'two_kernel'`` for a
    dense-sparse forward of this shape (block comment above): by :func:`ds_path_costs`, one of our
    kernels (the cheapest of the fused and, at ``M <= DECODE_MAX_M`` tokens, the rank-split and
    two-role launches) only where predicted at least 5 % faster than the library path
    (``DS_MARGIN``). fp16 has no library path: at ``M <= DECODE_MAX_M`` tokens the same rule
    against the two-kernel path's lower bound (:func:`ds_two_kernel_seconds`), falling back to the
    fused kernel where its rank fits; above, the fused kernel where its rank fits, else
    ``two_kernel``.

    ``FASTFACTOR_DS_PATH=fused|rank_split|two_kernel|library`` forces a path (``fused`` falls
    back to ``two_kernel`` above the rank limit, ``rank_split`` to ``library`` above
    ``DECODE_MAX_M`` tokens, ``library`` to ``two_kernel`` for fp16)."""
    forced = os.environ.get("FASTFACTOR_DS_PATH")
    fits = _pad_rank(R) <= FUSED_MAX_R
    if forced:
        if forced not in DS_PATHS:
            raise ValueError(f"FASTFACTOR_DS_PATH: expected one of {', '.join(DS_PATHS)}, got {forced!r}")
        if forced == "fused" and not fits:
            return "two_kernel"
        if forced in ("rank_split", "roles") and M > DECODE_MAX_M:
            forced = "library"
        if forced == "library" and not ds_library_ok(dtype):
            return "two_kernel"
        return forced
    if min(M, K, N, R) <= 0:
        return "library" if ds_library_ok(dtype) else "two_kernel"
    costs = ds_path_costs(M, K, N, R, dtype, device, bias, save_t)
    base = "library" if "library" in costs else "two_kernel" if "two_kernel" in costs else None
    if base is None:
        return "fused" if fits else "two_kernel"
    ours = {p: c for p, c in costs.items() if p in ("fused", "rank_split", "roles")
            and c <= DS_MARGIN * costs[base]}
    if ours:
        return min(ours, key=ours.get)
    return base if base == "library" or not fits else "fused"


def ds_chain(
    x: torch.Tensor,
    d: torch.Tensor,
    s_values: torch.Tensor,
    s_meta: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    store_t: bool = False,
):
    """Fused ``(y, t or None)``: ``y = (x·Sᵀ)·Dᵀ + b``; ``x (M, K)``, ``d (N, R)``, packed ``S (R, K)``;
    ``t`` in ``intermediate_dtype(x.dtype)`` (fp32 for fp16 inputs)."""
    M, K = x.shape
    N, R = d.shape
    r_pad = _pad_rank(R)
    if r_pad > FUSED_MAX_R:
        raise ValueError(f"ds_chain: rank must be <= {FUSED_MAX_R} for the fused kernel, got {R}")
    t_dtype = intermediate_dtype(x.dtype)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    t = torch.empty((M, R), device=x.device, dtype=t_dtype) if store_t else None
    if M == 0 or N == 0:
        if t is not None and M > 0:
            t = sparse24_mm(x, s_values, s_meta, out_dtype=t_dtype)
        return y, t
    if K == 0 or R == 0:
        y.zero_()
        if bias is not None:
            y += bias
        if t is not None:
            t.zero_()
        return y, t
    t_arg = t if t is not None else y
    mt, smr, smc, m32 = _meta_arg(s_meta, K)
    _ds_chain_tuned[row_block_grid(M, N, x.device)](
        x, s_values, mt, d, bias if bias is not None else y, y, t_arg,
        M, K, N, R, m_bucket(M),
        x.stride(0), x.stride(1), s_values.stride(0), s_values.stride(1),
        smr, smc, d.stride(0), d.stride(1),
        y.stride(0), y.stride(1), t_arg.stride(0), t_arg.stride(1),
        HAS_BIAS=bias is not None, STORE_T=store_t, T_FP32=t_dtype != x.dtype,
        UPCAST=upcast_dots(), PRECISION=dot_precision(x.dtype), META32=m32, R_PAD=r_pad,
    )
    return y, t


#: rows up to which the two-kernel path's t = x·Sᵀ runs on the decode kernel
DS_DECODE_MAX_M = 32


def _sparse_t(x: torch.Tensor, s_values: torch.Tensor, s_meta: torch.Tensor) -> torch.Tensor:
    """The two-kernel path's ``t = x·Sᵀ`` in ``intermediate_dtype(x.dtype)``: the decode kernel
    (the reduction split over the SMs where it pays) for ``M <= DS_DECODE_MAX_M``, else
    :func:`sparse24_mm`."""
    inter = intermediate_dtype(x.dtype)
    if x.shape[0] <= DS_DECODE_MAX_M:
        return sparse24_decode(x, s_values, s_meta, out_dtype=inter)
    return sparse24_mm(x, s_values, s_meta, out_dtype=inter)


def padded_meta_24(meta: torch.Tensor, rows: int, k: int, to_rows: int) -> torch.Tensor:
    """``meta (rows, ceil(k/8))`` with ``to_rows - rows`` rows of the code ``0b0100`` (entries 0
    and 1 of each group) appended: the codes of ``S`` padded with zero rows. Cached on ``meta``
    (keyed by its version), so the CUTLASS reordering of the padded codes (:func:`torch24_meta`,
    cached on the padded tensor) runs once per mask."""
    return _cached_on(meta, "_fastfactor_pad", (rows, k, to_rows),
                      lambda: torch.cat((meta, meta.new_full((to_rows - rows, meta.shape[1]), 0x44))))


def torch24_meta_padded(meta: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """The CUTLASS codes of ``S`` zero-padded to a multiple of 32 rows (once per mask)."""
    r32 = -(-rows // _TORCH24_ROWS) * _TORCH24_ROWS
    return torch24_meta(padded_meta_24(meta, rows, k, r32), r32, k)


def _torch24_padded(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """``t = x·Sᵀ`` on PyTorch's semi-structured GEMM with ``S (R, K)`` padded by zero rows to
    ``R32 = ceil(R/32)·32``: the values copied into a zero-padded buffer (one copy per call; the
    padded rows contribute exact zeros), the codes padded and reordered once per mask. Returns the
    ``(M, R)`` view of the ``(M, R32)`` result (strides ``(1, M)``: cuBLAS takes it as is)."""
    R, K = values.shape[0], 2 * values.shape[1]
    r32 = -(-R // _TORCH24_ROWS) * _TORCH24_ROWS
    mc = torch24_meta_padded(meta, R, K)
    vp = torch.nn.functional.pad(values, (0, 0, 0, r32 - R))   # one copy, zero rows appended
    xt = (x if x.stride(-1) == 1 else x.contiguous()).t()
    return torch._sparse_semi_structured_mm(vp, mc, xt).t()[:, :R]


def _ds_t(x: torch.Tensor, s_values: torch.Tensor, s_meta: torch.Tensor, save_t: bool = False):
    """The library path's ``t = x·Sᵀ`` (x's dtype: bf16 / fp32) on :func:`ds_s_plan`'s path."""
    M, K = x.shape
    R = s_values.shape[0]
    s_path = ds_s_plan(M, K, R, x.dtype, x.device, save_t)[0]
    if s_path == "torch_pad":
        return _torch24_padded(x, s_values, s_meta)
    return sparse24_forward(x, s_values, s_meta, None, path=s_path)


def ds_rank_split(
    x: torch.Tensor,
    d: torch.Tensor,
    s_values: torch.Tensor,
    s_meta: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    store_t: bool = False,
    plan: Optional[tuple] = None,
):
    """``(y, t or None)``: ``y = (x·Sᵀ)·Dᵀ + b`` for ``M <= DECODE_MAX_M`` token rows in one launch
    split over the rank (:func:`_ds_rank_split_kernel`; ``plan`` forces ``(BLOCK_R, BLOCK_N)``,
    default :func:`ds_rank_split_cost`); ``x (M, K)``, ``d (N, R)``, packed ``S (R, K)``; ``t`` in
    ``intermediate_dtype(x.dtype)`` (fp32 for fp16 inputs). Deterministic: the chunks' partials are
    summed in a fixed order by each column tile's last program."""
    M, K = x.shape
    N, R = d.shape
    if M > DECODE_MAX_M:
        raise ValueError(f"x: ds_rank_split takes at most {DECODE_MAX_M} rows, got {M}")
    t_dtype = intermediate_dtype(x.dtype)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    t = torch.empty((M, R), device=x.device, dtype=t_dtype) if store_t else None
    if M == 0 or N == 0 or K == 0 or R == 0:
        y.zero_()
        if bias is not None and M > 0:
            y += bias
        if t is not None:
            t.zero_()
        return y, t
    if plan is None:
        _, br, bn = ds_rank_split_cost(M, K, N, R, x.dtype, bias is not None, store_t, _config.num_sms(x.device))
    else:
        br, bn = plan
    bm = max(16, next_pow2(M))
    ch, nt = triton.cdiv(R, br), triton.cdiv(N, bn)
    mt, smr, smc, m32 = _meta_arg(s_meta, K)
    vt, pairs = _values_arg(s_values, x.dtype)
    split, sync, ws, cnt = split_buffers(ch, nt, (M, N), x.device, y)
    t_arg = t if t is not None else y
    _ds_rank_split_tuned[(nt * ch,)](
        x, vt, mt, d, bias if bias is not None else y, y, t_arg, ws, cnt,
        M, K, N, R, ch,
        x.stride(0), x.stride(1), vt.stride(0), vt.stride(1), smr, smc,
        d.stride(0), d.stride(1), y.stride(0), y.stride(1), t_arg.stride(0), t_arg.stride(1),
        HAS_BIAS=bias is not None, STORE_T=store_t, T_FP32=t_dtype != x.dtype,
        SPLIT=split, SYNC=sync, UPCAST=upcast_dots(), PRECISION=dot_precision(x.dtype),
        META32=m32, PAIRS=pairs, PRMT=prmt_mode(m32 and pairs),
        D_VEC=(d.stride(1) == 1 and d.stride(0) % 8 == 0 and R % 8 == 0 and d.element_size() == 2
               and d.data_ptr() % 16 == 0),
        BLOCK_R=br, BLOCK_N=bn, BLOCK_M=bm,
    )
    return y, t


def ds_roles(
    x: torch.Tensor,
    d: torch.Tensor,
    s_values: torch.Tensor,
    s_meta: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    store_t: bool = False,
    plan: Optional[tuple] = None,
):
    """``(y, t or None)``: ``y = (x·Sᵀ)·Dᵀ + b`` for ``M <= DECODE_MAX_M`` token rows in one launch
    of two roles (:func:`_ds_roles_kernel`: producers form ``t``, consumers multiply it by ``D``;
    ``plan`` forces ``(BLOCK_R, BLOCK_N)`` or ``(BLOCK_R, BLOCK_N, K splits)`` (one split when not
    given; the splits as :func:`roles_k_split` makes them), default :func:`ds_roles_cost`);
    ``x (M, K)``, ``d (N, R)``, packed ``S (R, K)``; ``t`` in ``intermediate_dtype(x.dtype)``.
    Deterministic: with a K split each chunk of ``t`` is the fixed-order sum of its splits' fp32
    partials."""
    M, K = x.shape
    N, R = d.shape
    if M > DECODE_MAX_M:
        raise ValueError(f"x: ds_roles takes at most {DECODE_MAX_M} rows, got {M}")
    t_dtype = intermediate_dtype(x.dtype)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    t = torch.empty((M, R), device=x.device, dtype=t_dtype)
    if M == 0 or N == 0 or K == 0 or R == 0:
        y.zero_()
        if bias is not None and M > 0:
            y += bias
        t.zero_()
        return y, (t if store_t else None)
    if plan is None:
        _, br, bn, ks = ds_roles_cost(M, K, N, R, x.dtype, bias is not None, store_t, _config.num_sms(x.device))
    else:
        br, bn, ks = (tuple(plan) + (1,))[:3]
    ks, kps = roles_k_split(K, ks)
    bm = max(16, next_pow2(M))
    n0, n1 = triton.cdiv(R, br), triton.cdiv(N, bn)
    mt, smr, smc, m32 = _meta_arg(s_meta, K)
    vt, pairs = _values_arg(s_values, x.dtype)
    sync = x.device.type == "cuda"
    cnt = split_counters(x.device, 4 + n0) if sync else t
    ws = torch.empty((ks, M, R), device=x.device, dtype=torch.float32) if ks > 1 else t
    _ds_roles_tuned[(n0 * ks + n1,)](
        x, vt, mt, d, bias if bias is not None else y, y, t, ws, cnt,
        M, K, N, R, n0, n1, ks, kps,
        x.stride(0), x.stride(1), vt.stride(0), vt.stride(1), smr, smc,
        d.stride(0), d.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, T_FP32=t_dtype != x.dtype, SPLIT=ks > 1, SYNC=sync,
        UPCAST=upcast_dots(), PRECISION=dot_precision(x.dtype),
        META32=m32, PAIRS=pairs, PRMT=prmt_mode(m32 and pairs),
        BLOCK_R=br, BLOCK_N=bn, BLOCK_M=bm, BLOCK_C=(bc := roles_rank_step(R, br, bn, bm)),
        PREFETCH=roles_prefetch(bn, bc, bm, x.element_size()),
    )
    return y, (t if store_t else None)


def ds_bwd_dense(g: torch.Tensor, d: torch.Tensor, t: Optional[torch.Tensor], need_dt: bool = True,
                 need_dd: bool = True, has_bias: bool = True, plan: Optional[tuple] = None) -> tuple:
    """``(dt, dD, db)`` (``None`` where not asked) of the dense-sparse backward's dense side for
    ``M <= DECODE_MAX_M`` token rows in one launch (:func:`_ds_bwd_dense_kernel`): ``dt = g·D``
    (M, R) in ``g``'s dtype, ``dD = gᵀ·t`` (N, R) in ``d``'s, ``db = Σ_m g`` (N,) in ``g``'s, each
    rounded once from fp32. ``g (M, N)``, ``d (N, R)``, ``t (M, R)`` (read only for ``dD``); bf16 or
    fp32 (the library path's dtypes: the intermediate in the input dtype). ``plan`` forces
    ``(BLOCK_R, splits)``, default :func:`ds_bwd_dense_cost`. Deterministic: ``dt``'s column-range
    partials are summed in a fixed order by each rank chunk's last program."""
    M, N = g.shape
    R = d.shape[1]
    if M > DECODE_MAX_M:
        raise ValueError(f"g: ds_bwd_dense takes at most {DECODE_MAX_M} rows, got {M}")
    if not ds_library_ok(g.dtype) or d.dtype != g.dtype or (need_dd and (t is None or t.dtype != g.dtype)):
        raise ValueError(f"ds_bwd_dense: expected g, d{' and t' if need_dd else ''} all bf16 or all fp32, got "
                         f"g {g.dtype}, d {d.dtype}{', t ' + str(None if t is None else t.dtype) if need_dd else ''}")
    dt = torch.empty((M, R), device=g.device, dtype=g.dtype) if need_dt else None
    dd = torch.empty((N, R), device=g.device, dtype=d.dtype) if need_dd else None
    db = torch.empty((N,), device=g.device, dtype=g.dtype) if has_bias else None
    if M == 0 or N == 0 or R == 0:
        for o in (dt, dd, db):
            if o is not None:
                o.zero_()
        if db is not None and M > 0:
            db.copy_(g.sum(0, dtype=torch.float32))
        return dt, dd, db
    if plan is None:
        c = ds_bwd_dense_cost(M, N, R, g.dtype, need_dt, need_dd, has_bias, _config.num_sms(g.device))
        br, sk = (c[1], c[2]) if c is not None else (32, 1)
    else:
        br, sk = plan
    bm = max(16, next_pow2(M))
    ch = triton.cdiv(R, br)
    nps = _bd_nps(N, sk)
    sk = triton.cdiv(N, nps)                   # no empty split
    split, sync, ws, cnt = split_buffers(sk if need_dt else 1, ch, (M, R), g.device, g)
    t_arg = t if need_dd else g
    dt_arg, dd_arg = (dt if need_dt else g), (dd if need_dd else d)
    vec = lambda a: a.stride(1) == 1 and a.stride(0) % 8 == 0 and a.data_ptr() % 16 == 0
    _ds_bwd_dense_tuned[(ch * sk,)](
        g, d, t_arg, dd_arg, db if has_bias else g, dt_arg, ws, cnt,
        M, N, R, nps, sk,
        g.stride(0), g.stride(1), d.stride(0), d.stride(1), t_arg.stride(0), t_arg.stride(1),
        dd_arg.stride(0), dd_arg.stride(1), dt_arg.stride(0), dt_arg.stride(1),
        HAS_BIAS=has_bias, NEED_DT=need_dt, NEED_DD=need_dd, SPLIT=split, SYNC=sync,
        UPCAST=upcast_dots(), PRECISION=dot_precision(g.dtype),
        D_VEC=(R % 8 == 0 and g.element_size() == 2 and (not need_dt or vec(d)) and (not need_dd or vec(dd))),
        BLOCK_R=br, BLOCK_M=bm,
    )
    return dt, dd, db


def dense_sparse_fwd(
    x: torch.Tensor,
    d: torch.Tensor,
    s_values: torch.Tensor,
    s_meta: torch.Tensor,
    bias: Optional[torch.Tensor],
    save_t: bool,
    path: Optional[str] = None,
):
    """Forward launcher: ``(y, t or None)`` for ``x (M, K)``, ``d (N, R)``, packed ``S (R, K)``;
    ``t`` in ``intermediate_dtype(x.dtype)`` (fp32 for fp16 inputs). ``path``: one of
    :data:`DS_PATHS` (default :func:`choose_ds_path`)."""
    M, K = x.shape
    N, R = d.shape
    path = path or choose_ds_path(M, K, N, R, x.dtype, x.device, bias is not None, save_t)
    if path == "library" and not ds_library_ok(x.dtype):
        path = "two_kernel"
    if path == "fused":
        return ds_chain(x, d, s_values, s_meta, bias, store_t=save_t)
    if path == "rank_split":
        return ds_rank_split(x, d, s_values, s_meta, bias, store_t=save_t)
    if path == "roles":
        return ds_roles(x, d, s_values, s_meta, bias, store_t=save_t)
    if path == "library":
        if M == 0 or R == 0 or K == 0:
            t = x.new_zeros((M, R))
        else:
            t = _ds_t(x, s_values, s_meta, save_t)
        y = torch.nn.functional.linear(t, d, bias)                 # cuBLAS
        if save_t and not t.is_contiguous():
            # PyTorch's 2:4 GEMM returns t as the transposed view of (R32, M): the op's saved t
            # is contiguous (M, R) like its fake tensor's (torch.compile, opcheck)
            t = t.contiguous()
        return y, (t if save_t else None)
    t = _sparse_t(x, s_values, s_meta)
    y = gemm(t, d.t(), bias=bias, out_dtype=x.dtype)
    return y, (t if save_t else None)


def _ds_sparse_bwd(dt, x, s_values, s_meta, need_x: bool, need_s: bool):
    """``(dx, dSv)`` of the library backward: ``dx = dt·S`` and the kept entries of ``dtᵀ·x``
    (exact selections of the dense gradient) on :func:`ds_bwd_sparse_paths`' choices."""
    M, R = dt.shape
    K = x.shape[1]
    dx = dv = None
    tp = None
    if need_x and torch24_eligible(M, R, K, dt.dtype, dt.device) and dt.dtype == s_values.dtype:
        tp = transpose_plan(s_meta, R, K)                         # cached per mask
    px, pv = ds_bwd_sparse_paths(M, K, R, dt.dtype, tp is not None)
    if need_x:
        if px == "torch" and tp is not None:                      # dx = F.linear(dt, Sᵀ), Sᵀ 2:4
            dx = torch24_linear(dt, transposed_values(s_values, tp[0]), tp[1]).contiguous()
        elif px == "dense":
            dx = torch.mm(dt, expand_24(s_values, s_meta, out_dtype=dt.dtype))
        elif (need_s and pv != "dense" and 0 < M <= DECODE_MAX_M and x.dtype == s_values.dtype
              and dx_dv_fused_ok(M, R, K, _config.num_sms(dt.device), 4 if dt.dtype == torch.float32 else 2)):
            dv = torch.empty((R, K // 2), device=dt.device, dtype=s_values.dtype)   # dSv out of the same launch
            dx = sparse24_dx_decode(dt, s_values, s_meta, x=x, dv=dv)
        else:
            dx = sparse24_dx(dt, s_values, s_meta)
    if need_s and dv is None:
        if pv == "dense":
            dv = compress_24(torch.mm(dt.t(), x), s_meta, out_dtype=s_values.dtype)
        else:
            dv = sparse24_dvalues(dt, x, s_meta, out_dtype=s_values.dtype)
    return dx, dv


def ds_bwd_path(dtype) -> str:
    """The backward's path: ``library`` (cuBLAS for ``dt``, ``dD``; :func:`sparse24_backward`'s
    cost dispatch for ``dx`` and the kept values' gradient) for bf16 / fp32; ``two_kernel`` for
    fp16 (fp32 ``dt``) or when ``FASTFACTOR_DS_PATH=two_kernel`` (or ``fused``: the fused
    forward's backward has always been the two-kernel one) forces it."""
    forced = os.environ.get("FASTFACTOR_DS_PATH")
    if forced and forced not in DS_PATHS:
        raise ValueError(f"FASTFACTOR_DS_PATH: expected one of {', '.join(DS_PATHS)}, got {forced!r}")
    if forced in ("two_kernel", "fused") or not ds_library_ok(dtype):
        return "two_kernel"
    return "library"


def dense_sparse_bwd(
    g: torch.Tensor,
    x: torch.Tensor,
    d: torch.Tensor,
    s_values: torch.Tensor,
    s_meta: torch.Tensor,
    t: Optional[torch.Tensor],
    has_bias: bool,
    need_x: bool = True,
    need_d: bool = True,
    need_s: bool = True,
    path: Optional[str] = None,
):
    """Backward launcher: ``(dx, dd, ds_values, db)`` (``None`` where not needed). ``t`` (saved by
    the forward or None) and ``dt = g·D`` are in ``intermediate_dtype(x.dtype)``. ``path``:
    ``'library'`` or ``'two_kernel'`` (default :func:`ds_bwd_path`). On the library path at a
    handful of tokens ``dt``, ``dD`` and ``db`` come from one launch of ours where predicted faster
    than cuBLAS's two products and the sum (:func:`ds_bwd_dense_ok`, :func:`ds_bwd_dense`)."""
    M, K = x.shape
    N, R = d.shape
    inter = intermediate_dtype(x.dtype)
    dx = dd = ds = db = None
    if M == 0:
        z = lambda *s, like: torch.zeros(s, device=like.device, dtype=like.dtype)
        return (
            z(0, K, like=x) if need_x else None,
            z(N, R, like=d) if need_d else None,
            z(R, K // 2, like=s_values) if need_s else None,
            z(N, like=d) if has_bias else None,
        )
    path = path or ds_bwd_path(x.dtype)
    if path == "library" and ds_library_ok(x.dtype) and R > 0 and K > 0:
        need_dt = need_x or need_s
        if (g.dtype == d.dtype == x.dtype and (t is None or t.dtype == x.dtype)
                and ds_bwd_dense_ok(M, N, R, x.dtype, need_dt, need_d, has_bias, x.device)):
            if need_d and t is None:
                t = _ds_t(x, s_values, s_meta)
            dt, dd, db = ds_bwd_dense(g, d, t, need_dt, need_d, has_bias)   # dt, dD, db: one launch
            if need_dt:
                dx, ds = _ds_sparse_bwd(dt, x, s_values, s_meta, need_x, need_s)
            return dx, dd, ds, db
        if need_x or need_s:
            dt = torch.mm(g, d)                                       # dt = g·D (M, R), cuBLAS
            dx, ds = _ds_sparse_bwd(dt, x, s_values, s_meta, need_x, need_s)
        if need_d:
            if t is None:
                t = _ds_t(x, s_values, s_meta)
            dd = torch.mm(g.t(), t)                                   # dD = gᵀ·t, cuBLAS
        if has_bias:
            db = g.sum(0)                                             # fp32 accumulation, one rounding
        return dx, dd, ds, db
    if need_x or need_s:
        dt = gemm(g, d, out_dtype=inter)                              # dt = g·D (M, R)
        if need_x:
            dx = sparse24_dx(dt, s_values, s_meta, out_dtype=x.dtype) # dx = dt·S
        if need_s:
            ds = sparse24_dvalues(dt, x, s_meta, out_dtype=s_values.dtype)  # kept(dtᵀ·x)
    if (need_d or has_bias) and R == 0:   # the GEMM skips empty products, and its fused db with them
        dd = d.new_zeros((N, 0)) if need_d else None
        db = g.sum(0, dtype=torch.float32).to(g.dtype) if has_bias else None
    elif need_d or has_bias:
        if t is None:
            t = _sparse_t(x, s_values, s_meta)
        dd_, db32 = gemm(g.t(), t, rowsum=True, out_dtype=d.dtype)   # dD = gᵀ·t, db = Σ_m g
        dd = dd_ if need_d else None
        db = db32.to(g.dtype) if has_bias else None
    return dx, dd, ds, db


# ============================================================================================
# Deprecated re-exports: the format and the pruning API moved to fastfactor.formats.sparse24
# ============================================================================================

_MOVED = ("Sparse24Weight", "pack_24", "mask_24", "prune_24", "to_cutlass_layout", "to_torch_semi_structured",
          "_check_in_features", "_check_prune_args", "_prune_dispatch")


def __getattr__(name):
    if name in _MOVED:
        import warnings

        from fastfactor.formats import sparse24 as _fmt

        if not name.startswith("_"):
            warnings.warn(f"fastfactor.kernels.sparse24.{name} is deprecated; use fastfactor.formats.sparse24.{name}",
                          DeprecationWarning, stacklevel=2)
        return getattr(_fmt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
