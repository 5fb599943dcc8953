//! Persistent reservations (SPC-4 §5.9, §6.13 PERSISTENT RESERVE IN, §6.14 OUT) and the
//! access rules of SPC-4 §5.9.1 (table 49 / 50 in r37). Registrations belong to an I_T nexus,
//! identified by initiator port name and relative target port so that they survive the
//! transport's nexus objects (a re-login with the same ISID is the same I_T nexus).
use super::cdb::{be, byte};
use super::sense::{Sense, INVALID_FIELD_PARAM, PARAM_LIST_LENGTH};

/// Reservation types (SPC-4 §6.13.3.4).
pub mod ty {
    pub const WE: u8 = 1;
    pub const EA: u8 = 3;
    pub const WE_RO: u8 = 5;
    pub const EA_RO: u8 = 6;
    pub const WE_AR: u8 = 7;
    pub const EA_AR: u8 = 8;
}

/// Registrations kept at most (one per I_T nexus).
const MAX_REGISTRATIONS: usize = 256;

/// I_T nexus identity for PR purposes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortId {
    pub initiator_port: String,
    pub relative_port: u16,
}

#[derive(Debug, Clone)]
struct Registration {
    who: PortId,
    key: u64,
}

#[derive(Debug, Clone)]
struct Reservation {
    /// Holder for the single-holder types; ignored for all-registrants types.
    holder: PortId,
    kind: u8,
}

/// Outcome of PERSISTENT RESERVE OUT besides GOOD.
#[derive(Debug, PartialEq, Eq)]
pub enum PrError {
    Conflict,
    Check(Sense),
}

impl From<Sense> for PrError {
    fn from(s: Sense) -> Self {
        PrError::Check(s)
    }
}

/// Unit attentions PR OUT wants established: (who, asc, ascq).
pub type PrUas = Vec<(PortId, u8, u8)>;

#[derive(Debug, Default, Clone)]
pub struct PrState {
    generation: u32,
    regs: Vec<Registration>,
    res: Option<Reservation>,
    /// The APTPL bit of the last REGISTER (SPC-4 §5.13.4 / r37 §5.9.4): keep registrations
    /// and the reservation through a power loss.
    aptpl: bool,
    /// Whether the LU can persist them (PTPL_C in REPORT CAPABILITIES).
    pub(super) ptpl_capable: bool,
}

/// A persistent reservation file that cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum PrFileError {
    #[error("line {line}: {why}")]
    Malformed { line: usize, why: &'static str },
}

/// First line of a persisted state file (format version 1).
const PR_FILE_MAGIC: &str = "diskless-pr 1";

fn all_registrants(kind: u8) -> bool {
    kind == ty::WE_AR || kind == ty::EA_AR
}

/// Access class of a command for the conflict rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Allowed under any reservation (INQUIRY, REPORT LUNS, PR IN/OUT, ...).
    Always,
    Read,
    Write,
}

impl PrState {
    pub fn is_empty(&self) -> bool {
        self.regs.is_empty() && self.res.is_none()
    }

    fn key_of(&self, who: &PortId) -> Option<u64> {
        self.regs.iter().find(|r| &r.who == who).map(|r| r.key)
    }

    fn is_holder(&self, who: &PortId) -> bool {
        match &self.res {
            Some(r) if all_registrants(r.kind) => self.key_of(who).is_some(),
            Some(r) => &r.holder == who,
            None => false,
        }
    }

    /// SPC-4 §5.9.1: whether `who` may run a command of class `access`.
    pub fn allows(&self, who: &PortId, access: Access) -> bool {
        let Some(res) = &self.res else { return true };
        if access == Access::Always || self.is_holder(who) {
            return true;
        }
        let registered = self.key_of(who).is_some();
        match res.kind {
            ty::WE => access == Access::Read,
            ty::EA => false,
            ty::WE_RO | ty::WE_AR => registered || access == Access::Read,
            ty::EA_RO | ty::EA_AR => registered,
            _ => false,
        }
    }

    /// Whether the state must survive a power loss (the last REGISTER had APTPL = 1).
    pub fn aptpl(&self) -> bool {
        self.aptpl
    }

