//! Raw image file backend: positional I/O (pread/pwrite), fdatasync, fallocate punch hole,
//! SEEK_DATA/SEEK_HOLE. One `File` is shared by every thread: positional calls never touch the
//! file offset, so no lock is needed (the `lseek` in `allocation` moves the offset, which no
//! other call uses).
use super::{BlockStore, FileSlice, StorageError};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Largest chunk of zeroes written at once when hole punching is not available.
const ZERO_CHUNK: usize = 1 << 20;

/// A raw image file (or block device) served as a block device.
pub struct FileStore {
    /// Shared with the [`FileSlice`]s that Data-In is sent from.
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    block_size: u32,
    read_only: bool,
    thin: bool,
    /// Cleared after the file system first refuses FALLOC_FL_PUNCH_HOLE, so later discards go
    /// straight to writing zeroes.
    punch_hole: AtomicBool,
}

fn invalid(msg: String) -> StorageError {
    StorageError::Io(io::Error::new(io::ErrorKind::InvalidInput, msg))
}

impl FileStore {
    /// Open an existing image. Its size must be a non-zero whole number of `block_size`
    /// blocks (512 or 4096). Thin provisioning defaults to on (see [`FileStore::with_thin`]).
    pub fn open(path: &Path, block_size: u32, read_only: bool) -> Result<Self, StorageError> {
        if block_size != 512 && block_size != 4096 {
            return Err(invalid(format!(
                "{}: block size {block_size} is not 512 or 4096",
                path.display()
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| {
                StorageError::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
            })?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(invalid(format!("{}: is a directory", path.display())));
        }
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size = (&file).seek(SeekFrom::End(0))?;
        if size == 0 {
            return Err(invalid(format!("{}: image is empty", path.display())));
        }
        if size % u64::from(block_size) != 0 {
            return Err(invalid(format!(
                "{}: size {size} bytes is not a whole number of {block_size}-byte blocks",
                path.display()
            )));
        }
        if !read_only {
            small_folios(&file);
        }
        Ok(FileStore {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size,
            block_size,
            read_only,
            thin: true,
            punch_hole: AtomicBool::new(true),
        })
    }

    /// Whether discards free space (SBC-3 thin provisioning). With `false`, `discard`
    /// writes zeroes and the LU should not advertise UNMAP.
    pub fn with_thin(mut self, thin: bool) -> Self {
        self.thin = thin;
        self
    }

    /// Create a sparse image of `size` bytes. Refuses to overwrite an existing file; `size`
    /// must be a non-zero multiple of 512.
    pub fn create(path: &Path, size: u64) -> Result<(), StorageError> {
        if size == 0 || size % 512 != 0 {
            return Err(invalid(format!(
                "{}: image size {size} is not a non-zero multiple of 512 bytes",
                path.display()
            )));
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                StorageError::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
            })?;
        // set_len extends without allocating: the image is all holes until written.
        file.set_len(size)?;
        file.sync_all()?;
        Ok(())
    }

    /// The image path as opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(StorageError::OutOfRange { offset, len }),
        }
    }

    fn write_zeroes(&self, mut offset: u64, len: u64) -> Result<(), StorageError> {
        let chunk = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(chunk.len() as u64) as usize;
            self.file
                .write_all_at(chunk.get(..n).unwrap_or(&chunk), offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// `lseek(fd, offset, whence)`; Ok(None) for ENXIO (no data/hole at or after `offset`).
    fn seek_data_hole(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }
}

/// Keep the page cache that our own reads fill for a file we write into in 4 KiB folios.
///
/// A buffered write of 4 KiB into a large page-cache folio costs the kernel time in proportion
/// to the folio, not the write: ext4 (`ext4_block_write_begin`, `block_commit_write`) walks
/// every buffer head of the folio. Readahead fills the cache with folios up to 2 MiB
/// (read_ahead_kb 8192 on a virtio disk): measured on kernel 6.18, a random 4 KiB `pwrite`
/// into a 1 GiB image cached that way cost 62-68 µs of CPU, into the same image cached in
/// 4 KiB folios 3 µs (docs/performance.md, "Where a plain write's time went").
/// `POSIX_FADV_RANDOM` turns readahead off for this open file: a read that misses the cache
/// reads exactly the range asked for, into order-0 folios. Folios other readers made (a
/// `cat`, a `cp`) stay as they are until evicted. Advice only: a refusal changes nothing.
pub(crate) fn small_folios(file: &File) {
    // SAFETY: posix_fadvise on a file descriptor we own; no memory is passed.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    if r != 0 {
        tracing::debug!(error = r, "posix_fadvise(POSIX_FADV_RANDOM) refused");
    }
}

