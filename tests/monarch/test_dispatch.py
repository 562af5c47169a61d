"""The Monarch dispatcher's backward model (``choose_path(..., backward=True)``,
``_bwd_path_seconds``): the backward picks the path its own model predicts fastest, among the
paths that exist for the shape, and the model's terms move the way the launches do. Figures are
**predicted, not measured** (the sol model's device and rates)."""

import pytest

from fastfactor.kernels import monarch as Mk

SHAPES = [(768, 3072), (3072, 768), (4096, 4096), (1000, 600)]


@pytest.fixture(autouse=True)
def _no_forced_path(monkeypatch):
    monkeypatch.delenv("FASTFACTOR_MONARCH_PATH", raising=False)


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", [16, 4096, 16384])
@pytest.mark.parametrize("b", [2, 4, 8, 16])
def test_backward_choice_is_the_predicted_fastest(K, N, M, b):
    # monarch_bwd calls choose_path with the backward's (M, g width = N, dx width = K)
    p = Mk.choose_path(M, N, K, b, 1, 2, True, backward=True)
    assert p in ("rows", "fused", "two_stage")
    t = {q: Mk._bwd_path_seconds(M, K, N, b, 1, q) for q in ("rows", "fused", "two_stage")}
    assert all(t[p] <= t[q] for q in t)
    assert all(v > 0 for v in t.values())


def test_backward_takes_rows_at_few_rows_and_many_blocks():
    # the miss of the previous dispatcher: at M = 16 with 8 blocks the backward took the chain
    # (its forward model), which reads the gathered g once per output tile
    for K, N in SHAPES[:3]:
        assert Mk.choose_path(16, N, K, 8, 1, 2, True, backward=True) == "rows"


def test_backward_model_without_rows_when_h_is_too_wide():
    # b·b·r > 256: the row-block kernel does not exist for the shape
    assert not Mk.rows_supported(32, 1)
    assert Mk.choose_path(4096, 4096, 4096, 32, 1, 2, True, backward=True) in ("fused", "two_stage")


def test_backward_model_terms():
    t = lambda M, **kw: Mk._bwd_path_seconds(M, 4096, 4096, 4, 1, "rows", **kw)
    assert t(16384) > t(4096) > t(16)              # bytes grow with the rows
    assert t(4096, need_w1=False) < t(4096)        # no dw1 launch
    with pytest.raises(ValueError, match="path"):
        Mk._bwd_path_seconds(16, 64, 64, 2, 1, "torch")


def test_backward_forced_path(monkeypatch):
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "two_stage")
    assert Mk.choose_path(16, 4096, 4096, 8, 1, backward=True) == "two_stage"
    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", "torch")
    assert Mk.choose_path(16, 4096, 4096, 8, 1, backward=True) == "two_stage"
