//! The etcd shell of the cluster (docs/scale-out.md): this node's lease and record, the
//! ownership keys, a watched copy of the cluster's keys, and the operator commands.
//!
//! Keys, under `/diskless/<cluster>/`:
//! - `nodes/<id>`: the node's [`NodeRecord`] (JSON), bound to its lease.
//! - `owners/<initiator>`: the id of the node that serves the client, bound to *that* node's
//!   lease, created only if absent (a transaction comparing create_revision with 0).
//! - `drain/<id>`: the operator's drain mark, without a lease.
//!
//! Every etcd request is bounded by a timeout; a node that cannot reach etcd keeps its open
//! sessions and refuses what it cannot place safely ([`super::placement::decide`]).

use super::placement::{
    self, Change, Decision, Input, Keys, NodeId, NodeRecord, Refusal, SharedKey, View, Why,
};
use crate::config::ClusterConfig;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd: {}", explain(.0))]
    Etcd(#[from] etcd_client::Error),
    /// etcd refused the user and password (`cluster.auth`).
    #[error("etcd refused the credentials of cluster.auth: {0}")]
    Credentials(String),
    /// The TLS handshake with etcd failed (`cluster.tls`: unknown CA, wrong name, no or
    /// a refused client certificate).
    #[error("TLS with etcd failed (check cluster.tls): {0}")]
    Tls(String),
    /// `cluster.tls` / `cluster.auth` name a missing or malformed file.
    #[error("{0}: {1}")]
    Config(&'static str, String),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd: the lease of node {0} is gone")]
    LeaseGone(NodeId),
}

/// What the session layer or the boot script endpoint does with a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Serve,
    /// Send the client to this portal.
    Redirect(SocketAddr),
    Refuse(Refusal),
}

/// The initiator names of this node's open Normal sessions (given by the session layer).
pub type LocalSessions = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// The layer that owns the client state and the configuration, told what the cluster's
/// shared keys say (at each listing, and at each change seen by the watch).
pub trait Shared: Send + Sync {
    /// A client's next-boot override as stored in etcd (JSON), or None when cleared.
    fn next_boot(&self, target: &str, initiator: &str, value: Option<&[u8]>);
    /// The shared configuration document changed (YAML), or None when removed.
    fn config(&self, yaml: Option<Vec<u8>>);
    /// The image catalogue changed (a version recorded, a pointer moved): see whether the
    /// versions this node serves move (super::catalogue).
    fn catalogue(&self) {}
}

#[derive(Default)]
struct State {
    view: View,
    lease: Option<i64>,
    /// Until when the lease is surely alive at etcd.
    valid_until: Option<Instant>,
    /// The record as last written.
    published: Option<NodeRecord>,
    /// Whether the last request to etcd succeeded (for logs and status).
    reachable: bool,
    /// The shared configuration as last seen in etcd (None: none pushed).
    seen_config: Option<Vec<u8>>,
    /// The shared configuration in force on this node (accepted by [`Shared::config`]).
    shared_config: Option<Vec<u8>>,
}

