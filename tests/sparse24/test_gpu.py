"""Tier 3 (gpu): the 2:4 kernels on CUDA — bf16 and large shapes against float64 references,
opcheck, torch.compile(fullgraph=True), CUDA-graph capture, the prune kernel, and PyTorch's
semi-structured path. Skipped where no GPU is present."""

import pytest
import torch

from conftest import DTYPES, assert_close_ref
from fastfactor.formats import sparse24 as fmt
from fastfactor.formats.sparse24 import Sparse24Weight, pack_24, prune_24
from fastfactor.kernels import sparse24 as K
from fastfactor.ops import sparse24 as ops
from fastfactor.ops.sparse24 import dense_sparse_linear, sparse24_linear

pytestmark = pytest.mark.gpu
DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DEV = "cuda"


@pytest.fixture(autouse=True)
def _triton_path(monkeypatch):
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PATH", "triton")


def sparse_weight(rows, k, dtype, requires_grad=True):
    w = pack_24(prune_24(torch.randn(rows, k, device=DEV) / k ** 0.5))
    return Sparse24Weight(w.values.to(dtype).requires_grad_(requires_grad), w.meta, w.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("shape", [(16, 4096, 4096), (333, 768, 3072), (4096, 3072, 768), (7, 260, 100)],
                         ids=lambda s: f"M{s[0]}-K{s[1]}-N{s[2]}")
def test_sparse24_linear_cuda(shape, dtype):
    M, Kd, N = shape
    x = torch.randn(M, Kd, device=DEV, dtype=dtype, requires_grad=True)
    w = sparse_weight(N, Kd, dtype)
    b = (torch.randn(N, device=DEV) * 0.1).to(dtype).requires_grad_(True)
    y = sparse24_linear(x, w, b)
    g = torch.randn_like(y)
    y.backward(g)
    x64, v64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w.values, b))
    y64 = K.sparse24_linear_ref(x64, v64, w.meta, b64)
    y64.backward(g.double())
    assert_close_ref(y, y64, dtype, reduction=Kd, name="y")
    assert_close_ref(x.grad, x64.grad, dtype, reduction=N, name="dx")
    assert_close_ref(w.values.grad, v64.grad, dtype, reduction=M, name="dvalues")
    assert_close_ref(b.grad, b64.grad, dtype, reduction=M, name="dbias")


@pytest.mark.parametrize("path", ["fused", "two_kernel", "library", "rank_split", "auto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("shape", [(16, 4096, 4096, 256), (4096, 768, 3072, 168), (37, 4096, 4096, 655),
                                   (1024, 4096, 4096, 655), (16, 768, 3072, 168), (5, 3072, 768, 472)],
                         ids=lambda s: f"M{s[0]}-K{s[1]}-N{s[2]}-R{s[3]}")
