#!/usr/bin/env bash
# Memory cost of idle sessions: start diskless (release), log in N sessions that then sit idle
# (examples/bootstorm --idle N), and print the server's RSS before and after and the cost per
# session. Bar: 1000 idle sessions under 64 MiB of server RSS in total.
#
#   scripts/bench/idle-sessions.sh [--sessions 1000] [--mode "boot plain"]
#                                  [--scenario "login trace"] [--trace FILE]
#                                  [--client-args "--mrdsl 262144"] [--bin DIR]
#
# --mode boot: a boot target with a volatile default binding (a client overlay per session, as
# for diskless boot); plain: `serve --image` (one shared LUN). --scenario login: the sessions
# only log in; trace: each first replays tests/fixtures/boot-trace.txt as iPXE would (8 KiB
# Data-In PDUs), then idles (clients that booted). Every mode x scenario on a fresh server.
# --client-args: extra options for examples/bootstorm (e.g. another MaxRecvDataSegmentLength).
# --bin DIR: release builds of diskless and examples/bootstorm (default: cargo build).
set -euo pipefail

DL_NAME=idle-sessions.sh
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
ROOT=$(dl_repo_root)

SESSIONS=1000
MODES="boot plain"
SCENARIOS="login trace"
TRACE=$ROOT/tests/fixtures/boot-trace.txt
BIN_DIR=""
CLIENT_ARGS=""
BAR_KIB=$((64 * 1024))

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

while (($#)); do
	case "$1" in
	--sessions) SESSIONS=${2:?}; shift ;;
	--mode) MODES=${2:?}; shift ;;
	--scenario) SCENARIOS=${2:?}; shift ;;
	--trace) TRACE=${2:?}; shift ;;
	--client-args) CLIENT_ARGS=${2:?}; shift ;;
	--bin) BIN_DIR=${2:?}; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
	shift
done
[[ $SESSIONS =~ ^[1-9][0-9]*$ ]] || dl_die "--sessions must be a positive integer"

if [[ -z $BIN_DIR ]]; then
	dl_log "building diskless and examples/bootstorm (release)"
	(cd "$ROOT" && cargo build --release --quiet --bin diskless --example bootstorm) ||
		dl_die "cargo build --release failed"
	BIN_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
fi
BIN=$BIN_DIR/diskless
STORM=$BIN_DIR/examples/bootstorm
[[ -x $BIN ]] || dl_die "diskless binary not found at $BIN"
[[ -x $STORM ]] || dl_die "bootstorm example not found at $STORM"

# One socket per session on each side.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
(($(ulimit -n) > SESSIONS + 64)) || dl_die "open-file limit $(ulimit -n) is too low for $SESSIONS sessions"

mkdir -p "$ROOT/target/bench"
W=$(mktemp -d "$ROOT/target/bench/idle.XXXXXX")
DL_PID=""
CL_PID=""
stop() { # pid
	local p=$1
	[[ -n $p ]] && kill -0 "$p" 2>/dev/null || return 0
	kill -TERM "$p" 2>/dev/null || true
	for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
	kill -KILL "$p" 2>/dev/null || true
	wait "$p" 2>/dev/null || true
}
cleanup() {
	stop "$CL_PID"
	stop "$DL_PID"
	rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

# Random data covering the trace's LBAs (a sparse file would read as zeros just the same, but
# keep it honest); page-cache warm.
IMG=$W/golden.img
head -c $((64 << 20)) /dev/urandom >"$IMG"
need=$(awk '!/^#/ && NF == 2 { e = ($1 + $2) * 512; if (e > m) m = e } END { print m + 0 }' "$TRACE")
((need <= 64 << 20)) || dl_die "the trace reads beyond the 64 MiB image"

kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
# Anonymous memory from smaps_rollup: heap, thread stacks, mmapped buffers.
anon_kib() { awk '$1 == "Anonymous:" {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }

ROWS=()
FAIL=0
for case_ in $(for m in $MODES; do for s in $SCENARIOS; do echo "$m:$s"; done; done); do
	mode=${case_%:*}
	scenario=${case_#*:}
	case $scenario in
	login) EXTRA=() ;;
	trace) EXTRA=(--trace "$TRACE") ;;
	*) dl_die "--scenario: unknown scenario '$scenario' (login or trace)" ;;
	esac
	case $mode in
	boot)
		IQN=iqn.2026-11.org.diskless:idle
		mkdir -p "$W/state-$mode-$scenario"
		cat >"$W/$mode-$scenario.yaml" <<EOF
