//! The tokio shell of netboot: UDP sockets for DHCP (67), the PXE boot server (4011) and
//! TFTP (69, plus one socket per transfer), around the pure cores of [`super::dhcp`] and
//! [`super::tftp`]. Leases are written to the state directory atomically (temp file, fsync,
//! rename) whenever they change.

use super::dhcp::{self, Dest, DhcpError, Plan, Port, Responder};
use super::files::{FileError, FileRoot};
use super::tftp::{self, Action, Packet, Transfer};
use crate::config::{NetbootConfig, NetbootMode, NetbootPorts};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// Concurrent TFTP transfers at most; more get "busy" (TFTP error 0).
pub const MAX_TRANSFERS: usize = 64;

/// Everything the shell needs, resolved from `netboot:`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub plan: Plan,
    pub interfaces: Vec<String>,
    pub ports: NetbootPorts,
    pub root: PathBuf,
    /// Mode dhcp: where leases are kept.
    pub leases_path: PathBuf,
}

/// The IPv4 addresses of the host's interfaces: (name, address), up and not loopback
/// unless asked for by name.
pub fn interface_addrs() -> Vec<(String, Ipv4Addr)> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we walk read-only and free exactly once.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null()
                && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET
                && ifa.ifa_flags & (libc::IFF_UP as u32) != 0
            {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                let name = std::ffi::CStr::from_ptr(ifa.ifa_name)
                    .to_string_lossy()
                    .into_owned();
                out.push((name, ip));
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out
}

/// Resolve the section: our address, the URLs, the accepted clients.
/// `http` is the bound boot_http address, if any.
pub fn settings(
    cfg: &NetbootConfig,
    http: Option<SocketAddr>,
    state_dir: &Path,
) -> Result<Settings, String> {
    let addrs = interface_addrs();
    let server_ip = match cfg.server_ip {
        Some(ip) => ip,
        None => {
            let from_if = cfg
                .interfaces
                .iter()
                .find_map(|i| addrs.iter().find(|(n, _)| n == i).map(|(_, ip)| *ip));
            let from_http = http.and_then(|h| match h.ip() {
                std::net::IpAddr::V4(v) if !v.is_unspecified() && !v.is_loopback() => Some(v),
                _ => None,
            });
            let any = addrs
                .iter()
                .find(|(_, ip)| !ip.is_loopback())
                .map(|(_, ip)| *ip);
            from_if.or(from_http).or(any).ok_or_else(|| {
                "netboot: no IPv4 address to announce; set netboot.server_ip or \
                 netboot.interfaces"
                    .to_string()
            })?
        }
    };
    if let Some(missing) = cfg
        .interfaces
        .iter()
        .find(|i| !addrs.iter().any(|(n, _)| n == *i))
    {
        return Err(format!(
            "netboot.interfaces: {missing} has no IPv4 address (or does not exist)"
        ));
    }
    let http_base = http.map(|h| format!("http://{server_ip}:{}", h.port()));
    let script_url = match (&cfg.script_url, &http_base) {
        (Some(u), _) => u.clone(),
        // iPXE expands the ${...} settings when it fetches the file name.
        (None, Some(b)) => {
            format!("{b}/boot.ipxe?mac=${{netX/mac}}&uuid=${{uuid}}&platform=${{platform}}&ip=${{netX/ip}}&netmask=${{netX/netmask}}")
        }
        (None, None) => return Err("netboot needs boot_http or netboot.script_url".into()),
    };
    let clients = cfg.client_macs().map(|m| {
        m.iter()
            .filter_map(|s| dhcp::mac_bytes(s))
            .collect::<std::collections::HashSet<_>>()
    });
    Ok(Settings {
        plan: Plan {
            mode: cfg.mode,
            server_ip,
            clients,
            boot_files: cfg.boot_files.clone(),
            script_url,
            http_files: http_base.map(|b| format!("{b}/files/")),
            tftp: cfg.tftp,
            pool: cfg.pool.clone(),
        },
        interfaces: cfg.interfaces.clone(),
        ports: cfg.ports,
        root: cfg.root.clone(),
        leases_path: state_dir.join("leases"),
    })
}

