#!/bin/sh
# The test driver inside the Debian guest (scripts/boot/debian-image.sh installs it as
# /usr/local/sbin/diskless-guest, run once per boot by diskless-test.service). It reports on the
# serial console (ttyS0) with DISKLESS-* markers that tests/debian.rs waits for; nobody types.
#
# What to do comes from QEMU's fw_cfg (`-fw_cfg name=opt/diskless/action,string=ACTION`):
#   write   write /var/lib/diskless-test/token (fw_cfg opt/diskless/token), fsync, install the
#           local package /opt/diskless/diskless-probe_1.0_all.deb (dpkg -i), sync, power off
#   check   report only, power off
#   hammer  start writing and fsyncing files forever (the host resets the machine meanwhile);
#           the boot after that reset (same QEMU, same action) sees the hammer flag, reports
#           how the root file system came back (fsck log, kernel errors), clears it and powers off
# Every boot first prints: DISKLESS-STATE token=<token or none> probe=<installed|absent>
out() { echo "$*" >/dev/ttyS0; echo "$*"; }
D=/var/lib/diskless-test
FW=/sys/firmware/qemu_fw_cfg/by_name/opt/diskless
modprobe qemu_fw_cfg 2>/dev/null
i=0
while [ ! -r $FW/action/raw ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
ACTION=$(cat $FW/action/raw 2>/dev/null || echo none)
TOKEN=$(cat $FW/token/raw 2>/dev/null || echo none)

seen=$(cat $D/token 2>/dev/null || echo none)
if dpkg-query -W -f '${Status}' diskless-probe 2>/dev/null | grep -q 'install ok installed'; then
	probe=installed
else
	probe=absent
fi
root=$(findmnt -n -o SOURCE,OPTIONS /)
out "DISKLESS-UP action=$ACTION root=$root kernel=$(uname -r)"
out "DISKLESS-STATE token=$seen probe=$probe"

if [ -e $D/hammer ]; then
	# The boot after a hard reset in the middle of synced writes: the root came back?
	n=$(ls $D/hammer.d 2>/dev/null | wc -l)
	# The kernel replays the ext4 journal when the initramfs mounts the root ("recovery
	# complete"); systemd-fsck-root then checks it (fsck -a) before the read-write remount.
	errs=$(dmesg | grep -c -E 'EXT4-fs error|EXT4-fs warning|I/O error' || true)
	recovered=$(dmesg | grep -c -E 'EXT4-fs \(sd[a-z]+[0-9]*\): recovery complete' || true)
	fsck=$(systemctl show -p Result --value systemd-fsck-root.service 2>/dev/null)
	dmesg | grep -E 'EXT4-fs \(' | while read -r l; do out "DISKLESS-KERNEL $l"; done
	out "DISKLESS-AFTER-RESET files=$n kernel_errors=$errs journal_recovered=$recovered fsck_root=$fsck"
	# Every file the hammer fsynced before announcing it must be whole.
	bad=0
	for f in $D/hammer.d/*; do
		[ -f "$f" ] || continue
		[ "$(wc -c <"$f")" -eq 65536 ] || bad=$((bad + 1))
	done
	rm -rf $D/hammer $D/hammer.d
	sync
	out "DISKLESS-RESET-CHECK bad=$bad"
	systemctl --no-block poweroff
	exit 0
fi

case "$ACTION" in
write)
	mkdir -p $D
	echo "$TOKEN" >$D/token.tmp
	sync $D/token.tmp
	mv $D/token.tmp $D/token
	if dpkg -i /opt/diskless/diskless-probe_1.0_all.deb >/tmp/dpkg.log 2>&1; then
		sync
		out "DISKLESS-WROTE token=$TOKEN probe=$(dpkg-query -W -f '${Status}' diskless-probe | tr ' ' _)"
	else
		out "DISKLESS-FAIL dpkg -i: $(tail -n 3 /tmp/dpkg.log | tr '\n' ' ')"
	fi
	systemctl --no-block poweroff
	;;
check)
	out "DISKLESS-CHECKED"
	systemctl --no-block poweroff
	;;
hammer)
	mkdir -p $D/hammer.d
	: >$D/hammer
	sync
	out "DISKLESS-HAMMERING"
	i=0
	while :; do
		# 64 KiB each, written to a temp name, fsynced, then renamed: only whole files count.
		dd if=/dev/urandom of=$D/hammer.d/.tmp bs=64k count=1 conv=fsync status=none
		mv $D/hammer.d/.tmp $D/hammer.d/f$i
		i=$((i + 1))
		[ $((i % 20)) -eq 0 ] && out "DISKLESS-HAMMER $i"
	done
	;;
*)
	out "DISKLESS-FAIL unknown action '$ACTION'"
	systemctl --no-block poweroff
	;;
esac
