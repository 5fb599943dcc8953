#!/usr/bin/env bash
# The same boot storm on one node and on a cluster of three: a real Ceph RGW holds the golden
# image (pushed with `diskless image push`), a real etcd places the clients, N raw clients
# replay tests/fixtures/boot-trace.txt and check every byte (tests/cluster_s3.rs, bench_storm).
# Prints, for each node count, the storm's duration and throughput, each node's CPU time,
# RSS before and after, S3 chunk GETs, and etcd's puts/ranges/deletes.
#
#   scripts/bench/cluster.sh [--clients 60] [--nodes "1 3"] [--debug]
#
# Release build of the server by default (DISKLESS_TEST_BIN); --debug uses the debug build.
# All nodes, Ceph and etcd share this machine's cores and loopback: the figures compare
# configurations on one host, they are not a network measurement (docs/scale-out.md, Sizing).
set -euo pipefail

DL_NAME=cluster.sh
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
ROOT=$(dl_repo_root)

CLIENTS=60
NODES="1 3"
DEBUG=0

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

while (($#)); do
	case "$1" in
	--clients) CLIENTS=${2:?}; shift ;;
	--nodes) NODES=${2:?}; shift ;;
	--debug) DEBUG=1 ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
	shift
done
[[ $CLIENTS =~ ^[1-9][0-9]*$ ]] || dl_die "--clients must be a positive integer"

cd "$ROOT"
if ((DEBUG)); then
	unset DISKLESS_TEST_BIN
else
	dl_log "building diskless (release)"
	cargo build --release --quiet --bin diskless || dl_die "release build failed"
	export DISKLESS_TEST_BIN=$ROOT/target/release/diskless
fi
cargo test --quiet --test cluster_s3 --no-run || dl_die "test build failed"

for n in $NODES; do
	[[ $n =~ ^[1-9][0-9]*$ ]] || dl_die "--nodes: $n is not a positive integer"
	dl_log "storm: $CLIENTS clients over $n node(s)"
	out=$(DISKLESS_BENCH_NODES=$n DISKLESS_BENCH_CLIENTS=$CLIENTS \
		cargo test --quiet --test cluster_s3 bench_storm -- --ignored --nocapture 2>&1) ||
		{ printf '%s\n' "$out" >&2; dl_die "bench_storm failed with $n node(s)"; }
	grep '^measured:' <<<"$out" || { printf '%s\n' "$out" >&2; dl_die "no figures"; }
done
