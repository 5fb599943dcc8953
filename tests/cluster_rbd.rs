//! Persistent client disks in Ceph RBD, served by a cluster of nodes placed through etcd and
//! fenced by the placement (issue 13; docs/scale-out.md "Ceph RBD client disks"). Cargo
//! feature `rbd`: `cargo test --features rbd --test cluster_rbd`. Real Ceph (one monitor, one
//! in-memory OSD: tests/common/ceph.rs) and a real etcd, three nodes on 127.0.0.1:
//!
//! 1. A persistent client writes, acknowledged by SYNCHRONIZE CACHE and by a FUA write; its
//!    node is killed with SIGKILL; the client boots again onto another node, which fences the
//!    dead node's lock, and reads back every acknowledged write.
//! 2. That node is paused with SIGSTOP past its lease; the client boots onto the third node,
//!    which fences it and writes; the paused node continues: its write on its still open
//!    session fails with CHECK CONDITION, and the new owner's data is intact.
//! 3. The third node is killed: the client comes back to the once paused node, which opens
//!    the disk again, fences the dead node and serves every acknowledged write.
//! 4. A new client whose disk cannot be created is refused with status 0x0301, logged.
//! 5. At every step exactly one RADOS client holds the disk's lock (`rbd lock ls`), and it is
//!    the one of the node that etcd names the client's owner.
//! 6. `diskless client reset` (whole, `--lun 1`) of RBD disks: the clone is removed and
//!    created again from its parent snapshot at the client's next login, also on a node that
//!    takes the client over after the resetting node died; the command answers only once
//!    etcd has the mark (and fails, saying so, when etcd is gone); `client show` and
//!    `cluster clients` (one row per LUN) show it pending.
//! 7. `diskless client commit` of a running client's RBD disks, to a file and as a new
//!    image: a copy of an RBD snapshot, taken while the client stays logged in and removed
//!    afterwards; writes after the commit are not in the copy.
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
use std::path::Path;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-12.org.diskless:rbd";
const CLUSTER: &str = "r";
const GOLDEN_SIZE: usize = 8 << 20;
const TTL: u64 = 2;
const WAIT: Duration = Duration::from_secs(40);

fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    http::wait_for(WAIT, what, f)
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a server this test started and has not reaped.
    let r = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig})");
}

/// Runs a closure when dropped (a paused process must not outlive a failed test).
struct Guard<F: FnMut()>(F);

impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Nodes `ids` whose default binding is a persistent LUN 0 on `golden` and a persistent data
/// disk (LUN 1) on `data`, both imported into RBD as the parents of the clients' clones.
fn data_disk_nodes(
    root: &Path,
    ceph: &Ceph,
    etcd: &Etcd,
    golden: &Path,
    data: &Path,
    ids: &[&str],
) -> Vec<Node> {
    ceph.rbd_parent(golden, "golden");
    ceph.rbd_parent(data, "data");
    let spec = rbd_spec(
        ceph,
        etcd,
        format!(
            "  - {{name: golden, path: {}, rbd: {{parent: golden@v1}}}}\n  \
             - {{name: data, path: {}, rbd: {{parent: data@v1}}}}\n",
            golden.display(),
            data.display()
        ),
    );
    let boot = "      default: {image: golden, mode: persistent, disks: [{lun: 1, image: data, mode: persistent}]}\n";
    ids.iter()
        .map(|id| Node::start_custom(root, id, &spec, boot, "127.0.0.1"))
        .collect()
}

/// The nodes' cluster spec: `images` (indented list items; the default binding's is
/// `golden`) and RBD through `ceph`'s configuration as `client.admin`, pool `rbd`.
fn rbd_spec(ceph: &Ceph, etcd: &Etcd, images: String) -> cluster::Spec<'static> {
    cluster::Spec {
        cluster: CLUSTER,
        target: TARGET,
        etcd: etcd.endpoint(),
        ttl: TTL,
        images,
        image: "golden",
        cluster_extra: String::new(),
        extra: format!(
            "rbd: {{pool: rbd, id: admin, conf: {}}}\n",
            ceph.conf().display()
        ),
    }
}

/// The golden image (GOLDEN_SIZE) and the data disk's image (4 MiB) as files in `root`,
/// random bytes from `seed` and `seed + 1`: (golden, its bytes, data, its bytes).
fn image_files(
    root: &Path,
    seed: u64,
) -> (std::path::PathBuf, Vec<u8>, std::path::PathBuf, Vec<u8>) {
    let golden = root.join("golden.img");
    let golden_bytes = common::random_bytes(GOLDEN_SIZE, seed);
    std::fs::write(&golden, &golden_bytes).unwrap();
    let data = root.join("data.img");
    let data_bytes = common::random_bytes(4 << 20, seed + 1);
    std::fs::write(&data, &data_bytes).unwrap();
    (golden, golden_bytes, data, data_bytes)
}

/// SIGKILL node `x` and wait until another node's boot script places client `mac` on a live
/// node (once the dead node's lease ran out). Returns that node's index.
fn kill_and_replace(nodes: &mut [Node], x: usize, mac: &str) -> usize {
    nodes[x].server.take().expect("running").kill9();
    let other = (x + 1) % nodes.len();
    let port = wait_for("the client placed on a live node", || {
        let (_, p) = nodes[other].script(mac);
        (p != nodes[x].iscsi).then_some(p)
    });
    nodes.iter().position(|n| n.iscsi == port).expect("a node")
}

fn login(port: u16, who: &str) -> Client {
    let mut c = Client::connect(port);
    c.login(who, TARGET)
        .unwrap_or_else(|e| panic!("login of {who} on port {port} refused: {e:?}"));
    c
}

/// WRITE(10) then SYNCHRONIZE CACHE(10) (SBC-3 §5.22): both must succeed.
fn write_synced(c: &mut Client, lba: u32, data: &[u8]) {
    c.write10(lba, data);
    let r = c.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None);
    assert_eq!(r.status, 0, "SYNCHRONIZE CACHE failed: {r:?}");
}

