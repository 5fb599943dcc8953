//! Sessions and connections (tokio): the only layer that touches sockets. One task per
//! connection reads and dispatches PDUs, SCSI commands run on the blocking pool, and a writer
//! task per connection sends responses as they complete.

mod cmdsn;
mod connection;
mod io;
mod table;
mod task;

pub use cmdsn::{sn_le, sn_lt, Admit, CmdWindow};
pub use io::{FrameReader, ReadError};
pub use table::{SessionHandle, SessionTable};
pub use task::{Completion, DataOutError, Residual, WriteCollector};

use crate::boot::lifecycle::End;
use crate::boot::{mac_initiator, AttachError, BootTarget, Client};
use crate::login::OurParams;
use crate::registry::Registry;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

/// Runtime settings of the iSCSI server (the `settings:` section of targets.yaml).
#[derive(Debug, Clone)]
pub struct Settings {
    /// What we offer in negotiation.
    pub params: OurParams,
    /// Send a NOP-In ping on a connection idle this long (None: never).
    pub nop_in_interval: Option<Duration>,
    /// Drop a connection whose ping went unanswered this long (None: never; iPXE never answers
    /// pings, so a firmware session must not be dropped for that alone).
    pub nop_in_timeout: Option<Duration>,
    /// A login must complete within this time.
    pub login_timeout: Duration,
    /// At most this many sessions at once (further logins get status 0x0302).
    pub max_sessions: usize,
    /// CmdSN window per session: MaxCmdSN = ExpCmdSN + cmd_window - 1.
    pub cmd_window: u32,
    /// Tie-breaker of the client lifecycle for ambiguous evidence only (an unknown ISID
    /// after nothing of the client was live this long; docs/overlays.md).
    pub reboot_gap: Duration,
    /// Open TCP connections at most (logged in or not); further ones are closed at once.
    pub max_connections: usize,
    /// Bytes one connection may hold (queued responses, data of running commands) before the
    /// server stops reading its PDUs until they drain.
    pub max_buffered_bytes: usize,
    /// Close a logged-in connection that sent nothing for this long (None: never; boot
    /// firmware sessions are idle for the whole OS lifetime).
    pub idle_timeout: Option<Duration>,
}

impl Settings {
    /// The runtime settings of a `settings:` section (0 = never, for the optional times).
    pub fn from_config(c: &crate::config::SettingsConfig) -> Settings {
        let secs = |n: u64| (n > 0).then(|| Duration::from_secs(n));
        Settings {
            params: OurParams {
                max_recv_data_segment_length: c.max_recv_data_segment_length,
                max_burst_length: c.max_burst_length,
                first_burst_length: c.first_burst_length,
                immediate_data: c.immediate_data,
                initial_r2t: c.initial_r2t,
                allow_header_digest: c.header_digest,
                allow_data_digest: c.data_digest,
                ..OurParams::default()
            },
            nop_in_interval: secs(c.nop_in_interval_secs),
            nop_in_timeout: secs(c.nop_in_timeout_secs),
            login_timeout: Duration::from_secs(c.login_timeout_secs),
            max_sessions: c.max_sessions,
            cmd_window: c.cmd_window,
            reboot_gap: Duration::from_secs(c.reboot_gap_secs),
            max_connections: c.max_connections,
            max_buffered_bytes: usize::try_from(c.max_buffered_bytes.0).unwrap_or(usize::MAX),
            idle_timeout: secs(c.idle_timeout_secs),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings::from_config(&crate::config::SettingsConfig::default())
    }
}

/// The names a failed login gave, for its log line.
#[derive(Debug, Default)]
pub(crate) struct LoginNames {
    pub initiator: String,
    pub target: String,
}

/// Failed logins from one address in the current minute.
#[derive(Debug, Clone, Copy)]
struct Failures {
    since: std::time::Instant,
    count: u32,
}

/// After this many failed logins from one address in a minute, each further failure is
/// answered a second late (slows CHAP guessing) and only every tenth is logged.
const FAILURES_BEFORE_THROTTLE: u32 = 10;
/// How long a boot script fetch waits for the client's disk to open (attach) before it
/// answers with a retry script: under the boot HTTP connection's 30 s limit.
const SCRIPT_ATTACH_LIMIT: Duration = Duration::from_secs(15);

/// The iSCSI server: accepts connections on the listeners and runs sessions.
pub struct Server {
    failures: dashmap::DashMap<std::net::IpAddr, Failures>,
    connections: std::sync::atomic::AtomicUsize,
    registry: RwLock<Arc<Registry>>,
    settings: Settings,
    sessions: SessionTable,
    shutdown: watch::Sender<bool>,
    metrics: Arc<crate::metrics::Metrics>,
    /// This node's cluster membership (docs/scale-out.md); unset on a single node.
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// The clients' lifecycle records in etcd (with `cluster`).
    records: std::sync::OnceLock<Arc<crate::cluster::clients::Records>>,
}

impl Server {
    pub fn new(registry: Arc<Registry>, settings: Settings) -> Arc<Self> {
        Arc::new(Server {
            failures: dashmap::DashMap::new(),
            connections: std::sync::atomic::AtomicUsize::new(0),
            registry: RwLock::new(registry),
            settings,
            sessions: SessionTable::default(),
            shutdown: watch::Sender::new(false),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            cluster: std::sync::OnceLock::new(),
            records: std::sync::OnceLock::new(),
        })
    }