impl FileStore {
    /// A read that never waits for the disk: [`read_file_nowait`].
    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        read_file_nowait(&self.file, buf, offset)
    }
}

/// Whether `cachestat(2)` (Linux 6.5+) works here; cleared at its first failure, after
/// which no [`FileSlice`] is offered (reads are copied, as before).
static CACHESTAT: AtomicBool = AtomicBool::new(true);

/// Whether every page of `len` bytes at `offset` of `file` is in the page cache now:
/// `cachestat(2)` counts them without touching the data. Sending uncached pages with
/// `sendfile` would make the event loop wait for the disk.
fn all_cached(file: &File, offset: u64, len: u64) -> bool {
    /// `__NR_cachestat`: the same number on every architecture (new syscalls share one table).
    const SYS_CACHESTAT: libc::c_long = 451;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    if len == 0 || !CACHESTAT.load(Ordering::Relaxed) {
        return false;
    }
    let range = Range { off: offset, len };
    let mut st = Stat::default();
    // SAFETY: cachestat reads `range` and writes `st`, both live and of the kernel's layout
    // (include/uapi/linux/mman.h); the fd is open for the call.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut Stat,
            0u32,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if matches!(
            e.raw_os_error(),
            Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
        ) {
            CACHESTAT.store(false, Ordering::Relaxed);
        }
        return false;
    }
    // nr_cache counts pages (PAGE_SIZE); the range may start and end inside a page.
    // SAFETY: sysconf has no memory arguments.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let first = offset / page;
    let last = (offset + len).div_ceil(page);
    st.nr_cache >= last - first
}

/// `read_exact_at` of `file` that honours [`super::try_nonblocking`]: inside it, the read
/// never waits for the disk ([`read_file_nowait`]). For files read directly rather than
/// through a [`FileStore`] (the layers of an image version).
pub(crate) fn read_file_at(file: &File, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
    if super::nowait() {
        return read_file_nowait(file, buf, offset);
    }
    file.read_exact_at(buf, offset)?;
    Ok(())
}

/// A read that never waits for the disk (RWF_NOWAIT, Linux 4.14+): EAGAIN means the data
/// is not in the page cache; the caller retries on a thread that may block.
pub(crate) fn read_file_nowait(
    file: &File,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), StorageError> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        let off =
            libc::off_t::try_from(offset + done as u64).map_err(|_| StorageError::OutOfRange {
                offset,
                len: buf.len() as u64,
            })?;
        // SAFETY: one iovec over a live, exclusively borrowed buffer of iov_len bytes.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN)
                | Some(libc::EOPNOTSUPP)
                | Some(libc::ENOSYS)
                | Some(libc::EINVAL) => {
                    super::note_would_block();
                    return Err(StorageError::Io(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        e,
                    )));
                }
                Some(libc::EINTR) => continue,
                _ => return Err(e.into()),
            }
        }
        if n == 0 {
            return Err(StorageError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        done += n as usize;
    }
    Ok(())
}

impl BlockStore for FileStore {
    fn file_slice(&self, offset: u64, len: u64) -> Option<FileSlice> {
        self.check(offset, len).ok()?;
        if !all_cached(&self.file, offset, len) {
            return None;
        }
        Some(FileSlice {
            file: self.file.clone(),
            offset,
            len: usize::try_from(len).ok()?,
        })
    }

