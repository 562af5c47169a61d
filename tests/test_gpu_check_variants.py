"""The decode-variant section of ``fastfactor.gpu_check`` (issue 15: plan policy, PRMT default), run
tiny through the interpreted kernels: every variant launches the expansion its row names, is
checked against fp32 and timed; the environment and the autotune caches are left as found."""

import os

import pytest
import torch

from conftest import KwargSpy
from fastfactor import gpu_check as gc
from fastfactor.kernels import _config
from fastfactor.kernels import sparse24 as K

needs_kernels = pytest.mark.skipif(not (torch.cuda.is_available() or _config.is_interpreter()),
                                   reason="needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py)")


@needs_kernels
def test_decode_variants_launch_each_expansion(monkeypatch):
    seen = {"decode": [], "dx": []}
    monkeypatch.setattr(K, "_sp_decode_tuned", KwargSpy(K._sp_decode_tuned, "PRMT", seen["decode"]))
    monkeypatch.setattr(K, "_sp_dx_decode_tuned", KwargSpy(K._sp_dx_decode_tuned, "PRMT", seen["dx"]))
    monkeypatch.setenv(gc.PRMT_ENV, "auto")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with _config.cpu_backend("triton"):
        v = gc.time_decode_variants(device, dry=True, seconds=120)
    assert os.environ[gc.PRMT_ENV] == "auto"          # put back as found
    assert v["impl"] == "kernels" and "predicted" in v["predicted"]
    rows = v["rows"]
    on = 2 if device.type == "cuda" else 1
    for op, plans in (("decode", 1 + len(gc.DRY_VARIANT_PLANS)), ("dx_decode", 1)):
        got = [r for r in rows if r["op"] == op]
        assert {r["prmt"] for r in got} == {on, 0}, got
        assert len(got) in (2 * plans, 2 * plans - 2) and sum(r["pick"] for r in got) == 2, got
        for r in got:
            assert not r.get("error") and not r.get("note"), r
            assert r["measured_us"] > 0 and r["pred_us"] > 0 and r["pred_low_us"] >= r["pred_us"] * 0.999, r
            assert r["rel_err"] < 2e-2, r
    # each row's launches passed the PRMT its row names (the env var reaches the launch)
    dec = [r["prmt"] for r in rows if r["op"] == "decode"]
    assert set(seen["decode"]) == {on, 0} and seen["decode"][0] == dec[0] and seen["decode"][-1] == dec[-1]
    assert [p for p in seen["dx"]][0] == on and seen["dx"][-1] == 0
    for op in ("dense", "dense_dx"):
        assert [r for r in rows if r["op"] == op and r["measured_us"] > 0], op
    # the pick once more with the unpipelined configs offered (forward and dx, first M, PRMT on)
    for op in ("decode_unpipelined", "dx_decode_unpipelined"):
        (r,) = [r for r in rows if r["op"] == op]
        assert r["prmt"] == on and r["pick"] and r["measured_us"] > 0 and r["rel_err"] < 2e-2, r
        assert r["plan"] == next(x["plan"] for x in rows if x["op"] == op[: -len("_unpipelined")] and x["pick"])
    assert K.UNPIPELINED_ENV not in os.environ
    # the sparse tensor-core decode: its pick (and the variant plans it has), each checked against fp32
    mma = [r for r in rows if r["op"] == "decode_mma"]
    assert mma and sum(r["pick"] for r in mma) == 1 and all(isinstance(r["dispatched"], bool) for r in mma), mma
    for r in mma:
        assert not r.get("error") and not r.get("note") and r["measured_us"] > 0 and r["rel_err"] < 2e-2, r
        assert r["pred_low_us"] >= r["pred_us"] * 0.999, r
    # its pick again with the 4-bit codes and with the split partials kept: one row each per M, checked
    picks = {(r["tokens"], r["plan"]) for r in mma if r["pick"]}
    for op in ("decode_mma_4bit", "decode_mma_kept"):
        got = [r for r in rows if r["op"] == op]
        assert {(r["tokens"], r["plan"]) for r in got} == picks and len(got) == len(picks), (op, got)
        assert all(not r.get("error") and r["measured_us"] > 0 and r["rel_err"] < 2e-2 for r in got), got
    assert "FASTFACTOR_SPARSE24_CODES3" not in os.environ and "FASTFACTOR_SPLIT_DISCARD" not in os.environ
    assert len(v["summary"]) == len(gc.DRY_VARIANT_TOKENS) and "fastest decode" in v["summary"][0]
    md = gc._variants_md(v, str)
    assert "| op | tokens | plan |" in md and md.count("| decode |") == len([r for r in rows if r["op"] == "decode"])


def test_decode_variants_skip_when_time_is_spent():
    v = gc.time_decode_variants(torch.device("cpu"), dry=True, seconds=0)
    assert v["rows"] and all(r["note"] == "skipped: time budget" and "measured_us" not in r for r in v["rows"])
    assert v["summary"] == []
    assert "Not run" in gc._variants_md({"skipped": "time budget (3 s left)"}, str)


def test_own_tuning_retunes_inside_and_restores():
    class Cfg:
        kwargs, num_warps, num_stages = {"BLOCK_K": 128}, 4, 3

    class Tuned:
        cache = {("old",): "kept"}
        cache_results = True

    class Tunable:
        tuned = Tuned()

    t, picked = Tunable(), []
    with gc._own_tuning(t, picked):
        assert t.tuned.cache == {} and t.tuned.cache_results is False
        t.tuned.cache[("new",)] = Cfg()
    assert picked == ["BLOCK_K=128,w4,s3"]
    assert t.tuned.cache == {("old",): "kept"} and t.tuned.cache_results is True
    with gc._own_tuning(object(), picked):   # no autotuner: nothing to do
        pass
    # the launchers it is used on keep their tunings where it looks (Triton's Autotuner.cache)
    for tunable in (K._sp_decode_tuned, K._sp_dx_decode_tuned):
        assert isinstance(tunable.tuned.cache, dict)


def test_prmt_env_restores(monkeypatch):
    monkeypatch.setenv(gc.PRMT_ENV, "1")
    with gc._prmt_env(False):
        assert os.environ[gc.PRMT_ENV] == "0" and K.prmt_mode(True) == 0
    with gc._prmt_env(True):
        assert gc.PRMT_ENV not in os.environ and K.prmt_mode(True) > 0
    assert os.environ[gc.PRMT_ENV] == "1"


def test_unpipelined_env_restores(monkeypatch):
    monkeypatch.setenv(K.UNPIPELINED_ENV, "0")
    with gc._unpipelined_env():
        assert K.unpipelined_ok()
    assert os.environ[K.UNPIPELINED_ENV] == "0" and not K.unpipelined_ok()
    monkeypatch.delenv(K.UNPIPELINED_ENV)
    with gc._unpipelined_env():
        assert K.unpipelined_ok()
    assert K.UNPIPELINED_ENV not in os.environ
