//! Per-client copy-on-write overlays (issue 3): a private writable disk made of a read-only
//! golden image plus a directory of the client's own changes.
//!
//! The device is cut into chunks (default 4 KiB). Each chunk is golden (read from the golden
//! image), overlay (read from the data file) or zero (unmapped: reads as zeroes, LBPRZ=1,
//! SBC-3 §4.7.3.4). The data file is dense and log-structured (format v2): a chunk's first
//! write takes the next free slot at the file's end, so first touches are appends (one growing
//! extent for the file system, not a block allocated in a hole per chunk: docs/performance.md
//! "Sixth round"); rewrites go to the chunk's slot in place. Chunk states and slots live in an
//! extent map (memory scales with what the client changed) whose changes are appended to a
//! checksummed journal; a snapshot file holds the compacted map and the golden identity.
//! Version 1 overlays (chunks at their own offset) open as identity-mapped slots. docs/overlays.md has the format and the
//! crash-safety argument; in short, a state record is written to the journal only after the
//! data it points at was fdatasync'ed, so after a crash every chunk reads its old or its new
//! content, and anything acknowledged by `flush` or a FUA write reads its new content.
mod extents;
mod format;
mod writeback;

use extents::Run;
pub use extents::{ChunkState, ExtentMap};

use super::{BlockStore, StorageError};
use format::{Meta, Rec, JOURNAL_HEADER};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use writeback::Writeback;

const META_FILE: &str = "overlay.meta";
const META_TMP: &str = "overlay.meta.tmp";
const JOURNAL_FILE: &str = "overlay.journal";
const DATA_FILE: &str = "overlay.data";
/// Writer lock stripes: writes to chunks in different stripes run in parallel.
const STRIPES: usize = 64;
/// Compact (snapshot + empty journal) once the journal passes this size.
const COMPACT_AT: u64 = 8 << 20;
/// Copy buffer for `commit_to`.
const COPY_BUF: usize = 1 << 20;

/// Typed overlay errors.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}: already exists")]
    Exists(PathBuf),
    #[error("{path}: overlay metadata is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("golden image does not match the overlay: {0}")]
    GoldenMismatch(String),
    #[error("invalid overlay options: {0}")]
    BadOptions(String),
    #[error("{0}: overlay is in use by another process")]
    Busy(PathBuf),
    #[error("overlay lock poisoned")]
    Poisoned,
}

impl From<OverlayError> for StorageError {
    fn from(e: OverlayError) -> Self {
        match e {
            OverlayError::Io(e) => StorageError::Io(e),
            OverlayError::Storage(e) => e,
            other => StorageError::Io(io::Error::other(other.to_string())),
        }
    }
}

/// Options for [`Overlay::create`].
#[derive(Debug, Clone)]
pub struct OverlayOptions {
    /// Copy-on-write granularity in bytes: a power of two from the block size to 1 MiB.
    pub chunk_size: u32,
    /// Caller-chosen identity of the golden image (e.g. its path, length and mtime), stored
    /// in the header and checked by [`Overlay::open_with_id`].
    pub golden_id: Option<String>,
}

impl Default for OverlayOptions {
    fn default() -> Self {
        OverlayOptions {
            chunk_size: 4096,
            golden_id: None,
        }
    }
}

/// Usage figures for one overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayStats {
    pub chunk_size: u32,
    /// Chunks holding client data (allocated in the data file).
    pub chunks_written: u64,
    /// Bytes allocated for client data (`chunks_written` × chunk size, the last chunk clipped).
    pub bytes_written: u64,
    /// Slots of the data file handed out (its length in chunks): `chunks_written` plus slots
    /// left behind by chunks since unmapped, until `reset` (format v2, docs/overlays.md).
    pub data_slots: u64,
    /// Chunks the client unmapped (read as zeroes, no space used).
    pub chunks_zeroed: u64,
    /// Runs in the in-memory extent map (what memory use scales with).
    pub extents: usize,
    /// State changes not yet durable (waiting for `flush`).
    pub pending_records: usize,
    /// Current journal length in bytes.
    pub journal_bytes: u64,
    /// Snapshot generation (bumped by each compaction and reset).
    pub generation: u64,
}

/// What [`Overlay::check`] found in an overlay directory (offline: no golden image needed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub golden_size: u64,
    pub block_size: u32,
    pub chunk_size: u32,
    pub golden_id: Option<String>,
    pub generation: u64,
    pub snapshot_extents: usize,
    /// Journal records that replay cleanly on top of the snapshot.
    pub journal_records: u64,
    /// Journal bytes after the last valid record (a torn tail after a crash is normal; open
    /// discards it).
    pub journal_ignored_bytes: u64,
    /// The journal header is missing or from an older generation (normal after a crash
    /// during compaction; open rewrites it).
    pub journal_stale: bool,
    pub data_file_size: u64,
    /// The snapshot's on-disk format version (1: chunks at their own offset, 2: dense slots;
    /// the next open rewrites a version 1 snapshot as version 2).
    pub version: u32,
    pub chunks_written: u64,
    pub chunks_zeroed: u64,
    /// Real inconsistencies (an empty list means the overlay is sound).
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// In-memory state seen by readers and writers.
struct Live {
    map: ExtentMap,
    /// State changes whose data may not be durable yet, oldest first.
    pending: Vec<Rec>,
    /// When the oldest of `pending` was queued (None: nothing waits).
    since: Option<Instant>,
    /// The slots of overlay chunks the client unmapped in this session (chunk -> slot, as
    /// `Overlay` runs). Such a chunk keeps its slot: written again, it goes back to the
    /// same slot, never to a new one. Until its `Zero` record is journaled, a crash brings
    /// the chunk back as overlay in that slot, and the slot must then hold the chunk's
    /// latest content, as the data file did in format v1: the zeroes of the unmap (the slot
    /// is hole-punched at once) or what was written after it.
    retired: ExtentMap,
}

impl Live {
    /// Chunks `r` (golden or zero until now) are in their new slots `r.slot..`: map them
    /// there, and queue the state change.
    fn map_fresh(&mut self, r: &Run) {
        self.map.set_slots(r.start, r.end, r.slot);
        if r.state == ChunkState::Zero {
            self.retired.set(r.start, r.end, ChunkState::Golden);
        }
        self.queue(Rec {
            start: r.start,
            count: r.end - r.start,
            state: ChunkState::Overlay,
            slot: r.slot,
        });
    }

    /// Queue a state change until the next flush.
    fn queue(&mut self, rec: Rec) {
        if self.pending.is_empty() {
            self.since = Some(Instant::now());
        }
        self.pending.push(rec);
    }
}

