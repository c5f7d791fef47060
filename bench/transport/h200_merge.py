# Merges the rounds of the GPU-host transport scripts (h200_ab.sh, h200_t5.sh) and prints the
# table: R N OUT VARIANTS PHASE_VARIANTS ABOUT. R holds host.txt and VARIANT_I.json for
# I = 1..N (one kvmem-bench-transport --rounds 1 run each); VARIANTS and PHASE_VARIANTS are
# comma lists (PHASE_VARIANTS: those whose shm append phases are printed); ABOUT says what the
# variants are (it goes into OUT, so a bundle that changes a variant's meaning must say so).
import json, os, statistics, sys
R, N, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
V, PV, about = sys.argv[4].split(","), sys.argv[5].split(","), sys.argv[6]
res = {"about": about, "host": open(os.path.join(R, "host.txt")).read().splitlines()}
for v in V:
    res[v] = []
    for i in range(1, N + 1):
        p = os.path.join(R, f"{v}_{i}.json")
        try:
            res[v].append(json.load(open(p)) if os.path.exists(p) else None)
        except ValueError:
            res[v].append(None)
json.dump(res, open(out, "w"), indent=1)
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")
print(f"{'variant':8} {'tr':4} {'append':>7} {'ucx bw':>7} {'ratio':>6} {'2MiB':>6} {'ucx2':>6} {'r2':>5} {'ping':>6} {'ucxrtt':>6}  per-round ratios")
for v in V:
    for t in ("shm", "tcp"):
        rows = [r[t]["rounds"][0] for r in res[v] if r and t in r]
        if not rows: continue
        ratios = [r["append_gbps"] / r["ucx_am_bw_gbps"] for r in rows]
        r2 = [r["append_2mib_gbps"] / r["ucx_am_bw_2mib_gbps"] for r in rows]
        print(f"{v:8} {t:4} {med([r['append_gbps'] for r in rows]):7.2f} {med([r['ucx_am_bw_gbps'] for r in rows]):7.2f} {med(ratios):6.2f} "
              f"{med([r['append_2mib_gbps'] for r in rows]):6.2f} {med([r['ucx_am_bw_2mib_gbps'] for r in rows]):6.2f} {med(r2):5.2f} "
              f"{med([r['ping_rtt_p50_us'] for r in rows]):6.2f} {med([r['ucx_am_rtt_us'] for r in rows]):6.2f}  " + " ".join(f"{x:.2f}" for x in ratios))
for v in PV:
    rows = [r["shm"]["rounds"][0] for r in res[v] if r and "shm" in r]
    ph = {}
    for r in rows:
        for k, x in r.get("append_phase_us", {}).items(): ph.setdefault(k, []).append(x)
    landed = [(r.get("appends_landed"), r.get("appends_gathered")) for r in rows]
    print(v, "shm 1 MiB phase us (median):", {k: round(med(x), 1) for k, x in ph.items()},
          *(["landed/gathered:", landed] if any(a or b for a, b in landed) else []),
          "memcpy hot/cold GB/s:", round(med([r.get("memcpy_1mib_hot_gbps") for r in rows]), 1), round(med([r.get("memcpy_1mib_into_128mib_gbps") for r in rows]), 1))
