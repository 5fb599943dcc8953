//! LUN identity (stable across restarts, unique per target and LUN), shared by plain targets
//! (`registry`) and client disks (`boot`): h = MD5 of `"diskless\0" + target name + "\0" +
//! decimal LUN`. The default serial (VPD 0x80) is the first 8 bytes of h as 16 uppercase hex
//! digits. The NAA identifier (VPD 0x83, SPC-4 Device Identification page) is h with its
//! first nibble replaced by 6 (IEEE Registered Extended); the IEEE company ID field is
//! therefore hash bits, not a registered OUI. That form stays the default (`identity:
//! legacy`) because a disk whose identifier changes is a new disk to Windows; `identity:
//! naa3` gives the locally assigned form (NAA 3: first nibble 3, then the first 60 bits of h
//! after that nibble), 8 bytes, for new LUNs (docs/configuration.md).

use crate::config::IdentityFormat;
use crate::scsi::LuIdentity;
use md5::{Digest, Md5};

/// T10 vendor identification reported in INQUIRY.
pub const VENDOR: &str = "DISKLESS";
/// Product identification reported in INQUIRY.
pub const PRODUCT: &str = "VIRTUAL-DISK";

fn identity_hash(target: &str, lun: u16) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(b"diskless\0");
    h.update(target.as_bytes());
    h.update(b"\0");
    h.update(lun.to_string().as_bytes());
    h.finalize().into()
}

/// The default serial: 16 hex digits derived from the target name and LUN.
pub fn default_serial(target: &str, lun: u16) -> String {
    identity_hash(target, lun)
        .iter()
        .take(8)
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// The NAA type 6 identifier of a LUN (16 bytes, first nibble 6).
pub fn naa_identifier(target: &str, lun: u16) -> [u8; 16] {
    let mut h = identity_hash(target, lun);
    h[0] = 0x60 | (h[0] & 0x0f);
    h
}

/// The NAA 3 (locally assigned) identifier of a LUN: 8 bytes, first nibble 3, then hash
/// bits (SPC-4 §7.8.6.6.4). Returned in the 16-byte field of [`LuIdentity`], whose NAA
/// nibble tells the SCSI layer the designator is 8 bytes long; the rest is zero.
pub fn naa3_identifier(target: &str, lun: u16) -> [u8; 16] {
    let h = identity_hash(target, lun);
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&h[..8]);
    v[0] = 0x30 | (v[0] & 0x0f);
    v
}

/// The NAA identifier of a LUN in the configured form.
pub fn naa_in(format: IdentityFormat, target: &str, lun: u16) -> [u8; 16] {
    match format {
        IdentityFormat::Legacy => naa_identifier(target, lun),
        IdentityFormat::Naa3 => naa3_identifier(target, lun),
    }
}

/// The INQUIRY revision: the crate version with the dots removed, at most 4 characters
/// (T10 PRODUCT REVISION LEVEL is 4 bytes), e.g. "010" for 0.1.0.
pub fn revision() -> String {
    env!("CARGO_PKG_VERSION")
        .chars()
        .filter(|c| *c != '.')
        .take(4)
        .collect()
}

/// The identity of a LUN: vendor DISKLESS, product VIRTUAL-DISK, serial as configured or
/// derived, NAA derived.
pub fn lu_identity(target: &str, lun: u16, serial: Option<&str>) -> LuIdentity {
    LuIdentity {
        vendor: VENDOR.to_string(),
        product: PRODUCT.to_string(),
        revision: revision(),
        serial: serial.map_or_else(|| default_serial(target, lun), str::to_string),
        naa: naa_identifier(target, lun),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The legacy identifier is pinned: a disk's identity must never change on upgrade
    /// (Windows would see a new disk). MD5("diskless\0iqn.2026-11.org.x:a\00") =
    /// d5cc4f3514abf8a8833294992494eb7d.
    #[test]
    fn legacy_identifier_is_pinned_and_naa3_is_locally_assigned() {
        let t = "iqn.2026-11.org.x:a";
        let legacy = naa_in(IdentityFormat::Legacy, t, 0);
        assert_eq!(
            legacy,
            [
                0x65, 0xcc, 0x4f, 0x35, 0x14, 0xab, 0xf8, 0xa8, 0x83, 0x32, 0x94, 0x99, 0x24, 0x94,
                0xeb, 0x7d
            ]
        );
        assert_eq!(legacy, naa_identifier(t, 0));
        assert_eq!(default_serial(t, 0), "D5CC4F3514ABF8A8");
        let n3 = naa_in(IdentityFormat::Naa3, t, 0);
        assert_eq!(n3[..8], [0x35, 0xcc, 0x4f, 0x35, 0x14, 0xab, 0xf8, 0xa8]);
        assert_eq!(n3[8..], [0; 8]);
        let id = LuIdentity {
            naa: n3,
            ..lu_identity(t, 0, None)
        };
        assert_eq!(id.naa_designator().len(), 8);
        assert_eq!(lu_identity(t, 0, None).naa_designator().len(), 16);
        assert_ne!(naa3_identifier(t, 0), naa3_identifier(t, 1));
    }
}
