//! Client lifecycle records in etcd (docs/scale-out.md, "Keys"): under
//! `/diskless/<cluster>/clients/<target>/<initiator>/lifecycle`, the JSON record of
//! `boot::record` (the cluster layer does not read it: bytes in, bytes out).
//!
//! - Written by the client's owner only: the put is a transaction that compares the
//!   client's ownership key with this node's id *and* this node's current lease, so a node
//!   that lost the client (fenced: its lease ran out while it was paused or cut off, and
//!   another node claimed the client) can never overwrite the record when it continues.
//! - Written in the background, in order, the newest record of a client replacing one not
//!   yet written ([`Records::send`] never blocks the caller, which has written the node's
//!   own copy to disk first). A write that etcd did not answer is tried again; a refused
//!   one is dropped (logged at WARN).
//! - A caller that must not go on before etcd has a record (an operator's reset of disks in
//!   RBD: the node that takes the client over must see it) waits for it with
//!   [`Records::stored`], bounded.
//! - Read by a node that is about to serve a client ([`Records::load`]) and by
//!   `diskless cluster clients` ([`read_all`]).
//! - No lease: a record outlives the node that wrote it (that is its purpose).

use super::etcd::{bounded, connect, op_timeout, Cluster, ClusterError};
use crate::config::ClusterConfig;
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// The key of a client's lifecycle record under the cluster's prefix.
pub fn record_key(prefix: &str, target: &str, initiator: &str) -> String {
    format!(
        "{prefix}clients/{}/{}/lifecycle",
        target.to_ascii_lowercase(),
        initiator.to_ascii_lowercase()
    )
}

/// Why a record is not (known to be) in etcd ([`Records::stored`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Not written within the bound: etcd did not answer, or answered with an error (the
    /// writer keeps trying while this node owns the client).
    #[error("etcd has not stored it within {limit:?} ({})", .reason.as_deref().unwrap_or("no answer yet"))]
    NotStored {
        limit: Duration,
        /// Why the last attempt failed, if one did.
        reason: Option<String>,
    },
    /// etcd refused it: this node does not own the client under its current lease.
    #[error("etcd refused it: node {node} does not own the client (any more)")]
    NotOwner { node: String },
    /// The writer task is gone (the runtime is stopping).
    #[error("this node's record writer has stopped")]
    Stopped,
}

/// One record waiting to be written.
#[derive(Debug)]
struct Pending {
    key: String,
    /// The client's name as its ownership key has it (the name it was placed under).
    owner_name: String,
    /// The record's write number (it grows with every record of the client).
    seq: u64,
    value: Vec<u8>,
}

/// What became of one write.
enum Written {
    Done,
    /// The transaction's comparison failed: this node does not own the client under its
    /// current lease.
    NotOwner,
}

/// Where the writer puts records: etcd, or a unit test's store.
trait Store: Send + Sync + 'static {
    /// One guarded put.
    fn put<'a>(
        &'a self,
        p: &'a Pending,
    ) -> Pin<Box<dyn Future<Output = Result<Written, ClusterError>> + Send + 'a>>;
    /// How long to wait before trying failed writes again.
    fn backoff(&self) -> Duration;
    /// This node's id.
    fn node(&self) -> String;
}

/// The cluster's etcd, through this node's client and lease.
struct EtcdStore(Arc<Cluster>);

impl Store for EtcdStore {
    fn put<'a>(
        &'a self,
        p: &'a Pending,
    ) -> Pin<Box<dyn Future<Output = Result<Written, ClusterError>> + Send + 'a>> {
        Box::pin(write(&self.0, p))
    }
    fn backoff(&self) -> Duration {
        self.0.request_timeout().max(Duration::from_millis(200))
    }
    fn node(&self) -> String {
        self.0.node_id().to_string()
    }
}

/// What the writer did with one client's records (by key), for [`Records::stored`]. One
/// small entry per client this node ever wrote.
#[derive(Debug, Default, Clone)]
struct Outcome {
    /// The newest write number etcd stored (0: none).
    stored: u64,
    /// The newest write number etcd refused (not the owner).
    refused: u64,
    /// Why the last attempt failed, while a record waits to be tried again.
    failing: Option<String>,
}

/// The queue to the writer task and what it did.
struct Writer {
    node: String,
    tx: mpsc::UnboundedSender<Pending>,
    outcomes: Arc<watch::Sender<HashMap<String, Outcome>>>,
}

impl Writer {
    /// Start the writer task (on the current runtime) over `store`.
    fn start(store: Arc<dyn Store>) -> Writer {
        let (tx, rx) = mpsc::unbounded_channel();
        let outcomes = Arc::new(watch::Sender::new(HashMap::new()));
        let node = store.node();
        tokio::spawn(write_loop(store, rx, outcomes.clone()));
        Writer { node, tx, outcomes }
    }

