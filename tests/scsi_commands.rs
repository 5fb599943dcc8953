//! Command sequences as libiscsi's iscsi-test-cu sends them, against a MemStore LU.
use diskless::scsi::{status, LogicalUnit, LuIdentity, LuOptions, LunTable, Nexus, ResetKind};
use diskless::scsi::{ScsiResult, Transfer};
use diskless::storage::MemStore;
use std::collections::BTreeMap;
use std::sync::Arc;

const BS: usize = 512;
const BLOCKS: u64 = 4096;

fn ident() -> LuIdentity {
    LuIdentity {
        vendor: "DISKLESS".into(),
        product: "TEST DISK".into(),
        revision: "0001".into(),
        serial: "SN0001".into(),
        naa: [0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    }
}

fn lu_with(read_only: bool, removable: bool) -> LogicalUnit {
    let store = Arc::new(MemStore::new(BLOCKS * BS as u64, BS as u32, read_only));
    let opts = LuOptions {
        removable,
        ..LuOptions::default()
    };
    LogicalUnit::with_options(store, ident(), opts)
}

fn lu() -> LogicalUnit {
    lu_with(false, true)
}

fn nexus(id: u64) -> Nexus {
    Nexus {
        id,
        initiator_port: format!("iqn.test:init{id},i,0x00023d00000{id}"),
        initiator_name: format!("iqn.test:init{id}"),
        relative_port: 1,
        target_port: "iqn.2026-11.test:target,t,0x0001".into(),
    }
}

fn cdb(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    if v.len() < 16 {
        v.resize(16, 0);
    }
    v
}

fn run(lu: &LogicalUnit, n: &Nexus, c: &[u8], data: &[u8]) -> ScsiResult {
    let c = cdb(c);
    lu.transfer(&c).ok();
    lu.execute(n, &c, data)
}

/// (key, asc, ascq) of a CHECK CONDITION in either sense format.
fn sense(r: &ScsiResult) -> (u8, u8, u8) {
    assert_eq!(r.status, status::CHECK_CONDITION, "{r:?}");
    let s = r.sense.as_ref().unwrap();
    if s[0] & 0x7f == 0x72 {
        (s[1] & 0xf, s[2], s[3])
    } else {
        (s[2] & 0xf, s[12], s[13])
    }
}

fn good(r: &ScsiResult) {
    assert_eq!(r.status, status::GOOD, "{r:?}");
}

fn read10(lba: u32, n: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&n.to_be_bytes());
    c.push(0);
    c
}

fn write10(lba: u32, n: u16) -> Vec<u8> {
    let mut c = read10(lba, n);
    c[0] = 0x2a;
    c
}

