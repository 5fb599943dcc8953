//! Boot-storm load generator: N iSCSI clients log in at once and each replays a recorded boot
//! trace one command at a time, the way iPXE reads (it never has more than one command
//! outstanding). Also holds idle sessions open for memory measurements (`--idle N`).
//!
//! A trace line is `LBA BLOCKS` (a read: the original read-only format) or `R LBA BLOCKS` /
//! `W LBA BLOCKS`. A write sends a per-client pattern (client number, LBA and a write counter
//! in every block); every later read of a block this client wrote is checked against it, and
//! after the trace every written block is read back and checked (not timed).
//!
//! ```text
//! cargo run --release --example bootstorm -- --portal 127.0.0.1:3260 \
//!     --target iqn.2026-11.org.diskless:boot --clients 32 --trace tests/fixtures/boot-trace.txt
//! cargo run --release --example bootstorm -- --portal 127.0.0.1:3260 \
//!     --target iqn.2026-11.org.diskless:boot --idle 1000
//! ```
//!
//! Each client logs in as iPXE does (security stage with AuthMethod=None, then iPXE's operational
//! keys), sends TEST UNIT READY until GOOD and READ CAPACITY(10), then the trace's READs; the
//! latency figures cover the trace's READs only. PDUs are built and parsed with the crate's own
//! codec (`diskless::pdu`); no digests.
//! Prints a summary and one `RESULT key=value ...` line for scripts.

use bytes::{Bytes, BytesMut};
use clap::Parser;
use diskless::pdu::{
    self, lun_from_index, Bhs, Digests, LoginRequest, LogoutRequest, NopOut, Pdu, ScsiCommand,
};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// "Reserved" tag (RFC 7143 §11.18.2: ITT/TTT 0xffffffff).
const NO_TAG: u32 = 0xffff_ffff;
/// The ITT of every login request of one login (§11.12.6: the same for the whole login).
const LOGIN_ITT: u32 = 0x4c4f_4749;

#[derive(Parser, Debug)]
#[command(about = "iSCSI boot-storm load generator (replays a boot read trace from N clients)")]
struct Args {
    /// Target portal, HOST:PORT.
    #[arg(long)]
    portal: String,
    /// Target IQN.
    #[arg(long)]
    target: String,
    /// Number of clients, each with its own connection, session and initiator name.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Trace file: one `LBA BLOCKS` per line (512-byte blocks), `#` comments.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Initiator names are PREFIX + client number.
    #[arg(long, default_value = "iqn.2026-11.test:storm-")]
    initiator_prefix: String,
    /// LUN number to read (tgt's LUN 0 is its controller: use 1 there).
    #[arg(long, default_value_t = 0)]
    lun: u16,
    /// Block size of the LUN in bytes.
    #[arg(long, default_value_t = 512)]
    block_size: u32,
    /// Compare every read with this file (the image the target serves, read-only binding).
    #[arg(long)]
    verify: Option<PathBuf>,
    /// Instead of a storm: log in N sessions, print `idle: N sessions logged in`, and hold them
    /// (answering pings) until SIGTERM/SIGINT. With `--trace`, each session first replays the
    /// trace (a client that booted and now sits idle).
    #[arg(long)]
    idle: Option<usize>,
    /// MaxRecvDataSegmentLength we declare (iPXE declares 8192; Linux 262144).
    #[arg(long, default_value_t = 8192)]
    mrdsl: u32,
    /// At most this many logins in flight at once (0 = all at once).
    #[arg(long, default_value_t = 0)]
    login_parallel: usize,
    /// Give up on any single answer after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Each client logs in to its own target: `--target` + client number (tgt serving each
    /// client its own copy of the image, one target per copy).
    #[arg(long)]
    target_per_client: bool,
    /// Each client replays the trace this many times in its session (a longer storm, for
    /// side-by-side timings that rise above the noise; the first pass is the boot).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    passes: u32,
}

#[derive(Debug, thiserror::Error)]
enum StormError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("codec: {0}")]
    Pdu(#[from] pdu::PduError),
    #[error("connection closed by the target")]
    Closed,
    #[error("no answer within the timeout")]
    Timeout,
    #[error("login refused: status class {0:#04x} detail {1:#04x}")]
    LoginRefused(u8, u8),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("READ at LBA {lba} failed with SCSI status {status:#04x}")]
    Status { lba: u64, status: u8 },
    #[error("READ at LBA {0}: data differs from the verify image")]
    Mismatch(u64),
    #[error("WRITE at LBA {lba} failed with SCSI status {status:#04x}")]
    WriteStatus { lba: u64, status: u8 },
    #[error("client {client}: block {lba} does not hold what this client wrote there ({when})")]
    Pattern {
        client: usize,
        lba: u64,
        when: &'static str,
    },
}

