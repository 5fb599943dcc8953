//! The lifecycle of one client: which logins, logouts, drops and boot-script fetches make a
//! boot, and when a boot begins (docs/overlays.md, "When a client boots again").
//!
//! Pure: events and the time (`now`, milliseconds since the Unix epoch) come in, a
//! [`Decision`] with its [`Reason`] comes out. No sockets, no clock, no files: the caller
//! persists [`BootState`] (durable) and acts on the decision (close sessions, reset the disk).
//!
//! A boot is a sequence: firmware login(s) -> hand-off -> OS login(s). The sequence decides,
//! not the time: a machine cannot run its firmware and its OS at once, so a firmware login
//! after the OS phase began is a new boot however soon it comes, and a re-login with an ISID
//! the OS already used in this boot is the same boot however late it comes. Time
//! (`reboot_gap`) only breaks ties when the evidence is ambiguous, and ambiguity keeps the
//! disk: losing a running client's writes is far worse than one stale boot.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt;
use std::net::IpAddr;

/// An initiator session identifier (RFC 7143 §11.12.5).
pub type Isid = [u8; 6];

/// iPXE's ISID: IANA enterprise-number format (T=01b) with enterprise 0x002723 (Fen Systems).
pub const IPXE_ISID_PREFIX: [u8; 4] = [0x40, 0x00, 0x27, 0x23];
/// Microsoft's iSCSI initiator: IANA format, enterprise 0x000137 (Windows, WinPE).
pub const MICROSOFT_ISID_PREFIX: [u8; 4] = [0x40, 0x00, 0x01, 0x37];
/// open-iscsi's default ISID: OUI format (T=00b), OUI 00:02:3d (Linux, iscsistart from the
/// iBFT).
pub const OPEN_ISCSI_ISID_PREFIX: [u8; 3] = [0x00, 0x02, 0x3d];

/// How many firmware ISIDs one client's history keeps (one per firmware it boots with).
const MAX_FIRMWARE_ISIDS: usize = 4;
/// How many OS ISIDs one boot (and the client's past boots) keeps.
const MAX_OS_ISIDS: usize = 8;
/// How many history entries a client keeps.
pub const HISTORY: usize = 64;
/// A boot-script fetch stays evidence of a starting boot this long.
const SCRIPT_WINDOW_MS: u64 = 10 * 60 * 1000;

/// What a known initiator's ISID says about who logs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fingerprint {
    /// iPXE (`sanboot`/`sanhook`, BIOS or UEFI).
    Ipxe,
    /// edk2 IScsiDxe (OVMF, most server firmware): the ISID is the NIC's MAC with the top two
    /// bits cleared (OUI format), the same on every boot. Also NIC option ROMs that use an
    /// OUI-format ISID of their own.
    UefiMac,
    /// An OUI-format ISID that is not open-iscsi's: firmware-shaped (edk2-like or an option
    /// ROM), weak evidence.
    OuiFirmwareShaped,
    /// open-iscsi (Linux).
    OpenIscsi,
    /// Microsoft's initiator (Windows, WinPE).
    Microsoft,
    /// Nothing known.
    Unknown,
}

/// What the shape of a login (the order of its operational keys) says about the initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyHint {
    /// edk2 IScsiDxe's fixed operational key sequence.
    Edk2,
    /// iPXE's fixed operational key sequence.
    Ipxe,
    /// RFC 3720 marker keys (IFMarker/OFMarker), sent by OS initiators such as open-iscsi and
    /// never by the boot firmwares above: weak evidence of an OS.
    Rfc3720Os,
    #[default]
    Unknown,
}

/// Operational keys of edk2 IScsiDxe (NetworkPkg/IScsiDxe, stable202211) in the order it sends
/// them, as seen on the wire from Debian 12's OVMF.
const EDK2_KEYS: [&str; 14] = [
    "HeaderDigest",
    "DataDigest",
    "ErrorRecoveryLevel",
    "InitialR2T",
    "ImmediateData",
    "MaxRecvDataSegmentLength",
    "MaxBurstLength",
    "FirstBurstLength",
    "MaxConnections",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
];

