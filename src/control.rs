//! The operator control socket: a Unix socket in the state directory (`control.sock`, mode
//! 0600: only the server's user may drive it). One request line per connection, a text
//! answer whose first line is `ok` or `error: ...`.
//!
//! Requests: `clients`, `sessions`, `show INITIATOR`, `reset INITIATOR`,
//! `commit INITIATOR PATH`, `publish INITIATOR IMAGE AUTHOR MESSAGE...`, `image-gc IMAGE`,
//! `next-boot INITIATOR [image=SPEC] [mode=MODE] [clear]`, `reload`.

use crate::boot::{BootTarget, Client, ClientInfo};
use crate::config::Config;
use crate::registry::Registry;
use crate::session::Server;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tracing::{info, warn};

/// File name of the socket inside the state directory.
pub const SOCKET: &str = "control.sock";
/// Longest request line accepted.
const MAX_LINE: usize = 4096;

/// Re-read the configuration and swap the registry: new sessions see the new targets; a
/// plain LUN whose configuration did not change stays the same logical unit (reservations and
/// unit attentions carry over), sessions of a target whose LUNs changed are fenced (unit
/// attention, then asked to log out), and client disks whose binding did not change are
/// carried over with their open overlays.
///
/// In a cluster, the shared configuration in force (from etcd) is laid over the file again.
pub fn reload(server: &Server, config_path: &Path) -> Result<String, String> {
    let shared = server.cluster().and_then(|c| c.shared_config());
    reload_with(server, config_path, shared.as_deref())
}

/// The node's file with the cluster's shared configuration laid over it (docs/scale-out.md,
/// "Shared configuration"); errors say which of the two is wrong.
pub fn load_with_shared(config_path: &Path, shared: Option<&[u8]>) -> Result<Config, String> {
    let Some(shared) = shared else {
        return Config::load(config_path).map_err(|e| e.to_string());
    };
    let local = std::fs::read_to_string(config_path)
        .map_err(|e| format!("{}: {e}", config_path.display()))?;
    let shared = std::str::from_utf8(shared)
        .map_err(|_| "the shared configuration is not UTF-8 text".to_string())?;
    let merged = crate::config::merge_shared(&local, shared)?;
    let base = config_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let label = format!("{} + shared configuration", config_path.display());
    Config::from_yaml(&merged, &label, base).map_err(|e| e.to_string())
}

/// [`reload`] with an explicit shared configuration (None: the file alone).
pub fn reload_with(
    server: &Server,
    config_path: &Path,
    shared: Option<&[u8]>,
) -> Result<String, String> {
    let _one_at_a_time = reload_lock();
    reload_locked(server, config_path, shared)
}

/// Reloads run one at a time: each resolves the catalogue's pointers, builds a registry (slow:
/// S3 manifests) and swaps it in. Two at once (a watch event each, e.g. two racing pushes)
/// could finish out of order and leave the older registry serving, and the older pointer
/// saved as in force (docs/scale-out.md, "Image catalogue").
fn reload_lock() -> std::sync::MutexGuard<'static, ()> {
    static RELOADS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RELOADS.lock().unwrap_or_else(|p| p.into_inner())
}

