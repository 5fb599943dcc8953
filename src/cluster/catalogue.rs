//! The image catalogue in etcd (issue 13 item 2; docs/scale-out.md, "Image catalogue"): the
//! published versions of each image in the object store, and movable pointers (`latest`,
//! channels such as `test` or `production`) that every node follows.
//!
//! Keys, under `/diskless/<cluster>/catalogue/<image>/` (`<image>` is the name in the bucket):
//! - `versions/<version>`: a [`VersionRecord`] (JSON), created once, only after the version's
//!   manifest exists in the store (S3 first, etcd second: a record never names a missing
//!   version).
//! - `pointers/<name>`: a [`Pointer`] (JSON): `latest` and the channels. Moved only by a
//!   transaction that compares the pointer's mod revision with the one read (compare-and-swap):
//!   of two operators racing, one gets "moved meanwhile", none is silently lost.
//! - `seq`: the last sequence number given to a version of the image (the series number a
//!   node's clients see as `name@seq`).
//!
//! The pure part (keys, the view, resolving a configuration) is tested here; the etcd part is
//! tested by tests/cluster_catalogue.rs against a real etcd and Ceph RGW.

use super::etcd::{bounded, connect, op_timeout, ClusterError};
use super::placement::{Change, Keys};
use crate::config::{ClusterConfig, Config};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tracing::{info, warn};

/// The pointer every push moves.
pub const LATEST: &str = "latest";

/// One published version (`versions/<version>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: String,
    /// Per image, 1, 2, 3... in the order of publication.
    pub seq: u64,
    pub time_ms: u64,
    pub author: String,
    #[serde(default)]
    pub message: String,
    pub size: u64,
    pub chunk_size: u64,
    pub block_size: u32,
    /// A digest of the version's manifest: the record is of exactly this upload.
    pub uid: String,
    /// `bucket/key` of the manifest.
    pub manifest: String,
    /// Marked by `image gc` before its objects are deleted: no pointer may name it again
    /// and no node resolves to it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

/// A movable pointer (`pointers/<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pointer {
    pub version: String,
    pub by: String,
    pub time_ms: u64,
    /// Where it pointed before this move.
    #[serde(default)]
    pub previous: Option<String>,
}

/// One image's part of the catalogue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageEntry {
    pub versions: BTreeMap<String, VersionRecord>,
    pub pointers: BTreeMap<String, Pointer>,
}

impl ImageEntry {
    /// Versions in publication order.
    pub fn in_order(&self) -> Vec<&VersionRecord> {
        let mut v: Vec<&VersionRecord> = self.versions.values().collect();
        v.sort_by_key(|r| (r.seq, r.time_ms));
        v
    }
}

/// What a node knows of the catalogue: every image's entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalogue {
    pub images: BTreeMap<String, ImageEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("{0}")]
    Cluster(#[from] ClusterError),
    #[error("image {image} has no version {version:?} in the catalogue (versions: {known})")]
    NoVersion {
        image: String,
        version: String,
        known: String,
    },
    #[error("{image}:{pointer} moved meanwhile (now {}): nothing changed; look at `diskless image log {image}` and run again", .now.as_deref().unwrap_or("unset"))]
    Conflict {
        image: String,
        pointer: String,
        now: Option<String>,
    },
    #[error("{image}@{version} is in the catalogue already from another upload (uid {uid})")]
    Exists {
        image: String,
        version: String,
        uid: String,
    },
    #[error("{0}")]
    Refused(String),
    #[error("the catalogue kept changing under the push: retry")]
    Busy,
}

/// Which catalogue record a key is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CatKey {
    Version(String, String),
    Pointer(String, String),
    Seq(String),
}

fn root(keys: &Keys) -> String {
    format!("{}catalogue/", keys.prefix)
}

fn image_prefix(keys: &Keys, image: &str) -> String {
    format!("{}{image}/", root(keys))
}

pub fn version_key(keys: &Keys, image: &str, version: &str) -> String {
    format!("{}versions/{version}", image_prefix(keys, image))
}

pub fn pointer_key(keys: &Keys, image: &str, pointer: &str) -> String {
    format!("{}pointers/{pointer}", image_prefix(keys, image))
}

fn seq_key(keys: &Keys, image: &str) -> String {
    format!("{}seq", image_prefix(keys, image))
}

fn parse_key(keys: &Keys, key: &str) -> Option<CatKey> {
    let rest = key.strip_prefix(&root(keys))?;
    let (image, rest) = rest.split_once('/')?;
    if image.is_empty() {
        return None;
    }
    if rest == "seq" {
        return Some(CatKey::Seq(image.to_string()));
    }
    let (kind, name) = rest.split_once('/')?;
    if name.is_empty() || name.contains('/') {
        return None;
    }
    match kind {
        "versions" => Some(CatKey::Version(image.to_string(), name.to_string())),
        "pointers" => Some(CatKey::Pointer(image.to_string(), name.to_string())),
        _ => None,
    }
}