/// Operational keys of iPXE in the order it sends them (Debian's ipxe-qemu, seen on the wire).
const IPXE_KEYS: [&str; 14] = [
    "HeaderDigest",
    "DataDigest",
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "MaxRecvDataSegmentLength",
    "MaxBurstLength",
    "FirstBurstLength",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "ErrorRecoveryLevel",
];

/// Classify a login by the names of the keys it sent (in order; values are not needed).
pub fn key_hint(names: &[String]) -> KeyHint {
    let identity = [
        "InitiatorName",
        "InitiatorAlias",
        "TargetName",
        "SessionType",
        "AuthMethod",
    ];
    let ops: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|k| !identity.contains(k) && !k.starts_with("CHAP_"))
        .collect();
    if ops.iter().any(|k| *k == "IFMarker" || *k == "OFMarker") {
        KeyHint::Rfc3720Os
    } else if ops == EDK2_KEYS {
        KeyHint::Edk2
    } else if ops == IPXE_KEYS {
        KeyHint::Ipxe
    } else {
        KeyHint::Unknown
    }
}

/// Recognise a firmware or OS by its ISID. `mac`: the client's MAC when the binding has one.
pub fn fingerprint(isid: &Isid, mac: Option<[u8; 6]>) -> Fingerprint {
    if isid[..4] == IPXE_ISID_PREFIX {
        return Fingerprint::Ipxe;
    }
    if isid[..4] == MICROSOFT_ISID_PREFIX {
        return Fingerprint::Microsoft;
    }
    if isid[..3] == OPEN_ISCSI_ISID_PREFIX {
        return Fingerprint::OpenIscsi;
    }
    if let Some(m) = mac {
        if *isid == uefi_isid(m) {
            return Fingerprint::UefiMac;
        }
    }
    if isid[0] & 0xc0 == 0 {
        return Fingerprint::OuiFirmwareShaped;
    }
    Fingerprint::Unknown
}

/// The ISID edk2's IScsiDxe uses for a NIC: its MAC with the type bits (top two) cleared.
pub fn uefi_isid(mac: [u8; 6]) -> Isid {
    let mut i = mac;
    i[0] &= 0x3f;
    i
}

/// Whether an ISID is a known boot firmware's by fingerprint alone (iPXE).
pub fn is_firmware_isid(isid: &Isid) -> bool {
    fingerprint(isid, None) == Fingerprint::Ipxe
}

pub use crate::config::ResetPolicy;

/// What the model needs to know about a client's binding.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Whether a new boot discards the disk (volatile mode). Other modes count boots only.
    pub discards: bool,
    pub reset: ResetPolicy,
    /// Operator-given firmware ISID or ISID prefix (an OUI is its first three bytes): logins
    /// matching it are the firmware's, every other login is the OS's.
    pub firmware_isid: Option<Vec<u8>>,
    /// The client's MAC (binding `mac:`), to recognise IScsiDxe's MAC-derived ISID.
    pub mac: Option<[u8; 6]>,
    /// Tie-breaker for ambiguous evidence only.
    pub reboot_gap_ms: u64,
}

/// Where a client is in its boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No boot known (never seen, or reset by the operator).
    #[default]
    Off,
    /// A boot began; only firmware logins so far.
    Firmware,
    /// The OS logged in during this boot.
    Os,
    /// The OS logged out of every session (a clean shutdown, or a logout it will follow with
    /// a re-login).
    OsEnded,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Off => "off",
            Phase::Firmware => "firmware",
            Phase::Os => "os",
            Phase::OsEnded => "os-ended",
        })
    }
}

/// Who a login is, as the evidence says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Firmware,
    Os,
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The initiator logged out (RFC 7143 §11.14) on its own.
    Logout,
    /// The connection dropped (reset, timeout, ExitBootServices, protocol error).
    Dropped,
    /// The server is stopping: it asked for the logout or closed the connection itself.
    ServerStop,
}

