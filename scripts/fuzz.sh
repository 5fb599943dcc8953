#!/usr/bin/env bash
# Fuzz every cargo-fuzz target of diskless for SECONDS each (default 60) and report.
#
#   scripts/fuzz.sh            # smoke run, 60 s per target
#   scripts/fuzz.sh 3600       # a longer local run
#   FUZZ_TARGETS="pdu_decode scsi_cdb" scripts/fuzz.sh 300
#   FUZZ_SANITIZER=none scripts/fuzz.sh   # faster, no AddressSanitizer
#   scripts/fuzz.sh --build-only          # install cargo-fuzz and build the targets only
#
# cargo fuzz passes -Z flags to rustc, which only nightly accepts; RUSTC_BOOTSTRAP=1 lets the
# stable toolchain accept them (it is what this script sets, nothing else changes).
# New corpus entries go to fuzz/target/corpus/<target> (not committed); the committed seeds
# in fuzz/corpus/<target> are read too. Crashes land in fuzz/artifacts/<target>/; replay one
# with `cargo fuzz run <target> <file>` and add it to tests/fuzz_regressions.rs.
# Exit status: 0 if no target crashed, 1 if any did, 2 if the fuzzer could not be built/run.
set -uo pipefail

if [ "${1:-}" = "--build-only" ]; then FUZZ_BUILD_ONLY=1; shift; fi
SECONDS_PER_TARGET="${1:-60}"
case "$SECONDS_PER_TARGET" in
'' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
FUZZ="$ROOT/fuzz"
SANITIZER="${FUZZ_SANITIZER:-address}"
export RUSTC_BOOTSTRAP=1

die() { echo "fuzz.sh: ERROR: $*" >&2; exit 2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is missing, installing it (cargo install cargo-fuzz)..."
    cargo install cargo-fuzz || die "could not install cargo-fuzz; install it by hand: cargo install cargo-fuzz"
    cargo fuzz --version >/dev/null 2>&1 || die "cargo-fuzz installed but 'cargo fuzz' does not run"
fi

cd "$ROOT" || die "cannot cd to $ROOT"
TARGETS="${FUZZ_TARGETS:-$(cargo fuzz list 2>/dev/null)}"
[ -n "$TARGETS" ] || die "no fuzz targets found (cargo fuzz list)"

echo "fuzz.sh: building targets (sanitizer: $SANITIZER)..."
cargo fuzz build --sanitizer "$SANITIZER" || die "cargo fuzz build failed"
# --build-only: install cargo-fuzz and build the targets, run nothing (test.sh does this in
# the background while the tests run, so the fuzzing stage only fuzzes).
[ "${FUZZ_BUILD_ONLY:-0}" = 1 ] && exit 0

LOGS="$FUZZ/target/fuzz-logs"
mkdir -p "$LOGS"
failed=0
summary=()
for t in $TARGETS; do
    work="$FUZZ/target/corpus/$t"
    seeds="$FUZZ/corpus/$t"
    arts="$FUZZ/artifacts/$t"
    mkdir -p "$work" "$seeds" "$arts"
    before="$(ls "$arts" 2>/dev/null | sort)"
    dict=()
    if [ -f "$FUZZ/dict/$t.dict" ]; then dict=("-dict=$FUZZ/dict/$t.dict"); fi
    log="$LOGS/$t.log"
    echo "fuzz.sh: running $t for ${SECONDS_PER_TARGET}s (log: $log)"
    cargo fuzz run --sanitizer "$SANITIZER" "$t" "$work" "$seeds" -- \
        -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 -timeout=10 \
        -rss_limit_mb=2048 "${dict[@]}" >"$log" 2>&1
    rc=$?
    # Executions: libFuzzer's final stats line, else its last "#N ..." status line.
    execs="$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -1)"
    [ -n "$execs" ] || execs="$(sed -n 's/^#\([0-9][0-9]*\)[[:space:]].*/\1/p' "$log" | tail -1)"
    [ -n "$execs" ] || execs=0
    new="$(comm -13 <(echo "$before") <(ls "$arts" 2>/dev/null | sort) | grep -E '^(crash|leak|timeout|oom|slow-unit)-' || true)"
    crashes="$(printf '%s' "$new" | grep -c . || true)"
    if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed=1
        [ "$crashes" -ne 0 ] || crashes=1
        echo "fuzz.sh: $t FAILED (exit $rc); last lines of $log:" >&2
        tail -n 30 "$log" >&2
        for f in $new; do echo "fuzz.sh:   artifact $arts/$f" >&2; done
    fi
    summary+=("$(printf '%-16s executions %12s  crashes %s' "$t" "$execs" "$crashes")")
done

echo
echo "fuzz.sh: ${SECONDS_PER_TARGET}s per target, sanitizer $SANITIZER"
for line in "${summary[@]}"; do echo "  $line"; done
if [ "$failed" -ne 0 ]; then
    echo "fuzz.sh: FAILED: at least one target crashed" >&2
    exit 1
fi
echo "fuzz.sh: OK: no crashes"
