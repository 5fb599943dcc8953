//! One iSCSI connection: the login phase, then the full-feature phase (RFC 7143 §3.2, §4).
//! MaxConnections is negotiated down to 1, so a connection and its session live and die
//! together (ERL 0: no connection recovery, §7.1.5).

use super::cmdsn::{sn_lt, Admit, CmdWindow};
use super::io::{self, FrameReader, Out, ReadError, SeqState};
use super::table::{AbortRequest, SessionHandle};
use super::task::{Completion, DataOutError, Residual, WriteCollector, NO_TTT};
use super::Server;
use crate::boot::lifecycle::End as ClientEnd;
use crate::boot::{AttachError, Client};
use crate::login::{
    status, Directory, LoginMachine, LoginOutcome, SessionParams, SessionType, TextMachine,
    TextOutcome,
};
use crate::metrics::{DropReason, IoRecorder};
use crate::pdu::{
    self, reject_reason, AsyncMessage, Bhs, DataOut, Digests, LoginResponse, LogoutRequest,
    LogoutResponse, NopIn, NopOut, Pdu, Reject, ScsiCommand, TaskMgmtRequest, TaskMgmtResponse,
    TextRequest, BHS_LEN,
};
use crate::scsi::{self, LunTable, Nexus, ResetKind, ScsiResult, Transfer};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument};

/// During login the default MaxRecvDataSegmentLength (8192) applies (§13.12).
const LOGIN_MAX_DATA: u32 = 8192;
/// How long a Logout or shutdown waits for commands still running.
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// How long a closing connection lets its writer deliver what is queued.
const WRITER_GRACE: Duration = Duration::from_secs(1);
/// How long an initiator asked to log out (reload fencing) has before the target closes it.
const LOGOUT_GRACE: Duration = Duration::from_secs(3);

pub(super) async fn run(server: Arc<Server>, stream: TcpStream, peer: SocketAddr) {
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    // Small PDUs (responses, R2Ts) must not wait for Nagle (latency at QD1).
    let _ = stream.set_nodelay(true);
    let span = info_span!("conn", %peer);
    async move {
        match login(&server, stream, local, peer).await {
            Ok(Some(ready)) => full_feature(server, ready).await,
            Ok(None) => {}
            Err(e) => debug!(error = %e, "connection ended during login"),
        }
    }
    .instrument(span)
    .await
}

/// Everything a successful login hands to the full-feature phase.
struct Ready {
    stream: TcpStream,
    reader: FrameReader,
    params: SessionParams,
    handle: Arc<SessionHandle>,
    /// The client disk of a boot target's session.
    client: Option<(Arc<Client>, u64)>,
    luns: Option<Arc<LunTable>>,
    nexus: Nexus,
    window: CmdWindow,
    stat_sn: u32,
    cid: u16,
    local: SocketAddr,
    /// The session's counting hook (crate::metrics).
    io: IoRecorder,
}

/// Writes are bounded by the login deadline too: a peer that does not read its Login
/// Responses must not keep the login (and its socket) past the login timeout.
async fn send_login(
    stream: &mut TcpStream,
    mut pdu: Pdu,
    stat_sn: &mut u32,
    window: &CmdWindow,
    deadline: Instant,
) -> std::io::Result<()> {
    io::stamp(
        &mut pdu.bhs,
        stat_sn,
        window.exp_cmd_sn(),
        window.max_cmd_sn(),
    );
    let bytes = io::encode_one(&pdu, Digests::default());
    match tokio::time::timeout_at(deadline, stream.write_all(&bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "login timed out while writing",
        )),
    }
}

fn login_failure(itt: u32, isid: [u8; 6], (class, detail): (u8, u8)) -> Pdu {
    Pdu {
        bhs: Bhs::LoginResponse(LoginResponse {
            itt,
            isid,
            status_class: class,
            status_detail: detail,
            ..Default::default()
        }),
        data: Bytes::new(),
    }
}

