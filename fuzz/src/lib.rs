//! Fuzz harnesses for diskless, shared by the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`)
//! and by the plain regression tests (`tests/fuzz_regressions.rs` includes this file with
//! `#[path]`), so a crash input replays under `cargo test` without cargo-fuzz.
//!
//! Each harness takes arbitrary bytes, must never panic, and asserts invariants of the API it
//! drives. Input layouts are documented per harness; the seed corpora follow them
//! (`fuzz/make_seeds.py`). Only `diskless`, `bytes` and `crc32c` are used, so the file also
//! compiles as a module of the main crate's integration tests.

use bytes::{Bytes, BytesMut};
use diskless::login::keys;
use diskless::login::params::{rfc_defaults, Negotiator};
use diskless::login::{
    AuthPolicy, ChapCredentials, Directory, LoginMachine, LoginOutcome, OurParams, SessionParams,
    SessionType, TargetEntry, TargetLookup, TextMachine, TextOutcome,
};
use diskless::pdu::{self, Bhs, Digests, LoginRequest, Pdu, TextRequest, BHS_LEN};
use diskless::scsi::{
    status, LogicalUnit, LuIdentity, LuOptions, LunTable, Nexus, ResetKind, ScsiResult, Transfer,
};
use diskless::storage::{BlockStore, MemStore};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// A cursor over the fuzz input: every read succeeds (zeros once the input is exhausted),
/// so a harness never has to special-case short inputs.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) << 32 | u64::from(self.u32())
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }

    /// A u16-length-prefixed byte string.
    pub fn chunk(&mut self) -> &'a [u8] {
        let n = self.u16() as usize;
        self.bytes(n)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }
}

// ---------------------------------------------------------------------------------------------
// pdu_decode

/// Data segment limits the harness tries (our default declaration, the login-phase limit, the
/// wire maximum and zero).
const MAX_SEGMENTS: [u32; 4] = [262_144, 8192, pdu::MAX_WIRE_DATA_SEGMENT, 0];

/// Input: one flag byte, then wire bytes.
/// - bit 0: header digest, bit 1: data digest (RFC 7143 §13.1);
/// - bit 2: overwrite the digests with correct CRC32Cs first, so mutations reach the parsers
///   behind a digest check instead of stopping at a mismatch;
/// - bits 3-4: the MaxRecvDataSegmentLength given to `frame_length`.
///
/// Checks: `frame_length` and `decode` never panic; a measured frame fits the buffer; a
/// decoded PDU re-encodes to bytes that frame to their own length and decode to an equal PDU.
pub fn pdu_decode(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let digests = Digests {
        header: flags & 1 != 0,
        data: flags & 2 != 0,
    };
    let max = MAX_SEGMENTS[usize::from((flags >> 3) & 3)];
    let mut wire = input.rest().to_vec();
    if flags & 4 != 0 {
        fix_digests(&mut wire, digests);
    }

    // The framing contract: Some(n) means one PDU of exactly n bytes is buffered.
    match pdu::frame_length(&wire, digests, max) {
        Ok(Some(n)) => {
            assert!(
                n >= BHS_LEN && n <= wire.len(),
                "frame {n} of {}",
                wire.len()
            );
            if let Some(frame) = wire.get(..n) {
                if let Ok(p) = pdu::decode(Bytes::copy_from_slice(frame), digests) {
                    round_trip(&p, digests);
                }
            }
        }
        Ok(None) => {}
        Err(e) => {
            if let Some(n) = e.frame_len() {
                assert!(
                    n >= BHS_LEN && n <= wire.len(),
                    "skip {n} of {}",
                    wire.len()
                );
            }
        }
    }
    // `decode` must be safe on its own, on any buffer.
    if let Ok(p) = pdu::decode(Bytes::from(wire), digests) {
        round_trip(&p, digests);
    }
}

/// encode(p) frames to its own length and decodes back to p, with and without digests.
pub fn round_trip(p: &Pdu, digests: Digests) {
    for d in [digests, Digests::default()] {
        let mut out = BytesMut::new();
        pdu::encode(p, d, &mut out);
        let len = out.len();
        assert_eq!(
            pdu::frame_length(&out, d, pdu::MAX_WIRE_DATA_SEGMENT),
            Ok(Some(len)),
            "re-encoded {p:?}"
        );
        let again = pdu::decode(out.freeze(), d);
        assert_eq!(again.as_ref(), Ok(p), "round trip of {p:?}");
    }
}

