"""Latency costs of plan candidates: one predicted (``fastfactor sol``) or measured (``fastfactor
bench`` JSON) time per (module shape, method, setting), for :mod:`fastfactor.plan`.

A **candidate spec** is a dict ``{"method", "in_features", "out_features", "bias", "rank",
"nblocks", "block_rank"}`` (``method`` one of ``dense``, ``lowrank``, ``monarch``,
``block_lowrank``, ``sparse24``, ``dense_sparse``; unused keys ``None``). Its **cost** is the time
in seconds of one call of that module on ``M = tokens`` rows of input (``x: (M, in)``), in
``direction`` (``fwd`` for inference, ``fwd+bwd`` for a training step), in ``dtype``.

Two sources:

* :class:`SolLatency` — the lower-bound model of ``fastfactor sol`` on a named device (H200,
  H100-SXM; :mod:`fastfactor.sol.device`): the launches the real op code makes for a layer of that
  shape (its dispatcher's path), counted exactly under the Triton interpreter and modelled as
  ``max(DRAM, L2, tensor FLOPs) + launch floor`` per launch, plus the plain torch ops it runs
  (cuBLAS products, modelled at the roofline). ``dense`` is ``F.linear`` modelled as ideal cuBLAS.
  **Predicted, not measured**; without ``--sass`` the instruction-issue term is left out, as in
  ``fastfactor sol``'s default. Counting needs interpreted kernels: when this process did not import
  them interpreted, the table is computed in a child process with ``TRITON_INTERPRET=1``. Results
  are cached in memory and on disk (``$FASTFACTOR_PLAN_CACHE``, default ``~/.cache/fastfactor/plan``)
  per (spec, tokens, device, direction, dtype, fastfactor kernel sources).
* :class:`BenchLatency` — the rows of a ``fastfactor bench`` JSON measured on a GPU
  (``median_ms``; ``dense_ms`` for ``dense``) at the given tokens, direction and dtype. A candidate
  whose row the file lacks has no cost (``None``) and the planner leaves it out; a shape whose
  dense time is missing is an error (the budget is a fraction of it).

:func:`module_spec` gives the spec of a module of a model (``nn.Linear`` / GPT-2 ``Conv1D`` →
``dense``, a factorized layer → its family and setting), so the realised model's predicted time
is recomputed from the modules it actually holds (:func:`predicted_seconds`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

PREDICTED = "predicted, not measured"
MEASURED = "measured"
KINDS = ("dense", "lowrank", "monarch", "block_lowrank", "sparse24", "dense_sparse")
DIRECTIONS = ("fwd", "fwd+bwd")
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_spec(method: str, in_features: int, out_features: int, *, bias: bool = True, rank: Optional[int] = None,
              nblocks: Optional[int] = None, block_rank: Optional[int] = None) -> dict:
    if method not in KINDS:
        raise ValueError(f"method: expected one of {list(KINDS)}, got {method!r}")
    return {"method": method, "in_features": int(in_features), "out_features": int(out_features), "bias": bool(bias),
            "rank": None if rank is None else int(rank), "nblocks": None if nblocks is None else int(nblocks),
            "block_rank": None if block_rank is None else int(block_rank)}


def spec_key(spec: dict) -> str:
    return json.dumps([spec.get(k) for k in ("method", "in_features", "out_features", "bias", "rank", "nblocks",
                                             "block_rank")])


def module_spec(module: nn.Module) -> dict:
    """The candidate spec of ``module`` as it is now (see the module docstring)."""
    from .compress.targets import is_supported_linear

    method = getattr(module, "method", None)
    if method in KINDS and method != "dense":
        i, o = int(module.in_features), int(module.out_features)
        bias = getattr(module, "bias", None) is not None
        if method in ("lowrank", "dense_sparse"):
            return make_spec(method, i, o, bias=bias, rank=int(module.rank))
        if method in ("monarch", "block_lowrank"):
            return make_spec(method, i, o, bias=bias, nblocks=int(module.nblocks), block_rank=int(module.rank))
        return make_spec(method, i, o, bias=bias)
    if is_supported_linear(module):
        w = module.weight
        if type(module).__name__ == "Conv1D":  # GPT-2: weight (in, out)
            i, o = int(w.shape[0]), int(w.shape[1])
        else:
            o, i = int(w.shape[0]), int(w.shape[1])
        return make_spec("dense", i, o, bias=getattr(module, "bias", None) is not None)
    raise TypeError(f"module: expected a linear or a fastfactor factorized layer, got {type(module).__name__}")


def build_layer(spec: dict, dtype: torch.dtype, device=None) -> nn.Module:
    """A layer of ``spec``'s shape and setting with arbitrary values (counts depend on shapes only)."""
    from .layers.lowrank import LowRankLinear
    from .layers.monarch import BlockLowRankLinear, MonarchLinear
    from .layers.sparse24 import DenseSparseLinear, Sparse24Linear

    m, i, o, b = spec["method"], spec["in_features"], spec["out_features"], spec["bias"]
    kw = dict(bias=b, dtype=dtype, device=device if device is not None else torch.device("cpu"))
    torch.manual_seed(0)
    if m == "lowrank":
        return LowRankLinear(i, o, spec["rank"], **kw)
    if m == "dense_sparse":
        return DenseSparseLinear(i, o, spec["rank"], **kw)
    if m in ("monarch", "block_lowrank"):
        cls = MonarchLinear if m == "monarch" else BlockLowRankLinear
        return cls(i, o, spec["nblocks"], rank=spec["block_rank"] or 1, **kw)
    if m == "sparse24":
        return Sparse24Linear(i, o, **kw)
    raise ValueError(f"spec: no layer for method {m!r}")


