//! CDB field access and the table of supported commands (opcode, service action, CDB length,
//! CDB usage map). The usage map is both what REPORT SUPPORTED OPERATION CODES returns
//! (SPC-4 §6.35.4) and what [`check_usage`] enforces: a set bit the map does not allow is a
//! reserved field, answered with INVALID FIELD IN CDB and a field pointer (SPC-4 §4.5.2.4.2).
use super::sense::{Sense, INVALID_OPCODE};

/// Big-endian field of `n` bytes at `off`; 0 beyond the slice (callers check CDB length first).
pub fn be(cdb: &[u8], off: usize, n: usize) -> u64 {
    (0..n).fold(0u64, |acc, i| {
        (acc << 8) | u64::from(cdb.get(off + i).copied().unwrap_or(0))
    })
}

pub fn byte(cdb: &[u8], off: usize) -> u8 {
    cdb.get(off).copied().unwrap_or(0)
}

/// WRITE(6/10/12/16) without FUA (SBC-4 §5.40-5.43: FUA is byte 1 bit 3 of WRITE(10/12/16);
/// WRITE(6) has none): the writes a connection may hand down together
/// (`LogicalUnit::execute_writes`).
pub fn plain_write(cdb: &[u8]) -> bool {
    match byte(cdb, 0) {
        op::WRITE6 => true,
        op::WRITE10 | op::WRITE12 | op::WRITE16 => byte(cdb, 1) & 0x08 == 0,
        _ => false,
    }
}

/// One supported command.
pub struct CmdInfo {
    pub opcode: u8,
    /// Service action, for opcodes that have them.
    pub sa: Option<u8>,
    /// CDB usage map; its length is the CDB length.
    pub usage: std::borrow::Cow<'static, [u8]>,
    /// Nominal and recommended timeouts in seconds (RCTD timeouts descriptor).
    pub timeout: u32,
}

const fn c(opcode: u8, usage: &'static [u8]) -> CmdInfo {
    CmdInfo {
        opcode,
        sa: None,
        usage: std::borrow::Cow::Borrowed(usage),
        timeout: 30,
    }
}
const fn s(opcode: u8, sa: u8, usage: &'static [u8]) -> CmdInfo {
    CmdInfo {
        opcode,
        sa: Some(sa),
        usage: std::borrow::Cow::Borrowed(usage),
        timeout: 30,
    }
}

pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ6: u8 = 0x08;
    pub const WRITE6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT6: u8 = 0x15;
    pub const RESERVE6: u8 = 0x16;
    pub const RELEASE6: u8 = 0x17;
    pub const MODE_SENSE6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY10: u8 = 0x25;
    pub const READ10: u8 = 0x28;
    pub const WRITE10: u8 = 0x2a;
    pub const WRITE_VERIFY10: u8 = 0x2e;
    pub const VERIFY10: u8 = 0x2f;
    pub const PREFETCH10: u8 = 0x34;
    pub const SYNC_CACHE10: u8 = 0x35;
    pub const READ_DEFECT10: u8 = 0x37;
    pub const WRITE_SAME10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT10: u8 = 0x55;
    pub const MODE_SENSE10: u8 = 0x5a;
    pub const PR_IN: u8 = 0x5e;
    pub const PR_OUT: u8 = 0x5f;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const READ16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE16: u8 = 0x8a;
    pub const ORWRITE16: u8 = 0x8b;
    pub const WRITE_VERIFY16: u8 = 0x8e;
    pub const VERIFY16: u8 = 0x8f;
    pub const PREFETCH16: u8 = 0x90;
    pub const SYNC_CACHE16: u8 = 0x91;
    pub const WRITE_SAME16: u8 = 0x93;
    pub const WRITE_ATOMIC16: u8 = 0x9c;
    pub const SERVICE_ACTION_IN16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ12: u8 = 0xa8;
    pub const WRITE12: u8 = 0xaa;
    pub const WRITE_VERIFY12: u8 = 0xae;
    pub const VERIFY12: u8 = 0xaf;
    pub const SANITIZE: u8 = 0x48;
    pub const LOG_SENSE: u8 = 0x4d;
    /// SANITIZE service actions (SBC-4 §5.30).
    pub const SA_OVERWRITE: u8 = 0x01;
    pub const SA_BLOCK_ERASE: u8 = 0x02;
    pub const SA_CRYPTO_ERASE: u8 = 0x03;
    pub const SA_EXIT_FAILURE_MODE: u8 = 0x1f;
    pub const READ_DEFECT12: u8 = 0xb7;
    /// SERVICE ACTION IN(16) service actions.
    pub const SA_READ_CAPACITY16: u8 = 0x10;
    pub const SA_GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN service actions.
    pub const SA_REPORT_OPCODES: u8 = 0x0c;
    pub const SA_REPORT_TARGET_PORT_GROUPS: u8 = 0x0a;
}

