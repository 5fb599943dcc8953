//! The image catalogue in etcd (issue 13 item 2, docs/scale-out.md "Image catalogue"),
//! against a real etcd and a real Ceph RADOS gateway:
//!
//! - `diskless image push` uploads to S3 first and records the version in etcd second; with
//!   etcd down it fails after the upload and says so; run again, it checks the stored version
//!   against the file and records it without uploading anything;
//! - `image log` shows both versions from any node's configuration;
//! - two nodes serve an `images:` entry with `version: latest`; a rollback made through one
//!   node's configuration reaches the node serving a client, whose running boot keeps its
//!   version (the OS logging in after the hand-off reads the same bytes) and whose next boot
//!   reads the other version's bytes;
//! - pointer moves race: of two moves expecting the same current version exactly one wins,
//!   and in a burst of concurrent moves every reported move is one write of the pointer;
//! - a node restarted while etcd is down keeps the version it served.
//!
//! Waits are for conditions, never fixed sleeps.

#[path = "common/ceph.rs"]
mod ceph;
#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/http.rs"]
mod http;
#[path = "common/raw.rs"]
mod raw;

use ceph::Ceph;
use cluster::{script, Node};
use common::{firmware_isid, os_isid};
use etcd::Etcd;
use raw::Client;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const TARGET: &str = "iqn.2026-12.org.diskless:catalogue";
const CLUSTER: &str = "cat";
const TTL: u64 = 2;
const WAIT: Duration = Duration::from_secs(30);
const MIB: usize = 1 << 20;
const SIZE: usize = 4 * MIB;

fn s3_entry(ceph: &Ceph) -> String {
    format!(
        "  - name: golden\n    s3: {{endpoint: \"{}\", bucket: golden, prefix: diskless, version: latest, credentials_file: s3.cred, timeout_secs: 5, retries: 1}}\n",
        ceph.endpoint()
    )
}

/// Ceph with a `golden` bucket and credentials, a temporary directory holding `v1.raw` and
/// `v2.raw` (two versions of SIZE random bytes, seeds `seed` and `seed + 1`), and etcd.
fn two_versions(seed: u64) -> (Ceph, tempfile::TempDir, Etcd, Vec<u8>, Vec<u8>) {
    let v1 = common::random_bytes(SIZE, seed);
    let v2 = common::random_bytes(SIZE, seed + 1);
    let ceph = Ceph::start();
    ceph.create_bucket("golden");
    let tmp = tempfile::tempdir().expect("temporary directory");
    let root = tmp.path();
    std::fs::write(root.join("v1.raw"), &v1).expect("v1.raw");
    std::fs::write(root.join("v2.raw"), &v2).expect("v2.raw");
    ceph::write_credentials(root);
    let etcd = Etcd::start(root);
    (ceph, tmp, etcd, v1, v2)
}

/// The configuration `image push` and `image gc` run with (node id `publisher`, serving
/// nothing), written to `root/push.yaml`.
fn publisher(root: &Path, ceph: &Ceph, etcd: &Etcd, mode: &str) -> std::path::PathBuf {
    let cfg = root.join("push.yaml");
    std::fs::write(
        &cfg,
        format!(
            "portals: [\"127.0.0.1:0\"]\nstate_dir: {}\nimages:\n{}\
             targets:\n  - name: {TARGET}\n    boot:\n      default: {{image: golden, mode: {mode}}}\n\
             cluster: {{name: {CLUSTER}, node_id: publisher, etcd: [\"{}\"], advertise: \"127.0.0.1:3260\", lease_ttl: {TTL}}}\n",
            root.join("push-state").display(),
            s3_entry(ceph),
            etcd.endpoint()
        ),
    )
    .expect("push.yaml");
    cfg
}

fn spec<'a>(ceph: &Ceph, etcd: &Etcd) -> cluster::Spec<'a> {
    cluster::Spec {
        cluster: CLUSTER,
        target: TARGET,
        etcd: etcd.endpoint(),
        ttl: TTL,
        images: s3_entry(ceph),
        image: "golden",
        extra: "chunk_cache: {memory: 16MiB, disk: 0}\n".to_string(),
        cluster_extra: String::new(),
    }
}

