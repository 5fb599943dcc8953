//! The operator API (docs/operations.md) against the real binary, driven by real clients:
//! libiscsi's iscsi-inq / iscsi-ls and raw initiators that log in like iPXE (firmware ISID)
//! and then like the OS after the hand-off.
//!
//! Every endpoint and action is exercised, with the refusals an operator or an attacker can
//! cause (wrong credential, cross-site request, malformed JSON, unknown client, concurrent
//! actions on one client): each gets a clear 4xx and changes nothing. `/metrics` is checked by
//! Prometheus' own parser (`promtool check metrics`, Debian package `prometheus`).

mod common;
#[path = "common/http.rs"]
mod http;
#[path = "common/raw.rs"]
mod raw;

use common::{firmware_isid, os_isid, Config, Server};
use http::{seg, wait_for, Api, Sse};
use raw::Client;
use std::path::Path;
use std::time::{Duration, Instant};

const BOOT: &str = "iqn.2026-11.test:boot";
const PLAIN: &str = "iqn.2026-11.test:plain";
const PC1: &str = "iqn.2026-11.test:pc1";
const PC2: &str = "iqn.2026-11.test:pc2";
const TOKEN: &str = "api-test-token-0123456789";
const CHAP_SECRET: &str = "plain-chap-secret-77";
const WAIT: Duration = Duration::from_secs(20);

/// A boot target (pc1 bound by name and MAC, everyone else by the default binding) and a
/// plain target behind CHAP; `api` is the api: section.
fn config(dir: &Path, golden_mib: u64, api: &str) -> Config {
    let golden = dir.join("golden.img");
    // Real (non-zero) data, so a commit copies something.
    std::fs::write(&golden, vec![0xa5u8; (golden_mib << 20) as usize]).unwrap();
    common::sparse_image(&dir.join("plain.img"), 16 << 20);
    Config::yaml(&format!(
        "portals: [\"127.0.0.1:0\"]\n\
         state_dir: {state}\n\
         settings: {{reboot_gap_secs: 1, nop_in_interval_secs: 0}}\n\
         api: {api}\n\
         images:\n  - {{name: golden, path: {golden}}}\n\
         targets:\n\
         \x20 - name: {BOOT}\n    boot:\n      bindings:\n\
         \x20       - {{initiator: \"{PC1}\", image: golden, mode: volatile, mac: \"52:54:00:00:00:01\"}}\n\
         \x20     default: {{image: golden, mode: volatile}}\n\
         \x20 - name: {PLAIN}\n    chap: {{user: plainuser, secret: {CHAP_SECRET}}}\n    luns:\n\
         \x20     - {{lun: 0, image: {plain}}}\n",
        state = dir.join("state").display(),
        golden = golden.display(),
        plain = dir.join("plain.img").display(),
    ))
}

fn login(server: &Server, initiator: &str, isid: [u8; 6]) -> Client {
    let mut c = Client::connect(server.port);
    c.isid = isid;
    c.login(initiator, BOOT)
        .unwrap_or_else(|e| panic!("login of {initiator} refused: {e:?}"));
    c
}

/// The client object `initiator` in GET /clients.
fn client(api: &Api, initiator: &str) -> serde_json::Value {
    api.get_json(&format!("/api/v1/clients/{}", seg(initiator)))
}

fn require_promtool() {
    let ok = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "promtool not found: install the Debian package prometheus (scripts/test.sh does it as root)"
    );
}

