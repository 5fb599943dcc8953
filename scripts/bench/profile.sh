#!/usr/bin/env bash
# Look inside one bench job: run it against diskless and tgt and record, per target,
#  - CPU time per thread name (tokio workers vs blocking pool; tgtd main vs its bs threads),
#  - syscalls per IO (strace -c -f, a separate run: strace slows the target a lot),
#  - a perf profile of the server (perf record, cpu-clock; top symbols by self time).
#
#   scripts/bench/profile.sh [--job randread-4k-qd32] [--secs 10] [--bin PATH] [--fio PATH]
#
# Needs scripts/bench.sh to have built fio and the image (target/bench/bench.img) once.
# Output goes to target/bench/profile/JOB/ (summary.md plus raw files).
set -euo pipefail
DL_NAME=profile.sh
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
ROOT=$(dl_repo_root)

JOB=randread-4k-qd32
SECS=10
BIN=""
FIO=""
while (($#)); do
	case "$1" in
	--job) JOB=${2:?}; shift ;;
	--secs) SECS=${2:?}; shift ;;
	--bin) BIN=${2:?}; shift ;;
	--fio) FIO=${2:?}; shift ;;
	-h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) exit 2 ;;
	esac
	shift
done
dl_require tgtd tgtadm python3 strace perf
case $JOB in
randread-4k-qd1) OPTS="--rw=randread --bs=4k --iodepth=1" ;;
randread-4k-qd32) OPTS="--rw=randread --bs=4k --iodepth=32" ;;
randwrite-4k-qd32) OPTS="--rw=randwrite --bs=4k --iodepth=32" ;;
seqread-1m-qd16) OPTS="--rw=read --bs=1m --iodepth=16" ;;
seqwrite-1m-qd16) OPTS="--rw=write --bs=1m --iodepth=16" ;;
randrw70-4k-qd32) OPTS="--rw=randrw --rwmixread=70 --bs=4k --iodepth=32" ;;
*) dl_die "unknown job $JOB" ;;
esac
[[ -n $FIO ]] || FIO=$("$ROOT/scripts/bench/build-fio.sh" "$ROOT/target/fio-build")
[[ -n $BIN ]] || BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/diskless
[[ -x $BIN ]] || dl_die "no diskless binary at $BIN (cargo build --release)"
IMG=$ROOT/target/bench/bench.img
[[ -f $IMG ]] || dl_die "no $IMG: run scripts/bench.sh --quick once"
OUT=$ROOT/target/bench/profile/$JOB
rm -rf "$OUT"
mkdir -p "$OUT"

