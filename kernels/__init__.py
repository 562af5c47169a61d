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
