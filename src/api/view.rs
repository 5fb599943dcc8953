//! The JSON views of the API: read-only snapshots of the server, never a secret (CHAP
//! credentials are reported as "chap" / "mutual_chap", nothing more).
//!
//! A client's `state` comes from its lifecycle (`boot::lifecycle`): `offline` (no session),
//! `firmware` (a boot began, only firmware logins so far), `running` (the OS took over);
//! `phase` is the lifecycle's own word. [`client_json`] is the one place that maps them.

use super::{Api, ApiError};
use crate::boot::{BootTarget, ClientInfo};
use crate::metrics::{IoTotals, ScrapeState, SessionInfo};
use crate::session::Server;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Rates per client (bytes/s, commands/s), updated by [`sample`] once a second.
#[derive(Debug, Default)]
pub struct Rates(Mutex<RateState>);

#[derive(Debug, Default)]
struct RateState {
    /// (target, initiator) lowercased -> (totals then, when, rates).
    last: HashMap<(String, String), (IoTotals, Instant, Rate)>,
    /// Boots seen per client at the previous sample (to report resets as events).
    boots: HashMap<(String, String), u64>,
}

/// One client's throughput now.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Rate {
    pub read_bps: f64,
    pub write_bps: f64,
    pub iops: f64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The rate between two samples (pure).
pub fn rate(before: IoTotals, after: IoTotals, dt: Duration) -> Rate {
    let s = dt.as_secs_f64();
    if s <= 0.0 {
        return Rate::default();
    }
    let d = |a: u64, b: u64| a.saturating_sub(b) as f64 / s;
    Rate {
        read_bps: d(after.read_bytes, before.read_bytes),
        write_bps: d(after.write_bytes, before.write_bytes),
        iops: d(after.commands, before.commands),
    }
}

impl Rates {
    fn get(&self, target: &str, initiator: &str) -> Rate {
        lock(&self.0)
            .last
            .get(&(target.to_ascii_lowercase(), initiator.to_ascii_lowercase()))
            .map_or_else(Rate::default, |(_, _, r)| *r)
    }
}

/// Every second: client rates from the counters, and a `reset` event when a client's boot
/// count moves (the server's reboot rule discarded its volatile disk).
pub async fn sample(api: Arc<Api>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = Instant::now();
        let metrics = api.server.metrics();
        let registry = api.server.registry();
        let mut resets = Vec::new();
        {
            let mut st = lock(&api.rates.0);
            for boot in registry.boot_targets() {
                for c in boot.clients() {
                    let key = (boot.name.to_ascii_lowercase(), c.initiator.clone());
                    let totals = metrics.client_totals(&boot.name, &c.initiator);
                    let r = match st.last.get(&key) {
                        Some((before, then, _)) => rate(*before, totals, now - *then),
                        None => Rate::default(),
                    };
                    st.last.insert(key.clone(), (totals, now, r));
                    let boots = c.info().boots;
                    if let Some(prev) = st.boots.insert(key, boots) {
                        if boots > prev {
                            resets.push((boot.name.clone(), c.initiator.clone(), prev, boots));
                        }
                    }
                }
            }
        }
        for (target, initiator, prev, now) in resets {
            metrics.emit(
                "reset",
                Some(&initiator),
                Some(&target),
                None,
                format!("disk reset: boot {prev} -> {now}"),
            );
        }
    }
}

/// What the scrape reads (crate::metrics::ScrapeState) from the running server.
pub fn scrape_state(server: &Server) -> ScrapeState {
    let registry = server.registry();
    ScrapeState {
        sessions_open: server.sessions().len(),
        connections_open: server.connections_open(),
        clients: registry
            .boot_targets()
            .iter()
            .flat_map(|b| b.clients())
            .map(|c| c.info())
            .collect(),
        images: image_list(server)
            .into_iter()
            .map(|i| (i.name, i.path, i.size))
            .collect(),
        state_dir: Some(registry.state_dir().to_path_buf()),
        object_versions: registry
            .s3_stores()
            .iter()
            .map(|s| (s.key().to_string(), s.stats()))
            .collect(),
        chunk_cache: registry.chunk_cache().map(|c| c.stats()),
        cluster: server.cluster().map(|c| {
            let view = c.view();
            crate::metrics::ClusterState {
                registered: c.registered(),
                nodes: view.nodes.len(),
                clients: view
                    .owners
                    .values()
                    .filter(|o| o.as_str() == c.node_id())
                    .count(),
                draining: view.is_draining(c.node_id()),
            }
        }),
    }
}

