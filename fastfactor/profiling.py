"""NVTX ranges and marks in a ``fastfactor`` domain, at near-zero cost when nobody is listening.

Backends, chosen once at import:

1. the ``nvtx`` package when it is installed (domains, colours, categories);
2. ``torch.cuda.nvtx`` when CUDA is available (no domain: the range name is prefixed
   ``fastfactor:``);
3. nothing: ranges and marks are no-ops. ``torch.cuda.nvtx`` raises on CPU-only builds, so it is
   never touched there.

Use :func:`range` as a context manager or a decorator, :func:`mark` for instant events, and
``range(name, capture=True)`` to wrap a region in ``torch.cuda.profiler.start()/stop()`` so that
``nsys profile --capture-range=cudaProfilerApi`` records only that region.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import os
from typing import Callable, Optional

import torch

DOMAIN = "fastfactor"

_nvtx = None
try:
    if os.environ.get("FASTFACTOR_NVTX", "1") != "0":
        import nvtx as _nvtx  # type: ignore
except Exception:  # noqa: BLE001 - any import failure just disables the backend
    _nvtx = None


def _torch_nvtx_ok() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def backend() -> str:
    """``'nvtx'``, ``'torch'`` or ``'none'``: where ranges go."""
    if _nvtx is not None:
        return "nvtx"
    if _torch_nvtx_ok():
        return "torch"
    return "none"


_BACKEND = backend()


def push(name: str, color: Optional[str] = None) -> None:
    if _BACKEND == "nvtx":
        _nvtx.push_range(message=name, domain=DOMAIN, color=color)
    elif _BACKEND == "torch":
        torch.cuda.nvtx.range_push(f"{DOMAIN}:{name}")


def pop() -> None:
    if _BACKEND == "nvtx":
        _nvtx.pop_range(domain=DOMAIN)
    elif _BACKEND == "torch":
        torch.cuda.nvtx.range_pop()


def mark(name: str, color: Optional[str] = None) -> None:
    """An instant event on the timeline."""
    if _BACKEND == "nvtx":
        _nvtx.mark(message=name, domain=DOMAIN, color=color)
    elif _BACKEND == "torch":
        torch.cuda.nvtx.mark(f"{DOMAIN}:{name}")


class range(contextlib.ContextDecorator):  # noqa: A001 - mirrors nvtx.annotate / torch.cuda.nvtx.range
    """``with profiling.range("stage 3"):`` or ``@profiling.range("factorize")``.

    capture: also call ``torch.cuda.profiler.start()/stop()`` around the region (CUDA only), to
             bound an ``nsys --capture-range=cudaProfilerApi`` recording to it.
    """

    def __init__(self, name: str, color: Optional[str] = None, capture: bool = False):
        self.name = name
        self.color = color
        self.capture = capture and _torch_nvtx_ok()

    def __enter__(self):
        if self.capture:
            torch.cuda.profiler.start()
        push(self.name, self.color)
        return self

    def __exit__(self, *exc):
        pop()
        if self.capture:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        return False


def annotate(name: Optional[str] = None, color: Optional[str] = None) -> Callable:
    """Decorator form that defaults the range name to the function's qualified name."""

    def deco(fn: Callable) -> Callable:
        label = name or fn.__qualname__

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with range(label, color):
                return fn(*args, **kwargs)

        return wrapper

    return deco


__all__ = ["DOMAIN", "backend", "push", "pop", "mark", "range", "annotate"]
del builtins
