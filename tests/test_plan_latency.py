"""fastfactor.plan with a latency budget: the 2-D solver against brute force, budgets met by the
realised model (its time recomputed from the modules it holds), the sol and bench sources, errors
before any weight is read, mixed methods."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fastfactor.compress._tiny import tiny_model
from fastfactor.plan import (BudgetPlan, Choice, ModuleCandidates, apply_plan, check_budgets, plan_model,
                             score_candidates, solve)
from fastfactor.plan_latency import (BenchLatency, LatencyModel, SolLatency, make_spec, module_spec,
                                     predicted_seconds)

from plan_stubs import affine_costs  # tests/plan_stubs.py


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path, monkeypatch):
    """Scores and latency costs cached in a fresh folder per test (never the user's cache)."""
    monkeypatch.setenv("FASTFACTOR_PLAN_CACHE", str(tmp_path / "plan-cache"))


class AffineLatency(LatencyModel):
    """A stand-in latency source: ``floor·launches + stored weights / rate`` (launches: 1 dense,
    2 factorized), so small ranks are faster than dense and large ones slower."""

    def __init__(self, floor=3.0, rate=50.0):
        self.floor, self.rate, self.calls = floor, rate, 0

    def costs(self, specs):
        self.calls += 1
        return affine_costs(specs, self.floor, self.rate)

    def describe(self):
        return {"source": "affine (test)", "status": "test model", "device": "none", "tokens": 1,
                "direction": "fwd", "dtype": "fp32"}


def _cands(g, n, int_times=True):
    cands = []
    for m in range(n):
        i, o = int(g.integers(5, 17)), int(g.integers(5, 17))
        ranks = sorted(set(int(r) for r in g.integers(1, min(i, o) + 1, size=3)))
        dense_t = float(g.integers(8, 20)) if int_times else float(g.random() * 10 + 8)
        ch = [Choice("dense", None, i * o, 0.0, dense_t)]
        sc = sorted(g.random(len(ranks)) * 10, reverse=True)
        for r, s in zip(ranks, sc):
            t = float(g.integers(1, dense_t + 6)) if int_times else float(g.random() * (dense_t + 5) + 1)
            ch.append(Choice("lowrank", r, r * (i + o), float(s), t))
        cands.append(ModuleCandidates(f"m{m}", i, o, ch))
    return cands


def _brute(cands, bp, bt):
    best = math.inf
    for combo in itertools.product(*[c.choices for c in cands]):
        if (bp is None or sum(ch.params for ch in combo) <= bp) and \
                (bt is None or sum(ch.seconds for ch in combo) <= bt * (1 + 1e-12)):
            best = min(best, sum(ch.score for ch in combo))
    return best


@pytest.mark.parametrize("seed", range(10))
def test_two_budget_solver_exact_against_brute_force(seed):
    g = np.random.default_rng(seed)
    cands = _cands(g, int(g.integers(2, 5)))
    total = sum(c.dense_params for c in cands)
    dense_t = sum(c.choices[0].seconds for c in cands)
    solved = 0
    for fp, ft in itertools.product((None, 0.3, 0.5, 0.8), (None, 0.5, 0.75, 1.0)):
        if fp is None and ft is None:
            continue
        bp = None if fp is None else math.floor(fp * total)
        bt = None if ft is None else ft * dense_t
        best = _brute(cands, bp, bt)
        try:
            plan = solve(cands, fp, ft)
        except ValueError as e:
            assert "unreachable" in str(e) or "too tight" in str(e)
            assert best == math.inf or "too tight" in str(e)
            continue
        solved += 1
        assert plan.exact, (fp, ft)
        assert math.isclose(plan.score, best, rel_tol=1e-12, abs_tol=1e-12), (fp, ft, plan.score, best)
        if bp is not None:
            assert plan.params <= bp == plan.budget
        if bt is not None:
            assert plan.seconds <= bt * (1 + 1e-12)
            assert plan.latency["budget_s"] == pytest.approx(bt) and plan.latency["dense_s"] == pytest.approx(dense_t)
    assert solved >= 4


@pytest.mark.parametrize("seed", range(6))
def test_float_times_feasible_and_bounded(seed):
    """Times that share no integer grid: the answer is within both budgets, never better than the
    optimum, the lower bound never above it, and "exact" only when it is the optimum."""
    g = np.random.default_rng(50 + seed)
    cands = _cands(g, 4, int_times=False)
    total = sum(c.dense_params for c in cands)
    dense_t = sum(c.choices[0].seconds for c in cands)
    for fp, ft in ((None, 0.8), (0.5, 0.9), (0.6, 1.0), (0.4, None)):
        bp = None if fp is None else math.floor(fp * total)
        bt = None if ft is None else ft * dense_t
        best = _brute(cands, bp, bt)
        for cells in (40, 200_000):
            try:
                plan = solve(cands, fp, ft, max_cells=cells, max_cells_2d=cells * 10)
            except ValueError:
                continue
            assert bp is None or plan.params <= bp
            assert bt is None or plan.seconds <= bt * (1 + 1e-12)
            assert plan.score >= best - 1e-9
            assert plan.score_lower_bound <= best + 1e-9
            if plan.exact:
                assert math.isclose(plan.score, best, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (0.0, ValueError), (-0.2, ValueError), (1.5, ValueError),
                                     (float("nan"), ValueError), (True, TypeError), ("0.5", TypeError)])
