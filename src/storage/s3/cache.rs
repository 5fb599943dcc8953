//! The node's bounded chunk cache for images kept in an object store: a memory tier (LRU by
//! bytes) over a disk tier (a directory under the state directory, bounded, LRU-evicting).
//! Shared by every S3-backed image of the node; keys are (image key, chunk index). Entries
//! are immutable (chunks of an immutable version), so there is nothing to invalidate.
//! Callers verify checksums of what the disk tier returns (a disk can rot).

use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Which chunk: the image's key (`bucket/prefix/image/version`) and its index.
pub type ChunkKey = (Arc<str>, u64);

/// Counters the tests and `/metrics` read.
#[derive(Debug, Default)]
pub struct CacheCounters {
    pub memory_hits: AtomicU64,
    pub disk_hits: AtomicU64,
    pub misses: AtomicU64,
    pub disk_evictions: AtomicU64,
    pub memory_evictions: AtomicU64,
    pub disk_errors: AtomicU64,
}

/// A snapshot of the cache's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub memory_bytes: u64,
    pub memory_limit: u64,
    pub disk_bytes: u64,
    pub disk_limit: u64,
    pub memory_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    pub memory_evictions: u64,
    pub disk_evictions: u64,
}

/// An LRU index by bytes: which keys are held, their size and recency.
#[derive(Default)]
struct Lru<V> {
    entries: HashMap<ChunkKey, (V, u64, u64)>, // value, bytes, tick
    order: BTreeMap<u64, ChunkKey>,
    bytes: u64,
    tick: u64,
}

