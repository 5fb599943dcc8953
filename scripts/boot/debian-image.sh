#!/usr/bin/env bash
# Build a real Debian system whose root file system lives on an iSCSI disk, for tests/debian.rs.
#
#   scripts/boot/debian-image.sh OUTDIR
#
# Produces OUTDIR/debian.img (1 GiB raw disk) and OUTDIR/inputs.txt:
#   MBR (syslinux mbr.bin) + partition 1: FAT16 "DLBOOT" with syslinux, vmlinuz, initrd.img
#                          + partition 2: ext4 "dlroot" (fixed UUID), the Debian root file system
#
# The root comes from Debian's packages with debootstrap (variant minbase) plus linux-image-amd64,
# systemd-sysv, open-iscsi and initramfs-tools, from the machine's own Debian mirror (the first
# `URIs:`/`deb` line of /etc/apt/sources.list*). open-iscsi's initramfs hook is forced on
# (/etc/iscsi/iscsi.initramfs: ISCSI_AUTO=true), so the initramfs brings the NIC up from the
# iBFT that iPXE's `sanboot` publishes and logs in from it (`iscsistart -b`), then mounts
# root=UUID=... from the iSCSI disk. A systemd unit (diskless-test.service, scripts/boot/
# debian-guest.sh) drives the test from inside the guest and reports on the serial console.
#
# Nothing is mounted on the host and no loop device is used: debootstrap and the chroot steps run
# in a private mount namespace (unshare -m: their /proc and /sys mounts vanish with it), the FAT
# partition is filled with mtools, the ext4 partition with `mke2fs -d` straight into the image.
#
# Cache: $DISKLESS_BOOT_CACHE (default ${CARGO_TARGET_DIR:-target}/boot-cache)/debian/KEY, where
# KEY hashes this script, the guest script, the mirror and the suite: a repeat run only copies
# the image. debootstrap's downloaded .debs are kept in .../debian-debs. First build here: see
# docs/testing.md (a few minutes; mostly debootstrap). Runs as root (debootstrap, chroot).
set -euo pipefail

die() { echo "debian-image.sh: error: $*" >&2; exit 1; }
log() { echo "debian-image.sh: $(date -u +%T) $*" >&2; }

