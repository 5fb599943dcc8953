//! Boot read-ahead (issue 12 item 5, docs/performance.md "Cold starts"): learn which chunks
//! of a golden image its first boots read, keep that set per image version in the state
//! directory, and when the image is opened again ask the kernel to read it ahead
//! (`posix_fadvise(POSIX_FADV_WILLNEED)`, POSIX.1-2008), so the first boots after a server
//! start meet a warm page cache.
//!
//! The pure part ([`Learner`], [`encode`], [`decode`]) takes time as an input; the shell
//! ([`LearningStore`], [`start`]) wraps the image's store and runs one background thread.

use super::{BlockStore, Space, StorageError};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The unit of the learned set: 1 MiB of the image.
pub const CHUNK: u64 = 1 << 20;
const MAGIC: &str = "diskless-readset 1";

/// Bytes read ahead since the start (all images), for `diskless_boot_readahead_bytes_total`.
pub static READAHEAD_BYTES: AtomicU64 = AtomicU64::new(0);
/// Chunks learned and saved since the start (all images).
pub static LEARNED_CHUNKS: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum ReadSetError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed read set: {0}")]
    Format(String),
}

/// Settings (`settings: boot_readahead_secs`, `boot_readahead_max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAheadConfig {
    /// Learning window from the image's first read; zero turns learning and read-ahead off.
    pub window: Duration,
    /// At most this many bytes are learned (and read ahead) per image.
    pub max_bytes: u64,
}

/// The learning window of one image: every chunk read from the first read until `window`
/// later, at most `max_chunks` of them.
#[derive(Debug)]
pub struct Learner {
    window: Duration,
    max_chunks: usize,
    first: Option<Duration>,
    chunks: BTreeSet<u64>,
}

impl Learner {
    pub fn new(window: Duration, max_chunks: usize) -> Learner {
        Learner {
            window,
            max_chunks,
            first: None,
            chunks: BTreeSet::new(),
        }
    }

    /// A read of `len` bytes at `offset` at time `now` (from any fixed origin).
    pub fn record(&mut self, now: Duration, offset: u64, len: u64) {
        let first = *self.first.get_or_insert(now);
        if now.saturating_sub(first) > self.window || len == 0 {
            return;
        }
        let end = offset.saturating_add(len - 1) / CHUNK;
        for c in offset / CHUNK..=end {
            if self.chunks.len() >= self.max_chunks {
                return;
            }
            self.chunks.insert(c);
        }
    }

    /// Whether the window is over at `now` (never before the first read).
    pub fn closed(&self, now: Duration) -> bool {
        self.first
            .is_some_and(|f| now.saturating_sub(f) > self.window)
    }

    pub fn chunks(&self) -> Vec<u64> {
        self.chunks.iter().copied().collect()
    }
}

/// The chunks as runs `(first, count)` of adjacent chunks.
pub fn runs(chunks: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &c in chunks {
        match out.last_mut() {
            Some((s, n)) if *s + *n == c => *n += 1,
            _ => out.push((c, 1)),
        }
    }
    out
}

/// The file text: a header with the image identity and the chunk size, then one run
/// `FIRST COUNT` a line.
pub fn encode(id: &str, chunks: &[u64]) -> String {
    let mut s = format!("{MAGIC}\nid {}\nchunk {CHUNK}\n", id.replace('\n', " "));
    for (first, n) in runs(chunks) {
        s.push_str(&format!("{first} {n}\n"));
    }
    s
}

/// Parse a read set; Ok(None) when it was learned for another image (identity differs).
pub fn decode(text: &str, id: &str) -> Result<Option<Vec<u64>>, ReadSetError> {
    let bad = |m: &str| ReadSetError::Format(m.to_string());
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return Err(bad("no header"));
    }
    let got = lines
        .next()
        .and_then(|l| l.strip_prefix("id "))
        .ok_or_else(|| bad("no id line"))?;
    if got != id.replace('\n', " ") {
        return Ok(None);
    }
    if lines.next() != Some(format!("chunk {CHUNK}").as_str()) {
        return Err(bad("other chunk size"));
    }
    let mut out = Vec::new();
    for l in lines {
        let mut it = l.split_whitespace();
        let (Some(a), Some(b), None) = (it.next(), it.next(), it.next()) else {
            return Err(bad("expected 'FIRST COUNT'"));
        };
        let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) else {
            return Err(bad("expected numbers"));
        };
        if b > 1 << 24 {
            return Err(bad("run too long"));
        }
        out.extend(a..a.saturating_add(b));
    }
    Ok(Some(out))
}

