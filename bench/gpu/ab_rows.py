"""Rows of an interleaved A/B device call (gpu6_run.sh, gpu12_run.sh): OUT/ab_r{round}_{i}.json
for setting i, grouped by (method, context, batch, budget) and setting, one row per round.
scripts/stage_gpu_search.sh stages it next to run.sh."""
import glob
import json


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
