//! Log output as operators and log collectors receive it: plain text without terminal escape
//! codes when stderr is not a terminal, and one JSON object per line with `--log-format json`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Serve a fresh image with these extra arguments until the server says it listens; return
/// everything it logged up to then (stderr, a pipe: not a terminal).
fn startup_log(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_diskless"))
        .arg("serve")
        .arg("--image")
        .arg(&image)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--listen", "127.0.0.1:0", "--log", "info"])
        .args(extra)
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
            .join("\n")
    });
    // The listening line is on stdout, after the start-up log lines.
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let t = Instant::now();
    loop {
        match out.next() {
            Some(Ok(l)) if l.starts_with("diskless: listening on") => break,
            Some(_) => assert!(t.elapsed() < Duration::from_secs(30)),
            None => panic!("the server ended before listening"),
        }
    }
    // SIGTERM: a clean stop closes stderr, and the reader returns all of it.
    // SAFETY: kill(2) on the PID of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    reader.join().unwrap()
}

#[test]
fn text_logs_have_no_escape_codes_off_a_terminal() {
    let log = startup_log(&[]);
    assert!(log.contains("INFO"), "no log lines: {log}");
    assert!(
        !log.contains('\x1b'),
        "escape codes in a log that goes to a pipe: {log:?}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let log = startup_log(&["--log-format", "json"]);
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{v}");
    }
}
