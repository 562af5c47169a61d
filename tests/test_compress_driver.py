"""The driver end to end on tiny HF models: every family, schedule, init and method."""

import copy

import pytest
import torch

import fastfactor.compress as C
from fastfactor.compress._tiny import tiny_data, tiny_model
from fastfactor.layers.base import FactorizedLinear

def _factorized(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


@pytest.mark.parametrize("family,labels", [("bert", 0), ("bert_cls", 3), ("gpt2", 0), ("llama", 0)])
@pytest.mark.parametrize("schedule", ["offline", "all_at_once", "staged"])
def test_lowrank_every_family_and_schedule(family, labels, schedule):
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    data = tiny_data(labels=labels)
    cfg = C.CompressionConfig(method="lowrank", ratio=0.5, schedule=schedule, stage_steps=1, final_steps=2,
                              batch_size=8, stage_unit="block")
    out, rep = C.compress(model, cfg, data)
    assert out is model
    fac = _factorized(model)
    assert set(fac) == {t["name"] for t in rep.targets} and len(fac) > 0
    assert all(m.method == "lowrank" for m in fac.values())
    # the report's counts are the real ones
    assert rep.params_after == sum(p.numel() for p in model.parameters()) < rep.params_before
    assert rep.target_weight_params_after == sum(m.num_weight_params for m in fac.values())
    assert 0.4 < rep.target_ratio <= 0.5
    expect_stages = {"offline": 1, "all_at_once": 2, "staged": 3}[schedule]
    assert len(rep.stages) == expect_stages
    pm = rep.primary_metric
    assert pm == ("f1" if labels == 2 else "accuracy" if labels else "cosine" if family == "bert" else "agreement")
    assert rep.metrics_before[pm] == (1.0 if not labels else rep.metrics_before[pm])
    assert all(torch.isfinite(torch.tensor(v)) for v in rep.metrics_after.values())
    # the uncompressed copy is untouched, the compressed model still runs
    assert not _factorized(ref)
    x = data.eval["input_ids"][:2]
    with torch.no_grad():
        y = model(input_ids=x)
    assert torch.isfinite(y[0]).all()
    if schedule == "staged":
        assert [s.name for s in rep.stages[:2]] == [t["block"] for t in rep.targets[:: len(rep.targets) // 2]]
        assert rep.stages[0].target_ratio > rep.stages[1].target_ratio
        assert rep.stages[0].train["steps"] == 1


def test_offline_svd_equals_truncated_svd_of_each_layer():
    from fastfactor.factorize.svd import rank_for_ratio, svd_factors

    model = tiny_model("gpt2")
    dense = {n: m.weight.detach().t().clone() for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    C.compress(model, dict(method="lowrank", ratio=0.3, schedule="offline"))
    for n, m in _factorized(model).items():
        w = dense[n]
        u, v = svd_factors(w, rank_for_ratio(w.shape[1], w.shape[0], 0.3))
        torch.testing.assert_close(m.dense_weight(), u @ v)


@pytest.mark.parametrize("init", ["fisher", "activation"])
@pytest.mark.parametrize("labels", [0, 2, -1], ids=["distill", "classification", "regression"])
def test_data_aware_inits_reduce_their_objective(init, labels):
    family = "bert" if labels == 0 else "bert_cls"
    model = tiny_model(family, num_labels=2 if labels >= 0 else 1)
    data = tiny_data(labels=labels)
    base = copy.deepcopy(model)
    C.compress(base, dict(method="lowrank", ratio=0.3, schedule="offline"))
    C.compress(model, dict(method="lowrank", ratio=0.3, init=init, schedule="offline", calib_batches=3,
                           batch_size=8), data)
    # different factors from plain SVD, same shapes and parameter counts
    f0, f1 = _factorized(base), _factorized(model)
    assert f0.keys() == f1.keys()
    assert any(not torch.allclose(f0[k].dense_weight(), f1[k].dense_weight()) for k in f0)
    assert sum(m.num_weight_params for m in f0.values()) == sum(m.num_weight_params for m in f1.values())


@pytest.mark.parametrize("method", [m for m in C.METHODS if m != "lowrank"])
def test_other_methods(method):
    model = tiny_model("llama", intermediate=36)  # 2:4 needs in_features % 4 == 0
    init = C.INITS[method][-1]
    _, rep = C.compress(model, dict(method=method, ratio=0.5, init=init, schedule="staged", stage_unit="block",
                                    stage_steps=1, final_steps=1, batch_size=8), tiny_data())
    fac = _factorized(model)
    # the autoencoder's default (linear) form is a LowRankLinear (method "lowrank")
    assert len(fac) == 14 and {m.method for m in fac.values()} == {{"autoencoder": "lowrank"}.get(method, method)}
    assert len(rep.stages) == 3
    assert rep.target_ratio < 0.6 and torch.isfinite(torch.tensor(rep.metrics_after["agreement"]))


def test_errors_are_clear():
    m = tiny_model("bert")
    with pytest.raises(ValueError, match="data: expected a TaskData .*schedule 'staged' fine-tunes"):
        C.compress(m, dict(schedule="staged"))
    with pytest.raises(ValueError, match="data: expected a TaskData .*init 'fisher' needs calibration"):
        C.compress(m, dict(init="fisher", schedule="offline"))
    with pytest.raises(TypeError, match="data: expected a fastfactor.train.TaskData"):
        C.compress(m, dict(schedule="offline"), data=[1, 2])
    with pytest.raises(ValueError, match="objective: 'task' needs labelled data"):
        C.compress(m, dict(schedule="all_at_once", objective="task"), tiny_data())
    with pytest.raises(TypeError, match="config: expected a CompressionConfig"):
        C.compress(m, 3)
    m2 = tiny_model("llama")  # intermediate 37: not a multiple of 4
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.mlp\.down_proj'"):
        C.compress(m2, dict(method="sparse24", schedule="offline"))
    C.register_method(C.MethodSpec("ghost", "fastfactor.layers.ghost", "GhostLinear", None, {}))
    with pytest.raises(NotImplementedError, match=r"method: 'ghost' needs fastfactor\.layers\.ghost\.GhostLinear"):
        C.get_method("ghost").layer_class()


def test_config_validation_and_files(tmp_path):
    cfg = C.CompressionConfig(method="lowrank", ratio=0.3, module_ratios={"*fc*": 0.2}, targets="*.mlp.*")
    assert cfg.targets == ["*.mlp.*"] and cfg.resolved_init == "svd"
    p = tmp_path / "c.json"
    cfg.save(p)
    assert C.CompressionConfig.load(p) == cfg
    y = tmp_path / "c.yaml"
    y.write_text("method: lowrank\nratio: 0.7\nschedule: offline\ninit: activation\n")
    assert C.CompressionConfig.load(y).ratio == 0.7
    for bad, exc, msg in [
        (dict(method="svd"), ValueError, "method: expected one of"),
        (dict(ratio=1.5), ValueError, r"ratio: expected a float in \(0, 1\]"),
        (dict(ratio="half"), TypeError, "ratio: expected a float"),
        (dict(init="projection"), ValueError, "init: expected one of"),
        (dict(schedule="sometimes"), ValueError, "schedule: expected one of"),
        (dict(stage_steps=-1), ValueError, "stage_steps"),
        (dict(module_ratios={"a": 0}), ValueError, r"module_ratios\['a'\]"),
        (dict(targets=[]), ValueError, "targets: expected at least one pattern"),
        (dict(bogus=1), ValueError, r"config: unknown field\(s\) \['bogus'\]"),
    ]:
        with pytest.raises(exc, match=msg):
            C.CompressionConfig.from_dict(bad)
    with pytest.raises(ValueError, match="path: expected a .json"):
        (tmp_path / "c.txt").write_text("{}")
        C.CompressionConfig.load(tmp_path / "c.txt")


def test_callable_package():
    import fastfactor

    model = tiny_model("bert")
    out, rep = fastfactor.compress(model, dict(schedule="offline", ratio=0.4))
    assert out is model and rep.target_ratio <= 0.4
    C.revert(model)
    assert not _factorized(model)


def test_nvtx_ranges_cover_stages_factorization_and_steps(monkeypatch):
    from fastfactor import profiling

    seen = []
    monkeypatch.setattr(profiling, "push", lambda name, color=None: seen.append(name))
    monkeypatch.setattr(profiling, "pop", lambda: None)
    C.compress(tiny_model("llama"), dict(method="lowrank", schedule="staged", stage_steps=1, final_steps=1,
                                         init="activation", batch_size=8), tiny_data())
    for name in ("stage 0", "stage 1", "calibrate", "factorize model.layers.0.self_attn.q_proj", "forward",
                 "backward", "optimizer step", "final fine-tune", "evaluate"):
        assert name in seen, name