def test_bad_latency_budgets_raise_before_any_time_or_weight(bad, exc, monkeypatch):
    import fastfactor.plan as P

    lat = AffineLatency()
    scored = []
    monkeypatch.setattr(P, "score_candidates", lambda *a, **k: scored.append(1))
    with pytest.raises(exc, match="target_latency"):
        plan_model(tiny_model("bert"), target_latency=bad, latency=lat)
    assert lat.calls == 0 and not scored


def test_unreachable_latency_and_pair_raise_before_any_weight(monkeypatch):
    import fastfactor.plan as P

    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scored = []
    monkeypatch.setattr(P, "score_candidates", lambda *a, **k: scored.append(1))
    with pytest.raises(ValueError, match="target_latency.*unreachable.*fastest candidate plan"):
        plan_model(model, target_latency=0.05, latency=AffineLatency())
    # each budget alone reachable, the pair not: here small ranks are *slow* and large ranks fast
    class Inverse(AffineLatency):
        def costs(self, specs):
            return [10.0 if s["method"] == "dense" else 4.0 + 40.0 / s["rank"] for s in specs]

    from fastfactor.compress.targets import select_targets

    cands = P.candidate_grid(model, select_targets(model), latency=Inverse())
    check_budgets(cands, 0.15, None)
    check_budgets(cands, None, 0.8)
    with pytest.raises(ValueError, match="unreachable together"):
        check_budgets(cands, 0.15, 0.8)
    with pytest.raises(ValueError, match="unreachable together"):
        plan_model(model, 0.15, target_latency=0.8, latency=Inverse())
    assert not scored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("fp,ft", [(None, 0.8), (0.5, 0.9), (0.4, 0.75)])
def test_realised_model_meets_both_budgets(fp, ft, tmp_path):
    from fastfactor.layers.lowrank import LowRankLinear

    lat = AffineLatency(floor=2.0, rate=10.0)
    model = tiny_model("bert", seed=7)
    plan = plan_model(model, fp, target_latency=ft, latency=lat)
    p = tmp_path / "plan.json"
    plan.save(str(p))
    again = BudgetPlan.load(str(p))
    assert again == plan and again.latency == plan.latency
    d = json.loads(p.read_text())
    assert d["version"] == 2 and d["latency"]["fraction"] == ft and d["seconds"] == pytest.approx(plan.seconds)
    apply_plan(model, again)
    names = [m.name for m in plan.modules]
    realised = predicted_seconds(model, names, lat)  # from the modules the model now holds
    for m in plan.modules:
        mod = model.get_submodule(m.name)
        assert isinstance(mod, LowRankLinear if m.method == "lowrank" else nn.Linear)
        assert realised[m.name] == pytest.approx(m.seconds)
    dense_s = plan.latency["dense_s"]
    assert sum(realised.values()) <= ft * dense_s * (1 + 1e-12)
    if fp is not None:
        kept = sum(getattr(model.get_submodule(n), "num_weight_params", None) or model.get_submodule(n).weight.numel()
                   for n in names)
        assert kept == plan.params <= math.floor(fp * plan.target_params_dense)
    assert "time of the targets" in plan.table()


