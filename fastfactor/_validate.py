"""Argument checks shared by every op and module.

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, device or
value) with a message that names the argument, what was expected and what came.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The reference paths also accept float64 (used by the float64 references and gradcheck).
REF_DTYPES = FLOAT_DTYPES + (torch.float64,)


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    min_ndim: Optional[int] = None,
    dtypes: Sequence[torch.dtype] = REF_DTYPES,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(
            f"{name}: expected a {ndim}-D tensor, got {t.ndim}-D with shape {tuple(t.shape)}"
        )
    if min_ndim is not None and t.ndim < min_ndim:
        raise ValueError(
            f"{name}: expected at least {min_ndim} dimension(s), got shape {tuple(t.shape)}"
        )
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name}: expected size {expected} in dimension {dim} ({what}), "
            f"got shape {tuple(t.shape)}"
        )


def check_same(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """All tensors given share ``ref``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(
                f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}"
            )
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{name}: expected dtype {str(ref.dtype).replace('torch.', '')} (the dtype of "
                f"{ref_name}), got {str(t.dtype).replace('torch.', '')}"
            )


def check_positive_int(name: str, value, *, minimum: int = 1, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name}: expected an int {bound}, got {value}")
    return value


def check_ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float in (0, 1], got {type(value).__name__} {value!r}")
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name}: expected a float in (0, 1] (fraction of weights kept), got {value}")
    return value


def check_finite(name: str, t: torch.Tensor, where: str = "") -> None:
    """Factorizations refuse NaN/Inf weights (they would silently poison every factor)."""
    if not torch.isfinite(t).all():
        n_bad = int((~torch.isfinite(t)).sum())
        loc = f" in {where}" if where else ""
        raise ValueError(f"{name}{loc}: expected finite values, found {n_bad} NaN/Inf entries")
