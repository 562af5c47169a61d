"""method="autoencoder" through the driver, the config, the command line and save / load:
linear and nonlinear forms, module and block scope, on BERT, GPT-2 and LLaMA tiny models and the
bundled MiniLM; a run killed in a stage's calibration resumes bitwise."""

import json

import pytest
import torch

import fastfactor.compress as C
from fastfactor.compress import checkpoint as CK
from fastfactor.compress._tiny import tiny_data, tiny_model
from fastfactor.layers import BottleneckLinear, LowRankLinear
from fastfactor.layers.base import FactorizedLinear


def _fac(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def _run(family, **cfg):
    model = tiny_model(family, intermediate=36)
    kw = dict(method="autoencoder", ratio=0.5, schedule="offline", batch_size=8, calib_batches=3, ae_steps=4,
              ae_lr=1e-2, seed=3)
    kw.update(cfg)
    return (model,) + C.compress(model, kw, tiny_data())[1:]


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("form", ["linear", "nonlinear"])
def test_module_scope_forms(family, form):
    model, rep = _run(family, ae_form=form, ae_activation="gelu")
    fac = _fac(model)
    assert len(fac) == {"bert": 12, "gpt2": 8, "llama": 14}[family]
    cls = LowRankLinear if form == "linear" else BottleneckLinear
    assert all(type(m) is cls for m in fac.values())
    if form == "nonlinear":
        assert {m.act for m in fac.values()} == {"gelu"}
    for n, m in fac.items():  # the rank of the low-rank formula: U, V counted, biases not
        assert m.rank == max(1, int(0.5 * m.in_features * m.out_features / (m.in_features + m.out_features)))
    assert rep.target_ratio <= 0.5
    want = "pca (linear, scope=module)" if form == "linear" else "pca (nonlinear gelu, scope=module)"
    assert set(rep.stages[0].init_info.values()) == {want}
    assert rep.config["ae_form"] == form and rep.config["scope"] == "module"
    x = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        out = model(input_ids=x)
    assert all(torch.isfinite(v).all() for v in out.values() if isinstance(v, torch.Tensor))


def test_block_scope_improves_the_block_fit_and_reports_it():
    """gpt2 with a linear form: the block fit lowers every block's held-out output MSE below the
    module-scope start, and the model's fidelity follows."""
    model_m, rep_m = _run("gpt2", ae_steps=10, ae_lr=3e-2)
    model_b, rep_b = _run("gpt2", ae_steps=10, ae_lr=3e-2, scope="block")
    info = rep_b.stages[0].init_info
    fits = {k: v for k, v in info.items() if k.endswith("(block fit)")}
    assert set(fits) == {"transformer.h.0 (block fit)", "transformer.h.1 (block fit)"}
    for v in fits.values():
        start, end = (float(t) for t in v.split(", ")[0].replace("held-out MSE ", "").split(" -> "))
        assert end < start
    assert rep_b.metrics_offline["kl"] < rep_m.metrics_offline["kl"]
    # block scope only changes the factorized modules' parameters
    sd_m, sd_b = model_m.state_dict(), model_b.state_dict()
    changed = [k for k in sd_m if not torch.equal(sd_m[k], sd_b[k])]
    assert changed and all(any(k.startswith(n + ".") for n in _fac(model_b)) for k in changed)


def test_block_scope_nonlinear_llama():
    for family in ("llama",):  # (BERT and GPT-2 blocks: test_cli.py, test_save_load_round_trip_bit_exact)
        model, rep = _run(family, ae_form="nonlinear", scope="block", ae_activation="silu", calib_batches=2,
                          ae_steps=2)
        assert all(type(m) is BottleneckLinear for m in _fac(model).values())
        assert sum(k.endswith("(block fit)") for k in rep.stages[0].init_info) == 2


def test_config_errors_are_named():
    for bad, exc, msg in [
        (dict(ae_form="deep"), ValueError, r"ae_form: expected one of \['linear', 'nonlinear'\], got 'deep'"),
        (dict(scope="model"), ValueError, r"scope: expected one of \['module', 'block'\], got 'model'"),
        (dict(ae_activation="swish"), ValueError, r"ae_activation: expected one of"),
        (dict(ae_steps=-1), ValueError, r"ae_steps: expected an int >= 0"),
        (dict(ae_lr=0), ValueError, r"ae_lr: expected a positive number"),
        (dict(ae_tokens=1), ValueError, r"ae_tokens: expected an int >= 2"),
        (dict(scope="block", calib_batches=1), ValueError, r"calib_batches: expected >= 2 with scope='block'"),
    ]:
        with pytest.raises(exc, match=msg):
            C.CompressionConfig(method="autoencoder", **bad)
    with pytest.raises(ValueError, match=r"scope: only method='autoencoder' has this option .*got 'block'"):
        C.CompressionConfig(method="lowrank", scope="block")
    with pytest.raises(ValueError, match=r"ae_form: only method='autoencoder'"):
        C.CompressionConfig(method="sparse24", ae_form="nonlinear")
    cfg = C.CompressionConfig(method="autoencoder", ae_form="nonlinear", scope="block")
    assert cfg.resolved_init == "pca" and C.CompressionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"data: expected a TaskData \(init 'pca' needs calibration data\)"):
        C.compress(tiny_model("bert"), dict(method="autoencoder", schedule="offline"))