def _sol_seconds(spec: dict, tokens: int, device, direction: str, dtype: str) -> float:
    """Predicted seconds of one spec (needs interpreted kernels)."""
    import torch.nn.functional as F

    from .kernels import _config
    from .sol import model as SM
    from .sol import record as R
    from .sol.rows import evaluate_launch

    dt = _DT[dtype]
    M, K, N = int(tokens), spec["in_features"], spec["out_features"]
    x = torch.empty(M, K, dtype=dt)
    g = torch.empty(M, N, dtype=dt)
    if spec["method"] == "dense":
        w = torch.empty(N, K, dtype=dt, requires_grad=direction != "fwd")
        b = torch.empty(N, dtype=dt, requires_grad=direction != "fwd") if spec["bias"] else None
        params = [p for p in (w, b) if p is not None] if direction != "fwd" else []
        ops = R.record_torch_ops(lambda t: F.linear(t, w, b), x, g, params, direction)
        return SM.torch_path_time(ops, device)["seconds"]
    with _config.cpu_backend("reference"):
        mod = build_layer(spec, dt)
    torch_ops: list = []
    launches = R.record_launches(mod, x, g, direction, sms=device.sms, torch_ops=torch_ops)
    evals = [evaluate_launch(l, device) for l in launches]
    return sum(e["seconds"] for e in evals) + SM.torch_path_time(torch_ops, device)["seconds"]


def _kernel_sources_hash() -> str:
    """Hash of the kernel and sol sources: cached costs are recomputed after any change to them."""
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for sub in ("kernels", "sol", "ops"):
        d = os.path.join(here, sub)
        if not os.path.isdir(d):
            continue
        for f in sorted(os.listdir(d)):
            if f.endswith(".py"):
                with open(os.path.join(d, f), "rb") as fh:
                    h.update(f.encode() + fh.read())
    return h.hexdigest()[:16]


def cache_dir() -> str:
    return os.environ.get("FASTFACTOR_PLAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastfactor", "plan")


class LatencyModel:
    """Seconds per candidate spec; ``None`` for a candidate the source cannot cost."""

    status = PREDICTED

    def costs(self, specs: Sequence[dict]) -> List[Optional[float]]:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError


