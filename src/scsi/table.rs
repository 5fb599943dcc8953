//! One target's LUNs (to be implemented): REPORT LUNS on any LUN, LUN-not-supported answers.
use super::{LogicalUnit, Nexus, ResetKind, ScsiResult, Transfer};
use std::collections::BTreeMap;
use std::sync::Arc;

pub struct LunTable {
    pub luns: BTreeMap<u16, Arc<LogicalUnit>>,
}

impl LunTable {
    pub fn new(luns: BTreeMap<u16, Arc<LogicalUnit>>) -> Self {
        LunTable { luns }
    }

    /// `lun` is the 8-byte SAM LUN from the PDU.
    pub fn transfer(&self, lun: u64, cdb: &[u8]) -> Result<Transfer, ScsiResult> {
        let _ = (lun, cdb);
        todo!()
    }

    pub fn execute(&self, nexus: &Nexus, lun: u64, cdb: &[u8], data_out: &[u8]) -> ScsiResult {
        let _ = (nexus, lun, cdb, data_out);
        todo!()
    }

    /// Returns false if the LUN does not exist (TMF response 2).
    pub fn reset(&self, nexus: &Nexus, lun: Option<u64>, kind: ResetKind) -> bool {
        let _ = (nexus, lun, kind);
        todo!()
    }

    pub fn nexus_lost(&self, nexus: &Nexus) {
        for lu in self.luns.values() {
            lu.nexus_lost(nexus);
        }
    }
}
