#!/usr/bin/env bash
# What counting costs on the data path, in instructions (callgrind counts them exactly, so the
# answer does not depend on how busy this shared machine is): the server's instructions per
# 4 KiB random read with metrics (this checkout) against a build of BASE (default 2d2cfb5,
# the commit before metrics landed), both serving the same image under valgrind.
#
#   scripts/bench/metrics-cost.sh [--base REV] [--count 20000] [--keep]
#
# Each server runs twice: `qemu-img bench` issues COUNT and then COUNT/10 reads (depth 32); the
# difference of the two runs' totals divided by the difference in reads is the cost of one
# read, start-up and shutdown cancelled out. Prints both costs and their ratio.
set -euo pipefail

DL_NAME=metrics-cost.sh
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
ROOT=$(dl_repo_root)

BASE=2d2cfb5
COUNT=20000
KEEP=0
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
while (($#)); do
	case "$1" in
	--base) BASE=${2:?}; shift ;;
	--count) COUNT=${2:?}; shift ;;
	--keep) KEEP=1 ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
	shift
done
[[ $COUNT =~ ^[1-9][0-9]{2,}$ ]] || dl_die "--count must be an integer >= 100"
dl_require valgrind callgrind_annotate qemu-img git cargo truncate
dl_qemu_has_iscsi || dl_die "qemu-img has no working iSCSI driver (install qemu-block-extra)"

W=$(mktemp -d "${TMPDIR:-/tmp}/metrics-cost.XXXXXX")
SERVER_PID=""
cleanup() {
	[[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
	git -C "$ROOT" worktree remove --force "$W/base" 2>/dev/null || true
	((KEEP)) || rm -rf "$W"
}
trap cleanup EXIT

dl_log "building this checkout and $BASE (release)"
(cd "$ROOT" && cargo build --release --quiet --bin diskless)
git -C "$ROOT" worktree add --quiet --detach "$W/base" "$BASE"
# The base shares this checkout's target/ cache for its dependencies.
(cd "$W/base" && CARGO_TARGET_DIR=$ROOT/target/metrics-cost-base cargo build --release --quiet --bin diskless)
HEAD_BIN=$ROOT/target/release/diskless
BASE_BIN=$ROOT/target/metrics-cost-base/release/diskless

truncate -s 64M "$W/disk.img"
TARGET=iqn.2026-12.bench:metrics-cost

# ir BIN READS: total instructions of one server run serving READS 4 KiB random reads.
ir() {
	local bin=$1 reads=$2 port out
	port=$(dl_free_port)
	out=$W/cg.$$.$RANDOM
	valgrind --tool=callgrind --callgrind-out-file="$out" \
		"$bin" serve --image "$W/disk.img" --target "$TARGET" --listen "127.0.0.1:$port" --state-dir "$W/state" \
		>"$W/server.log" 2>&1 &
	SERVER_PID=$!
	dl_wait_port "$port" 120 || dl_die "server under valgrind did not listen (see $W/server.log)"
	qemu-img bench -q -c "$reads" -d 32 -s 4096 -S 4096 -t none \
		--image-opts "driver=iscsi,transport=tcp,portal=127.0.0.1:$port,target=$TARGET,lun=0" \
		>"$W/bench.log" 2>&1 || dl_die "qemu-img bench failed: $(cat "$W/bench.log")"
	kill -TERM "$SERVER_PID"
	wait "$SERVER_PID" 2>/dev/null || true
	SERVER_PID=""
	# callgrind writes "summary: N" (or "totals: N") with the Ir total.
	awk '/^(summary|totals):/ { print $2; exit }' "$out"
}

declare -A PER
for which in base head; do
	bin=$BASE_BIN
	[[ $which == head ]] && bin=$HEAD_BIN
	big=$(ir "$bin" "$COUNT")
	small=$(ir "$bin" $((COUNT / 10)))
	PER[$which]=$(((big - small) / (COUNT - COUNT / 10)))
	dl_log "$which: $big instructions for $COUNT reads, $small for $((COUNT / 10)): ${PER[$which]} per read"
done
python3 - "${PER[base]}" "${PER[head]}" "$BASE" <<'EOF'
import sys
base, head, rev = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
print(f"server instructions per 4 KiB read: without metrics ({rev}) {base}, with metrics {head}: "
      f"{(head - base) / base * 100:+.1f} %")
EOF
