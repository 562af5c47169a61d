"""Algorithms that turn a dense weight into factors."""

from .svd import rank_for_ratio, resolve_rank, svd_factors, weighted_svd_factors

__all__ = ["rank_for_ratio", "resolve_rank", "svd_factors", "weighted_svd_factors"]
