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
#[path = "common/guest.rs"]
mod guest;

use common::*;
use guest::{clean, images, iscsidxe_vars, run_iscsidxe, run_limited, tail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// One guest boot, hard limit inside run-qemu.sh (QEMU is killed after this).
const BOOT_TIMEOUT_SECS: u64 = 180;
/// The builder keeps the last 2 MiB of every image outside any partition: the read-only marker
/// sits at `sectors - 2048`, the initramfs writes its marker at `sectors - 2047`.
const WRITE_MARKER_FROM_END: u64 = 2047;

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
    std::fs::copy(images("boot-images").join(image), &img).unwrap();
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
    std::fs::copy(images("boot-images").join(image), &golden).unwrap();
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
    commit_offline(&dir.path().join("targets.yaml"), &initiator, &published);
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
    // Both reboot: the firmware logs in again after the OS phase, a new boot at once.
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

/// Several disks per client (issue 11 step 4): the boot script from diskless's own endpoint
/// hooks the data disk (`sanhook --drive 0x81`, LUN 1) and `sanboot`s the system disk (LUN
/// 0); after the iBFT hand-off Linux sees both, the data disk with its size and content.
#[test]
fn bios_boot_script_hooks_a_data_disk_and_linux_sees_both() {
    boot_with_a_data_disk("bios");
}

/// The same under OVMF + iPXE's EFI ROM (EFI block devices 0x80 and 0x81).
#[test]
fn uefi_boot_script_hooks_a_data_disk_and_linux_sees_both() {
    boot_with_a_data_disk("uefi");
}

fn boot_with_a_data_disk(mode: &str) {
    require_boot_tools(mode);
    let dir = tempfile::tempdir().unwrap();
    let target = "iqn.2026-11.test:boot-multi";
    let who = format!("iqn.2026-11.test:multi-{}", std::process::id());
    let mac = "52:54:00:12:34:77";
    let golden = dir.path().join("golden.img");
    std::fs::copy(images("boot-images").join(format!("{mode}.img")), &golden).unwrap();
    // 8 MiB data disk whose first block names it.
    let data = dir.path().join("data.img");
    let mut bytes = vec![0u8; 8 << 20];
    bytes[..19].copy_from_slice(b"DISKLESS-DATA-DISK\n");
    std::fs::write(&data, &bytes).unwrap();
    // The guest reaches the host's loopback as 10.0.2.2; the iSCSI port is the server's
    // (Server::start listens on 127.0.0.1:0), so the script's portal names the host only.
    let hport = free_port();
    let yaml = format!(
        "portals: [\"127.0.0.1:0\"]\nstate_dir: {state}\nsettings: {{reboot_gap_secs: 1}}\n\
         boot_http: {{listen: \"127.0.0.1:{hport}\", iscsi_portal: \"10.0.2.2\"}}\n\
         images:\n  - {{name: base, path: {img}}}\n  - {{name: data, path: {data}}}\n\
         targets:\n  - name: {target}\n    boot:\n      bindings:\n\
         \x20       - initiator: \"{who}\"\n\
         \x20         mac: \"{mac}\"\n\
         \x20         os: linux\n\
         \x20         disks: [{{lun: 0, image: base, mode: volatile}}, {{lun: 1, image: data, mode: persistent}}]\n",
        state = dir.path().join("state").display(),
        img = golden.display(),
        data = data.display(),
    );
    let server = Server::start(dir.path(), &Config::yaml(&yaml));
    let log = dir.path().join(format!("serial-multi-{mode}.log"));
    let started = Instant::now();
    let url = format!("http://10.0.2.2:{hport}/boot.ipxe?mac=${{net0/mac}}&platform=${{platform}}");
    let (ok, out) = run_limited(
        Command::new("bash")
            .arg(repo().join("scripts/boot/run-qemu.sh"))
            .args(["--mode", mode, "--chain", &url, "--mac", mac])
            .args(["--timeout", &BOOT_TIMEOUT_SECS.to_string()])
            .arg("--log")
            .arg(&log)
            .env("TMPDIR", dir.path()),
        Duration::from_secs(BOOT_TIMEOUT_SECS + 30),
    );
    let serial = clean(&std::fs::read_to_string(&log).unwrap_or_default());
    let report = || {
        format!(
            "after {:?}:\n--- run-qemu.sh ---\n{out}\n--- serial (tail) ---\n{}\n--- diskless stderr (tail) ---\n{}",
            started.elapsed(),
            tail(&serial, 40),
            tail(&server.stderr(), 30)
        )
    };
    assert!(ok, "boot failed {}", report());
    eprintln!("{mode} boot with two disks: {:?}", started.elapsed());
    // The script the endpoint served (this firmware, two disks), as iPXE ran it.
    let stderr = server.stderr();
    assert!(
        stderr.contains("boot script served")
            && stderr.contains(&format!("firmware=Some(\"{mode}\")")),
        "{}",
        report()
    );
    let disk = |name: &str| {
        serial
            .lines()
            .find_map(|l| {
                let i = l.find(&format!("DISKLESS-DISK {name} "))?;
                Some(l[i..].trim().to_string())
            })
            .unwrap_or_else(|| panic!("Linux did not list {name}: {}", report()))
    };
    let sda = disk("sda");
    assert!(sda.contains("lun=0 "), "{sda}");
    let sdb = disk("sdb");
    assert_eq!(
        sdb,
        format!(
            "DISKLESS-DISK sdb lun=1 sectors={} head=DISKLESS-DATA-DISK",
            (8 << 20) / 512
        ),
        "{}",
        report()
    );
    assert!(
        !serial.contains("DISKLESS-DISK sdc"),
        "a third disk appeared: {}",
        report()
    );
    for marker in ["DISKLESS-HANDOFF-READ-OK", "DISKLESS-HANDOFF-WRITE-OK"] {
        assert!(serial.contains(marker), "no {marker}: {}", report());
    }
    let status = server.stop();
    assert!(status.success(), "diskless exited {status:?}");
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

/// OVMF's own iSCSI initiator (edk2 IScsiDxe, no iPXE anywhere) boots a volatile client disk:
/// the OS writes its marker, the machine is powered off and on (same NVRAM, same MAC, so
/// IScsiDxe logs in with the same ISID again), and the second boot no longer sees the marker.
/// The golden image is unchanged.
#[test]
fn uefi_iscsidxe_volatile_disk_is_fresh_at_every_boot() {
    require_boot_tools("uefi");
    let dir = tempfile::tempdir().unwrap();
    let target = "iqn.2026-11.test:boot-dxe";
    let initiator = format!("iqn.2026-11.test:dxe-{}", std::process::id());
    let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let bindings = format!(
        "        - {{initiator: \"{initiator}\", mac: \"52:54:00:12:34:56\", image: base, mode: volatile}}\n"
    );
    let (server, golden) = serve_golden(dir.path(), "uefi.img", target, &bindings);
    let before = file_sha(&golden);
    let vars = dir.path().join("nvram.fd");
    iscsidxe_vars(&vars, mac, &initiator, target, server.port);
    for round in ["1", "2"] {
        let serial = boot_iscsidxe(&server, &dir.path().join(round), &vars, "52:54:00:12:34:56");
        assert_eq!(
            previous(&serial).as_deref(),
            Some("none"),
            "boot {round} saw an earlier boot's write: {serial}"
        );
    }
    let show = Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(["client", "show", &initiator, "--control"])
        .arg(dir.path().join("state/control.sock"))
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&show.stdout).into_owned();
    assert!(show.contains("boots: 2"), "{show}");
    assert!(show.contains("firmware ISIDs: 125400123456"), "{show}");
    let status = server.stop();
    assert!(status.success(), "diskless exited {status:?}");
    assert_eq!(file_sha(&golden), before, "the golden image changed");
}

/// Power on a UEFI machine whose NVRAM is `vars` (IScsiDxe configured, no iPXE: the virtio NIC
/// has no option ROM) and wait for the test initramfs's verdict, QEMU killed after
/// BOOT_TIMEOUT_SECS whatever happens. Returns the cleaned serial log; panics with its tail and
/// the server's log unless the hand-off wrote and read back its marker.
fn boot_iscsidxe(server: &Server, dir: &Path, vars: &Path, mac: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let limit = Duration::from_secs(BOOT_TIMEOUT_SECS);
    let (ok, serial, took) = run_iscsidxe(vars, mac, &dir.join("serial.log"), limit);
    assert!(
        ok && serial.contains("DISKLESS-HANDOFF-READ-OK"),
        "IScsiDxe boot failed after {took:?}:\n--- serial (tail) ---\n{}\n--- diskless stderr (tail) ---\n{}",
        tail(&serial, 40),
        tail(&server.stderr(), 30)
    );
    eprintln!("IScsiDxe boot: {took:?}");
    serial
}
