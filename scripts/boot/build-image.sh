#!/usr/bin/env bash
# Build the network-boot test images from Debian packages only.
#
#   scripts/boot/build-image.sh OUTDIR
#
# Produces in OUTDIR:
#   bios.img   64 MiB raw disk: MBR (syslinux mbr.bin) + one FAT16 partition with syslinux,
#              vmlinuz, initrd.gz and syslinux.cfg (console=ttyS0,115200n8)
#   uefi.img   64 MiB raw disk: GPT + ESP (FAT16) with systemd-boot as \EFI\BOOT\BOOTX64.EFI,
#              a loader entry for vmlinuz + initrd.gz
#   vmlinuz, initrd.gz, inputs.txt (what went in: package versions, script hashes)
#
# Both disks keep their last 2 MiB outside any partition (before the GPT backup): the builder
# writes a read-only marker block at LBA (sectors - 2048) ("DISKLESS-MARKER-RO"), and the
# initramfs /init (scripts/boot/init.sh) writes "DISKLESS-WRITE <value>" at LBA (sectors - 2047).
#
# Nothing is mounted and no loop device is used: packages come from `apt-get download` +
# `dpkg-deb -x`, file systems are filled with mtools, partition tables written by sfdisk on the
# image file. Reproducible: SOURCE_DATE_EPOCH (fixed default), mkfs.fat --invariant, fixed
# volume ids and disk GUIDs, cpio --reproducible, gzip -n.
#
# Cache: downloaded .debs and built images live under $DISKLESS_BOOT_CACHE (default
# ${CARGO_TARGET_DIR:-target}/boot-cache), the images keyed by a hash of every input, so a
# second run only copies files. Set DISKLESS_BOOT_KERNEL_PKG to pin another kernel package.
set -euo pipefail

die() { echo "build-image.sh: error: $*" >&2; exit 1; }
log() { echo "build-image.sh: $*" >&2; }

