//! The API in a cluster (docs/operations.md, "In a cluster"): every node answers for the
//! whole cluster.
//!
//! - Where the data comes from: the cluster's keys in etcd are the list (ownership keys:
//!   who serves which client; lifecycle records: phase, boot count, disk, as the owner last
//!   wrote them, src/cluster/clients.rs), and each owning node's own API adds the live
//!   details (sessions, rates, IP) of the clients it serves (`GET /clients?scope=local`).
//!   etcd alone would miss the live part (records are written when the lifecycle changes,
//!   not at every I/O); the nodes alone would miss the clients of a dead node.
//! - Bounded: the etcd read and the nodes' answers are awaited together, each node for at
//!   most [`PEER_TIMEOUT`], so a dead, paused or slow node costs the view that long at most;
//!   its clients are then shown from etcd with `"stale": true` and the reason.
//! - Actions on a client another node owns (reset, commit, next boot) are forwarded to that
//!   node's API with this node's admin token (`api.token`, the same on every node) and
//!   applied there, by the node that holds the disk; a forwarded request is never forwarded
//!   again. A client nobody owns now is reset by nobody (409): its next boot places it.

use super::{view, Api, ApiError};
use crate::boot::record::{ClientRecord, Lun0};
use crate::cluster::Cluster;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

/// Longest wait for another node's API in a view (its clients are then shown from etcd,
/// marked stale).
pub const PEER_TIMEOUT: Duration = Duration::from_millis(1500);
/// Longest wait for the owner's answer to a forwarded action.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// ... to a forwarded reset: it waits up to 5 s for the client's sessions to close, then, for
/// disks in RBD, up to 10 s (twice the longest etcd request timeout) for etcd to store the
/// client's record carrying the reset (`Records::store_limit`).
pub const FORWARD_RESET_TIMEOUT: Duration = Duration::from_secs(20);
/// The header a forwarding node sets (its node id): the receiver never forwards again.
pub const FORWARDED_BY: &str = "x-diskless-forwarded-by";
/// Largest answer read from another node.
const MAX_PEER_BODY: u64 = 16 << 20;

/// Why another node's API gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("node {0} publishes no API address (no api: section, or an older version)")]
    NoAddress(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("malformed answer: {0}")]
    Malformed(String),
}

/// One plain HTTP/1.1 exchange with another node's API (`Connection: close`), bounded as a
/// whole by `limit`: (status, body).
pub async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    me: &str,
    body: Option<&[u8]>,
    limit: Duration,
) -> Result<(u16, Vec<u8>), PeerError> {
    let run = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let body = body.unwrap_or(b"");
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n\
             {FORWARDED_BY}: {me}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(t) = token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut raw = Vec::new();
        s.take(MAX_PEER_BODY).read_to_end(&mut raw).await?;
        parse_response(&raw)
    };
    match tokio::time::timeout(limit, run).await {
        Ok(r) => r,
        Err(_) => Err(PeerError::Timeout(limit)),
    }
}

/// Status and body of an HTTP/1.1 response read to its end (Content-Length or chunked).
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), PeerError> {
    let bad = |m: &str| PeerError::Malformed(m.to_string());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = Some(v.parse::<usize>().map_err(|_| bad("bad Content-Length"))?);
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let eol = rest[at..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("truncated chunk"))?;
            let size = std::str::from_utf8(&rest[at..at + eol])
                .ok()
                .and_then(|s| {
                    usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok()
                })
                .ok_or_else(|| bad("bad chunk size"))?;
            at += eol + 2;
            if size == 0 {
                break;
            }
            let chunk = rest
                .get(at..at + size)
                .ok_or_else(|| bad("truncated chunk"))?;
            out.extend_from_slice(chunk);
            at += size + 2;
        }
        out
    } else {
        match length {
            Some(n) => rest.get(..n).ok_or_else(|| bad("truncated body"))?.to_vec(),
            None => rest.to_vec(),
        }
    };
    Ok((status, body))
}

