"""Shared kernel infrastructure: interpreter detection, autotune spaces, and the kernel registry.

Every Triton kernel of the project is registered here with :func:`register_kernel`, together with
its autotune space and a description of its arguments. ``fastfactor compile-check`` walks this
registry and compiles every kernel x config for sm_80 and sm_90 ahead of time, so a new kernel
family joins the compile tier simply by registering its kernels when its module is imported.

Backends for CPU tensors
------------------------
* ``reference`` (default): the pure-PyTorch reference of each family.
* ``triton``: the Triton kernels themselves, run by the Triton interpreter. It needs
  ``TRITON_INTERPRET=1`` in the environment *before* the kernel modules are imported (Triton
  decides at decoration time whether a ``@triton.jit`` function is interpreted).

``TRITON_INTERPRET=1`` alone selects ``triton`` for CPU tensors; ``FASTFACTOR_CPU_BACKEND=reference``
overrides that (the test suite sets both, and switches per test with :func:`cpu_backend`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Callable, Iterator

import torch

try:  # triton is a Linux-only dependency; CPU-only users on other OSes get the reference paths
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False


def is_interpreter() -> bool:
    """True when Triton kernels defined in this process run under the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_BACKEND_OVERRIDE: list[str] = []


def _env_cpu_backend() -> str:
    value = os.environ.get("FASTFACTOR_CPU_BACKEND")
    if value is None:
        return "triton" if is_interpreter() else "reference"
    if value not in ("reference", "triton"):
        raise ValueError(
            f"FASTFACTOR_CPU_BACKEND: expected 'reference' or 'triton', got {value!r}"
        )
    return value


def get_cpu_backend() -> str:
    """The backend used for CPU tensors: ``'reference'`` or ``'triton'`` (interpreter)."""
    backend = _BACKEND_OVERRIDE[-1] if _BACKEND_OVERRIDE else _env_cpu_backend()
    if backend == "triton" and not (HAS_TRITON and is_interpreter()):
        raise RuntimeError(
            "CPU backend 'triton' needs TRITON_INTERPRET=1 set before fastfactor is imported "
            f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r})"
        )
    return backend


