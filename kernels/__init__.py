"""Triton device code and its launchers, one module per kernel family (installed as
``fastfactor.kernels``). Nothing here imports the library above it.

Each family module holds its kernels, their launchers, the path chooser between them
(``choose_path`` / ``choose_ds_path``) and the pure-PyTorch references of the forward and the
backward (``*_ref``, the CPU path and the test oracles):

* ``lowrank``: fused low-rank chain ``y = (x·Vᵀ)·Uᵀ + b`` and the strided GEMM;
* ``lowrank_act``: the nonlinear bottleneck ``y = σ(x·Vᵀ + c)·Uᵀ + b`` on those kernels (the chain's
  ``ACT`` / ``HAS_CB`` / ``GATE`` constexprs), its references and launchers;
* ``monarch``: block-diagonal Monarch / block-wise low-rank (fused chain, batched GEMM);
* ``sparse24``: 2:4 pruning, 2:4 sparse linear and the fused dense-sparse chain, reading the
  packed layout whose container (``Sparse24Weight``), packing, pruning API and conversion to
  PyTorch's layout live in ``fastfactor.formats.sparse24``.

``_config`` holds what they share: interpreter and backend switches, ``next_pow2`` /
``m_bucket`` / ``acc_dtype``, the ``Tunable`` launcher (autotuned, with named ``interpreter=``
and ``deterministic=`` configs) and the compile-check registry (``register_kernel``; signatures
derived from each kernel's arguments).
"""

# Imported as the top-level ``kernels`` (the repository root on ``sys.path``: ``python -m`` from a
# checkout, ``PYTHONPATH=$PWD``) rather than as ``fastfactor.kernels``: the name belongs to Hugging
# Face's ``kernels`` package, which transformers (>= 5.25 requires it) imports at start-up. Hand that
# import over to the installed package, so a checkout does not shadow it; without one, nothing
# here runs either (the modules are only ever loaded as ``fastfactor.kernels.*``).
if __name__ == "kernels":
    import importlib.metadata as _md
    import importlib.util as _ilu
    import os as _os
    import sys as _sys

    def _hub_kernels_init():
        """``kernels/__init__.py`` of the installed ``kernels`` distribution, or None."""
        try:
            path = str(_md.distribution("kernels").locate_file("kernels/__init__.py"))
        except _md.PackageNotFoundError:
            return None
        if not _os.path.isfile(path) or _os.path.samefile(path, __file__):
            return None
        return path

    _hub = _hub_kernels_init()
    if _hub is not None:
        _spec = _ilu.spec_from_file_location("kernels", _hub, submodule_search_locations=[_os.path.dirname(_hub)])
        _mod = _ilu.module_from_spec(_spec)
        _sys.modules["kernels"] = _mod
        _spec.loader.exec_module(_mod)
