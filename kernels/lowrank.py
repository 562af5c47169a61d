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
Two kernels serve every product:

* ``_chain_kernel`` computes ``z = (a·Aᵀ)·Bᵀ`` for one block of ``BLOCK_M`` rows: the first product
  ``(BLOCK_M, R_PAD)`` is accumulated in fp32 registers over ``K``, rounded to the input dtype and
  multiplied straight into the output tiles, so the rank-r intermediate never goes to device
  memory. The forward is ``a = x, A = V, B = U``; the backward's ``dx`` is the same chain with
  ``a = g, A = Uᵀ, B = Vᵀ``. Because the intermediate must sit in registers, the chain handles
  ``R_PAD = next_pow2(R) <= 256``. To give small ``M`` enough programs, the ``N`` tiles can be
  split across ``N_SPLIT`` programs, each recomputing its block's intermediate (cheap when ``M``
  is small and the op is memory-bound; the launcher only splits when there are few row blocks).
* ``_gemm_kernel`` is a plain tiled ``C = A·B (+ bias)`` over arbitrary strides (so every transpose
  is free). It runs the two-GEMM path (``t = x·Vᵀ`` to memory, then ``y = t·Uᵀ + b``) that
  ``choose_path`` picks for large ranks, and the weight gradients ``dU`` and ``dV``, each output
  tile owned by one program that loops over all ``M`` rows: no atomics, so the backward is bitwise
  reproducible. ``db`` is fused into the ``dU`` product as the row sums of ``gᵀ`` taken by the
  programs of the first output column block.

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
    return max(16, next_pow2(r))


# Autotune spaces, each with two named members: *_INTERP, the one config the interpreter runs, and
# *_FIXED, the one deterministic runs launch (kernels._config.Tunable).
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
]


def _chain_fits(block_m: int, block_n: int, block_k: int, num_stages: int, r_pad: int) -> bool:
    """Whether a chain config fits: the fp32 intermediate ``BLOCK_M x R_PAD`` within 64 KiB of
    registers, and the pipelined operand tiles (``stages x (BLOCK_M + R_PAD) x BLOCK_K`` of stage 1
    plus ``R_PAD x BLOCK_N`` of stage 2, 2 bytes each) within the 160 KiB of shared memory that
    both A100 and H100 give a block (compile-check measures the real figure)."""
    smem = 2 * (num_stages * (block_m + r_pad) * block_k + r_pad * block_n + block_m * r_pad)
    return block_m * r_pad <= 16384 and smem <= 160 * 1024


def chain_space(R_PAD: int, **_) -> list[dict]:
    """The configs of ``CHAIN_SPACE`` that fit for this padded rank (see ``_chain_fits``)."""
    return [
        c for c in CHAIN_SPACE
        if _chain_fits(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c.get("num_stages", 2), R_PAD)
    ]


def _prune_chain(configs_, named_args, **kwargs):
    r_pad = kwargs.get("R_PAD", named_args.get("R_PAD"))
    kept = [
        c for c in configs_
        if _chain_fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, r_pad)
    ]
    return kept or configs_[:1]