/// The login phase (§6). Returns None when the login failed and the connection is closed.
async fn login(
    server: &Arc<Server>,
    mut stream: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
) -> std::io::Result<Option<Ready>> {
    let settings = server.settings();
    let registry = server.registry();
    let directory: Arc<dyn Directory> = registry.clone();
    let mut machine = LoginMachine::new(directory, settings.params.clone(), local);
    let mut reader = FrameReader::default();
    let mut stat_sn: u32 = rand::random::<u16>() as u32;
    let mut window = CmdWindow::new(0, settings.cmd_window);
    let deadline = Instant::now() + settings.login_timeout;
    let mut first = true;
    let mut who = super::LoginNames::default();
    let mut discovery = false;
    // Whether the cluster has placed this login (docs/scale-out.md); once per connection.
    let mut placed = server.cluster().is_none();
    loop {
        let pdu = match tokio::time::timeout_at(
            deadline,
            reader.next(&mut stream, Digests::default(), LOGIN_MAX_DATA),
        )
        .await
        {
            Err(_) => {
                info!("login timed out");
                return Ok(None);
            }
            Ok(Err(ReadError::Eof)) => return Ok(None),
            Ok(Err(ReadError::Io(e))) => return Err(e),
            Ok(Err(ReadError::Pdu { error, .. })) => {
                // §6.? a malformed login PDU ends the login with an initiator error.
                info!(%error, "bad PDU during login");
                let itt = error
                    .bhs()
                    .map(|b| u32::from_be_bytes([b[16], b[17], b[18], b[19]]))
                    .unwrap_or(0);
                send_login(
                    &mut stream,
                    login_failure(itt, [0; 6], status::INITIATOR_ERROR),
                    &mut stat_sn,
                    &window,
                    deadline,
                )
                .await?;
                return Ok(None);
            }
            Ok(Ok(p)) => p,
        };
        let Bhs::LoginRequest(req) = &pdu.bhs else {
            // Anything but a Login Request before login completes (§6.1): refuse and close.
            info!(opcode = ?pdu.bhs.opcode(), "non-login PDU during login");
            send_login(
                &mut stream,
                login_failure(0, [0; 6], status::INVALID_DURING_LOGIN),
                &mut stat_sn,
                &window,
                deadline,
            )
            .await?;
            return Ok(None);
        };
        if first {
            // §11.12.8: the Login Request's CmdSN is the session's first CmdSN.
            window = CmdWindow::new(req.cmd_sn, settings.cmd_window);
            first = false;
        }
        // Names for the failure log (the machine validates them; this only reads).
        for kv in pdu.data.split(|&b| b == 0) {
            if let Some(v) = kv.strip_prefix(b"InitiatorName=") {
                who.initiator = String::from_utf8_lossy(&v[..v.len().min(256)]).into_owned();
            } else if let Some(v) = kv.strip_prefix(b"TargetName=") {
                who.target = String::from_utf8_lossy(&v[..v.len().min(256)]).into_owned();
            } else if kv == b"SessionType=Discovery" {
                discovery = true;
            }
        }
        // In a cluster, a Normal session is placed as soon as its initiator is known: served
        // here, redirected to the client's node (status 0x0101, §11.13.5), or refused when
        // it cannot be placed safely (0x0301, service unavailable: try again later).
        // Only an initiator the target admits is placed (so no ownership key is ever
        // created for a name that could not log in); the machine refuses the others.
        if !placed && !req.cont && !who.initiator.is_empty() {
            placed = true;
            let admitted = !discovery
                && matches!(
                    registry.lookup(&who.initiator, &who.target),
                    crate::login::TargetLookup::Allowed(_)
                );
            if let (Some(cluster), true) = (server.cluster(), admitted) {
                match cluster
                    .admit(&who.initiator, crate::cluster::Why::Login)
                    .await
                {
                    crate::cluster::Admission::Serve => {}
                    crate::cluster::Admission::Redirect(to) => {
                        info!(initiator = %who.initiator, %to, "login redirected to the client's node");
                        server.metrics().login_failed(
                            peer,
                            &who.initiator,
                            &who.target,
                            status::TARGET_MOVED_TEMP,
                        );
                        let resp = crate::login::redirect_response(req, to);
                        send_login(&mut stream, resp, &mut stat_sn, &window, deadline).await?;
                        return Ok(None);
                    }
                    crate::cluster::Admission::Refuse(reason) => {
                        warn!(initiator = %who.initiator, %reason, "login refused: cannot place the client");
                        server
                            .login_failed(peer, &who, status::SERVICE_UNAVAILABLE)
                            .await;
                        send_login(
                            &mut stream,
                            login_failure(req.itt, req.isid, status::SERVICE_UNAVAILABLE),
                            &mut stat_sn,
                            &window,
                            deadline,
                        )
                        .await?;
                        return Ok(None);
                    }
                }
            }
        }
        match machine.step(req, &pdu.data) {
            LoginOutcome::Continue(resp) => {
                send_login(&mut stream, resp, &mut stat_sn, &window, deadline).await?
            }
            LoginOutcome::Failed(resp) => {
                if let Bhs::LoginResponse(r) = &resp.bhs {
                    server
                        .login_failed(peer, &who, (r.status_class, r.status_detail))
                        .await;
                }
                send_login(&mut stream, resp, &mut stat_sn, &window, deadline).await?;
                return Ok(None);
            }
            LoginOutcome::Complete(done) => {
                let done = *done;
                let itt = req.itt;
                let fail = |st| login_failure(itt, done.isid, st);
                let params = done.params;
                // Source address binding (docs/security.md): authenticated, but not from here.
                if !registry.source_allowed(&params.initiator_name, &params.target_name, peer.ip())
                {
                    server
                        .login_failed(peer, &who, status::AUTHORIZATION_FAILURE)
                        .await;
                    send_login(
                        &mut stream,
                        fail(status::AUTHORIZATION_FAILURE),
                        &mut stat_sn,
                        &window,
                        deadline,
                    )
                    .await?;
                    return Ok(None);
                }
                if done.tsih != 0 {
                    // Adding a connection to a session: we negotiate MaxConnections=1 (§13.2).
                    let st = if server.sessions().get(done.tsih).is_some() {
                        status::TOO_MANY_CONNECTIONS
                    } else {
                        status::SESSION_DOES_NOT_EXIST
                    };
                    server
                        .metrics()
                        .login_failed(peer, &who.initiator, &who.target, st);
                    send_login(&mut stream, fail(st), &mut stat_sn, &window, deadline).await?;
                    return Ok(None);
                }
                // Session reinstatement (§6.3.5): same InitiatorName + ISID with TSIH 0 closes
                // the old session first. A different ISID is a separate session and stays
                // (the BIOS hand-off: the firmware's session is orphaned beside the OS's).
                if let Some(old) =
                    server
                        .sessions()
                        .find(&params.initiator_name, &done.isid, &params.target_name)
                {
                    info!(tsih = old.tsih, "reinstating session: closing the old one");
                    old.close(Duration::from_secs(5)).await;
                    server.sessions().remove(old.tsih);
                }
                // For the event feed: the client's lifecycle before this login (its phase after
                // the login then names the event: a new boot, a hand-off, ...).
                let before = registry
                    .boot_target(&params.target_name)
                    .and_then(|b| b.client(&params.initiator_name))
                    .map(|c| c.info());
                let mut client = None;
                let luns = match params.session_type {
                    SessionType::Discovery => None,
                    SessionType::Normal => match registry.boot_target(&params.target_name) {
                        Some(boot) => match server
                            .attach_client(
                                &boot,
                                &params.initiator_name,
                                &done.isid,
                                peer.ip(),
                                &done.keys.names,
                            )
                            .await
                        {
                            Ok((c, session)) => {
                                let l = c.luns();
                                // A client disk is reached through every portal group like a
                                // plain LUN: REPORT TARGET PORT GROUPS lists them all, so the
                                // relative port of VPD 0x83 is among them whichever portal
                                // the firmware's or the OS's session came through.
                                let groups =
                                    u16::try_from(registry.portals().len()).unwrap_or(u16::MAX);
                                for lu in l.luns.values() {
                                    lu.set_port_groups(groups);
                                }
                                client = Some((c, session));
                                Some(l)
                            }
                            Err(e) => {
                                warn!(error = %e, "no disk for this client");
                                let st = match e {
                                    AttachError::NoBinding(_) => status::AUTHORIZATION_FAILURE,
                                    AttachError::DirectBusy { .. } => status::SERVICE_UNAVAILABLE,
                                    AttachError::Storage(_) => status::TARGET_ERROR,
                                    // A shared disk another node holds (not fenced: this
                                    // node could not confirm it owns the client) or Ceph
                                    // unreachable: 0x0301, the initiator may retry.
                                    AttachError::Unavailable(_) => status::SERVICE_UNAVAILABLE,
                                };
                                server.metrics().login_failed(
                                    peer,
                                    &who.initiator,
                                    &who.target,
                                    st,
                                );
                                send_login(&mut stream, fail(st), &mut stat_sn, &window, deadline)
                                    .await?;
                                return Ok(None);
                            }
                        },
                        None => match registry.luns(&params.target_name) {
                            Some(l) => Some(l),
                            None => {
                                server.metrics().login_failed(
                                    peer,
                                    &who.initiator,
                                    &who.target,
                                    status::NOT_FOUND,
                                );
                                send_login(
                                    &mut stream,
                                    fail(status::NOT_FOUND),
                                    &mut stat_sn,
                                    &window,
                                    deadline,
                                )
                                .await?;
                                return Ok(None);
                            }
                        },
                    },
                };
                if server.sessions().len() >= settings.max_sessions {
                    warn!(max = settings.max_sessions, "session limit reached");
                    if let Some((c, s)) = &client {
                        super::ended_blocking(c, *s, ClientEnd::Dropped).await;
                    }
                    server.metrics().login_failed(
                        peer,
                        &who.initiator,
                        &who.target,
                        status::OUT_OF_RESOURCES,
                    );
                    send_login(
                        &mut stream,
                        fail(status::OUT_OF_RESOURCES),
                        &mut stat_sn,
                        &window,
                        deadline,
                    )
                    .await?;
                    return Ok(None);
                }
                let (handle, twins) = server.sessions().insert(
                    &params.initiator_name,
                    done.isid,
                    &params.target_name,
                );
                // A login that raced past the reinstatement check above: the newest session
                // wins, and, as in reinstatement, its older twins are closed before it is
                // established (§6.3.5).
                for twin in twins {
                    info!(
                        tsih = twin.tsih,
                        "racing login with one ISID: closing the older twin"
                    );
                    twin.close(Duration::from_secs(5)).await;
                }
                let mut response = done.response;
                if let Bhs::LoginResponse(r) = &mut response.bhs {
                    r.tsih = handle.tsih;
                }
                if let Err(e) =
                    send_login(&mut stream, response, &mut stat_sn, &window, deadline).await
                {
                    // The session never started: it must not stay in the table, and a login
                    // waiting for it to close (a racing twin) need not wait any longer.
                    server.sessions().remove(handle.tsih);
                    handle.closed.send_replace(true);
                    if let Some((c, s)) = &client {
                        super::ended_blocking(c, *s, ClientEnd::Dropped).await;
                    }
                    return Err(e);
                }
                // What the operator's event feed calls this login (docs/operations.md).
                let kind = match &client {
                    Some((c, _)) => {
                        use crate::boot::lifecycle::Phase;
                        let now = c.info();
                        let (was, boots) = before
                            .as_ref()
                            .map_or((Phase::Off, 0), |i| (i.phase, i.boots));
                        match now.phase {
                            Phase::Firmware if now.boots > boots => "boot",
                            Phase::Firmware => "firmware_login",
                            Phase::Os if was == Phase::Firmware => "handoff",
                            _ => "os_login",
                        }
                    }
                    None => "login",
                };
                let io = server.metrics().session_opened(
                    handle.tsih,
                    &params.initiator_name,
                    &params.target_name,
                    done.isid,
                    peer,
                    kind,
                );
                let nexus = Nexus {
                    id: handle.nexus_id,
                    initiator_port: format!("{},i,0x{}", params.initiator_name, hex(&done.isid)),
                    initiator_name: params.initiator_name.clone(),
                    // Each portal group is its own relative target port (MPIO, SPC-4 §7.8.6.4).
                    relative_port: server.registry().tpgt_of(local),
                    target_port: format!(
                        "{},t,0x{:04x}",
                        params.target_name,
                        server.registry().tpgt_of(local)
                    ),
                };
                return Ok(Some(Ready {
                    stream,
                    reader,
                    params,
                    handle,
                    client,
                    luns,
                    nexus,
                    window,
                    stat_sn,
                    cid: done.cid,
                    local,
                    io,
                }));
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A command whose Data-Out is still arriving.
struct PendingWrite {
    cmd: ScsiCommand,
    /// The CDB's transfer length in bytes.
    transfer: u32,
    collector: WriteCollector,
}

/// Largest read served on the event loop (bigger ones copy long enough to deserve a thread).
const INLINE_READ_MAX: u32 = 256 * 1024;

/// Commands that are idempotent reads or touch no storage, cheap enough to run inline.
fn runs_inline(cdb: &[u8], edtl: u32, file_slices: bool) -> bool {
    match cdb.first() {
        // READ(6/10/12/16); any size when its data may go by sendfile (then the command
        // itself only checks that the range is cached: no copy on the event loop).
        Some(0x08 | 0x28 | 0xa8 | 0x88) => file_slices || edtl <= INLINE_READ_MAX,
        // TEST UNIT READY, REQUEST SENSE, INQUIRY, MODE SENSE(6/10), READ CAPACITY(10),
        // READ CAPACITY(16) / SERVICE ACTION IN(16), REPORT LUNS, REPORT SUPPORTED OPCODES
        Some(0x00 | 0x03 | 0x12 | 0x1a | 0x5a | 0x25 | 0xa0 | 0xa3) => true,
        Some(0x9e) => cdb.get(1).is_some_and(|sa| sa & 0x1f == 0x10),
        _ => false,
    }
}

/// A command running on the blocking pool.
struct Running {
    lun: u64,
    aborted: bool,
    /// Operation code and delivery time, for the metrics.
    op: u8,
    start: Instant,
    /// Bytes it may hold in memory (its EDTL, bounded): counted against the connection's
    /// `max_buffered_bytes`.
    bytes: usize,
}

/// Messages the writer queue holds; reading stops once more than [`QUEUE_LIMIT`] wait, so
/// that the responses of commands already running still fit and a send never blocks the
/// loop (which must keep seeing reinstatement, NOP timeouts and shutdown).
const QUEUE_CAPACITY: usize = 256;
const QUEUE_LIMIT: usize = 64;

/// What a blocking SCSI execution sends back.
struct Done {
    itt: u32,
    lun: u64,
    result: ScsiResult,
    /// The initiator's expected data transfer length.
    edtl: u32,
    /// Bytes the command wanted to move (writes), for the residual.
    write_len: Option<u32>,
    r2t_count: u32,
}

/// A task management function waiting for aborted commands to finish (§4.2.3.? SAM-5 §7:
/// the response follows the termination of every affected task).
struct PendingTmf {
    req: TaskMgmtRequest,
    waiting: HashSet<u32>,
    response: u8,
    reset: Option<(Option<u64>, ResetKind)>,
}

/// Tasks aborted for another nexus's PREEMPT AND ABORT that are still on the blocking pool;
/// the requester hears once they have all ended.
struct PendingAbort {
    waiting: HashSet<u32>,
    done: oneshot::Sender<bool>,
}

/// How long a PREEMPT AND ABORT waits for the preempted sessions' tasks to end.
const PREEMPT_ABORT_WAIT: Duration = Duration::from_secs(10);

struct Conn {
    server: Arc<Server>,
    params: SessionParams,
    luns: Option<Arc<LunTable>>,
    nexus: Nexus,
    window: CmdWindow,
    seq: Arc<SeqState>,
    tx: mpsc::Sender<Out>,
    done_tx: mpsc::UnboundedSender<Done>,
    held: HashMap<u32, Pdu>,
    writes: HashMap<u32, PendingWrite>,
    running: HashMap<u32, Running>,
    absorbing: HashSet<u32>,
    tmfs: Vec<PendingTmf>,
    aborts: Vec<PendingAbort>,
    next_ttt: u32,
    text: TextMachine,
    cid: u16,
    ping_outstanding: Option<(u32, Instant)>,
    logout: Option<LogoutRequest>,
    closing: bool,
    cold_reset: bool,
    /// settings.max_buffered_bytes.
    max_buffered: usize,
    io: IoRecorder,
    /// Plain writes received in this event-loop turn, not yet handed to the blocking pool:
    /// they go there as one job when the loop finds nothing else ready (see [`Conn::flush_batch`]).
    batch: Vec<Batched>,
    batch_bytes: usize,
    /// Batches handed over and not yet run, and whether a pool job is running them.
    write_queue: Arc<WriteQueue>,
}

/// The plain writes of one connection on their way to storage: at most one blocking-pool job
/// per connection runs them, in arrival order, and keeps taking what arrives while it runs.
///
/// Buffered writes into one file are serialised by the kernel anyway (the inode lock,
/// `i_rwsem`, taken exclusive by `ext4_buffered_write_iter`): a job per batch only added pool
/// threads that slept on that lock and on the pool's condvar (perf: `futex` and
/// `rwsem_down_write_slowpath` 6.8 % of the server's samples at QD32; 32 pool threads).
#[derive(Default)]
struct WriteQueue {
    state: std::sync::Mutex<WriteQueueState>,
}

#[derive(Default)]
struct WriteQueueState {
    pending: std::collections::VecDeque<Batched>,
    /// A pool job is running (or about to run) the queue.
    active: bool,
}

/// Clears [`WriteQueueState::active`] when the job running the queue unwinds.
struct ActiveGuard<'a>(&'a WriteQueue);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.lock().active = false;
        }
    }
}

