"""Resumable staged compression: kill a run in the middle of a stage, resume, get the same result.

* ``test_sigkill_mid_stage_then_resume_cli``: a real ``fastfactor compress`` process on a tiny saved
  BERT classifier with local csv/json data (12 stages, one linear layer each, Fisher init, so the
  calibration generator, the dropout RNG and the data streams all matter) is ``SIGKILL``-ed while
  it sleeps in the middle of stage 5 (the test-only hook ``FASTFACTOR_TEST_FAULT_IN_STAGE``, a no-op
  unless set); ``--resume`` continues it; the final weights are bitwise those of an uninterrupted
  run with the same seed and the report is equal except wall times.
* ``test_sigkill_mid_fine_tune_then_resume_cli``: the same with ``--checkpoint-every 1``, killed
  after step 1 of stage 5's fine-tune: the run resumes from ``stage-0005-step-00000001`` (AdamW
  moments, scheduler, data position and RNG states restored) with the same bitwise result.
* the Python API (``compress(..., checkpoint_dir=, resume=)``) over schedules, methods and
  objectives with an injected exception in the middle of a stage or of a fine-tune (stage and
  final), plus the refusals: a checkpoint of another config, model or data, and a checkpoint
  directory of another run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import fastfactor.compress as C
from fastfactor.compress import checkpoint as CK
from fastfactor.compress._tiny import tiny_data, tiny_model

def _strip_times(report: dict) -> dict:
    """A report without its wall times (the only fields allowed to differ)."""
    r = dict(report)
    r.pop("seconds", None)
    r["stages"] = [{k: v for k, v in s.items() if k != "seconds"} for s in r["stages"]]
    return r


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ============================================================================================
# the real SIGKILL through the command line
# ============================================================================================

def _cli(saved_model, out, *extra):
    return [
        sys.executable, "-m", "fastfactor.cli", "compress", "--model", str(saved_model),
        "--method", "lowrank", "--init", "fisher", "--ratio", "0.5", "--schedule", "staged",
        "--stage-unit", "layer", "--stage-steps", "2", "--steps", "3", "--calib-batches", "2",
        "--batch-size", "8", "--max-length", "16", "--seed", "5", "--no-progress",
        "--train-file", str(saved_model / "train.csv"), "--eval-file", str(saved_model / "eval.json"),
        "--out", str(out), *extra,
    ]


def _env(**extra):
    env = dict(os.environ)
    env.pop(CK.TEST_FAULT_ENV, None)
    env.update(FASTFACTOR_CPU_BACKEND="reference", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", **extra)
    return env


def _load_weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


KILL_STAGE = 5


@pytest.fixture(scope="module")
def uninterrupted(saved_model, tmp_path_factory):
    """The run every killed-and-resumed CLI run must reproduce (started once for the module)."""
    full = tmp_path_factory.mktemp("full") / "out"
    ref = subprocess.run(_cli(saved_model, full), env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    return full


def _kill_when(victim, marker, hook_line):
    """SIGKILL ``victim`` once checkpoint ``marker`` exists and it printed ``hook_line`` (it sleeps there)."""
    try:
        deadline = time.monotonic() + 90
        while not marker.is_dir():
            assert victim.poll() is None, f"the run ended before it was killed:\n{victim.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, f"checkpoint {marker.name} never appeared"
            time.sleep(0.05)
        line = ""
        while hook_line not in line:
            line = victim.stdout.readline()
            assert line, "the run's output ended before the fault hook"
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(30) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.stdout.close()


def _assert_same_run(full, killed):
    _assert_same_state(_load_weights(full), _load_weights(killed))
    rep_full = json.loads((full / "report.json").read_text())
    rep_res = json.loads((killed / "report.json").read_text())
    assert len(rep_full["stages"]) == 13  # 12 stages + the final fine-tune
    assert _strip_times(rep_full) == _strip_times(rep_res)
    man_full = json.loads((full / "fastfactor.json").read_text())
    man_res = json.loads((killed / "fastfactor.json").read_text())
    # (the files' sha256 may differ: safetensors writes its metadata map in a per-process hash order)
    assert man_full["modules"] == man_res["modules"] and man_full["files"].keys() == man_res["files"].keys()


def test_sigkill_mid_stage_then_resume_cli(saved_model, uninterrupted, tmp_path):
    full, killed = uninterrupted, tmp_path / "killed"
    victim = subprocess.Popen(_cli(saved_model, killed), env=_env(**{CK.TEST_FAULT_ENV: f"{KILL_STAGE}:sleep:120"}),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # stage KILL_STAGE - 1 is checkpointed, and it swapped stage KILL_STAGE's module and sleeps there
    marker = killed / "checkpoints" / CK.stage_dirname(KILL_STAGE - 1)
    _kill_when(victim, marker, f"sleeping in stage {KILL_STAGE}")

    # what the kill left: the checkpoint of stage KILL_STAGE - 1 only, no output files
    assert CK.list_checkpoints(killed / "checkpoints") == [str(marker)]
    assert not (killed / "fastfactor.json").exists() and not (killed / "report.json").exists()

    # a fresh run into the killed run's directory refuses (nothing is overwritten)
    again = subprocess.run(_cli(saved_model, killed), env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "already holds files of another run" in again.stderr
    assert CK.list_checkpoints(killed / "checkpoints") == [str(marker)]

    resumed = subprocess.run(_cli(saved_model, killed, "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"{KILL_STAGE} of 12 stage(s) done" in resumed.stdout
    assert f"stage {KILL_STAGE - 1} (" not in resumed.stdout and f"stage {KILL_STAGE} (" in resumed.stdout

    _assert_same_run(full, killed)


def test_sigkill_mid_fine_tune_then_resume_cli(saved_model, uninterrupted, tmp_path):
    """Killed after step 1 of stage 5's 2-step fine-tune, with a checkpoint after every step: the
    resumed run takes step 2 only, from the saved AdamW moments, schedule and data position."""
    full, killed = uninterrupted, tmp_path / "killed"
    victim = subprocess.Popen(_cli(saved_model, killed, "--checkpoint-every", "1"),
                              env=_env(**{CK.TEST_FAULT_ENV: f"{KILL_STAGE}@1:sleep:120"}),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = killed / "checkpoints" / CK.stage_dirname(KILL_STAGE, 1)
    _kill_when(victim, marker, f"sleeping in stage {KILL_STAGE} after fine-tuning step 1")
    assert CK.list_checkpoints(killed / "checkpoints") == [str(marker)]  # older ones removed once it landed
    state = CK.read_checkpoint(marker)
    assert state["in_progress"]["step"] == 1 and state["optimizer"] == CK.TRAIN_STATE
    assert state["data_position"] == {"next_stage": KILL_STAGE, "step": 1, "finetune_seed": 5 + KILL_STAGE,
                                      "calibration_seed": 12}
    opt = state["train_state"]["optimizer"]["state"]
    assert opt and all(float(v["exp_avg_sq"].abs().sum()) > 0 for v in opt.values())  # real moments, one step's
    assert state["train_state"]["scheduler"]["last_epoch"] == 1

    resumed = subprocess.run(_cli(saved_model, killed, "--resume", "--checkpoint-every", "1"), env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at step 1 of stage {KILL_STAGE}'s fine-tune" in resumed.stdout
    _assert_same_run(full, killed)


# ============================================================================================
# the Python API
# ============================================================================================

CASES = {
    # name: (family, config, data kwargs, fault stage)
    "lowrank-fisher-staged-layer-task": (
        "bert_cls", dict(method="lowrank", init="fisher", schedule="staged", stage_unit="layer", stage_steps=2,
                         final_steps=2, calib_batches=2), dict(labels=2), 4),
    "lowrank-activation-staged-block-distill": (
        "gpt2", dict(method="lowrank", init="activation", schedule="staged", stage_unit="block", stage_steps=2,
                     final_steps=2, calib_batches=2), dict(), 1),
    "monarch-all_at_once": (
        "llama", dict(method="monarch", schedule="all_at_once", final_steps=3), dict(), 0),
}


def _run(family, cfg, data_kw, **kw):
    model = tiny_model(family, num_labels=2, intermediate=36)
    model.train()  # dropout on: the torch RNG state matters
    cfg = dict(cfg, ratio=0.5, batch_size=8, seed=11)
    return C.compress(model, cfg, tiny_data(**data_kw), **kw)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_resume_api_bitwise(case, tmp_path, monkeypatch):
    family, cfg, data_kw, fault = CASES[case]
    m_ref, r_ref = _run(family, cfg, data_kw)
    ck = tmp_path / "ck"
    monkeypatch.setenv(CK.TEST_FAULT_ENV, f"{fault}:raise")
    with pytest.raises(CK.InjectedFault):
        _run(family, cfg, data_kw, checkpoint_dir=ck)
    monkeypatch.delenv(CK.TEST_FAULT_ENV)
    before = CK.list_checkpoints(ck)
    assert before == ([str(ck / CK.stage_dirname(fault - 1))] if fault else [])
    if fault == 0:  # killed before the first stage finished: nothing to resume from
        with pytest.raises(ValueError, match="holds no finished stage checkpoint"):
            _run(family, cfg, data_kw, checkpoint_dir=ck, resume=ck)
        return
    m_res, r_res = _run(family, cfg, data_kw, checkpoint_dir=ck, resume=ck)
    _assert_same_state(m_ref.state_dict(), m_res.state_dict())
    assert _strip_times(r_ref.to_dict()) == _strip_times(r_res.to_dict())
    assert m_res.training is False  # the driver returns the model in eval mode, as before

    # resuming a finished run (final checkpoint) redoes nothing and gives the same again
    final = CK.list_checkpoints(ck)
    assert final == [str(ck / CK.stage_dirname(len(r_ref.stages) - 1))]
    state = CK.read_checkpoint(final[-1])
    assert state["final"] and state["optimizer"] is None and state["data_position"]["next_stage"] == len(r_ref.stages)
    m_again, r_again = _run(family, cfg, data_kw, resume=ck)
    _assert_same_state(m_ref.state_dict(), m_again.state_dict())
    assert _strip_times(r_ref.to_dict()) == _strip_times(r_again.to_dict())


MID_CASES = {
    # name: (family, config, data kwargs, checkpoint_every, fault "STAGE@STEP", checkpoint (stage, step))
    "fisher-staged-layer-task": (
        "bert_cls", dict(method="lowrank", init="fisher", schedule="staged", stage_unit="layer", stage_steps=4,
                         final_steps=2, calib_batches=2), dict(labels=2), 2, "2@3", (2, 2)),
    "activation-staged-block-distill-final": (
        "gpt2", dict(method="lowrank", init="activation", schedule="staged", stage_unit="block", stage_steps=1,
                     final_steps=5, calib_batches=2), dict(), 2, "2@5", (2, 4)),
    "all_at_once-final": (
        "bert", dict(method="lowrank", schedule="all_at_once", final_steps=4), dict(), 1, "1@3", (1, 3)),
}


@pytest.mark.parametrize("case", list(MID_CASES), ids=list(MID_CASES))
def test_resume_mid_fine_tune_api_bitwise(case, tmp_path, monkeypatch):
    """A fault inside a fine-tune (a stage's, or the final one: stage index = number of stages)
    resumes from the last mid-fine-tune checkpoint and gives bitwise the uninterrupted result."""
    family, cfg, data_kw, every, fault, (ck_stage, ck_step) = MID_CASES[case]
    m_ref, r_ref = _run(family, cfg, data_kw)
    ck = tmp_path / "ck"
    monkeypatch.setenv(CK.TEST_FAULT_ENV, f"{fault}:raise")
    with pytest.raises(CK.InjectedFault, match="after fine-tuning step"):
        _run(family, cfg, data_kw, checkpoint_dir=ck, checkpoint_every=every)
    monkeypatch.delenv(CK.TEST_FAULT_ENV)
    assert CK.list_checkpoints(ck) == [str(ck / CK.stage_dirname(ck_stage, ck_step))]
    state = CK.read_checkpoint(CK.list_checkpoints(ck)[-1])
    assert state["in_progress"]["step"] == ck_step and state["train_state"]["step"] == ck_step
    assert len(state["train_state"]["losses"]) == ck_step
    assert state["train_state"]["scheduler"]["last_epoch"] == ck_step
    m_res, r_res = _run(family, cfg, data_kw, checkpoint_dir=ck, resume=ck, checkpoint_every=every)
    _assert_same_state(m_ref.state_dict(), m_res.state_dict())
    assert _strip_times(r_ref.to_dict()) == _strip_times(r_res.to_dict())


def test_mid_fine_tune_checkpoints_order_and_arguments(tmp_path):
    """Checkpoints sort by (stage, step) with a finished stage after its steps; bad arguments are named."""
    for name in ("stage-0001", "stage-0001-step-00000002", "stage-0000", "stage-0001-step-00000010",
                 "stage-0002-step-00000001", ".tmp-stage-0003", "stage-0001-step-3"):
        (tmp_path / name).mkdir()
    assert [os.path.basename(p) for p in CK.list_checkpoints(tmp_path)] == [
        "stage-0000", "stage-0001-step-00000002", "stage-0001-step-00000010", "stage-0001", "stage-0002-step-00000001"]
    cfg = dict(method="lowrank", schedule="all_at_once", final_steps=1)
    with pytest.raises(ValueError, match="checkpoint_every: needs checkpoint_dir"):
        _run("bert", cfg, {}, checkpoint_every=2)
    with pytest.raises(ValueError, match=r"checkpoint_every: expected an int >= 0 .*got -1"):
        _run("bert", cfg, {}, checkpoint_dir=tmp_path / "x", checkpoint_every=-1)
    with pytest.raises(ValueError, match=r"parallel: expected one of \('auto', 'ddp', 'fsdp'\), got 'zero3'"):
        _run("bert", cfg, {}, parallel="zero3")


def test_resume_killed_in_the_final_fine_tune(tmp_path, monkeypatch):
    """all_at_once has one stage (the swap) then the final fine-tune: a fault there resumes after the swap."""
    import fastfactor.train.loop as L

    cfg = dict(method="lowrank", schedule="all_at_once", final_steps=3)
    m_ref, r_ref = _run("bert", cfg, {})
    ck = tmp_path / "ck"

    def boom(*a, **k):
        raise CK.InjectedFault("killed in the final fine-tune")

    real = L.finetune
    monkeypatch.setattr(L, "finetune", boom)
    with pytest.raises(CK.InjectedFault):
        _run("bert", cfg, {}, checkpoint_dir=ck)
    monkeypatch.setattr(L, "finetune", real)
    assert CK.list_checkpoints(ck) == [str(ck / CK.stage_dirname(0))]
    m_res, r_res = _run("bert", cfg, {}, checkpoint_dir=ck, resume=ck)
    _assert_same_state(m_ref.state_dict(), m_res.state_dict())
    assert _strip_times(r_ref.to_dict()) == _strip_times(r_res.to_dict())


def test_resume_refuses_other_model_and_data(tmp_path, monkeypatch):
    cfg = dict(method="lowrank", schedule="staged", stage_unit="block", stage_steps=1, final_steps=1)
    ck = tmp_path / "ck"
    monkeypatch.setenv(CK.TEST_FAULT_ENV, "1:raise")
    with pytest.raises(CK.InjectedFault):
        _run("bert", cfg, {}, checkpoint_dir=ck)
    monkeypatch.delenv(CK.TEST_FAULT_ENV)
    kw = dict(ratio=0.5, batch_size=8, seed=11, **cfg)
    with pytest.raises(ValueError, match=r"state\.json: written for another model"):
        C.compress(tiny_model("bert", seed=1, intermediate=36).train(), kw, tiny_data(), resume=ck)
    with pytest.raises(ValueError, match=r"state\.json: written for another data"):
        C.compress(tiny_model("bert", intermediate=36).train(), kw, tiny_data(seed=2), resume=ck)
    with pytest.raises(ValueError, match=r"state\.json: written with another compression config \(ratio"):
        C.compress(tiny_model("bert", intermediate=36).train(), dict(kw, ratio=0.4), tiny_data(), resume=ck)
    # a fresh run into a directory with checkpoints of another run refuses, and leaves them alone
    with pytest.raises(ValueError, match="checkpoint_dir: .* already holds checkpoints of another run"):
        _run("bert", cfg, {}, checkpoint_dir=ck)
    assert CK.list_checkpoints(ck) == [str(ck / CK.stage_dirname(0))]
    with pytest.raises(ValueError, match="resume: expected a directory with stage checkpoints"):
        _run("bert", cfg, {}, resume=tmp_path / "nowhere")


def test_fault_hook_is_inert_unless_set(monkeypatch):
    monkeypatch.delenv(CK.TEST_FAULT_ENV, raising=False)
    CK.test_fault_hook(0)  # nothing happens
    monkeypatch.setenv(CK.TEST_FAULT_ENV, "3:raise")
    CK.test_fault_hook(2)  # another stage: nothing happens
    with pytest.raises(CK.InjectedFault, match="stage 3"):
        CK.test_fault_hook(3)
    monkeypatch.setenv(CK.TEST_FAULT_ENV, "3@2:raise")
    CK.test_fault_hook(3)  # the stage's middle, not its step 2: nothing happens
    CK.test_fault_hook(3, 1)
    with pytest.raises(CK.InjectedFault, match="stage 3 after fine-tuning step 2"):
        CK.test_fault_hook(3, 2)
    for bad in ("oops", "3@x:raise", "3:explode"):
        monkeypatch.setenv(CK.TEST_FAULT_ENV, bad)
        with pytest.raises(ValueError, match="FASTFACTOR_TEST_FAULT_IN_STAGE: expected"):
            CK.test_fault_hook(3)


def test_rng_state_round_trip():
    import numpy as np

    g = torch.Generator().manual_seed(3)
    st = json.loads(json.dumps(CK.rng_state(g)))  # JSON-safe
    a = (random.random(), float(np.random.rand()), torch.rand(3), torch.rand(2, generator=g))
    CK.set_rng_state(st, g)
    b = (random.random(), float(np.random.rand()), torch.rand(3), torch.rand(2, generator=g))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
