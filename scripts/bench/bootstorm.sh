#!/usr/bin/env bash
# Boot storm: N clients log in at once and each replays a recorded boot read trace (one command
# at a time, like iPXE), against diskless (a boot target, volatile overlay per client) and
# against tgt (one shared LUN), and print one comparison table.
#
#   scripts/bench/bootstorm.sh [--clients "8 32 128"] [--rounds N] [--trace FILE]
#                              [--plain] [--bin DIR] [--keep]
#   scripts/bench/bootstorm.sh --record-trace PCAP [> tests/fixtures/boot-trace.txt]
#
# --bin DIR: a directory with release builds of `diskless` and `examples/bootstorm` (default:
# cargo build --release into $CARGO_TARGET_DIR). Both servers read a 256 MiB golden image that
# is in the page cache (warm, not dropped): the storm measures the servers, not the disk.
# --plain adds a third server: diskless serving the image as a plain shared LUN (`serve
# --image`, no overlays), to tell the overlay's share from the rest.
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

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

while (($#)); do
	case "$1" in
	--clients) CLIENTS=${2:?}; shift ;;
	--rounds) ROUNDS=${2:?}; shift ;;
	--trace) TRACE=${2:?}; shift ;;
	--bin) BIN_DIR=${2:?}; shift ;;
	--keep) KEEP=1 ;;
	--plain) PLAIN=1 ;;
	--record-trace) RECORD=${2:?}; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
	shift
done

