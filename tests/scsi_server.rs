//! SCSI fidelity against the live server (issue 15): what Windows failover clusters, MPIO and
//! the Microsoft initiator rely on, checked over raw iSCSI sessions.
//!
//! - a configuration reload keeps an unchanged LUN as the same logical unit (a reservation
//!   taken before the reload is seen by a session that logs in after it), and fences the
//!   sessions of a target whose LUNs changed (unit attention, then a logout request);
//! - registrations and the reservation made with APTPL = 1 survive `kill -9` and a restart;
//! - PERSISTENT RESERVE OUT / PREEMPT AND ABORT aborts the preempted nexus's queued
//!   commands (a WRITE held behind a CmdSN gap never runs) and tells it so with unit
//!   attentions;
//! - a 512e LUN (`physical_block_size: 4096` over 512-byte blocks) reports it in READ
//!   CAPACITY(16) and the Block Limits VPD page, with a 1 MiB optimal transfer.

mod common;
#[path = "common/raw.rs"]
mod raw;

use common::{sparse_image, Config, Lun, Target};
use diskless::pdu::Bhs;
use raw::*;
use std::path::Path;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.test:scsi";
const NODE_A: &str = "iqn.2026-11.test:node-a";
const NODE_B: &str = "iqn.2026-11.test:node-b";
/// PERSISTENT RESERVE OUT service actions and types (SPC-4 §6.16).
const REGISTER: u8 = 0x00;
const RESERVE: u8 = 0x01;
const REGISTER_AND_IGNORE: u8 = 0x06;
const PREEMPT_AND_ABORT: u8 = 0x05;
const EXCLUSIVE_ACCESS: u8 = 0x03;
const WRITE_EXCLUSIVE: u8 = 0x01;

fn session(port: u16, initiator: &str) -> Client {
    session_isid(port, initiator, fresh_isid())
}

/// A session of a given initiator port (InitiatorName + ISID: the PR identity).
fn session_isid(port: u16, initiator: &str, isid: [u8; 6]) -> Client {
    let mut c = Client::connect(port);
    c.isid = isid;
    c.login(initiator, TARGET).expect("login");
    // Clear the power-on unit attention.
    let _ = c.run(&[0, 0, 0, 0, 0, 0], 0, None);
    c
}

/// PERSISTENT RESERVE OUT with a basic 24-byte parameter list.
fn prout(c: &mut Client, sa: u8, kind: u8, key: u64, sa_key: u64, aptpl: bool) -> ScsiResult {
    let cdb = [0x5f, sa, kind, 0, 0, 0, 0, 0, 24, 0];
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = u8::from(aptpl);
    c.run(&cdb, 24, Some(&p))
}

/// PERSISTENT RESERVE IN, READ RESERVATION: (holder's key, type) if reserved.
fn reservation(c: &mut Client) -> Option<(u64, u8)> {
    let r = c.run(&[0x5e, 1, 0, 0, 0, 0, 0, 0, 255, 0], 255, None);
    assert_eq!(r.status, 0, "READ RESERVATION: {r:?}");
    let len = u32::from_be_bytes(r.data[4..8].try_into().unwrap());
    (len >= 16).then(|| {
        (
            u64::from_be_bytes(r.data[8..16].try_into().unwrap()),
            r.data[21] & 0x0f,
        )
    })
}

fn config(dir: &Path, luns: &[u64]) -> Config {
    Config::new(vec![Target::new(
        TARGET,
        luns.iter()
            .map(|&n| Lun::new(n, &dir.join(format!("lun{n}.img"))))
            .collect(),
    )])
}

fn reload(server: &common::Server, dir: &Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(["reload", "-c"])
        .arg(&server.config_path)
        .arg("--control")
        .arg(dir.join("state/control.sock"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Wait for an Async Message asking for a logout (RFC 7143 §11.9.1 AsyncEvent 1).
fn wait_logout_request(c: &mut Client) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no logout request: {seen:?}");
        match c.recv(left) {
            Ok(p) => match &p.bhs {
                Bhs::AsyncMessage(m) if m.async_event == 1 => return,
                _ => seen.push(p),
            },
            Err(e) => panic!("session failed before the logout request: {e:?} after {seen:?}"),
        }
    }
}

#[test]
fn reload_keeps_unchanged_luns_and_fences_changed_targets() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for n in 0..2 {
        sparse_image(&d.join(format!("lun{n}.img")), 8 << 20);
    }
    let server = common::Server::start(d, &config(d, &[0]));
    let mut a = session(server.port, NODE_A);
    assert_eq!(prout(&mut a, REGISTER, 0, 0, 0xa, false).status, 0);
    assert_eq!(
        prout(&mut a, RESERVE, WRITE_EXCLUSIVE, 0xa, 0, false).status,
        0
    );

    // 1. The same configuration again: nothing changes for anyone.
    reload(&server, d);
    let mut b = session(server.port, NODE_B);
    assert_eq!(
        reservation(&mut b),
        Some((0xa, WRITE_EXCLUSIVE)),
        "a session from after the reload must see the reservation taken before it"
    );
    let w = b.run(&write10_cdb(0, 1), 512, Some(&[0u8; 512]));
    assert_eq!(w.status, 0x18, "WRITE beside the holder: {w:?}");
    a.write10(0, &[0x11; 512]);

    // 2. A LUN is added: the target's sessions are fenced (unit attention REPORTED LUNS DATA
    // HAS CHANGED, then an Async Message asking for a logout), LUN 0 stays the same object.
    std::fs::write(&server.config_path, config(d, &[0, 1]).to_yaml()).unwrap();
    reload(&server, d);
    wait_logout_request(&mut a);
    wait_logout_request(&mut b);
    let tur = b.run(&[0, 0, 0, 0, 0, 0], 0, None);
    assert_eq!(tur.sense_triplet(), Some((6, 0x3f, 0x0e)), "{tur:?}");
    let mut rest = Vec::new();
    assert!(
        b.closed_within(Duration::from_secs(15), &mut rest),
        "a fenced session that does not log out must be closed"
    );
    let mut a2 = session(server.port, NODE_A);
    let mut b2 = session(server.port, NODE_B);
    assert_eq!(reservation(&mut b2), Some((0xa, WRITE_EXCLUSIVE)));
    assert_eq!(a2.read10(0, 1), vec![0x11; 512]);
    let w = b2.run(&write10_cdb(0, 1), 512, Some(&[0u8; 512]));
    assert_eq!(
        w.status, 0x18,
        "WRITE beside the holder after the fence: {w:?}"
    );
    let luns = b2.run(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256, None);
    assert_eq!(u32::from_be_bytes(luns.data[0..4].try_into().unwrap()), 16);
}

