"""Fused low-rank linear: ``y = (x·Vᵀ)·Uᵀ + b``.

Shapes: ``x (M, K)`` (the op flattens leading dims), ``v (R, K)``, ``u (N, R)``, ``b (N,)``,
``y (M, N)``; the intermediate ``t = x·Vᵀ`` is ``(M, R)``. FLOPs: ``2·M·R·(K + N)`` against
``2·M·K·N`` for the dense layer.

Backward (with ``g = dL/dy``)::

    dt = g·U          (M, R)
    dx = dt·V         (M, K)
    dU = gᵀ·t         (N, R)
    dV = dtᵀ·x        (R, K)
    db = Σ_m g[m, :]  (N,)

Design
------
Four paths, chosen per shape by :func:`choose_path` from a stated cost model (below); every byte
figure is per call, ``e`` bytes per element, ``P`` programs, ``S`` split-K factor, 132 SMs.

* ``'decode'`` — a handful of rows (``M <= 64``): ``_decode_kernel``, **one launch** in three
  roles (:func:`decode`). ``N0 <= 32`` producers each multiply one ``K`` chunk of ``x`` by the same
  chunk of ``V`` for every rank (fp32 partials, ``N0·M·R·4`` bytes); ``ceil(R/16)`` reducers sum
  the partials of 16 columns of ``t`` in the fixed order ``p = 0, 1, …`` and round ``t`` once;
  ``ceil(N/BLOCK_N)`` consumers load their rows of ``U`` *before* waiting for ``t`` (the read of
  ``U`` overlaps the producers'), then write ``y``. Traffic ``(M·K + R·K + N·R + M·N)·e`` plus the
  partials and ``t`` (in L2); ``V`` and ``U`` each read once. Roles come from a ticket drawn at
  program start, so a program waits only for programs that started before it (never a grid
  barrier, no deadlock whatever the residency); the counters reset themselves at the end; no
  atomics touch data, so the result is bitwise reproducible. At M = 16, d = 4096, ratio 0.25:
  one launch of 192 programs against two cuBLAS launches, *predicted* 2.07x dense ``F.linear``
  and 1.40x the unfused path (``fastfactor sol``). The rank is padded to a multiple of 16
  (:func:`rank_pieces`); ``BLOCK_M x R_PAD <= 8192`` (registers; ``R <= 512`` at 16 rows).

* ``'two_gemm'`` — our Triton GEMM ``_gemm_kernel`` twice (``t = x·Vᵀ`` to memory, then
  ``y = t·Uᵀ + b``), any strides (a transpose is a stride swap). Compulsory traffic
  ``(M·K + R·K + 2·M·R + N·R + M·N)·e``. Each operand tile is re-read by the programs of the other
  dimension (``x`` ``ceil(R/BLOCK_N)`` times, ``V`` ``ceil(M/BLOCK_M)`` times: from L2 when they fit).
  When the output tiles alone give fewer than 132 programs — the **skinny / decode** case, a
  handful of rows — the ``K`` reduction is **split** over ``S`` programs per tile
  (:func:`split_count`): each writes an fp32 partial to a workspace ``(S, M, N)`` and
  ``_splitk_reduce_kernel`` sums them in the fixed order ``s = 0, 1, …`` (no atomics: bitwise
  reproducible), adds the bias and rounds once. So at M = 16, d = 4096, ratio 0.25 ``V`` and ``U``
  are each read from memory exactly once, by 192 and 256 programs (counted under the interpreter:
  ``profiling/lowrank_counts.py``); the workspace (``S·M·R·4`` bytes, ~0.2 MB) stays in L2. The
  reduce is a separate launch here (three launches for the forward, against two for cuBLAS); the
  ``'decode'`` path does the whole forward in one. Small-``M`` configs (``BLOCK_M = 16``) are
  picked per shape (:func:`gemm_config`).
* ``'fused'`` — ``_chain_kernel`` computes ``z = (a·Aᵀ)·Bᵀ`` for one block of ``BLOCK_M`` rows: the
  first product is accumulated in fp32 registers over ``K``, rounded and multiplied straight into
  the output tiles, so ``t`` never goes to memory (saves ``2·M·R·e``). The rank is padded to a
  multiple of 16 (:func:`rank_pieces`: up to three power-of-two register tiles, 96 = 64 + 32),
  at most 256. Every program streams all of ``V`` (``P·R·K·e`` from L2) and, per row block, all
  of ``U``; with few row blocks the ``N`` tiles are split over more programs, each recomputing its
  intermediate. The forward is ``a = x, A = V, B = U``; the backward's ``dx`` is the same chain
  with ``a = g, A = Uᵀ, B = Vᵀ``. At ratio 0.25 the model never prefers it (the re-reads of ``V``
  cost more than the round trip of ``t`` they save); ``FASTFACTOR_LOWRANK_PATH=fused`` forces it.
* ``'torch'`` — two cuBLAS products (``torch.mm``, ``torch.addmm``; deterministic for a given
  GPU and library), the same compulsory traffic as ``two_gemm``. Chosen where the products are
  compute-bound (large ``M``), since cuBLAS reaches a higher tensor-core rate than our
  non-persistent, pointer-based tiles. fp16 keeps an fp32 intermediate (range), which cuBLAS
  cannot multiply with fp16 factors: fp16 stays on ``two_gemm``.

Backward: ``dt`` and ``dx`` as the forward's path; the weight gradients ``dU = gᵀ·t`` and
``dV = dtᵀ·x`` reduce over all ``M`` rows, which at d = 768 gives 6-48 output tiles: on our GEMM
that reduction is split (same split-K, fixed-order reduce) until the launch fills the GPU.
``db = Σ_m g`` is its own split reduction (``_rowsum_kernel``, ``M·N·e`` bytes, then the same
reduce), no longer a row sum inside every program of ``dU``'s main loop.

Cost model (:func:`plan`, :func:`plan_bwd`, :func:`choose_path`; a prediction, not a measurement):
``fastfactor sol``'s own, from one place (``kernels/_cost.py``: device figures and formulas shared
with :mod:`fastfactor.sol.model`), applied to each path's launches counted from the shapes: per
launch of ours ``max(DRAM / HBM, L2 bytes / (L2 bw·f), issued FLOPs / (rate·f)) + launch floor``
(``f`` the busy fraction after wave quantization; re-reads of an operand fitting in half the L2
cost L2 bandwidth only; HMMA tiles at 0.6 of the wgmma rate), cuBLAS products ideal (operands
moved once, full rate) plus the launch floor. A kernel of ours is dispatched only where predicted
at least 5 % faster than the cuBLAS path (``MARGIN``); everywhere else the op calls cuBLAS: never
slower than the unfused two-matmul path. The backward chooses its own path the same way
(:func:`choose_bwd_path`).

Save or recompute ``t``
    In training (any input requires grad) the forward also stores ``t`` (``M·R`` elements, i.e.
    ``R/K`` of the size of ``x``, which autograd keeps anyway), because recomputing it in the
    backward costs a full ``M·K·R`` GEMM, half the forward FLOPs at square shapes. At inference
    nothing but ``y`` is written. The backward recomputes ``t`` only when it was not saved.

Precision
    Dot operands are in the input dtype with fp32 accumulation; fp32 inputs use TF32 only when
    ``torch.backends.cuda.matmul.allow_tf32`` is on (PyTorch's own switch), else IEEE fp32. The
    intermediate is rounded to the input dtype before the second product for bf16 and fp32 (as a
    bf16 model's own two matmuls do). For fp16 it is kept in fp32 instead
    (:func:`intermediate_dtype`): ``x·Vᵀ`` can exceed fp16's range (65504) where ``y`` does not,
    so the second product runs on fp32 operands as TF32 — the same 10-bit mantissa as fp16, fp32's
    range — at half the fp16 tensor-core rate for that product, and a saved ``t`` takes 4 bytes
    per element. Under the Triton interpreter the operands are
    upcast to fp32 first (the interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch

from . import _cost
from ._config import (
    HAS_TRITON,
    KernelSpec,
    Tunable,
    acc_dtype,
    dot_precision,
    is_interpreter,
    m_bucket,
    next_pow2,
    num_sms,
    register_kernel,
    row_block_grid,
    upcast_dots,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

#: Largest padded rank the fused chain keeps in registers.
FUSED_MAX_R = 256


# ============================================================================================
# Reference
# ============================================================================================

def intermediate_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the rank-r intermediate ``t = x·Vᵀ``: fp32 for fp16 inputs (range), else the input's."""
    return torch.float32 if dtype == torch.float16 else dtype


def lowrank_linear_ref(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    return_t: bool = False,
):
    """Pure-PyTorch ``y = (x·Vᵀ)·Uᵀ + b`` with fp32 accumulation (fp64 stays fp64).

    x: (..., K), v: (R, K), u: (N, R), bias: (N,) or None -> (..., N) in x's dtype, or with
    ``return_t`` ``(y, t)``: the intermediate ``x·Vᵀ`` in :func:`intermediate_dtype` (what the
    forward saves for the backward). Differentiable with ordinary autograd (used by the CPU path
    and as the test oracle).
    """
    acc = acc_dtype(x.dtype)
    t = torch.matmul(x.to(acc), v.to(acc).t())
    if intermediate_dtype(x.dtype) != acc:
        t = t.to(x.dtype).to(acc)  # same rounding of the intermediate as the kernels
    y = torch.matmul(t, u.to(acc).t())
    if bias is not None:
        y = y + bias.to(acc)
    if return_t:
        return y.to(x.dtype), t.to(intermediate_dtype(x.dtype))
    return y.to(x.dtype)


def lowrank_bwd_ref(
    g: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    t: Optional[torch.Tensor],
    has_bias: bool,
    need_x: bool = True,
    need_u: bool = True,
    need_v: bool = True,
):
    """Pure-PyTorch backward of :func:`lowrank_linear_ref`: ``(dx, du, dv, db)``, ``None`` where not
    asked for. ``g (M, N)``, ``x (M, K)``, ``u (N, R)``, ``v (R, K)``, ``t (M, R)`` the saved
    ``x·Vᵀ`` or None (recomputed). fp32 accumulation (fp64 stays fp64); the intermediates ``t``
    and ``dt = g·U`` are rounded to :func:`intermediate_dtype` as the kernels round them."""
    acc = acc_dtype(x.dtype)
    g32, x32, u32, v32 = g.to(acc), x.to(acc), u.to(acc), v.to(acc)
    inter = intermediate_dtype(x.dtype)
    t32 = t.to(acc) if t is not None else (x32 @ v32.t()).to(inter).to(acc)
    dt = (g32 @ u32).to(inter).to(acc)
    dx = (dt @ v32).to(x.dtype) if need_x else None
    du = (g32.t() @ t32).to(u.dtype) if need_u else None
    dv = (dt.t() @ x32).to(v.dtype) if need_v else None
    db = g32.sum(0).to(g.dtype) if has_bias else None
    return dx, du, dv, db


# ============================================================================================
# Kernels
# ============================================================================================

def _pad_rank(r: int) -> int:
    """Power-of-two padding (>= 16). Kept for the 2:4 dense-sparse chain (``kernels/sparse24.py``),
    whose intermediate is a single register tile; the low-rank chain pads to a multiple of 16
    instead (:func:`rank_pieces`)."""
    return max(16, next_pow2(r))


def rank_pieces(r: int) -> tuple[int, int, int]:
    """The rank padded to a multiple of 16, split into at most three power-of-two register tiles
    ``(R0, R1, R2)`` (``0`` = absent) that the fused chain keeps side by side and loops over.

    48 = 32 + 16, 96 = 64 + 32, 192 = 128 + 64, 112 = 64 + 32 + 16, 80 = 64 + 16: the padding is
    at most 15 ranks there, against 16/48/64/16/48 for a power of two. A remainder left after two
    pieces is rounded up to a power of two (240 = 128 + 64 + 64), so the total never exceeds the
    power-of-two padding.
    """
    p = max(16, -(-int(r) // 16) * 16)
    pieces: list[int] = []
    rem = p
    while rem > 0:
        if len(pieces) == 2:
            pieces.append(next_pow2(rem))
            break
        piece = 1 << (rem.bit_length() - 1)  # largest power of two <= rem (rem is a multiple of 16)
        pieces.append(piece)
        rem -= piece
    pieces += [0] * (3 - len(pieces))
    return (pieces[0], pieces[1], pieces[2])


def padded_rank(r: int) -> int:
    """What the fused chain computes for rank ``r``: ``sum(rank_pieces(r))``."""
    return sum(rank_pieces(r))


# Autotune spaces, each with a named *_INTERP member, the one config the interpreter runs; on a GPU
# deterministic runs launch the config picked per shape (:func:`chain_config`, :func:`gemm_config`;
# *_FIXED is the default of the large shapes).
CHAIN_INTERP = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2)
CHAIN_FIXED = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
CHAIN_SPACE = [
    CHAIN_INTERP,
    CHAIN_FIXED,
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4),
]

GEMM_INTERP = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)
GEMM_FIXED = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
GEMM_SPACE = [
    GEMM_INTERP,
    GEMM_FIXED,
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
    # skinny operands (decode: a handful of rows): small row tiles, long K steps, many programs
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
    # short reductions (weight gradients of a handful of rows): no padding of K to 128
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2),
]

