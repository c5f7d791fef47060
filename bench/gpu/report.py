#!/usr/bin/env python3
"""Prints the short table of a kvmem-bench-gpu JSON (with torch rows merged) and the targets;
with --sweep, the split sweeps of the attention rows and the search rows (cluster size, the
one-block time, CPU agreement, phases) instead.

  report.py [--sweep] bench.json"""
import json
import sys


def sweep(rows):
    for r in rows:
        if "sweep" in r:
            s = " ".join((f"{x['target_blocks']}:" if x['target_blocks'] else f"s{x['split_tokens']}/{x.get('blocks')}:") + f"{x['us']:.1f}" for x in r["sweep"])
            print(f"{r['method']:18} {r['context']:6d} B{r['batch']:<2d} b{r['budget']:<4d} default {r['us_per_layer']:.1f} (s{r.get('split_tokens')}/{r.get('blocks')} c{r.get('attn_cluster')}) | {s}")
        if r["method"] == "kvmem_search":
            print(f"search {r['context']:6d} B{r['batch']:<2d} b{r['budget']:<4d} cluster {r.get('cluster_size')} "
                  f"{r['us_per_layer']:.1f} us (1 block: {r.get('search_us_cluster1', 0):.1f}) agree {r.get('cpu_agreement')} "
                  f"phases {json.dumps({k: round(v, 1) for k, v in r.get('search_phase_us_mean', {}).items()})}")


if sys.argv[1] == "--sweep":
    sweep(json.load(open(sys.argv[2]))["results"])
    sys.exit(0)
j = json.load(open(sys.argv[1]))
copy = j["copy_gbps"]
rows = j["results"]
print(f"machine {j['machine']}  commit {j['commit']}  copy {copy:.0f} GB/s")
key = lambda r: (r["context"], r["batch"], r["budget"])
torch = {(r["context"], r["batch"]): r for r in rows if r["method"] == "torch_sdpa_dense"}
print(f"{'method':22} {'ctx':>6} {'B':>3} {'budget':>6} {'us':>9} {'floor':>8} {'GB/s':>6} {'%copy':>6} {'err':>8}  note")
for r in sorted(rows, key=lambda r: (r["context"], r["batch"], r["method"], r["budget"])):
    note = ""
    t = torch.get((r["context"], r["batch"]))
    if r["method"] == "kvmem_dense" and t:
        ratio = r["us_per_layer"] / t["us_per_layer"]
        note = f"{ratio:.2f}x torch" + (" (target <=1.25x: " + ("MET" if ratio <= 1.25 else "MISSED") + ")" if r["context"] >= 32768 else "")
    if r["method"] == "kvmem_sparse_attn":
        frac = r["gbps"] / copy
        if r["batch"] >= 8:
            note = "target >=50% copy: " + ("MET" if frac >= 0.5 else "MISSED")
        if t:
            note += f" {t['us_per_layer'] / r['us_per_layer']:.1f}x faster than torch dense"
    if r["method"] == "kvmem_search_sparse" and t:
        sp = t["us_per_layer"] / r["us_per_layer"]
        note = f"{sp:.1f}x faster than torch dense"
        if r["context"] == 131072 and r["batch"] in (1, 8) and r["budget"] == 2048:
            note += " (target >=10x: " + ("MET" if sp >= 10 else "MISSED") + ")"
    if r["method"] == "kvmem_search":
        note = f"CPU agreement {r.get('cpu_agreement', float('nan')):.3f}"
        if r["context"] == 131072 and r["batch"] == 1:
            note += " (target <=20us: " + ("MET" if r["us_per_layer"] <= 20 else "MISSED") + ")"
    if r["method"] == "kvmem_e2e_attend":
        ss = next((x for x in rows if x["method"] == "kvmem_search_sparse" and key(x) == key(r)), None)
        if ss:
            allowed = ss["us_per_layer"] + 30
            note = f"search+sparse {ss['us_per_layer']:.1f} + 30 = {allowed:.1f}"
            if r["context"] == 131072 and r["batch"] == 1:
                note += " (target: " + ("MET" if r["us_per_layer"] <= allowed else "MISSED") + ")"
    # Rows without a byte count (the e2e round trip) have no floor or bandwidth.
    moved = r.get("bytes") is not None and r.get("gbps") is not None
    floor = f"{r.get('floor_us', r['bytes'] / copy / 1e3):8.2f}" if moved else f"{'-':>8}"
    bw = f"{r['gbps']:6.0f} {100 * r['gbps'] / copy:5.0f}%" if moved else f"{'-':>6} {'-':>6}"
    err = f"{r['max_rel_err']:8.1e}" if r.get("max_rel_err") is not None else f"{'-':>8}"
    print(f"{r['method']:22} {r['context']:6d} {r['batch']:3d} {r['budget']:6d} {r['us_per_layer']:9.2f} "
          f"{floor} {bw} {err}  {note}")
