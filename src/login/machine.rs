//! The login state machine (RFC 7143 §6, §11.12-13).
//!
//! One [`LoginMachine`] per connection. It checks the stage transitions (CSG/NSG, T and C
//! bits), identifies the initiator and target from the first request, runs the security stage
//! through [`Authenticator`] and the operational keys through [`Negotiator`], and splits long
//! responses into 8192-byte pieces (the login-phase MaxRecvDataSegmentLength, §13.12).

use super::chap::Authenticator;
use super::keys::{self, Pair, IRRELEVANT};
use super::params::{
    is_security_key, KeyOutcome, Negotiator, DEFAULT_MRDSL, STAGE_FULL_FEATURE, STAGE_OPERATIONAL,
    STAGE_SECURITY,
};
use super::{status, Directory, OurParams, SessionParams, SessionType, TargetLookup};
use crate::pdu::{Bhs, LoginRequest, LoginResponse, Pdu};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;

/// Login response data larger than this is sent in pieces with C=1 (§13.12: 8192 is the
/// MaxRecvDataSegmentLength in force during login).
pub const LOGIN_SEGMENT: usize = DEFAULT_MRDSL as usize;
/// Upper bound on the text an initiator may accumulate with C=1 in one login exchange.
pub const MAX_LOGIN_TEXT: usize = 64 * 1024;

/// Login finished; the session layer assigns `tsih` into the response (a `Bhs::LoginResponse`
/// with T=1, NSG=3) and stamps the sequence numbers before sending it.
#[derive(Debug)]
pub struct LoginComplete {
    pub response: Pdu,
    pub params: SessionParams,
    pub isid: [u8; 6],
    /// TSIH the initiator sent in its first login request (0 = new session).
    pub tsih: u16,
    pub cid: u16,
    /// What the initiator's login looked like (for recognising boot firmware).
    pub keys: LoginKeys,
}

/// The shape of an initiator's login: the names (never the values) of the keys it sent, in
/// order. Boot firmwares send fixed key sets in a fixed
/// order, which tells them apart from OS initiators (crate::boot::lifecycle).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoginKeys {
    pub names: Vec<String>,
}

/// At most this many key names are kept per login.
const MAX_KEY_NAMES: usize = 64;

#[derive(Debug)]
pub enum LoginOutcome {
    /// Send this Login Response and wait for the next request.
    Continue(Pdu),
    /// Login succeeded (see [`LoginComplete`]).
    Complete(Box<LoginComplete>),
    /// Send this Login Response (a non-zero status class) and close the connection.
    Failed(Pdu),
}

/// Why the login fails: status, a reason for the log, answers to include.
struct Failure {
    status: (u8, u8),
    reason: String,
    answers: Vec<Pair>,
}

fn failure(status: (u8, u8), reason: impl Into<String>) -> Failure {
    Failure {
        status,
        reason: reason.into(),
        answers: Vec::new(),
    }
}

/// A response that did not fit in one PDU; the rest goes out as the initiator asks for it.
struct PendingOut {
    rest: Bytes,
    transit: bool,
    csg: u8,
    nsg: u8,
}

/// Who logs in, set from the first complete request.
struct Identity {
    initiator_name: String,
    target_name: String,
    session_type: SessionType,
    auth: Authenticator,
    neg: Negotiator,
}

/// Drives one connection's login phase, one Login Request at a time.
pub struct LoginMachine {
    directory: Arc<dyn Directory>,
    ours: OurParams,
    local: SocketAddr,
    /// ISID, TSIH, CID of the first request; later requests must repeat them (§11.12).
    first: Option<([u8; 6], u16, u16)>,
    identity: Option<Identity>,
    stage: u8,
    inbuf: Vec<u8>,
    out: Option<PendingOut>,
    declared_mrdsl: bool,
    sent_first_response: bool,
    finished: bool,
    keys: LoginKeys,
}

