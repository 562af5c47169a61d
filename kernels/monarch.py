"""Block-diagonal Monarch and block-wise low-rank linear layers: ``y = P₂·L·P₁·R·x (+ b)``.

Notation
--------
``K = in_features``, ``N = out_features``, ``b = nblocks``, ``r = rank`` of every sub-block,
``kb = ceil(K / b)`` (input block size), ``nb = ceil(N / b)`` (output block size). Sizes that
``b`` does not divide are padded *logically* to ``Kp = b·kb`` and ``Np = b·nb``: the kernels mask
the missing input columns and output rows; nothing is copied.

Factors (the shapes every part of the library uses)
---------------------------------------------------
* ``w1 : (b, b·r, kb)`` — ``R``, block-diagonal with ``b`` blocks of shape ``(b·r, kb)``. Block ``j``
  reads the contiguous input chunk ``x[j·kb : (j+1)·kb]`` and produces ``b·r`` values, whose row
  ``p = l·r + t`` is the ``t``-th of the ``r`` values destined for output block ``l``::

      h[j, l, t] = Σ_c w1[j, l·r + t, c] · x[j·kb + c]

* ``P₁`` — the transpose of the ``b × b`` block grid: ``h[j, l, t] → h'[l, j, t]``, so output
  block ``l`` gathers ``r`` values from every input block ``j``; in ``h'[l]`` (length ``b·r``) the
  value ``(j, t)`` sits at ``q = j·r + t``.
* ``w2 : (b, nb, b·r)`` — ``L``, block-diagonal with ``b`` blocks of shape ``(nb, b·r)``::

      u[l, s] = Σ_q w2[l, s, q] · h'[l, q]

* ``P₂`` — the output permutation, the only difference between the two families:

  - **Monarch** (``strided=True``): ``y[s·b + l] = u[l, s]`` (the transpose of the grid again, as in
    Dao et al., ICML 2022: block ``l`` writes the strided rows ``l, l+b, l+2b, …``);
  - **block-wise low-rank** (``strided=False``, Gupta et al. 2024): ``y[l·nb + s] = u[l, s]``
    (``P₂`` is the identity, block ``l`` writes the contiguous rows ``l·nb … (l+1)·nb − 1``).

  Rows ``≥ N`` (padding) are dropped.

The dense weight these factors represent is therefore::

    W[o(l, s), j·kb + c] = Σ_t w2[l, s, j·r + t] · w1[j, l·r + t, c]

with ``o(l, s) = s·b + l`` (Monarch) or ``l·nb + s`` (block-wise low-rank): every one of the
``b × b`` sub-blocks ``W[o(l, ·), j·kb + ·]`` (``nb × kb``; strided rows for Monarch, contiguous
for block-wise low-rank) is the rank-``r`` product of ``w2[l, :, j·r:(j+1)·r]`` and
``w1[j, l·r:(l+1)·r, :]``, and no two sub-blocks share a parameter. Classic square Monarch
(``n = b²``) is ``r = 1``; the "MonarchLinear(nblocks=b)" of the Monarch authors' code, whose
blocks are dense ``(n/b × n/b)`` squares, is ``r = min(kb, nb) / b``. Parameters:
``b·r·(Kp + Np)``; FLOPs per row: ``2·b·r·(Kp + Np)`` (dense: ``2·K·N``).

Backward (with ``g = dL/dy`` gathered as ``g'[l, s] = g[o(l, s)]``)::

    dh'[l, q]          = Σ_s g'[l, s] · w2[l, s, q]          (then P₁⁻¹: dh[j, l, t] = dh'[l, j·r+t])
    dx[j·kb + c]       = Σ_{l,t} dh[j, l, t] · w1[j, l·r+t, c]
    dw2[l, s, q]       = Σ_m g'_m[l, s] · h'_m[l, q]
    dw1[j, l·r + t, c] = Σ_m dh_m[j, l, t] · x_m[j·kb + c]
    db                 = Σ_m g_m

Design
------
``_rows_kernel`` (the row-block path, ``'rows'``: forward and ``dx``, where ``b·b·r <= 64``): one
program owns ``BLOCK_M`` rows and every output tile, so ``x`` is read once and ``h`` (``b·b·r``
values per row, column ``p·b·r + q·r + t``) never leaves the chip. Stage 1 streams contiguous
``BLOCK_K``-wide tiles of the input row and multiplies them by a packed factor tile
``(BLOCK_K × HP)`` whose column ``(p, q, t)`` holds ``F1(q, p, t, ·)`` on the features of input block
``q`` and zeros elsewhere (one dense tile for all blocks; ``HP = max(16, next_pow2(b·b·r))``).
Stage 2 writes contiguous ``BLOCK_N``-wide output tiles: output feature ``f = (p, s)`` (``s·b + p``
for Monarch, ``p·nb + s`` otherwise) gathers the row ``F2(p, s, ·, ·)`` of the second factor into
the rows ``(p, ·, ·)`` of a packed ``(HP × BLOCK_N)`` tile, so ``P₁`` and ``P₂`` are addressing of
the (small, cache-resident) factors and every access to ``x``, ``y``, ``g``, ``dx`` and ``h`` is a
contiguous vector. ``dx`` runs the same kernel with ``g`` as the input (Monarch: interleaved input
features ``f = s·b + l``, permuted on chip by the same packing). The packing issues ``HP/(b·r)``
times the useful tensor FLOPs (4x at ``b = 4, r = 1``), free while the op is bound by memory.
Where ``b·r >= 16`` and the input blocks are contiguous (the forward), stage 1 is instead one
unpadded product per input block, placed into ``h`` by an exact 0/1 product (``BLOCKWISE``);
with power-of-two ``b`` and ``r`` the interleaved sides (the Monarch forward's stage 2, ``dx``'s
stage 1, ``dw2``) are batched products over the ``b`` blocks, the tile reshaped and permuted on
chip (``BATCHED``/``BATCHED2``): no padding, no scattered access.
An FMA build of the forward (only the useful multiply-adds) exists for small power-of-two ``b·r``
(``b·r <= 8``): stage 1 keeps ``b·r`` elementwise fp32 accumulators ``acc[m, c] += x[m, c]·w1[q, (p,
t), c]`` in the layout ``x`` is loaded in and reduces them over ``c`` once per input block (``h`` is
``b·b·r`` values per row); stage 2 writes each output tile as ``b·r`` rank-1 updates
``z[m, s, p] += h[m, p, j]·w2[p, s, j]`` with no reduction. It issues no tensor-core FLOPs; it is
taken where its predicted time, instruction issue included (:data:`ROWS_FMA_ISSUE`, a
per-instruction model from its SASS), is at most the tensor-core build's (:func:`rows_fma`;
``FASTFACTOR_MONARCH_FMA=0``/``1`` forces it). When the
row blocks alone underfill the GPU, grid axis 1 splits the output tiles
(:func:`kernels._config.row_block_grid`), each split recomputing stage 1. For a few rows over a
wide input (``3072 → 768`` at 16 tokens: six programs, each reading all of ``x``) grid axis 2 also
splits stage 1's reduction (``KSPLIT``: the packed stage 1 where ``b·r < 16``, and the per-block
one over contiguous input blocks, each split taking the blocks its features meet): program ``(m, o,
k)`` stores its fp32 partial of ``h`` over ``K_PER`` input features and the last of the ``KS``
programs of ``(m, o)`` to arrive sums them in a fixed order (:mod:`kernels._split`: bitwise
reproducible, no atomics on data, no waiting) and writes the output tiles of split ``o``; the plan
``(BLOCK_M, BLOCK_N, OS, KS)`` is :func:`rows_ksplit_plan`'s, taken where predicted faster
(``FASTFACTOR_MONARCH_KSPLIT=0``/``1`` forces it off/on).

``_wgrad_pair_kernel`` (the row-block path's ``dw1``, ``dw2`` and ``db``, ONE launch): grid axis
0 is ``dw1``'s feature tiles followed by ``dw2``'s, axis 1 the row splits; every program runs the
shared body ``_wgrad_tile`` (a called, not inlined, device function there: the two sides'
registers do not add up) with its side's pointers and constexprs: one packed product per
feature tile, ``Σ_m d[m, f]·h[m, col]`` (``d = x`` with ``dh`` for ``dw1``, ``d = g`` with the saved
``h`` for ``dw2``, whose programs also take ``db = Σ_m g``), keeping the block-diagonal pairs
``block(f) = p(col)``; for contiguous blocks with ``b·r >= 16`` each program's features lie in one
block ``p`` and it reads only ``p``'s ``b·r`` columns of the intermediate (an unpadded product).
Reductions longer than 4096 rows are split over fixed row ranges (:func:`wgrad_split`, per side,
from the shape and SM count only) into fp32 partials, summed in the same launch by each feature
tile's last program to arrive, in the fixed order of the splits (:mod:`kernels._split`; a side
split less often than the other leaves its extra programs idle): no second launch, no atomics on
data, bitwise reproducible, and bitwise the results of one ``_wgrad_kernel`` launch per side (the
same body; it serves a lone ``dw1`` or ``dw2``).

At many rows (its row blocks fill the SMs; :func:`rows_dw2`) the backward reads ``g`` once: the
``dx`` launch (packed stage 1, ``DW2``) also multiplies each ``g`` tile it loads by its row block's
saved ``h`` (loaded once a program), ``gᵀ·h`` kept on the block-diagonal pairs, and stores the
row block's fp32 partial of ``dw2`` (and of ``db = Σ_m g``) into one buffer ``(row blocks, b·nb·b·r
[+ N])``; the weight-gradient launch then sums them (``REDUCE``: its ``dw2`` side reads the
partials in place of ``g`` and ``h``, chunks of row blocks per program, the chunks summed in the
launch like row splits; fixed orders) beside ``dw1``. ``FASTFACTOR_MONARCH_DW2=0``/``1`` forces it
off/on. At one row block (``M <=`` :data:`ROWS_ONE_LAUNCH_MAX_M`; :func:`rows_one_launch`) the
whole backward is that one launch: the block's ``dw2`` and ``db`` are whole, stored in their
dtypes, and stage 2 also writes ``dw1 = x_tileᵀ·dh`` for each output tile it computes (``DW1``;
``dh`` rounded as the pair launch would read it, never stored); with the split stage 1 the last
split also walks ``dw2``'s padding features.

Which path
    :func:`choose_path` predicts each path's time from bytes moved, tensor FLOPs issued and (FMA
    build) instructions issued with the device figures and rates of ``fastfactor sol``
    (:func:`_path_seconds`; the backward's ``dx`` and weight gradients together by
    :func:`_bwd_path_seconds`) and takes the fastest; the forward may also take ``'torch'`` (two
    ``bmm`` with the permutes).

The older kernels serve the other shapes (``h`` wider than 64 columns per row):

``_chain_kernel`` (the fused forward, and ``dx`` in the backward): one program per
``(row block of BLOCK_M rows, output block p, tile of BLOCK_N rows inside that block)``. It loops
over the input blocks ``q`` and over chunks of ``BLOCK_R`` of the rank: the stage-1 piece
``h[:, q, p, t-chunk]`` (``BLOCK_M × BLOCK_R``) is accumulated in fp32 registers over the input
block (``tl.dot``, tensor cores), rounded to the input dtype (kept fp32 for fp16, see Precision)
and immediately multiplied into the output tile by ``w2[p, s-tile, q·r + t-chunk]ᵀ``. The
permutation ``P₁`` costs nothing: because of
it, output block ``p`` needs exactly the slices ``h[:, ·, p, ·]``, which no other output block
needs, so the programs of different output blocks never duplicate stage-1 work, and the
intermediate never leaves registers. ``P₂`` is the addressing of the store. The one redundancy is
across the output tiles of one block: a block taller than ``BLOCK_N`` recomputes its stage-1
slices once per tile (``ceil(nb / BLOCK_N)`` times); the autotune space therefore offers wide
``BLOCK_N`` (up to 256, the whole block for ``3072 → 768`` at ``b = 4``). ``dx`` is the same chain
read backwards (``g`` gathered through ``P₂``, ``w2`` as the first factor, ``w1`` as the second),
so the kernel takes every index map as strides.

``_bgemm_kernel``: a batched GEMM ``C[g] = A[g]·B[g]`` whose operands are addressed by strides plus
a "feature" index (``g·FG + i·FI + k·FK``) that masks the logical padding. It runs the two-stage
path (``h`` through memory: stage 1 batched over input blocks, stage 2 over output blocks) and
the weight gradients ``dw1`` (batched over ``j``, reduction over all rows) and ``dw2`` (batched
over ``l``; ``db`` fused as the row sums of ``g'`` taken by the programs of the first column
tile). Every output tile is owned by one program that loops over the whole reduction, so there
are no atomics and the backward is bitwise reproducible.

Path choice between them
    The fused chain wins where the op is memory- or latency-bound and the output blocks fit in
    one or two tiles; for large ``nb`` and many rows the recomputation of stage 1 across output
    tiles costs more than a round trip of ``h`` through memory, and the two-stage path wins
    (:func:`choose_path`, by predicted time; ``FASTFACTOR_MONARCH_PATH=rows|fused|two_stage|torch``
    forces a path).

Save or recompute ``h``
    In training the forward also writes ``h`` (``M·b²·r`` elements; ``M·Kp`` for the classic
    dense-block Monarch, i.e. the size of ``x`` which autograd keeps anyway) in the layout
    ``hbuf[m, l, j, t]`` that ``dw2`` reads directly; recomputing it would cost a full stage-1
    product (``2·M·b·r·Kp`` FLOPs). At inference nothing but ``y`` is written. The backward's
    ``dh`` goes through memory in the layout ``dh[m, j, l, t]`` (it is a by-product of the ``dx``
    chain and the input of ``dw1``).

Precision
    Dot operands are in the input dtype with fp32 accumulation; fp32 inputs use TF32 only when
    ``torch.backends.cuda.matmul.allow_tf32`` is on. The intermediate (``h`` forward, ``dh``
    backward) is rounded to the input dtype before the second product for bf16 and fp32, like
    the bmm path of a bf16 model. For fp16 it stays in fp32 (:func:`intermediate_dtype`, shared
    with the low-rank family): ``h = R·x`` can exceed fp16's range (65504) where ``y`` does not
    (and ``dh = Lᵀ·g`` where ``dx`` does not), so the second product runs on fp32 operands as
    TF32 (fp16's 10-bit mantissa, fp32's range) at half the fp16 tensor-core rate for that
    product; the fused chain keeps ``h`` in fp32 registers (``H_FP32``), the two-stage path, the
    saved ``hbuf`` and the backward's ``dh`` buffer are fp32 (4 bytes per element), and the
    batched GEMM converts both operands to fp32 when their dtypes differ (``MIXED``: ``h·w2``,
    ``dh·w1``, ``dhᵀ·x``, ``gᵀ·h``). The PyTorch reference rounds at the same places, so CPU and
    kernels agree. Under the interpreter the operands are upcast to fp32.
    Ranks below 16 are padded to 16 inside ``tl.dot`` (its minimum); at ``r = 1`` the dots do 16×
    the useful work, which is harmless while the layer is memory-bound (it is, at such ranks).
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
from ._split import split_buffers, split_counters
from .lowrank import intermediate_dtype

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._split import _split_arrive, _split_sum, _split_total

#: "no split" value of the bgemm's column split (larger than any dimension)
_NO_SPLIT = 1 << 30
#: "no limit" value of a feature mask
_NO_LIMIT = (1 << 31) - 1


# ============================================================================================
# Shapes
# ============================================================================================

def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def factor_shapes(in_features: int, out_features: int, nblocks: int, rank: int):
    """``((b, b·r, kb), (b, nb, b·r))``: the shapes of ``w1`` and ``w2``."""
    kb, nb = cdiv(in_features, nblocks), cdiv(out_features, nblocks)
    return (nblocks, nblocks * rank, kb), (nblocks, nb, nblocks * rank)


def factor_dims(w1: torch.Tensor, w2: torch.Tensor):
    """``(b, r, kb, nb)`` read off the factors."""
    b, br, kb = w1.shape
    return b, br // b, kb, w2.shape[1]


def out_index_map(nblocks: int, nb: int, strided: bool):
    """``(OL, OS)`` with ``o(l, s) = l·OL + s·OS``: ``(1, b)`` for Monarch, ``(nb, 1)`` otherwise."""
    return (1, nblocks) if strided else (nb, 1)


# ============================================================================================
# Reference and the bmm formulation
# ============================================================================================

def monarch_bmm(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    strided: bool = True,
    acc_dtype: Optional[torch.dtype] = None,
    return_h: bool = False,
):
    """The two-``bmm`` formulation with explicit permutes (what Monarch's reference code does).

    x: (..., K), w1: (b, b·r, kb), w2: (b, nb, b·r), bias: (N,) or None -> (..., N).

    With ``acc_dtype=None`` everything runs in ``x``'s dtype (the unfused benchmark baseline).
    With ``acc_dtype`` (the reference) the products run in that dtype and the intermediate is
    rounded in between to ``intermediate_dtype(x.dtype)`` as the kernels do: ``x``'s dtype, fp32
    for fp16. ``return_h`` also returns ``h'`` as ``(M, b·b·r)`` in the ``hbuf[m, l, j, t]``
    layout the kernels save, in that same dtype.
    """
    b, r, kb, nb = factor_dims(w1, w2)
    K = x.shape[-1]
    lead = x.shape[:-1]
    acc = acc_dtype or x.dtype
    inter = intermediate_dtype(x.dtype) if acc_dtype is not None else x.dtype
    x2 = x.reshape(-1, K).to(acc)
    M = x2.shape[0]
    if b * kb != K:
        x2 = torch.nn.functional.pad(x2, (0, b * kb - K))
    # R: (b_j, M, kb) @ (b_j, kb, b·r) -> (b_j, M, b·r), column p = l·r + t
    h = torch.bmm(x2.reshape(M, b, kb).transpose(0, 1), w1.to(acc).transpose(1, 2))
    if acc != inter:
        h = h.to(inter).to(acc)
    # P₁: (j, M, l, t) -> (l, M, j, t)
    h = h.reshape(b, M, b, r).permute(2, 1, 0, 3).reshape(b, M, b * r)
    # L: (b_l, M, b·r) @ (b_l, b·r, nb) -> (b_l, M, nb)
    u = torch.bmm(h, w2.to(acc).transpose(1, 2))
    # P₂
    if strided:
        y = u.permute(1, 2, 0).reshape(M, nb * b)   # y[s·b + l] = u[l, s]
    else:
        y = u.permute(1, 0, 2).reshape(M, b * nb)   # y[l·nb + s] = u[l, s]
    y = y[:, :out_features]
    if bias is not None:
        y = y + bias.to(acc)
    y = y.to(x.dtype).reshape(*lead, out_features)
    if return_h:
        return y, h.transpose(0, 1).reshape(M, b * b * r).to(inter)
    return y


def monarch_linear_ref(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_features: Optional[int] = None,
    strided: bool = True,
) -> torch.Tensor:
    """Pure-PyTorch Monarch (``strided=True``) or block-wise low-rank (``strided=False``) linear,
    fp32 accumulation (fp64 stays fp64), the intermediate rounded to ``intermediate_dtype(x.dtype)``
    (``x``'s dtype; fp32 for fp16).

    x: (..., K), w1: (b, b·r, kb), w2: (b, nb, b·r), bias: (N,) or None -> (..., N); ``N``
    defaults to ``bias.shape[0]``, else ``b·nb``. Differentiable with ordinary autograd.
    """
    b, _, _, nb = factor_dims(w1, w2)
    if out_features is None:
        out_features = bias.shape[0] if bias is not None else b * nb
    acc = acc_dtype(x.dtype)
    return monarch_bmm(x, w1, w2, bias, out_features, strided, acc_dtype=acc)


def dense_weight_ref(
    w1: torch.Tensor, w2: torch.Tensor, in_features: int, out_features: int, strided: bool = True
) -> torch.Tensor:
    """The ``(N, K)`` matrix ``W[o(l, s), j·kb + c] = Σ_t w2[l, s, j·r+t]·w1[j, l·r+t, c]``."""
    b, r, kb, nb = factor_dims(w1, w2)
    w4 = torch.einsum(
        "lsjt,jltc->lsjc", w2.reshape(b, nb, b, r), w1.reshape(b, b, r, kb)
    )  # (l, s, j, c)
    if strided:
        w4 = w4.permute(1, 0, 2, 3)  # row index s·b + l
    return w4.reshape(b * nb, b * kb)[:out_features, :in_features]


def monarch_bwd_ref(g, x, w1, w2, h, strided, need_x=True, need_w1=True, need_w2=True, has_bias=True):
    """Backward of :func:`monarch_linear_ref` by the formulas of the module docstring.

    g: (M, N), x: (M, K), h: (M, b·b·r) saved ``hbuf`` or None -> (dx, dw1, dw2, db) (None where
    not needed). fp32 accumulation; ``h`` (when recomputed) and ``dh`` rounded to
    ``intermediate_dtype(x.dtype)`` like the kernels (no rounding for fp16: they stay fp32).
    """
    b, r, kb, nb = factor_dims(w1, w2)
    M, N = g.shape
    K = x.shape[1]
    acc = acc_dtype(x.dtype)
    inter = intermediate_dtype(x.dtype)
    gy = g.to(acc)
    if b * nb != N:
        gy = torch.nn.functional.pad(gy, (0, b * nb - N))
    gl = gy.reshape(M, nb, b).transpose(1, 2) if strided else gy.reshape(M, b, nb)  # (M, l, s)
    xa = x.to(acc)
    if b * kb != K:
        xa = torch.nn.functional.pad(xa, (0, b * kb - K))
    xa = xa.reshape(M, b, kb)
    w1a, w2a = w1.to(acc), w2.to(acc)
    dx = dw1 = dw2 = db = None
    if need_w2:
        if h is None:
            hj = torch.einsum("mjc,jpc->mjp", xa, w1a).to(inter).to(acc)
            hl = hj.reshape(M, b, b, r).transpose(1, 2).reshape(M, b, b * r)
        else:
            hl = h.to(acc).reshape(M, b, b * r)
        dw2 = torch.einsum("mls,mlq->lsq", gl, hl).to(w2.dtype)
    if need_x or need_w1:
        dhl = torch.einsum("mls,lsq->mlq", gl, w2a)
        if inter != acc:
            dhl = dhl.to(inter).to(acc)
        dhj = dhl.reshape(M, b, b, r).transpose(1, 2).reshape(M, b, b * r)  # (M, j, l·r + t)
        if need_x:
            dx = torch.einsum("mjp,jpc->mjc", dhj, w1a).reshape(M, b * kb)[:, :K].to(x.dtype)
        if need_w1:
            dw1 = torch.einsum("mjp,mjc->jpc", dhj, xa).to(w1.dtype)
    if has_bias:
        db = g.to(acc).sum(0).to(g.dtype)
    return dx, dw1, dw2, db


# ============================================================================================
# Kernels
# ============================================================================================

# Autotune spaces, each with two named members: *_INTERP, the one config the interpreter runs, and
# *_FIXED, the one deterministic runs launch (kernels._config.Tunable).
CHAIN_INTERP = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_R=16, num_warps=4, num_stages=2)
CHAIN_FIXED = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, BLOCK_R=32, num_warps=4, num_stages=3)
CHAIN_SPACE = [
    CHAIN_INTERP,
    CHAIN_FIXED,
    dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, BLOCK_R=16, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_R=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, BLOCK_R=16, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, BLOCK_R=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, BLOCK_R=16, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, BLOCK_R=16, num_warps=4, num_stages=3),
]

BGEMM_INTERP = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2)
BGEMM_FIXED = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
BGEMM_SPACE = [
    BGEMM_INTERP,
    BGEMM_FIXED,
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
]

# the row-block kernel (one program per BLOCK_M rows and all its output tiles, h on chip)
ROWS_INTERP = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
ROWS_FIXED = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
# (the interpreter's config last: where the model predicts a tie, the wider tiles come first)
ROWS_SPACE = [
    ROWS_FIXED,
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3),
    # FMA-sized tiles (small b·r on the FMA units; see _prune_rows)
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
    # (FMA builds only, _ROWS_FMA_ONLY: b·r = 8 within 64 registers, 8 warps)
    dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    # wide input steps (the batched stage 1 takes >= 16 offsets of each of the b blocks)
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=256, num_warps=4, num_stages=2),
    # wide output tiles (the batched stage 2 writes >= 16 rows of each of the b blocks)
    dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=256, BLOCK_K=128, num_warps=4, num_stages=2),
    # both products batched (Monarch dx at b·r = 16: >= 16 offsets of each block on both sides)
    dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=256, num_warps=4, num_stages=2),
    ROWS_INTERP,
]
#: configs only the FMA builds take (the tensor-core builds keep the space they were checked with)
_ROWS_FMA_ONLY = [ROWS_SPACE[i] for i in (8, 9)]


def _fma_only(c) -> bool:
    return any(c == f for f in _ROWS_FMA_ONLY)


#: the row-block kernel with stage 1's reduction split (``KSPLIT``, few rows): the plan
#: (:func:`rows_ksplit_plan`) fixes ``BLOCK_M``, ``BLOCK_N`` and the grid; these configs tune the
#: rest. Every split is a whole number of ``ROWS_KS_QUANTUM`` input features (a multiple of every
#: ``BLOCK_K`` here), so the grid and the workspace do not depend on the config.
ROWS_KS_INTERP = dict(BLOCK_K=16, num_warps=4, num_stages=1)
ROWS_KS_FIXED = dict(BLOCK_K=128, num_warps=4, num_stages=3)
ROWS_KS_SPACE = [   # (the interpreter's config last; a GPU never takes it: _prune_rows_ks)
    ROWS_KS_FIXED,
    dict(BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_K=128, num_warps=8, num_stages=3),
    ROWS_KS_INTERP,
]
#: input features per split are a multiple of this on a GPU (the interpreter's: 16)
ROWS_KS_QUANTUM = 128

#: the backward dx launch that also takes dw2's partials (DW2): its row blocks are the partials'
#: rows, so BLOCK_M is fixed (:func:`rows_dw2_block_m`) and the space tunes the rest
ROWS_DW2_BLOCK_M = 64
#: most rows of the one-launch backward (dx, dw1, dw2, db at one row block: :func:`rows_one_launch`;
#: its 64-row builds spilled in compile-check's generic sm_90 specializations, 80-224 bytes)
ROWS_ONE_LAUNCH_MAX_M = 32
ROWS_DW2_INTERP = dict(BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
ROWS_DW2_FIXED = dict(BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)
#: 8 warps: the saved h, the dw2 product and stage 1 side by side spilled with 4 (compile-check,
#: generic sm_90 builds: 56-1728 bytes at 64 x 128 and 128-wide steps); BLOCK_N = 128 only at
#: HP = 16 (488 bytes at HP = 64)
ROWS_DW2_SPACE = [   # (the interpreter's config last; a GPU never takes it: _prune_rows_dw2)
    ROWS_DW2_FIXED,
    dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    ROWS_DW2_INTERP,
]


#: the weight-gradient kernel (a packed product over a split of the rows, fixed-order partials)
WGRAD_INTERP = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
WGRAD_FIXED = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)
WGRAD_SPACE = [
    WGRAD_FIXED,
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=256, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=512, num_warps=8, num_stages=2),
    WGRAD_INTERP,
]
#: narrowest feature tile of the space: the most tiles (arrival counters) a launch can have
WGRAD_MIN_BN = min(c["BLOCK_N"] for c in WGRAD_SPACE)
#: widest on-chip h (columns, b·b·r padded) the row-block kernel takes (b = 16 at rank 1)
ROWS_MAX_WIDTH = 256
#: largest packed second-stage factor tile (HP x BLOCK_N elements) a row-block config may stage:
#: HP = 256 with BLOCK_N = 256 asks 180 KB (sm_80) / 304 KB (sm_90) of shared memory, over the
#: per-block limit (compile-check); 256 x 128 fits
ROWS_MAX_W2_TILE = 256 * 128


#: largest b·r whose products the row-block kernel may run on the FMA units (then b·r FMAs per
#: input and per output element; a 16-wide tensor-core tile issues 16/(b·r) times the useful FLOPs).
#: The FMA build is taken where predicted at least as fast as the tensor-core one (:func:`rows_fma`).
#: History: its first build reduced across lanes inside its loops (sm_90 SASS, b = 4, r = 1,
#: M16,N128,K128: ~1050 instructions per input block, 448 of them SHFL, and ~450 per output tile,
#: ~94 µs of issue at 4096², M = 16384 against ~65 µs predicted for the tensor-core build); the
#: present one accumulates elementwise in x's own layout and reduces once per input block (~230
#: instructions), and writes each output tile as b·r rank-1 updates (~166 instructions, no
#: reduction): 46.5 M warp-instructions there, ~46 µs of issue under the ~62 µs of DRAM time.
ROWS_FMA_MAX_BR = 8


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _rows_fma_eligible(nblocks: int, rank: int, in_interleaved: bool, out_interleaved: bool) -> bool:
    return (not in_interleaved and out_interleaved and _pow2(nblocks) and _pow2(rank)
            and nblocks * rank <= ROWS_FMA_MAX_BR)


def rows_fma(nblocks: int, rank: int, in_interleaved: bool = False, out_interleaved: bool = True,
             M: Optional[int] = None, K: Optional[int] = None, N: Optional[int] = None, elem: int = 2,
             save_h: bool = False) -> bool:
    """Whether the row-block kernel computes both products on the FMA units (only the useful
    multiply-adds) instead of padded tensor-core tiles. Only the Monarch forward (contiguous input
    blocks, interleaved output) with power-of-two ``b`` and ``r`` and ``b·r <= ROWS_FMA_MAX_BR`` has
    the FMA build; there it is taken where its predicted time (:func:`_path_seconds`, with its
    instruction issue from :data:`ROWS_FMA_ISSUE`) is at most the tensor-core build's, for the
    shape ``(M, K, N)`` (no shape given: off). ``FASTFACTOR_MONARCH_FMA=1`` / ``0`` forces it on /
    off where it exists."""
    if not _rows_fma_eligible(nblocks, rank, in_interleaved, out_interleaved):
        return False
    env = os.environ.get("FASTFACTOR_MONARCH_FMA")
    if env in ("0", "1"):
        return env == "1"
    if M is None or K is None or N is None:
        return False
    return _fma_faster(M, K, N, nblocks, rank, elem, save_h)


@functools.lru_cache(maxsize=4096)
def _fma_faster(M: int, K: int, N: int, nblocks: int, rank: int, elem: int, save_h: bool) -> bool:
    """:func:`rows_fma`'s model decision, cached per shape (the launcher asks at every launch)."""
    t = lambda p: _path_seconds(M, K, N, nblocks, rank, p, elem, elem, save_h, True)
    return t("rows_fma") <= t("rows_mma")


#: Per-instruction model of the FMA build of the row-block kernel (``rows_fma_warp_instructions``),
#: warp-instructions issued per warp, from its sm_90 SASS (``fastfactor sol --sass``; builds of
#: b·r = 2, 4, 8 at 4096², M16-64 x N64-128 x K64-128 tiles, 4 and 8 warps, the largest figure seen
#: per b·r): per stage-1 multiply-add of a thread (x and the factor converted, the address
#: arithmetic; the loop's instructions / its FFMAs: 2.4-2.8 at b·r <= 4, 3.6 at 8), per input
#: block (the one reduction over the block's features and the placement; 207-266), per stage-2
#: multiply-add (2.3-2.8) and per output tile (store, bias), and per program (the rest).
#: tests/monarch/test_fma.py checks the model against the compiled loops.
ROWS_FMA_ISSUE = dict(stage1={1: 2.8, 2: 2.8, 4: 2.8, 8: 3.7}, block={1: 210, 2: 210, 4: 230, 8: 270},
                      stage2=2.6, tile=15, program=300)


def rows_fma_warp_instructions(NB: int, R: int, CB: int, F_OUT: int, BLOCK_M: int, BLOCK_N: int,
                               BLOCK_K: int, num_warps: int, split: int = 1):
    """``(warp-instructions of one program, loop trips)`` of the FMA build (the model of
    :data:`ROWS_FMA_ISSUE`; **predicted**). One program owns ``BLOCK_M`` rows: for each of the
    ``NB`` input blocks ``ceil(CB / BLOCK_K)`` steps of ``BLOCK_M·BLOCK_K·b·r / threads``
    multiply-adds per thread, then its share of the output tiles (``split`` programs share a row
    block's tiles), ``BLOCK_M·BLOCK_N·b·r / threads`` multiply-adds per thread each. The trips are
    those of the build's three loops in address order: input blocks, steps inside a block (nested),
    output tiles."""
    qt = NB * R
    m = ROWS_FMA_ISSUE
    threads = 32 * num_warps
    f1 = BLOCK_M * BLOCK_K * qt / threads
    f2 = BLOCK_M * BLOCK_N * qt / threads
    trips = cdiv(CB, BLOCK_K)
    tiles = cdiv(cdiv(F_OUT, BLOCK_N), max(1, split))
    key = min(8, next_pow2(qt))
    per_warp = (m["program"] + NB * (m["block"][key] + trips * m["stage1"][key] * f1)
                + tiles * (m["stage2"] * f2 + m["tile"]))
    return num_warps * per_warp, [NB, trips, tiles]


def _rows_issue_model(ints: dict, constexprs: dict, config: dict, grid) -> Optional[tuple]:
    """:data:`kernels._cost.ISSUE_MODELS` entry of the row-block kernel: its FMA build only."""
    if not constexprs.get("FMA"):
        return None
    return rows_fma_warp_instructions(
        int(ints["NB"]), int(ints["R"]), int(ints["CB"]), int(ints["F_OUT"]), config["BLOCK_M"],
        config["BLOCK_N"], config["BLOCK_K"], config.get("num_warps", 4), int(grid[1]) if len(grid) > 1 else 1)


_cost.ISSUE_MODELS["monarch.rows"] = _rows_issue_model
_cost.ISSUE_MODELS["monarch.rows_fp16"] = _rows_issue_model


def _prune_rows(configs_, named_args, **kwargs):
    """With FMA products: drop the configs whose per-thread FMA tiles (``BLOCK_M x b·r x
    BLOCK_K`` for stage 1, ``BLOCK_M x BLOCK_N x b·r`` for stage 2) exceed 64 fp32 registers."""
    get = lambda k: kwargs.get(k, named_args.get(k))
    if not get("FMA"):
        # the fp32 h (BLOCK_M x HP) within 64 registers per thread; BATCHED: >= 16 offsets per block
        hp = get("HP") or 16
        # the second factor's tile: (HP x BLOCK_N) packed, (b·r x BLOCK_N) batched
        w2h = get("NBC") * get("RC") if get("BATCHED2") else hp
        kept = [c for c in configs_ if not _fma_only(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
                and c.kwargs["BLOCK_M"] * hp <= 64 * 32 * c.num_warps
                and w2h * c.kwargs["BLOCK_N"] <= ROWS_MAX_W2_TILE
                and (not get("BATCHED") or c.kwargs["BLOCK_K"] >= 16 * get("NBC"))
                and (not get("BATCHED2") or c.kwargs["BLOCK_N"] >= 16 * get("NBC"))]
        return kept or configs_[-1:]
    qt = get("NBC") * get("RC")
    kept = []
    for c in configs_:
        k, threads = c.kwargs, 32 * c.num_warps
        if (k["BLOCK_M"] * qt * k["BLOCK_K"] <= 64 * threads and k["BLOCK_M"] * k["BLOCK_N"] * qt <= 64 * threads
                and k["BLOCK_N"] % get("NBC") == 0):
            kept.append(c)
    return kept or configs_[-1:]


def rows_space(FMA: bool = False, NBC: int = 1, RC: int = 1, HP: int = 16, BATCHED: bool = False,
               BATCHED2: bool = False, **_) -> list[dict]:
    """The row-block kernel's autotune space for a compile variant (:func:`_prune_rows`'s rule)."""
    if not FMA:
        w2h = NBC * RC if BATCHED2 else HP
        return [c for c in ROWS_SPACE if not _fma_only(c) and c["BLOCK_M"] * HP <= 2048 * c["num_warps"]
                and w2h * c["BLOCK_N"] <= ROWS_MAX_W2_TILE
                and (not BATCHED or c["BLOCK_K"] >= 16 * NBC) and (not BATCHED2 or c["BLOCK_N"] >= 16 * NBC)]
    qt = NBC * RC
    return [c for c in ROWS_SPACE
            if c["BLOCK_M"] * qt * c["BLOCK_K"] <= 2048 * c["num_warps"]
            and c["BLOCK_M"] * c["BLOCK_N"] * qt <= 2048 * c["num_warps"] and c["BLOCK_N"] % NBC == 0]


def _rows_ks_tile_ok(bm: int, bn: int, hp: int, blockwise: bool = False) -> bool:
    """Tiles the split stage 1 plans with. The packed stage 1: ``BLOCK_M x HP <= 1024`` fp32 values
    of ``h``, ``BLOCK_M x BLOCK_N <= 4096`` and ``BLOCK_N = 128`` only up to ``HP = 32``; the
    per-block stage 1 (``BLOCKWISE``, ``HP`` up to 256): 16 x 64 (16 x 128 spilled in a generic
    sm_90 build). With :func:`_rows_ks_cfg_ok` no
    build spills (compile-check ``monarch.rows_ksplit``, sm_80/sm_90, aligned and generic; the
    generic builds of wider packed tiles spill, split or not)."""
    if blockwise:
        return bm == 16 and bn == 64
    return bm * hp <= 1024 and bm * bn <= 4096 and (bn <= 64 or hp <= 32)


def _rows_ks_cfg_ok(hp: int, cfg: dict, blockwise: bool = False) -> bool:
    if cfg["BLOCK_K"] < 64:
        return False
    return blockwise or hp * cfg["BLOCK_K"] <= 1024 * cfg["num_warps"]


def _prune_rows_ks(configs_, named_args, **kwargs):
    """The split stage 1's configs within :func:`_rows_ks_cfg_ok` (the interpreter's 16-wide steps
    only under the interpreter)."""
    if _config.is_interpreter():
        return configs_
    get = lambda k: kwargs.get(k, named_args.get(k))
    hp, bw = get("HP") or 16, bool(get("BLOCKWISE"))
    kept = [c for c in configs_ if _rows_ks_cfg_ok(hp, dict(c.kwargs, num_warps=c.num_warps), bw)]
    return kept or configs_[-1:]


def rows_dw2_block_m() -> int:
    """Rows per program (and per dw2 partial) of the DW2 dx launch: :data:`ROWS_DW2_BLOCK_M` on a
    GPU, 16 under the interpreter (its config's tile)."""
    return 16 if _config.is_interpreter() else ROWS_DW2_BLOCK_M


def _prune_rows_dw2(configs_, named_args, **kwargs):
    """The DW2 launch's configs whose fp32 ``h`` (``BLOCK_M x HP``, and the saved ``h`` beside it)
    and second-factor tile fit as in :func:`_prune_rows` (the interpreter's only under it)."""
    if _config.is_interpreter():
        return configs_
    get = lambda k: kwargs.get(k, named_args.get(k))
    hp, bm = get("HP") or 16, get("BLOCK_M") or ROWS_DW2_BLOCK_M
    kept = [c for c in configs_ if _rows_dw2_cfg_ok(bm, hp, dict(c.kwargs, num_warps=c.num_warps))]
    return kept or configs_[:1]


def _rows_dw2_cfg_ok(bm: int, hp: int, cfg: dict) -> bool:
    return (cfg["BLOCK_K"] >= 64 and 2 * bm * hp <= 64 * 32 * cfg["num_warps"]
            and (cfg["BLOCK_N"] <= 64 or hp <= 16) and hp * cfg["BLOCK_N"] <= ROWS_MAX_W2_TILE)


def rows_dw2_space(HP: int = 16, DW1: bool = False, **_) -> list[dict]:
    """The compile tier's configs of the DW2 dx launch (its fixed row tile, the tuned rest; the
    one-launch backward's row tiles for ``DW1``)."""
    bms = (16, ROWS_ONE_LAUNCH_MAX_M) if DW1 else (ROWS_DW2_BLOCK_M,)
    return [dict(BLOCK_M=bm, **c) for bm in bms for c in ROWS_DW2_SPACE[:-1] if _rows_dw2_cfg_ok(bm, HP, c)]


def rows_ks_space(HP: int = 16, BLOCKWISE: bool = False, DW1: bool = False, **_) -> list[dict]:
    """The compile tier's configs of the split stage 1 (:func:`rows_ksplit_plan`'s tiles with every
    tuned config at 16 rows and the first one kept at the others; the one-launch backward
    (``DW1``) only at 16 rows, where :func:`rows_one_launch` takes it)."""
    out = []
    for bm in ((16,) if DW1 else (16, 32, 64)):
        for bn in (64, 128):
            if _rows_ks_tile_ok(bm, bn, HP, BLOCKWISE):
                cs = [c for c in ROWS_KS_SPACE if _rows_ks_cfg_ok(HP, c, BLOCKWISE)]
                out += [dict(BLOCK_M=bm, BLOCK_N=bn, **c) for c in (cs if bm == 16 else cs[:1])]
    return out


def _wgrad_fits(cfg: dict, num_warps: int, hp: int, batched: bool = False, nbc: int = 1) -> bool:
    """The weight-gradient accumulator (``BLOCK_N x HP`` fp32; per block when batched, whose
    product then takes at least 16 rows per block) within 64 registers per thread."""
    if batched:
        return cfg["BLOCK_N"] >= 16 * nbc and cfg["BLOCK_N"] * hp // nbc <= 64 * 32 * num_warps
    return cfg["BLOCK_N"] * hp <= 64 * 32 * num_warps


def _prune_wgrad(configs_, named_args, **kwargs):
    """Keep the fp32 accumulator (BLOCK_N x HP) within 64 registers per thread."""
    get = lambda k: kwargs.get(k, named_args.get(k))
    hp, batched = get("HP") or 16, bool(get("BATCHED"))
    nbc = get("NBC") or 1
    kept = [c for c in configs_ if _wgrad_fits(c.kwargs, c.num_warps, hp, batched, nbc)]
    return kept or configs_[-1:]


def _wgrad_pair_fits(cfg: dict, num_warps: int, hp_a: int, hp_b: int, batched: bool, nbc: int) -> bool:
    """Both sides of the one-launch weight gradients fit (:func:`_wgrad_fits`); with a batched
    side, ``BLOCK_N <= 256`` (512 spills on sm_90 with the blockwise side beside it: compile-check)."""
    return (_wgrad_fits(cfg, num_warps, hp_a) and _wgrad_fits(cfg, num_warps, hp_b, batched, nbc)
            and (not batched or cfg["BLOCK_N"] <= 256))


def _prune_wgrad_pair(configs_, named_args, **kwargs):
    """The configs both sides of the one-launch weight gradients keep (:func:`_wgrad_pair_fits`);
    the interpreter's config alone when none does."""
    get = lambda k: kwargs.get(k, named_args.get(k))
    hp_a, hp_b = get("HP_A") or 16, get("HP_B") or 16
    batched, nbc = bool(get("BATCHED_B")), get("NBC_B") or 1
    kept = [c for c in configs_ if _wgrad_pair_fits(c.kwargs, c.num_warps, hp_a, hp_b, batched, nbc)]
    return kept or configs_[-1:]


def wgrad_space(HP: int = 16, BATCHED: bool = False, NBC: int = 1, **_) -> list[dict]:
    return [c for c in WGRAD_SPACE if _wgrad_fits(c, c["num_warps"], HP, BATCHED, NBC)]


def wgrad_pair_space(HP_A: int = 16, HP_B: int = 16, BATCHED_B: bool = False, NBC_B: int = 1, **_) -> list[dict]:
    return [c for c in WGRAD_SPACE if _wgrad_pair_fits(c, c["num_warps"], HP_A, HP_B, BATCHED_B, NBC_B)]


def rows_width(nblocks: int, rank: int) -> int:
    """Columns of the row-block kernel's on-chip ``h``: ``b·b·r`` padded to a power of two >= 16."""
    return max(16, next_pow2(nblocks * nblocks * rank))


def _pick_rows(named: dict) -> dict:
    """Deterministic config of the row-block kernel: small row tiles for few rows."""
    M = named.get("M", 1 << 20)
    if M <= 2048:
        return ROWS_SPACE[4]
    if M <= 8192:
        return ROWS_SPACE[3]
    return ROWS_FIXED



#: largest BLOCK_R x BLOCK_N (the w2 tile of the chain's second product) with an fp32 intermediate:
#: that tile is then converted to fp32 too, and BLOCK_R = 64 x BLOCK_N = 128 spills on sm_90
#: (compile-check: 40 bytes of stack)
_H_FP32_MAX_TILE = 4096


def chain_space(H_FP32: bool = False, **_) -> list[dict]:
    """The chain's autotune space for a compile variant: without the tiles that spill when the
    intermediate stays in fp32 (``H_FP32``, fp16 inputs)."""
    if not H_FP32:
        return CHAIN_SPACE
    return [c for c in CHAIN_SPACE if c["BLOCK_R"] * c["BLOCK_N"] <= _H_FP32_MAX_TILE]


def _prune_chain(configs_, named_args, **kwargs):
    """Drop configs whose rank chunk or output tile is far larger than the problem's, and, with
    an fp32 intermediate, those :func:`chain_space` leaves out."""
    get = lambda k: kwargs.get(k, named_args.get(k))
    r_pad = max(16, next_pow2(get("R")))
    sb_pad = max(16, next_pow2(get("SB")))
    max_tile = _H_FP32_MAX_TILE if get("H_FP32") else 1 << 30
    kept = [
        c for c in configs_
        if c.kwargs["BLOCK_R"] <= r_pad and c.kwargs["BLOCK_N"] <= max(64, sb_pad)
        and c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_N"] <= max_tile
    ]
    return kept or configs_[:1]


if HAS_TRITON:

    @triton.jit
    def _chain_kernel(
        # --- pointers ---
        a_ptr,     # (M, F_IN) input rows: x (forward) or g = dL/dy (backward dx)
        w1_ptr,    # first factor; element (q, p, t, c) at q*s1q + p*s1p + t*s1t + c*s1c
                   #   forward: w1[q, p*R + t, c]; backward: w2[q, c, p*R + t]
        w2_ptr,    # second factor; element (p, s, q, t) at p*s2p + s*s2s + q*s2q + t*s2t
                   #   forward: w2[p, s, q*R + t]; backward: w1[p, q*R + t, s]
        bias_ptr,  # (F_OUT,) bias added to the output; read only when HAS_BIAS
        z_ptr,     # (M, F_OUT) output: y (forward) or dx (backward)
        h_ptr,     # intermediate (fp32 when H_FP32), element (m, q, p, t) at
                   #   m*shm + q*shq + p*shp + t*sht; written only when STORE_H, by the programs
                   #   of the first output tile
        # --- dimensions ---
        M,         # rows
        NB,        # number of blocks b (input and output)
        R,         # rank of every sub-block
        CB,        # input block size (kb forward, nb backward)
        SB,        # output block size (nb forward, kb backward)
        F_IN,      # input features (K forward, N backward): input columns >= F_IN are padding
        F_OUT,     # output features: output columns >= F_OUT are padding
        M_BUCKET,  # power-of-two bucket of M: autotune key only
        # --- index maps: input feature of (q, c) = q*IQ + c*IC; output feature of (p, s) = p*OP + s*OS
        IQ, IC, OP, OS,
        # --- strides (in elements) ---
        stride_am, stride_af,
        s1q, s1p, s1t, s1c,
        s2p, s2s, s2q, s2t,
        stride_zm, stride_zf,
        shm, shq, shp, sht,
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        STORE_H: tl.constexpr,
        H_FP32: tl.constexpr,     # keep the intermediate in fp32 (fp16 inputs: range safety)
        UPCAST: tl.constexpr,     # upcast dot operands to fp32 (interpreter)
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
        FP64: tl.constexpr,       # float64 operands and accumulators (interpreter tier: gradcheck)
        BLOCK_M: tl.constexpr,    # rows per program
        BLOCK_N: tl.constexpr,    # output rows of block p per program
        BLOCK_K: tl.constexpr,    # reduction chunk over the input block
        BLOCK_R: tl.constexpr,    # rank chunk (the intermediate tile is BLOCK_M x BLOCK_R)
    ):
        pid_m = tl.program_id(0)
        p = tl.program_id(1)       # output block
        pid_n = tl.program_id(2)   # tile inside the output block
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_s = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        mask_m = offs_m < M
        mask_s = offs_s < SB
        f_out = p * OP + offs_s * OS
        mask_o = mask_s & (f_out < F_OUT)

        if FP64:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for q in range(0, NB):
            for t0 in range(0, R, BLOCK_R):
                tt = t0 + offs_r
                mask_t = tt < R
                # ---- stage 1: h[:, q, p, t-chunk] = a[:, block q] · w1[q, p, t-chunk, :]ᵀ ----
                if FP64:
                    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float64)
                else:
                    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for c0 in range(0, CB, BLOCK_K):
                    cc = c0 + offs_k
                    mask_c = cc < CB
                    f_in = q * IQ + cc * IC
                    a = tl.load(
                        a_ptr + offs_m[:, None] * stride_am + f_in[None, :] * stride_af,
                        mask=mask_m[:, None] & (mask_c & (f_in < F_IN))[None, :], other=0.0,
                    )
                    w1 = tl.load(  # (BLOCK_K, BLOCK_R)
                        w1_ptr + q * s1q + p * s1p + tt[None, :] * s1t + cc[:, None] * s1c,
                        mask=mask_t[None, :] & mask_c[:, None], other=0.0,
                    )
                    if UPCAST and not FP64:
                        a = a.to(tl.float32)
                        w1 = w1.to(tl.float32)
                    h = tl.dot(a, w1, h, input_precision=PRECISION)
                if H_FP32:
                    h_lo = h                              # fp32: h may exceed fp16's range
                else:
                    h_lo = h.to(z_ptr.dtype.element_ty)   # rounded like a two-matmul path
                if STORE_H:
                    if pid_n == 0:
                        tl.store(
                            h_ptr + offs_m[:, None] * shm + q * shq + p * shp + tt[None, :] * sht,
                            h_lo.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_t[None, :],
                        )
                # ---- stage 2 (P₁ is the choice of slices): acc += h · w2[p, s-tile, q, t-chunk]ᵀ ----
                w2 = tl.load(  # (BLOCK_R, BLOCK_N)
                    w2_ptr + p * s2p + offs_s[None, :] * s2s + q * s2q + tt[:, None] * s2t,
                    mask=mask_s[None, :] & mask_t[:, None], other=0.0,
                )
                if (UPCAST or H_FP32) and not FP64:  # H_FP32: TF32 dot on the fp32 intermediate
                    h_lo = h_lo.to(tl.float32)
                    w2 = w2.to(tl.float32)
                acc = tl.dot(h_lo, w2, acc, input_precision=PRECISION)

        if HAS_BIAS:
            bias = tl.load(bias_ptr + f_out, mask=mask_o, other=0.0).to(acc.dtype)
            acc = acc + bias[None, :]
        # P₂ is the addressing of this store
        tl.store(
            z_ptr + offs_m[:, None] * stride_zm + f_out[None, :] * stride_zf,
            acc.to(z_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_o[None, :],
        )

    @triton.jit
    def _bgemm_kernel(
        # --- pointers ---
        a_ptr,       # A[g, i, k] at g*sag + i*sai + k*sak; feature g*FAG + i*FAI + k*FAK < FA_LIM
                     #   (fp32 when it is an fp32 intermediate of fp16 inputs, see MIXED)
        b_ptr,       # B[g, k, j] at g*sbg + k*sbk + j*sbj; feature g*FBG + k*FBK + j*FBJ < FB_LIM
                     #   (likewise; at most one of A and B differs from the input dtype)
        c_ptr,       # C[g, i, j] at g*scg + i*sci + (j // CSPLIT)*scj_hi + (j % CSPLIT)*scj;
                     #   feature g*FCG + j*FCJ < FC_LIM (rows outside it are not written)
        bias_ptr,    # indexed by C's feature, added to C; read only when HAS_BIAS
        rowsum_ptr,  # fp32 Σ_k A[g, i, k] at A's feature g*FAG + i*FAI; written when ROWSUM
        # --- dimensions ---
        G, I, J, KR,  # batch, rows, columns, reduction length
        # --- strides (in elements) and feature maps ---
        sag, sai, sak, FAG, FAI, FAK, FA_LIM,
        sbg, sbk, sbj, FBG, FBK, FBJ, FB_LIM,
        scg, sci, scj, scj_hi, CSPLIT, FCG, FCJ, FC_LIM,
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        ROWSUM: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        FP64: tl.constexpr,       # float64 operands and accumulators (interpreter tier: gradcheck)
        MIXED: tl.constexpr,      # A and B differ in dtype (fp32 intermediate x fp16): both to fp32
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        g = tl.program_id(1)
        num_pid_n = tl.cdiv(J, BLOCK_N)
        pid_m = pid // num_pid_n
        pid_n = pid % num_pid_n
        offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_i = offs_i < I
        mask_j = offs_j < J
        fa_i = g * FAG + offs_i * FAI
        fb_j = g * FBG + offs_j * FBJ

        if FP64:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
            rsum = tl.zeros((BLOCK_M,), dtype=tl.float64)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            rsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, KR, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < KR
            a = tl.load(
                a_ptr + g * sag + offs_i[:, None] * sai + kk[None, :] * sak,
                mask=mask_i[:, None] & mask_k[None, :]
                & ((fa_i[:, None] + kk[None, :] * FAK) < FA_LIM),
                other=0.0,
            )
            b = tl.load(
                b_ptr + g * sbg + kk[:, None] * sbk + offs_j[None, :] * sbj,
                mask=mask_k[:, None] & mask_j[None, :]
                & ((fb_j[None, :] + kk[:, None] * FBK) < FB_LIM),
                other=0.0,
            )
            if ROWSUM:
                rsum += tl.sum(a.to(rsum.dtype), axis=1)
            if (UPCAST or MIXED) and not FP64:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

        f_c = g * FCG + offs_j * FCJ
        mask_cj = mask_j & (f_c < FC_LIM)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + f_c, mask=mask_cj, other=0.0).to(acc.dtype)
            acc = acc + bias[None, :]
        col = (offs_j // CSPLIT) * scj_hi + (offs_j % CSPLIT) * scj
        tl.store(
            c_ptr + g * scg + offs_i[:, None] * sci + col[None, :],
            acc.to(c_ptr.dtype.element_ty),
            mask=mask_i[:, None] & mask_cj[None, :],
        )
        if ROWSUM:
            if pid_n == 0:
                tl.store(rowsum_ptr + fa_i, rsum.to(rowsum_ptr.dtype.element_ty), mask=mask_i & (fa_i < FA_LIM))

    @triton.jit
    def _split_last(t, N: tl.constexpr):
        """The ``N`` (1, 2, 4 or 8) slices ``t[..., j]`` of a tensor whose last axis has size ``N``,
        as an 8-tuple (unused entries repeat slice 0): ``tl.split`` halves, no reduction, no data
        movement once the axis is held by one thread."""
        if N == 1:
            t0 = tl.reshape(t, t.shape[:-1])
            return t0, t0, t0, t0, t0, t0, t0, t0
        elif N == 2:
            t0, t1 = tl.split(t)
            return t0, t1, t0, t0, t0, t0, t0, t0
        elif N == 4:
            # j = 2·i + k: the first split takes k, the second i
            e, o = tl.split(tl.reshape(t, t.shape[:-1] + (2, 2)))
            t0, t2 = tl.split(e)
            t1, t3 = tl.split(o)
            return t0, t1, t2, t3, t0, t0, t0, t0
        else:
            # j = 4·i + 2·k + l
            e, o = tl.split(tl.reshape(t, t.shape[:-1] + (2, 2, 2)))   # l
            ee, eo = tl.split(e)                                        # k (l = 0)
            oe, oo = tl.split(o)                                        # k (l = 1)
            t0, t4 = tl.split(ee)
            t2, t6 = tl.split(eo)
            t1, t5 = tl.split(oe)
            t3, t7 = tl.split(oo)
            return t0, t1, t2, t3, t4, t5, t6, t7

    @triton.jit
    def _rows_kernel(
        # --- pointers ---
        a_ptr,     # (M, F_IN) input rows: x (forward) or g = dL/dy (backward dx)
        f1_ptr,    # first factor, element (q, p, t, c) at q*s1q + p*s1p + t*s1t + c*s1c
                   #   forward: w1[q, p*R + t, c]; backward: w2[q, c, p*R + t]
        f2_ptr,    # second factor, element (p, s, q, t) at p*s2p + s*s2s + q*s2q + t*s2t
                   #   forward: w2[p, s, q*R + t]; backward: w1[p, q*R + t, s]
        bias_ptr,  # (F_OUT,) added to the output; read only when HAS_BIAS
        z_ptr,     # (M, F_OUT) output: y (forward) or dx (backward)
        h_ptr,     # (M, NB*NB*R) intermediate, column p*NB*R + q*R + t (hbuf[m, l, j, t] forward,
                   #   dh[m, j, l, t] backward); written when STORE_H by the programs of split 0
        ws_ptr,    # KSPLIT: (KS, OS, M, HP) partials of h (fp32; fp64 when FP64), element
                   #   (k, o, m, c) at ((k*OS + o)*M + m)*HP + c; KS, OS = grid axes 2, 1
        cnt_ptr,   # KSPLIT and SYNC: int32 arrival counters, one per (row block, output split)
                   #   at pid_m*OS + pid_o, zero between launches
        hs_ptr,    # DW2 (backward dx): (M, NB*NB*R) the forward's saved h, column l*NB*R + q
                   #   (hbuf[m, l, q]), read once per program
        pw_ptr,    # DW2: fp32 (fp64 with FP64) partials of dw2 per row block: element
                   #   (pid_m, l, s, q) at pid_m*spw + l*spw_l + s*spw_s + q, q < NB*R
        prs_ptr,   # DW2 and DB2: partials of db = Σ_m g per row block, element (pid_m, f) at
                   #   pid_m*sprs + f
        x1_ptr,    # DW1: (M, F_OUT) the layer's input x (backward dx at one row block)
        w1g_ptr,   # DW1: dw1 (b, b·r, kb) in w1's dtype, element (j, q, c) at j*sw1p + q*sw1q + c*sw1c
        # --- dimensions ---
        M, NB, R,
        CB,        # input block size (kb forward, nb backward)
        SB,        # output block size (nb forward, kb backward)
        F_IN, F_OUT,
        K_PER,     # input features per stage-1 split (KSPLIT: a multiple of BLOCK_K; else F_IN)
        M_BUCKET,  # autotune key only
        # --- strides (in elements) ---
        stride_am, stride_af, stride_zm, stride_zf, shm,
        shs,       # row stride of hs_ptr
        spw, spw_l, spw_s,   # strides of pw_ptr (row block, block l, position s)
        sprs,      # row-block stride of prs_ptr
        sx1m, sx1f,          # strides of x1_ptr
        sw1p, sw1q, sw1c,    # strides of w1g_ptr
        s1q, s1p, s1t, s1c,
        s2p, s2s, s2q, s2t,
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        STORE_H: tl.constexpr,
        H_FP32: tl.constexpr,          # keep the intermediate in fp32 (fp16 inputs: range safety)
        UPCAST: tl.constexpr,          # upcast dot operands to fp32 (interpreter)
        PRECISION: tl.constexpr,
        FP64: tl.constexpr,
        IN_INTERLEAVED: tl.constexpr,  # input feature f = c*NB + q (Monarch g); else q*CB + c
        OUT_INTERLEAVED: tl.constexpr, # output feature f = s*NB + p (Monarch y); else p*SB + s
        HP: tl.constexpr,              # columns of the on-chip h: a power of two >= max(16, NB*NB*R)
                                       #   (exactly NBC*NBC*RC with FMA)
        BLOCKWISE: tl.constexpr,       # stage 1 one unpadded product per input block (contiguous
                                       #   input blocks, b*r >= 16), placed into h by a 0/1 product
        QTP: tl.constexpr,             # NB*R padded to a power of two (BLOCKWISE), else 1
        BATCHED: tl.constexpr,         # stage 1 from interleaved input (Monarch g), power-of-two
                                       #   NB*R >= 16: one batched product over the NB input blocks
        BATCHED2: tl.constexpr,        # stage 2 to interleaved output (Monarch y), power-of-two
                                       #   NB*R >= 16: one batched product over the NB output blocks
        FMA: tl.constexpr,             # both products on the FMA units, only the useful products
                                       #   (small b*r; forward: contiguous input, interleaved output)
        NBC: tl.constexpr,             # NB as a constant (FMA, BATCHED; a power of two), else 1
        RC: tl.constexpr,              # R as a constant (FMA, BATCHED; a power of two), else 1
        KSPLIT: tl.constexpr,          # stage 1's reduction split over grid axis 2 (the packed and
                                       #   the per-block stage 1): partials summed by the last arrival
        SYNC: tl.constexpr,            # KSPLIT on a GPU: the reducer is the last program to arrive
                                       #   (counter); else the last split (interpreter order)
        DW2: tl.constexpr,             # backward dx, packed stage 1: also dw2's partial of this row
                                       #   block from the g tiles it loads (g read once for dx and dw2)
        DB2: tl.constexpr,             # with DW2: also db's partial (Σ_m g over the row block)
        DW1: tl.constexpr,             # backward dx at ONE row block (M <= BLOCK_M): stage 2 also
                                       #   writes dw1 = x_tileᵀ·dh per output tile (with DW2 storing
                                       #   dw2 and db whole: the backward in one launch)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,         # output features per tile (contiguous)
        BLOCK_K: tl.constexpr,         # input features per step (contiguous)
    ):
        pid_m = tl.program_id(0)
        pid_o = tl.program_id(1)
        tl.static_assert(not KSPLIT or not (FMA or BATCHED),
                         "KSPLIT splits the packed and the per-block stage 1 only")
        tl.static_assert(not DW2 or not (FMA or BATCHED or BLOCKWISE),
                         "DW2 rides on the packed stage 1")
        tl.static_assert(not DW1 or not (FMA or BATCHED2), "DW1 rides on the packed stage 2")
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        # the columns of h: p = output block, q = input block, t = rank index
        cols = tl.arange(0, HP)
        QT = NB * R
        p_h = cols // QT
        qt_h = cols - p_h * QT
        q_h = qt_h // R
        t_h = qt_h - q_h * R
        valid_h = cols < NB * QT

        if FP64:
            h = tl.zeros((BLOCK_M, HP), dtype=tl.float64)
        else:
            h = tl.zeros((BLOCK_M, HP), dtype=tl.float32)
        # ---- stage 1: h[:, (p, q, t)] = Σ_c a[:, f(q, c)] · F1(q, p, t, c), every block at once:
        # a contiguous tile of input features times the packed factor tile whose column (p, q, t)
        # holds F1(q, p, t, ·) on the rows of block q and zeros elsewhere (block-diagonal) ----
        k_idx = tl.arange(0, BLOCK_K)
        QTC: tl.constexpr = NBC * RC
        qt3 = tl.arange(0, QTC)
        if FMA:
            # ---- stage 1 on the FMA units, block by block, in the layout x is loaded in: QTC 2-D
            # accumulators acc_i[m, c] += a[m, c]·F1(q, p, t, c) (i = p·R + t) over the input block
            # q, elementwise (no reduction in the loop); one reduction over c per block, the result
            # kept as the QTC slices hs[j][m, p] = h[m, (p, j)] of h's columns j = (q, t) ----
            p_k = tl.arange(0, NBC)
            hs = ()
            for j in tl.static_range(QTC):
                hs = hs + (tl.zeros((BLOCK_M, NBC), dtype=h.dtype),)
            for q in range(0, NB):
                accs = ()
                for i in tl.static_range(QTC):
                    accs = accs + (tl.zeros((BLOCK_M, BLOCK_K), dtype=h.dtype),)
                for c0 in range(0, CB, BLOCK_K):
                    cc = c0 + k_idx
                    ff = q * CB + cc
                    mask_f = (cc < CB) & (ff < F_IN)
                    a = tl.load(a_ptr + offs_m[:, None] * stride_am + ff[None, :] * stride_af,
                                mask=mask_m[:, None] & mask_f[None, :], other=0.0).to(h.dtype)
                    upd = ()
                    for i in tl.static_range(QTC):
                        w = tl.load(f1_ptr + q * s1q + (i // RC) * s1p + (i % RC) * s1t + cc * s1c,
                                    mask=mask_f, other=0.0).to(h.dtype)
                        upd = upd + (accs[i] + a * w[None, :],)
                    accs = upd
                hcol = ()   # hcol[t][m, p] = Σ_c acc_{p·R+t}[m, c]
                for t in tl.static_range(RC):
                    col = tl.zeros((BLOCK_M, NBC), dtype=h.dtype)
                    for pp in tl.static_range(NBC):
                        col = tl.where(p_k[None, :] == pp, tl.sum(accs[pp * RC + t], axis=1)[:, None], col)
                    hcol = hcol + (col,)
                upd = ()
                for j in tl.static_range(QTC):
                    upd = upd + (tl.where(q == j // RC, hcol[j % RC], hs[j]),)
                hs = upd
            if STORE_H:
                # h[m, (p, j)] for the store (training): the slices placed by a 0/1 product
                h3 = tl.zeros((BLOCK_M, NBC, QTC), dtype=h.dtype)
                for j in tl.static_range(QTC):
                    h3 += hs[j][:, :, None] * (qt3 == j).to(h.dtype)[None, None, :]
                h = tl.reshape(h3, (BLOCK_M, HP))
        elif BATCHED:
            # ---- stage 1 from interleaved features f = c·NB + q: the contiguous tile of BLOCK_K
            # features is BLOCK_K/NB offsets c of every block q, permuted on chip to [q, m, c] and
            # multiplied per block (unpadded): acc3[q, m, (p, t)] += a[q, m, c]·F1(q, p, t, c) ----
            BC: tl.constexpr = BLOCK_K // NBC
            c_idx = tl.arange(0, BC)
            q_b = tl.arange(0, NBC)
            pt_b = tl.arange(0, QTC)
            ptb_p = pt_b // RC
            ptb_t = pt_b - ptb_p * RC
            acc3 = tl.zeros((NBC, BLOCK_M, QTC), dtype=h.dtype)
            for c0 in range(0, CB, BC):
                ff = c0 * NB + k_idx
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + ff[None, :] * stride_af,
                            mask=mask_m[:, None] & (ff < F_IN)[None, :], other=0.0)
                a3 = tl.permute(tl.reshape(a, (BLOCK_M, BC, NBC)), (2, 0, 1))
                cc = c0 + c_idx
                w = tl.load(  # (NBC, BC, QTC)
                    f1_ptr + q_b[:, None, None] * s1q + cc[None, :, None] * s1c
                    + ptb_p[None, None, :] * s1p + ptb_t[None, None, :] * s1t,
                    mask=(cc < CB)[None, :, None], other=0.0,
                )
                if UPCAST and not FP64:
                    a3 = a3.to(tl.float32)
                    w = w.to(tl.float32)
                acc3 = tl.dot(a3, w, acc3, input_precision=PRECISION)
            # acc3[q, m, (p, t)] -> h[m, (p, q, t)]
            h = tl.reshape(tl.permute(tl.reshape(acc3, (NBC, BLOCK_M, NBC, RC)), (1, 2, 0, 3)), (BLOCK_M, HP))
        elif BLOCKWISE:
            # ---- stage 1 block by block (contiguous input blocks, b·r >= 16): the unpadded product
            # a[:, block q]·F1(q, ·, ·, ·)ᵀ (BLOCK_M × QTP), rounded, then placed at the columns
            # (p, q, t) by a 0/1 product (exact: one term per column) ----
            ptb = tl.arange(0, QTP)
            ptb_p = ptb // R
            ptb_t = ptb - ptb_p * R
            valid_pt = ptb < NB * R
            if KSPLIT:   # this program's K_PER input features: the blocks they meet, in part
                k_lo = tl.program_id(2) * K_PER
                k_hi = tl.minimum(F_IN, k_lo + K_PER)
                q_lo = k_lo // CB
                q_hi = tl.cdiv(k_hi, CB)
            else:
                q_lo = 0
                q_hi = NB
            for q in range(q_lo, q_hi):
                if FP64:
                    hq = tl.zeros((BLOCK_M, QTP), dtype=tl.float64)
                else:
                    hq = tl.zeros((BLOCK_M, QTP), dtype=tl.float32)
                if KSPLIT:
                    c_lo = tl.maximum(k_lo - q * CB, 0)
                    c_hi = tl.minimum(k_hi - q * CB, CB)
                else:
                    c_lo = 0
                    c_hi = CB
                for c0 in range(c_lo, c_hi, BLOCK_K):
                    cc = c0 + k_idx
                    ff = q * CB + cc
                    mask_f = (cc < c_hi) & (ff < F_IN)
                    a = tl.load(a_ptr + offs_m[:, None] * stride_am + ff[None, :] * stride_af,
                                mask=mask_m[:, None] & mask_f[None, :], other=0.0)
                    w = tl.load(  # (BLOCK_K, QTP): F1(q, p, t, c-chunk) for every (p, t)
                        f1_ptr + q * s1q + ptb_p[None, :] * s1p + ptb_t[None, :] * s1t + cc[:, None] * s1c,
                        mask=mask_f[:, None] & valid_pt[None, :], other=0.0,
                    )
                    if UPCAST and not FP64:
                        a = a.to(tl.float32)
                        w = w.to(tl.float32)
                    hq = tl.dot(a, w, hq, input_precision=PRECISION)
                # column (p, t) of hq goes to column p·NB·R + q·R + t of h
                dest = ptb_p * (NB * R) + q * R + ptb_t
                sel = (cols[None, :] == dest[:, None]) & valid_pt[:, None]
                if FP64:
                    h = tl.dot(hq, sel.to(tl.float64), h)
                elif H_FP32 or UPCAST or a_ptr.dtype.element_ty == tl.float32:
                    h = tl.dot(hq, sel.to(tl.float32), h, input_precision="ieee")
                else:
                    h = tl.dot(hq.to(a_ptr.dtype.element_ty), sel.to(a_ptr.dtype.element_ty), h)
        else:
            if KSPLIT:   # this program's K_PER input features (whole steps): a partial sum of h
                k_lo = tl.program_id(2) * K_PER
                k_hi = tl.minimum(F_IN, k_lo + K_PER)
                if DW2:  # the last split walks the padding features too: their dw2 entries are zeros
                    k_hi = tl.where(tl.program_id(2) == tl.num_programs(2) - 1, NB * CB, k_hi)
            else:
                k_lo = 0
                k_hi = F_IN
                if DW2:
                    k_hi = NB * CB   # the padding features too: their dw2 partials are zeros
            if DW2:
                # the forward's h of this row block, once; only output split 0 writes the partials
                # (a full-shape compare: the interpreter rejects a scalar & a block)
                hs = tl.load(hs_ptr + offs_m[:, None] * shs + cols[None, :],
                             mask=mask_m[:, None] & valid_h[None, :], other=0.0)
                if (UPCAST or H_FP32) and not FP64:
                    hs = hs.to(tl.float32)
                live_w = (pid_o + tl.zeros((BLOCK_K, HP), dtype=tl.int32)) == 0
                live_b = (pid_o + tl.zeros((BLOCK_K,), dtype=tl.int32)) == 0
            for f0 in range(k_lo, k_hi, BLOCK_K):
                ff = f0 + k_idx
                mask_f = ff < F_IN
                if IN_INTERLEAVED:
                    q_f = ff % NB
                    c_f = ff // NB
                else:
                    q_f = ff // CB
                    c_f = ff - q_f * CB
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + ff[None, :] * stride_af,
                            mask=mask_m[:, None] & mask_f[None, :], other=0.0)
                w = tl.load(  # (BLOCK_K, HP)
                    f1_ptr + q_h[None, :] * s1q + p_h[None, :] * s1p + t_h[None, :] * s1t + c_f[:, None] * s1c,
                    mask=mask_f[:, None] & valid_h[None, :] & (q_f[:, None] == q_h[None, :]), other=0.0,
                )
                if UPCAST and not FP64:
                    a = a.to(tl.float32)
                    w = w.to(tl.float32)
                if DW2:
                    # dw2[l, s, q] over this row block = Σ_m g[m, f(l, s)]·h[m, l, q]: the packed
                    # product gᵀ·h (BLOCK_K x HP) kept on its block-diagonal pairs (column block l
                    # = the feature's block q_f), stored as this row block's partial
                    a2 = a
                    if H_FP32 and not FP64:
                        a2 = a.to(tl.float32)                # with the fp32 h of fp16 inputs
                    d2 = tl.dot(tl.trans(a2), hs, input_precision=PRECISION)
                    keep = (ff < NB * CB)[:, None] & valid_h[None, :] & (p_h[None, :] == q_f[:, None]) & live_w
                    tl.store(pw_ptr + pid_m * spw + q_f[:, None] * spw_l + c_f[:, None] * spw_s + qt_h[None, :],
                             d2.to(pw_ptr.dtype.element_ty), mask=keep)
                    if DB2:
                        tl.store(prs_ptr + pid_m * sprs + ff, tl.sum(a2.to(h.dtype), axis=0).to(prs_ptr.dtype.element_ty),
                                 mask=mask_f & live_b)
                h = tl.dot(a, w, h, input_precision=PRECISION)

        if KSPLIT:
            # the KS partials of this row block's h: the last to arrive sums them in a fixed order
            # (bitwise the same whoever is last) and alone goes on to stage 2
            pid_k = tl.program_id(2)
            KS = tl.num_programs(2)
            OS = tl.num_programs(1)
            tile = pid_m * OS + pid_o
            part = (pid_o * M + offs_m[:, None]) * HP + cols[None, :]
            mask_p = mask_m[:, None] & (cols < HP)[None, :]
            last = _split_arrive(h, ws_ptr, part, mask_p, OS * M * HP, pid_k, cnt_ptr, tile, KS, SYNC)
            if last:
                h = _split_total(h, ws_ptr, part, mask_p, OS * M * HP, pid_k, KS, cols, 1)
        if H_FP32:
            h_lo = h                              # fp32: h may exceed fp16's range
        else:
            h_lo = h.to(z_ptr.dtype.element_ty)   # rounded like a two-matmul path
        if STORE_H:
            store_h = pid_o == 0
            if KSPLIT:
                store_h = store_h & last
            if store_h:
                tl.store(h_ptr + offs_m[:, None] * shm + cols[None, :], h_lo.to(h_ptr.dtype.element_ty),
                         mask=mask_m[:, None] & valid_h[None, :])
        if (UPCAST or H_FP32) and not FP64:
            h_lo = h_lo.to(tl.float32)

        # ---- stage 2: contiguous output tiles; column f = (p, s) gathers row F2(p, s, ·, ·) into
        # the rows (p, q, t) of the packed tile (P₁ and P₂ are this addressing) ----
        # grid axis 1 splits the output tiles (only when the row blocks alone underfill the GPU;
        # kernels._config.row_block_grid): each split recomputes stage 1 for its rows
        n_idx = tl.arange(0, BLOCK_N)
        # the batched product into contiguous output blocks walks "virtual" features v = s·NB + p
        # (as the interleaved output does) and stores each tile as NB runs of BS features
        CONTIG2: tl.constexpr = BATCHED2 and not OUT_INTERLEAVED
        if CONTIG2 or DW1:
            F_V = NB * SB    # (DW1: dw1's padding features too, zeros; dx stores stop at F_OUT)
        else:
            F_V = F_OUT
        per = tl.cdiv(tl.cdiv(F_V, BLOCK_N), tl.num_programs(1))
        o_lo = pid_o * per * BLOCK_N
        o_hi = tl.minimum(F_V, o_lo + per * BLOCK_N)
        if KSPLIT:
            o_hi = tl.where(last, o_hi, o_lo)     # only the reducer writes the output tiles
        BS: tl.constexpr = BLOCK_N // NBC
        s_idx = tl.arange(0, BS)
        p_idx = tl.arange(0, NBC)
        q_i = qt3 // RC
        t_i = qt3 - q_i * RC
        if FMA:
            # the slices hs[j] = h[:, (·, j)], rounded as h_lo is: stage 2 is QTC rank-1 updates
            # of the output tile, no reduction
            hs_lo = ()
            for j in tl.static_range(QTC):
                if H_FP32:
                    hs_lo = hs_lo + (hs[j],)
                else:
                    hs_lo = hs_lo + (hs[j].to(z_ptr.dtype.element_ty).to(h.dtype),)
        if BATCHED2:
            hb_lo = tl.permute(tl.reshape(h_lo, (BLOCK_M, NBC, QTC)), (1, 0, 2))   # [p, m, (q, t)]
        for o0 in range(o_lo, o_hi, BLOCK_N):
            fo = o0 + n_idx
            mask_o = fo < o_hi
            if BATCHED2:
                # the tile is BS output rows s of every block p (f = s·NB + p): per block p,
                # z[p, m, s] = h[m, (p, ·)]·F2(p, s, ·)ᵀ (unpadded), then [m, s, p] flattened
                s_o3 = o0 // NBC + s_idx
                w3 = tl.load(  # (NBC, QTC, BS)
                    f2_ptr + p_idx[:, None, None] * s2p + s_o3[None, None, :] * s2s
                    + q_i[None, :, None] * s2q + t_i[None, :, None] * s2t,
                    mask=(s_o3 < SB)[None, None, :], other=0.0,
                )
                if (UPCAST or H_FP32) and not FP64:
                    w3 = w3.to(tl.float32)
                if FP64:
                    z3 = tl.zeros((NBC, BLOCK_M, BS), dtype=tl.float64)
                else:
                    z3 = tl.zeros((NBC, BLOCK_M, BS), dtype=tl.float32)
                z3 = tl.dot(hb_lo, w3, z3, input_precision=PRECISION)
                if not CONTIG2:
                    acc = tl.reshape(tl.permute(z3, (1, 2, 0)), (BLOCK_M, BLOCK_N))
            elif FMA:
                # the tile is BS output rows s of every block p (f = s·NB + p): z3[m, s, p] =
                # Σ_{q,t} h[m, p, q, t]·F2(p, s, q, t) on the FMA units, then flattened (P₂ on chip)
                s_o3 = o0 // NBC + s_idx
                w3 = tl.load(  # (BS, NBC, QTC)
                    f2_ptr + p_idx[None, :, None] * s2p + s_o3[:, None, None] * s2s
                    + q_i[None, None, :] * s2q + t_i[None, None, :] * s2t,
                    mask=(s_o3 < SB)[:, None, None], other=0.0,
                ).to(h.dtype)
                ws = _split_last(w3, QTC)
                # z3[m, s, p] = Σ_j h[m, p, j]·F2(p, s, j): outer-product updates, no reduction
                z3 = hs_lo[0][:, None, :] * ws[0][None, :, :]
                for j in tl.static_range(1, QTC):
                    z3 += hs_lo[j][:, None, :] * ws[j][None, :, :]
                acc = tl.reshape(z3, (BLOCK_M, BLOCK_N))
            else:
                if OUT_INTERLEAVED:
                    p_o = fo % NB
                    s_o = fo // NB
                else:
                    p_o = fo // SB
                    s_o = fo - p_o * SB
                w = tl.load(  # (HP, BLOCK_N)
                    f2_ptr + p_o[None, :] * s2p + s_o[None, :] * s2s + q_h[:, None] * s2q + t_h[:, None] * s2t,
                    mask=mask_o[None, :] & valid_h[:, None] & (p_h[:, None] == p_o[None, :]), other=0.0,
                )
                if (UPCAST or H_FP32) and not FP64:
                    w = w.to(tl.float32)
                if FP64:
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
                else:
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc = tl.dot(h_lo, w, acc, input_precision=PRECISION)
                if DW1:
                    # dw1[j, (l, t), c] = Σ_m dh[m, (j, l, t)]·x[m, f(j, c)]: the tile's x (the
                    # output features' inputs) times the rounded dh, kept on the block-diagonal
                    # pairs (column block p = the feature's block); one row block: the whole sum
                    xt = tl.load(x1_ptr + offs_m[:, None] * sx1m + fo[None, :] * sx1f,
                                 mask=mask_m[:, None] & (fo < F_OUT)[None, :], other=0.0)
                    if (UPCAST or H_FP32) and not FP64:
                        xt = xt.to(tl.float32)
                    d1 = tl.dot(tl.trans(xt), h_lo, input_precision=PRECISION)   # (BLOCK_N, HP)
                    keep1 = mask_o[:, None] & valid_h[None, :] & (p_h[None, :] == p_o[:, None])
                    tl.store(w1g_ptr + p_o[:, None] * sw1p + qt_h[None, :] * sw1q + s_o[:, None] * sw1c,
                             d1.to(w1g_ptr.dtype.element_ty), mask=keep1)
            if CONTIG2:
                # contiguous output blocks: feature p·SB + s, NB runs of BS contiguous features
                f3 = p_idx[:, None] * SB + s_o3[None, :]                  # (NBC, BS)
                m3 = (s_o3 < SB)[None, :] & (f3 < F_OUT)
                if HAS_BIAS:
                    bias3 = tl.load(bias_ptr + f3, mask=m3, other=0.0).to(z3.dtype)
                    z3 = z3 + bias3[:, None, :]
                tl.store(z_ptr + offs_m[None, :, None] * stride_zm + f3[:, None, :] * stride_zf,
                         z3.to(z_ptr.dtype.element_ty), mask=mask_m[None, :, None] & m3[:, None, :])
            else:
                if HAS_BIAS:
                    bias = tl.load(bias_ptr + fo, mask=mask_o, other=0.0).to(acc.dtype)
                    acc = acc + bias[None, :]
                mask_z = mask_o
                if DW1:
                    mask_z = mask_o & (fo < F_OUT)
                tl.store(z_ptr + offs_m[:, None] * stride_zm + fo[None, :] * stride_zf,
                         acc.to(z_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_z[None, :])
        if KSPLIT and SYNC:
            if last:
                tl.atomic_xchg(cnt_ptr + tile, 0)       # ready for the next launch

    @triton.jit
    def _wgrad_layout(pid_f, p_f, s_f, qt_h, p_h, mask_w, valid_h, NB, SB, QT, sop, sos, soq,
                      BATCHED: tl.constexpr, NBC: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr):
        """``(offsets, mask)`` of a weight-gradient tile in the gradient's layout (element ``(p, s,
        qt)`` at ``p*sop + s*sos + qt*soq``): the batched product's ``(NBC, BLOCK_N/NBC, HP/NBC)``
        tile, or the packed product's ``(BLOCK_N, HP)`` kept on its block-diagonal pairs."""
        if BATCHED:
            pb = tl.arange(0, NBC)
            sb = pid_f * (BLOCK_N // NBC) + tl.arange(0, BLOCK_N // NBC)
            qb = tl.arange(0, HP // NBC)
            part = pb[:, None, None] * sop + sb[None, :, None] * sos + qb[None, None, :] * soq
            keep = (sb[None, :, None] * NB + pb[:, None, None] < NB * SB) & (qb[None, None, :] < QT)
        else:
            # the packed product holds every (feature, column) pair; the block-diagonal ones are kept
            part = p_f[:, None] * sop + s_f[:, None] * sos + qt_h[None, :] * soq
            keep = mask_w[:, None] & valid_h[None, :] & (p_h[None, :] == p_f[:, None])
        return part, keep

    @triton.jit
    def _wgrad_tile(
        # --- pointers (one side of a weight gradient) ---
        d_ptr,       # (M, F) data rows: g (dw2, db) or x (dw1)
        h_ptr,       # (M, NB*NB*R) intermediate: hbuf (dw2) or dh (dw1), column p*NB*R + qt
                     #   where p is the block of the data feature it pairs with
        out_ptr,     # the gradient in its dtype: element (p, s, qt) at p*sop + s*sos + qt*soq
        rowsum_ptr,  # (F,) Σ_m d[m, f] in d's dtype; written when ROWSUM
        ws_ptr,      # SPLIT: (SPLITS, ...) fp32 partials of the gradient, split stride so (the
                     #   workspace: written, then read back by the tile's last program)
        wrs_ptr,     # SPLIT and ROWSUM: (SPLITS, F) fp32 partials of the row sums, split stride srs
        cnt_ptr,     # SPLIT and SYNC: int32 arrival counters, one per feature tile of the launch
        # --- dimensions ---
        M, NB, R, SB,
        F,           # data features (loads); features in [F, NB*SB) are padding, written as zeros
        ROWS,        # rows per split (a multiple of BLOCK_M): split s owns rows [s*ROWS, (s+1)*ROWS)
        SPLITS,      # splits with rows (cdiv(M, ROWS)); programs of later splits (a grid shared
                     #   with a side split more often) do nothing
        # --- strides (in elements) ---
        sdm, sdf, shm, so, sop, sos, soq,
        srs,         # split stride of wrs_ptr
        # --- this program ---
        pid_f,       # feature tile (grid axis 0 of this side)
        split,       # row split (grid axis 1)
        tile,        # its arrival counter (the feature tile's index in the launch)
        # --- meta-parameters (see _wgrad_kernel) ---
        ROWSUM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, FP64: tl.constexpr,
        MIXED: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCKWISE: tl.constexpr, HP: tl.constexpr,
        BATCHED: tl.constexpr, NBC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr,         # SPLITS > 1: partials + the fixed-order sum in this launch
        SYNC: tl.constexpr,          # the tile's reducer is its last program to arrive (counter;
                                     #   GPU); else its last split (the interpreter's id order)
        REDUCE: tl.constexpr,        # the rows are partials already: d_ptr holds M row-block
                                     #   partials of the gradient in its layout (row stride sdm), h_ptr
                                     #   those of the row sums (row stride shm); the split's rows
                                     #   are summed in order (dw2 and db from the DW2 dx launch)
    ):
        """One program of a weight gradient: feature tile ``pid_f``, rows of split ``split``, the
        packed product ``Σ_m d[m, f]·h[m, col]`` kept on the block-diagonal pairs (the body of
        :func:`_wgrad_kernel`, called once per side by :func:`_wgrad_pair_kernel`)."""
        QT = NB * R
        cols = tl.arange(0, HP)
        if BLOCKWISE:
            tpb = tl.cdiv(SB, BLOCK_N)
            p_blk = pid_f // tpb
            s_f = (pid_f - p_blk * tpb) * BLOCK_N + tl.arange(0, BLOCK_N)
            ff = p_blk * SB + s_f
            mask_w = s_f < SB
            mask_f = mask_w & (ff < F)
            p_f = p_blk + s_f * 0
            p_h = p_blk + cols * 0
            qt_h = cols
            valid_h = cols < QT
            h_off = p_blk * QT
        else:
            ff = pid_f * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_f = ff < F
            mask_w = ff < NB * SB
            if INTERLEAVED:
                p_f = ff % NB
                s_f = ff // NB
            else:
                p_f = ff // SB
                s_f = ff - p_f * SB
            p_h = cols // QT
            qt_h = cols - p_h * QT
            valid_h = cols < NB * QT
            h_off = 0
        if FP64:
            acc = tl.zeros((BLOCK_N, HP), dtype=tl.float64)
            acc3 = tl.zeros((NBC, BLOCK_N // NBC, HP // NBC), dtype=tl.float64)
            rs = tl.zeros((BLOCK_N,), dtype=tl.float64)
        else:
            acc = tl.zeros((BLOCK_N, HP), dtype=tl.float32)
            acc3 = tl.zeros((NBC, BLOCK_N // NBC, HP // NBC), dtype=tl.float32)
            rs = tl.zeros((BLOCK_N,), dtype=tl.float32)
        m_lo = split * ROWS
        m_hi = tl.minimum(M, m_lo + ROWS)   # <= m_lo past the side's splits: no step
        if REDUCE:
            tl.static_assert(not BATCHED, "REDUCE sums partials of the packed layout")
            part, keep = _wgrad_layout(pid_f, p_f, s_f, qt_h, p_h, mask_w, valid_h, NB, SB, QT, sop, sos, soq,
                                       BATCHED, NBC, HP, BLOCK_N)
            for i in range(m_lo, m_hi):     # fixed order: bitwise reproducible
                acc += tl.load(d_ptr + i * sdm + part, mask=keep, other=0.0)
                if ROWSUM:
                    rs += tl.load(h_ptr + i * shm + ff, mask=mask_f, other=0.0)
            m_hi = m_lo                     # (no rows for the product loop)
        r_idx = tl.arange(0, BLOCK_M)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            mm = m0 + r_idx
            mask_r = mm < m_hi
            d = tl.load(d_ptr + mm[:, None] * sdm + ff[None, :] * sdf,
                        mask=mask_r[:, None] & mask_f[None, :], other=0.0)
            hh = tl.load(h_ptr + mm[:, None] * shm + h_off + cols[None, :],
                         mask=mask_r[:, None] & valid_h[None, :], other=0.0)
            if ROWSUM:
                rs += tl.sum(d.to(rs.dtype), axis=0)
            if (UPCAST or MIXED) and not FP64:
                d = d.to(tl.float32)
                hh = hh.to(tl.float32)
            if BATCHED:
                # d[m, s·NB + p] -> [p, s, m]; h[m, p·QT + qt] -> [p, m, qt]
                d3 = tl.permute(tl.reshape(d, (BLOCK_M, BLOCK_N // NBC, NBC)), (2, 1, 0))
                h3 = tl.permute(tl.reshape(hh, (BLOCK_M, NBC, HP // NBC)), (1, 0, 2))
                acc3 = tl.dot(d3, h3, acc3, input_precision=PRECISION)
            else:
                acc = tl.dot(tl.trans(d), hh, acc, input_precision=PRECISION)
        if not REDUCE:               # (REDUCE has it from before its loop)
            part, keep = _wgrad_layout(pid_f, p_f, s_f, qt_h, p_h, mask_w, valid_h, NB, SB, QT, sop, sos, soq,
                                       BATCHED, NBC, HP, BLOCK_N)
        if BATCHED:
            val = acc3
        else:
            val = acc
        if SPLIT:
            if split < SPLITS:       # (later splits of a grid shared with a side split more often: idle)
                if ROWSUM:
                    tl.store(wrs_ptr + split * srs + ff, rs, mask=mask_f)
                last = _split_arrive(val, ws_ptr, part, keep, so, split, cnt_ptr, tile, SPLITS, SYNC)
                if last:
                    val = _split_sum(ws_ptr, part, keep, so, SPLITS, val)
                    tl.store(out_ptr + part, val.to(out_ptr.dtype.element_ty), mask=keep)
                    if ROWSUM:
                        rs = _split_sum(wrs_ptr, ff, mask_f, srs, SPLITS, rs)
                        tl.store(rowsum_ptr + ff, rs.to(rowsum_ptr.dtype.element_ty), mask=mask_f)
                    if SYNC:
                        tl.atomic_xchg(cnt_ptr + tile, 0)            # ready for the next launch
        else:
            # split 0 writes; the later splits of a shared grid have no rows and write nothing (a
            # full-shape compare: the interpreter rejects a scalar & a block)
            live = (split + tl.zeros(keep.shape, tl.int32)) == 0
            tl.store(out_ptr + part, val.to(out_ptr.dtype.element_ty), mask=keep & live)
            if ROWSUM:
                tl.store(rowsum_ptr + ff, rs.to(rowsum_ptr.dtype.element_ty),
                         mask=mask_f & ((split + tl.zeros(ff.shape, tl.int32)) == 0))

    #: the same body as a separate device function (not inlined): the pair kernel calls it once per
    #: side, so each side's registers are allocated on their own (inlined, the two sides' live
    #: ranges add up: 255 registers and 288 bytes of spill at 4096², nblocks 8, 16384 rows on
    #: sm_90; called, 199 and none, the same loads and tensor-core instructions)
    _wgrad_tile_call = triton.jit(_wgrad_tile.fn, noinline=True)

    @triton.jit
    def _wgrad_kernel(
        # --- pointers ---
        d_ptr,       # (M, F) data rows: g (dw2, db) or x (dw1)
        h_ptr,       # (M, NB*NB*R) intermediate: hbuf (dw2) or dh (dw1), column p*NB*R + qt
                     #   where p is the block of the data feature it pairs with
        out_ptr,     # the gradient in its dtype: element (p, s, qt) at p*sop + s*sos + qt*soq
        rowsum_ptr,  # (F,) Σ_m d[m, f] in d's dtype; written when ROWSUM
        ws_ptr,      # SPLIT: (splits, ...) fp32 partials of the gradient, split stride so
        wrs_ptr,     # SPLIT and ROWSUM: (splits, F) fp32 partials of the row sums, split stride srs
        cnt_ptr,     # SPLIT and SYNC: int32 arrival counters, one per feature tile
        # --- dimensions ---
        M, NB, R, SB,
        F,           # data features (loads); features in [F, NB*SB) are padding, written as zeros
        ROWS,        # rows per split (a multiple of BLOCK_M): split s owns rows [s*ROWS, (s+1)*ROWS)
        # --- strides (in elements) ---
        sdm, sdf, shm, so, sop, sos, soq,
        srs,         # split stride of wrs_ptr
        # --- meta-parameters ---
        ROWSUM: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        FP64: tl.constexpr,
        MIXED: tl.constexpr,         # d and h differ in dtype (fp32 intermediate x fp16): both to fp32
        INTERLEAVED: tl.constexpr,   # feature f = s*NB + p (Monarch g); else p*SB + s
        BLOCKWISE: tl.constexpr,     # contiguous blocks, b*r >= 16: each program's features lie in
                                     #   one block p and it reads only h's columns of p (unpadded)
        HP: tl.constexpr,            # h columns per product (NB*NB*R padded; NB*R padded if BLOCKWISE)
        BATCHED: tl.constexpr,       # interleaved features, power-of-two NB*R >= 16: one batched
                                     #   product over the NB blocks (unpadded; P₂ permuted on chip)
        NBC: tl.constexpr,           # NB as a constant (BATCHED), else 1
        SPLIT: tl.constexpr,         # the rows are split (grid axis 1 > 1): in-launch fixed-order sum
        SYNC: tl.constexpr,          # with SPLIT: arrival counters (a GPU; see _wgrad_tile)
        REDUCE: tl.constexpr,        # d_ptr / h_ptr are M row-block partials to sum (see _wgrad_tile)
        BLOCK_M: tl.constexpr,       # rows per step of the reduction
        BLOCK_N: tl.constexpr,       # data features per program
    ):
        """One weight gradient: grid (feature tiles, row splits), every split real; with ``SPLIT``
        each tile's last program to arrive sums the splits' partials (:mod:`kernels._split`)."""
        _wgrad_tile(d_ptr, h_ptr, out_ptr, rowsum_ptr, ws_ptr, wrs_ptr, cnt_ptr, M, NB, R, SB, F, ROWS,
                    tl.num_programs(1), sdm, sdf, shm, so, sop, sos, soq, srs,
                    tl.program_id(0), tl.program_id(1), tl.program_id(0),
                    ROWSUM, UPCAST, PRECISION, FP64, MIXED, INTERLEAVED, BLOCKWISE, HP, BATCHED, NBC,
                    BLOCK_M, BLOCK_N, SPLIT, SYNC, REDUCE)

    @triton.jit
    def _wgrad_pair_kernel(
        # --- pointers, side A: dw1[j, l·r + t, c] = Σ_m dh[m, j, l, t]·x[m, j·kb + c] ---
        xa_ptr,      # (M, K) x, the data rows of dw1 (contiguous input blocks: f = j*kb + c)
        ha_ptr,      # (M, NB*NB*R) dh[m, j, l, t] (column j*NB*R + l*R + t)
        oa_ptr,      # dw1 (b, b·r, kb) in its dtype: element (j, c, l·r + t) at j*sop_a + c*sos_a + p*soq_a
        wsa_ptr,     # SPLIT_A: (SPLITS_A, b, b·r, kb) fp32 partials of dw1, split stride so_a
        # --- pointers, side B: dw2[l, s, q] = Σ_m g[m, o(l, s)]·h[m, l, q], db = Σ_m g ---
        gb_ptr,      # (M, N) g, the data rows of dw2 (Monarch: interleaved, f = s*NB + l); with
                     #   REDUCE_B the (MB, b, nb, b·r) row-block partials of dw2 (row stride sdm_b)
        hb_ptr,      # (M, NB*NB*R) hbuf[m, l, j, t] saved by the forward (column l*NB*R + q); with
                     #   REDUCE_B the (MB, N) row-block partials of db (row stride shm_b)
        ob_ptr,      # dw2 (b, nb, b·r) in its dtype, addressed as oa_ptr with the *_b strides
        rowsum_ptr,  # db (N,) in g's dtype; when ROWSUM
        wsb_ptr,     # SPLIT_B: (SPLITS_B, b, nb, b·r) fp32 partials of dw2, split stride so_b
        wrs_ptr,     # SPLIT_B and ROWSUM: (SPLITS_B, N) fp32 partials of db, split stride srs
        cnt_ptr,     # SYNC: int32 arrival counters, one per feature tile (both sides' tiles)
        # --- dimensions ---
        M, NB, R,
        SB_A, F_A,   # side A: kb, K
        ROWS_A,      # rows per split of side A
        SPLITS_A,    # splits of side A (grid axis 1 is the larger count: the other side's later
                     #   splits do nothing)
        SB_B, F_B, ROWS_B, SPLITS_B,   # side B: nb, N and the same
        MB,          # rows of side B's reduction: M, or the row blocks of its partials (REDUCE_B)
        # --- strides (in elements) ---
        sdm_a, sdf_a, shm_a, so_a, sop_a, sos_a, soq_a,
        sdm_b, sdf_b, shm_b, so_b, sop_b, sos_b, soq_b,
        srs,         # split stride of wrs_ptr
        # --- meta-parameters, shared ---
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        FP64: tl.constexpr,
        SYNC: tl.constexpr,          # a split side's reducer is its tile's last arrival (counters; GPU)
        # --- side A (contiguous blocks: never interleaved, batched or summed by rows) ---
        MIXED_A: tl.constexpr,
        BLOCKWISE_A: tl.constexpr,
        HP_A: tl.constexpr,
        SPLIT_A: tl.constexpr,       # SPLITS_A > 1: partials summed in this launch
        # --- side B ---
        ROWSUM: tl.constexpr,
        MIXED_B: tl.constexpr,
        INTERLEAVED_B: tl.constexpr,
        BLOCKWISE_B: tl.constexpr,
        HP_B: tl.constexpr,
        BATCHED_B: tl.constexpr,
        NBC_B: tl.constexpr,
        SPLIT_B: tl.constexpr,       # SPLITS_B > 1
        REDUCE_B: tl.constexpr,      # dw2 and db summed from the DW2 dx launch's row-block partials
        BLOCK_M: tl.constexpr,       # rows per step of the reduction (both sides)
        BLOCK_N: tl.constexpr,       # data features per program (both sides)
    ):
        """``dw1`` and ``dw2`` (+ ``db``) in one launch: grid axis 0 is side A's feature tiles
        followed by side B's, axis 1 the row splits (the larger of the two sides' counts); each
        program runs :func:`_wgrad_tile` (as the called device function ``_wgrad_tile_call``) with
        its side's pointers and constexprs, so each side computes what :func:`_wgrad_kernel`
        computes for it alone, in the same order (its split partials summed by each tile's last
        program: no second launch)."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        if BLOCKWISE_A:
            tiles_a = NB * tl.cdiv(SB_A, BLOCK_N)
        else:
            tiles_a = tl.cdiv(NB * SB_A, BLOCK_N)
        if pid < tiles_a:
            _wgrad_tile_call(xa_ptr, ha_ptr, oa_ptr, oa_ptr, wsa_ptr, wsa_ptr, cnt_ptr,
                             M, NB, R, SB_A, F_A, ROWS_A, SPLITS_A,
                             sdm_a, sdf_a, shm_a, so_a, sop_a, sos_a, soq_a, 0, pid, split, pid,
                             False, UPCAST, PRECISION, FP64, MIXED_A, False, BLOCKWISE_A, HP_A, False, 1,
                             BLOCK_M, BLOCK_N, SPLIT_A, SYNC, False)
        else:
            _wgrad_tile_call(gb_ptr, hb_ptr, ob_ptr, rowsum_ptr, wsb_ptr, wrs_ptr, cnt_ptr,
                             MB, NB, R, SB_B, F_B, ROWS_B, SPLITS_B,
                             sdm_b, sdf_b, shm_b, so_b, sop_b, sos_b, soq_b, srs, pid - tiles_a, split, pid,
                             ROWSUM, UPCAST, PRECISION, FP64, MIXED_B, INTERLEAVED_B, BLOCKWISE_B, HP_B,
                             BATCHED_B, NBC_B, BLOCK_M, BLOCK_N, SPLIT_B, SYNC, REDUCE_B)

    # autotuned launchers; in deterministic mode they run one fixed config (kernels._config.Tunable)
    _chain_tuned = Tunable(
        _chain_kernel, CHAIN_SPACE,
        key=["M_BUCKET", "NB", "R", "CB", "SB", "STORE_H", "H_FP32"],
        prune=_prune_chain, interpreter=CHAIN_INTERP, deterministic=CHAIN_FIXED,
    )
    _bgemm_tuned = Tunable(_bgemm_kernel, BGEMM_SPACE, key=["G", "I", "J", "KR", "MIXED"],
                           interpreter=BGEMM_INTERP, deterministic=BGEMM_FIXED)
    _rows_tuned = Tunable(
        _rows_kernel, ROWS_SPACE,
        key=["M_BUCKET", "NB", "R", "F_IN", "F_OUT", "STORE_H", "H_FP32", "IN_INTERLEAVED", "OUT_INTERLEAVED"],
        prune=_prune_rows, interpreter=ROWS_INTERP, deterministic=ROWS_FIXED, pick=_pick_rows,
    )
    # the split stage 1 (few rows): the plan fixes BLOCK_M, BLOCK_N and the grid (rows_ksplit)
    _rows_ks_tuned = Tunable(
        _rows_kernel, ROWS_KS_SPACE,
        key=["M_BUCKET", "NB", "R", "F_IN", "F_OUT", "K_PER", "STORE_H", "H_FP32", "IN_INTERLEAVED",
             "OUT_INTERLEAVED", "BLOCK_M", "BLOCK_N"],
        prune=_prune_rows_ks, interpreter=ROWS_KS_INTERP, deterministic=ROWS_KS_FIXED,
    )
    # the dx launch that also takes dw2's partials: BLOCK_M fixed by the launcher (rows_dw2_block_m)
    _rows_dw2_tuned = Tunable(
        _rows_kernel, ROWS_DW2_SPACE,
        key=["M_BUCKET", "NB", "R", "F_IN", "F_OUT", "STORE_H", "H_FP32", "IN_INTERLEAVED", "DB2", "BLOCK_M"],
        prune=_prune_rows_dw2, interpreter=ROWS_DW2_INTERP, deterministic=ROWS_DW2_FIXED,
    )
    _wgrad_tuned = Tunable(
        _wgrad_kernel, WGRAD_SPACE, key=["NB", "R", "F", "ROWS", "MIXED", "INTERLEAVED"],
        prune=_prune_wgrad, interpreter=WGRAD_INTERP, deterministic=WGRAD_FIXED,
    )
    _wgrad_pair_tuned = Tunable(
        _wgrad_pair_kernel, WGRAD_SPACE,
        key=["NB", "R", "F_A", "F_B", "ROWS_A", "ROWS_B", "MIXED_B", "INTERLEAVED_B"],
        prune=_prune_wgrad_pair, interpreter=WGRAD_INTERP, deterministic=WGRAD_FIXED,
    )

    # ---- compile-tier registration (signatures derived from the kernels' arguments) ----
    # innermost strides that are 1 in the common (contiguous) call: compile-check also compiles the
    # specialization where they are the constant 1
    _CHAIN_UNIT = ("stride_af", "IC", "s1c", "s2t", "stride_zf", "sht")

    register_kernel(KernelSpec(
        name="monarch.chain",
        fn=_chain_kernel,
        constexprs=[
            dict(HAS_BIAS=True, STORE_H=True, H_FP32=False, UPCAST=False, PRECISION="tf32", FP64=False),
            dict(HAS_BIAS=False, STORE_H=False, H_FP32=False, UPCAST=False, PRECISION="tf32", FP64=False),
        ],
        space=CHAIN_SPACE,
        unit_args=_CHAIN_UNIT,
    ))
    register_kernel(KernelSpec(
        name="monarch.bgemm",
        fn=_bgemm_kernel,
        pointers={"rowsum_ptr": "fp32"},
        constexprs=[
            dict(HAS_BIAS=True, ROWSUM=False, UPCAST=False, PRECISION="tf32", FP64=False, MIXED=False),
            dict(HAS_BIAS=False, ROWSUM=True, UPCAST=False, PRECISION="tf32", FP64=False, MIXED=False),
        ],
        space=BGEMM_SPACE,
        unit_args=("scj",),
    ))
    # the row-block kernels: forward (x -> y, interleaved output for Monarch, contiguous for
    # block-wise low-rank) and backward dx (g -> dx, interleaved input for Monarch)
    _ROWS_UNIT = ("stride_af", "stride_zf", "s1c", "s2t")
    def _rows_variant(**kw):
        """A compiled variant of the row-block kernel: these defaults (no bias, h stored, tf32, blocked
        layouts, HP 16, one block a tile, nothing batched, the tensor-core build) and ``kw``."""
        d = dict(HAS_BIAS=False, STORE_H=True, H_FP32=False, UPCAST=False, PRECISION="tf32", FP64=False,
                 IN_INTERLEAVED=False, OUT_INTERLEAVED=False, HP=16, BLOCKWISE=False, QTP=1, BATCHED=False,
                 BATCHED2=False, FMA=False, NBC=1, RC=1, KSPLIT=False, SYNC=False, DW2=False, DB2=False,
                 DW1=False)
        d.update(kw)
        return d

    _ROWS_PTRS = {"ws_ptr": "fp32", "cnt_ptr": "i32", "pw_ptr": "fp32", "prs_ptr": "fp32"}

    register_kernel(KernelSpec(
        name="monarch.rows",
        fn=_rows_kernel,
        constexprs=[
            _rows_variant(HAS_BIAS=True, STORE_H=False, OUT_INTERLEAVED=True, HP=16, FMA=True, NBC=4),
            _rows_variant(STORE_H=True, IN_INTERLEAVED=True),
            _rows_variant(HAS_BIAS=True, HP=256, BLOCKWISE=True, QTP=16),
            _rows_variant(IN_INTERLEAVED=True, HP=256, BATCHED=True, NBC=16),
            _rows_variant(HAS_BIAS=True, OUT_INTERLEAVED=True, HP=256, BLOCKWISE=True, QTP=16, BATCHED2=True, NBC=16),
            # the batched second product into contiguous output blocks: Monarch dx (both sides
            # batched) and the block-wise low-rank forward
            _rows_variant(IN_INTERLEAVED=True, HP=256, BATCHED=True, BATCHED2=True, NBC=16),
            _rows_variant(HAS_BIAS=True, HP=256, BLOCKWISE=True, QTP=16, BATCHED2=True, NBC=16),
        ],
        space=rows_space,
        unit_args=_ROWS_UNIT,
        pointers=_ROWS_PTRS,
    ))
    register_kernel(KernelSpec(
        name="monarch.rows_ksplit",
        fn=_rows_kernel,
        constexprs=[
            # stage 1 split (few rows), as a GPU runs it (arrival counters): the Monarch forward at
            # inference (b = 4, r = 1) and dx at b = 8 (interleaved input, h stored for dw1)
            _rows_variant(HAS_BIAS=True, STORE_H=False, OUT_INTERLEAVED=True, HP=16, KSPLIT=True, SYNC=True),
            _rows_variant(STORE_H=True, IN_INTERLEAVED=True, HP=64, KSPLIT=True, SYNC=True),
            # the whole backward at one row block over a wide g (3072 -> 768's dx at 16 tokens)
            _rows_variant(STORE_H=False, IN_INTERLEAVED=True, HP=16, KSPLIT=True, SYNC=True, DW2=True, DB2=True,
                          DW1=True),
            # the per-block stage 1 (b = 16, r = 1): the Monarch forward, h stored for training
            _rows_variant(HAS_BIAS=True, OUT_INTERLEAVED=True, HP=256, BLOCKWISE=True, QTP=16, BATCHED2=True,
                          NBC=16, KSPLIT=True, SYNC=True),
        ],
        space=rows_ks_space,
        unit_args=_ROWS_UNIT,
        pointers=_ROWS_PTRS,
    ))
    register_kernel(KernelSpec(
        name="monarch.rows_dw2",
        fn=_rows_kernel,
        constexprs=[
            # the backward dx that also takes dw2's (and db's) partials per row block: Monarch
            # (interleaved g) at b·r = 4 and 8, block-wise low-rank (contiguous g) at b·r = 4
            _rows_variant(IN_INTERLEAVED=True, DW2=True, DB2=True),
            _rows_variant(IN_INTERLEAVED=True, HP=64, DW2=True, DB2=True),
            _rows_variant(DW2=True, DB2=False),
            # the whole backward at one row block (dw1 from stage 2, dw2 and db whole; no dh)
            _rows_variant(STORE_H=False, IN_INTERLEAVED=True, DW2=True, DB2=True, DW1=True),
            _rows_variant(STORE_H=False, HP=64, DW2=True, DB2=False, DW1=True),
        ],
        space=rows_dw2_space,
        unit_args=_ROWS_UNIT,
        pointers=_ROWS_PTRS,
    ))
    register_kernel(KernelSpec(
        name="monarch.rows_fp16",
        fn=_rows_kernel,
        pointers={"h_ptr": "fp32", **_ROWS_PTRS},
        constexprs=[
            _rows_variant(HAS_BIAS=True, H_FP32=True, OUT_INTERLEAVED=True, FMA=True, NBC=4),
        ],
        space=rows_space,
        dtypes=("fp16",),
        unit_args=_ROWS_UNIT,
    ))
    _WGRAD_PTRS = {"ws_ptr": "fp32", "wrs_ptr": "fp32", "cnt_ptr": "i32"}

    def _wgrad_variant(**kw):
        """A compiled variant of one weight gradient: these defaults (tf32, Monarch dw2 with the
        bias, b·r < 16, rows not split) and ``kw``."""
        d = dict(ROWSUM=True, UPCAST=False, PRECISION="tf32", FP64=False, MIXED=False, INTERLEAVED=True,
                 BLOCKWISE=False, HP=16, BATCHED=False, NBC=1, SPLIT=False, SYNC=False, REDUCE=False)
        d.update(kw)
        return d

    register_kernel(KernelSpec(
        name="monarch.wgrad",
        fn=_wgrad_kernel,
        pointers=_WGRAD_PTRS,
        constexprs=[
            _wgrad_variant(),
            _wgrad_variant(ROWSUM=False, INTERLEAVED=False, HP=64),
            _wgrad_variant(ROWSUM=False, INTERLEAVED=False, BLOCKWISE=True),
            _wgrad_variant(HP=256, BATCHED=True, NBC=16),
            # long reductions: the rows split, summed in the launch as a GPU runs it (counters)
            _wgrad_variant(SPLIT=True, SYNC=True),
            _wgrad_variant(HP=256, BATCHED=True, NBC=16, SPLIT=True, SYNC=True),
        ],
        space=wgrad_space,
        unit_args=("sdf", "sos", "soq"),
    ))
    register_kernel(KernelSpec(
        name="monarch.wgrad_fp16",
        fn=_wgrad_kernel,
        pointers={"h_ptr": "fp32", **_WGRAD_PTRS},
        constexprs=[_wgrad_variant(MIXED=True), _wgrad_variant(MIXED=True, SPLIT=True, SYNC=True)],
        space=wgrad_space,
        dtypes=("fp16",),
        unit_args=("sdf", "sos", "soq"),
    ))
    # dw2 (+ db) summed from the DW2 dx launch's fp32 row-block partials (chunks of blocks, then
    # the chunks in the launch): Monarch with the bias, block-wise low-rank without
    register_kernel(KernelSpec(
        name="monarch.wgrad_reduce",
        fn=_wgrad_kernel,
        pointers={"d_ptr": "fp32", "h_ptr": "fp32", **_WGRAD_PTRS},
        constexprs=[_wgrad_variant(REDUCE=True, SPLIT=True, SYNC=True),
                    _wgrad_variant(ROWSUM=False, INTERLEAVED=False, REDUCE=True, SPLIT=True, SYNC=True)],
        space=wgrad_space,
        unit_args=("sdf", "sos", "soq"),
    ))
    # dw1 and dw2 (+ db) in one launch (the row-block backward): side A contiguous blocks
    # (blockwise at b·r >= 16), side B Monarch (interleaved, batched at power-of-two b·r >= 16) or
    # block-wise low-rank (contiguous)
    _WGRAD_PAIR_UNIT = ("sdf_a", "sos_a", "soq_b", "sdf_b")
    _WGRAD_PAIR_PTRS = {"wsa_ptr": "fp32", "wsb_ptr": "fp32", "wrs_ptr": "fp32", "cnt_ptr": "i32"}

    def _wgrad_pair_variant(**kw):
        """A compiled variant of the one-launch weight gradients: these defaults (tf32, b·r < 16,
        h 16 columns, Monarch side B with the bias, rows not split) and ``kw``."""
        d = dict(UPCAST=False, PRECISION="tf32", FP64=False, SYNC=False, MIXED_A=False, BLOCKWISE_A=False,
                 HP_A=16, SPLIT_A=False, ROWSUM=True, MIXED_B=False, INTERLEAVED_B=True, BLOCKWISE_B=False,
                 HP_B=16, BATCHED_B=False, NBC_B=1, SPLIT_B=False, REDUCE_B=False)
        d.update(kw)
        return d

    register_kernel(KernelSpec(
        name="monarch.wgrad_pair",
        fn=_wgrad_pair_kernel,
        pointers=_WGRAD_PAIR_PTRS,
        constexprs=[
            _wgrad_pair_variant(),
            _wgrad_pair_variant(HP_A=64, HP_B=64, ROWSUM=False, INTERLEAVED_B=False),
            _wgrad_pair_variant(BLOCKWISE_A=True, HP_A=16, ROWSUM=False, INTERLEAVED_B=False,
                                BLOCKWISE_B=True, HP_B=16),
            _wgrad_pair_variant(BLOCKWISE_A=True, HP_A=16, HP_B=256, BATCHED_B=True, NBC_B=16),
            # long reductions: both sides' rows split (or one side's), summed in the launch as a
            # GPU runs it (arrival counters)
            _wgrad_pair_variant(SYNC=True, SPLIT_A=True, SPLIT_B=True),
            _wgrad_pair_variant(BLOCKWISE_A=True, HP_A=16, HP_B=256, BATCHED_B=True, NBC_B=16, SYNC=True,
                                SPLIT_A=True, SPLIT_B=True),
            _wgrad_pair_variant(BLOCKWISE_A=True, HP_A=16, ROWSUM=False, INTERLEAVED_B=False,
                                BLOCKWISE_B=True, HP_B=16, SYNC=True, SPLIT_A=True, SPLIT_B=True),
        ],
        space=wgrad_pair_space,
        unit_args=_WGRAD_PAIR_UNIT,
    ))
    register_kernel(KernelSpec(
        name="monarch.wgrad_pair_reduce",
        fn=_wgrad_pair_kernel,
        pointers={"gb_ptr": "fp32", "hb_ptr": "fp32", **_WGRAD_PAIR_PTRS},
        constexprs=[
            # dw1 beside the sum of the DW2 dx launch's row-block partials of dw2 (+ db)
            _wgrad_pair_variant(SYNC=True, SPLIT_A=True, SPLIT_B=True, REDUCE_B=True),
            _wgrad_pair_variant(HP_A=64, HP_B=64, SYNC=True, SPLIT_A=True, SPLIT_B=True, REDUCE_B=True),
            _wgrad_pair_variant(ROWSUM=False, INTERLEAVED_B=False, SYNC=True, SPLIT_A=True, SPLIT_B=True,
                                REDUCE_B=True),
        ],
        space=wgrad_pair_space,
        unit_args=_WGRAD_PAIR_UNIT,
    ))
    register_kernel(KernelSpec(
        name="monarch.wgrad_pair_fp16",
        fn=_wgrad_pair_kernel,
        pointers={"ha_ptr": "fp32", "hb_ptr": "fp32", **_WGRAD_PAIR_PTRS},
        constexprs=[_wgrad_pair_variant(MIXED_A=True, MIXED_B=True),
                    _wgrad_pair_variant(MIXED_A=True, MIXED_B=True, SYNC=True, SPLIT_A=True, SPLIT_B=True)],
        space=wgrad_pair_space,
        dtypes=("fp16",),
        unit_args=_WGRAD_PAIR_UNIT,
    ))
    # fp16 inputs keep the intermediate in fp32: the fused chain with H_FP32 storing an fp32 h,
    # and the batched GEMM with MIXED operands, fp32 A against fp16 B (stage 2 h·w2, dx = dh·w1,
    # dw1 = dhᵀ·x). dw2 = gᵀ·h (fp16 A, fp32 B) runs the same code with the roles swapped and is
    # not compiled separately; stage 1 (fp16 operands, fp32 C) differs only in its store's cast.
    register_kernel(KernelSpec(
        name="monarch.chain_fp16",
        fn=_chain_kernel,
        pointers={"h_ptr": "fp32"},
        constexprs=[
            dict(HAS_BIAS=True, STORE_H=True, H_FP32=True, UPCAST=False, PRECISION="tf32", FP64=False),
        ],
        space=chain_space,
        dtypes=("fp16",),
        unit_args=_CHAIN_UNIT,
    ))
    register_kernel(KernelSpec(
        name="monarch.bgemm_fp16",
        fn=_bgemm_kernel,
        pointers={"a_ptr": "fp32", "rowsum_ptr": "fp32"},
        constexprs=[
            dict(HAS_BIAS=True, ROWSUM=False, UPCAST=False, PRECISION="tf32", FP64=False, MIXED=True),
        ],
        space=BGEMM_SPACE,
        dtypes=("fp16",),
        unit_args=("scj",),
    ))


# ============================================================================================
# Launchers
# ============================================================================================

PATHS = ("rows", "fused", "two_stage", "torch")


def rows_ksplit_ok(nblocks: int, rank: int, in_interleaved: bool = False) -> bool:
    """The row-block kernel can split stage 1's reduction (``KSPLIT``) where stage 1 is the packed
    product (``b·r < 16``) or the per-block one (contiguous input blocks, ``BLOCKWISE``); not the
    batched product over interleaved input features (Monarch ``dx`` at power-of-two ``b·r >=
    16``)."""
    batched = in_interleaved and nblocks * rank >= 16 and _pow2(nblocks) and _pow2(rank)
    return rows_supported(nblocks, rank) and not batched


@functools.lru_cache(maxsize=4096)
def rows_ksplit_plan(M: int, K: int, N: int, b: int, r: int, elem: int = 2, inter: int = 2,
                     save_h: bool = False, sms: Optional[int] = None,
                     quantum: int = ROWS_KS_QUANTUM, in_interleaved: bool = False) -> tuple[float, Optional[tuple]]:
    """``(predicted seconds, (BLOCK_M, BLOCK_N, OS, KS, K_PER))`` of the best row-block launch with
    stage 1's reduction split (``(inf, None)`` where there is none): ``m_blocks x OS x KS``
    programs, program ``(m, o, k)`` computes the partial ``h`` of its rows over the input features
    ``[k·K_PER, (k+1)·K_PER)``, stores it (fp32, ``BLOCK_M x HP``) and arrives on the counter of
    ``(m, o)``; the last to arrive sums the ``KS`` partials in a fixed order and writes the output
    tiles of split ``o`` (:mod:`kernels._split`). For a few rows over a wide input (``3072 → 768``
    at 16 tokens the unsplit kernel has 6 programs, each reading all of ``x``), the reads spread
    over ``KS`` times more programs.

    Priced with the terms of :func:`_path_seconds` (DRAM bytes: the operands once, the partials'
    stores; L2: ``x`` re-read per output split, the first factor per ``(m, o)``, the partials read
    back), plus, since the reducers run after their tiles' last partial, the reducer's own bytes
    (the other partials, its output tiles, their second-factor gathers) at one SM's share of the
    L2 bandwidth. **Predicted, not measured.**"""
    dev = _cost.DEFAULT if sms is None or sms == _cost.DEFAULT.sms else dataclasses.replace(_cost.DEFAULT, sms=sms)
    if not rows_ksplit_ok(b, r, in_interleaved) or M <= 0 or K <= 0 or N <= 0:
        return float("inf"), None
    kb, nb = cdiv(K, b), cdiv(N, b)
    Kp, Np, br = b * kb, b * nb, b * r
    hp = rows_width(b, r)
    x_b, y_b, h_b = M * K * elem, M * N * elem, M * b * br * inter
    w1_b = b * br * kb * elem
    w_b = w1_b + b * nb * br * elem
    steps = cdiv(K, quantum)
    per_sm = dev.l2_bw / dev.sms
    dt = "bf16" if elem == 2 else "fp32"
    rates = {hg: _cost.rate_for(dt, dev, hg) for hg in (False, True)}
    best = (float("inf"), None)
    blockwise = b * r >= 16                      # stage 1 per input block (contiguous input)
    qtp = next_pow2(b * r)
    w2 = b * r if blockwise and _pow2(b) and _pow2(r) else hp   # stage 2 batched (unpadded)
    for bm in (16, 32, 64):
        if bm > max(16, next_pow2(M)):
            break
        mb = cdiv(M, bm)
        rows_ = mb * bm
        for bn in (64, 128):
            if not _rows_ks_tile_ok(bm, bn, hp, blockwise):
                continue
            tiles = cdiv(N, bn)
            for os_ in sorted({cdiv(tiles, cdiv(tiles, s_)) for s_ in range(1, tiles + 1)}):
                for ks in (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
                    if ks > steps:
                        break
                    k_per = cdiv(steps, ks) * quantum
                    ks_eff = cdiv(K, k_per)
                    programs = mb * os_ * ks_eff
                    if ks_eff < 2 or programs > 4 * dev.sms:
                        continue
                    part = ks_eff * os_ * rows_ * hp * 4
                    reread = (os_ - 1) * x_b if x_b > dev.l2_bytes / 2 else 0
                    dram = x_b + y_b + w_b + (h_b if save_h else 0) + part + reread
                    l2 = ((os_ - 1) * x_b - reread + (mb * os_ - 1) * w1_b
                          + (ks_eff - 1) * os_ * rows_ * hp * 4)
                    if blockwise:   # per block met: its product, then its 0/1 placement
                        stage1 = rows_ * (Kp * qtp + min(b + ks_eff, b * ks_eff) * qtp * hp)
                    else:
                        stage1 = rows_ * Kp * hp
                    flops = 2.0 * (stage1 * os_ + rows_ * Np * w2)
                    # kernels._cost.kernel_seconds' terms, inline (thousands of plans a new shape)
                    f = _cost.fill(programs, dev)[1]
                    rate = rates[bm >= 64]
                    per_tiles = cdiv(tiles, os_)
                    tail = ((ks_eff - 1) * bm * hp * 4 + per_tiles * bn * (bm + w2) * elem) / per_sm
                    t = max(dram / dev.hbm_bw, (dram + l2) / (dev.l2_bw * f), flops / (rate * f)) + dev.launch_s + tail
                    if t < best[0]:
                        best = (t, (bm, bn, os_, ks_eff, k_per))
    return best


def _path_seconds(M: int, K: int, N: int, b: int, r: int, path: str, elem: int = 2,
                  inter: int = 2, save_h: bool = False, strided: bool = True, dev=None,
                  in_interleaved: bool = False) -> float:
    """Predicted forward seconds of ``path`` on ``dev`` (default: the dispatchers' device, ``kernels._cost.DEFAULT``),
    counting bytes moved *and* tensor FLOPs issued (tile padding included), each launch
    ``max(DRAM bytes / HBM, issued FLOPs / (rate · fill)) + launch floor`` with the device
    figures and the matrix rates of :mod:`fastfactor.sol.model` (HMMA share for tiles under 64
    rows). A lower bound, as ``sol`` is; **predicted, not measured**. Torch ops are modelled as
    ``sol`` models them (``torch_op_time``: every operand moved once, cuBLAS at the roofline).
    """
    from fastfactor.sol import model as SM

    dev = dev or _cost.DEFAULT
    kb, nb = cdiv(K, b), cdiv(N, b)
    Kp, Np, br = b * kb, b * nb, b * r
    hw = b * br                                  # h per row
    x_b, y_b, h_b = M * K * elem, M * N * elem, M * hw * inter
    w_b = (b * br * kb + b * nb * br) * elem
    rate = SM.rate_for("bf16" if elem == 2 else "fp32", dev)

    def launch(programs, dram, flops, hgmma=True, l2=0.0, issue=0.0):
        # l2: bytes of 32-byte sectors passing L2 -> SM beyond the DRAM bytes (scattered stores);
        # issue: warp-instructions of the launch (FMA builds: ROWS_FMA_ISSUE)
        _, f = SM.fill(programs, dev)
        r_ = rate if hgmma else rate * dev.hmma_fraction
        return max(dram / dev.hbm_bw, (dram + l2) / (dev.l2_bw * f),
                   flops / (r_ * f) if flops else 0.0,
                   _cost.issue_seconds(issue, dev, f) if issue else 0.0) + dev.launch_s

    # Monarch's output permutation written by the per-block kernels: one 32-byte sector per element
    scatter = 32.0 * M * N if strided else 0.0

    if path in ("rows", "rows_mma", "rows_fma", "rows_unsplit"):
        # rows_mma: the tensor-core builds (stage 1 split or not); rows_unsplit: without the split
        hp = rows_width(b, r)
        best = None
        if path != "rows_fma":
            for bm in (16, 32, 64, 128):
                m_blocks = cdiv(M, bm)
                tiles = cdiv(N, 128)
                split = max(1, min(tiles, (2 * dev.sms) // m_blocks))
                split = cdiv(tiles, cdiv(tiles, split))
                reread = (split - 1) * x_b if x_b > dev.l2_bytes / 2 else 0
                dram = x_b + y_b + w_b + (h_b if save_h else 0) + reread
                # every split reads its row block of x and the first factor again (from L2 at least)
                l2 = (split - 1) * x_b - reread + (m_blocks * split - 1) * b * br * kb * elem
                rows_ = m_blocks * bm
                if b * r >= 16:   # stage 1 block by block (unpadded), then placed by a 0/1 product
                    qtp = next_pow2(b * r)
                    stage1 = rows_ * (Kp * qtp + b * qtp * hp)
                else:             # stage 1 as one packed tile
                    stage1 = rows_ * Kp * hp
                # stage 2 batched over the output blocks (unpadded) where b·r >= 16, powers of two
                w2 = b * r if b * r >= 16 and _pow2(b) and _pow2(r) else hp
                flops = 2.0 * (stage1 * split + rows_ * Np * w2)
                t = launch(m_blocks * split, dram, flops, hgmma=bm >= 64, l2=l2)
                best = t if best is None else min(best, t)
            # the split of stage 1's reduction (few rows, wide input)
            if path != "rows_unsplit":
                best = min(best, rows_ksplit_plan(M, K, N, b, r, elem, inter, save_h, dev.sms,
                                                  in_interleaved=in_interleaved)[0])
        if path in ("rows", "rows_fma") and strided and _rows_fma_eligible(b, r, False, True):
            # the FMA build: no tensor-core FLOPs, its instruction issue by ROWS_FMA_ISSUE
            for c in rows_space(FMA=True, NBC=b, RC=r):
                bm, bn = c["BLOCK_M"], c["BLOCK_N"]
                m_blocks = cdiv(M, bm)
                tiles = cdiv(N, bn)
                split = max(1, min(tiles, (2 * dev.sms) // m_blocks))
                split = cdiv(tiles, cdiv(tiles, split))
                reread = (split - 1) * x_b if x_b > dev.l2_bytes / 2 else 0
                dram = x_b + y_b + w_b + (h_b if save_h else 0) + reread
                l2 = (split - 1) * x_b - reread + (m_blocks * split - 1) * w_b
                w, _ = rows_fma_warp_instructions(b, r, kb, N, bm, bn, c["BLOCK_K"], c["num_warps"], split)
                t = launch(m_blocks * split, dram, 0.0, l2=l2, issue=w * m_blocks * split)
                best = t if best is None else min(best, t)
        return best if best is not None else float("inf")
    if path == "two_stage":
        # stage 1 (batched over input blocks, 64-wide column tiles at least), stage 2 (batched
        # over output blocks, the reduction b·r padded to a 64-deep step)
        pad_n, pad_k = max(64, next_pow2(br)), cdiv(br, 64) * 64
        t1 = launch(b * cdiv(M, 128) * cdiv(br, 128), x_b + h_b, 2.0 * M * Kp * pad_n)
        t2 = launch(b * cdiv(M, 128) * cdiv(nb, 128), h_b + y_b, 2.0 * M * Np * pad_k, l2=scatter)
        return t1 + t2
    if path == "fused":
        # the chain: one program per (row block, output block, output tile); every output block
        # re-reads its row block of x, from DRAM when x does not fit in half the L2
        best = None
        for c in CHAIN_SPACE:   # the autotuner's candidates (its prune: BLOCK_N <= max(64, nb))
            bm, bn = c["BLOCK_M"], c["BLOCK_N"]
            if bn > max(64, next_pow2(nb)) or c["BLOCK_R"] > max(16, next_pow2(r)):
                continue
            tiles = cdiv(nb, bn)
            reads = b * tiles
            dram = x_b * (1 if x_b <= dev.l2_bytes / 2 else reads) + y_b + (h_b if save_h else 0) + w_b
            flops = 2.0 * cdiv(M, bm) * bm * max(16, next_pow2(r)) * b * (Kp * tiles + tiles * bn)
            rereads = x_b * (reads - 1) if x_b <= dev.l2_bytes / 2 else 0.0   # from L2
            t = launch(cdiv(M, bm) * b * tiles, dram, flops, hgmma=bm >= 64, l2=scatter + rereads)
            best = t if best is None else min(best, t)
        return best
    if path == "torch":
        # monarch_bmm in x's dtype: bmm, the P₁ copy of h, bmm, the P₂ copy of y, the bias add
        ops = [(x_b + w_b / 2 + h_b, 2.0 * M * Kp * br), (2 * h_b, 0), (h_b + w_b / 2 + y_b, 2.0 * M * Np * br),
               (2 * y_b, 0), (2 * y_b, 0)]
        return sum(max(nbytes / dev.hbm_bw, fl / rate) + dev.launch_s for nbytes, fl in ops)
    raise ValueError(f"path: expected one of {PATHS}, got {path!r}")


def _bwd_path_seconds(M: int, K: int, N: int, b: int, r: int, path: str, elem: int = 2,
                      inter: int = 2, need_w1: bool = True, strided: bool = True, dev=None,
                      dw2: Optional[bool] = None) -> float:
    """Predicted seconds of the backward of ``path`` (``dx``, ``dw1``, ``dw2`` and ``db``; ``K``,
    ``N`` the layer's in/out features), with the terms of :func:`_path_seconds`: ``'rows'`` is the
    row-block kernel read backwards (``g`` gathered on chip, contiguous ``dx``, ``dh`` stored) and
    ONE packed weight-gradient launch for ``dw1`` and ``dw2`` (+ ``db``) (:func:`_wgrad_pair`;
    the split partials summed in that launch); ``'fused'`` the chain read backwards
    (``g`` gathered through ``P₂``: one 32-byte sector per element for Monarch, per output block
    re-read) and two batched GEMMs over the rows; ``'two_stage'`` four batched GEMMs. ``dw2``
    (``'rows'``): the ``dx`` launch also stores ``dw2``'s and ``db``'s partials per row block
    (``g`` read once; :func:`rows_dw2`), summed by the weight-gradient launch beside ``dw1``
    instead of reading ``g`` again; None: as the launcher decides. **Predicted, not measured.**"""
    from fastfactor.sol import model as SM

    dev = dev or _cost.DEFAULT
    kb, nb = cdiv(K, b), cdiv(N, b)
    Kp, Np, br = b * kb, b * nb, b * r
    hw = b * br
    x_b, g_b, h_b = M * K * elem, M * N * elem, M * hw * inter
    w_b = (b * br * kb + b * nb * br) * elem
    rate = SM.rate_for("bf16" if elem == 2 else "fp32", dev)

    def launch(programs, dram, flops, hgmma=True, l2=0.0):
        _, f = SM.fill(programs, dev)
        r_ = rate if hgmma else rate * dev.hmma_fraction
        return max(dram / dev.hbm_bw, (dram + l2) / (dev.l2_bw * f),
                   flops / (r_ * f) if flops else 0.0) + dev.launch_s

    def wgrad(sides, parts=0.0):
        # the weight gradients in one launch (_wgrad_pair; _wgrad for one side): one packed product
        # per feature tile over each side's fixed splits of the rows (wgrad_side_split), grid axis
        # 1 the larger split count; a split side's fp32 partials stored (DRAM) and summed by each
        # tile's last program in the same launch (their reads are L2 hits)
        # (interleaved None: the side sums the DW2 dx launch's row-block partials, `parts` bytes,
        # in chunks of blocks for about two programs per SM: _wgrad_reduce_plan)
        plans = []
        for F, SB, interleaved in sides:
            reduce = interleaved is None
            blockwise = not reduce and not interleaved and br >= 16
            hp = next_pow2(br) if blockwise else rows_width(b, r)
            if reduce:
                blocks = cdiv(M, ROWS_DW2_BLOCK_M)
                split = cdiv(blocks, cdiv(blocks, min(blocks, max(1, cdiv(2 * dev.sms, cdiv(F, 128))))))
            else:
                split, _ = wgrad_side_split(M, F, b, r, interleaved, dev.sms)
            plans.append((F, SB, blockwise, hp, split, reduce))
        nout = max(p[4] for p in plans)
        best = None
        for bn in (64, 128, 256):
            programs = dram = flops = 0
            for F, SB, blockwise, hp, split, reduce in plans:
                programs += (b * cdiv(SB, bn) if blockwise else cdiv(F, bn)) * nout
                out = F * br * (4 * split + elem if split > 1 else elem)
                dram += out + (parts if reduce else M * F * elem + M * hw * inter)
                flops += 0.0 if reduce else 2.0 * M * F * hp
            t = launch(programs, dram, flops, hgmma=False)
            best = t if best is None else min(best, t)
        return best

    if path == "rows":
        t = _path_seconds(M, N, K, b, r, "rows", elem, inter, save_h=need_w1, strided=False, dev=dev,
                          in_interleaved=strided)
        if dw2 is None and need_w1 and rows_one_launch(M, K, N, b, r, elem, inter, strided, dev.sms):
            # the whole backward in the dx launch: x and the weight gradients move, dh does not
            t = _path_seconds(M, N, K, b, r, "rows", elem, inter, save_h=False, strided=False, dev=dev,
                              in_interleaved=strided)
            return t + (M * K * elem + w_b + N * elem) / dev.hbm_bw
        if dw2 is None:
            dw2 = rows_dw2(M, K, N, b, r, elem, inter, need_w1, strided, dev.sms)
        if dw2:
            # the partials (fp32, dw2's b·r per feature + db's one) stored by the dx launch (its
            # bytes add to a DRAM-bound launch) and read once by the weight-gradient launch
            part = cdiv(M, ROWS_DW2_BLOCK_M) * N * (br + 1) * 4.0
            return t + part / dev.hbm_bw + wgrad(([(K, kb, False)] if need_w1 else []) + [(N, nb, None)], part)
        return t + wgrad(([(K, kb, False)] if need_w1 else []) + [(N, nb, strided)])
    # dw1 = Σ_m dh·x (b groups of br x kb), dw2 = Σ_m g'·h (b groups of nb x br): one program owns
    # a tile of the gradient and the whole M-long reduction
    pad = max(16, next_pow2(br))
    t_w = 0.0
    if need_w1:
        t_w += launch(b * cdiv(br, 64) * cdiv(kb, 64), x_b + h_b, 2.0 * M * b * pad * kb, hgmma=False)
    t_w += launch(b * cdiv(nb, 64) * cdiv(br, 64), g_b + h_b, 2.0 * M * b * nb * pad, hgmma=False,
                  l2=32.0 * M * N if strided else 0.0)
    if path == "fused":
        tiles = cdiv(kb, 128)
        reads = b * tiles
        dram = g_b * (1 if g_b <= dev.l2_bytes / 2 else reads) + x_b + h_b + w_b
        # every program reads its whole row block of g: sector-wide elements when gathered (Monarch)
        gather = (32.0 * M * N if strided else g_b) * reads
        flops = 2.0 * M * max(16, next_pow2(r)) * b * (Np * tiles + Kp)
        return launch(cdiv(M, 64) * b * tiles, dram, flops, l2=gather) + t_w
    if path == "two_stage":
        pad_n, pad_k = max(64, next_pow2(br)), cdiv(br, 64) * 64
        t1 = launch(b * cdiv(M, 128) * cdiv(br, 128), g_b + h_b, 2.0 * M * Np * pad_n,
                    l2=32.0 * M * N if strided else 0.0)
        t2 = launch(b * cdiv(M, 128) * cdiv(kb, 128), h_b + x_b, 2.0 * M * Kp * pad_k)
        return t1 + t2 + t_w
    raise ValueError(f"path: expected one of rows, fused, two_stage, got {path!r}")


def rows_supported(nblocks: int, rank: int) -> bool:
    """The row-block kernel keeps ``h`` (``b·b·r`` values per row) on chip up to
    :data:`ROWS_MAX_WIDTH` columns."""
    return nblocks * nblocks * rank <= ROWS_MAX_WIDTH


def choose_path(M: int, K: int, N: int, nblocks: int, rank: int, elem: int = 2, save_h: bool = False,
                allow_torch: bool = False, strided: bool = True, backward: bool = False) -> str:
    """The path with the smallest predicted time (:func:`_path_seconds`: bytes and FLOPs, the sol
    model's terms and device), among ``'rows'`` (row-block kernel, ``h`` on chip, ``x`` read
    once; where ``b·b·r <= 64``), ``'fused'`` (the per-output-block chain), ``'two_stage'``
    (``h`` through memory) and, with ``allow_torch`` (the forward), ``'torch'`` (two ``bmm`` with
    the permutes). ``FASTFACTOR_MONARCH_PATH=rows|fused|two_stage|torch`` forces a path (``rows``
    falls back to ``fused`` where ``h`` does not fit on chip; ``torch`` applies to the forward).
    With ``backward=True`` (``M``, ``K``, ``N`` then the backward's: ``K`` = ``g``'s width) the
    paths are priced by :func:`_bwd_path_seconds` (``dx`` and the weight gradients together).
    """
    forced = os.environ.get("FASTFACTOR_MONARCH_PATH")
    if forced:
        if forced not in PATHS:
            raise ValueError(
                f"FASTFACTOR_MONARCH_PATH: expected one of {', '.join(PATHS)}, got {forced!r}"
            )
        if forced == "rows" and not rows_supported(nblocks, rank):
            return "fused"
        if forced == "torch" and not allow_torch:
            return "two_stage"
        return forced
    cands = [p for p in PATHS if (p != "rows" or rows_supported(nblocks, rank)) and (p != "torch" or allow_torch)]
    if backward:
        # (M, K, N) are the backward's: K = out_features (g's width), N = in_features (dx's)
        cands = [p for p in cands if p != "torch"]
        return min(cands, key=lambda p: _bwd_path_seconds(M, N, K, nblocks, rank, p, elem, elem, save_h, strided))
    return min(cands, key=lambda p: _path_seconds(M, K, N, nblocks, rank, p, elem, elem, save_h, strided))


def _rows(a, first, second, bias, z, h, *, M, NB, R, CB, SB, F_IN, F_OUT, in_inter, out_inter, dw2=None,
          dw1=None):
    """Launch the row-block kernel. ``first = (tensor, (s_q, s_p, s_t, s_c))``, ``second =
    (tensor, (s_p, s_s, s_q, s_t))``, ``h`` an ``(M, NB·NB·R)`` buffer (unit column stride) or
    None; ``in_inter``/``out_inter``: the input/output feature maps are interleaved
    (``f = c·NB + q``) rather than contiguous blocks (``f = q·CB + c``). ``dw2 = (hs, pw, prs)``
    (the backward ``dx`` with the packed stage 1, :func:`rows_dw2_ok`): the launch also stores
    dw2's partial of each row block of :func:`rows_dw2_block_m` rows into ``pw (blocks, NB, CB,
    NB·R)`` from the forward's saved ``hs``, and with ``prs (blocks, F_IN)`` db's. ``dw1 = (x,
    w1g)`` with ``dw2`` (one row block, ``M <=`` :data:`ROWS_ONE_LAUNCH_MAX_M`): the whole
    backward in this launch, ``pw``/``prs`` then ``dw2``/``db`` themselves (one block) and stage 2
    writing ``dw1`` into ``w1g``."""
    f1, s1 = first
    f2, s2 = second
    h_fp32 = intermediate_dtype(a.dtype) != a.dtype
    fma = rows_fma(NB, R, in_inter, out_inter, M=M, K=F_IN, N=F_OUT, elem=a.element_size(),
                   save_h=h is not None)
    blockwise = not fma and not in_inter and NB * R >= 16
    batched = in_inter and NB * R >= 16 and _pow2(NB) and _pow2(R)
    batched2 = not fma and NB * R >= 16 and _pow2(NB) and _pow2(R)
    hp = NB * NB * R if fma else rows_width(NB, R)
    plan = None if fma else rows_ksplit(M, F_IN, F_OUT, NB, R, a.element_size(),
                                        h.element_size() if h is not None else a.element_size(),
                                        h is not None, _config.num_sms(a.device), in_inter)
    consts = dict(
        HAS_BIAS=bias is not None, STORE_H=h is not None, H_FP32=h_fp32,
        UPCAST=upcast_dots(), PRECISION=dot_precision(a.dtype), FP64=a.dtype == torch.float64,
        IN_INTERLEAVED=in_inter, OUT_INTERLEAVED=out_inter,
        HP=hp, BLOCKWISE=blockwise,
        QTP=next_pow2(NB * R) if blockwise else 1, BATCHED=batched, BATCHED2=batched2, FMA=fma,
        NBC=NB if fma or batched or batched2 else 1, RC=R if fma or batched or batched2 else 1,
    )
    hs, pw, prs = dw2 if dw2 is not None else (z, z, None)
    x1, w1g = dw1 if dw1 is not None else (z, z)
    w1s = w1g.stride() if dw1 is not None else (0, 0, 0)
    args = lambda ws, cnt, k_per: (
        a, f1, f2, bias if bias is not None else z, z, h if h is not None else z, ws, cnt,
        hs, pw, prs if prs is not None else pw, x1, w1g,
        M, NB, R, CB, SB, F_IN, F_OUT, k_per, m_bucket(M),
        a.stride(0), a.stride(1), z.stride(0), z.stride(1), h.stride(0) if h is not None else 0,
        hs.stride(0), *(pw.stride()[:3] if dw2 is not None else (0, 0, 0)),
        prs.stride(0) if prs is not None else 0,
        x1.stride(0), x1.stride(1), w1s[0], w1s[1], w1s[2],
        *s1, *s2,
    )
    extra = dict(DW2=dw2 is not None, DB2=prs is not None, DW1=dw1 is not None)
    if dw2 is not None and (fma or blockwise or batched):
        raise ValueError("dw2: the DW2 dx launch takes the packed stage 1 (rows_dw2_ok)")
    if dw1 is not None and (dw2 is None or M > ROWS_ONE_LAUNCH_MAX_M or batched2 or fma):
        raise ValueError(f"dw1: the one-launch backward takes one row block of at most "
                         f"{ROWS_ONE_LAUNCH_MAX_M} rows and the packed stages, got M={M}")
    if dw2 is not None and plan is None:
        if dw1 is not None:
            # one row block (the block's tile holds every row): output splits as usual
            grid, bm = row_block_grid(M, F_OUT, a.device), max(16, next_pow2(M))
        else:
            # one program a row block, every output tile (no output splits: one partial per block)
            grid, bm = (lambda meta: (cdiv(M, meta["BLOCK_M"]), 1)), rows_dw2_block_m()
        _rows_dw2_tuned[grid](*args(z, z, F_IN), KSPLIT=False, SYNC=False, BLOCK_M=bm, **extra, **consts)
        return
    if plan is None:
        _rows_tuned[row_block_grid(M, F_OUT, a.device)](*args(z, z, F_IN), KSPLIT=False, SYNC=False,
                                                        **extra, **consts)
        return
    bm, bn, os_, ks, k_per = plan
    mb = cdiv(M, bm)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    _, sync, ws, cnt = split_buffers(ks, mb * os_, (os_, M, hp), a.device, z)
    ws = ws.to(acc) if ws.dtype != acc else ws
    if dw2 is not None and (dw1 is None or mb != 1):
        raise ValueError("dw2: with the split stage 1 only the one-launch backward (one row block)")
    _rows_ks_tuned[(mb, os_, ks)](*args(ws, cnt, k_per), KSPLIT=True, SYNC=sync, BLOCK_M=bm, BLOCK_N=bn,
                                  **extra, **consts)


def rows_ksplit(M: int, F_IN: int, F_OUT: int, NB: int, R: int, elem: int = 2, inter: int = 2,
                save_h: bool = False, sms: int = 132, in_interleaved: bool = False) -> Optional[tuple]:
    """The plan ``(BLOCK_M, BLOCK_N, OS, KS, K_PER)`` of :func:`rows_ksplit_plan` where the row-block
    kernel takes it: where stage 1 can be split and the plan is predicted faster than the unsplit
    launch; else None. ``FASTFACTOR_MONARCH_KSPLIT=0`` never splits, ``=1`` splits wherever a plan
    exists (tests)."""
    env = os.environ.get("FASTFACTOR_MONARCH_KSPLIT")
    if env not in (None, "", "0", "1"):
        raise ValueError(f"FASTFACTOR_MONARCH_KSPLIT: expected 0 or 1, got {env!r}")
    if env == "0" or not rows_ksplit_ok(NB, R, in_interleaved):
        return None
    quantum = 16 if _config.is_interpreter() else ROWS_KS_QUANTUM
    return _ksplit_pick(M, F_IN, F_OUT, NB, R, elem, inter, save_h, sms, quantum, in_interleaved, env == "1")


@functools.lru_cache(maxsize=4096)
def _ksplit_pick(M: int, F_IN: int, F_OUT: int, NB: int, R: int, elem: int, inter: int, save_h: bool,
                 sms: int, quantum: int, in_interleaved: bool, force: bool) -> Optional[tuple]:
    """:func:`rows_ksplit`'s model decision, cached per shape (the launcher asks at every launch)."""
    t, plan = rows_ksplit_plan(M, F_IN, F_OUT, NB, R, elem, inter, save_h, sms, quantum, in_interleaved)
    if plan is None or force:
        return plan
    dev = _cost.DEFAULT if sms == _cost.DEFAULT.sms else dataclasses.replace(_cost.DEFAULT, sms=sms)
    unsplit = _path_seconds(M, F_IN, F_OUT, NB, R, "rows_unsplit", elem, inter, save_h, dev=dev,
                            in_interleaved=in_interleaved)
    return plan if t < unsplit else None


def rows_dw2_ok(M: int, K: int, N: int, b: int, r: int, elem: int = 2, inter: int = 2, need_w1: bool = True,
                strided: bool = True, sms: int = 132) -> bool:
    """Whether the backward's ``dx`` launch (the row-block kernel on ``g``) runs the packed, unsplit
    stage 1 that can also take ``dw2``'s partials (``DW2``): ``b·r < 16`` (not the per-block or
    batched stage 1), not the FMA build, no split stage 1 (few rows)."""
    if b * r >= 16:
        return False
    if rows_fma(b, r, strided, False, M=M, K=N, N=K, elem=elem, save_h=need_w1):
        return False
    return rows_ksplit(M, N, K, b, r, elem, inter, need_w1, sms, strided) is None


def rows_one_launch(M: int, K: int, N: int, b: int, r: int, elem: int = 2, inter: int = 2, strided: bool = True,
                    sms: int = 132) -> bool:
    """Whether the row-block backward (``dx``, ``dw1``, ``dw2``, ``db``) runs as ONE launch: at
    one row block (``M <=`` :data:`ROWS_ONE_LAUNCH_MAX_M`) the ``dx`` launch holds every row, so
    its stage 1 stores ``dw2`` and ``db`` whole from the ``g`` tiles and the saved ``h``
    (``DW2``) and its stage 2 writes ``dw1`` from ``x`` tiles and the rounded ``dh`` (``DW1``): no
    weight-gradient launch, ``dh`` never stored. Where the ``dx`` launch has the packed stages
    (``b·r < 16``) and, if its stage 1 is split (few rows over a wide ``g``), one 16-row block
    (wider split tiles spilled in compile-check's generic sm_90 builds).
    It moves what the pair launch moved less ``dh``, and saves a launch: taken wherever it exists
    unless ``FASTFACTOR_MONARCH_DW2=0``."""
    env = os.environ.get("FASTFACTOR_MONARCH_DW2")
    if env not in (None, "", "0", "1"):
        raise ValueError(f"FASTFACTOR_MONARCH_DW2: expected 0 or 1, got {env!r}")
    if env == "0" or M > ROWS_ONE_LAUNCH_MAX_M or b * r >= 16:
        return False
    plan = rows_ksplit(M, N, K, b, r, elem, inter, False, sms, strided)
    return plan is None or (plan[0] == 16 and M <= 16)   # (a split stage 1: its 16-row tile only)


def rows_dw2(M: int, K: int, N: int, b: int, r: int, elem: int = 2, inter: int = 2, need_w1: bool = True,
             strided: bool = True, sms: int = 132) -> bool:
    """Whether the row-block backward computes ``dw2`` (and ``db``) in the ``dx`` launch, from the
    ``g`` tiles that launch loads anyway, as fp32 partials per row block that the weight-gradient
    launch sums, instead of as a product in that launch (which then reads ``g`` a second time):
    where :func:`rows_dw2_ok`, its row blocks fill the SMs, and predicted faster
    (:func:`_bwd_path_seconds`; many rows: ``g`` is ``M·N`` elements, the partials
    ``M/64·N·(b·r + 1)`` floats). ``K``, ``N``: the layer's
    in/out features. ``FASTFACTOR_MONARCH_DW2=0`` / ``1`` forces it off / on (where it exists)."""
    env = os.environ.get("FASTFACTOR_MONARCH_DW2")
    if env not in (None, "", "0", "1"):
        raise ValueError(f"FASTFACTOR_MONARCH_DW2: expected 0 or 1, got {env!r}")
    if env == "0" or not rows_dw2_ok(M, K, N, b, r, elem, inter, need_w1, strided, sms):
        return False
    return env == "1" or _dw2_faster(M, K, N, b, r, elem, inter, need_w1, strided, sms)


@functools.lru_cache(maxsize=4096)
def _dw2_faster(M: int, K: int, N: int, b: int, r: int, elem: int, inter: int, need_w1: bool, strided: bool,
                sms: int) -> bool:
    """:func:`rows_dw2`'s model decision, cached per shape (the launcher asks at every backward)."""
    if cdiv(M, ROWS_DW2_BLOCK_M) < sms:
        return False   # its row blocks alone must fill the SMs (the DW2 launch never splits outputs)
    dev = _cost.DEFAULT if sms == _cost.DEFAULT.sms else dataclasses.replace(_cost.DEFAULT, sms=sms)
    kw = dict(elem=elem, inter=inter, need_w1=need_w1, strided=strided, dev=dev)
    return (_bwd_path_seconds(M, K, N, b, r, "rows", dw2=True, **kw)
            < _bwd_path_seconds(M, K, N, b, r, "rows", dw2=False, **kw))


#: fewest rows one split of a weight-gradient reduction takes (tests lower it to exercise splits)
WGRAD_MIN_ROWS = 256


def wgrad_split(M: int, F: int, sms: int, tile: int = 128, min_tiles: int = 0) -> tuple[int, int]:
    """``(splits, rows per split)`` of a weight gradient's ``M``-long reduction. Up to
    :data:`WGRAD_MIN_ROWS` x 16 rows, when there are at least ``min_tiles`` feature tiles of
    ``tile`` features, one program takes the whole reduction (the kernel then writes the gradient
    itself); otherwise the rows are split for about two programs per SM, each split at least
    :data:`WGRAD_MIN_ROWS` rows. Depends only on the shape and the SM count, so a rerun on the
    same device sums the same partials in the same order (bitwise reproducible)."""
    M = max(M, 1)
    tiles = cdiv(max(F, 1), tile)
    if M <= 16 * WGRAD_MIN_ROWS and tiles >= min_tiles:
        return 1, M
    want = max(1, cdiv(2 * sms, tiles))
    rows = max(WGRAD_MIN_ROWS, cdiv(M, want))
    return cdiv(M, rows), rows


def wgrad_side_split(M: int, F: int, NB: int, R: int, interleaved: bool, sms: int) -> tuple[int, int]:
    """``(splits, rows per split)`` of one weight gradient of the row-block backward (``F`` data
    features; ``interleaved``: Monarch's ``dw2``): :func:`wgrad_split`, with the batched product's
    wider tiles (at least 16 rows per block, few of them) splitting earlier."""
    if interleaved and NB * R >= 16 and _pow2(NB) and _pow2(R):
        return wgrad_split(M, F, sms, tile=max(128, 32 * NB), min_tiles=sms // 2)
    return wgrad_split(M, F, sms)


def _wgrad_plan(d, hb, out_shape, out_strides, *, NB, R, SB, interleaved, dtype, rowsum=False):
    """How one weight gradient runs (shared by :func:`_wgrad` and :func:`_wgrad_pair`): the
    kernel's constexprs for this side, its row splits (:func:`wgrad_split`), and its feature tiles
    as a function of ``BLOCK_N``. The gradient is ``out[p, s, qt]`` (``out_strides = (sop, sos,
    soq)`` into a contiguous tensor of ``out_shape`` in ``dtype``) and, with ``rowsum``, ``Σ_m d``
    in ``d``'s dtype."""
    M, F = d.shape
    blockwise = not interleaved and NB * R >= 16
    batched = interleaved and NB * R >= 16 and _pow2(NB) and _pow2(R)
    split, rows = wgrad_side_split(M, F, NB, R, interleaved, _config.num_sms(d.device))
    if blockwise:
        tiles = lambda bn: NB * triton.cdiv(SB, bn)
    else:
        tiles = lambda bn: triton.cdiv(NB * SB, bn)
    return dict(d=d, hb=hb, M=M, F=F, SB=SB, out_shape=tuple(out_shape), out_strides=tuple(out_strides),
                dtype=dtype, rowsum=rowsum, split=split, rows=rows, tiles=tiles,
                MIXED=d.dtype != hb.dtype, INTERLEAVED=interleaved, BLOCKWISE=blockwise,
                HP=next_pow2(NB * R) if blockwise else rows_width(NB, R), BATCHED=batched,
                NBC=NB if batched else 1)


def _wgrad_buffers(p):
    """``(out, rowsum, ws, wrs)`` of one weight-gradient side :func:`_wgrad_plan`: the gradient in
    its dtype and (``rowsum``) ``Σ_m d`` in ``d``'s, which the kernel writes itself (one split: the
    program of each tile; several: each tile's last program to arrive, from the splits' partials
    in ``ws (splits, *out_shape)`` and ``wrs (splits, F)``, the accumulator dtype, summed in a
    fixed order). Separate tensors (the op's outputs may not alias); a side not split passes its
    outputs for the unused workspaces."""
    d = p["d"]
    out = torch.empty(p["out_shape"], device=d.device, dtype=p["dtype"])
    rs = torch.empty(p["F"], device=d.device, dtype=p.get("rs_dtype", d.dtype)) if p["rowsum"] else out
    if p["split"] == 1:
        return out, rs, out, rs
    acc = acc_dtype(d.dtype)
    ws = torch.empty((p["split"], *p["out_shape"]), device=d.device, dtype=acc)
    wrs = torch.empty((p["split"], p["F"]), device=d.device, dtype=acc) if p["rowsum"] else ws
    return out, rs, ws, wrs


def _wgrad_reduce_plan(p, parts, sms: int):
    """Side plan ``p`` (:func:`_wgrad_plan`, the packed layout) turned into the sum of the row-block
    partials ``parts = (pw (blocks, elements of the gradient), prs (blocks, F) or None)`` the DW2
    ``dx`` launch wrote (``REDUCE``): ``pw`` and ``prs`` take the places of the data and the
    intermediate, the blocks the place of the rows, split in chunks for about two programs per SM
    (each tile's chunks then summed in the launch like row splits)."""
    pw, prs = parts
    blocks = pw.shape[0]
    chunks = min(blocks, max(1, cdiv(2 * sms, p["tiles"](128))))
    rows = cdiv(blocks, chunks)
    return dict(p, d=pw, hb=prs if prs is not None else pw, M=blocks, rows=rows, split=cdiv(blocks, rows),
                MIXED=False, rs_dtype=p["d"].dtype)


def _wgrad_sync(plans, tiles: int, like: torch.Tensor) -> tuple:
    """``(SYNC, counters)``: arrival counters for ``tiles`` feature tiles when a side's rows are
    split on a GPU (the interpreter runs programs in id order: the last split reduces)."""
    sync = like.device.type == "cuda" and any(p["split"] > 1 for p in plans)
    return sync, (split_counters(like.device, tiles) if sync else like)


def _wgrad(d, hb, out_shape, out_strides, *, NB, R, SB, interleaved, dtype, rowsum=False, parts=None):
    """``Σ_m`` of the packed product ``d[m, f]·hb[m, col]`` kept on the block-diagonal pairs,
    written as ``out[p, s, qt]`` (``out_strides = (sop, sos, soq)`` into a contiguous tensor of
    ``out_shape``) in ``dtype``; with ``rowsum`` also ``Σ_m d`` (the bias gradient), in ``d``'s.
    One launch: with the rows split, each feature tile's last program sums the splits' fp32
    partials in a fixed order (:mod:`kernels._split`; bitwise reproducible). Returns ``(out,
    rowsum or None)``. (The row-block backward launches both weight gradients at once:
    :func:`_wgrad_pair`.) ``parts``: sum the DW2 ``dx`` launch's row-block partials instead
    (:func:`_wgrad_reduce_plan`; ``d`` and ``hb`` are then only the shapes' source)."""
    p = _wgrad_plan(d, hb, out_shape, out_strides, NB=NB, R=R, SB=SB, interleaved=interleaved,
                    dtype=dtype, rowsum=rowsum)
    if parts is not None:
        p = _wgrad_reduce_plan(p, parts, _config.num_sms(d.device))
        d, hb = p["d"], p["hb"]
    split = p["split"]
    out, rs, ws, wrs = _wgrad_buffers(p)
    sync, cnt = _wgrad_sync([p], p["tiles"](WGRAD_MIN_BN), out)
    grid = lambda meta: (p["tiles"](meta["BLOCK_N"]), split)
    _wgrad_tuned[grid](
        d, hb, out, rs, ws, wrs, cnt,
        p["M"], NB, R, SB, p["F"], p["rows"],
        d.stride(0), d.stride(1), hb.stride(0), ws.stride(0), *out_strides, wrs.stride(0),
        ROWSUM=rowsum, UPCAST=upcast_dots(), PRECISION=dot_precision(d.dtype),
        FP64=d.dtype == torch.float64, MIXED=p["MIXED"], INTERLEAVED=interleaved,
        BLOCKWISE=p["BLOCKWISE"], HP=p["HP"], BATCHED=p["BATCHED"], NBC=p["NBC"],
        SPLIT=split > 1, SYNC=sync, REDUCE=parts is not None,
    )
    return out, (rs if rowsum else None)


def _wgrad_pair(x, dh, g, hbuf, *, NB, R, kb, nb, strided, w1_dtype, w2_dtype, rowsum, parts=None):
    """``dw1``, ``dw2`` and ``db`` of the row-block backward in ONE launch of
    :func:`_wgrad_pair_kernel` (shapes as in the module docstring; ``x (M, K)``, ``dh (M, b·b·r)``
    in the layout ``dh[m, j, l, t]``, ``g (M, N)``, ``hbuf (M, b·b·r)`` as ``h[m, l, j, t]``)::

        dw1[j, l·r + t, c] = Σ_m dh[m, j, l, t] · x[m, j·kb + c]      (side A, w1's dtype)
        dw2[l, s, q]       = Σ_m g[m, o(l, s)] · h[m, l, q]          (side B, w2's dtype)
        db[n]              = Σ_m g[m, n]                            (side B, with ``rowsum``)

    Each side keeps the constexprs, row splits and per-tile reduction order that :func:`_wgrad`
    gives it alone (the same bits under one config; the launch takes one config for both sides,
    the first both sides' prune keeps); a split side's partials are summed in the launch by each
    tile's last program (no second launch, no padding). ``parts``: side B sums the DW2 ``dx``
    launch's row-block partials of ``dw2`` and ``db`` instead (``REDUCE_B``, :func:`_wgrad_reduce_plan`:
    ``g`` and ``hbuf`` are not read). Returns ``(dw1, dw2, db or None)``."""
    a = _wgrad_plan(x, dh, (NB, NB * R, kb), (NB * R * kb, 1, kb), NB=NB, R=R, SB=kb,
                    interleaved=False, dtype=w1_dtype)
    b = _wgrad_plan(g, hbuf, (NB, nb, NB * R), (nb * NB * R, NB * R, 1), NB=NB, R=R, SB=nb,
                    interleaved=strided, dtype=w2_dtype, rowsum=rowsum)
    if parts is not None:
        b = _wgrad_reduce_plan(b, parts, _config.num_sms(g.device))
    gb, hb = b["d"], b["hb"]
    oa, _, wsa, _ = _wgrad_buffers(a)
    ob, rs, wsb, wrs = _wgrad_buffers(b)
    sync, cnt = _wgrad_sync([a, b], a["tiles"](WGRAD_MIN_BN) + b["tiles"](WGRAD_MIN_BN), oa)
    grid = lambda meta: (a["tiles"](meta["BLOCK_N"]) + b["tiles"](meta["BLOCK_N"]), max(a["split"], b["split"]))
    _wgrad_pair_tuned[grid](
        x, dh, oa, wsa, gb, hb, ob, rs, wsb, wrs, cnt,
        a["M"], NB, R,
        kb, a["F"], a["rows"], a["split"],
        nb, b["F"], b["rows"], b["split"], b["M"],
        x.stride(0), x.stride(1), dh.stride(0), wsa.stride(0), *a["out_strides"],
        gb.stride(0), gb.stride(1), hb.stride(0), wsb.stride(0), *b["out_strides"],
        wrs.stride(0),
        UPCAST=upcast_dots(), PRECISION=dot_precision(x.dtype), FP64=x.dtype == torch.float64, SYNC=sync,
        MIXED_A=a["MIXED"], BLOCKWISE_A=a["BLOCKWISE"], HP_A=a["HP"], SPLIT_A=a["split"] > 1,
        ROWSUM=rowsum, MIXED_B=b["MIXED"], INTERLEAVED_B=strided, BLOCKWISE_B=b["BLOCKWISE"],
        HP_B=b["HP"], BATCHED_B=b["BATCHED"], NBC_B=b["NBC"], SPLIT_B=b["split"] > 1,
        REDUCE_B=parts is not None,
    )
    return oa, ob, (rs if rowsum else None)


def _bgemm(G, I, J, KR, a, b, c, bias=None, rowsum=None):
    """Launch the batched GEMM. ``a = (tensor, (sg, si, sk), (FG, FI, FK, LIM))``,
    ``b = (tensor, (sg, sk, sj), (FG, FK, FJ, LIM))``, ``c = (tensor, (sg, si, sj, sj_hi, split),
    (FG, FJ, LIM))``; feature tuples may be None (no mask). ``a`` and ``b`` may differ in dtype
    (an fp32 intermediate against fp16 data): both are then converted to fp32 and the dot runs
    at the precision of the lower-precision operand (TF32 for fp16)."""
    at, (sag, sai, sak), fa = a
    bt, (sbg, sbk, sbj), fb = b
    ct, (scg, sci, scj, scj_hi, split), fc = c
    fa = fa or (0, 0, 0, _NO_LIMIT)
    fb = fb or (0, 0, 0, _NO_LIMIT)
    fc = fc or (0, 0, _NO_LIMIT)
    if I == 0 or J == 0 or G == 0:
        return
    grid = lambda meta: (triton.cdiv(I, meta["BLOCK_M"]) * triton.cdiv(J, meta["BLOCK_N"]), G)
    mixed = at.dtype != bt.dtype
    low = bt.dtype if mixed and at.dtype == torch.float32 else at.dtype  # the op's input dtype
    _bgemm_tuned[grid](
        at, bt, ct, bias if bias is not None else ct, rowsum if rowsum is not None else ct,
        G, I, J, KR,
        sag, sai, sak, *fa,
        sbg, sbk, sbj, *fb,
        scg, sci, scj, scj_hi, split, *fc,
        HAS_BIAS=bias is not None, ROWSUM=rowsum is not None,
        UPCAST=upcast_dots(), PRECISION=dot_precision(low), FP64=at.dtype == torch.float64,
        MIXED=mixed,
    )


def _chain(a, first, second, bias, z, h, *, M, NB, R, CB, SB, F_IN, F_OUT, imap, omap):
    """Launch the chain kernel. ``first = (tensor, (s_q, s_p, s_t, s_c))``, ``second =
    (tensor, (s_p, s_s, s_q, s_t))``, ``h = (tensor, (s_m, s_q, s_p, s_t))`` or None,
    ``imap = (IQ, IC)``, ``omap = (OP, OS)``. The intermediate stays fp32 on chip when ``h``'s
    buffer is fp32 or, without one, when ``intermediate_dtype`` of ``a`` says so."""
    w1t, s1 = first
    w2t, s2 = second
    ht, sh = h if h is not None else (z, (0, 0, 0, 0))
    h_fp32 = intermediate_dtype(a.dtype) != a.dtype

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), NB, triton.cdiv(SB, meta["BLOCK_N"]))

    _chain_tuned[grid](
        a, w1t, w2t, bias if bias is not None else z, z, ht,
        M, NB, R, CB, SB, F_IN, F_OUT, m_bucket(M),
        *imap, *omap,
        a.stride(0), a.stride(1), *s1, *s2, z.stride(0), z.stride(1), *sh,
        HAS_BIAS=bias is not None, STORE_H=h is not None, H_FP32=h_fp32,
        UPCAST=upcast_dots(), PRECISION=dot_precision(a.dtype), FP64=a.dtype == torch.float64,
    )


def monarch_fwd(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    strided: bool,
    save_h: bool,
    path: Optional[str] = None,
):
    """Forward launcher: ``(y (M, N), hbuf (M, b·b·r) or None)`` for ``x (M, K)``; ``hbuf`` has
    dtype ``intermediate_dtype(x.dtype)`` (fp32 for fp16 inputs)."""
    M, K = x.shape
    N = out_features
    b, r, kb, nb = factor_dims(w1, w2)
    OL, OS = out_index_map(b, nb, strided)
    inter = intermediate_dtype(x.dtype)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    hbuf = torch.empty((M, b * b * r), device=x.device, dtype=inter) if save_h else None
    if M == 0 or N == 0:
        return y, hbuf
    # priced as a training forward (h saved) with or without save_h, so that y does not depend
    # on the grad mode (the inference forward takes the training forward's path)
    path = path or choose_path(M, K, N, b, r, x.element_size(), True, allow_torch=True, strided=strided)
    br = b * r
    if path == "rows" and not rows_supported(b, r):
        path = "fused"
    if path == "torch":
        # the two-bmm formulation (where it is predicted faster): in x's dtype, except fp16,
        # whose intermediate stays fp32 (then every product runs in fp32)
        acc = None if inter == x.dtype else torch.float32
        yt, ht = monarch_bmm(x, w1, w2, bias, N, strided, acc_dtype=acc, return_h=True)
        y.copy_(yt)
        if save_h:
            hbuf.copy_(ht)
        return y, hbuf
    if path == "rows":
        _rows(
            x,
            (w1, (w1.stride(0), r * w1.stride(1), w1.stride(1), w1.stride(2))),
            (w2, (w2.stride(0), w2.stride(1), r * w2.stride(2), w2.stride(2))),
            bias, y, hbuf,
            M=M, NB=b, R=r, CB=kb, SB=nb, F_IN=K, F_OUT=N, in_inter=False, out_inter=strided,
        )
        return y, hbuf
    if path == "fused":
        _chain(
            x,
            (w1, (w1.stride(0), r * w1.stride(1), w1.stride(1), w1.stride(2))),
            (w2, (w2.stride(0), w2.stride(1), r * w2.stride(2), w2.stride(2))),
            bias, y,
            (hbuf, (hbuf.stride(0), r, br, 1)) if save_h else None,   # hbuf[m, l=p, j=q, t]
            M=M, NB=b, R=r, CB=kb, SB=nb, F_IN=K, F_OUT=N, imap=(kb, 1), omap=(OL, OS),
        )
        return y, hbuf
    h = hbuf if save_h else torch.empty((M, b * br), device=x.device, dtype=inter)
    sx_m, sx_f = x.stride()
    # stage 1, batched over input blocks j: h[m, l, j, t] = Σ_c x[m, j·kb + c]·w1[j, l·r + t, c]
    _bgemm(
        b, M, br, kb,
        (x, (kb * sx_f, sx_m, sx_f), (kb, 0, 1, K)),
        (w1, (w1.stride(0), w1.stride(2), w1.stride(1)), None),
        (h, (r, h.stride(0), 1, br, r), None),
    )
    # stage 2, batched over output blocks l: y[m, o(l, s)] = Σ_q h[m, l, q]·w2[l, s, q] (+ b)
    sy_m, sy_f = y.stride()
    _bgemm(
        b, M, nb, br,
        (h, (br, h.stride(0), 1), None),
        (w2, (w2.stride(0), w2.stride(2), w2.stride(1)), None),
        (y, (OL * sy_f, sy_m, OS * sy_f, 0, _NO_SPLIT), (OL, OS, N)),
        bias=bias,
    )
    return y, hbuf


def monarch_bwd(
    g: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    hbuf: Optional[torch.Tensor],
    strided: bool,
    has_bias: bool,
    need_x: bool = True,
    need_w1: bool = True,
    need_w2: bool = True,
    path: Optional[str] = None,
):
    """Backward launcher: ``(dx, dw1, dw2, db)`` (None where not needed).

    g: (M, N), x: (M, K), hbuf: (M, b·b·r) saved by the forward or None (recomputed then).
    ``dh`` goes through an ``intermediate_dtype`` buffer (fp32 for fp16 inputs).
    """
    M, N = g.shape
    K = x.shape[1]
    b, r, kb, nb = factor_dims(w1, w2)
    br = b * r
    OL, OS = out_index_map(b, nb, strided)
    dx = dw1 = dw2 = db = None
    if M == 0:
        return (
            x.new_zeros((0, K)) if need_x else None,
            torch.zeros_like(w1) if need_w1 else None,
            torch.zeros_like(w2) if need_w2 else None,
            g.new_zeros((N,)) if has_bias else None,
        )
    sg_m, sg_f = g.stride()
    sx_m, sx_f = x.stride()
    g_op = lambda sg, si, sk, feat: (g, (sg, si, sk), feat)
    dh = None
    path = path or choose_path(M, N, K, b, r, g.element_size(), need_w1, strided=strided, backward=True)
    if path == "rows" and not rows_supported(b, r):
        path = "fused"
    parts = None   # (buffer, dw2 elements): dw2 (+ db) partials per row block from the dx launch
    # the factors as the chain read backwards takes them (dx launches: g is the input)
    f1_bwd = (w2, (w2.stride(0), r * w2.stride(2), w2.stride(2), w2.stride(1)))
    f2_bwd = (w1, (w1.stride(0), w1.stride(2), r * w1.stride(1), w1.stride(1)))
    if (path == "rows" and need_x and need_w1 and need_w2 and hbuf is not None and x.dtype == g.dtype
            and rows_one_launch(M, K, N, b, r, g.element_size(), intermediate_dtype(g.dtype).itemsize,
                                strided, _config.num_sms(g.device))):
        # one row block: the whole backward in the dx launch (DW2 with the block's dw2 and db
        # whole, DW1 for dw1 from x); no dh, no weight-gradient launch
        dx = torch.empty((M, K), device=x.device, dtype=x.dtype)
        dw1 = torch.empty((b, br, kb), device=x.device, dtype=w1.dtype)
        dw2 = torch.empty((b, nb, br), device=x.device, dtype=w2.dtype)
        db = torch.empty((N,), device=g.device, dtype=g.dtype) if has_bias else None
        _rows(
            g,
            f1_bwd, f2_bwd,
            None, dx, None,
            M=M, NB=b, R=r, CB=nb, SB=kb, F_IN=N, F_OUT=K, in_inter=strided, out_inter=False,
            dw2=(hbuf, dw2.view(1, b, nb, br), db.view(1, N) if has_bias else None), dw1=(x, dw1),
        )
        return dx, dw1, dw2, db
    if need_x or need_w1:
        dh = torch.empty((M, b * br), device=g.device, dtype=intermediate_dtype(g.dtype))  # dh[m, j, l, t]
        if need_x:
            dx = torch.empty((M, K), device=x.device, dtype=x.dtype)
            if path == "rows":
                dw2_args = None
                if (need_w2 and hbuf is not None and x.dtype == g.dtype
                        and rows_dw2(M, K, N, b, r, g.element_size(), dh.element_size(), need_w1, strided,
                                     _config.num_sms(g.device))):
                    # g read once: the dx launch also stores dw2's (and db's) partial of each row
                    # block, one buffer (blocks, b·nb·br [+ N]) the weight-gradient launch sums
                    nw2 = b * nb * br
                    buf = torch.empty((cdiv(M, rows_dw2_block_m()), nw2 + (N if has_bias else 0)),
                                      device=g.device, dtype=acc_dtype(g.dtype))
                    dw2_args = (hbuf, buf[:, :nw2].view(-1, b, nb, br), buf[:, nw2:] if has_bias else None)
                    parts = (buf, nw2)
                # dx = the chain read backwards: g (gathered through P₂ on chip) is the input
                _rows(
                    g,
                    f1_bwd, f2_bwd,
                    None, dx, dh if need_w1 else None,
                    M=M, NB=b, R=r, CB=nb, SB=kb, F_IN=N, F_OUT=K, in_inter=strided, out_inter=False,
                    dw2=dw2_args,
                )
            elif path == "fused":
                _chain(
                    g,
                    f1_bwd, f2_bwd,
                    None, dx,
                    (dh, (dh.stride(0), r, br, 1)),
                    M=M, NB=b, R=r, CB=nb, SB=kb, F_IN=N, F_OUT=K, imap=(OL, OS), omap=(kb, 1),
                )
            else:
                dx = None
        if dx is None or not need_x:
            # dh'[m, l, q] = Σ_s g[m, o(l, s)]·w2[l, s, q], stored as dh[m, j, l, t] (q = j·r + t)
            _bgemm(
                b, M, br, nb,
                g_op(OL * sg_f, sg_m, OS * sg_f, (OL, 0, OS, N)),
                (w2, (w2.stride(0), w2.stride(1), w2.stride(2)), None),
                (dh, (r, dh.stride(0), 1, br, r), None),
            )
        if need_x and dx is None:
            dx = torch.empty((M, K), device=x.device, dtype=x.dtype)
            # dx[m, j·kb + c] = Σ_p dh[m, j, p]·w1[j, p, c]
            _bgemm(
                b, M, kb, br,
                (dh, (br, dh.stride(0), 1), None),
                (w1, (w1.stride(0), w1.stride(1), w1.stride(2)), None),
                (dx, (kb * dx.stride(1), dx.stride(0), dx.stride(1), 0, _NO_SPLIT), (kb, 1, K)),
            )
    if path == "rows":
        # the weight gradients as packed products over fixed splits of the rows (no atomics):
        # dw1[j, p, c] = Σ_m dh[m, j, p]·x[m, j·kb + c]; dw2[l, s, q] = Σ_m g[m, o(l, s)]·h[m, l, q];
        # db = Σ_m g. Both weight gradients: one launch (_wgrad_pair); one of them: _wgrad.
        if parts is not None:
            # dw2 and db: the dx launch's row-block partials, summed in the weight-gradient launch
            # (with dw1: the pair's side B; else alone), in a fixed order
            buf, nw2 = parts
            parts = (buf[:, :nw2], buf[:, nw2:] if has_bias else None)
            if need_w1:
                return (dx,) + _wgrad_pair(x, dh, g, hbuf, NB=b, R=r, kb=kb, nb=nb, strided=strided,
                                           w1_dtype=w1.dtype, w2_dtype=w2.dtype, rowsum=has_bias, parts=parts)
            dw2, db = _wgrad(g, hbuf, (b, nb, br), (nb * br, br, 1), NB=b, R=r, SB=nb,
                             interleaved=strided, dtype=w2.dtype, rowsum=has_bias, parts=parts)
            return dx, dw1, dw2, db
        if need_w2 and hbuf is None:
            _, hbuf = monarch_fwd(x, w1, w2, None, N, strided, save_h=True, path="rows")
        if need_w1 and need_w2 and x.dtype == g.dtype:   # (one dtype: one PRECISION / FP64 for both)
            dw1, dw2, db = _wgrad_pair(x, dh, g, hbuf, NB=b, R=r, kb=kb, nb=nb, strided=strided,
                                       w1_dtype=w1.dtype, w2_dtype=w2.dtype, rowsum=has_bias)
            return dx, dw1, dw2, db
        if need_w1:
            dw1, _ = _wgrad(x, dh, (b, br, kb), (br * kb, 1, kb), NB=b, R=r, SB=kb,
                            interleaved=False, dtype=w1.dtype)
        if need_w2:
            dw2, db = _wgrad(g, hbuf, (b, nb, br), (nb * br, br, 1), NB=b, R=r, SB=nb,
                             interleaved=strided, dtype=w2.dtype, rowsum=has_bias)
        elif has_bias:
            db = torch.sum(g, 0, dtype=acc_dtype(g.dtype)).to(g.dtype)
        return dx, dw1, dw2, db
    if need_w1:
        dw1 = torch.empty_like(w1, memory_format=torch.contiguous_format)
        # dw1[j, p, c] = Σ_m dh[m, j, p]·x[m, j·kb + c]
        _bgemm(
            b, br, kb, M,
            (dh, (br, 1, dh.stride(0)), None),
            (x, (kb * sx_f, sx_m, sx_f), (kb, 0, 1, K)),
            (dw1, (dw1.stride(0), dw1.stride(1), dw1.stride(2), 0, _NO_SPLIT), None),
        )
    if need_w2 or has_bias:
        if need_w2 and hbuf is None:
            _, hbuf = monarch_fwd(x, w1, w2, None, N, strided, save_h=True, path="two_stage")
        db32 = torch.empty((N,), device=g.device, dtype=acc_dtype(g.dtype)) if has_bias else None
        if need_w2:
            dw2 = torch.empty_like(w2, memory_format=torch.contiguous_format)
            hb = hbuf
        else:  # only db: run the rowsum over a 1-column product
            dw2 = torch.empty((b, nb, 1), device=g.device, dtype=g.dtype)
            hb = g.new_zeros((M, b))
        hcols = dw2.shape[2]
        # dw2[l, s, q] = Σ_m g[m, o(l, s)]·h[m, l, q]; db = Σ_m g (row sums of gᵀ)
        _bgemm(
            b, nb, hcols, M,
            g_op(OL * sg_f, OS * sg_f, sg_m, (OL, OS, 0, N)),
            (hb, (hcols, hb.stride(0), 1), None),
            (dw2, (dw2.stride(0), dw2.stride(1), dw2.stride(2), 0, _NO_SPLIT), None),
            rowsum=db32,
        )
        if not need_w2:
            dw2 = None
        db = db32.to(g.dtype) if has_bias else None
    return dx, dw1, dw2, db
