"""Safe files: faults injected into stage checkpoints and saved models give a clear error naming the
file and what is wrong; nothing is overwritten; a crash while writing leaves no valid-looking file.

Each ``CKPT_FAULTS`` / ``SAVED_FAULTS`` case corrupts one file of a fresh copy (truncation, a flipped
byte, deletion, a newer format version, wrong shapes, an unknown module class, bad JSON), tries to
resume / load, and checks the message and that every file is byte-for-byte what it was before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

import fastfactor.compress as C
from fastfactor import _io
from fastfactor.compress import checkpoint as CK
from fastfactor.compress._tiny import tiny_data, tiny_model

CFG = dict(method="lowrank", ratio=0.5, schedule="staged", stage_unit="block", stage_steps=1, final_steps=1,
           batch_size=8, seed=4)


def _model():
    return tiny_model("bert", intermediate=36).train()


def _snapshot(root) -> dict:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def stage0(tmp_path_factory):
    """The checkpoint directory of a run stopped in stage 1 (holding stage-0000)."""
    ck = tmp_path_factory.mktemp("ck") / "checkpoints"
    os.environ[CK.TEST_FAULT_ENV] = "1:raise"
    try:
        with pytest.raises(CK.InjectedFault):
            C.compress(_model(), CFG, tiny_data(), checkpoint_dir=ck)
    finally:
        del os.environ[CK.TEST_FAULT_ENV]
    return ck


# --- fault injectors: each corrupts exactly one file ----------------------------------------

def _truncate(p):
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size // 2)


def _flip(p):
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _edit_json(p, fn):
    with open(p) as f:
        d = json.load(f)
    fn(d)
    with open(p, "w") as f:
        json.dump(d, f)


def _reseal(stage_dir):
    """Recompute the index checksums (a file changed *consistently*, e.g. by a newer writer)."""
    idx = os.path.join(stage_dir, "checkpoint.json")
    _edit_json(idx, lambda d: d["files"].update(
        {n: _io.sha256_file(os.path.join(stage_dir, n)) for n in d["files"]}))


def _first_module(d):
    return d["modules"][0]


def _set_rank(d, r):
    _first_module(d)["factor_config"]["rank"] = r


CKPT_FAULTS = {
    # name: (file corrupted, injector(stage_dir), expected message regex)
    "weights-truncated": ("model.safetensors", lambda s: _truncate(os.path.join(s, "model.safetensors")),
                          r"model\.safetensors: sha256 mismatch .* truncated, corrupt"),
    "weights-bitflip": ("model.safetensors", lambda s: _flip(os.path.join(s, "model.safetensors")),
                        r"model\.safetensors: sha256 mismatch"),
    "weights-missing": ("model.safetensors", lambda s: os.remove(os.path.join(s, "model.safetensors")),
                        r"model\.safetensors: listed with a checksum but missing"),
    "state-truncated": ("state.json", lambda s: _truncate(os.path.join(s, "state.json")),
                        r"state\.json: sha256 mismatch"),
    "manifest-bitflip": ("fastfactor.json", lambda s: _flip(os.path.join(s, "fastfactor.json")),
                         r"fastfactor\.json: sha256 mismatch"),
    "index-truncated": ("checkpoint.json", lambda s: _truncate(os.path.join(s, "checkpoint.json")),
                        r"checkpoint\.json: checkpoint index is not valid JSON .* truncated or corrupt"),
    "index-empty": ("checkpoint.json", lambda s: open(os.path.join(s, "checkpoint.json"), "w").close(),
                    r"checkpoint\.json: checkpoint index is empty"),
    "index-missing": ("checkpoint.json", lambda s: os.remove(os.path.join(s, "checkpoint.json")),
                      r"checkpoint\.json: checkpoint index is missing"),
    "index-newer-format": ("checkpoint.json", lambda s: _edit_json(
        os.path.join(s, "checkpoint.json"), lambda d: d.update(format_version=99)),
        r"checkpoint\.json: checkpoint index has format_version 99, newer than the 1 .* upgrade fastfactor"),
    "state-newer-format": ("state.json", lambda s: (_edit_json(
        os.path.join(s, "state.json"), lambda d: d.update(format_version=7)), _reseal(s)),
        r"state\.json: checkpoint state has format_version 7, newer"),
    "manifest-newer-format": ("fastfactor.json", lambda s: (_edit_json(
        os.path.join(s, "fastfactor.json"), lambda d: d.update(format_version=2)), _reseal(s)),
        r"fastfactor\.json: manifest has format_version 2, newer"),
    "manifest-wrong-shapes": ("fastfactor.json", lambda s: (_edit_json(
        os.path.join(s, "fastfactor.json"), lambda d: _set_rank(d, 3)), _reseal(s)),
        r"model\.safetensors: tensor 'encoder\.layer\.0\..*' has shape \[\d+, \d+\], the model expects"),
    "manifest-unknown-class": ("fastfactor.json", lambda s: (_edit_json(
        os.path.join(s, "fastfactor.json"), lambda d: _first_module(d).update({"class": "QuantumLinear"})),
        _reseal(s)), r"fastfactor\.json: module 'encoder\.layer\.0\..*' has layer class 'QuantumLinear'"),
    "manifest-missing-module": ("fastfactor.json", lambda s: (_edit_json(
        os.path.join(s, "fastfactor.json"), lambda d: d["modules"].pop()), _reseal(s)),
        r"fastfactor\.json: the replaced modules do not match the finished stages"),
    "state-other-world-size": ("state.json", lambda s: (_edit_json(
        os.path.join(s, "state.json"), lambda d: d["rng"].append(d["rng"][0])), _reseal(s)),
        r"state\.json: written by 2 process\(es\), resuming with 1"),
}


@pytest.mark.parametrize("fault", list(CKPT_FAULTS), ids=list(CKPT_FAULTS))
def test_corrupted_checkpoint_is_refused(stage0, tmp_path, fault):
    fname, inject, pattern = CKPT_FAULTS[fault]
    ck = tmp_path / "checkpoints"
    shutil.copytree(stage0, ck)
    stage = ck / CK.stage_dirname(0)
    before = _snapshot(stage)
    inject(str(stage))
    corrupted = _snapshot(stage)
    changed = {k for k in before.keys() | corrupted.keys() if before.get(k) != corrupted.get(k)}
    # one file changed (or went missing); "resealed" faults also update the index's checksums
    assert fname in changed and changed <= {fname, "checkpoint.json"}
    with pytest.raises(ValueError, match=pattern) as ei:
        C.compress(_model(), CFG, tiny_data(), checkpoint_dir=ck, resume=ck)
    assert str(stage) in str(ei.value)  # the message names the file (with its directory)
    assert _snapshot(stage) == corrupted  # nothing was overwritten or "repaired"
    assert CK.list_checkpoints(ck) == [str(stage)]


def test_uncorrupted_copy_resumes(stage0, tmp_path):
    """The control: the same copy without a fault resumes fine."""
    ck = tmp_path / "checkpoints"
    shutil.copytree(stage0, ck)
    model, report = C.compress(_model(), CFG, tiny_data(), checkpoint_dir=ck, resume=ck)
    assert len(report.stages) == 3


# --- a mid-fine-tune checkpoint: its train_state.pt ---------------------------------------

@pytest.fixture(scope="module")
def step_ckpt(tmp_path_factory):
    """The checkpoint directory of a run stopped after step 2 of stage 1's 3-step fine-tune
    (``checkpoint_every=1``: it holds ``stage-0001-step-00000002``)."""
    ck = tmp_path_factory.mktemp("ck_step") / "checkpoints"
    os.environ[CK.TEST_FAULT_ENV] = "1@2:raise"
    try:
        with pytest.raises(CK.InjectedFault):
            C.compress(_model(), dict(CFG, stage_steps=3), tiny_data(), checkpoint_dir=ck, checkpoint_every=1)
    finally:
        del os.environ[CK.TEST_FAULT_ENV]
    assert CK.list_checkpoints(ck) == [str(ck / CK.stage_dirname(1, 2))]
    return ck


def _save_train_state(path, edit):
    ts = torch.load(path, weights_only=True)
    edit(ts)
    torch.save(ts, path)


def _first_moment(ts):
    return next(iter(ts["optimizer"]["state"].values()))


STEP_FAULTS = {
    "train-state-truncated": (lambda s: _truncate(os.path.join(s, CK.TRAIN_STATE)),
                              r"train_state\.pt: sha256 mismatch"),
    "train-state-missing": (lambda s: os.remove(os.path.join(s, CK.TRAIN_STATE)),
                            r"train_state\.pt: listed with a checksum but missing"),
    "train-state-not-torch": (lambda s: (open(os.path.join(s, CK.TRAIN_STATE), "w").write("{}"), _reseal(s)),
                              r"train_state\.pt: cannot read the fine-tuning state"),
    "train-state-other-step": (lambda s: (_save_train_state(os.path.join(s, CK.TRAIN_STATE),
                                                            lambda ts: ts.update(step=1)), _reseal(s)),
                               r"train_state\.pt: holds step 1, state\.json says step 2"),
    "train-state-wrong-moment-shape": (lambda s: (_save_train_state(
        os.path.join(s, CK.TRAIN_STATE), lambda ts: _first_moment(ts).update(exp_avg=torch.zeros(3, 2))), _reseal(s)),
        r"train_state\.pt: optimizer 'exp_avg' of '.*' has shape \[3, 2\], the parameter"),
    "train-state-unknown-parameter": (lambda s: (_save_train_state(
        os.path.join(s, CK.TRAIN_STATE), lambda ts: ts["optimizer"]["state"].update(
            {"encoder.layer.9.ghost.u": _first_moment(ts)})), _reseal(s)),
        r"train_state\.pt: optimizer state for 'encoder\.layer\.9\.ghost\.u', which is not a parameter"),
    "index-without-train-state": (lambda s: _edit_json(os.path.join(s, "checkpoint.json"),
                                                       lambda d: d["files"].pop(CK.TRAIN_STATE)),
                                  r"checkpoint\.json: a mid-fine-tune checkpoint needs the checksum of train_state\.pt"),
}


@pytest.mark.parametrize("fault", list(STEP_FAULTS), ids=list(STEP_FAULTS))
def test_corrupted_fine_tune_state_is_refused(step_ckpt, tmp_path, fault):
    inject, pattern = STEP_FAULTS[fault]
    ck = tmp_path / "checkpoints"
    shutil.copytree(step_ckpt, ck)
    stage = ck / CK.stage_dirname(1, 2)
    inject(str(stage))
    corrupted = _snapshot(stage)
    with pytest.raises(ValueError, match=pattern) as ei:
        C.compress(_model(), dict(CFG, stage_steps=3), tiny_data(), checkpoint_dir=ck, resume=ck, checkpoint_every=1)
    assert str(stage) in str(ei.value)
    assert _snapshot(stage) == corrupted
    assert CK.list_checkpoints(ck) == [str(stage)]


def test_uncorrupted_fine_tune_state_resumes(step_ckpt, tmp_path):
    ck = tmp_path / "checkpoints"
    shutil.copytree(step_ckpt, ck)
    ref_model, ref = C.compress(_model(), dict(CFG, stage_steps=3), tiny_data())
    model, report = C.compress(_model(), dict(CFG, stage_steps=3), tiny_data(), checkpoint_dir=ck, resume=ck)
    assert len(report.stages) == 3 and report.stages[1].train == ref.stages[1].train
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


# --- saved models (load_compressed) ---------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model("gpt2", intermediate=36)
    C.compress(model, dict(method="lowrank", ratio=0.5, schedule="offline"))
    return C.save_compressed(model, tmp_path_factory.mktemp("saved") / "m")


def _drop_files(d):
    d.pop("files")


def _rehash_weights(p):
    """The manifest's checksum made to match a damaged weight file (what no checksum can catch)."""
    digest = _io.sha256_file(os.path.join(p, "model.safetensors"))
    _edit_json(os.path.join(p, "fastfactor.json"), lambda d: d["files"].update({"model.safetensors": digest}))


