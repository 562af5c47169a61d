"""Data loading from local files, fine-tuning and distillation loops."""

import copy
import json

import pytest
import torch

from fastfactor.compress._tiny import tiny_data, tiny_model
from fastfactor.train import Evaluator, Objective, TaskData, finetune, load_task_data
from fastfactor.train.data import iterate
from fastfactor.train.loop import distill_loss, mean_pool


class _Tok:
    """A whitespace tokenizer with the Hugging Face call signature (enough for TaskData)."""

    def __call__(self, a, b=None, truncation=True, max_length=8, padding="max_length", return_tensors="pt"):
        rows = [x.split() + (["|"] + y.split() if b is not None else []) for x, y in zip(a, b or a)]
        ids = torch.zeros(len(rows), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            r = r[:max_length]
            ids[i, : len(r)] = torch.tensor([3 + sum(map(ord, w)) % 90 for w in r])
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_load_local_files(tmp_path, fmt):
    import datasets

    rows = [{"sentence1": f"a b c {i}", "sentence2": "d e", "label": i % 3} for i in range(20)]
    path = tmp_path / f"t.{fmt}"
    ds = datasets.Dataset.from_list(rows)
    getattr(ds, {"csv": "to_csv", "json": "to_json", "parquet": "to_parquet"}[fmt])(str(path))
    td = load_task_data(_Tok(), train_file=str(path), max_length=8)
    assert td.task_type == "classification" and td.num_labels == 3
    assert td.train["input_ids"].shape[0] == 18 and td.eval["input_ids"].shape[0] == 2  # 10% held out
    assert int(td.train["attention_mask"][0].sum()) == 7  # pair joined: "a b c i | d e"
    un = load_task_data(_Tok(), train_file=str(path), eval_file=str(path), unlabelled=True)
    assert un.task_type == "unlabelled" and "labels" not in un.train
    with pytest.raises(ValueError, match="text_fields: could not guess"):
        (tmp_path / "x.csv").write_text("foo,bar\n1,2\n")
        load_task_data(_Tok(), train_file=str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="train_file: expected an existing"):
        load_task_data(_Tok(), train_file=str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="task: expected a GLUE task"):
        load_task_data(_Tok(), task="glue-nothing")


def test_regression_labels_and_batches(tmp_path):
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps({"text": f"x y {i}", "label": i / 4}) for i in range(12)))
    td = load_task_data(_Tok(), train_file=str(tmp_path / "r.jsonl"), eval_file=str(tmp_path / "r.jsonl"))
    assert td.task_type == "regression" and td.train["labels"].dtype == torch.float32
    bs = list(iterate(td.train, 5))
    assert [b["input_ids"].shape[0] for b in bs] == [5, 5, 2]
    assert all(b["input_ids"].shape[1] == 3 for b in bs)  # trimmed to the longest sequence


@pytest.mark.parametrize("labels", [3, -1, 0], ids=["classification", "regression", "distill"])
def test_finetune_reduces_loss(labels):
    family = "bert" if labels == 0 else "bert_cls"
    model = tiny_model(family, num_labels=3 if labels > 0 else 1)
    data = tiny_data(n_train=16, labels=labels)
    if labels == 0:  # a student that differs from its teacher
        teacher = copy.deepcopy(model)
        with torch.no_grad():
            for p in model.encoder.parameters():
                p.add_(0.05 * torch.randn_like(p))
    else:
        teacher = None
    obj = Objective.build(model, data, teacher=teacher)
    assert obj.kind == ("distill" if labels == 0 else "task")
    batch = next(iterate(data.train, 16))
    with torch.no_grad():
        before = float(obj.loss(model, batch))
    emb = model.get_input_embeddings().weight.detach().clone()
    finetune(model, obj, data, steps=12, lr=3e-3, batch_size=16, warmup_ratio=0.2, train_embeddings=False)
    with torch.no_grad():
        assert float(obj.loss(model, batch)) < before
    assert torch.equal(model.get_input_embeddings().weight, emb)  # frozen
    assert model.get_input_embeddings().weight.requires_grad  # and restored afterwards


