//! Image versions (issue 11): an image is a named series of immutable versions kept in
//! `STATE_DIR/images/<name>/`. A version is a flat *base* file or a *layer* (a frozen overlay:
//! an extent map + the changed data) on its parent. Opening a version builds ONE merged map
//! (byte range -> which layer file and offset, or zero; gaps read the base), so a read costs
//! one map lookup per run whatever the depth of the chain (never a walk down the chain).
//!
//! The catalogue (versions, head, channels) sits behind [`CatalogueStore`] so another store
//! (etcd, issue 13) can hold it; [`DirCatalogue`] keeps it in `catalogue.json`, replaced
//! atomically (tmp, fsync, rename, directory fsync). Files are written under `.partial`
//! names, fsynced and renamed before the catalogue names them, so a crash at any point
//! leaves either the old catalogue or the new one, plus at most an orphan file that
//! [`Images::gc`] removes. docs/images.md has the operator's view.

use super::{BlockStore, FileStore, StorageError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub mod flat;

const CATALOGUE: &str = "catalogue.json";
const LOCK: &str = "lock";
const LAYER_MAGIC: &[u8; 8] = b"DLLAYER1";
/// Layer header size; the data region starts here.
const HEADER: u64 = 4096;
/// One extent record: start u64, end u64, data offset u64 (ZERO_EXTENT: reads as zeroes),
/// reserved u64.
const EXTENT: usize = 32;
const ZERO_EXTENT: u64 = u64::MAX;
const COPY_BUF: usize = 1 << 20;

/// Typed errors of the version store.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("no image named {0:?}")]
    NoImage(String),
    #[error("image {0:?} already exists")]
    ImageExists(String),
    #[error("image {image:?} has no version {version}")]
    NoVersion { image: String, version: u64 },
    #[error("image {image:?} has no channel {channel:?}")]
    NoChannel { image: String, channel: String },
    #[error("{path}: damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("invalid: {0}")]
    Invalid(String),
}

fn corrupt(path: &Path, reason: impl Into<String>) -> VersionError {
    VersionError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn with_path(e: io::Error, p: &Path) -> VersionError {
    VersionError::Io(io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_le_bytes)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_le_bytes)
}

/// Valid image names: `a-z 0-9 - _ .`, not starting with a dot, at most 64 bytes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

// ---------------------------------------------------------------------------------------
// Layer files
// ---------------------------------------------------------------------------------------

/// One extent of a layer: bytes `[start, end)` of the device read from `data` (an offset in
/// the layer file) or, for `None`, as zeroes (an UNMAP the client made).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerExtent {
    pub start: u64,
    pub end: u64,
    pub data: Option<u64>,
}

/// Writes a layer file: `HEADER` bytes of header, the changed data packed from `HEADER` on,
/// then the extent map and its CRC-32C. The header (magic, format 1, block size, device
/// size, map offset, extent count, crc32c of the header) is written last, so a torn file
/// never parses. Written to `<path>.partial`; [`LayerWriter::finish`] fsyncs and renames.
pub struct LayerWriter {
    file: File,
    partial: PathBuf,
    path: PathBuf,
    block_size: u32,
    size: u64,
    pos: u64,
    extents: Vec<LayerExtent>,
    /// Bytes of changed data (the "size of the change").
    pub data_bytes: u64,
}

impl LayerWriter {
    pub fn create(path: &Path, block_size: u32, size: u64) -> Result<LayerWriter, VersionError> {
        let partial = partial_path(path);
        let _ = std::fs::remove_file(&partial);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(|e| with_path(e, &partial))?;
        Ok(LayerWriter {
            file,
            partial,
            path: path.to_path_buf(),
            block_size,
            size,
            pos: HEADER,
            extents: Vec::new(),
            data_bytes: 0,
        })
    }

    fn check(&self, start: u64, end: u64) -> Result<(), VersionError> {
        let last = self.extents.last().map_or(0, |e| e.end);
        if start >= end || end > self.size || start < last {
            return Err(VersionError::Invalid(format!(
                "layer extent {start}..{end} out of order or out of range"
            )));
        }
        Ok(())
    }

    /// Bytes `[start, end)` read as zeroes in this layer.
    pub fn zero(&mut self, start: u64, end: u64) -> Result<(), VersionError> {
        self.check(start, end)?;
        self.extents.push(LayerExtent {
            start,
            end,
            data: None,
        });
        Ok(())
    }

    /// Bytes `[start, end)` of the device are `src[src_off .. src_off + (end - start)]`.
    /// Copied with `copy_file_range` (in the kernel; extents are shared on filesystems with
    /// reflinks, e.g. XFS and btrfs), falling back to read/write.
    pub fn copy_from(
        &mut self,
        start: u64,
        end: u64,
        src: &File,
        src_off: u64,
    ) -> Result<(), VersionError> {
        self.check(start, end)?;
        let len = end - start;
        copy_range(src, src_off, &self.file, self.pos, len)?;
        self.push_data(start, end);
        Ok(())
    }

    /// Bytes `[start, start + data.len())` of the device are `data`.
    pub fn data(&mut self, start: u64, data: &[u8]) -> Result<(), VersionError> {
        let end = start + data.len() as u64;
        self.check(start, end)?;
        self.file.write_all_at(data, self.pos)?;
        self.push_data(start, end);
        Ok(())
    }