    /// Join a cluster: logins and boot scripts are placed through it from now on, and it
    /// learns this node's open sessions (its load).
    pub fn set_cluster(self: &Arc<Self>, cluster: Arc<crate::cluster::Cluster>) {
        let weak = Arc::downgrade(self);
        cluster.set_local_sessions(Arc::new(move || match weak.upgrade() {
            Some(s) => s.normal_session_initiators(),
            None => Vec::new(),
        }));
        let _ = self
            .records
            .set(crate::cluster::clients::Records::start(cluster.clone()));
        let _ = self.cluster.set(cluster);
    }

    /// In a cluster, before a client placed here is served: its lifecycle record in etcd
    /// (to be taken over if another node wrote it) and the sink its changes go to. etcd
    /// unreachable: no record (the placement served the client only because this node owned
    /// it under a live lease, so its own state is the newest).
    async fn cluster_lifecycle(
        &self,
        target: &str,
        initiator: &str,
    ) -> Option<(
        Option<(crate::boot::record::ClientRecord, String)>,
        Arc<dyn crate::boot::record::RecordSink>,
    )> {
        let (cluster, records) = (self.cluster()?, self.records.get()?);
        let me = cluster.node_id().to_string();
        // etcd did not answer the placement just now: do not wait for it a second time.
        let load = async {
            if cluster.reachable() {
                records.load(target, initiator).await.map(Some)
            } else {
                Ok(None)
            }
        };
        let rec = match load.await {
            Ok(None) => {
                info!(
                    initiator,
                    "etcd unreachable: the client's lifecycle continues from this node's state"
                );
                None
            }
            Ok(Some(found)) => match found {
                Some(bytes) => {
                    match serde_json::from_slice::<crate::boot::record::ClientRecord>(&bytes) {
                        Ok(r) => Some((r, me.clone())),
                        Err(e) => {
                            warn!(initiator, error = %e, "client lifecycle record in etcd is malformed: ignored");
                            None
                        }
                    }
                }
                None => None,
            },
            Err(e) => {
                warn!(initiator, error = %e, "cannot read the client's lifecycle record: continuing from this node's state");
                None
            }
        };
        let sink: Arc<dyn crate::boot::record::RecordSink> = Arc::new(RecordSink {
            records: records.clone(),
            node: me,
            owner_name: initiator.to_string(),
        });
        Some((rec, sink))
    }

    /// The cluster this node belongs to, if any.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.get()
    }

    /// The initiator of every open Normal session (one entry per session).
    pub fn normal_session_initiators(&self) -> Vec<String> {
        self.sessions
            .all()
            .into_iter()
            .filter(|s| !s.target.is_empty())
            .map(|s| s.initiator.clone())
            .collect()
    }

