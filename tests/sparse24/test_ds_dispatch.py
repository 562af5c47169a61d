"""Dense-sparse ``y = (x·Sᵀ)·Dᵀ + b``: the path choice by the shared cost model (``kernels/_cost.py``,
the figures ``fastfactor sol`` applies) and the library path's numerics.

* the choice equals the cost comparison (fused only where predicted >= 5 % faster than the library
  path; the library path's ``S`` product by sparse24's own dispatch, PyTorch's 2:4 GEMM on ``S``
  zero-padded to 32 rows where that is eligible and cheaper);
* the library path (cuBLAS products, expand once, exact selection of the kept values' gradient,
  the padded semi-structured GEMM replaced on CPU by PyTorch's own CUTLASS-layout decoder) against
  float64, forward and every gradient;
* the dispatcher's predictions against sol's exact counts (perf marker, interpreter).

**Predicted, not measured**: no GPU runs here."""

import pytest
import torch

from conftest import assert_close_ref
from fastfactor.factorize.sparse24 import dense_sparse_rank_for_ratio
from fastfactor.formats.sparse24 import Sparse24Weight, pack_24, prune_24
from fastfactor.kernels import _config
from fastfactor.kernels import sparse24 as K
from fastfactor.ops import sparse24 as ops

BF16, CUDA = torch.bfloat16, torch.device("cuda")
SHAPES = [(4096, 4096), (768, 3072), (3072, 768)]
TOKENS = (8, 16, 24, 32, 48, 64, 128, 1024, 4096, 16384)


def _ranks(k, n):
    return sorted({dense_sparse_rank_for_ratio(k, n, r) for r in (0.125, 0.25, 0.5)} | {64, 96, 256})


def test_choice_is_the_cost_comparison(on_gpu_model):
    seen = set()
    for k, n in SHAPES + [(768, 768)]:      # a square layer: where the rank split is the cheapest
        for R in _ranks(k, n):
            for M in TOKENS:
                c = K.ds_path_costs(M, k, n, R, BF16, CUDA)
                got = K.choose_ds_path(M, k, n, R, BF16, CUDA)
                ours = {p: t for p, t in c.items() if p != "library" and t <= K.DS_MARGIN * c["library"]}
                want = min(ours, key=ours.get) if ours else "library"
                assert got == want, (M, k, n, R, c)
                assert ("fused" in c) == (K._pad_rank(R) <= K.FUSED_MAX_R)
                assert ("rank_split" in c) == ("roles" in c) == (M <= K.DECODE_MAX_M)
                seen.add(got)
    assert seen == {"fused", "rank_split", "roles", "library"}     # each occurs on this grid


