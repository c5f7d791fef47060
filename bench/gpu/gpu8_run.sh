#!/usr/bin/env bash
# One device call for issue 4 (where the e2e Attend's time goes beyond the kernels):
# kvmem-bench-gpu's search + sparse at 128K batch 1 budget 2048 for reference, then
# kvmem-bench-e2e at 128K through kvmemd for each of VARIANTS (';'-separated environment
# settings, inherited by the kvmemd the bench starts), interleaved over ROUNDS rounds. The
# default variants: plain; KVMEM_DEVICE_TIMELINE=1 (CUDA events around the upload, the kernels
# and the copy back: gpu_* phases); UCX_RNDV_THRESH=65536 (q and the reply eager over shm).
# PARITY (';'-separated `parity` specs, run_common.sh) runs first, e.g. the tests of the variants.
# Bundle: kvmemd, kvmem-bench-e2e, kvmem-bench-gpu (scripts/bundle.sh) into $G.
#   bash $G/run.sh
. "$(dirname "$0")/run_common.sh"
if [[ -n ${PARITY:-} ]]; then IFS=';' read -r -a specs <<< "$PARITY"; parity "${specs[@]}"; fi
IFS=';' read -r -a VARIANTS <<< "${VARIANTS:-default;KVMEM_DEVICE_TIMELINE=1;UCX_RNDV_THRESH=65536}"
timeout 90 $G/b/run kvmem-bench-gpu --json "$OUT/bench.json" --contexts 131072 --batches 1 \
  --budgets 2048 > /tmp/bench.log 2>&1; echo "bench rc=$? ($(el)s)"; grep -E "search_sparse|sparse_attn" /tmp/bench.log | cut -c1-90
for round in $(seq 1 ${ROUNDS:-2}); do
  for i in "${!VARIANTS[@]}"; do
    v=${VARIANTS[$i]}; e=(); [[ $v != default ]] && e=($v)
    env "${e[@]}" timeout 120 $G/b/run kvmem-bench-e2e --json "$OUT/e2e_r${round}_v$i.json" \
      --contexts ${CONTEXTS:-131072} --iters ${ITERS:-400} > /tmp/e2e.log 2>&1
    echo "[r$round $v] rc=$? ($(el)s)"; grep -E "kvmem_e2e_attend " /tmp/e2e.log | cut -c1-600
    { echo "### r$round $v"; cat /tmp/e2e.log; } >> "$OUT/e2e_raw.txt"
  done
done
