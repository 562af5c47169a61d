"""Public functional ops, registered with ``torch.library`` (autograd + fake tensors)."""

from .lowrank import lowrank_linear
from .monarch import block_lowrank_linear, monarch_linear

__all__ = ["lowrank_linear", "monarch_linear", "block_lowrank_linear"]
