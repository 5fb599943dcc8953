//! The BHS as plain words (RFC 7143 §11.2.1): the shape every opcode shares. Decoding parses
//! bytes into a `RawBhs` and maps words to typed fields; encoding does the inverse. Keeping one
//! layout table in each direction (`decode::to_typed`, `encode::to_raw`) makes the two easy to
//! check against each other and against the RFC figures.

use super::BHS_LEN;

/// Fields common to every BHS plus the opcode-specific words at bytes 20..48.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RawBhs {
    /// Byte 0: bit 6 = I, low 6 bits = opcode (§11.2.1.1-2).
    pub b0: u8,
    /// Byte 1: F bit and opcode-specific flags.
    pub b1: u8,
    pub b2: u8,
    pub b3: u8,
    /// Byte 4: TotalAHSLength in 4-byte words (§11.2.1).
    pub total_ahs_words: u8,
    /// Bytes 5..8: DataSegmentLength, 24-bit big-endian (§11.2.1.4).
    pub dsl: u32,
    /// Bytes 8..16: LUN or opcode-specific.
    pub w8: u64,
    /// Bytes 16..20: Initiator Task Tag.
    pub itt: u32,
    /// Bytes 20..48 as seven big-endian words: w[0] = bytes 20..24, ..., w[6] = 44..48.
    pub w: [u32; 7],
}

impl RawBhs {
    pub fn write(&self, out: &mut [u8; BHS_LEN]) {
        out[0] = self.b0;
        out[1] = self.b1;
        out[2] = self.b2;
        out[3] = self.b3;
        out[4] = self.total_ahs_words;
        let dsl = self.dsl.to_be_bytes();
        out[5..8].copy_from_slice(&dsl[1..4]);
        out[8..16].copy_from_slice(&self.w8.to_be_bytes());
        out[16..20].copy_from_slice(&self.itt.to_be_bytes());
        for (i, word) in self.w.iter().enumerate() {
            let at = 20 + 4 * i;
            out[at..at + 4].copy_from_slice(&word.to_be_bytes());
        }
    }
}

/// Length of the CRC32C digest (§13.1).
pub(crate) const DIGEST_LEN: usize = 4;

/// CRC32C of `data` followed by `pad` zero bytes (§13.1: padding is covered by the digest).
pub(crate) fn crc_with_pad(data: &[u8], pad: usize) -> u32 {
    const ZEROS: [u8; 3] = [0; 3];
    let crc = crc32c::crc32c(data);
    match ZEROS.get(..pad) {
        Some(z) if !z.is_empty() => crc32c::crc32c_append(crc, z),
        _ => crc,
    }
}
