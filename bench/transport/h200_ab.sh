#!/usr/bin/env bash
# Issue 2 A/B on the GPU host: main dcc739e (before) vs transport4 (after: append landing on,
# and off), interleaved, one round each per iteration; $OUT/transport-ab.json is re-merged after
# every iteration so a cut-short run still returns what it measured.
B=.gpu-transport4
export LD_LIBRARY_PATH=$PWD/$B/lib UCX_MODULE_DIR=$PWD/$B/lib/ucx PATH=$PWD/$B/bin:$PATH
M="GPU host of the device tool (16 cores; CPU backend, no GPU used)"
C=$(cat $B/COMMIT)
R=/tmp/r; mkdir -p $R
{ echo "== host"; nproc; grep -m1 "model name" /proc/cpuinfo; cat /sys/kernel/mm/transparent_hugepage/enabled; uname -r; } > $R/host.txt 2>&1
cat $R/host.txt
N=${ROUNDS:-5}
for i in $(seq 1 $N); do
  timeout 90 $B/before/kvmem-bench-transport --rounds 1 --transports shm --machine "$M" --commit dcc739e --json $R/before_$i.json > $R/before_$i.log 2>&1; echo "before $i rc=$? $(date +%T)"
  timeout 150 $B/bin/kvmem-bench-transport --rounds 1 --machine "$M" --commit "$C" --json $R/after_$i.json > $R/after_$i.log 2>&1; echo "after $i rc=$? $(date +%T)"
  timeout 90 $B/bin/kvmem-bench-transport --rounds 1 --transports shm --machine "$M" --commit "$C" --daemon-arg --append-landing --daemon-arg off --json $R/off_$i.json > $R/off_$i.log 2>&1; echo "off $i rc=$? $(date +%T)"
  grep -hv "mpool.c" $R/*.log > $OUT/logs.txt 2>/dev/null
  python3 $B/h200_merge.py $R $N $OUT/transport-ab.json before,after,off after,off "kvmem-bench-transport --rounds 1 per variant, interleaved (before, after, off) per iteration; each entry the verbatim JSON" > $OUT/table.txt 2>&1
done
cat $OUT/table.txt
