"""The task+distill objective, per-phase learning rates and the dense reference (issue 18).

* the combined loss ``w_task·CE + w_kd·KL_T·T² + w_hid·MSE(hidden)`` against a float64 hand
  computation on a tiny classifier (teacher perturbed so every term is non-zero);
* gradients of the combined loss reach every factor of every compressed module, and the driver's
  teacher is the uncompressed model as it was before compression, frozen;
* the dense reference trains on exactly the batches of the compressed run, in the same order, with
  the same steps and per-phase learning rates (recorded), and does not perturb the compressed run;
* bad weights (negative, NaN, inf, all zero, not a number) are clear errors before any weight of
  the model is touched;
* resume (mid-stage and mid-fine-tune) stays bitwise with the new objective and schedules.
"""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fastfactor.compress as C
import fastfactor.train.loop as L
from fastfactor.compress import checkpoint as CK
from fastfactor.compress._tiny import tiny_data, tiny_model
from fastfactor.compress.config import CompressionConfig
from fastfactor.compress.io import compressed_modules


def _perturbed(model, seed=1, scale=0.05):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


@pytest.mark.parametrize("weights", [(1.0, 1.0, 0.0), (0.7, 0.3, 0.25), (0.0, 2.0, 1.5), (1.3, 0.0, 0.0)])
def test_combined_loss_matches_hand_computation(weights):
    wt, wk, wh = weights
    T = 3.0
    student = tiny_model("bert_cls", seed=3, num_labels=3).double()
    teacher = _perturbed(student).double()
    data = tiny_data(n_train=9, labels=3, seed=4)
    batch = L.select(data.train, torch.arange(9))
    obj = L.Objective.build(student, data, "task+distill", teacher=teacher, task_weight=wt, distill_weight=wk,
                            hidden_weight=wh, temperature=T)
    got = obj.loss(student, batch)

    mask = batch["attention_mask"].double()
    with torch.no_grad():
        so = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        to = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    zs, zt, y = so.logits.double(), to.logits.double(), batch["labels"]
    # cross-entropy by hand: mean_i (logsumexp(z_i) − z_i[y_i])
    ce = sum(math.log(sum(math.exp(v) for v in zs[i].tolist())) - float(zs[i, y[i]]) for i in range(len(y))) / len(y)

    def softmax(row):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    for i in range(len(y)):
        p, q = softmax(zt[i].tolist()), softmax(zs[i].tolist())
        kl += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    kl = kl / len(y) * T * T
    hs, ht = so.hidden_states[-1].double(), to.hidden_states[-1].double()
    per_tok = ((hs - ht) ** 2).mean(-1)
    hid = float((per_tok * mask).sum() / mask.sum())
    want = wt * ce + (wk * kl if wk else 0.0) + (wh * hid if wh else 0.0)
    assert ce > 0.1 and kl > 1e-4 and hid > 1e-4  # every term is really exercised
    # the losses are taken in float32 (``.float()`` on the outputs): float32 rounding, not more
    assert abs(float(got.detach()) - want) <= 2e-6 * max(1.0, abs(want)), (float(got), want)
    terms = obj.terms(student, batch)
    assert set(terms) == {"task"} | ({"distill"} if wk else set()) | ({"hidden"} if wh else set())


def test_plain_objectives_unchanged_by_weights_of_one():
    """``task`` and ``distill`` with default weights are bitwise the losses they were before."""
    m = tiny_model("bert_cls", num_labels=3)
    t = _perturbed(m)
    data = tiny_data(labels=3)
    b = L.select(data.train, torch.arange(8))
    task = L.Objective.build(m, data, "task")
    assert torch.equal(task.loss(m, b), L.task_loss(m(**L.model_inputs(m, b, "cpu")), b["labels"], "classification"))
    dist = L.Objective.build(m, data, "distill", teacher=t)
    inputs = L.model_inputs(m, b, "cpu")
    assert torch.equal(dist.loss(m, b), L.distill_loss(m(**inputs), t(**inputs), inputs["attention_mask"]))


