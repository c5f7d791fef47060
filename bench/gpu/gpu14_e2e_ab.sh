#!/usr/bin/env bash
# One device call of session 13 for the e2e Attend: the integration tests on the staged kvmemd,
# then ROUNDS (3) interleaved rounds of kvmem-bench-e2e at CONTEXTS (131072) for each E2E_AB
# setting (';'-separated: "new", or "old" for $G/b/bin_old/kvmemd, a kvmemd of another commit
# copied there by hand next to a copy of the same kvmem-bench-e2e, which starts the kvmemd beside
# it; plus VAR=VALUE words for kvmemd's environment), and the
# search + sparse row it is held against (kvmem-bench-gpu, 128K batch 1 budget 2048). Everything
# goes into $OUT/all.tgz; the table is printed last. E2E_ARGS: more kvmem-bench-e2e arguments (e.g. --layers 4).
# Staged by scripts/stage_gpu_search.sh BUILD MAIN integration (RUN_SCRIPT=bench/gpu/gpu14_e2e_ab.sh).
#   bash .gpu9/run.sh
FINAL_OUT=${OUT:-/tmp/out}
export OUT=/tmp/w14
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
echo "== integration tests ($(el)s)"
IFS=";" read -r -a TESTS <<< "${TESTS:-device_search_test;e2e_test;KVMEM_DEVICE_INLINE=on e2e_test;KVMEM_DEVICE_SUBMIT=graph device_search_test;KVMEM_DEVICE_RESULTS=mapped device_search_test;KVMEM_SOURCE_DIR=$PWD backends_test;hybrid_test}"
parity "${TESTS[@]}"
cp $G/b/bin/kvmem-bench-e2e $G/b/bin_old/ 2>/dev/null
# E2E_AB: ';'-separated settings, each "[old] [VAR=VALUE ...]" ("old": $G/b/bin_old's kvmemd).
IFS=";" read -r -a ABS <<< "${E2E_AB:-new;old}"
for round in $(seq 1 ${ROUNDS:-3}); do
  for i in "${!ABS[@]}"; do
    words=(${ABS[$i]}); bin=$G/b/bin; envs=()
    for w in "${words[@]}"; do
      if [[ $w == old ]]; then bin=$G/b/bin_old; elif [[ $w == *=* ]]; then envs+=("$w"); fi
    done
    [[ -x $bin/kvmemd ]] || continue
    env "${envs[@]}" LD_LIBRARY_PATH=$PWD/$G/b/lib UCX_MODULE_DIR=$PWD/$G/b/lib/ucx timeout 120 $bin/kvmem-bench-e2e \
      --json "$OUT/e2e_${i}_r$round.json" --contexts ${CONTEXTS:-131072} --iters ${ITERS:-200} ${E2E_ARGS:-} > /tmp/e2e.log 2>&1
    echo "[r$round ${ABS[$i]}] rc=$? ($(el)s)"; { echo "### r$round ${ABS[$i]}"; cat /tmp/e2e.log; } >> "$OUT/e2e_raw.txt"
  done
done
timeout 100 $G/b/run kvmem-bench-gpu --json "$OUT/ref.json" --commit "$(cat $G/COMMIT)" \
  --contexts 131072 --batches 1 --budgets 2048 > "$OUT/ref.log" 2>&1
echo "ref rc=$? ($(el)s)"
python3 - "$OUT" "${ABS[@]}" <<'PY' | tee "$OUT/e2e_ab.txt"
import glob, json, re, sys
out, names = sys.argv[1], sys.argv[2:]
rows = {}
for p in sorted(glob.glob(f"{out}/e2e_*_r*.json")):
    i, r = re.search(r"e2e_(\d+)_r(\d+)", p).groups()
    v = names[int(i)]
    for x in json.load(open(p))["results"]:
        if x["method"] in ("kvmem_e2e_attend", "kvmem_e2e_decode"):
            rows.setdefault((x["method"][11:], x["context"], v), []).append(x)
    for a in json.load(open(p)).get("append", []):
        rows.setdefault(("append", a["context"], v), []).append({"us_per_layer": a["ms"], "gbps": a["gbps"]})
for (m, ctx, v), xs in sorted(rows.items()):
    extra = " ".join(f"{k}={xs[-1][k]:.1f}" for k in sorted(xs[-1]) if k.endswith(("_us", "gbps")) and isinstance(xs[-1][k], (int, float)))
    unit = "ms" if m == "append" else "us"
    print(f"e2e {m} {ctx} {v}: " + " / ".join(f"{x['us_per_layer']:.1f}" for x in xs) + f" {unit}   (last: {extra})")
try:
    for x in json.load(open(f"{out}/ref.json"))["results"]:
        if x["method"] in ("kvmem_search_sparse", "kvmem_search", "kvmem_sparse_attn"):
            print(f"ref {x['method']} {x['context']} B{x['batch']} {x['budget']}: {x['us_per_layer']:.1f}")
except Exception as e:
    print("ref missing", e)
PY
tar -czf "$FINAL_OUT/all.tgz" -C "$OUT" .
