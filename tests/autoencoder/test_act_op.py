"""The nonlinear low-rank op ``y = σ(x·Vᵀ + c)·Uᵀ + b`` (``fastfactor.lowrank_act_linear``): the
PyTorch reference and the Triton kernels (interpreter: the chain kernel's ACT / HAS_CB / GATE
constexprs, and the two-GEMM path) against a float64 oracle written from the definition,
gradients included; gradcheck in float64; fake tensors; bad input."""

import math

import pytest
import torch
from conftest import DTYPES, assert_close_ref

from fastfactor.kernels import lowrank_act as KA
from fastfactor.ops.lowrank_act import lowrank_act_linear

ACTS = ["relu", "gelu", "silu", "tanh", "identity"]
# (leading dims, in, out, rank); rank 20 pads to 32 = two register pieces (16 + 16)
SHAPES = [((3, 5), 19, 23, 5), ((17,), 33, 9, 20)]


def _id(s):
    lead, k, n, r = s
    return f"L{'x'.join(map(str, lead))}-K{k}-N{n}-R{r}"


def oracle64(x, u, v, b, c, act):
    """σ(x·Vᵀ + c)·Uᵀ + b in float64, σ from torch's own functions (independent of act_fwd)."""
    f = {"relu": torch.relu, "gelu": lambda h: torch.nn.functional.gelu(h, approximate="tanh"),
         "silu": torch.nn.functional.silu, "tanh": torch.tanh, "identity": lambda h: h}[act]
    h = x.double() @ v.double().t()
    if c is not None:
        h = h + c.double()
    y = f(h) @ u.double().t()
    return y + b.double() if b is not None else y


