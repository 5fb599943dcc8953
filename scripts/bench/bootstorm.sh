#!/usr/bin/env bash
# Boot storm: N clients log in at once and each replays a recorded boot trace (one command
# at a time, like iPXE), against diskless (a boot target, volatile overlay per client) and
# against tgt, and print one comparison table.
#
#   scripts/bench/bootstorm.sh [--clients "8 32 128"] [--rounds N] [--trace FILE]
#                              [--cache warm|cold|both] [--readahead SECS] [--plain]
#                              [--no-tgt] [--bin DIR] [--keep]
#   scripts/bench/bootstorm.sh --record-trace PCAP [> tests/fixtures/boot-trace.txt]
#   scripts/bench/bootstorm.sh --record-debian PCAP [--debian-image IMG]
#
# --bin DIR: a directory with release builds of `diskless` and `examples/bootstorm` (default:
# cargo build --release into $CARGO_TARGET_DIR). A read-only trace (tests/fixtures/boot-trace.txt,
# the default) is served from a 256 MiB golden image and tgt serves it as one shared LUN. A trace
# with writes (tests/fixtures/boot-trace-writes.txt) is served from a sparse 1 GiB golden image;
# tgt then serves each client its own sparse copy (one target per client, copies made before and
# deleted after each run). --cache warm (default): the image is read once before each run, so
# the storm measures the servers; cold: `echo 3 > /proc/sys/vm/drop_caches` before each run
# (root); both: each run cold and then warm, side by side. --plain adds a third server: diskless
# serving the image as a plain shared LUN (`serve --image`, no overlays). --readahead SECS adds
# diskless-ra: diskless with `boot_readahead_secs: SECS`, which first learns the read set from
# one client's boot; before each cold run it is restarted (after the drop) and the storm starts
# as soon as it logged that the read-ahead was issued (not when it finished); with --readahead
# the plain diskless server is restarted after each drop too (both cold runs are first boots
# after a server start), and a second table gives the per-round ratios cold/warm,
# cold read-ahead/warm and cold read-ahead/cold (medians and ranges over the rounds).
# --no-tgt leaves tgt out (for the cold/warm/read-ahead comparison alone).
# --record-debian boots the Debian test image (scripts/boot/debian-image.sh; default: the newest
# in target/boot-cache/debian) once under QEMU from diskless (volatile) and captures its network
# traffic (QEMU filter-dump) into PCAP, for --record-trace.
set -euo pipefail

DL_NAME=bootstorm.sh
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
ROOT=$(dl_repo_root)

CLIENTS="8 32 128"
ROUNDS=1
TRACE=$ROOT/tests/fixtures/boot-trace.txt
BIN_DIR=""
KEEP=0
PLAIN=0
RECORD=""
OUT_DIR=$ROOT/target/bench
IMG_SIZE=$((256 << 20))

RECORD_DEBIAN=""
DEBIAN_IMG=""
CACHE_MODES=warm
RA=0
TGT=1
usage() { sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; }

while (($#)); do
	case "$1" in
	--clients) CLIENTS=${2:?}; shift ;;
	--rounds) ROUNDS=${2:?}; shift ;;
	--trace) TRACE=${2:?}; shift ;;
	--bin) BIN_DIR=${2:?}; shift ;;
	--keep) KEEP=1 ;;
	--plain) PLAIN=1 ;;
	--no-tgt) TGT=0 ;;
	--record-trace) RECORD=${2:?}; shift ;;
	--record-debian) RECORD_DEBIAN=${2:?}; shift ;;
	--debian-image) DEBIAN_IMG=${2:?}; shift ;;
	--cache) CACHE_MODES=${2:?}; shift ;;
	--readahead) RA=${2:?}; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
	shift
done

