"""Resuming an interrupted compression run: what a checkpoint must hold for the rest of the run to
be bitwise that of an uninterrupted one, and putting it back.

The files themselves (layout, checksums, validation) are :mod:`fastfactor.compress.storage`.
Besides the model, a checkpoint's ``state.json`` holds: the compression config; fingerprints of the
uncompressed model (sha256 of every tensor, names, shapes and dtypes) and of the data (sha256 of
every train/eval tensor); the report so far (every finished stage's record); the weight parameters
kept per target; the RNG states of every rank — Python ``random``, NumPy, the torch CPU generator,
every CUDA generator (when CUDA is initialized) and the driver's calibration generator; the data
position; the world size.

Optimizer, scheduler and data position at a stage boundary: the staged schedule (Gupta et al.,
2024) starts a fresh AdamW with its own warm-up/decay schedule for every stage, and each stage's
batch stream is a fresh permutation seeded with ``seed + stage`` (calibration batches with
``seed + 7``). So at the boundary where a checkpoint is taken, the optimizer and scheduler state
that the rest of the run needs is *empty* and the data position is "stage k+1, step 0":
``state.json`` records exactly that (``optimizer``/``scheduler``: ``null`` with the reason,
``data_position``: the next stage, its step and seeds) instead of storing moments that no later
step reads.

Inside a fine-tune (``checkpoint_every=N``, ``--checkpoint-every N``) the driver also writes
``stage-NNNN-step-SSSSSSSS/`` every ``N`` steps of stage ``NNNN``'s fine-tune (``NNNN`` = the
number of stages for the final fine-tune): the model as it stands mid-fine-tune, plus
``train_state.pt`` — the AdamW moments keyed by parameter name (gathered whole under FSDP), the
learning-rate scheduler's state, the step and the losses so far — and in ``state.json`` the
unfinished stage's record (``in_progress``) and the data position (stage, step, seed of its batch
stream). Resuming from it continues that fine-tune at the next step. Without ``checkpoint_every``
a run killed inside a stage repeats that stage from its start. Only the newest checkpoint is kept.

Only rank 0 writes (after gathering every rank's RNG states); a failure to write raises on every
rank. Reading checks, beyond the files, that config, model and data are the ones of the
interrupted run (:func:`check_compatible`) and that the optimizer state fits the model.

Resuming: :func:`fastfactor.compress.compress` with ``resume=DIR`` (a run's output directory,
its ``checkpoints/`` directory, or one ``stage-NNNN`` directory) and the *uncompressed* model,
the same config and the same data. It repeats the setup (teacher copy, reference outputs), then
:func:`begin` replaces the modules of the finished stages, loads the checkpointed tensors, the
report and the RNG states, and the driver continues with the next stage. With the same seed the
final weights are bitwise those of an uninterrupted run (``tests/test_resume.py`` kills a real run
with ``SIGKILL``).
"""

from __future__ import annotations

import base64
import os
import random
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import distributed as D
from .report import CompressionReport
from .storage import (
    CHECKPOINT_FORMAT_VERSION, KIND, STATE, TRAIN_STATE, data_fingerprint, list_checkpoints, load_model_state,
    model_fingerprint, prune_checkpoints, read_checkpoint, resolve_resume, stage_dirname, write_checkpoint,
)


