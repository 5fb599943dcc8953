//! A cluster of diskless nodes placed through a real etcd (Debian's etcd-server), all on
//! 127.0.0.1 with ports of their own (docs/scale-out.md):
//!
//! - `placement_redirect_failover_drain`: three nodes; clients fetch their boot script from
//!   one node and are spread over all three; a login to the wrong node is redirected
//!   (status 0x0101, `TargetAddress=127.0.0.1:PORT`, no `,tpgt`) and libiscsi's iscsi-inq
//!   follows it; a node killed with SIGKILL loses its clients after its lease TTL and their
//!   next boots land on the others, whose sessions never notice; no node ever serves a client
//!   another node owns; `diskless node drain` sends new boots elsewhere and hands a client
//!   over at its next boot; `diskless cluster status` shows all of it.
//! - `etcd_loss_keeps_sessions_refuses_new_logins`: etcd killed: open sessions go on reading
//!   and writing, new logins are refused with status 0x0301 (service unavailable) once the
//!   node's lease may have run out; etcd back: logins are placed again.
//!
//! - `tls_and_credentials`: etcd with TLS, client certificates and `auth enable`; a node with
//!   the right CA, certificate and password joins and places a client; a node with a wrong
//!   password and one that trusts another CA are refused with errors that say so (in their
//!   log and from `diskless cluster status`); `check-config` names a missing or non-PEM file.
//! - `shared_next_boot_and_configuration`: a next-boot override set on one node reaches the
//!   client's owner through etcd (stored in its state directory; the client's boot there
//!   gets the other image) and its clearing too; `diskless cluster config push` adds a
//!   target on every node, a document with a node key is refused at push, an invalid one
//!   written into etcd is refused by every node with the reason (the running configuration
//!   stays), `cluster config clear` brings each node back to its own file.
//! - `lifecycle_record_follows_the_client`: a client's lifecycle record in etcd names the
//!   node that serves it and its disk; its node killed with SIGKILL, the client's next boot on
//!   another node continues from the record (boot 2, not a first boot); `diskless cluster
//!   clients` shows it; that node paused (SIGSTOP) past its lease, the client moves on (boot
//!   3), and the paused node's late write is refused by the ownership comparison.
//! - `slow_etcd_is_bounded`: etcd stops answering one node (a proxy holds its connections
//!   open and silent: slow, not refused): that node answers a new login with 0x0301 within
//!   the raw client's 5 s answer limit (never a hang), its open session goes on reading and
//!   writing, the other node places the new client; etcd answers again: the node places
//!   logins again, and no client has two owners.
//! - `etcd_errors_refuse_placement_clearly`: etcd answers with errors (its space quota
//!   exceeded: the NOSPACE alarm refuses writes): a new client's login is refused with 0x0301
//!   and the node's log names etcd's error; the open session goes on; once the operator frees
//!   space (delete, compact, defrag, disarm) the node places logins again.
//!
//! Waits are for conditions (a lease gone, a status shown), never fixed sleeps.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/http.rs"]
mod http;
#[path = "common/raw.rs"]
mod raw;
#[path = "common/stallproxy.rs"]
mod stallproxy;

use cluster::Node;
use etcd::Etcd;
use raw::Client;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.org.diskless:boot";
const CLUSTER: &str = "t";
const GOLDEN_SIZE: usize = 4 << 20;
/// Lease TTL of the nodes: short, so that a failure shows within seconds.
const TTL: u64 = 2;
/// Longest wait for any condition.
const WAIT: Duration = Duration::from_secs(30);

fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    http::wait_for(WAIT, what, f)
}

/// A node of the test's cluster serving `golden` (a file) as the default volatile image.
fn start_node(root: &Path, id: &str, etcd: &Etcd, golden: &Path) -> Node {
    start_node_with(root, id, etcd, golden, "")
}

/// As [`start_node`], with more keys in its `cluster:` mapping (`, tls: ..., auth: ...`).
fn start_node_with(root: &Path, id: &str, etcd: &Etcd, golden: &Path, cluster_extra: &str) -> Node {
    let spec = cluster::Spec {
        cluster: CLUSTER,
        target: TARGET,
        etcd: etcd.endpoint(),
        ttl: TTL,
        images: format!("  - {{name: base, path: {}}}\n", golden.display()),
        image: "base",
        extra: String::new(),
        cluster_extra: cluster_extra.to_string(),
    };
    Node::start(root, id, &spec)
}

/// Wait until `diskless cluster status` lists every node and each node's own view counts
/// them all.
fn wait_for_members(nodes: &[&Node]) {
    let n = nodes.len();
    wait_for("every node in cluster status", || {
        status(&nodes[0].config()).filter(|s| s.len() == n)
    });
    cluster::wait_for_views(nodes.iter().copied(), WAIT);
}

