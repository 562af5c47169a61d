"""Tier 1 (cpu): the low-rank Triton kernels themselves, run by the Triton interpreter on CPU tensors,
through the public op (both the fused chain and the two-GEMM path), against float64."""

import math

import pytest
import torch
from conftest import DTYPES, assert_close_ref, check_lowrank_vs_float64, lowrank_ref64

import fastfactor
from fastfactor.kernels import lowrank as K

pytestmark = pytest.mark.usefixtures("triton_cpu")

PATHS = ["fused", "two_gemm"]
# (leading dims, in, out, rank); M = prod(lead). M=1 and N=45 exercise the split of N over programs.
SHAPES = [
    ((1,), 19, 45, 1),
    ((3, 7), 37, 23, 5),
    ((33,), 50, 17, 17),
]


def _id(s):
    lead, k, n, r = s
    return f"L{'x'.join(map(str, lead))}-K{k}-N{n}-R{r}"


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", request.param)
    return request.param


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_kernels_forward_and_grads(path, shape, dtype, bias):
    lead, k, n, r = shape
    x = torch.randn(*lead, 2 * k, dtype=dtype)[..., 1::2]  # non-contiguous input
    u = (torch.randn(n, r) / math.sqrt(r)).to(dtype)
    v = (torch.randn(r, k) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    check_lowrank_vs_float64(x, u, v, b, dtype)


def test_kernels_match_reference_path_exactly_in_fp32_structure(path):
    """The kernels and the PyTorch reference agree to fp32 rounding on a transposed weight layout."""
    x = torch.randn(9, 21)
    u = torch.randn(4, 13).t()  # (13, 4) transposed view
    v = torch.randn(21, 4).t()  # (4, 21) transposed view
    y = fastfactor.lowrank_linear(x, u, v)
    torch.testing.assert_close(y, K.lowrank_linear_ref(x, u, v), rtol=1e-5, atol=1e-5)


def test_large_rank_uses_two_gemm_and_is_correct(monkeypatch):
    assert K.choose_path(8, 300, 280, 270) != "fused"                     # 272 > 256: no registers
    assert K.choose_path(8, 300, 280, 270, torch.float16) in ("two_gemm", "decode")   # fp16: no cuBLAS
    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", "fused")                 # falls back to two_gemm
    x = torch.randn(8, 300)
    u = torch.randn(280, 270) / 16
    v = torch.randn(270, 300) / 17
    assert_close_ref(fastfactor.lowrank_linear(x, u, v), lowrank_ref64(x, u, v, None), torch.float32, reduction=300)


def test_gradcheck_float64_kernels(path):
    x = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    u = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fastfactor.lowrank_linear, (x, u, v, b))


def test_backward_is_bitwise_deterministic(path):
    x = torch.randn(40, 30, requires_grad=True)
    u = torch.randn(26, 6, requires_grad=True)
    v = torch.randn(6, 30, requires_grad=True)
    b = torch.randn(26, requires_grad=True)
    g = torch.randn(40, 26)
    grads = []
    for _ in range(2):
        for t in (x, u, v, b):
            t.grad = None
        fastfactor.lowrank_linear(x, u, v, b).backward(g)
        grads.append([t.grad.clone() for t in (x, u, v, b)])
    for a, c in zip(*grads):
        assert torch.equal(a, c)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_zero_size_batch_kernels(path, bias):
    x = torch.randn(0, 13, requires_grad=True)
    u = torch.randn(11, 3, requires_grad=True)
    v = torch.randn(3, 13, requires_grad=True)
    b = torch.randn(11, requires_grad=True) if bias else None
    y = fastfactor.lowrank_linear(x, u, v, b)
    assert y.shape == (0, 11)
    y.sum().backward()
    assert torch.equal(u.grad, torch.zeros_like(u)) and torch.equal(v.grad, torch.zeros_like(v))
    if bias:
        assert torch.equal(b.grad, torch.zeros_like(b))


def test_module_forward_runs_kernels(path):
    lin = torch.nn.Linear(29, 19)
    m = fastfactor.LowRankLinear.from_linear(lin, ratio=0.5)
    x = torch.randn(2, 3, 29)
    torch.testing.assert_close(m(x), m.forward_unfused(x), rtol=1e-5, atol=1e-5)


def test_gemm_rowsum_fuses_bias_gradient():
    a = torch.randn(19, 23)
    b = torch.randn(23, 7)
    c, rs = K.gemm(a, b, rowsum=True)
    torch.testing.assert_close(c, a @ b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rs, a.sum(1), rtol=1e-5, atol=1e-5)


def test_chain_rejects_rank_beyond_registers():
    with pytest.raises(ValueError, match="chain: rank must be <= 256"):
        K.chain(torch.randn(2, 300), torch.randn(257, 300), torch.randn(5, 257))


def test_deterministic_mode_bypasses_the_autotuner(path, monkeypatch):
    """In deterministic mode the launchers run one fixed config, never the autotuner (whose choice
    may differ between processes); the result equals the autotuned launch here."""
    x = torch.randn(21, 30, requires_grad=True)
    u = torch.randn(26, 6, requires_grad=True)
    v = torch.randn(6, 30, requires_grad=True)
    y0 = fastfactor.lowrank_linear(x, u, v)
    g0 = torch.autograd.grad(y0.sum(), (x, u, v))

    class Boom:
        def __getitem__(self, grid):
            raise AssertionError("autotuner used in deterministic mode")

    monkeypatch.setattr(K._chain_tuned, "tuned", Boom())
    monkeypatch.setattr(K._gemm_tuned, "tuned", Boom())
    with fastfactor.determinism.deterministic(torch_algorithms=False):
        y1 = fastfactor.lowrank_linear(x, u, v)
        g1 = torch.autograd.grad(y1.sum(), (x, u, v))
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    with pytest.raises(AssertionError, match="autotuner used"):
        fastfactor.lowrank_linear(x, u, v)  # and outside the mode the autotuner is back


def test_rank_zero_and_in_features_zero(path):
    # rank 0: y = bias, dbias = Σ_m g (no program of the dU product runs: the row sums are taken anyway)
    x = torch.randn(5, 7, requires_grad=True)
    u = torch.randn(4, 0, requires_grad=True)
    v = torch.randn(0, 7, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    y = fastfactor.lowrank_linear(x, u, v, b)
    torch.testing.assert_close(y, b.expand(5, 4))
    g = torch.randn(5, 4)
    y.backward(g)
    torch.testing.assert_close(b.grad, g.sum(0))
    assert torch.equal(x.grad, torch.zeros_like(x))
    # in_features 0
    x0 = torch.randn(3, 2, 0)
    y0 = fastfactor.lowrank_linear(x0, torch.randn(4, 1), torch.randn(1, 0), b.detach())
    torch.testing.assert_close(y0, b.detach().expand(3, 2, 4))