    fn push_data(&mut self, start: u64, end: u64) {
        let len = end - start;
        self.extents.push(LayerExtent {
            start,
            end,
            data: Some(self.pos),
        });
        self.pos += len;
        self.data_bytes += len;
    }

    /// Write map and header, fsync, rename to the final name, fsync the directory.
    pub fn finish(self) -> Result<u64, VersionError> {
        let map_off = self.pos;
        let mut map = Vec::with_capacity(self.extents.len() * EXTENT + 4);
        for e in &self.extents {
            map.extend_from_slice(&e.start.to_le_bytes());
            map.extend_from_slice(&e.end.to_le_bytes());
            map.extend_from_slice(&e.data.unwrap_or(ZERO_EXTENT).to_le_bytes());
            map.extend_from_slice(&0u64.to_le_bytes());
        }
        let crc = crc32c::crc32c(&map);
        map.extend_from_slice(&crc.to_le_bytes());
        self.file.write_all_at(&map, map_off)?;
        let mut h = Vec::with_capacity(44);
        h.extend_from_slice(LAYER_MAGIC);
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&self.block_size.to_le_bytes());
        h.extend_from_slice(&self.size.to_le_bytes());
        h.extend_from_slice(&map_off.to_le_bytes());
        h.extend_from_slice(&(self.extents.len() as u64).to_le_bytes());
        let crc = crc32c::crc32c(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        self.file.write_all_at(&h, 0)?;
        self.file.sync_all()?;
        publish(&self.partial, &self.path)?;
        Ok(self.data_bytes)
    }
}

fn partial_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// Rename a complete, fsynced file to its final name and make the rename durable.
fn publish(partial: &Path, path: &Path) -> Result<(), VersionError> {
    std::fs::rename(partial, path).map_err(|e| with_path(e, path))?;
    if let Some(dir) = path.parent() {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// Copy `len` bytes between files: `copy_file_range(2)`, else read/write.
fn copy_range(src: &File, mut so: u64, dst: &File, mut d: u64, len: u64) -> io::Result<()> {
    let mut left = len;
    while left > 0 {
        let mut off_in = so as libc::loff_t;
        let mut off_out = d as libc::loff_t;
        let want = left.min(1 << 30) as usize;
        // SAFETY: two valid fds and offsets owned by this frame.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if n <= 0 {
            break;
        }
        let n = n as u64;
        so += n;
        d += n;
        left -= n;
    }
    if left > 0 {
        let mut buf = vec![0u8; COPY_BUF.min(left as usize)];
        while left > 0 {
            let n = buf.len().min(left as usize);
            let b = buf.get_mut(..n).unwrap_or_default();
            src.read_exact_at(b, so)?;
            dst.write_all_at(b, d)?;
            so += n as u64;
            d += n as u64;
            left -= n as u64;
        }
    }
    Ok(())
}

/// Header and extent map of a layer file (verified: checksums, order, ranges).
pub fn read_layer(path: &Path) -> Result<(File, u32, u64, Vec<LayerExtent>), VersionError> {
    let file = File::open(path).map_err(|e| with_path(e, path))?;
    let mut h = [0u8; 44];
    file.read_exact_at(&mut h, 0)
        .map_err(|_| corrupt(path, "short layer header"))?;
    if h.get(..8) != Some(LAYER_MAGIC.as_slice()) {
        return Err(corrupt(path, "not a layer file"));
    }
    let crc = u32_at(&h, 40).unwrap_or(0);
    if crc32c::crc32c(h.get(..40).unwrap_or_default()) != crc || u32_at(&h, 8) != Some(1) {
        return Err(corrupt(path, "bad layer header"));
    }
    let bs = u32_at(&h, 12).unwrap_or(0);
    let size = u64_at(&h, 16).unwrap_or(0);
    let map_off = u64_at(&h, 24).unwrap_or(0);
    let n = u64_at(&h, 32).unwrap_or(0);
    let flen = file.metadata()?.len();
    let map_len = n
        .checked_mul(EXTENT as u64)
        .and_then(|l| l.checked_add(4))
        .filter(|l| map_off.checked_add(*l).is_some_and(|e| e <= flen))
        .ok_or_else(|| corrupt(path, "extent map beyond the end of the file"))?;
    let mut map = vec![0u8; map_len as usize];
    file.read_exact_at(&mut map, map_off)?;
    let body = map.len() - 4;
    if crc32c::crc32c(map.get(..body).unwrap_or_default()) != u32_at(&map, body).unwrap_or(0) {
        return Err(corrupt(path, "extent map checksum"));
    }
    let mut out = Vec::with_capacity(n as usize);
    let mut last = 0;
    for i in 0..n as usize {
        let at = i * EXTENT;
        let (s, e, d) = (
            u64_at(&map, at).unwrap_or(0),
            u64_at(&map, at + 8).unwrap_or(0),
            u64_at(&map, at + 16).unwrap_or(0),
        );
        let data = (d != ZERO_EXTENT).then_some(d);
        if s < last || s >= e || e > size || data.is_some_and(|d| d + (e - s) > map_off) {
            return Err(corrupt(path, format!("bad extent {s}..{e}")));
        }
        last = e;
        out.push(LayerExtent {
            start: s,
            end: e,
            data,
        });
    }
    Ok((file, bs, size, out))
}

// ---------------------------------------------------------------------------------------
// The merged map
// ---------------------------------------------------------------------------------------

/// Where a run of bytes comes from in a merged version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Layer `idx` (in [`VersionStore`]'s list), at this file offset for the run's start.
    Layer {
        idx: u32,
        off: u64,
    },
    Zero,
}

