//! Issue 13 end to end ("What it must show"): three diskless nodes placed through a real etcd,
//! the golden image only in S3 (a real Ceph RADOS gateway), persistent client disks in Ceph
//! RBD, and 60 clients booting at once, among them a real QEMU guest:
//!
//! - a QEMU guest (SeaBIOS + iPXE, TCG) chains its boot script from one node, is placed, and
//!   sanboots the S3 golden image (scripts/boot/build-image.sh's BIOS image, pushed with
//!   `diskless image push`; no node has it on disk) up to the marker its initramfs prints on
//!   the serial console after Linux logged in again from the iBFT and wrote the disk;
//! - raw initiators replay the recorded boot (tests/fixtures/boot-trace.txt) against the same
//!   image, checking every byte; persistent clients (`images[].rbd`: an RBD clone each) write
//!   with FUA or WRITE + SYNCHRONIZE CACHE;
//! - the guest's node is killed with SIGKILL when every other client is half way: its raw
//!   clients re-boot onto the others and replay the whole trace, its persistent clients log in
//!   elsewhere and read back every acknowledged write, and the guest boots again from a
//!   surviving node's script, on a surviving node; the other nodes' clients see no error;
//! - all along, a checker samples each live node's open sessions, `rbd lock ls` of every
//!   persistent disk and etcd's owners, and fails if a client is ever open on two live nodes,
//!   a disk has two lock holders, or a live node holds a disk's lock that etcd says another
//!   node (or nobody) owns.
//!
//! The nodes advertise `10.0.2.2:PORT`, the host as a QEMU guest on user networking reaches it
//! (its connections arrive on 127.0.0.1:PORT); the raw initiators on the host read only the
//! port from their scripts. Feature `rbd`: run by the rbd stage of scripts/test.sh
//! (`cargo test --features rbd --test cluster_e2e`). Waits are for conditions, never sleeps.
#![cfg(feature = "rbd")]

#[path = "common/ceph.rs"]
mod ceph;
#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/guest.rs"]
mod guest;
#[path = "common/http.rs"]
mod http;
#[path = "common/raw.rs"]
mod raw;

use ceph::Ceph;
use cluster::Node;
#[allow(unused_imports)] // common/guest.rs reaches them through `super::`
use common::{boot_cache, repo};
use etcd::Etcd;
use raw::Client;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-12.org.diskless:e2e";
const CLUSTER: &str = "e2e";
const TTL: u64 = 2;
const WAIT: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;
/// Clients in the storm: the QEMU guest, persistent RBD clients, and raw volatile ones.
const CLIENTS: usize = 60;
const PERSISTENT: usize = 6;
const RAW: usize = CLIENTS - PERSISTENT - 1;
const GUEST_MAC: &str = "52:54:00:00:05:01";
/// One guest boot: QEMU is killed after this (run-qemu.sh's --timeout).
const BOOT_TIMEOUT_SECS: u64 = 180;
/// Persistent clients write 8-block extents from here (past the trace's reads: 129026).
const WRITE_BASE: u64 = 129_100;
/// Writes per persistent client before the kill, and after it.
const WRITES: usize = 6;

fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    http::wait_for(WAIT, what, f)
}

/// The golden image in the gateway's bucket (`golden`), and the same bytes as the parent of
/// the persistent clients' RBD clones (`golden-rbd`).
fn images(ceph: &Ceph) -> String {
    let s3 = s3_image(ceph);
    format!(
        "{s3}  - name: golden-rbd\n    {}    rbd: {{parent: golden@v1}}\n",
        &s3["  - name: golden\n    ".len()..]
    )
}

/// The `images:` entry of the golden image in the gateway's bucket.
fn s3_image(ceph: &Ceph) -> String {
    let s3 = format!(
        "s3: {{endpoint: \"{}\", bucket: golden, prefix: diskless, image: golden, version: v1, credentials_file: s3.cred, timeout_secs: 5, retries: 2}}",
        ceph.endpoint()
    );
    format!("  - name: golden\n    {s3}\n")
}

