//! Encoding (to be implemented).
use super::{Bhs, Digests, Pdu};
use bytes::BytesMut;

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

/// Encode a BHS whose data segment is `data_len` bytes, plus the header digest if negotiated.
/// Lets the connection write header, payload and trailer as one vectored write (no copy of
/// the payload).
pub fn encode_header(bhs: &Bhs, data_len: u32, digests: Digests) -> HeaderBuf {
    let _ = (bhs, data_len, digests);
    todo!()
}

/// Padding and data digest for `data` (empty when `data` is empty).
pub fn trailer(data: &[u8], digests: Digests) -> Trailer {
    let _ = (data, digests);
    todo!()
}

/// Encode a whole PDU into `out`.
pub fn encode(pdu: &Pdu, digests: Digests, out: &mut BytesMut) {
    let _ = (pdu, digests, out);
    todo!()
}
