"""Tier 1 (cpu): NaN / Inf in activations propagate like ``F.linear`` with the layer's dense weight.

For every op, backend (reference, interpreted kernels on each path) and dtype: an input with a NaN
in one row, +Inf in another and -Inf in a third, other rows finite. Compared with
``F.linear(x, W_dense, b)`` computed in float64 (``W_dense`` the matrix the factors represent):

* rows of ``y`` (and of ``dx``) that ``F.linear`` leaves finite are finite and close to it — a
  NaN never leaks into another row through a shared tile or a padded lane;
* wherever ``F.linear`` gives NaN, the op gives NaN; wherever it gives ±Inf the op gives a
  non-finite value (±Inf, or NaN where a factorized product meets ``Inf·0`` or ``Inf − Inf`` in
  its intermediate: an Inf activation times the rank-r factors is not a well-defined Inf).

NaN/Inf in *weights* given to a factorization: ``tests/test_fuzz_factorize.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_ref
from test_fuzz_ops import backend, has_op, make_case, op_variants

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BAD_ROWS = {1: float("nan"), 4: float("inf"), 6: float("-inf")}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("op,be,path", op_variants())
def test_nonfinite_activations_propagate_like_f_linear(op, be, path, dtype):
    if not has_op(op):
        pytest.skip(f"{op} op not present")
    dt = DTYPES[dtype]
    case = make_case(op, lead=(9,), k=12, n=11, r=3, nblocks=2, dtype=dt, bias=True, layout="sliced", seed=21)
    x = case.x.clone()
    for row, val in BAD_ROWS.items():
        x[row, 5] = val
    case.x = x[:, :]  # keep a plain copy: the op sees a contiguous input with the bad entries
    with backend(be, op, path):
        xl, ps = case.leaves()
        y = case.run(xl, ps)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dt)
        y.backward(g)
    # F.linear with the dense weight, float64, autograd for dx
    x64 = case.x.double().requires_grad_()
    p64 = [p.double() for p in case.params]
    y64 = case.ref64(x64, *p64)
    (y64 * g.double()).sum().backward()
    for name, got, want in (("y", y.detach(), y64.detach()), ("dx", xl.grad, x64.grad)):
        bad_rows = sorted(BAD_ROWS)
        good = [i for i in range(got.shape[0]) if i not in bad_rows]
        assert torch.isfinite(want[good]).all()
        assert torch.isfinite(got[good]).all(), f"{name}: a NaN/Inf leaked into rows without one"
        assert_close_ref(got[good], want[good], dt, reduction=case.reduction + 11, name=name)
        if name == "y":
            assert torch.equal(torch.isnan(got) & torch.isnan(want), torch.isnan(want)), (
                f"{name}: F.linear gives NaN where the op does not"
            )
            assert torch.equal(~torch.isfinite(got), ~torch.isfinite(want)), (
                f"{name}: non-finite pattern differs from F.linear"
            )
        else:
            # dx = g·W does not see the bad activations at all: every row must be finite here
            assert torch.isfinite(got).all(), f"{name}: non-finite although g and the weights are finite"


@pytest.mark.parametrize("op,be,path", op_variants())
def test_nan_gradient_rows_stay_in_their_rows(op, be, path):
    """A NaN in the upstream gradient ``g`` of one row: ``dx`` is NaN in that row only (like
    ``F.linear``'s backward), the weight gradients are NaN (they sum over rows)."""
    if not has_op(op):
        pytest.skip(f"{op} op not present")
    case = make_case(op, lead=(9,), k=12, n=11, r=3, nblocks=2, dtype=torch.float32, bias=True,
                     layout="contig", seed=5)
    with backend(be, op, path):
        xl, ps = case.leaves()
        y = case.run(xl, ps)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        g[2, 4] = float("nan")
        y.backward(g)
    others = [i for i in range(9) if i != 2]
    assert torch.isnan(xl.grad[2]).all()
    assert torch.isfinite(xl.grad[others]).all()
    bias_grad = ps[-1].grad
    assert torch.isnan(bias_grad[4]) and torch.isfinite(bias_grad[[i for i in range(11) if i != 4]]).all()
