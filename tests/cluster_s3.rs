//! Three diskless nodes placed through a real etcd whose golden image lives only in S3 (a
//! real Ceph RADOS gateway), under a boot storm (issue 13, docs/scale-out.md):
//!
//! - the image is pushed with `diskless image push`; no node has it on disk;
//! - N raw initiators fetch their boot script from one node, are spread over the three, and
//!   replay the recorded boot read trace (tests/fixtures/boot-trace.txt), checking every byte;
//! - with every session half way through its trace, one node is killed with SIGKILL; its
//!   clients see their connection drop, fetch their script again (re-placed on the others once
//!   the dead node's lease has run out), log in there and replay the trace from the start;
//!   every other client finishes without a single error;
//! - each node's `diskless_s3_chunk_fetches_total` (one per S3 GET of a chunk object that
//!   succeeded, src/storage/s3.rs) equals the number of distinct chunks the trace touches: the
//!   trace needs every one of them, so each chunk was fetched from S3 exactly once per node,
//!   however many clients read it at once.
//!
//! Waits are for conditions (a lease gone, a barrier reached), never fixed sleeps.

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
use etcd::Etcd;
use raw::Client;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-12.org.diskless:s3storm";
const CLUSTER: &str = "s3";
const TTL: u64 = 2;
const WAIT: Duration = Duration::from_secs(30);
const MIB: usize = 1 << 20;
/// Chunk size of the push: 1 MiB (the default is larger; small chunks make the count telling).
const CHUNK: usize = MIB;
const IMAGE_SIZE: usize = 72 * MIB;
/// Raw clients in the storm of the test (20 per node).
const CLIENTS: usize = 60;

/// A node of the test's cluster, serving the golden image from the gateway's bucket through a
/// node-local chunk cache.
fn start_node(root: &Path, id: &str, etcd: &Etcd, ceph: &Ceph) -> Node {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    ceph::write_credentials(&dir);
    let spec = cluster::Spec {
        cluster: CLUSTER,
        target: TARGET,
        etcd: etcd.endpoint(),
        ttl: TTL,
        images: images(ceph),
        image: "golden",
        extra: "chunk_cache: {memory: 128MiB, disk: 128MiB}\n".to_string(),
        cluster_extra: String::new(),
    };
    Node::start(root, id, &spec)
}

/// `diskless_s3_chunk_fetches_total` of the golden image on `node`.
fn fetches(node: &Node) -> u64 {
    node.metric("diskless_s3_chunk_fetches_total{version=\"golden/diskless/golden/v1\"}")
}

/// The `images:` section: the golden image in the gateway's bucket.
fn images(ceph: &Ceph) -> String {
    format!(
        "  - name: golden\n    s3: {{endpoint: \"{}\", bucket: golden, prefix: diskless, version: v1, credentials_file: s3.cred, timeout_secs: 5, retries: 2}}\n",
        ceph.endpoint()
    )
}

fn mac(i: usize) -> String {
    format!("52:54:00:00:02:{i:02x}")
}

/// Replay `reads`, checking every byte against the golden image.
fn replay(c: &mut Client, reads: &[(u64, u32)], golden: &[u8]) -> Result<(), String> {
    for &(lba, n) in reads {
        let got = c.try_read16(lba, n)?;
        let a = lba as usize * 512;
        if got[..] != golden[a..a + n as usize * 512] {
            panic!("READ at LBA {lba} ({n} blocks) returned other bytes than the golden image");
        }
    }
    Ok(())
}

fn login(port: u16, who: &str) -> Client {
    let mut c = Client::connect(port);
    c.login(who, TARGET)
        .unwrap_or_else(|e| panic!("login of {who} on port {port} refused: {e:?}"));
    c
}

/// etcd's own request counters (its `/metrics` on the client port): puts, transactions,
/// ranges (reads), deletes.
fn etcd_counts(etcd: &Etcd) -> [u64; 4] {
    let r = http::request(&etcd.endpoint(), "GET", "/metrics", &[], None);
    assert_eq!(r.status, 200, "etcd /metrics: {}", r.body);
    let get = |name: &str| -> u64 {
        r.body
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("no {name} in etcd's metrics"))
    };
    [
        get("etcd_mvcc_put_total"),
        get("etcd_mvcc_txn_total"),
        get("etcd_mvcc_range_total"),
        get("etcd_mvcc_delete_total"),
    ]
}

fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    http::wait_for(WAIT, what, f)
}