/// WRITE(10) with FUA (SBC-3 §5.40: byte 1 bit 3): the outcome.
fn write_fua(c: &mut Client, lba: u32, data: &[u8]) -> raw::ScsiResult {
    let mut cdb = raw::write10_cdb(lba, (data.len() / 512) as u16);
    cdb[1] |= 0x08;
    c.run(&cdb, data.len() as u32, Some(data))
}

/// The RADOS clients holding the lock of `pool/image` (`rbd lock ls`: `client.N`).
fn lockers(ceph: &Ceph, image: &str) -> Vec<String> {
    let out = ceph
        .tool("rbd", &["lock", "ls", &format!("rbd/{image}")])
        .ok();
    out.stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.starts_with("client."))
        .map(str::to_string)
        .collect()
}

/// The RADOS client with which `node` last locked the client disk `image` (from its log).
fn node_rados_client(node: &Node, image: &str) -> Option<String> {
    let disk = format!("disk=rbd/{image} ");
    node.stderr()
        .lines()
        .rfind(|l| l.contains("client disk in RBD opened and locked") && l.contains(&disk))
        .and_then(|l| {
            let i = l.find("client.")?;
            let tail = &l[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
                .unwrap_or(tail.len());
            Some(tail[..end].to_string())
        })
}

/// Exactly one lock holder in Ceph, and it is the node etcd names the client's owner.
fn check_single_writer(ceph: &Ceph, etcd: &Etcd, image: &str, who: &str, owner: &Node) {
    let owners = etcd.owners(CLUSTER);
    assert_eq!(
        owners.get(who).map(String::as_str),
        Some(owner.id.as_str()),
        "etcd owner of {who}"
    );
    let held = lockers(ceph, image);
    let mine = node_rados_client(owner, image).expect("the owner logged its RADOS client");
    assert_eq!(
        held,
        vec![mine.clone()],
        "the disk's lock is held by {held:?}, the owner {} is {mine}",
        owner.id
    );
}

/// The client's lifecycle record in etcd (docs/scale-out.md, "Client lifecycle records"),
/// once written by `node`.
fn record_by(etcd: &Etcd, who: &str, node: &Node) -> serde_json::Value {
    let key = format!("/diskless/{CLUSTER}/clients/{TARGET}/{who}/lifecycle");
    wait_for(&format!("{}'s lifecycle record of {who}", node.id), || {
        let text = etcd.ctl_out(&["get", &key, "--print-value-only"])?;
        let v: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
        (v["node"] == node.id.as_str()).then_some(v)
    })
}

#[test]
fn rbd_disks_survive_kill_and_fence_a_paused_node() {
    common::require("rbd", "ceph-common");
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let golden = tmp.path().join("golden.img");
    let golden_bytes = common::random_bytes(GOLDEN_SIZE, 11);
    std::fs::write(&golden, &golden_bytes).unwrap();

    let mut ceph = Ceph::start();
    let etcd = Etcd::start(tmp.path());
    // The golden image in RBD as a protected snapshot, parent of the clients' disks.
    ceph.rbd_parent(&golden, "golden");

    let spec = rbd_spec(
        &ceph,
        &etcd,
        format!(
            "  - {{name: golden, path: {}, rbd: {{parent: golden@v1}}}}\n",
            golden.display()
        ),
    );
    let mut nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| Node::start_mode(tmp.path(), id, &spec, "persistent"))
        .collect();
    cluster::wait_for_views(nodes.iter(), WAIT);
    eprintln!(
        "measured: Ceph, etcd and 3 nodes up in {:?}",
        started.elapsed()
    );

    // 1. The client boots on the node the placement picks, writes, and is acknowledged.
    let mac = "52:54:00:00:0d:01";
    let (who, port) = nodes[0].script(mac);
    let image = diskless::storage::rbd::client_image_name("diskless", TARGET, &who);
    let x = nodes.iter().position(|n| n.iscsi == port).expect("a node");
    let mut s = login(port, &who);
    assert_eq!(
        s.read10(0, 16),
        golden_bytes[..16 * 512],
        "a new client disk reads as the golden image"
    );
    let synced = common::random_bytes(8 * 512, 21);
    write_synced(&mut s, 100, &synced);
    let fua = common::random_bytes(8 * 512, 22);
    let r = write_fua(&mut s, 200, &fua);
    assert_eq!(r.status, 0, "FUA write: {r:?}");
    check_single_writer(&ceph, &etcd, &image, &who, &nodes[x]);
    // The lifecycle record names the clone, for whichever node serves the client next.
    let rec = record_by(&etcd, &who, &nodes[x]);
    assert_eq!(rec["disk"]["lun0"]["kind"], "rbd", "{rec}");
    assert_eq!(rec["disk"]["lun0"]["name"], format!("rbd/{image}"), "{rec}");
    assert_eq!(rec["disk"]["mode"], "persistent", "{rec}");
    let boots = rec["state"]["boots"].as_u64().unwrap_or(0);
    assert!(boots >= 1, "{rec}");

    // SIGKILL its node; the client boots again: another node, once the lease ran out.
    let t = Instant::now();
    let y = kill_and_replace(&mut nodes, x, mac);
    drop(s);
    let mut s = login(nodes[y].iscsi, &who);
    eprintln!(
        "measured: SIGKILL to the disk served again by {} in {:?}",
        nodes[y].id,
        t.elapsed()
    );
    assert_eq!(s.read10(100, 8), synced, "the synced write survived");
    assert_eq!(s.read10(200, 8), fua, "the FUA write survived");
    assert_eq!(s.read10(0, 16), golden_bytes[..16 * 512]);
    assert!(
        nodes[y]
            .stderr()
            .contains("fenced the previous holder of the client disk"),
        "{}",
        nodes[y].stderr()
    );
    check_single_writer(&ceph, &etcd, &image, &who, &nodes[y]);
    // The new node continued the client's lifecycle from the dead node's record.
    let rec = record_by(&etcd, &who, &nodes[y]);
    assert_eq!(rec["disk"]["lun0"]["name"], format!("rbd/{image}"), "{rec}");
    assert!(
        rec["state"]["boots"].as_u64().unwrap_or(0) >= boots,
        "{rec}"
    );
    assert!(
        nodes[y].stderr().contains(&format!("from={}", nodes[x].id)),
        "{}",
        nodes[y].stderr()
    );

    // 2. Pause the new owner past its lease: the client boots onto the third node.
    let before_pause = common::random_bytes(8 * 512, 23);
    write_synced(&mut s, 300, &before_pause);
    let z = 3 - x - y;
    let pid = nodes[y].server.as_ref().expect("running").pid();
    signal(pid, libc::SIGSTOP);
    let resumed = std::cell::Cell::new(false);
    let _cont = Guard(|| {
        if !resumed.get() {
            signal(pid, libc::SIGCONT)
        }
    });
    let port = wait_for("the client placed on the third node", || {
        let (_, p) = nodes[z].script(mac);
        (p == nodes[z].iscsi).then_some(p)
    });
    let mut s3 = login(port, &who);
    assert_eq!(
        s3.read10(300, 8),
        before_pause,
        "the paused node's synced write"
    );
    let new_data = common::random_bytes(8 * 512, 24);
    write_synced(&mut s3, 400, &new_data);
    check_single_writer(&ceph, &etcd, &image, &who, &nodes[z]);

    // The paused node continues: its session is still open, but it can never write again.
    signal(pid, libc::SIGCONT);
    resumed.set(true);
    let late = common::random_bytes(8 * 512, 25);
    let r = write_fua(&mut s, 400, &late);
    assert_eq!(
        r.status, 2,
        "the fenced node's write is CHECK CONDITION: {r:?}"
    );
    eprintln!(
        "measured: the fenced node's FUA write answered CHECK CONDITION, sense {:?}",
        r.sense_triplet()
    );
    let r = s.run(&raw::write10_cdb(500, 1), 512, Some(&late[..512]));
    assert_eq!(
        r.status, 2,
        "the fenced node's write is CHECK CONDITION: {r:?}"
    );
    let r = s.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None);
    assert_eq!(
        r.status, 2,
        "the fenced node's SYNCHRONIZE CACHE fails: {r:?}"
    );
    // Said once in the fenced node's log (its failures after it within 10 s only counted).
    assert_eq!(io_failures_logged(&nodes[y]), 1, "{}", nodes[y].stderr());
    assert_eq!(
        s3.read10(400, 8),
        new_data,
        "the new owner's data is intact"
    );
    assert_eq!(s3.read10(500, 1), golden_bytes[500 * 512..501 * 512]);
    assert_eq!(s3.read10(100, 8), synced);
    assert_eq!(s3.read10(200, 8), fua);
    // The resumed node registers again but does not take the client back.
    wait_for("the resumed node registered again", || {
        nodes[y]
            .stderr()
            .contains("lease expired at etcd: registering again")
            .then_some(())
    });
    check_single_writer(&ceph, &etcd, &image, &who, &nodes[z]);

    // 3. The third node dies too: the client comes back to the once fenced node, which
    //    opens the disk again (a new RADOS client), fences the dead one and serves it.
    nodes[z].server.take().expect("running").kill9();
    drop(s3);
    drop(s);
    let port = wait_for("the client placed on the resumed node", || {
        let (_, p) = nodes[y].script(mac);
        (p == nodes[y].iscsi).then_some(p)
    });
    let mut s = login(port, &who);
    assert!(
        nodes[y]
            .stderr()
            .contains("the client's shared disk lost its lock (fenced by another node, or Ceph unreachable): opening it again"),
        "{}",
        nodes[y].stderr()
    );
    assert_eq!(s.read10(400, 8), new_data, "the third node's synced write");
    assert_eq!(s.read10(300, 8), before_pause);
    let last = common::random_bytes(8 * 512, 26);
    let r = write_fua(&mut s, 600, &last);
    assert_eq!(
        r.status, 0,
        "the node writes again once it holds the lock: {r:?}"
    );
    assert_eq!(s.read10(600, 8), last);
    check_single_writer(&ceph, &etcd, &image, &who, &nodes[y]);
    // The record went z → y: y took z's record over (not its own stale state).
    let rec = record_by(&etcd, &who, &nodes[y]);
    assert!(rec["state"]["taken"][0] == nodes[z].id.as_str(), "{rec}");

    // 4. A disk the node cannot open (the parent snapshot is gone for a new client's
    //    clone): the login is refused with 0x0301 (service unavailable), logged.
    ceph.tool("rbd", &["mv", "rbd/golden", "rbd/golden-moved"])
        .ok();
    let (other, port) = nodes[y].script("52:54:00:00:0d:02");
    assert_eq!(port, nodes[y].iscsi);
    let mut c = Client::connect(port);
    assert_eq!(
        c.login(&other, TARGET),
        Err((3, 1)),
        "refused: service unavailable"
    );
    let log = nodes[y].stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("no disk for this client") && l.contains("rbd_clone")),
        "{log}"
    );
    assert_eq!(s.read10(600, 8), last, "the other client is served on");

    // 5. Ceph unreachable. A node whose configuration names a monitor nobody answers on:
    //    a client placed there is refused with 0x0301 once the RADOS connection gives up
    //    (client_mount_timeout, 10 s), logged with the reason, and the node answers other
    //    requests meanwhile.
    let conf = std::fs::read_to_string(ceph.conf()).unwrap();
    let (a, b) = (ceph::free_port(), ceph::free_port());
    let bad_conf = tmp.path().join("wrong-mon.conf");
    std::fs::write(
        &bad_conf,
        conf.lines()
            .map(|l| {
                if l.starts_with("mon host") {
                    format!("mon host = [v2:127.0.0.1:{a},v1:127.0.0.1:{b}]")
                } else {
                    l.to_string()
                }
            })
            .map(|l| l + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let bad_spec = cluster::Spec {
        extra: format!(
            "rbd: {{pool: rbd, id: admin, conf: {}}}\n",
            bad_conf.display()
        ),
        ..spec
    };
    let n4 = Node::start_mode(tmp.path(), "n4", &bad_spec, "persistent");
    cluster::wait_for_views([&n4, &nodes[y]], WAIT);
    // n4 owns nothing, the survivor one client: the new client goes to n4.
    let t_n4 = Instant::now();
    let (lost, port) = n4.script("52:54:00:00:0d:03");
    let script_n4 = t_n4.elapsed();
    assert_eq!(port, n4.iscsi, "placed on the new node");
    let t = Instant::now();
    let login = std::thread::spawn(move || {
        // One Login Request straight to the operational stage; the answer comes once the
        // node gave up on the monitor (longer than the raw client's usual 5 s).
        let mut c = Client::connect(port);
        let mut keys = vec![
            ("InitiatorName", lost.as_str()),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
        ];
        keys.extend_from_slice(raw::DEFAULT_KEYS);
        c.login_request(1, 3, true, false, raw::keys_text(&keys))
            .expect("send the login");
        let (r, _) = c.login_response(Duration::from_secs(60));
        ((r.status_class, r.status_detail), t.elapsed())
    });
    wait_for("n4 trying to reach the monitor", || {
        (t.elapsed() > Duration::from_secs(2)).then_some(())
    });
    let t_metrics = Instant::now();
    n4.metrics();
    let metrics_took = t_metrics.elapsed();
    let (r, refused_after) = login.join().expect("login thread");
    assert_eq!(r, (3, 1), "refused: service unavailable");
    assert!(
        refused_after < Duration::from_secs(30),
        "bounded by the RADOS timeouts: {refused_after:?}"
    );
    assert!(
        metrics_took < Duration::from_secs(2),
        "the node answered meanwhile: {metrics_took:?}"
    );
    let log = n4.stderr();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("no disk for this client")
            && l.contains("rados_connect")),
        "{log}"
    );
    // The script fetch opens the disk too: it gives up with the RADOS connection (10 s) and
    // serves the script (the login then decides), within the script's own limit.
    assert!(
        script_n4 < Duration::from_secs(25),
        "the script waited for Ceph within bounds: {script_n4:?}"
    );

    // 6. The OSD stops under an open session: its next write answers CHECK CONDITION,
    //    MEDIUM ERROR / WRITE ERROR (03/0C/00) once the OSD request gives up
    //    (rados_osd_op_timeout, 10 s), logged, and the node is not stuck: its boot script
    //    endpoint answers while the write waits.
    let logged_before = io_failures_logged(&nodes[y]);
    ceph.stop_daemon("osd");
    let t = Instant::now();
    let late = common::random_bytes(8 * 512, 27);
    let writer = std::thread::spawn(move || {
        let r = write_fua(&mut s, 700, &late);
        (r, t.elapsed())
    });
    wait_for("the write waiting for the OSD", || {
        (t.elapsed() > Duration::from_secs(2)).then_some(())
    });
    let t_metrics = Instant::now();
    nodes[y].metrics();
    let osd_metrics_took = t_metrics.elapsed();
    let (r, failed_after) = writer.join().expect("writer thread");
    assert_eq!(r.status, 2, "CHECK CONDITION with the OSD down: {r:?}");
    assert_eq!(r.sense_triplet(), Some((3, 0x0c, 0)), "WRITE ERROR: {r:?}");
    assert_eq!(
        io_failures_logged(&nodes[y]),
        logged_before + 1,
        "the failure is logged: {}",
        nodes[y].stderr()
    );
    assert!(
        failed_after < Duration::from_secs(40),
        "bounded by rados_osd_op_timeout: {failed_after:?}"
    );
    assert!(
        osd_metrics_took < Duration::from_secs(2),
        "the node answered meanwhile: {osd_metrics_took:?}"
    );
    // The client reboots: its node opens its disk again (a new RADOS client), which waits
    // for the OSD; the boot script does not wait past SCRIPT_ATTACH_LIMIT (15 s): it says to
    // come back (a retry script), and the node's log says why.
    let t_script = Instant::now();
    let r = http::request(
        &format!("http://127.0.0.1:{}/", nodes[y].http),
        "GET",
        &format!("/boot.ipxe?mac={mac}"),
        &[],
        None,
    );
    let script_took = t_script.elapsed();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        !r.body.contains("sanboot") && script_took < Duration::from_secs(25),
        "a retry script, in bounded time ({script_took:?}): {}",
        r.body
    );
    assert!(
        nodes[y]
            .stderr()
            .contains("the client's disk did not open in time"),
        "{}",
        nodes[y].stderr()
    );
    eprintln!(
        "measured: wrong monitor: boot script after {script_n4:?}, login refused (0x0301) after {refused_after:?}, /metrics meanwhile in {metrics_took:?}; \
         OSD stopped: FUA write CHECK CONDITION 03/0C/00 after {failed_after:?}, /metrics meanwhile in {osd_metrics_took:?}, \
         the client's boot script (its disk reopening) a retry script after {script_took:?}"
    );
    eprintln!("measured: whole test {:?}", started.elapsed());
}