fn reload_locked(
    server: &Server,
    config_path: &Path,
    shared: Option<&[u8]>,
) -> Result<String, String> {
    let mut config = load_with_shared(config_path, shared)?;
    // Images that follow the cluster's catalogue (`version: latest`, `channel:`) take the
    // versions its pointers name now (or keep theirs when etcd is out of reach).
    let resolved = match server.cluster() {
        Some(c) => Some(c.catalogue().resolve(&mut config)?),
        None => None,
    };
    let old = server.registry();
    let (new, changed) =
        Registry::from_config_reusing(&config, Some(&old)).map_err(|e| e.to_string())?;
    let new = new.with_portals(old.portals().to_vec());
    crate::storage::versions::flat::apply_settings(&config.settings);
    new.adopt_clients(&old);
    let targets = new.targets().count();
    server.set_registry(Arc::new(new));
    if let (Some(c), Some(r)) = (server.cluster(), resolved) {
        c.catalogue().commit(r);
    }
    // A target whose LUNs changed: its sessions from before must not live beside the new
    // logical units (a cluster node would miss the reservation): unit attention, then logout.
    for target in &changed {
        old.fence(target);
        for s in server.sessions().all() {
            if s.target.eq_ignore_ascii_case(target) {
                info!(tsih = s.tsih, target = %target, "LUNs changed by reload: asking the session to log out");
                s.request_logout();
            }
        }
    }
    info!(config = %config_path.display(), targets, "configuration reloaded");
    Ok(format!(
        "reloaded {} ({targets} targets)\n",
        config_path.display()
    ))
}

/// Set or clear a client's next-boot override (the file sync runs on the blocking pool). A
/// reload that swapped the registry meanwhile built its boot target from the files before
/// this one was written: the change is applied to the current boot target too.
pub async fn set_next_boot(
    server: &Server,
    boot: &Arc<BootTarget>,
    initiator: &str,
    req: crate::boot::nextboot::Request,
    by: &str,
) -> Result<(Option<crate::boot::nextboot::NextBoot>, String), crate::boot::nextboot::NextBootError>
{
    use crate::boot::nextboot::NextBootError;
    let now = crate::boot::now_ms();
    let run = |b: Arc<BootTarget>, req: crate::boot::nextboot::Request| {
        let (who, by) = (initiator.to_string(), by.to_string());
        async move {
            tokio::task::spawn_blocking(move || b.set_next_boot(&who, req, &by, now))
                .await
                .map_err(|e| NextBootError::Internal(e.to_string()))?
        }
    };
    let set = run(boot.clone(), req.clone()).await?;
    let set = match server.registry().boot_target(&boot.name) {
        Some(cur) if !Arc::ptr_eq(&cur, boot) => run(cur, req).await?,
        _ => set,
    };
    // In a cluster, the override goes to etcd too: whichever node the client boots on next
    // takes it. The local copy is stored already; a node cut off from etcd says so.
    let mut shared_note = String::new();
    if let Some(c) = server.cluster() {
        let value = set.as_ref().and_then(|nb| serde_json::to_vec(nb).ok());
        if let Err(e) = c.put_next_boot(&boot.name, initiator, value).await {
            warn!(initiator, error = %e, "next-boot override not stored in etcd: only this node knows it");
            shared_note = format!(" (only on this node: etcd: {e})");
        }
    }
    let what = match &set {
        Some(nb) => format!(
            "next boot: image {}, mode {}",
            nb.image.as_deref().unwrap_or("(binding's)"),
            nb.mode
                .map_or_else(|| "(binding's)".to_string(), |m| m.to_string())
        ),
        None => "next boot: override cleared, the binding applies".to_string(),
    };
    let what = what + &shared_note;
    server.metrics().emit(
        "next_boot",
        Some(initiator),
        Some(&boot.name),
        None,
        what.clone(),
    );
    Ok((set, what))
}

/// Serve the control socket until the task is aborted.
pub async fn serve(path: PathBuf, server: Arc<Server>, config_path: Option<PathBuf>) {
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!(socket = %path.display(), error = %e, "control socket unavailable");
            return;
        }
    };
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    info!(socket = %path.display(), "control socket ready");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let server = server.clone();
        let config_path = config_path.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            let mut rd = BufReader::new(rd).take(MAX_LINE as u64);
            if rd.read_line(&mut line).await.is_err() {
                return;
            }
            let answer = match handle(&server, config_path.as_deref(), line.trim()).await {
                Ok(body) => format!("ok\n{body}"),
                Err(e) => format!("error: {e}\n"),
            };
            let _ = wr.write_all(answer.as_bytes()).await;
            let _ = wr.shutdown().await;
        });
    }
}

