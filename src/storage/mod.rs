//! Storage: the one block-storage seam (the crucible shape) with a raw-file backend and an
//! in-memory backend. Issue 3 puts a per-client copy-on-write overlay behind the same trait.
//! Offsets and lengths are in bytes; callers (the SCSI layer) keep them block-aligned.

mod file;
mod memory;
mod overlay;
#[cfg(feature = "rbd")]
pub mod rbd;
pub mod readahead;
pub mod s3;
pub mod versions;

pub use file::FileStore;
pub use memory::MemStore;
pub use overlay::{
    CheckReport, ChunkState, ExtentMap, Overlay, OverlayError, OverlayOptions, OverlayStats,
};

/// Typed storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("access beyond the end of the device (offset {offset}, length {len})")]
    OutOfRange { offset: u64, len: u64 },
    #[error("device is read-only")]
    ReadOnly,
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
}

thread_local! {
    /// Set while [`try_nonblocking`] runs on this thread.
    static NOWAIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set when a read under [`try_nonblocking`] would have waited for the disk.
    static WOULD_BLOCK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` (idempotent reads only) asking file reads not to wait for the disk
/// (`preadv2(RWF_NOWAIT)`: served from the page cache or not at all). Returns None if any
/// read would have blocked: the caller then runs `f` again on a thread that may block. This
/// lets hot reads (a golden image every client boots from) run on the event loop without a
/// thread hop, while cold ones never stall it.
pub fn try_nonblocking<R>(f: impl FnOnce() -> R) -> Option<R> {
    NOWAIT.with(|n| n.set(true));
    WOULD_BLOCK.with(|w| w.set(false));
    let r = f();
    NOWAIT.with(|n| n.set(false));
    if WOULD_BLOCK.with(|w| w.replace(false)) {
        None
    } else {
        Some(r)
    }
}

/// Whether reads on this thread must not block (inside [`try_nonblocking`]).
pub(crate) fn nowait() -> bool {
    NOWAIT.with(|n| n.get())
}

/// Record that a read could not be served without blocking.
pub(crate) fn note_would_block() {
    WOULD_BLOCK.with(|w| w.set(true));
}

/// Space of the storage under a store, in bytes: what a thin LU reports in LOG SENSE page
/// 0x0C (logical block provisioning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Bytes the store may still allocate (free space of its filesystem).
    pub available: u64,
    /// Bytes the store has allocated.
    pub used: u64,
}

/// A block device. Must be safe to call from many threads at once (positional I/O).
pub trait BlockStore: Send + Sync + 'static {
    /// Logical block size in bytes (512 or 4096).
    fn block_size(&self) -> u32;
    /// Size in bytes (a multiple of `block_size`).
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Fill `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError>;
    /// Write `data` at `offset`. Not durable until `flush` unless `fua`.
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), StorageError>;
    /// Several writes, none FUA, with the effect of `write_at` on each in turn: what a
    /// connection received in one go. The default does exactly that; a store whose new data
    /// lands side by side (the overlay's data file) writes them with one system call. On an
    /// error some of them may have been written (as after `write_at` errors on one of them).
    fn write_many(&self, writes: &[(u64, &[u8])]) -> Result<(), StorageError> {
        for &(offset, data) in writes {
            self.write_at(data, offset, false)?;
        }
        Ok(())
    }
    /// Make every acknowledged write durable (SYNCHRONIZE CACHE).
    fn flush(&self) -> Result<(), StorageError>;
    /// Deallocate the range; afterwards it reads as zeroes (UNMAP, WRITE SAME with UNMAP).
    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError>;
    /// Whether `discard` really frees space (thin provisioning, SBC-3 §4.7).
    fn thin_provisioned(&self) -> bool;
    /// Allocation status at `offset`: (mapped, length in bytes of the run with that status,
    /// at least one block, clamped to the end of the device). For GET LBA STATUS.
    fn allocation(&self, offset: u64) -> Result<(bool, u64), StorageError>;
    /// Available and used space, where the backend can tell (None: it cannot).
    fn space(&self) -> Option<Space> {
        None
    }
    /// Drop everything written over a base image, so the device reads as that image again
    /// (SANITIZE on a client disk: the client's data is its overlay, the golden image is
    /// not the client's). Ok(false): the store has no base image and nothing was done.
    fn discard_changes(&self) -> Result<bool, StorageError> {
        Ok(false)
    }
    /// Whether this node lost the right to write the store: a shared disk (RBD) whose lock
    /// another node broke (fenced). Such a store is reopened at the client's next login.
    fn fenced(&self) -> bool {
        false
    }
    /// Where `len` bytes at `offset` lie in one open file whose pages are all in the page
    /// cache now, so the transport can send them with `sendfile(2)` instead of reading them
    /// into memory first. None (the default): read them with `read_at`.
    fn file_slice(&self, _offset: u64, _len: u64) -> Option<FileSlice> {
        None
    }
    /// A read-only view of the store as of now, where the backend can take one while the
    /// store stays in use (an RBD snapshot, removed when the view is dropped): what a commit
    /// of a running client's disk copies. None: the backend has no such view.
    fn snapshot(&self) -> Result<Option<Box<dyn BlockStore>>, StorageError> {
        Ok(None)
    }
}

