#!/usr/bin/env bash
# firsttouch-ab.sh SECS ROUNDS BIN... : old vs new binaries side by side, alternating. Per binary:
# a fresh persistent overlay, one first-touch pass of fio 4 KiB randwrite QD32 (capped at SECS),
# a rewrite of it for SECS, a 4 KiB random read of it for SECS (the read side of what the pass
# wrote), then the plain image for SECS. Prints IOPS and server CPU us/IO.
# Needs scripts/bench.sh to have built fio and target/bench/bench.img once. Scratch: /var/tmp/ftab.
set -euo pipefail
SECS=$1; ROUNDS=$2; shift 2
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
FIO=${FIO:-$ROOT/target/fio-build/fio-3.33/fio}
D=/var/tmp/ftab
mkdir -p $D
IMG=$ROOT/target/bench/bench.img
[[ -f $D/golden.img ]] || cp --sparse=never "$IMG" $D/golden.img
[[ -f $D/plain.img ]] || cp --sparse=never "$IMG" $D/plain.img
python3 - $D/plain.img <<'PY'
import os,sys
fd=os.open(sys.argv[1],os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED); os.posix_fadvise(fd,0,0,os.POSIX_FADV_RANDOM)
off=0
while True:
    n=len(os.pread(fd,1<<20,off))
    if not n: break
    off+=n
PY
cat $D/golden.img > /dev/null
PID=""
cleanup() { [[ -n $PID ]] && kill -TERM $PID 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT
start() { # bin args...
  local bin=$1; shift
  "$bin" --log warn serve "$@" --listen 127.0.0.1:0 >$D/srv.out 2>$D/srv.err &
  PID=$!
  for i in $(seq 1 300); do
    PORT=$(sed -n 's/^diskless: listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' $D/srv.out | head -n1)
    [[ -n $PORT ]] && return 0; sleep 0.1
  done; echo "no start"; cat $D/srv.err; exit 1
}
stop() { kill -TERM $PID; for i in $(seq 1 100); do kill -0 $PID 2>/dev/null || break; sleep 0.1; done; kill -KILL $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; PID=""; }
ticks() { awk '{print $14 + $15}' /proc/$PID/stat; }
job() { # tag iqn timing [rw]
  local tag=$1 iqn=$2 timing=$3 rw=${4:-randwrite} c0 c1
  c0=$(ticks)
  $FIO --name=$tag --ioengine=libiscsi --initiator=iqn.2026-11.test:ab --filename="iscsi\://127.0.0.1\:$PORT/${iqn//:/\\:}/0" --rw=$rw --bs=4k --iodepth=32 $timing --runtime=$SECS --output-format=json --output=$D/$tag.json >/dev/null 2>&1
  c1=$(ticks)
  python3 - $D/$tag.json $((c1-c0)) "$TAG $tag" $rw <<'PY'
import json,sys
j=json.load(open(sys.argv[1]))['jobs'][0]['read' if sys.argv[4]=='randread' else 'write']; t=int(sys.argv[2])
iops=j['iops']; n=j['total_ios']
print(f"{sys.argv[3]:40s} {iops:9.0f} IOPS  {t/100/max(n,1)*1e6:7.1f} us/IO  ios={n}")
PY
}
for r in $(seq 1 $ROUNDS); do
  for bin in "$@"; do
    TAG="r$r $(basename $bin)"
    rm -rf $D/state
    start $bin --image $D/golden.img --target iqn.2026-11.org.diskless:golden --overlay persistent --state-dir $D/state
    job firsttouch iqn.2026-11.org.diskless:golden "--ramp_time=0"
    job rewrite iqn.2026-11.org.diskless:golden "--time_based"
    job readback iqn.2026-11.org.diskless:golden "--time_based" randread
    stop
    start $bin --image $D/plain.img --target iqn.2026-11.org.diskless:plain
    job plain iqn.2026-11.org.diskless:plain "--time_based --ramp_time=1"
    stop
  done
done
rm -rf $D/state
