"""``fastfactor.lowrank_act_linear``: the nonlinear low-rank bottleneck ``y = σ(x·Vᵀ + c)·Uᵀ + b``,
registered with ``torch.library`` like :func:`fastfactor.lowrank_linear`.

* ``fastfactor::lowrank_act_fwd(x, u, v, bias, cb, act, save_h) -> (y, h)``: ``h = x·Vᵀ + c`` the
  pre-activation when ``save_h`` (training), else an empty ``(0,)`` tensor;
* ``fastfactor::lowrank_act_bwd(g, x, u, v, cb, h, act, has_bias, need_x, need_u, need_v, need_cb)
  -> (dx, du, dv, dcb, db)``: gradients not asked for come back as empty ``(0,)`` tensors.

CUDA tensors run the chain kernel of ``kernels/lowrank.py`` with its ``ACT`` / ``HAS_CB`` /
``GATE`` constexprs (or the two-GEMM / cuBLAS paths with ``σ`` between the products, see
``kernels/lowrank_act.py``); CPU tensors run the PyTorch reference (or the Triton interpreter).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _validate as V
from ..kernels import lowrank_act as KA
from ..kernels._config import use_triton
from ._common import autocast_operands, fake_grads, grads_or_empty, needs_grad, no_autocast
from ._common import empty as _empty
from .lowrank import check_lowrank_args


@torch.library.custom_op("fastfactor::lowrank_act_fwd", mutates_args=())
def _act_fwd(
    x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], cb: Optional[torch.Tensor],
    act: str, save_h: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad(), no_autocast(x):
        if use_triton(x):
            y, h = KA.lowrank_act_fwd(x, u, v, bias, cb, act, save_h)
        else:
            y, h = KA.lowrank_act_ref(x, u, v, bias, cb, act, return_h=True)
    return y, (h if (save_h and h is not None) else _empty(x))


@_act_fwd.register_fake
def _(x, u, v, bias, cb, act, save_h):
    y = x.new_empty((x.shape[0], u.shape[0]))
    h = (x.new_empty((x.shape[0], v.shape[0]), dtype=KA.L.intermediate_dtype(x.dtype))
         if save_h else x.new_empty((0,)))
    return y, h


@torch.library.custom_op("fastfactor::lowrank_act_bwd", mutates_args=())
def _act_bwd(
    g: torch.Tensor, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, cb: Optional[torch.Tensor],
    h: torch.Tensor, act: str, has_bias: bool, need_x: bool, need_u: bool, need_v: bool, need_cb: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    saved = h if h.ndim == 2 else None
    with torch.no_grad(), no_autocast(g):
        fn = KA.lowrank_act_bwd if use_triton(g) else KA.lowrank_act_bwd_ref
        dx, du, dv, dcb, db = fn(g, x, u, v, cb, saved, act, has_bias, need_x, need_u, need_v, need_cb)
    return grads_or_empty(g, dx, du, dv, dcb, db)


@_act_bwd.register_fake
def _(g, x, u, v, cb, h, act, has_bias, need_x, need_u, need_v, need_cb):
    has_cb = need_cb and cb is not None
    return fake_grads(g, (need_x, x), (need_u, u), (need_v, v), (has_cb, cb), (has_bias, (u.shape[0],)))


def _setup_context(ctx, inputs, output):
    x, u, v, bias, cb, act, save_h = inputs
    _, h = output
    ctx.has_bias = bias is not None
    ctx.act = act
    ctx.save_for_backward(x, u, v, cb, h)


def _backward(ctx, g, _gh):
    x, u, v, cb, h = ctx.saved_tensors
    need_x, need_u, need_v, need_b, need_cb = ctx.needs_input_grad[:5]
    need_b = ctx.has_bias and need_b
    need_cb = cb is not None and need_cb
    dx, du, dv, dcb, db = _act_bwd(g, x, u, v, cb, h, ctx.act, need_b, need_x, need_u, need_v, need_cb)
    return (
        dx if need_x else None,
        du if need_u else None,
        dv if need_v else None,
        db if need_b else None,
        dcb if need_cb else None,
        None,
        None,
    )


torch.library.register_autograd("fastfactor::lowrank_act_fwd", _backward, setup_context=_setup_context)


def lowrank_act_linear(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    cb: Optional[torch.Tensor] = None,
    act: str = "relu",
) -> torch.Tensor:
    """Nonlinear low-rank layer ``y = σ(x·Vᵀ + c)·Uᵀ + b``.

    Args:
        x: ``(..., in)`` input, any leading dims and strides.
        u: ``(out, r)`` decoder (left factor).
        v: ``(r, in)`` encoder folded into the weight (right factor, ``E·W``).
        bias: ``(out,)`` or None.
        cb: ``(r,)`` bias of the intermediate, or None.
        act: ``σ``, one of ``identity``, ``relu``, ``gelu`` (tanh approximation), ``silu``, ``tanh``.

    Returns:
        ``(..., out)`` in ``x``'s dtype (fp32 accumulation inside; the intermediate rounded as in
        :func:`fastfactor.lowrank_linear`). ``act="identity"`` with ``cb=None`` is that op.
    """
    x, u, v, bias, cb = autocast_operands(x, u, v, bias, cb)
    check_lowrank_args(x, u, v, bias)
    KA.act_code(act)
    if cb is not None:
        V.check_tensor("cb", cb, ndim=1)
        V.check_same("x", x, cb=cb)
        V.check_dim("cb", cb, 0, v.shape[0], "rank = v.shape[0]")
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    y, _ = _act_fwd(x2, u, v, bias, cb, act, needs_grad(x, u, v, bias, cb))
    return y.reshape(*lead, u.shape[0])


__all__ = ["lowrank_act_linear"]
