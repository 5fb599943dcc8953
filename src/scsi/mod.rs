//! SCSI block device (SPC-4, SBC-3), independent of iSCSI: CDBs and data in, status, sense and
//! data out. A [`LunTable`] is one target's logical units; each [`LogicalUnit`] serves one
//! [`BlockStore`](crate::storage::BlockStore).
//!
//! Transport contract: call [`LunTable::transfer`] with the CDB to learn how much Data-Out to
//! collect (or Data-In to expect), then [`LunTable::execute`] with what arrived. When the
//! transport's expected length cut a WRITE's Data-Out short (FCP-4 §9.4.2: data beyond the
//! EDTL is not transferred), the whole blocks received are written and the transport reports
//! the residual; other commands refuse a short Data-Out with 05/0E/03 INVALID FIELD IN
//! COMMAND INFORMATION UNIT; the transport truncates longer Data-Out itself. Call
//! [`LunTable::reset`] for LOGICAL UNIT RESET / TARGET WARM/COLD RESET and
//! [`LunTable::nexus_lost`] when a session ends so RESERVE(6), PREVENT and unit attentions of
//! that nexus go away.
//!
//! Files: `cdb` (command table, usage maps, reserved-bit checks), `sense`, `lun` (state and
//! block commands), `spc` (INQUIRY/VPD, mode pages, REPORT SUPPORTED OPERATION CODES), `pr`
//! (persistent reservations), `xcopy` (EXTENDED COPY), `table` (REPORT LUNS, absent LUNs).

use bytes::Bytes;

/// SCSI status codes (SAM-5 §5.3).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const ACA_ACTIVE: u8 = 0x30;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// One I_T nexus as the SCSI layer sees it (SAM-5 §4.6). The transport creates one per
/// session and tells the LUNs when it is lost.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// Unique for the lifetime of the process.
    pub id: u64,
    /// Initiator port name: for iSCSI "InitiatorName,i,0xISID" (RFC 7143 §4.2.7.1 / SPC-4
    /// TransportID format 01b).
    pub initiator_port: String,
    /// Initiator device name (iSCSI InitiatorName), for PERSISTENT RESERVE TransportIDs.
    pub initiator_name: String,
    /// Relative target port identifier (VPD 0x83, PR).
    pub relative_port: u16,
    /// Target port name: for iSCSI "TargetName,t,0xTPGT" (RFC 7143 §4.2.7.1), the SCSI name
    /// string of the target port in VPD 0x83 (SPC-4 §7.8.6.11). Empty: not reported.
    pub target_port: String,
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResult {
    pub status: u8,
    /// Data for the initiator (already limited by the CDB's allocation/transfer length; the
    /// transport truncates further to its expected transfer length and reports residuals).
    pub data_in: Bytes,
    /// Instead of `data_in` (then empty): the data lie in this range of a file, all in the
    /// page cache, for the transport to send with `sendfile(2)`. Only READs of at least
    /// 64 KiB, and only inside [`crate::storage::with_file_slices`].
    pub data_file: Option<crate::storage::FileSlice>,
    /// Sense data (fixed or descriptor format) when status is CHECK CONDITION.
    pub sense: Option<Bytes>,
    /// I_T nexuses (ids) whose tasks on this logical unit the transport must abort before it
    /// delivers this result: PERSISTENT RESERVE OUT with PREEMPT AND ABORT (SPC-4
    /// §5.13.11.2.6, r37 §5.9.11.5). With TAS = 0 (our control mode page) the aborted
    /// commands get no status; the transport then calls
    /// [`LogicalUnit::commands_cleared`] for the nexuses that had commands aborted.
    pub abort_nexuses: Vec<u64>,
}

impl ScsiResult {
    /// Bytes of data for the initiator, in memory or in the file.
    pub fn data_len(&self) -> usize {
        match &self.data_file {
            Some(f) => f.len,
            None => self.data_in.len(),
        }
    }
}

/// Data direction and length a CDB implies, so the transport can collect Data-Out before
/// executing and compute residuals (SAM-5 §5.4.2: the CDB's length, not the transport's,
/// decides what the command transfers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    None,
    /// Up to this many bytes to the initiator.
    In(u32),
    /// Exactly this many bytes from the initiator.
    Out(u32),
}

/// Task management, as far as the SCSI layer is concerned (SAM-5 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetKind {
    LogicalUnit,
    TargetWarm,
    TargetCold,
}

pub mod cdb;
mod lun;
pub mod pr;
mod sanitize;
pub mod sense;
mod spc;
mod table;
mod xcopy;

pub use lun::{physical_exponent, LogicalUnit, LuIdentity, LuOptions, PrRestoreError};
pub use sense::Sense;
pub use table::LunTable;
