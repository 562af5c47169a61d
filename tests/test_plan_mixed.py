"""A budget plan mixing methods across modules executes in ONE ``compress`` run (offline and
staged, data-free and data-aware inits): each module gets its planned method, setting and init;
the report, the manifest and ``quantization_config`` record each module's method and rank;
save/reload and resume (with a kill) keep it; another plan is refused on resume."""

import json

import pytest
import torch

from fastfactor.cli import main
from fastfactor.compress._tiny import tiny_data, tiny_model
from fastfactor.plan import BudgetPlan, PlanEntry, candidate_grid, score_init

ORDER = ("lowrank", "monarch", "sparse24", "dense", "block_lowrank", "dense_sparse")


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFACTOR_PLAN_CACHE", str(tmp_path / "plan-cache"))


def mixed_plan(model, whitened=False, prefix=""):
    """Every module a method of ``ORDER`` in turn (the first candidate of that method; dense when
    the family does not take the shape): a plan of 4+ methods over the tiny model's 12 targets."""
    from fastfactor.api import _chosen_targets, _config

    targets = _chosen_targets(model, _config(None), None)
    cands = candidate_grid(model, targets, methods=("lowrank", "monarch", "sparse24", "block_lowrank",
                                                    "dense_sparse"), ranks=[3], other_ratios=(0.25,), nblocks=(2,))
    rows = []
    for i, c in enumerate(cands):
        want = ORDER[i % len(ORDER)]
        ch = next((ch for ch in c.choices if ch.method == want), c.choices[0])
        rows.append(PlanEntry(c.name, ch.method, ch.rank, ch.params, 0.0, c.in_features, c.out_features,
                              nblocks=ch.nblocks, init=None if ch.method == "dense" else score_init(ch.method, whitened)))
    plan = BudgetPlan(budget=sum(r.params for r in rows), target_params_dense=sum(c.dense_params for c in cands),
                      exact=True, modules=rows, scorer="whitened" if whitened else "svd",
                      init="activation" if whitened else "svd")
    assert len({r.method for r in rows}) >= 4, [r.method for r in rows]
    return plan


def realised(model, plan):
    """``{name: (method, rank or None, nblocks or None)}`` of the modules the model holds."""
    out = {}
    for m in plan.modules:
        mod = model.get_submodule(m.name)
        meth = getattr(mod, "method", "dense")
        rank = getattr(mod, "rank", None) if meth != "sparse24" else None
        out[m.name] = (meth, rank, getattr(mod, "nblocks", None))
    return out


def expected(plan):
    return {m.name: (m.method, m.rank if m.method != "sparse24" else None, m.nblocks) for m in plan.modules}


def test_mixed_offline_data_free_equals_one_factorize_per_method():
    """One offline run == applying each method's modules separately (``factorize_``), bitwise."""
    from fastfactor import compress
    from fastfactor.plan import apply_plan

    plan = mixed_plan(tiny_model("bert", seed=4))
    a, rep = compress(tiny_model("bert", seed=4), {"schedule": "offline"}, None, plan=plan)
    b = apply_plan(tiny_model("bert", seed=4), plan)
    assert realised(a, plan) == expected(plan) == realised(b, plan)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert rep.target_weight_params_after == plan.params <= plan.budget
    assert rep.target_weight_params_before == plan.target_params_dense
    methods = {t["name"]: t["method"] for t in rep.targets}
    assert methods == {m.name: m.method for m in plan.modules if m.method != "dense"}
    assert {t["name"]: t["init"] for t in rep.targets} == {m.name: m.init for m in plan.modules if m.method != "dense"}


