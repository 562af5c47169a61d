"""Shared kernel infrastructure: interpreter detection, autotune spaces, and the kernel registry.

Every Triton kernel of the project is registered here with :func:`register_kernel`, together with
its autotune space; its compile signature is derived from its own arguments
(:func:`kernel_signature`: ``*_ptr`` -> ``*dtype``, the rest -> ``i32``). ``fastfactor
compile-check`` walks this registry and compiles every kernel x config for sm_80 and sm_90 ahead
of time, so a new kernel family joins the compile tier by registering its kernels when its module
is imported (and naming that module in its ``fastfactor.families`` declaration).

Launchers go through :class:`Tunable` (autotuned, with named ``interpreter=`` and
``deterministic=`` configs); :func:`next_pow2`, :func:`m_bucket` and :func:`acc_dtype` are the
small helpers every family shares.

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
from typing import Callable, Iterator, Optional

import torch

try:  # triton is a Linux-only dependency; CPU-only users on other OSes get the reference paths
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False


def _interpreter_index_compat() -> bool:
    """Make Triton's interpreter turn a scalar into a Python int as Triton 3.9's does.

    Triton 3.6's interpreter (the GPU image's: ``fastfactor sol`` counts launches with it, in
    gpu-check too) converts a scalar tensor to an int by ``int(data)`` of its one-element 1-D
    array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"): every loop whose bounds are computed from kernel arguments fails. Triton 3.9 squeezes
    the array first; this does the same where the installed interpreter does not. Returns whether
    it patched."""
    if not HAS_TRITON:
        return False
    try:
        import inspect

        from triton.runtime import interpreter as _interp
        orig = _interp._patch_lang_tensor
        if getattr(orig, "_fastfactor_compat", False) or "squeeze" in inspect.getsource(orig):
            return False
    except (ImportError, AttributeError, OSError, TypeError):  # another interpreter layout: leave it
        return False

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._fastfactor_compat = True
    _interp._patch_lang_tensor = patched
    return True


_interpreter_index_compat()


#: ``constexpr name -> {value a GPU build takes: the interpreter's equivalent}``: builds that differ
#: only in instructions the interpreter cannot run (inline assembly), with the same loads, stores
#: and dots. ``fastfactor sol`` counts a recorded GPU launch by running the equivalent.
INTERPRETER_EQUIVALENT: dict = {}


def interpreter_constexprs(constexprs: dict) -> dict:
    """``constexprs`` with every GPU-only value replaced by its :data:`INTERPRETER_EQUIVALENT`."""
    return {k: INTERPRETER_EQUIVALENT.get(k, {}).get(v, v) if isinstance(v, (int, bool, str)) else v
            for k, v in constexprs.items()}


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

def next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``): padded ranks, ``M`` buckets."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def m_bucket(M: int) -> int:
    """The autotune key for a row count: ``next_pow2(M)``, capped at 65536 (one tuning per bucket)."""
    return min(next_pow2(M), 1 << 16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype of the references and of reductions outside the kernels: float64 stays
    float64 (the test oracles), everything else (fp32, fp16, bf16) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_config(c: dict):
    c = dict(c)
    nw = c.pop("num_warps", 4)
    ns = c.pop("num_stages", 2)
    return triton.Config(c, num_warps=nw, num_stages=ns)


def configs(space: list[dict], interpreter: Optional[dict] = None) -> list:
    """Turn a list of ``{"BLOCK_M": 64, ..., "num_warps": 4, "num_stages": 3}`` dicts into
    ``triton.Config`` objects. Under the interpreter only the ``interpreter`` config (small; the
    space's first entry when not given) is kept: the interpreter runs every config of an
    autotuner, which would only cost time."""
    if not HAS_TRITON:
        return []
    if is_interpreter():
        return [_to_config(interpreter if interpreter is not None else space[0])]
    return [_to_config(c) for c in space]


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 stands in on CPU, for the interpreter)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def semi_structured_ok(device: torch.device) -> bool:
    """Whether PyTorch's semi-structured 2:4 GEMM (CUTLASS ``torch._sparse_semi_structured_*``,
    sparse tensor cores, sm_80+) can run on ``device``. False on CPU (``fastfactor sol`` patches it
    to True while it records, as it patches :func:`num_sms`)."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


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

    ``Tunable(fn, space, key=[...], prune=fn, interpreter=cfg, deterministic=cfg)`` is used like
    ``triton.autotune(...)(fn)``: ``tunable[grid](*args, **kwargs)``.

    * On a GPU, autotuning picks the fastest config of ``space`` per key on the first call; two
      processes may pick differently when timings are close, and configs differ in block sizes and
      so in the order of the reduction, hence in rounding.
    * ``interpreter``: the one config run under ``TRITON_INTERPRET=1`` (small and fast; default
      ``space[0]``).
    * ``deterministic``: the config launched, skipping the autotuner, in deterministic mode, so
      every process computes the same bits (default ``space[1]``, or ``space[0]`` for a
      one-entry space). When ``prune`` drops it for a shape, the next config of the space after
      it (wrapping around) that survives is launched. Under the interpreter the interpreter's
      config is the deterministic one.
    * ``pick``: optionally, a function ``named_args -> config of the space`` that chooses the
      deterministic config per shape instead (small row tiles for a handful of rows, say); it
      depends only on the arguments, so every process still launches the same config.
    """

    def __init__(self, fn, space: list[dict], key: list[str], prune=None,
                 interpreter: Optional[dict] = None, deterministic: Optional[dict] = None, pick=None):
        self.fn = fn
        self.space = space
        self.prune = prune
        self.interpreter = space[0] if interpreter is None else interpreter
        if deterministic is None:
            deterministic = space[1] if len(space) > 1 else space[0]
        if deterministic not in space:
            raise ValueError(f"Tunable({getattr(fn, '__name__', fn)}): the deterministic config "
                             f"{deterministic} is not in the autotune space")
        self.deterministic = deterministic
        self.pick = pick
        self.tuned = None
        if HAS_TRITON:
            kw = {"prune_configs_by": {"early_config_prune": prune}} if prune else {}
            self.tuned = triton.autotune(configs=configs(space, self.interpreter), key=key, **kw)(fn)

    def fixed_config(self, kwargs: dict):
        """The config a deterministic launch with these (named) arguments runs."""
        if is_interpreter():
            cands = configs(self.space, self.interpreter)
        else:
            first = self.pick(kwargs) if self.pick is not None else self.deterministic
            i = self.space.index(first)
            cands = configs(self.space[i:] + self.space[:i])
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

def kernel_signature(fn, dtype: str, pointers: Optional[dict] = None) -> dict:
    """The compile signature of a ``@triton.jit`` kernel, derived from its own argument list
    (``fn.arg_names``): every non-constexpr argument named ``*_ptr`` is a pointer to ``dtype``
    (``"*bf16"``), every other non-constexpr argument an ``i32``. ``pointers`` overrides the
    element type of named pointers: ``{"rowsum_ptr": "fp32", "meta_ptr": "u8"}``."""
    pointers = dict(pointers or {})
    unknown = set(pointers) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"kernel_signature: {sorted(unknown)} are not arguments of "
                         f"{fn.__name__} (arguments: {fn.arg_names})")
    consts = constexpr_args(fn)
    return {
        name: ("*" + pointers.get(name, dtype)) if name.endswith("_ptr") else "i32"
        for name in fn.arg_names if name not in consts
    }


def constexpr_args(fn) -> set:
    """Names of the ``tl.constexpr`` arguments of a ``@triton.jit`` kernel (compiled or
    interpreted: the interpreter's wrapper does not carry Triton's parameter list)."""
    params = getattr(fn, "params", None)
    if params is not None:
        return {p.name for p in params if p.is_constexpr}
    import inspect

    out = set()
    for name, p in inspect.signature(getattr(fn, "fn", fn)).parameters.items():
        a = p.annotation
        if a is getattr(tl, "constexpr", object()) or (isinstance(a, str) and a.split(".")[-1] == "constexpr"):
            out.add(name)
    return out


@dataclasses.dataclass
class KernelSpec:
    """How to compile one kernel ahead of time.

    name:       readable name, ``family.kernel``
    fn:         the ``@triton.jit`` function (not the autotuner wrapping it)
    constexprs: list of dicts of the non-tuned constexpr arguments to compile for (one compile per
                entry, e.g. with and without bias); each is merged with every config
    space:      the autotune space, as given to :func:`configs` (the full space, the interpreter's
                config included), or ``variant -> space``
    dtypes:     input dtypes to compile for
    unit_args:  integer arguments that are 1 in the common call (innermost strides of contiguous
                operands); the "aligned" specialization of compile-check compiles them as the
                constant 1, as Triton's runtime specialization does
    pointers:   element types of the pointers that do not follow the input dtype
                (``{"rowsum_ptr": "fp32"}``); see :func:`kernel_signature`
    signature:  ``dtype -> {arg: triton type}`` for every non-constexpr argument; derived from the
                kernel's arguments by :func:`kernel_signature` when not given
    """

    name: str
    fn: Callable
    constexprs: list[dict]
    space: list[dict]
    dtypes: tuple[str, ...] = ("bf16",)
    unit_args: tuple[str, ...] = ()
    pointers: dict = dataclasses.field(default_factory=dict)
    signature: Optional[Callable[[str], dict]] = None

    def __post_init__(self):
        if self.signature is None:
            fn, pointers = self.fn, dict(self.pointers)
            self.signature = lambda dt: kernel_signature(fn, dt, pointers)


KERNELS: dict[str, KernelSpec] = {}


def register_kernel(spec: KernelSpec) -> KernelSpec:
    if spec.name in KERNELS:
        raise ValueError(f"register_kernel: kernel {spec.name!r} is already registered")
    KERNELS[spec.name] = spec
    return spec


def kernel_modules() -> list[str]:
    """Deprecated: the modules whose import registers kernels. compile-check now takes them from
    ``fastfactor.families`` (each family names its kernel module, imported directly)."""
    return [
        "fastfactor.kernels.lowrank",
        "fastfactor.kernels.monarch",
        "fastfactor.kernels.sparse24",
    ]
