"""The byte-permute expansion of the 2:4 decode kernels (``_expand24_prmt``).

A GPU build runs ``prmt.b32``; the interpreter runs the same selection in integer ops. Here: the
tables against the PTX definition of ``prmt`` (default mode, written out below from the PTX ISA),
the interpreter's kernels against the compare-and-select form bitwise, and the mode switch."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import KwargSpy
from fastfactor.formats.sparse24 import pack_24, prune_24
from fastfactor.kernels import _config
from fastfactor.kernels import sparse24 as K

CANONICAL = [(i0, i1) for i0 in range(4) for i1 in range(4) if i0 < i1]


def ptx_prmt(a: int, b: int, c: int) -> int:
    """``prmt.b32 d, a, b, c`` in the default mode (PTX ISA, "prmt"): the 8 source bytes are
    ``{b, a}`` (``a`` bytes 0-3, ``b`` bytes 4-7); output byte ``i`` takes source byte
    ``c[4i+2 : 4i]``, or, when ``c[4i+3]`` is set, that byte's sign bit replicated to 8 bits."""
    src = (a & 0xFFFFFFFF) | ((b & 0xFFFFFFFF) << 32)
    out = 0
    for i in range(4):
        nib = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (nib & 7))) & 0xFF
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0x00
        out |= byte << (8 * i)
    return out


def _expand_ptx(pairs: list[int], codes: list[int]) -> list[int]:
    """The kernel's computation for 8 groups (one 32-bit code word) with ``ptx_prmt``: the 16-bit
    entries of the 32 expanded weights. Also checks no selector ever sets a sign bit."""
    word = sum(c << (4 * j) for j, c in enumerate(codes))
    idx = (word ^ (word >> 1)) & 0x77777777
    out = []
    for half in range(2):
        idx16 = (idx >> (16 * half)) & 0xFFFF
        assert all(((idx16 >> (4 * j)) & 8) == 0 for j in range(4))
        s = [ptx_prmt(lo, hi, idx16) for lo, hi in K.PRMT_TABLES]
        for j in range(4):
            jsel = j | (4 + j) << 4
            sel_a = ptx_prmt(s[0], s[1], jsel)
            sel_b = ptx_prmt(s[2], s[3], jsel)
            for sel in (sel_a, sel_b):
                assert all(((sel >> (4 * n)) & 8) == 0 for n in range(4)), hex(sel)
            p = pairs[4 * half + j]
            for w in (ptx_prmt(p, 0, sel_a), ptx_prmt(p, 0, sel_b)):
                out += [w & 0xFFFF, w >> 16]
    return out


def test_tables_expand_every_canonical_code_by_the_ptx_definition():
    rng = random.Random(0)
    codes = [i0 | i1 << 2 for i0, i1 in CANONICAL]
    assert sorted((c ^ c >> 1) & 7 for c in codes) == [1, 2, 3, 4, 5, 6]   # distinct, sign bit clear
    for trial in range(200):
        groups = [rng.choice(CANONICAL) for _ in range(8)]
        if trial < 6:
            groups = [CANONICAL[trial]] * 8                    # each pattern in every position
        codes = [i0 | i1 << 2 for i0, i1 in groups]
        v = [(rng.getrandbits(16), rng.getrandbits(16)) for _ in range(8)]
        pairs = [v0 | v1 << 16 for v0, v1 in v]
        want = []
        for (i0, i1), (v0, v1) in zip(groups, v):
            slots = [0, 0, 0, 0]
            slots[i0], slots[i1] = v0, v1
            want += slots
        assert _expand_ptx(pairs, codes) == want, groups


def test_table_bytes_name_the_pair_or_zero():
    for k, (lo, hi) in enumerate(K.PRMT_TABLES):
        for i in range(8):
            byte = ((lo | hi << 32) >> (8 * i)) & 0xFF
            assert byte in (0x10, 0x32, 0x54), (k, i, hex(byte))
            assert byte == 0x10 + 0x22 * K.PRMT_PATTERNS[i][k]
    # every slot of a canonical pattern: exactly the two kept values once each
    for i0, i1 in CANONICAL:
        c = i0 | i1 << 2
        src = K.PRMT_PATTERNS[(c ^ c >> 1) & 7]
        assert src[i0] == 0 and src[i1] == 1 and sorted(src) == [0, 1, 2, 2]