state_dir: $W/state-$mode-$scenario
images:
  - {name: base, path: $IMG}
targets:
  - name: $IQN
    initiators: ["*"]
    boot:
      default: {image: base, mode: volatile}
EOF
		ARGS=(serve -c "$W/$mode-$scenario.yaml")
		;;
	plain)
		IQN=iqn.2026-11.org.diskless:golden
		ARGS=(serve --image "$IMG")
		;;
	*) dl_die "--mode: unknown mode '$mode' (boot or plain)" ;;
	esac
	"$BIN" --log warn "${ARGS[@]}" --listen 127.0.0.1:0 >"$W/$mode-$scenario.out" 2>"$W/$mode-$scenario.err" &
	DL_PID=$!
	PORT=""
	for ((i = 0; i < 300; i++)); do
		PORT=$(sed -n 's/^diskless: listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$W/$mode-$scenario.out" | head -n1 || true)
		[[ -n $PORT ]] && break
		kill -0 "$DL_PID" 2>/dev/null || { tail -n 20 "$W/$mode-$scenario.err" >&2; dl_die "diskless exited during startup"; }
		sleep 0.1
	done
	[[ -n $PORT ]] || dl_die "diskless did not print 'diskless: listening on'"
	sleep 1
	rss0=$(kib "$DL_PID" VmRSS)
	anon0=$(anon_kib "$DL_PID")

	# shellcheck disable=SC2086 # CLIENT_ARGS is a list of options
	"$STORM" --portal "127.0.0.1:$PORT" --target "$IQN" --idle "$SESSIONS" "${EXTRA[@]}" $CLIENT_ARGS \
		--initiator-prefix "iqn.2026-11.test:idle-$mode-$scenario-" >"$W/$mode-$scenario.client" 2>&1 &
	CL_PID=$!
	for ((i = 0; i < 6000; i++)); do
		grep -qs '^RESULT ' "$W/$mode-$scenario.client" && break
		kill -0 "$CL_PID" 2>/dev/null || { cat "$W/$mode-$scenario.client" >&2; dl_die "bootstorm --idle exited"; }
		sleep 0.1
	done
	res=$(grep '^RESULT ' "$W/$mode-$scenario.client") || dl_die "no sessions after 600 s"
	[[ $res == *" failed=0 "* ]] || { cat "$W/$mode-$scenario.client" >&2; dl_die "some idle logins failed"; }
	# Let the server settle (login tasks finish, allocator caches stay as they are).
	sleep 3
	rss1=$(kib "$DL_PID" VmRSS)
	hwm1=$(kib "$DL_PID" VmHWM)
	anon1=$(anon_kib "$DL_PID")
	threads=$(kib "$DL_PID" Threads)
	client_rss=$(kib "$CL_PID" VmRSS)
	per=$(((rss1 - rss0) * 1024 / SESSIONS))
	verdict=pass
	((rss1 < BAR_KIB)) || { verdict=FAIL; FAIL=1; }
	dl_log "$mode/$scenario: $SESSIONS sessions, server RSS $rss0 -> $rss1 KiB (peak $hwm1), anonymous $anon0 -> $anon1 KiB, $threads threads, $per bytes per session: $verdict"
	ROWS+=("| $mode | $scenario | $SESSIONS | $((rss0 / 1024)).$(((rss0 % 1024) * 10 / 1024)) | $((rss1 / 1024)).$(((rss1 % 1024) * 10 / 1024)) | $((hwm1 / 1024)) | $(((anon1 - anon0) / 1024)) | $((per / 1024)).$(((per % 1024) * 10 / 1024)) | $threads | $((client_rss / 1024)) | $verdict |")
	stop "$CL_PID"
	CL_PID=""
	stop "$DL_PID"
	DL_PID=""
done

echo "| mode | scenario | sessions | server RSS before MiB | server RSS with sessions MiB | peak MiB | anonymous growth MiB | per session KiB | server threads | client RSS MiB | under 64 MiB |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
printf '%s\n' "${ROWS[@]}"
exit "$FAIL"
