//! Typed PDUs (RFC 7143 §11). Field names follow the RFC. Sequence numbers are raw `u32`
//! (serial-number arithmetic, RFC 1982, is the session layer's business).

use bytes::Bytes;

/// Opcodes (RFC 7143 §11.2.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    NopOut = 0x00,
    ScsiCommand = 0x01,
    TaskMgmtRequest = 0x02,
    LoginRequest = 0x03,
    TextRequest = 0x04,
    DataOut = 0x05,
    LogoutRequest = 0x06,
    SnackRequest = 0x10,
    NopIn = 0x20,
    ScsiResponse = 0x21,
    TaskMgmtResponse = 0x22,
    LoginResponse = 0x23,
    TextResponse = 0x24,
    DataIn = 0x25,
    LogoutResponse = 0x26,
    R2t = 0x31,
    AsyncMessage = 0x32,
    Reject = 0x3f,
}

/// One PDU: its typed Basic Header Segment plus its data segment (without padding/digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: Bhs,
    pub data: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bhs {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    SnackRequest(SnackRequest),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

/// §11.18 NOP-Out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Task attributes (§11.3.1, SAM).
pub mod task_attr {
    pub const UNTAGGED: u8 = 0;
    pub const SIMPLE: u8 = 1;
    pub const ORDERED: u8 = 2;
    pub const HEAD_OF_QUEUE: u8 = 3;
    pub const ACA: u8 = 4;
}

/// §11.3 SCSI Command. `cdb` is the whole CDB: the 16 BHS bytes, extended by the
/// Extended-CDB AHS when present (§11.2.2.3; then its length is 16 + AHS CDB length).
/// Trailing padding of a 16-byte CDB is kept; the SCSI layer reads what the opcode needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub expected_data_transfer_length: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: Vec<u8>,
    /// Bidirectional Read Expected Data Transfer Length AHS (§11.2.2.4).
    pub bidi_read_length: Option<u32>,
}

/// §11.5 Task Management Function Request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    /// §11.5.1: 1 ABORT TASK, 2 ABORT TASK SET, 3 CLEAR ACA, 4 CLEAR TASK SET,
    /// 5 LOGICAL UNIT RESET, 6 TARGET WARM RESET, 7 TARGET COLD RESET, 8 TASK REASSIGN.
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    pub referenced_task_tag: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

/// §11.12 Login Request. (The I bit is always 1 for a Login Request.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    /// Current Stage: 0 security, 1 operational, 3 full feature.
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// §11.10 Text Request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// §11.7 SCSI Data-Out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

/// §11.14 Logout Request. reason: 0 close session, 1 close connection, 2 remove connection
/// for recovery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// §11.16 SNACK Request. snack_type: 0 Data/R2T, 1 Status, 2 DataACK, 3 R-Data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnackRequest {
    pub snack_type: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

/// §11.19 NOP-In.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// §11.4 SCSI Response. The data segment (if any) is SenseLength(2 bytes) + sense data
/// (§11.4.7); building it is the session layer's business.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScsiResponse {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// §11.4.3: 0x00 command completed at target, 0x01 target failure.
    pub response: u8,
    pub status: u8,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    pub bidi_read_residual_count: u32,
    pub residual_count: u32,
}

/// §11.6 Task Management Function Response. response (§11.6.1): 0 complete, 1 task does not
/// exist, 2 LUN does not exist, 3 task still allegiant, 4 reassignment unsupported,
/// 5 function not supported, 6 authorization failed, 255 rejected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// §11.13 Login Response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
}

/// §11.11 Text Response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextResponse {
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// §11.7 SCSI Data-In. When `status_present` (S bit) is set, `final_` must be set too and
/// `status`, `stat_sn` and the residual fields are valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataIn {
    pub final_: bool,
    pub ack: bool,
    pub overflow: bool,
    pub underflow: bool,
    pub status_present: bool,
    pub status: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub residual_count: u32,
}

