#!/usr/bin/env bash
# Write paths side by side in one run, with qemu-img's libiscsi driver as the client (needs
# only qemu-utils + qemu-block-extra, no fio build): 4 KiB writes at QD32 spread over the
# whole LUN (qemu-img bench steps 48 MiB + 4 KiB between writes, modulo the LUN size, so
# consecutive writes never touch neighbouring chunks), against
#   - tgt and diskless serving the same plain image (randwrite, and a 4 KiB read run for the
#     CPU-per-read figure),
#   - diskless with a fresh persistent overlay over a copy of that image: first touch (every
#     write lands in a chunk the overlay never saw) then rewrite (the same chunks again),
#   - the overlay and the plain image again with a SYNCHRONIZE CACHE after every 32 writes
#     (qemu-img's --flush-interval; it cannot be below the queue depth).
#
#   scripts/bench/writes.sh [--rounds N] [--count WRITES] [--size SIZE] [--bin PATH]
#
# Defaults: 3 rounds, 100000 writes per job, 1 GiB image (target/bench/bench.img, shared with
# scripts/bench.sh). Prints one markdown table (also target/bench/writes.md): median IOPS of
# the rounds and server CPU µs per IO (user+system ticks of the whole server process).
set -euo pipefail
DL_NAME=writes.sh
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
ROOT=$(dl_repo_root)

ROUNDS=3
COUNT=100000
SIZE=1G
BIN=""
while (($#)); do
	case "$1" in
	--rounds) ROUNDS=${2:?}; shift ;;
	--count) COUNT=${2:?}; shift ;;
	--size) SIZE=${2:?}; shift ;;
	--bin) BIN=${2:?}; shift ;;
	-h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) exit 2 ;;
	esac
	shift
done
dl_require tgtd tgtadm qemu-img python3
dl_qemu_has_iscsi || dl_die "qemu-img has no iscsi driver (package qemu-block-extra)"
if [[ -z $BIN ]]; then
	(cd "$ROOT" && cargo build --release --quiet) || dl_die "cargo build --release failed"
	BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/diskless
fi
[[ -x $BIN ]] || dl_die "no diskless binary at $BIN"

OUT_DIR=$ROOT/target/bench
mkdir -p "$OUT_DIR"
W=$(mktemp -d "$OUT_DIR/writes.XXXXXX")
IMG=$OUT_DIR/bench.img
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
        block = block[1:] + block[:1]
os.replace(path + ".tmp", path)
PY
fi
cp --sparse=never "$IMG" "$W/golden.img"
cat "$IMG" "$W/golden.img" >/dev/null

