//! The boot script endpoint: a small HTTP listener (hyper) that answers each client with an
//! iPXE script naming its initiator and its boot target, chosen by MAC or SMBIOS UUID, so a
//! DHCP server only has to chain iPXE to one URL:
//!
//! ```text
//! chain http://SERVER:8080/boot.ipxe?mac=${net0/mac}&uuid=${uuid}
//! ```
//!
//! A fetch is never destructive by itself: it is evidence of a starting boot only when it
//! plausibly comes from that client (its sessions' address, no OS session live), weighed by
//! the client's lifecycle with its next login (docs/overlays.md).
//!
//! With a file root (netboot), `/files/NAME` serves the root's files (iPXE binaries for UEFI
//! HTTP Boot, kernels, initrds) with single byte-range requests (RFC 9110 §14).

use crate::config::{ClientOs, GatewayPolicy};
use crate::netboot::files::{FileError, FileRoot};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// What a script request says about the client, beyond who it is: its firmware, and its
/// address and netmask when the chain URL passes them (`ip=${netX/ip}&netmask=${netX/netmask}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScriptQuery {
    pub firmware: Option<Firmware>,
    pub ip: Option<std::net::Ipv4Addr>,
    pub netmask: Option<std::net::Ipv4Addr>,
}

impl ScriptQuery {
    /// From a request's query string; `peer` stands in for a missing `ip=`.
    pub fn parse(query: &str, peer: SocketAddr) -> ScriptQuery {
        let ip = query_param(query, "ip").and_then(|v| v.parse().ok()).or(
            match peer.ip().to_canonical() {
                std::net::IpAddr::V4(a) => Some(a),
                std::net::IpAddr::V6(_) => None,
            },
        );
        ScriptQuery {
            firmware: firmware(query),
            ip,
            netmask: query_param(query, "netmask").and_then(|v| v.parse().ok()),
        }
    }

    /// Whether `host` (the iSCSI portal) is on the client's subnet; None when unknown.
    pub fn same_subnet(&self, host: &str) -> Option<bool> {
        let portal: std::net::Ipv4Addr = host.parse().ok()?;
        let (ip, mask) = (u32::from(self.ip?), u32::from(self.netmask?));
        Some(ip & mask == u32::from(portal) & mask)
    }
}

/// A boxed future, as trait objects need.
pub type ScriptFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send + 'a>>;

/// What the endpoint needs from the server.
pub trait BootScripts: Send + Sync + 'static {
    /// The script for the client with this MAC and/or UUID, reached on `local` by `peer`;
    /// None: unknown client. The fetch is boot evidence only when plausible (the client's
    /// lifecycle weighs it; a fetch by anyone else changes nothing).
    fn script<'a>(
        &'a self,
        mac: Option<&'a str>,
        uuid: Option<&'a str>,
        query: ScriptQuery,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> ScriptFuture<'a>;
}

/// Everything a client's boot script says (docs/booting.md, "The boot script").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptPlan {
    pub initiator: String,
    /// The iSCSI portal, "host:port".
    pub portal: String,
    pub target: String,
    /// The client's LUNs, LUN 0 (the boot disk) first.
    pub luns: Vec<u16>,
    pub os: ClientOs,
    /// Clear iPXE's gateway before `sanboot` (the iBFT then hands the OS none).
    pub clear_gateway: bool,
    pub firmware: Option<Firmware>,
}

impl ScriptPlan {
    /// A plan for one disk (LUN 0), no OS specifics.
    pub fn single(initiator: &str, portal: &str, target: &str) -> ScriptPlan {
        ScriptPlan {
            initiator: initiator.to_string(),
            portal: portal.to_string(),
            target: target.to_string(),
            luns: vec![0],
            os: ClientOs::Other,
            clear_gateway: false,
            firmware: None,
        }
    }