struct ImageRow {
    name: String,
    path: String,
    size: u64,
    block_size: u32,
    kind: &'static str,
    used_by: Vec<String>,
}

/// Golden images (bound by some boot target) and the images of plain LUNs.
fn image_list(server: &Server) -> Vec<ImageRow> {
    let registry = server.registry();
    let mut golden: BTreeMap<String, ImageRow> = BTreeMap::new();
    for boot in registry.boot_targets() {
        for b in boot.bindings.iter().chain(boot.default.iter()) {
            let row = golden
                .entry(b.image.name.clone())
                .or_insert_with(|| ImageRow {
                    name: b.image.name.clone(),
                    path: b.image.path.display().to_string(),
                    size: b.image.store.size(),
                    block_size: b.image.block_size,
                    kind: "golden",
                    used_by: Vec::new(),
                });
            if !row.used_by.contains(&boot.name) {
                row.used_by.push(boot.name.clone());
            }
        }
    }
    let mut out: Vec<ImageRow> = golden.into_values().collect();
    for t in registry.targets() {
        for l in &t.luns {
            out.push(ImageRow {
                name: format!("{}/{}", t.name, l.lun),
                path: l.image.display().to_string(),
                size: std::fs::metadata(&l.image).map_or(0, |m| m.len()),
                block_size: l.block_size,
                kind: "lun",
                used_by: vec![t.name.clone()],
            });
        }
    }
    out
}

pub fn images(api: &Api) -> Value {
    let rows: Vec<Value> = image_list(&api.server)
        .into_iter()
        .map(|i| {
            json!({
                "name": i.name,
                "path": i.path,
                "size": i.size,
                "block_size": i.block_size,
                "kind": i.kind,
                "used_by": i.used_by,
            })
        })
        .collect();
    json!({ "images": rows })
}

fn isid_hex(isid: &[u8; 6]) -> String {
    isid.iter().map(|b| format!("{b:02x}")).collect()
}

fn session_json(s: &SessionInfo) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    json!({
        "tsih": s.tsih,
        "initiator": s.initiator,
        "target": s.target,
        "isid": isid_hex(&s.isid),
        "firmware": s.firmware,
        "peer": s.peer.to_string(),
        "since_ms": s.since_ms,
        "read_bytes": s.read_bytes.load(Relaxed),
        "write_bytes": s.write_bytes.load(Relaxed),
        "commands": s.commands.load(Relaxed),
    })
}

pub fn sessions(api: &Api) -> Value {
    let rows: Vec<Value> = api
        .server
        .metrics()
        .sessions()
        .iter()
        .map(|s| session_json(s))
        .collect();
    json!({ "sessions": rows })
}

/// The sessions of one client.
fn client_sessions(api: &Api, target: &str, initiator: &str) -> Vec<Arc<SessionInfo>> {
    api.server
        .metrics()
        .sessions()
        .into_iter()
        .filter(|s| {
            s.target.eq_ignore_ascii_case(target) && s.initiator.eq_ignore_ascii_case(initiator)
        })
        .collect()
}

