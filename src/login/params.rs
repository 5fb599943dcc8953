//! Negotiated session and connection parameters (RFC 7143 §13).

/// Normal or Discovery session (§13.21).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionType {
    #[default]
    Normal,
    Discovery,
}

/// What the target offers / accepts. Defaults are what a boot server wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OurParams {
    /// Our declared MaxRecvDataSegmentLength (what the initiator may send us in one PDU).
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_outstanding_r2t: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_connections: u16,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub error_recovery_level: u8,
    /// Accept CRC32C header/data digests when the initiator offers them.
    pub allow_header_digest: bool,
    pub allow_data_digest: bool,
}

impl Default for OurParams {
    fn default() -> Self {
        OurParams {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 262_144,
            max_outstanding_r2t: 1,
            immediate_data: true,
            initial_r2t: false,
            max_connections: 1,
            default_time2wait: 2,
            default_time2retain: 20,
            error_recovery_level: 0,
            allow_header_digest: true,
            allow_data_digest: true,
        }
    }
}

/// The outcome of negotiation, used by the session/connection for the full-feature phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// Empty for discovery sessions.
    pub target_name: String,
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
    /// Largest data segment we may SEND (the initiator's declared MaxRecvDataSegmentLength;
    /// 8192 when it declared none, §13.12).
    pub initiator_max_recv_data_segment_length: u32,
    /// Largest data segment we ACCEPT (our declaration).
    pub target_max_recv_data_segment_length: u32,
}

use super::keys::{self, Pair, IRRELEVANT, NOT_UNDERSTOOD, REJECT};
use std::collections::HashSet;

/// Largest MaxRecvDataSegmentLength/MaxBurstLength/FirstBurstLength (§13.12-14: 2^24-1).
pub const MAX_LENGTH: u64 = (1 << 24) - 1;
/// Smallest of those lengths (§13.12-14).
pub const MIN_LENGTH: u64 = 512;
/// MaxRecvDataSegmentLength default (§13.12), also the limit during login.
pub const DEFAULT_MRDSL: u32 = 8192;

/// Login stage of a key (CSG values, §11.12.3).
pub const STAGE_SECURITY: u8 = 0;
pub const STAGE_OPERATIONAL: u8 = 1;
pub const STAGE_FULL_FEATURE: u8 = 3;

/// What the negotiation of one key led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOutcome {
    /// Answer with this key=value.
    Answer(Pair),
    /// Declarative key accepted, nothing to answer.
    Silent,
    /// The whole login fails with this status (e.g. 0x0200 for a renegotiated key).
    Fail((u8, u8), String),
}

/// SessionParams with every key at its RFC 7143 §13 default.
pub fn rfc_defaults(session_type: SessionType) -> SessionParams {
    SessionParams {
        session_type,
        initiator_name: String::new(),
        initiator_alias: None,
        target_name: String::new(),
        header_digest: false,
        data_digest: false,
        max_connections: 1,
        initial_r2t: true,
        immediate_data: true,
        max_burst_length: 262_144,
        first_burst_length: 65_536,
        default_time2wait: 2,
        default_time2retain: 20,
        max_outstanding_r2t: 1,
        data_pdu_in_order: true,
        data_sequence_in_order: true,
        error_recovery_level: 0,
        initiator_max_recv_data_segment_length: DEFAULT_MRDSL,
        target_max_recv_data_segment_length: DEFAULT_MRDSL,
    }
}

/// Whether a key belongs to the authentication exchange (§12), handled by [`super::chap`].
pub fn is_security_key(key: &str) -> bool {
    key == "AuthMethod" || key.starts_with("CHAP_") || key.starts_with("SRP_")
}

/// Keys that are operational (§13) and may only be negotiated during login.
const LOGIN_ONLY_KEYS: &[&str] = &[
    "HeaderDigest",
    "DataDigest",
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "ErrorRecoveryLevel",
    "SessionType",
    "InitiatorName",
    "TargetName",
    "TargetPortalGroupTag",
    "AuthMethod",
    "OFMarker",
    "IFMarker",
    "OFMarkInt",
    "IFMarkInt",
    "TaskReporting",
    "iSCSIProtocolLevel",
];

