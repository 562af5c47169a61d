"""Tier 1 (cpu): the low-rank op's PyTorch path, the module and the SVD factorization, against float64."""

import math

import pytest
import torch
from conftest import DTYPES, assert_close_ref, check_lowrank_vs_float64, lowrank_ref64

import fastfactor
from fastfactor.factorize import rank_for_ratio, svd_factors, weighted_svd_factors
from fastfactor.kernels.lowrank import lowrank_linear_ref
from fastfactor.ops.lowrank import _lowrank_bwd, _lowrank_fwd

# (leading dims, in, out, rank): odd sizes, rank 1, rank = min(in, out), rank > 256 (beyond the fused kernel)
SHAPES = [
    ((7,), 13, 11, 3),
    ((2, 5), 33, 17, 1),
    ((3, 4), 29, 45, 29),
    ((1,), 300, 290, 290),
]


def _id(s):
    lead, k, n, r = s
    return f"L{'x'.join(map(str, lead))}-K{k}-N{n}-R{r}"


def _inputs(lead, k, n, r, dtype, bias, noncontig=False):
    if noncontig:  # x sliced along its last dim, u and v transposed views
        x = torch.randn(*lead, 2 * k, dtype=dtype)[..., ::2]
        u = (torch.randn(r, n) / math.sqrt(r)).to(dtype).t()
        v = (torch.randn(k, r) / math.sqrt(k)).to(dtype).t()
        assert not x.is_contiguous() and (r == 1 or not u.is_contiguous())
    else:
        x = torch.randn(*lead, k, dtype=dtype)
        u = torch.randn(n, r, dtype=dtype) / math.sqrt(r)
        v = torch.randn(r, k, dtype=dtype) / math.sqrt(k)
    b = torch.randn(n, dtype=dtype) if bias else None
    return x, u, v, b


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "strided"])
def test_forward_and_grads_vs_float64(shape, dtype, bias, noncontig):
    lead, k, n, r = shape
    x, u, v, b = _inputs(lead, k, n, r, dtype, bias, noncontig)
    check_lowrank_vs_float64(x, u, v, b, dtype)


def test_gradcheck_float64():
    x = torch.randn(4, 3, 11, dtype=torch.float64, requires_grad=True)
    u = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fastfactor.lowrank_linear, (x, u, v, b))
    assert torch.autograd.gradcheck(lambda x, u, v: fastfactor.lowrank_linear(x, u, v), (x, u, v))


def test_rank_1024():
    x, u, v, b = _inputs((5,), 1100, 1030, 1024, torch.float32, True)
    assert_close_ref(fastfactor.lowrank_linear(x, u, v, b), lowrank_ref64(x, u, v, b), torch.float32, reduction=1100)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_zero_size_batch(bias):
    x, u, v, b = _inputs((0,), 13, 11, 3, torch.float32, bias)
    u.requires_grad_()
    x.requires_grad_()
    y = fastfactor.lowrank_linear(x, u, v, b)
    assert y.shape == (0, 11)
    y.sum().backward()
    assert x.grad.shape == (0, 13) and torch.equal(u.grad, torch.zeros_like(u))


def test_only_some_grads():
    x, u, v, b = _inputs((6,), 13, 11, 3, torch.float32, True)
    v.requires_grad_()
    fastfactor.lowrank_linear(x, u, v, b).sum().backward()
    assert v.grad is not None and u.grad is None and x.grad is None


def test_inference_does_not_save_intermediate():
    x, u, v, b = _inputs((6,), 13, 11, 3, torch.float32, True)
    y, t = _lowrank_fwd(x, u, v, b, False)
    assert t.numel() == 0
    y, t = _lowrank_fwd(x, u, v, b, True)
    torch.testing.assert_close(t, x @ v.t())


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