use tokio::io::AsyncReadExt as _;

fn find_client(
    registry: &Registry,
    initiator: &str,
) -> Result<(Arc<BootTarget>, Arc<Client>), String> {
    for boot in registry.boot_targets() {
        if let Some(c) = boot.client(initiator) {
            return Ok((boot, c));
        }
    }
    // Not seen since the server started: open its disk now (e.g. to reset or commit it).
    for boot in registry.boot_targets() {
        if boot.binding(initiator).is_some() {
            let c = boot.attach(initiator).map_err(|e| e.to_string())?;
            return Ok((boot, c));
        }
    }
    Err(format!("no boot target has a binding for {initiator}"))
}

/// One line per client: the `clients` listing (boots and resets counted separately).
pub fn format_clients(infos: &[ClientInfo]) -> String {
    let mut out = String::from(
        "TARGET\tINITIATOR\tIMAGE\tMODE\tRESET\tPHASE\tSESSIONS\tBOOTS\tRESETS\tWRITTEN\tNEXT-BOOT\n",
    );
    for c in infos {
        let written = c
            .overlay
            .as_ref()
            .map_or("-".to_string(), |s| s.bytes_written.to_string());
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            c.target,
            c.initiator,
            c.image,
            c.mode,
            c.reset_policy,
            c.phase,
            c.sessions,
            c.boots,
            c.resets,
            written,
            next_boot_short(c)
        );
    }
    out
}

/// The next-boot column: `IMAGE/MODE` of the operator's override (`*` for the binding's),
/// `-` without one.
fn next_boot_short(c: &ClientInfo) -> String {
    match &c.next_boot {
        Some(nb) => format!(
            "{}/{}",
            nb.image.as_deref().unwrap_or("*"),
            nb.mode.map_or_else(|| "*".to_string(), |m| m.to_string())
        ),
        None => "-".into(),
    }
}

/// UTC time of a millisecond timestamp, `YYYY-MM-DD HH:MM:SS` (no time zone database).
pub fn utc(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(ms / 1000);
    let s = humantime::format_rfc3339_seconds(t).to_string();
    s.trim_end_matches('Z').replacen('T', " ", 1)
}

