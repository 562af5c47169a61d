"""The common base of every factorized linear module.

A factorized module stands in for an ``nn.Linear(in_features, out_features)``: same input and
output shapes, ``y = x·Wᵀ + b`` with ``W`` represented by factors. Every subclass provides

* ``from_linear(linear, ...)``: build the factors from a dense layer (``nn.Linear`` or anything
  with a ``weight (out, in)`` and optional ``bias``);
* ``dense_weight()``: the ``(out, in)`` matrix the factors represent;
* ``to_linear()``: an ``nn.Linear`` with that weight and the same bias;
* ``factor_config()``: the constructor keyword arguments (JSON-serializable), so that a saved
  model can rebuild the module directly from its manifest, never through a dense detour;
* ``forward_unfused(x)``: the same map computed by plain PyTorch in the input dtype, the way a
  user would write it without our kernels (two matmuls; two ``bmm`` with the permutes; a dense
  matmul of the expanded 2:4 weight). It is the "unfused" baseline of the benchmarks;
* ``num_weight_params``: the weight parameters the factors really store (bias excluded), and
  ``ratio``: ``num_weight_params / (in_features * out_features)``.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn


class FactorizedLinear(nn.Module):
    #: short method name used by the driver, the manifest and reports
    method: ClassVar[str] = "factorized"
    in_features: int
    out_features: int
    #: qualified class name of the dense module this one replaced (``torch.nn.modules.linear.Linear``,
    #: ``transformers.pytorch_utils.Conv1D``), recorded at swap time; ``to_original()`` rebuilds it
    original_class: Optional[str] = None

    def dense_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def factor_config(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_unfused(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_weight_params(self) -> int:
        """Weight parameters stored by the factors (bias excluded)."""
        bias = getattr(self, "bias", None)
        skip = {id(bias)} if bias is not None else set()
        return sum(p.numel() for p in self.parameters(recurse=False) if id(p) not in skip)

    @property
    def ratio(self) -> float:
        """Fraction of the dense layer's weight parameters that the factors keep."""
        return self.num_weight_params / float(self.in_features * self.out_features)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        w = self.dense_weight()
        bias = getattr(self, "bias", None)
        lin = nn.Linear(
            self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=w.dtype
        )
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
        return lin


    @torch.no_grad()
    def to_original(self) -> nn.Module:
        """The dense module this one replaced, of its recorded class (:attr:`original_class`;
        ``nn.Linear`` when none was recorded), holding ``W = dense_weight()`` and the bias, on the
        factors' device and dtype, in the same train/eval mode:

        * ``nn.Linear`` and its subclasses: ``weight = W (out, in)``;
        * transformers' ``Conv1D(nf=out, nx=in)`` (GPT-2): ``weight = Wᵀ (in, out)``, ``y = x·weight + b``
          (a factorized module without bias gives a zero bias: ``Conv1D`` always has one).

        Any other recorded class raises ``TypeError`` naming it."""
        lin = self.to_linear()
        name = self.original_class
        cls = _import_class(name) if name else nn.Linear
        if cls is nn.Linear:
            out = lin
        elif cls.__name__ == "Conv1D" and issubclass(cls, nn.Module) and not issubclass(cls, nn.Linear):
            out = cls(self.out_features, self.in_features).to(device=lin.weight.device, dtype=lin.weight.dtype)
            out.weight.copy_(lin.weight.t())
            if lin.bias is not None:
                out.bias.copy_(lin.bias)
            else:
                out.bias.zero_()
        elif isinstance(cls, type) and issubclass(cls, nn.Linear):
            out = cls.__new__(cls)  # a subclass's own __init__ may take other arguments
            nn.Linear.__init__(out, self.in_features, self.out_features, bias=lin.bias is not None,
                               device=lin.weight.device, dtype=lin.weight.dtype)
            out.load_state_dict(lin.state_dict())
        else:
            raise TypeError(
                f"original_class: expected nn.Linear, a subclass of it or transformers' Conv1D, got {name!r}"
            )
        return out.train(self.training)


def _import_class(qualname: str) -> type:
    """The class named ``package.module.Class`` (nested qualnames allowed)."""
    import importlib

    if not isinstance(qualname, str) or "." not in qualname:
        raise ValueError(f"original_class: expected a qualified class name 'module.Class', got {qualname!r}")
    parts = qualname.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
        except AttributeError:
            break
        if isinstance(obj, type):
            return obj
        break
    raise ValueError(f"original_class: cannot import {qualname!r}")


def linear_weight_and_bias(linear: nn.Module, name: str = "linear"):
    """``(weight (out, in), bias or None)`` of a dense layer, with a clear error otherwise."""
    w = getattr(linear, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise TypeError(
            f"{name}: expected an nn.Linear (or a module with a 2-D weight (out, in)), "
            f"got {type(linear).__name__}"
        )
    return w, getattr(linear, "bias", None)
