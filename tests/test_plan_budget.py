"""fastfactor.plan: sensitivity scores, the budget solver (exact against brute force), plans as data."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from fastfactor.compress._tiny import tiny_model
from fastfactor.plan import (BudgetPlan, Choice, ModuleCandidates, apply_plan, candidate_ranks, plan_model,
                             sensitivity, solve, tail_energies)


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path, monkeypatch):
    """Scores and latency costs cached in a fresh folder per test (never the user's cache)."""
    monkeypatch.setenv("FASTFACTOR_PLAN_CACHE", str(tmp_path / "plan-cache"))


def _random_candidates(g, n_modules):
    cands = []
    for m in range(n_modules):
        i, o = int(g.integers(5, 19)), int(g.integers(5, 19))
        ranks = sorted(set(int(r) for r in g.integers(1, min(i, o) + 1, size=3)))
        ch = [Choice("dense", None, i * o, 0.0)]
        sc = sorted(g.random(len(ranks)) * 10, reverse=True)
        ch += [Choice("lowrank", r, r * (i + o), float(s)) for r, s in zip(ranks, sc)]
        cands.append(ModuleCandidates(f"m{m}", i, o, ch))
    return cands


def _brute(cands, budget):
    best = math.inf
    for combo in itertools.product(*[c.choices for c in cands]):
        if sum(ch.params for ch in combo) <= budget:
            best = min(best, sum(ch.score for ch in combo))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_solver_exact_against_brute_force(seed):
    g = np.random.default_rng(seed)
    cands = _random_candidates(g, int(g.integers(1, 5)))
    total = sum(c.dense_params for c in cands)
    minimum = sum(min(ch.params for ch in c.choices) for c in cands)
    for frac in (0.2, 0.35, 0.5, 0.8, 1.0):
        budget = math.floor(frac * total)
        if budget < minimum:
            with pytest.raises(ValueError, match="unreachable"):
                solve(cands, frac)
            continue
        plan = solve(cands, frac)
        assert plan.exact and plan.budget == budget
        assert plan.params <= budget
        assert math.isclose(plan.score, _brute(cands, budget), rel_tol=1e-12, abs_tol=1e-12)
        # absolute count gives the same optimum
        assert math.isclose(solve(cands, budget).score, plan.score, rel_tol=1e-12, abs_tol=1e-12)


def test_solver_coarse_grid_stays_within_budget():
    solved = 0
    for seed in range(6):
        g = np.random.default_rng(100 + seed)
        cands = _random_candidates(g, 4)
        total = sum(c.dense_params for c in cands)
        for frac in (0.7, 0.85, 1.0):
            try:
                plan = solve(cands, frac, max_cells=60)
            except ValueError:
                continue
            solved += 1
            best = _brute(cands, math.floor(frac * total))
            assert plan.params <= math.floor(frac * total)
            assert plan.score >= best - 1e-12
            # the floor-grid relaxation bounds the optimum from below; "exact" means proven optimal
            assert plan.score_lower_bound <= best + 1e-12
            if plan.exact:
                assert math.isclose(plan.score, best, rel_tol=1e-12, abs_tol=1e-12)
    assert solved >= 3


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-3, ValueError), (0.0, ValueError), (-0.5, ValueError),
                                     (1.5, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                     (True, TypeError), ("0.5", TypeError), (None, ValueError), (1, ValueError)])
def test_bad_budgets_raise_before_any_weight_is_touched(bad, exc):
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match="target_params"):
        plan_model(model, bad)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_budget_checked_before_svd(monkeypatch):
    import fastfactor.plan as P

    called = []
    monkeypatch.setattr(P, "tail_energies", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match="unreachable"):
        plan_model(tiny_model("bert"), 5)
    assert not called


def test_tail_energies_closed_form_matches_whitened_error():
    torch.manual_seed(0)
    o, i, n = 11, 9, 40
    w = torch.randn(o, i, dtype=torch.float64)
    x = torch.randn(n, i, dtype=torch.float64) * torch.linspace(0.1, 3, i, dtype=torch.float64)
    gram = x.t() @ x
    t = tail_energies(w, gram)
    assert t.shape == (min(o, i) + 1,) and t[-1] == 0
    from fastfactor.factorize.data_aware import whitened_svd_factors

    for r in (1, 3, 6):
        u, v, _ = whitened_svd_factors(w, r, gram)
        err = ((w - u @ v) @ x.t()).pow(2).sum()  # output error over the calibration tokens
        assert torch.allclose(err, t[r], rtol=1e-8)
        # and no rank-r matrix does better than the closed form: a plain SVD truncation is worse or equal
        uu, s, vh = torch.linalg.svd(w)
        plain = ((w - (uu[:, :r] * s[:r]) @ vh[:r]) @ x.t()).pow(2).sum()
        assert plain >= t[r] - 1e-9
    t0 = tail_energies(w)
    s = torch.linalg.svdvals(w)
    assert torch.allclose(t0[2], s[2:].pow(2).sum())


def test_candidate_ranks_below_break_even():
    rs = candidate_ranks(24, 37)
    assert rs == sorted(set(rs)) and all(1 <= r and r * 61 < 24 * 37 for r in rs)
    assert candidate_ranks(24, 37, ranks=[1, 5, 14, 15, 24]) == [1, 5, 14]  # 15·61 > 888
    with pytest.raises(ValueError, match="ranks"):
        candidate_ranks(24, 37, ranks=[0])


