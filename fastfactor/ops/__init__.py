"""Public functional ops, registered with ``torch.library`` (autograd + fake tensors)."""

from .lowrank import lowrank_linear

__all__ = ["lowrank_linear"]
