"""Safe output folders: ``--out`` never inside ``--model``, ordinary file modes, the run's own
checkpoints pruned after success, every manifest file hashed, manifest errors that name the file
and the field."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat

import pytest
import torch

import fastfactor.compress as C
from fastfactor.compress._tiny import tiny_data, tiny_model
from fastfactor.compress.io import MANIFEST, WEIGHTS

OFFLINE = ["--schedule", "offline", "--method", "lowrank", "--ratio", "0.5", "--no-progress"]


def _snapshot(root) -> dict:
    """``{relative path: sha256}`` of every file under ``root``."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _compress_cli(argv):
    from fastfactor.cli import main

    return main(["compress"] + [str(a) for a in argv])


@pytest.fixture
def model_copy(saved_model, tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(saved_model, d)
    return d


# --- --out inside or equal to --model ---------------------------------------------------------

@pytest.mark.parametrize("where", ["equal", "inside", "inside-nested", "symlink-to-model"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_out_inside_or_equal_to_model_is_refused_before_loading(model_copy, tmp_path, where, overwrite,
                                                                 monkeypatch, capsys):
    import transformers

    loaded = []

    def no_loading(*a, **k):  # the CLI turns exceptions into one line: record the call as well
        loaded.append(a)
        raise RuntimeError("a model, config or tokenizer was loaded before --out was checked")

    for cls in ("AutoConfig", "AutoTokenizer", "AutoModel", "AutoModelForSequenceClassification"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", no_loading)
    out = {"equal": model_copy, "inside": model_copy / "compressed", "inside-nested": model_copy / "a" / "b",
           "symlink-to-model": tmp_path / "link"}[where]
    if where == "symlink-to-model":
        os.symlink(model_copy, out)
    before = _snapshot(model_copy)
    argv = ["--model", model_copy, "--out", out] + OFFLINE + (["--overwrite"] if overwrite else [])
    try:
        rc, msg = _compress_cli(argv), ""
    except SystemExit as e:  # either way: a failed run with a one-line message
        rc, msg = 1, str(e.code)
    msg += capsys.readouterr().err
    assert rc != 0
    assert re.search(r"--out: .*(is inside --model|is --model itself)", msg), msg
    assert loaded == []
    assert _snapshot(model_copy) == before  # nothing written, nothing deleted


def test_out_beside_model_is_fine(model_copy, tmp_path):
    """A sibling whose name starts like the model's is not inside it."""
    from fastfactor.compress.storage import check_out_outside_model

    check_out_outside_model(str(model_copy) + "-compressed", model_copy)  # no error
    check_out_outside_model(tmp_path / "elsewhere", model_copy)
    with pytest.raises(ValueError, match=r"--out: .* inside --model"):
        check_out_outside_model(model_copy / "x", model_copy)


# --- file modes ---------------------------------------------------------------------------------

def _modes(root):
    files, dirs = {}, {}
    for d, sub, names in os.walk(root):
        for s in sub:
            dirs[os.path.relpath(os.path.join(d, s), root)] = stat.S_IMODE(os.stat(os.path.join(d, s)).st_mode)
        for n in names:
            files[os.path.relpath(os.path.join(d, n), root)] = stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode)
    return files, dirs


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_follow_the_umask_like_ordinary_files(tmp_path, umask):
    from fastfactor import _io

    old = os.umask(umask)
    try:
        model = tiny_model("bert")
        C.compress(model, dict(method="lowrank", schedule="offline", ratio=0.5), checkpoint_dir=tmp_path / "ck")
        C.save_compressed(model, tmp_path / "m", report={"a": 1})
        _io.atomic_write_text(tmp_path / "plain.txt", "x")
        with open(tmp_path / "reference.txt", "w") as f:  # what an ordinary open() gives
            f.write("x")
    finally:
        os.umask(old)
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "reference.txt").st_mode) == want_file
    files, dirs = _modes(tmp_path)
    assert {WEIGHTS, MANIFEST, "config.json", "report.json"} <= {os.path.basename(f) for f in files}
    assert any(f.startswith("ck") for f in files)  # the stage checkpoint is checked too
    assert {f: m for f, m in files.items() if m != want_file} == {}
    assert {d: m for d, m in dirs.items() if m != want_dir} == {}


# --- checkpoints after success --------------------------------------------------------------------

@pytest.mark.parametrize("keep", [False, True], ids=["pruned", "keep-checkpoints"])
def test_the_runs_checkpoints_are_pruned_after_success(model_copy, tmp_path, keep):
    out = tmp_path / "out"
    rc = _compress_cli(["--model", model_copy, "--out", out] + OFFLINE + (["--keep-checkpoints"] if keep else []))
    assert rc == 0
    assert (out / WEIGHTS).is_file() and (out / "report.json").is_file()
    ck = out / "checkpoints"
    if keep:
        assert [p.name for p in ck.iterdir()] == ["stage-0000"]
    else:
        assert not ck.exists()
    # a finished run's folder loads, and a second run into it still needs --overwrite
    C.load_compressed(out)
    with pytest.raises(SystemExit, match="already holds files of another run"):
        _compress_cli(["--model", model_copy, "--out", out] + OFFLINE)


def test_pruning_leaves_foreign_files_alone(tmp_path):
    from fastfactor.compress.storage import remove_checkpoints

    ck = tmp_path / "checkpoints"
    (ck / "stage-0000").mkdir(parents=True)
    (ck / "stage-0001-step-00000002").mkdir()
    (ck / ".tmp-stage-0002-x").mkdir()
    (ck / "notes.txt").write_text("mine")
    remove_checkpoints(ck)
    assert sorted(os.listdir(ck)) == ["notes.txt"]
    os.remove(ck / "notes.txt")
    remove_checkpoints(ck)
    assert not ck.exists()
    remove_checkpoints(ck)  # nothing there: no error


# --- manifests --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model("bert")
    C.compress(model, dict(method="lowrank", schedule="offline", ratio=0.5))
    return str(C.save_compressed(model, tmp_path_factory.mktemp("saved") / "m", report={"note": "r"}))


def _copy(saved, tmp_path):
    import shutil

    p = tmp_path / "m"
    shutil.copytree(saved, p)
    return p


def _edit_manifest(p, edit):
    mpath = p / MANIFEST
    m = json.loads(mpath.read_text())
    edit(m)
    mpath.write_text(json.dumps(m))


def test_manifest_lists_and_hashes_every_file(saved):
    m = json.loads(open(os.path.join(saved, MANIFEST)).read())
    assert set(m["files"]) == {WEIGHTS, "config.json", "report.json"}
    for name, digest in m["files"].items():
        with open(os.path.join(saved, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest


@pytest.mark.parametrize("name", ["config.json", "report.json"])
def test_a_changed_listed_file_is_refused(saved, tmp_path, name):
    p = _copy(saved, tmp_path)
    with open(p / name, "a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match=rf"{name}: sha256 mismatch"):
        C.load_compressed(p)


def test_config_json_change_that_would_load_silently_is_caught(saved, tmp_path):
    """A config edit that still builds a model (hidden_act) is exactly what the hash is for."""
    p = _copy(saved, tmp_path)
    cfg = json.loads((p / "config.json").read_text())
    cfg["hidden_act"] = "relu" if cfg.get("hidden_act") != "relu" else "gelu"
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: sha256 mismatch"):
        C.load_compressed(p)


@pytest.mark.parametrize("case, pattern", [
    ("no-files", r"fastfactor\.json: no 'files' entry"),
    ("files-not-a-map", r"fastfactor\.json: 'files': expected a \{name: sha256\} map"),
    ("files-without-weights", r"fastfactor\.json: 'files' does not list model\.safetensors"),
    ("no-modules", r"fastfactor\.json: no 'modules' entry"),
    ("modules-not-a-list", r"fastfactor\.json: 'modules': expected a list"),
    ("entry-without-class", r"fastfactor\.json: modules\[0\] has no 'class'"),
    ("entry-without-name", r"fastfactor\.json: modules\[0\] has no 'name'"),
    ("entry-without-factor-config", r"fastfactor\.json: modules\[0\] has no 'factor_config'"),
    ("missing-module", r"fastfactor\.json: modules\[0\]\.name 'encoder\.nowhere\.dense': the model has no such module"),
    ("no-model-class", r"fastfactor\.json: no 'model_class' entry"),
])
def test_manifest_errors_name_the_file_and_field(saved, tmp_path, case, pattern):
    p = _copy(saved, tmp_path)
    edits = {
        "no-files": lambda m: m.pop("files"),
        "files-not-a-map": lambda m: m.update(files=[WEIGHTS]),
        "files-without-weights": lambda m: m["files"].pop(WEIGHTS),
        "no-modules": lambda m: m.pop("modules"),
        "modules-not-a-list": lambda m: m.update(modules={"a": 1}),
        "entry-without-class": lambda m: m["modules"][0].pop("class"),
        "entry-without-name": lambda m: m["modules"][0].pop("name"),
        "entry-without-factor-config": lambda m: m["modules"][0].pop("factor_config"),
        "missing-module": lambda m: m["modules"][0].update(name="encoder.nowhere.dense"),
        "no-model-class": lambda m: m.pop("model_class"),
    }
    _edit_manifest(p, edits[case])
    with pytest.raises(ValueError, match=pattern) as e:
        C.load_compressed(p)
    assert str(p / MANIFEST) in str(e.value)


def test_checkpoints_still_round_trip(tmp_path):
    """Checkpoints go through the same manifest: a resumed offline run loads its stage."""
    cfg = dict(method="lowrank", schedule="staged", stage_steps=1, final_steps=0, batch_size=4)
    ck = tmp_path / "ck"
    m1, _ = C.compress(tiny_model("bert"), cfg, tiny_data(), checkpoint_dir=ck)
    m2, _ = C.compress(tiny_model("bert"), cfg, tiny_data(), checkpoint_dir=ck, resume=ck)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
