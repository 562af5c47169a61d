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
objective     ``auto`` | ``task`` | ``distill`` | ``task+distill``: fine-tune on labels, distil the
              uncompressed model (frozen copy taken before anything is replaced), or both;
              ``auto``: ``fastfactor.train.loop.AUTO_LABELLED`` on labelled data, else ``distill``
distill_loss  ``auto`` | ``mse`` (hidden states) | ``kl`` (logits)
task_weight, distill_weight, hidden_weight, temperature
              ``loss = task_weight·CE(labels) + distill_weight·KL_T(teacher ‖ student)·T²
              + hidden_weight·MSE(last hidden states)``, each term where the objective uses it
              (finite, >= 0, not all zero; temperature > 0)
lr, weight_decay, warmup_ratio, max_grad_norm, batch_size, seed: fine-tuning settings
decay         after the warm-up: ``linear`` | ``cosine`` | ``constant``
stage_lr, stage_warmup_ratio, stage_decay, final_lr, final_warmup_ratio, final_decay
              the same three for the short per-stage fine-tunes and for the final fine-tune
              (``None``: ``lr`` / ``warmup_ratio`` / ``decay``); each fine-tune has its own
              warm-up and decay. ``stage_lr`` defaults to 5e-5, half the default ``lr``: the
              short stage fine-tunes of a staged run at the full rate damaged the model on the
              way (README, "Evidence: objective"); ``stage_lr=None`` gives them ``lr`` again
dense_reference  also fine-tune a copy of the uncompressed model with the same data order,
              steps and schedule (on the task loss), and report its metric beside the
              compressed one (:mod:`fastfactor.compress.reference`; labelled data only)
joint         modules compressed together (Banaei et al. 2023): group kinds whose members read the
              same input and then share one input basis ``V`` at the same total budget — ``qkv``
              (query/key/value), ``mlp`` (gate/up), or sibling names ``"a+b+c"``; ``[]`` (default):
              every module alone. Low-rank methods only (:mod:`fastfactor.compress.joint`)
train_embeddings  also fine-tune ``nn.Embedding`` tables (default: frozen; they are not
              compressed and their dense gradients dominate the step time of small models)
ae_form       method ``autoencoder`` (:mod:`fastfactor.factorize.autoencoder`): ``linear`` (a
              ``LowRankLinear``) or ``nonlinear`` (``BottleneckLinear``, ``σ`` on the rank-r
              intermediate, on chip)
scope         method ``autoencoder``: ``module`` (each bottleneck fitted to its own module's
              outputs) or ``block`` (then every factorized module of a transformer block trained
              together against the uncompressed block's output, so later modules compensate for
              earlier ones: :mod:`fastfactor.compress.autoencoder`; needs ``calib_batches >= 2``)
ae_activation ``σ`` of the nonlinear form: ``relu`` | ``gelu`` (tanh approximation) | ``silu`` |
              ``tanh`` | ``identity``
