#!/usr/bin/env bash
# Session 27's second device call: main with head-shared dense runs and the session's cheaper
# dense Attend. TESTS (';'-separated parity specs as in gpu19_run.sh), then ROUNDS (2)
# interleaved rounds of kvmem-bench-gpu at 128K (batch 1 and 8, budgets 1024 and 2048) against
# the bench built at 52842c3 (staged as kvmem-bench-gpu-old: the span kernel's run loader before
# it added task x head_stride), then E2E_ROUNDS (2) rounds of kvmem-bench-e2e at 8K / 32K / 128K,
# then kvmem-bench-retrieval-session at 32K and 128K (a retrieval_heads layer: 1 retrieval
# head). Tables last.
# Stage: STAGE=.gpu9 RUN_SCRIPT=bench/gpu/gpu21_run.sh scripts/stage_gpu_search.sh build /work/main integration
#   strip --strip-debug -o .gpu9/b/bin/kvmem-bench-gpu-old /tmp/old/build/bin/kvmem-bench-gpu
#   strip --strip-debug -o .gpu9/b/bin/kvmem-bench-retrieval-session build/bin/kvmem-bench-retrieval-session
#   tar -cf - .gpu9 | xz -T2 -9e > .gpu9z/x.tar.xz
# Run (device): tar -xJf .gpu9z/x.tar.xz && TESTS="..." bash .gpu9/run.sh > $OUT/console.txt 2>&1
FINAL_OUT=${OUT:-/tmp/out}
mkdir -p "$FINAL_OUT"
export OUT=/tmp/w21
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run_tests
echo "== kernels A/B ($(el)s)"
ABS=(default old)
AB_TRACE=0 ab_rounds "${ROUNDS:-2}" --contexts 131072 --batches 1,8 --budgets 1024,2048
pack
echo "== e2e ($(el)s)"
for r in $(seq 1 "${E2E_ROUNDS:-2}"); do
  timeout 200 $G/b/run kvmem-bench-e2e --json "$FINAL_OUT/e2e_r$r.json" \
    --contexts 8192,32768,131072 --iters 300 > "$OUT/e2e_r$r.txt" 2>&1
  echo "[e2e r$r] rc=$? ($(el)s)"
  pack
done
if [[ -x $G/b/bin/kvmem-bench-retrieval-session ]]; then
  timeout 200 $G/b/run kvmem-bench-retrieval-session --json "$FINAL_OUT/retrieval_session.json" \
    --contexts 32768,131072 > "$OUT/retrieval_session.txt" 2>&1
  echo "[retrieval session] rc=$? ($(el)s)"
  tail -n 8 "$OUT/retrieval_session.txt"
  pack
fi
python3 - "$OUT" "$(dirname "$0")" "$FINAL_OUT" <<'PY' | tee "$OUT/table.txt"
import glob, json, os, sys
sys.path.insert(0, sys.argv[2])
import ab_rows
data = ab_rows.collect(sys.argv[1], ["default", "old"],
                       ("kvmem_search", "kvmem_search_sparse", "kvmem_sparse_attn"))
ab_rows.print_table(data, ["default", "old"], lambda rs: "/".join(f"{r['us_per_layer']:.2f}" for r in rs) +
                    f" a{min(r.get('cpu_agreement', 1.0) for r in rs):.3f}", 22)
print(f"{'ctx':>7} {'method':<24} {'rnd':<4} {'us':>8} {'plan':>7} {'launch':>7} {'wait':>7} {'session-host':>12}")
for f in sorted(glob.glob(os.path.join(sys.argv[3], "e2e_r*.json"))):
    rnd = os.path.basename(f)[4:-5]
    for r in json.load(open(f))["results"]:
        ph = r.get("daemon_phase_us", {})
        rest = ph.get("session_attend", 0) - ph.get("host_attend", 0) - ph.get("device_search_attend", 0)
        print(f"{r['context']:>7} {r['method']:<24} {rnd:<4} {r['us_per_layer']:8.1f} {ph.get('device_plan', 0):7.1f} "
              f"{ph.get('device_launch', 0):7.1f} {ph.get('device_wait', 0):7.1f} {rest:12.1f}")
PY
echo "== done ($(el)s)"
pack