impl Catalogue {
    /// Apply one change; true when the key is a catalogue record. Malformed records are
    /// ignored (logged): a pointer that does not parse is as good as absent.
    pub fn apply(&mut self, keys: &Keys, change: &Change) -> bool {
        let (key, value) = match change {
            Change::Put { key, value } => (key, Some(value.as_slice())),
            Change::Delete { key } => (key, None),
        };
        let Some(which) = parse_key(keys, key) else {
            return false;
        };
        match which {
            CatKey::Seq(_) => {}
            CatKey::Version(image, v) => {
                let e = self.images.entry(image).or_default();
                match value.map(serde_json::from_slice::<VersionRecord>) {
                    Some(Ok(r)) => {
                        e.versions.insert(v, r);
                    }
                    Some(Err(err)) => {
                        warn!(key = %key, error = %err, "malformed catalogue record ignored");
                        e.versions.remove(&v);
                    }
                    None => {
                        e.versions.remove(&v);
                    }
                }
            }
            CatKey::Pointer(image, p) => {
                let e = self.images.entry(image).or_default();
                match value.map(serde_json::from_slice::<Pointer>) {
                    Some(Ok(r)) => {
                        e.pointers.insert(p, r);
                    }
                    Some(Err(err)) => {
                        warn!(key = %key, error = %err, "malformed catalogue pointer ignored");
                        e.pointers.remove(&p);
                    }
                    None => {
                        e.pointers.remove(&p);
                    }
                }
            }
        }
        true
    }

    /// The catalogue in a listing (keys outside it are skipped).
    pub fn from_changes(keys: &Keys, changes: &[Change]) -> Catalogue {
        let mut c = Catalogue::default();
        for ch in changes {
            c.apply(keys, ch);
        }
        c
    }

    /// The version `pointer` of `image` names (it must be recorded).
    pub fn resolve(&self, image: &str, pointer: &str) -> Result<&VersionRecord, String> {
        let e = self
            .images
            .get(image)
            .ok_or_else(|| format!("image {image} has no version in the catalogue"))?;
        let p = e
            .pointers
            .get(pointer)
            .ok_or_else(|| format!("{image}:{pointer} is not set in the catalogue"))?;
        let r = e.versions.get(&p.version).ok_or_else(|| {
            format!(
                "{image}:{pointer} names version {}, which is not in the catalogue",
                p.version
            )
        })?;
        if r.deleting {
            return Err(format!(
                "{image}:{pointer} names version {}, which `image gc` is deleting",
                p.version
            ));
        }
        Ok(r)
    }
}

/// The version a node serves for an `images:` entry that follows a pointer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    pub image: String,
    pub pointer: String,
    pub version: String,
    pub seq: u64,
}

/// `images:` entry name → the version it serves.
pub type Resolution = BTreeMap<String, Resolved>;

/// Give every `images[].s3` entry that follows a pointer (`version: latest`, `channel:`) the
/// version the pointer names in `cat`. Without a catalogue (etcd never answered), or when the
/// pointer is not there, the entry keeps the version in `kept` (what the node served before,
/// if it follows the same pointer); otherwise it is an error naming the entry.
pub fn resolve_config(
    config: &mut Config,
    cat: Option<&Catalogue>,
    kept: &Resolution,
) -> Result<Resolution, String> {
    let mut out = Resolution::new();
    for (i, im) in config.images.iter_mut().enumerate() {
        let Some(s3) = im.s3.as_mut() else { continue };
        let Some(pointer) = s3.pointer().map(str::to_string) else {
            continue;
        };
        let image = s3.image_name(&im.name).to_string();
        let found = match cat {
            Some(c) => c.resolve(&image, &pointer).map(|r| Resolved {
                image: image.clone(),
                pointer: pointer.clone(),
                version: r.version.clone(),
                seq: r.seq,
            }),
            None => Err("etcd has not answered since this node started".to_string()),
        };
        let r = match found {
            Ok(r) => r,
            Err(why) => match kept.get(&im.name) {
                Some(k) if k.image == image && k.pointer == pointer => {
                    warn!(image = %im.name, version = %k.version, reason = %why,
                        "image catalogue: keeping the version this node has");
                    k.clone()
                }
                _ => {
                    return Err(format!(
                        "images[{i}].s3 ({}): {why}, and this node has no version of it",
                        im.name
                    ))
                }
            },
        };
        s3.version = r.version.clone();
        s3.resolved_seq = Some(r.seq);
        out.insert(im.name.clone(), r);
    }
    Ok(out)
}

/// Whether `config` names a catalogue pointer anywhere.
pub fn follows_pointers(config: &Config) -> bool {
    config
        .images
        .iter()
        .any(|i| i.s3.as_ref().is_some_and(|s| s.pointer().is_some()))
}