/// Writes correct header and data digests into a buffer laid out as one PDU (as far as the
/// buffer reaches). Covers BHS+AHS and data+zero padding, little-endian (§13.1).
pub fn fix_digests(wire: &mut [u8], digests: Digests) {
    if wire.len() < BHS_LEN {
        return;
    }
    let ahs = usize::from(wire[4]) * 4;
    let dsl = u32::from_be_bytes([0, wire[5], wire[6], wire[7]]) as usize;
    let mut at = BHS_LEN + ahs;
    if digests.header {
        let crc = match wire.get(..at) {
            Some(h) => crc32c::crc32c(h),
            None => return,
        };
        match wire.get_mut(at..at + 4) {
            Some(d) => d.copy_from_slice(&crc.to_le_bytes()),
            None => return,
        }
        at += 4;
    }
    if digests.data && dsl > 0 {
        let pad = pdu::pad_len(dsl);
        let crc = match wire.get(at..at + dsl) {
            Some(d) => crc32c::crc32c_append(crc32c::crc32c(d), &[0u8; 3][..pad]),
            None => return,
        };
        if let Some(d) = wire.get_mut(at + dsl + pad..at + dsl + pad + 4) {
            d.copy_from_slice(&crc.to_le_bytes());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// text_keys

/// Input: a whole text data segment (RFC 7143 §6.1).
///
/// Checks: `keys::parse` never panics; what it accepts formats back to text that parses to the
/// same pairs; the value helpers and the operational-key negotiator (for both session types)
/// take every accepted pair without panicking, and a key accepted once is refused the second
/// time (§6.1: a key is negotiated once per login).
pub fn text_keys(data: &[u8]) {
    let Ok(pairs) = keys::parse(data) else {
        return;
    };
    assert_eq!(keys::parse(&keys::format(&pairs)).as_ref(), Ok(&pairs));
    for (_, v) in &pairs {
        let _ = keys::number(v);
        let _ = keys::range(v);
        let _ = keys::binary(v);
        let _ = keys::boolean(v);
        let _ = keys::list(v).count();
        if let Some(b) = keys::binary(v) {
            // hex() output is a binary value that decodes to the same bytes.
            assert_eq!(keys::binary(&keys::hex(&b)), Some(b));
        }
        if let Some(n) = keys::number(v) {
            assert_eq!(keys::number(&n.to_string()), Some(n));
        }
    }
    for st in [SessionType::Normal, SessionType::Discovery] {
        let mut neg = Negotiator::new(OurParams::default(), st);
        for (k, v) in &pairs {
            let _ = neg.negotiate(k, v);
        }
        let _ = neg.finish();
    }
}

// ---------------------------------------------------------------------------------------------
// login_sequence

pub const DISK: &str = "iqn.2026-11.test:disk";
pub const CHAP: &str = "iqn.2026-11.test:chap";
pub const MUTUAL: &str = "iqn.2026-11.test:mutual";
pub const PRIVATE: &str = "iqn.2026-11.test:private";
pub const VIP: &str = "iqn.2026-11.test:vip";
pub const CHAP_USER: &str = "user";
pub const CHAP_SECRET: &str = "secret-1234567";
pub const MUTUAL_USER: &str = "target";
pub const MUTUAL_SECRET: &str = "tsecret-7654321";

/// A fixed directory: one open target, one-way CHAP, mutual CHAP, and one allowed only for
/// [`VIP`] (who must also use CHAP for discovery).
pub struct TestDirectory;

fn creds(mutual: bool) -> ChapCredentials {
    ChapCredentials {
        user: CHAP_USER.into(),
        secret: CHAP_SECRET.into(),
        mutual: mutual.then(|| (MUTUAL_USER.into(), MUTUAL_SECRET.into())),
    }
}

impl Directory for TestDirectory {
    fn discovery_auth(&self, initiator: &str) -> AuthPolicy {
        if initiator == VIP {
            AuthPolicy::Chap(creds(false))
        } else {
            AuthPolicy::None
        }
    }
    fn lookup(&self, initiator: &str, target: &str) -> TargetLookup {
        match target {
            DISK => TargetLookup::Allowed(AuthPolicy::None),
            CHAP => TargetLookup::Allowed(AuthPolicy::Chap(creds(false))),
            MUTUAL => TargetLookup::Allowed(AuthPolicy::Chap(creds(true))),
            PRIVATE if initiator == VIP => TargetLookup::Allowed(AuthPolicy::None),
            PRIVATE => TargetLookup::NotAuthorized,
            _ => TargetLookup::NotFound,
        }
    }
    fn visible_targets(&self, initiator: &str, local: SocketAddr) -> Vec<TargetEntry> {
        let mut v: Vec<TargetEntry> = [DISK, CHAP, MUTUAL]
            .iter()
            .map(|n| TargetEntry {
                name: n.to_string(),
                addresses: vec![format!("{local},1")],
            })
            .collect();
        if initiator == VIP {
            v.push(TargetEntry {
                name: PRIVATE.into(),
                addresses: vec![format!("{local},1"), "[fd00::1]:3260,2".into()],
            });
        }
        v
    }
    fn target_alias(&self, target: &str) -> Option<String> {
        (target == DISK).then(|| "boot disk".into())
    }
}

fn local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3260))
}