    /// Whether the gateway is cleared for a binding's `gateway:` policy.
    pub fn gateway_cleared(
        policy: GatewayPolicy,
        os: ClientOs,
        query: &ScriptQuery,
        portal: &str,
    ) -> bool {
        match policy {
            GatewayPolicy::Keep => false,
            GatewayPolicy::Clear => true,
            GatewayPolicy::Auto => {
                os == ClientOs::Windows && query.same_subnet(portal_host(portal).0) == Some(true)
            }
        }
    }

    /// The iPXE script.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        // iscsi:<server>:<protocol>:<port>:<lun>:<targetname> (iPXE's SAN URI syntax,
        // https://ipxe.org/sanuri).
        let (host, port) = portal_host(&self.portal);
        let uri = |lun: u16| format!("iscsi:{host}::{port}:{lun}:{}", self.target);
        let mut s = String::from("#!ipxe\n");
        if let Some(fw) = self.firmware {
            let _ = writeln!(s, "set diskless-firmware {fw}");
        }
        if self.os != ClientOs::Other {
            let _ = writeln!(s, "set diskless-os {}", self.os);
        }
        if self.luns.len() > 1 {
            let _ = writeln!(s, "set diskless-disks {}", self.luns.len());
        }
        let _ = writeln!(s, "set initiator-iqn {}", self.initiator);
        if self.os == ClientOs::Windows {
            // Keep the SAN disks hooked if the boot returns (https://ipxe.org/cfg/keep-san).
            s.push_str("set keep-san 1\n");
        }
        if self.clear_gateway {
            // The iBFT carries netX's gateway; Windows then routes the (on-link) target
            // through it (ipxe/ipxe#1599). No gateway: the target stays on-link.
            s.push_str("set netX/gateway 0.0.0.0\n");
        }
        let boot = self.luns.first().copied().unwrap_or(0);
        if self.luns.len() == 1 {
            let _ = writeln!(s, "sanboot {} || goto failed", uri(boot));
        } else {
            // LUN 0 is drive 0x80, the others 0x81, 0x82, ... in LUN order, hooked in drive
            // order (https://ipxe.org/cmd/sanhook: "Attach two independent iSCSI targets");
            // then boot the hooked 0x80 (https://ipxe.org/cmd/sanboot). Only 0x80 goes into
            // the iBFT: the OS logs in to that target and finds every LUN by REPORT LUNS.
            let _ = writeln!(s, "sanhook --drive 0x80 {} || goto failed", uri(boot));
            for (i, lun) in self.luns.iter().skip(1).enumerate() {
                let _ = writeln!(
                    s,
                    "sanhook --drive 0x{:02x} --no-describe {} || goto failed",
                    0x81 + i,
                    uri(*lun)
                );
            }
            s.push_str("sanboot --drive 0x80 || goto failed\n");
        }
        s.push_str(":failed\necho diskless: SANBOOT-FAILED ${errno}\nshell\n");
        s
    }
}

/// "host:port" (or "host") as (host, port), port 3260 by default.
fn portal_host(portal: &str) -> (&str, &str) {
    match portal.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.ends_with(':') => (h, p),
        _ => (portal, "3260"),
    }
}

/// A script for a client no node can take now (cluster registry unreachable, no node
/// left): say why, wait, and boot again from the start (DHCP, script), which asks again.
pub fn ipxe_retry_script(reason: &str) -> String {
    let reason: String = reason
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    format!(
        "#!ipxe\n\
         echo diskless: this client cannot be placed now: {reason}\n\
         echo diskless: retrying in 10 s\n\
         sleep 10 || echo\n\
         reboot || exit 1\n"
    )
}

/// Query parameter `key` from a query string (values are plain: MAC and UUID need no
/// percent-decoding beyond %3A for ':').
fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key && !v.is_empty()).then(|| {
            v.replace("%3A", ":")
                .replace("%3a", ":")
                .to_ascii_lowercase()
        })
    })
}

