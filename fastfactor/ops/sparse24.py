"""2:4 sparse ops, registered with ``torch.library``.

Public functions
----------------
* :func:`sparse24_linear` ``(x, w: Sparse24Weight, bias=None)``: ``y = x·Wᵀ + b`` with ``W`` 2:4.
* :func:`dense_sparse_linear` ``(x, d, s: Sparse24Weight, bias=None)``: ``y = (x·Sᵀ)·Dᵀ + b``.
* :func:`prune_24` / :func:`mask_24` (re-exported from ``fastfactor.formats.sparse24``): 2:4
  pruning by magnitude or by a given score.
* :func:`ste_24`: the straight-through 2:4 projection used for learning the mask (STF).

Custom ops take tensors only, so the public functions unpack the :class:`Sparse24Weight` and pass
``values`` and ``meta``; ``meta`` (``uint8``) never receives a gradient: the mask is fixed in
these ops. The gradient of ``W`` w.r.t. the packed form is the gradient of the kept values only.

Registered ops (one opaque node per direction for ``torch.compile``):

* ``fastfactor::sparse24_fwd(x, values, meta, bias) -> y``
* ``fastfactor::sparse24_bwd(g, x, values, meta, has_bias, need_x, need_values) -> (dx, dvalues, db)``
* ``fastfactor::dense_sparse_fwd(x, d, s_values, s_meta, bias, save_t) -> (y, t)``: ``t = x·Sᵀ``
  in ``kernels.sparse24.intermediate_dtype(x.dtype)`` (fp32 for fp16 inputs: it can exceed fp16's
  range where ``y`` does not), or an empty ``(0,)`` tensor without ``save_t``
* ``fastfactor::dense_sparse_bwd(g, x, d, s_values, s_meta, t, has_bias, need_x, need_d, need_s)
  -> (dx, dd, ds_values, db)``
* ``fastfactor::mask24(scores) -> mask``

Gradients not asked for come back as empty ``(0,)`` tensors. Dispatch inside: CUDA → Triton;
CPU → the PyTorch reference (or the Triton interpreter, see ``fastfactor.kernels._config``).

Paths (CUDA; :func:`choose_sparse24_path`, ``fastfactor.kernels.sparse24``)
-------------------------------------------------------------------------
Triton has no sparse tensor-core instruction, so a Triton kernel can only do the dense FLOPs. The
forward therefore takes one of three paths, ranked by a roofline estimate (*predicted*, not
measured: ``kernels.sparse24.path_costs``):

* ``triton`` (always for ``M <= 64``): our kernel, the weight expanded on chip, bytes-bound;
* ``torch``: PyTorch's semi-structured GEMM (CUTLASS, sparse tensor cores: half the products),
  fed our packed tensors directly (``values`` *is* CUTLASS's compressed matrix; the codes are
  reordered once per mask and cached, at pack time for the modules). CUDA fp16/bf16 with
  ``out % 32 == 0``, ``in % 64 == 0``, ``M % 8 == 0``. It returns ``y`` as the transposed view of
  a contiguous ``yᵀ``. Used in training as well: inside the op, with an exact backward;
* ``dense``: the weight expanded once (one Triton launch) and cuBLAS.

The backward takes ``triton`` or ``dense`` for ``dx = g·W`` and for the kept entries of
``gᵀ·x`` (cuBLAS then one selection launch), by the same estimate. ``FASTFACTOR_SPARSE24_PATH=
triton|dense|torch|auto`` and ``FASTFACTOR_SPARSE24_BWD_PATH=triton|dense|auto`` force a path;
assigning ``fastfactor.ops.sparse24.SPARSE24_TORCH_MIN_M`` (an int) restores the old threshold
rule for ``torch``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _validate as V
from ..formats import sparse24 as fmt
from ..formats.sparse24 import Sparse24Weight, mask_24, pack_24, prune_24
from ..kernels import sparse24 as K
from ..kernels._config import use_triton
from ._common import empty as _empty
from ._common import autocast_operands, fake_grads, grads_or_empty, needs_grad, no_autocast

#: ``None``: the forward path is chosen by cost; an int: PyTorch's path from this many rows.
SPARSE24_TORCH_MIN_M = K.SPARSE24_TORCH_MIN_M


# --------------------------------------------------------------------------------------------
# pruning inside a differentiable graph
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastfactor::mask24", mutates_args=())
def _mask24(scores: torch.Tensor) -> torch.Tensor:
    return fmt._prune_dispatch(scores, scores)[1]


@_mask24.register_fake
def _(scores):
    return scores.new_empty(scores.shape, dtype=torch.bool)


def ste_24(w: torch.Tensor, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Straight-through 2:4 projection: the forward value is ``prune_24(W, scores)``, the backward
    is the identity (the gradient reaches every entry of ``W``, kept or pruned), as DSFormer's
    straight-through factorizer trains its sparse factor. The mask is recomputed from the current
    ``W`` (or ``scores``) at every call; it is an opaque custom op, so this traces under
    ``torch.compile(fullgraph=True)``."""
    fmt._check_prune_args(w, scores)
    s = scores.detach() if scores is not None else w.detach().abs()
    m = _mask24(s)
    pruned = torch.where(m, w, torch.zeros((), dtype=w.dtype, device=w.device))
    return w + (pruned - w).detach()


