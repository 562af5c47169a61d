#!/usr/bin/env bash
# Nsight Systems timeline of training steps of a compressed model.
#
#   profiling/nsys_train.sh [MODEL] [METHOD] [PARAM]      (extra args to the driver: env ARGS)
#   e.g. profiling/nsys_train.sh bert-base lowrank 0.25
#        profiling/nsys_train.sh minilm dense
#
# Only the profiled steps are recorded (cudaProfilerApi capture range); every step is the NVTX
# range fastfactor@train_step and every factorized layer's forward a nested range
# "<method>.fwd:<module path>", so the timeline shows where each layer's kernels run.
source "$(dirname "$0")/common.sh"
MODEL="${1:-bert-base}"; METHOD="${2:-lowrank}"; PARAM="${3:-0.25}"
NAME="nsys-train-${MODEL}-${METHOD}-p${PARAM}"
PARAM_ARGS=(); [[ "$METHOD" != "dense" && "$METHOD" != "sparse24" ]] && PARAM_ARGS=(--param "$PARAM")

run nsys profile \
  --trace=cuda,nvtx,osrt,cublas \
  --capture-range=cudaProfilerApi --capture-range-end=stop \
  --cuda-graph-trace=node \
  --sample=none --cpuctxsw=none \
  --force-overwrite=true \
  --output="$OUT/$NAME" \
  "$PY" profiling/profile_run.py train --model "$MODEL" --method "$METHOD" "${PARAM_ARGS[@]}" \
    --warmup 5 --steps 5 ${ARGS:-}

run nsys stats --force-export=true --report cuda_gpu_kern_sum,nvtx_sum --format csv \
  --output "$OUT/$NAME" "$OUT/$NAME.nsys-rep"
