//! Unit tests over `object_store`'s in-memory store, with a wrapper injecting faults.

use super::*;
use futures_util::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
    PutMultipartOptions, PutResult,
};
use std::sync::atomic::AtomicU32;

/// InMemory, counting chunk GETs and able to fail or stall them.
#[derive(Debug, Default)]
struct Faulty {
    inner: InMemory,
    chunk_gets: AtomicU64,
    fail_next: AtomicU32,
    delay_ms: AtomicU64,
}

impl std::fmt::Display for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Faulty")
    }
}

#[async_trait::async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        l: &ObjPath,
        p: PutPayload,
        o: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(l, p, o).await
    }
    async fn put_multipart_opts(
        &self,
        l: &ObjPath,
        o: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(l, o).await
    }
    async fn get_opts(&self, l: &ObjPath, o: GetOptions) -> object_store::Result<GetResult> {
        if l.as_ref().contains("/chunks/") {
            self.chunk_gets.fetch_add(1, Ordering::SeqCst);
        }
        let d = self.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(object_store::Error::Generic {
                store: "Faulty",
                source: "injected 503".into(),
            });
        }
        self.inner.get_opts(l, o).await
    }
    fn delete_stream(
        &self,
        l: BoxStream<'static, object_store::Result<ObjPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjPath>> {
        self.inner.delete_stream(l)
    }
    fn list(&self, p: Option<&ObjPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(p)
    }
    async fn list_with_delimiter(&self, p: Option<&ObjPath>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(p).await
    }
    async fn copy_opts(
        &self,
        f: &ObjPath,
        t: &ObjPath,
        o: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(f, t, o).await
    }
}

const CS: u64 = 64 << 10;

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn loc() -> Location {
    Location {
        prefix: "golden".into(),
        image: "base".into(),
        version: "v1".into(),
    }
}

fn fast() -> RetryPolicy {
    RetryPolicy {
        timeout: Duration::from_millis(500),
        retries: 3,
        backoff: Duration::from_millis(5),
    }
}

/// An image of 5.5 chunks (chunk 2 all zero), pushed; returns its bytes.
fn pushed(store: &Arc<Faulty>, dir: &std::path::Path) -> Vec<u8> {
    let mut data = random(CS as usize * 11 / 2, 7);
    data[2 * CS as usize..3 * CS as usize].fill(0);
    let f = dir.join("img.raw");
    std::fs::write(&f, &data).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s: Arc<dyn ObjectStore> = store.clone();
    let (m, r) = rt.block_on(push(s, &loc(), &f, CS, 512, fast())).unwrap();
    assert_eq!(m.chunks.len(), 6);
    assert!(m.chunks[2].is_none());
    assert_eq!(r.uploaded, 5);
    data
}

fn open(store: &Arc<Faulty>, cache: Arc<ChunkCache>) -> S3Store {
    S3Store::open(store.clone(), loc(), "bucket/golden/base/v1", cache, fast()).unwrap()
}

#[test]
fn reads_back_what_was_pushed_and_fetches_each_chunk_once() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(Faulty::default());
    let data = pushed(&remote, dir.path());
    let s = open(&remote, Arc::new(ChunkCache::new(16 << 20, None).unwrap()));
    assert_eq!(s.size(), data.len() as u64);
    // Unaligned reads across chunk borders, twice.
    for _ in 0..2 {
        let mut buf = vec![0u8; 3 * CS as usize];
        s.read_at(&mut buf, CS / 2).unwrap();
        assert_eq!(buf, data[CS as usize / 2..CS as usize * 7 / 2]);
        let mut all = vec![0u8; data.len()];
        s.read_at(&mut all, 0).unwrap();
        assert_eq!(all, data);
    }
    assert_eq!(
        remote.chunk_gets.load(Ordering::SeqCst),
        5,
        "zero chunk never fetched"
    );
    assert_eq!(s.stats().fetches, 5);
    let mut buf = vec![0u8; 512];
    assert!(matches!(
        s.read_at(&mut buf, data.len() as u64),
        Err(StorageError::OutOfRange { .. })
    ));
    assert!(matches!(
        s.write_at(&buf, 0, false),
        Err(StorageError::ReadOnly)
    ));
    assert_eq!(s.allocation(2 * CS + 512).unwrap(), (false, CS - 512));
    assert_eq!(s.allocation(0).unwrap(), (true, 2 * CS));
}

#[test]
fn a_version_is_immutable() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(Faulty::default());
    pushed(&remote, dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt.block_on(push(
        remote.clone(),
        &loc(),
        &dir.path().join("img.raw"),
        CS,
        512,
        fast(),
    ));
    assert!(matches!(r, Err(S3Error::Exists(_))), "{r:?}");
}

