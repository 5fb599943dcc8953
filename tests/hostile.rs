//! Hostile initiators against the real binary over raw sockets (issues 2 and 5): truncated and
//! oversized PDUs, unknown opcodes, bad digests, login key abuse, CmdSN and Data-Out sequence
//! errors, idle and slow connections, session reinstatement and connection floods.
//!
//! Every case asserts what RFC 7143 prescribes, then that a well-behaved client still logs in
//! and reads LBA 0, and (where writes are involved) that no image byte changed.

mod common;
#[path = "common/raw.rs"]
mod raw;

use bytes::Bytes;
use common::{random_bytes, sparse_image, Config, Lun, Target, INITIATOR};
use diskless::pdu::{
    Bhs, DataOut, Digests, NopOut, Pdu, ScsiCommand, SnackRequest, TextRequest, BHS_LEN,
};
use raw::*;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.test:hostile";
/// Visible to and usable by VIP only.
const HIDDEN: &str = "iqn.2026-11.test:hidden";
const VIP: &str = "iqn.2026-11.test:vip";
/// 64 MiB sparse image: 131072 blocks of 512 bytes, room for a maximum-length transfer (the
/// Block Limits page says 32 MiB) and for one more block.
const BLOCKS: u32 = 131072;

struct Fx {
    _dir: tempfile::TempDir,
    image: PathBuf,
    srv: RawServer,
    /// The first 64 KiB of the image.
    head: Vec<u8>,
}

fn fixture(settings: &str) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    sparse_image(&image, u64::from(BLOCKS) * 512);
    let head = random_bytes(64 * 1024, 0x5eed);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .write_all_at(&head, 0)
        .unwrap();
    let hidden = dir.path().join("hidden.img");
    sparse_image(&hidden, 1 << 20);
    let cfg = Config::new(vec![
        Target::new(TARGET, vec![Lun::new(0, &image)]),
        Target::new(HIDDEN, vec![Lun::new(0, &hidden)]).initiators(&[VIP]),
    ]);
    let srv = RawServer::start(dir.path(), &cfg, settings);
    Fx {
        _dir: dir,
        image,
        srv,
        head,
    }
}

impl Fx {
    fn client(&self) -> Client {
        self.srv.connect()
    }

    /// A logged-in normal session to TARGET.
    fn login(&self) -> Client {
        let mut c = self.client();
        c.login(INITIATOR, TARGET)
            .unwrap_or_else(|st| panic!("login refused with {st:02x?}"));
        c
    }

    /// A well-behaved client still logs in and reads LBA 0, quickly.
    fn healthy(&self) {
        let t = Instant::now();
        let mut c = self.login();
        assert_eq!(c.read10(0, 1), self.head[..512], "LBA 0 differs");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "a healthy login + READ took {:?}",
            t.elapsed()
        );
    }

    fn hash(&self) -> u64 {
        file_hash(&self.image)
    }
}

fn expect_reject(c: &mut Client, reason: u8, header: &[u8]) {
    match c.recv(ANSWER) {
        Ok(Pdu {
            bhs: Bhs::Reject(r),
            data,
        }) => {
            assert_eq!(r.reason, reason, "Reject reason");
            // §11.17: the data segment is the complete header of the rejected PDU.
            assert_eq!(
                &data[..],
                &header[..BHS_LEN],
                "Reject must carry the header"
            );
        }
        other => panic!("expected a Reject {reason:#04x}, got {other:?}"),
    }
}

fn data_out(itt: u32, ttt: u32, data_sn: u32, offset: u32, data: &[u8], final_: bool) -> Pdu {
    Pdu {
        bhs: Bhs::DataOut(DataOut {
            final_,
            lun: 0,
            itt,
            ttt,
            exp_stat_sn: 0,
            data_sn,
            buffer_offset: offset,
        }),
        data: Bytes::copy_from_slice(data),
    }
}

/// Send a WRITE command and return (ITT, TTT of its first R2T).
fn write_until_r2t(c: &mut Client, lba: u32, blocks: u16) -> (u32, u32, u32) {
    let cmd = c.command(
        &write10_cdb(lba, blocks),
        u32::from(blocks) * 512,
        false,
        true,
    );
    let itt = cmd.itt;
    c.send(&Pdu::header_only(Bhs::ScsiCommand(cmd))).unwrap();
    match c.recv(ANSWER) {
        Ok(Pdu {
            bhs: Bhs::R2t(r), ..
        }) => {
            assert_eq!(r.itt, itt);
            (itt, r.ttt, r.desired_data_transfer_length)
        }
        other => panic!("expected an R2T, got {other:?}"),
    }
}

