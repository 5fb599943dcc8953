#!/usr/bin/env python3
"""Summarize the iSCSI commands in a boot capture (QEMU `-object filter-dump`, Ethernet pcap).

    scripts/boot/pcap-summary.py target/boot-cache/bios-boot.pcap

For each TCP connection the guest opened: its start/end time, PDU opcodes and SCSI opcodes
counted, the first commands, and READ sizes (what a boot reads, for the performance work).
Reassembles each direction by sequence number; assumes no digests (the test boots negotiate none).
"""
import collections
import struct
import sys

GUEST = bytes([10, 0, 2, 15])


def packets(data):
    off = 24
    while off + 16 <= len(data):
        ts, tus, incl, _ = struct.unpack("<IIII", data[off : off + 16])
        pkt = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if pkt[12:14] != b"\x08\x00":
            continue
        ip = pkt[14:]
        if len(ip) < 20 or ip[9] != 6:
            continue
        ihl = (ip[0] & 15) * 4
        tot = struct.unpack(">H", ip[2:4])[0]
        tcp = ip[ihl:tot]
        if len(tcp) < 20:
            continue
        sp, dp, seq = struct.unpack(">HHI", tcp[:8])
        yield ts + tus / 1e6, ip[12:16], sp, dp, seq, tcp[(tcp[12] >> 4) * 4 :]


def stream(segs):
    out, nxt = bytearray(), None
    for s in sorted(segs):
        p = segs[s]
        if nxt is None:
            nxt = s
        if s + len(p) <= nxt:
            continue
        if s > nxt:
            break  # a hole: stop at what was captured in order
        out += p[nxt - s :]
        nxt = s + len(p)
    return bytes(out)


def main(path):
    data = open(path, "rb").read()
    conns = collections.defaultdict(dict)
    first, last, t0 = {}, {}, None
    for t, src, sp, dp, seq, pl in packets(data):
        t0 = t if t0 is None else t0
        if src != GUEST or dp < 1024:
            continue
        key = (sp, dp)
        first.setdefault(key, t - t0)
        last[key] = t - t0
        if pl:
            conns[key].setdefault(seq, pl)
    for key in sorted(conns, key=lambda k: first[k]):
        s = stream(conns[key])
        print(f"connection guest:{key[0]} -> target:{key[1]}  t={first[key]:.2f}s..{last[key]:.2f}s")
        ops, sizes, shown = collections.Counter(), collections.Counter(), []
        i = reads = rbytes = 0
        while i + 48 <= len(s):
            bhs = s[i : i + 48]
            op = bhs[0] & 0x3F
            dl = int.from_bytes(bhs[5:8], "big")
            if op == 0x01:
                cdb = bhs[32:48]
                ops[f"scsi 0x{cdb[0]:02x}"] += 1
                if cdb[0] in (0x28, 0x88):
                    if cdb[0] == 0x28:
                        lba, n = int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
                    else:
                        lba, n = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
                    sizes[n] += 1
                    reads += 1
                    rbytes += n * 512
                    item = f"READ {lba}+{n}"
                else:
                    item = f"0x{cdb[0]:02x}"
                if len(shown) < 16:
                    shown.append(item)
            else:
                ops[f"pdu 0x{op:02x}"] += 1
            i += 48 + bhs[4] * 4 + dl + (-dl % 4)
        print("  opcodes:", dict(sorted(ops.items())))
        print("  first:  ", ", ".join(shown))
        print(f"  reads: {reads} commands, {rbytes} bytes (512-byte blocks); blocks per read, most common: {sizes.most_common(6)}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
