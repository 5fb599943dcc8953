//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS OPERATING PARAMETERS (SPC-4 §6.4, §6.18.4):
//! block-to-block copies within this LU, named by an identification target descriptor (E4h)
//! whose designator is the LU's NAA identifier.
use super::cdb::{be, byte};
use super::lun::{good, Fail, LogicalUnit, Out};
use super::sense::{key, Sense, PARAM_LIST_LENGTH, WRITE_PROTECTED};

/// Limits reported in OPERATING PARAMETERS and enforced on EXTENDED COPY.
pub(super) const MAX_TARGET_DESCRIPTORS: usize = 2;
pub(super) const MAX_SEGMENT_DESCRIPTORS: usize = 8;
pub(super) const MAX_DESCRIPTOR_LIST_LENGTH: usize = 1024;
/// Largest segment in bytes.
pub(super) const MAX_SEGMENT_BYTES: u64 = 32 << 20;

const TARGET_DESC_LEN: usize = 32;
const TYPE_IDENT_TARGET: u8 = 0xe4;
const TYPE_BLOCK_TO_BLOCK: u8 = 0x02;
/// Segment descriptor type 02h is 28 bytes; its DESCRIPTOR LENGTH field says 0018h.
const B2B_LEN: usize = 28;

/// 0A/0D/02 COPY TARGET DEVICE NOT REACHABLE.
const TARGET_NOT_REACHABLE: Sense = Sense::new(key::COPY_ABORTED, 0x0d, 0x02);
/// 0A/08/04 UNREACHABLE COPY TARGET (index beyond the target descriptor list).
const UNREACHABLE_TARGET: Sense = Sense::new(key::COPY_ABORTED, 0x08, 0x04);
/// A segment outside the medium aborts the copy (SPC-4 §6.4.6.1); libiscsi accepts the copy
/// aborted key with no additional sense code for it.
const SEGMENT_OUT_OF_RANGE: Sense = Sense::new(key::COPY_ABORTED, 0x00, 0x00);

