"""profiling/: the Nsight scripts are valid bash and print the intended command lines (dry run),
and the Python driver they profile runs on the CPU in its tiny mode, emitting the NVTX ranges
the ncu filters select."""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from fastfactor import profiling

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROF = ROOT / "profiling"
SCRIPTS = sorted(p.name for p in PROF.glob("*.sh"))

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")


def _driver():
    spec = importlib.util.spec_from_file_location("profile_run", PROF / "profile_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_bash
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_valid_bash(script):
    r = subprocess.run(["bash", "-n", str(PROF / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _dry(script, *args, tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PY=sys.executable)
    r = subprocess.run(["bash", str(PROF / script), *args], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stderr


@needs_bash
def test_nsys_kernel_command_line(tmp_path):
    out = _dry("nsys_kernel.sh", "monarch", "768x3072", "16", "4", "fwd", tmp_path=tmp_path)
    line = [s for s in out.splitlines() if s.startswith("+ nsys profile")][0]
    for flag in ("--trace=cuda,nvtx", "--capture-range=cudaProfilerApi", "--capture-range-end=stop",
                 "--cuda-graph-trace=node", "profile_run.py kernel --method monarch --shape 768x3072",
                 "--tokens 16 --param 4 --direction fwd"):
        assert flag in line, flag
    assert "nsys stats" in out and "cuda_gpu_kern_sum,nvtx_sum" in out
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


@needs_bash
def test_ncu_kernel_command_line_filters_by_nvtx_and_kernel_name(tmp_path):
    out = _dry("ncu_kernel.sh", "lowrank", "4096x4096", "4096", "0.25", "fwd", tmp_path=tmp_path)
    line = [s for s in out.splitlines() if s.startswith("+ ncu --profile-from-start off")][0]
    assert f"--nvtx --nvtx-include {profiling.qualified('kernel')}/" in line
    assert f"--kernel-name regex:{profiling.kernel_regex('lowrank')}" in line
    assert "_decode_kernel" in profiling.kernel_regex("lowrank")      # the few-token launches too
    assert "dram__throughput.avg.pct_of_peak_sustained_elapsed" in line
    assert "--section SpeedOfLight" in line and "--export" in line
    assert "ncu --import" in out


@needs_bash
@pytest.mark.parametrize("script", ["nsys_train.sh", "ncu_train.sh"])
def test_train_scripts_profile_the_train_step(script, tmp_path):
    out = _dry(script, "minilm", "lowrank", "0.5", tmp_path=tmp_path)
    assert "profile_run.py train --model minilm --method lowrank --param 0.5" in out
    if script.startswith("ncu"):
        assert f"--nvtx-include {profiling.qualified('train_step')}/" in out


@pytest.mark.parametrize("method", ["lowrank", "monarch", "sparse24", "dense_sparse"])
def test_driver_kernel_case_emits_one_range_per_step(method, recorder, capsys):
    assert _driver().main(["kernel", "--small", "--method", method, "--device", "cpu", "--dtype", "fp32"]) == 0
    assert "case=kernel" in capsys.readouterr().out
    assert recorder.pushed[0].startswith(f"mark:{method}")
    assert recorder.pushed[1:] == ["kernel", "kernel"] and recorder.depth == 0


def test_driver_train_case_emits_step_and_layer_ranges(recorder, capsys):
    pytest.importorskip("transformers")
    assert _driver().main(["train", "--small", "--model", "bert-base", "--method", "lowrank",
                           "--param", "0.5", "--device", "cpu", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "swapped_layers=12" in out and "layer_ranges=12" in out
    steps = [p for p in recorder.pushed if p == "train_step"]
    layers = [p for p in recorder.pushed if p.startswith("lowrank.fwd:encoder.layer.")]
    assert len(steps) == 2 and len(layers) == 2 * 12 and recorder.depth == 0


def test_kernel_filters_name_every_registered_kernel():
    """ncu's kernel-name filters come from the registry: every ``@triton.jit`` kernel function of
    ``kernels/*.py`` (names ending in ``_kernel``) is in the full filter and in its family's, and the
    static fallback of ``profiling/common.sh`` lists the same names."""
    import re

    defined = set()
    for path in (ROOT / "kernels").glob("*.py"):
        src = path.read_text()
        defined |= set(re.findall(r"@triton\.jit\s+def (\w+_kernel)\(", src))
    assert defined and set(profiling.kernel_names()) == defined
    fam = {m: set(profiling.kernel_names(m)) for m in profiling.METHOD_FAMILIES}
    assert {"_rows_kernel", "_wgrad_pair_kernel"} <= fam["monarch"] == fam["block_lowrank"]
    assert {"_sp_decode_kernel", "_ds_rank_split_kernel", "_gemm_kernel"} <= fam["dense_sparse"]
    assert "_rows_kernel" not in fam["lowrank"] and "_sp_decode_kernel" not in fam["monarch"]
    static = re.search(r"FF_KERNELS_STATIC='([^']*)'", (PROF / "common.sh").read_text()).group(1)
    assert static == profiling.kernel_regex()
    with pytest.raises(ValueError, match="method: expected one of"):
        profiling.kernel_names("dense")