/// The `show` detail of one client, with its boot history (every reset and keep, and why).
pub fn format_client(c: &ClientInfo) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "initiator: {}", c.initiator);
    let _ = writeln!(out, "target: {}", c.target);
    let _ = writeln!(out, "image: {}", c.image);
    if let Some(v) = c.version {
        let _ = writeln!(out, "version: {v}");
    }
    if let Some(n) = c.next_version {
        let how = match c.mode {
            crate::config::OverlayMode::Persistent | crate::config::OverlayMode::Install => {
                "the binding names it; this persistent disk stays on its version until \
                 `diskless client reset`"
            }
            _ => "taken at the client's next boot",
        };
        let _ = writeln!(out, "next version: {n} ({how})");
    }
    let _ = writeln!(out, "mode: {}", c.mode);
    if let Some(nb) = &c.next_boot {
        let _ = writeln!(
            out,
            "next-boot override: image {}, mode {} (set {} UTC by {}; kept until cleared)",
            nb.image.as_deref().unwrap_or("of the binding"),
            nb.mode
                .map_or_else(|| "of the binding".to_string(), |m| m.to_string()),
            utc(nb.since_ms),
            nb.by
        );
    }
    if let Some((image, mode)) = &c.next_disk {
        let _ = writeln!(out, "next boot takes: {image} in {mode} mode");
    }
    let _ = writeln!(out, "reset: {}", c.reset_policy);
    let _ = writeln!(out, "phase: {}", c.phase);
    let _ = writeln!(out, "sessions: {}", c.sessions);
    let _ = writeln!(out, "boots: {}", c.boots);
    let _ = writeln!(out, "resets: {}", c.resets);
    let _ = writeln!(out, "firmware ISIDs: {}", c.firmware_isids.join(" "));
    let _ = writeln!(out, "OS ISIDs (this boot): {}", c.os_isids.join(" "));
    if c.last_activity_ms > 0 {
        let _ = writeln!(out, "last activity: {} UTC", utc(c.last_activity_ms));
    }
    if let Some(r) = &c.last_reset_reason {
        let _ = writeln!(out, "last reset: {r}");
    }
    if !c.rbd_recreate_pending.is_empty() {
        let _ = writeln!(
            out,
            "reset pending at next login ({}): the disk in RBD is removed and cloned again from its image",
            crate::session::lun_list(&c.rbd_recreate_pending)
        );
    }
    if c.committed {
        let _ = writeln!(out, "committed: yes (published since its last boot)");
    }
    if let Some(d) = &c.overlay_dir {
        let _ = writeln!(out, "overlay: {}", d.display());
    }
    if let Some(s) = &c.overlay {
        let _ = writeln!(out, "chunk size: {}", s.chunk_size);
        let _ = writeln!(out, "chunks written: {}", s.chunks_written);
        let _ = writeln!(out, "bytes written: {}", s.bytes_written);
        let _ = writeln!(out, "chunks unmapped: {}", s.chunks_zeroed);
        let _ = writeln!(out, "journal bytes: {}", s.journal_bytes);
    }
    if c.disks.len() > 1 {
        let _ = writeln!(out, "disks:");
        for d in &c.disks {
            let version = d.version.map(|v| format!("@{v}")).unwrap_or_default();
            let next = d
                .next_version
                .map(|v| format!(" (next: @{v})"))
                .unwrap_or_default();
            let written = d
                .overlay
                .as_ref()
                .map_or("-".to_string(), |s| s.bytes_written.to_string());
            let _ = writeln!(
                out,
                "  LUN {}: {}{version}{next} {} written {written}{}",
                d.lun,
                d.image,
                d.mode,
                d.overlay_dir
                    .as_ref()
                    .map(|p| format!(" overlay {}", p.display()))
                    .unwrap_or_default()
            );
        }
    }
    let _ = writeln!(out, "history (oldest first):");
    for h in &c.history {
        let _ = writeln!(
            out,
            "  {} UTC  boot {}  {}: {}",
            utc(h.at_ms),
            h.boot,
            h.verdict,
            h.reason
        );
    }
    out
}

