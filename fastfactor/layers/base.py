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

from typing import ClassVar

import torch
from torch import nn


class FactorizedLinear(nn.Module):
    #: short method name used by the driver, the manifest and reports
    method: ClassVar[str] = "factorized"
    in_features: int
    out_features: int

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


def linear_weight_and_bias(linear: nn.Module, name: str = "linear"):
    """``(weight (out, in), bias or None)`` of a dense layer, with a clear error otherwise."""
    w = getattr(linear, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise TypeError(
            f"{name}: expected an nn.Linear (or a module with a 2-D weight (out, in)), "
            f"got {type(linear).__name__}"
        )
    return w, getattr(linear, "bias", None)
