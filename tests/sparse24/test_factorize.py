"""Tier 1 (cpu): the 2:4 / dense-sparse factorizations: ratio -> rank, the SVD + prune + ALS
initialization (its error never grows; it recovers an exact dense-sparse matrix), the ALS solver
(Cholesky on its SPD systems, a fallback, no multi-thread hang) and the data-aware 2:4 scores."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from fastfactor.factorize import data_aware as D
from fastfactor.factorize.sparse24 import (
    _spd_solve,
    dense_sparse_factors,
    dense_sparse_num_params,
    dense_sparse_rank_for_ratio,
)
from fastfactor.formats.sparse24 import prune_24
from fastfactor.layers.sparse24 import DenseSparseLinear


def test_spd_solve_matches_direct_solve_and_falls_back():
    torch.manual_seed(0)
    b = torch.randn(5, 7, 7, dtype=torch.float64)
    a = b @ b.transpose(1, 2) + 0.1 * torch.eye(7, dtype=torch.float64)
    rhs = torch.randn(5, 7, 1, dtype=torch.float64)
    torch.testing.assert_close(_spd_solve(a, rhs), torch.linalg.solve(a, rhs))
    # one system that is not positive definite (a negative eigenvalue): solved by the fallback
    a[2] = torch.diag(torch.tensor([1.0, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0], dtype=torch.float64))
    x = _spd_solve(a, rhs)
    torch.testing.assert_close(a @ x, rhs)


def test_als_init_does_not_hang_with_two_threads(tmp_path):
    """MKL's batched LU printed "Parameter 6 was incorrect on entry to DLASWP" and hung with two
    threads on this shape; the Cholesky path finishes and gives the single-thread result."""
    script = tmp_path / "als.py"
    script.write_text(textwrap.dedent("""
        import sys, torch
        torch.set_num_threads(int(sys.argv[1]))
        from fastfactor.factorize.sparse24 import dense_sparse_factors
        torch.manual_seed(0)
        w = torch.randn(1536, 384) / 20
        d, s = dense_sparse_factors(w, 200, init="svd_als", als_iters=2)[:2]
        err = ((w.double() - d.double() @ s.to_dense().double()).norm() / w.double().norm()).item()
        print(repr(err))
    """))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    errs = []
    for threads in ("1", "2"):
        out = subprocess.run([sys.executable, str(script), threads], capture_output=True, text=True,
                             timeout=240, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "DLASWP" not in out.stderr
        errs.append(float(out.stdout.strip().splitlines()[-1]))
    assert abs(errs[0] - errs[1]) < 1e-9 and errs[0] < 0.6


def test_sparse24_scores():
    w = torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(D.sparse24_scores(w), w.abs())
    f = torch.rand(5, 8, dtype=torch.float64)
    torch.testing.assert_close(D.sparse24_scores(w, "fisher", fisher=f), w * w * f)
    gram = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    torch.testing.assert_close(D.sparse24_scores(w, "activation", gram=gram), w.abs() * gram.diagonal().sqrt())
    with pytest.raises(ValueError, match="gram"):
        D.sparse24_scores(w, "activation")


@pytest.mark.parametrize("shape", [(768, 3072), (3072, 768), (4096, 4096), (36, 20)], ids=str)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_rank_for_ratio_is_largest_within_budget(shape, ratio):
    in_f, out_f = shape
    r = dense_sparse_rank_for_ratio(in_f, out_f, ratio)
    assert r >= 1
    budget = ratio * in_f * out_f
    assert dense_sparse_num_params(in_f, out_f, r) <= budget or r == 1
    assert dense_sparse_num_params(in_f, out_f, r + 1) > budget or r == max(in_f, out_f)
    m = DenseSparseLinear.from_linear(nn.Linear(in_f, out_f), ratio=ratio) if in_f * out_f < 5000 else None
    if m is not None:
        assert m.rank == r and m.ratio <= ratio


def test_svd_als_never_increases_the_error():
    torch.manual_seed(1)
    w = torch.randn(24, 40, dtype=torch.float64)
    errs = [(w - torch.mm(*dense_sparse_factors(w, 12, init="svd"))).norm().item()]
    for it in (1, 2, 4, 8):
        d, s = dense_sparse_factors(w, 12, als_iters=it)
        assert ((s.reshape(12, -1, 4) != 0).sum(-1) <= 2).all()
        errs.append((w - d @ s).norm().item())
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.95 * errs[0], errs


def test_svd_als_recovers_an_exact_dense_sparse_matrix_better_than_svd():
    torch.manual_seed(2)
    d0 = torch.randn(30, 6, dtype=torch.float64)
    s0 = prune_24(torch.randn(6, 32, dtype=torch.float64))
    w = d0 @ s0
    d1, s1 = dense_sparse_factors(w, 6, init="svd")
    d2, s2 = dense_sparse_factors(w, 6, als_iters=20)
    assert (w - d2 @ s2).norm() < 0.9 * (w - d1 @ s1).norm()