@pytest.mark.parametrize("schedule", ["offline", "staged"])
def test_mixed_data_aware_one_run(schedule):
    """Activation-aware low rank and 2:4 next to Monarch projection: one calibration per stage
    gives each module the statistics its own init needs; staged fine-tunes in between."""
    from fastfactor import compress
    from fastfactor.compress.calibration import collect_activation_stats
    from fastfactor.compress.targets import dense_view
    from fastfactor.factorize.data_aware import whitening_factor  # noqa: F401 - the init's path

    model = tiny_model("bert", seed=5)
    plan = mixed_plan(model, whitened=True)
    data = tiny_data()
    cfg = {"schedule": schedule, "stage_steps": 1, "final_steps": 1, "batch_size": 8, "calib_batches": 1,
           "stage_unit": "block"}
    m2, rep = compress(tiny_model("bert", seed=5), cfg, data, plan=plan)
    assert realised(m2, plan) == expected(plan)
    infos = {k: v for s in rep.stages for k, v in s.init_info.items()}
    assert infos == {m.name: f"{m.method} {m.init}" for m in plan.modules if m.method != "dense"}
    assert rep.target_weight_params_after == plan.params
    if schedule == "offline":  # the activation-aware modules were fitted on the run's own Gram
        lr = next(m for m in plan.modules if m.method == "lowrank")
        from fastfactor.compress.config import CompressionConfig
        from fastfactor.compress.driver import _Run, _inputs
        from fastfactor.compress.methods import build_layer

        run = _Run.__new__(_Run)
        run.data, run.cfg = data, CompressionConfig(**{k: v for k, v in cfg.items()})
        ref_model = tiny_model("bert", seed=5)
        mod = ref_model.get_submodule(lr.name)
        g = collect_activation_stats(ref_model, {lr.name: mod}, run._calibration_batches(),
                                     lambda m, b: m(**_inputs(m, b, "cpu")))[lr.name][0]
        from fastfactor.plan_data import _ratio_for
        from fastfactor.families import get_family

        want = build_layer("lowrank", dense_view(mod, lr.name), _ratio_for(lr, get_family("lowrank")), "activation",
                           CompressionConfig(init="activation"), {"gram": g})
        got = m2.get_submodule(lr.name)
        torch.testing.assert_close(got.dense_weight(), want.dense_weight(), rtol=0, atol=0)


def test_mixed_plan_save_reload_and_manifest(tmp_path):
    from fastfactor import compress
    from fastfactor.compress.driver import compression_record
    from fastfactor.compress.io import load_compressed, save_compressed

    plan = mixed_plan(tiny_model("bert", seed=6))
    model, rep = compress(tiny_model("bert", seed=6), {"schedule": "offline"}, None, plan=plan)
    from fastfactor.compress.config import CompressionConfig

    run_cfg = CompressionConfig.from_dict(plan.run_config()[0])
    save_compressed(model, str(tmp_path / "o"), compression=compression_record(run_cfg, rep))
    man = json.loads((tmp_path / "o" / "fastfactor.json").read_text())
    rec = {e["name"]: (e["method"], e["factor_config"]) for e in man["modules"]}
    for m in plan.modules:
        if m.method == "dense":
            assert m.name not in rec
            continue
        meth, fc = rec[m.name]
        assert meth == m.method
        if m.method in ("lowrank", "dense_sparse"):
            assert fc["rank"] == m.rank
        if m.method in ("monarch", "block_lowrank"):
            assert fc["nblocks"] == m.nblocks and fc["rank"] == m.rank
    assert man["compression"]["plan"] == plan.to_dict()
    assert man["compression"]["methods"] == sorted({m.method for m in plan.modules} - {"dense"})
    again = load_compressed(str(tmp_path / "o"))
    assert realised(again, plan) == expected(plan)
    x = torch.randint(3, 90, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(x).last_hidden_state, model(x).last_hidden_state, rtol=0, atol=0)


def test_mixed_plan_errors_before_any_weight_is_touched():
    from fastfactor import compress

    model = tiny_model("bert", seed=7)
    plan = mixed_plan(model, whitened=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="data: expected a TaskData"):  # activation inits need data
        compress(model, {"schedule": "offline"}, None, plan=plan)
    with pytest.raises(ValueError, match="joint: a plan mixing methods"):
        compress(model, {"schedule": "offline", "joint": ["qkv"]}, tiny_data(), plan=plan)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="mixes methods"):
        plan.to_config()


