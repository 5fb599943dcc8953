//! SPC-4 device-level commands: INQUIRY and VPD pages, MODE SENSE/SELECT, REPORT SUPPORTED
//! OPERATION CODES.
use super::cdb::{be, byte, has_service_action, op, CmdInfo, COMMANDS};
use super::lun::{good, Fail, LogicalUnit, ModeState, Out, MAX_CAW_BLOCKS};
use super::sense::{Sense, INVALID_FIELD_PARAM, PARAM_LIST_LENGTH, SAVING_NOT_SUPPORTED};
use super::Nexus;

fn padded(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .map(|b| if (0x20..0x7f).contains(&b) { b } else { b' ' })
        .take(n)
        .collect();
    v.resize(n, b' ');
    v
}

/// VPD pages we serve, ascending (SPC-4 §7.8.13 requires the list sorted).
const VPD_PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2];

impl LogicalUnit {
    /// INQUIRY (SPC-4 §6.6). Short allocation lengths truncate, never fail.
    pub(super) fn inquiry(&self, nexus: &Nexus, cdb: &[u8]) -> Out {
        let evpd = byte(cdb, 1) & 1 != 0;
        let page = byte(cdb, 2);
        let alloc = be(cdb, 3, 2) as usize;
        let mut v = if !evpd {
            if page != 0 {
                return Err(Sense::invalid_cdb_field(2, None).into());
            }
            self.standard_inquiry()
        } else {
            self.vpd(nexus, page)?
        };
        v.truncate(alloc);
        good(v)
    }

