"""Weight formats on the library side: the containers the ops take and the layers store, with
their packing and conversions (device code for them lives in ``fastfactor.kernels``).

* :mod:`fastfactor.formats.sparse24`: the packed 2:4 weight (:class:`Sparse24Weight`), packing,
  2:4 pruning and PyTorch's semi-structured layout.
"""

from .sparse24 import Sparse24Weight, mask_24, pack_24, prune_24

__all__ = ["Sparse24Weight", "pack_24", "prune_24", "mask_24"]