def test_s_product_is_sparse24s_dispatch_or_the_padded_torch_path(on_gpu_model):
    """``t = x·Sᵀ``: sparse24's choice (its Triton GEMM replaced by the cheaper library path above
    decode sizes), or ``torch_pad`` where PyTorch's GEMM on 32-row-padded ``S`` is predicted cheaper;
    the cost returned is the chosen path's."""
    paths = set()
    for k, n in SHAPES:
        for R in _ranks(k, n):
            for M in TOKENS:
                p, cost = K.ds_s_plan(M, k, R, BF16, CUDA)
                paths.add(p)
                base = K.choose_mm_path(M, k, R, BF16, CUDA)
                pc = K.path_costs(M, k, R, BF16, "fwd")
                if p == "torch_pad":
                    r32 = -(-R // 32) * 32
                    assert R % 32 and K.torch24_eligible(M, k, r32, BF16, CUDA)
                    assert cost == pytest.approx(K.path_costs(M, k, r32, BF16, "fwd")["torch"]
                                                 + K._pad_seconds(R, k, BF16))
                    alt = base if base != "triton" else K._library_only(pc, K.torch24_eligible(M, k, R, BF16, CUDA))
                    assert cost < K._s_path_seconds(M, k, R, BF16, alt, 132)
                elif base == "triton":
                    assert M > K.DECODE_MAX_M and p in ("dense", "torch")
                    assert cost == pytest.approx(pc[p]) and pc[p] <= pc["dense"]
                else:
                    assert p == base
                if p in ("dense", "torch", "torch_pad"):   # never above expand once + cuBLAS
                    assert cost <= pc["dense"] * (1 + 1e-9)
    assert {"decode", "torch_pad", "dense"} <= paths


def test_library_path_is_never_predicted_slower_than_two_cublas_products(on_gpu_model):
    """The unfused alternative: expand ``S`` once, then two cuBLAS GEMMs."""
    for k, n in SHAPES:
        for R in _ranks(k, n):
            for M in (128, 1024, 4096, 16384):
                c = K.ds_path_costs(M, k, n, R, BF16, CUDA)
                unfused = K.path_costs(M, k, R, BF16, "fwd")["dense"] + K._gemm_seconds(M, n, R, 2, 2, 2, True, BF16)
                assert min(c.values()) <= unfused * (1 + 1e-9)


def test_backward_keeps_library_products_above_decode_sizes(on_gpu_model):
    for k, n in SHAPES:
        for R in _ranks(k, n):
            for M in TOKENS:
                px, pv = K.ds_bwd_sparse_paths(M, k, R, BF16)
                if M > K.DECODE_MAX_M:
                    assert px == "dense" and pv == "dense", (M, k, R)
                else:
                    assert (px, pv) == (K.choose_bwd_path(M, k, R, BF16, "dx"),
                                        K.choose_bwd_path(M, k, R, BF16, "dvalues"))
    # dx on sparse tensor cores where Sᵀ is 2:4 too (a transposable mask) and predicted cheaper
    for M, k, R in ((16384, 4096, 1024), (4096, 768, 128), (128, 4096, 640)):
        c = K.path_costs(M, k, R, BF16, "dx")
        want = "torch" if c["torch"] < c["dense"] else "dense"
        assert K.ds_bwd_sparse_paths(M, k, R, BF16, transposable_ok=True)[0] == want
    assert K.ds_bwd_sparse_paths(16384, 4096, 1024, BF16, transposable_ok=True)[0] == "torch"


def test_fp16_and_forced_paths(on_gpu_model, monkeypatch):
    fp16 = torch.float16
    assert not K.ds_library_ok(fp16) and K.ds_bwd_path(fp16) == "two_kernel"
    assert "library" not in K.ds_path_costs(16384, 4096, 4096, 655, fp16, CUDA)
    assert K.choose_ds_path(16384, 4096, 4096, 655, fp16, CUDA) == "two_kernel"
    assert K.choose_ds_path(128, 768, 3072, 168, fp16, CUDA) == "fused"
    # a handful of tokens: our one-launch paths against the two-kernel path's lower bound
    for M, k, n, R in ((64, 768, 3072, 168), (16, 4096, 4096, 256), (16, 768, 3072, 336)):
        c = K.ds_path_costs(M, k, n, R, fp16, CUDA)
        assert "two_kernel" in c and "library" not in c
        assert K.choose_ds_path(M, k, n, R, fp16, CUDA) == "roles" and c["roles"] <= K.DS_MARGIN * c["two_kernel"]
    assert K.choose_ds_path(1, 768, 768, 256, fp16, CUDA) == "rank_split"
    assert "two_kernel" not in K.ds_path_costs(128, 768, 3072, 168, fp16, CUDA)
    assert K.ds_two_kernel_seconds(16, 768, 3072, 168) > K.decode_plan_cost(16, 168, 768, 132)[0]
    assert K.ds_bwd_path(BF16) == "library"
    monkeypatch.setenv("FASTFACTOR_DS_PATH", "two_kernel")
    assert K.ds_bwd_path(BF16) == "two_kernel"
    assert K.choose_ds_path(16384, 4096, 4096, 655, BF16, CUDA) == "two_kernel"
    monkeypatch.setenv("FASTFACTOR_DS_PATH", "library")
    assert K.choose_ds_path(64, 768, 3072, 168, BF16, CUDA) == "library"
    # a forced sparse24 path is honoured for S and not replaced by the padded one
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PATH", "dense")
    assert K.ds_s_plan(16384, 4096, 655, BF16, CUDA)[0] == "dense"


def test_chain_prediction_grows_with_work():
    a = K.ds_chain_seconds(4096, 768, 3072, 96)
    assert K.ds_chain_seconds(16384, 768, 3072, 96) > 2 * (a - _config_launch())   # 4x the rows
    assert K.ds_chain_seconds(64, 768, 3072, 300) is None          # above the fused rank limit
    # the grid splits the N tiles to fill the SMs (each split re-reads S): the SM count matters
    assert K.ds_chain_seconds(64, 768, 3072, 168, sms=66) != K.ds_chain_seconds(64, 768, 3072, 168)


def _config_launch():
    from fastfactor.kernels import _cost

    return _cost.DEFAULT.launch_s


# ---------------------------------------------------------------------------------------------
# numerics of the library path
# ---------------------------------------------------------------------------------------------

def _s(R, k, dtype, seed=0):
    torch.manual_seed(seed)
    w = pack_24(prune_24(torch.randn(R, k)))
    return Sparse24Weight(w.values.to(dtype), w.meta, w.shape)


def _check(M, k, n, R, dtype, bias=True, seed=0):
    s = _s(R, k, dtype, seed)
    values = s.values.clone().requires_grad_(True)
    x = torch.randn(M, k).to(dtype).requires_grad_(True)
    d = (torch.randn(n, R) / R ** 0.5).to(dtype).requires_grad_(True)
    b = (torch.randn(n) * 0.1).to(dtype).requires_grad_(True) if bias else None
    y = ops.dense_sparse_linear(x, d, Sparse24Weight(values, s.meta, s.shape), b)
    leaves = [t.detach().double().requires_grad_(True) for t in (x, d, values) + ((b,) if bias else ())]
    x64, d64, v64 = leaves[:3]
    y64 = (x64 @ K.unpack_24(v64, s.meta, k).t()) @ d64.t() + (leaves[3] if bias else 0)
    assert y.shape == (M, n) and y.dtype == dtype
    assert_close_ref(y, y64, dtype, reduction=k + R, name="y")
    g = torch.randn(M, n).to(dtype)
    y.backward(g)
    y64.backward(g.double())
    assert_close_ref(x.grad, x64.grad, dtype, reduction=n + R, name="dx")
    assert_close_ref(d.grad, d64.grad, dtype, reduction=M * k, name="dD")
    assert_close_ref(values.grad, v64.grad, dtype, reduction=M * n, name="dS.values")
    if bias:
        assert_close_ref(b.grad, leaves[3].grad, dtype, reduction=M, name="db")
    return s, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M,k,n,R,bias", [(5, 64, 24, 20, True), (70, 96, 40, 37, False), (72, 128, 33, 48, True)],
                         ids=["decode-M5", "M70-nobias", "M72"])
