//! Built-in network boot (docs/booting.md): a bare QEMU machine boots from diskless alone.
//!
//! End to end, inside network namespaces this test creates and deletes (a [`Lab`] guard, also
//! on failure): a bridge `br0` (10.77.0.1, diskless), tap devices for the QEMU guests, and in
//! proxy mode a second namespace whose dnsmasq hands out addresses only (no boot options: the
//! site's router). No packet leaves the namespaces.
//!
//! 1. SeaBIOS + the NIC's iPXE ROM: DHCP (dnsmasq) + proxyDHCP (diskless) -> script -> sanboot
//!    -> Linux -> iBFT hand-off; started with the one quick-mode command.
//! 2. OVMF without an iPXE ROM: the firmware's PXE -> TFTP snponly.efi -> iPXE -> script ->
//!    sanboot -> Linux -> hand-off.
//! 3. Both again with diskless as the only DHCP server (mode dhcp), leases persisted.
//! 4. OVMF's UEFI HTTP Boot: the iPXE binary over HTTP from `/files/`, no TFTP.
//!
//! Plus hostile input on loopback: malformed, truncated, oversized and flooding DHCP and TFTP
//! packets, traversal attempts over TFTP and HTTP; the server keeps serving, nothing outside
//! the file root is read.
//!
//! Tools missing (QEMU, OVMF, iPXE, dnsmasq, iproute2) or not root: the tests FAIL naming
//! what to install; nothing is skipped.

mod common;
#[path = "common/guest.rs"]
mod guest;

use common::*;
use guest::{clean, images, run_limited, tail};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, MessageType};
use diskless::netboot::{dhcp, tftp};

/// One guest boot: QEMU is killed after this (inside run-qemu.sh), the runner after +30 s.
const BOOT_TIMEOUT_SECS: u64 = 150;
const SERVER_ADDR: &str = "10.77.0.1";