ae_steps, ae_lr, ae_tokens
              Adam steps (0: the closed-form start only) and *relative* learning rate (each
              tensor's step is ``ae_lr`` times its RMS) of the bottleneck fits (module and block),
              and the calibration rows (tokens) sampled per module
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
OBJECTIVES = ("auto", "task", "distill", "task+distill")
DECAYS = ("linear", "cosine", "constant")
DISTILL_LOSSES = ("auto", "mse", "kl")
AE_FORMS = ("linear", "nonlinear")
AE_SCOPES = ("module", "block")

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


#: fields added after checkpoints were first written, with the value runs before them used: a
#: checkpoint whose config lacks one is compared as if it held this value (resume)
LEGACY_DEFAULTS = {
    "task_weight": 1.0, "distill_weight": 1.0, "hidden_weight": 0.0, "temperature": 2.0, "decay": "linear",
    "stage_lr": None, "stage_warmup_ratio": None, "stage_decay": None, "final_lr": None,
    "final_warmup_ratio": None, "final_decay": None, "dense_reference": False, "joint": [],
    "ae_form": "linear", "scope": "module", "ae_activation": "relu", "ae_steps": 200, "ae_lr": 1e-2,
    "ae_tokens": 4096,
}


def _warmup(name, value):
    value = _pos_float(name, value, allow_zero=True)
    if value >= 1:
        raise ValueError(f"{name}: expected a fraction in [0, 1), got {value}")
    return value


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
    task_weight: float = 1.0
    distill_weight: float = 1.0
    hidden_weight: float = 0.0
    temperature: float = 2.0
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    decay: str = "linear"
    stage_lr: Optional[float] = 5e-5
    stage_warmup_ratio: Optional[float] = None
    stage_decay: Optional[str] = None
    final_lr: Optional[float] = None
    final_warmup_ratio: Optional[float] = None
    final_decay: Optional[str] = None
    max_grad_norm: float = 1.0
    batch_size: int = 16
    train_embeddings: bool = False
    seed: int = 0
    dense_reference: bool = False
    joint: List[str] = field(default_factory=list)
    ae_form: str = "linear"
    scope: str = "module"
    ae_activation: str = "relu"
    ae_steps: int = 200
    ae_lr: float = 1e-2
    ae_tokens: int = 4096

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
        from ..train.loop import check_weights

        check_weights(self.objective, self.task_weight, self.distill_weight, self.hidden_weight, self.temperature)
        for f in ("task_weight", "distill_weight", "hidden_weight", "temperature"):
            setattr(self, f, float(getattr(self, f)))
        self.lr = _pos_float("lr", self.lr)
        self.weight_decay = _pos_float("weight_decay", self.weight_decay, allow_zero=True)
        self.warmup_ratio = _warmup("warmup_ratio", self.warmup_ratio)
        _choice("decay", self.decay, DECAYS)
        for phase in ("stage", "final"):
            if getattr(self, f"{phase}_lr") is not None:
                setattr(self, f"{phase}_lr", _pos_float(f"{phase}_lr", getattr(self, f"{phase}_lr")))
            if getattr(self, f"{phase}_warmup_ratio") is not None:
                setattr(self, f"{phase}_warmup_ratio", _warmup(f"{phase}_warmup_ratio", getattr(self, f"{phase}_warmup_ratio")))
            if getattr(self, f"{phase}_decay") is not None:
                _choice(f"{phase}_decay", getattr(self, f"{phase}_decay"), DECAYS)
        self.max_grad_norm = _pos_float("max_grad_norm", self.max_grad_norm)
        V.check_positive_int("batch_size", self.batch_size)
        _nonneg_int("seed", self.seed)
        from .joint import JOINT_METHODS, parse_joint

        self.joint = parse_joint(self.joint)
        if self.joint and self.method not in JOINT_METHODS:
            raise ValueError(f"joint: needs a low-rank method {JOINT_METHODS} (the members share one V), "
                             f"got method={self.method!r}")
        for f in ("train_embeddings", "dense_reference"):
            if not isinstance(getattr(self, f), bool):
                raise TypeError(f"{f}: expected a bool, got {getattr(self, f)!r}")
        self._check_autoencoder()

    def _check_autoencoder(self) -> None:
        """The ``ae_*`` / ``scope`` fields: valid values, and non-default ones only with
        ``method="autoencoder"`` (elsewhere they would be silently ignored)."""
        from ..kernels.lowrank_act import ACTIVATIONS

        _choice("ae_form", self.ae_form, AE_FORMS)
        _choice("scope", self.scope, AE_SCOPES)
        _choice("ae_activation", self.ae_activation, ACTIVATIONS)
        _nonneg_int("ae_steps", self.ae_steps)
        self.ae_lr = _pos_float("ae_lr", self.ae_lr)
        V.check_positive_int("ae_tokens", self.ae_tokens, minimum=2)
        if self.method != "autoencoder":
            for f in ("ae_form", "scope"):
                if getattr(self, f) != LEGACY_DEFAULTS[f]:
                    raise ValueError(f"{f}: only method='autoencoder' has this option (expected "
                                     f"{LEGACY_DEFAULTS[f]!r} with method={self.method!r}), got {getattr(self, f)!r}")
        elif self.scope == "block" and self.calib_batches < 2:
            raise ValueError(f"calib_batches: expected >= 2 with scope='block' (one batch is held out to stop "
                             f"the block fit on), got {self.calib_batches}")

    def phase(self, kind: str, index: int = 0) -> dict:
        """The fine-tune of one phase, as keyword arguments of :func:`fastfactor.train.finetune`:
        ``steps``, ``seed``, ``lr``, ``warmup_ratio``, ``decay``. ``kind="stage"``: the fine-tune
        after stage ``index`` (seed ``seed + index``); ``"final"``: the last one (seed
        ``seed + 1000``). The driver and the dense reference both take their schedule from here,
        so they train on the same batches in the same order."""
        if kind not in ("stage", "final"):
            raise ValueError(f"kind: expected 'stage' or 'final', got {kind!r}")
        pick = lambda f: getattr(self, f) if getattr(self, f"{kind}_{f}") is None else getattr(self, f"{kind}_{f}")
        return {
            "steps": self.stage_steps if kind == "stage" else self.final_steps,
            "seed": self.seed + index if kind == "stage" else self.seed + 1000,
            "lr": pick("lr"), "warmup_ratio": pick("warmup_ratio"), "decay": pick("decay"),
        }

    def phases(self, num_stages: int) -> list:
        """Every fine-tune of a run with ``num_stages`` stages, in order: ``(name, kwargs)`` with
        the kwargs of :meth:`phase` (none for ``offline``; stage fine-tunes only when ``staged``
        and ``stage_steps > 0``; the final one when ``final_steps > 0``)."""
        out = []
        if self.schedule == "offline":
            return out
        if self.schedule == "staged" and self.stage_steps > 0:
            out += [(f"stage {i}", self.phase("stage", i)) for i in range(num_stages)]
        if self.final_steps > 0:
            out.append(("final", self.phase("final")))
        return out

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
        from .._io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))
