#!/usr/bin/env python3
"""Writes the seed corpora fuzz/corpus/<target>/seed-* in the input layouts documented in
fuzz/src/lib.rs. Re-run after changing a layout: python3 fuzz/make_seeds.py

Seeds are real traffic: the PDU fixtures of tests/fixtures/pdu, login key sets as iPXE,
libiscsi and open-iscsi send them, and the CDBs those clients issue at boot.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def fixture(name: str) -> bytes:
    out = bytearray()
    with open(os.path.join(ROOT, "tests/fixtures/pdu", name)) as f:
        for line in f:
            out += bytes(int(h, 16) for h in line.split("#")[0].split())
    return bytes(out)


def write(target: str, name: str, data: bytes) -> None:
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def kv(*pairs) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def pdu(b0, b1, tail40: bytes, data=b"", ahs=b"", hd=False, dd=False) -> bytes:
    """BHS: opcode byte, flags byte, two zero bytes, lengths, then 40 bytes (LUN onwards);
    AHS, optional header digest, data + padding, optional data digest (little-endian)."""
    assert len(tail40) == 40, len(tail40)
    bhs = bytes([b0, b1, 0, 0, len(ahs) // 4]) + struct.pack(">I", len(data))[1:] + tail40
    out = bhs + ahs
    if hd:
        out += struct.pack("<I", crc32c(out))
    pad = b"\0" * ((4 - len(data) % 4) % 4)
    out += data + pad
    if dd and data:
        out += struct.pack("<I", crc32c(data + pad))
    return out


def words(*ws) -> bytes:
    return b"".join(struct.pack(">I", w) for w in ws)


# ---------------------------------------------------------------------------------- pdu_decode
FIX = {
    "data_in_status.hex": 0,
    "data_out_digests.hex": 3,
    "login_request_libiscsi.hex": 0,
    "nop_in_ping_hd.hex": 1,
    "reject_invalid_field.hex": 0,
    "scsi_cmd_read10.hex": 0,
}
for name, flags in FIX.items():
    wire = fixture(name)
    base = name.split(".")[0]
    write("pdu_decode", base, bytes([flags]) + wire)
    write("pdu_decode", base + "-fix", bytes([flags | 4]) + wire)

LUN0 = b"\0" * 8
# NOP-Out ping (immediate), header digest.
write("pdu_decode", "nop_out", bytes([5]) + pdu(0x40, 0x80, LUN0 + words(1, 0xFFFFFFFF, 1, 1, 0, 0, 0, 0), hd=True))
# Text Request SendTargets=All, both digests.
st = kv(("SendTargets", "All"))
write("pdu_decode", "text_sendtargets", bytes([7]) + pdu(0x44, 0x80, LUN0 + words(2, 0xFFFFFFFF, 1, 1, 0, 0, 0, 0), st, hd=True, dd=True))
# SCSI Command with a 32-byte CDB (extended CDB AHS, 16 extra bytes) and a bidi read length AHS.
cdb32 = bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18]) + b"\0" * 24
ahs = struct.pack(">HBB", 17, 1, 0) + cdb32[16:] + struct.pack(">HBB", 5, 2, 0) + words(512)
write("pdu_decode", "scsi_cmd_ext_cdb", bytes([4]) + pdu(0x01, 0xE1, LUN0 + words(3, 512, 2, 1) + cdb32[:16], ahs=ahs))
# WRITE(10) with immediate data (one 512-byte block).
w10 = bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 1, 0]) + b"\0" * 6
write("pdu_decode", "scsi_cmd_write10_immediate", bytes([0]) + pdu(0x01, 0xA1, LUN0 + words(4, 512, 3, 2) + w10, bytes(range(256)) * 2))
# Task management: ABORT TASK, LUN RESET; Logout; SNACK; Login operational leg (iPXE).
write("pdu_decode", "tmf_abort", bytes([0]) + pdu(0x42, 0x81, LUN0 + words(5, 4, 4, 2, 3, 0, 0, 0)))
write("pdu_decode", "tmf_lun_reset", bytes([0]) + pdu(0x42, 0x85, LUN0 + words(6, 0xFFFFFFFF, 5, 2, 0, 0, 0, 0)))
write("pdu_decode", "logout", bytes([0]) + pdu(0x46, 0x80, LUN0 + words(7, 0, 6, 3, 0, 0, 0, 0)))
write("pdu_decode", "snack", bytes([0]) + pdu(0x10, 0x80, LUN0 + words(8, 0xFFFFFFFF, 0, 3, 0, 0, 0, 0)))

# ----------------------------------------------------------------------------------- text_keys
IPXE_SEC = kv(("InitiatorName", "iqn.2026-11.test:client-1"), ("TargetName", "iqn.2026-11.test:disk"),
              ("SessionType", "Normal"), ("AuthMethod", "None"))
IPXE_OP = kv(("HeaderDigest", "None"), ("DataDigest", "None"), ("MaxConnections", "1"),
             ("InitialR2T", "Yes"), ("ImmediateData", "No"), ("MaxRecvDataSegmentLength", "8192"),
             ("MaxBurstLength", "262144"), ("FirstBurstLength", "65536"), ("DefaultTime2Wait", "0"),
             ("DefaultTime2Retain", "0"), ("MaxOutstandingR2T", "1"), ("DataPDUInOrder", "Yes"),
             ("DataSequenceInOrder", "Yes"), ("ErrorRecoveryLevel", "0"))
LIBISCSI_SEC = kv(("InitiatorName", "iqn.2026-11.test:init1"), ("TargetName", "iqn.2026-11.test:disk"),
                  ("SessionType", "Normal"), ("HeaderDigest", "None,CRC32C"), ("AuthMethod", "CHAP,None"))
LIBISCSI_OP = kv(("DataDigest", "None"), ("InitialR2T", "No"), ("ImmediateData", "Yes"),
                 ("MaxBurstLength", "262144"), ("FirstBurstLength", "262144"),
                 ("MaxRecvDataSegmentLength", "262144"), ("MaxOutstandingR2T", "1"),
                 ("ErrorRecoveryLevel", "0"), ("MaxConnections", "1"), ("DataPDUInOrder", "Yes"),
                 ("DataSequenceInOrder", "Yes"), ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"))
OPENISCSI = kv(("InitiatorName", "iqn.1993-08.org.debian:01:abcdef"), ("InitiatorAlias", "client-1"),
               ("TargetName", "iqn.2026-11.test:disk"), ("SessionType", "Normal"),
               ("HeaderDigest", "None"), ("DataDigest", "None"), ("DefaultTime2Wait", "2"),
               ("DefaultTime2Retain", "0"), ("IFMarker", "No"), ("OFMarker", "No"),
               ("ErrorRecoveryLevel", "0"), ("InitialR2T", "No"), ("ImmediateData", "Yes"),
               ("MaxBurstLength", "16776192"), ("FirstBurstLength", "262144"),
               ("MaxOutstandingR2T", "1"), ("MaxConnections", "1"), ("DataPDUInOrder", "Yes"),
               ("DataSequenceInOrder", "Yes"), ("MaxRecvDataSegmentLength", "262144"))
DISCOVERY = kv(("InitiatorName", "iqn.2026-11.test:init1"), ("SessionType", "Discovery"),
               ("AuthMethod", "None"), ("MaxRecvDataSegmentLength", "8192"))
CHAP_KEYS = kv(("CHAP_A", "5"), ("CHAP_N", "user"), ("CHAP_R", "0x0123456789abcdef0123456789abcdef"),
               ("CHAP_I", "7"), ("CHAP_C", "0b3q2+7w=="), ("X-com.example.ext", "1"),
               ("OFMarkInt", "1~65535"), ("MaxBurstLength", "0x40000"))
for name, text in [("ipxe_security", IPXE_SEC), ("ipxe_operational", IPXE_OP),
                   ("libiscsi_security", LIBISCSI_SEC), ("libiscsi_operational", LIBISCSI_OP),
                   ("openiscsi_login", OPENISCSI), ("discovery", DISCOVERY), ("chap", CHAP_KEYS),
                   ("sendtargets", kv(("SendTargets", "All")))]:
    write("text_keys", name, text)


# ------------------------------------------------------------------------------ login_sequence
def login_rec(t, c, csg, nsg, text=b"", mutation=None, chap=False):
    flags = (0x80 if t else 0) | (0x40 if c else 0) | (csg << 2) | nsg | (0x20 if chap else 0)
    mut = 0
    if mutation is not None:
        flags |= 0x10
        mut = mutation
    return bytes([flags, mut]) + struct.pack("<H", len(text)) + text


def text_rec(f, c, text=b"", last_ttt=False, new_itt=False):
    flags = (0x80 if f else 0) | (0x40 if c else 0) | (0x20 if last_ttt else 0) | (0x10 if new_itt else 0)
    return bytes([flags]) + struct.pack("<H", len(text)) + text


CHAP_TGT = "iqn.2026-11.test:chap"
MUTUAL_TGT = "iqn.2026-11.test:mutual"
# iPXE: security (AuthMethod=None) then operational, then a text exchange in full feature.
write("login_sequence", "ipxe", bytes([0]) + login_rec(1, 0, 0, 1, IPXE_SEC) + login_rec(1, 0, 1, 3, IPXE_OP)
      + text_rec(1, 0, kv(("MaxRecvDataSegmentLength", "65536"))))
# libiscsi: security leg with digests offered, operational leg.
write("login_sequence", "libiscsi", bytes([0]) + login_rec(1, 0, 0, 1, LIBISCSI_SEC) + login_rec(1, 0, 1, 3, LIBISCSI_OP))
# open-iscsi after the hand-off: straight to operational, one PDU.
write("login_sequence", "openiscsi", bytes([0]) + login_rec(1, 0, 1, 3, OPENISCSI))
# Discovery then SendTargets, with a small MaxRecvDataSegmentLength to force continuation.
write("login_sequence", "discovery", bytes([0]) + login_rec(1, 0, 0, 3, DISCOVERY)
      + text_rec(1, 0, kv(("MaxRecvDataSegmentLength", "512"), ("SendTargets", "All")))
      + text_rec(1, 0, b"", last_ttt=True) + text_rec(1, 0, b"", last_ttt=True))
# One-way CHAP: AuthMethod=CHAP, CHAP_A=5, then the answer the harness computes.
chap_sec = kv(("InitiatorName", "iqn.2026-11.test:init1"), ("TargetName", CHAP_TGT),
              ("SessionType", "Normal"), ("AuthMethod", "CHAP"))
write("login_sequence", "chap", bytes([0]) + login_rec(0, 0, 0, 0, chap_sec) + login_rec(0, 0, 0, 0, kv(("CHAP_A", "5")))
      + login_rec(1, 0, 0, 1, b"", chap=True) + login_rec(1, 0, 1, 3, IPXE_OP))
# Mutual CHAP: the initiator's own challenge rides with its answer.
mutual_sec = kv(("InitiatorName", "iqn.2026-11.test:init1"), ("TargetName", MUTUAL_TGT),
                ("SessionType", "Normal"), ("AuthMethod", "CHAP,None"))
write("login_sequence", "mutual_chap", bytes([0]) + login_rec(0, 0, 0, 0, mutual_sec) + login_rec(0, 0, 0, 0, kv(("CHAP_A", "5")))
      + login_rec(1, 0, 0, 1, kv(("CHAP_I", "9"), ("CHAP_C", "0x" + "5a" * 16)), chap=True)
      + login_rec(1, 0, 1, 3, LIBISCSI_OP))
# A login split over two PDUs with C=1.
write("login_sequence", "continued", bytes([0]) + login_rec(0, 1, 0, 0, IPXE_SEC[:30]) + login_rec(1, 0, 0, 1, IPXE_SEC[30:])
      + login_rec(1, 0, 1, 3, IPXE_OP))
# Text only: continued request text (C=1) then the rest.
write("login_sequence", "text_only", bytes([3]) + text_rec(0, 1, b"SendTar") + text_rec(1, 0, b"gets=All\0", last_ttt=True)
      + text_rec(1, 0, kv(("MaxRecvDataSegmentLength", "1024"), ("X-foo", "bar"), ("HeaderDigest", "CRC32C"))))

# ------------------------------------------------------------------------------------ scsi_cdb


def cmd(cdb, data=b"", nexus=0, lun=0, exact=False):
    op = (nexus << 3) | (lun << 4) | (0x40 if exact else 0) | 0x80
    return bytes([op, len(cdb)]) + bytes(cdb) + struct.pack("<H", len(data)) + data


def reset(lun_idx=None, kind=0, nexus=0):
    sel = (1 if lun_idx is None else (lun_idx << 4)) | (kind << 1) | (nexus << 3)
    return bytes([6, sel])


def lost(nexus):
    return bytes([7 | (nexus << 3)])


INQ = [0x12, 0, 0, 0, 96, 0]
INQ_VPD = lambda page, n=4: [0x12, 1, page, 0, n, 0]  # noqa: E731
TUR = [0, 0, 0, 0, 0, 0]
RC10 = [0x25] + [0] * 9
RC16 = [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]
READ10 = lambda lba, n: [0x28, 0] + list(struct.pack(">I", lba)) + [0] + list(struct.pack(">H", n)) + [0]  # noqa: E731
WRITE16 = lambda lba, n, fua=0: [0x8A, fua << 3] + list(struct.pack(">Q", lba)) + list(struct.pack(">I", n)) + [0, 0]  # noqa: E731
REPORT_LUNS = [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
MODE_SENSE6 = lambda page, n: [0x1A, 0, page, 0, n, 0]  # noqa: E731
MODE_SENSE10 = [0x5A, 0, 0x3F, 0, 0, 0, 0, 0x10, 0, 0]
RSOC = [0xA3, 0x0C, 1, 0x28, 0, 0, 0, 0, 0x10, 0, 0, 0]
SYNC10 = [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]
UNMAP = lambda n: [0x42, 0, 0, 0, 0, 0, 0] + list(struct.pack(">H", n)) + [0]  # noqa: E731
unmap_params = struct.pack(">HH4x", 6 + 16, 16) + struct.pack(">QI4x", 8, 16)
PR_OUT = lambda sa, ty, n=24: [0x5F, sa, ty, 0, 0] + list(struct.pack(">I", n)) + [0]  # noqa: E731
PR_IN = lambda sa: [0x5E, sa, 0, 0, 0, 0, 0, 0, 0xFF, 0]  # noqa: E731
pr_reg = lambda key, sa_key: struct.pack(">QQ", key, sa_key) + b"\0" * 8  # noqa: E731
WS16 = [0x93, 0x08] + list(struct.pack(">Q", 16)) + list(struct.pack(">I", 8)) + [0, 0]
CAW = [0x89, 0] + list(struct.pack(">Q", 2)) + [0, 0, 0, 1, 0, 0]
MODE_SELECT6 = [0x15, 0x10, 0, 0, 24, 0]
caching_page = bytes([0, 0, 0, 0]) + bytes([0x08, 18, 0x04]) + b"\0" * 17

write("scsi_cdb", "linux_probe", b"".join([
    cmd(INQ_VPD(0, 4)), cmd(INQ), cmd(INQ_VPD(0x80)), cmd(INQ_VPD(0x83, 255)), cmd(INQ_VPD(0xB0, 64)),
    cmd(INQ_VPD(0xB1, 64)), cmd(INQ_VPD(0xB2, 64)), cmd(REPORT_LUNS), cmd(TUR), cmd(RC16),
    cmd(MODE_SENSE6(0x3F, 4)), cmd(MODE_SENSE6(0x08, 32)), cmd(RSOC), cmd(READ10(0, 8)), cmd(SYNC10)]))
write("scsi_cdb", "ipxe_boot", b"".join([cmd(TUR), cmd(RC10), cmd(READ10(64, 1)), cmd(READ10(0, 1)),
                                         cmd(READ10(1, 127)), cmd(READ10(112, 16))]))
write("scsi_cdb", "write_read", b"".join([cmd(WRITE16(8, 2, 1), bytes(range(256)) * 4, exact=True),
                                          cmd(READ10(8, 2)), cmd(WRITE16(126, 4), b"\xaa" * 16, exact=True),
                                          cmd(CAW, b"\0" * 512 + b"\x55" * 512, exact=True)]))
write("scsi_cdb", "unmap_ws", b"".join([cmd(WRITE16(0, 32), b"\x11", exact=True), cmd(UNMAP(len(unmap_params)), unmap_params),
                                        cmd([0x9E, 0x12] + [0] * 8 + [0, 0, 0, 32, 0, 0]),
                                        cmd(WS16, b"\0" * 512, exact=True)]))
write("scsi_cdb", "persistent_reservations", b"".join([
    cmd(PR_OUT(0, 0), pr_reg(0, 0xAAAA)), cmd(PR_OUT(0, 0), pr_reg(0, 0xBBBB), nexus=1),
    cmd(PR_OUT(1, 5), pr_reg(0xAAAA, 0)), cmd(PR_IN(0)), cmd(PR_IN(1)), cmd(PR_IN(3)),
    cmd(WRITE16(0, 1), b"\x01" * 512, nexus=1, exact=True),
    cmd(PR_OUT(4, 5), pr_reg(0xBBBB, 0xAAAA), nexus=1), reset(0, 0, 1), lost(0),
    cmd(PR_OUT(2, 5), pr_reg(0xBBBB, 0), nexus=1), cmd(PR_OUT(3, 0), pr_reg(0xBBBB, 0), nexus=1)]))
write("scsi_cdb", "reserve6_removable", b"".join([
    cmd([0x16, 0, 0, 0, 0, 0], lun=1), cmd(TUR, nexus=1, lun=1), cmd([0x1E, 0, 0, 0, 1, 0], lun=1),
    cmd([0x1B, 0, 0, 0, 2, 0], lun=1), cmd([0x17, 0, 0, 0, 0, 0], lun=1), lost(0),
    cmd(READ10(0, 1), lun=1), cmd(INQ, lun=2), cmd(REPORT_LUNS, lun=2), reset(None, 2)]))
write("scsi_cdb", "mode_select", b"".join([cmd(MODE_SELECT6, caching_page, exact=True), cmd(MODE_SENSE10),
                                           cmd([0x03, 0, 0, 0, 252, 0])]))

# netboot: DHCP requests as PXE firmware, iPXE and UEFI HTTP Boot send them (RFC 2131 layout,
# options RFC 2132/4578/3004), one selector byte first (see dhcp_packet); TFTP requests.
def dhcp(msgtype, mac, opts, ciaddr=b"\0" * 4):
    hdr = bytes([1, 1, 6, 0]) + struct.pack(">IHH", 0x12345678, 0, 0x8000) + ciaddr + b"\0" * 12
    hdr += mac + b"\0" * 10 + b"\0" * 192 + bytes([99, 130, 83, 99])
    body = bytes([53, 1, msgtype])
    for code, val in opts:
        body += bytes([code, len(val)]) + val
    return hdr + body + b"\xff"

MAC = bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56])
pxe_bios = [(93, b"\0\0"), (60, b"PXEClient:Arch:00000:UNDI:002001"), (97, b"\0" * 17), (94, b"\1\2\1")]
pxe_efi = [(93, b"\0\7"), (60, b"PXEClient:Arch:00007:UNDI:003016"), (57, b"\5\xc0")]
ipxe = [(93, b"\0\0"), (60, b"PXEClient:Arch:00000:UNDI:002001"), (77, b"iPXE"), (175, b"\x13\1\1")]
http = [(93, b"\0\x10"), (60, b"HTTPClient:Arch:00016:UNDI:003001")]
write("dhcp_packet", "proxy_discover_bios", b"\0" + dhcp(1, MAC, pxe_bios))
write("dhcp_packet", "proxy_request_4011_efi", b"\2" + dhcp(3, MAC, pxe_efi, bytes([10, 0, 0, 99])))
write("dhcp_packet", "proxy_discover_ipxe", b"\0" + dhcp(1, MAC, ipxe))
write("dhcp_packet", "proxy_discover_http", b"\0" + dhcp(1, MAC, http))
write("dhcp_packet", "dhcp_discover", b"\1" + dhcp(1, MAC, pxe_bios + [(50, bytes([10, 0, 0, 11]))]))
write("dhcp_packet", "dhcp_request", b"\1" + dhcp(3, MAC, pxe_bios + [(50, bytes([10, 0, 0, 10])), (54, bytes([10, 0, 0, 1]))]))
write("dhcp_packet", "dhcp_release", b"\1" + dhcp(7, MAC, [], bytes([10, 0, 0, 10])))

def rrq(name, *opts):
    return b"\0\1" + b"".join(s.encode() + b"\0" for s in (name, "octet") + opts)

ACK = lambda n: b"\0\4" + struct.pack(">H", n)  # noqa: E731
write("tftp_packet", "lockstep", struct.pack("<HB", 20, 7) + rrq("undionly.kpxe") + b"\xff" + b"\xff".join(ACK(i) for i in range(1, 6)))
write("tftp_packet", "options_window", struct.pack("<HB", 300, 1) + rrq("/efi/snponly.efi", "tsize", "0", "blksize", "1468", "windowsize", "4", "timeout", "3")
      + b"\xff" + b"\xff".join(ACK(i) for i in (0, 4, 3, 8, 12, 16, 20, 21)))
write("tftp_packet", "traversal", struct.pack("<HB", 1, 0) + rrq("../../etc/passwd") + b"\xff" + b"\0\5\0\1oops\0")
print("seeds written under", os.path.join(HERE, "corpus"))
