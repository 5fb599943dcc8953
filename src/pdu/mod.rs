//! iSCSI PDU codec (RFC 7143 §11). Pure: bytes in, values out. Knows nothing of sockets.
//!
//! Framing contract (the mini-redis shape): the connection keeps a receive buffer and calls
//! [`frame_length`] until it returns `Some(n)`, then [`decode`] on exactly those `n` bytes.
//! `frame_length` verifies the header digest and the data-segment limit as soon as the BHS
//! (+AHS, +digest) is buffered, so a hostile length is refused before we wait for, or allocate, it.
//!
//! The codec is direction-agnostic: it decodes initiator and target opcodes alike (tests and
//! fuzzers decode what the target sends). The session checks [`Opcode::is_initiator`].
//! Digests are CRC32C (§13.1), sent little-endian as Linux and libiscsi do.

mod decode;
mod encode;
mod raw;
mod types;

pub use decode::{decode, frame_length};
pub use encode::{encode, encode_header, pad_len, trailer, HeaderBuf, Trailer, MAX_CDB_LEN};
pub use types::*;

/// Length of the Basic Header Segment (RFC 7143 §11.2.1).
pub const BHS_LEN: usize = 48;
/// Largest data segment the wire format can express (24-bit DataSegmentLength).
pub const MAX_WIRE_DATA_SEGMENT: u32 = (1 << 24) - 1;

/// Which CRC32C digests were negotiated for a connection (RFC 7143 §13.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// Codec errors. Every variant except `Truncated`/`HeaderDigest` carries the offending BHS so
/// the connection can answer with a Reject PDU (RFC 7143 §11.17: the Reject data segment is the
/// rejected PDU's header), and `frame_len` when the whole PDU length is known so that the
/// connection may skip it and keep going.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PduError {
    /// Header digest mismatch: the header cannot be trusted, not even its lengths (§7.8).
    #[error("header digest mismatch")]
    HeaderDigest,
    /// Data digest mismatch; the header is good.
    #[error("data digest mismatch")]
    DataDigest {
        bhs: Box<[u8; BHS_LEN]>,
        frame_len: usize,
    },
    /// DataSegmentLength larger than the MaxRecvDataSegmentLength we declared.
    #[error("data segment of {len} bytes exceeds the negotiated {max}")]
    DataSegmentTooLong {
        bhs: Box<[u8; BHS_LEN]>,
        len: u32,
        max: u32,
    },
    /// Opcode not defined for an initiator (or target) PDU.
    #[error("unknown opcode {opcode:#04x}")]
    UnknownOpcode {
        bhs: Box<[u8; BHS_LEN]>,
        opcode: u8,
        frame_len: usize,
    },
    /// Fields that violate the PDU format (bad AHS, reserved bits where the RFC demands, ...).
    #[error("malformed PDU: {reason}")]
    Malformed {
        bhs: Box<[u8; BHS_LEN]>,
        reason: &'static str,
        frame_len: Option<usize>,
    },
}

impl PduError {
    /// The offending BHS, for a Reject PDU's data segment.
    pub fn bhs(&self) -> Option<&[u8; BHS_LEN]> {
        match self {
            PduError::HeaderDigest => None,
            PduError::DataDigest { bhs, .. }
            | PduError::DataSegmentTooLong { bhs, .. }
            | PduError::UnknownOpcode { bhs, .. }
            | PduError::Malformed { bhs, .. } => Some(bhs),
        }
    }

    /// How many bytes to drop to skip the offending PDU and keep the connection, when known.
    /// `None` means the stream cannot be resynchronised (§7.8: after a header digest error
    /// the lengths are untrustworthy) and the connection should be dropped.
    pub fn frame_len(&self) -> Option<usize> {
        match self {
            PduError::HeaderDigest | PduError::DataSegmentTooLong { .. } => None,
            PduError::DataDigest { frame_len, .. } | PduError::UnknownOpcode { frame_len, .. } => {
                Some(*frame_len)
            }
            PduError::Malformed { frame_len, .. } => *frame_len,
        }
    }
}

#[cfg(test)]
mod tests;