fn rw16(op: u8, lba: u64, n: u32) -> Vec<u8> {
    let mut c = vec![op, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&n.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

#[test]
fn inquiry_standard_and_vpd() {
    let lu = lu();
    let n = nexus(1);
    let r = run(&lu, &n, &[0x12, 0, 0, 1, 4, 0], &[]);
    good(&r);
    let d = &r.data_in;
    assert_eq!(d[4] as usize + 5, d.len());
    assert_eq!(d[2], 6);
    assert_eq!(d[1], 0x80);
    assert!(d[58..74].windows(2).any(|w| w == [0x04, 0xc0]));
    for len in 5..80u8 {
        let r = run(&lu, &n, &[0x12, 0, 0, 0, len, 0], &[]);
        good(&r);
        assert!(r.data_in.len() <= len as usize);
    }
    assert_eq!(
        sense(&run(&lu, &n, &[0x12, 0, 1, 0, 255, 0], &[])),
        (5, 0x24, 0)
    );
    let r = run(&lu, &n, &[0x12, 1, 0, 0, 255, 0], &[]);
    good(&r);
    assert_eq!(&r.data_in[4..], &[0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2]);
    for page in [0x80u8, 0x83, 0x8f, 0xb0, 0xb1, 0xb2] {
        let r = run(&lu, &n, &[0x12, 1, page, 0, 255, 0], &[]);
        good(&r);
        assert_eq!(r.data_in[1], page);
        assert_eq!(
            r.data_in.len(),
            4 + u16::from_be_bytes([r.data_in[2], r.data_in[3]]) as usize
        );
    }
    // VPD 0x83 (SPC-4 §7.8.6): walk the designators; MPIO needs the relative port (type 4),
    // the target port group (type 5) and the target port's SCSI name string (type 8, UTF-8,
    // NUL-terminated, a multiple of 4 bytes).
    let r = run(&lu, &n, &[0x12, 1, 0x83, 0, 255, 0], &[]);
    let (mut at, mut types) = (4usize, Vec::new());
    while at + 4 <= r.data_in.len() {
        let (kind, len) = (r.data_in[at + 1] & 0x0f, r.data_in[at + 3] as usize);
        let value = &r.data_in[at + 4..at + 4 + len];
        if kind == 8 {
            assert_eq!(r.data_in[at] & 0x0f, 3, "UTF-8 code set");
            assert_eq!(len % 4, 0);
            let name = value.split(|&b| b == 0).next().unwrap();
            assert_eq!(name, b"iqn.2026-11.test:target,t,0x0001");
        }
        types.push(kind);
        at += 4 + len;
    }
    assert_eq!(at, r.data_in.len());
    assert_eq!(types, [3, 1, 4, 5, 8]);
    let bl = run(&lu, &n, &[0x12, 1, 0xb0, 0, 255, 0], &[]);
    assert_eq!(bl.data_in[3], 0x3c);
    let lbp = run(&lu, &n, &[0x12, 1, 0xb2, 0, 255, 0], &[]);
    assert_eq!(lbp.data_in[5] & 0xe4, 0xe4);
    assert_eq!(
        sense(&run(&lu, &n, &[0x12, 1, 0x99, 0, 255, 0], &[])),
        (5, 0x24, 0)
    );
}

#[test]
fn read_capacity_and_rw() {
    let lu = lu();
    let n = nexus(1);
    let r = run(&lu, &n, &[0x25], &[]);
    good(&r);
    assert_eq!(&r.data_in[..], &[0, 0, 0x0f, 0xff, 0, 0, 2, 0]);
    let r = run(
        &lu,
        &n,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        &[],
    );
    good(&r);
    assert_eq!(r.data_in[14] & 0xc0, 0xc0);
    for alloc in 0..16u8 {
        let r = run(
            &lu,
            &n,
            &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, alloc, 0, 0],
            &[],
        );
        good(&r);
        assert_eq!(r.data_in.len(), alloc as usize);
    }
    let data = vec![0xa6u8; 2 * BS];
    good(&run(&lu, &n, &write10(10, 2), &data));
    let r = run(&lu, &n, &read10(10, 2), &[]);
    good(&r);
    assert_eq!(&r.data_in[..], &data[..]);
    // Zero blocks is fine; beyond the end is 05/21/00.
    good(&run(&lu, &n, &read10(0, 0), &[]));
    assert_eq!(
        sense(&run(&lu, &n, &read10(BLOCKS as u32, 1), &[])),
        (5, 0x21, 0)
    );
    assert_eq!(
        sense(&run(&lu, &n, &rw16(0x88, u64::MAX, 1), &[])),
        (5, 0x21, 0)
    );
    assert_eq!(
        sense(&run(&lu, &n, &rw16(0x8a, BLOCKS - 1, 2), &[0; 1024])),
        (5, 0x21, 0)
    );
    // RDPROTECT without protection information.
    let mut c = read10(0, 1);
    c[1] = 0x20;
    assert_eq!(sense(&run(&lu, &n, &c, &[])), (5, 0x24, 0));
    // DPO / FUA / FUA_NV accepted.
    c[1] = 0x1a;
    good(&run(&lu, &n, &c, &[]));
    // READ(6) with length 0 reads 256 blocks.
    let r = run(&lu, &n, &[0x08, 0, 0, 0, 0, 0], &[]);
    good(&r);
    assert_eq!(r.data_in.len(), 256 * BS);
    assert_eq!(
        lu.transfer(&cdb(&[0x08, 0, 0, 0, 0, 0])),
        Ok(Transfer::In(256 * BS as u32))
    );
    // Unknown opcode.
    assert_eq!(sense(&run(&lu, &n, &[0xc5], &[])), (5, 0x20, 0));
    // Reserved bit in TEST UNIT READY.
    assert_eq!(sense(&run(&lu, &n, &[0x00, 0x01], &[])), (5, 0x24, 0));
}

#[test]
fn verify_and_compare_and_write() {
    let lu = lu();
    let n = nexus(1);
    good(&run(&lu, &n, &write10(0, 4), &vec![b'A'; 4 * BS]));
    let mut v = vec![b'A'; 4 * BS];
    let mut c = read10(0, 4);
    c[0] = 0x2f;
    c[1] = 0x02; // BYTCHK 1
    good(&run(&lu, &n, &c, &v));
    v[700] = b'X';
    let r = run(&lu, &n, &c, &v);
    assert_eq!(sense(&r), (0xe, 0x1d, 0));
    assert_eq!(&r.sense.as_ref().unwrap()[3..7], &700u32.to_be_bytes());
    // COMPARE AND WRITE: miscompare leaves data, match writes.
    let mut caw = rw16(0x89, 0, 0);
    caw[13] = 1;
    let mut d = vec![b'A'; BS];
    d.extend(vec![b'B'; BS]);
    good(&run(&lu, &n, &caw, &d));
    let r = run(&lu, &n, &read10(0, 1), &[]);
    assert!(r.data_in.iter().all(|&b| b == b'B'));
    d[5] = b'Z';
    let r = run(&lu, &n, &caw, &d);
    assert_eq!(sense(&r), (0xe, 0x1d, 0));
    assert_eq!(&r.sense.as_ref().unwrap()[3..7], &0u32.to_be_bytes());
    caw[13] = 0;
    good(&run(&lu, &n, &caw, &[]));
}

#[test]
fn write_same_unmap_and_lba_status() {
    let lu = lu();
    let n = nexus(1);
    good(&run(&lu, &n, &write10(0, 16), &vec![1u8; 16 * BS]));
    let mut ws = vec![0x41, 0x08, 0, 0, 0, 0, 0, 0, 8, 0];
    good(&run(&lu, &n, &ws, &vec![0u8; BS]));
    let st = run(
        &lu,
        &n,
        &[0x9e, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 24, 0, 0],
        &[],
    );
    good(&st);
    assert_eq!(st.data_in[20], 1, "deallocated");
    assert_eq!(&st.data_in[16..20], &8u32.to_be_bytes());
    // Wrong data-out size.
    assert_eq!(sense(&run(&lu, &n, &ws, &[0u8; 10])).0, 5);
    // ANCHOR unsupported.
    ws[1] = 0x10;
    assert_eq!(sense(&run(&lu, &n, &ws, &[0u8; BS])), (5, 0x24, 0));
    // UNMAP blocks 8..16.
    let mut p = vec![0, 22, 0, 16, 0, 0, 0, 0];
    p.extend_from_slice(&8u64.to_be_bytes());
    p.extend_from_slice(&8u32.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    good(&run(&lu, &n, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &p));
    let st = run(
        &lu,
        &n,
        &[0x9e, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 24, 0, 0],
        &[],
    );
    assert_eq!(&st.data_in[16..20], &(BLOCKS as u32).to_be_bytes());
    // Beyond end: LBA out of range, nothing changed.
    p[8..16].copy_from_slice(&BLOCKS.to_be_bytes());
    assert_eq!(
        sense(&run(&lu, &n, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &p)),
        (5, 0x21, 0)
    );
    // Short parameter list.
    assert_eq!(
        sense(&run(&lu, &n, &[0x42, 0, 0, 0, 0, 0, 0, 0, 4, 0], &p[..4])),
        (5, 0x1a, 0)
    );
    let beyond = [
        0x9e, 0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 24, 0, 0,
    ];
    assert_eq!(sense(&run(&lu, &n, &beyond, &[])), (5, 0x21, 0));
}

#[test]
fn mode_sense_select_dsense_swp() {
    let lu = lu();
    let (a, b) = (nexus(1), nexus(2));
    good(&run(&lu, &b, &[0x00], &[]));
    let r = run(&lu, &a, &[0x1a, 0, 0x3f, 0, 255, 0], &[]);
    good(&r);
    assert_eq!(r.data_in[0] as usize + 1, r.data_in.len());
    assert_eq!(r.data_in[2] & 0x80, 0);
    let r4 = run(&lu, &a, &[0x1a, 0, 0x3f, 0, 4, 0], &[]);
    assert_eq!(r4.data_in.len(), 4);
    assert_eq!(
        sense(&run(&lu, &a, &[0x1a, 0, 0xca, 0, 255, 0], &[])),
        (5, 0x39, 0)
    );
    // Set D_SENSE via MODE SELECT(6) of the control page.
    let ctl = run(&lu, &a, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[]);
    let mut p = ctl.data_in.to_vec();
    p[0] = 0;
    p[4 + 2] |= 0x04;
    good(&run(&lu, &a, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p));
    let r = run(&lu, &a, &rw16(0x88, u64::MAX, 1), &[]);
    assert_eq!(r.sense.as_ref().unwrap()[0], 0x72);
    assert_eq!(sense(&r), (5, 0x21, 0));
    // The other nexus sees MODE PARAMETERS CHANGED once.
    assert_eq!(sense(&run(&lu, &b, &[0x00], &[])), (6, 0x2a, 1));
    good(&run(&lu, &b, &[0x00], &[]));
    // Changing a non-changeable bit is refused.
    p[4 + 3] |= 0x10;
    assert_eq!(
        sense(&run(&lu, &a, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p)),
        (5, 0x26, 0)
    );
    // SWP makes writes fail with WRITE PROTECTED and sets WP.
    p[4 + 3] &= !0x10;
    p[4 + 2] &= !0x04;
    p[4 + 4] |= 0x08;
    good(&run(&lu, &a, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p));
    assert_eq!(sense(&run(&lu, &a, &write10(0, 1), &[0; BS])), (7, 0x27, 0));
    let r = run(&lu, &a, &[0x1a, 0, 0x3f, 0, 255, 0], &[]);
    assert_eq!(r.data_in[2] & 0x80, 0x80);
}

#[test]
fn removable_prevent_eject() {
    let lu = lu();
    let (a, b) = (nexus(1), nexus(2));
    good(&run(&lu, &a, &[0x1e, 0, 0, 0, 1, 0], &[]));
    assert_eq!(
        sense(&run(&lu, &a, &[0x1b, 0, 0, 0, 2, 0], &[])),
        (5, 0x53, 2)
    );
    assert_eq!(
        sense(&run(&lu, &b, &[0x1b, 0, 0, 0, 2, 0], &[])),
        (5, 0x53, 2)
    );
    good(&run(&lu, &a, &[0x00], &[]));
    lu.nexus_lost(&a);
    good(&run(&lu, &a, &[0x1b, 0, 0, 0, 2, 0], &[]));
    assert_eq!(sense(&run(&lu, &a, &[0x00], &[])), (2, 0x3a, 0));
    assert_eq!(sense(&run(&lu, &a, &read10(0, 1), &[])), (2, 0x3a, 0));
    good(&run(&lu, &a, &[0x1b, 0, 0, 0, 3, 0], &[]));
    good(&run(&lu, &a, &[0x00], &[]));
    // LU reset clears PREVENT and raises a UA for every nexus.
    good(&run(&lu, &a, &[0x1e, 0, 0, 0, 1, 0], &[]));
    lu.reset(&a, ResetKind::LogicalUnit);
    assert_eq!(sense(&run(&lu, &a, &[0x00], &[])), (6, 0x29, 3));
    good(&run(&lu, &a, &[0x1b, 0, 0, 0, 2, 0], &[]));
    good(&run(&lu, &a, &[0x1b, 0, 0, 0, 3, 0], &[]));
}

#[test]
fn reserve6_two_initiators() {
    let lu = lu();
    let (a, b) = (nexus(1), nexus(2));
    good(&run(&lu, &a, &[0x16], &[]));
    good(&run(&lu, &a, &[0x16], &[]));
    assert_eq!(
        run(&lu, &b, &[0x16], &[]).status,
        status::RESERVATION_CONFLICT
    );
    good(&run(&lu, &b, &[0x17], &[]));
    assert_eq!(
        run(&lu, &b, &[0x1a, 0, 0x3f, 0, 255, 0], &[]).status,
        status::RESERVATION_CONFLICT
    );
    good(&run(&lu, &b, &[0x12, 0, 0, 0, 36, 0], &[]));
    good(&run(&lu, &a, &[0x17], &[]));
    good(&run(&lu, &b, &[0x16], &[]));
    lu.nexus_lost(&b);
    good(&run(&lu, &a, &[0x16], &[]));
}

fn prout(sa: u8, kind: u8, key: u64, sa_key: u64) -> (Vec<u8>, Vec<u8>) {
    let c = vec![0x5f, sa, kind, 0, 0, 0, 0, 0, 24, 0];
    let mut p = vec![0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    (c, p)
}

#[test]
fn persistent_reservations() {
    let lu = lu();
    let (a, b) = (nexus(1), nexus(2));
    let (c, p) = prout(6, 0, 0, 0xaa);
    good(&run(&lu, &a, &c, &p));
    let (c, p) = prout(6, 0, 0, 0xbb);
    good(&run(&lu, &b, &c, &p));
    let keys = run(&lu, &a, &[0x5e, 0, 0, 0, 0, 0, 0, 0x10, 0, 0], &[]);
    good(&keys);
    assert_eq!(&keys.data_in[4..8], &16u32.to_be_bytes());
    // Exclusive access: b cannot read.
    let (c, p) = prout(1, 3, 0xaa, 0);
    good(&run(&lu, &a, &c, &p));
    assert_eq!(
        run(&lu, &b, &read10(0, 1), &[]).status,
        status::RESERVATION_CONFLICT
    );
    good(&run(&lu, &a, &read10(0, 1), &[]));
    let res = run(&lu, &b, &[0x5e, 1, 0, 0, 0, 0, 0, 0, 255, 0], &[]);
    assert_eq!(&res.data_in[8..16], &0xaau64.to_be_bytes());
    assert_eq!(res.data_in[21], 3);
    // b preempts a: a's registration is gone and a gets 06/2A/05.
    let (c, p) = prout(4, 3, 0xbb, 0xaa);
    good(&run(&lu, &b, &c, &p));
    assert_eq!(sense(&run(&lu, &a, &[0x00], &[])), (6, 0x2a, 5));
    assert_eq!(
        run(&lu, &a, &read10(0, 1), &[]).status,
        status::RESERVATION_CONFLICT
    );
    // Bad parameter list length.
    let (mut c, p) = prout(6, 0, 0, 1);
    c[8] = 23;
    assert_eq!(sense(&run(&lu, &a, &c, &p[..23])), (5, 0x1a, 0));
    // Service actions 4.. of PR IN are invalid.
    assert_eq!(
        sense(&run(&lu, &a, &[0x5e, 4, 0, 0, 0, 0, 0, 0, 255, 0], &[])),
        (5, 0x24, 0)
    );
    let caps = run(&lu, &a, &[0x5e, 2, 0, 0, 0, 0, 0, 0, 255, 0], &[]);
    good(&caps);
    assert_eq!(&caps.data_in[..2], &[0, 8]);
    // Clean up: b releases and unregisters.
    let (c, p) = prout(2, 3, 0xbb, 0);
    good(&run(&lu, &b, &c, &p));
    let (c, p) = prout(0, 0, 0xbb, 0);
    good(&run(&lu, &b, &c, &p));
    good(&run(&lu, &a, &read10(0, 1), &[]));
}

#[test]
fn report_supported_opcodes() {
    let lu = lu();
    let n = nexus(1);
    let all = run(
        &lu,
        &n,
        &[0xa3, 0x0c, 0x80, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0],
        &[],
    );
    good(&all);
    let len = u32::from_be_bytes([
        all.data_in[0],
        all.data_in[1],
        all.data_in[2],
        all.data_in[3],
    ]);
    assert_eq!(len as usize + 4, all.data_in.len());
    let mut off = 4;
    while off < all.data_in.len() {
        let d = &all.data_in[off..off + 20];
        assert_eq!(d[5] & 0x02, 0x02);
        assert_eq!(&d[20 - 12..20 - 10], &[0, 0x0a]);
        let (opc, servactv) = (d[0], d[5] & 1 != 0);
        let sa = u16::from_be_bytes([d[2], d[3]]);
        let opt = if servactv { 2 } else { 1 };
        let one = run(
            &lu,
            &n,
            &[
                0xa3,
                0x0c,
                opt,
                opc,
                (sa >> 8) as u8,
                sa as u8,
                0,
                0,
                0xff,
                0xff,
                0,
                0,
            ],
            &[],
        );
        good(&one);
        assert_eq!(one.data_in[1] & 7, 3);
        assert_eq!(one.data_in[4], opc);
        let wrong = if servactv { 1 } else { 2 };
        let bad = run(
            &lu,
            &n,
            &[
                0xa3,
                0x0c,
                wrong,
                opc,
                (sa >> 8) as u8,
                sa as u8,
                0,
                0,
                0xff,
                0xff,
                0,
                0,
            ],
            &[],
        );
        assert_eq!(sense(&bad), (5, 0x24, 0));
        off += 20;
    }
}

#[test]
fn lun_table_missing_luns_and_report_luns() {
    let mut m = BTreeMap::new();
    m.insert(1u16, Arc::new(lu()));
    let t = LunTable::new(m);
    let n = nexus(1);
    let lun0 = diskless::pdu::lun_from_index(0);
    let lun1 = diskless::pdu::lun_from_index(1);
    let r = t.execute(
        &n,
        lun0,
        &cdb(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0]),
        &[],
    );
    good(&r);
    assert_eq!(&r.data_in[..4], &8u32.to_be_bytes());
    assert_eq!(&r.data_in[8..16], &lun1.to_be_bytes());
    let r = t.execute(
        &n,
        lun0,
        &cdb(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]),
        &[],
    );
    assert_eq!(sense(&r), (5, 0x24, 0));
    let r = t.execute(
        &n,
        lun0,
        &cdb(&[0xa0, 0, 3, 0, 0, 0, 0, 0, 0, 64, 0, 0]),
        &[],
    );
    assert_eq!(sense(&r), (5, 0x24, 0));
    let r = t.execute(&n, lun0, &cdb(&[0x12, 0, 0, 0, 96, 0]), &[]);
    good(&r);
    assert_eq!(r.data_in[0], 0x7f);
    let r = t.execute(&n, lun0, &cdb(&[0x00]), &[]);
    assert_eq!(sense(&r), (5, 0x25, 0));
    let r = t.execute(&n, lun0, &cdb(&[0x03, 0, 0, 0, 18, 0]), &[]);
    good(&r);
    assert_eq!(r.data_in[12], 0x25);
    good(&t.execute(&n, lun1, &cdb(&[0x00]), &[]));
    assert!(!t.reset(&n, Some(lun0), ResetKind::LogicalUnit));
    assert!(t.reset(&n, Some(lun1), ResetKind::LogicalUnit));
    let r = t.execute(&n, lun1, &cdb(&[0x03, 0, 0, 0, 18, 0]), &[]);
    good(&r);
    assert_eq!((r.data_in[2], r.data_in[12]), (6, 0x29));
    good(&t.execute(&n, lun1, &cdb(&[0x00]), &[]));
}

#[test]
fn read_only_lu() {
    let lu = lu_with(true, false);
    let n = nexus(1);
    assert_eq!(sense(&run(&lu, &n, &write10(0, 1), &[0; BS])), (7, 0x27, 0));
    let mut p = vec![0, 22, 0, 16, 0, 0, 0, 0];
    p.extend_from_slice(&[0; 8]);
    p.extend_from_slice(&1u32.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    assert_eq!(
        sense(&run(&lu, &n, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &p)),
        (7, 0x27, 0)
    );
    let r = run(&lu, &n, &[0x1a, 0, 0x3f, 0, 255, 0], &[]);
    assert_eq!(r.data_in[2] & 0x80, 0x80);
    let r = run(&lu, &n, &[0x12, 0, 0, 0, 36, 0], &[]);
    assert_eq!(r.data_in[1], 0);
}

#[test]
fn concurrent_compare_and_write_is_atomic() {
    let lu = Arc::new(lu());
    good(&run(&lu, &nexus(1), &write10(0, 1), &[0u8; BS]));
    // Each thread increments the counter in block 0 with COMPARE AND WRITE, retrying on
    // miscompare; the final value must equal the number of successful increments.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let lu = lu.clone();
            std::thread::spawn(move || {
                let n = nexus(10 + t);
                let mut done = 0;
                while done < 25 {
                    let cur = run(&lu, &n, &read10(0, 1), &[]).data_in.to_vec();
                    let v = u32::from_be_bytes([cur[0], cur[1], cur[2], cur[3]]);
                    let mut next = cur.clone();
                    next[..4].copy_from_slice(&(v + 1).to_be_bytes());
                    let mut d = cur;
                    d.extend(next);
                    let mut c = rw16(0x89, 0, 0);
                    c[13] = 1;
                    if run(&lu, &n, &c, &d).status == status::GOOD {
                        done += 1;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let r = run(&lu, &nexus(1), &read10(0, 1), &[]);
    assert_eq!(&r.data_in[..4], &100u32.to_be_bytes());
}

fn xcopy_params(naa: &[u8; 16], src: u64, dst: u64, n: u16, dst_index: u16) -> Vec<u8> {
    let mut p = vec![0u8; 16];
    p[0] = 1;
    p[2..4].copy_from_slice(&32u16.to_be_bytes());
    p[8..12].copy_from_slice(&28u32.to_be_bytes());
    let mut t = vec![0xe4, 0, 0, 0, 0x01, 0x03, 0, 16];
    t.extend_from_slice(naa);
    t.resize(28, 0);
    t.extend_from_slice(&[0, 0, 2, 0]);
    p.extend(t);
    let mut s = vec![0x02, 0, 0, 0x18, 0, 0];
    s.extend_from_slice(&dst_index.to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(&n.to_be_bytes());
    s.extend_from_slice(&src.to_be_bytes());
    s.extend_from_slice(&dst.to_be_bytes());
    p.extend(s);
    p
}

#[test]
fn extended_copy_within_lu() {
    let lu = lu();
    let n = nexus(1);
    let naa = ident().naa;
    good(&run(&lu, &n, &write10(0, 8), &vec![b'A'; 8 * BS]));
    let p = xcopy_params(&naa, 0, 100, 8, 0);
    let mut c = vec![0x83, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c.extend_from_slice(&(p.len() as u32).to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    good(&run(&lu, &n, &c, &p));
    let r = run(&lu, &n, &read10(100, 8), &[]);
    assert!(r.data_in.iter().all(|&b| b == b'A'));
    // Truncated list, unreachable index, beyond the end.
    c[13] = (p.len() - 1) as u8;
    assert_eq!(sense(&run(&lu, &n, &c, &p[..p.len() - 1])), (5, 0x1a, 0));
    c[13] = p.len() as u8;
    let bad = xcopy_params(&naa, 0, 100, 8, 1);
    assert_eq!(sense(&run(&lu, &n, &c, &bad)), (0xa, 0x08, 0x04));
    let eol = xcopy_params(&naa, 0, BLOCKS - 1, 8, 0);
    assert_eq!(sense(&run(&lu, &n, &c, &eol)).0, 0xa);
    let mut other = naa;
    other[15] ^= 1;
    let p = xcopy_params(&other, 0, 100, 8, 0);
    assert_eq!(sense(&run(&lu, &n, &c, &p)), (0xa, 0x0d, 0x02));
    let rcr = run(
        &lu,
        &n,
        &[0x84, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0],
        &[],
    );
    good(&rcr);
    assert_eq!(rcr.data_in[43], 2);
}

#[test]
fn transfer_lengths_from_cdbs() {
    let lu = lu();
    let t = |c: &[u8]| lu.transfer(&cdb(c));
    assert_eq!(t(&read10(0, 3)), Ok(Transfer::In(3 * BS as u32)));
    assert_eq!(t(&write10(0, 2)), Ok(Transfer::Out(2 * BS as u32)));
    assert_eq!(t(&[0x12, 0, 0, 1, 0, 0]), Ok(Transfer::In(256)));
    assert_eq!(t(&[0x00]), Ok(Transfer::None));
    assert_eq!(
        t(&[0x41, 0, 0, 0, 0, 0, 0, 0, 9, 0]),
        Ok(Transfer::Out(BS as u32))
    );
    let mut ndob = rw16(0x93, 0, 4);
    ndob[1] = 0x01;
    assert_eq!(t(&ndob), Ok(Transfer::None));
    let mut caw = rw16(0x89, 0, 0);
    caw[13] = 2;
    assert_eq!(t(&caw), Ok(Transfer::Out(4 * BS as u32)));
    assert_eq!(
        t(&[0x5f, 0, 0, 0, 0, 0, 0, 0, 24, 0]),
        Ok(Transfer::Out(24))
    );
    assert!(t(&[0xee]).is_err());
}

#[test]
fn misc_block_commands() {
    let lu = lu();
    let n = nexus(1);
    // PRE-FETCH and SYNCHRONIZE CACHE: range checked, GOOD.
    good(&run(&lu, &n, &[0x34, 0x02, 0, 0, 0, 0, 0, 0, 1, 0], &[]));
    good(&run(&lu, &n, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]));
    let mut pf = rw16(0x90, BLOCKS - 1, 2);
    assert_eq!(sense(&run(&lu, &n, &pf, &[])), (5, 0x21, 0));
    pf[0] = 0x91;
    assert_eq!(sense(&run(&lu, &n, &pf, &[])), (5, 0x21, 0));
    // READ DEFECT DATA: empty lists.
    let r = run(&lu, &n, &[0x37, 0, 0x18, 0, 0, 0, 0, 0, 32, 0], &[]);
    good(&r);
    assert_eq!(r.data_in.len(), 4);
    // ORWRITE ORs into the medium.
    good(&run(&lu, &n, &write10(3, 1), &[0x0f; BS]));
    good(&run(&lu, &n, &rw16(0x8b, 3, 1), &[0xf0; BS]));
    let r = run(&lu, &n, &read10(3, 1), &[]);
    assert!(r.data_in.iter().all(|&b| b == 0xff));
    // WRITE ATOMIC(16): length in bytes 12-13.
    let mut wa = rw16(0x9c, 5, 0);
    wa[13] = 2;
    good(&run(&lu, &n, &wa, &[7u8; 2 * BS]));
    let r = run(&lu, &n, &read10(5, 2), &[]);
    assert!(r.data_in.iter().all(|&b| b == 7));
    wa[2..10].copy_from_slice(&(BLOCKS - 1).to_be_bytes());
    assert_eq!(sense(&run(&lu, &n, &wa, &[7u8; 2 * BS])), (5, 0x21, 0));
    // WRITE SAME(16) NDOB deallocates on a thin LU.
    let mut ws = rw16(0x93, 5, 2);
    ws[1] = 0x09;
    good(&run(&lu, &n, &ws, &[]));
    let r = run(&lu, &n, &read10(5, 2), &[]);
    assert!(r.data_in.iter().all(|&b| b == 0));
    // WRITE SAME(10) of zero blocks covers the rest of the medium.
    good(&run(
        &lu,
        &n,
        &[0x41, 0, 0, 0, 0x0f, 0xf0, 0, 0, 0, 0],
        &[0xab; BS],
    ));
    let r = run(&lu, &n, &read10(0x0ff0, 16), &[]);
    assert!(r.data_in.iter().all(|&b| b == 0xab));
    // REQUEST SENSE with DESC=1 and nothing pending.
    let r = run(&lu, &n, &[0x03, 1, 0, 0, 252, 0], &[]);
    good(&r);
    assert_eq!(&r.data_in[..4], &[0x72, 0, 0, 0]);
    // MODE SENSE(10) with LLBAA: long block descriptor.
    let r = run(&lu, &n, &[0x5a, 0x10, 0x08, 0, 0, 0, 0, 0, 255, 0], &[]);
    good(&r);
    assert_eq!(&r.data_in[6..8], &[0, 16]);
    assert_eq!(&r.data_in[8..16], &BLOCKS.to_be_bytes());
    assert_eq!(r.data_in[24], 0x08);
    // Changeable values: WCE, D_SENSE, SWP only.
    let r = run(&lu, &n, &[0x1a, 0x08, 0x7f, 0, 255, 0], &[]);
    good(&r);
    assert_eq!(r.data_in[4 + 2], 0x04);
}

#[test]
fn all_registrants_write_exclusive() {
    let lu = lu();
    let (a, b, c) = (nexus(1), nexus(2), nexus(3));
    for (nx, k) in [(&a, 1u64), (&b, 2)] {
        let (cd, p) = prout(6, 0, 0, k);
        good(&run(&lu, nx, &cd, &p));
    }
    let (cd, p) = prout(1, 7, 1, 0);
    good(&run(&lu, &a, &cd, &p));
    let res = run(&lu, &c, &[0x5e, 1, 0, 0, 0, 0, 0, 0, 255, 0], &[]);
    assert_eq!(&res.data_in[8..16], &[0; 8]);
    assert_eq!(res.data_in[21], 7);
    good(&run(&lu, &b, &write10(0, 1), &[1; BS]));
    good(&run(&lu, &c, &read10(0, 1), &[]));
    assert_eq!(
        run(&lu, &c, &write10(0, 1), &[1; BS]).status,
        status::RESERVATION_CONFLICT
    );
    // RESERVE(6) conflicts while persistent reservations exist.
    assert_eq!(
        run(&lu, &c, &[0x16], &[]).status,
        status::RESERVATION_CONFLICT
    );
    // READ FULL STATUS lists both registrants as holders.
    let fs = run(&lu, &a, &[0x5e, 3, 0, 0, 0, 0, 0, 0, 255, 0], &[]);
    good(&fs);
    assert_eq!(fs.data_in[8 + 12], 1);
    // Holder leaves: the reservation stays for the remaining registrant.
    let (cd, p) = prout(0, 0, 1, 0);
    good(&run(&lu, &a, &cd, &p));
    assert_eq!(
        run(&lu, &c, &write10(0, 1), &[1; BS]).status,
        status::RESERVATION_CONFLICT
    );
    let (cd, p) = prout(0, 0, 2, 0);
    good(&run(&lu, &b, &cd, &p));
    good(&run(&lu, &c, &write10(0, 1), &[1; BS]));
}

#[test]
fn cold_reset_restores_mode_defaults_and_warns_everyone() {
    let lu = lu();
    let (a, b) = (nexus(1), nexus(2));
    good(&run(&lu, &b, &[0x00], &[]));
    let ctl = run(&lu, &a, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[]);
    let mut p = ctl.data_in.to_vec();
    p[0] = 0;
    p[6] |= 0x04;
    good(&run(&lu, &a, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p));
    lu.reset(&a, ResetKind::TargetCold);
    assert_eq!(sense(&run(&lu, &a, &[0x00], &[])), (6, 0x29, 1));
    let r = run(&lu, &a, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[]);
    assert_eq!(r.data_in[6] & 0x04, 0);
    let r = run(&lu, &b, &[0x00], &[]);
    assert_eq!(sense(&r).0, 6);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Any CDB and Data-Out: no panic, and CHECK CONDITION always carries sense.
        #[test]
        fn random_cdbs_never_panic(
            op in prop::sample::select(vec![
                0x00u8, 0x03, 0x08, 0x0a, 0x12, 0x15, 0x16, 0x17, 0x1a, 0x1b, 0x1e, 0x25,
                0x28, 0x2a, 0x2e, 0x2f, 0x34, 0x35, 0x37, 0x41, 0x42, 0x55, 0x5a, 0x5e,
                0x5f, 0x83, 0x84, 0x88, 0x89, 0x8a, 0x8b, 0x8e, 0x8f, 0x90, 0x91, 0x93,
                0x9c, 0x9e, 0xa0, 0xa3, 0xa8, 0xaa, 0xae, 0xaf, 0xb7, 0xff,
            ]),
            rest in prop::collection::vec(any::<u8>(), 15),
            small in prop::collection::vec(0u8..4, 15),
            data in prop::collection::vec(any::<u8>(), 0..2048),
        ) {
            let store = Arc::new(MemStore::new(64 * BS as u64, BS as u32, false));
            let lu = LogicalUnit::with_options(store, ident(), LuOptions {
                removable: true,
                ..LuOptions::default()
            });
            let n = nexus(1);
            for body in [&rest, &small] {
                let mut c = vec![op];
                c.extend_from_slice(body);
                let _ = lu.transfer(&c);
                let r = lu.execute(&n, &c, &data);
                if r.status == status::CHECK_CONDITION {
                    prop_assert!(r.sense.is_some());
                }
            }
        }
    }
}

/// A fully provisioned store: MemStore that does not claim thin provisioning.
struct Thick(MemStore);

impl diskless::storage::BlockStore for Thick {
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        self.0.read_only()
    }
    fn read_at(&self, b: &mut [u8], o: u64) -> Result<(), diskless::storage::StorageError> {
        self.0.read_at(b, o)
    }
    fn write_at(&self, d: &[u8], o: u64, f: bool) -> Result<(), diskless::storage::StorageError> {
        self.0.write_at(d, o, f)
    }
    fn flush(&self) -> Result<(), diskless::storage::StorageError> {
        self.0.flush()
    }
    fn discard(&self, o: u64, l: u64) -> Result<(), diskless::storage::StorageError> {
        self.0.discard(o, l)
    }
    fn thin_provisioned(&self) -> bool {
        false
    }
    fn allocation(&self, o: u64) -> Result<(bool, u64), diskless::storage::StorageError> {
        self.0.allocation(o)
    }
}

#[test]
fn fully_provisioned_lu_has_no_unmap() {
    let store = Arc::new(Thick(MemStore::new(BLOCKS * BS as u64, BS as u32, false)));
    let lu = LogicalUnit::new(store, ident());
    let n = nexus(1);
    let r = run(
        &lu,
        &n,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        &[],
    );
    assert_eq!(r.data_in[14] & 0xc0, 0);
    let lbp = run(&lu, &n, &[0x12, 1, 0xb2, 0, 255, 0], &[]);
    assert_eq!(lbp.data_in[5], 0);
    let bl = run(&lu, &n, &[0x12, 1, 0xb0, 0, 255, 0], &[]);
    assert_eq!(&bl.data_in[20..28], &[0; 8]);
    let p = [0, 6, 0, 0, 0, 0, 0, 0];
    assert_eq!(
        sense(&run(&lu, &n, &[0x42, 0, 0, 0, 0, 0, 0, 0, 8, 0], &p)),
        (5, 0x20, 0)
    );
    assert!(lu
        .transfer(&cdb(&[0x42, 0, 0, 0, 0, 0, 0, 0, 8, 0]))
        .is_err());
    assert_eq!(
        sense(&run(
            &lu,
            &n,
            &[0x41, 0x08, 0, 0, 0, 0, 0, 0, 1, 0],
            &[0; BS]
        )),
        (5, 0x24, 0)
    );
    good(&run(&lu, &n, &[0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0; BS]));
    // REPORT SUPPORTED OPERATION CODES agrees.
    let one = run(
        &lu,
        &n,
        &[0xa3, 0x0c, 1, 0x42, 0, 0, 0, 0, 0xff, 0xff, 0, 0],
        &[],
    );
    good(&one);
    assert_eq!(one.data_in[1] & 7, 1);
    let ws = run(
        &lu,
        &n,
        &[0xa3, 0x0c, 1, 0x41, 0, 0, 0, 0, 0xff, 0xff, 0, 0],
        &[],
    );
    assert_eq!(ws.data_in[5] & 0x08, 0);
}
