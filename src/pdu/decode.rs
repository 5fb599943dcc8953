//! Decoding (to be implemented).
use super::{Digests, Pdu, PduError};
use bytes::Bytes;

/// How many bytes the PDU at the start of `buf` occupies on the wire (BHS, AHS, header
/// digest, data segment, padding, data digest), or `None` if more bytes are needed to know.
/// Verifies the header digest and refuses a DataSegmentLength above `max_data_segment`
/// as soon as the header is buffered.
pub fn frame_length(
    buf: &[u8],
    digests: Digests,
    max_data_segment: u32,
) -> Result<Option<usize>, PduError> {
    let _ = (buf, digests, max_data_segment);
    todo!()
}

/// Decode exactly one whole PDU (`frame` is what `frame_length` measured). Checks the data
/// digest. The data segment is a zero-copy slice of `frame`. Never panics on any input.
pub fn decode(frame: Bytes, digests: Digests) -> Result<Pdu, PduError> {
    let _ = (frame, digests);
    todo!()
}
