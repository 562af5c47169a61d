"""Checkpoint storage: the on-disk format of the driver's checkpoints, writing, reading and validating it.

What the *values* mean and how a run continues from them is :mod:`fastfactor.compress.resume`; this
module only knows files. A checkpoint is a directory ``CHECKPOINT_DIR/stage-NNNN/`` (a finished
stage) or ``stage-NNNN-step-SSSSSSSS/`` (step S of stage N's fine-tune)::

    model.safetensors   the model as it stands: factors of the modules replaced so far, every
                        other tensor (written by ``save_compressed``: tied tensors stored once)
    fastfactor.json     its manifest: which modules are replaced, their class and factor_config,
                        the sha256 of model.safetensors
    state.json          what the rest of the run depends on (see :mod:`fastfactor.compress.resume`)
    train_state.pt      mid-fine-tune checkpoints only: optimizer / scheduler state, step, losses
    checkpoint.json     format version, kind, stage, step, final, and the sha256 of every file above

Checkpoints are ordered by (stage, step), a finished stage after all of its steps
(:func:`list_checkpoints`); :func:`prune_checkpoints` keeps the newest.

Safety: a checkpoint directory is built under a ``.tmp-`` name and renamed into place only when
complete (:func:`fastfactor._io.atomic_directory`), so a crash — even ``SIGKILL`` — never leaves
a checkpoint that looks valid; older checkpoints are removed only after the new one is in place.
Reading (:func:`read_checkpoint`, :func:`load_model_state`) checks every file's sha256, the format
versions, the entries of ``state.json``, and the tensor names, shapes and dtypes and the module
classes against the model; each failure is a ``ValueError`` naming the file and what is wrong.

Fingerprints (:func:`model_fingerprint`, :func:`data_fingerprint`) identify the uncompressed model
and the data a checkpoint belongs to. :func:`prepare_output` / :func:`output_in_use` guard the
command line's ``--out`` directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import _io
from .. import distributed as D
from . import io as _cio
from .io import MANIFEST, WEIGHTS

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"  #: sub-directory of a run's output directory
STATE = "state.json"
INDEX = "checkpoint.json"
TRAIN_STATE = "train_state.pt"  #: optimizer / scheduler / step / losses of an unfinished fine-tune
KIND = "fastfactor-stage-checkpoint"
_STAGE_RE = re.compile(r"^stage-(\d{4,})(?:-step-(\d{8,}))?$")


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

def write_checkpoint(path: str, model: nn.Module, state: dict, config: dict,
                     train_state: Optional[dict] = None) -> str:
    """Write one checkpoint directory ``path`` atomically (it replaces an existing one): the model
    (``save_compressed``), ``state`` as ``state.json``, ``train_state`` (when given) as
    ``train_state.pt`` (a mid-fine-tune checkpoint: ``state`` has ``in_progress``), and the index
    with every file's sha256. ``config`` goes into the manifest."""
    step = state["in_progress"]["step"] if "in_progress" in state else None
    with _io.atomic_directory(path, replace=True) as tmp:
        _cio.save_compressed(model, tmp, compression=config)  # looked up at call time (tests patch it)
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
            "format_version": CHECKPOINT_FORMAT_VERSION, "kind": KIND, "stage": state["stage"],
            "step": step, "final": state["final"], "files": files,
        })
    return path


def prune_checkpoints(directory: str, keep_last: int = 1, keep: Optional[str] = None) -> None:
    """Remove all but the newest ``keep_last`` checkpoints in ``directory`` (never ``keep``), and
    the temporaries left there by killed writers."""
    keep = None if keep is None else os.path.abspath(keep)
    for old in list_checkpoints(directory)[: -max(1, int(keep_last))]:
        if os.path.abspath(old) != keep:
            shutil.rmtree(old, ignore_errors=True)
    _io.remove_stale_temporaries(directory)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def read_checkpoint(path) -> dict:
    """Validate the stage directory ``path`` (index, checksums, versions) and return its state."""
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
            try:
                with torch.device("meta"):
                    probe = cls(**entry["factor_config"])
            except (RuntimeError, NotImplementedError):  # a constructor that computes (2:4 packing): on the CPU
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

    from .io import load_compressed, read_manifest
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

