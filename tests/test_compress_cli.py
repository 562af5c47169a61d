"""``fastfactor compress`` end to end on a tiny saved BERT classifier with local csv/json data."""

import json

import pytest
import torch

from fastfactor.cli import main
from fastfactor.compress import load_compressed

@pytest.mark.parametrize("method,schedule,extra", [
    ("lowrank", "staged", ["--init", "fisher"]),
    ("lowrank", "all_at_once", ["--distill"]),
], ids=["staged-fisher-task", "all_at_once-distill"])
def test_cli_end_to_end(saved_model, tmp_path, capsys, method, schedule, extra):
    out = tmp_path / "out"
    rc = main([
        "compress", "--model", str(saved_model), "--method", method, "--ratio", "0.5", "--schedule", schedule,
        "--train-file", str(saved_model / "train.csv"), "--eval-file", str(saved_model / "eval.json"),
        "--steps", "2", "--stage-steps", "1", "--batch-size", "8", "--max-length", "16", "--seed", "3",
        "--out", str(out), "--no-progress", *extra,
    ])
    assert rc == 0
    text = capsys.readouterr().out
    assert "per stage" in text and "final report" in text and "parameters" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["method"] == method and rep["config"]["schedule"] == schedule and rep["config"]["seed"] == 3
    assert rep["params_after"] < rep["params_before"]
    assert rep["primary_metric"] == ("agreement" if "--distill" in extra else "f1")
    assert (out / "metric.png").stat().st_size > 1000
    model = load_compressed(out)
    x = torch.randint(5, 97, (2, 7))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=x).logits).all()
    man = json.loads((out / "fastfactor.json").read_text())
    assert len(man["modules"]) == 12 and man["compression"]["ratio"] == 0.5


def test_cli_errors(saved_model, tmp_path):
    with pytest.raises(SystemExit, match="give --task or --train-file"):
        main(["compress", "--model", str(saved_model), "--out", str(tmp_path / "o"), "--schedule", "staged"])
    with pytest.raises(SystemExit):  # argparse: unknown method
        main(["compress", "--model", str(saved_model), "--out", str(tmp_path / "o"), "--method", "magic"])
    # one line on stderr, exit status 1; the exception itself with --debug
    assert main(["compress", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--schedule", "offline"]) == 1
    with pytest.raises(ValueError, match="--model: expected a local model directory"):
        main(["compress", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--schedule", "offline",
              "--debug"])
