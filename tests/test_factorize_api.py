"""fastfactor.factorize_ (torchao-style one call, filter_fn(module, fqn)), factorize_plan and the
CLI's --dry-run / --module-ratio."""

import copy
import json

import pytest
import torch
from torch import nn

import fastfactor
from fastfactor.compress._tiny import VOCAB, tiny_model
from fastfactor.layers.base import FactorizedLinear

pytest.importorskip("transformers")


def _factorized(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def _ids(seed=0):
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def test_factorize_in_place_equals_offline_compress():
    dense = tiny_model("bert")
    model = copy.deepcopy(dense)
    out = fastfactor.factorize_(model, {"method": "lowrank", "ratio": 0.4})
    assert out is model
    ref, _ = fastfactor.compress(copy.deepcopy(dense), {"method": "lowrank", "ratio": 0.4, "schedule": "offline"})
    got, want = _factorized(model), _factorized(ref)
    assert sorted(got) == sorted(want) and len(got) == 12
    for n in got:
        for (k, a), (_, b) in zip(got[n].state_dict().items(), want[n].state_dict().items()):
            assert torch.equal(a, b), (n, k)


def test_filter_fn_gets_module_and_fqn_and_reaches_heads():
    model = tiny_model("bert_cls")
    seen = []

    def only_queries_and_head(mod, fqn):
        seen.append((type(mod).__name__, fqn))
        return fqn.endswith("attention.self.query") or fqn == "classifier"

    fastfactor.factorize_(model, {"method": "monarch", "ratio": 0.5, "nblocks": 2}, filter_fn=only_queries_and_head)
    assert sorted(_factorized(model)) == ["bert.encoder.layer.0.attention.self.query",
                                          "bert.encoder.layer.1.attention.self.query", "classifier"]
    assert ("Linear", "bert.pooler.dense") in seen  # every linear layer is offered, outside the blocks too
    assert all(cls == "Linear" for cls, _ in seen)


def test_filter_fn_with_targets_and_exclude():
    model = tiny_model("llama")
    fastfactor.factorize_(model, {"targets": ["*.mlp.*"], "exclude": ["*.down_proj"]},
                          filter_fn=lambda m, fqn: fqn.startswith("model.layers.1."))
    assert sorted(_factorized(model)) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]


def test_factorize_keeps_rng_and_mode_and_module_ratios():
    model = tiny_model("gpt2").train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    fastfactor.factorize_(model, {"ratio": 0.5, "module_ratios": {"*.attn.c_attn": 0.25}})
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training
    f = _factorized(model)
    assert f["transformer.h.0.attn.c_attn"].rank == int(0.25 * 24 * 72 / (24 + 72))
    assert f["transformer.h.0.mlp.c_fc"].rank == int(0.5 * 24 * 96 / (24 + 96))


def test_factorize_errors():
    model = tiny_model("bert")
    with pytest.raises(TypeError, match="model"):
        fastfactor.factorize_("bert", {})
    with pytest.raises(TypeError, match="filter_fn"):
        fastfactor.factorize_(model, {}, filter_fn="query")
    with pytest.raises(ValueError, match="filter_fn"):
        fastfactor.factorize_(model, {}, filter_fn=lambda m, n: False)
    with pytest.raises(ValueError, match="calibration data"):
        fastfactor.factorize_(model, {"init": "fisher"})
    with pytest.raises(ValueError, match="ratio"):
        fastfactor.factorize_(model, {"ratio": 1.5})
    assert not _factorized(model)


def test_factorize_plain_module():
    mlp = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12))
    x = torch.randn(5, 12)
    y = mlp(x)
    fastfactor.factorize_(mlp, {"ratio": 1.0}, filter_fn=lambda m, n: True)
    assert len(_factorized(mlp)) == 2
    # ratio 1 keeps rank floor(12·20/32) = 7 < 12: not exact, but close to the dense map
    assert mlp[0].rank == 7


@pytest.mark.parametrize("method,family", [
    ("lowrank", "bert"), ("monarch", "gpt2"), ("block_lowrank", "llama"), ("sparse24", "llama"),
    ("dense_sparse", "bert"),
])
def test_plan_matches_what_factorize_builds(method, family):
    model = tiny_model(family, intermediate=36)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    cfg = {"method": method, "ratio": 0.3, "nblocks": 3, "module_ratios": {"*.0.*": 0.6}}
    plan = fastfactor.factorize_plan(model, cfg)
    assert not _factorized(model)  # untouched
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    fastfactor.factorize_(model, cfg)
    built = _factorized(model)
    assert [r.name for r in plan.rows] == list(built)
    for r in plan.rows:
        m = built[r.name]
        assert r.layer_class == type(m).__name__
        assert r.factor_config == m.factor_config(), r.name
        assert r.params_after == m.num_weight_params, r.name
        assert r.params_before == m.in_features * m.out_features
    assert {r.ratio for r in plan.rows} == {0.3, 0.6}
    assert plan.model_params == n_params
    assert plan.model_params_after == plan.model_params - plan.params_before + plan.params_after
    d = plan.to_dict()
    json.dumps(d)
    assert d["target_params_after"] == sum(m.num_weight_params for m in built.values())
    assert "params after" in plan.table()


def test_plan_on_meta_model_reads_no_weight():
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=1000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                        num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg)
    plan = fastfactor.factorize_plan(model, {"ratio": 0.25})
    assert len(plan.rows) == 14
    q = next(r for r in plan.rows if r.name.endswith("0.self_attn.q_proj"))
    assert q.factor_config["rank"] == 4096 * 4096 // (4 * 8192) == 512
    assert q.params_after == 512 * 8192


def _cli(argv):
    from fastfactor.cli import main

    return main(argv)


def test_cli_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    model = tiny_model("bert")
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    rc = _cli(["compress", "--model", str(tmp_path / "m"), "--out", str(out), "--dry-run", "--ratio", "0.4",
               "--module-ratio", "*.attention.self.*=0.2", "--module-ratio", "*.intermediate.dense=0.6"])
    assert rc == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "encoder.layer.1.output.dense" in text and "rank=" in text and "dry run" in text
    plan = fastfactor.factorize_plan(model, {"ratio": 0.4, "module_ratios": {"*.attention.self.*": 0.2,
                                                                                "*.intermediate.dense": 0.6}})
    for r in plan.rows:
        assert f"rank={r.factor_config['rank']}" in text
    assert f"{plan.params_after:,}" in text
    # --out is not needed for a dry run
    assert _cli(["compress", "--model", str(tmp_path / "m"), "--show-plan", "--method", "monarch"]) == 0


def test_cli_module_ratio_reaches_the_config():
    from fastfactor.cli import build_parser
    from fastfactor.compress.cli import build_config

    args = build_parser().parse_args(["compress", "--model", "m", "--out", "o", "--module-ratio", "a.*=0.25",
                                      "--module-ratio", "re:b\\.[0-9]=0.75"])
    assert build_config(args).module_ratios == {"a.*": 0.25, "re:b\\.[0-9]": 0.75}
    for bad in ("a.*", "=0.3", "a.*=x", "a.*=1.5"):
        args = build_parser().parse_args(["compress", "--model", "m", "--out", "o", "--module-ratio", bad])
        with pytest.raises(ValueError, match="^--module-ratio"):
            build_config(args)