/// The node's copy of the catalogue (kept by the cluster's watch) and the versions it serves
/// now ("in force"), saved in the state directory so that a node restarted without etcd keeps
/// the versions it had.
#[derive(Debug, Default)]
pub struct Follower {
    state: Mutex<FollowerState>,
    cache: OnceLock<PathBuf>,
}

#[derive(Debug, Default)]
struct FollowerState {
    view: Option<Catalogue>,
    /// Counts the changes of `view`: a [`Ticket`] says which copy it was resolved from.
    view_gen: u64,
    in_force: Resolution,
    /// The `view_gen` of the resolution in force.
    committed_gen: u64,
}

/// A resolution made from one copy of the catalogue ([`Follower::resolve`]), to be
/// committed once the registry serves it ([`Follower::commit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub resolution: Resolution,
    gen: u64,
}

/// The file, in the state directory, of the versions a node serves for pointers.
pub const CACHE_FILE: &str = "catalogue-in-force.json";

impl Follower {
    fn lock(&self) -> std::sync::MutexGuard<'_, FollowerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the versions in force are kept; reads them (a missing or unreadable file is an
    /// empty set, logged when unreadable).
    pub fn set_state_dir(&self, dir: &Path) {
        let path = dir.join(CACHE_FILE);
        if let Ok(text) = std::fs::read(&path) {
            match serde_json::from_slice::<Resolution>(&text) {
                Ok(r) => self.lock().in_force = r,
                Err(e) => warn!(file = %path.display(), error = %e, "ignored"),
            }
        }
        let _ = self.cache.set(path);
    }

    /// A listing: the whole catalogue again. True when it differs from the copy.
    pub fn relist(&self, keys: &Keys, changes: &[Change]) -> bool {
        let c = Catalogue::from_changes(keys, changes);
        let mut st = self.lock();
        let changed = st.view.as_ref() != Some(&c);
        if changed {
            st.view_gen += 1;
        }
        st.view = Some(c);
        changed
    }

    /// One watched change; true when it is a catalogue record.
    pub fn apply(&self, keys: &Keys, change: &Change) -> bool {
        let mut st = self.lock();
        let applied = match st.view.as_mut() {
            Some(v) => v.apply(keys, change),
            None => false,
        };
        if applied {
            st.view_gen += 1;
        }
        applied
    }

    /// Install a catalogue read once (at start, before the watch lists it).
    pub fn seed(&self, c: Catalogue) {
        let mut st = self.lock();
        if st.view.is_none() {
            st.view = Some(c);
            st.view_gen += 1;
        }
    }

    pub fn view(&self) -> Option<Catalogue> {
        self.lock().view.clone()
    }

    pub fn in_force(&self) -> Resolution {
        self.lock().in_force.clone()
    }

    /// [`resolve_config`] with this node's copy and the versions it serves now.
    pub fn resolve(&self, config: &mut Config) -> Result<Ticket, String> {
        let st = self.lock();
        let resolution = resolve_config(config, st.view.as_ref(), &st.in_force)?;
        Ok(Ticket {
            resolution,
            gen: st.view_gen,
        })
    }

    /// Whether resolving `config` now gives other versions than those in force.
    pub fn moves(&self, config: &Config) -> bool {
        let mut c = config.clone();
        match self.resolve(&mut c) {
            Ok(t) => t.resolution != self.in_force(),
            // A reload will say why.
            Err(_) => true,
        }
    }

    /// The registry now serves `t`: save it, then log what moved (saved first, so that a
    /// node killed after the line was logged restarts on what the line said). A ticket
    /// resolved from an older copy of the catalogue than the one in force is refused
    /// (false): two reloads finishing out of order must not leave the older pointer in
    /// force, nor in the state directory. Saving and logging happen under the lock, so the
    /// file and the log follow the order of the commits.
    pub fn commit(&self, t: Ticket) -> bool {
        let mut st = self.lock();
        if t.gen < st.committed_gen {
            warn!(
                resolved_from = t.gen,
                in_force_from = st.committed_gen,
                "image catalogue: a resolution older than the one in force is not committed"
            );
            return false;
        }
        st.committed_gen = t.gen;
        let r = t.resolution;
        let old = std::mem::replace(&mut st.in_force, r.clone());
        if r == old {
            return true;
        }
        if let Some(path) = self.cache.get() {
            if let Some(d) = path.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            let tmp = path.with_extension("json.tmp");
            let res = serde_json::to_vec_pretty(&r)
                .map_err(std::io::Error::other)
                .and_then(|b| std::fs::write(&tmp, b))
                .and_then(|()| std::fs::rename(&tmp, path));
            if let Err(e) = res {
                warn!(file = %path.display(), error = %e, "cannot save the versions in force");
            }
        }
        for (entry, now) in &r {
            match old.get(entry) {
                Some(o) if o == now => {}
                o => {
                    info!(image = %entry, pointer = %now.pointer, version = %now.version, seq = now.seq,
                    before = o.map_or("-", |o| o.version.as_str()),
                    "image catalogue: new boots take this version; running clients keep theirs until their next boot")
                }
            }
        }
        true
    }
}

