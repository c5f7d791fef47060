#!/usr/bin/env bash
# One device call (session 11, third call): the host rescoring changes against the kvmemd before
# them, interleaved in the same call. $G/b/bin-old holds that older kvmemd (staged by hand next
# to the bundle's kvmem-bench-e2e, which starts the kvmemd beside it). Per round: the fidelity
# profile's e2e Attend at 32K and 128K (new, old), then the default profile's at 128K (new, old).
# Parity first (the attention after the revert of KVMEM_ATTN_MERGE=early).
#   bash $G/run.sh
. "$(dirname "$0")/run_common.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
echo "== parity ($(el)s)"
parity kernels_cuda_parity_test "KVMEM_SOURCE_DIR=$PWD backends_test"
mkdir -p /tmp/ab
old=$G/b/bin-old
cp $G/b/bin/kvmem-bench-e2e $old/
e2e() {  # NAME BINDIR ARGS...
  local name=$1 dir=$2; shift 2
  LD_LIBRARY_PATH=$PWD/$G/b/lib:${LD_LIBRARY_PATH:-} UCX_MODULE_DIR=$PWD/$G/b/lib/ucx timeout 150 \
    $dir/kvmem-bench-e2e --json /tmp/ab/$name.json "$@" > /tmp/ab/$name.log 2>&1
  echo "[$name] rc=$? ($(el)s)"; grep -E "kvmem_e2e_attend " /tmp/ab/$name.log | cut -c1-420
}
for round in $(seq 1 ${ROUNDS:-2}); do
  for v in new old; do
    dir=$G/b/bin; [[ $v == old ]] && dir=$old
    e2e fid_r${round}_$v $dir --config "$PWD/deploy/kvmemd-fidelity.json" --contexts 32768,131072 --iters 20
  done
  for v in new old; do
    dir=$G/b/bin; [[ $v == old ]] && dir=$old
    e2e def_r${round}_$v $dir --contexts 131072 --iters 300
  done
done
(cd "$OUT" && tar -czf logs.tgz host.txt parity.log -C /tmp ab && rm -f host.txt parity.log)
echo "== done ($(el)s)"
