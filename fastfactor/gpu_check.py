"""``make gpu-check`` / ``python -m fastfactor.gpu_check``: the first thing to run on a lent GPU.

In at most ``--budget-s`` seconds (default 480: 8 minutes) on one H100/H200, in place on the
offline GPU image (``PYTHONPATH=$PWD python3 -m fastfactor.gpu_check --out $OUT``):

1. the device and its two ceilings, measured (bf16 8192³ matmul; device copy, read + write bytes;
   L2 -> SM bandwidth from repeated reads of a buffer that fits in L2);
2. the predictions of ``fastfactor sol`` for the perf tier's rows, computed meanwhile on the CPU
   (a child process under the Triton interpreter, using the committed counts cache when present);
3. the GPU correctness tier (``pytest -m gpu``), as much as fits in its share of the budget;
4. every sol row timed on the GPU — ours, dense ``F.linear`` and the unfused PyTorch path — with
   CUDA-graph medians over inputs rotated past the L2 (``fastfactor.bench.timing``);
5. ``gpu-check.json``, ``gpu-check.csv`` and ``gpu-check.md`` (measured / predicted per row, ready
   to paste into BENCHMARKS.md) under ``--out``.

``--dry`` runs the same script on the CPU with tiny shapes and a short budget (the reference
paths timed by the CPU timer), so CI checks the script end to end; its figures mean nothing.
"""

from __future__ import annotations

import argparse
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


def _predict_child(rows: dict, path: str, device: str) -> subprocess.Popen:
    """Start the sol predictions in a child process under the interpreter (CPU work)."""
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
    env.setdefault("PYTHONPATH", os.getcwd())
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def measure_ceilings(device, dry: bool) -> dict:
    """bf16 matmul rate, device copy bandwidth (read + write), and L2 -> SM read bandwidth."""
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


def time_row(spec, device, dry: bool) -> dict:
    """Measured ms of ours, dense and unfused for one sol row (bench's timing and rotation)."""
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
    res["unfused_ms"] = time_calls([make_call(m.forward_unfused, x, g, list(m.parameters()), spec.direction)
                                    for m, x, g in zip(mods, xs, gs)], device, **kw).ms
    calls = []
    for x, g in zip(xs, gs):
        w = torch.randn(N, K, device=device, dtype=dt, requires_grad=spec.direction != "fwd")
        b = torch.randn(N, device=device, dtype=dt, requires_grad=spec.direction != "fwd")
        calls.append(make_call(lambda t, w=w, b=b: F.linear(t, w, b), x, g, [w, b], spec.direction))
    res["dense_ms"] = time_calls(calls, device, **kw).ms
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastfactor.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "profiling/results/gpu-check",
                   help="folder for gpu-check.json/.csv/.md (default: $OUT, else profiling/results/gpu-check)")
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes, short budget: checks the script itself")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 480; dry 240)")
    p.add_argument("--no-tests", action="store_true", help="skip the GPU correctness tier")
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
    tests = {"skipped": "--no-tests"} if args.no_tests else run_gpu_tests(0.3 * budget, args.out, args.dry)
    print(f"gpu tests: {tests}", flush=True)

    measured = {}
    for key, spec in rows.items():
        if time.time() - t_start > 0.85 * budget:
            measured[key] = {"error": "skipped: time budget"}
            continue
        try:
            measured[key] = time_row(spec, device, args.dry)
        except Exception as e:  # noqa: BLE001 - a failing row is reported, the check goes on
            measured[key] = {"error": f"{type(e).__name__}: {e}"}
        print(f"  {key}: {measured[key]}", flush=True)

    wait = max(5.0, budget - (time.time() - t_start) - 5)
    try:
        child.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    preds = {}
    if os.path.exists(pred_path):
        with open(pred_path) as f:
            preds = json.load(f)
    elif child.stderr is not None:
        err = child.stderr.read()[-500:]
        print(f"gpu-check: predictions failed: {err}", flush=True)

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
        if pr.get("predicted_ms"):
            r["pred_speedup_vs_dense"] = pr["dense_ms"] / pr["predicted_ms"] if pr.get("dense_ms") else None
            r["pred_speedup_vs_unfused"] = pr["unfused_ms"] / pr["predicted_ms"] if pr.get("unfused_ms") else None
        r["error"] = m.get("error") or pr.get("error")
        table.append(r)

    from .bench.report import git_commit

    commit, dirty = git_commit()
    meta = dict(schema="fastfactor-gpu-check/1", device=name, dry=args.dry, commit=commit, dirty=dirty,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                torch=torch.__version__, ceilings=ceilings, tests=tests, model_device=model_dev,
                predictions=PREDICTED, seconds=round(time.time() - t_start, 1))
    base = os.path.join(args.out, "gpu-check")
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=table), f, indent=1, default=str)
    cols = ["row", "ours_ms", "ours_pred_ms", "dense_ms", "dense_pred_ms", "unfused_ms", "unfused_pred_ms",
            "speedup_vs_dense", "pred_speedup_vs_dense", "speedup_vs_unfused", "pred_speedup_vs_unfused", "error"]
    with open(base + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "commit", "dry"] + cols)
        for r in table:
            w.writerow([name, commit, args.dry] + [r.get(c) for c in cols])
    fmt = lambda v: "—" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
    with open(base + ".md", "w") as f:
        f.write(f"Measured on {name}{' (DRY RUN: CPU, tiny shapes, figures meaningless)' if args.dry else ''}, "
                f"commit {commit[:12]}, {meta['date']}; `_pred` columns are the sol model ({PREDICTED}).\n\n")
        f.write("ceilings: " + ", ".join(f"{k} {v:.3g}" for k, v in ceilings.items()) + "\n\n")
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in table:
            f.write("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |\n")
    print(open(base + ".md").read())
    print(f"gpu-check: wrote {base}.json/.csv/.md in {meta['seconds']} s")
    ok = all(not r["error"] for r in table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
