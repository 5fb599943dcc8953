//! Storage: the one block-storage seam (the crucible shape) with a raw-file backend and an
//! in-memory backend. Issue 3 puts a per-client copy-on-write overlay behind the same trait.
//! Offsets and lengths are in bytes; callers (the SCSI layer) keep them block-aligned.

mod file;
mod memory;
mod overlay;

pub use file::FileStore;
pub use memory::MemStore;
pub use overlay::{CheckReport, ChunkState, Overlay, OverlayError, OverlayOptions, OverlayStats};

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
    /// Make every acknowledged write durable (SYNCHRONIZE CACHE).
    fn flush(&self) -> Result<(), StorageError>;
    /// Deallocate the range; afterwards it reads as zeroes (UNMAP, WRITE SAME with UNMAP).
    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError>;
    /// Whether `discard` really frees space (thin provisioning, SBC-3 §4.7).
    fn thin_provisioned(&self) -> bool;
    /// Allocation status at `offset`: (mapped, length in bytes of the run with that status,
    /// at least one block, clamped to the end of the device). For GET LBA STATUS.
    fn allocation(&self, offset: u64) -> Result<(bool, u64), StorageError>;
}
