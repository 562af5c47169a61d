"""``nn.Module`` stand-ins for ``nn.Linear``, each with ``from_linear`` and ``to_linear``."""

from .base import FactorizedLinear
from .lowrank import LowRankLinear
from .monarch import BlockLowRankLinear, MonarchLinear

__all__ = ["FactorizedLinear", "LowRankLinear", "MonarchLinear", "BlockLowRankLinear"]
