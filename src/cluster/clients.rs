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
//! - Read by a node that is about to serve a client ([`Records::load`]) and by
//!   `diskless cluster clients` ([`read_all`]).
//! - No lease: a record outlives the node that wrote it (that is its purpose).

use super::etcd::{bounded, connect, op_timeout, Cluster, ClusterError};
use crate::config::ClusterConfig;
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// The key of a client's lifecycle record under the cluster's prefix.
pub fn record_key(prefix: &str, target: &str, initiator: &str) -> String {
    format!(
        "{prefix}clients/{}/{}/lifecycle",
        target.to_ascii_lowercase(),
        initiator.to_ascii_lowercase()
    )
}

/// One record waiting to be written.
#[derive(Debug)]
struct Pending {
    key: String,
    /// The client's name as its ownership key has it (the name it was placed under).
    owner_name: String,
    value: Vec<u8>,
}

/// This node's writer and reader of client records.
pub struct Records {
    cluster: Arc<Cluster>,
    tx: mpsc::UnboundedSender<Pending>,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records").finish_non_exhaustive()
    }
}

/// What became of one write.
enum Written {
    Done,
    /// The transaction's comparison failed: this node does not own the client under its
    /// current lease.
    NotOwner,
}

impl Records {
    /// Start the writer (a task on the current runtime).
    pub fn start(cluster: Arc<Cluster>) -> Arc<Records> {
        let (tx, rx) = mpsc::unbounded_channel();
        let me = Arc::new(Records {
            cluster: cluster.clone(),
            tx,
        });
        tokio::spawn(write_loop(cluster, rx));
        me
    }

    /// Queue `value` as the record of `initiator` (of boot target `target`); `owner_name`:
    /// the name its ownership key has.
    pub fn send(&self, target: &str, initiator: &str, owner_name: &str, value: Vec<u8>) {
        let p = Pending {
            key: record_key(&self.cluster.keys().prefix, target, initiator),
            owner_name: owner_name.to_string(),
            value,
        };
        // The writer runs as long as the runtime does.
        let _ = self.tx.send(p);
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

/// Write queued records, newest per client, until the sender goes.
async fn write_loop(cluster: Arc<Cluster>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let backoff = cluster.request_timeout().max(Duration::from_millis(200));
    let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
    let mut down_logged = false;
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
            match write(&cluster, &p).await {
                Ok(Written::Done) => {
                    debug!(%key, "client lifecycle record written");
                    if down_logged {
                        info!("client lifecycle records are written to etcd again");
                        down_logged = false;
                    }
                }
                Ok(Written::NotOwner) => warn!(
                    initiator = %p.owner_name,
                    node = %cluster.node_id(),
                    "this node does not own the client (any more): its lifecycle record is not written"
                ),
                Err(e) => {
                    if !down_logged {
                        warn!(%key, error = %e, "client lifecycle record not written yet: retrying");
                        down_logged = true;
                    }
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
}
