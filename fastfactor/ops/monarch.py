"""``monarch_linear`` and ``block_lowrank_linear``: the public block-diagonal ops, registered with
``torch.library``.

Both ops share the factor layout of :mod:`fastfactor.kernels.monarch` (read its docstring for the
exact block layout and permutations)::

    x  : (..., K)          in_features K
    w1 : (b, b·r, kb)      kb = ceil(K / b)
    w2 : (b, nb, b·r)      nb = ceil(N / b)
    bias : (N,) or None    out_features N
    -> (..., N)

They differ only in the output permutation: Monarch writes output block ``l`` to the strided rows
``s·b + l``; block-wise low-rank to the contiguous rows ``l·nb + s``. Since ``nb`` does not
determine ``N`` when ``b`` does not divide it, ``out_features`` is a keyword argument, defaulting to
``bias.shape[0]`` when there is a bias and to ``b·nb`` otherwise.

Two custom ops carry the work, so ``torch.compile(fullgraph=True)`` sees one opaque node per
direction and CUDA graphs can capture them:

* ``fastfactor::monarch_fwd(x, w1, w2, bias, out_features, strided, save_h) -> (y, h)``: ``h`` is
  the stage-1 intermediate ``(M, b·b·r)`` (layout ``[m, l, j, t]``) when ``save_h`` (training),
  else an empty ``(0,)`` tensor; its dtype is ``kernels.monarch.intermediate_dtype(x.dtype)``:
  fp32 for fp16 inputs (``h`` can exceed fp16's range where ``y`` does not), else ``x``'s;
* ``fastfactor::monarch_bwd(g, x, w1, w2, h, strided, has_bias, need_x, need_w1, need_w2)
  -> (dx, dw1, dw2, db)``: gradients not asked for come back as empty ``(0,)`` tensors.

Dispatch inside: CUDA → Triton kernels; CPU → the PyTorch reference (the bmm formulation), or the
Triton interpreter (see ``fastfactor.kernels._config``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from ..kernels import monarch as K
from ..kernels._config import acc_dtype, use_triton
from ._common import empty as _empty
from ._common import autocast_operands, fake_grads, grads_or_empty, needs_grad, no_autocast


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastfactor::monarch_fwd", mutates_args=())
def _monarch_fwd(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    strided: bool,
    save_h: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        with no_autocast(x):
            y, h = K.monarch_fwd(x, w1, w2, bias, out_features, strided, save_h)
        return y, (h if h is not None else _empty(x))
    with torch.no_grad(), no_autocast(x):
        acc = acc_dtype(x.dtype)
        y, h = K.monarch_bmm(x, w1, w2, bias, out_features, strided, acc_dtype=acc, return_h=True)
    return y.contiguous(), (h if save_h else _empty(x))


@_monarch_fwd.register_fake
def _(x, w1, w2, bias, out_features, strided, save_h):
    b, br = w1.shape[0], w1.shape[1]
    y = x.new_empty((x.shape[0], out_features))
    h = (
        x.new_empty((x.shape[0], b * br), dtype=K.intermediate_dtype(x.dtype))
        if save_h else x.new_empty((0,))
    )
    return y, h


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastfactor::monarch_bwd", mutates_args=())
def _monarch_bwd(
    g: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    h: torch.Tensor,
    strided: bool,
    has_bias: bool,
    need_x: bool,
    need_w1: bool,
    need_w2: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    saved_h = h if h.ndim == 2 else None
    with no_autocast(g):
        if use_triton(g):
            dx, dw1, dw2, db = K.monarch_bwd(
                g, x, w1, w2, saved_h, strided, has_bias, need_x, need_w1, need_w2
            )
        else:
            dx, dw1, dw2, db = K.monarch_bwd_ref(
                g, x, w1, w2, saved_h, strided, need_x, need_w1, need_w2, has_bias
            )
        dx = dx.contiguous() if dx is not None else None
    return grads_or_empty(g, dx, dw1, dw2, db)


@_monarch_bwd.register_fake
def _(g, x, w1, w2, h, strided, has_bias, need_x, need_w1, need_w2):
    return fake_grads(g, (need_x, x), (need_w1, w1), (need_w2, w2), (has_bias, (g.shape[1],)))


def _setup_context(ctx, inputs, output):
    x, w1, w2, bias, out_features, strided, save_h = inputs
    _, h = output
    ctx.has_bias = bias is not None
    ctx.strided = strided
    # the saved intermediate h is an output of the op but never differentiated: no zero-filled
    # gradient for it (an M x b·b·r memset launch per backward otherwise)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w1, w2, h)


def _backward(ctx, g, _gh):
    if g is None:
        return None, None, None, None, None, None, None
    x, w1, w2, h = ctx.saved_tensors
    need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
    need_b = ctx.has_bias and ctx.needs_input_grad[3]
    dx, dw1, dw2, db = _monarch_bwd(
        g.contiguous(), x, w1, w2, h, ctx.strided, need_b, need_x, need_w1, need_w2
    )
    return (
        dx if need_x else None,
        dw1 if need_w1 else None,
        dw2 if need_w2 else None,
        db if need_b else None,
        None,
        None,
        None,
    )


torch.library.register_autograd("fastfactor::monarch_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------

def check_monarch_args(x, w1, w2, bias, out_features, op: str = "monarch_linear") -> int:
    """Validate the arguments of the block-diagonal ops; returns ``out_features``."""
    V.check_tensor("x", x, min_ndim=1)
    V.check_tensor("w1", w1, ndim=3)
    V.check_tensor("w2", w2, ndim=3)
    V.check_same("x", x, w1=w1, w2=w2, bias=bias)
    if bias is not None:
        V.check_tensor("bias", bias, ndim=1)
    b, br, kb = w1.shape
    if b < 1 or br < b or br % b != 0:
        raise ValueError(
            f"w1: expected shape (nblocks, nblocks·rank, in_block) with nblocks >= 1 and "
            f"nblocks·rank a positive multiple of nblocks, got shape {tuple(w1.shape)}"
        )
    if kb < 1:
        raise ValueError(f"w1: expected in_block = w1.shape[2] >= 1, got shape {tuple(w1.shape)}")
    V.check_dim("w2", w2, 0, b, "nblocks = w1.shape[0]")
    V.check_dim("w2", w2, 2, br, "nblocks·rank = w1.shape[1]")
    nb = w2.shape[1]
    if nb < 1:
        raise ValueError(f"w2: expected out_block = w2.shape[1] >= 1, got shape {tuple(w2.shape)}")
    k = x.shape[-1]
    if K.cdiv(k, b) != kb:
        raise ValueError(
            f"x: expected in_features with ceil(in_features / nblocks) = w1.shape[2] = {kb} "
            f"(nblocks = {b}), got in_features = x.shape[-1] = {k}"
        )
    if out_features is None:
        out_features = bias.shape[0] if bias is not None else b * nb
    elif isinstance(out_features, bool) or not isinstance(out_features, int):
        raise TypeError(
            f"out_features: expected an int or None, got {type(out_features).__name__} {out_features!r}"
        )
    if K.cdiv(out_features, b) != nb:
        raise ValueError(
            f"out_features: expected ceil(out_features / nblocks) = w2.shape[1] = {nb} "
            f"(nblocks = {b}), got out_features = {out_features}"
        )
    if bias is not None:
        V.check_dim("bias", bias, 0, out_features, "out_features")
    if x.is_cuda and x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(
            f"x: expected float32, float16 or bfloat16 on CUDA, got {str(x.dtype).replace('torch.', '')}"
        )
    return out_features


def _block_linear(x, w1, w2, bias, out_features, strided, op):
    x, w1, w2, bias = autocast_operands(x, w1, w2, bias)  # nn.Linear's autocast semantics
    n = check_monarch_args(x, w1, w2, bias, out_features, op)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y, _ = _monarch_fwd(x2, w1, w2, bias, n, strided, needs_grad(x, w1, w2, bias))
    return y.reshape(*lead, n)


def monarch_linear(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    out_features: Optional[int] = None,
) -> torch.Tensor:
    """Monarch linear layer ``y = P₂·L·P₁·R·x + b`` (rank-``r`` strided sub-blocks).

    Args:
        x: ``(..., K)`` input, any leading dims and strides.
        w1: ``(b, b·r, kb)`` the block-diagonal ``R``, ``kb = ceil(K / b)``.
        w2: ``(b, nb, b·r)`` the block-diagonal ``L``, ``nb = ceil(N / b)``.
        bias: ``(N,)`` or None.
        out_features: ``N``; defaults to ``bias.shape[0]``, else ``b·nb``.

    Returns:
        ``(..., N)`` in ``x``'s dtype, ``y[m, s·b + l] = Σ_{j,t} w2[l, s, j·r+t]·h[m, j, l, t]``
        with ``h[m, j, l, t] = Σ_c w1[j, l·r+t, c]·x[m, j·kb + c]``.

    CUDA tensors run the fused Triton kernel (see ``fastfactor.kernels.monarch``); CPU tensors the
    PyTorch reference. Inside a ``torch.autocast`` region for ``x``'s device every floating operand
    is cast to the region's dtype first, as ``nn.Linear`` does.
    """
    return _block_linear(x, w1, w2, bias, out_features, True, "monarch_linear")


def block_lowrank_linear(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    out_features: Optional[int] = None,
) -> torch.Tensor:
    """Block-wise low-rank linear layer: the ``b × b`` grid of contiguous ``(nb × kb)`` blocks of
    ``W``, block ``(l, j)`` equal to ``w2[l, :, j·r:(j+1)·r] · w1[j, l·r:(l+1)·r, :]``.

    Same arguments and factor shapes as :func:`monarch_linear`; output row ``l·nb + s`` instead of
    ``s·b + l``.
    """
    return _block_linear(x, w1, w2, bias, out_features, False, "block_lowrank_linear")


__all__ = ["monarch_linear", "block_lowrank_linear"]
