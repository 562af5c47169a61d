"""Run-to-run reproducibility: ``fastfactor.set_deterministic(True)``.

What can make a fastfactor op differ between two runs on the same inputs
-------------------------------------------------------------------------
* **Float atomics** (``tl.atomic_add`` into a shared accumulator): the order in which programs add
  is decided by the scheduler, so the rounding differs run to run. None of our kernels use them:
  every output tile is owned by one program that loops over the whole reduction, or, where a
  reduction is split over programs (the low-rank split-K), each writes its partial to a workspace
  and one program sums them in a fixed order (see the "Design" sections of ``kernels/lowrank.py``
  and ``kernels/monarch.py``); the split count is a function of the shape and the SM count;
  ``tests/test_determinism.py`` greps ``kernels/*.py`` so that a new kernel adding one fails there.
* **Autotuning**: ``triton.autotune`` times every config on the first call of each key and keeps the
  fastest. Different configs (``BLOCK_K``, the split of ``N`` over programs) sum the reduction in a
  different order, so two *processes* can pick different configs when their timings are close and
  then round differently. Within one process the chosen config is cached per key, so repeated calls
  are bitwise identical.
* **Shape-dependent path choice** (fused chain vs two GEMMs vs cuBLAS) and per-shape configs: a
  pure function of the shape (and of ``FASTFACTOR_*_PATH``), hence identical across runs.
* **PyTorch's own kernels** (the CPU reference path, ``nn.Linear`` layers next to ours, cuBLAS):
  governed by ``torch.use_deterministic_algorithms``, which :func:`set_deterministic` also sets
  unless told not to (``CUBLAS_WORKSPACE_CONFIG`` must then be set on CUDA, see below).

So the switch this module provides is a flag the kernel launchers query, :func:`is_deterministic`;
when it is on, a launcher should run one fixed config instead of the autotuner
(:func:`fixed_config` gives the conventional choice: the first entry of the autotune space that
fits). It is on when :func:`set_deterministic` turned it on **or** when the user turned on
``torch.use_deterministic_algorithms(True)`` (we respect PyTorch's switch too).

Usage::

    import fastfactor
    fastfactor.set_deterministic(True)       # fastfactor kernels + torch.use_deterministic_algorithms
    with fastfactor.determinism.deterministic():  # or scoped
        ...
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import torch

from .kernels._config import DETERMINISTIC as _STATE  # the flag the kernel launchers read


def set_deterministic(enabled: bool = True, *, torch_algorithms: bool = True, warn_only: bool = False) -> None:
    """Turn fastfactor's deterministic mode on or off.

    Args:
        enabled: the flag :func:`is_deterministic` reports to the kernel launchers.
        torch_algorithms: also set PyTorch's switch,
            ``torch.use_deterministic_algorithms(enabled, warn_only=warn_only)`` (default); pass
            ``False`` to leave PyTorch's switch as it is. On CUDA, PyTorch's deterministic mode
            needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` before the first cuBLAS call; we set it when
            it is missing (too late if cuBLAS already ran in this process).
        warn_only: forwarded to ``torch.use_deterministic_algorithms``.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__} {enabled!r}")
    if not isinstance(torch_algorithms, bool):
        raise TypeError(
            f"torch_algorithms: expected a bool, got {type(torch_algorithms).__name__} {torch_algorithms!r}"
        )
    _STATE["flag"] = enabled
    if torch_algorithms:
        if enabled:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _torch_flag() -> bool:
    return bool(torch.are_deterministic_algorithms_enabled())


def is_deterministic() -> bool:
    """Whether kernel launchers must avoid run-to-run variation (fixed configs, no atomics).

    True when :func:`set_deterministic` turned fastfactor's flag on, or when PyTorch's
    ``torch.use_deterministic_algorithms(True)`` is in effect.
    """
    return _STATE["flag"] or _torch_flag()


@contextlib.contextmanager
def deterministic(enabled: bool = True, *, torch_algorithms: bool = True) -> Iterator[None]:
    """Scoped :func:`set_deterministic`; restores both flags on exit."""
    old_flag = _STATE["flag"]
    old_torch = _torch_flag()
    old_warn = bool(torch.is_deterministic_algorithms_warn_only_enabled())
    set_deterministic(enabled, torch_algorithms=torch_algorithms)
    try:
        yield
    finally:
        _STATE["flag"] = old_flag
        torch.use_deterministic_algorithms(old_torch, warn_only=old_warn)


def fixed_config(space: Sequence[dict], fits=None, prefer: int = 1) -> dict:
    """The config a launcher runs instead of autotuning when :func:`is_deterministic` is on.

    ``space`` is a kernel family's autotune space (list of dicts); its entry 0 is the small
    interpreter config, so the conventional deterministic choice is entry ``prefer`` (a
    general-purpose GPU tile) when it exists and ``fits(cfg)`` accepts it, else the first entry
    that fits. The result is a fresh dict (``num_warps``/``num_stages`` included).
    """
    if not space:
        raise ValueError("space: expected a non-empty autotune space, got an empty one")
    order = list(range(len(space)))
    if 0 <= prefer < len(space):
        order.remove(prefer)
        order.insert(0, prefer)
    for i in order:
        if fits is None or fits(space[i]):
            return dict(space[i])
    raise ValueError(f"space: no config fits (tried {len(space)})")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's ``random``, NumPy (if installed) and torch (CPU and every CUDA device);
    returns a ``torch.Generator`` seeded with ``seed`` for explicit use."""
    import random

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__} {seed!r}")
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


__all__ = ["set_deterministic", "is_deterministic", "deterministic", "fixed_config", "seed_everything"]
