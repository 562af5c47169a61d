"""The driver's view of the families: method name -> layer built from a dense weight.

Every method is a :class:`fastfactor.families.Family` (one declaration: layer class, inits with
the statistics each needs, ratio -> rank, counts, kernels). :func:`build_layer` fits a family's
layer to a dense ``view`` (:class:`~fastfactor.compress.targets.DenseView`, ``(out, in)``
weight and bias) with the chosen init, given the calibration statistics of that module
(``{"fisher": F, "gram": G}``, whichever were collected).

``register_method`` / ``get_method`` / ``MethodSpec`` are the older names of this registry:
``get_method`` returns the :class:`~fastfactor.families.Family`; ``register_method`` takes a
``Family`` (or, deprecated, a ``MethodSpec`` naming its layer class by module path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from .. import families as F


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Deprecated: declare a :class:`fastfactor.families.Family` instead.

    ``MethodSpec(name, module, cls_name, build, needs)`` with ``build(view, ratio, init, config,
    stats) -> layer`` and ``needs`` ``{init: statistics}``."""

    name: str
    module: str  #: where the layer class lives
    cls_name: str
    build: Callable
    needs: Dict[str, Tuple[str, ...]]

    def layer_class(self):
        try:
            mod = importlib.import_module(self.module)
            return getattr(mod, self.cls_name)
        except (ImportError, AttributeError) as e:
            raise NotImplementedError(
                f"method: {self.name!r} needs {self.module}.{self.cls_name}, which is not available in "
                f"this build ({type(e).__name__}: {e})"
            ) from e


_LEGACY: Dict[str, MethodSpec] = {}


def register_method(spec) -> None:
    """Register a :class:`~fastfactor.families.Family` (replacing one of the same name); a
    :class:`MethodSpec` is still accepted (deprecated) and only reachable through :func:`get_method`."""
    if isinstance(spec, F.Family):
        F.register_family(spec, replace=True)
        return
    if isinstance(spec, MethodSpec):
        warnings.warn("MethodSpec is deprecated: declare a fastfactor.families.Family and register_family it",
                      DeprecationWarning, stacklevel=2)
        _LEGACY[spec.name] = spec
        return
    raise TypeError(f"spec: expected a fastfactor.families.Family, got {type(spec).__name__}")


def get_method(name: str):
    """The :class:`~fastfactor.families.Family` called ``name``."""
    if name in _LEGACY and name not in F.FAMILIES:
        return _LEGACY[name]
    return F.get_family(name)


def available_methods() -> Dict[str, bool]:
    """``{name: True}`` for every family (every declared family is importable)."""
    return {n: True for n in F.FAMILIES}


def layer_classes() -> Dict[str, type]:
    """Layer classes by class name (used when loading a manifest)."""
    return F.layer_classes()


@contextlib.contextmanager
def _cpu_linalg_threads(device: torch.device):
    """Factorize CPU weights single-threaded. LAPACK's SVD on a busy 2-core machine ran 13× slower
    with 2 threads than with 1 (2.8 s vs 0.2 s for a 1536×384 float64 SVD, measured on our CI-class
    machine while other jobs ran): the threads wait on each other. GPUs are unaffected."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def build_layer(method: str, view, ratio: float, init: str, config, stats: Optional[dict] = None):
    """A ``FactorizedLinear`` for the dense ``view`` (in the weight's dtype and device), fitted by
    the family's ``init``."""
    spec = get_method(method)
    with torch.no_grad(), _cpu_linalg_threads(view.weight.device):
        if isinstance(spec, MethodSpec):
            layer = spec.build(view, ratio, init, config, stats)
        else:
            layer = spec.get_init(init).build(view, ratio, config, stats)
    return layer.to(device=view.weight.device, dtype=view.weight.dtype)
