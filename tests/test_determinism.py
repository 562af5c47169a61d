"""Tier 1 (cpu): ``fastfactor.determinism`` and bitwise run-to-run reproducibility of every backward.

* the kernels use no atomics on data (a grep over ``kernels/*.py``, so a new kernel that adds one
  fails here and must be reviewed for determinism); the only atomics allowed act on a
  synchronization counter argument named ``cnt_ptr`` (the low-rank decode kernels' role tickets and
  waits: they order launches of work, never the terms of a sum);
* ``set_deterministic`` / ``is_deterministic`` / ``deterministic()`` and PyTorch's own switch;
* forward + backward of every op twice on the same inputs give bitwise identical outputs and
  gradients, on the reference path and on the interpreted Triton kernels (both kernel paths),
  in fp32/fp16/bf16, within one process and in a second process;
* deterministic mode launches one fixed config instead of the autotuner for the Monarch and the
  2:4 / dense-sparse families (every launcher is a ``kernels._config.Tunable``; the low-rank
  family's own test is in ``tests/lowrank/test_kernels.py``), and on a GPU that config is a real tile
  that the family's prune function keeps.
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
from conftest import CountLaunches
from test_fuzz_ops import OPS, backend, has_op, make_case, op_variants

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
            m = re.search(r"\batomic_\w+\s*\(\s*([\w]+)", code)
            if m and m.group(1) != "cnt_ptr":   # counters (tickets, waits) order programs, not sums
                hits.append(f"{f.name}:{i}: {line.strip()}")
    assert not hits, "atomics make reductions order-dependent; review determinism:\n" + "\n".join(hits)


def test_counter_atomics_only_in_the_decode_kernels():
    """Every ``atomic_*`` call of the kernels acts on ``cnt_ptr``, and ``cnt_ptr`` is only ever a
    counter (never a tensor whose values are summed): the int32 arrival counters of the one-launch
    split reductions (kernels/_split.py: the 2:4 decode kernels, the Monarch split stage 1) and the
    low-rank kernel's."""
    hits = []
    for f in sorted(KERNELS_DIR.glob("*.py")):
        text = f.read_text()
        for m in re.finditer(r"\batomic_\w+\s*\(\s*(\w+)", text):
            hits.append((f.name, m.group(1)))
    assert {h for h in hits} <= {("lowrank.py", "cnt_ptr"), ("sparse24.py", "cnt_ptr"), ("_split.py", "cnt_ptr"),
                                 ("monarch.py", "cnt_ptr")}, hits
    assert ("_split.py", "cnt_ptr") in hits
    src = (KERNELS_DIR / "_split.py").read_text()
    assert "cnt_ptr,     # SYNC: int32 arrival counters, one per tile" in src
    src = (KERNELS_DIR / "monarch.py").read_text()   # the split stage 1's arrival counters
    assert "cnt_ptr,   # KSPLIT and SYNC: int32 arrival counters" in src
    src = (KERNELS_DIR / "lowrank.py").read_text()
    assert "cnt_ptr,   # (4,) int32 counters" in src
    src = (KERNELS_DIR / "sparse24.py").read_text()   # the split 2:4 decode's arrival counters
    assert "cnt_ptr,    # SPLIT and SYNC: (N_TILES,) int32 arrival counters" in src


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


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("op,be,path", op_variants())
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


# --------------------------------------------------------------------------------------------
# deterministic mode launches one fixed config: Monarch and 2:4 / dense-sparse families
# --------------------------------------------------------------------------------------------

class _Boom:
    """Stands in for a family's ``triton.autotune`` object: any launch through it fails."""

    def __getitem__(self, grid):
        raise AssertionError("autotuner used in deterministic mode")


def _grads(fn, leaves):
    y = fn()
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    return [y.detach()] + list(torch.autograd.grad(y, leaves, g))


