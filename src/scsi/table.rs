//! One target's LUNs: REPORT LUNS on any LUN, LUN-not-supported answers (SPC-4 §6.33, SAM-5
//! §5.9 / SPC-4 §6.6.2 for the peripheral qualifier of a LUN that is not there).
use super::cdb::{be, byte, op};
use super::lun::check_result;
use super::sense::{Sense, LU_NOT_SUPPORTED};
use super::{status, LogicalUnit, Nexus, ResetKind, ScsiResult, Transfer};
use crate::pdu::{lun_from_index, lun_to_index};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;

pub struct LunTable {
    pub luns: BTreeMap<u16, Arc<LogicalUnit>>,
}

impl LunTable {
    pub fn new(luns: BTreeMap<u16, Arc<LogicalUnit>>) -> Self {
        LunTable { luns }
    }

    fn get(&self, lun: u64) -> Option<&Arc<LogicalUnit>> {
        lun_to_index(lun).and_then(|i| self.luns.get(&i))
    }

    /// The logical unit at `lun` (the 8-byte SAM LUN from the PDU).
    pub fn unit(&self, lun: u64) -> Option<Arc<LogicalUnit>> {
        self.get(lun).cloned()
    }

    /// `lun` is the 8-byte SAM LUN from the PDU.
    pub fn transfer(&self, lun: u64, cdb: &[u8]) -> Result<Transfer, ScsiResult> {
        let opcode = byte(cdb, 0);
        if opcode == op::REPORT_LUNS {
            return Ok(Transfer::In(be(cdb, 6, 4) as u32));
        }
        match self.get(lun) {
            Some(lu) => lu.transfer(cdb),
            None => match opcode {
                op::INQUIRY => Ok(Transfer::In(be(cdb, 3, 2) as u32)),
                op::REQUEST_SENSE => Ok(Transfer::In(u32::from(byte(cdb, 4)))),
                _ => Err(check_result(LU_NOT_SUPPORTED, false)),
            },
        }
    }

    /// Task management for `lun` (None: every LUN): commands that wait for a long
    /// operation (SANITIZE with IMMED = 0) stop waiting, so the abort completes now.
    pub fn release_waiting(&self, lun: Option<u64>) {
        match lun {
            Some(l) => {
                if let Some(lu) = self.get(l) {
                    lu.release_waiting();
                }
            }
            None => self.luns.values().for_each(|lu| lu.release_waiting()),
        }
    }

    /// Whether `edtl` bytes of Data-Out may go with this CDB. READ/WRITE-family commands take
    /// min(EDTL, transfer length) (FCP-4 §9.4.2), but WRITE SAME's single block and COMPARE
    /// AND WRITE's verify + write blocks are one unit each: more Data-Out than the CDB
    /// describes is refused with 05/0E/03 INVALID FIELD IN COMMAND INFORMATION UNIT (SBC-4
    /// §5.3, §5.49), never silently cut.
    pub fn data_out_fits(
        &self,
        lun: u64,
        cdb: &[u8],
        edtl: u32,
        transfer: u32,
    ) -> Result<(), ScsiResult> {
        let exact = matches!(
            byte(cdb, 0),
            op::WRITE_SAME10 | op::WRITE_SAME16 | op::COMPARE_AND_WRITE
        );
        if !exact || edtl <= transfer || transfer == 0 {
            return Ok(());
        }
        let desc = self.get(lun).is_some_and(|lu| lu.descriptor_sense());
        Err(check_result(super::sense::INVALID_FIELD_IU, desc))
    }

    /// [`LogicalUnit::execute_writes`] on LUN `lun`: the results of `execute` on each of
    /// `cmds` (CDB, Data-Out) in turn.
    pub fn execute_writes(
        &self,
        nexus: &Nexus,
        lun: u64,
        cmds: &[(&[u8], &[u8])],
    ) -> Vec<ScsiResult> {
        match self.get(lun) {
            Some(lu) => lu.execute_writes(nexus, cmds),
            None => cmds
                .iter()
                .map(|&(cdb, data)| self.execute(nexus, lun, cdb, data))
                .collect(),
        }
    }