    fn standard_inquiry(&self) -> Vec<u8> {
        let mut v = vec![0u8; 8];
        v[1] = if self.opts.removable { 0x80 } else { 0 };
        v[2] = 0x06; // SPC-4
        v[3] = 0x12; // HISUP, response data format 2
                     // 3PC: EXTENDED COPY; TPGS 01b: implicit ALUA (REPORT TARGET PORT GROUPS, every
                     // group active/optimized: all paths are equal).
        v[5] = 0x08 | 0x10;
        v[7] = 0x02; // CMDQUE
        v.extend(padded(&self.identity.vendor, 8));
        v.extend(padded(&self.identity.product, 16));
        v.extend(padded(&self.identity.revision, 4));
        v.resize(58, 0);
        // Version descriptors (SPC-4 §6.6.2 table): SAM-5, iSCSI, SPC-4, SBC-3.
        for d in [0x00a0u16, 0x0960, 0x0460, 0x04c0] {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.resize(74, 0);
        v[4] = (v.len() - 5) as u8;
        v
    }

    fn vpd(&self, nexus: &Nexus, page: u8) -> Result<Vec<u8>, Fail> {
        let mut body = Vec::new();
        match page {
            0x00 => body.extend_from_slice(&VPD_PAGES),
            0x80 => body.extend(padded(
                &self.identity.serial,
                self.identity.serial.len().min(250),
            )),
            0x83 => {
                // NAA (type 3, binary) for the LU; its length follows the NAA field.
                let naa = self.identity.naa_designator();
                body.extend_from_slice(&[0x01, 0x03, 0, naa.len() as u8]);
                body.extend_from_slice(naa);
                // T10 vendor ID (type 1, ASCII): vendor + product + serial.
                let mut t10 = padded(&self.identity.vendor, 8);
                t10.extend(padded(&self.identity.product, 16));
                // The designator length is one byte: keep the serial part bounded.
                t10.extend(padded(
                    &self.identity.serial,
                    self.identity.serial.len().min(200),
                ));
                body.extend_from_slice(&[0x02, 0x01, 0, t10.len() as u8]);
                body.extend(t10);
                // Relative target port (type 4, association target port, iSCSI, PIV).
                body.extend_from_slice(&[0x51, 0x94, 0, 4, 0, 0]);
                body.extend_from_slice(&nexus.relative_port.to_be_bytes());
                // Target port group (type 5): one group per portal group, numbered like the
                // relative port, so MPIO (MSDSM, dm-multipath) tells the paths apart.
                body.extend_from_slice(&[0x51, 0x95, 0, 4, 0, 0]);
                body.extend_from_slice(&nexus.relative_port.to_be_bytes());
                // SCSI name string of the target port (type 8, UTF-8, association target
                // port, iSCSI, PIV; SPC-4 §7.8.6.11): NUL-terminated, padded to a multiple of
                // 4 bytes, at most 255 (a longer name is left out rather than cut).
                if !nexus.target_port.is_empty() {
                    let mut name = nexus.target_port.as_bytes().to_vec();
                    name.push(0);
                    name.resize(name.len().next_multiple_of(4), 0);
                    if let Ok(len) = u8::try_from(name.len()) {
                        body.extend_from_slice(&[0x53, 0x98, 0, len]);
                        body.extend(name);
                    }
                }
            }
            0x8f => body = super::xcopy::third_party_copy_vpd(),
            0xb0 => {
                // Block limits (SBC-3 §6.5.3).
                body.resize(0x3c, 0);
                let thin = self.thin();
                // Granularities follow the physical block (512e: 8 logical blocks).
                let per_physical = 1u32 << (self.opts.physical_block_exponent & 0x0f);
                body[1] = MAX_CAW_BLOCKS as u8;
                body[2..4].copy_from_slice(&(per_physical.min(0xffff) as u16).to_be_bytes());
                body[4..8].copy_from_slice(&self.opts.max_transfer_blocks.to_be_bytes());
                // OPTIMAL TRANSFER LENGTH: 1 MiB, what the data path streams best, and below
                // the 65535 blocks Linux takes at most (it warns "Optimal transfer size ... >
                // dev_max" and ignores larger values).
                let optimal = ((1u32 << 20) / self.block_size().max(1) as u32)
                    .max(per_physical)
                    .min(self.opts.max_transfer_blocks);
                body[8..12].copy_from_slice(&optimal.to_be_bytes());
                if thin {
                    body[16..20].copy_from_slice(&self.opts.max_unmap_blocks.to_be_bytes());
                    body[20..24].copy_from_slice(&self.opts.max_unmap_descriptors.to_be_bytes());
                    body[24..28].copy_from_slice(&per_physical.to_be_bytes());
                }
                body[32..40]
                    .copy_from_slice(&u64::from(self.opts.max_write_same_blocks).to_be_bytes());
                // MAXIMUM ATOMIC TRANSFER LENGTH (SBC-4): WRITE ATOMIC(16) takes anything a
                // WRITE does; alignment and granularity 0 = no constraint.
                body[40..44].copy_from_slice(&self.opts.max_transfer_blocks.to_be_bytes());
            }
            0xb1 => {
                // Block device characteristics (SBC-3 §6.5.2): non-rotating medium.
                body.resize(0x3c, 0);
                body[0..2].copy_from_slice(&1u16.to_be_bytes());
                if self.thin() {
                    // WABEREQ = WACEREQ = 01b: reads after a SANITIZE BLOCK / CRYPTO ERASE
                    // succeed (with zeroes) (SBC-4 §6.6.2).
                    body[3] = 0x50;
                }
            }
            0xb2 => {
                // Logical block provisioning (SBC-3 §6.5.4).
                body.resize(4, 0);
                if self.thin() {
                    body[1] = 0x80 | 0x40 | 0x20 | 0x04; // LBPU LBPWS LBPWS10 LBPRZ
                    body[2] = 0x02; // thin provisioned
                }
            }
            _ => return Err(Sense::invalid_cdb_field(2, None).into()),
        }
        let mut v = vec![0, page];
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend(body);
        Ok(v)
    }

    /// LOG SENSE (SPC-4 §6.8): page 0x00 (supported pages) and, on a thin LU whose store
    /// knows its space, page 0x0C logical block provisioning (SBC-4 §6.4.6): available and
    /// used LBA mapping resources in threshold sets of 2^THRESHOLD EXPONENT blocks; VPD 0xB2
    /// says 0 (no thresholds), so the counts are in logical blocks (saturating at 2^32 - 1).
    /// Windows shows thin-provisioning usage from it.
    pub(super) fn log_sense(&self, cdb: &[u8]) -> Out {
        let page = byte(cdb, 2) & 0x3f;
        let sub = byte(cdb, 3);
        let pointer = be(cdb, 5, 2);
        let alloc = be(cdb, 7, 2) as usize;
        let space = if self.thin() {
            self.store.space()
        } else {
            None
        };
        let mut supported = vec![0x00];
        if space.is_some() {
            supported.push(0x0c);
        }
        if sub != 0 {
            return Err(Sense::invalid_cdb_field(3, None).into());
        }
        let body = match (page, space) {
            (0x00, _) => {
                if pointer != 0 {
                    return Err(Sense::invalid_cdb_field(5, None).into());
                }
                supported
            }
            (0x0c, Some(sp)) => {
                let unit = self.block_size();
                let count = |bytes: u64| u32::try_from(bytes / unit.max(1)).unwrap_or(u32::MAX);
                let mut b = Vec::new();
                for (code, bytes) in [(1u16, sp.available), (2, sp.used)] {
                    if code < pointer as u16 {
                        continue;
                    }
                    // Binary list parameter (FORMAT AND LINKING 11b), 8 bytes: RESOURCE
                    // COUNT and SCOPE 01b (dedicated to this LU).
                    b.extend_from_slice(&code.to_be_bytes());
                    b.extend_from_slice(&[0x03, 0x08]);
                    b.extend_from_slice(&count(bytes).to_be_bytes());
                    b.extend_from_slice(&[0x01, 0, 0, 0]);
                }
                if pointer > 2 {
                    return Err(Sense::invalid_cdb_field(5, None).into());
                }
                b
            }
            _ => return Err(Sense::invalid_cdb_field(2, Some(5)).into()),
        };
        let mut v = vec![page, 0];
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend(body);
        v.truncate(alloc);
        good(v)
    }

    /// REPORT TARGET PORT GROUPS (SPC-4 §6.37), length-only format: every portal group is a
    /// target port group with one target port (relative port = group number), asymmetric
    /// access state active/optimized (implicit ALUA: nothing to switch, all paths equal).
    pub(super) fn report_target_port_groups(&self, cdb: &[u8]) -> Out {
        if byte(cdb, 1) >> 5 != 0 {
            // Only the length-only header format (PARAMETER DATA FORMAT 000b).
            return Err(Sense::invalid_cdb_field(1, Some(7)).into());
        }
        let alloc = be(cdb, 6, 4) as usize;
        let mut d = Vec::new();
        let groups = self
            .port_groups
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(1);
        for g in 1..=groups {
            // PREF 1, state 0h active/optimized; AO_SUP; TPG id; status; target port count.
            d.extend_from_slice(&[0x80, 0x01]);
            d.extend_from_slice(&g.to_be_bytes());
            d.extend_from_slice(&[0, 0, 0, 1, 0, 0]);
            d.extend_from_slice(&g.to_be_bytes());
        }
        let mut v = (d.len() as u32).to_be_bytes().to_vec();
        v.extend(d);
        v.truncate(alloc);
        good(v)
    }

    /// One mode page as current (or changeable / default) values.
    fn mode_page(&self, code: u8, m: &ModeState, changeable: bool) -> Vec<u8> {
        match code {
            0x08 => {
                let mut p = vec![0u8; 20];
                p[0] = 0x08;
                p[1] = 0x12;
                if changeable {
                    p[2] = 0x04;
                } else {
                    p[2] = if m.wce { 0x04 } else { 0 };
                }
                p
            }
            0x0a => {
                let mut p = vec![0u8; 12];
                p[0] = 0x0a;
                p[1] = 0x0a;
                if changeable {
                    p[2] = 0x04;
                    p[4] = 0x08;
                } else {
                    p[2] = if m.d_sense { 0x04 } else { 0 };
                    // QAM 0, QERR 00; SWP in byte 4 bit 3.
                    p[4] = if m.swp { 0x08 } else { 0 };
                    p[8..10].copy_from_slice(&0xffffu16.to_be_bytes());
                }
                p
            }
            _ => {
                // 0x1C informational exceptions control, nothing enabled.
                let mut p = vec![0u8; 12];
                p[0] = 0x1c;
                p[1] = 0x0a;
                p
            }
        }
    }

    /// MODE SENSE(6)/(10) (SPC-4 §6.11/§6.12).
    pub(super) fn mode_sense(&self, cdb: &[u8]) -> Out {
        let ten = byte(cdb, 0) == 0x5a;
        let dbd = byte(cdb, 1) & 0x08 != 0;
        let llbaa = ten && byte(cdb, 1) & 0x10 != 0;
        let pc = byte(cdb, 2) >> 6;
        let page = byte(cdb, 2) & 0x3f;
        let sub = byte(cdb, 3);
        let alloc = if ten { be(cdb, 7, 2) } else { be(cdb, 4, 1) } as usize;
        if pc == 3 {
            return Err(SAVING_NOT_SUPPORTED.into());
        }
        let pages: Vec<u8> = match (page, sub) {
            (0x3f, 0 | 0xff) => vec![0x08, 0x0a, 0x1c],
            (0x08 | 0x0a | 0x1c, 0) => vec![page],
            (0x08 | 0x0a | 0x1c | 0x3f, _) => return Err(Sense::invalid_cdb_field(3, None).into()),
            _ => return Err(Sense::invalid_cdb_field(2, Some(5)).into()),
        };
        let m = match pc {
            2 => ModeState::default(),
            _ => self.lock().mode,
        };
        let mut body = Vec::new();
        for p in pages {
            body.extend(self.mode_page(p, &m, pc == 1));
        }
        let mut bd = Vec::new();
        if !dbd {
            let blocks = self.blocks();
            let bs = self.block_size() as u32;
            if llbaa {
                bd.extend_from_slice(&blocks.to_be_bytes());
                bd.extend_from_slice(&[0, 0, 0, 0]);
                bd.extend_from_slice(&bs.to_be_bytes());
            } else {
                bd.extend_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
                bd.push(0);
                bd.extend_from_slice(&bs.to_be_bytes()[1..]);
            }
        }
        // Device-specific parameter: WP (SBC-3 §6.4.1) and DPOFUA.
        let dsp = if self.write_protected() { 0x90 } else { 0x10 };
        let mut v = if ten {
            let total = 8 + bd.len() + body.len();
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&((total - 2) as u16).to_be_bytes());
            h[3] = dsp;
            h[4] = if llbaa && !dbd { 1 } else { 0 };
            h[6..8].copy_from_slice(&(bd.len() as u16).to_be_bytes());
            h
        } else {
            let total = 4 + bd.len() + body.len();
            vec![(total - 1).min(255) as u8, 0, dsp, bd.len() as u8]
        };
        v.extend(bd);
        v.extend(body);
        v.truncate(alloc);
        good(v)
    }