/// The whole catalogue, read once (a node's start, before its watch runs).
pub async fn read_all(cfg: &ClusterConfig) -> Result<Catalogue, ClusterError> {
    let keys = Keys::new(&cfg.name);
    let limit = op_timeout(Duration::from_secs(cfg.lease_ttl));
    let mut c = connect(cfg).await?;
    let prefix = root(&keys);
    let resp = bounded(
        limit,
        c.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let changes: Vec<Change> = resp
        .kvs()
        .iter()
        .map(|kv| Change::Put {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
        })
        .collect();
    Ok(Catalogue::from_changes(&keys, &changes))
}

/// One image's records with the revisions a compare-and-swap needs.
struct Read {
    entry: ImageEntry,
    /// Mod revision of each pointer key.
    pointer_rev: BTreeMap<String, i64>,
    /// Mod revision of each version key.
    version_rev: BTreeMap<String, i64>,
    seq: u64,
    seq_rev: i64,
}

async fn read_image(
    c: &mut etcd_client::Client,
    keys: &Keys,
    image: &str,
    limit: Duration,
) -> Result<Read, ClusterError> {
    let prefix = image_prefix(keys, image);
    let resp = bounded(
        limit,
        c.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let mut cat = Catalogue::default();
    let mut read = Read {
        entry: ImageEntry::default(),
        pointer_rev: BTreeMap::new(),
        version_rev: BTreeMap::new(),
        seq: 0,
        seq_rev: 0,
    };
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match parse_key(keys, &key) {
            Some(CatKey::Seq(_)) => {
                read.seq = std::str::from_utf8(kv.value())
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                read.seq_rev = kv.mod_revision();
            }
            Some(CatKey::Pointer(_, p)) => {
                read.pointer_rev.insert(p, kv.mod_revision());
            }
            Some(CatKey::Version(_, v)) => {
                read.version_rev.insert(v, kv.mod_revision());
            }
            _ => {}
        }
        cat.apply(
            keys,
            &Change::Put {
                key,
                value: kv.value().to_vec(),
            },
        );
    }
    read.entry = cat.images.remove(image).unwrap_or_default();
    Ok(read)
}

/// One image's catalogue (`diskless image log` in a cluster).
pub async fn read_image_entry(
    cfg: &ClusterConfig,
    image: &str,
) -> Result<ImageEntry, ClusterError> {
    let keys = Keys::new(&cfg.name);
    let limit = op_timeout(Duration::from_secs(cfg.lease_ttl));
    let mut c = connect(cfg).await?;
    Ok(read_image(&mut c, &keys, image, limit).await?.entry)
}

/// What [`record`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded now with this sequence number; `latest` moved from `previous`.
    New { seq: u64, previous: Option<String> },
    /// The catalogue had this very upload already.
    Already { seq: u64 },
}

/// Record a pushed version (its manifest exists in the store) and move `latest` to it, in one
/// transaction: the version key is created only if absent, and the sequence counter and
/// `latest` only if nobody moved them since they were read (else read again and retry).
pub async fn record(
    cfg: &ClusterConfig,
    image: &str,
    mut rec: VersionRecord,
) -> Result<Recorded, CatalogueError> {
    let keys = Keys::new(&cfg.name);
    let limit = op_timeout(Duration::from_secs(cfg.lease_ttl));
    let mut c = connect(cfg).await?;
    let vkey = version_key(&keys, image, &rec.version);
    let (skey, lkey) = (seq_key(&keys, image), pointer_key(&keys, image, LATEST));
    for _ in 0..16 {
        let read = read_image(&mut c, &keys, image, limit).await?;
        if let Some(have) = read.entry.versions.get(&rec.version) {
            if have.uid == rec.uid {
                return Ok(Recorded::Already { seq: have.seq });
            }
            return Err(CatalogueError::Exists {
                image: image.into(),
                version: rec.version.clone(),
                uid: have.uid.clone(),
            });
        }
        let top = read
            .entry
            .versions
            .values()
            .map(|v| v.seq)
            .max()
            .unwrap_or(0);
        rec.seq = read.seq.max(top) + 1;
        let previous = read.entry.pointers.get(LATEST).map(|p| p.version.clone());
        let latest = Pointer {
            version: rec.version.clone(),
            by: rec.author.clone(),
            time_ms: rec.time_ms,
            previous: previous.clone(),
        };
        let lrev = read.pointer_rev.get(LATEST).copied().unwrap_or(0);
        let txn = Txn::new()
            .when([
                Compare::create_revision(vkey.as_str(), CompareOp::Equal, 0),
                Compare::mod_revision(skey.as_str(), CompareOp::Equal, read.seq_rev),
                Compare::mod_revision(lkey.as_str(), CompareOp::Equal, lrev),
            ])
            .and_then([
                TxnOp::put(vkey.as_str(), json(&rec), None),
                TxnOp::put(skey.as_str(), rec.seq.to_string(), None),
                TxnOp::put(lkey.as_str(), json(&latest), None),
            ]);
        let resp = bounded(limit, c.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(Recorded::New {
                seq: rec.seq,
                previous,
            });
        }
    }
    Err(CatalogueError::Busy)
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// What [`move_pointer`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub previous: Option<String>,
    /// The pointer was there already: nothing written.
    pub unchanged: bool,
}