/// `diskless ARGS -c CONFIG`: stdout, and whether it succeeded.
fn cli(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(args)
        .arg("-c")
        .arg(config)
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

/// `diskless cluster status --json`: node id → (draining, sessions, clients).
fn status(config: &Path) -> Option<BTreeMap<String, (bool, u64, u64)>> {
    let (ok, out) = cli(config, &["cluster", "status", "--json"]);
    if !ok {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    Some(
        v["nodes"]
            .as_array()?
            .iter()
            .filter_map(|n| {
                Some((
                    n["id"].as_str()?.to_string(),
                    (
                        n["draining"].as_bool()?,
                        n["load"].as_u64()?,
                        n["clients"].as_u64()?,
                    ),
                ))
            })
            .collect(),
    )
}

fn mac(i: u8) -> String {
    format!("52:54:00:00:01:{i:02x}")
}

/// Log in as `who` on `port`; the open session.
fn login(port: u16, who: &str) -> Client {
    let mut c = Client::connect(port);
    c.login(who, TARGET)
        .unwrap_or_else(|e| panic!("login of {who} on port {port} refused: {e:?}"));
    c
}

/// The first Login Response to a Normal login of `who` on `port`: (status, keys).
fn first_answer(port: u16, who: &str) -> ((u8, u8), Vec<(String, String)>) {
    let mut c = Client::connect(port);
    let mut pairs = vec![
        ("InitiatorName", who),
        ("TargetName", TARGET),
        ("SessionType", "Normal"),
    ];
    pairs.extend_from_slice(raw::DEFAULT_KEYS);
    c.login_request(1, 3, true, false, raw::keys_text(&pairs))
        .unwrap();
    let (r, data) = c.login_response(raw::ANSWER);
    ((r.status_class, r.status_detail), raw::parse_keys(&data))
}

/// Wait until `node` places a new login of `who` again: it serves it (0x0000) or redirects it
/// to the owner with a `TargetAddress` (0x0101).
fn wait_placed(node: &Node, who: &str, what: &str) {
    wait_for(what, || {
        let (st, keys) = first_answer(node.iscsi, who);
        match st {
            (0, 0) => Some(()),
            (1, 1) => keys.iter().any(|(k, _)| k == "TargetAddress").then_some(()),
            _ => None,
        }
    });
}

fn marker(i: u8) -> Vec<u8> {
    vec![i; 512]
}

/// No node serves a client whose ownership key names another node.
fn check_no_split_brain(etcd: &Etcd, nodes: &[&Node]) {
    let owners = etcd.owners(CLUSTER);
    for n in nodes {
        for who in n.sessions() {
            let owner = owners.get(&who).map(String::as_str);
            assert_eq!(
                owner,
                Some(n.id.as_str()),
                "{who} has a session on {} but its owner is {owner:?}",
                n.id
            );
        }
    }
}

#[test]
fn placement_redirect_failover_drain() {
    common::require_tool("iscsi-inq");
    let tmp = tempfile::tempdir().unwrap();
    let golden = tmp.path().join("golden.img");
    std::fs::write(&golden, common::random_bytes(GOLDEN_SIZE, 5)).unwrap();
    let etcd = Etcd::start(tmp.path());
    let n1 = start_node(tmp.path(), "n1", &etcd, &golden);
    let n2 = start_node(tmp.path(), "n2", &etcd, &golden);
    let mut n3 = start_node(tmp.path(), "n3", &etcd, &golden);
    wait_for_members(&[&n1, &n2, &n3]);
    let by_port: BTreeMap<u16, &str> = [(n1.iscsi, "n1"), (n2.iscsi, "n2"), (n3.iscsi, "n3")]
        .into_iter()
        .collect();

    // Nine clients, every script fetched from n1 (one URL in the DHCP answer): spread 3/3/3,
    // each logs in where its script says and writes a marker.
    let mut clients: Vec<(String, u16, Client)> = Vec::new();
    let mut script_time = Duration::ZERO;
    for i in 0..9u8 {
        let t = Instant::now();
        let (who, port) = n1.script(&mac(i));
        script_time += t.elapsed();
        let mut c = login(port, &who);
        c.write10(100, &marker(i));
        clients.push((who, port, c));
    }
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, port, _) in &clients {
        *per_node.entry(by_port[port]).or_default() += 1;
    }
    assert_eq!(
        per_node,
        [("n1", 3), ("n2", 3), ("n3", 3)].into_iter().collect(),
        "clients spread over the nodes"
    );
    let s = wait_for("status showing 3 clients and 3 sessions per node", || {
        status(&n1.config()).filter(|s| {
            s.values()
                .all(|&(_, load, clients)| load == 3 && clients == 3)
        })
    });
    assert!(s.values().all(|&(d, _, _)| !d));
    check_no_split_brain(&etcd, &[&n1, &n2, &n3]);

    // Racing placements: the same new clients' scripts fetched from all three nodes at once
    // must all name one node (the ownership key is created only if absent).
    for i in 40..46u8 {
        let answers: Vec<(String, u16)> = std::thread::scope(|sc| {
            let hs: Vec<_> = [&n1, &n2, &n3]
                .into_iter()
                .flat_map(|n| [n, n])
                .map(|n| sc.spawn(move || n.script(&mac(i))))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ports: BTreeSet<u16> = answers.iter().map(|a| a.1).collect();
        assert_eq!(
            ports.len(),
            1,
            "client {i} placed on several nodes at once: {answers:?}"
        );
    }

    // Sticky: the same client's script from another node names the same portal.
    let (who0, port0, _) = &clients[0];
    let (_, again) = n2.script(&mac(0));
    assert_eq!(again, *port0, "a placed client stays on its node");

    // A login on the wrong node: redirected to the owner's portal, with the port and
    // without a portal group tag (RFC 7143 §11.13.5, §13.8).
    let wrong = if *port0 == n2.iscsi {
        n3.iscsi
    } else {
        n2.iscsi
    };
    let (st, keys) = first_answer(wrong, who0);
    assert_eq!(st, (1, 1), "status target moved temporarily");
    assert_eq!(
        keys,
        vec![("TargetAddress".to_string(), format!("127.0.0.1:{port0}"))]
    );
    // libiscsi follows it: a client placed (script) but not yet logged in, sent to a node
    // that is not its own.
    let (late, late_port) = n1.script(&mac(20));
    let wrong = if late_port == n1.iscsi {
        n2.iscsi
    } else {
        n1.iscsi
    };
    let out = common::run(
        "iscsi-inq",
        &[
            "-i",
            &late,
            &format!("iscsi://127.0.0.1:{wrong}/{TARGET}/0"),
        ],
    )
    .ok();
    assert!(
        out.stdout.contains("DISKLESS"),
        "iscsi-inq through a redirect: {}",
        out.all()
    );
    assert!(
        [&n1, &n2, &n3]
            .iter()
            .find(|n| n.iscsi == wrong)
            .unwrap()
            .stderr()
            .contains("login redirected"),
        "the wrong node logged the redirection"
    );

    // Each node's /metrics: registered, three nodes; the wrong node counted a redirection.
    wait_for("n1's metrics showing three live nodes", || {
        let m = n1.metrics();
        (m.contains("diskless_cluster{what=\"registered\"} 1")
            && m.contains("diskless_cluster{what=\"nodes\"} 3"))
        .then_some(())
    });
    let wrong_node = [&n1, &n2, &n3]
        .into_iter()
        .find(|n| n.iscsi == wrong)
        .unwrap();
    assert!(
        wrong_node
            .metrics()
            .contains("diskless_logins_total{outcome=\"redirected\""),
        "{}",
        wrong_node.metrics()
    );

    // Kill -9 n3: after its lease TTL its clients are nobody's; their next boots land on
    // n1 and n2, whose sessions go on untouched.
    let lost: Vec<usize> = (0..clients.len())
        .filter(|&i| clients[i].1 == n3.iscsi)
        .collect();
    let t0 = Instant::now();
    n3.server.take().unwrap().kill9();
    wait_for(
        "n3's lease to run out (membership and ownership gone)",
        || {
            let s = status(&n1.config())?;
            let owners = etcd.owners(CLUSTER);
            (!s.contains_key("n3") && !owners.values().any(|o| o == "n3")).then_some(())
        },
    );
    let gone_after = t0.elapsed();
    eprintln!(
        "measured: boot script with placement (claim in etcd) {:?} on average; a killed node's clients free after {gone_after:?} (TTL {TTL} s)",
        script_time / 9
    );
    assert!(
        gone_after < Duration::from_secs(TTL * 4),
        "the lease of a dead node ran out in {gone_after:?} (TTL {TTL} s)"
    );
    for &i in &lost {
        let (who, port) = n1.script(&mac(i as u8));
        assert_eq!(who, clients[i].0);
        assert!(
            port == n1.iscsi || port == n2.iscsi,
            "{who} re-placed on {port}"
        );
        let mut c = login(port, &who);
        // A volatile disk on a new node: the golden image, no marker.
        assert_ne!(c.read10(100, 1), marker(i as u8));
        c.write10(100, &marker(i as u8));
        clients[i] = (who, port, c);
    }
    for (i, (who, port, c)) in clients.iter_mut().enumerate() {
        assert_eq!(
            c.read10(100, 1),
            marker(i as u8),
            "{who} on {port} lost its data"
        );
    }
    check_no_split_brain(&etcd, &[&n1, &n2]);

    // Drain n2: new boots go to n1 only; n2 still serves its running clients; a client of
    // n2 is handed over at its next boot.
    let (ok, out) = cli(&n1.config(), &["node", "drain", "n2"]);
    assert!(ok, "node drain: {out}");
    assert!(out.contains("draining"), "{out}");
    wait_for("n2 shown draining", || {
        status(&n1.config()).filter(|s| s.get("n2").is_some_and(|n| n.0))
    });
    let (_, text) = cli(&n1.config(), &["cluster", "status"]);
    assert!(text.contains("n2") && text.contains("draining"), "{text}");
    for i in 30..33u8 {
        let (_, port) = n2.script(&mac(i));
        assert_eq!(
            port, n1.iscsi,
            "a new client is not placed on a draining node"
        );
    }
    let on_n2: Vec<usize> = (0..clients.len())
        .filter(|&i| clients[i].1 == n2.iscsi)
        .collect();
    assert!(on_n2.len() >= 2, "n2 serves {on_n2:?}");
    // A running client of n2 keeps its node (its boot script fetch with a session open is not
    // a new boot it could move at).
    let keep = on_n2[0];
    let (_, port) = n2.script(&mac(keep as u8));
    assert_eq!(port, n2.iscsi);
    assert_eq!(clients[keep].2.read10(100, 1), marker(keep as u8));
    // Another one reboots: its session ends, its next script moves it to n1.
    let moving = on_n2[1];
    let who = clients[moving].0.clone();
    drop(clients.remove(moving));
    wait_for("the rebooting client's session gone from n2", || {
        (!n2.sessions().contains(&who)).then_some(())
    });
    let (_, port) = n2.script(&mac(moving as u8));
    assert_eq!(
        port, n1.iscsi,
        "a drained node hands a client over at its next boot"
    );
    let _c = login(port, &who);
    assert_eq!(
        etcd.owners(CLUSTER).get(&who).map(String::as_str),
        Some("n1")
    );
    check_no_split_brain(&etcd, &[&n1, &n2]);
    let owned: BTreeSet<String> = etcd.owners(CLUSTER).into_values().collect();
    assert!(!owned.contains("n3"));

    // Undo: n2 takes new clients again.
    let (ok, out) = cli(&n1.config(), &["node", "drain", "n2", "--undo"]);
    assert!(ok, "{out}");
    wait_for("n2 not draining", || {
        status(&n1.config()).filter(|s| s.get("n2").is_some_and(|n| !n.0))
    });
}

#[test]
fn etcd_loss_keeps_sessions_refuses_new_logins() {
    let tmp = tempfile::tempdir().unwrap();
    let golden = tmp.path().join("golden.img");
    std::fs::write(&golden, common::random_bytes(GOLDEN_SIZE, 6)).unwrap();
    let mut etcd = Etcd::start(tmp.path());
    let n1 = start_node(tmp.path(), "n1", &etcd, &golden);
    let n2 = start_node(tmp.path(), "n2", &etcd, &golden);
    wait_for_members(&[&n1, &n2]);
    // A running client on n1.
    let (who, port) = n1.script(&mac(1));
    assert_eq!(port, n1.iscsi);
    let mut running = login(port, &who);
    running.write10(7, &marker(1));
    // Two more placed, not logged in: the second lands on n1 too (1 client each, then n1).
    let (_, p2) = n1.script(&mac(2));
    assert_eq!(p2, n2.iscsi);
    let (idle, p3) = n1.script(&mac(3));
    assert_eq!(p3, n1.iscsi);

    etcd.kill9();
    // A client etcd never saw: refused at once, with a clear status.
    let (st, _) = first_answer(n1.iscsi, "iqn.2026-11.test:never-seen");
    assert_eq!(st, (3, 1), "service unavailable while etcd is unreachable");
    assert!(n1
        .stderr()
        .contains("login refused: cannot place the client"));
    // Once the lease may have run out at etcd, even a client n1 owns is not served from a
    // new login (another node may own it by then) ...
    wait_for("n1 to refuse a new login of a client it owns", || {
        (first_answer(n1.iscsi, &idle).0 == (3, 1)).then_some(())
    });
    // ... but its open session goes on reading and writing.
    assert_eq!(running.read10(7, 1), marker(1));
    running.write10(8, &marker(2));
    assert_eq!(running.read10(8, 1), marker(2));
    assert!(n1.stderr().contains("etcd unreachable"));

    // etcd back (same data): the nodes renew or re-register and place logins again.
    etcd.spawn();
    wait_placed(&n2, "iqn.2026-11.test:after", "a new client placed again");
    assert_eq!(running.read10(8, 1), marker(2));
    check_no_split_brain(&etcd, &[&n1, &n2]);
}

#[test]
fn slow_etcd_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let golden = tmp.path().join("golden.img");
    std::fs::write(&golden, common::random_bytes(GOLDEN_SIZE, 9)).unwrap();
    let etcd = Etcd::start(tmp.path());
    let proxy = stallproxy::StallProxy::start(etcd.endpoint().trim_start_matches("http://"));
    // n1 reaches etcd only through the proxy; n2 directly.
    let spec = cluster::Spec {
        cluster: CLUSTER,
        target: TARGET,
        etcd: format!("http://127.0.0.1:{}", proxy.port),
        ttl: TTL,
        images: format!("  - {{name: base, path: {}}}\n", golden.display()),
        image: "base",
        extra: String::new(),
        cluster_extra: String::new(),
    };
    let n1 = Node::start(tmp.path(), "n1", &spec);
    let n2 = start_node(tmp.path(), "n2", &etcd, &golden);
    wait_for_members(&[&n1, &n2]);
    let (who, port) = n1.script(&mac(1));
    assert_eq!(port, n1.iscsi);
    let mut running = login(port, &who);
    running.write10(3, &marker(3));

    proxy.stall(true);
    // A client etcd never saw: n1 cannot place it; the answer comes (first_answer waits at
    // most raw::ANSWER) and says service unavailable.
    let t = Instant::now();
    let (st, _) = first_answer(n1.iscsi, "iqn.2026-11.test:while-slow");
    println!(
        "measured: login answered by the node with a silent etcd in {:?}",
        t.elapsed()
    );
    assert_eq!(st, (3, 1), "service unavailable while etcd does not answer");
    assert!(n1
        .stderr()
        .contains("login refused: cannot place the client"));
    // The open session goes on.
    assert_eq!(running.read10(3, 1), marker(3));
    running.write10(4, &marker(4));
    assert_eq!(running.read10(4, 1), marker(4));
    // The healthy node places new clients meanwhile.
    let (st, _) = first_answer(n2.iscsi, "iqn.2026-11.test:to-n2");
    assert!(
        st == (0, 0) || st == (1, 1),
        "n2 serves or redirects: {st:?}"
    );

    proxy.stall(false);
    wait_placed(
        &n1,
        "iqn.2026-11.test:after-slow",
        "n1 to place a new login again",
    );
    assert_eq!(running.read10(4, 1), marker(4));
    check_no_split_brain(&etcd, &[&n1, &n2]);
}

#[test]
fn etcd_errors_refuse_placement_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let golden = tmp.path().join("golden.img");
    std::fs::write(&golden, common::random_bytes(GOLDEN_SIZE, 10)).unwrap();
    // A small space quota, so that the test can fill it (etcd then raises NOSPACE and refuses
    // every write: puts, transactions that put, lease grants).
    let etcd = Etcd::start_args(tmp.path(), &["--quota-backend-bytes=4194304"]);
    let n1 = start_node(tmp.path(), "n1", &etcd, &golden);
    let n2 = start_node(tmp.path(), "n2", &etcd, &golden);
    wait_for_members(&[&n1, &n2]);
    let (who, port) = n1.script(&mac(1));
    let mut running = login(port, &who);
    running.write10(5, &marker(5));

    let value = "x".repeat(120 * 1024);
    let mut i = 0;
    wait_for("etcd's NOSPACE alarm", || {
        i += 1;
        etcd.ctl(&["put", &format!("/fill/{i}"), &value]);
        etcd.ctl_out(&["alarm", "list"])
            .filter(|a| a.contains("NOSPACE"))
    });
    let (st, _) = first_answer(n1.iscsi, "iqn.2026-11.test:while-full");
    assert_eq!(st, (3, 1), "service unavailable while etcd refuses writes");
    wait_for("n1's log to name etcd's error", || {
        n1.stderr()
            .contains("database space exceeded")
            .then_some(())
    });
    assert_eq!(running.read10(5, 1), marker(5));
    running.write10(6, &marker(6));
    assert_eq!(running.read10(6, 1), marker(6));

    // The operator's remedy: free the space, compact, defragment, disarm.
    assert!(etcd.ctl(&["del", "/fill/", "--prefix"]));
    let status = etcd
        .ctl_out(&["endpoint", "status", "-w", "json"])
        .expect("endpoint status");
    let rev = serde_json::from_str::<serde_json::Value>(&status)
        .ok()
        .and_then(|v| v[0]["Status"]["header"]["revision"].as_u64())
        .expect("revision");
    assert!(etcd.ctl(&["compact", &rev.to_string()]));
    assert!(etcd.ctl(&["defrag"]));
    assert!(etcd.ctl(&["alarm", "disarm"]));
    wait_placed(
        &n1,
        "iqn.2026-11.test:after-full",
        "n1 to place a new login again",
    );
    assert_eq!(running.read10(6, 1), marker(6));
    check_no_split_brain(&etcd, &[&n1, &n2]);
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a server this test started and has not reaped.
    let r = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig})");
}