/// §11.15 Logout Response. response: 0 closed, 1 CID not found, 2 recovery unsupported,
/// 3 cleanup failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogoutResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

/// §11.8 Ready To Transfer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_data_transfer_length: u32,
}

/// §11.9 Asynchronous Message. async_event 1 = target requests logout (parameter3 =
/// Time2Wait for the logout).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: u64,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub async_event: u8,
    pub async_vcode: u8,
    pub parameter1: u16,
    pub parameter2: u16,
    pub parameter3: u16,
}

/// Reject reasons (§11.17.1).
pub mod reject_reason {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const LONG_OP_REJECT: u8 = 0x0a;
    pub const NEGOTIATION_RESET: u8 = 0x0b;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// §11.17 Reject. The data segment carries the rejected PDU's 48-byte header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reject {
    pub reason: u8,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn_or_r2t_sn: u32,
}

impl Bhs {
    pub fn opcode(&self) -> Opcode {
        match self {
            Bhs::NopOut(_) => Opcode::NopOut,
            Bhs::ScsiCommand(_) => Opcode::ScsiCommand,
            Bhs::TaskMgmtRequest(_) => Opcode::TaskMgmtRequest,
            Bhs::LoginRequest(_) => Opcode::LoginRequest,
            Bhs::TextRequest(_) => Opcode::TextRequest,
            Bhs::DataOut(_) => Opcode::DataOut,
            Bhs::LogoutRequest(_) => Opcode::LogoutRequest,
            Bhs::SnackRequest(_) => Opcode::SnackRequest,
            Bhs::NopIn(_) => Opcode::NopIn,
            Bhs::ScsiResponse(_) => Opcode::ScsiResponse,
            Bhs::TaskMgmtResponse(_) => Opcode::TaskMgmtResponse,
            Bhs::LoginResponse(_) => Opcode::LoginResponse,
            Bhs::TextResponse(_) => Opcode::TextResponse,
            Bhs::DataIn(_) => Opcode::DataIn,
            Bhs::LogoutResponse(_) => Opcode::LogoutResponse,
            Bhs::R2t(_) => Opcode::R2t,
            Bhs::AsyncMessage(_) => Opcode::AsyncMessage,
            Bhs::Reject(_) => Opcode::Reject,
        }
    }
}

/// SAM LUN encoding (SAM-5 §4.7): peripheral addressing below 256, flat space above.
pub fn lun_from_index(index: u16) -> u64 {
    if index < 256 {
        (index as u64) << 48
    } else {
        (0x4000 | (index as u64 & 0x3fff)) << 48
    }
}

/// Inverse of [`lun_from_index`]; `None` for address methods we do not serve.
pub fn lun_to_index(lun: u64) -> Option<u16> {
    let hi = (lun >> 48) as u16;
    if lun & 0x0000_ffff_ffff_ffff != 0 {
        return None;
    }
    match hi >> 14 {
        0 if hi >> 8 == 0 => Some(hi & 0xff),
        1 => Some(hi & 0x3fff),
        _ => None,
    }
}

impl Opcode {
    /// The opcode in the low 6 bits of BHS byte 0 (§11.2.1.2), if RFC 7143 defines it.
    /// Vendor-specific opcodes (0x1c-0x1e, 0x3c-0x3e) are not served and map to `None`.
    pub fn from_u8(v: u8) -> Option<Opcode> {
        Some(match v & 0x3f {
            0x00 => Opcode::NopOut,
            0x01 => Opcode::ScsiCommand,
            0x02 => Opcode::TaskMgmtRequest,
            0x03 => Opcode::LoginRequest,
            0x04 => Opcode::TextRequest,
            0x05 => Opcode::DataOut,
            0x06 => Opcode::LogoutRequest,
            0x10 => Opcode::SnackRequest,
            0x20 => Opcode::NopIn,
            0x21 => Opcode::ScsiResponse,
            0x22 => Opcode::TaskMgmtResponse,
            0x23 => Opcode::LoginResponse,
            0x24 => Opcode::TextResponse,
            0x25 => Opcode::DataIn,
            0x26 => Opcode::LogoutResponse,
            0x31 => Opcode::R2t,
            0x32 => Opcode::AsyncMessage,
            0x3f => Opcode::Reject,
            _ => return None,
        })
    }