    /// The state as a small text file: generation, then one line per registration and the
    /// reservation. Initiator port names (iSCSI names, "," and hex) hold no spaces.
    pub fn encode(&self) -> String {
        let mut t = format!("{PR_FILE_MAGIC}\ngeneration {}\n", self.generation);
        for r in &self.regs {
            t.push_str(&format!(
                "reg {:016x} {} {}\n",
                r.key, r.who.relative_port, r.who.initiator_port
            ));
        }
        if let Some(r) = &self.res {
            t.push_str(&format!(
                "res {} {} {}\n",
                r.kind, r.holder.relative_port, r.holder.initiator_port
            ));
        }
        t
    }

    /// Read back what [`PrState::encode`] wrote (APTPL set: it was persisted because of it).
    pub fn decode(text: &str) -> Result<PrState, PrFileError> {
        let bad = |line: usize, why| PrFileError::Malformed { line, why };
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
        match lines.next() {
            Some((_, l)) if l == PR_FILE_MAGIC => {}
            _ => return Err(bad(1, "not a diskless persistent reservation file")),
        }
        let mut st = PrState {
            aptpl: true,
            ptpl_capable: true,
            ..PrState::default()
        };
        for (n, line) in lines {
            let mut f = line.splitn(4, ' ');
            let (tag, a, b, c) = (f.next(), f.next(), f.next(), f.next());
            let port = |b: Option<&str>, c: Option<&str>| -> Result<PortId, PrFileError> {
                let relative_port = b
                    .and_then(|b| b.parse().ok())
                    .ok_or(bad(n, "bad relative port"))?;
                let initiator_port = c
                    .filter(|c| !c.is_empty())
                    .ok_or(bad(n, "missing initiator port"))?;
                Ok(PortId {
                    initiator_port: initiator_port.to_string(),
                    relative_port,
                })
            };
            match tag {
                Some("generation") => {
                    st.generation = a
                        .and_then(|a| a.parse().ok())
                        .ok_or(bad(n, "bad generation"))?;
                }
                Some("reg") => {
                    if st.regs.len() >= MAX_REGISTRATIONS {
                        return Err(bad(n, "too many registrations"));
                    }
                    let key = a
                        .and_then(|a| u64::from_str_radix(a, 16).ok())
                        .ok_or(bad(n, "bad key"))?;
                    st.regs.push(Registration {
                        who: port(b, c)?,
                        key,
                    });
                }
                Some("res") => {
                    let kind = a
                        .and_then(|a| a.parse().ok())
                        .filter(|k| matches!(k, 1 | 3 | 5 | 6 | 7 | 8))
                        .ok_or(bad(n, "bad reservation type"))?;
                    st.res = Some(Reservation {
                        holder: port(b, c)?,
                        kind,
                    });
                }
                Some("") | None => {}
                Some(_) => return Err(bad(n, "unknown line")),
            }
        }
        Ok(st)
    }