/// One node's membership in the cluster.
pub struct Cluster {
    keys: Keys,
    me: NodeId,
    advertise: SocketAddr,
    portals: Vec<SocketAddr>,
    ttl: Duration,
    op_timeout: Duration,
    cfg: ClusterConfig,
    /// Connected on first use (and again after a refused authentication).
    client: tokio::sync::Mutex<Option<Client>>,
    state: Mutex<State>,
    local: OnceLock<LocalSessions>,
    shared: OnceLock<Arc<dyn Shared>>,
    /// The image catalogue as the watch sees it (super::catalogue).
    catalogue: super::catalogue::Follower,
    /// This node's operator API, published in its record (set once the API listens).
    api: OnceLock<SocketAddr>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("prefix", &self.keys.prefix)
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

/// Per-request timeout: long enough for a loaded etcd, short against the lease.
pub(super) fn op_timeout(ttl: Duration) -> Duration {
    (ttl / 2).clamp(Duration::from_millis(500), Duration::from_secs(5))
}

/// An etcd error with its causes (tonic hides the TLS reason in the source chain).
fn explain(e: &etcd_client::Error) -> String {
    let mut text = match e {
        etcd_client::Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    };
    let mut src = std::error::Error::source(e);
    if let etcd_client::Error::GRpcStatus(s) = e {
        src = std::error::Error::source(s);
    }
    while let Some(cause) = src {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        src = cause.source();
    }
    text
}

/// Sort an etcd error: refused credentials and TLS failures are configuration faults the
/// operator must see as such, not "etcd unreachable".
fn classify(e: etcd_client::Error) -> ClusterError {
    let text = explain(&e);
    let lower = text.to_ascii_lowercase();
    if lower.contains("authentication failed")
        || lower.contains("invalid user id or password")
        || lower.contains("user name is empty")
        || lower.contains("permission denied")
    {
        ClusterError::Credentials(text)
    } else if lower.contains("certificate")
        || lower.contains("tls")
        || lower.contains("handshake")
        || lower.contains("unknownissuer")
    {
        ClusterError::Tls(text)
    } else {
        ClusterError::Etcd(e)
    }
}

/// Connection options for the configured endpoints: timeouts, TLS (`cluster.tls`) and the
/// user (`cluster.auth`). Files are read here: a missing or malformed one is an error.
pub fn connect_options(cfg: &ClusterConfig) -> Result<ConnectOptions, ClusterError> {
    let t = op_timeout(Duration::from_secs(cfg.lease_ttl));
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(t)
        .with_timeout(t)
        .with_keep_alive(t, t);
    let secrets = cfg.secrets().map_err(|(k, m)| ClusterError::Config(k, m))?;
    if let Some(ca) = secrets.ca {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = secrets.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(d) = secrets.domain {
            tls = tls.domain_name(d);
        }
        opts = opts.with_tls(tls);
    }
    if let Some((user, password)) = secrets.user {
        opts = opts.with_user(user, password);
    }
    Ok(opts)
}

/// A client for the configured endpoints. Without a user, connections are made on first
/// use; with one, this authenticates (and fails if etcd is down or refuses the user).
pub async fn connect(cfg: &ClusterConfig) -> Result<Client, ClusterError> {
    let opts = connect_options(cfg)?;
    let limit = op_timeout(Duration::from_secs(cfg.lease_ttl)) * 2;
    match tokio::time::timeout(limit, Client::connect(&cfg.etcd, Some(opts))).await {
        Ok(r) => r.map_err(classify),
        Err(_) => Err(ClusterError::Timeout(limit)),
    }
}

pub(super) async fn bounded<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, ClusterError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(classify),
        Err(_) => Err(ClusterError::Timeout(limit)),
    }
}

fn lease_gone(e: &etcd_client::Error) -> bool {
    e.to_string().contains("lease not found")
}