    /// True for opcodes an initiator sends (§11.2.1.2: target opcodes have bit 5 set).
    pub fn is_initiator(self) -> bool {
        (self as u8) & 0x20 == 0
    }
}

impl Bhs {
    /// Initiator Task Tag (BHS bytes 16..20). Async Message and Reject carry the reserved
    /// 0xffffffff (§11.9, §11.17).
    pub fn itt(&self) -> u32 {
        match self {
            Bhs::NopOut(p) => p.itt,
            Bhs::ScsiCommand(p) => p.itt,
            Bhs::TaskMgmtRequest(p) => p.itt,
            Bhs::LoginRequest(p) => p.itt,
            Bhs::TextRequest(p) => p.itt,
            Bhs::DataOut(p) => p.itt,
            Bhs::LogoutRequest(p) => p.itt,
            Bhs::SnackRequest(p) => p.itt,
            Bhs::NopIn(p) => p.itt,
            Bhs::ScsiResponse(p) => p.itt,
            Bhs::TaskMgmtResponse(p) => p.itt,
            Bhs::LoginResponse(p) => p.itt,
            Bhs::TextResponse(p) => p.itt,
            Bhs::DataIn(p) => p.itt,
            Bhs::LogoutResponse(p) => p.itt,
            Bhs::R2t(p) => p.itt,
            Bhs::AsyncMessage(_) | Bhs::Reject(_) => 0xffff_ffff,
        }
    }

    /// The I bit (§11.2.1.1): the command is delivered immediately, outside CmdSN order.
    /// Always true for a Login Request (§11.12); false for PDUs that have no I bit.
    pub fn immediate(&self) -> bool {
        match self {
            Bhs::NopOut(p) => p.immediate,
            Bhs::ScsiCommand(p) => p.immediate,
            Bhs::TaskMgmtRequest(p) => p.immediate,
            Bhs::TextRequest(p) => p.immediate,
            Bhs::LogoutRequest(p) => p.immediate,
            Bhs::LoginRequest(_) => true,
            _ => false,
        }
    }

    /// CmdSN of an initiator command PDU (§4.2.2.1); `None` for PDUs that carry none
    /// (Data-Out, SNACK and everything a target sends).
    pub fn cmd_sn(&self) -> Option<u32> {
        match self {
            Bhs::NopOut(p) => Some(p.cmd_sn),
            Bhs::ScsiCommand(p) => Some(p.cmd_sn),
            Bhs::TaskMgmtRequest(p) => Some(p.cmd_sn),
            Bhs::LoginRequest(p) => Some(p.cmd_sn),
            Bhs::TextRequest(p) => Some(p.cmd_sn),
            Bhs::LogoutRequest(p) => Some(p.cmd_sn),
            _ => None,
        }
    }

    /// ExpStatSN acknowledged by an initiator PDU; `None` on target PDUs.
    pub fn exp_stat_sn(&self) -> Option<u32> {
        match self {
            Bhs::NopOut(p) => Some(p.exp_stat_sn),
            Bhs::ScsiCommand(p) => Some(p.exp_stat_sn),
            Bhs::TaskMgmtRequest(p) => Some(p.exp_stat_sn),
            Bhs::LoginRequest(p) => Some(p.exp_stat_sn),
            Bhs::TextRequest(p) => Some(p.exp_stat_sn),
            Bhs::DataOut(p) => Some(p.exp_stat_sn),
            Bhs::LogoutRequest(p) => Some(p.exp_stat_sn),
            Bhs::SnackRequest(p) => Some(p.exp_stat_sn),
            _ => None,
        }
    }
}

impl Pdu {
    /// A PDU without a data segment.
    pub fn header_only(bhs: Bhs) -> Pdu {
        Pdu {
            bhs,
            data: Bytes::new(),
        }
    }
}
