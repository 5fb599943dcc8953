//! A read-only block store over one image version kept in an S3-compatible object store as
//! immutable chunk objects (issue 13):
//!
//! ```text
//! <prefix>/<image>/<version>/manifest.json     size, chunk size, a CRC32C per chunk
//! <prefix>/<image>/<version>/chunks/00000000   chunk 0 (all-zero chunks are not stored)
//! ```
//!
//! Reads go through the node's [`ChunkCache`] (memory, then disk); a chunk missing from both
//! is fetched once however many readers want it (single flight), with a timeout per attempt
//! and retries with exponential backoff. A chunk whose length or CRC32C does not match the
//! manifest is never served: the read fails (MEDIUM ERROR, UNRECOVERED READ ERROR at the SCSI
//! layer, SBC-3 §4.18) and the mismatch is logged and counted.

mod cache;

pub use cache::{CacheStats, ChunkCache, ChunkKey};

use super::{BlockStore, StorageError};
use bytes::Bytes;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The manifest format this code reads and writes.
pub const MANIFEST_FORMAT: u32 = 1;
/// Default chunk size of `diskless image push` (4 MiB: one RADOS object, few requests).
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
const MIN_CHUNK: u64 = 64 << 10;
const MAX_CHUNK: u64 = 64 << 20;
/// Refuse manifests claiming more than this (hostile sizes, before allocating anything).
const MAX_IMAGE: u64 = 64 << 40;
const MAX_MANIFEST_BYTES: usize = 64 << 20;

/// Typed errors of the S3 backend.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("{what}: no answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("chunk {index} of {image}: checksum mismatch (want crc32c {want:08x}, got {got:08x}, {len} bytes)")]
    Checksum {
        image: String,
        index: u64,
        want: u32,
        got: u32,
        len: usize,
    },
    #[error("manifest {0}: {1}")]
    BadManifest(String, String),
    #[error("image version {0} already exists (versions are immutable)")]
    Exists(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// The manifest object: what a version is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// Image size in bytes.
    pub size: u64,
    pub chunk_size: u64,
    pub block_size: u32,
    /// Always "crc32c" (Castagnoli, RFC 3720 §12.1's digest polynomial).
    pub checksum: String,
    /// One entry per chunk: its CRC32C, or null for an all-zero chunk (no object stored).
    pub chunks: Vec<Option<u32>>,
}

impl Manifest {
    /// Parse and check a manifest; `name` names it in errors.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Manifest, S3Error> {
        let bad = |m: String| S3Error::BadManifest(name.to_string(), m);
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(bad(format!("{} bytes is too large", bytes.len())));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if m.format != MANIFEST_FORMAT {
            return Err(bad(format!("format {} is not supported", m.format)));
        }
        if m.checksum != "crc32c" {
            return Err(bad(format!("checksum {:?} is not supported", m.checksum)));
        }
        if !m.chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&m.chunk_size) {
            return Err(bad(format!(
                "chunk size {} is not a power of two in 64 KiB..64 MiB",
                m.chunk_size
            )));
        }
        if !matches!(m.block_size, 512 | 4096) {
            return Err(bad(format!(
                "block size {} is not 512 or 4096",
                m.block_size
            )));
        }
        if m.size == 0 || m.size > MAX_IMAGE || m.size % u64::from(m.block_size) != 0 {
            return Err(bad(format!(
                "size {} is not a positive multiple of the block size",
                m.size
            )));
        }
        if m.chunks.len() as u64 != m.size.div_ceil(m.chunk_size) {
            return Err(bad(format!(
                "{} chunk entries for {} bytes",
                m.chunks.len(),
                m.size
            )));
        }
        Ok(m)
    }

    /// A digest of the manifest (first 16 hex digits of SHA-256 of its JSON as this crate
    /// writes it): names one upload of a version in the cluster's catalogue.
    pub fn uid(&self) -> String {
        use sha2::Digest as _;
        let body = serde_json::to_vec(self).unwrap_or_default();
        let d = sha2::Sha256::digest(&body);
        d.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// The length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: u64) -> u64 {
        (self.size - index * self.chunk_size).min(self.chunk_size)
    }
}

