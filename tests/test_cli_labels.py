"""Labelled data from ``fastfactor compress``: model class and head, ``--num-labels`` (or inferred),
text labels mapped to ids (the map saved), labels checked before the model loads, a missing
``--label-field`` an error, non-integer labels refused on a classification head."""

import json

import pytest
import torch

import fastfactor.compress.cli as CC
from fastfactor.cli import main
from fastfactor.train.data import label_spec

from conftest import TINY_WORDS


@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    """A tiny ``BertModel`` folder (no head, ``architectures: [BertModel]``), like all-MiniLM-L6-v2."""
    from transformers import BertTokenizerFast

    from fastfactor.compress._tiny import tiny_model

    d = tmp_path_factory.mktemp("headless")
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + TINY_WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(d)
    tiny_model("bert").save_pretrained(d)
    assert json.loads((d / "config.json").read_text())["architectures"] == ["BertModel"]
    return d


def _csv(path, labels, header="sentence,label"):
    rows = [f"{TINY_WORDS[i % 50]} {TINY_WORDS[(7 * i) % 50]} {TINY_WORDS[(3 * i) % 50]},{y}" for i, y in enumerate(labels)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def _run(model, out, train, *extra, eval_file=None):
    args = ["compress", "--model", str(model), "--out", str(out), "--method", "lowrank", "--ratio", "0.5",
            "--schedule", "all_at_once", "--steps", "1", "--batch-size", "8", "--max-length", "12",
            "--train-file", str(train), "--no-progress", *extra]
    if eval_file is not None:
        args += ["--eval-file", str(eval_file)]
    return main(args)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model is loaded (the checks must come first)."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(CC, "load_hf_model", refuse)


def test_text_labels_on_a_headless_model_create_a_head_and_save_the_map(headless, tmp_path, capsys):
    train = _csv(tmp_path / "train.csv", ["pos", "neg", "neutral"] * 8)
    dev = _csv(tmp_path / "dev.csv", ["neg", "pos", "neutral", "pos"])
    out = tmp_path / "out"
    assert _run(headless, out, train, eval_file=dev) == 0
    text = capsys.readouterr().out
    assert "BertForSequenceClassification, a new classification head for 3 classes (0=neg, 1=neutral, 2=pos)" in text
    assert "classifier.weight" in text  # the newly initialised weights are named
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert cfg["label2id"] == {"neg": 0, "neutral": 1, "pos": 2}
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["labels"]["num_labels"] == 3 and rep["labels"]["id2label"]["2"] == "pos"
    assert rep["primary_metric"] == "accuracy" and 0.0 <= rep["metrics_after"]["accuracy"] <= 1.0
    from fastfactor.compress import load_compressed

    m = load_compressed(out)
    with torch.no_grad():
        assert m(input_ids=torch.tensor([[2, 9, 10, 3]])).logits.shape == (1, 3)


def test_integer_labels_infer_or_take_num_labels(headless, tmp_path, capsys):
    train = _csv(tmp_path / "train.csv", [0, 1, 2, 1] * 6)
    assert _run(headless, tmp_path / "a", train, "--schedule", "offline") == 0
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert len(cfg["id2label"]) == 3
    assert _run(headless, tmp_path / "b", train, "--schedule", "offline", "--num-labels", "5") == 0
    assert len(json.loads((tmp_path / "b" / "config.json").read_text())["id2label"]) == 5
    assert "5 classes" in capsys.readouterr().out


def test_regression_only_when_asked(headless, tmp_path, no_model, capsys):
    train = _csv(tmp_path / "train.csv", [0.5, 1.5, 2.0, 0.25] * 6)
    assert _run(headless, tmp_path / "o", train) == 1
    err = capsys.readouterr().err
    assert "non-integer label 0.5 in train.csv row 1, column 'label'" in err and "--task-type regression" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_regression_head_when_asked(headless, tmp_path):
    train = _csv(tmp_path / "train.csv", [0.5, 1.5, 2.0, 0.25] * 6)
    assert _run(headless, tmp_path / "o", train, "--task-type", "regression") == 0
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["problem_type"] == "regression" and len(cfg["id2label"]) == 1
    assert json.loads((tmp_path / "o" / "report.json").read_text())["primary_metric"] == "pearson"


@pytest.mark.parametrize("labels,extra,message", [
    ([0, 1, 2, 1] * 6, [], "class id 2 in train.csv row 3, column 'label' is out of range for 2 classes (the model's head"),
    ([0, 1, 1, 0] * 6, ["--num-labels", "1", "--task-type", "classification"], "--num-labels: 1 means a regression head"),
    ([0, 1, -1, 0] * 6, [], "expected class ids >= 0, got -1 in train.csv row 3"),
    ([0, 1, "", 0] * 6, [], "missing label in train.csv row 3, column 'label'"),
    (["neg", 1, "pos", 0] * 6, [], "mixed text and numeric labels"),
    (["neg", "pos", "x", "pos"] * 6, [], "2 classes, but the data have 3 distinct labels"),
    ([0, 1, 1, 0] * 6, ["--label-field", "gold"], "train.csv has no column 'gold' (columns ['sentence', 'label'])"),
], ids=["out-of-range", "num-labels-1-classification", "negative", "missing", "mixed", "too-many-texts", "no-column"])
def test_bad_labels_are_named_before_the_model_loads(saved_model, tmp_path, no_model, capsys, labels, extra, message):
    train = _csv(tmp_path / "train.csv", labels)
    assert _run(saved_model, tmp_path / "o", train, *extra) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_out_of_range_label_in_the_eval_file(saved_model, tmp_path, no_model, capsys):
    train = _csv(tmp_path / "train.csv", [0, 1] * 10)
    dev = tmp_path / "dev.jsonl"
    dev.write_text('{"sentence": "w1 w2", "label": 1}\n{"sentence": "w3", "label": 7}\n')
    assert _run(saved_model, tmp_path / "o", train, eval_file=dev) == 1
    assert "class id 7 in dev.jsonl row 2, column 'label'" in capsys.readouterr().err


def test_num_labels_replaces_a_head_of_another_size(saved_model, tmp_path, capsys):
    train = _csv(tmp_path / "train.csv", [0, 1, 2, 1] * 6)
    assert _run(saved_model, tmp_path / "o", train, "--num-labels", "3", "--schedule", "offline") == 0
    assert "newly initialised: classifier.bias, classifier.weight" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "o" / "config.json").read_text())["id2label"]) == 3