impl WriteQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, WriteQueueState> {
        // The lock is never held across storage I/O or user code; a panic while holding it
        // leaves a consistent deque.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `batch`; true if the caller must start the job that runs the queue.
    fn push(&self, batch: Vec<Batched>) -> bool {
        let mut st = self.lock();
        st.pending.extend(batch);
        !std::mem::replace(&mut st.active, true)
    }

    /// Everything queued so far, or None (and the job ends) once the queue is empty.
    fn take(&self) -> Option<std::collections::VecDeque<Batched>> {
        let mut st = self.lock();
        if st.pending.is_empty() {
            st.active = false;
            return None;
        }
        Some(std::mem::take(&mut st.pending))
    }
}

/// A write waiting in [`Conn::batch`]: what [`Conn::execute`] would have run on the pool.
struct Batched {
    itt: u32,
    lun: u64,
    cdb: Vec<u8>,
    data: Bytes,
    edtl: u32,
    write_len: Option<u32>,
    r2t_count: u32,
}

/// A batch goes to the blocking pool at once when it holds this many writes or bytes, so that a
/// stream of large writes does not sit behind the reader.
const BATCH_MAX_WRITES: usize = 32;
const BATCH_MAX_BYTES: usize = 1 << 20;

/// Why the full-feature loop ended.
enum End {
    Closed(DropReason),
    Logout,
    Error(DropReason, String),
}