    /// MODE SELECT(6)/(10) (SPC-4 §6.9/§6.10): only the changeable bits may differ.
    pub(super) fn mode_select(&self, nexus: &Nexus, cdb: &[u8], data: &[u8]) -> Out {
        let ten = byte(cdb, 0) == 0x55;
        // SP = 1 (save pages): the saved values are the defaults and cannot change, so a page
        // is accepted when it equals them (saving would change nothing; Windows' disk driver
        // sends the informational exceptions page this way), else 05/39/00 SAVING
        // PARAMETERS NOT SUPPORTED (SPC-4 §6.11, §7.5.2).
        let save = byte(cdb, 1) & 0x01 != 0;
        let plen = if ten { be(cdb, 7, 2) } else { be(cdb, 4, 1) } as usize;
        if plen == 0 {
            return good(vec![]);
        }
        let data = data.get(..plen).ok_or(Fail::Check(PARAM_LIST_LENGTH))?;
        let (hlen, bdlen) = if ten {
            (8, be(data, 6, 2) as usize)
        } else {
            (4, be(data, 3, 1) as usize)
        };
        if data.len() < hlen {
            return Err(PARAM_LIST_LENGTH.into());
        }
        let mut off = hlen + bdlen;
        if off > data.len() {
            return Err(PARAM_LIST_LENGTH.into());
        }
        let mut st = self.lock();
        let mut m = st.mode;
        while off < data.len() {
            let code = byte(data, off) & 0x3f;
            if byte(data, off) & 0x40 != 0 {
                return Err(Sense::invalid_param_field(off as u16, Some(6)).into());
            }
            let len = byte(data, off + 1) as usize;
            let page = data
                .get(off..off + 2 + len)
                .ok_or(Fail::Check(PARAM_LIST_LENGTH))?;
            if !matches!(code, 0x08 | 0x0a | 0x1c) {
                return Err(Sense::invalid_param_field(off as u16, None).into());
            }
            if save {
                let saved = self.mode_page(code, &ModeState::default(), false);
                if page.get(1..) != saved.get(1..) {
                    return Err(SAVING_NOT_SUPPORTED.into());
                }
            }
            let cur = self.mode_page(code, &m, false);
            let chg = self.mode_page(code, &m, true);
            if page.len() != cur.len() {
                return Err(Sense::invalid_param_field(off as u16 + 1, None).into());
            }
            for i in 2..cur.len() {
                let (n, c, k) = (page[i], cur[i], chg[i]);
                if (n ^ c) & !k != 0 {
                    return Err(Sense::invalid_param_field((off + i) as u16, None).into());
                }
            }
            match code {
                0x08 => m.wce = page[2] & 0x04 != 0,
                0x0a => {
                    m.d_sense = page[2] & 0x04 != 0;
                    m.swp = page[4] & 0x08 != 0;
                }
                _ => {}
            }
            off += 2 + len;
        }
        if m != st.mode {
            st.mode = m;
            // Mode parameters changed: tell the other nexuses (SPC-4 §7.5.1, 06/2A/01).
            self.ua_others(&mut st, Some(nexus.id), 0x2a, 0x01);
        }
        let _ = INVALID_FIELD_PARAM;
        good(vec![])
    }
}

