"""``make gpu-check`` / ``python -m fastfactor.gpu_check``: the first thing to run on a lent GPU.

In at most ``--budget-s`` seconds (default 480: 8 minutes) on one H100/H200, in place on the
offline GPU image (``PYTHONPATH=$PWD python3 -m fastfactor.gpu_check --out $OUT``):

1. the device and its ceilings, measured (bf16 8192³ matmul; device copy, read + write bytes;
   L2 -> SM bandwidth from repeated reads of a buffer that fits in L2, by torch's sum and by a
   probe kernel of ours (:func:`l2_triton_tbs`); the per-launch floor, one tiny kernel replayed in
   a CUDA graph as the rows are timed);
2. the predictions of ``fastfactor sol`` for the perf tier's rows, computed meanwhile on the CPU
   (a child process under the Triton interpreter, using the committed counts cache when present),
   once with the model's figures (its leads: columns ``_pred``) and once with the ceilings just
   measured in their place (``kernels._cost.calibrated``: columns ``_cal_pred``), so the run
   tells both how far the leads are off and how well the model's form predicts once they are not;
   ``gpu-check.json`` is itself the figures file (``fastfactor sol --figures gpu-check.json``,
   ``FASTFACTOR_DEVICE_FIGURES`` for the dispatchers);
3. the GPU correctness tier (``pytest -m gpu``), as much as fits in its share of the budget;
4. the 2:4 decode variants (issue 15; :func:`time_decode_variants`, ``--variants-s``, default 50 s):
   at W 4096x4096 bf16 and 16, 12 and 1 tokens, our decode kernel with the planner's pick and the
   plans (BLOCK_N, split_k) = (32, 1), (64, 2), (128, 4), each with byte permutes (PRMT) and with
   compare-and-select (``FASTFACTOR_SPARSE24_PRMT=0``), next to PyTorch's 2:4 GEMM (16 tokens),
   dense ``F.linear`` and the planner's predicted times; the dx decode PRMT on / off at 16 tokens;
   at 16 tokens the pick (forward and dx) once more with the autotuner also offered the configs
   without the cp.async pipeline (``FASTFACTOR_SPARSE24_UNPIPELINED=1``: rows ``*_unpipelined``,
   the tuned config in ``config``). It decides the plan policy (``kernels._cost.robust_pick`` vs
   the narrow plan the 9 TB/s L2 lead favours), the PRMT default and whether to offer those configs;
5. every sol row timed on the GPU — ours, dense ``F.linear`` and the unfused PyTorch path — with
   CUDA-graph medians over inputs rotated past the L2 (``fastfactor.bench.timing``); the rows of
   :data:`ROW_ALTERNATIVES` also with a dispatch switch (column ``alternatives``: the Monarch split
   stage 1 off at 3072 -> 768, 16 tokens; the Monarch backward's dw2 from the dx launch off at
   16384 tokens; the dense-sparse library path and the rank split in place of the two-role launch
   at 768 -> 3072, 16 tokens, and cuBLAS's dt, dD and the sum of g in place of the backward's one dense-side launch
   there);
6. ``gpu-check.json``, ``gpu-check.csv`` and ``gpu-check.md`` (measured / predicted per row, ready
   to paste into BENCHMARKS.md) under ``--out``; the decode variants under ``decode_variants`` in the
   JSON and a section of their own in the Markdown (measured µs, predicted µs, one summary line per
   token count).

``--dry`` runs the same script on the CPU with tiny shapes and a short budget (the reference
paths timed by the CPU timer; the decode variants tiny, the reference standing in for the kernels),
so CI checks the script end to end; its figures mean nothing. tests/test_gpu_check_variants.py runs
the decode variants through the interpreted kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

PREDICTED = "predicted, not measured"


def _rows(dry: bool):
    from .sol import tier
    from .sol.rows import RowSpec

    if dry:
        return {
            "lowrank-dry-fwd": RowSpec("lowrank", 96, 160, 24, 0.25, "fwd", "fp32"),
            "lowrank-dry-fwdbwd": RowSpec("lowrank", 96, 160, 24, 0.25, "fwd+bwd", "fp32"),
            "monarch-dry-fwd": RowSpec("monarch", 64, 128, 16, 4, "fwd", "fp32"),
            "sparse24-dry-fwd": RowSpec("sparse24", 64, 96, 16, None, "fwd", "fp32"),
        }
    return dict(tier.ROWS)


def _predict_child(rows: dict, path: str, device: str, figures: Optional[str] = None) -> subprocess.Popen:
    """Start the sol predictions in a child process under the interpreter (CPU work): with the
    model's figures (``figures`` None: the leads, whatever the caller's environment says) or with
    those of the gpu-check file ``figures`` (``FASTFACTOR_DEVICE_FIGURES``)."""
    spec = {k: [s.method, s.in_features, s.out_features, s.tokens, s.param, s.direction, s.dtype]
            for k, s in rows.items()}
    code = (
        "import json, sys\n"
        "from fastfactor.sol.rows import RowSpec, evaluate_row\n"
        "from fastfactor.sol.device import get_device\n"
        f"spec = json.loads({json.dumps(json.dumps(spec))})\n"
        f"dev = get_device({device!r})\n"
        "out = {}\n"
        "for k, a in spec.items():\n"
        "    try:\n"
        "        r = evaluate_row(RowSpec(*a), dev)\n"
        "        out[k] = {f: r[f] for f in ('predicted_ms', 'dense_ms', 'unfused_ms', 'torch24_ms', 'bound', 'kernels')}\n"
        "    except Exception as e:\n"
        "        out[k] = {'error': f'{type(e).__name__}: {e}'}\n"
        f"    json.dump(out, open({path!r}, 'w'))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", FASTFACTOR_CPU_BACKEND="reference")
    from .kernels._cost import FIGURES_ENV

    env.pop(FIGURES_ENV, None)
    if figures:
        env[FIGURES_ENV] = figures
    env.setdefault("PYTHONPATH", os.getcwd())
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _run_meta(name: str, dry: bool, model_dev: str, ceilings: dict) -> dict:
    """What a gpu-check result says of its run: schema, GPU, dry or not, commit, date, the model
    device and the measured ceilings (``kernels._cost.read_figures`` reads these)."""
    from .bench.report import git_commit

    commit, dirty = git_commit()
    return dict(schema="fastfactor-gpu-check/1", device=name, dry=dry, commit=commit, dirty=dirty,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                model_device=model_dev, ceilings=ceilings)


def _figures_file(ceilings: dict, name: str, dry: bool, model_dev: str, folder: str) -> Optional[str]:
    """A gpu-check-shaped file holding only this run's ceilings (so the second predictions child
    can start before the run ends); None on a dry run (CPU figures calibrate nothing)."""
    if dry or not ceilings:
        return None
    path = os.path.join(folder, "figures.json")
    with open(path, "w") as f:
        json.dump(dict(meta=_run_meta(name, dry, model_dev, ceilings)), f)
    return path


_L2_PROBE = {}


def _l2_probe_kernel():
    """The L2 probe kernel, defined on first use (under ``TRITON_INTERPRET=1`` if set by then)."""
    if "k" not in _L2_PROBE:
        import triton
        import triton.language as tl

        @triton.jit
        def _l2_probe(
            src_ptr,   # (n,) fp32 buffer that fits in the L2, n a multiple of BLOCK
            out_ptr,   # (programs, BLOCK) fp32: each program's sums (keeps the loads live)
            n,
            REPS: tl.constexpr,    # passes over the buffer
            BLOCK: tl.constexpr,   # fp32 a program loads per step
        ):
            """Every pass reads the whole buffer once, split over the programs in BLOCK-wide
            chunks; pass ``r`` starts each program ``r`` chunks further on, so no program reads the
            chunk it read the pass before (L1 is bypassed anyway: ``.cg``)."""
            pid = tl.program_id(0)
            nprog = tl.num_programs(0)
            offs = tl.arange(0, BLOCK)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for r in range(REPS):
                for start in range(((pid + r) % nprog) * BLOCK, n, nprog * BLOCK):
                    acc += tl.load(src_ptr + start + offs, cache_modifier=".cg")
            tl.store(out_ptr + pid * BLOCK + offs, acc)

        _L2_PROBE["k"] = _l2_probe
    return _L2_PROBE["k"]


def l2_triton_tbs(device, n: int = 4 << 20, reps: tuple = (8, 24), block: int = 2048, check: bool = True) -> float:
    """L2 -> SM read bandwidth (TB/s) as our kernels see it: :func:`_l2_probe_kernel` over an
    ``n``-float buffer (16 MiB: resident in the L2) with 4 programs an SM, timed at two pass counts;
    the difference of the two times over the difference of the bytes, so the launch floor and the
    first (DRAM) pass cancel. ``check``: the sums must equal the passes times the buffer's sum."""
    import torch

    from .bench.timing import time_calls
    from .kernels import _config

    if n % block:
        raise ValueError(f"n: expected a multiple of block={block}, got {n}")
    k = _l2_probe_kernel()
    progs = 4 * _config.num_sms(device)
    src = torch.rand(n, device=device, dtype=torch.float32)
    out = torch.empty((progs, block), device=device, dtype=torch.float32)
    times = []
    for r in reps:
        call = lambda r=r: k[(progs,)](src, out, n, REPS=r, BLOCK=block)
        times.append(time_calls([call], device, warmup_ms=10, rep_ms=50).ms * 1e-3)
        if check:
            call()
            want, got = float(src.double().sum()) * r, float(out.double().sum())
            if abs(got - want) > 1e-4 * abs(want):
                raise RuntimeError(f"L2 probe: its sums are {got}, expected {want}")
    dt = times[-1] - times[0]
    if dt <= 0:
        raise RuntimeError(f"L2 probe: {reps[-1]} passes timed no slower than {reps[0]} ({times})")
    return (reps[-1] - reps[0]) * n * 4 / dt / 1e12


