#!/usr/bin/env bash
# Boot storm on a flat image against the same storm on a version ten commits deep
# (issue 11: a read through a version chain costs one merged-map lookup, whatever the depth).
# One server, two boot targets: `flat` (version 1 only) and `deep` (version 1 + 10 layers,
# each rewriting 2 % of the 4 KiB chunks in runs of 1 to --run chunks at random places; --run 1
# scatters single chunks, the worst case). For each N, 2 x --rounds storms alternate strictly
# flat, deep, flat, deep... (ABAB); each client replays the recorded boot read trace --passes
# times in its session, so that one storm lasts seconds, not 0.3 s. The table gives, per N,
# the median over all adjacent (flat, deep) pairs of deep/flat storm time and of deep/flat
# server CPU time (utime+stime from /proc/PID/stat around each storm: far steadier than wall
# time on a shared machine), with the spread of the pair ratios.
# With materialization on (settings.materialize_depth, default 4 here as in the server), a
# first storm on `deep` runs while its flat copy is written (reported as "during copy"), then
# the timed rounds start once the server logs "version materialized"; deep's chain files are
# then dropped from the page cache and, after the rounds, `fincore` shows how much of them the
# timed storms read back (about 0 when reads go to the flat copy). --materialize-depth 0
# measures the chain itself.
#
#   scripts/bench/versions.sh [--clients "32 128"] [--rounds 10] [--passes 3] [--layers 10]
#                             [--run 32] [--materialize-depth 4] [--materialize-rate 64MiB]
#                             [--bin DIR] [--keep]
set -euo pipefail

DL_NAME=versions.sh
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
ROOT=$(dl_repo_root)

CLIENTS="32 128"
ROUNDS=10
PASSES=3
LAYERS=10
RUN=32
TRACE=$ROOT/tests/fixtures/boot-trace.txt
BIN_DIR=""
KEEP=0
OUT_DIR=$ROOT/target/bench
IMG_SIZE=$((256 << 20))
MDEPTH=4
MRATE=64MiB

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
while (($#)); do
	case "$1" in
	--clients) CLIENTS=${2:?}; shift ;;
	--rounds) ROUNDS=${2:?}; shift ;;
	--passes) PASSES=${2:?}; shift ;;
	--layers) LAYERS=${2:?}; shift ;;
	--run) RUN=${2:?}; shift ;;
	--materialize-depth) MDEPTH=${2:?}; shift ;;
	--materialize-rate) MRATE=${2:?}; shift ;;
	--bin) BIN_DIR=${2:?}; shift ;;
	--keep) KEEP=1 ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
	shift
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || dl_die "--rounds must be a positive integer"
[[ $PASSES =~ ^[1-9][0-9]*$ ]] || dl_die "--passes must be a positive integer"
[[ $LAYERS =~ ^[0-9]+$ ]] || dl_die "--layers must be a number"
[[ $MDEPTH =~ ^[0-9]+$ ]] || dl_die "--materialize-depth must be a number"
for n in $CLIENTS; do [[ $n =~ ^[1-9][0-9]*$ ]] || dl_die "--clients: '$n' is not a positive integer"; done
[[ -f $TRACE ]] || dl_die "no trace at $TRACE"
dl_require python3 mktemp timeout qemu-img fincore dd

if [[ -z $BIN_DIR ]]; then
	dl_log "building diskless, examples/bootstorm and examples/mklayers (release)"
	(cd "$ROOT" && cargo build --release --quiet --bin diskless --example bootstorm --example mklayers) ||
		dl_die "cargo build --release failed"
	BIN_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
fi
BIN=$BIN_DIR/diskless
STORM=$BIN_DIR/examples/bootstorm
MKL=$BIN_DIR/examples/mklayers
for b in "$BIN" "$STORM" "$MKL"; do [[ -x $b ]] || dl_die "$b not found"; done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

