//! QEMU guest boots shared by tests/boot.rs, tests/netboot.rs and tests/cluster_uefi.rs: the test images,
//! commands run under a hard time limit, serial logs made readable, OVMF variable stores for IScsiDxe.
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

/// EFI_GUID as stored: u32, u16, u16 little endian, then 8 bytes.
pub fn efi_guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[..4].copy_from_slice(&a.to_le_bytes());
    g[4..6].copy_from_slice(&b.to_le_bytes());
    g[6..8].copy_from_slice(&c.to_le_bytes());
    g[8..].copy_from_slice(&d);
    g
}

/// Append NV+BS variables to a copy of OVMF's variable store `template` (an authenticated
/// variable store inside a firmware volume; edk2 MdeModulePkg/Include/Guid/VariableFormat.h):
/// each an AUTHENTICATED_VARIABLE_HEADER (60 bytes, State 0x3F = added), the UTF-16 name with
/// its NUL, the data, 4-byte aligned.
pub fn write_efi_vars(template: &Path, out: &Path, vars: &[(&str, [u8; 16], Vec<u8>)]) {
    let mut fd = std::fs::read(template)
        .unwrap_or_else(|e| panic!("{}: {e} (Debian package ovmf)", template.display()));
    assert!(
        fd.len() > 64 && &fd[40..44] == b"_FVH",
        "{} is not a firmware volume",
        template.display()
    );
    let fv_header_len = u16::from_le_bytes([fd[48], fd[49]]) as usize;
    let auth_guid = efi_guid(
        0xaaf32c78,
        0x947b,
        0x439a,
        [0xa1, 0x80, 0x2e, 0x14, 0x4e, 0xc3, 0x77, 0x92],
    );
    assert_eq!(
        fd[fv_header_len..fv_header_len + 16],
        auth_guid,
        "not an authenticated variable store"
    );
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let store_end = fv_header_len + le32(&fd[fv_header_len + 16..]);
    let align = |n: usize| (n + 3) & !3;
    let mut at = align(fv_header_len + 28);
    while u16::from_le_bytes([fd[at], fd[at + 1]]) == 0x55aa {
        let name = le32(&fd[at + 36..]);
        let data = le32(&fd[at + 40..]);
        at = align(at + 60 + name + data);
    }
    for (name, vendor, data) in vars {
        let name16: Vec<u8> = name
            .encode_utf16()
            .chain(std::iter::once(0))
            .flat_map(|u| u.to_le_bytes())
            .collect();
        let mut v = Vec::new();
        v.extend_from_slice(&0x55aau16.to_le_bytes());
        v.push(0x3f); // VAR_ADDED
        v.push(0);
        v.extend_from_slice(&3u32.to_le_bytes()); // NON_VOLATILE | BOOTSERVICE_ACCESS
        v.extend_from_slice(&[0; 8 + 16 + 4]); // MonotonicCount, TimeStamp, PubKeyIndex
        v.extend_from_slice(&(name16.len() as u32).to_le_bytes());
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v.extend_from_slice(vendor);
        v.extend_from_slice(&name16);
        v.extend_from_slice(data);
        assert!(at + v.len() <= store_end, "variable store full");
        fd[at..at + v.len()].copy_from_slice(&v);
        at = align(at + v.len());
    }
    std::fs::write(out, fd).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
}

