"""Resume after a kill in the middle of an autoencoder calibration: the fits finished before the kill
are cached one by one (fastfactor.compress.fitcache) and not refitted; the resumed result is bitwise
that of an uninterrupted run.

* module scope, offline (one stage, no stage checkpoint exists yet): interrupted after 5 of 12 fits;
  the resume fits exactly the 7 others;
* block scope: interrupted after every module and the first block are fitted; the resume fits no
  module and only the second block;
* a real ``SIGKILL`` of a separate process sleeping after its 4th fit;
* refusals: a cache of another config, a corrupt cached file, a checkpoint directory holding another
  run's cache; the fault hook's ``K#N`` form.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import fastfactor.compress as C
from fastfactor.compress import autoencoder as AE
from fastfactor.compress import checkpoint as CK
from fastfactor.compress import driver as DRV
from fastfactor.compress import fitcache as FC
from fastfactor.compress._tiny import tiny_data, tiny_model

BASE = dict(method="autoencoder", ratio=0.5, schedule="offline", batch_size=8, calib_batches=3, ae_steps=4,
            ae_lr=1e-2, seed=3)


def _cfg(**kw):
    return {**BASE, **kw}


def _strip(rep):
    d = rep.to_dict()
    d.pop("seconds", None)
    d["stages"] = [{k: v for k, v in s.items() if k != "seconds"} for s in d["stages"]]
    return d


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture
def counts(monkeypatch):
    """How many modules and blocks are fitted (not loaded) in this test, by name."""
    seen = {"module": [], "block": []}
    factorize, fit_block = DRV._Run._factorize, AE.fit_block

    def counting_factorize(self, t, stats):
        seen["module"].append(t.name)
        return factorize(self, t, stats)

    def counting_fit_block(block, *a, **kw):
        seen["block"].append(type(block).__name__)
        return fit_block(block, *a, **kw)

    monkeypatch.setattr(DRV._Run, "_factorize", counting_factorize)
    monkeypatch.setattr(AE, "fit_block", counting_fit_block)
    return seen


NONLINEAR = dict(ae_form="nonlinear", ae_activation="gelu")


@pytest.fixture(scope="module")
def bert_ref():
    """The uninterrupted module-scope run (nonlinear bottlenecks) every resumed bert run reproduces,
    and the order its 12 modules are fitted in."""
    order = []
    factorize = DRV._Run._factorize

    def counting(self, t, stats):
        order.append(t.name)
        return factorize(self, t, stats)

    DRV._Run._factorize = counting
    try:
        model, rep = C.compress(tiny_model("bert", intermediate=36), _cfg(**NONLINEAR), tiny_data())
    finally:
        DRV._Run._factorize = factorize
    return model, rep, order


def _interrupt(monkeypatch, family, cfg, ck, at_fit):
    monkeypatch.setenv(CK.TEST_FAULT_ENV, f"0#{at_fit}:raise")
    with pytest.raises(CK.InjectedFault):
        C.compress(tiny_model(family, intermediate=36), cfg, tiny_data(), checkpoint_dir=ck)
    monkeypatch.delenv(CK.TEST_FAULT_ENV)


def test_module_scope_killed_mid_calibration_keeps_finished_fits(tmp_path, monkeypatch, counts, bert_ref):
    cfg = _cfg(**NONLINEAR)
    m_ref, r_ref, order = bert_ref
    assert len(order) == 12
    ck = tmp_path / "ck"
    _interrupt(monkeypatch, "bert", cfg, ck, 5)
    assert CK.list_checkpoints(ck) == []  # one offline stage: no stage checkpoint yet
    cached = sorted(os.listdir(ck / FC.fits_dirname(0)))
    assert len(cached) == 6 and FC.FITS_INDEX in cached  # the index + 5 modules
    counts["module"].clear()
    m_res, r_res = C.compress(tiny_model("bert", intermediate=36), cfg, tiny_data(), checkpoint_dir=ck, resume=ck)
    assert counts["module"] == order[5:]  # the 5 finished fits are loaded, not refitted
    _same_state(m_ref, m_res)
    assert _strip(r_ref) == _strip(r_res)
    assert FC.list_fits(ck) == [] and CK.list_checkpoints(ck) == [str(ck / CK.stage_dirname(0))]
    x = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        assert torch.equal(m_ref(input_ids=x).last_hidden_state, m_res(input_ids=x).last_hidden_state)


def test_block_scope_resume_refits_only_the_unfinished_block(tmp_path, monkeypatch, counts):
    cfg = _cfg(scope="block", calib_batches=2)
    m_ref, r_ref = C.compress(tiny_model("gpt2", intermediate=36), cfg, tiny_data())
    assert len(counts["module"]) == 8 and len(counts["block"]) == 2
    ck = tmp_path / "ck"
    _interrupt(monkeypatch, "gpt2", cfg, ck, 9)  # 8 modules + block transformer.h.0
    names = os.listdir(ck / FC.fits_dirname(0))
    assert "block-transformer.h.0.safetensors" in names and "block-transformer.h.1.safetensors" not in names
    counts["module"].clear(), counts["block"].clear()
    m_res, r_res = C.compress(tiny_model("gpt2", intermediate=36), cfg, tiny_data(), checkpoint_dir=ck, resume=ck)
    assert counts["module"] == [] and len(counts["block"]) == 1
    _same_state(m_ref, m_res)
    assert _strip(r_ref) == _strip(r_res)


def test_staged_resume_uses_the_fits_of_the_unfinished_stage(tmp_path, monkeypatch, counts):
    """Staged by block: stage 0 finished (its checkpoint removed its fits), stage 1 interrupted after
    2 fits; the resume loads stage 0 from its checkpoint and stage 1's 2 fits from the cache."""
    cfg = _cfg(schedule="staged", stage_unit="block", stage_steps=0, final_steps=0)
    m_ref, r_ref = C.compress(tiny_model("llama", intermediate=36), cfg, tiny_data())
    per_stage = len(counts["module"]) // 2
    ck = tmp_path / "ck"
    monkeypatch.setenv(CK.TEST_FAULT_ENV, "1#2:raise")
    with pytest.raises(CK.InjectedFault):
        C.compress(tiny_model("llama", intermediate=36), cfg, tiny_data(), checkpoint_dir=ck)
    monkeypatch.delenv(CK.TEST_FAULT_ENV)
    assert [os.path.basename(p) for p in FC.list_fits(ck)] == [FC.fits_dirname(1)]
    counts["module"].clear()
    m_res, r_res = C.compress(tiny_model("llama", intermediate=36), cfg, tiny_data(), checkpoint_dir=ck, resume=ck)
    assert len(counts["module"]) == per_stage - 2
    _same_state(m_ref, m_res)
    assert _strip(r_ref) == _strip(r_res)