def measure_ceilings(device, dry: bool) -> dict:
    """bf16 matmul rate, device copy bandwidth (read + write), L2 -> SM read bandwidth and the
    per-launch floor: the figures ``FASTFACTOR_DEVICE_FIGURES`` / ``fastfactor sol --figures``
    put in place of the model's leads (``kernels._cost.calibrated``)."""
    import torch

    from .bench.timing import time_calls

    n = 256 if dry else 8192
    dt = torch.float32 if dry else torch.bfloat16
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    t = time_calls([lambda: torch.matmul(a, b)], device, warmup_ms=25, rep_ms=100, use_graph=False)
    out = {"matmul_tflops": 2 * n ** 3 / (t.ms * 1e-3) / 1e12, "matmul_n": n}
    del a, b
    nbytes = (8 << 20) if dry else (1 << 30)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_calls([lambda: dst.copy_(src)], device, warmup_ms=25, rep_ms=100, use_graph=False)
    out["copy_tbs"] = 2 * nbytes / (t.ms * 1e-3) / 1e12
    del src, dst
    # L2: sum a 16 MiB buffer many times (it stays in the L2 between reads)
    small = torch.empty((4 << 20) if not dry else (1 << 18), dtype=torch.float32, device=device).uniform_()
    reps = 1 if dry else 32
    t = time_calls([lambda: [small.sum() for _ in range(reps)]], device, warmup_ms=10, rep_ms=50, use_graph=not dry)
    out["l2_read_tbs"] = reps * small.numel() * 4 / (t.ms * 1e-3) / 1e12
    del small
    if not dry:   # the same from a kernel of ours: 16-byte loads cached in L2 only, every SM busy
        try:
            out["l2_triton_tbs"] = l2_triton_tbs(device)
        except Exception as e:  # noqa: BLE001 - the torch figure above stands; the run goes on
            print(f"gpu-check: L2 probe kernel failed ({type(e).__name__}: {e}); l2_read_tbs stands", flush=True)
    # the launch floor: one tiny kernel, timed as the rows are (below 0.1 ms: replayed in a CUDA graph)
    tiny = torch.zeros(1, device=device)
    t = time_calls([lambda: tiny.add_(1.0)], device, warmup_ms=10, rep_ms=50, use_graph=not dry)
    out["launch_us"] = t.ms * 1e3
    return out


