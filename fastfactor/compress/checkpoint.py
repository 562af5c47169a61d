"""Stage checkpoints of the compression driver, and resuming from them.

After every finished stage (and after the final fine-tune) :func:`~fastfactor.compress.compress`
writes ``CHECKPOINT_DIR/stage-NNNN/``::

    model.safetensors   the model as it stands: factors of the modules replaced so far, every
                        other tensor (written by ``save_compressed``: tied tensors stored once)
    fastfactor.json     its manifest: which modules are replaced, their class and factor_config,
                        the sha256 of model.safetensors
    state.json          what the rest of the run depends on (below)
    checkpoint.json     format version, stage, and the sha256 of the three files above

``state.json`` holds: the compression config; fingerprints of the uncompressed model (sha256 of
every tensor, names, shapes and dtypes) and of the data (sha256 of every train/eval tensor); the
report so far (every finished stage's record); the weight parameters kept per target; the RNG
states of every rank — Python ``random``, NumPy, the torch CPU generator, every CUDA generator
(when CUDA is initialized) and the driver's calibration generator; the data position; the world
size.

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
number of stages for the final fine-tune): the same four files with the model as it stands
mid-fine-tune, plus ``train_state.pt`` — the AdamW moments keyed by parameter name (gathered whole
under FSDP), the learning-rate scheduler's state, the step and the losses so far — and in
``state.json`` the unfinished stage's record (``in_progress``) and the data position (stage, step,
seed of its batch stream). Resuming from it continues that fine-tune at the next step. Without
``checkpoint_every`` a run killed inside a stage repeats that stage from its start. Checkpoints are
ordered by (stage, step), a finished stage after all of its steps; only the newest is kept.

Safety: the stage directory is built under a ``.tmp-`` name and renamed into place only when
complete (:func:`fastfactor._io.atomic_directory`), so a crash — even ``SIGKILL`` — never leaves
a checkpoint that looks valid; older stage directories are removed only after the new one is in
place. Only rank 0 writes (after gathering every rank's RNG states); a failure to write raises on
every rank. Reading checks every file's sha256, the format versions, the tensor names, shapes and
dtypes against the model, the module classes, and that config, model and data are the ones of the
interrupted run; each failure is a ``ValueError`` naming the file and what is wrong.

Resuming: :func:`fastfactor.compress.compress` with ``resume=DIR`` (a run's output directory,
its ``checkpoints/`` directory, or one ``stage-NNNN`` directory) and the *uncompressed* model,
the same config and the same data. It repeats the setup (teacher copy, reference outputs), then
replaces the modules of the finished stages, loads the checkpointed tensors, the report and the
RNG states, and continues with the next stage. With the same seed the final weights are bitwise
those of an uninterrupted run (``tests/test_resume.py`` kills a real run with ``SIGKILL``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import shutil
import time
from dataclasses import asdict
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import _io
from .. import distributed as D

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"  #: sub-directory of a run's output directory
STATE = "state.json"
INDEX = "checkpoint.json"
TRAIN_STATE = "train_state.pt"  #: optimizer / scheduler / step / losses of an unfinished fine-tune
KIND = "fastfactor-stage-checkpoint"
_STAGE_RE = re.compile(r"^stage-(\d{4,})(?:-step-(\d{8,}))?$")

#: Test-only fault injection. Unset (the default) it does nothing. ``"K:sleep:S"`` sleeps S
#: seconds in the middle of stage K (after its modules are swapped, before its fine-tuning), so a
#: test can ``SIGKILL`` the process there; ``"K:raise"`` raises :class:`InjectedFault` there.
#: ``"K@N:sleep:S"`` / ``"K@N:raise"`` do it after step N of stage K's fine-tune (K = the number of
#: stages: the final fine-tune), after any checkpoint of that step is written.
TEST_FAULT_ENV = "FASTFACTOR_TEST_FAULT_IN_STAGE"


class InjectedFault(RuntimeError):
    """Raised by the test-only hook (:data:`TEST_FAULT_ENV`)."""


def test_fault_hook(stage: int, step: Optional[int] = None) -> None:
    """Called by the driver in the middle of every stage (``step=None``) and after every fine-tuning
    step; a no-op unless :data:`TEST_FAULT_ENV` is set."""
    spec = os.environ.get(TEST_FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    usage = f"{TEST_FAULT_ENV}: expected 'STAGE[@STEP]:sleep:SECONDS' or 'STAGE[@STEP]:raise', got {spec!r}"
    try:
        at_stage, _, at_step = parts[0].partition("@")
        at = (int(at_stage), int(at_step) if at_step else None)
    except ValueError:
        raise ValueError(usage) from None
    if at != (stage, step):
        return
    where = f"stage {stage}" + (f" after fine-tuning step {step}" if step is not None else "")
    if len(parts) == 3 and parts[1] == "sleep":
        print(f"[{TEST_FAULT_ENV}] sleeping in {where}", flush=True)
        time.sleep(float(parts[2]))
    elif len(parts) == 2 and parts[1] == "raise":
        raise InjectedFault(f"{TEST_FAULT_ENV}: injected fault in {where}")
    else:
        raise ValueError(usage)


test_fault_hook.__test__ = False  # not a pytest test despite its name


# --------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------

def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every state-dict tensor's name, shape, dtype and bytes (and the class name)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for k, t in model.state_dict().items():
        h.update(k.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def data_fingerprint(data) -> Optional[str]:
    """sha256 over every tensor of the train and eval splits (``None`` without data)."""
    if data is None:
        return None
    h = hashlib.sha256()
    for split_name in ("train", "eval"):
        split = getattr(data, split_name, None) or {}
        for k in sorted(split):
            h.update(f"{split_name}.{k}".encode())
            _hash_tensor(h, split[k])
    return h.hexdigest()


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
# locating checkpoints
# --------------------------------------------------------------------------------------------

def stage_dirname(stage: int, step: Optional[int] = None) -> str:
    """``stage-NNNN`` (a finished stage) or ``stage-NNNN-step-SSSSSSSS`` (step S of its fine-tune)."""
    return f"stage-{stage:04d}" if step is None else f"stage-{stage:04d}-step-{step:08d}"


def list_checkpoints(directory) -> List[str]:
    """Checkpoint directories under ``directory`` (a checkpoints directory), oldest first: by
    stage, and within a stage by fine-tuning step, the finished stage last."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _STAGE_RE.match(name)
        if m and os.path.isdir(os.path.join(directory, name)):
            step = int(m.group(2)) if m.group(2) is not None else float("inf")
            found.append(((int(m.group(1)), step), os.path.join(directory, name)))
    return [p for _, p in sorted(found)]