# --------------------------------------------------------------------------------------------
# sparse24_linear
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastfactor::sparse24_fwd", mutates_args=())
def _sparse24_fwd(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    with no_autocast(x):
        if use_triton(x):
            return K.sparse24_forward(x, values, meta, bias, _fwd_path(x, values))
        with torch.no_grad():
            return K.sparse24_linear_ref(x, values, meta, bias)


def _fwd_path(x, values) -> str:
    return choose_sparse24_path(x.shape[0], x.shape[1], values.shape[0], x.dtype, x.device)


@_sparse24_fwd.register_fake
def _(x, values, meta, bias):
    M, N = x.shape[0], values.shape[0]
    if x.device.type == "cuda" and _fwd_path(x, values) == "torch":
        return x.new_empty((N, M)).t()          # PyTorch's 2:4 GEMM computes yᵀ = W·xᵀ
    return x.new_empty((M, N))


@torch.library.custom_op("fastfactor::sparse24_bwd", mutates_args=())
def _sparse24_bwd(
    g: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    has_bias: bool,
    need_x: bool,
    need_values: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with no_autocast(g):
        dx = dv = db = None
        if use_triton(g):
            if has_bias:   # at decode sizes db comes out of the dx launch
                dx, dv, db = K.sparse24_backward(g, x, values, meta, need_x, need_values, need_bias=True)
            else:
                dx, dv = K.sparse24_backward(g, x, values, meta, need_x, need_values)
        else:
            dx, dv, db = K.sparse24_bwd_ref(g, x, values, meta, has_bias, need_x, need_values)
    return grads_or_empty(g, dx, dv, db)


@_sparse24_bwd.register_fake
def _(g, x, values, meta, has_bias, need_x, need_values):
    return fake_grads(g, (need_x, x), (need_values, values), (has_bias, (values.shape[0],)))


def _sp_setup(ctx, inputs, output):
    x, values, meta, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, values, meta)


def _sp_backward(ctx, g):
    x, values, meta = ctx.saved_tensors
    need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[3]
    dx, dv, db = _sparse24_bwd(g, x, values, meta, need_b, need_x, need_v)
    return (dx if need_x else None, dv if need_v else None, None, db if need_b else None)


torch.library.register_autograd("fastfactor::sparse24_fwd", _sp_backward, setup_context=_sp_setup)


def _check_packed(name: str, values, meta, rows: Optional[int] = None):
    V.check_tensor(f"{name}.values", values, ndim=2)
    if not isinstance(meta, torch.Tensor):
        raise TypeError(f"{name}.meta: expected a torch.Tensor, got {type(meta).__name__}")
    if meta.dtype != torch.uint8:
        raise TypeError(f"{name}.meta: expected dtype uint8, got {str(meta.dtype).replace('torch.', '')}")
    k = 2 * values.shape[1]
    if meta.ndim != 2 or tuple(meta.shape) != (values.shape[0], K.meta_cols(k)):
        raise ValueError(
            f"{name}.meta: expected shape {(values.shape[0], K.meta_cols(k))} for values of shape "
            f"{tuple(values.shape)}, got {tuple(meta.shape)}"
        )
    if meta.device != values.device:
        raise ValueError(f"{name}.meta: expected device {values.device}, got {meta.device}")
    return k


def _check_x(x, k, what):
    V.check_tensor("x", x, min_ndim=1)
    if x.shape[-1] != k:
        if x.shape[-1] % 4 != 0:
            raise ValueError(
                f"x: expected last dimension {k} ({what}), got shape {tuple(x.shape)} "
                f"(2:4 weights need in_features % 4 == 0; pad x and the weight with zero columns)"
            )
        raise ValueError(f"x: expected last dimension {k} ({what}), got shape {tuple(x.shape)}")
    if x.is_cuda and x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(
            f"x: expected float32, float16 or bfloat16 on CUDA, got {str(x.dtype).replace('torch.', '')}"
        )


def check_sparse24_args(x, values, meta, bias) -> None:
    k = _check_packed("w", values, meta)
    _check_x(x, k, "in_features = 2·w.values.shape[1]")
    V.check_same("x", x, **{"w.values": values, "bias": bias})
    if meta.device != x.device:
        raise ValueError(f"w.meta: expected device {x.device} (the device of x), got {meta.device}")
    if bias is not None:
        V.check_tensor("bias", bias, ndim=1)
        V.check_dim("bias", bias, 0, values.shape[0], "out_features = w.shape[0]")


def choose_sparse24_path(M: int, K_in: int, N: int, dtype: torch.dtype, device: torch.device) -> str:
    """``'triton'``, ``'dense'`` (expand once + cuBLAS) or ``'torch'`` (PyTorch's semi-structured
    GEMM on sparse tensor cores) for a forward of ``x (M, K_in)`` against a 2:4 ``W (N, K_in)``:
    :func:`fastfactor.kernels.sparse24.choose_mm_path` (beside the kernels: a roofline estimate
    of each path, predicted) with this module's :data:`SPARSE24_TORCH_MIN_M` (``None``: by cost)."""
    return K.choose_mm_path(M, K_in, N, dtype, device, SPARSE24_TORCH_MIN_M)


def sparse24_linear_packed(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """:func:`sparse24_linear` on the packed tensors (what the modules call; compile-friendly).
    Under ``torch.autocast`` for ``x``'s device, ``x``, ``values`` and ``bias`` are cast to the
    region's dtype first (``nn.Linear``'s semantics; ``meta`` stays uint8)."""
    x, values, bias = autocast_operands(x, values, bias)
    check_sparse24_args(x, values, meta, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])   # explicit: -1 is ambiguous when in = 0
    n = values.shape[0]
    y = _sparse24_fwd(x2, values, meta, bias)
    return y.reshape(*lead, n)


def sparse24_linear(
    x: torch.Tensor, w: Sparse24Weight, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """2:4 sparse linear layer ``y = x·Wᵀ + b``.

    Args:
        x: ``(..., in)`` input, any leading dims and strides.
        w: :class:`Sparse24Weight` of shape ``(out, in)``, ``in % 4 == 0``.
        bias: ``(out,)`` or None.

    Returns:
        ``(..., out)`` in ``x``'s dtype (fp32 accumulation inside).

    Gradients: ``x``, ``w.values`` (kept entries only: the mask is fixed) and ``bias``. CUDA
    tensors run the Triton kernel that expands the compressed weight on chip (or PyTorch's
    semi-structured path where :func:`choose_sparse24_path` says so); CPU tensors run the
    PyTorch reference.
    """
    if not isinstance(w, Sparse24Weight):
        raise TypeError(f"w: expected a Sparse24Weight (see pack_24), got {type(w).__name__}")
    return sparse24_linear_packed(x, w.values, w.meta, bias)


# --------------------------------------------------------------------------------------------
# dense_sparse_linear
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastfactor::dense_sparse_fwd", mutates_args=())
def _dense_sparse_fwd(
    x: torch.Tensor,
    d: torch.Tensor,
    s_values: torch.Tensor,
    s_meta: torch.Tensor,
    bias: Optional[torch.Tensor],
    save_t: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        with no_autocast(x):
            y, t = K.dense_sparse_fwd(x, d, s_values, s_meta, bias, save_t)
        return y, (t if t is not None else _empty(x))
    with torch.no_grad(), no_autocast(x):
        y, t = K.dense_sparse_linear_ref(x, d, s_values, s_meta, bias, return_t=True)  # t once
    return y, (t if save_t else _empty(x))


@_dense_sparse_fwd.register_fake
def _(x, d, s_values, s_meta, bias, save_t):
    y = x.new_empty((x.shape[0], d.shape[0]))
    t = (
        x.new_empty((x.shape[0], s_values.shape[0]), dtype=K.intermediate_dtype(x.dtype))
        if save_t else x.new_empty((0,))
    )
    return y, t


@torch.library.custom_op("fastfactor::dense_sparse_bwd", mutates_args=())
def _dense_sparse_bwd(
    g: torch.Tensor,
    x: torch.Tensor,
    d: torch.Tensor,
    s_values: torch.Tensor,
    s_meta: torch.Tensor,
    t: torch.Tensor,
    has_bias: bool,
    need_x: bool,
    need_d: bool,
    need_s: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with no_autocast(g):
        saved_t = t if t.ndim == 2 else None
        bwd = K.dense_sparse_bwd if use_triton(g) else K.dense_sparse_bwd_ref  # same arguments
        dx, dd, ds, db = bwd(g, x, d, s_values, s_meta, saved_t, has_bias, need_x, need_d, need_s)
    return grads_or_empty(g, dx, dd, ds, db)


@_dense_sparse_bwd.register_fake
def _(g, x, d, s_values, s_meta, t, has_bias, need_x, need_d, need_s):
    return fake_grads(g, (need_x, x), (need_d, d), (need_s, s_values), (has_bias, (d.shape[0],)))


def _ds_setup(ctx, inputs, output):
    x, d, s_values, s_meta, bias, save_t = inputs
    _, t = output
    ctx.has_bias = bias is not None
    # the saved intermediate t is an output of the op but never differentiated: no zero-filled
    # gradient for it (an M x R memset launch per backward otherwise)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, d, s_values, s_meta, t)


def _ds_backward(ctx, g, _gt):
    if g is None:
        return None, None, None, None, None, None
    x, d, s_values, s_meta, t = ctx.saved_tensors
    need_x, need_d, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    need_b = ctx.has_bias and ctx.needs_input_grad[4]
    dx, dd, ds, db = _dense_sparse_bwd(g, x, d, s_values, s_meta, t, need_b, need_x, need_d, need_s)
    return (
        dx if need_x else None,
        dd if need_d else None,
        ds if need_s else None,
        None,
        db if need_b else None,
        None,
    )


torch.library.register_autograd("fastfactor::dense_sparse_fwd", _ds_backward, setup_context=_ds_setup)


def check_dense_sparse_args(x, d, s_values, s_meta, bias) -> None:
    k = _check_packed("s", s_values, s_meta)
    V.check_tensor("d", d, ndim=2)
    _check_x(x, k, "in_features = 2·s.values.shape[1]")
    V.check_same("x", x, d=d, **{"s.values": s_values, "bias": bias})
    if s_meta.device != x.device:
        raise ValueError(f"s.meta: expected device {x.device} (the device of x), got {s_meta.device}")
    V.check_dim("d", d, 1, s_values.shape[0], "rank = s.shape[0]")
    if bias is not None:
        V.check_tensor("bias", bias, ndim=1)
        V.check_dim("bias", bias, 0, d.shape[0], "out_features = d.shape[0]")


def dense_sparse_linear_packed(
    x: torch.Tensor,
    d: torch.Tensor,
    s_values: torch.Tensor,
    s_meta: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`dense_sparse_linear` on the packed tensors of ``S`` (what the modules call).
    Under ``torch.autocast`` for ``x``'s device the floating operands are cast to the region's
    dtype first (``nn.Linear``'s semantics)."""
    x, d, s_values, bias = autocast_operands(x, d, s_values, bias)
    check_dense_sparse_args(x, d, s_values, s_meta, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])   # explicit: -1 is ambiguous when in = 0
    y, _ = _dense_sparse_fwd(x2, d, s_values, s_meta, bias, needs_grad(x, d, s_values, bias))
    return y.reshape(*lead, d.shape[0])


def dense_sparse_linear(
    x: torch.Tensor, d: torch.Tensor, s: Sparse24Weight, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Dense-sparse (DSFormer) linear layer ``y = (x·Sᵀ)·Dᵀ + b``.

    Args:
        x: ``(..., in)`` input, any leading dims and strides.
        d: ``(out, r)`` dense factor.
        s: :class:`Sparse24Weight` of shape ``(r, in)``, ``in % 4 == 0``.
        bias: ``(out,)`` or None.

    Returns:
        ``(..., out)`` in ``x``'s dtype. The path is chosen by predicted cost
        (``fastfactor.kernels.sparse24.choose_ds_path``): the ``(rows, r)`` intermediate stays
        on chip (fused kernel, ``r <= 256``; or, at ``<= 64`` rows and any rank, the rank-split
        launch, each program a chunk of it) where that is predicted >= 5 % faster, else ``x·Sᵀ``
        runs on sparse24's own path (PyTorch's 2:4 GEMM, ``S`` zero-padded to 32 rows where
        needed; the decode kernel at a handful of rows; or ``S`` expanded once + cuBLAS) and
        ``t·Dᵀ`` on cuBLAS. The intermediate is rounded to the input dtype as a two-matmul path
        does, except for fp16 inputs, where it stays fp32 (``x·Sᵀ`` may exceed fp16's range while
        ``y`` fits; the second product then runs as TF32, on our kernels).

    Gradients: ``x``, ``d``, ``s.values`` (kept entries only) and ``bias``.
    """
    if not isinstance(s, Sparse24Weight):
        raise TypeError(f"s: expected a Sparse24Weight (see pack_24), got {type(s).__name__}")
    return dense_sparse_linear_packed(x, d, s.values, s.meta, bias)


__all__ = [
    "Sparse24Weight",
    "pack_24",
    "prune_24",
    "mask_24",
    "ste_24",
    "sparse24_linear",
    "sparse24_linear_packed",
    "dense_sparse_linear",
    "dense_sparse_linear_packed",
    "choose_sparse24_path",
]