/// Point `pointer` (`latest` or a channel) of `image` at `to` (None: remove a channel), by a
/// compare-and-swap against the pointer as read here (and, with `expect`, only if it names
/// that version now). Of two operators racing, the second gets [`CatalogueError::Conflict`].
pub async fn move_pointer(
    cfg: &ClusterConfig,
    image: &str,
    pointer: &str,
    to: Option<&str>,
    expect: Option<&str>,
    by: &str,
    now_ms: u64,
) -> Result<Moved, CatalogueError> {
    let keys = Keys::new(&cfg.name);
    let limit = op_timeout(Duration::from_secs(cfg.lease_ttl));
    if pointer.is_empty() || pointer.contains('/') {
        return Err(CatalogueError::Refused(format!(
            "{pointer:?} is not a pointer name"
        )));
    }
    let mut c = connect(cfg).await?;
    let read = read_image(&mut c, &keys, image, limit).await?;
    let current = read.entry.pointers.get(pointer).map(|p| p.version.clone());
    let conflict = |now: Option<String>| CatalogueError::Conflict {
        image: image.into(),
        pointer: pointer.into(),
        now,
    };
    if let Some(e) = expect {
        if current.as_deref() != Some(e) {
            return Err(conflict(current));
        }
    }
    if current.as_deref() == to {
        return Ok(Moved {
            previous: current,
            unchanged: true,
        });
    }
    let pkey = pointer_key(&keys, image, pointer);
    let rev = read.pointer_rev.get(pointer).copied().unwrap_or(0);
    let txn = match to {
        Some(v) => {
            if read.entry.versions.get(v).is_some_and(|r| r.deleting) {
                return Err(CatalogueError::Refused(format!(
                    "{image}@{v} is being deleted by `image gc`: no pointer may name it"
                )));
            }
            if !read.entry.versions.contains_key(v) {
                let known: Vec<&str> = read
                    .entry
                    .in_order()
                    .iter()
                    .map(|r| r.version.as_str())
                    .collect();
                return Err(CatalogueError::NoVersion {
                    image: image.into(),
                    version: v.into(),
                    known: if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    },
                });
            }
            let p = Pointer {
                version: v.to_string(),
                by: by.to_string(),
                time_ms: now_ms,
                previous: current.clone(),
            };
            // The version's record is written again (unchanged) in the same transaction,
            // which compares its mod revision: a move racing `image gc`'s mark of the
            // version fails, and the mark (which compares it too) fails after a move.
            let vkey = version_key(&keys, image, v);
            let vrev = read.version_rev.get(v).copied().unwrap_or(0);
            let vrec = read.entry.versions.get(v).map(json).unwrap_or_default();
            Txn::new()
                .when([
                    Compare::mod_revision(pkey.as_str(), CompareOp::Equal, rev),
                    Compare::mod_revision(vkey.as_str(), CompareOp::Equal, vrev),
                    Compare::create_revision(vkey.as_str(), CompareOp::Greater, 0),
                ])
                .and_then([
                    TxnOp::put(pkey.as_str(), json(&p), None),
                    TxnOp::put(vkey.as_str(), vrec, None),
                ])
        }
        None if pointer == LATEST => {
            return Err(CatalogueError::Refused(
                "latest cannot be removed (roll back to a version instead)".into(),
            ))
        }
        None => Txn::new()
            .when([Compare::mod_revision(pkey.as_str(), CompareOp::Equal, rev)])
            .and_then([TxnOp::delete(pkey.as_str(), None)]),
    };
    let resp = bounded(limit, c.txn(txn)).await?;
    if resp.succeeded() {
        return Ok(Moved {
            previous: current,
            unchanged: false,
        });
    }
    let now = read_image(&mut c, &keys, image, limit)
        .await
        .ok()
        .and_then(|r| r.entry.pointers.get(pointer).map(|p| p.version.clone()));
    Err(conflict(now))
}

/// The versions `image gc` deletes, oldest first: none that a pointer names, none in
/// `in_use` (sequence numbers a client disk record or a session uses), none of the newest
/// `keep`; a version marked deleting already (an interrupted gc) is always in the plan.
pub fn gc_plan(entry: &ImageEntry, keep: usize, in_use: &BTreeSet<u64>) -> Vec<VersionRecord> {
    let named: BTreeSet<&str> = entry
        .pointers
        .values()
        .map(|p| p.version.as_str())
        .collect();
    let order = entry.in_order();
    let newest: BTreeSet<&str> = order
        .iter()
        .rev()
        .take(keep)
        .map(|r| r.version.as_str())
        .collect();
    order
        .into_iter()
        .filter(|r| {
            r.deleting
                || !(named.contains(r.version.as_str())
                    || newest.contains(r.version.as_str())
                    || in_use.contains(&r.seq))
        })
        .cloned()
        .collect()
}