if HAS_TRITON:

    @triton.jit
    def _chain_kernel(
        # --- pointers ---
        a_ptr,    # (M, K) left operand rows: x in forward, g = dL/dy in backward
        w1_ptr,   # (R, K) first factor, read as its transpose: V in forward, Uᵀ in backward
        w2_ptr,   # (N, R) second factor, read as its transpose: U in forward, Vᵀ in backward
        bias_ptr,  # (N,) bias added to the output; read only when HAS_BIAS
        z_ptr,    # (M, N) output: y in forward, dx in backward
        t_ptr,    # (M, R) intermediate a·w1ᵀ (fp32 when T_FP32); written only when STORE_T (pid_n == 0)
        # --- dimensions ---
        M, K, N, R,
        M_BUCKET,  # power-of-two bucket of M: autotune key only
        # --- strides (in elements) ---
        stride_am, stride_ak,
        stride_w1r, stride_w1k,
        stride_w2n, stride_w2r,
        stride_zm, stride_zn,
        stride_tm, stride_tr,
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        STORE_T: tl.constexpr,
        T_FP32: tl.constexpr,      # keep the intermediate in fp32 (fp16 inputs: range safety)
        UPCAST: tl.constexpr,      # upcast dot operands to fp32 (interpreter)
        PRECISION: tl.constexpr,   # tl.dot input_precision for fp32 operands
        FP64: tl.constexpr,        # float64 operands and accumulator (interpreter tier: gradcheck)
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

        # ---- stage 1: t = a·w1ᵀ for this row block, fp32 in registers ----
        if FP64:
            t_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float64)
        else:
            t_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < K
            a = tl.load(
                a_ptr + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0,
            )
            w1 = tl.load(  # (BLOCK_K, R_PAD) = w1[:, k-tile]ᵀ
                w1_ptr + offs_r[None, :] * stride_w1r + kk[:, None] * stride_w1k,
                mask=mask_r[None, :] & mask_k[:, None], other=0.0,
            )
            if UPCAST and not FP64:
                a = a.to(tl.float32)
                w1 = w1.to(tl.float32)
            t_acc = tl.dot(a, w1, t_acc, input_precision=PRECISION)

        if T_FP32:
            t = t_acc
        else:
            t = t_acc.to(z_ptr.dtype.element_ty)
        if STORE_T:
            if pid_n == 0:
                tl.store(
                    t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                    t, mask=mask_m[:, None] & mask_r[None, :],
                )
        if UPCAST and not FP64:
            t = t.to(tl.float32)

        # ---- stage 2: z[:, n-tile] = t·w2[n-tile, :]ᵀ (+ bias) ----
        # the N tiles are split evenly over grid dimension 1 (a split of 1 loops over all of N)
        tiles_per_prog = tl.cdiv(tl.cdiv(N, BLOCK_N), tl.num_programs(1))
        n_begin = pid_n * tiles_per_prog * BLOCK_N
        for i in range(0, tiles_per_prog):
            offs_n = n_begin + i * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            w2 = tl.load(  # (R_PAD, BLOCK_N) = w2[n-tile, :]ᵀ
                w2_ptr + offs_n[None, :] * stride_w2n + offs_r[:, None] * stride_w2r,
                mask=mask_n[None, :] & mask_r[:, None], other=0.0,
            )
            if (UPCAST or T_FP32) and not FP64:
                w2 = w2.to(tl.float32)
            z = tl.dot(t, w2, input_precision=PRECISION)
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
        c_ptr,       # (M, N) output
        bias_ptr,    # (N,) bias added to every row; read only when HAS_BIAS
        rowsum_ptr,  # (M,) row sums of a (fp32; fp64 when FP64), written when ROWSUM (db = Σ_m g fused into dU)
        # --- dimensions ---
        M, N, K,
        # --- strides (in elements) ---
        stride_am, stride_ak,
        stride_bk, stride_bn,
        stride_cm, stride_cn,
        # --- meta-parameters ---
        HAS_BIAS: tl.constexpr,
        ROWSUM: tl.constexpr,
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

        if FP64:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
            rsum = tl.zeros((BLOCK_M,), dtype=tl.float64)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            rsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < K
            a = tl.load(
                a_ptr + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0,
            )
            b = tl.load(
                b_ptr + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                mask=mask_k[:, None] & mask_n[None, :], other=0.0,
            )
            if ROWSUM:
                rsum += tl.sum(a.to(rsum.dtype), axis=1)
            if (UPCAST or MIXED) and not FP64:  # MIXED: an fp32 intermediate against fp16 weights
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(acc.dtype)
            acc = acc + bias[None, :]
        tl.store(
            c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
            acc.to(c_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_n[None, :],
        )
        if ROWSUM:
            if pid_n == 0:
                tl.store(rowsum_ptr + offs_m, rsum.to(rowsum_ptr.dtype.element_ty), mask=mask_m)

    _chain_tuned = Tunable(
        _chain_kernel, CHAIN_SPACE, key=["M_BUCKET", "K", "N", "R_PAD", "STORE_T"], prune=_prune_chain,
        interpreter=CHAIN_INTERP, deterministic=CHAIN_FIXED,
    )
    _gemm_tuned = Tunable(_gemm_kernel, GEMM_SPACE, key=["M", "N", "K"],
                          interpreter=GEMM_INTERP, deterministic=GEMM_FIXED)

    # ---- compile-tier registration (signatures derived from the kernels' arguments) ----
    register_kernel(KernelSpec(
        name="lowrank.chain",
        fn=_chain_kernel,
        constexprs=[
            dict(HAS_BIAS=True, STORE_T=True, T_FP32=False, UPCAST=False, PRECISION="tf32", FP64=False, R_PAD=32),
            dict(HAS_BIAS=False, STORE_T=False, T_FP32=False, UPCAST=False, PRECISION="tf32", FP64=False, R_PAD=256),
        ],
        space=chain_space,
        unit_args=("stride_ak", "stride_w1k", "stride_w2r", "stride_zn", "stride_tr"),
    ))
    register_kernel(KernelSpec(
        name="lowrank.gemm",
        fn=_gemm_kernel,
        pointers={"rowsum_ptr": "fp32"},
        constexprs=[
            dict(HAS_BIAS=True, ROWSUM=False, UPCAST=False, PRECISION="tf32", FP64=False, MIXED=False),
            dict(HAS_BIAS=False, ROWSUM=True, UPCAST=False, PRECISION="tf32", FP64=False, MIXED=False),
        ],
        space=GEMM_SPACE,
        unit_args=("stride_ak", "stride_bk", "stride_cn"),
    ))


# ============================================================================================
# Launchers
# ============================================================================================

def choose_path(M: int, K: int, N: int, R: int) -> str:
    """``'fused'`` (chain kernel, intermediate on chip) or ``'two_gemm'`` (intermediate through
    device memory) for a forward of this shape.

    The rule: the fused chain needs ``next_pow2(R) <= FUSED_MAX_R``; beyond that only the two-GEMM
    path exists. Within it, the fused chain wins where the op is bound by memory traffic and
    launch latency (few rows); at many rows both GEMMs are compute-bound, the intermediate's round
    trip costs ``2·M·R`` elements against ``M·(K + N)`` already moved, and the two-GEMM path's
    larger tiles win. The threshold below is provisional until measured on a GPU (BENCHMARKS.md);
    ``FASTFACTOR_LOWRANK_PATH=fused|two_gemm`` forces a path.
    """
    forced = os.environ.get("FASTFACTOR_LOWRANK_PATH")
    if forced:
        if forced not in ("fused", "two_gemm"):
            raise ValueError(
                f"FASTFACTOR_LOWRANK_PATH: expected 'fused' or 'two_gemm', got {forced!r}"
            )
        if forced == "fused" and _pad_rank(R) > FUSED_MAX_R:
            return "two_gemm"
        return forced
    if _pad_rank(R) > FUSED_MAX_R:
        return "two_gemm"
    return "fused" if M <= 2048 else "two_gemm"


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    rowsum: bool = False,
):
    """``a (M, K) · b (K, N) (+ bias)`` with the Triton GEMM; any strides.

    Returns ``c`` or, with ``rowsum=True``, ``(c, a.sum(1) in fp32, fp64 for fp64 inputs)``.
    """
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=out_dtype or a.dtype)
    acc = acc_dtype(a.dtype)
    rs = torch.empty((M,), device=a.device, dtype=acc) if rowsum else c
    if M > 0 and N == 0 and rowsum:
        rs.copy_(a.sum(1, dtype=acc))  # no output column: no program runs to take the row sums
    if M > 0 and N > 0:
        if K == 0:
            c.zero_()
            if bias is not None:
                c += bias
            if rowsum:
                rs.zero_()
        else:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
            _gemm_tuned[grid](
                a, b, c, bias if bias is not None else c, rs,
                M, N, K,
                a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                HAS_BIAS=bias is not None, ROWSUM=rowsum,
                UPCAST=upcast_dots(), FP64=a.dtype == torch.float64, MIXED=a.dtype != b.dtype,
                # an fp32 intermediate against fp16 data: TF32 keeps fp16's mantissa, nothing is lost
                PRECISION="tf32" if a.dtype != b.dtype else dot_precision(a.dtype),
            )
    return (c, rs) if rowsum else c


