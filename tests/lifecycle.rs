//! Client lifecycle against the real binary, one server per case: every row of the table in
//! docs/overlays.md ("When a client boots again"), played by raw initiators that behave like
//! the real clients on the wire (iPXE, edk2 IScsiDxe, open-iscsi, Microsoft's initiator),
//! with a marker block written in each phase.
//!
//! `reboot_gap_secs` is large (30 s) where the rule must not depend on time, and 1 s where a
//! case proves the tie-breaker does not decide; no case sleeps for a fixed time: waits are
//! for conditions (a session gone, the gap passed).

mod common;
#[path = "common/raw.rs"]
mod raw;

use common::{free_port, Config, Server};
use raw::Client;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.org.diskless:boot";
const GOLDEN_SIZE: usize = 4 << 20;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x07];
const MAC_WHO: &str = "iqn.2026-11.test:uefi-mac";

/// iPXE: IANA format, enterprise 0x002723.
fn ipxe(q: u8) -> [u8; 6] {
    [0x40, 0x00, 0x27, 0x23, 0x00, q]
}
/// open-iscsi: OUI format 00:02:3d.
fn open_iscsi(q: u8) -> [u8; 6] {
    [0x00, 0x02, 0x3d, 0x00, 0x00, q]
}
/// Microsoft's initiator (Windows): IANA format, enterprise 0x000137.
fn windows(q: u8) -> [u8; 6] {
    [0x40, 0x00, 0x01, 0x37, 0x00, q]
}
/// edk2 IScsiDxe: the NIC's MAC with the type bits cleared, the same on every boot.
fn uefi(mac: [u8; 6]) -> [u8; 6] {
    let mut i = mac;
    i[0] &= 0x3f;
    i
}

fn block(fill: u8) -> Vec<u8> {
    vec![fill; 512]
}

/// One case: a state directory, a golden image, a server (restartable).
struct Case {
    dir: tempfile::TempDir,
    cfg: Config,
    golden: Vec<u8>,
    server: Option<Server>,
    http: Option<u16>,
}

impl Case {
    fn new(gap_secs: u64, mode: &str) -> Case {
        Case::with(gap_secs, mode, false)
    }

    fn with(gap_secs: u64, mode: &str, http: bool) -> Case {
        let dir = tempfile::tempdir().unwrap();
        let golden = common::random_bytes(GOLDEN_SIZE, 11);
        std::fs::write(dir.path().join("golden.img"), &golden).unwrap();
        let http = http.then(free_port);
        let mac: Vec<String> = MAC.iter().map(|b| format!("{b:02x}")).collect();
        let mut yaml = format!(
            "portals: [\"127.0.0.1:0\"]\n\
             state_dir: {state}\n\
             settings: {{reboot_gap_secs: {gap_secs}, nop_in_interval_secs: 0}}\n\
             images:\n  - {{name: base, path: {img}}}\n\
             targets:\n  - name: {TARGET}\n    boot:\n      bindings:\n\
             \x20       - {{initiator: \"{MAC_WHO}\", mac: \"{mac}\", image: base, mode: {mode}}}\n\
             \x20     default: {{image: base, mode: {mode}}}\n",
            state = dir.path().join("state").display(),
            img = dir.path().join("golden.img").display(),
            mac = mac.join(":"),
        );
        if let Some(p) = http {
            yaml.push_str(&format!("boot_http: {{listen: \"127.0.0.1:{p}\"}}\n"));
        }
        let cfg = Config::yaml(&yaml);
        let server = Some(Server::start(dir.path(), &cfg));
        Case {
            dir,
            cfg,
            golden,
            server,
            http,
        }
    }

    fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    fn login(&self, who: &str, isid: [u8; 6]) -> Client {
        let mut c = Client::connect(self.server().port);
        c.isid = isid;
        c.login(who, TARGET)
            .unwrap_or_else(|e| panic!("login of {who} refused: {e:?}"));
        c
    }

    /// Stop the server (SIGTERM, or SIGKILL) and start it again on the same state.
    fn restart(&mut self, sigkill: bool) {
        let s = self.server.take().unwrap();
        if sigkill {
            s.kill9();
        } else {
            assert!(s.stop().success());
        }
        self.server = Some(Server::start(self.dir.path(), &self.cfg));
    }