#[test]
fn s3_golden_image_storm_over_three_nodes_survives_a_killed_node() {
    storm(3, CLIENTS, true);
}

/// The same storm for scripts/bench/cluster.sh: `DISKLESS_BENCH_NODES` nodes (default 3),
/// `DISKLESS_BENCH_CLIENTS` clients (default 60), no node killed; prints the figures.
#[test]
#[ignore = "a benchmark: run by scripts/bench/cluster.sh"]
fn bench_storm() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{k}={v}: not a number"))
            })
            .unwrap_or(d)
    };
    storm(
        env("DISKLESS_BENCH_NODES", 3),
        env("DISKLESS_BENCH_CLIENTS", CLIENTS),
        false,
    );
}

/// `clients` raw clients placed over `count` nodes replay the trace; with `kill`, the last
/// node is killed with SIGKILL when every client is half way through.
fn storm(count: usize, clients: usize, kill: bool) {
    assert!(count >= 1 && (!kill || count >= 2));
    let trace = cluster::boot_trace();
    let half = trace.len() / 2;
    let touched = cluster::chunks_touched(&trace, CHUNK);
    let touched_half = cluster::chunks_touched(&trace[..half], CHUNK);

    // The golden image: random where the trace reads, zeros elsewhere (zero chunks are not
    // stored, so every stored chunk is one the trace needs).
    let mut data = vec![0u8; IMAGE_SIZE];
    let noise = common::random_bytes(IMAGE_SIZE, 21);
    for &(lba, n) in &trace {
        let a = lba as usize * 512;
        let b = a + n as usize * 512;
        data[a..b].copy_from_slice(&noise[a..b]);
    }
    drop(noise);
    let golden = Arc::new(data);

    let ceph = Ceph::start();
    ceph.create_bucket("golden");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::write(root.join("golden.raw"), &golden[..]).unwrap();
    ceph::write_credentials(root);
    let push_out = cluster::push_golden(root, &root.join("golden.raw"), &images(&ceph), TARGET);
    assert!(
        push_out.contains(&format!("{} stored", touched.len())),
        "every chunk the trace touches is stored, no other: {push_out}"
    );
    // Only S3 has it now.
    std::fs::remove_file(root.join("golden.raw")).unwrap();

    let etcd = Etcd::start(root);
    let mut nodes: Vec<Node> = (1..=count)
        .map(|i| start_node(root, &format!("n{i}"), &etcd, &ceph))
        .collect();
    let config = nodes[0].dir.join("targets.yaml");
    let nodes_up = || {
        let out = Command::new(env!("CARGO_BIN_EXE_diskless"))
            .args(["cluster", "status", "--json", "-c"])
            .arg(&config)
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(v["nodes"].as_array()?.len())
    };
    wait_for("every node in cluster status", || {
        (nodes_up()? == count).then_some(())
    });
    cluster::wait_for_views(&nodes, WAIT);
    let by_port: BTreeMap<u16, String> = nodes.iter().map(|n| (n.iscsi, n.id.clone())).collect();
    let dead = if kill { nodes[count - 1].iscsi } else { 0 };
    let victim = nodes[count - 1].id.clone();

    let etcd0 = etcd_counts(&etcd);
    let rss0: Vec<u64> = nodes.iter().map(Node::rss_kib).collect();
    // Placement: every script from the first node (one URL in the DHCP answer).
    let placed: Vec<(String, u16)> = (0..clients)
        .map(|i| script(nodes[0].http, &mac(i)))
        .collect();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for (_, p) in &placed {
        *per_node.entry(by_port[p].clone()).or_default() += 1;
    }
    assert_eq!(
        per_node.len(),
        count,
        "spread over every node: {per_node:?}"
    );
    assert!(
        per_node.values().all(|&n| n + 1 >= clients / count),
        "evenly spread: {per_node:?}"
    );
    let cpu0: Vec<Duration> = nodes.iter().map(Node::cpu).collect();

    // The storm: each client logs in and replays the first half of the trace, then all wait
    // at `mid` (while a node is killed), then go on.
    let mid = Arc::new(Barrier::new(clients + 1));
    let go = Arc::new(Barrier::new(clients + 1));
    let first_http = nodes[0].http;
    let t0 = Instant::now();
    let handles: Vec<_> = placed
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, (who, port))| {
            let (golden, trace, mid, go) = (golden.clone(), trace.clone(), mid.clone(), go.clone());
            std::thread::spawn(move || -> (u16, bool, Duration) {
                let mut c = login(port, &who);
                replay(&mut c, &trace[..half], &golden)
                    .unwrap_or_else(|e| panic!("{who} on {port} before the kill: {e}"));
                mid.wait();
                go.wait();
                match replay(&mut c, &trace[half..], &golden) {
                    Ok(()) => (port, false, Duration::ZERO),
                    Err(e) => {
                        assert_eq!(
                            port, dead,
                            "{who} on a live node ({port}) saw an error: {e}"
                        );
                        drop(c);
                        // The client reboots: its script again, from the first node, until
                        // it names a live node (the dead node's lease has run out).
                        let t = Instant::now();
                        let (again, p) = wait_for("re-placement on a live node", || {
                            let (w, p) = script(first_http, &mac(i));
                            (p != dead).then_some((w, p))
                        });
                        assert_eq!(again, who);
                        let mut c = login(p, &who);
                        let replaced = t.elapsed();
                        replay(&mut c, &trace, &golden)
                            .unwrap_or_else(|e| panic!("{who} re-placed on {p}: {e}"));
                        (p, true, replaced)
                    }
                }
            })
        })
        .collect();
    mid.wait();
    let half_time = t0.elapsed();
    let mut victim_figures = String::new();
    if kill {
        // The victim served half a trace to each of its clients: at most one GET per chunk.
        let n = &mut nodes[count - 1];
        let f = fetches(n);
        assert!(
            f <= touched_half.len() as u64,
            "{victim} fetched {f} chunks for {} distinct ones",
            touched_half.len()
        );
        victim_figures = format!(
            "; {victim} killed at {half_time:?} (half way) with {} clients, {f} S3 GETs and {} KiB RSS by then",
            per_node[&victim],
            n.rss_kib()
        );
        n.server.take().expect("victim running").kill9();
    }
    go.wait();
    let mut relogged = 0;
    let mut slowest_move = Duration::ZERO;
    let mut finals: Vec<u16> = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let (port, moved, took) = h
            .join()
            .unwrap_or_else(|_| panic!("client {i} failed (see its panic above)"));
        assert_eq!(
            moved,
            placed[i].1 == dead,
            "client {i}: moved iff its node was killed"
        );
        relogged += usize::from(moved);
        slowest_move = slowest_move.max(took);
        finals.push(port);
    }
    let storm = t0.elapsed();
    let etcd1 = etcd_counts(&etcd);
    if kill {
        assert_eq!(
            relogged, per_node[&victim],
            "every client of the victim re-logged in"
        );
        assert!(finals.iter().all(|&p| p != dead));
        nodes.pop();
    }

    // Each live node fetched each chunk the trace needs exactly once (it needed all of them,
    // and the count is no higher than their number).
    for n in &nodes {
        assert_eq!(
            fetches(n),
            touched.len() as u64,
            "{}: S3 chunk GETs vs distinct chunks the trace touches",
            n.id
        );
    }
    // No split brain: every client is owned by the node it finished on.
    let owners = etcd.owners(CLUSTER);
    for (i, (who, _)) in placed.iter().enumerate() {
        assert_eq!(owners.get(who), Some(&by_port[&finals[i]]), "{who}");
    }
    let per_live: Vec<String> = nodes
        .iter()
        .enumerate()
        .map(|(k, n)| {
            let served = finals.iter().filter(|&&f| f == n.iscsi).count();
            format!(
                "{}: {served} clients, CPU {:?}, RSS {} -> {} KiB, {} S3 GETs",
                n.id,
                n.cpu() - cpu0[k],
                rss0[k],
                n.rss_kib(),
                fetches(n)
            )
        })
        .collect();
    let mib = trace.iter().map(|r| r.1 as f64 * 512.0).sum::<f64>() / MIB as f64;
    eprintln!(
        "measured: {clients} clients x {} reads ({mib:.1} MiB each) over {count} node(s): storm done in {storm:?} ({:.0} MiB/s served){victim_figures}; \
         re-placed {relogged} (slowest re-placement {slowest_move:?}, lease TTL {TTL} s); distinct chunks {}; \
         [{}]; etcd over placement + storm ({} boots): puts {} txns {} ranges {} deletes {}",
        trace.len(),
        (clients + relogged) as f64 * mib / storm.as_secs_f64(),
        touched.len(),
        per_live.join("; "),
        clients + relogged,
        etcd1[0] - etcd0[0],
        etcd1[1] - etcd0[1],
        etcd1[2] - etcd0[2],
        etcd1[3] - etcd0[3],
    );
}