/// PERSISTENT RESERVE IN, READ KEYS.
fn keys(c: &mut Client) -> Vec<u64> {
    let r = c.run(&[0x5e, 0, 0, 0, 0, 0, 0, 0, 255, 0], 255, None);
    assert_eq!(r.status, 0, "READ KEYS: {r:?}");
    r.data[8..]
        .chunks_exact(8)
        .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
        .collect()
}

#[test]
fn aptpl_reservations_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_image(&d.join("lun0.img"), 8 << 20);
    let server = common::Server::start(d, &config(d, &[0]));
    let isid_a = fresh_isid();
    let mut a = session_isid(server.port, NODE_A, isid_a);
    let mut b = session(server.port, NODE_B);
    let caps = a.run(&[0x5e, 2, 0, 0, 0, 0, 0, 0, 8, 0], 8, None);
    assert_eq!(caps.data[2] & 1, 1, "PTPL_C: {caps:?}");
    assert_eq!(caps.data[3] & 1, 0, "PTPL_A before any APTPL registration");
    assert_eq!(prout(&mut a, REGISTER, 0, 0, 0xa, true).status, 0);
    assert_eq!(
        prout(&mut b, REGISTER_AND_IGNORE, 0, 0, 0xb, true).status,
        0
    );
    assert_eq!(
        prout(&mut a, RESERVE, WRITE_EXCLUSIVE, 0xa, 0, false).status,
        0
    );
    let caps = a.run(&[0x5e, 2, 0, 0, 0, 0, 0, 0, 8, 0], 8, None);
    assert_eq!(caps.data[3] & 1, 1, "PTPL_A after an APTPL registration");
    let saved = std::fs::read_dir(d.join("state/pr")).unwrap().count();
    assert_eq!(saved, 1, "one reservation file for the LUN");
    drop((a, b));
    server.kill9();

    let server = common::Server::start(d, &config(d, &[0]));
    let mut b = session(server.port, NODE_B);
    let mut k = keys(&mut b);
    k.sort_unstable();
    assert_eq!(k, vec![0xa, 0xb], "registrations after kill -9 and restart");
    assert_eq!(reservation(&mut b), Some((0xa, WRITE_EXCLUSIVE)));
    // B registered through another I_T nexus: it is not a registrant of this one.
    let w = b.run(&write10_cdb(0, 1), 512, Some(&[0u8; 512]));
    assert_eq!(w.status, 0x18, "WRITE beside the restored holder: {w:?}");
    // The holder's own initiator port writes.
    let mut a = session_isid(server.port, NODE_A, isid_a);
    a.write10(0, &[0x22; 512]);
    // APTPL = 0 on a later REGISTER: the state is no longer kept.
    assert_eq!(prout(&mut a, REGISTER, 0, 0xa, 0xa, false).status, 0);
    assert_eq!(std::fs::read_dir(d.join("state/pr")).unwrap().count(), 0);
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

#[test]
fn physical_block_size_512e() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_image(&d.join("e.img"), 8 << 20);
    sparse_image(&d.join("n.img"), 8 << 20);
    let yaml = format!(
        "portals: [\"127.0.0.1:0\"]\ntargets:\n  - name: {TARGET}\n    luns:\n      \
         - {{lun: 0, image: {e}, physical_block_size: 4096}}\n      \
         - {{lun: 1, image: {n}, block_size: 4096}}\n",
        e = d.join("e.img").display(),
        n = d.join("n.img").display()
    );
    let server = common::Server::start(d, &Config::yaml(&yaml));
    let mut c = session(server.port, NODE_A);
    for (lun, block, exponent, per_physical, optimal) in
        [(0u64, 512, 3, 8, 2048), (1, 4096, 0, 1, 256)]
    {
        let mut cmd = c.command(
            &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
            32,
            true,
            false,
        );
        cmd.lun = diskless::pdu::lun_from_index(lun as u16);
        let itt = cmd.itt;
        c.send(&diskless::pdu::Pdu::header_only(Bhs::ScsiCommand(cmd)))
            .unwrap();
        let r = c.finish(itt, &[]);
        assert_eq!(r.status, 0, "READ CAPACITY(16) LUN {lun}: {r:?}");
        assert_eq!(be32(&r.data[8..]), block, "LUN {lun} block size");
        assert_eq!(r.data[13] & 0x0f, exponent, "LUN {lun} LBPPBE");
        assert_eq!(r.data[14] & 0x3f, 0, "LUN {lun} lowest aligned LBA");

        let mut cmd = c.command(&[0x12, 1, 0xb0, 0, 64, 0], 64, true, false);
        cmd.lun = diskless::pdu::lun_from_index(lun as u16);
        let itt = cmd.itt;
        c.send(&diskless::pdu::Pdu::header_only(Bhs::ScsiCommand(cmd)))
            .unwrap();
        let r = c.finish(itt, &[]);
        assert_eq!(r.status, 0, "Block Limits LUN {lun}: {r:?}");
        let granularity = u16::from_be_bytes([r.data[6], r.data[7]]);
        assert_eq!(
            u32::from(granularity),
            per_physical,
            "LUN {lun} transfer granularity"
        );
        assert_eq!(
            be32(&r.data[12..]),
            optimal,
            "LUN {lun} optimal transfer (1 MiB)"
        );
        assert!(be32(&r.data[12..]) < 65535);
        assert_eq!(
            be32(&r.data[28..]),
            per_physical,
            "LUN {lun} unmap granularity"
        );
    }
}