/// An input of the model.
#[derive(Debug, Clone)]
pub enum Event {
    /// A login completed; `session` is the caller's handle for the session's later end.
    Login {
        session: u64,
        isid: Isid,
        peer: IpAddr,
        /// The login's key shape ([`key_hint`]).
        keys: KeyHint,
    },
    /// A session of this client ended.
    SessionEnd { session: u64, how: End },
    /// Someone fetched this client's boot script from `from`.
    ScriptFetch { from: IpAddr },
    /// The server started with this durable state (the old process's sessions are gone).
    ServerStart,
    /// The operator ran `diskless client reset`.
    OperatorReset,
    /// The operator published the disk (`diskless client commit`).
    Committed,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Login { isid, peer, .. } => write!(f, "login ISID {} from {peer}", hex(isid)),
            Event::SessionEnd { how, .. } => write!(f, "session end ({how:?})"),
            Event::ScriptFetch { from } => write!(f, "boot script fetch from {from}"),
            Event::ServerStart => f.write_str("server start"),
            Event::OperatorReset => f.write_str("operator reset"),
            Event::Committed => f.write_str("commit"),
        }
    }
}

/// Why a decision was taken (every reset and every keep has one; `client show` prints it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// First login of a boot from a state with no boot known.
    FirstBoot {
        isid: Isid,
        role: Role,
    },
    /// A firmware login after the OS phase began: the machine was reset or powered on again.
    FirmwareAfterOs {
        isid: Isid,
        phase: Phase,
    },
    /// A re-login with an ISID the OS already used in this boot.
    OsReturns {
        isid: Isid,
    },
    /// Firmware login during the firmware phase beside its live sessions, or right after
    /// one ended (iPXE reconnects at once, with a new ISID), or after a server restart.
    FirmwareSameBoot {
        isid: Isid,
        why: &'static str,
    },
    /// The OS's first login after the firmware phase (the iBFT hand-off).
    HandOff {
        isid: Isid,
    },
    /// Another OS session in the same boot.
    OsMoreSessions {
        isid: Isid,
    },
    /// A plausible boot-script fetch was followed by this login.
    AfterScript {
        isid: Isid,
    },
    /// Ambiguous: kept.
    Ambiguous {
        isid: Isid,
        why: &'static str,
    },
    /// Ambiguous, but nothing of the client was live for the reboot gap: a new boot.
    GapTieBreak {
        isid: Isid,
        idle_ms: u64,
    },
    /// Script fetch taken as the start of a boot (`reset: on_script`) or as evidence.
    Script {
        from: IpAddr,
        why: &'static str,
    },
    /// Script fetch ignored.
    ScriptIgnored {
        from: IpAddr,
        why: &'static str,
    },
    Operator,
    SessionEnded {
        how: End,
        role: Role,
    },
    /// The end of a session a decision had already closed (not recorded in the history).
    StaleSessionEnded,
    ServerRestarted {
        interrupted: bool,
    },
    Committed,
}

