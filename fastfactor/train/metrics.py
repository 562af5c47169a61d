"""Evaluation metrics, as GLUE defines them, in plain PyTorch (no scipy / sklearn needed).

* accuracy: fraction of exact label matches;
* F1: of the positive class (label 1) for binary tasks (MRPC, QQP), ``2·P·R/(P + R)``;
* Matthews correlation (CoLA): ``(TP·TN − FP·FN)/√((TP+FP)(TP+FN)(TN+FP)(TN+FN))``, 0 when a
  marginal is empty; the multi-class form (Gorodkin's R_K) for more than two labels;
* Pearson ``r`` and Spearman ``ρ`` (STS-B): Spearman is Pearson on average ranks (ties share
  the mean of their ranks).
"""

from __future__ import annotations

import math
from typing import Dict

import torch

#: GLUE task → its metrics; the first is the primary one reported per stage
GLUE_METRICS = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}


def _flat(t) -> torch.Tensor:
    return torch.as_tensor(t).reshape(-1)


def accuracy(pred, labels) -> float:
    p, y = _flat(pred), _flat(labels)
    if p.numel() != y.numel():
        raise ValueError(f"pred: expected {y.numel()} predictions (one per label), got {p.numel()}")
    return float((p == y).double().mean()) if y.numel() else float("nan")


def f1_binary(pred, labels, positive: int = 1) -> float:
    p, y = _flat(pred) == positive, _flat(labels) == positive
    tp = float((p & y).sum())
    fp = float((p & ~y).sum())
    fn = float((~p & y).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(pred, labels) -> float:
    p, y = _flat(pred).long(), _flat(labels).long()
    classes = torch.unique(torch.cat([p, y]))
    idx = {int(c): i for i, c in enumerate(classes)}
    k = len(classes)
    conf = torch.zeros(k, k, dtype=torch.float64)
    for a, b in zip(y.tolist(), p.tolist()):
        conf[idx[a], idx[b]] += 1
    t = conf.sum(1)  # true counts per class
    q = conf.sum(0)  # predicted counts per class
    c, s = conf.trace(), conf.sum()
    num = c * s - (t * q).sum()
    den = math.sqrt(float((s * s - (q * q).sum()) * (s * s - (t * t).sum())))
    return 0.0 if den == 0 else float(num / den)


def pearson(x, y) -> float:
    x, y = _flat(x).double(), _flat(y).double()
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float("nan") if den == 0 else float((x * y).sum()) / den


def rankdata(x) -> torch.Tensor:
    """Average ranks (1-based), ties sharing the mean rank."""
    x = _flat(x).double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    xs = x[order]
    n = x.numel()
    i = 0
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    return pearson(rankdata(x), rankdata(y))


def task_metrics(task_type: str, outputs: torch.Tensor, labels: torch.Tensor, names=None) -> Dict[str, float]:
    """Metrics of a labelled task from model outputs (logits ``(n, C)`` or scores ``(n,)``/``(n, 1)``)."""
    if task_type == "regression":
        scores = outputs.reshape(outputs.shape[0], -1)[:, 0]
        names = names or ("pearson", "spearman")
        vals = {"pearson": pearson(scores, labels), "spearman": spearman(scores, labels)}
        mse = float(((scores.double() - labels.double()) ** 2).mean())
        return {**{n: vals[n] for n in names if n in vals}, "mse": mse}
    pred = outputs.argmax(-1)
    names = names or (("f1", "accuracy") if outputs.shape[-1] == 2 else ("accuracy",))
    fns = {"accuracy": accuracy, "f1": f1_binary, "mcc": matthews_corrcoef}
    out = {n: fns[n](pred, labels) for n in names if n in fns}
    out.setdefault("accuracy", accuracy(pred, labels))
    return out


def pairwise_similarity_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation between the pairwise cosine similarities of two sets of embeddings
    ``(n, d)`` (upper triangle, ``i < j``): does the compressed model rank sentence pairs like
    the original?"""
    def sims(e):
        e = torch.nn.functional.normalize(e.double(), dim=-1)
        s = e @ e.t()
        iu = torch.triu_indices(s.shape[0], s.shape[0], offset=1)
        return s[iu[0], iu[1]]

    return spearman(sims(a), sims(b))


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())
