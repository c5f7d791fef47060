#!/usr/bin/env python3
"""Merges one device call's kvmem-bench-gpu JSON (torch rows merged in) and kvmem-bench-e2e
JSONs into the issue-4 results file:

  merge_results.py --bench bench.json --e2e e2e.json [--e2e e2e_host.json] --out h200-gpu.json

e2e rows keep their extra fields (daemon_phase_us, daemon_request_us, tokens_attended_per_head);
rows measured in both e2e files (the dense rows) are kept from the first."""
import argparse
import json

ap = argparse.ArgumentParser()
ap.add_argument("--bench", required=True)
ap.add_argument("--e2e", action="append", default=[])
ap.add_argument("--out", required=True)
ap.add_argument("--note", default="")
a = ap.parse_args()
b = json.load(open(a.bench))
out = {k: v for k, v in b.items() if k != "results"}
out["note"] = a.note
rows = list(b["results"])
seen = set()
for path in a.e2e:
    e = json.load(open(path))
    out.setdefault("e2e_backend", e.get("backend"))
    out.setdefault("e2e_ping_rtt_p50_us", e.get("ping_rtt_p50_us"))
    for r in e["results"]:
        key = (r["context"], r["batch"], r["budget"], r["method"])
        if key in seen:
            continue
        seen.add(key)
        r = dict(r)
        r.setdefault("bytes", None)
        r.setdefault("max_rel_err", None)
        rows.append(r)
out["results"] = rows
json.dump(out, open(a.out, "w"), indent=2)
open(a.out, "a").write("\n")
print(f"{a.out}: {len(rows)} rows")