/// Commands as this LU supports them: without UNMAP and the WRITE SAME UNMAP bit unless it
/// is thin provisioned.
fn deallocates(c: &CmdInfo) -> bool {
    c.opcode == op::UNMAP
        || (c.opcode == op::SANITIZE
            && matches!(c.sa, Some(op::SA_BLOCK_ERASE | op::SA_CRYPTO_ERASE)))
}

fn supported(thin: bool) -> impl Iterator<Item = CmdInfo> {
    COMMANDS
        .iter()
        // UNMAP and the SANITIZE erases that deallocate exist only on thin LUs.
        .filter(move |c| thin || !deallocates(c))
        .map(move |c| {
            let mut usage = c.usage.to_vec();
            if !thin && matches!(c.opcode, op::WRITE_SAME10 | op::WRITE_SAME16) {
                if let Some(b) = usage.get_mut(1) {
                    *b &= !0x08;
                }
            }
            CmdInfo {
                opcode: c.opcode,
                sa: c.sa,
                usage: usage.into(),
                timeout: c.timeout,
            }
        })
}

fn one_descriptor(c: &CmdInfo, rctd: bool) -> Vec<u8> {
    let mut v = vec![c.opcode, 0];
    v.extend_from_slice(&u16::from(c.sa.unwrap_or(0)).to_be_bytes());
    v.push(0);
    v.push(if c.sa.is_some() { 0x01 } else { 0 } | if rctd { 0x02 } else { 0 });
    v.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
    if rctd {
        v.extend(timeouts(c));
    }
    v
}