#[test]
fn sanitize_overwrite_reports_progress_and_wipes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_image(&d.join("lun0.img"), 8 << 20);
    let yaml = format!(
        "portals: [\"127.0.0.1:0\"]\nsettings: {{sanitize_overwrite_rate: 2MiB}}\n{}",
        config(d, &[0])
            .to_yaml()
            .replace("portals: [\"127.0.0.1:0\"]\n", "")
    );
    let server = common::Server::start(d, &Config::yaml(&yaml));
    let mut a = session(server.port, NODE_A);
    a.write10(100, &[0x61; 512]);
    // REPORT SUPPORTED OPERATION CODES lists SANITIZE OVERWRITE (opcode 48h, SA 1).
    let r = a.run(&[0xa3, 0x0c, 0x02, 0x48, 0, 1, 0, 0, 0, 64, 0, 0], 64, None);
    assert_eq!(
        r.data[1] & 0x07,
        0x03,
        "SANITIZE OVERWRITE supported: {r:?}"
    );
    // SANITIZE OVERWRITE, IMMED = 1, one pass of a 0xAA block.
    let mut p = vec![0xaa_u8; 516];
    p[0..4].copy_from_slice(&[0x01, 0, 0x02, 0x00]);
    let r = a.run(&[0x48, 0x81, 0, 0, 0, 0, 0, 0x02, 0x04, 0], 516, Some(&p));
    assert_eq!(r.status, 0, "SANITIZE: {r:?}");
    let tur = a.run(&[0, 0, 0, 0, 0, 0], 0, None);
    assert_eq!(
        tur.sense_triplet(),
        Some((2, 0x04, 0x1b)),
        "while it runs: {tur:?}"
    );
    let rd = a.run(&read10_cdb(0, 1), 512, None);
    assert_eq!(
        rd.sense_triplet(),
        Some((2, 0x04, 0x1b)),
        "READ while it runs: {rd:?}"
    );
    let inq = a.run(&[0x12, 0, 0, 0, 36, 0], 36, None);
    assert_eq!(inq.status, 0, "INQUIRY is allowed while it runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.run(&[0, 0, 0, 0, 0, 0], 0, None).status != 0 {
        assert!(Instant::now() < deadline, "SANITIZE did not end");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(a.read10(100, 1), vec![0xaa; 512]);
    assert_eq!(a.read10(16383, 1), vec![0xaa; 512]);
}

/// MODE SENSE(10) of one page (DBD), returned as the page alone with PS cleared.
fn mode_page(c: &mut Client, code: u8) -> Vec<u8> {
    let r = c.run(&[0x5a, 0x08, code, 0, 0, 0, 0, 0, 255, 0], 255, None);
    assert_eq!(r.status, 0, "MODE SENSE page {code:#x}: {r:?}");
    let mut page = r.data[8..].to_vec();
    page[0] &= 0x3f;
    page
}

/// MODE SELECT(10), PF = 1, with `sp`, of one page.
fn mode_select(c: &mut Client, sp: bool, page: &[u8]) -> ScsiResult {
    let mut p = vec![0u8; 8];
    p.extend_from_slice(page);
    let n = p.len() as u16;
    let cdb = [
        0x55,
        0x10 | u8::from(sp),
        0,
        0,
        0,
        0,
        0,
        (n >> 8) as u8,
        n as u8,
        0,
    ];
    c.run(&cdb, u32::from(n), Some(&p))
}

#[test]
fn mode_select_save_pages() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_image(&d.join("lun0.img"), 8 << 20);
    let server = common::Server::start(d, &config(d, &[0]));
    let mut c = session(server.port, NODE_A);
    // The informational exceptions page as it is (= as saved): SP = 1 is accepted.
    let iec = mode_page(&mut c, 0x1c);
    let r = mode_select(&mut c, true, &iec);
    assert_eq!(r.status, 0, "SP=1 with the saved values: {r:?}");
    // Caching page with WCE cleared: a change the LU cannot save.
    let mut caching = mode_page(&mut c, 0x08);
    caching[2] &= !0x04;
    let r = mode_select(&mut c, true, &caching);
    assert_eq!(r.sense_triplet(), Some((5, 0x39, 0x00)), "{r:?}");
    // Without SP the same change is made (current values only).
    assert_eq!(mode_select(&mut c, false, &caching).status, 0);
    assert_eq!(mode_page(&mut c, 0x08)[2] & 0x04, 0);
}