fn respond(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// The firmware that runs a boot script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    Uefi,
}

impl std::fmt::Display for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        })
    }
}

/// The firmware type a script request names: iPXE's `${platform}` ("pcbios", "efi") or a
/// DHCP architecture code (`arch=`, RFC 4578 §2.1: 0 is BIOS, the rest UEFI).
fn firmware(query: &str) -> Option<Firmware> {
    match query_param(query, "platform").as_deref() {
        Some("pcbios") => return Some(Firmware::Bios),
        Some("efi") => return Some(Firmware::Uefi),
        _ => {}
    }
    match query_param(query, "arch")?.parse::<u16>().ok()? {
        0 => Some(Firmware::Bios),
        _ => Some(Firmware::Uefi),
    }
}

/// A response body: a small text, or a file streamed in chunks.
pub type Body = http_body_util::Either<Full<Bytes>, FileBody>;

/// Bytes read per chunk of a file body (a client pulls at its own pace; memory stays
/// bounded whatever the file's size).
const FILE_CHUNK: u64 = 256 << 10;

/// A byte range of a file, read chunk by chunk on the blocking pool.
pub struct FileBody {
    file: Arc<std::fs::File>,
    pos: u64,
    /// Exclusive.
    end: u64,
    reading: Option<tokio::task::JoinHandle<std::io::Result<Vec<u8>>>>,
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        let this = &mut *self;
        if this.reading.is_none() {
            if this.pos >= this.end {
                return Poll::Ready(None);
            }
            let (file, pos) = (this.file.clone(), this.pos);
            let n = (this.end - pos).min(FILE_CHUNK) as usize;
            this.reading = Some(tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut b = vec![0u8; n];
                file.read_exact_at(&mut b, pos)?;
                Ok(b)
            }));
        }
        let Some(h) = this.reading.as_mut() else {
            return Poll::Ready(None);
        };
        let r = match std::pin::Pin::new(h).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        this.reading = None;
        Poll::Ready(Some(match r {
            Ok(Ok(b)) => {
                this.pos += b.len() as u64;
                Ok(hyper::body::Frame::data(Bytes::from(b)))
            }
            // The file shrank under us, or the read failed: the response is cut short.
            Ok(Err(e)) => Err(e),
            Err(e) => Err(std::io::Error::other(e)),
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end && self.reading.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.end.saturating_sub(self.pos))
    }
}

/// A single byte range of a file of `len` bytes (RFC 9110 §14.1.2): Ok(None) for the whole
/// file (no or unusable Range header: a server may ignore it), Err for an unsatisfiable one.
fn byte_range(header: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (first, last) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| ())?;
            if n == 0 || len == 0 {
                return Err(());
            }
            (len.saturating_sub(n), len - 1)
        }
        (first, last) => {
            let first: u64 = first.parse().map_err(|_| ())?;
            let last = if last.is_empty() {
                len.saturating_sub(1)
            } else {
                last.parse::<u64>()
                    .map_err(|_| ())?
                    .min(len.saturating_sub(1))
            };
            if first >= len || last < first {
                return Err(());
            }
            (first, last)
        }
    };
    Ok(Some((first, last)))
}

