#!/usr/bin/env bash
# One device call for GPU search (issue 4): parity tests, kvmem-bench-gpu (search rows and the
# rest), torch SDPA, the table; with a daemon bundle also the e2e Attend benchmark. Run from the
# repo root on the GPU machine with the bundle staged by scripts/stage_gpu_search.sh in .gpu-search/.
#   bash .gpu-search/run.sh [quick|full] [e2e]
set -uo pipefail
cd "$(dirname "$0")/.."
G=.gpu-search
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
MODE=${1:-quick}
echo "== parity"
timeout 120 $G/b/run tree_search_cuda_test > "$OUT/parity.log" 2>&1; echo "tree_search_cuda_test rc=$?"
if [[ -x $G/b/bin/device_search_test ]]; then
  timeout 120 $G/b/run device_search_test >> "$OUT/parity.log" 2>&1; echo "device_search_test rc=$?"
fi
if [[ -x $G/b/bin/kernels_cuda_parity_test && -z "${SKIP_KERNEL_PARITY:-}" ]]; then
  timeout 120 $G/b/run kernels_cuda_parity_test >> "$OUT/parity.log" 2>&1; echo "kernels_cuda_parity_test rc=$?"
fi
grep -E "^\[  (PASSED|FAILED|SKIPPED) |Failure|Expected|Which is|error|seed" "$OUT/parity.log" | head -30
ARGS=(--contexts 8192,131072 --batches 1,8 --budgets 2048)
[[ $MODE == full ]] && ARGS=()
echo "== bench ($MODE)"
timeout ${BENCH_TIMEOUT:-240} $G/b/run kvmem-bench-gpu --json "$OUT/bench.json" --commit "$(cat $G/COMMIT)" \
  --machine "nvidia-h200 device machine ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))" \
  "${ARGS[@]}" 2>&1 | tee /tmp/bench.log | grep -E "search_sparse|error|Error" | cut -c1-150 | head -40
echo "== torch"
TARGS=(--contexts 8192,131072 --batches 1,8)
[[ $MODE == full ]] && TARGS=()
timeout 150 python3 $G/torch_sdpa.py --json /tmp/torch.json --merge-into "$OUT/bench.json" "${TARGS[@]}" > "$OUT/torch.log" 2>&1
tail -n 2 "$OUT/torch.log"
python3 $G/report.py "$OUT/bench.json" > "$OUT/table.txt"; grep -E "search|torch|sparse_attn .*131072" "$OUT/table.txt" | head -30
if [[ " $* " == *" e2e "* && -x $G/b/bin/kvmemd ]]; then
  echo "== e2e attend (device search)"
  timeout 200 $G/b/run kvmem-bench-e2e --json "$OUT/e2e.json" --contexts ${CONTEXTS:-8192,32768,131072} \
    --iters ${ITERS:-200} 2>&1 | tee /tmp/e2e.log | tail -8
  echo "== e2e attend (host search, A/B)"
  timeout 150 $G/b/run kvmem-bench-e2e --host-search --json "$OUT/e2e_host.json" --contexts 131072 \
    --iters ${ITERS:-200} 2>&1 | tee /tmp/e2e_host.log | tail -4
  if [[ -x $G/b/bin/e2e_test ]]; then
    timeout 200 $G/b/run e2e_test >> "$OUT/parity.log" 2>&1; echo "e2e_test rc=$?"
    grep -E "^\[  (PASSED|FAILED) |Failure" "$OUT/parity.log" | tail -4
  fi
fi
