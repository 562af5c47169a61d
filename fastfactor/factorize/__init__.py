"""Algorithms that turn a dense weight into factors."""

from .monarch import block_lowrank, monarch_project, monarch_rank_for_ratio
from .sparse24 import (
    dense_sparse_factors,
    dense_sparse_num_params,
    dense_sparse_rank_for_ratio,
    mask_24,
    pack_24,
    prune_24,
    sparse24_num_params,
)
from .svd import (
    choose_svd, randomized_svd, rank_for_ratio, resolve_rank, svd_factors, truncated_svd, weighted_svd_factors,
)

__all__ = [
    "rank_for_ratio", "resolve_rank", "svd_factors", "weighted_svd_factors", "truncated_svd", "randomized_svd",
    "choose_svd",
    "monarch_project", "block_lowrank", "monarch_rank_for_ratio",
    "prune_24", "mask_24", "pack_24", "dense_sparse_factors", "dense_sparse_rank_for_ratio",
    "dense_sparse_num_params", "sparse24_num_params",
]