    fn send(&self, p: Pending) {
        // The writer runs as long as the runtime does.
        let _ = self.tx.send(p);
    }

    /// Wait until etcd stored write `seq` of `key`, or a newer one (it carries everything
    /// `seq` did and what changed since), at most `limit`.
    async fn stored(&self, key: &str, seq: u64, limit: Duration) -> Result<(), StoreError> {
        let node = self.node.clone();
        let settled = |m: &HashMap<String, Outcome>| -> Option<Result<(), StoreError>> {
            let o = m.get(key)?;
            if o.stored >= seq {
                Some(Ok(()))
            } else if o.refused >= seq {
                Some(Err(StoreError::NotOwner { node: node.clone() }))
            } else {
                None
            }
        };
        let mut rx = self.outcomes.subscribe();
        let waited = tokio::time::timeout(limit, async {
            // (In one future: the watch's read guard must not outlive the timeout.)
            match rx.wait_for(|m| settled(m).is_some()).await {
                Ok(m) => settled(&m).unwrap_or(Err(StoreError::Stopped)),
                Err(_) => Err(StoreError::Stopped),
            }
        })
        .await;
        match waited {
            Ok(r) => r,
            Err(_) => Err(StoreError::NotStored {
                limit,
                reason: self
                    .outcomes
                    .borrow()
                    .get(key)
                    .and_then(|o| o.failing.clone()),
            }),
        }
    }
}

/// This node's writer and reader of client records.
pub struct Records {
    cluster: Arc<Cluster>,
    writer: Writer,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records").finish_non_exhaustive()
    }
}

impl Records {
    /// Start the writer (a task on the current runtime).
    pub fn start(cluster: Arc<Cluster>) -> Arc<Records> {
        let writer = Writer::start(Arc::new(EtcdStore(cluster.clone())));
        Arc::new(Records { cluster, writer })
    }

    /// Queue `value`, write number `seq`, as the record of `initiator` (of boot target
    /// `target`); `owner_name`: the name its ownership key has.
    pub fn send(&self, target: &str, initiator: &str, owner_name: &str, seq: u64, value: Vec<u8>) {
        self.writer.send(Pending {
            key: record_key(&self.cluster.keys().prefix, target, initiator),
            owner_name: owner_name.to_string(),
            seq,
            value,
        });
    }

    /// The longest [`Records::stored`] waits: two requests' time, so that a write that
    /// failed once (a reconnection) is tried again, and never much longer than the lease,
    /// past which this node could not write the record anyway.
    pub fn store_limit(&self) -> Duration {
        self.cluster.request_timeout() * 2
    }

    /// Wait until etcd has write `seq` of `initiator`'s record, or a newer one, at most
    /// [`Records::store_limit`]. An error leaves the record queued (written later if this
    /// node still owns the client then).
    pub async fn stored(&self, target: &str, initiator: &str, seq: u64) -> Result<(), StoreError> {
        let key = record_key(&self.cluster.keys().prefix, target, initiator);
        self.writer.stored(&key, seq, self.store_limit()).await
    }

    /// The record of `initiator` in etcd now (None: it has none).
    pub async fn load(
        &self,
        target: &str,
        initiator: &str,
    ) -> Result<Option<Vec<u8>>, ClusterError> {
        let key = record_key(&self.cluster.keys().prefix, target, initiator);
        let mut c = self.cluster.etcd().await?;
        let resp = bounded(self.cluster.request_timeout(), c.get(key, None)).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }
}

/// Write queued records, newest per client, until the sender goes; each outcome is
/// published in `outcomes`.
async fn write_loop(
    store: Arc<dyn Store>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    outcomes: Arc<watch::Sender<HashMap<String, Outcome>>>,
) {
    let backoff = store.backoff();
    let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
    let mut down_logged = false;
    let note = |key: &str, f: &dyn Fn(&mut Outcome)| {
        outcomes.send_modify(|m| f(m.entry(key.to_string()).or_default()));
    };
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(p) => {
                    pending.insert(p.key.clone(), p);
                }
                None => return,
            }
        }
        while let Ok(p) = rx.try_recv() {
            pending.insert(p.key.clone(), p);
        }
        let mut failed = false;
        for (key, p) in std::mem::take(&mut pending) {
            match store.put(&p).await {
                Ok(Written::Done) => {
                    debug!(%key, seq = p.seq, "client lifecycle record written");
                    note(&key, &|o| {
                        o.stored = o.stored.max(p.seq);
                        o.failing = None;
                    });
                    if down_logged {
                        info!("client lifecycle records are written to etcd again");
                        down_logged = false;
                    }
                }
                Ok(Written::NotOwner) => {
                    warn!(
                        initiator = %p.owner_name,
                        node = %store.node(),
                        "this node does not own the client (any more): its lifecycle record is not written"
                    );
                    note(&key, &|o| {
                        o.refused = o.refused.max(p.seq);
                        o.failing = None;
                    });
                }
                Err(e) => {
                    if !down_logged {
                        warn!(%key, error = %e, "client lifecycle record not written yet: retrying");
                        down_logged = true;
                    }
                    let why = e.to_string();
                    note(&key, &|o| o.failing = Some(why.clone()));
                    failed = true;
                    // Unless a newer record of the client came meanwhile.
                    pending.entry(key).or_insert(p);
                }
            }
        }
        if failed {
            tokio::time::sleep(backoff).await;
        }
    }
}

