//! Text Request handling in the full-feature phase (RFC 7143 §6.2, Appendix C SendTargets).
use super::{Directory, SessionParams};
use crate::pdu::{Pdu, TextRequest};
use std::net::SocketAddr;
use std::sync::Arc;

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

/// Per-connection text exchange state (C-bit continuation, TTT for long responses).
pub struct TextMachine {
    _private: (),
}

impl TextMachine {
    pub fn new(directory: Arc<dyn Directory>, local: SocketAddr) -> Self {
        let _ = (directory, local);
        todo!()
    }

    /// Handle one Text Request on a session with parameters `params`.
    pub fn step(&mut self, params: &SessionParams, req: &TextRequest, data: &[u8]) -> TextOutcome {
        let _ = (params, req, data);
        todo!()
    }
}
