"""``fastfactor plan`` with calibration data (the same data options as ``compress``): the scores
are measured on the batches a ``compress`` run calibrates on, cached under keys that include the
data, and the plan records which data it was measured on; option errors come before anything is
read."""

import json

import pytest
import torch

from fastfactor.cli import main
from fastfactor.compress._tiny import tiny_data, tiny_model
from fastfactor.plan import (BudgetPlan, ScoreCache, calibration_batches, calibration_grams, candidate_grid,
                             output_cache_key, output_scores, plan_model, score_candidates, solve)


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFACTOR_PLAN_CACHE", str(tmp_path / "plan-cache"))


def _targets(model):
    from fastfactor.api import _chosen_targets, _config

    return _chosen_targets(model, _config(None), None)


def test_plan_model_with_data_scores_on_the_drivers_calibration_batches():
    """``plan_model(data=)`` == Grams measured by hand on the driver's batches, then solved."""
    model, data = tiny_model("bert", seed=3), tiny_data()
    cfg = {"calib_batches": 2, "batch_size": 8, "seed": 5}
    plan = plan_model(model, 0.4, cfg, data=data, cache=False)
    # by hand: the driver's first calibration batches (seed + 7), their Grams, the closed-form scores
    from fastfactor.compress.config import CompressionConfig
    from fastfactor.compress.driver import _Run

    run = _Run.__new__(_Run)
    run.data, run.cfg = data, CompressionConfig(**cfg)
    batches = run._calibration_batches()
    mine = calibration_batches(data, cfg)
    assert len(mine) == 2 and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(mine, batches))
    targets = _targets(model)
    grams = calibration_grams(model, [t.name for t in targets], batches)
    ref = solve(score_candidates(model, candidate_grid(model, targets), grams, cache=False), 0.4)
    assert [(m.name, m.rank) for m in plan.modules] == [(m.name, m.rank) for m in ref.modules]
    assert plan.scorer == "whitened" and plan.init == "activation"
    c = plan.calibration
    assert c["batches"] == 2 and c["batch_size"] == 8 and c["seed"] == 5 and c["scorer"] == "whitened"
    assert c["tokens"] == sum(int(b["attention_mask"].sum()) for b in batches)
    assert BudgetPlan.from_dict(json.loads(json.dumps(plan.to_dict()))).calibration == c
    # another seed draws other batches: another digest
    other = plan_model(model, 0.4, dict(cfg, seed=6), data=data, cache=False)
    assert other.calibration["digest"] != c["digest"]


def test_output_scores_cache_is_keyed_by_the_calibration_data(tmp_path):
    model, data = tiny_model("bert", seed=1), tiny_data()
    targets = _targets(model)[:3]
    b1 = calibration_batches(data, {"calib_batches": 1, "batch_size": 8, "seed": 0})
    b2 = calibration_batches(data, {"calib_batches": 1, "batch_size": 8, "seed": 1})
    assert output_cache_key(model, b1) != output_cache_key(model, b2)
    assert output_cache_key(model, b1) == output_cache_key(model, [dict(b) for b in b1])
    cache = ScoreCache(str(tmp_path / "c"))
    fresh = output_scores(model, candidate_grid(model, targets, ranks=[2, 5]), b1, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1)
    again = output_scores(model, candidate_grid(model, targets, ranks=[2, 5]), b1, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    assert [ch.score for c in fresh for ch in c.choices] == [ch.score for c in again for ch in c.choices]
    nocache = output_scores(model, candidate_grid(model, targets, ranks=[2, 5]), b1)
    assert [ch.score for c in fresh for ch in c.choices] == [ch.score for c in nocache for ch in c.choices]
    output_scores(model, candidate_grid(model, targets, ranks=[2, 5]), b2, cache=cache)
    assert (cache.hits, cache.misses) == (1, 2)  # other data: scored afresh
    # another model state (any layer, not only the targets): another key
    k0 = output_cache_key(model, b1)
    with torch.no_grad():
        model.get_submodule(targets[0].name).weight.mul_(1.5)
    assert output_cache_key(model, b1) != k0
    assert output_cache_key(model, b1, forward=lambda m, b: m(**b).last_hidden_state) != output_cache_key(model, b1)


def test_whitened_cache_is_keyed_by_the_calibration_data(tmp_path):
    model, data = tiny_model("bert", seed=1), tiny_data()
    cache = str(tmp_path / "c")
    cfg = {"calib_batches": 1, "batch_size": 8}
    plan_model(model, 0.5, dict(cfg, seed=0), data=data, cache=cache)
    n0 = len(list((tmp_path / "c" / "scores").iterdir()))
    plan_model(model, 0.5, dict(cfg, seed=0), data=data, cache=cache)
    assert len(list((tmp_path / "c" / "scores").iterdir())) == n0  # same data: reused
    plan_model(model, 0.5, dict(cfg, seed=3), data=data, cache=cache)
    assert len(list((tmp_path / "c" / "scores").iterdir())) == 2 * n0  # other batches: other keys


def test_plan_model_scorer_errors():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="scorer: expected one of"):
        plan_model(model, 0.5, scorer="fisher")
    with pytest.raises(ValueError, match="scorer: 'output' needs calibration data"):
        plan_model(model, 0.5, scorer="output")
    with pytest.raises(ValueError, match="scorer: 'whitened' needs"):
        plan_model(model, 0.5, scorer="whitened")
    with pytest.raises(TypeError, match="data: expected a fastfactor.train.TaskData"):
        plan_model(model, 0.5, data={"input_ids": torch.zeros(2, 3)})