#: the split-K reduce and the row-sum kernels: elementwise / streaming, one config each
REDUCE_INTERP = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4)
REDUCE_FIXED = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4)
REDUCE_SPACE = [REDUCE_INTERP, REDUCE_FIXED]
ROWSUM_INTERP = dict(BLOCK_M=16, BLOCK_K=16, num_warps=4)
ROWSUM_FIXED = dict(BLOCK_M=128, BLOCK_K=64, num_warps=4)
ROWSUM_SPACE = [ROWSUM_INTERP, ROWSUM_FIXED]

#: the single-launch decode kernel: one config each (its tiles are chosen per shape by
#: :func:`decode_tiles` and passed as constexprs)
DECODE_INTERP = dict(num_warps=4, num_stages=1)
DECODE_FIXED = dict(num_warps=8, num_stages=2)
DECODE_SPACE = [DECODE_INTERP, DECODE_FIXED]
#: the decode backward: 8 warps only (4 warps spill at R = 512 on sm_90: compile-check)
DECODE_BWD_SPACE = [DECODE_FIXED]


def _chain_fits(block_m: int, block_n: int, block_k: int, num_stages: int, r_pad: int) -> bool:
    """Whether a chain config fits: the fp32 intermediate ``BLOCK_M x R_PAD`` within 64 KiB of
    registers, and the pipelined operand tiles (``stages x (BLOCK_M + R_PAD) x BLOCK_K`` of stage 1
    plus ``R_PAD x BLOCK_N`` of stage 2, 2 bytes each) within the 160 KiB of shared memory that
    both A100 and H100 give a block (compile-check measures the real figure). ``R_PAD`` is the
    padded rank, ``R0 + R1 + R2``."""
    smem = 2 * (num_stages * (block_m + r_pad) * block_k + r_pad * block_n + block_m * r_pad)
    return block_m * r_pad <= 16384 and smem <= 160 * 1024


def chain_space(R0: int = 16, R1: int = 0, R2: int = 0, **_) -> list[dict]:
    """The configs of ``CHAIN_SPACE`` that fit for this padded rank (see ``_chain_fits``)."""
    r_pad = R0 + R1 + R2
    return [
        c for c in CHAIN_SPACE
        if _chain_fits(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c.get("num_stages", 2), r_pad)
    ]


def _prune_chain(configs_, named_args, **kwargs):
    get = lambda k: kwargs.get(k, named_args.get(k, 0)) or 0
    r_pad = get("R0") + get("R1") + get("R2")
    kept = [
        c for c in configs_
        if _chain_fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, r_pad)
    ]
    return kept or configs_[:1]


def chain_config(M: int, r_pad: int) -> dict:
    """The chain config a shape gets on a GPU in deterministic mode (and the one the cost model
    assumes): the smallest row tile that holds ``M`` rows up to 64 (fewer padded rows), then the
    first fitting config of the space."""
    fits = [c for c in chain_space(r_pad) if c is not CHAIN_SPACE[0]]  # [0]: the interpreter's
    for c in fits:
        if M <= 16 and c["BLOCK_M"] == 16 or 16 < M <= 32 and c["BLOCK_M"] == 32:
            return c
    return fits[0] if fits else CHAIN_SPACE[1]


def gemm_config(M: int, N: int, K: int, sms: int = 132) -> dict:
    """The GEMM config a shape ``(M, K)·(K, N)`` gets on a GPU in deterministic mode, and the one
    the split count and the cost model use: the config of the GPU space (with its split-K count,
    :func:`split_count`) of least predicted time (:func:`_gemm_launches`, bf16 operands); among
    those within 5 % of it, the one with the fewest launches (no split-K reduce), then issuing the
    fewest padded FLOPs, then moving the fewest L2 bytes. Skinny operands (a handful of rows) get ``BLOCK_M = 16`` tiles and as
    many programs as SMs; large ones the 128-wide wgmma tiles."""
    return dict(_gemm_config_cached(int(M), int(N), int(K), int(sms)))


@functools.lru_cache(maxsize=4096)
def _gemm_config_cached(M: int, N: int, K: int, sms: int) -> tuple:
    dev = dataclasses.replace(COST_DEVICE, sms=sms)
    scored = []
    for i, c in enumerate(GEMM_SPACE[1:]):
        ls = _gemm_launches("c", M, N, K, 2, 2, 2, False, dev, cfg=c)
        t = sum(l.seconds(dev) for l in ls)
        scored.append((t, len(ls), sum(l.flops_issued for l in ls), sum(l.l2_bytes for l in ls), i, c))
    best_t = min(x[0] for x in scored)
    # within 5 % of the best predicted time: fewest launches (a split adds its reduce), fewest
    # padded FLOPs, fewest L2 bytes, then the order of the space
    near = [x for x in scored if x[0] <= best_t * 1.05]
    return tuple(min(near, key=lambda x: x[1:5])[5].items())


#: a split of the reduction keeps at least this many BLOCK_K steps per program
MIN_K_STEPS = 1


