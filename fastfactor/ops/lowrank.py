"""``fastfactor.lowrank_linear``: the public fused low-rank op, registered with ``torch.library``.

Two custom ops carry the work, so that ``torch.compile(fullgraph=True)`` sees one opaque node per
direction (no graph break) and CUDA graphs can capture them:

* ``fastfactor::lowrank_fwd(x, u, v, bias, save_t) -> (y, t)``: ``t`` is ``x·Vᵀ`` when ``save_t``
  (training; fp32 for fp16 inputs, see ``kernels.lowrank.intermediate_dtype``), else an empty
  ``(0,)`` tensor;
* ``fastfactor::lowrank_bwd(g, x, u, v, t, has_bias, need_x, need_u, need_v) -> (dx, du, dv, db)``:
  gradients not asked for come back as empty ``(0,)`` tensors.

We register with ``custom_op`` rather than ``triton_op``: the op holds a shape-dependent choice
between kernels and a CPU path, which must stay opaque to the compiler; the kernels need no
fusion by Inductor. Dispatch inside: CUDA → Triton kernels; CPU → the PyTorch reference (or the
Triton interpreter, see ``fastfactor.kernels._config``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _validate as V
from ..kernels import lowrank as K
from ..kernels._config import use_triton
from ._common import empty as _empty
from ._common import autocast_operands, fake_grads, grads_or_empty, needs_grad, no_autocast


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastfactor::lowrank_fwd", mutates_args=())
def _lowrank_fwd(
    x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], save_t: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        with no_autocast(x):
            y, t = K.lowrank_fwd(x, u, v, bias, save_t)
        return y, (t if t is not None else _empty(x))
    with torch.no_grad(), no_autocast(x):
        y, t = K.lowrank_linear_ref(x, u, v, bias, return_t=True)  # t computed once, kept if asked
    return y, (t if save_t else _empty(x))


@_lowrank_fwd.register_fake
def _(x, u, v, bias, save_t):
    y = x.new_empty((x.shape[0], u.shape[0]))
    t = (
        x.new_empty((x.shape[0], v.shape[0]), dtype=K.intermediate_dtype(x.dtype))
        if save_t else x.new_empty((0,))
    )
    return y, t


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastfactor::lowrank_bwd", mutates_args=())
def _lowrank_bwd(
    g: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    has_bias: bool,
    need_x: bool,
    need_u: bool,
    need_v: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    saved_t = t if t.ndim == 2 else None
    with no_autocast(g):
        if use_triton(g):
            dx, du, dv, db = K.lowrank_bwd(g, x, u, v, saved_t, has_bias, need_x, need_u, need_v)
        else:
            dx, du, dv, db = K.lowrank_bwd_ref(g, x, u, v, saved_t, has_bias, need_x, need_u, need_v)
    return grads_or_empty(g, dx, du, dv, db)


@_lowrank_bwd.register_fake
def _(g, x, u, v, t, has_bias, need_x, need_u, need_v):
    return fake_grads(g, (need_x, x), (need_u, u), (need_v, v), (has_bias, (u.shape[0],)))


def _setup_context(ctx, inputs, output):
    x, u, v, bias, save_t = inputs
    _, t = output
    ctx.has_bias = bias is not None
    # the saved intermediate t is an output of the op but never differentiated: no zero-filled
    # gradient for it (an M x R memset launch per backward otherwise)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, u, v, t)


def _backward(ctx, g, _gt):
    if g is None:
        return None, None, None, None, None
    x, u, v, t = ctx.saved_tensors
    need_x, need_u, need_v = ctx.needs_input_grad[:3]
    need_b = ctx.has_bias and ctx.needs_input_grad[3]
    dx, du, dv, db = _lowrank_bwd(g, x, u, v, t, need_b, need_x, need_u, need_v)
    return (
        dx if need_x else None,
        du if need_u else None,
        dv if need_v else None,
        db if need_b else None,
        None,
    )


torch.library.register_autograd("fastfactor::lowrank_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------

def check_lowrank_args(x, u, v, bias) -> None:
    V.check_tensor("x", x, min_ndim=1)
    V.check_tensor("u", u, ndim=2)
    V.check_tensor("v", v, ndim=2)
    V.check_same("x", x, u=u, v=v, bias=bias)
    if bias is not None:
        V.check_tensor("bias", bias, ndim=1)
    r, k = v.shape
    n = u.shape[0]
    V.check_dim("x", x, -1, k, "in_features = v.shape[1]")
    V.check_dim("u", u, 1, r, "rank = v.shape[0]")
    if bias is not None:
        V.check_dim("bias", bias, 0, n, "out_features = u.shape[0]")
    if x.is_cuda and x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(
            f"x: expected float32, float16 or bfloat16 on CUDA, got {str(x.dtype).replace('torch.', '')}"
        )


def lowrank_linear(
    x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Low-rank linear layer ``y = (x·Vᵀ)·Uᵀ + b``.

    Args:
        x: ``(..., in)`` input, any leading dims and strides.
        u: ``(out, r)`` left factor.
        v: ``(r, in)`` right factor.
        bias: ``(out,)`` or None.

    Returns:
        ``(..., out)`` in ``x``'s dtype (fp32 accumulation inside).

    CUDA tensors run the Triton kernels (the rank-r intermediate kept on chip where that is
    faster, see ``fastfactor.kernels.lowrank``); CPU tensors run the PyTorch reference.

    Autocast: inside a ``torch.autocast`` region for ``x``'s device, ``x``, ``u``, ``v`` and
    ``bias`` are cast to the region's dtype first, as ``nn.Linear`` does (gradients reach the
    factors in their own dtype).
    """
    x, u, v, bias = autocast_operands(x, u, v, bias)
    check_lowrank_args(x, u, v, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])  # not -1: in_features may be 0
    y, _ = _lowrank_fwd(x2, u, v, bias, needs_grad(x, u, v, bias))
    return y.reshape(*lead, u.shape[0])


__all__ = ["lowrank_linear"]
