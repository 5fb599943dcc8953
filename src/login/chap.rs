//! CHAP (RFC 1994, RFC 7143 §12.1.3) with MD5, and the AuthMethod negotiation (§12.1).
//!
//! Exchange (target side):
//! 1. I: `AuthMethod=CHAP,None`        T: `AuthMethod=CHAP`
//! 2. I: `CHAP_A=5`                    T: `CHAP_A=5 CHAP_I=<id> CHAP_C=<challenge>`
//! 3. I: `CHAP_N=<user> CHAP_R=<resp>` [+ `CHAP_I CHAP_C` for mutual]
//!    T: [`CHAP_N=<mutual user> CHAP_R=<resp>`]
//!
//! Secrets never appear in `Debug` output or in errors.

use super::keys::{self, Pair, NOT_UNDERSTOOD, REJECT};
use super::{status, AuthPolicy, ChapCredentials};
use md5::{Digest, Md5};
use rand::RngCore;

/// Length of the challenge we send (RFC 7143 §12.1.3 recommends at least as long as the
/// digest: 16 bytes).
pub const CHALLENGE_LEN: usize = 16;
/// §12.1.3: CHAP_C/CHAP_R binary values are at most 1024 bytes.
pub const MAX_CHALLENGE_LEN: usize = 1024;
/// CHAP algorithm 5 = MD5 (RFC 1994 §2, IANA PPP authentication algorithms).
pub const CHAP_MD5: &str = "5";

/// Why authentication failed: the status to send, a reason for logs (never a secret) and
/// the answers to include in the failing response (e.g. `CHAP_A=Reject`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    pub status: (u8, u8),
    pub reason: String,
    pub answers: Vec<Pair>,
}

fn fail(reason: impl Into<String>) -> AuthFailure {
    AuthFailure {
        status: status::AUTH_FAILURE,
        reason: reason.into(),
        answers: Vec::new(),
    }
}

enum State {
    AwaitMethod,
    AwaitAlgorithm,
    AwaitResponse { id: u8, challenge: Vec<u8> },
    Done,
}

/// The target's side of the security negotiation stage.
pub struct Authenticator {
    policy: AuthPolicy,
    state: State,
}

impl std::fmt::Debug for Authenticator {
    // Only the phase; the challenge and credentials stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let phase = match self.state {
            State::AwaitMethod => "AwaitMethod",
            State::AwaitAlgorithm => "AwaitAlgorithm",
            State::AwaitResponse { .. } => "AwaitResponse",
            State::Done => "Done",
        };
        f.debug_struct("Authenticator")
            .field("chap_required", &self.requires_chap())
            .field("phase", &phase)
            .finish()
    }
}