/// `promtool check metrics` on `text`: Prometheus' own parser and linter.
fn promtool_check(text: &str) {
    use std::io::Write;
    require_promtool();
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn reads_credentials_events_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let api_yaml = format!("{{listen: \"127.0.0.1:0\", token: {TOKEN}}}");
    let srv = Server::start(dir.path(), &config(dir.path(), 16, &api_yaml));
    let api = Api {
        base: srv.api_url(),
        token: Some(TOKEN.into()),
    };
    let anon = Api {
        base: srv.api_url(),
        token: None,
    };
    let wrong = Api {
        base: srv.api_url(),
        token: Some("api-test-token-0123456788".into()),
    };

    // The description is public; everything else needs the token.
    let doc = anon.get_json("/api/v1/openapi.json");
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/api/v1/clients",
        "/api/v1/health",
        "/metrics",
        "/api/v1/events",
    ] {
        for who in [&anon, &wrong] {
            let r = who.get(path);
            assert_eq!(r.status, 401, "GET {path} without the right token: {r:?}");
            assert!(r
                .header("www-authenticate")
                .is_some_and(|h| h.starts_with("Bearer")));
        }
    }
    // The console's files hold no data and load without it.
    let page = anon.get("/");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>diskless console</title>"));
    assert_eq!(anon.get("/app.js").status, 200);

    let mut events = Sse::open(&api);

    // Real clients: libiscsi on pc1 (by name), discovery, and a raw pc2 booting like iPXE then
    // handing off to its OS.
    common::run("iscsi-inq", &["-i", PC1, &srv.url(BOOT, 0)]).ok();
    let ls = common::run("iscsi-ls", &["-i", PC1, &srv.portal_url()]).ok();
    assert!(ls.stdout.contains(BOOT), "{ls}");
    let mut fw = login(&srv, PC2, firmware_isid(1));
    let boot = events.wait("boot", WAIT, |e| e["initiator"] == PC2);
    assert!(
        boot["detail"].as_str().unwrap().contains("boot firmware"),
        "{boot}"
    );
    fw.write10(8, &[0x42u8; 4096]);
    let mut os = login(&srv, PC2, os_isid(1));
    events.wait("handoff", WAIT, |e| e["initiator"] == PC2);
    os.write10(16, &[0x43u8; 4096]);
    // A login with a wrong CHAP secret (real client).
    let bad = common::run(
        "iscsi-inq",
        &[
            "-i",
            PC1,
            &srv.chap_url(PLAIN, 0, "plainuser", "wrong-secret-123456"),
        ],
    );
    assert!(!bad.success(), "{bad}");
    let failed = events.wait("login_failed", WAIT, |e| e["target"] == PLAIN);
    assert!(
        failed["detail"]
            .as_str()
            .unwrap()
            .contains("authentication failure"),
        "{failed}"
    );
    // Live statistics: pc2 runs, with its writes counted.
    let stats = events.wait("stats", WAIT, |s| {
        s["clients"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["initiator"] == PC2 && c["state"] == "running")
    });
    assert!(stats["sessions"].as_u64().unwrap() >= 1, "{stats}");

    // GET /clients: pc1 known by its binding (name, MAC), pc2 running on its OS session.
    let all = api.get_json("/api/v1/clients");
    let list = all["clients"].as_array().unwrap();
    let pc1 = list
        .iter()
        .find(|c| c["initiator"] == PC1)
        .expect("pc1 listed");
    assert_eq!(pc1["mac"], "52:54:00:00:00:01");
    assert_eq!(pc1["state"], "offline");
    assert_eq!(pc1["mode"], "volatile");
    let pc2 = client(&api, PC2);
    assert_eq!(pc2["state"], "running", "{pc2}");
    assert_eq!(
        pc2["sessions"], 1,
        "the hand-off closed the firmware session: {pc2}"
    );
    assert_eq!(pc2["write_bytes"], 8192, "{pc2}");
    assert_eq!(pc2["ip"], "127.0.0.1");
    assert_eq!(pc2["image"], "golden");
    assert!(
        pc2["overlay"]["bytes_written"].as_u64().unwrap() >= 8192,
        "{pc2}"
    );
    let kinds: Vec<&str> = pc2["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in ["boot", "handoff", "session_end"] {
        assert!(kinds.contains(&k), "timeline lacks {k}: {kinds:?}");
    }
    // A name only the default binding covers is no client until it logs in.
    let r = api.get(&format!("/api/v1/clients/{}", seg("iqn.2026-11.nobody:x")));
    assert_eq!(r.status, 404, "{r:?}");

    // Sessions, targets, images, health, recent events.
    let sessions = api.get_json("/api/v1/sessions");
    let s = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["initiator"] == PC2)
        .expect("pc2's session");
    assert_eq!(s["firmware"], false);
    assert_eq!(s["isid"], "00023d000001");
    assert_eq!(s["write_bytes"], 4096);
    let targets = api.get("/api/v1/targets");
    assert_eq!(targets.status, 200);
    assert!(
        !targets.body.contains(CHAP_SECRET),
        "a CHAP secret leaked: {}",
        targets.body
    );
    let t = targets.json();
    let plain = t["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == PLAIN)
        .unwrap();
    assert_eq!(plain["auth"], "chap");
    assert_eq!(plain["luns"][0]["size"], 16 << 20);
    let images = api.get_json("/api/v1/images");
    let golden = images["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "golden")
        .unwrap();
    assert_eq!(golden["size"], 16 << 20);
    assert_eq!(golden["kind"], "golden");
    let health = api.get_json("/api/v1/health");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["targets"], 2);
    let recent = api.get_json("/api/v1/events/recent");
    assert!(recent["events"].as_array().unwrap().len() >= 4, "{recent}");

    // Unknown resources and methods.
    assert_eq!(api.get("/api/v1/nothing").status, 404);
    assert_eq!(api.get("/nothing").status, 404);
    let del = http::request(
        &api.base,
        "DELETE",
        "/api/v1/clients",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        None,
    );
    assert_eq!(del.status, 405, "{del:?}");

    // /metrics: Prometheus' parser accepts it; the counters moved.
    let m = api.get("/metrics");
    assert_eq!(m.status, 200);
    promtool_check(&m.body);
    for want in [
        format!("diskless_scsi_bytes_total{{target=\"{BOOT}\",initiator=\"{PC2}\",lun=\"0\",direction=\"write\"}} 8192"),
        format!("diskless_scsi_commands_total{{target=\"{BOOT}\",initiator=\"{PC2}\",lun=\"0\",op=\"write\"}} 2"),
        "diskless_logins_total{outcome=\"auth_failure\",reason=\"authentication failure\"} 1".into(),
        "diskless_sessions_open 1".into(),
        format!("diskless_client_boots_total{{target=\"{BOOT}\",initiator=\"{PC2}\",image=\"golden\",mode=\"volatile\"}}"),
        "diskless_image_size_bytes{image=\"golden\"".into(),
        "diskless_scsi_command_duration_seconds_count".into(),
        format!("diskless_client_last_boot_seconds{{target=\"{BOOT}\",initiator=\"{PC2}\",stage=\"total\"}}"),
        format!("diskless_boot_duration_seconds_count{{target=\"{BOOT}\",stage=\"firmware_to_os\"}} 1"),
        "process_open_fds ".into(),
        "diskless_build_info{version=".into(),
    ] {
        assert!(m.body.contains(&want), "/metrics lacks {want}:\n{}", m.body);
    }
    // Prometheus asks for OpenMetrics and gets it.
    let om = http::request(
        &api.base,
        "GET",
        "/metrics",
        &[
            ("Authorization", &format!("Bearer {TOKEN}")),
            (
                "Accept",
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
            ),
        ],
        None,
    );
    assert!(om
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(om.body.trim_end().ends_with("# EOF"));

    // A reboot: the OS goes away without Logout and the firmware logs in again. The lifecycle
    // sees a firmware login after the OS phase (no time involved), so the server discards the
    // volatile disk; the API reports the boot, the reset and the fresh overlay.
    let boots = client(&api, PC2)["boots"].as_u64().unwrap();
    drop((fw, os));
    events.wait("session_end", WAIT, |e| e["initiator"] == PC2);
    let _fw2 = login(&srv, PC2, firmware_isid(2));
    events.wait("boot", WAIT, |e| e["initiator"] == PC2);
    let reset = events.wait("reset", WAIT, |e| e["initiator"] == PC2);
    assert!(
        reset["detail"].as_str().unwrap().contains("boot"),
        "{reset}"
    );
    let pc2 = client(&api, PC2);
    assert_eq!(pc2["boots"].as_u64().unwrap(), boots + 1, "{pc2}");
    assert_eq!(pc2["state"], "firmware", "{pc2}");
    // No disk in RBD: no recreate pending (docs/scale-out.md, "Reset of a disk in RBD").
    assert_eq!(pc2["rbd_recreate_pending"], serde_json::json!([]), "{pc2}");
    assert_eq!(pc2["overlay"]["bytes_written"], 0, "{pc2}");
}

#[test]
fn actions_change_the_server_and_refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let api_yaml = format!("{{listen: \"127.0.0.1:0\", token: {TOKEN}}}");
    // 64 MiB of data: a commit takes long enough to race other actions against it.
    let srv = Server::start(dir.path(), &config(dir.path(), 64, &api_yaml));
    let api = Api {
        base: srv.api_url(),
        token: Some(TOKEN.into()),
    };
    let marker = [0x5au8; 512];
    let mut fw = login(&srv, PC2, firmware_isid(2));
    fw.write10(100, &marker);
    let mut os = login(&srv, PC2, os_isid(2));
    let boots = client(&api, PC2)["boots"].as_u64().unwrap();
    let reset_path = format!("/api/v1/clients/{}/reset", seg(PC2));
    let commit_path = format!("/api/v1/clients/{}/commit", seg(PC2));

    // Refusals: each a clear 4xx, and nothing changes.
    let anon = Api {
        base: api.base.clone(),
        token: None,
    };
    let wrong = Api {
        base: api.base.clone(),
        token: Some("not-the-token-0000000000".into()),
    };
    let refusals: Vec<(u16, http::Response)> = vec![
        (401, anon.post(&reset_path, "{}")),
        (401, wrong.post(&reset_path, "{}")),
        (
            403,
            api.post_with(
                &reset_path,
                &[
                    ("Content-Type", "application/json"),
                    ("Origin", "http://evil.example"),
                ],
                "{}",
            ),
        ),
        (
            403,
            api.post_with(
                &reset_path,
                &[
                    ("Content-Type", "application/json"),
                    ("Sec-Fetch-Site", "cross-site"),
                ],
                "{}",
            ),
        ),
        (
            415,
            api.post_with(&reset_path, &[("Content-Type", "text/plain")], "{}"),
        ),
        (415, api.post_with(&reset_path, &[], "{}")),
        (400, api.post(&reset_path, "{\"")),
        (400, api.post(&reset_path, "[1, 2]")),
        (400, api.post(&reset_path, "{\"force\": true}")),
        (
            404,
            api.post(&format!("/api/v1/clients/{}/reset", seg("iqn.x")), "{}"),
        ),
        (
            404,
            api.post(&format!("/api/v1/clients/{}/explode", seg(PC2)), "{}"),
        ),
        (400, api.post(&commit_path, "{}")),
        (400, api.post(&commit_path, "{\"file\": \"../escape.img\"}")),
        (400, api.post(&commit_path, "{\"file\": \".hidden\"}")),
        (
            422,
            api.post(
                &format!("/api/v1/clients/{}/next-boot", seg(PC2)),
                "{\"image\": \"no-such-image\"}",
            ),
        ),
        (400, api.post("/api/v1/sessions/abc/close", "{}")),
        (404, api.post("/api/v1/sessions/65000/close", "{}")),
        (405, api.get(&reset_path)),
    ];
    for (i, (want, r)) in refusals.iter().enumerate() {
        assert_eq!(r.status, *want, "refusal #{i}: {r:?}");
        if *want != 405 {
            assert!(
                r.json()["error"].is_string(),
                "refusal #{i} has no error text: {r:?}"
            );
        }
    }
    assert_eq!(client(&api, PC2)["boots"].as_u64().unwrap(), boots);
    assert_eq!(
        os.read10(100, 1),
        marker,
        "a refused action touched the disk"
    );

    // Commit: a new image with the client's writes; never over an existing file.
    let r = api.post(&commit_path, "{\"file\": \"pc2-v2.img\"}");
    assert_eq!(r.status, 200, "{r:?}");
    let image = dir.path().join("pc2-v2.img");
    let data = std::fs::read(&image).unwrap();
    assert_eq!(&data[100 * 512..101 * 512], &marker[..]);
    assert_eq!(data[0], 0xa5, "the golden data is in the commit");
    let again = api.post(&commit_path, "{\"file\": \"pc2-v2.img\"}");
    assert_eq!(again.status, 409, "{again:?}");
    // Every refusal so far is in the audit log (checked now: the race below appends many
    // entries, and the log endpoint shows only its tail).
    let audit = api.get_json("/api/v1/audit");
    for status in [400, 401, 403, 404, 409, 415] {
        assert!(
            audit["entries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["status"] == status),
            "no refused action with {status} in the audit log: {audit}"
        );
    }

    // Concurrent actions on one client: while a commit runs, resets get 409 and change
    // nothing; every reset that got 200 counted exactly one reset.
    // Which of the two wins a round is up to the scheduler: rounds go on (each a fresh
    // commit) until a reset met a running commit, within a generous bound.
    let mut conflict = 0u64;
    let started = Instant::now();
    for round in 0.. {
        if started.elapsed() > Duration::from_secs(90) {
            break;
        }
        let before = client(&api, PC2)["resets"].as_u64().unwrap();
        let committer = {
            let api = api.clone();
            let path = commit_path.clone();
            std::thread::spawn(move || {
                api.post(&path, &format!("{{\"file\": \"pc2-race{round}.img\"}}"))
            })
        };
        let mut ok = 0u64;
        while !committer.is_finished() {
            let r = api.post(&reset_path, "{}");
            match r.status {
                200 => ok += 1,
                409 => conflict += 1,
                _ => panic!("reset during a commit: {r:?}"),
            }
        }
        let c = committer.join().unwrap();
        assert!(c.status == 200 || c.status == 409, "{c:?}");
        let after = client(&api, PC2)["resets"].as_u64().unwrap();
        assert_eq!(after - before, ok, "a refused reset changed the client");
        if conflict > 0 && c.status == 200 {
            break;
        }
    }
    assert!(
        conflict > 0,
        "no reset ever met a running commit in 90 s of rounds"
    );

    // Reset: the client's sessions close, its overlay is gone (the golden data is back).
    let mut fw = login(&srv, PC2, firmware_isid(3));
    fw.write10(100, &marker);
    let mut os = login(&srv, PC2, os_isid(3));
    let r = api.post(&reset_path, "");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["client"]["state"], "offline");
    let mut seen = Vec::new();
    assert!(
        os.closed_within(Duration::from_secs(10), &mut seen),
        "OS session survived the reset"
    );
    let mut fresh = login(&srv, PC2, firmware_isid(4));
    assert_eq!(
        fresh.read10(100, 1),
        vec![0xa5u8; 512],
        "the overlay survived the reset"
    );
    drop(fw);

    // Close one session.
    let tsih = wait_for(WAIT, "pc2's session in /sessions", || {
        api.get_json("/api/v1/sessions")["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["initiator"] == PC2)
            .and_then(|s| s["tsih"].as_u64())
    });
    let r = api.post(&format!("/api/v1/sessions/{tsih}/close"), "{}");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(fresh.closed_within(Duration::from_secs(10), &mut seen));
    assert!(!api
        .get("/api/v1/sessions")
        .body
        .contains(&format!("\"tsih\": {tsih},")));

    // Reload: a good file reloads; a broken one is refused and the old targets keep serving.
    let r = api.post("/api/v1/reload", "{}");
    assert_eq!(r.status, 200, "{r:?}");
    let good = std::fs::read_to_string(&srv.config_path).unwrap();
    std::fs::write(&srv.config_path, "targets: [oops\n").unwrap();
    let r = api.post("/api/v1/reload", "{}");
    assert_eq!(r.status, 422, "{r:?}");
    std::fs::write(&srv.config_path, good).unwrap();
    common::run("iscsi-inq", &["-i", PC1, &srv.url(BOOT, 0)]).ok();

    // The audit log: every action, refused ones included, never the token.
    let audit = api.get_json("/api/v1/audit");
    let entries = audit["entries"].as_array().unwrap();
    let has = |action: &str, result: &str| {
        entries
            .iter()
            .any(|e| e["action"].as_str().unwrap().contains(action) && e["result"] == result)
    };
    assert!(has(&format!("reset client {PC2}"), "ok"), "{audit}");
    assert!(has("commit client", "ok") && has("close session", "ok") && has("reload", "ok"));
    assert!(
        entries.iter().any(|e| e["status"] == 422),
        "no refused reload (422) in the audit log: {audit}"
    );
    assert!(entries
        .iter()
        .all(|e| e["time"].as_str().unwrap().ends_with('Z')));
    let file = std::fs::read_to_string(dir.path().join("state/audit.log")).unwrap();
    assert!(
        !file.contains(TOKEN) && !file.contains("not-the-token"),
        "a token in the audit log"
    );
    assert!(!srv.stderr().contains(TOKEN), "the token was logged");
}

#[test]
fn loopback_api_without_token_checks_hosts_and_serves_metrics_apart() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        dir.path(),
        &config(
            dir.path(),
            4,
            "{listen: \"127.0.0.1:0\", metrics_listen: \"127.0.0.1:0\"}",
        ),
    );
    let api = Api {
        base: srv.api_url(),
        token: None,
    };
    // DNS rebinding: a name that points at 127.0.0.1 is not this console's origin.
    let r = http::request(
        &api.base,
        "GET",
        "/api/v1/health",
        &[("Host", "evil.example:80")],
        None,
    );
    assert_eq!(r.status, 403, "{r:?}");
    let port = http::authority(&api.base)
        .rsplit_once(':')
        .unwrap()
        .1
        .to_string();
    let r = http::request(
        &api.base,
        "GET",
        "/api/v1/health",
        &[("Host", &format!("localhost:{port}"))],
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    // Same-origin actions work without a credential on loopback.
    let origin = format!("http://{}", http::authority(&api.base));
    let r = api.post_with(
        &format!("/api/v1/clients/{}/reset", seg(PC1)),
        &[("Content-Type", "application/json"), ("Origin", &origin)],
        "{}",
    );
    assert_eq!(r.status, 200, "{r:?}");
    // The separate metrics listener: /metrics without credential, nothing else.
    let mbase = srv
        .early_lines
        .iter()
        .find_map(|l| l.strip_prefix("diskless: metrics on "))
        .map(|u| u.trim_end_matches("metrics").to_string())
        .expect("metrics line");
    let m = http::request(&mbase, "GET", "/metrics", &[], None);
    assert_eq!(m.status, 200);
    promtool_check(&m.body);
    assert!(m.body.contains(&format!(
        "diskless_operator_resets_total{{target=\"{BOOT}\",initiator=\"{PC1}\",reason=\"operator\"}} 1"
    )), "{}", m.body);
    assert_eq!(
        http::request(&mbase, "GET", "/api/v1/health", &[], None).status,
        404
    );
}

