//! Boot read-ahead (`settings: boot_readahead_secs`, src/storage/readahead.rs): the first
//! server start learns the chunks a boot read and saves them in the state directory; a second
//! start over the same image issues the read-ahead of that set (seen in its log). No timing
//! asserts: the test waits for the file and the log line.

mod common;
#[path = "common/http.rs"]
mod http;

use common::*;
use std::path::Path;
use std::time::Duration;

const TARGET: &str = "iqn.2026-11.test:readahead";

fn config(dir: &Path, image: &Path) -> Config {
    Config::yaml(&format!(
        "portals: [\"127.0.0.1:0\"]\nstate_dir: {state}\n\
         settings: {{boot_readahead_secs: 1}}\n\
         images:\n  - {{name: base, path: {img}}}\n\
         targets:\n  - name: {TARGET}\n    boot:\n      default: {{image: base, mode: volatile}}\n",
        state = dir.join("state").display(),
        img = image.display(),
    ))
}

/// Wait up to 60 s for `f` to return Some.
fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    http::wait_for(Duration::from_secs(60), what, f)
}

#[test]
fn a_second_start_reads_ahead_what_the_first_boot_read() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("golden.img");
    std::fs::write(&image, random_bytes(8 << 20, 12)).unwrap();
    let cfg = config(dir.path(), &image);

    // First start: a client reads the whole 8 MiB image (a "boot"); the window (1 s from the
    // first read) closes and the set is saved.
    let server = Server::start(dir.path(), &cfg);
    let out = dir.path().join("out.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &server.url(TARGET, 0),
            out.to_str().unwrap(),
        ],
    )
    .ok();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&image).unwrap());
    let sets = dir.path().join("state/readahead");
    let text = wait_for("the learned read set in state/readahead", || {
        let e = std::fs::read_dir(&sets)
            .ok()?
            .flatten()
            .find(|e| e.path().extension().is_some_and(|x| x == "txt"))?;
        std::fs::read_to_string(e.path()).ok()
    });
    assert!(text.starts_with("diskless-readset 1\n"), "{text}");
    // All eight 1 MiB chunks, as one run.
    assert!(text.ends_with("\n0 8\n"), "{text}");
    // The file is renamed into place just before the line is logged: wait for the line too.
    let first_log = wait_for("the 'boot read set learned' log line", || {
        let log = server.stderr();
        log.contains("boot read set learned").then_some(log)
    });
    assert!(!first_log.contains("read-ahead issued"), "{first_log}");
    server.stop();

    // Second start over the same image: the read-ahead of the learned set is issued at open.
    let server = Server::start(dir.path(), &cfg);
    let line = wait_for("the read-ahead log line", || {
        server
            .stderr()
            .lines()
            .find(|l| l.contains("boot read-ahead issued"))
            .map(str::to_string)
    });
    assert!(line.contains("bytes=8388608"), "{line}");
    assert!(line.contains("chunks=8"), "{line}");
    server.stop();
}