/// One guarded put: only while the client's ownership key names this node and is bound to
/// its current lease (the key goes with the lease, so a node whose lease ran out fails the
/// comparison even if nobody claimed the client since).
async fn write(cluster: &Cluster, p: &Pending) -> Result<Written, ClusterError> {
    let me = cluster.node_id();
    let Some(lease) = cluster.lease_id() else {
        // Not registered now: written once it is again (and owns the client).
        return Err(ClusterError::LeaseGone(me.to_string()));
    };
    let owner = cluster.keys().owner(&p.owner_name);
    let txn = Txn::new()
        .when([
            Compare::value(owner.as_str(), CompareOp::Equal, me),
            Compare::lease(owner.as_str(), CompareOp::Equal, lease),
        ])
        .and_then([TxnOp::put(p.key.as_str(), p.value.clone(), None)]);
    let mut c = cluster.etcd().await?;
    let resp = bounded(cluster.request_timeout(), c.txn(txn)).await?;
    Ok(if resp.succeeded() {
        Written::Done
    } else {
        Written::NotOwner
    })
}

/// Every client record of the cluster (key, JSON) and the ownership keys (initiator →
/// node), read once (`diskless cluster clients`).
pub async fn read_all(
    cfg: &ClusterConfig,
) -> Result<(Vec<(String, Vec<u8>)>, BTreeMap<String, String>), ClusterError> {
    let mut client = connect(cfg).await?;
    let keys = super::placement::Keys::new(&cfg.name);
    let limit = op_timeout(Duration::from_secs(cfg.lease_ttl));
    let prefix = format!("{}clients/", keys.prefix);
    let resp = bounded(
        limit,
        client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let records = lifecycle_records(&resp);
    let prefix = format!("{}owners/", keys.prefix);
    let resp = bounded(
        limit,
        client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let owners = resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let who = key.strip_prefix(&prefix)?.to_string();
            Some((who, String::from_utf8_lossy(kv.value()).into_owned()))
        })
        .collect();
    Ok((records, owners))
}

/// The lifecycle records (key, JSON) among the keys under `clients/`.
fn lifecycle_records(resp: &etcd_client::GetResponse) -> Vec<(String, Vec<u8>)> {
    resp.kvs()
        .iter()
        .filter_map(|kv| {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            key.ends_with("/lifecycle")
                .then(|| (key, kv.value().to_vec()))
        })
        .collect()
}

