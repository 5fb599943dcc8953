//! A boot storm of persistent clients on one node, two ways side by side (issue 13, sizing;
//! run by scripts/bench/rbdstorm.sh, not by the test suite):
//!
//! - `rbd`: each client's disk is an RBD clone of the golden image's protected snapshot
//!   (`images[].rbd`; docs/scale-out.md): reads of golden regions go to Ceph (librbd reads
//!   the parent's objects from the OSD), a client's first write to an object copies that
//!   object up from the parent;
//! - `overlay`: each client's disk is a node-local persistent overlay over the same bytes
//!   in S3, read through the node's chunk cache (what a node does without RBD).
//!
//! Each client logs in, replays the reads of the recorded boot (tests/fixtures/boot-trace.txt,
//! checking every byte), writes `DISKLESS_BENCH_WRITES` 4 KiB blocks spread over the regions
//! it read (the golden bytes again, so that every later read still checks), SYNCHRONIZE
//! CACHE, and logs out. Round 1 is every client's first boot (the disks are created: clones,
//! copy-ups, overlay files); later rounds are reboots. The two kinds alternate (round 1
//! overlay first, round 2 rbd first, ...). Per storm it prints the wall time, the node's CPU,
//! each Ceph daemon's CPU (monitor, OSD, RADOS gateway), the per-client boot time and the S3
//! chunk GETs, then a table of rbd/overlay ratios.
#![cfg(feature = "rbd")]

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
use cluster::Node;
use etcd::Etcd;
use raw::Client;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-12.org.diskless:rbdstorm";
const CLUSTER: &str = "rbdstorm";
const MIB: usize = 1 << 20;
const IMAGE_SIZE: usize = 72 * MIB;

fn env(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{k}={v}: not a number"))
        })
        .unwrap_or(d)
}

/// The `s3:` mapping of the golden image in the gateway's bucket.
fn s3(ceph: &Ceph) -> String {
    format!(
        "s3: {{endpoint: \"{}\", bucket: golden, prefix: diskless, image: golden, version: v1, credentials_file: s3.cred, timeout_secs: 5, retries: 2}}",
        ceph.endpoint()
    )
}

/// The `images:` entries: the golden image in the bucket (`golden`: the overlays' image) and
/// the same bytes as the parent snapshot of the RBD clones (`golden-rbd`).
fn images(ceph: &Ceph) -> String {
    let s3 = s3(ceph);
    format!("  - name: golden\n    {s3}\n  - name: golden-rbd\n    {s3}\n    rbd: {{parent: golden@v1}}\n")
}

