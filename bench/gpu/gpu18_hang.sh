#!/usr/bin/env bash
# Session 25's open question on the H200: a binary with bench/gpu/patches/session25-spread-first-round.patch
# hung in one-block (cluster 1) launches of the rounds search, which run none of the patch's new
# code (12 of 14 seeds of TreeSearchCuda.BulkTrees*, 2 of 4 of LargeTrees*), while main's binary
# passed the same seeds. This call looks for the cause with compute-sanitizer: synccheck (a
# barrier reached by diverged threads, the suspect) and racecheck, on the patched binary and on
# main's, same seeds, each step with a short limit so a hang costs little.
#
# Stage (here): the patched test as tree_search_cuda_test-spread next to main's bundle:
#   git worktree add /tmp/spread e60dbbb && git -C /tmp/spread apply \
#     /work/main/bench/gpu/patches/session25-spread-first-round.patch
#   cmake -S /tmp/spread -B /tmp/spread/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
#     -DCMAKE_CUDA_ARCHITECTURES=90 && ninja -C /tmp/spread/build tree_search_cuda_test
#   STAGE=.gpu9 RUN_SCRIPT=bench/gpu/gpu18_hang.sh scripts/stage_gpu_search.sh build /work/main
#   strip --strip-debug -o .gpu9/b/bin/tree_search_cuda_test-spread /tmp/spread/build/bin/tree_search_cuda_test
#   rm -f .gpu9z/*; tar -cf - .gpu9 | xz -T2 -9e > .gpu9z/x.tar.xz
# Run (device): tar -xJf .gpu9z/x.tar.xz && SEEDS="1 3" bash .gpu9/run.sh > $OUT/console.txt 2>&1
# Each step's log goes into $OUT/logs.tgz after the step (at most 8 files come back; a call cut
# off by its limit still returns what finished).
FINAL_OUT=${OUT:-/tmp/out}
mkdir -p "$FINAL_OUT"
export OUT=/tmp/w18
. "$(dirname "$0")/run_common.sh"
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
echo "compute-sanitizer: ${CS:-none}"
# step NAME LIMIT_S [VAR=VALUE ...] -- COMMAND...: the command under `timeout`, its log in $OUT.
step() {
  local name=$1 limit=$2; shift 2
  local envs=(); while [[ $1 != -- ]]; do envs+=("$1"); shift; done; shift
  env "${envs[@]}" timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ($(el)s) $(grep -E '^\[  (PASSED|FAILED) |ERROR SUMMARY' "$OUT/$name.log" | tr '\n' ' ')"
  grep -E '^check:' "$OUT/$name.log" | tail -n 1
  tar -czf "$FINAL_OUT/logs.tgz" -C "$OUT" .
}
lib="LD_LIBRARY_PATH=$PWD/$G/b/lib"
for s in ${SEEDS:-1 3}; do
  for bin in tree_search_cuda_test-spread tree_search_cuda_test; do
    [[ -x $G/b/bin/$bin ]] || continue
    common=(KVMEM_TEST_TRACE=1 KVMEM_TEST_SEED=$s KVMEM_SEARCH_SPREAD=0)
    step "plain_${bin}_$s" 30 "${common[@]}" -- $G/b/run $bin --gtest_filter='*BulkTrees*'
    [[ -n $CS ]] || continue
    step "synccheck_${bin}_$s" 120 "${common[@]}" "$lib" -- $CS --tool synccheck --print-limit 8 \
      $G/b/bin/$bin --gtest_filter='*BulkTrees*'
    step "racecheck_${bin}_$s" 150 "${common[@]}" "$lib" -- $CS --tool racecheck --print-limit 8 \
      $G/b/bin/$bin --gtest_filter='*BulkTrees*'
  done
done
