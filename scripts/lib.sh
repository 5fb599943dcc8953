# shellcheck shell=bash
# Shared helpers for scripts/test.sh and scripts/conformance.sh. Source it; do not run it.

# Print to stderr with the calling script's name so interleaved output stays attributable.
dl_log() { printf '%s: %s\n' "${DL_NAME:-diskless}" "$*" >&2; }

# Fail loudly: a clear message and a non-zero exit, never a silent skip.
dl_die() {
	printf '%s: ERROR: %s\n' "${DL_NAME:-diskless}" "$*" >&2
	exit 1
}

# Repository root (the directory holding Cargo.toml), whatever the caller's cwd.
dl_repo_root() { cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd; }

# Map a required command to the Debian package that ships it.
dl_pkg_for() {
	case "$1" in
	iscsi-test-cu | iscsi-ls | iscsi-inq | iscsi-readcapacity16) echo libiscsi-bin ;;
	qemu-img) echo "qemu-utils qemu-block-extra" ;;
	tcpdump) echo tcpdump ;;
	tgtd | tgtadm) echo tgt ;;
	stdbuf | timeout | truncate | cmp | mktemp) echo coreutils ;;
	cargo) echo "cargo (rustup)" ;;
	*) echo "$1" ;;
	esac
}

# True when the qemu-img at $1 (default: the one on PATH) can really open an iSCSI image.
# Decided by what it does, not by what its --help lists: a qemu-utils without the matching
# qemu-block-extra lists "iscsi" but answers "Unknown driver 'iscsi'". The probe opens a port
# nobody listens on (127.0.0.1:1): a working driver fails to *connect*.
dl_qemu_img_iscsi_works() {
	local bin=${1:-qemu-img} out
	command -v "$bin" >/dev/null 2>&1 || return 1
	out=$(timeout 20 "$bin" info --image-opts \
		"driver=iscsi,transport=tcp,portal=127.0.0.1:1,target=iqn.2026-11.org.diskless:probe,lun=0" 2>&1)
	grep -qiE "unknown driver|unable to load module|unknown protocol|not whitelisted" <<<"$out" && return 1
	grep -qiE "iscsi|connect" <<<"$out"
}
dl_qemu_has_iscsi() { dl_qemu_img_iscsi_works qemu-img; }

# Fail unless every named command exists; names the package to install.
dl_require() {
	local missing=() c
	for c in "$@"; do
		command -v "$c" >/dev/null 2>&1 || missing+=("$c (package: $(dl_pkg_for "$c"))")
	done
	if ((${#missing[@]})); then
		dl_die "missing required tools: ${missing[*]}; run scripts/test.sh as root to install them"
	fi
}

# Is a TCP port on 127.0.0.1 accepting connections?
dl_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A loopback port nobody listens on (for targets that cannot bind port 0, such as tgtd).
dl_free_port() {
	local p i
	for i in $(seq 1 200); do
		p=$((20000 + RANDOM % 40000))
		dl_port_open "$p" || {
			echo "$p"
			return 0
		}
	done
	dl_die "no free loopback port found"
}

# Wait up to $2 seconds for 127.0.0.1:$1 to accept connections.
dl_wait_port() {
	local port=$1 secs=${2:-20} i
	for ((i = 0; i < secs * 10; i++)); do
		dl_port_open "$port" && return 0
		sleep 0.1
	done
	return 1
}

# Start tgtd (the reference target) on 127.0.0.1:$1 with a private, unused control port, its
# output in $2.out / $2.err, and wait until it listens. Sets TGT_CTL (for tgtadm -C) and
# TGT_PID. A tgtd already running on this machine is left alone.
dl_start_tgtd() {
	local port=$1 log=$2 i
	for ((i = 0; i < 100; i++)); do
		TGT_CTL=$((1000 + RANDOM % 8000))
		[[ -e /var/run/tgtd/socket.$TGT_CTL ]] || break
	done
	tgtd -f -C "$TGT_CTL" --iscsi "portal=127.0.0.1:$port" >"$log.out" 2>"$log.err" &
	# shellcheck disable=SC2034 # read by the sourcing script
	TGT_PID=$!
	dl_wait_port "$port" 20 || dl_die "tgtd did not listen on 127.0.0.1:$port"
}
