"""Tier 1 (cpu): the low-rank op's PyTorch reference path against float64: forward and every
gradient, gradcheck, opcheck, torch.compile, bad input."""

import math

import pytest
import torch
from conftest import DTYPES, assert_close_ref, check_lowrank_vs_float64, lowrank_ref64

import fastfactor
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


def test_reference_matches_float64_bf16_rounding():
    # the reference rounds the intermediate to the input dtype like the kernels do
    x, u, v, b = _inputs((8,), 64, 32, 16, torch.bfloat16, True)
    y = lowrank_linear_ref(x, u, v, b)
    t = (x.float() @ v.float().t()).bfloat16().float()
    torch.testing.assert_close(y, (t @ u.float().t() + b.float()).bfloat16())
