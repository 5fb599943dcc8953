//! The operator's HTTP API (JSON under `/api/v1`), its Server-Sent Events stream, the web
//! console and `/metrics`, on their own listener (`api:` in targets.yaml; 127.0.0.1 by
//! default), never on the boot-script endpoint clients reach.
//!
//! Layout: [`view`] builds the JSON views from a snapshot of the server (pure reads, no
//! secrets), [`actions`] runs the operator actions (reset, commit, reload, close a session)
//! with a per-client guard, [`audit`] appends every action to `STATE_DIR/audit.log`; this file
//! is the HTTP shell: routing, credentials, cross-site checks, errors, SSE.
//!
//! Security (docs/operations.md): with a credential configured every `/api/v1` request and
//! `/metrics` on this listener need `Authorization: Bearer TOKEN` (compared as SHA-256
//! digests); actions are POSTs with `Content-Type: application/json` and, when the browser
//! sends one, a same-origin `Origin`: a cross-site form or script can neither authenticate nor
//! send such a request without a CORS preflight, which is never granted. Without a credential
//! (loopback only) the `Host` header must be an address or `localhost` (DNS rebinding).

pub mod actions;
pub mod audit;
pub mod cluster;
pub mod view;

use crate::session::Server;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The OpenAPI 3 description of this API (served at /api/v1/openapi.json).
pub const OPENAPI: &str = include_str!("openapi.json");
const INDEX_HTML: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const STYLE_CSS: &str = include_str!("console/style.css");

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Event streams open at once (each holds a task and a subscription).
const MAX_STREAMS: usize = 64;
/// How often an event stream carries a `stats` event (client rates).
pub const STATS_EVERY: Duration = Duration::from_secs(1);

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Why a request failed: exactly one HTTP status per kind.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or wrong credential")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("request body too large")]
    TooLarge,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    NotImplemented(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Everything the HTTP shell shares between requests.
pub struct Api {
    pub server: Arc<Server>,
    /// The configuration file `reload` re-reads (None in quick mode).
    pub config_path: Option<PathBuf>,
    /// SHA-256 of the admin token (None: no credential, loopback only).
    token: Option<[u8; 32]>,
    pub audit: audit::AuditLog,
    pub guard: actions::Guard,
    pub rates: view::Rates,
    streams: AtomicUsize,
    /// The admin token itself (`api.token`), sent to the other nodes of a cluster when this
    /// node asks for their clients or forwards an action ([`cluster`]).
    peer_token: std::sync::OnceLock<String>,
}

impl Api {
    pub fn new(
        server: Arc<Server>,
        config_path: Option<PathBuf>,
        token: Option<[u8; 32]>,
        state_dir: PathBuf,
    ) -> Arc<Api> {
        Arc::new(Api {
            server,
            config_path,
            token,
            audit: audit::AuditLog::new(state_dir.join(audit::FILE)),
            guard: actions::Guard::default(),
            rates: view::Rates::default(),
            streams: AtomicUsize::new(0),
            peer_token: std::sync::OnceLock::new(),
        })
    }

    /// The token to present to the other nodes' APIs (None: ask them without one).
    pub fn set_peer_token(&self, token: Option<String>) {
        if let Some(t) = token {
            let _ = self.peer_token.set(t);
        }
    }

    pub fn peer_token(&self) -> Option<&str> {
        self.peer_token.get().map(String::as_str)
    }

    /// Whether the request carries the admin credential (always true without one).
    fn authorized(&self, req: &Request<hyper::body::Incoming>) -> bool {
        let Some(want) = &self.token else {
            return true;
        };
        use sha2::{Digest, Sha256};
        let Some(given) = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let got: [u8; 32] = Sha256::digest(given.trim().as_bytes()).into();
        // Digests compared without an early exit.
        got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// Who did it, for the audit log (never the credential itself).
pub fn who(api: &Api, peer: SocketAddr) -> String {
    if api.token.is_some() {
        format!("admin token from {peer}")
    } else {
        format!("loopback {peer}")
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<BoxBody> {
    let mut text = serde_json::to_string_pretty(body).unwrap_or_else(|_| "{}".into());
    text.push('\n');
    respond(status, "application/json", Bytes::from(text))
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<BoxBody> {
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    r
}

fn error_response(e: &ApiError) -> Response<BoxBody> {
    let mut r = json_response(e.status(), &serde_json::json!({ "error": e.to_string() }));
    if matches!(e, ApiError::Unauthorized) {
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"diskless\""),
        );
    }
    r
}

/// `%XX` decoding of one path segment (initiator names carry ':').
pub fn percent_decode(s: &str) -> Result<String, ApiError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ApiError::BadRequest(format!("bad escape in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::BadRequest("path is not UTF-8".into()))
}

/// Whether a `Host` header names an address or localhost (not a DNS name an attacker could
/// point at 127.0.0.1: DNS rebinding).
fn host_is_literal(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// Cross-site checks for a state-changing request (see the module doc).
fn check_same_origin(req: &Request<hyper::body::Incoming>) -> Result<(), ApiError> {
    let h = req.headers();
    let ct = h
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    {
        return Err(ApiError::UnsupportedMediaType(
            "actions take Content-Type: application/json".into(),
        ));
    }
    if h.get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s == "cross-site")
    {
        return Err(ApiError::Forbidden("cross-site request refused".into()));
    }
    if let Some(origin) = h.get(hyper::header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = h
            .get(hyper::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let same = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| o.eq_ignore_ascii_case(host));
        if !same {
            return Err(ApiError::Forbidden(format!(
                "cross-origin request from {origin} refused"
            )));
        }
    }
    Ok(())
}

/// Read a JSON body (an empty body is `{}`).
async fn json_body(req: Request<hyper::body::Incoming>) -> Result<serde_json::Value, ApiError> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| ApiError::TooLarge)?
        .to_bytes();
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(serde_json::json!({}));
    }
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    Ok(v)
}

/// Handle one request of the main listener.
async fn handle(
    api: Arc<Api>,
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> Response<BoxBody> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match route(&api, req, peer).await {
        Ok(r) => r,
        Err(e) => {
            if e.status().is_server_error() {
                warn!(%peer, %method, path, error = %e, "api request failed");
            }
            if method == Method::POST || method == Method::DELETE {
                api.audit.record(
                    &who(&api, peer),
                    &format!("{method} {path}"),
                    &serde_json::Value::Null,
                    Err(&e),
                );
            }
            error_response(&e)
        }
    }
}

async fn route(
    api: &Arc<Api>,
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> Result<Response<BoxBody>, ApiError> {
    if api.token.is_none() {
        let host = req
            .headers()
            .get(hyper::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !host_is_literal(host) {
            return Err(ApiError::Forbidden(
                "Host must be an address or localhost (configure api.token to use names)".into(),
            ));
        }
    }
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    // The console's files hold no data: served without the credential (it asks for it).
    match (&method, path.as_str()) {
        (&Method::GET, "/" | "/index.html") => {
            return Ok(respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                Bytes::from_static(INDEX_HTML.as_bytes()),
            ))
        }
        (&Method::GET, "/app.js") => {
            return Ok(respond(
                StatusCode::OK,
                "text/javascript; charset=utf-8",
                Bytes::from_static(APP_JS.as_bytes()),
            ))
        }
        (&Method::GET, "/style.css") => {
            return Ok(respond(
                StatusCode::OK,
                "text/css; charset=utf-8",
                Bytes::from_static(STYLE_CSS.as_bytes()),
            ))
        }
        _ => {}
    }
    if path != "/metrics" && !path.starts_with("/api/v1/") {
        return Err(ApiError::NotFound(format!("no such page {path}")));
    }
    if (&method, path.as_str()) == (&Method::GET, "/api/v1/openapi.json") {
        // The description holds no data.
        return Ok(respond(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(OPENAPI.as_bytes()),
        ));
    }
    if !api.authorized(&req) {
        return Err(ApiError::Unauthorized);
    }
    if path == "/metrics" {
        return match method {
            Method::GET => Ok(metrics_response(api, &req)),
            _ => Err(ApiError::MethodNotAllowed),
        };
    }
    let rest = &path["/api/v1/".len()..];
    let segs: Vec<&str> = rest.split('/').collect();
    match (method, segs.as_slice()) {
        (Method::GET, ["health"]) => Ok(json_response(StatusCode::OK, &view::health(api))),
        (Method::GET, ["clients"]) => {
            // In a cluster: the whole cluster's clients, unless `?scope=local` (what the
            // other nodes ask for).
            let local = req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|p| p == "scope=local"));
            Ok(json_response(
                StatusCode::OK,
                &cluster::clients(api, local).await,
            ))
        }
        (Method::GET, ["clients", id]) => {
            let id = percent_decode(id)?;
            let forwarded = cluster::forwarded_by(&req).is_some();
            let v = match cluster::client(api, &id, forwarded).await {
                Some(r) => r?,
                None => view::client(api, &id)?,
            };
            Ok(json_response(StatusCode::OK, &v))
        }
        (Method::GET, ["cluster"]) => {
            Ok(json_response(StatusCode::OK, &cluster::cluster(api).await?))
        }
        (Method::GET, ["sessions"]) => Ok(json_response(StatusCode::OK, &view::sessions(api))),
        (Method::GET, ["targets"]) => Ok(json_response(StatusCode::OK, &view::targets(api))),
        (Method::GET, ["images"]) => {
            let mut v = view::images(api);
            v["catalogue"] = cluster::catalogue(api).await;
            Ok(json_response(StatusCode::OK, &v))
        }
        (Method::GET, ["events", "recent"]) => {
            Ok(json_response(StatusCode::OK, &view::recent_events(api)))
        }
        (Method::GET, ["audit"]) => Ok(json_response(StatusCode::OK, &api.audit.recent())),
        (Method::GET, ["events"]) => event_stream(api, &req),
        (Method::DELETE, ["clients", id, "next-boot"]) => {
            // DELETE = POST {"clear": true}, with the same cross-site checks and audit.
            check_same_origin(&req)?;
            let id = percent_decode(id)?;
            let fwd = cluster::forwarded_by(&req);
            let body = json_body(req).await?;
            let what = format!(
                "clear next-boot client {id}{}",
                forwarded_note(fwd.as_deref())
            );
            let result = match body.as_object().map(|o| o.is_empty()) {
                Some(true) => {
                    let by = who(api, peer);
                    match cluster::forward_action(
                        api,
                        &id,
                        "DELETE",
                        &path,
                        "next-boot",
                        &body,
                        fwd.as_deref(),
                    )
                    .await
                    {
                        Some(r) => r,
                        None => {
                            actions::next_boot(api, &id, &serde_json::json!({"clear": true}), &by)
                                .await
                        }
                    }
                }
                _ => Err(ApiError::BadRequest(
                    "DELETE next-boot takes no fields (it clears the override)".into(),
                )),
            };
            api.audit
                .record(&who(api, peer), &what, &body, result.as_ref().map(|_| ()));
            if result.is_ok() {
                info!(%peer, action = %what, "operator action");
            }
            result.map(|v| json_response(StatusCode::OK, &v))
        }
        (Method::POST, segs) => {
            check_same_origin(&req)?;
            let segs: Vec<String> = segs.iter().map(|s| s.to_string()).collect();
            let fwd = cluster::forwarded_by(&req);
            let body = json_body(req).await?;
            let (what, result) = match segs.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                ["clients", id, action] => {
                    let id = percent_decode(id)?;
                    let what = format!("{action} client {id}{}", forwarded_note(fwd.as_deref()));
                    let known = matches!(action, "reset" | "commit" | "next-boot");
                    // In a cluster, the client's owner applies it (src/api/cluster.rs).
                    let forwarded = match known {
                        true => {
                            cluster::forward_action(
                                api,
                                &id,
                                "POST",
                                &path,
                                action,
                                &body,
                                fwd.as_deref(),
                            )
                            .await
                        }
                        false => None,
                    };
                    let r = match (forwarded, action) {
                        (Some(r), _) => r,
                        (None, "reset") => actions::reset(api, &id, &body).await,
                        (None, "commit") => actions::commit(api, &id, &body).await,
                        (None, "next-boot") => {
                            actions::next_boot(api, &id, &body, &who(api, peer)).await
                        }
                        _ => Err(ApiError::NotFound(format!("no action {action:?}"))),
                    };
                    (what, r)
                }
                ["sessions", tsih, "close"] => (
                    format!("close session {tsih}"),
                    actions::close_session(api, tsih).await,
                ),
                ["reload"] => ("reload".to_string(), actions::reload(api)),
                _ => return Err(ApiError::NotFound(format!("no such action {path}"))),
            };
            api.audit
                .record(&who(api, peer), &what, &body, result.as_ref().map(|_| ()));
            if result.is_ok() {
                info!(%peer, action = %what, "operator action");
                api.server.metrics().emit(
                    "action",
                    None,
                    None,
                    Some(peer),
                    format!("{what} ({})", who(api, peer)),
                );
            }
            result.map(|v| json_response(StatusCode::OK, &v))
        }
        (Method::GET, ["clients", _, "reset" | "commit" | "next-boot"])
        | (Method::GET, ["sessions", _, "close"])
        | (Method::GET, ["reload"]) => Err(ApiError::MethodNotAllowed),
        (Method::GET, _) => Err(ApiError::NotFound(format!("no such resource {path}"))),
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// The audit log's note of a forwarded action.
fn forwarded_note(by: Option<&str>) -> String {
    by.map(|n| format!(" (forwarded by node {n})"))
        .unwrap_or_default()
}

/// `/metrics`: OpenMetrics when the scraper asks for it (Prometheus does), else the classic
/// text format (curl, promtool).
fn metrics_response(api: &Api, req: &Request<hyper::body::Incoming>) -> Response<BoxBody> {
    let text = api
        .server
        .metrics()
        .render(&view::scrape_state(&api.server));
    let openmetrics = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if openmetrics {
        respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Bytes::from(text),
        )
    } else {
        respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            Bytes::from(crate::metrics::to_classic_text(&text)),
        )
    }
}

