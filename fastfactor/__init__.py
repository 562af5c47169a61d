"""fastfactor: Triton kernels and a compression driver for transformers with factorized linears.

Ops: :func:`lowrank_linear`, :func:`monarch_linear`, :func:`block_lowrank_linear`.
Modules: :class:`LowRankLinear`, :class:`MonarchLinear`, :class:`BlockLowRankLinear`.
"""

import importlib as _importlib
import sys as _sys

# kernels/ is installed as fastfactor.kernels; in a source checkout that is not installed, map it.
try:
    from . import kernels  # noqa: F401
except ImportError:  # pragma: no cover
    import os as _os

    _spec = _importlib.util.spec_from_file_location(
        "fastfactor.kernels",
        _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "kernels", "__init__.py"),
    )
    kernels = _importlib.util.module_from_spec(_spec)
    _sys.modules["fastfactor.kernels"] = kernels
    _spec.loader.exec_module(kernels)

from . import factorize, layers, ops, profiling  # noqa: E402
from .layers import BlockLowRankLinear, FactorizedLinear, LowRankLinear, MonarchLinear  # noqa: E402
from .ops import block_lowrank_linear, lowrank_linear, monarch_linear  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "lowrank_linear", "monarch_linear", "block_lowrank_linear",
    "LowRankLinear", "MonarchLinear", "BlockLowRankLinear", "FactorizedLinear",
    "factorize", "layers", "ops", "profiling",
]