def _inputs(shape, dtype, bias, cbias):
    lead, k, n, r = shape
    x = torch.randn(*lead, 2 * k, dtype=dtype)[..., ::2]  # non-contiguous
    u = (torch.randn(n, r) / math.sqrt(r)).to(dtype)
    v = (torch.randn(r, k) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    c = (0.3 * torch.randn(r)).to(dtype) if cbias else None
    return x, u, v, b, c


def check_vs_oracle(x, u, v, b, c, act, dtype):
    lead, k, n, r = x.shape[:-1], x.shape[-1], u.shape[0], u.shape[1]
    inputs = [t for t in (x, u, v, b, c)]
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y = lowrank_act_linear(*leaves[:3], leaves[3], leaves[4], act=act)
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert_close_ref(y, oracle64(x, u, v, b, c, act), dtype, reduction=k, name="y")
    g = torch.randn_like(y)
    y.backward(g)
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    (oracle64(*ref, act) * g.double()).sum().backward()
    m = math.prod(lead)
    for name, got, want, red in zip(("dx", "du", "dv", "db", "dc"), leaves, ref, (n, m, m, m, m)):
        if got is None:
            continue
        assert got.grad is not None and got.grad.dtype == dtype, name
        assert_close_ref(got.grad, want.grad, dtype, reduction=max(red, r, n), name=name)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_reference_vs_float64(act, dtype):
    x, u, v, b, c = _inputs(SHAPES[0], dtype, True, True)
    check_vs_oracle(x, u, v, b, c, act, dtype)


# the chain kernel on every activation at the two-piece rank; the two-GEMM path (σ in PyTorch
# between our GEMMs) on two of them
KERNEL_CASES = [("fused", SHAPES[1], a) for a in ("relu", "gelu", "silu", "tanh")] + [
    ("fused", SHAPES[0], "gelu"), ("two_gemm", SHAPES[0], "relu"), ("two_gemm", SHAPES[1], "silu")]


@pytest.mark.parametrize("path,shape,act", KERNEL_CASES, ids=[f"{p}-{_id(s)}-{a}" for p, s, a in KERNEL_CASES])
def test_kernels_vs_float64(triton_cpu, monkeypatch, path, shape, act):
    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", path)
    for dtype, bias, cbias in ((torch.float32, True, True), (torch.float16, False, True),
                               (torch.bfloat16, True, False)):
        x, u, v, b, c = _inputs(shape, dtype, bias, cbias)
        check_vs_oracle(x, u, v, b, c, act, dtype)


@pytest.mark.parametrize("path,act", [("fused", "gelu"), ("two_gemm", "tanh"),
                                      ("reference", "gelu"), ("reference", "tanh"), ("reference", "silu")])
def test_gradcheck_float64(monkeypatch, path, act):
    from fastfactor.kernels import _config

    args = [torch.randn(3, 6, dtype=torch.float64, requires_grad=True),
            torch.randn(5, 2, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 6, dtype=torch.float64, requires_grad=True),
            torch.randn(5, dtype=torch.float64, requires_grad=True),
            torch.randn(2, dtype=torch.float64, requires_grad=True)]
    fn = lambda x, u, v, b, c: lowrank_act_linear(x, u, v, b, c, act=act)
    if path == "reference":
        assert torch.autograd.gradcheck(fn, args)
        return
    if not _config.is_interpreter():
        pytest.skip("interpreter tier")
    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", path)
    with _config.cpu_backend("triton"):
        assert torch.autograd.gradcheck(fn, args)


def test_interpreter_matches_reference_bitwise_structure(triton_cpu, monkeypatch):
    """Fused chain and reference agree to fp32 rounding, saved h included."""
    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", "fused")
    x, u, v, b, c = _inputs(((9,), 21, 13, 6), torch.float32, True, True)
    y, h = KA.lowrank_act_fwd(x.contiguous(), u, v, b, c, "gelu", True)
    y_ref, h_ref = KA.lowrank_act_ref(x, u, v, b, c, "gelu", return_h=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


def test_identity_without_cb_is_the_linear_op():
    import fastfactor

    x, u, v, b, _ = _inputs(SHAPES[0], torch.float32, True, False)
    torch.testing.assert_close(lowrank_act_linear(x, u, v, b, act="identity"), fastfactor.lowrank_linear(x, u, v, b))


def test_fake_tensors_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, u, v, b, c = _inputs(SHAPES[0], torch.float32, True, True)
    with FakeTensorMode() as mode:
        fx, fu, fv, fb, fc = (mode.from_tensor(t) for t in (x, u, v, b, c))
        y = lowrank_act_linear(fx, fu, fv, fb, fc, act="silu")
        assert y.shape == (3, 5, 23)
    args = (x.reshape(15, 19).contiguous().requires_grad_(), u.requires_grad_(), v.requires_grad_(),
            b.requires_grad_(), c.requires_grad_(), "tanh", True)
    torch.library.opcheck(torch.ops.fastfactor.lowrank_act_fwd.default, args)


def test_bad_input_named():
    x, u, v, b, c = _inputs(SHAPES[0], torch.float32, True, True)
    with pytest.raises(ValueError, match=r"act: expected one of .*got 'swish'"):
        lowrank_act_linear(x, u, v, b, c, act="swish")
    with pytest.raises(ValueError, match="cb"):
        lowrank_act_linear(x, u, v, b, torch.zeros(4), act="relu")
    with pytest.raises(TypeError, match="cb"):
        lowrank_act_linear(x, u, v, b, [0.0] * 5, act="relu")
    with pytest.raises(ValueError, match="x"):
        lowrank_act_linear(x[..., :4], u, v, b, c)


def test_compile_fullgraph_cpu():
    """BottleneckLinear under torch.compile(fullgraph=True): one opaque op forward and backward."""
    from fastfactor.layers import BottleneckLinear

    m = BottleneckLinear(19, 23, 5, act="gelu")
    x = torch.randn(3, 4, 19, requires_grad=True)
    y = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    y.sum().backward()
    torch.testing.assert_close(y, m(x))
    assert m.u.grad is not None and m.cb.grad is not None and x.grad is not None
