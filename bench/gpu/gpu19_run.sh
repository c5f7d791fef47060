#!/usr/bin/env bash
# Session 26's device calls: the integration tests on the H200 (TESTS, ';'-separated parity specs
# as in gpu17_run.sh; among them Stall.RealDeviceFaultOnTheGpu, a real device fault through
# kvmemd), then compute-sanitizer steps (SAN, ';'-separated "TOOL BINARY LIMIT_S [GTEST_FILTER]":
# TOOL synccheck, racecheck, memcheck or plain for no sanitizer; the filter defaults to
# *BulkTrees*), run with KVMEM_TEST_TRACE=1 (each launch's configuration printed before it runs),
# KVMEM_TEST_SEED=$SEED (1) and KVMEM_SEARCH_SPREAD=0, then ROUNDS (0) bench rounds at 128K.
# A kernel change's synccheck: SAN="synccheck tree_search_cuda_test 240 *" (all six tests, ~10 s).
# Session 26 used it on session 25's spread-first-round binary, which hung in one-block searches
# (docs/architecture.md "Session 26"), staged next to main's as tree_search_cuda_test-spread:
#   git worktree add /tmp/spread e60dbbb && git -C /tmp/spread apply \
#     /work/main/bench/gpu/patches/session25-spread-first-round.patch
#   cmake -S /tmp/spread -B /tmp/spread/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
#     -DCMAKE_CUDA_ARCHITECTURES=90 && ninja -C /tmp/spread/build tree_search_cuda_test
# Stage: STAGE=.gpu9 RUN_SCRIPT=bench/gpu/gpu19_run.sh scripts/stage_gpu_search.sh build /work/main integration
#   then extra binaries (strip --strip-debug -o .gpu9/b/bin/X build/bin/X: ops_integration_test;
#   the patched test as above), then tar -cf - .gpu9 | xz -T2 -9e > .gpu9z/x.tar.xz
# Run (device): tar -xJf .gpu9z/x.tar.xz && TESTS="..." SAN="..." bash .gpu9/run.sh > $OUT/console.txt 2>&1
# Each step's log goes into $OUT/logs.tgz after the step (at most 8 files come back; a call cut
# off by its limit still returns what finished).
FINAL_OUT=${OUT:-/tmp/out}
mkdir -p "$FINAL_OUT"
export OUT=/tmp/w19
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
echo "compute-sanitizer: ${CS:-none}"
run_tests
echo "== sanitizer ($(el)s)"
lib="LD_LIBRARY_PATH=$PWD/$G/b/lib"
IFS=";" read -r -a STEPS <<< "${SAN:-}"
n=0
for st in "${STEPS[@]}"; do
  n=$((n + 1))
  read -r tool bin limit filter <<< "$st"
  [[ ( -n $CS || $tool == plain ) && -x $G/b/bin/$bin ]] || { echo "skip: $st"; continue; }
  name="${n}_${tool}_${bin}"
  san=("$CS" --tool "$tool" --print-limit 12)
  [[ $tool == plain ]] && san=()  # the binary alone (does it hang?)
  env KVMEM_TEST_TRACE=1 KVMEM_TEST_SEED=${SEED:-1} KVMEM_SEARCH_SPREAD=0 "$lib" timeout "$limit" \
    "${san[@]}" $G/b/bin/$bin --gtest_filter="${filter:-*BulkTrees*}" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc ($(el)s) $(grep -E '^\[  (PASSED|FAILED) |ERROR SUMMARY' "$OUT/$name.log" | tr '\n' ' ')"
  grep -E '^check:' "$OUT/$name.log" | tail -n 1
  grep -m 6 -E '^========= (Barrier|Race|Invalid|Error|Warning)' "$OUT/$name.log"
  pack
done
# ROUNDS (0) rounds of kvmem-bench-gpu at 128K, batch 1 and 8, budgets 1024 and 2048: a kernel
# change's cost, against the run of record.
if [[ ${ROUNDS:-0} -gt 0 ]]; then
  ABS=(default)
  AB_TRACE=0 ab_rounds "$ROUNDS" --contexts 131072 --batches 1,8 --budgets 1024,2048
  python3 - "$OUT" "$(dirname "$0")" <<'PY' | tee "$OUT/ab.txt"
import sys
sys.path.insert(0, sys.argv[2])
import ab_rows
data = ab_rows.collect(sys.argv[1], ["default"], ("kvmem_search", "kvmem_search_sparse", "kvmem_sparse_attn"))
ab_rows.print_table(data, ["default"], lambda rs: "/".join(f"{r['us_per_layer']:.1f}" for r in rs) +
                    f" a{min(r.get('cpu_agreement', 1.0) for r in rs):.3f}", 24)
PY
  pack
fi
echo "== done ($(el)s)"
pack
