//! One logical unit: state (mode pages, unit attentions, reservations, medium) and dispatch.
use super::cdb::{be, byte, check_usage, lookup, op};
use super::pr::{Access, PortId, PrError, PrState};
use super::sense::*;
use super::{status, Nexus, ResetKind, ScsiResult, Transfer};
use crate::storage::{BlockStore, FileSlice, StorageError};
use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// Identity a LUN reports in INQUIRY and VPD pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuIdentity {
    /// T10 vendor (8 chars), product (16), revision (4), space-padded on the wire.
    pub vendor: String,
    pub product: String,
    pub revision: String,
    /// Unit serial number (VPD 0x80).
    pub serial: String,
    /// NAA identifier (VPD 0x83), unique per LUN: IEEE Registered Extended (NAA 6, all 16
    /// bytes) or locally assigned (NAA 3, the first 8 bytes; the rest unused).
    pub naa: [u8; 16],
}

impl LuIdentity {
    /// The NAA designator as reported: 8 bytes for NAA 2, 3 and 5, 16 for NAA 6 (SPC-4
    /// §7.8.6.6, the NAA field gives the format and so the length).
    pub fn naa_designator(&self) -> &[u8] {
        match self.naa[0] >> 4 {
            2 | 3 | 5 => &self.naa[..8],
            _ => &self.naa[..],
        }
    }
}

/// Persistent reservations saved with APTPL = 1 that cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum PrRestoreError {
    #[error("reading the reservation file: {0}")]
    Io(#[from] std::io::Error),
    #[error("reservation file: {0}")]
    Malformed(#[from] super::pr::PrFileError),
}

/// Behaviour knobs of a LU beyond what the store says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuOptions {
    /// Report removable medium (INQUIRY RMB) and honour LOEJ / PREVENT ALLOW.
    pub removable: bool,
    /// MAXIMUM TRANSFER LENGTH in blocks (VPD 0xB0); larger READ/WRITE get INVALID FIELD.
    pub max_transfer_blocks: u32,
    /// MAXIMUM WRITE SAME LENGTH in blocks (VPD 0xB0).
    pub max_write_same_blocks: u32,
    /// MAXIMUM UNMAP LBA COUNT and BLOCK DESCRIPTOR COUNT (VPD 0xB0).
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
    /// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT for READ CAPACITY(16) (0..=15), e.g. 3 for
    /// 512-byte blocks on 4 KiB pages. Only a hint to initiators.
    pub physical_block_exponent: u8,
    /// Where persistent reservations with APTPL = 1 are kept (SPC-4 §5.13.4); None: APTPL
    /// is refused and PTPL_C is 0.
    pub pr_file: Option<std::path::PathBuf>,
    /// Bytes a second SANITIZE OVERWRITE writes at most (0 = unpaced).
    pub sanitize_rate: u64,
}

impl Default for LuOptions {
    fn default() -> Self {
        LuOptions {
            removable: false,
            max_transfer_blocks: 16384,
            max_write_same_blocks: 65536,
            max_unmap_blocks: 1 << 20,
            max_unmap_descriptors: 256,
            physical_block_exponent: 0,
            pr_file: None,
            sanitize_rate: 256 << 20,
        }
    }
}

/// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT (SBC-3 §5.16.2): log2(physical / logical),
/// 0 when they are equal (or the configuration, validated before, is off).
pub fn physical_exponent(block_size: u32, physical_block_size: u32) -> u8 {
    let ratio = physical_block_size / block_size.max(1);
    if ratio.is_power_of_two() {
        (ratio.trailing_zeros() as u8).min(15)
    } else {
        0
    }
}

/// PERSISTENT RESERVE OUT service action PREEMPT AND ABORT (SPC-4 §6.16.2).
const PREEMPT_AND_ABORT: u8 = 0x05;

/// MAXIMUM COMPARE AND WRITE LENGTH (VPD 0xB0); the NUMBER OF LOGICAL BLOCKS field is one byte.
pub(super) const MAX_CAW_BLOCKS: u32 = 255;

/// Changeable mode parameters (SPC-4 §7.5, SBC-3 §6.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ModeState {
    pub wce: bool,
    pub d_sense: bool,
    pub swp: bool,
}

impl Default for ModeState {
    fn default() -> Self {
        ModeState {
            wce: true,
            d_sense: false,
            swp: false,
        }
    }
}

#[derive(Default)]
pub(super) struct State {
    pub mode: ModeState,
    /// Pending unit attentions per nexus id (SAM-5 §5.14).
    ua: HashMap<u64, VecDeque<(u8, u8)>>,
    /// Nexuses that have sent a command, with their PR identity.
    nexuses: HashMap<u64, PortId>,
    /// RESERVE(6) holder (SPC-2 §7.21).
    reserve6: Option<u64>,
    /// Nexuses holding PREVENT MEDIUM REMOVAL (SBC-3 §5.13).
    prevent: HashSet<u64>,
    ejected: bool,
    pub pr: PrState,
    /// EXTENDED COPY outcomes by (nexus, list identifier): (segments, bytes).
    pub copy_results: HashMap<(u64, u8), (u16, u32)>,
    /// Nexuses a PREEMPT AND ABORT of the keyed nexus preempted, until its result leaves
    /// [`LogicalUnit::execute`] with them.
    preempted: HashMap<u64, Vec<u64>>,
}

pub(super) type Out = Result<(u8, Data), Fail>;

/// What a command returns to the initiator: bytes in memory, or (large reads, when the
/// transport asked for it) a range of the image file to send from the page cache.
#[derive(Debug)]
pub(super) enum Data {
    Mem(Bytes),
    File(FileSlice),
}

/// Reads at least this large use a [`pooled`] buffer.
const POOL_MIN: usize = 64 * 1024;
/// Largest read copied on the event loop (see `session::connection::runs_inline`).
const INLINE_COPY_MAX: usize = 256 * 1024;
/// Buffers the pool keeps between reads (all connections together).
const POOL_KEEP: usize = 16;
/// Idle read buffers, zeroed once when made and then reused without zeroing: a fresh
/// `vec![0; 1 MiB]` per read cost its memset and page faults (13 % of the server's CPU in
/// 1 MiB sequential reads, docs/performance.md).
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A pooled buffer of which the first `len` bytes are the data; back to the pool on drop
/// (when the last `Bytes` of it goes, i.e. after the writer sent it).
struct Pooled {
    buf: Vec<u8>,
    len: usize,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&self.buf)
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL_KEEP {
            pool.push(buf);
        }
    }
}

/// A buffer of at least `len` initialised bytes: from the pool if one is large enough,
/// else a new zeroed one (sized to the next power of two, so that it fits later reads).
fn pooled(len: usize) -> Pooled {
    let found = {
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        pool.iter()
            .position(|b| b.len() >= len)
            .map(|i| pool.swap_remove(i))
    };
    let buf = found.unwrap_or_else(|| vec![0u8; len.next_power_of_two()]);
    Pooled { buf, len }
}

#[derive(Debug)]
pub(super) enum Fail {
    Check(Sense),
    Conflict,
}

impl From<Sense> for Fail {
    fn from(s: Sense) -> Self {
        Fail::Check(s)
    }
}

pub(super) fn good(data: Vec<u8>) -> Out {
    Ok((status::GOOD, Data::Mem(Bytes::from(data))))
}

/// ENOSPC or EDQUOT, directly or as the message of a wrapped error.
fn out_of_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28 | 122))
        || e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
}

#[cfg(test)]
mod tests {
    use super::super::pr;
    use super::*;

