#!/usr/bin/env bash
# Session 27's device call: head-shared run tables for dense span attention (PlanAttend plans
# head 0's runs once with a head stride; the other heads' items point at them). Runs the parity
# tests (TESTS, ';'-separated specs as in gpu19_run.sh; kernels_cuda_parity_test has the
# `allheads` cases, one problem whose heads attend every span), then kvmemd's Attend through
# kvmem-bench-e2e at CONTEXTS (8K, 32K, 128K), ROUNDS (2) interleaved A/B rounds: shared runs
# (default) and KVMEM_ATTN_SHARED_RUNS=off (every head its own runs, as before), then the host
# planner alone (kvmem-bench-attend-plan, when staged) both ways. Prints the dense rows last.
# Stage: STAGE=.gpu9 RUN_SCRIPT=bench/gpu/gpu20_run.sh scripts/stage_gpu_search.sh build /work/main integration
#   strip --strip-debug -o .gpu9/b/bin/kvmem-bench-attend-plan build/bin/kvmem-bench-attend-plan
#   tar -cf - .gpu9 | xz -T2 -9e > .gpu9z/x.tar.xz
# Run (device): tar -xJf .gpu9z/x.tar.xz && TESTS="..." bash .gpu9/run.sh > $OUT/console.txt 2>&1
FINAL_OUT=${OUT:-/tmp/out}
mkdir -p "$FINAL_OUT"
export OUT=/tmp/w20
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run_tests
echo "== e2e A/B ($(el)s)"
contexts=${CONTEXTS:-8192,32768,131072}
for r in $(seq 1 "${ROUNDS:-2}"); do
  for mode in on off; do
    env KVMEM_ATTN_SHARED_RUNS=$mode timeout 200 $G/b/run kvmem-bench-e2e \
      --json "$FINAL_OUT/e2e_${mode}_r$r.json" --contexts "$contexts" --iters "${ITERS:-300}" \
      > "$OUT/e2e_${mode}_r$r.txt" 2>&1
    echo "[r$r shared=$mode] rc=$? ($(el)s)"
    pack
  done
done
if [[ -x $G/b/bin/kvmem-bench-attend-plan ]]; then
  for mode in on off; do
    env KVMEM_ATTN_SHARED_RUNS=$mode timeout 60 $G/b/run kvmem-bench-attend-plan \
      --json "$OUT/plan_$mode.json" --iters 200 > "$OUT/plan_$mode.txt" 2>&1
    echo "[plan shared=$mode] rc=$? ($(el)s)"
  done
  pack
fi
python3 - "$FINAL_OUT" "$OUT" <<'PY' | tee "$OUT/table.txt"
import glob, json, os, sys
fin, work = sys.argv[1], sys.argv[2]
print(f"{'ctx':>7} {'method':<24} {'shared':<6} {'us':>8} {'plan':>7} {'launch':>7} {'wait':>7}")
rows = []
for f in sorted(glob.glob(os.path.join(fin, "e2e_*_r*.json"))):
    mode, rnd = os.path.basename(f)[4:-5].split("_")
    for r in json.load(open(f))["results"]:
        if r["method"] not in ("kvmem_e2e_attend_dense", "kvmem_e2e_attend"):
            continue
        ph = r.get("daemon_phase_us", {})
        rows.append((r["context"], r["method"], mode + rnd, r["us_per_layer"],
                     ph.get("device_plan", 0), ph.get("device_launch", 0), ph.get("device_wait", 0)))
for c, m, mode, us, p, l, w in sorted(rows):
    print(f"{c:>7} {m:<24} {mode:<6} {us:8.1f} {p:7.1f} {l:7.1f} {w:7.1f}")
for mode in ("on", "off"):
    f = os.path.join(work, f"plan_{mode}.json")
    if os.path.exists(f):
        for r in json.load(open(f))["results"]:
            if r.get("mode") == "dense" and r.get("method") == "plan_reused":
                print(f"host plan {mode:<3} {r['context']:>7} dense plan_reused {r['us']:.1f} us")
PY
echo "== done ($(el)s)"
pack
