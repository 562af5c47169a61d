"""Output of ``fastfactor bench``: printed table, JSON, CSV and the plot.

JSON layout (``schema`` = :data:`SCHEMA`)::

    {"schema": "fastfactor-bench/1",
     "meta": {"commit", "dirty", "date", "command", "device", "device_type", "cpu_figures",
              "note", "torch", "triton", "python", "sweep", "roofline": {...}, "messages": [...]},
     "rows": [ {ROW_FIELDS...}, ... ],        # one per method × setting × shape × tokens × dtype × direction
     "e2e":  [ {E2E_FIELDS...}, ... ]}        # end-to-end mode, may be empty

CSV: the rows, with ``commit``, ``date`` and ``cpu_figures`` repeated on every line so that a
file stays self-describing once it is copied around. Optional tools degrade gracefully: without
``tabulate`` the table is plain text, without ``matplotlib`` the plot is skipped with a message.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from typing import Iterable, Optional, Sequence

import torch

from .timing import _DTYPES, device_name, dtype_name  # noqa: F401 - dtype_name re-exported

SCHEMA = "fastfactor-bench/1"

#: every field of a kernel row, in table order
ROW_FIELDS = (
    "method", "param", "ratio", "params_kept", "shape", "shape_label", "in_features", "out_features",
    "tokens", "dtype", "direction", "median_ms", "min_ms", "max_ms", "runs", "timing", "events_ms", "tflops", "gbs", "flops",
    "bytes", "flops_formula", "floor_ms", "floor_bound", "floor_fraction", "dense_ms", "unfused_ms",
    "torch24_ms", "speedup_vs_dense", "speedup_vs_unfused", "speedup_vs_torch24", "device",
    "cpu_figures", "note",
)

#: fields of an end-to-end row
E2E_FIELDS = (
    "model", "method", "param", "ratio", "model_params", "swapped_layers", "batch", "seq_len", "dtype",
    "infer_ms", "infer_tokens_per_s", "infer_speedup_vs_dense", "train_ms", "train_tokens_per_s",
    "train_speedup_vs_dense", "device", "cpu_figures", "note",
)

DEFAULT_COLUMNS = (
    "method", "param", "ratio", "shape", "tokens", "dtype", "direction", "median_ms", "min_ms", "max_ms", "timing",
    "tflops", "gbs", "floor_ms", "speedup_vs_dense", "speedup_vs_unfused", "speedup_vs_torch24",
)

_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}

CPU_NOTE = (
    "CPU figures: the pure-PyTorch reference paths timed on the CPU in the small mode. They say "
    "nothing about the Triton kernels' GPU performance."
)


def parse_dtypes(spec: str) -> list[torch.dtype]:
    out = []
    for item in (s.strip().lower() for s in spec.split(",")):
        if not item:
            continue
        item = _ALIASES.get(item, item)
        if item not in _DTYPES:
            raise ValueError(f"dtypes: expected names from {sorted(_DTYPES)}, got {item!r}")
        out.append(_DTYPES[item])
    if not out:
        raise ValueError(f"dtypes: expected at least one of {sorted(_DTYPES)}, got {spec!r}")
    return out


def git_commit() -> tuple[str, bool]:
    """``(commit sha, dirty)`` of the checkout holding this package, ``('unknown', False)`` if none."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not sha:
            return "unknown", False
        dirty = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
            capture_output=True, text=True, timeout=10,
        ).stdout.strip())
        return sha, dirty
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", False


