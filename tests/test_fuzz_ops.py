"""Tier 1 (cpu): property-based tests (hypothesis) of every public op against float64.

Every example draws an op (``lowrank_linear``, ``monarch_linear``, ``block_lowrank_linear``,
``sparse24_linear``, ``dense_sparse_linear``), a backend (the PyTorch reference or the Triton
kernels under the interpreter), a kernel path where the family has two, leading dims (including 0
and 1), feature sizes (odd, 1, and 0 where the op allows it), the input's layout (contiguous,
transposed, sliced), the dtype (fp32/fp16/bf16) and bias on/off, then checks the output and every
gradient (one combined loss) against a float64 computation through the *dense* weight.

The op table here (:data:`OPS`, :func:`make_case`) is shared by the determinism and numerics tests.
Known failures on zero-size inputs are pinned at the bottom as strict xfails.

Counts: hypothesis prints its statistics with ``pytest --hypothesis-show-statistics``; the number
of examples run per test is also recorded in ``EXAMPLES_RUN`` and printed at the end of the module
(``-s``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Callable, List, Optional
from unittest import mock

import pytest
import torch
from conftest import assert_close_ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastfactor.kernels import _config

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPS = ["lowrank", "monarch", "block_lowrank", "sparse24", "dense_sparse"]
#: env var forcing each family's kernel path, and its values
PATH_ENV = {
    "lowrank": ("FASTFACTOR_LOWRANK_PATH", ["fused", "two_gemm", "decode"]),
    "monarch": ("FASTFACTOR_MONARCH_PATH", ["fused", "two_stage", "rows"]),
    "block_lowrank": ("FASTFACTOR_MONARCH_PATH", ["fused", "two_stage", "rows"]),
    "sparse24": ("FASTFACTOR_SPARSE24_PATH", ["triton"]),
    "dense_sparse": ("FASTFACTOR_DS_PATH", ["fused", "two_kernel", "library"]),
}
EXAMPLES_RUN = {}



def op_variants():
    """``pytest.param(op, backend, path)`` for every op x CPU backend x kernel path (readable ids)."""
    out = []
    for op in OPS:
        for be, paths in (("ref", [None]), ("triton", PATH_ENV[op][1])):
            for path in paths:
                out.append(pytest.param(op, be, path, id=f"{op}-{be}" + (f"-{path}" if path else "")))
    return out


def has_op(op: str) -> bool:
    try:
        if op == "lowrank":
            import fastfactor.ops.lowrank  # noqa: F401
        elif op in ("monarch", "block_lowrank"):
            import fastfactor.ops.monarch  # noqa: F401
        else:
            import fastfactor.ops.sparse24  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass
class Case:
    """One op call: ``fn(x, *params)``; ``params`` are the differentiable leaves (bias last when
    present), ``ref64(x64, *params64)`` the float64 computation through the dense weight."""

    op: str
    fn: Callable
    x: torch.Tensor
    params: List[torch.Tensor]
    names: List[str]
    ref64: Callable
    reduction: int
    out_features: int
    extra: dict = dataclasses.field(default_factory=dict)  #: non-differentiable inputs (2:4 meta)

    def leaves(self):
        """Fresh differentiable copies of ``x`` (keeping its strides) and the params."""
        x = _clone_strided(self.x).requires_grad_()
        ps = [_clone_strided(p).requires_grad_() for p in self.params]
        return x, ps

    def run(self, x, ps):
        return self.fn(x, *ps)


def _clone_strided(t: torch.Tensor) -> torch.Tensor:
    """A detached copy with the same strides (so transposed / sliced inputs stay so)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype)
    if out.numel() == t.numel():  # same storage footprint: a dense permutation of strides
        out.copy_(t.detach())
        return out
    base = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype)
    base.zero_()
    view = base.as_strided(t.size(), t.stride(), t.storage_offset())
    view.copy_(t.detach())
    return view


def _x(gen, lead, k, dtype, layout, scale=1.0):
    """Input ``(*lead, k)`` in the given layout: contiguous, transposed (the feature dim has the
    largest stride... i.e. stored feature-major) or sliced (every other feature of a 2k buffer)."""
    if layout == "contig":
        t = torch.randn(*lead, k, generator=gen)
    elif layout == "transposed":
        t = torch.randn(k, *lead, generator=gen).movedim(0, -1)
    elif layout == "sliced":
        t = torch.randn(*lead, 2 * k + 1, generator=gen)[..., 1::2]
    else:  # pragma: no cover
        raise ValueError(layout)
    return (t * scale).to(dtype) if dtype != torch.float32 else t * scale


def _w(gen, shape, scale, dtype, transposed=False):
    if transposed and len(shape) == 2:
        t = torch.randn(shape[1], shape[0], generator=gen).t()
    else:
        t = torch.randn(*shape, generator=gen)
    return (t * scale).to(dtype)


