//! Decoding: wire bytes to typed PDUs (RFC 7143 §11). Never panics on any input; allocates
//! only the CDB `Vec` (and a boxed BHS copy on error).
use super::encode::{pad_len, AHS_BIDI_READ_LENGTH, AHS_EXTENDED_CDB};
use super::raw::{crc_with_pad, RawBhs, DIGEST_LEN};
use super::types::*;
use super::{Digests, Pdu, PduError, BHS_LEN};
use bytes::Bytes;
use nom::bytes::complete::take;
use nom::multi::fill;
use nom::number::complete::{be_u16, be_u24, be_u32, be_u64, u8 as nom_u8};
use nom::sequence::tuple;
use nom::IResult;

/// A copy of the first 48 bytes (zero-filled if shorter) for error reporting.
fn bhs_copy(buf: &[u8]) -> Box<[u8; BHS_LEN]> {
    let mut b = [0u8; BHS_LEN];
    let n = buf.len().min(BHS_LEN);
    b[..n].copy_from_slice(&buf[..n]);
    Box::new(b)
}

/// Where things are in a PDU, from its BHS alone (§11.2).
#[derive(Debug, Clone, Copy)]
struct Layout {
    ahs_len: usize,
    /// BHS + AHS + header digest.
    header_len: usize,
    dsl: u32,
    /// The whole PDU on the wire.
    total: usize,
}

/// Compute the layout once the BHS is buffered, and check the header digest once BHS, AHS
/// and digest are buffered. `Ok(None)`: need more bytes to know.
fn layout(buf: &[u8], digests: Digests) -> Result<Option<Layout>, PduError> {
    let (Some(&ahs_words), Some(dsl_bytes)) = (buf.get(4), buf.get(5..8)) else {
        return Ok(None);
    };
    if buf.len() < BHS_LEN {
        return Ok(None);
    }
    let ahs_len = ahs_words as usize * 4;
    let hd = if digests.header { DIGEST_LEN } else { 0 };
    let header_len = BHS_LEN + ahs_len + hd;
    let dsl = u32::from_be_bytes([0, dsl_bytes[0], dsl_bytes[1], dsl_bytes[2]]);
    let d = dsl as usize;
    let dd = if digests.data && d > 0 { DIGEST_LEN } else { 0 };
    let total = header_len + d + pad_len(d) + dd;
    if digests.header {
        // §13.1: the header digest covers BHS + AHS and is sent little-endian. Until it is
        // verified no length in the header can be trusted (§7.8), so check it first.
        let (Some(covered), Some(wire)) = (
            buf.get(..BHS_LEN + ahs_len),
            buf.get(BHS_LEN + ahs_len..header_len),
        ) else {
            return Ok(None);
        };
        let wire = u32::from_le_bytes([wire[0], wire[1], wire[2], wire[3]]);
        if crc32c::crc32c(covered) != wire {
            return Err(PduError::HeaderDigest);
        }
    } else if buf.len() < header_len {
        return Ok(None);
    }
    Ok(Some(Layout {
        ahs_len,
        header_len,
        dsl,
        total,
    }))
}

/// How many bytes the PDU at the start of `buf` occupies on the wire (BHS, AHS, header
/// digest, data segment, padding, data digest), or `None` if more bytes are needed to know.
/// Verifies the header digest and refuses a DataSegmentLength above `max_data_segment`
/// as soon as the header is buffered.
///
/// An undefined opcode gives `UnknownOpcode` once the whole PDU is buffered, so the caller can
/// answer with a Reject (§11.17.1, reason 0x04/0x05) and drop exactly `frame_len` bytes.
pub fn frame_length(
    buf: &[u8],
    digests: Digests,
    max_data_segment: u32,
) -> Result<Option<usize>, PduError> {
    let Some(l) = layout(buf, digests)? else {
        return Ok(None);
    };
    // §12.12 MaxRecvDataSegmentLength: refuse before waiting for (or buffering) the data.
    if l.dsl > max_data_segment {
        return Err(PduError::DataSegmentTooLong {
            bhs: bhs_copy(buf),
            len: l.dsl,
            max: max_data_segment,
        });
    }
    if buf.len() < l.total {
        return Ok(None);
    }
    let op = buf.first().copied().unwrap_or(0) & 0x3f;
    if Opcode::from_u8(op).is_none() {
        return Err(PduError::UnknownOpcode {
            bhs: bhs_copy(buf),
            opcode: op,
            frame_len: l.total,
        });
    }
    Ok(Some(l.total))
}