    fn space(&self) -> Option<super::Space> {
        use std::os::unix::fs::MetadataExt;
        let used = self.file.metadata().ok()?.blocks().saturating_mul(512);
        let available = super::fs_available(&self.file)?;
        Some(super::Space { available, used })
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        self.check(offset, buf.len() as u64)?;
        if super::nowait() {
            return self.read_nowait(buf, offset);
        }
        self.file.read_exact_at(buf, offset)?;
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), StorageError> {
        if self.read_only {
            return Err(StorageError::ReadOnly);
        }
        self.check(offset, data.len() as u64)?;
        self.file.write_all_at(data, offset)?;
        if fua {
            // FUA (SBC-3 WRITE(10)/(16) FUA bit): durable before status is returned.
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()?;
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        if self.read_only {
            return Err(StorageError::ReadOnly);
        }
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.thin && self.punch_hole.load(Ordering::Relaxed) {
            match (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
                (Ok(off), Ok(l)) => {
                    // SAFETY: fallocate on a file descriptor we own; no memory is passed.
                    let r = unsafe {
                        libc::fallocate(
                            self.file.as_raw_fd(),
                            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                            off,
                            l,
                        )
                    };
                    if r == 0 {
                        return Ok(());
                    }
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        // Not supported here (tmpfs of old kernels, block devices, NFS...):
                        // remember, and fall back to zeroes so the range still reads as zero.
                        Some(libc::EOPNOTSUPP)
                        | Some(libc::ENOSYS)
                        | Some(libc::EINVAL)
                        | Some(libc::ENODEV) => {
                            self.punch_hole.store(false, Ordering::Relaxed);
                        }
                        _ => return Err(e.into()),
                    }
                }
                _ => return Err(StorageError::OutOfRange { offset, len }),
            }
        }
        self.write_zeroes(offset, len)
    }

    fn thin_provisioned(&self) -> bool {
        self.thin
    }

    fn allocation(&self, offset: u64) -> Result<(bool, u64), StorageError> {
        self.check(offset, 1)?;
        let bs = u64::from(self.block_size);
        let offset = offset - offset % bs;
        let left = self.size - offset;
        let clamp = |run: u64| run.clamp(bs, left);
        // A block that holds any data is mapped; a run of holes counts only whole blocks.
        let data = match self.seek_data_hole(offset, libc::SEEK_DATA) {
            Ok(d) => d,
            // No SEEK_DATA support: report everything mapped, which is never wrong.
            Err(_) => return Ok((true, left)),
        };
        let data_start = match data {
            None => return Ok((false, left)),
            Some(d) if d >= offset + bs => {
                let hole_end = d - d % bs;
                return Ok((false, clamp(hole_end - offset)));
            }
            Some(d) => d,
        };
        let hole = match self.seek_data_hole(data_start, libc::SEEK_HOLE) {
            Ok(Some(h)) => h,
            Ok(None) | Err(_) => return Ok((true, left)),
        };
        let mapped_end = hole.div_ceil(bs) * bs;
        Ok((true, clamp(mapped_end.saturating_sub(offset))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn image(dir: &tempfile::TempDir, name: &str, size: u64) -> PathBuf {
        let p = dir.path().join(name);
        FileStore::create(&p, size).unwrap();
        p
    }

    #[test]
    fn create_refuses_overwrite_and_bad_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(&dir, "a.img", 1 << 20);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        assert!(FileStore::create(&p, 1 << 20).is_err());
        assert!(FileStore::create(&dir.path().join("b.img"), 1000).is_err());
        assert!(FileStore::create(&dir.path().join("c.img"), 0).is_err());
    }

    #[test]
    fn open_checks_size_and_block_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("odd.img");
        std::fs::write(&p, vec![0u8; 1000]).unwrap();
        let e = FileStore::open(&p, 512, false).err().unwrap().to_string();
        assert!(e.contains("not a whole number"), "{e}");
        let p = image(&dir, "k.img", 2048);
        assert!(FileStore::open(&p, 4096, false).is_err());
        assert!(FileStore::open(&p, 1024, false).is_err());
        let s = FileStore::open(&p, 512, false).unwrap();
        assert_eq!(s.size(), 2048);
        assert!(s.thin_provisioned());
        assert!(!s.with_thin(false).thin_provisioned());
        assert!(FileStore::open(&dir.path().join("missing.img"), 512, false).is_err());
        std::fs::write(dir.path().join("empty.img"), b"").unwrap();
        assert!(FileStore::open(&dir.path().join("empty.img"), 512, false).is_err());
    }

    #[test]
    fn read_write_bounds_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(&dir, "rw.img", 8 * 512);
        let s = FileStore::open(&p, 512, false).unwrap();
        s.write_at(&[9u8; 1024], 512, false).unwrap();
        s.write_at(&[8u8; 512], 7 * 512, true).unwrap();
        let mut b = [0u8; 512];
        s.read_at(&mut b, 1024).unwrap();
        assert_eq!(b, [9u8; 512]);
        assert!(matches!(
            s.read_at(&mut b, 8 * 512),
            Err(StorageError::OutOfRange { .. })
        ));
        assert!(matches!(
            s.write_at(&b, u64::MAX - 10, false),
            Err(StorageError::OutOfRange { .. })
        ));
        s.flush().unwrap();
        drop(s);
        let ro = FileStore::open(&p, 512, true).unwrap();
        assert!(ro.read_only());
        assert!(matches!(
            ro.write_at(&b, 0, false),
            Err(StorageError::ReadOnly)
        ));
        assert!(matches!(ro.discard(0, 512), Err(StorageError::ReadOnly)));
        ro.read_at(&mut b, 7 * 512).unwrap();
        assert_eq!(b, [8u8; 512]);
        ro.flush().unwrap();
    }