def test_gradients_reach_every_factor():
    model = tiny_model("bert_cls", num_labels=3, intermediate=36)
    original = copy.deepcopy(model)
    data = tiny_data(labels=3)
    C.compress(model, dict(method="lowrank", ratio=0.5, schedule="offline"), data)
    model.train()
    mods = compressed_modules(model)
    assert len(mods) == 12
    obj = L.Objective.build(model, data, "task+distill", teacher=original, hidden_weight=0.5)
    obj.loss(model, L.select(data.train, torch.arange(16))).backward()
    for name, mod in mods:
        params = list(mod.named_parameters())
        assert params, name
        for pname, p in params:
            if not p.requires_grad:
                continue
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname}"
            assert p.grad.abs().sum() > 0, f"{name}.{pname}: zero gradient"
    assert all(p.grad is None for p in original.parameters())  # the teacher is frozen


def test_driver_teacher_is_the_uncompressed_model(monkeypatch):
    model = tiny_model("bert_cls", num_labels=3, intermediate=36)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    real = L.Objective.build.__func__

    def spy(cls, *a, **k):
        obj = real(cls, *a, **k)
        seen.setdefault("obj", obj)
        return obj

    monkeypatch.setattr(L.Objective, "build", classmethod(spy))
    C.compress(model, dict(method="lowrank", ratio=0.5, schedule="all_at_once", final_steps=2, batch_size=8,
                           objective="task+distill"), tiny_data(labels=3))
    obj = seen["obj"]
    assert obj.kind == "task+distill" and obj.teacher is not None and obj.teacher is not model
    assert not compressed_modules(obj.teacher)
    t_state = obj.teacher.state_dict()
    assert all(torch.equal(t_state[k], v) for k, v in before.items())
    assert not any(p.requires_grad for p in obj.teacher.parameters())


# --------------------------------------------------------------------------------------------
# per-phase learning rates
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
def test_lr_schedule_follows_lr_factor(decay):
    steps, warm, lr = 7, 0.3, 3e-3
    want = [lr * v for v in ([1 / 3, 2 / 3, 1.0] + {
        "linear": [4 / 4 * (4 / 4), 3 / 4, 2 / 4, 1 / 4],
        "cosine": [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)],
        "constant": [1.0] * 4}[decay])]
    got_f = [lr * L.lr_factor(s, steps, warm, decay) for s in range(steps)]
    assert got_f == pytest.approx(want, rel=1e-12)
    model = tiny_model("bert_cls", num_labels=3)
    data = tiny_data(labels=3)
    lrs = []
    L.finetune(model, L.Objective.build(model, data, "task"), data, steps, lr=lr, warmup_ratio=warm, decay=decay,
               batch_size=8, on_step=lambda done, snap: lrs.append(snap()["scheduler"]["_last_lr"][0]))
    # after step k (0-based) the scheduler holds the rate of step k + 1
    assert lrs[:-1] == pytest.approx(want[1:], rel=1e-12)
    with pytest.raises(ValueError, match="decay: expected one of"):
        L.finetune(model, L.Objective.build(model, data, "task"), data, 2, decay="exp")


def _record(monkeypatch):
    """Record every fine-tune call (its schedule kwargs) and every batch its objective sees."""
    calls, batches = [], []
    real_ft, real_loss = L.finetune, L.Objective.loss

    def ft(model, objective, data, steps, **kw):
        calls.append((objective.kind, steps, {k: kw[k] for k in ("seed", "lr", "warmup_ratio", "decay", "batch_size")}))
        return real_ft(model, objective, data, steps, **kw)

    def loss(self, model, batch):
        batches.append((self.kind, batch["input_ids"].clone(), batch["labels"].clone()))
        return real_loss(self, model, batch)

    monkeypatch.setattr(L, "finetune", ft)
    monkeypatch.setattr(L.Objective, "loss", loss)
    return calls, batches


