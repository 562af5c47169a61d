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

import math
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

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


def check_data_file(path: str, split_name: str) -> str:
    """Refuse, with one line naming ``split_name`` and the file, what ``datasets`` would fail on
    with an anonymous traceback: a missing file, an unknown extension, an empty file, a text file
    that is not UTF-8. Returns the ``datasets`` format name."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ValueError(f"{split_name}: expected an existing .csv/.tsv/.json/.jsonl/.parquet file, got {path!r}")
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXT_FORMAT:
        raise ValueError(f"{split_name}: expected a .csv, .tsv, .json, .jsonl or .parquet file, got {path!r}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{split_name}: {path} is empty (expected a header and rows)")
    if ext != ".parquet":
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ValueError(
                f"{split_name}: {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                "re-save it as UTF-8"
            ) from None
        if not text.strip():
            raise ValueError(f"{split_name}: {path} holds only whitespace (expected a header and rows)")
    return _EXT_FORMAT[ext]


def _load_file(path: str, split_name: str):
    """One local file as a ``datasets.Dataset``; every failure a ``ValueError`` naming the file."""
    import datasets

    fmt = check_data_file(path, split_name)
    ext = os.path.splitext(path)[1].lower()
    kw = {"delimiter": "\t"} if ext == ".tsv" else {}
    from datasets.utils import logging as dlog

    was_enabled = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()  # a local file's "Generating split" bar is noise
    level = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL + 10)  # its parser errors are logged with tracebacks; ours names the file
    try:
        ds = datasets.load_dataset(fmt, data_files={"data": os.path.abspath(path)}, split="data", **kw)
    except Exception as e:  # noqa: BLE001 - datasets wraps parser errors without the file name
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        if "corresponds to no data" in str(e):
            raise ValueError(f"{split_name}: {path} has no rows (a header only?)") from None
        msg = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise ValueError(
            f"{split_name}: could not read {path} as {fmt} ({type(cause).__name__}: {msg[:300]})"
        ) from None
    finally:
        dlog.set_verbosity(level)
        if was_enabled:
            dlog.enable_progress_bar()
    if len(ds) == 0:
        raise ValueError(f"{split_name}: {path} has no rows (a header only?)")
    return ds


# --------------------------------------------------------------------------------------------
# labels: checked (missing values, type, range) before any model is loaded
# --------------------------------------------------------------------------------------------

@dataclass
class LabelSpec:
    """What a label column means: ``task_type`` (classification | regression), ``num_labels``
    (1 for regression) and, for text labels, ``label2id`` (text → class id)."""

    task_type: str
    num_labels: int
    label2id: Optional[Dict[str, int]] = None

    @property
    def id2label(self) -> Optional[Dict[int, str]]:
        return None if self.label2id is None else {i: k for k, i in self.label2id.items()}

    def encode(self, values) -> torch.Tensor:
        vals = list(values)
        if self.task_type == "regression":
            return torch.tensor([float(v) for v in vals], dtype=torch.float32)
        if self.label2id is not None:
            return torch.tensor([self.label2id[str(v).strip()] for v in vals], dtype=torch.long)
        return torch.tensor([int(_as_number(v)) for v in vals], dtype=torch.long)


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _as_number(v):
    """``int`` / ``float`` for numeric values and numeric strings, else None."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return int(v) if v.is_integer() else v
    if isinstance(v, str):
        t = v.strip()
        try:
            return int(t)
        except ValueError:
            pass
        try:
            f = float(t)
        except ValueError:
            return None
        return int(f) if f.is_integer() else f
    return None


TASK_TYPES = ("auto", "classification", "regression")


