"""Tier 1 (cpu): the 2:4 packed format, pruning (reference and interpreted kernel) and the
conversion to PyTorch's semi-structured (CUTLASS) layout."""

import pytest
import torch

from conftest import DTYPES
from fastfactor.formats import sparse24 as fmt
from fastfactor.formats.sparse24 import Sparse24Weight, mask_24, pack_24, prune_24
from fastfactor.kernels import sparse24 as K

DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
# rows x in: odd rows, in % 8 == 4 (odd number of groups: half-used last metadata byte), wide
SHAPES = [(1, 4), (7, 12), (37, 44), (16, 64), (5, 200)]
SHAPE_IDS = [f"R{r}-K{k}" for r, k in SHAPES]


def groups(t):
    return t.reshape(t.shape[0], -1, 4)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=DT_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_prune_pack_roundtrip_exact(shape, dtype):
    w = torch.randn(*shape, dtype=dtype)
    p = prune_24(w)
    assert p.dtype == dtype and p.shape == w.shape
    assert ((groups(p) != 0).sum(-1) <= 2).all()
    packed = pack_24(p)
    assert packed.values.shape == (shape[0], shape[1] // 2)
    assert packed.meta.shape == (shape[0], (shape[1] + 7) // 8) and packed.meta.dtype == torch.uint8
    assert torch.equal(packed.to_dense(), p)
    assert torch.equal(packed.mask(), p != 0)
    packed.validate()


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_prune_keeps_two_largest_magnitudes(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    m = mask_24(w)
    assert (groups(m).sum(-1) == 2).all()
    a = groups(w.abs())
    kept_min = torch.where(groups(m), a, torch.inf).amin(-1)
    dropped_max = torch.where(groups(m), -torch.inf, a).amax(-1)
    assert (kept_min >= dropped_max).all()
    assert torch.equal(prune_24(w), w * m)


def test_prune_ties_go_to_lower_index():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, -2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert mask_24(w).tolist() == [[True, True, False, False, True, True, False, False, True, True, False, False]]


def test_prune_with_scores_uses_scores_not_magnitude():
    w = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert prune_24(w, scores).tolist() == [[10.0, 20.0, 0.0, 0.0]]


def test_pack_completes_sparser_groups_and_roundtrips():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, -0.0, 3.0, 0.0, 4.0]])
    p = pack_24(w)
    assert torch.equal(p.to_dense(), w)
    assert p.values.tolist() == [[0.0, 0.0, 0.0, 5.0, 3.0, 4.0]]
    p.validate()


def test_pack_with_mask_uses_mask_positions_and_drops_the_rest():
    w = torch.arange(1.0, 9.0).reshape(1, 8)
    mask = torch.tensor([[False, True, False, True, True, False, False, False]])
    p = pack_24(w, mask)
    assert p.to_dense().tolist() == [[0.0, 2.0, 0.0, 4.0, 5.0, 0.0, 0.0, 0.0]]
    assert p.mask()[0, :4].tolist() == [False, True, False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DT_IDS.get)
@pytest.mark.parametrize("with_scores", [False, True], ids=["magnitude", "scores"])
def test_prune_kernel_matches_reference_exactly(triton_cpu, dtype, with_scores):
    """The interpreted Triton prune kernel and the reference agree bit for bit (ties included)."""
    w = torch.randn(37, 92, dtype=dtype)
    w[:, :8] = 1.0                               # exact ties
    w = w.t().contiguous().t()                    # non-contiguous (column-major) input
    scores = torch.rand(37, 92) if with_scores else None
    p, m = K.prune_24_triton(w, scores)
    ref_m = K.mask_24_ref(scores if scores is not None else w.abs().float())
    assert torch.equal(m, ref_m)
    assert torch.equal(p, torch.where(ref_m, w, torch.zeros((), dtype=dtype)))
    assert torch.equal(prune_24(w, scores), p)   # public entry point takes the kernel here


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: prune_24(torch.randn(3, 6)), ValueError, "multiple of 4"),
        (lambda: prune_24(torch.randn(12)), ValueError, "2-D"),
        (lambda: prune_24([[1.0] * 4]), TypeError, "torch.Tensor"),
        (lambda: prune_24(torch.ones(2, 4, dtype=torch.int32)), TypeError, "floating"),
        (lambda: prune_24(torch.randn(2, 4), torch.randn(2, 8)), ValueError, "scores"),
        (lambda: prune_24(torch.tensor([[1.0, float("nan"), 0.0, 0.0]])), ValueError, "NaN"),
        (lambda: pack_24(torch.ones(2, 8)), ValueError, "at most 2 non-zeros"),
        (lambda: pack_24(torch.ones(2, 10)), ValueError, "multiple of 4"),
        (lambda: pack_24(torch.ones(2, 8), torch.ones(2, 8, dtype=torch.bool)), ValueError, "mask"),
        (lambda: pack_24(torch.ones(2, 8), torch.ones(2, 8)), TypeError, "mask"),
        (lambda: Sparse24Weight(torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.uint8), (2, 6)),
         ValueError, "multiple of 4"),
        (lambda: Sparse24Weight(torch.zeros(2, 5), torch.zeros(2, 1, dtype=torch.uint8), (2, 8)),
         ValueError, "values"),
        (lambda: Sparse24Weight(torch.zeros(2, 4), torch.zeros(2, 1), (2, 8)), TypeError, "meta"),
        (lambda: Sparse24Weight(torch.zeros(2, 4), torch.zeros(2, 2, dtype=torch.uint8), (2, 8)),
         ValueError, "meta"),
    ],
    ids=["prune-in6", "prune-1d", "prune-list", "prune-int", "prune-scores-shape", "prune-nan",
         "pack-dense", "pack-in10", "pack-full-mask", "pack-float-mask", "weight-in6",
         "weight-values-shape", "weight-meta-dtype", "weight-meta-shape"],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_validate_rejects_invalid_codes():
    w = pack_24(prune_24(torch.randn(4, 16)))
    bad = Sparse24Weight(w.values, torch.zeros_like(w.meta), w.shape)   # i0 == i1 == 0
    with pytest.raises(ValueError, match="invalid groups"):
        bad.validate()