/// Whether `key` is one RFC 7143 defines but that may not be renegotiated in the full feature
/// phase (everything except the declaratives listed in §13: MaxRecvDataSegmentLength,
/// aliases, TargetAddress, SendTargets).
pub fn is_login_only_key(key: &str) -> bool {
    LOGIN_ONLY_KEYS.contains(&key) || is_security_key(key)
}

/// Negotiates the operational keys of one login (§13), remembering which keys were already
/// negotiated (a key may be negotiated once per login, §6.2: else initiator error 0x0200).
#[derive(Debug, Clone)]
pub struct Negotiator {
    ours: OurParams,
    params: SessionParams,
    seen: HashSet<String>,
}

fn reject(key: &str) -> KeyOutcome {
    KeyOutcome::Answer((key.to_string(), REJECT.to_string()))
}

fn answer(key: &str, value: impl Into<String>) -> KeyOutcome {
    KeyOutcome::Answer((key.to_string(), value.into()))
}

/// A numerical value within `lo..=hi`, or None (then the answer is Reject, §6.2.1 / §6.1).
fn bounded(value: &str, lo: u64, hi: u64) -> Option<u64> {
    keys::number(value).filter(|n| (lo..=hi).contains(n))
}

impl Negotiator {
    pub fn new(ours: OurParams, session_type: SessionType) -> Self {
        let mut params = rfc_defaults(session_type);
        params.target_max_recv_data_segment_length = ours.max_recv_data_segment_length;
        Negotiator {
            ours,
            params,
            seen: HashSet::new(),
        }
    }

    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    pub fn ours(&self) -> &OurParams {
        &self.ours
    }

    pub fn params_mut(&mut self) -> &mut SessionParams {
        &mut self.params
    }

    /// Records that `key` was negotiated; false if it already was in this login.
    pub fn mark_seen(&mut self, key: &str) -> bool {
        self.seen.insert(key.to_string())
    }

    pub fn was_seen(&self, key: &str) -> bool {
        self.seen.contains(key)
    }

    /// Final parameters: FirstBurstLength never exceeds MaxBurstLength (§13.14).
    pub fn finish(mut self) -> SessionParams {
        if self.params.first_burst_length > self.params.max_burst_length {
            self.params.first_burst_length = self.params.max_burst_length;
        }
        self.params
    }

    /// §13.14: FirstBurstLength is irrelevant when InitialR2T=Yes and ImmediateData=No.
    pub fn first_burst_irrelevant(&self) -> bool {
        self.params.initial_r2t && !self.params.immediate_data
    }

