"""Tier 1 (cpu): projection of dense weights onto the Monarch and block-wise low-rank sets."""

import math

import pytest
import torch

from fastfactor.factorize.monarch import (
    block_lowrank,
    max_rank,
    monarch_project,
    monarch_rank_for_ratio,
    projection_error,
)
from fastfactor.kernels import monarch as Mk

FAMILIES = {"monarch": (monarch_project, True), "blr": (block_lowrank, False)}
# (out, in, nblocks, rank): square, rectangular both ways, non-divisible sizes, rank 1 and 2+
CASES = [(16, 16, 4, 1), (12, 20, 4, 2), (23, 17, 3, 2), (30, 10, 5, 1), (9, 14, 2, 3)]
CASE_IDS = [f"out{o}-in{i}-b{b}-r{r}" for o, i, b, r in CASES]


def random_factors(out_f, in_f, b, r):
    """Random factors with the padding zeroed (a padded weight is invisible to the dense matrix,
    so only then is the recovered factorization unique up to per-block gauge)."""
    s1, s2 = Mk.factor_shapes(in_f, out_f, b, r)
    return torch.randn(*s1, dtype=torch.float64), torch.randn(*s2, dtype=torch.float64)


@pytest.mark.parametrize("family", FAMILIES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_recovers_structured_matrix(case, family):
    """A matrix built from random factors is reproduced to float64 rounding."""
    out_f, in_f, b, r = case
    project, strided = FAMILIES[family]
    w1, w2 = random_factors(out_f, in_f, b, r)
    W = Mk.dense_weight_ref(w1, w2, in_f, out_f, strided)
    p1, p2 = project(W, b, r)
    assert p1.shape == w1.shape and p2.shape == w2.shape
    W2 = Mk.dense_weight_ref(p1, p2, in_f, out_f, strided)
    assert (W2 - W).abs().max().item() <= 1e-10 * (1 + W.abs().max().item())
    assert projection_error(W, b, r, strided) <= 1e-9 * W.norm().item()


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_padding_of_projected_factors_is_zero(family):
    project, _ = FAMILIES[family]
    out_f, in_f, b, r = 23, 17, 3, 2       # kb = 6 (1 padded column), nb = 8 (1 padded row)
    w1, w2 = project(torch.randn(out_f, in_f, dtype=torch.float64), b, r)
    assert torch.all(w1[-1, :, -1] == 0)    # input column 17 of the padded 18
    assert torch.all(w2[-1, -1, :] == 0)    # output row 23 = (l=2, s=7) in both layouts
    assert w1.abs().sum() > 0 and w2.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_projection_is_optimal_against_gradient_descent(case, family):
    """For random dense W, no structured matrix found by gradient descent started at the
    projection (and at perturbations of it) has a smaller error: the projection is optimal."""
    out_f, in_f, b, r = case
    project, strided = FAMILIES[family]
    W = torch.randn(out_f, in_f, dtype=torch.float64)
    p1, p2 = project(W, b, r)
    err0 = (Mk.dense_weight_ref(p1, p2, in_f, out_f, strided) - W).norm().item()
    assert err0 == pytest.approx(projection_error(W, b, r, strided), rel=1e-9)
    # a useful projection: strictly better than the zero matrix
    assert err0 < W.norm().item()
    for start_noise in (0.0, 0.1):
        a = (p1 + start_noise * torch.randn_like(p1)).requires_grad_()
        c = (p2 + start_noise * torch.randn_like(p2)).requires_grad_()
        opt = torch.optim.Adam([a, c], lr=1e-2)
        best = math.inf
        for _ in range(60):
            opt.zero_grad()
            loss = (Mk.dense_weight_ref(a, c, in_f, out_f, strided) - W).norm()
            best = min(best, loss.item())
            loss.backward()
            opt.step()
        assert best >= err0 * (1 - 1e-9), (start_noise, best, err0)


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_full_rank_is_exact_and_error_decreases_with_rank(family):
    project, strided = FAMILIES[family]
    out_f, in_f, b = 20, 15, 3
    W = torch.randn(out_f, in_f, dtype=torch.float64)
    errs = [projection_error(W, b, r, strided) for r in range(1, max_rank(in_f, out_f, b) + 1)]
    assert all(e1 >= e2 - 1e-12 for e1, e2 in zip(errs, errs[1:]))
    w1, w2 = project(W, b, max_rank(in_f, out_f, b))
    torch.testing.assert_close(Mk.dense_weight_ref(w1, w2, in_f, out_f, strided), W, rtol=0, atol=1e-10)


def test_families_differ():
    """A Monarch matrix is generally not block-wise low-rank at the same rank (and vice versa)."""
    w1, w2 = random_factors(16, 16, 4, 1)
    Wm = Mk.dense_weight_ref(w1, w2, 16, 16, True)
    assert projection_error(Wm, 4, 1, strided=False) > 1e-3 * Wm.norm().item()


def test_dtype_preserved():
    W = torch.randn(12, 20).to(torch.bfloat16)
    w1, w2 = monarch_project(W, 4, 2)
    assert w1.dtype == w2.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "in_f,out_f,b,ratio",
    [(768, 3072, 4, 0.5), (4096, 4096, 4, 0.5), (100, 70, 3, 0.25), (30, 50, 4, 1.0)],
    ids=lambda v: str(v),
)
def test_rank_for_ratio_formula(in_f, out_f, b, ratio):
    r = monarch_rank_for_ratio(in_f, out_f, b, ratio)
    kb, nb = -(-in_f // b), -(-out_f // b)
    params = lambda rr: b * rr * (b * kb + b * nb)
    assert 1 <= r <= min(kb, nb)
    assert r == max(1, min(kb, nb, math.floor(ratio * in_f * out_f / (b * b * (kb + nb)))))
    if r < min(kb, nb):
        assert params(r) <= ratio * in_f * out_f < params(r + 1)


def test_rank_for_ratio_classic_monarch():
    # 4096 x 4096 at b = 4: the dense-block Monarch (ratio 1/2) is rank kb / b = 256
    assert monarch_rank_for_ratio(4096, 4096, 4, 0.5) == 256


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (lambda: monarch_project(torch.randn(8, 8), 3, 4), ValueError, r"rank: expected an int in \[1, 3\], got 4"),
        (lambda: monarch_project(torch.randn(8, 8), 0), ValueError, r"nblocks: expected an int in \[1, 8\], got 0"),
        (lambda: monarch_project(torch.randn(8, 8), 9), ValueError, r"nblocks: expected an int in \[1, 8\], got 9"),
        (lambda: monarch_project(torch.randn(8), 2), ValueError, r"W: expected a 2-D tensor"),
        (lambda: block_lowrank(torch.full((4, 4), float("nan")), 2, 1), ValueError, r"W: expected finite values"),
        (lambda: monarch_project(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1, 1, name="enc.q.weight"),
         ValueError, r"enc\.q\.weight: expected finite values, found 1 NaN/Inf"),
        (lambda: block_lowrank(torch.randn(8, 8), 2, 1.5), TypeError, r"rank: expected an int, got float"),
        (lambda: monarch_rank_for_ratio(8, 8, 2, 0.0), ValueError, r"ratio: expected a float in \(0, 1\]"),
        (lambda: monarch_rank_for_ratio(8, 8, 2, "half"), TypeError, r"ratio: expected a float in \(0, 1\], got str"),
    ],
    ids=["rank-too-big", "nblocks-zero", "nblocks-too-big", "W-1d", "W-nan", "named-inf", "rank-float", "ratio-zero", "ratio-str"],
)
def test_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()
