"""Tier 1 (cpu): ``fastfactor.determinism`` and bitwise run-to-run reproducibility of every backward.

* the kernels use no atomics (a grep over ``kernels/*.py``, so a new kernel that adds one fails
  here and must be reviewed for determinism);
* ``set_deterministic`` / ``is_deterministic`` / ``deterministic()`` and PyTorch's own switch;
* forward + backward of every op twice on the same inputs give bitwise identical outputs and
  gradients, on the reference path and on the interpreted Triton kernels (both kernel paths),
  in fp32/fp16/bf16, within one process and in a second process.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from test_fuzz_ops import OPS, PATH_ENV, backend, has_op, make_case

from fastfactor import determinism as D

KERNELS_DIR = pathlib.Path(__file__).resolve().parent.parent / "kernels"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# two row blocks, K tiles and N tiles of the interpreter's 16-wide config; odd sizes
SHAPE = dict(lead=(3, 7), k=20, n=19, r=3, nblocks=2, layout="sliced", bias=True, wt=True)


def test_no_atomics_in_any_kernel():
    files = sorted(KERNELS_DIR.glob("*.py"))
    assert len(files) >= 3, f"expected the kernel modules in {KERNELS_DIR}, found {files}"
    hits = []
    for f in files:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\batomic_\w+\s*\(", code):
                hits.append(f"{f.name}:{i}: {line.strip()}")
    assert not hits, "atomics make reductions order-dependent; review determinism:\n" + "\n".join(hits)


def test_flag_follows_set_deterministic_and_torch_switch():
    assert not D.is_deterministic()
    try:
        D.set_deterministic(True)
        assert D.is_deterministic() and torch.are_deterministic_algorithms_enabled()
        D.set_deterministic(False)
        assert not D.is_deterministic() and not torch.are_deterministic_algorithms_enabled()
        D.set_deterministic(True, torch_algorithms=False)
        assert D.is_deterministic() and not torch.are_deterministic_algorithms_enabled()
        D.set_deterministic(False)
        torch.use_deterministic_algorithms(True)  # PyTorch's switch alone turns ours on too
        assert D.is_deterministic()
    finally:
        D.set_deterministic(False)
    assert not D.is_deterministic()


def test_context_manager_restores_both_flags():
    with D.deterministic():
        assert D.is_deterministic() and torch.are_deterministic_algorithms_enabled()
        with D.deterministic(False):
            assert not D.is_deterministic()
        assert D.is_deterministic()
    assert not D.is_deterministic() and not torch.are_deterministic_algorithms_enabled()


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="enabled"):
        D.set_deterministic(1)
    with pytest.raises(TypeError, match="torch_algorithms"):
        D.set_deterministic(True, torch_algorithms="yes")
    with pytest.raises(ValueError, match="space"):
        D.fixed_config([])
    with pytest.raises(TypeError, match="seed"):
        D.seed_everything(1.5)


def test_fixed_config_prefers_a_real_gpu_tile_that_fits():
    space = [dict(BLOCK_M=16), dict(BLOCK_M=128), dict(BLOCK_M=64)]
    assert D.fixed_config(space) == dict(BLOCK_M=128)
    assert D.fixed_config(space, fits=lambda c: c["BLOCK_M"] <= 64) == dict(BLOCK_M=16)
    assert D.fixed_config(space[:1]) == dict(BLOCK_M=16)
    got = D.fixed_config(space)
    got["BLOCK_M"] = 1
    assert space[1]["BLOCK_M"] == 128  # a copy


def test_seed_everything_reproduces_torch_draws():
    D.seed_everything(5)
    a = torch.rand(4)
    g = D.seed_everything(5)
    assert torch.equal(a, torch.rand(4)) and torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(5)))


def _run_once(op, dtype, seed=11):
    case = make_case(op, dtype=dtype, seed=seed, **SHAPE)
    x, ps = case.leaves()
    y = case.run(x, ps)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    y.backward(g)
    return [y.detach()] + [t.grad for t in [x] + ps]


def _variants():
    out = []
    for op in OPS:
        for be, paths in (("ref", [None]), ("triton", PATH_ENV[op][1])):
            for path in paths:
                out.append(pytest.param(op, be, path, id=f"{op}-{be}" + (f"-{path}" if path else "")))
    return out


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("op,be,path", _variants())
def test_backward_is_bitwise_reproducible(op, be, path, dtype):
    if not has_op(op):
        pytest.skip(f"{op} op not present")
    with D.deterministic(), backend(be, op, path):
        first = _run_once(op, DTYPES[dtype])
        second = _run_once(op, DTYPES[dtype])
    assert len(first) == len(second) >= 3
    for i, (a, b) in enumerate(zip(first, second)):
        assert a is not None and torch.isfinite(a.float()).all(), f"output/grad #{i} missing or non-finite"
        assert torch.equal(a, b), f"output/grad #{i} differs between two runs"


# --------------------------------------------------------------------------------------------
# across processes: a fresh interpreter computes the same bits
# --------------------------------------------------------------------------------------------

def _digest(dtype_name: str) -> dict:
    out = {}
    for op in OPS:
        if not has_op(op):
            continue
        for be in ("ref", "triton"):  # each op's default kernel path (the other is covered above)
            with D.deterministic(), backend(be, op):
                ts = _run_once(op, DTYPES[dtype_name])
            h = hashlib.sha256()
            for t in ts:
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
            out[f"{op}-{be}"] = h.hexdigest()
    return out


def test_backward_is_bitwise_reproducible_across_processes():
    from fastfactor.kernels import _config

    if not _config.is_interpreter():
        pytest.skip("the interpreter tier needs TRITON_INTERPRET=1")
    here = _digest("bf16")
    env = dict(os.environ, PYTHONHASHSEED="123")
    code = (
        "import sys, json; sys.path.insert(0, %r); import conftest; "
        "import test_determinism as T; print(json.dumps(T._digest('bf16')))" % str(pathlib.Path(__file__).parent)
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    assert there == here
