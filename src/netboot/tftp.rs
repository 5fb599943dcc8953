//! TFTP, read-only (RFC 1350), with the option extension (RFC 2347), blksize (RFC 2348),
//! timeout and tsize (RFC 2349) and windowsize (RFC 7440): a pure packet codec and a pure
//! transfer machine (events and time in, packets to send out). The shell in
//! [`super::server`] owns the sockets and reads the file's blocks.
//!
//! Why not a crate: the maintained Rust TFTP servers either run their own executor
//! (async-tftp is built on smol/async-io, a second reactor beside tokio) or a thread per
//! transfer over blocking std sockets, and neither keeps its protocol logic apart from IO
//! for deterministic tests. This is ~400 lines, fuzzed (fuzz/fuzz_targets/tftp_packet.rs).

use std::time::{Duration, Instant};

pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// RFC 1350 §5 error codes we send.
pub const ERR_UNDEFINED: u16 = 0;
pub const ERR_NOT_FOUND: u16 = 1;
pub const ERR_ACCESS: u16 = 2;
pub const ERR_ILLEGAL: u16 = 4;
pub const ERR_UNKNOWN_TID: u16 = 5;
/// RFC 2347: option negotiation refused.
pub const ERR_OPTIONS: u16 = 8;

/// Largest request we read (a name, a mode and a few options fit easily).
pub const MAX_REQUEST: usize = 1024;
/// The block size without a blksize option (RFC 1350).
pub const DEFAULT_BLKSIZE: u16 = 512;
/// Largest block we agree to (RFC 2348 allows 65464; bigger blocks only fragment).
pub const MAX_BLKSIZE: u16 = 8192;
/// Largest window we agree to (RFC 7440).
pub const MAX_WINDOW: u16 = 64;
/// Retransmissions before a transfer is given up.
pub const MAX_RETRIES: u32 = 5;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// A packet that cannot be served. Each kind maps to one TFTP ERROR packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TftpError {
    /// Not a well-formed TFTP packet (error 4, illegal operation).
    #[error("malformed: {0}")]
    Malformed(String),
    /// Well-formed but not served here: writes, mail mode (error 4 or 2).
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
}

impl TftpError {
    /// The ERROR packet's code (RFC 1350 §5).
    pub fn code(&self) -> u16 {
        match self {
            TftpError::Malformed(_) => ERR_ILLEGAL,
            TftpError::Unsupported(_) => ERR_ACCESS,
        }
    }
}

/// A read request and its options (RFC 2347: names case-insensitive, unknown ones ignored).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadRequest {
    pub filename: String,
    pub blksize: Option<u16>,
    /// The client asked for the size (tsize, normally 0 in a read request).
    pub tsize: bool,
    pub timeout: Option<u8>,
    pub windowsize: Option<u16>,
}

/// A decoded packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Read(ReadRequest),
    Write,
    Data(u16),
    Ack(u16),
    Error(u16, String),
    Oack,
}

fn cstrings(b: &[u8]) -> Result<Vec<&str>, TftpError> {
    // Every field is NUL-terminated (RFC 1350 §5); the last byte must be a NUL.
    if b.last() != Some(&0) {
        return Err(TftpError::Malformed("fields are not NUL-terminated".into()));
    }
    b[..b.len() - 1]
        .split(|&c| c == 0)
        .map(|f| std::str::from_utf8(f).map_err(|_| TftpError::Malformed("not text".into())))
        .collect()
}

