"""``fastfactor compress``: compress a Hugging Face model from the command line.

Checks every option and the data files first (one-line errors naming the option or file, before
any model is loaded), reads the data from a GLUE task (``--task``) or local files
(``--train-file`` / ``--eval-file``) and checks their labels (missing values, type, range, named by
file, row and column), then loads the model and tokenizer from ``--model``, runs
:func:`fastfactor.compress.compress`, prints a table per stage and a final report, and writes to
``--out``: the compressed model (``save_compressed``: safetensors, manifest, config), the
tokenizer, ``report.json`` and ``metric.png`` (the metric across stages).

The model class (``--model-class``, default ``auto``): with labelled data a sequence-classification
head (the folder's own ``*ForSequenceClassification`` class, or
``AutoModelForSequenceClassification`` with a new head of ``--num-labels`` outputs, inferred from
the labels when not given, and reported); otherwise the class named by ``config.json``'s
``architectures``. Text labels are mapped to class ids (sorted, or the model's own ``label2id``
when it covers them); the map is saved in ``config.json`` (``id2label`` / ``label2id``) and
``report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

from .config import AE_FORMS, AE_SCOPES, INITS, METHODS, SCHEDULES, STAGE_UNITS

#: ``--model-class`` shortcuts → transformers auto class
MODEL_CLASSES = {
    "auto": None,
    "base": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
}

#: CompressionConfig field → the option that sets it (for error messages)
_OPTION_OF_FIELD = {"final_steps": "--steps", "module_ratios": "--module-ratio"}


def add_subparser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compress", help="compress a Hugging Face model with factorized linear layers",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", required=True, help="local model directory (config.json, weights, tokenizer)")
    p.add_argument("--out", default=None, help="output directory (required unless --dry-run)")
    p.add_argument("--config", default=None, help="CompressionConfig JSON/YAML; command-line options override it")
    p.add_argument("--method", choices=METHODS, default=None)
    p.add_argument("--ratio", type=float, default=None, help="fraction of each target's weights kept")
    p.add_argument("--init", default=None, help="; ".join(f"{m}: {'|'.join(v)}" for m, v in INITS.items()))
    p.add_argument("--ae-form", choices=AE_FORMS, default=None,
                   help="--method autoencoder: linear (LowRankLinear) or nonlinear (σ on the rank-r intermediate)")
    p.add_argument("--scope", choices=AE_SCOPES, default=None,
                   help="--method autoencoder: fit each bottleneck to its module's output (module) or every "
                        "bottleneck of a transformer block to the block's output (block)")
    p.add_argument("--ae-activation", default=None, help="σ of --ae-form nonlinear: relu|gelu|silu|tanh|identity")
    p.add_argument("--ae-steps", type=int, default=None, help="Adam steps of each bottleneck fit (0: closed form)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None)
    p.add_argument("--stage-unit", choices=STAGE_UNITS, default=None)
    p.add_argument("--targets", nargs="+", default=None, help="module name patterns (glob, or re:REGEX)")
    p.add_argument("--module-ratio", action="append", default=None, metavar="PATTERN=RATIO",
                   help="per-module ratio override (repeatable; the first matching pattern wins), "
                        "e.g. --module-ratio '*.attention.*=0.3'")
    p.add_argument("--joint", default=None, metavar="KINDS",
                   help="compress modules together: comma-separated group kinds whose members share one input "
                        "basis V at the same budget — qkv (query/key/value), mlp (gate/up), or sibling names "
                        "a+b+c (e.g. --joint qkv,mlp); '' for none")
    p.add_argument("--dry-run", "--show-plan", dest="dry_run", action="store_true",
                   help="print the targets, their factor shapes (rank, blocks) and parameter counts, then exit: "
                        "the model is built from config.json on the meta device (no weight is read) and "
                        "nothing is written")
    p.add_argument("--exclude", nargs="+", default=None)
    p.add_argument("--plan", default=None, metavar="PLAN.json",
                   help="execute a budget plan (fastfactor plan --out): its modules, methods and ranks replace "
                        "--method/--ratio/--targets; the schedule and training options still apply")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default=None, help="GLUE task name (needs the hub or its cache)")
    src.add_argument("--train-file", default=None, help="local .csv/.tsv/.json/.jsonl/.parquet")
    p.add_argument("--eval-file", default=None)
    p.add_argument("--text-fields", nargs="+", default=None, help="text column(s) (one, or two for pairs)")
    p.add_argument("--label-field", default=None,
                   help="label column (default 'label'; a column named here must exist, else it is an error)")
    p.add_argument("--num-labels", type=int, default=None,
                   help="classes of the classification head (1: regression); default: the model's head, "
                        "else inferred from the labels")
    p.add_argument("--task-type", choices=("auto", "classification", "regression"), default="auto",
                   help="what the labels are (auto: regression only for a regression head or --num-labels 1; "
                        "non-integer labels are otherwise an error)")
    p.add_argument("--model-class", default="auto",
                   help="auto | " + " | ".join(k for k in MODEL_CLASSES if k != "auto")
                        + " | a transformers class name (auto: a sequence-classification head for labelled data, "
                        "else config.json's architectures)")
    p.add_argument("--distill", action="store_true", help="distil from the uncompressed model (ignore labels)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps after the last swap")
    p.add_argument("--stage-steps", type=int, default=None, help="fine-tuning steps after each stage (staged)")
    p.add_argument("--calib-batches", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per example (default 128, or the model's position table if shorter)")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue an interrupted run from its last checkpoint (DIR: its output directory, "
                        "default --out); give the same model, data and settings")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (default: refuse)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep OUT/checkpoints after a successful run (default: deleted once the outputs are written)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also checkpoint every N steps inside each fine-tune (optimizer, scheduler and data "
                        "position included), so --resume continues mid-fine-tune (default 0: stage ends only)")
    p.add_argument("--parallel", choices=("auto", "ddp", "fsdp"), default="auto",
                   help="fine-tuning engine under torchrun: ddp (auto) or fsdp (FSDP2 fully_shard; sharded "
                        "parameters, gradients and optimizer state)")
    _add_objective_args(p)
    p.set_defaults(func=run, interrupt_hint=_interrupt_hint)
    return p


# --- objective, per-phase learning rates, dense reference (issue 18) -------------------------
_OBJECTIVE_FLAGS = {  # flag → config field
    "objective": "objective", "task_weight": "task_weight", "distill_weight": "distill_weight",
    "hidden_weight": "hidden_weight", "temperature": "temperature", "warmup_ratio": "warmup_ratio",
    "decay": "decay", "stage_lr": "stage_lr", "stage_warmup_ratio": "stage_warmup_ratio",
    "stage_decay": "stage_decay", "final_lr": "final_lr", "final_warmup_ratio": "final_warmup_ratio",
    "final_decay": "final_decay",
}


def _add_objective_args(p) -> None:
    from .config import DECAYS, OBJECTIVES

    g = p.add_argument_group("objective and learning-rate schedule")
    g.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="task (labels), distill (the uncompressed model), task+distill (both, weighted); "
                        "auto: the config default for labelled data, distill without labels")
    g.add_argument("--task-weight", type=float, default=None, help="weight of the label loss (default 1)")
    g.add_argument("--distill-weight", type=float, default=None, help="weight of the logit KL (default 1)")
    g.add_argument("--hidden-weight", type=float, default=None, help="weight of the last-hidden-state MSE (default 0)")
    g.add_argument("--temperature", type=float, default=None, help="KL temperature T (default 2)")
    g.add_argument("--warmup-ratio", type=float, default=None, help="warm-up fraction of each fine-tune")
    g.add_argument("--decay", choices=DECAYS, default=None, help="after the warm-up (default linear)")
    for phase, what in (("stage", "each stage's fine-tune"), ("final", "the final fine-tune")):
        g.add_argument(f"--{phase}-lr", type=float, default=None,
                       help=f"learning rate of {what} (default {'5e-5' if phase == 'stage' else '--lr'})")
        g.add_argument(f"--{phase}-warmup-ratio", type=float, default=None, help=f"warm-up fraction of {what}")
        g.add_argument(f"--{phase}-decay", choices=DECAYS, default=None, help=f"decay of {what}")
    g.add_argument("--dense-reference", action="store_true", default=None,
                   help="also fine-tune the uncompressed model with the same data order, steps and schedule "
                        "and report 'points lost to compression' (labelled data)")


def _objective_overrides(args) -> dict:
    if getattr(args, "distill", False) and getattr(args, "objective", None) not in (None, "distill"):
        raise ValueError(f"--objective: --distill drops the labels, so it cannot be combined with --objective "
                         f"{args.objective}; give one of them")
    out = {field: getattr(args, flag) for flag, field in _OBJECTIVE_FLAGS.items()
           if getattr(args, flag, None) is not None}
    if getattr(args, "dense_reference", None):
        out["dense_reference"] = True
    return out


def _interrupt_hint(args) -> str:
    out = getattr(args, "out", None) or "OUT"
    return (
        f"interrupted. The checkpoints written so far are in {os.path.join(out, 'checkpoints')}: rerun the same "
        "command with --resume to continue from the last one (the autoencoder's finished fits included; with no "
        "checkpoint yet, rerun it with --overwrite)"
    )


# --------------------------------------------------------------------------------------------
# checks before anything is loaded
# --------------------------------------------------------------------------------------------

def _int_option(name, value, minimum):
    if value is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def check_device(device) -> None:
    """``--device``: a device torch knows and this machine has."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {device!r} asked, but this machine (torch {torch.__version__}) has no CUDA GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {device!r} asked, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")