#[test]
fn paused_node_loses_its_lease_without_split_brain() {
    let tmp = tempfile::tempdir().unwrap();
    let golden = tmp.path().join("golden.img");
    std::fs::write(&golden, common::random_bytes(GOLDEN_SIZE, 7)).unwrap();
    let etcd = Etcd::start(tmp.path());
    let n1 = start_node(tmp.path(), "n1", &etcd, &golden);
    let n2 = start_node(tmp.path(), "n2", &etcd, &golden);
    wait_for_members(&[&n1, &n2]);
    // A on n1 with a session open; B placed on n1 (n1, n2, n1), not booted yet.
    let (a, pa) = n2.script(&mac(1));
    assert_eq!(pa, n1.iscsi);
    let mut running = login(pa, &a);
    running.write10(9, &marker(9));
    let (_, p2) = n2.script(&mac(2));
    assert_eq!(p2, n2.iscsi);
    let (b, pb) = n2.script(&mac(3));
    assert_eq!(pb, n1.iscsi);

    // SIGSTOP n1 past its TTL: its lease runs out, its clients are nobody's.
    let pid = n1.server.as_ref().unwrap().pid();
    signal(pid, libc::SIGSTOP);
    let resumed = std::cell::Cell::new(false);
    let _cont = Guard(|| {
        if !resumed.get() {
            signal(pid, libc::SIGCONT)
        }
    });
    wait_for("the paused node's lease to run out", || {
        let s = status(&n2.config())?;
        let owners = etcd.owners(CLUSTER);
        (!s.contains_key("n1") && !owners.values().any(|o| o == "n1")).then_some(())
    });
    // B boots meanwhile: it lands on n2.
    let (_, pb) = n2.script(&mac(3));
    assert_eq!(pb, n2.iscsi);
    let _b = login(pb, &b);

    // n1 continues: it registers again and claims back A (its session is open there and
    // nobody took it); B stays with n2.
    signal(pid, libc::SIGCONT);
    resumed.set(true);
    wait_for("n1 back, owning its running client again", || {
        let s = status(&n2.config())?;
        let owners = etcd.owners(CLUSTER);
        (s.contains_key("n1") && owners.get(&a).map(String::as_str) == Some("n1")).then_some(())
    });
    assert_eq!(etcd.owners(CLUSTER).get(&b).map(String::as_str), Some("n2"));
    let log = n1.stderr();
    assert!(
        log.contains("lease expired at etcd: registering again")
            && log.contains("claimed back an open client"),
        "{log}"
    );
    assert_eq!(
        running.read10(9, 1),
        marker(9),
        "the paused node's session goes on"
    );
    check_no_split_brain(&etcd, &[&n1, &n2]);
}