/// Every key under the cluster's prefix, as a view, the revision it was read at, and the
/// keys as changes (for the shared records).
async fn list(
    client: &Client,
    keys: &Keys,
    limit: Duration,
) -> Result<(View, i64, Vec<Change>), ClusterError> {
    let mut c = client.clone();
    let resp = bounded(
        limit,
        c.get(keys.prefix.as_str(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let mut view = View::default();
    let mut all = Vec::with_capacity(resp.kvs().len());
    for kv in resp.kvs() {
        let change = Change::Put {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
        };
        view.apply(keys, &change);
        all.push(change);
    }
    let rev = resp.header().map_or(0, |h| h.revision());
    Ok((view, rev, all))
}

enum Claimed {
    Done,
    Taken(Option<NodeId>),
}

impl Cluster {
    /// This node's membership; nothing is registered until [`Cluster::spawn`].
    pub async fn new(
        cfg: &ClusterConfig,
        portals: Vec<SocketAddr>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        // Read the TLS and password files now: a missing one fails `serve` at once.
        connect_options(cfg)?;
        let ttl = Duration::from_secs(cfg.lease_ttl);
        Ok(Arc::new(Cluster {
            keys: Keys::new(&cfg.name),
            me: cfg.node_id.clone(),
            advertise: cfg.advertise.0,
            portals,
            ttl,
            op_timeout: op_timeout(ttl),
            cfg: cfg.clone(),
            client: tokio::sync::Mutex::new(None),
            state: Mutex::new(State::default()),
            local: OnceLock::new(),
            shared: OnceLock::new(),
            catalogue: super::catalogue::Follower::default(),
            api: OnceLock::new(),
        }))
    }

    /// The image catalogue this node follows.
    pub fn catalogue(&self) -> &super::catalogue::Follower {
        &self.catalogue
    }

    /// The etcd client, connected (and authenticated) on first use.
    async fn client(&self) -> Result<Client, ClusterError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = connect(&self.cfg).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Hand the shared records (next-boot overrides, shared configuration) to `s`.
    pub fn set_shared(&self, s: Arc<dyn Shared>) {
        let _ = self.shared.set(s);
    }

    /// The shared configuration this node runs with (None: its own file only).
    pub fn shared_config(&self) -> Option<Vec<u8>> {
        self.lock().shared_config.clone()
    }

    /// Record that the node now runs with `yaml` laid over its own file.
    pub fn accept_shared_config(&self, yaml: Option<Vec<u8>>) {
        self.lock().shared_config = yaml;
    }

    /// Hand one change of a shared record to the state's owner. A listing repeats every
    /// record: the owner ignores what it already has; the configuration is handed over
    /// only when it differs from the one last seen.
    fn dispatch(&self, change: &Change) {
        let (key, value) = match change {
            Change::Put { key, value } => (key, Some(value.as_slice())),
            Change::Delete { key } => (key, None),
        };
        let Some(which) = self.keys.shared(key) else {
            return;
        };
        let Some(sh) = self.shared.get() else { return };
        match which {
            SharedKey::NextBoot { target, initiator } => sh.next_boot(&target, &initiator, value),
            SharedKey::Config => {
                let v = value.map(<[u8]>::to_vec);
                {
                    let mut st = self.lock();
                    if st.seen_config == v {
                        return;
                    }
                    st.seen_config = v.clone();
                }
                sh.config(v);
            }
        }
    }

    fn catalogue_changed(&self, changed: bool) {
        if let (true, Some(sh)) = (changed, self.shared.get()) {
            sh.catalogue();
        }
    }

    /// Store (Some) or clear (None) a client's next-boot override in etcd, for whichever
    /// node the client boots on next.
    pub async fn put_next_boot(
        &self,
        target: &str,
        initiator: &str,
        value: Option<Vec<u8>>,
    ) -> Result<(), ClusterError> {
        let key = self.keys.next_boot(target, initiator);
        let mut c = self.client().await?;
        match value {
            Some(v) => bounded(self.op_timeout, c.put(key, v, None))
                .await
                .map(|_| ()),
            None => bounded(self.op_timeout, c.delete(key, None))
                .await
                .map(|_| ()),
        }
    }

    /// Tell the cluster which sessions this node has open (load, and the clients it claims
    /// back after losing its lease).
    pub fn set_local_sessions(&self, f: LocalSessions) {
        let _ = self.local.set(f);
    }

    /// Publish this node's operator API address in its record (the lease keeper writes
    /// the record again when it changes). An unspecified listen address (0.0.0.0) is
    /// published with the advertised portal's address.
    pub fn set_api(&self, listen: SocketAddr) {
        let mut addr = listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(self.advertise.ip());
        }
        let _ = self.api.set(addr);
    }

    /// The cluster's name (`cluster.name`).
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn node_id(&self) -> &str {
        &self.me
    }

    /// The cluster's keys (for `super::clients`).
    pub(super) fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The etcd client (for `super::clients`).
    pub(super) async fn etcd(&self) -> Result<Client, ClusterError> {
        self.client().await
    }

    /// The bound of one etcd request.
    pub(super) fn request_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// Whether the last request to etcd was answered (the lease keeper sets it again once
    /// etcd answers).
    pub fn reachable(&self) -> bool {
        self.lock().reachable
    }

    /// This node's lease now, if it holds one.
    pub(super) fn lease_id(&self) -> Option<i64> {
        self.lock().lease
    }

    pub fn advertise(&self) -> SocketAddr {
        self.advertise
    }

    /// The last known view of the cluster.
    pub fn view(&self) -> View {
        self.lock().view.clone()
    }

    /// Whether this node's lease is surely alive now.
    pub fn registered(&self) -> bool {
        self.lock().valid_until.is_some_and(|t| Instant::now() < t)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data: keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn local_sessions(&self) -> Vec<String> {
        self.local.get().map(|f| f()).unwrap_or_default()
    }

    /// Start the lease keeper and the watcher.
    pub fn spawn(self: &Arc<Self>, tasks: &mut tokio::task::JoinSet<()>) {
        let me = self.clone();
        tasks.spawn(async move { me.lease_loop().await });
        let me = self.clone();
        tasks.spawn(async move { me.watch_loop().await });
    }

    /// Where a client goes (placement::decide, carried out). Never waits longer than a few
    /// etcd request timeouts.
    pub async fn admit(&self, initiator: &str, why: Why) -> Admission {
        let mut owner = self.read_owner(initiator).await;
        let mut exclude: Vec<NodeId> = Vec::new();
        let mut reread = false;
        for _ in 0..4 {
            let decision = {
                let st = self.lock();
                placement::decide(&Input {
                    me: &self.me,
                    initiator,
                    view: &st.view,
                    owner: owner.clone(),
                    now: Instant::now(),
                    lease_valid_until: st.valid_until,
                    exclude: &exclude,
                    why,
                })
            };
            match decision {
                Decision::Serve => return Admission::Serve,
                Decision::Redirect { portal, .. } => return Admission::Redirect(portal),
                // The owner was read before the watch saw its node's lease run out (the
                // record and the ownership key go together): read the owner once more.
                Decision::Refuse(Refusal::OwnerUnknown(_)) if !reread => {
                    reread = true;
                    owner = self.read_owner(initiator).await;
                }
                Decision::Refuse(r) => return Admission::Refuse(r),
                Decision::Claim { node, lease } => {
                    match self.claim(initiator, &node, lease).await {
                        Ok(Claimed::Done) => {
                            info!(initiator, node = %node, "client placed");
                            self.lock()
                                .view
                                .owners
                                .insert(initiator.to_string(), node.clone());
                            owner = Some(Some(node));
                        }
                        Ok(Claimed::Taken(o)) => owner = Some(o),
                        Err(ClusterError::LeaseGone(n)) => {
                            exclude.push(n);
                            owner = Some(None);
                        }
                        Err(e) => {
                            warn!(initiator, error = %e, "cannot claim the client");
                            owner = None;
                        }
                    }
                }
                Decision::Release => match self.release(initiator).await {
                    Ok(()) => {
                        info!(initiator, "draining: client handed over at its new boot");
                        self.lock().view.owners.remove(initiator);
                        owner = Some(None);
                    }
                    Err(e) => {
                        warn!(initiator, error = %e, "draining: cannot hand the client over; it stays");
                        return Admission::Serve;
                    }
                },
            }
        }
        Admission::Refuse(Refusal::NoNode)
    }

    /// The owner as etcd says now; None when etcd cannot be read.
    async fn read_owner(&self, initiator: &str) -> Option<Option<NodeId>> {
        let got = match self.client().await {
            Ok(mut c) => bounded(self.op_timeout, c.get(self.keys.owner(initiator), None)).await,
            Err(e) => Err(e),
        };
        match got {
            Ok(resp) => Some(
                resp.kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            ),
            Err(e) => {
                warn!(initiator, error = %e, "cannot read the client's owner from etcd");
                self.lock().reachable = false;
                None
            }
        }
    }

    /// The fencing check (docs/scale-out.md, "Ceph RBD client disks"): Ok only if etcd says,
    /// now, that this node owns `initiator`, and this node's lease is surely alive. A node
    /// breaks another's lock on a client's shared disk only after this: the other node then
    /// lost the client (its lease ran out, or it released it), so it may no longer write.
    pub async fn confirm_owner(&self, initiator: &str) -> Result<(), String> {
        match self.read_owner(initiator).await {
            None => Err("etcd unreachable: cannot confirm this node owns the client".into()),
            Some(None) => Err("the client has no owner in etcd".into()),
            Some(Some(o)) if o != self.me => Err(format!("the client is owned by node {o}")),
            Some(Some(_)) if !self.registered() => {
                Err("this node's lease is not surely alive".into())
            }
            Some(Some(_)) => Ok(()),
        }
    }

    /// Create the client's ownership key for `node` on `lease`, only if absent.
    async fn claim(
        &self,
        initiator: &str,
        node: &str,
        lease: i64,
    ) -> Result<Claimed, ClusterError> {
        let key = self.keys.owner(initiator);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                node,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let mut c = self.client().await?;
        let resp = match bounded(self.op_timeout, c.txn(txn)).await {
            Ok(r) => r,
            Err(ClusterError::Etcd(e)) if lease_gone(&e) => {
                return Err(ClusterError::LeaseGone(node.to_string()))
            }
            Err(e) => return Err(e),
        };
        if resp.succeeded() {
            return Ok(Claimed::Done);
        }
        let owner = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        Ok(Claimed::Taken(owner))
    }

    /// Delete the client's ownership key if this node still owns it.
    async fn release(&self, initiator: &str) -> Result<(), ClusterError> {
        let key = self.keys.owner(initiator);
        let txn = Txn::new()
            .when([Compare::value(
                key.as_str(),
                CompareOp::Equal,
                self.me.as_str(),
            )])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        let mut c = self.client().await?;
        bounded(self.op_timeout, c.txn(txn)).await.map(|_| ())
    }

    /// This node's record as it should be now.
    fn record(&self, lease: i64) -> NodeRecord {
        let load = self.local_sessions().len() as u64;
        let draining = self.lock().view.drained.contains(&self.me);
        NodeRecord {
            portal: self.advertise,
            portals: self.portals.clone(),
            load,
            draining,
            lease,
            api: self.api.get().copied(),
        }
    }

    /// Grant a lease, write the record, and claim back the clients this node serves.
    async fn register(&self) -> Result<(), ClusterError> {
        let mut c = self.client().await?;
        let sent = Instant::now();
        let grant = bounded(
            self.op_timeout,
            c.lease_grant(self.ttl.as_secs() as i64, None),
        )
        .await?;
        let lease = grant.id();
        let rec = self.record(lease);
        self.put_record(&rec, lease).await?;
        {
            let mut st = self.lock();
            st.lease = Some(lease);
            st.valid_until = Some(sent + Duration::from_secs(grant.ttl().max(0) as u64));
            st.published = Some(rec.clone());
            st.reachable = true;
            st.view.nodes.insert(self.me.clone(), rec);
        }
        info!(node = %self.me, lease = format!("{lease:x}"), ttl = grant.ttl(), "registered in the cluster");
        // Open sessions here whose ownership went with an expired lease: claim them back
        // (only if nobody took them meanwhile; if someone did, the session stays open and
        // the client's next boot goes to the new owner).
        let mut local = self.local_sessions();
        local.sort();
        local.dedup();
        for who in local {
            match self.claim(&who, &self.me, lease).await {
                Ok(Claimed::Done) => info!(initiator = %who, "claimed back an open client"),
                Ok(Claimed::Taken(Some(o))) if o == self.me => {}
                Ok(Claimed::Taken(o)) => warn!(
                    initiator = %who,
                    owner = o.as_deref().unwrap_or("?"),
                    "a client with a session open here is owned by another node now; its next boot goes there"
                ),
                Err(e) => warn!(initiator = %who, error = %e, "cannot claim back an open client"),
            }
        }
        Ok(())
    }

    /// Write this node's record, bound to `lease` (it goes when the lease expires).
    async fn put_record(&self, rec: &NodeRecord, lease: i64) -> Result<(), ClusterError> {
        let value = serde_json::to_vec(rec).unwrap_or_default();
        let mut c = self.client().await?;
        bounded(
            self.op_timeout,
            c.put(
                self.keys.node(&self.me),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        Ok(())
    }

    /// Write the record again if the load or the drain mark changed.
    async fn publish(&self, lease: i64) -> Result<(), ClusterError> {
        let rec = self.record(lease);
        if self.lock().published.as_ref() == Some(&rec) {
            return Ok(());
        }
        self.put_record(&rec, lease).await?;
        if rec.draining && !self.lock().published.as_ref().is_some_and(|p| p.draining) {
            info!(node = %self.me, "draining: no new clients; clients move at their next boot");
        }
        self.lock().published = Some(rec);
        Ok(())
    }

    fn forget_lease(&self) {
        let mut st = self.lock();
        st.lease = None;
        st.valid_until = None;
        st.published = None;
    }

    /// Keep the lease alive (a keep-alive every TTL/4); register again when it is lost.
    async fn lease_loop(self: Arc<Self>) {
        let tick = (self.ttl / 4).max(Duration::from_millis(200));
        let mut keeper = None;
        let mut down_logged = false;
        loop {
            let lease = self.lock().lease;
            let result = match lease {
                None => self.register().await,
                Some(id) => self.keep_alive(id, &mut keeper).await,
            };
            let now_lease = self.lock().lease;
            let result = match (result, now_lease) {
                (Ok(()), Some(id)) => self.publish(id).await,
                (r, _) => r,
            };
            match result {
                Ok(()) => {
                    if down_logged {
                        info!("etcd reachable again");
                        down_logged = false;
                    }
                    self.lock().reachable = true;
                }
                Err(ClusterError::Etcd(e)) if lease_gone(&e) => {
                    // etcd answers, but has dropped the lease (and every key bound to it):
                    // this node was cut off or paused past its TTL.
                    keeper = None;
                    warn!(node = %self.me, "lease expired at etcd: registering again");
                    self.forget_lease();
                }
                Err(
                    e @ (ClusterError::Credentials(_)
                    | ClusterError::Tls(_)
                    | ClusterError::Config(..)),
                ) => {
                    // etcd refuses this node: a configuration fault, not an outage. Connect
                    // (and authenticate) afresh at the next attempt.
                    keeper = None;
                    *self.client.lock().await = None;
                    self.lock().reachable = false;
                    if !down_logged {
                        error!(error = %e, "cannot join the cluster: open sessions go on; new clients are refused");
                        down_logged = true;
                    }
                }
                Err(e) => {
                    keeper = None;
                    self.lock().reachable = false;
                    if !down_logged {
                        warn!(error = %e, "etcd unreachable: open sessions go on; new clients are refused once the lease may have run out");
                        down_logged = true;
                    }
                }
            }
            tokio::time::sleep(tick).await;
        }
    }

    async fn keep_alive(
        &self,
        id: i64,
        keeper: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    ) -> Result<(), ClusterError> {
        if keeper.is_none() {
            let mut c = self.client().await?;
            *keeper = Some(bounded(self.op_timeout, c.lease_keep_alive(id)).await?);
        }
        let Some((k, s)) = keeper.as_mut() else {
            return Ok(());
        };
        let sent = Instant::now();
        let resp = match tokio::time::timeout(self.op_timeout, async {
            k.keep_alive().await?;
            s.message().await
        })
        .await
        {
            Ok(r) => r?,
            Err(_) => return Err(ClusterError::Timeout(self.op_timeout)),
        };
        match resp {
            Some(r) if r.ttl() > 0 => {
                self.lock().valid_until = Some(sent + Duration::from_secs(r.ttl() as u64));
                Ok(())
            }
            Some(_) => {
                // TTL 0: etcd has dropped the lease, and every key bound to it.
                warn!(node = %self.me, "lease expired at etcd: registering again");
                self.forget_lease();
                *keeper = None;
                Ok(())
            }
            None => {
                *keeper = None;
                Err(ClusterError::Etcd(etcd_client::Error::LeaseKeepAliveError(
                    "keep-alive stream closed".into(),
                )))
            }
        }
    }

    /// Keep `view` a copy of the cluster's keys: list, then watch from the next revision;
    /// list again after any error.
    async fn watch_loop(self: Arc<Self>) {
        let backoff = (self.ttl / 4).max(Duration::from_millis(200));
        loop {
            let listed = match self.client().await {
                Ok(c) => list(&c, &self.keys, self.op_timeout).await.map(|l| (l, c)),
                Err(e) => Err(e),
            };
            let ((view, rev, all), mut c) = match listed {
                Ok(v) => v,
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            self.lock().view = view;
            let relisted = self.catalogue.relist(&self.keys, &all);
            for change in &all {
                self.dispatch(change);
            }
            self.catalogue_changed(relisted);
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(rev + 1);
            let mut stream = match bounded(
                self.op_timeout,
                c.watch(self.keys.prefix.as_str(), Some(opts)),
            )
            .await
            {
                Ok(s) => s,
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            while let Ok(Some(resp)) = stream.message().await {
                if resp.canceled() {
                    break;
                }
                let mut changes = Vec::new();
                {
                    let mut st = self.lock();
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        let change = match ev.event_type() {
                            EventType::Put => Change::Put {
                                key,
                                value: kv.value().to_vec(),
                            },
                            EventType::Delete => Change::Delete { key },
                        };
                        st.view.apply(&self.keys, &change);
                        changes.push(change);
                    }
                }
                let mut cat = false;
                for change in &changes {
                    cat |= self.catalogue.apply(&self.keys, change);
                    self.dispatch(change);
                }
                self.catalogue_changed(cat);
            }
            tokio::time::sleep(backoff).await;
        }
    }

    /// Leave the cluster at a clean shutdown: revoking the lease deletes the record and the
    /// ownership keys at once, so clients move without waiting for the TTL.
    pub async fn leave(&self) {
        let lease = self.lock().lease.take();
        if let Some(id) = lease {
            let revoked = match self.client().await {
                Ok(mut c) => bounded(self.op_timeout, c.lease_revoke(id)).await,
                Err(e) => Err(e),
            };
            match revoked {
                Ok(_) => info!(node = %self.me, "left the cluster"),
                Err(e) => warn!(error = %e, "could not revoke the lease; it runs out by itself"),
            }
        }
    }
}

/// `diskless cluster status`: the cluster's keys, read once.
pub async fn read_status(cfg: &ClusterConfig) -> Result<placement::Status, ClusterError> {
    let client = connect(cfg).await?;
    let (view, _, _) = list(
        &client,
        &Keys::new(&cfg.name),
        op_timeout(Duration::from_secs(cfg.lease_ttl)),
    )
    .await?;
    Ok(placement::status(&view))
}

/// `diskless node drain [--undo]`: set or clear a node's drain mark. Returns how many
/// clients the node owns (they move at their next boot).
pub async fn set_drain(cfg: &ClusterConfig, node: &str, on: bool) -> Result<usize, ClusterError> {
    let mut client = connect(cfg).await?;
    let keys = Keys::new(&cfg.name);
    let limit = op_timeout(Duration::from_secs(cfg.lease_ttl));
    if on {
        bounded(limit, client.put(keys.drain(node), "", None)).await?;
    } else {
        bounded(limit, client.delete(keys.drain(node), None)).await?;
    }
    let (view, _, _) = list(&client, &keys, limit).await?;
    Ok(view.owners.values().filter(|o| o.as_str() == node).count())
}

/// `diskless cluster config push FILE` (Some) or `... config clear` (None): store the shared
/// configuration every node lays over its own file (checked by the caller first).
pub async fn push_config(cfg: &ClusterConfig, yaml: Option<Vec<u8>>) -> Result<(), ClusterError> {
    let mut client = connect(cfg).await?;
    let key = Keys::new(&cfg.name).shared_config();
    let limit = op_timeout(Duration::from_secs(cfg.lease_ttl));
    match yaml {
        Some(y) => bounded(limit, client.put(key, y, None)).await.map(|_| ()),
        None => bounded(limit, client.delete(key, None)).await.map(|_| ()),
    }
}