async fn handle(server: &Server, config_path: Option<&Path>, line: &str) -> Result<String, String> {
    let mut words = line.split_whitespace().peekable();
    let cmd = words.next().unwrap_or("");
    // `CMD --lun N ...`: reset, commit and publish act on that disk (LUN 0 by default).
    let lun: Option<u16> = if words.peek() == Some(&"--lun") {
        words.next();
        Some(
            words
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or("--lun takes a LUN number")?,
        )
    } else {
        None
    };
    let registry = server.registry();
    match cmd {
        "clients" => {
            let infos: Vec<ClientInfo> = registry
                .boot_targets()
                .iter()
                .flat_map(|b| b.clients().into_iter().map(move |c| b.info(&c)))
                .collect();
            Ok(format_clients(&infos))
        }
        "sessions" => {
            let mut out = String::from("TSIH\tINITIATOR\tISID\tTARGET\n");
            let mut all = server.sessions().all();
            all.sort_by_key(|s| s.tsih);
            for s in all {
                let isid: String = s.isid.iter().map(|b| format!("{b:02x}")).collect();
                let _ = writeln!(out, "{}\t{}\t{}\t{}", s.tsih, s.initiator, isid, s.target);
            }
            Ok(out)
        }
        "show" => {
            let who = words.next().ok_or("usage: show INITIATOR")?;
            let (boot, c) = find_client(&registry, who)?;
            Ok(format_client(&boot.info(&c)))
        }
        "reset" => {
            let who = words.next().ok_or("usage: reset INITIATOR")?;
            let (boot, c) = find_client(&registry, who)?;
            let scope = match lun {
                Some(n) if !c.lun_numbers().contains(&n) => {
                    return Err(format!("client {} has no LUN {n}", c.initiator))
                }
                Some(n) => crate::boot::ResetScope::Lun(n),
                None => crate::boot::ResetScope::Operator,
            };
            let done = server
                .reset_client_scope(&boot.name, &c.initiator, scope)
                .await
                .map_err(|e| e.to_string())?;
            let mut out = match lun {
                Some(n) => format!("reset {} LUN {n}\n", c.initiator),
                None => format!("reset {}\n", c.initiator),
            };
            if !done.rbd_recreate.is_empty() {
                let _ = writeln!(
                    out,
                    "RBD disk(s) {} recreated from the image at the next login (recorded in etcd)",
                    crate::session::lun_list(&done.rbd_recreate)
                );
            }
            Ok(out)
        }
        "commit" => {
            let who = words.next().ok_or("usage: commit INITIATOR PATH")?;
            let path = words.next().ok_or("usage: commit INITIATOR PATH")?;
            let (_, c) = find_client(&registry, who)?;
            let path = PathBuf::from(path);
            let target = path.clone();
            let n = lun.unwrap_or(0);
            tokio::task::spawn_blocking(move || c.commit_lun_to(n, &target))
                .await
                .map_err(|e| e.to_string())??;
            Ok(format!("committed to {}\n", path.display()))
        }
        "publish" => {
            let usage = "usage: publish INITIATOR IMAGE AUTHOR MESSAGE...";
            let who = words.next().ok_or(usage)?;
            let image = words.next().ok_or(usage)?.to_string();
            let author = words.next().ok_or(usage)?.to_string();
            let message = words.collect::<Vec<_>>().join(" ");
            let (_, c) = find_client(&registry, who)?;
            let state_dir = registry.state_dir().to_path_buf();
            let stamp = crate::storage::versions::Stamp {
                message,
                author,
                time_ms: crate::boot::now_ms(),
            };
            let img = image.clone();
            let n = lun.unwrap_or(0);
            let v = tokio::task::spawn_blocking(move || c.publish_lun(n, &state_dir, &img, &stamp))
                .await
                .map_err(|e| e.to_string())??;
            let mut out = format!("published {image}@{v}\n");
            if let Some(path) = config_path {
                // Bindings following `latest` now name the new version (next boots).
                out.push_str(&reload(server, path)?);
            }
            Ok(out)
        }
        "image-gc" => {
            let image = words.next().ok_or("usage: image-gc IMAGE")?.to_string();
            let mut pins = crate::boot::versions_in_use(registry.state_dir(), &image)
                .into_keys()
                .collect::<std::collections::BTreeSet<u64>>();
            // Versions the bindings name now, and those running clients booted or will
            // take at their next boot.
            for b in registry.boot_targets() {
                for bp in b.bindings.iter().chain(b.default.iter()) {
                    let disks = std::iter::once(&bp.image).chain(bp.disks.iter().map(|d| &d.image));
                    for im in disks.filter(|im| im.name == image) {
                        pins.extend(im.version);
                    }
                }
                for c in b.clients() {
                    for d in c.disk_infos().into_iter().filter(|d| d.image == image) {
                        pins.extend(d.version);
                        pins.extend(d.next_version);
                    }
                }
                for i in b.override_images() {
                    if i.name == image {
                        pins.extend(i.version);
                    }
                }
            }
            let state_dir = registry.state_dir().to_path_buf();
            let r = tokio::task::spawn_blocking(move || {
                crate::storage::versions::Images::new(&state_dir).gc(&image, &pins)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            Ok(format_gc(&r))
        }
        "next-boot" => {
            let usage = "usage: next-boot INITIATOR [image=SPEC] [mode=MODE] [clear]";
            let who = words.next().ok_or(usage)?;
            let (mut image, mut mode, mut clear) = (None, None, false);
            for w in words {
                match w.split_once('=') {
                    Some(("image", v)) => image = Some(v),
                    Some(("mode", v)) => mode = Some(v),
                    None if w == "clear" => clear = true,
                    _ => return Err(format!("unknown argument {w:?}; {usage}")),
                }
            }
            let req =
                crate::boot::nextboot::request(image, mode, clear).map_err(|e| e.to_string())?;
            let (boot, c) = find_client(&registry, who)?;
            let name = c.initiator.clone();
            let (_, what) = set_next_boot(server, &boot, &name, req, "control socket")
                .await
                .map_err(|e| e.to_string())?;
            let mut out = format!("{}: {what}\n", c.initiator);
            let info = boot.info(&c);
            match &info.next_disk {
                Some((image, mode)) => {
                    let _ = writeln!(
                        out,
                        "next boot takes: {image} in {mode} mode (the running boot keeps its disk)"
                    );
                    if matches!(
                        info.mode,
                        crate::config::OverlayMode::Persistent
                            | crate::config::OverlayMode::Install
                    ) {
                        out.push_str("the persistent disk is kept on the server (kept/ in the client's directory), never discarded; used again if the client comes back to it in persistent mode\n");
                    }
                }
                None => out.push_str("next boot takes: the disk it is on now\n"),
            }
            Ok(out)
        }
        "reload" => {
            let path = config_path.ok_or("quick mode has no configuration file to reload")?;
            reload(server, path)
        }
        "" => Err("empty request".into()),
        other => Err(format!("unknown request {other:?}")),
    }
}

/// What a garbage collection did, for the operator.
pub fn format_gc(r: &crate::storage::versions::GcReport) -> String {
    let list = |v: &[u64]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "removed versions: {}\nremoved files: {}\nkept versions: {}\n",
        if r.removed_versions.is_empty() {
            "none".into()
        } else {
            list(&r.removed_versions)
        },
        if r.removed_files.is_empty() {
            "none".into()
        } else {
            r.removed_files.join(" ")
        },
        list(&r.kept)
    )
}

/// The client requests (`show`, `reset`, `commit`, `publish`) without a running server.
pub async fn handle_offline(server: &Server, line: &str) -> Result<String, String> {
    handle(server, None, line).await
}

/// Client side: send one request, return the answer body (after `ok`) or the error.
pub fn request(socket: &Path, line: &str) -> std::io::Result<Result<String, String>> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    s.write_all(line.as_bytes())?;
    s.write_all(b"\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(match answer.strip_prefix("ok\n") {
        Some(body) => Ok(body.to_string()),
        None => Err(answer.trim().trim_start_matches("error: ").to_string()),
    })
}

