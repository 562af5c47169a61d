"""The 2:4 sparse format on the library side: the packed container, packing, the pruning API and
the conversion to PyTorch's semi-structured (CUTLASS) layout.

A weight ``W (R, K)`` is 2:4 sparse when in every group of 4 consecutive inputs of a row at most 2
entries are non-zero; ``K % 4 == 0`` (no implicit padding). :class:`Sparse24Weight` holds it packed:

* ``values (R, K/2)``, the weight's dtype: the kept entries of each group at in-group positions
  ``i0 < i1``;
* ``meta (R, ceil(K/8))`` ``uint8``: one 4-bit code ``i0 | i1 << 2`` per group, two groups per
  byte (low nibble first).

That is 56.25 % of the dense bytes in fp16/bf16. The layout, the kernels that read it and how it
relates to CUTLASS's are described in :mod:`fastfactor.kernels.sparse24`; its pure-PyTorch
decoders (:func:`unpack_24`, :func:`compress_like`, :func:`meta_cols`) live there beside the
kernels' references and are re-exported here.

* :func:`pack_24`: dense 2:4 matrix -> :class:`Sparse24Weight` (exact; :meth:`Sparse24Weight.to_dense` inverts it);
* :func:`prune_24`, :func:`mask_24`: keep the 2 largest ``|W|`` (or ``scores``) of every group;
  CUDA tensors run the Triton pruning kernel, CPU tensors the reference (or the interpreter);
* :func:`to_cutlass_layout`, :func:`to_torch_semi_structured`: PyTorch's own 2:4 tensors, for its
  cuSPARSELt / CUTLASS ``F.linear`` path.

Argument errors are ``ValueError`` / ``TypeError`` naming the argument, the expected and the received value.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..kernels import sparse24 as K
from ..kernels._config import HAS_TRITON, use_triton
from ..kernels.sparse24 import compress_like, meta_cols, unpack_24


def _check_in_features(name: str, k: int, shape) -> None:
    if k % 4 != 0:
        raise ValueError(
            f"{name}: expected the input dimension (dim 1) to be a multiple of 4 (2:4 groups of "
            f"4 consecutive inputs; no implicit padding), got shape {tuple(shape)}"
        )


def _check_matrix(name: str, w) -> None:
    """A floating 2-D ``(rows, in)`` tensor with ``in % 4 == 0``."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D tensor (rows, in), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {str(w.dtype).replace('torch.', '')}")
    _check_in_features(name, w.shape[1], w.shape)