def chain(
    a: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    store_t: bool = False,
):
    """``z = (a·w1ᵀ)·w2ᵀ (+ bias)`` with the fused chain kernel; returns ``(z, t or None)``.

    a: (M, K), w1: (R, K), w2: (N, R); any strides. Needs ``next_pow2(R) <= FUSED_MAX_R``.
    """
    M, K = a.shape
    R = w1.shape[0]
    N = w2.shape[0]
    r_pad = _pad_rank(R)
    if r_pad > FUSED_MAX_R:
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
    _chain_tuned[row_block_grid(M, N, a.device)](
        a, w1, w2, bias if bias is not None else z, z, t_arg,
        M, K, N, R, m_bucket(M),
        a.stride(0), a.stride(1), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1),
        z.stride(0), z.stride(1), t_arg.stride(0), t_arg.stride(1),
        HAS_BIAS=bias is not None, STORE_T=store_t, T_FP32=t_dtype != a.dtype,
        UPCAST=upcast_dots(), PRECISION=dot_precision(a.dtype), FP64=a.dtype == torch.float64,
        R_PAD=r_pad,
    )
    return z, t


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
    path = path or choose_path(M, K, N, R)
    if path == "fused":
        return chain(x, v, u, bias, store_t=save_t)
    t = gemm(x, v.t(), out_dtype=intermediate_dtype(x.dtype))
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
    None (recomputed then).
    """
    M, K = x.shape
    N, R = u.shape
    dx = du = dv = db = None
    path = path or choose_path(M, N, K, R)
    if M == 0:
        z = lambda *s, like: torch.zeros(s, device=like.device, dtype=like.dtype)
        return (
            z(0, K, like=x) if need_x else None,
            z(N, R, like=u) if need_u else None,
            z(R, K, like=v) if need_v else None,
            z(N, like=u) if has_bias else None,
        )
    dt = None
    if need_x:
        if path == "fused":
            dx, dt = chain(g, u.t(), v.t(), None, store_t=need_v)   # dt = g·U, dx = dt·V
        else:
            dt = gemm(g, u, out_dtype=intermediate_dtype(g.dtype))
            dx = gemm(dt, v, out_dtype=x.dtype)
    elif need_v:
        dt = gemm(g, u, out_dtype=intermediate_dtype(g.dtype))
    if need_u or has_bias:
        if t is None:
            t = gemm(x, v.t(), out_dtype=intermediate_dtype(x.dtype))
        du_, db32 = gemm(g.t(), t, rowsum=True, out_dtype=u.dtype)  # dU = gᵀ·t, db = Σ_m g
        du = du_ if need_u else None
        db = db32.to(g.dtype) if has_bias else None
    if need_v:
        dv = gemm(dt.t(), x, out_dtype=v.dtype)                   # dV = dtᵀ·x
    return dx, du, dv, db