impl<V: Clone> Lru<V> {
    fn get(&mut self, key: &ChunkKey) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        let e = self.entries.get_mut(key)?;
        self.order.remove(&e.2);
        e.2 = tick;
        self.order.insert(tick, key.clone());
        Some(e.0.clone())
    }

    /// Insert, then evict the least recently used until within `limit`; returns the evicted.
    fn insert(&mut self, key: ChunkKey, v: V, bytes: u64, limit: u64) -> Vec<(ChunkKey, V)> {
        if let Some(old) = self.entries.remove(&key) {
            self.order.remove(&old.2);
            self.bytes -= old.1;
        }
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.entries.insert(key, (v, bytes, self.tick));
        self.bytes += bytes;
        let mut out = Vec::new();
        while self.bytes > limit {
            let Some((_, k)) = self.order.pop_first() else {
                break;
            };
            if let Some((v, b, _)) = self.entries.remove(&k) {
                self.bytes -= b;
                out.push((k, v));
            }
        }
        out
    }

    fn remove(&mut self, key: &ChunkKey) {
        if let Some((_, b, t)) = self.entries.remove(key) {
            self.order.remove(&t);
            self.bytes -= b;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One fetch in progress; waiters block on the condvar until the leader fills `done`.
#[derive(Default)]
pub struct Flight {
    done: Mutex<Option<Result<Bytes, String>>>,
    cv: std::sync::Condvar,
}

impl Flight {
    /// Wait for the leader's result (an error as its message).
    pub fn wait(&self) -> Result<Bytes, String> {
        let mut done = lock(&self.done);
        loop {
            if let Some(r) = done.as_ref() {
                return r.clone();
            }
            done = self.cv.wait(done).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The cache. `memory_limit` 0 turns the memory tier off; `disk` None turns the disk tier off.
/// It also holds the node's fetches in progress (single flight per chunk, whichever store
/// object asks: two configuration generations during a reload share them).
pub struct ChunkCache {
    inflight: Mutex<HashMap<ChunkKey, Arc<Flight>>>,
    memory: Mutex<Lru<Bytes>>,
    memory_limit: u64,
    disk: Option<DiskTier>,
    pub counters: CacheCounters,
}

struct DiskTier {
    dir: PathBuf,
    limit: u64,
    index: Mutex<Lru<PathBuf>>,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("memory_limit", &self.memory_limit)
            .field("disk", &self.disk.as_ref().map(|d| (&d.dir, d.limit)))
            .finish()
    }
}

/// A file name for a key: FNV-1a of the image key (stable across runs) and the index.
fn file_name(key: &ChunkKey) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.0.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}-{:08}", key.1)
}

impl ChunkCache {
    /// A cache with a memory tier of `memory_limit` bytes and, when `disk` is given, a disk
    /// tier of at most `disk.1` bytes in directory `disk.0` (created; files left by an earlier
    /// run are forgotten and removed, since their keys cannot be recovered from their names).
    pub fn new(memory_limit: u64, disk: Option<(&Path, u64)>) -> std::io::Result<ChunkCache> {
        let disk = match disk {
            Some((dir, limit)) => {
                std::fs::create_dir_all(dir)?;
                for e in std::fs::read_dir(dir)? {
                    let e = e?;
                    if e.file_type()?.is_file() {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
                Some(DiskTier {
                    dir: dir.to_path_buf(),
                    limit,
                    index: Mutex::new(Lru::default()),
                })
            }
            None => None,
        };
        Ok(ChunkCache {
            inflight: Mutex::new(HashMap::new()),
            memory: Mutex::new(Lru::default()),
            memory_limit,
            disk,
            counters: CacheCounters::default(),
        })
    }

    /// Join the fetch of `key` in progress, or start one: (the flight, whether the caller
    /// leads it). A leader must call [`ChunkCache::land`] whatever happens.
    pub fn board(&self, key: &ChunkKey) -> (Arc<Flight>, bool) {
        let mut map = lock(&self.inflight);
        match map.get(key) {
            Some(f) => (f.clone(), false),
            None => {
                let f = Arc::new(Flight::default());
                map.insert(key.clone(), f.clone());
                (f, true)
            }
        }
    }

    /// The leader's result: wake the waiters and end the flight.
    pub fn land(&self, key: &ChunkKey, flight: &Flight, result: Result<Bytes, String>) {
        *lock(&flight.done) = Some(result);
        flight.cv.notify_all();
        lock(&self.inflight).remove(key);
    }

    /// The memory tier only (never blocks on the disk).
    pub fn get_memory(&self, key: &ChunkKey) -> Option<Bytes> {
        let hit = lock(&self.memory).get(key);
        if hit.is_some() {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// The disk tier (the caller verifies the bytes and calls [`ChunkCache::forget`] if bad).
    /// A hit is promoted to the memory tier by the caller through [`ChunkCache::put_memory`].
    pub fn get_disk(&self, key: &ChunkKey) -> Option<Bytes> {
        let d = self.disk.as_ref()?;
        let path = lock(&d.index).get(key)?;
        match std::fs::read(&path) {
            Ok(v) => {
                self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
                Some(Bytes::from(v))
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "chunk cache file unreadable");
                self.counters.disk_errors.fetch_add(1, Ordering::Relaxed);
                self.forget(key);
                None
            }
        }
    }

    /// Note a miss of both tiers.
    pub fn note_miss(&self) {
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
    }

    pub fn put_memory(&self, key: &ChunkKey, data: &Bytes) {
        let len = data.len() as u64;
        if len > self.memory_limit {
            return;
        }
        let evicted = lock(&self.memory).insert(key.clone(), data.clone(), len, self.memory_limit);
        self.counters
            .memory_evictions
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
    }

    /// Store in both tiers. A disk failure is logged and costs only the disk copy.
    pub fn put(&self, key: &ChunkKey, data: &Bytes) {
        self.put_memory(key, data);
        self.put_disk(key, data);
    }

    /// Store in the disk tier only (written to a temporary file, then renamed).
    pub fn put_disk(&self, key: &ChunkKey, data: &Bytes) {
        let Some(d) = &self.disk else { return };
        let len = data.len() as u64;
        if len > d.limit {
            return;
        }
        let path = d.dir.join(file_name(key));
        let tmp = d.dir.join(format!("{}.tmp", file_name(key)));
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(data))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "chunk cache write failed");
            self.counters.disk_errors.fetch_add(1, Ordering::Relaxed);
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        let evicted = lock(&d.index).insert(key.clone(), path, len, d.limit);
        for (_, p) in &evicted {
            let _ = std::fs::remove_file(p);
        }
        self.counters
            .disk_evictions
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
    }

    /// Drop a key from both tiers (a disk copy that failed its checksum).
    pub fn forget(&self, key: &ChunkKey) {
        lock(&self.memory).remove(key);
        if let Some(d) = &self.disk {
            lock(&d.index).remove(key);
            let _ = std::fs::remove_file(d.dir.join(file_name(key)));
        }
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            memory_bytes: lock(&self.memory).bytes,
            memory_limit: self.memory_limit,
            disk_bytes: self.disk.as_ref().map_or(0, |d| lock(&d.index).bytes),
            disk_limit: self.disk.as_ref().map_or(0, |d| d.limit),
            memory_hits: c.memory_hits.load(Ordering::Relaxed),
            disk_hits: c.disk_hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            memory_evictions: c.memory_evictions.load(Ordering::Relaxed),
            disk_evictions: c.disk_evictions.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> ChunkKey {
        (Arc::from("img"), i)
    }

    #[test]
    fn memory_tier_is_bounded_lru() {
        let c = ChunkCache::new(3000, None).unwrap();
        for i in 0..3 {
            c.put(&key(i), &Bytes::from(vec![i as u8; 1000]));
        }
        assert!(c.get_memory(&key(0)).is_some()); // 0 is now the most recent
        c.put(&key(3), &Bytes::from(vec![3; 1000]));
        assert!(
            c.get_memory(&key(1)).is_none(),
            "least recently used evicted"
        );
        assert!(c.get_memory(&key(0)).is_some());
        assert!(c.get_memory(&key(3)).is_some());
        let s = c.stats();
        assert_eq!(s.memory_bytes, 3000);
        assert_eq!(s.memory_evictions, 1);
    }

    #[test]
    fn disk_tier_is_bounded_and_removes_files() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::new(0, Some((dir.path(), 2500))).unwrap();
        for i in 0..5 {
            c.put(&key(i), &Bytes::from(vec![i as u8; 1000]));
        }
        let s = c.stats();
        assert_eq!(s.disk_bytes, 2000);
        assert_eq!(s.disk_evictions, 3);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        assert_eq!(c.get_disk(&key(4)).unwrap()[0], 4);
        assert!(c.get_disk(&key(0)).is_none());
        assert!(c.get_memory(&key(4)).is_none(), "memory tier off");
        c.forget(&key(4));
        assert!(c.get_disk(&key(4)).is_none());
        // A restart starts empty (and clean).
        drop(c);
        let c = ChunkCache::new(0, Some((dir.path(), 2500))).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(c.stats().disk_bytes, 0);
    }
}
