#!/usr/bin/env bash
# Boot storm over RBD against the same storm on node-local persistent overlays, one node, side
# by side (tests/rbd_storm.rs, bench_rbd_storm): a real single-node Ceph (monitor, in-memory
# OSD, RADOS gateway) and etcd; N persistent clients whose disks are RBD clones of the golden
# image's snapshot (reads of golden regions go to Ceph), then N persistent clients on overlays
# over the same bytes in S3 (node chunk cache), alternating (round 1: first boots, the disks
# are created; later rounds: reboots). Each client replays tests/fixtures/boot-trace.txt,
# writes W 4 KiB blocks, syncs and logs out. Prints, per storm, its duration, the node's CPU,
# each Ceph daemon's CPU and Ceph's share, per-client boot times; then rbd/overlay ratios.
#
#   scripts/bench/rbdstorm.sh [--clients 20] [--rounds 3] [--writes 32] [--debug]
#
# Release build of the server (with the `rbd` feature) by default; --debug uses the debug
# build. Ceph, etcd, the node and the clients share this machine's cores: the figures compare
# the two disk kinds on one host (docs/scale-out.md, Sizing), they are not a network measurement.
set -euo pipefail

DL_NAME=rbdstorm.sh
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
ROOT=$(dl_repo_root)

CLIENTS=20
ROUNDS=3
WRITES=32
DEBUG=0

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

while (($#)); do
	case "$1" in
	--clients) CLIENTS=${2:?}; shift ;;
	--rounds) ROUNDS=${2:?}; shift ;;
	--writes) WRITES=${2:?}; shift ;;
	--debug) DEBUG=1 ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
	shift
done
for v in "$CLIENTS" "$ROUNDS"; do
	[[ $v =~ ^[1-9][0-9]*$ ]] || dl_die "--clients and --rounds must be positive integers"
done
[[ $WRITES =~ ^[0-9]+$ ]] || dl_die "--writes must be a number"

cd "$ROOT"
if ((DEBUG)); then
	unset DISKLESS_TEST_BIN
else
	dl_log "building diskless (release, --features rbd)"
	cargo build --release --quiet --features rbd --bin diskless || dl_die "release build failed"
	export DISKLESS_TEST_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/diskless
fi
cargo test --quiet --features rbd --test rbd_storm --no-run || dl_die "test build failed"

dl_log "storm: $CLIENTS clients, $ROUNDS round(s), $WRITES writes each"
out=$(DISKLESS_BENCH_CLIENTS=$CLIENTS DISKLESS_BENCH_ROUNDS=$ROUNDS DISKLESS_BENCH_WRITES=$WRITES \
	cargo test --quiet --features rbd --test rbd_storm bench_rbd_storm -- --ignored --nocapture 2>&1) ||
	{ printf '%s\n' "$out" >&2; dl_die "bench_rbd_storm failed"; }
grep '^measured:' <<<"$out" || { printf '%s\n' "$out" >&2; dl_die "no figures"; }
