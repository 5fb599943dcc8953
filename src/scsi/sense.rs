//! Sense data (SPC-4 §4.5): fixed (0x70) and descriptor (0x72) formats.
use bytes::Bytes;

/// Sense keys (SPC-4 §4.5.6).
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const COPY_ABORTED: u8 = 0xA;
    pub const ABORTED_COMMAND: u8 = 0xB;
    pub const MISCOMPARE: u8 = 0xE;
}

/// One sense condition, independent of its wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// INFORMATION field (e.g. miscompare offset); sets VALID.
    pub info: Option<u64>,
    /// Sense-key specific bytes (SKSV already set in byte 0).
    pub sks: Option<[u8; 3]>,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense {
            key,
            asc,
            ascq,
            info: None,
            sks: None,
        }
    }

    /// 05/24/00 INVALID FIELD IN CDB with a field pointer (SPC-4 §4.5.2.4.2: C/D=1, BPV when
    /// a bit is named).
    pub fn invalid_cdb_field(byte: u16, bit: Option<u8>) -> Self {
        Self::with_pointer(0x24, true, byte, bit)
    }

    /// 05/26/00 INVALID FIELD IN PARAMETER LIST with a field pointer (C/D=0).
    pub fn invalid_param_field(byte: u16, bit: Option<u8>) -> Self {
        Self::with_pointer(0x26, false, byte, bit)
    }

    fn with_pointer(asc: u8, cdb: bool, byte: u16, bit: Option<u8>) -> Self {
        let mut b0 = 0x80u8; // SKSV
        if cdb {
            b0 |= 0x40;
        }
        if let Some(bit) = bit {
            b0 |= 0x08 | (bit & 7);
        }
        let [hi, lo] = byte.to_be_bytes();
        Sense {
            sks: Some([b0, hi, lo]),
            ..Sense::new(key::ILLEGAL_REQUEST, asc, 0)
        }
    }

    pub fn with_info(mut self, info: u64) -> Self {
        self.info = Some(info);
        self
    }

    /// Encode as fixed (0x70) or descriptor (0x72) format, current error.
    pub fn encode(&self, descriptor: bool) -> Bytes {
        if descriptor {
            let mut v = vec![0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0];
            if let Some(info) = self.info {
                // Information descriptor (SPC-4 §4.5.2.2).
                v.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
                v.extend_from_slice(&info.to_be_bytes());
            }
            if let Some(sks) = self.sks {
                // Sense key specific descriptor (SPC-4 §4.5.2.4).
                v.extend_from_slice(&[0x02, 0x06, 0, 0, sks[0], sks[1], sks[2], 0]);
            }
            let add = (v.len() - 8) as u8;
            v[7] = add;
            Bytes::from(v)
        } else {
            let mut v = vec![0u8; 18];
            v[0] = 0x70;
            v[2] = self.key & 0x0f;
            if let Some(info) = self.info {
                v[0] |= 0x80;
                // Fixed format holds 4 bytes of INFORMATION (SPC-4 §4.5.3).
                v[3..7].copy_from_slice(&(info as u32).to_be_bytes());
            }
            v[7] = 10;
            v[12] = self.asc;
            v[13] = self.ascq;
            if let Some(sks) = self.sks {
                v[15..18].copy_from_slice(&sks);
            }
            Bytes::from(v)
        }
    }
}

/// Frequently used conditions.
pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
pub const INVALID_FIELD_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
pub const LU_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
pub const INVALID_FIELD_PARAM: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
/// 05/0E/03: the transport delivered less Data-Out than the CDB needs (SAM-5 §5.4.2 allows
/// refusing the command instead of processing a partial transfer).
pub const INVALID_FIELD_IU: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x0e, 0x03);
pub const PARAM_LIST_LENGTH: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
pub const REMOVAL_PREVENTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x53, 0x02);
pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
pub const SPACE_ALLOCATION_FAILED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x07);
pub const MEDIUM_NOT_PRESENT: Sense = Sense::new(key::NOT_READY, 0x3a, 0x00);
pub const MISCOMPARE_VERIFY: Sense = Sense::new(key::MISCOMPARE, 0x1d, 0x00);
pub const READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00);
pub const INTERNAL_FAILURE: Sense = Sense::new(key::ABORTED_COMMAND, 0x44, 0x00);
pub const NO_SENSE: Sense = Sense::new(key::NO_SENSE, 0, 0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_and_descriptor() {
        let s = Sense::invalid_cdb_field(2, Some(5)).with_info(7);
        let f = s.encode(false);
        assert_eq!(f.len(), 18);
        assert_eq!(f[0], 0xf0);
        assert_eq!(&f[3..7], &[0, 0, 0, 7]);
        assert_eq!((f[2], f[12], f[13]), (5, 0x24, 0));
        assert_eq!(&f[15..18], &[0xcd, 0, 2]);
        let d = s.encode(true);
        assert_eq!(d[0], 0x72);
        assert_eq!(d[7] as usize, d.len() - 8);
        assert_eq!(&d[8..12], &[0, 0x0a, 0x80, 0]);
    }
}