/// Runs a closure when dropped (a paused process must not outlive a failed test).
struct Guard<F: FnMut()>(F);

impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

#[test]
fn tls_and_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let pki = etcd::Pki::make(&root.join("pki"), "diskless-test-ca");
    let rogue = etcd::Pki::make(&root.join("rogue"), "rogue-ca");
    let mut etcd = Etcd::start_with(&root.join("etcd"), Some(pki.clone()));
    etcd.enable_auth("diskless", "s3cret-pw");
    std::fs::write(root.join("good.pass"), "s3cret-pw\n").unwrap();
    std::fs::write(root.join("bad.pass"), "not-the-password\n").unwrap();
    let golden = root.join("golden.img");
    std::fs::write(&golden, vec![7u8; GOLDEN_SIZE]).unwrap();
    let security = |ca: &etcd::Pki, pass: &str| {
        format!(
            ", tls: {{ca: {}, cert: {}, key: {}}}, auth: {{user: diskless, password_file: {}}}",
            ca.path("ca.pem").display(),
            ca.path("client.pem").display(),
            ca.path("client.key").display(),
            root.join(pass).display()
        )
    };

    let n1 = start_node_with(root, "n1", &etcd, &golden, &security(&pki, "good.pass"));
    let n2 = start_node_with(root, "n2", &etcd, &golden, &security(&pki, "bad.pass"));
    let n3 = start_node_with(root, "n3", &etcd, &golden, &security(&rogue, "good.pass"));

    // n1 joins over TLS with its credentials and places a client on itself.
    wait_for("n1 in cluster status over TLS", || {
        status(&n1.config()).filter(|s| s.keys().eq(["n1"]))
    });
    let (who, port) = n1.script(&mac(1));
    assert_eq!(port, n1.iscsi, "the only live node serves the client");
    assert_eq!(
        etcd.owners(CLUSTER).get(&who).map(String::as_str),
        Some("n1")
    );

    // n2 (wrong password) and n3 (trusts another CA) are refused, and say why.
    wait_for("n2 to log the refused credentials", || {
        n2.stderr()
            .contains("etcd refused the credentials of cluster.auth")
            .then_some(())
    });
    wait_for("n3 to log the TLS failure", || {
        n3.stderr().contains("TLS with etcd failed").then_some(())
    });
    let (ok, out) = cli(&n2.config(), &["cluster", "status"]);
    assert!(
        !ok && out.contains("etcd refused the credentials of cluster.auth"),
        "{out}"
    );
    assert!(out.contains("authentication failed"), "{out}");
    let (ok, out) = cli(&n3.config(), &["cluster", "status"]);
    assert!(!ok && out.contains("TLS with etcd failed"), "{out}");
    assert!(out.to_ascii_lowercase().contains("certificate"), "{out}");
    // Neither got in: n1 is still alone, and n2's script endpoint cannot place anyone.
    assert_eq!(status(&n1.config()).map(|s| s.len()), Some(1));
    assert!(!n2.stderr().contains("registered in the cluster"));
    assert!(!n3.stderr().contains("registered in the cluster"));

    // check-config names a missing CA file and a key file that is not PEM.
    let yaml = std::fs::read_to_string(n1.config()).unwrap();
    for (from, to, says) in [
        (
            pki.path("ca.pem").display().to_string(),
            root.join("missing.pem").display().to_string(),
            "cluster.tls.ca",
        ),
        (
            pki.path("client.key").display().to_string(),
            root.join("good.pass").display().to_string(),
            "cluster.tls.key",
        ),
    ] {
        let bad = root.join("bad.yaml");
        std::fs::write(&bad, yaml.replace(&from, &to)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_diskless"))
            .args(["check-config", "-c"])
            .arg(&bad)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{says}: {err}");
    }
}

