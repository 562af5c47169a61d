"""Test-suite setup shared by every tier.

Without a GPU the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must be set
before any kernel module is imported, so it is set here, at collection time. CPU tensors still go
to the PyTorch reference unless a test asks for the interpreted kernels with the ``triton_cpu``
fixture (or ``fastfactor.kernels._config.cpu_backend("triton")``).
"""

import contextlib
import math
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


def check_lowrank_vs_float64(x, u, v, b, dtype):
    """``fastfactor.lowrank_linear`` on ``(x, u, v, b)``: the output and every gradient (dx, du, dv,
    db) against :func:`lowrank_ref64`, in ``dtype``, with each tolerance scaled by its reduction."""
    import fastfactor

    lead, k, n, r = x.shape[:-1], x.shape[-1], u.shape[0], u.shape[1]
    inputs = (x, u, v) + ((b,) if b is not None else ())
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fastfactor.lowrank_linear(*leaves[:3], leaves[3] if b is not None else None)
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert_close_ref(y, lowrank_ref64(x, u, v, b), dtype, reduction=k, name="y")

    g = torch.randn_like(y)
    y.backward(g)
    ref = [t.detach().double().requires_grad_() for t in inputs]
    (lowrank_ref64(*ref[:3], ref[3] if b is not None else None) * g.double()).sum().backward()
    m = math.prod(lead)
    for name, got, want, red in zip(("dx", "du", "dv", "db"), leaves, ref, (n, m, m, m)):
        assert got.grad.dtype == dtype
        assert_close_ref(got.grad, want.grad, dtype, reduction=max(red, r), name=name)


def monarch_ops():
    """``{id: (op, strided)}``: the two block families the Monarch tests run (readable ids)."""
    from fastfactor.ops.monarch import block_lowrank_linear, monarch_linear

    return {"monarch": (monarch_linear, True), "blr": (block_lowrank_linear, False)}


def monarch_factors(M, K, N, b, r, dtype, seed=0):
    """``[x (M, K), w1, w2, bias (N,)]`` of a Monarch / block-low-rank layer, random (scaled like an
    initialised layer), in ``dtype``, each requiring grad."""
    from fastfactor.kernels import monarch as Mk

    g = torch.Generator().manual_seed(seed)
    s1, s2 = Mk.factor_shapes(K, N, b, r)
    x = torch.randn(M, K, generator=g)
    w1 = torch.randn(*s1, generator=g) / Mk.cdiv(K, b) ** 0.5
    w2 = torch.randn(*s2, generator=g) / (b * r) ** 0.5
    bb = torch.randn(N, generator=g)
    return [t.to(dtype).requires_grad_() for t in (x, w1, w2, bb)]


def assert_monarch_grads(out, x, w1, w2, g, strided, dtype, need_w1=True, need_w2=True, has_bias=True):
    """``out = (dx, dw1, dw2, db)`` of ``monarch_bwd`` against the float64 reference (a gradient
    not asked for is None)."""
    from fastfactor.kernels import monarch as Mk

    M, K = x.shape
    N = g.shape[1]
    ref = Mk.monarch_bwd_ref(g.double(), x.double(), w1.double(), w2.double(), None, strided,
                             need_w1=need_w1, need_w2=need_w2, has_bias=has_bias)
    for name, a, e in zip(["dx", "dw1", "dw2", "db"], out, ref):
        if e is None:
            assert a is None, name
            continue
        assert_close_ref(a, e, dtype, reduction=max(M, K, N), name=name)


class KwargSpy:
    """Stands in for a ``Tunable`` launcher and records one keyword argument (a constexpr the
    launcher chose) of each launch in ``seen``, then launches through the real one."""

    def __init__(self, tunable, key, seen):
        self.tunable, self.tuned, self.key, self.seen = tunable, tunable.tuned, key, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs[self.key])
            return self.tunable[grid](*args, **kwargs)
        return launch


@contextlib.contextmanager
def nan_filled_empty():
    """``torch.empty`` returns float tensors filled with NaN for the duration: an element a launch
    never writes shows in its output."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = poisoned
    try:
        yield
    finally:
        torch.empty = empty


@pytest.fixture
def on_gpu_model(monkeypatch):
    """Price the 2:4 and dense-sparse paths as on an H200 (PyTorch's 2:4 GEMM available on 'cuda'),
    no forced paths."""
    from fastfactor.kernels import _config

    for var in ("FASTFACTOR_DS_PATH", "FASTFACTOR_SPARSE24_PATH", "FASTFACTOR_SPARSE24_BWD_PATH",
                "FASTFACTOR_DS_BWD_DENSE", "FASTFACTOR_SPARSE24_DXDV"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_config, "semi_structured_ok", lambda device: device.type == "cuda")


class CountLaunches:
    """Stands in for a launcher (a ``Tunable`` or an autotuner: anything indexed by a grid) and
    counts the launches made through it."""

    def __init__(self, inner):
        self.inner, self.n = inner, 0

    def __getitem__(self, grid):
        self.n += 1
        return self.inner[grid]


def monarch_shape_id(shape) -> str:
    """Readable id of a Monarch test shape ``(M, K, N, nblocks, rank)``."""
    m, k, n, b, r = shape
    return f"M{m}-K{k}-N{n}-b{b}-r{r}"


def monarch_ref64(x, w1, w2, bias, N, strided):
    """``x·Wᵀ + b`` in float64 with ``W`` the explicit dense ``(N, K)`` matrix of the factors: the
    oracle of the Monarch / block-low-rank tests (independent of the bmm path the reference and
    the kernels share)."""
    from fastfactor.kernels import monarch as Mk

    W = Mk.dense_weight_ref(w1.double(), w2.double(), x.shape[-1], N, strided)
    y = x.double() @ W.t()
    return y + bias.double() if bias is not None else y


def monarch_ref64_grads(x, w1, w2, bias, N, strided, g):
    """:func:`monarch_ref64`'s output and its gradients for the upstream gradient ``g``, for every
    given input of ``(x, w1, w2, bias)`` (bias may be None)."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w1, w2, bias)]
    y = monarch_ref64(*leaves, N, strided)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], g.double())
    return y.detach(), grads


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


