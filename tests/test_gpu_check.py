"""``python -m fastfactor.gpu_check --dry``: the GPU command's script, end to end on the CPU (tiny
shapes); what it writes has one row per sol row with measured and predicted figures, and the 2:4
decode-variant section (tests/test_gpu_check_variants.py runs it through the interpreted kernels)."""

import json
import os
import subprocess
import sys


def test_gpu_check_dry(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTFACTOR_SOL_CACHE"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "fastfactor.gpu_check", "--dry", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = json.loads((out / "gpu-check.json").read_text())
    assert d["meta"]["dry"] is True and d["meta"]["predictions"] == "predicted, not measured"
    assert len(d["rows"]) == 4
    for r in d["rows"]:
        assert not r["error"], r
        for f in ("ours", "dense", "unfused"):
            assert r[f"{f}_ms"] > 0 and r[f"{f}_pred_ms"] > 0, (f, r)
    (mon,) = [r for r in d["rows"] if r["row"] == "monarch-dry-fwd"]   # timed again with the split off
    assert "ksplit_off" in mon["alternatives"] and " ms (" in mon["alternatives"]
    v = d["decode_variants"]   # the 2:4 decode variants (the reference stands in without the interpreter)
    assert v["rows"] and not any(r.get("error") for r in v["rows"]), v
    assert {r["op"] for r in v["rows"]} >= {"decode", "dense", "dx_decode", "dense_dx"}
    assert all(r["measured_us"] > 0 for r in v["rows"]) and all(r["pred_us"] > 0 for r in v["rows"] if r["op"] == "decode")
    md = (out / "gpu-check.md").read_text()
    assert "DRY RUN" in md and "| row |" in md
    assert "## 2:4 decode variants" in md and "| op | tokens | plan |" in md
    assert (out / "gpu-check.csv").read_text().count("\n") == 5


def test_gpu_check_refuses_without_a_gpu_unless_dry(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    p = subprocess.run([sys.executable, "-m", "fastfactor.gpu_check", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--dry" in p.stderr
