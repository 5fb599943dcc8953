#!/usr/bin/env bash
# Run the whole libiscsi conformance suite (iscsi-test-cu) against a freshly started target on a
# loopback port and report one result per test.
#
#   scripts/conformance.sh [--target-cmd diskless|tgt] [--update-docs] [--min-pass N]
#                          [--max-fail N] [--suites "SCSI.Read10 iSCSI.iSCSITMF"] [--bin PATH]
#                          [--docs-file PATH] [--keep] [--verbose]
#
# Exit status: 0 when no test FAILED or HUNG (beyond --max-fail), no expected test went missing,
# and at least --min-pass tests passed; 1 otherwise; 2 on bad usage.
set -euo pipefail

DL_NAME=conformance.sh
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$(dl_repo_root)

TARGET_CMD=diskless
UPDATE_DOCS=0
MIN_PASS=${CONFORMANCE_MIN_PASS:-200} # a regression guard: diskless should pass well above tgt's 160
MAX_FAIL=${CONFORMANCE_MAX_FAIL:-0}   # FAILED + HUNG + MISSING tests tolerated
# No new "Test:" line for this long = HUNG. SCSI.Sanitize.Reset alone takes about 65 s: it
# polls TEST UNIT READY every 60 s until the sanitize it started has ended.
STALL_SECS=${CONFORMANCE_STALL_SECS:-100}
SUITE_SECS=${CONFORMANCE_SUITE_SECS:-600}   # hard cap for one suite process
SUITES=""
BIN=""
DOCS_FILE="$ROOT/docs/conformance.md"
KEEP=0
VERBOSE=0
INIT1=iqn.2026-11.test:init1
INIT2=iqn.2026-11.test:init2
RW_IQN=iqn.2026-11.test:conformance-rw
RO_IQN=iqn.2026-11.test:conformance-ro
E512_IQN=iqn.2026-11.test:conformance-512e
# Suites with tests that need several logical blocks per physical block (LBPPB >= 2): run
# against a 512e LUN (4096-byte physical over 512-byte logical blocks) where the target has one.
E512_SUITES=" SCSI.CompareAndWrite SCSI.WriteSame10 SCSI.WriteSame16 "
IMG_SIZE=64M

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }

while (($#)); do
	case "$1" in
	--target-cmd) TARGET_CMD=${2:?}; shift ;;
	--target-cmd=*) TARGET_CMD=${1#*=} ;;
	--update-docs) UPDATE_DOCS=1 ;;
	--min-pass) MIN_PASS=${2:?}; shift ;;
	--max-fail) MAX_FAIL=${2:?}; shift ;;
	--suites) SUITES=${2:?}; shift ;;
	--bin) BIN=${2:?}; shift ;;
	--docs-file) DOCS_FILE=${2:?}; shift ;;
	--stall-secs) STALL_SECS=${2:?}; shift ;;
	--keep) KEEP=1 ;;
	--verbose | -v) VERBOSE=1 ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
	shift
done

dl_require iscsi-test-cu iscsi-ls timeout stdbuf truncate mktemp
case "$TARGET_CMD" in
diskless)
	if [[ -z $BIN ]]; then
		BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/diskless
	fi
	[[ -x $BIN ]] || dl_die "diskless binary not found at $BIN (run cargo build, or pass --bin)"
	;;
tgt) dl_require tgtd tgtadm ;;
*) dl_die "--target-cmd must be diskless or tgt, not '$TARGET_CMD'" ;;
esac