def check_args(args) -> None:
    """Every option and file, before any model or data is loaded: ``ValueError`` naming the option."""
    from ..train.data import check_data_file

    _int_option("--max-length", args.max_length, 1)
    _int_option("--max-train", args.max_train, 1)
    _int_option("--max-eval", args.max_eval, 1)
    _int_option("--steps", args.steps, 0)
    _int_option("--stage-steps", args.stage_steps, 0)
    _int_option("--calib-batches", args.calib_batches, 0)
    _int_option("--batch-size", args.batch_size, 1)
    _int_option("--seed", args.seed, 0)
    _int_option("--checkpoint-every", args.checkpoint_every, 0)
    _int_option("--num-labels", args.num_labels, 1)
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr: expected a finite positive learning rate, got {args.lr}")
    if args.ratio is not None and not (math.isfinite(args.ratio) and 0 < args.ratio <= 1):
        raise ValueError(f"--ratio: expected a fraction in (0, 1] (of each target's weights kept), got {args.ratio}")
    if args.num_labels == 1 and args.task_type == "classification":
        raise ValueError("--num-labels: 1 means a regression head, but --task-type classification was given")
    if args.model_class not in MODEL_CLASSES:
        import transformers

        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", args.model_class) or not hasattr(transformers, args.model_class):
            raise ValueError(
                f"--model-class: expected one of {list(MODEL_CLASSES)} or a transformers class name, "
                f"got {args.model_class!r}"
            )
    check_device(args.device)
    if not os.path.isdir(args.model):
        raise ValueError(f"--model: expected a local model directory, got {args.model!r}")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise ValueError(f"--model: {args.model} has no config.json (expected a Hugging Face model folder)")
    if args.train_file is not None:
        check_data_file(args.train_file, "--train-file")
    if args.eval_file is not None:
        check_data_file(args.eval_file, "--eval-file")
    if args.config is not None and not os.path.isfile(args.config):
        raise ValueError(f"--config: expected an existing .json/.yaml file, got {args.config!r}")
    if getattr(args, "plan", None) is not None:
        clash = [o for o, v in (("--method", args.method), ("--ratio", args.ratio), ("--targets", args.targets),
                                ("--exclude", args.exclude), ("--module-ratio", args.module_ratio)) if v]
        if clash:
            raise ValueError(f"--plan: the plan fixes every module's method and rank; drop {', '.join(clash)}")
        from ..plan_data import as_plan

        try:
            args.plan_obj = as_plan(args.plan)
        except (FileNotFoundError, TypeError, ValueError) as e:
            raise ValueError(f"--plan: {e}") from None


