"""Tier 1 (cpu): the Monarch / block-wise low-rank reference, layout, op registration and errors."""

import pytest
import torch

from conftest import DTYPES, assert_close_ref, monarch_ops, monarch_ref64, monarch_shape_id
from fastfactor.kernels import monarch as Mk
from fastfactor.ops.monarch import _monarch_bwd, _monarch_fwd, block_lowrank_linear, monarch_linear

OPS = monarch_ops()

# (M, K, N, nblocks, rank): odd sizes, in != out, sizes not divisible by nblocks, rank 1 and 2+
SHAPES = [
    (7, 12, 12, 2, 1),
    (5, 13, 11, 3, 2),
    (9, 30, 17, 4, 3),
    (3, 10, 25, 5, 1),
    (4, 16, 16, 1, 4),
]
SHAPE_IDS = [monarch_shape_id(s) for s in SHAPES]


def make(M, K, N, b, r, dtype=torch.float32, bias=True, requires_grad=False):
    s1, s2 = Mk.factor_shapes(K, N, b, r)
    t = lambda *s: torch.randn(*s, dtype=dtype).requires_grad_(requires_grad)
    return t(M, K), t(*s1), t(*s2), (t(N) if bias else None)


@pytest.mark.parametrize("strided", [True, False], ids=["monarch", "blr"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_dense_weight_layout(shape, strided):
    """W[o(l, s), j·kb + c] = Σ_t w2[l, s, j·r+t]·w1[j, l·r+t, c], entry by entry."""
    _, K, N, b, r = shape
    _, w1, w2, _ = make(1, K, N, b, r, dtype=torch.float64, bias=False)
    W = Mk.dense_weight_ref(w1, w2, K, N, strided)
    kb, nb = Mk.cdiv(K, b), Mk.cdiv(N, b)
    expected = torch.zeros(b * nb, b * kb, dtype=torch.float64)
    for l in range(b):
        for s in range(nb):
            o = s * b + l if strided else l * nb + s
            for j in range(b):
                for c in range(kb):
                    expected[o, j * kb + c] = sum(
                        w2[l, s, j * r + t] * w1[j, l * r + t, c] for t in range(r)
                    )
    torch.testing.assert_close(W, expected[:N, :K], rtol=0, atol=1e-12)


@pytest.mark.parametrize("strided", [True, False], ids=["monarch", "blr"])
def test_sub_blocks_have_rank_r(strided):
    K, N, b, r = 24, 18, 3, 2
    _, w1, w2, _ = make(1, K, N, b, r, dtype=torch.float64, bias=False)
    W = Mk.dense_weight_ref(w1, w2, K, N, strided)
    kb, nb = K // b, N // b
    for l in range(b):
        rows = torch.arange(nb) * b + l if strided else torch.arange(nb) + l * nb
        for j in range(b):
            block = W[rows][:, j * kb:(j + 1) * kb]
            assert torch.linalg.matrix_rank(block).item() == r
    # and the other family's grouping does not give rank-r blocks (the permutations differ)
    rows = torch.arange(nb) + 0 * nb if strided else torch.arange(nb) * b
    assert torch.linalg.matrix_rank(W[rows][:, :kb]).item() > r


def test_classic_monarch_square_rank1():
    """n = b², r = 1: the classic Monarch of Dao et al.; P₂·L·P₁·R equals the explicit product of
    permutation and block-diagonal matrices."""
    b = 4
    n = b * b
    _, w1, w2, _ = make(1, n, n, b, 1, dtype=torch.float64, bias=False)
    R = torch.block_diag(*w1)                # (n, n): block j rows l·r+t = l (r = 1)
    L = torch.block_diag(*w2)
    P = torch.zeros(n, n, dtype=torch.float64)
    for i in range(b):
        for k in range(b):
            P[k * b + i, i * b + k] = 1.0    # transpose of the b x b grid
    torch.testing.assert_close(Mk.dense_weight_ref(w1, w2, n, n, True), P @ L @ P @ R)
    torch.testing.assert_close(Mk.dense_weight_ref(w1, w2, n, n, False), L @ P @ R)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_reference_vs_float64(shape, op, dtype, bias):
    M, K, N, b, r = shape
    fn, strided = OPS[op]
    x, w1, w2, bb = make(M, K, N, b, r, dtype, bias)
    y = fn(x, w1, w2, bb, out_features=N)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close_ref(y, monarch_ref64(x, w1, w2, bb, N, strided), dtype, reduction=max(K, b * r), name="y")


@pytest.mark.parametrize("op", OPS, ids=str)
def test_reference_gradients_vs_float64(op):
    """fp32 gradients of the op (CPU reference) against float64 autograd of the dense form."""
    fn, strided = OPS[op]
    M, K, N, b, r = 6, 13, 11, 3, 2
    x, w1, w2, bb = make(M, K, N, b, r, torch.float32, True, requires_grad=True)
    g = torch.randn(M, N)
    grads = torch.autograd.grad(fn(x, w1, w2, bb, out_features=N), (x, w1, w2, bb), g)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w1, w2, bb)]
    ref = monarch_ref64(*leaves64, N, strided)
    grads64 = torch.autograd.grad(ref, leaves64, g.double())
    for name, a, e in zip(("dx", "dw1", "dw2", "db"), grads, grads64):
        assert_close_ref(a, e, torch.float32, reduction=max(M, K, N), name=name)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("op", OPS, ids=str)
def test_gradcheck_float64(op, bias):
    fn, _ = OPS[op]
    x, w1, w2, bb = make(3, 7, 5, 2, 2, torch.float64, bias, requires_grad=True)
    args = (x, w1, w2) + ((bb,) if bias else ())
    f = lambda *a: fn(*a, out_features=5)
    assert torch.autograd.gradcheck(f, args)


