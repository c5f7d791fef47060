#!/usr/bin/env bash
# One device call for issue 4 (session 11, second call): parity with KVMEM_ATTN_MERGE=early,
# an interleaved A/B of kvmem-bench-gpu at 128K (AB: ';'-separated environments, ROUNDS
# rounds), the e2e Attend at 128K per AB variant, and the fidelity profile's e2e Attend after
# the host rescoring changes. Bundle: scripts/stage_gpu_search.sh ... integration
# (STAGE=.gpu9 RUN_SCRIPT=bench/gpu/gpu10_run.sh). The JSON of record as files, the rest in logs.tgz.
#   bash $G/run.sh
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
echo "== parity ($(el)s)"
parity kernels_cuda_parity_test "KVMEM_ATTN_MERGE=early kernels_cuda_parity_test" \
  "KVMEM_ATTN_MERGE=early tree_search_cuda_test" "KVMEM_ATTN_MERGE=early device_search_test" \
  "KVMEM_SOURCE_DIR=$PWD backends_test" hybrid_test e2e_test
IFS=';' read -r -a ABS <<< "${AB:-default;KVMEM_ATTN_MERGE=early}"
mkdir -p /tmp/ab
for round in $(seq 1 ${ROUNDS:-2}); do
  for i in "${!ABS[@]}"; do
    v=${ABS[$i]}; e=(); [[ $v != default ]] && e=($v)
    env "${e[@]}" timeout 90 $G/b/run kvmem-bench-gpu --json "/tmp/ab/ab_r${round}_v$i.json" \
      --contexts 131072 --batches 1,8,32 --budgets 1024,2048,4096 > /tmp/ab/ab_r${round}_v$i.log 2>&1
    echo "[r$round $v] bench rc=$? ($(el)s)"
  done
done
python3 - "${ABS[@]}" <<'PY' | tee /tmp/ab/ab.txt
import json, sys, os, glob
v = sys.argv[1:]
rows = {}
for p in sorted(glob.glob("/tmp/ab/ab_r*_v*.json")):
    r, i = os.path.basename(p)[3:-5].split("_v")
    for x in json.load(open(p))["results"]:
        if x["method"] in ("kvmem_sparse_attn", "kvmem_search_sparse", "kvmem_search"):
            rows.setdefault((x["method"], x["batch"], x["budget"]), {}).setdefault(int(i), []).append(x["us_per_layer"])
print(f"{'method':20} {'B':>2} {'bud':>4} " + " ".join(f"{a[-22:]:>24}" for a in v))
for k in sorted(rows):
    print(f"{k[0]:20} {k[1]:2d} {k[2]:4d} " + " ".join(f"{' / '.join('%.2f' % u for u in rows[k].get(i, [])):>24}" for i in range(len(v))))
PY
for i in "${!ABS[@]}"; do
  v=${ABS[$i]}; e=(); [[ $v != default ]] && e=($v)
  env "${e[@]}" timeout 120 $G/b/run kvmem-bench-e2e --json "/tmp/ab/e2e_v$i.json" --contexts 131072 \
    --iters 300 > /tmp/ab/e2e_v$i.log 2>&1
  echo "[e2e $v] rc=$? ($(el)s)"; grep -E "kvmem_e2e_attend " /tmp/ab/e2e_v$i.log | cut -c1-330
done
echo "== e2e attend, fidelity profile ($(el)s)"
timeout 150 $G/b/run kvmem-bench-e2e --json "$OUT/e2e_fidelity.json" --config "$PWD/deploy/kvmemd-fidelity.json" \
  --contexts 32768,131072 --iters 20 > /tmp/ab/e2e_fid.log 2>&1; echo "e2e fidelity rc=$? ($(el)s)"
grep -E "kvmem_e2e_attend |ping" /tmp/ab/e2e_fid.log | cut -c1-600
cp /tmp/ab/ab_r1_v0.json "$OUT/bench.json"
(cd "$OUT" && tar -czf logs.tgz host.txt parity.log -C /tmp ab && rm -f host.txt parity.log)
echo "== done ($(el)s)"