fn expect_check(c: &mut Client, itt: u32, key: u8, asc: u8, ascq: Option<u8>) {
    match c.recv(ANSWER) {
        Ok(Pdu {
            bhs: Bhs::ScsiResponse(r),
            data,
        }) => {
            assert_eq!(r.itt, itt);
            assert_eq!(r.status, 0x02, "CHECK CONDITION expected: {r:?}");
            let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
            let res = ScsiResult {
                sense: data[2..2 + n].to_vec(),
                ..Default::default()
            };
            let (k, a, q) = res.sense_triplet().expect("sense data");
            assert_eq!((k, a), (key, asc), "sense {:02x?}", res.sense);
            if let Some(ascq) = ascq {
                assert_eq!(q, ascq);
            }
        }
        other => panic!("expected a SCSI Response, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated_bhs_and_missing_data_segment() {
    let fx = fixture("{login_timeout_secs: 2}");
    // Half a BHS, then close.
    let mut c = fx.client();
    c.send_raw(&raw_bhs(0x43, 0x87, 0, 1, 1)[..20]).unwrap();
    drop(c);

    // A Login Request promising 1000 data bytes; 10 arrive, then nothing.
    let mut stalled = fx.client();
    stalled.send_raw(&raw_bhs(0x43, 0x87, 1000, 1, 1)).unwrap();
    stalled.send_raw(b"InitiatorN").unwrap();
    let stalled_at = Instant::now();

    // In the full-feature phase: a NOP-Out whose 100-byte data segment never comes.
    let mut ffp = fx.login();
    let hdr = raw_bhs(0x40, 0x80, 100, 0x77, ffp.cmd_sn);
    ffp.send_raw(&hdr).unwrap();

    // Nobody else waits for them.
    fx.healthy();

    // EOF in the middle of the PDU: the server closes its side.
    ffp.shutdown_write();
    let mut seen = Vec::new();
    assert!(ffp.closed_within(Duration::from_secs(3), &mut seen));
    assert!(
        seen.is_empty(),
        "answered a PDU it never got whole: {seen:?}"
    );

    // The stalled login ends with the login timeout (2 s).
    assert!(stalled.closed_within(Duration::from_secs(6), &mut seen));
    let took = stalled_at.elapsed();
    assert!(took >= Duration::from_millis(1500), "closed after {took:?}");
    fx.healthy();
}

#[test]
fn unknown_opcodes_rejected_command_not_supported() {
    let fx = fixture("");
    let mut c = fx.login();
    for (op, data) in [
        (0x1fu8 | 0x40, &b""[..]),
        (0x3e, &b""[..]),
        (0x1c | 0x40, &b"hello"[..]),
    ] {
        let mut pdu = raw_bhs(op, 0x80, data.len() as u32, 0x1234, c.cmd_sn).to_vec();
        pdu.extend_from_slice(data);
        pdu.resize(pdu.len().div_ceil(4) * 4, 0);
        c.send_raw(&pdu).unwrap();
        // §11.17.1: 0x05 Command not supported, and the connection stays up.
        expect_reject(&mut c, 0x05, &pdu);
        let (_, echo) = c.ping(b"still there");
        assert_eq!(&echo[..], b"still there");
    }
    fx.healthy();
}

#[test]
fn oversized_data_segment_is_never_buffered() {
    let fx = fixture("");
    let base = fx.srv.rss_kib();
    // One connection per phase streams a 16 MiB - 1 data segment behind a NOP-Out header.
    for phase in ["login", "ffp"] {
        let mut c = if phase == "login" {
            fx.client()
        } else {
            fx.login()
        };
        let hdr = raw_bhs(0x40, 0x80, 0xff_ffff, 9, c.cmd_sn);
        c.send_raw(&hdr).unwrap();
        let mut w = c.stream.try_clone().unwrap();
        let pump = thread::spawn(move || {
            let chunk = vec![0x5au8; 1 << 20];
            for _ in 0..16 {
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        assert!(
            c.closed_within(Duration::from_secs(10), &mut seen),
            "{phase}: connection kept open"
        );
        for p in &seen {
            match &p.bhs {
                Bhs::LoginResponse(r) => assert_eq!(r.status_class, 2, "{phase}: {r:?}"),
                Bhs::Reject(_) => assert_eq!(phase, "ffp"),
                other => panic!("{phase}: unexpected {other:?}"),
            }
        }
        let _ = pump.join();
    }
    // The same header alone in the full-feature phase: a Reject carrying it, then the close
    // (the stream cannot be re-framed without reading 16 MiB).
    let mut c = fx.login();
    let hdr = raw_bhs(0x40, 0x80, 0xff_ffff, 9, c.cmd_sn);
    c.send_raw(&hdr).unwrap();
    let mut seen = Vec::new();
    assert!(c.closed_within(Duration::from_secs(5), &mut seen));
    match seen.as_slice() {
        [Pdu {
            bhs: Bhs::Reject(r),
            data,
        }] => {
            assert_eq!(r.reason, 0x04, "protocol error");
            assert_eq!(&data[..], &hdr[..]);
        }
        other => panic!("expected one Reject before the close, got {other:?}"),
    }
    let grown = fx.srv.rss_kib().saturating_sub(base);
    assert!(grown < 8 * 1024, "server RSS grew by {grown} KiB");
    fx.healthy();
}

#[test]
fn full_feature_pdus_before_login() {
    let fx = fixture("");
    let mut read = ScsiCommand {
        final_: true,
        read: true,
        itt: 1,
        expected_data_transfer_length: 512,
        cmd_sn: 1,
        cdb: read10_cdb(0, 1).to_vec(),
        ..Default::default()
    };
    read.cdb.resize(16, 0);
    let pdus = [
        Pdu::header_only(Bhs::ScsiCommand(read)),
        Pdu {
            bhs: Bhs::TextRequest(TextRequest {
                final_: true,
                itt: 2,
                ttt: NO_TAG,
                cmd_sn: 1,
                ..Default::default()
            }),
            data: Bytes::from_static(b"SendTargets=All\0"),
        },
        data_out(3, NO_TAG, 0, 0, &[0u8; 512], true),
        Pdu::header_only(Bhs::NopOut(NopOut {
            immediate: true,
            itt: 4,
            ttt: NO_TAG,
            cmd_sn: 1,
            ..Default::default()
        })),
    ];
    for p in pdus {
        let mut c = fx.client();
        c.send(&p).unwrap();
        let mut seen = Vec::new();
        assert!(
            c.closed_within(Duration::from_secs(5), &mut seen),
            "{:?} before login: not closed",
            p.bhs.opcode()
        );
        for s in &seen {
            match &s.bhs {
                // §6.1 / §11.13.5: 0x020B invalid request during login.
                Bhs::LoginResponse(r) => {
                    assert_eq!((r.status_class, r.status_detail), (2, 0x0b))
                }
                other => panic!("{:?} before login answered with {other:?}", p.bhs.opcode()),
            }
        }
    }
    fx.healthy();
}

// ---------------------------------------------------------------------------------------------
// Digests
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_header_digest_closes_only_that_connection() {
    let fx = fixture("");
    let mut other = fx.login();
    let mut c = fx.client();
    c.login_with(&[
        ("InitiatorName", INITIATOR),
        ("TargetName", TARGET),
        ("HeaderDigest", "CRC32C"),
    ])
    .unwrap();
    assert!(c.digests.header, "HeaderDigest=CRC32C not negotiated");
    // A good PDU with a digest first, to prove the digest itself is right.
    let (_, echo) = c.ping(b"digest ok");
    assert_eq!(&echo[..], b"digest ok");
    let p = c.nop_out(b"");
    let mut bytes = encode(&p, c.digests);
    bytes[BHS_LEN] ^= 0x01;
    c.send_raw(&bytes).unwrap();
    let mut seen = Vec::new();
    // §7.8: a header that fails its digest cannot be trusted, not even its lengths: at ERL 0
    // the connection (and its session) ends.
    assert!(c.closed_within(Duration::from_secs(5), &mut seen));
    assert!(
        seen.iter().all(|p| !matches!(p.bhs, Bhs::NopIn(_))),
        "a PDU with a bad header digest was answered: {seen:?}"
    );
    let (_, echo) = other.ping(b"unaffected");
    assert_eq!(&echo[..], b"unaffected");
    fx.healthy();
}

#[test]
fn bad_data_digest_rejected() {
    let fx = fixture("");
    let before = fx.hash();
    let mut c = fx.client();
    c.login_with(&[
        ("InitiatorName", INITIATOR),
        ("TargetName", TARGET),
        ("HeaderDigest", "CRC32C"),
        ("DataDigest", "CRC32C"),
    ])
    .unwrap();
    assert!(c.digests.header && c.digests.data, "digests not negotiated");
    assert_eq!(&c.ping(b"0123456789").1[..], b"0123456789");

    // NOP-Out with a corrupted data digest: §11.17.1 reason 0x02, the PDU is discarded.
    let p = c.nop_out(b"12345678");
    let mut bytes = encode(&p, c.digests);
    let n = bytes.len();
    bytes[n - 1] ^= 0x80;
    c.send_raw(&bytes).unwrap();
    expect_reject(&mut c, 0x02, &bytes);
    assert_eq!(&c.ping(b"after").1[..], b"after");

    // Data-Out with a corrupted data digest: same.
    let (itt, ttt, len) = write_until_r2t(&mut c, 200, 1);
    assert_eq!(len, 512);
    let d = data_out(itt, ttt, 0, 0, &[0xee; 512], true);
    let mut bytes = encode(&d, c.digests);
    let n = bytes.len();
    bytes[n - 2] ^= 0x10;
    c.send_raw(&bytes).unwrap();
    expect_reject(&mut c, 0x02, &bytes);
    assert_eq!(&c.ping(b"alive").1[..], b"alive");
    drop(c);
    fx.healthy();
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        fx.hash(),
        before,
        "a Data-Out with a bad digest was written"
    );

    // A SCSI Command whose immediate data fails its digest: Reject 0x02, the command is
    // discarded and its CmdSN is a gap (§7.3); resending the same PDU completes it.
    let mut c = fx.client();
    c.login_with(&[
        ("InitiatorName", INITIATOR),
        ("TargetName", TARGET),
        ("DataDigest", "CRC32C"),
        ("ImmediateData", "Yes"),
    ])
    .unwrap();
    assert!(c.digests.data);
    let payload = random_bytes(512, 3);
    let cmd = c.command(&write10_cdb(6000, 1), 512, false, true);
    let itt = cmd.itt;
    let good = encode(
        &Pdu {
            bhs: Bhs::ScsiCommand(cmd),
            data: Bytes::from(payload.clone()),
        },
        c.digests,
    );
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 1] ^= 0x01;
    c.send_raw(&bad).unwrap();
    expect_reject(&mut c, 0x02, &bad);
    assert_eq!(&c.ping(b"x").1[..], b"x");
    // A command behind the gap waits ...
    let read = c.command(&read10_cdb(0, 1), 512, true, false);
    let read_itt = read.itt;
    c.send(&Pdu::header_only(Bhs::ScsiCommand(read))).unwrap();
    if let Err(p) = c.silent_for(Duration::from_millis(500)) {
        panic!("a command behind the CmdSN gap ran: {p:?}");
    }
    // ... until the initiator resends the rejected command.
    c.send_raw(&good).unwrap();
    let done = c.finish_many(&[itt, read_itt]);
    assert_eq!(done[&itt].status, 0);
    assert_eq!(done[&read_itt].data, fx.head[..512]);
    assert_eq!(c.read10(6000, 1), payload);
}

// ---------------------------------------------------------------------------------------------
// Login
// ---------------------------------------------------------------------------------------------

fn refused(fx: &Fx, keys: &[(&str, &str)]) -> (u8, u8) {
    let mut c = fx.client();
    let t = Instant::now();
    let st = c.login_with(keys).expect_err("login must be refused");
    // Bounds in this file catch hangs: generous, so a loaded machine does not trip them.
    assert!(t.elapsed() < Duration::from_secs(20), "slow refusal");
    // §6.1 / §11.13.5: after a failed login the target closes the connection.
    assert!(c.closed_within(Duration::from_secs(20), &mut Vec::new()));
    st
}

/// One raw Login Request (CSG 1 -> 3, T=1) with `text`; the status of the answer.
fn refused_raw(fx: &Fx, text: Vec<u8>) -> (u8, u8) {
    let mut c = fx.client();
    c.login_request(1, 3, true, false, text).unwrap();
    let (r, _) = c.login_response(Duration::from_secs(2));
    assert!(c.closed_within(Duration::from_secs(3), &mut Vec::new()));
    (r.status_class, r.status_detail)
}

/// Send `total` bytes of `filler` as C=1 login continuation PDUs of 8 KiB after `first`; the
/// target must refuse (initiator error) before we are done, and quickly.
fn flood_continuation(fx: &Fx, first: &[u8], filler: &[u8], total: usize) -> (u8, u8) {
    let mut c = fx.client();
    let t = Instant::now();
    let mut body = first.to_vec();
    while body.len() < total {
        body.extend_from_slice(filler);
    }
    for chunk in body.chunks(8192) {
        c.login_request(1, 0, false, true, chunk.to_vec()).unwrap();
        let (r, _) = c.login_response(Duration::from_secs(2));
        if r.status_class != 0 {
            assert!(t.elapsed() < Duration::from_secs(20));
            assert!(c.closed_within(Duration::from_secs(20), &mut Vec::new()));
            return (r.status_class, r.status_detail);
        }
        assert!(
            r.cont || !r.transit,
            "acknowledgement of C=1 must not transit"
        );
    }
    panic!("{} bytes of login text accepted", body.len());
}

#[test]
fn login_key_errors() {
    let fx = fixture("");
    let base = fx.srv.rss_kib();
    // §11.13.5: 0x0207 missing parameter.
    assert_eq!(refused(&fx, &[("TargetName", TARGET)]), (2, 0x07));
    assert_eq!(
        refused(
            &fx,
            &[("InitiatorName", INITIATOR), ("SessionType", "Normal")]
        ),
        (2, 0x07)
    );
    // 0x0203 not found, 0x0202 authorization failure.
    assert_eq!(
        refused(
            &fx,
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", "iqn.2026-11.test:nope")
            ]
        ),
        (2, 0x03)
    );
    assert_eq!(
        refused(&fx, &[("InitiatorName", INITIATOR), ("TargetName", HIDDEN)]),
        (2, 0x02)
    );
    // A security key in the operational stage (§6.3).
    assert_eq!(
        refused(
            &fx,
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", TARGET),
                ("AuthMethod", "None")
            ]
        ),
        (2, 0x00)
    );
    // No '=' (§6.1 key=value syntax).
    let mut text = keys_text(&[("InitiatorName", INITIATOR), ("TargetName", TARGET)]);
    text.extend_from_slice(b"JustAKeyWithoutValue\0");
    assert_eq!(refused_raw(&fx, text).0, 2);
    // Thousands of keys in one PDU.
    let mut text = keys_text(&[("InitiatorName", INITIATOR), ("TargetName", TARGET)]);
    let mut i = 0;
    while text.len() < 8100 {
        text.extend_from_slice(format!("X{i}=1\0").as_bytes());
        i += 1;
    }
    assert!(i > 1000);
    assert_eq!(refused_raw(&fx, text).0, 2);
    // A 100 KiB value, and a key flood, through C-bit continuation (§11.12.2).
    let first = keys_text(&[("InitiatorName", INITIATOR), ("TargetName", TARGET)]);
    let mut big = first.clone();
    big.extend_from_slice(b"X-huge=");
    assert_eq!(flood_continuation(&fx, &big, b"v", 100 * 1024).0, 2);
    assert_eq!(flood_continuation(&fx, &first, b"X-k=1\0", 1 << 20).0, 2);
    // A connection for an existing session (TSIH != 0): MaxConnections is 1, so 0x0206 too
    // many connections; for a TSIH nobody holds, 0x020A session does not exist.
    let live = fx.login();
    let mut add = fx.client();
    add.isid = live.isid;
    add.tsih = live.tsih;
    assert_eq!(add.login(INITIATOR, TARGET), Err((2, 0x06)));
    let mut ghost = fx.client();
    ghost.tsih = live.tsih.wrapping_add(1000);
    assert_eq!(ghost.login(INITIATOR, TARGET), Err((2, 0x0a)));
    // Version-min above ours (0x00): 0x0205 unsupported version.
    let mut v = fx.client();
    let bytes = encode(
        &Pdu {
            bhs: Bhs::LoginRequest(diskless::pdu::LoginRequest {
                transit: true,
                csg: 1,
                nsg: 3,
                version_max: 2,
                version_min: 1,
                isid: fresh_isid(),
                itt: 1,
                ..Default::default()
            }),
            data: Bytes::from(keys_text(&[
                ("InitiatorName", INITIATOR),
                ("TargetName", TARGET),
            ])),
        },
        Digests::default(),
    );
    v.send_raw(&bytes).unwrap();
    let (r, _) = v.login_response(ANSWER);
    assert_eq!((r.status_class, r.status_detail), (2, 0x05));
    let grown = fx.srv.rss_kib().saturating_sub(base);
    assert!(grown < 8 * 1024, "server RSS grew by {grown} KiB");
    fx.healthy();
}

#[test]
fn send_targets_lists_only_visible_targets() {
    let fx = fixture("");
    let mut d = fx.client();
    d.login_discovery(INITIATOR).unwrap();
    let all = d.text(b"SendTargets=All\0");
    let names: Vec<&str> = all
        .iter()
        .filter(|(k, _)| k == "TargetName")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(names, [TARGET], "{all:?}");
    let addr = format!("127.0.0.1:{},1", fx.srv.port);
    assert!(
        all.iter().any(|(k, v)| k == "TargetAddress" && *v == addr),
        "no TargetAddress {addr}: {all:?}"
    );
    let hidden = d.text(format!("SendTargets={HIDDEN}\0").as_bytes());
    assert!(
        hidden.iter().all(|(k, _)| k != "TargetName"),
        "hidden target revealed: {hidden:?}"
    );
    let one = d.text(format!("SendTargets={TARGET}\0").as_bytes());
    assert!(one.iter().any(|(k, v)| k == "TargetName" && v == TARGET));

    let mut v = fx.client();
    v.login_discovery(VIP).unwrap();
    let all = v.text(b"SendTargets=All\0");
    let mut names: Vec<&str> = all
        .iter()
        .filter(|(k, _)| k == "TargetName")
        .map(|(_, v)| v.as_str())
        .collect();
    names.sort();
    assert_eq!(names, [HIDDEN, TARGET]);
    // A discovery session carries no SCSI (§6.2): never a SCSI Response.
    let c = d.command(&read10_cdb(0, 1), 512, true, false);
    d.send(&Pdu::header_only(Bhs::ScsiCommand(c))).unwrap();
    match d.recv(ANSWER) {
        Ok(Pdu {
            bhs: Bhs::Reject(_),
            ..
        }) => {}
        Err(RecvError::Closed) => {}
        other => panic!("SCSI on a discovery session answered with {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// NOP
// ---------------------------------------------------------------------------------------------

#[test]
fn nop_out_echoes_ping_data() {
    let fx = fixture("");
    let mut c = fx.login();
    for data in [&b""[..], b"x", b"thirteen byte", &[0xa5; 5000][..]] {
        let (n, echo) = c.ping(data);
        // §11.19: NOP-In echoes the ping data, TTT reserved.
        assert_eq!(&echo[..], data);
        assert_eq!(n.ttt, NO_TAG);
    }
}

/// Wait for a target ping (ITT reserved, TTT valid, §11.19.1).
fn wait_ping(c: &mut Client, within: Duration) -> u32 {
    match c.recv(within) {
        Ok(Pdu {
            bhs: Bhs::NopIn(n), ..
        }) => {
            assert_eq!(n.itt, NO_TAG);
            assert_ne!(n.ttt, NO_TAG, "a ping wants an answer: TTT must be valid");
            n.ttt
        }
        other => panic!("expected a NOP-In ping, got {other:?}"),
    }
}

#[test]
fn nop_in_ping_ignored_without_timeout() {
    let fx = fixture("{nop_in_interval_secs: 1}");
    let mut c = fx.login();
    let t = Instant::now();
    wait_ping(&mut c, Duration::from_secs(4));
    assert!(t.elapsed() >= Duration::from_millis(800));
    // Ignore it (iPXE does): the connection must survive.
    thread::sleep(Duration::from_secs(3));
    let (_, echo) = c.ping(b"still here");
    assert_eq!(&echo[..], b"still here");
}

#[test]
fn nop_in_ping_unanswered_drops_with_timeout() {
    let fx = fixture("{nop_in_interval_secs: 1, nop_in_timeout_secs: 2}");
    let mut answered = fx.login();
    let mut c = fx.login();
    wait_ping(&mut c, Duration::from_secs(4));
    // The answered connection replies with NOP-Out ITT=0xffffffff, TTT echoed (§11.18).
    let mut pings = 0;
    let t = Instant::now();
    let mut seen = Vec::new();
    let closed = loop {
        if t.elapsed() > Duration::from_secs(30) {
            break false;
        }
        if let Ok(Pdu {
            bhs: Bhs::NopIn(n), ..
        }) = answered.recv(Duration::from_millis(200))
        {
            pings += 1;
            let reply = Pdu::header_only(Bhs::NopOut(NopOut {
                immediate: true,
                itt: NO_TAG,
                ttt: n.ttt,
                cmd_sn: answered.cmd_sn,
                ..Default::default()
            }));
            answered.send(&reply).unwrap();
        }
        if c.closed_within(Duration::from_millis(200), &mut seen) {
            break true;
        }
    };
    assert!(closed, "unanswered ping did not drop the connection");
    assert!(pings >= 1);
    let (_, echo) = answered.ping(b"answered");
    assert_eq!(&echo[..], b"answered");
    fx.healthy();
}

// ---------------------------------------------------------------------------------------------
// CmdSN
// ---------------------------------------------------------------------------------------------

#[test]
fn cmd_sn_outside_window_ignored() {
    let fx = fixture("");
    let mut c = fx.login();
    for far in [c.cmd_sn.wrapping_add(100_000), c.cmd_sn.wrapping_sub(1000)] {
        let mut cmd = c.command(&read10_cdb(0, 1), 512, true, false);
        c.cmd_sn = c.cmd_sn.wrapping_sub(1);
        cmd.cmd_sn = far;
        c.send(&Pdu::header_only(Bhs::ScsiCommand(cmd))).unwrap();
        let mut nop = c.nop_out(b"ignored");
        if let Bhs::NopOut(n) = &mut nop.bhs {
            n.immediate = false;
            n.cmd_sn = far.wrapping_add(1);
        }
        c.send(&nop).unwrap();
        // §3.2.2.1: commands outside the window are silently ignored.
        if let Err(p) = c.silent_for(Duration::from_secs(1)) {
            panic!("out-of-window command answered: {p:?}");
        }
    }
    // In-window commands still work, and ExpCmdSN did not move.
    assert_eq!(c.read10(0, 1), fx.head[..512]);
    // An immediate command (§3.2.2.1: CmdSN not advanced) is honoured.
    let mut tur = c.command(&[0u8; 6], 0, false, false);
    c.cmd_sn = c.cmd_sn.wrapping_sub(1);
    tur.immediate = true;
    tur.cmd_sn = c.cmd_sn;
    let itt = tur.itt;
    c.send(&Pdu::header_only(Bhs::ScsiCommand(tur))).unwrap();
    let r = c.finish(itt, &[]);
    assert_eq!(r.status, 0);
    assert_eq!(c.read10(1, 1), fx.head[512..1024]);
}

// ---------------------------------------------------------------------------------------------
// Data-Out and SNACK
// ---------------------------------------------------------------------------------------------

#[test]
fn data_out_sequence_errors() {
    let fx = fixture("");
    let before = fx.hash();
    let mut c = fx.login();

    // §11.7: a Data-Out for no task we know: Reject, invalid PDU field.
    let d = data_out(0xdead, NO_TAG, 0, 0, &[1; 512], true);
    let bytes = encode(&d, Digests::default());
    c.send_raw(&bytes).unwrap();
    expect_reject(&mut c, 0x09, &bytes);

    // Wrong DataSN: the task ends with CHECK CONDITION, ABORTED COMMAND 4B/xx.
    let (itt, ttt, len) = write_until_r2t(&mut c, 1000, 2);
    assert_eq!(len, 1024);
    c.send(&data_out(itt, ttt, 5, 0, &[2; 512], false)).unwrap();
    expect_check(&mut c, itt, 0x0b, 0x4b, None);
    // Its remaining Data-Out is discarded quietly.
    c.send(&data_out(itt, ttt, 1, 512, &[2; 512], true))
        .unwrap();

    // A Data-Out beyond the R2T's desired length.
    let (itt, ttt, _) = write_until_r2t(&mut c, 1000, 2);
    c.send(&data_out(itt, ttt, 0, 4096, &[3; 512], true))
        .unwrap();
    expect_check(&mut c, itt, 0x0b, 0x4b, None);

    // A Data-Out with a TTT we never issued.
    let (itt, ttt, _) = write_until_r2t(&mut c, 1000, 2);
    c.send(&data_out(itt, ttt ^ 0x5555, 0, 0, &[4; 1024], true))
        .unwrap();
    expect_check(&mut c, itt, 0x0b, 0x4b, None);

    assert_eq!(&c.ping(b"ok").1[..], b"ok");
    assert_eq!(c.read10(1000, 2), vec![0u8; 1024]);
    drop(c);
    fx.healthy();
    assert_eq!(fx.hash(), before, "a broken write reached the image");
}

#[test]
fn snack_rejected_at_erl0() {
    let fx = fixture("");
    let mut c = fx.login();
    let s = Pdu::header_only(Bhs::SnackRequest(SnackRequest {
        snack_type: 1,
        itt: NO_TAG,
        ttt: NO_TAG,
        exp_stat_sn: c.exp_stat_sn,
        beg_run: 0,
        run_length: 0,
        ..Default::default()
    }));
    let bytes = encode(&s, Digests::default());
    c.send_raw(&bytes).unwrap();
    // §7.1.4: SNACK needs ErrorRecoveryLevel > 0.
    match c.recv(ANSWER) {
        Ok(Pdu {
            bhs: Bhs::Reject(r),
            data,
        }) => {
            assert!(matches!(r.reason, 0x03 | 0x04), "reason {:#04x}", r.reason);
            assert_eq!(&data[..], &bytes[..BHS_LEN]);
        }
        other => panic!("expected a Reject, got {other:?}"),
    }
    assert_eq!(&c.ping(b"ok").1[..], b"ok");
}

// ---------------------------------------------------------------------------------------------
// SCSI edges
// ---------------------------------------------------------------------------------------------

#[test]
fn capacity_edges_and_transfer_lengths() {
    let fx = fixture("");
    let before = fx.hash();
    let mut c = fx.login();

    // SBC-3 §4.5: LBA out of range -> ILLEGAL REQUEST, LBA OUT OF RANGE (05/21/00).
    let r = c.run(&read10_cdb(BLOCKS, 1), 512, None);
    assert_eq!(r.status, 2);
    assert_eq!(r.sense_triplet(), Some((5, 0x21, 0)));
    let r = c.run(&read10_cdb(BLOCKS - 1, 2), 1024, None);
    assert_eq!(r.sense_triplet(), Some((5, 0x21, 0)));
    let mut read16 = [0u8; 16];
    read16[0] = 0x88;
    read16[2..10].copy_from_slice(&(u64::MAX - 1).to_be_bytes());
    read16[13] = 4;
    let r = c.run(&read16, 2048, None);
    assert_eq!(
        r.sense_triplet(),
        Some((5, 0x21, 0)),
        "LBA + length overflow"
    );
    let r = c.run(&write10_cdb(BLOCKS - 1, 2), 1024, Some(&[0xff; 1024]));
    assert_eq!(r.sense_triplet(), Some((5, 0x21, 0)));
    assert_eq!(c.read10(BLOCKS - 1, 1), vec![0u8; 512]);

    // Zero-length transfers: GOOD, no data (SBC-3: TRANSFER LENGTH 0 is not an error).
    let r = c.run(&read10_cdb(0, 0), 0, None);
    assert_eq!(r.status, 0);
    assert!(r.data.is_empty());
    let r = c.run(&write10_cdb(0, 0), 0, Some(&[]));
    assert_eq!(r.status, 0);
    assert!(r.data.is_empty());
    assert_eq!(fx.hash(), before);

    // The Block Limits VPD page's MAXIMUM TRANSFER LENGTH works both ways; one more is refused.
    let r = c.run(&[0x12, 1, 0xb0, 0, 64, 0], 64, None);
    assert_eq!(r.status, 0);
    let max = u32::from_be_bytes([r.data[8], r.data[9], r.data[10], r.data[11]]);
    assert!(max > 0 && max < BLOCKS, "max transfer {max}");
    let pattern = random_bytes(max as usize * 512, 99);
    let lba = BLOCKS - max;
    let r = c.run(
        &rw16_cdb(0x8a, u64::from(lba), max),
        max * 512,
        Some(&pattern),
    );
    assert_eq!(r.status, 0, "max-length WRITE(16): {r:?}");
    let back = c.run(&rw16_cdb(0x88, u64::from(lba), max), max * 512, None);
    assert_eq!(back.status, 0);
    assert_eq!(back.data.len(), max as usize * 512);
    assert!(back.data == pattern, "max-length write did not read back");
    // One block more than the limit: ILLEGAL REQUEST, INVALID FIELD IN CDB (SBC-3 §6.3).
    let r = c.run(&rw16_cdb(0x88, 0, max + 1), (max + 1) * 512, None);
    assert_eq!(r.status, 2);
    assert_eq!(r.sense_triplet(), Some((5, 0x24, 0)));
    fx.healthy();
}

// ---------------------------------------------------------------------------------------------
// Slow and idle connections
// ---------------------------------------------------------------------------------------------

#[test]
fn slowloris_and_silent_connections_time_out() {
    let fx = fixture("{login_timeout_secs: 2}");
    let mut silent = fx.client();
    let port = fx.srv.port;
    let slow = thread::spawn(move || {
        let mut c = Client::connect(port);
        let mut login = raw_bhs(0x43, 0x87, 0, 1, 1).to_vec();
        login.extend_from_slice(b"InitiatorName=iqn.2026-11.test:slow\0");
        let t = Instant::now();
        for b in login {
            if c.send_raw(&[b]).is_err() {
                return t.elapsed();
            }
            if c.closed_within(Duration::from_secs(1), &mut Vec::new()) {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "slowloris never cut off"
            );
        }
        panic!("the whole slow login went through");
    });
    let t = Instant::now();
    fx.healthy();
    assert!(silent.closed_within(Duration::from_secs(6), &mut Vec::new()));
    let silent_took = t.elapsed();
    let slow_took = slow.join().unwrap();
    for took in [silent_took, slow_took] {
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
            "closed after {took:?}, login timeout is 2 s"
        );
    }
    fx.healthy();
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

#[test]
fn session_reinstatement_and_side_by_side() {
    let fx = fixture("");
    let mut first = fx.login();
    assert_eq!(first.read10(0, 1), fx.head[..512]);
    // Same InitiatorName + ISID, TSIH 0: §6.3.5 reinstatement closes the old session.
    let mut second = fx.client();
    second.isid = first.isid;
    second.login(INITIATOR, TARGET).unwrap();
    let mut seen = Vec::new();
    assert!(
        first.closed_within(Duration::from_secs(8), &mut seen),
        "old session still open"
    );
    assert_eq!(second.read10(0, 1), fx.head[..512]);

    // Same InitiatorName, another ISID (the BIOS hand-off: the firmware's session is orphaned,
    // the OS logs in with its own ISID): both work side by side.
    let mut orphan = fx.login();
    let mut os = fx.login();
    assert_ne!(orphan.isid, os.isid);
    assert_eq!(os.read10(0, 1), fx.head[..512]);
    assert_eq!(orphan.read10(1, 1), fx.head[512..1024]);
    assert_eq!(second.read10(2, 1), fx.head[1024..1536]);
    assert_eq!(&orphan.ping(b"o").1[..], b"o");
}

fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[test]
fn many_idle_connections_do_not_starve_logins() {
    raise_nofile(8192);
    let fx = fixture("");
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(std::net::TcpStream::connect(("127.0.0.1", fx.srv.port)).unwrap());
    }
    thread::sleep(Duration::from_millis(200));
    fx.healthy();
    drop(idle);
    fx.healthy();
}

#[test]
fn max_sessions_refuses_with_out_of_resources() {
    let fx = fixture("{max_sessions: 4}");
    let mut four: Vec<Client> = (0..4).map(|_| fx.login()).collect();
    let mut fifth = fx.client();
    // §11.13.5: 0x0302 out of resources.
    assert_eq!(fifth.login(INITIATOR, TARGET), Err((3, 2)));
    for (i, c) in four.iter_mut().enumerate() {
        assert_eq!(c.read10(i as u32, 1), fx.head[i * 512..(i + 1) * 512]);
    }
    // A slot freed by a closed connection can be taken again.
    drop(four.pop());
    let t = Instant::now();
    loop {
        let mut c = fx.client();
        match c.login(INITIATOR, TARGET) {
            Ok(()) => break,
            Err((3, 2)) if t.elapsed() < Duration::from_secs(5) => {
                thread::sleep(Duration::from_millis(100))
            }
            Err(st) => panic!("login after a slot was freed: {st:02x?}"),
        }
    }
}

#[test]
fn unread_responses_do_not_pile_up() {
    let fx = fixture("");
    let base = fx.srv.rss_kib();
    let mut c = fx.login();
    // 40 READs of 4 MiB (160 MiB of responses) sent back to back, none read for a while.
    let mut itts = Vec::new();
    for _ in 0..40 {
        let cmd = c.command(&read10_cdb(0, 8192), 8192 * 512, true, false);
        itts.push(cmd.itt);
        c.send(&Pdu::header_only(Bhs::ScsiCommand(cmd))).unwrap();
    }
    // Once the target's socket holds a backlog its writer is blocked: whatever it buffers
    // beyond that is in its memory, which is what we measure.
    wait_target_backlog(&c, fx.srv.port, 256 * 1024);
    // And the target has read every command we sent (our socket's send queue is empty), so
    // anything it would pile up for them is piled up now.
    let me = c.stream.local_addr().unwrap().port();
    let t = Instant::now();
    while target_socket(me, fx.srv.port).is_none_or(|(_, tx)| tx > 0) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the target stopped reading commands"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let grown = fx.srv.rss_kib().saturating_sub(base);
    assert!(
        grown < 80 * 1024,
        "server buffered {grown} KiB for an initiator that does not read"
    );
    // Another session is served meanwhile.
    fx.healthy();
    // Once the initiator reads, every command completes, in full.
    let results = c.finish_many(&itts);
    for itt in itts {
        let r = &results[&itt];
        assert_eq!(r.status, 0);
        assert_eq!(r.data.len(), 8192 * 512);
        assert_eq!(r.data[..fx.head.len()], fx.head[..]);
    }
    assert_eq!(&c.ping(b"done").1[..], b"done");
}

#[test]
fn outstanding_commands_close_the_cmd_window() {
    let fx = fixture("{cmd_window: 8}");
    let before = fx.hash();
    let mut c = fx.login();
    // 20 WRITEs whose data we hold back: only the 8 the window admits may become tasks
    // (§4.2.2.1); the rest lie beyond MaxCmdSN and are ignored.
    let mut itts = Vec::new();
    for i in 0..20u32 {
        let cmd = c.command(&write10_cdb(4000 + i, 1), 512, false, true);
        itts.push(cmd.itt);
        c.send(&Pdu::header_only(Bhs::ScsiCommand(cmd))).unwrap();
    }
    let mut r2ts = Vec::new();
    while let Ok(p) = c.recv(Duration::from_secs(1)) {
        match p.bhs {
            Bhs::R2t(r) => r2ts.push(r),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(r2ts.len(), 8, "tasks beyond the window were accepted");
    let last = r2ts.last().unwrap();
    assert_eq!(
        last.max_cmd_sn,
        last.exp_cmd_sn.wrapping_sub(1),
        "window must be closed"
    );
    // An immediate command may not overrun the closed window (§11.17.1 reason 0x06).
    let mut imm = c.command(&write10_cdb(5000, 1), 512, false, true);
    imm.immediate = true;
    let imm_pdu = Pdu::header_only(Bhs::ScsiCommand(imm));
    let bytes = encode(&imm_pdu, Digests::default());
    c.send_raw(&bytes).unwrap();
    expect_reject(&mut c, 0x06, &bytes);
    // Completing the writes reopens the window.
    for r in &r2ts {
        c.send(&data_out(r.itt, r.ttt, 0, 0, &[0u8; 512], true))
            .unwrap();
    }
    let mut max = 0;
    for _ in 0..8 {
        match c.recv(ANSWER) {
            Ok(Pdu {
                bhs: Bhs::ScsiResponse(r),
                ..
            }) => {
                assert_eq!(r.status, 0);
                max = r.max_cmd_sn;
                c.cmd_sn = r.exp_cmd_sn;
            }
            other => panic!("expected a SCSI Response, got {other:?}"),
        }
    }
    assert_eq!(max, c.cmd_sn.wrapping_add(7), "window not reopened");
    assert_eq!(c.read10(0, 1), fx.head[..512]);
    drop(c);
    fx.healthy();
    assert_eq!(fx.hash(), before);
}

#[test]
fn malformed_pdus_rejected_and_session_goes_on() {
    let fx = fixture("");
    let mut c = fx.login();
    // A SCSI Command with an AHS of an unknown type (§11.2.2): the header is whole and its
    // length known, so the target rejects it and keeps the connection.
    let cmd = c.command(&read10_cdb(0, 1), 512, true, false);
    let mut bytes = encode(&Pdu::header_only(Bhs::ScsiCommand(cmd)), Digests::default());
    bytes[4] = 2; // TotalAHSLength: 2 words
    bytes.splice(BHS_LEN..BHS_LEN, [0u8, 5, 0x7f, 0, 1, 2, 3, 4]);
    c.send_raw(&bytes).unwrap();
    match c.recv(ANSWER) {
        Ok(Pdu {
            bhs: Bhs::Reject(r),
            data,
        }) => {
            assert!(matches!(r.reason, 0x04 | 0x09), "reason {:#04x}", r.reason);
            assert_eq!(&data[..], &bytes[..BHS_LEN]);
        }
        other => panic!("expected a Reject, got {other:?}"),
    }
    // §7.3: the CmdSN of a rejected command is NOT considered received: a command with the
    // next CmdSN waits in the gap until the initiator plugs it with the same CmdSN.
    let gap = c.cmd_sn.wrapping_sub(1);
    let next = c.command(&read10_cdb(2, 1), 512, true, false);
    let next_itt = next.itt;
    c.send(&Pdu::header_only(Bhs::ScsiCommand(next))).unwrap();
    if let Err(p) = c.silent_for(Duration::from_millis(500)) {
        panic!("a command behind the CmdSN gap ran: {p:?}");
    }
    let mut plug = c.command(&read10_cdb(0, 1), 512, true, false);
    c.cmd_sn = c.cmd_sn.wrapping_sub(1);
    plug.cmd_sn = gap;
    let plug_itt = plug.itt;
    c.send(&Pdu::header_only(Bhs::ScsiCommand(plug))).unwrap();
    let done = c.finish_many(&[plug_itt, next_itt]);
    assert_eq!(done[&plug_itt].data, fx.head[..512]);
    assert_eq!(done[&next_itt].data, fx.head[1024..1536]);
    // A command reusing the ITT of an outstanding task (§11.3: ITTs are unique): Reject 0x09,
    // and again a gap (§7.3) the initiator plugs with the same CmdSN.
    let (itt, ttt, _) = write_until_r2t(&mut c, 3000, 1);
    let mut dup = c.command(&read10_cdb(0, 1), 512, true, false);
    dup.itt = itt;
    let dup_sn = dup.cmd_sn;
    let bytes = encode(&Pdu::header_only(Bhs::ScsiCommand(dup)), Digests::default());
    c.send_raw(&bytes).unwrap();
    expect_reject(&mut c, 0x09, &bytes);
    let mut plug = c.command(&read10_cdb(3, 1), 512, true, false);
    c.cmd_sn = c.cmd_sn.wrapping_sub(1);
    plug.cmd_sn = dup_sn;
    let plug_itt = plug.itt;
    c.send(&Pdu::header_only(Bhs::ScsiCommand(plug))).unwrap();
    assert_eq!(c.finish(plug_itt, &[]).data, fx.head[1536..2048]);
    c.send(&data_out(itt, ttt, 0, 0, &[0u8; 512], true))
        .unwrap();
    assert_eq!(c.finish(itt, &[]).status, 0);
    // A target-only opcode from the initiator (NOP-In): rejected, connection kept.
    let nop_in = raw_bhs(0x20, 0x80, 0, NO_TAG, 0);
    c.send_raw(&nop_in).unwrap();
    match c.recv(ANSWER) {
        Ok(Pdu {
            bhs: Bhs::Reject(r),
            data,
        }) => {
            assert!(matches!(r.reason, 0x04 | 0x05), "reason {:#04x}", r.reason);
            assert_eq!(&data[..], &nop_in[..]);
        }
        other => panic!("expected a Reject, got {other:?}"),
    }
    assert_eq!(c.read10(1, 1), fx.head[512..1024]);
}

/// Send `n` READs of 4 MiB and read nothing, then wait until the target's writer is stuck on
/// a full socket (its send queue holds at least 1 MiB).
fn stall_writer(c: &mut Client, server_port: u16, n: usize) {
    for _ in 0..n {
        let cmd = c.command(&read10_cdb(0, 8192), 8192 * 512, true, false);
        c.send(&Pdu::header_only(Bhs::ScsiCommand(cmd))).unwrap();
    }
    wait_target_backlog(c, server_port, 1 << 20);
}

/// Read raw bytes until EOF/reset; how many arrived (None if still open after `limit`).
fn drain_until_closed(c: &mut Client, limit: Duration) -> Option<usize> {
    use std::io::Read;
    let deadline = Instant::now() + limit;
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        c.stream.set_read_timeout(Some(left)).unwrap();
        match c.stream.read(&mut buf) {
            Ok(0) => return Some(total),
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return None,
            Err(_) => return Some(total),
        }
    }
}

#[test]
fn reinstatement_does_not_wait_for_a_peer_that_does_not_read() {
    let fx = fixture("");
    let mut old = fx.login();
    stall_writer(&mut old, fx.srv.port, 12);
    // Same InitiatorName + ISID: the old session is closed (§6.3.5) without waiting for its
    // 48 MiB of responses to be read.
    let t = Instant::now();
    let mut new = fx.client();
    new.isid = old.isid;
    new.login(INITIATOR, TARGET).unwrap();
    // The old session must have closed by itself, not been given up on after the server's
    // bounded wait (which it logs); the time bound is only a generous sanity check.
    assert!(
        !fx.srv.stderr().contains("did not close within"),
        "the old session did not notice its reinstatement:\n{}",
        fx.srv.stderr()
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "reinstatement took {:?}",
        t.elapsed()
    );
    assert_eq!(new.read10(0, 1), fx.head[..512]);
    // What was queued for the old connection is dropped, not delivered.
    let got = drain_until_closed(&mut old, Duration::from_secs(20)).expect("old connection open");
    assert!(
        got < 16 << 20,
        "{got} bytes still delivered to a closed session"
    );
}

#[test]
fn nop_timeout_drops_a_peer_that_does_not_read() {
    let fx = fixture("{nop_in_interval_secs: 1, nop_in_timeout_secs: 2}");
    let mut c = fx.login();
    stall_writer(&mut c, fx.srv.port, 12);
    // Wait for the drop (ping at 1 s idle, unanswered for 2 s), then for the writer's grace.
    let t = Instant::now();
    while !fx.srv.stderr().contains("NOP-In ping not answered") {
        assert!(t.elapsed() < Duration::from_secs(30), "no NOP timeout");
        thread::sleep(Duration::from_millis(100));
    }
    // Read nothing until the target has given up its writer (after its grace) and closed its
    // socket: only what the kernel already held may then still arrive.
    let me = c.stream.local_addr().unwrap().port();
    let t = Instant::now();
    while target_socket_open(fx.srv.port, me) {
        assert!(t.elapsed() < Duration::from_secs(30), "socket kept open");
        thread::sleep(Duration::from_millis(50));
    }
    let got = drain_until_closed(&mut c, Duration::from_secs(20)).expect("connection still open");
    assert!(
        got < 16 << 20,
        "{got} bytes delivered after the connection was dropped"
    );
    fx.healthy();
}

/// The target's socket for this client connection in /proc/net/tcp (`client_port` is the
/// client's local port): its TCP state and how many bytes wait unsent in its queue.
fn target_socket(server_port: u16, client_port: u16) -> Option<(u8, u64)> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port = |field: &str| {
        field
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 4 && port(f[1]) == Some(server_port) && port(f[2]) == Some(client_port) {
            let state = u8::from_str_radix(f[3], 16).ok()?;
            let tx = f[4]
                .split(':')
                .next()
                .and_then(|q| u64::from_str_radix(q, 16).ok())?;
            Some((state, tx))
        } else {
            None
        }
    })
}

/// Whether the target still holds an ESTABLISHED socket for our connection.
fn target_socket_open(server_port: u16, client_port: u16) -> bool {
    matches!(target_socket(server_port, client_port), Some((0x01, _)))
}

/// Wait (generously) until the target has queued at least `bytes` unsent bytes towards this
/// client: its writer is then blocked on a full socket, whatever the machine's load.
fn wait_target_backlog(c: &Client, server_port: u16, bytes: u64) {
    let me = c.stream.local_addr().unwrap().port();
    let t = Instant::now();
    loop {
        if let Some((_, tx)) = target_socket(server_port, me) {
            if tx >= bytes {
                return;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the target never queued {bytes} bytes for a client that does not read"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn login_flood_without_reading_is_cut_at_the_login_timeout() {
    let fx = fixture("{login_timeout_secs: 2}");
    let mut c = fx.client();
    let me = c.stream.local_addr().unwrap().port();
    // C=1 Login Requests without text: each one is acknowledged (§11.12.2), and we never read
    // the acknowledgements, so the target's writes block on a full socket.
    c.login_request(
        1,
        0,
        false,
        true,
        keys_text(&[("InitiatorName", INITIATOR)]),
    )
    .unwrap();
    let one = encode(
        &Pdu::header_only(Bhs::LoginRequest(diskless::pdu::LoginRequest {
            cont: true,
            csg: 1,
            isid: c.isid,
            itt: 0x4c4f_4749,
            ..Default::default()
        })),
        Digests::default(),
    );
    let batch = one.repeat(20_000);
    let mut w = c.stream.try_clone().unwrap();
    let flood = thread::spawn(move || {
        for _ in 0..100 {
            if w.write_all(&batch).is_err() {
                break;
            }
        }
    });
    // The acknowledgements pile up unread: the target's writes are blocked.
    wait_target_backlog(&c, fx.srv.port, 64 << 10);
    let t = Instant::now();
    while target_socket_open(fx.srv.port, me) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "login outlived its timeout while blocked writing"
        );
        thread::sleep(Duration::from_millis(100));
    }
    drop(c);
    let _ = flood.join();
    fx.healthy();
}

#[test]
fn concurrent_clients_and_reinstatement_storm() {
    let fx = fixture("");
    let port = fx.srv.port;
    let head = fx.head.clone();
    let isid = fresh_isid();
    let mut threads = Vec::new();
    // Well-behaved readers with their own ISIDs ...
    for t in 0..16u32 {
        let head = head.clone();
        threads.push(thread::spawn(move || {
            let mut c = Client::connect(port);
            c.login(INITIATOR, TARGET).unwrap();
            for i in 0..20u32 {
                let lba = (t * 7 + i * 13) % 128;
                let at = lba as usize * 512;
                assert_eq!(c.read10(lba, 1), head[at..at + 512]);
            }
        }));
    }
    // ... while others keep reinstating one ISID: each login closes the previous holder.
    for _ in 0..6 {
        threads.push(thread::spawn(move || {
            for _ in 0..5 {
                let mut c = Client::connect(port);
                c.isid = isid;
                let t = Instant::now();
                // Refused or cut while another login reinstates the same ISID: both fine.
                let _ = c.login(INITIATOR, TARGET);
                assert!(t.elapsed() < Duration::from_secs(30), "login hung");
                let _ = c.recv(Duration::from_millis(50));
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let mut last = fx.client();
    last.isid = isid;
    last.login(INITIATOR, TARGET).unwrap();
    assert_eq!(last.read10(0, 1), fx.head[..512]);
    fx.healthy();
}

#[test]
fn simultaneous_logins_with_one_isid_leave_one_session() {
    let fx = fixture("");
    let port = fx.srv.port;
    for round in 0..5 {
        let isid = fresh_isid();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let logins: Vec<_> = (0..2)
            .map(|_| {
                let barrier = barrier.clone();
                thread::spawn(move || {
                    let mut c = Client::connect(port);
                    c.isid = isid;
                    barrier.wait();
                    let ok = c.login(INITIATOR, TARGET).is_ok();
                    (c, ok)
                })
            })
            .collect();
        let clients: Vec<(Client, bool)> = logins.into_iter().map(|t| t.join().unwrap()).collect();
        // §6.3.5: one I_T nexus per InitiatorName + ISID. The target closes the older twin
        // before it establishes the newer session, so once both logins have answered, at
        // most one connection is still open: the loser's close is already on its way. The
        // wait below is generous (a loaded machine) and ends as soon as it is seen.
        let mut ok: Vec<Client> = clients
            .into_iter()
            .filter_map(|(c, ok)| ok.then_some(c))
            .collect();
        if ok.len() == 2 {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let loser = 'wait: loop {
                for (i, c) in ok.iter_mut().enumerate() {
                    if c.closed_within(Duration::from_millis(50), &mut Vec::new()) {
                        break 'wait i;
                    }
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: 2 sessions with one ISID still open after 20 s"
                );
            };
            ok.remove(loser);
        }
        // The session that stayed is a working one (the newest wins, it is not closed too).
        if let Some(c) = ok.first_mut() {
            c.ping(b"still here");
            assert!(
                !c.closed_within(Duration::from_millis(200), &mut Vec::new()),
                "round {round}: the surviving session was closed too"
            );
        }
    }
    fx.healthy();
}

#[test]
fn random_pdus_never_panic_the_target() {
    let fx = fixture("{login_timeout_secs: 2}");
    let writes_before = fx.hash();
    for seed in 0..24u64 {
        let mut c = fx.client();
        let logged_in = seed % 3 != 0 && c.login(INITIATOR, TARGET).is_ok();
        let noise = random_bytes(48 * 64, seed + 1);
        for (i, chunk) in noise.chunks(48).enumerate() {
            let mut bhs = [0u8; BHS_LEN];
            bhs.copy_from_slice(chunk);
            // Mostly initiator opcodes, no AHS, short data segments, so that PDUs frame.
            let ops = [0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x10, 0x03, 0x1f];
            bhs[0] = (bhs[0] & 0x40) | ops[i % ops.len()];
            bhs[4] = 0;
            bhs[5] = 0;
            bhs[6] = 0;
            bhs[7] &= 0x3f;
            // Only CDBs that cannot change the image (reads, inquiries, capacity, TUR, ...).
            const HARMLESS: [u8; 10] = [0x00, 0x03, 0x12, 0x1a, 0x25, 0x28, 0x2f, 0x5a, 0x88, 0xa0];
            bhs[32] = HARMLESS[usize::from(bhs[32]) % HARMLESS.len()];
            let dsl = usize::from(bhs[7]);
            let mut pdu = bhs.to_vec();
            pdu.extend_from_slice(&random_bytes(dsl, seed * 1000 + i as u64));
            pdu.resize(pdu.len().div_ceil(4) * 4, 0);
            if c.send_raw(&pdu).is_err() {
                break;
            }
        }
        // Whatever the target answered, it must still be there.
        let _ = c.closed_within(
            Duration::from_millis(if logged_in { 150 } else { 50 }),
            &mut Vec::new(),
        );
    }
    let stderr = fx.srv.stderr();
    assert!(
        !stderr.contains("panicked"),
        "the target panicked:\n{stderr}"
    );
    fx.healthy();
    assert_eq!(fx.hash(), writes_before);
}

#[test]
fn unsolicited_data_beyond_first_burst() {
    let fx = fixture("");
    let before = fx.hash();
    let mut c = fx.client();
    c.login_with(&[
        ("InitiatorName", INITIATOR),
        ("TargetName", TARGET),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("FirstBurstLength", "65536"),
        ("MaxRecvDataSegmentLength", "65536"),
    ])
    .unwrap();
    assert_eq!(c.answer("InitialR2T"), Some("No"));
    let first_burst: u32 = c.answer("FirstBurstLength").unwrap().parse().unwrap();
    let mss = c.max_send.min(first_burst);
    // WRITE of 256 KiB, F=0: the initiator may send FirstBurstLength unsolicited (§13.14)...
    let mut cmd = c.command(&write10_cdb(8000, 512), 512 * 512, false, true);
    cmd.final_ = false;
    let itt = cmd.itt;
    c.send(&Pdu::header_only(Bhs::ScsiCommand(cmd))).unwrap();
    let mut off = 0;
    let mut sn = 0;
    while off < first_burst {
        let n = mss.min(first_burst - off);
        c.send(&data_out(
            itt,
            NO_TAG,
            sn,
            off,
            &vec![0x77; n as usize],
            off + n == first_burst,
        ))
        .unwrap();
        off += n;
        sn += 1;
    }
    // ... and not one byte more without an R2T: the task ends with ABORTED COMMAND.
    c.send(&data_out(itt, NO_TAG, sn, off, &[0x77; 512], true))
        .unwrap();
    loop {
        match c.recv(ANSWER) {
            Ok(Pdu {
                bhs: Bhs::R2t(r), ..
            }) => assert_eq!(r.itt, itt),
            Ok(Pdu {
                bhs: Bhs::ScsiResponse(r),
                data,
            }) => {
                assert_eq!(r.itt, itt);
                assert_eq!(r.status, 2);
                let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
                let res = ScsiResult {
                    sense: data[2..2 + n].to_vec(),
                    ..Default::default()
                };
                assert_eq!(res.sense_triplet().map(|t| (t.0, t.1)), Some((0x0b, 0x4b)));
                break;
            }
            other => panic!("expected the task to end, got {other:?}"),
        }
    }
    assert_eq!(&c.ping(b"ok").1[..], b"ok");
    drop(c);
    fx.healthy();
    assert_eq!(fx.hash(), before, "an aborted write reached the image");
}

#[test]
fn shutdown_is_not_held_up_by_hostile_peers() {
    let mut fx = fixture("");
    let mut stalled = fx.login();
    stall_writer(&mut stalled, fx.srv.port, 12);
    let mut half = fx.client();
    half.send_raw(&raw_bhs(0x43, 0x87, 1000, 1, 1)).unwrap();
    let mut pending = fx.login();
    let _ = write_until_r2t(&mut pending, 9000, 4);
    let t = Instant::now();
    let status = fx.srv.terminate(Duration::from_secs(30));
    assert!(
        status.is_some(),
        "server still running {:?} after SIGTERM",
        t.elapsed()
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "exit took {:?}",
        t.elapsed()
    );
}

#[test]
fn ping_flood_without_reading_does_not_wedge_the_session() {
    let fx = fixture("");
    let mut old = fx.login();
    // 300k immediate NOP-Outs, each answered by a NOP-In we never read (about 14 MiB each way).
    let mut flood = Vec::new();
    for _ in 0..300_000 {
        let p = old.nop_out(b"");
        flood.extend_from_slice(&encode(&p, Digests::default()));
    }
    let mut w = old.stream.try_clone().unwrap();
    let pump = thread::spawn(move || {
        let _ = w.write_all(&flood);
    });
    // Wait until the target's answers pile up unread (its writer is blocked).
    wait_target_backlog(&old, fx.srv.port, 256 << 10);
    // The wedged session must still notice that it is being reinstated (§6.3.5).
    let t = Instant::now();
    let mut new = fx.client();
    new.isid = old.isid;
    new.login(INITIATOR, TARGET).unwrap();
    // The old session must have closed by itself, not been given up on after the server's
    // bounded wait (which it logs); the time bound is only a generous sanity check.
    assert!(
        !fx.srv.stderr().contains("did not close within"),
        "the old session did not notice its reinstatement:\n{}",
        fx.srv.stderr()
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "reinstatement took {:?}",
        t.elapsed()
    );
    assert_eq!(new.read10(0, 1), fx.head[..512]);
    let me = old.stream.local_addr().unwrap().port();
    let t = Instant::now();
    while target_socket_open(fx.srv.port, me) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "old connection kept open"
        );
        thread::sleep(Duration::from_millis(100));
    }
    drop(old);
    let _ = pump.join();
}
