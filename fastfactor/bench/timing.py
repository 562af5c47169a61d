"""Timing and the roofline for ``fastfactor bench``.

CUDA
    :func:`time_calls` runs ``triton.testing.do_bench`` (warm-up, the L2 cache flushed before each
    run, per-run CUDA events, the **median** returned). When that median is below
    ``graph_below_ms`` the launch overhead of PyTorch/Triton dominates, so the same calls are
    timed again inside one CUDA graph (``triton.testing.do_bench_cudagraph``, median) and that
    figure is reported: it is the device time a graph-captured model would see.

    Inputs are rotated: the caller passes several independent copies of the call (own input,
    own weights); consecutive runs cycle through them, and the copies together exceed twice the
    L2 cache (:func:`rotation_count`), so neither the flushed nor the graph timing measures a
    cache-resident repeat.

CPU
    A wall-clock median over repeated runs (``time.perf_counter``), for the CPU small mode.

Roofline
    :func:`measure_roofline` measures once per run, on the run's device: the matrix rate of a
    large ``torch.matmul`` per dtype (TFLOP/s) and the bandwidth of a large device-to-device copy
    (GB/s, read + write bytes). The floor of a row is ``max(FLOPs/rate, bytes/bandwidth)``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
from typing import Callable, Optional, Sequence

import torch


@dataclasses.dataclass
class Timing:
    """``ms``: the reported median; ``mode``: ``events`` | ``cuda_graph`` | ``cpu_timer``;
    ``events_ms``: the flushed-cache event median when a graph figure replaced it."""

    ms: float
    mode: str
    events_ms: Optional[float] = None
    note: str = ""
    #: the spread of the CPU timer's runs (fastest, slowest), with ``runs`` timed runs
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    runs: Optional[int] = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rotating(calls: Sequence[Callable]) -> Callable:
    it = itertools.cycle(calls)
    return lambda: next(it)()


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 32 << 20
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or (50 << 20))


def rotation_count(bytes_per_call: int, device: torch.device, cap: int = 64, budget: int = 4 << 30) -> int:
    """How many independent copies of a call's operands to cycle through: enough to exceed
    twice the L2 cache (at least 2), within ``cap`` copies and ``budget`` bytes."""
    if device.type != "cuda":
        return 2
    want = math.ceil(2 * l2_bytes(device) / max(1, bytes_per_call))
    fit = max(1, budget // max(1, bytes_per_call))
    return int(max(1, min(cap, fit, max(2, want))))


def _cpu_times(fn: Callable, warmup: int, rep_ms: float, min_runs: int = 3, max_runs: int = 200) -> list:
    """Wall-clock times (ms) of repeated runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (
        len(times) < max_runs and (time.perf_counter() - start) * 1e3 < rep_ms
    ):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _cpu_median(fn: Callable, warmup: int, rep_ms: float, min_runs: int = 3, max_runs: int = 200) -> float:
    return statistics.median(_cpu_times(fn, warmup, rep_ms, min_runs, max_runs))


def time_calls(
    calls: Sequence[Callable],
    device: torch.device,
    *,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    graph_below_ms: float = 0.1,
    use_graph: bool = True,
    min_runs: int = 3,
) -> Timing:
    """Median time of one call, cycling through ``calls`` (see the module docstring);
    ``min_runs``: the fewest timed runs on the CPU."""
    if not calls:
        raise ValueError("calls: expected at least one callable, got none")
    fn = _rotating(calls)
    if device.type != "cuda":
        times = _cpu_times(fn, warmup=max(1, len(calls)), rep_ms=rep_ms, min_runs=min_runs)
        return Timing(statistics.median(times), "cpu_timer", min_ms=min(times), max_ms=max(times), runs=len(times))
    import triton.testing as tt

    for c in calls:  # compile / autotune every variant outside the timed region
        c()
    _sync(device)
    ms = float(tt.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    if not use_graph or ms >= graph_below_ms:
        return Timing(ms, "events")
    try:
        g_ms = float(tt.do_bench_cudagraph(fn, rep=max(20, rep_ms // 5), return_mode="median"))
    except Exception as e:  # noqa: BLE001 - a path that cannot be captured keeps the event time
        torch.cuda.synchronize(device)
        return Timing(ms, "events", note=f"CUDA graph capture failed ({type(e).__name__}), event timing kept")
    return Timing(g_ms, "cuda_graph", events_ms=ms)


@dataclasses.dataclass
class Roofline:
    """Peak rates measured on the run's device."""

    device: str
    matrix_tflops: dict  # dtype name → TFLOP/s of a large matmul
    bandwidth_gbs: float  # device copy, read + write bytes
    gemm_size: int
    copy_bytes: int

    def floor_ms(self, flops: float, nbytes: float, dtype: str) -> tuple[float, str]:
        """``(floor in ms, 'compute' | 'memory')`` for one row."""
        rate = self.matrix_tflops.get(dtype)
        t_c = flops / (rate * 1e12) * 1e3 if rate else 0.0
        t_m = nbytes / (self.bandwidth_gbs * 1e9) * 1e3 if self.bandwidth_gbs else 0.0
        return (t_c, "compute") if t_c >= t_m else (t_m, "memory")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure_roofline(device: torch.device, dtypes: Sequence[torch.dtype], small: bool = False) -> Roofline:
    """Matrix rate per dtype (``n³`` matmul) and copy bandwidth on ``device``, measured once."""
    n = 256 if small or device.type != "cuda" else 8192
    copy_bytes = (16 << 20) if small or device.type != "cuda" else (1 << 30)
    rates = {}
    for dt in dtypes:
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        t = time_calls([lambda: torch.matmul(a, b)], device, warmup_ms=25, rep_ms=100, use_graph=False)
        rates[dtype_name(dt)] = 2 * n**3 / (t.ms * 1e-3) / 1e12
        del a, b
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_calls([lambda: dst.copy_(src)], device, warmup_ms=25, rep_ms=100, use_graph=False)
    bw = 2 * copy_bytes / (t.ms * 1e-3) / 1e9
    del src, dst
    return Roofline(device_name(device), rates, bw, n, copy_bytes)


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dt: torch.dtype) -> str:
    """``fp32`` / ``fp16`` / ``bf16`` (other dtypes: their torch name without ``torch.``)."""
    for k, v in _DTYPES.items():
        if v == dt:
            return k
    return str(dt).replace("torch.", "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import platform

    return f"CPU {name or platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