/// Input: one mode byte, then records.
///
/// Mode bit 0 clear: a login. Each record is `flags, mutation, u16-LE length, data`:
/// flags bit 7 T, bit 6 C, bits 2-3 CSG, bits 0-1 NSG; bit 4: apply `mutation` (bits 0-2 pick
/// ISID / TSIH / CID / CmdSN / version / ITT to change); bit 5: append a correct CHAP_N/CHAP_R
/// answer to the last CHAP challenge (so the fuzzer gets past authentication). After the login
/// completes, the remaining records drive a [`TextMachine`] with the negotiated parameters.
/// Mode bit 0 set: only text records, on RFC-default parameters (bit 1: discovery session).
///
/// Text records are `flags, u16-LE length, data`: bit 7 F, bit 6 C, bit 5 use the last
/// Target Transfer Tag (else 0xffffffff), bit 4 use another ITT.
///
/// Checks: no panic; every response is the right PDU for the request (ITT echoed, login data
/// within the 8192-byte login limit, text data within the initiator's MaxRecvDataSegmentLength);
/// a finished login machine only fails afterwards.
pub fn login_sequence(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let dir: Arc<dyn Directory> = Arc::new(TestDirectory);
    let params = if mode & 1 == 0 {
        match login_phase(&mut input, dir.clone()) {
            Some(p) => p,
            None => return,
        }
    } else if mode & 2 != 0 {
        rfc_defaults(SessionType::Discovery)
    } else {
        let mut p = rfc_defaults(SessionType::Normal);
        p.initiator_name = VIP.into();
        p.target_name = DISK.into();
        p
    };
    text_phase(&mut input, dir, params);
}

/// Runs login records until the login completes (returns its parameters) or the input ends.
pub fn login_phase(input: &mut Input<'_>, dir: Arc<dyn Directory>) -> Option<SessionParams> {
    let mut m = LoginMachine::new(dir, OurParams::default(), local());
    let mut req = LoginRequest {
        isid: [0x80, 0x00, 0x27, 0x23, 0x12, 0x34],
        itt: 1,
        ..LoginRequest::default()
    };
    let mut last_response: Vec<u8> = Vec::new();
    let mut finished = false;
    while !input.is_empty() {
        let flags = input.u8();
        let mutation = input.u8();
        req.transit = flags & 0x80 != 0;
        req.cont = flags & 0x40 != 0;
        req.csg = (flags >> 2) & 3;
        req.nsg = flags & 3;
        if flags & 0x10 != 0 {
            match mutation & 7 {
                0 => req.isid[5] ^= mutation,
                1 => req.tsih = u16::from(mutation),
                2 => req.cid = u16::from(mutation),
                3 => req.cmd_sn = req.cmd_sn.wrapping_add(u32::from(mutation)),
                4 => req.version_max = mutation >> 4,
                5 => req.version_min = mutation >> 4,
                6 => req.exp_stat_sn = u32::from(mutation),
                _ => req.itt = req.itt.wrapping_add(1),
            }
        }
        let mut text = input.chunk().to_vec();
        if flags & 0x20 != 0 {
            text.extend_from_slice(&chap_answer(&last_response));
        }
        let outcome = m.step(&req, &text);
        let (resp, done) = match &outcome {
            LoginOutcome::Continue(p) => (p, None),
            LoginOutcome::Failed(p) => (p, Some(false)),
            LoginOutcome::Complete(c) => (&c.response, Some(true)),
        };
        let Bhs::LoginResponse(r) = &resp.bhs else {
            panic!("login answered with {resp:?}");
        };
        assert_eq!(r.itt, req.itt, "ITT not echoed");
        assert!(
            resp.data.len() <= 8192,
            "login response of {}",
            resp.data.len()
        );
        if finished {
            assert!(
                matches!(outcome, LoginOutcome::Failed(_)),
                "step after the end"
            );
        }
        last_response = resp.data.to_vec();
        match done {
            Some(true) => {
                // The session layer sends the final response: it must be T=1, NSG=3.
                assert!(r.transit && r.nsg == 3, "completing response {r:?}");
                if let LoginOutcome::Complete(c) = outcome {
                    return Some(c.params);
                }
            }
            Some(false) => {
                assert_ne!(r.status_class, 0, "failure with status 0");
                finished = true;
            }
            None => {}
        }
        req.exp_stat_sn = req.exp_stat_sn.wrapping_add(1);
    }
    None
}