impl Source {
    fn advance(self, by: u64) -> Source {
        match self {
            Source::Layer { idx, off } => Source::Layer { idx, off: off + by },
            Source::Zero => Source::Zero,
        }
    }
}

/// Disjoint byte runs `start -> (end, source)`; a gap reads the base.
#[derive(Debug, Default, Clone)]
pub struct MergedMap {
    runs: BTreeMap<u64, (u64, Source)>,
}

impl MergedMap {
    /// Make `[start, end)` come from `src` (newer layers overwrite older ones).
    pub fn set(&mut self, start: u64, end: u64, src: Source) {
        if start >= end {
            return;
        }
        // A run that starts before `start` and reaches into the range: cut it.
        if let Some((&s, &(e, so))) = self.runs.range(..start).next_back() {
            if e > start {
                self.runs.insert(s, (start, so));
                if e > end {
                    self.runs.insert(end, (e, so.advance(end - s)));
                }
            }
        }
        // Runs starting inside the range: drop, keeping the tail of the last one.
        let inside: Vec<u64> = self.runs.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some((e, so)) = self.runs.remove(&s) {
                if e > end {
                    self.runs.insert(end, (e, so.advance(end - s)));
                }
            }
        }
        self.runs.insert(start, (end, src));
        self.coalesce(start);
    }

    /// Merge the run at `start` with its neighbours when they continue it (same source,
    /// contiguous data): fewer runs, fewer reads split at run edges.
    fn coalesce(&mut self, start: u64) {
        let mut start = start;
        if let Some((&ps, &(pe, psrc))) = self.runs.range(..start).next_back() {
            if let Some(&(e, src)) = self.runs.get(&start) {
                if pe == start && psrc.advance(start - ps) == src {
                    self.runs.remove(&start);
                    self.runs.insert(ps, (e, psrc));
                    start = ps;
                }
            }
        }
        if let Some(&(e, src)) = self.runs.get(&start) {
            if let Some(&(ne, nsrc)) = self.runs.get(&e) {
                if src.advance(e - start) == nsrc {
                    self.runs.remove(&e);
                    self.runs.insert(start, (ne, src));
                }
            }
        }
    }

    /// The run at `pos`: (source or None for the base, end of the run, clamped to `limit`).
    pub fn run_at(&self, pos: u64, limit: u64) -> (Option<Source>, u64) {
        if let Some((&s, &(e, so))) = self.runs.range(..=pos).next_back() {
            if e > pos {
                return (Some(so.advance(pos - s)), e.min(limit));
            }
        }
        let next = self.runs.range(pos..).next().map_or(limit, |(&k, _)| k);
        (None, next.min(limit))
    }

    pub fn len(&self) -> usize {
        self.runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

/// The chain of one version: the base plus its layers, with one merged map.
struct Chain {
    base: Arc<dyn BlockStore>,
    /// The base file itself (for the flat copy's `copy_file_range` and holes).
    base_file: Option<File>,
    layers: Vec<File>,
    map: MergedMap,
    size: u64,
    block_size: u32,
}

/// One version opened for reading: its chain (one merged map), and the flat copy that
/// replaces the chain for reads once it exists ([`flat`]).
pub struct VersionStore {
    chain: Arc<Chain>,
    flat: Option<Arc<flat::Slot>>,
    /// Layers above the base.
    depth: u32,
    label: String,
    /// A read asked for the flat copy already (the policy is checked once per store).
    asked: AtomicBool,
}

impl VersionStore {
    /// Open a chain: `base` (oldest) and layer files oldest first.
    pub fn open(
        base: Arc<dyn BlockStore>,
        layer_paths: &[PathBuf],
    ) -> Result<VersionStore, VersionError> {
        Self::open_chain(base, None, layer_paths)
    }

    fn open_chain(
        base: Arc<dyn BlockStore>,
        base_file: Option<File>,
        layer_paths: &[PathBuf],
    ) -> Result<VersionStore, VersionError> {
        let size = base.size();
        let block_size = base.block_size();
        let mut map = MergedMap::default();
        let mut layers = Vec::with_capacity(layer_paths.len());
        for (idx, p) in layer_paths.iter().enumerate() {
            let (f, bs, sz, extents) = read_layer(p)?;
            if bs != block_size || sz != size {
                return Err(corrupt(p, "layer geometry differs from its base"));
            }
            for e in extents {
                let src = match e.data {
                    Some(off) => Source::Layer {
                        idx: idx as u32,
                        off,
                    },
                    None => Source::Zero,
                };
                map.set(e.start, e.end, src);
            }
            layers.push(f);
        }
        Ok(VersionStore {
            depth: layers.len() as u32,
            chain: Arc::new(Chain {
                base,
                base_file,
                layers,
                map,
                size,
                block_size,
            }),
            flat: None,
            label: String::new(),
            asked: AtomicBool::new(false),
        })
    }

    /// Runs in the merged map (what memory and lookups scale with).
    pub fn map_runs(&self) -> usize {
        self.chain.map.len()
    }

    /// Layers above the base.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// The flat copy's path, if this version can have one (a layer version opened through
    /// [`Images::open_in`]).
    pub fn flat_path(&self) -> Option<&Path> {
        self.flat.as_deref().map(|s| s.path.as_path())
    }

    /// Reads go to the flat copy now.
    pub fn is_flat(&self) -> bool {
        self.flat.as_ref().is_some_and(|s| s.ready().is_some())
    }

    /// Write the flat copy now, in the calling thread, and switch reads to it (for tests
    /// and tools; the server copies in the background, [`flat::FlatPolicy`]). `rate` in
    /// bytes a second, 0 = no limit.
    pub fn materialize_now(&self, rate: u64) -> Result<(), VersionError> {
        let Some(slot) = &self.flat else {
            return Err(VersionError::Invalid(
                "this version has no flat copy slot".into(),
            ));
        };
        if slot.ready().is_some() {
            return Ok(());
        }
        write_chain_flat(&self.chain, &slot.path, rate)?;
        slot.install(self.chain.block_size)
    }

    /// Start the background copy (whatever the policy's depth; at `rate`).
    pub fn materialize_in_background(&self, rate: u64) {
        let Some(slot) = &self.flat else { return };
        let chain = self.chain.clone();
        let path = slot.path.clone();
        flat::spawn(
            slot.clone(),
            self.label.clone(),
            move || write_chain_flat(&chain, &path, rate),
            self.chain.block_size,
        );
    }

    /// First read of this store: start the copy if the policy says this version is deep.
    fn maybe_materialize(&self) {
        if self.flat.is_none() || self.asked.load(Ordering::Relaxed) {
            return;
        }
        if self.asked.swap(true, Ordering::Relaxed) {
            return;
        }
        let p = flat::policy();
        if p.min_depth > 0 && self.depth >= p.min_depth {
            self.materialize_in_background(p.rate);
        }
    }

    /// Read from the merged map into `buf`.
    fn read_runs(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        let c = &*self.chain;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let (src, run_end) = c.map.run_at(pos, end);
            let a = (pos - offset) as usize;
            let b = (run_end - offset) as usize;
            let part = buf.get_mut(a..b).unwrap_or_default();
            match src {
                None => c.base.read_at(part, pos)?,
                Some(Source::Zero) => part.fill(0),
                Some(Source::Layer { idx, off }) => {
                    let f = c
                        .layers
                        .get(idx as usize)
                        .ok_or(StorageError::Unsupported("layer index"))?;
                    // Like the base (a FileStore): never waits for the disk inside
                    // `try_nonblocking`, so a cold layer read cannot stall the event loop.
                    super::file::read_file_at(f, part, off)?;
                }
            }
            pos = run_end;
        }
        Ok(())
    }
}