def _case(M, N, Kd, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = prune_24(torch.randn(N, Kd, generator=g).to(dtype))
    p = pack_24(w)
    x = torch.randn(M, Kd, generator=g).to(dtype)
    return x, p.values, p.meta


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,Kd,plan", [(16, 96, 768, (32, 3)), (5, 70, 512, (64, 1)), (3, 128, 1024, (128, 2))])
def test_decode_prmt_equals_compare_select_bitwise(triton_cpu, monkeypatch, dtype, M, N, Kd, plan):
    x, values, meta = _case(M, N, Kd, dtype, seed=M + N)
    # special bit patterns survive the permutes: -0.0, a subnormal, a negative subnormal
    values = values.clone()
    tiny = torch.finfo(dtype).tiny
    values.view(-1)[:3] = torch.tensor([-0.0, tiny / 4, -tiny / 8], dtype=dtype)
    b = torch.randn(N).to(dtype)
    assert K.prmt_mode(True) == 1
    y1 = K.sparse24_decode(x, values, meta, b, plan=plan)
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PRMT", "0")
    assert K.prmt_mode(True) == 0
    y0 = K.sparse24_decode(x, values, meta, b, plan=plan)
    assert torch.equal(y1.view(torch.int16), y0.view(torch.int16))
    ref = x.double() @ K.unpack_24(values.double(), meta, Kd).t() + b.double()
    torch.testing.assert_close(y1.double(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


@pytest.mark.parametrize("M,N,Kd", [(16, 96, 768), (7, 256, 512)])
def test_dx_decode_prmt_equals_compare_select_bitwise(triton_cpu, monkeypatch, M, N, Kd):
    _, values, meta = _case(M, N, Kd, torch.bfloat16, seed=3 * M)
    g = torch.randn(M, N).to(torch.bfloat16)
    db1 = torch.empty(N, dtype=torch.bfloat16)
    dx1 = K.sparse24_dx_decode(g, values, meta, db=db1)
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PRMT", "0")
    db0 = torch.empty(N, dtype=torch.bfloat16)
    dx0 = K.sparse24_dx_decode(g, values, meta, db=db0)
    assert torch.equal(dx1.view(torch.int16), dx0.view(torch.int16)) and torch.equal(db1, db0)
    ref = g.double() @ K.unpack_24(values.double(), meta, Kd)
    torch.testing.assert_close(dx1.double(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


def test_prmt_mode(monkeypatch):
    monkeypatch.delenv("FASTFACTOR_SPARSE24_PRMT", raising=False)
    assert K.prmt_mode(False) == 0
    assert K.prmt_mode(True) == (1 if _config.is_interpreter() else 2)
    monkeypatch.setattr(K._config, "is_interpreter", lambda: False)
    assert K.prmt_mode(True) == 2
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PRMT", "1")
    assert K.prmt_mode(True) == 2
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PRMT", "yes")
    with pytest.raises(ValueError, match="FASTFACTOR_SPARSE24_PRMT"):
        K.prmt_mode(True)
    # sol counts a GPU launch (PRMT=2) by running the interpreter's equivalent
    assert _config.interpreter_constexprs(dict(PRMT=2, BLOCK_N=32, SPLIT=True)) == dict(PRMT=1, BLOCK_N=32, SPLIT=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("M", [1, 12, 16, 64])
@pytest.mark.parametrize("plan", [None, (32, 1), (64, 2), (128, 4)])
def test_prmt_on_cuda_equals_compare_select_bitwise(monkeypatch, M, plan):
    """The inline-assembly build (prmt.b32) against compare-and-select, bitwise, on the GPU: the
    forward decode at each plan (tiles of 8192+ weights take the permutes) and the dx-decode."""
    monkeypatch.delenv("FASTFACTOR_SPARSE24_PRMT", raising=False)
    g = torch.Generator(device="cuda").manual_seed(M)
    N = Kd = 4096
    p = pack_24(prune_24(torch.randn(N, Kd, device="cuda", generator=g).to(torch.bfloat16)))
    x = torch.randn(M, Kd, device="cuda", generator=g).to(torch.bfloat16)
    gy = torch.randn(M, N, device="cuda", generator=g).to(torch.bfloat16)
    b = torch.randn(N, device="cuda", generator=g).to(torch.bfloat16)
    assert K.prmt_mode(True) == 2
    y2 = K.sparse24_decode(x, p.values, p.meta, b, plan=plan)
    dx2 = K.sparse24_dx_decode(gy, p.values, p.meta)
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PRMT", "0")
    y0 = K.sparse24_decode(x, p.values, p.meta, b, plan=plan)
    dx0 = K.sparse24_dx_decode(gy, p.values, p.meta)
    torch.cuda.synchronize()
    assert torch.equal(y2.view(torch.int16), y0.view(torch.int16))
    assert torch.equal(dx2.view(torch.int16), dx0.view(torch.int16))
    w64 = K.unpack_24(p.values.double(), p.meta, Kd)
    ref = x.double() @ w64.t() + b.double()
    torch.testing.assert_close(y2.double(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())
    dref = gy.double() @ w64
    torch.testing.assert_close(dx2.double(), dref, rtol=0.02, atol=0.02 * dref.abs().max().item())


@pytest.mark.parametrize("M,N,Kd,plan,even", [
    (16, 96, 768, (32, 3), True),      # whole row tiles, K a multiple of 256: the loads unmasked
    (4, 96, 768, (64, 2), False),      # a partial last row tile (96 = 64 + 32)
    (16, 128, 800, (64, 2), False),    # K not a multiple of 256: a partial last column step
])
def test_decode_unmasked_loads_only_on_whole_tiles(triton_cpu, monkeypatch, M, N, Kd, plan, even):
    """``EVEN`` (the weight's and x's loads without masks) is set exactly when every tile is whole,
    and both forms match float64 and each other's expansion bit for bit."""
    seen = []
    monkeypatch.setattr(K, "_sp_decode_tuned", KwargSpy(K._sp_decode_tuned, "EVEN", seen))
    x, values, meta = _case(M, N, Kd, torch.bfloat16, seed=N + Kd)
    b = torch.randn(N).to(torch.bfloat16)
    y = K.sparse24_decode(x, values, meta, b, plan=plan)
    assert seen == [even]
    ref = x.double() @ K.unpack_24(values.double(), meta, Kd).t() + b.double()
    torch.testing.assert_close(y.double(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())
    monkeypatch.setenv("FASTFACTOR_SPARSE24_PRMT", "0")
    assert torch.equal(K.sparse24_decode(x, values, meta, b, plan=plan).view(torch.int16), y.view(torch.int16))