/// CHAP_N and CHAP_R answering the CHAP_I/CHAP_C in `last` with the test secret (RFC 1994).
fn chap_answer(last: &[u8]) -> Vec<u8> {
    let Ok(pairs) = keys::parse(last) else {
        return Vec::new();
    };
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let (Some(id), Some(challenge)) = (
        get("CHAP_I").and_then(keys::number),
        get("CHAP_C").and_then(keys::binary),
    ) else {
        return Vec::new();
    };
    let r = diskless::login::chap::chap_response(id as u8, CHAP_SECRET.as_bytes(), &challenge);
    keys::format(&[
        ("CHAP_N".into(), CHAP_USER.into()),
        ("CHAP_R".into(), keys::hex(&r)),
    ])
}

fn text_phase(input: &mut Input<'_>, dir: Arc<dyn Directory>, mut params: SessionParams) {
    let mut t = TextMachine::new(dir, local());
    let mut last_ttt = 0xffff_ffff;
    let mut itt = 0x100;
    let mut cmd_sn = 1u32;
    while !input.is_empty() {
        let flags = input.u8();
        if flags & 0x10 != 0 {
            itt += 1;
        }
        let req = TextRequest {
            immediate: false,
            final_: flags & 0x80 != 0,
            cont: flags & 0x40 != 0,
            lun: 0,
            itt,
            ttt: if flags & 0x20 != 0 {
                last_ttt
            } else {
                0xffff_ffff
            },
            cmd_sn,
            exp_stat_sn: 0,
        };
        cmd_sn = cmd_sn.wrapping_add(1);
        let data = input.chunk();
        let limit = params.initiator_max_recv_data_segment_length as usize;
        let resp = match t.step(&params, &req, data) {
            TextOutcome::Respond(p) => p,
            TextOutcome::Renegotiated(p, new) => {
                params = *new;
                p
            }
            TextOutcome::Reject(_) => continue,
        };
        let Bhs::TextResponse(r) = &resp.bhs else {
            panic!("text answered with {resp:?}");
        };
        assert_eq!(r.itt, req.itt, "ITT not echoed");
        assert!(
            resp.data.len() <= limit,
            "text response {} > {limit}",
            resp.data.len()
        );
        // §11.11.4: F=0 needs a tag to continue under; F=1 carries none... unless C.
        if !r.final_ {
            assert_ne!(r.ttt, 0xffff_ffff, "continuing response without a TTT");
        }
        last_ttt = r.ttt;
    }
}

// ---------------------------------------------------------------------------------------------
// scsi_cdb

fn identity(n: u8) -> LuIdentity {
    LuIdentity {
        vendor: "DISKLESS".into(),
        product: "FUZZ DISK".into(),
        revision: "0001".into(),
        serial: format!("FUZZ{n:04}"),
        naa: [0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, n],
    }
}

/// LUN 0: 64 KiB of 512-byte blocks (thin). LUN 1: 64 KiB of 4096-byte blocks, read-only and
/// removable. LUN 2 does not exist.
pub fn test_luns() -> LunTable {
    test_luns_with_stores().0
}