    /// PERSISTENT RESERVE IN (SPC-4 §6.13). Returns the full parameter data.
    pub fn read(&self, sa: u8) -> Result<Vec<u8>, Sense> {
        let mut v = Vec::new();
        v.extend_from_slice(&self.generation.to_be_bytes());
        match sa {
            0 => {
                let keys: Vec<u8> = self.regs.iter().flat_map(|r| r.key.to_be_bytes()).collect();
                v.extend_from_slice(&(keys.len() as u32).to_be_bytes());
                v.extend_from_slice(&keys);
            }
            1 => match &self.res {
                None => v.extend_from_slice(&0u32.to_be_bytes()),
                Some(r) => {
                    v.extend_from_slice(&16u32.to_be_bytes());
                    // All-registrants reservations report key 0 (SPC-4 §6.13.3.1).
                    let key = if all_registrants(r.kind) {
                        0
                    } else {
                        self.key_of(&r.holder).unwrap_or(0)
                    };
                    v.extend_from_slice(&key.to_be_bytes());
                    v.extend_from_slice(&[0, 0, 0, 0, 0, r.kind & 0x0f, 0, 0]);
                }
            },
            2 => {
                // REPORT CAPABILITIES (SPC-4 §6.13.4): ATP_C (ALL_TG_PT is harmless),
                // PTPL_C when the LU can persist, TMV with every type, PTPL_A = the last
                // APTPL bit.
                v.clear();
                let ptpl_c = u8::from(self.ptpl_capable);
                let ptpl_a = u8::from(self.ptpl_capable && self.aptpl);
                v.extend_from_slice(&[0, 8, 0x04 | ptpl_c, 0x80 | ptpl_a, 0xea, 0x01, 0, 0]);
            }
            3 => {
                let mut d = Vec::new();
                for r in &self.regs {
                    let holder = self.is_holder(&r.who) && self.res.is_some();
                    d.extend_from_slice(&r.key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0]);
                    d.push(if holder { 1 } else { 0 });
                    d.push(match (&self.res, holder) {
                        (Some(res), true) => res.kind & 0x0f,
                        _ => 0,
                    });
                    d.extend_from_slice(&[0, 0, 0, 0]);
                    d.extend_from_slice(&r.who.relative_port.to_be_bytes());
                    let tid = transport_id(&r.who.initiator_port);
                    d.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    d.extend_from_slice(&tid);
                }
                v.extend_from_slice(&(d.len() as u32).to_be_bytes());
                v.extend_from_slice(&d);
            }
            _ => return Err(Sense::invalid_cdb_field(1, Some(4))),
        }
        Ok(v)
    }

    /// PERSISTENT RESERVE OUT (SPC-4 §6.14, §5.9.5-§5.9.11).
    pub fn out(&mut self, who: &PortId, cdb: &[u8], param: &[u8]) -> Result<PrUas, PrError> {
        let sa = byte(cdb, 1) & 0x1f;
        let scope = byte(cdb, 2) >> 4;
        let kind = byte(cdb, 2) & 0x0f;
        let plen = be(cdb, 5, 4);
        if plen != 24 {
            return Err(PARAM_LIST_LENGTH.into());
        }
        if param.len() < 24 {
            return Err(PARAM_LIST_LENGTH.into());
        }
        let key = be(param, 0, 8);
        let sa_key = be(param, 8, 8);
        let flags = byte(param, 20);
        if flags & 0x08 != 0 {
            // SPEC_I_PT is not supported.
            return Err(Sense::invalid_param_field(20, Some(3)).into());
        }
        let aptpl = flags & 0x01 != 0;
        if aptpl && !self.ptpl_capable {
            // APTPL without a place to persist to (PTPL_C = 0, SPC-4 §6.16.3).
            return Err(Sense::invalid_param_field(20, Some(0)).into());
        }
        let mine = self.key_of(who);
        let mut uas = PrUas::new();
        let needs_type = matches!(sa, 1 | 2 | 4 | 5);
        if needs_type {
            if scope != 0 {
                return Err(Sense::invalid_cdb_field(2, Some(7)).into());
            }
            if !matches!(kind, 1 | 3 | 5 | 6 | 7 | 8) {
                return Err(Sense::invalid_cdb_field(2, Some(3)).into());
            }
        }
        match sa {
            // REGISTER / REGISTER AND IGNORE EXISTING KEY (SPC-4 §5.9.5).
            0 | 6 => {
                if sa == 0 {
                    match mine {
                        None if key != 0 => return Err(PrError::Conflict),
                        Some(k) if k != key => return Err(PrError::Conflict),
                        _ => {}
                    }
                }
                if sa_key == 0 {
                    if mine.is_some() {
                        self.unregister(who, &mut uas);
                        self.generation = self.generation.wrapping_add(1);
                    }
                } else {
                    let full = self.regs.len() >= MAX_REGISTRATIONS;
                    match self.regs.iter_mut().find(|r| &r.who == who) {
                        Some(r) => r.key = sa_key,
                        None if full => {
                            // 05/55/04 INSUFFICIENT REGISTRATION RESOURCES (SPC-4 §5.9.5).
                            return Err(Sense::new(0x5, 0x55, 0x04).into());
                        }
                        None => self.regs.push(Registration {
                            who: who.clone(),
                            key: sa_key,
                        }),
                    }
                    self.generation = self.generation.wrapping_add(1);
                }
                // Only REGISTER-type service actions carry a meaningful APTPL bit (SPC-4
                // §6.16.3); the last one wins.
                self.aptpl = aptpl;
            }
            1 => {
                if mine != Some(key) {
                    return Err(PrError::Conflict);
                }
                match &self.res {
                    None => {
                        self.res = Some(Reservation {
                            holder: who.clone(),
                            kind,
                        })
                    }
                    Some(r) if self.is_holder(who) && r.kind == kind => {}
                    Some(_) => return Err(PrError::Conflict),
                }
            }
            2 => {
                if mine != Some(key) {
                    return Err(PrError::Conflict);
                }
                if let Some(r) = &self.res {
                    if self.is_holder(who) {
                        if r.kind != kind {
                            // 05/26/04 INVALID RELEASE OF PERSISTENT RESERVATION.
                            return Err(PrError::Check(Sense::new(0x5, 0x26, 0x04)));
                        }
                        let kind = r.kind;
                        self.res = None;
                        // Releasing a type other than WE/EA tells the other registrants
                        // (SPC-4 §5.9.10.2).
                        if kind != ty::WE && kind != ty::EA {
                            for r in self.regs.iter().filter(|r| &r.who != who) {
                                uas.push((r.who.clone(), 0x2a, 0x04));
                            }
                        }
                    }
                }
            }
            3 => {
                if mine != Some(key) {
                    return Err(PrError::Conflict);
                }
                for r in self.regs.iter().filter(|r| &r.who != who) {
                    uas.push((r.who.clone(), 0x2a, 0x03));
                }
                self.regs.clear();
                self.res = None;
                self.generation = self.generation.wrapping_add(1);
            }
            4 | 5 => {
                if mine != Some(key) {
                    return Err(PrError::Conflict);
                }
                self.preempt(who, sa_key, kind, &mut uas)?;
                self.generation = self.generation.wrapping_add(1);
            }
            _ => return Err(Sense::invalid_cdb_field(1, Some(4)).into()),
        }
        Ok(uas)
    }

    fn unregister(&mut self, who: &PortId, uas: &mut PrUas) {
        self.regs.retain(|r| &r.who != who);
        let release = match &self.res {
            Some(r) if all_registrants(r.kind) => self.regs.is_empty(),
            Some(r) => &r.holder == who,
            None => false,
        };
        if release {
            if let Some(r) = self.res.take() {
                if matches!(r.kind, ty::WE_RO | ty::EA_RO) {
                    for reg in &self.regs {
                        uas.push((reg.who.clone(), 0x2a, 0x04));
                    }
                }
            }
        }
    }

    /// PREEMPT (SPC-4 §5.9.11). Nexuses whose registrations go get REGISTRATIONS
    /// PREEMPTED (06/2A/05).
    fn preempt(
        &mut self,
        who: &PortId,
        sa_key: u64,
        kind: u8,
        uas: &mut PrUas,
    ) -> Result<(), PrError> {
        let res_all = self.res.as_ref().map(|r| all_registrants(r.kind));
        let holder_key = match &self.res {
            Some(r) if !all_registrants(r.kind) => self.key_of(&r.holder),
            _ => None,
        };
        match res_all {
            Some(true) if sa_key == 0 => {
                for r in self.regs.iter().filter(|r| &r.who != who) {
                    uas.push((r.who.clone(), 0x2a, 0x05));
                }
                self.regs.retain(|r| &r.who == who);
                self.res = Some(Reservation {
                    holder: who.clone(),
                    kind,
                });
                return Ok(());
            }
            _ => {}
        }
        if sa_key == 0 {
            return Err(INVALID_FIELD_PARAM.into());
        }
        let victims: Vec<PortId> = self
            .regs
            .iter()
            .filter(|r| r.key == sa_key && &r.who != who)
            .map(|r| r.who.clone())
            .collect();
        let preempts_holder = holder_key == Some(sa_key);
        if victims.is_empty() && !preempts_holder {
            return Err(PrError::Conflict);
        }
        self.regs.retain(|r| !(r.key == sa_key && &r.who != who));
        for v in victims {
            uas.push((v, 0x2a, 0x05));
        }
        if preempts_holder {
            self.res = Some(Reservation {
                holder: who.clone(),
                kind,
            });
        } else if let Some(r) = &self.res {
            if all_registrants(r.kind) && self.regs.is_empty() {
                self.res = None;
            }
        }
        Ok(())
    }
}