/// One trace command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TraceOp {
    write: bool,
    lba: u64,
    blocks: u32,
}

/// The content client `client` writes into block `lba` with its `gen`-th write: a SplitMix64
/// stream seeded from all three, so a block from another client, another LBA or an older
/// write never matches.
fn fill_pattern(client: usize, lba: u64, gen: u32, block: &mut [u8]) {
    let mut x =
        (client as u64) << 40 ^ lba.rotate_left(20) ^ u64::from(gen) ^ 0x9e37_79b9_7f4a_7c15;
    for w in block.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let b = z.to_le_bytes();
        w.copy_from_slice(&b[..w.len()]);
    }
}

/// What one client wrote: for each block, the number of the write that last covered it.
#[derive(Default)]
struct Written {
    gens: std::collections::HashMap<u64, u32>,
    writes: u32,
}

impl Written {
    /// Fill `buf` (`blocks` blocks from `lba`) for the next write and remember it.
    fn next_write(&mut self, client: usize, lba: u64, bs: usize, buf: &mut [u8]) {
        self.writes = self.writes.wrapping_add(1);
        let blocks = buf.len() / bs;
        for (i, block) in buf.chunks_mut(bs).enumerate().take(blocks) {
            let b = lba + i as u64;
            fill_pattern(client, b, self.writes, block);
            self.gens.insert(b, self.writes);
        }
    }

    /// Check every block of `data` (read from `lba`) this client wrote before; returns the
    /// first block that differs.
    fn check(
        &self,
        client: usize,
        lba: u64,
        bs: usize,
        data: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Option<u64> {
        scratch.resize(bs, 0);
        for (i, block) in data.chunks(bs).enumerate() {
            let b = lba + i as u64;
            if let Some(&g) = self.gens.get(&b) {
                fill_pattern(client, b, g, scratch);
                if block != &scratch[..] {
                    return Some(b);
                }
            }
        }
        None
    }

    /// The written blocks as sorted runs of at most `max` blocks, for the read-back.
    fn runs(&self, max: u32) -> Vec<(u64, u32)> {
        let mut lbas: Vec<u64> = self.gens.keys().copied().collect();
        lbas.sort_unstable();
        let mut out: Vec<(u64, u32)> = Vec::new();
        for b in lbas {
            match out.last_mut() {
                Some((s, n)) if *s + u64::from(*n) == b && *n < max => *n += 1,
                _ => out.push((b, 1)),
            }
        }
        out
    }
}

/// One client connection: a socket, a receive buffer and the sequence numbers of one session.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    out: BytesMut,
    isid: [u8; 6],
    cmd_sn: u32,
    exp_stat_sn: u32,
    next_itt: u32,
    timeout: Duration,
    /// The target's MaxRecvDataSegmentLength (declared at login; 8192 if not, RFC 7143
    /// §13.12): the largest Data-Out segment we may send.
    target_mrdsl: u32,
    data_out: BytesMut,
}