/// A UDP socket on 0.0.0.0:port, optionally bound to one device (SO_BINDTODEVICE), with
/// SO_REUSEADDR (one socket per interface on the same port) and SO_BROADCAST.
fn udp_socket(port: u16, device: Option<&str>) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    if let Some(d) = device {
        s.bind_device(Some(d.as_bytes()))
            .map_err(|e| std::io::Error::new(e.kind(), format!("binding to device {d}: {e}")))?;
    }
    s.set_nonblocking(true)?;
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    s.bind(&addr.into())
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding udp {addr}: {e}")))?;
    UdpSocket::from_std(s.into())
}

/// Sockets bound, not yet serving (so that a port in use fails `serve` at once).
pub struct Bound {
    settings: Settings,
    dhcp: Vec<UdpSocket>,
    pxe: Vec<UdpSocket>,
    tftp: Vec<(UdpSocket, Option<String>)>,
    root: Option<Arc<FileRoot>>,
}

impl Bound {
    /// The local addresses (tests with port 0 read them here).
    pub fn ports(&self) -> (Option<u16>, Option<u16>, Option<u16>) {
        let p = |v: Option<&UdpSocket>| v.and_then(|s| s.local_addr().ok()).map(|a| a.port());
        (
            p(self.dhcp.first()),
            p(self.pxe.first()),
            p(self.tftp.first().map(|t| &t.0)),
        )
    }
}

/// Bind every socket the settings need.
pub fn bind(settings: Settings) -> std::io::Result<Bound> {
    let devices: Vec<Option<String>> = if settings.interfaces.is_empty() {
        vec![None]
    } else {
        settings.interfaces.iter().cloned().map(Some).collect()
    };
    let mut b = Bound {
        dhcp: Vec::new(),
        pxe: Vec::new(),
        tftp: Vec::new(),
        root: None,
        settings,
    };
    if b.settings.plan.mode == NetbootMode::Off {
        return Ok(b);
    }
    let ports = b.settings.ports;
    for d in &devices {
        b.dhcp.push(udp_socket(ports.dhcp, d.as_deref())?);
        b.pxe.push(udp_socket(ports.pxe, d.as_deref())?);
    }
    if b.settings.plan.tftp {
        b.root = Some(Arc::new(FileRoot::new(&b.settings.root).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("netboot.root {}: {e}", b.settings.root.display()),
            )
        })?));
        for d in &devices {
            b.tftp
                .push((udp_socket(ports.tftp, d.as_deref())?, d.clone()));
        }
    }
    Ok(b)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Write `text` to `path` atomically: a crash leaves the old file or the new one.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl Bound {
    /// Serve until the returned tasks are aborted.
    pub fn spawn(self, set: &mut tokio::task::JoinSet<()>) {
        let Bound {
            settings,
            dhcp,
            pxe,
            tftp,
            root,
        } = self;
        let mut responder = Responder::new(settings.plan.clone());
        if let Some(l) = responder.leases.as_mut() {
            match std::fs::read_to_string(&settings.leases_path) {
                Ok(text) => {
                    let n = l.load_text(&text);
                    info!(leases = n, path = %settings.leases_path.display(), "DHCP leases loaded");
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(error = %e, "DHCP leases not readable; starting empty"),
            }
        }
        let responder = Arc::new(Mutex::new(responder));
        let client_port = settings.ports.client;
        let leases_path = Arc::new(settings.leases_path.clone());
        info!(
            mode = %settings.plan.mode,
            server = %settings.plan.server_ip,
            interfaces = ?settings.interfaces,
            script = %settings.plan.script_url,
            "netboot serving"
        );
        for (sockets, port) in [(dhcp, Port::Dhcp), (pxe, Port::Pxe)] {
            for s in sockets {
                let r = responder.clone();
                let lp = leases_path.clone();
                set.spawn(dhcp_loop(s, port, r, client_port, lp));
            }
        }
        if let Some(root) = root {
            let sem = Arc::new(Semaphore::new(MAX_TRANSFERS));
            for (s, dev) in tftp {
                set.spawn(tftp_loop(s, dev, root.clone(), sem.clone()));
            }
        }
    }
}

async fn dhcp_loop(
    sock: UdpSocket,
    port: Port,
    responder: Arc<Mutex<Responder>>,
    client_port: u16,
    leases_path: Arc<PathBuf>,
) {
    // One byte more than we accept, so an oversized datagram is seen as such.
    let mut buf = vec![0u8; dhcp::MAX_PACKET + 1];
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "dhcp recv");
                continue;
            }
        };
        let SocketAddr::V4(src) = src else { continue };
        let result = match responder.lock() {
            Ok(mut r) => {
                let res = r.handle(&buf[..n], port, src, unix_now());
                let leases = match (&res, r.leases.as_ref()) {
                    (Ok(a), Some(l)) if a.leases_changed => Some(l.to_text()),
                    _ => None,
                };
                (res, leases)
            }
            Err(_) => return,
        };
        let (res, leases) = result;
        if let Some(text) = leases {
            if let Err(e) = write_atomic(&leases_path, &text) {
                warn!(error = %e, path = %leases_path.display(), "writing DHCP leases failed");
            }
        }
        match res {
            Ok(a) if a.bytes.is_empty() => {}
            Ok(a) => {
                let to = match a.to {
                    Dest::Broadcast => SocketAddr::from((Ipv4Addr::BROADCAST, client_port)),
                    Dest::Unicast(u) => SocketAddr::V4(u),
                };
                info!(%src, ?port, kind = ?a.kind, boot = ?a.boot, "dhcp answer");
                if let Err(e) = sock.send_to(&a.bytes, to).await {
                    // Per packet: a flood must not become a flood of warnings.
                    debug!(error = %e, %to, "dhcp send failed");
                }
            }
            Err(DhcpError::Malformed(m)) => {
                debug!(%src, reason = %m, "dhcp: malformed packet dropped")
            }
            Err(DhcpError::Ignored(m)) => debug!(%src, reason = m, "dhcp: not answered"),
            Err(DhcpError::Exhausted) => warn!(%src, "dhcp: address pool exhausted"),
        }
    }
}