/// Mark `version` of `image` deleting, by a transaction that compares the version's record
/// and every pointer with what was read here: a pointer moved (to it) meanwhile refuses the
/// mark (the move rewrites the record), and once marked, a move to it is refused.
pub async fn mark_deleting(
    cfg: &ClusterConfig,
    image: &str,
    version: &str,
) -> Result<VersionRecord, CatalogueError> {
    let keys = Keys::new(&cfg.name);
    let limit = op_timeout(Duration::from_secs(cfg.lease_ttl));
    let mut c = connect(cfg).await?;
    let read = read_image(&mut c, &keys, image, limit).await?;
    let Some(mut rec) = read.entry.versions.get(version).cloned() else {
        return Err(CatalogueError::NoVersion {
            image: image.into(),
            version: version.into(),
            known: "see image log".into(),
        });
    };
    if rec.deleting {
        return Ok(rec);
    }
    if let Some((p, _)) = read
        .entry
        .pointers
        .iter()
        .find(|(_, p)| p.version == version)
    {
        return Err(CatalogueError::Refused(format!(
            "{image}:{p} names {version}: not deleted"
        )));
    }
    rec.deleting = true;
    let vkey = version_key(&keys, image, version);
    let vrev = read.version_rev.get(version).copied().unwrap_or(0);
    let mut when = vec![Compare::mod_revision(vkey.as_str(), CompareOp::Equal, vrev)];
    for (p, rev) in &read.pointer_rev {
        when.push(Compare::mod_revision(
            pointer_key(&keys, image, p),
            CompareOp::Equal,
            *rev,
        ));
    }
    let txn = Txn::new()
        .when(when)
        .and_then([TxnOp::put(vkey.as_str(), json(&rec), None)]);
    if bounded(limit, c.txn(txn)).await?.succeeded() {
        Ok(rec)
    } else {
        Err(CatalogueError::Conflict {
            image: image.into(),
            pointer: format!("{version} (a pointer or the version's record)"),
            now: None,
        })
    }
}