SAVED_FAULTS = {
    "weights-truncated": ("model.safetensors", lambda p: _truncate(os.path.join(p, "model.safetensors")),
                          r"model\.safetensors: sha256 mismatch"),
    "weights-truncated-checksum-matching": ("model.safetensors", lambda p: (
        _truncate(os.path.join(p, "model.safetensors")), _rehash_weights(p)),
        r"model\.safetensors: cannot read the tensors .* truncated or corrupt"),
    # a manifest without its file list is refused outright (before: the integrity check was skipped)
    "weights-truncated-no-checksum": ("model.safetensors", lambda p: (
        _truncate(os.path.join(p, "model.safetensors")),
        _edit_json(os.path.join(p, "fastfactor.json"), _drop_files)),
        r"fastfactor\.json: no 'files' entry"),
    "manifest-truncated": ("fastfactor.json", lambda p: _truncate(os.path.join(p, "fastfactor.json")),
                           r"fastfactor\.json: manifest is not valid JSON"),
    "manifest-newer-format": ("fastfactor.json", lambda p: _edit_json(
        os.path.join(p, "fastfactor.json"), lambda d: d.update(format_version=5)),
        r"fastfactor\.json: manifest has format_version 5, newer"),
    "manifest-no-format": ("fastfactor.json", lambda p: _edit_json(
        os.path.join(p, "fastfactor.json"), lambda d: d.pop("format_version")),
        r"fastfactor\.json: manifest has no format_version"),
    "manifest-unknown-class": ("fastfactor.json", lambda p: _edit_json(
        os.path.join(p, "fastfactor.json"), lambda d: _first_module(d).update({"class": "QuantumLinear"})),
        r"fastfactor\.json: module 'transformer\.h\.0\..*': layer class QuantumLinear"),
    "manifest-wrong-shapes": ("fastfactor.json", lambda p: _edit_json(
        os.path.join(p, "fastfactor.json"), lambda d: _set_rank(d, 2)),
        r"(?s)model\.safetensors: tensors do not fit the model: .*size mismatch"),
    "manifest-bad-factor-config": ("fastfactor.json", lambda p: _edit_json(
        os.path.join(p, "fastfactor.json"), lambda d: _set_rank(d, 10**6)),
        r"fastfactor\.json: module 'transformer\.h\.0\..*': bad factor_config"),
}


