//! Image versions (issue 11, docs/images.md) against the real binary and the library:
//! import, `client commit` of a running client into the next version, log, rollback,
//! channels, the switch at the next boot (never mid-boot), persistent disks staying on their
//! version, GC keeping what is in use, export, a point-in-time commit while the client
//! writes, and `kill -9` during commit and GC.
//!
//! Logins use the raw client so the ISID can be iPXE's (firmware) or open-iscsi's (the OS).

mod common;
#[path = "common/raw.rs"]
mod raw;

use common::{firmware_isid, os_isid, Config, Server};
use diskless::storage::versions::{Images, Stamp};
use diskless::storage::{BlockStore, FileStore, Overlay, OverlayOptions};
use raw::Client;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.org.diskless:boot";
const SIZE: usize = 4 << 20;

fn block(fill: u8) -> Vec<u8> {
    vec![fill; 512]
}

fn diskless(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(args)
        .output()
        .expect("run diskless")
}

fn ok(out: Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn login(server: &Server, initiator: &str, isid: [u8; 6]) -> Client {
    let mut c = Client::connect(server.port);
    c.isid = isid;
    c.login(initiator, TARGET)
        .unwrap_or_else(|e| panic!("login of {initiator} refused: {e:?}"));
    c
}

fn config(dir: &Path) -> Config {
    Config::yaml(&format!(
        "portals: [\"127.0.0.1:0\"]\n\
         state_dir: {state}\n\
         settings: {{reboot_gap_secs: 1, nop_in_interval_secs: 0}}\n\
         targets:\n  - name: {TARGET}\n    boot:\n      bindings:\n\
         \x20       - {{initiator: \"iqn.2026-11.test:super\", image: win, mode: persistent}}\n\
         \x20       - {{initiator: \"iqn.2026-11.test:tester\", image: \"win:test\", mode: volatile}}\n\
         \x20       - {{initiator: \"iqn.2026-11.test:pinned\", image: \"win@1\", mode: readonly}}\n\
         \x20     default: {{image: win, mode: volatile}}\n",
        state = dir.join("state").display(),
    ))
}

/// A raw golden image imported as `win` version 1.
fn import(dir: &Path) -> Vec<u8> {
    common::require_tool("qemu-img");
    let g = common::random_bytes(SIZE, 11);
    let raw = dir.join("golden.raw");
    std::fs::write(&raw, &g).expect("write golden");
    let state = dir.join("state");
    let st = state.to_str().expect("utf-8");
    let text = ok(diskless(&[
        "image",
        "import",
        "win",
        raw.to_str().expect("utf-8"),
        "--format",
        "raw",
        "-m",
        "first install",
        "--state-dir",
        st,
    ]));
    assert!(text.contains("win@1"), "{text}");
    g
}

#[test]
fn publish_log_rollback_channels_and_the_next_boot() {
    let dir = tempfile::tempdir().expect("tmp");
    let g = import(dir.path());
    let st = dir.path().join("state");
    let st = st.to_str().expect("utf-8");
    let ctl = dir.path().join("state/control.sock");
    let ctl = ctl.to_str().expect("utf-8");
    ok(diskless(&[
        "image",
        "channel",
        "win",
        "test",
        "1",
        "--state-dir",
        st,
    ]));
    let server = Server::start(dir.path(), &config(dir.path()));

    // A volatile client boots version 1 (firmware, then the OS after the hand-off).
    let c1 = "iqn.2026-11.test:c1";
    let mut fw = login(&server, c1, firmware_isid(1));
    assert_eq!(fw.read10(10, 1), g[10 * 512..11 * 512]);

    // The super client patches its disk and publishes it while it keeps running.
    let sup = "iqn.2026-11.test:super";
    let mut s = login(&server, sup, os_isid(2));
    s.write10(10, &block(0xaa));
    let text = ok(diskless(&[
        "client",
        "commit",
        sup,
        "win",
        "-m",
        "patch one",
        "--control",
        ctl,
    ]));
    assert!(text.contains("published win@2"), "{text}");
    s.write10(11, &block(0xbb)); // the super client goes on writing
    assert_eq!(s.read10(10, 1), block(0xaa));

    let log = ok(diskless(&["image", "log", "win", "--state-dir", st]));
    assert!(
        log.contains("patch one") && log.contains("first install"),
        "{log}"
    );
    assert!(log.contains("[latest]") && log.contains("[test]"), "{log}");
    assert!(log.contains("layer") && log.contains("4KiB"), "{log}");

    // The hand-off happens after the publish: the OS of the same boot logs in, and the
    // client keeps version 1 until its next boot (never a switch mid-boot)...
    let mut os = login(&server, c1, os_isid(1));
    drop(fw);
    assert_eq!(os.read10(10, 1), g[10 * 512..11 * 512]);
    let show = ok(diskless(&["client", "show", c1, "--control", ctl]));
    assert!(
        show.contains("version: 1") && show.contains("next version: 2"),
        "{show}"
    );
    // ...then a hard reset: iPXE logs in while the OS session is still open.
    let mut fw = login(&server, c1, firmware_isid(3));
    assert_eq!(fw.read10(10, 1), block(0xaa), "next boot is on version 2");
    assert_eq!(
        fw.read10(11, 1),
        g[11 * 512..12 * 512],
        "version 2 is a point in time"
    );
    drop(os);

    // The super client's persistent disk stays on version 1 (its changes are against it)
    // until the operator resets it: then it is a fresh disk on version 2.
    let show = ok(diskless(&["client", "show", sup, "--control", ctl]));
    assert!(
        show.contains("version: 1") && show.contains("stays on its version"),
        "{show}"
    );
    drop(s);
    ok(diskless(&["client", "reset", sup, "--control", ctl]));
    let mut s = login(&server, sup, os_isid(7));
    assert_eq!(s.read10(10, 1), block(0xaa));
    assert_eq!(s.read10(11, 1), g[11 * 512..12 * 512]);

    // Channels and pins: the tester follows `test` (1), the pinned client stays on 1.
    let mut t = login(&server, "iqn.2026-11.test:tester", os_isid(4));
    assert_eq!(t.read10(10, 1), g[10 * 512..11 * 512]);
    let mut p = login(&server, "iqn.2026-11.test:pinned", os_isid(5));
    assert_eq!(p.read10(10, 1), g[10 * 512..11 * 512]);
    drop((t, p));

    // Rollback: new clients get version 1 again; the super client's persistent disk stays
    // on the version it was made on, and the tool says so.
    let text = ok(diskless(&[
        "image",
        "rollback",
        "win",
        "1",
        "--state-dir",
        st,
    ]));
    assert!(
        text.contains("latest is now version 1") && text.contains("server reloaded"),
        "{text}"
    );
    let mut c2 = login(&server, "iqn.2026-11.test:c2", os_isid(6));
    assert_eq!(c2.read10(10, 1), g[10 * 512..11 * 512]);
    drop(c2);
    assert_eq!(s.read10(10, 1), block(0xaa));
    let show = ok(diskless(&["client", "show", sup, "--control", ctl]));
    assert!(
        show.contains("version: 2") && show.contains("next version: 1"),
        "{show}"
    );
    let text = ok(diskless(&["image", "log", "win", "--state-dir", st]));
    assert!(text.contains("latest = 1"), "{text}");

    // GC keeps everything in use: 1 (latest, test, pinned), 2 (c1 booted it).
    let text = ok(diskless(&["image", "gc", "win", "--state-dir", st]));
    assert!(text.contains("removed versions: none"), "{text}");
    drop(fw);
    drop(s);

    // Export version 2 as raw and as qcow2; qemu-img reads back the same bytes.
    let out = dir.path().join("v2.raw");
    ok(diskless(&[
        "image",
        "export",
        "win@2",
        out.to_str().expect("p"),
        "--state-dir",
        st,
    ]));
    let data = std::fs::read(&out).expect("read export");
    assert_eq!(data[10 * 512..11 * 512], block(0xaa)[..]);
    assert_eq!(data[..10 * 512], g[..10 * 512]);
    assert_eq!(data[11 * 512..], g[11 * 512..]);
    let q = dir.path().join("v2.qcow2");
    ok(diskless(&[
        "image",
        "export",
        "win@2",
        q.to_str().expect("p"),
        "--format",
        "qcow2",
        "--state-dir",
        st,
    ]));
    let back = dir.path().join("back.raw");
    let conv = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&q)
        .arg(&back)
        .output()
        .expect("qemu-img");
    assert!(conv.status.success());
    assert_eq!(std::fs::read(&back).expect("read"), data);
    // Re-import the qcow2 as a new image.
    ok(diskless(&[
        "image",
        "import",
        "win2",
        q.to_str().expect("p"),
        "--state-dir",
        st,
    ]));
    let images = Images::new(&dir.path().join("state"));
    let v = images.open("win2", 1).expect("open win2");
    let mut buf = vec![0u8; SIZE];
    v.read_at(&mut buf, 0).expect("read");
    assert_eq!(buf, data);
}