/// A boot target whose pc1 is bound to `golden` (volatile), with a second image `golden2`
/// (other data) a next-boot override can name.
fn config_two_images(dir: &Path) -> Config {
    let golden = dir.join("golden.img");
    std::fs::write(&golden, vec![0xa5u8; 8 << 20]).unwrap();
    let golden2 = dir.join("golden2.img");
    std::fs::write(&golden2, vec![0x3cu8; 8 << 20]).unwrap();
    Config::yaml(&format!(
        "portals: [\"127.0.0.1:0\"]\n\
         state_dir: {state}\n\
         settings: {{reboot_gap_secs: 1, nop_in_interval_secs: 0}}\n\
         api: {{listen: \"127.0.0.1:0\", token: {TOKEN}}}\n\
         images:\n  - {{name: golden, path: {golden}}}\n  - {{name: golden2, path: {golden2}}}\n\
         targets:\n\
         \x20 - name: {BOOT}\n    boot:\n      bindings:\n\
         \x20       - {{initiator: \"{PC1}\", image: golden, mode: volatile}}\n\
         \x20     default: {{image: golden, mode: volatile}}\n",
        state = dir.join("state").display(),
        golden = golden.display(),
        golden2 = golden2.display(),
    ))
}

fn api_of(srv: &Server) -> Api {
    Api {
        base: srv.api_url(),
        token: Some(TOKEN.into()),
    }
}