class Sparse24Weight:
    """A 2:4 sparse matrix ``(rows, in)`` in packed form (see the module docstring).

    Attributes:
        values: ``(rows, in/2)`` kept entries, the weight's dtype.
        meta:   ``(rows, ceil(in/8))`` ``uint8`` 4-bit codes ``i0 | i1 << 2`` per group of 4.
        shape:  ``(rows, in)`` of the dense matrix.

    Build one with :func:`pack_24` (or :meth:`from_dense`); :meth:`to_dense` inverts it exactly.
    The ops take it as an argument and hand its tensors to the registered custom ops.
    """

    __slots__ = ("values", "meta", "shape")

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, shape: Sequence[int]):
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values: expected a torch.Tensor, got {type(values).__name__}")
        if not isinstance(meta, torch.Tensor):
            raise TypeError(f"meta: expected a torch.Tensor, got {type(meta).__name__}")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2:
            raise ValueError(f"shape: expected (rows, in), got {shape}")
        rows, k = shape
        _check_in_features("shape", k, shape)
        if values.ndim != 2 or tuple(values.shape) != (rows, k // 2):
            raise ValueError(
                f"values: expected shape {(rows, k // 2)} (rows, in/2) for a 2:4 weight of shape "
                f"{shape}, got {tuple(values.shape)}"
            )
        if meta.dtype != torch.uint8:
            raise TypeError(f"meta: expected dtype uint8, got {str(meta.dtype).replace('torch.', '')}")
        if meta.ndim != 2 or tuple(meta.shape) != (rows, meta_cols(k)):
            raise ValueError(
                f"meta: expected shape {(rows, meta_cols(k))} (rows, ceil(in/8)) for a 2:4 weight "
                f"of shape {shape}, got {tuple(meta.shape)}"
            )
        if meta.device != values.device:
            raise ValueError(f"meta: expected device {values.device} (the device of values), got {meta.device}")
        self.values = values
        self.meta = meta
        self.shape = shape

    # ---- properties ----
    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __repr__(self) -> str:
        return f"Sparse24Weight(shape={self.shape}, dtype={self.dtype}, device={self.device})"

    # ---- conversions ----
    @classmethod
    def from_dense(cls, w_masked: torch.Tensor, mask: Optional[torch.Tensor] = None) -> "Sparse24Weight":
        return pack_24(w_masked, mask)

    def to_dense(self) -> torch.Tensor:
        """The dense ``(rows, in)`` matrix, zeros at the pruned positions (exact)."""
        return unpack_24(self.values, self.meta, self.shape[1])

    def mask(self) -> torch.Tensor:
        """The ``(rows, in)`` boolean mask of the kept positions (2 per group)."""
        i0, i1 = K._codes(self.meta, self.shape[1])
        slot = torch.arange(4, device=self.meta.device)
        m = (slot == i0[..., None]) | (slot == i1[..., None])
        return m.reshape(self.shape)

    def to(self, *args, **kwargs) -> "Sparse24Weight":
        """Move/cast the values (``meta`` follows the device, stays ``uint8``)."""
        v = self.values.to(*args, **kwargs)
        return Sparse24Weight(v, self.meta.to(v.device), self.shape)

    def validate(self) -> "Sparse24Weight":
        """Check that every code names two distinct positions ``i0 < i1`` (raises ValueError)."""
        i0, i1 = K._codes(self.meta, self.shape[1])
        bad = int((i0 >= i1).sum())
        if bad:
            raise ValueError(f"meta: expected codes i0 | i1 << 2 with i0 < i1, found {bad} invalid groups")
        return self

    def num_bytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel()


def pack_24(w_masked: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Sparse24Weight:
    """Pack a 2:4 sparse matrix ``(rows, in)``: ``to_dense()`` of the result equals it exactly.

    Without ``mask`` the kept positions are the non-zeros of ``w_masked`` (a group with more than
    2 non-zeros is an error; a group with fewer is completed with its lowest-index zeros). With a
    boolean ``mask`` (at most 2 True per group) the kept positions are the mask's, completed the
    same way, and entries of ``w_masked`` outside the mask are dropped (that is how a module with
    a learned mask freezes its latent dense weight). ``-0.0`` counts as zero.
    """
    _check_matrix("w_masked", w_masked)
    rows, k = w_masked.shape
    g = w_masked.detach().reshape(rows, k // 4, 4)
    if mask is None:
        keep = g != 0
        what = "w_masked"
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != (rows, k):
            raise ValueError(f"mask: expected shape {(rows, k)} (the shape of w_masked), got {tuple(mask.shape)}")
        keep = mask.to(g.device).reshape(rows, k // 4, 4)
        what = "mask"
    over = int((keep.sum(-1) > 2).sum())
    if over:
        raise ValueError(
            f"{what}: expected at most 2 non-zeros in every group of 4 consecutive inputs (2:4), "
            f"found {over} groups with more; prune first (prune_24)"
        )
    slot = torch.arange(4, device=g.device)
    key = (~keep).to(torch.int64) * 4 + slot                             # kept first, then by index
    idx = key.argsort(dim=-1)[..., :2].sort(dim=-1).values % 4           # (rows, K/4, 2), i0 < i1
    vals = g.gather(-1, idx)
    # completion slots (groups with fewer than 2 kept) hold zeros, whatever w_masked has there
    vals = torch.where(keep.gather(-1, idx), vals, torch.zeros((), dtype=g.dtype, device=g.device))
    values = vals.reshape(rows, k // 2).contiguous()
    code = idx[..., 0] | (idx[..., 1] << 2)                              # (rows, K/4)
    if code.shape[1] % 2:
        code = torch.cat((code, code.new_zeros((rows, 1))), dim=1)
    meta = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8).contiguous()
    return Sparse24Weight(values, meta, (rows, k))


# ============================================================================================
# Pruning (public entry points; dispatch CUDA -> Triton, CPU -> reference or interpreter)
# ============================================================================================

def _check_prune_args(w, scores) -> None:
    _check_matrix("W", w)
    if scores is not None:
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"scores: expected a torch.Tensor, got {type(scores).__name__}")
        if tuple(scores.shape) != tuple(w.shape):
            raise ValueError(
                f"scores: expected shape {tuple(w.shape)} (the shape of W), got {tuple(scores.shape)}"
            )
        if scores.device != w.device:
            raise ValueError(f"scores: expected device {w.device} (the device of W), got {scores.device}")
        if not scores.is_floating_point():
            raise TypeError(f"scores: expected a floating dtype, got {str(scores.dtype).replace('torch.', '')}")
    if not torch.compiler.is_compiling():
        t, name = (scores, "scores") if scores is not None else (w, "W")
        n_bad = int((~torch.isfinite(t)).sum())
        if n_bad:
            raise ValueError(f"{name}: expected finite values, found {n_bad} NaN/Inf entries")


def _prune_dispatch(w: torch.Tensor, scores: Optional[torch.Tensor]):
    w = w.detach()
    scores = scores.detach() if scores is not None else None
    if HAS_TRITON and use_triton(w) and w.dtype != torch.float64:
        return K.prune_24_triton(w, scores)
    mask = K.mask_24_ref(scores if scores is not None else w.abs())
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device)), mask


def mask_24(w: torch.Tensor, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean 2:4 mask ``(rows, in)``: in every group of 4 consecutive inputs of a row, the 2
    entries with the largest ``|W|`` (or the largest ``scores``); ties go to the lower index."""
    _check_prune_args(w, scores)
    return _prune_dispatch(w, scores)[1]


def prune_24(w: torch.Tensor, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``W (rows, in)`` with all but the 2 most important entries of every group of 4 consecutive
    inputs set to zero; importance is ``|W|`` or ``scores`` (same shape, e.g. ``|W|·‖x_j‖``).

    ``in % 4 == 0`` (else ``ValueError``); NaN/Inf refused. CUDA tensors run the Triton kernel,
    CPU tensors the reference (the interpreter under ``TRITON_INTERPRET=1`` with the triton
    backend); both apply the same tie rule, so they agree exactly. Not differentiable (see
    ``fastfactor.ops.sparse24.ste_24``). Compose with :func:`pack_24`: ``pack_24(prune_24(W))``.
    """
    _check_prune_args(w, scores)
    return _prune_dispatch(w, scores)[0]


# ============================================================================================
# PyTorch's semi-structured layout
# ============================================================================================

def to_cutlass_layout(w: Sparse24Weight):
    """``(packed (R, K/2), meta (R, K/16) int16)`` in PyTorch's CUTLASS layout (the layout of
    ``torch.sparse.SparseSemiStructuredTensorCUTLASS`` for fp16/bf16); runs on any device.

    Needs ``R % 32 == 0`` and ``K % 64 == 0`` (CUTLASS's fp16/bf16 constraints).
    """
    if w.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"w: expected float16 or bfloat16 values for PyTorch's 2:4 layout (its fp32 format "
            f"is 1:2), got {str(w.dtype).replace('torch.', '')}"
        )
    R, K_ = w.shape
    if R % 32 or K_ % 64:
        raise ValueError(
            f"w: expected rows a multiple of 32 and in a multiple of 64 for PyTorch's CUTLASS "
            f"layout, got shape {w.shape}"
        )
    return w.values.contiguous(), K.cutlass_meta(w.meta, R, K_)


def to_torch_semi_structured(w: Sparse24Weight):
    """The ``torch.sparse`` semi-structured tensor for ``w`` (CUDA, fp16/bf16), for use as
    ``F.linear(x, that, bias)``.

    PyTorch picks its backend as ``to_sparse_semi_structured`` does: with cuSPARSELt available
    (and CUTLASS not forced) the dense matrix goes through ``to_sparse_semi_structured`` (its
    compressed format is opaque); otherwise the CUTLASS tensor is built directly from our packed
    form by :func:`to_cutlass_layout`, with no dense detour. Either way the result equals
    ``to_sparse_semi_structured(w.to_dense())``.
    """
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUTLASS
    from torch.sparse import to_sparse_semi_structured as _to_ss

    if not isinstance(w, Sparse24Weight):
        raise TypeError(f"w: expected a Sparse24Weight, got {type(w).__name__}")
    if w.device.type != "cuda":
        raise ValueError(f"w: PyTorch's semi-structured sparse tensors need a CUDA device, got {w.device}")
    cusparselt = getattr(torch.backends, "cusparselt", None)
    has_cslt = cusparselt is not None and cusparselt.is_available()
    if has_cslt and not SparseSemiStructuredTensor._FORCE_CUTLASS:
        return _to_ss(w.to_dense())
    packed, meta = to_cutlass_layout(w)
    return SparseSemiStructuredTensorCUTLASS(
        torch.Size(w.shape), packed=packed, meta=meta, packed_t=None, meta_t=None,
        compressed_swizzled_bitmask=None, requires_grad=False,
    )


__all__ = [
    "Sparse24Weight", "pack_24", "prune_24", "mask_24", "unpack_24", "compress_like", "meta_cols",
    "to_cutlass_layout", "to_torch_semi_structured",
]
