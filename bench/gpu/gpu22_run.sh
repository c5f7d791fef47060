#!/usr/bin/env bash
# Session 27's third device call: dense plans kept from step to step (PlanAttendDenseStep).
# TESTS (';'-separated parity specs; e2e_test has DenseDecodeStepsMatchTheReference), then
# ROUNDS (2) interleaved rounds of kvmem-bench-e2e at CONTEXTS (8K, 32K, 128K): the default
# (kept plans) and KVMEM_DENSE_PLAN=fresh (every dense Attend planned afresh). Table last:
# the dense rows (kvmem_e2e_attend_dense, kvmem_e2e_decode_dense) and the index rows.
# Stage: STAGE=.gpu9 RUN_SCRIPT=bench/gpu/gpu22_run.sh scripts/stage_gpu_search.sh build /work/main integration
#   tar -cf - .gpu9 | xz -T2 -9e > .gpu9z/x.tar.xz
# Run (device): tar -xJf .gpu9z/x.tar.xz && TESTS="..." bash .gpu9/run.sh > $OUT/console.txt 2>&1
FINAL_OUT=${OUT:-/tmp/out}
mkdir -p "$FINAL_OUT"
export OUT=/tmp/w22
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run_tests
echo "== e2e A/B ($(el)s)"
for r in $(seq 1 "${ROUNDS:-2}"); do
  for mode in kept fresh; do
    e=(); [[ $mode == fresh ]] && e=(KVMEM_DENSE_PLAN=fresh)
    env "${e[@]}" timeout 200 $G/b/run kvmem-bench-e2e --json "$FINAL_OUT/e2e_${mode}_r$r.json" \
      --contexts "${CONTEXTS:-8192,32768,131072}" --iters "${ITERS:-300}" > "$OUT/e2e_${mode}_r$r.txt" 2>&1
    echo "[r$r $mode] rc=$? ($(el)s)"
    pack
  done
done
python3 - "$FINAL_OUT" <<'PY' | tee "$OUT/table.txt"
import glob, json, os, sys
print(f"{'ctx':>7} {'method':<24} {'run':<8} {'us':>8} {'p90':>8} {'plan':>7} {'launch':>7} {'wait':>7}")
rows = []
for f in sorted(glob.glob(os.path.join(sys.argv[1], "e2e_*_r*.json"))):
    run = os.path.basename(f)[4:-5]
    for r in json.load(open(f))["results"]:
        ph = r.get("daemon_phase_us", {})
        rows.append((r["context"], r["method"], run, r["us_per_layer"], r.get("p90_us", 0),
                     ph.get("device_plan", 0), ph.get("device_launch", 0), ph.get("device_wait", 0)))
for c, m, run, us, p90, p, l, w in sorted(rows):
    print(f"{c:>7} {m:<24} {run:<8} {us:8.1f} {p90:8.1f} {p:7.1f} {l:7.1f} {w:7.1f}")
PY
echo "== done ($(el)s)"
pack