def test_dense_sparse_linear_cuda(shape, dtype, path, monkeypatch):
    """Every path; ``auto`` / ``library`` at M = 1024, rank 655 run PyTorch's 2:4 GEMM on S
    zero-padded to 672 rows (bf16/fp16 where eligible)."""
    if path == "auto":
        monkeypatch.delenv("FASTFACTOR_DS_PATH", raising=False)
    else:
        monkeypatch.setenv("FASTFACTOR_DS_PATH", path)
    M, Kd, N, R = shape
    x = torch.randn(M, Kd, device=DEV, dtype=dtype, requires_grad=True)
    s = sparse_weight(R, Kd, dtype)
    d = (torch.randn(N, R, device=DEV) / R ** 0.5).to(dtype).requires_grad_(True)
    b = (torch.randn(N, device=DEV) * 0.1).to(dtype).requires_grad_(True)
    y = dense_sparse_linear(x, d, s, b)
    g = torch.randn_like(y)
    y.backward(g)
    x64, d64, v64, b64 = (t.detach().double().requires_grad_(True) for t in (x, d, s.values, b))
    y64 = K.dense_sparse_linear_ref(x64, d64, v64, s.meta, b64)
    y64.backward(g.double())
    assert_close_ref(y, y64, dtype, reduction=Kd + R, name="y")
    assert_close_ref(x.grad, x64.grad, dtype, reduction=N + R, name="dx")
    assert_close_ref(d.grad, d64.grad, dtype, reduction=M, name="dD")
    assert_close_ref(s.values.grad, v64.grad, dtype, reduction=M, name="dS")
    assert_close_ref(b.grad, b64.grad, dtype, reduction=M, name="dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_prune_kernel_cuda_matches_reference(dtype):
    w = torch.randn(1000, 4096, device=DEV, dtype=dtype)
    p, m = K.prune_24_triton(w)
    ref = K.mask_24_ref(w.abs().float())
    assert torch.equal(m, ref) and torch.equal(p, torch.where(ref, w, torch.zeros((), dtype=dtype, device=DEV)))


def test_opcheck_cuda():
    x = torch.randn(33, 128, device=DEV, dtype=torch.bfloat16)
    w = sparse_weight(64, 128, torch.bfloat16)
    d = torch.randn(96, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.fastfactor.sparse24_fwd.default, (x, w.values, w.meta, None))
    torch.library.opcheck(torch.ops.fastfactor.dense_sparse_fwd.default, (x, d, w.values, w.meta, None, True))


def test_compile_and_cuda_graph():
    torch._dynamo.reset()
    x = torch.randn(64, 768, device=DEV, dtype=torch.bfloat16)
    w = sparse_weight(3072, 768, torch.bfloat16, requires_grad=False)
    fn = torch.compile(lambda x_: sparse24_linear(x_, w), fullgraph=True)
    ref = sparse24_linear(x, w)
    assert torch.equal(fn(x), ref)
    sparse24_linear(x, w)          # warm the autotuner outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparse24_linear(x, w)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


def test_torch_semi_structured_conversion_and_dispatch(monkeypatch):
    w = pack_24(prune_24(torch.randn(256, 512, device=DEV, dtype=torch.float16)))
    ss = fmt.to_torch_semi_structured(w)
    assert torch.equal(ss.to_dense(), w.to_dense())
    x = torch.randn(4096, 512, device=DEV, dtype=torch.float16)
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PATH", "torch")
    with torch.no_grad():
        y_torch = sparse24_linear(x, w)
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PATH", "triton")
    with torch.no_grad():
        y_triton = sparse24_linear(x, w)
    assert_close_ref(y_torch, y_triton.double(), torch.float16, reduction=512, name="torch vs triton")


@pytest.mark.parametrize("plan", [(32, 1), (128, 4), (64, 3)])
def test_split_decode_repeated_launches_and_cuda_graph(plan):
    """The one-launch split decode and dx-decode on hardware (arrival counters, the last arrival
    reduces): bitwise equal over repeated launches and under CUDA-graph replay, counters back to
    zero, against float64."""
    torch.manual_seed(0)
    x = torch.randn(16, 4096, device=DEV, dtype=torch.bfloat16)
    w = sparse_weight(1024, 4096, torch.bfloat16, requires_grad=False)
    b = torch.randn(1024, device=DEV, dtype=torch.bfloat16)
    ref = K.sparse24_decode(x, w.values, w.meta, b, plan=plan)
    y64 = x.double() @ K.unpack_24(w.values.double(), w.meta, 4096).t() + b.double()
    assert_close_ref(ref, y64, torch.bfloat16, reduction=4096)
    g = torch.randn(16, 1024, device=DEV, dtype=torch.bfloat16)
    dref = K.sparse24_dx_decode(g, w.values, w.meta, plan=(64, 4))
    assert_close_ref(dref, g.double() @ K.unpack_24(w.values.double(), w.meta, 4096), torch.bfloat16,
                     reduction=1024)
    _assert_reruns_and_graph_bitwise(lambda: K.sparse24_decode(x, w.values, w.meta, b, plan=plan), ref,
                                     lambda: K.sparse24_dx_decode(g, w.values, w.meta, plan=(64, 4)), dref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DT_IDS.get)
@pytest.mark.parametrize("case", [(12, 4096, 4096, (128, 4)), (16, 768, 768, (32, 4)), (1, 4096, 4096, (16, 1)),
                                  (9, 272, 320, (256, 1)), (16, 3072, 768, (64, 2)), (5, 96, 192, (32, 3))],
                         ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-bn{c[3][0]}-sk{c[3][1]}")
def test_sparse_tensor_core_decode_cuda(case, dtype, monkeypatch):
    """The decode on sparse tensor cores (``mma.sp``: its fragment layouts, the metadata, the K
    permutation) against float64 on hardware, every row tile, splits on and off, bitwise over
    repeated launches and CUDA-graph replay; the planner's own pick too. The 3-bit codes (``K % 128
    == 0``) and the split partials dropped from L2 give bitwise what the 4-bit codes and the kept
    partials give."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("mma.sp needs sm_80 or newer")
    M, N, Kd, plan = case
    monkeypatch.setenv("FASTFACTOR_SPARSE24_CODES3", "1")       # the 3-bit codes wherever K % 128 == 0
    torch.manual_seed(0)
    x = torch.randn(M, Kd, device=DEV, dtype=dtype)
    w = sparse_weight(N, Kd, dtype, requires_grad=False)
    b = torch.randn(N, device=DEV, dtype=dtype)
    assert K.mma_decode_ok(x, w.values)
    y64 = x.double() @ K.unpack_24(w.values.double(), w.meta, Kd).t() + b.double()
    ref = K.sparse24_decode_mma(x, w.values, w.meta, b, plan=plan)
    assert_close_ref(ref, y64, dtype, reduction=Kd)
    assert_close_ref(K.sparse24_decode_mma(x, w.values, w.meta, None), y64 - b.double(), dtype, reduction=Kd)
    _assert_reruns_and_graph_bitwise(lambda: K.sparse24_decode_mma(x, w.values, w.meta, b, plan=plan), ref)
    monkeypatch.setenv("FASTFACTOR_SPARSE24_CODES3", "0")
    monkeypatch.setenv("FASTFACTOR_SPLIT_DISCARD", "0")
    if Kd % 128 == 0 and K._per_split(Kd, plan[1], 64) == K._per_split(Kd, plan[1], 128):   # the same splits
        assert torch.equal(K.sparse24_decode_mma(x, w.values, w.meta, b, plan=plan), ref)


def _assert_reruns_and_graph_bitwise(fn, ref, fn2=None, ref2=None):
    """``fn()`` (and ``fn2()``) equal to ``ref`` (``ref2``) bit for bit over 20 launches, the split
    kernels' arrival counters back to zero after them, and ``fn()`` captured in a CUDA graph equal
    to ``ref`` over 5 replays."""
    for _ in range(20):
        assert torch.equal(fn(), ref)
        if fn2 is not None:
            assert torch.equal(fn2(), ref2)
    torch.cuda.synchronize()
    assert all(int(c.abs().sum()) == 0 for c in K._DECODE_COUNTERS.values())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = fn()
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(yg, ref)


@pytest.mark.parametrize("plan", [(16, 256), (32, 128), (64, 64)])
def test_rank_split_repeated_launches_and_cuda_graph(plan):
    """The rank-split dense-sparse launch on hardware (arrival counters, the last arrival sums the
    chunks): bitwise equal over repeated launches and under CUDA-graph replay, counters back to
    zero, against float64."""
    torch.manual_seed(0)
    x = torch.randn(16, 768, device=DEV, dtype=torch.bfloat16)
    s = sparse_weight(168, 768, torch.bfloat16, requires_grad=False)
    d = (torch.randn(3072, 168, device=DEV) / 168 ** 0.5).to(torch.bfloat16)
    b = torch.randn(3072, device=DEV, dtype=torch.bfloat16)
    ref, t = K.ds_rank_split(x, d, s.values, s.meta, b, store_t=True, plan=plan)
    y64 = K.dense_sparse_linear_ref(x.double(), d.double(), s.values.double(), s.meta, b.double())
    assert_close_ref(ref, y64, torch.bfloat16, reduction=768 + 168)
    assert_close_ref(t, x.double() @ K.unpack_24(s.values.double(), s.meta, 768).t(), torch.bfloat16,
                     reduction=768, name="t")
    _assert_reruns_and_graph_bitwise(lambda: K.ds_rank_split(x, d, s.values, s.meta, b, plan=plan)[0], ref)


@pytest.mark.parametrize("plan", [(16, 8), (32, 4), (128, 1)])
def test_bwd_dense_repeated_launches_and_cuda_graph(plan):
    """The dense-sparse backward's dense side in one launch on hardware (``dt``'s column-range
    partials summed by each rank chunk's last arrival): ``dt``, ``dD``, ``db`` against float64,
    bitwise equal over repeated launches and under CUDA-graph replay, counters back to zero."""
    torch.manual_seed(0)
    g = torch.randn(16, 3072, device=DEV, dtype=torch.bfloat16)
    d = (torch.randn(3072, 168, device=DEV) / 168 ** 0.5).to(torch.bfloat16)
    t = torch.randn(16, 168, device=DEV, dtype=torch.bfloat16)
    dt, dd, db = K.ds_bwd_dense(g, d, t, plan=plan)
    assert_close_ref(dt, g.double() @ d.double(), torch.bfloat16, reduction=3072, name="dt")
    assert_close_ref(dd, g.double().t() @ t.double(), torch.bfloat16, reduction=16, name="dD")
    assert_close_ref(db, g.double().sum(0), torch.bfloat16, reduction=16, name="db")
    _assert_reruns_and_graph_bitwise(lambda: K.ds_bwd_dense(g, d, t, plan=plan)[0], dt,
                                     lambda: torch.cat([o.flatten() for o in K.ds_bwd_dense(g, d, t, plan=plan)[1:]]),
                                     torch.cat([dd.flatten(), db.flatten()]))


@pytest.mark.parametrize("plan", [(16, 32), (64, 32), (32, 128), (16, 32, 6), (32, 64, 3)])
def test_roles_repeated_launches_and_cuda_graph(plan):
    """The two-role dense-sparse launch on hardware (tickets, consumers waiting on the producers'
    counter; with a K split, each rank chunk's partials summed by its last arrival): ``y`` and
    ``t`` against float64, bitwise equal over repeated launches and under CUDA-graph replay,
    counters back to zero."""
    torch.manual_seed(0)
    x = torch.randn(64, 768, device=DEV, dtype=torch.bfloat16)
    s = sparse_weight(168, 768, torch.bfloat16, requires_grad=False)
    d = (torch.randn(3072, 168, device=DEV) / 168 ** 0.5).to(torch.bfloat16)
    b = torch.randn(3072, device=DEV, dtype=torch.bfloat16)
    ref, t = K.ds_roles(x, d, s.values, s.meta, b, store_t=True, plan=plan)
    y64 = K.dense_sparse_linear_ref(x.double(), d.double(), s.values.double(), s.meta, b.double())
    assert_close_ref(ref, y64, torch.bfloat16, reduction=768 + 168)
    assert_close_ref(t, x.double() @ K.unpack_24(s.values.double(), s.meta, 768).t(), torch.bfloat16,
                     reduction=768, name="t")
    _assert_reruns_and_graph_bitwise(lambda: K.ds_roles(x, d, s.values, s.meta, b, plan=plan)[0], ref)


@pytest.mark.parametrize("plan", [(32, 4), (64, 2), (128, 1)])
def test_dx_dv_one_launch_repeated_and_cuda_graph(plan):
    """The 2:4 backward at 16 tokens in one launch on hardware (dx's split partials summed by the
    last arrival, the kept values' gradient from the same weight tiles): dx, db and dv against
    float64, bitwise equal over repeated launches and under CUDA-graph replay, counters back to zero."""
    torch.manual_seed(0)
    g = torch.randn(16, 1024, device=DEV, dtype=torch.bfloat16)
    x = torch.randn(16, 4096, device=DEV, dtype=torch.bfloat16)
    w = sparse_weight(1024, 4096, torch.bfloat16, requires_grad=False)
    db, dv = torch.empty(1024, device=DEV, dtype=torch.bfloat16), torch.empty(1024, 2048, device=DEV, dtype=torch.bfloat16)
    dx = K.sparse24_dx_decode(g, w.values, w.meta, plan=plan, db=db, x=x, dv=dv)
    assert_close_ref(dx, g.double() @ K.unpack_24(w.values.double(), w.meta, 4096), torch.bfloat16, reduction=1024)
    assert_close_ref(db, g.double().sum(0), torch.bfloat16, reduction=16, name="db")
    assert_close_ref(dv, K.compress_like(g.double().t() @ x.double(), w.meta), torch.bfloat16, reduction=16, name="dv")
    dv_ref = dv.clone()

    def both():
        out = K.sparse24_dx_decode(g, w.values, w.meta, plan=plan, db=db, x=x, dv=dv)
        return torch.cat([out.flatten(), dv.flatten()])

    ref = torch.cat([dx.flatten(), dv_ref.flatten()])
    _assert_reruns_and_graph_bitwise(both, ref)
