"""What the registered ops of every family share.

Custom ops cannot return ``None``, so a gradient that was not asked for comes back as an empty
``(0,)`` tensor; the autograd wrappers turn those back into ``None``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch


def empty(like: torch.Tensor) -> torch.Tensor:
    """The ``(0,)`` placeholder for an output that was not asked for."""
    return like.new_empty((0,))


def grads_or_empty(like: torch.Tensor, *grads: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The gradients, each ``None`` replaced by its own empty placeholder (never an alias)."""
    return tuple(g if g is not None else empty(like) for g in grads)


def fake_grads(
    like: torch.Tensor, *wanted: tuple[bool, Union[torch.Tensor, tuple]]
) -> tuple[torch.Tensor, ...]:
    """Fake-tensor outputs of a backward op: for each ``(needed, of)``, a tensor shaped like ``of``
    (a tensor: its shape and dtype; a shape tuple: ``like``'s dtype), or the empty placeholder."""
    out = []
    for needed, of in wanted:
        if not needed:
            out.append(empty(like))
        elif isinstance(of, torch.Tensor):
            out.append(of.new_empty(of.shape))
        else:
            out.append(like.new_empty(of))
    return tuple(out)


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd will ask for a gradient of any of these (training: save intermediates)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def autocast_operands(*tensors: Optional[torch.Tensor]) -> tuple:
    """``nn.Linear``'s autocast semantics for the public ops.

    Inside a ``torch.autocast(device_type, dtype=D)`` region enabled for the device of the first
    tensor given (the input ``x``), every floating-point operand that is not float64 is cast to
    ``D`` (the weights, the bias and ``x`` alike), as autocast does for ``F.linear``; outside such a
    region, or for non-tensors (left for the argument checks to refuse), nothing changes. The casts
    are ordinary differentiable ``.to`` calls, so gradients reach each parameter in its own dtype
    (an fp32 master weight gets an fp32 gradient), as with ``nn.Linear``. Integer tensors (the 2:4
    metadata) are never cast.
    """
    x = tensors[0] if tensors else None
    if not isinstance(x, torch.Tensor):
        return tensors
    dev = x.device.type
    if dev not in ("cpu", "cuda", "xpu", "hpu", "mps") or not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(
        t.to(dt)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (dt, torch.float64)
        else t
        for t in tensors
    )


def no_autocast(like: torch.Tensor):
    """A context in which autocast is off for ``like``'s device: the bodies of the registered ops
    run their own fp32 accumulation and must not see their internal matmuls recast to bf16/fp16."""
    return torch.autocast(like.device.type, enabled=False)