/// Decode one datagram.
pub fn parse(b: &[u8]) -> Result<Packet, TftpError> {
    if b.len() < 4 {
        return Err(TftpError::Malformed(format!("{} bytes", b.len())));
    }
    let op = u16::from_be_bytes([b[0], b[1]]);
    let n = u16::from_be_bytes([b[2], b[3]]);
    match op {
        OP_RRQ => {
            if b.len() > MAX_REQUEST {
                return Err(TftpError::Malformed("request too long".into()));
            }
            let f = cstrings(&b[2..])?;
            let (Some(name), Some(mode)) = (f.first(), f.get(1)) else {
                return Err(TftpError::Malformed("no filename or mode".into()));
            };
            if name.is_empty() {
                return Err(TftpError::Malformed("empty filename".into()));
            }
            match mode.to_ascii_lowercase().as_str() {
                // netascii is served byte for byte: we only serve binaries.
                "octet" | "netascii" => {}
                "mail" => return Err(TftpError::Unsupported("mail mode")),
                _ => return Err(TftpError::Malformed(format!("mode {mode:?}"))),
            }
            let mut r = ReadRequest {
                filename: name.to_string(),
                ..ReadRequest::default()
            };
            let opts = &f[2..];
            if opts.len() % 2 != 0 {
                return Err(TftpError::Malformed("option without a value".into()));
            }
            for kv in opts.chunks(2) {
                let (k, v) = (kv[0].to_ascii_lowercase(), kv[1]);
                // A value we cannot use is dropped (the option is not acknowledged): the
                // transfer goes on with the default, as RFC 2347 allows.
                match k.as_str() {
                    "blksize" => r.blksize = v.parse::<u16>().ok().filter(|s| *s >= 8),
                    "tsize" => r.tsize = v.parse::<u64>().is_ok(),
                    "timeout" => r.timeout = v.parse::<u8>().ok().filter(|t| *t >= 1),
                    "windowsize" => r.windowsize = v.parse::<u16>().ok().filter(|w| *w >= 1),
                    _ => {}
                }
            }
            Ok(Packet::Read(r))
        }
        OP_WRQ => Ok(Packet::Write),
        OP_DATA => Ok(Packet::Data(n)),
        OP_ACK if b.len() == 4 => Ok(Packet::Ack(n)),
        OP_ACK => Err(TftpError::Malformed("ACK is 4 bytes".into())),
        OP_ERROR => {
            let msg = b[4..].split(|&c| c == 0).next().unwrap_or(&[]);
            Ok(Packet::Error(n, String::from_utf8_lossy(msg).into_owned()))
        }
        OP_OACK => Ok(Packet::Oack),
        _ => Err(TftpError::Malformed(format!("opcode {op}"))),
    }
}

/// An ERROR packet.
pub fn error_packet(code: u16, msg: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(5 + msg.len());
    p.extend_from_slice(&OP_ERROR.to_be_bytes());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    p.push(0);
    p
}

/// A DATA packet header for `block` (the data follows).
pub fn data_header(block: u64) -> [u8; 4] {
    let b = (block & 0xffff) as u16;
    let [o0, o1] = OP_DATA.to_be_bytes();
    let [b0, b1] = b.to_be_bytes();
    [o0, o1, b0, b1]
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes (an OACK or an ERROR).
    Send(Vec<u8>),
    /// Send DATA block `block` (1-based) holding `len` bytes of the file from `offset`.
    Block { block: u64, offset: u64, len: usize },
    /// The last block was acknowledged.
    Done,
    /// Give up (too many retransmissions, or the client sent an ERROR).
    Fail(String),
}

/// One read transfer (RFC 1350 §6 lock-step, or RFC 7440 windows).
#[derive(Debug, Clone)]
pub struct Transfer {
    size: u64,
    blksize: u16,
    window: u16,
    timeout: Duration,
    /// Blocks acknowledged so far.
    acked: u64,
    /// Blocks in the file: the last one is shorter than blksize (possibly empty).
    total: u64,
    /// The OACK, until the client acknowledges it with ACK 0.
    oack: Option<Vec<u8>>,
    retries: u32,
    deadline: Instant,
    finished: bool,
}

impl Transfer {
    /// Start serving a file of `size` bytes: negotiate the options, send the OACK or the
    /// first window.
    pub fn start(req: &ReadRequest, size: u64, now: Instant) -> (Transfer, Vec<Action>) {
        let mut oack: Vec<u8> = OP_OACK.to_be_bytes().to_vec();
        let mut any = false;
        let mut add = |k: &str, v: String| {
            oack.extend_from_slice(k.as_bytes());
            oack.push(0);
            oack.extend_from_slice(v.as_bytes());
            oack.push(0);
            any = true;
        };
        let blksize = match req.blksize {
            Some(b) => {
                let b = b.min(MAX_BLKSIZE);
                add("blksize", b.to_string());
                b
            }
            None => DEFAULT_BLKSIZE,
        };
        let timeout = match req.timeout {
            Some(t) => {
                add("timeout", t.to_string());
                Duration::from_secs(u64::from(t))
            }
            None => DEFAULT_TIMEOUT,
        };
        if req.tsize {
            add("tsize", size.to_string());
        }
        let window = match req.windowsize {
            Some(w) => {
                let w = w.min(MAX_WINDOW);
                add("windowsize", w.to_string());
                w
            }
            None => 1,
        };
        let mut t = Transfer {
            size,
            blksize,
            window,
            timeout,
            acked: 0,
            total: size / u64::from(blksize) + 1,
            oack: any.then_some(oack),
            retries: 0,
            deadline: now + timeout,
            finished: false,
        };
        let actions = t.send_pending();
        (t, actions)
    }