impl LogicalUnit {
    pub(super) fn extended_copy(&self, nexus: u64, cdb: &[u8], data: &[u8]) -> Out {
        if byte(cdb, 1) & 0x1f != 0 {
            return Err(Sense::invalid_cdb_field(1, Some(4)).into());
        }
        let plen = be(cdb, 10, 4) as usize;
        if plen == 0 {
            return good(vec![]);
        }
        let data = data.get(..plen).ok_or(Fail::Check(PARAM_LIST_LENGTH))?;
        if data.len() < 16 {
            return Err(PARAM_LIST_LENGTH.into());
        }
        let tdl = be(data, 2, 2) as usize;
        let sdl = be(data, 8, 4) as usize;
        let inline = be(data, 12, 4) as usize;
        if 16 + tdl + sdl + inline > data.len() {
            return Err(PARAM_LIST_LENGTH.into());
        }
        if tdl + sdl > MAX_DESCRIPTOR_LIST_LENGTH {
            return Err(PARAM_LIST_LENGTH.into());
        }
        if inline != 0 {
            return Err(Sense::invalid_param_field(12, None).into());
        }
        if tdl % TARGET_DESC_LEN != 0 {
            return Err(PARAM_LIST_LENGTH.into());
        }
        let ntargets = tdl / TARGET_DESC_LEN;
        if ntargets > MAX_TARGET_DESCRIPTORS {
            // 05/26/06 TOO MANY TARGET DESCRIPTORS.
            return Err(Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x06).into());
        }
        let targets = &data[16..16 + tdl];
        let segs = &data[16 + tdl..16 + tdl + sdl];
        // Walk the segment list once for counts and type codes.
        let mut offs = Vec::new();
        let mut off = 0;
        while off < segs.len() {
            let dlen = be(segs, off + 2, 2) as usize + 4;
            if off + dlen > segs.len() || dlen < 4 {
                return Err(PARAM_LIST_LENGTH.into());
            }
            offs.push(off);
            off += dlen;
        }
        if offs.len() > MAX_SEGMENT_DESCRIPTORS {
            // 05/26/08 TOO MANY SEGMENT DESCRIPTORS.
            return Err(Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x08).into());
        }
        // Target descriptors: only E4h naming this LU (SPC-4 §6.4.5.5).
        let bs = self.block_size();
        for t in 0..ntargets {
            let d = &targets[t * TARGET_DESC_LEN..(t + 1) * TARGET_DESC_LEN];
            if d[0] != TYPE_IDENT_TARGET {
                // 05/26/07 UNSUPPORTED TARGET DESCRIPTOR TYPE CODE.
                return Err(Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x07).into());
            }
            // LU ID TYPE is ignored in SPC-4; NUL is obsolete.
            if d[1] & 0x1f != 0 {
                return Err(TARGET_NOT_REACHABLE.into());
            }
            let desig = &d[4..28];
            let len = desig[3] as usize;
            let naa = self.identity.naa_designator();
            let matches =
                desig[1] & 0x0f == 3 && len == naa.len() && desig.get(4..4 + len) == Some(naa);
            if !matches {
                return Err(TARGET_NOT_REACHABLE.into());
            }
            if be(d, 29, 3) != bs {
                return Err(TARGET_NOT_REACHABLE.into());
            }
        }
        let mut plan = Vec::with_capacity(offs.len());
        for &o in &offs {
            let s = &segs[o..];
            if s[0] != TYPE_BLOCK_TO_BLOCK {
                // 05/26/09 UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE.
                return Err(Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x09).into());
            }
            if be(s, 2, 2) as usize + 4 != B2B_LEN {
                return Err(Sense::invalid_param_field((16 + tdl + o + 2) as u16, None).into());
            }
            let (src, dst) = (be(s, 4, 2) as usize, be(s, 6, 2) as usize);
            if src >= ntargets || dst >= ntargets {
                return Err(UNREACHABLE_TARGET.into());
            }
            let n = be(s, 10, 2);
            let (src_lba, dst_lba) = (be(s, 12, 8), be(s, 20, 8));
            if n * bs > MAX_SEGMENT_BYTES {
                return Err(Sense::invalid_param_field((16 + tdl + o + 10) as u16, None).into());
            }
            let fits = |lba: u64| lba.checked_add(n).is_some_and(|e| e <= self.blocks());
            if !fits(src_lba) || !fits(dst_lba) {
                return Err(SEGMENT_OUT_OF_RANGE.into());
            }
            plan.push((src_lba, dst_lba, n));
        }
        if !plan.is_empty() && self.write_protected() {
            return Err(WRITE_PROTECTED.into());
        }
        let mut bytes = 0u64;
        for &(src, dst, n) in &plan {
            self.copy_blocks(src, dst, n)?;
            bytes += n * bs;
        }
        // Keep the outcome for RECEIVE COPY RESULTS COPY STATUS unless LIST ID USAGE is 11b
        // (list identifier ignored, SPC-4 §6.4.3.2).
        if byte(data, 1) & 0x18 != 0x18 {
            let mut st = self.lock();
            st.copy_results.insert(
                (nexus, byte(data, 0)),
                (plan.len() as u16, u32::try_from(bytes).unwrap_or(u32::MAX)),
            );
        }
        good(vec![])
    }

    /// Copy in bounded chunks; overlapping ranges copy like memmove.
    fn copy_blocks(&self, src: u64, dst: u64, n: u64) -> Result<(), Fail> {
        let bs = self.block_size();
        let chunk = ((1 << 20) / bs).max(1);
        let mut idx: Vec<u64> = (0..n.div_ceil(chunk)).collect();
        if dst > src {
            idx.reverse();
        }
        for i in idx {
            let first = i * chunk;
            let k = (n - first).min(chunk);
            let mut buf = vec![0u8; (k * bs) as usize];
            self.store
                .read_at(&mut buf, (src + first) * bs)
                .map_err(|_| Fail::Check(Sense::new(key::COPY_ABORTED, 0x11, 0x00)))?;
            self.write_shared(&buf, (dst + first) * bs, false)?;
        }
        Ok(())
    }

    /// RECEIVE COPY RESULTS (SPC-4 §6.18): COPY STATUS and OPERATING PARAMETERS. Copies
    /// complete before EXTENDED COPY returns, so a status is always "completed".
    pub(super) fn receive_copy_results(&self, nexus: u64, cdb: &[u8]) -> Out {
        let alloc = be(cdb, 10, 4) as usize;
        if byte(cdb, 1) & 0x1f == 0x00 {
            let found = self
                .lock()
                .copy_results
                .get(&(nexus, byte(cdb, 2)))
                .copied();
            let Some((segments, bytes)) = found else {
                // No copy with that list identifier from this nexus (SPC-4 §6.18.2).
                return Err(Sense::invalid_cdb_field(2, None).into());
            };
            let mut v = vec![0, 0, 0, 8, 0x00];
            v.extend_from_slice(&segments.to_be_bytes());
            v.push(0); // transfer count in bytes
            v.extend_from_slice(&bytes.to_be_bytes());
            v.truncate(alloc);
            return good(v);
        }
        if byte(cdb, 1) & 0x1f != 0x03 {
            return Err(Sense::invalid_cdb_field(1, Some(4)).into());
        }
        let mut v = vec![0u8; 44];
        v[8..10].copy_from_slice(&(MAX_TARGET_DESCRIPTORS as u16).to_be_bytes());
        v[10..12].copy_from_slice(&(MAX_SEGMENT_DESCRIPTORS as u16).to_be_bytes());
        v[12..16].copy_from_slice(&(MAX_DESCRIPTOR_LIST_LENGTH as u32).to_be_bytes());
        v[16..20].copy_from_slice(&(MAX_SEGMENT_BYTES as u32).to_be_bytes());
        // No inline or held data, no stream devices; one copy at a time per command.
        v[34..36].copy_from_slice(&1u16.to_be_bytes());
        v[36] = 1;
        v[37] = self.block_size().trailing_zeros() as u8;
        let codes = [TYPE_BLOCK_TO_BLOCK, TYPE_IDENT_TARGET];
        v[43] = codes.len() as u8;
        v.extend_from_slice(&codes);
        let avail = (v.len() - 4) as u32;
        v[0..4].copy_from_slice(&avail.to_be_bytes());
        v.truncate(alloc);
        good(v)
    }
}

/// Third-party Copy VPD page body (SPC-4 §7.8.17): the Supported Commands descriptor.
pub(super) fn third_party_copy_vpd() -> Vec<u8> {
    let cmds = [0x83u8, 1, 0x00, 0x84, 2, 0x00, 0x03];
    let mut d = vec![cmds.len() as u8];
    d.extend_from_slice(&cmds);
    while d.len() % 4 != 0 {
        d.push(0);
    }
    let mut v = vec![0x00, 0x01];
    v.extend_from_slice(&(d.len() as u16).to_be_bytes());
    v.extend(d);
    v
}