    #[test]
    fn full_filesystem_is_space_allocation_failed() {
        let full = || StorageError::Io(std::io::Error::from_raw_os_error(28));
        let sense = |f: Fail| match f {
            Fail::Check(s) => s,
            Fail::Conflict => panic!("conflict"),
        };
        assert_eq!(sense(storage(full(), true)), SPACE_ALLOCATION_FAILED);
        assert_eq!(sense(storage(full(), false)), READ_ERROR);
        let eio = StorageError::Io(std::io::Error::from_raw_os_error(5));
        assert_eq!(sense(storage(eio, true)), WRITE_ERROR);
    }

    fn nexus(id: u64) -> Nexus {
        Nexus {
            id,
            initiator_port: format!("iqn.test:n{id},i,0x00023d00000{id}"),
            initiator_name: format!("iqn.test:n{id}"),
            relative_port: 1,
            target_port: String::new(),
        }
    }

    fn prout(lu: &LogicalUnit, n: &Nexus, sa: u8, kind: u8, key: u64, sa_key: u64) -> ScsiResult {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        lu.execute(n, &[0x5f, sa, kind, 0, 0, 0, 0, 0, 24, 0], &p)
    }

    fn ua(lu: &LogicalUnit, n: &Nexus) -> Option<(u8, u8)> {
        let r = lu.execute(n, &[0, 0, 0, 0, 0, 0], &[]);
        let s = r.sense?;
        (s[2] & 0x0f == key::UNIT_ATTENTION).then(|| (s[12], s[13]))
    }

    fn ident() -> LuIdentity {
        LuIdentity {
            vendor: "V".into(),
            product: "P".into(),
            revision: "1".into(),
            serial: "S".into(),
            naa: [0x60; 16],
        }
    }

    /// A store whose `write_many` always fails (after writing nothing): the LU must then
    /// write each command on its own.
    struct NoBatch(crate::storage::MemStore);

    impl BlockStore for NoBatch {
        fn block_size(&self) -> u32 {
            self.0.block_size()
        }
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, b: &mut [u8], o: u64) -> Result<(), StorageError> {
            self.0.read_at(b, o)
        }
        fn write_at(&self, d: &[u8], o: u64, fua: bool) -> Result<(), StorageError> {
            self.0.write_at(d, o, fua)
        }
        fn write_many(&self, _: &[(u64, &[u8])]) -> Result<(), StorageError> {
            Err(StorageError::Io(std::io::Error::from_raw_os_error(5)))
        }
        fn flush(&self) -> Result<(), StorageError> {
            Ok(())
        }
        fn discard(&self, o: u64, l: u64) -> Result<(), StorageError> {
            self.0.discard(o, l)
        }
        fn thin_provisioned(&self) -> bool {
            false
        }
        fn allocation(&self, o: u64) -> Result<(bool, u64), StorageError> {
            self.0.allocation(o)
        }
    }

    fn write10(lba: u32, blocks: u16, flags: u8) -> Vec<u8> {
        let mut c = vec![0x2a, flags, 0, 0, 0, 0, 0, 0, 0, 0];
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    /// `execute_writes` answers each command as `execute` would, one after another, and
    /// leaves the same bytes: a pending unit attention, an LBA out of range, a FUA write,
    /// a READ among the writes, a zero-length write, overlapping writes, a failed batch.
    #[test]
    fn execute_writes_is_execute_in_turn() {
        let blocks = 64u32;
        let mut cmds: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let data = |n: usize, v: u8| vec![v; n * 512];
        cmds.push((write10(0, 2, 0), data(2, 1)));
        cmds.push((write10(blocks - 1, 2, 0), data(2, 2)));
        cmds.push((write10(8, 8, 0), data(8, 3)));
        cmds.push((write10(9, 1, 0x08), data(1, 4)));
        cmds.push((vec![0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0], vec![]));
        cmds.push((write10(12, 0, 0), vec![]));
        cmds.push((write10(4, 8, 0), data(8, 5)));
        cmds.push((write10(20, 4, 0x20), data(4, 6)));
        let refs: Vec<(&[u8], &[u8])> = cmds.iter().map(|(c, d)| (&c[..], &d[..])).collect();
        let size = u64::from(blocks) * 512;
        let one = Arc::new(crate::storage::MemStore::new(size, 512, false));
        let lu_one = LogicalUnit::new(one.clone(), ident());
        let many = Arc::new(crate::storage::MemStore::new(size, 512, false));
        let lu_many = LogicalUnit::new(many.clone(), ident());
        let failing = Arc::new(NoBatch(crate::storage::MemStore::new(size, 512, false)));
        let lu_failing = LogicalUnit::new(failing.clone(), ident());
        let n = nexus(1);
        // A unit attention waits for the nexus on each LU: the first command gets it.
        for lu in [&lu_one, &lu_many, &lu_failing] {
            while ua(lu, &n).is_some() {}
            lu.unit_attention_all(0x2a, 0x09);
        }
        let want: Vec<(u8, Option<Vec<u8>>, Vec<u8>)> = refs
            .iter()
            .map(|&(c, d)| {
                let r = lu_one.execute(&n, c, d);
                (r.status, r.sense.map(|s| s.to_vec()), r.data_in.to_vec())
            })
            .collect();
        assert!(want[0].1.is_some(), "the unit attention comes first");
        assert_eq!(want[2].0, status::GOOD);
        for lu in [&lu_many, &lu_failing] {
            let got: Vec<(u8, Option<Vec<u8>>, Vec<u8>)> = lu
                .execute_writes(&n, &refs)
                .into_iter()
                .map(|r| (r.status, r.sense.map(|s| s.to_vec()), r.data_in.to_vec()))
                .collect();
            assert_eq!(got, want);
        }
        assert_eq!(many.snapshot(), one.snapshot());
        assert_eq!(failing.0.snapshot(), one.snapshot());
    }

    #[test]
    fn preempt_and_abort_names_the_preempted_nexuses() {
        let store = Arc::new(crate::storage::MemStore::new(1 << 20, 512, false));
        let ident = LuIdentity {
            vendor: "V".into(),
            product: "P".into(),
            revision: "1".into(),
            serial: "S".into(),
            naa: [0x60; 16],
        };
        let lu = LogicalUnit::new(store, ident);
        let (a, b, c) = (nexus(1), nexus(2), nexus(3));
        for n in [&a, &b, &c] {
            while ua(&lu, n).is_some() {}
        }
        assert_eq!(prout(&lu, &a, 6, 0, 0, 0xa).status, status::GOOD);
        assert_eq!(prout(&lu, &b, 6, 0, 0, 0xb).status, status::GOOD);
        assert_eq!(prout(&lu, &c, 6, 0, 0, 0xc).status, status::GOOD);
        assert_eq!(prout(&lu, &b, 1, pr::ty::WE, 0xb, 0).status, status::GOOD);
        // PREEMPT (4) changes the reservation but aborts nothing.
        let r = prout(&lu, &c, 4, pr::ty::WE, 0xc, 0xb);
        assert_eq!((r.status, r.abort_nexuses.clone()), (status::GOOD, vec![]));
        assert_eq!(ua(&lu, &b), Some((0x2a, 0x05)));
        assert_eq!(prout(&lu, &b, 6, 0, 0, 0xb).status, status::GOOD);
        // PREEMPT AND ABORT (5) names B, whose registration went, and not A.
        let r = prout(&lu, &a, 5, pr::ty::EA, 0xa, 0xb);
        assert_eq!((r.status, r.abort_nexuses), (status::GOOD, vec![2]));
        lu.commands_cleared(&[2]);
        assert_eq!(ua(&lu, &b), Some((0x2a, 0x05)));
        assert_eq!(ua(&lu, &b), Some((0x2f, 0x00)));
        assert_eq!(ua(&lu, &a), None);
        // A conflicting PREEMPT AND ABORT (unknown key) aborts nothing.
        let r = prout(&lu, &a, 5, pr::ty::EA, 0xa, 0x77);
        assert_eq!(r.status, status::RESERVATION_CONFLICT);
        assert!(r.abort_nexuses.is_empty());
    }
}