#[test]
fn log_sense_provisioning_page() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_image(&d.join("lun0.img"), 8 << 20);
    let server = common::Server::start(d, &config(d, &[0]));
    let mut c = session(server.port, NODE_A);
    let r = c.run(&[0x4d, 0, 0x00, 0, 0, 0, 0, 0, 255, 0], 255, None);
    assert_eq!(r.status, 0, "LOG SENSE page 0: {r:?}");
    assert_eq!(&r.data[4..], &[0x00, 0x0c], "supported pages");
    let page = |c: &mut Client| {
        let r = c.run(&[0x4d, 0, 0x4c, 0, 0, 0, 0, 0, 255, 0], 255, None);
        assert_eq!(r.status, 0, "LOG SENSE page 0x0C: {r:?}");
        assert_eq!(
            (r.data[0] & 0x3f, u16::from_be_bytes([r.data[2], r.data[3]])),
            (0x0c, 24)
        );
        assert_eq!(&r.data[4..8], &[0, 1, 3, 8], "available parameter");
        assert_eq!(&r.data[16..20], &[0, 2, 3, 8], "used parameter");
        (be32(&r.data[8..]), be32(&r.data[20..]))
    };
    let (available, used) = page(&mut c);
    assert!(available > 0);
    c.write10(0, &vec![0x5a; 64 << 10]);
    let r = c.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None);
    assert_eq!(r.status, 0);
    let (_, used_after) = page(&mut c);
    assert!(
        used_after >= used + 128,
        "used blocks {used} -> {used_after}"
    );
}

/// A `diskless serve` on two portals (127.0.0.1 and 127.0.0.2, both loopback); killed when
/// dropped.
struct TwoPortals {
    child: std::process::Child,
    ports: Vec<(String, u16)>,
}

impl Drop for TwoPortals {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_two_portals(dir: &Path) -> TwoPortals {
    start_two_portals_with(dir, &config(dir, &[0]))
}

/// The server with `config`, listening on 127.0.0.1 and 127.0.0.2 (two portal groups).
fn start_two_portals_with(dir: &Path, config: &Config) -> TwoPortals {
    use std::io::BufRead;
    let cfg = dir.join("targets.yaml");
    std::fs::write(&cfg, config.to_yaml()).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(["serve", "-c"])
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0", "--listen", "127.0.0.2:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.join("server.stderr")).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut server = TwoPortals {
        child,
        ports: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.ports.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("server did not announce two portals: {e}"));
        if let Some(rest) = line.strip_prefix("diskless: listening on ") {
            let addr: std::net::SocketAddr =
                rest.split_whitespace().next().unwrap().parse().unwrap();
            server.ports.push((addr.ip().to_string(), addr.port()));
        }
    }
    server
}

#[test]
fn two_portals_are_two_target_port_groups() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_image(&d.join("lun0.img"), 8 << 20);
    let server = start_two_portals(d);
    let mut seen = Vec::new();
    for (ip, port) in &server.ports {
        let stream = std::net::TcpStream::connect((ip.as_str(), *port)).unwrap();
        let mut c = Client::connect_stream(stream);
        c.login(NODE_A, TARGET).expect("login");
        let _ = c.run(&[0, 0, 0, 0, 0, 0], 0, None);
        let tpgt: u16 = c.answer("TargetPortalGroupTag").unwrap().parse().unwrap();
        // VPD 0x83: relative target port (type 4) and target port group (type 5).
        let r = c.run(&[0x12, 1, 0x83, 1, 0, 0], 256, None);
        assert_eq!(r.status, 0);
        let (mut rel, mut tpg) = (None, None);
        let mut off = 4;
        while off + 4 <= r.data.len() {
            let (ty, len) = (r.data[off + 1] & 0x0f, usize::from(r.data[off + 3]));
            let v = u16::from_be_bytes([r.data[off + 6], r.data[off + 7]]);
            match ty {
                4 => rel = Some(v),
                5 => tpg = Some(v),
                _ => {}
            }
            off += 4 + len;
        }
        assert_eq!(rel, Some(tpgt), "relative port on {ip}");
        assert_eq!(tpg, Some(tpgt), "target port group on {ip}");
        // REPORT TARGET PORT GROUPS: both groups, active/optimized, one port each.
        let r = c.run(&[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256, None);
        assert_eq!(r.status, 0, "RTPG: {r:?}");
        assert_eq!(be32(&r.data[0..]), 24, "{r:?}");
        for (i, g) in r.data[4..].chunks_exact(12).enumerate() {
            assert_eq!(g[0] & 0x0f, 0, "active/optimized");
            assert_eq!(u16::from_be_bytes([g[2], g[3]]) as usize, i + 1);
            assert_eq!(g[7], 1);
            assert_eq!(u16::from_be_bytes([g[10], g[11]]) as usize, i + 1);
        }
        seen.push(tpgt);
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![1, 2], "two portals, two relative port ids");
}