@pytest.mark.parametrize("scores", ["whitened", "output"])
def test_cli_plan_with_train_file(saved_model, tmp_path, capsys, scores):
    out = tmp_path / "plan.json"
    args = ["plan", "--model", str(saved_model), "--target-params", "0.5", "--train-file",
            str(saved_model / "train.csv"), "--max-length", "12", "--calib-batches", "2", "--batch-size", "8",
            "--scores", scores, "--ranks", "2", "5", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"scores ({scores}) measured on" in text
    # the evidence's caveat on whitened scores at equal parameters, only where it applies
    assert ("lost to the uniform ratio" in text) == (scores == "whitened")
    plan = BudgetPlan.load(str(out))
    assert plan.scorer == scores and plan.init == "activation"
    assert plan.calibration["batches"] == 2 and plan.calibration["batch_size"] == 8
    assert plan.params <= plan.budget
    assert {m.init for m in plan.modules if m.method != "dense"} == {"activation"}
    # the scores are those of the API on the same data and calibration settings
    from fastfactor.compress.cli import load_hf_model
    from fastfactor.train.data import load_task_data

    model, tok = load_hf_model(str(saved_model), "auto", log=lambda s: None)
    data = load_task_data(tok, train_file=str(saved_model / "train.csv"), max_length=12, unlabelled=True)
    ref = plan_model(model.eval(), 0.5, {"calib_batches": 2, "batch_size": 8}, data=data, scorer=scores, cache=False,
                     ranks=[2, 5])
    assert [(m.name, m.rank) for m in plan.modules] == [(m.name, m.rank) for m in ref.modules]
    assert plan.calibration["digest"] == ref.calibration["digest"]


def test_cli_plan_calibration_option_errors(saved_model, tmp_path, capsys, monkeypatch):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("weights were read before the error")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    base = ["plan", "--model", str(saved_model), "--target-params", "0.5"]
    for extra, what in ((["--scores", "output"], "--scores"), (["--calib-batches", "2"], "--calib-batches"),
                        (["--train-file", str(tmp_path / "none.csv")], "--train-file"),
                        (["--train-file", str(saved_model / "train.csv"), "--calib-batches", "0"], "--calib-batches"),
                        (["--train-file", str(saved_model / "train.csv"), "--model-class", "Nope"], "--model-class"),
                        (["--target-params", "1.5", "--train-file", str(saved_model / "train.csv")],
                         "--target-params")):
        assert main(base + extra) == 1, extra
        assert what in capsys.readouterr().err, extra