/// [`test_luns`] and the stores behind LUN 0 and LUN 1, to check data against.
pub fn test_luns_with_stores() -> (LunTable, [Arc<MemStore>; 2]) {
    let stores = [
        Arc::new(MemStore::new(64 * 1024, 512, false)),
        Arc::new(MemStore::new(64 * 1024, 4096, true)),
    ];
    let mut luns = BTreeMap::new();
    luns.insert(
        0u16,
        Arc::new(LogicalUnit::new(stores[0].clone(), identity(0))),
    );
    luns.insert(
        1u16,
        Arc::new(LogicalUnit::with_options(
            stores[1].clone(),
            identity(1),
            LuOptions {
                removable: true,
                max_transfer_blocks: 8,
                ..LuOptions::default()
            },
        )),
    );
    (LunTable::new(luns), stores)
}

/// Big-endian field of `len` bytes at `at`, missing bytes read as zero.
fn field(cdb: &[u8], at: usize, len: usize) -> u64 {
    (at..at + len).fold(0, |acc, i| {
        (acc << 8) | u64::from(cdb.get(i).copied().unwrap_or(0))
    })
}

/// For plain READ/WRITE(6/10/12/16) (SBC-3 §5.15-5.18, §5.29-5.32): (is_write, LBA, blocks).
pub fn plain_rw(cdb: &[u8]) -> Option<(bool, u64, u64)> {
    let (write, lba, blocks) = match cdb.first()? {
        0x08 | 0x0a => {
            let n = field(cdb, 4, 1);
            (
                cdb[0] == 0x0a,
                field(cdb, 1, 3) & 0x1f_ffff,
                if n == 0 { 256 } else { n },
            )
        }
        0x28 | 0x2a => (cdb[0] == 0x2a, field(cdb, 2, 4), field(cdb, 7, 2)),
        0xa8 | 0xaa => (cdb[0] == 0xaa, field(cdb, 2, 4), field(cdb, 6, 4)),
        0x88 | 0x8a => (cdb[0] == 0x8a, field(cdb, 2, 8), field(cdb, 10, 4)),
        _ => return None,
    };
    Some((write, lba, blocks))
}

/// A GOOD READ returned exactly the stored blocks; a GOOD WRITE stored the whole blocks of its
/// Data-Out there.
fn check_data(store: &MemStore, cdb: &[u8], data_out: &[u8], r: &ScsiResult) {
    let Some((write, lba, blocks)) = plain_rw(cdb) else {
        return;
    };
    if r.status != status::GOOD {
        return;
    }
    let bs = u64::from(store.block_size());
    let snap = store.snapshot();
    let (Some(start), Some(len)) = (lba.checked_mul(bs), blocks.checked_mul(bs)) else {
        panic!("GOOD for an impossible range {cdb:02x?}");
    };
    let stored = usize::try_from(start)
        .ok()
        .zip(usize::try_from(start + len).ok())
        .and_then(|(a, b)| snap.get(a..b));
    let Some(stored) = stored else {
        panic!("GOOD beyond the end of the medium {cdb:02x?}");
    };
    if write {
        // A Data-Out cut short by the transport (FCP-4 §9.4.2) writes the whole blocks that
        // arrived; the rest of the range keeps its old contents.
        let bs = bs as usize;
        let n = (data_out.len() / bs * bs).min(stored.len());
        assert!(
            stored.get(..n) == data_out.get(..n),
            "write not stored {cdb:02x?}"
        );
    } else {
        assert!(
            &r.data_in[..] == stored,
            "read returned other data {cdb:02x?}"
        );
    }
}

pub fn test_nexus(i: u8) -> Nexus {
    let name = format!("iqn.2026-11.test:init{i}");
    Nexus {
        id: u64::from(i) + 1,
        initiator_port: format!("{name},i,0x80002723000{i}"),
        initiator_name: name,
        relative_port: 1,
        target_port: String::new(),
    }
}

/// The largest Data-Out the harness builds to match a CDB's transfer length.
const MAX_EXACT_OUT: u32 = 1 << 20;

/// (sense key, ASC, ASCQ) from fixed or descriptor sense data (SPC-4 §4.5).
pub fn sense_triple(s: &[u8]) -> Option<(u8, u8, u8)> {
    match s.first()? & 0x7f {
        0x70 | 0x71 => Some((s.get(2)? & 0xf, *s.get(12)?, *s.get(13)?)),
        0x72 | 0x73 => Some((s.get(1)? & 0xf, *s.get(2)?, *s.get(3)?)),
        _ => None,
    }
}