/// SPC-4 §5.13.11.2.6: PREEMPT AND ABORT aborts the tasks of the preempted I_T nexus. B
/// queues a WRITE (with its data, ImmediateData=Yes) behind a CmdSN gap; A preempts B's
/// registration and aborts; B then fills the gap. The WRITE must never run (the block keeps
/// its old content), gets no status (TAS = 0), and its CmdSN still counts (RFC 7143
/// §3.2.2.1): B's next commands are answered, with REGISTRATIONS PREEMPTED and COMMANDS
/// CLEARED BY ANOTHER INITIATOR first.
#[test]
fn preempt_and_abort_aborts_a_queued_command() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_image(&d.join("lun0.img"), 8 << 20);
    let server = common::Server::start(d, &config(d, &[0]));
    let mut a = session(server.port, NODE_A);
    let mut b = Client::connect(server.port);
    b.login_with(&[
        ("InitiatorName", NODE_B),
        ("TargetName", TARGET),
        ("SessionType", "Normal"),
        ("ImmediateData", "Yes"),
    ])
    .expect("login B");
    assert_eq!(b.answer("ImmediateData"), Some("Yes"));
    let _ = b.run(&[0, 0, 0, 0, 0, 0], 0, None);
    a.write10(8, &[0x11; 512]);
    assert_eq!(prout(&mut a, REGISTER, 0, 0, 0xa, false).status, 0);
    assert_eq!(prout(&mut b, REGISTER, 0, 0, 0xb, false).status, 0);

    // B: the WRITE takes CmdSN n+1 with its data inline; n stays a gap, so it is held.
    let gap = b.take_cmd_sn();
    let mut w = b.command(&write10_cdb(8, 1), 512, false, true);
    let write_sn = w.cmd_sn;
    w.final_ = true;
    let write_itt = w.itt;
    b.send(&diskless::pdu::Pdu {
        bhs: Bhs::ScsiCommand(w),
        data: bytes::Bytes::from(vec![0x22u8; 512]),
    })
    .unwrap();
    // The WRITE is held, not run: nothing comes back for it.
    let ping = b.ping(b"held?");
    assert_eq!(ping.1.as_ref(), b"held?");

    // A preempts B's registration and aborts its tasks, taking an exclusive reservation.
    let r = prout(&mut a, PREEMPT_AND_ABORT, EXCLUSIVE_ACCESS, 0xa, 0xb, false);
    assert_eq!(r.status, 0, "PREEMPT AND ABORT: {r:?}");
    assert_eq!(keys(&mut a), vec![0xa]);
    // No reservation was held, so none is made (SPC-4 §5.13.11.2.4): nothing but the abort
    // keeps B's WRITE from landing.
    assert_eq!(reservation(&mut a), None);

    // B fills the gap with a TEST UNIT READY of CmdSN n.
    let mut tur = b.command(&[0, 0, 0, 0, 0, 0], 0, false, false);
    tur.cmd_sn = gap;
    b.cmd_sn = write_sn.wrapping_add(1);
    let tur_itt = tur.itt;
    b.send(&diskless::pdu::Pdu::header_only(Bhs::ScsiCommand(tur)))
        .unwrap();
    let t = b.finish(tur_itt, &[]);
    assert_eq!(t.sense_triplet(), Some((6, 0x2a, 0x05)), "{t:?}");
    // The next command (CmdSN n+2) is answered: the aborted WRITE's CmdSN counted. Only its
    // own answer arrives (finish() fails on anything else, e.g. a late WRITE status).
    assert_ne!(write_itt, 0);
    let t = b.run(&[0, 0, 0, 0, 0, 0], 0, None);
    assert_eq!(t.sense_triplet(), Some((6, 0x2f, 0x00)), "{t:?}");
    assert_eq!(a.read10(8, 1), vec![0x11; 512], "the aborted WRITE ran");
    // B's new commands run as usual.
    b.write10(9, &[0x44; 512]);
    let nop = b.ping(b"after");
    assert!(
        (nop.0.exp_cmd_sn.wrapping_sub(write_sn) as i32) > 0,
        "ExpCmdSN {} must be past the aborted WRITE's CmdSN {write_sn}",
        nop.0.exp_cmd_sn
    );
    assert_eq!(a.read10(9, 1), vec![0x44; 512]);
}

const BOOT_TARGET: &str = "iqn.2026-11.test:boot";

/// A boot target whose clients each get a persistent copy-on-write disk over `golden.img`.
fn boot_config(d: &Path) -> Config {
    Config::yaml(&format!(
        "portals: [\"127.0.0.1:0\"]\n\
         state_dir: {state}\n\
         settings: {{nop_in_interval_secs: 0}}\n\
         images:\n  - {{name: base, path: {img}}}\n\
         targets:\n  - name: {BOOT_TARGET}\n    boot:\n      default: {{image: base, mode: persistent}}\n",
        state = d.join("state").display(),
        img = d.join("golden.img").display(),
    ))
}

/// Blocks the files named `name` under `dir` occupy on disk, in 512-byte units.
fn allocated(dir: &Path, name: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            total += allocated(&p, name);
        } else if p.file_name().is_some_and(|n| n == name) {
            total += p.metadata().unwrap().blocks();
        }
    }
    total
}

/// SANITIZE on a client disk discards the client's overlay: after BLOCK or CRYPTO ERASE the
/// disk reads as the golden image again (not zeroes) and the overlay holds no data; OVERWRITE
/// then writes its pattern. The golden image is never touched.
#[test]
fn sanitize_on_a_client_disk_discards_its_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let golden = common::random_bytes(4 << 20, 15);
    std::fs::write(d.join("golden.img"), &golden).unwrap();
    let server = common::Server::start(d, &boot_config(d));
    let mut c = Client::connect(server.port);
    c.login("iqn.2026-11.test:pc-1", BOOT_TARGET)
        .expect("login");
    let _ = c.run(&[0, 0, 0, 0, 0, 0], 0, None);
    let golden_block = |lba: usize| golden[lba * 512..(lba + 1) * 512].to_vec();
    for (i, sa) in [(0u8, 0x02u8), (1, 0x03)] {
        // Write 1 MiB and make it durable, so the overlay holds real data.
        for k in 0..8u32 {
            c.write10(k * 256, &vec![0x70 + i; 256 * 512]);
        }
        let sync = c.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None);
        assert_eq!(sync.status, 0, "SYNCHRONIZE CACHE: {sync:?}");
        assert_eq!(c.read10(5, 1), vec![0x70 + i; 512]);
        let used = allocated(&d.join("state"), "overlay.data");
        assert!(
            used >= 2048,
            "the overlay holds the 1 MiB written: {used} blocks"
        );
        // SANITIZE BLOCK ERASE (SA 2), then CRYPTO ERASE (SA 3), IMMED = 0.
        let r = c.run(&[0x48, sa, 0, 0, 0, 0, 0, 0, 0, 0], 0, None);
        assert_eq!(r.status, 0, "SANITIZE SA {sa}: {r:?}");
        assert_eq!(
            c.read10(5, 1),
            golden_block(5),
            "reads show the golden image"
        );
        assert_eq!(c.read10(8191, 1), golden_block(8191));
        let used = allocated(&d.join("state"), "overlay.data");
        assert_eq!(used, 0, "a sanitized overlay holds no data");
    }
    // OVERWRITE (SA 1, IMMED = 0, one pass of 0xAA blocks): the overlay is discarded, then
    // the pattern written as asked, over the whole disk.
    c.write10(0, &[0x7f; 512]);
    let mut p = vec![0xaa_u8; 516];
    p[0..4].copy_from_slice(&[0x01, 0, 0x02, 0x00]);
    let r = c.run(&[0x48, 0x01, 0, 0, 0, 0, 0, 0x02, 0x04, 0], 516, Some(&p));
    assert_eq!(r.status, 0, "SANITIZE OVERWRITE: {r:?}");
    assert_eq!(c.read10(0, 1), vec![0xaa; 512]);
    assert_eq!(c.read10(8191, 1), vec![0xaa; 512]);
    assert_eq!(std::fs::read(d.join("golden.img")).unwrap(), golden);
}

