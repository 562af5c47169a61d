"""Measured device figures (``kernels._cost.calibrated``, ``FASTFACTOR_DEVICE_FIGURES``,
``fastfactor sol --figures``): a gpu-check run's ceilings replace the model's leads, for the
model and for the dispatchers' path choice alike; bad files are refused with the file named."""

import json
import math
import os
import subprocess
import sys

import pytest

from fastfactor.kernels import _cost

CEILINGS = {"matmul_tflops": 700.0, "copy_tbs": 4.1, "l2_read_tbs": 8.0, "launch_us": 2.2}


def _gpu_check_file(path, ceilings=CEILINGS, **meta):
    m = dict(schema="fastfactor-gpu-check/1", device="NVIDIA H200 (test figures)", dry=False,
             model_device="h200", commit="0123456789abcdef", date="2026-12-03 12:00 UTC", ceilings=ceilings)
    m.update(meta)
    path.write_text(json.dumps(dict(meta=m, rows=[])))
    return str(path)


def test_calibrated_by_hand():
    d = _cost.calibrated(_cost.H200, CEILINGS, "gc.json")
    assert d.hbm_bw == pytest.approx(4.1e12) and d.bf16_rate == pytest.approx(700e12)
    assert d.tf32_rate == pytest.approx(_cost.H200.tf32_rate * 700 / 790)   # the datasheet ratio kept
    assert d.l2_bw == d.l2_bw_low == pytest.approx(8.0e12)                  # measured: no range
    assert d.launch_s == pytest.approx(2.2e-6)
    assert d.sms == _cost.H200.sms and d.hmma_fraction == _cost.H200.hmma_fraction   # not measured: leads
    assert d.figures == "gc.json" and d.sources[0].startswith("measured (gc.json)")
    assert _cost.H200.figures == "leads" and _cost.H200.launch_s == 2.5e-6  # the lead itself is untouched
    part = _cost.calibrated(_cost.H200, {"launch_us": 3.0, "copy_tbs": None}, "x")
    assert part.launch_s == pytest.approx(3e-6) and part.hbm_bw == _cost.H200.hbm_bw and part.l2_bw_low == 5.5e12
    assert _cost.calibrated(_cost.H200, {}, "x") is _cost.H200
    # L2: gpu-check's probe kernel first, torch's sum when the probe is missing
    both = _cost.calibrated(_cost.H200, {"l2_triton_tbs": 7.5, "l2_read_tbs": 6.0}, "x")
    assert both.l2_bw == both.l2_bw_low == pytest.approx(7.5e12) and "l2_triton_tbs" in both.sources[0]
    for bad in (0, -1.0, float("nan"), "4.3", True):
        with pytest.raises(ValueError, match=r"ceilings\.copy_tbs: expected a positive number"):
            _cost.calibrated(_cost.H200, {"copy_tbs": bad}, "x")


def test_read_figures_refuses_what_is_not_a_gpus(tmp_path):
    key, ceil, origin = _cost.read_figures(_gpu_check_file(tmp_path / "gc.json"))
    assert key == "h200" and ceil == CEILINGS and "NVIDIA H200" in origin and "0123456789ab" in origin
    cases = [
        (_gpu_check_file(tmp_path / "dry.json", dry=True), "dry run"),
        (_gpu_check_file(tmp_path / "dev.json", model_device="a100"), "model_device: expected one of"),
        (_gpu_check_file(tmp_path / "ceil.json", ceilings=[1, 2]), "meta.ceilings"),
        (_gpu_check_file(tmp_path / "schema.json", schema="fastfactor-sol/1"), "expected a gpu-check.json"),
        (str(tmp_path / "missing.json"), "could not read"),
    ]
    (tmp_path / "text.json").write_text("not json")
    cases.append((str(tmp_path / "text.json"), "could not read"))
    for path, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            _cost.read_figures(path)
        assert "FASTFACTOR_DEVICE_FIGURES" in str(e.value)


_PROBE = """
import json, dataclasses
from fastfactor.kernels import _cost, sparse24, lowrank
from fastfactor.sol.device import get_device
d = _cost.DEFAULT
plan = sparse24.decode_plan_cost(16, 4096, 4096, 132, 2)
print(json.dumps(dict(figures=d.figures, launch=d.launch_s, l2=d.l2_bw, l2_low=d.l2_bw_low,
                      same=get_device('h200') is d and lowrank.COST_DEVICE is d,
                      sp=[sparse24._LAUNCH, sparse24._BW, sparse24._L2BW_LOW], plan=list(plan))))
"""