/// The initiator name the boot script endpoint derives from a MAC (src/boot/mod.rs).
fn initiator_of(mac: &str) -> String {
    format!("iqn.2026-11.org.diskless:mac-{}", mac.replace(':', ""))
}

fn raw_mac(i: usize) -> String {
    format!("52:54:00:00:03:{i:02x}")
}

fn persistent_mac(i: usize) -> String {
    format!("52:54:00:00:04:{i:02x}")
}

/// The boot script for `mac` from the node whose boot HTTP port is `http`: (initiator, iSCSI
/// port it names), or None when it names no portal (a retry script).
fn try_script(http: u16, mac: &str) -> Option<(String, u16)> {
    let r = http::request(
        &format!("http://127.0.0.1:{http}/"),
        "GET",
        &format!("/boot.ipxe?mac={mac}"),
        &[],
        None,
    );
    if r.status != 200 {
        return None;
    }
    let who = r
        .body
        .lines()
        .find_map(|l| l.strip_prefix("set initiator-iqn "))?
        .to_string();
    // sanboot iscsi:10.0.2.2::PORT:LUN:TARGET
    let port = r
        .body
        .lines()
        .find_map(|l| l.strip_prefix("sanboot iscsi:10.0.2.2::"))
        .and_then(|rest| rest.split(':').next())
        .and_then(|p| p.parse().ok())?;
    Some((who, port))
}

fn script(http: u16, mac: &str) -> (String, u16) {
    try_script(http, mac).unwrap_or_else(|| panic!("no placement in the script for {mac}"))
}

fn login(port: u16, who: &str) -> Client {
    let mut c = Client::connect(port);
    c.login(who, TARGET)
        .unwrap_or_else(|e| panic!("login of {who} on port {port} refused: {e:?}"));
    c
}

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

/// One acknowledged write of a persistent client: even ones as WRITE(10) with FUA (SBC-3
/// §5.40), odd ones as WRITE(10) then SYNCHRONIZE CACHE(10) (§5.22). Panics unless GOOD.
fn write_acked(c: &mut Client, who: &str, lba: u64, data: &[u8], fua: bool) {
    let mut cdb = raw::write10_cdb(lba as u32, (data.len() / 512) as u16);
    if fua {
        cdb[1] |= 0x08;
    }
    let r = c.run(&cdb, data.len() as u32, Some(data));
    assert_eq!(r.status, 0, "{who}: WRITE at {lba} (fua {fua}): {r:?}");
    if !fua {
        let r = c.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None);
        assert_eq!(r.status, 0, "{who}: SYNCHRONIZE CACHE: {r:?}");
    }
}

/// The k-th write of persistent client `i`: (LBA, 8 blocks of data).
fn pwrite(i: usize, k: usize) -> (u64, Vec<u8>) {
    let lba = WRITE_BASE + (i * 2 * WRITES + k) as u64 * 8;
    (
        lba,
        common::random_bytes(8 * 512, 1000 + (i * 100 + k) as u64),
    )
}

/// Every acknowledged write of client `i` so far (the first `done`) reads back.
fn check_writes(c: &mut Client, who: &str, i: usize, done: usize) -> Result<(), String> {
    for k in 0..done {
        let (lba, data) = pwrite(i, k);
        let got = c.try_read16(lba, 8)?;
        assert!(
            got == data,
            "{who}: acknowledged write {k} at LBA {lba} did not read back"
        );
    }
    Ok(())
}

/// What the checker knows of a node without borrowing it.
#[derive(Clone)]
struct NodeView {
    id: String,
    control: PathBuf,
    stderr: PathBuf,
}

/// Initiators with a Normal session open on a node (`diskless sessions`), None if it did not
/// answer.
fn sessions(control: &Path) -> Option<Vec<String>> {
    let out = Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(["sessions", "--control"])
        .arg(control)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| cluster::session_initiators(&String::from_utf8_lossy(&out.stdout)))
}