impl std::fmt::Debug for LoginMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginMachine")
            .field("local", &self.local)
            .field("stage", &self.stage)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl LoginMachine {
    /// `local` is the address the initiator connected to (portal group tag, SendTargets).
    pub fn new(directory: Arc<dyn Directory>, ours: OurParams, local: SocketAddr) -> Self {
        LoginMachine {
            directory,
            ours,
            local,
            first: None,
            identity: None,
            stage: STAGE_SECURITY,
            inbuf: Vec::new(),
            out: None,
            declared_mrdsl: false,
            sent_first_response: false,
            finished: false,
            keys: LoginKeys::default(),
        }
    }

    /// Feed one Login Request and its data segment.
    pub fn step(&mut self, req: &LoginRequest, data: &[u8]) -> LoginOutcome {
        if self.finished {
            return self.failed(req, failure(status::INITIATOR_ERROR, "login already over"));
        }
        match self.step_inner(req, data) {
            Ok(outcome) => outcome,
            Err(f) => self.failed(req, f),
        }
    }

    fn failed(&mut self, req: &LoginRequest, f: Failure) -> LoginOutcome {
        tracing::debug!(
            class = f.status.0,
            detail = f.status.1,
            reason = %f.reason,
            "login failed"
        );
        self.finished = true;
        let data = Bytes::from(keys::format(&f.answers));
        LoginOutcome::Failed(response(req, false, false, req.csg, 0, f.status, data))
    }

    fn step_inner(&mut self, req: &LoginRequest, data: &[u8]) -> Result<LoginOutcome, Failure> {
        // §11.12.4: we speak version 0x00 only.
        if req.version_min > 0 {
            return Err(failure(status::UNSUPPORTED_VERSION, "version_min > 0"));
        }
        // §11.12.2: C=1 requires T=0.
        if req.transit && req.cont {
            return Err(failure(status::INITIATOR_ERROR, "T and C both set"));
        }
        if req.csg != STAGE_SECURITY && req.csg != STAGE_OPERATIONAL {
            return Err(failure(status::INITIATOR_ERROR, "invalid CSG"));
        }
        // §11.12.3: NSG 2 is reserved; stages only move forward.
        if req.transit
            && (req.nsg <= req.csg
                || (req.nsg != STAGE_OPERATIONAL && req.nsg != STAGE_FULL_FEATURE))
        {
            return Err(failure(status::INITIATOR_ERROR, "invalid NSG"));
        }
        match self.first {
            None => {
                self.first = Some((req.isid, req.tsih, req.cid));
                self.stage = req.csg;
            }
            Some(first) => {
                if first != (req.isid, req.tsih, req.cid) {
                    return Err(failure(status::INITIATOR_ERROR, "ISID/TSIH/CID changed"));
                }
                if req.csg != self.stage {
                    let chap_pending = self
                        .identity
                        .as_ref()
                        .is_some_and(|id| id.auth.requires_chap() && !id.auth.is_done());
                    let status = if chap_pending {
                        status::AUTH_FAILURE
                    } else {
                        status::INITIATOR_ERROR
                    };
                    return Err(failure(status, "CSG does not match the login stage"));
                }
            }
        }

        // The rest of a long response of ours (C bit, §11.13.2).
        if let Some(out) = self.out.take() {
            if !data.is_empty() || req.cont {
                return Err(failure(
                    status::INITIATOR_ERROR,
                    "data while the target's response is incomplete",
                ));
            }
            return Ok(self.emit(req, out.rest, out.transit, out.csg, out.nsg));
        }

        // C=1: the initiator's text continues in the next request (§11.12.2); a pair may be
        // split across PDUs, so keep raw bytes and parse when complete.
        if self.inbuf.len().saturating_add(data.len()) > MAX_LOGIN_TEXT {
            return Err(failure(status::INITIATOR_ERROR, "login text too long"));
        }
        self.inbuf.extend_from_slice(data);
        if req.cont {
            return Ok(LoginOutcome::Continue(response(
                req,
                false,
                false,
                req.csg,
                0,
                status::SUCCESS,
                Bytes::new(),
            )));
        }
        let text = std::mem::take(&mut self.inbuf);
        let pairs =
            keys::parse(&text).map_err(|e| failure(status::INITIATOR_ERROR, e.to_string()))?;

        let first_text = self.identity.is_none();
        if first_text {
            self.identity = Some(self.identify(&pairs, req.csg)?);
        }
        for (key, _) in &pairs {
            if self.keys.names.len() < MAX_KEY_NAMES {
                self.keys.names.push(key.clone());
            }
        }
        let Some(id) = self.identity.as_mut() else {
            return Err(failure(status::TARGET_ERROR, "no identity"));
        };

        // Answers in the order the keys arrived; the security answers go where the first
        // security key was.
        let mut answers: Vec<Pair> = Vec::new();
        let mut security: Vec<Pair> = Vec::new();
        let mut security_at = None;
        for (key, value) in &pairs {
            if is_security_key(key) {
                // §6.3: security keys only in the security negotiation stage.
                if self.stage != STAGE_SECURITY {
                    return Err(failure(
                        status::INITIATOR_ERROR,
                        format!("{key} outside the security stage"),
                    ));
                }
                security_at.get_or_insert(answers.len());
                security.push((key.clone(), value.clone()));
                continue;
            }
            if !first_text {
                // §13: InitiatorName, TargetName, SessionType are sent in the first request
                // only; a harmless repeat of the same value is tolerated.
                let same = match key.as_str() {
                    "InitiatorName" => Some(*value == id.initiator_name),
                    "TargetName" => Some(*value == id.target_name),
                    "SessionType" => {
                        Some((*value == "Discovery") == (id.session_type == SessionType::Discovery))
                    }
                    _ => None,
                };
                match same {
                    Some(true) => continue,
                    Some(false) => {
                        return Err(failure(
                            status::INITIATOR_ERROR,
                            format!("{key} changed during login"),
                        ))
                    }
                    None => {}
                }
            }
            match id.neg.negotiate(key, value) {
                KeyOutcome::Answer(p) => answers.push(p),
                KeyOutcome::Silent => {}
                KeyOutcome::Fail(status, reason) => return Err(failure(status, reason)),
            }
        }
        if !security.is_empty() {
            let got = id.auth.step(&security).map_err(|f| Failure {
                status: f.status,
                reason: f.reason,
                answers: f.answers,
            })?;
            let at = security_at.unwrap_or(answers.len()).min(answers.len());
            answers.splice(at..at, got);
        }
        if id.neg.first_burst_irrelevant() {
            for (k, v) in answers.iter_mut() {
                if k == "FirstBurstLength" {
                    *v = IRRELEVANT.to_string();
                }
            }
        }

        // Transit (§11.12.2): granted when the initiator asks and the stage is done.
        let mut transit = false;
        if req.transit {
            if self.stage == STAGE_SECURITY && !id.auth.is_done() {
                if id.auth.requires_chap() {
                    // Leaving while no CHAP exchange is under way is skipping authentication.
                    if security.is_empty() {
                        return Err(failure(
                            status::AUTH_FAILURE,
                            "transit requested before CHAP completed",
                        ));
                    }
                } else {
                    id.auth.skip();
                }
            }
            transit = self.stage != STAGE_SECURITY || id.auth.is_done();
        }

        // Our declarations, after the answers.
        if !self.sent_first_response && id.session_type == SessionType::Normal {
            // §13.9: TargetPortalGroupTag in the first login response of a normal session.
            let tag = self.directory.portal_group_tag(self.local);
            answers.push(("TargetPortalGroupTag".into(), tag.to_string()));
            if let Some(alias) = self.directory.target_alias(&id.target_name) {
                answers.push(("TargetAlias".into(), alias));
            }
        }
        // The empty acknowledgements of C=1 requests do not count as the first response.
        self.sent_first_response = true;
        if !self.declared_mrdsl
            && (self.stage == STAGE_OPERATIONAL
                || (transit && req.nsg == STAGE_FULL_FEATURE)
                || id.neg.was_seen("MaxRecvDataSegmentLength"))
        {
            // §13.12: declarative, what we accept per PDU.
            self.declared_mrdsl = true;
            answers.push((
                "MaxRecvDataSegmentLength".into(),
                self.ours.max_recv_data_segment_length.to_string(),
            ));
        }

        let nsg = if transit { req.nsg } else { 0 };
        let body = Bytes::from(keys::format(&answers));
        Ok(self.emit(req, body, transit, req.csg, nsg))
    }

    /// Sends `body` (or its first piece), moving stage and completing the login when the
    /// last piece carries T=1 NSG=3.
    fn emit(
        &mut self,
        req: &LoginRequest,
        mut body: Bytes,
        transit: bool,
        csg: u8,
        nsg: u8,
    ) -> LoginOutcome {
        if body.len() > LOGIN_SEGMENT {
            let rest = body.split_off(LOGIN_SEGMENT);
            self.out = Some(PendingOut {
                rest,
                transit,
                csg,
                nsg,
            });
            return LoginOutcome::Continue(response(
                req,
                false,
                true,
                csg,
                0,
                status::SUCCESS,
                body,
            ));
        }
        let pdu = response(req, transit, false, csg, nsg, status::SUCCESS, body);
        if !transit {
            return LoginOutcome::Continue(pdu);
        }
        self.stage = nsg;
        if nsg != STAGE_FULL_FEATURE {
            return LoginOutcome::Continue(pdu);
        }
        self.finished = true;
        let (isid, tsih, cid) = self.first.unwrap_or((req.isid, req.tsih, req.cid));
        let params = match self.identity.take() {
            Some(id) => {
                let mut p = id.neg.finish();
                p.initiator_name = id.initiator_name;
                p.target_name = id.target_name;
                p
            }
            // Unreachable: a transit needs a parsed first request.
            None => {
                return self.failed(req, failure(status::TARGET_ERROR, "no identity"));
            }
        };
        LoginOutcome::Complete(Box::new(LoginComplete {
            response: pdu,
            params,
            isid,
            tsih,
            cid,
            keys: std::mem::take(&mut self.keys),
        }))
    }

    /// Reads InitiatorName, SessionType and TargetName from the first request and looks the
    /// target up (§13.4-6, §13.21; statuses from §11.13.5).
    fn identify(&self, pairs: &[Pair], csg: u8) -> Result<Identity, Failure> {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let initiator_name = match get("InitiatorName") {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => return Err(failure(status::MISSING_PARAMETER, "no InitiatorName")),
        };
        let session_type = match get("SessionType") {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => {
                return Err(failure(
                    status::SESSION_TYPE_UNSUPPORTED,
                    "unknown SessionType",
                ))
            }
        };
        let (target_name, policy) = match session_type {
            SessionType::Discovery => (
                String::new(),
                self.directory.discovery_auth(&initiator_name),
            ),
            SessionType::Normal => {
                let target = match get("TargetName") {
                    Some(t) if !t.is_empty() => t.to_string(),
                    _ => return Err(failure(status::MISSING_PARAMETER, "no TargetName")),
                };
                match self.directory.lookup(&initiator_name, &target) {
                    TargetLookup::NotFound => {
                        return Err(failure(status::NOT_FOUND, "no such target"))
                    }
                    TargetLookup::NotAuthorized => {
                        return Err(failure(
                            status::AUTHORIZATION_FAILURE,
                            "initiator not allowed",
                        ))
                    }
                    TargetLookup::Allowed(policy) => (target, policy),
                }
            }
        };
        let mut auth = Authenticator::new(policy);
        // Starting in the operational stage skips security: only without CHAP (§6.3).
        if csg != STAGE_SECURITY && !auth.skip() {
            return Err(failure(
                status::AUTH_FAILURE,
                "CHAP required but the security stage was skipped",
            ));
        }
        Ok(Identity {
            initiator_name,
            target_name,
            session_type,
            auth,
            neg: Negotiator::new(self.ours.clone(), session_type),
        })
    }
}