class SolLatency(LatencyModel):
    """Predicted seconds from the ``fastfactor sol`` model (see the module docstring)."""

    status = PREDICTED

    def __init__(self, device: str = "h200", tokens: int = 16384, direction: str = "fwd", dtype: str = "bf16",
                 use_disk: bool = True):
        from . import _validate as V
        from .sol.device import get_device

        self.device = get_device(device)
        self.tokens = V.check_positive_int("tokens", tokens)
        if direction not in DIRECTIONS:
            raise ValueError(f"direction: expected one of {list(DIRECTIONS)}, got {direction!r}")
        if dtype not in _DT:
            raise ValueError(f"dtype: expected one of {sorted(_DT)}, got {dtype!r}")
        self.direction, self.dtype, self.use_disk = direction, dtype, use_disk
        self._mem: Dict[str, float] = {}
        self._src = None

    def describe(self) -> dict:
        return {"source": "sol", "status": PREDICTED, "device": self.device.name, "tokens": self.tokens,
                "direction": self.direction, "dtype": self.dtype}

    def _key(self, spec: dict) -> str:
        if self._src is None:
            self._src = _kernel_sources_hash()
        blob = json.dumps([spec_key(spec), self.tokens, self.device.name, self.direction, self.dtype, self._src])
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def _disk_path(self) -> str:
        return os.path.join(cache_dir(), "sol-costs.json")

    def _load_disk(self) -> dict:
        if not self.use_disk:
            return {}
        try:
            with open(self._disk_path()) as f:
                d = json.load(f)
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_disk(self, new: dict) -> None:
        if not self.use_disk or not new:
            return
        from ._io import atomic_write_text

        try:
            os.makedirs(cache_dir(), exist_ok=True)
            d = self._load_disk()
            d.update(new)
            atomic_write_text(self._disk_path(), json.dumps(d))
        except OSError:
            pass

    def costs(self, specs: Sequence[dict]) -> List[Optional[float]]:
        keys = [self._key(s) for s in specs]
        disk = None
        todo = {}
        for k, s in zip(keys, specs):
            if k in self._mem:
                continue
            if disk is None:
                disk = self._load_disk()
            if k in disk:
                self._mem[k] = float(disk[k])
            else:
                todo[k] = s
        if todo:
            got = self._compute(list(todo.values()))
            new = dict(zip(todo.keys(), got))
            self._mem.update(new)
            self._save_disk(new)
        return [self._mem[k] for k in keys]

    def _compute(self, specs: List[dict]) -> List[float]:
        from .kernels import _config

        if _config.is_interpreter():
            return [_sol_seconds(s, self.tokens, self.device, self.direction, self.dtype) for s in specs]
        # counting needs kernels imported interpreted: a child process does it
        req = dict(specs=specs, tokens=self.tokens, device=self.device.name, direction=self.direction,
                   dtype=self.dtype)
        env = dict(os.environ, TRITON_INTERPRET="1", FASTFACTOR_CPU_BACKEND="reference")
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        p = subprocess.run([sys.executable, "-m", "fastfactor.plan_latency"], input=json.dumps(req),
                           capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"latency: the sol child process failed ({p.stderr.strip()[-2000:]})")
        return [float(v) for v in json.loads(p.stdout.strip().splitlines()[-1])]


class BenchLatency(LatencyModel):
    """Measured seconds from a ``fastfactor bench`` JSON (see the module docstring)."""

    status = MEASURED

    def __init__(self, path: str, tokens: int, direction: str = "fwd", dtype: str = "bf16"):
        from . import _validate as V

        if not os.path.isfile(path):
            raise ValueError(f"bench: expected a fastfactor bench JSON file, got {path!r}")
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"bench: {path}: not a JSON file ({e})") from None
        if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("fastfactor-bench/"):
            raise ValueError(f"bench: {path}: expected a fastfactor bench JSON (schema fastfactor-bench/1)")
        meta = doc.get("meta") or {}
        if meta.get("cpu_figures") or meta.get("device_type") == "cpu":
            raise ValueError(f"bench: {path}: holds CPU figures (the reference paths), not GPU measurements")
        self.path, self.tokens = path, V.check_positive_int("tokens", tokens)
        self.direction, self.dtype = direction, dtype
        self.device_name = meta.get("device", "?")
        self.rows = [r for r in doc.get("rows", []) if r.get("tokens") == self.tokens
                     and r.get("direction") == direction and r.get("dtype") == dtype and r.get("median_ms")]
        if not self.rows:
            raise ValueError(f"bench: {path}: no measured rows at tokens={tokens}, direction={direction}, "
                             f"dtype={dtype}")

    def describe(self) -> dict:
        return {"source": "bench", "status": MEASURED, "file": os.path.basename(self.path),
                "device": self.device_name, "tokens": self.tokens, "direction": self.direction, "dtype": self.dtype}

    def _row_spec(self, r: dict) -> Optional[dict]:
        from .families import FAMILIES

        m = r.get("method")
        i, o = r.get("in_features"), r.get("out_features")
        if m not in KINDS or m == "dense" or not i or not o:
            return None
        fam = FAMILIES.get(m)
        ratio = r.get("ratio")
        param = r.get("param")
        if m in ("lowrank", "dense_sparse"):
            if ratio is None:
                return None
            return make_spec(m, i, o, rank=fam.rank_for_ratio(i, o, float(ratio)))
        if m in ("monarch", "block_lowrank"):
            import re

            mb = re.search(r"nblocks=(\d+)(?:,rank=(\d+))?", str(param))
            if not mb:
                return None
            return make_spec(m, i, o, nblocks=int(mb.group(1)), block_rank=int(mb.group(2) or 1))
        return make_spec(m, i, o)

    def costs(self, specs: Sequence[dict]) -> List[Optional[float]]:
        table: Dict[str, float] = {}
        dense: Dict[tuple, float] = {}
        for r in self.rows:
            i, o = r.get("in_features"), r.get("out_features")
            if r.get("dense_ms"):
                dense[(i, o)] = float(r["dense_ms"]) / 1e3
            s = self._row_spec(r)
            if s is not None:
                table[spec_key(dict(s, bias=True))] = float(r["median_ms"]) / 1e3
        out = []
        for s in specs:
            if s["method"] == "dense":
                t = dense.get((s["in_features"], s["out_features"]))
                if t is None:
                    raise ValueError(f"bench: {self.path}: no dense time for shape in={s['in_features']} "
                                     f"out={s['out_features']} at tokens={self.tokens} (the budget is a fraction of it)")
                out.append(t)
            else:
                out.append(table.get(spec_key(dict(s, bias=True))))
        return out


