//! Several disks per client (issue 11 step 4): a binding lists a volatile system disk
//! (LUN 0), a persistent data disk (LUN 1) and a game disk shared read-only by everyone
//! (LUN 2). Seen by libiscsi's tools (REPORT LUNS, sizes, identities) and played through
//! boots by raw initiators that behave like iPXE and open-iscsi (as tests/lifecycle.rs).

mod common;
#[path = "common/raw.rs"]
mod raw;

use common::{field, iscsi_ls_size, run, Config, Server};
use diskless::pdu::lun_from_index;
use raw::Client;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.org.diskless:multi";
const PC1: &str = "iqn.2026-11.test:pc-01";
const PC2: &str = "iqn.2026-11.test:pc-02";
const MIB: u64 = 1 << 20;
/// (LUN, image file, size, mode) of every client's disks.
const DISKS: [(u16, &str, u64, &str); 3] = [
    (0, "system.img", 4 * MIB, "volatile"),
    (1, "data.img", 2 * MIB, "persistent"),
    (2, "games.img", 3 * MIB, "readonly"),
];

/// iPXE: IANA format, enterprise 0x002723.
fn ipxe(q: u8) -> [u8; 6] {
    [0x40, 0x00, 0x27, 0x23, 0x00, q]
}
/// open-iscsi: OUI format 00:02:3d.
fn open_iscsi(q: u8) -> [u8; 6] {
    [0x00, 0x02, 0x3d, 0x00, 0x00, q]
}

struct Case {
    dir: tempfile::TempDir,
    cfg: Config,
    server: Option<Server>,
    /// The images' contents, by LUN.
    golden: Vec<Vec<u8>>,
}

