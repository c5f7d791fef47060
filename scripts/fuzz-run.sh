#!/usr/bin/env bash
# One time-boxed libFuzzer run of one target, as CI runs it (ctest label "fuzz", registered by
# tests/fuzz/CMakeLists.txt when KVMEM_BUILD_FUZZERS=ON):
#   scripts/fuzz-run.sh FUZZER_BINARY NAME WORK_DIR [extra libFuzzer flags...]
# Seeds: tests/fuzz/corpus/NAME and tests/fuzz/regressions/NAME (read only). New inputs go to
# WORK_DIR/corpus/NAME, crash / leak / timeout inputs to WORK_DIR/artifacts/NAME/. Duration:
# FUZZ_SECONDS (default 60). Exit status: libFuzzer's (non-zero on any crash, leak, timeout,
# OOM or sanitizer report); the last lines are libFuzzer's final stats (stat::number_of_executed_units
# etc.). Seed: FUZZ_SEED (default 1), so a CI run is reproducible: the same seed on the same corpus
# replays the same mutations, and a longer local run with that seed covers what CI's 60 s will try.
# Long exploratory runs set FUZZ_SEED=0 (libFuzzer picks a random seed).
set -euo pipefail
BIN=$1
NAME=$2
WORK=$3
shift 3
REPO=$(cd "$(dirname "$0")/.." && pwd)
SECONDS_BUDGET=${FUZZ_SECONDS:-60}
CORPUS=$WORK/corpus/$NAME
ARTIFACTS=$WORK/artifacts/$NAME
mkdir -p "$CORPUS" "$ARTIFACTS"
SEEDS=("$REPO/tests/fuzz/corpus/$NAME")
if [[ -d $REPO/tests/fuzz/regressions/$NAME ]]; then
  SEEDS+=("$REPO/tests/fuzz/regressions/$NAME")
fi
# -timeout: one input running for 25 s is a hang, not slowness (the slowest target runs an input
# in ~5 ms; CI machines are loaded). -rss_limit_mb: the harnesses keep one service / store alive.
exec "$BIN" -seed="${FUZZ_SEED:-1}" -max_total_time="$SECONDS_BUDGET" -timeout=25 -rss_limit_mb=4096 \
  -print_final_stats=1 -artifact_prefix="$ARTIFACTS/" "$@" "$CORPUS" "${SEEDS[@]}"
