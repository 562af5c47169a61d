"""Public functional ops, registered with ``torch.library`` (autograd + fake tensors)."""

from .lowrank import lowrank_linear
from .lowrank_act import lowrank_act_linear
from .monarch import block_lowrank_linear, monarch_linear
from .sparse24 import dense_sparse_linear, sparse24_linear, ste_24

__all__ = [
    "lowrank_linear", "lowrank_act_linear", "monarch_linear", "block_lowrank_linear",
    "sparse24_linear", "dense_sparse_linear", "ste_24",
]
