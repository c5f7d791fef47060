#!/bin/bash
# Idle RSS of one kvmemd across back-to-back kvmem-stress loads (docs/reliability.md).
# usage: bench/rss_back_to_back.sh TAG BIN_DIR RUNS SECONDS [VAR=VALUE...] -- [kvmemd args...]
# Starts kvmemd (BIN_DIR/kvmemd, environment VAR=VALUE...) idle, runs kvmem-stress RUNS times
# for SECONDS each against it, and after each run (1 s after the idle trim that follows it)
# records VmRSS, smaps_rollup, a copy of /proc/PID/smaps and the store memory gauges under
# /tmp/h5/TAG; one line per reading in /tmp/h5/TAG/summary. Split the smaps copies by mapping
# with bench/smaps_by_mapping.py.
tag=$1; bin=$2; runs=$3; dur=$4; shift 4
envs=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
out=/tmp/h5/$tag; rm -rf $out; mkdir -p $out; dd=$out/data
port=$((20000 + RANDOM % 20000)); aport=$((port+1))
env "${envs[@]}" nice -n 10 $bin/kvmemd --listen 127.0.0.1:$port --data-dir $dd --log-level warn --admin 127.0.0.1:$aport "$@" > $out/daemon.log 2>&1 &
pid=$!; echo $pid > $out/pid
for i in $(seq 50); do curl -s 127.0.0.1:$aport/readyz >/dev/null && break; sleep 0.5; done
sleep 2
snap() { # name
  grep -E "^(Rss|Anonymous)" /proc/$pid/smaps_rollup | tr -s ' ' | tr '\n' ' ' > $out/$1.rollup
  curl -s 127.0.0.1:$aport/metrics | grep -E "^kvmem_store_memory_bytes|^kvmem_idle_trims_total" > $out/$1.metrics
  cp /proc/$pid/smaps $out/$1.smaps
  rss=$(grep VmRSS /proc/$pid/status | awk '{print $2}')
  bc=$(grep block_cache $out/$1.metrics | awk '{print $2}')
  echo "$tag $1 rss_kib=$rss block_cache=$bc" | tee -a $out/summary
}
snap start
for r in $(seq $runs); do
  nice -n 10 $bin/kvmem-stress --addr 127.0.0.1:$port --pid $pid --admin-port $aport --clients 64 --sessions 128 --duration $dur --warmup 5 --settle 30 --disconnect-rate 0.02 --mix append=50,attend=25,retrieve=15,drop=5,info=5 --json $out/run$r.json > $out/run$r.log 2>&1
  python3 -c "import json;j=json.load(open('$out/run$r.json'));print('$tag run$r ops',j['ops'],'base',j['rss_baseline_bytes']>>10,'end',j['rss_end_bytes']>>10,'trim',j['rss_readings_after_idle_trim'],'p50',j['p50_us'],'unexp',j.get('unexpected_errors'))" | tee -a $out/summary
  snap after$r
done
kill $pid; wait $pid; echo "$tag exit $?" | tee -a $out/summary