mkdir -p "$OUT_DIR"
W=$(mktemp -d "$OUT_DIR/versions.XXXXXX")
DL_PID=""
cleanup() {
	if [[ -n $DL_PID ]] && kill -0 "$DL_PID" 2>/dev/null; then
		kill -TERM "$DL_PID" 2>/dev/null || true
		for _ in $(seq 1 50); do kill -0 "$DL_PID" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$DL_PID" 2>/dev/null || true
	fi
	if ((KEEP)); then dl_log "kept raw results in $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

# --- images: one random 256 MiB base imported twice; `deep` gets the layers ------------------
dl_log "creating the 256 MiB base and importing it as flat and deep"
head -c "$IMG_SIZE" /dev/urandom >"$W/base.raw"
"$BIN" image import flat "$W/base.raw" --format raw --state-dir "$W/state" >/dev/null
"$BIN" image import deep "$W/base.raw" --format raw --state-dir "$W/state" >/dev/null
rm -f "$W/base.raw"
[[ $RUN =~ ^[1-9][0-9]*$ ]] || dl_die "--run must be a positive integer"
"$MKL" "$W/state" deep "$LAYERS" 2 "$RUN" | tail -n 1 >&2
# Both read from the page cache: warm every version file (not dropped; both start equal).
cat "$W"/state/images/*/v* >/dev/null

cat >"$W/targets.yaml" <<EOF
state_dir: $W/state
targets:
  - name: iqn.2026-11.org.diskless:flat
    initiators: ["*"]
    boot:
      default: {image: flat, mode: volatile}
  - name: iqn.2026-11.org.diskless:deep
    initiators: ["*"]
    boot:
      default: {image: deep, mode: volatile}
settings:
  max_sessions: 4096
  materialize_depth: $MDEPTH
  materialize_rate: $MRATE
EOF
"$BIN" --log warn,diskless::storage::versions=info serve -c "$W/targets.yaml" --listen 127.0.0.1:0 >"$W/dl.out" 2>"$W/dl.err" &
DL_PID=$!
PORT=""
for ((i = 0; i < 300; i++)); do
	PORT=$(sed -n 's/^diskless: listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$W/dl.out" | head -n1 || true)
	[[ -n $PORT ]] && break
	kill -0 "$DL_PID" 2>/dev/null || { tail -n 20 "$W/dl.err" >&2; dl_die "diskless exited during startup"; }
	sleep 0.1
done
[[ -n $PORT ]] || dl_die "diskless did not print 'diskless: listening on'"

RESULTS=$W/results.tsv
printf 'seq\tround\tclients\timage\tlast_done_s\tp50_us\tp99_us\tcpu_ticks\n' >"$RESULTS"
SEQ=0
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run_one() { # round clients image
	local r=$1 n=$2 img=$3 c0 c1 res kv
	SEQ=$((SEQ + 1))
	c0=$(cpu_ticks "$DL_PID")
	timeout 900 "$STORM" --portal "127.0.0.1:$PORT" --target "iqn.2026-11.org.diskless:$img" --lun 0 \
		--clients "$n" --trace "$TRACE" --passes "$PASSES" --initiator-prefix "iqn.2026-11.test:v-r$r-n$n-$img-" \
		>"$W/out" 2>"$W/err" || { cat "$W/out" "$W/err" >&2; dl_die "storm on $img failed"; }
	c1=$(cpu_ticks "$DL_PID")
	res=$(grep '^RESULT ' "$W/out") || dl_die "no RESULT line from bootstorm"
	kv=${res#RESULT }
	get() { tr ' ' '\n' <<<"$kv" | sed -n "s/^$1=//p"; }
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$SEQ" "$r" "$n" "$img" "$(get last_done_s)" "$(get p50_us)" \
		"$(get p99_us)" "$((c1 - c0))" >>"$RESULTS"
	dl_log "round $r, $n clients, $img: last done $(get last_done_s) s, p50 $(get p50_us) µs, $((c1 - c0)) CPU ticks"
	sleep 1
}
# The first read of `deep` starts its flat copy (when its depth reaches --materialize-depth):
# one storm runs during the copy (round 0), then the timed rounds wait for the copy.
if ((MDEPTH > 0 && LAYERS >= MDEPTH)); then
	first=${CLIENTS%% *}
	run_one 0 "$first" deep
	dl_log "waiting for the flat copy of deep (log: version materialized)"
	for ((i = 0; i < 6000; i++)); do
		grep -q 'version materialized' "$W/dl.err" && break
		grep -q 'materializing a flat copy failed' "$W/dl.err" && { tail -n 5 "$W/dl.err" >&2; dl_die "the flat copy failed"; }
		kill -0 "$DL_PID" 2>/dev/null || dl_die "diskless exited"
		sleep 0.1
	done
	grep -q 'version materialized' "$W/dl.err" || dl_die "no flat copy of deep after 600 s"
	grep 'version materialized' "$W/dl.err" | tail -n 1 | sed 's/^/  /' >&2
fi
# The files the timed storms read, cached alike: each dropped from the page cache and read
# once by `cat` (the import's writes and the flat copy's copy_file_range leave folios of other
# sizes, and a read's cost depends on the folios it meets: docs/performance.md, "Third round").
# With a flat copy, deep's chain (base and layers) is left out of the cache, so that what the
# timed storms read from it shows in `fincore` afterwards (nothing, when reads go to the copy).
chain_files() { find "$W/state/images/deep" -maxdepth 1 \( -name '*.base' -o -name '*.layer' \) -print; }
chain_resident() { chain_files | xargs fincore --bytes --noheadings --output RES | awk '{s += $1} END {print s + 0}'; }
evict() { for f; do dd if="$f" iflag=nocache count=0 status=none; done; }
sync
MATERIALIZED=0
((MDEPTH > 0 && LAYERS >= MDEPTH)) && MATERIALIZED=1
if ((MATERIALIZED)); then
	TIMED_FILES="$W/state/images/flat/v1.base $(echo "$W"/state/images/deep/flat/*.flat)"
	# shellcheck disable=SC2046
	evict $(chain_files)
	dl_log "deep's chain files resident before the timed rounds: $(chain_resident) bytes"
else
	TIMED_FILES="$W/state/images/flat/v1.base $(chain_files | tr '\n' ' ')"
fi
# shellcheck disable=SC2086
evict $TIMED_FILES
# shellcheck disable=SC2086
cat $TIMED_FILES >/dev/null
# Strictly alternating storms, flat first: flat deep flat deep ... for each N.
for n in $CLIENTS; do
	for ((r = 1; r <= ROUNDS; r++)); do
		for img in flat deep; do run_one "$r" "$n" "$img"; done
	done
done
CHAIN_READ=-1
if ((MATERIALIZED)); then
	CHAIN_READ=$(chain_resident)
	dl_log "deep's chain files resident after the timed rounds: $CHAIN_READ bytes (read by the storms)"
fi

python3 - "$RESULTS" "$(getconf CLK_TCK)" "$LAYERS" "$PASSES" "$CHAIN_READ" <<'PY' | tee "$OUT_DIR/versions.md"
import csv, statistics, sys
allrows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
rows = [r for r in allrows if r["round"] != "0"]
during = [r for r in allrows if r["round"] == "0"]
tck, layers, passes, chain_read = int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
med = lambda rs, k: statistics.median(float(r[k]) for r in rs)
def pairs(n):
    """deep/flat ratios of every adjacent (flat, deep) pair in the run order (ABAB: half the
    pairs have flat first, half deep first), for storm time and server CPU."""
    seq = sorted((r for r in rows if int(r["clients"]) == n), key=lambda r: int(r["seq"]))
    t, c = [], []
    for a, b in zip(seq, seq[1:]):
        if a["image"] == b["image"]:
            continue
        f, d = (a, b) if a["image"] == "flat" else (b, a)
        t.append(float(d["last_done_s"]) / float(f["last_done_s"]))
        if int(f["cpu_ticks"]) > 0:
            c.append(int(d["cpu_ticks"]) / int(f["cpu_ticks"]))
    return t, c
span = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}" if xs else "-"
print(f"Each client replays the trace {passes} times; medians over the rounds; pair ratios: median "
      "(range) over all adjacent flat/deep storms.")
print()
print("| clients | image | storms | last done s | p50 µs | p99 µs | server CPU s | deep/flat time, pairs | deep/flat CPU, pairs |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
for n in sorted({int(r["clients"]) for r in rows}):
    f = [r for r in rows if int(r["clients"]) == n and r["image"] == "flat"]
    d = [r for r in rows if int(r["clients"]) == n and r["image"] == "deep"]
    t, c = pairs(n)
    for name, rs in (("flat", f), (f"{layers} layers", d)):
        rt = f"**{statistics.median(t):.3f}** ({span(t)}, {len(t)} pairs)" if name != "flat" and t else ""
        rc = f"**{statistics.median(c):.3f}** ({span(c)})" if name != "flat" and c else ""
        print(f"| {n} | {name} | {len(rs)} | {med(rs, 'last_done_s'):.3f} | {med(rs, 'p50_us'):.0f} | {med(rs, 'p99_us'):.0f} | {med(rs, 'cpu_ticks') / tck:.2f} | {rt} | {rc} |")
    for r in (x for x in during if int(x["clients"]) == n):
        print(f"| {n} | {layers} layers, during its flat copy (1 storm) | 1 | {float(r['last_done_s']):.3f} | {float(r['p50_us']):.0f} | {float(r['p99_us']):.0f} | {int(r['cpu_ticks']) / tck:.2f} | {float(r['last_done_s']) / med(f, 'last_done_s'):.3f} (vs flat median) | |")
if chain_read >= 0:
    print()
    print(f"Bytes of deep's chain files (base + layers) the timed storms brought into the page cache: {chain_read}")
PY
dl_log "table written to $OUT_DIR/versions.md"