impl Case {
    /// Two clients with the three disks; the system disk listed as LUN 0 of `disks:` for
    /// one and as `image`/`mode` for the other (both YAML shapes).
    fn new() -> Case {
        let dir = tempfile::tempdir().unwrap();
        let mut golden = Vec::new();
        let mut images = String::new();
        for (lun, file, size, _) in DISKS {
            let data = common::random_bytes(size as usize, 40 + u64::from(lun));
            std::fs::write(dir.path().join(file), &data).unwrap();
            golden.push(data);
            images.push_str(&format!(
                "  - {{name: {}, path: {}}}\n",
                file.trim_end_matches(".img"),
                dir.path().join(file).display()
            ));
        }
        let yaml = format!(
            "portals: [\"127.0.0.1:0\"]\n\
             state_dir: {state}\n\
             settings: {{reboot_gap_secs: 30, nop_in_interval_secs: 0}}\n\
             images:\n{images}\
             targets:\n  - name: {TARGET}\n    boot:\n      bindings:\n\
             \x20       - initiator: {PC1}\n\
             \x20         disks:\n\
             \x20           - {{lun: 2, image: games, mode: readonly}}\n\
             \x20           - {{lun: 0, image: system, mode: volatile}}\n\
             \x20           - {{lun: 1, image: data, mode: persistent}}\n\
             \x20       - initiator: {PC2}\n\
             \x20         image: system\n\
             \x20         mode: volatile\n\
             \x20         disks: [{{lun: 1, image: data, mode: persistent}}, {{lun: 2, image: games, mode: readonly}}]\n",
            state = dir.path().join("state").display(),
        );
        let cfg = Config::yaml(&yaml);
        let server = Some(Server::start(dir.path(), &cfg));
        Case {
            dir,
            cfg,
            server,
            golden,
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

    fn golden_block(&self, lun: usize, lba: usize) -> &[u8] {
        &self.golden[lun][lba * 512..(lba + 1) * 512]
    }

    /// `diskless ARGS --control SOCKET`: (success, stdout + stderr).
    fn ctl_any(&self, args: &[&str]) -> (bool, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_diskless"))
            .args(args)
            .arg("--control")
            .arg(self.dir.path().join("state/control.sock"))
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn ctl(&self, args: &[&str]) -> String {
        let (ok, out) = self.ctl_any(args);
        assert!(ok, "diskless {args:?}: {out}");
        out
    }

    fn wait_sessions_gone(&self, who: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ctl(&["sessions"]).contains(who) {
            assert!(Instant::now() < deadline, "sessions of {who} never ended");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn restart(&mut self) {
        let s = self.server.take().unwrap();
        s.kill9();
        self.server = Some(Server::start(self.dir.path(), &self.cfg));
    }
}

fn block(fill: u8) -> Vec<u8> {
    vec![fill; 512]
}

fn on_lun(c: &mut Client, lun: u16) -> &mut Client {
    c.lun = lun_from_index(lun);
    c
}

/// The lines of `iscsi-ls -s` output under `iqn` (its LUN lines).
fn target_block<'a>(out: &'a str, iqn: &str) -> Vec<&'a str> {
    let mut lines = out.lines().skip_while(|l| !l.contains(iqn));
    let mut v = Vec::new();
    if lines.next().is_some() {
        v.extend(
            lines
                .take_while(|l| !l.starts_with("Target:"))
                .map(str::trim),
        );
    }
    v
}

#[test]
fn libiscsi_sees_every_lun_of_a_client_with_its_size_and_identity() {
    let case = Case::new();
    let port = case.server().port;
    for who in [PC1, PC2] {
        let portal = format!("iscsi://127.0.0.1:{port}");
        let out = run("iscsi-ls", &["-i", who, "-s", &portal]).ok();
        let lines = target_block(&out.stdout, TARGET);
        for (lun, _, size, _) in DISKS {
            let want = format!("(Size:{})", iscsi_ls_size(size, 512));
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with(&format!("Lun:{lun} ")) && l.contains(&want)),
                "{who}: no `Lun:{lun} ... {want}` in: {out}"
            );
        }
        assert_eq!(
            lines.iter().filter(|l| l.starts_with("Lun:")).count(),
            3,
            "{who}: {out}"
        );
    }
    // READ CAPACITY(16) per LUN, and a serial (VPD 0x80) and NAA (VPD 0x83) per client and
    // LUN: all distinct, the same again after a server restart.
    let identities = |case: &Case| {
        let mut ids = Vec::new();
        for who in [PC1, PC2] {
            for (lun, _, size, _) in DISKS {
                let url = format!("iscsi://127.0.0.1:{}/{TARGET}/{lun}", case.server().port);
                let cap = run("iscsi-readcapacity16", &["-i", who, &url]).ok();
                assert_eq!(
                    field(&cap.stdout, "Total size"),
                    Some(size.to_string().as_str()),
                    "{cap}"
                );
                let serial = run("iscsi-inq", &["-i", who, "-e", "1", "-c", "128", &url]).ok();
                let naa = run("iscsi-inq", &["-i", who, "-e", "1", "-c", "131", &url]).ok();
                let s = field(&serial.stdout, "Unit Serial Number")
                    .unwrap_or_else(|| panic!("no serial: {serial}"))
                    .to_string();
                let n = naa
                    .stdout
                    .lines()
                    .find(|l| l.contains("NAA") || l.contains("Designator:"))
                    .unwrap_or_else(|| panic!("no designator: {naa}"))
                    .to_string();
                ids.push((who, lun, s, naa.stdout.clone(), n));
            }
        }
        ids
    };
    let mut case = case;
    let first = identities(&case);
    let serials: std::collections::BTreeSet<&String> = first.iter().map(|i| &i.2).collect();
    assert_eq!(serials.len(), 6, "serials not distinct: {first:?}");
    let pages: std::collections::BTreeSet<&String> = first.iter().map(|i| &i.3).collect();
    assert_eq!(pages.len(), 6, "VPD 0x83 pages not distinct: {first:?}");
    case.restart();
    let again = identities(&case);
    for (a, b) in first.iter().zip(&again) {
        assert_eq!((a.2.as_str(), a.3.as_str()), (b.2.as_str(), b.3.as_str()));
    }
}

#[test]
fn data_disk_survives_a_reboot_the_system_disk_resets_the_game_disk_refuses_writes() {
    let mut case = Case::new();
    // Boot 1: iPXE (firmware) writes on LUN 0 and LUN 1.
    let mut fw = case.login(PC1, ipxe(1));
    on_lun(&mut fw, 0).write10(10, &block(0xa0));
    on_lun(&mut fw, 1).write10(10, &block(0xb0));
    // The shared game disk is read-only: DATA PROTECT / WRITE PROTECTED (SBC-3 §4.17).
    let r = on_lun(&mut fw, 2).run(&raw::write10_cdb(10, 1), 512, Some(&block(0xc0)));
    assert_eq!(r.status, 2, "write to the read-only disk: {r:?}");
    assert_eq!(r.sense_triplet(), Some((0x07, 0x27, 0x00)), "{r:?}");
    assert_eq!(on_lun(&mut fw, 2).read10(10, 1), case.golden_block(2, 10));
    // The OS takes over (hand-off) and sees both writes, writes again, shuts down.
    let mut os = case.login(PC1, open_iscsi(1));
    assert_eq!(on_lun(&mut os, 0).read10(10, 1), block(0xa0));
    assert_eq!(on_lun(&mut os, 1).read10(10, 1), block(0xb0));
    on_lun(&mut os, 1).write10(11, &block(0xb1));
    os.sync();
    on_lun(&mut os, 0).write10(11, &block(0xa1));
    os.sync();
    drop(fw);
    os.logout();
    case.wait_sessions_gone(PC1);
    // The other client's disks are its own: nothing of PC1's writes.
    let mut other = case.login(PC2, ipxe(9));
    assert_eq!(
        on_lun(&mut other, 0).read10(10, 1),
        case.golden_block(0, 10)
    );
    assert_eq!(
        on_lun(&mut other, 1).read10(10, 1),
        case.golden_block(1, 10)
    );
    other.logout();
    // Boot 2: the firmware again after the OS phase, a new boot: the volatile system disk
    // is the golden image again, the persistent data disk keeps every write.
    let mut fw = case.login(PC1, ipxe(2));
    assert_eq!(on_lun(&mut fw, 0).read10(10, 2), case.golden[0][5120..6144]);
    assert_eq!(on_lun(&mut fw, 1).read10(10, 1), block(0xb0));
    assert_eq!(on_lun(&mut fw, 1).read10(11, 1), block(0xb1));
    let show = case.ctl(&["client", "show", PC1]);
    for want in [
        "LUN 0: system volatile",
        "LUN 1: data persistent",
        "LUN 2: games readonly",
    ] {
        assert!(show.contains(want), "no `{want}` in:\n{show}");
    }
    assert!(show.contains("resets: 1"), "{show}");
    drop(fw);
    // A server killed and restarted: the data disk is still there.
    case.restart();
    let mut fw = case.login(PC1, ipxe(3));
    assert_eq!(on_lun(&mut fw, 1).read10(11, 1), block(0xb1));
    drop(fw);
    // The operator resets only the data disk: back to its template.
    case.ctl(&["client", "reset", PC1, "--lun", "1"]);
    let mut fw = case.login(PC1, ipxe(4));
    assert_eq!(on_lun(&mut fw, 1).read10(10, 2), case.golden[1][5120..6144]);
    drop(fw);
    let (ok, out) = case.ctl_any(&["client", "reset", PC1, "--lun", "7"]);
    assert!(!ok && out.contains("no LUN 7"), "{out}");
}

#[test]
fn the_shared_game_disk_is_opened_once_for_every_client() {
    let case = Case::new();
    let mut a = case.login(PC1, ipxe(1));
    let mut b = case.login(PC2, ipxe(2));
    assert_eq!(on_lun(&mut a, 2).read10(0, 1), case.golden_block(2, 0));
    assert_eq!(on_lun(&mut b, 2).read10(0, 1), case.golden_block(2, 0));
    let games = case.dir.path().join("games.img");
    let open = open_files(case.server().pid(), &games);
    assert_eq!(open, 1, "games.img open {open} times for two clients");
    // Each client's persistent data disk is its own overlay file over data.img.
    let clients = case.dir.path().join("state/clients");
    let overlays = find_dirs(&clients, "LUN1");
    assert_eq!(overlays.len(), 2, "{overlays:?}");
}

/// How many of `pid`'s file descriptors are `path`.
fn open_files(pid: u32, path: &Path) -> usize {
    let want = std::fs::canonicalize(path).unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).ok().as_deref() == Some(want.as_path()))
        .count()
}

