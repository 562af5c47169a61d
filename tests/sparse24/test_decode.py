"""Tier 1 (cpu): the 2:4 decode kernel (M <= 64) through the interpreter: float64 oracle for every
plan (row tile x K split, fp32 partials reduced in a fixed order), codes as 32-bit words or bytes,
bias on/off, bitwise determinism, and the planner's choices."""

import pytest
import torch

from conftest import TOL, assert_close_ref, sparse24_case, sparse24_ref64
from fastfactor.formats.sparse24 import Sparse24Weight
from fastfactor.kernels import sparse24 as K
from fastfactor.ops import sparse24 as ops

DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


_case = sparse24_case
_ref64 = sparse24_ref64


# (M, N, K, plan): word codes (K % 32 == 0) and bytes (K = 44, 600), splits with a short last one
CASES = [
    (1, 48, 64, (16, 1)),
    (13, 37, 96, (32, 1)),
    (16, 40, 600, (16, 3)),      # 600 = 2 x 256 + 88: the last split is partial, codes as bytes
    (33, 24, 44, (16, 1)),
    (64, 70, 512, (64, 2)),
    (7, 130, 1024, (128, 4)),
]


@pytest.mark.parametrize("case", [c + (bias, dt) for i, c in enumerate(CASES)
                                  for bias, dt in ((i % 2 == 0, torch.float32), (i % 2 == 1, torch.bfloat16))],
                         ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-bn{c[3][0]}-sk{c[3][1]}-{'bias' if c[4] else 'nobias'}-{DT_IDS[c[5]]}")
def test_decode_matches_float64(triton_cpu, case):
    m, n, k, plan, bias, dtype = case
    x, values, meta, b = _case(m, n, k, dtype)
    b = b if bias else None
    y = K.sparse24_decode(x, values, meta, b, plan=plan)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close_ref(y, _ref64(x, values, meta, b), dtype, reduction=k)


def test_decode_is_bitwise_deterministic_and_split_invariant_in_shape(triton_cpu):
    x, values, meta, b = _case(16, 64, 1024, torch.float32, seed=3)
    a = K.sparse24_decode(x, values, meta, b, plan=(32, 4))
    assert torch.equal(a, K.sparse24_decode(x, values, meta, b, plan=(32, 4)))
    one = K.sparse24_decode(x, values, meta, b, plan=(32, 1))
    assert (a - one).abs().max() <= TOL[torch.float32] * 32 * (1 + one.abs().max())


def test_decode_strided_x_and_edges(triton_cpu):
    x, values, meta, b = _case(5, 32, 256, torch.float32, seed=4)
    xs = x.t().contiguous().t()                                  # column-major x
    assert_close_ref(K.sparse24_decode(xs, values, meta, b, plan=(16, 2)), _ref64(x, values, meta, b),
                     torch.float32, reduction=256)
    assert K.sparse24_decode(x[:0], values, meta, b).shape == (0, 32)
    with pytest.raises(ValueError, match="x"):
        K.sparse24_decode(torch.randn(65, 256), values, meta)


def test_op_takes_the_decode_path(triton_cpu, monkeypatch):
    calls = []
    real = K.sparse24_decode
    monkeypatch.setattr(K, "sparse24_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.delenv("FASTFACTOR_SPARSE24_PATH", raising=False)
    x, values, meta, b = _case(12, 32, 128, torch.float32, seed=5)
    y = ops.sparse24_linear(x, Sparse24Weight(values, meta, (32, 128)), b)
    assert calls and torch.allclose(y.double(), _ref64(x, values, meta, b), atol=1e-4)


def test_decode_plan():
    # 16 tokens on a 4096-wide layer: wide tiles split over K (x read 32x, not 128x; the plan that
    # holds up at the low end of the L2 figure); 64 tokens: wide tiles split so the SMs fill
    bn, sk = K.decode_plan(16, 4096, 4096, 132)
    assert bn == 128 and sk > 1 and (4096 // bn) * sk >= 100
    bn, sk = K.decode_plan(64, 4096, 4096, 132)
    assert bn >= 64 and (4096 // bn) * sk >= 100
    for m in (1, 16, 64):
        for n, k in ((768, 3072), (4096, 11008)):
            bn, sk = K.decode_plan(m, n, k, 132)
            assert bn in (16, 32, 64, 128) and 1 <= sk <= 16