/// A tmpfs of `size` mounted at `path` (created), unmounted when dropped: a small state
/// filesystem that can be filled. Needs root, and says so rather than skipping.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_path_buf())
    }

    /// Fill it with one file until the filesystem refuses more.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0x55u8; 64 << 10];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // A few bytes more, one at a time, so not even a small file fits.
        while f.write_all(&[0]).is_ok() {}
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Issue 15 item 10: a persistent client whose state filesystem is full still logs in and
/// reads its disk (its own writes and the golden image); writes are answered DATA PROTECT,
/// SPACE ALLOCATION FAILED WRITE PROTECT (07/27/07), and work again once space is freed.
#[test]
fn full_state_filesystem_keeps_reads_working() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let golden = common::random_bytes(4 << 20, 16);
    std::fs::write(d.join("golden.img"), &golden).unwrap();
    let fs = Tmpfs::mount(&d.join("state"), "2m");
    const PC: &str = "iqn.2026-11.test:pc-full";
    let isid = common::os_isid(1);
    let login = |port: u16| {
        let mut c = Client::connect(port);
        c.isid = isid;
        c.login(PC, BOOT_TARGET).expect("login");
        let _ = c.run(&[0, 0, 0, 0, 0, 0], 0, None);
        c
    };
    let server = common::Server::start(d, &boot_config(d));
    let mut c = login(server.port);
    c.write10(0, &[0x5a; 64 << 10]);
    let sync = c.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None);
    assert_eq!(sync.status, 0, "SYNCHRONIZE CACHE: {sync:?}");
    drop(c);
    server.stop();

    let filler = fs.fill();
    let server = common::Server::start(d, &boot_config(d));
    let mut c = login(server.port);
    assert_eq!(c.read10(0, 1), vec![0x5a; 512], "the client's own data");
    assert_eq!(c.read10(127, 1), vec![0x5a; 512]);
    assert_eq!(c.read10(1000, 1), golden[1000 * 512..1001 * 512].to_vec());
    let w = c.run(&write10_cdb(2000, 1), 512, Some(&[0x33; 512]));
    assert_eq!(
        w.sense_triplet(),
        Some((7, 0x27, 0x07)),
        "WRITE on a full filesystem: {w:?}"
    );
    assert_eq!(c.read10(2000, 1), golden[2000 * 512..2001 * 512].to_vec());

    std::fs::remove_file(filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let w = c.run(&write10_cdb(2000, 1), 512, Some(&[0x33; 512]));
        if w.status == 0 {
            break;
        }
        assert_eq!(w.sense_triplet(), Some((7, 0x27, 0x07)), "{w:?}");
        assert!(
            Instant::now() < deadline,
            "writes did not resume once space was freed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.read10(2000, 1), vec![0x33; 512]);
    assert_eq!(c.read10(0, 1), vec![0x5a; 512]);
    drop(c);
    server.stop();
}

/// What a session learns of its path: VPD 0x83 relative target port (type 4), target port
/// group (type 5) and NAA designator (type 3), and the target port groups of REPORT TARGET
/// PORT GROUPS.
fn path_identity(c: &mut Client) -> (Option<u16>, Option<u16>, Vec<u8>, Vec<u16>) {
    let r = c.run(&[0x12, 1, 0x83, 1, 0, 0], 256, None);
    assert_eq!(r.status, 0, "VPD 0x83: {r:?}");
    let (mut rel, mut tpg, mut naa) = (None, None, Vec::new());
    let mut off = 4;
    while off + 4 <= r.data.len() {
        let (ty, len) = (r.data[off + 1] & 0x0f, usize::from(r.data[off + 3]));
        let body = &r.data[off + 4..off + 4 + len];
        match ty {
            3 => naa = body.to_vec(),
            4 => rel = Some(u16::from_be_bytes([body[2], body[3]])),
            5 => tpg = Some(u16::from_be_bytes([body[2], body[3]])),
            _ => {}
        }
        off += 4 + len;
    }
    let r = c.run(&[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256, None);
    assert_eq!(r.status, 0, "RTPG: {r:?}");
    let groups = r.data[4..]
        .chunks_exact(12)
        .map(|g| u16::from_be_bytes([g[2], g[3]]))
        .collect();
    (rel, tpg, naa, groups)
}

/// A client disk seen by the firmware through one portal and by the OS through the other
/// reports one identity: the same NAA designator, and each session's relative port and
/// target port group among the groups REPORT TARGET PORT GROUPS lists (two portals, two
/// groups, as for plain LUNs), so Windows MPIO and dm-multipath see two paths to one disk.
#[test]
fn client_disk_reports_one_identity_through_both_portals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("golden.img"), common::random_bytes(4 << 20, 17)).unwrap();
    let server = start_two_portals_with(d, &boot_config(d));
    const PC: &str = "iqn.2026-11.test:pc-mpio";
    let mut seen = Vec::new();
    for ((ip, port), isid) in server
        .ports
        .iter()
        .zip([common::firmware_isid(1), common::os_isid(1)])
    {
        let stream = std::net::TcpStream::connect((ip.as_str(), *port)).unwrap();
        let mut c = Client::connect_stream(stream);
        c.isid = isid;
        c.login(PC, BOOT_TARGET).expect("login");
        let _ = c.run(&[0, 0, 0, 0, 0, 0], 0, None);
        let tpgt: u16 = c.answer("TargetPortalGroupTag").unwrap().parse().unwrap();
        let (rel, tpg, naa, groups) = path_identity(&mut c);
        assert_eq!((rel, tpg), (Some(tpgt), Some(tpgt)), "on {ip}");
        assert_eq!(groups, vec![1, 2], "REPORT TARGET PORT GROUPS on {ip}");
        assert_eq!(naa.len(), 16, "legacy NAA 6 by default");
        seen.push((tpgt, naa));
    }
    assert_eq!(seen[0].1, seen[1].1, "one disk, one NAA identifier");
    assert_ne!(seen[0].0, seen[1].0, "two paths, two relative ports");
}