def _assert_bypass(run, tunables, monkeypatch, used):
    """Every launcher is a ``Tunable``; ``run()`` launches each of ``used`` through its autotuner
    outside deterministic mode, gives the same bits with every autotuner replaced by
    :class:`_Boom` inside the mode, and fails through them outside it again."""
    from fastfactor.kernels._config import Tunable

    assert all(isinstance(t, Tunable) for t in tunables.values()), {k: type(t).__name__ for k, t in tunables.items()}
    counters = {}
    for name, t in tunables.items():
        counters[name] = CountLaunches(t.tuned)
        monkeypatch.setattr(t, "tuned", counters[name])
    first = run()
    assert all(counters[name].n > 0 for name in used), {k: c.n for k, c in counters.items()}
    for t in tunables.values():
        monkeypatch.setattr(t, "tuned", _Boom())
    with D.deterministic(torch_algorithms=False):
        second = run()
    assert len(first) == len(second) >= 2 and all(torch.isfinite(a).all() for a in first)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output/grad #{i} differs from the autotuned launch"
    with pytest.raises(AssertionError, match="autotuner used"):
        run()  # outside the mode the autotuner is back


@pytest.mark.parametrize("strided", [True, False], ids=["monarch", "block_lowrank"])
@pytest.mark.parametrize("path", ["fused", "two_stage", "rows"])
def test_monarch_deterministic_mode_bypasses_the_autotuner(path, strided, monkeypatch, triton_cpu):
    """Forward and every gradient of the Monarch family, both kernel paths, with a recomputed
    ``h`` (only ``w2`` asks for it) as well as a saved one."""
    from fastfactor.kernels import monarch as MK
    from fastfactor.ops.monarch import block_lowrank_linear, monarch_linear

    monkeypatch.setenv("FASTFACTOR_MONARCH_PATH", path)
    f = monarch_linear if strided else block_lowrank_linear
    s1, s2 = MK.factor_shapes(19, 13, 2, 3)
    x = torch.randn(7, 39)[:, ::2].requires_grad_()        # non-contiguous, in = 19
    w1 = (torch.randn(s1) / 3).requires_grad_()
    w2 = (torch.randn(s2) / 3).requires_grad_()
    b = torch.randn(13).requires_grad_()

    def run():
        full = _grads(lambda: f(x, w1, w2, b, out_features=13), [x, w1, w2, b])
        # the backward recomputes h through the two-stage forward when only w2 needs a gradient
        with torch.no_grad():
            y, _ = torch.ops.fastfactor.monarch_fwd(x.detach(), w1, w2, None, 13, strided, False)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
        _, _, dw2, _ = torch.ops.fastfactor.monarch_bwd(
            g, x.detach(), w1.detach(), w2.detach(), torch.empty(0), strided, False, False, False, True
        )
        return full + [dw2]

    tunables = {"chain": MK._chain_tuned, "bgemm": MK._bgemm_tuned, "rows": MK._rows_tuned, "wgrad": MK._wgrad_tuned,
                "wgrad_pair": MK._wgrad_pair_tuned, "rows_dw2": MK._rows_dw2_tuned, "rows_ks": MK._rows_ks_tuned}
    # rows: the full backward at these 7 rows is the one-launch form (rows_dw2); the dw2-only one
    # recomputes h by the row-block forward, then one weight-gradient launch
    used = {"fused": ["chain", "bgemm"], "two_stage": ["bgemm"], "rows": ["rows", "rows_dw2", "wgrad"]}[path]
    _assert_bypass(run, tunables, monkeypatch, used=used)