impl Conn {
    async fn connect(portal: &str, index: usize, timeout: Duration) -> Result<Conn, StormError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(portal))
            .await
            .map_err(|_| StormError::Timeout)??;
        stream.set_nodelay(true)?;
        let pid = std::process::id();
        let n = index as u32;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            out: BytesMut::with_capacity(256),
            // Random-qualifier ISID format (§10.12.5), unique per client of this process.
            isid: [
                0x80,
                (pid >> 8) as u8,
                pid as u8,
                (n >> 16) as u8,
                (n >> 8) as u8,
                n as u8,
            ],
            cmd_sn: 1,
            exp_stat_sn: 0,
            next_itt: 1,
            timeout,
            target_mrdsl: 8192,
            data_out: BytesMut::new(),
        })
    }

    async fn send(&mut self, p: &Pdu) -> Result<(), StormError> {
        self.out.clear();
        pdu::encode(p, Digests::default(), &mut self.out);
        self.stream.write_all(&self.out).await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Pdu, StormError> {
        loop {
            if let Some(n) =
                pdu::frame_length(&self.buf, Digests::default(), pdu::MAX_WIRE_DATA_SEGMENT)?
            {
                let p = pdu::decode(self.buf.split_to(n).freeze(), Digests::default())?;
                if let Some(sn) = status_sn(&p.bhs) {
                    self.exp_stat_sn = sn.wrapping_add(1);
                }
                return Ok(p);
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(16 * 1024);
            }
            let n = tokio::time::timeout(self.timeout, self.stream.read_buf(&mut self.buf))
                .await
                .map_err(|_| StormError::Timeout)??;
            if n == 0 {
                return Err(StormError::Closed);
            }
        }
    }

    fn itt(&mut self) -> u32 {
        let t = self.next_itt;
        self.next_itt = match self.next_itt.wrapping_add(1) {
            NO_TAG | 0 => 1,
            v => v,
        };
        t
    }

    async fn login_stage(
        &mut self,
        csg: u8,
        nsg: u8,
        keys: &[(&str, &str)],
    ) -> Result<(), StormError> {
        let mut text = Vec::new();
        for (k, v) in keys {
            text.extend_from_slice(k.as_bytes());
            text.push(b'=');
            text.extend_from_slice(v.as_bytes());
            text.push(0);
        }
        let mut data = Bytes::from(text);
        // A stage may take several exchanges (the target answers with Continue or without
        // Transit); re-send an empty request until it lets us move on (§6.1, §11.12).
        for _ in 0..16 {
            let req = Pdu {
                bhs: Bhs::LoginRequest(LoginRequest {
                    transit: true,
                    cont: false,
                    csg,
                    nsg,
                    version_max: 0,
                    version_min: 0,
                    isid: self.isid,
                    tsih: 0,
                    itt: LOGIN_ITT,
                    cid: 0,
                    cmd_sn: self.cmd_sn,
                    exp_stat_sn: self.exp_stat_sn,
                }),
                data: std::mem::take(&mut data),
            };
            self.send(&req).await?;
            let resp = self.recv().await?;
            let Bhs::LoginResponse(r) = &resp.bhs else {
                return Err(StormError::Protocol("expected a Login Response".into()));
            };
            if (r.status_class, r.status_detail) != (0, 0) {
                return Err(StormError::LoginRefused(r.status_class, r.status_detail));
            }
            for kv in resp.data.split(|&b| b == 0) {
                if let Some(v) = kv.strip_prefix(b"MaxRecvDataSegmentLength=") {
                    if let Some(n) = std::str::from_utf8(v).ok().and_then(|v| v.parse().ok()) {
                        self.target_mrdsl = n;
                    }
                }
            }
            if r.transit && !r.cont && r.nsg == nsg {
                self.cmd_sn = r.exp_cmd_sn;
                return Ok(());
            }
        }
        Err(StormError::Protocol("login stage did not complete".into()))
    }

    /// Log in the way iPXE does: a security stage with AuthMethod=None, then the operational
    /// stage with iPXE's keys (by default MaxRecvDataSegmentLength=8192, so a 64 KiB read comes
    /// back as eight Data-In PDUs, as it does for the firmware).
    async fn login(&mut self, initiator: &str, target: &str, mrdsl: u32) -> Result<(), StormError> {
        let mrdsl = mrdsl.to_string();
        self.login_stage(
            0,
            1,
            &[
                ("InitiatorName", initiator),
                ("TargetName", target),
                ("SessionType", "Normal"),
                ("AuthMethod", "None"),
            ],
        )
        .await?;
        self.login_stage(
            1,
            3,
            &[
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("MaxConnections", "1"),
                ("InitialR2T", "Yes"),
                ("ImmediateData", "No"),
                ("MaxRecvDataSegmentLength", &mrdsl),
                ("MaxBurstLength", "262144"),
                ("FirstBurstLength", "65536"),
                ("DefaultTime2Wait", "0"),
                ("DefaultTime2Retain", "0"),
                ("MaxOutstandingR2T", "1"),
                ("DataPDUInOrder", "Yes"),
                ("DataSequenceInOrder", "Yes"),
                ("ErrorRecoveryLevel", "0"),
            ],
        )
        .await
    }

    /// Answer a target ping (NOP-In with a TTT) as §11.18 asks; ignore pure StatSN updates.
    async fn answer_nop(&mut self, ttt: u32, lun: u64) -> Result<(), StormError> {
        if ttt == NO_TAG {
            return Ok(());
        }
        let p = Pdu::header_only(Bhs::NopOut(NopOut {
            immediate: true,
            lun,
            itt: NO_TAG,
            ttt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        }));
        self.send(&p).await
    }

    /// One READ, waiting for all its Data-In and its status. Returns the bytes received.
    async fn read(
        &mut self,
        lun: u64,
        lba: u64,
        blocks: u32,
        block_size: u32,
        keep: Option<&mut Vec<u8>>,
    ) -> Result<usize, StormError> {
        // READ(10), SBC-3 §5.11 (what iPXE sends for disks under 2 TiB), else READ(16) §5.13.
        let cdb = rw_cdb(0x28, 0x88, lba, blocks);
        let (status, got) = self
            .exec(lun, cdb, blocks.saturating_mul(block_size), keep)
            .await?;
        if status != 0 {
            return Err(StormError::Status { lba, status });
        }
        Ok(got)
    }

    /// One WRITE of `data` (whole blocks) with iPXE's keys (InitialR2T=Yes, ImmediateData=No):
    /// the command, then for each R2T the Data-Out PDUs of its burst (§11.7, §11.8; DataSN
    /// from 0 per R2T, segments of at most the target's MaxRecvDataSegmentLength), then the
    /// SCSI Response.
    async fn write(
        &mut self,
        lun: u64,
        lba: u64,
        block_size: u32,
        data: &[u8],
    ) -> Result<(), StormError> {
        let blocks = u32::try_from(data.len() / block_size as usize)
            .map_err(|_| StormError::Protocol("write too large".into()))?;
        // WRITE(10), SBC-3 §5.32, else WRITE(16) §5.34.
        let cdb = rw_cdb(0x2a, 0x8a, lba, blocks);
        let itt = self.itt();
        let cmd = Pdu::header_only(Bhs::ScsiCommand(ScsiCommand {
            immediate: false,
            final_: true,
            read: false,
            write: true,
            attr: pdu::task_attr::SIMPLE,
            lun,
            itt,
            expected_data_transfer_length: data.len() as u32,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb,
            bidi_read_length: None,
        }));
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&cmd).await?;
        loop {
            let p = self.recv().await?;
            match p.bhs {
                Bhs::R2t(r) if r.itt == itt => {
                    let start = r.buffer_offset as usize;
                    let end = start.saturating_add(r.desired_data_transfer_length as usize);
                    let Some(burst) = data.get(start..end) else {
                        return Err(StormError::Protocol(format!(
                            "R2T for bytes {start}..{end} of a {}-byte write",
                            data.len()
                        )));
                    };
                    let seg = self.target_mrdsl.max(512) as usize;
                    self.data_out.clear();
                    let n = burst.len().div_ceil(seg);
                    for (i, chunk) in burst.chunks(seg).enumerate() {
                        let d = Pdu {
                            bhs: Bhs::DataOut(pdu::DataOut {
                                final_: i + 1 == n,
                                lun,
                                itt,
                                ttt: r.ttt,
                                exp_stat_sn: self.exp_stat_sn,
                                data_sn: i as u32,
                                buffer_offset: (start + i * seg) as u32,
                            }),
                            data: Bytes::copy_from_slice(chunk),
                        };
                        pdu::encode(&d, Digests::default(), &mut self.data_out);
                    }
                    self.stream.write_all(&self.data_out).await?;
                }
                Bhs::ScsiResponse(r) if r.itt == itt => {
                    if r.response != 0 {
                        return Err(StormError::Protocol(format!(
                            "iSCSI response {:#04x} (target failure)",
                            r.response
                        )));
                    }
                    if r.status != 0 {
                        return Err(StormError::WriteStatus {
                            lba,
                            status: r.status,
                        });
                    }
                    return Ok(());
                }
                Bhs::NopIn(n) if n.itt == NO_TAG => self.answer_nop(n.ttt, n.lun).await?,
                other => {
                    return Err(StormError::Protocol(format!(
                        "unexpected PDU while waiting for write task {itt:#x}: {other:?}"
                    )))
                }
            }
        }
    }

    /// What iPXE does before its first READ: TEST UNIT READY until GOOD (a new I_T nexus
    /// may first get a CHECK CONDITION with UNIT ATTENTION, SPC-4 §5.14; tgt reports one),
    /// then READ CAPACITY(10) (SBC-3 §5.15). Returns the block size the target reports.
    async fn prepare(&mut self, lun: u64) -> Result<u32, StormError> {
        let mut ready = false;
        for _ in 0..8 {
            if self.exec(lun, vec![0u8; 16], 0, None).await?.0 == 0 {
                ready = true;
                break;
            }
        }
        if !ready {
            return Err(StormError::Protocol(
                "TEST UNIT READY never returned GOOD".into(),
            ));
        }
        let mut cdb = vec![0u8; 16];
        cdb[0] = 0x25;
        let mut cap = Vec::new();
        let (status, _) = self.exec(lun, cdb, 8, Some(&mut cap)).await?;
        match (status, cap.get(4..8)) {
            (0, Some(b)) => Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
            _ => Err(StormError::Protocol(format!(
                "READ CAPACITY(10) failed with status {status:#04x}"
            ))),
        }
    }

    /// Run one read-type (or no-data) command: send it, collect its Data-In (into `keep`
    /// when given) and its status. Returns (SCSI status, data bytes received).
    async fn exec(
        &mut self,
        lun: u64,
        cdb: Vec<u8>,
        edtl: u32,
        keep: Option<&mut Vec<u8>>,
    ) -> Result<(u8, usize), StormError> {
        let itt = self.itt();
        let cmd = Pdu::header_only(Bhs::ScsiCommand(ScsiCommand {
            immediate: false,
            final_: true,
            read: edtl > 0,
            write: false,
            attr: pdu::task_attr::SIMPLE,
            lun,
            itt,
            expected_data_transfer_length: edtl,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb,
            bidi_read_length: None,
        }));
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&cmd).await?;
        let mut got = 0usize;
        let mut keep = keep;
        if let Some(k) = keep.as_deref_mut() {
            k.clear();
            k.resize(edtl as usize, 0);
        }
        loop {
            let p = self.recv().await?;
            match p.bhs {
                Bhs::DataIn(d) if d.itt == itt => {
                    got += p.data.len();
                    if let Some(k) = keep.as_deref_mut() {
                        let off = d.buffer_offset as usize;
                        match k.get_mut(off..off + p.data.len()) {
                            Some(dst) => dst.copy_from_slice(&p.data),
                            None => {
                                return Err(StormError::Protocol(format!(
                                    "Data-In at offset {off} beyond the transfer length"
                                )))
                            }
                        }
                    }
                    // Status collapsed into the last Data-In (§11.7.4).
                    if d.status_present {
                        return Ok((d.status, got));
                    }
                }
                Bhs::ScsiResponse(r) if r.itt == itt => {
                    if r.response != 0 {
                        return Err(StormError::Protocol(format!(
                            "iSCSI response {:#04x} (target failure)",
                            r.response
                        )));
                    }
                    return Ok((r.status, got));
                }
                Bhs::NopIn(n) if n.itt == NO_TAG => self.answer_nop(n.ttt, n.lun).await?,
                other => {
                    return Err(StormError::Protocol(format!(
                        "unexpected PDU while waiting for task {itt:#x}: {other:?}"
                    )))
                }
            }
        }
    }

    /// Close the session (§11.14, reason 0) and wait for the Logout Response.
    async fn logout(&mut self) -> Result<(), StormError> {
        let itt = self.itt();
        let p = Pdu::header_only(Bhs::LogoutRequest(LogoutRequest {
            immediate: true,
            reason: 0,
            itt,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        }));
        self.send(&p).await?;
        loop {
            match self.recv().await?.bhs {
                Bhs::LogoutResponse(r) if r.itt == itt => return Ok(()),
                Bhs::NopIn(_) => {}
                other => {
                    return Err(StormError::Protocol(format!(
                        "expected a Logout Response, got {other:?}"
                    )))
                }
            }
        }
    }
}