/// RADOS client (`client.N`) → node id, from every node's log line
/// `client disk in RBD opened and locked by this node` (`disk=POOL/NAME rados_client=...`).
fn rados_clients(nodes: &[NodeView], disk: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let needle = format!("disk={disk} ");
    for n in nodes {
        let log = std::fs::read_to_string(&n.stderr).unwrap_or_default();
        for l in log.lines() {
            if !(l.contains("opened and locked by this node") && l.contains(&needle)) {
                continue;
            }
            if let Some(i) = l.find("rados_client=") {
                let tail = &l[i + "rados_client=".len()..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
                    .unwrap_or(tail.len());
                m.insert(tail[..end].to_string(), n.id.clone());
            }
        }
    }
    m
}

/// The RADOS clients holding the lock of `rbd/NAME`.
fn lockers(conf: &Path, name: &str) -> Option<Vec<String>> {
    let out = common::run(
        "rbd",
        &[
            "-c",
            conf.to_str().expect("utf-8 path"),
            "lock",
            "ls",
            &format!("rbd/{name}"),
        ],
    );
    out.success().then(|| {
        out.stdout
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|w| w.starts_with("client."))
            .map(str::to_string)
            .collect()
    })
}

/// What the checker saw.
#[derive(Default, Debug)]
struct Checked {
    rounds: usize,
    rounds_after_kill: usize,
    violations: Vec<String>,
    lock_samples: usize,
}

/// Sample sessions, RBD lock holders and etcd owners until `stop`; see the file's comment.
fn checker(
    nodes: &[NodeView],
    alive: &[AtomicBool],
    killed: &AtomicBool,
    conf: &Path,
    etcd: &Etcd,
    disks: &[(String, String)],
    stop: &AtomicBool,
) -> Checked {
    let mut c = Checked::default();
    let mut unknown_since: BTreeMap<String, Instant> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
        // 1. No client open on two live nodes.
        let mut open: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, n) in nodes.iter().enumerate() {
            if !alive[k].load(Ordering::SeqCst) {
                continue;
            }
            match sessions(&n.control) {
                Some(list) => {
                    for who in list.into_iter().collect::<BTreeSet<_>>() {
                        open.entry(who).or_default().push(n.id.clone());
                    }
                }
                None if alive[k].load(Ordering::SeqCst) => c
                    .violations
                    .push(format!("{} (alive) did not list its sessions", n.id)),
                None => {}
            }
        }
        for (who, on) in &open {
            if on.len() > 1 {
                c.violations
                    .push(format!("{who} has sessions open on {on:?} at once"));
            }
        }
        // 2. One lock holder per disk, and a live holder is the disk's owner in etcd.
        for (who, disk) in disks {
            let Some(held) = lockers(conf, disk) else {
                continue; // not created yet
            };
            c.lock_samples += 1;
            if held.len() > 1 {
                c.violations
                    .push(format!("{disk} has several lock holders: {held:?}"));
            }
            let Some(holder) = held.first() else { continue };
            // The owner as etcd has it now (read after the lock); an etcdctl that timed out on
            // a loaded machine skips this sample rather than failing the test.
            let key = format!("/diskless/{CLUSTER}/owners/{who}");
            let Some(out) = etcd.ctl_out(&["get", "--print-value-only", &key]) else {
                continue;
            };
            let owner = Some(out.trim().to_string()).filter(|o| !o.is_empty());
            let map = rados_clients(nodes, &format!("rbd/{disk}"));
            match map.get(holder) {
                Some(node) => {
                    unknown_since.remove(holder);
                    let k = nodes.iter().position(|n| &n.id == node).expect("a node");
                    if alive[k].load(Ordering::SeqCst) && owner.as_deref() != Some(node) {
                        c.violations.push(format!(
                            "{disk} is locked by live node {node} ({holder}) but etcd says {owner:?} owns {who}"
                        ));
                    }
                }
                None => {
                    // Locked, not logged yet: fine for a moment, never for long.
                    let t = *unknown_since
                        .entry(holder.clone())
                        .or_insert_with(Instant::now);
                    if t.elapsed() > Duration::from_secs(10) {
                        c.violations.push(format!(
                            "{disk} is locked by {holder}, which no node logged"
                        ));
                    }
                }
            }
        }
        c.rounds += 1;
        if killed.load(Ordering::SeqCst) {
            c.rounds_after_kill += 1;
        }
    }
    c
}