fn find_dirs(root: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                if e.file_name() == name {
                    out.push(e.path());
                }
                stack.push(e.path());
            }
        }
    }
    out
}

/// `diskless ARGS`: stdout, panics unless it succeeds.
fn diskless(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "diskless {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A data disk on a versioned image (docs/images.md): `client commit --lun 1` publishes it
/// as the next version while the client runs, the persistent disk stays on the version it
/// was made on (GC keeps it), a flat `commit --lun 1` writes that disk, and `client reset
/// --lun 1` moves it to the binding's version.
#[test]
fn a_versioned_data_disk_is_published_kept_by_gc_and_moved_by_a_reset() {
    common::require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("state");
    let st = st.to_str().unwrap();
    let sys = common::random_bytes(MIB as usize, 50);
    std::fs::write(dir.path().join("system.img"), &sys).unwrap();
    let data = common::random_bytes(2 * MIB as usize, 51);
    let raw = dir.path().join("data.raw");
    std::fs::write(&raw, &data).unwrap();
    let text = diskless(&[
        "image",
        "import",
        "datav",
        raw.to_str().unwrap(),
        "--format",
        "raw",
        "-m",
        "empty",
        "--state-dir",
        st,
    ]);
    assert!(text.contains("datav@1"), "{text}");
    let cfg = Config::yaml(&format!(
        "portals: [\"127.0.0.1:0\"]\nstate_dir: {st}\n\
         settings: {{reboot_gap_secs: 30, nop_in_interval_secs: 0}}\n\
         images:\n  - {{name: system, path: {sys}}}\n\
         targets:\n  - name: {TARGET}\n    boot:\n      bindings:\n\
         \x20       - initiator: {PC1}\n\
         \x20         disks: [{{lun: 0, image: system, mode: volatile}}, {{lun: 1, image: datav, mode: persistent}}]\n",
        sys = dir.path().join("system.img").display(),
    ));
    let server = Server::start(dir.path(), &cfg);
    let ctl = dir.path().join("state/control.sock");
    let ctl = ctl.to_str().unwrap();
    let mut c = Client::connect(server.port);
    c.isid = open_iscsi(1);
    c.login(PC1, TARGET).unwrap();
    on_lun(&mut c, 1).write10(10, &block(0xd1));
    c.sync();
    let text = diskless(&[
        "client",
        "commit",
        PC1,
        "datav",
        "--lun",
        "1",
        "-m",
        "data v2",
        "--control",
        ctl,
    ]);
    assert!(text.contains("published datav@2"), "{text}");
    // The client goes on writing on its disk, still version 1 underneath.
    on_lun(&mut c, 1).write10(11, &block(0xd2));
    c.sync();
    let show = diskless(&["client", "show", PC1, "--control", ctl]);
    assert!(
        show.contains("LUN 1: datav@1 (next: @2) persistent"),
        "{show}"
    );
    // GC keeps version 1 (the data disk sits on it) and 2 (latest).
    let text = diskless(&["image", "gc", "datav", "--state-dir", st]);
    assert!(text.contains("removed versions: none"), "{text}");
    let log = diskless(&["image", "log", "datav", "--state-dir", st]);
    assert!(log.contains("data v2") && log.contains("empty"), "{log}");
    // A flat copy of disk 1 (image + overlay), client running.
    let flat = dir.path().join("data-flat.img");
    diskless(&[
        "client",
        "commit",
        PC1,
        flat.to_str().unwrap(),
        "--lun",
        "1",
        "--control",
        ctl,
    ]);
    let f = std::fs::read(&flat).unwrap();
    assert_eq!(f.len(), data.len());
    assert_eq!(&f[10 * 512..11 * 512], &block(0xd1)[..]);
    assert_eq!(&f[11 * 512..12 * 512], &block(0xd2)[..]);
    assert_eq!(&f[..10 * 512], &data[..10 * 512]);
    drop(c);
    // Reset of disk 1 only: it moves to version 2 (block 10 as published, 11 gone).
    diskless(&["client", "reset", PC1, "--lun", "1", "--control", ctl]);
    let mut c = Client::connect(server.port);
    c.isid = open_iscsi(2);
    c.login(PC1, TARGET).unwrap();
    assert_eq!(on_lun(&mut c, 1).read10(10, 1), block(0xd1));
    assert_eq!(on_lun(&mut c, 1).read10(11, 1), data[11 * 512..12 * 512]);
    let show = diskless(&["client", "show", PC1, "--control", ctl]);
    assert!(show.contains("LUN 1: datav@2 persistent"), "{show}");
}

#[test]
fn check_config_refuses_bad_disk_lists() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let base = format!(
        "portals: [\"127.0.0.1:0\"]\nstate_dir: {}\nimages:\n  - {{name: a, path: {}}}\n\
         targets:\n  - name: {TARGET}\n    boot:\n      bindings:\n        - initiator: {PC1}\n",
        dir.path().join("state").display(),
        img.display()
    );
    let cases = [
        (
            "          disks: [{lun: 1, image: a, mode: persistent}]\n",
            "no LUN 0",
        ),
        (
            "          disks: [{lun: 0, image: a, mode: volatile}, {lun: 0, image: a, mode: readonly}]\n",
            "listed twice",
        ),
        (
            "          image: a\n          mode: volatile\n          disks: [{lun: 0, image: a, mode: volatile}]\n",
            "LUN 0 is given twice",
        ),
        (
            "          disks: [{lun: 0, image: a, mode: volatile}, {lun: 1, image: NOPE, mode: persistent}]\n",
            "not in images",
        ),
        (
            "          disks: [{lun: 0, image: a, mode: volatile}, {lun: 1, image: a, mode: direct}]\n",
            "volatile, persistent or readonly",
        ),
        (
            "          disks: [{lun: 0, image: a, mode: volatile}, {lun: 200, image: a, mode: readonly}]\n",
            "above 127",
        ),
        (
            "          disks: [{lun: 0, image: a, mode: volatile}]\n          os: beos\n",
            "unknown variant",
        ),
    ];
    for (i, (disks, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&path, format!("{base}{disks}")).unwrap();
        let out = common::check_config(&path);
        let text = out.all();
        assert!(!out.success(), "accepted {disks}: {text}");
        assert!(text.contains(want), "{disks}: no `{want}` in {text}");
    }
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        format!(
            "{base}          disks: [{{lun: 0, image: a, mode: volatile}}, {{lun: 1, image: a, mode: persistent}}]\n          os: windows\n"
        ),
    )
    .unwrap();
    common::check_config(&good).ok();
}