# --------------------------------------------------------------------------------------------
# RNG states (JSON-safe)
# --------------------------------------------------------------------------------------------

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state(generator: Optional[torch.Generator] = None) -> dict:
    """This process's RNG states: python, numpy (when importable), torch CPU, CUDA, ``generator``."""
    st = {"python": _py_state_to_json(random.getstate()), "torch": _b64(torch.get_rng_state())}
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        st["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    if generator is not None:
        st["generator"] = _b64(generator.get_state())
    return st


def set_rng_state(st: dict, generator: Optional[torch.Generator] = None) -> None:
    random.setstate(_py_state_from_json(st["python"]))
    torch.set_rng_state(_unb64(st["torch"]))
    if "numpy" in st:
        import numpy as np

        name, keys, pos, has_gauss, gauss = st["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if st.get("cuda") and torch.cuda.is_available():
        states = [_unb64(s) for s in st["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if generator is not None and "generator" in st:
        generator.set_state(_unb64(st["generator"]))


def _py_state_to_json(s):
    version, internal, gauss = s
    return [version, list(internal), gauss]


def _py_state_from_json(s):
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


# --------------------------------------------------------------------------------------------
# writing: what the rest of the run depends on
# --------------------------------------------------------------------------------------------

def data_position(stage: int, step: Optional[int], seed: int, num_stages: int) -> dict:
    """Where the data streams continue after a checkpoint of ``stage`` (at ``step`` of its
    fine-tune, or finished: ``step=None``): the driver's seeds of the next batch stream."""
    at = stage + 1 if step is None else stage
    return {
        "next_stage": at, "step": step or 0,
        "finetune_seed": seed + 1000 if at >= num_stages else seed + at,  # the driver's seeds
        "calibration_seed": seed + 7,
    }


def run_state(stage: int, step: Optional[int], final: bool, num_stages: int, config: dict, fingerprint: dict,
              report, kept: Dict[str, int], rngs: list, in_progress: Optional[dict] = None) -> dict:
    """The content of ``state.json`` (see the module doc)."""
    state = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "kind": KIND,
        "stage": stage,
        "final": final,
        "num_stages": num_stages,
        "world_size": D.get_world_size(),
        "config": config,
        "fingerprint": fingerprint,
        "report": report.to_json(),
        "kept": dict(kept),
        "rng": rngs,
        "data_position": data_position(stage, step, config["seed"], num_stages),
        "optimizer": None if step is None else TRAIN_STATE,
        "scheduler": None if step is None else TRAIN_STATE,
        "optimizer_note": "each stage starts a fresh AdamW and learning-rate schedule; "
                          "nothing carries over a stage boundary" if step is None else
                          f"AdamW and scheduler state after step {step} in {TRAIN_STATE}",
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if step is not None:
        state["in_progress"] = {"stage": stage, "step": step, "record": in_progress["record"],
                                "seconds": float(in_progress.get("seconds", 0.0))}
    return state


def _all_rng_states(generator: Optional[torch.Generator]) -> list:
    """Every rank's :func:`rng_state` (collective under torch.distributed), rank order."""
    rngs = [rng_state(generator)]
    if D.is_distributed():
        gathered: list = [None] * D.get_world_size()
        torch.distributed.all_gather_object(gathered, rngs[0])
        rngs = gathered
    return rngs


class StageCheckpointer:
    """Writes one checkpoint per finished stage (and, on request, per fine-tuning step) into
    ``directory`` (rank 0; see the module doc)."""

    def __init__(self, directory, config: dict, fingerprint: dict, num_stages: int, keep_last: int = 1):
        self.directory = os.path.abspath(os.fspath(directory))
        self.config = config
        self.fingerprint = fingerprint
        self.num_stages = num_stages
        self.keep_last = max(1, int(keep_last))

    def save(self, stage: int, model: nn.Module, report, kept: Dict[str, int],
             generator: Optional[torch.Generator] = None, final: bool = False,
             in_progress: Optional[dict] = None, train_state: Optional[dict] = None) -> Optional[str]:
        """Collective under torch.distributed (every rank calls it); returns the path on rank 0.

        A finished stage by default; with ``in_progress`` (``{"step", "record", "seconds"}``: the
        unfinished stage's record so far) and ``train_state`` (the fine-tuning loop's snapshot)
        step ``in_progress["step"]`` of stage ``stage``'s fine-tune."""
        rngs = _all_rng_states(generator)
        path, error = None, None
        if D.is_main_process():
            try:
                step = None if in_progress is None else int(in_progress["step"])
                path = os.path.join(self.directory, stage_dirname(stage, step))
                state = run_state(stage, step, final, self.num_stages, self.config, self.fingerprint,
                                  report, kept, rngs, in_progress)
                write_checkpoint(path, model, state, self.config, train_state)
                prune_checkpoints(self.directory, self.keep_last, keep=path)
            except BaseException as e:  # noqa: BLE001 - reported to every rank below
                error = e
        _raise_on_every_rank(error, f"rank 0 failed to write the stage {stage} checkpoint")
        return path


def _raise_on_every_rank(error: Optional[BaseException], what: str) -> None:
    """Re-raise rank 0's ``error`` there and a ``RuntimeError`` (``what``: the message) on the others."""
    if D.is_distributed():
        msg = [None if error is None else f"{type(error).__name__}: {error}"]
        torch.distributed.broadcast_object_list(msg, src=0)
        if msg[0] is not None and error is None:
            raise RuntimeError(f"{what}: {msg[0]}")
    if error is not None:
        raise error


# --------------------------------------------------------------------------------------------
# resuming
# --------------------------------------------------------------------------------------------

def check_compatible(state: dict, config: dict, fingerprint: dict, num_stages: int, world_size: int) -> None:
    """The checkpoint belongs to this run: same config, same uncompressed model, same data."""
    from .config import LEGACY_DEFAULTS

    spath = os.path.join(state["_path"], STATE)
    old = {**LEGACY_DEFAULTS, **state["config"]}  # a checkpoint from before a field: the value runs used then
    diff = [k for k in sorted(set(config) | set(old)) if config.get(k) != old.get(k)]
    if diff:
        shown = ", ".join(f"{k}: checkpoint {old.get(k)!r}, now {config.get(k)!r}" for k in diff)
        raise ValueError(f"{spath}: written with another compression config ({shown}); resume with the same settings")
    for what in ("model", "data"):
        if state["fingerprint"].get(what) != fingerprint.get(what):
            raise ValueError(
                f"{spath}: written for another {what} (fingerprint {str(state['fingerprint'].get(what))[:12]}…, "
                f"this run's {str(fingerprint.get(what))[:12]}…); resume with the uncompressed model and the "
                "data of the interrupted run"
            )
    if state["num_stages"] != num_stages:
        raise ValueError(f"{spath}: the checkpointed run had {state['num_stages']} stages, this one plans {num_stages}")
    if len(state["rng"]) != world_size:
        raise ValueError(
            f"{spath}: written by {len(state['rng'])} process(es), resuming with {world_size}; resume "
            "with the same number of processes (the RNG state of each rank is restored)"
        )


class Session:
    """What the driver needs: where to start, and ``save`` after each stage (no-op without a
    checkpoint directory)."""

    def __init__(self, writer: Optional[StageCheckpointer], start: int = 0, final_done: bool = False,
                 generator: Optional[torch.Generator] = None, resumed_from: Optional[str] = None,
                 partial: Optional[dict] = None, fits_dir: Optional[str] = None, config: Optional[dict] = None,
                 fingerprint: Optional[dict] = None):
        self.writer, self.start, self.final_done = writer, start, final_done
        self.generator, self.resumed_from = generator, resumed_from
        #: resuming inside stage ``start``'s fine-tune: ``{"step", "record", "seconds", "train_state"}``
        self.partial = partial
        #: where the stages' fit caches are (:mod:`fastfactor.compress.fitcache`): the checkpoint
        #: directory, or the one resumed from; None: no fit cache
        self.fits_dir, self.config, self.fingerprint = fits_dir, config, fingerprint

    def fit_cache(self, stage: int):
        """Stage ``stage``'s :class:`~fastfactor.compress.fitcache.FitCache` (disabled without a
        checkpoint directory; read-only when resuming without one)."""
        from .fitcache import FitCache

        return FitCache(self.fits_dir, stage, self.config or {}, self.fingerprint or {},
                        write=self.writer is not None)

    def save(self, stage: int, model, report, kept, final: bool = False) -> Optional[str]:
        if self.writer is None:
            return None
        path = self.writer.save(stage, model, report, kept, self.generator, final=final)
        from .fitcache import remove_fits

        remove_fits(self.writer.directory, stage)  # the stage checkpoint holds what they held
        return path

    def save_step(self, stage: int, step: int, model, report, kept, record: dict, seconds: float,
                  train_state: dict) -> Optional[str]:
        """A checkpoint after ``step`` steps of stage ``stage``'s fine-tune (collective)."""
        if self.writer is None:
            return None
        return self.writer.save(stage, model, report, kept, self.generator,
                                in_progress={"step": step, "record": record, "seconds": seconds},
                                train_state=train_state)


def _check_train_state(tpath: str, ts: dict, model: nn.Module) -> None:
    """The optimizer state names parameters of ``model`` (as the checkpoint made it), with moments of their shapes."""
    opt = ts.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise ValueError(f"{tpath}: the optimizer entry is not an optimizer state (state and param_groups)")
    params = dict(model.named_parameters())
    for name, st in opt["state"].items():
        if name not in params:
            raise ValueError(f"{tpath}: optimizer state for {name!r}, which is not a parameter of the model")
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.ndim and tuple(v.shape) != tuple(params[name].shape):
                raise ValueError(f"{tpath}: optimizer {k!r} of {name!r} has shape {list(v.shape)}, "
                                 f"the parameter {list(params[name].shape)}")
    if not isinstance(ts.get("scheduler"), dict):
        raise ValueError(f"{tpath}: the scheduler entry is not a scheduler state")


def begin(model: nn.Module, config: dict, data, report, kept: Dict[str, int], stages: List[list],
          generator: torch.Generator, checkpoint_dir=None, resume=None, device=None) -> Session:
    """Set up checkpointing for a run and, with ``resume``, restore the newest checkpoint into
    ``model``, ``report`` and ``kept`` (in place): a finished stage, or a step inside a fine-tune
    (then the session's ``partial`` holds that stage's record and the fine-tuning state to continue
    from). Call it after the run's setup and before the first stage; it restores the RNG states
    last, so the run draws exactly what the interrupted run would have drawn."""
    if checkpoint_dir is None and resume is None:
        return Session(None, generator=generator)
    fingerprint = {"model": model_fingerprint(model), "data": data_fingerprint(data)}
    writer = None
    if checkpoint_dir is not None:
        checkpoint_dir = os.path.abspath(os.fspath(checkpoint_dir))
        if D.is_main_process():
            os.makedirs(checkpoint_dir, exist_ok=True)
        from .fitcache import list_fits

        existing = list_checkpoints(checkpoint_dir) + list_fits(checkpoint_dir)
        if existing and resume is None:
            raise ValueError(
                f"checkpoint_dir: {checkpoint_dir} already holds checkpoints of another run "
                f"({os.path.basename(existing[-1])}); pass resume= to continue it, or choose an empty directory"
            )
        writer = StageCheckpointer(checkpoint_dir, config, fingerprint, len(stages))
    fits_kw = dict(config=config, fingerprint=fingerprint,
                   fits_dir=writer.directory if writer is not None else _fits_dir_of(resume))
    if resume is None:
        return Session(writer, generator=generator, **fits_kw)
    try:
        path = resolve_resume(resume)
    except ValueError:
        # no finished stage yet: a run killed in its first stage's calibration resumes from the
        # fits it cached (fastfactor.compress.fitcache), from the start of stage 0
        from .fitcache import fits_dirname, list_fits

        first = os.path.join(fits_kw["fits_dir"] or "", fits_dirname(0))
        if fits_kw["fits_dir"] is None or first not in list_fits(fits_kw["fits_dir"]):
            raise
        return Session(writer, generator=generator, resumed_from=first, **fits_kw)
    state = read_checkpoint(path)
    check_compatible(state, config, fingerprint, len(stages), D.get_world_size())
    partial = state.get("in_progress")
    # stages finished (the final fine-tune has index len(stages)); an unfinished one has its modules swapped
    done = state["stage"] + (0 if partial is not None else 1)
    final_done = bool(state.get("final"))
    swapped = done + (1 if partial is not None else 0)
    finished = [t.name for g in stages[: min(swapped, len(stages))] for t in g]
    load_model_state(path, model, finished, device)
    spath = os.path.join(path, STATE)
    try:
        restored = CompressionReport.from_json(state["report"])
    except TypeError as e:
        raise ValueError(f"{spath}: the report in the checkpoint does not match this version ({e})") from e
    for f in ("stages", "metrics_before", "params_before", "target_weight_params_before", "primary_metric"):
        setattr(report, f, getattr(restored, f))
    kept.clear()
    kept.update({str(k): int(v) for k, v in state["kept"].items()})
    if partial is not None:
        _check_train_state(os.path.join(path, TRAIN_STATE), state["train_state"], model)
    set_rng_state(state["rng"][D.get_rank()], generator)
    if partial is not None:
        partial = dict(partial, train_state=state["train_state"])
    return Session(writer, start=done, final_done=final_done, generator=generator,
                   resumed_from=path, partial=partial, **fits_kw)


def _fits_dir_of(resume) -> Optional[str]:
    """The checkpoints directory of ``resume`` (a run's output directory, its checkpoints directory
    or one stage directory): where that run's fit caches are; None when there is none."""
    if resume is None:
        return None
    from .fitcache import list_fits
    from .storage import CHECKPOINTS

    path = os.path.abspath(os.fspath(resume))
    for d in (os.path.join(path, CHECKPOINTS), path, os.path.dirname(path)):
        if list_checkpoints(d) or list_fits(d):
            return d
    return None


__all__ = [
    "StageCheckpointer", "Session", "begin", "check_compatible", "rng_state", "set_rng_state",
    "data_position", "run_state",
]
