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