def test_sol_latency_realised_model(monkeypatch, tmp_path):
    """The sol model (predicted): two 384 -> 1536 layers where low rank is predicted faster than
    dense at 16384 tokens; the realised model's predicted time, recomputed from its modules, is the
    plan's and within the budget."""
    monkeypatch.setenv("FASTFACTOR_PLAN_CACHE", str(tmp_path))
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(384, 1536), nn.Linear(384, 1536)

    model = Two()
    lat = SolLatency("h200", tokens=16384)
    plan = plan_model(model, None, {"targets": ["a", "b"]}, target_latency=0.8, latency=lat, ranks=[46])
    assert plan.latency["status"] == "predicted, not measured" and plan.latency["device"] == "H200"
    assert all(m.method == "lowrank" for m in plan.modules)
    apply_plan(model, plan)
    realised = predicted_seconds(model, ["a", "b"], SolLatency("h200", tokens=16384, use_disk=False))
    assert sum(realised.values()) == pytest.approx(plan.seconds, rel=1e-9)
    assert sum(realised.values()) <= 0.8 * plan.latency["dense_s"]
    assert json.loads((tmp_path / "sol-costs.json").read_text())  # cached on disk


def _bench_file(path, shapes, tokens=64, cpu=False, ranks=(0.25,)):
    rows = []
    for i, o in shapes:
        for q in ranks:
            rows.append(dict(method="lowrank", param=f"ratio={q:g}", ratio=q, in_features=i, out_features=o,
                             tokens=tokens, dtype="bf16", direction="fwd", median_ms=0.004 + 1e-6 * (i + o),
                             dense_ms=0.005 + 1e-6 * i * o / 100))
    doc = {"schema": "fastfactor-bench/1", "meta": {"device": "NVIDIA H200", "cpu_figures": cpu}, "rows": rows}
    path.write_text(json.dumps(doc))
    return str(path)


def test_bench_latency_measured_rows(tmp_path):
    from fastfactor.factorize.svd import rank_for_ratio

    model = tiny_model("bert", seed=3)
    shapes = {(24, 24), (24, 37), (37, 24)}
    f = _bench_file(tmp_path / "b.json", shapes)
    lat = BenchLatency(f, tokens=64)
    plan = plan_model(model, None, target_latency=0.9, latency=lat)
    assert plan.latency["status"] == "measured" and plan.latency["file"] == "b.json"
    for m in plan.modules:  # only the measured rank (and dense) can be chosen
        assert m.method == "dense" or m.rank == rank_for_ratio(m.in_features, m.out_features, 0.25)
    assert plan.seconds <= 0.9 * plan.latency["dense_s"] * (1 + 1e-12)
    with pytest.raises(ValueError, match="no dense time"):
        plan_model(model, None, target_latency=0.9, latency=BenchLatency(_bench_file(tmp_path / "c.json", {(24, 24)}), 64))
    with pytest.raises(ValueError, match="CPU figures"):
        BenchLatency(_bench_file(tmp_path / "d.json", shapes, cpu=True), 64)
    with pytest.raises(ValueError, match="no measured rows"):
        BenchLatency(f, tokens=128)


def test_module_spec_of_every_family():
    from fastfactor.layers.lowrank import LowRankLinear
    from fastfactor.layers.monarch import MonarchLinear
    from fastfactor.layers.sparse24 import Sparse24Linear

    assert module_spec(nn.Linear(8, 12)) == make_spec("dense", 8, 12)
    assert module_spec(nn.Linear(8, 12, bias=False))["bias"] is False
    assert module_spec(LowRankLinear(8, 12, 3)) == make_spec("lowrank", 8, 12, rank=3)
    assert module_spec(MonarchLinear(8, 12, 2, rank=2)) == make_spec("monarch", 8, 12, nblocks=2, block_rank=2)
    assert module_spec(Sparse24Linear(8, 12)) == make_spec("sparse24", 8, 12)
    with pytest.raises(TypeError, match="module"):
        module_spec(nn.GELU())
    with pytest.raises(ValueError, match="method"):
        make_spec("tucker", 2, 2)