/// Who serves a client, as this node's view of etcd says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Not in a cluster, or this node owns it.
    Here,
    /// Another live node owns it (its API address, if it publishes one).
    Elsewhere {
        node: String,
        api: Option<SocketAddr>,
    },
    /// In a cluster, and no node owns it now.
    Nobody,
}

fn owners_lowercase(v: &crate::cluster::View) -> BTreeMap<String, String> {
    v.owners
        .iter()
        .map(|(k, o)| (k.to_ascii_lowercase(), o.clone()))
        .collect()
}

/// Who serves `initiator`.
pub fn owner(api: &Api, initiator: &str) -> Owner {
    let Some(cl) = api.server.cluster() else {
        return Owner::Here;
    };
    let v = cl.view();
    match owners_lowercase(&v).get(&initiator.to_ascii_lowercase()) {
        None => Owner::Nobody,
        Some(n) if n == cl.node_id() => Owner::Here,
        Some(n) => Owner::Elsewhere {
            node: n.clone(),
            api: v.nodes.get(n).and_then(|r| r.api),
        },
    }
}

/// The other nodes of `v` and their API addresses (none when a node did not publish one).
fn peers(v: &crate::cluster::View, me: &str) -> Vec<(String, Option<SocketAddr>)> {
    v.nodes
        .iter()
        .filter(|(id, _)| id.as_str() != me)
        .map(|(id, n)| (id.clone(), n.api))
        .collect()
}

/// GET `path` from each node (bounded, all at once): node id → JSON answer or why not.
async fn ask_all(
    api: &Api,
    me: &str,
    peers: Vec<(String, Option<SocketAddr>)>,
    path: &str,
) -> BTreeMap<String, (Result<Value, String>, u64)> {
    let mut set = tokio::task::JoinSet::new();
    for (id, addr) in peers {
        let token = api.peer_token().map(str::to_string);
        let (me, path) = (me.to_string(), path.to_string());
        set.spawn(async move {
            let t0 = Instant::now();
            let r = match addr {
                None => Err(PeerError::NoAddress(id.clone()).to_string()),
                Some(a) => {
                    match exchange(a, "GET", &path, token.as_deref(), &me, None, PEER_TIMEOUT).await {
                        Ok((200, body)) => serde_json::from_slice::<Value>(&body)
                            .map_err(|e| format!("malformed JSON: {e}")),
                        Ok((401, _)) => Err(
                            "it refused this node's credential (the nodes of a cluster share api.token)"
                                .to_string(),
                        ),
                        Ok((s, body)) => Err(format!(
                            "it answered {s}: {}",
                            String::from_utf8_lossy(&body).trim()
                        )),
                        Err(e) => Err(e.to_string()),
                    }
                }
            };
            (id, r, t0.elapsed().as_millis() as u64)
        });
    }
    let mut out = BTreeMap::new();
    while let Some(j) = set.join_next().await {
        if let Ok((id, r, ms)) = j {
            if let Err(e) = &r {
                debug!(node = %id, error = %e, "another node's API gave no answer");
            }
            out.insert(id, (r, ms));
        }
    }
    out
}

/// The lifecycle records in etcd, parsed (unreadable ones skipped), by lowercased initiator.
async fn records(cl: &Cluster) -> Result<BTreeMap<String, ClientRecord>, String> {
    let raw = crate::cluster::clients::read_records(cl)
        .await
        .map_err(|e| e.to_string())?;
    Ok(raw
        .into_iter()
        .filter_map(
            |(key, value)| match serde_json::from_slice::<ClientRecord>(&value) {
                Ok(r) => Some((r.initiator.to_ascii_lowercase(), r)),
                Err(e) => {
                    warn!(%key, error = %e, "unreadable client lifecycle record: not listed");
                    None
                }
            },
        )
        .collect())
}

