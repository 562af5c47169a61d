"""Which modules of a model the driver replaces, and how to read and swap them.

Default targets: every linear layer inside the model's transformer blocks. The blocks are the
children of the longest ``nn.ModuleList`` whose children all share one class (``encoder.layer``
in BERT, ``transformer.h`` in GPT-2, ``model.layers`` in LLaMA). Embeddings, the pooler,
classifier heads and ``lm_head`` live outside the blocks, so they are left alone unless named.

Supported layer types: ``nn.Linear`` (and subclasses), Hugging Face's ``Conv1D`` (GPT-2), whose
weight is stored transposed ``(in, out)`` with ``y = x·W + b`` — it is read as the equivalent
``(out, in)`` linear weight — and modules that are already ``FactorizedLinear``. Anything else
that a pattern names, or a module with a 2-D ``weight`` inside a block that is none of those,
raises a ``TypeError`` naming the module.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..layers.base import FactorizedLinear


def is_conv1d(mod: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (``transformers.pytorch_utils.Conv1D``): weight ``(in, out)``."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None


def is_supported_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or is_conv1d(mod)


class DenseView(nn.Module):
    """A read-only ``(out, in)`` view of a dense layer's weight and bias (no copy for ``nn.Linear``;
    a transposed copy for ``Conv1D``), which every ``from_linear`` accepts."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape


def dense_view(mod: nn.Module, name: str) -> DenseView:
    """``(out, in)`` weight and bias of a supported layer; TypeError naming ``name`` otherwise."""
    if isinstance(mod, nn.Linear):
        return DenseView(mod.weight.detach(), None if mod.bias is None else mod.bias.detach())
    if is_conv1d(mod):
        return DenseView(mod.weight.detach().t().contiguous(), None if mod.bias is None else mod.bias.detach())
    if isinstance(mod, FactorizedLinear):
        w = mod.dense_weight().detach()
        b = getattr(mod, "bias", None)
        return DenseView(w, None if b is None else b.detach())
    raise TypeError(
        f"module {name!r}: unsupported layer type {type(mod).__module__}.{type(mod).__name__}; expected "
        "nn.Linear or transformers' Conv1D (exclude it, or name other targets)"
    )


def match(name: str, pattern: str) -> bool:
    """``re:``-prefixed patterns are regular expressions (``re.fullmatch``); others fnmatch globs."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def find_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``[(qualified name, block)]`` of the transformer blocks (see the module docstring)."""
    best: Optional[Tuple[str, nn.ModuleList]] = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            classes = {type(c) for c in mod}
            if len(classes) == 1 and any(True for _ in mod[0].modules() if is_supported_linear(_)):
                if best is None or len(mod) > len(best[1]):
                    best = (name, mod)
    if best is None:
        return []
    prefix = best[0] + "." if best[0] else ""
    return [(f"{prefix}{i}", blk) for i, blk in enumerate(best[1])]


@dataclass
class Target:
    name: str  #: qualified module name
    block: Optional[str]  #: qualified name of the transformer block holding it (None outside)
    kind: str  #: "linear" or "conv1d"
    in_features: int
    out_features: int
    ratio: float


def _block_of(name: str, blocks: Sequence[str]) -> Optional[str]:
    for b in blocks:
        if name == b or name.startswith(b + "."):
            return b
    return None


def select_targets(
    model: nn.Module,
    targets: Optional[Sequence[str]] = None,
    exclude: Sequence[str] = (),
    ratio: float = 0.5,
    module_ratios: Optional[Dict[str, float]] = None,
) -> List[Target]:
    """The modules to replace, in model order, each with its ratio."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    module_ratios = module_ratios or {}
    blocks = [n for n, _ in find_blocks(model)]
    chosen: List[Tuple[str, nn.Module]] = []
    if targets is None:
        if not blocks:
            raise ValueError(
                f"targets: no transformer blocks found in {type(model).__name__} (no nn.ModuleList of "
                "identical blocks holding linear layers); pass explicit name patterns"
            )
        for name, mod in model.named_modules():
            if _block_of(name, blocks) is None or any(match(name, p) for p in exclude):
                continue
            if is_supported_linear(mod):
                chosen.append((name, mod))
            elif (
                not isinstance(mod, (nn.Embedding, FactorizedLinear))
                and isinstance(getattr(mod, "weight", None), torch.Tensor)
                and mod.weight.ndim == 2
                and not any(True for _ in mod.children())
            ):
                raise TypeError(
                    f"module {name!r}: unknown layer type {type(mod).__module__}.{type(mod).__name__} "
                    "inside a transformer block (expected nn.Linear or Conv1D); add it to `exclude` "
                    "or give explicit `targets`"
                )
    else:
        used = set()
        for name, mod in model.named_modules():
            hits = [p for p in targets if match(name, p)]
            if not hits or any(match(name, p) for p in exclude):
                continue
            used.update(hits)
            if isinstance(mod, FactorizedLinear):
                continue  # already compressed
            if not is_supported_linear(mod):
                if any(is_supported_linear(c) for c in mod.modules()):
                    continue  # a container matched by a broad glob: its linear children are matched too
                raise TypeError(
                    f"module {name!r}: unsupported layer type {type(mod).__module__}.{type(mod).__name__} "
                    f"(matched by {hits[0]!r}); expected nn.Linear or Conv1D"
                )
            chosen.append((name, mod))
        unused = [p for p in targets if p not in used]
        if unused:
            raise ValueError(f"targets: pattern(s) {unused} matched no module of {type(model).__name__}")
    if not chosen:
        raise ValueError(f"targets: nothing to compress in {type(model).__name__} (every candidate excluded)")
    out = []
    for name, mod in chosen:
        r = next((v for p, v in module_ratios.items() if match(name, p)), ratio)
        view = dense_view(mod, name)
        out.append(
            Target(
                name=name,
                block=_block_of(name, blocks),
                kind="conv1d" if is_conv1d(mod) else "linear",
                in_features=view.in_features,
                out_features=view.out_features,
                ratio=r,
            )
        )
    return out


def compressed_modules(model: nn.Module):
    """``[(name, module)]`` of the factorized modules, outermost only."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, FactorizedLinear) and not any(name.startswith(n + ".") for n, _ in out):
            out.append((name, mod))
    return out


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at ``name``; returns the old one. A factorized module put in place of a
    dense one records the dense module's class in ``new.original_class`` (qualified name, e.g.
    ``transformers.pytorch_utils.Conv1D``; carried over from a factorized ``old``), which
    :func:`fastfactor.merge_and_unload` restores."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    if isinstance(new, FactorizedLinear) and getattr(new, "original_class", None) is None:
        cls = getattr(old, "original_class", None) if isinstance(old, FactorizedLinear) else None
        new.original_class = cls or f"{type(old).__module__}.{type(old).__qualname__}"
    setattr(parent, child, new)
    return old