@pytest.mark.parametrize("schedule", ["staged", "all_at_once"])
def test_dense_reference_same_batches_steps_and_schedule(schedule, monkeypatch):
    cfg = dict(method="lowrank", ratio=0.5, schedule=schedule, stage_unit="block", stage_steps=2, final_steps=3,
               batch_size=8, seed=3, objective="task+distill", stage_lr=2e-3, final_lr=5e-4,
               stage_decay="constant", final_decay="cosine", final_warmup_ratio=0.0, dense_reference=True)
    calls, batches = _record(monkeypatch)
    model = tiny_model("bert_cls", num_labels=3, intermediate=36)
    model.train()
    _, rep = C.compress(model, cfg, tiny_data(labels=3))
    ref_calls = [c for c in calls if c[0] == "task"]
    run_calls = [c for c in calls if c[0] == "task+distill"]
    n_phases = (2 + 1) if schedule == "staged" else 1
    assert len(ref_calls) == len(run_calls) == n_phases
    assert [c[1:] for c in ref_calls] == [c[1:] for c in run_calls]
    if schedule == "staged":
        assert run_calls[0][2]["lr"] == 2e-3 and run_calls[0][2]["decay"] == "constant"
        assert run_calls[0][2]["warmup_ratio"] == 0.1
    assert run_calls[-1][2]["lr"] == 5e-4 and run_calls[-1][2]["decay"] == "cosine"
    assert run_calls[-1][2]["warmup_ratio"] == 0.0
    ref_b = [b for b in batches if b[0] == "task"]
    run_b = [b for b in batches if b[0] == "task+distill"]
    steps = sum(c[1] for c in run_calls)
    assert len(ref_b) == len(run_b) == steps == rep.dense_reference["steps"]
    for (_, i1, y1), (_, i2, y2) in zip(ref_b, run_b):
        assert torch.equal(i1, i2) and torch.equal(y1, y2)
    assert len({tuple(b[1][:, 0].tolist()) for b in run_b}) > 1  # the batches really differ from step to step
    # the report: the reference's metric and the points lost
    pm = rep.primary_metric
    assert pm in rep.dense_reference["metrics"]
    d = rep.to_dict()
    assert d["points_lost"] == pytest.approx(100 * (rep.dense_reference["metrics"][pm] - rep.metrics_after[pm]))
    table = rep.summary_table()
    assert "points lost to compression" in table and f"dense, same {steps} steps" in table


def test_dense_reference_leaves_the_compressed_run_bitwise_unchanged():
    cfg = dict(method="lowrank", ratio=0.5, schedule="staged", stage_steps=1, final_steps=2, batch_size=8, seed=2,
               objective="task+distill")
    runs = []
    for ref in (False, True):
        m = tiny_model("bert_cls", num_labels=3, intermediate=36)
        m.train()  # dropout: the torch RNG matters
        runs.append(C.compress(m, dict(cfg, dense_reference=ref), tiny_data(labels=3)))
    (m0, r0), (m1, r1) = runs
    s0, s1 = m0.state_dict(), m1.state_dict()
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert r0.dense_reference == {} and r1.dense_reference["steps"] == 4
    assert "points lost" not in r0.summary_table()


def test_dense_reference_needs_labels():
    model = tiny_model("bert", intermediate=36)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="dense_reference: needs labelled data"):
        C.compress(model, dict(method="lowrank", schedule="all_at_once", final_steps=1, dense_reference=True),
                   tiny_data())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# --------------------------------------------------------------------------------------------
# bad weights
# --------------------------------------------------------------------------------------------

BAD = [
    (dict(task_weight=-0.5), ValueError, r"task_weight: expected a finite number >= 0, got -0.5"),
    (dict(distill_weight=float("nan")), ValueError, r"distill_weight: expected a finite number >= 0, got nan"),
    (dict(hidden_weight=float("inf")), ValueError, r"hidden_weight: expected a finite number >= 0, got inf"),
    (dict(task_weight=0.0, distill_weight=0.0), ValueError,
     r"task_weight/distill_weight/hidden_weight: objective 'task\+distill' needs at least one of these loss weights > 0"),
    (dict(objective="distill", distill_weight=0, hidden_weight=0), ValueError,
     r"distill_weight/hidden_weight: objective 'distill' needs at least one"),
    (dict(objective="task", task_weight=0), ValueError, r"task_weight: objective 'task' needs at least one"),
    (dict(temperature=0.0), ValueError, r"temperature: expected a finite number > 0, got 0.0"),
    (dict(temperature=float("nan")), ValueError, r"temperature: expected a finite number >= 0, got nan"),
    (dict(task_weight="1"), TypeError, r"task_weight: expected a finite number >= 0, got str '1'"),
    (dict(distill_weight=True), TypeError, r"distill_weight: expected a finite number >= 0, got bool True"),
    (dict(stage_lr=-1e-4), ValueError, r"stage_lr: expected a positive number, got -0.0001"),
    (dict(final_warmup_ratio=1.0), ValueError, r"final_warmup_ratio: expected a fraction in \[0, 1\), got 1.0"),
    (dict(final_decay="step"), ValueError, r"final_decay: expected one of"),
]


