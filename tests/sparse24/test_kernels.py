"""Tier 1 (cpu): ``sparse24_linear`` and ``dense_sparse_linear`` against float64 references —
reference path and interpreted Triton kernels, every dtype, odd sizes, strides, leading dims,
empty batches, bias on/off, all gradients, gradcheck, opcheck, torch.compile and bad input."""

import pytest
import torch

from conftest import DTYPES, assert_close_ref
from fastfactor.formats.sparse24 import Sparse24Weight, pack_24, prune_24
from fastfactor.kernels import sparse24 as K
from fastfactor.ops import sparse24 as ops
from fastfactor.ops.sparse24 import dense_sparse_linear, sparse24_linear

DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
BACKENDS = ["ref", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the op through the PyTorch reference or the interpreted Triton kernels."""
    if request.param == "ref":
        yield "ref"
        return
    request.getfixturevalue("triton_cpu")
    yield "triton"


def sparse_weight(rows, k, dtype, requires_grad=True):
    w = pack_24(prune_24(torch.randn(rows, k, dtype=torch.float32) / k ** 0.5))
    values = w.values.to(dtype).requires_grad_(requires_grad)
    return Sparse24Weight(values, w.meta, w.shape)


def make_x(lead, k, dtype, layout):
    if layout == "contig":
        x = torch.randn(*lead, k)
    else:  # non-contiguous: a transposed view with the same logical shape
        x = torch.randn(k, *lead).movedim(0, -1)
        assert not x.is_contiguous()
    return x.to(dtype).requires_grad_(True)


def ref64(fn, *tensors):
    """Run ``fn`` on float64 leaf copies; returns (output, copies)."""
    copies = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    return fn(*copies), copies


# ---------------------------------------------------------------------------------------------
# sparse24_linear
# ---------------------------------------------------------------------------------------------

SP_CASES = [((13,), 37, 44), ((2, 5), 23, 72), ((3,), 16, 4)]
SP_IDS = [f"lead{'x'.join(map(str, l))}-N{n}-K{k}" for l, n, k in SP_CASES]


@pytest.mark.parametrize("layout", ["contig", "strided"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("case", SP_CASES, ids=SP_IDS)
def test_sparse24_linear_fwd_bwd(backend, case, dtype, bias, layout):
    lead, n, k = case
    x = make_x(lead, k, dtype, layout)
    w = sparse_weight(n, k, dtype)
    b = (torch.randn(n) * 0.1).to(dtype).requires_grad_(True) if bias else None
    y = sparse24_linear(x, w, b)
    assert y.shape == (*lead, n) and y.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)

    def f(x_, v_, b_):
        return K.sparse24_linear_ref(x_, v_, w.meta, b_)

    y64, (x64, v64, b64) = ref64(f, x, w.values, b)
    y64.backward(g.double())
    assert_close_ref(y, y64, dtype, reduction=k, name="y")
    m = x.numel() // k
    assert_close_ref(x.grad, x64.grad, dtype, reduction=n, name="dx")
    assert_close_ref(w.values.grad, v64.grad, dtype, reduction=m, name="dvalues")
    if bias:
        assert_close_ref(b.grad, b64.grad, dtype, reduction=m, name="dbias")


def test_sparse24_grad_of_values_is_dense_grad_at_kept_positions():
    """The values' gradient equals the dense weight gradient restricted to the mask."""
    x = torch.randn(9, 16, dtype=torch.float64)
    w = sparse_weight(6, 16, torch.float64)
    sparse24_linear(x, w).sum().backward()
    dense = w.to_dense().detach().requires_grad_(True)
    (x @ dense.t()).sum().backward()
    assert torch.allclose(w.values.grad, K.compress_like(dense.grad, w.meta))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_sparse24_zero_batch(backend, bias):
    x = torch.randn(0, 3, 12, requires_grad=True)
    w = sparse_weight(5, 12, torch.float32)
    b = torch.randn(5, requires_grad=True) if bias else None
    y = sparse24_linear(x, w, b)
    assert y.shape == (0, 3, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.values.grad, torch.zeros_like(w.values))
    if bias:
        assert torch.equal(b.grad, torch.zeros(5))


def test_sparse24_gradcheck():
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = sparse_weight(5, 8, torch.float64)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fn = lambda x_, v_, b_: sparse24_linear(x_, Sparse24Weight(v_, w.meta, w.shape), b_)
    assert torch.autograd.gradcheck(fn, (x, w.values, b))


def test_sparse24_opcheck():
    x = torch.randn(7, 12)
    w = sparse_weight(5, 12, torch.float32)
    b = torch.randn(5, requires_grad=True)
    torch.library.opcheck(torch.ops.fastfactor.sparse24_fwd.default, (x, w.values, w.meta, b))
    torch.library.opcheck(torch.ops.fastfactor.sparse24_fwd.default, (x, w.values, w.meta, None))
    g = torch.randn(7, 5)
    torch.library.opcheck(
        torch.ops.fastfactor.sparse24_bwd.default, (g, x, w.values.detach(), w.meta, True, True, True)
    )


def test_sparse24_compile_fullgraph():
    torch._dynamo.reset()
    w = sparse_weight(6, 20, torch.float32)
    b = torch.randn(6, requires_grad=True)

    def fn(x):
        return torch.relu(sparse24_linear(x, w, b)).sum()

    x = torch.randn(4, 20, requires_grad=True)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.backward()
    gx, gv = x.grad.clone(), w.values.grad.clone()
    x.grad = None
    w.values.grad = None
    ref = fn(x)
    ref.backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(gx, x.grad, atol=1e-5) and torch.allclose(gv, w.values.grad, atol=1e-5)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda w: (torch.randn(3, 10), w, None), ValueError, "x: expected last dimension 12"),
        (lambda w: (torch.randn(3, 14), w, None), ValueError, "multiple of 4|pad"),
        (lambda w: (torch.randn(3, 12, dtype=torch.float64), w, None), TypeError, "w.values"),
        (lambda w: (torch.randn(3, 12), w, torch.randn(4)), ValueError, "bias"),
        (lambda w: (torch.randn(3, 12), w.to_dense(), None), TypeError, "Sparse24Weight"),
        (lambda w: ([1.0], w, None), TypeError, "x"),
    ],
    ids=["x-width", "x-width-not-mult4", "dtype-mismatch", "bias-shape", "dense-weight", "x-list"],
)
def test_sparse24_bad_input(make, exc, match):
    w = sparse_weight(5, 12, torch.float32, requires_grad=False)
    with pytest.raises(exc, match=match):
        sparse24_linear(*make(w))


