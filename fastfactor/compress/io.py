"""Saving and loading compressed models.

A saved directory holds

* ``config.json``: the Hugging Face config (when the model has one);
* ``model.safetensors``: every tensor of the state dict, factors included, in their own dtype
  (tied tensors — e.g. GPT-2's ``lm_head.weight`` and ``wte.weight`` — stored once);
* ``fastfactor.json``: the manifest — format version, model class, the compression config, and
  for every replaced module its qualified name, layer class, method, ``factor_config`` (the
  constructor arguments: shapes, rank / blocks), real ratio and weight parameters; the tied-key
  map; and the sha256 of each weight file.

:func:`load_compressed` rebuilds the model skeleton from the config, swaps in each factorized
module built directly from its ``factor_config`` (no dense weight is ever factorized again),
checks each file's sha256 and loads the tensors with ``assign=True``, so the round trip is
bit-exact (same values, same dtypes). Every file is written through
:func:`fastfactor._io.atomic_write` (temporary name, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch
from torch import nn

from .. import _io
from .._io import atomic_write_bytes, atomic_write_text, sha256_file  # noqa: F401 - also re-exported here
from ..layers.base import FactorizedLinear
from .targets import compressed_modules, set_module  # noqa: F401 - compressed_modules re-exported

MANIFEST = "fastfactor.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def build_manifest(model: nn.Module, compression: Optional[dict] = None) -> dict:
    mods = []
    for name, mod in compressed_modules(model):
        mods.append({
            "name": name,
            "class": type(mod).__name__,
            "module": type(mod).__module__,
            "method": mod.method,
            "in_features": mod.in_features,
            "out_features": mod.out_features,
            "factor_config": mod.factor_config(),
            "ratio": mod.ratio,
            "num_weight_params": mod.num_weight_params,
        })
    return {
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "model_module": type(model).__module__,
        "compression": compression,
        "modules": mods,
    }


def save_compressed(model: nn.Module, path, compression: Optional[dict] = None, report: Optional[dict] = None,
                    tokenizer=None) -> str:
    """Write ``model`` (with its factorized modules) to the directory ``path``; returns the path.

    compression: the ``CompressionConfig`` as a dict, recorded in the manifest (optional);
    report: a compression report, written as ``report.json`` beside it (optional);
    tokenizer: a Hugging Face tokenizer / processor saved beside the model (``save_pretrained``), so
    ``pipeline(model=path)`` and ``AutoTokenizer.from_pretrained(path)`` work (optional).

    A Hugging Face model's ``config.json`` gets the fastfactor ``quantization_config`` and the
    weights file a zero-size tripwire per factorized module (see :mod:`fastfactor.hf`), so
    ``AutoModel*.from_pretrained(path)`` rebuilds the compressed model once fastfactor is imported,
    and fails (instead of initializing the layers at random) without it.
    """
    from .. import hf
    from safetensors.torch import save

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    sd = model.state_dict()
    tensors, tied, seen = {}, {}, {}
    for k, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            tied[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = t.detach().cpu().contiguous()
    manifest = build_manifest(model, compression)
    manifest["tied"] = tied
    if getattr(model, "config", None) is not None:
        hf.mark_compressed(model, compression)
        tensors.update(hf.tripwires(model))
    blob = save(tensors, metadata={"format": "pt", "producer": "fastfactor"})
    atomic_write_bytes(os.path.join(path, WEIGHTS), blob)
    files = {WEIGHTS: hashlib.sha256(blob).hexdigest()}  #: every file written here, with its sha256
    texts = {}
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        texts["config.json"] = cfg.to_json_string()
    if report is not None:
        texts["report.json"] = json.dumps(report, indent=2, default=str)
    for name, text in texts.items():
        atomic_write_text(os.path.join(path, name), text)
        files[name] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if tokenizer is not None:
        for name in _io.save_pretrained_atomic(tokenizer, path):
            files.setdefault(name, sha256_file(os.path.join(path, name)))
    manifest["files"] = files
    atomic_write_text(os.path.join(path, MANIFEST), json.dumps(manifest, indent=2))
    return path


def read_manifest(path) -> dict:
    mpath = os.path.join(os.fspath(path), MANIFEST)
    if not os.path.isfile(mpath):
        raise ValueError(f"path: expected a directory written by save_compressed (with {MANIFEST}), got {os.fspath(path)!r}")
    m = _io.read_json(mpath, "manifest")
    _io.check_format_version(mpath, m.get("format_version"), FORMAT_VERSION, "manifest")
    check_manifest(mpath, m)
    return m


def check_manifest(mpath: str, m: dict) -> None:
    """The entries every reader relies on: ``files`` (``{name: sha256}``, the weights included) and
    ``modules`` (a list of objects with ``name``, ``class`` and ``factor_config``); a
    ``ValueError`` naming the file and the field otherwise."""
    if "files" not in m:
        raise ValueError(f"{mpath}: no 'files' entry (the sha256 of every file); the manifest is incomplete, "
                         "so nothing could be verified")
    files = m["files"]
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ValueError(f"{mpath}: 'files': expected a {{name: sha256}} map, got {str(files)[:80]}")
    if WEIGHTS not in files:
        raise ValueError(f"{mpath}: 'files' does not list {WEIGHTS} (lists {sorted(files)})")
    if "modules" not in m:
        raise ValueError(f"{mpath}: no 'modules' entry (the replaced modules)")
    if not isinstance(m["modules"], list):
        raise ValueError(f"{mpath}: 'modules': expected a list of module entries, got {type(m['modules']).__name__}")
    for i, entry in enumerate(m["modules"]):
        if not isinstance(entry, dict):
            raise ValueError(f"{mpath}: modules[{i}]: expected an object, got {type(entry).__name__}")
        for key, kind in (("name", str), ("class", str), ("factor_config", dict)):
            if key not in entry:
                raise ValueError(f"{mpath}: modules[{i}] has no {key!r}")
            if not isinstance(entry[key], kind):
                raise ValueError(f"{mpath}: modules[{i}].{key}: expected a {kind.__name__}, got {entry[key]!r}")


def _skeleton(path, manifest):
    import transformers

    if "model_class" not in manifest:
        raise ValueError(f"{os.path.join(path, MANIFEST)}: no 'model_class' entry; pass the model skeleton to "
                         "load_compressed(path, model=...)")
    cls = getattr(transformers, manifest["model_class"], None)
    if cls is None:
        raise ValueError(
            f"model: {manifest['model_class']} is not a transformers class; pass the model skeleton "
            "to load_compressed(path, model=...)"
        )
    config = transformers.AutoConfig.from_pretrained(path)
    return cls(config)


def load_compressed(path, model: Optional[nn.Module] = None, device=None) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed`.

    model: a skeleton to fill (defaults to the transformers class named in the manifest, built
    from ``config.json``); its dense targets are replaced by the factorized modules of the
    manifest, built from their ``factor_config``.
    """
    from safetensors.torch import load_file

    from .methods import layer_classes

    path = os.fspath(path)
    manifest = read_manifest(path)
    for fname, digest in manifest["files"].items():  # every file it lists: weights, config, report, tokenizer
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath):
            raise ValueError(f"{fpath}: {'weight ' if fname == WEIGHTS else ''}file listed in the manifest is missing")
        actual = sha256_file(fpath)
        if actual != digest:
            raise ValueError(f"{fpath}: sha256 mismatch (manifest {digest}, file {actual}); the file is corrupt or was changed")
    if model is None:
        model = _skeleton(path, manifest)
    classes = layer_classes()
    mpath = os.path.join(path, MANIFEST)
    for i, entry in enumerate(manifest["modules"]):
        try:
            model.get_submodule(entry["name"])
        except AttributeError:
            raise ValueError(f"{mpath}: modules[{i}].name {entry['name']!r}: the model has no such module "
                             f"({type(model).__name__})") from None
        cls = classes.get(entry["class"])
        if cls is None:
            raise ValueError(
                f"{os.path.join(path, MANIFEST)}: module {entry['name']!r}: layer class {entry['class']} "
                f"({entry.get('method')}) is not available in this build"
            )
        try:
            new = cls(**entry["factor_config"])  # small: the factors' own size, overwritten below
        except (TypeError, ValueError) as e:
            raise ValueError(f"{os.path.join(path, MANIFEST)}: module {entry['name']!r}: bad factor_config ({e})") from e
        set_module(model, entry["name"], new)
    try:
        sd = load_file(os.path.join(path, WEIGHTS))
    except Exception as e:  # noqa: BLE001 - safetensors' own error types
        raise ValueError(f"{os.path.join(path, WEIGHTS)}: cannot read the tensors ({e}); truncated or corrupt") from e
    from .. import hf

    sd = hf.drop_tripwires(sd, [e["name"] for e in manifest["modules"]])
    for k, src in manifest.get("tied", {}).items():
        sd[k] = sd[src]
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # size mismatch: the manifest and the tensors disagree
        raise ValueError(f"{os.path.join(path, WEIGHTS)}: tensors do not fit the model: {e}") from e
    if unexpected or missing:
        raise ValueError(f"{path}: state dict mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    from ..layers.joint import link_joint

    link_joint(model)  # members of modules compressed together find their leader again
    if manifest.get("tied") and hasattr(model, "tie_weights"):
        try:
            model.tie_weights()  # share one Parameter again (the values already are the same)
        except Exception:  # noqa: BLE001 - storage is shared either way
            pass
    if device is not None:
        model.to(device)
    model.eval()
    hf.mark_compressed(model, manifest.get("compression"))
    return model