def base_meta(device: torch.device, cpu_figures: bool, sweep: str = "", argv: Optional[Sequence[str]] = None) -> dict:
    commit, dirty = git_commit()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    return {
        "commit": commit,
        "dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["fastfactor", "bench", *(argv if argv is not None else sys.argv[2:])]),
        "device": device_name(device),
        "device_type": device.type,
        "cpu_figures": cpu_figures,
        "note": CPU_NOTE if cpu_figures else "",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "sweep": sweep,
        "messages": [],
    }


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # nan
            return "-"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.3g}" if a < 10 else f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def format_table(rows: Iterable[dict], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """A table of ``rows`` (tabulate's ``github`` style when installed, else aligned plain text).
    Columns that are empty in every row are left out."""
    rows = list(rows)
    cols = [c for c in columns if any(r.get(c) not in (None, "") for r in rows)]
    body = [[_fmt(r.get(c)) for c in cols] for r in rows]
    try:
        from tabulate import tabulate

        return tabulate(body, headers=cols, tablefmt="github", disable_numparse=True)
    except ImportError:
        widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(cols)]
        line = lambda cells: "  ".join(s.rjust(w) for s, w in zip(cells, widths))  # noqa: E731
        return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(b) for b in body])


def banner(meta: dict) -> str:
    lines = [
        f"fastfactor bench  {meta.get('sweep') or ''}".rstrip(),
        f"device: {meta['device']}   torch {meta['torch']}   triton {meta['triton']}",
        f"commit: {meta['commit']}{' (dirty)' if meta.get('dirty') else ''}   date: {meta['date']}",
    ]
    roof = meta.get("roofline")
    if roof:
        rates = ", ".join(f"{k} {v:.1f}" for k, v in roof["matrix_tflops"].items())
        lines.append(f"roofline: matmul TFLOP/s {rates}; copy {roof['bandwidth_gbs']:.0f} GB/s")
    if meta.get("threads"):
        lines.append(f"CPU threads: {meta['threads']} (pinned); min_ms / max_ms: the spread of the timed runs")
    if meta.get("cpu_figures"):
        lines.append("*** " + CPU_NOTE + " ***")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

def _clean(v):
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    return v


def write_json(path: str, meta: dict, rows: Sequence[dict], e2e: Sequence[dict] = ()) -> None:
    doc = {
        "schema": SCHEMA,
        "meta": meta,
        "rows": [{k: _clean(r.get(k)) for k in ROW_FIELDS} for r in rows],
        "e2e": [{k: _clean(r.get(k)) for k in E2E_FIELDS} for r in e2e],
    }
    _ensure_dir(path)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def write_csv(path: str, meta: dict, rows: Sequence[dict], e2e: Sequence[dict] = ()) -> None:
    """Kernel rows (and, if any, end-to-end rows to ``<path stem>-e2e.csv``)."""
    extra = {"commit": meta["commit"], "date": meta["date"], "cpu_figures": meta["cpu_figures"]}

    def dump(p, fields, items):
        _ensure_dir(p)
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(fields) + [k for k in extra if k not in fields])
            w.writeheader()
            for r in items:
                w.writerow({**{k: _clean(r.get(k)) for k in fields}, **extra})

    dump(path, ROW_FIELDS, rows)
    if e2e:
        stem, ext = os.path.splitext(path)
        dump(f"{stem}-e2e{ext or '.csv'}", E2E_FIELDS, e2e)


def _ensure_dir(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


def line_colors(n: int) -> list:
    """``n`` distinct colours (RGBA): tab10 up to 10 lines, tab20 up to 20, then evenly spaced on
    the turbo map (matplotlib's default cycle repeats after 10, so legends became ambiguous)."""
    import matplotlib

    if n <= 10:
        cmap, xs = matplotlib.colormaps["tab10"], [i / 10 + 0.05 for i in range(n)]
    elif n <= 20:
        cmap, xs = matplotlib.colormaps["tab20"], [i / 20 + 0.025 for i in range(n)]
    else:
        cmap, xs = matplotlib.colormaps["turbo"], [0.05 + 0.9 * i / (n - 1) for i in range(n)]
    return [tuple(float(c) for c in cmap(x)) for x in xs]


def write_plot(path: str, meta: dict, rows: Sequence[dict]) -> Optional[str]:
    """Throughput (TFLOP/s on the factorized FLOPs) and speedup over dense ``F.linear`` against
    the compression ratio, one row of panels per (shape, dtype), one line per (method, tokens,
    direction); dense drawn as the dashed reference. Returns None on success, else why it was
    skipped (matplotlib missing, nothing to plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped (pip install matplotlib)"
    fact = [r for r in rows if r["method"] != "dense" and r.get("median_ms")]
    if not fact:
        return "no factorized rows to plot"
    panels = sorted({(r["shape"], r["dtype"]) for r in fact}, key=lambda k: (k[1], _shape_key(k[0])))
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for (shape, dtype), (ax_t, ax_s) in zip(panels, axes):
        sel = [r for r in fact if r["shape"] == shape and r["dtype"] == dtype]
        keys = sorted({(r["method"], r["tokens"], r["direction"]) for r in sel})
        for (method, tokens, direction), color in zip(keys, line_colors(len(keys))):
            line = sorted((r for r in sel if (r["method"], r["tokens"], r["direction"]) == (method, tokens, direction)),
                          key=lambda r: r["ratio"])
            label = f"{method} M={tokens} {direction}"
            xs = [r["ratio"] for r in line]
            ax_t.plot(xs, [r["tflops"] for r in line], marker="o", label=label, color=color)
            ax_s.plot(xs, [r["speedup_vs_dense"] for r in line], marker="o", label=label, color=color)
        for r in rows:
            if r["method"] == "dense" and r["shape"] == shape and r["dtype"] == dtype:
                ax_t.axhline(r["tflops"], ls=":", lw=0.8, color="grey")
        ax_s.axhline(1.0, ls="--", color="black", lw=1)
        title = f"{shape} {dtype}"
        ax_t.set_title(f"{title}: throughput (dotted: dense F.linear)")
        ax_s.set_title(f"{title}: speedup over dense F.linear")
        ax_t.set_ylabel("TFLOP/s (factorized FLOPs)")
        ax_s.set_ylabel("× dense")
        for ax in (ax_t, ax_s):
            ax.set_xlabel("compression ratio (fraction of weights kept)")
            ax.grid(alpha=0.3)
        ax_s.legend(fontsize=7, ncol=2)
    head = f"{meta.get('sweep') or 'fastfactor bench'} — {meta['device']} — {meta['commit'][:10]} {meta['date'][:10]}"
    if meta.get("cpu_figures"):
        head += "\nCPU FIGURES (reference paths, small mode): not GPU kernel performance"
    fig.suptitle(head, fontsize=10)
    fig.tight_layout()
    _ensure_dir(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _shape_key(name: str):
    try:
        a, b = name.split("x")
        return (int(a), int(b))
    except ValueError:
        return (0, 0)
