//! Framing over a byte stream: buffer until the codec says a whole PDU is there, then decode
//! (the mini-redis shape), and the writer task that stamps sequence numbers and writes header,
//! payload and trailer with vectored writes.

use crate::pdu::{self, Bhs, Digests, Pdu, PduError};
use crate::storage::FileSlice;
use bytes::{Buf, Bytes, BytesMut};
use std::io::IoSlice;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Why no PDU could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed by the initiator")]
    Eof,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A PDU the codec refused. If `skipped`, the PDU's bytes are being discarded and the
    /// connection may go on (after a Reject); otherwise the stream cannot be resynchronised.
    #[error("{error}")]
    Pdu { error: PduError, skipped: bool },
}

/// Receive side: a buffer and the framing rules. Cancel-safe: all state lives in `self`.
pub struct FrameReader {
    buf: BytesMut,
    skip: usize,
}

/// Receive buffer of a connection waiting for its next PDU.
const IDLE_BUFFER: usize = 4 * 1024;
/// Receive buffer while a PDU is arriving.
const BUSY_BUFFER: usize = 64 * 1024;

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader {
            buf: BytesMut::new(),
            skip: 0,
        }
    }
}

impl FrameReader {
    pub async fn next<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        digests: Digests,
        max_data: u32,
    ) -> Result<Pdu, ReadError> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(self.buf.len());
                self.buf.advance(n);
                self.skip -= n;
            }
            if self.skip == 0 && !self.buf.is_empty() {
                match pdu::frame_length(&self.buf, digests, max_data) {
                    Ok(Some(n)) => {
                        let frame = self.buf.split_to(n).freeze();
                        return pdu::decode(frame, digests)
                            .map_err(|error| self.recoverable(error, 0));
                    }
                    Ok(None) => {}
                    Err(error) => return Err(self.recoverable(error, usize::MAX)),
                }
            }
            // An idle connection holds a small buffer (1000 idle boot clients must cost little
            // memory); a busy one, with a partial PDU or data streaming in, a large one.
            if self.buf.is_empty() && self.buf.capacity() > IDLE_BUFFER {
                self.buf = BytesMut::new();
            }
            let want = if self.buf.is_empty() {
                IDLE_BUFFER
            } else {
                BUSY_BUFFER
            };
            if self.buf.capacity() - self.buf.len() < want / 4 {
                self.buf.reserve(want);
            }
            if rd.read_buf(&mut self.buf).await? == 0 {
                return Err(ReadError::Eof);
            }
        }
    }

    /// Errors that name the whole PDU's length let us skip it. `consumed` = 0 when the frame
    /// was already taken out of the buffer by decode.
    fn recoverable(&mut self, error: PduError, pending: usize) -> ReadError {
        let frame_len = match &error {
            PduError::UnknownOpcode { frame_len, .. } => Some(*frame_len),
            PduError::DataDigest { frame_len, .. } => Some(*frame_len),
            PduError::Malformed { frame_len, .. } => *frame_len,
            PduError::HeaderDigest | PduError::DataSegmentTooLong { .. } => None,
        };
        match frame_len {
            Some(n) if pending == usize::MAX => {
                self.skip = n;
                ReadError::Pdu {
                    error,
                    skipped: true,
                }
            }
            Some(_) => ReadError::Pdu {
                error,
                skipped: true,
            },
            None => ReadError::Pdu {
                error,
                skipped: false,
            },
        }
    }
}

/// Sequence numbers shared by the connection's reader (which admits commands) and its writer
/// (which stamps every PDU), and the payload bytes queued for the writer (backpressure: an
/// initiator that does not read its responses must not make us buffer without bound).
#[derive(Debug, Default)]
pub struct SeqState {
    pub exp_cmd_sn: AtomicU32,
    pub max_cmd_sn: AtomicU32,
    /// Data-segment bytes handed to the writer and not yet taken off its queue.
    pub queued: AtomicUsize,
    /// Signalled whenever the writer takes work off its queue.
    pub drained: tokio::sync::Notify,
}

impl SeqState {
    pub fn set(&self, exp: u32, max: u32) {
        self.exp_cmd_sn.store(exp, Ordering::Release);
        self.max_cmd_sn.store(max, Ordering::Release);
    }
}

