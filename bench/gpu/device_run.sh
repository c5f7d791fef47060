#!/usr/bin/env bash
# One device call: parity tests, the GPU bench, torch SDPA, the table. Run from the checkout
# root on the GPU machine with the bundle in .gpu/ (scripts/bundle.sh). Results go to $OUT.
#   bash .gpu/run.sh [quick]
set -uo pipefail
cd "$(dirname "$0")/.."
G=.gpu
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv,noheader
echo "== parity"
timeout 120 $G/b/run kernels_cuda_parity_test > "$OUT/parity.log" 2>&1
for path in tc-cpasync simt; do
  echo "-- KVMEM_ATTN_PATH=$path" >> "$OUT/parity.log"
  KVMEM_ATTN_PATH=$path timeout 100 $G/b/run kernels_cuda_parity_test --gtest_filter='*Attend*' >> "$OUT/parity.log" 2>&1
done
grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED|Failure|error|^-- " "$OUT/parity.log" | head -40
EXTRA=()
if [[ "${1:-}" == quick ]]; then EXTRA=(--contexts 8192,131072 --batches 1,8 --budgets 2048); fi
echo "== bench"
timeout 270 $G/b/run kvmem-bench-gpu --json "$OUT/bench.json" --commit "$(cat $G/COMMIT)" \
  --machine "nvidia-h200 device machine ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))" \
  "${EXTRA[@]}" 2>&1 | tee "$OUT/bench.log" | tail -n 5
echo "== A/B: KVMEM_ATTN_PATH=tc-cpasync"
KVMEM_ATTN_PATH=tc-cpasync timeout 60 $G/b/run kvmem-bench-gpu --json /tmp/simt.json --contexts 8192,131072 --batches 1,8,32 --budgets 2048 \
  --commit "$(cat $G/COMMIT)-tc-cpasync" 2>&1 | grep -E "^kvmem" > "$OUT/simt.log"
cat "$OUT/simt.log"
echo "== torch"
TARGS=()
if [[ "${1:-}" == quick ]]; then TARGS=(--contexts 8192,131072 --batches 1,8); fi
timeout 150 python3 $G/torch_sdpa.py --json /tmp/torch.json --merge-into "$OUT/bench.json" "${TARGS[@]}" > "$OUT/torch.log" 2>&1
tail -n 3 "$OUT/torch.log"
echo "== table"
python3 $G/report.py "$OUT/bench.json" | tee "$OUT/table.txt"
echo "== ncu (one dense and one sparse launch, 128K batch 8)"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [[ -n "$NCU" ]]; then
  for k in DenseAttendKernel SpanAttendKernel; do
    timeout 100 "$NCU" --clock-control none -k "regex:$k" --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
      --section MemoryWorkloadAnalysis \
      env LD_LIBRARY_PATH=$PWD/$G/b/lib $G/b/bin/kvmem-bench-gpu --contexts 131072 --batches 8 \
      --budgets 2048 --replays 1 --json /tmp/ncu.json >> "$OUT/ncu.txt" 2>&1
  done
  grep -E "DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Registers Per|Theoretical Occupancy|Compute \(SM\)|Stall|L2 Hit|Block Limit|Waves" "$OUT/ncu.txt" | head -60
fi
