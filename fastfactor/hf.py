"""Hugging Face integration: compressed models load back as compressed models, never as random weights.

A model compressed by fastfactor (the driver, :func:`fastfactor.factorize_`, or
:func:`fastfactor.load_compressed`) carries a ``quantization_config`` in its Hugging Face config::

    "quantization_config": {
      "quant_method": "fastfactor", "format_version": 1,
      "modules": [{"name": "encoder.layer.0.attention.self.query", "class": "LowRankLinear",
                   "factor_config": {"in_features": 384, "out_features": 384, "rank": 96, "bias": true},
                   "original_class": "torch.nn.modules.linear.Linear"}, ...]
    }

so that ``config.json`` written by :func:`fastfactor.save_compressed` *or* by the model's own
``save_pretrained`` (and by sentence-transformers' ``save``, which calls it) describes every
factorized module. Importing fastfactor registers, through transformers' public
``register_quantization_config`` / ``register_quantizer``, a quantizer for ``quant_method
"fastfactor"`` (:class:`FastFactorHfQuantizer`). ``AutoModel*.from_pretrained``, ``pipeline(...)``
and ``SentenceTransformer(...)`` then build the skeleton, let the quantizer swap each listed module
for its factorized class (built on the meta device from its ``factor_config``: no dense weight is
materialized or factorized again), and load the factors from ``model.safetensors``: the reloaded
model is bitwise the saved one.

**Never random weights.** Every checkpoint written by fastfactor also holds, per factorized module
``M``, a zero-size tensor under the dense key ``M.weight`` (a *tripwire*). With fastfactor imported
the quantizer declares those keys expected-and-ignored. Without it, transformers warns that it does
not know ``quant_method "fastfactor"``, builds dense layers, and finds ``M.weight`` of shape ``(0,)``
where it expects ``(out, in)``: ``from_pretrained`` raises (transformers refuses mismatched sizes
unless ``ignore_mismatched_sizes=True`` is passed explicitly), instead of silently initializing the
compressed layers at random. Before loading, the quantizer also checks that the checkpoint holds
every tensor of every factorized module and raises ``ValueError`` naming the missing keys.

transformers is imported lazily: ``import fastfactor`` registers the quantizer at once when
transformers is already imported, else from an import hook that runs the moment
``transformers.quantizers.auto`` is first imported (``register()`` does it explicitly).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import json
import os
import re
import sys
from typing import Dict, List, Optional

import torch
from torch import nn

QUANT_METHOD = "fastfactor"
FORMAT_VERSION = 1
#: key suffix of the zero-size tripwire tensor written for every factorized module
TRIPWIRE = "weight"

_HOOK_TARGET = "transformers.quantizers.auto"
_registered: Dict[str, type] = {}


# --------------------------------------------------------------------------------------------
# what a compressed model records
# --------------------------------------------------------------------------------------------

def qualified_class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def module_entries(model: nn.Module) -> List[dict]:
    """``[{name, class, method, factor_config, original_class}]`` for the outermost factorized
    modules of ``model``, in model order (what ``quantization_config["modules"]`` holds)."""
    from .compress.targets import compressed_modules

    return [
        {
            "name": name,
            "class": type(mod).__name__,
            "method": mod.method,
            "factor_config": mod.factor_config(),
            "original_class": getattr(mod, "original_class", None),
        }
        for name, mod in compressed_modules(model)
    ]


def tripwires(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{"<module>.weight": zero-size uint8 tensor}`` for every factorized module without its own
    ``weight`` entry: what makes a loader that does not know fastfactor fail on a size mismatch."""
    from .compress.targets import compressed_modules

    out = {}
    for name, mod in compressed_modules(model):
        key = f"{name}.{TRIPWIRE}" if name else TRIPWIRE
        if TRIPWIRE not in mod.state_dict():
            out[key] = torch.zeros(0, dtype=torch.uint8)
    return out


def drop_tripwires(state_dict: dict, module_names) -> dict:
    """``state_dict`` without the tripwire entries of ``module_names`` (zero-size ``<name>.weight``)."""
    wires = {f"{n}.{TRIPWIRE}" if n else TRIPWIRE for n in module_names}
    return {k: v for k, v in state_dict.items() if not (k in wires and v.numel() == 0)}


