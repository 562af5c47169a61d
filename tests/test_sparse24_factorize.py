"""The dense-sparse ALS solver: Cholesky on its SPD systems, a fallback, and no multi-thread hang."""

import os
import subprocess
import sys
import textwrap

import torch

from fastfactor.factorize.sparse24 import _spd_solve


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
