#!/usr/bin/env bash
# One device call for issue 4, round 2 (clusters of attention splits): parity tests (with and
# without clusters), an A/B of kvmem-bench-gpu with KVMEM_ATTN_CLUSTER settings in the same call,
# and with `full` the run of record of gpu3_run.sh (sweep, torch, e2e). Bundle staged by
# scripts/stage_gpu_search.sh into $G (STAGE=.gpu4 RUN_SCRIPT=bench/gpu/gpu4_run.sh); staged with
# `integration`, the cross-backend integration tests run after the e2e bench.
#   bash $G/run.sh [ab|full]
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
MODE=${1:-ab}
echo "== parity ($(el)s)"
parity kernels_cuda_parity_test tree_search_cuda_test device_search_test \
  "KVMEM_ATTN_CLUSTER=auto tree_search_cuda_test" "KVMEM_ATTN_CLUSTER=16 device_search_test" \
  "KVMEM_ATTN_MERGE=legacy kernels_cuda_parity_test" "KVMEM_ATTN_PATH=tc-bulk kernels_cuda_parity_test" \
  "KVMEM_ATTN_PATH=tc-cpasync kernels_cuda_parity_test" "KVMEM_ATTN_PATH=tc-bulk device_search_test"
echo "== A/B: kvmem-bench-gpu with one setting changed ($(el)s)"
ABS=(${AB:-default KVMEM_ATTN_MERGE=legacy KVMEM_ATTN_MIN_SPLIT=64 KVMEM_ATTN_CLUSTER=auto})
for i in "${!ABS[@]}"; do
  ab=${ABS[$i]}; e=(); [[ $ab != default ]] && e=("$ab")
  env "${e[@]}" timeout 90 $G/b/run kvmem-bench-gpu --json /tmp/ab_$i.json \
    --contexts ${AB_CONTEXTS:-32768,131072} --batches 1,8,32 --budgets 1024,2048,4096 > /tmp/ab_$i.log 2>&1
  echo "$ab rc=$? ($(el)s)"
  { echo "### $ab"; cat /tmp/ab_$i.log; } >> /tmp/logs.txt
done
python3 - "${ABS[@]}" > "$OUT/ab.txt" <<'PY'
import json, sys, os
v = sys.argv[1:]
data = {}
for i, a in enumerate(v):
    p = f"/tmp/ab_{i}.json"
    if os.path.exists(p):
        for r in json.load(open(p))["results"]:
            data.setdefault((r["method"], r["context"], r["batch"], r["budget"]), {})[a] = r
print(f"{'method':20} {'ctx':>6} {'B':>2} {'bud':>4} " + " ".join(f"{a.split('_')[-1][-16:]:>16}" for a in v))
for k in sorted(data, key=lambda k: (k[0], k[1], k[2], k[3])):
    if k[0] == "kvmem_search":
        continue
    cells = []
    for a in v:
        r = data[k].get(a)
        cells.append(f"{r['us_per_layer']:7.2f} {r.get('attn_cluster', '-')!s:>2}/{r.get('blocks', '-')!s:>4}" if r else " " * 16)
    print(f"{k[0]:20} {k[1]:6d} {k[2]:2d} {k[3]:4d} " + " ".join(cells))
err = max((r.get("max_rel_err") or 0) for d in data.values() for r in d.values())
agree = min((r.get("cpu_agreement", 1.0)) for d in data.values() for r in d.values())
print(f"max_rel_err over all rows {err:.2e}; min CPU agreement {agree}")
PY
if [[ $MODE == ab ]]; then
  echo "== dense 32K B1 split-target sweep, default / legacy merge ($(el)s)"
  for ab in default KVMEM_ATTN_MERGE=legacy; do
    e=(); [[ $ab != default ]] && e=("$ab")
    env "${e[@]}" KVMEM_BENCH_DENSE_SWEEP=1 timeout 60 $G/b/run kvmem-bench-gpu --json /tmp/dsw_$ab.json \
      --contexts 32768 --batches 1 --budgets 1024 --sweep --no-search > /dev/null 2>&1
    python3 -c "
import json,sys
for r in json.load(open(sys.argv[1]))['results']:
    if r['method'] == 'kvmem_dense':
        print(sys.argv[2], 'dense', r['context'], 'B', r['batch'], 'default %.1f' % r['us_per_layer'], ' '.join('%d:%.1f' % (x['target_blocks'], x['us']) for x in r.get('sweep', [])))