/// A QEMU guest (BIOS) whose iPXE chains `http://10.0.2.2:HTTP/boot.ipxe?mac=...`: (run-qemu.sh
/// succeeded, its output, the cleaned serial log).
fn boot_guest(dir: &Path, http: u16, log: &Path) -> (bool, String, String) {
    let url = format!("http://10.0.2.2:{http}/boot.ipxe?mac=${{net0/mac}}&platform=${{platform}}");
    run_guest(dir, &["--chain", &url], log)
}

/// A QEMU guest (BIOS) whose iPXE runs `sanboot iscsi:10.0.2.2::PORT:0:TARGET` itself, as the
/// guest's initiator: pointed at one node, whatever the placement says.
fn boot_guest_at(dir: &Path, port: u16, log: &Path) -> (bool, String, String) {
    let (port, who) = (port.to_string(), initiator_of(GUEST_MAC));
    run_guest(
        dir,
        &["--port", &port, "--target", TARGET, "--initiator", &who],
        log,
    )
}

fn run_guest(dir: &Path, how: &[&str], log: &Path) -> (bool, String, String) {
    let (ok, out) = guest::run_limited(
        Command::new("bash")
            .arg(repo().join("scripts/boot/run-qemu.sh"))
            .args(["--mode", "bios", "--mac", GUEST_MAC])
            .args(how)
            .args(["--timeout", &BOOT_TIMEOUT_SECS.to_string()])
            .arg("--log")
            .arg(log)
            .env("TMPDIR", dir),
        Duration::from_secs(BOOT_TIMEOUT_SECS + 30),
    );
    let serial = guest::clean(&std::fs::read_to_string(log).unwrap_or_default());
    (ok, out, serial)
}

/// The guest's boot succeeded and showed its markers: it read the disk through iPXE (stage 1),
/// and Linux logged in from the iBFT, read the disk and wrote it.
fn assert_booted(what: &str, r: &(bool, String, String), logs: &str) {
    let (ok, out, serial) = r;
    let report = || {
        format!(
            "{what}:\n--- run-qemu.sh ---\n{out}\n--- serial (tail) ---\n{}\n--- nodes (tail) ---\n{logs}",
            guest::tail(serial, 40)
        )
    };
    assert!(ok, "boot failed: {}", report());
    let who = initiator_of(GUEST_MAC);
    for marker in [
        "DISKLESS-STAGE1".to_string(),
        "DISKLESS-HANDOFF-READ-OK".to_string(),
        "DISKLESS-PREVIOUS none".to_string(),
        format!("DISKLESS-HANDOFF-WRITE-OK {who}"),
    ] {
        assert!(serial.contains(&marker), "no '{marker}': {}", report());
    }
}