def test_sensitivity_scores_monotone_and_gram_checked():
    model = tiny_model("bert")
    cands = sensitivity(model)
    assert len(cands) == 12  # 2 blocks x (q, k, v, attn out, intermediate, output)
    for c in cands:
        assert c.choices[0].method == "dense" and c.choices[0].score == 0
        sc = [ch.score for ch in c.choices[1:]]
        assert all(a >= b for a, b in zip(sc, sc[1:])) and all(s > 0 for s in sc)
    with pytest.raises(ValueError, match="grams"):
        sensitivity(model, grams={})


@pytest.mark.parametrize("frac", [0.3, 0.5])
def test_plan_applied_to_tiny_bert_meets_budget_and_ranks(frac, tmp_path):
    from fastfactor.compress.targets import select_targets
    from fastfactor.layers.lowrank import LowRankLinear

    model = tiny_model("bert", seed=1)
    ref = tiny_model("bert", seed=1)
    plan = plan_model(model, frac)
    assert plan.params <= plan.budget == math.floor(frac * plan.target_params_dense)
    assert any(m.method == "lowrank" for m in plan.modules)
    # JSON round trip
    p = tmp_path / "plan.json"
    plan.save(str(p))
    again = BudgetPlan.load(str(p))
    assert again == plan and json.loads(p.read_text())["params"] == plan.params
    apply_plan(model, again)
    realised = 0
    for m in plan.modules:
        mod = model.get_submodule(m.name)
        if m.method == "dense":
            assert isinstance(mod, torch.nn.Linear)
            assert torch.equal(mod.weight, ref.get_submodule(m.name).weight)
            realised += mod.weight.numel()
        else:
            assert isinstance(mod, LowRankLinear) and mod.rank == m.rank
            assert mod.num_weight_params == m.params
            realised += mod.num_weight_params
            # the planned score is the realised SVD truncation error of this module
            err = (mod.dense_weight().detach().double() - ref.get_submodule(m.name).weight.double()).pow(2).sum()
            assert math.isclose(float(err), m.score, rel_tol=1e-4)
    assert realised == plan.params <= plan.budget


def test_planned_beats_or_ties_uniform_on_score():
    model = tiny_model("bert", seed=2)
    cands = sensitivity(model, ratios=(0.5,))
    plan = solve(cands, 0.5)
    uniform = sum(c.choices[1].score for c in cands)  # every module at the ratio-0.5 rank
    assert sum(c.choices[1].params for c in cands) <= plan.budget
    assert plan.score <= uniform + 1e-12


def test_whitened_plan_uses_activation_init():
    from fastfactor.compress.calibration import collect_activation_stats
    from fastfactor.compress.targets import select_targets

    model = tiny_model("bert", seed=3)
    names = [t.name for t in select_targets(model)]
    ids = torch.randint(3, 97, (4, 9))
    grams = collect_activation_stats(model, {n: model.get_submodule(n) for n in names}, [ids],
                                     lambda m, b: m(input_ids=b))
    plan = plan_model(model, 0.5, grams=grams)
    assert plan.scorer == "whitened" and plan.init == "activation"
    cfg = plan.to_config()
    assert cfg["init"] == "activation" and cfg["method"] == "lowrank"
    with pytest.raises(ValueError, match="plan"):
        BudgetPlan.from_dict({"modules": [dict(vars(plan.modules[0]), method="tucker")], "budget": 1,
                              "target_params_dense": 1, "exact": True})


def test_whitened_plan_applied_offline_with_data():
    from fastfactor.compress._tiny import tiny_data
    from fastfactor.compress.calibration import collect_activation_stats
    from fastfactor.compress.targets import select_targets
    from fastfactor.layers.lowrank import LowRankLinear

    model = tiny_model("bert", seed=4)
    data = tiny_data()
    names = [t.name for t in select_targets(model)]
    grams = collect_activation_stats(model, {n: model.get_submodule(n) for n in names},
                                     [data.train["input_ids"][:8]], lambda m, b: m(input_ids=b))
    plan = plan_model(model, 0.4, grams=grams)
    apply_plan(model, plan, data, config={"schedule": "offline", "calib_batches": 1})
    total = 0
    for m in plan.modules:
        mod = model.get_submodule(m.name)
        if m.method == "lowrank":
            assert isinstance(mod, LowRankLinear) and mod.rank == m.rank
            total += mod.num_weight_params
        else:
            total += mod.weight.numel()
    assert total == plan.params <= plan.budget


def test_cli_plan_prints_and_writes_json(tmp_path, capsys):
    from fastfactor.cli import main

    model = tiny_model("bert", seed=5)
    model.save_pretrained(str(tmp_path / "m"))
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tmp_path / "m"), "--target-params", "0.5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "encoder.layer.1.output.dense" in text and "kept" in text
    plan = BudgetPlan.load(str(out))
    assert plan.params <= plan.budget == math.floor(0.5 * plan.target_params_dense)
    assert plan == plan_model(tiny_model("bert", seed=5), 0.5)
    # a bad budget: one line on stderr, status 1, nothing written
    out2 = tmp_path / "bad.json"
    assert main(["plan", "--model", str(tmp_path / "m"), "--target-params", "1.5", "--out", str(out2)]) == 1
    assert "--target-params" in capsys.readouterr().err and not out2.exists()