def latency_model(device: str = "h200", tokens: int = 16384, direction: str = "fwd", dtype: str = "bf16",
                  bench: Optional[str] = None) -> LatencyModel:
    """:class:`BenchLatency` when ``bench`` (a JSON path) is given, else :class:`SolLatency`."""
    if bench:
        return BenchLatency(bench, tokens, direction, dtype)
    return SolLatency(device, tokens, direction, dtype)


def predicted_seconds(model: nn.Module, names: Sequence[str], latency: LatencyModel) -> Dict[str, Optional[float]]:
    """``{name: seconds}`` of the modules ``names`` of ``model`` as they are now (the realised
    model's time under ``latency``; see :func:`module_spec`)."""
    from .compress.targets import get_module

    specs = [module_spec(get_module(model, n)) for n in names]
    return dict(zip(names, latency.costs(specs)))


# --- the whole model ------------------------------------------------------------------------

#: the stated model of what is not a linear layer (see :func:`rest_seconds`)
REST_MODEL = (
    "attention core per block: Q·Kᵀ and P·V as one fused (flash-attention style) op, 4·M·L·d FLOPs "
    "(M tokens, L = seq_len keys per query, d = hidden; no causal halving), Q, K, V read and O written "
    "once (4·M·d elements); elementwise per block: 2 norms (read + write M·d each), the activation "
    "(read + write M·ff), 2 residual adds (read 2·M·d, write M·d each), one launch each; embeddings: "
    "a gather + position add + norm (6·M·d elements, 3 launches). Each op at the roofline "
    "(max(bytes / HBM, FLOPs / matrix rate)) plus the launch floor. fwd+bwd: attention 3.5x the "
    "forward FLOPs (recompute + 4 backward GEMMs) and 3x its bytes (Q, K, V, O, dO read, dQ, dK, dV "
    "written), elementwise and embeddings 3x the forward bytes and 2x the launches")


