//! One logical unit (to be implemented).
use super::{Nexus, ResetKind, ScsiResult, Transfer};
use crate::storage::BlockStore;
use std::sync::Arc;

/// Identity a LUN reports in INQUIRY and VPD pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuIdentity {
    /// T10 vendor (8 chars), product (16), revision (4), space-padded on the wire.
    pub vendor: String,
    pub product: String,
    pub revision: String,
    /// Unit serial number (VPD 0x80).
    pub serial: String,
    /// NAA IEEE Registered Extended identifier (type 6, VPD 0x83), unique per LUN.
    pub naa: [u8; 16],
}

pub struct LogicalUnit {
    _private: (),
}

impl LogicalUnit {
    pub fn new(store: Arc<dyn BlockStore>, identity: LuIdentity) -> Self {
        let _ = (store, identity);
        todo!()
    }

    /// The transfer a CDB implies (for collecting Data-Out and residuals). Err = sense data
    /// for CHECK CONDITION (e.g. invalid opcode, invalid field in CDB).
    pub fn transfer(&self, cdb: &[u8]) -> Result<Transfer, ScsiResult> {
        let _ = cdb;
        todo!()
    }

    /// Execute one command. `data_out` is the Data-Out the initiator sent (possibly shorter
    /// than the CDB asked if the transport saw an underflow). Blocking: storage I/O happens here.
    pub fn execute(&self, nexus: &Nexus, cdb: &[u8], data_out: &[u8]) -> ScsiResult {
        let _ = (nexus, cdb, data_out);
        todo!()
    }

    /// A reset task management function reached this LU from `nexus`.
    pub fn reset(&self, nexus: &Nexus, kind: ResetKind) {
        let _ = (nexus, kind);
        todo!()
    }

    /// The I_T nexus is gone (session closed or reinstated): release RESERVE(6)
    /// reservations and forget its unit attentions. Persistent reservations survive.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let _ = nexus;
        todo!()
    }
}