#[test]
fn concurrent_readers_of_a_missing_chunk_fetch_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(Faulty::default());
    let data = pushed(&remote, dir.path());
    remote.delay_ms.store(100, Ordering::SeqCst); // keep the flight open while all arrive
    let s = Arc::new(open(
        &remote,
        Arc::new(ChunkCache::new(16 << 20, None).unwrap()),
    ));
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                s.read_at(&mut buf, 4 * CS + 8192).map(|()| buf)
            })
        })
        .collect();
    for t in threads {
        let buf = t.join().unwrap().unwrap();
        assert_eq!(buf, data[4 * CS as usize + 8192..4 * CS as usize + 12288]);
    }
    assert_eq!(remote.chunk_gets.load(Ordering::SeqCst), 1);
    assert_eq!(s.stats().fetches, 1);
}

#[test]
fn a_corrupt_chunk_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(Faulty::default());
    let data = pushed(&remote, dir.path());
    let mut bad = data[CS as usize..2 * CS as usize].to_vec();
    bad[100] ^= 1;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(remote.inner.put(&loc().chunk(1), PutPayload::from(bad)))
        .unwrap();
    let s = open(&remote, Arc::new(ChunkCache::new(16 << 20, None).unwrap()));
    let mut buf = vec![0u8; 512];
    let e = s.read_at(&mut buf, CS).unwrap_err();
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
    assert_eq!(s.stats().checksum_errors, 2, "retried once, then failed");
    assert_eq!(s.stats().read_errors, 1);
    assert_eq!(buf, vec![0u8; 512], "nothing of it copied out");
    // The chunk was not cached: a repaired object is served.
    rt.block_on(remote.inner.put(
        &loc().chunk(1),
        PutPayload::from(data[CS as usize..2 * CS as usize].to_vec()),
    ))
    .unwrap();
    s.read_at(&mut buf, CS).unwrap();
    assert_eq!(buf, data[CS as usize..CS as usize + 512]);
}

#[test]
fn errors_are_retried_with_backoff_then_reported() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(Faulty::default());
    let data = pushed(&remote, dir.path());
    let s = open(&remote, Arc::new(ChunkCache::new(16 << 20, None).unwrap()));
    // Three failures, then success: within the 3 retries.
    remote.fail_next.store(3, Ordering::SeqCst);
    let mut buf = vec![0u8; 512];
    s.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, data[..512]);
    assert_eq!(s.stats().failed_attempts, 3);
    // Five failures: more than the retries allow.
    remote.fail_next.store(5, Ordering::SeqCst);
    let e = s.read_at(&mut buf, CS).unwrap_err();
    assert!(e.to_string().contains("injected 503"), "{e}");
    assert_eq!(s.stats().read_errors, 1);
}

#[test]
fn a_stalled_store_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(Faulty::default());
    pushed(&remote, dir.path());
    let s = open(&remote, Arc::new(ChunkCache::new(16 << 20, None).unwrap()));
    remote.delay_ms.store(5_000, Ordering::SeqCst);
    let t = std::time::Instant::now();
    let mut buf = vec![0u8; 512];
    let e = s.read_at(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains("no answer within"), "{e}");
    // 4 attempts of 0.5 s and short backoffs: well under one stall.
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(s.stats().failed_attempts, 4);
}

#[test]
fn the_disk_tier_serves_after_the_memory_tier_evicts_and_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(Faulty::default());
    let data = pushed(&remote, dir.path());
    let cache_dir = dir.path().join("cache");
    // Memory holds one chunk, disk three.
    let cache = Arc::new(ChunkCache::new(CS, Some((&cache_dir, 3 * CS))).unwrap());
    let s = open(&remote, cache.clone());
    let mut all = vec![0u8; data.len()];
    s.read_at(&mut all, 0).unwrap();
    assert_eq!(all, data);
    let st = cache.stats();
    assert!(st.memory_bytes <= CS && st.disk_bytes <= 3 * CS, "{st:?}");
    assert_eq!(remote.chunk_gets.load(Ordering::SeqCst), 5);
    // Chunk 4 was evicted from memory but is on disk: no new GET.
    let mut buf = vec![0u8; 512];
    s.read_at(&mut buf, 4 * CS).unwrap();
    assert_eq!(buf, data[4 * CS as usize..4 * CS as usize + 512]);
    assert_eq!(remote.chunk_gets.load(Ordering::SeqCst), 5);
    assert!(cache.stats().disk_hits >= 1);
    // Rot every disk copy: each is detected and fetched again, never served.
    for e in std::fs::read_dir(&cache_dir).unwrap() {
        let p = e.unwrap().path();
        let mut b = std::fs::read(&p).unwrap();
        b[0] ^= 0xff;
        std::fs::write(&p, b).unwrap();
    }
    let cache2 = cache.clone();
    let s = open(&remote, cache2);
    let before = remote.chunk_gets.load(Ordering::SeqCst);
    s.read_at(&mut all, 0).unwrap();
    assert_eq!(all, data);
    assert!(remote.chunk_gets.load(Ordering::SeqCst) > before);
}

