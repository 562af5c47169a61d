"""Nonlinear low-rank bottleneck: ``y = σ(x·Vᵀ + c)·Uᵀ + b`` on the low-rank kernels.

The nonlinear form of the autoencoder method (Banaei et al., EACL 2023): an encoder folded into
the weight (``V = E·W``), an elementwise activation ``σ`` on the rank-r intermediate, a decoder
``U = D``. Shapes: ``x (M, K)``, ``v (R, K)``, ``u (N, R)``, ``c (R,)`` (intermediate bias, or
None), ``b (N,)`` (or None), ``y (M, N)``; the pre-activation ``h = x·Vᵀ + c`` is ``(M, R)``.

Backward (``g = dL/dy``, ``a = σ(h)``)::

    da = g·U            (M, R)
    dh = da ⊙ σ'(h)     (M, R)
    dx = dh·V           (M, K)
    dU = gᵀ·a           (N, R)
    dV = dhᵀ·x          (R, K)
    dc = Σ_m dh[m, :]   (R,)
    db = Σ_m g[m, :]    (N,)

Paths (the same choice as :func:`kernels.lowrank.choose_path`):

* ``'fused'``: the chain kernel with ``ACT``/``HAS_CB`` (forward: ``h`` accumulated in fp32
  registers, ``c`` added, ``h`` rounded and stored when saved, ``σ(h)`` multiplied into the
  output tiles; ``h`` and ``σ(h)`` never go through memory at inference) and ``GATE`` (backward:
  ``dh = (g·U) ⊙ σ'(h)`` in registers, then ``dx = dh·V``, ``dh`` stored for ``dV``);
* ``'two_gemm'`` / ``'torch'``: ``h`` from the first product with ``c`` in its epilogue (our GEMM's
  bias, or ``addmm``), ``σ`` elementwise in PyTorch, the second product; the same math.

Rounding as the linear op (``kernels.lowrank``): ``h`` is rounded to the intermediate dtype
(fp32 for fp16 inputs, else the input's), ``σ`` is computed in fp32 from that rounded ``h`` and
rounded again to the intermediate dtype before the second product. ``σ'`` reads the saved
(rounded) ``h``. ``h`` is what training saves: ``σ'`` of gelu / silu cannot be recovered from
``σ(h)``.

Activations (:data:`ACTIVATIONS`): ``identity`` (0: ``c`` only), ``relu`` (1), ``gelu``
(2, tanh approximation: ``torch.nn.functional.gelu(approximate="tanh")``), ``silu`` (3),
``tanh`` (4). The code is the chain kernel's ``ACT`` constexpr.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._config import acc_dtype, num_sms
from . import lowrank as L

#: activation name -> the chain kernel's ACT code
ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3, "tanh": 4}

_K = math.sqrt(2.0 / math.pi)


def act_code(act: str) -> int:
    """The ``ACT`` code of an activation name (``ValueError`` naming ``act`` otherwise)."""
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ValueError(f"act: expected one of {list(ACTIVATIONS)}, got {act!r}")
    return ACTIVATIONS[act]


def act_fwd(h: torch.Tensor, act: str) -> torch.Tensor:
    """``σ(h)`` in ``h``'s dtype (the formulas of the kernel's ``_act_fwd``)."""
    if act == "identity":
        return h
    if act == "relu":
        return torch.relu(h)
    if act == "gelu":
        return 0.5 * h * (1.0 + torch.tanh(_K * (h + 0.044715 * h * h * h)))
    if act == "silu":
        return h * torch.sigmoid(h)
    if act == "tanh":
        return torch.tanh(h)
    raise ValueError(f"act: expected one of {list(ACTIVATIONS)}, got {act!r}")


def act_grad(h: torch.Tensor, act: str) -> torch.Tensor:
    """``σ'(h)`` in ``h``'s dtype."""
    if act == "identity":
        return torch.ones_like(h)
    if act == "relu":
        return (h > 0).to(h.dtype)
    if act == "gelu":
        th = torch.tanh(_K * (h + 0.044715 * h * h * h))
        return 0.5 * (1.0 + th) + 0.5 * h * (1.0 - th * th) * _K * (1.0 + 3 * 0.044715 * h * h)
    if act == "silu":
        s = torch.sigmoid(h)
        return s * (1.0 + h * (1.0 - s))
    if act == "tanh":
        th = torch.tanh(h)
        return 1.0 - th * th
    raise ValueError(f"act: expected one of {list(ACTIVATIONS)}, got {act!r}")


# ============================================================================================
# Reference
# ============================================================================================

def lowrank_act_ref(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    cb: Optional[torch.Tensor] = None,
    act: str = "relu",
    return_h: bool = False,
):
    """Pure-PyTorch ``y = σ(x·Vᵀ + c)·Uᵀ + b``, fp32 accumulation (fp64 stays fp64), the kernels'
    rounding. x (..., K), v (R, K), u (N, R), cb (R,) or None, bias (N,) or None -> y (..., N) in
    x's dtype, or with ``return_h`` ``(y, h)`` with ``h`` the pre-activation in
    :func:`kernels.lowrank.intermediate_dtype` (what training saves)."""
    acc = acc_dtype(x.dtype)
    inter = L.intermediate_dtype(x.dtype)
    h = torch.matmul(x.to(acc), v.to(acc).t())
    if cb is not None:
        h = h + cb.to(acc)
    h = h.to(inter)
    a = act_fwd(h.to(acc), act).to(inter).to(acc)
    y = torch.matmul(a, u.to(acc).t())
    if bias is not None:
        y = y + bias.to(acc)
    if return_h:
        return y.to(x.dtype), h
    return y.to(x.dtype)


def lowrank_act_bwd_ref(
    g: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    cb: Optional[torch.Tensor],
    h: Optional[torch.Tensor],
    act: str,
    has_bias: bool,
    need_x: bool = True,
    need_u: bool = True,
    need_v: bool = True,
    need_cb: bool = True,
):
    """Backward of :func:`lowrank_act_ref`: ``(dx, du, dv, dcb, db)``, ``None`` where not asked
    for (``dcb`` also None without ``cb``). ``h (M, R)``: the saved pre-activation, or None
    (recomputed). The intermediates ``dh``, ``σ(h)`` are rounded as the kernels round them."""
    acc = acc_dtype(x.dtype)
    inter = L.intermediate_dtype(x.dtype)
    g32, x32, u32, v32 = g.to(acc), x.to(acc), u.to(acc), v.to(acc)
    if h is None:
        h = x32 @ v32.t()
        if cb is not None:
            h = h + cb.to(acc)
        h = h.to(inter)
    h32 = h.to(acc)
    dh = ((g32 @ u32) * act_grad(h32, act)).to(inter).to(acc)
    dx = (dh @ v32).to(x.dtype) if need_x else None
    du = (g32.t() @ act_fwd(h32, act).to(inter).to(acc)).to(u.dtype) if need_u else None
    dv = (dh.t() @ x32).to(v.dtype) if need_v else None
    dcb = dh.sum(0).to(cb.dtype) if (need_cb and cb is not None) else None
    db = g32.sum(0).to(g.dtype) if has_bias else None
    return dx, du, dv, dcb, db


# ============================================================================================
# Launchers (the kernels of kernels/lowrank.py)
# ============================================================================================

def lowrank_act_fwd(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    cb: Optional[torch.Tensor],
    act: str,
    save_h: bool,
    path: Optional[str] = None,
):
    """Forward launcher: ``(y, h or None)`` for ``x (M, K)``, ``u (N, R)``, ``v (R, K)``."""
    M, K = x.shape
    N, R = u.shape
    code = act_code(act)
    path = path or L.choose_path(M, K, N, R, x.dtype, bias is not None, num_sms(x.device), decode=False)
    inter = L.intermediate_dtype(x.dtype)
    if min(M, K, N, R) == 0:  # empty products: the reference's answer, no kernel
        y, h = lowrank_act_ref(x, u, v, bias, cb, act, return_h=True)
        return y, (h if save_h else None)
    if path == "fused":
        return L.chain(x, v, u, bias, store_t=save_h, act=code, cb=cb)
    if path == "torch" and inter == x.dtype:
        h = L._mm(x, v.t(), cb, inter)
    else:
        h = L.gemm(x, v.t(), bias=cb, out_dtype=inter)
    a = act_fwd(h.to(acc_dtype(x.dtype)), act).to(inter)
    if path == "torch" and inter == x.dtype:
        y = L._mm(a, u.t(), bias, x.dtype)
    else:
        y = L.gemm(a, u.t(), bias=bias, out_dtype=x.dtype)
    return y, (h if save_h else None)


def lowrank_act_bwd(
    g: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    cb: Optional[torch.Tensor],
    h: Optional[torch.Tensor],
    act: str,
    has_bias: bool,
    need_x: bool = True,
    need_u: bool = True,
    need_v: bool = True,
    need_cb: bool = True,
    path: Optional[str] = None,
):
    """Backward launcher: ``(dx, du, dv, dcb, db)`` (``None`` where not needed). ``h`` the saved
    pre-activation ``(M, R)`` or None (recomputed with the forward's first product)."""
    M, K = x.shape
    N, R = u.shape
    code = act_code(act)
    need_cb = need_cb and cb is not None
    if min(M, K, N, R) == 0:
        return lowrank_act_bwd_ref(g, x, u, v, cb, h, act, has_bias, need_x, need_u, need_v, need_cb)
    path = path or L.choose_bwd_path(M, K, N, R, g.dtype, has_bias, need_x, need_u, need_v or need_cb,
                                     num_sms(g.device), decode=False)   # no decode kernel with σ here
    acc = acc_dtype(g.dtype)
    inter = L.intermediate_dtype(g.dtype)
    use_mm = path == "torch" and inter == g.dtype
    mm = (lambda a, b, out_dtype, bias=None: L._mm(a, b, bias, out_dtype)) if use_mm else (
        lambda a, b, out_dtype, bias=None: L.gemm(a, b, bias=bias, out_dtype=out_dtype))
    if h is None:
        h = mm(x, v.t(), inter, cb)
    dx = du = dv = dcb = db = None
    dh = None
    if need_x and path == "fused":
        dx, dh = L.chain(g, u.t(), v.t(), None, store_t=need_v or need_cb, act=code, gate=h)  # dh = (g·U)⊙σ'(h)
    elif need_x or need_v or need_cb:
        dh = ((mm(g, u, acc)) * act_grad(h.to(acc), act)).to(inter)
        if need_x:
            dx = mm(dh, v, x.dtype)
    if need_u:
        a = act_fwd(h.to(acc), act).to(inter)
        du = mm(g.t(), a, u.dtype)                                     # dU = gᵀ·σ(h)
    if need_v:
        dv = mm(dh.t(), x, v.dtype)                                    # dV = dhᵀ·x
    if need_cb:
        dcb = dh.to(acc).sum(0).to(cb.dtype) if use_mm else L.row_sums(dh.t()).to(cb.dtype)  # dc = Σ_m dh
    if has_bias:
        db = (g.sum(0, dtype=acc) if use_mm else L.row_sums(g.t())).to(g.dtype)             # db = Σ_m g
    return dx, du, dv, dcb, db