fn storage(e: StorageError, write: bool) -> Fail {
    Fail::Check(match e {
        StorageError::OutOfRange { .. } => LBA_OUT_OF_RANGE,
        StorageError::ReadOnly => WRITE_PROTECTED,
        StorageError::Unsupported(_) => INVALID_FIELD_CDB,
        // The backing filesystem is full: SBC-4 §4.7.3.7's answer for a thin LU out of
        // space, 07/27/07 SPACE ALLOCATION FAILED WRITE PROTECT, which Linux and Windows
        // handle as "out of space" rather than a failing medium.
        StorageError::Io(e) if write && out_of_space(&e) => SPACE_ALLOCATION_FAILED,
        StorageError::Io(_) if write => WRITE_ERROR,
        StorageError::Io(_) => READ_ERROR,
    })
}

pub struct LogicalUnit {
    pub(super) store: Arc<dyn BlockStore>,
    pub(super) identity: LuIdentity,
    pub(super) opts: LuOptions,
    pub(super) state: Mutex<State>,
    pub(super) sanitize: Arc<super::sanitize::SanitizeState>,
    /// Target port groups: one per portal group, each with one target port whose relative
    /// port identifier equals the group's (REPORT TARGET PORT GROUPS, SPC-4 §6.37).
    pub(super) port_groups: std::sync::atomic::AtomicU16,
    /// Writes hold it shared; COMPARE AND WRITE and ORWRITE hold it exclusively so that their
    /// read-modify-write is atomic against every other write (SBC-3 §5.2).
    io: RwLock<()>,
}

/// The block-addressing fields of a READ/WRITE-family CDB.
#[derive(Debug, Clone, Copy)]
struct Rw {
    lba: u64,
    blocks: u64,
    flags: u8,
}

fn rw_fields(cdb: &[u8]) -> Rw {
    let flags = byte(cdb, 1);
    match byte(cdb, 0) >> 5 {
        // 6-byte: 21-bit LBA; length 0 means 256 for READ(6)/WRITE(6) (SBC-3 §5.14).
        0 => {
            let n = byte(cdb, 4) as u64;
            Rw {
                lba: be(cdb, 1, 3) & 0x1f_ffff,
                blocks: if n == 0 { 256 } else { n },
                flags: 0,
            }
        }
        1 | 2 => Rw {
            lba: be(cdb, 2, 4),
            blocks: be(cdb, 7, 2),
            flags,
        },
        5 => Rw {
            lba: be(cdb, 2, 4),
            blocks: be(cdb, 6, 4),
            flags,
        },
        _ if byte(cdb, 0) == op::WRITE_ATOMIC16 => Rw {
            lba: be(cdb, 2, 8),
            blocks: be(cdb, 12, 2),
            flags,
        },
        _ => Rw {
            lba: be(cdb, 2, 8),
            blocks: be(cdb, 10, 4),
            flags,
        },
    }
}

impl LogicalUnit {
    pub fn new(store: Arc<dyn BlockStore>, identity: LuIdentity) -> Self {
        Self::with_options(store, identity, LuOptions::default())
    }

    pub fn with_options(store: Arc<dyn BlockStore>, identity: LuIdentity, opts: LuOptions) -> Self {
        let mut state = State::default();
        state.pr.ptpl_capable = opts.pr_file.is_some();
        LogicalUnit {
            store,
            identity,
            opts,
            state: Mutex::new(state),
            sanitize: Arc::default(),
            port_groups: std::sync::atomic::AtomicU16::new(1),
            io: RwLock::new(()),
        }
    }

    /// Restore persistent reservations saved with APTPL = 1 (SPC-4 §5.13.4). Ok(false) when
    /// there is nothing to restore. The file is only read: a full state filesystem does not
    /// keep the LU from starting.
    pub fn restore_pr(&self) -> Result<bool, PrRestoreError> {
        let Some(path) = &self.opts.pr_file else {
            return Ok(false);
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(PrRestoreError::Io(e)),
        };
        let pr = PrState::decode(&text)?;
        self.lock().pr = pr;
        Ok(true)
    }