def test_sparse24_bad_packed_tensors():
    w = sparse_weight(5, 12, torch.float32, requires_grad=False)
    with pytest.raises(TypeError, match="w.meta"):
        ops.sparse24_linear_packed(torch.randn(2, 12), w.values, w.meta.float())
    with pytest.raises(ValueError, match="w.meta"):
        ops.sparse24_linear_packed(torch.randn(2, 12), w.values, w.meta[:3])


def test_choose_sparse24_path(monkeypatch):
    # a CUDA sm_90 device as the chooser sees it (its decision logic runs on any machine)
    from fastfactor.kernels import _config

    monkeypatch.setattr(_config, "semi_structured_ok", lambda device: device.type == "cuda")
    cuda, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16
    monkeypatch.delenv("FASTFACTOR_SPARSE24_PATH", raising=False)
    assert ops.choose_sparse24_path(12, 4096, 4096, bf16, cuda) == "decode"    # M % 8: not PyTorch's
    assert ops.choose_sparse24_path(1, 4096, 4096, bf16, cuda) == "decode"
    assert ops.choose_sparse24_path(4096, 4096, 4096, bf16, cuda) == "torch"
    assert ops.choose_sparse24_path(4096, 4096, 4096, bf16, cpu) != "torch"
    assert ops.choose_sparse24_path(4096, 4096, 4096, torch.float32, cuda) != "torch"
    assert ops.choose_sparse24_path(4096, 4100, 4096, bf16, cuda) != "torch"   # CUTLASS shape limits
    assert ops.choose_sparse24_path(4100, 4096, 4096, bf16, cuda) != "torch"   # M % 8
    monkeypatch.setattr(ops, "SPARSE24_TORCH_MIN_M", 1)
    assert ops.choose_sparse24_path(16, 4096, 4096, bf16, cuda) == "torch"
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PATH", "triton")
    assert ops.choose_sparse24_path(8192, 4096, 4096, bf16, cuda) == "triton"
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PATH", "bogus")
    with pytest.raises(ValueError, match="FASTFACTOR_SPARSE24_PATH"):
        ops.choose_sparse24_path(16, 4096, 4096, bf16, cuda)


# ---------------------------------------------------------------------------------------------
# dense_sparse_linear
# ---------------------------------------------------------------------------------------------

DS_CASES = [((13,), 23, 19, 44), ((2, 3), 17, 5, 72), ((5,), 37, 40, 12)]
DS_IDS = [f"lead{'x'.join(map(str, l))}-N{n}-R{r}-K{k}" for l, n, r, k in DS_CASES]