/// StatSN of the PDUs that carry one, to keep ExpStatSN current (§4.2.2.2).
fn status_sn(b: &Bhs) -> Option<u32> {
    match b {
        Bhs::ScsiResponse(r) => Some(r.stat_sn),
        Bhs::LoginResponse(r) => Some(r.stat_sn),
        Bhs::LogoutResponse(r) => Some(r.stat_sn),
        Bhs::TextResponse(r) => Some(r.stat_sn),
        Bhs::TaskMgmtResponse(r) => Some(r.stat_sn),
        Bhs::Reject(r) => Some(r.stat_sn),
        Bhs::DataIn(r) if r.status_present => Some(r.stat_sn),
        Bhs::NopIn(r) if r.itt != NO_TAG => Some(r.stat_sn),
        _ => None,
    }
}

/// Parse a trace: `LBA BLOCKS` (a read, the original format) or `R|W LBA BLOCKS` per line,
/// `#` comments.
fn parse_trace(text: &str) -> Result<Vec<TraceOp>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let (write, nums) = match f.as_slice() {
            [a, b] => (false, (a, b)),
            ["R" | "r", a, b] => (false, (a, b)),
            ["W" | "w", a, b] => (true, (a, b)),
            _ => (false, (&"x", &"x")),
        };
        match (nums.0.parse::<u64>(), nums.1.parse::<u32>()) {
            (Ok(lba), Ok(blocks)) if blocks > 0 => out.push(TraceOp { write, lba, blocks }),
            _ => {
                return Err(format!(
                    "line {}: expected 'LBA BLOCKS' or 'R|W LBA BLOCKS', got {line:?}",
                    i + 1
                ))
            }
        }
    }
    if out.is_empty() {
        return Err("no commands in the trace".into());
    }
    Ok(out)
}

