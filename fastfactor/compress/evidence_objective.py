"""Evidence for the fine-tuning objective: task vs distill vs task+distill on a labelled task.

The task (3 classes, real English text found on every machine): sentences of the Python standard
library's docstrings (module, public classes and functions, their public methods; the sentence
filter of :func:`fastfactor.compress.demo.stdlib_sentences`), labelled by the *family of the
module they document*: ``text`` (text processing and data formats: ``re``, ``json``, ``csv``,
``xml.*``, ``codecs``, ...), ``net`` (networking and internet: ``socket``, ``http.*``,
``urllib.*``, ``email.*``, ...) and ``os`` (files, processes and the system: ``os``, ``shutil``,
``pathlib``, ``subprocess``, ``tarfile``, ...) — a topic task that needs the sentence's meaning
(a sentence rarely names its module). Sentences found in two families are dropped; each class is
subsampled to the same size (seeded), and split into training and held-out sentences.

The model: the bundled all-MiniLM-L6-v2 with a classification head
(``BertForSequenceClassification``, head initialized with seed 0), fine-tuned densely first
(``--base-steps`` steps on the task, cached in ``OUT/base-*.pt``). Then, for each seed × schedule
× ratio × objective, activation-aware low-rank compression of the 36 block linears with the same
fine-tuning budget (``staged``: ``--stage-steps`` after each of the 6 block swaps + ``--final-steps``;
``all_at_once``: the same total after the swap), and for each seed × schedule the **dense
reference**: the dense model given exactly the same fine-tuning (same phases, batches, order,
learning-rate schedule; :func:`fastfactor.compress.reference.dense_reference`), so every cell
reads as "points lost to compression" at equal training.

Rows are appended to ``OUT/evidence_objective.json`` as they finish (a rerun skips rows already
there), then ``OUT/evidence_objective.md`` is rewritten. The loop is seed-major: if the run is
cut short, the first seed's grid is complete.

``python -m fastfactor.compress.evidence_objective --out DIR [--seeds 0 1] [--threads 1]``
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import os
import random
import re
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

#: module family → the modules whose docstrings give its sentences (label = index in this dict)
FAMILIES = {
    "text": (
        "string re textwrap difflib unicodedata codecs stringprep html html.parser html.entities "
        "xml.dom.minidom xml.dom.pulldom xml.sax xml.sax.handler xml.sax.saxutils xml.etree.ElementTree "
        "xml.parsers.expat json json.decoder json.encoder csv configparser tomllib pickle pickletools base64 "
        "binascii struct gettext locale shlex tokenize token keyword pprint reprlib quopri plistlib"
    ).split(),
    "net": (
        "socket ssl select selectors http http.client http.server http.cookies http.cookiejar urllib.request "
        "urllib.parse urllib.error urllib.robotparser smtplib ftplib imaplib poplib email email.message "
        "email.parser email.generator email.policy email.headerregistry email.utils email.mime.text "
        "email.header email.charset mailbox xmlrpc.client xmlrpc.server ipaddress socketserver "
        "wsgiref.simple_server wsgiref.handlers wsgiref.util wsgiref.headers webbrowser mimetypes"
    ).split(),
    "os": (
        "os os.path shutil pathlib tempfile glob fnmatch filecmp subprocess signal threading io zipfile tarfile "
        "gzip bz2 lzma stat sys platform mmap fcntl resource queue sched fileinput shelve zipimport sysconfig "
        "getpass errno pwd grp atexit faulthandler"
    ).split(),
}

OBJECTIVES = ("task", "distill", "task+distill")
SCHEDULES = ("staged", "all_at_once")
RATIOS = (0.3, 0.5)


def _sentences(doc: str):
    from .demo import doc_sentences

    return doc_sentences(doc)


def module_sentences(name: str) -> set:
    """Distinct filtered sentences of a module's docstrings (module, public classes/functions
    defined there, public methods of those classes); empty if the module cannot be imported."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules
            return set()
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == name:
                docs.append(inspect.getdoc(obj) or "")
                if inspect.isclass(obj):
                    for mn, meth in sorted(vars(obj).items()):
                        if not mn.startswith("_") and inspect.isfunction(meth):
                            docs.append(inspect.getdoc(meth) or "")
    out = set()
    for d in docs:
        out.update(_sentences(d))
    return out