def test_distill_losses_and_evaluator():
    model = tiny_model("gpt2")
    data = tiny_data()
    obj = Objective.build(model, data)
    b = next(iterate(data.train, 4))
    assert float(obj.loss(model, b)) == pytest.approx(0.0, abs=1e-6)  # student == teacher
    ev = Evaluator(data, reference=obj.teacher)
    assert ev.primary == "agreement" and ev(model)["agreement"] == 1.0
    h = torch.randn(2, 3, 4)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(mean_pool(h, m)[1], h[1, 0])

    class O:
        def __init__(self, h):
            self.last_hidden_state, self.logits = h, None

    # padding tokens do not count in the hidden-state MSE
    h2 = h.clone()
    h2[0, 2] += 100.0
    assert float(distill_loss(O(h), O(h2), m, "mse")) == 0.0
    with pytest.raises(ValueError, match="distill_loss: 'kl' needs a model that returns logits"):
        distill_loss(O(h), O(h2), m, "kl")
    with pytest.raises(ValueError, match="task_type"):
        TaskData(data.train, data.eval, "ranking")


def test_glue_without_hub_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    def offline(*a, **k):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="task: could not load GLUE 'sst2'.*--train-file"):
        load_task_data(_Tok(), task="SST-2")


def test_finetune_snapshot_and_resume_continue_bitwise():
    """``on_step``'s snapshot after step k, given back as ``resume=`` to a loop started from the
    model as it was then (and the RNG state), reproduces the remaining steps bitwise."""
    data = tiny_data(labels=2)
    base = tiny_model("bert_cls", num_labels=2, intermediate=36).train()
    obj = Objective.build(base, data, "task")
    ref = copy.deepcopy(base)
    torch.manual_seed(0)
    out_ref = finetune(ref, obj, data, 5, lr=1e-3, batch_size=8, seed=2)

    saved = {}

    def on_step(done, snapshot):
        if done == 2:
            saved.update(snapshot(), model=copy.deepcopy(part.state_dict()), rng=torch.get_rng_state())
            raise KeyboardInterrupt  # the run dies right after its checkpoint

    part = copy.deepcopy(base)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        finetune(part, obj, data, 5, lr=1e-3, batch_size=8, seed=2, on_step=on_step)
    assert saved["step"] == 2 and len(saved["losses"]) == 2 and saved["scheduler"]["last_epoch"] == 2
    again = copy.deepcopy(base)
    again.load_state_dict(saved["model"])
    torch.set_rng_state(saved["rng"])
    state = {k: saved[k] for k in ("step", "steps", "losses", "optimizer", "scheduler")}
    out = finetune(again, obj, data, 5, lr=1e-3, batch_size=8, seed=2, resume=state)
    assert out == out_ref
    for k, v in ref.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_finetune_bad_resume_and_parallel_are_named():
    data = tiny_data(labels=2)
    model = tiny_model("bert_cls", num_labels=2, intermediate=36)
    obj = Objective.build(model, data, "task")
    with pytest.raises(ValueError, match=r"parallel: expected one of \('auto', 'ddp', 'fsdp'\), got 'zero'"):
        finetune(model, obj, data, 2, parallel="zero")
    with pytest.raises(ValueError, match=r"resume: expected a fine-tuning state with 'optimizer'"):
        finetune(model, obj, data, 2, resume={"step": 1, "losses": [1.0]})
    bad = {"step": 3, "steps": 4, "losses": [1.0] * 3, "optimizer": {}, "scheduler": {}}
    with pytest.raises(ValueError, match=r"resume: a state at step 3 of 4 .* does not continue a fine-tune of 2 steps"):
        finetune(model, obj, data, 2, resume=bad)