def _ds_check(case, dtype, bias, layout):
    lead, n, r, k = case
    x = make_x(lead, k, dtype, layout)
    s = sparse_weight(r, k, dtype)
    d = (torch.randn(n, r) / r ** 0.5).to(dtype).requires_grad_(True)
    b = (torch.randn(n) * 0.1).to(dtype).requires_grad_(True) if bias else None
    y = dense_sparse_linear(x, d, s, b)
    assert y.shape == (*lead, n) and y.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)

    def f(x_, d_, v_, b_):
        return K.dense_sparse_linear_ref(x_, d_, v_, s.meta, b_)

    y64, (x64, d64, v64, b64) = ref64(f, x, d, s.values, b)
    y64.backward(g.double())
    m = x.numel() // k
    assert_close_ref(y, y64, dtype, reduction=k + r, name="y")
    assert_close_ref(x.grad, x64.grad, dtype, reduction=n + r, name="dx")
    assert_close_ref(d.grad, d64.grad, dtype, reduction=m * k, name="dD")
    assert_close_ref(s.values.grad, v64.grad, dtype, reduction=m * n, name="dS.values")
    if bias:
        assert_close_ref(b.grad, b64.grad, dtype, reduction=m, name="dbias")


@pytest.mark.parametrize("layout", ["contig", "strided"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("case", DS_CASES, ids=DS_IDS)
def test_dense_sparse_linear_fwd_bwd(backend, case, dtype, bias, layout):
    _ds_check(case, dtype, bias, layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_IDS.get)
def test_dense_sparse_two_kernel_path(triton_cpu, monkeypatch, dtype):
    """The unfused path (sparse kernel for t, then the GEMM) taken for large ranks / many rows."""
    monkeypatch.setenv("FASTFACTOR_DS_PATH", "two_kernel")
    _ds_check(((11,), 21, 18, 44), dtype, True, "contig")


def test_choose_ds_path(monkeypatch):
    """Forced paths and their fallbacks (the cost rule: tests/sparse24/test_ds_dispatch.py)."""
    monkeypatch.delenv("FASTFACTOR_DS_PATH", raising=False)
    cpu, fp16 = torch.device("cpu"), torch.float16
    assert K.choose_ds_path(128, 4096, 4096, 257, device=cpu) == "library"     # above the fused rank limit
    assert K.choose_ds_path(16, 4096, 4096, 257, device=cpu) == "roles"        # a handful of tokens: two roles
    assert K.choose_ds_path(128, 4096, 4096, 257, fp16, cpu) == "two_kernel"   # fp16: no library path
    assert K.choose_ds_path(128, 4096, 4096, 256, fp16, cpu) == "fused"
    assert K.choose_ds_path(16, 4096, 4096, 256, fp16, cpu) == "roles"         # against the two-kernel bound
    monkeypatch.setenv("FASTFACTOR_DS_PATH", "fused")
    assert K.choose_ds_path(8192, 4096, 4096, 64, device=cpu) == "fused"
    assert K.choose_ds_path(16, 4096, 4096, 600, device=cpu) == "two_kernel"
    monkeypatch.setenv("FASTFACTOR_DS_PATH", "library")
    assert K.choose_ds_path(16, 4096, 4096, 64, device=cpu) == "library"
    assert K.choose_ds_path(16, 4096, 4096, 64, fp16, cpu) == "two_kernel"
    monkeypatch.setenv("FASTFACTOR_DS_PATH", "nope")
    with pytest.raises(ValueError, match="FASTFACTOR_DS_PATH"):
        K.choose_ds_path(16, 4096, 4096, 64, device=cpu)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_dense_sparse_zero_batch(backend, bias):
    x = torch.randn(0, 12, requires_grad=True)
    s = sparse_weight(5, 12, torch.float32)
    d = torch.randn(7, 5, requires_grad=True)
    b = torch.randn(7, requires_grad=True) if bias else None
    y = dense_sparse_linear(x, d, s, b)
    assert y.shape == (0, 7)
    y.sum().backward()
    assert torch.equal(d.grad, torch.zeros_like(d))
    assert torch.equal(s.values.grad, torch.zeros_like(s.values))


def test_dense_sparse_gradcheck():
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    s = sparse_weight(4, 8, torch.float64)
    d = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fn = lambda x_, d_, v_, b_: dense_sparse_linear(x_, d_, Sparse24Weight(v_, s.meta, s.shape), b_)
    assert torch.autograd.gradcheck(fn, (x, d, s.values, b))


def test_dense_sparse_opcheck():
    x = torch.randn(7, 12)
    s = sparse_weight(5, 12, torch.float32)
    d = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(6)
    for save_t in (True, False):
        torch.library.opcheck(
            torch.ops.fastfactor.dense_sparse_fwd.default, (x, d, s.values, s.meta, b, save_t)
        )
    g = torch.randn(7, 6)
    t = x @ s.to_dense().detach().t()
    torch.library.opcheck(
        torch.ops.fastfactor.dense_sparse_bwd.default,
        (g, x, d.detach(), s.values.detach(), s.meta, t, True, True, True, True),
    )
    torch.library.opcheck(torch.ops.fastfactor.mask24.default, (torch.randn(4, 8),))


def test_dense_sparse_compile_fullgraph():
    torch._dynamo.reset()
    s = sparse_weight(6, 20, torch.float32)
    d = torch.randn(9, 6, requires_grad=True)

    def fn(x):
        return dense_sparse_linear(x, d, s).square().sum()

    x = torch.randn(4, 20, requires_grad=True)
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
    out.backward()
    grads = [t.grad.clone() for t in (x, d, s.values)]
    for t in (x, d, s.values):
        t.grad = None
    ref = fn(x)
    ref.backward()
    assert torch.allclose(out, ref, rtol=1e-5)
    for a, t in zip(grads, (x, d, s.values)):
        assert torch.allclose(a, t.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda s, d: (torch.randn(3, 16), d, s, None), ValueError, "x: expected last dimension 12"),
        (lambda s, d: (torch.randn(3, 12), d[:, :4], s, None), ValueError, "d: expected size 5"),
        (lambda s, d: (torch.randn(3, 12), d.double(), s, None), TypeError, "d: expected dtype float32"),
        (lambda s, d: (torch.randn(3, 12), d, s, torch.randn(7)), ValueError, "bias"),
        (lambda s, d: (torch.randn(3, 12), d, s.to_dense(), None), TypeError, "Sparse24Weight"),
    ],
    ids=["x-width", "rank-mismatch", "d-dtype", "bias-shape", "dense-s"],
)
def test_dense_sparse_bad_input(make, exc, match):
    s = sparse_weight(5, 12, torch.float32, requires_grad=False)
    d = torch.randn(6, 5)
    with pytest.raises(exc, match=match):
        dense_sparse_linear(*make(s, d))