def family_task(n_train: int, n_eval: int, seed: int = 0):
    """``(train_texts, train_labels, eval_texts, eval_labels, counts)``: ``n_train`` + ``n_eval``
    sentences per family (balanced), deterministic for a given Python version and ``seed``."""
    by = {}
    for fam, mods in FAMILIES.items():
        s = set()
        for m in mods:
            s |= module_sentences(m)
        by[fam] = s
    shared = set()
    fams = list(by)
    for i, a in enumerate(fams):
        for b in fams[i + 1:]:
            shared |= by[a] & by[b]
    counts = {f: len(v - shared) for f, v in by.items()}
    need = n_train + n_eval
    if min(counts.values()) < need:
        raise RuntimeError(f"sentences per family {counts}; need {need} each")
    rng = random.Random(seed)
    tr, ev = [], []
    for label, fam in enumerate(fams):
        pool = sorted(by[fam] - shared)
        rng.shuffle(pool)
        ev += [(s, label) for s in pool[:n_eval]]
        tr += [(s, label) for s in pool[n_eval:need]]
    rng.shuffle(tr)
    rng.shuffle(ev)
    return [s for s, _ in tr], [y for _, y in tr], [s for s, _ in ev], [y for _, y in ev], counts


def load_classifier(num_labels: int = 3, seed: int = 0):
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from .demo import minilm_path

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "some weights newly initialized": the head, on purpose
    model = BertForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return tok, model.eval()


def _key(r):
    return f"{r['seed']}|{r['schedule']}|{r['ratio']}|{r['objective']}|{r.get('variant', '')}"


