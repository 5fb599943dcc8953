//! Real network boots under QEMU (software emulation): SeaBIOS or OVMF, iPXE `sanboot` from our
//! target, a Debian kernel + busybox initramfs read through the emulated disk, then Linux logs
//! in again from the iBFT (`iscsistart -b`, the BIOS/UEFI hand-off) and reads and writes the
//! disk. See docs/booting.md.
//!
//! The images come from `scripts/boot/build-image.sh` (Debian packages only, cached under
//! `target/boot-cache`), built once per test binary. Each test serves a private COPY of an image
//! from its own temp dir on its own port, so the tests run in parallel safely. Missing tools
//! (QEMU, OVMF, iPXE ROMs, the builder's tools) FAIL the tests with the Debian package to install.

mod common;

use common::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// One guest boot, hard limit inside run-qemu.sh (QEMU is killed after this).
const BOOT_TIMEOUT_SECS: u64 = 180;
/// Building the images the first time downloads ~75 MB of .debs and takes a few minutes.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// The builder keeps the last 2 MiB of every image outside any partition: the read-only marker
/// sits at `sectors - 2048`, the initramfs writes its marker at `sectors - 2047`.
const WRITE_MARKER_FROM_END: u64 = 2047;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `<target dir>/boot-cache`: downloaded .debs, built images, the saved boot capture.
fn boot_cache() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(&tmp).join("boot-cache")
}

/// Fail (never skip) when a tool or firmware file is missing, naming its Debian package.
fn require(what: &str, package: &str) {
    let found = if what.starts_with('/') {
        Path::new(what).exists()
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(what).is_file()))
            .unwrap_or(false)
    };
    assert!(
        found,
        "'{what}' not found: install the Debian package {package} (scripts/test.sh does it as root)"
    );
}

fn require_boot_tools(mode: &str) {
    require("qemu-system-x86_64", "qemu-system-x86");
    require("timeout", "coreutils");
    if mode == "bios" {
        require("/usr/lib/ipxe/qemu/pxe-virtio.rom", "ipxe-qemu");
    } else {
        require("/usr/lib/ipxe/qemu/efi-virtio.rom", "ipxe-qemu");
        require("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf");
        require("/usr/share/OVMF/OVMF_VARS_4M.fd", "ovmf");
    }
    // The image builder's tools (it checks them itself too, this names them up front).
    for (tool, pkg) in [
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
        ("mcopy", "mtools"),
        ("mkfs.fat", "dosfstools"),
        ("syslinux", "syslinux"),
        ("/usr/lib/syslinux/mbr/mbr.bin", "syslinux-common"),
        ("sfdisk", "fdisk"),
        ("cpio", "cpio"),
    ] {
        require(tool, pkg);
    }
}

