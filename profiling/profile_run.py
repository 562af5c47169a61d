#!/usr/bin/env python
"""The program the Nsight scripts in this folder profile.

Two cases, each warming up first (Triton autotuning, cuBLAS heuristics, allocator) outside the
recorded region, then running ``--steps`` steps inside a capture range
(``torch.cuda.profiler.start()/stop()``, which ``nsys --capture-range=cudaProfilerApi`` and
``ncu --profile-from-start off`` obey) with one NVTX range per step:

``kernel``  one factorized layer at one shape, token count and setting::

        python profiling/profile_run.py kernel --method lowrank --shape 4096x4096 --tokens 4096 \\
            --param 0.25 --dtype bf16 --direction fwd+bwd

    Each step is the NVTX range ``kernel`` (``fastfactor@kernel``); ``--cuda-graph`` captures the
    steps once in a CUDA graph and replays it (profile with ``--cuda-graph-trace=node``).

``train``   training steps of a compressed model (``bert-base`` with random weights, or the
    bundled ``minilm``)::

        python profiling/profile_run.py train --model bert-base --method lowrank --param 0.25

    Each step is the NVTX range ``train_step``; inside it every factorized layer's forward is the
    range ``<method>.fwd:<module path>`` (``fastfactor.profiling.annotate_modules``).

On a machine without CUDA both run the reference paths and the capture range is a no-op:
``--small`` keeps the sizes tiny so the driver itself can be tested.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from fastfactor import profiling
from fastfactor.bench.families import FAMILIES, canonical, param_label
from fastfactor.bench.report import parse_dtypes
from fastfactor.bench.shapes import parse_shapes


def _param(method: str, value: str | None):
    fam = FAMILIES[method]
    if fam.param_name == "":
        return None
    if value is None:
        return fam.defaults[len(fam.defaults) // 2]
    return int(value) if fam.param_name == "nblocks" else float(value)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_kernel(args) -> dict:
    device = torch.device(args.device)
    method = canonical(args.method)
    if method not in FAMILIES:
        raise SystemExit(f"method: expected one of {list(FAMILIES)}, got {method!r}")
    fam = FAMILIES[method]
    shape = parse_shapes(args.shape)[0]
    dtype = parse_dtypes(args.dtype)[0]
    param = _param(method, args.param)
    layer = fam.random_layer(shape.in_features, shape.out_features, param, dtype, device, True,
                             {"block_rank": args.block_rank})
    x = torch.randn(args.tokens, shape.in_features, device=device, dtype=dtype, requires_grad=args.direction != "fwd")
    g = torch.randn(args.tokens, shape.out_features, device=device, dtype=dtype)
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        if args.direction == "fwd":
            with torch.no_grad():
                return layer(x)
        y = layer(x)
        return torch.autograd.grad(y, [x] + params, g)

    for _ in range(args.warmup):
        step()
    _sync(device)
    graph = None
    if args.cuda_graph and device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            step()
    label = f"{method} {param_label(fam, param, {'block_rank': args.block_rank})} {shape.name} M={args.tokens} {args.dtype} {args.direction}"
    t0 = time.perf_counter()
    with profiling.capture():
        profiling.mark(label)
        for _ in range(args.steps):
            with profiling.range("kernel"):
                graph.replay() if graph is not None else step()
        _sync(device)
    dt = (time.perf_counter() - t0) / args.steps * 1e3
    return {"case": "kernel", "what": label, "steps": args.steps, "ms_per_step_wall": dt,
            "nvtx_backend": profiling.backend(), "range": profiling.qualified("kernel")}


def run_train(args) -> dict:
    from fastfactor.bench.e2e import build_model, swap_linears

    device = torch.device(args.device)
    dtype = parse_dtypes(args.dtype)[0]
    model = build_model(args.model, small=args.small).to(device=device, dtype=dtype)
    n_swapped = 0
    label = f"{args.model} dense"
    if args.method != "dense":
        method = canonical(args.method)
        if method not in FAMILIES:
            raise SystemExit(f"method: expected one of {list(FAMILIES)}, got {method!r}")
        fam = FAMILIES[method]
        param = _param(method, args.param)
        opts = {"block_rank": args.block_rank}
        n_swapped = len(swap_linears(model, lambda lin: fam.random_layer(
            lin.in_features, lin.out_features, param, dtype, device, lin.bias is not None, opts)))
        label = f"{args.model} {method} {param_label(fam, param, opts)}"
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def step():
        out = model(input_ids=ids).last_hidden_state
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    _sync(device)
    hooks = profiling.annotate_modules(model)  # per-layer forward ranges, only for the recorded steps
    t0 = time.perf_counter()
    try:
        with profiling.capture():
            profiling.mark(label)
            for _ in range(args.steps):
                with profiling.range("train_step"):
                    step()
            _sync(device)
    finally:
        hooks.remove()
    dt = (time.perf_counter() - t0) / args.steps * 1e3
    return {"case": "train", "what": label, "swapped_layers": n_swapped, "steps": args.steps,
            "ms_per_step_wall": dt, "nvtx_backend": profiling.backend(),
            "range": profiling.qualified("train_step"), "layer_ranges": len(hooks.names)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="case", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("kernel", "train"):
        s = sub.add_parser(name)
        s.add_argument("--method", default="lowrank", help=f"{', '.join(FAMILIES)} (train: also 'dense')")
        s.add_argument("--param", help="ratio (lowrank, dense_sparse) or nblocks (monarch, block_lowrank)")
        s.add_argument("--block-rank", type=int, default=1)
        s.add_argument("--dtype", default="bf16" if default_device == "cuda" else "fp32")
        s.add_argument("--device", default=default_device)
        s.add_argument("--warmup", type=int, default=10)
        s.add_argument("--steps", type=int, default=5)
        s.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke test)")
    k = sub.choices["kernel"]
    k.add_argument("--shape", default="4096x4096")
    k.add_argument("--tokens", type=int, default=4096)
    k.add_argument("--direction", default="fwd+bwd", choices=("fwd", "fwd+bwd"))
    k.add_argument("--cuda-graph", action="store_true", help="replay the step from a CUDA graph")
    t = sub.choices["train"]
    t.add_argument("--model", default="bert-base", choices=("bert-base", "minilm"))
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--seq-len", type=int, default=128)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.small:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
        if args.case == "kernel":
            args.shape, args.tokens = "40x24", min(args.tokens, 7)
        else:
            args.batch, args.seq_len = 1, 8
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run_kernel(args) if args.case == "kernel" else run_train(args)
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