fn hex(isid: &Isid) -> String {
    isid.iter().map(|b| format!("{b:02x}")).collect()
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::FirstBoot { isid, role } => write!(
                f,
                "first login of a boot (no boot in progress), ISID {} taken as the {}",
                hex(isid),
                if *role == Role::Firmware {
                    "firmware's"
                } else {
                    "OS's"
                }
            ),
            Reason::FirmwareAfterOs { isid, phase } => write!(
                f,
                "firmware login (ISID {}) after the OS phase began (phase {phase}): a new boot",
                hex(isid)
            ),
            Reason::OsReturns { isid } => write!(
                f,
                "re-login with ISID {} the OS already used in this boot: same boot",
                hex(isid)
            ),
            Reason::FirmwareSameBoot { isid, why } => {
                write!(f, "firmware login (ISID {}) {why}: same boot", hex(isid))
            }
            Reason::HandOff { isid } => write!(
                f,
                "OS login (ISID {}) after the firmware phase: hand-off, same boot",
                hex(isid)
            ),
            Reason::OsMoreSessions { isid } => {
                write!(f, "another OS session (ISID {}): same boot", hex(isid))
            }
            Reason::AfterScript { isid } => write!(
                f,
                "login (ISID {}) after a boot-script fetch from the client's address: a new boot",
                hex(isid)
            ),
            Reason::Ambiguous { isid, why } => {
                write!(f, "ambiguous login (ISID {}): {why}; disk kept", hex(isid))
            }
            Reason::GapTieBreak { isid, idle_ms } => write!(
                f,
                "login (ISID {}) with no session for {} s (reboot gap tie-breaker): a new boot",
                hex(isid),
                idle_ms / 1000
            ),
            Reason::Script { from, why } => write!(f, "boot script fetched from {from}: {why}"),
            Reason::ScriptIgnored { from, why } => {
                write!(f, "boot script fetched from {from}, ignored: {why}")
            }
            Reason::Operator => f.write_str("operator reset (diskless client reset)"),
            Reason::SessionEnded { how, role } => write!(
                f,
                "{} session {}",
                if *role == Role::Firmware {
                    "firmware"
                } else {
                    "OS"
                },
                match how {
                    End::Logout => "logged out",
                    End::Dropped => "dropped without logout",
                    End::ServerStop => "ended by the server stopping",
                }
            ),
            Reason::ServerRestarted { interrupted } => f.write_str(if *interrupted {
                "server restarted while sessions were live (they will log in again)"
            } else {
                "server restarted"
            }),
            Reason::Committed => f.write_str("disk committed to a new image"),
            Reason::StaleSessionEnded => f.write_str("a closed session's end"),
        }
    }
}

/// What to do about an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// A new boot begins (counted in `boots`, any mode).
    pub new_boot: bool,
    /// Discard the disk (volatile overlay) before the login proceeds.
    pub reset: bool,
    /// Close the client's live sessions with these ISIDs (a previous boot's, or the
    /// firmware's orphans after the hand-off). Never the logging-in session's own ISID.
    pub close: Vec<Isid>,
    pub reason: Reason,
}

impl Decision {
    fn keep(reason: Reason) -> Self {
        Decision {
            new_boot: false,
            reset: false,
            close: Vec::new(),
            reason,
        }
    }

    /// A one-word summary: "reset", "new boot (kept)", "keep".
    pub fn verdict(&self) -> &'static str {
        match (self.new_boot, self.reset) {
            (_, true) => "reset",
            (true, false) => "new boot, disk kept",
            (false, false) => "keep",
        }
    }
}

/// One line of a client's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at_ms: u64,
    pub boot: u64,
    pub verdict: String,
    pub reason: String,
}

/// A live session of the client (not durable: a server restart ends them all).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Live {
    session: u64,
    isid: Isid,
    role: Role,
}

/// The durable part of a client's lifecycle (the caller stores it in the state directory).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BootState {
    pub boots: u64,
    pub resets: u64,
    pub phase: Phase,
    /// Learned firmware ISIDs (hex), newest last.
    pub firmware_isids: Vec<String>,
    /// ISIDs the OS used in the current boot (hex).
    pub os_isids: Vec<String>,
    /// ISIDs OSes of this client used in earlier boots (hex), newest last.
    pub past_os_isids: Vec<String>,
    pub last_activity_ms: u64,
    /// Address the client's sessions come from.
    pub peer: Option<IpAddr>,
    /// Sessions live when this state was written (non-zero at load: the server stopped
    /// under them).
    pub live_sessions: u32,
    /// The last sessions ended because the server stopped (they will log in again).
    pub interrupted: bool,
    /// A plausible boot-script fetch not yet followed by a login (ms).
    pub script_at_ms: Option<u64>,
    /// A reset was decided and not yet applied to the disk (a crash in between applies it
    /// at the next start).
    pub reset_pending: bool,
    /// LUNs whose disk in shared storage (Ceph RBD) an operator's reset discarded: removed
    /// and created again from the image at the client's next attach, before it is served.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rbd_recreate: Vec<u16>,
    pub last_reset_reason: Option<String>,
    pub committed: bool,
    /// The disk is the golden image (reset, no login since): a new boot need not discard it.
    pub fresh: bool,
    pub history: VecDeque<HistoryEntry>,
    /// The disk the client is on when a boot took one other than its binding's (an
    /// operator's next-boot override, docs/overlays.md): a restarted server reopens this
    /// one, and the next boot moves on. None: the binding's disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<super::nextboot::DiskRecord>,
    /// In a cluster: the write number of the last lifecycle record this node sent or took
    /// (`boot::record`; 0: none).
    #[serde(skip_serializing_if = "is_zero")]
    pub shared_seq: u64,
    /// In a cluster: the record (writer node, write number) this state was last taken
    /// over from (`boot::record::should_take`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taken: Option<(String, u64)>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn parse_hex(s: &str) -> Option<Isid> {
    let mut out = [0u8; 6];
    if s.len() != 12 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn has(list: &[String], isid: &Isid) -> bool {
    list.iter().any(|s| parse_hex(s).as_ref() == Some(isid))
}