    pub fn blksize(&self) -> u16 {
        self.blksize
    }

    /// When [`Transfer::on_timeout`] is due.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn finished(&self) -> bool {
        self.finished
    }

    fn block(&self, block: u64) -> Action {
        let offset = (block - 1) * u64::from(self.blksize);
        let len = (self.size - offset).min(u64::from(self.blksize)) as usize;
        Action::Block { block, offset, len }
    }

    /// The OACK if unacknowledged, else the window after the last acknowledged block.
    fn send_pending(&mut self) -> Vec<Action> {
        if let Some(o) = &self.oack {
            return vec![Action::Send(o.clone())];
        }
        let last = (self.acked + u64::from(self.window)).min(self.total);
        (self.acked + 1..=last).map(|b| self.block(b)).collect()
    }

    /// A packet from the client's TID.
    pub fn on_packet(&mut self, p: &[u8], now: Instant) -> Vec<Action> {
        if self.finished {
            return Vec::new();
        }
        match parse(p) {
            Ok(Packet::Ack(n)) => self.on_ack(n, now),
            Ok(Packet::Error(code, msg)) => {
                self.finished = true;
                vec![Action::Fail(format!("client error {code}: {msg}"))]
            }
            // Anything else mid-transfer is ignored (a late duplicate request, garbage);
            // the timeout recovers a lost exchange.
            _ => Vec::new(),
        }
    }

    fn on_ack(&mut self, n: u16, now: Instant) -> Vec<Action> {
        if self.oack.is_some() {
            if n != 0 {
                return Vec::new();
            }
            self.oack = None;
        } else {
            // The 16-bit number names a block of the current window (blocks wrap at 65536).
            let sent = (self.acked + u64::from(self.window)).min(self.total);
            let Some(k) = (self.acked + 1..=sent).find(|k| (k & 0xffff) as u16 == n) else {
                // A duplicate or old ACK: never answer it with data (the Sorcerer's
                // Apprentice bug, RFC 1123 §4.2.3.1).
                return Vec::new();
            };
            self.acked = k;
            if self.acked == self.total {
                self.finished = true;
                return vec![Action::Done];
            }
        }
        self.retries = 0;
        self.deadline = now + self.timeout;
        self.send_pending()
    }

    /// The deadline passed with no progress: send again, or give up.
    pub fn on_timeout(&mut self, now: Instant) -> Vec<Action> {
        if self.finished {
            return Vec::new();
        }
        self.retries += 1;
        if self.retries > MAX_RETRIES {
            self.finished = true;
            return vec![Action::Fail(format!(
                "no ACK after {MAX_RETRIES} retransmissions (block {})",
                self.acked + 1
            ))];
        }
        self.deadline = now + self.timeout;
        self.send_pending()
    }
}

/// A read request packet (tests, fuzz seeds).
pub fn read_request(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut p = OP_RRQ.to_be_bytes().to_vec();
    for s in [name, "octet"]
        .into_iter()
        .chain(options.iter().flat_map(|(k, v)| [*k, *v]))
    {
        p.extend_from_slice(s.as_bytes());
        p.push(0);
    }
    p
}

