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

import copy
import os
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn

from .. import _validate, profiling
from .. import distributed as _dist
from . import faults
from . import resume as _resume
from .calibration import collect_activation_stats, collect_fisher, collect_inputs
from .config import CompressionConfig
from .joint import find_groups
from .methods import build_layer, get_method
from .report import CompressionReport, StageRecord, format_table  # noqa: F401 - format_table re-exported
from .targets import Target, dense_view, get_module, select_targets, set_module


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


def _merge_joint_stages(stages: List[List[Target]], group_of: Dict[str, object]) -> List[List[Target]]:
    """``stages`` with the members of every joint group in one stage (a group is swapped at once):
    a stage holding a member of the group the previous stage holds is merged into it."""
    if not group_of:
        return stages
    out: List[List[Target]] = []
    for st in stages:
        prev = {id(group_of[t.name]) for t in out[-1] if t.name in group_of} if out else set()
        if prev and any(id(group_of.get(t.name)) in prev for t in st):
            out[-1] = out[-1] + st
        else:
            out.append(list(st))
    return out


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
    plan=None,
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
    t_start = time.perf_counter()
    cfg = _as_config(config if config is not None else CompressionConfig())
    module_cfgs: Dict[str, CompressionConfig] = {}
    if plan is not None:
        from ..plan_data import as_plan, check_plan, fit_names

        plan = fit_names(model, as_plan(plan))  # a base model's plan on the model with a task head
        check_plan(model, plan)
        run_d, per = plan.run_config(cfg)
        cfg = _as_config(run_d)
        built = {}
        for n, d in per.items():  # a plan mixing methods: each module its own method, init, blocks
            key = id(d)
            if key not in built:
                built[key] = _as_config(d)
            module_cfgs[n] = built[key]
    _check_arguments(model, cfg, data, parallel, checkpoint_every, checkpoint_dir, module_cfgs)
    run = _Run(model, cfg, data, _resolve_device(model, device), progress=progress, log=log,
               evaluate_stages=evaluate_stages, checkpoint_every=checkpoint_every, parallel=parallel,
               module_cfgs=module_cfgs)
    run.plan()
    if plan is not None:  # the modules the plan keeps dense count as targets kept whole
        run.report.plan = plan.to_dict()
        for t in run.report.targets:  # each module's method and init (a plan may mix them)
            c = run._cfg_of(t["name"])
            t.update(method=c.method, init=c.resolved_init)
        run.planned_dense = sum(m.params for m in plan.modules if m.method == "dense")
        run.report.target_weight_params_before += run.planned_dense
    run.measure_reference(teacher)
    run.measure_dense_reference()
    run.open_checkpoints(checkpoint_dir, resume)
    for si, group in enumerate(run.stages):
        if si >= run.session.start:  # earlier stages: restored from the checkpoint
            run.stage(si, group)
    run.summarize_offline()
    run.final_fine_tune()
    return model, run.finish(t_start)


def _check_arguments(model, cfg: CompressionConfig, data, parallel, checkpoint_every, checkpoint_dir,
                     module_cfgs: Optional[Dict[str, CompressionConfig]] = None) -> None:
    """Every argument error of :func:`compress`, before anything is touched."""
    from ..train.loop import PARALLEL

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if data is not None:
        from ..train.data import TaskData

        if not isinstance(data, TaskData):
            raise TypeError(f"data: expected a fastfactor.train.TaskData or None, got {type(data).__name__}")
    for c in [cfg, *{id(c): c for c in (module_cfgs or {}).values()}.values()]:
        spec = get_method(c.method)
        spec.layer_class()  # clear NotImplementedError now if the layer family is absent
        needs = spec.needs.get(c.resolved_init, ())
        if data is None and (needs or c.schedule != "offline"):
            why = (f"init {c.resolved_init!r} needs calibration data" + (f" ({c.method})" if c is not cfg else "")
                   if needs else f"schedule {c.schedule!r} fine-tunes")
            raise ValueError(f"data: expected a TaskData ({why}), got None")
    if parallel not in PARALLEL:
        raise ValueError(f"parallel: expected one of {PARALLEL}, got {parallel!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every: expected an int >= 0 (fine-tuning steps), got {checkpoint_every!r}")
    if checkpoint_every and checkpoint_dir is None:
        raise ValueError("checkpoint_every: needs checkpoint_dir (where the checkpoints go), got checkpoint_dir=None")


