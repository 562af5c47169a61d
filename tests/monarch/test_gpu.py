"""Tier 3 (gpu): the Monarch / block-wise low-rank kernels on CUDA at realistic shapes.

Skipped where no CUDA device is present (conftest). Correctness only: speed is never asserted.
"""

import pytest
import torch

from conftest import assert_close_ref, monarch_ops, monarch_shape_id
from fastfactor.kernels import monarch as Mk
from fastfactor.ops.monarch import _monarch_fwd, monarch_linear

pytestmark = pytest.mark.gpu

OPS = monarch_ops()
# (M, K, N, nblocks, rank): the benchmark layers, odd sizes, and the dense-block Monarch rank
SHAPES = [
    (16, 768, 3072, 4, 8),
    (4096, 3072, 768, 4, 48),
    (1000, 4096, 4096, 2, 16),
    (333, 1000, 777, 8, 3),
    (64, 4096, 4096, 4, 256),
]
SHAPE_IDS = [monarch_shape_id(s) for s in SHAPES]
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make(M, K, N, b, r, dtype):
    s1, s2 = Mk.factor_shapes(K, N, b, r)
    dev = "cuda"
    x = torch.randn(M, K, device=dev)
    w1 = torch.randn(*s1, device=dev) / Mk.cdiv(K, b) ** 0.5
    w2 = torch.randn(*s2, device=dev) / (b * r) ** 0.5
    bb = torch.randn(N, device=dev)
    return [t.to(dtype).requires_grad_() for t in (x, w1, w2, bb)]


def ref64(x, w1, w2, bb, N, strided, g):
    leaves = [t.detach().double().requires_grad_() for t in (x, w1, w2, bb)]
    y = Mk.monarch_linear_ref(leaves[0], leaves[1], leaves[2], leaves[3], N, strided)
    return y.detach(), torch.autograd.grad(y, leaves, g.double())


def _grads_vs_float64(op, M, K, N, b, r, dtype):
    """Forward and every gradient of ``op`` on CUDA against float64; the gradients returned."""
    fn, strided = OPS[op]
    x, w1, w2, bb = make(M, K, N, b, r, dtype)
    y = fn(x, w1, w2, bb)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w1, w2, bb), g)
    y64, grads64 = ref64(x, w1, w2, bb, N, strided, g)
    # fp32 inputs may run their dots in TF32 (PyTorch's switch): compare them at bf16-like tolerance
    tol_dtype = torch.bfloat16 if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else dtype
    assert_close_ref(y, y64, tol_dtype, reduction=max(K, b * r), name="y")
    for name, a, e in zip(("dx", "dw1", "dw2", "db"), grads, grads64):
        assert_close_ref(a, e, tol_dtype, reduction=max(M, K, N, b * r), name=name)
    return (x, w1, w2, bb), g, grads


@pytest.mark.parametrize("path", ["rows", "fused", "two_stage"])
@pytest.mark.parametrize("dtype", DT.values(), ids=DT.keys())
@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cuda_vs_float64(shape, op, dtype, path, monkeypatch):
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", path)
    _grads_vs_float64(op, *shape, dtype)


@pytest.mark.parametrize("op", OPS, ids=str)
def test_cuda_deterministic_backward(op):
    fn, _ = OPS[op]
    x, w1, w2, bb = make(4096, 768, 3072, 4, 8, torch.bfloat16)
    g = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)
    runs = [torch.autograd.grad(fn(x, w1, w2, bb), (x, w1, w2, bb), g) for _ in range(2)]
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


def test_cuda_opcheck_and_compile():
    x, w1, w2, bb = make(33, 130, 70, 4, 3, torch.bfloat16)
    torch.library.opcheck(_monarch_fwd, (x, w1, w2, bb, 70, True, True))
    torch.library.opcheck(_monarch_fwd, (x, w1, w2, None, 70, False, False))
    f = torch.compile(lambda *a: monarch_linear(*a).float().square().sum(), fullgraph=True)
    loss = f(x, w1, w2, bb)
    loss.backward()
    assert torch.isfinite(loss)


def test_cuda_graph_capture():
    x, w1, w2, bb = (t.detach() for t in make(64, 768, 3072, 4, 8, torch.bfloat16))
    y_eager = monarch_linear(x, w1, w2, bb)      # also warms up the autotuner
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = monarch_linear(x, w1, w2, bb)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y_eager)


def test_cuda_module_bf16():
    from fastfactor.layers.monarch import MonarchLinear

    lin = torch.nn.Linear(768, 3072, device="cuda", dtype=torch.bfloat16)
    m = MonarchLinear.from_linear(lin, nblocks=4, ratio=0.5)
    x = torch.randn(8, 128, 768, device="cuda", dtype=torch.bfloat16)
    y = m(x)
    assert_close_ref(y.reshape(-1, 3072), m.forward_unfused(x).reshape(-1, 3072).double(),
                     torch.bfloat16, reduction=768)


def _rows_training_twice(shape, op, dtype, dw2, monkeypatch):
    """The row-block path's forward and gradients with ``FASTFACTOR_MONARCH_DW2`` = ``dw2``
    against float64, and bitwise the same on a second run."""
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    monkeypatch.setenv("FASTFACTOR_MONARCH_DW2", dw2)
    M, K, N, b, r = shape
    leaves, g, grads = _grads_vs_float64(op, M, K, N, b, r, dtype)
    fn, _ = OPS[op]
    again = torch.autograd.grad(fn(*leaves), leaves, g)
    for name, a, a2 in zip(("dx", "dw1", "dw2", "db"), grads, again):
        assert torch.equal(a, a2), f"{name}: not bitwise reproducible"


@pytest.mark.parametrize("dw2", ["1", "0"], ids=["dw2_in_dx", "pair"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize("shape", [(16384, 768, 3072, 4, 1), (16384, 3072, 768, 8, 1)], ids=monarch_shape_id)
def test_cuda_row_block_training_at_many_rows(shape, op, dtype, dw2, monkeypatch):
    """The row-block backward at 16384 rows as a GPU runs it: the weight gradients' row splits
    summed in their launch by arrival counters, and dw2 / db from the dx launch's row-block
    partials (DW2, summed by the weight-gradient launch) or from the pair launch; against float64,
    and bitwise the same on a second run (fixed-order sums whoever arrives last)."""
    _rows_training_twice(shape, op, dtype, dw2, monkeypatch)


@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize("shape", [(16, 3072, 768, 4, 1), (12, 4096, 4096, 16, 1)], ids=monarch_shape_id)
def test_cuda_row_block_split_stage1(shape, op, monkeypatch):
    """The row-block kernel's split stage 1 at a few rows over a wide input (forced on), as a GPU
    runs it (arrival counters), forward and backward against float64."""
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "rows")
    monkeypatch.setenv("FASTFACTOR_MONARCH_KSPLIT", "1")
    M, K, N, b, r = shape
    _grads_vs_float64(op, M, K, N, b, r, torch.bfloat16)


@pytest.mark.parametrize("one", ["1", "0"], ids=["one_launch", "dx_and_pair"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize("shape", [(16, 768, 3072, 4, 1), (16, 3072, 768, 8, 1), (7, 1000, 777, 4, 2)],
                         ids=monarch_shape_id)
def test_cuda_row_block_training_at_few_rows(shape, op, dtype, one, monkeypatch):
    """The row-block backward at one row block: in ONE launch (dw2, db whole from stage 1, dw1
    from stage 2) or as the dx launch and the pair launch; against float64 and bitwise the same
    on a second run."""
    _rows_training_twice(shape, op, dtype, one, monkeypatch)