/// OVMF variables (a copy of Debian's OVMF_VARS_4M.fd written to `out`) that make edk2's
/// IScsiDxe log in to `target` at 10.0.2.2:`port` (the host, from a guest on QEMU user
/// networking) with the static address 10.0.2.15, as `initiator`, on the NIC with `mac`, LUN 0
/// (edk2 NetworkPkg/IScsiDxe: ISCSI_ATTEMPT_CONFIG_NVDATA of IScsiConfig.h and
/// ISCSI_SESSION_CONFIG_NVDATA of IScsiMisc.h, pack(1), 1049 bytes in edk2-stable202211 as
/// Debian 12 ships it).
pub fn iscsidxe_vars(out: &Path, mac: [u8; 6], initiator: &str, target: &str, port: u16) {
    let name_guid = efi_guid(
        0x59324945,
        0xec44,
        0x4c0d,
        [0xb1, 0xcd, 0x9d, 0xb1, 0x39, 0xdf, 0x07, 0x0c],
    );
    let config_guid = efi_guid(
        0x4b47d616,
        0xa8d6,
        0x4552,
        [0x9d, 0x44, 0xcc, 0xad, 0x2e, 0x0f, 0x4c, 0xf9],
    );
    let put =
        |a: &mut Vec<u8>, at: usize, bytes: &[u8]| a[at..at + bytes.len()].copy_from_slice(bytes);
    let mut a = vec![0u8; 1049];
    a[17] = 1; // AttemptConfigIndex
    put(&mut a, 26, b"Attempt 1"); // AttemptName[12]
    let mac_text: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    put(&mut a, 38, mac_text.join(":").as_bytes()); // MacString[96]
    let s = 182; // SessionConfigData
    put(&mut a, s, &port.to_le_bytes()); // TargetPort
    a[s + 2] = 1; // Enabled (ISCSI_ENABLED)
    a[s + 3] = 0; // IpMode: IPv4
    put(&mut a, s + 4, &[10, 0, 2, 15]); // LocalIp
    put(&mut a, s + 20, &[255, 255, 255, 0]); // SubnetMask
    put(&mut a, s + 24, &[10, 0, 2, 2]); // Gateway
                                         // InitiatorInfoFromDhcp, TargetInfoFromDhcp: 0 (static: no DHCP wait)
    put(&mut a, s + 42, target.as_bytes()); // TargetName[224]
    put(&mut a, s + 266, &[10, 0, 2, 2]); // TargetIp
    a[s + 282] = 24; // PrefixLength
                     // BootLun[8] at s+283: LUN 0
    put(&mut a, s + 291, &1000u16.to_le_bytes()); // ConnectTimeout (ms)
    a[s + 293] = 2; // ConnectRetryCount
    let mut isid = mac;
    isid[0] &= 0x3f;
    put(&mut a, s + 294, &isid); // IsId: the MAC-derived one IScsiDxe itself uses
                                 // AuthenticationType at 757: 0 = none; AutoConfigureSuccess at 1047
    a[1048] = 1; // Actived
    let mut iname = initiator.as_bytes().to_vec();
    iname.push(0);
    write_efi_vars(
        Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd"),
        out,
        &[
            ("I_NAME", name_guid, iname),
            (
                "InitialAttemptOrder",
                config_guid,
                vec![1, 2, 3, 4, 5, 6, 7, 8],
            ),
            ("AttemptOrder", config_guid, vec![1]),
            ("Attempt 1", name_guid, a),
        ],
    );
}

/// Power on a UEFI machine (q35, OVMF, TCG) whose NVRAM is `vars` (IScsiDxe configured, no
/// iPXE: the virtio NIC with `mac` has no option ROM), serial console to `log`, and wait for
/// the test initramfs's verdict (`DISKLESS-HANDOFF-WRITE-OK`) or a failure marker; QEMU is
/// killed after `limit` whatever happens. Returns (verdict seen, cleaned serial log, time).
pub fn run_iscsidxe(
    vars: &Path,
    mac: &str,
    log: &Path,
    limit: Duration,
) -> (bool, String, Duration) {
    let started = Instant::now();
    let mut qemu = Command::new("timeout")
        .args([
            "-k",
            "5",
            &limit.as_secs().to_string(),
            "qemu-system-x86_64",
        ])
        .args([
            "-accel",
            "tcg",
            "-m",
            "512",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
        ])
        .args([
            "-machine", "q35", "-vga", "none", "-display", "none", "-monitor", "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-no-reboot")
        .args([
            "-drive",
            "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        ])
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()))
        .args(["-netdev", "user,id=n0,net=10.0.2.0/24,host=10.0.2.2"])
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=n0,romfile=,mac={mac},bootindex=1"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (Debian package qemu-system-x86)");
    let failures = [
        "DISKLESS-FAIL",
        "Kernel panic",
        "No bootable device",
        "Boot failed",
    ];
    let deadline = Instant::now() + limit + Duration::from_secs(10);
    let read = || clean(&std::fs::read_to_string(log).unwrap_or_default());
    let (ok, serial) = loop {
        let serial = read();
        if serial.contains("DISKLESS-HANDOFF-WRITE-OK") {
            // The guest powers off right after; let it, then stop it regardless.
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until && matches!(qemu.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(100));
            }
            break (true, read());
        }
        if failures.iter().any(|f| serial.contains(f)) || Instant::now() > deadline {
            break (false, serial);
        }
        if let Ok(Some(_)) = qemu.try_wait() {
            let serial = read();
            break (serial.contains("DISKLESS-HANDOFF-WRITE-OK"), serial);
        }
        thread::sleep(Duration::from_millis(250));
    };
    let _ = qemu.kill();
    let _ = qemu.wait();
    (ok, serial, started.elapsed())
}