async fn tftp_loop(
    sock: UdpSocket,
    device: Option<String>,
    root: Arc<FileRoot>,
    sem: Arc<Semaphore>,
) {
    let mut buf = vec![0u8; tftp::MAX_REQUEST + 1];
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "tftp recv");
                continue;
            }
        };
        let reply_err = |code: u16, msg: String| {
            let p = tftp::error_packet(code, &msg);
            let sock = &sock;
            async move {
                let _ = sock.send_to(&p, src).await;
            }
        };
        match tftp::parse(&buf[..n]) {
            Ok(Packet::Read(req)) => {
                let opened = root.open(&req.filename);
                let (file, len) = match opened {
                    Ok(x) => x,
                    Err(e) => {
                        info!(%src, file = %req.filename, error = %e, "tftp: refused");
                        let code = match e {
                            FileError::NotFound => tftp::ERR_NOT_FOUND,
                            FileError::Denied(_) => tftp::ERR_ACCESS,
                        };
                        reply_err(code, e.to_string()).await;
                        continue;
                    }
                };
                let Ok(permit) = sem.clone().try_acquire_owned() else {
                    reply_err(tftp::ERR_UNDEFINED, "busy, try again".into()).await;
                    continue;
                };
                info!(%src, file = %req.filename, bytes = len, "tftp: read");
                let dev = device.clone();
                tokio::spawn(async move {
                    if let Err(e) = transfer(req, file, len, src, dev).await {
                        info!(%src, error = %e, "tftp transfer ended");
                    }
                    drop(permit);
                });
            }
            Ok(Packet::Write) => {
                reply_err(tftp::ERR_ACCESS, "read-only server".into()).await;
            }
            // Stray transfer packets on the request port: not ours (RFC 1350 §4).
            Ok(_) => {}
            Err(e) => {
                debug!(%src, error = %e, "tftp: bad request");
                reply_err(e.code(), e.to_string()).await;
            }
        }
    }
}