@contextlib.contextmanager
def cpu_backend(name: str) -> Iterator[None]:
    """Temporarily choose the backend for CPU tensors (``'reference'`` or ``'triton'``)."""
    if name not in ("reference", "triton"):
        raise ValueError(f"cpu_backend: expected 'reference' or 'triton', got {name!r}")
    _BACKEND_OVERRIDE.append(name)
    try:
        yield
    finally:
        _BACKEND_OVERRIDE.pop()


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on these tensors runs the Triton kernels (CUDA, or CPU under the interpreter)."""
    t = tensors[0]
    if t.is_cuda:
        return HAS_TRITON
    if t.device.type == "cpu":
        return get_cpu_backend() == "triton"
    return False


def upcast_dots() -> bool:
    """Whether kernels must upcast bf16/fp16 operands of ``tl.dot`` to fp32.

    Under the interpreter ``tl.dot`` on bf16 multiplies the raw bits, so every kernel takes an
    ``UPCAST`` constexpr and converts its dot operands to fp32 there.
    """
    return is_interpreter()


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on fp32 operands, following PyTorch's own TF32 switch."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# --------------------------------------------------------------------------------------------
# Autotune spaces
# --------------------------------------------------------------------------------------------

def configs(space: list[dict], interp_index: int = 0) -> list:
    """Turn a list of ``{"BLOCK_M": 64, ..., "num_warps": 4, "num_stages": 3}`` dicts into
    ``triton.Config`` objects. Under the interpreter only one (small) config is kept: the
    interpreter runs every config of an autotuner, which would only cost time."""
    if not HAS_TRITON:
        return []
    chosen = [space[interp_index]] if is_interpreter() else space
    out = []
    for c in chosen:
        c = dict(c)
        nw = c.pop("num_warps", 4)
        ns = c.pop("num_stages", 2)
        out.append(triton.Config(c, num_warps=nw, num_stages=ns))
    return out


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 stands in on CPU, for the interpreter)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    # asked once per device: the grid functions run on every launch
    return torch.cuda.get_device_properties(index).multi_processor_count


def row_block_grid(M: int, N: int, device: torch.device):
    """Grid of the fused chain kernels: one program per ``BLOCK_M`` rows, and the ``N`` output
    tiles split over a second grid dimension only when the row blocks alone cannot fill the GPU
    (two programs per SM). Each split recomputes its row block's rank-r intermediate, which is
    cheap exactly when there are few rows. The kernel derives its share of the tiles from
    ``tl.num_programs(1)``."""
    sms = num_sms(device)

    def grid(meta):
        m_blocks = triton.cdiv(M, meta["BLOCK_M"])
        n_tiles = triton.cdiv(N, meta["BLOCK_N"])
        split = max(1, min(n_tiles, (2 * sms) // m_blocks))
        return (m_blocks, triton.cdiv(n_tiles, triton.cdiv(n_tiles, split)))

    return grid


# --------------------------------------------------------------------------------------------
# Deterministic mode and the autotuned launcher
# --------------------------------------------------------------------------------------------

#: fastfactor's own switch (set by ``fastfactor.set_deterministic``); kernels/ cannot import the
#: library layer, so the flag lives here.
DETERMINISTIC = {"flag": False}


def is_deterministic() -> bool:
    """Launchers must not vary run to run: on when ``fastfactor.set_deterministic(True)`` or
    ``torch.use_deterministic_algorithms(True)`` is in effect."""
    return DETERMINISTIC["flag"] or bool(torch.are_deterministic_algorithms_enabled())


class Tunable:
    """An autotuned kernel that launches one fixed config in deterministic mode.

    ``Tunable(fn, space, key=[...], prune=fn)`` is used like ``triton.autotune(...)(fn)``:
    ``tunable[grid](*args, **kwargs)``. Autotuning picks the fastest config per key on the first
    call, and two processes may pick differently when timings are close; configs differ in block
    sizes and so in the order of the reduction, hence in rounding. In deterministic mode the
    launch skips the autotuner and runs the first config of the space that survives ``prune``
    (the second entry of the space on a GPU: the first is the interpreter's tiny config), so
    every process computes the same bits. ``pick(named_args) -> dict`` (optional) chooses that
    fixed config per shape instead (one entry of the space, e.g. small row tiles for a handful of
    rows); it must depend only on the arguments, so the choice is still the same in every process.
    """

    def __init__(self, fn, space: list[dict], key: list[str], prune=None, pick=None):
        self.fn = fn
        self.space = space
        self.prune = prune
        self.pick = pick
        self.tuned = None
        if HAS_TRITON:
            kw = {"prune_configs_by": {"early_config_prune": prune}} if prune else {}
            self.tuned = triton.autotune(configs=configs(space), key=key, **kw)(fn)

    def fixed_config(self, kwargs: dict):
        if self.pick is not None and not is_interpreter():
            picked = configs([self.pick(kwargs)])
            if self.prune is not None:
                picked = self.prune(picked, kwargs, **kwargs) or []
            if picked:
                return picked[0]
        cands = configs(self.space if not is_interpreter() else self.space[:1])
        if not is_interpreter() and len(cands) > 1:
            cands = cands[1:] + cands[:1]
        if self.prune is not None:
            cands = self.prune(cands, kwargs, **kwargs) or cands
        return cands[0]

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if not is_deterministic():
                return self.tuned[grid](*args, **kwargs)
            named = dict(zip(self.fn.arg_names, args))
            named.update(kwargs)
            cfg = self.fixed_config(named)
            meta = {**named, **cfg.kwargs}
            g = grid(meta) if callable(grid) else grid
            return self.fn[g](*args, **kwargs, **cfg.kwargs,
                              num_warps=cfg.num_warps, num_stages=cfg.num_stages)

        return launch


# --------------------------------------------------------------------------------------------
# Registry for the compile tier
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class KernelSpec:
    """How to compile one kernel ahead of time.

    name:       readable name, ``family.kernel``
    fn:         the ``@triton.jit`` function (not the autotuner wrapping it)
    signature:  ``dtype -> {arg: triton type}`` for every non-constexpr argument
                (e.g. ``{"x_ptr": "*bf16", "M": "i32"}``)
    constexprs: list of dicts of the non-tuned constexpr arguments to compile for (one compile per
                entry, e.g. with and without bias); each is merged with every config
    space:      the autotune space, as given to :func:`configs` (the full space, not the
                interpreter's reduced one)
    dtypes:     input dtypes to compile for
    unit_args:  integer arguments that are 1 in the common call (innermost strides of contiguous
                operands); the "aligned" specialization of compile-check compiles them as the
                constant 1, as Triton's runtime specialization does
    """

    name: str
    fn: Callable
    signature: Callable[[str], dict]
    constexprs: list[dict]
    space: list[dict]
    dtypes: tuple[str, ...] = ("bf16",)
    unit_args: tuple[str, ...] = ()


KERNELS: dict[str, KernelSpec] = {}


def register_kernel(spec: KernelSpec) -> KernelSpec:
    if spec.name in KERNELS:
        raise ValueError(f"register_kernel: kernel {spec.name!r} is already registered")
    KERNELS[spec.name] = spec
    return spec


def kernel_modules() -> list[str]:
    """The modules whose import registers kernels (compile-check imports all of them)."""
    return [
        "fastfactor.kernels.lowrank",
        "fastfactor.kernels.monarch",
        "fastfactor.kernels.sparse24",
    ]
