"""Rows of an interleaved A/B device call (gpu6_run.sh, gpu12_run.sh, gpu13_run.sh): OUT/ab_r{round}_{i}.json
for setting i, grouped by (method, context, batch, budget) and setting, one row per round.
scripts/stage_gpu_search.sh stages it next to run.sh."""
import glob
import json
import os


def collect(out, settings, methods):
    data = {}
    for i, a in enumerate(settings):
        for p in sorted(glob.glob(f"{out}/ab_r*_{i}.json")):
            for r in json.load(open(p))["results"]:
                if r["method"] in methods:
                    key = (r["method"], r["context"], r["batch"], r["budget"])
                    data.setdefault(key, {}).setdefault(a, []).append(r)
    return data


def print_table(data, settings, cell, width):
    """One line per (method, context, batch, budget); cell(rows) formats a setting's rounds."""
    print(f"{'method':20} {'ctx':>6} {'B':>2} {'bud':>4} " +
          " ".join(f"{a[-width:]:>{width}}" for a in settings))
    for k in sorted(data):
        cells = [(cell(data[k][a]) if data[k].get(a) else "").rjust(width) for a in settings]
        print(f"{k[0]:20} {k[1]:6d} {k[2]:2d} {k[3]:4d} " + " ".join(cells))


def print_sparse_report(out, settings, data):
    """The sparse rows' table, then per (batch, budget) and setting the last round's warm trace
    (medians; with its share of the runs' mean copy bandwidth), then the sweep of OUT/sweep.json
    when there is one."""
    print_table(data, settings, lambda rs: "/".join(f"{r['us_per_layer']:.2f}" for r in rs), 18)
    gbps = [json.load(open(p)).get("copy_gbps", 0) for p in glob.glob(f"{out}/ab_r*.json")]
    mean_gbps = sum(gbps) / len(gbps) if gbps else 0
    print("copy_gbps " + " ".join(f"{g:.0f}" for g in gbps))
    for k in sorted(data):
        if k[0] != "kvmem_sparse_attn":
            continue
        for a in settings:
            for r in data[k].get(a, [])[-1:]:
                share = r["bytes"] / r["us_per_layer"] / 1e3 / mean_gbps * 100 if mean_gbps else 0
                t = r.get("attn_trace_us", {})
                print(f"trace B{k[2]} {k[3]:4d} {a[-18:]:>18} share {share:.1f}% " +
                      " ".join(f"{p}:{v[1]:.2f}" for p, v in sorted(t.items())))
    p = f"{out}/sweep.json"
    if os.path.exists(p):
        for r in json.load(open(p))["results"]:
            if r["method"] == "kvmem_sparse_attn" and "sweep" in r:
                print(f"sweep B{r['batch']} {r['budget']} default {r['us_per_layer']:.2f} "
                      f"({r['blocks']} blocks, split {r['split_tokens']}): " +
                      " ".join(f"{s.get('split_tokens')}/{s.get('blocks', s.get('target_blocks'))}:{s['us']:.1f}"
                               for s in r["sweep"]))