def resolve_resume(path) -> str:
    """The stage directory to resume from: ``path`` is a run's output directory (holding
    ``checkpoints/``), a checkpoints directory (the latest stage is taken) or a stage directory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"resume: expected a directory with stage checkpoints, got {path!r} (no such directory)")
    if os.path.isfile(os.path.join(path, INDEX)) or _STAGE_RE.match(os.path.basename(os.path.normpath(path))):
        return path
    for d in (os.path.join(path, CHECKPOINTS), path):
        found = list_checkpoints(d)
        if found:
            return found[-1]
    raise ValueError(
        f"resume: {path!r} holds no finished stage checkpoint (expected {CHECKPOINTS}/stage-NNNN/ or "
        "stage-NNNN/ inside it); the run was stopped before its first stage finished — start it again "
        "without resume"
    )


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

class StageCheckpointer:
    """Writes one checkpoint per finished stage into ``directory`` (rank 0; see the module doc)."""

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
        from .io import MANIFEST, WEIGHTS, save_compressed

        rngs = [rng_state(generator)]
        if D.is_distributed():
            gathered: list = [None] * D.get_world_size()
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        path, error = None, None
        if D.is_main_process():
            try:
                step = None if in_progress is None else int(in_progress["step"])
                path = os.path.join(self.directory, stage_dirname(stage, step))
                # where the data stream continues: the next stage at step 0, or this stage at `step`
                at = stage + 1 if step is None else stage
                seed = self.config["seed"]
                position = {
                    "next_stage": at, "step": step or 0,
                    "finetune_seed": seed + 1000 if at >= self.num_stages else seed + at,  # the driver's seeds
                    "calibration_seed": seed + 7,
                }
                state = {
                    "format_version": CHECKPOINT_FORMAT_VERSION,
                    "kind": KIND,
                    "stage": stage,
                    "final": final,
                    "num_stages": self.num_stages,
                    "world_size": D.get_world_size(),
                    "config": self.config,
                    "fingerprint": self.fingerprint,
                    "report": _report_to_json(report),
                    "kept": dict(kept),
                    "rng": rngs,
                    "data_position": position,
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
                with _io.atomic_directory(path, replace=True) as tmp:
                    save_compressed(model, tmp, compression=self.config)
                    _io.atomic_write_json(os.path.join(tmp, STATE), state)
                    names = (WEIGHTS, MANIFEST, STATE)
                    if step is not None:
                        _io.atomic_torch_save(train_state, os.path.join(tmp, TRAIN_STATE))
                        names += (TRAIN_STATE,)
                    files = {n: _io.sha256_file(os.path.join(tmp, n)) for n in names}
                    for extra in sorted(os.listdir(tmp)):
                        if extra not in files and not extra.startswith(_io.TMP_PREFIX) and extra != INDEX:
                            files[extra] = _io.sha256_file(os.path.join(tmp, extra))
                    _io.atomic_write_json(os.path.join(tmp, INDEX), {
                        "format_version": CHECKPOINT_FORMAT_VERSION, "kind": KIND, "stage": stage,
                        "step": step, "final": final, "files": files,
                    })
                for old in list_checkpoints(self.directory)[: -self.keep_last]:
                    if os.path.abspath(old) != path:
                        shutil.rmtree(old, ignore_errors=True)
                _io.remove_stale_temporaries(self.directory)
            except BaseException as e:  # noqa: BLE001 - reported to every rank below
                error = e
        if D.is_distributed():
            msg = [None if error is None else f"{type(error).__name__}: {error}"]
            torch.distributed.broadcast_object_list(msg, src=0)
            if msg[0] is not None and error is None:
                raise RuntimeError(f"rank 0 failed to write the stage {stage} checkpoint: {msg[0]}")
        if error is not None:
            raise error
        return path


def _report_to_json(report) -> dict:
    d = asdict(report)
    return d


def report_from_json(d: dict, report_cls, stage_cls):
    d = dict(d)
    d["stages"] = [stage_cls(**s) for s in d.get("stages", [])]
    return report_cls(**d)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def read_checkpoint(path) -> dict:
    """Validate the stage directory ``path`` (index, checksums, versions) and return its state."""
    from .io import MANIFEST, WEIGHTS

    path = os.fspath(path)
    index_path = os.path.join(path, INDEX)
    index = _io.read_json(index_path, "checkpoint index")
    if index.get("kind") != KIND:
        raise ValueError(f"{index_path}: expected kind {KIND!r}, got {index.get('kind')!r}")
    _io.check_format_version(index_path, index.get("format_version"), CHECKPOINT_FORMAT_VERSION, "checkpoint index")
    files = index.get("files")
    if not isinstance(files, dict) or not {WEIGHTS, MANIFEST, STATE} <= set(files):
        raise ValueError(f"{index_path}: expected checksums of {WEIGHTS}, {MANIFEST} and {STATE}, got {files!r}")
    _io.verify_files(path, files)
    state_path = os.path.join(path, STATE)
    state = _io.read_json(state_path, "checkpoint state")
    _io.check_format_version(state_path, state.get("format_version"), CHECKPOINT_FORMAT_VERSION, "checkpoint state")
    for key in ("stage", "num_stages", "config", "fingerprint", "report", "kept", "rng"):
        if key not in state:
            raise ValueError(f"{state_path}: the checkpoint state has no {key!r} entry")
    if state["stage"] != index.get("stage"):
        raise ValueError(f"{state_path}: stage {state['stage']} but {INDEX} says {index.get('stage')}")
    partial = state.get("in_progress")
    if partial is not None:
        if not isinstance(partial, dict) or not {"stage", "step", "record"} <= set(partial):
            raise ValueError(f"{state_path}: 'in_progress' must hold the stage, step and record, got {partial!r}")
        if partial["step"] != index.get("step") or partial["stage"] != state["stage"]:
            raise ValueError(f"{state_path}: in_progress is step {partial['step']} of stage {partial['stage']}, "
                             f"{INDEX} says step {index.get('step')} of stage {index.get('stage')}")
        if TRAIN_STATE not in files:
            raise ValueError(f"{index_path}: a mid-fine-tune checkpoint needs the checksum of {TRAIN_STATE}, got {sorted(files)}")
        tpath = os.path.join(path, TRAIN_STATE)
        try:
            state["train_state"] = torch.load(tpath, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
            raise ValueError(f"{tpath}: cannot read the fine-tuning state ({type(e).__name__}: {e})") from e
        ts = state["train_state"]
        if not isinstance(ts, dict) or not {"step", "losses", "optimizer", "scheduler"} <= set(ts):
            raise ValueError(f"{tpath}: expected the step, losses, optimizer and scheduler state, got "
                             f"{sorted(ts) if isinstance(ts, dict) else type(ts).__name__}")
        if ts["step"] != partial["step"]:
            raise ValueError(f"{tpath}: holds step {ts['step']}, {STATE} says step {partial['step']}")
    state["_path"] = path
    return state


def check_compatible(state: dict, config: dict, fingerprint: dict, num_stages: int, world_size: int) -> None:
    """The checkpoint belongs to this run: same config, same uncompressed model, same data."""
    spath = os.path.join(state["_path"], STATE)
    diff = [k for k in sorted(set(config) | set(state["config"])) if config.get(k) != state["config"].get(k)]
    if diff:
        shown = ", ".join(f"{k}: checkpoint {state['config'].get(k)!r}, now {config.get(k)!r}" for k in diff)
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


def _expected_tensors(model: nn.Module, manifest: dict, classes: Dict[str, type], mpath: str) -> Dict[str, tuple]:
    """``{state-dict key: (shape, dtype or None)}`` the model will have once the manifest's modules
    are in place (factor dtypes are whatever was saved: ``None``)."""
    expected = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}
    for entry in manifest.get("modules", []):
        name = entry.get("name")
        cls = classes.get(entry.get("class"))
        if cls is None:
            raise ValueError(
                f"{mpath}: module {name!r} has layer class {entry.get('class')!r} ({entry.get('method')}), "
                f"which this build does not know (known: {sorted(classes)})"
            )
        try:
            with torch.device("meta"):
                probe = cls(**entry["factor_config"])
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{mpath}: module {name!r}: factor_config {entry.get('factor_config')!r} is invalid ({e})") from e
        prefix = name + "."
        for k in [k for k in expected if k.startswith(prefix)]:
            del expected[k]
        for k, t in probe.state_dict().items():
            expected[prefix + k] = (tuple(t.shape), None)
    return expected


def load_model_state(path: str, model: nn.Module, expect_modules: List[str], device) -> nn.Module:
    """Put the checkpoint's modules and tensors into ``model`` (uncompressed), after checking
    names, shapes and dtypes of every tensor against what the model will be (nothing is changed
    before every check passed)."""
    from safetensors import safe_open

    from .io import MANIFEST, WEIGHTS, load_compressed, read_manifest
    from .methods import layer_classes

    mpath = os.path.join(path, MANIFEST)
    wpath = os.path.join(path, WEIGHTS)
    manifest = read_manifest(path)
    names = [e.get("name") for e in manifest.get("modules", [])]
    if sorted(names) != sorted(expect_modules):
        missing = sorted(set(expect_modules) - set(names))
        extra = sorted(set(names) - set(expect_modules))
        raise ValueError(
            f"{mpath}: the replaced modules do not match the finished stages of this plan "
            f"(missing {missing[:6]}, unexpected {extra[:6]})"
        )
    expected = _expected_tensors(model, manifest, layer_classes(), mpath)
    tied = manifest.get("tied", {}) or {}
    try:
        with safe_open(wpath, framework="pt") as f:
            stored = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{wpath}: cannot read the tensors ({type(e).__name__}: {e}); the file is truncated or corrupt") from e
    from ..hf import TRIPWIRE  # zero-size "<module>.weight" markers for loaders without fastfactor

    wires = {f"{n}.{TRIPWIRE}" for n in names}
    stored = {k: v for k, v in stored.items() if not (k in wires and v[0] == (0,) and k not in expected)}
    keys = set(stored) | set(tied)
    if keys != set(expected):
        raise ValueError(
            f"{wpath}: tensor names do not match the model (missing {sorted(set(expected) - keys)[:6]}, "
            f"unexpected {sorted(keys - set(expected))[:6]})"
        )
    for k, (shape, dtype) in expected.items():
        src = tied.get(k, k)
        if src not in stored:
            raise ValueError(f"{mpath}: tied tensor {k!r} points at {src!r}, which is not stored")
        got_shape, got_dtype = stored[src]
        if got_shape != shape:
            raise ValueError(f"{wpath}: tensor {k!r} has shape {list(got_shape)}, the model expects {list(shape)}")
        if dtype is not None and _st_dtype(dtype) != got_dtype:
            raise ValueError(f"{wpath}: tensor {k!r} has dtype {got_dtype}, the model has {_st_dtype(dtype)}")
    was_training = model.training
    load_compressed(path, model=model, device=device)
    model.train(was_training)
    return model


_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _st_dtype(dtype: torch.dtype) -> str:
    return _ST_DTYPES.get(dtype, str(dtype))


# --------------------------------------------------------------------------------------------
# the command line's output directory
# --------------------------------------------------------------------------------------------

def output_in_use(out) -> List[str]:
    """What in ``out`` belongs to an earlier run: every entry but temporaries and an empty (or
    temporaries-only) ``checkpoints/``."""
    out = os.fspath(out)
    if not os.path.isdir(out):
        return []
    used = []
    for name in sorted(os.listdir(out)):
        if name.startswith(_io.TMP_PREFIX):
            continue
        if name == CHECKPOINTS and not list_checkpoints(os.path.join(out, name)):
            continue
        used.append(name)
    return used


def prepare_output(out, resume=None, overwrite: bool = False):
    """``(checkpoint_dir, resume_from)`` for ``fastfactor compress --out OUT [--resume [DIR]]
    [--overwrite]``. A fresh run refuses an ``OUT`` that holds anything of an earlier run (so
    nothing is overwritten by accident); ``--resume`` (``""``: from ``OUT`` itself) continues it;
    ``--overwrite`` deletes ``OUT/checkpoints`` and lets the new run replace the files."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out: expected a directory, got the file {out}")
    ckdir = os.path.join(out, CHECKPOINTS)
    if resume is not None:
        if overwrite:
            raise ValueError("--overwrite: cannot be combined with --resume (resume keeps the run's checkpoints)")
        return ckdir, (resume or out)
    used = output_in_use(out)
    if used and not overwrite:
        raise ValueError(
            f"--out: {out} already holds files of another run ({', '.join(used[:6])}"
            f"{', ...' if len(used) > 6 else ''}); pass --resume to continue that run, --overwrite to "
            "replace it, or choose another directory"
        )
    if overwrite and D.is_main_process() and os.path.isdir(ckdir):
        shutil.rmtree(ckdir)
    D.barrier()
    return ckdir, None


