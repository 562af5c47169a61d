"""Calibration statistics (activation Gram, Fisher), against direct computations. (The data-aware
factorizations built on them are tested with their families: tests/*/test_factorize.py.)"""

import torch
from torch import nn

from fastfactor.compress import calibration as C


def test_collectors_match_direct_computation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(7, 11), nn.Tanh(), nn.Linear(11, 5))
    batches = [torch.randn(3, 4, 7) for _ in range(3)]
    mods = {"0": model[0], "2": model[2]}
    stats = C.collect_activation_stats(model, mods, batches, lambda m, b: m(b))
    x = torch.cat([b.reshape(-1, 7) for b in batches]).double()
    g, n = stats["0"]
    assert n == 36
    torch.testing.assert_close(g, x.t() @ x)
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)  # must survive calibration
    fisher = C.collect_fisher(model, mods, batches, lambda m, b: m(b).pow(2).sum())
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    expect = torch.zeros(5, 11, dtype=torch.float64)
    for b in batches:
        model.zero_grad()
        model(b).pow(2).sum().backward()
        expect += model[2].weight.grad.double() ** 2
    torch.testing.assert_close(fisher["2"], expect)