@pytest.mark.parametrize("fault", list(SAVED_FAULTS), ids=list(SAVED_FAULTS))
def test_corrupted_saved_model_is_refused(saved, tmp_path, fault):
    fname, inject, pattern = SAVED_FAULTS[fault]
    p = str(tmp_path / "m")
    shutil.copytree(saved, p)
    inject(p)
    corrupted = _snapshot(p)
    with pytest.raises(ValueError, match=pattern):
        C.load_compressed(p)
    assert _snapshot(p) == corrupted


# --- atomic writes: a crash mid-write leaves the previous state ----------------------------------

def test_crash_while_writing_a_checkpoint_leaves_no_stage_dir(stage0, tmp_path, monkeypatch):
    import fastfactor.compress.io as IO

    ck = tmp_path / "checkpoints"
    shutil.copytree(stage0, ck)
    before = _snapshot(ck)
    real = IO.save_compressed

    def dies_half_way(model, path, **kw):
        real(model, path, **kw)
        with open(os.path.join(path, "model.safetensors"), "r+b") as f:
            f.truncate(100)  # a half-written weight file in the temporary directory...
        raise OSError("disk full")  # ...and the writer dies

    monkeypatch.setattr(IO, "save_compressed", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        C.compress(_model(), CFG, tiny_data(), checkpoint_dir=ck, resume=ck)
    assert _snapshot(ck) == before  # stage-0000 untouched, no stage-0001, no temporaries
    assert sorted(os.listdir(ck)) == [CK.stage_dirname(0)]


def test_sigkill_leftovers_are_ignored_and_cleaned(stage0, tmp_path):
    ck = tmp_path / "checkpoints"
    shutil.copytree(stage0, ck)
    junk = ck / ".tmp-stage-0001-abc123"  # what a SIGKILL during a checkpoint write leaves
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"\x00" * 10)
    assert CK.resolve_resume(ck) == str(ck / CK.stage_dirname(0))
    C.compress(_model(), CFG, tiny_data(), checkpoint_dir=ck, resume=ck)
    assert sorted(os.listdir(ck)) == [CK.stage_dirname(2)]  # newest kept, older and junk removed


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    from fastfactor.compress.io import atomic_write_text

    target = tmp_path / "report.json"
    target.write_text("old")

    def no_replace(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(OSError, match="power cut"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]


def test_atomic_directory(tmp_path):
    d = tmp_path / "x"
    with pytest.raises(RuntimeError):
        with _io.atomic_directory(d) as tmp:
            open(os.path.join(tmp, "a"), "w").close()
            raise RuntimeError("crash")
    assert not d.exists() and os.listdir(tmp_path) == []
    with _io.atomic_directory(d) as tmp:
        open(os.path.join(tmp, "a"), "w").close()
    assert sorted(os.listdir(d)) == ["a"]
    with pytest.raises(ValueError, match="already exists; refusing to overwrite it"):
        with _io.atomic_directory(d):
            pass
    assert sorted(os.listdir(tmp_path)) == ["x"]


# --- the command line never overwrites another run -------------------------------------------

def test_cli_refuses_an_out_dir_with_another_run(saved, tmp_path, capsys):
    from fastfactor.cli import main

    out = tmp_path / "out"
    shutil.copytree(saved, out)
    before = _snapshot(out)
    args = ["compress", "--model", str(tmp_path / "unused"), "--schedule", "offline", "--out", str(out)]
    with pytest.raises(SystemExit, match="--out: .* already holds files of another run .*fastfactor.json.*"
                                         "pass --resume .* --overwrite"):
        main(args)
    with pytest.raises(SystemExit, match="--overwrite: cannot be combined with --resume"):
        main(args + ["--resume", "--overwrite"])
    with pytest.raises(SystemExit, match="--out: expected a directory"):
        main(args[:-1] + [str(out / "model.safetensors")])
    assert _snapshot(out) == before
    capsys.readouterr()
    assert main(args + ["--overwrite"]) == 1  # --overwrite gets past the guard (then the model is missing)
    assert "--model: expected a local model directory" in capsys.readouterr().err


def test_read_json_errors(tmp_path):
    p = tmp_path / "f.json"
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"f\.json: thing: expected a JSON object, got list"):
        _io.read_json(p, "thing")
    p.write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=r"f\.json: thing is not valid JSON"):
        _io.read_json(p, "thing")
    with pytest.raises(ValueError, match="expected an integer format_version, got '1'"):
        _io.check_format_version(p, "1", 1)
    with pytest.raises(ValueError, match="outside the directory"):
        _io.verify_files(tmp_path, {"../etc/passwd": "0"})


def test_nan_weight_names_the_module():
    model = tiny_model("bert", intermediate=36)
    with torch.no_grad():
        model.encoder.layer[1].intermediate.dense.weight[3, 5] = float("nan")
        model.encoder.layer[1].intermediate.dense.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.intermediate\.dense\.weight: expected finite "
                                         r"values, found 2 NaN/Inf entries"):
        C.compress(model, dict(method="lowrank", ratio=0.5, schedule="offline"))