def test_to_keeps_meta_and_casts_values():
    w = pack_24(prune_24(torch.randn(4, 16)))
    h = w.to(torch.float16)
    assert h.dtype == torch.float16 and h.meta.dtype == torch.uint8
    assert torch.equal(h.to_dense(), w.to_dense().half())


def test_packed_bytes_are_56_percent_of_dense_half():
    w = pack_24(prune_24(torch.randn(64, 256, dtype=torch.float16)))
    assert w.num_bytes() / (64 * 256 * 2) == 0.5625


# ---------------------------------------------------------------------------------------------
# PyTorch's semi-structured layout. torch.sparse.to_sparse_semi_structured and torch._cslt_compress
# refuse CPU tensors, but PyTorch's own dense -> CUTLASS conversion
# (sparse_semi_structured_from_dense_cutlass, which to_sparse_semi_structured calls for its CUTLASS
# backend) is plain PyTorch and runs on CPU: our conversion is compared to it bit for bit.
# ---------------------------------------------------------------------------------------------

def _torch_cutlass():
    conv = pytest.importorskip("torch.sparse._semi_structured_conversions")
    return conv.sparse_semi_structured_from_dense_cutlass, conv.sparse_semi_structured_to_dense_cutlass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_IDS.get)
@pytest.mark.parametrize("shape", [(32, 64), (64, 128), (96, 192)], ids=lambda s: f"R{s[0]}-K{s[1]}")
def test_cutlass_layout_matches_pytorch(shape, dtype):
    from_dense, _ = _torch_cutlass()
    dense = prune_24(torch.randn(*shape, dtype=dtype))
    ours = fmt.to_cutlass_layout(pack_24(dense))
    theirs = from_dense(dense)
    assert ours[0].dtype == theirs[0].dtype and ours[1].dtype == theirs[1].dtype
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1], theirs[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_IDS.get)
def test_cutlass_layout_with_zero_kept_entries_decodes_to_same_dense(dtype):
    """With zeros among the kept entries PyTorch may choose other positions; the decoded dense
    matrices must still agree."""
    _, to_dense = _torch_cutlass()
    dense = prune_24(torch.randn(32, 128, dtype=dtype))
    dense[::3, ::5] = 0
    packed, meta = fmt.to_cutlass_layout(pack_24(dense))
    assert torch.equal(to_dense(packed, meta), dense)


def test_cutlass_layout_bad_input():
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        fmt.to_cutlass_layout(pack_24(prune_24(torch.randn(32, 64))))
    with pytest.raises(ValueError, match="multiple of 32"):
        fmt.to_cutlass_layout(pack_24(prune_24(torch.randn(16, 64, dtype=torch.float16))))


def test_to_torch_semi_structured_needs_cuda():
    w = pack_24(prune_24(torch.randn(32, 64, dtype=torch.float16)))
    with pytest.raises(ValueError, match="CUDA"):
        fmt.to_torch_semi_structured(w)
    with pytest.raises(TypeError, match="Sparse24Weight"):
        fmt.to_torch_semi_structured(w.to_dense())