async fn full_feature(server: Arc<Server>, ready: Ready) {
    let Ready {
        stream,
        mut reader,
        params,
        handle,
        client,
        luns,
        nexus,
        window,
        stat_sn,
        cid,
        local,
        io,
    } = ready;
    let span = info_span!(
        "session",
        initiator = %params.initiator_name,
        target = %params.target_name,
        tsih = handle.tsih
    );
    async move {
        info!(
            kind = ?params.session_type,
            header_digest = params.header_digest,
            data_digest = params.data_digest,
            "logged in"
        );
        let digests = Digests { header: params.header_digest, data: params.data_digest };
        let max_data = params.target_max_recv_data_segment_length;
        let (mut rd, wr) = stream.into_split();
        let seq = Arc::new(SeqState::default());
        seq.set(window.exp_cmd_sn(), window.max_cmd_sn());
        let (tx, rx) = mpsc::channel::<Out>(QUEUE_CAPACITY);
        let writer = tokio::spawn(io::writer(wr, rx, digests, seq.clone(), stat_sn));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let directory: Arc<dyn Directory> = server.registry();
        let mut conn = Conn {
            server: server.clone(),
            params,
            luns,
            nexus,
            window,
            seq,
            tx,
            done_tx,
            held: HashMap::new(),
            writes: HashMap::new(),
            running: HashMap::new(),
            absorbing: HashSet::new(),
            tmfs: Vec::new(),
            aborts: Vec::new(),
            next_ttt: 1,
            text: TextMachine::new(directory, local),
            cid,
            ping_outstanding: None,
            logout: None,
            closing: false,
            cold_reset: false,
            max_buffered: server.settings().max_buffered_bytes.max(1 << 20),
            io,
            batch: Vec::new(),
            batch_bytes: 0,
            write_queue: Arc::default(),
        };
        let settings = server.settings().clone();
        let tick_every = [settings.nop_in_interval, settings.idle_timeout.map(|d| d / 4)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(Duration::from_secs(3600))
            .min(Duration::from_secs(3600));
        let mut tick = tokio::time::interval_at(Instant::now() + tick_every, tick_every.max(Duration::from_millis(100)));
        let mut last_rx = Instant::now();
        let mut shutdown = server.shutdown_signal();
        let mut shutdown_deadline: Option<Instant> = None;
        let end = loop {
            if conn.closing && conn.running.is_empty() {
                break if conn.logout.is_some() { End::Logout } else { End::Closed(DropReason::ServerClosed) };
            }
            let deadline = shutdown_deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(86400));
            let congested = conn.congested();
            let seq = conn.seq.clone();
            tokio::select! {
                biased;
                _ = handle.kill.notified() => break End::Closed(DropReason::ServerClosed),
                // Before reading: a command the preempted initiator sends after the PREEMPT
                // AND ABORT completed must find its queued tasks gone.
                _ = handle.abort.notified() => {
                    for req in handle.take_aborts() {
                        conn.abort_for_preempt(req);
                    }
                }
                Some(done) = done_rx.recv() => {
                    if let Err(e) = conn.on_done(done).await { break End::Error(DropReason::IoError, e); }
                }
                // Backpressure: the writer made room; look again.
                _ = seq.drained.notified(), if congested && !conn.closing => {}
                r = reader.next(&mut rd, digests, max_data), if !conn.closing && !congested => {
                    match r {
                        Ok(pdu) => {
                            last_rx = Instant::now();
                            handle.touch();
                            if let Err(e) = conn.on_pdu(pdu).await { break End::Error(DropReason::IoError, e); }
                        }
                        Err(ReadError::Eof) => break End::Closed(DropReason::PeerClosed),
                        Err(ReadError::Io(e)) => break End::Error(DropReason::IoError, e.to_string()),
                        Err(ReadError::Pdu { error, skipped }) => {
                            info!(%error, "bad PDU");
                            let reason = match &error {
                                pdu::PduError::DataDigest { .. } => reject_reason::DATA_DIGEST_ERROR,
                                pdu::PduError::UnknownOpcode { .. } => reject_reason::COMMAND_NOT_SUPPORTED,
                                _ => reject_reason::PROTOCOL_ERROR,
                            };
                            if let Some(bhs) = error.bhs() {
                                let _ = conn.reject_raw(reason, bhs).await;
                            }
                            // A header digest error or an oversized segment leaves the stream
                            // unframed: with ERL 0 the connection must go (§7.8, §7.1.4).
                            if !skipped {
                                let _ = conn.flush().await;
                                break End::Error(DropReason::ProtocolError, error.to_string());
                            }
                        }
                    }
                }
                changed = shutdown.changed(), if shutdown_deadline.is_none() => {
                    if changed.is_err() || *shutdown.borrow() {
                        // §11.9.1 AsyncEvent 1: the target requests a logout.
                        let _ = conn.send(Pdu { bhs: Bhs::AsyncMessage(AsyncMessage { lun: 0, async_event: 1, parameter3: 1, ..Default::default() }), data: Bytes::new() }).await;
                        shutdown_deadline = Some(Instant::now() + Duration::from_secs(3));
                    }
                }
                _ = handle.logout.notified(), if shutdown_deadline.is_none() => {
                    // §11.9.1 AsyncEvent 1, Parameter3: seconds the initiator has to log out.
                    let _ = conn.send(Pdu { bhs: Bhs::AsyncMessage(AsyncMessage { lun: 0, async_event: 1, parameter3: LOGOUT_GRACE.as_secs() as u16, ..Default::default() }), data: Bytes::new() }).await;
                    shutdown_deadline = Some(Instant::now() + LOGOUT_GRACE);
                }
                _ = tokio::time::sleep_until(deadline), if shutdown_deadline.is_some() => break End::Closed(DropReason::ServerClosed),
                _ = tick.tick() => {
                    if let Some((why, e)) = conn.on_tick(&settings, last_rx).await { break End::Error(why, e); }
                }
                // Last in this biased select: nothing else is ready, the turn is over. The
                // writes it received go to the blocking pool together.
                _ = std::future::ready(()), if !conn.batch.is_empty() => conn.flush_batch(),
            }
        };
        // Writes never handed to the pool were never acknowledged: drop them.
        for b in std::mem::take(&mut conn.batch) {
            conn.running.remove(&b.itt);
        }
        match &end {
            End::Closed(_) => info!("connection closed"),
            End::Logout => info!("logged out"),
            End::Error(_, e) => info!(error = %e, "connection dropped"),
        }
        let how = match &end {
            End::Logout => Ok(()),
            End::Closed(why) | End::Error(why, _) => Err(*why),
        };
        if let Err(why) = how {
            server.metrics().connection_dropped(why);
        }
        server.metrics().session_closed(handle.tsih, how);
        // Wait (bounded) for commands still on the blocking pool, so nothing of this nexus
        // lands after it is declared lost.
        let drain_deadline = Instant::now() + DRAIN_WAIT;
        while !conn.running.is_empty() {
            match tokio::time::timeout_at(drain_deadline, done_rx.recv()).await {
                Ok(Some(d)) => {
                    conn.running.remove(&d.itt);
                }
                _ => break,
            }
        }
        if let Some(luns) = &conn.luns {
            luns.nexus_lost(&conn.nexus);
        }
        server.sessions().remove(handle.tsih);
        if let Some((c, s)) = &client {
            // A logout the server asked for at shutdown, or a connection it closed then,
            // is not the client's doing: it will log in again.
            let how = match &end {
                _ if server.is_stopping() => ClientEnd::ServerStop,
                End::Logout => ClientEnd::Logout,
                _ => ClientEnd::Dropped,
            };
            super::ended_blocking(c, *s, how).await;
        }
        let cold = conn.cold_reset;
        let target = conn.params.target_name.clone();
        drop(conn);
        // What the writer still holds is for a peer that is gone or does not read (session
        // reinstatement §6.3.5, NOP timeout, protocol error; a Logout Response was flushed
        // already). Waiting on it without bound would keep this task, its buffers and the
        // socket alive, and hold up a reinstating login.
        let mut writer = writer;
        if tokio::time::timeout(WRITER_GRACE, &mut writer).await.is_err() {
            writer.abort();
        }
        handle.closed.send_replace(true);
        if cold {
            // §11.5.1 TARGET COLD RESET: every session of the target goes.
            for s in server.sessions().all() {
                if s.target == target {
                    s.kill.notify_one();
                }
            }
        }
    }
    .instrument(span)
    .await
}

type R = Result<(), String>;

impl Conn {
    async fn send(&self, pdu: Pdu) -> R {
        self.queue(Out::Pdu(pdu)).await
    }

    async fn send_all(&self, pdus: Vec<Pdu>) -> R {
        self.queue(Out::Pdus(pdus)).await
    }

    async fn queue(&self, out: Out) -> R {
        self.seq
            .queued
            .fetch_add(out.payload_len(), std::sync::atomic::Ordering::AcqRel);
        self.tx
            .send(out)
            .await
            .map_err(|_| "writer gone".to_string())
    }