/// A response body fed by a channel (the event stream).
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// Counts an open stream; released when the stream's task ends.
struct StreamSlot(Arc<Api>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `GET /api/v1/events`: Server-Sent Events (boots, hand-offs, session ends, login
/// failures, resets, actions) plus a `stats` event every second with each client's rates.
/// `Last-Event-ID` replays what the client missed from the recent events.
fn event_stream(
    api: &Arc<Api>,
    req: &Request<hyper::body::Incoming>,
) -> Result<Response<BoxBody>, ApiError> {
    if api.streams.fetch_add(1, Ordering::AcqRel) >= MAX_STREAMS {
        api.streams.fetch_sub(1, Ordering::AcqRel);
        return Err(ApiError::Unavailable("too many event streams open".into()));
    }
    let slot = StreamSlot(api.clone());
    let last: u64 = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(u64::MAX);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let api = api.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let metrics = api.server.metrics().clone();
        let mut events = metrics.subscribe();
        let mut out = String::from("retry: 2000\n: diskless event stream\n\n");
        if last != u64::MAX {
            for e in metrics.recent_events().iter().filter(|e| e.seq > last) {
                out.push_str(&sse_event(e));
            }
        }
        if tx.send(Bytes::from(out)).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(STATS_EVERY);
        loop {
            let chunk = tokio::select! {
                ev = events.recv() => match ev {
                    Ok(e) => sse_event(&e),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        format!(": {n} events skipped (slow reader)\n\n")
                    }
                    Err(_) => return,
                },
                _ = tick.tick() => {
                    let stats = view::stats(&api);
                    format!("event: stats\ndata: {}\n\n", serde_json::to_string(&stats).unwrap_or_default())
                }
            };
            if tx.send(Bytes::from(chunk)).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(ChannelBody(rx).boxed());
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    Ok(r)
}

fn sse_event(e: &crate::metrics::Event) -> String {
    format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        e.seq,
        e.kind,
        serde_json::to_string(e).unwrap_or_default()
    )
}

/// Serve the API, console and `/metrics` until the task is aborted. Also runs the sampler
/// that turns counters into per-client rates.
pub async fn serve(listener: TcpListener, api: Arc<Api>) {
    let sampler = tokio::spawn(view::sample(api.clone()));
    accept_loop(listener, api, false).await;
    sampler.abort();
}

/// Serve `/metrics` only, without credential (`api.metrics_listen`).
pub async fn serve_metrics(listener: TcpListener, api: Arc<Api>) {
    accept_loop(listener, api, true).await;
}

async fn accept_loop(listener: TcpListener, api: Arc<Api>, metrics_only: bool) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "api: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let api = api.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let api = api.clone();
                async move {
                    let r = if metrics_only {
                        match (req.method(), req.uri().path()) {
                            (&Method::GET, "/metrics") => metrics_response(&api, &req),
                            _ => error_response(&ApiError::NotFound(
                                "this listener serves /metrics only".into(),
                            )),
                        }
                    } else {
                        handle(api, req, peer).await
                    };
                    Ok::<_, Infallible>(r)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            // Header reads are bounded; an event stream lives as long as its reader.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(io, svc);
            let _ = conn.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_and_hosts() {
        assert_eq!(
            percent_decode("iqn.2026-11.lab%3Apc-07").unwrap(),
            "iqn.2026-11.lab:pc-07"
        );
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%").is_err());
        assert!(host_is_literal("127.0.0.1:9260"));
        assert!(host_is_literal("[::1]:9260"));
        assert!(host_is_literal("localhost:80"));
        assert!(!host_is_literal("evil.example:9260"));
        assert!(!host_is_literal(""));
    }

    #[test]
    fn openapi_is_json_and_lists_every_route() {
        let v: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = v["paths"].as_object().unwrap();
        for p in [
            "/health",
            "/clients",
            "/cluster",
            "/clients/{initiator}",
            "/clients/{initiator}/reset",
            "/clients/{initiator}/commit",
            "/clients/{initiator}/next-boot",
            "/sessions",
            "/sessions/{tsih}/close",
            "/targets",
            "/images",
            "/events",
            "/events/recent",
            "/audit",
            "/reload",
            "/openapi.json",
        ] {
            assert!(paths.contains_key(p), "openapi.json lacks {p}");
        }
    }
}
