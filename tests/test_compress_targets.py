"""Target selection on tiny HF models of each family; Conv1D orientation; error messages."""

import pytest
import torch
from torch import nn

from fastfactor.compress._tiny import FAMILIES, tiny_data, tiny_model
from fastfactor.compress.targets import dense_view, select_targets, set_module

EXPECTED = {
    "bert": ("encoder.layer.", {"query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"}, 12),
    "bert_cls": ("bert.encoder.layer.", {"query", "key", "value", "intermediate.dense"}, 12),
    "gpt2": ("transformer.h.", {"c_attn", "c_proj", "c_fc"}, 8),
    "llama": ("model.layers.", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, 14),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_block_linears(family):
    m = tiny_model(family)
    ts = select_targets(m)
    prefix, leaves, count = EXPECTED[family]
    assert len(ts) == count
    assert all(t.name.startswith(prefix) for t in ts)
    assert leaves <= {t.name.split(".")[-1] for t in ts} | {".".join(t.name.split(".")[-3:]) for t in ts} | {
        ".".join(t.name.split(".")[-2:]) for t in ts}
    names = " ".join(t.name for t in ts)
    for excluded in ("embeddings", "wte", "lm_head", "classifier", "pooler", "embed_tokens"):
        assert excluded not in names
    assert all(t.ratio == 0.5 and t.block is not None for t in ts)


def test_gpt2_conv1d_is_read_transposed():
    m = tiny_model("gpt2")
    x = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        ref = m(x).logits
        for t in select_targets(m):
            assert t.kind == "conv1d"
            old = m.get_submodule(t.name)
            v = dense_view(old, t.name)
            assert v.weight.shape == (old.nf, old.weight.shape[0])
            lin = nn.Linear(v.in_features, v.out_features)
            lin.weight.copy_(v.weight)
            lin.bias.copy_(v.bias)
            set_module(m, t.name, lin)
        torch.testing.assert_close(m(x).logits, ref, rtol=1e-5, atol=1e-5)


def test_patterns_overrides_and_exclude():
    m = tiny_model("llama")
    ts = select_targets(m, targets=["*mlp.*_proj", "lm_head"], module_ratios={"*down_proj": 0.25}, ratio=0.6)
    assert {t.name.split(".")[-1] for t in ts} == {"gate_proj", "up_proj", "down_proj", "lm_head"}
    assert {t.ratio for t in ts if t.name.endswith("down_proj")} == {0.25}
    assert next(t for t in ts if t.name == "lm_head").block is None
    ts = select_targets(m, exclude=["*.0.*"])
    assert len(ts) == 7 and all(".1." in t.name for t in ts)
    ts = select_targets(m, targets=["re:model\\.layers\\.1\\.self_attn\\.[qk]_proj"])
    assert [t.name.split(".")[-1] for t in ts] == ["q_proj", "k_proj"]


def test_errors_name_the_module_or_argument():
    m = tiny_model("bert")
    with pytest.raises(TypeError, match=r"embeddings\.word_embeddings.*Embedding"):
        select_targets(m, targets=["embeddings.word_embeddings"])
    with pytest.raises(ValueError, match=r"targets: pattern\(s\) \['nothing\*'\]"):
        select_targets(m, targets=["nothing*"])
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        select_targets("bert")

    class Odd(nn.Module):  # a weight-holding leaf layer of an unknown type inside a block
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(24, 24))

    m.encoder.layer[1].attention.output.odd = Odd()
    with pytest.raises(TypeError, match=r"encoder\.layer\.1\.attention\.output\.odd.*unknown layer type"):
        select_targets(m)
    assert len(select_targets(m, exclude=["*.odd"])) == 12
    with pytest.raises(ValueError, match="targets: no transformer blocks"):
        select_targets(nn.Sequential(nn.Linear(3, 3)))