/// What one storm cost.
struct Figures {
    wall: Duration,
    node_cpu: Duration,
    ceph_cpu: Vec<(&'static str, Duration)>,
    boot_median: Duration,
    boot_max: Duration,
    s3_gets: u64,
    /// The node's resident memory before and after the storm, KiB.
    rss: (u64, u64),
}

impl Figures {
    fn ceph_total(&self) -> Duration {
        self.ceph_cpu.iter().map(|c| c.1).sum()
    }
}

fn s3_gets(node: &Node) -> u64 {
    node.metric("diskless_s3_chunk_fetches_total{version=\"golden/diskless/golden/v1\"}")
}

/// CPU the node and Ceph's OSD use over `secs` seconds with nothing to do (clients logged
/// out; RBD disks stay open on the node): per second, (node, OSD).
fn idle_cpu(node: &Node, ceph: &Ceph, secs: u64) -> (Duration, Duration) {
    let osd = |c: &Ceph| {
        c.daemon_cpu()
            .into_iter()
            .find(|d| d.0 == "osd")
            .map(|d| d.1)
            .unwrap_or_default()
    };
    let (n0, o0) = (node.cpu(), osd(ceph));
    // A benchmark's measuring window, not a wait for a condition.
    std::thread::sleep(Duration::from_secs(secs));
    (
        (node.cpu() - n0) / secs as u32,
        osd(ceph).saturating_sub(o0) / secs as u32,
    )
}

/// One storm: `clients` clients named `iqn.2026-12.bench:KIND-I` boot at once.
#[allow(clippy::too_many_arguments)]
fn storm(
    node: &Node,
    ceph: &Ceph,
    kind: &str,
    clients: usize,
    trace: &Arc<Vec<(u64, u32)>>,
    writes: &Arc<Vec<u64>>,
    golden: &Arc<Vec<u8>>,
) -> Figures {
    let start = Arc::new(Barrier::new(clients + 1));
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let who = format!("iqn.2026-12.bench:{kind}-{i:03}");
            let (start, trace, writes, golden) =
                (start.clone(), trace.clone(), writes.clone(), golden.clone());
            let port = node.iscsi;
            std::thread::spawn(move || -> Duration {
                start.wait();
                let t = Instant::now();
                let mut c = Client::connect(port);
                c.login(&who, TARGET)
                    .unwrap_or_else(|e| panic!("login of {who} refused: {e:?}"));
                for &(lba, n) in trace.iter() {
                    let got = c
                        .try_read16(lba, n)
                        .unwrap_or_else(|e| panic!("{who}: READ at {lba}: {e}"));
                    let a = lba as usize * 512;
                    assert!(
                        got[..] == golden[a..a + n as usize * 512],
                        "{who}: READ at LBA {lba} ({n} blocks) returned other bytes than the golden image"
                    );
                }
                for &lba in writes.iter() {
                    let a = lba as usize * 512;
                    let r = c.run(
                        &raw::write10_cdb(lba as u32, 8),
                        4096,
                        Some(&golden[a..a + 4096]),
                    );
                    assert_eq!(r.status, 0, "{who}: WRITE at {lba}: {r:?}");
                }
                c.sync();
                c.logout();
                t.elapsed()
            })
        })
        .collect();
    let rss0 = node.rss_kib();
    let cpu0 = node.cpu();
    let ceph0 = ceph.daemon_cpu();
    let gets0 = s3_gets(node);
    let t0 = Instant::now();
    start.wait();
    let mut boots: Vec<Duration> = handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            h.join()
                .unwrap_or_else(|_| panic!("{kind} client {i} failed (see its panic above)"))
        })
        .collect();
    let wall = t0.elapsed();
    boots.sort();
    let ceph_cpu = ceph
        .daemon_cpu()
        .into_iter()
        .zip(ceph0)
        .map(|((name, b), (_, a))| (name, b.saturating_sub(a)))
        .collect();
    Figures {
        wall,
        node_cpu: node.cpu() - cpu0,
        ceph_cpu,
        boot_median: boots[boots.len() / 2],
        boot_max: boots[boots.len() - 1],
        s3_gets: s3_gets(node) - gets0,
        rss: (rss0, node.rss_kib()),
    }
}