    /// Too much is buffered for this initiator (settings.max_buffered_bytes of queued
    /// responses and running commands' data, or a long writer queue): read no more PDUs until
    /// it drains. TCP flow control then holds the initiator back, so one that never reads its
    /// responses cannot make us buffer without bound (RFC 7143 §3.2.2.1 leaves flow control to
    /// the target; TCP carries it).
    fn congested(&self) -> bool {
        let queued = self.seq.queued.load(std::sync::atomic::Ordering::Acquire);
        let running: usize = self.running.values().map(|r| r.bytes).sum();
        queued.saturating_add(running) > self.max_buffered
            || self.tx.max_capacity() - self.tx.capacity() > QUEUE_LIMIT
    }

    async fn flush(&self) -> R {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Out::Flush(tx))
            .await
            .map_err(|_| "writer gone".to_string())?;
        rx.await.map_err(|_| "writer gone".to_string())
    }

    /// Commands delivered and not completed (they hold a slot of the CmdSN window).
    fn busy(&self) -> u32 {
        (self.running.len() + self.writes.len()) as u32
    }

    /// Before dispatching `pdu`: a SCSI command about to be delivered already takes its slot,
    /// so responses sent meanwhile do not advertise a slot it may keep.
    fn sync_window(&mut self, pdu: &Pdu) {
        let extra = u32::from(matches!(pdu.bhs, Bhs::ScsiCommand(_)));
        self.window.set_busy(self.busy() + extra);
        self.sync_seq();
    }

    fn sync_seq(&self) {
        self.seq
            .set(self.window.exp_cmd_sn(), self.window.max_cmd_sn());
    }

    /// Reject PDU (§11.17) carrying the offending header.
    async fn reject_raw(&self, reason: u8, bhs: &[u8; BHS_LEN]) -> R {
        self.io.reject(reason);
        self.send(Pdu {
            bhs: Bhs::Reject(Reject {
                reason,
                data_sn_or_r2t_sn: 0,
                ..Default::default()
            }),
            data: Bytes::copy_from_slice(bhs),
        })
        .await
    }

    /// §7.3: a rejected non-immediate command is not considered received (a CmdSN gap the
    /// initiator plugs by resending with the same CmdSN).
    fn retract(&mut self, cmd_sn: u32, immediate: bool) {
        if !immediate {
            self.window.retract(cmd_sn);
            self.sync_seq();
        }
    }

    async fn reject(&mut self, reason: u8, pdu: &Pdu) -> R {
        if let Some(sn) = pdu.bhs.cmd_sn() {
            self.retract(sn, pdu.bhs.immediate());
        }
        let header = pdu::encode_header(&pdu.bhs, pdu.data.len() as u32, Digests::default());
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&header[..BHS_LEN]);
        self.reject_raw(reason, &bhs).await
    }

    async fn on_pdu(&mut self, pdu: Pdu) -> R {
        let ordered = match &pdu.bhs {
            Bhs::ScsiCommand(c) => Some((c.cmd_sn, c.immediate)),
            Bhs::NopOut(n) => Some((n.cmd_sn, n.immediate)),
            Bhs::TaskMgmtRequest(t) => Some((t.cmd_sn, t.immediate)),
            Bhs::TextRequest(t) => Some((t.cmd_sn, t.immediate)),
            Bhs::LogoutRequest(l) => Some((l.cmd_sn, l.immediate)),
            _ => None,
        };
        let Some((cmd_sn, immediate)) = ordered else {
            return self.dispatch(pdu).await;
        };
        match self.window.admit(cmd_sn, immediate) {
            Admit::Ignore => {
                debug!(
                    cmd_sn,
                    exp = self.window.exp_cmd_sn(),
                    "CmdSN outside the window: ignored"
                );
                Ok(())
            }
            Admit::Hold => {
                self.held.insert(cmd_sn, pdu);
                Ok(())
            }
            Admit::Now => {
                if immediate
                    && matches!(pdu.bhs, Bhs::ScsiCommand(_))
                    && self.busy() >= self.window.window()
                {
                    // Immediate commands bypass the window; they may not overrun it
                    // (§11.17.1 reason 0x06: too many immediate commands).
                    return self
                        .reject(reject_reason::IMMEDIATE_COMMAND_REJECT, &pdu)
                        .await;
                }
                self.sync_window(&pdu);
                self.dispatch(pdu).await?;
                // Deliver commands that were waiting for this one (§3.2.2.1: in CmdSN order).
                while let Some(next) = self.held.remove(&self.window.exp_cmd_sn()) {
                    let _ = self.window.admit(self.window.exp_cmd_sn(), false);
                    self.sync_window(&next);
                    self.dispatch(next).await?;
                }
                self.window.set_busy(self.busy());
                self.sync_seq();
                Ok(())
            }
        }
    }

    async fn dispatch(&mut self, pdu: Pdu) -> R {
        let discovery = self.params.session_type == SessionType::Discovery;
        match &pdu.bhs {
            Bhs::NopOut(n) => {
                let n = n.clone();
                self.on_nop(n, pdu.data).await
            }
            Bhs::ScsiCommand(c) if !discovery => {
                let c = c.clone();
                self.on_command(c, pdu.data).await
            }
            Bhs::DataOut(d) if !discovery => {
                let d = d.clone();
                self.on_data_out(&pdu, d).await
            }
            Bhs::TaskMgmtRequest(t) if !discovery => {
                let t = t.clone();
                self.on_tmf(t).await
            }
            Bhs::TextRequest(t) => {
                let t = t.clone();
                self.on_text(&pdu, t).await
            }
            Bhs::LogoutRequest(l) => {
                let l = l.clone();
                self.on_logout(l).await
            }
            // SNACK needs ERL >= 1 (§7.1.4); we negotiate 0.
            Bhs::SnackRequest(_) => self.reject(reject_reason::SNACK_REJECT, &pdu).await,
            // A second login on a logged-in connection, target-only opcodes, or SCSI on a
            // discovery session (§6.2: discovery sessions carry Text and Logout only).
            _ => self.reject(reject_reason::PROTOCOL_ERROR, &pdu).await,
        }
    }

    async fn on_nop(&mut self, n: NopOut, data: Bytes) -> R {
        if n.itt == NO_TTT {
            // The answer to our ping (§11.18.3), or a one-way NOP-Out: no response.
            if let Some((ttt, _)) = self.ping_outstanding {
                if n.ttt == ttt {
                    self.ping_outstanding = None;
                }
            }
            return Ok(());
        }
        // §11.19: echo ITT and the ping data.
        self.send(Pdu {
            bhs: Bhs::NopIn(NopIn {
                lun: n.lun,
                itt: n.itt,
                ttt: NO_TTT,
                ..Default::default()
            }),
            data,
        })
        .await
    }

    async fn on_tick(
        &mut self,
        settings: &super::Settings,
        last_rx: Instant,
    ) -> Option<(DropReason, String)> {
        if let Some(idle) = settings.idle_timeout {
            if last_rx.elapsed() >= idle && self.running.is_empty() {
                return Some((DropReason::IdleTimeout, "idle timeout".into()));
            }
        }
        let interval = settings.nop_in_interval?;
        if let Some((_, sent)) = self.ping_outstanding {
            if let Some(timeout) = settings.nop_in_timeout {
                if sent.elapsed() >= timeout {
                    return Some((DropReason::NopTimeout, "NOP-In ping not answered".into()));
                }
            }
            return None;
        }
        if last_rx.elapsed() >= interval {
            let ttt = self.alloc_ttt();
            self.ping_outstanding = Some((ttt, Instant::now()));
            let ping = Pdu {
                bhs: Bhs::NopIn(NopIn {
                    lun: 0,
                    itt: NO_TTT,
                    ttt,
                    ..Default::default()
                }),
                data: Bytes::new(),
            };
            if self.send(ping).await.is_err() {
                return Some((DropReason::IoError, "writer gone".into()));
            }
        }
        None
    }

    fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == NO_TTT {
            self.next_ttt = 1;
        }
        t
    }

    async fn on_command(&mut self, c: ScsiCommand, data: Bytes) -> R {
        let Some(luns) = self.luns.clone() else {
            return Ok(());
        };
        if self.running.contains_key(&c.itt) || self.writes.contains_key(&c.itt) {
            // §11.3: ITTs are unique among outstanding tasks.
            let pdu = Pdu {
                bhs: Bhs::ScsiCommand(c),
                data,
            };
            return self.reject(reject_reason::INVALID_PDU_FIELD, &pdu).await;
        }
        // A new task may reuse the tag of one whose stray Data-Out we were discarding.
        self.absorbing.remove(&c.itt);
        if self.absorbing.len() > 1024 {
            self.absorbing.clear();
        }
        let edtl = c.expected_data_transfer_length;
        let transfer = match luns.transfer(c.lun, &c.cdb) {
            Ok(t) => t,
            Err(result) => {
                if c.write && (data.len() as u32) < edtl && !c.final_ {
                    self.absorbing.insert(c.itt);
                }
                return self.complete(c.itt, c.lun, result, edtl, None, 0).await;
            }
        };
        match transfer {
            // Data-Out with a CDB that takes none (or a length its field cannot express) is
            // still collected: the SCSI layer decides (e.g. COMPARE AND WRITE of 256 blocks).
            Transfer::Out(n) if n > 0 || (c.write && edtl > 0) => {
                if let Err(result) = luns.data_out_fits(c.lun, &c.cdb, edtl, n) {
                    if (data.len() as u32) < edtl && !c.final_ {
                        self.absorbing.insert(c.itt);
                    }
                    return self.complete(c.itt, c.lun, result, edtl, None, 0).await;
                }
                let n_use = if n == 0 { edtl } else { n };
                // A transfer length that disagrees with the EDTL is processed as FCP-4 §9.4.2
                // says (and libiscsi's residual tests expect): only min(EDTL, transfer) bytes
                // are used, GOOD status, and the residual reported.
                let collector = match WriteCollector::new(&self.params, edtl, n_use, &data) {
                    Ok(w) => w,
                    Err(e) => {
                        debug!(error = %e, "bad immediate data");
                        let pdu = Pdu {
                            bhs: Bhs::ScsiCommand(c),
                            data,
                        };
                        return self.reject(reject_reason::PROTOCOL_ERROR, &pdu).await;
                    }
                };
                let mut pw = PendingWrite {
                    cmd: c,
                    transfer: n,
                    collector,
                };
                if pw.collector.complete() {
                    return self
                        .execute(pw.cmd, pw.collector.into_data(), Some(n), 0)
                        .await;
                }
                let (itt, lun) = (pw.cmd.itt, pw.cmd.lun);
                let r2ts = self.solicit(&mut pw.collector, itt, lun);
                self.writes.insert(itt, pw);
                self.send_r2ts(r2ts).await
            }
            _ => {
                if !c.final_ {
                    // Unsolicited data for a command that takes none: swallow it.
                    self.absorbing.insert(c.itt);
                }
                self.execute(c, Bytes::new(), None, 0).await
            }
        }
    }

    async fn on_data_out(&mut self, pdu: &Pdu, d: DataOut) -> R {
        let Some(pw) = self.writes.get_mut(&d.itt) else {
            if self.absorbing.contains(&d.itt) {
                return Ok(());
            }
            // §11.7: a Data-Out for no task we know.
            return self.reject(reject_reason::INVALID_PDU_FIELD, pdu).await;
        };
        if let Err(e) = pw.collector.data_out(&self.params, &d, &pdu.data) {
            // A broken data sequence cannot be recovered at ERL 0 (§7.1.4, no SNACK). The
            // task ends with CHECK CONDITION, ABORTED COMMAND (SPC-4 Annex D: 4B/xx for data
            // phase errors) and the rest of its Data-Out is discarded; the session goes on.
            info!(itt = d.itt, error = %e, "Data-Out protocol error: task aborted");
            let ascq = match e {
                DataOutError::UnknownTtt(_) => 0x01,
                DataOutError::BeyondR2t | DataOutError::BeyondFirstBurst => 0x02,
                DataOutError::Offset { .. } => 0x05,
                _ => 0x00,
            };
            self.writes.remove(&d.itt);
            self.absorbing.insert(d.itt);
            let result = ScsiResult {
                status: scsi::status::CHECK_CONDITION,
                data_in: Bytes::new(),
                data_file: None,
                sense: Some(Bytes::copy_from_slice(&[
                    0x70, 0, 0x0b, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x4b, ascq, 0, 0, 0, 0,
                ])),
                abort_nexuses: Vec::new(),
            };
            return self.complete(d.itt, d.lun, result, 0, Some(0), 0).await;
        }
        if pw.collector.complete() {
            let Some(pw) = self.writes.remove(&d.itt) else {
                return Ok(());
            };
            let r2ts = pw.collector.r2t_count();
            let n = pw.transfer;
            return self
                .execute(pw.cmd, pw.collector.into_data(), Some(n), r2ts)
                .await;
        }
        // An R2T finished: solicit the next burst.
        let (itt, lun) = (pw.cmd.itt, pw.cmd.lun);
        let mut collector = std::mem::replace(&mut pw.collector, WriteCollector::placeholder());
        let r2ts = self.solicit(&mut collector, itt, lun);
        if let Some(pw) = self.writes.get_mut(&itt) {
            pw.collector = collector;
        }
        self.send_r2ts(r2ts).await
    }

    async fn send_r2ts(&self, r2ts: Vec<crate::pdu::R2t>) -> R {
        if r2ts.is_empty() {
            return Ok(());
        }
        self.send_all(
            r2ts.into_iter()
                .map(|r| Pdu::header_only(Bhs::R2t(r)))
                .collect(),
        )
        .await
    }

    /// R2Ts for the next bursts of a write (§11.8).
    fn solicit(
        &mut self,
        collector: &mut WriteCollector,
        itt: u32,
        lun: u64,
    ) -> Vec<crate::pdu::R2t> {
        let mut next = self.next_ttt;
        let r2ts = collector.next_r2ts(&self.params, itt, lun, || {
            let t = next;
            next = if next.wrapping_add(1) == NO_TTT {
                1
            } else {
                next.wrapping_add(1)
            };
            t
        });
        self.next_ttt = next;
        r2ts
    }

    /// Run the command on the blocking pool; the result comes back through `done_tx`.
    /// `write_len` is the CDB's Data-Out length for writes (for the residual).
    async fn execute(
        &mut self,
        c: ScsiCommand,
        data: Bytes,
        write_len: Option<u32>,
        r2t_count: u32,
    ) -> R {
        let Some(luns) = self.luns.clone() else {
            return Ok(());
        };
        let nexus = self.nexus.clone();
        let done = self.done_tx.clone();
        self.running.insert(
            c.itt,
            Running {
                lun: c.lun,
                aborted: false,
                op: c.cdb.first().copied().unwrap_or(0),
                start: Instant::now(),
                bytes: (c.expected_data_transfer_length as usize).min(self.max_buffered),
            },
        );
        let (itt, lun, edtl) = (c.itt, c.lun, c.expected_data_transfer_length);
        let cdb = c.cdb;
        // Without a data digest over it, a large read's data can go from the page cache to
        // the socket (sendfile) and never pass through our memory.
        let slices = !self.params.data_digest;
        if runs_inline(&cdb, edtl, slices) {
            // Hot reads and commands without I/O run right here: no thread hop, which is most
            // of a 4 KiB read's latency. A read that would wait for the disk falls through to
            // the blocking pool (storage::try_nonblocking).
            if let Some(result) = crate::storage::try_nonblocking(|| {
                crate::storage::with_file_slices(slices, || luns.execute(&nexus, lun, &cdb, &data))
            }) {
                return self
                    .on_done(Done {
                        itt,
                        lun,
                        result,
                        edtl,
                        write_len,
                        r2t_count,
                    })
                    .await;
            }
        }
        // Plain writes (no FUA) are batched; FUA writes keep a pool job each so that
        // concurrent ones share one group-committed flush instead of flushing one after
        // another in a batch.
        if crate::scsi::cdb::plain_write(&cdb) {
            self.batch_bytes += data.len();
            self.batch.push(Batched {
                itt,
                lun,
                cdb,
                data,
                edtl,
                write_len,
                r2t_count,
            });
            if self.batch.len() >= BATCH_MAX_WRITES || self.batch_bytes >= BATCH_MAX_BYTES {
                self.flush_batch();
            }
            return Ok(());
        }
        tokio::task::spawn_blocking(move || {
            let result =
                crate::storage::with_file_slices(slices, || luns.execute(&nexus, lun, &cdb, &data));
            let _ = done.send(Done {
                itt,
                lun,
                result,
                edtl,
                write_len,
                r2t_count,
            });
        });
        Ok(())
    }

    /// Hand the batched writes to the connection's [`WriteQueue`]: a thread hop only when no
    /// pool job is running it already. The writes run in arrival order (those to one LUN
    /// that the job finds queued together are written together) and are answered when
    /// written; durability is unchanged (none of them is FUA, and SYNCHRONIZE CACHE only
    /// covers writes already acknowledged).
    fn flush_batch(&mut self) {
        self.batch_bytes = 0;
        let batch = std::mem::take(&mut self.batch);
        if batch.is_empty() {
            return;
        }
        let Some(luns) = self.luns.clone() else {
            for b in batch {
                self.running.remove(&b.itt);
            }
            return;
        };
        if !self.write_queue.push(batch) {
            return;
        }
        let queue = self.write_queue.clone();
        let nexus = self.nexus.clone();
        let done = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            // Should a command panic, the next batch starts a job of its own.
            let _active = ActiveGuard(&queue);
            while let Some(batch) = queue.take() {
                let batch = Vec::from(batch);
                // Consecutive writes to one LUN go down together: an overlay writes the
                // first touches among them with one system call (Overlay::write_many).
                for run in batch.chunk_by(|a, b| a.lun == b.lun) {
                    let Some(first) = run.first() else { continue };
                    let cmds: Vec<(&[u8], &[u8])> =
                        run.iter().map(|b| (&b.cdb[..], &b.data[..])).collect();
                    let results = luns.execute_writes(&nexus, first.lun, &cmds);
                    for (b, result) in run.iter().zip(results) {
                        let _ = done.send(Done {
                            itt: b.itt,
                            lun: b.lun,
                            result,
                            edtl: b.edtl,
                            write_len: b.write_len,
                            r2t_count: b.r2t_count,
                        });
                    }
                }
            }
        });
    }

    async fn on_done(&mut self, d: Done) -> R {
        let run = self.running.remove(&d.itt);
        let aborted = run.as_ref().map(|r| r.aborted).unwrap_or(true);
        if let Some(r) = &run {
            let moved = match (d.result.status == scsi::status::GOOD, d.write_len) {
                (false, _) => 0,
                (true, Some(n)) => n.min(d.edtl),
                (true, None) => (d.result.data_len() as u32).min(d.edtl),
            };
            self.io
                .command_done(d.lun, r.op, u64::from(moved), r.start.elapsed());
        }
        self.window.set_busy(self.busy());
        self.sync_seq();
        let finished_tmfs = self.tmf_task_finished(d.itt);
        self.abort_task_finished(d.itt);
        let mut result = d.result;
        if !result.abort_nexuses.is_empty() {
            // The PREEMPT AND ABORT's status follows the end of the preempted tasks.
            let ids = std::mem::take(&mut result.abort_nexuses);
            self.abort_preempted(d.lun, &ids).await;
        }
        if !aborted {
            self.complete(d.itt, d.lun, result, d.edtl, d.write_len, d.r2t_count)
                .await?;
        }
        for t in finished_tmfs {
            self.finish_tmf(t).await?;
        }
        if let Some(l) = self.logout.clone() {
            if self.running.is_empty() && !self.closing {
                self.logout_respond(l).await?;
            }
        }
        Ok(())
    }

    /// Send the result of a command: Data-In and/or SCSI Response with residuals.
    async fn complete(
        &mut self,
        itt: u32,
        lun: u64,
        r: ScsiResult,
        edtl: u32,
        write_len: Option<u32>,
        r2t_count: u32,
    ) -> R {
        if r.status == scsi::status::CHECK_CONDITION {
            self.io.scsi_error(r.sense.as_deref());
        }
        // The task is over: its window slot opens in this very response.
        self.window.set_busy(self.busy());
        self.sync_seq();
        if let (None, Some(file)) = (write_len, &r.data_file) {
            // Sent from the page cache (sendfile): see storage::FileSlice.
            let send = file.len.min(edtl as usize);
            let file = file.slice(0, send);
            let pdus = Completion {
                itt,
                lun,
                status: r.status,
                sense: None,
                data: Bytes::new(),
                residual: Residual::of(r.data_len() as u32, edtl),
                r2t_count,
            }
            .into_file_pdus(
                &file,
                self.params.initiator_max_recv_data_segment_length,
                self.params.max_burst_length,
            );
            if !pdus.is_empty() {
                return self.queue(Out::File(pdus)).await;
            }
        }
        let (data, residual) = match write_len {
            Some(n) => (Bytes::new(), Residual::of(n, edtl)),
            None => {
                let produced = r.data_len() as u32;
                let send = produced.min(edtl) as usize;
                (r.data_in.slice(..send), Residual::of(produced, edtl))
            }
        };
        let mut pdus = Vec::with_capacity(
            1 + data.len() / self.params.initiator_max_recv_data_segment_length.max(512) as usize,
        );
        Completion {
            itt,
            lun,
            status: r.status,
            sense: r.sense.as_deref(),
            data,
            residual,
            r2t_count,
        }
        .into_pdus(
            self.params.initiator_max_recv_data_segment_length,
            self.params.max_burst_length,
            &mut pdus,
        );
        self.send_all(pdus).await
    }

    async fn on_text(&mut self, pdu: &Pdu, t: TextRequest) -> R {
        match self.text.step(&self.params, &t, &pdu.data) {
            TextOutcome::Respond(resp) => self.send(resp).await,
            TextOutcome::Renegotiated(resp, params) => {
                self.send(resp).await?;
                // Only declarative limits change in FFP; digests stay as they were.
                self.params.initiator_max_recv_data_segment_length =
                    params.initiator_max_recv_data_segment_length;
                Ok(())
            }
            TextOutcome::Reject(reason) => self.reject(reason, pdu).await,
        }
    }

    async fn on_logout(&mut self, l: LogoutRequest) -> R {
        // Pending writes die with the session (§11.14.1); running commands finish first.
        self.writes.clear();
        if self.running.is_empty() {
            self.logout_respond(l).await
        } else {
            self.logout = Some(l);
            Ok(())
        }
    }

    async fn logout_respond(&mut self, l: LogoutRequest) -> R {
        // §11.15.1: 0 closed; 1 CID not found; 2 recovery not supported (ERL 0).
        let response = match l.reason & 0x7f {
            0 => 0,
            1 if l.cid == self.cid => 0,
            1 => 1,
            _ => 2,
        };
        if response == 0 {
            // The I_T nexus ends with this logout (one connection per session): release its
            // RESERVE(6) and the like before the initiator hears so, or a command it sends
            // next on another session can still meet them (SPC-2 §5.5.1, SAM-5 §6.3.4).
            if let Some(luns) = &self.luns {
                luns.nexus_lost(&self.nexus);
            }
        }
        self.send(Pdu {
            bhs: Bhs::LogoutResponse(LogoutResponse {
                response,
                itt: l.itt,
                time2wait: 0,
                time2retain: 0,
                ..Default::default()
            }),
            data: Bytes::new(),
        })
        .await?;
        self.flush().await?;
        if response == 0 {
            self.logout = Some(l);
            self.closing = true;
        } else {
            self.logout = None;
        }
        Ok(())
    }

    async fn on_tmf(&mut self, t: TaskMgmtRequest) -> R {
        let function = t.function & 0x7f;
        let lun_exists = self
            .luns
            .as_ref()
            .map(|l| crate::pdu::lun_to_index(t.lun).is_some_and(|i| l.luns.contains_key(&i)))
            .unwrap_or(false);
        let mut pending = PendingTmf {
            req: t.clone(),
            waiting: HashSet::new(),
            response: 0,
            reset: None,
        };
        match function {
            // ABORT TASK (§11.5.1)
            1 => {
                let rtt = t.referenced_task_tag;
                if self.writes.remove(&rtt).is_some() {
                    pending.response = 0;
                } else if let Some(r) = self.running.get_mut(&rtt) {
                    r.aborted = true;
                    pending.waiting.insert(rtt);
                    if let Some(l) = &self.luns {
                        l.release_waiting(Some(r.lun));
                    }
                } else if let Some(sn) = self
                    .held
                    .iter()
                    .find(|(_, p)| p.bhs.itt() == rtt)
                    .map(|(sn, _)| *sn)
                {
                    // Received out of order and not yet delivered: it never runs, but its CmdSN
                    // still counts, so a no-op holds its place in the window.
                    self.held.insert(
                        sn,
                        Pdu::header_only(Bhs::NopOut(NopOut {
                            itt: NO_TTT,
                            ttt: NO_TTT,
                            ..Default::default()
                        })),
                    );
                    pending.response = 0;
                } else if sn_lt(t.ref_cmd_sn, self.window.exp_cmd_sn()) {
                    // Received and already completed (its response is out): nothing to abort.
                    pending.response = 1;
                } else {
                    // §11.5.1: a task not yet received whose RefCmdSN is in the window counts as
                    // received and aborted.
                    pending.response = 0;
                }
            }
            // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET
            2 | 4 | 5 => {
                if !lun_exists {
                    pending.response = 2;
                } else {
                    self.abort_where(|lun| lun == t.lun, &mut pending);
                    if let Some(l) = &self.luns {
                        l.release_waiting(Some(t.lun));
                    }
                    if function == 5 {
                        pending.reset = Some((Some(t.lun), ResetKind::LogicalUnit));
                    }
                }
            }
            // TARGET WARM RESET, TARGET COLD RESET
            6 | 7 => {
                self.abort_where(|_| true, &mut pending);
                if let Some(l) = &self.luns {
                    l.release_waiting(None);
                }
                let kind = if function == 6 {
                    ResetKind::TargetWarm
                } else {
                    ResetKind::TargetCold
                };
                pending.reset = Some((None, kind));
            }
            // TASK REASSIGN needs ERL 2.
            8 => pending.response = 4,
            // CLEAR ACA and anything else: not supported.
            _ => pending.response = 5,
        }
        if pending.waiting.is_empty() {
            self.finish_tmf(pending).await
        } else {
            self.tmfs.push(pending);
            Ok(())
        }
    }

    fn abort_where(&mut self, matches: impl Fn(u64) -> bool, pending: &mut PendingTmf) {
        self.writes.retain(|_, w| !matches(w.cmd.lun));
        for (itt, r) in self.running.iter_mut() {
            if matches(r.lun) {
                r.aborted = true;
                pending.waiting.insert(*itt);
            }
        }
    }

    /// PERSISTENT RESERVE OUT / PREEMPT AND ABORT from this nexus preempted the nexuses
    /// `ids` on the LU at `lun`: their sessions abort their tasks there (SPC-4
    /// §5.13.11.2.6) and this waits, bounded, until those tasks have ended. TAS = 0: the
    /// aborted commands get no status (SAM-5 §5.6), so the nexuses that lost commands get
    /// COMMANDS CLEARED BY ANOTHER INITIATOR instead.
    async fn abort_preempted(&self, lun: u64, ids: &[u64]) {
        let Some(lu) = self.luns.as_ref().and_then(|l| l.unit(lun)) else {
            return;
        };
        let asked: Vec<(u64, oneshot::Receiver<bool>)> = self
            .server
            .sessions()
            .all()
            .into_iter()
            .filter(|s| ids.contains(&s.nexus_id))
            .map(|s| (s.nexus_id, s.request_abort(lu.clone())))
            .collect();
        let deadline = Instant::now() + PREEMPT_ABORT_WAIT;
        let mut cleared = Vec::new();
        for (id, rx) in asked {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(true)) => cleared.push(id),
                // Nothing to abort, or the session ended (its nexus is gone).
                Ok(_) => {}
                Err(_) => warn!(
                    nexus = id,
                    "preempted session did not abort its tasks in time"
                ),
            }
        }
        if !cleared.is_empty() {
            info!(nexuses = ?cleared, "PREEMPT AND ABORT aborted other nexuses' commands");
            lu.commands_cleared(&cleared);
        }
    }

    /// Another nexus preempted this one with PREEMPT AND ABORT: abort every task of this
    /// session on that LU. Commands held behind a CmdSN gap never run, but their CmdSN still
    /// counts (RFC 7143 §3.2.2.1): a no-op keeps their place in the window. Writes still
    /// collecting Data-Out are dropped and the rest of their data discarded. Commands on the
    /// blocking pool are marked aborted (no status, TAS = 0) and the requester is answered
    /// when they have ended.
    fn abort_for_preempt(&mut self, req: AbortRequest) {
        let Some(luns) = self.luns.clone() else {
            let _ = req.done.send(false);
            return;
        };
        let on_lu = |lun: u64| luns.unit(lun).is_some_and(|lu| Arc::ptr_eq(&lu, &req.lu));
        let mut had = false;
        for pdu in self.held.values_mut() {
            if matches!(&pdu.bhs, Bhs::ScsiCommand(c) if on_lu(c.lun)) {
                *pdu = Pdu::header_only(Bhs::NopOut(NopOut {
                    itt: NO_TTT,
                    ttt: NO_TTT,
                    ..Default::default()
                }));
                had = true;
            }
        }
        let collecting: Vec<u32> = self
            .writes
            .iter()
            .filter(|(_, w)| on_lu(w.cmd.lun))
            .map(|(itt, _)| *itt)
            .collect();
        for itt in collecting {
            self.writes.remove(&itt);
            self.absorbing.insert(itt);
            had = true;
        }
        let mut waiting = HashSet::new();
        for (itt, r) in self.running.iter_mut() {
            if on_lu(r.lun) {
                r.aborted = true;
                waiting.insert(*itt);
            }
        }
        self.window.set_busy(self.busy());
        self.sync_seq();
        if waiting.is_empty() {
            let _ = req.done.send(had);
        } else {
            req.lu.release_waiting();
            self.aborts.push(PendingAbort {
                waiting,
                done: req.done,
            });
        }
    }

    fn abort_task_finished(&mut self, itt: u32) {
        let mut i = 0;
        while i < self.aborts.len() {
            self.aborts[i].waiting.remove(&itt);
            if self.aborts[i].waiting.is_empty() {
                let _ = self.aborts.remove(i).done.send(true);
            } else {
                i += 1;
            }
        }
    }

    fn tmf_task_finished(&mut self, itt: u32) -> Vec<PendingTmf> {
        let mut finished = Vec::new();
        let mut i = 0;
        while i < self.tmfs.len() {
            self.tmfs[i].waiting.remove(&itt);
            if self.tmfs[i].waiting.is_empty() {
                finished.push(self.tmfs.remove(i));
            } else {
                i += 1;
            }
        }
        finished
    }

    async fn finish_tmf(&mut self, p: PendingTmf) -> R {
        let mut response = p.response;
        if let (Some((lun, kind)), Some(luns)) = (p.reset, self.luns.clone()) {
            if !luns.reset(&self.nexus, lun, kind) {
                response = 2;
            }
            if kind == ResetKind::TargetCold {
                self.cold_reset = true;
            }
        }
        self.send(Pdu {
            bhs: Bhs::TaskMgmtResponse(TaskMgmtResponse {
                response,
                itt: p.req.itt,
                ..Default::default()
            }),
            data: Bytes::new(),
        })
        .await?;
        if self.cold_reset {
            // §11.5.1: after a TARGET COLD RESET response the target drops its connections.
            self.flush().await?;
            self.closing = true;
        }
        Ok(())
    }
}