def make_case(op, *, lead, k, n, r, nblocks, dtype, bias, layout, seed, wt=False, x_scale=1.0) -> Case:
    """Build one call of ``op``. ``r`` is the rank (low-rank, dense-sparse) or the per-block rank
    (Monarch families); ``nblocks`` only matters to the Monarch families; ``k`` must be a multiple
    of 4 for the 2:4 ops; ``wt`` stores 2-D weights transposed."""
    gen = torch.Generator().manual_seed(seed)
    x = _x(gen, lead, k, dtype, layout, x_scale)
    b = _w(gen, (n,), 1.0, dtype) if bias else None
    if op == "lowrank":
        from fastfactor.ops.lowrank import lowrank_linear

        u = _w(gen, (n, r), 1 / math.sqrt(max(r, 1)), dtype, wt)
        v = _w(gen, (r, k), 1 / math.sqrt(max(k, 1)), dtype, wt)
        params, names = [u, v], ["u", "v"]

        def fn(x, u, v, *bb):
            return lowrank_linear(x, u, v, bb[0] if bb else None)

        def ref(x, u, v, *bb):
            return _affine(x, u @ v, bb)

        red = max(k, r, 1)
        meta = None
    elif op in ("monarch", "block_lowrank"):
        from fastfactor.kernels import monarch as Mk
        from fastfactor.ops.monarch import block_lowrank_linear, monarch_linear

        strided = op == "monarch"
        f = monarch_linear if strided else block_lowrank_linear
        s1, s2 = Mk.factor_shapes(k, n, nblocks, r)
        w1 = _w(gen, s1, 1 / math.sqrt(Mk.cdiv(k, nblocks)), dtype)
        w2 = _w(gen, s2, 1 / math.sqrt(nblocks * r), dtype)
        params, names = [w1, w2], ["w1", "w2"]

        def fn(x, w1, w2, *bb):
            return f(x, w1, w2, bb[0] if bb else None, out_features=n)

        def ref(x, w1, w2, *bb):
            return _affine(x, Mk.dense_weight_ref(w1, w2, k, n, strided), bb)

        red = max(k, nblocks * r, 1)
    elif op == "sparse24":
        from fastfactor.kernels import sparse24 as Sk
        from fastfactor.ops.sparse24 import pack_24, prune_24, sparse24_linear_packed

        w = pack_24(prune_24(_w(gen, (n, k), 1 / math.sqrt(max(k // 2, 1)), dtype, wt)))
        meta = w.meta
        params, names = [w.values], ["values"]

        def fn(x, values, *bb):
            return sparse24_linear_packed(x, values, meta, bb[0] if bb else None)

        def ref(x, values, *bb):
            return _affine(x, Sk.unpack_24(values, meta, k), bb)

        red = max(k // 2, 1)
    elif op == "dense_sparse":
        from fastfactor.kernels import sparse24 as Sk
        from fastfactor.ops.sparse24 import dense_sparse_linear_packed, pack_24, prune_24

        s = pack_24(prune_24(_w(gen, (r, k), 1 / math.sqrt(max(k // 2, 1)), dtype, wt)))
        meta = s.meta
        d = _w(gen, (n, r), 1 / math.sqrt(max(r, 1)), dtype, wt)
        params, names = [d, s.values], ["d", "s.values"]

        def fn(x, d, sv, *bb):
            return dense_sparse_linear_packed(x, d, sv, meta, bb[0] if bb else None)

        def ref(x, d, sv, *bb):
            return _affine(x, d @ Sk.unpack_24(sv, meta, k), bb)

        red = max(k // 2, r, 1)
    else:  # pragma: no cover
        raise ValueError(op)
    if b is not None:
        params.append(b)
        names.append("bias")
    extra = {"meta": meta} if op in ("sparse24", "dense_sparse") else {}
    return Case(op, fn, x, params, names, ref, red, n, extra)


def _affine(x, w, bb):
    y = x @ w.t()
    return y + bb[0] if bb else y


def check_case(case: Case, dtype: torch.dtype) -> None:
    """Output and all gradients (one combined loss ``Σ y·g``) against float64."""
    x, ps = case.leaves()
    y = case.run(x, ps)
    lead = tuple(case.x.shape[:-1])
    assert y.shape == (*lead, case.out_features), f"{case.op}: shape {tuple(y.shape)}"
    assert y.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in ps]
    y64 = case.ref64(x64, *p64)
    assert_close_ref(y, y64, dtype, reduction=case.reduction, name=f"{case.op}.y")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (y.float() * g.float()).sum().backward()
    (y64 * g.double()).sum().backward()
    m = max(math.prod(lead), 1)
    for name, got, want in zip(["x"] + case.names, [x] + ps, [x64] + p64):
        assert got.grad is not None and got.grad.shape == got.shape, f"{case.op}.d{name}"
        assert got.grad.dtype == dtype
        red = max(case.reduction, case.out_features, m)
        assert_close_ref(got.grad, want.grad, dtype, reduction=red, name=f"{case.op}.d{name}")


@contextlib.contextmanager
def backend(name: str, op: str, path: Optional[str] = None):
    """Run on the reference (``'ref'``) or the interpreted kernels (``'triton'``), forcing ``path``."""
    if name == "triton" and not _config.is_interpreter():
        pytest.skip("the interpreter tier needs TRITON_INTERPRET=1 (not set on GPU machines)")
    env = {PATH_ENV[op][0]: path} if path else {}
    with mock.patch.dict(os.environ, env), _config.cpu_backend("reference" if name == "ref" else "triton"):
        yield


# --------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------

LEAD = st.lists(st.sampled_from([0, 1, 2, 3, 5]), min_size=1, max_size=2)
SMALL = st.sampled_from([1, 2, 3, 5, 7, 11, 13])
K4 = st.sampled_from([4, 8, 12, 20])


@st.composite
def op_cases(draw, backends=("ref", "triton")):
    op = draw(st.sampled_from([o for o in OPS if has_op(o)]))
    be = draw(st.sampled_from(backends))
    path = draw(st.sampled_from(PATH_ENV[op][1])) if be == "triton" else None
    dtype_name = draw(st.sampled_from(list(DT)))
    lead = tuple(draw(LEAD))
    bias = draw(st.booleans())
    layout = draw(st.sampled_from(["contig", "transposed", "sliced"]))
    wt = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    nblocks = 1
    if op == "lowrank":
        k, n = draw(SMALL), draw(st.sampled_from([0, 1, 3, 7, 13]))
        r = draw(st.sampled_from([0, 1, 2, 5]))
    elif op in ("monarch", "block_lowrank"):
        k, n = draw(SMALL), draw(SMALL)
        nblocks = draw(st.integers(1, min(3, k, n)))
        r = draw(st.integers(1, 3))
    elif op == "sparse24":
        k, n, r = draw(K4), draw(SMALL), 0
    else:
        k, n, r = draw(K4), draw(st.sampled_from([0, 1, 3, 7])), draw(st.sampled_from([1, 2, 5]))
    kw = dict(lead=lead, k=k, n=n, r=r, nblocks=nblocks, dtype=DT[dtype_name], bias=bias,
              layout=layout, seed=seed, wt=wt)
    return op, be, path, kw


FUZZ = settings(
    max_examples=int(os.environ.get("FASTFACTOR_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=os.environ.get("FASTFACTOR_FUZZ_RANDOM", "0") != "1",
    print_blob=True,
)


@FUZZ
@given(op_cases())
def test_fuzz_op_matches_float64(spec):
    op, be, path, kw = spec
    EXAMPLES_RUN[f"{op}/{be}"] = EXAMPLES_RUN.get(f"{op}/{be}", 0) + 1
    with backend(be, op, path):
        case = make_case(op, **kw)
        check_case(case, kw["dtype"])


def test_examples_covered_every_op_and_backend():
    """Runs after the fuzz test (file order): every op met both backends at least once."""
    if not EXAMPLES_RUN:
        pytest.skip("run together with test_fuzz_op_matches_float64")
    print(f"\nfuzzed examples per op/backend: {dict(sorted(EXAMPLES_RUN.items()))}")
    if _config.is_interpreter():
        for op in OPS:
            if has_op(op):
                assert EXAMPLES_RUN.get(f"{op}/ref", 0) and EXAMPLES_RUN.get(f"{op}/triton", 0), (
                    f"{op} was not fuzzed on both backends: {EXAMPLES_RUN}"
                )


# --------------------------------------------------------------------------------------------
# zero-size inputs that fail today (found by this file); strict xfails until fixed
# --------------------------------------------------------------------------------------------

ZERO_SIZE_REGRESSIONS = [
    # (op, backend, kw overrides, the bug the fuzzer found there, since fixed)
    ("lowrank", "ref", dict(k=0, n=3, r=2), "x.reshape(-1, 0) is ambiguous for in_features=0"),
    ("lowrank", "triton", dict(k=0, n=3, r=2), "x.reshape(-1, 0) is ambiguous for in_features=0"),
    ("lowrank", "triton", dict(k=5, n=3, r=0),
     "gemm skipped rank-0 products, so db (fused into dU = gᵀ·t as row sums) was never written"),
]


@pytest.mark.parametrize(
    "op,be,over",
    [pytest.param(o, b, d, id=f"{o}-{b}-" + "-".join(f"{k}{v}" for k, v in d.items()))
     for o, b, d, _ in ZERO_SIZE_REGRESSIONS],
)
def test_zero_size_features_regressions(op, be, over):
    if not has_op(op):
        pytest.skip(f"{op} op not present")
    kw = dict(lead=(3,), nblocks=1, dtype=torch.float32, bias=True, layout="contig", seed=0)
    kw.update(over)
    with backend(be, op):
        check_case(make_case(op, **kw), torch.float32)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("be", ["ref", "triton"])
def test_one_row_one_feature(op, be):
    """The smallest legal shapes of every op, deterministic (not left to hypothesis' luck)."""
    if not has_op(op):
        pytest.skip(f"{op} op not present")
    k = 4 if op in ("sparse24", "dense_sparse") else 1
    kw = dict(lead=(1,), k=k, n=1, r=1, nblocks=1, dtype=torch.float32, bias=True, layout="contig", seed=3)
    with backend(be, op, None):
        check_case(make_case(op, **kw), torch.float32)