@pytest.mark.parametrize("form", ["linear", "nonlinear"])
def test_save_load_round_trip_bit_exact(form, tmp_path):
    model, rep = _run("gpt2", ae_form=form, ae_activation="tanh", scope="block", calib_batches=2)
    path = C.save_compressed(model, tmp_path / "m", compression=rep.config)
    loaded = C.load_compressed(path)
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert sd0[k].dtype == sd1[k].dtype and torch.equal(sd0[k], sd1[k]), k
    x = torch.randint(3, 97, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    man = json.loads((tmp_path / "m" / "fastfactor.json").read_text())
    assert man["compression"]["method"] == "autoencoder" and man["compression"]["ae_form"] == form
    classes = {e["class"] for e in man["modules"]}
    assert classes == ({"LowRankLinear"} if form == "linear" else {"BottleneckLinear"})
    if form == "nonlinear":
        assert {e["factor_config"]["act"] for e in man["modules"]} == {"tanh"}


def test_resume_after_a_kill_in_a_stage_is_bitwise(tmp_path, monkeypatch):
    """Staged by block, block scope, nonlinear: a fault in stage 1 (after its calibration and
    swap) resumes from stage 0's checkpoint and recomputes stage 1's calibration and fits bit for bit."""
    cfg = dict(ae_form="nonlinear", scope="block", schedule="staged", stage_unit="block", stage_steps=0,
               final_steps=0, calib_batches=2)
    m_ref, r_ref = _run("bert", **cfg)
    ck = tmp_path / "ck"
    monkeypatch.setenv(CK.TEST_FAULT_ENV, "1:raise")
    with pytest.raises(CK.InjectedFault):
        C.compress(tiny_model("bert", intermediate=36), dict(method="autoencoder", ratio=0.5, batch_size=8,
                   ae_steps=4, ae_lr=1e-2, seed=3, **cfg), tiny_data(), checkpoint_dir=ck)
    monkeypatch.delenv(CK.TEST_FAULT_ENV)
    assert CK.list_checkpoints(ck) == [str(ck / CK.stage_dirname(0))]
    m_res, r_res = C.compress(tiny_model("bert", intermediate=36), dict(method="autoencoder", ratio=0.5, batch_size=8,
                              ae_steps=4, ae_lr=1e-2, seed=3, **cfg), tiny_data(), checkpoint_dir=ck, resume=ck)
    sd0, sd1 = m_ref.state_dict(), m_res.state_dict()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    strip = lambda r: {**r, "seconds": 0, "stages": [{**s, "seconds": 0} for s in r["stages"]]}
    assert strip(r_ref.to_dict()) == strip(r_res.to_dict())