/// `identity: naa3` gives a LUN the 8-byte locally assigned NAA designator (SPC-4
/// §7.8.6.6.4); a LUN without the key keeps the 16-byte form every earlier version reported.
#[test]
fn identity_naa3_is_locally_assigned() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for n in 0..2 {
        sparse_image(&d.join(format!("lun{n}.img")), 1 << 20);
    }
    let yaml = format!(
        "portals: [\"127.0.0.1:0\"]\n\
         targets:\n  - name: {TARGET}\n    luns:\n\
         \x20     - {{lun: 0, image: {l0}}}\n\
         \x20     - {{lun: 1, image: {l1}, identity: naa3}}\n",
        l0 = d.join("lun0.img").display(),
        l1 = d.join("lun1.img").display(),
    );
    let server = common::Server::start(d, &Config::yaml(&yaml));
    let mut c = session(server.port, NODE_A);
    let naa = |c: &mut Client, lun: u64| {
        let mut cmd = c.command(&[0x12, 1, 0x83, 1, 0, 0], 256, true, false);
        cmd.lun = diskless::pdu::lun_from_index(lun as u16);
        let itt = cmd.itt;
        c.send(&diskless::pdu::Pdu::header_only(Bhs::ScsiCommand(cmd)))
            .unwrap();
        let r = c.finish(itt, &[]);
        assert_eq!(r.status, 0, "VPD 0x83 of LUN {lun}: {r:?}");
        // The first designator is the NAA one (type 3, binary).
        assert_eq!(r.data[5] & 0x0f, 3);
        r.data[8..8 + usize::from(r.data[7])].to_vec()
    };
    let legacy = naa(&mut c, 0);
    assert_eq!((legacy.len(), legacy[0] >> 4), (16, 6));
    let local = naa(&mut c, 1);
    assert_eq!((local.len(), local[0] >> 4), (8, 3));
}

/// PREEMPT AND ABORT also aborts a write of the preempted nexus that is waiting for its
/// Data-Out (R2T sent, data not yet there): the data that arrives afterwards is discarded
/// without a Reject, the WRITE gets no status and never lands.
#[test]
fn preempt_and_abort_aborts_a_write_waiting_for_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_image(&d.join("lun0.img"), 8 << 20);
    let server = common::Server::start(d, &config(d, &[0]));
    let mut a = session(server.port, NODE_A);
    let mut b = session(server.port, NODE_B);
    a.write10(8, &[0x11; 512]);
    assert_eq!(prout(&mut a, REGISTER, 0, 0, 0xa, false).status, 0);
    assert_eq!(prout(&mut b, REGISTER, 0, 0, 0xb, false).status, 0);
    // B's WRITE is delivered (InitialR2T=Yes, no immediate data): it waits for Data-Out.
    let w = b.command(&write10_cdb(8, 1), 512, false, true);
    let itt = w.itt;
    b.send(&diskless::pdu::Pdu::header_only(Bhs::ScsiCommand(w)))
        .unwrap();
    let r2t = match b.recv(Duration::from_secs(10)) {
        Ok(diskless::pdu::Pdu {
            bhs: Bhs::R2t(r), ..
        }) if r.itt == itt => r,
        other => panic!("expected an R2T: {other:?}"),
    };
    let r = prout(&mut a, PREEMPT_AND_ABORT, EXCLUSIVE_ACCESS, 0xa, 0xb, false);
    assert_eq!(r.status, 0, "PREEMPT AND ABORT: {r:?}");
    // The solicited data arrives late: swallowed, no Reject and no status.
    b.send(&diskless::pdu::Pdu {
        bhs: Bhs::DataOut(diskless::pdu::DataOut {
            final_: true,
            lun: r2t.lun,
            itt,
            ttt: r2t.ttt,
            exp_stat_sn: b.exp_stat_sn,
            data_sn: 0,
            buffer_offset: 0,
        }),
        data: bytes::Bytes::from(vec![0x22u8; 512]),
    })
    .unwrap();
    let t = b.run(&[0, 0, 0, 0, 0, 0], 0, None);
    assert_eq!(t.sense_triplet(), Some((6, 0x2a, 0x05)), "{t:?}");
    let t = b.run(&[0, 0, 0, 0, 0, 0], 0, None);
    assert_eq!(t.sense_triplet(), Some((6, 0x2f, 0x00)), "{t:?}");
    assert_eq!(a.read10(8, 1), vec![0x11; 512], "the aborted WRITE ran");
}

