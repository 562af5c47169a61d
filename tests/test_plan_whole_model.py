"""The whole model's predicted time around a plan: every linear (targets, other linears kept
dense), the attention core and the rest under a stated model; ``latency_scope="model"`` budgets are
a fraction of the whole model's time and the realised model never exceeds them; the whole-model
fraction is reported next to a targets budget; bad scopes and unreachable budgets fail before any
weight is read."""

import json
import math

import pytest
import torch
from torch import nn

from fastfactor.cli import main
from fastfactor.compress._tiny import tiny_model
from fastfactor.plan import BudgetPlan, apply_plan, plan_model
from fastfactor.plan_latency import (REST_MODEL, LatencyModel, SolLatency, default_seq_len, linear_specs,
                                     model_seconds, rest_seconds)
from fastfactor.sol.device import get_device

from plan_stubs import affine_costs  # tests/plan_stubs.py


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFACTOR_PLAN_CACHE", str(tmp_path / "plan-cache"))


class DeviceAffine(LatencyModel):
    """A fast latency model in seconds with the sol device figures (so the rest of the model is
    priced): dense ``floor + in·out/rate``, factorized ``2·floor + params/rate``."""

    status = "test model"

    def __init__(self, tokens=4096, direction="fwd", dtype="bf16", floor=2e-7, rate=1e8):
        self.device, self.tokens, self.direction, self.dtype = get_device("h200"), tokens, direction, dtype
        self.floor, self.rate = floor, rate

    def costs(self, specs):
        return affine_costs(specs, self.floor, self.rate)

    def describe(self):
        return {"source": "affine (test)", "status": "test model", "device": "H200", "tokens": self.tokens,
                "direction": self.direction, "dtype": self.dtype}


def _big_tiny(seed=0):
    """Two BERT blocks wide enough for factorized layers to pay under the affine model."""
    return tiny_model("bert", seed=seed, intermediate=301)


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_rest_of_model_is_the_stated_formula(direction):
    model = tiny_model("bert")
    lat = DeviceAffine(tokens=1000, direction=direction)
    dev = lat.device
    r = rest_seconds(model, lat)
    M, d, ff, L, e, blocks = 1000, 24, 37, 64, 2, 2  # seq_len: min(512, 64 positions, tokens)
    assert (r["seq_len"], r["hidden"], r["intermediate"], r["blocks"]) == (L, d, ff, blocks)
    bwd = direction != "fwd"
    fl = 4.0 * M * L * d * (3.5 if bwd else 1)
    by = 4.0 * M * d * e * (3 if bwd else 1)
    rate = dev.bf16_rate
    att = max(by / dev.hbm_bw, fl / rate) + dev.launch_s * (2 if bwd else 1)
    ew = M * e * (10 * d + 2 * ff) * (3 if bwd else 1) / dev.hbm_bw + 5 * (2 if bwd else 1) * dev.launch_s
    emb = 6.0 * M * d * e * (3 if bwd else 1) / dev.hbm_bw + 3 * (2 if bwd else 1) * dev.launch_s
    assert r["attention_s"] == pytest.approx(blocks * att, rel=1e-12)
    assert r["elementwise_s"] == pytest.approx(blocks * ew, rel=1e-12)
    assert r["embeddings_s"] == pytest.approx(emb, rel=1e-12)
    assert r["rest_s"] == pytest.approx(r["attention_s"] + r["elementwise_s"] + r["embeddings_s"], rel=1e-12)
    assert r["model"] == REST_MODEL
    # attention grows with the sequence length, linearly in its FLOPs once compute-bound
    assert rest_seconds(model, lat, seq_len=32)["attention_s"] <= r["attention_s"]
    assert default_seq_len(model, 10) == 10


def test_rest_of_model_errors():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="seq_len: expected at most 64"):
        rest_seconds(model, DeviceAffine(), seq_len=65)
    with pytest.raises(ValueError, match="seq_len: expected an int >= 1"):
        rest_seconds(model, DeviceAffine(), seq_len=0)

    class NoDevice:
        tokens, direction, dtype = 8, "fwd", "bf16"
    with pytest.raises(ValueError, match="latency_scope: the whole-model time needs the sol model"):
        rest_seconds(model, NoDevice())
    with pytest.raises(ValueError, match="model: the whole-model latency needs a transformer"):
        rest_seconds(nn.Sequential(nn.Linear(4, 4)), DeviceAffine())


def test_linear_specs_cover_every_linear_dense_or_factorized():
    model = tiny_model("bert_cls", seed=1)
    specs = linear_specs(model)
    lin = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(specs) == sorted(lin)  # 12 block linears + pooler + classifier
    plan = plan_model(model, 0.5, cache=False)
    apply_plan(model, plan)
    after = linear_specs(model)
    assert sorted(after) == sorted(lin)
    for m in plan.modules:
        assert after[m.name]["method"] == m.method and after[m.name]["rank"] == m.rank
    lat = DeviceAffine()
    t = model_seconds(model, lat)
    assert t["total_s"] == pytest.approx(t["linears_s"] + t["rest_s"], rel=1e-12)
    assert t["linears_s"] == pytest.approx(sum(lat.costs(list(after.values()))), rel=1e-12)