/// nom parser for the 48-byte BHS into raw words (§11.2.1).
fn parse_bhs(i: &[u8]) -> IResult<&[u8], RawBhs> {
    let (i, (b0, b1, b2, b3, total_ahs_words, dsl, w8, itt)) = tuple((
        nom_u8, nom_u8, nom_u8, nom_u8, nom_u8, be_u24, be_u64, be_u32,
    ))(i)?;
    let mut w = [0u32; 7];
    let (i, ()) = fill(be_u32, &mut w)(i)?;
    Ok((
        i,
        RawBhs {
            b0,
            b1,
            b2,
            b3,
            total_ahs_words,
            dsl,
            w8,
            itt,
            w,
        },
    ))
}

/// One AHS (§11.2.2): AHSLength(2) AHSType(1) AHS-specific(AHSLength) padding-to-4.
/// Returns (type, specific bytes).
fn parse_one_ahs(i: &[u8]) -> IResult<&[u8], (u8, &[u8])> {
    let (i, (len, ty)) = tuple((be_u16, nom_u8))(i)?;
    let (i, specific) = take(len as usize)(i)?;
    let (i, _pad) = take(pad_len(3 + len as usize))(i)?;
    Ok((i, (ty, specific)))
}

/// The AHS of a SCSI Command: extra CDB bytes (§11.2.2.3) and the bidirectional read length
/// (§11.2.2.4). Lying lengths, zero lengths, duplicates and unknown types are malformed.
fn parse_scsi_ahs(mut i: &[u8]) -> Result<(&[u8], Option<u32>), &'static str> {
    let mut ext: Option<&[u8]> = None;
    let mut bidi = None;
    while !i.is_empty() {
        let (rest, (ty, specific)) = parse_one_ahs(i).map_err(|_| "AHS overruns TotalAHSLength")?;
        if specific.is_empty() {
            return Err("zero-length AHS");
        }
        match ty {
            AHS_EXTENDED_CDB => {
                // First byte reserved, then CDB bytes 16.. (§11.2.2.3).
                let cdb = specific.get(1..).unwrap_or(&[]);
                if cdb.is_empty() {
                    return Err("empty Extended CDB AHS");
                }
                if ext.replace(cdb).is_some() {
                    return Err("duplicate Extended CDB AHS");
                }
            }
            AHS_BIDI_READ_LENGTH => {
                // One reserved byte then the 4-byte length; AHSLength is 5 (§11.2.2.4).
                let [_, a, b, c, d] = specific else {
                    return Err("bad Bidirectional Read AHS length");
                };
                if bidi.replace(u32::from_be_bytes([*a, *b, *c, *d])).is_some() {
                    return Err("duplicate Bidirectional Read AHS");
                }
            }
            _ => return Err("unknown AHS type"),
        }
        i = rest;
    }
    Ok((ext.unwrap_or(&[]), bidi))
}

fn bit(b: u8, mask: u8) -> bool {
    b & mask != 0
}

fn hi16(w: u32) -> u16 {
    (w >> 16) as u16
}

fn lo16(w: u32) -> u16 {
    w as u16
}

