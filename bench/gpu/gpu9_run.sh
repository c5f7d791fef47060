#!/usr/bin/env bash
# One device call for issue 4 after the host rescoring changes (session 11): the cross-backend
# and e2e tests, kvmem-bench-gpu at 128K (search + sparse, the e2e target's reference), the e2e
# Attend at 128K for each of VARIANTS (';'-separated kvmemd environments) interleaved over ROUNDS
# rounds, then the fidelity profile's e2e Attend at 32K and 128K (its rescore_* sub-phases).
# Bundle: scripts/stage_gpu_search.sh ... integration (STAGE=.gpu9 RUN_SCRIPT=bench/gpu/gpu9_run.sh).
# At most 8 files come back: the JSON of record as files, the rest packed in logs.tgz.
#   bash $G/run.sh
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
echo "== parity ($(el)s)"
parity "KVMEM_SOURCE_DIR=$PWD backends_test" hybrid_test e2e_test device_search_test
echo "== kvmem-bench-gpu 128K ($(el)s)"
timeout 120 $G/b/run kvmem-bench-gpu --json "$OUT/bench.json" --contexts 131072 --batches 1,8 \
  --budgets 1024,2048 > /tmp/bench.log 2>&1; echo "bench rc=$? ($(el)s)"
grep -E "search_sparse|sparse_attn" /tmp/bench.log | cut -c1-100
IFS=';' read -r -a VARIANTS <<< "${VARIANTS:-default;KVMEM_DEVICE_SUBMIT=graph;KVMEM_DEVICE_RESULTS=mapped}"
mkdir -p /tmp/e2e
for round in $(seq 1 ${ROUNDS:-2}); do
  for i in "${!VARIANTS[@]}"; do
    v=${VARIANTS[$i]}; e=(); [[ $v != default ]] && e=($v)
    env "${e[@]}" timeout 120 $G/b/run kvmem-bench-e2e --json "/tmp/e2e/e2e_r${round}_v$i.json" \
      --contexts 131072 --iters ${ITERS:-300} > /tmp/e2e.log 2>&1
    echo "[r$round $v] rc=$? ($(el)s)"; grep -E "kvmem_e2e_attend " /tmp/e2e.log | cut -c1-330
    { echo "### r$round $v"; cat /tmp/e2e.log; } >> /tmp/e2e/e2e_raw.txt
  done
done
echo "== e2e attend, fidelity profile ($(el)s)"
timeout 150 $G/b/run kvmem-bench-e2e --json "$OUT/e2e_fidelity.json" --config "$PWD/deploy/kvmemd-fidelity.json" \
  --contexts 32768,131072 --iters 30 > /tmp/e2e_fid.log 2>&1; echo "e2e fidelity rc=$? ($(el)s)"
grep -E "kvmem_e2e_attend |ping" /tmp/e2e_fid.log | cut -c1-600
cp /tmp/e2e_fid.log /tmp/e2e/
(cd "$OUT" && tar -czf logs.tgz host.txt parity.log -C /tmp e2e && rm -f host.txt parity.log)
echo "== done ($(el)s)"
