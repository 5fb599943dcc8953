#!/usr/bin/env bash
# Measure diskless side by side with tgt (the reference target) on loopback with fio's libiscsi
# engine, and print one comparison table (also written to target/bench/results.md).
#
#   scripts/bench.sh [--quick] [--rounds N] [--runtime SECS] [--size SIZE] [--bin PATH]
#                    [--fio PATH] [--jobs "randread-4k-qd1 seqread-1m-qd16"] [--keep]
#                    [--cache small|readahead]
#
# --quick = 1 round of 5 s per job (smoke test). Defaults: 3 rounds, 20 s per job, 1 GiB image.
# --cache small (default) warms the image's page cache in 4 KiB folios, as diskless's own reads
# of a writable image fill it; --cache readahead as `cat` does (folios up to 2 MiB, which make
# every 4 KiB buffered write cost both targets tens of µs more kernel CPU).
# The overlay-* jobs run against a third server, diskless with a persistent overlay over a copy
# of the image (`serve --overlay persistent`), restarted on a fresh overlay every round:
# overlay-firsttouch writes each 4 KiB chunk once (fio's random map, one pass over the LUN,
# capped at the runtime: every write is a chunk's first), overlay-rewrite then writes the same
# overlay again; report.py sets both beside randwrite-4k-qd32 on the plain image and tgt.
# Both targets serve the same image file; jobs alternate between the targets (and the order
# flips every round) so drift on this shared machine hits both. Needs root the first time (it
# builds fio with --enable-libiscsi from Debian's fio source package into target/fio-build/).
set -euo pipefail

DL_NAME=bench.sh
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$(dl_repo_root)

ROUNDS=3
RUNTIME=20
RAMP=2
SIZE=1G
BIN=""
FIO=""
ONLY_JOBS=""
KEEP=0
CACHE=small
INITIATOR=iqn.2026-11.test:bench-fio
OUT_DIR=$ROOT/target/bench

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

while (($#)); do
	case "$1" in
	--quick) ROUNDS=1; RUNTIME=5; RAMP=1 ;;
	--rounds) ROUNDS=${2:?}; shift ;;
	--runtime) RUNTIME=${2:?}; shift ;;
	--size) SIZE=${2:?}; shift ;;
	--bin) BIN=${2:?}; shift ;;
	--fio) FIO=${2:?}; shift ;;
	--jobs) ONLY_JOBS=${2:?}; shift ;;
	--keep) KEEP=1 ;;
	--cache) CACHE=${2:?}; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
	shift
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || dl_die "--rounds must be a positive integer"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || dl_die "--runtime must be a positive integer (seconds)"
[[ $CACHE == small || $CACHE == readahead ]] || dl_die "--cache must be small or readahead"

dl_require tgtd tgtadm python3 truncate mktemp timeout

# Job table: name, fio options. Latency columns report reads for read and mixed jobs, writes
# for write jobs (see scripts/bench/report.py).
JOBS=(
	"randread-4k-qd1|--rw=randread --bs=4k --iodepth=1"
	"randread-4k-qd32|--rw=randread --bs=4k --iodepth=32"
	"randwrite-4k-qd32|--rw=randwrite --bs=4k --iodepth=32"
	"seqread-1m-qd16|--rw=read --bs=1m --iodepth=16"
	"seqwrite-1m-qd16|--rw=write --bs=1m --iodepth=16"
	"randrw70-4k-qd32|--rw=randrw --rwmixread=70 --bs=4k --iodepth=32"
	"overlay-firsttouch-4k-qd32|--rw=randwrite --bs=4k --iodepth=32"
	"overlay-rewrite-4k-qd32|--rw=randwrite --bs=4k --iodepth=32"
)

# --- tools -------------------------------------------------------------------------------------
if [[ -z $FIO ]]; then
	FIO=$("$ROOT/scripts/bench/build-fio.sh" "$ROOT/target/fio-build") || dl_die "could not build fio with libiscsi"
fi
"$FIO" --enghelp 2>/dev/null | grep -qw libiscsi || dl_die "$FIO has no libiscsi engine"
if [[ -z $BIN ]]; then
	dl_log "building diskless (release)"
	(cd "$ROOT" && cargo build --release --quiet) || dl_die "cargo build --release failed"
	BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/diskless