def test_library_path_matches_float64(triton_cpu, monkeypatch, M, k, n, R, dtype, bias):
    """Forced ``library``: ``t`` by sparse24 (the decode kernel at M <= 64, expand + cuBLAS above),
    cuBLAS ``t·Dᵀ``, ``dt``, ``dD``, ``dx`` on the expanded ``S``, kept(``dtᵀ·x``) selected exactly."""
    monkeypatch.setenv("FASTFACTOR_DS_PATH", "library")
    monkeypatch.delenv("FASTFACTOR_SPARSE24_PATH", raising=False)
    monkeypatch.delenv("FASTFACTOR_SPARSE24_BWD_PATH", raising=False)
    calls = []
    real = K._ds_t
    monkeypatch.setattr(K, "_ds_t", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    _check(M, k, n, R, dtype, bias)
    assert calls, "the library path did not run"


def test_kept_values_gradient_is_the_exact_selection(triton_cpu, monkeypatch):
    """fp32, library backward above decode sizes: ``dSv`` equals the dense ``dtᵀ·x`` (cuBLAS)
    at the kept positions, bit for bit."""
    monkeypatch.setenv("FASTFACTOR_DS_PATH", "library")
    M, k, n, R = 80, 64, 24, 20
    s = _s(R, k, torch.float32, 3)
    x, d, g = torch.randn(M, k), torch.randn(n, R), torch.randn(M, n)
    _, _, ds, _ = K.dense_sparse_bwd(g, x, d, s.values, s.meta, None, False, False, False, True, path="library")
    dense = torch.mm(torch.mm(g, d).t(), x)
    assert torch.equal(ds, K.compress_like(dense, s.meta))


def _cutlass_gemm_on_cpu(monkeypatch):
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

    calls = []

    def mm(packed, meta, dense):
        calls.append(tuple(packed.shape))
        return (sparse_semi_structured_to_dense_cutlass(packed, meta).float() @ dense.float()).to(dense.dtype)

    monkeypatch.setattr(torch, "_sparse_semi_structured_mm", mm)
    return calls


def test_padded_semi_structured_path_matches_float64(triton_cpu, monkeypatch):
    """``torch_pad``: ``S (R = 40, K)`` padded with zero rows to 64 for PyTorch's 2:4 GEMM (its GEMM
    replaced on CPU by PyTorch's own CUTLASS-layout decoder); the padded rows never reach ``y`` or
    the gradients, the codes are padded and reordered once per mask."""
    calls = _cutlass_gemm_on_cpu(monkeypatch)
    monkeypatch.setenv("FASTFACTOR_DS_PATH", "library")
    monkeypatch.setattr(K, "ds_s_plan", lambda *a, **kw: ("torch_pad", 0.0))
    s, values = _check(96, 128, 48, 40, BF16, True, seed=5)
    assert calls and calls[0] == (64, 64)
    m1 = K.torch24_meta_padded(s.meta, 40, 128)
    assert K.torch24_meta_padded(s.meta, 40, 128) is m1                 # cached per mask
    padded = K.padded_meta_24(s.meta, 40, 128, 64)
    assert padded.shape == (64, s.meta.shape[1]) and torch.equal(padded[:40], s.meta)
    assert torch.equal(K.unpack_24(torch.zeros(24, 64), padded[40:], 128), torch.zeros(24, 128))


def test_module_pads_the_codes_at_pack_time():
    from fastfactor.layers.sparse24 import DenseSparseLinear

    mod = DenseSparseLinear(128, 48, rank=40, dtype=torch.bfloat16)
    assert getattr(mod.s_meta, "_fastfactor_pad", None) is not None


# ---------------------------------------------------------------------------------------------
# the dispatcher's predictions against sol's exact counts
# ---------------------------------------------------------------------------------------------

@pytest.mark.perf
@pytest.mark.skipif(not _config.is_interpreter(), reason="counting needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("k,n,M,ratio,path", [(768, 768, 4096, 0.1, "fused"), (768, 3072, 64, 0.25, "roles"),
                                              (768, 3072, 16, 0.25, "roles"), (768, 768, 8, 0.5, "rank_split"),
                                              (3072, 768, 64, 0.25, "roles"), (4096, 4096, 16, 0.25, "roles"),
                                              (768, 3072, 16384, 0.25, "library"),
                                              (4096, 4096, 16384, 0.25, "library")])