fn load_trace(path: &PathBuf) -> Result<Vec<TraceOp>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_trace(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// What one client measured.
#[derive(Default)]
struct ClientStats {
    login: Duration,
    done_at: Duration,
    latencies_us: Vec<u32>,
    bytes: u64,
    written: u64,
    writes: usize,
    /// Blocks read back and checked after the trace.
    checked: u64,
}

struct Shared {
    args: Args,
    trace: Vec<TraceOp>,
    verify: Option<std::fs::File>,
    start: Instant,
    gate: Option<tokio::sync::Semaphore>,
}

async fn login_client(sh: &Shared, index: usize) -> Result<Conn, StormError> {
    let _permit = match &sh.gate {
        Some(g) => Some(
            g.acquire()
                .await
                .map_err(|_| StormError::Protocol("login gate closed".into()))?,
        ),
        None => None,
    };
    let timeout = Duration::from_secs(sh.args.timeout_secs);
    let mut c = Conn::connect(&sh.args.portal, index, timeout).await?;
    let name = format!("{}{index}", sh.args.initiator_prefix);
    let target = if sh.args.target_per_client {
        format!("{}{index}", sh.args.target)
    } else {
        sh.args.target.clone()
    };
    c.login(&name, &target, sh.args.mrdsl).await?;
    Ok(c)
}

async fn storm_client(sh: Arc<Shared>, index: usize) -> Result<ClientStats, StormError> {
    let t0 = Instant::now();
    let mut c = login_client(&sh, index).await?;
    let mut st = ClientStats {
        login: t0.elapsed(),
        latencies_us: Vec::with_capacity(sh.trace.len() * sh.args.passes as usize),
        ..Default::default()
    };
    let written = replay(&sh, index, &mut c, &mut st).await?;
    st.done_at = sh.start.elapsed();
    readback(&sh, index, &mut c, &written, &mut st).await?;
    c.logout().await?;
    Ok(st)
}

/// TEST UNIT READY / READ CAPACITY, then every command of the trace, one at a time. Reads
/// of blocks this client wrote are checked against its pattern; the other blocks against
/// `--verify` when given. Returns what the client wrote.
async fn replay(
    sh: &Shared,
    client: usize,
    c: &mut Conn,
    st: &mut ClientStats,
) -> Result<Written, StormError> {
    let lun = lun_from_index(sh.args.lun);
    let bs = sh.args.block_size;
    let reported = c.prepare(lun).await?;
    if reported != bs {
        return Err(StormError::Protocol(format!(
            "the LUN has {reported}-byte blocks, the trace assumes {bs}"
        )));
    }
    let mut written = Written::default();
    let has_writes = sh.trace.iter().any(|o| o.write);
    let mut keep = (sh.verify.is_some() || has_writes).then(Vec::new);
    let mut want = Vec::new();
    let mut wbuf = Vec::new();
    let mut scratch = Vec::new();
    let passes = sh
        .trace
        .iter()
        .cycle()
        .take(sh.trace.len() * sh.args.passes as usize);
    for op in passes {
        let (lba, blocks) = (op.lba, op.blocks);
        if op.write {
            wbuf.resize(blocks as usize * bs as usize, 0);
            written.next_write(client, lba, bs as usize, &mut wbuf);
            let t = Instant::now();
            c.write(lun, lba, bs, &wbuf).await?;
            st.latencies_us
                .push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
            st.written += wbuf.len() as u64;
            st.writes += 1;
            continue;
        }
        let t = Instant::now();
        let n = c.read(lun, lba, blocks, bs, keep.as_mut()).await?;
        st.latencies_us
            .push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
        st.bytes += n as u64;
        let Some(got) = &keep else { continue };
        if let Some(b) = written.check(client, lba, bs as usize, got, &mut scratch) {
            return Err(StormError::Pattern {
                client,
                lba: b,
                when: "read during the trace",
            });
        }
        if let Some(f) = &sh.verify {
            want.resize(got.len(), 0);
            f.read_exact_at(&mut want, lba * u64::from(bs))?;
            // Blocks this client wrote were checked above; compare the rest.
            for (i, (g, w)) in got
                .chunks(bs as usize)
                .zip(want.chunks(bs as usize))
                .enumerate()
            {
                let b = lba + i as u64;
                if g != w && !written.gens.contains_key(&b) {
                    return Err(StormError::Mismatch(b));
                }
            }
        }
    }
    Ok(written)
}

/// Read back every block the client wrote (runs of up to 128 blocks) and check the pattern.
async fn readback(
    sh: &Shared,
    client: usize,
    c: &mut Conn,
    written: &Written,
    st: &mut ClientStats,
) -> Result<(), StormError> {
    let lun = lun_from_index(sh.args.lun);
    let bs = sh.args.block_size;
    let mut got = Vec::new();
    let mut scratch = Vec::new();
    for (lba, blocks) in written.runs(128) {
        c.read(lun, lba, blocks, bs, Some(&mut got)).await?;
        if let Some(b) = written.check(client, lba, bs as usize, &got, &mut scratch) {
            return Err(StormError::Pattern {
                client,
                lba: b,
                when: "read-back after the trace",
            });
        }
        st.checked += u64::from(blocks);
    }
    Ok(())
}

async fn idle_client(sh: Arc<Shared>, index: usize) -> Result<Conn, StormError> {
    let mut c = login_client(&sh, index).await?;
    if !sh.trace.is_empty() {
        replay(&sh, index, &mut c, &mut ClientStats::default()).await?;
    }
    Ok(c)
}

/// Hold a logged-in session, answering pings, until the target closes it.
async fn hold(mut c: Conn) {
    c.timeout = Duration::from_secs(365 * 24 * 3600);
    while let Ok(p) = c.recv().await {
        if let Bhs::NopIn(n) = p.bhs {
            if c.answer_nop(n.ttt, n.lun).await.is_err() {
                return;
            }
        }
    }
}

/// The CDB of a READ or WRITE: the 10-byte form (`op10`) when the LBA fits 32 bits and the
/// length 16 bits, else the 16-byte form (`op16`); both in a 16-byte buffer (SBC-3 §5.11,
/// §5.13, §5.32, §5.34: LBA at byte 2, length at 7 (10) or 10 (16), big-endian).
fn rw_cdb(op10: u8, op16: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let mut cdb = vec![0u8; 16];
    match (u32::try_from(lba), u16::try_from(blocks)) {
        (Ok(l), Ok(b)) => {
            cdb[0] = op10;
            cdb[2..6].copy_from_slice(&l.to_be_bytes());
            cdb[7..9].copy_from_slice(&b.to_be_bytes());
        }
        _ => {
            cdb[0] = op16;
            cdb[2..10].copy_from_slice(&lba.to_be_bytes());
            cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
        }
    }
    cdb
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len() - 1))
        .copied()
        .unwrap_or(0)
}