    /// Negotiates one non-security key received during login. Declarative initiator keys
    /// that the login machine handles itself (InitiatorName, TargetName, SessionType) are
    /// accepted silently here.
    pub fn negotiate(&mut self, key: &str, value: &str) -> KeyOutcome {
        if !self.mark_seen(key) {
            return KeyOutcome::Fail(
                super::status::INITIATOR_ERROR,
                format!("key {key} negotiated twice"),
            );
        }
        // X- and X# extension keys, and any key we do not know (§6.2.1, §13.23).
        let discovery = self.params.session_type == SessionType::Discovery;
        // Long values are only legal for a few keys (§6.1: 255 bytes unless specified).
        if value.len() > keys::MAX_SHORT_VALUE_LEN
            && !matches!(key, "TargetAddress" | "TargetName" | "InitiatorName")
        {
            if key.starts_with("X-") || key.starts_with("X#") {
                return answer(key, NOT_UNDERSTOOD);
            }
            return reject(key);
        }
        // Keys irrelevant to discovery sessions (§13.*: "Irrelevant when: SessionType=Discovery").
        const NORMAL_ONLY: &[&str] = &[
            "MaxConnections",
            "InitialR2T",
            "ImmediateData",
            "MaxBurstLength",
            "FirstBurstLength",
            "MaxOutstandingR2T",
            "DataPDUInOrder",
            "DataSequenceInOrder",
        ];
        if discovery && NORMAL_ONLY.contains(&key) {
            return answer(key, IRRELEVANT);
        }
        let p = &mut self.params;
        let o = &self.ours;
        match key {
            "HeaderDigest" | "DataDigest" => {
                let allow = if key == "HeaderDigest" {
                    o.allow_header_digest
                } else {
                    o.allow_data_digest
                };
                // §13.1: the responder picks the first value of the initiator's list it
                // supports; never a value that was not offered.
                let choice = keys::list(value).find(|v| *v == "None" || (allow && *v == "CRC32C"));
                match choice {
                    Some(v) => {
                        let on = v == "CRC32C";
                        if key == "HeaderDigest" {
                            p.header_digest = on;
                        } else {
                            p.data_digest = on;
                        }
                        answer(key, v)
                    }
                    None => reject(key),
                }
            }
            "MaxConnections" => match bounded(value, 1, 65535) {
                Some(n) => {
                    p.max_connections = (n as u16).min(o.max_connections.max(1));
                    answer(key, p.max_connections.to_string())
                }
                None => reject(key),
            },
            "InitialR2T" => match keys::boolean(value) {
                // §13.10: result function OR.
                Some(b) => {
                    p.initial_r2t = b || o.initial_r2t;
                    answer(key, keys::yes_no(p.initial_r2t))
                }
                None => reject(key),
            },
            "ImmediateData" => match keys::boolean(value) {
                // §13.11: result function AND.
                Some(b) => {
                    p.immediate_data = b && o.immediate_data;
                    answer(key, keys::yes_no(p.immediate_data))
                }
                None => reject(key),
            },
            "MaxRecvDataSegmentLength" => match bounded(value, MIN_LENGTH, MAX_LENGTH) {
                // §13.12: declarative; what the initiator can receive = what we may send.
                Some(n) => {
                    p.initiator_max_recv_data_segment_length = n as u32;
                    KeyOutcome::Silent
                }
                None => reject(key),
            },
            "MaxBurstLength" => match bounded(value, MIN_LENGTH, MAX_LENGTH) {
                Some(n) => {
                    p.max_burst_length = (n as u32).min(o.max_burst_length.max(512));
                    answer(key, p.max_burst_length.to_string())
                }
                None => reject(key),
            },
            "FirstBurstLength" => match bounded(value, MIN_LENGTH, MAX_LENGTH) {
                Some(n) => {
                    p.first_burst_length = (n as u32).min(o.first_burst_length.max(512));
                    answer(key, p.first_burst_length.to_string())
                }
                None => reject(key),
            },
            "DefaultTime2Wait" => match bounded(value, 0, 3600) {
                // §13.15: result function Maximum.
                Some(n) => {
                    p.default_time2wait = (n as u16).max(o.default_time2wait);
                    answer(key, p.default_time2wait.to_string())
                }
                None => reject(key),
            },
            "DefaultTime2Retain" => match bounded(value, 0, 3600) {
                // §13.16: result function Minimum.
                Some(n) => {
                    p.default_time2retain = (n as u16).min(o.default_time2retain);
                    answer(key, p.default_time2retain.to_string())
                }
                None => reject(key),
            },
            "MaxOutstandingR2T" => match bounded(value, 1, 65535) {
                Some(n) => {
                    p.max_outstanding_r2t = (n as u32).min(o.max_outstanding_r2t.max(1));
                    answer(key, p.max_outstanding_r2t.to_string())
                }
                None => reject(key),
            },
            // §13.18-19: result function OR; we only deliver in order, so always Yes.
            "DataPDUInOrder" | "DataSequenceInOrder" => match keys::boolean(value) {
                Some(_) => answer(key, "Yes"),
                None => reject(key),
            },
            "ErrorRecoveryLevel" => match bounded(value, 0, 2) {
                Some(n) => {
                    p.error_recovery_level = (n as u8).min(o.error_recovery_level);
                    answer(key, p.error_recovery_level.to_string())
                }
                None => reject(key),
            },
            // Declarative initiator keys; the login machine reads them from the first request.
            "InitiatorName" | "TargetName" | "SessionType" => KeyOutcome::Silent,
            "InitiatorAlias" => {
                p.initiator_alias = Some(value.to_string());
                KeyOutcome::Silent
            }
            // Only the target sends these (§13.7-9).
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => reject(key),
            // §13.3: SendTargets is only for the full feature phase.
            "SendTargets" => answer(key, IRRELEVANT),
            // RFC 7143 Appendix A.3.1 (obsolete markers): answer No to the booleans and Reject
            // to the intervals.
            "OFMarker" | "IFMarker" => answer(key, "No"),
            "OFMarkInt" | "IFMarkInt" => reject(key),
            // RFC 7144 §5.2.1: we only do the RFC 3720 task-reporting semantics.
            "TaskReporting" => {
                if keys::list(value).any(|v| v == "RFC3720") {
                    answer(key, "RFC3720")
                } else {
                    reject(key)
                }
            }
            // RFC 7144 §5.1: result function Minimum; we announce 0 (no RFC 7144 features).
            "iSCSIProtocolLevel" => match bounded(value, 0, 31) {
                Some(_) => answer(key, "0"),
                None => reject(key),
            },
            _ => answer(key, NOT_UNDERSTOOD),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg() -> Negotiator {
        Negotiator::new(OurParams::default(), SessionType::Normal)
    }

    fn ans(o: KeyOutcome) -> String {
        match o {
            KeyOutcome::Answer((_, v)) => v,
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    #[test]
    fn digests_pick_first_supported() {
        let mut n = neg();
        assert_eq!(ans(n.negotiate("HeaderDigest", "CRC32C,None")), "CRC32C");
        assert_eq!(ans(n.negotiate("DataDigest", "None,CRC32C")), "None");
        assert!(n.params().header_digest && !n.params().data_digest);
        let mut n = Negotiator::new(
            OurParams {
                allow_header_digest: false,
                ..OurParams::default()
            },
            SessionType::Normal,
        );
        assert_eq!(ans(n.negotiate("HeaderDigest", "CRC32C,None")), "None");
        assert_eq!(ans(n.negotiate("DataDigest", "MD5")), "Reject");
        assert!(!n.params().header_digest);
    }

    #[test]
    fn result_functions() {
        let mut n = neg();
        assert_eq!(ans(n.negotiate("MaxConnections", "8")), "1");
        assert_eq!(ans(n.negotiate("InitialR2T", "No")), "No");
        assert_eq!(ans(n.negotiate("ImmediateData", "Yes")), "Yes");
        assert_eq!(ans(n.negotiate("MaxBurstLength", "16776192")), "1048576");
        assert_eq!(ans(n.negotiate("FirstBurstLength", "65536")), "65536");
        assert_eq!(ans(n.negotiate("DefaultTime2Wait", "0")), "2");
        assert_eq!(ans(n.negotiate("DefaultTime2Retain", "0")), "0");
        assert_eq!(ans(n.negotiate("MaxOutstandingR2T", "4")), "1");
        assert_eq!(ans(n.negotiate("DataPDUInOrder", "No")), "Yes");
        assert_eq!(ans(n.negotiate("ErrorRecoveryLevel", "2")), "0");
        assert_eq!(
            n.negotiate("MaxRecvDataSegmentLength", "65536"),
            KeyOutcome::Silent
        );
        let p = n.finish();
        assert_eq!(p.initiator_max_recv_data_segment_length, 65536);
        assert_eq!(p.target_max_recv_data_segment_length, 262_144);
        assert!(!p.initial_r2t && p.immediate_data);
        assert_eq!(p.max_burst_length, 1_048_576);
    }

    #[test]
    fn or_and_with_our_preferences() {
        let ours = OurParams {
            initial_r2t: true,
            immediate_data: false,
            ..OurParams::default()
        };
        let mut n = Negotiator::new(ours, SessionType::Normal);
        assert_eq!(ans(n.negotiate("InitialR2T", "No")), "Yes");
        assert_eq!(ans(n.negotiate("ImmediateData", "Yes")), "No");
        assert!(n.first_burst_irrelevant());
    }

    #[test]
    fn first_burst_clamped_to_max_burst() {
        let mut n = neg();
        ans(n.negotiate("MaxBurstLength", "4096"));
        ans(n.negotiate("FirstBurstLength", "65536"));
        assert_eq!(n.finish().first_burst_length, 4096);
    }

    #[test]
    fn out_of_range_and_malformed_are_rejected() {
        let mut n = neg();
        assert_eq!(ans(n.negotiate("MaxBurstLength", "511")), "Reject");
        assert_eq!(ans(n.negotiate("FirstBurstLength", "16777216")), "Reject");
        assert_eq!(ans(n.negotiate("MaxOutstandingR2T", "0")), "Reject");
        assert_eq!(ans(n.negotiate("ErrorRecoveryLevel", "3")), "Reject");
        assert_eq!(ans(n.negotiate("InitialR2T", "maybe")), "Reject");
        assert_eq!(ans(n.negotiate("DefaultTime2Wait", "3601")), "Reject");
        assert_eq!(
            ans(n.negotiate("MaxRecvDataSegmentLength", "100")),
            "Reject"
        );
        assert_eq!(n.params().initiator_max_recv_data_segment_length, 8192);
        assert_eq!(ans(n.negotiate("MaxConnections", "x")), "Reject");
    }

    #[test]
    fn special_keys() {
        let mut n = neg();
        assert_eq!(ans(n.negotiate("X-com.example.foo", "1")), "NotUnderstood");
        assert_eq!(ans(n.negotiate("X#foo", "1")), "NotUnderstood");
        assert_eq!(ans(n.negotiate("Bogus", "1")), "NotUnderstood");
        assert_eq!(ans(n.negotiate("OFMarker", "Yes")), "No");
        assert_eq!(ans(n.negotiate("IFMarker", "No")), "No");
        assert_eq!(ans(n.negotiate("OFMarkInt", "2048~8192")), "Reject");
        assert_eq!(
            ans(n.negotiate("TaskReporting", "ResponseFence,RFC3720")),
            "RFC3720"
        );
        assert_eq!(ans(n.negotiate("iSCSIProtocolLevel", "1")), "0");
        assert_eq!(ans(n.negotiate("SendTargets", "All")), "Irrelevant");
        assert_eq!(ans(n.negotiate("TargetAlias", "x")), "Reject");
        assert_eq!(n.negotiate("InitiatorAlias", "host"), KeyOutcome::Silent);
        assert_eq!(n.params().initiator_alias.as_deref(), Some("host"));
        let long = "v".repeat(300);
        assert_eq!(ans(n.negotiate("DataDigest", &long)), "Reject");
    }

    #[test]
    fn discovery_irrelevant_keys() {
        let mut n = Negotiator::new(OurParams::default(), SessionType::Discovery);
        assert_eq!(ans(n.negotiate("InitialR2T", "No")), "Irrelevant");
        assert_eq!(ans(n.negotiate("MaxBurstLength", "4096")), "Irrelevant");
        assert_eq!(ans(n.negotiate("HeaderDigest", "None")), "None");
    }

    #[test]
    fn twice_is_initiator_error() {
        let mut n = neg();
        ans(n.negotiate("MaxBurstLength", "4096"));
        assert!(matches!(
            n.negotiate("MaxBurstLength", "8192"),
            KeyOutcome::Fail((2, 0), _)
        ));
    }

    #[test]
    fn defaults_apply() {
        let p = neg().finish();
        assert!(p.initial_r2t && p.immediate_data);
        assert_eq!(p.max_burst_length, 262_144);
        assert_eq!(p.first_burst_length, 65_536);
        assert_eq!(p.initiator_max_recv_data_segment_length, 8192);
    }
}