/// Input: records, each starting with an op byte.
/// - op bits 0-2 < 6: a command. Op bit 3: nexus 1 (else 0); bits 4-5: LUN 0, 1, 2 (absent)
///   or a raw 8-byte LUN from the input; bit 6: make the Data-Out exactly the length
///   `transfer` reports (else the record's own bytes); bit 7: CDB length from the input
///   (else 16). Then the CDB, then a u16-LE-length-prefixed Data-Out.
/// - 6: a reset (next byte: bit 0 whole target, bits 1-2 kind, bit 3 nexus);
/// - 7: the nexus in bit 3 is lost.
///
/// Checks: no panic; CHECK CONDITION comes with sense and nothing else does; Data-In stays
/// within `transfer`'s In(n); a Data-Out of exactly `transfer`'s Out(n) bytes is never refused
/// as short (05/0E/03); a GOOD plain READ returns the stored blocks and a GOOD plain WRITE
/// stores its Data-Out (checked against the `MemStore` contents).
pub fn scsi_cdb(data: &[u8]) {
    scsi_run(data, &mut |_, _| {});
}

/// [`scsi_cdb`], showing each command's CDB and result to `observe` (for tests of the seeds).
pub fn scsi_run(data: &[u8], observe: &mut dyn FnMut(&[u8], &ScsiResult)) {
    let (table, stores) = test_luns_with_stores();
    let nexuses = [test_nexus(0), test_nexus(1)];
    let mut input = Input::new(data);
    let mut out_buf = Vec::new();
    while !input.is_empty() {
        let op = input.u8();
        let nexus = &nexuses[usize::from((op >> 3) & 1)];
        match op & 7 {
            6 => {
                let sel = input.u8();
                let kind = match (sel >> 1) & 3 {
                    0 => ResetKind::LogicalUnit,
                    1 => ResetKind::TargetWarm,
                    _ => ResetKind::TargetCold,
                };
                let lun = (sel & 1 == 0).then(|| pdu::lun_from_index(u16::from(sel >> 4)));
                let _ = table.reset(&nexuses[usize::from((sel >> 3) & 1)], lun, kind);
            }
            7 => table.nexus_lost(nexus),
            _ => {
                let lun = match (op >> 4) & 3 {
                    3 => input.u64(),
                    i => pdu::lun_from_index(u16::from(i)),
                };
                let cdb_len = if op & 0x80 != 0 {
                    usize::from(input.u8() % 33)
                } else {
                    16
                };
                let cdb = input.bytes(cdb_len).to_vec();
                let given = input.chunk();
                let transfer = table.transfer(lun, &cdb);
                let exact = match transfer {
                    Ok(Transfer::Out(n)) if op & 0x40 != 0 && n <= MAX_EXACT_OUT => {
                        out_buf.clear();
                        out_buf.extend(given.iter().copied().cycle().take(n as usize));
                        out_buf.resize(n as usize, 0);
                        true
                    }
                    _ => {
                        out_buf.clear();
                        out_buf.extend_from_slice(given);
                        false
                    }
                };
                let r = table.execute(nexus, lun, &cdb, &out_buf);
                check_result(&cdb, transfer.as_ref().ok(), exact, &r);
                if let Some(store) = pdu::lun_to_index(lun).and_then(|i| stores.get(usize::from(i)))
                {
                    check_data(store, &cdb, &out_buf, &r);
                }
                observe(&cdb, &r);
            }
        }
    }
}

