"""One ``fastfactor sol`` row: a bench row (family, shape, tokens, setting, direction, dtype)
recorded, counted and modelled. **Predicted, not measured.**"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..bench.families import FAMILIES, flops_for, param_label
from ..kernels import _config, _cost
from . import count as C
from . import model
from . import record as R
from .device import Device

_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class RowSpec:
    method: str
    in_features: int
    out_features: int
    tokens: int
    param: object
    direction: str = "fwd"
    dtype: str = "bf16"

    @property
    def shape(self) -> str:
        return f"{self.in_features}x{self.out_features}"

    def key(self) -> str:
        p = "" if self.param is None else f"{self.param:g}"
        return f"{self.method}:{self.shape}:M={self.tokens}:{p}:{self.direction}:{self.dtype}"


_MODULES: dict = {}


def build_module(spec: RowSpec, block_rank: int = 1):
    """The family's layer at this shape and setting (random factors; cached per process)."""
    k = (spec.method, spec.in_features, spec.out_features, spec.param, spec.dtype, block_rank)
    if k not in _MODULES:
        fam = FAMILIES[spec.method]
        torch.manual_seed(0)
        with _config.cpu_backend("reference"):
            _MODULES[k] = fam.random_layer(spec.in_features, spec.out_features, spec.param,
                                           _DT[spec.dtype], torch.device("cpu"), True, {"block_rank": block_rank})
    return _MODULES[k]


# --------------------------------------------------------------------------------------------
# count cache: counts depend only on the kernel source, the argument shapes/strides/ints and config
# --------------------------------------------------------------------------------------------

def _cache_dir() -> str:
    d = os.environ.get("FASTFACTOR_SOL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastfactor", "sol")
    return d


_SRC_HASH: dict = {}


def _source_hash(fn) -> str:
    """Hash of the kernel's own source and of the ``@triton.jit`` helpers it calls (so edits
    elsewhere in its module keep the cache), plus the Triton version."""
    import inspect

    import triton

    py = getattr(fn, "fn", fn)
    if py in _SRC_HASH:
        return _SRC_HASH[py]
    seen, parts, todo = set(), [], [py]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        try:
            parts.append(inspect.getsource(f))
        except (OSError, TypeError):
            parts.append(getattr(f, "__qualname__", repr(f)))
        code = getattr(f, "__code__", None)
        for name in (code.co_names if code else ()):
            g = getattr(f, "__globals__", {}).get(name)
            inner = getattr(g, "fn", None)
            if inner is not None and callable(inner) and hasattr(inner, "__code__"):
                todo.append(inner)
    h = hashlib.sha256(("\n".join(parts) + triton.__version__).encode()).hexdigest()[:16]
    _SRC_HASH[py] = h
    return h


def _launch_key(launch, cfg: dict) -> str:
    # num_stages is left out: the interpreter runs without it (count.count_launch), so configs
    # that differ only in their pipeline depth share one count
    d = launch.describe()
    blob = json.dumps([d["kernel"], d["tensors"], d["ints"], {k: str(v) for k, v in d["constexprs"].items()},
                       sorted((k, v) for k, v in cfg.items() if k != "num_stages"), _source_hash(launch.fn), 1],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


_MEM_CACHE: dict = {}


def cached_count(launch, cfg: dict, use_disk: bool = True) -> C.LaunchCount:
    key = _launch_key(launch, cfg)
    if key in _MEM_CACHE:
        return _MEM_CACHE[key]
    path = os.path.join(_cache_dir(), key + ".json")
    if use_disk and os.path.exists(path):
        try:
            with open(path) as f:
                d = json.load(f)
            tensors = {n: C.TensorCount(**{k: v for k, v in t.items() if k in C.TensorCount.__dataclass_fields__})
                       for n, t in d["tensors"].items()}
            lc = C.LaunchCount(kernel=d["kernel"], config=d["config"], grid=tuple(d["grid"]),
                               programs=d["programs"], classes=d["program_classes"], dot_flops=d["dot_flops"],
                               tensors=tensors, mode=d["mode"], reduction=d["reduction"], dot_m=d["dot_m"])
            _MEM_CACHE[key] = lc
            return lc
        except (OSError, ValueError, KeyError, TypeError):
            pass
    lc = C.count_launch(launch, cfg, "scaled")
    _MEM_CACHE[key] = lc
    if use_disk:
        try:
            os.makedirs(_cache_dir(), exist_ok=True)
            tmp = path + f".{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(lc.as_dict(), f)
            os.replace(tmp, path)
        except OSError:
            pass
    return lc


# --------------------------------------------------------------------------------------------
# one row
# --------------------------------------------------------------------------------------------

def _dtype_of(launch) -> str:
    for v in launch.args.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return R._TT[v.dtype]
    return "bf16"


def _cfg_label(cfg: dict) -> str:
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "BLOCK_R": "R", "GROUP_M": "G",
             "num_warps": "w", "num_stages": "s"}
    return ",".join(f"{short.get(k, k)}{v}" for k, v in cfg.items())