    #[test]
    fn discard_zeroes_and_allocation_tracks_holes() {
        let dir = tempfile::tempdir().unwrap();
        let mb = 1u64 << 20;
        let p = image(&dir, "thin.img", 4 * mb);
        let s = FileStore::open(&p, 4096, false).unwrap();
        // Fresh sparse image: one hole to the end (if the fs supports SEEK_HOLE at all).
        let (mapped, run) = s.allocation(0).unwrap();
        if mapped {
            // File system without hole reporting: everything mapped to the end.
            assert_eq!(run, 4 * mb);
        } else {
            assert_eq!(run, 4 * mb);
            s.write_at(&vec![1u8; mb as usize], mb, false).unwrap();
            assert_eq!(s.allocation(0).unwrap(), (false, mb));
            let (m, r) = s.allocation(mb).unwrap();
            assert!(m);
            assert!(r >= mb && r <= 3 * mb, "{r}");
            // Clamped at the end of the device, at least one block.
            let (_, r) = s.allocation(4 * mb - 4096).unwrap();
            assert_eq!(r, 4096);
        }
        s.write_at(&vec![5u8; mb as usize], 2 * mb, false).unwrap();
        s.discard(2 * mb, mb).unwrap();
        let mut b = vec![1u8; mb as usize];
        s.read_at(&mut b, 2 * mb).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert!(s.discard(4 * mb, 4096).is_err());
        assert!(s.allocation(4 * mb).is_err());
    }

    #[test]
    fn non_thin_discard_writes_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(&dir, "thick.img", 64 * 1024);
        let s = FileStore::open(&p, 512, false).unwrap().with_thin(false);
        s.write_at(&[3u8; 4096], 0, false).unwrap();
        s.discard(512, 1024).unwrap();
        let mut b = [0u8; 4096];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[..512], &[3u8; 512][..]);
        assert!(b[512..1536].iter().all(|&x| x == 0));
        assert_eq!(&b[1536..], &[3u8; 2560][..]);
    }

    #[test]
    fn many_threads_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(&dir, "mt.img", 64 * 4096);
        let s = Arc::new(FileStore::open(&p, 4096, false).unwrap());
        let handles: Vec<_> = (0..8u8)
            .map(|t| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for i in 0..8u64 {
                        let blk = u64::from(t) * 8 + i;
                        s.write_at(&[t + 1; 4096], blk * 4096, false).unwrap();
                        let mut b = [0u8; 4096];
                        s.read_at(&mut b, blk * 4096).unwrap();
                        assert!(b.iter().all(|&x| x == t + 1));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
}
