"""merge_and_unload: every factorized module back to the dense module it replaced, of its original
class (GPT-2's Conv1D included), so the result round-trips through plain save_pretrained /
from_pretrained."""

import copy

import pytest
import torch
from torch import nn

import fastfactor
from fastfactor.compress._tiny import VOCAB, tiny_model
from fastfactor.layers.base import FactorizedLinear

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, 9), generator=g)


def _out(model, ids):
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _classes(model, names):
    return {n: type(model.get_submodule(n)) for n in names}


@pytest.mark.parametrize("family,auto,dense_cls", [
    ("gpt2", "AutoModelForCausalLM", Conv1D),
    ("bert", "AutoModel", nn.Linear),
    ("llama", "AutoModelForCausalLM", nn.Linear),
])
@pytest.mark.parametrize("method", ["lowrank", "monarch"])
def test_merge_restores_original_classes_and_round_trips(tmp_path, family, auto, dense_cls, method):
    dense = tiny_model(family, seed=3)
    model, report = fastfactor.compress(copy.deepcopy(dense), {"method": method, "schedule": "offline", "ratio": 0.5})
    names = [t["name"] for t in report.targets]
    assert _classes(dense, names) == {n: dense_cls for n in names}
    ids = _ids()
    y_comp = _out(model, ids)
    # the dense weight each module represents, in float64, before merging
    want = {n: model.get_submodule(n).dense_weight().detach().double() for n in names}

    merged = fastfactor.merge_and_unload(model)
    assert merged is model
    assert _classes(merged, names) == _classes(dense, names)  # Conv1D stays Conv1D
    assert not any(isinstance(m, FactorizedLinear) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    assert getattr(merged, "hf_quantizer", None) is None
    for n in names:
        mod = merged.get_submodule(n)
        w = mod.weight.detach().double()
        torch.testing.assert_close(w.t() if dense_cls is Conv1D else w, want[n], rtol=0, atol=1e-6)
    y_merged = _out(merged, ids)
    torch.testing.assert_close(y_merged, y_comp, rtol=1e-4, atol=1e-4)

    merged.save_pretrained(tmp_path)
    back = getattr(transformers, auto).from_pretrained(tmp_path)  # plain transformers path
    assert _classes(back, names) == _classes(dense, names)
    assert torch.equal(_out(back, ids), y_merged)


def test_merge_after_reload_keeps_conv1d(tmp_path):
    """The original class is recorded at every swap, so a model reloaded by load_compressed or by
    from_pretrained merges back to Conv1D as well."""
    model, report = fastfactor.compress(tiny_model("gpt2"), {"method": "lowrank", "schedule": "offline"})
    names = [t["name"] for t in report.targets]
    fastfactor.save_compressed(model, tmp_path / "native")
    model.save_pretrained(tmp_path / "hf")
    for back in (fastfactor.load_compressed(tmp_path / "native"),
                 transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")):
        assert {back.get_submodule(n).original_class for n in names} == {"transformers.pytorch_utils.Conv1D"}
        fastfactor.merge_and_unload(back)
        assert set(_classes(back, names).values()) == {Conv1D}


def test_revert_is_the_same_operation():
    from fastfactor.compress import revert

    model, _ = fastfactor.compress(tiny_model("gpt2"), {"method": "lowrank", "schedule": "offline"})
    revert(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)


class OtherSignatureLinear(nn.Linear):
    """An nn.Linear subclass whose __init__ takes other arguments."""

    def __init__(self, features):
        super().__init__(features, features)


def test_linear_subclass_restored():
    f = fastfactor.LowRankLinear.from_linear(nn.Linear(10, 8), rank=4)
    f.original_class = f"{__name__}.OtherSignatureLinear"
    back = f.to_original()
    assert type(back) is OtherSignatureLinear and back.weight.shape == (8, 10)
    x = torch.randn(3, 10)
    torch.testing.assert_close(back(x), f(x), rtol=1e-5, atol=1e-5)


def test_to_original_of_a_bare_layer_and_bad_class():
    lin = nn.Linear(13, 7)
    f = fastfactor.LowRankLinear.from_linear(lin, rank=3)
    assert f.original_class is None
    back = fastfactor.merge_and_unload(f)  # a bare layer: its dense original, nn.Linear
    assert type(back) is nn.Linear and back.weight.shape == (7, 13)
    torch.testing.assert_close(back.weight, f.dense_weight().detach())

    class MyLinear(nn.Linear):
        def __init__(self, features):  # another signature: rebuilt through nn.Linear.__init__
            super().__init__(features, features)

    f.original_class = f"{MyLinear.__module__}.{MyLinear.__qualname__}"
    with pytest.raises(ValueError, match="original_class"):  # a local class cannot be imported
        f.to_original()
    f.original_class = "torch.nn.modules.activation.ReLU"
    with pytest.raises(TypeError, match="original_class"):
        f.to_original()


def test_conv1d_without_bias_merges_with_zero_bias():
    f = fastfactor.LowRankLinear(11, 6, rank=2, bias=False)
    f.original_class = "transformers.pytorch_utils.Conv1D"
    c = f.to_original()
    assert isinstance(c, Conv1D) and c.weight.shape == (11, 6)
    x = torch.randn(4, 11)
    torch.testing.assert_close(c(x), f(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(c.bias, torch.zeros(6))
