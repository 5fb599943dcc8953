//! A raw iSCSI client for hostile-initiator tests: a blocking TCP socket, the crate's own codec
//! for well-formed PDUs, raw bytes for malformed ones, and reads with a timeout.
//!
//! [`RawServer`] starts the binary like `common::Server` does, but with a `settings:` section
//! (timeouts, session limits) and with access to the server's pid (to watch its memory).
#![allow(dead_code)] // each test uses a different subset

use crate::common::{Config, Server};
use bytes::{Bytes, BytesMut};
use diskless::pdu::{
    self, Bhs, DataOut, Digests, LoginRequest, LoginResponse, NopIn, NopOut, Pdu, PduError,
    ScsiCommand, ScsiResponse, TextRequest, BHS_LEN,
};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Default time to wait for an answer the server must send.
pub const ANSWER: Duration = Duration::from_secs(5);
/// "Reserved" tag value (§11.18.2: ITT/TTT 0xffffffff).
pub const NO_TAG: u32 = 0xffff_ffff;

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// A running `diskless serve` with a `settings:` section: `common::Server` plus what the
/// hostile tests watch (pid, memory, liveness).
pub struct RawServer {
    server: Server,
    pub port: u16,
}

impl RawServer {
    /// Start with `cfg` plus `settings` (a YAML flow mapping such as
    /// `{login_timeout_secs: 2}`; empty for none).
    pub fn start(dir: &Path, cfg: &Config, settings: &str) -> RawServer {
        let mut yaml = String::new();
        if !settings.is_empty() {
            yaml.push_str(&format!("settings: {settings}\n"));
        }
        yaml.push_str(&cfg.to_yaml());
        let server = Server::start(dir, &Config::yaml(&yaml));
        RawServer {
            port: server.port,
            server,
        }
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// Resident set size of the server in KiB (/proc/PID/status VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.server.alive()
    }

    /// SIGTERM, then wait up to `limit` for the exit.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        self.server.terminate(limit)
    }

    pub fn stderr(&self) -> String {
        self.server.stderr()
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.port)
    }
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// Why `recv` returned no PDU.
#[derive(Debug)]
pub enum RecvError {
    /// Nothing complete arrived in time.
    Timeout,
    /// The server closed the connection (EOF or reset).
    Closed,
    Io(io::Error),
    /// The server sent something our codec refuses.
    Codec(PduError),
}

/// The outcome of one SCSI command.
#[derive(Debug, Default)]
pub struct ScsiResult {
    pub status: u8,
    pub response: u8,
    pub data: Vec<u8>,
    /// Sense data (without the 2-byte SenseLength).
    pub sense: Vec<u8>,
    pub residual: u32,
    pub underflow: bool,
    pub overflow: bool,
}

impl ScsiResult {
    /// (sense key, ASC, ASCQ) for fixed (0x70/0x71) or descriptor (0x72/0x73) sense.
    pub fn sense_triplet(&self) -> Option<(u8, u8, u8)> {
        let s = &self.sense;
        match s.first()? & 0x7f {
            0x70 | 0x71 => Some((s.get(2)? & 0x0f, *s.get(12)?, *s.get(13)?)),
            0x72 | 0x73 => Some((s.get(1)? & 0x0f, *s.get(2)?, *s.get(3)?)),
            _ => None,
        }
    }
}

static ISID_COUNTER: AtomicU32 = AtomicU32::new(1);

/// A fresh ISID (random-qualifier format, §10.12.5) unique within the test process.
pub fn fresh_isid() -> [u8; 6] {
    let n = ISID_COUNTER.fetch_add(1, Ordering::Relaxed);
    let p = std::process::id();
    [
        0x80,
        (p >> 8) as u8,
        p as u8,
        (n >> 16) as u8,
        (n >> 8) as u8,
        n as u8,
    ]
}

/// Parse `key=value\0...` text.
pub fn parse_keys(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let s = String::from_utf8_lossy(p);
            match s.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (s.to_string(), String::new()),
            }
        })
        .collect()
}