fn write_chain_flat(chain: &Chain, path: &Path, rate: u64) -> Result<u64, VersionError> {
    flat::write_flat(
        &flat::ChainFiles {
            base: chain.base.as_ref(),
            base_file: chain.base_file.as_ref(),
            layers: &chain.layers,
            map: &chain.map,
            size: chain.size,
        },
        path,
        rate,
    )
}

impl BlockStore for VersionStore {
    fn block_size(&self) -> u32 {
        self.chain.block_size
    }
    fn size(&self) -> u64 {
        self.chain.size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > self.chain.size) {
            return Err(StorageError::OutOfRange { offset, len });
        }
        // One source for the whole read: the flat copy once it is complete, else the chain
        // (both read the same bytes; a read never mixes them).
        if let Some(f) = self.flat.as_ref().and_then(|s| s.ready()) {
            return f.read_at(buf, offset);
        }
        self.maybe_materialize();
        self.read_runs(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64, _: bool) -> Result<(), StorageError> {
        Err(StorageError::ReadOnly)
    }
    fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), StorageError> {
        Err(StorageError::ReadOnly)
    }
    fn thin_provisioned(&self) -> bool {
        true
    }
    fn allocation(&self, offset: u64) -> Result<(bool, u64), StorageError> {
        let c = &*self.chain;
        if offset >= c.size {
            return Err(StorageError::OutOfRange { offset, len: 0 });
        }
        match c.map.run_at(offset, c.size) {
            (None, end) => {
                let (m, run) = c.base.allocation(offset)?;
                Ok((m, run.min(end - offset).max(1)))
            }
            (Some(Source::Zero), end) => Ok((false, end - offset)),
            (Some(Source::Layer { .. }), end) => Ok((true, end - offset)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The catalogue
// ---------------------------------------------------------------------------------------

/// What a version is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionKind {
    /// A flat image file.
    Base,
    /// A frozen overlay on its parent.
    Layer,
}

/// One immutable version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: u64,
    /// The version this one's layer sits on (None for a base made by import).
    pub parent: Option<u64>,
    pub message: String,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub author: String,
    /// Bytes of changed data (a layer) or allocated bytes (a base).
    pub change_bytes: u64,
    pub kind: VersionKind,
    /// File name inside the image directory.
    pub file: String,
    /// Random identity, fixed at creation (survives flatten): overlays record it.
    pub uid: String,
}

/// An image's catalogue: its versions, its head (what `latest` means) and its channels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageLog {
    pub name: String,
    pub block_size: u32,
    pub size: u64,
    /// The version `latest` resolves to (rollback moves it back).
    pub head: u64,
    /// The number the next version gets (numbers are never reused).
    pub next: u64,
    pub versions: Vec<VersionInfo>,
    #[serde(default)]
    pub channels: BTreeMap<String, u64>,
}