/// A commit while the client writes is one point in time: the writer stamps block 0 then
/// block 1 with the same generation, so any instant has b0 == b1 or b0 == b1 + 1.
#[test]
fn commit_while_writing_is_a_point_in_time() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    let images = Images::new(&state);
    let staging = images.staging_path("img").expect("stage");
    let staged = staging.path.clone();
    FileStore::create(&staged, 64 << 20).expect("create");
    let stamp = Stamp {
        message: "base".into(),
        author: "t".into(),
        time_ms: 0,
    };
    images
        .create_from_file("img", &staged, 512, &stamp)
        .expect("import");
    let base: Arc<dyn BlockStore> = Arc::new(images.open("img", 1).expect("open"));
    let overlay = Arc::new(
        Overlay::create(&dir.path().join("ov"), base, OverlayOptions::default()).expect("overlay"),
    );
    // Some bulk data so the freeze has something to copy.
    let bulk = common::random_bytes(16 << 20, 3);
    overlay.write_at(&bulk, 1 << 20, false).expect("bulk");
    let stop = Arc::new(AtomicBool::new(false));
    let gens = Arc::new(AtomicU64::new(0));
    let writer = {
        let (o, stop, gens) = (overlay.clone(), stop.clone(), gens.clone());
        std::thread::spawn(move || {
            let mut g = 0u64;
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                g += 1;
                let t = Instant::now();
                o.write_at(&[g.to_le_bytes(); 64].concat(), 0, false)
                    .expect("w0");
                o.write_at(&[g.to_le_bytes(); 64].concat(), 512, false)
                    .expect("w1");
                worst = worst.max(t.elapsed());
                gens.store(g, Ordering::Relaxed);
            }
            worst
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while gens.load(Ordering::Relaxed) < 100 {
        assert!(Instant::now() < deadline, "writer never started");
        std::thread::yield_now();
    }
    let mut versions = Vec::new();
    for _ in 0..5 {
        let v = images
            .commit_layer("img", 1, &stamp, |w| overlay.freeze_into(w).map(|_| ()))
            .expect("commit");
        versions.push(v);
    }
    stop.store(true, Ordering::Relaxed);
    let worst = writer.join().expect("writer");
    eprintln!("longest write pause during 5 commits of 16 MiB changed: {worst:?}");
    for v in versions {
        let s = images.open("img", v).expect("open");
        let mut b = vec![0u8; 1024];
        s.read_at(&mut b, 0).expect("read");
        let b0 = u64::from_le_bytes(b[..8].try_into().expect("8"));
        let b1 = u64::from_le_bytes(b[512..520].try_into().expect("8"));
        assert!(
            b0 == b1 || b0 == b1 + 1,
            "version {v}: torn point in time {b0} {b1}"
        );
        let mut bulk_back = vec![0u8; bulk.len()];
        s.read_at(&mut bulk_back, 1 << 20).expect("read");
        assert!(bulk_back == bulk, "version {v}: bulk data differs");
    }
}

/// Run `args` and `kill -9` it after `delay` (if it is still running); true if it finished.
fn run_and_kill(args: &[&str], delay: Duration) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn diskless");
    let deadline = Instant::now() + delay;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if Instant::now() >= deadline {
            // SIGKILL of the process we started, by its PID.
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Every version the catalogue names opens and reads as `expect(version)` says.
fn check_versions(state: &Path, image: &str, expect: &dyn Fn(u64) -> Vec<u8>) -> Vec<u64> {
    let images = Images::new(state);
    let log = images.log(image).expect("catalogue readable after kill -9");
    let mut seen = Vec::new();
    for v in &log.versions {
        let s = images
            .open_in(&log, v.version)
            .unwrap_or_else(|e| panic!("version {} unreadable: {e}", v.version));
        let mut buf = vec![0u8; s.size() as usize];
        s.read_at(&mut buf, 0).expect("read");
        assert!(buf == expect(v.version), "version {} differs", v.version);
        seen.push(v.version);
    }
    log.get(log.head).expect("head names a version");
    seen
}

#[test]
fn kill_9_during_commit_and_gc_leaves_everything_intact() {
    let dir = tempfile::tempdir().expect("tmp");
    let g = import(dir.path());
    let state = dir.path().join("state");
    Images::new(&state)
        .set_channel("win", "test", Some(1))
        .expect("channel");
    // The super client writes 2 MiB (4096 chunks to freeze), then the server stops: the
    // commits below run offline (`client commit` opens the disk itself).
    let server = Server::start(dir.path(), &config(dir.path()));
    let sup = "iqn.2026-11.test:super";
    let mut s = login(&server, sup, os_isid(1));
    let change = common::random_bytes(2 << 20, 5);
    for (i, piece) in change.chunks(64 * 512).enumerate() {
        s.write10(1024 + (i * 64) as u32, piece);
    }
    assert_eq!(s.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None).status, 0);
    drop(s);
    let cfg = server.config_path.clone();
    server.stop();
    let mut want = g.clone();
    want[1024 * 512..1024 * 512 + change.len()].copy_from_slice(&change);
    let (g2, want2) = (g.clone(), want.clone());
    let expect = move |v: u64| if v == 1 { g2.clone() } else { want2.clone() };
    let cfg = cfg.to_str().expect("utf-8");

    // How long one commit takes, then kills spread over that span.
    let t = Instant::now();
    assert!(run_and_kill(
        &["client", "commit", sup, "win", "-m", "timed", "-c", cfg],
        Duration::from_secs(60)
    ));
    let span = t.elapsed();
    let mut finished = 0;
    for i in 0..16u32 {
        let delay = span * i / 12;
        if run_and_kill(
            &["client", "commit", sup, "win", "-m", "k", "-c", cfg],
            delay,
        ) {
            finished += 1;
        }
        check_versions(&state, "win", &expect);
        // The client's disk is intact: its overlay passes the offline check.
        let ov = std::fs::read_dir(state.join("clients"))
            .expect("clients")
            .flatten()
            .flat_map(|t| std::fs::read_dir(t.path()).into_iter().flatten().flatten())
            .map(|c| c.path().join("win.v1"))
            .next()
            .expect("overlay dir");
        let report = Overlay::check(&ov).expect("check");
        assert!(report.is_clean(), "{:?}", report.problems);
    }
    eprintln!("commit takes {span:?}; {finished} of 16 killed runs finished");

    // GC killed at any point: the catalogue is saved before files go, so every version it
    // names stays readable; a finished GC leaves only what is pinned.
    let images = Images::new(&state);
    let log = images.log("win").expect("log");
    images.rollback("win", 1).expect("rollback");
    let st = state.to_str().expect("utf-8");
    let t = Instant::now();
    for i in 0..12u32 {
        let delay = Duration::from_millis(u64::from(i) * 2);
        run_and_kill(&["image", "gc", "win", "--state-dir", st], delay);
        check_versions(&state, "win", &expect);
    }
    assert!(run_and_kill(
        &["image", "gc", "win", "--state-dir", st],
        Duration::from_secs(60)
    ));
    // Version 1 is latest; the persistent overlay sits on 1; all published layers went.
    let left = check_versions(&state, "win", &expect);
    assert_eq!(left, vec![1], "before: {} versions", log.versions.len());
    let files: Vec<String> = std::fs::read_dir(images.dir("win"))
        .expect("dir")
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.ends_with(".layer") || n.ends_with(".partial"))
        .collect();
    assert!(files.is_empty(), "{files:?}");
    eprintln!("gc rounds took {:?}", t.elapsed());
}

