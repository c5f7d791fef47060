#!/usr/bin/env bash
# Stages a build for the device tool: bundle the GPU test and bench binaries into
# MAIN/.gpu (git-ignored there), with the run script, torch script and commit id.
#   scripts/stage_gpu.sh BUILD_DIR MAIN_CHECKOUT
set -euo pipefail
build=$1
main=$2
src=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$main/.gpu"
mkdir -p "$main/.gpu"
strip_dir=$(mktemp -d)
mkdir -p "$strip_dir/bin"
for b in kernels_cuda_parity_test kvmem-bench-gpu; do
  strip -o "$strip_dir/bin/$b" "$build/bin/$b"
done
"$src/scripts/bundle.sh" "$strip_dir" "$main/.gpu/b" kernels_cuda_parity_test kvmem-bench-gpu
rm -rf "$strip_dir"
cp "$src/bench/gpu/device_run.sh" "$main/.gpu/run.sh"
cp "$src/bench/gpu/torch_sdpa.py" "$src/bench/gpu/report.py" "$main/.gpu/"
git -C "$src" rev-parse --short HEAD > "$main/.gpu/COMMIT"
if ! git -C "$src" diff --quiet HEAD; then echo "$(cat "$main/.gpu/COMMIT")-dirty" > "$main/.gpu/COMMIT"; fi
du -sh "$main/.gpu"
