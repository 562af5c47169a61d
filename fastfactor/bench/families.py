"""The kernel families ``fastfactor bench`` knows, and how each is built, counted and compared.

Every family is a :class:`fastfactor.layers.base.FactorizedLinear` subclass, imported lazily: a
family whose module is not part of this build is skipped with a message (see
:func:`load_family`). For each one this module says

* how to build a layer of a given shape and compression setting *without* fitting it to a dense
  weight (benchmarks time the kernels; the values of the factors do not matter, and a float64
  SVD of an 8192² matrix would only slow the sweep down);
* how many FLOPs one token costs (the *factorized* work, not the dense layer's);
* which baselines apply: dense ``F.linear`` (all), ``forward_unfused`` (all: the same
  factorization in plain PyTorch), PyTorch's semi-structured 2:4 path (``sparse24``).

FLOP and byte counts (``M`` tokens, ``K = in_features``, ``N = out_features``, ``e`` bytes per
element, ``P`` = stored factor weights = ``module.num_weight_params``, ``B`` = bytes of every
parameter and buffer of the module: factors, bias, 2:4 metadata)::

    family        fwd FLOPs                    why
    dense         2·M·K·N
    lowrank       2·M·r·(K + N)                x·Vᵀ then t·Uᵀ   (= 2·M·P)
    monarch       2·M·P = 2·M·b·r·(Kp + Np)    two block-diagonal products; every stored weight
    block_lowrank 2·M·P                        multiplies exactly once per token (Kp, Np: K, N
                                               padded to a multiple of b; the padding is stored)
    sparse24      M·K·N                        only the kept half of the weights multiply (2·M·K·N/2)
    dense_sparse  M·r·K + 2·M·N·r              S (r×K, 2:4: K/2 kept per row), then D (N×r)

(``P`` of the 2:4 modules also counts their metadata, which does no arithmetic, hence their own
formulas.)

    bwd FLOPs  = 2 × fwd  (input gradient + weight gradients, each the size of the forward)
    fwd+bwd    = 3 × fwd

    fwd bytes  = e·(M·K + M·N) + B                      read x, write y, read the factors once
    bwd bytes  = e·(M·N + 2·M·K) + 2·B                  read g and x, write dx, read factors,
                                                         write their gradients
    fwd+bwd    = fwd + bwd

These are *compulsory* traffic counts (what any implementation must move at least once), the
basis of the roofline floor; intermediates (the rank-r ``t`` of a low-rank layer, the permuted
activations of Monarch) are not included, which is exactly the traffic a fused kernel saves.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

import torch
from torch import nn

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Family:
    """How to benchmark one family.

    name:        short name (the module's ``method``), used on the command line
    module/cls:  where the layer class lives (imported lazily)
    param_name:  what the sweep varies: ``"ratio"``, ``"nblocks"`` or ``""`` (nothing)
    defaults:    default values of that parameter
    build:       ``build(cls, in_f, out_f, param, dtype, device, bias, opts) -> module``
    fwd_flops:   ``fwd_flops(module, tokens) -> (flops, formula)``
    unfused:     what ``forward_unfused`` computes (for tables and plots)
    torch24:     whether PyTorch's semi-structured sparse path is a baseline
    """

    name: str
    module: str
    cls: str
    param_name: str
    defaults: tuple
    build: Callable[..., nn.Module]
    fwd_flops: Callable[[nn.Module, int], tuple[int, str]]
    unfused: str
    torch24: bool = False


def _random_linear(in_f, out_f, dtype, device, bias) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=bias, device=device, dtype=torch.float32)
    return lin.to(dtype)


def _build_lowrank(cls, in_f, out_f, ratio, dtype, device, bias, opts):
    from ..factorize.svd import rank_for_ratio

    return cls(in_f, out_f, rank_for_ratio(in_f, out_f, ratio), bias=bias, dtype=dtype, device=device)


def _build_blocks(cls, in_f, out_f, nblocks, dtype, device, bias, opts):
    rank = int(opts.get("block_rank", 1))
    try:
        return cls(in_f, out_f, nblocks, rank=rank, bias=bias, dtype=dtype, device=device)
    except TypeError:
        # constructor without these keywords: fit a random dense layer instead
        return cls.from_linear(_random_linear(in_f, out_f, dtype, device, bias), nblocks=nblocks)


def _build_sparse24(cls, in_f, out_f, _param, dtype, device, bias, opts):
    try:  # the constructor prunes a random weight to 2:4 and packs it
        return cls(in_f, out_f, bias=bias, dtype=dtype, device=device)
    except TypeError:
        return cls.from_linear(_random_linear(in_f, out_f, dtype, device, bias))


def _build_densesparse(cls, in_f, out_f, ratio, dtype, device, bias, opts):
    try:
        from ..factorize.sparse24 import dense_sparse_rank_for_ratio
    except ImportError:
        return cls.from_linear(_random_linear(in_f, out_f, dtype, device, bias), ratio=ratio)
    rank = dense_sparse_rank_for_ratio(in_f, out_f, ratio)
    return cls(in_f, out_f, rank, bias=bias, dtype=dtype, device=device)


def _flops_lowrank(m, tokens):
    return 2 * tokens * m.rank * (m.in_features + m.out_features), "2·M·r·(K+N)"


def _flops_stored(m, tokens):
    return 2 * tokens * int(m.num_weight_params), "2·M·P (P = stored factor weights)"


def _flops_sparse24(m, tokens):
    return tokens * m.in_features * m.out_features, "M·K·N (half of the dense 2·M·K·N)"


def _flops_densesparse(m, tokens):
    r = getattr(m, "rank", None)
    if r is None:
        return 2 * tokens * int(m.num_weight_params), "2·M·P (fallback: P = num_weight_params)"
    # S (r, K) keeps K/2 per row; D (N, r) dense
    return tokens * r * m.in_features + 2 * tokens * m.out_features * r, "M·r·K + 2·M·N·r"


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("lowrank", "fastfactor.layers.lowrank", "LowRankLinear", "ratio", (0.125, 0.25, 0.5),
               _build_lowrank, _flops_lowrank, "two matmuls (x·Vᵀ)·Uᵀ"),
        Family("monarch", "fastfactor.layers.monarch", "MonarchLinear", "nblocks", (2, 4, 8),
               _build_blocks, _flops_stored, "two bmm with the permutes"),
        Family("block_lowrank", "fastfactor.layers.monarch", "BlockLowRankLinear", "nblocks", (2, 4, 8),
               _build_blocks, _flops_stored, "two bmm on contiguous blocks"),
        Family("sparse24", "fastfactor.layers.sparse24", "Sparse24Linear", "", (None,),
               _build_sparse24, _flops_sparse24, "dense matmul of the expanded 2:4 weight", torch24=True),
        Family("dense_sparse", "fastfactor.layers.sparse24", "DenseSparseLinear", "ratio", (0.25, 0.5),
               _build_densesparse, _flops_densesparse, "D·(S·x): dense matmul of the expanded 2:4 S, then D"),
    ]
}


#: other spellings accepted on the command line
ALIASES = {"blocklowrank": "block_lowrank", "densesparse": "dense_sparse", "dense-sparse": "dense_sparse",
           "block-lowrank": "block_lowrank", "low_rank": "lowrank", "2:4": "sparse24"}


def canonical(name: str) -> str:
    """The family name for ``name`` or one of its :data:`ALIASES` (unknown names pass through)."""
    return ALIASES.get(name, name)


def load_family(name: str) -> tuple[Optional[type], str]:
    """``(layer class, "")`` or ``(None, reason)`` when the family is not part of this build."""
    if name not in FAMILIES:
        raise ValueError(f"methods: expected names from {sorted(FAMILIES)}, got {name!r}")
    fam = FAMILIES[name]
    try:
        mod = importlib.import_module(fam.module)
    except ImportError as e:
        return None, f"{name}: skipped, {fam.module} is not available ({e})"
    cls = getattr(mod, fam.cls, None)
    if cls is None:
        return None, f"{name}: skipped, {fam.module} has no {fam.cls}"
    return cls, ""


def param_label(fam: Family, param: Any, opts: Optional[dict] = None) -> str:
    if fam.param_name == "":
        return "2:4"
    if fam.param_name == "nblocks":
        return f"nblocks={param},rank={int((opts or {}).get('block_rank', 1))}"
    return f"{fam.param_name}={param:g}"


def module_bytes(m: nn.Module) -> int:
    """Bytes of every parameter and buffer the module reads (factors, bias, metadata)."""
    tensors = list(m.parameters()) + list(m.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def flops_for(direction: str, fwd: int) -> int:
    """FLOPs of a direction from the forward count (see the module docstring)."""
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[direction]


def bytes_for(direction: str, tokens: int, in_f: int, out_f: int, elem: int, weight_bytes: int) -> int:
    """Compulsory device-memory traffic of a direction (see the module docstring)."""
    fwd = elem * tokens * (in_f + out_f) + weight_bytes
    bwd = elem * tokens * (out_f + 2 * in_f) + 2 * weight_bytes
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def dense_fwd_flops(tokens: int, in_f: int, out_f: int) -> int:
    return 2 * tokens * in_f * out_f


def torch_semi_structured(module: nn.Module) -> tuple[Optional[torch.Tensor], str]:
    """PyTorch's own 2:4 weight for ``F.linear(x, that, bias)`` built from a 2:4 module, or
    ``(None, reason)`` where it cannot be used (CPU, dtype, shape, architecture)."""
    w = module.dense_weight().detach()
    if not w.is_cuda:
        return None, "PyTorch semi-structured sparsity needs a CUDA device"
    try:
        if hasattr(module, "sparse_weight"):
            from ..kernels.sparse24 import to_torch_semi_structured

            with torch.no_grad():
                return to_torch_semi_structured(module.sparse_weight()), ""
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(w), ""
    except Exception as e:  # noqa: BLE001 - unsupported dtype/shape/arch: record why
        return None, f"semi-structured conversion failed: {type(e).__name__}: {e}"


__all__ = [
    "DIRECTIONS", "Family", "FAMILIES", "load_family", "param_label", "module_bytes", "flops_for",
    "bytes_for", "dense_fwd_flops", "torch_semi_structured",
]