impl ImageLog {
    pub fn get(&self, version: u64) -> Result<&VersionInfo, VersionError> {
        self.versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| VersionError::NoVersion {
                image: self.name.clone(),
                version,
            })
    }

    /// The chain of `version`: its base first, `version` last.
    pub fn chain(&self, version: u64) -> Result<Vec<&VersionInfo>, VersionError> {
        let mut out = Vec::new();
        let mut v = self.get(version)?;
        loop {
            out.push(v);
            if v.kind == VersionKind::Base {
                break;
            }
            let p = v.parent.ok_or_else(|| {
                VersionError::Invalid(format!("layer {} has no parent", v.version))
            })?;
            if out.len() > self.versions.len() {
                return Err(VersionError::Invalid("version chain loops".into()));
            }
            v = self.get(p)?;
        }
        out.reverse();
        Ok(out)
    }

    /// Resolve what a binding names: `latest`, a version number or a channel.
    pub fn resolve(&self, sel: &Selector) -> Result<u64, VersionError> {
        match sel {
            Selector::Latest => Ok(self.head),
            Selector::Version(v) => self.get(*v).map(|v| v.version),
            Selector::Channel(c) => {
                self.channels
                    .get(c)
                    .copied()
                    .ok_or_else(|| VersionError::NoChannel {
                        image: self.name.clone(),
                        channel: c.clone(),
                    })
            }
        }
    }

    /// Versions kept by the catalogue itself: head, channels, and their chains.
    pub fn pinned(&self) -> BTreeSet<u64> {
        let mut roots = vec![self.head];
        roots.extend(self.channels.values().copied());
        roots.into_iter().collect()
    }

    /// Versions needed to read `roots` (each root and its chain).
    pub fn closure(&self, roots: &BTreeSet<u64>) -> BTreeSet<u64> {
        let mut keep = BTreeSet::new();
        for &r in roots {
            if let Ok(chain) = self.chain(r) {
                keep.extend(chain.iter().map(|v| v.version));
            }
        }
        keep
    }
}

/// What a binding names: `image` (latest), `image@N`, `image:channel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Latest,
    Version(u64),
    Channel(String),
}

/// Split `name`, `name@N` or `name:channel`.
pub fn parse_spec(spec: &str) -> Result<(String, Selector), VersionError> {
    let (name, sel) = if let Some((n, v)) = spec.split_once('@') {
        let v = v
            .parse::<u64>()
            .map_err(|_| VersionError::Invalid(format!("{spec:?}: version must be a number")))?;
        (n, Selector::Version(v))
    } else if let Some((n, c)) = spec.split_once(':') {
        if !valid_name(c) {
            return Err(VersionError::Invalid(format!("{spec:?}: bad channel name")));
        }
        (n, Selector::Channel(c.to_string()))
    } else {
        (spec, Selector::Latest)
    };
    if !valid_name(name) {
        return Err(VersionError::Invalid(format!("{spec:?}: bad image name")));
    }
    Ok((name.to_string(), sel))
}

/// Where catalogues live (the seam for a shared store such as etcd). `save` must be atomic:
/// a reader sees the old catalogue or the new one, never a mix.
pub trait CatalogueStore: Send + Sync {
    fn load(&self, image: &str) -> Result<Option<ImageLog>, VersionError>;
    fn save(&self, log: &ImageLog) -> Result<(), VersionError>;
    fn list(&self) -> Result<Vec<String>, VersionError>;
}

/// Catalogues as `ROOT/<name>/catalogue.json`.
pub struct DirCatalogue {
    root: PathBuf,
}

impl DirCatalogue {
    pub fn new(root: &Path) -> DirCatalogue {
        DirCatalogue {
            root: root.to_path_buf(),
        }
    }
}

/// Replace `path` atomically with `data` (tmp, fsync, rename, directory fsync).
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<(), VersionError> {
    let tmp = partial_path(path);
    let mut f = File::create(&tmp).map_err(|e| with_path(e, &tmp))?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    publish(&tmp, path)
}

