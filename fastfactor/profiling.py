"""NVTX ranges and marks in a ``fastfactor`` domain, at near-zero cost when nobody is listening.

Backends, chosen once at import (and switchable with :func:`use_backend`):

1. ``"nvtx"``: the ``nvtx`` package when it is installed (a real ``fastfactor`` NVTX domain,
   colours). Nsight filters then read ``fastfactor@<range>``;
2. ``"torch"``: ``torch.cuda.nvtx`` when CUDA is available. It has no domains, so the range name
   is prefixed ``fastfactor:`` and lives in the default domain;
3. ``"none"``: ranges and marks are no-ops (one attribute test per call). ``torch.cuda.nvtx``
   raises on CPU-only builds, so it is never touched there.

``FASTFACTOR_NVTX=0`` in the environment selects ``"none"`` whatever is installed.

API
---
* :class:`range` – context manager *and* decorator: ``with profiling.range("step"):`` or
  ``@profiling.range("factorize")``. ``capture=True`` also wraps the region in
  ``torch.cuda.profiler.start()/stop()`` (CUDA only) so that
  ``nsys profile --capture-range=cudaProfilerApi`` records exactly that region;
* :func:`annotate` – decorator whose range name defaults to the function's qualified name;
* :func:`mark` – an instant event;
* :func:`capture` – the profiler start/stop alone, without a range;
* :func:`annotate_modules` – forward (and optionally backward) ranges around chosen submodules
  of a model, e.g. every ``FactorizedLinear``, so ``ncu --nvtx-include`` can select their kernels;
* :func:`qualified` – the name under which a range shows up in Nsight for the active backend
  (``fastfactor@step`` or ``fastfactor:step``), for building filters.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import os
from typing import Callable, Iterator, Optional

import torch

DOMAIN = "fastfactor"
BACKENDS = ("nvtx", "torch", "none")

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


def _detect() -> str:
    if os.environ.get("FASTFACTOR_NVTX", "1") == "0":
        return "none"
    if _nvtx is not None:
        return "nvtx"
    if _torch_nvtx_ok():
        return "torch"
    return "none"


_BACKEND = _detect()


def backend() -> str:
    """``'nvtx'``, ``'torch'`` or ``'none'``: where ranges go now."""
    return _BACKEND


def enabled() -> bool:
    """Whether ranges are recorded anywhere (False means every call is a no-op)."""
    return _BACKEND != "none"


def available_backends() -> list[str]:
    """The backends that can work in this process (``'none'`` always can)."""
    out = []
    if _nvtx is not None:
        out.append("nvtx")
    if _torch_nvtx_ok():
        out.append("torch")
    out.append("none")
    return out


def set_backend(name: str) -> str:
    """Switch the backend (``'nvtx'``, ``'torch'``, ``'none'``); returns the previous one."""
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"name: expected one of {BACKENDS}, got {name!r}")
    if name not in available_backends():
        why = "the nvtx package is not importable" if name == "nvtx" else "CUDA is not available"
        raise ValueError(f"name: backend {name!r} cannot be used here ({why})")
    prev, _BACKEND = _BACKEND, name
    return prev


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily switch the backend (tests, or ``'none'`` to silence a region)."""
    prev = set_backend(name)
    try:
        yield
    finally:
        set_backend(prev)


def qualified(name: str) -> str:
    """How the range ``name`` appears to Nsight with the active backend: ``fastfactor@name``
    (nvtx package: domain ``fastfactor``) or ``fastfactor:name`` (torch: default domain)."""
    if _BACKEND == "torch":
        return f"{DOMAIN}:{name}"
    return f"{DOMAIN}@{name}"


def push(name: str, color: Optional[str] = None) -> None:
    """Open a range on this thread (pair with :func:`pop`)."""
    if _BACKEND == "nvtx":
        _nvtx.push_range(message=name, domain=DOMAIN, color=color)
    elif _BACKEND == "torch":
        torch.cuda.nvtx.range_push(f"{DOMAIN}:{name}")