/// Write a NEW file at `path` (refused if one exists) with `fill`: written to
/// `PATH.partial`, fsync'ed, then linked into place (so a crash never leaves a half-written
/// file under the final name) and the directory fsync'ed.
pub fn write_new_file(
    path: &std::path::Path,
    fill: impl FnOnce(&std::fs::File) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    use std::io::ErrorKind;
    let exists = || -> StorageError {
        std::io::Error::new(
            ErrorKind::AlreadyExists,
            format!("{} exists already", path.display()),
        )
        .into()
    };
    if path.exists() {
        return Err(exists());
    }
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", partial.display())))?;
    let res =
        fill(&out)
            .and_then(|()| Ok(out.sync_all()?))
            .and_then(|()| match std::fs::hard_link(&partial, path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(exists()),
                Err(e) => {
                    Err(std::io::Error::new(e.kind(), format!("{}: {e}", path.display())).into())
                }
            });
    let _ = std::fs::remove_file(&partial);
    res?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Copy every byte of `store` into the new sparse file `path` ([`write_new_file`]).
pub fn copy_to_new_file(
    store: &dyn BlockStore,
    path: &std::path::Path,
) -> Result<(), StorageError> {
    write_new_file(path, |out| copy_sparse(store, out).map(drop))
}

/// Copy every byte of `store` into `out` (set to its size first), leaving all-zero 4 KiB
/// pieces as holes; returns the bytes written.
pub fn copy_sparse(store: &dyn BlockStore, out: &std::fs::File) -> Result<u64, StorageError> {
    use std::os::unix::fs::FileExt;
    let size = store.size();
    out.set_len(size)?;
    let mut buf = vec![0u8; 4 << 20];
    let (mut pos, mut written) = (0u64, 0u64);
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        let b = buf.get_mut(..n).unwrap_or_default();
        store.read_at(b, pos)?;
        let mut off = 0u64;
        for piece in b.chunks(4096) {
            if piece.iter().any(|&x| x != 0) {
                out.write_all_at(piece, pos + off)?;
                written += piece.len() as u64;
            }
            off += piece.len() as u64;
        }
        pos += n as u64;
    }
    Ok(written)
}

/// A byte range of an open file that a Data-In may be sent from directly (`sendfile(2)`):
/// see [`BlockStore::file_slice`]. The pages are read when the transport sends them, so a
/// write that lands between the READ and its Data-In shows in the data: the same as a
/// read and a write of the same blocks in flight together (SAM-5 §8.6: SIMPLE tasks have
/// no order).
#[derive(Debug, Clone)]
pub struct FileSlice {
    pub file: std::sync::Arc<std::fs::File>,
    pub offset: u64,
    pub len: usize,
}

impl FileSlice {
    /// The part `from..to` of this slice (bounds clamped to it).
    pub fn slice(&self, from: usize, to: usize) -> FileSlice {
        let to = to.min(self.len);
        let from = from.min(to);
        FileSlice {
            file: self.file.clone(),
            offset: self.offset + from as u64,
            len: to - from,
        }
    }

