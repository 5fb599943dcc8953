//! Boot emulation against the real binary: per-client disks over one golden image, the two
//! hand-off shapes (BIOS: firmware session orphaned; UEFI: firmware connection closed without
//! Logout), the volatile reboot rule, persistence across restarts, the boot script endpoint,
//! operator commands, and `kill -9` during synced writes.
//!
//! Logins are made with the raw client so that the ISID can be iPXE's (firmware) or
//! open-iscsi's (the OS after the hand-off); qemu-img is the real client for bulk data.

mod common;
#[path = "common/raw.rs"]
mod raw;

use common::{firmware_isid, free_port, os_isid, Config, Server};
use raw::Client;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.org.diskless:boot";
const GOLDEN_SIZE: usize = 4 << 20;

fn golden(dir: &Path) -> Vec<u8> {
    let data = common::random_bytes(GOLDEN_SIZE, 7);
    std::fs::write(dir.join("golden.img"), &data).unwrap();
    data
}

fn config(dir: &Path, mode_default: &str, extra: &str) -> Config {
    Config::yaml(&format!(
        "portals: [\"127.0.0.1:0\"]\n\
         state_dir: {state}\n\
         settings: {{reboot_gap_secs: 1, nop_in_interval_secs: 0}}\n\
         images:\n  - {{name: base, path: {img}}}\n\
         targets:\n  - name: {TARGET}\n    boot:\n      bindings:\n\
         \x20       - {{initiator: \"iqn.2026-11.test:ro-*\", image: base, mode: readonly}}\n\
         {extra}\
         \x20     default: {{image: base, mode: {mode_default}}}\n",
        state = dir.join("state").display(),
        img = dir.join("golden.img").display(),
    ))
}

fn login(server: &Server, initiator: &str, isid: [u8; 6]) -> Client {
    let mut c = Client::connect(server.port);
    c.isid = isid;
    c.login(initiator, TARGET)
        .unwrap_or_else(|e| panic!("login of {initiator} refused: {e:?}"));
    c
}

fn block(fill: u8) -> Vec<u8> {
    vec![fill; 512]
}

fn sha(path: &Path) -> u64 {
    raw::file_hash(path)
}

#[test]
fn two_clients_share_one_golden_image_privately() {
    let dir = tempfile::tempdir().unwrap();
    let g = golden(dir.path());
    let before = sha(&dir.path().join("golden.img"));
    let server = Server::start(dir.path(), &config(dir.path(), "persistent", ""));
    let mut a = login(&server, "iqn.2026-11.test:a", os_isid(1));
    let mut b = login(&server, "iqn.2026-11.test:b", os_isid(2));
    a.write10(100, &block(b'A'));
    b.write10(100, &block(b'B'));
    assert_eq!(a.read10(100, 1), block(b'A'));
    assert_eq!(b.read10(100, 1), block(b'B'));
    // Everything else is the golden image.
    assert_eq!(a.read10(99, 1), g[99 * 512..100 * 512]);
    assert_eq!(b.read10(0, 8), g[..8 * 512]);

    // A real client on a third disk: qemu-img writes 1 MiB, reads the whole disk back.
    common::require_tool("qemu-img");
    let data = common::random_bytes(1 << 20, 3);
    std::fs::write(dir.path().join("c.bin"), &data).unwrap();
    let opts = |who: &str| {
        format!(
            "driver=iscsi,transport=tcp,portal={},target={TARGET},lun=0,initiator-name={who}",
            server.portal()
        )
    };
    let c_in = dir.path().join("c.bin");
    let c_out = dir.path().join("c.out");
    common::run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "--target-image-opts",
            c_in.to_str().unwrap(),
            &opts("iqn.2026-11.test:c"),
        ],
    )
    .ok();
    common::run(
        "qemu-img",
        &[
            "convert",
            "--image-opts",
            &opts("iqn.2026-11.test:c"),
            "-O",
            "raw",
            c_out.to_str().unwrap(),
        ],
    )
    .ok();
    let seen = std::fs::read(&c_out).unwrap();
    assert_eq!(seen[..1 << 20], data[..]);
    assert_eq!(seen[1 << 20..], g[1 << 20..]);
    // Client A still sees only its own write.
    assert_eq!(a.read10(0, 1), g[..512]);

    // Each client disk has its own identity (VPD 0x80 serial).
    let serial = |c: &mut Client| {
        let r = c.run(&[0x12, 0x01, 0x80, 0x00, 0xff, 0x00], 255, None);
        assert_eq!(r.status, 0);
        r.data
    };
    assert_ne!(serial(&mut a), serial(&mut b));

    drop((a, b));
    server.stop();
    assert_eq!(
        sha(&dir.path().join("golden.img")),
        before,
        "the golden image changed"
    );
}