def test_version1_plan_still_loads():
    d = {"version": 1, "budget": 10, "target_params_dense": 20, "exact": True, "scorer": "svd", "init": "svd",
         "modules": [dict(name="a", method="lowrank", rank=1, params=10, score=1.5, in_features=4, out_features=5)]}
    p = BudgetPlan.from_dict(d)
    assert p.latency is None and p.seconds is None and p.modules[0].init is None


def test_mixed_methods_scored_by_factorizing_and_applied(tmp_path):
    """Monarch, 2:4 and dense-sparse candidates next to low rank: each score is the realised
    reconstruction error of the module it builds (data-free: plain Frobenius)."""
    model = tiny_model("bert", seed=11)
    ref = tiny_model("bert", seed=11)
    methods = ("lowrank", "monarch", "sparse24", "dense_sparse")
    plan = plan_model(model, 0.6, methods=methods, other_ratios=(0.25, 0.5), nblocks=(2,))
    assert plan.params <= plan.budget
    p = tmp_path / "mixed.json"
    plan.save(str(p))
    plan = BudgetPlan.load(str(p))
    apply_plan(model, plan)
    for m in plan.modules:
        mod = model.get_submodule(m.name)
        if m.method == "dense":
            assert isinstance(mod, nn.Linear)
            continue
        assert mod.method == m.method and mod.num_weight_params == m.params
        e = mod.dense_weight().detach().double() - ref.get_submodule(m.name).weight.detach().double()
        assert math.isclose(float(e.pow(2).sum()), m.score, rel_tol=1e-4, abs_tol=1e-9), m


def test_mixed_whitened_plan_offline_with_data():
    from fastfactor.compress._tiny import tiny_data
    from fastfactor.compress.calibration import collect_activation_stats
    from fastfactor.compress.targets import select_targets

    model = tiny_model("bert", seed=12)
    data = tiny_data()
    names = [t.name for t in select_targets(model)]
    grams = collect_activation_stats(model, {n: model.get_submodule(n) for n in names},
                                     [data.train["input_ids"][:8]], lambda m, b: m(input_ids=b))
    cands = score_candidates(model, __import__("fastfactor.plan", fromlist=["x"]).candidate_grid(
        model, select_targets(model), methods=("lowrank", "monarch"), other_ratios=(0.5,), nblocks=(2,)), grams)
    # the whitened score of a monarch choice is its realised ‖(W − Ŵ)·S‖²
    from fastfactor.layers.monarch import MonarchLinear

    c = cands[0]
    ch = next(ch for ch in c.choices if ch.method == "monarch")
    w = model.get_submodule(c.name).weight
    mon = MonarchLinear.from_linear(model.get_submodule(c.name), nblocks=2, rank=ch.rank)
    e = mon.dense_weight().detach().double() - w.double()
    g = grams[c.name][0].double()
    assert math.isclose(float(((e @ g) * e).sum()), ch.score, rel_tol=1e-6)
    plan = solve(cands, 0.5)
    for m in plan.modules:
        m.init = None if m.method == "dense" else ("activation" if m.method == "lowrank" else "projection")
    plan.init = "activation"
    if len(plan.methods) > 2:
        with pytest.raises(ValueError, match="offline"):
            apply_plan(model, plan, data, config={"schedule": "staged"})
    apply_plan(model, plan, data, config={"schedule": "offline", "calib_batches": 1})
    for m in plan.modules:
        mod = model.get_submodule(m.name)
        assert getattr(mod, "method", "dense") == m.method or (m.method == "dense" and isinstance(mod, nn.Linear))
        if m.method != "dense":
            assert mod.num_weight_params == m.params


