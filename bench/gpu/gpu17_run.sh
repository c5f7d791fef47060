#!/usr/bin/env bash
# One device call of session 21: parity and integration tests (TESTS, ';'-separated specs), ROUNDS
# (2) interleaved rounds of kvmem-bench-gpu per AB setting (';'-separated, as gpu16_run.sh:
# "default", "@X" for $G/b/bin/kvmem-bench-gpu-X, VAR=VALUE words) over CONTEXTS x BATCHES x
# BUDGETS, then E2E_ROUNDS (3) interleaved rounds of kvmem-bench-e2e at E2E_CONTEXTS (131072) per
# E2E_AB setting (';'-separated VAR=VALUE words for kvmemd's environment, or "default"), with the
# daemon's Attend phases (the attend and decode rows). Tables last; everything goes into
# $OUT/all.tgz. Session 24's calls, for example (graph submission is the default since then;
# KVMEM_DEVICE_SUBMIT=copy enqueues directly; extra test binaries copied into $G/b/bin by hand):
#   TESTS="stress_test;KVMEM_DEVICE_SUBMIT=copy stress_test;device_search_test;e2e_test"
#   AB="default;@base" ROUNDS=6 E2E_AB="default;KVMEM_DEVICE_SUBMIT=copy" E2E_ROUNDS=3 bash .gpu9/run.sh
# Staged by scripts/stage_gpu_search.sh (STAGE=.gpu9 RUN_SCRIPT=bench/gpu/gpu17_run.sh ... integration).
#   bash .gpu9/run.sh
FINAL_OUT=${OUT:-/tmp/out}
mkdir -p "$FINAL_OUT"
export OUT=/tmp/w17
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
echo "== parity ($(el)s)"
IFS=";" read -r -a SPECS <<< "${TESTS:-tree_search_cuda_test;device_search_test;kernels_cuda_parity_test}"
parity "${SPECS[@]}"
IFS=";" read -r -a ABS <<< "${AB:-default}"
if [[ ${ROUNDS:-2} -gt 0 ]]; then
  AB_TRACE=0 ab_rounds ${ROUNDS:-2} --contexts ${CONTEXTS:-32768,131072} --batches ${BATCHES:-1,8} \
    --budgets ${BUDGETS:-1024,2048}
fi
IFS=";" read -r -a E2E <<< "${E2E_AB:-default;KVMEM_DEVICE_SUBMIT=mapped}"
for round in $(seq 1 ${E2E_ROUNDS:-3}); do
  for i in "${!E2E[@]}"; do
    envs=(); for w in ${E2E[$i]}; do [[ $w == *=* ]] && envs+=("$w"); done
    env "${envs[@]}" timeout 120 $G/b/run kvmem-bench-e2e --json "$OUT/e2e_${i}_r$round.json" \
      --contexts ${E2E_CONTEXTS:-131072} --iters ${ITERS:-300} > /tmp/e2e.log 2>&1
    echo "[e2e r$round ${E2E[$i]}] rc=$? ($(el)s)"; { echo "### r$round ${E2E[$i]}"; cat /tmp/e2e.log; } >> "$OUT/e2e_raw.txt"
  done
done
if [[ ${TRACE:-0} == 1 ]]; then
  KVMEM_SEARCH_TRACE=1 timeout 100 $G/b/run kvmem-bench-gpu --json "$OUT/trace.json" \
    --contexts 131072 --batches 1 --budgets 2048 > "$OUT/trace.log" 2>&1
  echo "trace rc=$? ($(el)s)"
fi
python3 - "$OUT" "$(dirname "$0")" "${ABS[@]}" <<'PY' | tee "$OUT/ab.txt"
import os, sys
out, abs_ = sys.argv[1], sys.argv[3:]
sys.path.insert(0, sys.argv[2])
import ab_rows
data = ab_rows.collect(out, abs_, ("kvmem_search", "kvmem_search_sparse", "kvmem_sparse_attn"))
ab_rows.print_table(data, abs_, lambda rs: "/".join(f"{r['us_per_layer']:.1f}" for r in rs) +
                    f" a{min(r.get('cpu_agreement', 1.0) for r in rs):.3f}", 24)
for l in open(f"{out}/trace.log") if os.path.exists(f"{out}/trace.log") else []:
    if l.startswith("search trace"):
        print(l.strip()[:700])
PY
python3 - "$OUT" "${E2E[@]}" <<'PY' | tee "$OUT/e2e_ab.txt"
import glob, json, re, statistics, sys
out, names = sys.argv[1], sys.argv[2:]
rows = {}
for p in sorted(glob.glob(f"{out}/e2e_*_r*.json")):
    i = int(re.search(r"e2e_(\d+)_r", p).group(1))
    for x in json.load(open(p))["results"]:
        if x["method"] in ("kvmem_e2e_attend", "kvmem_e2e_decode"):
            rows.setdefault((x["method"][10:], x["context"], names[i]), []).append(x)
keys = ["request_receive", "request_queue", "request_checks", "session_attend", "request_pack",
        "request_reply", "catch_up", "device_sync", "device_search_attend", "device_plan",
        "device_launch", "device_wait", "seal"]
for (kind, ctx, v), xs in sorted(rows.items()):
    print(f"e2e {kind} {ctx} {v}: " + " / ".join(f"{x['us_per_layer']:.1f}" for x in xs) +
          " us; daemon " + " / ".join(f"{x['daemon_request_us']:.1f}" for x in xs))
    ph = {k: statistics.mean(x["daemon_phase_us"].get(k, 0) for x in xs) for k in keys}
    print("   " + " ".join(f"{k}={ph[k]:.2f}" for k in keys))
PY
tar -czf "$FINAL_OUT/all.tgz" -C "$OUT" .
