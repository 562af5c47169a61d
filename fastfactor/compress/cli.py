"""``fastfactor compress``: compress a Hugging Face model from the command line.

Loads the model (its class from ``config.json``'s ``architectures``) and tokenizer from
``--model``, the data from a GLUE task (``--task``) or local files (``--train-file`` /
``--eval-file``), runs :func:`fastfactor.compress.compress`, prints a table per stage and a
final report, and writes to ``--out``: the compressed model (``save_compressed``: safetensors,
manifest, config), the tokenizer, ``report.json`` and ``metric.png`` (the metric across stages).
"""

from __future__ import annotations

import argparse
import json
import os

from .config import INITS, METHODS, SCHEDULES, STAGE_UNITS


def add_subparser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compress", help="compress a Hugging Face model with factorized linear layers",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", required=True, help="local model directory (config.json, weights, tokenizer)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", default=None, help="CompressionConfig JSON/YAML; command-line options override it")
    p.add_argument("--method", choices=METHODS, default=None)
    p.add_argument("--ratio", type=float, default=None, help="fraction of each target's weights kept")
    p.add_argument("--init", default=None, help="; ".join(f"{m}: {'|'.join(v)}" for m, v in INITS.items()))
    p.add_argument("--schedule", choices=SCHEDULES, default=None)
    p.add_argument("--stage-unit", choices=STAGE_UNITS, default=None)
    p.add_argument("--targets", nargs="+", default=None, help="module name patterns (glob, or re:REGEX)")
    p.add_argument("--exclude", nargs="+", default=None)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default=None, help="GLUE task name (needs the hub or its cache)")
    src.add_argument("--train-file", default=None, help="local .csv/.tsv/.json/.jsonl/.parquet")
    p.add_argument("--eval-file", default=None)
    p.add_argument("--text-fields", nargs="+", default=None, help="text column(s) (one, or two for pairs)")
    p.add_argument("--label-field", default="label")
    p.add_argument("--distill", action="store_true", help="distil from the uncompressed model (ignore labels)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps after the last swap")
    p.add_argument("--stage-steps", type=int, default=None, help="fine-tuning steps after each stage (staged)")
    p.add_argument("--calib-batches", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue an interrupted run from its last checkpoint (DIR: its output directory, "
                        "default --out); give the same model, data and settings")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (default: refuse)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also checkpoint every N steps inside each fine-tune (optimizer, scheduler and data "
                        "position included), so --resume continues mid-fine-tune (default 0: stage ends only)")
    p.add_argument("--parallel", choices=("auto", "ddp", "fsdp"), default="auto",
                   help="fine-tuning engine under torchrun: ddp (auto) or fsdp (FSDP2 fully_shard; sharded "
                        "parameters, gradients and optimizer state)")
    p.set_defaults(func=run)
    return p


def load_hf_model(path: str):
    import transformers

    if not os.path.isdir(path):
        raise ValueError(f"--model: expected a local model directory, got {path!r}")
    config = transformers.AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), transformers.AutoModel)
    model = cls.from_pretrained(path)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--model: no tokenizer could be loaded from {path!r} ({type(e).__name__}: {e})") from e
    return model, tok


def build_config(args):
    from .config import CompressionConfig

    d = CompressionConfig.load(args.config).to_dict() if args.config else {}
    over = {
        "method": args.method, "ratio": args.ratio, "init": args.init, "schedule": args.schedule,
        "stage_unit": args.stage_unit, "targets": args.targets, "exclude": args.exclude,
        "final_steps": args.steps, "stage_steps": args.stage_steps, "calib_batches": args.calib_batches,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
    }
    d.update({k: v for k, v in over.items() if v is not None})
    if args.distill:
        d["objective"] = "distill"
    return CompressionConfig.from_dict(d)


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
    from .driver import compress
    from .io import atomic_write_text, save_compressed

    cfg = build_config(args)
    if args.task is None and args.train_file is None:
        if cfg.schedule != "offline" or cfg.resolved_init not in ("svd", "projection", "magnitude", "svd_als"):
            raise SystemExit("fastfactor compress: give --task or --train-file (data are needed to fine-tune/calibrate)")
    if args.eval_file and not args.train_file:
        raise SystemExit("fastfactor compress: --eval-file needs --train-file")
    from .. import distributed as D
    from .._io import save_pretrained_atomic
    from .checkpoint import prepare_output

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    owns_group = not D.is_distributed()
    info = D.init_from_env(device="cuda" if str(device).startswith("cuda") else "cpu")  # torchrun / accelerate
    if info.distributed:
        device = info.device
    print = D.print0  # noqa: A001 - only rank 0 prints
    try:
        checkpoint_dir, resume = prepare_output(args.out, args.resume, args.overwrite)
    except ValueError as e:
        raise SystemExit(f"fastfactor compress: {e}") from None
    print(f"loading {args.model}")
    model, tok = load_hf_model(args.model)
    data = None
    if args.task or args.train_file:
        data = load_task_data(
            tok, task=args.task, train_file=args.train_file, eval_file=args.eval_file,
            text_fields=args.text_fields, label_field=args.label_field, max_length=args.max_length,
            max_train=args.max_train, max_eval=args.max_eval, unlabelled=args.distill, seed=cfg.seed,
        )
        print(f"data: {data.name}, {len(data)} train / {int(data.eval['input_ids'].shape[0])} eval, {data.task_type}")
    model, report = compress(model, cfg, data, device=device, progress=not args.no_progress, log=print,
                             checkpoint_dir=checkpoint_dir, resume=resume,
                             checkpoint_every=args.checkpoint_every, parallel=args.parallel)
    print("\nper stage\n" + report.stage_table())
    print("\nfinal report\n" + report.summary_table())
    plotted = False
    if D.is_main_process():  # every file: a temporary name renamed into place
        os.makedirs(args.out, exist_ok=True)
        save_compressed(model.cpu(), args.out, compression=cfg.to_dict())
        save_pretrained_atomic(tok, args.out)
        atomic_write_text(os.path.join(args.out, "report.json"), json.dumps(report.to_dict(), indent=2, default=str))
        plotted = plot_stages(report, os.path.join(args.out, "metric.png"))
    D.barrier()
    if owns_group:
        D.cleanup()
    print(f"\nwrote {args.out}: compressed model, report.json" + (", metric.png" if plotted else ""))
    return 0
