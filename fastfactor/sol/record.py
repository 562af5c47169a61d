"""Record what a benchmark row launches, without a GPU and without running anything.

:func:`record_launches` runs the real op code (the layer's ``forward``, and autograd's backward
through the registered ops) on CPU tensors whose storage is never touched (``torch.empty``), with
the launch layer replaced by a recorder: every ``Tunable[grid](*args, **kwargs)`` becomes a
:class:`Launch` holding the kernel, its arguments, the autotune candidates (the GPU space after the
kernel's own pruning), the config deterministic mode runs, and the specialization Triton's runtime
would build (integers equal to 1 become constants, integers and pointers divisible by 16 get the
``tt.divisibility`` hint). The dispatcher sees a CUDA-like world: ``use_triton`` is true, the SM
count is the device's, dots are not upcast (that is the interpreter's workaround only).

:func:`record_torch_ops` records the aten ops of a plain PyTorch callable (dense ``F.linear``, a
layer's ``forward_unfused``) with their shapes, again without computing anything (meta kernels
give the output shapes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from ..kernels import _config


@dataclasses.dataclass
class Launch:
    """One kernel launch as the op code made it.

    kernel:    registry name (``lowrank.chain``)
    fn:        the ``@triton.jit`` (or interpreted) function
    args:      every runtime argument by name (tensors as the CPU tensors passed)
    constexprs: the non-tuned constexpr arguments passed by the launcher
    grid:      the launcher's grid (callable of the meta dict, or a tuple)
    candidates: autotune configs (``dict`` with ``num_warps``/``num_stages``) after pruning
    fixed:     the config deterministic mode runs
    phase:     ``fwd`` or ``bwd``
    """

    kernel: str
    fn: Any
    args: dict
    constexprs: dict
    grid: Any
    candidates: list
    fixed: dict
    phase: str = "fwd"

    def grid_for(self, cfg: dict) -> tuple:
        g = self.grid({**self.args, **self.constexprs, **cfg}) if callable(self.grid) else self.grid
        return tuple(int(v) for v in g) + (1,) * (3 - len(g))

    def specialization(self) -> dict:
        """``name -> '1' | 'D' | ''`` for every runtime (non-constexpr) argument, as Triton's
        runtime specializes: ints equal to 1 become the constant 1, ints and pointers divisible by
        16 (bytes, for pointers) are marked divisible."""
        out = {}
        for name, v in self.args.items():
            if isinstance(v, torch.Tensor):
                off = v.storage_offset() * v.element_size()
                out[name] = "D" if off % 16 == 0 else ""
            elif isinstance(v, bool) or v is None:
                out[name] = "c"
            elif isinstance(v, int):
                out[name] = "1" if v == 1 else ("D" if v % 16 == 0 else "")
            else:
                out[name] = ""
        return out

    def signature(self) -> dict:
        """``name -> triton type`` of the runtime arguments (``*bf16``, ``i32``, ``i64``)."""
        sig = {}
        for name, v in self.args.items():
            if isinstance(v, torch.Tensor):
                sig[name] = "*" + _TT[v.dtype]
            elif isinstance(v, bool):
                sig[name] = "i1"
            elif isinstance(v, int):
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            elif isinstance(v, float):
                sig[name] = "fp32"
        return sig

    def describe(self) -> dict:
        return dict(
            kernel=self.kernel, phase=self.phase,
            tensors={k: dict(shape=list(v.shape), stride=list(v.stride()), dtype=_TT[v.dtype])
                     for k, v in self.args.items() if isinstance(v, torch.Tensor)},
            ints={k: v for k, v in self.args.items() if not isinstance(v, torch.Tensor)},
            constexprs=self.constexprs, candidates=self.candidates, fixed=self.fixed,
            specialization=self.specialization(),
        )


_TT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
       torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.int16: "i16",
       torch.bool: "i1"}


def kernel_name(fn, dtype: Optional[torch.dtype] = None) -> str:
    """Registry name of a kernel function (``lowrank.chain``); the first registered name whose
    dtypes include ``dtype`` when several share one function."""
    names = [n for n, s in _config.KERNELS.items() if s.fn is fn]
    if dtype is not None:
        tt = _TT.get(dtype)
        pref = [n for n in names if tt in _config.KERNELS[n].dtypes]
        names = pref or names
    if names:
        return names[0]
    mod = getattr(fn, "__module__", "") or ""
    return f"{mod.rsplit('.', 1)[-1]}.{getattr(fn, '__name__', 'kernel').strip('_')}"


def _candidates(tunable, named: dict) -> tuple[list, dict]:
    """The GPU autotune space after the kernel's pruning, and the deterministic-mode config."""
    import triton

    def cfg_objs(space):
        out = []
        for c in space:
            c = dict(c)
            nw, ns = c.pop("num_warps", 4), c.pop("num_stages", 2)
            out.append(triton.Config(c, num_warps=nw, num_stages=ns))
        return out

    def as_dicts(objs):
        return [dict(o.kwargs, num_warps=o.num_warps, num_stages=o.num_stages) for o in objs]

    space = list(tunable.space)
    cands = cfg_objs(space)
    if tunable.prune is not None:
        cands = tunable.prune(cands, named, **named) or cands
    # deterministic mode (Tunable.fixed_config on a GPU): the deterministic (or picked) config,
    # or the next one after it that survives pruning
    first = None
    if getattr(tunable, "pick", None) is not None:
        first = tunable.pick(named)
    if first is None:
        first = getattr(tunable, "deterministic", space[1] if len(space) > 1 else space[0])
    i = space.index(first) if first in space else 0
    det = cfg_objs(space[i:] + space[:i])
    if tunable.prune is not None:
        det = tunable.prune(det, named, **named) or det
    return as_dicts(cands), as_dicts(det[:1])[0]