/// `dir_name` of src/boot/mod.rs: how a target or initiator name becomes a directory.
fn dir_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.') {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

#[test]
fn shared_next_boot_and_configuration() {
    const SHARED_TARGET: &str = "iqn.2026-11.org.diskless:shared";
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let etcd = Etcd::start(root);
    let (base, alt) = (root.join("base.img"), root.join("alt.img"));
    std::fs::write(&base, vec![7u8; GOLDEN_SIZE]).unwrap();
    std::fs::write(&alt, vec![9u8; GOLDEN_SIZE]).unwrap();
    let images = format!(
        "  - {{name: base, path: {}}}\n  - {{name: alt, path: {}}}\n",
        base.display(),
        alt.display()
    );
    let spec = cluster::Spec {
        cluster: CLUSTER,
        target: TARGET,
        etcd: etcd.endpoint(),
        ttl: TTL,
        images: images.clone(),
        image: "base",
        extra: String::new(),
        cluster_extra: String::new(),
    };
    let n1 = Node::start(root, "n1", &spec);
    let n2 = Node::start(root, "n2", &spec);
    wait_for_members(&[&n1, &n2]);

    // A client placed on one node gets a next-boot override set on the *other* node.
    let (who, port) = n1.script(&mac(5));
    let (owner, other) = if port == n1.iscsi {
        (&n1, &n2)
    } else {
        (&n2, &n1)
    };
    assert_eq!(port, owner.iscsi);
    let (ok, out) = cli(
        &other.config(),
        &["client", "next-boot", &who, "--image", "alt"],
    );
    assert!(ok, "next-boot on {}: {out}", other.id);
    let key = format!("/diskless/{CLUSTER}/clients/{TARGET}/{who}/next-boot");
    let stored = etcd.ctl_out(&["get", "--print-value-only", &key]).unwrap();
    assert!(stored.contains("\"image\":\"alt\""), "{key}: {stored}");
    // The owner takes it from etcd (stored in its own state directory, so it outlives a
    // loss of etcd and a restart) and the client's boot there gets the other image.
    let file = owner
        .dir
        .join("state/clients")
        .join(dir_name(TARGET))
        .join(dir_name(&who))
        .join("next-boot.yaml");
    wait_for("the owner to store the override from etcd", || {
        std::fs::read_to_string(&file)
            .ok()
            .filter(|t| t.contains("alt"))
    });
    let mut c = login(owner.iscsi, &who);
    assert_eq!(
        c.read10(0, 1),
        vec![9u8; 512],
        "the boot on the owner takes alt"
    );
    drop(c);
    // Cleared on the other node: cleared on the owner too.
    let (ok, out) = cli(&other.config(), &["client", "next-boot", &who, "--clear"]);
    assert!(ok, "{out}");
    wait_for("the owner to drop the override", || {
        (!file.exists()).then_some(())
    });

    // Shared configuration: one more target, pushed once, served by both nodes.
    let shared = format!(
        "images:\n{images}targets:\n  - name: {TARGET}\n    boot:\n      default: {{image: base, mode: volatile}}\n  \
         - name: {SHARED_TARGET}\n    boot:\n      default: {{image: alt, mode: volatile}}\n"
    );
    let doc = root.join("shared.yaml");
    assert!(Client::connect(owner.iscsi)
        .login(&who, SHARED_TARGET)
        .is_err());
    std::fs::write(&doc, &shared).unwrap();
    let (ok, out) = cli(
        &n1.config(),
        &["cluster", "config", "push", doc.to_str().unwrap()],
    );
    assert!(ok, "push: {out}");
    for n in [&n1, &n2] {
        wait_for("the shared configuration to be applied", || {
            n.stderr()
                .contains("shared configuration from etcd applied")
                .then_some(())
        });
    }
    let mut c = login(owner.iscsi, &who);
    drop(c.read10(0, 1));
    let mut s = Client::connect(owner.iscsi);
    s.login(&who, SHARED_TARGET)
        .unwrap_or_else(|e| panic!("login to the shared target: {e:?}"));
    assert_eq!(s.read10(0, 1), vec![9u8; 512]);
    drop(s);

    // A document with a node's own key is refused at push, naming it.
    std::fs::write(&doc, format!("portals: [\"127.0.0.1:1\"]\n{shared}")).unwrap();
    let (ok, out) = cli(
        &n1.config(),
        &["cluster", "config", "push", doc.to_str().unwrap()],
    );
    assert!(!ok && out.contains("portals"), "{out}");
    // One that slips past (written straight into etcd) is refused by each node with the
    // reason; the running configuration stays.
    assert!(etcd.ctl(&[
        "put",
        &format!("/diskless/{CLUSTER}/shared/config"),
        "targets: 5\n"
    ]));
    for n in [&n1, &n2] {
        wait_for("the invalid shared configuration to be refused", || {
            n.stderr()
                .contains("shared configuration from etcd refused")
                .then_some(())
        });
    }
    let mut s = Client::connect(owner.iscsi);
    s.login(&who, SHARED_TARGET)
        .unwrap_or_else(|e| panic!("the running configuration stays: {e:?}"));
    drop(s);
    // Cleared: each node goes back to its own file (the shared target is gone).
    let (ok, out) = cli(&n1.config(), &["cluster", "config", "clear"]);
    assert!(ok, "{out}");
    wait_for("the shared target to go", || {
        Client::connect(owner.iscsi)
            .login(&who, SHARED_TARGET)
            .is_err()
            .then_some(())
    });
    drop(c);
}

