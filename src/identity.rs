//! LUN identity (stable across restarts, unique per target and LUN), shared by plain targets
//! (`registry`) and client disks (`boot`): h = MD5 of `"diskless\0" + target name + "\0" +
//! decimal LUN`. The default serial (VPD 0x80) is the first 8 bytes of h as 16 uppercase hex
//! digits. The NAA identifier (VPD 0x83, SPC-4 Device Identification page) is h with its
//! first nibble replaced by 6 (IEEE Registered Extended); the IEEE company ID field is
//! therefore hash bits, not a registered OUI.

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