def pop() -> None:
    """Close the innermost range opened by :func:`push` on this thread."""
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

    name:    the range name (shown in Nsight as ``fastfactor@name`` or ``fastfactor:name``).
    color:   a colour name for the nvtx package backend (ignored by the others).
    capture: also call ``torch.cuda.profiler.start()/stop()`` around the region (CUDA only, a
             no-op elsewhere), to bound an ``nsys --capture-range=cudaProfilerApi`` recording
             or an ``ncu --profile-from-start off`` session to it. The stop synchronizes first,
             so the kernels launched in the region finish inside the capture.
    """

    def __init__(self, name: str, color: Optional[str] = None, capture: bool = False):
        if not isinstance(name, str):
            raise TypeError(f"name: expected a str, got {type(name).__name__}")
        self.name = name
        self.color = color
        self.capture = bool(capture)

    def __enter__(self):
        if self.capture and _torch_nvtx_ok():
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        push(self.name, self.color)
        return self

    def __exit__(self, *exc):
        pop()
        if self.capture and _torch_nvtx_ok():
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        return False


@contextlib.contextmanager
def capture(enabled: bool = True) -> Iterator[None]:
    """``torch.cuda.profiler.start()/stop()`` around a region, without an NVTX range (no-op
    without CUDA or with ``enabled=False``)."""
    active = enabled and _torch_nvtx_ok()
    if active:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    try:
        yield
    finally:
        if active:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()


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


class _Handles:
    """Removable group of module hooks returned by :func:`annotate_modules`."""

    def __init__(self, handles: list, names: list[str]):
        self._handles = handles
        self.names = names

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def annotate_modules(
    model: torch.nn.Module,
    predicate: Optional[Callable[[str, torch.nn.Module], bool]] = None,
    *,
    prefix: str = "",
    backward: bool = False,
) -> _Handles:
    """Put an NVTX range around the forward of every submodule selected by ``predicate(name,
    module)`` (default: every ``fastfactor.layers.base.FactorizedLinear``).

    The range is named ``{prefix}{method}.fwd:{module path}`` (``method`` is the module's class
    attribute, e.g. ``lowrank``), so an ncu filter on ``fastfactor@lowrank.fwd*`` or the module
    path selects its kernels. ``backward=True`` also adds ``.bwd`` ranges through full backward
    hooks (these wrap the module's inputs in an autograd node, so leave them off for timing).
    Returns a handle; ``handle.remove()`` (or using it as a context manager) removes the hooks.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if predicate is None:
        from .layers.base import FactorizedLinear

        def predicate(_name, mod):  # noqa: E306
            return isinstance(mod, FactorizedLinear)

    handles, names = [], []
    for mod_name, mod in model.named_modules():
        if not predicate(mod_name, mod):
            continue
        method = getattr(mod, "method", type(mod).__name__)
        label = f"{prefix}{method}.fwd:{mod_name or type(mod).__name__}"
        blabel = f"{prefix}{method}.bwd:{mod_name or type(mod).__name__}"
        handles.append(mod.register_forward_pre_hook(lambda m, a, _l=label: push(_l)))
        # always_call: the range is closed even when the forward raises
        handles.append(mod.register_forward_hook(lambda m, a, o: pop(), always_call=True))
        if backward:
            handles.append(mod.register_full_backward_pre_hook(lambda m, g, _l=blabel: push(_l)))
            handles.append(mod.register_full_backward_hook(lambda m, gi, go: pop()))
        names.append(label)
    return _Handles(handles, names)


#: the kernel families a layer of each method launches (the Nsight scripts' per-family filter):
#: dense-sparse runs the 2:4 kernels and, on its two-kernel path, the low-rank family's GEMM
METHOD_FAMILIES = {"lowrank": ("lowrank",), "monarch": ("monarch",), "block_lowrank": ("monarch",),
                   "sparse24": ("sparse24",), "dense_sparse": ("sparse24", "lowrank")}


def kernel_names(method: Optional[str] = None) -> list[str]:
    """Function names of the project's Triton kernels, as Nsight lists them (``_rows_kernel``, ...),
    read from the compile tier's registry (``fastfactor.kernels._config.KERNELS``): every kernel, or
    those a layer of ``method`` launches (:data:`METHOD_FAMILIES`). ``profiling/common.sh`` builds
    ncu's ``--kernel-name regex:`` filter from it, so a new kernel is never filtered out."""
    from .kernels import _config, lowrank, monarch, sparse24  # noqa: F401  (registers every kernel)

    if method is not None and method not in METHOD_FAMILIES:
        raise ValueError(f"method: expected one of {sorted(METHOD_FAMILIES)}, got {method!r}")
    families = METHOD_FAMILIES[method] if method else None
    names = set()
    for key, spec in _config.KERNELS.items():
        if families is None or key.split(".")[0] in families:
            fn = spec.fn
            names.add(getattr(fn, "__name__", None) or fn.fn.__name__)
    return sorted(names)


def kernel_regex(method: Optional[str] = None) -> str:
    """:func:`kernel_names` as the alternation ncu's ``--kernel-name regex:`` takes."""
    return "|".join(kernel_names(method))


__all__ = [
    "DOMAIN", "BACKENDS", "backend", "enabled", "available_backends", "set_backend", "use_backend",
    "qualified", "push", "pop", "mark", "range", "capture", "annotate", "annotate_modules",
    "METHOD_FAMILIES", "kernel_names", "kernel_regex",
]
del builtins
