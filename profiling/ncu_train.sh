#!/usr/bin/env bash
# Nsight Compute profile of the fastfactor kernels inside one training step of a compressed model.
#
#   profiling/ncu_train.sh [MODEL] [METHOD] [PARAM]
#   e.g. profiling/ncu_train.sh bert-base lowrank 0.25
#
# Keeps the kernels launched inside the NVTX range fastfactor@train_step (nested per-layer
# ranges included) whose names are fastfactor Triton kernels: cuBLAS, attention and optimizer
# kernels are skipped. --launch-count bounds the session (a step launches each layer's kernels).
source "$(dirname "$0")/common.sh"
MODEL="${1:-bert-base}"; METHOD="${2:-lowrank}"; PARAM="${3:-0.25}"
NAME="ncu-train-${MODEL}-${METHOD}-p${PARAM}"
METRICS="$(ncu_metrics)"
PARAM_ARGS=(); [[ "$METHOD" != "sparse24" ]] && PARAM_ARGS=(--param "$PARAM")

run ncu \
  --profile-from-start off \
  --nvtx --nvtx-include "$(nvtx_range train_step)" \
  --kernel-name "regex:$FF_KERNELS" \
  --launch-count 60 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  --metrics "$METRICS" \
  --force-overwrite --export "$OUT/$NAME" \
  "$PY" profiling/profile_run.py train --model "$MODEL" --method "$METHOD" "${PARAM_ARGS[@]}" \
    --warmup 3 --steps 1 ${ARGS:-}

run_to "$OUT/$NAME.csv" ncu --import "$OUT/$NAME.ncu-rep" --page raw --csv --metrics "$METRICS"
echo "summary: $OUT/$NAME.csv" >&2
