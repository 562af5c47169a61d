#!/usr/bin/env bash
# Nsight Systems timeline of one factorized layer at one shape and setting.
#
#   profiling/nsys_kernel.sh [METHOD] [SHAPE] [TOKENS] [PARAM] [DIRECTION]   (extra args: env ARGS)
#   e.g. profiling/nsys_kernel.sh lowrank 4096x4096 4096 0.25 fwd+bwd
#        ARGS=--cuda-graph profiling/nsys_kernel.sh monarch 768x3072 16 4 fwd
#
# Records CUDA API + kernels + NVTX only between cudaProfilerStart/Stop (the driver's profiled
# steps; warm-up and autotuning stay out), traces the nodes of CUDA graphs individually, then
# writes the kernel and NVTX summaries next to the report.
source "$(dirname "$0")/common.sh"
METHOD="${1:-lowrank}"; SHAPE="${2:-4096x4096}"; TOKENS="${3:-4096}"; PARAM="${4:-0.25}"; DIR="${5:-fwd+bwd}"
NAME="nsys-kernel-${METHOD}-${SHAPE}-M${TOKENS}-p${PARAM}-${DIR/+/_}"

run nsys profile \
  --trace=cuda,nvtx,osrt \
  --capture-range=cudaProfilerApi --capture-range-end=stop \
  --cuda-graph-trace=node \
  --sample=none --cpuctxsw=none \
  --force-overwrite=true \
  --output="$OUT/$NAME" \
  "$PY" profiling/profile_run.py kernel --method "$METHOD" --shape "$SHAPE" --tokens "$TOKENS" \
    --param "$PARAM" --direction "$DIR" --warmup 10 --steps 20 ${ARGS:-}

# Per-kernel time table and per-range table (report names of nsys >= 2023.2; older releases
# call them gpukernsum and nvtxsum).
run nsys stats --force-export=true --report cuda_gpu_kern_sum,nvtx_sum --format csv \
  --output "$OUT/$NAME" "$OUT/$NAME.nsys-rep"
