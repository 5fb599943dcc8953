#!/usr/bin/env bash
# THE test command of diskless (CI runs it through .ci/run).
#
#   scripts/test.sh [--quick]
#
# As root it first installs, in one apt-get transaction, everything the tests need that is
# missing: the real iSCSI clients (libiscsi-bin, qemu-img with the iSCSI block driver, tgt as
# the reference target), QEMU, iPXE, OVMF and the image builders' tools, dnsmasq, debootstrap,
# Chromium, Prometheus' promtool, Ceph's monitor, OSD and RADOS gateway, etcd, protoc and the
# protobuf well-known types (etcd-client compiles gRPC definitions). Then it checks every tool
# and fails loudly if one is missing: no test is ever skipped silently. Then
# (each stage's time is printed, and a table of them at the end):
#   1. npm ci in tests/browser; cargo build + cargo test --no-run, while the Debian image of
#      tests/debian.rs builds in the background
#   2. cargo test  (unit tests, real clients, QEMU boots, netboot, Ceph, Chromium; among them
#      tests/cluster_uefi.rs: OVMF's IScsiDxe redirected through a 3-node cluster, image in S3),
#      while the fuzzers' instrumented build runs in the background at the lowest priority
#   3. scripts/conformance.sh  (the whole libiscsi iscsi-test-cu suite; skipped by --quick)
#   4. scripts/fuzz.sh 30      (every fuzz target for FUZZ_SECS=30 s; skipped by --quick)
# The last line is "test.sh: N passed, N failed"; the exit status is 0 only when nothing failed.
set -uo pipefail

DL_NAME=test.sh
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$(dl_repo_root)
cd "$ROOT" || exit 1

QUICK=0
CARGO_TEST_SECS=${TEST_CARGO_TEST_SECS:-1800}
CONFORMANCE_SECS=${TEST_CONFORMANCE_SECS:-900}
for arg in "$@"; do
	case "$arg" in
	--quick) QUICK=1 ;;
	-h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) dl_die "unknown argument '$arg' (try --help)" ;;
	esac
done

# Each stage prints its wall time; the summary at the end lists them all.
STAGES=()
STAGE_NAME=""
STAGE_T0=0
RUN_T0=$(date +%s)
stage_start() {
	STAGE_NAME=$*
	STAGE_T0=$(date +%s)
	printf '\n==== %s ====\n' "$STAGE_NAME"
}
stage_end() {
	local dt=$(($(date +%s) - STAGE_T0))
	STAGES+=("$(printf '%5d s  %s' "$dt" "$STAGE_NAME")")
	dl_log "stage '$STAGE_NAME' took ${dt}s"
}

# sudo resets PATH; find the invoking user's rustup toolchain.
if ! command -v cargo >/dev/null 2>&1; then
	for home in "${HOME:-}" "$(getent passwd "${SUDO_USER:-}" 2>/dev/null | cut -d: -f6)"; do
		[[ -n $home && -x $home/.cargo/bin/cargo ]] && PATH=$PATH:$home/.cargo/bin && break
	done
fi

