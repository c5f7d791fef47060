#!/usr/bin/env bash
# Follow-up probes (shm only, --rounds 1 each, variants interleaved, 3 iterations): the search
# pool's fan-out for the append copy, and UCX protocol v2 for the IOV (landing) receive.
B=.gpu-transport4
export LD_LIBRARY_PATH=$PWD/$B/lib UCX_MODULE_DIR=$PWD/$B/lib/ucx PATH=$PWD/$B/bin:$PATH
M="GPU host of the device tool (16 cores; CPU backend, no GPU used)"
C=$(cat $B/COMMIT)
R=/tmp/r2; mkdir -p $R
run() {  # label, env, daemon args...
  local label=$1 envs=$2; shift 2
  local da=(); for a in "$@"; do da+=(--daemon-arg "$a"); done
  env $envs timeout 60 $B/bin/kvmem-bench-transport --rounds 1 --transports shm --machine "$M" --commit "$C" "${da[@]}" --json $R/${label}_$i.json > $R/${label}_$i.log 2>&1
  echo "$label $i rc=$? $(date +%T)"
}
for i in 1 2 3; do
  run off "X=1" --append-landing off
  run off_t4 "X=1" --append-landing off --search-threads 4
  run off_t2 "X=1" --append-landing off --search-threads 2
  run off_t0 "X=1" --append-landing off --search-threads 0
  run on_t4 "X=1" --search-threads 4
  run on_proto "UCX_PROTO_ENABLE=y" 
  python3 - $R > $OUT/table2.txt 2>&1 <<'PY'
import json, os, glob, statistics, sys
R = sys.argv[1]; res = {}
for p in sorted(glob.glob(os.path.join(R, "*.json"))):
    label = os.path.basename(p).rsplit("_", 1)[0]
    res.setdefault(label, []).append(json.load(open(p)))
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "transport-probes.json"), "w"), indent=1)
for label, runs in res.items():
    rows = [r["shm"]["rounds"][0] for r in runs]
    ratios = [r["append_gbps"] / r["ucx_am_bw_gbps"] for r in rows]
    ph = {}
    for r in rows:
        for k, x in r.get("append_phase_us", {}).items(): ph.setdefault(k, []).append(x)
    print(f"{label:9} append {statistics.median([r['append_gbps'] for r in rows]):5.2f} ucx {statistics.median([r['ucx_am_bw_gbps'] for r in rows]):5.2f} "
          f"ratio {statistics.median(ratios):.2f} [{' '.join(f'{x:.2f}' for x in ratios)}] 2MiB {statistics.median([r['append_2mib_gbps'] / r['ucx_am_bw_2mib_gbps'] for r in rows]):.2f} "
          f"phases {{{', '.join(f'{k} {statistics.median(v):.0f}' for k, v in ph.items())}}} landed {[r.get('appends_landed') for r in rows]}")
PY
done
grep -h "WARN\|ERROR\|error" $R/*.log | grep -v mpool | sort | uniq -c | head -5
cat $OUT/table2.txt