class _Recorder:
    def __init__(self):
        self.launches: list[Launch] = []
        self.torch_ops: list = []
        self.phase = "fwd"


_ACTIVE: list[_Recorder] = []


def _recording_getitem(self, grid):
    def launch(*args, **kwargs):
        rec = _ACTIVE[-1]
        names = list(self.fn.arg_names)
        named = dict(zip(names, args))
        named.update(kwargs)
        cands, fixed = _candidates(self, named)
        tuned = set(cands[0]) - {"num_warps", "num_stages"} if cands else set()
        runtime, consts = {}, {}
        for n in names:
            if n in tuned:
                continue
            if n in kwargs:
                consts[n] = kwargs[n]
            elif n in named:
                runtime[n] = named[n]
        dtype = next((v.dtype for v in runtime.values() if isinstance(v, torch.Tensor)), None)
        rec.launches.append(Launch(
            kernel=kernel_name(self.fn, dtype), fn=self.fn, args=runtime, constexprs=consts,
            grid=grid, candidates=cands, fixed=fixed, phase=rec.phase,
        ))

    return launch


def _patch_everywhere(name: str, value, stack: contextlib.ExitStack) -> None:
    """Replace ``name`` in ``_config`` and in every loaded kernel/op module that imported it.
    (The original is taken once, before any module is patched: comparing against ``_config``'s
    attribute inside the loop missed every module listed after ``_config`` itself.)"""
    orig = getattr(_config, name, None)
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("fastfactor"):
            continue
        if hasattr(mod, name) and getattr(mod, name) is orig:
            old = getattr(mod, name)
            setattr(mod, name, value)
            stack.callback(setattr, mod, name, old)


@contextlib.contextmanager
def recording(sms: int = 132):
    """Within this context, every Tunable launch of the op code is recorded instead of run, and
    the dispatch believes it runs on a CUDA device with ``sms`` SMs."""
    if not _config.HAS_TRITON:
        raise RuntimeError("fastfactor sol: triton is not installed")
    rec = _Recorder()
    with contextlib.ExitStack() as stack:
        old_getitem = _config.Tunable.__getitem__
        _config.Tunable.__getitem__ = _recording_getitem
        stack.callback(setattr, _config.Tunable, "__getitem__", old_getitem)
        _patch_everywhere("num_sms", lambda device: sms, stack)
        _patch_everywhere("semi_structured_ok", lambda device: True, stack)  # an sm_90 device
        _patch_everywhere("upcast_dots", lambda: False, stack)
        _patch_everywhere("get_cpu_backend", lambda: "triton", stack)
        _patch_everywhere("is_deterministic", lambda: False, stack)
        _patch_everywhere("is_interpreter", lambda: False, stack)  # launchers size splits for the GPU
        _ACTIVE.append(rec)
        stack.callback(_ACTIVE.pop)
        stack.enter_context(_OurPathRecorder(rec))
        yield rec


class _OurPathRecorder(TorchDispatchMode):
    """Inside :func:`recording`: fastfactor's custom ops run their Python body (launchers included)
    with this mode active, so the plain torch ops a launcher calls (``torch.mm`` on the cuBLAS
    path, copies, reductions) are recorded next to the Triton launches. Ops on large tensors are
    not computed (meta shapes, fresh uninitialised outputs); small ones run for real (a packed 2:4
    metadata copy must keep its values)."""

    SMALL = 16 << 20

    def __init__(self, rec):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", "") == "fastfactor":
            from torch._library.custom_ops import OPDEFS

            opdef = OPDEFS.get(func._schema.name)
            if opdef is not None:
                with self:
                    return opdef._init_fn(*args, **kwargs)
            return func(*args, **kwargs)
        ins = []
        tree_map(lambda t: ins.append(t) if isinstance(t, torch.Tensor) else None, (args, kwargs))
        nbytes = sum(t.numel() * t.element_size() for t in ins)
        to_meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t
        meta_out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
        outs = []
        tree_map(lambda t: outs.append(t) if isinstance(t, torch.Tensor) else None, meta_out)
        base = func.overloadpacket.__name__.rstrip("_") if hasattr(func, "overloadpacket") else str(func)
        view = (bool(getattr(func, "is_view", False)) or base in _FREE) and not _copies(base, ins)
        self.rec.torch_ops.append(TorchOp(
            base, [(tuple(t.shape), t.dtype, tuple(t.stride())) for t in ins],
            [(tuple(t.shape), t.dtype, tuple(t.stride())) for t in outs], view, self.rec.phase))
        def to_cpu(t):
            if isinstance(t, torch.Tensor):
                return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
            return t

        if view or nbytes + sum(t.numel() * t.element_size() for t in outs) <= self.SMALL:
            try:
                return func(*args, **kwargs)
            except NotImplementedError:
                if view:
                    raise
                # a GPU-only op (PyTorch's semi-structured GEMM) on a small shape: its output's
                # values are never read by the recording, only its shape
                return tree_map(to_cpu, meta_out)
        return tree_map(to_cpu, meta_out)