@pytest.mark.parametrize("path", ["fused", "two_kernel", "rank_split", "roles"])
def test_sparse24_deterministic_mode_bypasses_the_autotuner(path, monkeypatch, triton_cpu):
    """2:4 pruning, ``sparse24_linear`` and ``dense_sparse_linear`` (its fused, two-kernel,
    rank-split and two-role forwards; the two-kernel path and backward also use the low-rank family's GEMM,
    the rank split's and the two roles' backward is the library one, its dense side one launch of
    ours at these 7 rows) forward and every gradient."""
    from fastfactor.kernels import lowrank as LK
    from fastfactor.kernels import sparse24 as SK
    from fastfactor.ops.sparse24 import dense_sparse_linear, pack_24, prune_24, sparse24_linear

    monkeypatch.setenv("FASTFACTOR_DS_PATH", path)
    w_dense = torch.randn(13, 20)
    s_dense = torch.randn(5, 20)
    x = torch.randn(7, 41)[:, 1::2].requires_grad_()       # non-contiguous, in = 20
    d = (torch.randn(11, 5) / 2).requires_grad_()
    b = torch.randn(13).requires_grad_()
    b2 = torch.randn(11).requires_grad_()

    def run():
        pw = prune_24(w_dense)
        w = pack_24(pw)
        s = pack_24(prune_24(s_dense))
        wv = w.values.clone().requires_grad_()
        sv = s.values.clone().requires_grad_()
        out = [pw]
        out += _grads(lambda: sparse24_linear(x, SK.Sparse24Weight(wv, w.meta, w.shape), b), [x, wv, b])
        out += _grads(lambda: dense_sparse_linear(x, d, SK.Sparse24Weight(sv, s.meta, s.shape), b2),
                      [x, d, sv, b2])
        return out

    # a handful of rows: the forward, the dense-sparse t = x·Sᵀ and dx run the decode kernels
    tunables = {"prune": SK._prune24_tuned, "decode": SK._sp_decode_tuned, "dx": SK._sp_dx_decode_tuned,
                "dvalues": SK._sp_dv_tuned, "ds_chain": SK._ds_chain_tuned, "lowrank.gemm": LK._gemm_tuned,
                "ds_rank_split": SK._ds_rank_split_tuned, "ds_bwd_dense": SK._ds_bwd_dense_tuned,
                "ds_roles": SK._ds_roles_tuned}
    # on the library backward (rank split, roles) at these 7 rows the kept values' gradient comes out
    # of the dx-decode launch (HAS_DV), for sparse24_linear too: its own kernel only on the others
    only = {"ds_chain": ("fused",), "ds_rank_split": ("rank_split",), "ds_roles": ("roles",),
            "ds_bwd_dense": ("rank_split", "roles"), "dvalues": ("fused", "two_kernel"),
            "lowrank.gemm": ("fused", "two_kernel")}
    used = [n for n in tunables if path in only.get(n, (path,))]
    _assert_bypass(run, tunables, monkeypatch, used)


def test_fixed_configs_on_a_gpu_are_real_tiles_that_pass_the_prune(monkeypatch):
    """Outside the interpreter the fixed config is the first GPU entry of each space (not the
    interpreter's tiny one) that the family's prune function keeps, called as the autotuner
    calls it (``prune(configs, named_args, **kwargs)``)."""
    from fastfactor.kernels import _config
    from fastfactor.kernels import monarch as MK
    from fastfactor.kernels import sparse24 as SK

    monkeypatch.setattr(_config, "is_interpreter", lambda: False)
    chain = MK._chain_tuned.fixed_config(dict(R=1, SB=5, M=7)).kwargs
    assert chain != {k: v for k, v in MK.CHAIN_SPACE[0].items() if k.startswith("BLOCK")}
    assert chain["BLOCK_R"] <= 16 and chain["BLOCK_N"] <= 64   # what _prune_chain keeps for r=1, nb=5
    wide = MK._chain_tuned.fixed_config(dict(R=64, SB=256)).kwargs
    assert wide == {k: v for k, v in MK.CHAIN_SPACE[1].items() if k.startswith("BLOCK")}
    assert MK._bgemm_tuned.fixed_config({}).kwargs == {
        k: v for k, v in MK.BGEMM_SPACE[1].items() if k.startswith("BLOCK")
    }
    ds = SK._ds_chain_tuned.fixed_config(dict(R_PAD=256)).kwargs
    assert ds["BLOCK_M"] * 256 <= 16384 and ds["BLOCK_K"] * 256 <= 16384 and ds["BLOCK_M"] >= 16
    assert ds != {k: v for k, v in SK.DS_SPACE[0].items() if k.startswith("BLOCK")}
    for tun, space in ((SK._sp_mm_tuned, SK.MM_SPACE), (SK._sp_dx_tuned, SK.DX_SPACE),
                       (SK._sp_dv_tuned, SK.DV_SPACE), (SK._prune24_tuned, SK.PRUNE_SPACE)):
        assert tun.fixed_config({}).kwargs == {k: v for k, v in space[1].items() if k.startswith("BLOCK")}