def test_leading_dims_noncontiguous_zero_size():
    M, K, N, b, r = 6, 13, 11, 3, 2
    _, w1, w2, bb = make(M, K, N, b, r)
    x = torch.randn(2, 3, 2 * K)[..., ::2]                  # non-contiguous, leading dims
    assert not x.is_contiguous()
    y = monarch_linear(x, w1, w2, bb)
    assert y.shape == (2, 3, N)
    assert_close_ref(y, monarch_ref64(x, w1, w2, bb, N, True), torch.float32, reduction=K)
    x0 = torch.randn(0, 4, K, requires_grad=True)
    y0 = monarch_linear(x0, w1, w2, bb)
    assert y0.shape == (0, 4, N)
    y0.sum().backward()
    assert x0.grad.shape == x0.shape


def test_out_features_default_and_without_bias():
    M, K, N, b, r = 4, 12, 10, 4, 1      # nb = 3, b·nb = 12 != N
    x, w1, w2, bb = make(M, K, N, b, r)
    assert monarch_linear(x, w1, w2, bb).shape == (M, N)          # from the bias
    assert monarch_linear(x, w1, w2).shape == (M, 12)             # b·nb without bias
    y = monarch_linear(x, w1, w2, out_features=N)
    assert_close_ref(y, monarch_ref64(x, w1, w2, None, N, True), torch.float32, reduction=K)


@pytest.mark.parametrize("strided", [True, False], ids=["monarch", "blr"])
@pytest.mark.parametrize("save_h", [True, False], ids=["save", "nosave"])
def test_opcheck_cpu(strided, save_h):
    x, w1, w2, bb = make(5, 13, 11, 3, 2, requires_grad=True)
    torch.library.opcheck(_monarch_fwd, (x, w1, w2, bb, 11, strided, save_h))
    torch.library.opcheck(_monarch_fwd, (x, w1, w2, None, 11, strided, save_h))
    g = torch.randn(5, 11)
    h = torch.empty(0)
    torch.library.opcheck(_monarch_bwd, (g, x.detach(), w1.detach(), w2.detach(), h, strided, True, True, True, True))
    torch.library.opcheck(_monarch_bwd, (g, x.detach(), w1.detach(), w2.detach(), h, strided, False, False, True, False))


@pytest.mark.parametrize("op", OPS, ids=str)
def test_compile_fullgraph(op):
    fn, strided = OPS[op]
    torch._dynamo.reset()
    x, w1, w2, bb = make(2 * 5, 13, 11, 3, 2, requires_grad=True)
    x3 = x.detach().reshape(2, 5, 13).requires_grad_()
    f = torch.compile(lambda x, a, b_, c: fn(x, a, b_, c).square().sum(), fullgraph=True, backend="aot_eager")
    loss = f(x3, w1, w2, bb)
    loss.backward()
    leaves64 = [t.detach().double().requires_grad_() for t in (x3, w1, w2, bb)]
    ref = monarch_ref64(*leaves64, 11, strided).square().sum()
    ref.backward()
    assert_close_ref(loss, ref, torch.float32, reduction=13 * 55)
    for t, t64 in zip((x3, w1, w2, bb), leaves64):
        assert_close_ref(t.grad, t64.grad, torch.float32, reduction=55)


# ---------------------------------------------------------------------------------------------
# bad inputs: each names the argument, what was expected, what came
# ---------------------------------------------------------------------------------------------

def _bad_cases():
    x, w1, w2, bb = make(4, 13, 11, 3, 2)
    return [
        ("x-not-tensor", (x.tolist(), w1, w2, bb), {}, TypeError, r"x: expected a torch.Tensor"),
        ("w1-2d", (x, w1[0], w2, bb), {}, ValueError, r"w1: expected a 3-D tensor"),
        ("w2-2d", (x, w1, w2[0], bb), {}, ValueError, r"w2: expected a 3-D tensor"),
        ("w1-rows-not-multiple", (x, w1[:, :5], w2, bb), {}, ValueError, r"w1: expected shape \(nblocks, nblocks·rank"),
        ("w2-blocks", (x, w1, w2[:2], bb), {}, ValueError, r"w2: expected size 3 in dimension 0 \(nblocks"),
        ("w2-rank", (x, w1, w2[..., :3], bb), {}, ValueError, r"w2: expected size 6 in dimension 2"),
        ("x-features", (x[:, :9], w1, w2, bb), {}, ValueError, r"x: expected in_features with ceil\(in_features / nblocks\) = w1.shape\[2\] = 5.*got in_features = x.shape\[-1\] = 9"),
        ("bias-size", (x, w1, w2, bb[:8]), {"out_features": 11}, ValueError, r"bias: expected size 11 in dimension 0"),
        ("out-features", (x, w1, w2, None), {"out_features": 5}, ValueError, r"out_features: expected ceil\(out_features / nblocks\) = w2.shape\[1\] = 4.*got out_features = 5"),
        ("out-features-type", (x, w1, w2, None), {"out_features": 11.0}, TypeError, r"out_features: expected an int or None, got float"),
        ("dtype-mix", (x, w1.double(), w2, bb), {}, TypeError, r"w1: expected dtype float32 \(the dtype of x\), got float64"),
        ("int-dtype", (x.long(), w1, w2, bb), {}, TypeError, r"x: expected dtype in"),
        ("bias-2d", (x, w1, w2, bb[None]), {}, ValueError, r"bias: expected a 1-D tensor"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, args, kw, exc, msg = case
    with pytest.raises(exc, match=msg):
        monarch_linear(*args, **kw)
    with pytest.raises(exc, match=msg):
        block_lowrank_linear(*args, **kw)