def run_gpu_tests(budget_s: float, out_dir: str, dry: bool) -> dict:
    """``pytest -m gpu`` within ``budget_s`` (dry: only collected, nothing runs on a CPU)."""
    if dry:
        return {"skipped": "dry run: the GPU tier needs a CUDA device"}
    log = os.path.join(out_dir, "gpu-tests.log")
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-x", "-p", "no:cacheprovider",
                            "tests"], capture_output=True, text=True, timeout=max(30, budget_s))
        text = p.stdout + p.stderr
        rc = p.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = "timeout"
    with open(log, "w") as f:
        f.write(text)
    tail = [l for l in text.splitlines() if l.strip()][-1:] or [""]
    return {"returncode": rc, "seconds": round(time.time() - t0, 1), "summary": tail[0], "log": log}


#: rows whose "ours" is timed again under a dispatch switch (``label -> environment``), so the first
#: GPU says whether a choice the model made holds: the Monarch row-block kernel's split stage 1
#: (issue 15) against the same kernel unsplit (``FASTFACTOR_MONARCH_KSPLIT=0``), the backward
#: reading ``g`` once (dw2 / db from the dx launch) against the pair launch reading it again
#: (``FASTFACTOR_MONARCH_DW2=0``), and the dense-sparse two-role launch's producers split over K
#: against the unsplit launch (``FASTFACTOR_DS_ROLES_KSPLIT=0``) and the library path, and its
#: consumers without their first step of ``D`` loaded before the wait (``FASTFACTOR_DS_ROLES_PREFETCH=0``)
ROW_ALTERNATIVES = {
    "monarch-3072x768-M16-fwd": {"ksplit_off": {"FASTFACTOR_MONARCH_KSPLIT": "0"}},
    "monarch-768x3072-M16384-fwdbwd": {"dw2_off": {"FASTFACTOR_MONARCH_DW2": "0"}},
    "monarch-3072x768-M16384-fwdbwd": {"dw2_off": {"FASTFACTOR_MONARCH_DW2": "0"}},
    "monarch-dry-fwd": {"ksplit_off": {"FASTFACTOR_MONARCH_KSPLIT": "0"}},
    "dense_sparse-768x3072-M16-fwd": {"library": {"FASTFACTOR_DS_PATH": "library"},
                                      "rank_split": {"FASTFACTOR_DS_PATH": "rank_split"},
                                      "ksplit_off": {"FASTFACTOR_DS_ROLES_KSPLIT": "0"},
                                      "prefetch_off": {"FASTFACTOR_DS_ROLES_PREFETCH": "0"}},
    # the two roles' producers split over K (issue 15) against the same launch unsplit, and the
    # library path it replaced at 4096²
    "dense_sparse-4096-M16-fwd": {"library": {"FASTFACTOR_DS_PATH": "library"},
                                  "ksplit_off": {"FASTFACTOR_DS_ROLES_KSPLIT": "0"}},
    "dense_sparse-768x3072-M16-fwdbwd": {"library_bwd": {"FASTFACTOR_DS_BWD_DENSE": "0"}},
}


