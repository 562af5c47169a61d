"""fastfactor: Triton kernels and a compression driver for transformers with factorized linears.

Ops: :func:`lowrank_linear`, :func:`monarch_linear`, :func:`block_lowrank_linear`,
:func:`sparse24_linear`, :func:`dense_sparse_linear`, :func:`lowrank_act_linear` (nonlinear bottleneck).
Modules: :class:`LowRankLinear`, :class:`MonarchLinear`, :class:`BlockLowRankLinear`,
:class:`Sparse24Linear`, :class:`DenseSparseLinear`, :class:`BottleneckLinear`.
"""

import importlib as _importlib
import importlib.util  # noqa: F401  (spec_from_file_location below)
import os as _os
import sys as _sys

# kernels/ is installed as fastfactor.kernels. In a source checkout (``PYTHONPATH=$PWD``, an editable
# install, or a second git worktree beside an editable install of another) the kernels/ folder beside
# this package is the one that belongs to it, so it is mapped first; an installed wheel has no such folder.
_kdir = _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "kernels")
_installed = _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels"))  # a wheel's copy
if not _installed and _os.path.isfile(_os.path.join(_kdir, "__init__.py")) and "fastfactor.kernels" not in _sys.modules:
    _spec = _importlib.util.spec_from_file_location(
        "fastfactor.kernels", _os.path.join(_kdir, "__init__.py"), submodule_search_locations=[_kdir]
    )
    kernels = _importlib.util.module_from_spec(_spec)
    _sys.modules["fastfactor.kernels"] = kernels
    _spec.loader.exec_module(kernels)
else:
    from . import kernels  # noqa: F401

from . import determinism, distributed, factorize, formats, layers, ops, profiling  # noqa: E402
from . import families  # noqa: E402  (one declaration per factorization family)
from . import compress, train  # noqa: E402  (the compress package is callable: fastfactor.compress(model, cfg, data))
from .compress import CompressionConfig, CompressionReport, load_compressed, save_compressed  # noqa: E402
from . import api, hf  # noqa: E402
from .api import FactorizationPlan, factorize_, factorize_plan, merge_and_unload  # noqa: E402
from .determinism import is_deterministic, set_deterministic  # noqa: E402
from .formats.sparse24 import Sparse24Weight  # noqa: E402
from .layers import (  # noqa: E402
    BlockLowRankLinear,
    BottleneckLinear,
    DenseSparseLinear,
    FactorizedLinear,
    LowRankLinear,
    MonarchLinear,
    Sparse24Linear,
)
from .ops import (  # noqa: E402
    block_lowrank_linear,
    dense_sparse_linear,
    lowrank_act_linear,
    lowrank_linear,
    monarch_linear,
    sparse24_linear,
)

__version__ = "0.1.0"

# `quantization_config: {"quant_method": "fastfactor"}` in a config.json: AutoModel*.from_pretrained,
# pipeline(...) and sentence-transformers rebuild the compressed model (fastfactor.hf); transformers
# itself is imported only when the user imports it.
hf.install_import_hook()

__all__ = [
    "lowrank_linear", "monarch_linear", "block_lowrank_linear", "sparse24_linear", "dense_sparse_linear",
    "LowRankLinear", "MonarchLinear", "BlockLowRankLinear", "Sparse24Linear", "DenseSparseLinear",
    "FactorizedLinear", "Sparse24Weight", "factorize", "families", "layers", "ops", "profiling",
    "set_deterministic", "is_deterministic", "determinism", "distributed",
    "lowrank_act_linear", "BottleneckLinear",
    "compress", "train", "CompressionConfig", "CompressionReport", "save_compressed", "load_compressed",
    "factorize_", "factorize_plan", "FactorizationPlan", "merge_and_unload", "api", "hf",
]
