#!/usr/bin/env bash
# Stages the GPU-search bundle for the device tool into MAIN/$STAGE (default .gpu-search;
# git-ignored there): parity tests, kvmem-bench-gpu, optionally the daemon and the e2e bench,
# stripped of debug info, with $RUN_SCRIPT (default bench/gpu/search_run.sh) as run.sh.
# `integration` adds kvmemctl, the cross-backend tests (backends_test, hybrid_test) and the pool tests
# (kv_pool_test) to e2e's.
#   [STAGE=.gpu3 RUN_SCRIPT=bench/gpu/gpu3_run.sh] scripts/stage_gpu_search.sh BUILD_DIR MAIN_CHECKOUT [e2e|integration]
# ARCHIVE=DIR (relative to MAIN) also packs the stage as DIR/x.tar.xz for the device tool's carry
# (xz -9e: its 64 MiB dictionary spans the binaries, which share most of their bytes: ~19 MB for
# an `integration` stage of ~140 MB, where -6 gave 53-65 MB; about a minute on two cores). Extra
# files staged after this script (older binaries for A/B rounds) need the archive made again:
#   tar -cf - STAGE | xz -T2 -9e > DIR/x.tar.xz
set -euo pipefail
build=$1
main=$2
src=$(cd "$(dirname "$0")/.." && pwd)
bins=(tree_search_cuda_test kernels_cuda_parity_test kvmem-bench-gpu)
if [[ "${3:-}" == e2e || "${3:-}" == integration ]]; then
  bins+=(kvmemd kvmem-bench-e2e e2e_test device_search_test)
fi
if [[ "${3:-}" == integration ]]; then bins+=(kvmemctl backends_test hybrid_test kv_pool_test); fi
stage=${STAGE:-.gpu-search}
run_script=${RUN_SCRIPT:-bench/gpu/search_run.sh}
rm -rf "$main/$stage"
mkdir -p "$main/$stage"
tmp=$(mktemp -d)
mkdir -p "$tmp/bin"
for b in "${bins[@]}"; do strip --strip-debug -o "$tmp/bin/$b" "$build/bin/$b"; done
"$src/scripts/bundle.sh" "$tmp" "$main/$stage/b" "${bins[@]}"
rm -rf "$tmp"
cp "$src/$run_script" "$main/$stage/run.sh"
cp "$src/bench/gpu/torch_sdpa.py" "$src/bench/gpu/report.py" "$src/bench/gpu/run_common.sh" \
  "$src/bench/gpu/ab_rows.py" "$main/$stage/"
git -C "$src" rev-parse --short HEAD > "$main/$stage/COMMIT"
if ! git -C "$src" diff --quiet HEAD; then echo "$(cat "$main/$stage/COMMIT")-dirty" > "$main/$stage/COMMIT"; fi
du -sh "$main/$stage"
if [[ -n "${ARCHIVE:-}" ]]; then
  mkdir -p "$main/$ARCHIVE"
  rm -f "$main/$ARCHIVE/x.tar.xz"
  (cd "$main" && tar -cf - "$stage" | xz -T2 -9e > "$ARCHIVE/x.tar.xz")
  du -sh "$main/$ARCHIVE/x.tar.xz"
fi