/// The cluster's shared records, applied on this node: next-boot overrides set on any node,
/// and the shared configuration (reloaded as `reload` does; an invalid one is refused with
/// its reason and the running configuration stays).
pub struct ClusterShared {
    server: Arc<Server>,
    config_path: PathBuf,
}

impl ClusterShared {
    pub fn new(server: Arc<Server>, config_path: PathBuf) -> Arc<Self> {
        Arc::new(ClusterShared {
            server,
            config_path,
        })
    }
}

impl crate::cluster::Shared for ClusterShared {
    fn next_boot(&self, target: &str, initiator: &str, value: Option<&[u8]>) {
        use crate::boot::nextboot::{NextBoot, Request};
        let want: Option<NextBoot> = match value.map(serde_json::from_slice::<NextBoot>) {
            None => None,
            Some(Ok(nb)) => Some(nb),
            Some(Err(e)) => {
                warn!(target, initiator, error = %e, "next-boot override in etcd is malformed: ignored");
                return;
            }
        };
        let Some(boot) = self.server.registry().boot_target(target) else {
            return;
        };
        if boot.next_boot(initiator) == want {
            return;
        }
        let (who, tname) = (initiator.to_string(), target.to_string());
        tokio::task::spawn_blocking(move || {
            let (req, by, since) = match &want {
                Some(nb) => (
                    Request::Set {
                        image: nb.image.clone(),
                        mode: nb.mode,
                    },
                    nb.by.clone(),
                    nb.since_ms,
                ),
                None => (Request::Clear, "cluster".to_string(), crate::boot::now_ms()),
            };
            match boot.set_next_boot(&who, req, &by, since) {
                Ok(nb) => info!(target = %tname, initiator = %who, set = nb.is_some(),
                    "next-boot override from the cluster taken"),
                Err(e) => warn!(target = %tname, initiator = %who, error = %e,
                    "next-boot override from the cluster cannot be taken here"),
            }
        });
    }