[[ $# -eq 1 ]] || die "usage: $0 OUTDIR"
OUT=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${DISKLESS_BOOT_CACHE:-${CARGO_TARGET_DIR:-$ROOT/target}/boot-cache}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd) # debootstrap wants absolute paths
export LC_ALL=C TZ=UTC DEBIAN_FRONTEND=noninteractive
DISK_MIB=1024
BOOT_MIB=64
ROOT_UUID=4449534b-4c45-5353-0000-000000000002
GUEST=$HERE/debian-guest.sh

need() { # need TOOL-OR-FILE PACKAGE
	if [[ $1 == /* ]]; then
		[[ -e $1 ]] || die "missing $1: install the Debian package $2"
	else
		command -v "$1" >/dev/null 2>&1 || die "missing tool '$1': install the Debian package $2"
	fi
}
need debootstrap debootstrap
need unshare util-linux
need chroot coreutils
need mke2fs e2fsprogs
need e2fsck e2fsprogs
need mcopy mtools
need mkfs.fat dosfstools
need syslinux syslinux
need /usr/lib/syslinux/mbr/mbr.bin syslinux-common
need sfdisk fdisk
need dpkg-deb dpkg
need sha256sum coreutils
[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap and chroot)"
[[ -f $GUEST ]] || die "missing $GUEST"

# ---- inputs: the machine's Debian mirror and suite ----------------------------------------------
SUITE=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
[[ -n $SUITE ]] || die "cannot tell the Debian suite from /etc/os-release"
MIRROR=${DISKLESS_DEBIAN_MIRROR:-}
if [[ -z $MIRROR ]]; then
	# deb822 files first (Debian 12's default), then one-line sources; skip security/updates.
	MIRROR=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
		/^Types:/ {deb = ($0 ~ /(^|[ \t])deb([ \t]|$)/)}
		/^URIs:/ && deb {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}')
fi
if [[ -z $MIRROR ]]; then
	MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
		awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) {print $i; exit}}')
fi
[[ -n $MIRROR ]] || die "no Debian mirror in /etc/apt/sources.list* (set DISKLESS_DEBIAN_MIRROR)"

INPUTS="suite $SUITE"$'\n'"mirror $MIRROR"$'\n'
for f in "$HERE/debian-image.sh" "$GUEST"; do
	INPUTS+="$(basename "$f") $(sha256sum <"$f" | cut -d' ' -f1)"$'\n'
done
KEY=$(printf '%s' "$INPUTS" | sha256sum | cut -c1-16)
IMGDIR=$CACHE/debian/$KEY

publish() {
	mkdir -p "$OUT"
	for f in debian.img inputs.txt; do
		cp --sparse=always "$IMGDIR/$f" "$OUT/$f.tmp.$$"
		mv -f "$OUT/$f.tmp.$$" "$OUT/$f"
	done
	log "image in $OUT (cache key $KEY)"
}
[[ -f $IMGDIR/done ]] && { publish; exit 0; }

# One builder per cache; the others wait and then find the image built.
exec 9>"$CACHE/.debian.lock"
flock 9
[[ -f $IMGDIR/done ]] && { publish; exit 0; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/diskless-debian.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM HUP # run the EXIT trap (remove the half-built tree) when stopped too
R=$WORK/root
START=$(date +%s)

# ---- 1. debootstrap (private mount namespace: its /proc and /sys mounts die with it) ------------
DEBS=$CACHE/debian-debs
mkdir -p "$DEBS"
log "debootstrap $SUITE from $MIRROR"
unshare --mount --propagation private debootstrap --variant=minbase --cache-dir="$DEBS" \
	--include=systemd-sysv,udev,kmod,open-iscsi,initramfs-tools,e2fsprogs,linux-image-amd64 \
	"$SUITE" "$R" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
	{ tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
log "debootstrap done ($(($(date +%s) - START)) s)"

# ---- 2. configure the guest -------------------------------------------------------------------
echo "deb $MIRROR $SUITE main" >"$R/etc/apt/sources.list"
echo diskless-debian >"$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 diskless-debian\n' >"$R/etc/hosts"
echo 4449534b4c4553530000000000000002 >"$R/etc/machine-id" # fixed: no first-boot setup
echo "UUID=$ROOT_UUID / ext4 errors=remount-ro 0 1" >"$R/etc/fstab"
# open-iscsi's initramfs hook: always include iSCSI, log in from the iBFT (iscsistart -b).
echo "ISCSI_AUTO=true" >"$R/etc/iscsi/iscsi.initramfs"
# A small initramfs: only the modules the boot needs (the NIC, iSCSI, the disk, ext4).
sed -i 's/^MODULES=.*/MODULES=list/' "$R/etc/initramfs-tools/initramfs.conf"
cat >>"$R/etc/initramfs-tools/modules" <<'EOF'
virtio_pci
virtio_net
e1000
crc32c_generic
scsi_mod
sd_mod
scsi_transport_iscsi
libiscsi
libiscsi_tcp
iscsi_tcp
iscsi_boot_sysfs
iscsi_ibft
ext4
EOF
# The guest's test driver: a oneshot unit after the root is writable, output on the serial port.
install -m 755 "$GUEST" "$R/usr/local/sbin/diskless-guest"
cat >"$R/etc/systemd/system/diskless-test.service" <<'EOF'
[Unit]
Description=diskless test driver (reports on ttyS0)
After=local-fs.target systemd-remount-fs.service
DefaultDependencies=yes

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/diskless-guest
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/diskless-test.service "$R/etc/systemd/system/multi-user.target.wants/diskless-test.service"
# No login prompt on the console: the unit's markers are all the test reads.
ln -sf /dev/null "$R/etc/systemd/system/serial-getty@ttyS0.service"
ln -sf /dev/null "$R/etc/systemd/system/getty@tty1.service"

# A tiny local package, installed by the guest with dpkg -i (the "package install" write).
P=$WORK/probe
mkdir -p "$P/DEBIAN" "$P/usr/share/diskless-probe"
printf 'Package: diskless-probe\nVersion: 1.0\nArchitecture: all\nMaintainer: diskless tests <root@localhost>\nDescription: diskless boot test probe\n' >"$P/DEBIAN/control"
echo "installed by dpkg -i inside the guest" >"$P/usr/share/diskless-probe/README"
mkdir -p "$R/opt/diskless"
dpkg-deb --root-owner-group -Zgzip --build "$P" "$R/opt/diskless/diskless-probe_1.0_all.deb" >/dev/null

# Rebuild the initramfs with the settings above, then trim what a headless VM never loads.
KVER=$(basename "$(ls -d "$R"/lib/modules/*/ | head -1)")
[[ -n $KVER && -f $R/boot/vmlinuz-$KVER ]] || die "no kernel installed in the root"
unshare --mount --propagation private chroot "$R" update-initramfs -u -k "$KVER" >"$WORK/initramfs.log" 2>&1 ||
	{ tail -n 30 "$WORK/initramfs.log" >&2; die "update-initramfs failed"; }
grep -q 'iscsistart' <(unshare --mount --propagation private chroot "$R" lsinitramfs "/boot/initrd.img-$KVER") ||
	die "the initramfs has no iscsistart: open-iscsi's hook did not run"
M=$R/lib/modules/$KVER/kernel
rm -rf "$M/sound" "$M/drivers/gpu" "$M/drivers/media" "$M/drivers/net/wireless" "$M/drivers/infiniband" \
	"$M/drivers/staging" "$M/drivers/bluetooth" "$M/net/wireless" "$M/net/mac80211" "$M/net/bluetooth" \
	"$M/drivers/iio" "$M/drivers/hid" "$M/drivers/isdn" "$M/drivers/usb"
chroot "$R" depmod "$KVER"
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* "$R"/usr/share/doc/* "$R"/usr/share/man/* \
	"$R"/usr/share/locale/* "$R"/var/log/*.log "$R"/boot/*.old
cp "$R/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
cp "$R/boot/initrd.img-$KVER" "$WORK/initrd.img"

# ---- 3. the disk: FAT16 boot partition (syslinux) + ext4 root, no mounts ----------------------
SECTORS=$((DISK_MIB * 2048))
P1START=2048
P1SIZE=$((BOOT_MIB * 2048))
P2START=$((P1START + P1SIZE))
P2SIZE=$((SECTORS - P2START))
CMDLINE="root=UUID=$ROOT_UUID ro console=ttyS0,115200n8 loglevel=4 iscsi_auto panic=5 systemd.show_status=1"
cat >"$WORK/syslinux.cfg" <<EOF
SERIAL 0 115200
PROMPT 0
TIMEOUT 0
DEFAULT debian
LABEL debian
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND $CMDLINE
EOF
mkfs.fat -C -F 16 -n DLBOOT -i 444c424f --invariant "$WORK/boot.fat" $((P1SIZE / 2)) >/dev/null
syslinux --install "$WORK/boot.fat"
mcopy -m -i "$WORK/boot.fat" "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/syslinux.cfg" ::/

D=$WORK/debian.img
truncate -s "${DISK_MIB}M" "$D"
dd if="$WORK/boot.fat" of="$D" bs=512 seek=$P1START conv=notrunc,sparse status=none
sfdisk --no-reread --no-tell-kernel "$D" >/dev/null 2>&1 <<EOF || die "sfdisk failed"
label: dos
label-id: 0x4449534c
start=$P1START, size=$P1SIZE, type=6, bootable
start=$P2START, size=$P2SIZE, type=83
EOF
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$D" bs=440 count=1 conv=notrunc status=none
log "writing the ext4 root ($(du -sm "$R" | cut -f1) MiB of files)"
mke2fs -q -F -t ext4 -L dlroot -U "$ROOT_UUID" -E "offset=$((P2START * 512)),root_owner=0:0" -d "$R" \
	"$D" "$((P2SIZE / 2))k" || die "mke2fs -d failed"

{
	printf '%s' "$INPUTS"
	echo "kernel $KVER"
	echo "built $(date -u +%FT%TZ) in $(($(date +%s) - START)) s"
	chroot "$R" dpkg-query -W -f '${Package} ${Version}\n' | sort
} >"$WORK/inputs.txt"

mkdir -p "$CACHE/debian"
rm -rf "$IMGDIR.tmp"
mkdir -p "$IMGDIR.tmp"
cp --sparse=always "$D" "$WORK/inputs.txt" "$IMGDIR.tmp/"
touch "$IMGDIR.tmp/done"
rm -rf "$IMGDIR"
mv "$IMGDIR.tmp" "$IMGDIR"
for d in "$CACHE"/debian/*/; do # keep only the current image (~1 GiB sparse)
	[[ ${d%/} == "$IMGDIR" ]] || rm -rf "${d%/}"
done
log "built Debian $SUITE ($KVER) in $(($(date +%s) - START)) s"
publish