# --- recording a Debian boot that writes ----------------------------------------------------------
if [[ -n $RECORD_DEBIAN ]]; then
	dl_require qemu-system-x86_64 timeout
	if [[ -z $DEBIAN_IMG ]]; then
		DEBIAN_IMG=$(ls -t "${CARGO_TARGET_DIR:-$ROOT/target}"/boot-cache/debian/*/debian.img 2>/dev/null | head -n1 || true)
	fi
	[[ -f $DEBIAN_IMG ]] || dl_die "no Debian image (cargo test --test debian, or scripts/boot/debian-image.sh DIR; then --debian-image DIR/debian.img)"
	[[ -n $BIN_DIR ]] || { (cd "$ROOT" && cargo build --quiet --bin diskless) || dl_die "cargo build failed"; BIN_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/debug; }
	R=$(mktemp -d)
	RPID=""
	QPID=""
	trap 'for p in $QPID $RPID; do kill "$p" 2>/dev/null || true; done; rm -rf "$R"' EXIT
	mkdir -p "$R/tftp"
	cp --sparse=always "$DEBIAN_IMG" "$R/golden.img"
	printf 'state_dir: %s\nimages:\n  - {name: debian, path: %s}\ntargets:\n  - name: iqn.2026-11.test:debian\n    boot:\n      default: {image: debian, mode: volatile}\n' \
		"$R/state" "$R/golden.img" >"$R/targets.yaml"
	"$BIN_DIR/diskless" --log warn serve -c "$R/targets.yaml" --listen 127.0.0.1:0 >"$R/srv.out" 2>"$R/srv.err" &
	RPID=$!
	for ((i = 0; i < 300; i++)); do
		port=$(sed -n 's/^diskless: listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$R/srv.out" | head -n1 || true)
		[[ -n $port ]] && break
		sleep 0.1
	done
	[[ -n $port ]] || dl_die "diskless did not start: $(cat "$R/srv.err")"
	printf '#!ipxe\nset initiator-iqn iqn.2026-11.test:record\nsanboot iscsi:10.0.2.2::%s:0:iqn.2026-11.test:debian || goto failed\n:failed\necho SANBOOT-FAILED ${errno}\n' \
		"$port" >"$R/tftp/boot.ipxe"
	printf '\xf8\x03' >"$R/sercon" # SeaBIOS console on COM1
	dl_log "booting Debian (action=check: boot, report, power off; ~2-3 min under TCG)"
	timeout -k 5 600 qemu-system-x86_64 -accel tcg -m 1024 -smp 1 -nodefaults -no-user-config \
		-vga none -display none \
		-netdev "user,id=n0,net=10.0.2.0/24,host=10.0.2.2,tftp=$R/tftp,bootfile=boot.ipxe" \
		-device virtio-net-pci,disable-legacy=on,netdev=n0,romfile=/usr/lib/ipxe/qemu/pxe-virtio.rom,bootindex=1 \
		-object "filter-dump,id=d0,netdev=n0,file=$RECORD_DEBIAN,maxlen=65536" \
		-fw_cfg "name=etc/sercon-port,file=$R/sercon" -fw_cfg name=opt/diskless/action,string=check \
		-fw_cfg name=opt/diskless/token,string=none -boot order=n,strict=on \
		-serial "file:$R/serial.log" >/dev/null 2>&1 &
	QPID=$!
	wait "$QPID" || dl_die "QEMU failed or timed out; serial tail: $(tail -c 2000 "$R/serial.log")"
	QPID=""
	grep -aq DISKLESS-CHECKED "$R/serial.log" || dl_die "the guest did not report DISKLESS-CHECKED"
	dl_log "captured $(stat -c %s "$RECORD_DEBIAN") bytes into $RECORD_DEBIAN"
	exit 0
fi

# --- trace recording: the READs (and WRITEs) of a boot capture, in order --------------------------
if [[ -n $RECORD ]]; then
	[[ -f $RECORD ]] || dl_die "no capture at $RECORD (cargo test --test boot bios_ipxe records one)"
	exec python3 - "$RECORD" "$ROOT/scripts/boot/pcap-summary.py" <<'PY'
import collections, importlib.util, os, sys
pcap, summary = sys.argv[1], sys.argv[2]
# Reuse the capture parser of pcap-summary.py (Ethernet pcap, TCP reassembly by sequence).
spec = importlib.util.spec_from_file_location("pcap_summary", summary)
ps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ps)
conns, first, t0 = collections.defaultdict(dict), {}, None
for t, src, sp, dp, seq, pl in ps.packets(open(pcap, "rb").read()):
    t0 = t if t0 is None else t0
    if src != ps.GUEST or dp < 1024:
        continue
    first.setdefault((sp, dp), t - t0)
    if pl:
        conns[(sp, dp)].setdefault(seq, pl)
reads, flushes = [], 0
for n, key in enumerate(sorted(conns, key=lambda k: first[k])):
    s, i = ps.stream(conns[key]), 0
    while i + 48 <= len(s):
        bhs = s[i : i + 48]
        dl = int.from_bytes(bhs[5:8], "big")
        if bhs[0] & 0x3F == 0x01:  # SCSI Command
            cdb = bhs[32:48]
            # READ(10)/WRITE(10) (SBC-3 §5.11, §5.32), READ(16)/WRITE(16) (§5.13, §5.34).
            op = {0x28: "R", 0x2A: "W", 0x88: "R", 0x8A: "W"}.get(cdb[0])
            if op and cdb[0] < 0x80:
                reads.append((n, op, int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")))
            elif op:
                reads.append((n, op, int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")))
            elif cdb[0] in (0x35, 0x91):  # SYNCHRONIZE CACHE(10)/(16): counted, not replayed
                flushes += 1
        i += 48 + bhs[4] * 4 + dl + (-dl % 4)
reads = [r for r in reads if r[3] > 0]
if not reads:
    sys.exit("no READ commands in " + pcap)
nw = sum(1 for r in reads if r[1] == "W")
hi = max(r[2] + r[3] for r in reads)
if nw == 0:
    # Reads only: the original 'LBA BLOCKS' format.
    print("# Boot read trace: every READ(10)/READ(16) of a recorded BIOS boot (iPXE sanboot, then")
    print("# the Linux initiator in the initramfs), in order, as 'LBA BLOCKS' (512-byte blocks).")
    print(f"# Source: {os.path.basename(pcap)} via scripts/bench/bootstorm.sh --record-trace.")
    print(f"# {len(reads)} reads, {sum(r[3] for r in reads) * 512} bytes, highest block {hi}.")
else:
    rb = sum(r[3] for r in reads if r[1] == "R") * 512
    wb = sum(r[3] for r in reads if r[1] == "W") * 512
    print("# Boot trace with writes: every READ(10/16) and WRITE(10/16) of a recorded boot, in")
    print("# order, as 'R LBA BLOCKS' / 'W LBA BLOCKS' (512-byte blocks).")
    print(f"# Source: {os.path.basename(pcap)} via scripts/bench/bootstorm.sh --record-trace.")
    print(f"# {len(reads) - nw} reads ({rb} bytes), {nw} writes ({wb} bytes), highest block {hi};")
    print(f"# {flushes} SYNCHRONIZE CACHE commands seen (not replayed).")
last = None
for conn, op, lba, n in reads:
    if conn != last:
        print(f"# connection {conn + 1} ({'iPXE' if conn == 0 else 'Linux'})")
        last = conn
    print(f"{op} {lba} {n}" if nw else f"{lba} {n}")
PY
fi

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || dl_die "--rounds must be a positive integer"
for n in $CLIENTS; do [[ $n =~ ^[1-9][0-9]*$ ]] || dl_die "--clients: '$n' is not a positive integer"; done
case $CACHE_MODES in
warm) CACHE_MODES="warm" ;;
cold) CACHE_MODES="cold" ;;
both) CACHE_MODES="cold warm" ;;
*) dl_die "--cache must be warm, cold or both" ;;
esac
if [[ $CACHE_MODES == *cold* ]]; then
	[[ -w /proc/sys/vm/drop_caches ]] || dl_die "--cache cold needs root (echo 3 > /proc/sys/vm/drop_caches)"
fi
[[ -f $TRACE ]] || dl_die "no trace at $TRACE"
WRITES=0
grep -q '^[Ww] ' "$TRACE" && WRITES=1
dl_require tgtd tgtadm python3 mktemp timeout

# --- binaries -----------------------------------------------------------------------------------
if [[ -z $BIN_DIR ]]; then
	dl_log "building diskless and examples/bootstorm (release)"
	(cd "$ROOT" && cargo build --release --quiet --bin diskless --example bootstorm) ||
		dl_die "cargo build --release failed"
	BIN_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
fi
BIN=$BIN_DIR/diskless
STORM=$BIN_DIR/examples/bootstorm
[[ -x $STORM ]] || STORM=$BIN_DIR/bootstorm
[[ -x $BIN ]] || dl_die "diskless binary not found at $BIN"
[[ -x $STORM ]] || dl_die "bootstorm example not found in $BIN_DIR/examples"

# Each client holds one socket; the server holds one per client too.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

mkdir -p "$OUT_DIR"
W=$(mktemp -d "$OUT_DIR/storm.XXXXXX")
IMG=$OUT_DIR/storm-golden.img # kept between runs
DL_PID=""
PL_PID=""
RA_PID=""
TGT_PID=""
TGT_CTL=""
cleanup() {
	if [[ -n $TGT_CTL ]] && [[ -n $TGT_PID ]] && kill -0 "$TGT_PID" 2>/dev/null; then
		# tgtd ignores SIGTERM while it has targets; ask it to shut down instead.
		for t in $TGT_TIDS; do
			tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op delete --force --tid "$t" >/dev/null 2>&1 || true
		done
		tgtadm -C "$TGT_CTL" --mode system --op delete >/dev/null 2>&1 || true
	fi
	local p
	for p in $DL_PID $PL_PID $RA_PID $TGT_PID; do
		kill -0 "$p" 2>/dev/null || continue
		kill -TERM "$p" 2>/dev/null || true
		for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$p" 2>/dev/null || true
	done
	if [[ -n $TGT_CTL ]]; then rm -f "/var/run/tgtd/socket.$TGT_CTL" "/var/run/tgtd/socket.$TGT_CTL.lock"; fi
	rm -rf "$W/copies"
	if ((KEEP)); then dl_log "kept raw results in $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

# --- golden image: random data covering every LBA of the trace ---------------------------------
need=$(awk '!/^#/ && NF >= 2 { e = ($(NF - 1) + $NF) * 512; if (e > m) m = e } END { print m + 0 }' "$TRACE")
if ((WRITES)); then
	# A trace with writes comes from a 1 GiB disk and tgt gets one copy per client: a sparse
	# image with random data on the blocks the trace reads, in the order it first reads them,
	# up to DATA_MIB (so that the largest N's copies stay under SCRATCH_MIB), holes elsewhere.
	IMG_SIZE=$(((need + (1 << 20) - 1) >> 20 << 20))
	max_n=0
	for n in $CLIENTS; do ((n > max_n)) && max_n=$n; done
	SCRATCH_MIB=${SCRATCH_MIB:-5632}
	DATA_MIB=$((SCRATCH_MIB / max_n))
	((DATA_MIB > 256)) && DATA_MIB=256
	IMG=$OUT_DIR/storm-golden-w$DATA_MIB.img
	if [[ ! -f $IMG ]] || [[ $(stat -c %s "$IMG") -ne $IMG_SIZE ]]; then
		dl_log "creating sparse golden image $IMG ($IMG_SIZE bytes, data on the first $DATA_MIB MiB of the read set)"
		python3 - "$TRACE" "$IMG.tmp" "$IMG_SIZE" "$DATA_MIB" <<'PY'
import os, sys
trace, out, size, data_mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
seen, order = set(), []
for line in open(trace):
    f = line.split()
    if not f or f[0].startswith("#") or f[0] in ("W", "w"):
        continue
    lba, n = int(f[-2]), int(f[-1])
    for b in range(lba, lba + n):
        if b not in seen:
            seen.add(b)
            order.append(b)
order = sorted(order[: data_mib * 2048])
with open(out, "wb") as fh:
    fh.truncate(size)
    i = 0  # write runs of adjacent blocks at once
    while i < len(order):
        j = i
        while j + 1 < len(order) and order[j + 1] == order[j] + 1:
            j += 1
        fh.seek(order[i] * 512)
        fh.write(os.urandom((j - i + 1) * 512))
        i = j + 1
PY
		mv "$IMG.tmp" "$IMG"
	fi
else
	((need <= IMG_SIZE)) || dl_die "the trace reads up to byte $need, beyond the ${IMG_SIZE}-byte image"
	if [[ ! -f $IMG ]] || [[ $(stat -c %s "$IMG") -ne $IMG_SIZE ]]; then
		dl_log "creating 256 MiB golden image $IMG"
		head -c "$IMG_SIZE" /dev/urandom >"$IMG.tmp"
		mv "$IMG.tmp" "$IMG"
	fi
fi
# Warm: both targets read from the page cache (read here, and again before each warm run).
cat "$IMG" >/dev/null

# --- servers -------------------------------------------------------------------------------------
DL_IQN=iqn.2026-11.org.diskless:storm
mkdir -p "$W/state"
cat >"$W/targets.yaml" <<EOF
state_dir: $W/state
images:
  - name: base
    path: $IMG
targets:
  - name: $DL_IQN
    initiators: ["*"]
    boot:
      default: {image: base, mode: volatile}
settings:
  max_sessions: 4096
EOF
# Start diskless with the given arguments; sets STARTED_PID and STARTED_PORT.
start_diskless() { # tag args...
	local tag=$1
	shift
	"$BIN" --log "${DL_LOG:-warn}" "$@" --listen 127.0.0.1:0 >"$W/$tag.out" 2>"$W/$tag.err" &
	STARTED_PID=$!
	STARTED_PORT=""
	for ((i = 0; i < 300; i++)); do
		STARTED_PORT=$(sed -n 's/^diskless: listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$W/$tag.out" | head -n1 || true)
		[[ -n $STARTED_PORT ]] && return 0
		kill -0 "$STARTED_PID" 2>/dev/null || { tail -n 20 "$W/$tag.err" >&2; dl_die "$tag exited during startup"; }
		sleep 0.1
	done
	dl_die "$tag did not print 'diskless: listening on'"
}
start_diskless diskless serve -c "$W/targets.yaml"
DL_PID=$STARTED_PID
DL_PORT=$STARTED_PORT
TARGETS="diskless"
((TGT)) && TARGETS="diskless tgt"
if ((PLAIN)); then
	start_diskless diskless-plain serve --image "$IMG"
	PL_PID=$STARTED_PID
	PL_PORT=$STARTED_PORT
	PL_IQN="iqn.2026-11.org.diskless:$(basename "${IMG%.*}")"
	TARGETS="$TARGETS diskless-plain"
fi
[[ $RA =~ ^[0-9]+$ ]] || dl_die "--readahead SECS: a number of seconds"
stop_pid() {
	kill -TERM "$1" 2>/dev/null || return 0
	for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
	kill -KILL "$1" 2>/dev/null || true
}
start_ra() {
	DL_LOG=warn,diskless::storage::readahead=info start_diskless diskless-ra serve -c "$W/targets-ra.yaml"
	RA_PID=$STARTED_PID
	RA_PORT=$STARTED_PORT
}
if ((RA > 0)); then
	mkdir -p "$W/state-ra"
	sed -e "s|^state_dir: .*|state_dir: $W/state-ra|" -e "s|^settings:|settings:\n  boot_readahead_secs: $RA|" \
		"$W/targets.yaml" >"$W/targets-ra.yaml"
	start_ra
	# Learn: one client boots; the set is saved once the window (from its first read) closed.
	"$STORM" --portal "127.0.0.1:$RA_PORT" --target "$DL_IQN" --clients 1 --trace "$TRACE" \
		--initiator-prefix iqn.2026-11.test:storm-learn- >"$W/learn.out" 2>&1 ||
		dl_die "the learning boot failed: $(cat "$W/learn.out")"
	for ((i = 0; i < (RA + 60) * 10; i++)); do
		compgen -G "$W/state-ra/readahead/*.txt" >/dev/null && break
		sleep 0.1
	done
	compgen -G "$W/state-ra/readahead/*.txt" >/dev/null || dl_die "diskless-ra saved no read set: $(tail -n 5 "$W/diskless-ra.err")"
	dl_log "diskless-ra learned $(awk 'NR > 3 { n += $2 } END { print n }' "$W"/state-ra/readahead/*.txt) MiB of read set"
	TARGETS="$TARGETS diskless-ra"
fi

TGT_PORT=""
TGT_IQN=iqn.2026-11.test:storm-tgt
A=(tgtadm -C "$TGT_CTL" --lld iscsi)
TGT_TIDS=""
if ((TGT)); then
	TGT_PORT=$(dl_free_port)
	dl_start_tgtd "$TGT_PORT" "$W/tgt"
	A=(tgtadm -C "$TGT_CTL" --lld iscsi)
fi
if ((!TGT)); then
	:
elif ((WRITES)); then
	# One target per client (tgt has no per-client overlays), each with its own sparse copy of
	# the golden image: made by tgt_copies before each run, deleted after it.
	TGT_IQN=iqn.2026-11.test:storm-tgt-
else
	"${A[@]}" --op new --mode target --tid 1 -T "$TGT_IQN"
	# One shared LUN, default rdwr backing store; LUN 0 is tgt's controller, so the image is LUN 1.
	"${A[@]}" --op new --mode logicalunit --tid 1 --lun 1 -b "$IMG"
	"${A[@]}" --op bind --mode target --tid 1 -I ALL
	TGT_TIDS=1
fi
# N targets tid 1..N, target i-1 on copy i-1 of the image (a trace with writes).
tgt_copies() { # n
	local i
	mkdir -p "$W/copies"
	for ((i = 0; i < $1; i++)); do
		cp --sparse=always "$IMG" "$W/copies/c$i.img"
		"${A[@]}" --op new --mode target --tid $((i + 1)) -T "$TGT_IQN$i"
		"${A[@]}" --op new --mode logicalunit --tid $((i + 1)) --lun 1 -b "$W/copies/c$i.img"
		"${A[@]}" --op bind --mode target --tid $((i + 1)) -I ALL
		TGT_TIDS="$TGT_TIDS $((i + 1))"
	done
	COPIES_KIB=$(du -sk "$W/copies" | awk '{print $1}')
}
tgt_drop_copies() {
	local t
	for t in $TGT_TIDS; do
		"${A[@]}" --op delete --mode target --force --tid "$t" >/dev/null 2>&1 || true
	done
	TGT_TIDS=""
	rm -rf "$W/copies"
}
dl_log "diskless pid $DL_PID on :$DL_PORT, tgtd pid $TGT_PID on :$TGT_PORT, raw results in $W"

# --- runs ------------------------------------------------------------------------------------------
# CPU ticks (user+system, all threads) a server used, from /proc/PID/stat.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

RESULTS=$W/results.tsv
printf 'round\tclients\ttarget\tlast_done_s\tp50_us\tp99_us\tmib\tcpu_ticks\thwm_kib\trss_before_kib\tmax_threads\tcache\twmib\tscratch_kib\n' >"$RESULTS"

# Highest thread count of PID while the file $2 exists, sampled every 0.2 s, into $3.
sample_threads() { # pid flag out
	local max=0 t
	while [[ -e $2 ]]; do
		t=$(awk '/^Threads:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0)
		((t > max)) && max=$t
		sleep 0.2
	done
	echo "$max" >"$3"
}

run_one() { # round clients target cache
	local round=$1 n=$2 target=$3 cache=$4 pid port iqn lun c0 c1 res extra=() scratch=0
	case $target in
	diskless) pid=$DL_PID port=$DL_PORT iqn=$DL_IQN lun=0 ;;
	diskless-plain) pid=$PL_PID port=$PL_PORT iqn=$PL_IQN lun=0 ;;
	diskless-ra) pid=$RA_PID port=$RA_PORT iqn=$DL_IQN lun=0 ;;
	tgt) pid=$TGT_PID port=$TGT_PORT iqn=$TGT_IQN lun=1 ;;
	esac
	kill -0 "$pid" 2>/dev/null || dl_die "$target (pid $pid) is gone"
	if ((WRITES)) && [[ $target == tgt ]]; then
		# Each client its own copy of the image (what a per-client file costs with tgt).
		tgt_copies "$n"
		scratch=$COPIES_KIB
		extra=(--target-per-client)
	fi
	if [[ $cache == cold ]]; then
		# Write back what is dirty, then drop the page cache: the servers read from the disk.
		sync
		echo 3 >/proc/sys/vm/drop_caches
		if [[ $target == diskless ]] && ((RA > 0)); then
			# The same server start on a cold cache, without read-ahead.
			stop_pid "$DL_PID"
			start_diskless diskless serve -c "$W/targets.yaml"
			DL_PID=$STARTED_PID DL_PORT=$STARTED_PORT
			pid=$DL_PID port=$DL_PORT
		fi
		if [[ $target == diskless-ra ]]; then
			# A server start on a cold cache: the learned set is read ahead at open.
			stop_pid "$RA_PID"
			start_ra
			pid=$RA_PID port=$RA_PORT
			for ((i = 0; i < 300; i++)); do
				grep -q "boot read-ahead issued" "$W/diskless-ra.err" && break
				sleep 0.1
			done
			grep -q "boot read-ahead issued" "$W/diskless-ra.err" || dl_die "diskless-ra issued no read-ahead"
		fi
	else
		cat "$IMG" >/dev/null
		((WRITES)) && sync
	fi
	local base=$W/r$round.n$n.$target.$cache rss0
	rss0=$(rss_kib "$pid")
	# Reset VmHWM to the current RSS (proc(5), clear_refs 5) so the peak is this run's.
	echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || dl_log "cannot reset VmHWM of $target: peak is since start"
	c0=$(cpu_ticks "$pid")
	: >"$base.sampling"
	sample_threads "$pid" "$base.sampling" "$base.threads" &
	local sampler=$!
	# Distinct initiator names per run: every run is a first boot of fresh clients.
	if ! timeout 600 "$STORM" --portal "127.0.0.1:$port" --target "$iqn" --lun "$lun" \
		--clients "$n" --trace "$TRACE" --initiator-prefix "iqn.2026-11.test:storm-r$round-n$n-$target-$cache-" \
		"${extra[@]}" \
		>"$base.out" 2>"$base.err"; then
		cat "$base.out" "$base.err" >&2
		dl_die "storm of $n clients against $target failed"
	fi
	c1=$(cpu_ticks "$pid")
	rm -f "$base.sampling"
	wait "$sampler" || true
	res=$(grep '^RESULT ' "$base.out") || dl_die "no RESULT line from bootstorm ($base.out)"
	local kv=${res#RESULT }
	local last p50 p99 mib wmib
	wmib=$(tr ' ' '\n' <<<"$kv" | sed -n 's/^wmib=//p')
	last=$(tr ' ' '\n' <<<"$kv" | sed -n 's/^last_done_s=//p')
	p50=$(tr ' ' '\n' <<<"$kv" | sed -n 's/^p50_us=//p')
	p99=$(tr ' ' '\n' <<<"$kv" | sed -n 's/^p99_us=//p')
	mib=$(tr ' ' '\n' <<<"$kv" | sed -n 's/^mib=//p')
	if [[ $target != tgt ]]; then scratch=$(du -sk "$W/state" | awk '{print $1}'); fi
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$n" "$target" "$last" "$p50" "$p99" \
		"$mib" "$((c1 - c0))" "$(hwm_kib "$pid")" "$rss0" "$(cat "$base.threads")" "$cache" "${wmib:-0}" "$scratch" >>"$RESULTS"
	if ((WRITES)) && [[ $target == tgt ]]; then tgt_drop_copies; fi
	dl_log "round $round, $n clients, $target, $cache cache: last done ${last} s, p50 ${p50} µs, p99 ${p99} µs, $((c1 - c0)) CPU ticks"
	# Let the server finish closing the sessions before the next run measures it.
	sleep 1
}

for ((r = 1; r <= ROUNDS; r++)); do
	ni=0
	for n in $CLIENTS; do
		# Alternate, for each N from round to round, which target goes first (every round)
		# and which cache state goes first (every other round), so that drift on a shared
		# machine hits all of them alike.
		order=$TARGETS caches=$CACHE_MODES
		(((r + ni) % 2)) && order=$(tr ' ' '\n' <<<"$TARGETS" | tac | tr '\n' ' ')
		((((r - 1) / 2 + ni) % 2)) && caches=$(tr ' ' '\n' <<<"$CACHE_MODES" | tac | tr '\n' ' ')
		ni=$((ni + 1))
		for cache in $caches; do
			for t in $order; do run_one "$r" "$n" "$t" "$cache"; done
		done
	done
done

# --- table -------------------------------------------------------------------------------------------
python3 - "$RESULTS" "$(getconf CLK_TCK)" "$WRITES" <<'PY' | tee "$OUT_DIR/bootstorm.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
tck, writes = int(sys.argv[2]), sys.argv[3] == "1"
by = {}
for r in rows:
    by.setdefault((int(r["clients"]), r["cache"], r["target"]), []).append(r)
caches = [c for c in ("cold", "warm") if any(k[1] == c for k in by)]
def med(rs, k):
    return statistics.median(float(r[k]) for r in rs)
cw = len(caches) > 1
head = "| clients | cache | target | last done s | p50 µs | p99 µs | MiB read |"
head += " MiB written | scratch MiB |" if writes else ""
head += " server CPU s | server peak RSS MiB | server threads (max) | diskless/tgt time | diskless/tgt CPU |"
head += " cold/warm time |" if cw else ""
print(head)
print("|" + "---:|" * 2 + "---|" + "---:|" * (head.count("|") - 4))
for n in sorted({k[0] for k in by}):
    for c in caches:
        t = by.get((n, c, "tgt"), [])
        for name in ("diskless", "tgt", "diskless-plain", "diskless-ra"):
            rs = by.get((n, c, name), [])
            if not rs:
                continue
            ratio_t = ratio_c = ""
            if name.startswith("diskless") and t:
                ratio_t = f"**{med(rs, 'last_done_s') / med(t, 'last_done_s'):.2f}**"
                ct = med(t, "cpu_ticks")
                ratio_c = f"{med(rs, 'cpu_ticks') / ct:.2f}" if ct else "-"
            line = (f"| {n} | {c} | {name} | {med(rs, 'last_done_s'):.2f} | {med(rs, 'p50_us'):.0f} | {med(rs, 'p99_us'):.0f} "
                    f"| {med(rs, 'mib'):.0f} |")
            if writes:
                line += f" {med(rs, 'wmib'):.0f} | {med(rs, 'scratch_kib') / 1024:.0f} |"
            line += (f" {med(rs, 'cpu_ticks') / tck:.2f} | {med(rs, 'hwm_kib') / 1024:.1f} | {med(rs, 'max_threads'):.0f} "
                     f"| {ratio_t} | {ratio_c} |")
            if cw:
                w = by.get((n, "warm", name), [])
                line += f" {med(rs, 'last_done_s') / med(w, 'last_done_s'):.2f} |" if c == "cold" and w else " |"
            print(line)
# Per-round ratios (same round, same N: storms minutes apart at most), medians and ranges.
rounds = sorted({int(r["round"]) for r in rows})
def last(n, rd, c, t):
    rs = [r for r in rows if int(r["clients"]) == n and int(r["round"]) == rd and r["cache"] == c and r["target"] == t]
    return float(rs[0]["last_done_s"]) if rs else None
pairs = [("cold/warm, no read-ahead", ("cold", "diskless"), ("warm", "diskless")),
         ("cold with read-ahead/warm", ("cold", "diskless-ra"), ("warm", "diskless-ra")),
         ("cold with/without read-ahead", ("cold", "diskless-ra"), ("cold", "diskless")),
         ("warm, the two servers (noise)", ("warm", "diskless-ra"), ("warm", "diskless"))]
if cw and any(k[2] == "diskless-ra" for k in by):
    print()
    print(f"Per-round ratios of storm time ({len(rounds)} rounds): median (range)")
    print()
    print("| clients | " + " | ".join(p[0] for p in pairs) + " |")
    print("|---:|" + "---:|" * len(pairs))
    for n in sorted({k[0] for k in by}):
        cells = []
        for _, a, b in pairs:
            xs = [x / y for x, y in ((last(n, rd, *a), last(n, rd, *b)) for rd in rounds) if x and y]
            cells.append(f"**{statistics.median(xs):.2f}** ({min(xs):.2f}-{max(xs):.2f})" if xs else "-")
        print(f"| {n} | " + " | ".join(cells) + " |")
PY
dl_log "table written to $OUT_DIR/bootstorm.md"