#[test]
fn volatile_bios_handoff_keeps_firmware_writes_and_a_reboot_discards_them() {
    let dir = tempfile::tempdir().unwrap();
    let g = golden(dir.path());
    let server = Server::start(dir.path(), &config(dir.path(), "volatile", ""));
    let who = "iqn.2026-11.test:pc1";
    // Boot 1, firmware phase: iPXE logs in and (say, a boot loader) writes a block.
    let mut fw = login(&server, who, firmware_isid(0x1111));
    fw.write10(10, &block(1));
    // BIOS hand-off: the firmware session stays open (orphaned); the OS logs in from the iBFT
    // with another ISID and sees the firmware's write.
    let mut os = login(&server, who, os_isid(0x2222));
    assert_eq!(os.read10(10, 1), block(1));
    os.write10(11, &block(2));
    // The orphan was reaped when the OS logged in: its connection is closed.
    let mut seen = Vec::new();
    assert!(
        fw.closed_within(Duration::from_secs(5), &mut seen),
        "firmware orphan not reaped: {seen:?}"
    );
    // The OS session goes on undisturbed.
    assert_eq!(os.read10(10, 2), [block(1), block(2)].concat());
    // The machine reboots: its OS connection dies and the firmware logs in again. No wait:
    // a firmware login after the OS phase is a new boot, whatever the time (lifecycle model).
    drop(os);
    let mut fw2 = login(&server, who, firmware_isid(0x3333));
    assert_eq!(
        fw2.read10(10, 2),
        g[10 * 512..12 * 512],
        "volatile writes survived a reboot"
    );
}

#[test]
fn volatile_uefi_handoff_and_ipxe_reconnect_keep_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    golden(dir.path());
    let server = Server::start(dir.path(), &config(dir.path(), "volatile", ""));
    let who = "iqn.2026-11.test:pc2";
    let mut fw = login(&server, who, firmware_isid(1));
    fw.write10(20, &block(7));
    // iPXE gives up on a command and reconnects at once, with a new ISID: same boot.
    fw.shutdown_write();
    drop(fw);
    let mut fw = login(&server, who, firmware_isid(2));
    assert_eq!(
        fw.read10(20, 1),
        block(7),
        "an iPXE reconnect discarded the disk"
    );
    fw.write10(21, &block(8));
    // UEFI hand-off: at ExitBootServices iPXE closes TCP without a Logout; the OS logs in.
    fw.shutdown_write();
    drop(fw);
    let mut os = login(&server, who, os_isid(9));
    assert_eq!(
        os.read10(20, 2),
        [block(7), block(8)].concat(),
        "the OS lost the firmware's writes"
    );
}

#[test]
fn persistent_writes_survive_reboots_and_server_restarts() {
    let dir = tempfile::tempdir().unwrap();
    golden(dir.path());
    let cfg = config(dir.path(), "persistent", "");
    let who = "iqn.2026-11.test:pc3";
    {
        let server = Server::start(dir.path(), &cfg);
        let mut os = login(&server, who, os_isid(1));
        os.write10(30, &block(9));
        drop(os);
        // A reboot: the firmware logs in again.
        let mut fw = login(&server, who, firmware_isid(5));
        assert_eq!(fw.read10(30, 1), block(9));
        drop(fw);
        server.stop();
    }
    let server = Server::start(dir.path(), &cfg);
    let mut fw = login(&server, who, firmware_isid(6));
    assert_eq!(fw.read10(30, 1), block(9), "lost across a server restart");
}

