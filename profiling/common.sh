# Shared settings of the Nsight scripts in this folder (sourced, not run).
#
#   PY        python that has fastfactor installed       (default: .venv/bin/python, else python)
#   OUT       where reports go                           (default: profiling/results/nsight)
#   DRY_RUN=1 print the commands instead of running them (no Nsight needed)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PY:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="python"; fi
fi
OUT="${OUT:-$ROOT/profiling/results/nsight}"
mkdir -p "$OUT"

# Every Triton kernel of the project: the function names of the compile tier's registry
# (fastfactor.profiling.kernel_names), so a kernel added later is never filtered out; the list
# below only where fastfactor does not import.
FF_KERNELS_STATIC='_bgemm_kernel|_chain_kernel|_decode_bwd_kernel|_decode_kernel|_ds_bwd_dense_kernel|_ds_chain_kernel|_ds_rank_split_kernel|_ds_roles_kernel|_gemm_kernel|_prune24_kernel|_rows_kernel|_rowsum_kernel|_sp_compress_kernel|_sp_decode_kernel|_sp_decode_mma_kernel|_sp_dvalues_kernel|_sp_dx_decode_kernel|_sp_dx_kernel|_sp_expand_kernel|_sp_mm_kernel|_splitk_reduce_kernel|_wgrad_kernel|_wgrad_pair_kernel'
FF_KERNELS="$("$PY" -c "from fastfactor import profiling; print(profiling.kernel_regex())" 2>/dev/null || echo "$FF_KERNELS_STATIC")"

# The kernels a layer of one method launches (the others would only add noise to a per-family
# summary); every kernel for a method fastfactor does not name.
family_kernels() {
  "$PY" -c "from fastfactor import profiling; print(profiling.kernel_regex('$1'))" 2>/dev/null || echo "$FF_KERNELS"
}

# How an NVTX push/pop range of fastfactor.profiling is named for ncu's --nvtx-include: with the
# nvtx package it lives in the "fastfactor" domain ("fastfactor@NAME/"); with torch.cuda.nvtx in
# the default domain, prefixed ("fastfactor:NAME/"). The trailing "/" marks a push/pop range.
nvtx_range() {
  local q
  q="$("$PY" -c "from fastfactor import profiling; print(profiling.qualified('$1'))" 2>/dev/null || echo "fastfactor@$1")"
  echo "${q}/"
}

# ncu metrics for the BENCHMARKS.md summary: achieved DRAM throughput and tensor-pipe use. The
# tensor-pipe counter is named per architecture (hmma on sm_80; Hopper adds gmma for wgmma), so
# only the names this ncu knows for GPU 0 are kept.
ncu_metrics() {
  local base="dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes.sum.per_second,gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed"
  local tc
  tc="$(ncu --devices 0 --query-metrics 2>/dev/null | grep -oE '^sm__pipe_tensor_op_(hmma|gmma)_cycles_active' | sort -u | sed 's/$/.avg.pct_of_peak_sustained_active/' | paste -sd, - || true)"
  if [[ -n "$tc" ]]; then echo "$base,$tc"; else echo "$base"; fi
}

run() {
  echo "+ $*" >&2
  if [[ "${DRY_RUN:-0}" != "1" ]]; then "$@"; fi
}

# run_to FILE CMD...: run CMD with its stdout in FILE.
run_to() {
  local file="$1"; shift
  echo "+ $* > $file" >&2
  if [[ "${DRY_RUN:-0}" != "1" ]]; then "$@" > "$file"; fi
}