def test_dispatcher_and_sol_agree(k, n, M, ratio, path, monkeypatch):
    """The forward's analytic prediction and ``fastfactor sol``'s, from the exact interpreter
    counts of the launches the op makes (and the library ops it records), within 25 %; and the
    dispatcher takes that path at that row."""
    from fastfactor.sol.device import H200
    from fastfactor.sol.rows import RowSpec, evaluate_row

    for var in ("FASTFACTOR_DS_PATH", "FASTFACTOR_SPARSE24_PATH", "FASTFACTOR_SPARSE24_BWD_PATH"):
        monkeypatch.delenv(var, raising=False)
    R = dense_sparse_rank_for_ratio(k, n, ratio)
    row = evaluate_row(RowSpec("dense_sparse", k, n, M, ratio, "fwd"), H200)
    monkeypatch.setattr(_config, "semi_structured_ok", lambda device: device.type == "cuda")
    assert K.choose_ds_path(M, k, n, R, BF16, CUDA) == path
    ours = K.ds_path_costs(M, k, n, R, BF16, CUDA)[path]
    sol = row["predicted_ms"] / 1e3
    assert 0.8 <= sol / ours <= 1.25, (sol, ours, row["kernels"])
    assert row["speedup_vs_unfused"] >= 1.0


def test_rank_above_256_library_path_is_justified(on_gpu_model):
    """Neither the fusion extended past rank 256 (intermediate in shared memory) nor a two-phase
    split-reduction path at a handful of rows is predicted >= 5 % faster than the library path
    (the figures in kernels/sparse24.py's dense-sparse block; the one-launch rank split is, on the
    BERT-size layers at a handful of rows: test_ds_rank_split.py)."""
    for k, n in ((4096, 4096), (768, 3072), (3072, 768)):
        for ratio in (0.25, 0.5):
            R = dense_sparse_rank_for_ratio(k, n, ratio)
            if K._pad_rank(R) <= K.FUSED_MAX_R:
                continue
            for M in (8, 16, 32, 64, 4096, 16384):
                lib = K.ds_path_costs(M, k, n, R, BF16, CUDA)["library"]
                assert K.ds_chain_seconds(M, k, n, R, any_rank=True) > K.DS_MARGIN * lib, (k, n, R, M)
                if M <= K.DECODE_MAX_M:
                    assert K.ds_two_phase_seconds(M, k, n, R) > K.DS_MARGIN * lib, (k, n, R, M)


