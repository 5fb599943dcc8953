//! Flat copies of deep versions (derived data, docs/images.md "Flat copies").
//!
//! A version whose chain is at least `materialize_depth` layers deep gets, the first time it
//! is read in the server, a background copy as one flat sparse file:
//! `<image>/flat/v<N>-<uid>.flat` (the name carries the version's identity, so a copy is
//! never used for another version; versions are immutable, so it never goes stale). The copy
//! is written under `.partial` (held with `flock` while written), by `copy_file_range` per run
//! of the merged map (holes where the chain reads zeroes or the base has a hole), fsynced,
//! renamed and the directory fsynced; then the version's reads switch to it at once
//! ([`Slot::ready`], a `OnceLock`: a read takes the flat file or the chain for its whole
//! length, never a mix). A crash leaves at most a `.partial` that nobody holds: it is
//! deleted by the next materialization or `image gc`. Deleting a flat copy never loses
//! anything.

use super::{copy_range, fsync_dir, with_path, MergedMap, Source, VersionError};
use crate::storage::{BlockStore, FileStore};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// The directory of flat copies inside an image's directory.
pub const FLAT_DIR: &str = "flat";
/// Bytes copied between two rate checks.
const PIECE: u64 = 4 << 20;

/// When versions are materialized (settings `materialize_depth`, `materialize_rate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlatPolicy {
    /// Versions with at least this many layers above their base get a flat copy; 0: never.
    pub min_depth: u32,
    /// Bytes a second the copy reads and writes at most; 0: no limit.
    pub rate: u64,
}

impl FlatPolicy {
    pub const OFF: FlatPolicy = FlatPolicy {
        min_depth: 0,
        rate: 0,
    };
}

static POLICY: Mutex<FlatPolicy> = Mutex::new(FlatPolicy::OFF);

/// Set the process's policy (the server does, from `settings:`; the CLI leaves it off, so
/// `image export` and friends never start a copy).
pub fn set_policy(p: FlatPolicy) {
    *POLICY.lock().unwrap_or_else(|e| e.into_inner()) = p;
}

/// The server's policy from `settings:` (at start and at every reload).
pub fn apply_settings(s: &crate::config::SettingsConfig) {
    set_policy(FlatPolicy {
        min_depth: s.materialize_depth,
        rate: s.materialize_rate.0,
    });
}

pub fn policy() -> FlatPolicy {
    *POLICY.lock().unwrap_or_else(|e| e.into_inner())
}

static MATERIALIZED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);
static RUNNING: AtomicU64 = AtomicU64::new(0);

/// Counters for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlatStats {
    /// Flat copies completed by this process.
    pub materialized: u64,
    /// Copies that failed (the version stays on its chain).
    pub failed: u64,
    /// Copies running now.
    pub running: u64,
}

pub fn stats() -> FlatStats {
    FlatStats {
        materialized: MATERIALIZED.load(Ordering::Relaxed),
        failed: FAILED.load(Ordering::Relaxed),
        running: RUNNING.load(Ordering::Relaxed),
    }
}

/// The name of a version's flat copy.
pub fn flat_name(version: u64, uid: &str) -> String {
    format!("v{version}-{uid}.flat")
}

/// (version, uid) of a flat copy's name.
pub fn parse_flat_name(name: &str) -> Option<(u64, &str)> {
    let rest = name.strip_prefix('v')?.strip_suffix(".flat")?;
    let (v, uid) = rest.split_once('-')?;
    Some((v.parse().ok()?, uid))
}

/// One version's flat copy, shared by every store of that version in the process (a
/// reload opens new stores; they must not copy again).
pub struct Slot {
    pub path: PathBuf,
    ready: OnceLock<Arc<FileStore>>,
    running: AtomicBool,
}

impl Slot {
    /// The flat copy, once complete.
    pub fn ready(&self) -> Option<&Arc<FileStore>> {
        self.ready.get()
    }

    /// The copy at `path` is complete: open it and switch reads to it.
    pub(super) fn install(&self, block_size: u32) -> Result<(), VersionError> {
        let f = FileStore::open(&self.path, block_size, true)?;
        let _ = self.ready.set(Arc::new(f));
        Ok(())
    }
}

