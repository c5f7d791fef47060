#!/usr/bin/env bash
# Issue 2 on the GPU host, transport5: the append copy with one store fence per batch and thread
# (default) against a fence per piece (KVMEM_APPEND_FENCE=piece, the copy before transport5),
# same binaries, interleaved one round each per iteration: shm for both, then tcp for the default
# in a run of its own (while at least 25 s are left).
# Also kvmem-bench-memcopy (the copy on one thread, 1 MiB into a rotating 128 MiB region).
# $OUT/transport-t5.json is re-merged after every iteration, so a cut-short run still returns
# what it measured; the table comes last. Run from the repository root:
#   bash .gpu-transport5/run.sh          (~70-110 s on the 16-core host; every run cut to end by 140 s)
B=${B:-.gpu-transport5}
export LD_LIBRARY_PATH=$PWD/$B/lib UCX_MODULE_DIR=$PWD/$B/lib/ucx PATH=$PWD/$B/bin:$PATH
OUT=${OUT:-/tmp/t5out}; mkdir -p "$OUT"
M="GPU host of the device tool (16 cores; CPU backend, no GPU used)"
C=$(cat $B/COMMIT)
R=/tmp/r5; rm -rf $R; mkdir -p $R
{ echo "== host"; nproc; grep -m1 "model name" /proc/cpuinfo; cat /sys/kernel/mm/transparent_hugepage/enabled; uname -r; } > $R/host.txt 2>&1
cat $R/host.txt
start=$SECONDS
timeout 15 $B/bin/kvmem-bench-memcopy --reps 512 --trials 3 > $OUT/memcopy.txt 2>&1; echo "memcopy rc=$? $(date +%T)"
N=${ROUNDS:-5}
# Every run's timeout is cut to what is left of 140 s, so the whole script ends by ~145 s.
left() { local l=$((140 - (SECONDS - start))); (( l > 40 )) && l=40; echo $l; }
# A run cut short leaves its children (ucx_perftest runs under its own timeout, in its own
# process group): end whatever still runs one of this bundle's binaries, by PID.
reap() {
  local p e
  for p in /proc/[0-9]*; do
    e=$(readlink "$p/exe" 2>/dev/null) || continue
    case "$e" in "$PWD/$B/bin/"*) kill "${p#/proc/}" 2>/dev/null ;; esac
  done
}
for i in $(seq 1 $N); do
  if (( $(left) < 15 )); then echo "stopping before iteration $i (time)"; break; fi
  KVMEM_APPEND_FENCE=piece timeout $(left) $B/bin/kvmem-bench-transport --rounds 1 --transports shm --machine "$M" --commit "$C fence per piece" --json $R/piece_$i.json > $R/piece_$i.log 2>&1; echo "piece $i rc=$? $(date +%T)"; reap
  if (( $(left) >= 8 )); then
    timeout $(left) $B/bin/kvmem-bench-transport --rounds 1 --transports shm --machine "$M" --commit "$C" --json $R/after_$i.json > $R/after_$i.log 2>&1; echo "after $i rc=$? $(date +%T)"; reap
  fi
  if (( $(left) >= 25 )); then  # tcp last: the first thing to go when time runs short
    timeout $(left) $B/bin/kvmem-bench-transport --rounds 1 --transports tcp --machine "$M" --commit "$C" --json $R/tcp_$i.json > $R/tcp_$i.log 2>&1; echo "tcp $i rc=$? $(date +%T)"; reap
  fi
  grep -hv "mpool.c" $R/*.log > $OUT/logs.txt 2>/dev/null
  python3 $B/h200_merge.py $R $N $OUT/transport-t5.json piece,after,tcp piece,after "${ABOUT:-kvmem-bench-transport --rounds 1 per variant, interleaved per iteration: piece = KVMEM_APPEND_FENCE=piece over shm, after = default over shm, tcp = default over tcp; each entry the verbatim JSON}" > $OUT/table.txt 2>&1
done
echo "== kvmem-bench-memcopy on this host"; cat $OUT/memcopy.txt
echo "== kvmem-bench-transport, medians of the rounds (ratio = append / ucp_am_bw, same round)"; cat $OUT/table.txt