def label_spec(
    columns: Sequence[Tuple[str, Sequence]],
    field: str = "label",
    task_type: str = "auto",
    num_labels: Optional[int] = None,
    label2id: Optional[Dict[str, int]] = None,
    num_labels_source: str = "num_labels",
) -> LabelSpec:
    """Check the label columns and decide what they mean; every problem a ``ValueError`` naming
    the file, the row (1-based data row, the header not counted) and the column.

    Args:
        columns: ``[(source, values)]``, e.g. ``[("train.csv", [...]), ("dev.json", [...])]``.
        field: the column's name (for messages).
        task_type: ``"classification"`` (integer ids, or text mapped to ids; a non-integer number
            is an error), ``"regression"`` (numbers), or ``"auto"`` (regression when a non-integer
            number is present, else classification).
        num_labels: the head's number of classes (1 = regression); ``None``: inferred
            (``max id + 1``, or the number of distinct texts).
        label2id: a text → id map to use when it covers every text label (e.g. a fine-tuned
            model's ``config.label2id``); otherwise the sorted distinct texts get ids 0, 1, ...
        num_labels_source: how to name ``num_labels`` in messages (e.g. ``"--num-labels"``).
    """
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type: expected one of {TASK_TYPES}, got {task_type!r}")
    if num_labels is not None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"{num_labels_source}: expected an int >= 1, got {num_labels!r}")
        if num_labels == 1:
            if task_type == "classification":
                raise ValueError(f"{num_labels_source}: 1 means a regression head, but classification was asked")
            task_type = "regression"
    texts, numbers, fractional = {}, {}, None
    for src, values in columns:
        for i, v in enumerate(values):
            where = f"{src} row {i + 1}, column {field!r}"
            if _is_missing(v):
                raise ValueError(f"{field}: missing label in {where}")
            num = _as_number(v)
            if num is None:
                if not isinstance(v, str):
                    raise ValueError(f"{field}: expected a number or a text label, got {type(v).__name__} {v!r} in {where}")
                texts.setdefault(v.strip(), where)
            else:
                numbers.setdefault(num, where)
                if isinstance(num, float) and fractional is None:
                    fractional = (num, where)
    if not texts and not numbers:
        raise ValueError(f"{field}: no labels in {', '.join(src for src, _ in columns)}")
    if texts and numbers:
        (t, tw), (n, nw) = next(iter(texts.items())), next(iter(numbers.items()))
        raise ValueError(f"{field}: mixed text and numeric labels ({t!r} in {tw}; {n!r} in {nw})")
    if texts:
        if task_type == "regression":
            t, tw = next(iter(texts.items()))
            raise ValueError(f"{field}: regression needs numeric labels, got {t!r} in {tw}")
        if label2id and all(t in label2id for t in texts):
            mapping = {str(k): int(i) for k, i in label2id.items()}
        else:
            mapping = {t: i for i, t in enumerate(sorted(texts))}
        n = max(mapping.values()) + 1
        if num_labels is not None and num_labels < n:
            raise ValueError(
                f"{num_labels_source}: {num_labels} classes, but the data have {n} distinct labels "
                f"({', '.join(sorted(mapping)[:8])}{', ...' if n > 8 else ''})"
            )
        return LabelSpec("classification", num_labels or n, mapping)
    if fractional is not None and task_type != "regression":
        if task_type == "classification":
            v, w = fractional
            raise ValueError(
                f"{field}: non-integer label {v!r} in {w} for a classification head; ask for regression "
                "(--task-type regression or --num-labels 1) or give integer class ids"
            )
        task_type = "regression"
    if task_type == "regression":
        return LabelSpec("regression", 1, None)
    neg = [(k, w) for k, w in numbers.items() if k < 0]
    if neg:
        raise ValueError(f"{field}: expected class ids >= 0, got {neg[0][0]} in {neg[0][1]}")
    top, where = max(numbers.items())
    if num_labels is not None and top >= num_labels:
        raise ValueError(
            f"{field}: class id {top} in {where} is out of range for {num_labels} classes "
            f"({num_labels_source} = {num_labels}; ids must be in [0, {num_labels - 1}])"
        )
    return LabelSpec("classification", num_labels or top + 1, None)


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
    task_type: str = "auto",
    num_labels: Optional[int] = None,
    label2id: Optional[Dict[str, int]] = None,
    require_labels: bool = False,
    num_labels_source: str = "num_labels",
) -> TaskData:
    """Load a GLUE task (``task``) or local files (``train_file`` [+ ``eval_file``; without it
    10% of the train file is held out]). ``unlabelled=True`` drops labels (distillation).

    Labels are checked on the whole files before any split or selection (:func:`label_spec`:
    missing values, type and range, named by file, row and column); text labels are mapped to
    ids (the map in ``extra["label2id"]``). ``task_type``/``num_labels``/``label2id``: see
    :func:`label_spec`. ``require_labels=True``: a ``label_field`` missing from the data is an
    error rather than unlabelled data."""
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
        train_ds = full_train = ds["train"]
        eval_ds = ds["validation_matched" if key == "mnli" else "validation"]
        text_fields = text_fields or fields
        metric_names = GLUE_METRICS[key]
        name = key
    else:
        train_ds = _load_file(train_file, "train_file")
        full_train = train_ds  # labels are checked on the whole file (row numbers as in the file)
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
    spec = None
    has_labels = (not unlabelled) and label_field in train_ds.column_names
    if not unlabelled and require_labels and not has_labels:
        src = train_file if train_file is not None else f"GLUE {name}"
        raise ValueError(
            f"label_field: {src} has no column {label_field!r} (columns {train_ds.column_names})"
        )
    if has_labels:
        if label_field not in eval_ds.column_names:
            raise ValueError(
                f"label_field: eval data{f' ({eval_file})' if eval_file else ''} has no {label_field!r} column "
                f"(columns {eval_ds.column_names})"
            )
        if task is not None:
            tt = task_type if task_type != "auto" else ("regression" if GLUE_TASKS[key][1] == 1 else "classification")
            cols = [(f"GLUE {key} train", train_ds[label_field]), (f"GLUE {key} eval", eval_ds[label_field])]
            if tt == "classification" and num_labels is None:
                num_labels = GLUE_TASKS[key][1]
        else:
            tt = task_type
            cols = [(os.path.basename(train_file), full_train[label_field])]
            if eval_file is not None:
                cols.append((os.path.basename(eval_file), eval_ds[label_field]))
        spec = label_spec(cols, label_field, tt, num_labels, label2id, num_labels_source)
    if max_train is not None:
        train_ds = train_ds.shuffle(seed=seed).select(range(min(max_train, len(train_ds))))
    if max_eval is not None:
        eval_ds = eval_ds.select(range(min(max_eval, len(eval_ds))))
    td = TaskData.from_texts(
        tokenizer, _rows(train_ds, text_fields), _rows(eval_ds, text_fields), None, None, max_length, name=name,
    )
    if spec is not None:
        td.train["labels"] = spec.encode(train_ds[label_field])
        td.eval["labels"] = spec.encode(eval_ds[label_field])
        td.task_type, td.num_labels = spec.task_type, spec.num_labels
        td.extra["label_spec"] = spec
        if spec.label2id is not None:
            td.extra["label2id"] = dict(spec.label2id)
    td.metric_names = metric_names if spec is not None else ()
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