def evaluate_launch(launch, device: Device, configs: str = "all") -> dict:
    """Count and model a launch for each candidate config; the row takes the fastest predicted
    (what an ideal autotuner picks). ``configs='fixed'``: only the deterministic-mode config."""
    cands = launch.candidates if configs == "all" else [launch.fixed]
    dt = _dtype_of(launch)
    ints = {k: v for k, v in launch.args.items() if not isinstance(v, torch.Tensor)}
    imodel = _cost.ISSUE_MODELS.get(launch.kernel)
    pmodel = _cost.PHASE_MODELS.get(launch.kernel)
    per = []
    for cfg in cands:
        lc = cached_count(launch, cfg)
        im = imodel(ints, launch.constexprs, cfg, lc.grid) if imodel else None
        t = model.launch_time(lc, device, num_warps=cfg.get("num_warps", 4), dtype=dt,
                              issue_instructions=im[0] * lc.programs if im else 0.0)
        ph = pmodel(ints, launch.constexprs, cfg, device, dt) if pmodel else None
        if ph is not None:      # roles in sequence (kernels._cost.PHASE_MODELS)
            t["terms"]["phases"] = ph
            t["bound"] = max(t["terms"], key=t["terms"].get)
            t["seconds"] = t["terms"][t["bound"]] + device.launch_s
        per.append((t["seconds"], cfg, lc, t, im))
    per.sort(key=lambda p: p[0])
    sec, cfg, lc, t, im = per[0]
    tensors = {}
    for name, tc in lc.tensors.items():
        tensors[name] = dict(size=tc.size_bytes, load=tc.load_bytes, store=tc.store_bytes,
                             l2_load=32.0 * tc.load_sectors,
                             reread=tc.reread, unique=tc.unique_bytes,
                             sector_eff=tc.sector_efficiency, load_access=tc.load_access_bytes,
                             store_access=tc.store_access_bytes)
    return dict(
        kernel=launch.kernel, phase=launch.phase, config=cfg, config_label=_cfg_label(cfg),
        grid=list(lc.grid), programs=lc.programs, reduction=lc.reduction, dot_m=lc.dot_m,
        dot_flops=lc.dot_flops, seconds=sec, bound=t["bound"], terms=t["terms"], waves=t["waves"],
        fill=t["fill"], hgmma=t["hgmma"], dram_bytes=t["dram_bytes"], l2_bytes=t["l2_bytes"],
        tensors=tensors, candidates=len(cands),
        issue=(dict(seconds=t["terms"]["issue"], warp_instructions=im[0] * lc.programs, per_warp=im[0] / cfg.get("num_warps", 4),
                    trips=im[1], note=model.STATED_MODEL) if im else dict(seconds=None, note=model.NO_SASS)),
        issue_model=im[1] if im else None,
        specialization={k: v for k, v in launch.specialization().items() if v in ("1", "D")},
        signature=launch.signature(), constexprs={k: v for k, v in launch.constexprs.items()},
        source_hash=_source_hash(launch.fn),   # keys the SASS cache (fastfactor.sol.sass.jobs_for)
        all_configs=[dict(config=_cfg_label(c), seconds=s, bound=tt["bound"]) for s, c, _, tt, _ in per],
    )