/// Map raw words to the typed BHS, per the RFC 7143 §11 figure of each opcode (the inverse of
/// `encode::to_raw`). `bhs_bytes` is the wire BHS (for the CDB), `ext_cdb`/`bidi` from AHS.
fn to_typed(op: Opcode, r: &RawBhs, bhs_bytes: &[u8], ext_cdb: &[u8], bidi: Option<u32>) -> Bhs {
    let imm = bit(r.b0, 0x40);
    let [w0, w1, w2, w3, w4, w5, w6] = r.w;
    match op {
        Opcode::NopOut => Bhs::NopOut(NopOut {
            immediate: imm,
            lun: r.w8,
            itt: r.itt,
            ttt: w0,
            cmd_sn: w1,
            exp_stat_sn: w2,
        }),
        Opcode::ScsiCommand => {
            let mut cdb = Vec::with_capacity(16 + ext_cdb.len());
            cdb.extend_from_slice(bhs_bytes.get(32..48).unwrap_or(&[]));
            cdb.extend_from_slice(ext_cdb);
            Bhs::ScsiCommand(ScsiCommand {
                immediate: imm,
                final_: bit(r.b1, 0x80),
                read: bit(r.b1, 0x40),
                write: bit(r.b1, 0x20),
                attr: r.b1 & 0x07,
                lun: r.w8,
                itt: r.itt,
                expected_data_transfer_length: w0,
                cmd_sn: w1,
                exp_stat_sn: w2,
                cdb,
                bidi_read_length: bidi,
            })
        }
        Opcode::TaskMgmtRequest => Bhs::TaskMgmtRequest(TaskMgmtRequest {
            immediate: imm,
            function: r.b1 & 0x7f,
            lun: r.w8,
            itt: r.itt,
            referenced_task_tag: w0,
            cmd_sn: w1,
            exp_stat_sn: w2,
            ref_cmd_sn: w3,
            exp_data_sn: w4,
        }),
        Opcode::LoginRequest => {
            let x = r.w8.to_be_bytes();
            Bhs::LoginRequest(LoginRequest {
                transit: bit(r.b1, 0x80),
                cont: bit(r.b1, 0x40),
                csg: (r.b1 >> 2) & 3,
                nsg: r.b1 & 3,
                version_max: r.b2,
                version_min: r.b3,
                isid: [x[0], x[1], x[2], x[3], x[4], x[5]],
                tsih: u16::from_be_bytes([x[6], x[7]]),
                itt: r.itt,
                cid: hi16(w0),
                cmd_sn: w1,
                exp_stat_sn: w2,
            })
        }
        Opcode::TextRequest => Bhs::TextRequest(TextRequest {
            immediate: imm,
            final_: bit(r.b1, 0x80),
            cont: bit(r.b1, 0x40),
            lun: r.w8,
            itt: r.itt,
            ttt: w0,
            cmd_sn: w1,
            exp_stat_sn: w2,
        }),
        Opcode::DataOut => Bhs::DataOut(DataOut {
            final_: bit(r.b1, 0x80),
            lun: r.w8,
            itt: r.itt,
            ttt: w0,
            exp_stat_sn: w2,
            data_sn: w4,
            buffer_offset: w5,
        }),
        Opcode::LogoutRequest => Bhs::LogoutRequest(LogoutRequest {
            immediate: imm,
            reason: r.b1 & 0x7f,
            itt: r.itt,
            cid: hi16(w0),
            cmd_sn: w1,
            exp_stat_sn: w2,
        }),
        Opcode::SnackRequest => Bhs::SnackRequest(SnackRequest {
            snack_type: r.b1 & 0x0f,
            lun: r.w8,
            itt: r.itt,
            ttt: w0,
            exp_stat_sn: w2,
            beg_run: w5,
            run_length: w6,
        }),
        Opcode::NopIn => Bhs::NopIn(NopIn {
            lun: r.w8,
            itt: r.itt,
            ttt: w0,
            stat_sn: w1,
            exp_cmd_sn: w2,
            max_cmd_sn: w3,
        }),
        Opcode::ScsiResponse => Bhs::ScsiResponse(ScsiResponse {
            bidi_overflow: bit(r.b1, 0x10),
            bidi_underflow: bit(r.b1, 0x08),
            overflow: bit(r.b1, 0x04),
            underflow: bit(r.b1, 0x02),
            response: r.b2,
            status: r.b3,
            itt: r.itt,
            snack_tag: w0,
            stat_sn: w1,
            exp_cmd_sn: w2,
            max_cmd_sn: w3,
            exp_data_sn: w4,
            bidi_read_residual_count: w5,
            residual_count: w6,
        }),
        Opcode::TaskMgmtResponse => Bhs::TaskMgmtResponse(TaskMgmtResponse {
            response: r.b2,
            itt: r.itt,
            stat_sn: w1,
            exp_cmd_sn: w2,
            max_cmd_sn: w3,
        }),
        Opcode::LoginResponse => {
            let x = r.w8.to_be_bytes();
            Bhs::LoginResponse(LoginResponse {
                transit: bit(r.b1, 0x80),
                cont: bit(r.b1, 0x40),
                csg: (r.b1 >> 2) & 3,
                nsg: r.b1 & 3,
                version_max: r.b2,
                version_active: r.b3,
                isid: [x[0], x[1], x[2], x[3], x[4], x[5]],
                tsih: u16::from_be_bytes([x[6], x[7]]),
                itt: r.itt,
                stat_sn: w1,
                exp_cmd_sn: w2,
                max_cmd_sn: w3,
                status_class: (w4 >> 24) as u8,
                status_detail: (w4 >> 16) as u8,
            })
        }
        Opcode::TextResponse => Bhs::TextResponse(TextResponse {
            final_: bit(r.b1, 0x80),
            cont: bit(r.b1, 0x40),
            lun: r.w8,
            itt: r.itt,
            ttt: w0,
            stat_sn: w1,
            exp_cmd_sn: w2,
            max_cmd_sn: w3,
        }),
        Opcode::DataIn => Bhs::DataIn(DataIn {
            final_: bit(r.b1, 0x80),
            ack: bit(r.b1, 0x40),
            overflow: bit(r.b1, 0x04),
            underflow: bit(r.b1, 0x02),
            status_present: bit(r.b1, 0x01),
            status: r.b3,
            lun: r.w8,
            itt: r.itt,
            ttt: w0,
            stat_sn: w1,
            exp_cmd_sn: w2,
            max_cmd_sn: w3,
            data_sn: w4,
            buffer_offset: w5,
            residual_count: w6,
        }),
        Opcode::LogoutResponse => Bhs::LogoutResponse(LogoutResponse {
            response: r.b2,
            itt: r.itt,
            stat_sn: w1,
            exp_cmd_sn: w2,
            max_cmd_sn: w3,
            time2wait: hi16(w5),
            time2retain: lo16(w5),
        }),
        Opcode::R2t => Bhs::R2t(R2t {
            lun: r.w8,
            itt: r.itt,
            ttt: w0,
            stat_sn: w1,
            exp_cmd_sn: w2,
            max_cmd_sn: w3,
            r2t_sn: w4,
            buffer_offset: w5,
            desired_data_transfer_length: w6,
        }),
        Opcode::AsyncMessage => Bhs::AsyncMessage(AsyncMessage {
            lun: r.w8,
            stat_sn: w1,
            exp_cmd_sn: w2,
            max_cmd_sn: w3,
            async_event: (w4 >> 24) as u8,
            async_vcode: (w4 >> 16) as u8,
            parameter1: lo16(w4),
            parameter2: hi16(w5),
            parameter3: lo16(w5),
        }),
        Opcode::Reject => Bhs::Reject(Reject {
            reason: r.b2,
            stat_sn: w1,
            exp_cmd_sn: w2,
            max_cmd_sn: w3,
            data_sn_or_r2t_sn: w4,
        }),
    }
}