/// A client with LUN 0 and a persistent data disk (LUN 1, a binding's `disks:`), both in
/// RBD: each its own clone, written with FUA; its node is killed with SIGKILL; on another
/// node both LUNs read every acknowledged write; that node is paused past its lease and
/// the third node takes both disks over: the paused node's LUN 1 write then fails.
#[test]
fn rbd_data_disk_survives_kill_and_is_fenced() {
    common::require("rbd", "ceph-common");
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (golden, _, data, data_bytes) = image_files(tmp.path(), 31);

    let ceph = Ceph::start();
    let etcd = Etcd::start(tmp.path());
    let mut nodes = data_disk_nodes(
        tmp.path(),
        &ceph,
        &etcd,
        &golden,
        &data,
        &["n1", "n2", "n3"],
    );
    cluster::wait_for_views(nodes.iter(), WAIT);

    let mac = "52:54:00:00:0d:11";
    let (who, port) = nodes[0].script(mac);
    let image0 = diskless::storage::rbd::client_disk_name("diskless", TARGET, &who, 0);
    let image1 = diskless::storage::rbd::client_disk_name("diskless", TARGET, &who, 1);
    assert_eq!(image1, format!("{image0}.lun1"));
    let x = nodes.iter().position(|n| n.iscsi == port).expect("a node");
    let mut s = login(port, &who);
    s.lun = diskless::pdu::lun_from_index(1);
    assert_eq!(
        s.read10(0, 16),
        data_bytes[..16 * 512],
        "a new data disk reads as its image"
    );
    let d1 = common::random_bytes(8 * 512, 41);
    let r = write_fua(&mut s, 100, &d1);
    assert_eq!(r.status, 0, "LUN 1 FUA write: {r:?}");
    s.lun = diskless::pdu::lun_from_index(0);
    let d0 = common::random_bytes(8 * 512, 42);
    let r = write_fua(&mut s, 100, &d0);
    assert_eq!(r.status, 0, "LUN 0 FUA write: {r:?}");
    check_single_writer(&ceph, &etcd, &image0, &who, &nodes[x]);
    check_single_writer(&ceph, &etcd, &image1, &who, &nodes[x]);
    let info = ceph.tool("rbd", &["info", &format!("rbd/{image1}")]).ok();
    assert!(
        info.stdout.contains("parent: rbd/data@v1"),
        "{}",
        info.stdout
    );
    // The record lists LUN 1's clone (LUN 0 stays in `lun0`, as older records have it).
    let rec = record_by(&etcd, &who, &nodes[x]);
    assert_eq!(
        rec["disk"]["lun0"]["name"],
        format!("rbd/{image0}"),
        "{rec}"
    );
    assert_eq!(rec["disk"]["luns"][0]["lun"], 1, "{rec}");
    assert_eq!(rec["disk"]["luns"][0]["disk"]["kind"], "rbd", "{rec}");
    assert_eq!(
        rec["disk"]["luns"][0]["disk"]["name"],
        format!("rbd/{image1}"),
        "{rec}"
    );

    // SIGKILL its node: another node fences both disks and serves every acknowledged write.
    let t = Instant::now();
    let y = kill_and_replace(&mut nodes, x, mac);
    drop(s);
    let mut s = login(nodes[y].iscsi, &who);
    eprintln!(
        "measured: SIGKILL to both LUNs served again by {} in {:?}",
        nodes[y].id,
        t.elapsed()
    );
    assert_eq!(s.read10(100, 8), d0, "LUN 0's FUA write survived");
    s.lun = diskless::pdu::lun_from_index(1);
    assert_eq!(s.read10(100, 8), d1, "LUN 1's FUA write survived");
    assert_eq!(s.read10(0, 16), data_bytes[..16 * 512]);
    let fenced = nodes[y]
        .stderr()
        .lines()
        .filter(|l| l.contains("fenced the previous holder of the client disk"))
        .count();
    assert_eq!(fenced, 2, "both disks fenced: {}", nodes[y].stderr());
    check_single_writer(&ceph, &etcd, &image0, &who, &nodes[y]);
    check_single_writer(&ceph, &etcd, &image1, &who, &nodes[y]);
    let before_pause = common::random_bytes(8 * 512, 43);
    let r = write_fua(&mut s, 300, &before_pause);
    assert_eq!(r.status, 0, "LUN 1 FUA write on the new node: {r:?}");

    // Pause that node past its lease: the third node takes both disks over; the paused
    // node's LUN 1 write then fails.
    let z = 3 - x - y;
    let pid = nodes[y].server.as_ref().expect("running").pid();
    signal(pid, libc::SIGSTOP);
    let resumed = std::cell::Cell::new(false);
    let _cont = Guard(|| {
        if !resumed.get() {
            signal(pid, libc::SIGCONT)
        }
    });
    let port = wait_for("the client placed on the third node", || {
        let (_, p) = nodes[z].script(mac);
        (p == nodes[z].iscsi).then_some(p)
    });
    let mut s3 = login(port, &who);
    s3.lun = diskless::pdu::lun_from_index(1);
    assert_eq!(
        s3.read10(300, 8),
        before_pause,
        "the paused node's FUA write"
    );
    let new_data = common::random_bytes(8 * 512, 44);
    let r = write_fua(&mut s3, 400, &new_data);
    assert_eq!(r.status, 0, "{r:?}");
    check_single_writer(&ceph, &etcd, &image1, &who, &nodes[z]);
    check_single_writer(&ceph, &etcd, &image0, &who, &nodes[z]);
    signal(pid, libc::SIGCONT);
    resumed.set(true);
    let late = common::random_bytes(8 * 512, 45);
    let r = write_fua(&mut s, 400, &late);
    assert_eq!(
        r.status, 2,
        "the fenced node's LUN 1 write is CHECK CONDITION: {r:?}"
    );
    assert_eq!(
        s3.read10(400, 8),
        new_data,
        "the new owner's LUN 1 data is intact"
    );
    assert_eq!(s3.read10(100, 8), d1);
    s3.lun = diskless::pdu::lun_from_index(0);
    assert_eq!(s3.read10(100, 8), d0);
    eprintln!("measured: data disk test {:?}", started.elapsed());
}