/// What the writer task is asked to do.
#[derive(Debug)]
pub enum Out {
    Pdu(Pdu),
    Pdus(Vec<Pdu>),
    /// Data-In PDUs whose data segments are sent from a file (`sendfile`), no data digest.
    File(Vec<(Pdu, FileSlice)>),
    /// Flush, then report through the channel (e.g. before closing after a Logout Response).
    Flush(tokio::sync::oneshot::Sender<()>),
}

impl Out {
    /// Data-segment bytes this message carries (what [`SeqState::queued`] counts).
    pub fn payload_len(&self) -> usize {
        match self {
            Out::Pdu(p) => p.data.len(),
            Out::Pdus(ps) => ps.iter().map(|p| p.data.len()).sum(),
            Out::File(ps) => ps.iter().map(|(_, f)| f.len).sum(),
            Out::Flush(_) => 0,
        }
    }
}

/// Stamp StatSN/ExpCmdSN/MaxCmdSN (RFC 7143 §4.2.2.2, §11): responses take the next StatSN;
/// R2T and unsolicited NOP-In carry the current one without advancing it; Data-In without
/// status carries none.
pub fn stamp(bhs: &mut Bhs, stat_sn: &mut u32, exp: u32, max: u32) {
    let mut take = |advance: bool| {
        let v = *stat_sn;
        if advance {
            *stat_sn = stat_sn.wrapping_add(1);
        }
        v
    };
    match bhs {
        Bhs::ScsiResponse(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (take(true), exp, max),
        Bhs::TaskMgmtResponse(r) => {
            (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (take(true), exp, max)
        }
        Bhs::LoginResponse(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (take(true), exp, max),
        Bhs::TextResponse(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (take(true), exp, max),
        Bhs::LogoutResponse(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (take(true), exp, max),
        Bhs::Reject(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (take(true), exp, max),
        Bhs::AsyncMessage(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (take(true), exp, max),
        Bhs::DataIn(r) => {
            let sn = if r.status_present { take(true) } else { 0 };
            (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (sn, exp, max)
        }
        Bhs::NopIn(r) => {
            let sn = take(r.itt != 0xffff_ffff);
            (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (sn, exp, max)
        }
        Bhs::R2t(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) = (take(false), exp, max),
        _ => {}
    }
}

/// Payloads up to this size are copied into the batch buffer; larger ones go out by
/// vectored write straight from the SCSI layer's buffer.
const COPY_LIMIT: usize = 16 * 1024;
const BATCH_LIMIT: usize = 512 * 1024;

/// The writer task of one connection. Batches whatever is queued into one write.
pub async fn writer<W: Sink>(
    mut w: W,
    mut rx: mpsc::Receiver<Out>,
    digests: Digests,
    seq: Arc<SeqState>,
    mut stat_sn: u32,
) -> std::io::Result<()> {
    let mut batch = BytesMut::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            // Off the queue: at most this one message (and the batch) is held here.
            seq.queued.fetch_sub(msg.payload_len(), Ordering::AcqRel);
            seq.drained.notify_one();
            match msg {
                Out::Pdu(p) => put(&mut w, &mut batch, p, digests, &seq, &mut stat_sn).await?,
                Out::Pdus(ps) => {
                    for p in ps {
                        put(&mut w, &mut batch, p, digests, &seq, &mut stat_sn).await?;
                    }
                }
                Out::File(ps) => {
                    for (p, f) in ps {
                        put_file(&mut w, &mut batch, p, &f, digests, &seq, &mut stat_sn).await?;
                    }
                }
                Out::Flush(done) => {
                    w.write_all(&batch).await?;
                    batch.clear();
                    w.flush().await?;
                    let _ = done.send(());
                }
            }
            if batch.len() < BATCH_LIMIT {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            w.write_all(&batch).await?;
            batch.clear();
        }
        // Give a burst's buffer back while the connection idles (1000 booted-then-idle
        // clients would otherwise keep up to 64 KiB each); a malloc per burst is cheap next
        // to its sendto.
        if batch.capacity() > IDLE_BUFFER {
            batch = BytesMut::new();
        }
    }
    w.flush().await?;
    w.shutdown().await
}

async fn put<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &mut BytesMut,
    mut p: Pdu,
    digests: Digests,
    seq: &SeqState,
    stat_sn: &mut u32,
) -> std::io::Result<()> {
    let exp = seq.exp_cmd_sn.load(Ordering::Acquire);
    let max = seq.max_cmd_sn.load(Ordering::Acquire);
    stamp(&mut p.bhs, stat_sn, exp, max);
    let header = pdu::encode_header(&p.bhs, p.data.len() as u32, digests);
    let trailer = pdu::trailer(&p.data, digests);
    batch.extend_from_slice(&header);
    if p.data.len() <= COPY_LIMIT {
        batch.extend_from_slice(&p.data);
        batch.extend_from_slice(&trailer);
        return Ok(());
    }
    let batched = std::mem::take(batch);
    write_all_vectored(w, &[&batched, &p.data, &trailer]).await?;
    *batch = batched;
    batch.clear();
    Ok(())
}

/// The socket a writer writes to, for sending from files with `sendfile(2)`.
pub trait Sink: AsyncWrite + Unpin {
    /// The TCP socket under this writer, if there is one (else file data is read and copied).
    fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        None
    }
}

impl Sink for tokio::net::tcp::OwnedWriteHalf {
    fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        Some(self.as_ref())
    }
}

impl Sink for tokio::io::DuplexStream {}

/// A PDU whose data segment lies in `file`: the header goes out with whatever is batched,
/// then the data straight from the page cache. No data digest (the transport only asks for
/// file slices without one; should one be on anyway, the data is read and copied).
async fn put_file<W: Sink>(
    w: &mut W,
    batch: &mut BytesMut,
    mut p: Pdu,
    file: &FileSlice,
    digests: Digests,
    seq: &SeqState,
    stat_sn: &mut u32,
) -> std::io::Result<()> {
    if w.tcp().is_none() || digests.data {
        // Only writers without a socket (tests over an in-memory pipe) get here; the range
        // was cached when the command ran.
        p.data = Bytes::from(file.read()?);
        return put(w, batch, p, digests, seq, stat_sn).await;
    }
    let exp = seq.exp_cmd_sn.load(Ordering::Acquire);
    let max = seq.max_cmd_sn.load(Ordering::Acquire);
    stamp(&mut p.bhs, stat_sn, exp, max);
    let header = pdu::encode_header(&p.bhs, file.len as u32, digests);
    batch.extend_from_slice(&header);
    w.write_all(batch).await?;
    batch.clear();
    if let Some(tcp) = w.tcp() {
        send_file(tcp, file).await?;
    }
    // The data segment is padded to a multiple of 4 bytes (RFC 7143 §11.1).
    let pad = (4 - file.len % 4) % 4;
    if pad > 0 {
        batch.extend_from_slice(&[0u8; 3][..pad]);
    }
    Ok(())
}

/// Send all of `file` to the socket with `sendfile(2)`: the page-cache pages go into the
/// socket's buffers without a copy through user memory. The range was in the page cache
/// when the command ran (`storage::FileStore::file_slice`); a page evicted since is read
/// from the disk here, on the event loop: rare, and bounded by one PDU.
async fn send_file(tcp: &tokio::net::TcpStream, file: &FileSlice) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut off = libc::off_t::try_from(file.offset)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut left = file.len;
    while left > 0 {
        tcp.writable().await?;
        let r = tcp.try_io(tokio::io::Interest::WRITABLE, || {
            // SAFETY: sendfile between two fds we hold open; it writes only `off`, a live
            // local.
            let n =
                unsafe { libc::sendfile(tcp.as_raw_fd(), file.file.as_raw_fd(), &mut off, left) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match r {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => left -= n.min(left),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `write_all` for several buffers: vectored writes until every byte is out.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    bufs: &[&[u8]],
) -> std::io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < bufs.len() {
        let slices: Vec<IoSlice<'_>> = bufs[idx..]
            .iter()
            .enumerate()
            .map(|(i, b)| IoSlice::new(if i == 0 { &b[off..] } else { b }))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while idx < bufs.len() && n > 0 {
            let left = bufs[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
        while idx < bufs.len() && bufs[idx].len() == off {
            idx += 1;
            off = 0;
        }
    }
    Ok(())
}

/// Encode one PDU into a fresh buffer (login phase, tests).
pub fn encode_one(p: &Pdu, digests: Digests) -> Bytes {
    let mut out = BytesMut::new();
    pdu::encode(p, digests, &mut out);
    out.freeze()
}