DL_PID="" TGT_PID="" TGT_CTL=""
cleanup() {
	if [[ -n $TGT_CTL ]] && [[ -n $TGT_PID ]] && kill -0 "$TGT_PID" 2>/dev/null; then
		tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op delete --force --tid 1 >/dev/null 2>&1 || true
		tgtadm -C "$TGT_CTL" --mode system --op delete >/dev/null 2>&1 || true
	fi
	local p
	for p in $DL_PID $TGT_PID; do
		kill -0 "$p" 2>/dev/null || continue
		kill -TERM "$p" 2>/dev/null || true
		for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$p" 2>/dev/null || true
	done
	if [[ -n $TGT_CTL ]]; then rm -f "/var/run/tgtd/socket.$TGT_CTL" "/var/run/tgtd/socket.$TGT_CTL.lock"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

: >"$OUT/diskless.out"
"$BIN" --log warn serve --image "$IMG" --listen 127.0.0.1:0 >"$OUT/diskless.out" 2>"$OUT/diskless.err" &
DL_PID=$!
DL_PORT=""
for ((i = 0; i < 300; i++)); do
	DL_PORT=$(sed -n 's/^diskless: listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$OUT/diskless.out" | head -n1 || true)
	[[ -n $DL_PORT ]] && break
	sleep 0.1
done
[[ -n $DL_PORT ]] || dl_die "diskless did not start"
DL_URL="iscsi://127.0.0.1:$DL_PORT/iqn.2026-11.org.diskless:$(basename "${IMG%.*}")/0"
TGT_PORT=$(dl_free_port)
dl_start_tgtd "$TGT_PORT" "$OUT/tgt"
A=(tgtadm -C "$TGT_CTL" --lld iscsi)
"${A[@]}" --op new --mode target --tid 1 -T iqn.2026-11.test:bench-tgt
"${A[@]}" --op new --mode logicalunit --tid 1 --lun 1 -b "$IMG"
"${A[@]}" --op bind --mode target --tid 1 -I ALL
TGT_URL="iscsi://127.0.0.1:$TGT_PORT/iqn.2026-11.test:bench-tgt/1"

fio_run() { # url json
	# shellcheck disable=SC2086
	timeout $((SECS + 60)) "$FIO" --name="$JOB" --ioengine=libiscsi --initiator=iqn.2026-11.test:bench-prof \
		--filename="${1//:/\\:}" $OPTS --time_based --runtime="$SECS" --ramp_time=1 \
		--output-format=json --output="$2" >/dev/null 2>&1 || dl_die "fio failed ($1)"
}

# Per-thread CPU ticks, "comm ticks" lines, grouped by thread name (digits stripped).
thread_ticks() {
	local t
	for t in /proc/"$1"/task/*; do
		# comm may hold spaces: take the fields after the closing parenthesis.
		python3 - "$t/stat" <<'PY' 2>/dev/null || true
import re, sys
s = open(sys.argv[1]).read()
comm = s[s.index("(") + 1:s.rindex(")")]
f = s[s.rindex(")") + 2:].split()
print(re.sub(r"[0-9]+$", "N", comm).replace(" ", "_"), int(f[11]) + int(f[12]))
PY
	done
}

for target in diskless tgt; do
	if [[ $target == diskless ]]; then url=$DL_URL pid=$DL_PID; else url=$TGT_URL pid=$TGT_PID; fi
	dl_log "$target: plain run with per-thread CPU"
	thread_ticks "$pid" >"$OUT/$target.threads0"
	awk '{print $14 + $15}' "/proc/$pid/stat" >"$OUT/$target.proc0"
	fio_run "$url" "$OUT/$target.plain.json"
	thread_ticks "$pid" >"$OUT/$target.threads1"
	awk '{print $14 + $15}' "/proc/$pid/stat" >"$OUT/$target.proc1"
	dl_log "$target: perf record"
	perf record -e cpu-clock -F 1999 -p "$pid" -o "$OUT/$target.perf.data" -- sleep "$SECS" >/dev/null 2>&1 &
	perf_pid=$!
	perf stat -e task-clock,context-switches,cpu-migrations -p "$pid" -x, -o "$OUT/$target.perf.stat" -- sleep "$SECS" >/dev/null 2>&1 &
	stat_pid=$!
	fio_run "$url" "$OUT/$target.perf.json"
	wait "$perf_pid" || true
	wait "$stat_pid" || true
	perf report -i "$OUT/$target.perf.data" --stdio --no-children --sort symbol 2>/dev/null |
		grep -E '^ +[0-9]' | sed 's/[ -]*$//' | head -n 30 >"$OUT/$target.perf.top" || true
	perf report -i "$OUT/$target.perf.data" --stdio --no-children --sort comm 2>/dev/null |
		grep -E '^ +[0-9]' | head -n 10 >"$OUT/$target.perf.comm" || true
	dl_log "$target: strace -c"
	strace -c -f -p "$pid" -o "$OUT/$target.strace" &
	st_pid=$!
	sleep 0.5
	fio_run "$url" "$OUT/$target.strace.json"
	kill -INT "$st_pid" 2>/dev/null || true
	wait "$st_pid" 2>/dev/null || true
done

python3 - "$OUT" "$SECS" "$(getconf CLK_TCK)" >"$OUT/summary.md" <<'PY'
import collections, json, os, sys
out, secs, tck = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
def ios(path):
    j = json.load(open(path))["jobs"][0]
    return j["read"]["iops"] + j["write"]["iops"], j["read"]["total_ios"] + j["write"]["total_ios"]
print(f"# profile of {os.path.basename(out)}\n")
for t in ("diskless", "tgt"):
    iops, _ = ios(f"{out}/{t}.plain.json")
    print(f"## {t}\n\nplain run: {iops:,.0f} IOPS\n")
    def load(p):
        d = collections.Counter()
        for line in open(p):
            k, v = line.split()
            d[k] += int(v)
        return d
    a, b = load(f"{out}/{t}.threads0"), load(f"{out}/{t}.threads1")
    wall = secs + 1
    total = (int(open(f"{out}/{t}.proc1").read()) - int(open(f"{out}/{t}.proc0").read())) / tck
    print(f"whole process: {total:.2f} s CPU, {total * 1e6 / (iops * wall):.1f} µs per IO "
          "(threads that exited during the run count here only)\n")
    print("CPU by thread name (plain run, ramp included):\n")
    print("| threads | CPU s | CPU µs per IO |\n|---|---:|---:|")
    for k in sorted(b, key=lambda k: -(b[k] - a.get(k, 0))):
        d = (b[k] - a.get(k, 0)) / tck
        if d > 0:
            print(f"| {k} | {d:.2f} | {d * 1e6 / (iops * wall):.1f} |")
    # strace: total IOs of that run include ramp (fio's total_ios excludes it).
    siops, _ = ios(f"{out}/{t}.strace.json")
    sios = siops * wall
    print(f"\nsyscalls per IO under strace ({siops:,.0f} IOPS while traced):\n")
    print("| syscall | calls | per IO |\n|---|---:|---:|")
    for line in open(f"{out}/{t}.strace"):
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] not in ("total",):
            calls = int(f[3])
            if calls / max(sios, 1) >= 0.05:
                print(f"| {f[-1]} | {calls:,} | {calls / sios:.2f} |")
    piops, _ = ios(f"{out}/{t}.perf.json")
    pios = piops * wall
    print(f"\nperf stat during the profiled run ({piops:,.0f} IOPS):\n")
    print("| event | count | per IO |\n|---|---:|---:|")
    for line in open(f"{out}/{t}.perf.stat"):
        f = line.strip().split(",")
        if len(f) >= 3 and f[0].replace(".", "").isdigit():
            v = float(f[0])
            unit = " (ms)" if f[1] == "msec" else ""
            print(f"| {f[2]}{unit} | {v:,.0f} | {v / pios:.3f} |")
    print("\ntop symbols (perf, cpu-clock, self time):\n\n```")
    print(open(f"{out}/{t}.perf.top").read().rstrip())
    print("```\n")
PY
cat "$OUT/summary.md"