/// iPXE's ISID (IANA format, enterprise 0x002723) with qualifier `q`.
fn ipxe_isid(q: u8) -> [u8; 6] {
    [0x40, 0x00, 0x27, 0x23, 0x00, q]
}

/// open-iscsi's ISID (OUI 00:02:3d).
const OS_ISID: [u8; 6] = [0x00, 0x02, 0x3d, 0x00, 0x00, 0x01];

/// Log in as `who` on `port` with this ISID.
fn login_isid(port: u16, who: &str, isid: [u8; 6]) -> Client {
    let mut c = Client::connect(port);
    c.isid = isid;
    c.login(who, TARGET)
        .unwrap_or_else(|e| panic!("login of {who} on port {port} refused: {e:?}"));
    c
}

/// A client's lifecycle record in etcd (JSON), if it has one.
fn lifecycle_record(etcd: &Etcd, who: &str) -> Option<serde_json::Value> {
    let key = format!("/diskless/{CLUSTER}/clients/{TARGET}/{who}/lifecycle");
    let text = etcd.ctl_out(&["get", &key, "--print-value-only"])?;
    serde_json::from_str(text.trim()).ok()
}

/// (writer node, boot count) of a record.
fn writer_and_boots(r: &serde_json::Value) -> (String, u64) {
    (
        r["node"].as_str().unwrap_or("").to_string(),
        r["state"]["boots"].as_u64().unwrap_or(0),
    )
}

