#!/usr/bin/env bash
# Boot a QEMU guest (software emulation, TCG) from an iSCSI target with iPXE's sanboot.
#
#   scripts/boot/run-qemu.sh --mode bios|uefi --port PORT --target IQN --initiator IQN
#                            [--lun 0] [--timeout 240] [--nic virtio|e1000] [--pcap FILE]
#                            [--mem 512] --log FILE
#   scripts/boot/run-qemu.sh --mode bios|uefi --tap IFNAME [--mac MAC] [--no-rom] [--http-boot] --log FILE
#   scripts/boot/run-qemu.sh --mode bios|uefi --chain URL [--mac MAC] ... --log FILE
#
# With --tap the guest is on a tap device (inside a network namespace, see tests/netboot.rs)
# and gets everything from the network: DHCP, the boot file and the script come from the
# servers on that network, so --port/--target/--initiator are not needed. --no-rom gives the
# NIC no iPXE ROM (UEFI: the firmware's own PXE client boots); --http-boot (UEFI) turns OVMF's
# PXE off so that its HTTP Boot client runs. --chain URL (user networking): iPXE chains the
# boot script endpoint at URL (10.0.2.2 is the host) instead of running its own sanboot.
#
# The guest reaches the host's 127.0.0.1:PORT as 10.0.2.2:PORT (QEMU user networking). QEMU's
# built-in TFTP server hands iPXE a script (after its DHCP) that sets the initiator name and
# runs `sanboot iscsi:10.0.2.2::PORT:LUN:IQN`. The serial console goes to --log. The run stops
# early on the success marker (DISKLESS-HANDOFF-WRITE-OK, printed by the test initramfs) or on a
# failure marker ("No bootable device", "Kernel panic", "SANBOOT-FAILED", "DISKLESS-FAIL",
# "Boot failed"), and QEMU is killed after --timeout seconds whatever happens.
#
# Exit status: 0 success, 1 failure marker or QEMU died, 2 usage/setup error, 124 timeout.
# Every run has its own temp dir (TFTP root, OVMF variables), so several guests can boot at once.
set -uo pipefail

die() { echo "run-qemu.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

MODE="" PORT="" TARGET="" INITIATOR="" LUN=0 TIMEOUT=240 LOG="" NIC=virtio PCAP="" MEM=512
TAP="" MAC="" NOROM=0 HTTPBOOT=0 CHAIN=""
while [[ $# -gt 0 ]]; do
	case "$1" in
	--no-rom) NOROM=1; shift; continue ;;
	--http-boot) HTTPBOOT=1; shift; continue ;;
	--tap) TAP=${2:-} ;;
	--chain) CHAIN=${2:-} ;;
	--mac) MAC=${2:-} ;;
	--mode) MODE=${2:-} ;;
	--port) PORT=${2:-} ;;
	--target) TARGET=${2:-} ;;
	--initiator) INITIATOR=${2:-} ;;
	--lun) LUN=${2:-} ;;
	--timeout) TIMEOUT=${2:-} ;;
	--log) LOG=${2:-} ;;
	--nic) NIC=${2:-} ;;
	--pcap) PCAP=${2:-} ;;
	--mem) MEM=${2:-} ;;
	-h | --help) usage ;;
	*) die "unknown argument '$1' (try --help)" ;;
	esac
	shift 2 || die "$1 needs a value"
done
[[ $MODE == bios || $MODE == uefi ]] || die "--mode bios|uefi is required"
if [[ -z $TAP && -z $CHAIN ]]; then
	[[ $PORT =~ ^[0-9]+$ ]] || die "--port PORT is required"
	[[ -n $TARGET && -n $INITIATOR ]] || die "--target and --initiator are required"
fi
[[ -n $LOG ]] || die "--log is required"
[[ $TIMEOUT =~ ^[0-9]+$ && $LUN =~ ^[0-9]+$ ]] || die "--timeout and --lun take numbers"

