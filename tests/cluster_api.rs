//! The operator API and the web console in a cluster (docs/operations.md, "In a cluster"):
//! real etcd (Debian's etcd-server) and diskless nodes on 127.0.0.1, each with an admin
//! token (the same on every node).
//!
//! - `every_node_answers_for_the_cluster`: three nodes; a client placed on n1 is listed by
//!   n2's and n3's `GET /api/v1/clients` with owner n1 and its live details (from n1's API),
//!   `GET /api/v1/cluster` shows the three nodes answering; hostile requests on the new
//!   paths (no token, bad JSON, unknown client, unknown field, wrong type) answer 4xx; a
//!   reset asked on n3 is forwarded to n1 and applied there (n1's audit says so), and the
//!   client's next boot on n1 finds its golden image again; n1 paused (SIGSTOP): n2's views
//!   answer within a bound and mark n1's clients stale; once n1's lease is gone nobody
//!   resets its client (4xx, nothing applied); n1 continued (SIGCONT): live again.
//! - `console_shows_the_nodes_and_a_remote_client`: the web console of n2 in Debian's headless
//!   Chromium (tests/browser/cluster.mjs, playwright-core) shows the nodes table and the
//!   card of a client n1 serves, marked with its node, and its page; n1 paused (SIGSTOP), the
//!   card is marked stale with a reason naming n1.
//!
//! Waits are for conditions, never fixed sleeps.

#[allow(dead_code)] // wait_for_views reads /metrics without the token these nodes require
#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/http.rs"]
mod http;
#[path = "common/raw.rs"]
mod raw;

use cluster::Node;
use common::{repo, require_browser_tools, Browser, Config, Server};
use etcd::Etcd;
use http::seg;
use raw::Client;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.org.diskless:boot";
const CLUSTER: &str = "cv";
const TOKEN: &str = "cluster-view-token-0123456789";
const GOLDEN_SIZE: usize = 4 << 20;
/// Lease TTL of the nodes: short, so that a paused node loses its lease within seconds.
const TTL: u64 = 2;
/// Longest wait for any condition.
const WAIT: Duration = Duration::from_secs(30);
/// A view asked of a node while another node is paused answers within this (the node waits
/// 1.5 s for the others' APIs and 1 s for etcd, at the same time; the rest is slack for a
/// loaded machine).
const VIEW_BOUND: Duration = Duration::from_secs(6);
/// open-iscsi's ISID (OUI 00:02:3d): the OS's login.
const OS_ISID: [u8; 6] = [0x00, 0x02, 0x3d, 0x00, 0x00, 0x01];

fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    http::wait_for(WAIT, what, f)
}

