"""Task data for fine-tuning and evaluation: tokenized, padded tensors plus what the task is.

``TaskData`` holds a train and an eval split as dicts of equal-length tensors (``input_ids``,
``attention_mask``, optional ``token_type_ids`` and ``labels``), the task type
(``classification``, ``regression`` or ``unlabelled``) and the metrics to report. Batches are
trimmed to their longest sequence, so storing the splits padded costs nothing at run time.

Sources (through the ``datasets`` library):

* a GLUE task by name (``load_task_data(tok, task="sst2")``; needs the hub or its cache);
* local ``.csv``, ``.json``/``.jsonl`` or ``.parquet`` files (``train_file=``, ``eval_file=``);
* a list of strings (``TaskData.from_texts``), e.g. unlabelled text for distillation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from .metrics import GLUE_METRICS

#: GLUE task → (text field(s), number of labels; 1 = regression)
GLUE_TASKS = {
    "cola": (("sentence",), 2),
    "sst2": (("sentence",), 2),
    "mrpc": (("sentence1", "sentence2"), 2),
    "qqp": (("question1", "question2"), 2),
    "stsb": (("sentence1", "sentence2"), 1),
    "mnli": (("premise", "hypothesis"), 3),
    "qnli": (("question", "sentence"), 2),
    "rte": (("sentence1", "sentence2"), 2),
    "wnli": (("sentence1", "sentence2"), 2),
}

#: text-field guesses for local files, tried in order
_TEXT_FIELD_GUESSES = [
    ("sentence1", "sentence2"), ("question1", "question2"), ("premise", "hypothesis"),
    ("question", "sentence"), ("sentence",), ("text",), ("content",),
]

_EXT_FORMAT = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".tsv": "csv"}

Batch = Dict[str, torch.Tensor]


@dataclass
class TaskData:
    train: Batch
    eval: Batch
    task_type: str = "unlabelled"  #: classification | regression | unlabelled
    num_labels: int = 0
    metric_names: Sequence[str] = ()
    name: str = "data"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.task_type not in ("classification", "regression", "unlabelled"):
            raise ValueError(
                f"task_type: expected classification, regression or unlabelled, got {self.task_type!r}"
            )
        for split in ("train", "eval"):
            b = getattr(self, split)
            if not isinstance(b, dict) or "input_ids" not in b:
                raise TypeError(f"{split}: expected a dict of tensors with 'input_ids', got {type(b).__name__}")
        if self.task_type != "unlabelled" and "labels" not in self.train:
            raise ValueError(f"train: a {self.task_type} task needs 'labels'")

    @property
    def labelled(self) -> bool:
        return self.task_type != "unlabelled"

    def __len__(self):
        return int(self.train["input_ids"].shape[0])

    @classmethod
    def from_texts(
        cls, tokenizer, train_texts: Sequence, eval_texts: Sequence, train_labels=None, eval_labels=None,
        max_length: int = 128, task_type: Optional[str] = None, name: str = "texts",
    ) -> "TaskData":
        """Tokenize strings (or ``(a, b)`` pairs); labels make it a labelled task."""
        tr = tokenize(tokenizer, train_texts, max_length)
        ev = tokenize(tokenizer, eval_texts, max_length)
        if train_labels is not None:
            tr["labels"] = _labels_tensor(train_labels)
            ev["labels"] = _labels_tensor(eval_labels if eval_labels is not None else [])
            if task_type is None:
                task_type = "regression" if tr["labels"].is_floating_point() else "classification"
        task_type = task_type or "unlabelled"
        num_labels = 1 if task_type == "regression" else (
            int(tr["labels"].max()) + 1 if task_type == "classification" else 0
        )
        return cls(tr, ev, task_type, num_labels, (), name)


def _labels_tensor(labels) -> torch.Tensor:
    vals = list(labels)
    if vals and all(float(v) == int(float(v)) for v in vals) and not any(isinstance(v, float) for v in vals):
        return torch.tensor([int(v) for v in vals], dtype=torch.long)
    return torch.tensor([float(v) for v in vals], dtype=torch.float32)


def tokenize(tokenizer, texts: Sequence, max_length: int) -> Batch:
    texts = list(texts)
    if texts and isinstance(texts[0], (tuple, list)):
        a = [t[0] for t in texts]
        b = [t[1] for t in texts]
        enc = tokenizer(a, b, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    else:
        enc = tokenizer(
            [str(t) for t in texts], truncation=True, max_length=max_length, padding="max_length",
            return_tensors="pt",
        )
    keep = ("input_ids", "attention_mask", "token_type_ids")
    return {k: v for k, v in enc.items() if k in keep}


def _rows(ds, fields: Sequence[str]) -> List:
    cols = [ds[f] for f in fields]
    return list(zip(*cols)) if len(fields) == 2 else list(cols[0])


def _load_file(path: str, split_name: str):
    import datasets

    if not os.path.isfile(path):
        raise ValueError(f"{split_name}: expected an existing .csv/.json/.jsonl/.parquet file, got {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXT_FORMAT:
        raise ValueError(f"{split_name}: expected a .csv, .tsv, .json, .jsonl or .parquet file, got {path!r}")
    kw = {"delimiter": "\t"} if ext == ".tsv" else {}
    return datasets.load_dataset(_EXT_FORMAT[ext], data_files={"data": path}, split="data", **kw)


def load_task_data(
    tokenizer,
    task: Optional[str] = None,
    train_file: Optional[str] = None,
    eval_file: Optional[str] = None,
    text_fields: Optional[Sequence[str]] = None,
    label_field: str = "label",
    max_length: int = 128,
    max_train: Optional[int] = None,
    max_eval: Optional[int] = None,
    unlabelled: bool = False,
    seed: int = 0,
) -> TaskData:
    """Load a GLUE task (``task``) or local files (``train_file`` [+ ``eval_file``; without it
    10% of the train file is held out]). ``unlabelled=True`` drops labels (distillation)."""
    if (task is None) == (train_file is None):
        raise ValueError(f"task/train_file: expected exactly one of them, got task={task!r}, train_file={train_file!r}")
    metric_names: Sequence[str] = ()
    if task is not None:
        key = task.lower().replace("-", "")
        if key not in GLUE_TASKS:
            raise ValueError(f"task: expected a GLUE task in {sorted(GLUE_TASKS)}, got {task!r}")
        import datasets

        try:
            ds = datasets.load_dataset("nyu-mll/glue", key)
        except Exception as e:  # noqa: BLE001 - offline / hub unreachable
            raise RuntimeError(
                f"task: could not load GLUE {key!r} ({type(e).__name__}: {e}); without the hub use "
                "--train-file/--eval-file with local csv/json/parquet files"
            ) from e
        fields, nl = GLUE_TASKS[key]
        train_ds = ds["train"]
        eval_ds = ds["validation_matched" if key == "mnli" else "validation"]
        text_fields = text_fields or fields
        metric_names = GLUE_METRICS[key]
        name = key
    else:
        train_ds = _load_file(train_file, "train_file")
        if text_fields is None:
            cols = set(train_ds.column_names)
            text_fields = next((g for g in _TEXT_FIELD_GUESSES if set(g) <= cols), None)
            if text_fields is None:
                raise ValueError(
                    f"text_fields: could not guess the text column(s) of {train_file!r} (columns "
                    f"{train_ds.column_names}); pass them explicitly"
                )
        if eval_file is not None:
            eval_ds = _load_file(eval_file, "eval_file")
        else:
            parts = train_ds.train_test_split(test_size=0.1, seed=seed)
            train_ds, eval_ds = parts["train"], parts["test"]
        name = os.path.basename(train_file)
    text_fields = tuple(text_fields)
    for split, d in (("train", train_ds), ("eval", eval_ds)):
        missing = [f for f in text_fields if f not in d.column_names]
        if missing:
            raise ValueError(f"text_fields: {split} data has no column(s) {missing} (columns {d.column_names})")
    if not 1 <= len(text_fields) <= 2:
        raise ValueError(f"text_fields: expected one or two column names, got {list(text_fields)}")
    if max_train is not None:
        train_ds = train_ds.shuffle(seed=seed).select(range(min(max_train, len(train_ds))))
    if max_eval is not None:
        eval_ds = eval_ds.select(range(min(max_eval, len(eval_ds))))
    has_labels = (not unlabelled) and label_field in train_ds.column_names
    tr_l = train_ds[label_field] if has_labels else None
    ev_l = eval_ds[label_field] if has_labels and label_field in eval_ds.column_names else None
    if has_labels and ev_l is None:
        raise ValueError(f"label_field: eval data has no {label_field!r} column")
    td = TaskData.from_texts(
        tokenizer, _rows(train_ds, text_fields), _rows(eval_ds, text_fields), tr_l, ev_l, max_length,
        task_type=("regression" if task and GLUE_TASKS[key][1] == 1 else None) if has_labels else None,
        name=name,
    )
    if task is not None and has_labels:
        td.num_labels = GLUE_TASKS[key][1]
    td.metric_names = metric_names if has_labels else ()
    return td


def select(batch: Batch, idx) -> Batch:
    """Rows ``idx`` of a split, trimmed to the longest sequence among them."""
    out = {k: v[idx] for k, v in batch.items()}
    if "attention_mask" in out and out["attention_mask"].ndim == 2 and out["attention_mask"].numel():
        length = int(out["attention_mask"].sum(1).max())
        length = max(length, 1)
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            if k in out:
                out[k] = out[k][:, :length]
    return out


def iterate(batch: Batch, batch_size: int, shuffle: bool = False, seed: int = 0, epochs_forever: bool = False,
            start: int = 0) -> Iterator[Batch]:
    """Mini-batches of a split; with ``epochs_forever`` cycles with a fresh permutation per epoch.
    ``start`` skips that many batches first (the data position of a resumed run) without
    building them: batch ``i`` of ``iterate(..., start=s)`` is batch ``s + i`` of ``iterate(...)``."""
    n = int(batch["input_ids"].shape[0])
    if n == 0:
        raise ValueError("data: the split is empty")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start: expected an int >= 0 (batches to skip), got {start!r}")
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            if start:
                start -= 1
                continue
            yield select(batch, order[i : i + batch_size])
        if not epochs_forever:
            return