# --------------------------------------------------------------------------------------------
# the driver's entry point
# --------------------------------------------------------------------------------------------

class Session:
    """What the driver needs: where to start, and ``save`` after each stage (no-op without a
    checkpoint directory)."""

    def __init__(self, writer: Optional[StageCheckpointer], start: int = 0, final_done: bool = False,
                 generator: Optional[torch.Generator] = None, resumed_from: Optional[str] = None,
                 partial: Optional[dict] = None):
        self.writer, self.start, self.final_done = writer, start, final_done
        self.generator, self.resumed_from = generator, resumed_from
        #: resuming inside stage ``start``'s fine-tune: ``{"step", "record", "seconds", "train_state"}``
        self.partial = partial

    def save(self, stage: int, model, report, kept, final: bool = False) -> Optional[str]:
        if self.writer is None:
            return None
        return self.writer.save(stage, model, report, kept, self.generator, final=final)

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
          generator: torch.Generator, checkpoint_dir=None, resume=None, device=None,
          report_cls=None, stage_cls=None) -> Session:
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
        existing = list_checkpoints(checkpoint_dir)
        if existing and resume is None:
            raise ValueError(
                f"checkpoint_dir: {checkpoint_dir} already holds checkpoints of another run "
                f"({os.path.basename(existing[-1])}); pass resume= to continue it, or choose an empty directory"
            )
        writer = StageCheckpointer(checkpoint_dir, config, fingerprint, len(stages))
    if resume is None:
        return Session(writer, generator=generator)
    path = resolve_resume(resume)
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
        restored = report_from_json(state["report"], report_cls, stage_cls)
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
                   resumed_from=path, partial=partial)


__all__ = [
    "CHECKPOINT_FORMAT_VERSION", "CHECKPOINTS", "TRAIN_STATE", "TEST_FAULT_ENV", "InjectedFault", "StageCheckpointer",
    "Session", "begin", "prepare_output", "output_in_use", "read_checkpoint", "resolve_resume", "list_checkpoints", "load_model_state",
    "model_fingerprint", "data_fingerprint", "rng_state", "set_rng_state", "test_fault_hook",
]
