//! Text Request handling in the full-feature phase (RFC 7143 §6.2, Appendix C SendTargets).
//!
//! Long answers go out in pieces no larger than the initiator's MaxRecvDataSegmentLength with
//! C=1, F=0 and a Target Transfer Tag; the initiator fetches the next piece with an empty Text
//! Request carrying that tag (§11.10.4, §11.11.4). A request with TTT=0xffffffff starts a new
//! exchange and drops any unfinished one.
use super::keys::{self, Pair, NOT_UNDERSTOOD, REJECT};
use super::params::{is_login_only_key, MAX_LENGTH, MIN_LENGTH};
use super::{Directory, SessionParams, SessionType};
use crate::pdu::{reject_reason, Bhs, Pdu, TextRequest, TextResponse};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;

/// The reserved "no tag" Target Transfer Tag (§11.10.4).
pub const NO_TTT: u32 = 0xffff_ffff;
/// Upper bound on the text an initiator may accumulate with C=1 in one exchange.
pub const MAX_TEXT_IN: usize = 64 * 1024;

#[derive(Debug)]
pub enum TextOutcome {
    /// Send this Text Response.
    Respond(Pdu),
    /// Send this Text Response; the declarative keys in it changed the connection's limits
    /// (e.g. a new MaxRecvDataSegmentLength), apply `params` from now on.
    Renegotiated(Pdu, Box<SessionParams>),
    /// The request was malformed: answer with a Reject (reason `reason`).
    Reject(u8),
}

#[derive(Debug)]
enum Pending {
    Idle,
    /// The initiator continues its text (C=1, or F=0 awaiting more) under this tag.
    Incoming {
        ttt: u32,
        itt: u32,
        buf: Vec<u8>,
    },
    /// Our answer continues; the initiator fetches it with empty requests under this tag.
    Outgoing {
        ttt: u32,
        itt: u32,
        rest: Bytes,
    },
}

/// Per-connection text exchange state (C-bit continuation, TTT for long responses).
pub struct TextMachine {
    directory: Arc<dyn Directory>,
    local: SocketAddr,
    pending: Pending,
    next_ttt: u32,
}

impl std::fmt::Debug for TextMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextMachine")
            .field("local", &self.local)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl TextMachine {
    pub fn new(directory: Arc<dyn Directory>, local: SocketAddr) -> Self {
        TextMachine {
            directory,
            local,
            pending: Pending::Idle,
            next_ttt: 1,
        }
    }

    fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == NO_TTT {
            self.next_ttt = 1;
        }
        t
    }

    /// Handle one Text Request on a session with parameters `params`.
    pub fn step(&mut self, params: &SessionParams, req: &TextRequest, data: &[u8]) -> TextOutcome {
        // §11.10.2: C=1 requires F=0.
        if req.cont && req.final_ {
            return TextOutcome::Reject(reject_reason::PROTOCOL_ERROR);
        }
        let text = if req.ttt == NO_TTT {
            // A new exchange: whatever was pending is abandoned (§11.10.4).
            self.pending = Pending::Idle;
            data.to_vec()
        } else {
            match std::mem::replace(&mut self.pending, Pending::Idle) {
                Pending::Outgoing { ttt, itt, rest } if ttt == req.ttt && itt == req.itt => {
                    if !data.is_empty() {
                        return TextOutcome::Reject(reject_reason::PROTOCOL_ERROR);
                    }
                    return TextOutcome::Respond(self.emit(params, req, rest));
                }
                Pending::Incoming { ttt, itt, mut buf } if ttt == req.ttt && itt == req.itt => {
                    if buf.len().saturating_add(data.len()) > MAX_TEXT_IN {
                        return TextOutcome::Reject(reject_reason::PROTOCOL_ERROR);
                    }
                    buf.extend_from_slice(data);
                    buf
                }
                _ => return TextOutcome::Reject(reject_reason::INVALID_PDU_FIELD),
            }
        };
        if text.len() > MAX_TEXT_IN {
            return TextOutcome::Reject(reject_reason::PROTOCOL_ERROR);
        }
        if req.cont {
            // The initiator's text goes on in the next PDU: acknowledge with an empty
            // response carrying a tag for it to continue under (§11.11.4: F=0 needs a TTT).
            let ttt = self.alloc_ttt();
            self.pending = Pending::Incoming {
                ttt,
                itt: req.itt,
                buf: text,
            };
            return TextOutcome::Respond(text_response(req, false, false, ttt, Bytes::new()));
        }
        let pairs = match keys::parse(&text) {
            Ok(p) => p,
            Err(_) => return TextOutcome::Reject(reject_reason::PROTOCOL_ERROR),
        };
        let mut new_params: Option<SessionParams> = None;
        let mut answers: Vec<Pair> = Vec::new();
        for (key, value) in &pairs {
            match key.as_str() {
                "SendTargets" => answers.extend(self.send_targets(params, value)),
                "MaxRecvDataSegmentLength" => {
                    // §13.12: declarative, may change in the full feature phase.
                    match keys::number(value).filter(|n| (MIN_LENGTH..=MAX_LENGTH).contains(n)) {
                        Some(n) => {
                            new_params
                                .get_or_insert_with(|| params.clone())
                                .initiator_max_recv_data_segment_length = n as u32;
                        }
                        None => answers.push((key.clone(), REJECT.into())),
                    }
                }
                "InitiatorAlias" => {
                    new_params
                        .get_or_insert_with(|| params.clone())
                        .initiator_alias = Some(value.clone());
                }
                "TargetAlias" | "TargetAddress" => answers.push((key.clone(), REJECT.into())),
                k if is_login_only_key(k) => answers.push((key.clone(), REJECT.into())),
                _ => answers.push((key.clone(), NOT_UNDERSTOOD.into())),
            }
        }
        let body = Bytes::from(keys::format(&answers));
        let eff = new_params.as_ref().unwrap_or(params);
        let pdu = self.emit(eff, req, body);
        match new_params {
            Some(p) => TextOutcome::Renegotiated(pdu, Box::new(p)),
            None => TextOutcome::Respond(pdu),
        }
    }

    /// Appendix C: the TargetName/TargetAddress records `value` asks for.
    fn send_targets(&self, params: &SessionParams, value: &str) -> Vec<Pair> {
        let discovery = params.session_type == SessionType::Discovery;
        let wanted: Option<&str> = match value {
            "All" => None,
            // Empty value: the session's own target; meaningless in a discovery session.
            "" if discovery => return vec![("SendTargets".into(), REJECT.into())],
            "" => Some(params.target_name.as_str()),
            name => Some(name),
        };
        let mut out = Vec::new();
        for t in self
            .directory
            .visible_targets(&params.initiator_name, self.local)
        {
            if wanted.is_some_and(|w| w != t.name) {
                continue;
            }
            out.push(("TargetName".to_string(), t.name));
            out.extend(
                t.addresses
                    .into_iter()
                    .map(|a| ("TargetAddress".to_string(), a)),
            );
        }
        out
    }

    /// Sends `body` or its first piece (§11.11: pieces no larger than what the initiator
    /// accepts), remembering the rest under a fresh tag.
    fn emit(&mut self, params: &SessionParams, req: &TextRequest, mut body: Bytes) -> Pdu {
        let limit = (params.initiator_max_recv_data_segment_length as usize).max(512);
        if body.len() > limit {
            let rest = body.split_off(limit);
            let ttt = self.alloc_ttt();
            self.pending = Pending::Outgoing {
                ttt,
                itt: req.itt,
                rest,
            };
            return text_response(req, false, true, ttt, body);
        }
        if req.final_ {
            self.pending = Pending::Idle;
            text_response(req, true, false, NO_TTT, body)
        } else {
            // The initiator is not done (F=0): it continues under this tag.
            let ttt = self.alloc_ttt();
            self.pending = Pending::Incoming {
                ttt,
                itt: req.itt,
                buf: Vec::new(),
            };
            text_response(req, false, false, ttt, body)
        }
    }
}

