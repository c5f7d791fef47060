#!/usr/bin/env bash
# One device call for issue 4 (cluster tree search): parity tests, the full kvmem-bench-gpu
# (with --sweep: other split targets for dense and sparse), torch SDPA in the same call, the
# e2e Attend through a running kvmemd, and the table. Run from the repo root on the GPU machine
# with the bundle staged by scripts/stage_gpu_search.sh into $G (default .gpu3).
#   bash $G/run.sh [quick|full]
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
MODE=${1:-full}
echo "== parity ($(el)s)"
parity tree_search_cuda_test device_search_test kernels_cuda_parity_test
ARGS=(--sweep)
[[ $MODE == quick ]] && ARGS=(--contexts 32768,131072 --batches 1,8 --budgets 2048 --sweep)
echo "== bench ($MODE, $(el)s)"
timeout ${BENCH_TIMEOUT:-300} $G/b/run kvmem-bench-gpu --json "$OUT/bench.json" --commit "$(cat $G/COMMIT)" \
  --machine "nvidia-h200 device machine ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))" \
  "${ARGS[@]}" > "$OUT/bench.log" 2>&1; echo "bench rc=$? ($(el)s)"
grep -E "error|Error|FAIL" "$OUT/bench.log" | head -5
echo "== torch ($(el)s)"
TARGS=()
[[ $MODE == quick ]] && TARGS=(--contexts 32768,131072 --batches 1,8)
timeout 150 python3 $G/torch_sdpa.py --json /tmp/torch.json --merge-into "$OUT/bench.json" "${TARGS[@]}" > /tmp/torch.log 2>&1
echo "torch rc=$? ($(el)s)"; tail -n 1 /tmp/torch.log
if [[ -x $G/b/bin/kvmemd ]]; then
  echo "== e2e attend, device search ($(el)s)"
  timeout 180 $G/b/run kvmem-bench-e2e --json "$OUT/e2e.json" --contexts ${CONTEXTS:-8192,32768,131072} \
    --iters ${ITERS:-200} > "$OUT/e2e.log" 2>&1; echo "e2e rc=$? ($(el)s)"; tail -5 "$OUT/e2e.log"
fi
echo "== A/B in the same call: search rows with one setting changed ($(el)s)"
for ab in ${AB:-KVMEM_SEARCH_SLICE_SLACK=off}; do
  env "$ab" timeout 60 $G/b/run kvmem-bench-gpu --json /tmp/ab.json \
    --contexts 32768,131072 --batches 1,8 --budgets 2048 > /dev/null 2>&1
  python3 -c "
import json,sys
for r in json.load(open(sys.argv[1]))['results']:
    if r['method'] in ('kvmem_search', 'kvmem_search_sparse'):
        print(f\"{sys.argv[2]:32} {r['method']:20} {r['context']:6d} B{r['batch']} {r['us_per_layer']:7.1f} us agree {r.get('cpu_agreement')} rounds {r.get('rounds_max')}\")
" /tmp/ab.json "$ab"
done
python3 $G/report.py "$OUT/bench.json" > "$OUT/table.txt" 2>&1
python3 $G/report.py --sweep "$OUT/bench.json" > "$OUT/sweep.txt" 2>&1
echo "== sweep / search ($(el)s)"; cat "$OUT/sweep.txt" | cut -c1-260
echo "== table"; grep -E "131072|32768 +1 " "$OUT/table.txt" | grep -vE "sparse_attn +(8192|32768)" | cut -c1-150
