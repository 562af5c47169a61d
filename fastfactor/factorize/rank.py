"""The one ``rank`` / ``ratio`` contract of every ``from_linear``.

Every factorized layer's ``from_linear(linear, *, rank=..., ratio=...)`` takes exactly one of the
two: ``rank``, the family's own rank parameter, or ``ratio``, the fraction of the dense layer's
``in·out`` weight parameters that the factors keep, turned into a rank by the family's
``rank_for_ratio`` (in this package, one per family):

    family          rank_for_ratio                                     module
    lowrank         r = floor(ratio·in·out / (in + out)), >= 1         factorize.svd
    monarch,        r = floor(ratio·in·out / (b·(Kp + Np))),           factorize.monarch
    block_lowrank     clamped to [1, min(kb, nb)]
    dense_sparse    largest r with out·r + r·in/2 + meta <= ratio·in·out factorize.sparse24
    sparse24        none: the 2:4 pattern fixes the kept fraction

Giving both, or neither, is the same ``ValueError`` everywhere (:func:`check_rank_or_ratio`).
"""

from __future__ import annotations

from typing import Callable, Optional

from .. import _validate as V


def check_rank_or_ratio(rank, ratio) -> None:
    """``ValueError`` unless exactly one of ``rank`` and ``ratio`` is given (not ``None``)."""
    if (rank is None) == (ratio is None):
        raise ValueError(f"rank/ratio: expected exactly one of them, got rank={rank!r}, ratio={ratio!r}")


def resolve(
    rank: Optional[int],
    ratio: Optional[float],
    rank_for_ratio: Callable[[float], int],
    max_rank: int,
) -> int:
    """``rank``, or ``rank_for_ratio(ratio)``: exactly one given; checked to lie in ``[1, max_rank]``."""
    check_rank_or_ratio(rank, ratio)
    r = rank_for_ratio(ratio) if rank is None else rank
    V.check_positive_int("rank", r, minimum=1, maximum=max_rank)
    return r