def parse_module_ratios(items) -> dict:
    """``["PATTERN=RATIO", ...]`` → ``{pattern: ratio}`` (order kept); ``ValueError`` naming the option."""
    out = {}
    for item in items:
        pat, sep, val = str(item).rpartition("=")
        try:
            ratio = float(val)
        except ValueError:
            ratio = None
        if not sep or not pat or ratio is None:
            raise ValueError(f"--module-ratio: expected PATTERN=RATIO (e.g. '*.query=0.3'), got {item!r}")
        out[pat] = ratio
    return out


def refuse_compressed(path: str) -> None:
    """``ValueError`` when ``--model`` is a folder fastfactor already compressed."""
    from ..hf import is_compressed_dir

    why = is_compressed_dir(path) if os.path.isdir(path) else None
    if why:
        raise ValueError(
            f"--model: {path!r} is already compressed ({why}); give the original (uncompressed) model. "
            "To use this one: import fastfactor, then AutoModel.from_pretrained or fastfactor.load_compressed; "
            "fastfactor.merge_and_unload turns it back into dense layers"
        )


def meta_model(path: str):
    """The model of ``path``'s ``config.json`` on the meta device: shapes only, no weight read."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), transformers.AutoModel)
    with torch.device("meta"):
        return cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)


def dry_run(args, cfg) -> int:
    """Print the plan of ``cfg`` on the model of ``--model`` built on the meta device (no weight read)."""
    from ..api import factorize_plan

    model = meta_model(args.model)
    if getattr(args, "plan_obj", None) is not None:
        print(f"budget plan {args.plan}:\n{args.plan_obj.table()}\n")
    budget = getattr(args, "plan_obj", None)
    groups = budget.to_configs(cfg) if budget is not None else []
    if len(groups) > 1:  # a plan mixing methods: one table per method, all run in one compress
        for g in groups:
            plan = factorize_plan(model, g)
            print(f"plan for {args.model} ({type(model).__name__}): method {g['method']} ({len(plan.rows)} module(s))")
            print(plan.table())
    else:
        plan = factorize_plan(model, cfg)
        print(f"plan for {args.model} ({type(model).__name__}): method {cfg.method}, ratio {cfg.ratio}"
              + (f", module ratios {cfg.module_ratios}" if cfg.module_ratios else ""))
        print(plan.table())
    print("dry run: no weight was read and nothing was written")
    return 0


def build_config(args):
    """The run's :class:`CompressionConfig`: ``--config`` (if any), then the options given; an
    invalid field is named by its option (or by the config file when it came from there)."""
    from .config import CompressionConfig

    if args.config:
        try:
            d = CompressionConfig.load(args.config).to_dict()
        except (TypeError, ValueError) as e:
            raise ValueError(f"--config: {e}") from None
    else:
        d = {}
    over = {
        "method": args.method, "ratio": args.ratio, "init": args.init, "schedule": args.schedule,
        "stage_unit": args.stage_unit, "targets": args.targets, "exclude": args.exclude,
        "final_steps": args.steps, "stage_steps": args.stage_steps, "calib_batches": args.calib_batches,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "ae_form": getattr(args, "ae_form", None), "scope": getattr(args, "scope", None),
        "ae_activation": getattr(args, "ae_activation", None), "ae_steps": getattr(args, "ae_steps", None),
        "joint": getattr(args, "joint", None),
    }
    given = {k: v for k, v in over.items() if v is not None}
    given.update(_objective_overrides(args))
    if getattr(args, "module_ratio", None):
        given["module_ratios"] = {**d.get("module_ratios", {}), **parse_module_ratios(args.module_ratio)}
    d.update(given)
    if args.distill:
        d["objective"] = "distill"
    try:
        if getattr(args, "plan_obj", None) is not None:
            d = args.plan_obj.run_config(CompressionConfig.from_dict(d))[0]
        return CompressionConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        msg = str(e)
        m = re.match(r"(\w+)(\[[^\]]*\])?: ", msg)
        if m and m.group(1) in given:
            opt = _OPTION_OF_FIELD.get(m.group(1), "--" + m.group(1).replace("_", "-"))
            msg = opt + msg[len(m.group(1)):]
        elif m and args.config:
            msg = f"--config {args.config}: {msg}"
        raise type(e)(msg) from None


def max_positions(config) -> int | None:
    """The longest input the model's position table holds (None when it has no fixed one)."""
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------