/// iSCSI TransportID, format 01b (SPC-4 §7.6.4.6): "name,i,0xISID", NUL-terminated, padded to
/// a multiple of four.
fn transport_id(port: &str) -> Vec<u8> {
    let mut name = port.as_bytes().to_vec();
    name.push(0);
    while name.len() % 4 != 0 {
        name.push(0);
    }
    let mut v = vec![0x45, 0];
    v.extend_from_slice(&(name.len() as u16).to_be_bytes());
    v.extend_from_slice(&name);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: &str) -> PortId {
        PortId {
            initiator_port: n.into(),
            relative_port: 1,
        }
    }
    fn cdb(sa: u8, kind: u8) -> [u8; 10] {
        [0x5f, sa, kind, 0, 0, 0, 0, 0, 24, 0]
    }
    fn param(key: u64, sa_key: u64) -> Vec<u8> {
        let mut v = vec![0u8; 24];
        v[0..8].copy_from_slice(&key.to_be_bytes());
        v[8..16].copy_from_slice(&sa_key.to_be_bytes());
        v
    }

    #[test]
    fn register_reserve_access_release() {
        let mut s = PrState::default();
        let (a, b) = (p("a"), p("b"));
        assert!(s.out(&a, &cdb(6, 0), &param(0, 1)).is_ok());
        assert!(s.out(&b, &cdb(6, 0), &param(0, 2)).is_ok());
        assert_eq!(s.out(&a, &cdb(0, 0), &param(5, 9)), Err(PrError::Conflict));
        assert!(s.out(&a, &cdb(1, ty::WE_RO), &param(1, 0)).is_ok());
        assert!(s.allows(&b, Access::Write));
        assert!(!s.allows(&p("c"), Access::Write));
        assert!(s.allows(&p("c"), Access::Read));
        assert!(matches!(
            s.out(&a, &cdb(2, ty::EA), &param(1, 0)),
            Err(PrError::Check(_))
        ));
        let uas = s.out(&a, &cdb(2, ty::WE_RO), &param(1, 0)).ok().unwrap();
        assert_eq!(uas.len(), 1);
        assert!(s.res.is_none());
    }

    #[test]
    fn preempt_removes_registration() {
        let mut s = PrState::default();
        let (a, b) = (p("a"), p("b"));
        s.out(&a, &cdb(6, 0), &param(0, 1)).ok();
        s.out(&b, &cdb(6, 0), &param(0, 2)).ok();
        let g = s.generation;
        s.out(&b, &cdb(4, ty::EA), &param(2, 1)).ok().unwrap();
        assert_eq!(s.generation, g + 1);
        assert_eq!(s.regs.len(), 1);
    }

    #[test]
    fn aptpl_needs_capability_and_round_trips() {
        let (a, b) = (p("iqn.a,i,0x1"), p("iqn.b,i,0x2"));
        let mut aptpl = param(0, 7);
        aptpl[20] = 1;
        let mut s = PrState::default();
        assert!(matches!(
            s.out(&a, &cdb(0, 0), &aptpl),
            Err(PrError::Check(_))
        ));
        assert_eq!(s.read(2).unwrap()[2] & 1, 0, "PTPL_C without a state file");
        s.ptpl_capable = true;
        s.out(&a, &cdb(0, 0), &aptpl).unwrap();
        s.out(&b, &cdb(6, 0), &aptpl).unwrap();
        s.out(&a, &cdb(1, ty::WE_RO), &param(7, 0)).unwrap();
        let caps = s.read(2).unwrap();
        assert_eq!((caps[2] & 1, caps[3] & 1), (1, 1), "PTPL_C and PTPL_A");
        let back = PrState::decode(&s.encode()).unwrap();
        assert_eq!(back.encode(), s.encode());
        assert!(back.aptpl() && back.is_holder(&a) && !back.allows(&p("c"), Access::Write));
        assert_eq!(back.read(3).unwrap(), s.read(3).unwrap());
        // A REGISTER with APTPL = 0 turns persistence off again.
        s.out(&b, &cdb(6, 0), &param(0, 8)).unwrap();
        assert!(!s.aptpl());
        assert!(PrState::decode("nonsense\n").is_err());
        assert!(PrState::decode("diskless-pr 1\nres 2 1 x\n").is_err());
    }

    #[test]
    fn all_registrants_survive_holder_leaving() {
        let mut s = PrState::default();
        let (a, b) = (p("a"), p("b"));
        s.out(&a, &cdb(6, 0), &param(0, 1)).ok();
        s.out(&b, &cdb(6, 0), &param(0, 2)).ok();
        s.out(&a, &cdb(1, ty::EA_AR), &param(1, 0)).ok().unwrap();
        s.out(&a, &cdb(0, 0), &param(1, 0)).ok().unwrap();
        assert!(s.res.is_some());
        s.out(&b, &cdb(2, ty::EA_AR), &param(2, 0)).ok().unwrap();
        assert!(s.res.is_none());
    }
}
