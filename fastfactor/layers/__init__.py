"""``nn.Module`` stand-ins for ``nn.Linear``, each with ``from_linear`` and ``to_linear``."""

from .base import FactorizedLinear
from .bottleneck import BottleneckLinear
from .lowrank import LowRankLinear
from .monarch import BlockLowRankLinear, MonarchLinear
from .sparse24 import DenseSparseLinear, Sparse24Linear
from .joint import JointLowRankLinear, JointMemberLinear, link_joint

__all__ = [
    "FactorizedLinear", "LowRankLinear", "MonarchLinear", "BlockLowRankLinear",
    "Sparse24Linear", "DenseSparseLinear", "BottleneckLinear", "JointLowRankLinear", "JointMemberLinear", "link_joint",
]