" /tmp/dsw_$ab.json $ab | tee -a "$OUT/ab.txt"
  done
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [[ -n "$NCU" ]]; then
    echo "== ncu: span attention 128K B1 b1024, dense 32K B1 ($(el)s)"
    for spec in "SpanAttendKernel 131072 1024" "DenseAttendKernel 32768 1024"; do
      set -- $spec
      timeout 60 "$NCU" --clock-control none -k "regex:$1" --launch-count 2 \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
        env LD_LIBRARY_PATH=$PWD/$G/b/lib $G/b/bin/kvmem-bench-gpu --contexts $2 --batches 1 \
        --budgets $3 --replays 1 --no-search --json /tmp/ncu.json >> "$OUT/ncu.txt" 2>&1
    done
    grep -E "^  [a-zA-Z_].*Kernel|Duration|Elapsed Cycles|Registers Per|Achieved Occupancy|Cluster Size|Grid Size|Stall" "$OUT/ncu.txt" | head -40
  fi
  echo "== torch quick ($(el)s)"
  cp /tmp/ab_0.json "$OUT/ab_default.json"
  timeout 100 python3 $G/torch_sdpa.py --json /tmp/torch.json --merge-into "$OUT/ab_default.json" \
    --contexts 32768,131072 --batches 1,8 > /tmp/torch.log 2>&1; echo "torch rc=$? ($(el)s)"
  python3 $G/report.py "$OUT/ab_default.json" | grep -E "kvmem_dense|torch|sparse" | grep -E " (1|8) " | cut -c1-150
  echo "== A/B table ($(el)s)"
  cat "$OUT/ab.txt"; cp /tmp/logs.txt "$OUT/logs.txt"
# At most 8 files come back: the small text files travel as one archive.
(cd "$OUT" && small=$(ls host.txt parity.log logs.txt sweep.txt ab.txt 2>/dev/null) &&
  tar -czf logs.tgz $small && rm -f $small)
  exit 0
fi

echo "== bench full ($(el)s)"
timeout ${BENCH_TIMEOUT:-300} $G/b/run kvmem-bench-gpu --json "$OUT/bench.json" --commit "$(cat $G/COMMIT)" \
  --machine "nvidia-h200 device machine ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))" \
  --sweep > /tmp/bench.log 2>&1; echo "bench rc=$? ($(el)s)"
grep -E "error|Error|FAIL" /tmp/bench.log | head -5; { echo "### bench"; cat /tmp/bench.log; } >> /tmp/logs.txt
echo "== torch ($(el)s)"
timeout 150 python3 $G/torch_sdpa.py --json /tmp/torch.json --merge-into "$OUT/bench.json" > /tmp/torch.log 2>&1
echo "torch rc=$? ($(el)s)"; tail -n 1 /tmp/torch.log
if [[ -x $G/b/bin/kvmemd ]]; then
  for e2e in ${E2E:-default KVMEM_DEVICE_INLINE=on}; do
    e=(); j="$OUT/e2e.json"; [[ $e2e != default ]] && { e=("$e2e"); j="$OUT/e2e_${e2e%%=*}.json"; }
    echo "== e2e attend, device search, $e2e ($(el)s)"
    env "${e[@]}" timeout 120 $G/b/run kvmem-bench-e2e --json "$j" --contexts ${CONTEXTS:-8192,32768,131072} \
      --iters ${ITERS:-200} > /tmp/e2e.log 2>&1; echo "e2e rc=$? ($(el)s)"; grep -E "kvmem_e2e_attend|kvmem_e2e_decode|append|ping" /tmp/e2e.log | cut -c1-400
    { echo "### e2e $e2e"; cat /tmp/e2e.log; } >> /tmp/logs.txt
  done
  # The fidelity profile (rescoring 4x the budget token by token: host search, one
  # rescoring-logits launch per layer, then the attention).
  echo "== e2e attend, fidelity profile ($(el)s)"
  timeout 150 $G/b/run kvmem-bench-e2e --json "$OUT/e2e_fidelity.json" --config "$PWD/deploy/kvmemd-fidelity.json" \
    --contexts 32768,131072 --iters 30 > /tmp/e2e_fid.log 2>&1; echo "e2e fidelity rc=$? ($(el)s)"
  grep -E "kvmem_e2e_attend|kvmem_e2e_decode|ping" /tmp/e2e_fid.log | cut -c1-400
  { echo "### e2e fidelity"; cat /tmp/e2e_fid.log; } >> /tmp/logs.txt
fi
if [[ -x $G/b/bin/backends_test ]]; then  # staged with `integration`
  echo "== integration tests ($(el)s)"
  parity e2e_test "KVMEM_DEVICE_INLINE=on e2e_test" "KVMEM_SOURCE_DIR=$PWD backends_test" hybrid_test
fi
python3 $G/report.py "$OUT/bench.json" > "$OUT/table.txt" 2>&1
python3 $G/report.py --sweep "$OUT/bench.json" > "$OUT/sweep.txt" 2>&1
echo "== sweep / search ($(el)s)"; cut -c1-220 "$OUT/sweep.txt" | grep -v "^search" | head -30
echo "== A/B table"; cat "$OUT/ab.txt"
echo "== table"; grep -E "131072|32768 +1 " "$OUT/table.txt" | grep -vE "sparse_attn +(8192|32768)" | cut -c1-150
cp /tmp/logs.txt "$OUT/logs.txt"
# At most 8 files come back: the small text files travel as one archive.
(cd "$OUT" && small=$(ls host.txt parity.log logs.txt sweep.txt ab.txt 2>/dev/null) &&
  tar -czf logs.tgz $small && rm -f $small)