static SLOTS: LazyLock<Mutex<HashMap<PathBuf, Weak<Slot>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The slot of the flat copy at `path`; a complete copy already on disk (size `size`) is
/// opened and used at once. A file of the wrong size is deleted (derived data: nothing lost).
pub fn slot(path: &Path, size: u64, block_size: u32) -> Arc<Slot> {
    let mut slots = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = slots.get(path).and_then(Weak::upgrade) {
        return s;
    }
    slots.retain(|_, w| w.strong_count() > 0);
    let s = Arc::new(Slot {
        path: path.to_path_buf(),
        ready: OnceLock::new(),
        running: AtomicBool::new(false),
    });
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() == size => match FileStore::open(path, block_size, true) {
            Ok(f) => {
                let _ = s.ready.set(Arc::new(f));
                tracing::info!(path = %path.display(), "version served from its flat copy");
            }
            Err(e) => tracing::warn!(path = %path.display(), "flat copy not usable: {e}"),
        },
        Ok(m) if m.is_file() => {
            tracing::warn!(path = %path.display(), len = m.len(), want = size,
                "flat copy has the wrong size: deleted (it is derived data)");
            let _ = std::fs::remove_file(path);
        }
        _ => {}
    }
    slots.insert(path.to_path_buf(), Arc::downgrade(&s));
    s
}

/// `flock` `f` exclusively without waiting: false when another holder has it.
fn try_lock(f: &File) -> io::Result<bool> {
    // SAFETY: a valid fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Delete the `.partial` files in `dir` that no running copy holds (left by a crash).
/// Returns their names.
pub fn sweep_partials(dir: &Path) -> Result<Vec<String>, VersionError> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(with_path(e, dir)),
    };
    for e in rd.flatten() {
        let Some(n) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !n.ends_with(".partial") {
            continue;
        }
        let Ok(f) = File::open(e.path()) else {
            continue;
        };
        if try_lock(&f)? {
            std::fs::remove_file(e.path()).map_err(|er| with_path(er, &e.path()))?;
            out.push(n);
        }
    }
    Ok(out)
}

/// What a copy reads: the chain of one version.
pub(super) struct ChainFiles<'a> {
    pub base: &'a dyn BlockStore,
    /// The base file itself, for `copy_file_range` and its holes (None: read through `base`).
    pub base_file: Option<&'a File>,
    pub layers: &'a [File],
    pub map: &'a MergedMap,
    pub size: u64,
}

/// Paces a copy at `rate` bytes a second.
struct Pace {
    rate: u64,
    t0: Instant,
    done: u64,
}

impl Pace {
    fn step(&mut self, bytes: u64) {
        self.done += bytes;
        if self.rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.done as f64 / self.rate as f64);
        let el = self.t0.elapsed();
        if due > el {
            std::thread::sleep(due - el);
        }
    }
}

/// Data segments of `f` within `[start, end)` (SEEK_DATA/SEEK_HOLE; the whole range if the
/// file system cannot say).
fn data_segments(f: &File, start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: a valid fd; lseek only moves this fd's offset, which nothing else uses
        // (all IO here is positional).
        let d = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENXIO) {
                out.push((pos, end)); // cannot tell: copy it all
            }
            break;
        }
        let d = d as u64;
        if d >= end {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(f.as_raw_fd(), d as libc::off_t, libc::SEEK_HOLE) };
        let h = if h < 0 { end } else { (h as u64).min(end) };
        out.push((d, h));
        pos = h;
    }
    out
}

/// Copy `[s, e)` of the chain's reading to `out` at the same offsets, in paced pieces.
fn copy_piecewise(
    pace: &mut Pace,
    s: u64,
    e: u64,
    mut piece: impl FnMut(u64, u64) -> Result<(), VersionError>,
) -> Result<(), VersionError> {
    let mut p = s;
    while p < e {
        let q = (p + PIECE).min(e);
        piece(p, q)?;
        pace.step(q - p);
        p = q;
    }
    Ok(())
}

