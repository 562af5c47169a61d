"""Algorithms that turn a dense weight into factors."""

from .monarch import block_lowrank, monarch_project, monarch_rank_for_ratio
from .svd import rank_for_ratio, resolve_rank, svd_factors, weighted_svd_factors

__all__ = [
    "rank_for_ratio", "resolve_rank", "svd_factors", "weighted_svd_factors",
    "monarch_project", "block_lowrank", "monarch_rank_for_ratio",
]