def _label(r):
    """The schedule column: the schedule, plus the settings that differ from the defaults."""
    return r["schedule"] + (f" ({r['variant']})" if r.get("variant") else "")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def markdown(rows, base_acc=None) -> str:
    """One line per (schedule, ratio, objective): accuracy right after the last swap (mean over
    seeds; staged: after the earlier stages' fine-tunes), accuracy per seed and its mean, the dense
    reference's mean, and the mean points lost (dense reference − compressed, ×100)."""
    from .driver import format_table

    refs = {(r["seed"], _label(r)): r["accuracy"] for r in rows if r["objective"] == "dense reference"}
    cells = {}
    for r in rows:
        if r["objective"] == "dense reference":
            continue
        cells.setdefault((_label(r), r["ratio"], r["objective"]), []).append(r)
    seeds = sorted({r["seed"] for r in rows})
    labels = sorted({lab for lab, _, _ in cells}, key=lambda lab: (lab.split()[0] != "staged", lab))
    out = []
    for sched in labels:
        for ratio in RATIOS:
            for obj in OBJECTIVES:
                rs = {r["seed"]: r for r in cells.get((sched, ratio, obj), [])}
                if not rs:
                    continue
                accs = [rs[s]["accuracy"] if s in rs else None for s in seeds]
                ref_of = lambda s: refs.get((s, _label(dict(rs[s], variant=rs[s].get("ref_variant", "")))))
                lost = [100 * (ref_of(s) - rs[s]["accuracy"]) for s in seeds if s in rs and ref_of(s) is not None]
                ref = _mean([ref_of(s) for s in seeds if s in rs])
                swapped = _mean([r.get("accuracy_swapped") for r in rs.values()])
                out.append([sched, f"{ratio:.1f}", obj, "-" if swapped is None else f"{100 * swapped:.1f}",
                            " / ".join("-" if a is None else f"{100 * a:.1f}" for a in accs),
                            f"{100 * _mean(accs):.1f}", "-" if ref is None else f"{100 * ref:.1f}",
                            "-" if not lost else f"{_mean(lost):+.1f}"])
    head = ["schedule", "ratio", "objective", "after last swap", "acc. % per seed (" + ", ".join(map(str, seeds)) + ")", "mean",
            "dense ref. (same steps)", "points lost"]
    txt = format_table(head, out)
    if base_acc is not None:
        txt = f"dense model before compression (after its own fine-tune): {100 * base_acc:.1f} %\n\n" + txt
    return txt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastfactor.compress.evidence_objective",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    ap.add_argument("--train", type=int, default=200, help="training sentences per class")
    ap.add_argument("--eval", type=int, default=80, help="held-out sentences per class")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--base-steps", type=int, default=80, help="dense fine-tune before compression")
    ap.add_argument("--base-lr", type=float, default=1e-4)
    ap.add_argument("--stage-steps", type=int, default=2)
    ap.add_argument("--final-steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--stage-lr", type=float, default=None, help="learning rate of the stage fine-tunes (default --lr)")
    ap.add_argument("--final-lr", type=float, default=None, help="learning rate of the final fine-tune (default --lr)")
    ap.add_argument("--init", default="activation")
    ap.add_argument("--calib-batches", type=int, default=2)
    ap.add_argument("--task-weight", type=float, default=1.0)
    ap.add_argument("--distill-weight", type=float, default=1.0)
    ap.add_argument("--hidden-weight", type=float, default=0.0)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ..train.data import TaskData
    from ..train.loop import Evaluator, Objective, finetune
    from .config import CompressionConfig
    from .driver import compress
    from .io import atomic_write_text
    from .reference import dense_reference

    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "evidence_objective.json")
    done, runs = {}, []
    if os.path.isfile(jpath):
        with open(jpath) as f:
            old = json.load(f)
        for r in old["rows"]:
            done[_key(r)] = r
        runs = old["meta"].get("runs") or [old["meta"]["args"]]
    t_all = time.perf_counter()
    trx, try_, evx, evy, counts = family_task(args.train, args.eval, seed=0)
    tok, model = load_classifier(len(FAMILIES), seed=0)
    data = TaskData.from_texts(tok, trx, evx, try_, evy, max_length=args.max_length, name="stdlib module family")
    evaluator = Evaluator(data, "cpu")
    # the dense starting point: fine-tuned on the task first (cached)
    bpath = os.path.join(args.out, f"base-{args.base_steps}-{args.base_lr}-{args.train}-{args.max_length}.pt")
    if os.path.isfile(bpath):
        model.load_state_dict(torch.load(bpath))
    else:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        finetune(model, Objective.build(model, data, "task"), data, args.base_steps, lr=args.base_lr,
                 batch_size=args.batch_size, seed=12345, train_embeddings=False)
        print(f"dense base fine-tune: {args.base_steps} steps, {time.perf_counter() - t0:.0f}s", flush=True)
        torch.save(model.state_dict(), bpath)
    model.eval()
    base_acc = evaluator(model)["accuracy"]
    print(f"dense base: accuracy {base_acc:.4f}; sentences per family {counts}", flush=True)
    meta = {"args": vars(args), "runs": runs + [vars(args)], "families": {f: len(m) for f, m in FAMILIES.items()}, "sentences": counts,
            "base_accuracy": base_acc, "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0]}

    def save():
        atomic_write_text(jpath, json.dumps({"meta": meta, "rows": list(done.values())}, indent=2))

    lr_variant = ", ".join(f"{k}={getattr(args, k)}" for k in ("stage_lr", "final_lr") if getattr(args, k) is not None)
    defaults = {"task_weight": 1.0, "distill_weight": 1.0, "hidden_weight": 0.0, "temperature": 2.0}
    variant = ", ".join([lr_variant] * bool(lr_variant) + [
        f"{k}={getattr(args, k)}" for k, v in defaults.items() if getattr(args, k) != v])
    n_blocks = len(model.bert.encoder.layer)
    total = args.stage_steps * n_blocks + args.final_steps
    for seed in args.seeds:
        for sched in args.schedules:
            steps = dict(stage_steps=args.stage_steps, final_steps=args.final_steps) if sched == "staged" \
                else dict(stage_steps=0, final_steps=total)
            common = dict(method="lowrank", init=args.init, schedule=sched, stage_unit="block", calib_batches=args.calib_batches,
                          batch_size=args.batch_size, lr=args.lr, stage_lr=args.stage_lr, final_lr=args.final_lr,
                          seed=seed, **steps)
            key = {"seed": seed, "schedule": sched, "ratio": None, "objective": "dense reference", "variant": lr_variant}
            if _key(key) not in done:
                t0 = time.perf_counter()
                cfg = CompressionConfig(ratio=0.5, objective="task", **common)
                ref = dense_reference(model, cfg, data, evaluator, n_blocks, **dict(
                    weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, batch_size=cfg.batch_size,
                    train_embeddings=cfg.train_embeddings))
                done[_key(key)] = dict(key, accuracy=ref["metrics"]["accuracy"], steps=ref["steps"],
                                       seconds=time.perf_counter() - t0)
                print(f"seed {seed} {sched:11s} dense reference: {100 * ref['metrics']['accuracy']:.1f} % "
                      f"({ref['steps']} steps, {time.perf_counter() - t0:.0f}s)", flush=True)
                save()
            for ratio in args.ratios:
                for obj in args.objectives:
                    key = {"seed": seed, "schedule": sched, "ratio": ratio, "objective": obj, "variant": variant,
                           "ref_variant": lr_variant}
                    if _key(key) in done:
                        continue
                    cfg = CompressionConfig(ratio=ratio, objective=obj, task_weight=args.task_weight,
                                            distill_weight=args.distill_weight, hidden_weight=args.hidden_weight,
                                            temperature=args.temperature, **common)
                    t0 = time.perf_counter()
                    _, rep = compress(copy.deepcopy(model), cfg, data, evaluate_stages=False)
                    row = dict(key, accuracy=rep.metrics_after["accuracy"],
                               accuracy_swapped=rep.metrics_offline.get("accuracy"), kept=rep.target_ratio,
                               steps=sum(s.train.get("steps", 0) for s in rep.stages),
                               seconds=time.perf_counter() - t0)
                    done[_key(row)] = row
                    print(f"seed {seed} {sched:11s} ratio {ratio:.1f} {obj:12s}: {100 * row['accuracy']:.1f} % "
                          f"(swapped {100 * (row['accuracy_swapped'] or 0):.1f} %, {row['seconds']:.0f}s)", flush=True)
                    save()
    save()
    md = markdown(list(done.values()), base_acc)
    atomic_write_text(os.path.join(args.out, "evidence_objective.md"), md + "\n")
    print(md)
    print(f"total {time.perf_counter() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
