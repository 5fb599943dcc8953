//! The web console in a real browser: Debian's headless Chromium driven by playwright-core
//! (tests/browser/console.mjs, installed by `npm ci` in tests/browser; scripts/test.sh does
//! it). The browser signs in with the token, sees a client's firmware log in and its OS take
//! over live, opens the client page, cancels and then confirms a reset, then sets the
//! client's next boot through its form; this test drives the real iSCSI logins and checks the
//! result on the server. Screenshots are kept in
//! target/console-screenshots/.
//!
//! A missing node, chromium or playwright-core fails the test with what to install.

mod common;
#[path = "common/http.rs"]
mod http;
#[path = "common/raw.rs"]
mod raw;

use common::{repo, require_browser_tools, Browser, Config, Server};
use http::{seg, Api};
use raw::Client;
use std::path::Path;
use std::time::Duration;

const BOOT: &str = "iqn.2026-11.test:boot";
const PC: &str = "iqn.2026-11.test:console-pc";
const TOKEN: &str = "console-test-token-0123456789";
/// The whole browser run must end within this.
const BROWSER_LIMIT: Duration = Duration::from_secs(180);

fn login(server: &Server, isid: [u8; 6]) -> Client {
    let mut c = Client::connect(server.port);
    c.isid = isid;
    c.login(PC, BOOT)
        .unwrap_or_else(|e| panic!("login refused: {e:?}"));
    c
}

/// The browser script, with its stdout as a channel of lines.
#[test]
fn console_shows_a_boot_live_and_resets_through_the_confirmation() {
    require_browser_tools();
    let dir = tempfile::tempdir().unwrap();
    let golden = dir.path().join("golden.img");
    std::fs::write(&golden, vec![0xa5u8; 8 << 20]).unwrap();
    let srv = Server::start(
        dir.path(),
        &Config::yaml(&format!(
            "portals: [\"127.0.0.1:0\"]\n\
             state_dir: {state}\n\
             settings: {{reboot_gap_secs: 1, nop_in_interval_secs: 0}}\n\
             api: {{listen: \"127.0.0.1:0\", token: {TOKEN}}}\n\
             images:\n  - {{name: golden, path: {golden}}}\n\
             targets:\n  - name: {BOOT}\n    boot:\n      bindings:\n\
             \x20       - {{initiator: \"{PC}\", image: golden, mode: volatile, mac: \"52:54:00:12:34:56\"}}\n",
            state = dir.path().join("state").display(),
            golden = golden.display(),
        )),
    );
    let api = Api {
        base: srv.api_url(),
        token: Some(TOKEN.into()),
    };
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map_or_else(|| repo().join("target"), Path::to_path_buf)
        .join("console-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    let url = srv.api_url();
    let mut browser = Browser::start(
        "console.mjs",
        &[
            ("CONSOLE_URL", &url),
            ("CONSOLE_TOKEN", &TOKEN),
            ("CLIENT", &PC),
            ("SHOTS", &shots),
        ],
        BROWSER_LIMIT,
    );

    browser.expect("ready");
    let mut fw = login(&srv, [0x40, 0x00, 0x27, 0x23, 0, 1]);
    fw.write10(64, &[0x11u8; 4096]);
    browser.say("firmware");
    browser.expect("saw-firmware");
    let mut os = login(&srv, [0x00, 0x02, 0x3d, 0x00, 0, 1]);
    os.write10(128, &[0x22u8; 65536]);
    browser.say("os");
    browser.expect("saw-running");

    // Cancel changed nothing.
    browser.expect("cancelled");
    let c = api.get_json(&format!("/api/v1/clients/{}", seg(PC)));
    assert_eq!(c["state"], "running", "{c}");
    let resets = c["resets"].as_u64().unwrap();
    assert_eq!(os.read10(128, 1), vec![0x22u8; 512]);
    browser.say("still-running");

    // Confirmed: the OS session is closed and the overlay discarded, on the server.
    browser.expect("reset");
    let mut seen = Vec::new();
    assert!(
        os.closed_within(Duration::from_secs(10), &mut seen),
        "the client's session survived the reset"
    );
    let c = api.get_json(&format!("/api/v1/clients/{}", seg(PC)));
    assert_eq!(c["state"], "offline", "{c}");
    assert_eq!(c["resets"].as_u64().unwrap(), resets + 1, "{c}");
    let mut again = login(&srv, [0x40, 0x00, 0x27, 0x23, 0, 2]);
    assert_eq!(
        again.read10(128, 1),
        vec![0xa5u8; 512],
        "the overlay survived the reset"
    );
    let audit = api.get_json("/api/v1/audit");
    assert!(
        audit["entries"].as_array().unwrap().iter().any(|e| {
            e["action"] == format!("reset client {PC}")
                && e["result"] == "ok"
                && e["who"].as_str().unwrap().starts_with("admin token")
        }),
        "{audit}"
    );
    browser.say("checked");

    // The next-boot form, on the server: stored, and the running boot keeps its disk.
    browser.expect("next-boot");
    let c = api.get_json(&format!("/api/v1/clients/{}", seg(PC)));
    assert_eq!(c["next_boot"]["image"], "golden", "{c}");
    assert_eq!(c["next_boot"]["mode"], "persistent", "{c}");
    assert_eq!(c["mode"], "volatile", "{c}");
    assert_eq!(again.read10(128, 1), vec![0xa5u8; 512]);
    browser.say("next-boot-checked");
    browser.expect("done");
    let (status, stderr) = browser.finish();
    assert!(status.success(), "console.mjs failed: {stderr}");
    let pngs = std::fs::read_dir(&shots)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "png"))
            })
            .count()
        })
        .unwrap_or(0);
    assert!(pngs >= 8, "expected the screenshots in {}", shots.display());
    drop(fw);
}