/// Remove the record of `version`, marked deleting (its objects are gone).
pub async fn forget(cfg: &ClusterConfig, image: &str, version: &str) -> Result<(), CatalogueError> {
    let keys = Keys::new(&cfg.name);
    let limit = op_timeout(Duration::from_secs(cfg.lease_ttl));
    let mut c = connect(cfg).await?;
    let read = read_image(&mut c, &keys, image, limit).await?;
    if !read.entry.versions.get(version).is_some_and(|r| r.deleting) {
        return Err(CatalogueError::Refused(format!(
            "{image}@{version} is not marked deleting"
        )));
    }
    let vkey = version_key(&keys, image, version);
    let vrev = read.version_rev.get(version).copied().unwrap_or(0);
    let txn = Txn::new()
        .when([Compare::mod_revision(vkey.as_str(), CompareOp::Equal, vrev)])
        .and_then([TxnOp::delete(vkey.as_str(), None)]);
    if bounded(limit, c.txn(txn)).await?.succeeded() {
        Ok(())
    } else {
        Err(CatalogueError::Busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: &str, seq: u64) -> VersionRecord {
        VersionRecord {
            version: v.into(),
            seq,
            time_ms: seq * 1000,
            author: "op".into(),
            message: format!("m{seq}"),
            size: 1 << 20,
            chunk_size: 1 << 20,
            block_size: 512,
            uid: format!("u{seq}"),
            manifest: format!("b/img/{v}/manifest.json"),
            deleting: false,
        }
    }

    #[test]
    fn gc_plans_keep_pointers_newest_and_used_versions() {
        let keys = Keys::new("lab");
        let mut changes: Vec<Change> = (1..=6)
            .map(|i| {
                let v = format!("v{i}");
                put(version_key(&keys, "win", &v), &rec(&v, i))
            })
            .collect();
        changes.push(put(pointer_key(&keys, "win", LATEST), &ptr("v6")));
        changes.push(put(pointer_key(&keys, "win", "production"), &ptr("v1")));
        let c = Catalogue::from_changes(&keys, &changes);
        let e = &c.images["win"];
        let plan = |keep, used: &[u64]| -> Vec<String> {
            gc_plan(e, keep, &used.iter().copied().collect())
                .into_iter()
                .map(|r| r.version)
                .collect()
        };
        assert_eq!(plan(3, &[]), ["v2", "v3"]);
        assert_eq!(plan(3, &[2]), ["v3"], "a client disk on v2 keeps it");
        assert_eq!(plan(1, &[]), ["v2", "v3", "v4", "v5"]);
        assert_eq!(plan(10, &[]), Vec::<String>::new());
        // A version marked deleting is resolved by no pointer and stays in the plan.
        let mut d = rec("v5", 5);
        d.deleting = true;
        let mut c2 = c.clone();
        c2.apply(&keys, &put(version_key(&keys, "win", "v5"), &d));
        c2.apply(&keys, &put(pointer_key(&keys, "win", "test"), &ptr("v5")));
        assert!(c2.resolve("win", "test").is_err());
        let in_plan: Vec<String> = gc_plan(&c2.images["win"], 3, &BTreeSet::new())
            .into_iter()
            .map(|r| r.version)
            .collect();
        assert!(in_plan.contains(&"v5".to_string()), "{in_plan:?}");
    }

    fn put(key: String, v: &impl Serialize) -> Change {
        Change::Put {
            key,
            value: json(v),
        }
    }

    fn ptr(v: &str) -> Pointer {
        Pointer {
            version: v.into(),
            by: "op".into(),
            time_ms: 1,
            previous: None,
        }
    }

    fn cat(keys: &Keys) -> Catalogue {
        Catalogue::from_changes(
            keys,
            &[
                put(version_key(keys, "win", "v1"), &rec("v1", 1)),
                put(version_key(keys, "win", "v2"), &rec("v2", 2)),
                put(pointer_key(keys, "win", LATEST), &ptr("v2")),
                put(pointer_key(keys, "win", "production"), &ptr("v1")),
                Change::Put {
                    key: seq_key(keys, "win"),
                    value: b"2".to_vec(),
                },
                // Not catalogue records: ignored.
                Change::Put {
                    key: keys.node("n1"),
                    value: b"{}".to_vec(),
                },
                Change::Put {
                    key: format!("{}catalogue/win/versions/a/b", keys.prefix),
                    value: b"{}".to_vec(),
                },
            ],
        )
    }

    #[test]
    fn keys_and_view() {
        let keys = Keys::new("lab");
        assert_eq!(
            version_key(&keys, "win", "v1"),
            "/diskless/lab/catalogue/win/versions/v1"
        );
        assert_eq!(
            pointer_key(&keys, "win", "test"),
            "/diskless/lab/catalogue/win/pointers/test"
        );
        let mut c = cat(&keys);
        let e = &c.images["win"];
        assert_eq!(e.versions.len(), 2);
        assert_eq!(
            e.in_order().iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(c.resolve("win", LATEST).map(|r| r.seq), Ok(2));
        assert_eq!(c.resolve("win", "production").map(|r| r.seq), Ok(1));
        assert!(c.resolve("win", "test").is_err());
        assert!(c.resolve("other", LATEST).is_err());
        // A malformed pointer is as good as absent; a deleted channel is gone.
        assert!(c.apply(
            &keys,
            &Change::Put {
                key: pointer_key(&keys, "win", LATEST),
                value: b"junk".to_vec()
            }
        ));
        assert!(c.resolve("win", LATEST).is_err());
        assert!(c.apply(
            &keys,
            &Change::Delete {
                key: pointer_key(&keys, "win", "production")
            }
        ));
        assert!(c.resolve("win", "production").is_err());
        assert!(!c.apply(
            &keys,
            &Change::Delete {
                key: keys.owner("x")
            }
        ));
    }

    fn config(images: &str) -> Config {
        let yaml = format!(
            "portals: [\"127.0.0.1:3260\"]\nimages:\n{images}\
             cluster: {{name: lab, node_id: a, etcd: [\"http://127.0.0.1:2379\"], advertise: \"127.0.0.1:3260\"}}\n"
        );
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(
            dir.path().join("s3.cred"),
            "access_key_id = k\nsecret_access_key = s\n",
        )
        .expect("cred");
        Config::from_yaml(&yaml, "t.yaml", dir.path()).expect("config")
    }

    const S3: &str = "endpoint: \"http://127.0.0.1:1\", bucket: golden, credentials_file: s3.cred";

    #[test]
    fn pointers_resolve_to_versions_and_are_kept_without_etcd() {
        let keys = Keys::new("lab");
        let c = cat(&keys);
        let mut cfg = config(&format!(
            "  - name: win\n    s3: {{{S3}, version: latest}}\n\
             \x20 - name: win-prod\n    s3: {{{S3}, image: win, channel: production}}\n\
             \x20 - name: pinned\n    s3: {{{S3}, image: win, version: v1}}\n"
        ));
        let r = resolve_config(&mut cfg, Some(&c), &Resolution::new()).expect("resolves");
        let s3 = |cfg: &Config, i: usize| cfg.images[i].s3.clone().expect("s3");
        assert_eq!(
            (s3(&cfg, 0).version, s3(&cfg, 0).resolved_seq),
            ("v2".into(), Some(2))
        );
        assert_eq!(
            (s3(&cfg, 1).version, s3(&cfg, 1).resolved_seq),
            ("v1".into(), Some(1))
        );
        assert_eq!(
            (s3(&cfg, 2).version, s3(&cfg, 2).resolved_seq),
            ("v1".into(), None)
        );
        assert_eq!(r.len(), 2);

        // etcd never answered: the versions kept are served; without them, an error.
        let mut again = config(&format!(
            "  - name: win\n    s3: {{{S3}, version: latest}}\n"
        ));
        let kept = resolve_config(&mut again.clone(), None, &r).expect("kept");
        assert_eq!(kept["win"].version, "v2");
        let e = resolve_config(&mut again, None, &Resolution::new()).expect_err("nothing kept");
        assert!(
            e.contains("images[0].s3 (win)") && e.contains("etcd"),
            "{e}"
        );

        // A kept version of another pointer is not taken.
        let mut other = config(&format!("  - name: win\n    s3: {{{S3}, channel: test}}\n"));
        assert!(resolve_config(&mut other, Some(&c), &r).is_err());
    }

    #[test]
    fn follower_tracks_moves_and_saves_what_is_in_force() {
        let dir = tempfile::tempdir().expect("tmp");
        let keys = Keys::new("lab");
        let f = Follower::default();
        f.set_state_dir(dir.path());
        let cfg = config(&format!(
            "  - name: win\n    s3: {{{S3}, version: latest}}\n"
        ));
        assert!(
            f.moves(&cfg),
            "nothing listed, nothing in force: a reload says why"
        );
        let listing = vec![
            put(version_key(&keys, "win", "v1"), &rec("v1", 1)),
            put(version_key(&keys, "win", "v2"), &rec("v2", 2)),
            put(pointer_key(&keys, "win", LATEST), &ptr("v2")),
        ];
        assert!(f.relist(&keys, &listing));
        assert!(!f.relist(&keys, &listing), "the same listing again");
        let mut c = cfg.clone();
        let r = f.resolve(&mut c).expect("resolve");
        f.commit(r);
        assert!(!f.moves(&cfg));
        assert!(f.apply(&keys, &put(pointer_key(&keys, "win", LATEST), &ptr("v1"))));
        assert!(f.moves(&cfg), "rollback seen");

        // A node restarted without etcd keeps what it served.
        let g = Follower::default();
        g.set_state_dir(dir.path());
        assert_eq!(g.in_force()["win"].version, "v2");
        let mut c = cfg.clone();
        assert_eq!(g.resolve(&mut c).expect("kept").resolution["win"].seq, 2);
    }

    /// Two pushes race (tests/cluster_catalogue.rs): `latest` moves to v3, then to v4, and
    /// each watch event starts a reload. The reload started by the first event resolved v3;
    /// if it finishes last, its commit must not put v3 back in force (nor in the state
    /// directory, where a node restarted without etcd would find it).
    #[test]
    fn follower_keeps_the_newest_of_two_racing_reloads() {
        let dir = tempfile::tempdir().expect("tmp");
        let keys = Keys::new("lab");
        let f = Follower::default();
        f.set_state_dir(dir.path());
        let cfg = config(&format!(
            "  - name: win\n    s3: {{{S3}, version: latest}}\n"
        ));
        let mut listing: Vec<Change> = (1..=4)
            .map(|i| {
                put(
                    version_key(&keys, "win", &format!("v{i}")),
                    &rec(&format!("v{i}"), i),
                )
            })
            .collect();
        listing.push(put(pointer_key(&keys, "win", LATEST), &ptr("v2")));
        f.relist(&keys, &listing);
        assert!(f.commit(f.resolve(&mut cfg.clone()).expect("v2")));

        assert!(f.apply(&keys, &put(pointer_key(&keys, "win", LATEST), &ptr("v3"))));
        let first = f.resolve(&mut cfg.clone()).expect("v3");
        assert!(f.apply(&keys, &put(pointer_key(&keys, "win", LATEST), &ptr("v4"))));
        let second = f.resolve(&mut cfg.clone()).expect("v4");
        assert_eq!(first.resolution["win"].version, "v3");
        assert_eq!(second.resolution["win"].version, "v4");
        // The second reload finishes first; the first one's commit comes late.
        assert!(f.commit(second));
        assert!(!f.commit(first), "a stale resolution is refused");
        assert_eq!(f.in_force()["win"].version, "v4");
        assert!(!f.moves(&cfg));
        let g = Follower::default();
        g.set_state_dir(dir.path());
        assert_eq!(
            g.in_force()["win"].version,
            "v4",
            "the state directory says v4"
        );

        // In order, both commits are taken.
        assert!(f.apply(&keys, &put(pointer_key(&keys, "win", LATEST), &ptr("v1"))));
        let t = f.resolve(&mut cfg.clone()).expect("v1");
        assert!(f.commit(t));
        assert_eq!(f.in_force()["win"].version, "v1");
        assert!(!f.moves(&cfg));
    }
}
