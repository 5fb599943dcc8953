//! A diskless cluster node for the tests that run several nodes on one etcd
//! (tests/cluster.rs, tests/cluster_s3.rs): its own directory, iSCSI and boot-HTTP ports,
//! and the configuration every node shares but for the image part. Include it with
//! `#[path = "common/cluster.rs"] mod cluster;` beside `mod common;` and `mod http;`.

use crate::common::{Config, Server};
#[allow(unused_imports)] // not every test file that includes this calls every helper
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// What the nodes of one test share.
pub struct Spec<'a> {
    /// Cluster name (the etcd key prefix).
    pub cluster: &'a str,
    /// The boot target every node serves.
    pub target: &'a str,
    /// etcd client endpoint.
    pub etcd: String,
    /// Lease TTL in seconds: short, so that a failure shows within seconds.
    pub ttl: u64,
    /// The `images:` entries (indented list items) and the default binding's image name.
    pub images: String,
    pub image: &'a str,
    /// More top-level YAML (e.g. `chunk_cache: ...`), each line ending in a newline.
    pub extra: String,
    /// More keys of the `cluster:` flow mapping (e.g. `, tls: {...}, auth: {...}`).
    pub cluster_extra: String,
}

pub struct Node {
    pub id: String,
    pub dir: PathBuf,
    pub iscsi: u16,
    pub http: u16,
    pub server: Option<Server>,
}

#[allow(dead_code)]
impl Node {
    pub fn start(root: &Path, id: &str, spec: &Spec) -> Node {
        Node::start_mode(root, id, spec, "volatile")
    }

    /// A node whose default binding gives each client a disk in `mode` (e.g. `persistent`).
    pub fn start_mode(root: &Path, id: &str, spec: &Spec, mode: &str) -> Node {
        let boot = format!(
            "      default: {{image: {image}, mode: {mode}}}\n",
            image = spec.image
        );
        Node::start_custom(root, id, spec, &boot, "127.0.0.1")
    }

    /// A node whose boot target's `boot:` mapping is `boot` (indented lines, e.g.
    /// `bindings:` and `default:`) and whose advertised portal is `advertise_host:PORT`
    /// (`10.0.2.2`: the host as QEMU guests on user networking reach it; its connections
    /// arrive on 127.0.0.1).
    pub fn start_custom(
        root: &Path,
        id: &str,
        spec: &Spec,
        boot: &str,
        advertise_host: &str,
    ) -> Node {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).expect("node directory");
        let (server, iscsi, http) = Server::start_on_free_ports(&dir, |iscsi, http| {
            Config::yaml(&format!(
                "portals: [\"127.0.0.1:{iscsi}\"]\n\
                 state_dir: {state}\n\
                 settings: {{nop_in_interval_secs: 0}}\n\
                 {extra}\
                 images:\n{images}\
                 targets:\n  - name: {target}\n    boot:\n{boot}\
                 boot_http: {{listen: \"127.0.0.1:{http}\"}}\n\
                 api: {{listen: \"127.0.0.1:0\"}}\n\
                 cluster: {{name: {cluster}, node_id: {id}, etcd: [\"{ep}\"], advertise: \"{advertise_host}:{iscsi}\", lease_ttl: {ttl}{cextra}}}\n",
                state = dir.join("state").display(),
                extra = spec.extra,
                images = spec.images,
                target = spec.target,
                cluster = spec.cluster,
                ep = spec.etcd,
                ttl = spec.ttl,
                cextra = spec.cluster_extra,
            ))
        });
        Node {
            id: id.to_string(),
            dir,
            iscsi,
            http,
            server: Some(server),
        }
    }

    fn running(&self) -> &Server {
        self.server.as_ref().expect("node running")
    }

    /// `/metrics` of the node's API.
    pub fn metrics(&self) -> String {
        let r = crate::http::request(&self.running().api_url(), "GET", "/metrics", &[], None);
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    }

    /// The value of the metric line starting with `name` (name and labels).
    pub fn metric(&self, name: &str) -> u64 {
        let body = self.metrics();
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("no {name} in {}'s metrics:\n{body}", self.id))
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("targets.yaml")
    }

    pub fn stderr(&self) -> String {
        self.server.as_ref().map(|s| s.stderr()).unwrap_or_default()
    }

    /// The boot script for the client with this MAC: (initiator, iSCSI port it names).
    pub fn script(&self, mac: &str) -> (String, u16) {
        script(self.http, mac)
    }

    /// Initiators of the Normal sessions open on the node (`diskless sessions`).
    pub fn sessions(&self) -> Vec<String> {
        let out = Command::new(env!("CARGO_BIN_EXE_diskless"))
            .args(["sessions", "--control"])
            .arg(self.dir.join("state/control.sock"))
            .output()
            .expect("run diskless sessions");
        assert!(
            out.status.success(),
            "diskless sessions: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        session_initiators(&String::from_utf8_lossy(&out.stdout))
    }

    /// Resident memory of the node, KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.running().pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }

    /// CPU time (user + system) the node used so far, from /proc/PID/stat.
    pub fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.running().pid()))
            .unwrap_or_default();
        // Fields after the ")" of the command: state is field 3; utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0)
            + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }
}