    pub fn execute(&self, nexus: &Nexus, lun: u64, cdb: &[u8], data_out: &[u8]) -> ScsiResult {
        let opcode = byte(cdb, 0);
        let lu = self.get(lun);
        if opcode == op::REPORT_LUNS {
            let desc = false;
            return match self.report_luns(cdb) {
                Ok(v) => ScsiResult {
                    status: status::GOOD,
                    data_in: Bytes::from(v),
                    data_file: None,
                    sense: None,
                    abort_nexuses: Vec::new(),
                },
                Err(s) => check_result(s, desc),
            };
        }
        if let Some(lu) = lu {
            return lu.execute(nexus, cdb, data_out);
        }
        match opcode {
            op::INQUIRY => {
                if byte(cdb, 1) & 1 != 0 || byte(cdb, 2) != 0 {
                    return check_result(LU_NOT_SUPPORTED, false);
                }
                // Peripheral qualifier 011b, device type 1Fh: no LU here (SPC-4 §6.6.2).
                let mut v = vec![0u8; 36];
                v[0] = 0x7f;
                v[2] = 0x06;
                v[3] = 0x12;
                v[4] = 31;
                v.truncate(be(cdb, 3, 2) as usize);
                ScsiResult {
                    status: status::GOOD,
                    data_in: Bytes::from(v),
                    data_file: None,
                    sense: None,
                    abort_nexuses: Vec::new(),
                }
            }
            op::REQUEST_SENSE => {
                let mut v = LU_NOT_SUPPORTED.encode(byte(cdb, 1) & 1 != 0).to_vec();
                v.truncate(byte(cdb, 4) as usize);
                ScsiResult {
                    status: status::GOOD,
                    data_in: Bytes::from(v),
                    data_file: None,
                    sense: None,
                    abort_nexuses: Vec::new(),
                }
            }
            _ => check_result(LU_NOT_SUPPORTED, false),
        }
    }

    /// REPORT LUNS (SPC-4 §6.33).
    fn report_luns(&self, cdb: &[u8]) -> Result<Vec<u8>, Sense> {
        if let Some((i, _)) = [0xffu8, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0]
            .iter()
            .zip(cdb.iter())
            .enumerate()
            .find(|(_, (m, b))| **b & !**m != 0)
        {
            return Err(Sense::invalid_cdb_field(i as u16, None));
        }
        let select = byte(cdb, 2);
        let alloc = be(cdb, 6, 4) as usize;
        if alloc < 16 {
            return Err(Sense::invalid_cdb_field(6, None));
        }
        let luns: Vec<u64> = match select {
            0 | 2 => self.luns.keys().map(|&i| lun_from_index(i)).collect(),
            // Well-known LUNs only: we have none.
            1 => Vec::new(),
            _ => return Err(Sense::invalid_cdb_field(2, None)),
        };
        let mut v = Vec::with_capacity(8 + 8 * luns.len());
        v.extend_from_slice(&((luns.len() * 8) as u32).to_be_bytes());
        v.extend_from_slice(&[0; 4]);
        for l in luns {
            v.extend_from_slice(&l.to_be_bytes());
        }
        v.truncate(alloc);
        Ok(v)
    }

    /// Returns false if the LUN does not exist (TMF response 2).
    pub fn reset(&self, nexus: &Nexus, lun: Option<u64>, kind: ResetKind) -> bool {
        match lun {
            Some(l) => match self.get(l) {
                Some(lu) => {
                    lu.reset(nexus, kind);
                    true
                }
                None => false,
            },
            None => {
                for lu in self.luns.values() {
                    lu.reset(nexus, kind);
                }
                true
            }
        }
    }

    pub fn nexus_lost(&self, nexus: &Nexus) {
        for lu in self.luns.values() {
            lu.nexus_lost(nexus);
        }
    }
}