PIDS=()
TGT_PID="" TGT_CTL=""
cleanup() {
	if [[ -n $TGT_CTL ]] && [[ -n $TGT_PID ]] && kill -0 "$TGT_PID" 2>/dev/null; then
		tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op delete --force --tid 1 >/dev/null 2>&1 || true
		tgtadm -C "$TGT_CTL" --mode system --op delete >/dev/null 2>&1 || true
	fi
	local p
	for p in "${PIDS[@]}" $TGT_PID; do
		kill -0 "$p" 2>/dev/null || continue
		kill -TERM "$p" 2>/dev/null || true
		for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$p" 2>/dev/null || true
	done
	if [[ -n $TGT_CTL ]]; then rm -f "/var/run/tgtd/socket.$TGT_CTL" "/var/run/tgtd/socket.$TGT_CTL.lock"; fi
	rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

# start_diskless NAME ARGS...: sets PORT and PID.
start_diskless() {
	local name=$1 i
	shift
	"$BIN" --log warn serve "$@" --listen 127.0.0.1:0 >"$W/$name.out" 2>"$W/$name.err" &
	PID=$!
	PIDS+=("$PID")
	PORT=""
	for ((i = 0; i < 300; i++)); do
		PORT=$(sed -n 's/^diskless: listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$W/$name.out" | head -n1 || true)
		[[ -n $PORT ]] && return 0
		kill -0 "$PID" 2>/dev/null || { tail -n 20 "$W/$name.err" >&2; dl_die "diskless ($name) exited"; }
		sleep 0.1
	done
	dl_die "diskless ($name) did not start"
}
stop_pid() {
	kill -TERM "$1" 2>/dev/null || true
	for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
	kill -KILL "$1" 2>/dev/null || true
}

IQN_PLAIN=iqn.2026-11.org.diskless:bench
IQN_GOLDEN=iqn.2026-11.org.diskless:golden
STEP=$((4096 * 12289)) # 48 MiB + 4 KiB: odd number of chunks, visits every chunk once per pass
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# bench NAME PID URL EXTRA...: one qemu-img bench run; appends "NAME iops cpu_us_per_io".
bench() {
	local name=$1 pid=$2 url=$3 c0 c1 secs
	shift 3
	c0=$(ticks "$pid")
	secs=$(timeout 600 qemu-img bench -t none -d 32 -s 4096 -S "$STEP" -c "$COUNT" "$@" \
		--image-opts "driver=iscsi,transport=tcp,${url},initiator-name=iqn.2026-11.test:writes" 2>&1 |
		sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p') || true
	[[ -n $secs ]] || dl_die "qemu-img bench $name failed (see qemu-img bench --help; is the target up?)"
	c1=$(ticks "$pid")
	python3 - "$name" "$COUNT" "$secs" "$((c1 - c0))" "$(getconf CLK_TCK)" >>"$W/results" <<'PY'
import sys
name, n, secs, ticks, tck = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
print(name, round(n / secs), round(ticks / tck * 1e6 / n, 1))
PY
	dl_log "$(tail -n1 "$W/results")"
}

# tgt on the plain image (shared by every round).
TGT_PORT=$(dl_free_port)
dl_start_tgtd "$TGT_PORT" "$W/tgt"
A=(tgtadm -C "$TGT_CTL" --lld iscsi)
"${A[@]}" --op new --mode target --tid 1 -T iqn.2026-11.test:bench-tgt
"${A[@]}" --op new --mode logicalunit --tid 1 --lun 1 -b "$IMG"
"${A[@]}" --op bind --mode target --tid 1 -I ALL
TGT_URL="portal=127.0.0.1:$TGT_PORT,target=iqn.2026-11.test:bench-tgt,lun=1"

start_diskless plain --image "$IMG" --target "$IQN_PLAIN"
PLAIN_PID=$PID PLAIN_URL="portal=127.0.0.1:$PORT,target=$IQN_PLAIN,lun=0"

for ((r = 1; r <= ROUNDS; r++)); do
	if ((r % 2)); then order="diskless tgt"; else order="tgt diskless"; fi
	for t in $order; do
		if [[ $t == tgt ]]; then
			bench tgt-randwrite "$TGT_PID" "$TGT_URL" -w
			bench tgt-randread "$TGT_PID" "$TGT_URL"
		else
			bench plain-randwrite "$PLAIN_PID" "$PLAIN_URL" -w
			bench plain-randread "$PLAIN_PID" "$PLAIN_URL"
		fi
	done
	# A fresh persistent overlay each round: first touch, then rewrite of the same chunks.
	rm -rf "$W/state"
	start_diskless overlay --image "$W/golden.img" --target "$IQN_GOLDEN" --overlay persistent --state-dir "$W/state"
	OV_URL="portal=127.0.0.1:$PORT,target=$IQN_GOLDEN,lun=0"
	bench overlay-first-touch "$PID" "$OV_URL" -w
	bench overlay-rewrite "$PID" "$OV_URL" -w
	bench overlay-rewrite-sync32 "$PID" "$OV_URL" -w --flush-interval=32
	bench plain-randwrite-sync32 "$PLAIN_PID" "$PLAIN_URL" -w --flush-interval=32
	stop_pid "$PID"
done

python3 - "$W/results" "$COUNT" "$ROUNDS" >"$OUT_DIR/writes.md" <<'PY'
import collections, statistics, sys
path, count, rounds = sys.argv[1], sys.argv[2], sys.argv[3]
iops, cpu = collections.defaultdict(list), collections.defaultdict(list)
for line in open(path):
    n, i, c = line.split()
    iops[n].append(int(i)); cpu[n].append(float(c))
med = {n: statistics.median(v) for n, v in iops.items()}
mcpu = {n: statistics.median(v) for n, v in cpu.items()}
print(f"qemu-img bench, 4 KiB, QD32, {count} IOs per job, median of {rounds} round(s)\n")
print("| job | IOPS | server CPU µs/IO | rounds (IOPS) |\n|---|---:|---:|---|")
for n in iops:
    print(f"| {n} | {med[n]:,.0f} | {mcpu[n]:.1f} | {' / '.join(f'{x:,}' for x in iops[n])} |")
def ratio(a, b):
    return f"{med[a] / med[b]:.2f}×" if a in med and b in med and med[b] else "n/a"
print("\n| ratio | value | goal |\n|---|---:|---:|")
print(f"| plain randwrite / tgt randwrite | {ratio('plain-randwrite', 'tgt-randwrite')} | ≥ 1.5× |")
print(f"| overlay first touch / plain randwrite | {ratio('overlay-first-touch', 'plain-randwrite')} | ≥ 0.8× |")
print(f"| overlay rewrite / plain randwrite | {ratio('overlay-rewrite', 'plain-randwrite')} | ≥ 0.9× |")
print(f"| overlay rewrite, SYNC CACHE every 32 / plain, same | {ratio('overlay-rewrite-sync32', 'plain-randwrite-sync32')} | |")
if 'plain-randwrite' in mcpu and 'plain-randread' in mcpu and mcpu['plain-randread']:
    print(f"| server CPU per write / per read (plain) | {mcpu['plain-randwrite'] / mcpu['plain-randread']:.2f}× | ≤ 3× |")
PY
cat "$OUT_DIR/writes.md"