def test_no_label_column_without_label_field_distills_and_says_so(saved_model, tmp_path, capsys):
    train = tmp_path / "train.csv"
    train.write_text("sentence\n" + "\n".join(f"w{i} w{i + 1} w{i + 2}" for i in range(20)) + "\n")
    assert _run(saved_model, tmp_path / "o", train, "--schedule", "offline") == 0
    assert "no 'label' column: distilling" in capsys.readouterr().out


def test_label_spec_unit():
    s = label_spec([("a.csv", ["b", "a", "c"]), ("b.csv", ["a"])], "y")
    assert s.task_type == "classification" and s.num_labels == 3 and s.label2id == {"a": 0, "b": 1, "c": 2}
    assert s.encode(["c", "a"]).tolist() == [2, 0]
    # the model's own map is used when it covers the labels
    s = label_spec([("a.csv", ["POS", "NEG"])], "y", label2id={"NEGATIVE": 0, "POS": 1, "NEG": 2})
    assert s.encode(["POS", "NEG"]).tolist() == [1, 2] and s.num_labels == 3
    assert label_spec([("a.csv", [1.0, 0.0, "2"])], "y").num_labels == 3  # integral floats and strings are ids
    assert label_spec([("a.csv", [0.5, 1.0])], "y").task_type == "regression"  # auto (library default)
    with pytest.raises(ValueError, match=r"non-integer label 0.5 in a.csv row 1"):
        label_spec([("a.csv", [0.5, 1.0])], "y", task_type="classification")
    with pytest.raises(ValueError, match=r"missing label in a.csv row 2, column 'y'"):
        label_spec([("a.csv", [1, float("nan")])], "y")
    with pytest.raises(ValueError, match=r"regression needs numeric labels, got 'x' in b.csv row 1"):
        label_spec([("a.csv", []), ("b.csv", ["x"])], "y", task_type="regression")