W=$(mktemp -d /tmp/diskless-conformance.XXXXXX)
TARGET_PID=""
TGT_CTL=""
SUITE_PID=""
cleanup() {
	if [[ -n $SUITE_PID ]]; then kill -TERM "$SUITE_PID" 2>/dev/null || true; fi
	if [[ -n $TGT_CTL ]] && kill -0 "$TARGET_PID" 2>/dev/null; then
		# tgtd ignores SIGTERM while it has targets; ask it to shut down instead.
		tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op delete --force --tid 1 >/dev/null 2>&1 || true
		tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op delete --force --tid 2 >/dev/null 2>&1 || true
		tgtadm -C "$TGT_CTL" --mode system --op delete >/dev/null 2>&1 || true
	fi
	if [[ -n $TARGET_PID ]] && kill -0 "$TARGET_PID" 2>/dev/null; then
		kill -TERM "$TARGET_PID" 2>/dev/null || true
		for _ in $(seq 1 50); do kill -0 "$TARGET_PID" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$TARGET_PID" 2>/dev/null || true
	fi
	if [[ -n $TGT_CTL ]]; then rm -f "/var/run/tgtd/socket.$TGT_CTL" "/var/run/tgtd/socket.$TGT_CTL.lock"; fi
	if ((KEEP)); then dl_log "kept scratch dir $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

mkdir -p "$W/logs"
truncate -s "$IMG_SIZE" "$W/rw.img"
truncate -s 16M "$W/ro.img"
truncate -s "$IMG_SIZE" "$W/e512.img"

start_diskless() {
	# Our server binds port 0 and announces the real port (planned CLI contract).
	# SANITIZE OVERWRITE paced to about 13 s for the 64 MiB LUN: SCSI.Sanitize.Reset checks
	# that it is still running 3 s after it started and again after a reconnect.
	cat >"$W/targets.yaml" <<YAML
portals: ["127.0.0.1:0"]
settings: {sanitize_overwrite_rate: 5MiB}
targets:
  - name: $RW_IQN
    initiators: ["*"]
    luns:
      - {lun: 0, image: $W/rw.img, read_only: false, block_size: 512, thin: true, removable: true}
  - name: $RO_IQN
    initiators: ["*"]
    luns:
      - {lun: 0, image: $W/ro.img, read_only: true, block_size: 512}
  - name: $E512_IQN
    initiators: ["*"]
    luns:
      - {lun: 0, image: $W/e512.img, read_only: false, block_size: 512, physical_block_size: 4096, thin: true, removable: true}
YAML
	# Create the files first: the child opens them after fork, the poll below may run before.
	: >"$W/target.out"
	: >"$W/target.err"
	"$BIN" serve -c "$W/targets.yaml" --listen 127.0.0.1:0 >"$W/target.out" 2>"$W/target.err" &
	TARGET_PID=$!
	local i
	for ((i = 0; i < 300; i++)); do
		PORT=$(sed -n 's/^diskless: listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$W/target.out" | head -n1 || true)
		[[ -n $PORT ]] && break
		kill -0 "$TARGET_PID" 2>/dev/null || { tail -n 20 "$W/target.err" >&2; dl_die "diskless exited during startup"; }
		sleep 0.1
	done
	[[ -n $PORT ]] || { tail -n 20 "$W/target.err" >&2; dl_die "diskless did not print 'diskless: listening on' within 30 s"; }
	RW_URL="iscsi://127.0.0.1:$PORT/$RW_IQN/0"
	RO_URL="iscsi://127.0.0.1:$PORT/$RO_IQN/0"
	E512_URL="iscsi://127.0.0.1:$PORT/$E512_IQN/0"
}

start_tgt() {
	# tgtd cannot bind port 0: pick a free one, and a private control port so a tgtd that is
	# already running on this machine is left alone.
	PORT=$(dl_free_port)
	dl_start_tgtd "$PORT" "$W/target"
	TARGET_PID=$TGT_PID
	local A=(tgtadm -C "$TGT_CTL" --lld iscsi)
	# tgt puts a controller at LUN 0; the disk is LUN 1.
	"${A[@]}" --op new --mode target --tid 1 -T "$RW_IQN"
	"${A[@]}" --op new --mode logicalunit --tid 1 --lun 1 -b "$W/rw.img"
	"${A[@]}" --op bind --mode target --tid 1 -I ALL
	"${A[@]}" --op new --mode target --tid 2 -T "$RO_IQN"
	"${A[@]}" --op new --mode logicalunit --tid 2 --lun 1 -b "$W/ro.img"
	"${A[@]}" --op update --mode logicalunit --tid 2 --lun 1 --params readonly=1
	"${A[@]}" --op bind --mode target --tid 2 -I ALL
	RW_URL="iscsi://127.0.0.1:$PORT/$RW_IQN/1"
	RO_URL="iscsi://127.0.0.1:$PORT/$RO_IQN/1"
	E512_URL=$RW_URL # tgt has no 512e setting: those tests skip there
}

"start_$TARGET_CMD"
dl_log "target $TARGET_CMD (pid $TARGET_PID) on 127.0.0.1:$PORT; scratch $W"
iscsi-ls -i "$INIT1" "iscsi://127.0.0.1:$PORT" >"$W/discovery.txt" 2>&1 ||
	{ cat "$W/discovery.txt" >&2; dl_die "SendTargets discovery failed; not running the suite"; }

# The suite list in the tool's own order (LUNResetSimpleAsync depends on running after its
# siblings, see docs/testing.md), with the number of tests each one should report.
iscsi-test-cu --list >"$W/list.txt"
if [[ -z $SUITES ]]; then
	SUITES=$(grep -E '^(SCSI|iSCSI)\.[^.]+$' "$W/list.txt" | tr '\n' ' ')
fi

# Turn one suite's text output into "NAME<TAB>RESULT<TAB>DETAIL" lines.
# CUnit prints "Test: NAME ..." then any log lines, then "passed" or "FAILED"; libiscsi marks a
# skip as a passed test that printed "[SKIPPED] why". A test left open (watchdog or timeout
# marker, or end of output) is HUNG.
parse_log() {
	awk -v fam="$1" '
	function finish(res) {
		if (cur == "") return
		n++; name[n] = fam "." suite "." cur; result[n] = res
		det[n] = (res == "FAILED") ? faildet : (res == "SKIPPED") ? skipdet : hungdet
		want_assert = (res == "FAILED" && faildet == "") ? n : 0
		cur = ""
	}
	# The verdict is printed right after "..." or at the start of a line; log messages are
	# indented, and teardown messages may follow "passed" on the same line.
	function handle(t,   d) {
		if (t ~ /^(passed|FAILED)([ \t]|$)/) {
			res = substr(t, 1, 6)
			if (res == "passed") finish(skipped ? "SKIPPED" : "PASSED"); else finish("FAILED")
			return
		}
		if (t ~ /\[SKIPPED\]/) { skipped = 1; if (skipdet == "") { d = t; sub(/^.*\[SKIPPED\][ \t]*/, "", d); skipdet = d } }
		if (t ~ /\[FAILED\]/ && faildet == "") { d = t; sub(/^.*\[FAILED\][ \t]*/, "", d); faildet = d }
	}
	/^DISKLESS-HUNG/ { d = $0; sub(/^DISKLESS-HUNG[ \t]*/, "", d); if (cur != "") { hungdet = d; finish("HUNG") } next }
	/^[ \t]*Suite: / { s = $0; sub(/^[ \t]*Suite: /, "", s); split(s, a, /[ \t]/); suite = a[1]; next }
	/^[ \t]*Test: / {
		if (cur != "") { hungdet = "no result printed"; finish("HUNG") }
		t = $0; sub(/^[ \t]*Test: /, "", t)
		cur = t; sub(/ \.\.\..*$/, "", cur)
		rest = t; sub(/^[^ ]* \.\.\./, "", rest)
		skipped = 0; skipdet = ""; faildet = ""; hungdet = ""; want_assert = 0
		handle(rest); next
	}
	cur != "" { handle($0); next }
	want_assert && /^[ \t]+[0-9]+\. / { d = $0; sub(/^[ \t]+/, "", d); det[want_assert] = d; want_assert = 0 }
	END {
		if (cur != "") { hungdet = "output ended inside the test"; finish("HUNG") }
		for (i = 1; i <= n; i++) { gsub(/\t/, " ", det[i]); printf "%s\t%s\t%s\n", name[i], result[i], det[i] }
	}' "$2"
}

# Run one suite with a progress watchdog; append its results to $W/results.tsv.
run_suite() {
	local suite=$1 url=$2 log="$W/logs/$1.log" fifo="$W/fifo" pid line hung="" last rc left
	local urls=("$url" "$url")
	# The URL twice makes the tool's second initiator a persistent second path (MultipathIO).
	# SCSI.Sanitize.Reservations leaves that path's RESERVE(6) in place for the tests after it
	# (Reset then only sees RESERVATION CONFLICT); with the URL once the tool logs the second
	# initiator in per test and out again, which releases it.
	if [[ $suite == SCSI.Sanitize ]]; then urls=("$url"); fi
	rm -f "$fifo"
	mkfifo "$fifo"
	timeout -k 5 "$SUITE_SECS" stdbuf -o0 -e0 iscsi-test-cu -i "$INIT1" -I "$INIT2" --dataloss -S \
		-t "$suite" "${urls[@]}" >"$fifo" 2>&1 &
	pid=$!
	SUITE_PID=$pid
	exec 4<"$fifo"
	last=$SECONDS
	while :; do
		left=$((STALL_SECS - (SECONDS - last)))
		if ((left <= 0)); then hung="no new test line for ${STALL_SECS}s"; break; fi
		if IFS= read -r -t "$left" -u 4 line; then
			printf '%s\n' "$line" >>"$log"
			((VERBOSE)) && printf '%s\n' "$line"
			[[ $line =~ ^[[:space:]]*Test:\  ]] && last=$SECONDS
		else
			if (($? > 128)); then
				# On a timeout read keeps the unterminated "Test: NAME ..." line: log it so the
				# parser knows which test hung.
				hung="no new test line for ${STALL_SECS}s"
				[[ -n $line ]] && printf '%s\n' "$line" >>"$log"
			fi
			break
		fi
	done
	if [[ -n $hung ]]; then kill -TERM "$pid" 2>/dev/null || true; fi
	exec 4<&-
	rc=0
	wait "$pid" || rc=$?
	SUITE_PID=""
	rm -f "$fifo"
	if [[ -z $hung && $rc -eq 124 ]]; then hung="suite exceeded ${SUITE_SECS}s"; fi
	if [[ -n $hung ]]; then printf 'DISKLESS-HUNG %s\n' "$hung" >>"$log"; fi
	touch "$log"
	local fam=${suite%%.*} got expected t
	parse_log "$fam" "$log" >"$W/suite.tsv"
	cat "$W/suite.tsv" >>"$W/results.tsv"
	# Every test the tool lists for this suite must report a result; anything else is MISSING
	# (for example the process died or could not log in: exit 255).
	expected=$(grep -E "^${suite//./\\.}\.[^.]+$" "$W/list.txt" || true)
	for t in $expected; do
		got=$(cut -f1 "$W/suite.tsv" | grep -Fx -- "$t" || true)
		[[ -n $got ]] || printf '%s\tMISSING\tno result (iscsi-test-cu exit %s)\n' "$t" "$rc" >>"$W/results.tsv"
	done
	printf '%-34s rc=%-3s %s\n' "$suite" "$rc" "$(cut -f2 "$W/suite.tsv" | sort | uniq -c | tr -s ' \n' ' ')" >&2
}

: >"$W/results.tsv"
START=$SECONDS
for suite in $SUITES; do
	kill -0 "$TARGET_PID" 2>/dev/null || { dl_log "target died before $suite"; tail -n 20 "$W/target.err" >&2; }
	# Only ReadOnly tests need a write-protected LU (libiscsi reads the WP bit of MODE SENSE);
	# Sanitize.Readonly sets software write protect itself on the writable LU.
	if [[ $suite == SCSI.ReadOnly ]]; then
		run_suite "$suite" "$RO_URL"
	elif [[ $E512_SUITES == *" $suite "* ]]; then
		run_suite "$suite" "$E512_URL"
	else
		run_suite "$suite" "$RW_URL"
	fi
done
ELAPSED=$((SECONDS - START))

count() { awk -F'\t' -v r="$1" '$2 == r' "$W/results.tsv" | wc -l; }
TOTAL=$(wc -l <"$W/results.tsv")
PASSED=$(count PASSED)
FAILED=$(count FAILED)
SKIPPED=$(count SKIPPED)
HUNG=$(count HUNG)
MISSING=$(count MISSING)
BAD=$((FAILED + HUNG + MISSING))

echo
echo "Non-passing tests:"
awk -F'\t' '$2 != "PASSED" { printf "  %-8s %-55s %s\n", $2, $1, $3 }' "$W/results.tsv"
echo
SUMMARY="conformance ($TARGET_CMD): $TOTAL tests: $PASSED passed, $FAILED failed, $HUNG hung, $MISSING missing, $SKIPPED skipped in ${ELAPSED}s"
echo "$SUMMARY"
if [[ -n ${CONFORMANCE_RESULTS:-} ]]; then cp "$W/results.tsv" "$CONFORMANCE_RESULTS"; fi

if ((UPDATE_DOCS)); then
	mkdir -p "$(dirname "$DOCS_FILE")"
	# Keep hand-written reasons by test name: they explain a result better than the tool's message.
	declare -A REASON=()
	if [[ -f $DOCS_FILE ]]; then
		while IFS=$'\t' read -r n r; do REASON[$n]=$r; done < <(
			awk '/^\| *`?(SCSI|iSCSI)\./ {
				l = $0; sub(/^\| *`?/, "", l)
				n = l; sub(/[` |].*$/, "", n)
				r = l; sub(/^[^|]*\|[^|]*\| */, "", r); sub(/ *\|[ \t]*$/, "", r); gsub(/\\\|/, "|", r)
				print n "\t" r
			}' "$DOCS_FILE")
	fi
	LIBISCSI_VER=$(dpkg-query -W -f '${Version}' libiscsi-bin 2>/dev/null || echo unknown)
	REV=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
	{
		echo "# libiscsi conformance results"
		echo
		echo "Generated by \`scripts/conformance.sh --target-cmd $TARGET_CMD --update-docs\`. Edit only the"
		echo "Reason column: reasons are kept by test name when the file is regenerated."
		echo
		echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'), revision \`$REV\`, libiscsi-bin $LIBISCSI_VER"
		echo "- Target: \`$TARGET_CMD\`, LUN: 64 MiB thin, removable, 512-byte blocks; SCSI.ReadOnly against a read-only LUN;"
		e512=${E512_SUITES# }
		echo "  ${e512% } against a 64 MiB 512e LUN (4096-byte physical blocks, LBPPB 8)"
		echo "- Command, once per suite in list order:"
		echo "  \`iscsi-test-cu -i $INIT1 -I $INIT2 --dataloss -S -t SUITE URL URL\`"
		echo "  (SCSI.Sanitize with the URL once: see run_suite; the target paces SANITIZE OVERWRITE"
		echo "  to 5 MiB/s so SCSI.Sanitize.Reset finds it still running)"
		echo "- Totals: **$TOTAL tests: $PASSED passed, $FAILED failed, $HUNG hung, $MISSING missing, $SKIPPED skipped**"
		echo
		echo "| Test | Result | Reason |"
		echo "|---|---|---|"
		while IFS=$'\t' read -r n r d; do
			[[ $r == PASSED ]] && continue
			reason=${REASON[$n]:-$d}
			# shellcheck disable=SC2016 # the backquotes are Markdown
			printf '| `%s` | %s | %s |\n' "$n" "$r" "${reason//|/\\|}"
		done <"$W/results.tsv"
	} >"$DOCS_FILE.tmp"
	mv "$DOCS_FILE.tmp" "$DOCS_FILE"
	dl_log "wrote $DOCS_FILE"
fi

if ((BAD > MAX_FAIL)); then
	dl_log "FAIL: $BAD tests failed, hung or went missing (allowed: $MAX_FAIL)"
	exit 1
fi
if ((PASSED < MIN_PASS)); then
	dl_log "FAIL: only $PASSED tests passed (required: $MIN_PASS)"
	exit 1
fi
dl_log "OK"
