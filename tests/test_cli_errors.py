"""``fastfactor compress`` errors: one line on stderr naming the option or file, before any model
loads, no traceback unless ``--debug``; Ctrl-C says how to resume."""

import pytest

import fastfactor.compress.cli as CC
from fastfactor.cli import main


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model is loaded: every check here comes first."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(CC, "load_hf_model", refuse)


def _args(saved_model, tmp_path, *extra, train=True):
    a = ["compress", "--model", str(saved_model), "--out", str(tmp_path / "o"), "--method", "lowrank",
         "--schedule", "all_at_once", "--steps", "1", "--no-progress"]
    if train:
        a += ["--train-file", str(saved_model / "train.csv")]
    return a + list(extra)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fastfactor compress: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("extra,needles", [
    (["--max-length", "0"], ["--max-length: expected an int >= 1, got 0"]),
    (["--max-length", "-5"], ["--max-length: expected an int >= 1, got -5"]),
    (["--max-length", "100000"], ["--max-length: expected at most 64 (the model's position table), got 100000"]),
    (["--max-train", "0"], ["--max-train: expected an int >= 1, got 0"]),
    (["--lr", "nan"], ["--lr: expected a finite positive learning rate, got nan"]),
    (["--lr=-1e-3"], ["--lr: expected a finite positive learning rate, got -0.001"]),
    (["--ratio", "1.5"], ["--ratio:"]),
    (["--targets", "re:["], ["--targets: invalid regular expression 're:['"]),
    (["--exclude", "re:(a"], ["--exclude: invalid regular expression 're:(a'"]),
    (["--device", "foo"], ["--device: expected cpu, cuda or cuda:N, got 'foo'"]),
    (["--device", "cuda:99"], ["--device: 'cuda:99'"]),
    (["--init", "fisher", "--calib-batches", "0"], ["--calib-batches: expected >= 1 with init='fisher'"]),
    (["--init", "bogus"], ["--init: expected one of"]),
    (["--batch-size", "0"], ["--batch-size: expected an int >= 1, got 0"]),
    (["--num-labels", "0"], ["--num-labels: expected an int >= 1, got 0"]),
    (["--model-class", "NoSuchModel"], ["--model-class: expected one of"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else "")
def test_bad_options_are_one_line_before_the_model_loads(saved_model, tmp_path, capsys, no_model, extra, needles):
    assert main(_args(saved_model, tmp_path, *extra)) == 1
    _one_line_error(capsys, *needles)


def test_debug_shows_the_traceback(saved_model, tmp_path, no_model):
    with pytest.raises(ValueError, match="--max-length"):
        main(_args(saved_model, tmp_path, "--max-length", "0", "--debug"))


@pytest.mark.parametrize("name,content,needle", [
    ("bad.json", "{not json", "bad.json"),
    ("bad.yaml", "a: [1, 2\nb: }", "bad.yaml: not valid YAML"),
    ("list.json", "[1, 2]", "list.json: expected a mapping of config fields, got list"),
    ("field.json", '{"ratio": 0.5, "nonsense": 1}', "field.json: config: unknown field(s) ['nonsense']"),
    ("lr.json", '{"lr": -1}', "lr.json: lr: expected a positive number, got -1"),
], ids=["json", "yaml", "not-a-mapping", "unknown-field", "bad-value"])
def test_garbled_config_names_the_file(saved_model, tmp_path, capsys, no_model, name, content, needle):
    cfg = tmp_path / name
    cfg.write_text(content)
    assert main(_args(saved_model, tmp_path, "--config", str(cfg))) == 1
    line = _one_line_error(capsys, "--config", needle)
    if name == "bad.json":
        assert "not valid JSON" in line and "line 1" in line


def test_option_overriding_a_config_is_named_as_the_option(saved_model, tmp_path, capsys, no_model):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"method": "lowrank", "init": "fisher"}')
    assert main(_args(saved_model, tmp_path, "--config", str(cfg), "--calib-batches", "0")) == 1
    _one_line_error(capsys, "--calib-batches: expected >= 1 with init='fisher'")


@pytest.mark.parametrize("name,content,needle", [
    ("empty.csv", b"", "empty.csv is empty"),
    ("header.csv", b"sentence,label\n", "header.csv has no rows"),
    ("blank.csv", b"\n\n  \n", "blank.csv holds only whitespace"),
    ("garbled.json", b'{"sentence": "a", "label": 1}\n{garbled\n', "could not read"),
    ("ragged.csv", b"sentence,label\nw1 w2,1\nw3,0,7,8,9\n", "could not read"),
    ("latin1.csv", b"sentence,label\ncaf\xe9 w1,1\nw2,0\n", "is not UTF-8 text (byte 0xe9 on line 2)"),
    ("data.txt", b"sentence,label\nw1,1\n", "expected a .csv, .tsv, .json, .jsonl or .parquet file"),
], ids=["empty", "header-only", "whitespace", "garbled-json", "ragged-csv", "non-utf8", "extension"])
@pytest.mark.parametrize("option", ["--train-file", "--eval-file"])
def test_bad_data_files_are_named(saved_model, tmp_path, capsys, no_model, option, name, content, needle):
    bad = tmp_path / name
    bad.write_bytes(content)
    if option == "--train-file":
        args = _args(saved_model, tmp_path, "--train-file", str(bad), train=False)
    else:
        args = _args(saved_model, tmp_path, "--eval-file", str(bad))
    assert main(args) == 1
    line = _one_line_error(capsys, needle, name)
    assert line.split("error: ")[1].startswith(option), line


def test_missing_data_file_and_model_folder(saved_model, tmp_path, capsys, no_model):
    assert main(_args(saved_model, tmp_path, "--train-file", str(tmp_path / "nope.csv"), train=False)) == 1
    _one_line_error(capsys, "--train-file: expected an existing", "nope.csv")
    (tmp_path / "m").mkdir()
    args = _args(saved_model, tmp_path)
    args[args.index("--model") + 1] = str(tmp_path / "m")
    assert main(args) == 1
    _one_line_error(capsys, "--model:", "has no config.json")


def test_unexpected_errors_are_one_line_with_a_hint(saved_model, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(CC, "load_hf_model", boom)
    assert main(_args(saved_model, tmp_path, "--schedule", "offline")) == 1
    _one_line_error(capsys, "RuntimeError: something broke", "rerun with --debug")


def test_ctrl_c_says_how_to_resume(saved_model, tmp_path, capsys, monkeypatch):
    import fastfactor.compress.driver as drv

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(drv, "compress", interrupted)
    assert main(_args(saved_model, tmp_path, "--schedule", "offline")) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and str(tmp_path / "o") in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    with pytest.raises(KeyboardInterrupt):
        main(_args(saved_model, tmp_path, "--schedule", "offline", "--debug", "--overwrite"))