/// `STATE_DIR/readahead/<FNV-1a 64 of the image identity>.txt`: one file per image version
/// (the identity names path, length and mtime, or the version).
pub fn path_for(state_dir: &Path, id: &str) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    state_dir.join("readahead").join(format!("{h:016x}.txt"))
}

/// Write `text` to `path` atomically: a temporary file, fsync, rename, fsync of the directory.
pub fn save_atomic(path: &Path, text: &str) -> Result<(), ReadSetError> {
    let dir = path
        .parent()
        .ok_or_else(|| ReadSetError::Format("no directory".into()))?;
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The image's store, recording its reads while the learner's window is open.
pub struct LearningStore {
    inner: Arc<dyn BlockStore>,
    learner: Mutex<Learner>,
    origin: Instant,
    /// Set once the window closed: reads skip the lock.
    done: AtomicBool,
}

impl LearningStore {
    fn note(&self, offset: u64, len: u64) {
        if self.done.load(Ordering::Relaxed) {
            return;
        }
        let now = self.origin.elapsed();
        let mut l = self.learner.lock().unwrap_or_else(|p| p.into_inner());
        l.record(now, offset, len);
        if l.closed(now) {
            self.done.store(true, Ordering::Relaxed);
        }
    }
}

impl BlockStore for LearningStore {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        self.note(offset, buf.len() as u64);
        self.inner.read_at(buf, offset)
    }
    fn file_slice(&self, offset: u64, len: u64) -> Option<super::FileSlice> {
        let s = self.inner.file_slice(offset, len)?;
        self.note(offset, len);
        Some(s)
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), StorageError> {
        self.inner.write_at(data, offset, fua)
    }
    fn write_many(&self, writes: &[(u64, &[u8])]) -> Result<(), StorageError> {
        self.inner.write_many(writes)
    }
    fn flush(&self) -> Result<(), StorageError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.inner.discard(offset, len)
    }
    fn thin_provisioned(&self) -> bool {
        self.inner.thin_provisioned()
    }
    fn allocation(&self, offset: u64) -> Result<(bool, u64), StorageError> {
        self.inner.allocation(offset)
    }
    fn space(&self) -> Option<Space> {
        self.inner.space()
    }
    fn discard_changes(&self) -> Result<bool, StorageError> {
        self.inner.discard_changes()
    }
}

/// Issue `POSIX_FADV_WILLNEED` for each run of `chunks` of the file at `path`, at most
/// `max_bytes`; returns the bytes asked for. The kernel reads them in the background.
pub fn read_ahead(path: &Path, chunks: &[u64], max_bytes: u64) -> Result<u64, ReadSetError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    let mut asked = 0u64;
    for (first, n) in runs(chunks) {
        let len = (n * CHUNK).min(max_bytes.saturating_sub(asked));
        if len == 0 {
            break;
        }
        let (Ok(off), Ok(l)) = (i64::try_from(first * CHUNK), i64::try_from(len)) else {
            break;
        };
        // SAFETY: an advice on an fd we own for the duration of the call.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), off, l, libc::POSIX_FADV_WILLNEED) };
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r).into());
        }
        asked += len;
    }
    Ok(asked)
}