def evaluate_row(spec: RowSpec, device: Device, configs: str = "all", block_rank: int = 1) -> dict:
    """Record, count and model one row; returns a JSON-ready dict (seconds are predictions)."""
    if spec.method not in FAMILIES:
        raise ValueError(f"method: expected one of {sorted(FAMILIES)}, got {spec.method!r}")
    if spec.direction not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"direction: expected fwd, bwd or fwd+bwd, got {spec.direction!r}")
    fam = FAMILIES[spec.method]
    mod = build_module(spec, block_rank)
    dt = _DT[spec.dtype]
    M, K, N = spec.tokens, spec.in_features, spec.out_features
    x = torch.empty(M, K, dtype=dt)
    g = torch.empty(M, N, dtype=dt)
    our_ops: list = []
    launches = R.record_launches(mod, x, g, spec.direction, sms=device.sms, torch_ops=our_ops)
    evals = [evaluate_launch(l, device, configs) for l in launches]
    ours_torch = model.torch_path_time(our_ops, device)
    ours = sum(e["seconds"] for e in evals) + ours_torch["seconds"]
    issued = sum(e["dot_flops"] for e in evals)  # + the torch ops' FLOPs below
    useful = float(flops_for(spec.direction, fam.fwd_flops(mod, M)[0]))

    params = [p for p in mod.parameters() if p.requires_grad]
    unf_ops = R.record_torch_ops(mod.forward_unfused, x, g, params, spec.direction)
    unfused = model.torch_path_time(unf_ops, device)
    w = torch.empty(N, K, dtype=dt, requires_grad=spec.direction != "fwd")
    b = torch.empty(N, dtype=dt, requires_grad=spec.direction != "fwd")
    dense_ops = R.record_torch_ops(lambda t: F.linear(t, w, b), x, g,
                                   [w, b] if spec.direction != "fwd" else [], spec.direction)
    dense = model.torch_path_time(dense_ops, device)
    torch24 = None
    if fam.torch24 and spec.direction == "fwd":
        torch24 = model.semi_structured_time(M, K, N, dt.itemsize if hasattr(dt, "itemsize") else 2, True, device)
    row = dict(
        method=spec.method, param=param_label(fam, spec.param, {"block_rank": block_rank}),
        shape=spec.shape, in_features=K, out_features=N, tokens=M, direction=spec.direction,
        dtype=spec.dtype, device=device.name, status=model.PREDICTED,
        predicted_ms=ours * 1e3, dense_ms=dense["seconds"] * 1e3, unfused_ms=unfused["seconds"] * 1e3,
        torch24_ms=torch24["seconds"] * 1e3 if torch24 else None,
        speedup_vs_dense=dense["seconds"] / ours if ours else None,
        speedup_vs_unfused=unfused["seconds"] / ours if ours else None,
        speedup_vs_torch24=(torch24["seconds"] / ours) if torch24 and ours else None,
        launches=len(evals) + ours_torch["launches"],
        kernels=",".join([e["kernel"].split(".")[-1] for e in evals]
                         + [o["name"] for o in ours_torch["ops"]]),
        issued_flops=issued + ours_torch["flops"], useful_flops=useful,
        flops_ratio=(issued + ours_torch["flops"]) / useful if useful else None,
        dram_bytes=sum(e["dram_bytes"] for e in evals), torch_ops_ms=ours_torch["seconds"] * 1e3,
        bound="+".join(sorted({e["bound"] for e in evals})),
        detail=evals,
    )
    return row


def apply_issue_terms(row: dict, device: Device) -> dict:
    """Add the instruction-issue term to every launch of ``row`` from its ``e['sass']`` facts
    (:func:`fastfactor.sol.model.apply_issue`; a launch without facts says so) and recompute the
    row's predicted time, speedups and bound. Still predicted, not measured."""
    for e in row["detail"]:
        model.apply_issue(e, e.get("sass"), device)
    ours = sum(e["seconds"] for e in row["detail"]) + row.get("torch_ops_ms", 0.0) / 1e3
    row["predicted_ms"] = ours * 1e3
    for k, base in (("dense", "dense_ms"), ("unfused", "unfused_ms"), ("torch24", "torch24_ms")):
        if row.get(base) is not None and ours:
            row[f"speedup_vs_{k}"] = row[base] / 1e3 / ours
    row["bound"] = "+".join(sorted({e["bound"] for e in row["detail"]}))
    row["issue_bound_launches"] = sum(1 for e in row["detail"] if e["bound"] == "issue")
    return row


def sweep_rows(sweep, directions=None, dtypes=("bf16",)) -> list[RowSpec]:
    """The rows of a ``fastfactor bench`` sweep preset."""
    out = []
    for method in sweep.methods:
        for param in sweep.params.get(method) or FAMILIES[method].defaults:
            for shape in sweep.shapes:
                for M in sweep.tokens:
                    for d in directions or sweep.directions:
                        for dt in dtypes:
                            out.append(RowSpec(method, shape.in_features, shape.out_features, M, param, d, dt))
    return out