    fn control(&self) -> PathBuf {
        self.dir.path().join("state/control.sock")
    }

    /// `diskless ARGS --control SOCKET`, stdout.
    fn ctl(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_diskless"))
            .args(args)
            .arg("--control")
            .arg(self.control())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "diskless {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Wait until the server has no session of `who` (its end has been processed).
    fn wait_sessions_gone(&self, who: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ctl(&["sessions"]).contains(who) {
            assert!(Instant::now() < deadline, "sessions of {who} never ended");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `clients` row of `who`: (boots, resets).
    fn counts(&self, who: &str) -> (u64, u64) {
        let text = self.ctl(&["clients"]);
        let header: Vec<&str> = text.lines().next().unwrap().split('\t').collect();
        let row: Vec<&str> = text
            .lines()
            .find(|l| l.contains(who))
            .unwrap_or_else(|| panic!("{who} not listed: {text}"))
            .split('\t')
            .collect();
        let col = |name: &str| {
            let i = header.iter().position(|h| *h == name).unwrap();
            row[i].parse().unwrap()
        };
        (col("BOOTS"), col("RESETS"))
    }

    fn golden_block(&self, lba: usize) -> &[u8] {
        &self.golden[lba * 512..(lba + 1) * 512]
    }

    fn fetch_script_from(&self, source: &str) -> String {
        let port = self.http.unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let stream = loop {
            let attempt = rt.block_on(async {
                let s = tokio::net::TcpSocket::new_v4()?;
                s.bind(format!("{source}:0").parse().unwrap())?;
                s.connect(([127, 0, 0, 1], port).into()).await
            });
            match attempt {
                Ok(s) => break s.into_std().unwrap(),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("boot script endpoint not reachable: {e}"),
            }
        };
        let mut s = stream;
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mac: Vec<String> = MAC.iter().map(|b| format!("{b:02x}")).collect();
        write!(
            s,
            "GET /boot.ipxe?mac={} HTTP/1.0\r\nHost: x\r\n\r\n",
            mac.join("%3A")
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(
            out.contains(&format!("set initiator-iqn {MAC_WHO}")),
            "{out}"
        );
        out
    }
}

/// A connection reset without Logout (ExitBootServices, power loss seen by the switch).
fn drop_connection(c: Client) {
    c.shutdown_write();
    drop(c);
}

fn assert_closed(c: &mut Client, what: &str) {
    let mut seen = Vec::new();
    assert!(
        c.closed_within(Duration::from_secs(5), &mut seen),
        "{what} not closed: {seen:?}"
    );
}

/// Wait until `gap` has passed since `since` (the case is about time passing).
fn wait_past(since: Instant, gap: Duration) {
    while since.elapsed() <= gap {
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ipxe_bios_reset_after_the_gap_is_a_new_boot() {
    let case = Case::new(1, "volatile");
    let who = "iqn.2026-11.test:bios";
    // Boot 1: iPXE writes in the firmware phase, the OS logs in (the firmware session is
    // left open, then reaped) and writes too.
    let mut fw = case.login(who, ipxe(1));
    fw.write10(10, &block(1));
    let mut os = case.login(who, open_iscsi(1));
    assert_eq!(
        os.read10(10, 1),
        block(1),
        "the OS lost the firmware's write"
    );
    assert_closed(&mut fw, "the firmware's orphan session");
    os.write10(11, &block(2));
    os.sync();
    // Machine reset: the OS session stays open and silent; iPXE logs in after the gap.
    let since = Instant::now();
    wait_past(since, Duration::from_secs(1));
    let mut fw2 = case.login(who, ipxe(2));
    assert_eq!(fw2.read10(10, 1), case.golden_block(10));
    assert_eq!(fw2.read10(11, 1), case.golden_block(11));
    assert_closed(&mut os, "the previous boot's OS session");
    assert_eq!(case.counts(who), (2, 1));
    // The history says why.
    let show = case.ctl(&["client", "show", who]);
    assert!(show.contains("phase: firmware"), "{show}");
    assert!(show.contains("after the OS phase began"), "{show}");
    assert!(show.contains("hand-off"), "{show}");
    // Every reset is logged with its evidence.
    let log = case.server().stderr();
    assert!(
        log.lines().any(|l| l.contains("client lifecycle")
            && l.contains("login ISID 400027230002 from 127.0.0.1")
            && l.contains("verdict=\"reset\"")
            && l.contains("close=[\"00023d000001\"]")
            && l.contains("after the OS phase began")),
        "{log}"
    );
}

#[test]
fn uefi_iscsidxe_same_isid_clean_shutdown_is_a_new_boot() {
    // No MAC in the binding: the firmware's ISID is learned from the first login.
    let case = Case::new(30, "volatile");
    let who = "iqn.2026-11.test:uefi";
    let isid = uefi([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
    for boot in 0..2u8 {
        let mut fw = case.login(who, isid);
        assert_eq!(
            fw.read10(20, 1),
            case.golden_block(20),
            "boot {boot} started on the previous boot's disk"
        );
        fw.write10(20, &block(0x20 + boot));
        // ExitBootServices: the connection is reset without a Logout.
        drop_connection(fw);
        let mut os = case.login(who, open_iscsi(1));
        assert_eq!(os.read10(20, 1), block(0x20 + boot));
        os.write10(21, &block(0x30 + boot));
        os.sync();
        // Clean shutdown.
        os.logout();
        case.wait_sessions_gone(who);
    }
    assert_eq!(case.counts(who), (2, 1));
}

#[test]
fn uefi_iscsidxe_hard_reset_with_the_os_session_open() {
    // The binding has the MAC: IScsiDxe's ISID is recognised from the first boot on.
    let case = Case::new(30, "volatile");
    let mut fw = case.login(MAC_WHO, uefi(MAC));
    fw.write10(30, &block(3));
    drop_connection(fw);
    let mut os = case.login(MAC_WHO, open_iscsi(1));
    os.write10(31, &block(4));
    os.sync();
    // Hard reset: the OS session stays open and silent, the firmware is back at once.
    let mut fw = case.login(MAC_WHO, uefi(MAC));
    assert_eq!(
        fw.read10(30, 2),
        [case.golden_block(30), case.golden_block(31)].concat()
    );
    assert_closed(&mut os, "the previous boot's OS session");
}

#[test]
fn uefi_iscsidxe_with_a_windows_os() {
    let case = Case::new(30, "volatile");
    let who = "iqn.2026-11.test:win";
    let isid = uefi([0x52, 0x54, 0x00, 0x01, 0x02, 0x03]);
    // Clean shutdown, then a hard reset.
    let mut held = Vec::new();
    for (boot, clean) in [(0u8, true), (1, false), (2, true)] {
        let mut fw = case.login(who, isid);
        assert_eq!(fw.read10(40, 1), case.golden_block(40), "boot {boot}");
        drop_connection(fw);
        let mut os = case.login(who, windows(1));
        os.write10(40, &block(0x40 + boot));
        os.sync();
        if clean {
            os.logout();
            case.wait_sessions_gone(who);
        } else {
            // Left open: the next firmware login closes it.
            held.push(os);
        }
    }
    assert_closed(&mut held[0], "the hard-reset boot's OS session");
}

#[test]
fn pinging_os_and_a_fast_reset_within_the_gap() {
    let case = Case::new(30, "volatile");
    let who = "iqn.2026-11.test:pinger";
    let fw = case.login(who, ipxe(1));
    let mut os = case.login(who, open_iscsi(1));
    drop(fw);
    os.write10(50, &block(5));
    os.sync();
    // The OS answers pings until the very moment of the reset...
    os.ping(b"alive");
    os.ping(b"alive");
    // ... and iPXE logs in well inside the 30 s gap.
    let mut fw = case.login(who, ipxe(2));
    assert_eq!(fw.read10(50, 1), case.golden_block(50));
    assert_closed(&mut os, "the old boot's pinging OS session");
}

#[test]
fn clean_power_off_and_immediate_power_on() {
    let case = Case::new(30, "volatile");
    let who = "iqn.2026-11.test:debian";
    let fw = case.login(who, ipxe(1));
    let mut os = case.login(who, open_iscsi(1));
    drop(fw);
    os.write10(60, &block(6));
    os.sync();
    // poweroff: the OS logs out; iPXE is back at once (well inside the gap).
    os.logout();
    let mut fw = case.login(who, ipxe(1));
    assert_eq!(fw.read10(60, 1), case.golden_block(60));
    // Hard reset (QEMU system_reset): the OS connection drops, iPXE is back at once.
    let mut os = case.login(who, open_iscsi(1));
    drop(fw);
    os.write10(61, &block(7));
    os.sync();
    drop_connection(os);
    let mut fw = case.login(who, ipxe(1));
    assert_eq!(fw.read10(61, 1), case.golden_block(61));
    assert_eq!(case.counts(who), (3, 2));
}

#[test]
fn server_restart_between_boots() {
    for sigkill in [false, true] {
        let mut case = Case::new(30, "volatile");
        let who = "iqn.2026-11.test:restart";
        let isid = uefi([0x52, 0x54, 0x00, 0x11, 0x22, 0x33]);
        let fw = case.login(who, isid);
        drop_connection(fw);
        let mut os = case.login(who, open_iscsi(1));
        os.write10(70, &block(8));
        os.sync();
        os.logout();
        case.wait_sessions_gone(who);
        // The server restarts; overlay recovery rewrites the overlay's files; the client
        // boots later: the durable boot state decides, not file times.
        case.restart(sigkill);
        let mut fw = case.login(who, isid);
        assert_eq!(fw.read10(70, 1), case.golden_block(70), "sigkill={sigkill}");
    }
}

#[test]
fn server_restart_mid_firmware_phase_keeps_the_disk() {
    for sigkill in [true, false] {
        let mut case = Case::new(1, "volatile");
        let who = "iqn.2026-11.test:midfw";
        let mut fw = case.login(who, ipxe(1));
        fw.write10(80, &block(9));
        fw.sync();
        let since = Instant::now();
        case.restart(sigkill);
        drop(fw);
        // Down (and then quiet) for longer than the gap: still the same boot.
        wait_past(since, Duration::from_secs(2));
        let mut fw = case.login(who, ipxe(2));
        assert_eq!(fw.read10(80, 1), block(9), "sigkill={sigkill}");
        let mut os = case.login(who, open_iscsi(1));
        assert_eq!(os.read10(80, 1), block(9));
        assert_eq!(case.counts(who).1, 0, "no reset");
    }
}

#[test]
fn network_blip_longer_than_the_gap_keeps_the_disk() {
    let case = Case::new(1, "volatile");
    let who = "iqn.2026-11.test:blip";
    let fw = case.login(who, ipxe(1));
    let mut os = case.login(who, open_iscsi(1));
    drop(fw);
    os.write10(90, &block(10));
    os.sync();
    drop_connection(os);
    case.wait_sessions_gone(who);
    wait_past(Instant::now(), Duration::from_secs(1));
    let mut os = case.login(who, open_iscsi(1));
    assert_eq!(os.read10(90, 1), block(10));
    // Session reinstatement (same ISID while the old session is still open) too.
    let mut again = case.login(who, open_iscsi(1));
    assert_eq!(again.read10(90, 1), block(10));
    assert_closed(&mut os, "the reinstated session");
}

#[test]
fn idle_os_longer_than_the_gap_keeps_the_disk() {
    let case = Case::new(1, "volatile");
    let who = "iqn.2026-11.test:idle";
    let fw = case.login(who, ipxe(1));
    let mut os = case.login(who, open_iscsi(1));
    drop(fw);
    os.write10(100, &block(11));
    wait_past(Instant::now(), Duration::from_secs(1));
    assert_eq!(os.read10(100, 1), block(11));
    // Another OS session much later (a second LUN scan, multipath) too.
    let mut os2 = case.login(who, open_iscsi(2));
    assert_eq!(os2.read10(100, 1), block(11));
}

#[test]
fn server_restart_while_the_client_runs_keeps_the_disk() {
    for sigkill in [false, true] {
        let mut case = Case::new(1, "volatile");
        let who = "iqn.2026-11.test:running";
        let fw = case.login(who, uefi([0x52, 0x54, 0x00, 9, 9, 9]));
        drop_connection(fw);
        let mut os = case.login(who, windows(1));
        os.write10(110, &block(12));
        os.sync();
        let since = Instant::now();
        case.restart(sigkill);
        drop(os);
        wait_past(since, Duration::from_secs(1));
        // The OS logs in again with its ISID: same boot, whatever the time.
        let mut os = case.login(who, windows(1));
        assert_eq!(os.read10(110, 1), block(12), "sigkill={sigkill}");
        assert_eq!(case.counts(who), (1, 0));
    }
}

#[test]
fn a_foreign_script_fetch_while_the_client_runs_changes_nothing() {
    let case = Case::with(30, "volatile", true);
    let fw = case.login(MAC_WHO, ipxe(1));
    let mut os = case.login(MAC_WHO, open_iscsi(1));
    drop(fw);
    os.write10(120, &block(13));
    os.sync();
    // A monitoring probe, a browser, a curious user; even from the client's own address.
    case.fetch_script_from("127.0.0.2");
    case.fetch_script_from("127.0.0.1");
    os.ping(b"still here");
    assert_eq!(
        os.read10(120, 1),
        block(13),
        "a script fetch discarded the disk"
    );
    // During a blip, a fetch from another address is ignored too; the OS comes back.
    drop_connection(os);
    case.wait_sessions_gone(MAC_WHO);
    case.fetch_script_from("127.0.0.2");
    let mut os = case.login(MAC_WHO, open_iscsi(1));
    assert_eq!(os.read10(120, 1), block(13));
    assert_eq!(case.counts(MAC_WHO), (1, 0));
    let show = case.ctl(&["client", "show", MAC_WHO]);
    assert!(show.contains("ignored"), "{show}");

    // A real boot of a firmware nobody fingerprints: its script fetch from the client's
    // address, then its login, within the gap: a new boot on the golden image.
    drop_connection(os);
    case.wait_sessions_gone(MAC_WHO);
    case.fetch_script_from("127.0.0.1");
    let mut fw = case.login(MAC_WHO, [0x80, 1, 2, 3, 4, 5]);
    assert_eq!(fw.read10(120, 1), case.golden_block(120));
    assert_eq!(case.counts(MAC_WHO), (2, 1));
}

#[test]
fn two_clients_never_see_each_others_writes() {
    let case = Case::new(30, "volatile");
    let (a, b) = ("iqn.2026-11.test:two-a", "iqn.2026-11.test:two-b");
    let fa = case.login(a, ipxe(1));
    let fb = case.login(b, ipxe(1));
    let mut oa = case.login(a, open_iscsi(1));
    let mut ob = case.login(b, open_iscsi(1));
    drop((fa, fb));
    oa.write10(130, &block(0xaa));
    ob.write10(130, &block(0xbb));
    oa.sync();
    ob.sync();
    assert_eq!(oa.read10(130, 1), block(0xaa));
    assert_eq!(ob.read10(130, 1), block(0xbb));
    // A reboots; B's session, disk and boot are untouched.
    let mut fa = case.login(a, ipxe(2));
    assert_eq!(fa.read10(130, 1), case.golden_block(130));
    assert_closed(&mut oa, "A's old OS session");
    ob.ping(b"b");
    assert_eq!(ob.read10(130, 1), block(0xbb));
    fa.write10(131, &block(0xa1));
    assert_eq!(ob.read10(131, 1), case.golden_block(131));
    assert_eq!(case.counts(b), (1, 0));
}

#[test]
fn install_mode_keeps_setup_reboots_until_commit() {
    let case = Case::new(30, "install");
    let who = "iqn.2026-11.test:win-install";
    // Windows Setup: WinPE (Microsoft's initiator) writes, the machine reboots several times
    // through the firmware; nothing is discarded.
    for boot in 0..3u8 {
        let fw = case.login(who, ipxe(1));
        let mut os = case.login(who, windows(1));
        drop(fw);
        for earlier in 0..boot {
            assert_eq!(
                os.read10(140 + u32::from(earlier), 1),
                block(0x50 + earlier),
                "install mode lost Setup's work at reboot {boot}"
            );
        }
        os.write10(140 + u32::from(boot), &block(0x50 + boot));
        os.sync();
        os.logout();
        case.wait_sessions_gone(who);
    }
    assert_eq!(case.counts(who), (3, 0));
    assert!(case.ctl(&["clients"]).contains("install"));
    // The installed disk is published as a new golden image.
    let published = case.dir.path().join("installed.img");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(["client", "commit", who])
        .arg(&published)
        .arg("--control")
        .arg(case.control())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = std::fs::read(&published).unwrap();
    assert_eq!(
        img[140 * 512..143 * 512],
        [block(0x50), block(0x51), block(0x52)].concat()[..]
    );
    assert!(case
        .ctl(&["client", "show", who])
        .contains("committed: yes"));
}

#[test]
fn nic_option_rom_orphan_is_reaped_by_its_learned_isid() {
    // A BIOS NIC boot ROM nobody fingerprints (an OUI-format ISID of its own, the same every
    // boot): learned from the first login of the boot.
    let case = Case::new(30, "volatile");
    let who = "iqn.2026-11.test:nic-rom";
    let rom: [u8; 6] = [0x00, 0x15, 0x17, 0x00, 0x00, 0x01];
    let mut fw = case.login(who, rom);
    fw.write10(150, &block(0x15));
    // BIOS hand-off: the ROM's session stays open; the OS's login reaps it.
    let mut os = case.login(who, open_iscsi(1));
    assert_eq!(os.read10(150, 1), block(0x15));
    assert_closed(&mut fw, "the option ROM's orphan session");
    os.write10(151, &block(0x16));
    os.sync();
    // Reset: the ROM is back with its ISID while the OS session is still open.
    let mut fw = case.login(who, rom);
    assert_eq!(
        fw.read10(150, 2),
        [case.golden_block(150), case.golden_block(151)].concat()
    );
    assert_closed(&mut os, "the previous boot's OS session");
    assert!(case
        .ctl(&["client", "show", who])
        .contains("firmware ISIDs: 001517000001"));
}

/// edk2 IScsiDxe's login as seen on the wire (Debian 12's OVMF): its operational keys in its
/// own fixed order.
fn iscsidxe_login(case: &Case, who: &str, isid: [u8; 6]) -> Client {
    let mut c = Client::connect(case.server().port);
    c.isid = isid;
    c.login_with(&[
        ("InitiatorName", who),
        ("SessionType", "Normal"),
        ("TargetName", TARGET),
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("ErrorRecoveryLevel", "0"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxRecvDataSegmentLength", "65536"),
        ("MaxBurstLength", "262144"),
        ("FirstBurstLength", "65536"),
        ("MaxConnections", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "20"),
        ("MaxOutstandingR2T", "1"),
    ])
    .unwrap_or_else(|e| panic!("IScsiDxe-style login refused: {e:?}"));
    c
}

#[test]
fn iscsidxe_login_keys_recognise_a_firmware_never_learned() {
    // The machine booted through iPXE so far; now its own UEFI initiator boots it (a firmware
    // switch, no MAC in the binding): a never-seen ISID while the OS session is still open.
    let case = Case::new(30, "volatile");
    let who = "iqn.2026-11.test:switched";
    let fw = case.login(who, ipxe(1));
    let mut os = case.login(who, open_iscsi(1));
    drop(fw);
    os.write10(160, &block(0x60));
    os.sync();
    // An unknown ISID with an unknown login shape beside the live OS: ambiguous, kept.
    let mut odd = case.login(who, [0x80, 7, 7, 7, 7, 7]);
    assert_eq!(odd.read10(160, 1), block(0x60));
    drop(odd);
    // IScsiDxe's key sequence says firmware: a new boot.
    let mut fw = iscsidxe_login(&case, who, uefi([0x52, 0x54, 0x00, 0x77, 0x88, 0x99]));
    assert_eq!(fw.read10(160, 1), case.golden_block(160));
    assert_closed(&mut os, "the previous boot's OS session");
    let show = case.ctl(&["client", "show", who]);
    assert!(show.contains("ambiguous"), "{show}");
}