/// One read transfer on its own socket (its own TID, RFC 1350 §4).
async fn transfer(
    req: tftp::ReadRequest,
    file: std::fs::File,
    len: u64,
    peer: SocketAddr,
    device: Option<String>,
) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let sock = udp_socket(0, device.as_deref()).map_err(|e| e.to_string())?;
    sock.connect(peer).await.map_err(|e| e.to_string())?;
    let (mut t, mut actions) = Transfer::start(&req, len, Instant::now());
    let mut data = vec![0u8; 4 + usize::from(t.blksize())];
    let mut rx = vec![0u8; 1500];
    loop {
        for a in actions.drain(..) {
            match a {
                Action::Send(p) => {
                    let _ = sock.send(&p).await;
                }
                Action::Block { block, offset, len } => {
                    data[..4].copy_from_slice(&tftp::data_header(block));
                    // A pread of at most one block (8 KiB) of a small, cached file: cheaper
                    // inline than a trip to the blocking pool per block.
                    if let Err(e) = file.read_exact_at(&mut data[4..4 + len], offset) {
                        // The file shrank or failed under us: tell the client, stop.
                        let p = tftp::error_packet(tftp::ERR_UNDEFINED, "read error");
                        let _ = sock.send(&p).await;
                        return Err(e.to_string());
                    }
                    let _ = sock.send(&data[..4 + len]).await;
                }
                Action::Done => {
                    debug!(%peer, file = %req.filename, "tftp: done");
                    return Ok(());
                }
                Action::Fail(why) => return Err(why),
            }
        }
        if t.finished() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::from_std(t.deadline());
        tokio::select! {
            r = sock.recv(&mut rx) => match r {
                Ok(n) => actions = t.on_packet(&rx[..n], Instant::now()),
                // ICMP port unreachable and the like: the client is gone.
                Err(e) => return Err(e.to_string()),
            },
            _ = tokio::time::sleep_until(deadline) => actions = t.on_timeout(Instant::now()),
        }
    }
}

/// The boot-server address a test or log line shows.
pub fn describe(s: &Settings) -> String {
    format!(
        "netboot {} on {} (server {}, script {})",
        s.plan.mode,
        if s.interfaces.is_empty() {
            "all interfaces".to_string()
        } else {
            s.interfaces.join(",")
        },
        s.plan.server_ip,
        s.plan.script_url
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NetbootClients, NetbootConfig};

    #[test]
    fn settings_resolve_address_and_urls() {
        let state = Path::new("/var/lib/x");
        let mut c = NetbootConfig::quick(NetbootMode::Proxy);
        c.server_ip = Some(Ipv4Addr::new(192, 168, 10, 1));
        c.clients = NetbootClients::Macs(vec!["52:54:00:12:34:56".into()]);
        let s = settings(&c, Some("0.0.0.0:8080".parse().unwrap()), state).unwrap();
        assert_eq!(
            s.plan.script_url,
            "http://192.168.10.1:8080/boot.ipxe?mac=${netX/mac}&uuid=${uuid}&platform=${platform}&ip=${netX/ip}&netmask=${netX/netmask}"
        );
        assert_eq!(
            s.plan.http_files.as_deref(),
            Some("http://192.168.10.1:8080/files/")
        );
        assert_eq!(s.leases_path, state.join("leases"));
        assert!(s
            .plan
            .clients
            .as_ref()
            .is_some_and(|m| m.contains(&[0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        // The interface's address when none is given.
        c.server_ip = None;
        c.interfaces = vec!["lo".into()];
        let s = settings(&c, Some("0.0.0.0:8080".parse().unwrap()), state).unwrap();
        assert_eq!(s.plan.server_ip, Ipv4Addr::LOCALHOST);
        c.interfaces = vec!["no-such-if0".into()];
        assert!(settings(&c, None, state).is_err());
        // Without an HTTP endpoint only an explicit script URL will do.
        c.interfaces.clear();
        c.server_ip = Some(Ipv4Addr::new(10, 0, 0, 1));
        assert!(settings(&c, None, state).is_err());
        c.script_url = Some("tftp://10.0.0.1/boot.ipxe".into());
        let s = settings(&c, None, state).unwrap();
        assert_eq!(s.plan.http_files, None);
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("leases");
        write_atomic(&p, "a\n").unwrap();
        write_atomic(&p, "b\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "b\n");
        assert!(!dir.path().join("leases.tmp").exists());
    }
}
