"""Algorithms that turn a dense weight (and, for the data-aware ones, calibration statistics) into factors.

* :mod:`~fastfactor.factorize.svd`: low-rank (truncated / row-weighted SVD, ``rank_for_ratio``);
* :mod:`~fastfactor.factorize.monarch`: Monarch and block-wise low-rank projection (``monarch_rank_for_ratio``);
* :mod:`~fastfactor.factorize.sparse24`: 2:4 pruning (from :mod:`fastfactor.formats.sparse24`) and the
  dense-sparse ``W ≈ D·S`` factorization (``dense_sparse_rank_for_ratio``);
* :mod:`~fastfactor.factorize.data_aware`: Fisher-weighted SVD, activation-aware (whitened) SVD and
  2:4 importance scores, from the statistics of :mod:`fastfactor.compress.calibration`;
* :mod:`~fastfactor.factorize.autoencoder`: autoencoder bottlenecks fitted on a layer's outputs
  (linear and nonlinear forms; Banaei et al., EACL 2023), from calibration inputs;
* :mod:`~fastfactor.factorize.rank`: the one ``rank=`` / ``ratio=`` contract of every ``from_linear``.
"""

from .data_aware import fisher_svd_factors, sparse24_scores, whitened_svd_factors
from .monarch import block_lowrank, monarch_project, monarch_rank_for_ratio
from .rank import check_rank_or_ratio
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
    "dense_sparse_num_params", "sparse24_num_params", "fisher_svd_factors", "whitened_svd_factors",
    "sparse24_scores", "check_rank_or_ratio",
]
