#!/usr/bin/env bash
# One device call for issue 4: the device search's parity tests (default, unsliced commits, a
# barely-sufficient slice), then kvmem-bench-gpu A/B over search settings, interleaved
# (AB_ROUNDS rounds, AB=';'-separated environment settings), then one kvmem-bench-e2e at 128K
# when the bundle has it, and a short table last (times, CPU agreement, search phases).
# Bundle staged by scripts/stage_gpu_search.sh into $G (STAGE=.gpu6 RUN_SCRIPT=bench/gpu/gpu6_run.sh
# ... e2e). Run 18 (bench/results/h200_run18_search.txt) used it.
#   bash $G/run.sh
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
echo "== parity ($(el)s)"
parity tree_search_cuda_test "KVMEM_SEARCH_SLICE_SLACK=off tree_search_cuda_test" \
  "KVMEM_SEARCH_SLICE_SLACK=1 tree_search_cuda_test" device_search_test kernels_cuda_parity_test
IFS=";" read -r -a ABS <<< "${AB:-default;KVMEM_SEARCH_FIRST_ROUND=8;KVMEM_SEARCH_SLICE_SLACK=off}"
AB_TRACE=0 ab_rounds ${AB_ROUNDS:-2} --contexts ${AB_CONTEXTS:-8192,32768,131072} --batches ${AB_BATCHES:-1,8} \
  --budgets ${AB_BUDGETS:-1024,2048,4096}
if [[ -x $G/b/bin/kvmem-bench-e2e ]]; then
  echo "== e2e ($(el)s)"
  timeout 120 $G/b/run kvmem-bench-e2e --json "$OUT/e2e.json" --contexts 131072 --iters 400 > /tmp/e2e.log 2>&1
  echo "e2e rc=$? ($(el)s)"; cp /tmp/e2e.log "$OUT/e2e.log"
fi
python3 - "$OUT" "$(dirname "$0")" "${ABS[@]}" <<'PY' | tee "$OUT/ab.txt"
import json, os, sys
out, abs_ = sys.argv[1], sys.argv[3:]
sys.path.insert(0, sys.argv[2])
import ab_rows
data = ab_rows.collect(out, abs_, ("kvmem_search", "kvmem_search_sparse", "torch_sdpa_dense", "kvmem_sparse_attn"))
ab_rows.print_table(data, abs_, lambda rs: "/".join(f"{r['us_per_layer']:.1f}" for r in rs) +
                    f" {min(r.get('cpu_agreement', 1.0) for r in rs):.2f}", 22)
for k in sorted(data):
    if k[0] != "kvmem_search" or k[3] != 2048:
        continue
    for a in abs_:
        for r in data[k].get(a, [])[:1]:
            ph = r.get("search_phase_us_mean", {})
            print(f"phases {k[1]:6d} B{k[2]} {a[-24:]:>24} " + " ".join(f"{n} {v:.1f}" for n, v in sorted(ph.items())) + f" rounds {r.get('rounds_max')}")
e2e = f"{out}/e2e.json"
if os.path.exists(e2e):
    for r in json.load(open(e2e))["results"]:
        if r["method"] == "kvmem_e2e_attend":
            print(f"e2e {r['context']} {r['us_per_layer']:.1f} us daemon {r.get('daemon_request_us')} phases {r.get('daemon_phase_us')}")
PY