/// MD5(id || secret || challenge), RFC 1994 §4.1.
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Compares without an early exit so the time does not reveal how many bytes matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator {
    pub fn new(policy: AuthPolicy) -> Self {
        Authenticator {
            policy,
            state: State::AwaitMethod,
        }
    }

    pub fn requires_chap(&self) -> bool {
        matches!(self.policy, AuthPolicy::Chap(_))
    }

    /// Authentication finished successfully.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Nothing has been negotiated yet.
    pub fn not_started(&self) -> bool {
        matches!(self.state, State::AwaitMethod)
    }

    /// The initiator leaves the security stage (or skips it) without sending AuthMethod:
    /// acceptable only when no authentication is required. Returns whether auth is done.
    pub fn skip(&mut self) -> bool {
        if matches!(self.state, State::AwaitMethod) && !self.requires_chap() {
            self.state = State::Done;
        }
        self.is_done()
    }

    /// Processes the security keys of one Login Request, in order, and returns the answers.
    pub fn step(&mut self, pairs: &[Pair]) -> Result<Vec<Pair>, AuthFailure> {
        let mut answers = Vec::new();
        let mut name: Option<&str> = None;
        let mut resp: Option<&str> = None;
        let mut peer_id: Option<&str> = None;
        let mut peer_challenge: Option<&str> = None;
        for (key, value) in pairs {
            match key.as_str() {
                "AuthMethod" => answers.push(self.method(value)?),
                "CHAP_A" => answers.extend(self.algorithm(value)?),
                "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => {
                    let slot = match key.as_str() {
                        "CHAP_N" => &mut name,
                        "CHAP_R" => &mut resp,
                        "CHAP_I" => &mut peer_id,
                        _ => &mut peer_challenge,
                    };
                    if slot.replace(value.as_str()).is_some() {
                        return Err(AuthFailure {
                            status: status::INITIATOR_ERROR,
                            reason: format!("{key} sent twice"),
                            answers: Vec::new(),
                        });
                    }
                }
                other => answers.push((other.to_string(), NOT_UNDERSTOOD.to_string())),
            }
        }
        if name.is_some() || resp.is_some() || peer_id.is_some() || peer_challenge.is_some() {
            answers.extend(self.verify(name, resp, peer_id, peer_challenge)?);
        }
        Ok(answers)
    }

    fn method(&mut self, value: &str) -> Result<Pair, AuthFailure> {
        if !matches!(self.state, State::AwaitMethod) {
            return Err(AuthFailure {
                status: status::INITIATOR_ERROR,
                reason: "AuthMethod negotiated twice".into(),
                answers: Vec::new(),
            });
        }
        let wanted = if self.requires_chap() { "CHAP" } else { "None" };
        if keys::list(value).any(|v| v == wanted) {
            self.state = if self.requires_chap() {
                State::AwaitAlgorithm
            } else {
                State::Done
            };
            Ok(("AuthMethod".into(), wanted.into()))
        } else {
            // §12.1: no acceptable method: the login fails with authentication failure.
            Err(AuthFailure {
                status: status::AUTH_FAILURE,
                reason: format!("initiator does not offer AuthMethod {wanted}"),
                answers: vec![("AuthMethod".into(), REJECT.into())],
            })
        }
    }

    fn algorithm(&mut self, value: &str) -> Result<Vec<Pair>, AuthFailure> {
        if !matches!(self.state, State::AwaitAlgorithm) {
            return Err(fail("CHAP_A out of sequence"));
        }
        if !keys::list(value).any(|v| v == CHAP_MD5) {
            return Err(AuthFailure {
                status: status::AUTH_FAILURE,
                reason: "no acceptable CHAP algorithm (only MD5)".into(),
                answers: vec![("CHAP_A".into(), REJECT.into())],
            });
        }
        let mut rng = rand::thread_rng();
        let mut id = [0u8; 1];
        rng.fill_bytes(&mut id);
        let mut challenge = vec![0u8; CHALLENGE_LEN];
        rng.fill_bytes(&mut challenge);
        let out = vec![
            ("CHAP_A".into(), CHAP_MD5.into()),
            ("CHAP_I".into(), id[0].to_string()),
            ("CHAP_C".into(), keys::hex(&challenge)),
        ];
        self.state = State::AwaitResponse {
            id: id[0],
            challenge,
        };
        Ok(out)
    }

    fn verify(
        &mut self,
        name: Option<&str>,
        resp: Option<&str>,
        peer_id: Option<&str>,
        peer_challenge: Option<&str>,
    ) -> Result<Vec<Pair>, AuthFailure> {
        let (id, challenge) = match &self.state {
            State::AwaitResponse { id, challenge } => (*id, challenge.clone()),
            _ => return Err(fail("CHAP response out of sequence")),
        };
        let creds: &ChapCredentials = match &self.policy {
            AuthPolicy::Chap(c) => c,
            AuthPolicy::None => return Err(fail("CHAP response without CHAP")),
        };
        let (Some(name), Some(resp)) = (name, resp) else {
            return Err(fail("CHAP_N and CHAP_R are required"));
        };
        if name != creds.user {
            return Err(fail("unknown CHAP user"));
        }
        let resp = keys::binary(resp).ok_or_else(|| fail("CHAP_R is not a binary value"))?;
        let expected = chap_response(id, creds.secret.as_bytes(), &challenge);
        if !constant_time_eq(&resp, &expected) {
            return Err(fail("wrong CHAP response"));
        }
        // Mutual CHAP (§12.1.3): the initiator challenges us in the same request.
        let answers = match (peer_id, peer_challenge) {
            (None, None) => Vec::new(),
            (Some(pid), Some(pc)) => {
                let pid = keys::number(pid)
                    .filter(|n| *n <= 255)
                    .ok_or_else(|| fail("CHAP_I is not a byte"))? as u8;
                let pc = keys::binary(pc).ok_or_else(|| fail("CHAP_C is not a binary value"))?;
                if pc.is_empty() || pc.len() > MAX_CHALLENGE_LEN {
                    return Err(fail("CHAP_C length out of range"));
                }
                // §12.1.3: a target must refuse a challenge equal to its own (reflection).
                if pc == challenge {
                    return Err(fail("initiator reflected our CHAP challenge"));
                }
                let Some((muser, msecret)) = &creds.mutual else {
                    return Err(fail("mutual CHAP requested but not configured"));
                };
                let r = chap_response(pid, msecret.as_bytes(), &pc);
                vec![
                    ("CHAP_N".into(), muser.clone()),
                    ("CHAP_R".into(), keys::hex(&r)),
                ]
            }
            _ => return Err(fail("CHAP_I and CHAP_C must come together")),
        };
        self.state = State::Done;
        Ok(answers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(mutual: bool) -> ChapCredentials {
        ChapCredentials {
            user: "alice".into(),
            secret: "s3cr3t-s3cr3t".into(),
            mutual: mutual.then(|| ("target".into(), "tgt-secret-12".into())),
        }
    }

    fn p(k: &str, v: &str) -> Pair {
        (k.to_string(), v.to_string())
    }

    fn get<'a>(pairs: &'a [Pair], k: &str) -> &'a str {
        &pairs.iter().find(|(key, _)| key == k).unwrap().1
    }

    /// Runs steps 1 and 2; returns the id and challenge the target sent.
    fn start(a: &mut Authenticator) -> (u8, Vec<u8>) {
        assert_eq!(
            a.step(&[p("AuthMethod", "None,CHAP")]).unwrap(),
            vec![p("AuthMethod", "CHAP")]
        );
        let r = a.step(&[p("CHAP_A", "7,5")]).unwrap();
        assert_eq!(get(&r, "CHAP_A"), "5");
        let id: u8 = get(&r, "CHAP_I").parse().unwrap();
        let c = keys::binary(get(&r, "CHAP_C")).unwrap();
        assert_eq!(c.len(), CHALLENGE_LEN);
        (id, c)
    }

    #[test]
    fn md5_vector() {
        // RFC 1994 response over id 0x01, secret "secret", empty challenge.
        let r = chap_response(1, b"secret", b"");
        let mut h = Md5::new();
        h.update(b"\x01secret");
        assert_eq!(r.as_slice(), h.finalize().as_slice());
    }

    #[test]
    fn one_way_success_hex_and_base64() {
        for b64 in [false, true] {
            let mut a = Authenticator::new(AuthPolicy::Chap(creds(false)));
            let (id, c) = start(&mut a);
            let r = chap_response(id, b"s3cr3t-s3cr3t", &c);
            let enc = if b64 {
                // 16 bytes -> base64 via a tiny encoder for the test.
                let t = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
                let mut s = String::from("0b");
                for ch in r.chunks(3) {
                    let n =
                        ch.iter().fold(0u32, |a, b| (a << 8) | *b as u32) << (8 * (3 - ch.len()));
                    for i in 0..=ch.len() {
                        s.push(t[((n >> (18 - 6 * i)) & 63) as usize] as char);
                    }
                }
                s
            } else {
                keys::hex(&r)
            };
            let out = a.step(&[p("CHAP_N", "alice"), p("CHAP_R", &enc)]).unwrap();
            assert!(out.is_empty());
            assert!(a.is_done());
        }
    }

    #[test]
    fn wrong_secret_or_user_fails() {
        let mut a = Authenticator::new(AuthPolicy::Chap(creds(false)));
        let (id, c) = start(&mut a);
        let r = chap_response(id, b"wrong", &c);
        let e = a
            .step(&[p("CHAP_N", "alice"), p("CHAP_R", &keys::hex(&r))])
            .unwrap_err();
        assert_eq!(e.status, (2, 1));
        assert!(!e.reason.contains("s3cr3t"));

        let mut a = Authenticator::new(AuthPolicy::Chap(creds(false)));
        let (id, c) = start(&mut a);
        let r = chap_response(id, b"s3cr3t-s3cr3t", &c);
        let e = a
            .step(&[p("CHAP_N", "mallory"), p("CHAP_R", &keys::hex(&r))])
            .unwrap_err();
        assert_eq!(e.status, (2, 1));
    }

    #[test]
    fn mutual() {
        let mut a = Authenticator::new(AuthPolicy::Chap(creds(true)));
        let (id, c) = start(&mut a);
        let r = chap_response(id, b"s3cr3t-s3cr3t", &c);
        let out = a
            .step(&[
                p("CHAP_N", "alice"),
                p("CHAP_R", &keys::hex(&r)),
                p("CHAP_I", "77"),
                p("CHAP_C", "0x0102030405060708"),
            ])
            .unwrap();
        assert_eq!(get(&out, "CHAP_N"), "target");
        let expect = chap_response(77, b"tgt-secret-12", &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(keys::binary(get(&out, "CHAP_R")).unwrap(), expect);
        assert!(a.is_done());
    }

    #[test]
    fn mutual_refusals() {
        type Challenge = Box<dyn Fn(&[u8]) -> String>;
        let cases: Vec<(bool, Challenge)> = vec![
            (true, Box::new(|c: &[u8]| keys::hex(c))), // reflection
            (true, Box::new(|_: &[u8]| keys::hex(&vec![1u8; 1025]))), // too long
            (false, Box::new(|_: &[u8]| "0x0102".to_string())), // not configured
        ];
        for (configured, chal) in cases {
            let mut a = Authenticator::new(AuthPolicy::Chap(creds(configured)));
            let (id, c) = start(&mut a);
            let r = chap_response(id, b"s3cr3t-s3cr3t", &c);
            let e = a
                .step(&[
                    p("CHAP_N", "alice"),
                    p("CHAP_R", &keys::hex(&r)),
                    p("CHAP_I", "1"),
                    p("CHAP_C", &chal(&c)),
                ])
                .unwrap_err();
            assert_eq!(e.status, (2, 1));
            assert!(!a.is_done());
        }
    }

    #[test]
    fn method_and_algorithm_refusals() {
        let mut a = Authenticator::new(AuthPolicy::Chap(creds(false)));
        let e = a.step(&[p("AuthMethod", "None")]).unwrap_err();
        assert_eq!(e.status, (2, 1));
        assert_eq!(e.answers, vec![p("AuthMethod", "Reject")]);

        let mut a = Authenticator::new(AuthPolicy::Chap(creds(false)));
        a.step(&[p("AuthMethod", "CHAP")]).unwrap();
        let e = a.step(&[p("CHAP_A", "7")]).unwrap_err();
        assert_eq!(e.answers, vec![p("CHAP_A", "Reject")]);

        let mut a = Authenticator::new(AuthPolicy::None);
        assert_eq!(
            a.step(&[p("AuthMethod", "CHAP,None")]).unwrap(),
            vec![p("AuthMethod", "None")]
        );
        assert!(a.is_done());
        let mut a = Authenticator::new(AuthPolicy::None);
        assert!(a.step(&[p("AuthMethod", "CHAP")]).is_err());
    }

    #[test]
    fn skip_only_without_chap() {
        assert!(Authenticator::new(AuthPolicy::None).skip());
        assert!(!Authenticator::new(AuthPolicy::Chap(creds(false))).skip());
    }

    #[test]
    fn debug_hides_secrets() {
        let a = Authenticator::new(AuthPolicy::Chap(creds(true)));
        let s = format!("{a:?} {:?}", creds(true));
        assert!(!s.contains("s3cr3t") && !s.contains("tgt-secret"));
    }
}