def _default_label_map(config) -> bool:
    l2i = getattr(config, "label2id", None) or {}
    return all(re.fullmatch(r"LABEL_\d+", str(k)) for k in l2i)


def head_of(config):
    """``(class name, num_labels)`` of the folder's sequence-classification head, or None."""
    archs = getattr(config, "architectures", None) or []
    cls = next((a for a in archs if a.endswith("ForSequenceClassification")), None)
    return (cls, int(getattr(config, "num_labels", 2))) if cls else None


def load_hf_model(path: str, model_class: str = "auto", labels=None, config=None, log=print, tokenizer: bool = True):
    """The model (and tokenizer) of a local folder.

    ``labels`` (a :class:`fastfactor.train.data.LabelSpec`): labelled data, so a
    sequence-classification head with ``labels.num_labels`` outputs is loaded or created (and the
    newly initialised weights reported); its ``id2label`` / ``label2id`` and ``problem_type`` are
    set on the config. Without labels, ``model_class`` or ``config.json``'s ``architectures``.
    Returns ``(model, tokenizer)`` (tokenizer None when ``tokenizer=False``).
    """
    import transformers

    if not os.path.isdir(path):
        raise ValueError(f"--model: expected a local model directory, got {path!r}")
    config = config or transformers.AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    name = MODEL_CLASSES.get(model_class, model_class)
    kwargs = {}
    if labels is not None:
        head = head_of(config)
        if name is None:
            name = head[0] if head and hasattr(transformers, head[0]) else "AutoModelForSequenceClassification"
        if not (name.endswith("ForSequenceClassification")):
            raise ValueError(
                f"--model-class: labelled data need a sequence-classification head, got {model_class!r}; use "
                "--model-class auto (or sequence-classification), or --distill to ignore the labels"
            )
        kwargs = dict(num_labels=labels.num_labels,
                      problem_type="regression" if labels.task_type == "regression" else "single_label_classification")
        if labels.label2id is not None:
            kwargs.update(label2id=dict(labels.label2id), id2label=labels.id2label)
        if head is not None and head[1] != labels.num_labels:
            kwargs["ignore_mismatched_sizes"] = True  # --num-labels replaces the folder's head
    cls = getattr(transformers, name) if name else next(
        (getattr(transformers, a) for a in archs if hasattr(transformers, a)), transformers.AutoModel)
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    new = sorted(set(info.get("missing_keys", [])) | {k for k, *_ in info.get("mismatched_keys", [])})
    model.config.architectures = [type(model).__name__]  # what config.json will name (a created head)
    if labels is not None:
        what = "regression (1 output)" if labels.task_type == "regression" else f"{labels.num_labels} classes"
        if labels.label2id is not None:
            what += " (" + ", ".join(f"{i}={k}" for k, i in sorted(labels.label2id.items(), key=lambda kv: kv[1])) + ")"
        if new:
            log(f"model: {type(model).__name__}, a new classification head for {what}; newly initialised: "
                + ", ".join(new[:6]) + (", ..." if len(new) > 6 else ""))
        else:
            log(f"model: {type(model).__name__}, its own classification head for {what}")
    elif new:
        log(f"model: {type(model).__name__}; newly initialised: " + ", ".join(new[:6]) + (", ..." if len(new) > 6 else ""))
    if not tokenizer:
        return model, None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--model: no tokenizer could be loaded from {path!r} ({type(e).__name__}: {e})") from e
    return model, tok


