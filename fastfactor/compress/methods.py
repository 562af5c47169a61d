"""The method registry: method name → layer class and builder.

Each entry names the module and class of its ``FactorizedLinear`` subclass (imported lazily, so
the driver works while some layer families are absent) and a builder
``build(view, ratio, init, config, stats) -> FactorizedLinear`` where ``view`` is the dense
``(out, in)`` weight/bias (:class:`~fastfactor.compress.targets.DenseView`) and ``stats`` the
calibration statistics of that module (``{"fisher": F, "gram": G}``, whichever were collected).

``register_method`` adds a method (e.g. from user code).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ..factorize.svd import resolve_rank
from . import calibration as C


@dataclass(frozen=True)
class MethodSpec:
    name: str
    module: str  #: where the layer class lives
    cls_name: str
    build: Callable
    #: calibration statistics each init needs: init name → subset of {"fisher", "gram"}
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


_REGISTRY: Dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    _REGISTRY[spec.name] = spec


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise ValueError(f"method: expected one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def available_methods() -> Dict[str, bool]:
    """``{name: whether its layer class can be imported}``."""
    out = {}
    for n, s in _REGISTRY.items():
        try:
            s.layer_class()
            out[n] = True
        except NotImplementedError:
            out[n] = False
    return out


def layer_classes() -> Dict[str, type]:
    """Importable layer classes by class name (used when loading a manifest)."""
    out = {}
    for s in _REGISTRY.values():
        try:
            out[s.cls_name] = s.layer_class()
        except NotImplementedError:
            pass
    return out


def _stat(stats, key, name):
    if not stats or stats.get(key) is None:
        raise ValueError(f"init: {name!r} needs {key} statistics; pass calibration data (data=...)")
    return stats[key]


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------

def _build_lowrank(view, ratio, init, config, stats):
    cls = get_method("lowrank").layer_class()
    r = resolve_rank(view.in_features, view.out_features, None, ratio)
    if init == "svd":
        return cls.from_linear(view, rank=r)
    if init == "fisher":
        u, v = C.fisher_svd_factors(view.weight, r, _stat(stats, "fisher", init).to(view.weight.device))
    elif init == "activation":
        u, v, _ = C.whitened_svd_factors(view.weight, r, _stat(stats, "gram", init).to(view.weight.device))
    else:  # pragma: no cover - checked by the config
        raise ValueError(f"init: unknown low-rank init {init!r}")
    return cls.from_factors(u, v, view.bias)


def _build_monarch(view, ratio, init, config, stats):
    cls = get_method("monarch").layer_class()
    return cls.from_linear(view, nblocks=config.nblocks, ratio=ratio)


def _build_block_lowrank(view, ratio, init, config, stats):
    cls = get_method("block_lowrank").layer_class()
    return cls.from_linear(view, nblocks=config.nblocks, ratio=ratio)


def _build_sparse24(view, ratio, init, config, stats):
    cls = get_method("sparse24").layer_class()
    if init == "magnitude":
        return cls.from_linear(view)
    scores = C.sparse24_scores(
        view.weight, init,
        fisher=(stats or {}).get("fisher"), gram=(stats or {}).get("gram"),
    ).to(device=view.weight.device)
    return cls.from_linear(view, scores=scores)


def _build_dense_sparse(view, ratio, init, config, stats):
    cls = get_method("dense_sparse").layer_class()
    return cls.from_linear(view, ratio=ratio, init=init)


register_method(MethodSpec("lowrank", "fastfactor.layers.lowrank", "LowRankLinear", _build_lowrank,
                           {"svd": (), "fisher": ("fisher",), "activation": ("gram",)}))
register_method(MethodSpec("monarch", "fastfactor.layers.monarch", "MonarchLinear", _build_monarch,
                           {"projection": ()}))
register_method(MethodSpec("block_lowrank", "fastfactor.layers.monarch", "BlockLowRankLinear",
                           _build_block_lowrank, {"projection": ()}))
register_method(MethodSpec("sparse24", "fastfactor.layers.sparse24", "Sparse24Linear", _build_sparse24,
                           {"magnitude": (), "fisher": ("fisher",), "activation": ("gram",)}))
register_method(MethodSpec("dense_sparse", "fastfactor.layers.sparse24", "DenseSparseLinear",
                           _build_dense_sparse, {"svd_als": (), "svd": ()}))


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
    """A ``FactorizedLinear`` for the dense ``view`` (in the weight's dtype and device)."""
    spec = get_method(method)
    with torch.no_grad(), _cpu_linalg_threads(view.weight.device):
        layer = spec.build(view, ratio, init, config, stats)
    return layer.to(device=view.weight.device, dtype=view.weight.dtype)
