//! Text keys, login and text negotiation (RFC 7143 §5, §6, §12, §13). Pure state machines:
//! PDUs in, PDUs out, no sockets and no clock. The session layer stamps StatSN, ExpCmdSN and
//! MaxCmdSN on every response it sends and assigns the TSIH when a login completes.

pub mod chap;
pub mod keys;
pub mod machine;
pub mod params;
pub mod text;

pub use machine::{redirect_response, LoginComplete, LoginKeys, LoginMachine, LoginOutcome};
pub use params::{OurParams, SessionParams, SessionType};
pub use text::{TextMachine, TextOutcome};

use std::net::SocketAddr;

/// CHAP credentials (RFC 7143 §12.1.3, RFC 1994). `mutual` holds the name and secret the
/// *target* uses to answer the initiator's challenge.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    pub user: String,
    pub secret: String,
    pub mutual: Option<(String, String)>,
}

impl From<&crate::config::ChapConfig> for ChapCredentials {
    fn from(c: &crate::config::ChapConfig) -> Self {
        ChapCredentials {
            user: c.user.clone(),
            secret: c.secret.clone(),
            mutual: match (&c.mutual_user, &c.mutual_secret) {
                (Some(u), Some(s)) => Some((u.clone(), s.clone())),
                _ => None,
            },
        }
    }
}

impl std::fmt::Debug for ChapCredentials {
    // Secrets are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapCredentials")
            .field("user", &self.user)
            .field("mutual_user", &self.mutual.as_ref().map(|m| &m.0))
            .finish_non_exhaustive()
    }
}

/// What authentication a login must pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthPolicy {
    /// AuthMethod=None is accepted (CHAP is also accepted if the initiator offers only it? no:
    /// we answer None when offered; if the initiator offers only CHAP we refuse, §12.1).
    None,
    /// CHAP is required with these credentials.
    Chap(ChapCredentials),
}

/// Result of looking up a target for an initiator at login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetLookup {
    /// Status 0x0203: no such target.
    NotFound,
    /// Status 0x0202: the initiator is not allowed to log in to this target.
    NotAuthorized,
    Allowed(AuthPolicy),
}

/// One target as SendTargets reports it (RFC 7143 Appendix C).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetEntry {
    pub name: String,
    /// `TargetAddress` values, already formatted: "ip:port,tpgt" ("[v6]:port,tpgt").
    pub addresses: Vec<String>,
}

/// What the login and text machines need to know about the configured targets. Implemented by
/// the registry; tests implement it with a fixed table.
pub trait Directory: Send + Sync {
    /// Authentication required for a discovery session by this initiator.
    fn discovery_auth(&self, initiator: &str) -> AuthPolicy;
    /// Whether `initiator` may log in to `target`, and how it must authenticate.
    fn lookup(&self, initiator: &str, target: &str) -> TargetLookup;
    /// Targets visible to `initiator`, for SendTargets. `local` is the address the initiator
    /// connected to, used for portals bound to a wildcard address.
    fn visible_targets(&self, initiator: &str, local: SocketAddr) -> Vec<TargetEntry>;
    /// TargetAlias to report, if any.
    fn target_alias(&self, target: &str) -> Option<String> {
        let _ = target;
        None
    }
    /// Whether `initiator` may log in to `target` from the address `peer` (source address
    /// binding; checked by the session layer once the login is authenticated).
    fn source_allowed(&self, initiator: &str, target: &str, peer: std::net::IpAddr) -> bool {
        let _ = (initiator, target, peer);
        true
    }
    /// Target portal group tag of the portal `local` (TargetPortalGroupTag key, §13.9).
    fn portal_group_tag(&self, local: SocketAddr) -> u16 {
        let _ = local;
        1
    }
}

/// Typed login/negotiation errors, split like rustls: the peer sent something malformed, the
/// peer misbehaved (valid syntax, forbidden by the protocol), or we do not support it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LoginError {
    #[error("malformed text: {0}")]
    Malformed(String),
    #[error("protocol violation: {0}")]
    Misbehaving(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// Login status class/detail pairs (RFC 7143 §11.13.5).
pub mod status {
    pub const SUCCESS: (u8, u8) = (0x00, 0x00);
    pub const TARGET_MOVED_TEMP: (u8, u8) = (0x01, 0x01);
    pub const INITIATOR_ERROR: (u8, u8) = (0x02, 0x00);
    pub const AUTH_FAILURE: (u8, u8) = (0x02, 0x01);
    pub const AUTHORIZATION_FAILURE: (u8, u8) = (0x02, 0x02);
    pub const NOT_FOUND: (u8, u8) = (0x02, 0x03);
    pub const TARGET_REMOVED: (u8, u8) = (0x02, 0x04);
    pub const UNSUPPORTED_VERSION: (u8, u8) = (0x02, 0x05);
    pub const TOO_MANY_CONNECTIONS: (u8, u8) = (0x02, 0x06);
    pub const MISSING_PARAMETER: (u8, u8) = (0x02, 0x07);
    pub const CANT_INCLUDE_IN_SESSION: (u8, u8) = (0x02, 0x08);
    pub const SESSION_TYPE_UNSUPPORTED: (u8, u8) = (0x02, 0x09);
    pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (0x02, 0x0a);
    pub const INVALID_DURING_LOGIN: (u8, u8) = (0x02, 0x0b);
    pub const TARGET_ERROR: (u8, u8) = (0x03, 0x00);
    pub const SERVICE_UNAVAILABLE: (u8, u8) = (0x03, 0x01);
    pub const OUT_OF_RESOURCES: (u8, u8) = (0x03, 0x02);

    /// What a status means, for logs.
    pub fn describe(st: (u8, u8)) -> &'static str {
        match st {
            SUCCESS => "success",
            TARGET_MOVED_TEMP => "target moved temporarily",
            AUTH_FAILURE => "authentication failure",
            AUTHORIZATION_FAILURE => "authorization failure",
            NOT_FOUND => "target not found",
            TARGET_REMOVED => "target removed",
            UNSUPPORTED_VERSION => "unsupported version",
            TOO_MANY_CONNECTIONS => "too many connections",
            MISSING_PARAMETER => "missing parameter",
            CANT_INCLUDE_IN_SESSION => "cannot include in session",
            SESSION_TYPE_UNSUPPORTED => "session type not supported",
            SESSION_DOES_NOT_EXIST => "session does not exist",
            INVALID_DURING_LOGIN => "invalid request during login",
            TARGET_ERROR => "target error",
            SERVICE_UNAVAILABLE => "service unavailable",
            OUT_OF_RESOURCES => "out of resources",
            (0x02, _) => "initiator error",
            _ => "target error",
        }
    }
}
