#!/usr/bin/env bash
# One device call for the span attention's A/B runs (session 12's calls,
# bench/results/h200_run24_session12_calls.txt): parity of the attention kernels on each copy path
# and the search's attention, then kvmem-bench-gpu sparse rows (no search; SEARCH_ARG= to include
# it) at CONTEXTS (128K) and BATCHES (1,8) with a warm trace (KVMEM_ATTN_TRACE=1) for each AB
# setting (';'-separated: KVMEM_ATTN_PATH, KVMEM_ATTN_ISSUE=nocopy|nomath), interleaved over ROUNDS
# rounds, then (SWEEP=1, the default) one --sweep run of the default, and a short table last.
# Staged by scripts/stage_gpu_search.sh (STAGE=.gpu9 RUN_SCRIPT=bench/gpu/gpu12_run.sh).
#   bash .gpu9/run.sh
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
echo "== parity ($(el)s)"
parity kernels_cuda_parity_test "KVMEM_ATTN_PATH=tc-bulk kernels_cuda_parity_test" \
  "KVMEM_ATTN_PATH=tc-cpasync kernels_cuda_parity_test" tree_search_cuda_test
IFS=";" read -r -a ABS <<< "${AB:-default;KVMEM_ATTN_PATH=tc-bulk;KVMEM_ATTN_ISSUE=nomath;KVMEM_ATTN_ISSUE=nocopy}"
ab_rounds ${ROUNDS:-2} ${SEARCH_ARG---no-search} --contexts ${CONTEXTS:-131072} --batches ${BATCHES:-1,8} --budgets ${BUDGETS:-1024,2048,4096}
if [[ ${SWEEP:-1} == 1 ]]; then sparse_sweep; fi
python3 - "$OUT" "$(dirname "$0")" "${ABS[@]}" <<'PY' | tee "$OUT/ab.txt"
import json, os, sys
out, abs_ = sys.argv[1], sys.argv[3:]
sys.path.insert(0, sys.argv[2])
import ab_rows
data = ab_rows.collect(out, abs_, ("kvmem_sparse_attn", "kvmem_dense", "torch_sdpa_dense"))
ab_rows.print_sparse_report(out, abs_, data)
PY
