"""Tier 1 (cpu): property-based tests (hypothesis) of the factorization functions on random and
adversarial matrices: rank-deficient, huge and tiny norms, exact zeros (whole matrix, rows,
columns), a single outlier entry, fast-decaying spectra, ties.

Properties checked (all in float64 on the returned factors):

* ``svd_factors``: shapes and dtype, finite factors, the Eckart–Young error
  ``‖W − U·V‖_F = sqrt(Σ_{i>r} σ_i²)`` up to the rounding of the factors to the weight's dtype,
  and √Σ split evenly (``‖U[:, i]‖ = ‖V[i, :]‖``);
* ``weighted_svd_factors``: no worse in its own weighted norm than the plain SVD factors;
* ``monarch_project`` / ``block_lowrank``: the error equals ``projection_error`` (computed from the
  discarded singular values of the sub-blocks), factors finite, exact recovery of a matrix that is
  already of that structure;
* ``prune_24``: at most 2 non-zeros per group of 4, kept entries unchanged and at least as large in
  magnitude as the dropped ones of their group;
* ``dense_sparse_factors``: ``S`` is 2:4, factors finite, and the ALS rounds never make the error
  worse than the SVD+prune initialization.

Hypothesis' counts: ``pytest --hypothesis-show-statistics``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
#: decimal exponents of the matrix scale each dtype can hold without overflow / underflow
SCALES = {
    torch.float64: [-150, -30, 0, 30, 150],
    torch.float32: [-30, -12, 0, 12, 30],
    torch.bfloat16: [-30, -12, 0, 12, 30],
    torch.float16: [-2, 0, 3],
}
KINDS = ["gaussian", "rank_deficient", "zeros", "zero_rows", "zero_cols", "outlier", "decaying", "ties"]

FACT = settings(
    max_examples=int(os.environ.get("FASTFACTOR_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=os.environ.get("FASTFACTOR_FUZZ_RANDOM", "0") != "1",
    print_blob=True,
)


def _matrix(m, n, kind, scale_exp, seed, q=1):
    """An ``(m, n)`` float64 matrix of the given adversarial kind, scaled by ``10**scale_exp``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    if kind == "rank_deficient":
        w = torch.randn(m, q, generator=g, dtype=torch.float64) @ torch.randn(q, n, generator=g, dtype=torch.float64)
    elif kind == "zeros":
        w.zero_()
    elif kind == "zero_rows":
        w[:: 2] = 0
    elif kind == "zero_cols":
        w[:, 1::2] = 0
    elif kind == "outlier":
        w = w * 1e-3
        w[m // 2, n // 2] = 50.0
    elif kind == "decaying":
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        s = 10.0 ** -torch.arange(u.shape[1], dtype=torch.float64)
        w = (u * s) @ vh
    elif kind == "ties":
        w = torch.randint(-2, 3, (m, n), generator=g).to(torch.float64)  # many equal magnitudes
    return w * 10.0**scale_exp


@st.composite
def matrices(draw, dtypes=("fp32", "fp16", "bf16", "fp64"), mult4=False):
    dtype = DT[draw(st.sampled_from(dtypes))]
    m = draw(st.integers(1, 13))
    n = draw(st.sampled_from([4, 8, 12, 16])) if mult4 else draw(st.integers(1, 13))
    kind = draw(st.sampled_from(KINDS))
    scale = draw(st.sampled_from(SCALES[dtype]))
    seed = draw(st.integers(0, 2**31 - 1))
    q = draw(st.integers(1, max(1, min(m, n) - 1)))
    w = _matrix(m, n, kind, scale, seed, q).to(dtype)
    return w, kind, scale


def _tail(w64: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(w64)
    return float(s[r:].pow(2).sum().sqrt())


def _fro(t):
    return float(t.double().norm())


def _factor_tol(w: torch.Tensor, r: int) -> float:
    """Rounding of ``U`` and ``V`` to ``w``'s dtype perturbs ``U·V`` by about
    ``eps·‖U‖·‖V‖ <= eps·Σσ_i`` (nuclear norm); allow a safety factor."""
    s = torch.linalg.svdvals(w.double())
    return 8 * EPS[w.dtype] * float(s[:r].sum()) * math.sqrt(r) + 1e-300


# --------------------------------------------------------------------------------------------
# SVD
# --------------------------------------------------------------------------------------------

@FACT
@given(matrices(), st.data())
def test_svd_factors_eckart_young(mat, data):
    from fastfactor.factorize import svd_factors

    w, kind, _ = mat
    r = data.draw(st.integers(1, min(w.shape)), label="rank")
    u, v = svd_factors(w, r, name="enc.q")
    assert u.shape == (w.shape[0], r) and v.shape == (r, w.shape[1])
    assert u.dtype == w.dtype and v.dtype == w.dtype
    assert torch.isfinite(u).all() and torch.isfinite(v).all(), kind
    w64 = w.double()
    err = _fro(w64 - u.double() @ v.double())
    want = _tail(w64, r)
    assert abs(err - want) <= _factor_tol(w, r) + 1e-9 * _fro(w64), (kind, err, want)
    if kind == "zeros":
        assert not u.any() and not v.any()
    # √Σ split evenly: column i of U and row i of V have the same norm sqrt(σ_i)
    nu, nv = u.double().norm(dim=0), v.double().norm(dim=1)
    assert torch.allclose(nu, nv, rtol=64 * EPS[w.dtype] * math.sqrt(max(w.shape)), atol=1e-300 + float(nu.max()) * 1e-6)


@FACT
@given(matrices(dtypes=("fp32", "fp64")), st.data())
def test_weighted_svd_is_optimal_in_its_norm(mat, data):
    from fastfactor.factorize import svd_factors, weighted_svd_factors

    w, kind, _ = mat
    r = data.draw(st.integers(1, min(w.shape)), label="rank")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    rw = torch.rand(w.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 9.9 + 0.1
    u, v = weighted_svd_factors(w, r, rw.to(w.dtype), name="enc.q")
    u0, v0 = svd_factors(w, r)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    w64 = w.double()
    rw = rw.to(w.dtype).double()
    err = _fro(rw[:, None] * (w64 - u.double() @ v.double()))
    err0 = _fro(rw[:, None] * (w64 - u0.double() @ v0.double()))
    assert err <= err0 + 10 * _factor_tol(w, r) * float(rw.max()), (kind, err, err0)


# --------------------------------------------------------------------------------------------
# Monarch / block-wise low-rank projection
# --------------------------------------------------------------------------------------------

def _has(modname):
    try:
        __import__(modname)
        return True
    except ImportError:
        return False


needs_monarch = pytest.mark.skipif(not _has("fastfactor.factorize.monarch"), reason="Monarch projection not present")
needs_24 = pytest.mark.skipif(not _has("fastfactor.factorize.sparse24"), reason="2:4 factorization not present")


@needs_monarch
@FACT
@given(matrices(dtypes=("fp32", "bf16", "fp64")), st.data())
def test_monarch_projection_error_matches_singular_values(mat, data):
    from fastfactor.factorize import monarch as FM
    from fastfactor.kernels.monarch import dense_weight_ref

    w, kind, _ = mat
    out_f, in_f = w.shape
    b = data.draw(st.integers(1, min(3, out_f, in_f)), label="nblocks")
    r = data.draw(st.integers(1, FM.max_rank(in_f, out_f, b)), label="rank")
    strided = data.draw(st.booleans(), label="strided")
    proj = FM.monarch_project if strided else FM.block_lowrank
    w1, w2 = proj(w, b, r)
    assert w1.dtype == w.dtype and torch.isfinite(w1).all() and torch.isfinite(w2).all(), kind
    dense = dense_weight_ref(w1.double(), w2.double(), in_f, out_f, strided)
    err = _fro(w.double() - dense)
    want = FM.projection_error(w, b, r, strided)
    tol = 8 * EPS[w.dtype] * float(torch.linalg.svdvals(w.double()).sum()) * math.sqrt(b * r) + 1e-9 * _fro(w)
    assert abs(err - want) <= tol + 1e-300, (kind, err, want)
    # a matrix that already has this structure is recovered (up to the factors' rounding)
    if w.dtype == torch.float64:
        w_again = proj(dense, b, r)
        back = dense_weight_ref(*w_again, in_f, out_f, strided)
        assert _fro(back - dense) <= 1e-9 * (_fro(dense) + 1e-300)


# --------------------------------------------------------------------------------------------
# 2:4 pruning and dense-sparse
# --------------------------------------------------------------------------------------------

@needs_24
@FACT
@given(matrices(mult4=True))
def test_prune_24_keeps_the_two_largest_of_every_group(mat):
    from fastfactor.factorize.sparse24 import mask_24, prune_24

    w, kind, _ = mat
    p = prune_24(w)
    mask = mask_24(w)
    rows, k = w.shape
    assert p.dtype == w.dtype and p.shape == w.shape
    assert int(mask.reshape(rows, k // 4, 4).sum(-1).max()) == 2 and int(mask.reshape(rows, k // 4, 4).sum(-1).min()) == 2
    assert torch.equal(p, torch.where(mask, w, torch.zeros_like(w)))
    assert int((p.reshape(rows, k // 4, 4) != 0).sum(-1).max()) <= 2
    a = w.abs().double().reshape(rows, k // 4, 4)
    m4 = mask.reshape(rows, k // 4, 4)
    kept_min = torch.where(m4, a, torch.full_like(a, float("inf"))).min(-1).values
    drop_max = torch.where(~m4, a, torch.full_like(a, -1.0)).max(-1).values
    assert (kept_min >= drop_max).all(), kind


@needs_24
@FACT
@given(matrices(dtypes=("fp32", "fp64"), mult4=True), st.data())
def test_dense_sparse_als_never_worse_than_its_init(mat, data):
    from fastfactor.factorize.sparse24 import dense_sparse_factors, max_dense_sparse_rank

    w, kind, scale = mat
    out_f, in_f = w.shape
    r = data.draw(st.integers(1, max_dense_sparse_rank(in_f, out_f)), label="rank")
    d0, s0 = dense_sparse_factors(w, r, init="svd", name="enc.q")
    d, s = dense_sparse_factors(w, r, init="svd_als", als_iters=3, name="enc.q")
    for t in (d, s, d0, s0):
        assert torch.isfinite(t).all(), (kind, scale)
    assert int((s.reshape(r, in_f // 4, 4) != 0).sum(-1).max()) <= 2
    w64 = w.double()
    err = _fro(w64 - d.double() @ s.double())
    err0 = _fro(w64 - d0.double() @ s0.double())
    tol = 1e-4 * _fro(w64) + _factor_tol(w, min(r, min(w.shape)))
    assert err <= err0 + tol, (kind, scale, err, err0)
    assert err <= _fro(w64) * (1 + 1e-4) + 1e-300  # never worse than the zero approximation


# --------------------------------------------------------------------------------------------
# NaN / Inf in a weight: a clear error naming the module (deterministic, every function)
# --------------------------------------------------------------------------------------------

def _factorizers():
    from fastfactor.factorize import svd_factors, weighted_svd_factors

    out = [
        ("svd_factors", lambda w, name: svd_factors(w, 2, name=name)),
        ("weighted_svd_factors", lambda w, name: weighted_svd_factors(w, 2, torch.ones(w.shape[0]), name=name)),
    ]
    if _has("fastfactor.factorize.sparse24"):
        from fastfactor.factorize.sparse24 import dense_sparse_factors

        out.append(("dense_sparse_factors", lambda w, name: dense_sparse_factors(w, 2, name=name)))
    return out


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("fname,fn", _factorizers(), ids=[n for n, _ in _factorizers()])
def test_nonfinite_weight_names_the_module(fname, fn, bad):
    w = torch.randn(6, 8)
    w[2, 5] = float(bad)
    with pytest.raises(ValueError, match=r"encoder\.layer\.3\.attention\.self\.query.*finite.*1 NaN/Inf"):
        fn(w, "encoder.layer.3.attention.self.query")


@needs_monarch
@pytest.mark.parametrize("fname", ["monarch_project", "block_lowrank"])
def test_nonfinite_weight_monarch_projection_errors(fname):
    """The Monarch projections take no ``name=``: they raise naming their argument ``W`` (the
    driver must add the module name, see ROBUSTNESS.md)."""
    from fastfactor.factorize import monarch as FM

    w = torch.randn(6, 8)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"W.*finite"):
        getattr(FM, fname)(w, 2, 1)
