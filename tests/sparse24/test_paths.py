"""Tier 1 (cpu): the 2:4 paths beside our kernels: the expansion and selection launches (codes
read as 32-bit words or bytes), the forced cuBLAS ('dense') forward and backward through the
interpreter against float64, PyTorch's semi-structured path fed our packed tensors (its GEMM
replaced on CPU by PyTorch's own CUTLASS-layout decoder), and the cost-based path choice."""

import pytest
import torch

from conftest import assert_close_ref
from fastfactor.formats.sparse24 import Sparse24Weight, pack_24, prune_24, to_cutlass_layout
from fastfactor.kernels import _config
from fastfactor.kernels import sparse24 as K
from fastfactor.ops import sparse24 as ops


def _packed(rows, k, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    w = pack_24(prune_24(torch.randn(rows, k)))
    return Sparse24Weight(w.values.to(dtype), w.meta, w.shape)


@pytest.mark.parametrize("rows,k", [(37, 64), (16, 96), (9, 44), (33, 8)], ids=lambda v: str(v))
def test_expand_and_compress_are_exact(triton_cpu, rows, k):
    w = _packed(rows, k)
    mt, _, _, words = K._meta_arg(w.meta, k)
    assert words == (k % 32 == 0) and (mt.dtype == torch.int32) == words
    dense = K.expand_24(w.values, w.meta)
    assert torch.equal(dense, K.unpack_24(w.values, w.meta, k))
    d = torch.randn(rows, k)
    assert torch.equal(K.compress_24(d, w.meta), K.compress_like(d, w.meta))
    # a strided (column-sliced) meta falls back to bytes and stays exact
    wide = torch.zeros(rows, w.meta.shape[1] + 3, dtype=torch.uint8)
    wide[:, 1:1 + w.meta.shape[1]] = w.meta
    m2 = wide[:, 1:1 + w.meta.shape[1]]
    assert not K._meta_arg(m2, k)[3]
    assert torch.equal(K.expand_24(w.values, m2), dense)


@pytest.mark.parametrize("what", ["fwd", "bwd"])
def test_dense_path_matches_float64(triton_cpu, monkeypatch, what):
    """``dense``: expand once + cuBLAS (torch.mm here) for y, dx and the kept entries of gᵀ·x."""
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PATH", "dense" if what == "fwd" else "triton")
    monkeypatch.setenv("FASTFACTOR_SPARSE24_BWD_PATH", "dense")
    w = _packed(40, 96, seed=1)
    values = w.values.clone().requires_grad_(True)
    x = torch.randn(2, 7, 96, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    y = ops.sparse24_linear(x, Sparse24Weight(values, w.meta, w.shape), b)
    x64, v64, b64 = (t.detach().double().requires_grad_(True) for t in (x, values, b))
    y64 = x64 @ K.unpack_24(v64, w.meta, 96).t() + b64
    assert_close_ref(y, y64, torch.float32, reduction=96, name="y")
    g = torch.randn_like(y)
    y.backward(g)
    y64.backward(g.double())
    assert_close_ref(x.grad, x64.grad, torch.float32, reduction=40, name="dx")
    assert_close_ref(values.grad, v64.grad, torch.float32, reduction=14, name="dvalues")
    assert_close_ref(b.grad, b64.grad, torch.float32, reduction=14, name="db")


def _cutlass_gemm_on_cpu(monkeypatch):
    """PyTorch's semi-structured GEMMs on CPU: its own CUTLASS-layout decoder, then a matmul."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

    calls = []

    def mm(packed, meta, dense):
        calls.append("mm")
        return (sparse_semi_structured_to_dense_cutlass(packed, meta).float() @ dense.float()).to(dense.dtype)

    def addmm(bias, packed, meta, dense):
        calls.append("addmm")
        return (bias[:, None].float() + mm(packed, meta, dense).float()).to(dense.dtype)

    monkeypatch.setattr(torch, "_sparse_semi_structured_mm", mm)
    monkeypatch.setattr(torch, "_sparse_semi_structured_addmm", addmm)
    return calls


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_torch24_linear_feeds_our_packed_tensors(monkeypatch, bias):
    calls = _cutlass_gemm_on_cpu(monkeypatch)
    bf = torch.bfloat16
    w = _packed(64, 128, bf, seed=2)
    x = torch.randn(24, 128).to(bf)
    b = torch.randn(64).to(bf) if bias else None
    y = K.torch24_linear(x, w.values, w.meta, b)
    assert y.shape == (24, 64) and y.stride() == (1, 24)        # the transposed view of W·xᵀ
    ref = x.double() @ w.to_dense().double().t() + (b.double() if bias else 0)
    assert_close_ref(y, ref, bf, reduction=128)
    assert calls[0] == ("addmm" if bias else "mm")
    # a non-contiguous x is accepted
    xs = torch.randn(128, 24).to(bf).t()
    assert_close_ref(K.torch24_linear(xs, w.values, w.meta, b),
                     xs.double() @ w.to_dense().double().t() + (b.double() if bias else 0), bf, 128)


def test_torch24_meta_is_cutlass_layout_and_cached():
    w = _packed(64, 128, torch.bfloat16, seed=3)
    m1 = K.torch24_meta(w.meta, 64, 128)
    assert torch.equal(m1, to_cutlass_layout(w)[1])
    assert K.torch24_meta(w.meta, 64, 128) is m1                 # cached: once per mask
    with torch.no_grad():
        w.meta[0, 0] = (w.meta[0, 0] & 0xF0) | 0b1001             # codes change -> rebuilt
    assert K.torch24_meta(w.meta, 64, 128) is not m1


def test_module_converts_codes_at_pack_time():
    from fastfactor.layers.sparse24 import Sparse24Linear

    mod = Sparse24Linear(128, 64, dtype=torch.bfloat16)
    assert getattr(mod.meta, "_fastfactor_cutlass", None) is not None


def test_torch_path_through_the_op(monkeypatch, triton_cpu):
    """The op's ``torch`` path (forced on CPU with the GEMM stand-in): forward through PyTorch's
    layout, backward exact through our kernels."""
    _cutlass_gemm_on_cpu(monkeypatch)
    monkeypatch.setattr(K, "choose_mm_path", lambda *a, **k: "torch")
    bf = torch.bfloat16
    w = _packed(32, 64, bf, seed=4)
    values = w.values.clone().requires_grad_(True)
    x = torch.randn(16, 64).to(bf).requires_grad_(True)
    y = ops.sparse24_linear(x, Sparse24Weight(values, w.meta, w.shape))
    assert y.stride() == (1, 16)
    x64, v64 = x.detach().double().requires_grad_(True), values.detach().double().requires_grad_(True)
    y64 = x64 @ K.unpack_24(v64, w.meta, 64).t()
    assert_close_ref(y, y64, bf, reduction=64)
    g = torch.randn(16, 32).to(bf)
    y.backward(g)
    y64.backward(g.double())
    assert_close_ref(x.grad, x64.grad, bf, reduction=32, name="dx")
    assert_close_ref(values.grad, v64.grad, bf, reduction=16, name="dvalues")


def test_path_choice_by_cost(monkeypatch):
    monkeypatch.delenv("FASTFACTOR_SPARSE24_PATH", raising=False)
    monkeypatch.delenv("FASTFACTOR_SPARSE24_BWD_PATH", raising=False)
    monkeypatch.setattr(_config, "semi_structured_ok", lambda device: device.type == "cuda")
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    for M in (16, 64):
        assert K.choose_bwd_path(M, 4096, 4096, bf16, "dx") == "triton"
    # decode sizes: our decode launch unless PyTorch's one launch is predicted faster (at 16 tokens
    # on 4096² ours now: the sparse tensor-core decode with 3-bit codes and its partials dropped,
    # 6.83 us, against PyTorch's ideal 6.95 at its 4-bit format; at 64 tokens PyTorch's); never
    # PyTorch where it is not eligible (M % 8)
    assert K.choose_mm_path(16, 4096, 4096, bf16, cuda) == "decode"
    monkeypatch.setenv("FASTFACTOR_SPARSE24_CODES3", "0")
    monkeypatch.setenv("FASTFACTOR_SPLIT_DISCARD", "0")
    assert K.choose_mm_path(16, 4096, 4096, bf16, cuda) == "torch"        # 7.19 us with neither
    monkeypatch.delenv("FASTFACTOR_SPARSE24_CODES3")
    monkeypatch.delenv("FASTFACTOR_SPLIT_DISCARD")
    assert K.choose_mm_path(1, 4096, 4096, bf16, cuda) == "decode"
    assert K.choose_mm_path(12, 4096, 4096, bf16, cuda) == "decode"
    assert K.choose_mm_path(64, 4096, 4096, bf16, cuda) == "torch"
    assert K.choose_mm_path(60, 4096, 4096, bf16, cuda) == "decode"
    for M in range(8, K.DECODE_MAX_M + 1, 8):
        for n, k in ((4096, 4096), (3072, 768), (768, 3072)):
            t_dec = K.decode_seconds(M, n, k, 132)         # the cheaper of the two decodes
            t_torch = K.path_costs(M, k, n, bf16, "fwd")["torch"]
            want = "torch" if t_torch < t_dec else "decode"
            assert K.choose_mm_path(M, k, n, bf16, cuda) == want, (M, n, k)
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PATH", "decode")
    assert K.choose_mm_path(64, 4096, 4096, bf16, cuda) == "decode"
    monkeypatch.delenv("FASTFACTOR_SPARSE24_PATH")
    assert K.choose_mm_path(16384, 4096, 4096, bf16, cuda) == "torch"
    assert K.choose_mm_path(16384, 4096, 4096, torch.float32, cuda) in ("dense", "triton")
    for M in (128, 1024, 16384):
        for n, k in ((4096, 4096), (3072, 768), (768, 3072)):
            c = K.path_costs(M, k, n, bf16, "fwd")
            got = K.choose_mm_path(M, k, n, bf16, cuda)
            assert c[got] == min(c.values())
            # never predicted slower than expanding once and calling cuBLAS (>= dense F.linear)
            assert c[got] <= c["dense"]
            assert c["torch"] < c["dense"] or M < 1024
    assert K.choose_bwd_path(16384, 4096, 4096, bf16, "dvalues") == "dense"
    monkeypatch.setenv("FASTFACTOR_SPARSE24_BWD_PATH", "triton")
    assert K.choose_bwd_path(16384, 4096, 4096, bf16, "dx") == "triton"
    monkeypatch.setenv("FASTFACTOR_SPARSE24_BWD_PATH", "nope")
    with pytest.raises(ValueError, match="FASTFACTOR_SPARSE24_BWD_PATH"):
        K.choose_bwd_path(16384, 4096, 4096, bf16, "dx")
    with pytest.raises(ValueError, match="what"):
        K.path_costs(16, 64, 64, bf16, "dw")


def test_cpu_never_takes_the_torch_path():
    assert not K.torch24_eligible(4096, 4096, 4096, torch.bfloat16, torch.device("cpu"))
    assert K.choose_mm_path(16384, 4096, 4096, torch.bfloat16, torch.device("cpu")) != "torch"


def _transposable(rows, k, seed=0):
    """A 2:4 weight whose pattern is 2:4 along the rows too: in every 4x4 tile, two entries per
    row and per column (a row/column permutation of a block pattern), as a transposable pruning
    (PyTorch's tile pruning, torchao's 2:4 training) produces."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    mask = torch.zeros(rows, k, dtype=torch.bool)
    for r in range(0, rows, 4):
        for c in range(0, k, 4):
            pr, pc = torch.randperm(4, generator=g), torch.randperm(4, generator=g)
            mask[r:r + 4, c:c + 4] = base[pr][:, pc]
    return pack_24(torch.randn(rows, k, generator=g) * mask, mask)


def test_transpose_plan_packs_w_transposed_exactly():
    w = _transposable(32, 64)
    perm, meta_t = K.transpose_plan(w.meta, 32, 64)
    vt = K.transposed_values(w.values, perm)
    assert vt.shape == (64, 16) and meta_t.shape == (64, 4)
    assert torch.equal(K.unpack_24(vt, meta_t, 32), w.to_dense().t())
    assert K.transpose_plan(w.meta, 32, 64)[0] is perm                  # cached per mask
    assert K.transpose_plan(_packed(32, 64, seed=7).meta, 32, 64) is None   # a row-wise mask


def test_dx_on_sparse_tensor_cores_with_a_transposable_mask(monkeypatch, triton_cpu):
    calls = _cutlass_gemm_on_cpu(monkeypatch)
    monkeypatch.setattr(K, "torch24_eligible", lambda *a: True)
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PATH", "dense")
    monkeypatch.setenv("FASTFACTOR_SPARSE24_BWD_PATH", "torch")
    bf = torch.bfloat16
    w = _transposable(64, 64, seed=1)
    values = w.values.to(bf).requires_grad_(True)
    x = torch.randn(16, 64).to(bf).requires_grad_(True)
    y = ops.sparse24_linear(x, Sparse24Weight(values, w.meta, w.shape))
    g = torch.randn(16, 64).to(bf)
    y.backward(g)
    assert calls, "dx did not take PyTorch's 2:4 GEMM"
    assert x.grad.is_contiguous()
    assert_close_ref(x.grad, g.double() @ w.to_dense().double(), bf, reduction=64, name="dx")
    assert K.choose_bwd_path(16384, 4096, 4096, bf, "dx", transposable_ok=True) == "torch"
    monkeypatch.delenv("FASTFACTOR_SPARSE24_BWD_PATH")
    assert K.choose_bwd_path(16384, 4096, 4096, bf, "dx", transposable_ok=True) == "torch"
    assert K.choose_bwd_path(16384, 4096, 4096, bf, "dx") != "torch"


def test_sol_records_the_semi_structured_path_on_small_shapes():
    """PyTorch's semi-structured GEMM has no CPU kernel: ``fastfactor sol`` records it (its shape,
    not its values) even where the recorder would otherwise compute a small op for real."""
    from fastfactor.kernels._config import is_interpreter

    if not is_interpreter():
        pytest.skip("counting needs TRITON_INTERPRET=1")
    from fastfactor.sol.device import H200
    from fastfactor.sol.rows import RowSpec, evaluate_row

    row = evaluate_row(RowSpec("sparse24", 768, 3072, 64, None, "fwd"), H200, configs="fixed")
    assert row["status"] == "predicted, not measured", row.get("error")
    assert "_sparse_semi_structured_addmm" in row["kernels"]
    assert row["speedup_vs_dense"] >= 1.0
