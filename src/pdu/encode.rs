//! Encoding: typed PDUs to wire bytes (RFC 7143 §11). Never allocates except to grow `out`.
use super::raw::{crc_with_pad, RawBhs, DIGEST_LEN};
use super::{Bhs, Digests, Pdu, BHS_LEN, MAX_WIRE_DATA_SEGMENT};
use bytes::{BufMut, BytesMut};

/// Encoded BHS (+ header digest). Derefs to the bytes to write.
#[derive(Clone, Copy)]
pub struct HeaderBuf {
    pub bytes: [u8; 52],
    pub len: usize,
}
impl std::ops::Deref for HeaderBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Padding to a 4-byte boundary plus the data digest, written after a data segment.
#[derive(Clone, Copy)]
pub struct Trailer {
    pub bytes: [u8; 7],
    pub len: usize,
}
impl std::ops::Deref for Trailer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Bytes of padding after a data segment of `n` bytes (§11.2: segments end on 4-byte words).
pub fn pad_len(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// AHSType values (§11.2.2.1; the AHS formats are §11.2.2.3-4).
pub(crate) const AHS_EXTENDED_CDB: u8 = 1;
pub(crate) const AHS_BIDI_READ_LENGTH: u8 = 2;

/// Longest CDB the Extended-CDB AHS can carry in this encoder: TotalAHSLength is one byte of
/// 4-byte words (1020 bytes), minus the Bidi AHS (8) and the Extended-CDB AHS header (4).
/// SPC-4 CDBs top out at 260 bytes, far below this.
pub const MAX_CDB_LEN: usize = 16 + 1020 - 8 - 4;

fn flag(b: bool, bit: u8) -> u8 {
    if b {
        bit
    } else {
        0
    }
}

fn immediate(b: bool) -> u8 {
    flag(b, 0x40)
}

fn be16_pair(hi: u16, lo: u16) -> u32 {
    ((hi as u32) << 16) | lo as u32
}

/// The 16 BHS CDB bytes (§11.3: shorter CDBs are zero-padded) as 4 words.
fn cdb_words(cdb: &[u8]) -> [u32; 4] {
    let mut b = [0u8; 16];
    let n = cdb.len().min(16);
    b[..n].copy_from_slice(&cdb[..n]);
    let mut w = [0u32; 4];
    for (i, chunk) in b.chunks_exact(4).enumerate() {
        w[i] = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    w
}

/// Login ISID (6 bytes) + TSIH (2 bytes) occupy bytes 8..16 (§11.12.5-6).
fn isid_tsih(isid: &[u8; 6], tsih: u16) -> u64 {
    let t = tsih.to_be_bytes();
    u64::from_be_bytes([
        isid[0], isid[1], isid[2], isid[3], isid[4], isid[5], t[0], t[1],
    ])
}

/// Login T/C/CSG/NSG byte (§11.12.1-3).
fn login_flags(transit: bool, cont: bool, csg: u8, nsg: u8) -> u8 {
    flag(transit, 0x80) | flag(cont, 0x40) | ((csg & 3) << 2) | (nsg & 3)
}

/// The reserved ITT value for PDUs not tied to a task (§11.9, §11.17).
const RESERVED_TAG: u32 = 0xffff_ffff;

/// Map a typed BHS to raw words, per the RFC 7143 §11 figure of its opcode. `total_ahs_words`
/// and `dsl` are filled by the caller.
pub(crate) fn to_raw(bhs: &Bhs) -> RawBhs {
    let mut r = RawBhs::default();
    match bhs {
        // §11.18
        Bhs::NopOut(p) => {
            r.b0 = immediate(p.immediate); // opcode 0x00
            r.b1 = 0x80;
            r.w8 = p.lun;
            r.itt = p.itt;
            r.w[0] = p.ttt;
            r.w[1] = p.cmd_sn;
            r.w[2] = p.exp_stat_sn;
        }
        // §11.3
        Bhs::ScsiCommand(p) => {
            r.b0 = immediate(p.immediate) | 0x01;
            r.b1 =
                flag(p.final_, 0x80) | flag(p.read, 0x40) | flag(p.write, 0x20) | (p.attr & 0x07);
            r.w8 = p.lun;
            r.itt = p.itt;
            r.w[0] = p.expected_data_transfer_length;
            r.w[1] = p.cmd_sn;
            r.w[2] = p.exp_stat_sn;
            r.w[3..7].copy_from_slice(&cdb_words(&p.cdb));
        }
        // §11.5
        Bhs::TaskMgmtRequest(p) => {
            r.b0 = immediate(p.immediate) | 0x02;
            r.b1 = 0x80 | (p.function & 0x7f);
            r.w8 = p.lun;
            r.itt = p.itt;
            r.w[0] = p.referenced_task_tag;
            r.w[1] = p.cmd_sn;
            r.w[2] = p.exp_stat_sn;
            r.w[3] = p.ref_cmd_sn;
            r.w[4] = p.exp_data_sn;
        }
        // §11.12: the I bit is always 1 on a Login Request.
        Bhs::LoginRequest(p) => {
            r.b0 = 0x40 | 0x03;
            r.b1 = login_flags(p.transit, p.cont, p.csg, p.nsg);
            r.b2 = p.version_max;
            r.b3 = p.version_min;
            r.w8 = isid_tsih(&p.isid, p.tsih);
            r.itt = p.itt;
            r.w[0] = be16_pair(p.cid, 0);
            r.w[1] = p.cmd_sn;
            r.w[2] = p.exp_stat_sn;
        }
        // §11.10
        Bhs::TextRequest(p) => {
            r.b0 = immediate(p.immediate) | 0x04;
            r.b1 = flag(p.final_, 0x80) | flag(p.cont, 0x40);
            r.w8 = p.lun;
            r.itt = p.itt;
            r.w[0] = p.ttt;
            r.w[1] = p.cmd_sn;
            r.w[2] = p.exp_stat_sn;
        }
        // §11.7.1 (Data-Out)
        Bhs::DataOut(p) => {
            r.b0 = 0x05;
            r.b1 = flag(p.final_, 0x80);
            r.w8 = p.lun;
            r.itt = p.itt;
            r.w[0] = p.ttt;
            r.w[2] = p.exp_stat_sn;
            r.w[4] = p.data_sn;
            r.w[5] = p.buffer_offset;
        }
        // §11.14
        Bhs::LogoutRequest(p) => {
            r.b0 = immediate(p.immediate) | 0x06;
            r.b1 = 0x80 | (p.reason & 0x7f);
            r.itt = p.itt;
            r.w[0] = be16_pair(p.cid, 0);
            r.w[1] = p.cmd_sn;
            r.w[2] = p.exp_stat_sn;
        }
        // §11.16
        Bhs::SnackRequest(p) => {
            r.b0 = 0x10;
            r.b1 = 0x80 | (p.snack_type & 0x0f);
            r.w8 = p.lun;
            r.itt = p.itt;
            r.w[0] = p.ttt;
            r.w[2] = p.exp_stat_sn;
            r.w[5] = p.beg_run;
            r.w[6] = p.run_length;
        }
        // §11.19
        Bhs::NopIn(p) => {
            r.b0 = 0x20;
            r.b1 = 0x80;
            r.w8 = p.lun;
            r.itt = p.itt;
            r.w[0] = p.ttt;
            r.w[1] = p.stat_sn;
            r.w[2] = p.exp_cmd_sn;
            r.w[3] = p.max_cmd_sn;
        }
        // §11.4: flags byte is 1 . . o u O U .
        Bhs::ScsiResponse(p) => {
            r.b0 = 0x21;
            r.b1 = 0x80
                | flag(p.bidi_overflow, 0x10)
                | flag(p.bidi_underflow, 0x08)
                | flag(p.overflow, 0x04)
                | flag(p.underflow, 0x02);
            r.b2 = p.response;
            r.b3 = p.status;
            r.itt = p.itt;
            r.w[0] = p.snack_tag;
            r.w[1] = p.stat_sn;
            r.w[2] = p.exp_cmd_sn;
            r.w[3] = p.max_cmd_sn;
            r.w[4] = p.exp_data_sn;
            r.w[5] = p.bidi_read_residual_count;
            r.w[6] = p.residual_count;
        }
        // §11.6
        Bhs::TaskMgmtResponse(p) => {
            r.b0 = 0x22;
            r.b1 = 0x80;
            r.b2 = p.response;
            r.itt = p.itt;
            r.w[1] = p.stat_sn;
            r.w[2] = p.exp_cmd_sn;
            r.w[3] = p.max_cmd_sn;
        }
        // §11.13
        Bhs::LoginResponse(p) => {
            r.b0 = 0x23;
            r.b1 = login_flags(p.transit, p.cont, p.csg, p.nsg);
            r.b2 = p.version_max;
            r.b3 = p.version_active;
            r.w8 = isid_tsih(&p.isid, p.tsih);
            r.itt = p.itt;
            r.w[1] = p.stat_sn;
            r.w[2] = p.exp_cmd_sn;
            r.w[3] = p.max_cmd_sn;
            r.w[4] = ((p.status_class as u32) << 24) | ((p.status_detail as u32) << 16);
        }
        // §11.11
        Bhs::TextResponse(p) => {
            r.b0 = 0x24;
            r.b1 = flag(p.final_, 0x80) | flag(p.cont, 0x40);
            r.w8 = p.lun;
            r.itt = p.itt;
            r.w[0] = p.ttt;
            r.w[1] = p.stat_sn;
            r.w[2] = p.exp_cmd_sn;
            r.w[3] = p.max_cmd_sn;
        }
        // §11.7: flags byte is F A 0 0 0 O U S.
        Bhs::DataIn(p) => {
            r.b0 = 0x25;
            r.b1 = flag(p.final_, 0x80)
                | flag(p.ack, 0x40)
                | flag(p.overflow, 0x04)
                | flag(p.underflow, 0x02)
                | flag(p.status_present, 0x01);
            r.b3 = p.status;
            r.w8 = p.lun;
            r.itt = p.itt;
            r.w[0] = p.ttt;
            r.w[1] = p.stat_sn;
            r.w[2] = p.exp_cmd_sn;
            r.w[3] = p.max_cmd_sn;
            r.w[4] = p.data_sn;
            r.w[5] = p.buffer_offset;
            r.w[6] = p.residual_count;
        }
        // §11.15
        Bhs::LogoutResponse(p) => {
            r.b0 = 0x26;
            r.b1 = 0x80;
            r.b2 = p.response;
            r.itt = p.itt;
            r.w[1] = p.stat_sn;
            r.w[2] = p.exp_cmd_sn;
            r.w[3] = p.max_cmd_sn;
            r.w[5] = be16_pair(p.time2wait, p.time2retain);
        }
        // §11.8
        Bhs::R2t(p) => {
            r.b0 = 0x31;
            r.b1 = 0x80;
            r.w8 = p.lun;
            r.itt = p.itt;
            r.w[0] = p.ttt;
            r.w[1] = p.stat_sn;
            r.w[2] = p.exp_cmd_sn;
            r.w[3] = p.max_cmd_sn;
            r.w[4] = p.r2t_sn;
            r.w[5] = p.buffer_offset;
            r.w[6] = p.desired_data_transfer_length;
        }
        // §11.9: ITT is reserved (0xffffffff).
        Bhs::AsyncMessage(p) => {
            r.b0 = 0x32;
            r.b1 = 0x80;
            r.w8 = p.lun;
            r.itt = RESERVED_TAG;
            r.w[1] = p.stat_sn;
            r.w[2] = p.exp_cmd_sn;
            r.w[3] = p.max_cmd_sn;
            r.w[4] = ((p.async_event as u32) << 24)
                | ((p.async_vcode as u32) << 16)
                | p.parameter1 as u32;
            r.w[5] = be16_pair(p.parameter2, p.parameter3);
        }
        // §11.17: ITT is reserved (0xffffffff).
        Bhs::Reject(p) => {
            r.b0 = 0x3f;
            r.b1 = 0x80;
            r.b2 = p.reason;
            r.itt = RESERVED_TAG;
            r.w[1] = p.stat_sn;
            r.w[2] = p.exp_cmd_sn;
            r.w[3] = p.max_cmd_sn;
            r.w[4] = p.data_sn_or_r2t_sn;
        }
    }
    r
}

/// Encode a BHS whose data segment is `data_len` bytes, plus the header digest if negotiated.
/// Lets the connection write header, payload and trailer as one vectored write (no copy of
/// the payload).
///
/// Carries no AHS: a target never sends one (§11.2.2 defines AHS only for the SCSI
/// Command). A SCSI Command whose CDB exceeds 16 bytes, or that carries a bidirectional read
/// length, must go through [`encode`]; here only its first 16 CDB bytes are written.
/// `data_len` is truncated to the 24-bit wire field; callers keep it within the negotiated
/// MaxRecvDataSegmentLength (always below 2^24).
pub fn encode_header(bhs: &Bhs, data_len: u32, digests: Digests) -> HeaderBuf {
    let mut raw = to_raw(bhs);
    raw.dsl = data_len & MAX_WIRE_DATA_SEGMENT;
    let mut out = HeaderBuf {
        bytes: [0; 52],
        len: BHS_LEN,
    };
    let mut b = [0u8; BHS_LEN];
    raw.write(&mut b);
    out.bytes[..BHS_LEN].copy_from_slice(&b);
    if digests.header {
        // §13.1: the header digest covers BHS + AHS; goes on the wire little-endian.
        let crc = crc32c::crc32c(&b);
        out.bytes[BHS_LEN..BHS_LEN + DIGEST_LEN].copy_from_slice(&crc.to_le_bytes());
        out.len = BHS_LEN + DIGEST_LEN;
    }
    out
}

/// Padding and data digest for `data` (empty when `data` is empty).
pub fn trailer(data: &[u8], digests: Digests) -> Trailer {
    let pad = pad_len(data.len());
    let mut t = Trailer {
        bytes: [0; 7],
        len: pad,
    };
    if digests.data && !data.is_empty() {
        // §13.1: the data digest covers data + padding (zeros).
        let crc = crc_with_pad(data, pad);
        t.bytes[pad..pad + DIGEST_LEN].copy_from_slice(&crc.to_le_bytes());
        t.len = pad + DIGEST_LEN;
    }
    t
}

/// Append the AHS of a SCSI Command (§11.2.2.3 Extended CDB, §11.2.2.4 Bidirectional Read
/// Expected Data Transfer Length) to `ahs`. Each AHS is AHSLength(2) AHSType(1) then the
/// AHS-specific bytes (AHSLength counts them, the first is reserved), padded to 4 bytes.
fn scsi_ahs(bhs: &Bhs, ahs: &mut [u8; 1020]) -> usize {
    let Bhs::ScsiCommand(p) = bhs else {
        return 0;
    };
    let mut n = 0;
    if p.cdb.len() > 16 {
        let ext = &p.cdb[16..p.cdb.len().min(MAX_CDB_LEN)];
        let ahs_len = ext.len() + 1;
        ahs[n..n + 2].copy_from_slice(&(ahs_len as u16).to_be_bytes());
        ahs[n + 2] = AHS_EXTENDED_CDB;
        ahs[n + 3] = 0;
        ahs[n + 4..n + 4 + ext.len()].copy_from_slice(ext);
        n += 4 + ext.len();
        n += pad_len(n);
    }
    if let Some(len) = p.bidi_read_length {
        ahs[n..n + 2].copy_from_slice(&5u16.to_be_bytes());
        ahs[n + 2] = AHS_BIDI_READ_LENGTH;
        ahs[n + 3] = 0;
        ahs[n + 4..n + 8].copy_from_slice(&len.to_be_bytes());
        n += 8;
    }
    n
}

/// Encode a whole PDU into `out`: BHS, AHS, header digest, data, padding, data digest.
pub fn encode(pdu: &Pdu, digests: Digests, out: &mut BytesMut) {
    let mut ahs = [0u8; 1020];
    let ahs_len = scsi_ahs(&pdu.bhs, &mut ahs);
    let mut raw = to_raw(&pdu.bhs);
    raw.total_ahs_words = (ahs_len / 4) as u8;
    raw.dsl = pdu.data.len() as u32 & MAX_WIRE_DATA_SEGMENT;
    let mut b = [0u8; BHS_LEN];
    raw.write(&mut b);
    let header_len = BHS_LEN + ahs_len;
    let tr = trailer(&pdu.data, digests);
    out.reserve(header_len + DIGEST_LEN + pdu.data.len() + tr.len);
    out.put_slice(&b);
    out.put_slice(&ahs[..ahs_len]);
    if digests.header {
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b), &ahs[..ahs_len]);
        out.put_slice(&crc.to_le_bytes());
    }
    out.put_slice(&pdu.data);
    out.put_slice(&tr);
}