_VICTIM = textwrap.dedent("""
    import sys
    import fastfactor.compress as C
    from fastfactor.compress._tiny import tiny_data, tiny_model
    cfg = dict(method="autoencoder", ratio=0.5, schedule="offline", batch_size=8, calib_batches=3, ae_steps=4,
               ae_lr=1e-2, seed=3, ae_form="nonlinear", ae_activation="gelu")
    C.compress(tiny_model("bert", intermediate=36), cfg, tiny_data(), checkpoint_dir=sys.argv[1])
""")


@pytest.mark.slow  # a second process: its start-up (imports, first compress) dominates
def test_sigkill_after_four_fits_then_resume(tmp_path, counts, bert_ref):
    m_ref, r_ref, order = bert_ref
    ck = tmp_path / "ck"
    env = dict(os.environ, OMP_NUM_THREADS="1", **{CK.TEST_FAULT_ENV: "0#4:sleep:120"})
    victim = subprocess.Popen([sys.executable, "-c", _VICTIM, str(ck)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "after fit 4" not in line:
            line = victim.stdout.readline()
            assert line or victim.poll() is None, "the run ended before the fault hook"
            assert time.monotonic() < deadline, "the fault hook was never reached"
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(30) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.stdout.close()
    assert len([n for n in os.listdir(ck / FC.fits_dirname(0)) if n.startswith("module-")]) == 4
    counts["module"].clear()
    m_res, r_res = C.compress(tiny_model("bert", intermediate=36), _cfg(**NONLINEAR), tiny_data(), checkpoint_dir=ck,
                              resume=ck)
    assert counts["module"] == order[4:]
    _same_state(m_ref, m_res)
    assert _strip(r_ref) == _strip(r_res)


def test_refusals(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    _interrupt(monkeypatch, "bert", _cfg(), ck, 3)
    # a checkpoint directory holding another run's fits, without resume
    with pytest.raises(ValueError, match="already holds checkpoints"):
        C.compress(tiny_model("bert", intermediate=36), _cfg(), tiny_data(), checkpoint_dir=ck)
    # another config
    with pytest.raises(ValueError, match=r"fits\.json: written with another compression config \(ae_steps"):
        C.compress(tiny_model("bert", intermediate=36), _cfg(ae_steps=5), tiny_data(), checkpoint_dir=ck, resume=ck)
    # another model
    with pytest.raises(ValueError, match=r"fits\.json: written for another model"):
        C.compress(tiny_model("bert", intermediate=36, seed=1), _cfg(), tiny_data(), checkpoint_dir=ck, resume=ck)
    # a cached file changed on disk
    f = sorted((ck / FC.fits_dirname(0)).glob("module-*.safetensors"))[0]
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x55
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f.name + ": sha256 of the tensors does not match"):
        C.compress(tiny_model("bert", intermediate=36), _cfg(), tiny_data(), checkpoint_dir=ck, resume=ck)
    # no checkpoint and no fits: resume still refused as before
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no finished stage checkpoint"):
        C.compress(tiny_model("bert", intermediate=36), _cfg(), tiny_data(), resume=tmp_path / "empty")


def test_fault_hook_fit_form(monkeypatch):
    monkeypatch.setenv(CK.TEST_FAULT_ENV, "2#3:raise")
    CK.test_fault_hook(2)
    CK.test_fault_hook(2, fit=2)
    CK.test_fault_hook(1, fit=3)
    with pytest.raises(CK.InjectedFault, match="stage 2 after fit 3"):
        CK.test_fault_hook(2, fit=3)
    monkeypatch.setenv(CK.TEST_FAULT_ENV, "2#x:raise")
    with pytest.raises(ValueError, match="STAGE\\[@STEP\\|#FIT\\]"):
        CK.test_fault_hook(2, fit=3)


def test_without_checkpoint_dir_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    C.compress(tiny_model("gpt2", intermediate=36), _cfg(), tiny_data())
    assert os.listdir(tmp_path) == []


def test_joint_groups_are_cached_and_relinked(tmp_path, monkeypatch, counts):
    """LLaMA with q/k/v and gate/up compressed together: interrupted after the first group; the
    resume loads that group (leader and linked members), fits the rest, and matches bitwise."""
    from fastfactor.compress import joint as J
    from fastfactor.layers.joint import JointMemberLinear

    built = []
    build_group = J.build_group

    def counting(model, group, *a, **kw):
        built.append(group.names[0])
        return build_group(model, group, *a, **kw)

    monkeypatch.setattr(J, "build_group", counting)
    cfg = _cfg(joint=["qkv", "mlp"])
    m_ref, r_ref = C.compress(tiny_model("llama", intermediate=36), cfg, tiny_data())
    n_groups, n_alone = len(built), len(counts["module"])
    assert n_groups == 4 and n_alone == 4  # 2 layers x (qkv, gate/up); o_proj and down_proj alone
    ck = tmp_path / "ck"
    _interrupt(monkeypatch, "llama", cfg, ck, 1)
    assert [n for n in os.listdir(ck / FC.fits_dirname(0)) if n.startswith("group-")] == [
        f"group-{built[0]}.safetensors"]
    built.clear(), counts["module"].clear()
    m_res, r_res = C.compress(tiny_model("llama", intermediate=36), cfg, tiny_data(), checkpoint_dir=ck, resume=ck)
    assert len(built) == n_groups - 1 and len(counts["module"]) == n_alone
    members = [m for m in m_res.modules() if isinstance(m, JointMemberLinear)]
    assert members and all(m._joint for m in members)
    _same_state(m_ref, m_res)
    assert _strip(r_ref) == _strip(r_res)
    x = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        assert torch.equal(m_ref(input_ids=x).logits, m_res(input_ids=x).logits)