/// The Login Response that sends an initiator to another node (RFC 7143 §11.13.5: status
/// 0x0101, target moved temporarily; §13.8: TargetAddress). The address always carries its
/// port and never a portal group tag: iPXE mis-reads an address without a port, and edk2
/// ignores one with `,tpgt`. T and C are 0 in a response with a non-zero class (§11.13.1).
pub fn redirect_response(req: &LoginRequest, to: SocketAddr) -> Pdu {
    // SocketAddr prints "a.b.c.d:port" or "[v6]:port" (§13.8: IPv6 in brackets).
    let pairs = vec![("TargetAddress".to_string(), to.to_string())];
    response(
        req,
        false,
        false,
        req.csg,
        0,
        status::TARGET_MOVED_TEMP,
        Bytes::from(keys::format(&pairs)),
    )
}

fn response(
    req: &LoginRequest,
    transit: bool,
    cont: bool,
    csg: u8,
    nsg: u8,
    status: (u8, u8),
    data: Bytes,
) -> Pdu {
    Pdu {
        bhs: Bhs::LoginResponse(LoginResponse {
            transit,
            cont,
            csg,
            nsg,
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: req.tsih,
            itt: req.itt,
            status_class: status.0,
            status_detail: status.1,
            ..LoginResponse::default()
        }),
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_names_address_and_port_without_tpgt() {
        let req = LoginRequest {
            transit: true,
            csg: 0,
            nsg: 1,
            isid: [0x40, 0, 0x27, 0x23, 0, 7],
            itt: 0x1234,
            ..LoginRequest::default()
        };
        let pdu = redirect_response(&req, "127.0.0.1:3261".parse().unwrap());
        let Bhs::LoginResponse(r) = &pdu.bhs else {
            panic!("not a login response: {pdu:?}")
        };
        // §11.13.5: 0x0101 target moved temporarily; §11.13.1: T and C are 0 on failure.
        assert_eq!((r.status_class, r.status_detail), (0x01, 0x01));
        assert!(!r.transit && !r.cont);
        assert_eq!((r.isid, r.itt, r.csg), (req.isid, req.itt, 0));
        assert_eq!(&pdu.data[..], b"TargetAddress=127.0.0.1:3261\0");
        let v6 = redirect_response(&req, "[fd00::5]:3260".parse().unwrap());
        assert_eq!(&v6.data[..], b"TargetAddress=[fd00::5]:3260\0");
    }
}