/// A next-boot override naming a version or a channel (docs/overlays.md, "Changing a
/// client's next boot"): a volatile client following `latest` (2) is put on `win@1` while it
/// runs: it keeps version 2 until its next boot, then boots version 1; an unknown version is
/// refused and changes nothing; then a channel, followed at the next boot.
#[test]
fn next_boot_override_names_versions_and_channels() {
    let dir = tempfile::tempdir().expect("tmp");
    let g = import(dir.path());
    let st = dir.path().join("state");
    let st = st.to_str().expect("utf-8");
    let ctl = dir.path().join("state/control.sock");
    let ctl = ctl.to_str().expect("utf-8");
    ok(diskless(&[
        "image",
        "channel",
        "win",
        "test",
        "1",
        "--state-dir",
        st,
    ]));
    let server = Server::start(dir.path(), &config(dir.path()));

    // Version 2: the super client's patch.
    let sup = "iqn.2026-11.test:super";
    let mut s = login(&server, sup, os_isid(9));
    s.write10(10, &block(0xaa));
    let text = ok(diskless(&[
        "client",
        "commit",
        sup,
        "win",
        "-m",
        "patch",
        "--control",
        ctl,
    ]));
    assert!(text.contains("published win@2"), "{text}");

    // c1 (default binding: win, latest) boots version 2.
    let c1 = "iqn.2026-11.test:c1";
    let fw = login(&server, c1, firmware_isid(1));
    let mut os = login(&server, c1, os_isid(1));
    drop(fw);
    assert_eq!(os.read10(10, 1), block(0xaa));

    // Pinned to version 1 for its next boot; a version that does not exist is refused.
    let text = ok(diskless(&[
        "client",
        "next-boot",
        c1,
        "--image",
        "win@1",
        "--control",
        ctl,
    ]));
    assert!(text.contains("win@1 in volatile mode"), "{text}");
    let bad = diskless(&[
        "client",
        "next-boot",
        c1,
        "--image",
        "win@9",
        "--control",
        ctl,
    ]);
    assert!(!bad.status.success());
    let show = ok(diskless(&["client", "show", c1, "--control", ctl]));
    assert!(
        show.contains("next-boot override: image win@1") && show.contains("version: 2"),
        "{show}"
    );
    assert_eq!(os.read10(10, 1), block(0xaa), "switched mid-boot");

    // Its next boot (iPXE while the OS session is open) is on version 1.
    let fw = login(&server, c1, firmware_isid(2));
    let mut os = login(&server, c1, os_isid(2));
    drop(fw);
    assert_eq!(os.read10(10, 1), g[10 * 512..11 * 512], "not on version 1");
    let show = ok(diskless(&["client", "show", c1, "--control", ctl]));
    assert!(show.contains("version: 1"), "{show}");

    // A channel: `test` moved to 2; the override follows it at the next boot.
    ok(diskless(&[
        "image",
        "channel",
        "win",
        "test",
        "2",
        "--state-dir",
        st,
    ]));
    ok(diskless(&[
        "client",
        "next-boot",
        c1,
        "--image",
        "win:test",
        "--control",
        ctl,
    ]));
    assert_eq!(os.read10(10, 1), g[10 * 512..11 * 512]);
    let mut fw = login(&server, c1, firmware_isid(3));
    assert_eq!(
        fw.read10(10, 1),
        block(0xaa),
        "not on the channel's version"
    );
    let clients = ok(diskless(&["clients", "--control", ctl]));
    assert!(clients.contains("win:test/*"), "{clients}");
    drop((os, s));
}