/// A persistent system disk beside a volatile scratch disk: a new boot discards the
/// scratch disk only. The system disk keeps its writes and stays on the version it was made
/// on although a newer one is published (it moves only when the operator resets it), and a
/// next-boot override of its mode is taken at the next boot without touching the scratch
/// disk's reset.
#[test]
fn a_boot_resets_the_volatile_scratch_disk_and_leaves_the_persistent_system_disk() {
    common::require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("state");
    let st = st.to_str().unwrap();
    let sys = common::random_bytes(2 * MIB as usize, 60);
    let raw = dir.path().join("sys.raw");
    std::fs::write(&raw, &sys).unwrap();
    let text = diskless(&[
        "image",
        "import",
        "sysv",
        raw.to_str().unwrap(),
        "--format",
        "raw",
        "-m",
        "base",
        "--state-dir",
        st,
    ]);
    assert!(text.contains("sysv@1"), "{text}");
    let scratch = common::random_bytes(MIB as usize, 61);
    std::fs::write(dir.path().join("scratch.img"), &scratch).unwrap();
    let cfg = Config::yaml(&format!(
        "portals: [\"127.0.0.1:0\"]\nstate_dir: {st}\n\
         settings: {{reboot_gap_secs: 30, nop_in_interval_secs: 0}}\n\
         images:\n  - {{name: scratch, path: {scr}}}\n\
         targets:\n  - name: {TARGET}\n    boot:\n      bindings:\n\
         \x20       - initiator: {PC1}\n\
         \x20         disks: [{{lun: 0, image: sysv, mode: persistent}}, {{lun: 1, image: scratch, mode: volatile}}]\n",
        scr = dir.path().join("scratch.img").display(),
    ));
    let server = Server::start(dir.path(), &cfg);
    let ctl = dir.path().join("state/control.sock");
    let ctl = ctl.to_str().unwrap();
    // One boot: the firmware's session (ended by the hand-off) and then the OS's.
    let boot = |q: u8| {
        let mut fw = Client::connect(server.port);
        fw.isid = ipxe(q);
        fw.login(PC1, TARGET).unwrap();
        let mut os = Client::connect(server.port);
        os.isid = open_iscsi(q);
        os.login(PC1, TARGET).unwrap();
        drop(fw);
        os
    };
    let mut fw = boot(1);
    on_lun(&mut fw, 0).write10(10, &block(0xe0));
    fw.sync();
    on_lun(&mut fw, 1).write10(10, &block(0xe1));
    fw.sync();
    let text = diskless(&[
        "client",
        "commit",
        PC1,
        "sysv",
        "-m",
        "v2",
        "--control",
        ctl,
    ]);
    assert!(text.contains("published sysv@2"), "{text}");
    on_lun(&mut fw, 0).write10(11, &block(0xe2));
    fw.sync();
    fw.logout();
    // A new boot (the firmware again): scratch back to its image, system disk untouched
    // and still on version 1.
    let mut fw = boot(2);
    assert_eq!(on_lun(&mut fw, 1).read10(10, 1), scratch[5120..5632]);
    assert_eq!(on_lun(&mut fw, 0).read10(10, 1), block(0xe0));
    assert_eq!(on_lun(&mut fw, 0).read10(11, 1), block(0xe2));
    let show = diskless(&["client", "show", PC1, "--control", ctl]);
    assert!(
        show.contains("LUN 0: sysv@1 (next: @2) persistent"),
        "{show}"
    );
    on_lun(&mut fw, 1).write10(10, &block(0xe3));
    fw.sync();
    // The operator makes the system disk volatile from the next boot on.
    let text = diskless(&[
        "client",
        "next-boot",
        PC1,
        "--mode",
        "volatile",
        "--control",
        ctl,
    ]);
    assert!(text.contains("volatile"), "{text}");
    assert_eq!(
        on_lun(&mut fw, 0).read10(11, 1),
        block(0xe2),
        "mid-boot switch"
    );
    fw.logout();
    let mut fw = boot(3);
    // Now on a fresh volatile disk of the latest version (block 10 as published, 11 not),
    // the scratch disk reset again.
    assert_eq!(on_lun(&mut fw, 0).read10(10, 1), block(0xe0));
    assert_eq!(on_lun(&mut fw, 0).read10(11, 1), sys[5632..6144]);
    assert_eq!(on_lun(&mut fw, 1).read10(10, 1), scratch[5120..5632]);
    drop(fw);
    let kept = find_dirs(&dir.path().join("state"), "kept");
    assert!(
        !kept.is_empty(),
        "the persistent system disk must be kept, not discarded"
    );
}