/// A client as the API shows it: `info` when its disk is open, else only its binding.
fn client_json(api: &Api, boot: &BootTarget, initiator: &str, info: Option<&ClientInfo>) -> Value {
    let sessions = client_sessions(api, &boot.name, initiator);
    let state = match (sessions.is_empty(), info.map(|i| i.phase)) {
        (true, _) => "offline",
        (false, Some(crate::boot::lifecycle::Phase::Firmware)) => "firmware",
        // No lifecycle yet (disk not open): judge by the sessions' ISIDs.
        (false, None) if sessions.iter().all(|s| s.firmware) => "firmware",
        (false, _) => "running",
    };
    let since = sessions.iter().map(|s| s.since_ms).min();
    let ip = sessions
        .iter()
        .max_by_key(|s| s.since_ms)
        .map(|s| s.peer.ip().to_string());
    let binding = boot.binding(initiator);
    let totals = api.server.metrics().client_totals(&boot.name, initiator);
    let rate = api.rates.get(&boot.name, initiator);
    let (image, mode) = match (info, binding) {
        (Some(i), _) => (i.image.clone(), i.mode.to_string()),
        (None, Some(b)) => (b.image.name.clone(), b.mode.to_string()),
        (None, None) => (String::new(), String::new()),
    };
    json!({
        "initiator": initiator,
        "target": boot.name,
        "state": state,
        "since_ms": since,
        "image": image,
        "mode": mode,
        "mac": binding.and_then(|b| b.mac.clone()),
        "ip": ip,
        "sessions": sessions.len(),
        "boots": info.map_or(0, |i| i.boots),
        "phase": info.map(|i| i.phase.to_string()),
        "resets": info.map_or(0, |i| i.resets),
        "last_reset_reason": info.and_then(|i| i.last_reset_reason.clone()),
        // LUNs whose disk in RBD an operator's reset left to recreate at the next login.
        "rbd_recreate_pending": info.map(|i| i.rbd_recreate_pending.clone()).unwrap_or_default(),
        "read_bytes": totals.read_bytes,
        "write_bytes": totals.write_bytes,
        "commands": totals.commands,
        "read_bps": rate.read_bps.round(),
        "write_bps": rate.write_bps.round(),
        "iops": (rate.iops * 10.0).round() / 10.0,
        "overlay": info.and_then(|i| i.overlay.as_ref()).map(|o| json!({
            "bytes_written": o.bytes_written,
            "chunk_size": o.chunk_size,
            "chunks_written": o.chunks_written,
            "chunks_unmapped": o.chunks_zeroed,
            "journal_bytes": o.journal_bytes,
        })),
        "disk_open": info.is_some(),
        "next_boot": boot.next_boot(initiator).map(|nb| json!({
            "image": nb.image,
            "mode": nb.mode.map(|m| m.to_string()),
            "since": super::audit::rfc3339(nb.since_ms),
            "since_ms": nb.since_ms,
            "by": nb.by,
        })),
        "next_disk": info.and_then(|i| i.next_disk.as_ref()).map(|(image, mode)| json!({
            "image": image,
            "mode": mode.to_string(),
        })),
    })
}

/// Every client: disks opened since the server started, plus bindings with an exact
/// initiator name (known machines that have not booted yet).
pub fn clients(api: &Api) -> Value {
    let registry = api.server.registry();
    let mut rows = Vec::new();
    for boot in registry.boot_targets() {
        let mut seen = std::collections::HashSet::new();
        for c in boot.clients() {
            seen.insert(c.initiator.clone());
            rows.push(client_json(api, &boot, &c.initiator, Some(&c.info())));
        }
        for b in &boot.bindings {
            if let Some(name) = b.script_initiator() {
                if seen.insert(name.clone()) {
                    rows.push(client_json(api, &boot, &name, None));
                }
            }
        }
    }
    json!({ "clients": rows })
}

/// The boot target and canonical name of a client: one whose disk the server has opened, or
/// one a binding names exactly. A name only a glob or the default binding covers is not a
/// client until it logs in (an API call never creates a disk for an invented name).
pub fn find_client(api: &Api, initiator: &str) -> Result<(Arc<BootTarget>, String), ApiError> {
    let registry = api.server.registry();
    let wanted = initiator.to_ascii_lowercase();
    let targets = registry.boot_targets();
    for boot in &targets {
        if boot.client(&wanted).is_some() {
            return Ok((boot.clone(), wanted));
        }
    }
    for boot in &targets {
        if boot
            .bindings
            .iter()
            .any(|b| b.script_initiator().as_deref() == Some(wanted.as_str()))
        {
            return Ok((boot.clone(), wanted));
        }
    }
    Err(ApiError::NotFound(format!(
        "no client {initiator} (not seen since the server started, and no binding names it)"
    )))
}

