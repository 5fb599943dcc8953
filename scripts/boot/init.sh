#!/bin/busybox sh
# /init of the network-boot test initramfs (built by scripts/boot/build-image.sh).
#
# Proves, in order, on the serial console:
#   DISKLESS-STAGE1                  firmware + boot loader read kernel and initramfs via iPXE
#   DISKLESS-HANDOFF-READ-OK         Linux logged in again from the iBFT and read the disk
#   DISKLESS-DISK sdX lun=N sectors=S head=TEXT   each disk the session shows (several LUNs)
#   DISKLESS-PREVIOUS <value|none>   the write marker found before writing (persistence)
#   DISKLESS-HANDOFF-WRITE-OK <v>    it wrote a marker block and read it back uncached
# or DISKLESS-FAIL <why>; then powers off.
#
# The marker value is diskless.marker=VALUE from the kernel command line, else the initiator
# name from the iBFT. Marker LBAs are relative to the disk end (see build-image.sh):
# read-only marker at sectors-2048, write marker at sectors-2047.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t devtmpfs devtmpfs /dev
# No /dev/console existed when the kernel started us: attach the console now.
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

echo "DISKLESS-STAGE1"

fail() {
	echo "DISKLESS-FAIL $*"
	sync
	poweroff -f
	sleep 30
}

while read -r m; do
	insmod "/lib/modules/$m.ko" || fail "insmod $m"
done </etc/modules.load

# iscsi_ibft exposes the iBFT that iPXE left in memory (BIOS: low memory; UEFI: ACPI table).
i=0
while [ ! -e /sys/firmware/ibft/target0 ]; do
	i=$((i + 1))
	[ $i -gt 50 ] && fail "no /sys/firmware/ibft/target0 (no iBFT from the firmware)"
	sleep 0.1
done
for f in /sys/firmware/ibft/initiator/initiator-name /sys/firmware/ibft/target0/target-name \
	/sys/firmware/ibft/target0/ip-addr /sys/firmware/ibft/target0/port /sys/firmware/ibft/target0/lun; do
	[ -r "$f" ] && echo "ibft: ${f#/sys/firmware/ibft/} = $(cat "$f")"
done

# The NIC must be there before iscsistart -N configures it from the iBFT.
has_nic() {
	for n in /sys/class/net/*; do
		[ "${n##*/}" != lo ] && [ -e "$n" ] && return 0
	done
	return 1
}
i=0
while ! has_nic; do
	i=$((i + 1))
	[ $i -gt 100 ] && fail "no network interface"
	sleep 0.1
done

iscsistart -N || fail "iscsistart -N (network from the iBFT)"
iscsistart -b || fail "iscsistart -b (login from the iBFT)"

i=0
while [ ! -b /dev/sda ]; do
	i=$((i + 1))
	[ $i -gt 300 ] && fail "no /dev/sda after iscsistart -b"
	sleep 0.1
done

SECTORS=$(cat /sys/block/sda/size)
[ "$SECTORS" -gt 4096 ] || fail "disk too small: $SECTORS sectors"
RO_LBA=$((SECTORS - 2048))
RW_LBA=$((SECTORS - 2047))

# Uncached block reads: O_DIRECT when busybox dd has it, else drop the buffer cache first.
readblk() { # readblk LBA -> the block's text up to the first NUL or newline
	if ! dd if=/dev/sda bs=512 skip="$1" count=1 iflag=direct 2>/dev/null >/tmp/blk; then
		sync
		blockdev --flushbufs /dev/sda
		echo 3 >/proc/sys/vm/drop_caches
		dd if=/dev/sda bs=512 skip="$1" count=1 2>/dev/null >/tmp/blk || return 1
	fi
	tr '\000' '\n' </tmp/blk | head -n 1
}

sig=$(dd if=/dev/sda bs=1 skip=510 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')
[ "$sig" = "55aa" ] || fail "MBR signature is '$sig', not 55aa"
ro=$(readblk $RO_LBA) || fail "read LBA $RO_LBA"
[ "$ro" = "DISKLESS-MARKER-RO v1" ] || fail "marker at LBA $RO_LBA is '$ro'"
echo "DISKLESS-HANDOFF-READ-OK sectors=$SECTORS"

# Every disk of the session (a client with several disks: LUN 1, 2, ... behind sdb, sdc, ...):
# wait until each SCSI device the scan found has its block device and the count holds for
# half a second (the scan adds LUNs one by one, sd probes them asynchronously).
i=0
stable=0
last=""
while [ $i -lt 60 ] && [ $stable -lt 5 ]; do
	nsdev=$(ls /sys/class/scsi_device 2>/dev/null | wc -l)
	nblk=$(ls -d /sys/block/sd* 2>/dev/null | wc -l)
	now="$nsdev/$nblk"
	if [ "$nsdev" = "$nblk" ] && [ "$now" = "$last" ]; then stable=$((stable + 1)); else stable=0; fi
	last=$now
	i=$((i + 1))
	sleep 0.1
done
for b in /sys/block/sd*; do
	[ -e "$b" ] || continue
	d=${b##*/}
	hctl=$(readlink "$b/device")
	head=$(dd if="/dev/$d" bs=512 count=1 2>/dev/null | tr '\000' '\n' | head -n 1 | tr -cd 'A-Za-z0-9 _.:-')
	echo "DISKLESS-DISK $d lun=${hctl##*:} sectors=$(cat "$b/size") head=$head"
done

VALUE=
# shellcheck disable=SC2013 # the command line is one line of words
for arg in $(cat /proc/cmdline); do
	case "$arg" in diskless.marker=*) VALUE=${arg#diskless.marker=} ;; esac
done
[ -n "$VALUE" ] || VALUE=$(cat /sys/firmware/ibft/initiator/initiator-name)
[ -n "$VALUE" ] || fail "no marker value (no diskless.marker= and no iBFT initiator name)"

prev=$(readblk $RW_LBA) || fail "read LBA $RW_LBA"
case "$prev" in
"DISKLESS-WRITE "*) echo "DISKLESS-PREVIOUS ${prev#DISKLESS-WRITE }" ;;
*) echo "DISKLESS-PREVIOUS none" ;;
esac

printf 'DISKLESS-WRITE %s\n' "$VALUE" >/tmp/w
if ! dd if=/tmp/w of=/dev/sda bs=512 seek=$RW_LBA count=1 conv=sync,notrunc oflag=direct 2>/dev/null; then
	dd if=/tmp/w of=/dev/sda bs=512 seek=$RW_LBA count=1 conv=sync,notrunc 2>/dev/null ||
		fail "write LBA $RW_LBA"
fi
sync
blockdev --flushbufs /dev/sda
got=$(readblk $RW_LBA) || fail "read back LBA $RW_LBA"
[ "$got" = "DISKLESS-WRITE $VALUE" ] || fail "read back '$got' at LBA $RW_LBA"
echo "DISKLESS-HANDOFF-WRITE-OK $VALUE"
sync
poweroff -f
sleep 30
