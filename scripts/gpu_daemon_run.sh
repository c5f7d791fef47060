#!/usr/bin/env bash
# One device call for the daemon on a GPU: integration tests against a CUDA-backend kvmemd and
# the end-to-end Attend benchmark. Run from the checkout root on the GPU machine with a bundle
# made by `scripts/bundle.sh build .gpu-daemon kvmemd kvmemctl e2e_test malformed_test
# durability_test kvmem-load kvmem-bench-e2e` (then `strip --strip-debug .gpu-daemon/bin/*` to stay under the
# transfer limit). Results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
B=${BUNDLE:-.gpu-daemon}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== integration tests (kvmemd --backend auto -> cuda)"
for t in e2e_test malformed_test durability_test; do
  timeout 240 $B/run $t > "$OUT/$t.log" 2>&1
  echo "$t rc=$?"; grep -E "^\[  (PASSED|FAILED) |Failure|backend" "$OUT/$t.log" | head -20
done
echo "== e2e attend"
timeout 300 $B/run kvmem-bench-e2e --json "$OUT/e2e.json" --contexts ${CONTEXTS:-8192,32768,131072} \
  --iters ${ITERS:-200} 2>&1 | tee "$OUT/e2e.log" | tail -12
