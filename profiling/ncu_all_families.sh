#!/usr/bin/env bash
# The ncu summary BENCHMARKS.md records: one representative kernel run per family, at a
# 4096x4096 bf16 layer with 4096 tokens, forward.
set -euo pipefail
HERE="$(dirname "$0")"
"$HERE/ncu_kernel.sh" lowrank       4096x4096 4096 0.25 fwd
"$HERE/ncu_kernel.sh" monarch       4096x4096 4096 4    fwd
"$HERE/ncu_kernel.sh" block_lowrank 4096x4096 4096 4    fwd
"$HERE/ncu_kernel.sh" sparse24      4096x4096 4096 0    fwd
"$HERE/ncu_kernel.sh" dense_sparse  4096x4096 4096 0.5  fwd