/// The usage map as reported: byte 0 is the opcode and a service action field holds the
/// service action (SPC-4 §6.35.3).
fn reported_usage(c: &CmdInfo) -> Vec<u8> {
    let mut u = c.usage.to_vec();
    if let Some(b) = u.first_mut() {
        *b = c.opcode;
    }
    if let (Some(sa), Some(b)) = (c.sa, u.get_mut(1)) {
        *b = (*b & !0x1f) | sa;
    }
    u
}

fn timeouts(c: &CmdInfo) -> Vec<u8> {
    let mut v = vec![0, 0x0a, 0, 0];
    v.extend_from_slice(&c.timeout.to_be_bytes());
    v.extend_from_slice(&c.timeout.to_be_bytes());
    v
}

/// REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35).
pub(super) fn report_opcodes(cdb: &[u8], thin: bool) -> Out {
    let rctd = byte(cdb, 2) & 0x80 != 0;
    let options = byte(cdb, 2) & 0x07;
    let req_op = byte(cdb, 3);
    let req_sa = be(cdb, 4, 2);
    let alloc = be(cdb, 6, 4) as usize;
    let mut v = Vec::new();
    match options {
        0 => {
            let mut d = Vec::new();
            for c in supported(thin) {
                d.extend(one_descriptor(&c, rctd));
            }
            v.extend_from_slice(&(d.len() as u32).to_be_bytes());
            v.extend(d);
        }
        1..=3 => {
            let sa_cmd = has_service_action(req_op);
            // Option 1 asks by opcode only, 2 by opcode + service action (SPC-4 table 323).
            if (options == 1 && sa_cmd) || (options == 2 && !sa_cmd) {
                return Err(Sense::invalid_cdb_field(2, Some(2)).into());
            }
            let found = supported(thin).find(|c| {
                c.opcode == req_op
                    && (options == 1
                        || c.sa.map(u64::from) == Some(req_sa)
                        || (options == 3 && c.sa.is_none() && req_sa == 0))
            });
            match found {
                Some(c) => {
                    v.extend_from_slice(&[0, if rctd { 0x83 } else { 0x03 }]);
                    v.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
                    v.extend(reported_usage(&c));
                    if rctd {
                        v.extend(timeouts(&c));
                    }
                }
                None => {
                    // SUPPORT 001b: not supported.
                    v.extend_from_slice(&[0, if rctd { 0x81 } else { 0x01 }, 0, 0]);
                }
            }
        }
        _ => return Err(Sense::invalid_cdb_field(2, Some(2)).into()),
    }
    v.truncate(alloc);
    good(v)
}
