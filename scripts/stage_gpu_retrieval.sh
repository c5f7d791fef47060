#!/usr/bin/env bash
# Stages the retrieval-heads GPU bundle for the device tool into MAIN/.gpu-retrieval (git-ignored
# there): the CUDA parity tests, the session test on the CUDA pool and kvmem-bench-retrieval,
# stripped of debug info.
#   scripts/stage_gpu_retrieval.sh BUILD_DIR MAIN_CHECKOUT [daemon]
# daemon: only hybrid_test, kvmemd and kvmemctl (the cross-backend daemon test).
set -euo pipefail
build=$1
main=$2
src=$(cd "$(dirname "$0")/.." && pwd)
bins=(kernels_cuda_parity_test retrieval_device_test kvmem-bench-retrieval kvmem-bench-retrieval-session)
if [[ "${3:-}" == daemon ]]; then bins=(hybrid_test kvmemd kvmemctl); fi
rm -rf "$main/.gpu-retrieval"
mkdir -p "$main/.gpu-retrieval"
tmp=$(mktemp -d)
mkdir -p "$tmp/bin"
for b in "${bins[@]}"; do strip --strip-debug -o "$tmp/bin/$b" "$build/bin/$b"; done
"$src/scripts/bundle.sh" "$tmp" "$main/.gpu-retrieval/b" "${bins[@]}"
rm -rf "$tmp"
cp "$src/bench/gpu/retrieval_run.sh" "$main/.gpu-retrieval/run.sh"
git -C "$src" rev-parse --short HEAD > "$main/.gpu-retrieval/COMMIT"
if ! git -C "$src" diff --quiet HEAD; then echo "$(cat "$main/.gpu-retrieval/COMMIT")-dirty" > "$main/.gpu-retrieval/COMMIT"; fi
du -sh "$main/.gpu-retrieval"
