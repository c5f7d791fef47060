#!/usr/bin/env bash
# One device call of session 16: the flat search (KVMEM_SEARCH_FLAT) against the rounds of
# leaves. Parity and integration tests first (TESTS, ';'-separated specs), then ROUNDS
# interleaved rounds of kvmem-bench-gpu for each AB setting (';'-separated; default
# "KVMEM_SEARCH_FLAT=off;KVMEM_SEARCH_FLAT=on") over CONTEXTS x BATCHES x BUDGETS, then (TRACE=1)
# one traced run of the flat search at 128K batch 1 (rank 0's cycles per step), and a table of
# search and search + sparse per setting last. Everything goes into $OUT/all.tgz.
# Staged by scripts/stage_gpu_search.sh (STAGE=.gpu9 RUN_SCRIPT=bench/gpu/gpu16_run.sh ... integration).
#   bash .gpu9/run.sh
FINAL_OUT=${OUT:-/tmp/out}
mkdir -p "$FINAL_OUT"
export OUT=/tmp/w16
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
echo "== parity ($(el)s)"
IFS=";" read -r -a SPECS <<< "${TESTS:-tree_search_cuda_test;device_search_test;KVMEM_SEARCH_FLAT=off device_search_test;kv_pool_test;kernels_cuda_parity_test}"
parity "${SPECS[@]}"
IFS=";" read -r -a ABS <<< "${AB:-KVMEM_SEARCH_FLAT=off;KVMEM_SEARCH_FLAT=on}"
AB_TRACE=0 ab_rounds ${ROUNDS:-2} --contexts ${CONTEXTS:-8192,32768,131072} --batches ${BATCHES:-1,8} \
  --budgets ${BUDGETS:-1024,2048,4096}
# MEMCHECK=N: N compute-sanitizer memcheck runs of the bench with the flat search on.
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
for i in $(seq 1 ${MEMCHECK:-0}); do
  KVMEM_SEARCH_FLAT=on timeout 200 $CS --tool memcheck --print-limit 4 env LD_LIBRARY_PATH=$PWD/$G/b/lib \
    $G/b/bin/kvmem-bench-gpu --json /tmp/mc.json --contexts ${CONTEXTS:-8192,32768,131072} \
    --batches ${BATCHES:-1,8} --budgets ${BUDGETS:-1024,2048,4096} --replays 2 > "$OUT/memcheck_$i.log" 2>&1
  echo "memcheck $i rc=$? ($(el)s): $(grep -c "Invalid\|ERROR SUMMARY: [1-9]" "$OUT/memcheck_$i.log") reports"
done
if [[ ${TRACE:-1} == 1 ]]; then
  KVMEM_SEARCH_FLAT=on KVMEM_SEARCH_TRACE=1 timeout 100 $G/b/run kvmem-bench-gpu --json "$OUT/trace.json" \
    --contexts 131072 --batches 1 --budgets 2048 > "$OUT/trace.log" 2>&1
  echo "trace rc=$? ($(el)s)"
fi
python3 - "$OUT" "${ABS[@]}" <<'PY' | tee "$OUT/ab.txt"
import glob, json, os, re, statistics, sys
out, abs_ = sys.argv[1], sys.argv[2:]
data = {}
for p in sorted(glob.glob(f"{out}/ab_r*_*.json")):
    i = int(re.search(r"_(\d+)\.json$", p).group(1))
    for r in json.load(open(p))["results"]:
        if r["method"] in ("kvmem_search", "kvmem_search_sparse"):
            data.setdefault((r["method"], r["context"], r["batch"], r["budget"]), {}).setdefault(i, []).append(r)
print(f"{'method':20} {'ctx':>6} {'B':>2} {'bud':>4} " + " ".join(f"{a[-22:]:>30}" for a in abs_) + "  2nd-1st")
for i, a in enumerate(abs_):
    print(f"# {a}: {len(glob.glob(f'{out}/ab_r*_{i}.json'))} runs with JSON")
for k in sorted(data):
    cells = []
    for i in range(len(abs_)):
        rs = data[k].get(i, [])
        if not rs:
            cells.append(" " * 30)
            continue
        us = "/".join(f"{r['us_per_layer']:.1f}" for r in rs)
        agree = min(r.get("cpu_agreement", 1.0) for r in rs)
        failed = max(r.get("failed_heads", 0) for r in rs)
        cells.append(f"{us:>17} a{agree:.3f} f{failed} r{rs[0].get('rounds_max', '-')}")
    if len(abs_) >= 2 and all(data[k].get(i) for i in range(2)):
        a = statistics.median(r["us_per_layer"] for r in data[k][0])
        b = statistics.median(r["us_per_layer"] for r in data[k][1])
        cells.append(f"{b - a:+6.1f}")
    print(f"{k[0]:20} {k[1]:6d} {k[2]:2d} {k[3]:4d} " + " ".join(cells))
for l in open(f"{out}/trace.log") if os.path.exists(f"{out}/trace.log") else []:
    if l.startswith("search trace"):
        print(l.strip()[:700])
PY
tar -czf "$FINAL_OUT/all.tgz" -C "$OUT" .
