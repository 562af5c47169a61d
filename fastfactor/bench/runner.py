"""The kernel sweep behind ``fastfactor bench``.

For each dtype × shape the dense baseline ``F.linear`` is timed once per (tokens, direction);
then for each family × setting one layer is built (random factors of the right shapes, see
``families``) and, per (tokens, direction), three paths are timed in the same run:

* ``forward`` – our kernels (CUDA) or the reference (CPU);
* ``forward_unfused`` – the same factorization in plain PyTorch (the "unfused" baseline);
* for 2:4, ``F.linear`` on PyTorch's semi-structured weight (forward only: PyTorch has no
  weight-gradient path for it, so a training comparison would not be like for like).

Directions: ``fwd`` runs under ``torch.no_grad()`` (inference; no activations saved);
``fwd+bwd`` runs the forward with autograd and ``torch.autograd.grad`` for the input and every
parameter; ``bwd`` times the gradient call alone on a forward graph built once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .families import (
    FAMILIES,
    bytes_for,
    dense_fwd_flops,
    flops_for,
    module_bytes,
    param_label,
    torch_semi_structured,
)
from .report import ROW_FIELDS, dtype_name
from .shapes import Shape
from .timing import Roofline, Timing, device_name, rotation_count, time_calls


@dataclasses.dataclass
class BenchConfig:
    """One sweep. ``params`` maps a family name to the settings to sweep (None: its defaults)."""

    methods: Sequence[str]
    shapes: Sequence[Shape]
    tokens: Sequence[int]
    dtypes: Sequence[torch.dtype]
    directions: Sequence[str] = ("fwd", "fwd+bwd")
    params: dict = dataclasses.field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    bias: bool = True
    block_rank: int = 1
    warmup_ms: float = 25
    rep_ms: float = 100
    graph_below_ms: float = 0.1
    use_graph: bool = True
    cpu_figures: bool = False
    name: str = ""

    def check(self) -> None:
        from .families import DIRECTIONS

        for m in self.methods:
            if m not in FAMILIES:
                raise ValueError(f"methods: expected names from {sorted(FAMILIES)}, got {m!r}")
        for d in self.directions:
            if d not in DIRECTIONS:
                raise ValueError(f"directions: expected names from {DIRECTIONS}, got {d!r}")
        for t in self.tokens:
            if isinstance(t, bool) or not isinstance(t, int) or t < 1:
                raise ValueError(f"tokens: expected positive ints, got {t!r}")
        if not self.shapes:
            raise ValueError("shapes: expected at least one shape, got none")


def _grad_inputs(x: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x] + [p for p in params if p.requires_grad]


def make_call(fn: Callable, x: torch.Tensor, g: torch.Tensor, params: Sequence[torch.Tensor], direction: str) -> Callable:
    """One timed call of ``fn(x)`` in ``direction`` (see the module docstring)."""
    if direction == "fwd":
        def call():
            with torch.no_grad():
                return fn(x)
        return call
    xg = x.detach().requires_grad_(True)
    inputs = _grad_inputs(xg, params)
    if direction == "fwd+bwd":
        def call():
            y = fn(xg)
            return torch.autograd.grad(y, inputs, g, allow_unused=True)
        return call
    y = fn(xg)

    def call():
        return torch.autograd.grad(y, inputs, g, retain_graph=True, allow_unused=True)
    return call


class Runner:
    """Runs a :class:`BenchConfig`; ``rows`` and ``messages`` collect the results."""

    def __init__(self, config: BenchConfig, roofline: Roofline, log: Callable[[str], None] = print):
        config.check()
        self.cfg = config
        self.roof = roofline
        self.log = log
        self.rows: list[dict] = []
        self.messages: list[str] = []
        self.device_label = device_name(config.device)

    # ----------------------------------------------------------------------------------------
    def _note(self, msg: str) -> None:
        self.messages.append(msg)
        self.log(msg)

    def _time(self, calls: Sequence[Callable]) -> Timing:
        c = self.cfg
        return time_calls(
            calls, c.device, warmup_ms=c.warmup_ms, rep_ms=c.rep_ms,
            graph_below_ms=c.graph_below_ms, use_graph=c.use_graph,
        )

    def _inputs(self, tokens: int, shape: Shape, dtype: torch.dtype, n: int):
        dev = self.cfg.device
        xs = [torch.randn(tokens, shape.in_features, device=dev, dtype=dtype) for _ in range(n)]
        gs = [torch.randn(tokens, shape.out_features, device=dev, dtype=dtype) for _ in range(n)]
        return xs, gs

    def _row(self, *, method, param, ratio, kept, shape, tokens, dtype, direction, timing, flops,
             formula, nbytes, **extra) -> dict:
        ms = timing.ms
        floor_ms, bound = self.roof.floor_ms(flops, nbytes, dtype_name(dtype))
        row = dict.fromkeys(ROW_FIELDS)
        row.update(
            method=method, param=param, ratio=ratio, params_kept=kept, shape=shape.name,
            shape_label=shape.label, in_features=shape.in_features, out_features=shape.out_features,
            tokens=tokens, dtype=dtype_name(dtype), direction=direction, median_ms=ms,
            min_ms=timing.min_ms, max_ms=timing.max_ms, runs=timing.runs,
            timing=timing.mode, events_ms=timing.events_ms, tflops=flops / (ms * 1e-3) / 1e12,
            gbs=nbytes / (ms * 1e-3) / 1e9, flops=flops, bytes=nbytes, flops_formula=formula,
            floor_ms=floor_ms, floor_bound=bound, floor_fraction=floor_ms / ms if ms else None,
            device=self.device_label, cpu_figures=self.cfg.cpu_figures, note=timing.note,
        )
        row.update(extra)
        return row

    # ----------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        c = self.cfg
        ctx = contextlib.nullcontext()
        if c.device.type == "cpu":
            try:  # CPU figures always come from the references, never the interpreter
                from ..kernels._config import cpu_backend

                ctx = cpu_backend("reference")
            except ImportError:  # pragma: no cover
                pass
        with ctx:
            for dtype in c.dtypes:
                for shape in c.shapes:
                    dense = self._dense(shape, dtype)
                    for method in c.methods:
                        self._family(method, shape, dtype, dense)
        return self.rows

    def _dense(self, shape: Shape, dtype: torch.dtype) -> dict:
        """Time dense ``F.linear``; returns ``{(tokens, direction): ms}``."""
        c = self.cfg
        K, N = shape.in_features, shape.out_features
        es = torch.empty((), dtype=dtype).element_size()
        out = {}
        for tokens in c.tokens:
            wbytes = es * (K * N + (N if c.bias else 0))
            n = rotation_count(es * tokens * (K + N) + wbytes, c.device)
            xs, gs = self._inputs(tokens, shape, dtype, n)
            for direction in c.directions:
                calls = []
                for x, g in zip(xs, gs):
                    w = torch.randn(N, K, device=c.device, dtype=dtype, requires_grad=direction != "fwd")
                    b = torch.randn(N, device=c.device, dtype=dtype, requires_grad=direction != "fwd") if c.bias else None
                    calls.append(make_call(lambda t, w=w, b=b: F.linear(t, w, b), x, g,
                                           [w] + ([b] if b is not None else []), direction))
                t = self._time(calls)
                out[(tokens, direction)] = t.ms
                f = flops_for(direction, dense_fwd_flops(tokens, K, N))
                nb = bytes_for(direction, tokens, K, N, es, wbytes)
                self.rows.append(self._row(
                    method="dense", param="", ratio=1.0, kept=K * N, shape=shape, tokens=tokens,
                    dtype=dtype, direction=direction, timing=t, flops=f, formula="2·M·K·N", nbytes=nb,
                    dense_ms=t.ms, speedup_vs_dense=1.0,
                ))
                del calls
            del xs, gs
        return out

    def _family(self, method: str, shape: Shape, dtype: torch.dtype, dense: dict) -> None:
        c = self.cfg
        fam = FAMILIES[method]
        opts = {"block_rank": c.block_rank}
        params = c.params.get(method) or fam.defaults
        es = torch.empty((), dtype=dtype).element_size()
        for param in params:
            label = param_label(fam, param, opts)
            try:
                proto = fam.random_layer(shape.in_features, shape.out_features, param, dtype, c.device, c.bias, opts)
            except Exception as e:  # noqa: BLE001 - unsupported setting: record and go on
                self._note(f"{method} {label} {shape.name} {dtype_name(dtype)}: cannot build ({type(e).__name__}: {e})")
                continue
            wbytes = module_bytes(proto)
            kept = int(proto.num_weight_params)
            ratio = float(proto.ratio)
            semi = None
            if fam.torch24 and "fwd" in c.directions:
                semi, semi_why = torch_semi_structured(proto)
                if semi is None:
                    self._note(f"{method} {shape.name} {dtype_name(dtype)}: torch 2:4 baseline n/a ({semi_why})")
            for tokens in c.tokens:
                fwd_flops, formula = fam.fwd_flops(proto, tokens)
                n = rotation_count(es * tokens * (shape.in_features + shape.out_features) + wbytes, c.device)
                mods = [proto] + [copy.deepcopy(proto) for _ in range(n - 1)]
                xs, gs = self._inputs(tokens, shape, dtype, n)
                for direction in c.directions:
                    extra = {"dense_ms": dense.get((tokens, direction)), "note": ""}
                    try:
                        ours = self._time([make_call(m, x, g, list(m.parameters()), direction)
                                           for m, x, g in zip(mods, xs, gs)])
                    except Exception as e:  # noqa: BLE001
                        self._note(f"{method} {label} {shape.name} M={tokens} {direction}: failed ({type(e).__name__}: {e})")
                        continue
                    try:
                        unf = self._time([make_call(m.forward_unfused, x, g, list(m.parameters()), direction)
                                          for m, x, g in zip(mods, xs, gs)])
                        extra["unfused_ms"] = unf.ms
                    except Exception as e:  # noqa: BLE001
                        extra["note"] = f"unfused n/a ({type(e).__name__})"
                    if semi is not None and direction == "fwd":
                        b = getattr(proto, "bias", None)
                        try:
                            t24 = self._time([make_call(lambda t, b=b: F.linear(t, semi, b), x, g, [], "fwd")
                                              for x, g in zip(xs, gs)])
                            extra["torch24_ms"] = t24.ms
                        except Exception as e:  # noqa: BLE001
                            extra["note"] = (extra["note"] + f"; torch 2:4 failed ({type(e).__name__})").lstrip("; ")
                    for base in ("dense", "unfused", "torch24"):
                        if extra.get(f"{base}_ms"):
                            extra[f"speedup_vs_{base}"] = extra[f"{base}_ms"] / ours.ms
                    if ours.note:
                        extra["note"] = (extra["note"] + "; " + ours.note).strip("; ")
                    self.rows.append(self._row(
                        method=method, param=label, ratio=ratio, kept=kept, shape=shape, tokens=tokens,
                        dtype=dtype, direction=direction, timing=ours,
                        flops=flops_for(direction, fwd_flops), formula=formula,
                        nbytes=bytes_for(direction, tokens, shape.in_features, shape.out_features, es, wbytes),
                        **extra,
                    ))
                del mods, xs, gs
            del proto, semi
