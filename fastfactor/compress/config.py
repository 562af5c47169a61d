"""``CompressionConfig``: what to compress, how, and on which schedule.

A plain dataclass, loadable from a dict, a JSON file or a YAML file (``CompressionConfig.load``).
Every field is checked in ``__post_init__`` with an error naming the field.

Fields
------
method        a family of :mod:`fastfactor.families`: ``lowrank``, ``monarch``, ``block_lowrank``,
              ``sparse24``, ``dense_sparse``, or one registered by user code
ratio         fraction of each target's dense weight parameters the factors keep (0 < ratio <= 1);
              ignored by ``sparse24``, whose pattern fixes it
module_ratios per-module overrides ``{pattern: ratio}``; the first pattern (in order) that
              matches a module's qualified name wins
targets       name patterns of the modules to replace (``fnmatch`` globs on the qualified name, or
              regular expressions prefixed ``re:``); ``None`` means every linear layer inside the
              transformer blocks (embeddings, pooler, classifier heads and ``lm_head`` excluded)
exclude       patterns removed from the targets
init          ``auto`` (the method's default, its first init) or one of its inits: lowrank ``svd`` | ``fisher`` | ``activation``;
              monarch / block_lowrank ``projection``; sparse24 ``magnitude`` | ``fisher`` |
              ``activation``; dense_sparse ``svd_als`` | ``svd`` (prune the
              SVD factor without the alternating least-squares refinement: much faster on CPU)
nblocks       block count for monarch / block_lowrank
schedule      ``all_at_once`` | ``staged`` | ``offline``
stage_unit    for ``staged``: ``layer`` (one module per stage) or ``block`` (one transformer block)
stage_steps   fine-tuning steps after each stage (``staged``)
final_steps   fine-tuning steps after every target is replaced (``staged`` and ``all_at_once``)
calib_batches batches used for Fisher / activation statistics
objective     ``auto`` | ``task`` | ``distill``: fine-tune on labels, or distil the uncompressed model
distill_loss  ``auto`` | ``mse`` (hidden states) | ``kl`` (logits)
lr, weight_decay, warmup_ratio, max_grad_norm, batch_size, seed: fine-tuning settings
train_embeddings  also fine-tune ``nn.Embedding`` tables (default: frozen; they are not
              compressed and their dense gradients dominate the step time of small models)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .. import _validate as V
from ..families import INITS, METHODS, get_family  # live views of fastfactor.families.FAMILIES

SCHEDULES = ("all_at_once", "staged", "offline")
STAGE_UNITS = ("layer", "block")
OBJECTIVES = ("auto", "task", "distill")
DISTILL_LOSSES = ("auto", "mse", "kl")

#: ``METHODS``: the family names; ``INITS``: the init names each method accepts, the first its
#: default (``init="auto"``). Both follow fastfactor.families, so a family or an init registered
#: by user code is accepted here.


def _choice(name, value, choices):
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {list(choices)}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def check_patterns(name, patterns) -> None:
    """Every ``re:`` pattern compiles (an invalid one named with the regex error)."""
    for p in patterns:
        if isinstance(p, str) and p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"{name}: invalid regular expression {p!r} ({e})") from None


def _nonneg_int(name, value):
    return V.check_positive_int(name, value, minimum=0)


def _pos_float(name, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a {'non-negative' if allow_zero else 'positive'} number, got {value}")
    return float(value)


@dataclass
class CompressionConfig:
    method: str = "lowrank"
    ratio: float = 0.5
    module_ratios: Dict[str, float] = field(default_factory=dict)
    targets: Optional[List[str]] = None
    exclude: List[str] = field(default_factory=list)
    init: str = "auto"
    nblocks: int = 4
    schedule: str = "staged"
    stage_unit: str = "block"
    stage_steps: int = 20
    final_steps: int = 50
    calib_batches: int = 4
    objective: str = "auto"
    distill_loss: str = "auto"
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    batch_size: int = 16
    train_embeddings: bool = False
    seed: int = 0

    def __post_init__(self):
        _choice("method", self.method, METHODS)
        self.ratio = V.check_ratio("ratio", self.ratio)
        if not isinstance(self.module_ratios, dict):
            raise TypeError(f"module_ratios: expected a dict {{pattern: ratio}}, got {type(self.module_ratios).__name__}")
        self.module_ratios = {
            str(k): V.check_ratio(f"module_ratios[{k!r}]", v) for k, v in self.module_ratios.items()
        }
        for fname in ("targets", "exclude"):
            val = getattr(self, fname)
            if val is None and fname == "targets":
                continue
            if isinstance(val, str):
                val = [val]
                setattr(self, fname, val)
            if not isinstance(val, (list, tuple)) or not all(isinstance(p, str) for p in val):
                raise TypeError(f"{fname}: expected a list of name patterns (str), got {val!r}")
            setattr(self, fname, list(val))
            check_patterns(fname, val)
        check_patterns("module_ratios", list(self.module_ratios))
        if self.targets is not None and not self.targets:
            raise ValueError("targets: expected at least one pattern (or None for the default), got []")
        if self.init != "auto":
            _choice("init", self.init, INITS[self.method])
        V.check_positive_int("nblocks", self.nblocks)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("stage_unit", self.stage_unit, STAGE_UNITS)
        _nonneg_int("stage_steps", self.stage_steps)
        _nonneg_int("final_steps", self.final_steps)
        _nonneg_int("calib_batches", self.calib_batches)
        if self.calib_batches == 0 and get_family(self.method).needs[self.resolved_init]:
            raise ValueError(
                f"calib_batches: expected >= 1 with init={self.resolved_init!r} (its statistics are "
                "gathered over calib_batches batches of the data), got 0"
            )
        _choice("objective", self.objective, OBJECTIVES)
        _choice("distill_loss", self.distill_loss, DISTILL_LOSSES)
        self.lr = _pos_float("lr", self.lr)
        self.weight_decay = _pos_float("weight_decay", self.weight_decay, allow_zero=True)
        self.warmup_ratio = _pos_float("warmup_ratio", self.warmup_ratio, allow_zero=True)
        if self.warmup_ratio >= 1:
            raise ValueError(f"warmup_ratio: expected a fraction in [0, 1), got {self.warmup_ratio}")
        self.max_grad_norm = _pos_float("max_grad_norm", self.max_grad_norm)
        V.check_positive_int("batch_size", self.batch_size)
        _nonneg_int("seed", self.seed)
        if not isinstance(self.train_embeddings, bool):
            raise TypeError(f"train_embeddings: expected a bool, got {self.train_embeddings!r}")

    @property
    def resolved_init(self) -> str:
        return INITS[self.method][0] if self.init == "auto" else self.init

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CompressionConfig":
        if not isinstance(d, dict):
            raise TypeError(f"config: expected a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**d)

    @classmethod
    def load(cls, path) -> "CompressionConfig":
        """Read a ``.json`` or ``.yaml``/``.yml`` file."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"path: expected an existing JSON/YAML config file, got {path!r}")
        if not path.endswith((".yaml", ".yml", ".json")):
            raise ValueError(f"path: expected a .json, .yaml or .yml file, got {path!r}")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError as e:  # pragma: no cover
                raise ImportError("reading a YAML config needs pyyaml (pip install pyyaml)") from e
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from None

    def save(self, path) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))