/// The durable side, guarded by the flush lock (one flush, compaction or reset at a time,
/// so journal records are appended in the order their changes happened).
struct Durable {
    /// The map as the journal + snapshot describe it.
    map: ExtentMap,
    journal: File,
    /// Valid journal length; 0 means the header must be (re)written before the next record.
    journal_len: u64,
    next_seq: u64,
    generation: u64,
    /// Group commit: every write with a ticket up to this one is durable (see
    /// [`Overlay::flush_upto`]).
    synced: u64,
    /// Past every slot the snapshot or a journaled record named (the snapshot's slot
    /// counter): a journaled slot is never handed out twice, even after a crash.
    slot_end: u64,
}

/// A golden image seen through a per-client copy-on-write overlay. See the module docs.
///
/// Dropping an `Overlay` flushes (best effort, errors are logged); [`Overlay::close`] flushes
/// and reports errors; [`Overlay::simulate_crash`] drops without flushing.
pub struct Overlay {
    dir: PathBuf,
    golden: Arc<dyn BlockStore>,
    size: u64,
    block_size: u32,
    chunk: u64,
    chunks: u64,
    golden_id: Option<String>,
    data: File,
    /// The state a flush needs, shared with the writeback thread (see
    /// [`Overlay::after_change`]).
    core: Arc<Core>,
    /// Flushes waiting changes when they are many or old (writeback.rs); stopped before the
    /// overlay closes.
    writeback: Writeback,
    /// Shared by I/O, exclusive for `reset` and `commit_to` (point-in-time operations).
    gate: RwLock<()>,
    /// Writers and discards lock the stripes of the chunks they touch (ascending order, so
    /// no deadlock), making copy-on-write of one chunk atomic with respect to other writers.
    stripes: Vec<Mutex<()>>,
    /// Cleared by `simulate_crash`: Drop then skips its flush.
    flush_on_drop: AtomicBool,
    /// The state filesystem had no room for the snapshot when the overlay was opened: reads
    /// work, writes and discards fail with ENOSPC (the LU answers 07/27/07 SPACE ALLOCATION
    /// FAILED WRITE PROTECT) until a compaction succeeds. Nothing may be journaled before
    /// that: the journal on disk may end in a torn record.
    no_space: AtomicBool,
    /// When the next compaction attempt may be made (at most one a second).
    retry_at: Mutex<Option<std::time::Instant>>,
}

/// What a flush touches: the chunk maps, the journal, the data file's descriptor and the
/// ticket counter. Behind an `Arc` so that a flush can run on a thread of its own while the
/// client keeps writing (the overlay's own fields stay private to the write path).
struct Core {
    dir: PathBuf,
    size: u64,
    block_size: u32,
    chunk: u64,
    golden_id: Option<String>,
    /// A second descriptor of the data file (`try_clone`): fdatasync acts on the inode.
    data: File,
    live: RwLock<Live>,
    durable: Mutex<Durable>,
    /// Writes completed so far: a write takes its ticket (this counter, incremented) after
    /// its data and its pending state record are in place.
    written: AtomicU64,
    /// The next free slot of the data file (a chunk's first write takes the next ones).
    next_slot: AtomicU64,
    /// Cleared when the file system refuses to punch holes (only space is lost then).
    punch_hole: AtomicBool,
}

/// Bytes the data file must hold for the overlay chunks of `map`: up to the end of the
/// highest slot, the device's last chunk possibly short.
fn data_needed(map: &ExtentMap, chunk: u64, size: u64) -> u64 {
    let chunks = size.div_ceil(chunk);
    let short = chunks * chunk - size;
    map.iter()
        .filter(|r| r.state == ChunkState::Overlay)
        .map(|r| (r.slot + (r.end - r.start)) * chunk - if r.end == chunks { short } else { 0 })
        .max()
        .unwrap_or(0)
}

