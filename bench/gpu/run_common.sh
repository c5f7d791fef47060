# Sourced by the device-call scripts that scripts/stage_gpu_search.sh stages as $G/run.sh
# (gpu4/5/6/8_run.sh; the stage script copies this file next to it): cd to the checkout root,
# G (the bundle folder), OUT (what comes back), `el` (seconds since the start) and `parity`.
set -uo pipefail
cd "$(dirname "$0")/.."
G=${G:-$(basename "$(cd "$(dirname "$0")" && pwd)")}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
# The host's runtime (KINDS.md: kernel 4.4.0 is gVisor, "-fc-" Firecracker): host-side timings
# (the e2e Attend, launch calls) differ between the two, so every call records it.
echo "host kernel $(uname -r) ($(case $(uname -r) in 4.4.0*) echo gVisor;; *-fc-*) echo Firecracker;; *) echo unknown runtime;; esac)), $(nproc) CPUs" | tee "$OUT/host.txt"

# parity SPEC...: each SPEC is "[VAR=VALUE ...] TEST"; runs the bundled TEST (skipped when the
# bundle lacks it) with those variables and a 150 s limit, prints its exit status and gtest's
# verdict lines, and appends its whole log to $OUT/parity.log.
parity() {
  local spec
  for spec in "$@"; do
    local words=($spec) envs=()
    while [[ ${words[0]} == *=* ]]; do envs+=("${words[0]}"); words=("${words[@]:1}"); done
    [[ -x $G/b/bin/${words[0]} ]] || continue
    env "${envs[@]}" timeout 150 $G/b/run "${words[@]}" > /tmp/parity_one.log 2>&1
    echo "$spec rc=$? ($(el)s)"
    grep -E "^\[  (PASSED|FAILED|SKIPPED) |Failure|Expected|Which is|cluster option|graph off|seed" \
      /tmp/parity_one.log | head -12
    { echo "### $spec"; cat /tmp/parity_one.log; } >> "$OUT/parity.log"
  done
}

# pack: everything under $OUT so far into $FINAL_OUT/logs.tgz (scripts that keep their logs
# in a work folder and return one archive, since a device call brings back at most 8 files;
# a call cut off by its limit still returns what was packed).
pack() { tar -czf "${FINAL_OUT:?}/logs.tgz" -C "$OUT" .; }

# run_tests: the ';'-separated parity specs of $TESTS (each as `parity` takes it), packing
# after each.
run_tests() {
  echo "== tests ($(el)s)"
  [[ -n ${TESTS:-} ]] || return 0
  local specs spec
  IFS=";" read -r -a specs <<< "$TESTS"
  for spec in "${specs[@]}"; do parity "$spec"; pack; done
}

# ab_rounds ROUNDS BENCH_ARGS...: ROUNDS interleaved rounds of kvmem-bench-gpu BENCH_ARGS for each
# setting in the array ABS ("default", or space-separated VAR=VALUE words for its environment, and
# the word "old" for $G/b/bin/kvmem-bench-gpu-old, a bench of another commit copied there by hand,
# or "@X" for $G/b/bin/kvmem-bench-gpu-X),
# with the attention trace (KVMEM_ATTN_TRACE=1) unless AB_TRACE=0; JSON to
# $OUT/ab_r{round}_{i}.json, the bench's output appended to $OUT/ab_raw.txt.
ab_rounds() {
  local rounds=$1 round i ab
  shift
  for round in $(seq 1 "$rounds"); do
    for i in "${!ABS[@]}"; do
      ab=${ABS[$i]}
      local e=() w bench=kvmem-bench-gpu
      [[ ${AB_TRACE:-1} == 1 ]] && e+=(KVMEM_ATTN_TRACE=1)  # the bench traces when it is set at all
      for w in $ab; do
        if [[ $w == old || $w == @* ]]; then bench=kvmem-bench-gpu-${w#@}
        elif [[ $w == *=* ]]; then e+=("$w"); fi
      done
      env "${e[@]}" timeout 150 $G/b/run $bench --json "$OUT/ab_r${round}_$i.json" \
        --commit "$(cat $G/COMMIT)" "$@" > /tmp/ab.log 2>&1
      echo "[r$round $ab] rc=$? ($(el)s)"
      { echo "### r$round $ab"; cat /tmp/ab.log; } >> "$OUT/ab_raw.txt"
    done
  done
}

# sparse_sweep: one --sweep run of the default sparse attention (128K, batch 1 and 8, budgets
# 1024 and 2048) into $OUT/sweep.json.
sparse_sweep() {
  timeout 200 $G/b/run kvmem-bench-gpu --json "$OUT/sweep.json" --commit "$(cat $G/COMMIT)" --no-search \
    --sweep --contexts 131072 --batches 1,8 --budgets 1024,2048 > "$OUT/sweep.log" 2>&1
  echo "sweep rc=$? ($(el)s)"
}