async fn run_idle(sh: Arc<Shared>, n: usize) -> Result<(), String> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        set.spawn(idle_client(sh.clone(), i));
    }
    let mut conns = Vec::with_capacity(n);
    let mut failed = 0usize;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(c)) => conns.push(c),
            Ok(Err(e)) => {
                failed += 1;
                if failed <= 5 {
                    eprintln!("bootstorm: idle login failed: {e}");
                }
            }
            Err(e) => return Err(format!("client task: {e}")),
        }
    }
    println!(
        "idle: {} sessions logged in{} ({} failed) in {:.2} s",
        conns.len(),
        if sh.trace.is_empty() {
            ""
        } else {
            " and replayed the trace"
        },
        failed,
        sh.start.elapsed().as_secs_f64()
    );
    println!(
        "RESULT mode=idle sessions={} failed={failed} login_s={:.3}",
        conns.len(),
        sh.start.elapsed().as_secs_f64()
    );
    if failed > 0 {
        return Err(format!("{failed} of {n} logins failed"));
    }
    let mut holders = tokio::task::JoinSet::new();
    for c in conns {
        holders.spawn(hold(c));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    holders.abort_all();
    Ok(())
}

async fn run_storm(sh: Arc<Shared>) -> Result<(), String> {
    let n = sh.args.clients;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let s = sh.clone();
        set.spawn(async move { (i, storm_client(s, i).await) });
    }
    let mut stats = Vec::with_capacity(n);
    let mut errors = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok((_, Ok(s))) => stats.push(s),
            Ok((i, Err(e))) => errors.push(format!("client {i}: {e}")),
            Err(e) => errors.push(format!("client task: {e}")),
        }
    }
    let wall = sh.start.elapsed();
    for e in errors.iter().take(10) {
        eprintln!("bootstorm: {e}");
    }
    let mut lat: Vec<u32> = stats
        .iter()
        .flat_map(|s| s.latencies_us.iter().copied())
        .collect();
    lat.sort_unstable();
    let mut logins: Vec<u32> = stats
        .iter()
        .map(|s| u32::try_from(s.login.as_micros()).unwrap_or(u32::MAX))
        .collect();
    logins.sort_unstable();
    let last = stats
        .iter()
        .map(|s| s.done_at)
        .max()
        .unwrap_or_default()
        .as_secs_f64();
    let first = stats
        .iter()
        .map(|s| s.done_at)
        .min()
        .unwrap_or_default()
        .as_secs_f64();
    let bytes: u64 = stats.iter().map(|s| s.bytes).sum();
    let mib = bytes as f64 / 1048576.0;
    let wmib = stats.iter().map(|s| s.written).sum::<u64>() as f64 / 1048576.0;
    let checked: u64 = stats.iter().map(|s| s.checked).sum();
    let writes = sh.trace.iter().filter(|o| o.write).count();
    let (p50, p99, max) = (
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        lat.last().copied().unwrap_or(0),
    );
    println!(
        "clients: {n} ({} ok, {} failed), trace: {} reads and {writes} writes per client and pass, {} passes",
        stats.len(),
        errors.len(),
        sh.trace.len() - writes,
        sh.args.passes
    );
    println!(
        "last client done: {last:.3} s (first: {first:.3} s, wall {:.3} s)",
        wall.as_secs_f64()
    );
    println!(
        "login: p50 {:.1} ms, p99 {:.1} ms",
        f64::from(percentile(&logins, 50.0)) / 1000.0,
        f64::from(percentile(&logins, 99.0)) / 1000.0
    );
    println!(
        "command latency over {} commands: p50 {p50} µs, p99 {p99} µs, max {max} µs",
        lat.len()
    );
    println!(
        "read: {mib:.1} MiB in total, {:.1} MiB/s aggregate",
        if last > 0.0 { mib / last } else { 0.0 }
    );
    if writes > 0 {
        println!(
            "write: {wmib:.1} MiB in total; read back and checked after the trace: {checked} blocks"
        );
    }
    println!(
        "RESULT mode=storm clients={n} ok={} failed={} last_done_s={last:.3} p50_us={p50} p99_us={p99} max_us={max} mib={mib:.1} wmib={wmib:.1} checked_blocks={checked} commands={}",
        stats.len(),
        errors.len(),
        lat.len()
    );
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{} of {n} clients failed", errors.len()))
    }
}