def test_padded_path_opcheck(triton_cpu, monkeypatch):
    """The op on the ``torch_pad`` path: its outputs' metadata match the fake tensors' (the saved
    ``t`` is contiguous although PyTorch's GEMM returns it transposed)."""
    _cutlass_gemm_on_cpu(monkeypatch)
    monkeypatch.setenv("FASTFACTOR_DS_PATH", "library")
    monkeypatch.setattr(K, "ds_s_plan", lambda *a, **kw: ("torch_pad", 0.0))
    s = _s(40, 128, BF16, seed=6)
    x = torch.randn(64, 128).to(BF16)
    d = torch.randn(48, 40).to(BF16).requires_grad_(True)
    for save_t in (True, False):
        # (aot_dispatch is left out: the CPU stand-in of PyTorch's GEMM is a Python function
        # that Inductor cannot register as an extern kernel)
        torch.library.opcheck(torch.ops.fastfactor.dense_sparse_fwd.default, (x, d, s.values, s.meta, None, save_t),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_saved_t_prices_the_copy_of_pytorchs_transposed_result(on_gpu_model):
    """With ``t`` saved for the backward, PyTorch's 2:4 paths pay its contiguous copy: the plan
    costs it and takes expand + cuBLAS where that makes it the cheaper one."""
    for k, n in SHAPES:
        for R in _ranks(k, n):
            for M in (128, 4096, 16384):
                p0, c0 = K.ds_s_plan(M, k, R, BF16, CUDA)
                p1, c1 = K.ds_s_plan(M, k, R, BF16, CUDA, save_t=True)
                assert c1 >= c0 - 1e-12
                if p1 in ("torch", "torch_pad"):
                    assert c1 > c0 or p0 != p1
                    assert c1 <= K.path_costs(M, k, R, BF16, "fwd")["dense"] * (1 + 1e-9)
                if p0 == p1 and p0 in ("torch", "torch_pad"):
                    assert c1 == pytest.approx(c0 + K._t_copy_seconds(M, R, BF16))