fn remember(list: &mut Vec<String>, isid: &Isid, max: usize) {
    let h = hex(isid);
    list.retain(|s| *s != h);
    list.push(h);
    if list.len() > max {
        let extra = list.len() - max;
        list.drain(..extra);
    }
}

/// One client's lifecycle: durable state plus its live sessions.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    pub state: BootState,
    live: Vec<Live>,
}

impl Lifecycle {
    /// Start from a loaded state (a server start): the old process's sessions are gone.
    pub fn load(state: BootState, now: u64) -> (Lifecycle, Decision) {
        let mut l = Lifecycle {
            state,
            live: Vec::new(),
        };
        let d = l.apply(&Policy::default(), Event::ServerStart, now);
        (l, d)
    }

    pub fn live_sessions(&self) -> usize {
        self.live.len()
    }

    fn role_of(&self, policy: &Policy, isid: &Isid, keys: KeyHint) -> Option<(Role, &'static str)> {
        let st = &self.state;
        if has(&st.os_isids, isid) {
            return Some((Role::Os, "an ISID of this boot's OS"));
        }
        if let Some(p) = &policy.firmware_isid {
            return Some(if isid.starts_with(p) {
                (Role::Firmware, "the binding's firmware_isid")
            } else {
                (Role::Os, "not the binding's firmware_isid")
            });
        }
        if has(&st.firmware_isids, isid) {
            return Some((Role::Firmware, "the client's learned firmware ISID"));
        }
        match fingerprint(isid, policy.mac) {
            Fingerprint::Ipxe => return Some((Role::Firmware, "iPXE's ISID")),
            Fingerprint::UefiMac => return Some((Role::Firmware, "IScsiDxe's ISID for its MAC")),
            Fingerprint::Microsoft => return Some((Role::Os, "Microsoft's initiator ISID")),
            Fingerprint::OpenIscsi => return Some((Role::Os, "open-iscsi's ISID")),
            _ => {}
        }
        if has(&st.past_os_isids, isid) {
            return Some((Role::Os, "an ISID an earlier boot's OS used"));
        }
        match keys {
            KeyHint::Edk2 => Some((Role::Firmware, "IScsiDxe's login key sequence")),
            KeyHint::Ipxe => Some((Role::Firmware, "iPXE's login key sequence")),
            KeyHint::Rfc3720Os => Some((Role::Os, "an OS initiator's marker keys")),
            KeyHint::Unknown => None,
        }
    }

    fn record(&mut self, now: u64, d: &Decision) {
        self.note(now, d.verdict(), &d.reason.to_string());
    }

    /// Add an entry of the caller's to the history (a next-boot override taken).
    pub fn note(&mut self, now: u64, verdict: &str, reason: &str) {
        let entry = HistoryEntry {
            at_ms: now,
            boot: self.state.boots,
            verdict: verdict.to_string(),
            reason: reason.to_string(),
        };
        self.state.history.push_back(entry);
        while self.state.history.len() > HISTORY {
            self.state.history.pop_front();
        }
    }

