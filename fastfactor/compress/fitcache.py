"""Module-granular checkpoints of the autoencoder's fits inside a stage, so that a run killed in the
middle of a stage's calibration keeps every fit it finished.

A stage checkpoint (:mod:`fastfactor.compress.resume`) is written only when a stage ends; with the
``offline`` schedule the whole model is one stage, and an autoencoder fit of its 36 (MiniLM) to
hundreds of modules takes minutes to hours. With a checkpoint directory, the driver therefore also
writes, while stage ``N`` is being calibrated, one file per finished fit into
``CHECKPOINT_DIR/fits-NNNN/``:

* ``module-<name>.safetensors`` — a target's fitted layer (``scope="module"``, and the start of
  ``scope="block"``): its tensors, and as metadata its layer class, ``factor_config`` and the line
  the report records for it;
* ``group-<leader>.safetensors`` — modules compressed together (``joint``): the leader's and the
  members' tensors and, per module, its class and ``factor_config``;
* ``block-<name>.safetensors`` — a transformer block after its block fit (``scope="block"``):
  every factorized parameter inside it (by name within the block) and the fit's summary.

``fits.json`` says which run they belong to: format version, stage, the compression config and the
fingerprints of the uncompressed model and of the data (as a stage checkpoint's ``state.json``).
Each file is written atomically (a temporary name, then ``os.replace``) and carries the sha256 of
its tensors in its metadata, so a ``SIGKILL`` leaves only whole files, and a file changed on disk is
refused with a ``ValueError`` naming it.

Resuming stage ``N`` (``resume=``: from stage ``N-1``'s checkpoint, or with none yet from the
checkpoint directory itself when ``N = 0``), the driver loads the modules whose file exists instead
of fitting them (and calibrates only the others: every module's input sample is drawn independently
of which other modules are sampled, :func:`fastfactor.compress.calibration.collect_inputs`), then
loads the blocks already fitted and fits the rest, each against the inputs the restored blocks
before it produce. The fits draw from no global random state (seeded row splits, Adam, dropout off),
so skipping a finished one changes nothing that follows: the result is bitwise that of an
uninterrupted run. The directory is removed once the stage's own checkpoint is written.

Only rank 0 writes; every rank reads (a shared filesystem, as for stage checkpoints), and rank 0's
factors are broadcast after a load as after a fit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import _io
from .. import distributed as D

FITS_FORMAT_VERSION = 1
FITS_KIND = "fastfactor-fit-cache"
FITS_INDEX = "fits.json"
_FITS_RE = re.compile(r"^fits-(\d{4,})$")
_META_KEY = "fastfactor"
_UNIT_KINDS = ("module", "group", "block")


def fits_dirname(stage: int) -> str:
    """``fits-NNNN``: the fit cache of stage ``NNNN``."""
    return f"fits-{int(stage):04d}"


def list_fits(directory) -> List[str]:
    """The fit-cache directories under ``directory`` (a checkpoints directory), by stage."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _FITS_RE.match(name)
        if m and os.path.isdir(os.path.join(directory, name)):
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return [p for _, p in sorted(found)]


def remove_fits(directory, upto: int) -> None:
    """Remove the fit caches of stages ``<= upto`` (their stage checkpoint holds the result); rank 0."""
    if directory is None or not D.is_main_process():
        return
    for path in list_fits(directory):
        if int(_FITS_RE.match(os.path.basename(path)).group(1)) <= upto:
            shutil.rmtree(path, ignore_errors=True)