fn check_result(cdb: &[u8], transfer: Option<&Transfer>, exact: bool, r: &ScsiResult) {
    assert_eq!(
        r.status == status::CHECK_CONDITION,
        r.sense.is_some(),
        "status {:#x} vs sense {:?} for {cdb:02x?}",
        r.status,
        r.sense
    );
    if let Some(s) = &r.sense {
        assert!(sense_triple(s).is_some(), "bad sense {s:02x?}");
        if exact {
            assert_ne!(
                sense_triple(s),
                Some((0x05, 0x0e, 0x03)),
                "exact Data-Out refused as short for {cdb:02x?}"
            );
        }
    }
    if let Some(Transfer::In(n)) = transfer {
        assert!(
            r.data_in.len() <= *n as usize,
            "{} bytes of Data-In for In({n}) {cdb:02x?}",
            r.data_in.len()
        );
    }
    if matches!(transfer, Some(Transfer::None) | Some(Transfer::Out(_))) {
        assert!(
            r.data_in.is_empty(),
            "Data-In for a command without one {cdb:02x?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// netboot: DHCP and TFTP parsers and machines
// ---------------------------------------------------------------------------------------------

/// `dhcp_packet`: byte 0 picks the mode (bit 0: proxy / dhcp) and the port (bit 1: 67 /
/// 4011); the rest is one DHCP datagram, answered by the pure responder, then by the same
/// responder again (leases carried over). Invariants: no panic; an answer decodes again; a
/// proxy answer never offers an address; a DHCP answer's address is in the pool.
pub fn dhcp_packet(data: &[u8]) {
    use diskless::config::{BootFilesConfig, NetbootMode, PoolConfig};
    use diskless::netboot::dhcp::{decode, Plan, Port, Responder};
    use std::net::{Ipv4Addr, SocketAddrV4};
    let mut inp = Input::new(data);
    let sel = inp.u8();
    let packet = inp.data;
    let mode = if sel & 1 == 0 {
        NetbootMode::Proxy
    } else {
        NetbootMode::Dhcp
    };
    let port = if sel & 2 == 0 { Port::Dhcp } else { Port::Pxe };
    let (start, end) = (Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 13));
    let mut r = Responder::new(Plan {
        mode,
        server_ip: Ipv4Addr::new(10, 0, 0, 1),
        clients: None,
        boot_files: BootFilesConfig::default(),
        script_url: "http://10.0.0.1:8080/boot.ipxe?mac=${netX/mac}".into(),
        http_files: Some("http://10.0.0.1:8080/files/".into()),
        tftp: true,
        pool: (mode == NetbootMode::Dhcp).then_some(PoolConfig {
            start,
            end,
            prefix_len: 24,
            router: None,
            dns: vec![],
            lease_secs: 600,
        }),
    });
    let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 99), 68);
    for now in [1000, 2000] {
        if let Ok(a) = r.handle(packet, port, src, now) {
            if a.bytes.is_empty() {
                continue;
            }
            let m = decode(&a.bytes).expect("our own answer decodes");
            let y = m.yiaddr();
            if mode == NetbootMode::Proxy {
                assert!(y.is_unspecified(), "proxyDHCP offered {y}");
            } else {
                assert!(y.is_unspecified() || (start..=end).contains(&y), "{y}");
            }
        }
    }
    if let Some(l) = &r.leases {
        let text = l.to_text();
        let mut again = diskless::netboot::dhcp::Leases::new(start, end);
        again.load_text(&text);
        assert_eq!(again.to_text(), text, "leases survive a round trip");
    }
}

/// `tftp_packet`: byte 0-1 the file size in blocks of 100 bytes, the rest split at 0xFF
/// bytes into datagrams: the first is parsed as a request (and its name checked against a
/// root), the others are fed to a transfer as client packets, every third one followed by a
/// timeout. Invariants: no panic; blocks stay inside the file; a checked name never climbs.
pub fn tftp_packet(data: &[u8]) {
    use diskless::netboot::files::FileRoot;
    use diskless::netboot::tftp::{parse, Action, Packet, ReadRequest, Transfer};
    use std::time::{Duration, Instant};
    let mut inp = Input::new(data);
    let size = u64::from(inp.u16()) * 100 + u64::from(inp.u8());
    let mut parts = inp.data.split(|&b| b == 0xFF);
    let first = parts.next().unwrap_or(&[]);
    let req = match parse(first) {
        Ok(Packet::Read(r)) => {
            if let Ok(p) = FileRoot::check_name(&r.filename) {
                assert!(!p.is_absolute());
                assert!(p
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))));
            }
            r
        }
        _ => ReadRequest::default(),
    };
    let t0 = Instant::now();
    let (mut t, first_actions) = Transfer::start(&req, size, t0);
    let check = |acts: &[Action]| {
        for a in acts {
            if let Action::Block { offset, len, .. } = a {
                assert!(offset + *len as u64 <= size, "block past the end");
            }
        }
    };
    check(&first_actions);
    for (i, p) in parts.enumerate() {
        let now = t0 + Duration::from_millis(i as u64);
        check(&t.on_packet(p, now));
        if i % 3 == 2 {
            check(&t.on_timeout(now));
        }
    }
}