/// A client as etcd has it: its lifecycle record as its owner last wrote it, or (no record)
/// only its ownership key.
fn record_row(
    initiator: &str,
    rec: Option<&ClientRecord>,
    owner: Option<&str>,
    stale: Option<String>,
) -> Value {
    let mut row = json!({
        "initiator": rec.map_or(initiator, |r| r.initiator.as_str()),
        "target": rec.map(|r| r.target.clone()),
        "node": owner.or(rec.map(|r| r.node.as_str())),
        "owner": owner,
        "state": "offline",
        "sessions": 0,
        "boots": 0,
        "resets": 0,
        "rbd_recreate_pending": [],
        "image": "",
        "mode": "",
        "read_bps": null,
        "write_bps": null,
        "iops": null,
        "disk_open": false,
        "stale": stale.is_some(),
        "stale_reason": stale,
        "source": "etcd",
    });
    if let Some(r) = rec {
        let live = r.state.live_sessions;
        let state = match (live, r.state.phase) {
            (0, _) => "offline",
            (_, crate::boot::lifecycle::Phase::Firmware) => "firmware",
            _ => "running",
        };
        let fields = [
            ("state", json!(state)),
            ("sessions", json!(live)),
            ("phase", json!(r.state.phase.to_string())),
            ("boots", json!(r.state.boots)),
            ("resets", json!(r.state.resets)),
            ("last_reset_reason", json!(r.state.last_reset_reason)),
            ("reset_pending", json!(r.state.reset_pending)),
            ("rbd_recreate_pending", json!(r.state.rbd_recreate)),
            ("image", json!(r.disk.image)),
            ("version", json!(r.disk.version)),
            ("mode", json!(r.disk.mode.to_string())),
            (
                "disk",
                json!(match &r.disk.lun0 {
                    Lun0::Overlay => json!({"kind": "overlay"}),
                    Lun0::Rbd { name } => json!({"kind": "rbd", "name": name}),
                    Lun0::Image => json!({"kind": "image"}),
                }),
            ),
            ("since_ms", json!(r.last_boot_ms)),
            ("updated_ms", json!(r.updated_ms)),
            ("last_writer", json!(r.node)),
        ];
        if let Some(o) = row.as_object_mut() {
            for (k, v) in fields {
                o.insert(k.to_string(), v);
            }
        }
    }
    row
}

fn set(row: &mut Value, fields: &[(&str, Value)]) {
    if let Some(o) = row.as_object_mut() {
        for (k, v) in fields {
            o.insert((*k).to_string(), v.clone());
        }
    }
}

