#!/usr/bin/env bash
# One device call for issue 4 (e2e Attend): parity of the daemon's device search with the
# submit variants (KVMEM_DEVICE_SUBMIT=graph, KVMEM_DEVICE_RESULTS=mapped, both), then in the
# same call kvmem-bench-gpu at 128K batch 1 budget 2048 (search + sparse) and kvmem-bench-e2e
# through kvmemd for every variant, interleaved, and a short table last. Bundle staged by
# scripts/stage_gpu_search.sh into $G (STAGE=.gpu5 RUN_SCRIPT=bench/gpu/gpu5_run.sh ... e2e).
#   bash $G/run.sh
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
# VARIANTS: ';'-separated environment settings (default: the four below); PARITY: the tests.
IFS=';' read -r -a VARIANTS <<< "${VARIANTS:-default;KVMEM_DEVICE_SUBMIT=graph;KVMEM_DEVICE_RESULTS=mapped;KVMEM_DEVICE_SUBMIT=graph KVMEM_DEVICE_RESULTS=mapped}"
echo "== parity ($(el)s)"
for v in "${VARIANTS[@]}"; do
  specs=()
  for t in ${PARITY:-device_search_test e2e_test tree_search_cuda_test}; do
    [[ $t == tree_search_cuda_test && $v != default ]] && continue
    if [[ $v == default ]]; then specs+=("$t"); else specs+=("$v $t"); fi
  done
  parity "${specs[@]}"
done
bench_gpu() {  # search + sparse at 128K batch 1 budget 2048 (and batch 8), one JSON per call
  timeout 90 $G/b/run kvmem-bench-gpu --json "$OUT/bench_$1.json" --commit "$(cat $G/COMMIT)" \
    --contexts 131072 --batches 1,8 --budgets 2048 > /tmp/bench_$1.log 2>&1
  echo "bench $1 rc=$? ($(el)s)"; { echo "### bench $1"; cat /tmp/bench_$1.log; } >> "$OUT/e2e_raw.txt"
}
echo "== bench a ($(el)s)"; bench_gpu a
for round in $(seq 1 ${ROUNDS:-2}); do
  for i in "${!VARIANTS[@]}"; do
    v=${VARIANTS[$i]}; e=(); [[ $v != default ]] && e=($v)
    echo "== e2e round $round [$v] ($(el)s)"
    env "${e[@]}" timeout 120 $G/b/run kvmem-bench-e2e --json "/tmp/e2e_r${round}_v$i.json" \
      --contexts ${CONTEXTS:-32768,131072} --iters ${ITERS:-400} > /tmp/e2e.log 2>&1
    echo "e2e rc=$? ($(el)s)"; grep -E "kvmem_e2e_attend |graph off" /tmp/e2e.log | cut -c1-120
    { echo "### e2e round $round [$v]"; cat /tmp/e2e.log; } >> "$OUT/e2e_raw.txt"
  done
done
echo "== bench b ($(el)s)"; bench_gpu b
python3 - "$OUT" "${VARIANTS[@]}" > "$OUT/e2e_table.txt" <<'PY'
import json, os, sys
out, variants = sys.argv[1], sys.argv[2:]
ss = {}
for tag in "ab":
    p = f"{out}/bench_{tag}.json"
    if os.path.exists(p):
        for r in json.load(open(p))["results"]:
            if r["method"] in ("kvmem_search_sparse", "kvmem_search", "kvmem_sparse_attn") and r["context"] == 131072:
                ss.setdefault((r["method"], r["batch"]), []).append(r["us_per_layer"])
for (m, b), v in sorted(ss.items()):
    print(f"{m:22} 128K B{b} b2048: " + " / ".join(f"{x:.1f}" for x in v) + " us (bench a / b)")
s1 = min(ss.get(("kvmem_search_sparse", 1), [float("nan")]))
print(f"allowed e2e at 128K = search_sparse (min of a/b) {s1:.1f} + 30 = {s1 + 30:.1f} us")
print(f"{'variant':52} {'ctx':>6} {'e2e r1':>7} {'e2e r2':>7} {'daemon':>7} {'plan':>5} {'launch':>6} {'wait':>6}")
merged = []
for i, v in enumerate(variants):
    rows = {}
    for rnd in range(1, 10):
        p = f"/tmp/e2e_r{rnd}_v{i}.json"
        if not os.path.exists(p):
            continue
        for r in json.load(open(p))["results"]:
            r["variant"] = v
            r["round"] = rnd
            merged.append(r)
            if r["method"] == "kvmem_e2e_attend":
                rows.setdefault(r["context"], []).append(r)
    for ctx, rs in sorted(rows.items()):
        ph = rs[-1].get("daemon_phase_us") or {}
        e = [f"{r['us_per_layer']:7.1f}" for r in rs] + [" " * 7] * max(0, 2 - len(rs))
        print(f"{v:52} {ctx:6d} {' '.join(e)} {rs[-1].get('daemon_request_us') or 0:7.1f} "
              f"{ph.get('device_plan', 0):5.1f} {ph.get('device_launch', 0):6.1f} {ph.get('device_wait', 0):6.1f}")
json.dump({"search_sparse_128k_b1_b2048_us": ss.get(("kvmem_search_sparse", 1)), "results": merged},
          open(f"{out}/e2e.json", "w"), indent=1)
PY
echo "== table ($(el)s)"; cat "$OUT/e2e_table.txt"