def _probe(env_path):
    env = {k: v for k, v in os.environ.items() if k not in (_cost.FIGURES_ENV, "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
    if env_path:
        env[_cost.FIGURES_ENV] = env_path
    p = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    return p


def test_figures_env_reaches_the_dispatchers(tmp_path):
    lead = _probe(None)
    assert lead.returncode == 0, lead.stderr[-2000:]
    lead = json.loads(lead.stdout.strip().splitlines()[-1])
    assert lead["figures"] == "leads" and lead["same"] and lead["sp"] == [2.5e-6, 4.3e12, 5.5e12]
    path = _gpu_check_file(tmp_path / "gc.json", ceilings=dict(CEILINGS, l2_read_tbs=9.0))
    cal = _probe(path)
    assert cal.returncode == 0, cal.stderr[-2000:]
    cal = json.loads(cal.stdout.strip().splitlines()[-1])
    assert cal["figures"].startswith("gc.json") and cal["same"]
    assert cal["launch"] == pytest.approx(2.2e-6) and cal["l2"] == cal["l2_low"] == pytest.approx(9e12)
    assert cal["sp"] == pytest.approx([2.2e-6, 4.1e12, 9e12])
    # the decode planner with a measured 9 TB/s (no low end to hedge against) takes the narrow plan
    # that only the lead's range kept it from (BENCHMARKS: 32 rows x 1 split against 128 x 4)
    assert lead["plan"][1:] == [128, 4] and cal["plan"][1:] == [32, 1]
    assert cal["plan"][0] < lead["plan"][0]
    bad = _probe(str(tmp_path / "missing.json"))
    assert bad.returncode != 0 and "FASTFACTOR_DEVICE_FIGURES" in bad.stderr


def test_sol_cli_figures(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (_cost.FIGURES_ENV, "TRITON_INTERPRET")}
    args = [sys.executable, "-m", "fastfactor.cli", "sol", "--methods", "monarch", "--shapes", "96x160",
            "--tokens", "24", "--nblocks", "4", "--directions", "fwd", "--configs", "fixed"]
    runs = {}
    for name, extra in (("leads", []), ("measured", ["--figures", _gpu_check_file(tmp_path / "gc.json")])):
        out = tmp_path / f"{name}.json"
        p = subprocess.run(args + extra + ["--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        runs[name] = json.loads(out.read_text())
    lead, meas = runs["leads"], runs["measured"]
    assert lead["meta"]["figures"] == "leads" and meas["meta"]["figures"].startswith("gc.json")
    assert meas["meta"]["device_figures"]["launch_s"] == pytest.approx(2.2e-6)
    assert meas["meta"]["sources"][0].startswith("measured (gc.json")
    # a tiny forward is launch-bound: its prediction moves by the floor's change at least in part
    (rl,), (rm,) = lead["rows"], meas["rows"]
    assert rm["predicted_ms"] < rl["predicted_ms"] and not math.isclose(rm["dense_ms"], rl["dense_ms"])
    bad = subprocess.run(args + ["--figures", _gpu_check_file(tmp_path / "dry.json", dry=True)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "--figures" in bad.stderr and "dry run" in bad.stderr


def test_gpu_check_figures_file_and_children(tmp_path, monkeypatch):
    from fastfactor import gpu_check as G

    assert G._figures_file(CEILINGS, "cpu (dry run)", True, "h200", str(tmp_path)) is None
    assert G._figures_file({}, "NVIDIA H200", False, "h200", str(tmp_path)) is None
    path = G._figures_file(CEILINGS, "NVIDIA H200", False, "h200", str(tmp_path))
    key, ceil, origin = _cost.read_figures(path)
    assert key == "h200" and ceil == CEILINGS and origin.startswith("figures.json: NVIDIA H200")
    seen = []
    monkeypatch.setattr(G.subprocess, "Popen", lambda cmd, env, **kw: seen.append(env))
    monkeypatch.setenv(_cost.FIGURES_ENV, "/somewhere/else.json")
    G._predict_child({}, str(tmp_path / "p.json"), "h200")
    G._predict_child({}, str(tmp_path / "q.json"), "h200", path)
    assert _cost.FIGURES_ENV not in seen[0]          # the lead predictions: the leads, whatever the caller set
    assert seen[1][_cost.FIGURES_ENV] == path


_L2_PROBE_RUN = """
import torch
from fastfactor import gpu_check as G
from fastfactor.bench import timing
from fastfactor.kernels import _config
assert _config.is_interpreter()
# the figure from two pass counts, the clock stood in for (no timing is asserted): t = 5 us + 1 us a pass
calls = []
def fake(fns, device, **kw):
    calls.append(fns[0])
    return timing.Timing(ms=(5 + len(calls) * 2 - 1) * 1e-3, mode="fake")
timing.time_calls = fake
tbs = G.l2_triton_tbs(torch.device('cpu'), n=4 * 64, reps=(1, 3), block=64)   # checks its sums itself
assert abs(tbs - 2 * 4 * 64 * 4 / 2e-6 / 1e12) < 1e-12, tbs          # 2 passes of 1 KiB in 2 us
timing.time_calls = lambda fns, device, **kw: timing.Timing(ms=0.01, mode="fake")
try:
    G.l2_triton_tbs(torch.device('cpu'), n=4 * 64, reps=(1, 3), block=64)
    raise AssertionError("a probe timed no slower at more passes must fail")
except RuntimeError as e:
    assert "no slower" in str(e)
k = G._l2_probe_kernel()
src = torch.arange(12 * 16, dtype=torch.float32)
out = torch.empty((5, 16))
k[(5,)](src, out, src.numel(), REPS=2, BLOCK=16)   # 12 chunks over 5 programs, each pass rotated
want = torch.zeros(5, 16)
for r in range(2):
    for c in range(12):
        want[(c - r) % 5] += src[c * 16:(c + 1) * 16]
assert torch.equal(out, want), (out, want)
print("ok")
"""


def test_l2_probe_kernel_under_the_interpreter():
    """gpu-check's L2 probe (run on a GPU only by gpu-check) reads every chunk once a pass, the
    passes rotated over the programs: its sums by hand; its figure from the two pass counts' times
    (a stand-in clock: nothing timed is asserted), and a clear error when they do not grow."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _L2_PROBE_RUN], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout[-2000:] + p.stderr[-3000:]