    /// Begin a new boot: close every live session (the previous boot's), maybe discard.
    fn new_boot(&mut self, policy: &Policy, reason: Reason) -> Decision {
        let close = self.live.drain(..).map(|l| l.isid).collect();
        let st = &mut self.state;
        st.boots += 1;
        st.phase = Phase::Firmware;
        st.os_isids.clear();
        st.interrupted = false;
        st.script_at_ms = None;
        st.committed = false;
        let reset = policy.discards && !st.fresh;
        if reset {
            st.resets += 1;
            st.reset_pending = true;
            st.last_reset_reason = Some(reason.to_string());
        }
        Decision {
            new_boot: true,
            reset,
            close,
            reason,
        }
    }

    /// Feed one event at time `now`; the decision is also appended to the history.
    pub fn apply(&mut self, policy: &Policy, event: Event, now: u64) -> Decision {
        let d = self.decide(policy, event, now);
        if d.reason != Reason::StaleSessionEnded {
            self.record(now, &d);
        }
        self.state.live_sessions = self.live.len() as u32;
        d
    }

    fn decide(&mut self, policy: &Policy, event: Event, now: u64) -> Decision {
        match event {
            Event::Login {
                session,
                isid,
                peer,
                keys,
            } => {
                // Session reinstatement (§6.3.5): the old session with this ISID is gone.
                self.live.retain(|l| l.isid != isid);
                let (mut d, role) = self.login(policy, isid, keys, now);
                if role == Role::Os {
                    // The hand-off orphans the firmware's sessions: reap them (every firmware,
                    // by the learned ISID, not only iPXE's).
                    let orphans: Vec<Isid> = self
                        .live
                        .iter()
                        .filter(|l| l.role == Role::Firmware)
                        .map(|l| l.isid)
                        .collect();
                    self.live.retain(|l| l.role != Role::Firmware);
                    d.close.extend(orphans);
                }
                self.live.push(Live {
                    session,
                    isid,
                    role,
                });
                self.state.peer = Some(peer);
                self.state.last_activity_ms = now;
                self.state.interrupted = false;
                self.state.fresh = false;
                d
            }
            Event::SessionEnd { session, how } => {
                let Some(pos) = self.live.iter().position(|l| l.session == session) else {
                    // Already closed by a decision (previous boot, reaped orphan).
                    return Decision::keep(Reason::StaleSessionEnded);
                };
                let gone = self.live.remove(pos);
                self.state.last_activity_ms = now;
                match how {
                    End::ServerStop => self.state.interrupted = true,
                    End::Logout => {
                        if gone.role == Role::Os
                            && self.state.phase == Phase::Os
                            && !self.live.iter().any(|l| l.role == Role::Os)
                        {
                            self.state.phase = Phase::OsEnded;
                        }
                    }
                    End::Dropped => {}
                }
                Decision::keep(Reason::SessionEnded {
                    how,
                    role: gone.role,
                })
            }
            Event::ScriptFetch { from } => self.script(policy, from, now),
            Event::ServerStart => {
                let interrupted = self.state.live_sessions > 0 || self.state.interrupted;
                self.state.interrupted = interrupted;
                self.live.clear();
                Decision::keep(Reason::ServerRestarted { interrupted })
            }
            Event::OperatorReset => {
                let close = self.live.drain(..).map(|l| l.isid).collect();
                let st = &mut self.state;
                st.resets += 1;
                st.reset_pending = true;
                st.phase = Phase::Off;
                st.os_isids.clear();
                st.script_at_ms = None;
                st.last_reset_reason = Some(Reason::Operator.to_string());
                Decision {
                    new_boot: false,
                    reset: true,
                    close,
                    reason: Reason::Operator,
                }
            }
            Event::Committed => {
                self.state.committed = true;
                Decision::keep(Reason::Committed)
            }
        }
    }