def _cli(saved_model, out, plan, *extra):
    return main(["compress", "--model", str(saved_model), "--out", str(out), "--plan", str(plan),
                 "--schedule", "staged", "--stage-steps", "1", "--steps", "1", "--batch-size", "8",
                 "--calib-batches", "1", "--max-length", "12", "--train-file", str(saved_model / "train.csv"),
                 "--no-progress", "--keep-checkpoints", *extra])


def test_cli_mixed_plan_kill_resume_and_refuse_another(saved_model, tmp_path, monkeypatch, capsys):
    """``fastfactor compress --plan`` with a mixed plan: staged end to end; killed after stage 1
    and resumed, bitwise the uninterrupted run; a plan differing in one module's method refused."""
    from fastfactor.compress.cli import load_hf_model
    from fastfactor.compress.faults import TEST_FAULT_ENV
    from fastfactor.compress.io import load_compressed

    model, _ = load_hf_model(str(saved_model), "auto", log=lambda s: None, tokenizer=False)
    plan = mixed_plan(model, whitened=True)
    p = tmp_path / "plan.json"
    plan.save(str(p))
    # dry run: one table per method, nothing read
    assert main(["compress", "--model", str(saved_model), "--plan", str(p), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "method monarch" in text and "method lowrank" in text and "dry run" in text
    ref = tmp_path / "ref"
    assert _cli(saved_model, ref, p) == 0
    rep = json.loads((ref / "report.json").read_text())
    assert rep["plan"] == plan.to_dict() and rep["target_weight_params_after"] == plan.params
    assert {t["name"]: t["method"] for t in rep["targets"]} == {
        m.name: m.method for m in plan.modules if m.method != "dense"}
    a = load_compressed(str(ref))
    assert realised(a, plan) == expected(plan)
    out = tmp_path / "out"
    monkeypatch.setenv(TEST_FAULT_ENV, "1:raise")
    with pytest.raises(Exception, match="injected fault"):
        _cli(saved_model, out, p, "--debug")
    monkeypatch.delenv(TEST_FAULT_ENV)
    # the same modules and ranks, one module's method changed: refused
    other = BudgetPlan.from_dict(plan.to_dict())
    lr = next(m for m in other.modules if m.method == "lowrank")
    lr.init = "svd"
    po = tmp_path / "other.json"
    other.save(str(po))
    capsys.readouterr()
    assert _cli(saved_model, out, po, "--resume") != 0
    assert "another compression config" in capsys.readouterr().err
    assert _cli(saved_model, out, p, "--resume") == 0
    b = load_compressed(str(out))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_a_base_models_plan_runs_on_the_model_with_a_task_head():
    """A plan made on ``BertModel`` (``encoder.layer...``) executes on the same weights inside
    ``BertForSequenceClassification`` (``bert.encoder.layer...``), and the reverse."""
    from fastfactor import compress

    base = tiny_model("bert", seed=8)
    plan = mixed_plan(base)
    cls = tiny_model("bert_cls", seed=8)
    m2, rep = compress(cls, {"schedule": "offline"}, None, plan=plan)
    for m in plan.modules:
        mod = m2.get_submodule("bert." + m.name)
        assert getattr(mod, "method", "dense") == m.method
        if m.method in ("lowrank", "monarch", "block_lowrank", "dense_sparse"):
            assert mod.rank == m.rank
    assert rep.plan["modules"][0]["name"].startswith("bert.")
    back = mixed_plan(tiny_model("bert_cls", seed=8))
    m3, _ = compress(tiny_model("bert", seed=8), {"schedule": "offline"}, None, plan=back)
    assert all(getattr(m3.get_submodule(m.name[len("bert."):]), "method", "dense") == m.method for m in back.modules)
    bad = mixed_plan(base)
    bad.modules[0].name = "nope.layer"
    with pytest.raises(ValueError, match="plan: module 'nope.layer' not found"):
        compress(tiny_model("bert_cls", seed=8), {"schedule": "offline"}, None, plan=bad)