#[test]
fn readonly_binding_refuses_writes_and_unknown_initiators_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    golden(dir.path());
    let cfg = Config::yaml(&format!(
        "portals: [\"127.0.0.1:0\"]\nstate_dir: {}\nimages:\n  - {{name: base, path: {}}}\n\
         targets:\n  - name: {TARGET}\n    boot:\n      bindings:\n\
         \x20       - {{initiator: \"iqn.2026-11.test:ro-*\", image: base, mode: readonly}}\n",
        dir.path().join("state").display(),
        dir.path().join("golden.img").display()
    ));
    let server = Server::start(dir.path(), &cfg);
    let mut ro = login(&server, "iqn.2026-11.test:ro-1", os_isid(1));
    let r = ro.run(&raw::write10_cdb(0, 1), 512, Some(&block(1)));
    assert_eq!(r.status, 2);
    assert_eq!(
        r.sense_triplet(),
        Some((0x07, 0x27, 0x00)),
        "expected WRITE PROTECTED"
    );
    // No binding, no default: refused (0x0202) and not listed by SendTargets.
    let mut c = Client::connect(server.port);
    assert_eq!(c.login("iqn.2026-11.test:stranger", TARGET), Err((2, 2)));
    let mut d = Client::connect(server.port);
    d.login_discovery("iqn.2026-11.test:stranger").unwrap();
    let listed = d.text(b"SendTargets=All\0");
    assert!(
        !listed.iter().any(|(k, v)| k == "TargetName" && v == TARGET),
        "{listed:?}"
    );
    let mut d = Client::connect(server.port);
    d.login_discovery("iqn.2026-11.test:ro-2").unwrap();
    let listed = d.text(b"SendTargets=All\0");
    assert!(
        listed.iter().any(|(k, v)| k == "TargetName" && v == TARGET),
        "{listed:?}"
    );
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn boot_script_endpoint_names_the_client_and_a_fetch_is_never_destructive() {
    let dir = tempfile::tempdir().unwrap();
    let g = golden(dir.path());
    let http = free_port();
    let mut yaml = config(
        dir.path(),
        "volatile",
        "        - {initiator: \"iqn.2026-11.test:lab-07\", mac: \"52:54:00:00:00:07\", image: base, mode: volatile}\n",
    )
    .to_yaml();
    yaml.push_str(&format!("boot_http: {{listen: \"127.0.0.1:{http}\"}}\n"));
    let server = Server::start(dir.path(), &Config::yaml(&yaml));
    let who = "iqn.2026-11.test:lab-07";
    let fetch = || {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::net::TcpStream::connect(("127.0.0.1", http)) {
                Ok(_) => break http_get(http, "/boot.ipxe?mac=52%3A54%3A00%3A00%3A00%3A07&uuid="),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("boot script endpoint not reachable: {e}"),
            }
        }
    };
    // Boot 1: the firmware, then the OS, which writes and syncs.
    let fw = login(&server, who, firmware_isid(3));
    let mut os = login(&server, who, os_isid(1));
    drop(fw);
    os.write10(40, &block(3));
    assert_eq!(
        os.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None).status,
        0
    );
    // Anyone fetches the client's script while its OS runs: the script, and nothing else.
    let reply = fetch();
    assert!(
        reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"),
        "{reply}"
    );
    assert!(reply.contains("#!ipxe"), "{reply}");
    assert!(
        reply.contains(&format!("set initiator-iqn {who}")),
        "{reply}"
    );
    assert!(
        reply.contains(&format!(
            "sanboot iscsi:127.0.0.1::{}:0:{TARGET}",
            server.port
        )),
        "{reply}"
    );
    assert_eq!(
        os.read10(40, 1),
        block(3),
        "a script fetch discarded a running disk"
    );
    // The machine is powered off (the OS session ends); at power-on iPXE fetches its script
    // from the client's address, then logs in: a new boot on the golden image.
    drop(os);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_diskless"))
            .args(["sessions", "--control"])
            .arg(dir.path().join("state/control.sock"))
            .output()
            .unwrap();
        if !String::from_utf8_lossy(&out.stdout).contains(who) {
            break;
        }
        assert!(Instant::now() < deadline, "OS session never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    fetch();
    let mut fw = login(&server, who, firmware_isid(4));
    assert_eq!(fw.read10(40, 1), g[40 * 512..41 * 512]);
    assert!(!fw.closed_within(Duration::from_millis(200), &mut seen));
    // Unknown MAC: the default binding serves it under a name derived from the MAC.
    let reply = http_get(http, "/boot.ipxe?mac=52:54:00:00:00:99");
    assert!(
        reply.contains("set initiator-iqn iqn.2026-11.org.diskless:mac-525400000099"),
        "{reply}"
    );
}