    /// Read the slice into memory (where the transport cannot send from the file).
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut v = vec![0u8; self.len];
        self.file.read_exact_at(&mut v, self.offset)?;
        Ok(v)
    }
}

impl PartialEq for FileSlice {
    fn eq(&self, o: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.file, &o.file) && self.offset == o.offset && self.len == o.len
    }
}
impl Eq for FileSlice {}

thread_local! {
    /// Set while [`with_file_slices`] runs on this thread.
    static SLICES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` telling the SCSI layer that this transport can send READ data straight from a
/// file (no data digest to compute over it): large reads may then return a [`FileSlice`].
pub fn with_file_slices<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let was = SLICES.with(|s| s.replace(on));
    let r = f();
    SLICES.with(|s| s.set(was));
    r
}

/// Whether the caller of this command can take a [`FileSlice`] (inside [`with_file_slices`]).
pub fn file_slices_wanted() -> bool {
    SLICES.with(|s| s.get())
}

/// Why a shared client disk (Ceph RBD) cannot be served by this node.
#[derive(Debug, thiserror::Error)]
pub enum SharedDiskError {
    /// Another node took the disk's lock again while this one was fencing.
    #[error("client disk {disk} is held by another node ({holder}): {why}")]
    Held {
        disk: String,
        holder: String,
        why: String,
    },
    /// This node may not take the disk: it cannot confirm it owns the client.
    #[error("client disk {disk} not opened: {why}")]
    NotOwner { disk: String, why: String },
    /// The store could not be reached or refused the operation.
    #[error("client disk {disk}: {reason}")]
    Failed { disk: String, reason: String },
}

/// Asked before a shared disk is opened and locked (and its previous holder fenced): Ok
/// only if this node owns the client now (in a cluster: its ownership key in etcd, under a
/// live lease).
pub type LockGuard<'a> = &'a (dyn Fn() -> Result<(), String> + Sync);

/// Persistent (and install) client disks kept outside the node, so that any node can serve
/// them (Ceph RBD, `storage::rbd::RbdClientDisks`). The opened disk is held by this node
/// alone (an exclusive lock); a previous holder is fenced first.
pub trait SharedDisks: Send + Sync + 'static {
    /// Whether the persistent and install disks of image `image` live here.
    fn holds(&self, image: &str) -> bool;
    /// The disk on `lun` of `initiator` (of boot target `target`) on `image`, `size` bytes in
    /// blocks of `block_size`, created on first use, locked for this node, once `may_lock`
    /// said this node owns the client. One disk per (target, initiator, LUN).
    /// Returns the disk and whether it was created now.
    #[allow(clippy::too_many_arguments)]
    fn open(
        &self,
        target: &str,
        initiator: &str,
        lun: u16,
        image: &str,
        size: u64,
        block_size: u32,
        may_lock: LockGuard<'_>,
    ) -> Result<(std::sync::Arc<dyn BlockStore>, bool), SharedDiskError>;
    /// Remove `initiator`'s disk on `lun` (an operator's reset, applied at the client's next
    /// attach), so that the next [`SharedDisks::open`] creates it again from `image`. Only
    /// once `may_lock` said this node owns the client; a holder of the disk's lock (a node
    /// that served the client before, or a handle of this node's still open) is fenced
    /// first. Returns whether a disk was removed (none: nothing to do). On error the disk
    /// is left as it was.
    fn recreate(
        &self,
        target: &str,
        initiator: &str,
        lun: u16,
        image: &str,
        may_lock: LockGuard<'_>,
    ) -> Result<bool, SharedDiskError>;
    /// The name of `initiator`'s disk on `lun` in the store (for the cluster's client records).
    fn disk_name(&self, _target: &str, _initiator: &str, _lun: u16) -> Option<String> {
        None
    }
}

/// Bytes an unprivileged writer may still allocate on the filesystem holding `file`
/// (fstatvfs: f_bavail × f_frsize); None when the filesystem cannot tell.
pub(crate) fn fs_available(file: &std::fs::File) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: fstatvfs writes into the zeroed struct we own; the fd is open for the call.
    let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::fstatvfs(file.as_raw_fd(), &mut vfs) };
    (r == 0).then(|| vfs.f_bavail.saturating_mul(vfs.f_frsize))
}