def is_compressed_dir(path) -> Optional[str]:
    """Why ``path`` holds a fastfactor-compressed model (a sentence), or ``None``."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "fastfactor.json")):
        return f"{path} holds fastfactor.json (written by save_compressed)"
    cpath = os.path.join(path, "config.json")
    if os.path.isfile(cpath):
        try:
            with open(cpath, encoding="utf-8") as f:
                qc = (json.load(f) or {}).get("quantization_config")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
            return f"{cpath} has quantization_config.quant_method 'fastfactor'"
    return None


def mark_compressed(model: nn.Module, compression: Optional[dict] = None) -> nn.Module:
    """Record ``model``'s factorized modules in ``model.config.quantization_config`` and attach
    the quantizer, so the model's own ``save_pretrained`` writes a checkpoint that reloads as the
    compressed model (and a tripwire for loaders without fastfactor). A no-op for models without
    a Hugging Face config or without factorized modules; returns ``model``."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_json_string") or not module_entries(model):
        return model
    try:
        register()
    except ImportError:  # pragma: no cover - transformers absent: nothing to integrate with
        return model
    old = getattr(cfg, "quantization_config", None)
    if old is not None and _quant_method(old) not in (None, QUANT_METHOD):
        raise ValueError(
            f"model: already quantized with {_quant_method(old)!r}; fastfactor cannot record its layers "
            "in the same config.quantization_config"
        )
    if compression is None and old is not None:
        compression = _get(old, "compression")
    qc = _registered["config"](modules=module_entries(model), compression=compression)
    cfg.quantization_config = qc
    try:
        model.hf_quantizer = _registered["quantizer"](qc, pre_quantized=True)
    except Exception:  # pragma: no cover - a model class refusing attributes
        pass
    return model


def unmark(model: nn.Module) -> nn.Module:
    """Remove what :func:`mark_compressed` added (after a merge back to dense layers)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and _quant_method(getattr(cfg, "quantization_config", None)) == QUANT_METHOD:
        del cfg.quantization_config
    hq = getattr(model, "hf_quantizer", None)
    if hq is not None and _quant_method(getattr(hq, "quantization_config", None)) == QUANT_METHOD:
        del model.hf_quantizer
        for attr in ("is_quantized", "quantization_method"):
            if attr in model.__dict__:
                delattr(model, attr)
        if cfg is not None and getattr(cfg, "_is_quantized", False):
            cfg._is_quantized = False
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every factorized module of ``model`` (in place) by its dense original and drop the
    fastfactor ``quantization_config``; returns ``model`` (a bare factorized layer passed as
    ``model`` returns its dense original).

    Each module becomes :meth:`~fastfactor.FactorizedLinear.to_original`: the class recorded when it
    was swapped in (``original_class``; ``nn.Linear`` when unknown), holding ``W = dense_weight()``
    (``(out, in)``; transposed ``(in, out)`` for ``Conv1D``) and the same bias. The merged model's
    output equals the compressed one's up to the rounding of forming the product ``W``, and it saves
    and loads with plain ``save_pretrained`` / ``from_pretrained`` (no fastfactor needed)."""
    from .compress.targets import compressed_modules
    from .compress.targets import set_module
    from .layers.base import FactorizedLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, FactorizedLinear):
        return model.to_original()
    for name, mod in compressed_modules(model):
        set_module(model, name, mod.to_original())
    unmark(model)
    return model


def _get(obj, key, default=None):
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _quant_method(qc) -> Optional[str]:
    m = _get(qc, "quant_method")
    return getattr(m, "value", m)


# --------------------------------------------------------------------------------------------
# swapping modules into a skeleton
# --------------------------------------------------------------------------------------------