/// Write the flat copy of `chain` to `path` (via `path.partial`) and make it durable.
/// Returns the bytes of data copied.
pub(super) fn write_flat(chain: &ChainFiles, path: &Path, rate: u64) -> Result<u64, VersionError> {
    let dir = path
        .parent()
        .ok_or_else(|| VersionError::Invalid("flat copy path".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| with_path(e, dir))?;
    sweep_partials(dir)?;
    let partial = super::partial_path(path);
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&partial)
        .map_err(|e| with_path(e, &partial))?;
    // Held until the rename: a sweep (another copy starting, GC) leaves a running copy
    // alone. A sweep between our create and our lock could have deleted the file: check the
    // name still is ours.
    use std::os::unix::fs::MetadataExt;
    let ours = try_lock(&out)?
        && std::fs::metadata(&partial)
            .is_ok_and(|m| out.metadata().is_ok_and(|o| o.ino() == m.ino()));
    if !ours {
        return Err(VersionError::Invalid(format!(
            "{}: taken by another copy or a sweep",
            partial.display()
        )));
    }
    let res = (|| {
        out.set_len(chain.size)?;
        let mut pace = Pace {
            rate,
            t0: Instant::now(),
            done: 0,
        };
        let mut pos = 0;
        let mut buf = Vec::new();
        while pos < chain.size {
            let (src, end) = chain.map.run_at(pos, chain.size);
            match src {
                Some(Source::Zero) => {}
                Some(Source::Layer { idx, off }) => {
                    let f = chain
                        .layers
                        .get(idx as usize)
                        .ok_or_else(|| VersionError::Invalid("layer index".into()))?;
                    copy_piecewise(&mut pace, pos, end, |s, e| {
                        Ok(copy_range(f, off + (s - pos), &out, s, e - s)?)
                    })?;
                }
                None => match chain.base_file {
                    Some(bf) => {
                        for (s, e) in data_segments(bf, pos, end) {
                            copy_piecewise(&mut pace, s, e, |a, b| {
                                Ok(copy_range(bf, a, &out, a, b - a)?)
                            })?;
                        }
                    }
                    None => copy_piecewise(&mut pace, pos, end, |a, b| {
                        buf.resize((b - a) as usize, 0);
                        chain.base.read_at(&mut buf, a)?;
                        if buf.iter().any(|&x| x != 0) {
                            std::os::unix::fs::FileExt::write_all_at(&out, &buf, a)?;
                        }
                        Ok(())
                    })?,
                },
            }
            pos = end;
        }
        out.sync_all()?;
        std::fs::rename(&partial, path).map_err(|e| with_path(e, path))?;
        fsync_dir(dir)?;
        Ok(pace.done)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    res
}

/// Start the background copy for `slot` unless one runs or it is done: a dedicated thread
/// at low CPU and idle IO priority, paced at the policy's rate, so clients always come
/// first. `copy` does the work; the slot switches when it returns the opened file.
pub(super) fn spawn(
    slot: Arc<Slot>,
    label: String,
    copy: impl FnOnce() -> Result<u64, VersionError> + Send + 'static,
    block_size: u32,
) {
    if slot.ready().is_some() || slot.running.swap(true, Ordering::AcqRel) {
        return;
    }
    RUNNING.fetch_add(1, Ordering::Relaxed);
    let s2 = slot.clone();
    let spawned = std::thread::Builder::new()
        .name("materialize".into())
        .spawn(move || {
            lower_priority();
            let t0 = Instant::now();
            tracing::info!(version = %label, path = %s2.path.display(), "materializing a flat copy of a deep version");
            let res = copy().and_then(|bytes| s2.install(block_size).map(|()| bytes));
            match res {
                Ok(bytes) => {
                    MATERIALIZED.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(version = %label, path = %s2.path.display(), bytes,
                        secs = t0.elapsed().as_secs_f64(),
                        "version materialized: reads now go to its flat copy");
                }
                Err(e) => {
                    FAILED.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(version = %label, "materializing a flat copy failed (reads stay on the chain): {e}");
                }
            }
            RUNNING.fetch_sub(1, Ordering::Relaxed);
            s2.running.store(false, Ordering::Release);
        });
    if let Err(e) = spawned {
        RUNNING.fetch_sub(1, Ordering::Relaxed);
        slot.running.store(false, Ordering::Release);
        tracing::warn!("cannot start the materialize thread: {e}");
    }
}

/// Nice 10 and the lowest best-effort IO priority for the calling thread (both per-thread
/// on Linux; not the idle class, which a busy disk would starve forever); best effort.
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread's id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
        // ioprio_set(IOPRIO_WHO_PROCESS = 1, tid, IOPRIO_CLASS_BE << 13 | level 7).
        libc::syscall(libc::SYS_ioprio_set, 1, tid, (2 << 13) | 7);
    }
}