fn nodes_tail(nodes: &[NodeView]) -> String {
    nodes
        .iter()
        .map(|n| {
            format!(
                "[{}]\n{}",
                n.id,
                guest::tail(&std::fs::read_to_string(&n.stderr).unwrap_or_default(), 12)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn sixty_clients_with_a_qemu_guest_and_rbd_disks_survive_a_killed_node() {
    common::require("rbd", "ceph-common");
    common::require("qemu-system-x86_64", "qemu-system-x86");
    common::require("/usr/lib/ipxe/qemu/pxe-virtio.rom", "ipxe-qemu");
    let started = Instant::now();
    let trace = cluster::boot_trace();
    let half = trace.len() / 2;
    let touched = cluster::chunks_touched(&trace, MIB);

    // The bootable image (scripts/boot/build-image.sh; cached under target/boot-cache).
    let golden = std::fs::read(guest::images("boot-images").join("bios.img")).expect("bios.img");
    let (lba_max, n) = trace.iter().max().copied().expect("a trace");
    assert!(
        (lba_max + u64::from(n)) * 512 <= golden.len() as u64
            && WRITE_BASE * 512 < golden.len() as u64,
        "the trace and the writes fit in the image"
    );

    let ceph = Ceph::start();
    ceph.create_bucket("golden");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let raw_file = root.join("golden.raw");
    std::fs::write(&raw_file, &golden).unwrap();
    ceph::write_credentials(root);
    let push_out = cluster::push_golden(root, &raw_file, &s3_image(&ceph), TARGET);
    // "..., N stored, ..."
    let stored: u64 = push_out
        .split(", ")
        .find_map(|f| f.strip_suffix(" stored"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'N stored' in {push_out}"));
    // The same bytes in RBD, as the protected snapshot the persistent disks are clones of.
    ceph.rbd_parent(&raw_file, "golden");
    // From here the image exists only in S3 (and as the RBD parent).
    std::fs::remove_file(&raw_file).unwrap();

    let etcd = Etcd::start(root);
    let spec = cluster::Spec {
        cluster: CLUSTER,
        target: TARGET,
        etcd: etcd.endpoint(),
        ttl: TTL,
        images: images(&ceph),
        image: "golden",
        extra: format!(
            "chunk_cache: {{memory: 128MiB, disk: 128MiB}}\nrbd: {{pool: rbd, id: admin, conf: {}}}\n",
            ceph.conf().display()
        ),
        cluster_extra: String::new(),
    };
    let boot = format!(
        "      bindings:\n        - {{initiator: \"{}*\", image: golden-rbd, mode: persistent}}\n      default: {{image: golden, mode: volatile}}\n",
        initiator_of("52:54:00:00:04:")
    );
    let mut nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| {
            std::fs::create_dir_all(root.join(id)).unwrap();
            ceph::write_credentials(&root.join(id));
            Node::start_custom(root, id, &spec, &boot, "10.0.2.2")
        })
        .collect();
    cluster::wait_for_views(nodes.iter(), WAIT);
    let views: Vec<NodeView> = nodes
        .iter()
        .map(|n| NodeView {
            id: n.id.clone(),
            control: n.dir.join("state/control.sock"),
            stderr: n.dir.join("server.stderr"),
        })
        .collect();
    let setup = started.elapsed();
    eprintln!("measured: Ceph (RGW, RBD), image pushed, etcd and 3 nodes up in {setup:?}");

    let guest_who = initiator_of(GUEST_MAC);
    let persistent_who: Vec<String> = (0..PERSISTENT)
        .map(|i| initiator_of(&persistent_mac(i)))
        .collect();
    let disks: Vec<(String, String)> = persistent_who
        .iter()
        .map(|w| {
            (
                w.clone(),
                diskless::storage::rbd::client_image_name("diskless", TARGET, w),
            )
        })
        .collect();
    let alive: Vec<AtomicBool> = (0..3).map(|_| AtomicBool::new(true)).collect();
    let (killed, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    let mid = Barrier::new(RAW + PERSISTENT + 1);
    let go = Barrier::new(RAW + PERSISTENT + 1);
    let dead_port = Mutex::new(0u16);
    let script_http = Mutex::new(0u16);
    let moved = AtomicUsize::new(0);
    let serial1 = root.join("serial-1.log");
    let serial2 = root.join("serial-2.log");

    std::thread::scope(|s| {
        let checker =
            s.spawn(|| checker(&views, &alive, &killed, ceph.conf(), &etcd, &disks, &stop));

        // The guest boots first; its script comes from n1, which places it.
        let t_guest = Instant::now();
        let first_http = nodes[0].http;
        let serial1 = &serial1;
        let guest1 = s.spawn(move || boot_guest(root, first_http, serial1));
        let victim = wait_for("the guest's script fetch (its placement in etcd)", || {
            let owner = etcd.owners(CLUSTER).get(&guest_who).cloned()?;
            nodes.iter().position(|n| n.id == owner)
        });
        let other = (victim + 1) % 3;
        *dead_port.lock().unwrap() = nodes[victim].iscsi;
        *script_http.lock().unwrap() = nodes[other].http;
        let by_port: BTreeMap<u16, usize> = nodes
            .iter()
            .enumerate()
            .map(|(k, n)| (n.iscsi, k))
            .collect();
        eprintln!(
            "measured: the guest fetched its script {:?} after power-on, placed on {}",
            t_guest.elapsed(),
            nodes[victim].id
        );

        // Every other client's script from one surviving node (one URL in the DHCP answer).
        let http = nodes[other].http;
        let raw_placed: Vec<(String, u16)> = (0..RAW).map(|i| script(http, &raw_mac(i))).collect();
        let p_placed: Vec<(String, u16)> = (0..PERSISTENT)
            .map(|i| script(http, &persistent_mac(i)))
            .collect();
        let mut per_node = [0usize; 3];
        per_node[victim] += 1;
        for (_, p) in raw_placed.iter().chain(&p_placed) {
            per_node[by_port[p]] += 1;
        }
        assert!(
            per_node.iter().all(|&n| n + 1 >= CLIENTS / 3),
            "60 clients spread evenly: {per_node:?}"
        );
        assert!(
            p_placed.iter().any(|(_, p)| by_port[p] == victim),
            "a persistent client on the node to be killed: {p_placed:?}"
        );

        let golden = &golden;
        let (trace, mid, go, dead_port, script_http, moved) =
            (&trace, &mid, &go, &dead_port, &script_http, &moved);
        // Re-placement after the kill: the script again, from a surviving node, until it
        // names a live node (the dead node's lease has run out).
        let replace = move |mac: &str, who: &str| -> (u16, Duration) {
            let (dead, http) = (*dead_port.lock().unwrap(), *script_http.lock().unwrap());
            let t = Instant::now();
            let (again, p) = wait_for("re-placement on a live node", || {
                try_script(http, mac).filter(|&(_, p)| p != dead)
            });
            assert_eq!(again, who);
            (p, t.elapsed())
        };
        let raw_threads: Vec<_> = raw_placed
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, (who, port))| {
                s.spawn(move || -> (u16, bool) {
                    let mut c = login(port, &who);
                    replay(&mut c, &trace[..half], golden)
                        .unwrap_or_else(|e| panic!("{who} on {port} before the kill: {e}"));
                    mid.wait();
                    go.wait();
                    match replay(&mut c, &trace[half..], golden) {
                        Ok(()) => (port, false),
                        Err(e) => {
                            assert_eq!(
                                port,
                                *dead_port.lock().unwrap(),
                                "{who} on a live node saw: {e}"
                            );
                            drop(c);
                            let (p, _) = replace(&raw_mac(i), &who);
                            let mut c = login(p, &who);
                            replay(&mut c, trace, golden)
                                .unwrap_or_else(|e| panic!("{who} re-placed on {p}: {e}"));
                            moved.fetch_add(1, Ordering::SeqCst);
                            (p, true)
                        }
                    }
                })
            })
            .collect();
        let p_threads: Vec<_> = p_placed
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, (who, port))| {
                s.spawn(move || -> (u16, bool, Duration) {
                    let mut c = login(port, &who);
                    // A new clone reads as the golden image.
                    let head = c.try_read16(0, 16).expect("read the new disk");
                    assert!(
                        head[..] == golden[..16 * 512],
                        "{who}: a new disk is the golden image"
                    );
                    for k in 0..WRITES {
                        let (lba, data) = pwrite(i, k);
                        write_acked(&mut c, &who, lba, &data, k % 2 == 0);
                    }
                    mid.wait();
                    go.wait();
                    let (mut c, port, moved_, took) = match check_writes(&mut c, &who, i, WRITES) {
                        Ok(()) => (c, port, false, Duration::ZERO),
                        Err(e) => {
                            assert_eq!(
                                port,
                                *dead_port.lock().unwrap(),
                                "{who} on a live node saw: {e}"
                            );
                            drop(c);
                            let t = Instant::now();
                            let (p, _) = replace(&persistent_mac(i), &who);
                            let mut c = login(p, &who);
                            // Every write acknowledged on the dead node is there.
                            check_writes(&mut c, &who, i, WRITES)
                                .unwrap_or_else(|e| panic!("{who} re-placed on {p}: {e}"));
                            (c, p, true, t.elapsed())
                        }
                    };
                    for k in WRITES..2 * WRITES {
                        let (lba, data) = pwrite(i, k);
                        write_acked(&mut c, &who, lba, &data, k % 2 == 0);
                    }
                    check_writes(&mut c, &who, i, 2 * WRITES)
                        .unwrap_or_else(|e| panic!("{who} on {port} after the kill: {e}"));
                    let head = c.try_read16(0, 16).expect("read the disk");
                    assert!(
                        head[..] == golden[..16 * 512],
                        "{who}: unwritten blocks are the golden image's"
                    );
                    (port, moved_, took)
                })
            })
            .collect();

        // Every raw and persistent client is half way; the guest has booted on the node to be
        // killed (its OS ran: it logged in from the iBFT and wrote its disk).
        mid.wait();
        let r1 = guest1.join().expect("guest thread");
        assert_booted("first boot", &r1, &nodes_tail(&views));
        let boot1 = t_guest.elapsed();
        let victim_fetches = nodes[victim]
            .metric("diskless_s3_chunk_fetches_total{version=\"golden/diskless/golden/v1\"}");
        // The storm's midpoint: SIGKILL the guest's node.
        alive[victim].store(false, Ordering::SeqCst);
        killed.store(true, Ordering::SeqCst);
        let t_kill = Instant::now();
        nodes[victim].server.take().expect("victim running").kill9();
        go.wait();

        // The guest is reset and boots again once its node's lease ran out (until then its
        // script names the dead node, as for any client). Its script, fetched from a
        // surviving node, places it on a surviving node A; its firmware is then pointed
        // straight at the other surviving node B (a stale DHCP answer, a hard-wired sanboot):
        // B answers the login with 0x0101 and TargetAddress=10.0.2.2:A, iPXE follows it and
        // boots from A, and Linux logs in from the iBFT (which names A).
        wait_for("the dead node's clients free in etcd", || {
            (!etcd.owners(CLUSTER).contains_key(&guest_who)).then_some(())
        });
        let freed = t_kill.elapsed();
        let (again, a_port) = script(nodes[other].http, GUEST_MAC);
        assert_eq!(again, guest_who);
        let a = by_port[&a_port];
        assert_ne!(a, victim, "the guest is placed on a surviving node");
        let b = (0..3)
            .find(|&k| k != victim && k != a)
            .expect("two surviving nodes");
        let t2 = Instant::now();
        let r2 = boot_guest_at(root, nodes[b].iscsi, &serial2);
        assert_booted(
            "second boot (after the kill, redirected)",
            &r2,
            &nodes_tail(&views),
        );
        let boot2 = t2.elapsed();
        let redirected = nodes[b]
            .stderr()
            .lines()
            .filter(|l| {
                l.contains("login redirected to the client's node")
                    && l.contains(&guest_who)
                    && l.contains(&format!("10.0.2.2:{a_port}"))
            })
            .count();
        assert!(
            redirected >= 1,
            "{} redirected the guest's login to {}: {}",
            nodes[b].id,
            nodes[a].id,
            nodes_tail(&views)
        );
        let guest_owner = etcd.owners(CLUSTER).get(&guest_who).cloned();
        assert_eq!(
            guest_owner.as_deref(),
            Some(nodes[a].id.as_str()),
            "the guest's second boot is on the node it was placed on"
        );
        let guest_node = format!(
            "{} (its firmware sent to {}, {redirected} login(s) redirected)",
            nodes[a].id, nodes[b].id
        );

        let raw_final: Vec<(u16, bool)> = raw_threads
            .into_iter()
            .map(|h| h.join().expect("a raw client failed (see its panic above)"))
            .collect();
        let p_final: Vec<(u16, bool, Duration)> = p_threads
            .into_iter()
            .map(|h| {
                h.join()
                    .expect("a persistent client failed (see its panic above)")
            })
            .collect();
        stop.store(true, Ordering::SeqCst);
        let checked = checker.join().expect("checker");

        // Moved iff its node was killed; nobody else noticed.
        let dead = nodes[victim].iscsi;
        for (i, (port, m)) in raw_final.iter().enumerate() {
            assert_eq!(
                *m,
                raw_placed[i].1 == dead,
                "raw client {i}: moved iff on the killed node"
            );
            assert_ne!(*port, dead);
        }
        for (i, (port, m, _)) in p_final.iter().enumerate() {
            assert_eq!(
                *m,
                p_placed[i].1 == dead,
                "persistent client {i}: moved iff on the killed node"
            );
            assert_ne!(*port, dead);
        }
        // Every client is owned in etcd by the node it finished on.
        let owners = etcd.owners(CLUSTER);
        for ((who, _), (port, _)) in raw_placed.iter().zip(&raw_final) {
            assert_eq!(owners.get(who), Some(&nodes[by_port[port]].id), "{who}");
        }
        for ((who, _), (port, _, _)) in p_placed.iter().zip(&p_final) {
            assert_eq!(owners.get(who), Some(&nodes[by_port[port]].id), "{who}");
        }
        // The checker ran all along and saw no split brain.
        assert!(
            checked.violations.is_empty(),
            "split brain seen by the checker: {:#?}",
            checked.violations
        );
        assert!(
            checked.rounds >= 5 && checked.rounds_after_kill >= 2 && checked.lock_samples > 0,
            "the checker sampled too little: {checked:?}"
        );
        // Each surviving node fetched at most each stored chunk once, and at least every
        // chunk the trace needs.
        let mut s3 = Vec::new();
        for (k, n) in nodes.iter().enumerate() {
            if k == victim {
                continue;
            }
            let f =
                n.metric("diskless_s3_chunk_fetches_total{version=\"golden/diskless/golden/v1\"}");
            assert!(
                f >= touched.len() as u64 && f <= stored,
                "{}: {f} S3 chunk GETs, the trace needs {}, {stored} stored",
                n.id,
                touched.len()
            );
            s3.push(format!("{} {f}", n.id));
        }
        let moved_p = p_final.iter().filter(|p| p.1).count();
        let slowest = p_final.iter().map(|p| p.2).max().unwrap_or_default();
        eprintln!(
            "measured: {CLIENTS} clients ({RAW} raw, {PERSISTENT} persistent on RBD, 1 QEMU guest) over 3 nodes; \
             guest's first boot {boot1:?} on {} (killed then, {victim_fetches} S3 GETs by then); \
             its clients free in etcd {freed:?} after SIGKILL; {} raw and {moved_p} persistent clients moved \
             (slowest persistent: {slowest:?} from the kill's notice to every acknowledged write read back); \
             guest's second boot {boot2:?} on {}; S3 chunk GETs per surviving node: {} (trace needs {}, {stored} stored); \
             checker: {} rounds ({} after the kill), {} lock samples, no split brain; whole test {:?}",
            nodes[victim].id,
            moved.load(Ordering::SeqCst),
            guest_node,
            s3.join(", "),
            touched.len(),
            checked.rounds,
            checked.rounds_after_kill,
            checked.lock_samples,
            started.elapsed()
        );
    });
}