#[test]
fn operator_commands_list_reset_and_commit() {
    let dir = tempfile::tempdir().unwrap();
    let g = golden(dir.path());
    let server = Server::start(dir.path(), &config(dir.path(), "persistent", ""));
    let who = "iqn.2026-11.test:super";
    let mut os = login(&server, who, os_isid(1));
    os.write10(50, &block(5));
    // SYNCHRONIZE CACHE(10): durable before the commit reads it.
    assert_eq!(
        os.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None).status,
        0
    );
    let bin = env!("CARGO_BIN_EXE_diskless");
    let ctl = dir.path().join("state/control.sock");
    let out = std::process::Command::new(bin)
        .args(["clients", "--control"])
        .arg(&ctl)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(who) && text.contains("persistent"), "{text}");
    let out = std::process::Command::new(bin)
        .args(["sessions", "--control"])
        .arg(&ctl)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(who));
    // Commit the client's disk as a new golden image.
    let new_img = dir.path().join("v2.img");
    let out = std::process::Command::new(bin)
        .args(["client", "commit", who])
        .arg(&new_img)
        .arg("--control")
        .arg(&ctl)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let published = std::fs::read(&new_img).unwrap();
    assert_eq!(published.len(), GOLDEN_SIZE);
    assert_eq!(published[50 * 512..51 * 512], block(5)[..]);
    assert_eq!(published[..50 * 512], g[..50 * 512]);
    // Reset: the session is closed, the disk is the golden image again.
    let out = std::process::Command::new(bin)
        .args(["client", "reset", who, "--control"])
        .arg(&ctl)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = Vec::new();
    assert!(os.closed_within(Duration::from_secs(5), &mut seen));
    let mut os = login(&server, who, os_isid(2));
    assert_eq!(os.read10(50, 1), g[50 * 512..51 * 512]);
}