const FF: u8 = 0xff;

/// Every command this LU implements, in opcode order.
pub static COMMANDS: &[CmdInfo] = &[
    c(op::TEST_UNIT_READY, &[FF, 0, 0, 0, 0, 0]),
    c(op::REQUEST_SENSE, &[FF, 0x01, 0, 0, FF, 0]),
    c(op::READ6, &[FF, 0x1f, FF, FF, FF, 0]),
    c(op::WRITE6, &[FF, 0x1f, FF, FF, FF, 0]),
    c(op::INQUIRY, &[FF, 0x01, FF, FF, FF, 0]),
    c(op::MODE_SELECT6, &[FF, 0x11, 0, 0, FF, 0]),
    c(op::RESERVE6, &[FF, 0, 0, 0, 0, 0]),
    c(op::RELEASE6, &[FF, 0, 0, 0, 0, 0]),
    c(op::MODE_SENSE6, &[FF, 0x08, FF, FF, FF, 0]),
    c(op::START_STOP_UNIT, &[FF, 0x01, 0, 0x0f, 0xf7, 0]),
    c(op::PREVENT_ALLOW, &[FF, 0, 0, 0, 0x03, 0]),
    c(op::READ_CAPACITY10, &[FF, 0, FF, FF, FF, FF, 0, 0, 0x01, 0]),
    c(op::READ10, &[FF, 0xfa, FF, FF, FF, FF, 0x1f, FF, FF, 0]),
    c(op::WRITE10, &[FF, 0xfa, FF, FF, FF, FF, 0x1f, FF, FF, 0]),
    c(
        op::WRITE_VERIFY10,
        &[FF, 0xf6, FF, FF, FF, FF, 0x1f, FF, FF, 0],
    ),
    c(op::VERIFY10, &[FF, 0xf6, FF, FF, FF, FF, 0x1f, FF, FF, 0]),
    c(op::PREFETCH10, &[FF, 0x02, FF, FF, FF, FF, 0x1f, FF, FF, 0]),
    c(
        op::SYNC_CACHE10,
        &[FF, 0x06, FF, FF, FF, FF, 0x1f, FF, FF, 0],
    ),
    c(op::READ_DEFECT10, &[FF, 0, 0x1f, 0, 0, 0, 0, FF, FF, 0]),
    c(
        op::WRITE_SAME10,
        &[FF, 0xe8, FF, FF, FF, FF, 0x1f, FF, FF, 0],
    ),
    c(op::UNMAP, &[FF, 0, 0, 0, 0, 0, 0x1f, FF, FF, 0]),
    s(
        op::SANITIZE,
        op::SA_OVERWRITE,
        &[FF, 0xbf, 0, 0, 0, 0, 0, FF, FF, 0],
    ),
    s(
        op::SANITIZE,
        op::SA_BLOCK_ERASE,
        &[FF, 0xbf, 0, 0, 0, 0, 0, FF, FF, 0],
    ),
    s(
        op::SANITIZE,
        op::SA_CRYPTO_ERASE,
        &[FF, 0xbf, 0, 0, 0, 0, 0, FF, FF, 0],
    ),
    s(
        op::SANITIZE,
        op::SA_EXIT_FAILURE_MODE,
        &[FF, 0xbf, 0, 0, 0, 0, 0, FF, FF, 0],
    ),
    c(op::LOG_SENSE, &[FF, 0, FF, FF, 0, FF, FF, FF, FF, 0]),
    c(op::MODE_SELECT10, &[FF, 0x11, 0, 0, 0, 0, 0, FF, FF, 0]),
    c(op::MODE_SENSE10, &[FF, 0x18, FF, FF, 0, 0, 0, FF, FF, 0]),
    s(op::PR_IN, 0x00, &[FF, 0x1f, 0, 0, 0, 0, 0, FF, FF, 0]),
    s(op::PR_IN, 0x01, &[FF, 0x1f, 0, 0, 0, 0, 0, FF, FF, 0]),
    s(op::PR_IN, 0x02, &[FF, 0x1f, 0, 0, 0, 0, 0, FF, FF, 0]),
    s(op::PR_IN, 0x03, &[FF, 0x1f, 0, 0, 0, 0, 0, FF, FF, 0]),
    s(op::PR_OUT, 0x00, &[FF, 0x1f, FF, 0, 0, FF, FF, FF, FF, 0]),
    s(op::PR_OUT, 0x01, &[FF, 0x1f, FF, 0, 0, FF, FF, FF, FF, 0]),
    s(op::PR_OUT, 0x02, &[FF, 0x1f, FF, 0, 0, FF, FF, FF, FF, 0]),
    s(op::PR_OUT, 0x03, &[FF, 0x1f, FF, 0, 0, FF, FF, FF, FF, 0]),
    s(op::PR_OUT, 0x04, &[FF, 0x1f, FF, 0, 0, FF, FF, FF, FF, 0]),
    s(op::PR_OUT, 0x05, &[FF, 0x1f, FF, 0, 0, FF, FF, FF, FF, 0]),
    s(op::PR_OUT, 0x06, &[FF, 0x1f, FF, 0, 0, FF, FF, FF, FF, 0]),
    s(
        op::EXTENDED_COPY,
        0x00,
        &[FF, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0],
    ),
    s(
        op::RECEIVE_COPY_RESULTS,
        0x00,
        &[FF, 0x1f, FF, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0],
    ),
    s(
        op::RECEIVE_COPY_RESULTS,
        0x03,
        &[FF, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0],
    ),
    c(
        op::READ16,
        &[
            FF, 0xfa, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1f, 0,
        ],
    ),
    c(
        op::COMPARE_AND_WRITE,
        &[
            FF, 0xfa, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, 0, FF, 0x1f, 0,
        ],
    ),
    c(
        op::WRITE16,
        &[
            FF, 0xfa, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1f, 0,
        ],
    ),
    c(
        op::ORWRITE16,
        &[
            FF, 0xfa, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1f, 0,
        ],
    ),
    c(
        op::WRITE_VERIFY16,
        &[
            FF, 0xf6, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1f, 0,
        ],
    ),
    c(
        op::VERIFY16,
        &[
            FF, 0xf6, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1f, 0,
        ],
    ),
    c(
        op::PREFETCH16,
        &[
            FF, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1f, 0,
        ],
    ),
    c(
        op::SYNC_CACHE16,
        &[
            FF, 0x06, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1f, 0,
        ],
    ),
    c(
        op::WRITE_SAME16,
        &[
            FF, 0xe9, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1f, 0,
        ],
    ),
    c(
        op::WRITE_ATOMIC16,
        &[
            FF, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, FF, FF, 0x1f, 0,
        ],
    ),
    s(
        op::SERVICE_ACTION_IN16,
        op::SA_READ_CAPACITY16,
        &[
            FF, 0x1f, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x01, 0,
        ],
    ),
    s(
        op::SERVICE_ACTION_IN16,
        op::SA_GET_LBA_STATUS,
        &[
            FF, 0x1f, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0,
        ],
    ),
    c(op::REPORT_LUNS, &[FF, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, 0]),
    s(
        op::MAINTENANCE_IN,
        op::SA_REPORT_TARGET_PORT_GROUPS,
        &[FF, 0xff, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0],
    ),
    s(
        op::MAINTENANCE_IN,
        op::SA_REPORT_OPCODES,
        &[FF, 0x1f, 0x87, FF, FF, FF, FF, FF, FF, FF, 0, 0],
    ),
    c(
        op::READ12,
        &[FF, 0xfa, FF, FF, FF, FF, FF, FF, FF, FF, 0x1f, 0],
    ),
    c(
        op::WRITE12,
        &[FF, 0xfa, FF, FF, FF, FF, FF, FF, FF, FF, 0x1f, 0],
    ),
    c(
        op::WRITE_VERIFY12,
        &[FF, 0xf6, FF, FF, FF, FF, FF, FF, FF, FF, 0x1f, 0],
    ),
    c(
        op::VERIFY12,
        &[FF, 0xf6, FF, FF, FF, FF, FF, FF, FF, FF, 0x1f, 0],
    ),
    c(
        op::READ_DEFECT12,
        &[FF, 0x1f, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0],
    ),
];

