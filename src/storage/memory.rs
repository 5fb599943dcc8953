//! In-memory backend: for tests and for scratch LUNs.
use super::{BlockStore, StorageError};
use std::sync::RwLock;

/// A block store held in memory. Tracks which blocks were written so that GET LBA STATUS
/// and UNMAP behave as on a thin-provisioned file.
pub struct MemStore {
    block_size: u32,
    read_only: bool,
    inner: RwLock<Inner>,
}

struct Inner {
    data: Vec<u8>,
    mapped: Vec<bool>,
}

impl MemStore {
    pub fn new(size: u64, block_size: u32, read_only: bool) -> Self {
        let blocks = size / block_size as u64;
        MemStore {
            block_size,
            read_only,
            inner: RwLock::new(Inner {
                data: vec![0; (blocks * block_size as u64) as usize],
                mapped: vec![false; blocks as usize],
            }),
        }
    }

    /// A store with the given contents (length rounded down to whole blocks).
    pub fn with_data(mut data: Vec<u8>, block_size: u32, read_only: bool) -> Self {
        let blocks = data.len() / block_size as usize;
        data.truncate(blocks * block_size as usize);
        MemStore {
            block_size,
            read_only,
            inner: RwLock::new(Inner {
                data,
                mapped: vec![true; blocks],
            }),
        }
    }

    /// A copy of the whole contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.inner
            .read()
            .map(|i| i.data.clone())
            .unwrap_or_default()
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(StorageError::OutOfRange { offset, len }),
        }
    }

    fn lock_err() -> StorageError {
        StorageError::Io(std::io::Error::other("memory store lock poisoned"))
    }
}

impl BlockStore for MemStore {
    /// A read-only copy of the contents as of now (tests stand it in for an RBD snapshot).
    fn snapshot(&self) -> Result<Option<Box<dyn BlockStore>>, StorageError> {
        let i = self.inner.read().map_err(|_| Self::lock_err())?;
        Ok(Some(Box::new(MemStore {
            block_size: self.block_size,
            read_only: true,
            inner: RwLock::new(Inner {
                data: i.data.clone(),
                mapped: i.mapped.clone(),
            }),
        })))
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn size(&self) -> u64 {
        self.inner.read().map(|i| i.data.len() as u64).unwrap_or(0)
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        self.check(offset, buf.len() as u64)?;
        let inner = self.inner.read().map_err(|_| Self::lock_err())?;
        let start = offset as usize;
        buf.copy_from_slice(&inner.data[start..start + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), StorageError> {
        if self.read_only {
            return Err(StorageError::ReadOnly);
        }
        self.check(offset, data.len() as u64)?;
        let mut inner = self.inner.write().map_err(|_| Self::lock_err())?;
        let start = offset as usize;
        inner.data[start..start + data.len()].copy_from_slice(data);
        let bs = self.block_size as u64;
        let first = offset / bs;
        let last = (offset + data.len() as u64).div_ceil(bs);
        for b in first..last {
            inner.mapped[b as usize] = true;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        if self.read_only {
            return Err(StorageError::ReadOnly);
        }
        self.check(offset, len)?;
        let mut inner = self.inner.write().map_err(|_| Self::lock_err())?;
        let start = offset as usize;
        inner.data[start..start + len as usize].fill(0);
        let bs = self.block_size as u64;
        // Only whole blocks become unmapped.
        for b in offset.div_ceil(bs)..(offset + len) / bs {
            inner.mapped[b as usize] = false;
        }
        Ok(())
    }
    fn thin_provisioned(&self) -> bool {
        true
    }
    fn allocation(&self, offset: u64) -> Result<(bool, u64), StorageError> {
        self.check(offset, 1)?;
        let inner = self.inner.read().map_err(|_| Self::lock_err())?;
        let bs = self.block_size as u64;
        let first = (offset / bs) as usize;
        let state = inner.mapped[first];
        let run = inner.mapped[first..]
            .iter()
            .take_while(|&&m| m == state)
            .count() as u64;
        Ok((state, run * bs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_discard() {
        let s = MemStore::new(8 * 512, 512, false);
        assert_eq!(s.allocation(0).ok(), Some((false, 8 * 512)));
        s.write_at(&[7u8; 1024], 512, false).ok();
        let mut b = [0u8; 512];
        s.read_at(&mut b, 1024).ok();
        assert_eq!(b, [7u8; 512]);
        assert_eq!(s.allocation(512).ok(), Some((true, 1024)));
        s.discard(512, 512).ok();
        assert_eq!(s.allocation(0).ok(), Some((false, 1024)));
        assert!(matches!(
            s.read_at(&mut b, 8 * 512),
            Err(StorageError::OutOfRange { .. })
        ));
    }
}
