"""``fastfactor compress --method autoencoder --ae-form ... --scope ...`` end to end: the bundled
all-MiniLM-L6-v2 with a labelled CSV (tiny sizes), the tiny saved BERT, and the option errors."""

import json

import pytest
import torch

import fastfactor.compress as C
from fastfactor.cli import main


def _minilm():
    try:
        from fastfactor.compress.demo import minilm_path

        return minilm_path()
    except RuntimeError as e:
        pytest.skip(str(e))


def _write_csv(d):
    words = ("The cat sat on the mat", "A dog ran in the park", "Rain fell over the quiet town",
             "She read the old letter twice", "They built a small wooden boat", "Music played all night long")
    rows = [(f"{words[i % 6]} again {i}", i % 2) for i in range(24)]
    (d / "train.csv").write_text("sentence,label\n" + "\n".join(f"{s},{y}" for s, y in rows) + "\n")


def test_cli_minilm_nonlinear_block_scope_end_to_end(tmp_path, capsys):
    path = _minilm()
    _write_csv(tmp_path)
    out = tmp_path / "out"
    argv = ["compress", "--model", path, "--train-file", str(tmp_path / "train.csv"), "--out", str(out),
            "--method", "autoencoder", "--ae-form", "nonlinear", "--ae-activation", "relu", "--scope", "block",
            "--ratio", "0.5", "--schedule", "offline", "--calib-batches", "2", "--batch-size", "4", "--max-length", "16",
            "--max-train", "12", "--max-eval", "6", "--ae-steps", "2", "--targets",
            r"re:encoder\.layer\.0\..*(query|key|value|dense)", "--no-progress", "--distill"]
    assert main(argv) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "block fit encoder.layer.0" in text and "block fit encoder.layer.1" not in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["method"] == "autoencoder" and rep["config"]["ae_form"] == "nonlinear"
    assert rep["config"]["scope"] == "block" and rep["params_after"] < rep["params_before"]
    info = rep["stages"][0]["init_info"]
    assert info["encoder.layer.0.attention.self.query"] == "pca (nonlinear relu, scope=block)"
    assert "encoder.layer.0 (block fit)" in info
    man = json.loads((out / "fastfactor.json").read_text())
    assert len(man["modules"]) == 6 and {e["class"] for e in man["modules"]} == {"BottleneckLinear"}
    assert man["compression"]["ae_form"] == "nonlinear"
    loaded = C.load_compressed(out)
    from transformers import AutoModel

    x = torch.randint(1000, 2000, (2, 9))
    with torch.no_grad():
        y = loaded(input_ids=x).last_hidden_state
        ref = AutoModel.from_pretrained(path)(input_ids=x).last_hidden_state
    assert torch.isfinite(y).all() and not torch.allclose(y, ref)
    again = C.load_compressed(out)
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).last_hidden_state, y)


def test_cli_tiny_bert_linear_module_scope(saved_model, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["compress", "--model", str(saved_model), "--train-file", str(saved_model / "train.csv"), "--out", str(out),
            "--method", "autoencoder", "--ae-form", "linear", "--scope", "module", "--schedule", "offline",
            "--calib-batches", "2", "--batch-size", "8", "--max-length", "16", "--ae-steps", "3", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    man = json.loads((out / "fastfactor.json").read_text())
    assert {e["class"] for e in man["modules"]} == {"LowRankLinear"} and man["compression"]["ae_form"] == "linear"


@pytest.mark.parametrize("extra,needle", [
    (["--method", "lowrank", "--scope", "block"], "--scope: only method='autoencoder' has this option"),
    (["--method", "lowrank", "--ae-form", "nonlinear"], "--ae-form: only method='autoencoder'"),
    (["--method", "autoencoder", "--scope", "block", "--calib-batches", "1"],
     "--calib-batches: expected >= 2 with scope='block'"),
    (["--method", "autoencoder", "--ae-activation", "swish"], "--ae-activation: expected one of"),
    (["--method", "autoencoder", "--ae-steps", "-2"], "--ae-steps: expected an int >= 0, got -2"),
], ids=["scope-lowrank", "form-lowrank", "block-one-batch", "activation", "steps"])
def test_cli_errors_name_the_option(saved_model, tmp_path, capsys, monkeypatch, extra, needle):
    import fastfactor.compress.cli as CC

    monkeypatch.setattr(CC, "load_hf_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    argv = ["compress", "--model", str(saved_model), "--out", str(tmp_path / "o"), "--train-file",
            str(saved_model / "train.csv"), "--schedule", "offline", "--no-progress", *extra]
    assert main(argv) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and needle in err[0], err


def test_cli_rejects_an_unknown_form(saved_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--model", str(saved_model), "--out", str(tmp_path / "o"), "--method", "autoencoder",
              "--ae-form", "deep"])
    assert "--ae-form: invalid choice: 'deep'" in capsys.readouterr().err