/// A node with the S3 credentials in its directory.
fn start(root: &Path, id: &str, spec: &cluster::Spec) -> Node {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    ceph::write_credentials(&dir);
    Node::start(root, id, spec)
}

/// Run `diskless ARGS`: (success, stdout + stderr).
fn diskless(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(args)
        .output()
        .expect("run diskless");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ok(args: &[&str]) -> String {
    let (done, text) = diskless(args);
    assert!(done, "diskless {args:?} failed: {text}");
    text
}

fn push(config: &Path, file: &Path, version: &str, message: &str) -> (bool, String) {
    let (c, f) = (config.to_str().unwrap(), file.to_str().unwrap());
    diskless(&[
        "image",
        "push",
        f,
        "-c",
        c,
        "--image",
        "golden",
        "--chunk-size",
        "1MiB",
        "--version",
        version,
        "-m",
        message,
    ])
}

/// [`login`] on `node`, failing with its log.
fn login_on(node: &Node, who: &str, isid: [u8; 6]) -> Client {
    let mut c = Client::connect(node.iscsi);
    c.isid = isid;
    if let Err(e) = c.login(who, TARGET) {
        panic!(
            "login of {who} on {} refused: {e:?}; its log:\n{}",
            node.id,
            node.stderr()
        );
    }
    c
}

fn login(port: u16, who: &str, isid: [u8; 6]) -> Client {
    let mut c = Client::connect(port);
    c.isid = isid;
    c.login(who, TARGET)
        .unwrap_or_else(|e| panic!("login of {who} on {port} refused: {e:?}"));
    c
}

/// Whether the client reads `image`'s bytes (one block in each chunk).
fn reads(c: &mut Client, image: &[u8]) -> bool {
    (0..SIZE / MIB).all(|k| {
        let lba = (k * MIB / 512 + 7 * k + 3) as u64;
        let got = c.try_read16(lba, 2).expect("read");
        let a = lba as usize * 512;
        got[..] == image[a..a + 1024]
    })
}

/// The etcd `version` (number of writes since creation) of a key.
fn writes_of(etcd: &Etcd, key: &str) -> u64 {
    let text = etcd
        .ctl_out(&["get", key, "-w", "json"])
        .expect("etcdctl get");
    let v: serde_json::Value = serde_json::from_str(&text).expect("etcdctl json");
    v["kvs"][0]["version"].as_u64().unwrap_or(0)
}

/// Wait until the node's log satisfies `done`; fail with the log.
fn wait_log(n: &Node, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let e = n.stderr();
        if done(&e) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {} {what}; its log:\n{e}",
            n.id
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn catalogue_push_log_rollback_race_and_next_boot() {
    let (ceph, tmp, mut etcd, v1, v2) = two_versions(1);
    let root = tmp.path();
    let push_cfg = publisher(root, &ceph, &etcd, "volatile");

    // The entry follows `latest`: a push must name its version.
    let (done, text) = diskless(&[
        "image",
        "push",
        root.join("v1.raw").to_str().unwrap(),
        "-c",
        push_cfg.to_str().unwrap(),
        "--image",
        "golden",
    ]);
    assert!(!done && text.contains("--version"), "{text}");

    // etcd down during the push: the upload is done, the record is not, and it says so.
    etcd.kill9();
    let (done, text) = push(&push_cfg, &root.join("v1.raw"), "v1", "first install");
    assert!(!done, "{text}");
    assert!(
        text.contains("pushed") && text.contains("NOT in the catalogue") && text.contains("again"),
        "{text}"
    );
    etcd.spawn();
    // Run again: nothing uploaded, recorded; latest names it.
    let (done, text) = push(&push_cfg, &root.join("v1.raw"), "v1", "first install");
    assert!(done, "{text}");
    assert!(
        text.contains("nothing uploaded") && text.contains("recorded golden@v1 (#1)"),
        "{text}"
    );
    // A file that is not the stored version is never recorded under its name.
    let (done, text) = push(&push_cfg, &root.join("v2.raw"), "v1", "wrong");
    assert!(!done && text.contains("chunk 0 differs"), "{text}");
    let (done, text) = push(&push_cfg, &root.join("v2.raw"), "v2", "second");
    assert!(
        done && text.contains("recorded golden@v2 (#2)") && text.contains("latest: v1 -> v2"),
        "{text}"
    );
    let (done, text) = push(&push_cfg, &root.join("v2.raw"), "v2", "second");
    assert!(!done && text.contains("already exists"), "{text}");

    // Two nodes follow `latest` (v2 now).
    let sp = spec(&ceph, &etcd);
    let mut nodes = vec![start(root, "n1", &sp), start(root, "n2", &sp)];
    cluster::wait_for_views(&nodes, WAIT);

    // The log, from either node's configuration.
    for n in &nodes {
        let log = ok(&["image", "log", "golden", "-c", n.config().to_str().unwrap()]);
        assert!(
            log.contains("v1") && log.contains("first install"),
            "{}: {log}",
            n.id
        );
        assert!(
            log.contains("second [latest]") && log.contains("latest = v2"),
            "{}: {log}",
            n.id
        );
    }

    // A client boots (firmware) on the node it is placed on: v2.
    let mac = "52:54:00:00:0c:01";
    let (who, port) = script(nodes[0].http, mac);
    let serving = nodes
        .iter()
        .position(|n| n.iscsi == port)
        .expect("placed on a node");
    let other = 1 - serving;
    let mut fw = login(port, &who, firmware_isid(1));
    assert!(reads(&mut fw, &v2), "boots latest = v2");

    // Rollback, through the other node's configuration.
    let text = ok(&[
        "image",
        "rollback",
        "golden",
        "v1",
        "-c",
        nodes[other].config().to_str().unwrap(),
    ]);
    assert!(text.contains("golden:latest -> v1 (was v2)"), "{text}");
    for n in &nodes {
        wait_log(n, "to take the rollback", |e| {
            e.contains("image catalogue changed")
        });
    }
    // The running boot keeps v2: the firmware's session and the OS after the hand-off.
    assert!(reads(&mut fw, &v2), "a running session keeps its version");
    let mut os = login(port, &who, os_isid(1));
    drop(fw);
    assert!(reads(&mut os, &v2), "never a switch mid-boot");
    // Its next boot (a hard reset: the firmware logs in while the OS session is open) is v1.
    assert_eq!(script(nodes[0].http, mac), (who.clone(), port));
    let mut fw = login(port, &who, firmware_isid(2));
    assert!(reads(&mut fw, &v1), "the next boot takes the rollback");
    let log = nodes[serving].stderr();
    assert!(
        log.contains("client disk moves to the version its binding names"),
        "the client's disk moved at its boot, as a local version's does: {log}"
    );
    drop((fw, os));
    // A new client on the other node boots v1 as well.
    let other_client = (2..40)
        .map(|i| format!("52:54:00:00:0c:{i:02x}"))
        .map(|m| script(nodes[0].http, &m))
        .find(|(_, p)| *p == nodes[other].iscsi)
        .expect("a client placed on the other node");
    let mut c = login(other_client.1, &other_client.0, firmware_isid(3));
    assert!(reads(&mut c, &v1));
    drop(c);

    // Channels: compare-and-swap. Two operators expecting the same version: one wins.
    let cfg = nodes[0].config();
    let cfg = cfg.to_str().unwrap();
    let text = ok(&["image", "channel", "golden", "test", "v2", "-c", cfg]);
    assert!(text.contains("golden:test -> v2 (was unset)"), "{text}");
    let racers: Vec<_> = ["v1", "v1"]
        .iter()
        .map(|v| {
            let (v, cfg) = (v.to_string(), cfg.to_string());
            std::thread::spawn(move || {
                diskless(&[
                    "image", "channel", "golden", "test", &v, "--expect", "v2", "-c", &cfg,
                ])
            })
        })
        .collect();
    let results: Vec<(bool, String)> = racers.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        results.iter().filter(|r| r.0).count(),
        1,
        "exactly one of two racing moves wins: {results:?}"
    );
    let lost = results.iter().find(|r| !r.0).unwrap();
    assert!(lost.1.contains("moved meanwhile (now v1)"), "{}", lost.1);

    // A burst of concurrent moves: every move reported is one write of the pointer (none
    // reported and lost, none written and unreported).
    let key = format!("/diskless/{CLUSTER}/catalogue/golden/pointers/test");
    let before = writes_of(&etcd, &key);
    let burst: Vec<_> = (0..6)
        .map(|i| {
            let (v, cfg) = (if i % 2 == 0 { "v2" } else { "v1" }, cfg.to_string());
            std::thread::spawn(move || {
                diskless(&["image", "channel", "golden", "test", v, "-c", &cfg])
            })
        })
        .collect();
    let results: Vec<(bool, String)> = burst.into_iter().map(|h| h.join().unwrap()).collect();
    let moved = results
        .iter()
        .filter(|r| r.0 && r.1.contains(" -> "))
        .count() as u64;
    for (done, text) in &results {
        assert!(
            (*done && (text.contains(" -> ") || text.contains("already")))
                || (!done && text.contains("moved meanwhile")),
            "{text}"
        );
    }
    assert_eq!(writes_of(&etcd, &key) - before, moved, "{results:?}");
    eprintln!(
        "burst of 6 concurrent channel moves: {moved} moved, {} already there, {} refused (moved meanwhile)",
        results.iter().filter(|r| r.0 && r.1.contains("already")).count(),
        results.iter().filter(|r| !r.0).count()
    );
    let log = ok(&["image", "log", "golden", "-c", cfg]);
    let list = ok(&["image", "list", "-c", cfg]);
    assert!(
        list.contains("golden  (catalogue)  latest v1") && list.contains("2 versions"),
        "{list}"
    );
    // Tags: `[latest]`, `[test]`, or `[latest, test]` on one version.
    assert!(log.contains("[latest") && log.contains("test]"), "{log}");

    // Two pushes racing: distinct sequence numbers, and `latest` moved through both in turn
    // (each move names the one before it): the second transaction saw the first.
    let pushers: Vec<_> = [("v3", "v1.raw"), ("v4", "v2.raw")]
        .iter()
        .map(|(v, f)| {
            let (v, f, c) = (v.to_string(), root.join(f), push_cfg.clone());
            std::thread::spawn(move || push(&c, &f, &v, "raced"))
        })
        .collect();
    let pushed: Vec<String> = pushers
        .into_iter()
        .map(|h| {
            let (done, text) = h.join().unwrap();
            assert!(done, "{text}");
            text
        })
        .collect();
    let recorded = |seq: u64| -> (String, String) {
        let line = pushed
            .iter()
            .flat_map(|t| t.lines())
            .find(|l| l.contains(&format!("(#{seq})")))
            .unwrap_or_else(|| panic!("no push recorded as #{seq}: {pushed:?}"));
        let moved = line.rsplit("latest: ").next().unwrap_or("");
        let (from, to) = moved.split_once(" -> ").expect("latest: A -> B");
        (from.to_string(), to.to_string())
    };
    let (a_from, a) = recorded(3);
    let (b_from, b) = recorded(4);
    assert_eq!(
        (a_from.as_str(), b_from.as_str()),
        ("v1", a.as_str()),
        "{pushed:?}"
    );
    assert_ne!(a, b);
    // Both nodes take the last one (new boots).
    for n in &nodes {
        // The node's last move (an earlier step may have logged version={b} already).
        wait_log(n, &format!("to follow latest to {b}"), |e| {
            e.lines()
                .rev()
                .find(|l| l.contains("new boots take this version"))
                .is_some_and(|last| last.contains(&format!("version={b} ")))
        });
    }

    // etcd down: a node restarted now keeps the version it served, from its state
    // directory.
    etcd.kill9();
    let mut n2 = nodes.pop().expect("n2");
    n2.server.take().expect("n2 running").kill9();
    // The killed node's catalogue lines (its log file is replaced by the restart): what it
    // committed last, for the failure message.
    let moves_before: Vec<String> = std::fs::read_to_string(n2.dir.join("server.stderr"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("image catalogue"))
        .map(str::to_string)
        .collect();
    let saved =
        std::fs::read_to_string(n2.dir.join("state/catalogue-in-force.json")).unwrap_or_default();
    let n2 = start(root, "n2", &sp);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let e = n2.stderr();
        if e.lines().any(|l| {
            l.contains("keeping the version this node has") && l.contains(&format!("version={b}"))
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "n2 did not keep version {b} with etcd down; its log:\n{e}\n\
             its catalogue lines before the restart:\n{}\nsaved in force: {saved}",
            moves_before.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A persistent disk made on a version that `latest` has left reopens after the node
/// restarts: the version is immutable in S3 and its disk records which one it is (before,
/// the login was refused: "the persistent disk is on golden@1, a version the catalogue
/// pointer has left").
#[test]
fn persistent_disk_on_a_left_version_reopens_after_a_restart() {
    let (ceph, tmp, etcd, v1, v2) = two_versions(11);
    let root = tmp.path();
    let push_cfg = publisher(root, &ceph, &etcd, "persistent");
    let (done, text) = push(&push_cfg, &root.join("v1.raw"), "p1", "first");
    assert!(done, "{text}");

    let sp = spec(&ceph, &etcd);
    let start_persistent = || {
        let dir = root.join("n1");
        std::fs::create_dir_all(&dir).unwrap();
        ceph::write_credentials(&dir);
        Node::start_mode(root, "n1", &sp, "persistent")
    };
    let mut node = start_persistent();
    cluster::wait_for_views([&node], WAIT);
    let mac = "52:54:00:00:0d:01";
    let (who, port) = script(node.http, mac);
    assert_eq!(port, node.iscsi);
    let mark = vec![0x5au8; 512];
    let mut c = login_on(&node, &who, firmware_isid(1));
    assert!(reads(&mut c, &v1), "the disk is made on p1");
    c.write10(1, &mark);
    // SYNCHRONIZE CACHE(10) (SBC-3 5.22): the write is durable, as an OS makes it.
    assert_eq!(c.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None).status, 0);
    drop(c);

    // latest moves to p2: the persistent disk stays on p1 while the node runs.
    let (done, text) = push(&push_cfg, &root.join("v2.raw"), "p2", "second");
    assert!(done, "{text}");
    wait_log(&node, "to follow latest to p2", |e| {
        e.lines()
            .rev()
            .find(|l| l.contains("new boots take this version"))
            .is_some_and(|l| l.contains("version=p2 "))
    });
    let check = |node: &Node, isid: u16| {
        let (w, p) = script(node.http, mac);
        assert_eq!((w.as_str(), p), (who.as_str(), node.iscsi));
        let mut c = login_on(node, &w, firmware_isid(isid));
        let got = c.read10(1, 1);
        let which = if got == v1[512..1024] {
            "p1's"
        } else if got == v2[512..1024] {
            "p2's"
        } else {
            "other"
        };
        assert!(
            got == mark,
            "boot {isid}: the client's write is not on its disk (block 1 is {which}); log:\n{}",
            node.stderr()
        );
        let mut image = v1.clone();
        image[512..1024].copy_from_slice(&mark);
        assert!(reads(&mut c, &image), "the disk reads p1 under its writes");
    };
    check(&node, 2);

    // The node restarts (etcd up, latest = p2): the disk reopens on p1.
    node.server.take().expect("running").kill9();
    let node = start_persistent();
    check(&node, 3);
    let log = node.stderr();
    assert!(
        log.contains("persistent disk stays on the version it was made on"),
        "{log}"
    );
    assert!(
        !log.contains("a version the catalogue pointer has left"),
        "{log}"
    );

    // `image gc` keeps p1: the client's record in etcd says its disk is on #1.
    let c = push_cfg.to_str().unwrap();
    let plan = ok(&["image", "gc", "golden", "--keep", "0", "--dry-run", "-c", c]);
    assert!(
        plan.contains("nothing to delete") && plan.contains("#1"),
        "{plan}"
    );
}

/// `image gc` of a catalogue image: keeps the newest `--keep`, the versions a pointer
/// names; `--dry-run` deletes nothing; a deleted version is gone from the catalogue (no
/// pointer can name it) and from the bucket (the same push uploads it again).
#[test]
fn catalogue_gc_deletes_versions_nothing_uses() {
    let (ceph, tmp, etcd, _, _) = two_versions(21);
    let root = tmp.path();
    let cfg = publisher(root, &ceph, &etcd, "volatile");
    let c = cfg.to_str().unwrap();
    for (v, f) in [
        ("g1", "v1.raw"),
        ("g2", "v2.raw"),
        ("g3", "v1.raw"),
        ("g4", "v2.raw"),
    ] {
        let (done, text) = push(&cfg, &root.join(f), v, "gc");
        assert!(done, "{text}");
    }
    ok(&["image", "channel", "golden", "test", "g1", "-c", c]);

    let plan = ok(&["image", "gc", "golden", "--keep", "2", "--dry-run", "-c", c]);
    assert!(plan.contains("would delete golden@g2 (#2)"), "{plan}");
    for kept in ["golden@g1", "golden@g3", "golden@g4"] {
        assert!(!plan.contains(kept), "{kept} is kept: {plan}");
    }
    assert!(ok(&["image", "log", "golden", "-c", c]).contains("g2"));

    let done = ok(&["image", "gc", "golden", "--keep", "2", "-c", c]);
    assert!(done.contains("deleted golden@g2 (#2)"), "{done}");
    let log = ok(&["image", "log", "golden", "-c", c]);
    assert!(
        !log.contains("g2") && log.contains("g1") && log.contains("g3"),
        "{log}"
    );
    let (moved, text) = diskless(&["image", "channel", "golden", "test", "g2", "-c", c]);
    assert!(!moved && text.contains("no version"), "{text}");
    // The objects are gone: the same push uploads the version again (a new record).
    let (again, text) = push(&cfg, &root.join("v2.raw"), "g2", "again");
    assert!(
        again && text.contains("pushed") && text.contains("recorded golden@g2 (#5)"),
        "{text}"
    );
    // Nothing more to delete with the default --keep 3 (g1 test, g3, g4, g2 latest).
    let again = ok(&["image", "gc", "golden", "-c", c]);
    assert!(again.contains("nothing to delete"), "{again}");

    // A version marked deleting (a gc interrupted after its compare-and-swap): no pointer
    // may name it, and the next gc finishes it.
    let key = format!("/diskless/{CLUSTER}/catalogue/golden/versions/g3");
    let text = etcd
        .ctl_out(&["get", &key, "--print-value-only"])
        .expect("etcdctl get");
    let mut rec: serde_json::Value = serde_json::from_str(text.trim()).expect("record");
    rec["deleting"] = serde_json::Value::Bool(true);
    assert!(etcd.ctl(&["put", &key, &rec.to_string()]));
    let (moved, text) = diskless(&["image", "rollback", "golden", "g3", "-c", c]);
    assert!(!moved && text.contains("being deleted"), "{text}");
    let done = ok(&["image", "gc", "golden", "-c", c]);
    assert!(done.contains("deleted golden@g3 (#3)"), "{done}");
    assert!(!ok(&["image", "log", "golden", "-c", c]).contains("g3"));
}