#[test]
fn nonblocking_reads_serve_memory_hits_only() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(Faulty::default());
    let data = pushed(&remote, dir.path());
    let s = open(&remote, Arc::new(ChunkCache::new(16 << 20, None).unwrap()));
    let mut buf = vec![0u8; 512];
    let r = crate::storage::try_nonblocking(|| s.read_at(&mut buf, 0));
    assert!(r.is_none(), "a miss must go to a blocking thread");
    assert_eq!(remote.chunk_gets.load(Ordering::SeqCst), 0);
    s.read_at(&mut buf, 0).unwrap();
    let r = crate::storage::try_nonblocking(|| s.read_at(&mut buf, 0));
    assert!(matches!(r, Some(Ok(()))));
    assert_eq!(buf, data[..512]);
    // Zero chunks need nothing.
    let r = crate::storage::try_nonblocking(|| s.read_at(&mut buf, 2 * CS));
    assert!(matches!(r, Some(Ok(()))));
}

#[test]
fn hostile_manifests_are_refused() {
    let good = Manifest {
        format: 1,
        size: 3 * CS,
        chunk_size: CS,
        block_size: 512,
        checksum: "crc32c".into(),
        chunks: vec![Some(1), None, Some(2)],
    };
    let ok = serde_json::to_vec(&good).unwrap();
    assert_eq!(Manifest::parse("m", &ok).unwrap(), good);
    let cases: [fn(&mut Manifest); 9] = [
        |m| m.format = 2,
        |m| m.checksum = "md5".into(),
        |m| m.chunk_size = 1000,
        |m| m.chunk_size = 1 << 30,
        |m| m.size = 0,
        |m| m.size = 3 * CS + 1,
        |m| m.size = u64::MAX - 511,
        |m| {
            m.chunks.pop();
        },
        |m| m.block_size = 1000,
    ];
    for (i, f) in cases.iter().enumerate() {
        let mut m = good.clone();
        f(&mut m);
        let b = serde_json::to_vec(&m).unwrap();
        assert!(Manifest::parse("m", &b).is_err(), "case {i} accepted");
    }
    assert!(Manifest::parse("m", b"{").is_err());
    assert!(Manifest::parse("m", b"{\"format\":1,\"extra\":1}").is_err());
}

/// `S3Connection::connect` accepts plain http endpoints (a local radosgw): the request gets as
/// far as connecting (nobody listens on port 1), not refused as a bad scheme.
#[test]
fn plain_http_endpoints_are_allowed() {
    let c = S3Connection {
        endpoint: "http://127.0.0.1:1".into(),
        bucket: "golden".into(),
        region: "us-east-1".into(),
        access_key_id: "A".into(),
        secret_access_key: "B".into(),
        session_token: None,
    };
    assert!(!format!("{c:?}").contains('B'), "no secret in Debug");
    let s = c.connect(Duration::from_secs(5)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let e = rt.block_on(s.head(&ObjPath::from("x"))).unwrap_err();
    let mut chain = String::new();
    let mut src: Option<&dyn std::error::Error> = Some(&e);
    while let Some(x) = src {
        chain.push_str(&format!("{x:?}\n"));
        src = x.source();
    }
    assert!(!chain.contains("BadScheme"), "{chain}");
}

/// Two store objects of one version (a reload's old and new configuration) share the node's
/// flights and cache: a storm across both still fetches each chunk once.
#[test]
fn two_generations_of_one_version_share_flights_and_cache() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(Faulty::default());
    let data = pushed(&remote, dir.path());
    remote.delay_ms.store(100, Ordering::SeqCst);
    let cache = Arc::new(ChunkCache::new(16 << 20, None).unwrap());
    let old = Arc::new(open(&remote, cache.clone()));
    let new = Arc::new(open(&remote, cache));
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let s = if i % 2 == 0 { old.clone() } else { new.clone() };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 2 * CS as usize];
                s.read_at(&mut buf, 0).map(|()| buf)
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), data[..2 * CS as usize]);
    }
    assert_eq!(remote.chunk_gets.load(Ordering::SeqCst), 2);
}