/// One client with its timeline (its recent events, oldest first).
pub fn client(api: &Api, initiator: &str) -> Result<Value, ApiError> {
    let (boot, name) = find_client(api, initiator)?;
    let info = boot.client(&name).map(|c| c.info());
    let mut v = client_json(api, &boot, &name, info.as_ref());
    let timeline: Vec<Value> = api
        .server
        .metrics()
        .recent_events()
        .into_iter()
        .filter(|e| {
            e.initiator
                .as_deref()
                .is_some_and(|i| i.eq_ignore_ascii_case(&name))
        })
        .map(|e| serde_json::to_value(e).unwrap_or(Value::Null))
        .collect();
    let sessions: Vec<Value> = client_sessions(api, &boot.name, &name)
        .iter()
        .map(|s| session_json(s))
        .collect();
    v["timeline"] = Value::Array(timeline);
    v["session_list"] = Value::Array(sessions);
    v["overlay_dir"] = json!(info
        .as_ref()
        .and_then(|i| i.overlay_dir.as_ref())
        .map(|d| d.display().to_string()));
    // Every disk of the client, LUN 0 first (docs/overlays.md, "Several disks per client").
    v["disks"] = Value::Array(
        info.as_ref()
            .map(|i| {
                i.disks
                    .iter()
                    .map(|d| {
                        json!({
                            "lun": d.lun,
                            "image": d.image,
                            "version": d.version,
                            "next_version": d.next_version,
                            "mode": d.mode.to_string(),
                            "bytes_written": d.overlay.as_ref().map(|o| o.bytes_written),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default(),
    );
    Ok(v)
}

pub fn targets(api: &Api) -> Value {
    let registry = api.server.registry();
    let auth = |c: Option<&crate::login::ChapCredentials>| match c {
        None => "none",
        Some(c) if c.mutual.is_some() => "mutual_chap",
        Some(_) => "chap",
    };
    let rows: Vec<Value> = registry
        .targets()
        .map(|t| {
            let boot = registry.boot_target(&t.name);
            let luns: Vec<Value> = t
                .luns
                .iter()
                .map(|l| {
                    json!({
                        "lun": l.lun,
                        "image": l.image.display().to_string(),
                        "read_only": l.read_only,
                        "block_size": l.block_size,
                        "size": std::fs::metadata(&l.image).map_or(0, |m| m.len()),
                    })
                })
                .collect();
            let bindings: Vec<Value> = boot
                .as_ref()
                .map(|b| {
                    b.bindings
                        .iter()
                        .map(|bd| {
                            json!({
                                "initiator": bd.initiator,
                                "mac": bd.mac,
                                "image": bd.image.name,
                                "mode": bd.mode.to_string(),
                                "auth": auth(bd.chap.as_ref()),
                                "os": bd.os.to_string(),
                                "disks": bd.disks.iter().map(|d| json!({
                                    "lun": d.lun,
                                    "image": d.image.name,
                                    "mode": d.mode.to_string(),
                                })).collect::<Vec<_>>(),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            let sessions = api
                .server
                .metrics()
                .sessions()
                .iter()
                .filter(|s| s.target.eq_ignore_ascii_case(&t.name))
                .count();
            json!({
                "name": t.name,
                "alias": t.alias,
                "kind": if boot.is_some() { "boot" } else { "luns" },
                "initiators": t.initiators,
                "auth": auth(t.chap.as_ref()),
                "luns": luns,
                "bindings": bindings,
                "default": boot.as_ref().and_then(|b| b.default.as_ref()).map(|d| json!({
                    "image": d.image.name,
                    "mode": d.mode.to_string(),
                })),
                "clients": boot.as_ref().map_or(0, |b| b.clients().len()),
                "sessions": sessions,
            })
        })
        .collect();
    json!({ "targets": rows })
}

pub fn health(api: &Api) -> Value {
    let registry = api.server.registry();
    json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": api.server.metrics().uptime().as_secs(),
        "sessions": api.server.sessions().len(),
        "connections": api.server.connections_open(),
        "targets": registry.targets().count(),
        "clients": registry.boot_targets().iter().map(|b| b.clients().len()).sum::<usize>(),
        "portals": registry.portals().iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "config": api.config_path.as_ref().map(|p| p.display().to_string()),
    })
}

pub fn recent_events(api: &Api) -> Value {
    json!({ "events": api.server.metrics().recent_events() })
}

/// The `stats` event of the stream: every client's state and rates.
pub fn stats(api: &Api) -> Value {
    let all = clients(api);
    let rows: Vec<Value> = all["clients"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    json!({
                        "initiator": c["initiator"],
                        "target": c["target"],
                        "state": c["state"],
                        "sessions": c["sessions"],
                        "boots": c["boots"],
                        "read_bps": c["read_bps"],
                        "write_bps": c["write_bps"],
                        "iops": c["iops"],
                        "overlay_bytes": c["overlay"]["bytes_written"],
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "time_ms": crate::metrics::unix_ms(),
        "sessions": api.server.sessions().len(),
        "clients": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_from_totals() {
        let a = IoTotals {
            read_bytes: 0,
            write_bytes: 100,
            commands: 10,
        };
        let b = IoTotals {
            read_bytes: 4096,
            write_bytes: 100,
            commands: 30,
        };
        let r = rate(a, b, Duration::from_secs(2));
        assert_eq!(
            r,
            Rate {
                read_bps: 2048.0,
                write_bps: 0.0,
                iops: 10.0
            }
        );
        assert_eq!(rate(b, a, Duration::from_secs(1)).iops, 0.0);
        assert_eq!(rate(a, b, Duration::ZERO), Rate::default());
    }
}