pub fn ack(block: u16) -> Vec<u8> {
    let mut p = OP_ACK.to_be_bytes().to_vec();
    p.extend_from_slice(&block.to_be_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rrq(p: &[u8]) -> ReadRequest {
        match parse(p).unwrap() {
            Packet::Read(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_and_options() {
        let r = rrq(&read_request(
            "undionly.kpxe",
            &[
                ("BLKSIZE", "1432"),
                ("tsize", "0"),
                ("x-unknown", "1"),
                ("windowsize", "4"),
            ],
        ));
        assert_eq!(r.filename, "undionly.kpxe");
        assert_eq!(r.blksize, Some(1432));
        assert!(r.tsize);
        assert_eq!(r.windowsize, Some(4));
        // Unusable values are dropped, not fatal.
        let r = rrq(&read_request(
            "a",
            &[("blksize", "7"), ("timeout", "0"), ("tsize", "x")],
        ));
        assert_eq!((r.blksize, r.timeout, r.tsize), (None, None, false));
        for bad in [
            vec![],
            vec![0, 1],
            vec![0, 1, b'a', 0],
            vec![0, 1, b'a', 0, b'o'],
            vec![0, 1, 0, b'o', b'c', b't', b'e', b't', 0],
            vec![0, 9, 0, 0],
            vec![0, 4, 0, 1, 0],
            read_request("a", &[("blksize", "512")])[..12].to_vec(),
            [read_request("a", &[]), b"lonely\0".to_vec()].concat(),
            [vec![0, 1], vec![b'a'; 2000], vec![0]].concat(),
        ] {
            assert!(
                parse(&bad).is_err() || !matches!(parse(&bad), Ok(Packet::Read(_))),
                "{bad:?}"
            );
        }
        assert_eq!(parse(&[0, 2, b'a', 0, b'o', 0]), Ok(Packet::Write));
        let mut mail = read_request("a", &[]);
        mail.truncate(mail.len() - 6);
        mail.extend_from_slice(b"mail\0");
        assert_eq!(parse(&mail), Err(TftpError::Unsupported("mail mode")));
    }

    #[test]
    fn lock_step_without_options() {
        let now = Instant::now();
        let (mut t, a) = Transfer::start(&rrq(&read_request("f", &[])), 1024, now);
        assert_eq!(
            a,
            vec![Action::Block {
                block: 1,
                offset: 0,
                len: 512
            }]
        );
        // A duplicate ACK 0 / an ACK of a block not sent: nothing.
        assert!(t.on_packet(&ack(0), now).is_empty());
        assert!(t.on_packet(&ack(5), now).is_empty());
        assert_eq!(
            t.on_packet(&ack(1), now),
            vec![Action::Block {
                block: 2,
                offset: 512,
                len: 512
            }]
        );
        // 1024 bytes = two full blocks and an empty one (RFC 1350 §6).
        assert_eq!(
            t.on_packet(&ack(2), now),
            vec![Action::Block {
                block: 3,
                offset: 1024,
                len: 0
            }]
        );
        assert_eq!(t.on_packet(&ack(2), now), vec![]);
        assert_eq!(t.on_packet(&ack(3), now), vec![Action::Done]);
        assert!(t.finished());
    }

    #[test]
    fn options_are_acknowledged_first() {
        let now = Instant::now();
        let r = rrq(&read_request(
            "f",
            &[
                ("blksize", "65464"),
                ("tsize", "0"),
                ("timeout", "3"),
                ("windowsize", "1000"),
            ],
        ));
        let (mut t, a) = Transfer::start(&r, 20_000, now);
        let Action::Send(oack) = &a[0] else {
            panic!("{a:?}")
        };
        assert_eq!(
            oack.as_slice(),
            [
                &b"\0\x06blksize\x008192\x00timeout\x003\x00"[..],
                b"tsize\x0020000\x00windowsize\x0064\x00"
            ]
            .concat()
        );
        assert_eq!(t.blksize(), MAX_BLKSIZE);
        // ACK 0 starts the data: 20000 bytes in 8192-byte blocks is 3 blocks, one window.
        let a = t.on_packet(&ack(0), now);
        assert_eq!(a.len(), 3);
        assert_eq!(
            a[2],
            Action::Block {
                block: 3,
                offset: 16384,
                len: 3616
            }
        );
        // Timeout: the whole window again.
        assert_eq!(t.on_timeout(now).len(), 3);
        // A partial ACK resends from the next block.
        assert_eq!(
            t.on_packet(&ack(1), now),
            vec![
                Action::Block {
                    block: 2,
                    offset: 8192,
                    len: 8192
                },
                Action::Block {
                    block: 3,
                    offset: 16384,
                    len: 3616
                }
            ]
        );
        assert_eq!(t.on_packet(&ack(3), now), vec![Action::Done]);
    }

    #[test]
    fn gives_up_and_wraps() {
        let now = Instant::now();
        let (mut t, _) = Transfer::start(&rrq(&read_request("f", &[])), 10, now);
        for _ in 0..MAX_RETRIES {
            assert_eq!(t.on_timeout(now).len(), 1);
        }
        assert!(matches!(t.on_timeout(now)[0], Action::Fail(_)));
        // Block numbers wrap at 65536 (a 40 MB file in 512-byte blocks).
        let (mut t, _) = Transfer::start(&rrq(&read_request("f", &[])), 40 << 20, now);
        for b in 1..=70_000u64 {
            let a = t.on_packet(&ack((b & 0xffff) as u16), now);
            assert_eq!(
                a,
                vec![Action::Block {
                    block: b + 1,
                    offset: b * 512,
                    len: 512
                }]
            );
        }
        assert_eq!(data_header(65_536), [0, 3, 0, 0]);
        // A client ERROR ends it.
        let (mut t, _) = Transfer::start(&rrq(&read_request("f", &[])), 10, now);
        assert!(matches!(
            t.on_packet(&error_packet(0, "bye"), now)[0],
            Action::Fail(_)
        ));
    }
}