fn initiator_of(row: &Value) -> String {
    row["initiator"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// The other nodes' answers to `GET /clients?scope=local`: node id → (JSON or why not, ms).
pub type Answers = BTreeMap<String, (Result<Value, String>, u64)>;

/// The cluster-wide list (pure): each client once, as the node its ownership key names
/// (`owners`, lowercased initiator → node) has it: that node's own row when it answered
/// (`answers`; this node's are `local_rows`), else its lifecycle record (`recs`) marked stale
/// with the reason; clients nobody owns from their last record, stale.
pub fn merge(
    me: &str,
    owners: &BTreeMap<String, String>,
    local_rows: Vec<Value>,
    answers: &Answers,
    recs: &BTreeMap<String, ClientRecord>,
) -> Vec<Value> {
    let mut rows: Vec<Value> = Vec::new();
    let mut listed: BTreeSet<String> = BTreeSet::new();
    // The owners' own rows first: live and authoritative.
    for (id, (answer, ms)) in answers {
        let Ok(a) = answer else { continue };
        for r in a["clients"].as_array().into_iter().flatten() {
            let i = initiator_of(r);
            if owners.get(&i) == Some(id) && listed.insert(i) {
                let mut r = r.clone();
                set(&mut r, &[("node", json!(id)), ("answer_ms", json!(ms))]);
                rows.push(r);
            }
        }
    }
    // This node's: the clients it owns, and those nobody owns that it knows (bindings).
    for r in local_rows {
        let i = initiator_of(&r);
        let mine = match owners.get(&i) {
            Some(o) => o == me,
            None => !recs.contains_key(&i),
        };
        if mine && listed.insert(i) {
            rows.push(r);
        }
    }
    // Clients of the other nodes that did not answer for them, from etcd.
    for (i, o) in owners {
        if listed.contains(i) {
            continue;
        }
        let stale = match answers.get(o) {
            Some((Ok(_), _)) => None,
            Some((Err(e), _)) => Some(format!("node {o} did not answer: {e}")),
            None if o == me => None,
            None => Some(format!("node {o} is not live in etcd")),
        };
        listed.insert(i.clone());
        rows.push(record_row(i, recs.get(i), Some(o), stale));
    }
    // Clients nobody owns now (their node died or left): their last record.
    for (i, r) in recs {
        if listed.insert(i.clone()) {
            let why = format!(
                "no node owns it now (last written by node {} at {})",
                r.node,
                super::audit::rfc3339(r.updated_ms)
            );
            rows.push(record_row(i, Some(r), None, Some(why)));
        }
    }
    rows
}

/// `GET /clients`: outside a cluster (or with `?scope=local`) this node's clients; in a
/// cluster every client of the cluster with its owning node (see the module doc).
pub async fn clients(api: &Api, local_only: bool) -> Value {
    let mut local = view::clients(api);
    let Some(cl) = api.server.cluster() else {
        return local;
    };
    let me = cl.node_id().to_string();
    let v = cl.view();
    let owners = owners_lowercase(&v);
    let mut local_rows = local["clients"].take();
    let local_rows: Vec<Value> = local_rows
        .as_array_mut()
        .map(std::mem::take)
        .unwrap_or_default()
        .into_iter()
        .map(|mut r| {
            let owner = owners.get(&initiator_of(&r)).cloned();
            set(
                &mut r,
                &[
                    ("node", json!(me)),
                    ("owner", json!(owner)),
                    ("stale", json!(false)),
                    ("source", json!("node")),
                ],
            );
            r
        })
        .collect();
    if local_only {
        return json!({ "clients": local_rows, "node": me });
    }
    let t0 = Instant::now();
    let peers = peers(&v, &me);
    let (recs, answers) = tokio::join!(
        records(cl),
        ask_all(api, &me, peers, "/api/v1/clients?scope=local")
    );
    let (recs, etcd_error) = match recs {
        Ok(r) => (r, None),
        Err(e) => (BTreeMap::new(), Some(e)),
    };
    let rows = merge(&me, &owners, local_rows, &answers, &recs);
    let stale_nodes: Vec<&String> = answers
        .iter()
        .filter(|(_, (a, _))| a.is_err())
        .map(|(id, _)| id)
        .collect();
    json!({
        "clients": rows,
        "node": me,
        "cluster": {
            "name": cl.name(),
            "node": me,
            "nodes": v.nodes.keys().collect::<Vec<_>>(),
            "stale_nodes": stale_nodes,
            "etcd_error": etcd_error,
            "elapsed_ms": t0.elapsed().as_millis() as u64,
        },
    })
}

/// `GET /clients/{id}` for a client another node owns: that node's answer (bounded), else
/// its record in etcd, marked stale. None: this node answers itself.
pub async fn client(
    api: &Api,
    initiator: &str,
    forwarded: bool,
) -> Option<Result<Value, ApiError>> {
    let cl = api.server.cluster()?;
    let me = cl.node_id().to_string();
    let (node, addr) = match owner(api, initiator) {
        Owner::Elsewhere { node, api } if !forwarded => (node, api),
        Owner::Nobody => {
            // Known here (a binding, a disk it had open)? Else the last record, if any.
            if view::find_client(api, initiator).is_ok() {
                return None;
            }
            let recs = records(cl).await.ok()?;
            let r = recs.get(&initiator.to_ascii_lowercase())?;
            let why = format!("no node owns it now (last written by node {})", r.node);
            return Some(Ok(detail_from_record(initiator, Some(r), None, why)));
        }
        _ => return None,
    };
    let path = format!("/api/v1/clients/{}", encode(initiator));
    let why = match addr {
        None => PeerError::NoAddress(node.clone()).to_string(),
        Some(a) => match exchange(a, "GET", &path, api.peer_token(), &me, None, PEER_TIMEOUT).await
        {
            Ok((200, body)) => match serde_json::from_slice::<Value>(&body) {
                Ok(mut v) => {
                    set(
                        &mut v,
                        &[
                            ("node", json!(node)),
                            ("owner", json!(node)),
                            ("stale", json!(false)),
                        ],
                    );
                    return Some(Ok(v));
                }
                Err(e) => format!("malformed JSON: {e}"),
            },
            Ok((s, body)) => format!("it answered {s}: {}", String::from_utf8_lossy(&body).trim()),
            Err(e) => e.to_string(),
        },
    };
    let recs = records(cl).await.unwrap_or_default();
    let r = recs.get(&initiator.to_ascii_lowercase());
    Some(Ok(detail_from_record(
        initiator,
        r,
        Some(&node),
        format!("node {node} did not answer: {why}"),
    )))
}

fn detail_from_record(
    initiator: &str,
    r: Option<&ClientRecord>,
    owner: Option<&str>,
    why: String,
) -> Value {
    let mut v = record_row(initiator, r, owner, Some(why));
    set(
        &mut v,
        &[
            ("timeline", json!([])),
            ("session_list", json!([])),
            ("disks", json!([])),
            ("overlay_dir", Value::Null),
            ("next_boot", Value::Null),
            ("next_disk", Value::Null),
        ],
    );
    v
}

/// `%XX` encoding of one path segment.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// An action on a client (`reset`, `commit`, `next-boot`): None when this node applies it
/// itself; else the owner's answer to the forwarded request, or why it is not applied.
pub async fn forward_action(
    api: &Api,
    initiator: &str,
    method: &str,
    path: &str,
    action: &str,
    body: &Value,
    forwarded_by: Option<&str>,
) -> Option<Result<Value, ApiError>> {
    let cl = api.server.cluster()?;
    match owner(api, initiator) {
        Owner::Here => None,
        // Next boot: stored in etcd by this node; whichever node places the client takes it.
        Owner::Nobody if action == "next-boot" => None,
        Owner::Nobody => Some(Err(match view::find_client(api, initiator) {
            Err(e) => e,
            Ok(_) => ApiError::Conflict(format!(
                "no node owns client {initiator} now: nothing is applied (its disk is held by \
             nobody; its next boot places it on a node, ask again then)"
            )),
        })),
        Owner::Elsewhere { node, .. } if forwarded_by.is_some() => {
            Some(Err(ApiError::Conflict(format!(
                "client {initiator} is owned by node {node}, not this one ({}): not applied \
                 (a forwarded action is never forwarded again)",
                cl.node_id()
            ))))
        }
        Owner::Elsewhere { node, api: None } => Some(Err(ApiError::Unavailable(
            PeerError::NoAddress(node).to_string(),
        ))),
        Owner::Elsewhere {
            node,
            api: Some(addr),
        } => {
            let text = serde_json::to_vec(body).unwrap_or_default();
            let me = cl.node_id();
            let r = exchange(
                addr,
                method,
                path,
                api.peer_token(),
                me,
                Some(&text),
                if action == "reset" {
                    FORWARD_RESET_TIMEOUT
                } else {
                    FORWARD_TIMEOUT
                },
            )
            .await;
            Some(match r {
                Ok((status, body)) => {
                    let v: Value = serde_json::from_slice(&body)
                        .unwrap_or_else(|_| json!({"error": String::from_utf8_lossy(&body)}));
                    let err = format!(
                        "node {node} (the client's owner): {}",
                        v["error"].as_str().unwrap_or("")
                    );
                    match status {
                        200 => {
                            let mut v = v;
                            set(&mut v, &[("forwarded_to", json!(node))]);
                            Ok(v)
                        }
                        400 => Err(ApiError::BadRequest(err)),
                        404 => Err(ApiError::NotFound(err)),
                        409 => Err(ApiError::Conflict(err)),
                        422 => Err(ApiError::Unprocessable(err)),
                        401 | 403 => Err(ApiError::Unavailable(format!(
                            "{err} (it refused this node's credential: the nodes of a cluster share api.token)"
                        ))),
                        _ => Err(ApiError::Unavailable(format!("{err} (status {status})"))),
                    }
                }
                Err(PeerError::Timeout(t)) => Err(ApiError::Unavailable(format!(
                    "node {node} (the client's owner) did not answer within {t:?}: the action may \
                     or may not have been applied there; look again"
                ))),
                Err(e) => Err(ApiError::Unavailable(format!(
                    "node {node} (the client's owner) cannot be reached: {e}; nothing applied"
                ))),
            })
        }
    }
}

/// `GET /cluster`: the nodes (portal, API, load, clients owned, drained, lease), each asked
/// whether its API answers (bounded); 404 outside a cluster.
pub async fn cluster(api: &Api) -> Result<Value, ApiError> {
    let cl = api
        .server
        .cluster()
        .ok_or_else(|| ApiError::NotFound("this node is not in a cluster".into()))?;
    let t0 = Instant::now();
    let me = cl.node_id().to_string();
    let v = cl.view();
    let peers = peers(&v, &me);
    let answers = ask_all(api, &me, peers, "/api/v1/health").await;
    let status = crate::cluster::placement::status(&v);
    let nodes: Vec<Value> = status
        .nodes
        .iter()
        .map(|n| {
            let rec = v.nodes.get(&n.id);
            let (answering, ms, error) = match answers.get(&n.id) {
                _ if n.id == me => (true, Some(0), None),
                Some((Ok(_), ms)) => (true, Some(*ms), None),
                Some((Err(e), ms)) => (false, Some(*ms), Some(e.clone())),
                None => (false, None, None),
            };
            json!({
                "id": n.id,
                "me": n.id == me,
                "portal": n.portal.to_string(),
                "api": rec.and_then(|r| r.api).map(|a| a.to_string()),
                "load": n.load,
                "clients": n.clients,
                "draining": n.draining,
                "drained": v.drained.contains(&n.id),
                "lease": rec.map(|r| format!("{:x}", r.lease)),
                // Its record is bound to its lease: listed means the lease is alive at etcd
                // (as this node's watch last saw).
                "lease_alive": if n.id == me { cl.registered() } else { true },
                "answering": answering,
                "answer_ms": ms,
                "error": error,
            })
        })
        .collect();
    let mut out = Map::new();
    out.insert("name".into(), json!(cl.name()));
    out.insert("node".into(), json!(me));
    out.insert("registered".into(), json!(cl.registered()));
    out.insert("etcd_reachable".into(), json!(cl.reachable()));
    out.insert("nodes".into(), Value::Array(nodes));
    out.insert("orphans".into(), json!(status.orphans));
    out.insert("drained_absent".into(), json!(status.drained_absent));
    out.insert("elapsed_ms".into(), json!(t0.elapsed().as_millis() as u64));
    Ok(Value::Object(out))
}

/// The image catalogue (versions and pointers, read-only) with the clients on each version
/// (from the lifecycle records); null outside a cluster or before the catalogue is read.
pub async fn catalogue(api: &Api) -> Value {
    let Some(cl) = api.server.cluster() else {
        return Value::Null;
    };
    let Some(cat) = cl.catalogue().view() else {
        return Value::Null;
    };
    let recs = records(cl).await;
    let mut on: BTreeMap<(String, String), u64> = BTreeMap::new();
    if let Ok(recs) = &recs {
        for r in recs.values() {
            let (name, ver) = match (r.disk.image.split_once('@'), r.disk.version) {
                (Some((n, v)), _) => (n.to_string(), v.to_string()),
                (None, Some(v)) => (r.disk.image.clone(), v.to_string()),
                (None, None) => continue,
            };
            *on.entry((name, ver)).or_insert(0) += 1;
        }
    }
    let images: Vec<Value> = cat
        .images
        .iter()
        .map(|(name, e)| {
            let versions: Vec<Value> = e
                .in_order()
                .iter()
                .map(|vr| {
                    json!({
                        "version": vr.version,
                        "seq": vr.seq,
                        "time_ms": vr.time_ms,
                        "author": vr.author,
                        "message": vr.message,
                        "size": vr.size,
                        "chunk_size": vr.chunk_size,
                        "clients": on.get(&(name.clone(), vr.version.clone())).copied().unwrap_or(0),
                    })
                })
                .collect();
            let pointers: Map<String, Value> = e
                .pointers
                .iter()
                .map(|(p, ptr)| {
                    (
                        p.clone(),
                        json!({
                            "version": ptr.version,
                            "by": ptr.by,
                            "time_ms": ptr.time_ms,
                            "previous": ptr.previous,
                        }),
                    )
                })
                .collect();
            json!({ "name": name, "versions": versions, "pointers": pointers })
        })
        .collect();
    json!({
        "images": images,
        "clients_error": recs.err(),
    })
}

/// The node id a forwarding node put in the request, if any.
pub fn forwarded_by(req: &hyper::Request<hyper::body::Incoming>) -> Option<String> {
    req.headers()
        .get(FORWARDED_BY)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(128).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse() {
        let (s, b) =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}extra").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"{}"[..]));
        let (s, b) = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((s, b.as_slice()), (404, &b"abcde"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }

    #[tokio::test]
    async fn a_silent_node_costs_the_bound_only() {
        // Accepted by the kernel, never answered (as a SIGSTOPped node's API).
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let limit = Duration::from_millis(300);
        let t0 = Instant::now();
        let r = exchange(addr, "GET", "/api/v1/health", None, "n2", None, limit).await;
        assert!(matches!(r, Err(PeerError::Timeout(_))), "{r:?}");
        assert!(t0.elapsed() < limit * 3, "{:?}", t0.elapsed());
        drop(l);
        // Nobody listening: refused at once.
        let r = exchange(addr, "GET", "/", None, "n2", None, limit).await;
        assert!(matches!(r, Err(PeerError::Io(_))), "{r:?}");
    }

    #[test]
    fn segments_encode() {
        assert_eq!(encode("iqn.2026-11.lab:pc-07"), "iqn.2026-11.lab%3Apc-07");
        assert_eq!(
            super::super::percent_decode(&encode("a b/c:d%")).unwrap(),
            "a b/c:d%"
        );
    }

    fn rec(initiator: &str, node: &str, boots: u64, live: u32) -> ClientRecord {
        let state = crate::boot::lifecycle::BootState {
            boots,
            live_sessions: live,
            phase: crate::boot::lifecycle::Phase::Os,
            ..Default::default()
        };
        let disk = crate::boot::record::DiskSummary {
            image: "win11@3".into(),
            version: Some(3),
            mode: crate::config::OverlayMode::Volatile,
            lun0: Lun0::Overlay,
            luns: Vec::new(),
        };
        ClientRecord::new("iqn.t:boot", initiator, node, 1, 1_000, disk, &state)
    }

    fn live_row(initiator: &str, node: &str) -> Value {
        json!({"initiator": initiator, "target": "iqn.t:boot", "state": "running",
               "sessions": 1, "node": node, "stale": false})
    }

    #[test]
    fn each_client_once_from_its_owner_else_stale_from_etcd() {
        let owners: BTreeMap<String, String> = [
            ("iqn.x:a", "n1"), // n1 answered
            ("iqn.x:b", "n2"), // n2 did not answer
            ("iqn.x:c", "n3"), // n3 is this node
            ("iqn.x:d", "n4"), // n4 not live (no answer asked)
        ]
        .iter()
        .map(|(i, n)| (i.to_string(), n.to_string()))
        .collect();
        let mut answers = Answers::new();
        // n1 also lists a client it has a disk of but that n3 owns now: not taken from n1.
        answers.insert(
            "n1".into(),
            (
                Ok(json!({"clients": [live_row("IQN.X:A", "n1"), live_row("iqn.x:c", "n1")]})),
                4,
            ),
        );
        answers.insert("n2".into(), (Err("no answer within 1.5s".into()), 1500));
        let recs: BTreeMap<String, ClientRecord> = [
            rec("iqn.x:b", "n2", 4, 1),
            rec("iqn.x:d", "n4", 2, 0),
            rec("iqn.x:e", "n1", 7, 0), // nobody owns it now
        ]
        .into_iter()
        .map(|r| (r.initiator.clone(), r))
        .collect();
        let local = vec![
            live_row("iqn.x:c", "n3"),
            live_row("iqn.x:f", "n3"), // a binding here, never placed: listed, not stale
            live_row("iqn.x:e", "n3"), // nobody owns it, but it has a record: the record speaks
        ];
        let rows = merge("n3", &owners, local, &answers, &recs);
        let by: BTreeMap<String, &Value> = rows.iter().map(|r| (initiator_of(r), r)).collect();
        assert_eq!(rows.len(), 6, "{rows:#?}");
        assert_eq!(by.len(), 6, "each client once: {rows:#?}");
        assert_eq!(by["iqn.x:a"]["node"], "n1");
        assert_eq!(by["iqn.x:a"]["stale"], false);
        assert_eq!(by["iqn.x:a"]["answer_ms"], 4);
        let b = by["iqn.x:b"];
        assert_eq!(
            (b["stale"].clone(), b["owner"].clone()),
            (json!(true), json!("n2"))
        );
        assert!(b["stale_reason"].as_str().unwrap().contains("1.5s"), "{b}");
        assert_eq!(
            (b["boots"].clone(), b["state"].clone()),
            (json!(4), json!("running"))
        );
        assert_eq!(b["version"], 3);
        assert_eq!(by["iqn.x:c"]["node"], "n3", "this node's own row, not n1's");
        let d = by["iqn.x:d"];
        assert_eq!(d["stale"], true);
        assert!(
            d["stale_reason"].as_str().unwrap().contains("not live"),
            "{d}"
        );
        assert_eq!(d["state"], "offline");
        let e = by["iqn.x:e"];
        assert!(e["owner"].is_null(), "{e}");
        assert_eq!(e["node"], "n1", "its last node");
        assert_eq!(e["stale"], true);
        assert_eq!(e["boots"], 7);
        assert_eq!(by["iqn.x:f"]["stale"], false);
    }

    #[test]
    fn a_record_row_says_what_etcd_has() {
        let row = record_row(
            "iqn.x:a",
            None,
            Some("n1"),
            Some("node n1 did not answer".into()),
        );
        assert_eq!(row["owner"], "n1");
        assert_eq!(row["stale"], true);
        assert_eq!(row["state"], "offline");
        let row = record_row("iqn.x:a", None, None, None);
        assert_eq!(row["stale"], false);
        assert!(row["owner"].is_null());
        assert_eq!(row["rbd_recreate_pending"], json!([]));
        // An operator's reset of RBD disks not yet applied (the client not back since).
        let mut r = rec("iqn.x:a", "n1", 3, 0);
        r.state.rbd_recreate = vec![0, 1];
        let row = record_row("iqn.x:a", Some(&r), Some("n1"), None);
        assert_eq!(row["rbd_recreate_pending"], json!([0, 1]), "{row}");
        assert_eq!(row["reset_pending"], false);
    }
}
