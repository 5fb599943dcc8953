//! Flat copies of deep versions (docs/images.md, "Flat copies"), against the real server:
//! a volatile client's reads start the background copy of a 6-deep version; `kill -9` of the
//! server in the middle of the copy leaves every version readable and the partial file
//! unused; the next server deletes it, writes the copy again, switches the client's reads to
//! it (same bytes), and `image gc` keeps the copy the served version uses.

mod common;
#[path = "common/raw.rs"]
mod raw;

use common::{firmware_isid, Config, Server};
use diskless::storage::versions::{flat, Images, Stamp};
use diskless::storage::BlockStore;
use raw::Client;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.org.diskless:boot";
const SIZE: usize = 8 << 20;
const LAYERS: usize = 6;

fn stamp(m: &str) -> Stamp {
    Stamp {
        message: m.into(),
        author: "test".into(),
        time_ms: 1,
    }
}

/// Image `win`: a random base, then LAYERS layers each rewriting 64 KiB here and there and
/// zeroing 4 KiB. Returns the model of the newest version.
fn deep_image(state: &Path) -> Vec<u8> {
    let images = Images::new(state);
    let staging = images.staging_path("win").expect("staging");
    let mut model = common::random_bytes(SIZE, 3);
    File::create(&staging.path)
        .and_then(|mut f| f.write_all(&model))
        .expect("write base");
    images
        .create_from_file("win", &staging.path, 512, &stamp("base"))
        .expect("create");
    drop(staging);
    for i in 0..LAYERS {
        let data = common::random_bytes(64 << 10, 100 + i as u64);
        let at = (i * 1_048_576 + 12_288) as u64;
        let zero = (i * 1_048_576 + 512 * 1024) as u64;
        let head = images.log("win").expect("log").head;
        images
            .commit_layer("win", head, &stamp("layer"), |w| {
                w.data(at, &data)?;
                w.zero(zero, zero + 4096)
            })
            .expect("commit");
        model[at as usize..at as usize + data.len()].copy_from_slice(&data);
        model[zero as usize..zero as usize + 4096].fill(0);
    }
    model
}

fn config(dir: &Path, rate: &str) -> Config {
    Config::yaml(&format!(
        "portals: [\"127.0.0.1:0\"]\n\
         state_dir: {state}\n\
         settings: {{nop_in_interval_secs: 0, materialize_depth: 4, materialize_rate: {rate}}}\n\
         targets:\n  - name: {TARGET}\n    boot:\n      default: {{image: win, mode: volatile}}\n",
        state = dir.join("state").display(),
    ))
}

fn flat_dir(state: &Path) -> PathBuf {
    Images::new(state).dir("win").join(flat::FLAT_DIR)
}

fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(suffix))
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Read the whole disk through iSCSI (64 KiB a command) and compare with the model.
fn read_all(c: &mut Client, model: &[u8]) {
    for (i, want) in model.chunks(64 << 10).enumerate() {
        let got = c.read10((i * 128) as u32, 128);
        assert!(got == want, "64 KiB piece {i} differs");
    }
}

/// Every version reads as it should through the library (no flat copy used: none is
/// complete, and this process never starts one).
fn check_versions(state: &Path, newest: &[u8]) {
    let images = Images::new(state);
    let log = images.log("win").expect("catalogue");
    assert_eq!(log.versions.len(), LAYERS + 1);
    let s = images.open_in(&log, log.head).expect("open head");
    assert!(!s.is_flat());
    let mut buf = vec![0u8; SIZE];
    s.read_at(&mut buf, 0).expect("read");
    assert!(buf == newest, "head differs after kill -9");
    for v in &log.versions {
        let s = images.open_in(&log, v.version).expect("open");
        s.read_at(&mut buf, 0).expect("read");
    }
}

#[test]
fn kill_9_during_materialization_then_the_copy_is_redone_and_used() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    let model = deep_image(&state);
    let fdir = flat_dir(&state);

    // 1 MiB/s: the 8 MiB copy takes seconds, so the kill lands in its middle.
    let server = Server::start(dir.path(), &config(dir.path(), "1MiB"));
    let mut c = Client::connect(server.port);
    c.isid = firmware_isid(1);
    c.login("iqn.2026-11.test:pc-1", TARGET).expect("login");
    assert_eq!(c.read10(0, 8), model[..4096]);
    wait_for("a partial copy with data", Duration::from_secs(30), || {
        files_ending(&fdir, ".flat.partial").iter().any(|p| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).is_ok_and(|m| m.blocks() > 0)
        })
    });
    // Reads during the copy go through the chain and are right.
    read_all(&mut c, &model);
    assert!(
        files_ending(&fdir, ".flat").is_empty(),
        "the copy finished too early"
    );
    drop(c);
    server.kill9();

    // The crash left the partial, unused; every version reads as before.
    assert_eq!(files_ending(&fdir, ".flat.partial").len(), 1);
    check_versions(&state, &model);

    // The next server: the first read starts the copy again (no limit now), which deletes
    // the partial; the version's reads switch to the flat copy, same bytes.
    let server = Server::start(dir.path(), &config(dir.path(), "0"));
    let mut c = Client::connect(server.port);
    c.isid = firmware_isid(2);
    c.login("iqn.2026-11.test:pc-2", TARGET).expect("login");
    assert_eq!(c.read10(0, 8), model[..4096]);
    wait_for("the log line of the copy", Duration::from_secs(60), || {
        server.stderr().contains("version materialized")
    });
    assert!(files_ending(&fdir, ".flat.partial").is_empty());
    let flats = files_ending(&fdir, ".flat");
    assert_eq!(flats.len(), 1, "{flats:?}");
    let log = Images::new(&state).log("win").expect("log");
    let uid = &log.get(log.head).expect("head").uid;
    assert_eq!(
        flats[0],
        Images::new(&state).flat_path("win", log.head, uid)
    );
    read_all(&mut c, &model);
    let flat_bytes = std::fs::read(&flats[0]).expect("read flat");
    assert!(flat_bytes == model);
    // Sparse: holes where the layers zeroed 4 KiB (the base is random, all allocated; the
    // file system may still fill a small gap between two writes, as ext4 does).
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&flats[0]).expect("meta").blocks() * 512;
    assert!(allocated < SIZE as u64, "{allocated} bytes allocated");

    // GC (inside the running server) keeps the copy of the version in use.
    let out = Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(["image", "gc", "win", "--state-dir"])
        .arg(&state)
        .output()
        .expect("gc");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(files_ending(&fdir, ".flat"), flats);
    read_all(&mut c, &model);
    drop(c);
    server.stop();

    // A third start finds the complete copy and uses it at once (the log says so).
    let server = Server::start(dir.path(), &config(dir.path(), "0"));
    let mut c = Client::connect(server.port);
    c.isid = firmware_isid(3);
    c.login("iqn.2026-11.test:pc-3", TARGET).expect("login");
    read_all(&mut c, &model);
    assert!(
        server
            .stderr()
            .contains("version served from its flat copy"),
        "{}",
        server.stderr()
    );
    assert!(!server.stderr().contains("materializing a flat copy"));
    drop(c);
    server.stop();
}