def check_out_outside_model(out, model) -> None:
    """``fastfactor compress``: ``--out`` must be neither ``--model`` nor inside it (symlinks
    resolved), whatever ``--overwrite`` says: the run would overwrite or mix with the original."""
    o, m = os.path.realpath(os.fspath(out)), os.path.realpath(os.fspath(model))
    if o == m or o.startswith(m.rstrip(os.sep) + os.sep):
        where = "is --model itself" if o == m else "is inside --model"
        raise ValueError(
            f"--out: {os.fspath(out)} {where} ({os.fspath(model)}); the outputs would overwrite or mix with the "
            "original model — choose a directory outside it"
        )


def remove_checkpoints(directory) -> None:
    """After a successful run: delete its checkpoints in ``directory`` (``OUT/checkpoints``: the
    stage directories and temporaries), and the directory itself when nothing else is left."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return
    from .fitcache import list_fits

    for p in list_checkpoints(directory) + list_fits(directory):  # fits: the autoencoder's cached fits
        shutil.rmtree(p)
    _io.remove_stale_temporaries(directory)
    try:
        os.rmdir(directory)
    except OSError:  # something that is not ours is in there
        pass


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
            from .fitcache import list_fits

            if not list_fits(os.path.join(out, name)):  # nor cached fits of an interrupted first stage
                continue
        used.append(name)
    return used


def check_output(out, model=None, resume=None, overwrite: bool = False) -> None:
    """The refusals of :func:`prepare_output`, reading only the file system (nothing is written, no
    model is loaded): ``--out`` inside or equal to ``--model`` (even with ``--overwrite``), a file,
    ``--overwrite`` with ``--resume``, an ``OUT`` holding another run without either."""
    if model is not None:
        check_out_outside_model(out, model)
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out: expected a directory, got the file {out}")
    if resume is not None:
        if overwrite:
            raise ValueError("--overwrite: cannot be combined with --resume (resume keeps the run's checkpoints)")
        return
    used = output_in_use(out)
    if used and not overwrite:
        raise ValueError(
            f"--out: {out} already holds files of another run ({', '.join(used[:6])}"
            f"{', ...' if len(used) > 6 else ''}); pass --resume to continue that run, --overwrite to "
            "replace it, or choose another directory"
        )


def prepare_output(out, resume=None, overwrite: bool = False, model=None):
    """``(checkpoint_dir, resume_from)`` for ``fastfactor compress --out OUT [--resume [DIR]]
    [--overwrite]`` after :func:`check_output`. A fresh run refuses an ``OUT`` that holds anything
    of an earlier run (so nothing is overwritten by accident); ``--resume`` (``""``: from ``OUT``
    itself) continues it; ``--overwrite`` deletes ``OUT/checkpoints`` and lets the new run replace
    the files. ``model``: the ``--model`` directory, which ``OUT`` must not be or be inside."""
    check_output(out, model, resume, overwrite)
    out = os.path.abspath(os.fspath(out))
    ckdir = os.path.join(out, CHECKPOINTS)
    if resume is not None:
        return ckdir, (resume or out)
    if overwrite and D.is_main_process() and os.path.isdir(ckdir):
        shutil.rmtree(ckdir)
    D.barrier()
    return ckdir, None


__all__ = [
    "CHECKPOINT_FORMAT_VERSION", "CHECKPOINTS", "STATE", "INDEX", "TRAIN_STATE", "KIND",
    "model_fingerprint", "data_fingerprint", "stage_dirname", "list_checkpoints", "resolve_resume",
    "write_checkpoint", "prune_checkpoints", "read_checkpoint", "load_model_state", "output_in_use",
    "prepare_output", "check_output", "check_out_outside_model", "remove_checkpoints",
]