/// `diskless client reset WHO [ARGS]` against `node`'s control socket: must succeed.
/// `diskless ARGS` through the node's control socket: (success, stdout, stderr).
fn control(node: &Node, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(args)
        .arg("--control")
        .arg(node.dir.join("state/control.sock"))
        .output()
        .expect("run diskless");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `diskless client reset WHO ARGS` on the node, which must succeed: its output.
fn client_reset(node: &Node, who: &str, args: &[&str]) -> String {
    let mut a = vec!["client", "reset", who];
    a.extend_from_slice(args);
    let (ok, out, err) = control(node, &a);
    assert!(
        ok,
        "diskless client reset {who} {args:?} on {}: {err}",
        node.id
    );
    out
}

/// `diskless client show WHO` on the node.
fn client_show(node: &Node, who: &str) -> String {
    let (ok, out, err) = control(node, &["client", "show", who]);
    assert!(ok, "diskless client show {who} on {}: {err}", node.id);
    out
}

/// `diskless cluster clients` with the node's configuration: the rows of `who`, split
/// into columns (INITIATOR LAST-NODE OWNER LUN IMAGE MODE DISK BOOTS PHASE NEXT-LOGIN ...).
fn cluster_client_rows(node: &Node, who: &str) -> Vec<Vec<String>> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(["cluster", "clients", "-c"])
        .arg(node.config())
        .output()
        .expect("run diskless cluster clients");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "diskless cluster clients: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .filter(|l| l.starts_with(who))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// The client's lifecycle record in etcd now (no waiting: what a node taking the client
/// over would read at this moment).
fn record_now(etcd: &Etcd, who: &str) -> serde_json::Value {
    let key = format!("/diskless/{CLUSTER}/clients/{TARGET}/{who}/lifecycle");
    let text = etcd
        .ctl_out(&["get", &key, "--print-value-only"])
        .expect("etcdctl get");
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{key}: {e}: {text}"))
}

/// `rbd info rbd/IMAGE`: (its id, its parent line).
fn rbd_info(ceph: &Ceph, image: &str) -> (String, String) {
    let out = ceph
        .tool("rbd", &["info", &format!("rbd/{image}")])
        .ok()
        .stdout;
    let field = |k: &str| {
        out.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in rbd info {image}: {out}"))
            .trim()
            .to_string()
    };
    (field("id:"), field("parent:"))
}

/// `diskless client reset` of a persistent client whose LUN 0 and data disk (LUN 1) are RBD
/// clones (docs/scale-out.md, "Reset of a disk in RBD"): `--lun 1`, then the client's next
/// login reads the data image's bytes on LUN 1 (a new clone of data@v1) and its own write
/// on LUN 0; a whole reset, then the node is killed before the client comes back: the node
/// that takes the client over applies the reset from the cluster's record (fencing the dead
/// node's lock first), LUN 0 reads the golden image, LUN 1 keeps its write. The parents'
/// snapshots stay. Each reset is in etcd when the command answers (read at once, no
/// waiting), shown pending by `client show` and `cluster clients`; with etcd killed, a
/// reset is reported as not durable.
#[test]
fn rbd_reset_recreates_the_clone_at_the_next_login() {
    common::require("rbd", "ceph-common");
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (golden, golden_bytes, data, data_bytes) = image_files(tmp.path(), 51);

    let ceph = Ceph::start();
    let etcd = Etcd::start(tmp.path());
    let mut nodes = data_disk_nodes(tmp.path(), &ceph, &etcd, &golden, &data, &["n1", "n2"]);
    cluster::wait_for_views(nodes.iter(), WAIT);

    let mac = "52:54:00:00:0d:21";
    let (who, port) = nodes[0].script(mac);
    let image0 = diskless::storage::rbd::client_disk_name("diskless", TARGET, &who, 0);
    let image1 = diskless::storage::rbd::client_disk_name("diskless", TARGET, &who, 1);
    let x = nodes.iter().position(|n| n.iscsi == port).expect("a node");
    let mut s = login(port, &who);
    let (lun0, lun1) = (
        diskless::pdu::lun_from_index(0),
        diskless::pdu::lun_from_index(1),
    );
    let w0 = common::random_bytes(8 * 512, 61);
    write_synced(&mut s, 100, &w0);
    s.lun = lun1;
    let w1 = common::random_bytes(8 * 512, 62);
    write_synced(&mut s, 100, &w1);
    let (id1, parent1) = rbd_info(&ceph, &image1);
    assert_eq!(parent1, "rbd/data@v1");

    // 1. `--lun 1`: the session is closed; the next login (same node) gets a new clone of
    //    data@v1 on LUN 1, LUN 0 as the client left it. The command answers once etcd has
    //    the mark; `client show` and `cluster clients` show it pending.
    let t = Instant::now();
    let out = client_reset(&nodes[x], &who, &["--lun", "1"]);
    let reset_took = t.elapsed();
    assert!(
        out.contains(
            "RBD disk(s) LUN 1 recreated from the image at the next login (recorded in etcd)"
        ),
        "{out}"
    );
    let rec = record_now(&etcd, &who);
    assert_eq!(
        rec["state"]["rbd_recreate"],
        serde_json::json!([1]),
        "{rec}"
    );
    let show = client_show(&nodes[x], &who);
    assert!(
        show.contains("reset pending at next login (LUN 1): "),
        "{show}"
    );
    let rows = cluster_client_rows(&nodes[x], &who);
    let cols: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| (r[3].as_str(), r[6].as_str(), r[9].as_str()))
        .collect();
    let (d0, d1) = (format!("rbd:rbd/{image0}"), format!("rbd:rbd/{image1}"));
    assert_eq!(
        cols,
        [("0", d0.as_str(), "-"), ("1", d1.as_str(), "recreate")],
        "one row per LUN: {rows:?}"
    );
    drop(s);
    let t = Instant::now();
    let mut s = login(nodes[x].iscsi, &who);
    let login_took = t.elapsed();
    s.lun = lun1;
    assert_eq!(
        s.read10(100, 8),
        data_bytes[100 * 512..108 * 512],
        "LUN 1 reads its image's bytes again, not the client's write"
    );
    s.lun = lun0;
    assert_eq!(s.read10(100, 8), w0, "LUN 0 keeps the client's write");
    let (new_id1, parent1) = rbd_info(&ceph, &image1);
    assert_ne!(new_id1, id1, "LUN 1's clone was removed and created again");
    assert_eq!(parent1, "rbd/data@v1", "the same parent");
    let show = client_show(&nodes[x], &who);
    assert!(!show.contains("reset pending"), "applied: {show}");
    assert!(
        nodes[x]
            .stderr()
            .contains("client disk in RBD removed (an operator's reset)"),
        "{}",
        nodes[x].stderr()
    );
    check_single_writer(&ceph, &etcd, &image0, &who, &nodes[x]);
    check_single_writer(&ceph, &etcd, &image1, &who, &nodes[x]);
    let own = nodes[x]
        .stderr()
        .lines()
        .filter(|l| l.contains("fenced the previous holder"))
        .count();
    eprintln!(
        "measured: `client reset --lun 1` {reset_took:?}, the next login (remove + clone) {login_took:?}, \
         this node's own previous handles fenced: {own}"
    );

    // 2. A whole reset; the node dies before the client comes back: the other node takes
    //    the client over with the reset pending in its record, fences the dead node's locks
    //    and recreates LUN 0 before serving it.
    s.lun = lun1;
    let w1b = common::random_bytes(8 * 512, 63);
    write_synced(&mut s, 200, &w1b);
    s.lun = lun0;
    write_synced(&mut s, 200, &w0);
    let (id0, _) = rbd_info(&ceph, &image0);
    client_reset(&nodes[x], &who, &[]);
    drop(s);
    // Acknowledged, so in etcd already: the node may die right away.
    let rec = record_now(&etcd, &who);
    assert_eq!(
        rec["state"]["rbd_recreate"],
        serde_json::json!([0]),
        "{rec}"
    );
    let y = kill_and_replace(&mut nodes, x, mac);
    let mut s = login(nodes[y].iscsi, &who);
    assert_eq!(
        s.read10(100, 8),
        golden_bytes[100 * 512..108 * 512],
        "LUN 0 reads the golden image again"
    );
    assert_eq!(s.read10(200, 8), golden_bytes[200 * 512..208 * 512]);
    s.lun = lun1;
    assert_eq!(s.read10(200, 8), w1b, "LUN 1 keeps its write");
    let (new_id0, parent0) = rbd_info(&ceph, &image0);
    assert_ne!(new_id0, id0, "LUN 0's clone was removed and created again");
    assert_eq!(parent0, "rbd/golden@v1");
    let log = nodes[y].stderr();
    assert!(
        log.contains("fenced the previous holder of the client disk before recreating it"),
        "{log}"
    );
    check_single_writer(&ceph, &etcd, &image0, &who, &nodes[y]);
    check_single_writer(&ceph, &etcd, &image1, &who, &nodes[y]);
    let rec = record_by(&etcd, &who, &nodes[y]);
    assert!(rec["state"]["rbd_recreate"].is_null(), "done: {rec}");
    // The golden snapshots are untouched.
    for snap in ["rbd/golden", "rbd/data"] {
        let out = ceph.tool("rbd", &["snap", "ls", snap]).ok().stdout;
        assert!(out.contains("v1"), "{snap}: {out}");
    }

    // 3. etcd is gone: a reset cannot be made durable in the cluster. It is applied on the
    //    node (sessions closed, the mark in its state) but reported as failed, saying why.
    drop(s);
    let mut etcd = etcd;
    etcd.kill9();
    let t = Instant::now();
    let (ok, out, err) = control(&nodes[y], &["client", "reset", &who, "--lun", "1"]);
    let failed_after = t.elapsed();
    assert!(
        !ok,
        "a reset etcd does not have must not pass as done: {out}"
    );
    assert!(
        err.contains("not yet durable in the cluster")
            && err.contains("(LUN 1)")
            && err.contains("etcd"),
        "{err}"
    );
    let show = client_show(&nodes[y], &who);
    assert!(
        show.contains("reset pending at next login (LUN 1): "),
        "{show}"
    );
    eprintln!(
        "measured: a reset with etcd down reported as not durable after {failed_after:?}: {}",
        err.trim()
    );
    eprintln!("measured: RBD reset test {:?}", started.elapsed());
}