def label_settings(args, config):
    """``(task_type, num_labels, num_labels_source, label2id)`` for :func:`load_task_data` from the
    options and the folder's head (if it has one)."""
    head = head_of(config) if args.model_class in ("auto", "sequence-classification") or str(
        args.model_class).endswith("ForSequenceClassification") else None
    task_type, num_labels, source = args.task_type, args.num_labels, "--num-labels"
    if num_labels is None and head is not None:
        num_labels, source = head[1], f"the model's head ({head[0]}, num_labels in config.json)"
    if task_type == "auto":
        if args.task:
            task_type = "auto"  # the GLUE task decides
        elif num_labels == 1 or (head is not None and getattr(config, "problem_type", None) == "regression"):
            task_type = "regression"
        else:
            task_type = "classification"
    if task_type == "regression" and num_labels not in (None, 1):
        if source == "--num-labels":
            raise ValueError(f"--num-labels: regression has one output, got --num-labels {num_labels}")
        num_labels = 1  # a regression head replaces the classification head
    label2id = None if _default_label_map(config) else dict(config.label2id)
    return task_type, num_labels, source, label2id


def plot_stages(report, path: str) -> bool:
    pm = report.primary_metric
    if not pm or not report.stages:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = list(range(-1, len(report.stages)))
    ys = [report.metrics_before.get(pm)] + [s.metrics.get(pm, s.metrics_offline.get(pm)) for s in report.stages]
    labels = ["before"] + [s.name for s in report.stages]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(xs)), 3.5))
    ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label="after fine-tuning")
    sw = [None] + [s.metrics_offline.get(pm) for s in report.stages]
    ax.plot(xs, [float("nan") if y is None else y for y in sw], marker="x", linestyle="--", label="right after the swap")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(pm)
    cfg = report.config
    ax.set_title(f"{cfg['method']} ratio {cfg['ratio']} ({cfg['schedule']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    from .._io import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return True


def run(args) -> int:
    import torch

    from ..train.data import load_task_data
    from .driver import compress, compression_record
    from .io import atomic_write_text, save_compressed
    from .storage import check_output, remove_checkpoints

    try:  # --out before anything else is read: never inside --model, never another run's folder by accident
        if args.out:  # (a --dry-run writes nothing and needs no --out; without it the check below says so)
            check_output(args.out, args.model, args.resume, args.overwrite)
    except ValueError as e:
        raise SystemExit(f"fastfactor compress: {e}") from None
    check_args(args)
    refuse_compressed(args.model)
    cfg = build_config(args)
    plan = getattr(args, "plan_obj", None)
    if plan is not None:
        from ..plan_data import check_plan, fit_names

        try:
            meta = meta_model(args.model)
            check_plan(meta, fit_names(meta, plan))  # names and shapes, before any weight is read
        except ValueError as e:
            raise ValueError(f"--plan: {e}") from None
    if args.dry_run:
        return dry_run(args, cfg)
    if not args.out:
        raise ValueError("--out: expected an output directory (required unless --dry-run)")
    if args.task is None and args.train_file is None:
        from .config import CompressionConfig

        inits = {cfg.resolved_init} | {CompressionConfig.from_dict(g).resolved_init
                                       for g in (plan.to_configs(cfg) if plan is not None else [])}
        if cfg.schedule != "offline" or not inits <= {"svd", "projection", "magnitude", "svd_als"}:
            raise SystemExit("fastfactor compress: give --task or --train-file (data are needed to fine-tune/calibrate)")
    if args.eval_file and not args.train_file:
        raise SystemExit("fastfactor compress: --eval-file needs --train-file")
    import transformers

    from .. import distributed as D
    from .checkpoint import prepare_output

    try:
        hf_config = transformers.AutoConfig.from_pretrained(args.model)
    except Exception as e:  # noqa: BLE001 - a garbled config.json
        raise ValueError(f"--model: could not read {os.path.join(args.model, 'config.json')} ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]})") from None
    limit = max_positions(hf_config)
    if args.max_length is None:
        args.max_length = min(128, limit) if limit is not None else 128
    elif limit is not None and args.max_length > limit:
        raise ValueError(f"--max-length: expected at most {limit} (the model's position table), got {args.max_length}")
    task_type, num_labels, nl_source, label2id = label_settings(args, hf_config)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    owns_group = not D.is_distributed()
    info = D.init_from_env(device="cuda" if str(device).startswith("cuda") else "cpu")  # torchrun / accelerate
    if info.distributed:
        device = info.device
    print = D.print0  # noqa: A001 - only rank 0 prints
    try:
        checkpoint_dir, resume = prepare_output(args.out, args.resume, args.overwrite, model=args.model)
    except ValueError as e:
        raise SystemExit(f"fastfactor compress: {e}") from None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--model: no tokenizer could be loaded from {args.model!r} ({type(e).__name__}: {e})") from None
    data = None
    if args.task or args.train_file:
        try:
            data = load_task_data(
                tok, task=args.task, train_file=args.train_file, eval_file=args.eval_file,
                text_fields=args.text_fields, label_field=args.label_field or "label", max_length=args.max_length,
                max_train=args.max_train, max_eval=args.max_eval, unlabelled=args.distill, seed=cfg.seed,
                task_type=task_type, num_labels=num_labels, label2id=label2id,
                require_labels=args.label_field is not None, num_labels_source=nl_source,
            )
        except ValueError as e:
            msg = str(e)
            for field, opt in (("label_field:", "--label-field:"), ("text_fields:", "--text-fields:"),
                               ("train_file:", "--train-file:"), ("eval_file:", "--eval-file:")):
                if msg.startswith(field):
                    msg = opt + msg[len(field):]
            raise ValueError(msg) from None
        print(f"data: {data.name}, {len(data)} train / {int(data.eval['input_ids'].shape[0])} eval, {data.task_type}")
        if not data.labelled and not args.distill:
            print(f"data: no {args.label_field or 'label'!r} column: distilling from the uncompressed model "
                  "(name the label column with --label-field)")
    spec = data.extra.get("label_spec") if data is not None else None
    print(f"loading {args.model}")
    model, _ = load_hf_model(args.model, args.model_class, labels=spec, config=hf_config, log=print, tokenizer=False)
    model, report = compress(model, cfg, data, device=device, progress=not args.no_progress, log=print,
                             checkpoint_dir=checkpoint_dir, resume=resume,
                             checkpoint_every=args.checkpoint_every, parallel=args.parallel, plan=plan)
    print("\nper stage\n" + report.stage_table())
    print("\nfinal report\n" + report.summary_table())
    plotted = False
    if D.is_main_process():  # every file: a temporary name renamed into place
        os.makedirs(args.out, exist_ok=True)
        save_compressed(model.cpu(), args.out, compression=compression_record(cfg, report), tokenizer=tok)
        rep_d = report.to_dict()
        if spec is not None:
            rep_d["labels"] = {"task_type": spec.task_type, "num_labels": spec.num_labels,
                               "label_field": args.label_field or "label",
                               "id2label": {str(i): k for i, k in spec.id2label.items()} if spec.label2id else None}
        atomic_write_text(os.path.join(args.out, "report.json"), json.dumps(rep_d, indent=2, default=str))
        plotted = plot_stages(report, os.path.join(args.out, "metric.png"))
        if not getattr(args, "keep_checkpoints", False):
            remove_checkpoints(checkpoint_dir)  # the run's own (OUT/checkpoints), now that it succeeded
    D.barrier()
    if owns_group:
        D.cleanup()
    print(f"\nwrote {args.out}: compressed model, report.json" + (", metric.png" if plotted else ""))
    return 0