    fn idle_ms(&self, now: u64) -> Option<u64> {
        self.live
            .is_empty()
            .then(|| now.saturating_sub(self.state.last_activity_ms))
    }

    /// Decide a login; also returns who the login is taken to be (learned for later).
    fn login(&mut self, policy: &Policy, isid: Isid, keys: KeyHint, now: u64) -> (Decision, Role) {
        let role = self.role_of(policy, &isid, keys).map(|r| r.0);
        let phase = self.state.phase;
        let script = self
            .state
            .script_at_ms
            .is_some_and(|t| now.saturating_sub(t) <= SCRIPT_WINDOW_MS);
        let auto = policy.reset == ResetPolicy::Auto;
        let fw = Role::Firmware;
        let (d, who) = match role {
            // Rule 3: whatever the time, the OS coming back is the same boot.
            Some(Role::Os) if has(&self.state.os_isids, &isid) => {
                (Decision::keep(Reason::OsReturns { isid }), Role::Os)
            }
            Some(Role::Firmware) if !auto => (self.not_auto(policy, isid), fw),
            Some(Role::Firmware) => match phase {
                Phase::Off => (
                    self.new_boot(policy, Reason::FirstBoot { isid, role: fw }),
                    fw,
                ),
                // A machine never runs its firmware beside its OS: the OS phase is over
                // (shut down, reset, powered off) however soon this login comes.
                Phase::Os | Phase::OsEnded => (
                    self.new_boot(policy, Reason::FirmwareAfterOs { isid, phase }),
                    fw,
                ),
                Phase::Firmware if script => {
                    (self.new_boot(policy, Reason::AfterScript { isid }), fw)
                }
                Phase::Firmware => (self.firmware_again(policy, isid, now), fw),
            },
            Some(Role::Os) => match phase {
                Phase::Firmware => (Decision::keep(Reason::HandOff { isid }), Role::Os),
                Phase::Os => (Decision::keep(Reason::OsMoreSessions { isid }), Role::Os),
                Phase::Off => {
                    // No firmware phase seen (a state from before this model, or a client
                    // that logs in from its OS only): keep, and count the boot.
                    self.state.boots += 1;
                    let d = Decision {
                        new_boot: true,
                        reset: false,
                        close: Vec::new(),
                        reason: Reason::FirstBoot {
                            isid,
                            role: Role::Os,
                        },
                    };
                    (d, Role::Os)
                }
                Phase::OsEnded => (
                    Decision::keep(Reason::Ambiguous {
                        isid,
                        why: "an OS login with a new ISID after the OS logged out",
                    }),
                    Role::Os,
                ),
            },
            None => match phase {
                // The first login of a boot is the firmware's: learn its ISID.
                Phase::Off if auto => (
                    self.new_boot(policy, Reason::FirstBoot { isid, role: fw }),
                    fw,
                ),
                Phase::Off => (self.not_auto(policy, isid), fw),
                // The firmware's ISID is known from the first login of the boot, so a new one
                // now is the OS's (the hand-off).
                Phase::Firmware => (Decision::keep(Reason::HandOff { isid }), Role::Os),
                _ if auto && script => (self.new_boot(policy, Reason::AfterScript { isid }), fw),
                _ if !auto => (self.not_auto(policy, isid), Role::Os),
                Phase::Os | Phase::OsEnded => match self.idle_ms(now) {
                    Some(idle) if idle >= policy.reboot_gap_ms => (
                        self.new_boot(
                            policy,
                            Reason::GapTieBreak {
                                isid,
                                idle_ms: idle,
                            },
                        ),
                        fw,
                    ),
                    Some(_) => (
                        Decision::keep(Reason::Ambiguous {
                            isid,
                            why: "unknown ISID within the reboot gap of the client's last session",
                        }),
                        Role::Os,
                    ),
                    None => (
                        Decision::keep(Reason::Ambiguous {
                            isid,
                            why: "unknown ISID beside the client's live sessions",
                        }),
                        Role::Os,
                    ),
                },
            },
        };
        let st = &mut self.state;
        match who {
            Role::Firmware => {
                if role.is_none() || d.new_boot {
                    remember(&mut st.firmware_isids, &isid, MAX_FIRMWARE_ISIDS);
                }
            }
            Role::Os => {
                st.phase = Phase::Os;
                remember(&mut st.os_isids, &isid, MAX_OS_ISIDS);
                remember(&mut st.past_os_isids, &isid, MAX_OS_ISIDS);
                st.script_at_ms = None;
            }
        }
        (d, who)
    }

