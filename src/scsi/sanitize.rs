//! SANITIZE (SBC-4 §4.11, §5.30): overwrite with a pattern, block erase and crypto erase (on
//! a file-backed LU both deallocate every block: they then read as zeroes, SBC-4 §4.11.5),
//! EXIT FAILURE MODE. The operation runs on its own thread; while it runs the LU answers
//! every command but INQUIRY, REPORT LUNS and REQUEST SENSE with NOT READY, LOGICAL UNIT NOT
//! READY, SANITIZE IN PROGRESS (02/04/1B), and it goes on through task management and resets
//! (SBC-4 §4.11.2). OVERWRITE is paced (`LuOptions::sanitize_rate`) so a wipe of a big image
//! does not starve the other clients of the same storage.
//!
//! On a client disk (a copy-on-write overlay over a golden image) the client's data is the
//! overlay: every SANITIZE first discards it (a fresh empty overlay, the disk reads as the
//! golden image, no space used); BLOCK ERASE and CRYPTO ERASE stop there, OVERWRITE then
//! writes its pattern as asked.
use super::cdb::{be, byte, op};
use super::lun::{good, Fail, LogicalUnit, Out};
use super::sense::{key, Sense, INTERNAL_FAILURE};
use crate::storage::{BlockStore, StorageError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// 02/04/1B LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS.
pub(super) const SANITIZE_IN_PROGRESS: Sense = Sense::new(key::NOT_READY, 0x04, 0x1b);

/// Bytes written per OVERWRITE step.
const CHUNK: usize = 1 << 20;

#[derive(Debug, Default)]
pub(super) struct SanitizeState {
    running: AtomicBool,
    /// Bumped to release commands waiting for a sanitize to end (ABORT TASK and resets: the
    /// command ends, the operation goes on).
    detach: AtomicU64,
}

impl SanitizeState {
    pub(super) fn running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }
}

enum Job {
    Overwrite {
        block: Vec<u8>,
        passes: u8,
        invert: bool,
    },
    Erase,
}

impl Job {
    fn run(&self, store: &dyn BlockStore, rate: u64) -> Result<(), StorageError> {
        let size = store.size();
        let had_base = store.discard_changes()?;
        match self {
            Job::Erase if had_base => {}
            Job::Erase => store.discard(0, size)?,
            Job::Overwrite {
                block,
                passes,
                invert,
            } => {
                let per_chunk = (CHUNK / block.len().max(1)).max(1);
                let buf: Vec<u8> = block.repeat(per_chunk);
                let inverted: Vec<u8> = buf.iter().map(|b| !b).collect();
                let start = Instant::now();
                let mut written = 0u64;
                for pass in 0..*passes {
                    // INVERT: the pattern is inverted between consecutive passes; the last
                    // pass writes it as given (SBC-4 §5.30.2.2).
                    let flip = *invert && (passes - 1 - pass) % 2 == 1;
                    let data = if flip { &inverted } else { &buf };
                    let mut off = 0u64;
                    while off < size {
                        let n = (size - off).min(data.len() as u64) as usize;
                        store.write_at(&data[..n], off, false)?;
                        off += n as u64;
                        written += n as u64;
                        if rate > 0 {
                            let due = Duration::from_secs_f64(written as f64 / rate as f64);
                            if let Some(wait) = due.checked_sub(start.elapsed()) {
                                std::thread::sleep(wait);
                            }
                        }
                    }
                }
            }
        }
        store.flush()
    }
}

impl LogicalUnit {
    /// SANITIZE (SBC-4 §5.30).
    pub(super) fn sanitize(&self, cdb: &[u8], data: &[u8]) -> Out {
        let sa = byte(cdb, 1) & 0x1f;
        let immed = byte(cdb, 1) & 0x80 != 0;
        let plen = be(cdb, 7, 2) as usize;
        let job = match sa {
            op::SA_EXIT_FAILURE_MODE | op::SA_BLOCK_ERASE | op::SA_CRYPTO_ERASE => {
                if plen != 0 {
                    return Err(Sense::invalid_cdb_field(7, None).into());
                }
                if sa == op::SA_EXIT_FAILURE_MODE {
                    // A failed sanitize leaves no failure mode here: nothing to exit.
                    return good(vec![]);
                }
                if !self.thin() {
                    return Err(Sense::invalid_cdb_field(1, Some(4)).into());
                }
                Job::Erase
            }
            op::SA_OVERWRITE => {
                let bs = self.block_size() as usize;
                if plen <= 4 || plen > bs + 4 {
                    return Err(Sense::invalid_cdb_field(7, None).into());
                }
                let p = data
                    .get(..plen)
                    .ok_or(Fail::Check(super::sense::INVALID_FIELD_IU))?;
                let passes = p[0] & 0x1f;
                let pattern_len = be(p, 2, 2) as usize;
                if passes == 0 {
                    return Err(Sense::invalid_param_field(0, Some(4)).into());
                }
                if pattern_len == 0 || pattern_len > bs || pattern_len > plen - 4 {
                    return Err(Sense::invalid_param_field(2, None).into());
                }
                let pattern = &p[4..4 + pattern_len];
                let block: Vec<u8> = pattern.iter().copied().cycle().take(bs).collect();
                Job::Overwrite {
                    block,
                    passes,
                    invert: p[0] & 0x80 != 0,
                }
            }
            _ => return Err(Sense::invalid_cdb_field(1, Some(4)).into()),
        };
        self.check_writable()?;
        if self.sanitize.running.swap(true, Ordering::AcqRel) {
            return Err(SANITIZE_IN_PROGRESS.into());
        }
        let store = Arc::clone(&self.store);
        let state = Arc::clone(&self.sanitize);
        let rate = self.opts.sanitize_rate;
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("sanitize".into())
            .spawn(move || {
                let r = job.run(&*store, rate);
                if let Err(e) = &r {
                    tracing::error!(error = %e, "SANITIZE failed");
                }
                state.running.store(false, Ordering::Release);
                let _ = tx.send(r);
            });
        if spawned.is_err() {
            self.sanitize.running.store(false, Ordering::Release);
            return Err(INTERNAL_FAILURE.into());
        }
        if immed {
            return good(vec![]);
        }
        // IMMED = 0: status when the operation has completed, unless task management
        // releases the command first (the operation goes on regardless).
        let epoch = self.sanitize.detach.load(Ordering::Acquire);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(())) => return good(vec![]),
                // 03/31/03 SANITIZE COMMAND FAILED.
                Ok(Err(_)) => return Err(Sense::new(key::MEDIUM_ERROR, 0x31, 0x03).into()),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if self.sanitize.detach.load(Ordering::Acquire) != epoch {
                        return Err(SANITIZE_IN_PROGRESS.into());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(INTERNAL_FAILURE.into())
                }
            }
        }
    }

    /// Task management reached this LU (ABORT TASK, ABORT TASK SET, resets): commands waiting
    /// for a sanitize to complete end now; the sanitize itself continues (SBC-4 §4.11.2).
    pub fn release_waiting(&self) {
        self.sanitize.detach.fetch_add(1, Ordering::AcqRel);
    }
}
