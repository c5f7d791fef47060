#!/usr/bin/env bash
# One device call of session 13 (bench/results/h200_run26_session13_calls.txt): parity of the
# attention on each pairs path and of the search, then interleaved A/B rounds of sparse rows
# (AB, ';'-separated settings as in gpu12_run.sh, with the attention trace), one --sweep of the
# default, and the search at SEARCH_BATCHES (1) for each first-round multiple in FR
# (KVMEM_SEARCH_FIRST_ROUND, 0 = the kernel's choice; SEARCH_TRACE=1 adds the cycle trace). Everything it writes goes into one archive,
# $OUT/all.tgz (the device tool brings back only a few files); the table is printed last.
# Staged by scripts/stage_gpu_search.sh (STAGE=.gpu9 RUN_SCRIPT=bench/gpu/gpu13_run.sh).
#   AB="default;KVMEM_ATTN_PATH=tc-pairs3" FR="0 24 32" bash .gpu9/run.sh
FINAL_OUT=${OUT:-/tmp/out}
mkdir -p "$FINAL_OUT"
export OUT=/tmp/w13
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
echo "== parity ($(el)s)"
IFS=";" read -r -a EXTRA <<< "${PARITY_EXTRA:-}"  # ";"-separated specs
parity kernels_cuda_parity_test "${EXTRA[@]}" tree_search_cuda_test
IFS=";" read -r -a ABS <<< "${AB:-default}"
ab_rounds ${ROUNDS:-2} --no-search --contexts 131072 --batches ${BATCHES:-1,8} --budgets ${BUDGETS:-1024,2048,4096}
if [[ ${SWEEP:-1} == 1 ]]; then sparse_sweep; fi
for fr in ${FR:-}; do
  e=(KVMEM_SEARCH_TRACE=${SEARCH_TRACE:-0}); [[ $fr != 0 ]] && e+=(KVMEM_SEARCH_FIRST_ROUND=$fr)
  env "${e[@]}" timeout 150 $G/b/run kvmem-bench-gpu --json "$OUT/search_fr$fr.json" \
    --commit "$(cat $G/COMMIT)" --contexts 131072 --batches ${SEARCH_BATCHES:-1} --budgets 1024,2048,4096 > "$OUT/search_fr$fr.log" 2>&1
  echo "search fr=$fr rc=$? ($(el)s)"
done
python3 - "$OUT" "$(dirname "$0")" "${ABS[@]}" <<'PY' | tee "$OUT/ab.txt"
import glob, json, os, re, sys
out, abs_ = sys.argv[1], sys.argv[3:]
sys.path.insert(0, sys.argv[2])
import ab_rows
data = ab_rows.collect(out, abs_, ("kvmem_sparse_attn", "kvmem_dense", "torch_sdpa_dense"))
ab_rows.print_sparse_report(out, abs_, data)
for p in sorted(glob.glob(f"{out}/search_fr*.json")):
    fr = re.search(r"fr(\d+)", p).group(1)
    rows = [r for r in json.load(open(p))["results"] if r["method"] in ("kvmem_search", "kvmem_search_sparse")]
    print(f"search fr={fr}: " + " ".join(f"{r['method'][6:]}/B{r['batch']}/{r['budget']}:{r['us_per_layer']:.1f}" for r in rows))
    traces = [l for l in open(p.replace(".json", ".log")) if l.startswith("search trace")]
    for l in traces[-1:]:
        print("  " + l.strip()[:600])
PY
tar -czf "$FINAL_OUT/all.tgz" -C "$OUT" .