def _grad_params(module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


def run_direction(fn: Callable, x: torch.Tensor, g: torch.Tensor, params: list, direction: str,
                  on_backward: Optional[Callable] = None):
    """Call ``fn(x)`` the way ``fastfactor bench`` times ``direction`` (``fwd`` under no_grad,
    ``fwd+bwd`` forward then ``autograd.grad`` for ``x`` and every parameter, ``bwd`` the
    gradient call alone); ``on_backward()`` is called between the two halves."""
    if direction == "fwd":
        with torch.no_grad():
            fn(x)
        return
    xg = x.detach().requires_grad_(True)
    y = fn(xg)
    if on_backward is not None:
        on_backward()
    torch.autograd.grad(y, [xg] + list(params), g, allow_unused=True)


def record_launches(module, x: torch.Tensor, g: torch.Tensor, direction: str, sms: int = 132,
                    torch_ops: Optional[list] = None) -> list[Launch]:
    """The Triton launches ``module(x)`` makes in ``direction`` (see :func:`run_direction`).
    ``bwd`` keeps only the backward's launches. ``torch_ops``: a list that receives the plain
    torch ops the launchers ran (cuBLAS products, copies)."""
    with recording(sms) as rec:
        def to_bwd():
            rec.phase = "bwd"
        run_direction(module, x, g, _grad_params(module), "fwd" if direction == "fwd" else "fwd+bwd",
                      on_backward=to_bwd)
    launches = rec.launches
    ops = rec.torch_ops
    if direction == "bwd":
        launches = [l for l in launches if l.phase == "bwd"]
        ops = [o for o in ops if o.phase == "bwd"]
    if torch_ops is not None:
        torch_ops.extend(ops)
    return launches


# --------------------------------------------------------------------------------------------
# plain PyTorch paths: aten ops with shapes, nothing computed
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TorchOp:
    """One aten op: its name, tensor inputs and outputs as ``(shape, dtype)``, and whether it is a
    view (no data moved)."""

    name: str
    inputs: list
    outputs: list
    is_view: bool
    phase: str = "fwd"


#: ops that move no data (allocation, aliasing, metadata)
_FREE = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh", "_unsafe_view",
         "view", "t", "transpose", "permute", "expand", "reshape", "unsqueeze", "squeeze",
         "as_strided", "slice", "select", "split", "unbind", "_reshape_alias", "new_empty",
         "new_empty_strided", "set_", "resize_", "unflatten", "flatten", "narrow"}


def _copies(base: str, ins: list) -> bool:
    """``contiguous`` carries an alias annotation (it returns its input when that is contiguous)
    but copies a strided input: that copy moves data and is recorded as an op."""
    if base != "contiguous" or not ins:
        return False
    t = ins[0]
    if isinstance(t, torch.Tensor):
        return not t.is_contiguous()
    shape, _, stride = t
    return not torch.empty_strided(shape, stride, device="meta").is_contiguous()


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[TorchOp] = []
        self.phase = "fwd"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t
        out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
        ins, outs = [], []
        tree_map(lambda t: ins.append((tuple(t.shape), t.dtype, tuple(t.stride())))
                 if isinstance(t, torch.Tensor) else None, (args, kwargs))
        tree_map(lambda t: outs.append((tuple(t.shape), t.dtype, tuple(t.stride())))
                 if isinstance(t, torch.Tensor) else None, out)
        base = func.overloadpacket.__name__.rstrip("_") if hasattr(func, "overloadpacket") else str(func)
        view = (bool(getattr(func, "is_view", False)) or base in _FREE or base.rstrip("_") in _FREE) \
            and not _copies(base, [t for t in ins])
        self.ops.append(TorchOp(base, ins, outs, view, self.phase))

        def to_cpu(t):
            if isinstance(t, torch.Tensor):
                return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
            return t

        return tree_map(to_cpu, out)


def record_torch_ops(fn: Callable, x: torch.Tensor, g: torch.Tensor, params: list, direction: str) -> list[TorchOp]:
    """The aten ops ``fn(x)`` runs in ``direction`` (autograd's backward included)."""
    rec = _OpRecorder()

    def to_bwd():
        rec.phase = "bwd"

    with rec:
        run_direction(fn, x, g, params, "fwd" if direction == "fwd" else "fwd+bwd", on_backward=to_bwd)
    ops = rec.ops
    if direction == "bwd":
        ops = [o for o in ops if o.phase == "bwd"]
    return ops