def _config_dims(model: nn.Module):
    """``(blocks, hidden, intermediate, max positions or None)`` of a transformer, from its config
    (else its block list, :func:`fastfactor.compress.targets.find_blocks`)."""
    from .compress.targets import find_blocks

    cfg = getattr(model, "config", None)

    def first(*names):
        for n in names:
            v = getattr(cfg, n, None) if cfg is not None else None
            if isinstance(v, int) and v > 0:
                return v
        return None
    # the config's layer count (a compressed model's blocks may hold no dense linear any more)
    blocks = first("num_hidden_layers", "n_layer", "num_layers") or len(find_blocks(model))
    d = first("hidden_size", "n_embd", "d_model", "dim")
    if cfg is None or d is None or blocks == 0:
        raise ValueError(f"model: the whole-model latency needs a transformer with a config (hidden size) and "
                         f"blocks; {type(model).__name__} has config={cfg is not None}, hidden={d}, "
                         f"blocks={blocks} (use the targets' latency instead)")
    ff = first("intermediate_size", "n_inner", "ffn_dim", "d_ff") or 4 * d
    pos = first("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
    return blocks, d, ff, pos


def default_seq_len(model: nn.Module, tokens: int) -> int:
    """The sequence length of the attention model when none is given: ``min(512, the model's
    position table, tokens)``."""
    _, _, _, pos = _config_dims(model)
    return int(min(512, pos or 512, tokens))


def rest_seconds(model: nn.Module, latency: "LatencyModel", seq_len: Optional[int] = None) -> dict:
    """Predicted seconds of everything of ``model`` but its linear layers, under the stated model
    :data:`REST_MODEL` at ``latency``'s device, tokens (``M``), direction and dtype: ``{"attention_s",
    "elementwise_s", "embeddings_s", "rest_s", "seq_len", "blocks", "hidden", "intermediate",
    "model"}``. Shapes only (a meta-device model will do). Needs the ``sol`` model
    (:class:`SolLatency`): a bench file measures linears only."""
    from .kernels._cost import library_seconds

    dev = getattr(latency, "device", None)
    if not all(hasattr(dev, a) for a in ("hbm_bw", "launch_s")) or not all(
            hasattr(latency, a) for a in ("tokens", "direction", "dtype")):
        raise ValueError("latency_scope: the whole-model time needs the sol model's device figures (a bench file "
                         f"holds linear layers only), got {type(latency).__name__}; use latency_scope='targets'")
    blocks, d, ff, pos = _config_dims(model)
    M = latency.tokens
    L = default_seq_len(model, M) if seq_len is None else seq_len
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"seq_len: expected an int >= 1 (keys per query), got {seq_len!r}")
    if pos is not None and L > pos:
        raise ValueError(f"seq_len: expected at most {pos} (the model's position table), got {L}")
    e = torch.empty((), dtype=_DT[latency.dtype]).element_size()
    dt = latency.dtype
    bwd = latency.direction != "fwd"
    fl = 4.0 * M * L * d * (3.5 if bwd else 1.0)
    by = 4.0 * M * d * e * (3.0 if bwd else 1.0)
    att = library_seconds(by, fl, dev, dt)["seconds"] + (dev.launch_s if bwd else 0.0)  # fwd + bwd: two launches
    ew_bytes = M * e * (2 * 2 * d + 2 * ff + 2 * 3 * d) * (3.0 if bwd else 1.0)
    ew_launch = 5 * (2 if bwd else 1)
    ew = ew_bytes / dev.hbm_bw + ew_launch * dev.launch_s
    emb_bytes = 6.0 * M * d * e * (3.0 if bwd else 1.0)
    emb = emb_bytes / dev.hbm_bw + 3 * (2 if bwd else 1) * dev.launch_s
    return {"attention_s": blocks * att, "elementwise_s": blocks * ew, "embeddings_s": emb,
            "rest_s": blocks * (att + ew) + emb, "seq_len": L, "blocks": blocks, "hidden": d, "intermediate": ff,
            "model": REST_MODEL}


def linear_specs(model: nn.Module) -> Dict[str, dict]:
    """``{name: spec}`` of every linear layer of ``model`` as it is now: each outermost factorized
    layer and each dense ``nn.Linear`` / ``Conv1D`` (heads and poolers included)."""
    from .compress.targets import is_supported_linear
    from .layers.base import FactorizedLinear

    out: Dict[str, dict] = {}
    skip: List[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(mod, FactorizedLinear) or is_supported_linear(mod):
            out[name] = module_spec(mod)
            skip.append(name)
    return out


def model_seconds(model: nn.Module, latency: "LatencyModel", seq_len: Optional[int] = None) -> dict:
    """The whole model's predicted time as it is now: every linear layer (:func:`linear_specs`
    under ``latency``) plus the rest (:func:`rest_seconds`). Returns :func:`rest_seconds`' entries
    and ``{"linears": {name: s}, "linears_s", "total_s"}``."""
    specs = linear_specs(model)
    secs = latency.costs(list(specs.values()))
    if any(t is None for t in secs):
        raise ValueError("latency: some linear layers of the model have no time under this latency source")
    lin = dict(zip(specs, (float(t) for t in secs)))
    rest = rest_seconds(model, latency, seq_len)
    return dict(rest, linears=lin, linears_s=sum(lin.values()), total_s=sum(lin.values()) + rest["rest_s"])


def _main() -> int:
    """Child process of :meth:`SolLatency._compute`: JSON request on stdin, costs on stdout."""
    from .sol.device import get_device

    req = json.loads(sys.stdin.read())
    dev = get_device(req["device"])
    out = [_sol_seconds(s, req["tokens"], dev, req["direction"], req["dtype"]) for s in req["specs"]]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