CLIENT_TOOLS=(iscsi-test-cu iscsi-ls iscsi-inq iscsi-readcapacity16 qemu-img tcpdump)
OTHER_TOOLS=(cargo timeout stdbuf cmp truncate mktemp)
# Everything else the tests need, as "tool-or-file package" (tests/boot.rs QEMU network boots,
# scripts/boot/build-image.sh).
NEEDS=(
	"iscsi-test-cu libiscsi-bin"
	"iscsi-ls libiscsi-bin"
	"iscsi-inq libiscsi-bin"
	"iscsi-readcapacity16 libiscsi-bin"
	"tcpdump tcpdump"
	"qemu-system-x86_64 qemu-system-x86"
	"/usr/lib/ipxe/qemu/pxe-virtio.rom ipxe-qemu"
	"/usr/lib/ipxe/qemu/efi-virtio.rom ipxe-qemu"
	"/usr/share/OVMF/OVMF_CODE_4M.fd ovmf"
	"syslinux syslinux"
	"/usr/lib/syslinux/mbr/mbr.bin syslinux-common"
	"mcopy mtools"
	"mkfs.fat dosfstools"
	"sfdisk fdisk"
	"cpio cpio"
	"dpkg-deb dpkg"
	"debootstrap debootstrap"
	"mke2fs e2fsprogs"
	"tgtd tgt"
	"dnsmasq dnsmasq-base"
	"/usr/lib/ipxe/snponly.efi ipxe"
	"promtool prometheus"
	"/usr/bin/chromium chromium"
	"node nodejs"
	"npm npm"
	"ceph-mon ceph-mon"
	"ceph-osd ceph-osd"
	"radosgw radosgw"
	"ceph ceph-common"
	"etcd etcd-server"
	"etcdctl etcd-client"
	"openssl openssl"
	"protoc protobuf-compiler"
	"/usr/include/google/protobuf/descriptor.proto libprotobuf-dev"
	"/usr/include/rbd/librbd.h librbd-dev"
	"/usr/include/rados/librados.h librados-dev"
)
missing_needs() { # prints the packages of missing tools/files, one per line
	local e what pkg
	for e in "${NEEDS[@]}"; do
		read -r what pkg <<<"$e"
		if [[ $what == /* ]]; then [[ -e $what ]] && continue; else command -v "$what" >/dev/null 2>&1 && continue; fi
		echo "$pkg"
	done
}

# ---- 1. install what is missing (root only), in ONE apt-get transaction -------------------------
# One transaction, so that no package removes another the tests need: a machine may ship a
# backported qemu-utils (10.x) without its qemu-block-extra, and installing Debian's
# qemu-system-x86 on its own would conflict with it and remove it. qemu-utils, qemu-block-extra
# and qemu-system-x86 are therefore always pinned to one version: the candidate of
# qemu-block-extra (the package that carries the iSCSI driver).
stage_start "install packages"
NEED=()
mapfile -t NEED < <(missing_needs | sort -u)
QEMU_BROKEN=0
dl_qemu_has_iscsi || QEMU_BROKEN=1
if ((${#NEED[@]} || QEMU_BROKEN)); then
	if [[ $(id -u) -ne 0 ]]; then
		dl_die "missing: ${NEED[*]}$( ((QEMU_BROKEN)) && echo ' qemu-img with the iSCSI driver'). Run scripts/test.sh as root to install them with apt-get"
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update || dl_die "apt-get update failed"
	PKGS=()
	QV=$(apt-cache policy qemu-block-extra | sed -n 's/^ *Candidate: //p')
	[[ -n $QV && $QV != "(none)" ]] || dl_die "apt has no candidate for qemu-block-extra (check /etc/apt/sources)"
	for p in "${NEED[@]}"; do
		[[ $p == qemu-system-x86 ]] || PKGS+=("$p")
	done
	# qemu-system-x86 must match qemu-block-extra's version too (it depends on qemu-system-common=).
	if ((QEMU_BROKEN)) || [[ " ${NEED[*]} " == *" qemu-system-x86 "* ]] ||
		[[ $(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null) != "$QV" ]]; then
		PKGS+=("qemu-utils=$QV" "qemu-block-extra=$QV" "qemu-system-x86=$QV")
	fi
	dl_log "installing (one transaction): ${PKGS[*]}"
	apt-get install -y --allow-downgrades --no-install-recommends "${PKGS[@]}" ||
		dl_die "apt-get install failed: ${PKGS[*]}"
fi
# A qemu-img stand-in (or a broken one) earlier on PATH must not shadow Debian's working one.
if ! dl_qemu_has_iscsi && dl_qemu_img_iscsi_works /usr/bin/qemu-img; then
	dl_log "the qemu-img first on PATH ($(command -v qemu-img)) cannot open iscsi images; using /usr/bin/qemu-img"
	PATH=/usr/bin:$PATH
fi
stage_end

# ---- 2. every tool must be there, checked again after installing ----------------------------------
dl_require "${CLIENT_TOOLS[@]}" "${OTHER_TOOLS[@]}"
dl_qemu_has_iscsi || dl_die "qemu-img cannot open iSCSI images (as root this script installs Debian's qemu-utils + qemu-block-extra)"
STILL_MISSING=$(missing_needs | sort -u | tr '\n' ' ')
[[ -z $STILL_MISSING ]] || dl_die "the tests need the Debian packages: $STILL_MISSING(run scripts/test.sh as root to install them)"
if [[ $(id -u) -ne 0 ]]; then
	dl_log "warning: not root; tests that capture packets with tcpdump will fail"
fi

# Free space where the tests write (target/ and the temp directory), for a failure that is a
# full disk.
df_report() {
	dl_log "free space: $(df -h --output=avail,pcent,target "${CARGO_TARGET_DIR:-$ROOT}" "${TMPDIR:-/tmp}" | tail -n +2 | tr -s ' ' | paste -sd ';')"
}
df_report

# ---- 3. build, test, conformance ---------------------------------------------------------------
PASSED=0
FAILED=0
LOGDIR=$(mktemp -d /tmp/diskless-test.XXXXXX)
DEBIAN_PID=""
FUZZ_BUILD_PID=""
# Background jobs this script started are stopped by their PID if it ends early.
cleanup() {
	local p
	for p in $DEBIAN_PID $FUZZ_BUILD_PID; do
		kill "$p" 2>/dev/null && wait "$p" 2>/dev/null
	done
	rm -rf "$LOGDIR"
}
trap cleanup EXIT

# The Debian system of tests/debian.rs (debootstrap: a few minutes the first time, mostly
# downloading and unpacking, then cached under target/boot-cache/debian/) is built in the
# background while cargo compiles; the "Debian image" stage below waits for it.
DEBIAN_LOG=$LOGDIR/debian-image.log
timeout -k 10 "${TEST_DEBIAN_IMAGE_SECS:-1500}" bash "$ROOT/scripts/boot/debian-image.sh" \
	"${CARGO_TARGET_DIR:-$ROOT/target}/tmp/debian-image" >"$DEBIAN_LOG" 2>&1 &
DEBIAN_PID=$!

# The browser test's driver (tests/console.rs runs tests/browser/console.mjs), pinned by
# tests/browser/package-lock.json.
stage_start "npm ci (tests/browser)"
if ! (cd "$ROOT/tests/browser" && npm ci --no-audit --no-fund 2>&1); then
	FAILED=$((FAILED + 1))
	dl_log "FAILED: npm ci in tests/browser (the console browser test will fail)"
fi
stage_end

stage_start "cargo build (binary and test binaries)"
if cargo build 2>&1 && cargo test --no-run 2>&1; then
	BUILD_OK=1
else
	BUILD_OK=0
	FAILED=$((FAILED + 1))
	dl_log "FAILED: cargo build"
fi
stage_end

# cargo test only copies the cached Debian image; a failed build also shows in tests/debian.rs,
# which runs the same script.
stage_start "Debian image (scripts/boot/debian-image.sh, waiting for the background build)"
if ! wait "$DEBIAN_PID"; then
	dl_log "debian-image.sh failed (tests/debian.rs will fail and show why)"
fi
DEBIAN_PID=""
cat "$DEBIAN_LOG"
stage_end

# The fuzzers' instrumented build (and cargo-fuzz itself on a fresh machine) runs in the
# background at the lowest priority while the tests run: it takes only CPU the tests leave
# idle (they mostly wait on QEMU guests and sockets), and the fuzzing stage then only fuzzes.
if ((!QUICK && BUILD_OK)); then
	nice -n 19 "$ROOT/scripts/fuzz.sh" --build-only >"$LOGDIR/fuzz-build.log" 2>&1 &
	FUZZ_BUILD_PID=$!
fi

# Add the per-test counts of a cargo test log (every "test result:" line: one per test
# binary and doc tests) to PASSED/FAILED; a non-zero exit with no failing test counted
# (compile error, crash, timeout) counts as one failure. Usage: count_cargo LOG RC WHAT
count_cargo() {
	local tp tf
	read -r tp tf < <(awk '/^test result:/ {
		for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) }
	} END { print p + 0, f + 0 }' "$1")
	PASSED=$((PASSED + tp))
	FAILED=$((FAILED + tf))
	if (($2 != 0 && tf == 0)); then
		FAILED=$((FAILED + 1))
		dl_log "FAILED: $3 exited $2 (124 = timeout)"
	fi
	dl_log "$3: $tp passed, $tf failed"
}

stage_start "cargo test"
timeout -k 10 "$CARGO_TEST_SECS" cargo test --no-fail-fast 2>&1 | tee "$LOGDIR/cargo-test.log"
count_cargo "$LOGDIR/cargo-test.log" "${PIPESTATUS[0]}" "cargo test"
df_report
stage_end

# The RBD backend is behind the cargo feature `rbd` (it links librbd): its tests against a
# real Ceph run here, with the feature (docs/scale-out.md): the library piece (rbd) and the
# client disks of a three-node cluster fenced through etcd, and Ceph unreachable (cluster_rbd,
# about 85 s), and the end-to-end storm of issue 13 (cluster_e2e: 60 clients with a QEMU
# guest and RBD disks, one node killed; about 3 min).
stage_start "cargo test --features rbd --test rbd --test cluster_rbd --test cluster_e2e"
timeout -k 10 900 cargo test --features rbd --test rbd --test cluster_rbd --test cluster_e2e 2>&1 | tee "$LOGDIR/cargo-test-rbd.log"
count_cargo "$LOGDIR/cargo-test-rbd.log" "${PIPESTATUS[0]}" "cargo test --features rbd"
stage_end

if ((QUICK)); then
	dl_log "--quick: conformance suite not run"
elif ((BUILD_OK == 0)); then
	FAILED=$((FAILED + 1))
	dl_log "FAILED: conformance not run because the build failed"
else
	stage_start "scripts/conformance.sh"
	CONFORMANCE_RESULTS="$LOGDIR/conformance.tsv" timeout -k 10 "$CONFORMANCE_SECS" "$ROOT/scripts/conformance.sh" --target-cmd diskless --min-pass 230
	rc=$?
	if [[ -f $LOGDIR/conformance.tsv ]]; then
		cp "$LOGDIR/conformance.tsv" "${CARGO_TARGET_DIR:-$ROOT/target}/conformance-results.tsv" 2>/dev/null || true
		read -r conf_p conf_f < <(awk -F'\t' '$2 == "PASSED" { p++ } $2 == "FAILED" || $2 == "HUNG" || $2 == "MISSING" { f++ } END { print p + 0, f + 0 }' "$LOGDIR/conformance.tsv")
	else
		conf_p=0 conf_f=0
	fi
	PASSED=$((PASSED + conf_p))
	FAILED=$((FAILED + conf_f))
	# A threshold failure (too few passes) or a crash has no failing test to count: count the step.
	if ((rc != 0 && conf_f == 0)); then
		FAILED=$((FAILED + 1))
		dl_log "FAILED: conformance.sh exited $rc"
	fi
	stage_end
fi

# ---- 4. a short fuzzing run of every cargo-fuzz target (docs/security.md) --------------------
if ((QUICK)); then
	dl_log "--quick: fuzzers not run"
elif ((BUILD_OK == 0)); then
	FAILED=$((FAILED + 1))
	dl_log "FAILED: fuzzers not run because the build failed"
else
	stage_start "scripts/fuzz.sh ${FUZZ_SECS:-30}"
	if [[ -n $FUZZ_BUILD_PID ]]; then
		wait "$FUZZ_BUILD_PID" || dl_log "the background fuzz build failed; fuzz.sh tries again:"
		FUZZ_BUILD_PID=""
		cat "$LOGDIR/fuzz-build.log"
	fi
	if timeout -k 10 1800 "$ROOT/scripts/fuzz.sh" "${FUZZ_SECS:-30}"; then
		PASSED=$((PASSED + 1))
	else
		FAILED=$((FAILED + 1))
		dl_log "FAILED: scripts/fuzz.sh found a crash or could not run"
	fi
	stage_end
fi

echo
echo "stage times:"
printf '  %s\n' "${STAGES[@]}"
printf '  %5d s  total\n' "$(($(date +%s) - RUN_T0))"
echo
echo "test.sh: $PASSED passed, $FAILED failed"
((FAILED == 0))