/// `key=value\0` text for a list of pairs.
pub fn keys_text(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (k, val) in pairs {
        v.extend_from_slice(k.as_bytes());
        v.push(b'=');
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

/// Encode a PDU without digests into bytes (for tests that corrupt them afterwards).
pub fn encode(p: &Pdu, digests: Digests) -> Vec<u8> {
    let mut out = BytesMut::new();
    pdu::encode(p, digests, &mut out);
    out.to_vec()
}

/// The operational keys every login offers unless overridden: no digests, R2T for every write
/// (so Data-Out tests control every byte), large bursts.
pub const DEFAULT_KEYS: &[(&str, &str)] = &[
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("ImmediateData", "No"),
    ("InitialR2T", "Yes"),
    ("MaxRecvDataSegmentLength", "262144"),
    ("MaxBurstLength", "1048576"),
    ("FirstBurstLength", "262144"),
    ("ErrorRecoveryLevel", "0"),
    ("MaxConnections", "1"),
];

pub struct Client {
    pub stream: TcpStream,
    /// Digests in force for the full-feature phase (login PDUs never carry digests).
    pub digests: Digests,
    buf: BytesMut,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    next_itt: u32,
    pub isid: [u8; 6],
    pub tsih: u16,
    /// Keys the target answered with during login.
    pub answers: Vec<(String, String)>,
    /// The target's MaxRecvDataSegmentLength: the largest data segment we may send.
    pub max_send: u32,
    pub logged_in: bool,
    /// The LUN of the commands [`Client::command`] builds (0 unless a test sets it).
    pub lun: u64,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        Client::connect_stream(TcpStream::connect(("127.0.0.1", port)).unwrap())
    }

    /// A client on an already connected socket (another portal address).
    pub fn connect_stream(stream: TcpStream) -> Client {
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            digests: Digests::default(),
            buf: BytesMut::new(),
            cmd_sn: 1,
            exp_stat_sn: 0,
            next_itt: 1,
            isid: fresh_isid(),
            tsih: 0,
            answers: Vec::new(),
            max_send: 8192,
            logged_in: false,
            lun: 0,
        }
    }

    /// A fresh Initiator Task Tag.
    pub fn itt(&mut self) -> u32 {
        let t = self.next_itt;
        self.next_itt = self.next_itt.wrapping_add(1);
        if self.next_itt == NO_TAG {
            self.next_itt = 1;
        }
        t
    }

    /// Take the next CmdSN for a non-immediate command.
    pub fn take_cmd_sn(&mut self) -> u32 {
        let sn = self.cmd_sn;
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        sn
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Encode with the digests in force (none before the login completes) and send.
    pub fn send(&mut self, p: &Pdu) -> io::Result<()> {
        let d = if self.logged_in {
            self.digests
        } else {
            Digests::default()
        };
        let bytes = encode(p, d);
        self.send_raw(&bytes)
    }

    /// Read one PDU (any opcode) within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Pdu, RecvError> {
        let deadline = Instant::now() + timeout;
        let d = if self.logged_in {
            self.digests
        } else {
            Digests::default()
        };
        loop {
            if !self.buf.is_empty() {
                match pdu::frame_length(&self.buf, d, pdu::MAX_WIRE_DATA_SEGMENT) {
                    Ok(Some(n)) => {
                        let frame = self.buf.split_to(n).freeze();
                        let p = pdu::decode(frame, d).map_err(RecvError::Codec)?;
                        if let Some(sn) = status_sn(&p.bhs) {
                            self.exp_stat_sn = sn.wrapping_add(1);
                        }
                        return Ok(p);
                    }
                    Ok(None) => {}
                    Err(e) => return Err(RecvError::Codec(e)),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RecvError::Timeout);
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(RecvError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return Err(RecvError::Timeout)
                }
                Err(e)
                    if e.kind() == io::ErrorKind::ConnectionReset
                        || e.kind() == io::ErrorKind::ConnectionAborted
                        || e.kind() == io::ErrorKind::BrokenPipe =>
                {
                    return Err(RecvError::Closed)
                }
                Err(e) => return Err(RecvError::Io(e)),
            }
        }
    }

    /// Read PDUs until the server closes the connection; true if it did within `timeout`.
    /// PDUs that arrive before the close are returned through `seen`.
    pub fn closed_within(&mut self, timeout: Duration, seen: &mut Vec<Pdu>) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.recv(left) {
                Ok(p) => seen.push(p),
                Err(RecvError::Closed) => return true,
                Err(RecvError::Io(_)) => return true,
                Err(RecvError::Timeout) => return false,
                // Garbage after what we could parse: keep reading raw bytes until EOF.
                Err(RecvError::Codec(_)) => self.buf.clear(),
            }
        }
    }

    /// Whether nothing at all arrives within `timeout` (and the connection stays open).
    pub fn silent_for(&mut self, timeout: Duration) -> Result<(), Pdu> {
        match self.recv(timeout) {
            Ok(p) => Err(p),
            Err(RecvError::Timeout) => Ok(()),
            Err(e) => panic!("connection failed while expecting silence: {e:?}"),
        }
    }

    /// One Login Request with these keys.
    pub fn login_request(
        &mut self,
        csg: u8,
        nsg: u8,
        transit: bool,
        cont: bool,
        data: Vec<u8>,
    ) -> io::Result<()> {
        let itt = 0x4c4f_4749; // "LOGI": the same ITT for the whole login (§11.12.6)
        let p = Pdu {
            bhs: Bhs::LoginRequest(LoginRequest {
                transit,
                cont,
                csg,
                nsg,
                version_max: 0,
                version_min: 0,
                isid: self.isid,
                tsih: self.tsih,
                itt,
                cid: 0,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            }),
            data: Bytes::from(data),
        };
        self.send(&p)
    }

    /// Read a Login Response (panics on anything else).
    pub fn login_response(&mut self, timeout: Duration) -> (LoginResponse, Bytes) {
        match self.recv(timeout) {
            Ok(Pdu {
                bhs: Bhs::LoginResponse(r),
                data,
            }) => (r, data),
            other => panic!("expected a Login Response, got {other:?}"),
        }
    }

    /// A full login starting in the operational stage: `keys` first, then [`DEFAULT_KEYS`]
    /// that `keys` does not override. Returns the failing status (class, detail) on refusal.
    pub fn login_with(&mut self, keys: &[(&str, &str)]) -> Result<(), (u8, u8)> {
        let mut pairs: Vec<(&str, &str)> = keys.to_vec();
        for (k, v) in DEFAULT_KEYS {
            if !keys.iter().any(|(kk, _)| kk == k) {
                pairs.push((k, v));
            }
        }
        let text = keys_text(&pairs);
        self.login_request(1, 3, true, false, text).unwrap();
        for _ in 0..16 {
            let (r, data) = self.login_response(ANSWER);
            if (r.status_class, r.status_detail) != (0, 0) {
                return Err((r.status_class, r.status_detail));
            }
            self.answers.extend(parse_keys(&data));
            if r.transit && r.nsg == 3 {
                self.tsih = r.tsih;
                self.cmd_sn = r.exp_cmd_sn;
                for (k, v) in &self.answers {
                    match k.as_str() {
                        "MaxRecvDataSegmentLength" => {
                            self.max_send = v.parse().unwrap_or(8192);
                        }
                        "HeaderDigest" => self.digests.header = v == "CRC32C",
                        "DataDigest" => self.digests.data = v == "CRC32C",
                        _ => {}
                    }
                }
                self.logged_in = true;
                return Ok(());
            }
            // Collect the rest of a long answer, or ask again to move on.
            self.login_request(1, 3, !r.cont, false, Vec::new())
                .unwrap();
        }
        panic!("login did not complete in 16 exchanges");
    }

    /// Log in to `target` as `initiator` (a normal session).
    pub fn login(&mut self, initiator: &str, target: &str) -> Result<(), (u8, u8)> {
        self.login_with(&[
            ("InitiatorName", initiator),
            ("TargetName", target),
            ("SessionType", "Normal"),
        ])
    }

    /// A discovery session.
    pub fn login_discovery(&mut self, initiator: &str) -> Result<(), (u8, u8)> {
        self.login_with(&[("InitiatorName", initiator), ("SessionType", "Discovery")])
    }

    /// The answer the target gave for `key` at login.
    pub fn answer(&self, key: &str) -> Option<&str> {
        self.answers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A NOP-Out PDU (not sent) with a fresh ITT and the next CmdSN, marked immediate.
    pub fn nop_out(&mut self, data: &[u8]) -> Pdu {
        let itt = self.itt();
        Pdu {
            bhs: Bhs::NopOut(NopOut {
                immediate: true,
                lun: 0,
                itt,
                ttt: NO_TAG,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            }),
            data: Bytes::copy_from_slice(data),
        }
    }

    /// Ping: NOP-Out with `data`, expect the NOP-In echo (skipping target pings).
    pub fn ping(&mut self, data: &[u8]) -> (NopIn, Bytes) {
        let p = self.nop_out(data);
        let itt = p.bhs.itt();
        self.send(&p).unwrap();
        loop {
            match self.recv(ANSWER) {
                Ok(Pdu {
                    bhs: Bhs::NopIn(n),
                    data,
                }) if n.itt == itt => return (n, data),
                Ok(Pdu {
                    bhs: Bhs::NopIn(n), ..
                }) if n.itt == NO_TAG => continue,
                other => panic!("expected the NOP-In echo of {itt:#x}, got {other:?}"),
            }
        }
    }

    /// A SCSI Command PDU (not sent) with a fresh ITT and the next CmdSN.
    pub fn command(&mut self, cdb: &[u8], edtl: u32, read: bool, write: bool) -> ScsiCommand {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        ScsiCommand {
            immediate: false,
            final_: true,
            read,
            write,
            attr: pdu::task_attr::SIMPLE,
            lun: self.lun,
            itt: self.itt(),
            expected_data_transfer_length: edtl,
            cmd_sn: self.take_cmd_sn(),
            exp_stat_sn: self.exp_stat_sn,
            cdb: c.to_vec(),
            bidi_read_length: None,
        }
    }

    /// Collect Data-In and the status of task `itt`, answering R2Ts from `write_data`.
    pub fn finish(&mut self, itt: u32, write_data: &[u8]) -> ScsiResult {
        let mut res = ScsiResult::default();
        let mut data_sns: std::collections::HashMap<u32, u32> = Default::default();
        loop {
            let p = match self.recv(Duration::from_secs(20)) {
                Ok(p) => p,
                Err(e) => panic!("waiting for task {itt:#x}: {e:?}"),
            };
            match &p.bhs {
                Bhs::DataIn(d) if d.itt == itt => {
                    let off = d.buffer_offset as usize;
                    if res.data.len() < off + p.data.len() {
                        res.data.resize(off + p.data.len(), 0);
                    }
                    res.data[off..off + p.data.len()].copy_from_slice(&p.data);
                    if d.status_present {
                        res.status = d.status;
                        res.residual = d.residual_count;
                        res.underflow = d.underflow;
                        res.overflow = d.overflow;
                        return res;
                    }
                }
                Bhs::R2t(r) if r.itt == itt => {
                    let start = r.buffer_offset as usize;
                    let end = start + r.desired_data_transfer_length as usize;
                    let chunk = self.max_send as usize;
                    let mut off = start;
                    while off < end {
                        let n = chunk.min(end - off);
                        let sn = data_sns.entry(r.ttt).or_insert(0);
                        let d = Pdu {
                            bhs: Bhs::DataOut(DataOut {
                                final_: off + n == end,
                                lun: r.lun,
                                itt,
                                ttt: r.ttt,
                                exp_stat_sn: self.exp_stat_sn,
                                data_sn: *sn,
                                buffer_offset: off as u32,
                            }),
                            data: Bytes::copy_from_slice(&write_data[off..off + n]),
                        };
                        *sn += 1;
                        self.send(&d).unwrap();
                        off += n;
                    }
                }
                Bhs::ScsiResponse(r) if r.itt == itt => {
                    return scsi_result(res, r, &p.data);
                }
                Bhs::NopIn(n) if n.itt == NO_TAG => {}
                other => panic!("unexpected PDU while waiting for task {itt:#x}: {other:?}"),
            }
        }
    }

    /// Collect the results of several read-type tasks completing in any order.
    pub fn finish_many(&mut self, itts: &[u32]) -> std::collections::HashMap<u32, ScsiResult> {
        let mut partial: std::collections::HashMap<u32, ScsiResult> = Default::default();
        let mut done: std::collections::HashMap<u32, ScsiResult> = Default::default();
        while done.len() < itts.len() {
            let p = match self.recv(Duration::from_secs(20)) {
                Ok(p) => p,
                Err(e) => panic!("waiting for {} tasks: {e:?}", itts.len() - done.len()),
            };
            let itt = p.bhs.itt();
            assert!(itts.contains(&itt), "unexpected PDU {:?}", p.bhs);
            let res = partial.entry(itt).or_default();
            match &p.bhs {
                Bhs::DataIn(d) => {
                    let off = d.buffer_offset as usize;
                    if res.data.len() < off + p.data.len() {
                        res.data.resize(off + p.data.len(), 0);
                    }
                    res.data[off..off + p.data.len()].copy_from_slice(&p.data);
                    if d.status_present {
                        res.status = d.status;
                        res.residual = d.residual_count;
                        let r = partial.remove(&itt).unwrap_or_default();
                        done.insert(itt, r);
                    }
                }
                Bhs::ScsiResponse(r) => {
                    let acc = partial.remove(&itt).unwrap_or_default();
                    done.insert(itt, scsi_result(acc, r, &p.data));
                }
                other => panic!("unexpected PDU {other:?}"),
            }
        }
        done
    }

    /// Run a command to completion.
    pub fn run(&mut self, cdb: &[u8], edtl: u32, write_data: Option<&[u8]>) -> ScsiResult {
        let c = self.command(
            cdb,
            edtl,
            write_data.is_none() && edtl > 0,
            write_data.is_some(),
        );
        let itt = c.itt;
        self.send(&Pdu::header_only(Bhs::ScsiCommand(c))).unwrap();
        self.finish(itt, write_data.unwrap_or(&[]))
    }

    /// READ(16) of `blocks` 512-byte blocks at `lba`, without panicking when the connection
    /// fails (a node killed under the client): the data if GOOD, else what went wrong.
    pub fn try_read16(&mut self, lba: u64, blocks: u32) -> Result<Vec<u8>, String> {
        let c = self.command(&rw16_cdb(0x88, lba, blocks), blocks * 512, true, false);
        let itt = c.itt;
        self.send(&Pdu::header_only(Bhs::ScsiCommand(c)))
            .map_err(|e| format!("send: {e}"))?;
        let mut data = Vec::with_capacity(blocks as usize * 512);
        loop {
            let p = self
                .recv(Duration::from_secs(20))
                .map_err(|e| format!("{e:?}"))?;
            match &p.bhs {
                Bhs::DataIn(d) if d.itt == itt => {
                    let off = d.buffer_offset as usize;
                    if data.len() < off + p.data.len() {
                        data.resize(off + p.data.len(), 0);
                    }
                    data[off..off + p.data.len()].copy_from_slice(&p.data);
                    if d.status_present {
                        return if d.status == 0 {
                            Ok(data)
                        } else {
                            Err(format!("status {:#x}", d.status))
                        };
                    }
                }
                Bhs::ScsiResponse(r) if r.itt == itt => {
                    return if r.status == 0 {
                        Ok(data)
                    } else {
                        Err(format!("status {:#x}: {:?}", r.status, p.data))
                    };
                }
                Bhs::NopIn(n) if n.itt == NO_TAG => {}
                other => return Err(format!("unexpected PDU {other:?}")),
            }
        }
    }

    /// READ(10) of `blocks` 512-byte blocks at `lba`; panics unless GOOD.
    pub fn read10(&mut self, lba: u32, blocks: u16) -> Vec<u8> {
        let r = self.run(&read10_cdb(lba, blocks), u32::from(blocks) * 512, None);
        assert_eq!(r.status, 0, "READ(10) failed: {r:?}");
        r.data
    }

    /// WRITE(10) of `data` (whole 512-byte blocks) at `lba`; panics unless GOOD.
    pub fn write10(&mut self, lba: u32, data: &[u8]) {
        let blocks = (data.len() / 512) as u16;
        let r = self.run(&write10_cdb(lba, blocks), data.len() as u32, Some(data));
        assert_eq!(r.status, 0, "WRITE(10) failed: {r:?}");
    }

    /// Send a Text Request with `text` and return the whole (possibly continued) answer.
    pub fn text(&mut self, text: &[u8]) -> Vec<(String, String)> {
        let itt = self.itt();
        let mut ttt = NO_TAG;
        let mut all = Vec::new();
        let mut body = text.to_vec();
        loop {
            let p = Pdu {
                bhs: Bhs::TextRequest(TextRequest {
                    immediate: true,
                    final_: true,
                    cont: false,
                    lun: 0,
                    itt,
                    ttt,
                    cmd_sn: self.cmd_sn,
                    exp_stat_sn: self.exp_stat_sn,
                }),
                data: Bytes::from(std::mem::take(&mut body)),
            };
            self.send(&p).unwrap();
            match self.recv(ANSWER) {
                Ok(Pdu {
                    bhs: Bhs::TextResponse(r),
                    data,
                }) => {
                    all.extend_from_slice(&data);
                    if !r.cont {
                        return parse_keys(&all);
                    }
                    ttt = r.ttt;
                }
                other => panic!("expected a Text Response, got {other:?}"),
            }
        }
    }

    /// Half-close our side.
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

fn scsi_result(mut res: ScsiResult, r: &ScsiResponse, data: &[u8]) -> ScsiResult {
    res.status = r.status;
    res.response = r.response;
    res.residual = r.residual_count;
    res.underflow = r.underflow;
    res.overflow = r.overflow;
    if data.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
        res.sense = data[2..(2 + n).min(data.len())].to_vec();
    }
    res
}

