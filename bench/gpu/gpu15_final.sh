#!/usr/bin/env bash
# Session 13's last device call: the search's early chunk scores checked and timed, then the run
# of record (run 26). The early scores lost and were reverted after it (6dee3aa): on main
# KVMEM_SEARCH_EARLY has no effect, and this script is the record of that call. (1) tree_search_cuda_test and device_search_test with early scores (the default);
# (2) two interleaved rounds of kvmem-bench-gpu search rows at 128K, batch 1 and 8, default
# against KVMEM_SEARCH_EARLY=off; (3) if the tests passed and early scores were faster at batch 1
# budget 2048, the run of record as is, else with KVMEM_SEARCH_EARLY=off exported (said in
# $OUT/early.txt): gpu4_run.sh full, staged as run.sh next to this script.
#   STAGE=.gpu9 RUN_SCRIPT=bench/gpu/gpu4_run.sh scripts/stage_gpu_search.sh BUILD MAIN integration
#   cp bench/gpu/gpu15_final.sh .gpu9/final.sh; bash .gpu9/final.sh
here=$(cd "$(dirname "$0")" && pwd)
FINAL_OUT=${OUT:-/tmp/out}
W=/tmp/w15
mkdir -p "$W" "$FINAL_OUT"
G=$(basename "$here")
cd "$here/.."
ok=1
for t in tree_search_cuda_test device_search_test; do
  timeout 150 $G/b/run $t > "$W/$t.log" 2>&1 || ok=0
  echo "$t rc=$? $(grep -E '^\[  (PASSED|FAILED)' "$W/$t.log" | head -2 | tr '\n' ' ')"
done
for round in 1 2; do
  for v in default off; do
    e=(); [[ $v == off ]] && e=(KVMEM_SEARCH_EARLY=off)
    env "${e[@]}" timeout 100 $G/b/run kvmem-bench-gpu --json "$W/s_${v}_r$round.json" --commit "$(cat $G/COMMIT)" \
      --contexts 131072 --batches 1,8 --budgets 1024,2048,4096 > "$W/s_${v}_r$round.log" 2>&1 || ok=0
    echo "[r$round $v] rc=$?"
  done
done
python3 - "$W" "$ok" <<'PY' | tee "$W/early.txt"
import glob, json, sys
w, ok = sys.argv[1], sys.argv[2] == "1"
rows = {}
for v in ("default", "off"):
    for p in sorted(glob.glob(f"{w}/s_{v}_r*.json")):
        for r in json.load(open(p))["results"]:
            if r["method"] in ("kvmem_search", "kvmem_search_sparse"):
                rows.setdefault((r["method"], r["batch"], r["budget"]), {}).setdefault(v, []).append(r)
for k in sorted(rows):
    cells = {v: "/".join(f"{r['us_per_layer']:.1f}" for r in rs) for v, rs in rows[k].items()}
    agree = min(r.get("cpu_agreement", 1.0) for rs in rows[k].values() for r in rs)
    print(f"{k[0]:20} B{k[1]} {k[2]:5d}  early {cells.get('default', '-'):>12}  off {cells.get('off', '-'):>12}  agree {agree}")
key = ("kvmem_search", 1, 2048)
mean = lambda v: sum(r["us_per_layer"] for r in rows.get(key, {}).get(v, [])) / max(1, len(rows.get(key, {}).get(v, [])))
agree = all(r.get("cpu_agreement", 1.0) == 1.0 for d in rows.values() for rs in d.values() for r in rs)
keep = ok and agree and key in rows and "default" in rows[key] and mean("default") < mean("off")
print(f"early scores: {'kept' if keep else 'off for the run of record'} (tests {'passed' if ok else 'FAILED'}, "
      f"B1 2048 search {mean('default'):.1f} early against {mean('off'):.1f})")
print("KEEP" if keep else "OFF")
PY
if [[ $(tail -n 1 "$W/early.txt") != KEEP ]]; then export KVMEM_SEARCH_EARLY=off; fi
tar -czf "$FINAL_OUT/early.tgz" -C "$W" .
OUT=$FINAL_OUT bash "$here/run.sh" full