    /// Save (APTPL = 1) or forget (APTPL = 0) the persistent reservation state, atomically:
    /// a temporary file, fsync, rename over the old one, fsync of the directory.
    fn persist_pr(&self, pr: &PrState) -> std::io::Result<()> {
        let Some(path) = &self.opts.pr_file else {
            return Ok(());
        };
        if !pr.aptpl() {
            return match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        use std::io::Write as _;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("pr.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(pr.encode().as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    }

    /// How many portal groups (target port groups) reach this LU.
    pub fn set_port_groups(&self, n: u16) {
        self.port_groups
            .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether sense data goes out in descriptor format (control mode page D_SENSE).
    pub fn descriptor_sense(&self) -> bool {
        self.lock().mode.d_sense
    }

    pub fn options(&self) -> &LuOptions {
        &self.opts
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not wedge the LU: the state stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn block_size(&self) -> u64 {
        u64::from(self.store.block_size().max(1))
    }

    pub(super) fn blocks(&self) -> u64 {
        self.store.size() / self.block_size()
    }

    pub(super) fn thin(&self) -> bool {
        self.store.thin_provisioned()
    }

    pub(super) fn write_protected(&self) -> bool {
        self.store.read_only() || self.lock().mode.swp
    }

    /// The transfer a CDB implies (for collecting Data-Out and residuals). Err = sense data
    /// for CHECK CONDITION (e.g. invalid opcode, invalid field in CDB).
    pub fn transfer(&self, cdb: &[u8]) -> Result<Transfer, ScsiResult> {
        let desc = self.lock().mode.d_sense;
        self.transfer_inner(cdb).map_err(|s| check_result(s, desc))
    }

    fn transfer_inner(&self, cdb: &[u8]) -> Result<Transfer, Sense> {
        let info = lookup(cdb)?;
        if info.opcode == op::UNMAP && !self.thin() {
            return Err(INVALID_OPCODE);
        }
        let bs = self.block_size();
        let bytes = |n: u64| u32::try_from(n.saturating_mul(bs)).unwrap_or(u32::MAX);
        let len32 = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(match info.opcode {
            op::READ6 | op::READ10 | op::READ12 | op::READ16 => {
                Transfer::In(bytes(rw_fields(cdb).blocks))
            }
            op::WRITE6
            | op::WRITE10
            | op::WRITE12
            | op::WRITE16
            | op::WRITE_VERIFY10
            | op::WRITE_VERIFY12
            | op::WRITE_VERIFY16
            | op::ORWRITE16
            | op::WRITE_ATOMIC16 => Transfer::Out(bytes(rw_fields(cdb).blocks)),
            op::VERIFY10 | op::VERIFY12 | op::VERIFY16 => match (byte(cdb, 1) >> 1) & 3 {
                0 => Transfer::None,
                3 => Transfer::Out(bytes(1)),
                _ => Transfer::Out(bytes(rw_fields(cdb).blocks)),
            },
            op::COMPARE_AND_WRITE => Transfer::Out(bytes(2 * u64::from(byte(cdb, 13)))),
            op::WRITE_SAME10 => Transfer::Out(bytes(1)),
            op::WRITE_SAME16 if byte(cdb, 1) & 1 != 0 => Transfer::None,
            op::WRITE_SAME16 => Transfer::Out(bytes(1)),
            op::UNMAP | op::MODE_SELECT10 => Transfer::Out(len32(be(cdb, 7, 2))),
            op::MODE_SELECT6 => Transfer::Out(len32(be(cdb, 4, 1))),
            op::PR_OUT => Transfer::Out(len32(be(cdb, 5, 4))),
            op::SANITIZE => Transfer::Out(len32(be(cdb, 7, 2))),
            op::LOG_SENSE => Transfer::In(len32(be(cdb, 7, 2))),
            op::INQUIRY => Transfer::In(len32(be(cdb, 3, 2))),
            op::REQUEST_SENSE | op::MODE_SENSE6 => Transfer::In(len32(be(cdb, 4, 1))),
            op::MODE_SENSE10 | op::PR_IN | op::READ_DEFECT10 => Transfer::In(len32(be(cdb, 7, 2))),
            op::READ_CAPACITY10 => Transfer::In(8),
            op::SERVICE_ACTION_IN16 => Transfer::In(len32(be(cdb, 10, 4))),
            op::REPORT_LUNS | op::MAINTENANCE_IN => Transfer::In(len32(be(cdb, 6, 4))),
            op::EXTENDED_COPY => Transfer::Out(len32(be(cdb, 10, 4))),
            op::RECEIVE_COPY_RESULTS => Transfer::In(len32(be(cdb, 10, 4))),
            op::READ_DEFECT12 => Transfer::In(len32(be(cdb, 6, 4))),
            _ => Transfer::None,
        })
    }

    /// Execute one command. `data_out` is the Data-Out the initiator sent (possibly shorter
    /// than the CDB asked if the transport saw an underflow). Blocking: storage I/O happens here.
    pub fn execute(&self, nexus: &Nexus, cdb: &[u8], data_out: &[u8]) -> ScsiResult {
        let out = self.execute_inner(nexus, cdb, data_out);
        self.result(nexus, cdb, out)
    }

    /// WRITE commands without FUA (what a connection received in one go), with the outcome
    /// of `execute` on each in turn, but their data written by one
    /// [`BlockStore::write_many`]. Anything else in `cmds` (a FUA write, another command,
    /// any write while the write cache is off) runs through `execute` in its place, after
    /// the writes before it.
    pub fn execute_writes(&self, nexus: &Nexus, cmds: &[(&[u8], &[u8])]) -> Vec<ScsiResult> {
        let mut results: Vec<Option<ScsiResult>> = (0..cmds.len()).map(|_| None).collect();
        let mut planned: Vec<(usize, u64, &[u8])> = Vec::new();
        for (i, &(cdb, data)) in cmds.iter().enumerate() {
            if !super::cdb::plain_write(cdb) || !self.lock().mode.wce {
                self.write_planned(nexus, cmds, &mut planned, &mut results);
                results[i] = Some(self.execute(nexus, cdb, data));
                continue;
            }
            match self
                .admit(nexus, cdb)
                .and_then(|_| self.write_range(cdb, data))
            {
                Ok(Some((offset, d))) => planned.push((i, offset, d)),
                Ok(None) => results[i] = Some(self.result(nexus, cdb, good(vec![]))),
                Err(f) => results[i] = Some(self.result(nexus, cdb, Err(f))),
            }
        }
        self.write_planned(nexus, cmds, &mut planned, &mut results);
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| check_result(INVALID_FIELD_IU, false)))
            .collect()
    }

    /// Write what [`LogicalUnit::execute_writes`] planned and set those commands' results.
    /// Should the batch fail, each write is tried again on its own, for its own status
    /// (writing the same data again is harmless, and they are redone in order).
    fn write_planned(
        &self,
        nexus: &Nexus,
        cmds: &[(&[u8], &[u8])],
        planned: &mut Vec<(usize, u64, &[u8])>,
        results: &mut [Option<ScsiResult>],
    ) {
        if planned.is_empty() {
            return;
        }
        let writes: Vec<(u64, &[u8])> = planned.iter().map(|&(_, o, d)| (o, d)).collect();
        let _g = self.io.read().unwrap_or_else(|p| p.into_inner());
        let ok = self.store.write_many(&writes).is_ok();
        for (i, offset, d) in planned.drain(..) {
            let out = if ok {
                good(vec![])
            } else {
                self.store
                    .write_at(d, offset, false)
                    .map_err(|e| storage(e, true))
                    .and_then(|()| good(vec![]))
            };
            if let (Some(slot), Some(&(cdb, _))) = (results.get_mut(i), cmds.get(i)) {
                *slot = Some(self.result(nexus, cdb, out));
            }
        }
    }

    /// A command's outcome as the transport sends it: sense in the format MODE SELECT chose,
    /// and the nexuses a PREEMPT AND ABORT preempted.
    fn result(&self, nexus: &Nexus, cdb: &[u8], out: Out) -> ScsiResult {
        let (desc, abort_nexuses) = {
            let mut st = self.lock();
            let preempted = match byte(cdb, 0) {
                op::PR_OUT => st.preempted.remove(&nexus.id).unwrap_or_default(),
                _ => Vec::new(),
            };
            (st.mode.d_sense, preempted)
        };
        let mut result = match out {
            Ok((st, Data::Mem(data))) => ScsiResult {
                status: st,
                data_in: data,
                data_file: None,
                sense: None,
                abort_nexuses: Vec::new(),
            },
            Ok((st, Data::File(f))) => ScsiResult {
                status: st,
                data_in: Bytes::new(),
                data_file: Some(f),
                sense: None,
                abort_nexuses: Vec::new(),
            },
            Err(Fail::Check(s)) => check_result(s, desc),
            Err(Fail::Conflict) => ScsiResult {
                status: status::RESERVATION_CONFLICT,
                data_in: Bytes::new(),
                data_file: None,
                abort_nexuses: Vec::new(),
                sense: None,
            },
        };
        result.abort_nexuses = abort_nexuses;
        result
    }

    /// What every command passes before it runs (SAM-5 §5.14, SPC-4 §5.9): no SANITIZE in
    /// progress, a pending unit attention reported, a known opcode with valid CDB usage
    /// bits, no reservation conflict, a medium present. Returns the initiator's port.
    fn admit(&self, nexus: &Nexus, cdb: &[u8]) -> Result<PortId, Fail> {
        let opcode = byte(cdb, 0);
        let who = PortId {
            initiator_port: nexus.initiator_port.clone(),
            relative_port: nexus.relative_port,
        };
        let status_only = matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE);
        if self.sanitize.running() && !status_only {
            return Err(super::sanitize::SANITIZE_IN_PROGRESS.into());
        }
        {
            let mut st = self.lock();
            st.nexuses.insert(nexus.id, who.clone());
            // SAM-5 §5.14: INQUIRY, REPORT LUNS and REQUEST SENSE do not consume UAs.
            if !matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE) {
                if let Some((asc, ascq)) = st.ua.get_mut(&nexus.id).and_then(|q| q.pop_front()) {
                    return Err(Sense::new(key::UNIT_ATTENTION, asc, ascq).into());
                }
            }
        }
        let info = lookup(cdb)?;
        // UNMAP exists only on thin LUs (SBC-3 §4.7.3.3: LBPU follows LBPME).
        if opcode == op::UNMAP && !self.thin() {
            return Err(INVALID_OPCODE.into());
        }
        check_usage(info, cdb)?;
        self.check_reservations(nexus, &who, cdb)?;
        if self.lock().ejected && needs_medium(opcode) {
            return Err(MEDIUM_NOT_PRESENT.into());
        }
        Ok(who)
    }

    fn execute_inner(&self, nexus: &Nexus, cdb: &[u8], data_out: &[u8]) -> Out {
        let opcode = byte(cdb, 0);
        let who = self.admit(nexus, cdb)?;
        match opcode {
            op::TEST_UNIT_READY => good(vec![]),
            op::REQUEST_SENSE => self.request_sense(nexus, cdb),
            op::INQUIRY => self.inquiry(nexus, cdb),
            op::MODE_SENSE6 | op::MODE_SENSE10 => self.mode_sense(cdb),
            op::MODE_SELECT6 | op::MODE_SELECT10 => self.mode_select(nexus, cdb, data_out),
            op::READ_CAPACITY10 => self.read_capacity10(),
            op::SERVICE_ACTION_IN16 => match byte(cdb, 1) & 0x1f {
                op::SA_READ_CAPACITY16 => self.read_capacity16(cdb),
                _ => self.get_lba_status(cdb),
            },
            op::MAINTENANCE_IN if byte(cdb, 1) & 0x1f == op::SA_REPORT_TARGET_PORT_GROUPS => {
                self.report_target_port_groups(cdb)
            }
            op::MAINTENANCE_IN => super::spc::report_opcodes(cdb, self.thin()),
            op::REPORT_LUNS => Err(INVALID_OPCODE.into()), // answered by the LunTable
            op::READ6 | op::READ10 | op::READ12 | op::READ16 => self.read(cdb),
            op::WRITE6 | op::WRITE10 | op::WRITE12 | op::WRITE16 => self.write(cdb, data_out),
            op::WRITE_VERIFY10 | op::WRITE_VERIFY12 | op::WRITE_VERIFY16 => {
                // BYTCHK 1xb is reserved for WRITE AND VERIFY (SBC-3 §5.40); the write itself
                // is the verification of a medium that cannot fail silently.
                if byte(cdb, 1) & 0x04 != 0 {
                    return Err(Sense::invalid_cdb_field(1, Some(2)).into());
                }
                self.write(cdb, data_out)
            }
            op::VERIFY10 | op::VERIFY12 | op::VERIFY16 => self.verify(cdb, data_out),
            op::ORWRITE16 => self.orwrite(cdb, data_out),
            op::WRITE_ATOMIC16 => self.write_atomic(cdb, data_out),
            op::COMPARE_AND_WRITE => self.compare_and_write(cdb, data_out),
            op::SANITIZE => self.sanitize(cdb, data_out),
            op::LOG_SENSE => self.log_sense(cdb),
            op::PREFETCH10 | op::PREFETCH16 => {
                let f = self.prefetch_fields(cdb);
                self.range(f.0, f.1)?;
                good(vec![])
            }
            op::SYNC_CACHE10 | op::SYNC_CACHE16 => {
                let f = self.prefetch_fields(cdb);
                self.range(f.0, f.1)?;
                self.store.flush().map_err(|e| storage(e, true))?;
                good(vec![])
            }
            op::WRITE_SAME10 | op::WRITE_SAME16 => self.write_same(cdb, data_out),
            op::UNMAP => self.unmap(cdb, data_out),
            op::START_STOP_UNIT => self.start_stop(cdb),
            op::PREVENT_ALLOW => {
                let mut st = self.lock();
                if byte(cdb, 4) & 1 != 0 {
                    st.prevent.insert(nexus.id);
                } else {
                    st.prevent.remove(&nexus.id);
                }
                good(vec![])
            }
            op::RESERVE6 => {
                let mut st = self.lock();
                match st.reserve6 {
                    Some(h) if h != nexus.id => Err(Fail::Conflict),
                    _ => {
                        st.reserve6 = Some(nexus.id);
                        good(vec![])
                    }
                }
            }
            op::RELEASE6 => {
                // Releasing a reservation held by another nexus is a no-op (SPC-2 §7.20).
                let mut st = self.lock();
                if st.reserve6 == Some(nexus.id) {
                    st.reserve6 = None;
                }
                good(vec![])
            }
            op::PR_IN => {
                let alloc = be(cdb, 7, 2) as usize;
                let mut v = self.lock().pr.read(byte(cdb, 1) & 0x1f)?;
                v.truncate(alloc);
                good(v)
            }
            op::PR_OUT => self.pr_out(nexus.id, &who, cdb, data_out),
            op::EXTENDED_COPY => self.extended_copy(nexus.id, cdb, data_out),
            op::RECEIVE_COPY_RESULTS => self.receive_copy_results(nexus.id, cdb),
            op::READ_DEFECT10 | op::READ_DEFECT12 => {
                // No defects: a header with an empty list (SBC-3 §5.16/§5.17).
                let fmt = byte(cdb, if opcode == op::READ_DEFECT10 { 2 } else { 1 }) & 0x1f;
                let (mut v, alloc) = if opcode == op::READ_DEFECT10 {
                    (vec![0, fmt, 0, 0], be(cdb, 7, 2))
                } else {
                    (vec![0, fmt, 0, 0, 0, 0, 0, 0], be(cdb, 6, 4))
                };
                v.truncate(alloc as usize);
                good(v)
            }
            _ => Err(INVALID_OPCODE.into()),
        }
    }

    /// RESERVE(6) (SPC-2 §5.5.1) and persistent reservation (SPC-4 §5.9.1) conflicts.
    fn check_reservations(&self, nexus: &Nexus, who: &PortId, cdb: &[u8]) -> Result<(), Fail> {
        let opcode = byte(cdb, 0);
        let st = self.lock();
        if let Some(h) = st.reserve6 {
            let exempt = matches!(
                opcode,
                op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE | op::RELEASE6
            ) || (opcode == op::MAINTENANCE_IN
                && byte(cdb, 1) & 0x1f == op::SA_REPORT_OPCODES);
            if h != nexus.id && !exempt {
                return Err(Fail::Conflict);
            }
        }
        if matches!(opcode, op::RESERVE6 | op::RELEASE6) && !st.pr.is_empty() {
            return Err(Fail::Conflict);
        }
        if !st.pr.allows(who, access_class(cdb)) {
            return Err(Fail::Conflict);
        }
        Ok(())
    }

    fn pr_out(&self, nexus_id: u64, who: &PortId, cdb: &[u8], data: &[u8]) -> Out {
        let mut st = self.lock();
        let before = st.pr.clone();
        match st.pr.out(who, cdb, data) {
            Ok(uas) => {
                if before.aptpl() || st.pr.aptpl() {
                    if let Err(e) = self.persist_pr(&st.pr) {
                        // A change that would not survive a restart is not made: the
                        // initiator retries an ABORTED COMMAND (0B/44/00).
                        tracing::error!(error = %e, "cannot save persistent reservations (APTPL)");
                        st.pr = before;
                        return Err(INTERNAL_FAILURE.into());
                    }
                }
                let targets: Vec<(u64, u8, u8)> = uas
                    .iter()
                    .flat_map(|(p, asc, ascq)| {
                        st.nexuses
                            .iter()
                            .filter(move |(_, w)| *w == p)
                            .map(move |(id, _)| (*id, *asc, *ascq))
                    })
                    .collect();
                if byte(cdb, 1) & 0x1f == PREEMPT_AND_ABORT {
                    // SPC-4 §5.13.11.2.6 (r37 §5.9.11.5): the tasks of every I_T nexus
                    // whose registration was preempted are aborted; the transport does it
                    // before this command's status goes out (ScsiResult::abort_nexuses).
                    let mut ids: Vec<u64> = targets
                        .iter()
                        .filter(|t| (t.1, t.2) == (0x2a, 0x05) && t.0 != nexus_id)
                        .map(|t| t.0)
                        .collect();
                    ids.sort_unstable();
                    ids.dedup();
                    if !ids.is_empty() {
                        st.preempted.entry(nexus_id).or_default().extend(ids);
                    }
                }
                for (id, asc, ascq) in targets {
                    queue_ua(&mut st, id, asc, ascq);
                }
                good(vec![])
            }
            Err(PrError::Conflict) => Err(Fail::Conflict),
            Err(PrError::Check(s)) => Err(s.into()),
        }
    }

    /// Queue a unit attention for every known nexus except `except`.
    pub(super) fn ua_others(&self, st: &mut State, except: Option<u64>, asc: u8, ascq: u8) {
        let ids: Vec<u64> = st.nexuses.keys().copied().collect();
        for id in ids.into_iter().filter(|id| Some(*id) != except) {
            queue_ua(st, id, asc, ascq);
        }
    }

    fn request_sense(&self, nexus: &Nexus, cdb: &[u8]) -> Out {
        let desc = byte(cdb, 1) & 1 != 0;
        let alloc = byte(cdb, 4) as usize;
        let mut st = self.lock();
        // SPC-4 §6.39: report (and clear) a pending unit attention, else NO SENSE.
        let sense = match st.ua.get_mut(&nexus.id).and_then(|q| q.pop_front()) {
            Some((asc, ascq)) => Sense::new(key::UNIT_ATTENTION, asc, ascq),
            None if st.ejected => MEDIUM_NOT_PRESENT,
            None => NO_SENSE,
        };
        let mut v = sense.encode(desc).to_vec();
        v.truncate(alloc);
        good(v)
    }

    // ----- block commands (SBC-3 §5) -----

    /// LBA range check: LOGICAL BLOCK ADDRESS OUT OF RANGE (SBC-3 §4.5).
    fn range(&self, lba: u64, blocks: u64) -> Result<(), Fail> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks() => Ok(()),
            _ => Err(LBA_OUT_OF_RANGE.into()),
        }
    }

    fn prefetch_fields(&self, cdb: &[u8]) -> (u64, u64) {
        if byte(cdb, 0) & 0xe0 == 0x20 {
            (be(cdb, 2, 4), be(cdb, 7, 2))
        } else {
            (be(cdb, 2, 8), be(cdb, 10, 4))
        }
    }

    /// Common READ/WRITE checks: protection fields (we have none), transfer limit, range.
    fn rw_check(&self, cdb: &[u8], rw: &Rw) -> Result<(), Fail> {
        if rw.flags & 0xe0 != 0 {
            // RDPROTECT/WRPROTECT/VRPROTECT != 0 without protection (SBC-3 §5.8 table).
            return Err(Sense::invalid_cdb_field(1, Some(7)).into());
        }
        if rw.blocks > u64::from(self.opts.max_transfer_blocks) {
            let field = if byte(cdb, 0) >> 5 == 0 { 4 } else { 7 };
            return Err(Sense::invalid_cdb_field(field, None).into());
        }
        self.range(rw.lba, rw.blocks)
    }

    fn read(&self, cdb: &[u8]) -> Out {
        let rw = rw_fields(cdb);
        self.rw_check(cdb, &rw)?;
        let bs = self.block_size();
        let (offset, len) = (rw.lba * bs, (rw.blocks * bs) as usize);
        if len >= POOL_MIN {
            // Large reads: straight from the page cache when the transport can send from a
            // file (no data digest) and the store has the range in one cached file.
            if crate::storage::file_slices_wanted() {
                if let Some(f) = self.store.file_slice(offset, len as u64) {
                    return Ok((status::GOOD, Data::File(f)));
                }
            }
            if len > INLINE_COPY_MAX && crate::storage::nowait() {
                // On the event loop (the transport ran it inline hoping for a file slice):
                // a copy this long belongs on a thread that may take its time.
                crate::storage::note_would_block();
                return Err(Fail::Check(INVALID_FIELD_IU));
            }
            let mut p = pooled(len);
            let buf = p.buf.get_mut(..len).ok_or(Fail::Check(INVALID_FIELD_IU))?;
            self.store
                .read_at(buf, offset)
                .map_err(|e| storage(e, false))?;
            return Ok((status::GOOD, Data::Mem(Bytes::from_owner(p))));
        }
        let mut buf = vec![0u8; len];
        if !buf.is_empty() {
            self.store
                .read_at(&mut buf, offset)
                .map_err(|e| storage(e, false))?;
        }
        good(buf)
    }

    pub(super) fn check_writable(&self) -> Result<(), Fail> {
        if self.write_protected() {
            return Err(WRITE_PROTECTED.into());
        }
        Ok(())
    }

    fn write(&self, cdb: &[u8], data: &[u8]) -> Out {
        if let Some((offset, data)) = self.write_range(cdb, data)? {
            let fua = rw_fields(cdb).flags & 0x08 != 0 || !self.lock().mode.wce;
            let _g = self.io.read().unwrap_or_else(|p| p.into_inner());
            self.store
                .write_at(data, offset, fua)
                .map_err(|e| storage(e, true))?;
        }
        good(vec![])
    }

    /// A WRITE's checks, and the bytes it writes where (None: nothing to write).
    fn write_range<'a>(&self, cdb: &[u8], data: &'a [u8]) -> Result<Option<(u64, &'a [u8])>, Fail> {
        let rw = rw_fields(cdb);
        self.rw_check(cdb, &rw)?;
        self.check_writable()?;
        let bs = self.block_size();
        let len = (rw.blocks * bs) as usize;
        // When the transport's expected length cut the Data-Out short (FCP-4 §9.4.2 a: data
        // beyond the EDTL is not transferred), only the whole blocks received are written; the
        // transport reports the residual.
        let len = len.min(data.len() / bs as usize * bs as usize);
        let data = data.get(..len).ok_or(Fail::Check(INVALID_FIELD_IU))?;
        Ok((!data.is_empty()).then_some((rw.lba * bs, data)))
    }

    /// WRITE ATOMIC(16) (SBC-4 §5.48): all or nothing, and never seen half-done by a
    /// concurrent COMPARE AND WRITE or ORWRITE (exclusive io lock). No alignment or
    /// granularity constraints (both 0 in the Block Limits page).
    fn write_atomic(&self, cdb: &[u8], data: &[u8]) -> Out {
        let rw = rw_fields(cdb);
        if rw.flags & 0xe0 != 0 {
            return Err(Sense::invalid_cdb_field(1, Some(7)).into());
        }
        self.range(rw.lba, rw.blocks)?;
        if rw.blocks > u64::from(self.opts.max_transfer_blocks) {
            return Err(Sense::invalid_cdb_field(12, None).into());
        }
        self.check_writable()?;
        let bs = self.block_size();
        let len = (rw.blocks * bs) as usize;
        let data = data.get(..len).ok_or(Fail::Check(INVALID_FIELD_IU))?;
        if !data.is_empty() {
            let _g = self.io.write().unwrap_or_else(|p| p.into_inner());
            self.store
                .write_at(data, rw.lba * bs, rw.flags & 0x08 != 0)
                .map_err(|e| storage(e, true))?;
        }
        good(vec![])
    }

    /// A plain write under the shared io lock (other writers may run concurrently; COMPARE AND
    /// WRITE and ORWRITE may not).
    pub(super) fn write_shared(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), Fail> {
        let _g = self.io.read().unwrap_or_else(|p| p.into_inner());
        self.store
            .write_at(data, offset, fua)
            .map_err(|e| storage(e, true))
    }

    fn verify(&self, cdb: &[u8], data: &[u8]) -> Out {
        let rw = rw_fields(cdb);
        self.rw_check(cdb, &rw)?;
        let bytchk = (rw.flags >> 1) & 3;
        if bytchk == 2 {
            return Err(Sense::invalid_cdb_field(1, Some(2)).into());
        }
        if bytchk == 0 || rw.blocks == 0 {
            return good(vec![]);
        }
        let bs = self.block_size();
        let mut buf = vec![0u8; (rw.blocks * bs) as usize];
        self.store
            .read_at(&mut buf, rw.lba * bs)
            .map_err(|e| storage(e, false))?;
        let expect: Vec<u8> = if bytchk == 3 {
            let one = data
                .get(..bs as usize)
                .ok_or(Fail::Check(INVALID_FIELD_IU))?;
            one.repeat(rw.blocks as usize)
        } else {
            data.get(..buf.len())
                .ok_or(Fail::Check(INVALID_FIELD_IU))?
                .to_vec()
        };
        match buf.iter().zip(expect.iter()).position(|(a, b)| a != b) {
            Some(off) => Err(MISCOMPARE_VERIFY.with_info(off as u64).into()),
            None => good(vec![]),
        }
    }

    fn orwrite(&self, cdb: &[u8], data: &[u8]) -> Out {
        let rw = rw_fields(cdb);
        self.rw_check(cdb, &rw)?;
        self.check_writable()?;
        if rw.blocks == 0 {
            return good(vec![]);
        }
        let bs = self.block_size();
        let len = (rw.blocks * bs) as usize;
        let data = data.get(..len).ok_or(Fail::Check(INVALID_FIELD_IU))?;
        let _g = self.io.write().unwrap_or_else(|p| p.into_inner());
        let mut buf = vec![0u8; len];
        self.store
            .read_at(&mut buf, rw.lba * bs)
            .map_err(|e| storage(e, false))?;
        buf.iter_mut().zip(data).for_each(|(a, b)| *a |= b);
        self.store
            .write_at(&buf, rw.lba * bs, rw.flags & 0x08 != 0)
            .map_err(|e| storage(e, true))?;
        good(vec![])
    }

    /// COMPARE AND WRITE (SBC-3 §5.2): atomic against other writes via the exclusive io lock.
    fn compare_and_write(&self, cdb: &[u8], data: &[u8]) -> Out {
        let flags = byte(cdb, 1);
        let lba = be(cdb, 2, 8);
        let n = u64::from(byte(cdb, 13));
        if flags & 0xe0 != 0 {
            return Err(Sense::invalid_cdb_field(1, Some(7)).into());
        }
        if n > u64::from(MAX_CAW_BLOCKS) || n > u64::from(self.opts.max_transfer_blocks) {
            return Err(Sense::invalid_cdb_field(13, None).into());
        }
        self.range(lba, n)?;
        self.check_writable()?;
        if n == 0 {
            // SBC-3 §5.2: zero blocks is not an error, but Data-Out with it means the
            // initiator meant a length the one-byte field cannot hold (libiscsi sends 256).
            if !data.is_empty() {
                return Err(Sense::invalid_cdb_field(13, None).into());
            }
            return good(vec![]);
        }
        let bs = self.block_size();
        let len = (n * bs) as usize;
        let (verify, write) = match (data.get(..len), data.get(len..2 * len)) {
            (Some(v), Some(w)) => (v, w),
            _ => return Err(INVALID_FIELD_IU.into()),
        };
        let _g = self.io.write().unwrap_or_else(|p| p.into_inner());
        let mut buf = vec![0u8; len];
        self.store
            .read_at(&mut buf, lba * bs)
            .map_err(|e| storage(e, false))?;
        if let Some(off) = buf.iter().zip(verify).position(|(a, b)| a != b) {
            return Err(MISCOMPARE_VERIFY.with_info(off as u64).into());
        }
        self.store
            .write_at(write, lba * bs, flags & 0x08 != 0)
            .map_err(|e| storage(e, true))?;
        good(vec![])
    }

    /// WRITE SAME(10/16) (SBC-3 §5.41/§5.42).
    fn write_same(&self, cdb: &[u8], data: &[u8]) -> Out {
        let sixteen = byte(cdb, 0) == op::WRITE_SAME16;
        let flags = byte(cdb, 1);
        let (lba, mut n) = if sixteen {
            (be(cdb, 2, 8), be(cdb, 10, 4))
        } else {
            (be(cdb, 2, 4), be(cdb, 7, 2))
        };
        if flags & 0xe0 != 0 {
            return Err(Sense::invalid_cdb_field(1, Some(7)).into());
        }
        let unmap = flags & 0x08 != 0;
        let ndob = sixteen && flags & 0x01 != 0;
        if unmap && !self.thin() {
            // LBPWS/LBPWS10 are zero on a fully provisioned LU (SBC-3 §5.42).
            return Err(Sense::invalid_cdb_field(1, Some(3)).into());
        }
        if lba > self.blocks() {
            return Err(LBA_OUT_OF_RANGE.into());
        }
        let max = u64::from(self.opts.max_write_same_blocks);
        if n == 0 {
            // Zero means "to the end of the medium" (SBC-3 §5.41), subject to the limit.
            n = self.blocks() - lba;
        }
        if max != 0 && n > max {
            return Err(Sense::invalid_cdb_field(if sixteen { 10 } else { 7 }, None).into());
        }
        self.range(lba, n)?;
        self.check_writable()?;
        let bs = self.block_size() as usize;
        let block: Vec<u8> = if ndob {
            vec![0u8; bs]
        } else {
            match data.get(..bs) {
                Some(b) => b.to_vec(),
                None => return Err(INVALID_FIELD_IU.into()),
            }
        };
        if n == 0 {
            return good(vec![]);
        }
        let zero = block.iter().all(|&b| b == 0);
        let _g = self.io.read().unwrap_or_else(|p| p.into_inner());
        // UNMAP on a thin LU deallocates whatever the data block holds (as LIO does, and as
        // libiscsi expects with LBPRZ=1: unmapped blocks read back as zeroes); NDOB means a
        // zero block.
        if (unmap || (ndob && zero)) && self.thin() {
            self.store
                .discard(lba * bs as u64, n * bs as u64)
                .map_err(|e| storage(e, true))?;
            return good(vec![]);
        }
        let chunk_blocks = (1 << 20) / bs as u64 + 1;
        let mut done = 0;
        while done < n {
            let k = (n - done).min(chunk_blocks);
            let buf = block.repeat(k as usize);
            self.store
                .write_at(&buf, (lba + done) * bs as u64, false)
                .map_err(|e| storage(e, true))?;
            done += k;
        }
        good(vec![])
    }

    /// UNMAP (SBC-3 §5.28) with the parameter list checks of §5.28.2.
    fn unmap(&self, cdb: &[u8], data: &[u8]) -> Out {
        if byte(cdb, 1) & 1 != 0 {
            return Err(Sense::invalid_cdb_field(1, Some(0)).into());
        }
        let plen = be(cdb, 7, 2) as usize;
        if plen == 0 {
            return good(vec![]);
        }
        if plen < 8 {
            return Err(PARAM_LIST_LENGTH.into());
        }
        self.check_writable()?;
        let data = data.get(..plen).ok_or(Fail::Check(PARAM_LIST_LENGTH))?;
        let dlen = be(data, 0, 2) as usize;
        let bdlen = be(data, 2, 2) as usize;
        if bdlen % 16 != 0 || dlen + 2 > plen || bdlen + 8 > plen {
            return Err(PARAM_LIST_LENGTH.into());
        }
        let count = bdlen / 16;
        if count > self.opts.max_unmap_descriptors as usize {
            return Err(Sense::invalid_param_field(2, None).into());
        }
        let descs: Vec<(u64, u64)> = (0..count)
            .map(|i| {
                let d = &data[8 + i * 16..];
                (be(d, 0, 8), be(d, 8, 4))
            })
            .collect();
        // Validate every descriptor before changing anything.
        for (i, &(lba, n)) in descs.iter().enumerate() {
            if n > u64::from(self.opts.max_unmap_blocks) {
                return Err(Sense::invalid_param_field((8 + i * 16 + 8) as u16, None).into());
            }
            self.range(lba, n)?;
        }
        let bs = self.block_size();
        let _g = self.io.read().unwrap_or_else(|p| p.into_inner());
        for (lba, n) in descs.into_iter().filter(|d| d.1 > 0) {
            if self.thin() {
                self.store
                    .discard(lba * bs, n * bs)
                    .map_err(|e| storage(e, true))?;
            }
        }
        good(vec![])
    }

    /// GET LBA STATUS (SBC-3 §5.6).
    fn get_lba_status(&self, cdb: &[u8]) -> Out {
        let lba = be(cdb, 2, 8);
        let alloc = be(cdb, 10, 4) as usize;
        if lba >= self.blocks() {
            return Err(LBA_OUT_OF_RANGE.into());
        }
        let bs = self.block_size();
        let (mapped, len) = self
            .store
            .allocation(lba * bs)
            .map_err(|e| storage(e, false))?;
        let count = (len / bs).clamp(1, u64::from(u32::MAX));
        let mut v = Vec::with_capacity(24);
        v.extend_from_slice(&20u32.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
        v.extend_from_slice(&lba.to_be_bytes());
        v.extend_from_slice(&(count as u32).to_be_bytes());
        v.push(if mapped { 0 } else { 1 });
        v.extend_from_slice(&[0; 3]);
        v.truncate(alloc);
        good(v)
    }

    fn read_capacity10(&self) -> Out {
        let last = self.blocks().saturating_sub(1);
        let mut v = Vec::with_capacity(8);
        // Too big for 32 bits: 0xFFFFFFFF tells the initiator to use READ CAPACITY(16).
        v.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
        v.extend_from_slice(&(self.block_size() as u32).to_be_bytes());
        good(v)
    }

    fn read_capacity16(&self, cdb: &[u8]) -> Out {
        let alloc = be(cdb, 10, 4) as usize;
        let mut v = vec![0u8; 32];
        v[0..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
        v[8..12].copy_from_slice(&(self.block_size() as u32).to_be_bytes());
        v[13] = self.opts.physical_block_exponent & 0x0f;
        if self.thin() {
            // LBPME and LBPRZ (SBC-3 §5.16.2): discarded blocks read back as zeroes.
            v[14] = 0xc0;
        }
        v.truncate(alloc);
        good(v)
    }

    /// START STOP UNIT (SBC-3 §5.25): only LOEJ on removable LUs does anything.
    fn start_stop(&self, cdb: &[u8]) -> Out {
        let b4 = byte(cdb, 4);
        let (pc, loej, start) = (b4 >> 4, b4 & 2 != 0, b4 & 1 != 0);
        if pc != 0 || !loej {
            return good(vec![]);
        }
        let mut st = self.lock();
        if !st.prevent.is_empty() {
            return Err(REMOVAL_PREVENTED.into());
        }
        if self.opts.removable {
            st.ejected = !start;
        }
        good(vec![])
    }

    /// A reset task management function reached this LU from `nexus`.
    pub fn reset(&self, nexus: &Nexus, kind: ResetKind) {
        let _ = nexus;
        let mut st = self.lock();
        // SPC-4 §5.9.1 / SPC-2: resets release RESERVE(6) and clear PREVENT (SBC-3 §5.13);
        // persistent reservations survive.
        st.reserve6 = None;
        st.prevent.clear();
        let (asc, ascq) = match kind {
            ResetKind::LogicalUnit => (0x29, 0x03),
            ResetKind::TargetWarm => (0x29, 0x02),
            ResetKind::TargetCold => (0x29, 0x01),
        };
        if kind == ResetKind::TargetCold {
            st.mode = ModeState::default();
        }
        self.ua_others(&mut st, None, asc, ascq);
    }

    /// The transport aborted commands of these nexuses on this LU because of another nexus's
    /// PREEMPT AND ABORT. TAS = 0 in the control mode page: they got no status, so each is
    /// told with COMMANDS CLEARED BY ANOTHER INITIATOR (06/2F/00; SAM-5 §5.6, SPC-4 §7.5.8).
    pub fn commands_cleared(&self, nexus_ids: &[u64]) {
        let mut st = self.lock();
        for &id in nexus_ids {
            queue_ua(&mut st, id, 0x2f, 0x00);
        }
    }

    /// Queue a unit attention for every nexus that has used this LU (SAM-5 §5.14), for
    /// events outside any command such as a configuration reload.
    pub fn unit_attention_all(&self, asc: u8, ascq: u8) {
        let mut st = self.lock();
        self.ua_others(&mut st, None, asc, ascq);
    }

    /// The I_T nexus is gone (session closed or reinstated): release RESERVE(6)
    /// reservations and forget its unit attentions. Persistent reservations survive.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let mut st = self.lock();
        if st.reserve6 == Some(nexus.id) {
            st.reserve6 = None;
        }
        st.prevent.remove(&nexus.id);
        st.ua.remove(&nexus.id);
        st.nexuses.remove(&nexus.id);
        st.copy_results.retain(|k, _| k.0 != nexus.id);
        st.preempted.remove(&nexus.id);
    }
}