def resolve_name(model: nn.Module, name: str) -> Optional[str]:
    """The qualified name in ``model`` of a module saved as ``name`` by a model with or without the
    base-model prefix (``bert.encoder...`` saved by ``BertForSequenceClassification`` is
    ``encoder...`` in ``BertModel`` and the reverse); ``None`` when ``model`` has no such module."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    cands = [name]
    if prefix and name.startswith(prefix + "."):
        cands.append(name[len(prefix) + 1:])
    if prefix:
        cands.append(f"{prefix}.{name}")
    for c in cands:
        try:
            model.get_submodule(c)
            return c
        except AttributeError:
            continue
    return None


def _head_only(model: nn.Module, name: str) -> bool:
    """True when ``name`` lives in a task head that a base model loaded from a head checkpoint
    drops anyway (transformers drops the head's tensors the same way)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, "base_model", model)
    return bool(prefix) and base is model and not name.startswith(prefix + ".")


def swap_in(model: nn.Module, entries: List[dict], where: str = "quantization_config", device="meta") -> List[tuple]:
    """Replace each listed module of ``model`` by its factorized class built from ``factor_config``
    (on ``device``); returns ``[(saved name, name in model, module)]``. Raises ``ValueError`` naming
    ``where`` and the entry for an unknown class, a bad ``factor_config`` or a missing module."""
    from .compress.methods import layer_classes
    from .compress.targets import set_module

    classes = layer_classes()
    done = []
    if not isinstance(entries, list):
        raise ValueError(f"{where}: expected 'modules' to be a list, got {type(entries).__name__}")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not {"name", "class", "factor_config"} <= set(e):
            raise ValueError(f"{where}: modules[{i}]: expected an object with 'name', 'class' and 'factor_config', got {e!r}")
        cls = classes.get(e["class"])
        if cls is None:
            raise ValueError(f"{where}: module {e['name']!r}: layer class {e['class']!r} is not available in this build")
        target = resolve_name(model, e["name"])
        if target is None:
            if _head_only(model, e["name"]):
                continue
            raise ValueError(
                f"{where}: module {e['name']!r} is not in {type(model).__name__}; load the checkpoint with the "
                "model class that saved it"
            )
        try:
            try:
                with torch.device(device):
                    new = cls(**e["factor_config"])
            except (RuntimeError, NotImplementedError):  # a constructor that cannot run on meta (2:4 packing)
                with torch.device("cpu"):
                    new = cls(**e["factor_config"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: module {e['name']!r}: bad factor_config ({err})") from err
        old = set_module(model, target, new)
        if e.get("original_class"):
            new.original_class = e["original_class"]
        elif not hasattr(new, "original_class") or new.original_class is None:
            new.original_class = qualified_class_name(type(old))
        done.append((e["name"], target, new))
    if any(type(m).__name__ == "JointMemberLinear" for _, _, m in done):
        from .layers.joint import link_joint

        try:
            link_joint(model)  # members of modules compressed together find their leader
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    return done


def _checkpoint_keys(files) -> set:
    from safetensors import safe_open

    keys = set()
    for f in files or []:
        if str(f).endswith(".safetensors"):
            with safe_open(f, framework="pt") as h:
                keys.update(h.keys())
        else:  # a torch .bin checkpoint: cannot list keys cheaply; trust the loader's report
            return set()
    return keys


# --------------------------------------------------------------------------------------------
# registration with transformers
# --------------------------------------------------------------------------------------------

def register() -> None:
    """Register ``quant_method "fastfactor"`` with transformers (idempotent)."""
    if _registered:
        return
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class FastFactorConfig(QuantizationConfigMixin):
        """``quantization_config`` of a fastfactor-compressed model (see :mod:`fastfactor.hf`).

        modules: ``[{name, class, method, factor_config, original_class}]``, one per factorized
        module; compression: the ``CompressionConfig`` as a dict, or None."""

        def __init__(self, modules=None, compression=None, format_version: int = FORMAT_VERSION,
                     quant_method: str = QUANT_METHOD, **kwargs):
            if quant_method != QUANT_METHOD:
                raise ValueError(f"quant_method: expected {QUANT_METHOD!r}, got {quant_method!r}")
            if not isinstance(format_version, int) or format_version > FORMAT_VERSION:
                raise ValueError(
                    f"quantization_config.format_version: expected an int <= {FORMAT_VERSION} (this fastfactor), "
                    f"got {format_version!r}; upgrade fastfactor"
                )
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.modules = list(modules or [])
            self.compression = compression
            for k, v in kwargs.items():  # unknown keys from a newer writer: kept, round-tripped
                setattr(self, k, v)

    class FastFactorHfQuantizer(HfQuantizer):
        """Loads fastfactor's factorized modules inside ``from_pretrained`` (see :mod:`fastfactor.hf`)."""

        requires_calibration = True  # a dense checkpoint is not compressed on load: use fastfactor.compress

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            qc = self.quantization_config
            done = swap_in(model, qc.modules, where="config.json: quantization_config")
            ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
            for saved, target, _ in done:
                for n in {saved, target}:
                    ignore.add(r"(^|\.)" + re.escape(f"{n}.{TRIPWIRE}") + "$")
            model._keys_to_ignore_on_load_unexpected = ignore
            for _, target, mod in done:
                # transformers' _init_weights of a parent may read `child.weight` directly (GPT-2's
                # `module.c_proj.weight`); the factors come from the checkpoint (checked below), so the
                # factorized module and its parent are marked initialized
                mod._is_hf_initialized = True
                parent = target.rpartition(".")[0]
                model.get_submodule(parent)._is_hf_initialized = True
            keys = _checkpoint_keys(checkpoint_files)
            if keys:
                missing = []
                for saved, target, mod in done:
                    for k in mod.state_dict():
                        if f"{saved}.{k}" not in keys and f"{target}.{k}" not in keys:
                            missing.append(f"{saved}.{k}")
                if missing:
                    raise ValueError(
                        f"{checkpoint_files[0]}: the checkpoint lacks tensors of factorized modules listed in "
                        f"config.json's quantization_config: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                        "the weights file does not belong to this config"
                    )
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            # transformers refuses .half() / .float() on "quantized" models; factorized layers are
            # ordinary floating-point modules, so the model stays castable like a dense one
            model.is_quantized = False
            return model

        def get_state_dict_and_metadata(self, model):
            from .compress.targets import compressed_modules

            if hasattr(model.config, "quantization_config"):  # the modules as they are now
                model.config.quantization_config.modules = module_entries(model)
            sd = model.state_dict()
            if compressed_modules(model):
                sd.update(tripwires(model))
            return sd, {"producer": "fastfactor"}

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return True

        @property
        def is_qat_trainable(self):
            return True

        @property
        def is_compileable(self):
            return True

        def _dequantize(self, model, dtype=None):
            return merge_and_unload(model)

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(FastFactorConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(FastFactorHfQuantizer)
    _registered["config"] = AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]
    _registered["quantizer"] = AUTO_QUANTIZER_MAPPING[QUANT_METHOD]


def __getattr__(name):  # fastfactor.hf.FastFactorConfig / FastFactorHfQuantizer, registered on first use
    key = {"FastFactorConfig": "config", "FastFactorHfQuantizer": "quantizer"}.get(name)
    if key is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register()
    return _registered[key]


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs :func:`register` right after ``transformers.quantizers.auto`` is executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _HOOK_TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                loader = spec.loader
                orig = loader.exec_module

                def exec_module(module, _orig=orig):
                    _orig(module)
                    try:
                        register()
                    except Exception as e:  # noqa: BLE001 - never break transformers' own import
                        _warn_unregistered(e)

                loader.exec_module = exec_module
                return spec
        return None


def _warn_unregistered(e: BaseException) -> None:
    import warnings

    warnings.warn(
        f"fastfactor: could not register quant_method 'fastfactor' with transformers ({type(e).__name__}: {e}); "
        "compressed checkpoints will not load through from_pretrained (fastfactor.load_compressed still works)",
        RuntimeWarning, stacklevel=2,
    )


def install_import_hook() -> None:
    """Register now if transformers' quantizer registry is loaded, else when it is first imported."""
    if _HOOK_TARGET in sys.modules:
        try:
            register()
        except Exception as e:  # noqa: BLE001 - importing fastfactor must not fail on this
            _warn_unregistered(e)
        return
    if not any(isinstance(f, _PostImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook())


__all__ = [
    "QUANT_METHOD", "register", "install_import_hook", "mark_compressed", "unmark", "module_entries",
    "tripwires", "drop_tripwires", "is_compressed_dir", "resolve_name", "swap_in",
]