class NvtxRecorder:
    """Stands in for the ``nvtx`` package and records every call as ``(kind, message, domain)``."""

    def __init__(self):
        self.calls = []

    def push_range(self, message=None, domain=None, color=None, **_):
        self.calls.append(("push", message, domain))

    def pop_range(self, domain=None):
        self.calls.append(("pop", domain))

    def mark(self, message=None, domain=None, color=None, **_):
        self.calls.append(("mark", message, domain))

    @property
    def pushed(self):
        """Range names in order, marks as ``mark:MESSAGE``."""
        return [c[1] if c[0] == "push" else f"mark:{c[1]}" for c in self.calls if c[0] in ("push", "mark")]

    @property
    def depth(self) -> int:
        """Ranges open now (pushes minus pops)."""
        return sum(1 if c[0] == "push" else -1 for c in self.calls if c[0] in ("push", "pop"))


@pytest.fixture
def recorder(monkeypatch):
    """``fastfactor.profiling`` sending its NVTX calls to an :class:`NvtxRecorder`."""
    from fastfactor import profiling

    rec = NvtxRecorder()
    monkeypatch.setattr(profiling, "_nvtx", rec)
    monkeypatch.setattr(profiling, "_BACKEND", "nvtx")
    return rec


def dense_sparse_case(M, k, n, R, dtype, seed, strided=False):
    """``(x, d, values, meta, b)`` of a dense-sparse layer ``y = (x·Sᵀ)·Dᵀ + b`` with a fresh 2:4
    ``S (R, k)`` (``strided``: ``x`` with column stride 2, ``D`` with a row stride other than ``R``)."""
    from fastfactor.formats.sparse24 import pack_24, prune_24

    g = torch.Generator().manual_seed(seed)
    p = pack_24(prune_24(torch.randn(R, k, generator=g)).to(dtype))
    x = torch.randn(M, 2 * k if strided else k, generator=g).to(dtype)
    x = x[:, ::2] if strided else x
    d = (torch.randn(n, R + 8 if strided else R, generator=g) / R ** 0.5).to(dtype)
    d = d[:, :R] if strided else d
    b = (torch.randn(n, generator=g) * 0.1).to(dtype)
    return x, d, p.values, p.meta, b


def dense_sparse_ref64(x, d, values, meta, b, k):
    """``(y, t)`` in float64, ``t`` rounded to the intermediate dtype before ``t·Dᵀ`` as the two-matmul
    path rounds it."""
    from fastfactor.kernels import sparse24 as K

    t64 = x.double() @ K.unpack_24(values.double(), meta, k).t()
    y64 = t64.to(K.intermediate_dtype(x.dtype)).double() @ d.double().t() + (b.double() if b is not None else 0.0)
    return y64, t64


def sparse24_case(m, n, k, dtype, seed=0):
    """``(x, values, meta, b)`` of a 2:4 layer ``y = x·Wᵀ + b``: a fresh ``W (n, k)`` pruned 2:4 and
    packed, ``x (m, k)`` and ``b (n,)``, all in ``dtype`` (the codes ``uint8``)."""
    from fastfactor.formats.sparse24 import pack_24, prune_24

    torch.manual_seed(seed)
    w = pack_24(prune_24(torch.randn(n, k) / k ** 0.5))
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype)
    return x, w.values.to(dtype), w.meta, b


def sparse24_ref64(x, values, meta, b):
    """``x·Wᵀ + b`` in float64, ``W`` unpacked from ``values`` and ``meta``."""
    from fastfactor.kernels import sparse24 as K

    y = x.double() @ K.unpack_24(values.double(), meta, 2 * values.shape[1]).t()
    return y + b.double() if b is not None else y


def sol_counts_scaled_and_full(launch, programs: int):
    """``(scaled, full)`` counts of a recorded launch (``fastfactor.sol.count``), after checking
    that one program per class counts exactly what every program does, over ``programs`` programs."""
    from fastfactor.sol import count as C

    cfg = launch.candidates[0]
    full = C.count_launch(launch, cfg, "full")
    scaled = C.count_launch(launch, cfg, "scaled")
    assert scaled.programs == full.programs == programs
    for name in full.tensors:
        for f in ("load_bytes", "store_bytes", "load_sectors", "store_sectors", "unique_bytes"):
            assert getattr(scaled.tensors[name], f) == getattr(full.tensors[name], f), (name, f)
    return scaled, full
