"""Tier 3 (gpu): the nonlinear bottleneck op on CUDA — bf16 / fp16 / fp32 at large shapes on every
path (the chain kernel with σ on chip, and σ between the GEMMs), opcheck, torch.compile(fullgraph)
and CUDA-graph capture of BottleneckLinear. Skipped without a GPU."""

import math

import pytest
import torch
from .test_act_op import check_vs_oracle

import fastfactor
from fastfactor.ops.lowrank_act import _act_bwd, _act_fwd

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(params=["fused", "two_gemm", "torch", "decode"])
def path(request, monkeypatch):
    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,r", [(4096, 1024, 4096, 96), (17, 768, 3072, 153), (1000, 3071, 767, 40)])
@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh"])
def test_gpu_forward_backward(path, dtype, m, k, n, r, act):
    x = torch.randn(m, 2 * k, device=DEV, dtype=dtype)[:, ::2]
    u = (torch.randn(n, r, device=DEV) / math.sqrt(r)).to(dtype)
    v = (torch.randn(r, k, device=DEV) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, device=DEV, dtype=dtype)
    c = (0.3 * torch.randn(r, device=DEV)).to(dtype)
    check_vs_oracle(x, u, v, b, c, act, dtype)


def test_gpu_opcheck():
    x = torch.randn(33, 70, device=DEV, requires_grad=True)
    u = torch.randn(50, 9, device=DEV, requires_grad=True)
    v = torch.randn(9, 70, device=DEV, requires_grad=True)
    b = torch.randn(50, device=DEV, requires_grad=True)
    c = torch.randn(9, device=DEV, requires_grad=True)
    torch.library.opcheck(_act_fwd, (x, u, v, b, c, "gelu", True))
    g = torch.randn(33, 50, device=DEV)
    h = (x @ v.t() + c).detach()
    torch.library.opcheck(_act_bwd, (g, x.detach(), u.detach(), v.detach(), c.detach(), h, "gelu", True, True, True,
                                     True, True))


def test_gpu_compile_fullgraph_and_cuda_graph():
    m = fastfactor.BottleneckLinear(256, 512, 32, act="silu", device=DEV, dtype=torch.bfloat16)
    x = torch.randn(4, 100, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    y = torch.compile(m, fullgraph=True)(x)
    y.float().sum().backward()
    torch.testing.assert_close(y, m(x))
    xs = torch.randn(256, 256, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        m(xs)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            m(xs)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m(xs)
        xs.copy_(torch.randn_like(xs))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, m(xs))