# --- trace recording: the READs of a boot capture, in order -----------------------------------
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
reads = []
for n, key in enumerate(sorted(conns, key=lambda k: first[k])):
    s, i = ps.stream(conns[key]), 0
    while i + 48 <= len(s):
        bhs = s[i : i + 48]
        dl = int.from_bytes(bhs[5:8], "big")
        if bhs[0] & 0x3F == 0x01:  # SCSI Command
            cdb = bhs[32:48]
            if cdb[0] == 0x28:
                reads.append((n, int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")))
            elif cdb[0] == 0x88:
                reads.append((n, int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")))
        i += 48 + bhs[4] * 4 + dl + (-dl % 4)
if not reads:
    sys.exit("no READ commands in " + pcap)
print("# Boot read trace: every READ(10)/READ(16) of a recorded BIOS boot (iPXE sanboot, then")
print("# the Linux initiator in the initramfs), in order, as 'LBA BLOCKS' (512-byte blocks).")
print(f"# Source: {os.path.basename(pcap)} via scripts/bench/bootstorm.sh --record-trace.")
print(f"# {len(reads)} reads, {sum(r[2] for r in reads) * 512} bytes, highest block {max(r[1] + r[2] for r in reads)}.")
last = None
for conn, lba, n in reads:
    if conn != last:
        print(f"# connection {conn + 1} ({'iPXE' if conn == 0 else 'Linux'})")
        last = conn
    print(lba, n)
PY
fi

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || dl_die "--rounds must be a positive integer"
for n in $CLIENTS; do [[ $n =~ ^[1-9][0-9]*$ ]] || dl_die "--clients: '$n' is not a positive integer"; done
[[ -f $TRACE ]] || dl_die "no trace at $TRACE"
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
TGT_PID=""
TGT_CTL=""
cleanup() {
	if [[ -n $TGT_CTL ]] && [[ -n $TGT_PID ]] && kill -0 "$TGT_PID" 2>/dev/null; then
		# tgtd ignores SIGTERM while it has targets; ask it to shut down instead.
		tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op delete --force --tid 1 >/dev/null 2>&1 || true
		tgtadm -C "$TGT_CTL" --mode system --op delete >/dev/null 2>&1 || true
	fi
	local p
	for p in $DL_PID $PL_PID $TGT_PID; do
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

# --- golden image: random data covering every LBA of the trace ---------------------------------
need=$(awk '!/^#/ && NF == 2 { e = ($1 + $2) * 512; if (e > m) m = e } END { print m + 0 }' "$TRACE")
((need <= IMG_SIZE)) || dl_die "the trace reads up to byte $need, beyond the ${IMG_SIZE}-byte image"
if [[ ! -f $IMG ]] || [[ $(stat -c %s "$IMG") -ne $IMG_SIZE ]]; then
	dl_log "creating 256 MiB golden image $IMG"
	head -c "$IMG_SIZE" /dev/urandom >"$IMG.tmp"
	mv "$IMG.tmp" "$IMG"
fi
# Both targets read from the page cache: warm it (not dropped; both start equal).
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
	"$BIN" --log warn "$@" --listen 127.0.0.1:0 >"$W/$tag.out" 2>"$W/$tag.err" &
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
TARGETS="diskless tgt"
if ((PLAIN)); then
	start_diskless diskless-plain serve --image "$IMG"
	PL_PID=$STARTED_PID
	PL_PORT=$STARTED_PORT
	PL_IQN="iqn.2026-11.org.diskless:$(basename "${IMG%.*}")"
	TARGETS="diskless tgt diskless-plain"
fi

TGT_PORT=$(dl_free_port)
dl_start_tgtd "$TGT_PORT" "$W/tgt"
TGT_IQN=iqn.2026-11.test:storm-tgt
A=(tgtadm -C "$TGT_CTL" --lld iscsi)
"${A[@]}" --op new --mode target --tid 1 -T "$TGT_IQN"
# One shared LUN (tgt has no per-client overlays), default rdwr backing store; LUN 0 is tgt's
# controller, so the image is LUN 1.
"${A[@]}" --op new --mode logicalunit --tid 1 --lun 1 -b "$IMG"
"${A[@]}" --op bind --mode target --tid 1 -I ALL
dl_log "diskless pid $DL_PID on :$DL_PORT, tgtd pid $TGT_PID on :$TGT_PORT, raw results in $W"

# --- runs ------------------------------------------------------------------------------------------
# CPU ticks (user+system, all threads) a server used, from /proc/PID/stat.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

RESULTS=$W/results.tsv
printf 'round\tclients\ttarget\tlast_done_s\tp50_us\tp99_us\tmib\tcpu_ticks\thwm_kib\trss_before_kib\tmax_threads\n' >"$RESULTS"

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

run_one() { # round clients target
	local round=$1 n=$2 target=$3 pid port iqn lun c0 c1 res
	case $target in
	diskless) pid=$DL_PID port=$DL_PORT iqn=$DL_IQN lun=0 ;;
	diskless-plain) pid=$PL_PID port=$PL_PORT iqn=$PL_IQN lun=0 ;;
	tgt) pid=$TGT_PID port=$TGT_PORT iqn=$TGT_IQN lun=1 ;;
	esac
	kill -0 "$pid" 2>/dev/null || dl_die "$target (pid $pid) is gone"
	local base=$W/r$round.n$n.$target rss0
	rss0=$(rss_kib "$pid")
	# Reset VmHWM to the current RSS (proc(5), clear_refs 5) so the peak is this run's.
	echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || dl_log "cannot reset VmHWM of $target: peak is since start"
	c0=$(cpu_ticks "$pid")
	: >"$base.sampling"
	sample_threads "$pid" "$base.sampling" "$base.threads" &
	local sampler=$!
	# Distinct initiator names per run: every run is a first boot of fresh clients.
	if ! timeout 600 "$STORM" --portal "127.0.0.1:$port" --target "$iqn" --lun "$lun" \
		--clients "$n" --trace "$TRACE" --initiator-prefix "iqn.2026-11.test:storm-r$round-n$n-$target-" \
		>"$base.out" 2>"$base.err"; then
		cat "$base.out" "$base.err" >&2
		dl_die "storm of $n clients against $target failed"
	fi
	c1=$(cpu_ticks "$pid")
	rm -f "$base.sampling"
	wait "$sampler" || true
	res=$(grep '^RESULT ' "$base.out") || dl_die "no RESULT line from bootstorm ($base.out)"
	local kv=${res#RESULT }
	local last p50 p99 mib
	last=$(tr ' ' '\n' <<<"$kv" | sed -n 's/^last_done_s=//p')
	p50=$(tr ' ' '\n' <<<"$kv" | sed -n 's/^p50_us=//p')
	p99=$(tr ' ' '\n' <<<"$kv" | sed -n 's/^p99_us=//p')
	mib=$(tr ' ' '\n' <<<"$kv" | sed -n 's/^mib=//p')
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$n" "$target" "$last" "$p50" "$p99" \
		"$mib" "$((c1 - c0))" "$(hwm_kib "$pid")" "$rss0" "$(cat "$base.threads")" >>"$RESULTS"
	dl_log "round $round, $n clients, $target: last done ${last} s, p50 ${p50} µs, p99 ${p99} µs, $((c1 - c0)) CPU ticks"
	# Let the server finish closing the sessions before the next run measures it.
	sleep 1
}

k=0
for ((r = 1; r <= ROUNDS; r++)); do
	for n in $CLIENTS; do
		# Alternate which target goes first so drift on a shared machine hits both.
		if ((k % 2)); then order=$(tr ' ' '\n' <<<"$TARGETS" | tac | tr '\n' ' '); else order=$TARGETS; fi
		k=$((k + 1))
		for t in $order; do run_one "$r" "$n" "$t"; done
	done
done

# --- table -------------------------------------------------------------------------------------------
python3 - "$RESULTS" "$(getconf CLK_TCK)" <<'PY' | tee "$OUT_DIR/bootstorm.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
tck = int(sys.argv[2])
by = {}
for r in rows:
    by.setdefault((int(r["clients"]), r["target"]), []).append(r)
def med(rs, k):
    return statistics.median(float(r[k]) for r in rs)
print("| clients | target | last done s | p50 µs | p99 µs | MiB read | server CPU s | server peak RSS MiB | server threads (max) | diskless/tgt time | diskless/tgt CPU |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for n in sorted({k[0] for k in by}):
    d, t = by.get((n, "diskless"), []), by.get((n, "tgt"), [])
    for name, rs in (("diskless", d), ("tgt", t), ("diskless-plain", by.get((n, "diskless-plain"), []))):
        if not rs:
            continue
        ratio_t = ratio_c = ""
        if name.startswith("diskless") and rs and t:
            ratio_t = f"**{med(rs, 'last_done_s') / med(t, 'last_done_s'):.2f}**"
            ct = med(t, "cpu_ticks")
            ratio_c = f"{med(rs, 'cpu_ticks') / ct:.2f}" if ct else "-"
        print(f"| {n} | {name} | {med(rs, 'last_done_s'):.2f} | {med(rs, 'p50_us'):.0f} | {med(rs, 'p99_us'):.0f} "
              f"| {med(rs, 'mib'):.0f} | {med(rs, 'cpu_ticks') / tck:.2f} | {med(rs, 'hwm_kib') / 1024:.1f} | {med(rs, 'max_threads'):.0f} | {ratio_t} | {ratio_c} |")
PY
dl_log "table written to $OUT_DIR/bootstorm.md"
