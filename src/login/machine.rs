//! The login state machine (RFC 7143 §6). To be implemented.
use super::{Directory, OurParams, SessionParams};
use crate::pdu::{LoginRequest, Pdu};
use std::net::SocketAddr;
use std::sync::Arc;

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
}

#[derive(Debug)]
pub enum LoginOutcome {
    /// Send this Login Response and wait for the next request.
    Continue(Pdu),
    /// Login succeeded (see [`LoginComplete`]).
    Complete(Box<LoginComplete>),
    /// Send this Login Response (a non-zero status class) and close the connection.
    Failed(Pdu),
}

/// Drives one connection's login phase, one Login Request at a time.
pub struct LoginMachine {
    _private: (),
}

impl LoginMachine {
    /// `local` is the address the initiator connected to (portal group tag, SendTargets).
    pub fn new(directory: Arc<dyn Directory>, ours: OurParams, local: SocketAddr) -> Self {
        let _ = (directory, ours, local);
        todo!()
    }

    /// Feed one Login Request and its data segment.
    pub fn step(&mut self, req: &LoginRequest, data: &[u8]) -> LoginOutcome {
        let _ = (req, data);
        todo!()
    }
}
