"""Tiny randomly initialized Hugging Face models and data, built locally (tests, examples).

``tiny_model(family)`` for ``bert``, ``bert_cls``, ``gpt2`` and ``llama``: 2 blocks, hidden 24,
odd intermediate sizes, vocabulary 97 — enough to exercise every code path in a second.
"""

from __future__ import annotations

import torch

FAMILIES = ("bert", "bert_cls", "gpt2", "llama")
VOCAB = 97


def tiny_model(family: str, seed: int = 0, num_labels: int = 3, intermediate: int = 37):
    import transformers as T

    torch.manual_seed(seed)
    if family in ("bert", "bert_cls"):
        cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=intermediate, max_position_embeddings=64, num_labels=num_labels)
        m = T.BertModel(cfg) if family == "bert" else T.BertForSequenceClassification(cfg)
    elif family == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=2, n_positions=64,
                           bos_token_id=1, eos_token_id=2)
        m = T.GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=intermediate, max_position_embeddings=64,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        m = T.LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    return m.eval()


def tiny_data(n_train: int = 24, n_eval: int = 11, length: int = 13, labels: int = 0, seed: int = 0):
    """Random token ids with ragged attention masks; ``labels`` > 0 adds class labels, -1 regression."""
    from ..train.data import TaskData

    g = torch.Generator().manual_seed(seed)
    n = n_train + n_eval
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    lens = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lens[:, None]).long()
    ids = ids * mask
    tr = {"input_ids": ids[:n_train], "attention_mask": mask[:n_train]}
    ev = {"input_ids": ids[n_train:], "attention_mask": mask[n_train:]}
    if labels > 0:
        y = torch.randint(0, labels, (n,), generator=g)
        tr["labels"], ev["labels"] = y[:n_train], y[n_train:]
        return TaskData(tr, ev, "classification", labels)
    if labels < 0:
        y = torch.randn(n, generator=g)
        tr["labels"], ev["labels"] = y[:n_train], y[n_train:]
        return TaskData(tr, ev, "regression", 1)
    return TaskData(tr, ev)