fi
[[ -x $BIN ]] || dl_die "diskless binary not found at $BIN"

mkdir -p "$OUT_DIR"
W=$(mktemp -d "$OUT_DIR/run.XXXXXX")
IMG=$OUT_DIR/bench.img # kept between runs: filling it takes a while
DL_PID=""
OV_PID=""
TGT_PID=""
TGT_CTL=""
IPERF_PID=""
cleanup() {
	if [[ -n $IPERF_PID ]]; then kill -TERM "$IPERF_PID" 2>/dev/null || true; fi
	if [[ -n $TGT_CTL ]] && [[ -n $TGT_PID ]] && kill -0 "$TGT_PID" 2>/dev/null; then
		# tgtd ignores SIGTERM while it has targets; ask it to shut down instead.
		tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op delete --force --tid 1 >/dev/null 2>&1 || true
		tgtadm -C "$TGT_CTL" --mode system --op delete >/dev/null 2>&1 || true
	fi
	local p
	for p in $DL_PID $OV_PID $TGT_PID; do
		kill -0 "$p" 2>/dev/null || continue
		kill -TERM "$p" 2>/dev/null || true
		for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$p" 2>/dev/null || true
	done
	if [[ -n $TGT_CTL ]]; then rm -f "/var/run/tgtd/socket.$TGT_CTL" "/var/run/tgtd/socket.$TGT_CTL.lock"; fi
	if ((KEEP)); then dl_log "kept raw results in $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

# --- image: non-zero data so reads move real bytes ---------------------------------------------
want=$(numfmt --from=iec "$SIZE")
if [[ ! -f $IMG ]] || [[ $(stat -c %s "$IMG") -ne $want ]]; then
	dl_log "creating $SIZE image $IMG"
	python3 - "$IMG" "$want" <<'PY'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
block = os.urandom(1 << 20)
with open(path + ".tmp", "wb") as f:
    left = size
    while left:
        n = min(left, len(block))
        f.write(block[:n])
        left -= n
        block = block[1:] + block[:1]  # avoid identical 1 MiB blocks
os.replace(path + ".tmp", path)
PY
fi
# Warm the page cache so the first job does not measure the disk, and fill it the way diskless's
# own reads of a writable image do (POSIX_FADV_RANDOM: no readahead, 4 KiB folios; see
# src/storage/file.rs small_folios). A `cat` instead would fill it through readahead with folios
# of up to 2 MiB, into which every 4 KiB write costs both targets 60+ µs of kernel CPU
# (ext4_block_write_begin walks the whole folio); docs/performance.md has both figures.
# --cache readahead keeps that state instead.
warm_cache() { # path small|readahead
	python3 - "$1" "$2" <<'PY'
import os, sys
path, how = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDONLY)
os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop what is cached (clean pages)
if how == "small":
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
off = 0
while True:
    n = len(os.pread(fd, 1 << 20, off))
    if not n:
        break
    off += n
os.close(fd)
PY
}
warm_cache "$IMG" "$CACHE"

