"""The kernel families ``fastfactor bench`` knows, and how each is built, counted and compared.

The families are those of :mod:`fastfactor.families` (one declaration each; a family registered
there by user code is benchmarked too). For each one the declaration says

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

from typing import Any, Optional

import torch
from torch import nn

from ..families import FAMILIES, Family

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


#: other spellings accepted on the command line
ALIASES = {"blocklowrank": "block_lowrank", "densesparse": "dense_sparse", "dense-sparse": "dense_sparse",
           "block-lowrank": "block_lowrank", "low_rank": "lowrank", "2:4": "sparse24"}


def canonical(name: str) -> str:
    """The family name for ``name`` or one of its :data:`ALIASES` (unknown names pass through)."""
    return ALIASES.get(name, name)


def load_family(name: str) -> tuple[Optional[type], str]:
    """``(layer class, "")`` of a declared family (kept for callers that expected a family to be
    possibly absent: every declared family is importable)."""
    if name not in FAMILIES:
        raise ValueError(f"methods: expected names from {sorted(FAMILIES)}, got {name!r}")
    return FAMILIES[name].layer, ""


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
            from ..formats.sparse24 import to_torch_semi_structured

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