/// WARN lines `I/O on the client disk in RBD failed` in the node's log (printed).
/// The snapshots of `rbd/IMAGE` (`rbd snap ls`).
fn snapshots(ceph: &Ceph, image: &str) -> Vec<String> {
    let out = ceph
        .tool("rbd", &["snap", "ls", &format!("rbd/{image}")])
        .ok()
        .stdout;
    // SNAPID NAME SIZE ...: the header line has "NAME".
    out.lines()
        .skip_while(|l| !l.contains("NAME"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

/// `diskless client commit` of a client's RBD disks while it runs: LUN 0 to a new file and
/// LUN 1 as version 1 of a new image. Each copy is of an RBD snapshot taken at the command
/// (the session stays logged in and writes on afterwards); no snapshot is left behind.
#[test]
fn rbd_commit_copies_a_running_disk() {
    common::require("rbd", "ceph-common");
    let tmp = tempfile::tempdir().unwrap();
    let (golden, golden_bytes, data, data_bytes) = image_files(tmp.path(), 71);
    let ceph = Ceph::start();
    let etcd = Etcd::start(tmp.path());
    let nodes = data_disk_nodes(tmp.path(), &ceph, &etcd, &golden, &data, &["n1"]);
    cluster::wait_for_views(nodes.iter(), WAIT);
    let n = &nodes[0];
    let (who, port) = n.script("52:54:00:00:0d:31");
    let image0 = diskless::storage::rbd::client_disk_name("diskless", TARGET, &who, 0);
    let image1 = diskless::storage::rbd::client_disk_name("diskless", TARGET, &who, 1);
    let mut s = login(port, &who);
    let w0 = common::random_bytes(8 * 512, 73);
    write_synced(&mut s, 100, &w0);
    s.lun = diskless::pdu::lun_from_index(1);
    let w1 = common::random_bytes(8 * 512, 74);
    write_synced(&mut s, 300, &w1);

    let copy = tmp.path().join("copy.img");
    let t = Instant::now();
    let (ok, out, err) = control(n, &["client", "commit", &who, &copy.to_string_lossy()]);
    assert!(ok, "client commit to a file: {out}{err}");
    let took = t.elapsed();
    // Written after the commit: not in the copy.
    s.lun = diskless::pdu::lun_from_index(0);
    write_synced(&mut s, 100, &common::random_bytes(8 * 512, 75));
    let mut want0 = golden_bytes.clone();
    want0[100 * 512..108 * 512].copy_from_slice(&w0);
    assert!(
        std::fs::read(&copy).unwrap() == want0,
        "the copy is LUN 0 as of the commit"
    );
    assert_eq!(
        snapshots(&ceph, &image0),
        Vec::<String>::new(),
        "no snapshot left"
    );
    let (ok, _, err) = control(n, &["client", "commit", &who, &copy.to_string_lossy()]);
    assert!(
        !ok && err.contains("exists already"),
        "not over an existing file: {err}"
    );

    let (ok, out, err) = control(
        n,
        &[
            "client",
            "commit",
            &who,
            "fromrbd",
            "--lun",
            "1",
            "-m",
            "LUN 1 of an RBD client",
        ],
    );
    assert!(ok, "client commit as a new image: {out}{err}");
    assert!(
        out.contains("fromrbd@1") || out.contains("fromrbd"),
        "{out}"
    );
    let images = diskless::storage::versions::Images::new(&n.dir.join("state"));
    let v = images.open("fromrbd", 1).expect("version 1 of fromrbd");
    let mut got = vec![0u8; data_bytes.len()];
    diskless::storage::BlockStore::read_at(&v, &mut got, 0).unwrap();
    let mut want1 = data_bytes.clone();
    want1[300 * 512..308 * 512].copy_from_slice(&w1);
    assert!(
        got == want1,
        "version 1 of fromrbd is LUN 1 as of the commit"
    );
    assert_eq!(
        snapshots(&ceph, &image1),
        Vec::<String>::new(),
        "no snapshot left"
    );
    // The client's session went on through both commits.
    s.lun = diskless::pdu::lun_from_index(1);
    assert_eq!(s.read10(300, 8), w1);

    // With the OSD gone (memstore: it does not come back), a commit cannot take its
    // snapshot: it fails with the RBD call and the error it got, once the OSD request
    // gives up (rados_osd_op_timeout, 10 s), and leaves no file and no version behind.
    let mut ceph = ceph;
    ceph.stop_daemon("osd");
    let lost = tmp.path().join("lost.img");
    let t_down = Instant::now();
    let (ok, out, err) = control(n, &["client", "commit", &who, &lost.to_string_lossy()]);
    let down_file = t_down.elapsed();
    assert!(!ok, "a commit with the OSD down must fail: {out}{err}");
    assert!(err.contains("rbd"), "the error names the RBD step: {err}");
    assert!(!lost.exists(), "no file left behind");
    let mut partial = lost.clone().into_os_string();
    partial.push(".partial");
    assert!(
        !std::path::Path::new(&partial).exists(),
        "no partial file left"
    );
    let t_down = Instant::now();
    let (ok, out, err) = control(n, &["client", "commit", &who, "lostimage", "--lun", "1"]);
    let down_image = t_down.elapsed();
    assert!(
        !ok,
        "a commit as an image with the OSD down must fail: {out}{err}"
    );
    assert!(
        err.contains("Ceph is unreachable") || err.contains("rbd"),
        "the error says why: {err}"
    );
    assert!(
        images.open("lostimage", 1).is_err(),
        "no version of lostimage left behind"
    );
    for took in [down_file, down_image] {
        assert!(
            took < Duration::from_secs(40),
            "bounded by rados_osd_op_timeout: {took:?}"
        );
    }
    eprintln!(
        "measured: commit of an 8 MiB RBD disk to a file {took:?}; with the OSD down, commit to a file failed after {down_file:?}, as an image after {down_image:?}: {err}"
    );
}

fn io_failures_logged(node: &Node) -> usize {
    let log = node.stderr();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("I/O on the client disk in RBD failed"))
        .collect();
    if let Some(l) = lines.last() {
        eprintln!("measured: {} logged: {l}", node.id);
    }
    lines.len()
}

/// Client disk names: readable, one RBD name component, distinct per (target, initiator).
#[test]
fn client_image_names() {
    use diskless::storage::rbd::client_image_name;
    let a = client_image_name(
        "diskless",
        TARGET,
        "iqn.2026-12.org.diskless:mac-525400000d01",
    );
    assert!(
        a.starts_with("diskless.iqn.2026-12.org.diskless_mac-525400000d01."),
        "{a}"
    );
    assert!(!a.contains(['/', '@', ' ']));
    // The mapping merges ':' and '_'; the hash keeps them apart.
    assert_ne!(
        client_image_name("diskless", TARGET, "iqn.x:a"),
        client_image_name("diskless", TARGET, "iqn.x_a")
    );
    // Another target, another disk; case does not matter (initiator names are not).
    assert_ne!(
        client_image_name("diskless", "iqn.other", "iqn.x:a"),
        client_image_name("diskless", TARGET, "iqn.x:a")
    );
    assert_eq!(
        client_image_name("diskless", TARGET, "IQN.X:A"),
        client_image_name("diskless", TARGET, "iqn.x:a")
    );
    let long = "iqn.x:".to_string() + &"a".repeat(300);
    assert!(client_image_name("diskless", TARGET, &long).len() < 160);
}