@pytest.mark.parametrize("fm", [0.97, 0.93])
def test_model_scope_budget_met_by_the_realised_model(fm, tmp_path):
    lat = DeviceAffine()
    dense = _big_tiny(seed=3)
    T0 = model_seconds(dense, lat)["total_s"]
    plan = plan_model(_big_tiny(seed=3), None, target_latency=fm, latency=lat, latency_scope="model", cache=False)
    L = plan.latency
    assert L["scope"] == "model" and L["fraction_model"] == fm
    assert L["whole_model"]["model_dense_s"] == pytest.approx(T0, rel=1e-12)
    p = tmp_path / "plan.json"
    plan.save(str(p))
    again = BudgetPlan.load(str(p))
    assert again.latency == plan.latency
    assert json.loads(p.read_text())["model_latency_fraction"] == pytest.approx(plan.model_latency_fraction)
    model = apply_plan(_big_tiny(seed=3), again)
    T = model_seconds(model, lat)["total_s"]
    assert T <= fm * T0 * (1 + 1e-12)  # never exceeded by the realised model
    assert T / T0 == pytest.approx(plan.model_latency_fraction, rel=1e-9)
    assert any(m.method == "lowrank" for m in plan.modules)
    text = plan.table()
    assert "whole model:" in text and f"budget {fm:g} of the whole model" in text


def test_targets_scope_reports_the_whole_model_fraction():
    lat = DeviceAffine()
    plan = plan_model(_big_tiny(seed=4), None, target_latency=0.8, latency=lat, cache=False)
    assert plan.latency["scope"] == "targets"
    model = apply_plan(_big_tiny(seed=4), plan)
    ratio = model_seconds(model, lat)["total_s"] / model_seconds(_big_tiny(seed=4), lat)["total_s"]
    assert ratio == pytest.approx(plan.model_latency_fraction, rel=1e-9)
    assert plan.model_latency_fraction > plan.seconds / plan.latency["dense_s"]  # the rest does not shrink
    assert "(the budget is over the targets)" in plan.table()
    # a parameter budget with a latency model: the times are still reported
    p2 = plan_model(_big_tiny(seed=4), 0.5, latency=lat, cache=False)
    assert p2.latency["budget_s"] is None and p2.model_latency_fraction is not None


def test_model_scope_errors_before_any_weight(monkeypatch):
    import fastfactor.plan as P

    def refuse(*a, **k):
        raise AssertionError("weights were read before the error")

    monkeypatch.setattr(P, "score_candidates", refuse)
    monkeypatch.setattr(P, "output_scores", refuse)
    lat = DeviceAffine()
    with pytest.raises(ValueError, match=r"unreachable: the rest of the model takes .*attention .* at least"):
        plan_model(_big_tiny(), None, target_latency=0.05, latency=lat, latency_scope="model")
    with pytest.raises(ValueError, match="latency_scope: expected one of"):
        plan_model(_big_tiny(), None, target_latency=0.9, latency=lat, latency_scope="all")
    with pytest.raises(ValueError, match="target_latency: expected a fraction"):
        plan_model(_big_tiny(), None, target_latency=1.5, latency=lat, latency_scope="model")
    with pytest.raises(ValueError, match="latency_scope: 'model' needs a latency model"):
        plan_model(_big_tiny(), 0.5, latency_scope="model")


def test_sol_model_scope_realised(tmp_path):
    """The sol model (predicted) on a one-block MiniLM-shaped BERT (384 / 1536) at 16384 tokens: a
    whole-model budget between the targets-only plan's whole-model fraction and 1 is met by the
    realised model, its time recomputed from the modules it holds."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=50, hidden_size=384, num_hidden_layers=1, num_attention_heads=6,
                       intermediate_size=1536, max_position_embeddings=128)
    lat = SolLatency("h200", tokens=16384)
    tp = plan_model(T.BertModel(cfg).eval(), None, target_latency=0.8, latency=lat, ranks=[46], cache=False)
    fm = tp.model_latency_fraction
    assert tp.latency["whole_model"]["seq_len"] == 128 and 0 < fm < 1
    plan = plan_model(T.BertModel(cfg).eval(), None, target_latency=fm, latency=lat, latency_scope="model",
                      ranks=[46], cache=False)
    model = apply_plan(T.BertModel(cfg).eval(), plan)
    T1 = model_seconds(model, SolLatency("h200", tokens=16384, use_disk=False))["total_s"]
    T0 = plan.latency["whole_model"]["model_dense_s"]
    assert T1 <= fm * T0 * (1 + 1e-9)
    assert T1 / T0 == pytest.approx(plan.model_latency_fraction, rel=1e-9)


def test_cli_latency_scope(saved_model, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["plan", "--model", str(saved_model), "--target-latency", "1.0", "--latency-scope", "model",
                 "--tokens", "2048", "--seq-len", "32", "--ranks", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "whole model:" in text and "seq_len 32" in text
    d = json.loads(out.read_text())
    assert d["latency"]["scope"] == "model" and d["model_latency_fraction"] <= 1 + 1e-12
    assert main(["plan", "--model", str(saved_model), "--target-params", "0.5", "--latency-scope", "model"]) == 1
    assert "--latency-scope" in capsys.readouterr().err
    assert main(["plan", "--model", str(saved_model), "--target-latency", "0.9", "--latency-scope", "model",
                 "--tokens", "2048", "--seq-len", "999", "--ranks", "2"]) == 1
    assert "--seq-len" in capsys.readouterr().err
    assert math.isfinite(d["latency"]["whole_model"]["rest_s"])