#[test]
#[ignore = "a benchmark: run by scripts/bench/rbdstorm.sh"]
fn bench_rbd_storm() {
    common::require("rbd", "ceph-common");
    let clients = env("DISKLESS_BENCH_CLIENTS", 20);
    let rounds = env("DISKLESS_BENCH_ROUNDS", 3);
    let n_writes = env("DISKLESS_BENCH_WRITES", 32);
    assert!(clients >= 1 && rounds >= 1);
    let trace = Arc::new(cluster::boot_trace());

    // The golden image: random where the trace reads, zeros elsewhere.
    let mut data = vec![0u8; IMAGE_SIZE];
    let noise = common::random_bytes(IMAGE_SIZE, 31);
    for &(lba, n) in trace.iter() {
        let a = lba as usize * 512;
        let b = a + n as usize * 512;
        data[a..b].copy_from_slice(&noise[a..b]);
    }
    drop(noise);
    let golden = Arc::new(data);
    // The writes: 8 blocks at the start of evenly spaced reads of the trace (sorted by LBA).
    let mut starts: Vec<u64> = trace.iter().filter(|r| r.1 >= 8).map(|r| r.0).collect();
    starts.sort_unstable();
    starts.dedup();
    let writes: Arc<Vec<u64>> = Arc::new(
        (0..n_writes.min(starts.len()))
            .map(|k| starts[k * starts.len() / n_writes.min(starts.len()).max(1)])
            .collect(),
    );
    let rbd_objects: std::collections::BTreeSet<u64> =
        writes.iter().map(|l| l * 512 / (4 * MIB as u64)).collect();

    let ceph = Ceph::start();
    ceph.create_bucket("golden");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let raw_file = root.join("golden.raw");
    std::fs::write(&raw_file, &golden[..]).unwrap();
    ceph::write_credentials(root);
    let golden_entry = format!("  - name: golden\n    {}\n", s3(&ceph));
    cluster::push_golden(root, &raw_file, &golden_entry, TARGET);
    ceph.rbd_parent(&raw_file, "golden");
    std::fs::remove_file(&raw_file).unwrap();

    let etcd = Etcd::start(root);
    let spec = cluster::Spec {
        cluster: CLUSTER,
        target: TARGET,
        etcd: etcd.endpoint(),
        ttl: 10,
        images: images(&ceph),
        image: "golden",
        extra: format!(
            "chunk_cache: {{memory: 128MiB, disk: 128MiB}}\nrbd: {{pool: rbd, id: admin, conf: {}}}\n",
            ceph.conf().display()
        ),
        cluster_extra: String::new(),
    };
    let boot = [
        "      bindings:",
        "        - {initiator: \"iqn.2026-12.bench:rbd-*\", image: golden-rbd, mode: persistent}",
        "        - {initiator: \"iqn.2026-12.bench:overlay-*\", image: golden, mode: persistent}",
        "      default: {image: golden, mode: volatile}",
        "",
    ]
    .join("\n");
    std::fs::create_dir_all(root.join("n1")).unwrap();
    ceph::write_credentials(&root.join("n1"));
    let node = Node::start_custom(root, "n1", &spec, &boot, "127.0.0.1");
    cluster::wait_for_views([&node], Duration::from_secs(30));

    let mib = trace.iter().map(|r| r.1 as f64 * 512.0).sum::<f64>() / MIB as f64;
    eprintln!(
        "measured: setup: {clients} clients per storm, {} reads ({mib:.1} MiB) + {} writes of 4 KiB (in {} RBD objects of 4 MiB) + SYNCHRONIZE CACHE each, {rounds} round(s), server {}",
        trace.len(),
        writes.len(),
        rbd_objects.len(),
        std::env::var("DISKLESS_TEST_BIN").unwrap_or_else(|_| "debug build".into())
    );
    let idle0 = idle_cpu(&node, &ceph, 5);
    let mut rows = Vec::new();
    for round in 1..=rounds {
        let order: [&str; 2] = if round % 2 == 1 {
            ["overlay", "rbd"]
        } else {
            ["rbd", "overlay"]
        };
        let mut got: Vec<(&str, Figures)> = Vec::new();
        for kind in order {
            let f = storm(&node, &ceph, kind, clients, &trace, &writes, &golden);
            let ceph_text: Vec<String> = f
                .ceph_cpu
                .iter()
                .map(|(n, c)| format!("{n} {:.2} s", c.as_secs_f64()))
                .collect();
            eprintln!(
                "measured: round {round} ({}) {kind:7}: storm {:.2} s ({:.0} MiB/s read), node CPU {:.2} s, Ceph CPU {:.2} s ({}), Ceph share {:.0} %, per boot {:.0} ms node + {:.0} ms Ceph CPU, boot median {:.2} s max {:.2} s, S3 GETs {}, node RSS {} -> {} KiB, RBD disks opened so far {}",
                if round == 1 { "first boots" } else { "reboots" },
                f.wall.as_secs_f64(),
                clients as f64 * mib / f.wall.as_secs_f64(),
                f.node_cpu.as_secs_f64(),
                f.ceph_total().as_secs_f64(),
                ceph_text.join(", "),
                100.0 * f.ceph_total().as_secs_f64()
                    / (f.ceph_total() + f.node_cpu).as_secs_f64().max(1e-9),
                1000.0 * f.node_cpu.as_secs_f64() / clients as f64,
                1000.0 * f.ceph_total().as_secs_f64() / clients as f64,
                f.boot_median.as_secs_f64(),
                f.boot_max.as_secs_f64(),
                f.s3_gets,
                f.rss.0,
                f.rss.1,
                node.stderr()
                    .matches("client disk in RBD opened and locked by this node")
                    .count(),
            );
            got.push((kind, f));
        }
        let get = |k: &str| &got.iter().find(|g| g.0 == k).expect("both kinds ran").1;
        let (r, o) = (get("rbd"), get("overlay"));
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
        rows.push(format!(
            "measured: round {round}: rbd/overlay: storm {:.2}x, node CPU {:.2}x, node + Ceph CPU {:.2}x, boot median {:.2}x",
            ratio(r.wall, o.wall),
            ratio(r.node_cpu, o.node_cpu),
            ratio(r.node_cpu + r.ceph_total(), o.node_cpu + o.ceph_total()),
            ratio(r.boot_median, o.boot_median),
        ));
    }
    for r in rows {
        eprintln!("{r}");
    }
    let idle1 = idle_cpu(&node, &ceph, 5);
    eprintln!(
        "measured: idle CPU per second (node, OSD): before the storms (no RBD disk open) {:?}, {:?}; after them ({clients} RBD disks open, every client logged out) {:?}, {:?}",
        idle0.0, idle0.1, idle1.0, idle1.1
    );
    eprintln!(
        "measured: node RSS after the storms {} KiB; rbd du (one clone, the parent): {}",
        node.rss_kib(),
        ceph.tool("rbd", &["du", "-p", "rbd"])
            .stdout
            .lines()
            .filter(|l| l.contains("bench_rbd-000") || l.starts_with("golden"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join(" | ")
    );
}
