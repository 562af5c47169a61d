"""GLUE metrics against hand-computed values."""

import math

import pytest
import torch

from fastfactor.train import metrics as M


def test_classification_metrics_by_hand():
    y = [1, 0, 1, 1, 0, 0, 1, 0]
    p = [1, 0, 0, 1, 1, 0, 1, 0]
    # TP=3 FP=1 FN=1 TN=3
    assert M.accuracy(p, y) == 6 / 8
    assert M.f1_binary(p, y) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert M.matthews_corrcoef(p, y) == pytest.approx((3 * 3 - 1 * 1) / math.sqrt(4 * 4 * 4 * 4))
    assert M.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant prediction
    assert M.f1_binary([0, 0], [0, 0]) == 0.0
    # multi-class MCC (Gorodkin): perfect prediction is 1, a permutation is negative
    assert M.matthews_corrcoef([0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(1.0)
    assert M.matthews_corrcoef([1, 2, 0], [0, 1, 2]) < 0
    with pytest.raises(ValueError, match="pred: expected 3 predictions"):
        M.accuracy([1, 2], [1, 2, 3])


def test_correlations_by_hand():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert M.pearson(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)
    assert M.pearson(x, [-v for v in x]) == pytest.approx(-1.0)
    assert M.spearman(x, [v**3 for v in x]) == pytest.approx(1.0)  # monotone, non-linear
    assert torch.equal(M.rankdata([10.0, 20.0, 20.0, 5.0]), torch.tensor([2.0, 3.5, 3.5, 1.0], dtype=torch.float64))
    # Spearman with ties = Pearson of average ranks, by hand
    a, b = [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0]
    ra, rb = [1, 2.5, 2.5, 4], [1, 3, 2, 4]
    assert M.spearman(a, b) == pytest.approx(M.pearson(ra, rb))
    assert math.isnan(M.pearson([1.0, 1.0], [1.0, 2.0]))


def test_task_metrics_and_fidelity():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    out = M.task_metrics("classification", logits, torch.tensor([0, 1, 1]), ("mcc",))
    assert set(out) == {"mcc", "accuracy"} and out["accuracy"] == pytest.approx(2 / 3)
    r = M.task_metrics("regression", torch.tensor([[0.1], [0.5], [0.9]]), torch.tensor([0.0, 1.0, 2.0]))
    assert r["pearson"] == pytest.approx(1.0, abs=1e-9) and r["spearman"] == pytest.approx(1.0)
    e = torch.randn(9, 5)
    assert M.mean_cosine(e, 3 * e) == pytest.approx(1.0)
    assert M.pairwise_similarity_spearman(e, 2 * e) == pytest.approx(1.0)