# ---------------------------------------------------------------------------------------------
# straight-through 2:4 projection
# ---------------------------------------------------------------------------------------------

def test_ste_24_forward_is_prune_and_gradient_is_identity():
    w = torch.randn(6, 16, requires_grad=True)
    p = ops.ste_24(w)
    assert torch.equal(p, prune_24(w))
    g = torch.randn(6, 16)
    p.backward(g)
    assert torch.equal(w.grad, g)    # pruned entries get their gradient too


def test_ste_24_compiles_fullgraph():
    torch._dynamo.reset()
    w = torch.randn(6, 16, requires_grad=True)
    fn = lambda x: (x @ ops.ste_24(w).t()).sum()
    x = torch.randn(3, 16)
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
    assert torch.allclose(out, fn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, r, k", [(0, 0, 8), (3, 0, 8), (3, 2, 0), (0, 2, 8)], ids=lambda v: str(v))
def test_zero_size_weights(backend, n, r, k):
    """Empty weights (no output rows, rank 0, or in_features 0) give correctly shaped results
    and gradients (zeros) on both backends."""
    x = torch.randn(3, k, requires_grad=True)
    w = sparse_weight(n, k, torch.float32)
    b = torch.randn(n, requires_grad=True)
    y = sparse24_linear(x, w, b)
    assert y.shape == (3, n)
    assert torch.allclose(y, x.detach() @ w.to_dense().detach().t() + b.detach())
    y.sum().backward()
    assert x.grad.shape == x.shape and w.values.grad.shape == w.values.shape
    x.grad = None
    s = sparse_weight(r, k, torch.float32)
    d = torch.randn(n, r, requires_grad=True)
    y = dense_sparse_linear(x, d, s, b)
    assert y.shape == (3, n)
    assert torch.allclose(y, (x.detach() @ s.to_dense().detach().t()) @ d.detach().t() + b.detach(), atol=1e-6)
    y.sum().backward()
    assert x.grad.shape == x.shape and d.grad.shape == d.shape and s.values.grad.shape == s.values.shape
    assert torch.equal(b.grad, torch.full((n,), 6.0))
