"""The dense reference: the uncompressed model given exactly the compressed run's training.

A compressed model fine-tuned for ``N`` steps after compression is not comparable with the
uncompressed model as it was (which never saw those ``N`` steps): the fair baseline is the
uncompressed model fine-tuned for the same ``N`` steps. With ``dense_reference=True``
(``--dense-reference``) the driver calls :func:`dense_reference` once, before anything is
replaced: it fine-tunes a deep copy of the uncompressed model through the same phases as the
run (:meth:`CompressionConfig.phases`: the same steps, batch size, seeds, hence the same batches
in the same order, and the same per-phase learning rate, warm-up and decay), on the task loss
(the best use of the labels for a dense model; the compressed run's distillation terms would
only pull the reference towards itself), and evaluates it with the run's evaluator. The report
then prints it beside the compressed model::

    points lost to compression = 100 · (metric(dense reference) − metric(compressed))

(for a metric in [0, 1]; a negative number means the compressed model scored higher).

The torch RNG is forked around it (dropout draws of the compressed run unchanged: a run with
``dense_reference`` gives bitwise the same compressed model as one without). A resumed run
recomputes it (same seeds, same value).
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Dict, Optional

import torch
from torch import nn


def dense_reference(model: nn.Module, cfg, data, evaluator, num_stages: int, device="cpu", progress: bool = False,
                    log: Optional[Callable[[str], None]] = None, **train_kw) -> Dict:
    """Fine-tune a deep copy of ``model`` (uncompressed) through ``cfg.phases(num_stages)`` on the
    task loss; returns ``{"objective", "steps", "phases", "metrics", "train", "seconds"}``.
    ``train_kw``: the run's other :func:`fastfactor.train.finetune` arguments (batch size,
    weight decay, clipping, embeddings, parallel engine). ``model`` is not changed."""
    from ..train.loop import Objective, finetune

    if data is None or not data.labelled:
        raise ValueError(
            "dense_reference: needs labelled data (the reference is the uncompressed model fine-tuned on the "
            "task; on unlabelled data the uncompressed model itself is the reference), got "
            + ("no data" if data is None else "unlabelled data")
        )
    if evaluator is None:
        raise ValueError("evaluator: the dense reference is measured with the run's evaluator, got None")
    t0 = time.perf_counter()
    dense = copy.deepcopy(model)
    objective = Objective.build(dense, data, "task", device=device)
    phases = cfg.phases(num_stages)
    train = []
    dev = torch.device(device)
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        for name, kw in phases:
            train.append(finetune(dense, objective, data, **kw, progress=progress,
                                  desc=f"dense reference ({name})", **train_kw))
    metrics = evaluator(dense)
    steps = sum(kw["steps"] for _, kw in phases)
    out = {
        "objective": "task", "steps": steps, "phases": [name for name, _ in phases], "metrics": metrics,
        "train": {"loss_first": train[0]["loss_first"], "loss_last": train[-1]["loss_last"]} if train else {},
        "seconds": time.perf_counter() - t0,
    }
    del dense, objective
    if log is not None:
        log(f"dense reference: {steps} steps, {metrics}")
    return out


def points_lost(report) -> Optional[float]:
    """``100·(dense reference − compressed)`` on the primary metric, or None without a reference."""
    pm = report.primary_metric
    ref = (report.dense_reference or {}).get("metrics", {}).get(pm)
    after = report.metrics_after.get(pm)
    if ref is None or after is None:
        return None
    return 100.0 * (ref - after)


def summary_rows(report, fmt) -> list:
    """Rows ``[label, before, after]`` for the report's summary table."""
    ref = report.dense_reference or {}
    pm = report.primary_metric
    if not ref or not pm:
        return []
    lost = points_lost(report)
    return [
        [f"{pm} (dense, same {ref['steps']} steps)", fmt(report.metrics_before.get(pm)), fmt(ref["metrics"].get(pm))],
        ["points lost to compression", "", "-" if lost is None else f"{lost:+.2f}"],
    ]


__all__ = ["dense_reference", "points_lost", "summary_rows"]