/// Wait (up to `limit`) until each node's own view of the cluster, what its placement decides
/// on (`diskless_cluster{what="nodes"}`), counts every one of `nodes`: a node follows etcd
/// through a watch, so its view may lag a status read straight from etcd.
pub fn wait_for_views<'a>(nodes: impl IntoIterator<Item = &'a Node>, limit: Duration) {
    let nodes: Vec<&Node> = nodes.into_iter().collect();
    let n = nodes.len() as u64;
    for node in &nodes {
        crate::http::wait_for(limit, &format!("{} to see {n} nodes", node.id), || {
            (node.metric("diskless_cluster{what=\"nodes\"}") == n).then_some(())
        });
    }
}

/// The boot script for `mac` from the node whose boot HTTP port is `http`: (initiator,
/// iSCSI port it names). A node that cannot place the client now (etcd slow to answer on a
/// loaded machine, a dead owner's lease not yet run out) answers with a script that retries
/// in 10 s; this asks again, as iPXE would, for up to a minute.
pub fn script(http: u16, mac: &str) -> (String, u16) {
    let mut last = String::new();
    let body = crate::http::wait_for(
        std::time::Duration::from_secs(60),
        &format!("a script that places {mac} from port {http}"),
        || {
            let r = crate::http::request(
                &format!("http://127.0.0.1:{http}/"),
                "GET",
                &format!("/boot.ipxe?mac={mac}"),
                &[],
                None,
            );
            assert_eq!(
                r.status, 200,
                "script for {mac} from port {http}: {}",
                r.body
            );
            if r.body.contains("cannot be placed now") {
                if r.body != last {
                    eprintln!("node on port {http} cannot place {mac} now:\n{}", r.body);
                    last = r.body;
                }
                return None;
            }
            Some(r.body)
        },
    );
    crate::common::script_placement(&body)
}

/// Initiators of the Normal sessions in the output of `diskless sessions` (tab-separated,
/// one header line; a discovery session has no target).
pub fn session_initiators(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 4 && !f[3].is_empty()).then(|| f[1].to_string())
        })
        .collect()
}

/// The recorded boot read trace (tests/fixtures/boot-trace.txt): (LBA, blocks) of 512-byte
/// blocks, in order.
#[allow(dead_code)] // not every test file that includes this replays the trace
pub fn boot_trace() -> Vec<(u64, u32)> {
    let text = std::fs::read_to_string(crate::common::repo().join("tests/fixtures/boot-trace.txt"))
        .expect("tests/fixtures/boot-trace.txt");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let mut f = l.split_whitespace();
            let lba = f.next().and_then(|x| x.parse().ok()).expect("trace LBA");
            let n = f.next().and_then(|x| x.parse().ok()).expect("trace blocks");
            (lba, n)
        })
        .collect()
}

/// Indexes of the `chunk`-byte chunks `reads` touch.
#[allow(dead_code)] // not every test file that includes this replays the trace
pub fn chunks_touched(reads: &[(u64, u32)], chunk: usize) -> std::collections::BTreeSet<usize> {
    reads
        .iter()
        .flat_map(|&(lba, n)| {
            let a = lba as usize * 512;
            let b = a + n as usize * 512 - 1;
            (a / chunk)..=(b / chunk)
        })
        .collect()
}

/// `diskless image push RAW --image golden --chunk-size 1MiB` with a configuration in `root`
/// whose `images:` are `images` (the golden image's `s3:` entry) and whose default binding
/// on `target` is that image; the push must succeed. Its standard output.
#[allow(dead_code)] // only the tests that push a golden image to S3 call it
pub fn push_golden(root: &Path, raw: &Path, images: &str, target: &str) -> String {
    let config = root.join("push.yaml");
    std::fs::write(
        &config,
        format!(
            "portals: [\"127.0.0.1:0\"]\nstate_dir: {}\nimages:\n{images}targets:\n  - name: {target}\n    boot:\n      default: {{image: golden, mode: volatile}}\n",
            root.join("push-state").display(),
        ),
    )
    .expect("write push.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(["image", "push"])
        .arg(raw)
        .arg("--config")
        .arg(&config)
        .args(["--image", "golden", "--chunk-size", "1MiB"])
        .output()
        .expect("run diskless image push");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "image push: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