/// A node with the admin token, serving `golden` as the default volatile image.
fn start_node(root: &Path, id: &str, etcd: &Etcd, golden: &Path) -> Node {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).expect("node directory");
    let (server, iscsi, http) = Server::start_on_free_ports(&dir, |iscsi, http| {
        Config::yaml(&format!(
            "portals: [\"127.0.0.1:{iscsi}\"]\n\
             state_dir: {state}\n\
             settings: {{nop_in_interval_secs: 0}}\n\
             images:\n  - {{name: base, path: {golden}}}\n\
             targets:\n  - name: {TARGET}\n    boot:\n      default: {{image: base, mode: volatile}}\n\
             boot_http: {{listen: \"127.0.0.1:{http}\"}}\n\
             api: {{listen: \"127.0.0.1:0\", token: {TOKEN}}}\n\
             cluster: {{name: {CLUSTER}, node_id: {id}, etcd: [\"{ep}\"], advertise: \"127.0.0.1:{iscsi}\", lease_ttl: {TTL}}}\n",
            state = dir.join("state").display(),
            golden = golden.display(),
            ep = etcd.endpoint(),
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

fn api(n: &Node) -> http::Api {
    http::Api {
        base: n.server.as_ref().expect("node running").api_url(),
        token: Some(TOKEN.to_string()),
    }
}

fn no_token(n: &Node) -> http::Api {
    http::Api {
        token: None,
        ..api(n)
    }
}

/// Wait until every node's `GET /api/v1/cluster` lists all `nodes`, each with its API.
fn wait_for_members(nodes: &[&Node]) {
    for n in nodes {
        wait_for(&format!("{} to list every node with its API", n.id), || {
            let r = api(n).get("/api/v1/cluster");
            let v = (r.status == 200).then(|| r.json())?;
            let listed = v["nodes"].as_array()?;
            (listed.len() == nodes.len() && listed.iter().all(|x| x["api"].is_string()))
                .then_some(())
        });
    }
}

fn mac(i: u8) -> String {
    format!("52:54:00:00:02:{i:02x}")
}

fn login_os(port: u16, who: &str) -> Client {
    let mut c = Client::connect(port);
    c.isid = OS_ISID;
    c.login(who, TARGET)
        .unwrap_or_else(|e| panic!("login of {who} on port {port} refused: {e:?}"));
    c
}

/// A client whose boot script (asked of `asked`) sends it to `on`: (MAC, initiator).
fn place_on(asked: &Node, on: &Node) -> (String, String) {
    for i in 1..=24 {
        let m = mac(i);
        let (who, port) = asked.script(&m);
        if port == on.iscsi {
            return (m, who);
        }
    }
    panic!("no client of 24 was placed on {}", on.id)
}

/// The row of `who` in `GET /api/v1/clients` of `n`, and how long the answer took.
fn row(n: &Node, who: &str) -> (Option<Value>, Duration) {
    let t0 = Instant::now();
    let v = api(n).get_json("/api/v1/clients");
    let took = t0.elapsed();
    let r = v["clients"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["initiator"] == who).cloned());
    (r, took)
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a server this test started and has not reaped.
    let r = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig})");
}

/// SIGSTOP `pid` and wait until every one of its threads is stopped (state `T` in
/// /proc/PID/task/*/stat): kill(2) returns once the signal is queued, and a thread that is
/// running or in an uninterruptible wait stops only when it next returns to user space.
fn pause(pid: u32) {
    signal(pid, libc::SIGSTOP);
    let stopped = || {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        let mut all = true;
        for t in tasks.flatten() {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the command name, which is in parentheses.
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            all &= matches!(state, Some(Some('T' | 't')));
        }
        all.then_some(())
    };
    wait_for("every thread of the paused node stopped", stopped);
}

/// Runs a closure when dropped (a paused process must not outlive a failed test).
struct Guard<F: FnMut()>(F);

impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

#[test]
fn every_node_answers_for_the_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let golden_bytes = common::random_bytes(GOLDEN_SIZE, 13);
    let golden = tmp.path().join("golden.img");
    std::fs::write(&golden, &golden_bytes).unwrap();
    let etcd = Etcd::start(tmp.path());
    let n1 = start_node(tmp.path(), "n1", &etcd, &golden);
    let n2 = start_node(tmp.path(), "n2", &etcd, &golden);
    let n3 = start_node(tmp.path(), "n3", &etcd, &golden);
    wait_for_members(&[&n1, &n2, &n3]);

    // A client placed on n1 (its script asked of n2), running, having written block 5.
    let (m, who) = place_on(&n2, &n1);
    let mut s = login_os(n1.iscsi, &who);
    s.write10(5, &[0xa5; 512]);

    // n2 and n3 list it with owner n1 and n1's live details.
    for n in [&n2, &n3, &n1] {
        let r = wait_for(&format!("{} to list {who} live on n1", n.id), || {
            let (r, _) = row(n, &who);
            r.filter(|r| r["owner"] == "n1" && r["sessions"] == 1 && r["stale"] == false)
        });
        assert_eq!(r["node"], "n1", "{r}");
        assert_eq!(r["target"], TARGET, "{r}");
        assert_eq!(r["state"], "running", "{r}");
        assert_eq!(r["image"], "base", "{r}");
        assert!(r["boots"].as_u64().unwrap_or(0) >= 1, "{r}");
        assert!(r["write_bytes"].as_u64().unwrap_or(0) >= 512, "{r}");
    }
    let (_, healthy) = row(&n2, &who);
    eprintln!("cluster view timing: n2 GET /api/v1/clients, all nodes answering: {healthy:?}");
    // Its page on n3: n1's detail, its session included.
    let d = api(&n3).get_json(&format!("/api/v1/clients/{}", seg(&who)));
    assert_eq!(d["node"], "n1", "{d}");
    assert_eq!(d["session_list"].as_array().map(Vec::len), Some(1), "{d}");
    // The nodes, all answering, from any node.
    let c = api(&n3).get_json("/api/v1/cluster");
    assert_eq!(c["node"], "n3", "{c}");
    assert_eq!(c["name"], CLUSTER, "{c}");
    let nodes = c["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{c}");
    for n in nodes {
        assert_eq!(n["answering"], true, "{c}");
        assert_eq!(n["lease_alive"], true, "{c}");
    }
    let n1_row = nodes.iter().find(|n| n["id"] == "n1").unwrap();
    assert_eq!(n1_row["clients"], 1, "{c}");
    assert_eq!(n1_row["portal"], format!("127.0.0.1:{}", n1.iscsi), "{c}");
    // The catalogue key is there (null: this cluster has no catalogue images).
    let imgs = api(&n2).get_json("/api/v1/images");
    assert!(
        imgs.as_object().unwrap().contains_key("catalogue"),
        "{imgs}"
    );

    // Hostile input on the new paths: 4xx, never a panic, nothing applied.
    let reset_path = format!("/api/v1/clients/{}/reset", seg(&who));
    assert_eq!(no_token(&n2).get("/api/v1/clients").status, 401);
    assert_eq!(no_token(&n2).get("/api/v1/cluster").status, 401);
    assert_eq!(no_token(&n2).post(&reset_path, "{}").status, 401);
    let r = api(&n2).post(&reset_path, "{not json");
    assert_eq!(r.status, 400, "{r:?}");
    let r = api(&n2).post(&reset_path, "[1,2]");
    assert_eq!(r.status, 400, "{r:?}");
    // An unknown field is refused by the owner, whose answer comes back as is.
    let r = api(&n2).post(&reset_path, "{\"force\": true}");
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("n1"), "{r:?}");
    let r = api(&n2).post_with(&reset_path, &[("Content-Type", "text/plain")], "{}");
    assert_eq!(r.status, 415, "{r:?}");
    let r = api(&n2).post("/api/v1/clients/iqn.2026-11.nobody%3Apc/reset", "{}");
    assert_eq!(r.status, 404, "{r:?}");
    let r = api(&n2).get("/api/v1/clients/iqn.2026-11.nobody%3Apc");
    assert_eq!(r.status, 404, "{r:?}");
    let r = api(&n2).post("/api/v1/cluster", "{}");
    assert!((400..500).contains(&r.status), "{r:?}");
    let r = api(&n2).get("/api/v1/clients?scope=local&x=%zz");
    assert_eq!(r.status, 200, "{r:?}");
    // An action that says it was forwarded already is never forwarded again.
    let r = api(&n2).post_with(
        &reset_path,
        &[
            ("Content-Type", "application/json"),
            ("X-Diskless-Forwarded-By", "n3"),
        ],
        "{}",
    );
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(s.read10(5, 1), vec![0xa5; 512], "nothing was reset yet");

    // The catalogue (written here as `diskless image push` and `image channel` would) with
    // the clients on each version, from the lifecycle records (a client of a gone node on
    // win11@v2, put as its node would have written it).
    let cat = format!("/diskless/{CLUSTER}/catalogue/win11");
    for (v, seq) in [("v1", 1), ("v2", 2)] {
        let rec = format!(
            "{{\"version\":\"{v}\",\"seq\":{seq},\"time_ms\":{seq}000,\"author\":\"alice\",\"message\":\"m{seq}\",\"size\":1048576,\"chunk_size\":1048576,\"block_size\":512,\"uid\":\"u{seq}\",\"manifest\":\"b/k{seq}\"}}"
        );
        assert!(etcd.ctl(&["put", &format!("{cat}/versions/{v}"), &rec]));
    }
    for (p, v) in [("latest", "v2"), ("production", "v1")] {
        let ptr = format!("{{\"version\":\"{v}\",\"by\":\"alice\",\"time_ms\":3000}}");
        assert!(etcd.ctl(&["put", &format!("{cat}/pointers/{p}"), &ptr]));
    }
    let ghost = "iqn.2026-11.test:ghost";
    let ghost_rec = format!(
        "{{\"target\":\"{TARGET}\",\"initiator\":\"{ghost}\",\"node\":\"n9\",\"seq\":1,\"updated_ms\":1000,\"disk\":{{\"image\":\"win11@v2\",\"version\":2,\"mode\":\"volatile\",\"lun0\":{{\"kind\":\"overlay\"}}}},\"state\":{{\"boots\":5}}}}"
    );
    assert!(etcd.ctl(&[
        "put",
        &format!("/diskless/{CLUSTER}/clients/{TARGET}/{ghost}/lifecycle"),
        &ghost_rec
    ]));
    let img = wait_for("n2's catalogue to show win11's two versions", || {
        let v = api(&n2).get_json("/api/v1/images");
        let img = v["catalogue"]["images"]
            .as_array()?
            .iter()
            .find(|i| i["name"] == "win11")?
            .clone();
        (img["versions"].as_array()?.len() == 2).then_some(img)
    });
    assert_eq!(img["versions"][0]["version"], "v1", "{img}");
    assert_eq!(img["versions"][1]["clients"], 1, "{img}");
    assert_eq!(img["versions"][0]["clients"], 0, "{img}");
    assert_eq!(img["pointers"]["latest"]["version"], "v2", "{img}");
    assert_eq!(img["pointers"]["production"]["version"], "v1", "{img}");
    // The gone node's client: listed from its record, nobody owns it, stale.
    let (g, _) = row(&n3, ghost);
    let g = g.unwrap_or_else(|| panic!("n3 does not list {ghost}"));
    assert_eq!(
        (g["stale"].clone(), g["boots"].clone()),
        (Value::Bool(true), 5.into()),
        "{g}"
    );
    assert!(g["owner"].is_null(), "{g}");
    assert_eq!(g["node"], "n9", "{g}");
    let r = api(&n3).post(&format!("/api/v1/clients/{}/reset", seg(ghost)), "{}");
    assert!(
        (400..500).contains(&r.status),
        "nobody resets a client nobody owns: {r:?}"
    );

    // A next-boot override asked on n2 and cleared on n3: both applied by n1.
    let nb_path = format!("/api/v1/clients/{}/next-boot", seg(&who));
    let r = api(&n2).post(&nb_path, "{\"mode\": \"persistent\"}");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["forwarded_to"], "n1");
    let d = api(&n1).get_json(&format!("/api/v1/clients/{}", seg(&who)));
    assert_eq!(d["next_boot"]["mode"], "persistent", "{d}");
    let r = api(&n3).delete(&nb_path);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["result"], "cleared");
    let d = api(&n1).get_json(&format!("/api/v1/clients/{}", seg(&who)));
    assert!(d["next_boot"].is_null(), "{d}");

    // A reset asked on n3 is applied by n1, the owner.
    let r = api(&n3).post(&reset_path, "{}");
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["forwarded_to"], "n1", "{v}");
    assert_eq!(v["result"], "reset", "{v}");
    // A disk on n1's overlay: nothing to recreate at the next login, nothing waited for.
    assert_eq!(v["rbd_recreate"], serde_json::json!([]), "{v}");
    assert_eq!(
        v["client"]["rbd_recreate_pending"],
        serde_json::json!([]),
        "{v}"
    );
    let audit = api(&n1).get_json("/api/v1/audit");
    assert!(
        audit.to_string().contains("(forwarded by node n3)"),
        "n1's audit log: {audit}"
    );
    wait_for("n1 to close the reset client's session", || {
        (!n1.sessions().contains(&who)).then_some(())
    });
    drop(s);
    // Its next boot: sent to n1 again, on a fresh disk.
    let (_, port) = n3.script(&m);
    assert_eq!(port, n1.iscsi, "the client stays with its owner");
    let mut s = login_os(port, &who);
    assert_eq!(
        s.read10(5, 1),
        golden_bytes[5 * 512..6 * 512].to_vec(),
        "the reset discarded what the client wrote"
    );
    let r = wait_for("n2 to show the reset", || {
        let (r, _) = row(&n2, &who);
        r.filter(|r| r["resets"].as_u64().unwrap_or(0) >= 1 && r["sessions"] == 1)
    });
    assert_eq!(r["node"], "n1", "{r}");

    // n1 paused: n2's views answer within the bound and mark n1's client stale.
    let pid = n1.server.as_ref().unwrap().pid();
    pause(pid);
    let resumed = std::cell::Cell::new(false);
    let _cont = Guard(|| {
        if !resumed.get() {
            signal(pid, libc::SIGCONT)
        }
    });
    let (r, took) = row(&n2, &who);
    let r = r.unwrap_or_else(|| panic!("n2 no longer lists {who}"));
    assert!(took < VIEW_BOUND, "n2's clients view took {took:?}");
    eprintln!("cluster view timing: n2 GET /api/v1/clients, n1 paused: {took:?}");
    assert_eq!(r["stale"], true, "{r}");
    assert!(
        r["stale_reason"].as_str().unwrap_or("").contains("n1"),
        "{r}"
    );
    assert_eq!(r["node"], "n1", "{r}");
    assert!(
        r["boots"].as_u64().unwrap_or(0) >= 1,
        "from the record: {r}"
    );
    let t0 = Instant::now();
    let c = api(&n2).get_json("/api/v1/cluster");
    let took = t0.elapsed();
    assert!(took < VIEW_BOUND, "n2's cluster view took {took:?}");
    eprintln!("cluster view timing: n2 GET /api/v1/cluster, n1 paused: {took:?}");
    if let Some(n) = c["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "n1")
    {
        assert_eq!(n["answering"], false, "{c}");
    }
    let t0 = Instant::now();
    let d = api(&n2).get_json(&format!("/api/v1/clients/{}", seg(&who)));
    assert!(
        t0.elapsed() < VIEW_BOUND,
        "n2's client view took {:?}",
        t0.elapsed()
    );
    assert_eq!(d["stale"], true, "{d}");

    // Its lease gone, nobody owns the client: nobody resets it (nothing applied on n2).
    wait_for("the paused node's lease to run out", || {
        (!etcd.owners(CLUSTER).values().any(|o| o == "n1")).then_some(())
    });
    let (r, took) = row(&n2, &who);
    let r = r.unwrap_or_else(|| panic!("n2 no longer lists {who}"));
    assert!(took < VIEW_BOUND, "n2's clients view took {took:?}");
    assert_eq!(r["stale"], true, "{r}");
    assert!(r["owner"].is_null(), "{r}");
    let r = api(&n2).post(&reset_path, "{}");
    assert!((400..500).contains(&r.status), "{r:?}");
    assert!(!n2.sessions().contains(&who));

    // n1 continues: it claims its open client back and answers for it again.
    signal(pid, libc::SIGCONT);
    resumed.set(true);
    wait_for("n2 to list the client live on n1 again", || {
        let (r, _) = row(&n2, &who);
        r.filter(|r| r["owner"] == "n1" && r["stale"] == false)
    });
    assert_eq!(s.read10(6, 1), golden_bytes[6 * 512..7 * 512].to_vec());
}

