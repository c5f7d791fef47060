#!/usr/bin/env bash
# One device call for retrieval heads on the GPU (issue 5): the CUDA parity tests (kernel level
# and the session on the CUDA pool vs the host pool), then kvmem-bench-retrieval; JSON and logs
# under $OUT, a short table last. Run from the repo root on the GPU machine with the bundle
# staged by scripts/stage_gpu_retrieval.sh in .gpu-retrieval/.
#   bash .gpu-retrieval/run.sh [all|session|daemon]
#     session: only the Session::Attend A/B; daemon: only hybrid_test (kvmemd --backend cuda vs
#     --backend cpu, and the reference checks on the auto backend)
set -uo pipefail
cd "$(dirname "$0")/.."
G=.gpu-retrieval
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
MODE=${1:-all}
MACHINE="nvidia-h200 device machine ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
if [[ $MODE == all ]]; then
echo "== parity"
timeout 150 $G/b/run kernels_cuda_parity_test \
  --gtest_filter='*RetrievalHeadsParity.*:IndexOpsParity.PooledBlockScores:*SpanAttendParity.*' \
  > "$OUT/parity.log" 2>&1; echo "kernels_cuda_parity_test rc=$?"
timeout 200 $G/b/run retrieval_device_test >> "$OUT/parity.log" 2>&1; echo "retrieval_device_test rc=$?"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |Failure|Expected|Which is|error|seed|swapped" "$OUT/parity.log" | head -30
echo "== bench"
timeout ${BENCH_TIMEOUT:-240} $G/b/run kvmem-bench-retrieval --json "$OUT/h200-retrieval.json" \
  --commit "$(cat $G/COMMIT)" \
  --machine "$MACHINE" \
  > "$OUT/bench.log" 2>&1; echo "kvmem-bench-retrieval rc=$?"
cat "$OUT/bench.log"
fi
if [[ $MODE == daemon ]]; then
  timeout 200 $G/b/run hybrid_test > "$OUT/daemon.log" 2>&1; echo "hybrid_test rc=$?"
  grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[       OK|Failure|Expected|Which is|seed" "$OUT/daemon.log" | head -30
fi
if [[ $MODE != daemon && -x $G/b/bin/kvmem-bench-retrieval-session ]]; then
  echo "== session Attend: device scan vs keys staged to the host"
  timeout 120 $G/b/run kvmem-bench-retrieval-session --json "$OUT/session-device.json" \
    --commit "$(cat $G/COMMIT)" --machine "$MACHINE" 2>&1 | tee "$OUT/session.log"
  KVMEM_DEVICE_SCAN=off timeout 150 $G/b/run kvmem-bench-retrieval-session \
    --json "$OUT/session-staged.json" --commit "$(cat $G/COMMIT)" --machine "$MACHINE" 2>&1 | tee -a "$OUT/session.log"
fi
