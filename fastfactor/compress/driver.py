"""``compress(model, config, data)``: plan → (calibrate → swap → fine-tune) per stage → report.

Schedules
---------
* ``offline``: replace every target with its initialization and stop (no fine-tuning): how
  Banaei et al. (2023) judge a compression method.
* ``all_at_once``: replace every target, then fine-tune ``final_steps`` steps.
* ``staged`` (Gupta et al., 2024): one stage per target layer (``stage_unit='layer'``) or per
  transformer block (``'block'``): compute that stage's calibration statistics on the current
  (partly compressed, already fine-tuned) model, replace its modules, fine-tune
  ``stage_steps`` steps; after the last stage fine-tune ``final_steps`` more.

Data-aware initializations (Fisher-weighted SVD, activation-aware SVD, weighted 2:4 scores)
collect their statistics on ``calib_batches`` training batches just before the swap.

The model is changed in place and returned with a :class:`CompressionReport`. The uncompressed
model's outputs are the reference for distillation and for fidelity metrics (a frozen copy is
taken before anything is replaced, only when data are given).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn

from .. import profiling
from .calibration import collect_activation_stats, collect_fisher
from .config import CompressionConfig
from .methods import build_layer, get_method
from .targets import Target, dense_view, get_module, select_targets, set_module
from . import checkpoint as _ckpt
from .. import _validate, distributed as _dist


@dataclass
class StageRecord:
    stage: int
    name: str
    modules: List[str]
    params: int  #: model parameters after this stage
    target_ratio: float  #: weight parameters kept so far over all targets (uncompressed counted as 1)
    metrics_offline: Dict[str, float] = field(default_factory=dict)  #: right after the swap
    metrics: Dict[str, float] = field(default_factory=dict)  #: after this stage's fine-tuning
    train: Dict[str, float] = field(default_factory=dict)
    init_info: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class CompressionReport:
    config: dict
    targets: List[dict]
    params_before: int
    params_after: int = 0
    target_weight_params_before: int = 0
    target_weight_params_after: int = 0
    primary_metric: Optional[str] = None
    metrics_before: Dict[str, float] = field(default_factory=dict)
    metrics_offline: Dict[str, float] = field(default_factory=dict)  #: every target swapped, before any fine-tuning
    metrics_after: Dict[str, float] = field(default_factory=dict)
    stages: List[StageRecord] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    #: ``dense_reference=True``: the uncompressed model fine-tuned the same way (:mod:`.reference`)
    dense_reference: Dict = field(default_factory=dict)

    @property
    def compression(self) -> float:
        """Parameters after over before (whole model, embeddings included)."""
        return self.params_after / max(1, self.params_before)

    @property
    def target_ratio(self) -> float:
        """Weight parameters kept over the replaced layers (what ``ratio`` asks for)."""
        return self.target_weight_params_after / max(1, self.target_weight_params_before)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compression"] = self.compression
        d["target_ratio"] = self.target_ratio
        if self.dense_reference:
            from .reference import points_lost

            d["points_lost"] = points_lost(self)
        return d

    def stage_table(self) -> str:
        rows = []
        pm = self.primary_metric
        for s in self.stages:
            rows.append([
                s.stage, s.name, len(s.modules), f"{s.params:,}", f"{s.target_ratio:.3f}",
                _fmt(s.metrics_offline.get(pm)) if pm else "-", _fmt(s.metrics.get(pm)) if pm else "-",
                _fmt(s.train.get("loss_last")), f"{s.seconds:.1f}",
            ])
        head = ["stage", "name", "modules", "params", "kept", f"{pm} swapped", f"{pm} tuned", "loss", "s"]
        return format_table(head, rows)

    def summary_table(self) -> str:
        pm = self.primary_metric
        rows = [
            ["parameters", f"{self.params_before:,}", f"{self.params_after:,}"],
            ["target weight parameters", f"{self.target_weight_params_before:,}", f"{self.target_weight_params_after:,}"],
            ["compression (whole model)", "1.000", f"{self.compression:.3f}"],
            ["kept (replaced layers)", "1.000", f"{self.target_ratio:.3f}"],
        ]
        if pm:
            rows.append([f"{pm} (offline)", _fmt(self.metrics_before.get(pm)), _fmt(self.metrics_offline.get(pm))])
            rows.append([f"{pm} (final)", _fmt(self.metrics_before.get(pm)), _fmt(self.metrics_after.get(pm))])
            if self.dense_reference:
                from .reference import summary_rows

                rows += summary_rows(self, _fmt)
        rows.append(["time (s)", "", f"{self.seconds:.1f}"])
        return format_table(["", "before", "after"], rows)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_table(headers, rows) -> str:
    try:
        from tabulate import tabulate

        return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    except ImportError:  # pragma: no cover
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
        line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"
        return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _as_config(config) -> CompressionConfig:
    if isinstance(config, CompressionConfig):
        return config
    if isinstance(config, dict):
        return CompressionConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return CompressionConfig.load(config)
    raise TypeError(
        f"config: expected a CompressionConfig, a dict or a path to a JSON/YAML file, got {type(config).__name__}"
    )


def plan_stages(targets: List[Target], config: CompressionConfig) -> List[List[Target]]:
    """The groups of targets replaced together, in model order."""
    if config.schedule != "staged":
        return [list(targets)]
    if config.stage_unit == "layer":
        return [[t] for t in targets]
    groups: List[List[Target]] = []
    for t in targets:
        key = t.block if t.block is not None else t.name
        if groups and (groups[-1][0].block if groups[-1][0].block is not None else groups[-1][0].name) == key:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def compress(
    model: nn.Module,
    config: Union[CompressionConfig, dict, str] = None,
    data=None,
    *,
    device=None,
    progress: bool = False,
    log: Optional[Callable[[str], None]] = None,
    evaluate_stages: bool = True,
    teacher: Optional[nn.Module] = None,
    checkpoint_dir=None,
    resume=None,
    checkpoint_every: int = 0,
    parallel: str = "auto",
):
    """Compress ``model`` in place; returns ``(model, CompressionReport)``.

    Args:
        model: a Hugging Face (or any) ``nn.Module`` with ``nn.Linear`` / ``Conv1D`` layers.
        config: a :class:`CompressionConfig`, a dict of its fields, or a JSON/YAML path
            (default: ``CompressionConfig()``).
        data: a :class:`fastfactor.train.TaskData` (train split for calibration and
            fine-tuning, eval split for metrics). Needed by every schedule but ``offline`` and by
            the data-aware inits; without it an ``offline`` run reports parameter counts only.
        device: where to run (default: the model's device).
        progress: tqdm bars; log: a callable receiving one line per stage (e.g. ``print``).
        teacher: the reference model for distillation/fidelity (default: a frozen deep copy of
            ``model`` taken before compression).
        checkpoint_dir: write a checkpoint there after every finished stage (and after the final
            fine-tune); see :mod:`fastfactor.compress.checkpoint`. Refuses a directory that already
            holds checkpoints unless ``resume`` is given.
        resume: continue an interrupted run from its last checkpoint: a run's output directory,
            its ``checkpoints/`` directory or one checkpoint directory. Give the uncompressed model
            and the same config and data; the result is bitwise that of an uninterrupted run.
        checkpoint_every: also checkpoint every this many steps *inside* each fine-tune (the
            optimizer and scheduler state, the step and the data position included), so a run
            killed there resumes at that step instead of the stage's start (0: stage ends only).
            Needs ``checkpoint_dir``.
        parallel: the engine of the fine-tunes under ``torchrun``: ``"ddp"`` (``"auto"``,
            PyTorch ``DistributedDataParallel``) or ``"fsdp"`` (FSDP2 ``fully_shard`` over the
            model's transformer blocks: parameters, gradients and AdamW moments sharded; for models
            whose training state does not fit one device). See :func:`fastfactor.train.finetune`.

    Under ``torchrun`` (a default process group is initialized) every rank factorizes identically
    and then takes rank 0's factors (``broadcast_module``), fine-tuning runs under DDP or FSDP2
    with each rank reading its share of the global batch (``batch_size``), and only rank 0 logs,
    shows progress and writes checkpoints.
    """
    from ..train.loop import Evaluator, Objective, finetune

    t_start = time.perf_counter()
    cfg = _as_config(config if config is not None else CompressionConfig())
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if data is not None:
        from ..train.data import TaskData

        if not isinstance(data, TaskData):
            raise TypeError(f"data: expected a fastfactor.train.TaskData or None, got {type(data).__name__}")
    spec = get_method(cfg.method)
    spec.layer_class()  # clear NotImplementedError now if the layer family is absent
    init = cfg.resolved_init
    needs = spec.needs.get(init, ())
    if data is None and (needs or cfg.schedule != "offline"):
        why = f"init {init!r} needs calibration data" if needs else f"schedule {cfg.schedule!r} fine-tunes"
        raise ValueError(f"data: expected a TaskData ({why}), got None")
    from ..train.loop import PARALLEL

    if parallel not in PARALLEL:
        raise ValueError(f"parallel: expected one of {PARALLEL}, got {parallel!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every: expected an int >= 0 (fine-tuning steps), got {checkpoint_every!r}")
    if checkpoint_every and checkpoint_dir is None:
        raise ValueError("checkpoint_every: needs checkpoint_dir (where the checkpoints go), got checkpoint_dir=None")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    model.to(device)
    torch.manual_seed(cfg.seed)
    say = (log or (lambda s: None)) if _dist.is_main_process() else (lambda s: None)
    progress = progress and _dist.is_main_process()

    targets = select_targets(model, cfg.targets, cfg.exclude, cfg.ratio, cfg.module_ratios)
    report = CompressionReport(
        config=cfg.to_dict(), targets=[asdict(t) for t in targets], params_before=count_params(model),
        target_weight_params_before=sum(t.in_features * t.out_features for t in targets), device=str(device),
    )

    objective = evaluator = None
    if data is not None:
        objective = Objective.build(model, data, cfg.objective, cfg.distill_loss, device, teacher=teacher,
                                    task_weight=cfg.task_weight, distill_weight=cfg.distill_weight,
                                    hidden_weight=cfg.hidden_weight, temperature=cfg.temperature)
        reference = objective.teacher if objective.teacher is not None else teacher
        if reference is None and not data.labelled:
            import copy

            reference = copy.deepcopy(model).eval()
        evaluator = Evaluator(data, device, reference=reference, use_task=data.labelled)
        report.primary_metric = evaluator.primary
        report.metrics_before = evaluator(model)
        say(f"before: {report.metrics_before}")

    gen = torch.Generator().manual_seed(cfg.seed)
    kept = {t.name: t.in_features * t.out_features for t in targets}
    dense_total = report.target_weight_params_before
    stages = plan_stages(targets, cfg)
    fine_tune = cfg.schedule != "offline"
    train_kw = dict(
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, batch_size=cfg.batch_size,
        train_embeddings=cfg.train_embeddings, parallel=parallel,
    )
    if cfg.dense_reference:  # the uncompressed model fine-tuned like the compressed one will be
        from .reference import dense_reference

        report.dense_reference = dense_reference(model, cfg, data, evaluator, len(stages), device=device,
                                                 progress=progress, log=say, **train_kw)

    def calib_batches():
        from ..train.data import iterate

        it = iterate(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed + 7)
        return [b for _, b in zip(range(cfg.calib_batches), it)]

    session = _ckpt.begin(model, cfg.to_dict(), data, report, kept, stages, gen, checkpoint_dir=checkpoint_dir,
                          resume=resume, device=device, report_cls=CompressionReport, stage_cls=StageRecord)
    if session.resumed_from is not None:
        where = f", at step {session.partial['step']} of stage {session.start}'s fine-tune" if session.partial else ""
        say(f"resumed from {session.resumed_from}: {session.start} of {len(stages)} stage(s) done{where}")

    def resumed_at(si):
        """The unfinished-stage state to continue stage ``si`` from, if the run resumes inside it."""
        return session.partial if session.partial is not None and si == session.start else None

    def stepper(si, rec, t0, total):
        """The fine-tune's per-step callback: a mid-fine-tune checkpoint every ``checkpoint_every``
        steps (collective), then the test-only fault hook."""
        def on_step(done, snapshot):
            if checkpoint_every and done % checkpoint_every == 0 and done < total:
                with profiling.range("checkpoint"):
                    session.save_step(si, done, model, report, kept, asdict(rec), time.perf_counter() - t0, snapshot())
            _ckpt.test_fault_hook(si, done)
        return on_step

    for si, group in enumerate(stages):
        if si < session.start:
            continue
        t0 = time.perf_counter()
        name = (group[0].block or group[0].name) if cfg.schedule == "staged" else "all"
        rec = StageRecord(stage=si, name=name, modules=[t.name for t in group], params=0, target_ratio=0.0)
        resumed = resumed_at(si)
        if resumed is not None:  # its modules are swapped and partly fine-tuned already
            rec = StageRecord(**resumed["record"])
            t0 -= resumed["seconds"]
        with profiling.range(f"stage {si}"):
            stats: Dict[str, dict] = {t.name: {} for t in group}
            if needs and resumed is None:
                mods = {t.name: get_module(model, t.name) for t in group}
                with profiling.range("calibrate"):
                    batches = calib_batches()
                    if "gram" in needs:
                        fwd = lambda m, b: m(**_inputs(m, b, device))
                        for n, (g, _) in collect_activation_stats(model, mods, batches, fwd).items():
                            stats[n]["gram"] = g
                    if "fisher" in needs:
                        loss_fn = lambda m, b: objective.calibration_loss(m, b, gen)
                        for n, f in collect_fisher(model, mods, batches, loss_fn).items():
                            stats[n]["fisher"] = f
            it = group if resumed is None else []
            if progress and len(group) > 1 and resumed is None:
                from tqdm.auto import tqdm

                it = tqdm(group, desc=f"stage {si}: factorize", leave=False)
            for t in it:
                with profiling.range(f"factorize {t.name}"):
                    old = get_module(model, t.name)
                    view = dense_view(old, t.name)
                    _validate.check_finite(f"{t.name}.weight", view.weight)
                    try:
                        new = build_layer(cfg.method, view, t.ratio, init, cfg, stats.get(t.name))
                    except (ValueError, TypeError) as e:
                        raise type(e)(f"module {t.name!r}: {e}") from e
                    new.train(old.training)
                    _dist.broadcast_module(new)  # rank 0's factors everywhere (a no-op single-process)
                    set_module(model, t.name, new)
                    kept[t.name] = new.num_weight_params
                    rec.init_info[t.name] = init
                    del old, view
            stats.clear()
            if resumed is None:
                _ckpt.test_fault_hook(si)  # test-only; does nothing unless its env variable is set
                rec.params = count_params(model)
                rec.target_ratio = sum(kept.values()) / max(1, dense_total)
                if evaluator is not None and (evaluate_stages or si == len(stages) - 1):
                    rec.metrics_offline = evaluator(model)
            if fine_tune and cfg.schedule == "staged" and cfg.stage_steps > 0:
                with profiling.range(f"fine-tune stage {si}"):
                    rec.train = finetune(model, objective, data, **cfg.phase("stage", si),
                                         progress=progress, desc=f"stage {si} fine-tune",
                                         resume=resumed and resumed["train_state"],
                                         on_step=stepper(si, rec, t0, cfg.stage_steps), **train_kw)
                if evaluator is not None and evaluate_stages:
                    rec.metrics = evaluator(model)
            else:
                rec.metrics = dict(rec.metrics_offline)
        rec.seconds = time.perf_counter() - t0
        report.stages.append(rec)
        pm = report.primary_metric
        say(
            f"stage {si} ({name}): {len(group)} module(s), kept {rec.target_ratio:.3f}"
            + (f", {pm} {_fmt(rec.metrics_offline.get(pm))} → {_fmt(rec.metrics.get(pm))}" if pm else "")
            + f", {rec.seconds:.1f}s"
        )
        session.save(si, model, report, kept)

    if cfg.schedule != "staged" and report.stages:
        report.metrics_offline = dict(report.stages[0].metrics_offline)
    elif cfg.schedule == "staged" and report.stages:
        # the staged schedule never sees the fully swapped, untuned model; report the last swap
        report.metrics_offline = dict(report.stages[len(stages) - 1].metrics_offline)  # not the final fine-tune (resumed)

    if fine_tune and cfg.final_steps > 0 and not session.final_done:
        t0 = time.perf_counter()
        resumed = resumed_at(len(stages))
        if resumed is not None:
            rec = StageRecord(**resumed["record"])
            t0 -= resumed["seconds"]
        else:
            rec = StageRecord(stage=len(report.stages), name="final fine-tune", modules=[],
                              params=count_params(model), target_ratio=sum(kept.values()) / max(1, dense_total))
        with profiling.range("final fine-tune"):
            rec.train = finetune(model, objective, data, **cfg.phase("final"),
                                 progress=progress, desc="final fine-tune",
                                 resume=resumed and resumed["train_state"],
                                 on_step=stepper(len(stages), rec, t0, cfg.final_steps), **train_kw)
        if evaluator is not None:
            rec.metrics = evaluator(model)
        rec.seconds = time.perf_counter() - t0
        report.stages.append(rec)
        say(f"final fine-tune: {cfg.final_steps} steps, {rec.metrics}")
        session.save(len(stages), model, report, kept, final=True)
    if evaluator is not None:
        last = report.stages[-1]
        report.metrics_after = dict(last.metrics) if last.metrics else evaluator(model)
    report.params_after = count_params(model)
    report.target_weight_params_after = sum(kept.values())
    report.seconds = time.perf_counter() - t_start
    model.eval()
    from .. import hf  # config.quantization_config: the model's own save_pretrained reloads compressed

    hf.mark_compressed(model, cfg.to_dict())
    return model, report


def _inputs(model, batch, device):
    from ..train.loop import model_inputs

    return model_inputs(model, batch, device)


def revert(model: nn.Module) -> nn.Module:
    """Deprecated name of :func:`fastfactor.merge_and_unload` (the same operation): every factorized
    module becomes the dense module it replaced, of its original class (GPT-2's ``Conv1D`` included)."""
    from ..api import merge_and_unload

    return merge_and_unload(model)


__all__ = ["compress", "CompressionReport", "StageRecord", "plan_stages", "count_params", "revert"]
