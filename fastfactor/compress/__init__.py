"""The compression driver: plan → staged swap → fine-tune → evaluate → save.

``fastfactor.compress(model, config, data)`` (this package is callable: it forwards to
:func:`~fastfactor.compress.driver.compress`), :class:`CompressionConfig`,
:func:`save_compressed`, :func:`load_compressed`, and the method registry.
"""

import sys as _sys
import types as _types

from .config import CompressionConfig, INITS, METHODS, SCHEDULES
from ..api import revert  # deprecated name of fastfactor.merge_and_unload
from .driver import CompressionReport, StageRecord, compress, plan_stages
from .io import load_compressed, save_compressed
from .methods import MethodSpec, available_methods, get_method, register_method
from .targets import select_targets


class _CallableModule(_types.ModuleType):
    """Lets ``fastfactor.compress(model, config, data)`` call the driver while
    ``fastfactor.compress.save_compressed`` etc. stay reachable."""

    def __call__(self, *args, **kwargs):
        return compress(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "compress", "CompressionConfig", "CompressionReport", "StageRecord", "save_compressed",
    "load_compressed", "select_targets", "plan_stages", "revert", "register_method", "get_method",
    "available_methods", "MethodSpec", "METHODS", "SCHEDULES", "INITS",
]