/// Run a command with a hard time limit; returns (success, stdout+stderr).
fn run_limited(cmd: &mut Command, limit: Duration) -> (bool, String) {
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

/// The directory holding bios.img and uefi.img, built once for all tests of this binary.
fn images() -> &'static Path {
    static IMAGES: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = IMAGES.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("boot-images");
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
fn clean(log: &str) -> String {
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

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Run one guest boot against `server`: (run-qemu.sh succeeded, its output, cleaned serial log).
fn run_boot(
    server: &Server,
    dir: &Path,
    mode: &str,
    target: &str,
    initiator: &str,
    pcap: Option<&Path>,
) -> (bool, String, String) {
    let log = dir.join(format!("serial-{mode}-{}.log", initiator.replace(':', "_")));
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("scripts/boot/run-qemu.sh"))
        .args(["--mode", mode, "--port", &server.port.to_string()])
        .args(["--target", target, "--initiator", initiator, "--lun", "0"])
        .args(["--timeout", &BOOT_TIMEOUT_SECS.to_string()])
        .arg("--log")
        .arg(&log)
        .env("TMPDIR", dir);
    if let Some(p) = pcap {
        cmd.arg("--pcap").arg(p);
    }
    let (ok, out) = run_limited(&mut cmd, Duration::from_secs(BOOT_TIMEOUT_SECS + 30));
    let serial = clean(&std::fs::read_to_string(&log).unwrap_or_default());
    (ok, out, serial)
}

/// One guest boot against `server`; returns the cleaned serial log. Panics with the serial
/// tail and the server's log unless the hand-off wrote and read back its marker.
fn boot(
    server: &Server,
    dir: &Path,
    mode: &str,
    target: &str,
    initiator: &str,
    pcap: Option<&Path>,
) -> String {
    let started = Instant::now();
    let (ok, out, serial) = run_boot(server, dir, mode, target, initiator, pcap);
    let report = || {
        format!(
            "{mode} boot of {initiator} after {:?}:\n--- run-qemu.sh ---\n{out}\n--- serial (tail) ---\n{}\n--- diskless stderr (tail) ---\n{}",
            started.elapsed(),
            tail(&serial, 40),
            tail(&server.stderr(), 30)
        )
    };
    assert!(ok, "boot failed: {}", report());
    for marker in [
        "DISKLESS-STAGE1".to_string(),
        "DISKLESS-HANDOFF-READ-OK".to_string(),
        format!("DISKLESS-HANDOFF-WRITE-OK {initiator}"),
    ] {
        assert!(
            serial.contains(&marker),
            "no '{marker}' on the serial console: {}",
            report()
        );
    }
    eprintln!("{mode} boot of {initiator}: {:?}", started.elapsed());
    serial
}

/// What the guest said it found in the write-marker block before writing.
fn previous(serial: &str) -> Option<String> {
    serial.lines().find_map(|l| {
        let i = l.find("DISKLESS-PREVIOUS ")?;
        Some(l[i + "DISKLESS-PREVIOUS ".len()..].trim().to_string())
    })
}

/// The text of the write-marker block in the image file on the host.
fn marker_in_image(img: &Path) -> String {
    let data = std::fs::read(img).unwrap();
    let sectors = data.len() as u64 / 512;
    assert!(sectors > WRITE_MARKER_FROM_END, "image too small");
    let off = ((sectors - WRITE_MARKER_FROM_END) * 512) as usize;
    let block = &data[off..off + 512];
    let end = block
        .iter()
        .position(|&b| b == 0 || b == b'\n')
        .unwrap_or(512);
    String::from_utf8_lossy(&block[..end]).into_owned()
}

/// Serve a private copy of `image` as LUN 0 of `target` (not removable: a real boot disk).
fn serve_copy(dir: &Path, image: &str, target: &str) -> (Server, PathBuf) {
    let img = dir.join("disk.img");
    std::fs::copy(images().join(image), &img).unwrap();
    let mut lun = Lun::new(0, &img);
    lun.removable = false;
    let server = Server::start(dir, &Config::new(vec![Target::new(target, vec![lun])]));
    (server, img)
}

#[test]
fn bios_ipxe_sanboot_and_ibft_handoff() {
    require_boot_tools("bios");
    let dir = tempfile::tempdir().unwrap();
    let target = "iqn.2026-11.test:boot-bios";
    let (server, img) = serve_copy(dir.path(), "bios.img", target);
    let first = format!("iqn.2026-11.test:bios-{}-1", std::process::id());
    let second = format!("iqn.2026-11.test:bios-{}-2", std::process::id());

    // Keep one boot's traffic for the performance work (what a boot reads, in which sizes).
    let _ = std::fs::create_dir_all(boot_cache());
    let pcap = boot_cache().join("bios-boot.pcap");
    let serial = boot(&server, dir.path(), "bios", target, &first, Some(&pcap));
    assert_eq!(
        previous(&serial).as_deref(),
        Some("none"),
        "fresh image: {serial}"
    );

    // A second client (another initiator, as after a reboot) sees what the first one wrote.
    let serial = boot(&server, dir.path(), "bios", target, &second, None);
    assert_eq!(
        previous(&serial),
        Some(first.clone()),
        "persistence: {serial}"
    );

    let status = server.stop();
    assert!(status.success(), "diskless exited {status:?}");
    assert_eq!(marker_in_image(&img), format!("DISKLESS-WRITE {second}"));
}

/// Serve a copy of `image` as the golden image of a boot target: `bindings` is YAML for
/// `boot.bindings`, plus a volatile default. Returns the server and the golden copy.
fn serve_golden(dir: &Path, image: &str, target: &str, bindings: &str) -> (Server, PathBuf) {
    let golden = dir.join("golden.img");
    std::fs::copy(images().join(image), &golden).unwrap();
    let yaml = format!(
        "portals: [\"127.0.0.1:0\"]\nstate_dir: {state}\nsettings: {{reboot_gap_secs: 1}}\n\
         images:\n  - {{name: base, path: {img}}}\n\
         targets:\n  - name: {target}\n    boot:\n      bindings:\n{bindings}      default: {{image: base, mode: volatile}}\n",
        state = dir.join("state").display(),
        img = golden.display(),
    );
    (Server::start(dir, &Config::yaml(&yaml)), golden)
}

fn file_sha(path: &Path) -> Vec<u8> {
    use md5::Digest;
    md5::Md5::digest(std::fs::read(path).unwrap()).to_vec()
}

#[test]
fn uefi_ipxe_sanboot_and_ibft_handoff() {
    require_boot_tools("uefi");
    let dir = tempfile::tempdir().unwrap();
    let target = "iqn.2026-11.test:boot-uefi";
    // UEFI through a client overlay: iPXE closes its connection at ExitBootServices without a
    // Logout, Linux logs in again with another ISID; both reach the same client disk.
    let (server, golden) = serve_golden(dir.path(), "uefi.img", target, "");
    let before = file_sha(&golden);
    let initiator = format!("iqn.2026-11.test:uefi-{}", std::process::id());

    let serial = boot(&server, dir.path(), "uefi", target, &initiator, None);
    assert_eq!(
        previous(&serial).as_deref(),
        Some("none"),
        "fresh image: {serial}"
    );

    let status = server.stop();
    assert!(status.success(), "diskless exited {status:?}");
    assert_eq!(file_sha(&golden), before, "the golden image changed");
    // The client's disk (published with `client commit`, offline) holds its marker.
    let published = dir.path().join("published.img");
    let out = Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(["client", "commit", &initiator])
        .arg(&published)
        .arg("-c")
        .arg(dir.path().join("targets.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        marker_in_image(&published),
        format!("DISKLESS-WRITE {initiator}")
    );
}

/// Two BIOS clients boot one golden image at the same time, each through its own overlay
/// (one volatile, one persistent); each writes its own marker and sees only its own; after a
/// reboot the volatile client's write is gone and the persistent one's is still there; the
/// golden image never changes.
#[test]
fn bios_two_clients_boot_one_golden_image_through_overlays() {
    require_boot_tools("bios");
    let dir = tempfile::tempdir().unwrap();
    let target = "iqn.2026-11.test:boot-golden";
    let pid = std::process::id();
    let vol = format!("iqn.2026-11.test:vol-{pid}");
    let per = format!("iqn.2026-11.test:per-{pid}");
    let bindings = format!(
        "        - {{initiator: \"{vol}\", image: base, mode: volatile}}\n\
         \x20       - {{initiator: \"{per}\", image: base, mode: persistent}}\n"
    );
    let (server, golden) = serve_golden(dir.path(), "bios.img", target, &bindings);
    let before = file_sha(&golden);
    let both = |round: &str| -> (String, String) {
        thread::scope(|s| {
            let a = s.spawn(|| {
                boot(
                    &server,
                    &dir.path().join(format!("{round}-v")),
                    "bios",
                    target,
                    &vol,
                    None,
                )
            });
            let b = s.spawn(|| {
                boot(
                    &server,
                    &dir.path().join(format!("{round}-p")),
                    "bios",
                    target,
                    &per,
                    None,
                )
            });
            (a.join().unwrap(), b.join().unwrap())
        })
    };
    std::fs::create_dir_all(dir.path().join("1-v")).unwrap();
    std::fs::create_dir_all(dir.path().join("1-p")).unwrap();
    std::fs::create_dir_all(dir.path().join("2-v")).unwrap();
    std::fs::create_dir_all(dir.path().join("2-p")).unwrap();
    let (v1, p1) = both("1");
    // Each client starts from the golden image: neither sees the other's marker.
    assert_eq!(previous(&v1).as_deref(), Some("none"), "{v1}");
    assert_eq!(previous(&p1).as_deref(), Some("none"), "{p1}");
    // Both reboot (the firmware logs in again after the reboot gap).
    thread::sleep(Duration::from_secs(2));
    let (v2, p2) = both("2");
    assert_eq!(
        previous(&v2).as_deref(),
        Some("none"),
        "volatile write survived a reboot: {v2}"
    );
    assert_eq!(
        previous(&p2),
        Some(per.clone()),
        "persistent write lost: {p2}"
    );
    let status = server.stop();
    assert!(status.success(), "diskless exited {status:?}");
    assert_eq!(file_sha(&golden), before, "the golden image changed");
}

/// A sanboot of a target the server does not have must fail in iPXE (login rejected,
/// "Could not open SAN device") and the runner must report it quickly, not time out.
#[test]
fn bios_sanboot_of_unknown_target_fails_fast() {
    require_boot_tools("bios");
    let dir = tempfile::tempdir().unwrap();
    let (server, _img) = serve_copy(dir.path(), "bios.img", "iqn.2026-11.test:boot-neg");
    let started = Instant::now();
    let (ok, out, serial) = run_boot(
        &server,
        dir.path(),
        "bios",
        "iqn.2026-11.test:no-such-target",
        "iqn.2026-11.test:neg",
        None,
    );
    assert!(!ok, "boot of an unknown target succeeded?\n{out}\n{serial}");
    assert!(
        serial.contains("SANBOOT-FAILED"),
        "iPXE did not report the failed sanboot:\n{out}\n{}",
        tail(&serial, 30)
    );
    assert!(
        !serial.contains("DISKLESS-STAGE1"),
        "booted anyway:\n{serial}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(BOOT_TIMEOUT_SECS),
        "the runner waited for its timeout instead of stopping on SANBOOT-FAILED"
    );
    let status = server.stop();
    assert!(status.success(), "diskless exited {status:?}");
}