/// ENOSPC or EDQUOT, directly or behind a path-annotated error (same kind).
fn out_of_space(e: &OverlayError) -> bool {
    let io = match e {
        OverlayError::Io(e) | OverlayError::Storage(StorageError::Io(e)) => e,
        _ => return false,
    };
    matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        || matches!(
            io.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
}

fn no_space_error() -> OverlayError {
    OverlayError::Io(io::Error::from_raw_os_error(libc::ENOSPC))
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, OverlayError> {
    m.lock().map_err(|_| OverlayError::Poisoned)
}

/// The bytes of `data` (written at device offset `offset`) for device bytes `[from, to)`.
fn part_of(data: &[u8], offset: u64, from: u64, to: u64) -> Result<&[u8], StorageError> {
    data.get((from - offset) as usize..(to - offset) as usize)
        .ok_or(StorageError::OutOfRange {
            offset: from,
            len: to - from,
        })
}

/// At most this many bytes of several buffers per `pwritev`. The page cache sizes a new
/// folio by the write that creates it, and a later 4 KiB rewrite into a large folio costs the
/// kernel time in proportion to the folio (file.rs, `small_folios`): uncapped, the batches
/// of a QD32 first-touch pass (up to 128 KiB) made the rewrite pass 10-20 % slower.
const VECTORED_MAX: usize = 16 << 10;

/// `pwritev(2)` of all of `bufs` at `offset`: a short write goes on where it stopped. Each
/// call takes buffers up to [`VECTORED_MAX`] bytes (one, if it alone is larger).
fn write_all_vectored_at(
    file: &File,
    mut bufs: &mut [io::IoSlice<'_>],
    mut offset: u64,
) -> io::Result<()> {
    while !bufs.is_empty() {
        let mut bytes = 0;
        let count = bufs
            .iter()
            .take_while(|b| {
                bytes += b.len();
                bytes <= VECTORED_MAX
            })
            .count()
            .max(1);
        let n = match rustix::io::pwritev(file, &bufs[..count], offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        offset += n as u64;
        io::IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn with_path(e: io::Error, p: &Path) -> OverlayError {
    OverlayError::Io(io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

/// Write the snapshot atomically: tmp file, fsync, rename over the old one, fsync the
/// directory (so the rename itself is durable).
fn write_meta(dir: &Path, meta: &Meta) -> Result<(), OverlayError> {
    let tmp = dir.join(META_TMP);
    let mut f = File::create(&tmp).map_err(|e| with_path(e, &tmp))?;
    f.write_all(&meta.encode())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(META_FILE))?;
    fsync_dir(dir)?;
    Ok(())
}

fn read_meta(dir: &Path) -> Result<Meta, OverlayError> {
    let p = dir.join(META_FILE);
    let b = std::fs::read(&p).map_err(|e| with_path(e, &p))?;
    Meta::decode(&b).map_err(|reason| OverlayError::Corrupt { path: p, reason })
}

/// Read the journal; a missing journal reads as empty (replay then treats it as stale).
fn read_journal(dir: &Path) -> Result<Vec<u8>, OverlayError> {
    let p = dir.join(JOURNAL_FILE);
    match std::fs::read(&p) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(with_path(e, &p)),
    }
}

impl Overlay {
    /// Create a new, empty overlay of `golden` in `dir` (created if needed) and open it.
    /// Refuses a directory that already holds an overlay.
    pub fn create(
        dir: &Path,
        golden: Arc<dyn BlockStore>,
        options: OverlayOptions,
    ) -> Result<Overlay, OverlayError> {
        let size = golden.size();
        format::validate_geometry(golden.block_size(), options.chunk_size, size)
            .map_err(OverlayError::BadOptions)?;
        if options
            .golden_id
            .as_ref()
            .is_some_and(|i| i.len() > format::MAX_ID)
        {
            return Err(OverlayError::BadOptions("golden id too long".into()));
        }
        std::fs::create_dir_all(dir).map_err(|e| with_path(e, dir))?;
        let meta_path = dir.join(META_FILE);
        if meta_path.exists() {
            return Err(OverlayError::Exists(meta_path));
        }
        // Data and journal first; the snapshot's atomic rename is the commit point, so a crash
        // before it leaves a directory `create` may simply redo.
        // Format v2: the data file starts empty and grows by a slot per first-touched chunk.
        let data = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(DATA_FILE))?;
        data.sync_all()?;
        let mut j = File::create(dir.join(JOURNAL_FILE))?;
        j.write_all(&format::journal_header(1))?;
        j.sync_all()?;
        write_meta(
            dir,
            &Meta {
                block_size: golden.block_size(),
                golden_size: size,
                chunk_size: options.chunk_size,
                golden_id: options.golden_id.clone(),
                generation: 1,
                last_seq: 0,
                next_slot: 0,
                extents: Vec::new(),
                version: format::VERSION,
            },
        )?;
        Self::open_with_id(dir, golden, options.golden_id.as_deref())
    }

    /// Open an existing overlay, recovering from a crash: the journal is replayed up to its
    /// first torn or damaged record, then compacted into a fresh snapshot. Refuses a golden
    /// image whose size or block size differs from the one recorded.
    pub fn open(dir: &Path, golden: Arc<dyn BlockStore>) -> Result<Overlay, OverlayError> {
        Self::open_with_id(dir, golden, None)
    }

    /// The golden image id recorded in the overlay in `dir` (None: made without one); its
    /// snapshot is read, nothing is opened for writing.
    pub fn recorded_golden_id(dir: &Path) -> Result<Option<String>, OverlayError> {
        Ok(read_meta(dir)?.golden_id)
    }

    /// Whether the overlay in `dir` was made for the golden image `golden_id` (its snapshot
    /// is read, nothing is opened for writing).
    pub fn check_golden_id(dir: &Path, golden_id: &str) -> Result<(), OverlayError> {
        let meta = read_meta(dir)?;
        if meta.golden_id.as_deref() != Some(golden_id) {
            return Err(OverlayError::GoldenMismatch(format!(
                "overlay was made for golden {:?}, not {golden_id:?}",
                meta.golden_id
            )));
        }
        Ok(())
    }

    /// [`Overlay::open`], also refusing a golden image whose recorded id differs from
    /// `golden_id` (when given).
    pub fn open_with_id(
        dir: &Path,
        golden: Arc<dyn BlockStore>,
        golden_id: Option<&str>,
    ) -> Result<Overlay, OverlayError> {
        let meta = read_meta(dir)?;
        if golden.size() != meta.golden_size || golden.block_size() != meta.block_size {
            return Err(OverlayError::GoldenMismatch(format!(
                "overlay was made for {} bytes in {}-byte blocks, golden has {} bytes in \
                 {}-byte blocks",
                meta.golden_size,
                meta.block_size,
                golden.size(),
                golden.block_size()
            )));
        }
        if let Some(want) = golden_id {
            if meta.golden_id.as_deref() != Some(want) {
                return Err(OverlayError::GoldenMismatch(format!(
                    "overlay was made for golden {:?}, not {want:?}",
                    meta.golden_id
                )));
            }
        }
        let data_path = dir.join(DATA_FILE);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(|e| with_path(e, &data_path))?;
        // One server per overlay: two writers would interleave journals.
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(data.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(OverlayError::Busy(dir.to_path_buf()));
        }
        // Reads of the data file fill its cache in 4 KiB folios, so that rewrites of chunks
        // the client read back do not pay for large folios (see `file::small_folios`).
        super::file::small_folios(&data);
        let rep = format::replay(&meta, &read_journal(dir)?);
        if let Some(p) = rep.problems.first() {
            // A record with a valid checksum but impossible contents is not crash damage.
            return Err(OverlayError::Corrupt {
                path: dir.join(JOURNAL_FILE),
                reason: p.clone(),
            });
        }
        // Every journaled slot's data was fdatasync'ed before its record: the file reaches
        // them all (anything past them is slots taken but never journaled, garbage).
        let data_len = data.metadata()?.len();
        let needed = data_needed(&rep.map, u64::from(meta.chunk_size), meta.golden_size);
        if data_len < needed {
            return Err(OverlayError::Corrupt {
                path: data_path,
                reason: format!("data file is {data_len} bytes, its slots need {needed}"),
            });
        }
        let journal = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(JOURNAL_FILE))?;
        let core = Arc::new(Core {
            dir: dir.to_path_buf(),
            size: meta.golden_size,
            block_size: meta.block_size,
            chunk: u64::from(meta.chunk_size),
            golden_id: meta.golden_id.clone(),
            data: data.try_clone()?,
            live: RwLock::new(Live {
                map: rep.map.clone(),
                pending: Vec::new(),
                since: None,
                retired: ExtentMap::new(),
            }),
            durable: Mutex::new(Durable {
                map: rep.map,
                journal,
                journal_len: 0,
                next_seq: rep.next_seq,
                generation: meta.generation,
                synced: 0,
                slot_end: rep.next_slot,
            }),
            written: AtomicU64::new(0),
            next_slot: AtomicU64::new(rep.next_slot),
            punch_hole: AtomicBool::new(true),
        });
        let writeback = Writeback::start(&dir.display().to_string(), {
            let core = Arc::clone(&core);
            move || core.writeback_flush()
        });
        let ov = Overlay {
            dir: dir.to_path_buf(),
            golden,
            size: meta.golden_size,
            block_size: meta.block_size,
            chunk: u64::from(meta.chunk_size),
            chunks: meta.chunks(),
            golden_id: meta.golden_id.clone(),
            data,
            core,
            writeback,
            gate: RwLock::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            flush_on_drop: AtomicBool::new(true),
            no_space: AtomicBool::new(false),
            retry_at: Mutex::new(None),
        };
        // Start from a clean snapshot and an empty journal: drops any torn tail so new
        // records are never appended after garbage. A full state filesystem must not keep the
        // client from reading its disk (issue 15): the overlay then opens for reads only.
        let compacted = {
            let mut d = lock(&ov.core.durable)?;
            ov.core.compact(&mut d)
        };
        match compacted {
            Ok(()) => {}
            Err(e) if out_of_space(&e) => {
                let _ = std::fs::remove_file(dir.join(META_TMP));
                tracing::warn!(dir = %dir.display(), error = %e,
                    "no space for the overlay snapshot: reads only until space is freed");
                ov.no_space.store(true, Ordering::Release);
            }
            Err(e) => return Err(e),
        }
        Ok(ov)
    }

    /// Open the overlay in `dir` if there is one (checking `options.golden_id` when set),
    /// else create it.
    pub fn open_or_create(
        dir: &Path,
        golden: Arc<dyn BlockStore>,
        options: OverlayOptions,
    ) -> Result<Overlay, OverlayError> {
        if Self::exists(dir) {
            Self::open_with_id(dir, golden, options.golden_id.as_deref())
        } else {
            Self::create(dir, golden, options)
        }
    }

    /// Whether writes are refused for lack of space (see `no_space`).
    pub fn out_of_space(&self) -> bool {
        self.no_space.load(Ordering::Acquire)
    }

    /// Before a write or discard: Ok when writes may go to the journal. An overlay opened
    /// without room for its snapshot tries the compaction again (at most once a second)
    /// and stays read-only while it fails.
    fn writable(&self) -> Result<(), OverlayError> {
        if !self.no_space.load(Ordering::Acquire) {
            return Ok(());
        }
        {
            let mut at = lock(&self.retry_at)?;
            let now = std::time::Instant::now();
            if at.is_some_and(|t| now < t) {
                return Err(no_space_error());
            }
            *at = Some(now + std::time::Duration::from_secs(1));
        }
        let mut d = lock(&self.core.durable)?;
        if !self.no_space.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.core.compact(&mut d) {
            Ok(()) => {
                self.no_space.store(false, Ordering::Release);
                tracing::info!(dir = %self.dir.display(), "overlay snapshot written: writes resume");
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(self.dir.join(META_TMP));
                Err(if out_of_space(&e) {
                    no_space_error()
                } else {
                    e
                })
            }
        }
    }

    /// Whether `dir` holds an overlay (its snapshot file exists).
    pub fn exists(dir: &Path) -> bool {
        dir.join(META_FILE).exists()
    }

    /// Flush, then drop: the orderly shutdown, reporting any error.
    pub fn close(self) -> Result<(), OverlayError> {
        self.writeback.stop();
        let res = self.core.flush_inner();
        self.flush_on_drop.store(false, Ordering::Relaxed);
        res
    }

    /// Flush, then fold the journal into a new snapshot and empty it (done on its own at open
    /// and when the journal passes 8 MiB).
    pub fn compact_now(&self) -> Result<(), OverlayError> {
        let _gate = self.gate.read().map_err(|_| OverlayError::Poisoned)?;
        self.core.flush_inner()?;
        let mut d = lock(&self.core.durable)?;
        self.core.compact(&mut d)
    }

    /// Drop without flushing, as a killed server would (for tests and fault drills): state
    /// changes not yet flushed are lost, which recovery must cope with.
    pub fn simulate_crash(self) {
        self.writeback.stop();
        self.flush_on_drop.store(false, Ordering::Relaxed);
    }

    /// The overlay directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The golden id recorded at creation.
    pub fn golden_id(&self) -> Option<&str> {
        self.golden_id.as_deref()
    }

    /// The state of the chunk holding byte `offset` (for diagnostics and tests).
    pub fn chunk_state(&self, offset: u64) -> Result<ChunkState, OverlayError> {
        self.check_range(offset, 1)?;
        let live = self.core.live.read().map_err(|_| OverlayError::Poisoned)?;
        Ok(live.map.run_at(offset / self.chunk, self.chunks).0)
    }

    pub fn stats(&self) -> OverlayStats {
        let (written, zeroed, extents, pending, last_overlay) = match self.core.live.read() {
            Ok(l) => (
                l.map.count(ChunkState::Overlay),
                l.map.count(ChunkState::Zero),
                l.map.len(),
                l.pending.len(),
                l.map.run_at(self.chunks.saturating_sub(1), self.chunks).0 == ChunkState::Overlay,
            ),
            Err(_) => (0, 0, 0, 0, false),
        };
        let data_slots = self.core.next_slot.load(Ordering::Relaxed);
        let (journal_bytes, generation) = match self.core.durable.lock() {
            Ok(d) => (d.journal_len, d.generation),
            Err(_) => (0, 0),
        };
        // The last chunk may be shorter than a full chunk.
        let short = self.chunks * self.chunk - self.size;
        let bytes = written * self.chunk - if last_overlay { short } else { 0 };
        OverlayStats {
            chunk_size: self.chunk as u32,
            chunks_written: written,
            bytes_written: bytes,
            data_slots,
            chunks_zeroed: zeroed,
            extents,
            pending_records: pending,
            journal_bytes,
            generation,
        }
    }

    /// Offline consistency check of an overlay directory (do not run it on an overlay that
    /// a server is writing: it would see a journal in flux).
    pub fn check(dir: &Path) -> Result<CheckReport, OverlayError> {
        let meta = read_meta(dir)?;
        let mut problems = Vec::new();
        let journal_path = dir.join(JOURNAL_FILE);
        if !journal_path.exists() {
            problems.push("journal file is missing".to_string());
        }
        let rep = format::replay(&meta, &read_journal(dir)?);
        problems.extend(rep.problems.iter().cloned());
        let data_file_size = match std::fs::metadata(dir.join(DATA_FILE)) {
            Ok(m) => m.len(),
            Err(e) => {
                problems.push(format!("data file: {e}"));
                0
            }
        };
        let needed = data_needed(&rep.map, u64::from(meta.chunk_size), meta.golden_size);
        if data_file_size < needed {
            problems.push(format!(
                "data file is {data_file_size} bytes, its slots need {needed}"
            ));
        }
        Ok(CheckReport {
            golden_size: meta.golden_size,
            block_size: meta.block_size,
            chunk_size: meta.chunk_size,
            golden_id: meta.golden_id.clone(),
            generation: meta.generation,
            snapshot_extents: meta.extents.len(),
            journal_records: rep.records,
            journal_ignored_bytes: rep.ignored_bytes,
            journal_stale: rep.stale_header,
            data_file_size,
            version: meta.version,
            chunks_written: rep.map.count(ChunkState::Overlay),
            chunks_zeroed: rep.map.count(ChunkState::Zero),
            problems,
        })
    }

    /// Discard every change: the disk reads as the golden image again. Crash-safe: the empty
    /// snapshot (slot counter 0) is made durable before any data is dropped, and stale data in
    /// the data file is harmless because a chunk only becomes overlay after a full-chunk write
    /// to its slot.
    pub fn reset(&self) -> Result<(), OverlayError> {
        let _gate = self.gate.write().map_err(|_| OverlayError::Poisoned)?;
        let mut d = lock(&self.core.durable)?;
        let mut live = self.core.live.write().map_err(|_| OverlayError::Poisoned)?;
        let meta = Meta {
            extents: Vec::new(),
            next_slot: 0,
            ..self.core.meta_for(&d)
        };
        write_meta(&self.dir, &meta)?;
        d.generation = meta.generation;
        d.slot_end = 0;
        self.core.next_slot.store(0, Ordering::SeqCst);
        d.map = ExtentMap::new();
        live.map = ExtentMap::new();
        live.pending.clear();
        live.since = None;
        live.retired = ExtentMap::new();
        drop(live);
        d.journal_len = 0;
        self.core.rewrite_journal(&mut d)?;
        // A fresh snapshot and journal: nothing torn is left to append after.
        self.no_space.store(false, Ordering::Release);
        // Free the space: slots are handed out from 0 again.
        self.data.set_len(0)?;
        self.data.sync_all()?;
        Ok(())
    }

    /// Write what the client sees (golden + overlay) into a NEW sparse image at `path`
    /// (refuses to overwrite): the "update one client, publish it as the next golden image"
    /// workflow. Unmapped and all-zero ranges are left as holes. The copy is written to
    /// `<path>.partial`, fsynced, then hard-linked to `path` (atomic, never overwrites).
    /// Client I/O waits while it runs, so the image is one point in time: use it on an idle
    /// client.
    pub fn commit_to(&self, path: &Path) -> Result<(), OverlayError> {
        if path.exists() {
            return Err(OverlayError::Exists(path.to_path_buf()));
        }
        let _gate = self.gate.write().map_err(|_| OverlayError::Poisoned)?;
        super::write_new_file(path, |out| Ok(self.copy_out(out)?)).map_err(|e| match e {
            StorageError::Io(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                OverlayError::Exists(path.to_path_buf())
            }
            e => OverlayError::Storage(e),
        })
    }

    /// Freeze what the client changed, as of one point in time, into a version layer
    /// (`client commit`): overlay chunks become data extents (copied with
    /// `copy_file_range`, so extents are shared where the filesystem has reflinks), zero
    /// chunks become zero extents; golden chunks are left to the parent version. Client I/O
    /// waits only while the *changed* chunks are copied (never the whole disk), and the
    /// client keeps running on its overlay afterwards. Returns the bytes of changed data.
    pub fn freeze_into(
        &self,
        w: &mut super::versions::LayerWriter,
    ) -> Result<u64, super::versions::VersionError> {
        use super::versions::VersionError;
        let _gate = self
            .gate
            .write()
            .map_err(|_| VersionError::Storage(OverlayError::Poisoned.into()))?;
        let runs: Vec<Run> = {
            let live = self
                .core
                .live
                .read()
                .map_err(|_| VersionError::Storage(OverlayError::Poisoned.into()))?;
            live.map.iter().collect()
        };
        let mut bytes = 0;
        for r in runs {
            let (start, end) = (r.start * self.chunk, (r.end * self.chunk).min(self.size));
            if start >= end {
                continue;
            }
            match r.state {
                ChunkState::Overlay => {
                    // A run's chunks are in consecutive slots: one copy.
                    w.copy_from(start, end, &self.data, r.slot * self.chunk)?;
                    bytes += end - start;
                }
                ChunkState::Zero => w.zero(start, end)?,
                ChunkState::Golden => {}
            }
        }
        Ok(bytes)
    }

    fn copy_out(&self, out: &File) -> Result<(), OverlayError> {
        out.set_len(self.size)?;
        let mut buf = vec![0u8; COPY_BUF];
        let mut pos = 0;
        while pos < self.size {
            let run = {
                let live = self.core.live.read().map_err(|_| OverlayError::Poisoned)?;
                live.map.lookup(pos / self.chunk, self.chunks)
            };
            let end = (run.end * self.chunk).min(self.size);
            match run.state {
                ChunkState::Zero => {}
                ChunkState::Overlay => {
                    // `pos` is the run's first chunk (runs start at chunk boundaries).
                    let at = run.slot * self.chunk;
                    self.copy_range(out, &mut buf, pos, end, |b, o| {
                        Ok(self.data.read_exact_at(b, at + (o - pos))?)
                    })?;
                }
                ChunkState::Golden => {
                    // Skip what the golden image itself has unmapped (sparse stays sparse).
                    let mut p = pos;
                    while p < end {
                        let (mapped, run) = self.golden.allocation(p)?;
                        let e = p.saturating_add(run.max(1)).min(end);
                        if mapped {
                            self.copy_range(out, &mut buf, p, e, |b, o| {
                                Ok(self.golden.read_at(b, o)?)
                            })?;
                        }
                        p = e;
                    }
                }
            }
            pos = end;
        }
        Ok(())
    }

    /// Copy `[start, end)` through `buf`, skipping all-zero chunk-sized pieces.
    fn copy_range(
        &self,
        out: &File,
        buf: &mut [u8],
        start: u64,
        end: u64,
        read: impl Fn(&mut [u8], u64) -> Result<(), OverlayError>,
    ) -> Result<(), OverlayError> {
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            let b = buf.get_mut(..n).unwrap_or_default();
            read(b, pos)?;
            let mut off = 0usize;
            for piece in b.chunks(self.chunk as usize) {
                if piece.iter().any(|&x| x != 0) {
                    out.write_all_at(piece, pos + off as u64)?;
                }
                off += piece.len();
            }
            pos += n as u64;
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(StorageError::OutOfRange { offset, len }),
        }
    }

    /// Lock the stripes of chunks `[cs, ce)` in ascending order.
    fn lock_stripes(&self, cs: u64, ce: u64) -> Result<Vec<MutexGuard<'_, ()>>, OverlayError> {
        self.lock_stripes_of(&[(cs, ce)])
    }

    /// Lock the stripes of the chunk ranges `[cs, ce)` of `ranges`, each once, in ascending
    /// order.
    fn lock_stripes_of(
        &self,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<MutexGuard<'_, ()>>, OverlayError> {
        let n = STRIPES as u64;
        let mut idx: Vec<usize> = Vec::new();
        for &(cs, ce) in ranges {
            if ce - cs >= n {
                idx = (0..STRIPES).collect();
                break;
            }
            idx.extend((cs..ce).map(|c| (c % n) as usize));
        }
        idx.sort_unstable();
        idx.dedup();
        idx.iter()
            .filter_map(|&i| self.stripes.get(i))
            .map(lock)
            .collect()
    }

    /// The write path, with the gate held by the caller. Returns the write's group-commit
    /// ticket.
    fn write_locked(&self, data: &[u8], offset: u64) -> Result<u64, OverlayError> {
        let end = offset + data.len() as u64;
        let cs = offset / self.chunk;
        let ce = end.div_ceil(self.chunk);
        let _stripes = self.lock_stripes(cs, ce)?;
        let (found, retired) = {
            let live = self.core.live.read().map_err(|_| OverlayError::Poisoned)?;
            let found = live.map.runs(cs, ce);
            let retired = if live.retired.is_empty() {
                Vec::new()
            } else {
                live.retired.runs(cs, ce)
            };
            (found, retired)
        };
        // Chunks turning overlay take the next free slots, in write order (the data file
        // grows by appends), or, unmapped earlier in this session, their own slot again.
        // Under the stripe locks, so no other writer gives them slots.
        let mut fresh = false;
        let mut runs = Vec::with_capacity(found.len());
        for r in found {
            if r.state == ChunkState::Overlay {
                runs.push(r);
                continue;
            }
            fresh = true;
            let pieces = if r.state == ChunkState::Zero && !retired.is_empty() {
                retired
                    .iter()
                    .filter(|p| p.end > r.start && p.start < r.end)
                    .map(|p| {
                        let (s, e) = (p.start.max(r.start), p.end.min(r.end));
                        let slot = (p.state == ChunkState::Overlay).then(|| p.slot_of(s));
                        (s, e, slot)
                    })
                    .collect()
            } else {
                vec![(r.start, r.end, None)]
            };
            for (s, e, slot) in pieces {
                let slot =
                    slot.unwrap_or_else(|| self.core.next_slot.fetch_add(e - s, Ordering::SeqCst));
                runs.push(Run {
                    start: s,
                    end: e,
                    state: r.state,
                    slot,
                });
            }
        }
        // The data-file offset of device byte `pos` (inside run `r`).
        let at = |r: &Run, pos: u64| r.slot_of(pos / self.chunk) * self.chunk + pos % self.chunk;
        // Copy-on-write: a chunk turning overlay gets its whole content in its slot before
        // its state flips, so readers and a post-crash replay never see it half-made.
        let first = cs * self.chunk;
        if let Some(r) = runs.first().filter(|r| r.state != ChunkState::Overlay) {
            if offset > first {
                self.fill(r.state, first, offset, at(r, first))?;
            }
        }
        let last_end = (ce * self.chunk).min(self.size);
        if let Some(r) = runs.last().filter(|r| r.state != ChunkState::Overlay) {
            if end < last_end {
                self.fill(r.state, end, last_end, at(r, end))?;
            }
        }
        for r in &runs {
            let from = (r.start * self.chunk).max(offset);
            let to = (r.end * self.chunk).min(end);
            self.data
                .write_all_at(part_of(data, offset, from, to)?, at(r, from))?;
        }
        if !fresh {
            // Rewrite in place: no state change, nothing to journal.
            return Ok(self.take_ticket());
        }
        let mut live = self.core.live.write().map_err(|_| OverlayError::Poisoned)?;
        for r in runs.iter().filter(|r| r.state != ChunkState::Overlay) {
            live.map_fresh(r);
        }
        drop(live);
        Ok(self.take_ticket())
    }

    /// [`BlockStore::write_many`], with the gate held. Whole-chunk writes go in groups to
    /// [`Overlay::write_group`]; a group ends before a write that is not whole chunks (it
    /// goes through `write_locked`) or that touches a chunk already in the group, so the
    /// writes keep their order. None is FUA, so no one waits on their group-commit tickets.
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Result<(), OverlayError> {
        let mut group: Vec<(u64, &[u8])> = Vec::new();
        for &(offset, data) in writes {
            if data.is_empty() {
                continue;
            }
            let end = offset + data.len() as u64;
            let whole = offset % self.chunk == 0 && end % self.chunk == 0;
            // Whole chunks: the byte ranges overlap exactly when the chunk ranges do.
            let clash = group
                .iter()
                .any(|&(o, d)| o < end && offset < o + d.len() as u64);
            if !whole || clash {
                self.write_group(&group)?;
                group.clear();
            }
            if whole {
                group.push((offset, data));
            } else {
                self.write_locked(data, offset)?;
            }
        }
        self.write_group(&group)
    }

    /// Writes of whole chunks, no two touching the same chunk. The chunks written for the
    /// first time take consecutive slots and reach the data file with one `pwritev(2)` (a
    /// first touch is an append, and these appends are side by side), and their state
    /// changes are queued under one lock; rewrites go to their slots in place. Crash safety
    /// is `write_locked`'s: the data is in its slots before the map points at them.
    fn write_group(&self, group: &[(u64, &[u8])]) -> Result<(), OverlayError> {
        match group {
            [] => return Ok(()),
            [(offset, data)] => return self.write_locked(data, *offset).map(drop),
            _ => {}
        }
        let ranges: Vec<(u64, u64)> = group
            .iter()
            .map(|&(o, d)| (o / self.chunk, (o + d.len() as u64) / self.chunk))
            .collect();
        let stripes = self.lock_stripes_of(&ranges)?;
        let found: Vec<Vec<Run>> = {
            let live = self.core.live.read().map_err(|_| OverlayError::Poisoned)?;
            let found: Vec<Vec<Run>> = ranges
                .iter()
                .map(|&(cs, ce)| live.map.runs(cs, ce))
                .collect();
            // A chunk unmapped earlier in this session goes back to its own slot (Live::
            // retired): write_locked knows how.
            let retired = !live.retired.is_empty()
                && found.iter().flatten().any(|r| r.state == ChunkState::Zero);
            if retired {
                drop(live);
                drop(stripes);
                for &(offset, data) in group {
                    self.write_locked(data, offset)?;
                }
                return Ok(());
            }
            found
        };
        let fresh_chunks: u64 = found
            .iter()
            .flatten()
            .filter(|r| r.state != ChunkState::Overlay)
            .map(|r| r.end - r.start)
            .sum();
        let base = self
            .core
            .next_slot
            .fetch_add(fresh_chunks, Ordering::SeqCst);
        let mut slot = base;
        let mut parts: Vec<io::IoSlice<'_>> = Vec::new();
        let mut fresh: Vec<Run> = Vec::new();
        for (&(offset, data), runs) in group.iter().zip(&found) {
            for r in runs {
                let part = part_of(data, offset, r.start * self.chunk, r.end * self.chunk)?;
                if r.state == ChunkState::Overlay {
                    self.data.write_all_at(part, r.slot * self.chunk)?;
                    continue;
                }
                parts.push(io::IoSlice::new(part));
                fresh.push(Run {
                    start: r.start,
                    end: r.end,
                    state: r.state,
                    slot,
                });
                slot += r.end - r.start;
            }
        }
        write_all_vectored_at(&self.data, &mut parts, base * self.chunk)?;
        if !fresh.is_empty() {
            let mut live = self.core.live.write().map_err(|_| OverlayError::Poisoned)?;
            for r in &fresh {
                live.map_fresh(r);
            }
        }
        // Counted like any write, so that a later flush_upto knows these are covered.
        self.take_ticket();
        Ok(())
    }

    /// A completed write's (or discard's) group-commit ticket: taken after its data and
    /// state records are in place.
    fn take_ticket(&self) -> u64 {
        self.core.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Write the old content of device bytes `[from, to)` (part of one non-overlay chunk) to
    /// the data file at `at` (in the chunk's new slot).
    fn fill(&self, state: ChunkState, from: u64, to: u64, at: u64) -> Result<(), OverlayError> {
        let mut b = vec![0u8; (to - from) as usize];
        if state == ChunkState::Golden {
            self.golden.read_at(&mut b, from)?;
        }
        self.data.write_all_at(&b, at)?;
        Ok(())
    }

    /// After a write or discard that did not flush: bound the waiting state changes by
    /// number and age (writeback.rs). Past `BACKGROUND_AT`, or once the oldest is
    /// `MAX_AGE` old, the writeback thread flushes while the client keeps writing; past
    /// `MAX_PENDING` the writer flushes itself. Durability is unchanged: a flush on its own
    /// is one more group commit (data fdatasync'ed before its records are journaled) and
    /// acknowledges nothing.
    fn after_change(&self) -> Result<(), OverlayError> {
        let (n, since) = match self.core.live.read() {
            Ok(l) => (l.pending.len(), l.since),
            Err(_) => return Err(OverlayError::Poisoned),
        };
        if self.writeback.after_change(n, since) {
            return self.core.flush_inner();
        }
        Ok(())
    }

    /// How long a state change may wait before it is flushed on its own (35 s by default,
    /// after the kernel's writeback of the data it points at); tests and drills shorten it.
    pub fn set_writeback_age(&self, age: Duration) {
        self.writeback.set_max_age(age);
    }
}

impl Core {
    /// The writeback thread's flush: everything completed so far; returns when the oldest
    /// change still waiting (queued meanwhile, or kept by a failed flush) was queued.
    fn writeback_flush(&self) -> Option<Instant> {
        if let Err(e) = self.flush_inner() {
            // The records stay queued; the next flush retries and reports.
            tracing::warn!(dir = %self.dir.display(), "background overlay flush failed: {e}");
        }
        self.live.read().ok().and_then(|l| l.since)
    }

    /// Give the space of data-file bytes `[from, to)` back to the file system.
    fn punch(&self, from: u64, to: u64) {
        if !self.punch_hole.load(Ordering::Relaxed) || to <= from {
            return;
        }
        let (Ok(off), Ok(len)) = (
            libc::off_t::try_from(from),
            libc::off_t::try_from(to - from),
        ) else {
            return;
        };
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.data.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if r != 0 {
            // Only space is lost: zero chunks never read the data file.
            self.punch_hole.store(false, Ordering::Relaxed);
        }
    }

    fn meta_for(&self, d: &Durable) -> Meta {
        Meta {
            block_size: self.block_size,
            golden_size: self.size,
            chunk_size: self.chunk as u32,
            golden_id: self.golden_id.clone(),
            generation: d.generation + 1,
            last_seq: d.next_seq.wrapping_sub(1),
            next_slot: d.slot_end,
            extents: d.map.iter().collect(),
            version: format::VERSION,
        }
    }

    /// Snapshot the durable map under a new generation, then start an empty journal. A crash
    /// between the two leaves a journal of the old generation, which replay ignores (its
    /// records are all in the snapshot).
    fn compact(&self, d: &mut Durable) -> Result<(), OverlayError> {
        let meta = self.meta_for(d);
        write_meta(&self.dir, &meta)?;
        d.generation = meta.generation;
        d.journal_len = 0;
        self.rewrite_journal(d)
    }

    /// Truncate the journal and write a header of the current generation. Old records left
    /// behind by a reordered truncate carry old sequence numbers, so replay stops at them.
    fn rewrite_journal(&self, d: &mut Durable) -> Result<(), OverlayError> {
        d.journal.set_len(0)?;
        d.journal
            .write_all_at(&format::journal_header(d.generation), 0)?;
        d.journal.sync_data()?;
        d.journal_len = JOURNAL_HEADER;
        Ok(())
    }

    /// Make every completed write durable: fdatasync the data FIRST, then journal the state
    /// changes and fdatasync the journal, so no record ever points at data that is not on
    /// disk (a golden→overlay chunk never surfaces after a crash with garbage in it).
    fn flush_inner(&self) -> Result<(), OverlayError> {
        self.flush_upto(self.written.load(Ordering::SeqCst))
    }

    /// Group commit: make durable every write whose ticket is at most `ticket`. Concurrent
    /// FUA writes and SYNCHRONIZE CACHEs queue on the flush lock; whoever gets it reads the
    /// ticket counter first and then syncs everything completed up to that point, so those
    /// queued behind it find their ticket covered and return without an fsync of their own
    /// (one pair of fdatasyncs for a whole queue depth of FUA writes, not one per write).
    /// Sound because a write takes its ticket only after its pwrite returned and its state
    /// record was queued, and the records are taken after the counter is read.
    fn flush_upto(&self, ticket: u64) -> Result<(), OverlayError> {
        let mut d = lock(&self.durable)?;
        if d.synced >= ticket {
            return Ok(());
        }
        let covered = self.written.load(Ordering::SeqCst);
        // Every pending record was pushed after its pwrite returned, so the fdatasync below
        // covers its data.
        let (recs, since) = {
            let mut live = self.live.write().map_err(|_| OverlayError::Poisoned)?;
            (std::mem::take(&mut live.pending), live.since.take())
        };
        let res = self.journal_batch(&mut d, &recs);
        if let Err(e) = res {
            // Keep the changes for the next attempt, in order, ahead of newer ones.
            if let Ok(mut live) = self.live.write() {
                let newer = std::mem::replace(&mut live.pending, recs);
                live.pending.extend(newer);
                live.since = since.or(live.since);
            }
            return Err(e);
        }
        d.synced = d.synced.max(covered);
        if d.journal_len > COMPACT_AT {
            // The batch is durable already; a failed compaction only leaves a long journal.
            if let Err(e) = self.compact(&mut d) {
                tracing::warn!(dir = %self.dir.display(), "overlay compaction failed: {e}");
            }
        }
        Ok(())
    }

    fn journal_batch(&self, d: &mut Durable, recs: &[Rec]) -> Result<(), OverlayError> {
        self.data.sync_data()?;
        if recs.is_empty() {
            return Ok(());
        }
        if d.journal_len == 0 {
            self.rewrite_journal(d)?;
        }
        let mut buf = Vec::with_capacity(recs.len() * format::RECORD);
        for (i, r) in recs.iter().enumerate() {
            format::encode_record(d.next_seq.wrapping_add(i as u64), r, &mut buf);
        }
        let at = d.journal_len;
        let res = d
            .journal
            .write_all_at(&buf, at)
            .and_then(|()| d.journal.sync_data());
        if let Err(e) = res {
            // Cut a possibly half-written batch so the retry starts at a clean boundary.
            let _ = d.journal.set_len(at);
            return Err(e.into());
        }
        for r in recs {
            d.map.set_run(r.start, r.start + r.count, r.state, r.slot);
            if r.state == ChunkState::Overlay {
                d.slot_end = d.slot_end.max(r.slot + r.count);
            }
        }
        d.next_seq = d.next_seq.wrapping_add(recs.len() as u64);
        d.journal_len = at + buf.len() as u64;
        Ok(())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        self.writeback.stop();
        if self.flush_on_drop.load(Ordering::Relaxed) {
            if let Err(e) = self.core.flush_inner() {
                tracing::warn!(dir = %self.dir.display(), "overlay flush on close failed: {e}");
            }
        }
    }
}

impl BlockStore for Overlay {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        false
    }

    /// Only a range that lies wholly in the golden image (read-only: its pages stay what
    /// they are); anything the client wrote is read and copied as before.
    fn file_slice(&self, offset: u64, len: u64) -> Option<super::FileSlice> {
        self.check_range(offset, len).ok()?;
        if len == 0 {
            return None;
        }
        let _gate = self.gate.read().ok()?;
        let runs = {
            let live = self.core.live.read().ok()?;
            live.map
                .runs(offset / self.chunk, (offset + len).div_ceil(self.chunk))
        };
        match runs.as_slice() {
            [r] if r.state == ChunkState::Golden => self.golden.file_slice(offset, len),
            _ => None,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _gate = self.gate.read().map_err(|_| OverlayError::Poisoned)?;
        let end = offset + buf.len() as u64;
        let runs = {
            let live = self.core.live.read().map_err(|_| OverlayError::Poisoned)?;
            live.map.runs(offset / self.chunk, end.div_ceil(self.chunk))
        };
        for r in runs {
            let from = (r.start * self.chunk).max(offset);
            let to = (r.end * self.chunk).min(end);
            let part = buf
                .get_mut((from - offset) as usize..(to - offset) as usize)
                .ok_or(StorageError::OutOfRange {
                    offset: from,
                    len: to - from,
                })?;
            match r.state {
                ChunkState::Golden => self.golden.read_at(part, from)?,
                ChunkState::Overlay => self.data.read_exact_at(
                    part,
                    r.slot_of(from / self.chunk) * self.chunk + from % self.chunk,
                )?,
                ChunkState::Zero => part.fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), StorageError> {
        self.check_range(offset, data.len() as u64)?;
        let _gate = self.gate.read().map_err(|_| OverlayError::Poisoned)?;
        self.writable()?;
        let ticket = if data.is_empty() {
            self.core.written.load(Ordering::SeqCst)
        } else {
            self.write_locked(data, offset)?
        };
        // FUA (SBC-3 §5.x WRITE FUA bit): durable, state record included, before status.
        if fua {
            self.core.flush_upto(ticket)?;
        } else {
            self.after_change()?;
        }
        Ok(())
    }

    fn write_many(&self, writes: &[(u64, &[u8])]) -> Result<(), StorageError> {
        for &(offset, data) in writes {
            self.check_range(offset, data.len() as u64)?;
        }
        let _gate = self.gate.read().map_err(|_| OverlayError::Poisoned)?;
        self.writable()?;
        self.write_batch(writes)?;
        self.after_change()?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        let _gate = self.gate.read().map_err(|_| OverlayError::Poisoned)?;
        Ok(self.core.flush_inner()?)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _gate = self.gate.read().map_err(|_| OverlayError::Poisoned)?;
        self.writable()?;
        let end = offset + len;
        // Whole chunks become zero; the partial chunks at either edge get zeroes written.
        let cs = offset.div_ceil(self.chunk);
        let ce = if end == self.size {
            self.chunks
        } else {
            end / self.chunk
        };
        if cs >= ce {
            self.write_locked(&vec![0u8; len as usize], offset)?;
        } else {
            let (a, b) = (cs * self.chunk, (ce * self.chunk).min(self.size));
            if offset < a {
                self.write_locked(&vec![0u8; (a - offset) as usize], offset)?;
            }
            if b < end {
                self.write_locked(&vec![0u8; (end - b) as usize], b)?;
            }
            let _stripes = self.lock_stripes(cs, ce)?;
            let runs = {
                let mut live = self.core.live.write().map_err(|_| OverlayError::Poisoned)?;
                let runs = live.map.runs(cs, ce);
                for r in &runs {
                    if r.state != ChunkState::Zero {
                        live.queue(Rec {
                            start: r.start,
                            count: r.end - r.start,
                            state: ChunkState::Zero,
                            slot: 0,
                        });
                    }
                    if r.state == ChunkState::Overlay {
                        live.retired.set_slots(r.start, r.end, r.slot);
                    }
                }
                live.map.set(cs, ce, ChunkState::Zero);
                runs
            };
            self.take_ticket();
            // After the flip: a crash before the record is durable reads the old state over a
            // hole, i.e. zeroes, which is the new content (the chunk keeps its slot, see
            // `Live::retired`).
            for r in runs.iter().filter(|r| r.state == ChunkState::Overlay) {
                self.core.punch(
                    r.slot * self.chunk,
                    (r.slot + (r.end - r.start)) * self.chunk,
                );
            }
        }
        self.after_change()?;
        Ok(())
    }

    fn thin_provisioned(&self) -> bool {
        true
    }

    /// A client disk's thin-provisioning resources (LOG SENSE page 0x0C, SBC-4 §6.4.6):
    /// used is what the client's own writes occupy (the golden image is shared, not its
    /// cost), available is the free space of the state filesystem its overlay grows on.
    fn space(&self) -> Option<super::Space> {
        let available = super::fs_available(&self.data)?;
        Some(super::Space {
            available,
            used: self.stats().bytes_written,
        })
    }

    fn discard_changes(&self) -> Result<bool, StorageError> {
        self.reset()?;
        Ok(true)
    }

    fn allocation(&self, offset: u64) -> Result<(bool, u64), StorageError> {
        self.check_range(offset, 1)?;
        let _gate = self.gate.read().map_err(|_| OverlayError::Poisoned)?;
        let bs = u64::from(self.block_size);
        let offset = offset - offset % bs;
        let (state, run_end) = {
            let live = self.core.live.read().map_err(|_| OverlayError::Poisoned)?;
            live.map.run_at(offset / self.chunk, self.chunks)
        };
        let run = (run_end * self.chunk).min(self.size) - offset;
        match state {
            ChunkState::Overlay => Ok((true, run)),
            ChunkState::Zero => Ok((false, run)),
            ChunkState::Golden => {
                let (mapped, grun) = self.golden.allocation(offset)?;
                Ok((mapped, grun.clamp(bs, run.max(bs))))
            }
        }
    }
}
