"""Tier 1 (cpu): fp16 safety of the rank-r intermediate.

A factorized layer computes ``y = (x·Aᵀ)·Bᵀ``; the intermediate ``t = x·Aᵀ`` can be far larger
than ``y`` (large activations times a large first factor, a small second factor: the product is
what training sees, the split between the factors is arbitrary). fp16 holds at most 65504, so an
intermediate rounded to fp16 overflows to inf and poisons ``y`` although the float32 result fits.
The same holds in the backward for ``dt = g·B`` feeding ``dx = dt·A``.

The inputs below are built so that (checked in float64 by :func:`test_inputs_really_overflow_a_naive_fp16_intermediate`)
the intermediate exceeds 65504 while the output (or ``dx``) stays below 1000. Every output and
gradient whose float64 value fits in fp16 must come out finite and close to float64.

Every family keeps its intermediate in fp32 for fp16 inputs (``intermediate_dtype`` of
``kernels.lowrank``, which ``kernels.monarch`` and ``kernels.sparse24`` share): the low-rank
``t``, the Monarch / block-wise low-rank ``h`` and ``dh``, the dense-sparse ``t`` and ``dt``, on the
PyTorch reference and on every kernel path. :func:`test_saved_intermediate_dtype` pins the dtype
of the saved intermediate (real and fake tensors) for every op and dtype.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_ref
from test_fuzz_ops import PATH_ENV, backend, has_op, make_case


FP16_MAX = 65504.0
S = 2.0**10  # power of two: moving it between the factors is exact

#: op -> (index of the first factor A in params, index of the second factor B)
FACTORS = {"lowrank": (1, 0), "monarch": (0, 1), "block_lowrank": (0, 1), "dense_sparse": (1, 0)}


def _case(op, direction):
    """``direction='forward'``: A·S, B/S, x·64 (t overflows); ``'backward'``: A/S, B·S and g·64
    (dt overflows)."""
    case = make_case(op, lead=(3, 5), k=12, n=9, r=3, nblocks=2, dtype=torch.float32, bias=True,
                     layout="sliced", seed=4)
    ia, ib = FACTORS[op]
    up, down = (S, 1 / S) if direction == "forward" else (1 / S, S)
    case.params[ia] = (case.params[ia] * up).half()
    case.params[ib] = (case.params[ib] * down).half()
    case.params = [p.half() for p in case.params]
    case.x = (case.x * (64.0 if direction == "forward" else 1.0)).half()
    return case


def _intermediate64(op, case):
    """float64 ``t = x·Aᵀ`` (low-rank, dense-sparse) or the Monarch stage-1 ``h`` (all entries)."""
    x = case.x.double().reshape(-1, case.x.shape[-1])
    p = [q.double() for q in case.params]
    if op == "lowrank":
        return x @ p[1].t()
    if op == "dense_sparse":
        from fastfactor.kernels import sparse24 as Sk

        return x @ Sk.unpack_24(p[1], case.extra["meta"], x.shape[1]).t()
    w1 = p[0]
    b, _, kb = w1.shape
    xa = torch.nn.functional.pad(x, (0, b * kb - x.shape[1])).reshape(-1, b, kb)
    return torch.einsum("mjc,jpc->mjp", xa, w1)


def _g(case, y, direction):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(8))
    return (g * (64.0 if direction == "backward" else 1.0)).half()


def _variants():
    out = []
    for op in FACTORS:
        for be, paths in (("ref", [None]), ("triton", PATH_ENV[op][1])):
            for path in paths:
                for direction in ("forward", "backward"):
                    out.append(pytest.param(op, be, path, direction,
                                            id=f"{op}-{be}" + (f"-{path}" if path else "") + f"-{direction}"))
    return out


@pytest.mark.parametrize("op", list(FACTORS))
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_inputs_really_overflow_a_naive_fp16_intermediate(op, direction):
    """Guards the test itself: the intermediate (forward) or ``dt`` (backward) exceeds fp16's
    range by a margin while the output / ``dx`` fit."""
    if not has_op(op):
        pytest.skip(f"{op} op not present")
    case = _case(op, direction)
    x64 = case.x.double().requires_grad_()
    p64 = [p.double().requires_grad_() for p in case.params]
    y64 = case.ref64(x64, *p64)
    t64 = _intermediate64(op, case)
    if direction == "forward":
        assert t64.abs().max() > 2 * FP16_MAX, float(t64.abs().max())
        assert y64.abs().max() < 1000, float(y64.abs().max())
    else:
        g = _g(case, y64, direction).double()
        ib = FACTORS[op][1]
        B = p64[ib].detach()
        if op in ("lowrank", "dense_sparse"):
            dt = g.reshape(-1, g.shape[-1]) @ B
            assert dt.abs().max() > 2 * FP16_MAX, float(dt.abs().max())
        (y64 * g).sum().backward()
        assert x64.grad.abs().max() < 1000 and y64.abs().max() < 1000


@pytest.mark.parametrize("op,be,path,direction", _variants())
def test_fp16_intermediate_does_not_overflow(op, be, path, direction):
    if not has_op(op):
        pytest.skip(f"{op} op not present")
    case = _case(op, direction)
    with backend(be, op, path):
        x, ps = case.leaves()
        y = case.run(x, ps)
        g = _g(case, y, direction)
        y.backward(g)
    x64 = case.x.double().requires_grad_()
    p64 = [p.double().requires_grad_() for p in case.params]
    y64 = case.ref64(x64, *p64)
    (y64 * g.double()).sum().backward()
    checked = 0
    for name, got, want in [("y", y, y64)] + list(zip(["dx"] + case.names, [x.grad] + [p.grad for p in ps],
                                                        [x64.grad] + [p.grad for p in p64])):
        if want.abs().max() >= 0.9 * FP16_MAX:
            continue  # the true value does not fit in fp16 itself: inf is the right answer
        assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} inf/NaN where float64 fits"
        assert_close_ref(got, want, torch.float16, reduction=max(case.reduction, 15), name=name)
        checked += 1
    assert checked >= 2  # y or dx plus at least one more


# --------------------------------------------------------------------------------------------
# the saved intermediate's dtype: fp32 for fp16 inputs, the input dtype otherwise
# --------------------------------------------------------------------------------------------

def _fwd_with_intermediate(op, x, ps, meta):
    """Call the registered forward op that also returns the saved intermediate."""
    if op == "lowrank":
        return torch.ops.fastfactor.lowrank_fwd(x, ps[0], ps[1], ps[2], True)
    if op in ("monarch", "block_lowrank"):
        return torch.ops.fastfactor.monarch_fwd(x, ps[0], ps[1], ps[2], ps[2].shape[0], op == "monarch", True)
    return torch.ops.fastfactor.dense_sparse_fwd(x, ps[0], ps[1], meta, ps[2], True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("op,be,path", [
    pytest.param(op, be, path, id=f"{op}-{be}" + (f"-{path}" if path else ""))
    for op in FACTORS for be, paths in (("ref", [None]), ("triton", PATH_ENV[op][1])) for path in paths
])
def test_saved_intermediate_dtype(op, be, path, dtype):
    """The intermediate saved for the backward is fp32 for fp16 inputs (else the input dtype), on
    every backend and path, and the fake (meta) implementation says the same; ``y`` keeps the
    input dtype."""
    if not has_op(op):
        pytest.skip(f"{op} op not present")
    case = make_case(op, lead=(5,), k=12, n=9, r=3, nblocks=2, dtype=dtype, bias=True,
                     layout="contig", seed=1)
    want = torch.float32 if dtype == torch.float16 else dtype
    x2 = case.x.reshape(-1, case.x.shape[-1])
    meta = case.extra.get("meta")
    with backend(be, op, path):
        y, t = _fwd_with_intermediate(op, x2, case.params, meta)
    assert y.dtype == dtype and t.dtype == want, (y.dtype, t.dtype)
    assert t.shape[0] == x2.shape[0] and torch.isfinite(t).all()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(x2)
        fps = [mode.from_tensor(p) for p in case.params]
        fmeta = mode.from_tensor(meta) if meta is not None else None
        fy, ft = _fwd_with_intermediate(op, fx, fps, fmeta)
    assert fy.dtype == dtype and ft.dtype == want and tuple(ft.shape) == tuple(t.shape)


def test_fp32_intermediate_chain_tiles_are_pruned():
    """With an fp32 ``h`` the Monarch chain converts its w2 tile to fp32 too; the tiles that spill
    then (compile-check, sm_90) leave both the compile variant's space and the autotuner's."""
    from fastfactor.kernels import _config
    from fastfactor.kernels import monarch as MK

    full, fp32 = MK.chain_space(), MK.chain_space(H_FP32=True)
    assert full == MK.CHAIN_SPACE and 0 < len(fp32) < len(full)
    dropped = [c for c in full if c not in fp32]
    assert all(c["BLOCK_R"] * c["BLOCK_N"] > 4096 for c in dropped)
    cfgs = [_config.triton.Config({k: v for k, v in c.items() if k.startswith("BLOCK")}) for c in full]
    args = dict(R=64, SB=256)
    kept16 = MK._prune_chain(cfgs, args, H_FP32=True)
    kept = MK._prune_chain(cfgs, args, H_FP32=False)
    assert len(kept16) == len(fp32) and len(kept) == len(full)