need() { # need TOOL-OR-FILE PACKAGE
	if [[ $1 == /* ]]; then
		[[ -e $1 ]] || die "missing $1: install the Debian package $2"
	else
		command -v "$1" >/dev/null 2>&1 || die "missing tool '$1': install the Debian package $2"
	fi
}
need qemu-system-x86_64 qemu-system-x86
need timeout coreutils
case "$NIC" in
virtio) DEV="virtio-net-pci,disable-legacy=on" ROMBASE=virtio ;; # Debian's ROM is for the modern id
e1000) DEV=e1000 ROMBASE=e1000 ;;
*) die "--nic virtio|e1000" ;;
esac
if [[ $MODE == bios ]]; then
	ROM=/usr/lib/ipxe/qemu/pxe-$ROMBASE.rom
else
	ROM=/usr/lib/ipxe/qemu/efi-$ROMBASE.rom
	OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
	OVMF_VARS=/usr/share/OVMF/OVMF_VARS_4M.fd
	need $OVMF_CODE ovmf
	need $OVMF_VARS ovmf
fi
need "$ROM" ipxe-qemu
((NOROM)) && ROM="" DEV="virtio-net-pci" # OVMF's own VirtioNetDxe and PXE

RUN=$(mktemp -d "${TMPDIR:-/tmp}/diskless-qemu.XXXXXX")
QPID=""
# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
	[[ -n $QPID ]] && kill "$QPID" 2>/dev/null && wait "$QPID" 2>/dev/null
	rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

mkdir -p "$RUN/tftp"
if [[ -n $CHAIN ]]; then
	cat >"$RUN/tftp/boot.ipxe" <<EOF
#!ipxe
echo DISKLESS-IPXE ${MODE} chain
chain ${CHAIN} || goto failed
:failed
echo SANBOOT-FAILED \${errno}
EOF
else
	cat >"$RUN/tftp/boot.ipxe" <<EOF
#!ipxe
echo DISKLESS-IPXE ${MODE} port ${PORT}
set initiator-iqn ${INITIATOR}
sanboot iscsi:10.0.2.2::${PORT}:${LUN}:${TARGET} || goto failed
:failed
echo SANBOOT-FAILED \${errno}
EOF
fi

if [[ -n $TAP ]]; then
	NETDEV="tap,id=n0,ifname=$TAP,script=no,downscript=no"
else
	NETDEV="user,id=n0,net=10.0.2.0/24,host=10.0.2.2,tftp=$RUN/tftp,bootfile=boot.ipxe"
fi
[[ -n $MAC ]] && DEV+=",mac=$MAC"
ARGS=(-accel tcg -m "$MEM" -smp 1 -nodefaults -no-user-config
	-netdev "$NETDEV"
	-device "$DEV,netdev=n0,romfile=$ROM,bootindex=1"
	-vga none -display none -monitor none -serial "file:$LOG" -no-reboot)
[[ -n $PCAP ]] && ARGS+=(-object "filter-dump,id=d0,netdev=n0,file=$PCAP")
if [[ $MODE == bios ]]; then
	# SeaBIOS writes its text console to COM1 (port 0x3f8) when etc/sercon-port says so.
	printf '\xf8\x03' >"$RUN/sercon"
	# shellcheck disable=SC2054 # the commas belong to QEMU's option syntax
	ARGS+=(-fw_cfg "name=etc/sercon-port,file=$RUN/sercon" -boot order=n,strict=on)
else
	cp "$OVMF_VARS" "$RUN/vars.fd"
	# UEFI HTTP Boot only: OVMF's fw_cfg knobs turn its PXE boot options off.
	((HTTPBOOT)) && ARGS+=(-fw_cfg name=opt/org.tianocore/IPv4PXESupport,string=n
		-fw_cfg name=opt/org.tianocore/IPv6PXESupport,string=n)
	ARGS+=(-machine q35
		-drive "if=pflash,format=raw,readonly=on,file=$OVMF_CODE"
		-drive "if=pflash,format=raw,file=$RUN/vars.fd")
fi

: >"$LOG" || die "cannot write $LOG"
timeout -k 5 "$TIMEOUT" qemu-system-x86_64 "${ARGS[@]}" </dev/null >"$RUN/qemu.out" 2>&1 &
QPID=$!

SUCCESS='DISKLESS-HANDOFF-WRITE-OK'
FAILURES='No bootable device|Kernel panic|SANBOOT-FAILED|DISKLESS-FAIL|Boot failed'
rc=""
while :; do
	if grep -aq "$SUCCESS" "$LOG"; then
		# The guest powers off right after; give it a moment, then stop it regardless.
		for _ in $(seq 50); do kill -0 "$QPID" 2>/dev/null || break; sleep 0.1; done
		rc=0
		break
	fi
	if grep -aEq "$FAILURES" "$LOG"; then
		sleep 1 # let the rest of the message reach the log
		rc=1
		break
	fi
	if ! kill -0 "$QPID" 2>/dev/null; then
		wait "$QPID"
		qrc=$?
		QPID=""
		if grep -aq "$SUCCESS" "$LOG"; then rc=0; elif ((qrc == 124)); then rc=124; else rc=1; fi
		break
	fi
	sleep 0.5
done

if ((rc != 0)); then
	if ((rc == 124)); then
		echo "run-qemu.sh: timeout after ${TIMEOUT}s" >&2
	else
		echo "run-qemu.sh: boot failed" >&2
	fi
	[[ -s $RUN/qemu.out ]] && { echo "--- qemu output ---" >&2; cat "$RUN/qemu.out" >&2; }
	echo "--- last serial lines ($LOG) ---" >&2
	tail -n 25 "$LOG" | tr -d '\r' | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g' >&2
fi
exit "$rc"