/// Where a version lives in the bucket. This is the piece image versions (issue 11) use as
/// "where a version's bytes live".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Key prefix inside the bucket ("" for none).
    pub prefix: String,
    pub image: String,
    pub version: String,
}

impl Location {
    fn base(&self) -> String {
        let p = self.prefix.trim_matches('/');
        if p.is_empty() {
            format!("{}/{}", self.image, self.version)
        } else {
            format!("{p}/{}/{}", self.image, self.version)
        }
    }
    pub fn manifest(&self) -> ObjPath {
        ObjPath::from(format!("{}/manifest.json", self.base()))
    }
    pub fn chunk(&self, index: u64) -> ObjPath {
        ObjPath::from(format!("{}/chunks/{index:08}", self.base()))
    }
}

/// Connection settings of an S3-compatible store. Credentials are never logged.
#[derive(Clone)]
pub struct S3Connection {
    /// e.g. `https://s3.eu-west-1.amazonaws.com` or `http://127.0.0.1:7480`.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for S3Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Connection")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &"<redacted>")
            .finish()
    }
}

impl S3Connection {
    /// An `object_store` client. Its own retries are off: [`Fetcher`] retries (the same way
    /// for every store, and testable with the in-memory one).
    pub fn connect(&self, timeout: Duration) -> Result<Arc<dyn ObjectStore>, S3Error> {
        let mut b = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_bucket_name(&self.bucket)
            .with_region(&self.region)
            .with_access_key_id(&self.access_key_id)
            .with_secret_access_key(&self.secret_access_key)
            .with_virtual_hosted_style_request(false)
            .with_retry(object_store::RetryConfig {
                max_retries: 0,
                ..Default::default()
            })
            // Client options first: they carry allow_http, which is set after them.
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_timeout(timeout)
                    .with_connect_timeout(timeout.min(Duration::from_secs(5))),
            )
            .with_allow_http(self.endpoint.starts_with("http://"));
        if let Some(t) = &self.session_token {
            b = b.with_token(t);
        }
        Ok(Arc::new(b.build()?))
    }
}

/// Retry policy for object reads.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Time allowed for one attempt (request and body).
    pub timeout: Duration,
    /// Attempts after the first.
    pub retries: u32,
    /// First backoff; doubled after each failed attempt, capped at 8 s.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            timeout: Duration::from_secs(10),
            retries: 4,
            backoff: Duration::from_millis(100),
        }
    }
}

/// Counters of one store (read by tests and `/metrics`).
#[derive(Debug, Default)]
pub struct FetchCounters {
    /// Chunk GETs that returned a verified chunk.
    pub fetches: AtomicU64,
    /// Failed attempts (errors, timeouts, bad checksums), each retried or given up.
    pub failed_attempts: AtomicU64,
    pub checksum_errors: AtomicU64,
    /// Reads that failed after every retry.
    pub read_errors: AtomicU64,
}

/// A snapshot of [`FetchCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    pub fetches: u64,
    pub failed_attempts: u64,
    pub checksum_errors: u64,
    pub read_errors: u64,
}

/// A tokio runtime owned by sync code; shut down without blocking when dropped (dropping a
/// runtime inside another one's async context would panic).
struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl OwnedRuntime {
    fn new() -> Result<OwnedRuntime, S3Error> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("diskless-s3")
            .enable_all()
            .build()?;
        Ok(OwnedRuntime(Some(rt)))
    }

    /// Run `fut` on this runtime and wait for it from any thread (a blocking-pool thread, a
    /// plain thread, or a test), never with `block_on` (which panics in an async context).
    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, S3Error> {
        let Some(rt) = &self.0 else {
            return Err(S3Error::Config("runtime shut down".into()));
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| S3Error::Config("S3 task ended without an answer".into()))
    }
}