/// Set up read-ahead for the plain image file `path` (identity `id`): if a read set was
/// learned for it, read it ahead in the background and return the store as is; otherwise
/// return a [`LearningStore`] over it and save what it learned once the window closes.
pub fn start(
    store: Arc<dyn BlockStore>,
    path: &Path,
    id: &str,
    label: &str,
    state_dir: &Path,
    cfg: ReadAheadConfig,
) -> Arc<dyn BlockStore> {
    if cfg.window.is_zero() || cfg.max_bytes == 0 {
        return store;
    }
    let file = path_for(state_dir, id);
    let learned = match std::fs::read_to_string(&file) {
        Ok(t) => match decode(&t, id) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(image = label, file = %file.display(), "ignoring the read set: {e}");
                None
            }
        },
        Err(_) => None,
    };
    if let Some(chunks) = learned {
        let (path, name) = (path.to_path_buf(), label.to_string());
        let spawned = std::thread::Builder::new()
            .name("readahead".into())
            .spawn(move || match read_ahead(&path, &chunks, cfg.max_bytes) {
                Ok(n) => {
                    READAHEAD_BYTES.fetch_add(n, Ordering::Relaxed);
                    tracing::info!(
                        image = %name,
                        bytes = n,
                        chunks = chunks.len(),
                        "boot read-ahead issued for the learned read set"
                    );
                }
                Err(e) => tracing::warn!(image = %name, "boot read-ahead failed: {e}"),
            });
        if let Err(e) = spawned {
            tracing::warn!(image = label, "cannot start the read-ahead thread: {e}");
        }
        return store;
    }
    let max_chunks = usize::try_from(cfg.max_bytes.div_ceil(CHUNK)).unwrap_or(usize::MAX);
    let ls = Arc::new(LearningStore {
        inner: store,
        learner: Mutex::new(Learner::new(cfg.window, max_chunks)),
        origin: Instant::now(),
        done: AtomicBool::new(false),
    });
    let weak = Arc::downgrade(&ls);
    let (id, name) = (id.to_string(), label.to_string());
    let spawned = std::thread::Builder::new()
        .name("readset".into())
        .spawn(move || loop {
            // Poll once a second until the window closed (or the image is gone).
            std::thread::sleep(Duration::from_secs(1));
            let Some(ls) = weak.upgrade() else { return };
            let now = ls.origin.elapsed();
            let chunks = {
                let l = ls.learner.lock().unwrap_or_else(|p| p.into_inner());
                if !l.closed(now) {
                    continue;
                }
                l.chunks()
            };
            ls.done.store(true, Ordering::Relaxed);
            match save_atomic(&file, &encode(&id, &chunks)) {
                Ok(()) => {
                    LEARNED_CHUNKS.fetch_add(chunks.len() as u64, Ordering::Relaxed);
                    tracing::info!(
                        image = %name,
                        chunks = chunks.len(),
                        file = %file.display(),
                        "boot read set learned"
                    );
                }
                Err(e) => tracing::warn!(image = %name, "cannot save the boot read set: {e}"),
            }
            return;
        });
    if let Err(e) = spawned {
        tracing::warn!(image = label, "cannot start the read-set thread: {e}");
    }
    ls
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn learns_chunks_of_the_window_only_and_bounded() {
        let mut l = Learner::new(10 * S, 4);
        assert!(!l.closed(100 * S), "no window before the first read");
        l.record(5 * S, 0, 512); // chunk 0; the window runs 5 s .. 15 s
        l.record(6 * S, 3 * CHUNK - 512, 1024); // chunks 2 and 3
        l.record(7 * S, 0, 4096); // chunk 0 again
        assert!(!l.closed(15 * S));
        l.record(16 * S, 9 * CHUNK, 512); // after the window: ignored
        assert!(l.closed(16 * S));
        assert_eq!(l.chunks(), vec![0, 2, 3]);
        let mut b = Learner::new(10 * S, 2);
        b.record(Duration::ZERO, 0, 5 * CHUNK);
        assert_eq!(b.chunks(), vec![0, 1], "bounded by max_chunks");
    }

    #[test]
    fn encode_decode_round_trip_and_identity() {
        let chunks = vec![0, 1, 2, 7, 9, 10];
        let t = encode("img|1|2", &chunks);
        assert_eq!(runs(&chunks), vec![(0, 3), (7, 1), (9, 2)]);
        assert_eq!(decode(&t, "img|1|2").unwrap(), Some(chunks));
        assert_eq!(
            decode(&t, "img|1|3").unwrap(),
            None,
            "another image version"
        );
        assert!(decode("junk\n", "x").is_err());
        assert!(decode(&format!("{MAGIC}\nid x\nchunk {CHUNK}\n1\n"), "x").is_err());
    }

    #[test]
    fn saved_atomically_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = path_for(dir.path(), "a|1|2");
        assert_ne!(p, path_for(dir.path(), "a|1|3"));
        save_atomic(&p, &encode("a|1|2", &[4, 5])).unwrap();
        let t = std::fs::read_to_string(&p).unwrap();
        assert_eq!(decode(&t, "a|1|2").unwrap(), Some(vec![4, 5]));
        assert!(!p.with_extension("tmp").exists());
    }
}