def _unit_filename(kind: str, name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if safe != name or not safe:  # keep names unique when characters had to be replaced
        safe = f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return f"{kind}-{safe}.safetensors"


def _tensors_digest(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FitCache:
    """The fit cache of one stage (module docstring). ``directory`` is the run's checkpoints
    directory (None: caching off, every call a no-op / miss); ``write``: this run writes (it has a
    checkpoint directory); ``config`` / ``fingerprint``: the run's, checked against ``fits.json``."""

    def __init__(self, directory, stage: int, config: dict, fingerprint: dict, write: bool = True):
        self.root = None if directory is None else os.path.join(os.path.abspath(os.fspath(directory)),
                                                                 fits_dirname(stage))
        self.stage, self.config, self.fingerprint, self.write = int(stage), config, fingerprint, bool(write)
        self._checked = False
        self.loaded: List[str] = []  #: units loaded from the cache (``kind:name``), in order
        self.saved: List[str] = []  #: units written to it

    @property
    def enabled(self) -> bool:
        return self.root is not None

    # -- the run's identity -------------------------------------------------------------------

    def _check_index(self) -> bool:
        """True when the cache exists and belongs to this run; raises when it belongs to another."""
        if self.root is None or not os.path.isdir(self.root):
            return False
        if self._checked:
            return True
        ipath = os.path.join(self.root, FITS_INDEX)
        if not os.path.isfile(ipath):  # killed before the index was written: nothing was cached yet
            return False
        idx = _io.read_json(ipath, "fit cache index")
        if idx.get("kind") != FITS_KIND:
            raise ValueError(f"{ipath}: expected kind {FITS_KIND!r}, got {idx.get('kind')!r}")
        _io.check_format_version(ipath, idx.get("format_version"), FITS_FORMAT_VERSION, "fit cache")
        if idx.get("stage") != self.stage:
            raise ValueError(f"{ipath}: written for stage {idx.get('stage')}, read for stage {self.stage}")
        from .config import LEGACY_DEFAULTS

        old = {**LEGACY_DEFAULTS, **(idx.get("config") or {})}
        diff = [k for k in sorted(set(self.config) | set(old)) if self.config.get(k) != old.get(k)]
        if diff:
            shown = ", ".join(f"{k}: cache {old.get(k)!r}, now {self.config.get(k)!r}" for k in diff[:6])
            raise ValueError(f"{ipath}: written with another compression config ({shown}); resume with the same "
                             "settings or remove the directory")
        for what in ("model", "data"):
            if (idx.get("fingerprint") or {}).get(what) != self.fingerprint.get(what):
                raise ValueError(f"{ipath}: written for another {what}; resume with the uncompressed model and the "
                                 "data of the interrupted run, or remove the directory")
        self._checked = True
        return True

    def _ensure_index(self) -> None:
        ipath = os.path.join(self.root, FITS_INDEX)
        if os.path.isfile(ipath):
            return
        os.makedirs(self.root, exist_ok=True)
        _io.atomic_write_json(ipath, {"format_version": FITS_FORMAT_VERSION, "kind": FITS_KIND, "stage": self.stage,
                                      "config": self.config, "fingerprint": self.fingerprint})
        self._checked = True

    # -- one unit -----------------------------------------------------------------------------

    def _read(self, kind: str, name: str):
        if not self._check_index():
            return None
        path = os.path.join(self.root, _unit_filename(kind, name))
        if not os.path.isfile(path):
            return None
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {})[_META_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors / json raise their own types
            raise ValueError(f"{path}: cannot read the cached fit ({type(e).__name__}: {e}); the file is corrupt, "
                             "remove it to refit that unit") from e
        if meta.get("kind") != kind or meta.get("name") != name:
            raise ValueError(f"{path}: holds the {meta.get('kind')} {meta.get('name')!r}, expected the {kind} {name!r}")
        if _tensors_digest(tensors) != meta.get("sha256"):
            raise ValueError(f"{path}: sha256 of the tensors does not match the one recorded; the file is corrupt, "
                             "remove it to refit that unit")
        return tensors, meta

    def _store(self, kind: str, name: str, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
        self.saved.append(f"{kind}:{name}")
        if self.root is not None and self.write and D.is_main_process():
            self._write(kind, name, tensors, meta)
        from . import faults

        faults.test_fault_hook(self.stage, fit=len(self.saved))  # test-only; a no-op unless set

    def _write(self, kind: str, name: str, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
        from safetensors.torch import save

        self._ensure_index()
        tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
        meta = dict(meta, kind=kind, name=name, sha256=_tensors_digest(tensors))
        data = save(tensors, metadata={_META_KEY: json.dumps(meta)})
        _io.atomic_write_bytes(os.path.join(self.root, _unit_filename(kind, name)), data)

    def has(self, kind: str, name: str) -> bool:
        """Whether the ``kind`` (``module`` / ``block``) ``name`` is cached (its file exists; read
        and checked by the load)."""
        if kind not in _UNIT_KINDS:
            raise ValueError(f"kind: expected one of {list(_UNIT_KINDS)}, got {kind!r}")
        return self._check_index() and os.path.isfile(os.path.join(self.root, _unit_filename(kind, name)))

    # -- modules ------------------------------------------------------------------------------

    def load_module(self, name: str, like: nn.Module) -> Optional[tuple]:
        """``(module, report line)`` of target ``name`` when its fit is cached, else None. ``like``
        (the dense module it replaces) gives the device and the train / eval mode."""
        got = self._read("module", name)
        if got is None:
            return None
        tensors, meta = got
        from .methods import layer_classes

        path = os.path.join(self.root, _unit_filename("module", name))
        cls = layer_classes().get(meta.get("class"))
        if cls is None:
            raise ValueError(f"{path}: layer class {meta.get('class')!r} is not available in this build")
        try:
            with torch.device("meta"):
                new = cls(**meta["factor_config"])
            missing, unexpected = new.load_state_dict(tensors, strict=False, assign=True)
        except (TypeError, ValueError, RuntimeError, KeyError) as e:
            raise ValueError(f"{path}: the cached tensors do not fit a {meta.get('class')} ({e})") from e
        if missing or unexpected:
            raise ValueError(f"{path}: state dict mismatch: missing {missing[:6]}, unexpected {unexpected[:6]}")
        dev = next((t.device for t in like.parameters()), torch.device("cpu"))
        new = new.to(dev)
        new.train(like.training)
        self.loaded.append(f"module:{name}")
        return new, meta.get("info")

    def save_module(self, name: str, module: nn.Module, info: str) -> None:
        """Cache target ``name``'s fitted layer (rank 0; a no-op without a checkpoint directory)."""
        self._store("module", name, dict(module.state_dict()),
                    {"class": type(module).__name__, "factor_config": module.factor_config(), "info": info})

    # -- modules compressed together ----------------------------------------------------------

    def load_group(self, names: List[str], like: Dict[str, nn.Module]) -> Optional[Dict[str, nn.Module]]:
        """``{name: module}`` of the joint group led by ``names[0]`` (leader, then its members,
        linked) when its fit is cached, else None. ``like``: the modules they replace (device, mode)."""
        got = self._read("group", names[0])
        if got is None:
            return None
        tensors, meta = got
        from ..layers.joint import JointMemberLinear
        from .methods import layer_classes

        path = os.path.join(self.root, _unit_filename("group", names[0]))
        entries = meta.get("modules") or []
        if [e.get("name") for e in entries] != list(names):
            raise ValueError(f"{path}: holds the group {[e.get('name') for e in entries]}, expected {list(names)}")
        out: Dict[str, nn.Module] = {}
        for i, e in enumerate(entries):
            cls = layer_classes().get(e.get("class"))
            if cls is None:
                raise ValueError(f"{path}: layer class {e.get('class')!r} is not available in this build")
            sd = {k.partition(".")[2]: t for k, t in tensors.items() if k.partition(".")[0] == str(i)}
            try:
                with torch.device("meta"):
                    m = cls(**e["factor_config"])
                missing, unexpected = m.load_state_dict(sd, strict=False, assign=True)
            except (TypeError, ValueError, RuntimeError, KeyError) as err:
                raise ValueError(f"{path}: the cached tensors of {e.get('name')!r} do not fit a {e.get('class')} "
                                 f"({err})") from err
            if missing or unexpected:
                raise ValueError(f"{path}: {e.get('name')!r}: missing {missing[:6]}, unexpected {unexpected[:6]}")
            old = like[e["name"]]
            m = m.to(next((t.device for t in old.parameters()), torch.device("cpu")))
            m.train(old.training)
            out[e["name"]] = m
        leader = out[names[0]]
        for m in out.values():
            if isinstance(m, JointMemberLinear):
                m.link(leader)
        self.loaded.append(f"group:{names[0]}")
        return out

    def save_group(self, modules: Dict[str, nn.Module], info: str) -> None:
        """Cache a joint group's fitted modules (``{name: module}``, the leader first; rank 0)."""
        tensors = {f"{i}.{k}": t for i, m in enumerate(modules.values()) for k, t in m.state_dict().items()}
        entries = [{"name": n, "class": type(m).__name__, "factor_config": m.factor_config()}
                   for n, m in modules.items()]
        self._store("group", next(iter(modules)), tensors, {"modules": entries, "info": info})

    # -- blocks -------------------------------------------------------------------------------

    @staticmethod
    def _block_params(block: nn.Module) -> Dict[str, torch.Tensor]:
        from .autoencoder import factor_parameters

        ids = {id(p) for p in factor_parameters(block)}
        return {n: p for n, p in block.named_parameters() if id(p) in ids}

    def load_block(self, name: str, block: nn.Module) -> Optional[dict]:
        """Put block ``name``'s cached fit into ``block`` (in place) and return its summary; None
        when it is not cached."""
        got = self._read("block", name)
        if got is None:
            return None
        tensors, meta = got
        params = self._block_params(block)
        path = os.path.join(self.root, _unit_filename("block", name))
        if set(tensors) != set(params):
            raise ValueError(f"{path}: cached parameters {sorted(tensors)[:4]} do not match the block's "
                             f"factorized parameters {sorted(params)[:4]}")
        for k, p in params.items():
            if tuple(tensors[k].shape) != tuple(p.shape) or tensors[k].dtype != p.dtype:
                raise ValueError(f"{path}: {k!r} is {tuple(tensors[k].shape)} {tensors[k].dtype}, the block's "
                                 f"{tuple(p.shape)} {p.dtype}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[k])
        self.loaded.append(f"block:{name}")
        return meta.get("info")

    def save_block(self, name: str, block: nn.Module, info: dict) -> None:
        """Cache block ``name``'s fitted factorized parameters and its fit summary (rank 0)."""
        self._store("block", name, self._block_params(block), {"info": info})


__all__ = ["FitCache", "fits_dirname", "list_fits", "remove_fits", "FITS_FORMAT_VERSION", "FITS_INDEX"]