/// GET or HEAD of `/files/NAME`.
async fn file_response(
    root: &Arc<FileRoot>,
    name: &str,
    range: Option<String>,
    head: bool,
    peer: SocketAddr,
) -> Response<Body> {
    let root = root.clone();
    let name = name.to_string();
    // Opening resolves symlinks and checks the root: blocking file-system work.
    let opened = tokio::task::spawn_blocking(move || root.open(&name)).await;
    let (file, len) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(FileError::NotFound)) | Err(_) => {
            return respond(StatusCode::NOT_FOUND, "no such file\n".into()).map(Body::Left)
        }
        Ok(Err(FileError::Denied(why))) => {
            warn!(%peer, reason = why, "file request refused");
            return respond(StatusCode::FORBIDDEN, "forbidden\n".into()).map(Body::Left);
        }
    };
    let (status, first, last) = match byte_range(range.as_deref(), len) {
        Ok(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Ok(None) => (StatusCode::OK, 0, len.saturating_sub(1)),
        Err(()) => {
            let mut r = respond(StatusCode::RANGE_NOT_SATISFIABLE, String::new());
            if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(hyper::header::CONTENT_RANGE, v);
            }
            return r.map(Body::Left);
        }
    };
    let count = if len == 0 { 0 } else { last - first + 1 };
    let body = FileBody {
        file: Arc::new(file),
        pos: first,
        end: if head { first } else { first + count },
        reading: None,
    };
    let mut r = Response::new(Body::Right(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        hyper::header::ACCEPT_RANGES,
        hyper::header::HeaderValue::from_static("bytes"),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(&count.to_string()) {
        h.insert(hyper::header::CONTENT_LENGTH, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("bytes {first}-{last}/{len}"))
        {
            h.insert(hyper::header::CONTENT_RANGE, v);
        }
    }
    info!(%peer, status = status.as_u16(), bytes = count, "file served");
    r
}

/// Serve until the listener is dropped (the task is aborted at shutdown).
pub async fn serve(listener: TcpListener, scripts: Arc<dyn BootScripts>) {
    serve_with_files(listener, scripts, None).await
}

/// [`serve`], plus `/files/...` from `files` (netboot's root).
pub async fn serve_with_files(
    listener: TcpListener,
    scripts: Arc<dyn BootScripts>,
    files: Option<Arc<FileRoot>>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "boot script endpoint: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let local = stream.local_addr().unwrap_or(peer);
        let scripts = scripts.clone();
        let files = files.clone();
        // Bounded: scripts are tiny; a file download (kernel, initrd) gets longer.
        let limit = if files.is_some() { 900 } else { 30 };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let scripts = scripts.clone();
                let files = files.clone();
                async move {
                    let path = req.uri().path().to_string();
                    let query = req.uri().query().unwrap_or("").to_string();
                    let head = req.method() == hyper::Method::HEAD;
                    let file = files
                        .as_ref()
                        .and_then(|f| path.strip_prefix("/files/").map(|n| (f, n)));
                    let resp = if let (Some((root, name)), true) =
                        (file, head || req.method() == hyper::Method::GET)
                    {
                        let range = req
                            .headers()
                            .get(hyper::header::RANGE)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        file_response(root, name, range, head, peer).await
                    } else if req.method() != hyper::Method::GET {
                        respond(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into()).map(Body::Left)
                    } else if path != "/boot.ipxe" {
                        respond(
                            StatusCode::NOT_FOUND,
                            "try /boot.ipxe?mac=...&uuid=...\n".into(),
                        )
                        .map(Body::Left)
                    } else {
                        let mac = query_param(&query, "mac");
                        let uuid = query_param(&query, "uuid");
                        let q = ScriptQuery::parse(&query, peer);
                        let r = match scripts
                            .script(mac.as_deref(), uuid.as_deref(), q, local, peer)
                            .await
                        {
                            Some(s) => {
                                info!(%peer, mac = ?mac, uuid = ?uuid, firmware = ?q.firmware.map(|f| f.to_string()), "boot script served");
                                respond(StatusCode::OK, s)
                            }
                            None => {
                                info!(%peer, mac = ?mac, uuid = ?uuid, "boot script: unknown client");
                                respond(
                                    StatusCode::NOT_FOUND,
                                    "#!ipxe\necho diskless: unknown client\nshell\n".into(),
                                )
                            }
                        };
                        r.map(Body::Left)
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                // A client that never finishes its request headers is dropped.
                .header_read_timeout(std::time::Duration::from_secs(30))
                .serve_connection(io, svc);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(limit), conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_script_says_why_and_boots_again() {
        let s = ipxe_retry_script("etcd down\nchain http://evil/");
        assert!(s.starts_with("#!ipxe\n"));
        // The reason stays on its echo line: no command can be smuggled in.
        assert!(s.contains(
            "echo diskless: this client cannot be placed now: etcd down?chain http://evil/\n"
        ));
        assert!(s.contains("sleep 10 || echo\nreboot || exit 1\n"));
        assert_eq!(s.lines().count(), 5);
    }

    #[test]
    fn script_and_query() {
        let s = ScriptPlan::single("iqn.x:c1", "10.0.2.2:3261", "iqn.2026-11.org.diskless:boot")
            .render();
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("set initiator-iqn iqn.x:c1\n"));
        assert!(s.contains("sanboot iscsi:10.0.2.2::3261:0:iqn.2026-11.org.diskless:boot"));
        assert_eq!(
            query_param("mac=52%3A54%3A00%3A00%3A00%3A01&uuid=", "mac").as_deref(),
            Some("52:54:00:00:00:01")
        );
        assert_eq!(query_param("mac=52:54:00:00:00:01&uuid=", "uuid"), None);
    }

    #[test]
    fn firmware_line() {
        assert_eq!(firmware("mac=x&platform=pcbios"), Some(Firmware::Bios));
        assert_eq!(firmware("platform=efi"), Some(Firmware::Uefi));
        assert_eq!(firmware("arch=0"), Some(Firmware::Bios));
        assert_eq!(firmware("arch=7"), Some(Firmware::Uefi));
        assert_eq!(firmware("platform=&arch=x"), None);
        let mut p =
            ScriptPlan::single("iqn.x:c1", "10.0.2.2:3261", "iqn.2026-11.org.diskless:boot");
        p.firmware = Some(Firmware::Uefi);
        let w = p.render();
        assert!(
            w.starts_with("#!ipxe\nset diskless-firmware uefi\nset initiator-iqn"),
            "{w}"
        );
    }

    fn plan(luns: &[u16], os: ClientOs, fw: Option<Firmware>) -> ScriptPlan {
        ScriptPlan {
            luns: luns.to_vec(),
            os,
            firmware: fw,
            ..ScriptPlan::single("iqn.x:c1", "192.168.10.1:3260", "iqn.t:boot")
        }
    }

    /// The script lines after `#!ipxe`, up to the failure label.
    fn lines(p: &ScriptPlan) -> Vec<String> {
        p.render()
            .lines()
            .skip(1)
            .take_while(|l| *l != ":failed")
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn bios_script_with_three_disks() {
        assert_eq!(
            lines(&plan(&[0, 1, 2], ClientOs::Linux, Some(Firmware::Bios))),
            [
                "set diskless-firmware bios",
                "set diskless-os linux",
                "set diskless-disks 3",
                "set initiator-iqn iqn.x:c1",
                "sanhook --drive 0x80 iscsi:192.168.10.1::3260:0:iqn.t:boot || goto failed",
                "sanhook --drive 0x81 --no-describe iscsi:192.168.10.1::3260:1:iqn.t:boot || goto failed",
                "sanhook --drive 0x82 --no-describe iscsi:192.168.10.1::3260:2:iqn.t:boot || goto failed",
                "sanboot --drive 0x80 || goto failed",
            ]
        );
    }

    #[test]
    fn uefi_script_one_disk_is_unchanged() {
        assert_eq!(
            lines(&plan(&[0], ClientOs::Other, Some(Firmware::Uefi))),
            [
                "set diskless-firmware uefi",
                "set initiator-iqn iqn.x:c1",
                "sanboot iscsi:192.168.10.1::3260:0:iqn.t:boot || goto failed",
            ]
        );
    }

    #[test]
    fn windows_script_keeps_san_and_clears_the_gateway_on_link() {
        let q = ScriptQuery {
            firmware: Some(Firmware::Uefi),
            ip: "192.168.10.57".parse().ok(),
            netmask: "255.255.255.0".parse().ok(),
        };
        let portal = "192.168.10.1:3260";
        let auto = |os| ScriptPlan::gateway_cleared(GatewayPolicy::Auto, os, &q, portal);
        assert!(auto(ClientOs::Windows));
        assert!(!auto(ClientOs::Linux));
        // Another subnet: clearing the gateway would cut the client off its target.
        assert!(!ScriptPlan::gateway_cleared(
            GatewayPolicy::Auto,
            ClientOs::Windows,
            &q,
            "10.0.0.1:3260"
        ));
        // No netmask known: auto keeps it; clear and keep are explicit.
        let unknown = ScriptQuery { netmask: None, ..q };
        assert!(!ScriptPlan::gateway_cleared(
            GatewayPolicy::Auto,
            ClientOs::Windows,
            &unknown,
            portal
        ));
        assert!(ScriptPlan::gateway_cleared(
            GatewayPolicy::Clear,
            ClientOs::Linux,
            &unknown,
            portal
        ));
        assert!(!ScriptPlan::gateway_cleared(
            GatewayPolicy::Keep,
            ClientOs::Windows,
            &q,
            portal
        ));
        let mut p = plan(&[0, 1], ClientOs::Windows, Some(Firmware::Uefi));
        p.clear_gateway = true;
        assert_eq!(
            lines(&p),
            [
                "set diskless-firmware uefi",
                "set diskless-os windows",
                "set diskless-disks 2",
                "set initiator-iqn iqn.x:c1",
                "set keep-san 1",
                "set netX/gateway 0.0.0.0",
                "sanhook --drive 0x80 iscsi:192.168.10.1::3260:0:iqn.t:boot || goto failed",
                "sanhook --drive 0x81 --no-describe iscsi:192.168.10.1::3260:1:iqn.t:boot || goto failed",
                "sanboot --drive 0x80 || goto failed",
            ]
        );
    }

    #[test]
    fn query_of_a_request() {
        let peer: SocketAddr = "[::ffff:192.168.10.57]:5000".parse().unwrap();
        let q = ScriptQuery::parse("mac=x&platform=pcbios&netmask=255.255.0.0", peer);
        assert_eq!(q.firmware, Some(Firmware::Bios));
        assert_eq!(q.ip, "192.168.10.57".parse().ok());
        assert_eq!(q.same_subnet("192.168.200.1"), Some(true));
        assert_eq!(q.same_subnet("192.169.0.1"), Some(false));
        assert_eq!(q.same_subnet("server.lab"), None);
        let q = ScriptQuery::parse("ip=10.1.2.3&netmask=255.0.0.0", peer);
        assert_eq!(q.same_subnet("10.200.0.1"), Some(true));
    }

    #[test]
    fn ranges() {
        assert_eq!(byte_range(None, 100), Ok(None));
        assert_eq!(byte_range(Some("bytes=0-9"), 100), Ok(Some((0, 9))));
        assert_eq!(byte_range(Some("bytes=90-"), 100), Ok(Some((90, 99))));
        assert_eq!(byte_range(Some("bytes=-10"), 100), Ok(Some((90, 99))));
        assert_eq!(byte_range(Some("bytes=-1000"), 100), Ok(Some((0, 99))));
        assert_eq!(byte_range(Some("bytes=50-5000"), 100), Ok(Some((50, 99))));
        assert_eq!(byte_range(Some("bytes=0-1,5-6"), 100), Ok(None));
        assert_eq!(byte_range(Some("items=0-1"), 100), Ok(None));
        assert_eq!(byte_range(Some("bytes=100-"), 100), Err(()));
        assert_eq!(byte_range(Some("bytes=9-3"), 100), Err(()));
        assert_eq!(byte_range(Some("bytes=x-3"), 100), Err(()));
        assert_eq!(byte_range(Some("bytes=-0"), 100), Err(()));
    }
}
