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

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::{info, warn};

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
        local: SocketAddr,
        peer: SocketAddr,
    ) -> ScriptFuture<'a>;
}

/// An iPXE script that sets the initiator name and boots from the SAN disk (LUN 0).
pub fn ipxe_script(initiator: &str, portal: &str, target: &str) -> String {
    // sanboot iscsi:<server>:<protocol>:<port>:<lun>:<targetname> (iPXE URI syntax); the
    // portal is "host:port".
    let (host, port) = match portal.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => (h, p),
        _ => (portal, "3260"),
    };
    format!(
        "#!ipxe\n\
         set initiator-iqn {initiator}\n\
         sanboot iscsi:{host}::{port}:0:{target} || goto failed\n\
         :failed\n\
         echo diskless: SANBOOT-FAILED ${{errno}}\n\
         shell\n"
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

/// Serve until the listener is dropped (the task is aborted at shutdown).
pub async fn serve(listener: TcpListener, scripts: Arc<dyn BootScripts>) {
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
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let scripts = scripts.clone();
                async move {
                    let path = req.uri().path().to_string();
                    let query = req.uri().query().unwrap_or("").to_string();
                    let resp = if req.method() != hyper::Method::GET {
                        respond(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into())
                    } else if path != "/boot.ipxe" {
                        respond(
                            StatusCode::NOT_FOUND,
                            "try /boot.ipxe?mac=...&uuid=...\n".into(),
                        )
                    } else {
                        let mac = query_param(&query, "mac");
                        let uuid = query_param(&query, "uuid");
                        match scripts
                            .script(mac.as_deref(), uuid.as_deref(), local, peer)
                            .await
                        {
                            Some(s) => {
                                info!(%peer, mac = ?mac, uuid = ?uuid, "boot script served");
                                respond(StatusCode::OK, s)
                            }
                            None => {
                                info!(%peer, mac = ?mac, uuid = ?uuid, "boot script: unknown client");
                                respond(
                                    StatusCode::NOT_FOUND,
                                    "#!ipxe\necho diskless: unknown client\nshell\n".into(),
                                )
                            }
                        }
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc);
            // Bounded: a client that never finishes its request is dropped.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_and_query() {
        let s = ipxe_script("iqn.x:c1", "10.0.2.2:3261", "iqn.2026-11.org.diskless:boot");
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("set initiator-iqn iqn.x:c1\n"));
        assert!(s.contains("sanboot iscsi:10.0.2.2::3261:0:iqn.2026-11.org.diskless:boot"));
        assert_eq!(
            query_param("mac=52%3A54%3A00%3A00%3A00%3A01&uuid=", "mac").as_deref(),
            Some("52:54:00:00:00:01")
        );
        assert_eq!(query_param("mac=52:54:00:00:00:01&uuid=", "uuid"), None);
    }
}