fn require_lab(uefi: bool) {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "network namespaces, bridges and taps need root: run the netboot tests as root"
    );
    for (what, pkg) in [
        ("ip", "iproute2"),
        ("dnsmasq", "dnsmasq-base"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("timeout", "coreutils"),
        ("/usr/lib/ipxe/undionly.kpxe", "ipxe"),
        ("/usr/lib/ipxe/snponly.efi", "ipxe"),
        ("/usr/lib/ipxe/qemu/pxe-virtio.rom", "ipxe-qemu"),
        ("/usr/lib/ipxe/qemu/efi-virtio.rom", "ipxe-qemu"),
        ("mcopy", "mtools"),
        ("mkfs.fat", "dosfstools"),
        ("syslinux", "syslinux"),
        ("/usr/lib/syslinux/mbr/mbr.bin", "syslinux-common"),
        ("sfdisk", "fdisk"),
        ("cpio", "cpio"),
        ("dpkg-deb", "dpkg"),
    ] {
        require(what, pkg);
    }
    if uefi {
        require("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf");
        require("/usr/share/OVMF/OVMF_VARS_4M.fd", "ovmf");
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e} (install iproute2)"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The lab: namespaces, bridge, taps and the processes started in them. Dropping it kills
/// those processes (by their PIDs) and deletes the namespaces, whatever happened.
struct Lab {
    ns: String,
    router_ns: Option<String>,
    children: Vec<Child>,
    dir: PathBuf,
}

impl Lab {
    /// `taps`: tap devices on the bridge; `router`: a dnsmasq namespace handing out
    /// 10.77.0.100-150 and nothing else.
    fn new(tag: &str, dir: &Path, taps: &[&str], router: bool) -> Lab {
        let id = format!("{}{}", std::process::id() % 100_000, tag);
        let ns = format!("dlnb-{id}");
        let mut lab = Lab {
            ns: ns.clone(),
            router_ns: None,
            children: Vec::new(),
            dir: dir.to_path_buf(),
        };
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{SERVER_ADDR}/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &ns, "link", "set", "br0", "up"]);
        for t in taps {
            ip(&["-n", &ns, "tuntap", "add", "dev", t, "mode", "tap"]);
            ip(&["-n", &ns, "link", "set", t, "master", "br0"]);
            ip(&["-n", &ns, "link", "set", t, "up"]);
        }
        if router {
            let r = format!("dlnr-{id}");
            let _ = Command::new("ip").args(["netns", "del", &r]).output();
            ip(&["netns", "add", &r]);
            lab.router_ns = Some(r.clone());
            ip(&["-n", &r, "link", "set", "lo", "up"]);
            ip(&[
                "link", "add", "vlab", "netns", &ns, "type", "veth", "peer", "name", "vsite",
                "netns", &r,
            ]);
            ip(&["-n", &ns, "link", "set", "vlab", "master", "br0"]);
            ip(&["-n", &ns, "link", "set", "vlab", "up"]);
            ip(&["-n", &r, "addr", "add", "10.77.0.2/24", "dev", "vsite"]);
            ip(&["-n", &r, "link", "set", "vsite", "up"]);
            let log = dir.join("dnsmasq.log");
            let child = Command::new("ip")
                .args(["netns", "exec", &r, "dnsmasq", "--no-daemon", "--port=0"])
                .args([
                    "--conf-file=/dev/null",
                    "--interface=vsite",
                    "--bind-interfaces",
                ])
                .arg("--dhcp-range=10.77.0.100,10.77.0.150,255.255.255.0,1h")
                .arg(format!(
                    "--dhcp-leasefile={}",
                    dir.join("dnsmasq.leases").display()
                ))
                .arg("--log-dhcp")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("dnsmasq (install dnsmasq-base)");
            lab.children.push(child);
            lab.wait_for_file(&log, "sockets bound exclusively", "dnsmasq");
        }
        lab
    }

    fn wait_for_file(&self, path: &Path, needle: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not report {needle:?}:\n{text}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start diskless inside the lab namespace with these arguments; waits for its
    /// "listening" line.
    fn diskless(&mut self, args: &[&str]) {
        let stderr = self.dir.join("diskless.stderr");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(env!("CARGO_BIN_EXE_diskless"))
            .args(args)
            .current_dir(&self.dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start diskless");
        let stdout = child.stdout.take().unwrap();
        self.children.push(child);
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.starts_with("diskless: listening on") => return,
                Ok(_) => {}
                Err(_) => panic!(
                    "diskless did not start:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                ),
            }
        }
    }

    fn server_log(&self) -> String {
        clean(&std::fs::read_to_string(self.dir.join("diskless.stderr")).unwrap_or_default())
    }

    /// Boot one guest on `tap`; panics with the serial tail and the server log unless the
    /// hand-off wrote and read back its marker. Returns the cleaned serial log.
    /// `flags`: extra run-qemu.sh flags (`--no-rom`, `--http-boot`).
    fn boot(&self, mode: &str, tap: &str, mac: &str, flags: &[&str]) -> String {
        let started = Instant::now();
        let log = self.dir.join(format!("serial-{tap}.log"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "bash"])
            .arg(repo().join("scripts/boot/run-qemu.sh"))
            .args(["--mode", mode, "--tap", tap, "--mac", mac])
            .args(["--timeout", &BOOT_TIMEOUT_SECS.to_string()])
            .arg("--log")
            .arg(&log)
            .env("TMPDIR", &self.dir)
            .args(flags);
        let (ok, out) = run_limited(&mut cmd, Duration::from_secs(BOOT_TIMEOUT_SECS + 30));
        let serial = clean(&std::fs::read_to_string(&log).unwrap_or_default());
        let report = || {
            format!(
                "{mode} boot of {mac} after {:?}:\n--- run-qemu.sh ---\n{out}\n--- serial (tail) ---\n{}\n--- diskless (tail) ---\n{}",
                started.elapsed(),
                tail(&serial, 40),
                tail(&self.server_log(), 30)
            )
        };
        assert!(ok, "boot failed: {}", report());
        let initiator = format!("iqn.2026-11.org.diskless:mac-{}", mac.replace(':', ""));
        for marker in [
            "DISKLESS-STAGE1".to_string(),
            "DISKLESS-HANDOFF-READ-OK".to_string(),
            format!("DISKLESS-HANDOFF-WRITE-OK {initiator}"),
        ] {
            assert!(serial.contains(&marker), "no '{marker}': {}", report());
        }
        eprintln!("{mode} netboot of {mac}: {:?}", started.elapsed());
        serial
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in std::iter::once(&self.ns).chain(self.router_ns.iter()) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn golden(dir: &Path, image: &str) -> PathBuf {
    let p = dir.join(image);
    std::fs::copy(images("netboot-images").join(image), &p).unwrap();
    p
}

/// (i) SeaBIOS + iPXE ROM beside a plain DHCP server, diskless started with the one
/// quick-mode command of the README.
#[test]
fn bios_ipxe_rom_boots_through_proxydhcp() {
    require_lab(false);
    let dir = tempfile::tempdir().unwrap();
    let img = golden(dir.path(), "bios.img");
    let mut lab = Lab::new("b", dir.path(), &["tap0"], true);
    lab.diskless(&[
        "serve",
        "--image",
        img.to_str().unwrap(),
        "--overlay",
        "volatile",
        "--netboot",
        "proxy",
        "--netboot-interface",
        "br0",
        "--listen",
        &format!("{SERVER_ADDR}:3260"),
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
    ]);
    let serial = lab.boot("bios", "tap0", "52:54:00:77:00:01", &[]);
    // The address came from the site's DHCP server, the boot information from us.
    assert!(serial.contains("net0: 10.77.0.1"), "{}", tail(&serial, 30));
    let log = lab.server_log();
    // The ProxyDHCP OFFER; iPXE may also ask port 4011 (covered on loopback below).
    assert!(log.contains("port=Dhcp kind=Offer"), "{log}");
    assert!(log.contains("firmware=Some(\"bios\")"), "{log}");
    let leases = std::fs::read_to_string(dir.path().join("dnsmasq.leases")).unwrap_or_default();
    assert!(
        leases.contains("52:54:00:77:00:01"),
        "dnsmasq leased nothing: {leases}"
    );
}

fn netboot_yaml(dir: &Path, image: &Path, netboot: &str) -> PathBuf {
    let yaml = format!(
        "portals: [\"{SERVER_ADDR}:3260\"]\nstate_dir: {state}\n\
         images:\n  - {{name: base, path: {img}}}\n\
         targets:\n  - name: iqn.2026-11.test:netboot\n    boot:\n      default: {{image: base, mode: volatile}}\n\
         boot_http: {{listen: \"{SERVER_ADDR}:8080\"}}\n{netboot}",
        state = dir.join("state").display(),
        img = image.display(),
    );
    let p = dir.join("targets.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

/// (ii) OVMF without an iPXE ROM: its own PXE client loads snponly.efi over our TFTP.
#[test]
fn uefi_pxe_without_rom_boots_through_proxydhcp_and_tftp() {
    require_lab(true);
    let dir = tempfile::tempdir().unwrap();
    let img = golden(dir.path(), "uefi.img");
    let cfg = netboot_yaml(
        dir.path(),
        &img,
        "netboot:\n  mode: proxy\n  interfaces: [br0]\n  clients: [\"52:54:00:77:00:02\"]\n",
    );
    let mut lab = Lab::new("u", dir.path(), &["tap0"], true);
    lab.diskless(&["serve", "-c", cfg.to_str().unwrap()]);
    lab.boot("uefi", "tap0", "52:54:00:77:00:02", &["--no-rom"]);
    let log = lab.server_log();
    assert!(log.contains("boot=Some(\"snponly.efi\")"), "{log}");
    assert!(
        log.contains("tftp: read") && log.contains("file=snponly.efi"),
        "{log}"
    );
    assert!(log.contains("firmware=Some(\"uefi\")"), "{log}");
}

/// UEFI HTTP Boot (OVMF with its PXE turned off): vendor class HTTPClient gets
/// `http://SERVER:8080/files/snponly.efi` in the proxy answer; TFTP is off altogether.
#[test]
fn uefi_http_boot_loads_ipxe_over_http() {
    require_lab(true);
    let dir = tempfile::tempdir().unwrap();
    let img = golden(dir.path(), "uefi.img");
    let cfg = netboot_yaml(
        dir.path(),
        &img,
        "netboot:\n  mode: proxy\n  interfaces: [br0]\n  clients: any\n  tftp: false\n",
    );
    let mut lab = Lab::new("h", dir.path(), &["tap0"], true);
    lab.diskless(&["serve", "-c", cfg.to_str().unwrap()]);
    lab.boot(
        "uefi",
        "tap0",
        "52:54:00:77:00:05",
        &["--no-rom", "--http-boot"],
    );
    let log = lab.server_log();
    assert!(
        log.contains("boot=Some(\"http://10.77.0.1:8080/files/snponly.efi\")"),
        "{log}"
    );
    assert!(log.contains("file served"), "{log}");
    assert!(!log.contains("tftp: read"), "{log}");
}

/// (iii) diskless is the only DHCP server (mode dhcp): a BIOS and a UEFI client boot at
/// once; their leases are in the state directory.
#[test]
fn dhcp_mode_boots_bios_and_uefi_without_another_dhcp_server() {
    require_lab(true);
    let dir = tempfile::tempdir().unwrap();
    // Two golden images behind two targets would need two bindings; one target per firmware
    // keeps the test small: the BIOS image first, then the UEFI one.
    let bios = golden(dir.path(), "bios.img");
    let uefi = golden(dir.path(), "uefi.img");
    let yaml = format!(
        "portals: [\"{SERVER_ADDR}:3260\"]\nstate_dir: {state}\n\
         images:\n  - {{name: bios, path: {bios}}}\n  - {{name: uefi, path: {uefi}}}\n\
         targets:\n  - name: iqn.2026-11.test:netboot\n    boot:\n      bindings:\n\
         \x20       - {{mac: \"52:54:00:77:00:03\", image: bios, mode: volatile}}\n\
         \x20       - {{mac: \"52:54:00:77:00:04\", image: uefi, mode: volatile}}\n\
         boot_http: {{listen: \"{SERVER_ADDR}:8080\"}}\n\
         netboot:\n  mode: dhcp\n  interfaces: [br0]\n  clients: [\"52:54:00:77:00:03\", \"52:54:00:77:00:04\"]\n\
         \x20 pool: {{start: 10.77.0.50, end: 10.77.0.59, prefix_len: 24, lease_secs: 600}}\n",
        state = dir.path().join("state").display(),
        bios = bios.display(),
        uefi = uefi.display(),
    );
    let cfg = dir.path().join("targets.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let mut lab = Lab::new("d", dir.path(), &["tap0", "tap1"], false);
    lab.diskless(&["serve", "-c", cfg.to_str().unwrap()]);
    thread::scope(|s| {
        let a = s.spawn(|| lab.boot("bios", "tap0", "52:54:00:77:00:03", &[]));
        let b = s.spawn(|| lab.boot("uefi", "tap1", "52:54:00:77:00:04", &["--no-rom"]));
        let (a, b) = (a.join(), b.join());
        if let Err(e) = a {
            std::panic::resume_unwind(e);
        }
        if let Err(e) = b {
            std::panic::resume_unwind(e);
        }
    });
    let leases = std::fs::read_to_string(dir.path().join("state/leases")).unwrap_or_default();
    for mac in ["52:54:00:77:00:03", "52:54:00:77:00:04"] {
        assert!(leases.contains(mac), "no lease for {mac}: {leases}");
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile input on loopback (no namespaces, no QEMU)
// ---------------------------------------------------------------------------------------------

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap()
}

struct Loopback {
    _server: Server,
    dhcp: u16,
    pxe: u16,
    tftp: u16,
    http: u16,
    root: PathBuf,
}

fn loopback(dir: &Path) -> Loopback {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    // A file with a known pattern, several blocks long.
    let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.join("sub/kernel"), &data).unwrap();
    std::fs::write(root.join("undionly.kpxe"), b"firmware").unwrap();
    std::fs::write(dir.join("secret"), b"SECRET-OUTSIDE-ROOT").unwrap();
    std::os::unix::fs::symlink(dir.join("secret"), root.join("escape")).unwrap();
    let img = dir.join("golden.img");
    sparse_image(&img, 1 << 20);
    let (dhcp, pxe, tftp, http) = (
        free_udp_port(),
        free_udp_port(),
        free_udp_port(),
        free_tcp_port(),
    );
    let yaml = format!(
        "portals: [\"127.0.0.1:0\"]\nstate_dir: {state}\n\
         images:\n  - {{name: base, path: {img}}}\n\
         targets:\n  - name: iqn.2026-11.test:lo\n    boot:\n      default: {{image: base, mode: volatile}}\n\
         boot_http: {{listen: \"127.0.0.1:{http}\"}}\n\
         netboot:\n  mode: proxy\n  interfaces: [lo]\n  server_ip: 127.0.0.1\n  clients: any\n  root: {root}\n\
         \x20 ports: {{dhcp: {dhcp}, pxe: {pxe}, tftp: {tftp}, client: 1}}\n",
        state = dir.join("state").display(),
        img = img.display(),
        root = root.display(),
    );
    let server = Server::start(dir, &Config::yaml(&yaml));
    Loopback {
        _server: server,
        dhcp,
        pxe,
        tftp,
        http,
        root,
    }
}

fn udp_client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// A REQUEST to port 4011 gets an ACK with the iPXE script URL (the liveness probe).
fn pxe_probe(lo: &Loopback) {
    let c = udp_client();
    let p = dhcp::client_request(
        MessageType::Request,
        [2, 0, 0, 0, 0, 9],
        dhcp::ClientKind::Ipxe,
        Some(0),
        &[],
    );
    // UDP: after a flood the server's receive buffer may be full and drop this request, so
    // it is sent again, as a client would, until an answer comes (a generous bound).
    c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 1500];
    let t = Instant::now();
    let (n, from) = loop {
        c.send_to(&p, ("127.0.0.1", lo.pxe)).unwrap();
        match c.recv_from(&mut buf) {
            Ok(got) => break got,
            Err(e) => assert!(
                t.elapsed() < Duration::from_secs(30),
                "no answer from port 4011 in 30 s: {e}"
            ),
        }
    };
    assert_eq!(from.port(), lo.pxe, "the answer must come from port 4011");
    let m = dhcp::decode(&buf[..n]).unwrap();
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    let f = String::from_utf8_lossy(m.fname().unwrap_or(&[])).into_owned();
    assert!(f.contains("/boot.ipxe?mac="), "{f}");
}

/// Read a whole file over TFTP with these options: Ok(bytes) or Err(error code, message).
fn tftp_get(port: u16, name: &str, opts: &[(&str, &str)]) -> Result<Vec<u8>, (u16, String)> {
    let c = udp_client();
    let rrq = tftp::read_request(name, opts);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 70_000];
    let mut blksize = 512usize;
    let mut expect: u16 = 1;
    // The request is sent again until something answers, as clients do (a flood before it
    // may have filled the server's receive buffer).
    c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut first = None;
    for _ in 0..10 {
        c.send_to(&rrq, ("127.0.0.1", port)).unwrap();
        if let Ok(x) = c.recv_from(&mut buf) {
            first = Some(x);
            break;
        }
    }
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut first = Some(first.expect("tftp: no answer to 10 requests"));
    loop {
        let (n, from) = match first.take() {
            Some(x) => x,
            None => c.recv_from(&mut buf).expect("tftp: no packet"),
        };
        let op = u16::from_be_bytes([buf[0], buf[1]]);
        let num = u16::from_be_bytes([buf[2], buf[3]]);
        match op {
            tftp::OP_ERROR => {
                let msg = String::from_utf8_lossy(&buf[4..n]).into_owned();
                return Err((num, msg));
            }
            tftp::OP_OACK => {
                let f: Vec<&[u8]> = buf[2..n].split(|&b| b == 0).collect();
                for kv in f.chunks(2) {
                    if kv[0] == b"blksize" {
                        blksize = String::from_utf8_lossy(kv[1]).parse().unwrap();
                    }
                }
                c.send_to(&tftp::ack(0), from).unwrap();
            }
            tftp::OP_DATA => {
                if num == expect {
                    out.extend_from_slice(&buf[4..n]);
                    expect = expect.wrapping_add(1);
                    // Lock-step and windows alike: ACK the last in-order block.
                    c.send_to(&tftp::ack(num), from).unwrap();
                    if n - 4 < blksize {
                        return Ok(out);
                    }
                }
            }
            _ => panic!("unexpected TFTP opcode {op}"),
        }
    }
}

#[test]
fn hostile_dhcp_packets_are_dropped_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let lo = loopback(dir.path());
    pxe_probe(&lo);
    let c = udp_client();
    let good = dhcp::client_request(
        MessageType::Discover,
        [2, 0, 0, 0, 0, 1],
        dhcp::ClientKind::Pxe,
        Some(7),
        &[],
    );
    let mut bad: Vec<Vec<u8>> = vec![
        vec![],
        vec![1],
        good[..100].to_vec(),
        good[..239].to_vec(),
        vec![0xff; 1400],
        vec![0; 9000],
        [good.clone(), vec![0; 4000]].concat(),
    ];
    let mut hlen = good.clone();
    hlen[2] = 200;
    bad.push(hlen);
    let mut overrun = good[..good.len() - 1].to_vec();
    overrun.extend_from_slice(&[60, 250, b'P']);
    bad.push(overrun);
    let mut short94 = good[..good.len() - 1].to_vec();
    short94.extend_from_slice(&[94, 1, 1, 255]);
    bad.push(short94);
    let mut unknown = good[..good.len() - 1].to_vec();
    unknown.extend_from_slice(&[250, 4, 1, 2, 3, 4, 251, 0, 255]);
    bad.push(unknown);
    for p in &bad {
        c.send_to(p, ("127.0.0.1", lo.dhcp)).unwrap();
        c.send_to(p, ("127.0.0.1", lo.pxe)).unwrap();
    }
    // A flood of DISCOVERs from random MACs (proxy answers go to the broadcast client port,
    // not to us) and of REQUESTs of non-booting clients on 4011.
    for i in 0..3000u32 {
        let mac = [2, 1, (i >> 16) as u8, (i >> 8) as u8, i as u8, 7];
        let p = dhcp::client_request(
            MessageType::Discover,
            mac,
            dhcp::ClientKind::Pxe,
            Some(0),
            &[],
        );
        c.send_to(&p, ("127.0.0.1", lo.dhcp)).unwrap();
        let q = dhcp::client_request(
            MessageType::Request,
            mac,
            dhcp::ClientKind::Plain,
            None,
            &[],
        );
        c.send_to(&q, ("127.0.0.1", lo.pxe)).unwrap();
    }
    // Still serving.
    pxe_probe(&lo);
    // Unknown options in a well-formed request are carried, not fatal.
    let with_unknown = dhcp::client_request(
        MessageType::Request,
        [2, 0, 0, 0, 0, 10],
        dhcp::ClientKind::Pxe,
        Some(0),
        &[DhcpOption::Unknown(dhcproto::v4::UnknownOption::new(
            224.into(),
            vec![1; 200],
        ))],
    );
    c.send_to(&with_unknown, ("127.0.0.1", lo.pxe)).unwrap();
    let mut buf = [0u8; 1500];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (n, _) = c
            .recv_from(&mut buf)
            .expect("no ACK to a request with unknown options");
        if let Ok(m) = dhcp::decode(&buf[..n]) {
            if m.chaddr() == [2, 0, 0, 0, 0, 10] {
                assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
                break;
            }
        }
        assert!(Instant::now() < deadline);
    }
}

#[test]
fn hostile_tftp_requests_never_leave_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let lo = loopback(dir.path());
    let want: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(tftp_get(lo.tftp, "sub/kernel", &[]).unwrap(), want);
    assert_eq!(
        tftp_get(
            lo.tftp,
            "/sub/kernel",
            &[
                ("blksize", "1468"),
                ("tsize", "0"),
                ("windowsize", "8"),
                ("timeout", "2")
            ]
        )
        .unwrap(),
        want
    );
    let secret_path = dir.path().join("secret");
    let traversal = [
        "../secret".to_string(),
        "sub/../../secret".to_string(),
        "escape".to_string(),
        secret_path.display().to_string(),
        "..\\secret".to_string(),
        "sub/../../../../../../etc/passwd".to_string(),
        "/etc/passwd".to_string(),
        "sub".to_string(),
    ];
    for name in &traversal {
        match tftp_get(lo.tftp, name, &[]) {
            Err((code, _)) => assert!(code == 1 || code == 2, "{name}: code {code}"),
            Ok(data) => panic!("{name}: served {} bytes", data.len()),
        }
    }
    // Writes, garbage, truncated and oversized requests: an error packet each, or silence.
    let c = udp_client();
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let junk: Vec<Vec<u8>> = vec![
        vec![0, 2, b'x', 0, b'o', b'c', b't', b'e', b't', 0],
        vec![0, 1],
        vec![0, 1, b'a'],
        vec![0, 1, b'a', 0, b'b', b'o', b'g', b'u', b's', 0],
        vec![0, 99, 0, 0],
        [vec![0, 1], vec![b'a'; 5000], vec![0]].concat(),
        vec![0, 4, 0, 1],
        vec![0, 5, 0, 0, 0],
    ];
    let mut buf = [0u8; 2000];
    for p in &junk {
        c.send_to(p, ("127.0.0.1", lo.tftp)).unwrap();
        if let Ok((n, _)) = c.recv_from(&mut buf) {
            assert_eq!(
                u16::from_be_bytes([buf[0], buf[1]]),
                tftp::OP_ERROR,
                "{p:?}"
            );
            assert!(!buf[..n].windows(6).any(|w| w == b"SECRET"));
        }
    }
    // A flood of requests for a missing file: answered with errors, then a real read works.
    for _ in 0..500 {
        c.send_to(&tftp::read_request("missing", &[]), ("127.0.0.1", lo.tftp))
            .unwrap();
    }
    assert_eq!(
        tftp_get(lo.tftp, "undionly.kpxe", &[]).unwrap(),
        b"firmware"
    );
    assert!(lo.root.join("sub/kernel").exists());
}

