"""Test-suite setup shared by every tier.

Without a GPU the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must be set
before any kernel module is imported, so it is set here, at collection time. CPU tensors still go
to the PyTorch reference unless a test asks for the interpreted kernels with the ``triton_cpu``
fixture (or ``fastfactor.kernels._config.cpu_backend("triton")``).
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTFACTOR_CPU_BACKEND", "reference")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402

#: dtypes each tier checks; bf16 through the interpreter only for kernels that upcast their dots
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

#: tolerances against a float64 reference, per dtype, scaled by sqrt(reduction length) by `assert_close_ref`
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_ref(actual: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, reduction: int = 1, name=""):
    """Compare against a float64 reference: |a - r| <= tol * sqrt(reduction) * (1 + max|r|) elementwise
    (relative to the tensor's scale), with tol from the per-dtype table."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    r = ref64.detach().to(torch.float64).cpu()
    scale = 1.0 + (r.abs().max().item() if r.numel() else 0.0)
    tol = TOL[dtype] * max(1.0, reduction ** 0.5) * scale
    err = (a - r).abs().max().item() if r.numel() else 0.0
    assert err <= tol, f"{name}: max abs error {err:.3e} > tol {tol:.3e} (dtype {dtype}, scale {scale:.3g})"


def lowrank_ref64(x, u, v, b=None):
    """``(x·Vᵀ)·Uᵀ + b`` in float64: the oracle of the low-rank tests."""
    y = (x.double() @ v.double().t()) @ u.double().t()
    return y + b.double() if b is not None else y


@pytest.fixture
def triton_cpu():
    """Run ops on CPU tensors through the Triton interpreter for the duration of a test."""
    from fastfactor.kernels import _config

    if not _config.is_interpreter():
        pytest.skip("TRITON_INTERPRET is not set (GPU machine): the interpreter tier does not run")
    with _config.cpu_backend("triton"):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


TINY_WORDS = [f"w{i}" for i in range(92)]


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory):
    """A tiny BERT classifier saved as a local Hugging Face folder (config, weights, WordPiece
    tokenizer), with ``train.csv`` (26 rows) and ``eval.json`` (10 rows) of labelled sentences:
    what ``fastfactor compress --model DIR --train-file ... --eval-file ...`` reads."""
    import json
    import random

    from transformers import BertTokenizerFast

    from fastfactor.compress._tiny import tiny_model

    d = tmp_path_factory.mktemp("tiny_bert_dir")
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + TINY_WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(d)
    tiny_model("bert_cls", num_labels=2).save_pretrained(d)
    rng = random.Random(1)
    rows = [(" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 9))), rng.randint(0, 1)) for _ in range(36)]
    (d / "train.csv").write_text("sentence,label\n" + "\n".join(f"{s},{y}" for s, y in rows[:26]) + "\n")
    (d / "eval.json").write_text("\n".join(json.dumps({"sentence": s, "label": y}) for s, y in rows[26:]) + "\n")
    return d