@pytest.mark.parametrize("bad,exc,msg", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_weights_are_clear_errors_before_anything(bad, exc, msg):
    model = tiny_model("bert_cls", num_labels=3, intermediate=36)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dict(dict(method="lowrank", schedule="all_at_once", final_steps=1, objective="task+distill"), **bad)
    with pytest.raises(exc, match=msg):
        CompressionConfig(**cfg)
    with pytest.raises(exc, match=msg):
        C.compress(model, cfg, tiny_data(labels=3))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not compressed_modules(model)


def test_bad_weights_in_objective_build_and_objective_names():
    model = tiny_model("bert_cls", num_labels=3)
    data = tiny_data(labels=3)
    with pytest.raises(ValueError, match="task_weight: expected a finite number >= 0, got -1"):
        L.Objective.build(model, data, "task+distill", task_weight=-1)
    with pytest.raises(ValueError, match="objective: expected 'auto' or one of"):
        L.Objective.build(model, data, "task+kd")
    with pytest.raises(ValueError, match=r"objective: 'task\+distill' needs labelled data"):
        L.Objective.build(model, tiny_data(), "task+distill")
    with pytest.raises(ValueError, match=r"objective: expected one of .*task\+distill.*got 'both'"):
        CompressionConfig(objective="both")


# --------------------------------------------------------------------------------------------
# CLI flags
# --------------------------------------------------------------------------------------------

def test_cli_flags_build_the_config():
    from fastfactor.compress import cli

    ap = argparse.ArgumentParser()
    cli.add_subparser(ap.add_subparsers())
    args = ap.parse_args([
        "compress", "--model", "m", "--out", "o", "--objective", "task+distill", "--task-weight", "0.5",
        "--distill-weight", "2", "--hidden-weight", "0.1", "--temperature", "4", "--stage-lr", "3e-4",
        "--final-lr", "1e-4", "--final-decay", "cosine", "--stage-warmup-ratio", "0", "--dense-reference",
    ])
    cfg = cli.build_config(args)
    assert (cfg.objective, cfg.task_weight, cfg.distill_weight, cfg.hidden_weight, cfg.temperature) == (
        "task+distill", 0.5, 2.0, 0.1, 4.0)
    assert (cfg.stage_lr, cfg.final_lr, cfg.final_decay, cfg.stage_warmup_ratio, cfg.dense_reference) == (
        3e-4, 1e-4, "cosine", 0.0, True)
    assert cfg.phase("final")["lr"] == 1e-4 and cfg.phase("stage", 2) == dict(
        steps=cfg.stage_steps, seed=cfg.seed + 2, lr=3e-4, warmup_ratio=0.0, decay="linear")
    plain = cli.build_config(ap.parse_args(["compress", "--model", "m", "--out", "o"]))
    assert plain == CompressionConfig()
    with pytest.raises(ValueError, match="--distill drops the labels"):
        cli.build_config(ap.parse_args(["compress", "--model", "m", "--out", "o", "--distill", "--objective", "task"]))
    with pytest.raises(ValueError, match="--distill-weight: expected a finite number >= 0, got -1.0"):
        cli.build_config(ap.parse_args(["compress", "--model", "m", "--out", "o", "--distill-weight", "-1"]))


# --------------------------------------------------------------------------------------------
# resume stays bitwise
# --------------------------------------------------------------------------------------------

def _strip(report: dict) -> dict:
    r = dict(report)
    r.pop("seconds", None)
    r["stages"] = [{k: v for k, v in s.items() if k != "seconds"} for s in r["stages"]]
    if r.get("dense_reference"):
        r["dense_reference"] = {k: v for k, v in r["dense_reference"].items() if k != "seconds"}
    return r


RESUME_CFG = dict(method="lowrank", init="fisher", ratio=0.5, schedule="staged", stage_unit="block", stage_steps=3,
                  final_steps=3, calib_batches=2, batch_size=8, seed=7, objective="task+distill", task_weight=0.6,
                  distill_weight=1.4, hidden_weight=0.3, temperature=1.5, stage_lr=2e-3, final_lr=4e-4,
                  stage_decay="cosine", final_warmup_ratio=0.0, dense_reference=True)


def _run(**kw):
    model = tiny_model("bert_cls", num_labels=3, intermediate=36)
    model.train()
    return C.compress(model, RESUME_CFG, tiny_data(labels=3), **kw)


@pytest.mark.parametrize("fault,every", [("1", 0), ("1@2", 1)], ids=["mid-stage", "mid-fine-tune"])
def test_resume_bitwise_with_task_distill(fault, every, tmp_path, monkeypatch):
    m_ref, r_ref = _run()
    ck = tmp_path / "ck"
    monkeypatch.setenv(CK.TEST_FAULT_ENV, f"{fault}:raise")
    with pytest.raises(CK.InjectedFault):
        _run(checkpoint_dir=ck, checkpoint_every=every)
    monkeypatch.delenv(CK.TEST_FAULT_ENV)
    last = CK.list_checkpoints(ck)[-1]
    assert ("-step-" in last) == bool(every), last
    m_res, r_res = _run(checkpoint_dir=ck, resume=ck, checkpoint_every=every)
    a, b = m_ref.state_dict(), m_res.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _strip(r_ref.to_dict()) == _strip(r_res.to_dict())
    assert r_ref.dense_reference["steps"] == 2 * 3 + 3


def test_cli_end_to_end_task_distill_dense_reference(saved_model, tmp_path, capsys):
    import json

    from fastfactor.cli import main

    out = tmp_path / "out"
    rc = main([
        "compress", "--model", str(saved_model), "--method", "lowrank", "--ratio", "0.5", "--schedule", "staged",
        "--train-file", str(saved_model / "train.csv"), "--eval-file", str(saved_model / "eval.json"),
        "--steps", "2", "--stage-steps", "1", "--batch-size", "8", "--max-length", "16", "--seed", "3",
        "--objective", "task+distill", "--hidden-weight", "0.2", "--final-lr", "5e-4", "--dense-reference",
        "--out", str(out), "--no-progress",
    ])
    assert rc == 0
    text = capsys.readouterr().out
    assert "points lost to compression" in text and "dense reference: 4 steps" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["objective"] == "task+distill" and rep["config"]["final_lr"] == 5e-4
    assert rep["dense_reference"]["steps"] == 4 and rep["points_lost"] is not None


def test_checkpoint_from_before_the_new_fields_is_compared_with_their_old_values():
    """A checkpoint config without the issue-18 fields reads as the values runs used then: the
    same settings resume; a changed one (the new stage_lr default) is named."""
    from fastfactor.compress.config import LEGACY_DEFAULTS
    from fastfactor.compress.resume import check_compatible

    now = CompressionConfig(stage_lr=None).to_dict()
    old = {k: v for k, v in now.items() if k not in LEGACY_DEFAULTS}
    state = {"_path": "/ck/stage-0000", "config": old, "fingerprint": {"model": "m", "data": "d"}, "num_stages": 2,
             "rng": [{}]}
    check_compatible(state, now, {"model": "m", "data": "d"}, 2, 1)
    with pytest.raises(ValueError, match=r"another compression config \(stage_lr: checkpoint None, now 5e-05\)"):
        check_compatible(state, CompressionConfig().to_dict(), {"model": "m", "data": "d"}, 2, 1)
    with pytest.raises(ValueError, match=r"task_weight: checkpoint 1.0, now 0.5"):
        check_compatible(state, CompressionConfig(stage_lr=None, task_weight=0.5).to_dict(),
                         {"model": "m", "data": "d"}, 2, 1)