[[ $# -eq 1 ]] || die "usage: $0 OUTDIR"
OUT=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${DISKLESS_BOOT_CACHE:-${CARGO_TARGET_DIR:-$ROOT/target}/boot-cache}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1764547200} # 2025-12-01 00:00:00 UTC
export LC_ALL=C TZ=UTC
DISK_MIB=64

# ---- host tools (each with the Debian package that ships it) --------------------------------
need() { # need TOOL-OR-FILE PACKAGE
	if [[ $1 == /* ]]; then
		[[ -e $1 ]] || die "missing $1: install the Debian package $2"
	else
		command -v "$1" >/dev/null 2>&1 || die "missing tool '$1': install the Debian package $2"
	fi
}
need apt-get apt
need apt-cache apt
need dpkg-deb dpkg
need mcopy mtools
need mmd mtools
need mkfs.fat dosfstools
need syslinux syslinux
need /usr/lib/syslinux/mbr/mbr.bin syslinux-common
need /usr/lib/syslinux/modules/bios/ldlinux.c32 syslinux-common
need sfdisk fdisk
need cpio cpio
need gzip gzip
need sha256sum coreutils
need truncate coreutils

# ---- inputs ---------------------------------------------------------------------------------
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}'; }
kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
KPKG=${DISKLESS_BOOT_KERNEL_PKG:-$(kernel_pkg)}
if [[ -z $KPKG && $(id -u) -eq 0 ]]; then
	# Containers often ship without apt lists: fetch them once (as root only).
	log "no apt package lists: running apt-get update"
	apt-get update -q >&2 || die "apt-get update failed"
	KPKG=$(kernel_pkg)
fi
[[ -n $KPKG ]] || die "cannot resolve linux-image-amd64 (run 'apt-get update' as root first)"
# iscsistart's shared libraries come from their Debian packages too, not from the host.
PKGS=("$KPKG" busybox-static open-iscsi libopeniscsiusr systemd-boot-efi libc6 libssl3 libkmod2 libzstd1 liblzma5)
INPUTS=""
for p in "${PKGS[@]}"; do
	v=$(candidate "$p")
	[[ -n $v && $v != "(none)" ]] || die "package $p has no candidate version (run 'apt-get update' first)"
	INPUTS+="$p $v"$'\n'
done
for f in "$HERE/build-image.sh" "$HERE/init.sh"; do
	INPUTS+="$(basename "$f") $(sha256sum <"$f" | cut -d' ' -f1)"$'\n'
done
INPUTS+="syslinux $(sha256sum </usr/lib/syslinux/mbr/mbr.bin | cut -c1-16) $(syslinux --version 2>&1 | head -1)"$'\n'
INPUTS+="SOURCE_DATE_EPOCH $SOURCE_DATE_EPOCH"$'\n'
KEY=$(printf '%s' "$INPUTS" | sha256sum | cut -c1-16)
IMGDIR=$CACHE/images/$KEY

publish() {
	mkdir -p "$OUT"
	for f in bios.img uefi.img vmlinuz initrd.gz inputs.txt; do
		cp --sparse=always "$IMGDIR/$f" "$OUT/$f.tmp.$$"
		mv -f "$OUT/$f.tmp.$$" "$OUT/$f"
	done
	log "images in $OUT (cache key $KEY)"
}

if [[ -f $IMGDIR/done ]]; then
	publish
	exit 0
fi

# One builder at a time per cache (parallel test binaries, several checkouts sharing a cache):
# the others wait, then find the images built.
mkdir -p "$CACHE"
if command -v flock >/dev/null 2>&1; then
	exec 9>"$CACHE/.lock"
	flock 9
	if [[ -f $IMGDIR/done ]]; then
		publish
		exit 0
	fi
fi

# ---- download (cached) ----------------------------------------------------------------------
DEBS=$CACHE/debs
mkdir -p "$DEBS"
deb_path() { # the cached .deb of package $1 at version $2 (apt-get download's file name)
	local v=${2//:/%3a}
	ls "$DEBS/$1_${v}_"*.deb 2>/dev/null | head -1
}
for p in "${PKGS[@]}"; do
	v=$(candidate "$p")
	if [[ -z $(deb_path "$p" "$v") ]]; then
		log "downloading $p $v"
		(cd "$DEBS" && apt-get download -q "$p=$v" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) ||
			die "apt-get download $p=$v failed"
		[[ -n $(deb_path "$p" "$v") ]] || die "apt-get download $p=$v produced no .deb in $DEBS"
	fi
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/diskless-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
X=$WORK/x
mkdir -p "$X"
for p in "${PKGS[@]}"; do
	dpkg-deb -x "$(deb_path "$p" "$(candidate "$p")")" "$X"
done

KVER=$(basename "$(ls -d "$X"/lib/modules/*/ | head -1)")
[[ -n $KVER && -f $X/boot/vmlinuz-$KVER ]] || die "no kernel found in $KPKG"
MODDIR=$X/lib/modules/$KVER

# ---- initramfs --------------------------------------------------------------------------------
R=$WORK/initramfs
mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,run,etc/iscsi,var/lock,lib/modules,lib/x86_64-linux-gnu,lib64}
cp "$X/bin/busybox" "$R/bin/busybox"
cp "$HERE/init.sh" "$R/init"
chmod 755 "$R/init" "$R/bin/busybox"

# Modules in load order: every dependency (modinfo "depends=", read straight from the .ko's
# .modinfo strings, so no depmod/kmod is needed) before the module itself.
declare -A MODFILE=() LOADED=()
while IFS= read -r f; do
	n=${f##*/}
	n=${n%.ko}
	MODFILE[${n//-/_}]=$f
done < <(find "$MODDIR/kernel" -name '*.ko' | sort)
ORDER=()
add_module() {
	local m=${1//-/_} dep deps
	[[ -n ${LOADED[$m]:-} ]] && return 0
	LOADED[$m]=1
	if [[ -z ${MODFILE[$m]:-} ]]; then
		# Built into the kernel: nothing to load.
		grep -q "/${m}.ko\$" "$MODDIR/modules.builtin" 2>/dev/null && return 0
		die "module $m not found in $KPKG"
	fi
	deps=$(tr '\0' '\n' <"${MODFILE[$m]}" | grep -a -m1 '^depends=' | cut -d= -f2 || true)
	for dep in ${deps//,/ }; do add_module "$dep"; done
	ORDER+=("$m")
}
# crc32c_generic first: libcrc32c asks the crypto API for "crc32c" at load time (needed even
# without digests). virtio_pci + virtio_net: the guest NIC; e1000 for runs with that NIC.
for m in crc32c_generic crct10dif_generic virtio_pci virtio_net e1000 scsi_mod sd_mod scsi_transport_iscsi libiscsi \
	libiscsi_tcp iscsi_tcp iscsi_boot_sysfs iscsi_ibft; do
	add_module "$m"
done
: >"$R/etc/modules.load"
for m in "${ORDER[@]}"; do
	cp "${MODFILE[$m]}" "$R/lib/modules/$m.ko"
	echo "$m" >>"$R/etc/modules.load"
done

# iscsistart and exactly the shared libraries it links, taken from the extracted packages.
ISCSISTART=$X/sbin/iscsistart
[[ -x $ISCSISTART ]] || die "no iscsistart in open-iscsi"
cp "$ISCSISTART" "$R/sbin/iscsistart"
LIBDIRS="$X/lib/x86_64-linux-gnu:$X/usr/lib/x86_64-linux-gnu"
copy_libs() {
	local bin=$1 soname src
	for soname in $(LD_LIBRARY_PATH=$LIBDIRS ldd "$bin" | awk '/=>/ {print $1}'); do
		[[ -e $R/lib/x86_64-linux-gnu/$soname ]] && continue
		src=$(find "$X/lib/x86_64-linux-gnu" "$X/usr/lib/x86_64-linux-gnu" -name "$soname" 2>/dev/null | head -1)
		[[ -n $src ]] || die "$(basename "$bin") needs $soname, which no downloaded package provides"
		cp -L "$src" "$R/lib/x86_64-linux-gnu/$soname"
		copy_libs "$R/lib/x86_64-linux-gnu/$soname"
	done
}
copy_libs "$ISCSISTART"
cp -L "$X/lib64/ld-linux-x86-64.so.2" "$R/lib64/ld-linux-x86-64.so.2" 2>/dev/null ||
	cp -L "$X/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$R/lib64/ld-linux-x86-64.so.2"
# open-iscsi reads these even with -b; the name is replaced by the iBFT's at login.
echo "InitiatorName=iqn.2026-11.test:unset" >"$R/etc/iscsi/initiatorname.iscsi"
: >"$R/etc/iscsi/iscsid.conf"

find "$R" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$R" && find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -n -9 >"$WORK/initrd.gz"
cp "$X/boot/vmlinuz-$KVER" "$WORK/vmlinuz"

CMDLINE="console=ttyS0,115200n8 loglevel=4 rdinit=/init"

# ---- FAT partition images (mtools, no mounts) ---------------------------------------------------
SECTORS=$((DISK_MIB * 2048))
PSTART=2048                      # 1 MiB alignment
PEND=$((SECTORS - 2048 - 1))     # keep the last 2 MiB out of any partition (markers + GPT backup)
PSIZE=$((PEND - PSTART + 1))

make_fat() { # make_fat FILE LABEL VOLID
	rm -f "$1"
	mkfs.fat -C -F 16 -n "$2" -i "$3" --invariant "$1" $((PSIZE / 2)) >/dev/null
}
stamp() { touch -h -d "@$SOURCE_DATE_EPOCH" "$@"; }
stamp "$WORK/vmlinuz" "$WORK/initrd.gz"

# BIOS: syslinux on FAT16.
cat >"$WORK/syslinux.cfg" <<EOF
SERIAL 0 115200
PROMPT 0
TIMEOUT 0
DEFAULT diskless
LABEL diskless
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND $CMDLINE
EOF
stamp "$WORK/syslinux.cfg"
make_fat "$WORK/bios.fat" DISKLESS 44424f53
syslinux --install "$WORK/bios.fat"
mcopy -m -i "$WORK/bios.fat" "$WORK/vmlinuz" "$WORK/initrd.gz" "$WORK/syslinux.cfg" ::/

# UEFI: systemd-boot on the ESP; its loader entry gives the kernel its initrd and command line.
SDBOOT=$X/usr/lib/systemd/boot/efi/systemd-bootx64.efi
[[ -f $SDBOOT ]] || die "no systemd-bootx64.efi in systemd-boot-efi"
mkdir -p "$WORK/esp/EFI/BOOT" "$WORK/esp/loader/entries"
cp "$SDBOOT" "$WORK/esp/EFI/BOOT/BOOTX64.EFI"
printf 'default diskless.conf\ntimeout 0\neditor no\n' >"$WORK/esp/loader/loader.conf"
printf 'title diskless test\nlinux /vmlinuz\ninitrd /initrd.gz\noptions %s\n' "$CMDLINE" \
	>"$WORK/esp/loader/entries/diskless.conf"
cp "$WORK/vmlinuz" "$WORK/initrd.gz" "$WORK/esp/"
find "$WORK/esp" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
make_fat "$WORK/uefi.fat" ESP 45535020
mcopy -s -m -i "$WORK/uefi.fat" "$WORK/esp/EFI" "$WORK/esp/loader" "$WORK/esp/vmlinuz" "$WORK/esp/initrd.gz" ::/

# ---- whole disks --------------------------------------------------------------------------------
marker_block() { # 512 bytes: the read-only marker the hand-off checks
	printf 'DISKLESS-MARKER-RO v1\n' | dd bs=512 count=1 conv=sync 2>/dev/null
}
assemble() { # assemble DISK FAT
	rm -f "$1"
	truncate -s "${DISK_MIB}M" "$1"
	dd if="$2" of="$1" bs=512 seek=$PSTART conv=notrunc,sparse status=none
	marker_block | dd of="$1" bs=512 seek=$((SECTORS - 2048)) conv=notrunc status=none
}

partition() { # partition DISK < sfdisk-script (sfdisk works on the image file itself)
	local out
	out=$(sfdisk --no-reread --no-tell-kernel "$1" 2>&1) || die "sfdisk $1 failed: $out"
}

assemble "$WORK/bios.img" "$WORK/bios.fat"
partition "$WORK/bios.img" <<EOF
label: dos
label-id: 0x4449534b
start=$PSTART, size=$PSIZE, type=6, bootable
EOF
# mbr.bin boots the active partition's VBR (syslinux); keep sfdisk's partition table.
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$WORK/bios.img" bs=440 count=1 conv=notrunc status=none

assemble "$WORK/uefi.img" "$WORK/uefi.fat"
partition "$WORK/uefi.img" <<EOF
label: gpt
label-id: 4449534B-4C45-5353-0000-000000000001
start=$PSTART, size=$PSIZE, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=4449534B-4C45-5353-0000-0000000000E5, name="ESP"
EOF

printf '%s' "$INPUTS" >"$WORK/inputs.txt"
echo "kernel $KVER" >>"$WORK/inputs.txt"
echo "modules ${ORDER[*]}" >>"$WORK/inputs.txt"

mkdir -p "$CACHE/images"
rm -rf "$IMGDIR.tmp.$$"
mkdir -p "$IMGDIR.tmp.$$"
for f in bios.img uefi.img vmlinuz initrd.gz inputs.txt; do
	cp --sparse=always "$WORK/$f" "$IMGDIR.tmp.$$/$f"
done
touch "$IMGDIR.tmp.$$/done"
rm -rf "$IMGDIR"
mv "$IMGDIR.tmp.$$" "$IMGDIR" 2>/dev/null || [[ -f $IMGDIR/done ]] || die "cannot store $IMGDIR"
rm -rf "$IMGDIR.tmp.$$"
# Keep only the current images (each set is ~20 MB on disk); the .debs stay cached.
for d in "$CACHE"/images/*/; do
	[[ ${d%/} == "$IMGDIR" || ${d%/} == *.tmp.* ]] || rm -rf "${d%/}"
done
log "built $(sed -n 1p "$WORK/inputs.txt") with $KVER ($(du -k "$WORK/initrd.gz" | cut -f1) KiB initrd)"
publish