/// LOG SENSE page 0x0C on a client disk (SBC-4 §6.4.6): used is what the client's own
/// writes occupy in its overlay (nothing at first: the golden image is shared), available
/// the state filesystem's free space.
#[test]
fn log_sense_provisioning_page_on_a_client_disk() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("golden.img"), common::random_bytes(4 << 20, 16)).unwrap();
    let server = common::Server::start(d, &boot_config(d));
    let mut c = Client::connect(server.port);
    c.login("iqn.2026-11.test:pc-1", BOOT_TARGET)
        .expect("login");
    let _ = c.run(&[0, 0, 0, 0, 0, 0], 0, None);
    let r = c.run(&[0x4d, 0, 0x00, 0, 0, 0, 0, 0, 255, 0], 255, None);
    assert_eq!(r.status, 0, "LOG SENSE page 0: {r:?}");
    assert_eq!(&r.data[4..], &[0x00, 0x0c], "supported pages");
    let page = |c: &mut Client| {
        let r = c.run(&[0x4d, 0, 0x4c, 0, 0, 0, 0, 0, 255, 0], 255, None);
        assert_eq!(r.status, 0, "LOG SENSE page 0x0C: {r:?}");
        assert_eq!(&r.data[4..8], &[0, 1, 3, 8], "available parameter");
        assert_eq!(&r.data[16..20], &[0, 2, 3, 8], "used parameter");
        (be32(&r.data[8..]), be32(&r.data[20..]))
    };
    let (available, used) = page(&mut c);
    assert!(available > 0);
    assert_eq!(used, 0, "a fresh overlay uses nothing");
    c.write10(0, &vec![0x5b; 64 << 10]);
    let (_, used) = page(&mut c);
    assert_eq!(used, 128, "64 KiB written: 128 blocks");
}

/// A session on `port` to `target` with both digests set to `digest` and Data-In segments of
/// at most 64 KiB (so a 1 MiB read is 16 PDUs).
fn digest_session(port: u16, target: &str, initiator: &str, digest: &str) -> Client {
    let mut c = Client::connect(port);
    c.login_with(&[
        ("InitiatorName", initiator),
        ("TargetName", target),
        ("SessionType", "Normal"),
        ("HeaderDigest", digest),
        ("DataDigest", digest),
        ("MaxRecvDataSegmentLength", "65536"),
    ])
    .expect("login");
    assert_eq!(c.digests.data, digest == "CRC32C", "DataDigest {digest}");
    let _ = c.run(&[0, 0, 0, 0, 0, 0], 0, None);
    c
}

/// Large READs leave from the page cache by sendfile (no data digest) or from memory (data
/// digest on: the client's decoder checks every CRC): byte-exact either way, at odd offsets
/// and lengths, cut by an EDTL that is not a multiple of 4 (padding, overflow residual), and
/// after a write into the range.
#[test]
fn large_reads_are_byte_exact_with_and_without_data_digest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut img = common::random_bytes(8 << 20, 21);
    std::fs::write(d.join("lun0.img"), &img).unwrap();
    let server = common::Server::start(d, &config(d, &[0]));
    for digest in ["None", "CRC32C"] {
        let mut c = digest_session(server.port, TARGET, NODE_A, digest);
        for (lba, blocks) in [
            (0u64, 2048u32),
            (1, 2047),
            (4096, 128),
            (16384 - 4096, 4096),
        ] {
            let got = c.try_read16(lba, blocks).expect("READ(16)");
            let at = lba as usize * 512;
            assert!(
                got == img[at..at + blocks as usize * 512],
                "{digest}: READ(16) lba {lba} blocks {blocks} differs from the image"
            );
        }
        // EDTL 600,001 < 1 MiB: the data stops there (3 bytes of padding), residual overflow.
        let r = c.run(&rw16_cdb(0x88, 0, 2048), 600_001, None);
        assert_eq!(r.status, 0, "{digest}: {r:?}");
        assert!(
            r.overflow && r.residual == (1 << 20) - 600_001,
            "{digest}: residual"
        );
        assert!(r.data == img[..600_001], "{digest}: data cut at the EDTL");
        // A write into the range shows in the next read.
        let fill = vec![digest.len() as u8; 8192];
        c.write10(64, &fill);
        img[64 * 512..64 * 512 + 8192].copy_from_slice(&fill);
        let got = c.try_read16(0, 2048).expect("READ(16) after WRITE");
        assert!(got == img[..1 << 20], "{digest}: read after write");
    }
}

/// Through a client's copy-on-write overlay: a range still wholly golden may go by sendfile
/// from the golden image, one the client wrote into is read and copied; both byte-exact.
#[test]
fn large_reads_through_an_overlay_are_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut golden = common::random_bytes(8 << 20, 22);
    std::fs::write(d.join("golden.img"), &golden).unwrap();
    let server = common::Server::start(d, &boot_config(d));
    for digest in ["None", "CRC32C"] {
        let mut c = digest_session(server.port, BOOT_TARGET, "iqn.2026-11.test:pc-7", digest);
        assert!(c.try_read16(0, 2048).expect("READ(16)") == golden[..1 << 20]);
        let fill = vec![0xa0 + digest.len() as u8; 4096];
        c.write10(100, &fill);
        golden[100 * 512..100 * 512 + 4096].copy_from_slice(&fill);
        assert!(
            c.try_read16(0, 2048).expect("READ(16)") == golden[..1 << 20],
            "{digest}: mixed golden and overlay range"
        );
        assert!(
            c.try_read16(4096, 2048).expect("READ(16)") == golden[4096 * 512..6144 * 512],
            "{digest}: golden range"
        );
    }
}