# --- servers -------------------------------------------------------------------------------------
# start_diskless NAME ARGS...: starts `diskless serve ARGS`, sets STARTED_PID and STARTED_PORT.
start_diskless() {
	local name=$1 i
	shift
	: >"$W/$name.out"
	"$BIN" --log warn serve "$@" --listen 127.0.0.1:0 >"$W/$name.out" 2>"$W/$name.err" &
	STARTED_PID=$!
	STARTED_PORT=""
	for ((i = 0; i < 300; i++)); do
		STARTED_PORT=$(sed -n 's/^diskless: listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$W/$name.out" | head -n1 || true)
		[[ -n $STARTED_PORT ]] && return 0
		kill -0 "$STARTED_PID" 2>/dev/null || { tail -n 20 "$W/$name.err" >&2; dl_die "diskless ($name) exited during startup"; }
		sleep 0.1
	done
	dl_die "diskless ($name) did not print 'diskless: listening on'"
}
start_diskless diskless --image "$IMG"
DL_PID=$STARTED_PID DL_PORT=$STARTED_PORT
DL_IQN="iqn.2026-11.org.diskless:$(basename "${IMG%.*}")"
DL_URL="iscsi://127.0.0.1:$DL_PORT/$DL_IQN/0"

TGT_PORT=$(dl_free_port)
dl_start_tgtd "$TGT_PORT" "$W/tgt"
TGT_IQN=iqn.2026-11.test:bench-tgt
A=(tgtadm -C "$TGT_CTL" --lld iscsi)
"${A[@]}" --op new --mode target --tid 1 -T "$TGT_IQN"
# Default backing store (rdwr: pread/pwrite from a thread pool). tgt's LUN 0 is its controller.
"${A[@]}" --op new --mode logicalunit --tid 1 --lun 1 -b "$IMG"
"${A[@]}" --op bind --mode target --tid 1 -I ALL
TGT_URL="iscsi://127.0.0.1:$TGT_PORT/$TGT_IQN/1"
dl_log "diskless pid $DL_PID on :$DL_PORT, tgtd pid $TGT_PID on :$TGT_PORT, raw results in $W"

# --- loopback ceiling ----------------------------------------------------------------------------
# One iperf3 stream for 5 s, before and after the fio runs; the higher figure is the ceiling.
LOOP_BPS=0
loopback() { # tag
	command -v iperf3 >/dev/null 2>&1 || { dl_log "iperf3 not installed (package iperf3): no loopback ceiling"; return 0; }
	local port bps
	port=$(dl_free_port)
	# Not -1 (one test): the readiness probe below is a connection of its own.
	iperf3 -s -p "$port" >/dev/null 2>&1 &
	IPERF_PID=$!
	dl_wait_port "$port" 10 || dl_die "iperf3 server did not start"
	sleep 0.5
	timeout 30 iperf3 -c 127.0.0.1 -p "$port" -t 5 -J >"$W/iperf3.$1.json" || dl_die "iperf3 client failed"
	bps=$(python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"]))' "$W/iperf3.$1.json")
	kill -TERM "$IPERF_PID" 2>/dev/null || true
	wait "$IPERF_PID" 2>/dev/null || true
	IPERF_PID=""
	dl_log "loopback TCP ($1): $((bps / 8 / 1048576)) MiB/s"
	((bps > LOOP_BPS)) && LOOP_BPS=$bps
	return 0
}
# The latency floor: a 48-byte TCP ping-pong between two threads (examples/pingpong.rs, std
# only, so rustc builds it alone in a second), beside iperf3; the lower p50 is kept.
PING_US=0
PINGPONG=$OUT_DIR/pingpong
if [[ ! -x $PINGPONG ]] || [[ $ROOT/examples/pingpong.rs -nt $PINGPONG ]]; then
	rustc -O --edition 2021 -o "$PINGPONG" "$ROOT/examples/pingpong.rs" || dl_die "rustc examples/pingpong.rs failed"
fi
pingpong() { # tag [file to append the p50 to]
	local line p50
	line=$("$PINGPONG" 20000 2000) || dl_die "pingpong failed"
	p50=$(sed -n 's/.*p50_us=\([0-9.]*\).*/\1/p' <<<"$line")
	dl_log "48-byte TCP ping-pong ($1): $line"
	if [[ -n ${2:-} ]]; then echo "$p50" >>"$2"; fi
	if [[ $PING_US == 0 ]] || python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) < float(sys.argv[2]) else 1)' "$p50" "$PING_US"; then
		PING_US=$p50
	fi
}
loopback before
pingpong before

# The overlay server: a persistent overlay over a copy of the image, fresh every round.
OV_GOLDEN=$W/golden.img
OV_IQN=iqn.2026-11.org.diskless:golden
OV_URL=""
fresh_overlay() {
	if [[ -n $OV_PID ]]; then
		kill -TERM "$OV_PID" 2>/dev/null || true
		for _ in $(seq 1 100); do kill -0 "$OV_PID" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$OV_PID" 2>/dev/null || true
	fi
	[[ -f $OV_GOLDEN ]] || { cp --sparse=never "$IMG" "$OV_GOLDEN"; cat "$OV_GOLDEN" >/dev/null; }
	rm -rf "$W/state"
	start_diskless overlay --image "$OV_GOLDEN" --target "$OV_IQN" --overlay persistent --state-dir "$W/state"
	OV_PID=$STARTED_PID
	OV_URL="iscsi://127.0.0.1:$STARTED_PORT/$OV_IQN/0"
}