fn main() {
    let args = Args::parse();
    let code = match setup(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bootstorm: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn setup(args: Args) -> Result<(), String> {
    let idle = args.idle;
    let trace = match (&args.trace, idle) {
        (Some(p), _) => load_trace(p)?,
        (None, Some(_)) => Vec::new(),
        (None, None) => return Err("--trace FILE is required (or --idle N)".into()),
    };
    let verify = match &args.verify {
        Some(p) => {
            Some(std::fs::File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()))?)
        }
        None => None,
    };
    let gate = (args.login_parallel > 0).then(|| tokio::sync::Semaphore::new(args.login_parallel));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async move {
        let sh = Arc::new(Shared {
            args,
            trace,
            verify,
            start: Instant::now(),
            gate,
        });
        match idle {
            Some(n) => run_idle(sh, n).await,
            None => run_storm(sh).await,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_and_new_trace_lines_parse() {
        let t = parse_trace("# c\n64 4\nR 0 1\nW 2048 8\n\nw 5 1\n").unwrap();
        assert_eq!(
            t,
            vec![
                TraceOp {
                    write: false,
                    lba: 64,
                    blocks: 4
                },
                TraceOp {
                    write: false,
                    lba: 0,
                    blocks: 1
                },
                TraceOp {
                    write: true,
                    lba: 2048,
                    blocks: 8
                },
                TraceOp {
                    write: true,
                    lba: 5,
                    blocks: 1
                },
            ]
        );
        assert!(parse_trace("X 1 2\n").is_err());
        assert!(parse_trace("1 0\n").is_err());
        assert!(parse_trace("# only\n").is_err());
    }

    #[test]
    fn patterns_differ_per_client_block_and_write_and_check_finds_the_last() {
        let mut a = vec![0u8; 512];
        let mut b = vec![0u8; 512];
        fill_pattern(1, 10, 1, &mut a);
        for (c, l, g) in [(2, 10, 1), (1, 11, 1), (1, 10, 2)] {
            fill_pattern(c, l, g, &mut b);
            assert_ne!(a, b);
        }
        let mut w = Written::default();
        let mut buf = vec![0u8; 4 * 512];
        w.next_write(3, 100, 512, &mut buf);
        let first = buf.clone();
        let mut two = vec![0u8; 2 * 512];
        w.next_write(3, 102, 512, &mut two);
        let mut scratch = Vec::new();
        // Blocks 100-101 still hold the first write; 102-103 the second.
        assert_eq!(w.check(3, 100, 512, &first[..1024], &mut scratch), None);
        assert_eq!(w.check(3, 102, 512, &two, &mut scratch), None);
        assert_eq!(w.check(3, 100, 512, &first, &mut scratch), Some(102));
        assert_eq!(w.check(4, 102, 512, &two, &mut scratch), Some(102));
        assert_eq!(w.runs(3), vec![(100, 3), (103, 1)]);
    }
}
