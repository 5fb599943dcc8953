#!/usr/bin/env bash
# Build fio with its libiscsi engine from Debian's fio source package (Debian 12's fio binary
# lacks the engine) into $1 (default target/fio-build). Prints the path of the fio binary.
# Needs root for apt-get (a deb-src entry and libiscsi-dev). Fails loudly on any step.
set -euo pipefail
DL_NAME=build-fio.sh
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
ROOT=$(dl_repo_root)
OUT=${1:-$ROOT/target/fio-build}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

has_engine() { [[ -x $1 ]] && "$1" --enghelp 2>/dev/null | grep -qw libiscsi; }

# Reuse an earlier build.
for f in "$OUT"/fio-*/fio; do
	if has_engine "$f"; then
		echo "$f"
		exit 0
	fi
done

apt_src_ready() { apt-get source --print-uris fio >/dev/null 2>&1; }
if ! apt_src_ready; then
	src=/etc/apt/sources.list.d/debian-src.sources
	[[ -f /etc/apt/sources.list.d/debian.sources ]] ||
		dl_die "no /etc/apt/sources.list.d/debian.sources to derive a deb-src entry from; add one for fio"
	[[ $(id -u) -eq 0 ]] || dl_die "need root to add $src (deb-src entry for Debian's fio source)"
	dl_log "adding deb-src entry $src"
	sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$src"
	apt-get update -qq >&2 || dl_die "apt-get update failed"
fi
if ! dpkg -s libiscsi-dev >/dev/null 2>&1; then
	[[ $(id -u) -eq 0 ]] || dl_die "need root to install libiscsi-dev"
	apt-get install -y -qq libiscsi-dev >&2 || dl_die "apt-get install libiscsi-dev failed"
fi

cd "$OUT"
apt-get source --download-only fio >&2 || dl_die "apt-get source fio failed"
shopt -s nullglob
origs=(fio_*.orig.tar.*)
((${#origs[@]})) || dl_die "no fio orig tarball downloaded in $OUT"
tar xf "${origs[0]}"
dirs=(fio-*/)
((${#dirs[@]})) || dl_die "the fio tarball did not unpack into fio-*/"
dir=${dirs[0]%/}
cd "$dir"
./configure --enable-libiscsi >configure.log 2>&1 || { tail -n 20 configure.log >&2; dl_die "fio configure failed"; }
grep -Eq 'iscsi engine[[:space:]]+yes' configure.log ||
	{ grep -i iscsi configure.log >&2; dl_die "fio configure did not enable the libiscsi engine"; }
make -j2 >make.log 2>&1 || { tail -n 30 make.log >&2; dl_die "fio build failed (see $OUT/$dir/make.log)"; }
has_engine "$OUT/$dir/fio" || dl_die "built fio has no libiscsi engine"
echo "$OUT/$dir/fio"
