"""The decode kernels' per-instruction models (``DECODE_ISSUE``, ``DXD_ISSUE``) against fresh sm_90
builds of the launches ``fastfactor sol`` records (compiled ahead of time, cached on disk)."""

from __future__ import annotations

import pytest

from fastfactor.kernels import _config
from fastfactor.kernels import sparse24 as K

pytestmark = pytest.mark.skipif(not _config.is_interpreter(), reason="counting needs TRITON_INTERPRET=1")


def _row(tokens, direction):
    from fastfactor.sol import budgets
    from fastfactor.sol.device import H200
    from fastfactor.sol.rows import RowSpec, evaluate_row

    row = evaluate_row(RowSpec("sparse24", 4096, 4096, tokens, None, direction), H200)
    budgets.attach_sass(row)
    return row, H200


# the expanding forward decode at 20 tokens (up to 16 a bf16 row takes the sparse tensor cores:
# tests/sparse24/test_decode_mma.py checks that launch's model against its build)
@pytest.mark.parametrize("tokens,direction,kernel", [(20, "fwd", "sparse24.decode"),
                                                     (16, "fwd+bwd", "sparse24.dx_decode"),
                                                     (64, "fwd+bwd", "sparse24.dvalues")])
def test_issue_model_against_compiled_sass(tokens, direction, kernel):
    """The model's warp-instructions of the launch within -15 % / +20 % of the compiled sm_90
    loops at their trip counts (the GPU build: byte permutes, the split's counters); the build
    neither spills nor loses its vector loads; the term that binds the launch: the forward decode
    its DRAM bytes; the backward's dx-decode at 16 tokens, which also forms the kept values'
    gradient there (``HAS_DV``), its instruction issue (the term this model prices); the kept-value
    kernel at 64 tokens (its own launch there) its L2 traffic."""
    from fastfactor.sol import model as SM

    row, dev = _row(tokens, direction)
    (e,) = [e for e in row["detail"] if e["kernel"] == kernel]
    if kernel != "sparse24.dvalues":
        assert e["constexprs"]["PRMT"] == 2                  # recorded as a GPU launches it
    f = e["sass"]
    assert "error" not in f, f
    assert f["stl"] == 0 and f["ldl"] == 0 and f["ldgsts128"] > 0
    model_w = e["issue"]["warp_instructions"]
    it = SM.issue_term(e, f, dev)
    assert isinstance(it["trips"], list), it
    assert 0.85 * it["warp_instructions"] <= model_w <= 1.2 * it["warp_instructions"], (model_w, it)
    want = {"sparse24.decode": "dram", "sparse24.dx_decode": "issue", "sparse24.dvalues": "l2"}[kernel]
    assert e["bound"] == want, (e["bound"], e["terms"])
    if kernel == "sparse24.dx_decode":
        assert e["constexprs"]["HAS_DV"] and not any(x["kernel"] == "sparse24.dvalues" for x in row["detail"])
    else:
        assert it["seconds"] < e["terms"][want]


def test_issue_models_shape():
    # the loop runs ceil(K / BLOCK_K) times; a split adds the reducer's loop (once on average)
    w, trips = K.decode_warp_instructions(128, 16, 128, 8, 1024, True, prmt=True)
    assert trips == [8, 1]
    w1, t1 = K.decode_warp_instructions(128, 16, 128, 8, 4096, False, prmt=True)
    assert t1 == [32] and 3 * w < w1 < 5 * w
    # the byte permutes issue fewer instructions a weight than compare-and-select on wide tiles
    assert K.decode_warp_instructions(128, 16, 128, 8, 4096, False, prmt=True)[0] < \
        K.decode_warp_instructions(128, 16, 128, 8, 4096, False, prmt=False)[0]
    assert K.dx_decode_warp_instructions(64, 16, 128, 4, 2048, True, prmt=True)[0] < \
        K.dx_decode_warp_instructions(64, 16, 128, 4, 2048, True, prmt=False)[0]
    # what sol registers: the recorded constexprs decide the expansion
    im = K._cost.ISSUE_MODELS["sparse24.decode"]
    ints = dict(K=4096, K_PER_SPLIT=1024)
    cx, cfg = dict(BLOCK_N=128, BLOCK_M=16, SPLIT=True), dict(BLOCK_K=128, num_warps=8)
    assert im(ints, dict(cx, PRMT=2, EVEN=True), cfg, (128,)) == (w, trips)
    assert im(ints, dict(cx, PRMT=0, EVEN=True), cfg, (128,))[0] > w
    # masked loads (a partial tile somewhere: EVEN false) issue more than whole tiles
    masked = im(ints, dict(cx, PRMT=2, EVEN=False), cfg, (128,))
    assert masked == K.decode_warp_instructions(128, 16, 128, 8, 1024, True, prmt=True, even=False) and masked[0] > w
    assert K.decode_even(4096, 4096, 128) and not K.decode_even(4000, 4096, 128) and not K.decode_even(4096, 4000, 128)