def _resolve_device(model: nn.Module, device) -> torch.device:
    """``device``, or the model's (CPU for a model without parameters)."""
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    return torch.device(device)


class _Run:
    """One :func:`compress` call: its state (model, plan, report, kept weights, checkpoint session)
    and its steps, as methods in the order :func:`compress` calls them."""

    def __init__(self, model: nn.Module, cfg: CompressionConfig, data, device: torch.device, *, progress: bool,
                 log: Optional[Callable[[str], None]], evaluate_stages: bool, checkpoint_every: int, parallel: str,
                 module_cfgs: Optional[Dict[str, CompressionConfig]] = None):
        self.model, self.cfg, self.data, self.device = model, cfg, data, device
        self.init = cfg.resolved_init
        self.needs = get_method(cfg.method).needs.get(self.init, ())  #: statistics the init needs
        #: a plan mixing methods: each target's own config (method, init, nblocks); empty otherwise
        self.module_cfgs = dict(module_cfgs or {})
        self.evaluate_stages, self.checkpoint_every = evaluate_stages, checkpoint_every
        #: every fine-tune's arguments but the phase's own (steps, seed, lr, warm-up, decay: ``cfg.phase``)
        self.train_kw = dict(
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, batch_size=cfg.batch_size,
            train_embeddings=cfg.train_embeddings, parallel=parallel,
        )
        self.objective = self.evaluator = None
        self.fits = None  #: the fit cache of the stage being calibrated (autoencoder; fastfactor.compress.fitcache)
        self.generator = torch.Generator().manual_seed(cfg.seed)  #: the calibration losses' generator
        model.to(device)
        torch.manual_seed(cfg.seed)
        main = _dist.is_main_process()  # only rank 0 logs and shows progress
        self.say = (log or (lambda s: None)) if main else (lambda s: None)
        self.progress = progress and main

    # -- setup ---------------------------------------------------------------------------------

    def plan(self) -> None:
        """Select the targets, group them into stages, start the report."""
        cfg, model = self.cfg, self.model
        self.targets = select_targets(model, cfg.targets, cfg.exclude, cfg.ratio, cfg.module_ratios)
        self.joint_groups, joint_notes = find_groups(model, self.targets, cfg.joint)
        self.group_of = {n: g for g in self.joint_groups for n in g.names}  #: member name -> its joint group
        self.stages = _merge_joint_stages(plan_stages(self.targets, cfg), self.group_of)
        self.kept = {t.name: t.in_features * t.out_features for t in self.targets}  #: weights kept per target
        self.report = CompressionReport(
            config=cfg.to_dict(), targets=[asdict(t) for t in self.targets], params_before=count_params(model),
            target_weight_params_before=sum(t.in_features * t.out_features for t in self.targets),
            device=str(self.device), joint_groups=[g.to_dict() for g in self.joint_groups],
        )
        for note in joint_notes:
            self.say(f"joint: {note}")

    def measure_reference(self, teacher: Optional[nn.Module]) -> None:
        """With data: the training objective, the evaluator (and its reference model: ``teacher``,
        or a frozen copy of the uncompressed model for unlabelled data), the metrics before."""
        if self.data is None:
            return
        from ..train.loop import Evaluator, Objective

        model, data = self.model, self.data
        cfg = self.cfg
        self.objective = Objective.build(model, data, cfg.objective, cfg.distill_loss, self.device, teacher=teacher,
                                         task_weight=cfg.task_weight, distill_weight=cfg.distill_weight,
                                         hidden_weight=cfg.hidden_weight, temperature=cfg.temperature)
        reference = self.objective.teacher if self.objective.teacher is not None else teacher
        if reference is None and not data.labelled:
            reference = copy.deepcopy(model).eval()
        self.evaluator = Evaluator(data, self.device, reference=reference, use_task=data.labelled)
        self.report.primary_metric = self.evaluator.primary
        self.report.metrics_before = self.evaluator(model)
        self.say(f"before: {self.report.metrics_before}")

    def measure_dense_reference(self) -> None:
        """``dense_reference=True``: the uncompressed model fine-tuned like the compressed one will
        be (same phases, task loss), into the report (:mod:`fastfactor.compress.reference`)."""
        if not self.cfg.dense_reference:
            return
        from .reference import dense_reference

        self.report.dense_reference = dense_reference(
            self.model, self.cfg, self.data, self.evaluator, len(self.stages), device=self.device,
            progress=self.progress, log=self.say, **self.train_kw)

    def open_checkpoints(self, checkpoint_dir, resume) -> None:
        """Start checkpointing and, with ``resume``, restore the newest checkpoint (model, report,
        kept weights, RNG states; see :func:`fastfactor.compress.resume.begin`)."""
        self.session = _resume.begin(self.model, self.run_record(), self.data, self.report, self.kept, self.stages,
                                     self.generator, checkpoint_dir=checkpoint_dir, resume=resume, device=self.device)
        s = self.session
        if s.resumed_from is not None:
            where = f", at step {s.partial['step']} of stage {s.start}'s fine-tune" if s.partial else ""
            self.say(f"resumed from {s.resumed_from}: {s.start} of {len(self.stages)} stage(s) done{where}")

    def run_record(self) -> dict:
        """The config a checkpoint records and a resume must match: the run's config, plus for a
        plan mixing methods each module's ``[method, init, nblocks]`` (so another plan is refused)."""
        d = self.cfg.to_dict()
        if self.module_cfgs:
            d["module_methods"] = {n: [c.method, c.resolved_init, c.nblocks] for n, c in self.module_cfgs.items()}
        return d

    # -- one stage: calibrate -> swap -> fine-tune -> record -> checkpoint ----------------------------

    def stage(self, si: int, group: List[Target]) -> None:
        """Stage ``si``: replace the modules of ``group`` (after collecting the statistics their
        init needs), fine-tune (staged schedule), record, checkpoint. A stage the run resumes
        inside its fine-tune continues that fine-tune."""
        cfg = self.cfg
        name = (group[0].block or group[0].name) if cfg.schedule == "staged" else "all"
        rec, t0, resumed = self._begin_record(si, lambda: StageRecord(
            stage=si, name=name, modules=[t.name for t in group], params=0, target_ratio=0.0))
        with profiling.range(f"stage {si}"):
            if resumed is None:  # else its modules are swapped and partly fine-tuned already
                # the autoencoder's finished fits of this stage are cached one by one, so a run
                # killed here keeps them (fastfactor.compress.fitcache); None for other methods
                ae = any(self._cfg_of(t.name).method == "autoencoder" for t in group)  # a plan may mix methods
                self.fits = self.session.fit_cache(si) if ae else None
                block_targets = self._ae_block_targets(group)  # autoencoder scope="block" only
                stats = self.calibrate([t for t in group if not self._fit_cached(t)])
                self.swap(si, group, stats, rec)
                stats.clear()
                self._ae_block_fit(group, block_targets, rec)
                self.fits = None
                faults.test_fault_hook(si)  # test-only; does nothing unless its env variable is set
                self.measure_swap(si, rec)
            if self.fine_tunes and cfg.schedule == "staged" and cfg.stage_steps > 0:
                self.fine_tune(si, rec, t0, resumed, cfg.phase("stage", si), desc=f"stage {si} fine-tune",
                               range_name=f"fine-tune stage {si}")
                if self.evaluator is not None and self.evaluate_stages:
                    rec.metrics = self.evaluator(self.model)
            else:
                rec.metrics = dict(rec.metrics_offline)
        self._append(rec, t0)
        self.say(rec.log_line(self.report.primary_metric))
        self.session.save(si, self.model, self.report, self.kept)

    def calibrate(self, group: List[Target]) -> Dict[str, dict]:
        """``{module: {statistic: tensor}}`` for the init: ``"gram"`` (input Gram matrices) and/or
        ``"fisher"`` (squared-gradient sums), on ``calib_batches`` training batches through the
        current (partly compressed, already fine-tuned) model. Empty entries when it needs none."""
        stats: Dict[str, dict] = {t.name: {} for t in group}
        needs = {t.name: self._needs(t.name) for t in group}
        if not any(needs.values()):
            return stats
        with profiling.range("calibrate"):
            batches = self._calibration_batches()

            def mods_needing(what):
                return {t.name: get_module(self.model, t.name) for t in group if what in needs[t.name]}
            mods = mods_needing("gram")
            if mods:
                fwd = lambda m, b: m(**_inputs(m, b, self.device))
                for n, (g, _) in collect_activation_stats(self.model, mods, batches, fwd).items():
                    stats[n]["gram"] = g
            mods = mods_needing("inputs")
            if mods:  # a sample of each module's input rows (autoencoder)
                fwd = lambda m, b: m(**_inputs(m, b, self.device))
                for n, x in collect_inputs(self.model, mods, batches, fwd, self.cfg.ae_tokens,
                                           seed=self.cfg.seed).items():
                    stats[n]["inputs"] = x
            mods = mods_needing("fisher")
            if mods:
                loss_fn = lambda m, b: self.objective.calibration_loss(m, b, self.generator)
                for n, f in collect_fisher(self.model, mods, batches, loss_fn).items():
                    stats[n]["fisher"] = f
        return stats

    def _cfg_of(self, name: str) -> CompressionConfig:
        """The config target ``name`` is factorized with (its own in a plan mixing methods)."""
        return self.module_cfgs.get(name, self.cfg)

    def _needs(self, name: str) -> tuple:
        c = self.module_cfgs.get(name)
        if c is None:
            return self.needs
        return get_method(c.method).needs.get(c.resolved_init, ())

    def swap(self, si: int, group: List[Target], stats: Dict[str, dict], rec: StageRecord) -> None:
        """Replace every module of ``group`` by its factorized layer (rank 0's factors on every rank)."""
        it = group
        if self.progress and len(group) > 1:
            from tqdm.auto import tqdm

            it = tqdm(group, desc=f"stage {si}: factorize", leave=False)
        for t in it:
            group = self.group_of.get(t.name)
            if group is not None:  # modules compressed together: the whole group at its leader
                if t.name == group.names[0]:
                    self._swap_joint(group, stats, rec)
                continue
            with profiling.range(f"factorize {t.name}"):
                cached = self.fits.load_module(t.name, get_module(self.model, t.name)) if self._fit_cached(t) else None
                if cached is not None:  # fitted before the run was interrupted
                    new, info = cached
                    _dist.broadcast_module(new)  # rank 0's factors everywhere, as after a fit
                else:
                    new = self._factorize(t, stats.get(t.name))
                    c = self.module_cfgs.get(t.name)
                    info = self.init if c is None else f"{c.method} {c.resolved_init}"
                    if self.cfg.method == "autoencoder":  # the report records the form
                        from .autoencoder import describe

                        info = describe(self.cfg)
                set_module(self.model, t.name, new)
                self.kept[t.name] = new.num_weight_params
                rec.init_info[t.name] = info
                if cached is None and self.fits is not None and self._cfg_of(t.name).method == "autoencoder":
                    self.fits.save_module(t.name, new, info)

    def _fit_cached(self, t: Target) -> bool:
        """Target ``t``'s fit (its joint group's, for a member) is in this stage's fit cache."""
        if self.fits is None:
            return False
        group = self.group_of.get(t.name)
        return self.fits.has("group", group.names[0]) if group is not None else self.fits.has("module", t.name)

    def _ae_block_targets(self, group: List[Target]) -> Optional[Dict[str, list]]:
        """Autoencoder ``scope="block"``: the outputs of the stage's blocks before the swap
        (:mod:`fastfactor.compress.autoencoder`); None for every other run."""
        if self.cfg.method != "autoencoder" or self.cfg.scope != "block":
            return None
        from .autoencoder import block_outputs, stage_blocks

        blocks = {n: get_module(self.model, n) for n in stage_blocks(group)}
        with profiling.range("calibrate block outputs"):
            return block_outputs(self.model, blocks, self._calibration_batches(),
                                 lambda m, b: m(**_inputs(m, b, self.device)))

    def _ae_block_fit(self, group: List[Target], targets: Optional[Dict[str, list]], rec: StageRecord) -> None:
        """Autoencoder ``scope="block"``: fit each block's factorized modules together against its
        output (:func:`fastfactor.compress.autoencoder.refine_blocks`); the summary per block goes
        to ``rec.init_info``."""
        if targets is None:
            return
        from .autoencoder import refine_blocks, stage_blocks

        with profiling.range("block fit"):
            infos = refine_blocks(self.model, stage_blocks(group), targets, self._calibration_batches(),
                                  lambda m, b: m(**_inputs(m, b, self.device)), steps=self.cfg.ae_steps,
                                  lr=self.cfg.ae_lr, log=self.say, cache=self.fits)
        for name, info in infos.items():
            rec.init_info[f"{name} (block fit)"] = (
                f"held-out MSE {info['heldout_mse_start']:.6g} -> {info['heldout_mse']:.6g}, "
                f"best step {info['best_step']} of {info['steps_run']}")
        targets.clear()

    def _swap_joint(self, group, stats: Dict[str, dict], rec: StageRecord) -> None:
        """Fit ``group``'s shared factors (:mod:`fastfactor.compress.joint`) and put the leader and
        its members in place; the group's weights are counted at the leader (members store none)."""
        from .joint import build_group

        with profiling.range(f"factorize joint {'+'.join(group.children)}"):
            info = f"{self.init} (joint {group.kind}: {'+'.join(group.children)})"
            new = None
            if self.fits is not None and self.fits.has("group", group.names[0]):  # fitted before an interrupt
                new = self.fits.load_group(list(group.names), {n: get_module(self.model, n) for n in group.names})
            cached = new is not None
            if not cached:
                new = build_group(self.model, group, {t.name: t for t in self.targets}, self.cfg.method, self.init,
                                  self.cfg, stats)
            leader = new[group.names[0]]
            _dist.broadcast_module(leader)  # rank 0's factors everywhere (a no-op single-process)
            for n, m in new.items():
                m.train(get_module(self.model, n).training)
                set_module(self.model, n, m)
                self.kept[n] = m.num_weight_params
                rec.init_info[n] = info
            if not cached and self.fits is not None and self._cfg_of(group.names[0]).method == "autoencoder":
                self.fits.save_group(new, info)

    def measure_swap(self, si: int, rec: StageRecord) -> None:
        """Parameters, weights kept and (when evaluated) the metrics right after stage ``si``'s swap."""
        rec.params = count_params(self.model)
        rec.target_ratio = self._kept_ratio()
        if self.evaluator is not None and (self.evaluate_stages or si == len(self.stages) - 1):
            rec.metrics_offline = self.evaluator(self.model)

    def fine_tune(self, si: int, rec: StageRecord, t0: float, resumed: Optional[dict], phase: dict, *,
                  desc: str, range_name: str) -> None:
        """One phase's fine-tune (``phase``: :meth:`CompressionConfig.phase`: steps, seed, lr,
        warm-up, decay), continuing ``resumed``'s optimizer state and step when the run resumes
        inside it; the loop's summary goes to ``rec.train``."""
        from ..train import loop

        with profiling.range(range_name):
            rec.train = loop.finetune(self.model, self.objective, self.data, **phase,
                                      progress=self.progress, desc=desc,
                                      resume=resumed and resumed["train_state"],
                                      on_step=self._on_step(si, rec, t0, phase["steps"]), **self.train_kw)

    # -- after the last stage ------------------------------------------------------------------

    def summarize_offline(self) -> None:
        """The report's "offline" metrics: right after the last swap, before any later fine-tuning
        (the staged schedule never sees the fully swapped, untuned model; with one stage it is
        that one)."""
        if self.report.stages:
            self.report.metrics_offline = dict(self.report.stages[len(self.stages) - 1].metrics_offline)

    def final_fine_tune(self) -> None:
        """``final_steps`` more steps after the last stage (every schedule but offline), recorded as
        one more stage and checkpointed as the final one."""
        cfg = self.cfg
        if not (self.fine_tunes and cfg.final_steps > 0) or self.session.final_done:
            return
        si = len(self.stages)
        rec, t0, resumed = self._begin_record(si, lambda: StageRecord(
            stage=len(self.report.stages), name="final fine-tune", modules=[], params=count_params(self.model),
            target_ratio=self._kept_ratio()))
        self.fine_tune(si, rec, t0, resumed, cfg.phase("final"), desc="final fine-tune", range_name="final fine-tune")
        if self.evaluator is not None:
            rec.metrics = self.evaluator(self.model)
        self._append(rec, t0)
        self.say(f"final fine-tune: {cfg.final_steps} steps, {rec.metrics}")
        self.session.save(si, self.model, self.report, self.kept, final=True)

    def finish(self, t_start: float) -> CompressionReport:
        """Complete the report (final metrics, parameters, time); the model in eval mode."""
        report, model = self.report, self.model
        if self.evaluator is not None:
            last = report.stages[-1]
            report.metrics_after = dict(last.metrics) if last.metrics else self.evaluator(model)
        report.params_after = count_params(model)
        report.target_weight_params_after = sum(self.kept.values()) + self.planned_dense
        report.seconds = time.perf_counter() - t_start
        model.eval()
        from .. import hf  # config.quantization_config: the model's own save_pretrained reloads compressed

        hf.mark_compressed(model, compression_record(self.cfg, report))
        return report

    # -- helpers -------------------------------------------------------------------------------

    @property
    def fine_tunes(self) -> bool:
        return self.cfg.schedule != "offline"

    #: weights of the modules a budget plan keeps dense (not targets of the run, but of the plan)
    planned_dense = 0

    def _kept_ratio(self) -> float:
        return (sum(self.kept.values()) + self.planned_dense) / max(1, self.report.target_weight_params_before)

    def _begin_record(self, si: int, fresh: Callable[[], StageRecord]):
        """``(record, start time, resumed)`` of stage ``si``: a fresh record, or the one of a run
        resumed inside this stage's fine-tune (its time so far counted, ``resumed`` the state to
        continue from)."""
        t0 = time.perf_counter()
        s = self.session
        resumed = s.partial if s.partial is not None and si == s.start else None
        if resumed is None:
            return fresh(), t0, None
        return StageRecord(**resumed["record"]), t0 - resumed["seconds"], resumed

    def _append(self, rec: StageRecord, t0: float) -> None:
        rec.seconds = time.perf_counter() - t0
        self.report.stages.append(rec)

    def _factorize(self, t: Target, stats: Optional[dict]) -> nn.Module:
        """The factorized layer for target ``t`` from its current dense weight (and ``stats``)."""
        old = get_module(self.model, t.name)
        view = dense_view(old, t.name)
        _validate.check_finite(f"{t.name}.weight", view.weight)
        c = self._cfg_of(t.name)
        try:
            new = build_layer(c.method, view, t.ratio, c.resolved_init, c, stats)
        except (ValueError, TypeError) as e:
            raise type(e)(f"module {t.name!r}: {e}") from e
        new.train(old.training)
        _dist.broadcast_module(new)  # rank 0's factors everywhere (a no-op single-process)
        return new

    def _calibration_batches(self) -> list:
        from ..train.data import iterate

        it = iterate(self.data.train, self.cfg.batch_size, shuffle=True, seed=self.cfg.seed + 7)
        return [b for _, b in zip(range(self.cfg.calib_batches), it)]

    def _on_step(self, si: int, rec: StageRecord, t0: float, total: int):
        """The fine-tune's per-step callback: a mid-fine-tune checkpoint every ``checkpoint_every``
        steps (collective), then the test-only fault hook."""
        def on_step(done, snapshot):
            if self.checkpoint_every and done % self.checkpoint_every == 0 and done < total:
                with profiling.range("checkpoint"):
                    self.session.save_step(si, done, self.model, self.report, self.kept, asdict(rec),
                                           time.perf_counter() - t0, snapshot())
            faults.test_fault_hook(si, done)
        return on_step


def compression_record(cfg: CompressionConfig, report: CompressionReport) -> dict:
    """What the saved model records of its compression (manifest, ``quantization_config``): the
    config, plus the executed budget plan when there was one."""
    d = cfg.to_dict()
    if report.plan is not None:
        d["plan"] = report.plan
        methods = sorted({m["method"] for m in report.plan.get("modules", []) if m.get("method") != "dense"})
        if len(methods) > 1:  # a plan mixing methods: ``method`` above is only the first one's
            d["methods"] = methods
    return d


def _inputs(model, batch, device):
    from ..train.loop import model_inputs

    return model_inputs(model, batch, device)


__all__ = ["compress", "CompressionReport", "StageRecord", "plan_stages", "count_params"]
