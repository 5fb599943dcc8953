//! Access control beyond name ACLs and CHAP (which tests/clients.rs and tests/hostile.rs cover):
//! source address binding, failed logins logged with their reason and throttled, and CHAP
//! secrets never appearing in logs or command output.

mod common;
#[path = "common/raw.rs"]
mod raw;

use common::{Chap, Config, Lun, Server, Target};
use raw::Client;
use std::time::{Duration, Instant};

const T: &str = "iqn.2026-11.test:secure";
const SECRET: &str = "a-very-secret-secret-42";

fn yaml_with_sources(dir: &std::path::Path, sources: &str) -> Config {
    let img = dir.join("disk.img");
    common::sparse_image(&img, 1 << 20);
    Config::yaml(&format!(
        "portals: [\"127.0.0.1:0\"]\ntargets:\n  - name: {T}\n    sources: {sources}\n    luns:\n      - {{lun: 0, image: {}}}\n",
        img.display()
    ))
}

#[test]
fn source_address_binding() {
    let dir = tempfile::tempdir().unwrap();
    // pc-01 may only come from 10.9.9.9; everyone else from loopback.
    let server = Server::start(
        dir.path(),
        &yaml_with_sources(
            dir.path(),
            r#"{"iqn.2026-11.test:pc-01": ["10.9.9.9"], "*": ["127.0.0.0/8"]}"#,
        ),
    );
    let mut c = Client::connect(server.port);
    assert_eq!(
        c.login("iqn.2026-11.test:pc-01", T),
        Err((2, 2)),
        "pc-01 logged in from 127.0.0.1"
    );
    let mut c = Client::connect(server.port);
    c.login("iqn.2026-11.test:pc-02", T).unwrap();
    assert_eq!(c.read10(0, 1).len(), 512);
    let log = server.stderr();
    assert!(
        log.contains("login refused") && log.contains("authorization failure"),
        "{log}"
    );
    assert!(log.contains("iqn.2026-11.test:pc-01"), "{log}");
}

#[test]
fn bad_sources_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = yaml_with_sources(dir.path(), r#"{"*": ["10.0.0.0/33"]}"#);
    let path = dir.path().join("t.yaml");
    std::fs::write(&path, cfg.to_yaml()).unwrap();
    let out = common::check_config(&path);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("bad source address"), "{out}");
}

#[test]
fn failed_logins_are_logged_throttled_and_secrets_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    common::sparse_image(&img, 1 << 20);
    let server = Server::start(
        dir.path(),
        &Config::new(vec![
            Target::new(T, vec![Lun::new(0, &img)]).chap(Chap::one_way("user1", SECRET))
        ]),
    );
    // A real initiator with the right and a wrong secret.
    common::require_tool("iscsi-inq");
    let ok = common::run(
        "iscsi-inq",
        &[
            "-i",
            "iqn.2026-11.test:i1",
            &server.chap_url(T, 0, "user1", SECRET),
        ],
    );
    assert!(ok.success(), "{ok}");
    let bad = common::run(
        "iscsi-inq",
        &[
            "-i",
            "iqn.2026-11.test:i1",
            &server.chap_url(T, 0, "user1", "wrong-secret-000"),
        ],
    );
    assert!(!bad.success());
    // Many failures from one address: after ten a minute, each answer waits a second.
    for _ in 0..10 {
        let mut c = Client::connect(server.port);
        assert_eq!(
            c.login("iqn.2026-11.test:i1", "iqn.2026-11.test:nope"),
            Err((2, 3))
        );
    }
    let t = Instant::now();
    let mut c = Client::connect(server.port);
    assert_eq!(
        c.login("iqn.2026-11.test:i1", "iqn.2026-11.test:nope"),
        Err((2, 3))
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "no throttling: {:?}",
        t.elapsed()
    );
    let log = server.stderr();
    assert!(log.contains("authentication failure"), "{log}");
    assert!(log.contains("target not found"), "{log}");
    assert!(!log.contains(SECRET), "a CHAP secret reached the log");
    assert!(
        !log.contains("wrong-secret-000"),
        "an offered secret reached the log"
    );
    // check-config never prints secrets either.
    let out = common::check_config(&server.config_path).ok();
    assert!(!out.all().contains(SECRET));
}

#[test]
fn connection_limit_and_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    common::sparse_image(&img, 1 << 20);
    let cfg = Config::yaml(&format!(
        "portals: [\"127.0.0.1:0\"]\nsettings: {{max_connections: 3, idle_timeout_secs: 2, login_timeout_secs: 30}}\ntargets:\n  - name: {T}\n    luns:\n      - {{lun: 0, image: {}}}\n",
        img.display()
    ));
    let server = Server::start(dir.path(), &cfg);
    let mut a = Client::connect(server.port);
    a.login("iqn.2026-11.test:a", T).unwrap();
    // Two more connections, each proven accepted and counted by the target (it answered a
    // login on it), so the fourth is over the limit whatever the machine's load.
    let mut b = Client::connect(server.port);
    b.login("iqn.2026-11.test:b", T).unwrap();
    let mut c = Client::connect(server.port);
    c.login("iqn.2026-11.test:c", T).unwrap();
    // The fourth connection is closed at once.
    let mut d = Client::connect(server.port);
    let mut seen = Vec::new();
    assert!(
        d.closed_within(Duration::from_secs(3), &mut seen),
        "connection limit not enforced"
    );
    // A logged-in connection that stays silent is closed after idle_timeout_secs.
    assert!(
        a.closed_within(Duration::from_secs(30), &mut seen),
        "idle connection not closed"
    );
}
