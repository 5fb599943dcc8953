//! QEMU guest boots shared by tests/boot.rs and tests/netboot.rs: the test images, commands
//! run under a hard time limit, serial logs made readable.
#![allow(dead_code)] // each test binary uses a different subset

use super::{boot_cache, repo};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// Building the images the first time downloads ~75 MB of .debs and takes a few minutes.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// Run a command with a hard time limit; returns (success, stdout+stderr).
pub fn run_limited(cmd: &mut Command, limit: Duration) -> (bool, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let text = format!(
        "{}{}",
        t_out.join().unwrap_or_default(),
        t_err.join().unwrap_or_default()
    );
    match status {
        Some(s) => (s.success(), text),
        None => (false, format!("{text}\n(killed after {limit:?})")),
    }
}

/// `<CARGO_TARGET_TMPDIR>/<name>`, holding bios.img and uefi.img from
/// scripts/boot/build-image.sh, built once for all tests of this binary.
pub fn images(name: &str) -> &'static Path {
    static IMAGES: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = IMAGES.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        let (ok, text) = run_limited(
            Command::new("bash")
                .arg(repo().join("scripts/boot/build-image.sh"))
                .arg(&out)
                .env("DISKLESS_BOOT_CACHE", boot_cache()),
            BUILD_TIMEOUT,
        );
        if ok {
            Ok(out)
        } else {
            Err(text)
        }
    });
    match r {
        Ok(p) => p,
        Err(text) => panic!("scripts/boot/build-image.sh failed:\n{text}"),
    }
}

/// The serial log without carriage returns and terminal escapes.
pub fn clean(log: &str) -> String {
    let mut s = String::with_capacity(log.len());
    let mut chars = log.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\x1b' => {
                // CSI: ESC [ params final-letter
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for d in chars.by_ref() {
                        if d.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            _ => s.push(c),
        }
    }
    s
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