/// Whether an opcode carries a service action in byte 1 (bits 4-0).
pub fn has_service_action(opcode: u8) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.opcode == opcode && c.sa.is_some())
}

/// Find the table entry for a CDB. Unknown opcode: INVALID COMMAND OPERATION CODE; known
/// opcode with unknown service action: INVALID FIELD IN CDB pointing at byte 1.
pub fn lookup(cdb: &[u8]) -> Result<&'static CmdInfo, Sense> {
    let opcode = *cdb.first().ok_or(INVALID_OPCODE)?;
    let sa = byte(cdb, 1) & 0x1f;
    let mut any = false;
    for c in COMMANDS.iter().filter(|c| c.opcode == opcode) {
        any = true;
        match c.sa {
            None => return Ok(c),
            Some(x) if x == sa => return Ok(c),
            _ => {}
        }
    }
    if any {
        Err(Sense::invalid_cdb_field(1, Some(4)))
    } else {
        Err(INVALID_OPCODE)
    }
}

/// Reject set bits outside the usage map (reserved fields), pointing at the first one.
pub fn check_usage(info: &CmdInfo, cdb: &[u8]) -> Result<(), Sense> {
    if cdb.len() < info.usage.len() {
        return Err(Sense::invalid_cdb_field(0, None));
    }
    for (i, (&m, &b)) in info.usage.iter().zip(cdb.iter()).enumerate() {
        let bad = b & !m;
        if bad != 0 {
            let bit = 7 - bad.leading_zeros() as u8;
            return Err(Sense::invalid_cdb_field(i as u16, Some(bit)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_maps_lead_with_opcode_and_sa() {
        for c in COMMANDS {
            assert_eq!(c.usage[0], 0xff);
            assert!(matches!(c.usage.len(), 6 | 10 | 12 | 16));
        }
        assert!(lookup(&[0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_ok());
        assert_eq!(lookup(&[0xff]).err(), Some(INVALID_OPCODE));
        assert!(lookup(&[0x9e, 0x11]).is_err());
    }

    #[test]
    fn reserved_bits_are_pointed_at() {
        let info = lookup(&[0x00]).ok().unwrap();
        let e = check_usage(info, &[0, 0, 0, 0, 0x20, 0]).err().unwrap();
        assert_eq!(e.sks, Some([0xc8 | 5, 0, 4]));
    }
}