/// Decode exactly one whole PDU (`frame` is what `frame_length` measured). Checks the data
/// digest. The data segment is a zero-copy slice of `frame`. Never panics on any input.
///
/// Re-checks the header digest too, so `decode` is safe on its own (fuzzers, tests, callers
/// that framed differently).
pub fn decode(frame: Bytes, digests: Digests) -> Result<Pdu, PduError> {
    let malformed = |reason: &'static str, frame_len: Option<usize>| PduError::Malformed {
        bhs: bhs_copy(&frame),
        reason,
        frame_len,
    };
    let Some(l) = layout(&frame, digests)? else {
        return Err(malformed("frame shorter than its header", None));
    };
    if frame.len() != l.total {
        return Err(malformed("frame length does not match the header", None));
    }
    let data_start = l.header_len;
    let data_end = data_start + l.dsl as usize;
    if digests.data && l.dsl > 0 {
        let pad = pad_len(l.dsl as usize);
        let (Some(data), Some(wire)) = (
            frame.get(data_start..data_end),
            frame.get(data_end + pad..l.total),
        ) else {
            return Err(malformed("frame length does not match the header", None));
        };
        let wire = u32::from_le_bytes([wire[0], wire[1], wire[2], wire[3]]);
        if crc_with_pad(data, pad) != wire {
            return Err(PduError::DataDigest {
                bhs: bhs_copy(&frame),
                frame_len: l.total,
            });
        }
    }
    let bhs_bytes = frame.get(..BHS_LEN).unwrap_or(&[]);
    let raw = match parse_bhs(bhs_bytes) {
        Ok((_, raw)) => raw,
        Err(_) => return Err(malformed("short BHS", None)),
    };
    let op_bits = raw.b0 & 0x3f;
    let Some(op) = Opcode::from_u8(op_bits) else {
        return Err(PduError::UnknownOpcode {
            bhs: bhs_copy(&frame),
            opcode: op_bits,
            frame_len: l.total,
        });
    };
    let ahs = frame.get(BHS_LEN..BHS_LEN + l.ahs_len).unwrap_or(&[]);
    let (ext_cdb, bidi) = if ahs.is_empty() {
        (&[][..], None)
    } else if op == Opcode::ScsiCommand {
        parse_scsi_ahs(ahs).map_err(|reason| malformed(reason, Some(l.total)))?
    } else {
        // §11.2.2: the defined AHS types belong to the SCSI Command only.
        return Err(malformed("AHS on a PDU that takes none", Some(l.total)));
    };
    let bhs = to_typed(op, &raw, bhs_bytes, ext_cdb, bidi);
    Ok(Pdu {
        bhs,
        data: frame.slice(data_start..data_end.min(frame.len())),
    })
}