#[test]
fn kill_9_keeps_every_synced_write_of_an_overlay() {
    let dir = tempfile::tempdir().unwrap();
    golden(dir.path());
    let cfg = config(dir.path(), "persistent", "");
    let who = "iqn.2026-11.test:crashy";
    let golden_before = sha(&dir.path().join("golden.img"));
    let mut acked: Vec<(u32, u8)> = Vec::new();
    for round in 0..3u8 {
        let server = Server::start(dir.path(), &cfg);
        let mut c = login(&server, who, os_isid(u16::from(round)));
        // Everything acknowledged so far is there.
        for &(lba, fill) in &acked {
            assert_eq!(
                c.read10(lba, 1),
                block(fill),
                "round {round}: lost acknowledged write at LBA {lba}"
            );
        }
        // A stream of writes: FUA ones, and plain ones followed by SYNCHRONIZE CACHE.
        let start = Instant::now();
        let mut i = 0u32;
        while start.elapsed() < Duration::from_millis(400) {
            let lba = 200 + (u32::from(round) * 1000 + i) % 3000;
            let fill = round.wrapping_mul(31).wrapping_add(i as u8) | 1;
            if i % 2 == 0 {
                let mut cdb = raw::write10_cdb(lba, 1);
                cdb[1] |= 0x08; // FUA
                assert_eq!(c.run(&cdb, 512, Some(&block(fill))).status, 0);
            } else {
                c.write10(lba, &block(fill));
                assert_eq!(c.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None).status, 0);
            }
            acked.retain(|&(l, _)| l != lba);
            acked.push((lba, fill));
            i += 1;
        }
        // One write in flight, unacknowledged, then the crash.
        let unacked = c.command(&raw::write10_cdb(4000, 1), 512, false, true);
        let _ = c.send(&diskless::pdu::Pdu {
            bhs: diskless::pdu::Bhs::ScsiCommand(unacked),
            data: bytes::Bytes::from(block(0xee)),
        });
        server.kill9();
    }
    // The overlay passes its offline consistency check.
    let overlay_dir = std::fs::read_dir(dir.path().join("state/clients"))
        .unwrap()
        .flat_map(|t| std::fs::read_dir(t.unwrap().path()).unwrap())
        .flat_map(|c| std::fs::read_dir(c.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        // Beside the overlay directory: the client's boot state (lifecycle.yaml).
        .find(|p| p.is_dir())
        .unwrap();
    let report = diskless::storage::Overlay::check(&overlay_dir).unwrap();
    assert!(report.problems.is_empty(), "{report:?}");
    let server = Server::start(dir.path(), &cfg);
    let mut c = login(&server, who, os_isid(99));
    for &(lba, fill) in &acked {
        assert_eq!(
            c.read10(lba, 1),
            block(fill),
            "lost acknowledged write at LBA {lba}"
        );
    }
    assert_eq!(sha(&dir.path().join("golden.img")), golden_before);
}

#[test]
fn per_client_chap_direct_mode_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let g = golden(dir.path());
    let img = dir.path().join("golden.img");
    let yaml = |extra: &str| {
        Config::yaml(&format!(
            "portals: [\"127.0.0.1:0\"]\nstate_dir: {}\nimages:\n  - {{name: base, path: {}}}\n\
             targets:\n  - name: {TARGET}\n    boot:\n      bindings:\n\
             \x20       - {{initiator: \"iqn.2026-11.test:chap-1\", image: base, mode: volatile, chap: {{user: pc1, secret: \"pc1-secret-123456\"}}}}\n\
             \x20       - {{initiator: \"iqn.2026-11.test:admin-*\", image: base, mode: direct}}\n{extra}",
            dir.path().join("state").display(),
            img.display()
        ))
    };
    let server = Server::start(dir.path(), &yaml(""));
    // Per-client CHAP: the right secret logs in, none or a wrong one is refused (0x0201).
    common::require_tool("iscsi-inq");
    let good = common::run(
        "iscsi-inq",
        &[
            "-i",
            "iqn.2026-11.test:chap-1",
            &server.chap_url(TARGET, 0, "pc1", "pc1-secret-123456"),
        ],
    );
    assert!(good.success(), "{good}");
    let bad = common::run(
        "iscsi-inq",
        &[
            "-i",
            "iqn.2026-11.test:chap-1",
            &server.chap_url(TARGET, 0, "pc1", "wrong-secret-12345"),
        ],
    );
    assert!(!bad.success(), "{bad}");
    let mut c = Client::connect(server.port);
    assert_eq!(
        c.login("iqn.2026-11.test:chap-1", TARGET),
        Err((2, 1)),
        "no CHAP must be refused"
    );

    // Direct mode: the admin writes the golden image itself; a second admin is refused while
    // the first has a session (status 0x0301, service unavailable).
    let mut admin = login(&server, "iqn.2026-11.test:admin-1", os_isid(1));
    admin.write10(60, &block(0x5a));
    assert_eq!(
        admin
            .run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None)
            .status,
        0
    );
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(on_disk[60 * 512..61 * 512], block(0x5a)[..]);
    assert_eq!(on_disk[..60 * 512], g[..60 * 512]);
    let mut second = Client::connect(server.port);
    second.isid = os_isid(2);
    assert_eq!(
        second.login("iqn.2026-11.test:admin-2", TARGET),
        Err((3, 1))
    );

    // Reload: a new binding appears, the admin's session is not disturbed.
    let unknown = "iqn.2026-11.test:late";
    let mut c = Client::connect(server.port);
    assert_eq!(c.login(unknown, TARGET), Err((2, 2)));
    std::fs::write(
        &server.config_path,
        yaml(&format!(
            "        - {{initiator: \"{unknown}\", image: base, mode: persistent}}\n"
        ))
        .to_yaml(),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(["reload", "-c"])
        .arg(&server.config_path)
        .arg("--control")
        .arg(dir.path().join("state/control.sock"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut late = login(&server, unknown, os_isid(3));
    assert_eq!(late.read10(60, 1), block(0x5a));
    assert_eq!(
        admin.read10(60, 1),
        block(0x5a),
        "reload disturbed a live session"
    );
}

#[test]
fn quick_bios_reboot_with_stale_sessions_is_a_new_boot() {
    let dir = tempfile::tempdir().unwrap();
    let g = golden(dir.path());
    let server = Server::start(dir.path(), &config(dir.path(), "volatile", ""));
    let who = "iqn.2026-11.test:quick";
    let mut os = login(&server, who, os_isid(1));
    os.write10(70, &block(4));
    // The machine is reset: its OS connection is never closed, it just goes silent, and the
    // firmware logs in again at once: the sequence (firmware after OS) makes it a new boot.
    let mut fw = login(&server, who, firmware_isid(0x7777));
    assert_eq!(
        fw.read10(70, 1),
        g[70 * 512..71 * 512],
        "volatile write survived a reboot"
    );
    let mut seen = Vec::new();
    assert!(
        os.closed_within(Duration::from_secs(5), &mut seen),
        "stale session not closed"
    );
    // A firmware login beside a live (recently active) session is not a reboot.
    fw.write10(71, &block(6));
    let mut fw2 = login(&server, who, firmware_isid(0x7778));
    assert_eq!(fw2.read10(71, 1), block(6));
}