/// Every client record of the cluster (key, JSON), read with this node's etcd client in
/// one request bounded by the request timeout (the API's cluster-wide clients view).
pub async fn read_records(cluster: &Cluster) -> Result<Vec<(String, Vec<u8>)>, ClusterError> {
    let prefix = format!("{}clients/", cluster.keys().prefix);
    let mut c = cluster.etcd().await?;
    let resp = bounded(
        cluster.request_timeout(),
        c.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    Ok(lifecycle_records(&resp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_lowercase_and_not_shared_records() {
        let keys = super::super::placement::Keys::new("lab");
        let k = record_key(&keys.prefix, "IQN.T:boot", "iqn.X:Client-1");
        assert_eq!(
            k,
            "/diskless/lab/clients/iqn.t:boot/iqn.x:client-1/lifecycle"
        );
        // Beside the next-boot override of the same client, never taken for it.
        assert_eq!(keys.shared(&k), None);
        let mut view = super::super::placement::View::default();
        view.apply(
            &keys,
            &super::super::placement::Change::Put {
                key: k,
                value: b"{}".to_vec(),
            },
        );
        assert_eq!(view, super::super::placement::View::default());
    }

    /// A record store in memory standing in for etcd: answering or not, this node the
    /// client's owner or not; the writes it took, in order.
    struct MemStore {
        up: std::sync::atomic::AtomicBool,
        owner: std::sync::atomic::AtomicBool,
        puts: std::sync::Mutex<Vec<(String, u64)>>,
    }

    impl MemStore {
        fn new() -> Arc<MemStore> {
            Arc::new(MemStore {
                up: true.into(),
                owner: true.into(),
                puts: Default::default(),
            })
        }
        fn set(&self, up: bool, owner: bool) {
            use std::sync::atomic::Ordering::SeqCst;
            self.up.store(up, SeqCst);
            self.owner.store(owner, SeqCst);
        }
        fn puts(&self) -> Vec<(String, u64)> {
            self.puts.lock().map(|p| p.clone()).unwrap_or_default()
        }
    }

    impl Store for MemStore {
        fn put<'a>(
            &'a self,
            p: &'a Pending,
        ) -> Pin<Box<dyn Future<Output = Result<Written, ClusterError>> + Send + 'a>> {
            use std::sync::atomic::Ordering::SeqCst;
            Box::pin(async move {
                if !self.up.load(SeqCst) {
                    return Err(ClusterError::Timeout(Duration::from_millis(5)));
                }
                if !self.owner.load(SeqCst) {
                    return Ok(Written::NotOwner);
                }
                if let Ok(mut puts) = self.puts.lock() {
                    puts.push((p.key.clone(), p.seq));
                }
                Ok(Written::Done)
            })
        }
        fn backoff(&self) -> Duration {
            Duration::from_millis(5)
        }
        fn node(&self) -> String {
            "n1".into()
        }
    }

    fn pending(key: &str, seq: u64) -> Pending {
        Pending {
            key: key.into(),
            owner_name: "iqn.x:c1".into(),
            seq,
            value: format!("{{\"seq\":{seq}}}").into_bytes(),
        }
    }

    /// Long enough never to be reached when the store answers (a loaded machine).
    const PATIENT: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn stored_waits_for_the_write_and_says_why_not() {
        let store = MemStore::new();
        let w = Writer::start(store.clone());

        // etcd answers: the wait ends once the record is in.
        w.send(pending("a", 1));
        assert_eq!(w.stored("a", 1, PATIENT).await, Ok(()));
        assert_eq!(store.puts(), vec![("a".to_string(), 1)]);
        // An older write number is covered by the newer record already stored.
        assert_eq!(w.stored("a", 1, PATIENT).await, Ok(()));

        // etcd does not answer: the wait ends at its bound with the reason, the record
        // stays queued and is written once etcd answers again.
        store.set(false, true);
        w.send(pending("a", 2));
        // (The writer's first failed attempt, so that the bound below is all that is waited.)
        let mut seen = w.outcomes.subscribe();
        let failed = seen.wait_for(|m| m.get("a").is_some_and(|o| o.failing.is_some()));
        assert!(tokio::time::timeout(PATIENT, failed).await.is_ok());
        let limit = Duration::from_millis(50);
        let e = w.stored("a", 2, limit).await.unwrap_err();
        assert_eq!(
            e,
            StoreError::NotStored {
                limit,
                reason: Some("etcd did not answer within 5ms".into())
            }
        );
        assert!(e.to_string().contains("etcd did not answer"), "{e}");
        // A record never sent is not stored either (nothing written for "b").
        assert!(matches!(
            w.stored("b", 1, Duration::from_millis(10)).await,
            Err(StoreError::NotStored { reason: None, .. })
        ));
        // Meanwhile a newer record of the client replaces the queued one; it carries what
        // write 2 did, so it ends a wait for write 2.
        w.send(pending("a", 3));
        store.set(true, true);
        assert_eq!(w.stored("a", 2, PATIENT).await, Ok(()));
        assert_eq!(w.stored("a", 3, PATIENT).await, Ok(()));
        let puts = store.puts();
        assert_eq!(puts.last(), Some(&("a".to_string(), 3)), "{puts:?}");
        assert!(!puts.contains(&("a".to_string(), 2)), "replaced: {puts:?}");
    }

    #[tokio::test]
    async fn stored_fails_at_once_when_etcd_refuses_the_writer() {
        let store = MemStore::new();
        let w = Writer::start(store.clone());
        store.set(true, false);
        w.send(pending("a", 7));
        // Refused: known at once, not after the bound.
        let t = std::time::Instant::now();
        let e = w.stored("a", 7, PATIENT).await.unwrap_err();
        assert!(t.elapsed() < PATIENT);
        assert_eq!(e, StoreError::NotOwner { node: "n1".into() });
        assert!(e.to_string().contains("does not own the client"), "{e}");
        assert!(store.puts().is_empty());
    }
}