def test_score_cache_per_model_and_calibration_set(tmp_path, monkeypatch):
    """Scores are cached on disk per (module weight, Gram) fingerprint: a second planning of the same
    model and calibration set reads them (no SVD, no factorization); another calibration set or
    changed weights are scored afresh."""
    import fastfactor.plan as P
    from fastfactor.compress.calibration import collect_activation_stats
    from fastfactor.compress.targets import select_targets
    from fastfactor.plan import ScoreCache, candidate_grid, score_candidates

    model = tiny_model("bert", seed=21)
    targets = select_targets(model)
    names = [t.name for t in targets]
    fwd = lambda m, b: m(input_ids=b)  # noqa: E731
    g1 = collect_activation_stats(model, {n: model.get_submodule(n) for n in names}, [torch.randint(3, 97, (4, 9))], fwd)
    g2 = collect_activation_stats(model, {n: model.get_submodule(n) for n in names}, [torch.randint(3, 97, (4, 9))], fwd)
    grid = lambda: candidate_grid(model, targets, methods=("lowrank", "monarch"), other_ratios=(0.5,), nblocks=(2,))  # noqa: E731
    cache = ScoreCache(str(tmp_path / "c"))
    first = score_candidates(model, grid(), g1, cache=cache)
    assert cache.misses > 0 and cache.hits == 0
    monkeypatch.setattr(P, "tail_energies", lambda *a, **k: pytest.fail("SVD recomputed"))
    monkeypatch.setattr(P, "_whitened_error", lambda *a, **k: pytest.fail("factorized again"))
    cache2 = ScoreCache(str(tmp_path / "c"))
    again = score_candidates(model, grid(), g1, cache=cache2)
    assert cache2.misses == 0 and cache2.hits > 0
    assert [[ch.score for ch in c.choices] for c in again] == [[ch.score for ch in c.choices] for c in first]
    monkeypatch.undo()
    monkeypatch.setenv("FASTFACTOR_PLAN_CACHE", str(tmp_path / "plan-cache"))
    cache3 = ScoreCache(str(tmp_path / "c"))
    other = score_candidates(model, grid(), g2, cache=cache3)  # another calibration set
    assert cache3.hits == 0 and other[0].choices[1].score != first[0].choices[1].score
    with torch.no_grad():
        model.get_submodule(names[0]).weight.mul_(2)
    cache4 = ScoreCache(str(tmp_path / "c"))
    score_candidates(model, grid(), g1, cache=cache4)
    assert cache4.misses > 0 and cache4.hits > 0  # module 0 afresh, the others from the cache


def test_output_sensitivity_is_the_model_output_change():
    """``output_scores``: a choice's score is the change of the model's output when only that module
    is compressed that way; the model is left unchanged; plans can be solved on these scores."""
    from fastfactor.compress.calibration import collect_activation_stats
    from fastfactor.compress.targets import select_targets
    from fastfactor.layers.lowrank import LowRankLinear
    from fastfactor.plan import candidate_grid, output_scores
    from fastfactor.factorize.data_aware import whitened_svd_factors

    model = tiny_model("bert", seed=31)
    block0 = {"targets": [r"re:encoder\.layer\.0\..*(query|value|dense)$"]}
    targets = select_targets(model, block0["targets"])
    names = [t.name for t in targets]
    batches = [{"input_ids": torch.randint(3, 97, (3, 7))}, {"input_ids": torch.randint(3, 97, (2, 9))}]
    grams = collect_activation_stats(model, {n: model.get_submodule(n) for n in names}, batches,
                                     lambda m, b: m(**b))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cands = output_scores(model, candidate_grid(model, targets, methods=("lowrank", "sparse24"), ranks=[2, 5]),
                          batches, grams=grams)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    ref = [model(**b).last_hidden_state.double() for b in batches]
    c = cands[2]
    ch = c.choices[2]  # the second low rank
    assert ch.method == "lowrank" and ch.rank == 5
    u, v, _ = whitened_svd_factors(model.get_submodule(c.name).weight.detach().double(), ch.rank, grams[c.name][0])
    swapped = tiny_model("bert", seed=31)
    swapped.get_submodule(c.name.rsplit(".", 1)[0]).__setattr__(
        c.name.rsplit(".", 1)[1], LowRankLinear.from_factors(u.float(), v.float(), model.get_submodule(c.name).bias))
    with torch.no_grad():
        direct = sum((swapped(**b).last_hidden_state.double() - r).pow(2).sum() for b, r in zip(batches, ref))
    assert math.isclose(float(direct), ch.score, rel_tol=1e-3)
    for c in cands:
        assert c.choices[0].score == 0 and all(ch.score > 0 for ch in c.choices[1:])
    plan = solve(cands, 0.5)
    assert plan.params <= plan.budget
    again = plan_model(tiny_model("bert", seed=31), 0.5, block0, methods=("lowrank", "sparse24"), ranks=[2, 5],
                       grams=grams, batches=batches)
    assert again.scorer == "output" and again.init == "activation"
    assert [(m.method, m.rank) for m in again.modules] == [(m.method, m.rank) for m in plan.modules]