@contextlib.contextmanager
def _env(values: dict):
    """The environment variables ``values`` set inside (``None``: unset), then put back as found
    (the launchers read them at each launch)."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _read_preds(child, path: str, what: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if child.stderr is not None:
        print(f"gpu-check: {what} failed: {child.stderr.read()[-500:]}", flush=True)
    return {}


def time_row(spec, device, dry: bool, alternatives: Optional[dict] = None) -> dict:
    """Measured ms of ours, dense and unfused for one sol row (bench's timing and rotation); with
    ``alternatives`` (``label -> environment``) also ``ours`` under each (``ours_<label>_ms``)."""
    import torch
    import torch.nn.functional as F

    from .bench.families import FAMILIES
    from .bench.runner import make_call
    from .bench.timing import rotation_count, time_calls

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec.dtype]
    fam = FAMILIES[spec.method]
    M, K, N = spec.tokens, spec.in_features, spec.out_features
    proto = fam.random_layer(K, N, spec.param, dt, device, True, {"block_rank": 1})
    es = torch.empty((), dtype=dt).element_size()
    wbytes = sum(p.numel() * p.element_size() for p in list(proto.parameters()) + list(proto.buffers()))
    n = 2 if dry else rotation_count(es * M * (K + N) + wbytes, device)
    import copy

    mods = [proto] + [copy.deepcopy(proto) for _ in range(n - 1)]
    xs = [torch.randn(M, K, device=device, dtype=dt) for _ in range(n)]
    gs = [torch.randn(M, N, device=device, dtype=dt) for _ in range(n)]
    kw = dict(warmup_ms=5 if dry else 25, rep_ms=10 if dry else 100)
    res = {}
    res["ours_ms"] = time_calls([make_call(m, x, g, list(m.parameters()), spec.direction)
                                 for m, x, g in zip(mods, xs, gs)], device, **kw).ms
    for label, env in (alternatives or {}).items():
        with _env(env):
            res[f"ours_{label}_ms"] = time_calls([make_call(m, x, g, list(m.parameters()), spec.direction)
                                                  for m, x, g in zip(mods, xs, gs)], device, **kw).ms
    res["unfused_ms"] = time_calls([make_call(m.forward_unfused, x, g, list(m.parameters()), spec.direction)
                                    for m, x, g in zip(mods, xs, gs)], device, **kw).ms
    calls = []
    for x, g in zip(xs, gs):
        w = torch.randn(N, K, device=device, dtype=dt, requires_grad=spec.direction != "fwd")
        b = torch.randn(N, device=device, dtype=dt, requires_grad=spec.direction != "fwd")
        calls.append(make_call(lambda t, w=w, b=b: F.linear(t, w, b), x, g, [w, b], spec.direction))
    res["dense_ms"] = time_calls(calls, device, **kw).ms
    return res


# --------------------------------------------------------------------------------------------
# Decode variants (issue 15): the two choices of the 2:4 decode kernels the CPU model cannot settle
# --------------------------------------------------------------------------------------------

#: W (out, in) of the section; token counts, 16 first (the shape the choices were made at; 12: a
#: count PyTorch's 2:4 GEMM does not take; 1: one token); plans (BLOCK_N, split_k) forced besides
#: the planner's pick: narrow without a split (fastest at the 9 TB/s L2 lead) to wide with four
VARIANT_W = (4096, 4096)
VARIANT_TOKENS = (16, 12, 1)
VARIANT_PLANS = ((32, 1), (64, 2), (128, 4))
#: dry: tiny, through the interpreted kernels when the interpreter is on (the test), else the
#: reference as a stand-in (the CLI's --dry, where only the script itself is checked)
DRY_VARIANT_W = (32, 512)
DRY_VARIANT_TOKENS = (16,)
DRY_VARIANT_PLANS = ((32, 1),)
#: the section's default time (``--variants-s``); skipped when less than VARIANT_MIN_S of the budget is left
VARIANT_S = 50.0
VARIANT_MIN_S = 10.0
PRMT_ENV = "FASTFACTOR_SPARSE24_PRMT"


def _prmt_env(on: bool):
    """The 2:4 expansion of the launches inside: byte permutes (``PRMT_ENV`` unset, the default) or
    compare-and-select (``PRMT_ENV=0``). The launchers read the variable at each launch."""
    return _env({PRMT_ENV: None if on else "0"})


def _unpipelined_env():
    """The decode kernels' autotuner inside also times their configs without the cp.async pipeline
    (``FASTFACTOR_SPARSE24_UNPIPELINED=1``, read at each prune)."""
    from .kernels.sparse24 import UNPIPELINED_ENV

    return _env({UNPIPELINED_ENV: "1"})


def _config_str(c) -> str:
    kw = ",".join(f"{k}={v}" for k, v in sorted(getattr(c, "kwargs", {}).items()))
    return f"{kw},w{getattr(c, 'num_warps', '?')},s{getattr(c, 'num_stages', '?')}"


@contextlib.contextmanager
def _own_tuning(tunable, picked: list):
    """Autotune afresh inside, then put the process's earlier tunings back. Triton specializes the
    binary on every constexpr value (PRMT=2 and PRMT=0 are two compiles), but the autotune key of
    the decode kernels (``kernels._config.Tunable`` -> ``triton.autotune(key=[...])``: the shape,
    the plan and the argument dtypes) does not hold PRMT: without this the second expansion would
    launch the config tuned for the first. ``picked`` receives the configs tuned inside."""
    at = getattr(tunable, "tuned", None)
    cache = getattr(at, "cache", None)
    if not isinstance(cache, dict):
        yield
        return
    saved = dict(cache)
    cache.clear()
    disk = getattr(at, "cache_results", False)
    if disk:  # the on-disk tuning cache (TRITON_CACHE_AUTOTUNING=1) has the same key
        at.cache_results = False
    try:
        yield
        picked.extend(_config_str(c) for c in cache.values())
    finally:
        cache.clear()
        cache.update(saved)
        if disk:
            at.cache_results = disk


def time_decode_variants(device, dry: bool, seconds: float = VARIANT_S) -> dict:
    """Time the variants of the 2:4 decode kernels at ``W (N, K) = VARIANT_W`` bf16 with bias, in
    at most about ``seconds`` (a variant not started by then is reported as skipped):

    * ``decode``: ``y = x·Wᵀ + b`` for ``M`` in ``VARIANT_TOKENS`` by :func:`sparse24_decode` with
      the planner's pick and each of ``VARIANT_PLANS`` — *decides the plan policy* (is the narrow
      plan faster at every M, i.e. is the L2 lead right, or does the robust pick hold up?) — each
      with byte permutes and with compare-and-select — *decides the PRMT default*;
    * ``decode_mma``: the decode on sparse tensor cores (``sparse24_decode_mma``, ``mma.sp``; bf16,
      ``M <= 16``) with its planner's pick and the variant plans it has — *the first run of that
      instruction on hardware* (checked against fp32 like every row), and *decides whether the
      dispatch should take it* (``dispatched``: what it takes now, predicted); its pick again with
      the 4-bit codes (``decode_mma_4bit``) and with the split partials kept in L2
      (``decode_mma_kept``) — *decides the two byte savings*;
    * ``torch24``: PyTorch's 2:4 GEMM where it takes ``M`` (``M % 8 == 0``), what ``choose_mm_path``
      takes at 16 tokens on an ideal roofline — *decides whether it should*; ``dense``: ``F.linear``;
    * ``dx_decode``: ``dx = g·W`` (with ``db``) at the first ``M``, PRMT on / off; ``dense_dx``: ``g @ W``.

    Each decode row carries the planner's prediction for its plan (``decode_plans``: ``pred_us`` at
    the nominal L2 -> SM figure, ``pred_low_us`` at its low end; *predicted*) next to the measured
    CUDA-graph median (``measured_us``, rotated inputs: ``fastfactor.bench.timing``), and its output
    is checked against fp32 (``rel_err``, an ``error`` above 2e-2)."""
    import torch
    import torch.nn.functional as F

    from .bench.timing import rotation_count, time_calls
    from .formats.sparse24 import pack_24, prune_24
    from .kernels import _config, _cost
    from .kernels import sparse24 as K

    t0 = time.time()
    t_end = t0 + seconds
    N, Kin = DRY_VARIANT_W if dry else VARIANT_W
    tokens, plans = (DRY_VARIANT_TOKENS, DRY_VARIANT_PLANS) if dry else (VARIANT_TOKENS, VARIANT_PLANS)
    dt = torch.bfloat16
    w = pack_24(prune_24(torch.randn(N, Kin, device=device, dtype=dt)))
    wd = w.to_dense()
    bias = torch.randn(N, device=device, dtype=dt)
    kernels = _config.use_triton(wd)  # a GPU, or the interpreter (the test)
    if kernels:
        decode = lambda x, v, m, plan: K.sparse24_decode(x, v, m, bias, plan=plan)
        decode_mma = lambda x, v, m, plan: K.sparse24_decode_mma(x, v, m, bias, plan=plan)
        dx_decode = lambda g, v, m, db: K.sparse24_dx_decode(g, v, m, db=db)
    else:  # dry without the interpreter: the reference stands in (the figures mean nothing)
        decode = lambda x, v, m, plan: K.sparse24_linear_ref(x, v, m, bias)
        decode_mma = decode
        dx_decode = lambda g, v, m, db: (db.copy_(g.sum(0)), g @ K.unpack_24(v, m, Kin))[1]
    n = 1 if dry else rotation_count(w.num_bytes() + 2 * max(tokens) * (Kin + N), device)
    packed = [(w.values.clone(), w.meta.clone()) for _ in range(n)]
    dense = [wd.clone() for _ in range(n)]
    sms = _config.num_sms(device)
    kw = dict(warmup_ms=1, rep_ms=1, min_runs=1) if dry else dict(warmup_ms=10, rep_ms=50)
    rows = []

    def run(row, calls, ref, tunable=None):
        """Check the first call against ``ref``, then time the calls into ``row`` (µs)."""
        rows.append(row)
        if time.time() > t_end:
            row["note"] = "skipped: time budget"
            return
        picked = []
        try:
            with _own_tuning(tunable, picked):
                out = calls[0]().float()
                row["rel_err"] = float((out - ref).abs().max() / (1 + ref.abs().max()))
                t = time_calls(calls, device, **kw)
            row.update(measured_us=t.ms * 1e3, timing=t.mode, note=t.note or None)
            if picked:
                row["config"] = picked[0]
            if not row["rel_err"] <= 2e-2:
                row["error"] = f"wrong result: max error {row['rel_err']:.3g} of the fp32 reference's scale"
        except Exception as e:  # noqa: BLE001 - a failing variant is reported, the others go on
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        print("  variant " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in row.items() if v is not None), flush=True)

    for M in tokens:
        xs = [torch.randn(M, Kin, device=device, dtype=dt) for _ in range(n)]
        ref = F.linear(xs[0].float(), wd.float(), bias.float())
        if K.mma_decode_ok(xs[0], packed[0][0]):
            # the decode on sparse tensor cores (mma.sp): its pick and the variant plans it has, checked
            # against fp32 like every row (the first run of mma.sp on hardware), and whether the
            # dispatch takes it over the expanding decode (``dispatched``, predicted)
            _, mbn, msk = K.mma_decode_plan_cost(M, N, Kin, sms)
            mpred = {p: (a, b) for a, b, p in K.mma_decode_plans(M, N, Kin, sms)}
            wins = K.mma_decode_wins(M, N, Kin, sms)
            for plan in dict.fromkeys(((mbn, msk),) + tuple(p for p in plans if p[0] in K.MMA_TILES)):
                a, b = mpred.get(plan, (None, None))
                row = dict(op="decode_mma", tokens=M, plan=f"{plan[0]}x{plan[1]}", pick=plan == (mbn, msk),
                           dispatched=wins, pred_us=a and a * 1e6, pred_low_us=b and b * 1e6)
                calls = [lambda x=x, v=v, m=m, plan=plan: decode_mma(x, v, m, plan) for x, (v, m) in zip(xs, packed)]
                run(row, calls, ref, K._sp_decode_mma_tuned)
                if plan == (mbn, msk):
                    # the pick with each of its two byte savings turned off: the 4-bit codes
                    # (decode_mma_4bit) and the split partials kept in L2 (decode_mma_kept)
                    for op, env in (("decode_mma_4bit", {"FASTFACTOR_SPARSE24_CODES3": "0"}),
                                    ("decode_mma_kept", {"FASTFACTOR_SPLIT_DISCARD": "0"})):
                        with _env(env):
                            a2, b2, _ = next((p_ for p_ in K.mma_decode_plans(M, N, Kin, sms) if p_[2] == plan),
                                             (None, None, None))
                            run(dict(op=op, tokens=M, plan=row["plan"], pick=True, dispatched=wins,
                                     pred_us=a2 and a2 * 1e6, pred_low_us=b2 and b2 * 1e6),
                                calls, ref, K._sp_decode_mma_tuned)
        for on in (True, False):
            with _prmt_env(on):
                prmt = K.prmt_mode(True)  # the PRMT constexpr of the launches: 2 prmt.b32, 1 interpreted, 0 select
                pick = K.decode_plan(M, N, Kin, sms)
                pred = {p: (a, b) for a, b, p in K.decode_plans(M, N, Kin, sms)}  # issue model of this PRMT
                for plan in dict.fromkeys((pick,) + tuple(plans)):
                    a, b = pred.get(plan, (None, None))
                    row = dict(op="decode", tokens=M, plan=f"{plan[0]}x{plan[1]}", pick=plan == pick, prmt=prmt,
                               pred_us=a and a * 1e6, pred_low_us=b and b * 1e6)
                    calls = [lambda x=x, v=v, m=m, plan=plan: decode(x, v, m, plan) for x, (v, m) in zip(xs, packed)]
                    run(row, calls, ref, K._sp_decode_tuned)
                    if plan == pick and on and M == tokens[0]:
                        # the pick again, its autotuner also offered the configs without the pipeline
                        with _unpipelined_env():
                            run(dict(op="decode_unpipelined", tokens=M, plan=row["plan"], pick=True, prmt=prmt,
                                     pred_us=row["pred_us"], pred_low_us=row["pred_low_us"]),
                                calls, ref, K._sp_decode_tuned)
        if K.torch24_eligible(M, Kin, N, dt, device):
            run(dict(op="torch24", tokens=M), [lambda x=x, v=v, m=m: K.torch24_linear(x, v, m, bias)
                                               for x, (v, m) in zip(xs, packed)], ref)
        run(dict(op="dense", tokens=M), [lambda x=x, wi=wi: F.linear(x, wi, bias) for x, wi in zip(xs, dense)], ref)
        if M != tokens[0]:
            continue
        gs = [torch.randn(M, N, device=device, dtype=dt) for _ in range(n)]
        db = torch.empty(N, device=device, dtype=dt)
        dref = gs[0].float() @ wd.float()
        for on in (True, False):
            with _prmt_env(on):
                prmt = K.prmt_mode(True)
                t_nom, bk, sk = K.dx_decode_plan_cost(M, N, Kin, sms)
                low = {p: b for _, b, p in K.dx_decode_plans(M, N, Kin, sms)}.get((bk, sk))
                row = dict(op="dx_decode", tokens=M, plan=f"{bk}x{sk}", pick=True, prmt=prmt,
                           pred_us=t_nom * 1e6, pred_low_us=low and low * 1e6)
                calls = [lambda g=g, v=v, m=m: dx_decode(g, v, m, db) for g, (v, m) in zip(gs, packed)]
                run(row, calls, dref, K._sp_dx_decode_tuned)
                if on:
                    with _unpipelined_env():
                        run(dict(op="dx_decode_unpipelined", tokens=M, plan=f"{bk}x{sk}", pick=True, prmt=prmt,
                                 pred_us=t_nom * 1e6, pred_low_us=low and low * 1e6), calls, dref, K._sp_dx_decode_tuned)
        run(dict(op="dense_dx", tokens=M), [lambda g=g, wi=wi: g @ wi for g, wi in zip(gs, dense)], dref)

    dev = _cost.DEFAULT
    return dict(shape=f"W {N}x{Kin} bf16 2:4, bias", sms=sms, rotated_copies=n,
                seconds=round(time.time() - t0, 1),
                impl="kernels" if kernels else "reference stand-in (dry run without the interpreter)",
                predicted=f"{PREDICTED}: kernels/sparse24.decode_plans / dx_decode_plans, {dev.name} model, "
                          f"L2 -> SM {dev.l2_bw / 1e12:g} TB/s (pred_us, a lead) and {dev.l2_bw_low / 1e12:g} TB/s "
                          "(pred_low_us)",
                rows=rows, summary=_variant_summary(rows))


def _variant_summary(rows: list) -> list:
    """One line per token count: what the decode-variant timings decide (measured figures)."""
    out = []
    for M in dict.fromkeys(r["tokens"] for r in rows):
        got = {(r["op"], r.get("plan"), r.get("prmt")): r for r in rows if r["tokens"] == M and r.get("measured_us")}
        dec = [r for (op, _, _), r in got.items() if op == "decode"]
        if not dec:
            continue
        best = min(dec, key=lambda r: r["measured_us"])
        on = max(r["prmt"] for r in dec)
        pick = next((r for r in dec if r["pick"] and r["prmt"] == on), None)
        pbest = min((r for r in dec if r.get("pred_us") and r["prmt"] == on), key=lambda r: r["pred_us"], default=None)
        line = f"M={M}: fastest decode {best['plan']} PRMT={best['prmt']} {best['measured_us']:.2f} us"
        if pbest is not None:
            line += f" (fastest predicted at the L2 lead: {pbest['plan']})"
        if pick is not None:
            line += f"; the planner's pick {pick['plan']} {pick['measured_us'] / best['measured_us']:.2f}x the fastest"
        ratios = [got[("decode", r["plan"], 0)]["measured_us"] / r["measured_us"]
                  for r in dec if r["prmt"] == on and on and ("decode", r["plan"], 0) in got]
        if ratios:
            line += f"; select / prmt time {min(ratios):.2f}-{max(ratios):.2f} over the plans"
        unp = got.get(("decode_unpipelined", pick and pick["plan"], on))
        if unp is not None and pick is not None:
            line += (f"; the pick with unpipelined configs offered {unp['measured_us'] / pick['measured_us']:.2f}x "
                     f"its time (tuned: {unp.get('config') or '?'})")
        mma = [r for (op, _, _), r in got.items() if op == "decode_mma"]
        if mma and pick is not None:
            mb = min(mma, key=lambda r: r["measured_us"])
            mp = next((r for r in mma if r["pick"]), mb)
            line += (f"; sparse tensor cores (mma.sp) fastest {mb['plan']} {mb['measured_us']:.2f} us, its pick "
                     f"{mp['plan']} {mp['measured_us'] / pick['measured_us']:.2f}x the expanding pick's time "
                     f"(dispatched: {'mma.sp' if mp.get('dispatched') else 'expanding'})")
        for op in ("torch24", "dense"):
            if (op, None, None) in got and pick is not None:
                line += f"; {op} {got[(op, None, None)]['measured_us'] / pick['measured_us']:.2f}x the pick's time"
        out.append(line)
    return out


def _variants_md(variants: dict, fmt) -> str:
    """The decode-variant section of ``gpu-check.md``."""
    text = "\n## 2:4 decode variants (issue 15: plan policy, PRMT default, pipeline)\n\n"
    if "rows" not in variants:
        return text + f"Not run: {variants.get('skipped') or variants.get('error')}\n"
    text += (f"{variants['shape']}, {variants['impl']}, {variants['sms']} SMs. `measured_us`: median µs "
             f"(`timing`: cuda_graph where capture worked; {variants['rotated_copies']} rotated copies); "
             f"`pred_us` / `pred_low_us`: {variants['predicted']}. plan: BLOCK_N x split_k (dx: BLOCK_K x split_n); prmt: the PRMT "
             "constexpr (2 byte permutes, 1 the same in integer ops (interpreter), 0 compare-and-select); "
             "decode_mma: the decode on sparse tensor cores (mma.sp), dispatched: whether the dispatch takes it "
             "(predicted).\n\n")
    cols = ["op", "tokens", "plan", "pick", "prmt", "dispatched", "measured_us", "pred_us", "pred_low_us", "timing",
            "config", "rel_err", "note", "error"]
    text += "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for r in variants["rows"]:
        text += "| " + " | ".join(fmt(r.get(c)) for c in cols) + " |\n"
    return text + "\n" + "".join(f"- {line}\n" for line in variants["summary"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastfactor.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "profiling/results/gpu-check",
                   help="folder for gpu-check.json/.csv/.md (default: $OUT, else profiling/results/gpu-check)")
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes, short budget: checks the script itself")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 480; dry 240)")
    p.add_argument("--no-tests", action="store_true", help="skip the GPU correctness tier")
    p.add_argument("--variants-s", type=float, default=VARIANT_S,
                   help=f"seconds for the 2:4 decode-variant timings (default {VARIANT_S:g}; 0 skips them)")
    p.add_argument("--device", default=None, help="model device for the predictions: h200 or h100 (default from the GPU name)")
    args = p.parse_args(argv)

    t_start = time.time()
    budget = args.budget_s if args.budget_s is not None else (240.0 if args.dry else 480.0)
    if budget <= 0:
        print(f"gpu-check: --budget-s: expected a positive number of seconds, got {budget}", file=sys.stderr)
        return 2
    import torch

    if args.dry:
        os.environ.setdefault("FASTFACTOR_CPU_BACKEND", "reference")
        device = torch.device("cpu")
        name = "cpu (dry run)"
    else:
        if not torch.cuda.is_available():
            print("gpu-check: no CUDA device (use --dry to check the script on a CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(0)
    model_dev = args.device or ("h100" if "H100" in name else "h200")
    os.makedirs(args.out, exist_ok=True)
    rows = _rows(args.dry)
    pred_path = os.path.join(tempfile.mkdtemp(prefix="gpu-check-"), "pred.json")
    child = _predict_child(rows, pred_path, model_dev)
    print(f"gpu-check: {name}; {len(rows)} rows; budget {budget:.0f} s; predictions computing in pid {child.pid}",
          flush=True)

    ceilings = measure_ceilings(device, args.dry)
    print("ceilings: " + ", ".join(f"{k}={v:.3g}" for k, v in ceilings.items()), flush=True)
    # the same predictions with the figures just measured in place of the leads (not on a dry run)
    cal_file = _figures_file(ceilings, name, args.dry, model_dev, os.path.dirname(pred_path))
    cal_path = os.path.join(os.path.dirname(pred_path), "pred-measured-figures.json")
    cal_child = _predict_child(rows, cal_path, model_dev, cal_file) if cal_file else None
    tests = {"skipped": "--no-tests"} if args.no_tests else run_gpu_tests(0.3 * budget, args.out, args.dry)
    print(f"gpu tests: {tests}", flush=True)

    # the 2:4 decode variants (plan policy, PRMT default): before the rows, within 85 % of the budget
    left = min(args.variants_s, 0.85 * budget - (time.time() - t_start))
    if args.variants_s <= 0:
        variants = {"skipped": "--variants-s 0"}
    elif left < VARIANT_MIN_S:
        variants = {"skipped": f"time budget ({max(0.0, left):.0f} s left)"}
    else:
        try:
            variants = time_decode_variants(device, args.dry, left)
        except Exception as e:  # noqa: BLE001 - reported; the rows still run
            variants = {"error": f"{type(e).__name__}: {e}"[:500]}
    for line in variants.get("summary", [variants.get("skipped") or variants.get("error")]):
        print(f"decode variants: {line}", flush=True)

    measured = {}
    for key, spec in rows.items():
        if time.time() - t_start > 0.85 * budget:
            measured[key] = {"error": "skipped: time budget"}
            continue
        try:
            measured[key] = time_row(spec, device, args.dry, ROW_ALTERNATIVES.get(key))
        except Exception as e:  # noqa: BLE001 - a failing row is reported, the check goes on
            measured[key] = {"error": f"{type(e).__name__}: {e}"}
        print(f"  {key}: {measured[key]}", flush=True)

    wait = max(5.0, budget - (time.time() - t_start) - 5)
    try:
        child.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    preds = _read_preds(child, pred_path, "predictions")
    cal_preds = {}
    if cal_child is not None:
        try:
            cal_child.wait(timeout=max(5.0, budget - (time.time() - t_start) - 3))
        except subprocess.TimeoutExpired:
            cal_child.kill()
            cal_child.wait()
        cal_preds = _read_preds(cal_child, cal_path, "predictions with the measured figures")

    table = []
    for key, spec in rows.items():
        m, pr = measured.get(key, {}), preds.get(key, {})
        r = dict(row=key, method=spec.method, shape=f"{spec.in_features}x{spec.out_features}", tokens=spec.tokens,
                 direction=spec.direction, dtype=spec.dtype)
        for f in ("ours", "dense", "unfused"):
            r[f"{f}_ms"] = m.get(f"{f}_ms")
            pk = "predicted_ms" if f == "ours" else f"{f}_ms"
            r[f"{f}_pred_ms"] = pr.get(pk)
            if r[f"{f}_ms"] and r[f"{f}_pred_ms"]:
                r[f"{f}_measured_over_predicted"] = r[f"{f}_ms"] / r[f"{f}_pred_ms"]
        if m.get("ours_ms"):
            r["speedup_vs_dense"] = (m.get("dense_ms") or 0) / m["ours_ms"]
            r["speedup_vs_unfused"] = (m.get("unfused_ms") or 0) / m["ours_ms"]
        cp = cal_preds.get(key, {})
        r["ours_cal_pred_ms"] = cp.get("predicted_ms")
        if r["ours_ms"] and r["ours_cal_pred_ms"]:
            r["ours_measured_over_cal_predicted"] = r["ours_ms"] / r["ours_cal_pred_ms"]
        if cp.get("predicted_ms") and cp.get("dense_ms"):
            r["cal_pred_speedup_vs_dense"] = cp["dense_ms"] / cp["predicted_ms"]
        if pr.get("predicted_ms"):
            r["pred_speedup_vs_dense"] = pr["dense_ms"] / pr["predicted_ms"] if pr.get("dense_ms") else None
            r["pred_speedup_vs_unfused"] = pr["unfused_ms"] / pr["predicted_ms"] if pr.get("unfused_ms") else None
        alts = {k[len("ours_"):-len("_ms")]: v for k, v in m.items()
                if k.startswith("ours_") and k.endswith("_ms") and k != "ours_ms"}
        if alts:
            r["alternatives"] = "; ".join(f"{k} {v:.4g} ms ({v / m['ours_ms']:.2f}x ours)" if m.get("ours_ms") else
                                          f"{k} {v:.4g} ms" for k, v in alts.items())
        r["error"] = m.get("error") or pr.get("error")
        table.append(r)

    meta = dict(_run_meta(name, args.dry, model_dev, ceilings), torch=torch.__version__, tests=tests,
                predictions=PREDICTED, seconds=round(time.time() - t_start, 1))
    commit = meta["commit"]
    base = os.path.join(args.out, "gpu-check")
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=table, decode_variants=variants), f, indent=1, default=str)
    cols = ["row", "ours_ms", "ours_pred_ms", "ours_cal_pred_ms", "dense_ms", "dense_pred_ms", "unfused_ms",
            "unfused_pred_ms", "speedup_vs_dense", "pred_speedup_vs_dense", "cal_pred_speedup_vs_dense",
            "speedup_vs_unfused", "pred_speedup_vs_unfused", "alternatives", "error"]
    with open(base + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "commit", "dry"] + cols)
        for r in table:
            w.writerow([name, commit, args.dry] + [r.get(c) for c in cols])
    fmt = lambda v: "—" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
    with open(base + ".md", "w") as f:
        f.write(f"Measured on {name}{' (DRY RUN: CPU, tiny shapes, figures meaningless)' if args.dry else ''}, "
                f"commit {commit[:12]}, {meta['date']}; `_pred` columns are the sol model ({PREDICTED}), "
                f"`_cal_pred` the same model with the ceilings below in place of its leads "
                f"(`fastfactor sol --figures gpu-check.json`).\n\n")
        f.write("ceilings: " + ", ".join(f"{k} {v:.3g}" for k, v in ceilings.items()) + "\n\n")
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in table:
            f.write("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |\n")
        f.write(_variants_md(variants, fmt))
    print(open(base + ".md").read())
    print(f"gpu-check: wrote {base}.json/.csv/.md in {meta['seconds']} s")
    ok = all(not r["error"] for r in table) and not variants.get("error") and \
        not any(r.get("error") for r in variants.get("rows", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