/// Pending unit attentions per nexus are few and distinct: an idle nexus must not accumulate
/// an unbounded queue (SAM-5 §5.14 lets a device server report only the most important).
const MAX_PENDING_UAS: usize = 8;

fn queue_ua(st: &mut State, id: u64, asc: u8, ascq: u8) {
    let q = st.ua.entry(id).or_default();
    if !q.contains(&(asc, ascq)) && q.len() < MAX_PENDING_UAS {
        q.push_back((asc, ascq));
    }
}

pub(super) fn check_result(s: Sense, descriptor: bool) -> ScsiResult {
    ScsiResult {
        status: status::CHECK_CONDITION,
        data_in: Bytes::new(),
        data_file: None,
        sense: Some(s.encode(descriptor)),
        abort_nexuses: Vec::new(),
    }
}

/// Commands that touch the medium and fail with MEDIUM NOT PRESENT after an eject.
fn needs_medium(opcode: u8) -> bool {
    matches!(
        opcode,
        op::TEST_UNIT_READY
            | op::READ6
            | op::READ10
            | op::READ12
            | op::READ16
            | op::WRITE6
            | op::WRITE10
            | op::WRITE12
            | op::WRITE16
            | op::WRITE_VERIFY10
            | op::WRITE_VERIFY12
            | op::WRITE_VERIFY16
            | op::VERIFY10
            | op::VERIFY12
            | op::VERIFY16
            | op::ORWRITE16
            | op::WRITE_ATOMIC16
            | op::COMPARE_AND_WRITE
            | op::PREFETCH10
            | op::PREFETCH16
            | op::SYNC_CACHE10
            | op::SYNC_CACHE16
            | op::WRITE_SAME10
            | op::WRITE_SAME16
            | op::UNMAP
            | op::EXTENDED_COPY
            | op::READ_CAPACITY10
            | op::SERVICE_ACTION_IN16
    )
}

/// Access class for the persistent reservation rules (SPC-4 §5.9.1 tables).
fn access_class(cdb: &[u8]) -> Access {
    match byte(cdb, 0) {
        op::INQUIRY
        | op::REPORT_LUNS
        | op::REQUEST_SENSE
        | op::PR_IN
        | op::PR_OUT
        | op::TEST_UNIT_READY
        | op::READ_CAPACITY10
        | op::SERVICE_ACTION_IN16
        | op::MAINTENANCE_IN
        | op::LOG_SENSE
        | op::PREVENT_ALLOW => Access::Always,
        op::READ6
        | op::READ10
        | op::READ12
        | op::READ16
        | op::VERIFY10
        | op::VERIFY12
        | op::VERIFY16
        | op::MODE_SENSE6
        | op::MODE_SENSE10
        | op::PREFETCH10
        | op::PREFETCH16
        | op::READ_DEFECT10
        | op::READ_DEFECT12 => Access::Read,
        _ => Access::Write,
    }
}
