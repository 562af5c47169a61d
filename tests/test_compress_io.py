"""save_compressed / load_compressed: bit-exact round trip for every method, integrity checks."""

import json
import os

import pytest
import torch

import fastfactor.compress as C
from fastfactor.compress._tiny import tiny_data, tiny_model
from fastfactor.layers.base import FactorizedLinear

def _out(model, x):
    with torch.no_grad():
        o = model(input_ids=x)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


@pytest.mark.parametrize("method", C.METHODS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_round_trip_bit_exact(method, family, tmp_path):
    model = tiny_model(family, intermediate=36)
    C.compress(model, dict(method=method, ratio=0.5, schedule="all_at_once", final_steps=1, batch_size=8),
               tiny_data())  # fine-tuned: factors are no longer their initialization
    path = C.save_compressed(model, tmp_path / "m")
    loaded = C.load_compressed(path)
    assert type(loaded) is type(model)
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert sd0[k].dtype == sd1[k].dtype and torch.equal(sd0[k], sd1[k]), k
    x = torch.randint(3, 97, (2, 11))
    assert torch.equal(_out(model, x), _out(loaded, x))
    man = json.loads((tmp_path / "m" / "fastfactor.json").read_text())
    mods = {e["name"]: e for e in man["modules"]}
    fac = {n: m for n, m in loaded.named_modules() if isinstance(m, FactorizedLinear)}
    assert mods.keys() == fac.keys() and len(fac) == (14 if family == "llama" else 8)
    for n, m in fac.items():
        # the autoencoder's default (linear) form is a LowRankLinear: its modules say "lowrank"
        assert mods[n]["method"] == {"autoencoder": "lowrank"}.get(method, method)
        assert mods[n]["factor_config"] == m.factor_config()
        assert mods[n]["num_weight_params"] == m.num_weight_params
    if family == "gpt2":  # tied lm_head / wte stored once and tied again
        assert "lm_head.weight" in man["tied"]
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_round_trip_bf16_bert(tmp_path):
    model = tiny_model("bert").to(torch.bfloat16)
    C.compress(model, dict(method="lowrank", ratio=0.3, schedule="offline"))
    loaded = C.load_compressed(C.save_compressed(model, tmp_path / "b"))
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), k


def test_integrity_errors(tmp_path):
    model = tiny_model("bert")
    C.compress(model, dict(method="lowrank", ratio=0.5, schedule="offline"))
    path = C.save_compressed(model, tmp_path / "m")
    assert not [f for f in os.listdir(path) if f.startswith(".tmp")]
    wfile = os.path.join(path, "model.safetensors")
    with open(wfile, "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ValueError, match=r"model\.safetensors: sha256 mismatch"):
        C.load_compressed(path)
    os.remove(wfile)
    with pytest.raises(ValueError, match=r"model\.safetensors: weight file listed in the manifest is missing"):
        C.load_compressed(path)
    with pytest.raises(ValueError, match="path: expected a directory written by save_compressed"):
        C.load_compressed(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        C.save_compressed("model", tmp_path / "x")