impl CatalogueStore for DirCatalogue {
    fn load(&self, image: &str) -> Result<Option<ImageLog>, VersionError> {
        let p = self.root.join(image).join(CATALOGUE);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| corrupt(&p, e.to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(with_path(e, &p)),
        }
    }
    fn save(&self, log: &ImageLog) -> Result<(), VersionError> {
        let dir = self.root.join(&log.name);
        std::fs::create_dir_all(&dir).map_err(|e| with_path(e, &dir))?;
        let data = serde_json::to_vec_pretty(log)
            .map_err(|e| VersionError::Invalid(format!("catalogue: {e}")))?;
        atomic_write(&dir.join(CATALOGUE), &data)
    }
    fn list(&self) -> Result<Vec<String>, VersionError> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(with_path(e, &self.root)),
        };
        for e in rd.flatten() {
            if e.path().join(CATALOGUE).exists() {
                if let Some(n) = e.file_name().to_str() {
                    out.push(n.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------

/// An exclusive lock on one image's catalogue (read-modify-write by the server and the CLI).
pub struct ImageLock {
    _file: File,
}

/// A staged file's path, and the shared lock that keeps GC from removing it.
pub struct Staging {
    pub path: PathBuf,
    _lock: File,
}

const STAGING: &str = "staging";

/// `flock` the staging area's lock file (`LOCK_SH` blocking, or `LOCK_EX` non-blocking:
/// None when someone holds it).
fn staging_lock(dir: &Path, op: libc::c_int) -> Result<Option<File>, VersionError> {
    let p = dir.join("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| with_path(e, &p))?;
    let op = if op == libc::LOCK_EX {
        libc::LOCK_EX | libc::LOCK_NB
    } else {
        op
    };
    // SAFETY: a valid fd.
    if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(VersionError::Io(e));
    }
    Ok(Some(f))
}

/// The images of one state directory: `STATE_DIR/images`.
pub struct Images {
    root: PathBuf,
    cat: Box<dyn CatalogueStore>,
}

/// Who asked and when (passed in: pure operations take time as input).
#[derive(Debug, Clone)]
pub struct Stamp {
    pub message: String,
    pub author: String,
    pub time_ms: u64,
}

fn new_uid() -> String {
    use rand::Rng;
    let mut b = [0u8; 8];
    rand::thread_rng().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What [`Images::gc`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub removed_versions: Vec<u64>,
    pub removed_files: Vec<String>,
    pub kept: Vec<u64>,
}

impl Images {
    pub fn new(state_dir: &Path) -> Images {
        let root = state_dir.join("images");
        Images {
            cat: Box::new(DirCatalogue::new(&root)),
            root,
        }
    }

    /// With another catalogue store (files stay under `STATE_DIR/images`).
    pub fn with_catalogue(state_dir: &Path, cat: Box<dyn CatalogueStore>) -> Images {
        Images {
            root: state_dir.join("images"),
            cat,
        }
    }

    pub fn dir(&self, image: &str) -> PathBuf {
        self.root.join(image)
    }

    pub fn list(&self) -> Result<Vec<String>, VersionError> {
        self.cat.list()
    }

    pub fn exists(&self, image: &str) -> bool {
        matches!(self.cat.load(image), Ok(Some(_)))
    }

    pub fn log(&self, image: &str) -> Result<ImageLog, VersionError> {
        self.cat
            .load(image)?
            .ok_or_else(|| VersionError::NoImage(image.to_string()))
    }

    /// Lock one image for a read-modify-write of its catalogue (`flock`, blocking).
    pub fn lock(&self, image: &str) -> Result<ImageLock, VersionError> {
        if !valid_name(image) {
            return Err(VersionError::Invalid(format!("bad image name {image:?}")));
        }
        let dir = self.dir(image);
        std::fs::create_dir_all(&dir).map_err(|e| with_path(e, &dir))?;
        let p = dir.join(LOCK);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| with_path(e, &p))?;
        // SAFETY: a valid fd.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(VersionError::Io(io::Error::last_os_error()));
        }
        Ok(ImageLock { _file: f })
    }

    /// The identity an overlay on this version records (stable across flatten).
    pub fn version_id(log: &ImageLog, v: &VersionInfo) -> String {
        format!("image:{}@{}|{}|{}", log.name, v.version, v.uid, log.size)
    }

    /// Parse an overlay's recorded golden id back to (image, version).
    pub fn parse_version_id(id: &str) -> Option<(String, u64)> {
        let rest = id.strip_prefix("image:")?;
        let (nv, _) = rest.split_once('|')?;
        let (n, v) = nv.split_once('@')?;
        Some((n.to_string(), v.parse().ok()?))
    }

    /// Open one version for reading.
    pub fn open(&self, image: &str, version: u64) -> Result<VersionStore, VersionError> {
        let log = self.log(image)?;
        self.open_in(&log, version)
    }

    pub fn open_in(&self, log: &ImageLog, version: u64) -> Result<VersionStore, VersionError> {
        let chain = log.chain(version)?;
        let dir = self.dir(&log.name);
        let (base, layers) = chain
            .split_first()
            .ok_or_else(|| VersionError::Invalid("empty chain".into()))?;
        let base_path = dir.join(&base.file);
        let store: Arc<dyn BlockStore> =
            Arc::new(FileStore::open(&base_path, log.block_size, true)?);
        let base_file = File::open(&base_path).map_err(|e| with_path(e, &base_path))?;
        let layers: Vec<PathBuf> = layers.iter().map(|v| dir.join(&v.file)).collect();
        let mut vs = VersionStore::open_chain(store, Some(base_file), &layers)?;
        if vs.depth > 0 {
            let info = log.get(version)?;
            let path = self.flat_path(&log.name, version, &info.uid);
            vs.flat = Some(flat::slot(&path, log.size, log.block_size));
            vs.label = format!("{}@{version}", log.name);
        }
        Ok(vs)
    }

    /// Where the flat copy of `version` (identity `uid`) lives (docs/images.md).
    pub fn flat_path(&self, image: &str, version: u64, uid: &str) -> PathBuf {
        self.dir(image)
            .join(flat::FLAT_DIR)
            .join(flat::flat_name(version, uid))
    }

    /// Create image `name` with version 1 from a raw file, which is moved (renamed) into the
    /// image directory: the caller writes it to a temporary name on the same filesystem
    /// (`Images::staging_path`), e.g. with `qemu-img convert`.
    pub fn create_from_file(
        &self,
        name: &str,
        staged: &Path,
        block_size: u32,
        stamp: &Stamp,
    ) -> Result<ImageLog, VersionError> {
        let _lock = self.lock(name)?;
        if self.cat.load(name)?.is_some() {
            return Err(VersionError::ImageExists(name.to_string()));
        }
        let f = File::open(staged).map_err(|e| with_path(e, staged))?;
        f.sync_all()?;
        let meta = f.metadata()?;
        let size = meta.len();
        if size == 0 || size % u64::from(block_size) != 0 {
            return Err(VersionError::Invalid(format!(
                "{}: size {size} is not a positive multiple of the block size {block_size}",
                staged.display()
            )));
        }
        use std::os::unix::fs::MetadataExt;
        let allocated = meta.blocks() * 512;
        let file = "v1.base".to_string();
        publish(staged, &self.dir(name).join(&file))?;
        let log = ImageLog {
            name: name.to_string(),
            block_size,
            size,
            head: 1,
            next: 2,
            versions: vec![VersionInfo {
                version: 1,
                parent: None,
                message: stamp.message.clone(),
                time_ms: stamp.time_ms,
                author: stamp.author.clone(),
                change_bytes: allocated.min(size),
                kind: VersionKind::Base,
                file,
                uid: new_uid(),
            }],
            channels: BTreeMap::new(),
        };
        self.cat.save(&log)?;
        Ok(log)
    }

    /// Add a flat base version (an import into an existing image: no parent). The staged
    /// file must have the image's size.
    pub fn add_base(&self, name: &str, staged: &Path, stamp: &Stamp) -> Result<u64, VersionError> {
        let _lock = self.lock(name)?;
        let mut log = self.log(name)?;
        let f = File::open(staged).map_err(|e| with_path(e, staged))?;
        f.sync_all()?;
        let meta = f.metadata()?;
        if meta.len() != log.size {
            return Err(VersionError::Invalid(format!(
                "{}: {} bytes, image {name} has {} bytes",
                staged.display(),
                meta.len(),
                log.size
            )));
        }
        use std::os::unix::fs::MetadataExt;
        let version = log.next;
        let file = format!("v{version}.base");
        publish(staged, &self.dir(name).join(&file))?;
        log.versions.push(VersionInfo {
            version,
            parent: None,
            message: stamp.message.clone(),
            time_ms: stamp.time_ms,
            author: stamp.author.clone(),
            change_bytes: (meta.blocks() * 512).min(log.size),
            kind: VersionKind::Base,
            file,
            uid: new_uid(),
        });
        log.next = version + 1;
        log.head = version;
        self.cat.save(&log)?;
        Ok(version)
    }

    /// A temporary file name for an import or a first commit, in `<image>/staging/` (the
    /// same filesystem as the versions, so publishing it is a rename). The returned guard
    /// holds a shared lock on the staging area while the caller writes: GC empties the area
    /// (the remains of interrupted imports) only when no one holds it.
    pub fn staging_path(&self, name: &str) -> Result<Staging, VersionError> {
        if !valid_name(name) {
            return Err(VersionError::Invalid(format!("bad image name {name:?}")));
        }
        let dir = self.dir(name).join(STAGING);
        std::fs::create_dir_all(&dir).map_err(|e| with_path(e, &dir))?;
        let lock = staging_lock(&dir, libc::LOCK_SH)?
            .ok_or_else(|| VersionError::Invalid("staging lock".into()))?;
        Ok(Staging {
            path: dir.join(format!("import-{}.partial", new_uid())),
            _lock: lock,
        })
    }

    /// Add the next version as a layer on `parent`; `fill` writes the layer's extents. The
    /// layer file is complete and durable before the catalogue names it.
    pub fn commit_layer(
        &self,
        image: &str,
        parent: u64,
        stamp: &Stamp,
        fill: impl FnOnce(&mut LayerWriter) -> Result<(), VersionError>,
    ) -> Result<u64, VersionError> {
        let _lock = self.lock(image)?;
        let log = self.log(image)?;
        log.get(parent)?;
        let version = log.next;
        let file = format!("v{version}.layer");
        let mut w = LayerWriter::create(&self.dir(image).join(&file), log.block_size, log.size)?;
        fill(&mut w)?;
        let change = w.finish()?;
        // Reload under the lock (nothing else may have changed it, but be exact).
        let mut log = self.log(image)?;
        log.versions.push(VersionInfo {
            version,
            parent: Some(parent),
            message: stamp.message.clone(),
            time_ms: stamp.time_ms,
            author: stamp.author.clone(),
            change_bytes: change,
            kind: VersionKind::Layer,
            file,
            uid: new_uid(),
        });
        log.next = version + 1;
        log.head = version;
        self.cat.save(&log)?;
        Ok(version)
    }

    /// `latest` goes back to `version` (later versions stay until GC; a new commit gets
    /// the next unused number).
    pub fn rollback(&self, image: &str, version: u64) -> Result<ImageLog, VersionError> {
        let _lock = self.lock(image)?;
        let mut log = self.log(image)?;
        log.get(version)?;
        log.head = version;
        self.cat.save(&log)?;
        Ok(log)
    }

    /// Point `channel` at `version` (None: remove the channel).
    pub fn set_channel(
        &self,
        image: &str,
        channel: &str,
        version: Option<u64>,
    ) -> Result<ImageLog, VersionError> {
        if !valid_name(channel) || channel == "latest" {
            return Err(VersionError::Invalid(format!(
                "bad channel name {channel:?}"
            )));
        }
        let _lock = self.lock(image)?;
        let mut log = self.log(image)?;
        match version {
            Some(v) => {
                log.get(v)?;
                log.channels.insert(channel.to_string(), v);
            }
            None => {
                log.channels.remove(channel);
            }
        }
        self.cat.save(&log)?;
        Ok(log)
    }

    /// Rewrite `version` as a flat base file (same content, same number and uid), so its
    /// reads no longer go through a chain and its ancestors can be collected.
    pub fn flatten(&self, image: &str, version: u64) -> Result<ImageLog, VersionError> {
        let _lock = self.lock(image)?;
        let log = self.log(image)?;
        let v = log.get(version)?.clone();
        if v.kind == VersionKind::Base {
            return Ok(log);
        }
        let store = self.open_in(&log, version)?;
        let file = format!("v{version}.base");
        let path = self.dir(image).join(&file);
        let allocated = match store.flat_path().filter(|_| store.is_flat()) {
            // Its flat copy is complete and durable already: it becomes the base.
            Some(flat) => {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(flat).map_err(|e| with_path(e, flat))?;
                publish(flat, &path)?;
                (m.blocks() * 512).min(log.size)
            }
            None => {
                let partial = partial_path(&path);
                let allocated = export_raw(&store, &partial)?;
                publish(&partial, &path)?;
                allocated
            }
        };
        let mut log = self.log(image)?;
        if let Some(e) = log.versions.iter_mut().find(|x| x.version == version) {
            e.kind = VersionKind::Base;
            e.file = file;
            e.change_bytes = allocated;
        }
        self.cat.save(&log)?;
        // The old layer file is now an orphan: GC removes it (a running reader keeps its fd).
        Ok(log)
    }

    /// Delete versions nobody needs: everything outside the chains of the head, the
    /// channels and `in_use` (versions bindings pin, clients boot now, overlays sit on),
    /// then files the catalogue does not name (orphans of an interrupted commit). The
    /// catalogue is saved first, files are removed after: a crash leaves orphans, never a
    /// catalogue naming a missing file.
    pub fn gc(&self, image: &str, in_use: &BTreeSet<u64>) -> Result<GcReport, VersionError> {
        let _lock = self.lock(image)?;
        let mut log = self.log(image)?;
        let mut roots = log.pinned();
        roots.extend(in_use.iter().copied().filter(|v| log.get(*v).is_ok()));
        let keep = log.closure(&roots);
        let removed: Vec<u64> = log
            .versions
            .iter()
            .map(|v| v.version)
            .filter(|v| !keep.contains(v))
            .collect();
        if !removed.is_empty() {
            log.versions.retain(|v| keep.contains(&v.version));
            self.cat.save(&log)?;
        }
        let named: BTreeSet<&str> = log.versions.iter().map(|v| v.file.as_str()).collect();
        let mut files = Vec::new();
        let dir = self.dir(image);
        for e in std::fs::read_dir(&dir)
            .map_err(|e| with_path(e, &dir))?
            .flatten()
        {
            let Some(n) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let ours = n.ends_with(".layer") || n.ends_with(".base") || n.ends_with(".partial");
            if ours && !named.contains(n.as_str()) && !n.starts_with(CATALOGUE) {
                std::fs::remove_file(e.path()).map_err(|er| with_path(er, &e.path()))?;
                files.push(n);
            }
        }
        // Flat copies (derived data): those of versions gone or now flat themselves, and
        // the remains of copies a crash interrupted (a running copy holds its file).
        let flat_dir = dir.join(flat::FLAT_DIR);
        if flat_dir.is_dir() {
            for n in flat::sweep_partials(&flat_dir)? {
                files.push(format!("{}/{n}", flat::FLAT_DIR));
            }
            for e in std::fs::read_dir(&flat_dir)
                .map_err(|e| with_path(e, &flat_dir))?
                .flatten()
            {
                let Some(n) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let Some((v, uid)) = flat::parse_flat_name(&n) else {
                    continue;
                };
                let needed = log
                    .get(v)
                    .is_ok_and(|i| i.uid == uid && i.kind == VersionKind::Layer);
                if !needed {
                    std::fs::remove_file(e.path()).map_err(|er| with_path(er, &e.path()))?;
                    files.push(format!("{}/{n}", flat::FLAT_DIR));
                }
            }
            fsync_dir(&flat_dir)?;
        }
        // The staging area, when no import or first commit is writing into it.
        let staging = dir.join(STAGING);
        if staging.is_dir() {
            if let Some(_held) = staging_lock(&staging, libc::LOCK_EX)? {
                for e in std::fs::read_dir(&staging)
                    .map_err(|e| with_path(e, &staging))?
                    .flatten()
                {
                    let n = e.file_name().to_string_lossy().to_string();
                    if n.ends_with(".partial") {
                        std::fs::remove_file(e.path()).map_err(|er| with_path(er, &e.path()))?;
                        files.push(format!("{STAGING}/{n}"));
                    }
                }
            }
        }
        if !files.is_empty() {
            fsync_dir(&dir)?;
        }
        Ok(GcReport {
            removed_versions: removed,
            removed_files: files,
            kept: keep.into_iter().collect(),
        })
    }
}

/// Write a version to a new sparse raw file (holes where it reads zeroes); returns the bytes
/// written. fsynced, not renamed.
pub fn export_raw(store: &dyn BlockStore, path: &Path) -> Result<u64, VersionError> {
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| with_path(e, path))?;
    let written = super::copy_sparse(store, &out)?;
    out.sync_all()?;
    Ok(written)
}

#[cfg(test)]
mod tests;