/// `next-boot.yaml` of pc1 (None when it has no override).
fn override_file(dir: &Path) -> Option<String> {
    let clients = dir.join("state/clients");
    let target = std::fs::read_dir(&clients).ok()?.flatten().next()?.path();
    std::fs::read_to_string(target.join("iqn.2026-11.test_pc1").join("next-boot.yaml")).ok()
}

/// The next-boot override end to end, with raw initiators booting like iPXE then the OS:
/// refusals change nothing; a running client keeps its disk (across a reload and a kill -9
/// of the server) and its next boot takes the new image and mode; the override is sticky;
/// clearing it brings the binding back at the following boot without discarding the
/// persistent disk; concurrent calls end in one state that the file and the API agree on;
/// the CLI drives it through the control socket.
#[test]
fn next_boot_override_is_taken_at_the_next_boot_and_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_two_images(dir.path());
    let srv = Server::start(dir.path(), &cfg);
    let api = api_of(&srv);
    let path = format!("/api/v1/clients/{}/next-boot", seg(PC1));
    let mark = [0x5au8; 512];
    let golden = vec![0xa5u8; 512];
    let golden2 = vec![0x3cu8; 512];

    // pc1 boots (firmware, then the OS) and writes to its volatile disk.
    let fw = login(&srv, PC1, firmware_isid(1));
    let mut os = login(&srv, PC1, os_isid(1));
    drop(fw);
    os.write10(100, &mark);
    // SYNCHRONIZE CACHE(10) (SBC-3 5.22): durable, so it survives the kill -9 below.
    assert_eq!(
        os.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None).status,
        0
    );

    // Refusals: a clear 4xx each, nothing stored, the disk untouched.
    let refusals: Vec<(u16, http::Response)> = vec![
        (422, api.post(&path, "{\"image\": \"nope\"}")),
        (422, api.post(&path, "{\"image\": \"golden@7\"}")),
        (422, api.post(&path, "{\"image\": \"golden:beta\"}")),
        (400, api.post(&path, "{\"mode\": \"turbo\"}")),
        (400, api.post(&path, "{\"mode\": \"install\"}")),
        (400, api.post(&path, "{\"image\": 5}")),
        (
            400,
            api.post(&path, "{\"clear\": true, \"image\": \"golden2\"}"),
        ),
        (400, api.post(&path, "{}")),
        (400, api.post(&path, "{\"imgae\": \"golden2\"}")),
        (400, api.post(&path, "{\"")),
        (
            404,
            api.post(
                &format!("/api/v1/clients/{}/next-boot", seg("iqn.x:nobody")),
                "{\"image\": \"golden2\"}",
            ),
        ),
        (
            400,
            http::request(
                &api.base,
                "DELETE",
                &path,
                &[
                    ("Authorization", &format!("Bearer {TOKEN}")),
                    ("Content-Type", "application/json"),
                ],
                Some("{\"image\": \"golden2\"}"),
            ),
        ),
    ];
    for (i, (want, r)) in refusals.iter().enumerate() {
        assert_eq!(r.status, *want, "refusal #{i}: {r:?}");
        assert!(r.json()["error"].is_string(), "refusal #{i}: {r:?}");
    }
    let c = client(&api, PC1);
    assert!(c["next_boot"].is_null() && c["next_disk"].is_null(), "{c}");
    assert!(
        override_file(dir.path()).is_none(),
        "a refusal stored something"
    );
    assert_eq!(os.read10(100, 1), mark);

    // Set image and mode while pc1 runs: stored, shown, announced; the running boot keeps
    // its disk.
    let mut sse = http::Sse::open(&api);
    let r = api.post(&path, "{\"image\": \"golden2\", \"mode\": \"persistent\"}");
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["result"], "set");
    assert_eq!(v["client"]["next_boot"]["image"], "golden2", "{v}");
    assert_eq!(v["client"]["next_boot"]["mode"], "persistent", "{v}");
    assert!(v["client"]["next_boot"]["by"]
        .as_str()
        .unwrap()
        .contains("admin token"));
    assert!(v["client"]["next_boot"]["since"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(v["client"]["next_disk"]["image"], "golden2", "{v}");
    assert_eq!(v["client"]["image"], "golden");
    sse.wait("next_boot", WAIT, |d| d["initiator"] == PC1);
    let file = override_file(dir.path()).expect("next-boot.yaml written");
    assert!(
        file.contains("golden2") && file.contains("persistent"),
        "{file}"
    );
    assert_eq!(os.read10(100, 1), mark, "the running boot lost its disk");

    // A reload keeps the override and the running disk.
    assert_eq!(api.post("/api/v1/reload", "{}").status, 200);
    let c = client(&api, PC1);
    assert_eq!(c["next_boot"]["image"], "golden2", "{c}");
    assert_eq!(c["image"], "golden");
    assert_eq!(os.read10(100, 1), mark);

    // kill -9: the override is on disk; the OS of the same boot logs in again and still
    // has its disk (no switch mid-boot).
    srv.kill9();
    drop(os);
    let srv = Server::start(dir.path(), &cfg);
    let api = api_of(&srv);
    let mut os = login(&srv, PC1, os_isid(1));
    assert_eq!(
        os.read10(100, 1),
        mark,
        "a restart switched the disk mid-boot"
    );
    let c = client(&api, PC1);
    assert_eq!(c["next_boot"]["image"], "golden2", "{c}");
    assert_eq!(c["next_boot"]["mode"], "persistent", "{c}");
    assert_eq!(
        (c["image"].as_str(), c["mode"].as_str()),
        (Some("golden"), Some("volatile"))
    );

    // The next boot (iPXE logs in while the OS session is still open: a hard reset) takes
    // golden2 in persistent mode.
    let mut fw = login(&srv, PC1, firmware_isid(2));
    assert_eq!(
        fw.read10(100, 1),
        golden2,
        "the next boot is not on golden2"
    );
    let mut seen = Vec::new();
    assert!(
        os.closed_within(Duration::from_secs(10), &mut seen),
        "the old boot's session lives on"
    );
    let c = client(&api, PC1);
    assert_eq!(
        (c["image"].as_str(), c["mode"].as_str()),
        (Some("golden2"), Some("persistent")),
        "{c}"
    );
    assert!(c["next_disk"].is_null(), "{c}");
    assert_eq!(
        c["next_boot"]["image"], "golden2",
        "sticky: the override stays"
    );
    fw.write10(200, &mark);
    drop(fw);

    // Sticky and persistent: the boot after keeps golden2 and what was written on it.
    let fw = login(&srv, PC1, firmware_isid(3));
    let mut os = login(&srv, PC1, os_isid(3));
    drop(fw);
    assert_eq!(os.read10(200, 1), mark, "the persistent disk lost a write");
    assert_eq!(os.read10(100, 1), golden2);

    // Clear (DELETE): the running boot keeps golden2; the next boot is golden, volatile,
    // and the persistent golden2 disk is kept on the server, not discarded.
    let r = api.delete(&path);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["result"], "cleared");
    assert!(r.json()["client"]["next_boot"].is_null());
    assert_eq!(r.json()["client"]["next_disk"]["image"], "golden");
    assert!(override_file(dir.path()).is_none());
    assert_eq!(os.read10(200, 1), mark);
    let mut fw = login(&srv, PC1, firmware_isid(4));
    assert_eq!(fw.read10(100, 1), golden, "the binding is back");
    assert_eq!(fw.read10(200, 1), golden);
    let c = client(&api, PC1);
    assert_eq!(
        (c["image"].as_str(), c["mode"].as_str()),
        (Some("golden"), Some("volatile")),
        "{c}"
    );
    let kept: Vec<_> = walk(&dir.path().join("state/clients"))
        .into_iter()
        .filter(|p| p.ends_with("golden2/overlay.meta") && p.to_string_lossy().contains("/kept/"))
        .collect();
    assert_eq!(kept.len(), 1, "the persistent disk was not kept: {kept:?}");
    drop(os);

    // {"clear": true} works too; clearing twice is fine.
    assert_eq!(api.post(&path, "{\"mode\": \"readonly\"}").status, 200);
    assert_eq!(api.post(&path, "{\"clear\": true}").status, 200);
    assert_eq!(api.post(&path, "{\"clear\": true}").status, 200);
    assert!(client(&api, PC1)["next_boot"].is_null());

    // Concurrent calls on one client: each 200 or 409; the end state is one of the accepted
    // requests, and the file says the same as the API.
    let bodies = [
        "{\"image\": \"golden2\"}",
        "{\"mode\": \"readonly\"}",
        "{\"image\": \"golden2\", \"mode\": \"persistent\"}",
        "{\"image\": \"golden\", \"mode\": \"volatile\"}",
    ];
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let (api, path, body) = (api.clone(), path.clone(), bodies[i % bodies.len()]);
            std::thread::spawn(move || (body, api.post(&path, body)))
        })
        .collect();
    let mut accepted = Vec::new();
    for h in handles {
        let (body, r) = h.join().unwrap();
        match r.status {
            200 => accepted.push(body),
            409 => {}
            _ => panic!("concurrent next-boot: {r:?}"),
        }
    }
    assert!(!accepted.is_empty());
    let nb = client(&api, PC1)["next_boot"].clone();
    let (image, mode) = (nb["image"].as_str(), nb["mode"].as_str());
    assert!(
        accepted.iter().any(|b| {
            let b: serde_json::Value = serde_json::from_str(b).unwrap();
            b["image"].as_str() == image && b["mode"].as_str() == mode
        }),
        "end state {nb} is none of the accepted requests {accepted:?}"
    );
    let file = override_file(dir.path()).expect("override file");
    for v in [image, mode].into_iter().flatten() {
        assert!(file.contains(v), "file and API disagree: {file} vs {nb}");
    }

    // The CLI, through the control socket; `diskless clients` shows the override.
    let ctl = dir.path().join("state/control.sock");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_diskless"))
            .args(args)
            .arg("--control")
            .arg(&ctl)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = cli(&[
        "client",
        "next-boot",
        PC1,
        "--image",
        "golden2",
        "--mode",
        "readonly",
    ]);
    assert!(ok && text.contains("golden2 in readonly mode"), "{text}");
    let (ok, text) = cli(&["clients"]);
    assert!(
        ok && text.contains("NEXT-BOOT") && text.contains("golden2/readonly"),
        "{text}"
    );
    let (ok, text) = cli(&["client", "next-boot", PC1, "--mode", "bogus"]);
    assert!(!ok && text.contains("unknown mode"), "{text}");
    let (ok, text) = cli(&["client", "next-boot", PC1, "--image", "nope"]);
    assert!(!ok && text.contains("nope"), "{text}");
    let c = client(&api, PC1);
    assert_eq!(
        c["next_boot"]["mode"], "readonly",
        "a refused CLI call changed the override"
    );
    let (ok, text) = cli(&["client", "next-boot", PC1, "--clear"]);
    assert!(ok && text.contains("cleared"), "{text}");
    assert!(client(&api, PC1)["next_boot"].is_null());
    drop(fw);

    // Every change is in the audit log, refusals included.
    let audit = api.get_json("/api/v1/audit");
    let entries = audit["entries"].as_array().unwrap();
    assert!(entries.iter().any(
        |e| e["action"].as_str().unwrap().contains("next-boot client") && e["result"] == "ok"
    ));
    assert!(entries.iter().any(|e| e["action"]
        .as_str()
        .unwrap()
        .contains("clear next-boot client")
        && e["result"] == "ok"));
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Mode switches on one image (the overlay directory has the same name in every mode):
/// volatile -> persistent discards the volatile overlay and makes a persistent one;
/// persistent -> volatile keeps the persistent disk whole under `kept/`; readonly refuses
/// writes; back to persistent, the kept disk is in use again. Each at a new boot (a firmware login while the last boot's OS session is open),
/// never before.
#[test]
fn next_boot_mode_switches_on_one_image_never_lose_a_persistent_disk() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_two_images(dir.path());
    let srv = Server::start(dir.path(), &cfg);
    let api = api_of(&srv);
    let path = format!("/api/v1/clients/{}/next-boot", seg(PC1));
    let mark = [0x77u8; 512];
    let golden = vec![0xa5u8; 512];
    let sync = |c: &mut Client| {
        assert_eq!(c.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None).status, 0);
    };
    let mode = |api: &Api| client(api, PC1)["mode"].as_str().unwrap().to_string();

    // Boot 1, volatile.
    let fw = login(&srv, PC1, firmware_isid(1));
    let mut os = login(&srv, PC1, os_isid(1));
    drop(fw);
    os.write10(10, &mark);
    let r = api.post(&path, "{\"mode\": \"persistent\"}");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(mode(&api), "volatile");
    assert_eq!(os.read10(10, 1), mark);

    // Boot 2: persistent, made from the golden image (the volatile writes are gone).
    let mut fw = login(&srv, PC1, firmware_isid(2));
    assert_eq!(fw.read10(10, 1), golden);
    assert_eq!(mode(&api), "persistent");
    fw.write10(20, &mark);
    sync(&mut fw);
    let r = api.post(&path, "{\"mode\": \"volatile\"}");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.json()["note"].as_str().unwrap().contains("kept"),
        "the answer does not say the persistent disk is kept: {r:?}"
    );
    let mut os = login(&srv, PC1, os_isid(2));
    drop(fw);
    assert_eq!(os.read10(20, 1), mark, "switched before the next boot");

    // Boot 3: volatile on the same image; the persistent disk is kept, with its write.
    let mut fw = login(&srv, PC1, firmware_isid(3));
    assert_eq!(fw.read10(20, 1), golden);
    assert_eq!(mode(&api), "volatile");
    let kept: Vec<_> = walk(&dir.path().join("state/clients"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/kept/") && p.ends_with("overlay.meta"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let kept_dir = kept[0].parent().unwrap();
    let data: u64 = walk(kept_dir)
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    assert!(data >= 512, "the kept disk is empty: {kept_dir:?}");
    let show = client(&api, PC1);
    assert!(show["next_disk"].is_null(), "{show}");

    // Readonly from boot 4: writes refused with DATA PROTECT / WRITE PROTECTED.
    let r = api.post(&path, "{\"mode\": \"readonly\"}");
    assert_eq!(r.status, 200, "{r:?}");
    let os = login(&srv, PC1, os_isid(3));
    drop(fw);
    let mut fw = login(&srv, PC1, firmware_isid(4));
    drop(os);
    assert_eq!(mode(&api), "readonly");
    let w = fw.run(&raw::write10_cdb(30, 1), 512, Some(&mark));
    assert_eq!(w.sense_triplet(), Some((0x07, 0x27, 0x00)), "{w:?}");
    assert_eq!(fw.read10(30, 1), golden);

    // Back to persistent from boot 5: the kept disk is back in use, with its write.
    let r = api.post(&path, "{\"mode\": \"persistent\"}");
    assert_eq!(r.status, 200, "{r:?}");
    let os = login(&srv, PC1, os_isid(4));
    drop(fw);
    let fw = login(&srv, PC1, firmware_isid(5));
    drop(os);
    let mut fw = fw;
    assert_eq!(mode(&api), "persistent");
    assert_eq!(
        fw.read10(20, 1),
        mark,
        "the kept persistent disk did not come back"
    );
    assert!(
        !walk(&dir.path().join("state/clients"))
            .iter()
            .any(|p| p.to_string_lossy().contains("/kept/")),
        "the disk is both back in use and kept"
    );

    // A crash in the middle of a switch (the persistent disk moved to kept/, the new disk
    // not made yet): the restarted server puts the kept disk back for the running boot.
    sync(&mut fw);
    let os = login(&srv, PC1, os_isid(5));
    drop(fw);
    srv.kill9();
    drop(os);
    let meta = walk(&dir.path().join("state/clients"))
        .into_iter()
        .find(|p| p.ends_with("golden/overlay.meta"))
        .expect("the persistent disk");
    let disk = meta.parent().unwrap();
    let kept = disk.parent().unwrap().join("kept/1/golden");
    std::fs::create_dir_all(kept.parent().unwrap()).unwrap();
    std::fs::rename(disk, &kept).unwrap();
    // (The same configuration: rewriting the image files would change their identity.)
    let srv = Server::start(dir.path(), &cfg);
    let mut os = login(&srv, PC1, os_isid(5));
    assert!(
        os.read10(20, 1) == mark,
        "the kept disk was not put back at the restart: {}",
        srv.stderr()
    );
    assert!(!kept.exists());
}