/// GET with a timeout per attempt and retries with exponential backoff; NotFound is final.
async fn get_with_retry(
    store: &dyn ObjectStore,
    path: &ObjPath,
    policy: RetryPolicy,
    failed: &AtomicU64,
) -> Result<Bytes, S3Error> {
    let mut attempt = 0u32;
    loop {
        let one = async {
            let r = store.get(path).await?;
            r.bytes().await
        };
        let err = match tokio::time::timeout(policy.timeout, one).await {
            Ok(Ok(b)) => return Ok(b),
            Ok(Err(e @ object_store::Error::NotFound { .. })) => return Err(e.into()),
            Ok(Err(e)) => S3Error::Store(e),
            Err(_) => S3Error::Timeout {
                what: format!("GET {path}"),
                timeout: policy.timeout,
            },
        };
        failed.fetch_add(1, Ordering::Relaxed);
        if attempt >= policy.retries {
            return Err(err);
        }
        let wait = policy
            .backoff
            .saturating_mul(1 << attempt.min(16))
            .min(Duration::from_secs(8));
        tracing::warn!(object = %path, attempt, error = %err, retry_in = ?wait, "S3 read failed; retrying");
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

/// The read-only block store over one image version.
pub struct S3Store {
    rt: OwnedRuntime,
    store: Arc<dyn ObjectStore>,
    location: Location,
    manifest: Manifest,
    key: Arc<str>,
    cache: Arc<ChunkCache>,
    policy: RetryPolicy,
    counters: FetchCounters,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("key", &self.key)
            .field("size", &self.manifest.size)
            .finish()
    }
}

impl S3Store {
    /// Open a version: fetch and check its manifest. `key` names the image in the shared
    /// cache and in logs (e.g. `bucket/prefix/image/version`); it must be unique per version.
    pub fn open(
        store: Arc<dyn ObjectStore>,
        location: Location,
        key: &str,
        cache: Arc<ChunkCache>,
        policy: RetryPolicy,
    ) -> Result<S3Store, S3Error> {
        let rt = OwnedRuntime::new()?;
        let counters = FetchCounters::default();
        let (s, p) = (store.clone(), location.manifest());
        let bytes = rt.run(async move {
            let failed = AtomicU64::new(0);
            get_with_retry(s.as_ref(), &p, policy, &failed).await
        })??;
        let manifest = Manifest::parse(&format!("{key}/manifest.json"), &bytes)?;
        Ok(S3Store {
            rt,
            store,
            location,
            manifest,
            key: Arc::from(key),
            cache,
            policy,
            counters,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    pub fn stats(&self) -> FetchStats {
        let c = &self.counters;
        FetchStats {
            fetches: c.fetches.load(Ordering::Relaxed),
            failed_attempts: c.failed_attempts.load(Ordering::Relaxed),
            checksum_errors: c.checksum_errors.load(Ordering::Relaxed),
            read_errors: c.read_errors.load(Ordering::Relaxed),
        }
    }

    fn verify(&self, index: u64, data: &[u8]) -> Result<(), S3Error> {
        let want = self.manifest.chunks[index as usize].unwrap_or(0);
        let got = crc32c::crc32c(data);
        if got != want || data.len() as u64 != self.manifest.chunk_len(index) {
            return Err(S3Error::Checksum {
                image: self.key.to_string(),
                index,
                want,
                got,
                len: data.len(),
            });
        }
        Ok(())
    }

    /// Fetch chunk `index` from the object store, verified (a bad checksum is retried like
    /// any failed attempt: a transfer may have been damaged; a rotten object fails for good).
    fn fetch(&self, index: u64) -> Result<Bytes, S3Error> {
        let mut attempt = 0u32;
        loop {
            let (s, p, policy) = (self.store.clone(), self.location.chunk(index), self.policy);
            let got = self.rt.run(async move {
                let failed = AtomicU64::new(0);
                let r = get_with_retry(s.as_ref(), &p, policy, &failed).await;
                (r, failed.load(Ordering::Relaxed))
            })?;
            self.counters
                .failed_attempts
                .fetch_add(got.1, Ordering::Relaxed);
            let data = got.0?;
            match self.verify(index, &data) {
                Ok(()) => {
                    self.counters.fetches.fetch_add(1, Ordering::Relaxed);
                    return Ok(data);
                }
                Err(e) => {
                    self.counters
                        .checksum_errors
                        .fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .failed_attempts
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(image = %self.key, chunk = index, error = %e, "corrupt chunk from the object store; not served");
                    if attempt >= self.policy.retries.min(1) {
                        return Err(e);
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// Chunk `index` from the cache, or fetched once for all concurrent readers.
    fn chunk(&self, index: u64) -> Result<Bytes, StorageError> {
        let key: ChunkKey = (self.key.clone(), index);
        if let Some(b) = self.cache.get_memory(&key) {
            return Ok(b);
        }
        let (flight, leader) = self.cache.board(&key);
        if !leader {
            return flight.wait().map_err(read_error);
        }
        let result = self.lead(&key);
        let shared = result
            .as_ref()
            .map(|(b, _)| b.clone())
            .map_err(|e| e.to_string());
        self.cache.land(&key, &flight, shared);
        match result {
            Ok((b, fetched)) => {
                // Waiters already have the chunk (and later readers find it in memory): the
                // disk copy is written after they are released.
                if fetched {
                    self.cache.put_disk(&key, &b);
                }
                Ok(b)
            }
            Err(e) => {
                self.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                // Once per failed fetch (its waiters share the outcome): the initiator gets
                // MEDIUM ERROR, and the operator must see why.
                tracing::error!(image = %self.key, chunk = index, error = %e,
                    "S3 read failed after its retries; answered as a read error, nothing cached");
                Err(read_error(e.to_string()))
            }
        }
    }

    /// The leader's work: memory again (a previous leader may just have finished), disk
    /// (verified), then the object store.
    /// Returns the chunk and whether it came from the object store.
    fn lead(&self, key: &ChunkKey) -> Result<(Bytes, bool), S3Error> {
        if let Some(b) = self.cache.get_memory(key) {
            return Ok((b, false));
        }
        if let Some(b) = self.cache.get_disk(key) {
            match self.verify(key.1, &b) {
                Ok(()) => {
                    self.cache.put_memory(key, &b);
                    return Ok((b, false));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "chunk cache copy corrupt; fetching again");
                    self.cache.forget(key);
                }
            }
        }
        self.cache.note_miss();
        let b = self.fetch(key.1)?;
        self.cache.put_memory(key, &b);
        Ok((b, true))
    }
}

fn read_error(m: String) -> StorageError {
    StorageError::Io(std::io::Error::other(m))
}

impl BlockStore for S3Store {
    fn block_size(&self) -> u32 {
        self.manifest.block_size
    }

    fn size(&self) -> u64 {
        self.manifest.size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        let len = buf.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.manifest.size)
        {
            return Err(StorageError::OutOfRange { offset, len });
        }
        let cs = self.manifest.chunk_size;
        let nowait = super::nowait();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / cs;
            let within = (pos % cs) as usize;
            let n = (cs as usize - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            if self.manifest.chunks[index as usize].is_none() {
                out.fill(0);
            } else if nowait {
                // On the event loop: memory hits only, anything else on a blocking thread.
                match self.cache.get_memory(&(self.key.clone(), index)) {
                    Some(c) => out.copy_from_slice(&c[within..within + n]),
                    None => {
                        super::note_would_block();
                        return Err(StorageError::Io(std::io::ErrorKind::WouldBlock.into()));
                    }
                }
            } else {
                let c = self.chunk(index)?;
                out.copy_from_slice(&c[within..within + n]);
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, _data: &[u8], _offset: u64, _fua: bool) -> Result<(), StorageError> {
        Err(StorageError::ReadOnly)
    }

    fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<(), StorageError> {
        Err(StorageError::ReadOnly)
    }

    fn thin_provisioned(&self) -> bool {
        false
    }

    fn allocation(&self, offset: u64) -> Result<(bool, u64), StorageError> {
        if offset >= self.manifest.size {
            return Err(StorageError::OutOfRange { offset, len: 1 });
        }
        let cs = self.manifest.chunk_size;
        let mapped = |i: u64| self.manifest.chunks[i as usize].is_some();
        let first = offset / cs;
        let want = mapped(first);
        let mut i = first + 1;
        while i < self.manifest.chunks.len() as u64 && mapped(i) == want {
            i += 1;
        }
        let end = (i * cs).min(self.manifest.size);
        Ok((want, end - offset))
    }
}

/// What `push` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushReport {
    pub size: u64,
    pub chunks: u64,
    /// Chunks uploaded (the rest are all zero and not stored).
    pub uploaded: u64,
    pub bytes_uploaded: u64,
}

/// A raw image file read chunk by chunk, as [`push`] stores it and [`verify_pushed`] checks
/// it: each chunk with its CRC32C, or None when it is all zero (not stored).
struct RawChunks {
    f: Arc<std::fs::File>,
    size: u64,
    chunk_size: u64,
    next: u64,
}

impl RawChunks {
    /// Open `file` for chunks of `chunk_size` (a power of two in 64 KiB..64 MiB); its size
    /// must be a positive multiple of `block_size`.
    fn open(
        file: &std::path::Path,
        chunk_size: u64,
        block_size: u32,
    ) -> Result<RawChunks, S3Error> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(S3Error::Config(format!(
                "chunk size {chunk_size} is not a power of two in 64 KiB..64 MiB"
            )));
        }
        let f = Arc::new(std::fs::File::open(file)?);
        let size = f.metadata()?.len();
        if size == 0 || size % u64::from(block_size) != 0 {
            return Err(S3Error::Config(format!(
                "{}: size {size} is not a positive multiple of {block_size}",
                file.display()
            )));
        }
        Ok(RawChunks {
            f,
            size,
            chunk_size,
            next: 0,
        })
    }

    fn count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    /// The next chunk: (index, bytes, CRC32C or None when all zero); None at the end.
    async fn next(&mut self) -> Result<Option<(u64, Vec<u8>, Option<u32>)>, S3Error> {
        use std::os::unix::fs::FileExt;
        let index = self.next;
        if index >= self.count() {
            return Ok(None);
        }
        self.next += 1;
        let off = index * self.chunk_size;
        let len = (self.size - off).min(self.chunk_size) as usize;
        let f = self.f.clone();
        let data = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, off).map(|()| buf)
        })
        .await
        .map_err(|e| S3Error::Config(format!("reader task: {e}")))??;
        let crc = (!data.iter().all(|&b| b == 0)).then(|| crc32c::crc32c(&data));
        Ok(Some((index, data, crc)))
    }
}

/// Upload a raw image as a new, immutable version: its non-zero chunks, then the manifest
/// (created only if absent, so two pushes of one version cannot both succeed; a version
/// without a manifest is incomplete and never read).
pub async fn push(
    store: Arc<dyn ObjectStore>,
    location: &Location,
    file: &std::path::Path,
    chunk_size: u64,
    block_size: u32,
    policy: RetryPolicy,
) -> Result<(Manifest, PushReport), S3Error> {
    let mut raw = RawChunks::open(file, chunk_size, block_size)?;
    let size = raw.size;
    match store.head(&location.manifest()).await {
        Ok(_) => return Err(S3Error::Exists(location.manifest().to_string())),
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let count = raw.count();
    let mut chunks = vec![None; count as usize];
    let mut report = PushReport {
        size,
        chunks: count,
        uploaded: 0,
        bytes_uploaded: 0,
    };
    let mut tasks = tokio::task::JoinSet::new();
    let put_one = |store: Arc<dyn ObjectStore>, path: ObjPath, data: Bytes| async move {
        let mut attempt = 0u32;
        loop {
            let r = tokio::time::timeout(
                policy.timeout,
                store.put(&path, PutPayload::from(data.clone())),
            )
            .await;
            let err = match r {
                Ok(Ok(_)) => return Ok::<(), S3Error>(()),
                Ok(Err(e)) => S3Error::Store(e),
                Err(_) => S3Error::Timeout {
                    what: format!("PUT {path}"),
                    timeout: policy.timeout,
                },
            };
            if attempt >= policy.retries {
                return Err(err);
            }
            tokio::time::sleep(policy.backoff.saturating_mul(1 << attempt.min(16))).await;
            attempt += 1;
        }
    };
    while let Some((index, data, crc)) = raw.next().await? {
        if crc.is_none() {
            continue;
        }
        chunks[index as usize] = crc;
        report.uploaded += 1;
        report.bytes_uploaded += data.len() as u64;
        // At most 8 uploads in flight.
        while tasks.len() >= 8 {
            if let Some(r) = tasks.join_next().await {
                r.map_err(|e| S3Error::Config(format!("upload task: {e}")))??;
            }
        }
        tasks.spawn(put_one(
            store.clone(),
            location.chunk(index),
            Bytes::from(data),
        ));
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| S3Error::Config(format!("upload task: {e}")))??;
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        size,
        chunk_size,
        block_size,
        checksum: "crc32c".into(),
        chunks,
    };
    let body = serde_json::to_vec(&manifest).map_err(|e| S3Error::Config(e.to_string()))?;
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match store
        .put_opts(&location.manifest(), PutPayload::from(body), opts)
        .await
    {
        Ok(_) => Ok((manifest, report)),
        Err(
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
        ) => Err(S3Error::Exists(location.manifest().to_string())),
        Err(e) => Err(e.into()),
    }
}

/// The manifest of a version already in the store, checked against the raw file it should
/// have been pushed from (size, chunk size, block size, and each chunk's CRC32C, or zero):
/// `diskless image push` run again after the catalogue record failed records the version
/// without uploading anything (docs/scale-out.md, "Image catalogue").
pub async fn verify_pushed(
    store: Arc<dyn ObjectStore>,
    location: &Location,
    file: &std::path::Path,
    chunk_size: u64,
    block_size: u32,
    policy: RetryPolicy,
) -> Result<Manifest, S3Error> {
    let name = location.manifest().to_string();
    let failed = AtomicU64::new(0);
    let bytes = get_with_retry(store.as_ref(), &location.manifest(), policy, &failed).await?;
    let m = Manifest::parse(&name, &bytes)?;
    let differs = |what: String| {
        S3Error::BadManifest(
            name.clone(),
            format!("the version in the store is not {}: {what}", file.display()),
        )
    };
    let mut raw = RawChunks::open(file, chunk_size, block_size)?;
    let size = raw.size;
    if (m.size, m.chunk_size, m.block_size) != (size, chunk_size, block_size) {
        return Err(differs(format!(
            "size/chunk size/block size {}/{}/{} in the store, {size}/{chunk_size}/{block_size} here",
            m.size, m.chunk_size, m.block_size
        )));
    }
    // Manifest::parse checked that it lists size / chunk_size chunks.
    while let Some((index, _, got)) = raw.next().await? {
        if m.chunks.get(index as usize) != Some(&got) {
            return Err(differs(format!("chunk {index} differs")));
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests;