# --- fio runs --------------------------------------------------------------------------------------
# CPU ticks (user+system, all threads) a server used, from /proc/PID/stat.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# The whole machine's busy ticks (user, nice, system, irq, softirq, steal; not idle or iowait):
# the server, fio and the kernel's own work for them (writeback, journal), which the server's
# ticks do not show. Meaningful only when nothing else runs.
machine_ticks() { awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }

run_one() { # round target job-name fio-options
	local round=$1 target=$2 name=$3 opts=$4 url pid
	case $target in
	diskless) url=$DL_URL pid=$DL_PID ;;
	tgt) url=$TGT_URL pid=$TGT_PID ;;
	overlay) url=$OV_URL pid=$OV_PID ;;
	esac
	# A first touch is one pass over the LUN (each chunk written once), capped at the runtime.
	local timing="--time_based --ramp_time=$RAMP"
	[[ $name == overlay-firsttouch* ]] && timing="--ramp_time=0"
	kill -0 "$pid" 2>/dev/null || dl_die "$target (pid $pid) is gone"
	# Overlay jobs are filed as diskless runs (report.py sets them beside the plain image).
	local base="$W/$name.${target/overlay/diskless}.r$round" c0 c1 m0 m1
	# fio's filename syntax needs the colons escaped.
	local fname=${url//:/\\:}
	sync
	# QD1 latency is set beside the loopback ping-pong taken in the same minute: right before
	# and right after this run (the ping-pong itself moves 18-83 µs between minutes on this
	# kind of shared machine, so a floor from another minute says little).
	if [[ $name == randread-4k-qd1 ]]; then pingpong "before $name $target r$round" "$base.ping"; fi
	c0=$(cpu_ticks "$pid")
	m0=$(machine_ticks)
	# shellcheck disable=SC2086
	if ! timeout $((RUNTIME + RAMP + 60)) "$FIO" --name="$name" --ioengine=libiscsi \
		--initiator="$INITIATOR" --filename="$fname" $opts $timing \
		--runtime="$RUNTIME" --output-format=json --output="$base.json" \
		>"$base.log" 2>&1; then
		tail -n 20 "$base.log" >&2
		dl_die "fio $name against $target failed"
	fi
	c1=$(cpu_ticks "$pid")
	sync
	m1=$(machine_ticks)
	echo "$((c1 - c0))" >"$base.ticks"
	echo "$((m1 - m0))" >"$base.mticks"
	if [[ $name == randread-4k-qd1 ]]; then pingpong "after $name $target r$round" "$base.ping"; fi
	dl_log "round $round $name $target: $(python3 "$ROOT/scripts/bench/report.py" --one "$base.json")"
}

for ((r = 1; r <= ROUNDS; r++)); do
	for j in "${JOBS[@]}"; do
		name=${j%%|*}
		opts=${j#*|}
		if [[ -n $ONLY_JOBS ]] && ! grep -qw -- "$name" <<<"$ONLY_JOBS"; then continue; fi
		if [[ $name == overlay-* ]]; then
			[[ $name == overlay-firsttouch* ]] && fresh_overlay
			[[ -n $OV_URL ]] || fresh_overlay
			run_one "$r" overlay "$name" "$opts"
			continue
		fi
		# Alternate the order every round so neither target always runs first.
		if ((r % 2)); then order="diskless tgt"; else order="tgt diskless"; fi
		for t in $order; do run_one "$r" "$t" "$name" "$opts"; done
	done
done

loopback after
pingpong after

python3 "$ROOT/scripts/bench/report.py" --dir "$W" --loopback-bps "$LOOP_BPS" --pingpong-us "$PING_US" \
	--clk-tck "$(getconf CLK_TCK)" --rounds "$ROUNDS" --runtime "$RUNTIME" --ramp "$RAMP" \
	--jobs "$(printf '%s\n' "${JOBS[@]}" | cut -d'|' -f1 | tr '\n' ' ')" >"$OUT_DIR/results.md"
cat "$OUT_DIR/results.md"
dl_log "table written to $OUT_DIR/results.md"