    /// A firmware login during the firmware phase (`auto`): the same boot unless nothing of
    /// the client was live for the reboot gap (tie-breaker).
    fn firmware_again(&mut self, policy: &Policy, isid: Isid, now: u64) -> Decision {
        let same = |why| Decision::keep(Reason::FirmwareSameBoot { isid, why });
        if !self.live.is_empty() {
            return same("beside the firmware's live session");
        }
        if self.state.interrupted {
            return same("after the server restarted mid-firmware-phase");
        }
        match self.idle_ms(now) {
            Some(idle) if idle >= policy.reboot_gap_ms => self.new_boot(
                policy,
                Reason::GapTieBreak {
                    isid,
                    idle_ms: idle,
                },
            ),
            _ => same("right after its previous connection (reconnect)"),
        }
    }

    /// A login under `reset: on_script` or `manual`, or in a phase where `auto` would start a
    /// boot: the sessions and the phase are tracked, the disk is never discarded here.
    fn not_auto(&mut self, policy: &Policy, isid: Isid) -> Decision {
        let why = match policy.reset {
            ResetPolicy::OnScript => "reset: on_script (only a boot-script fetch starts a boot)",
            ResetPolicy::Manual => "reset: manual (only the operator discards the disk)",
            ResetPolicy::Auto => "no rule applies",
        };
        if self.state.phase == Phase::Off {
            self.state.phase = Phase::Firmware;
            self.state.boots += 1;
            return Decision {
                new_boot: true,
                reset: false,
                close: Vec::new(),
                reason: Reason::Ambiguous { isid, why },
            };
        }
        if matches!(self.state.phase, Phase::Os | Phase::OsEnded) {
            // Still a new boot for the record (not for the disk): the old sessions are stale.
            let close = self.live.drain(..).map(|l| l.isid).collect();
            let st = &mut self.state;
            st.boots += 1;
            st.phase = Phase::Firmware;
            st.os_isids.clear();
            return Decision {
                new_boot: true,
                reset: false,
                close,
                reason: Reason::Ambiguous { isid, why },
            };
        }
        Decision::keep(Reason::Ambiguous { isid, why })
    }

    /// A boot-script fetch. Evidence of a boot only when it plausibly comes from this client
    /// at the start of a boot: from the address its sessions use, with no OS session live.
    fn script(&mut self, policy: &Policy, from: IpAddr, now: u64) -> Decision {
        if self.live.iter().any(|l| l.role == Role::Os) {
            return Decision::keep(Reason::ScriptIgnored {
                from,
                why: "the client's OS has a live session",
            });
        }
        if let Some(peer) = self.state.peer {
            if peer != from {
                return Decision::keep(Reason::ScriptIgnored {
                    from,
                    why: "not the address the client's sessions use",
                });
            }
        }
        match policy.reset {
            ResetPolicy::Manual => Decision::keep(Reason::ScriptIgnored {
                from,
                why: "reset: manual",
            }),
            ResetPolicy::OnScript => self.new_boot(
                policy,
                Reason::Script {
                    from,
                    why: "reset: on_script, a new boot",
                },
            ),
            ResetPolicy::Auto => {
                self.state.script_at_ms = Some(now);
                Decision::keep(Reason::Script {
                    from,
                    why: "evidence of a starting boot, weighed at the next login",
                })
            }
        }
    }

    /// The decided reset was applied to the disk.
    pub fn reset_done(&mut self) {
        self.state.reset_pending = false;
        self.state.fresh = true;
    }
}

#[cfg(test)]
mod tests;