/// Wait until `who`'s record in etcd was written by `node` and counts `boots` boots; on
/// timeout, say what etcd has and what the node logged.
fn wait_for_record(etcd: &Etcd, who: &str, node: &Node, boots: u64) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let rec = lifecycle_record(etcd, who);
        if let Some(r) = rec
            .as_ref()
            .filter(|r| writer_and_boots(r) == (node.id.clone(), boots))
        {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no record of boot {boots} by {}: etcd has {rec:?}\n{}",
            node.id,
            node.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn lifecycle_record_follows_the_client() {
    let tmp = tempfile::tempdir().unwrap();
    let golden = tmp.path().join("golden.img");
    std::fs::write(&golden, common::random_bytes(GOLDEN_SIZE, 11)).unwrap();
    let etcd = Etcd::start(tmp.path());
    let mut nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| start_node(tmp.path(), id, &etcd, &golden))
        .collect();
    wait_for_members(&nodes.iter().collect::<Vec<_>>());
    let m = mac(1);
    let by_port = |nodes: &[Node], p: u16| -> usize {
        nodes
            .iter()
            .position(|n| n.iscsi == p)
            .unwrap_or_else(|| panic!("no node has port {p}"))
    };

    // The client boots on its node A: its script, iPXE's login, then its OS's (the boot's
    // phases as tests/lifecycle.rs drives them).
    let (who, p) = nodes[0].script(&m);
    let a = by_port(&nodes, p);
    assert_eq!(nodes[a].script(&m).1, p);
    let _fw = login_isid(p, &who, ipxe_isid(1));
    let mut s = login_isid(p, &who, OS_ISID);
    s.write10(3, &marker(3));
    let rec = wait_for_record(&etcd, &who, &nodes[a], 1);
    assert_eq!(rec["state"]["phase"], "os", "{rec}");
    assert_eq!(rec["disk"]["image"], "base", "{rec}");
    assert_eq!(rec["disk"]["mode"], "volatile", "{rec}");
    assert_eq!(rec["disk"]["lun0"]["kind"], "overlay", "{rec}");
    assert_eq!(rec["target"], TARGET, "{rec}");

    // A dies (SIGKILL): once its lease ran out, the client's next boot lands on B, which
    // continues the lifecycle from the record: boot 2, not a first boot.
    let killed_id = nodes[a].id.clone();
    nodes[a].server.take().unwrap().kill9();
    let killed_at = Instant::now();
    let other = (a + 1) % 3;
    let p = wait_for("the client placed on a live node", || {
        let (_, p) = nodes[other].script(&m);
        (p != nodes[a].iscsi).then_some(p)
    });
    let b = by_port(&nodes, p);
    assert_eq!(nodes[b].script(&m).1, p);
    let _fw = login_isid(p, &who, ipxe_isid(2));
    let mut sb = login_isid(p, &who, OS_ISID);
    // A new boot on a node of its own: the volatile disk is the golden image again.
    let g = std::fs::read(&golden).unwrap();
    assert_eq!(sb.read10(3, 1), g[3 * 512..4 * 512].to_vec());
    let rec = wait_for_record(&etcd, &who, &nodes[b], 2);
    let took_b = killed_at.elapsed();
    assert_eq!(rec["disk"]["image"], "base", "{rec}");
    assert_eq!(rec["disk"]["mode"], "volatile", "{rec}");
    let log = nodes[b].stderr();
    assert!(
        log.contains("client lifecycle taken over from the cluster's record")
            && log.contains(&format!("from={killed_id}")),
        "{log}"
    );
    // `diskless cluster clients` shows where the client was last and who owns it now.
    let c = (0..3).find(|&i| i != a && i != b).unwrap();
    let (ok, out) = cli(&nodes[c].config(), &["cluster", "clients", "--json"]);
    assert!(ok, "{out}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mine = list
        .as_array()
        .and_then(|l| l.iter().find(|r| r["initiator"] == who.as_str()))
        .unwrap_or_else(|| panic!("{who} not in {out}"));
    assert_eq!(mine["node"], nodes[b].id.as_str(), "{out}");
    assert_eq!(mine["owner"], nodes[b].id.as_str(), "{out}");
    assert_eq!(mine["state"]["boots"], 2, "{out}");
    let (ok, table) = cli(&nodes[c].config(), &["cluster", "clients"]);
    assert!(
        ok && table.contains(&who) && table.contains("overlay"),
        "{table}"
    );

    // B is paused (SIGSTOP) with the session open, past its lease: the client boots on C
    // (boot 3). When B continues, its session's end changes its (stale) state: its write
    // is refused by the ownership comparison, and the record stays C's.
    let pid = nodes[b].server.as_ref().unwrap().pid();
    signal(pid, libc::SIGSTOP);
    let paused_at = Instant::now();
    let resumed = std::cell::Cell::new(false);
    let _cont = Guard(|| {
        if !resumed.get() {
            signal(pid, libc::SIGCONT)
        }
    });
    let b_id = nodes[b].id.clone();
    wait_for("the paused node's lease to run out", || {
        (!etcd.owners(CLUSTER).values().any(|o| *o == b_id)).then_some(())
    });
    assert_eq!(nodes[c].script(&m).1, nodes[c].iscsi);
    let _sc = login_isid(nodes[c].iscsi, &who, ipxe_isid(3));
    wait_for_record(&etcd, &who, &nodes[c], 3);
    let took_c = paused_at.elapsed();
    signal(pid, libc::SIGCONT);
    resumed.set(true);
    sb.logout();
    wait_for("B's refused write", || {
        nodes[b]
            .stderr()
            .contains(
                "this node does not own the client (any more): its lifecycle record is not written",
            )
            .then_some(())
    });
    let rec = lifecycle_record(&etcd, &who).unwrap();
    assert_eq!(writer_and_boots(&rec), (nodes[c].id.clone(), 3), "{rec}");
    // Each write adds one to seq, whichever node writes: writes per boot, for sizing.
    eprintln!(
        "measured: {} lifecycle record writes for 3 boots (script fetch + logins + session ends) \
         on 3 nodes, takeovers {:?} after SIGKILL and {:?} after SIGSTOP",
        rec["seq"], took_b, took_c
    );
    assert_eq!(
        etcd.owners(CLUSTER).get(&who).map(String::as_str),
        Some(nodes[c].id.as_str())
    );
}
