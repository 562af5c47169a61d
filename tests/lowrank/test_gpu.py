"""Tier 3 (gpu): the low-rank kernels on CUDA — bf16 at large shapes, both paths, opcheck,
torch.compile(fullgraph=True) and CUDA-graph capture. Skipped without a GPU."""

import math

import pytest
import torch
from conftest import assert_close_ref, lowrank_ref64

import fastfactor
from fastfactor.ops.lowrank import _lowrank_bwd, _lowrank_fwd

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(params=["fused", "two_gemm", "torch", "decode"])
def path(request, monkeypatch):
    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,r", [(4096, 4096, 4096, 256), (17, 768, 3072, 96), (1000, 3071, 767, 511), (63, 1024, 1024, 1024)])
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_forward_backward(path, dtype, m, k, n, r, bias):
    x = torch.randn(m, 2 * k, device=DEV, dtype=dtype)[:, ::2]
    u = (torch.randn(n, r, device=DEV) / math.sqrt(r)).to(dtype)
    v = (torch.randn(r, k, device=DEV) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, device=DEV, dtype=dtype) if bias else None
    leaves = [t.detach().clone().requires_grad_() for t in (x, u, v) + ((b,) if bias else ())]
    y = fastfactor.lowrank_linear(*leaves[:3], leaves[3] if bias else None)
    assert_close_ref(y, lowrank_ref64(x, u, v, b), dtype, reduction=k, name="y")
    g = torch.randn_like(y)
    y.backward(g)
    ref = [t.detach().double().requires_grad_() for t in (x, u, v) + ((b,) if bias else ())]
    (lowrank_ref64(*ref[:3], ref[3] if bias else None) * g.double()).sum().backward()
    for name, got, want, red in zip(("dx", "du", "dv", "db"), leaves, ref, (n, m, m, m)):
        assert_close_ref(got.grad, want.grad, dtype, reduction=max(red, r), name=name)


def test_gpu_opcheck():
    x = torch.randn(33, 70, device=DEV, requires_grad=True)
    u = torch.randn(50, 9, device=DEV, requires_grad=True)
    v = torch.randn(9, 70, device=DEV, requires_grad=True)
    b = torch.randn(50, device=DEV, requires_grad=True)
    torch.library.opcheck(_lowrank_fwd, (x, u, v, b, True))
    g = torch.randn(33, 50, device=DEV)
    t = (x @ v.t()).detach()
    torch.library.opcheck(_lowrank_bwd, (g, x.detach(), u.detach(), v.detach(), t, True, True, True, True))


def test_gpu_compile_fullgraph():
    m = fastfactor.LowRankLinear(256, 512, 32, device=DEV, dtype=torch.bfloat16)
    x = torch.randn(4, 100, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    f = torch.compile(m, fullgraph=True)
    y = f(x)
    y.float().sum().backward()
    torch.testing.assert_close(y, m(x))


def test_gpu_cuda_graph_capture():
    m = fastfactor.LowRankLinear(512, 512, 64, device=DEV, dtype=torch.bfloat16)
    x = torch.randn(256, 512, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        m(x)  # autotune outside the capture
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            m(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = m(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, m(x))