#[test]
fn console_shows_the_nodes_and_a_remote_client() {
    require_browser_tools();
    let tmp = tempfile::tempdir().unwrap();
    let golden = tmp.path().join("golden.img");
    std::fs::write(&golden, common::random_bytes(GOLDEN_SIZE, 17)).unwrap();
    let etcd = Etcd::start(tmp.path());
    let n1 = start_node(tmp.path(), "n1", &etcd, &golden);
    let n2 = start_node(tmp.path(), "n2", &etcd, &golden);
    wait_for_members(&[&n1, &n2]);
    let (_, who) = place_on(&n2, &n1);
    let _s = login_os(n1.iscsi, &who);
    wait_for("n2 to list the client on n1", || {
        let (r, _) = row(&n2, &who);
        r.filter(|r| r["node"] == "n1" && r["sessions"] == 1)
    });
    let shots = repo().join("target/console-screenshots/cluster");
    let _ = std::fs::remove_dir_all(&shots);
    let url = api(&n2).base;
    let mut browser = Browser::start(
        "cluster.mjs",
        &[
            ("CONSOLE_URL", &url),
            ("CONSOLE_TOKEN", &TOKEN),
            ("CLIENT", &who),
            ("OWNER", &"n1"),
            ("NODES", &"n1,n2"),
            ("SHOTS", &shots),
        ],
        Duration::from_secs(180),
    );
    browser.expect("shown");
    // n1 paused: n2's console marks its client stale.
    let pid = n1.server.as_ref().unwrap().pid();
    pause(pid);
    let _cont = Guard(|| signal(pid, libc::SIGCONT));
    browser.say("paused");
    browser.expect("done");
    let (status, _) = browser.finish();
    assert!(
        status.success(),
        "browser script: {status} (stdout {:?})",
        browser.seen
    );
    for f in [
        "01-nodes-and-remote-client.png",
        "03-owner-paused-stale.png",
    ] {
        assert!(shots.join(f).exists(), "no screenshot {f}");
    }
}