    /// Counters, histograms and the operator's event feed (crate::metrics).
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// TCP connections open now (logged in or not).
    pub fn connections_open(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The registry in force (a reload swaps it; sessions keep the LUNs they logged in to).
    pub fn registry(&self) -> Arc<Registry> {
        match self.registry.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replace the registry (configuration reload). Existing sessions are not disturbed.
    pub fn set_registry(&self, registry: Arc<Registry>) {
        match self.registry.write() {
            Ok(mut r) => *r = registry,
            Err(p) => *p.into_inner() = registry,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn sessions(&self) -> &SessionTable {
        &self.sessions
    }

    /// Serve until `shutdown` resolves; then ask every initiator to log out (Async Message,
    /// event 1), wait briefly, and close.
    pub async fn run(
        self: Arc<Self>,
        listeners: Vec<TcpListener>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for listener in listeners {
            let server = self.clone();
            tasks.spawn(async move { server.accept_loop(listener).await });
        }
        shutdown.await;
        info!(
            sessions = self.sessions.len(),
            "shutting down: asking initiators to log out"
        );
        let _ = self.shutdown.send(true);
        tasks.abort_all();
        // Connections answer the shutdown signal themselves; give them a moment.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.sessions.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    use std::sync::atomic::Ordering;
                    let open = self.connections.fetch_add(1, Ordering::AcqRel);
                    if open >= self.settings.max_connections {
                        self.connections.fetch_sub(1, Ordering::AcqRel);
                        warn!(%peer, max = self.settings.max_connections, "connection limit reached: closing");
                        self.metrics
                            .connection_dropped(crate::metrics::DropReason::ConnectionLimit);
                        drop(stream);
                        continue;
                    }
                    let server = self.clone();
                    tokio::spawn(async move {
                        connection::run(server.clone(), stream, peer).await;
                        server.connections.fetch_sub(1, Ordering::AcqRel);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Log a failed login with its reason (never a secret) and throttle an address that fails
    /// often: past FAILURES_BEFORE_THROTTLE failures a minute, the answer waits a second and
    /// only every tenth failure is logged.
    pub(crate) async fn login_failed(
        &self,
        peer: std::net::SocketAddr,
        who: &LoginNames,
        st: (u8, u8),
    ) {
        let now = std::time::Instant::now();
        let count = {
            let mut e = self.failures.entry(peer.ip()).or_insert(Failures {
                since: now,
                count: 0,
            });
            if now.duration_since(e.since) > Duration::from_secs(60) {
                *e = Failures {
                    since: now,
                    count: 0,
                };
            }
            e.count += 1;
            e.count
        };
        if self.failures.len() > 10_000 {
            self.failures
                .retain(|_, f| now.duration_since(f.since) <= Duration::from_secs(60));
        }
        self.metrics
            .login_failed(peer, &who.initiator, &who.target, st);
        if count <= FAILURES_BEFORE_THROTTLE || count % 10 == 0 {
            warn!(
                %peer,
                initiator = %who.initiator,
                target = %who.target,
                status = format!("{:02x}{:02x}", st.0, st.1),
                reason = crate::login::status::describe(st),
                failures_this_minute = count,
                "login refused"
            );
        }
        if count > FAILURES_BEFORE_THROTTLE {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Close every session of `initiator` on `target` for which `also(isid)` holds, and wait
    /// (bounded) until they are gone.
    pub async fn close_sessions(
        &self,
        initiator: &str,
        target: &str,
        also: impl Fn(&[u8; 6]) -> bool,
    ) {
        let victims: Vec<_> = self
            .sessions
            .all()
            .into_iter()
            .filter(|s| {
                s.initiator.eq_ignore_ascii_case(initiator)
                    && s.target.eq_ignore_ascii_case(target)
                    && also(&s.isid)
            })
            .collect();
        for s in victims {
            info!(tsih = s.tsih, initiator, "closing session");
            s.close(Duration::from_secs(5)).await;
            self.sessions.remove(s.tsih);
        }
    }

    /// What a client's shared disk (RBD) asks before it is opened and locked (fencing its
    /// previous holder): in a cluster, etcd must say now that this node owns `initiator`
    /// under a live lease; a single node never opens one (check-config requires a cluster).
    /// Called on a blocking thread (it waits for etcd).
    fn fence_guard(&self, initiator: &str) -> impl Fn() -> Result<(), String> + Send + Sync {
        let cluster = self.cluster().cloned();
        let handle = tokio::runtime::Handle::current();
        let who = initiator.to_string();
        move || match &cluster {
            Some(c) => handle.block_on(c.confirm_owner(&who)),
            None => Err("not in a cluster".to_string()),
        }
    }

    /// The client disk for a login of `initiator` with `isid` from `peer` to a boot target,
    /// as the client's lifecycle decides (docs/overlays.md): the sessions it names are
    /// closed (a previous boot's; the firmware's orphans after the hand-off) and a volatile
    /// disk is discarded when a new boot begins. Returns the client and the session's
    /// handle for [`Client::session_ended`].
    pub async fn attach_client(
        &self,
        boot: &Arc<BootTarget>,
        initiator: &str,
        isid: &[u8; 6],
        peer: std::net::IpAddr,
        keys: &[String],
    ) -> Result<(Arc<Client>, u64), AttachError> {
        // Opening or creating an overlay, and saving the boot state, sync files: keep them
        // off the event loop so a boot storm does not stall the sessions already running.
        let (client, decision, session) = {
            let (boot, who, isid) = (boot.clone(), initiator.to_string(), *isid);
            let keys = keys.to_vec();
            let guard = self.fence_guard(initiator);
            let shared = self.cluster_lifecycle(&boot.name, initiator).await;
            tokio::task::spawn_blocking(move || {
                let sink = shared.map(|(rec, sink)| {
                    if let Some((rec, me)) = rec {
                        boot.take_over(&who, rec, &me);
                    }
                    sink
                });
                let c = boot.attach_with(&who, &guard)?;
                if let Some(sink) = sink {
                    c.set_record_sink(sink);
                }
                let (d, s) = c.login(&isid, peer, &keys);
                Ok::<_, AttachError>((c, d, s))
            })
            .await
            .map_err(|e| AttachError::Storage(e.to_string()))??
        };
        if !decision.close.is_empty() {
            self.close_sessions(initiator, &boot.name, |i| decision.close.contains(i))
                .await;
        }
        if decision.reset {
            if let Err(e) = reset_blocking(boot, &client).await {
                ended_blocking(&client, session, End::Dropped).await;
                return Err(e);
            }
        }
        Ok((client, session))
    }

    /// The boot script for a client known by MAC or UUID, fetched by `peer`. The fetch is
    /// evidence of a boot only when the client's lifecycle finds it plausible; otherwise the
    /// script is returned and nothing changes.
    pub async fn boot_script(
        &self,
        mac: Option<&str>,
        uuid: Option<&str>,
        query: crate::boot::http::ScriptQuery,
        local: std::net::SocketAddr,
        peer: std::net::SocketAddr,
    ) -> Option<String> {
        let registry = self.registry();
        for boot in registry.boot_targets() {
            let hit = boot.bindings.iter().find(|b| {
                (mac.is_some() && b.mac.as_deref() == mac)
                    || (uuid.is_some() && b.uuid.as_deref() == uuid)
            });
            let (initiator, binding) = match hit {
                Some(b) => (b.script_initiator(), Some(b)),
                // An unknown MAC gets the default binding under a name derived from the MAC.
                None if boot.default.is_some() => (mac.map(mac_initiator), boot.default.as_ref()),
                None => (None, None),
            };
            let (Some(initiator), Some(binding)) = (initiator, binding) else {
                continue;
            };
            let luns: Vec<u16> = std::iter::once(0)
                .chain(binding.disks.iter().map(|d| d.lun))
                .collect();
            let (os, gateway) = (binding.os, binding.gateway);
            let render = |initiator: String, portal: String| {
                let clear_gateway =
                    crate::boot::http::ScriptPlan::gateway_cleared(gateway, os, &query, &portal);
                crate::boot::http::ScriptPlan {
                    initiator,
                    portal,
                    target: boot.name.clone(),
                    luns: luns.clone(),
                    os,
                    clear_gateway,
                    firmware: query.firmware,
                }
                .render()
            };
            // A cluster decides which node boots the client (docs/scale-out.md): another
            // node's portal goes into the script, and nothing changes here.
            if let Some(cluster) = self.cluster() {
                let idle = !self
                    .normal_session_initiators()
                    .iter()
                    .any(|i| i.eq_ignore_ascii_case(&initiator));
                match cluster
                    .admit(&initiator, crate::cluster::Why::Script { idle })
                    .await
                {
                    crate::cluster::Admission::Serve => {}
                    crate::cluster::Admission::Redirect(portal) => {
                        info!(%initiator, %portal, "boot script: client placed on another node");
                        return Some(render(initiator, portal.to_string()));
                    }
                    crate::cluster::Admission::Refuse(r) => {
                        warn!(%initiator, reason = %r, "boot script: client cannot be placed");
                        return Some(crate::boot::http::ipxe_retry_script(&r.to_string()));
                    }
                }
            }
            let decided = {
                let (b, who, from) = (boot.clone(), initiator.clone(), peer.ip());
                let guard = self.fence_guard(&initiator);
                let shared = self.cluster_lifecycle(&boot.name, &initiator).await;
                let task = tokio::task::spawn_blocking(move || {
                    let sink = shared.map(|(rec, sink)| {
                        if let Some((rec, me)) = rec {
                            b.take_over(&who, rec, &me);
                        }
                        sink
                    });
                    b.attach_with(&who, &guard).map(|c| {
                        if let Some(sink) = sink {
                            c.set_record_sink(sink);
                        }
                        let d = c.script_fetched(from);
                        (c, d)
                    })
                });
                // Opening a disk on shared storage (RBD) waits for Ceph (each request gives up
                // after 10 s, an open makes several): the answer is not held past the HTTP
                // connection's own limit (30 s), it says to come back.
                match tokio::time::timeout(SCRIPT_ATTACH_LIMIT, task).await {
                    Ok(r) => r,
                    Err(_) => {
                        warn!(%initiator, limit = ?SCRIPT_ATTACH_LIMIT,
                            "boot script: the client's disk did not open in time (storage slow or unreachable); answering with a retry script");
                        return Some(crate::boot::http::ipxe_retry_script(
                            "the client's disk is not available yet",
                        ));
                    }
                }
            };
            if let Ok(Ok((client, d))) = decided {
                if !d.close.is_empty() {
                    self.close_sessions(&initiator, &boot.name, |i| d.close.contains(i))
                        .await;
                }
                if d.reset {
                    if let Err(e) = reset_blocking(&boot, &client).await {
                        warn!(%initiator, error = %e, "overlay reset failed");
                    }
                }
            }
            let port = registry.portals().first().map_or(3260, |p| p.port());
            let portal = match registry.boot_http().and_then(|h| h.iscsi_portal.clone()) {
                // A host alone: the first portal's port (it follows `--listen`).
                Some(h) if !h.contains(':') => format!("{h}:{port}"),
                Some(p) => p,
                None => match self.cluster() {
                    // A cluster node's own portal as the other nodes know it.
                    Some(c) => c.advertise().to_string(),
                    None => std::net::SocketAddr::new(local.ip(), port).to_string(),
                },
            };
            return Some(render(initiator, portal));
        }
        None
    }

    /// Discard a client's overlay now (operator command): its sessions are closed first.
    pub async fn reset_client(&self, target: &str, initiator: &str) -> Result<Reset, ResetError> {
        self.reset_client_scope(target, initiator, crate::boot::ResetScope::Operator)
            .await
    }

    /// [`Server::reset_client`] of what `scope` names (one LUN: `--lun N`). Disks in RBD
    /// are recreated at the client's next login, on whichever node serves it then: the
    /// answer waits (bounded) until the client's record in etcd carries the mark, since a
    /// node that takes the client over knows of the reset only from there.
    pub async fn reset_client_scope(
        &self,
        target: &str,
        initiator: &str,
        scope: crate::boot::ResetScope,
    ) -> Result<Reset, ResetError> {
        let registry = self.registry();
        let boot = registry
            .boot_target(target)
            .ok_or_else(|| ResetError::Failed(format!("{target} is not a boot target")))?;
        let client = boot
            .client(initiator)
            .ok_or_else(|| ResetError::Failed(format!("no client {initiator} on {target}")))?;
        let c = client.clone();
        tokio::task::spawn_blocking(move || c.operator_reset_scope(scope))
            .await
            .map_err(|e| ResetError::Failed(e.to_string()))?;
        self.close_sessions(initiator, target, |_| true).await;
        reset_blocking(&boot, &client)
            .await
            .map_err(|e| ResetError::Failed(e.to_string()))?;
        // Applied on this node (counted even when the mark is not yet durable in etcd).
        self.metrics().client_reset(target, initiator, "operator");
        let Some(mark) = client.recreate_mark() else {
            return Ok(Reset::default());
        };
        let luns = mark.luns.clone();
        let not_durable = |why: String| ResetError::NotDurable {
            initiator: client.initiator.clone(),
            luns: lun_list(&luns),
            why,
        };
        // RBD needs a cluster (config check), and a shared disk opens only through the
        // placement: no record sink means the client was not placed here, nothing of it
        // reaches etcd from this node.
        let (Some(records), Some(seq)) = (self.records.get(), mark.record_seq) else {
            return Err(not_durable(
                "this node keeps no record of the client in etcd (it was not placed on this \
                 node through the cluster)"
                    .into(),
            ));
        };
        records
            .stored(&boot.name, &client.initiator, seq)
            .await
            .map_err(|e| not_durable(e.to_string()))?;
        info!(initiator = %client.initiator, luns = ?mark.luns, seq,
            "reset of client disks in RBD stored in etcd: any node that serves the client next recreates them");
        Ok(Reset {
            rbd_recreate: mark.luns,
        })
    }

    /// Whether the server is stopping (sessions ending now end because of it).
    pub fn is_stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}

/// What an operator's reset left for the client's next login.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reset {
    /// LUNs whose disk in RBD is recreated then (the mark is in etcd).
    pub rbd_recreate: Vec<u16>,
}

/// Why an operator's reset failed, or is not (yet) safe from this node's death.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("{0}")]
    Failed(String),
    /// Applied here (sessions closed, the mark in this node's state), but the client's
    /// record in etcd does not carry it (yet): were this node to die now, the node that
    /// takes the client over would serve the old disks.
    #[error(
        "reset of {initiator} applied on this node, but not yet durable in the cluster: \
         the recreate of its RBD disk(s) at the next login ({luns}) is not in etcd: {why}. \
         If this node stops before etcd has it, a node that takes the client over serves the \
         old disk(s); this node keeps trying to write it while it owns the client. \
         Check `diskless cluster clients`, or reset again once etcd answers"
    )]
    NotDurable {
        initiator: String,
        luns: String,
        why: String,
    },
}

/// `LUN 0, 1` (operator text).
pub fn lun_list(luns: &[u16]) -> String {
    let n: Vec<String> = luns.iter().map(u16::to_string).collect();
    format!("LUN {}", n.join(", "))
}

/// `Client::session_ended` (it saves the boot state) on the blocking pool.
pub(crate) async fn ended_blocking(client: &Arc<Client>, session: u64, how: End) {
    let c = client.clone();
    let _ = tokio::task::spawn_blocking(move || c.session_ended(session, how)).await;
}

/// `Client::reset` (it syncs files) on the blocking pool, one at a time with the client's
/// attaches (`BootTarget::reset_client`).
async fn reset_blocking(boot: &Arc<BootTarget>, client: &Arc<Client>) -> Result<(), AttachError> {
    let (b, c) = (boot.clone(), client.clone());
    tokio::task::spawn_blocking(move || b.reset_client(&c))
        .await
        .map_err(|e| AttachError::Storage(e.to_string()))?
        .map_err(AttachError::Storage)
}

impl crate::boot::http::BootScripts for Server {
    fn script<'a>(
        &'a self,
        mac: Option<&'a str>,
        uuid: Option<&'a str>,
        query: crate::boot::http::ScriptQuery,
        local: std::net::SocketAddr,
        peer: std::net::SocketAddr,
    ) -> crate::boot::http::ScriptFuture<'a> {
        Box::pin(self.boot_script(mac, uuid, query, local, peer))
    }
}

/// A client's lifecycle records, to etcd through this node's writer.
struct RecordSink {
    records: Arc<crate::cluster::clients::Records>,
    node: String,
    /// The name its ownership key has (as the client was placed).
    owner_name: String,
}

impl crate::boot::record::RecordSink for RecordSink {
    fn node(&self) -> &str {
        &self.node
    }

    fn send(&self, rec: crate::boot::record::ClientRecord) {
        match serde_json::to_vec(&rec) {
            Ok(v) => self
                .records
                .send(&rec.target, &rec.initiator, &self.owner_name, rec.seq, v),
            Err(e) => {
                warn!(initiator = %rec.initiator, error = %e, "client lifecycle record not encoded")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_from_config() {
        // The config's defaults are the login layer's own offers.
        assert_eq!(Settings::default().params, OurParams::default());
        let d = Settings::default();
        assert_eq!(d.nop_in_interval, Some(Duration::from_secs(30)));
        assert_eq!(d.nop_in_timeout, None);
        assert_eq!(d.idle_timeout, None);
        let c = crate::config::SettingsConfig {
            nop_in_interval_secs: 0,
            nop_in_timeout_secs: 5,
            cmd_window: 32,
            header_digest: false,
            ..Default::default()
        };
        let s = Settings::from_config(&c);
        assert_eq!(s.nop_in_interval, None);
        assert_eq!(s.nop_in_timeout, Some(Duration::from_secs(5)));
        assert_eq!(s.cmd_window, 32);
        assert!(!s.params.allow_header_digest);
        assert!(s.params.allow_data_digest);
    }
}
