#!/usr/bin/env python3
"""Summarises libFuzzer runs (scripts/fuzz-run.sh logs) into bench/results/fuzz.json.

  scripts/fuzz-summary.py WORK_DIR OUT.json NAME=LOG [NAME=LOG...] [--note TEXT]

Per target, from libFuzzer's own output: executions (stat::number_of_executed_units), seconds
("Done N runs in S second(s)"), exec/s, peak RSS, crashes (artifacts written under
WORK_DIR/artifacts/NAME plus sanitizer / deadly-signal reports in the log), and the corpus
size at the end (WORK_DIR/corpus/NAME: what this run kept, seeds not counted again).
"""
import json
import os
import re
import sys


def summarise(name, log, work):
    text = open(log, errors="replace").read()
    out = {"log": os.path.basename(log)}
    m = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    done = re.findall(r"Done (\d+) runs in (\d+) second", text)
    if m:
        out["executions"] = int(m[-1])
    elif done:
        out["executions"] = int(done[-1][0])
    else:  # killed before the final stats: the last progress line
        lines = re.findall(r"^#(\d+)\s", text, re.M)
        out["executions"] = int(lines[-1]) if lines else 0
        out["note"] = "no final stats (run interrupted); executions from the last progress line"
    out["seconds"] = int(done[-1][1]) if done else None
    rate = re.findall(r"stat::average_exec_per_sec:\s*(\d+)", text)
    out["exec_per_s"] = int(rate[-1]) if rate else None
    rss = re.findall(r"stat::peak_rss_mb:\s*(\d+)", text)
    out["peak_rss_mb"] = int(rss[-1]) if rss else None
    art = os.path.join(work, "artifacts", name)
    artifacts = sorted(os.listdir(art)) if os.path.isdir(art) else []
    reports = len(re.findall(r"==\d+==ERROR|deadly signal|runtime error:|ERROR: libFuzzer", text))
    out["crashes"] = len(artifacts)
    out["crash_artifacts"] = artifacts
    out["sanitizer_reports_in_log"] = reports
    corpus = os.path.join(work, "corpus", name)
    out["corpus_files_added"] = len(os.listdir(corpus)) if os.path.isdir(corpus) else 0
    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)/", text)
    if cov:
        out["final_cov"], out["final_features"], out["corpus_size"] = map(int, cov[-1])
    return out


def main(argv):
    note = None
    if "--note" in argv:
        i = argv.index("--note")
        note = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    work, dest, pairs = argv[1], argv[2], argv[3:]
    targets = {}
    for p in pairs:
        name, log = p.split("=", 1)
        targets["fuzz_" + name] = summarise(name, log, work)
    total = sum(t["executions"] for t in targets.values())
    crashes = sum(t["crashes"] + t["sanitizer_reports_in_log"] for t in targets.values())
    doc = {"targets": targets, "total_executions": total, "open_crashes": crashes}
    if note:
        doc["note"] = note
    with open(dest, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
    print(json.dumps({"total_executions": total, "open_crashes": crashes}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