    fn catalogue(&self) {
        let (server, path) = (self.server.clone(), self.config_path.clone());
        tokio::task::spawn_blocking(move || {
            let Some(cluster) = server.cluster().cloned() else {
                return;
            };
            // Whether the pointers moved is asked with the reload lock held: a reload in
            // flight may already serve what this event says.
            let _one_at_a_time = reload_lock();
            let shared = cluster.shared_config();
            let moves = load_with_shared(&path, shared.as_deref())
                .map(|c| cluster.catalogue().moves(&c))
                .unwrap_or(false);
            if !moves {
                return;
            }
            match reload_locked(&server, &path, shared.as_deref()) {
                Ok(msg) => info!("image catalogue changed: {}", msg.trim()),
                Err(e) => tracing::error!(error = %e,
                    "image catalogue changed but the reload failed; the running versions stay"),
            }
        });
    }

    fn config(&self, yaml: Option<Vec<u8>>) {
        let (server, path) = (self.server.clone(), self.config_path.clone());
        tokio::task::spawn_blocking(move || match reload_with(&server, &path, yaml.as_deref()) {
            Ok(msg) => {
                if let Some(c) = server.cluster() {
                    c.accept_shared_config(yaml.clone());
                }
                info!(
                    shared = yaml.is_some(),
                    "shared configuration from etcd applied: {}",
                    msg.trim()
                );
            }
            Err(e) => tracing::error!(error = %e,
                "shared configuration from etcd refused; the running configuration stays"),
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::boot::ClientInfo;

    fn info() -> ClientInfo {
        ClientInfo {
            initiator: "iqn.x:c1".into(),
            target: "iqn.t:boot".into(),
            image: "golden".into(),
            version: None,
            next_version: None,
            mode: crate::config::OverlayMode::Persistent,
            next_disk: None,
            next_boot: None,
            reset_policy: Default::default(),
            sessions: 0,
            boots: 2,
            resets: 1,
            phase: Default::default(),
            firmware_isids: Vec::new(),
            os_isids: Vec::new(),
            last_activity_ms: 0,
            last_reset_reason: Some("operator".into()),
            rbd_recreate_pending: Vec::new(),
            committed: false,
            history: Vec::new(),
            overlay: None,
            overlay_dir: None,
            disks: Vec::new(),
        }
    }

    #[test]
    fn show_says_which_rbd_disks_a_reset_recreates() {
        let text = super::format_client(&info());
        assert!(!text.contains("reset pending"), "{text}");
        let mut i = info();
        i.rbd_recreate_pending = vec![0, 1];
        let text = super::format_client(&i);
        assert!(
            text.lines()
                .any(|l| l.starts_with("reset pending at next login (LUN 0, 1): ")),
            "{text}"
        );
    }

    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_796_083_200_000), "2026-12-01 00:00:00");
        assert_eq!(
            super::utc(951_782_400_000 + 3_723_000),
            "2000-02-29 01:02:03"
        );
    }
}