fn text_response(req: &TextRequest, final_: bool, cont: bool, ttt: u32, data: Bytes) -> Pdu {
    Pdu {
        bhs: Bhs::TextResponse(TextResponse {
            final_,
            cont,
            lun: req.lun,
            itt: req.itt,
            ttt,
            ..TextResponse::default()
        }),
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::login::{AuthPolicy, TargetEntry, TargetLookup};

    struct Empty;
    impl Directory for Empty {
        fn discovery_auth(&self, _: &str) -> AuthPolicy {
            AuthPolicy::None
        }
        fn lookup(&self, _: &str, _: &str) -> TargetLookup {
            TargetLookup::NotFound
        }
        fn visible_targets(&self, _: &str, _: SocketAddr) -> Vec<TargetEntry> {
            Vec::new()
        }
    }

    fn tm() -> TextMachine {
        TextMachine::new(Arc::new(Empty), "127.0.0.1:3260".parse().unwrap())
    }

    #[test]
    fn ttt_never_reserved() {
        let mut t = tm();
        t.next_ttt = NO_TTT - 1;
        assert_eq!(t.alloc_ttt(), NO_TTT - 1);
        assert_ne!(t.alloc_ttt(), NO_TTT);
    }

    #[test]
    fn unknown_tag_is_rejected() {
        let mut t = tm();
        let p = crate::login::params::rfc_defaults(SessionType::Discovery);
        let req = TextRequest {
            final_: true,
            ttt: 5,
            ..TextRequest::default()
        };
        assert!(matches!(
            t.step(&p, &req, &[]),
            TextOutcome::Reject(reject_reason::INVALID_PDU_FIELD)
        ));
    }

    #[test]
    fn f0_request_gets_tag_to_continue() {
        let mut t = tm();
        let p = crate::login::params::rfc_defaults(SessionType::Discovery);
        let req = TextRequest {
            final_: false,
            ttt: NO_TTT,
            itt: 9,
            ..TextRequest::default()
        };
        let TextOutcome::Respond(r) = t.step(&p, &req, b"X-a=1\0") else {
            panic!()
        };
        let Bhs::TextResponse(h) = &r.bhs else {
            panic!()
        };
        assert!(!h.final_);
        assert_ne!(h.ttt, NO_TTT);
        let next = TextRequest {
            final_: true,
            ttt: h.ttt,
            itt: 9,
            ..TextRequest::default()
        };
        let TextOutcome::Respond(r) = t.step(&p, &next, b"X-b=2\0") else {
            panic!()
        };
        assert_eq!(&r.data[..], b"X-b=NotUnderstood\0");
    }
}