def split_count(M: int, N: int, K: int, block_m: int, block_n: int, block_k: int, sms: int) -> int:
    """How many programs share each output tile's ``K`` reduction (deterministic split-K).

    1 when the tile grid alone gives ``sms`` programs; else ``S`` splits of ``p`` ``BLOCK_K``
    steps each with ``p = max(MIN_K_STEPS, steps // ceil(sms / tiles))`` and ``S = ceil(steps / p)``
    (every split non-empty), so ``tiles·S >= sms`` whenever ``K`` is long enough. Capped so the
    fp32 workspace ``S·M·N`` stays below 2³¹ elements (32-bit offsets) and 256 MiB.
    """
    tiles = -(-M // block_m) * -(-N // block_n)
    steps = -(-K // block_k)
    if tiles >= sms or steps < 2 * MIN_K_STEPS:
        return 1
    want = -(-sms // tiles)
    per = max(MIN_K_STEPS, steps // want)
    s = -(-steps // per)
    cap = max(1, min((1 << 31) - 1, 64 << 20) // max(1, M * N))
    return max(1, min(s, cap))


if HAS_TRITON:

    @triton.jit
    def _load_w1(w1_ptr, offs_r, kk, mask_k, R, stride_w1r, stride_w1k):
        # (BLOCK_K, RP) = w1[r-piece, k-tile]ᵀ
        return tl.load(
            w1_ptr + offs_r[None, :] * stride_w1r + kk[:, None] * stride_w1k,
            mask=(offs_r[None, :] < R) & mask_k[:, None], other=0.0,
        )

    @triton.jit
    def _load_w2(w2_ptr, offs_r, offs_n, mask_n, R, stride_w2n, stride_w2r):
        # (RP, BLOCK_N) = w2[n-tile, r-piece]ᵀ
        return tl.load(
            w2_ptr + offs_n[None, :] * stride_w2n + offs_r[:, None] * stride_w2r,
            mask=mask_n[None, :] & (offs_r[:, None] < R), other=0.0,
        )

    @triton.jit
    def _store_t(t_ptr, t, offs_m, mask_m, offs_r, R, stride_tm, stride_tr):
        tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                 t, mask=mask_m[:, None] & (offs_r[None, :] < R))

    @triton.jit
    def _act_fwd(h, ACT: tl.constexpr):
        # the activation of the rank-r intermediate (codes: ACTIVATIONS in kernels/lowrank_act.py)
        if ACT == 1:    # relu
            h = tl.maximum(h, 0.0)
        elif ACT == 2:  # gelu, tanh approximation: ½·h·(1 + tanh(√(2/π)·(h + 0.044715·h³)))
            th = 2.0 * tl.sigmoid(2.0 * (0.7978845608028654 * (h + 0.044715 * h * h * h))) - 1.0
            h = 0.5 * h * (1.0 + th)
        elif ACT == 3:  # silu: h·sigmoid(h)
            h = h * tl.sigmoid(h)
        elif ACT == 4:  # tanh
            h = 2.0 * tl.sigmoid(2.0 * h) - 1.0
        return h

    @triton.jit
    def _act_grad(h, ACT: tl.constexpr):
        # σ'(h) of _act_fwd, from the pre-activation h
        if ACT == 1:
            d = tl.where(h > 0.0, 1.0, 0.0).to(h.dtype)
        elif ACT == 2:
            z = 0.7978845608028654 * (h + 0.044715 * h * h * h)
            th = 2.0 * tl.sigmoid(2.0 * z) - 1.0
            d = 0.5 * (1.0 + th) + 0.5 * h * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
        elif ACT == 3:
            s = tl.sigmoid(h)
            d = s * (1.0 + h * (1.0 - s))
        elif ACT == 4:
            th = 2.0 * tl.sigmoid(2.0 * h) - 1.0
            d = 1.0 - th * th
        else:
            d = h * 0.0 + 1.0
        return d

    @triton.jit
    def _chain_mid(t, offs_r, R, offs_m, mask_m, cb_ptr, gate_ptr, stride_gm, stride_gr,
                   HAS_CB: tl.constexpr, GATE: tl.constexpr, ACT: tl.constexpr):
        # between the two products, on the fp32 accumulator of one rank piece:
        # forward h = t + c (intermediate bias); backward dh = dt ⊙ σ'(h) (h loaded from gate_ptr)
        if HAS_CB:
            t += tl.load(cb_ptr + offs_r, mask=offs_r < R, other=0.0).to(t.dtype)[None, :]
        if GATE:
            h = tl.load(gate_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                        mask=mask_m[:, None] & (offs_r[None, :] < R), other=0.0).to(t.dtype)
            t = t * _act_grad(h, ACT)
        return t

    @triton.jit
    def _chain_kernel(
        # --- pointers ---
        a_ptr,    # (M, K) left operand rows: x in forward, g = dL/dy in backward
        w1_ptr,   # (R, K) first factor, read as its transpose: V in forward, Uᵀ in backward
        w2_ptr,   # (N, R) second factor, read as its transpose: U in forward, Vᵀ in backward
        bias_ptr,  # (N,) bias added to the output; read only when HAS_BIAS
        z_ptr,    # (M, N) output: y in forward, dx in backward
        t_ptr,    # (M, R) intermediate a·w1ᵀ (fp32 when T_FP32); written only when STORE_T (pid_n == 0)
        cb_ptr,   # (R,) bias of the intermediate (forward of the nonlinear form); read only when HAS_CB
        gate_ptr,  # (M, R) saved pre-activation h; read only when GATE (backward: dh = dt ⊙ σ'(h))
        # --- dimensions ---
        M, K, N, R,
        M_BUCKET,  # power-of-two bucket of M: autotune key only
        # --- strides (in elements) ---
        stride_am, stride_ak,
        stride_w1r, stride_w1k,
        stride_w2n, stride_w2r,
        stride_zm, stride_zn,
        stride_tm, stride_tr,
        stride_gm, stride_gr,
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        STORE_T: tl.constexpr,
        T_FP32: tl.constexpr,      # keep the intermediate in fp32 (fp16 inputs: range safety)
        UPCAST: tl.constexpr,      # upcast dot operands to fp32 (interpreter)
        PRECISION: tl.constexpr,   # tl.dot input_precision for fp32 operands
        FP64: tl.constexpr,        # float64 operands and accumulator (interpreter tier: gradcheck)
        ACT: tl.constexpr,         # activation of the intermediate: 0 none, 1 relu, 2 gelu (tanh), 3 silu, 4 tanh
        HAS_CB: tl.constexpr,      # forward: add cb (R,) to the intermediate before rounding it
        GATE: tl.constexpr,        # backward: multiply the intermediate by σ'(gate) (ACT's derivative)
        R0: tl.constexpr,          # rank pieces (powers of two >= 16; R1, R2 may be 0 = absent):
        R1: tl.constexpr,          #   ranks [0, R0), [R0, R0+R1), [R0+R1, R0+R1+R2); their sum is
        R2: tl.constexpr,          #   the rank padded to a multiple of 16 (see rank_pieces)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        offs_r0 = tl.arange(0, R0)
        t0 = tl.zeros((BLOCK_M, R0), dtype=tl.float64 if FP64 else tl.float32)
        if R1 > 0:
            offs_r1 = R0 + tl.arange(0, R1)
            t1 = tl.zeros((BLOCK_M, R1), dtype=tl.float64 if FP64 else tl.float32)
        if R2 > 0:
            offs_r2 = R0 + R1 + tl.arange(0, R2)
            t2 = tl.zeros((BLOCK_M, R2), dtype=tl.float64 if FP64 else tl.float32)

        # ---- stage 1: t = a·w1ᵀ for this row block, fp32 in registers, one tile per rank piece ----
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < K
            a = tl.load(
                a_ptr + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0,
            )
            if UPCAST and not FP64:
                a = a.to(tl.float32)
            w = _load_w1(w1_ptr, offs_r0, kk, mask_k, R, stride_w1r, stride_w1k)
            if UPCAST and not FP64:
                w = w.to(tl.float32)
            t0 = tl.dot(a, w, t0, input_precision=PRECISION)
            if R1 > 0:
                w = _load_w1(w1_ptr, offs_r1, kk, mask_k, R, stride_w1r, stride_w1k)
                if UPCAST and not FP64:
                    w = w.to(tl.float32)
                t1 = tl.dot(a, w, t1, input_precision=PRECISION)
            if R2 > 0:
                w = _load_w1(w1_ptr, offs_r2, kk, mask_k, R, stride_w1r, stride_w1k)
                if UPCAST and not FP64:
                    w = w.to(tl.float32)
                t2 = tl.dot(a, w, t2, input_precision=PRECISION)

        if HAS_CB or GATE:
            t0 = _chain_mid(t0, offs_r0, R, offs_m, mask_m, cb_ptr, gate_ptr, stride_gm, stride_gr, HAS_CB, GATE, ACT)
            if R1 > 0:
                t1 = _chain_mid(t1, offs_r1, R, offs_m, mask_m, cb_ptr, gate_ptr, stride_gm, stride_gr,
                                HAS_CB, GATE, ACT)
            if R2 > 0:
                t2 = _chain_mid(t2, offs_r2, R, offs_m, mask_m, cb_ptr, gate_ptr, stride_gm, stride_gr,
                                HAS_CB, GATE, ACT)
        if not T_FP32:
            t0 = t0.to(z_ptr.dtype.element_ty)
            if R1 > 0:
                t1 = t1.to(z_ptr.dtype.element_ty)
            if R2 > 0:
                t2 = t2.to(z_ptr.dtype.element_ty)
        if STORE_T:
            if pid_n == 0:
                _store_t(t_ptr, t0, offs_m, mask_m, offs_r0, R, stride_tm, stride_tr)
                if R1 > 0:
                    _store_t(t_ptr, t1, offs_m, mask_m, offs_r1, R, stride_tm, stride_tr)
                if R2 > 0:
                    _store_t(t_ptr, t2, offs_m, mask_m, offs_r2, R, stride_tm, stride_tr)
        if ACT != 0 and not GATE:  # forward of the nonlinear form: t (stored above) is h, the product uses σ(h)
            t0 = _act_fwd(t0.to(tl.float64 if FP64 else tl.float32), ACT).to(t0.dtype)
            if R1 > 0:
                t1 = _act_fwd(t1.to(tl.float64 if FP64 else tl.float32), ACT).to(t1.dtype)
            if R2 > 0:
                t2 = _act_fwd(t2.to(tl.float64 if FP64 else tl.float32), ACT).to(t2.dtype)
        if UPCAST and not FP64:
            t0 = t0.to(tl.float32)
            if R1 > 0:
                t1 = t1.to(tl.float32)
            if R2 > 0:
                t2 = t2.to(tl.float32)

        # ---- stage 2: z[:, n-tile] = Σ_pieces t_p·w2[n-tile, piece]ᵀ (+ bias) ----
        # the N tiles are split evenly over grid dimension 1 (a split of 1 loops over all of N)
        tiles_per_prog = tl.cdiv(tl.cdiv(N, BLOCK_N), tl.num_programs(1))
        n_begin = pid_n * tiles_per_prog * BLOCK_N
        for i in range(0, tiles_per_prog):
            offs_n = n_begin + i * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            w = _load_w2(w2_ptr, offs_r0, offs_n, mask_n, R, stride_w2n, stride_w2r)
            if (UPCAST or T_FP32) and not FP64:
                w = w.to(tl.float32)
            z = tl.dot(t0, w, input_precision=PRECISION)
            if R1 > 0:
                w = _load_w2(w2_ptr, offs_r1, offs_n, mask_n, R, stride_w2n, stride_w2r)
                if (UPCAST or T_FP32) and not FP64:
                    w = w.to(tl.float32)
                z = tl.dot(t1, w, z, input_precision=PRECISION)
            if R2 > 0:
                w = _load_w2(w2_ptr, offs_r2, offs_n, mask_n, R, stride_w2n, stride_w2r)
                if (UPCAST or T_FP32) and not FP64:
                    w = w.to(tl.float32)
                z = tl.dot(t2, w, z, input_precision=PRECISION)
            if HAS_BIAS:
                b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(z.dtype)
                z = z + b[None, :]
            tl.store(
                z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn,
                z.to(z_ptr.dtype.element_ty),
                mask=mask_m[:, None] & mask_n[None, :],
            )

    @triton.jit
    def _gemm_kernel(
        # --- pointers ---
        a_ptr,       # (M, K) left operand (any strides)
        b_ptr,       # (K, N) right operand (any strides; a transpose is a stride swap)
        c_ptr,       # (M, N) output; written when not SPLIT
        bias_ptr,    # (N,) bias added to every row; read only when HAS_BIAS (and not SPLIT)
        ws_ptr,      # (S, M, N) contiguous fp32 (fp64 when FP64) partial products; written when SPLIT
        # --- dimensions ---
        M, N, K,
        # --- strides (in elements) ---
        stride_am, stride_ak,
        stride_bk, stride_bn,
        stride_cm, stride_cn,
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        SPLIT: tl.constexpr,       # split-K: grid dim 1 = S programs per tile, each a K range -> ws[s]
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        FP64: tl.constexpr,        # float64 operands and accumulator (interpreter tier: gradcheck)
        MIXED: tl.constexpr,       # a and b differ in dtype: both converted to fp32 (TF32 dot)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,   # row blocks grouped for L2 reuse of b
    ):
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_pid_n
        first_m = (pid // group) * GROUP_M
        group_m = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % group) % group_m)
        pid_n = (pid % group) // group_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N

        # this program's share of the reduction: all of K, or split s of S (whole BLOCK_K steps)
        k_lo = 0
        k_hi = K
        if SPLIT:
            pid_s = tl.program_id(1)
            per = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(1)) * BLOCK_K
            k_lo = pid_s * per
            k_hi = min(K, k_lo + per)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if FP64 else tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < k_hi
            a = tl.load(
                a_ptr + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0,
            )
            b = tl.load(
                b_ptr + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                mask=mask_k[:, None] & mask_n[None, :], other=0.0,
            )
            if (UPCAST or MIXED) and not FP64:  # MIXED: an fp32 intermediate against fp16 weights
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

        if SPLIT:
            tl.store(
                ws_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :],
                acc, mask=mask_m[:, None] & mask_n[None, :],
            )
        else:
            if HAS_BIAS:
                bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(acc.dtype)
                acc = acc + bias[None, :]
            tl.store(
                c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                acc.to(c_ptr.dtype.element_ty),
                mask=mask_m[:, None] & mask_n[None, :],
            )

    @triton.jit
    def _splitk_reduce_kernel(
        # --- pointers ---
        ws_ptr,    # (S, M, N) contiguous partials (fp32; fp64 when the operands are)
        bias_ptr,  # (N,) added once; read only when HAS_BIAS
        c_ptr,     # (M, N) output, any strides
        # --- dimensions ---
        S, M, N,
        # --- strides (in elements) ---
        stride_cm, stride_cn,
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # c = Σ_{s = 0..S-1} ws[s] (+ bias), summed in that fixed order: bitwise reproducible
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        acc = tl.load(ptrs, mask=mask, other=0.0)
        for s in range(1, S):
            acc += tl.load(ptrs + s * M * N, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(acc.dtype)[None, :]
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rowsum_kernel(
        # --- pointers ---
        a_ptr,     # (M, K) any strides
        ws_ptr,    # (S, M) contiguous partial row sums (fp32; fp64 when FP64)
        # --- dimensions ---
        M, K,
        # --- strides (in elements) ---
        stride_am, stride_ak,
        # --- meta-parameters ---
        FP64: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # ws[s, m] = Σ_{k in split s} a[m, k]: elementwise tile accumulation, one tree sum at the end
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        pid_s = tl.program_id(1)
        per = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(1)) * BLOCK_K
        k_lo = pid_s * per
        k_hi = min(K, k_lo + per)
        mask_m = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float64 if FP64 else tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                        mask=mask_m[:, None] & (kk[None, :] < k_hi), other=0.0)
            acc += a.to(acc.dtype)
        tl.store(ws_ptr + pid_s * M + offs_m, tl.sum(acc, axis=1), mask=mask_m)

    @triton.jit
    def _role_signal(cnt_ptr):
        """Publish this program's stores (made before the call) to the programs waiting on ``cnt_ptr``."""
        tl.debug_barrier()
        tl.atomic_add(cnt_ptr, 1, sem="release")

    @triton.jit
    def _role_wait(cnt_ptr, n):
        """Spin until ``n`` programs have signalled ``cnt_ptr``; their stores are then visible."""
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
        while seen < n:
            seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
        tl.debug_barrier()

    @triton.jit
    def _roles_done(cnt_ptr, programs):
        """The last of ``programs`` programs out resets the four counters for the next launch."""
        done = tl.atomic_add(cnt_ptr + 3, 1)
        if done == programs - 1:
            tl.atomic_xchg(cnt_ptr, 0)
            tl.atomic_xchg(cnt_ptr + 1, 0)
            tl.atomic_xchg(cnt_ptr + 2, 0)
            tl.atomic_xchg(cnt_ptr + 3, 0)

    @triton.jit
    def _decode_store_ws(ws_ptr, acc, p, M, R, offs_m, mask_m, offs_r):
        tl.store(ws_ptr + p * M * R + offs_m[:, None] * R + offs_r[None, :], acc,
                 mask=mask_m[:, None] & (offs_r[None, :] < R))

    @triton.jit
    def _decode_load_t(t_ptr, M, R, offs_m, mask_m, offs_r, CAST: tl.constexpr):
        tt = tl.load(t_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & (offs_r[None, :] < R),
                     other=0.0, cache_modifier=".cg")
        if CAST:
            tt = tt.to(tl.float32)
        return tt

    @triton.jit
    def _decode_kernel(
        # --- pointers ---
        x_ptr,     # (M, K) input rows (any strides); M <= 64 (decode)
        v_ptr,     # (R, K) first factor V
        u_ptr,     # (N, R) second factor U
        bias_ptr,  # (N,) read only when HAS_BIAS
        y_ptr,     # (M, N) output, any strides
        t_ptr,     # (M, R) contiguous intermediate t = x·Vᵀ (fp32 when T_FP32): written by the reducers
        ws_ptr,    # (N0, M, R) contiguous fp32 (fp64 when FP64) partial products of the producers
        cnt_ptr,   # (4,) int32 counters, zero between launches (the last program resets them); SYNC only
        # --- dimensions ---
        M, K, N, R,
        N0, N1, N2,  # programs per role: producers (K chunks), reducers (BLOCK_R columns of t), consumers (BLOCK_N rows of U)
        KC,          # K columns per producer (a multiple of BLOCK_K)
        # --- strides (in elements) ---
        stride_xm, stride_xk,
        stride_vr, stride_vk,
        stride_un, stride_ur,
        stride_ym, stride_yn,
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        SYNC: tl.constexpr,        # roles by ticket + waits on counters (GPU); else roles by program id,
                                   # the programs running in id order (the interpreter)
        T_FP32: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        FP64: tl.constexpr,
        R0: tl.constexpr,          # rank pieces (rank_pieces: the rank padded to a multiple of 16,
        R1: tl.constexpr,          #   as up to three power-of-two tiles; R1, R2 may be 0)
        R2: tl.constexpr,
        BLOCK_M: tl.constexpr,     # >= M: every row in one tile
        BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,     # columns of t per reducer
        BLOCK_N: tl.constexpr,     # rows of U per consumer
    ):
        # One launch, three roles, each factor read from memory once:
        #   producers  p < N0:      ws[p] = x[:, Kp]·V[:, Kp]ᵀ       (V's column chunk p, every rank)
        #   reducers   j < N1:      t[:, Rj] = Σ_{p = 0..N0-1} ws[p][:, Rj]   (fixed order: bitwise reproducible)
        #   consumers  c < N2:      y[:, Nc] = t·U[Nc, :]ᵀ (+ b)      (U's rows loaded before the wait)
        # A program takes its role from a ticket drawn when it starts, so it only ever waits for
        # programs that started before it (producers never wait, reducers wait for producers,
        # consumers for reducers): no deadlock whatever the residency. Counters only: no atomics
        # touch the data.
        if SYNC:
            ticket = tl.atomic_add(cnt_ptr, 1)
        else:
            ticket = tl.program_id(0)
        acc_ty = tl.float64 if FP64 else tl.float32
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_r0 = tl.arange(0, R0)
        offs_r1 = R0 + tl.arange(0, R1 if R1 > 0 else 16)
        offs_r2 = R0 + R1 + tl.arange(0, R2 if R2 > 0 else 16)
        if ticket < N0:
            # ---- producer: one chunk of K, every rank (x and V read once in total) ----
            k_lo = ticket * KC
            acc0 = tl.zeros((BLOCK_M, R0), dtype=acc_ty)
            if R1 > 0:
                acc1 = tl.zeros((BLOCK_M, R1), dtype=acc_ty)
            if R2 > 0:
                acc2 = tl.zeros((BLOCK_M, R2), dtype=acc_ty)
            for k0 in range(k_lo, k_lo + KC, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                mask_k = kk < K
                a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                if UPCAST and not FP64:
                    a = a.to(tl.float32)
                w = _load_w1(v_ptr, offs_r0, kk, mask_k, R, stride_vr, stride_vk)   # (BLOCK_K, R0) = V[r, kk]ᵀ
                if UPCAST and not FP64:
                    w = w.to(tl.float32)
                acc0 = tl.dot(a, w, acc0, input_precision=PRECISION)
                if R1 > 0:
                    w = _load_w1(v_ptr, offs_r1, kk, mask_k, R, stride_vr, stride_vk)
                    if UPCAST and not FP64:
                        w = w.to(tl.float32)
                    acc1 = tl.dot(a, w, acc1, input_precision=PRECISION)
                if R2 > 0:
                    w = _load_w1(v_ptr, offs_r2, kk, mask_k, R, stride_vr, stride_vk)
                    if UPCAST and not FP64:
                        w = w.to(tl.float32)
                    acc2 = tl.dot(a, w, acc2, input_precision=PRECISION)
            _decode_store_ws(ws_ptr, acc0, ticket, M, R, offs_m, mask_m, offs_r0)
            if R1 > 0:
                _decode_store_ws(ws_ptr, acc1, ticket, M, R, offs_m, mask_m, offs_r1)
            if R2 > 0:
                _decode_store_ws(ws_ptr, acc2, ticket, M, R, offs_m, mask_m, offs_r2)
            if SYNC:
                _role_signal(cnt_ptr + 1)
        elif ticket < N0 + N1:
            # ---- reducer: BLOCK_R columns of t, the N0 partials summed in the order p = 0, 1, ... ----
            j = ticket - N0
            if SYNC:
                _role_wait(cnt_ptr + 1, N0)
            offs_c = j * BLOCK_R + tl.arange(0, BLOCK_R)
            msk = mask_m[:, None] & (offs_c[None, :] < R)
            ptrs = ws_ptr + offs_m[:, None] * R + offs_c[None, :]
            s = tl.load(ptrs, mask=msk, other=0.0, cache_modifier=".cg")
            for p in range(1, N0):
                s += tl.load(ptrs + p * M * R, mask=msk, other=0.0, cache_modifier=".cg")
            tl.store(t_ptr + offs_m[:, None] * R + offs_c[None, :], s.to(t_ptr.dtype.element_ty), mask=msk)
            if SYNC:
                _role_signal(cnt_ptr + 2)
        else:
            # ---- consumer: BLOCK_N rows of U (loaded first: overlaps the producers), then t ----
            c = ticket - N0 - N1
            offs_n = c * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            CAST: tl.constexpr = (UPCAST or T_FP32) and not FP64
            w0 = _load_w2(u_ptr, offs_r0, offs_n, mask_n, R, stride_un, stride_ur)  # (R0, BLOCK_N) = U[n, r]ᵀ
            if CAST:
                w0 = w0.to(tl.float32)
            if R1 > 0:
                w1 = _load_w2(u_ptr, offs_r1, offs_n, mask_n, R, stride_un, stride_ur)
                if CAST:
                    w1 = w1.to(tl.float32)
            if R2 > 0:
                w2 = _load_w2(u_ptr, offs_r2, offs_n, mask_n, R, stride_un, stride_ur)
                if CAST:
                    w2 = w2.to(tl.float32)
            if SYNC:
                _role_wait(cnt_ptr + 2, N1)
            z = tl.dot(_decode_load_t(t_ptr, M, R, offs_m, mask_m, offs_r0, CAST), w0, input_precision=PRECISION)
            if R1 > 0:
                z = tl.dot(_decode_load_t(t_ptr, M, R, offs_m, mask_m, offs_r1, CAST), w1, z,
                           input_precision=PRECISION)
            if R2 > 0:
                z = tl.dot(_decode_load_t(t_ptr, M, R, offs_m, mask_m, offs_r2, CAST), w2, z,
                           input_precision=PRECISION)
            if HAS_BIAS:
                b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(z.dtype)
                z = z + b[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                     z.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
        if SYNC:
            # the last program out resets the counters for the next launch on this stream
            _roles_done(cnt_ptr, N0 + N1 + N2)

    @triton.jit
    def _dbwd_producer_piece(g, t_ptr, u_ptr, du_ptr, acc, offs_m, mask_m, offs_n, mask_n, offs_r, M, R,
                             stride_un, stride_ur, stride_dun, stride_dur,
                             NEED_U: tl.constexpr, CAST: tl.constexpr, PRECISION: tl.constexpr):
        # acc (BLOCK_M, RP) += g (BLOCK_M, BLOCK_N) · U[n-tile, piece];  dU[n-tile, piece] = gᵀ·t[:, piece]
        w = tl.load(u_ptr + offs_n[:, None] * stride_un + offs_r[None, :] * stride_ur,
                    mask=mask_n[:, None] & (offs_r[None, :] < R), other=0.0)        # (BLOCK_N, RP)
        if CAST:
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
        if NEED_U:
            tt = tl.load(t_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & (offs_r[None, :] < R),
                         other=0.0)
            if CAST:
                tt = tt.to(tl.float32)
            du = tl.dot(tl.trans(g), tt, input_precision=PRECISION)                   # (BLOCK_N, RP)
            tl.store(du_ptr + offs_n[:, None] * stride_dun + offs_r[None, :] * stride_dur,
                     du.to(du_ptr.dtype.element_ty), mask=mask_n[:, None] & (offs_r[None, :] < R))
        return acc

    @triton.jit
    def _dbwd_consumer_piece(dt_ptr, v, xt, dx, dv_ptr, offs_m, mask_m, offs_r, offs_k, mask_k, M, R,
                             stride_dvr, stride_dvk,
                             NEED_X: tl.constexpr, NEED_V: tl.constexpr, CAST: tl.constexpr,
                             PRECISION: tl.constexpr):
        # dx[:, k-tile] += dt[:, piece]·V[piece, k-tile];  dV[piece, k-tile] = dt[:, piece]ᵀ·x[:, k-tile]
        d = tl.load(dt_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & (offs_r[None, :] < R),
                    other=0.0, cache_modifier=".cg")
        if CAST:
            d = d.to(tl.float32)
        if NEED_X:
            dx = tl.dot(d, v, dx, input_precision=PRECISION)
        if NEED_V:
            dv = tl.dot(tl.trans(d), xt, input_precision=PRECISION)                   # (RP, BLOCK_K)
            tl.store(dv_ptr + offs_r[:, None] * stride_dvr + offs_k[None, :] * stride_dvk,
                     dv.to(dv_ptr.dtype.element_ty), mask=(offs_r[:, None] < R) & mask_k[None, :])
        return dx

    @triton.jit
    def _decode_bwd_kernel(
        # --- pointers ---
        g_ptr,     # (M, N) upstream gradient dL/dy, any strides; M <= 64
        x_ptr,     # (M, K) input
        u_ptr,     # (N, R) U
        v_ptr,     # (R, K) V
        t_ptr,     # (M, R) contiguous saved t = x·Vᵀ (intermediate dtype); read when NEED_U
        dx_ptr,    # (M, K) out: dx = dt·V             (NEED_X)
        du_ptr,    # (N, R) out: dU = gᵀ·t             (NEED_U)
        dv_ptr,    # (R, K) out: dV = dtᵀ·x            (NEED_V)
        db_ptr,    # (N,)   out: db = Σ_m g            (HAS_BIAS)
        dt_ptr,    # (M, R) contiguous dt = g·U (intermediate dtype): written by the reducers
        ws_ptr,    # (N0, M, R) contiguous fp32 partials of dt
        cnt_ptr,   # (4,) int32 counters (SYNC), as in _decode_kernel
        # --- dimensions ---
        M, K, N, R,
        N0, N1, N2,  # producers (N chunks of NC columns of g), reducers (BLOCK_R columns of dt), consumers (BLOCK_K columns of x)
        NC,
        # --- strides (in elements) ---
        stride_gm, stride_gn,
        stride_xm, stride_xk,
        stride_un, stride_ur,
        stride_vr, stride_vk,
        stride_dxm, stride_dxk,
        stride_dun, stride_dur,
        stride_dvr, stride_dvk,
        # --- meta-parameters ---
        NEED_X: tl.constexpr,
        NEED_U: tl.constexpr,
        NEED_V: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SYNC: tl.constexpr,
        T_FP32: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        FP64: tl.constexpr,
        R0: tl.constexpr,
        R1: tl.constexpr,
        R2: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        # The whole backward of a handful of rows in one launch, roles by ticket as in _decode_kernel:
        #   producers  p < N0:  N chunk p of g and U:  dU[Np, :] = g[:, Np]ᵀ·t,  db[Np] = Σ_m g[:, Np],
        #                       partial dt_p = g[:, Np]·U[Np, :]                  (U read once)
        #   reducers   j < N1:  dt[:, Rj] = Σ_{p = 0..N0-1} dt_p[:, Rj]         (fixed order)
        #   consumers  c < N2:  K tile c:  dx[:, Kc] = dt·V[:, Kc],  dV[:, Kc] = dtᵀ·x[:, Kc]
        #                       (V and x loaded before the wait: V read once)
        if SYNC:
            ticket = tl.atomic_add(cnt_ptr, 1)
        else:
            ticket = tl.program_id(0)
        CAST: tl.constexpr = (UPCAST or T_FP32) and not FP64
        acc_ty = tl.float64 if FP64 else tl.float32
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_r0 = tl.arange(0, R0)
        offs_r1 = R0 + tl.arange(0, R1 if R1 > 0 else 16)
        offs_r2 = R0 + R1 + tl.arange(0, R2 if R2 > 0 else 16)
        if ticket < N0:
            n_lo = ticket * NC
            acc0 = tl.zeros((BLOCK_M, R0), dtype=acc_ty)
            if R1 > 0:
                acc1 = tl.zeros((BLOCK_M, R1), dtype=acc_ty)
            if R2 > 0:
                acc2 = tl.zeros((BLOCK_M, R2), dtype=acc_ty)
            for n0 in range(n_lo, n_lo + NC, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < N
                g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                            mask=mask_m[:, None] & mask_n[None, :], other=0.0)
                if HAS_BIAS:
                    tl.store(db_ptr + offs_n, tl.sum(g.to(acc_ty), axis=0).to(db_ptr.dtype.element_ty), mask=mask_n)
                if CAST:
                    g = g.to(tl.float32)
                acc0 = _dbwd_producer_piece(g, t_ptr, u_ptr, du_ptr, acc0, offs_m, mask_m, offs_n, mask_n, offs_r0,
                                            M, R, stride_un, stride_ur, stride_dun, stride_dur,
                                            NEED_U, CAST, PRECISION)
                if R1 > 0:
                    acc1 = _dbwd_producer_piece(g, t_ptr, u_ptr, du_ptr, acc1, offs_m, mask_m, offs_n, mask_n,
                                                offs_r1, M, R, stride_un, stride_ur, stride_dun, stride_dur,
                                                NEED_U, CAST, PRECISION)
                if R2 > 0:
                    acc2 = _dbwd_producer_piece(g, t_ptr, u_ptr, du_ptr, acc2, offs_m, mask_m, offs_n, mask_n,
                                                offs_r2, M, R, stride_un, stride_ur, stride_dun, stride_dur,
                                                NEED_U, CAST, PRECISION)
            _decode_store_ws(ws_ptr, acc0, ticket, M, R, offs_m, mask_m, offs_r0)
            if R1 > 0:
                _decode_store_ws(ws_ptr, acc1, ticket, M, R, offs_m, mask_m, offs_r1)
            if R2 > 0:
                _decode_store_ws(ws_ptr, acc2, ticket, M, R, offs_m, mask_m, offs_r2)
            if SYNC:
                _role_signal(cnt_ptr + 1)
        elif ticket < N0 + N1:
            j = ticket - N0
            if SYNC:
                _role_wait(cnt_ptr + 1, N0)
            offs_c = j * BLOCK_R + tl.arange(0, BLOCK_R)
            msk = mask_m[:, None] & (offs_c[None, :] < R)
            ptrs = ws_ptr + offs_m[:, None] * R + offs_c[None, :]
            s = tl.load(ptrs, mask=msk, other=0.0, cache_modifier=".cg")
            for p in range(1, N0):
                s += tl.load(ptrs + p * M * R, mask=msk, other=0.0, cache_modifier=".cg")
            tl.store(dt_ptr + offs_m[:, None] * R + offs_c[None, :], s.to(dt_ptr.dtype.element_ty), mask=msk)
            if SYNC:
                _role_signal(cnt_ptr + 2)
        else:
            c = ticket - N0 - N1
            offs_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            # operands first (overlap the producers): V[piece, k-tile] (NEED_X), x[:, k-tile] (NEED_V)
            v0 = tl.load(v_ptr + offs_r0[:, None] * stride_vr + offs_k[None, :] * stride_vk,
                         mask=(offs_r0[:, None] < R) & mask_k[None, :] & NEED_X, other=0.0)
            if CAST:
                v0 = v0.to(tl.float32)
            if R1 > 0:
                v1 = tl.load(v_ptr + offs_r1[:, None] * stride_vr + offs_k[None, :] * stride_vk,
                             mask=(offs_r1[:, None] < R) & mask_k[None, :] & NEED_X, other=0.0)
                if CAST:
                    v1 = v1.to(tl.float32)
            if R2 > 0:
                v2 = tl.load(v_ptr + offs_r2[:, None] * stride_vr + offs_k[None, :] * stride_vk,
                             mask=(offs_r2[:, None] < R) & mask_k[None, :] & NEED_X, other=0.0)
                if CAST:
                    v2 = v2.to(tl.float32)
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=mask_m[:, None] & mask_k[None, :] & NEED_V, other=0.0)
            if CAST:
                xt = xt.to(tl.float32)
            if SYNC:
                _role_wait(cnt_ptr + 2, N1)
            dx = tl.zeros((BLOCK_M, BLOCK_K), dtype=acc_ty)
            dx = _dbwd_consumer_piece(dt_ptr, v0, xt, dx, dv_ptr, offs_m, mask_m, offs_r0, offs_k, mask_k, M, R,
                                      stride_dvr, stride_dvk, NEED_X, NEED_V, CAST, PRECISION)
            if R1 > 0:
                dx = _dbwd_consumer_piece(dt_ptr, v1, xt, dx, dv_ptr, offs_m, mask_m, offs_r1, offs_k, mask_k, M, R,
                                          stride_dvr, stride_dvk, NEED_X, NEED_V, CAST, PRECISION)
            if R2 > 0:
                dx = _dbwd_consumer_piece(dt_ptr, v2, xt, dx, dv_ptr, offs_m, mask_m, offs_r2, offs_k, mask_k, M, R,
                                          stride_dvr, stride_dvk, NEED_X, NEED_V, CAST, PRECISION)
            if NEED_X:
                tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                         dx.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])
        if SYNC:
            _roles_done(cnt_ptr, N0 + N1 + N2)

    def _pick_chain(named: dict) -> dict:
        r_pad = sum(int(named.get(k) or 0) for k in ("R0", "R1", "R2"))
        return chain_config(int(named.get("M_BUCKET") or named.get("M") or 1), r_pad)

    def _pick_gemm(named: dict) -> dict:
        a = named.get("a_ptr")
        sms = num_sms(a.device) if isinstance(a, torch.Tensor) else COST_DEVICE.sms
        return gemm_config(int(named.get("M") or 1), int(named.get("N") or 1), int(named.get("K") or 1), sms)

    _chain_tuned = Tunable(
        _chain_kernel, CHAIN_SPACE, key=["M_BUCKET", "K", "N", "R0", "R1", "R2", "STORE_T"],
        prune=_prune_chain, interpreter=CHAIN_INTERP, deterministic=CHAIN_FIXED, pick=_pick_chain,
    )
    def _prune_gemm(configs_, named_args, **kwargs):
        """Keep the configs whose launch fills the GPU as well as the space allows: with the split
        count ``S`` of the launch (the workspace's first dimension; 1 unsplit) a config of
        ``tiles·S`` programs stays when ``tiles·S >= min(SMs, best tiles·S of the space)``, so a
        long reduction is never handed to a few big tiles by the autotuner."""
        get = lambda k: kwargs.get(k, named_args.get(k))
        M, N = int(get("M") or 1), int(get("N") or 1)
        ws, a = get("ws_ptr"), get("a_ptr")
        s = int(ws.shape[0]) if isinstance(ws, torch.Tensor) and ws.dim() == 3 and get("SPLIT") else 1
        sms = num_sms(a.device) if isinstance(a, torch.Tensor) else COST_DEVICE.sms
        progs = lambda c: -(-M // c.kwargs["BLOCK_M"]) * -(-N // c.kwargs["BLOCK_N"]) * s
        want = min(sms, max(progs(c) for c in configs_))
        return [c for c in configs_ if progs(c) >= want] or configs_[:1]

    _gemm_tuned = Tunable(_gemm_kernel, GEMM_SPACE, key=["M", "N", "K", "SPLIT"], prune=_prune_gemm,
                          interpreter=GEMM_INTERP, deterministic=GEMM_FIXED, pick=_pick_gemm)
    _reduce_tuned = Tunable(_splitk_reduce_kernel, REDUCE_SPACE, key=["M", "N"],
                            interpreter=REDUCE_INTERP, deterministic=REDUCE_FIXED)
    _rowsum_tuned = Tunable(_rowsum_kernel, ROWSUM_SPACE, key=["M", "K"],
                            interpreter=ROWSUM_INTERP, deterministic=ROWSUM_FIXED)

    # ---- compile-tier registration (signatures derived from the kernels' arguments) ----
    register_kernel(KernelSpec(
        name="lowrank.chain",
        fn=_chain_kernel,
        constexprs=[
            dict(HAS_BIAS=True, STORE_T=True, T_FP32=False, UPCAST=False, PRECISION="tf32", FP64=False,
                 ACT=0, HAS_CB=False, GATE=False, R0=32, R1=16, R2=0),
            dict(HAS_BIAS=False, STORE_T=False, T_FP32=False, UPCAST=False, PRECISION="tf32", FP64=False,
                 ACT=0, HAS_CB=False, GATE=False, R0=128, R1=64, R2=0),
            dict(HAS_BIAS=False, STORE_T=True, T_FP32=True, UPCAST=False, PRECISION="tf32", FP64=False,
                 ACT=0, HAS_CB=False, GATE=False, R0=64, R1=32, R2=16),
            # the nonlinear bottleneck (kernels/lowrank_act.py): cb, σ and the σ'-gate all compiled in one
            # variant (gelu: the most instructions); one variant keeps make test's compile tier short
            dict(HAS_BIAS=True, STORE_T=True, T_FP32=False, UPCAST=False, PRECISION="tf32", FP64=False,
                 ACT=2, HAS_CB=True, GATE=True, R0=64, R1=32, R2=0),
        ],
        space=chain_space,
        unit_args=("stride_ak", "stride_w1k", "stride_w2r", "stride_zn", "stride_tr"),
    ))
    register_kernel(KernelSpec(
        name="lowrank.gemm",
        fn=_gemm_kernel,
        pointers={"ws_ptr": "fp32"},
        constexprs=[
            dict(HAS_BIAS=True, SPLIT=False, UPCAST=False, PRECISION="tf32", FP64=False, MIXED=False),
            dict(HAS_BIAS=False, SPLIT=True, UPCAST=False, PRECISION="tf32", FP64=False, MIXED=False),
        ],
        space=GEMM_SPACE,
        unit_args=("stride_ak", "stride_bk", "stride_cn"),
    ))
    _decode_tuned = Tunable(_decode_kernel, DECODE_SPACE, key=["N0", "N1", "N2", "R0", "R1", "R2", "BLOCK_M", "SYNC"],
                            interpreter=DECODE_INTERP, deterministic=DECODE_FIXED)
    register_kernel(KernelSpec(
        name="lowrank.decode",
        fn=_decode_kernel,
        pointers={"ws_ptr": "fp32", "cnt_ptr": "i32"},
        constexprs=[
            # d = 4096, ratio 0.25 (R = 512) at M <= 16, as on a GPU (SYNC); rank 448 = 256 + 128 + 64
            dict(HAS_BIAS=True, SYNC=True, T_FP32=False, UPCAST=False, PRECISION="tf32", FP64=False,
                 R0=512, R1=0, R2=0, BLOCK_M=16, BLOCK_K=32, BLOCK_R=16, BLOCK_N=32),
            dict(HAS_BIAS=False, SYNC=True, T_FP32=False, UPCAST=False, PRECISION="tf32", FP64=False,
                 R0=256, R1=128, R2=64, BLOCK_M=16, BLOCK_K=32, BLOCK_R=16, BLOCK_N=32),
            # fp16 (an fp32 intermediate, TF32 second product), 64 rows, rank 112 = 64 + 32 + 16
            dict(HAS_BIAS=True, SYNC=True, T_FP32=True, UPCAST=False, PRECISION="tf32", FP64=False,
                 R0=64, R1=32, R2=16, BLOCK_M=64, BLOCK_K=128, BLOCK_R=16, BLOCK_N=64),
            # d = 768, ratio 0.5 (R = 192 = 128 + 64) at 16 rows: the planner's narrow consumers
            dict(HAS_BIAS=True, SYNC=True, T_FP32=False, UPCAST=False, PRECISION="tf32", FP64=False,
                 R0=128, R1=64, R2=0, BLOCK_M=16, BLOCK_K=64, BLOCK_R=16, BLOCK_N=16),
        ],
        space=DECODE_SPACE,
        unit_args=("stride_xk", "stride_vk", "stride_ur", "stride_yn"),
    ))
    _decode_bwd_tuned = Tunable(_decode_bwd_kernel, DECODE_BWD_SPACE,
                                key=["N0", "N1", "N2", "R0", "R1", "R2", "BLOCK_M", "SYNC"],
                                interpreter=DECODE_FIXED, deterministic=DECODE_FIXED)
    register_kernel(KernelSpec(
        name="lowrank.decode_bwd",
        fn=_decode_bwd_kernel,
        pointers={"ws_ptr": "fp32", "cnt_ptr": "i32"},
        constexprs=[
            # d = 4096, ratio 0.25 (R = 512), M <= 16, training (every gradient), as on a GPU (SYNC)
            dict(NEED_X=True, NEED_U=True, NEED_V=True, HAS_BIAS=True, SYNC=True, T_FP32=False, UPCAST=False,
                 PRECISION="tf32", FP64=False, R0=512, R1=0, R2=0, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16,
                 BLOCK_R=16),
            # fp16 (fp32 intermediates), 64 rows, rank 112 = 64 + 32 + 16, no bias, no dx
            dict(NEED_X=False, NEED_U=True, NEED_V=True, HAS_BIAS=False, SYNC=True, T_FP32=True, UPCAST=False,
                 PRECISION="tf32", FP64=False, R0=64, R1=32, R2=16, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64,
                 BLOCK_R=16),
        ],
        space=DECODE_BWD_SPACE,
        unit_args=("stride_gn", "stride_xk", "stride_ur", "stride_vk", "stride_dxk", "stride_dur", "stride_dvk"),
    ))
    register_kernel(KernelSpec(
        name="lowrank.splitk_reduce",
        fn=_splitk_reduce_kernel,
        pointers={"ws_ptr": "fp32"},
        constexprs=[dict(HAS_BIAS=True), dict(HAS_BIAS=False)],
        space=REDUCE_SPACE,
        unit_args=("stride_cn",),
    ))
    register_kernel(KernelSpec(
        name="lowrank.rowsum",
        fn=_rowsum_kernel,
        pointers={"ws_ptr": "fp32"},
        constexprs=[dict(FP64=False)],
        space=ROWSUM_SPACE,
        unit_args=("stride_am",),
    ))


# ============================================================================================
# Cost model and path choice
# ============================================================================================

#: the device figures the dispatcher predicts with: ``fastfactor sol``'s own (``kernels/_cost.py``),
#: with the real device's SM count substituted at dispatch
COST_DEVICE = _cost.DEFAULT
#: deprecated alias (the figures moved to ``kernels/_cost.py``, shared with ``fastfactor sol``)
CostDevice = _cost.Device

_TT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp32"}


@dataclasses.dataclass
class Launch:
    """One launch of a path as the cost model sees it (analytic counts from the shapes, the same
    quantities ``fastfactor sol`` counts under the interpreter)."""

    name: str
    programs: int
    dram_bytes: float     # DRAM bytes under the L2 model (re-reads of a tensor fitting in half the L2 are free)
    l2_bytes: float       # every byte requested by the launch's loads and stores
    flops_issued: float   # tensor-core FLOPs including the padding of tiles
    flops_useful: float
    hgmma: bool = False   # wgmma tiles (BLOCK_M >= 64, warps a multiple of 4), else mma.sync
    library: bool = False  # a cuBLAS op: modelled as ideal (bytes moved once, full rate)
    dtype: str = "bf16"

    def seconds(self, dev: _cost.Device = COST_DEVICE) -> float:
        """Predicted seconds, launch floor included (``kernels/_cost.py``)."""
        if self.library:
            return _cost.library_seconds(self.dram_bytes, self.flops_issued, dev, self.dtype)["seconds"]
        return _cost.kernel_seconds(self.dram_bytes, self.l2_bytes, self.flops_issued, self.programs, dev,
                                    self.hgmma, self.dtype)["seconds"]


def _cd(a: int, b: int) -> int:
    return -(-a // b)


def _dram(load: float, size: float, dev: _cost.Device, store: float = 0.0) -> float:
    """DRAM bytes of one tensor: its unique bytes once when it fits in half the L2, else every byte."""
    return _cost.dram_bytes(load, min(load, size), size, store, dev)


def _hgmma(cfg: dict) -> bool:
    return cfg["BLOCK_M"] >= 64 and cfg.get("num_warps", 4) % 4 == 0


def _reduce_launch(name, S, M, N, ec, bias, dev) -> Launch:
    """The fixed-order split-K reduce of an ``(S, M, N)`` fp32 workspace (its best config)."""
    ws = S * M * N * 4
    out = M * N * ec
    best = None
    for c in REDUCE_SPACE:
        progs = _cd(M, c["BLOCK_M"]) * _cd(N, c["BLOCK_N"])
        bl = N * ec * _cd(M, c["BLOCK_M"]) if bias else 0
        l = Launch(name + ".reduce", progs, _dram(ws, ws, dev) + out + _dram(bl, N * ec, dev),
                   ws + out + bl, 0.0, 0.0)
        if best is None or l.seconds(dev) < best.seconds(dev):
            best = l
    return best


def _gemm_launches(name, M, N, K, ea, eb, ec, bias, dev, cublas=False, cfg=None, dtype="bf16",
                   splits=None) -> list:
    """Launches of ``C (M, N) = A (M, K)·B (K, N) (+ bias)``.

    Ours (config ``cfg``, default :func:`gemm_config`): every ``N`` tile re-reads its rows of ``A``,
    every ``M`` tile its columns of ``B`` (DRAM once when the operand fits in half the L2, else every
    byte), FLOPs issued on padded tiles; split-K (:func:`split_count`) when the tile grid underfills:
    fp32 partials ``S·M·N·4`` stored, then the reduce launch. ``cublas``: one library op at the
    roofline (``A``, ``B``, ``C`` moved once)."""
    useful = 2.0 * M * N * K
    if cublas:
        nbytes = M * K * ea + K * N * eb + M * N * ec + (N * ec if bias else 0)
        return [Launch(name, 0, nbytes, nbytes, useful, useful, library=True, dtype=dtype)]
    c = cfg or gemm_config(M, N, K, dev.sms)
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    s = splits or split_count(M, N, K, bm, bn, bk, dev.sms)
    mt, nt = _cd(M, bm), _cd(N, bn)
    a_size, b_size = M * K * ea, K * N * eb
    a_load, b_load = a_size * nt, b_size * mt
    issued = 2.0 * mt * bm * nt * bn * _cd(K, bk) * bk
    ops = _dram(a_load, a_size, dev) + _dram(b_load, b_size, dev)
    if s == 1:
        out = M * N * ec
        bl = N * ec * mt if bias else 0
        return [Launch(name, mt * nt, ops + out + _dram(bl, N * ec, dev), a_load + b_load + out + bl,
                       issued, useful, _hgmma(c), dtype=dtype)]
    ws = s * M * N * 4
    return [Launch(name + ".splitk", mt * nt * s, ops + ws, a_load + b_load + ws, issued, useful, _hgmma(c),
                   dtype=dtype),
            _reduce_launch(name, s, M, N, ec, bias, dev)]


def _chain_launch(name, M, K, N, R, e, te, bias, save_t, dev, dtype="bf16") -> Launch:
    """The fused chain ``z = (a·w1ᵀ)·w2ᵀ`` (``a (M, K)``, ``w1 (R, K)``, ``w2 (N, R)``) at its best
    fitting config: every program streams all of ``w1`` (``P·R·K·e`` requested), each row block all
    of ``w2``; ``a`` is read once per ``N`` split; ``t`` stored once when ``save_t``."""
    rp = padded_rank(R)
    best = None
    for c in chain_space(rp):
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        mb, nt = _cd(M, bm), _cd(N, bn)
        split = max(1, min(nt, (2 * dev.sms) // mb))
        split = _cd(nt, _cd(nt, split))
        tpp = _cd(nt, split)
        P = mb * split
        a_size, w1_size, w2_size = M * K * e, R * K * e, N * R * e
        a_load, w1_load, w2_load = a_size * split, w1_size * P, w2_size * mb
        z, t = M * N * e, (M * R * te if save_t else 0)
        bl = N * e * mb if bias else 0
        dram = (_dram(a_load, a_size, dev) + _dram(w1_load, w1_size, dev) + _dram(w2_load, w2_size, dev)
                + z + t + _dram(bl, N * e, dev))
        issued = 2.0 * bm * rp * (_cd(K, bk) * bk + tpp * bn) * P
        l = Launch(name, P, dram, a_load + w1_load + w2_load + z + t + bl, issued, 2.0 * M * R * (K + N),
                   _hgmma(c), dtype=dtype)
        if best is None or l.seconds(dev) < best.seconds(dev):
            best = l
    return best


def _decode_launch(name, M, K, N, R, e, te, bias, dev, dtype="bf16") -> Optional[Launch]:
    """The single-launch decode kernel (:func:`decode`) at its planned tiles (:func:`decode_tiles`)."""
    tl_ = decode_tiles(M, K, N, R)
    return None if tl_ is None else _decode_launch_of(tl_, M, K, N, R, e, te, bias, dev, dtype, name)


def _decode_launch_of(tl_: dict, M, K, N, R, e, te, bias, dev, dtype="bf16", name="decode") -> Launch:
    """The decode kernel with tiles ``tl_``: ``x``, ``V``, ``U`` read once; the fp32 partials
    ``N0·M·R·4`` stored and read once; ``t`` stored once and read by every consumer."""
    x_b, v_b, u_b = M * K * e, R * K * e, N * R * e
    ws, t, y = tl_["N0"] * M * R * 4, M * R * te, M * N * e
    t_reads = t * tl_["N2"]
    bl = N * e if bias else 0
    dram = x_b + v_b + u_b + ws + _dram(ws, ws, dev) + t + _dram(t_reads, t, dev) + y + bl
    l2 = x_b + v_b + u_b + 2 * ws + t + t_reads + y + bl
    bm, rp = tl_["BLOCK_M"], tl_["R_PAD"]
    issued = 2.0 * bm * rp * (tl_["N0"] * tl_["KC"] + tl_["BLOCK_N"] * tl_["N2"])
    return Launch(name, tl_["N0"] + tl_["N1"] + tl_["N2"], dram, l2, issued, 2.0 * M * R * (K + N),
                  bm >= 64, dtype=dtype)


def _decode_bwd_launch(name, M, K, N, R, e, te, bias, need_x, need_u, need_v, dev, dtype="bf16") -> Launch:
    """The one-launch decode backward (:func:`decode_bwd`): ``g``, ``U`` read once by the producers
    (``t`` re-read per ``N`` step from L2 when ``dU`` is asked for), the fp32 partials of ``dt``
    stored and read once, ``dt`` read by every consumer, ``V`` / ``x`` read once; ``dU``, ``dV``,
    ``dx``, ``db`` written once."""
    tl_ = decode_bwd_tiles(M, K, N, R)
    steps = tl_["N0"] * tl_["NC"] // tl_["BLOCK_N"]
    g, u, v, x = M * N * e, N * R * e, R * K * e, M * K * e
    t, dt, ws = M * R * te, M * R * te, tl_["N0"] * M * R * 4
    t_reads = t * steps if need_u else 0
    dt_reads = dt * tl_["N2"]
    v_l, x_l = (v if need_x else 0), (x if need_v else 0)
    outs = (x if need_x else 0) + (u if need_u else 0) + (v if need_v else 0) + (N * e if bias else 0)
    dram = g + u + _dram(t_reads, t, dev) + 2 * ws + dt + _dram(dt_reads, dt, dev) + v_l + x_l + outs
    l2 = g + u + t_reads + 2 * ws + dt + dt_reads + v_l + x_l + outs
    bm, rp, bn, bk = tl_["BLOCK_M"], tl_["R_PAD"], tl_["BLOCK_N"], tl_["BLOCK_K"]
    issued = 2.0 * bm * rp * bn * steps * (2 if need_u else 1) \
        + 2.0 * bm * rp * bk * tl_["N2"] * (int(need_x) + int(need_v))
    useful = 2.0 * M * R * (N * (1 + int(need_u)) + K * (int(need_x) + int(need_v)))
    return Launch(name, tl_["N0"] + tl_["N1"] + tl_["N2"], dram, l2, issued, useful, bm >= 64, dtype=dtype)


def _rowsum_launches(name, M, N, e, dev) -> list:
    """``db = Σ_m g`` of ``g (M, N)``: a library ``sum`` (cuBLAS path) is one op of ``M·N·e`` bytes;
    ours is :func:`row_sums` of ``gᵀ`` (split over ``M`` until the launch fills, then the reduce)."""
    c = ROWSUM_FIXED
    s = split_count(N, 1, M, c["BLOCK_M"], 1, c["BLOCK_K"], dev.sms)
    g = M * N * e
    main = Launch(name, _cd(N, c["BLOCK_M"]) * s, _dram(g, g, dev) + s * N * 4, g + s * N * 4, 0.0, 0.0)
    return [main] + ([_reduce_launch(name, s, 1, N, e, False, dev)] if s > 1 else [])


def plan(M: int, K: int, N: int, R: int, path: str, elem: int = 2, save_t: bool = False,
         dev: _cost.Device = COST_DEVICE, bias: bool = True, dtype: str = "bf16") -> list:
    """The launches of a forward ``y (M, N) = (x (M, K)·Vᵀ)·Uᵀ (+ b)`` on ``path``, each with its
    programs, DRAM/L2 bytes and FLOPs (:class:`Launch`); ``elem`` bytes per element of x, U, V, y."""
    te = 4 if elem == 2 and dtype == "fp16" else elem
    if path == "decode" and decode_tiles(M, K, N, R) is not None:
        return [_decode_launch("decode", M, K, N, R, elem, te, bias, dev, dtype)]
    if path == "fused":
        return [_chain_launch("chain", M, K, N, R, elem, te, bias, save_t, dev, dtype)]
    cublas = path == "torch"
    return (_gemm_launches("x·Vᵀ", M, R, K, elem, elem, te, False, dev, cublas, dtype=dtype)
            + _gemm_launches("t·Uᵀ", M, N, R, te, elem, elem, bias, dev, cublas, dtype=dtype))


def plan_bwd(M: int, K: int, N: int, R: int, path: str, elem: int = 2, has_bias: bool = True,
             need_x: bool = True, need_u: bool = True, need_v: bool = True,
             dev: _cost.Device = COST_DEVICE, dtype: str = "bf16") -> list:
    """The launches of the backward (``t`` saved by the forward) on ``path``: ``dt = g·U``,
    ``dx = dt·V`` (one chain launch on ``'fused'``), ``dU = gᵀ·t``, ``db = Σ_m g``, ``dV = dtᵀ·x``."""
    te = 4 if dtype == "fp16" else elem
    if path == "decode" and (need_x or need_v) and decode_bwd_tiles(M, K, N, R) is not None:
        return [_decode_bwd_launch("decode_bwd", M, K, N, R, elem, te, has_bias, need_x, need_u, need_v, dev,
                                   dtype)]
    cub = path == "torch"
    out: list = []
    if need_x and path == "fused":
        out.append(_chain_launch("dx", M, N, K, R, elem, te, False, need_v, dev, dtype))
    elif need_x or need_v:
        out += _gemm_launches("dt", M, R, N, elem, elem, te, False, dev, cub, dtype=dtype)
        if need_x:
            out += _gemm_launches("dx", M, K, R, te, elem, elem, False, dev, cub, dtype=dtype)
    if need_u:
        out += _gemm_launches("dU", N, R, M, elem, te, elem, False, dev, cub, dtype=dtype)
    if has_bias:
        if cub:
            nbytes = M * N * elem + N * elem
            out.append(Launch("db", 0, nbytes, nbytes, 0.0, 0.0, library=True, dtype=dtype))
        else:
            out += _rowsum_launches("db", M, N, elem, dev)
    if need_v:
        out += _gemm_launches("dV", R, K, M, te, elem, elem, False, dev, cub, dtype=dtype)
    return out


def predicted_seconds(M: int, K: int, N: int, R: int, path: str, elem: int = 2,
                      dev: _cost.Device = COST_DEVICE, **kw) -> float:
    """Predicted forward seconds of ``path``: the sum over its launches, each with its launch floor."""
    return sum(l.seconds(dev) for l in plan(M, K, N, R, path, elem, dev=dev, **kw))


PATHS = ("fused", "two_gemm", "torch", "decode")


def _forced(R: int, M: int = 1, K: int = 1, N: int = 1, direction: str = "fwd") -> Optional[str]:
    forced = os.environ.get("FASTFACTOR_LOWRANK_PATH")
    if not forced:
        return None
    if forced not in PATHS:
        raise ValueError(f"FASTFACTOR_LOWRANK_PATH: expected one of {', '.join(PATHS)}, got {forced!r}")
    if forced == "fused" and padded_rank(R) > FUSED_MAX_R:
        return "two_gemm"
    tiles = decode_tiles if direction == "fwd" else decode_bwd_tiles
    if forced == "decode" and tiles(M, K, N, R) is None:
        return "two_gemm"   # a handful of rows only
    return forced


def chain_recomputes(M: int, N: int, R: int, sms: int = COST_DEVICE.sms) -> bool:
    """Whether the chain kernel at its deterministic config splits the ``N`` tiles of a row block
    over several programs (too few row blocks to fill the GPU), each recomputing the block's
    intermediate: ``V`` read once per program and the first product's FLOPs issued once per split.
    The dispatcher never chooses such a launch (the re-read and issued-FLOP budgets of the perf
    tier forbid it); ``FASTFACTOR_LOWRANK_PATH=fused`` still runs it."""
    c = chain_config(M, padded_rank(R))
    mb, nt = _cd(M, c["BLOCK_M"]), _cd(N, c["BLOCK_N"])
    return min(nt, (2 * sms) // mb) > 1


def _candidates(R: int, dtype: Optional[torch.dtype], M: int = 0, N: int = 0, sms: int = COST_DEVICE.sms,
                K: int = 0) -> list:
    fused = padded_rank(R) <= FUSED_MAX_R and not chain_recomputes(M, N, R, sms)
    cands = ["two_gemm"] + (["fused"] if fused else [])
    if K and decode_tiles(M, K, N, R) is not None:
        cands.append("decode")
    if dtype != torch.float16:
        cands.append("torch")
    return cands


#: a kernel of ours is chosen over the cuBLAS path only when predicted at least this much faster
#: (``t_ours <= MARGIN·t_cublas``): the analytic counts of :func:`plan` and the interpreter's of
#: ``fastfactor sol`` agree to a few per cent (tests/lowrank/test_dispatch.py), not exactly
MARGIN = 0.95


def _pick(cost: dict) -> str:
    ours = {p: c for p, c in cost.items() if p != "torch"}
    best = min(ours, key=ours.get)
    if "torch" in cost and not ours[best] <= MARGIN * cost["torch"]:
        return "torch"
    return best


def _device_for(sms: Optional[int]) -> _cost.Device:
    return COST_DEVICE if not sms or sms == COST_DEVICE.sms else dataclasses.replace(COST_DEVICE, sms=int(sms))


def path_costs(M: int, K: int, N: int, R: int, dtype: Optional[torch.dtype] = None, bias: bool = True,
               direction: str = "fwd", sms: Optional[int] = None, decode: bool = True, **need) -> dict:
    """Predicted seconds of every candidate path (``direction`` ``'fwd'`` or ``'bwd'``);
    ``decode=False`` leaves the decode kernels out (a caller without a decode launcher: the
    nonlinear bottleneck of ``kernels/lowrank_act.py``)."""
    dev = _device_for(sms)
    elem = 4 if dtype == torch.float32 else 2
    dt = _TT.get(dtype, "bf16")
    out = {}
    cands = _candidates(R, dtype, M, N if direction == "fwd" else K, dev.sms, K if direction == "fwd" else 0)
    if direction != "fwd" and need.pop("t_saved", True) and (need.get("need_x", True) or need.get("need_v", True)) \
            and decode_bwd_tiles(M, K, N, R) is not None:
        cands.append("decode")
    if not decode:
        cands = [p for p in cands if p != "decode"]
    for p in cands:
        ls = (plan(M, K, N, R, p, elem, dev=dev, bias=bias, dtype=dt) if direction == "fwd"
              else plan_bwd(M, K, N, R, p, elem, bias, dev=dev, dtype=dt, **need))
        out[p] = sum(l.seconds(dev) for l in ls)
    return out


def choose_path(M: int, K: int, N: int, R: int, dtype: Optional[torch.dtype] = None,
                bias: bool = True, sms: Optional[int] = None, decode: bool = True) -> str:
    """The forward path for ``x (M, K)``, ``V (R, K)``, ``U (N, R)``, chosen by predicted cost.

    Paths: ``'decode'`` (one launch, producers / reducers / consumers, ``M <= 64``: see
    :func:`decode`), ``'fused'`` (chain kernel, ``t`` in registers; needs ``padded_rank(R) <= 256``),
    ``'two_gemm'`` (our Triton GEMMs, ``t`` through memory, split-K with a fixed-order reduce when
    the tile grid gives fewer programs than SMs), ``'torch'`` (two cuBLAS products,
    ``torch.mm`` / ``torch.addmm``).

    Cost model: ``fastfactor sol``'s own (``kernels/_cost.py``: the same device figures and terms),
    applied to the launches of each path counted from the shapes (:func:`plan`): per launch of ours
    ``max(DRAM / HBM, L2 bytes / (L2 bandwidth·f), issued FLOPs / (rate·f)) + launch floor``
    with ``f`` the busy fraction after wave quantization, re-reads of an operand that fits in half
    the L2 costing L2 bandwidth only, HMMA tiles (``BLOCK_M < 64``) at 0.6 of the wgmma rate;
    cuBLAS products ideal (operands moved once, full rate) plus the launch floor. A kernel of ours
    is chosen only where it is predicted strictly faster than the cuBLAS path (never slower than
    the obvious alternative); ties go to cuBLAS. Since the model gives cuBLAS the roofline, our
    split GEMMs (more launches, the same bytes) never win it; the decode kernel wins at a handful
    of rows (one launch instead of two, each factor read once: d = 768-4096 at M <= 16-64), the
    fused chain where the saved round trip of ``t`` and the saved launch outweigh the re-reads of
    ``V`` from L2 (few columns, many rows: d = 768 at M = 16384). fp16 never takes ``'torch'``: its intermediate is fp32 (range)
    and cuBLAS has no fp32 x fp16 product. ``sms``: the device's SM count (default the model's 132).

    ``FASTFACTOR_LOWRANK_PATH=fused|two_gemm|torch|decode`` forces a path (``fused`` and
    ``decode`` fall back to ``two_gemm`` where they do not apply; the backward of ``decode`` is
    ``two_gemm``).
    """
    forced = _forced(R, M, K, N, "fwd")
    if forced:
        return forced
    if min(M, K, N, R) <= 0:
        return "two_gemm"  # nothing to choose: the launchers handle empty products without a kernel
    return _pick(path_costs(M, K, N, R, dtype, bias, "fwd", sms, decode=decode))


def choose_bwd_path(M: int, K: int, N: int, R: int, dtype: Optional[torch.dtype] = None,
                    has_bias: bool = True, need_x: bool = True, need_u: bool = True, need_v: bool = True,
                    sms: Optional[int] = None, t_saved: bool = True, decode: bool = True) -> str:
    """The backward path for the same shapes as :func:`choose_path` (``x (M, K)``, ``U (N, R)``),
    by the same cost model applied to the backward's launches (:func:`plan_bwd`); ``'decode'``
    (:func:`decode_bwd`, one launch) needs the forward's saved ``t``."""
    forced = _forced(R, M, K, N, "bwd")
    if forced:
        return forced
    if min(M, K, N, R) <= 0:
        return "two_gemm"
    return _pick(path_costs(M, K, N, R, dtype, has_bias, "bwd", sms,
                            need_x=need_x, need_u=need_u, need_v=need_v, t_saved=t_saved, decode=decode))


# ============================================================================================
# Launchers
# ============================================================================================

def row_sums(a: torch.Tensor, splits: Optional[int] = None) -> torch.Tensor:
    """``a (M, K) -> Σ_k a[:, k]`` in fp32 (fp64 for fp64), any strides: the bias gradient
    ``db = Σ_m g`` as ``row_sums(g.t())``. Deterministic: ``S`` programs per row block each sum a
    fixed range of ``K`` (``S`` chosen so the launch fills the GPU), then a fixed-order reduce."""
    M, K = a.shape
    acc = acc_dtype(a.dtype)
    if M == 0 or K == 0:
        return torch.zeros((M,), device=a.device, dtype=acc)
    sms = num_sms(a.device)
    cfg = ROWSUM_INTERP if is_interpreter() else ROWSUM_FIXED
    s = splits or split_count(M, 1, K, cfg["BLOCK_M"], 1, cfg["BLOCK_K"], sms)
    ws = torch.empty((s, M), device=a.device, dtype=acc)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), s)
    _rowsum_tuned[grid](a, ws, M, K, a.stride(0), a.stride(1), FP64=acc == torch.float64)
    if s == 1:
        return ws[0]
    out = torch.empty((M,), device=a.device, dtype=acc)
    _reduce(ws.view(s, 1, M), None, out.view(1, M))
    return out


def _reduce(ws: torch.Tensor, bias: Optional[torch.Tensor], c: torch.Tensor) -> None:
    """``c = Σ_s ws[s] (+ bias)`` in the fixed order s = 0, 1, ..."""
    S, M, N = ws.shape
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
    _reduce_tuned[grid](ws, bias if bias is not None else c, c, S, M, N, c.stride(0), c.stride(1),
                        HAS_BIAS=bias is not None)


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    rowsum: bool = False,
    splits: Optional[int] = None,
):
    """``a (M, K) · b (K, N) (+ bias)`` with the Triton GEMM; any strides.

    When the output tiles alone give fewer programs than SMs, the ``K`` reduction is split over
    ``S`` programs per tile (:func:`split_count`; ``splits`` forces it): each writes an fp32
    partial to a workspace ``(S, M, N)``, and a second launch sums them in the order s = 0, 1, ...
    (no atomics: bitwise reproducible), adds the bias and rounds once.

    Returns ``c`` or, with ``rowsum=True``, ``(c, a.sum(1) in fp32, fp64 for fp64 inputs)`` (its
    own reduction, :func:`row_sums`, not a term of the GEMM's main loop).
    """
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=out_dtype or a.dtype)
    if M > 0 and N > 0:
        if K == 0:
            c.zero_()
            if bias is not None:
                c += bias
        else:
            acc = acc_dtype(a.dtype)
            if splits is None:
                cfg = GEMM_INTERP if is_interpreter() else gemm_config(M, N, K, num_sms(a.device))
                splits = split_count(M, N, K, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"],
                                     num_sms(a.device))
            s = max(1, int(splits))
            ws = torch.empty((s, M, N), device=a.device, dtype=acc) if s > 1 else c
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), s)
            _gemm_tuned[grid](
                a, b, c, bias if bias is not None else c, ws,
                M, N, K,
                a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                HAS_BIAS=bias is not None, SPLIT=s > 1,
                UPCAST=upcast_dots(), FP64=a.dtype == torch.float64, MIXED=a.dtype != b.dtype,
                # an fp32 intermediate against fp16 data: TF32 keeps fp16's mantissa, nothing is lost
                PRECISION="tf32" if a.dtype != b.dtype else dot_precision(a.dtype),
            )
            if s > 1:
                _reduce(ws, bias, c)
    if rowsum:
        return c, row_sums(a)
    return c


def chain(
    a: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    store_t: bool = False,
    act: int = 0,
    cb: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
):
    """``z = (a·w1ᵀ)·w2ᵀ (+ bias)`` with the fused chain kernel; returns ``(z, t or None)``.

    a: (M, K), w1: (R, K), w2: (N, R); any strides. Needs ``padded_rank(R) <= FUSED_MAX_R``
    (the rank padded to a multiple of 16, kept as up to three power-of-two register tiles).

    The nonlinear bottleneck (:mod:`kernels.lowrank_act`; ``act`` a code of its ``ACTIVATIONS``):
    forward ``z = σ(a·w1ᵀ + cb)·w2ᵀ (+ bias)`` with ``t = h = a·w1ᵀ + cb`` (pre-activation);
    backward with ``gate = h (M, R)``: ``t = dh = (a·w1ᵀ) ⊙ σ'(h)``, ``z = dh·w2ᵀ``.
    """
    M, K = a.shape
    R = w1.shape[0]
    N = w2.shape[0]
    pieces = rank_pieces(R)
    if sum(pieces) > FUSED_MAX_R:
        raise ValueError(f"chain: rank must be <= {FUSED_MAX_R} for the fused kernel, got {R}")
    z = torch.empty((M, N), device=a.device, dtype=a.dtype)
    t_dtype = intermediate_dtype(a.dtype)
    t = torch.empty((M, R), device=a.device, dtype=t_dtype) if store_t else None
    if M == 0 or N == 0:
        return z, t
    if K == 0 or R == 0:
        z.zero_()
        if bias is not None:
            z += bias
        if t is not None:
            t.zero_()
        return z, t
    t_arg = t if t is not None else z
    g_arg = gate if gate is not None else t_arg
    _chain_tuned[row_block_grid(M, N, a.device)](
        a, w1, w2, bias if bias is not None else z, z, t_arg,
        cb if cb is not None else z, g_arg,
        M, K, N, R, m_bucket(M),
        a.stride(0), a.stride(1), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1),
        z.stride(0), z.stride(1), t_arg.stride(0), t_arg.stride(1), g_arg.stride(0), g_arg.stride(1),
        HAS_BIAS=bias is not None, STORE_T=store_t, T_FP32=t_dtype != a.dtype,
        UPCAST=upcast_dots(), PRECISION=dot_precision(a.dtype), FP64=a.dtype == torch.float64,
        ACT=int(act), HAS_CB=cb is not None, GATE=gate is not None,
        R0=pieces[0], R1=pieces[1], R2=pieces[2],
    )
    return z, t


#: rows up to which the single-launch decode kernel is a candidate (all rows in one register tile)
DECODE_MAX_M = 64
#: largest fp32 accumulator ``BLOCK_M x R_PAD`` of a decode producer: 8 K elements (32 KiB of
#: registers over 8 warps); at 16 K (R = 1024) the sm_80/sm_90 builds spill (compile-check: 255
#: registers, 168-360 B of stack), so those shapes stay on the other paths
DECODE_MAX_ACC = 8192
#: producers of the decode kernel (K chunks): fewer keep the fp32 partials small
#: (``N0·M·R·4`` bytes written and read once), more spread the read of ``V`` over more SMs
DECODE_PRODUCERS = 32


#: a tile plan other than the widest is taken only where predicted at least this much faster
DECODE_TILE_MARGIN = 0.99


def decode_tiles(M: int, K: int, N: int, R: int) -> Optional[dict]:
    """The decode kernel's tiles and role counts for ``x (M, K)``, ``V (R, K)``, ``U (N, R)``, or
    None where it does not apply (``M > 64``, or the ``BLOCK_M x R_PAD`` fp32 accumulator over
    ``DECODE_MAX_ACC`` elements: ``R > 512`` at 16 rows, ``R > 128`` at 64).

    ``BLOCK_M = max(16, next_pow2(M))``; the rank padded to a multiple of 16 as up to three
    power-of-two pieces (:func:`rank_pieces`, ``R_PAD`` their sum): the accumulator holds every
    rank, so ``x`` and ``V`` are each read once. ``BLOCK_K`` keeps a ``V`` tile at <= 16 K
    elements; ``N0 <= 32`` producers of ``KC`` columns each, ``N1 = ceil(R / 16)`` reducers,
    ``N2 = ceil(N / BLOCK_N)`` consumers holding ``BLOCK_N x R_PAD <= 16 K`` elements of ``U``.

    The widest tiles (``BLOCK_K`` up to 128, ``BLOCK_N`` up to 64) unless narrower ones are
    predicted at least 1 % faster (:data:`DECODE_TILE_MARGIN`; the launch's bytes over the share
    of the SMs its programs hold, :func:`_decode_launch` on the bf16 figures): small layers take
    more, smaller programs (768², rank 192, 16 tokens: 12 consumers of 64 rows -> 48 of 16, 36 -> 72
    programs, 2.91 -> 2.75 µs, *predicted*)."""
    if not (0 < M <= DECODE_MAX_M) or min(K, N, R) <= 0:
        return None
    pieces = rank_pieces(R)
    bm, rp = max(16, next_pow2(M)), sum(pieces)
    if bm * rp > DECODE_MAX_ACC:
        return None
    return dict(_decode_tile_pick(M, K, N, R))


def producer_chunks(n: int, step: int) -> tuple[int, int]:
    """``(producers, elements per producer)`` of a decode kernel's split reduction over ``n``
    elements in steps of ``step``: at most :data:`DECODE_PRODUCERS` producers, each a whole number
    of steps, none empty."""
    steps = -(-n // step)
    per = -(-steps // min(steps, DECODE_PRODUCERS)) * step
    return -(-n // per), per


@functools.lru_cache(maxsize=4096)
def _decode_tile_pick(M: int, K: int, N: int, R: int) -> tuple:
    """:func:`decode_tiles`' plan as ``(key, value)`` pairs (cached: the launcher asks every call):
    of ``BLOCK_K`` in 16-128 and ``BLOCK_N`` in 16-64 within the tile budget, the fastest by
    :func:`_decode_launch_of` if it beats the widest by the margin, else the widest."""
    pieces = rank_pieces(R)
    rp = sum(pieces)
    fit = 1 << ((16384 // rp).bit_length() - 1)   # largest power of two with rp·fit <= 16384
    bk_max, bn_max = max(16, min(128, fit)), max(16, min(64, fit))

    def plan(bk, bn):
        n0, kc = producer_chunks(K, bk)
        return dict(BLOCK_M=max(16, next_pow2(M)), R0=pieces[0], R1=pieces[1], R2=pieces[2], R_PAD=rp,
                    BLOCK_K=bk, BLOCK_R=16, BLOCK_N=bn, N0=n0, N1=-(-R // 16), N2=-(-N // bn), KC=kc)

    dev = COST_DEVICE
    seconds = lambda t: _decode_launch_of(t, M, K, N, R, 2, 2, True, dev).seconds(dev)
    best = widest = plan(bk_max, bn_max)
    t_best = t_wide = seconds(widest)
    for bk in (16, 32, 64, 128):
        for bn in (16, 32, 64):
            if bk <= bk_max and bn <= bn_max and (bk, bn) != (bk_max, bn_max):
                c = plan(bk, bn)
                t = seconds(c)
                if t < t_best and t <= DECODE_TILE_MARGIN * t_wide:
                    best, t_best = c, t
    return tuple(best.items())


_COUNTERS: dict = {}


def _counters(device: torch.device) -> torch.Tensor:
    """The decode kernel's four int32 counters for this device and stream: zeroed once, reset to
    zero by the last program of every launch (launches on one stream run one after another)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None:
        buf = _COUNTERS[key] = torch.zeros(4, dtype=torch.int32, device=device)
    return buf


def decode(
    x: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    save_t: bool = False,
    sync: Optional[bool] = None,
):
    """``y = (x·Vᵀ)·Uᵀ (+ bias)`` for a handful of rows in **one launch**; returns ``(y, t or None)``.

    x: (M, K) with ``M <= 64``, v: (R, K), u: (N, R), any strides. Three roles (see
    ``_decode_kernel``): ``N0`` producers each multiply one ``K`` chunk of ``x`` and ``V`` into an
    fp32 partial ``(M, R)``; ``N1`` reducers sum the partials of 16 columns of ``t`` in the fixed
    order ``p = 0, 1, …`` (bitwise reproducible) and round ``t`` once; ``N2`` consumers each load
    their rows of ``U`` first, then ``t``, and write ``y``. ``V`` and ``U`` are read from memory
    once in total; the partials (``N0·M·R·4`` bytes) and ``t`` stay in L2.

    ``sync`` (default: on CUDA): roles from a ticket drawn at program start and waits on counters
    (one kernel, no grid barrier: a program waits only for programs that started before it).
    Without it the roles follow the program id, which is correct when programs run in id order
    (the Triton interpreter); the interpreter tests run both."""
    M, K = x.shape
    R, N = v.shape[0], u.shape[0]
    tiles = decode_tiles(M, K, N, R)
    if tiles is None:
        raise ValueError(f"decode: expected 1 <= M <= {DECODE_MAX_M} rows and a rank whose accumulator fits "
                         f"(BLOCK_M x R_PAD <= {DECODE_MAX_ACC}), got M={M}, R={R}")
    acc = acc_dtype(x.dtype)
    inter = intermediate_dtype(x.dtype)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    t = torch.empty((M, R), device=x.device, dtype=inter)
    ws = torch.empty((tiles["N0"], M, R), device=x.device, dtype=acc)
    sync = x.is_cuda if sync is None else bool(sync)
    cnt = _counters(x.device) if sync else ws
    n0, n1, n2 = tiles["N0"], tiles["N1"], tiles["N2"]
    _decode_tuned[(n0 + n1 + n2,)](
        x, v, u, bias if bias is not None else y, y, t, ws, cnt,
        M, K, N, R, n0, n1, n2, tiles["KC"],
        x.stride(0), x.stride(1), v.stride(0), v.stride(1), u.stride(0), u.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, SYNC=sync, T_FP32=inter != x.dtype,
        UPCAST=upcast_dots(), PRECISION=dot_precision(x.dtype), FP64=x.dtype == torch.float64,
        R0=tiles["R0"], R1=tiles["R1"], R2=tiles["R2"],
        BLOCK_M=tiles["BLOCK_M"], BLOCK_K=tiles["BLOCK_K"], BLOCK_R=tiles["BLOCK_R"], BLOCK_N=tiles["BLOCK_N"],
    )
    return y, (t if save_t else None)


def decode_bwd_tiles(M: int, K: int, N: int, R: int) -> Optional[dict]:
    """Tiles and role counts of the one-launch decode backward (:func:`decode_bwd`), or None where
    it does not apply (``M > 64``, ``BLOCK_M x R_PAD > DECODE_MAX_ACC``). ``BLOCK_N`` (producers'
    ``g``/``U`` step) and ``BLOCK_K`` (consumers' ``x``/``V`` tile) keep a factor tile and its
    fp32 gradient tile at <= 8 K elements each."""
    if not (0 < M <= DECODE_MAX_M) or min(K, N, R) <= 0:
        return None
    pieces = rank_pieces(R)
    bm, rp = max(16, next_pow2(M)), sum(pieces)
    if bm * rp > DECODE_MAX_ACC:
        return None
    fit = 1 << ((DECODE_MAX_ACC // rp).bit_length() - 1)
    bn = bk = max(16, min(64, fit))
    n0, nc = producer_chunks(N, bn)
    return dict(BLOCK_M=bm, R0=pieces[0], R1=pieces[1], R2=pieces[2], R_PAD=rp, BLOCK_N=bn, BLOCK_K=bk,
                BLOCK_R=16, N0=n0, N1=-(-R // 16), N2=-(-K // bk), NC=nc)


def decode_bwd(g, x, u, v, t, has_bias: bool, need_x: bool = True, need_u: bool = True, need_v: bool = True,
               sync: Optional[bool] = None):
    """The backward of a handful of rows in **one launch**: ``(dx, du, dv, db)`` (None where not
    asked for). g: (M, N), x: (M, K), u: (N, R), v: (R, K), t: (M, R) the forward's saved
    ``x·Vᵀ``. Producers take ``N`` chunks (``dU = gᵀ·t`` and ``db`` for their columns, a partial
    ``dt = g·U``), reducers sum the partials in a fixed order into ``dt`` (rounded as the
    intermediate), consumers take ``K`` tiles (``dx = dt·V``, ``dV = dtᵀ·x``, their ``V`` and ``x``
    loaded before the wait). ``U`` and ``V`` are each read once, ``dU`` and ``dV`` written once;
    bitwise reproducible. ``sync`` as in :func:`decode`."""
    M, K = x.shape
    N, R = u.shape
    tiles = decode_bwd_tiles(M, K, N, R)
    if tiles is None or t is None:
        raise ValueError(f"decode_bwd: expected 1 <= M <= {DECODE_MAX_M} rows, a rank whose accumulator fits "
                         f"and the saved t, got M={M}, R={R}, t={'given' if t is not None else None}")
    acc = acc_dtype(g.dtype)
    inter = intermediate_dtype(g.dtype)
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if need_x else None
    du = torch.empty((N, R), device=x.device, dtype=u.dtype) if need_u else None
    dv = torch.empty((R, K), device=x.device, dtype=v.dtype) if need_v else None
    db = torch.empty((N,), device=x.device, dtype=g.dtype) if has_bias else None
    dt = torch.empty((M, R), device=x.device, dtype=inter)
    ws = torch.empty((tiles["N0"], M, R), device=x.device, dtype=acc)
    t = t.contiguous()
    sync = x.is_cuda if sync is None else bool(sync)
    cnt = _counters(x.device) if sync else ws
    ph = lambda a, like: a if a is not None else like
    dxa, dua, dva = ph(dx, x), ph(du, u), ph(dv, v)
    n0, n1, n2 = tiles["N0"], tiles["N1"], tiles["N2"]
    _decode_bwd_tuned[(n0 + n1 + n2,)](
        g, x, u, v, t, dxa, dua, dva, ph(db, dt), dt, ws, cnt,
        M, K, N, R, n0, n1, n2, tiles["NC"],
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        dxa.stride(0), dxa.stride(1), dua.stride(0), dua.stride(1), dva.stride(0), dva.stride(1),
        NEED_X=need_x, NEED_U=need_u, NEED_V=need_v, HAS_BIAS=has_bias, SYNC=sync, T_FP32=inter != g.dtype,
        UPCAST=upcast_dots(), PRECISION=dot_precision(g.dtype), FP64=g.dtype == torch.float64,
        R0=tiles["R0"], R1=tiles["R1"], R2=tiles["R2"],
        BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"], BLOCK_K=tiles["BLOCK_K"], BLOCK_R=tiles["BLOCK_R"],
    )
    return dx, du, dv, db


def _mm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype):
    """One cuBLAS product (the ``'torch'`` path): ``torch.mm`` / ``torch.addmm`` in the operands'
    dtype (fp32 accumulation inside cuBLAS). fp16 products whose intermediate is fp32 go to the
    Triton GEMM instead (cuBLAS has no fp32 x fp16 product)."""
    if a.dtype != b.dtype:
        return gemm(a, b, bias=bias, out_dtype=out_dtype)
    c = torch.addmm(bias, a, b) if bias is not None else torch.mm(a, b)
    return c if c.dtype == out_dtype else c.to(out_dtype)


def lowrank_fwd(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    save_t: bool,
    path: Optional[str] = None,
):
    """Forward launcher: ``(y, t or None)`` for ``x (M, K)``, ``u (N, R)``, ``v (R, K)``."""
    M, K = x.shape
    N, R = u.shape
    path = path or choose_path(M, K, N, R, x.dtype, bias is not None, num_sms(x.device))
    if path == "decode" and min(M, K, N, R) > 0 and decode_tiles(M, K, N, R) is not None:
        return decode(x, v, u, bias, save_t)
    if path == "fused":
        return chain(x, v, u, bias, store_t=save_t)
    inter = intermediate_dtype(x.dtype)
    if path == "torch" and inter == x.dtype and M > 0 and K > 0 and R > 0:
        t = _mm(x, v.t(), None, inter)
        y = _mm(t, u.t(), bias, x.dtype)
        return y, (t if save_t else None)
    t = gemm(x, v.t(), out_dtype=inter)
    y = gemm(t, u.t(), bias=bias, out_dtype=x.dtype)
    return y, (t if save_t else None)


def lowrank_bwd(
    g: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    t: Optional[torch.Tensor],
    has_bias: bool,
    need_x: bool = True,
    need_u: bool = True,
    need_v: bool = True,
    path: Optional[str] = None,
):
    """Backward launcher: ``(dx, du, dv, db)`` (``None`` where not needed).

    g: (M, N) upstream gradient, x: (M, K), u: (N, R), v: (R, K), t: (M, R) saved ``x·Vᵀ`` or
    None (recomputed then). The weight gradients reduce over all ``M`` rows: on our kernels that
    reduction is split over programs (split-K, fixed-order reduce) whenever the output tiles alone
    would leave SMs idle; ``db`` is its own split reduction (:func:`row_sums`).
    """
    M, K = x.shape
    N, R = u.shape
    dx = du = dv = db = None
    path = path or choose_bwd_path(M, K, N, R, g.dtype, has_bias, need_x, need_u, need_v, num_sms(g.device),
                                   t_saved=t is not None)
    if M == 0:
        z = lambda *s, like: torch.zeros(s, device=like.device, dtype=like.dtype)
        return (
            z(0, K, like=x) if need_x else None,
            z(N, R, like=u) if need_u else None,
            z(R, K, like=v) if need_v else None,
            z(N, like=u) if has_bias else None,
        )
    if (path == "decode" and t is not None and (need_x or need_v) and min(K, N, R) > 0
            and decode_bwd_tiles(M, K, N, R) is not None):
        return decode_bwd(g, x, u, v, t, has_bias, need_x, need_u, need_v)
    inter = intermediate_dtype(g.dtype)
    use_mm = path == "torch" and inter == g.dtype and N > 0 and K > 0 and R > 0
    mm = (lambda a, b, out_dtype: _mm(a, b, None, out_dtype)) if use_mm else (
        lambda a, b, out_dtype: gemm(a, b, out_dtype=out_dtype))
    dt = None
    if need_x:
        if path == "fused":
            dx, dt = chain(g, u.t(), v.t(), None, store_t=need_v)   # dt = g·U, dx = dt·V
        else:
            dt = mm(g, u, inter)
            dx = mm(dt, v, x.dtype)
    elif need_v:
        dt = mm(g, u, inter)
    if need_u:
        if t is None:
            t = mm(x, v.t(), intermediate_dtype(x.dtype))
        du = mm(g.t(), t, u.dtype)                                   # dU = gᵀ·t
    if has_bias:
        # db = Σ_m g: PyTorch's own column sum on the cuBLAS path (fp32 accumulation inside, one
        # rounding, one launch: what autograd of F.linear runs), else our split row sum
        db = g.sum(0) if use_mm else row_sums(g.t()).to(g.dtype)
    if need_v:
        dv = mm(dt.t(), x, v.dtype)                                  # dV = dtᵀ·x
    return dx, du, dv, db
