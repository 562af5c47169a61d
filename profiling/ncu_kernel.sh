#!/usr/bin/env bash
# Nsight Compute profile of one factorized layer's kernels (one profiled step).
#
#   profiling/ncu_kernel.sh [METHOD] [SHAPE] [TOKENS] [PARAM] [DIRECTION]
#   e.g. profiling/ncu_kernel.sh lowrank 4096x4096 4096 0.25 fwd
#
# Profiling starts at the driver's cudaProfilerStart (--profile-from-start off), keeps only
# kernels inside the NVTX range fastfactor@kernel (--nvtx-include) whose name is one of this
# family's Triton kernels (--kernel-name regex), and records speed-of-light, memory and compute
# workload sections plus the metrics BENCHMARKS.md summarises. Needs access to the GPU
# performance counters (root, or NVreg_RestrictProfilingToAdminUsers=0).
source "$(dirname "$0")/common.sh"
METHOD="${1:-lowrank}"; SHAPE="${2:-4096x4096}"; TOKENS="${3:-4096}"; PARAM="${4:-0.25}"; DIR="${5:-fwd}"
NAME="ncu-kernel-${METHOD}-${SHAPE}-M${TOKENS}-p${PARAM}-${DIR/+/_}"
METRICS="$(ncu_metrics)"

run ncu \
  --profile-from-start off \
  --nvtx --nvtx-include "$(nvtx_range kernel)" \
  --kernel-name "regex:$(family_kernels "$METHOD")" \
  --launch-count 20 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  --section LaunchStats --section Occupancy \
  --metrics "$METRICS" \
  --force-overwrite --export "$OUT/$NAME" \
  "$PY" profiling/profile_run.py kernel --method "$METHOD" --shape "$SHAPE" --tokens "$TOKENS" \
    --param "$PARAM" --direction "$DIR" --warmup 3 --steps 1 ${ARGS:-}

# One line per kernel: name, duration, achieved DRAM throughput, tensor-pipe use.
run_to "$OUT/$NAME.csv" ncu --import "$OUT/$NAME.ncu-rep" --page raw --csv --metrics "$METRICS"
echo "summary: $OUT/$NAME.csv" >&2