BAD = [
    ("x-not-tensor", lambda x, u, v, b: ([1.0], u, v, b), TypeError, "x: expected a torch.Tensor, got list"),
    ("x-0d", lambda x, u, v, b: (torch.tensor(1.0), u, v, b), ValueError, "x: expected at least 1 dimension"),
    ("u-1d", lambda x, u, v, b: (x, u[:, 0], v, b), ValueError, "u: expected a 2-D tensor, got 1-D"),
    ("v-3d", lambda x, u, v, b: (x, u, v[None], b), ValueError, "v: expected a 2-D tensor, got 3-D"),
    ("x-in-mismatch", lambda x, u, v, b: (x[..., :-1], u, v, b), ValueError, "x: expected size 13 in dimension -1"),
    ("u-rank-mismatch", lambda x, u, v, b: (x, u[:, :2], v, b), ValueError, "u: expected size 3 in dimension 1"),
    ("bias-len", lambda x, u, v, b: (x, u, v, b[:-1]), ValueError, "bias: expected size 11 in dimension 0"),
    ("bias-2d", lambda x, u, v, b: (x, u, v, b[None]), ValueError, "bias: expected a 1-D tensor"),
    ("dtype-mix", lambda x, u, v, b: (x, u.half(), v, b), TypeError, "u: expected dtype float32 (the dtype of x), got float16"),
    ("int-x", lambda x, u, v, b: (x.long(), u, v, b), TypeError, "x: expected dtype in"),
    ("device-mix", lambda x, u, v, b: (x, u.to("meta"), v, b), ValueError, "u: expected device cpu"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case):
    _, mutate, exc, msg = case
    x, u, v, b = _inputs((4,), 13, 11, 3, torch.float32, True)
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        fastfactor.lowrank_linear(*mutate(x, u, v, b))


# --------------------------------------------------------------------------------------------
# registration: opcheck and torch.compile
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(bias):
    x, u, v, b = _inputs((9,), 11, 7, 3, torch.float32, bias)
    args = [t.requires_grad_() if t is not None else None for t in (x, u, v, b)]
    torch.library.opcheck(_lowrank_fwd, (*args, True))
    torch.library.opcheck(_lowrank_fwd, (x.detach(), u.detach(), v.detach(), b.detach() if bias else None, False))
    g = torch.randn(9, 7)
    t = x.detach() @ v.detach().t()
    torch.library.opcheck(_lowrank_bwd, (g, x.detach(), u.detach(), v.detach(), t, bias, True, True, True))
    torch.library.opcheck(_lowrank_bwd, (g, x.detach(), u.detach(), v.detach(), torch.empty(0), bias, False, True, False))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    m = fastfactor.LowRankLinear(40, 24, 5)
    x = torch.randn(3, 7, 40, requires_grad=True)
    y_ref = m(x)
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    torch._dynamo.reset()
    f = torch.compile(m, fullgraph=True, backend=backend, dynamic=False)
    y = f(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)


# --------------------------------------------------------------------------------------------
# the module and the factorization
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,n,ratio", [(64, 48, 0.5), (37, 91, 0.25), (10, 10, 0.01), (768, 3072, 0.3)])
def test_rank_for_ratio_formula(k, n, ratio):
    r = rank_for_ratio(k, n, ratio)
    assert r == max(1, math.floor(ratio * k * n / (k + n)))
    if r > 1:
        assert r * (k + n) <= ratio * k * n + 1e-9  # never keeps more than asked
        assert (r + 1) * (k + n) > ratio * k * n    # and is the largest such rank


def test_from_linear_is_truncated_svd():
    lin = torch.nn.Linear(37, 29)
    m = fastfactor.LowRankLinear.from_linear(lin, rank=6)
    w = lin.weight.detach().double()
    s = torch.linalg.svdvals(w)
    err = torch.linalg.norm(m.dense_weight().double() - w)
    # Eckart–Young: the error of the best rank-6 approximation is the norm of the tail singular values
    assert abs(err.item() - s[6:].norm().item()) < 1e-4 * s.norm().item()
    # √Σ split evenly: U and V have equal column/row norms
    torch.testing.assert_close(m.u.norm(dim=0), m.v.norm(dim=1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.bias, lin.bias)
    x = torch.randn(5, 37)
    torch.testing.assert_close(m(x), m.to_linear()(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x), m.forward_unfused(x), rtol=1e-5, atol=1e-5)


def test_module_params_ratio_repr():
    lin = torch.nn.Linear(100, 60, bias=False)
    m = fastfactor.LowRankLinear.from_linear(lin, ratio=0.5)
    r = math.floor(0.5 * 100 * 60 / 160)
    assert m.rank == r and m.bias is None
    assert m.num_weight_params == r * 160 == sum(p.numel() for p in m.parameters())
    assert abs(m.ratio - r * 160 / 6000) < 1e-12
    assert f"rank={r}" in repr(m) and "ratio=0.480" in repr(m)
    m2 = fastfactor.LowRankLinear(**m.factor_config())
    m2.load_state_dict(m.state_dict())
    x = torch.randn(3, 100)
    assert torch.equal(m(x), m2(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_module_dtype(dtype):
    lin = torch.nn.Linear(33, 21).to(dtype)
    m = fastfactor.LowRankLinear.from_linear(lin, ratio=0.6)
    assert m.u.dtype == dtype and m(torch.randn(2, 33, dtype=dtype)).dtype == dtype


def test_module_bad_args():
    lin = torch.nn.Linear(20, 10)
    with pytest.raises(ValueError, match=r"rank: expected an int in \[1, 10\], got 11"):
        fastfactor.LowRankLinear.from_linear(lin, rank=11)
    with pytest.raises(ValueError, match="rank/ratio: expected exactly one"):
        fastfactor.LowRankLinear.from_linear(lin, rank=2, ratio=0.5)
    with pytest.raises(ValueError, match=r"ratio: expected a float in \(0, 1\]"):
        fastfactor.LowRankLinear.from_linear(lin, ratio=1.5)
    with pytest.raises(TypeError, match="linear: expected an nn.Linear"):
        fastfactor.LowRankLinear.from_linear(torch.nn.ReLU(), rank=2)
    bad = torch.nn.Linear(20, 10)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight: expected finite values, found 1 NaN/Inf"):
        fastfactor.LowRankLinear.from_linear(bad, rank=2)


def test_weighted_svd_prefers_heavy_rows():
    w = torch.randn(40, 30, dtype=torch.float64)
    rw = torch.ones(40, dtype=torch.float64)
    rw[:5] = 100.0
    u, v = weighted_svd_factors(w, 5, rw)
    u0, v0 = svd_factors(w, 5)
    err_w = ((w - u @ v)[:5]).norm()
    err_0 = ((w - u0 @ v0)[:5]).norm()
    assert err_w < 0.1 * err_0  # the heavy rows are reproduced almost exactly
    # and it is the optimum of the weighted objective: no worse than plain SVD under that weighting
    assert (rw[:, None] * (w - u @ v)).norm() <= (rw[:, None] * (w - u0 @ v0)).norm() + 1e-9


def test_reference_matches_float64_bf16_rounding():
    # the reference rounds the intermediate to the input dtype like the kernels do
    x, u, v, b = _inputs((8,), 64, 32, 16, torch.bfloat16, True)
    y = lowrank_linear_ref(x, u, v, b)
    t = (x.float() @ v.float().t()).bfloat16().float()
    torch.testing.assert_close(y, (t @ u.float().t() + b.float()).bfloat16())