fn http_get(port: u16, path: &str, range: Option<&str>) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some(r) = range {
        req.push_str(&format!("Range: {r}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, all[split + 4..].to_vec())
}

#[test]
fn http_files_with_ranges_and_no_traversal() {
    let dir = tempfile::tempdir().unwrap();
    let lo = loopback(dir.path());
    let want: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let (st, _, body) = http_get(lo.http, "/files/sub/kernel", None);
    assert_eq!((st, body.len()), (200, want.len()));
    assert_eq!(body, want);
    let (st, h, body) = http_get(lo.http, "/files/sub/kernel", Some("bytes=1000-1999"));
    assert_eq!(st, 206);
    assert_eq!(body, want[1000..2000]);
    assert!(
        h.contains(&("content-range".into(), "bytes 1000-1999/600000".into())),
        "{h:?}"
    );
    let (st, _, body) = http_get(lo.http, "/files/sub/kernel", Some("bytes=-10"));
    assert_eq!((st, body.as_slice()), (206, &want[599_990..]));
    let (st, h, _) = http_get(lo.http, "/files/sub/kernel", Some("bytes=700000-"));
    assert_eq!(st, 416);
    assert!(
        h.contains(&("content-range".into(), "bytes */600000".into())),
        "{h:?}"
    );
    for path in [
        "/files/../secret",
        "/files/escape",
        "/files/sub/../../secret",
        "/files/%2e%2e/secret",
        "/files//etc/passwd",
        "/files/sub",
    ] {
        let (st, _, body) = http_get(lo.http, path, None);
        assert!(st == 403 || st == 404, "{path}: {st}");
        assert!(!body.windows(6).any(|w| w == b"SECRET"), "{path}");
    }
    // A range across chunk boundaries of the streamed body.
    let (st, _, body) = http_get(lo.http, "/files/sub/kernel", Some("bytes=200000-599999"));
    assert_eq!((st, body.as_slice()), (206, &want[200_000..]));
    // The script tells the firmware type.
    let (st, _, body) = http_get(
        lo.http,
        "/boot.ipxe?mac=52:54:00:00:00:01&platform=efi",
        None,
    );
    let text = String::from_utf8_lossy(&body);
    assert_eq!(st, 200, "{text}");
    assert!(
        text.starts_with("#!ipxe\nset diskless-firmware uefi\n"),
        "{text}"
    );
}