/// StatSN of the PDUs that carry one (to keep ExpStatSN current).
fn status_sn(b: &Bhs) -> Option<u32> {
    match b {
        Bhs::ScsiResponse(r) => Some(r.stat_sn),
        Bhs::TaskMgmtResponse(r) => Some(r.stat_sn),
        Bhs::LoginResponse(r) => Some(r.stat_sn),
        Bhs::TextResponse(r) => Some(r.stat_sn),
        Bhs::LogoutResponse(r) => Some(r.stat_sn),
        Bhs::Reject(r) => Some(r.stat_sn),
        Bhs::DataIn(r) if r.status_present => Some(r.stat_sn),
        Bhs::NopIn(r) if r.itt != NO_TAG => Some(r.stat_sn),
        _ => None,
    }
}

pub fn read10_cdb(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

pub fn write10_cdb(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10_cdb(lba, blocks);
    c[0] = 0x2a;
    c
}

/// READ(16) (0x88) / WRITE(16) (0x8a) CDB.
pub fn rw16_cdb(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// A 48-byte BHS with `opcode` in byte 0 and the given DataSegmentLength, ITT and CmdSN; the
/// rest zero. For PDUs the codec must not be trusted to build.
pub fn raw_bhs(opcode: u8, flags: u8, dsl: u32, itt: u32, cmd_sn: u32) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = opcode;
    b[1] = flags;
    b[5..8].copy_from_slice(&dsl.to_be_bytes()[1..4]);
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[20..24].copy_from_slice(&NO_TAG.to_be_bytes());
    b[24..28].copy_from_slice(&cmd_sn.to_be_bytes());
    b
}

/// A CRC32C digest as the wire carries it (little-endian, like Linux and libiscsi).
pub fn digest(bytes: &[u8]) -> [u8; 4] {
    crc32c::crc32c(bytes).to_le_bytes()
}

/// Hash of a file's bytes (to prove an image did not change): CRC32C of each MiB, folded.
pub fn file_hash(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .chunks(1 << 20)
        .enumerate()
        .fold(bytes.len() as u64, |h, (i, c)| {
            h.rotate_left(7) ^ (u64::from(crc32c::crc32c(c)) << (i % 32))
        })
}

impl Client {
    /// SYNCHRONIZE CACHE(10) of the current LUN: what was written is durable.
    pub fn sync(&mut self) {
        assert_eq!(
            self.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None).status,
            0
        );
    }

    /// A clean Logout (close the session, RFC 7143 §11.14), as an OS does at shutdown: the
    /// Logout Response comes and the target closes the connection.
    pub fn logout(mut self) {
        let itt = self.itt();
        let req = Pdu {
            bhs: Bhs::LogoutRequest(pdu::LogoutRequest {
                immediate: true,
                reason: 0,
                itt,
                cid: 0,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            }),
            data: Bytes::new(),
        };
        self.send(&req).unwrap();
        let mut seen = Vec::new();
        assert!(self.closed_within(Duration::from_secs(5), &mut seen));
        assert!(
            seen.iter().any(|p| matches!(p.bhs, Bhs::LogoutResponse(_))),
            "no Logout Response: {seen:?}"
        );
    }
}
