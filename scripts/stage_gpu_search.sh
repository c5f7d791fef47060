#!/usr/bin/env bash
# Stages the GPU-search bundle for the device tool into MAIN/.gpu-search (git-ignored there):
# parity tests, kvmem-bench-gpu, optionally the daemon and the e2e bench, stripped of debug info.
#   scripts/stage_gpu_search.sh BUILD_DIR MAIN_CHECKOUT [e2e]
set -euo pipefail
build=$1
main=$2
src=$(cd "$(dirname "$0")/.." && pwd)
bins=(tree_search_cuda_test kernels_cuda_parity_test kvmem-bench-gpu)
if [[ "${3:-}" == e2e ]]; then bins+=(kvmemd kvmem-bench-e2e e2e_test device_search_test); fi
rm -rf "$main/.gpu-search"
mkdir -p "$main/.gpu-search"
tmp=$(mktemp -d)
mkdir -p "$tmp/bin"
for b in "${bins[@]}"; do strip --strip-debug -o "$tmp/bin/$b" "$build/bin/$b"; done
"$src/scripts/bundle.sh" "$tmp" "$main/.gpu-search/b" "${bins[@]}"
rm -rf "$tmp"
cp "$src/bench/gpu/search_run.sh" "$main/.gpu-search/run.sh"
cp "$src/bench/gpu/torch_sdpa.py" "$src/bench/gpu/report.py" "$main/.gpu-search/"
git -C "$src" rev-parse --short HEAD > "$main/.gpu-search/COMMIT"
if ! git -C "$src" diff --quiet HEAD; then echo "$(cat "$main/.gpu-search/COMMIT")-dirty" > "$main/.gpu-search/COMMIT"; fi
du -sh "$main/.gpu-search"
