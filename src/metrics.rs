//! Prometheus metrics (OpenMetrics text, the `prometheus-client` crate) and the operator's
//! event feed.
//!
//! Two kinds of values:
//! - **Counted in the data path** by the layer that owns the event: commands, bytes and
//!   latencies per completed SCSI command ([`IoRecorder`], owned by one connection: a few
//!   relaxed atomic adds and one histogram observation per command), SCSI errors by sense key,
//!   Rejects, logins, dropped connections.
//! - **Read at scrape time** from a plain [`ScrapeState`] the caller assembles (sessions and
//!   connections open, per-client boots and overlay use from `boot::ClientInfo`, images,
//!   process memory and open files): nothing is kept twice.
//!
//! Labels stay bounded: target, initiator (at most [`MAX_INITIATORS`] distinct names, the rest
//! share `_other`), LUN, and small enums; never a per-command value.
//!
//! The event feed ([`Event`]) carries boots, hand-offs, session ends, login failures, resets
//! and operator actions to the HTTP API's Server-Sent Events stream, and keeps the last
//! [`RECENT_EVENTS`] for the console's event log and client timelines.

use crate::boot::ClientInfo;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// Distinct initiator label values kept; later names are counted under `_other` so a flood of
/// invented names cannot grow the scrape without bound.
pub const MAX_INITIATORS: usize = 2048;
/// Events kept in memory for the console (event log, client timelines).
pub const RECENT_EVENTS: usize = 2000;

/// What a SCSI command did, for counting (from its operation code, SBC-3 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Op {
    read,
    write,
    flush,
    other,
}

impl Op {
    /// Classify by operation code.
    pub fn of(opcode: u8) -> Op {
        match opcode {
            // READ(6/10/12/16)
            0x08 | 0x28 | 0xa8 | 0x88 => Op::read,
            // WRITE(6/10/12/16), WRITE AND VERIFY(10/12/16), COMPARE AND WRITE
            0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x89 => Op::write,
            // SYNCHRONIZE CACHE(10/16)
            0x35 | 0x91 => Op::flush,
            _ => Op::other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CmdLabels {
    target: String,
    initiator: String,
    lun: String,
    op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ByteLabels {
    target: String,
    initiator: String,
    lun: String,
    direction: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LatencyLabels {
    target: String,
    op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SenseLabels {
    target: String,
    sense_key: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LoginLabels {
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClientLabels {
    target: String,
    initiator: String,
    image: String,
    mode: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BootStageLabels {
    target: String,
    stage: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClientStageLabels {
    target: String,
    initiator: String,
    stage: &'static str,
}

/// When the stages of a client's current boot happened (firmware login, OS login).
#[derive(Debug, Clone, Copy)]
struct BootTiming {
    firmware: Instant,
    os_login: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FirmwareLabels {
    target: String,
    initiator: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResetLabels {
    target: String,
    initiator: String,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ObjectLabels {
    /// `bucket/prefix/image/version`.
    version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TierLabels {
    tier: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClusterLabels {
    what: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ImageLabels {
    image: String,
    path: String,
}

/// Name of a sense key (SPC-4 §4.5.6, table 48), a bounded label value.
pub fn sense_key_name(key: u8) -> &'static str {
    match key & 0x0f {
        0x0 => "no_sense",
        0x1 => "recovered_error",
        0x2 => "not_ready",
        0x3 => "medium_error",
        0x4 => "hardware_error",
        0x5 => "illegal_request",
        0x6 => "unit_attention",
        0x7 => "data_protect",
        0x8 => "blank_check",
        0x9 => "vendor_specific",
        0xa => "copy_aborted",
        0xb => "aborted_command",
        0xd => "volume_overflow",
        0xe => "miscompare",
        _ => "reserved",
    }
}

/// The sense key of fixed (0x70/0x71) or descriptor (0x72/0x73) sense data (SPC-4 §4.5).
pub fn sense_key_of(sense: &[u8]) -> Option<u8> {
    match sense.first()? & 0x7f {
        0x70 | 0x71 => sense.get(2).map(|b| b & 0x0f),
        0x72 | 0x73 => sense.get(1).map(|b| b & 0x0f),
        _ => None,
    }
}

/// Name of a Reject reason (RFC 7143 §11.17.1).
pub fn reject_reason_name(reason: u8) -> &'static str {
    match reason {
        0x02 => "data_digest_error",
        0x03 => "snack_reject",
        0x04 => "protocol_error",
        0x05 => "command_not_supported",
        0x06 => "immediate_command_reject",
        0x07 => "task_in_progress",
        0x08 => "invalid_data_ack",
        0x09 => "invalid_pdu_field",
        0x0a => "long_operation_reject",
        0x0c => "waiting_for_logout",
        _ => "other",
    }
}

/// Outcome label of a login status (RFC 7143 §11.13.5): `ok`, `auth_failure` (the CHAP
/// exchange failed), `refused` (any other initiator error: not authorized, not found, ...),
/// `error` (target errors).
pub fn login_outcome(class: u8, detail: u8) -> &'static str {
    match (class, detail) {
        (0, _) => "ok",
        (1, _) => "redirected",
        (2, 1) => "auth_failure",
        (2, _) => "refused",
        _ => "error",
    }
}

/// Why a connection ended other than by Logout, as a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The peer closed or reset the TCP connection.
    PeerClosed,
    /// Closed by the server: reinstatement, operator action, reset, shutdown.
    ServerClosed,
    ProtocolError,
    IoError,
    NopTimeout,
    IdleTimeout,
    ConnectionLimit,
    Other,
}

impl DropReason {
    fn label(self) -> &'static str {
        match self {
            DropReason::PeerClosed => "peer_closed",
            DropReason::ServerClosed => "server_closed",
            DropReason::ProtocolError => "protocol_error",
            DropReason::IoError => "io_error",
            DropReason::NopTimeout => "nop_timeout",
            DropReason::IdleTimeout => "idle_timeout",
            DropReason::ConnectionLimit => "connection_limit",
            DropReason::Other => "other",
        }
    }
}

/// One entry of the event feed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    /// Increasing number (SSE event id).
    pub seq: u64,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// `boot`, `firmware_login`, `handoff`, `os_login`, `login`, `session_end`, `login_failed`,
    /// `reset`,
    /// `action`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initiator: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    pub detail: String,
}

/// Unix time now, in milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A live session as the operator sees it (peer address, byte totals).
#[derive(Debug)]
pub struct SessionInfo {
    pub tsih: u16,
    pub initiator: String,
    pub target: String,
    pub isid: [u8; 6],
    pub peer: SocketAddr,
    pub firmware: bool,
    pub since_ms: u64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub commands: AtomicU64,
}

/// Per-LUN counters of one session (clones of the shared series: incrementing them is an
/// atomic add).
struct LunIo {
    lun: u64,
    commands: [Counter; 4],
    read_bytes: Counter,
    write_bytes: Counter,
}

/// The counting hook of one connection: owned by the connection task (no locks), fed once
/// per completed command.
pub struct IoRecorder {
    metrics: Arc<Metrics>,
    session: Arc<SessionInfo>,
    client: Arc<ClientIo>,
    target: String,
    initiator: String,
    luns: Vec<LunIo>,
    latency: [Histogram; 3],
    /// An OS session of a boot whose first write is still to come (boot duration).
    awaiting_first_write: bool,
}

impl IoRecorder {
    /// Count one completed command: `lun` as on the wire, `bytes` moved (0 unless GOOD),
    /// `elapsed` from delivery to completion.
    pub fn command_done(&mut self, lun: u64, opcode: u8, bytes: u64, elapsed: Duration) {
        let op = Op::of(opcode);
        let i = match self.luns.iter().position(|l| l.lun == lun) {
            Some(i) => i,
            None => {
                self.luns
                    .push(self.metrics.lun_io(&self.target, &self.initiator, lun));
                self.luns.len() - 1
            }
        };
        let l = &self.luns[i];
        l.commands[op.index()].inc();
        self.session.commands.fetch_add(1, Ordering::Relaxed);
        self.client.commands.fetch_add(1, Ordering::Relaxed);
        match op {
            Op::read => {
                l.read_bytes.inc_by(bytes);
                self.session.read_bytes.fetch_add(bytes, Ordering::Relaxed);
                self.client.read_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Op::write => {
                l.write_bytes.inc_by(bytes);
                self.session.write_bytes.fetch_add(bytes, Ordering::Relaxed);
                self.client.write_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            _ => {}
        }
        if op != Op::other {
            self.latency[op.index()].observe(elapsed.as_secs_f64());
        }
        if op == Op::write && self.awaiting_first_write {
            self.awaiting_first_write = false;
            self.metrics
                .boot_stage_done(&self.target, &self.session.initiator, false);
        }
    }

    /// Count a CHECK CONDITION with this sense data.
    pub fn scsi_error(&self, sense: Option<&[u8]>) {
        let key = sense.and_then(sense_key_of).map_or("none", sense_key_name);
        self.metrics
            .scsi_errors
            .get_or_create(&SenseLabels {
                target: self.target.clone(),
                sense_key: key,
            })
            .inc();
    }

    /// Count a Reject PDU sent on this connection.
    pub fn reject(&self, reason: u8) {
        self.metrics.reject(reason);
    }

    pub fn session(&self) -> &Arc<SessionInfo> {
        &self.session
    }
}

/// Running totals of one client (all its sessions, all LUNs), for the API's rates.
#[derive(Debug, Default)]
struct ClientIo {
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    commands: AtomicU64,
}

impl ClientIo {
    fn totals(&self) -> IoTotals {
        IoTotals {
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
            commands: self.commands.load(Ordering::Relaxed),
        }
    }
}

/// Byte and command totals of one client (all its sessions, all LUNs), for rates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoTotals {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub commands: u64,
}

/// What the scrape reads from the running server (assembled by the caller, which knows the
/// session layer and the registry).
#[derive(Debug, Default)]
pub struct ScrapeState {
    pub sessions_open: usize,
    pub connections_open: usize,
    pub clients: Vec<ClientInfo>,
    /// (image name, path, size in bytes).
    pub images: Vec<(String, String, u64)>,
    /// Where overlays live (its file system's free space is reported).
    pub state_dir: Option<std::path::PathBuf>,
    /// Images in object stores: (version key, counters).
    pub object_versions: Vec<(String, crate::storage::s3::FetchStats)>,
    /// The node's chunk cache, if any image is in an object store.
    pub chunk_cache: Option<crate::storage::s3::CacheStats>,
    /// The node's standing in its cluster, if it has a `cluster:` section.
    pub cluster: Option<ClusterState>,
}

/// A cluster node's standing, as the scrape reports it (docs/scale-out.md).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClusterState {
    /// The node's lease is surely alive now.
    pub registered: bool,
    /// Live nodes, this one included.
    pub nodes: usize,
    /// Clients this node owns.
    pub clients: usize,
    pub draining: bool,
}

/// Every metric of the server, and the event feed.
pub struct Metrics {
    registry: Registry,
    /// One scrape at a time (scrape-time families are cleared and refilled).
    scrape: Mutex<()>,
    started: Instant,
    commands: Family<CmdLabels, Counter>,
    bytes: Family<ByteLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    scsi_errors: Family<SenseLabels, Counter>,
    rejects: Family<ReasonLabels, Counter>,
    dropped: Family<ReasonLabels, Counter>,
    logins: Family<LoginLabels, Counter>,
    resets: Family<ResetLabels, Counter>,
    sessions_open: Gauge,
    connections_open: Gauge,
    client_boots: Family<ClientLabels, Counter>,
    client_resets: Family<ClientLabels, Counter>,
    client_sessions: Family<ClientLabels, Gauge>,
    client_overlay: Family<ClientLabels, Gauge>,
    client_firmware: Family<FirmwareLabels, Gauge<f64, AtomicU64>>,
    boot_duration: Family<BootStageLabels, Histogram, fn() -> Histogram>,
    client_boot: Family<ClientStageLabels, Gauge<f64, AtomicU64>>,
    boots_in_progress: dashmap::DashMap<(String, String), BootTiming>,
    state_free: Gauge,
    state_size: Gauge,
    image_size: Family<ImageLabels, Gauge>,
    s3_fetches: Family<ObjectLabels, Counter>,
    s3_failed: Family<ObjectLabels, Counter>,
    s3_checksum: Family<ObjectLabels, Counter>,
    s3_read_errors: Family<ObjectLabels, Counter>,
    cache_bytes: Family<TierLabels, Gauge>,
    cache_limit: Family<TierLabels, Gauge>,
    cache_hits: Family<TierLabels, Counter>,
    cache_evictions: Family<TierLabels, Counter>,
    cache_misses: Counter,
    flat_done: Counter,
    flat_failed: Counter,
    flat_running: Gauge,
    cluster: Family<ClusterLabels, Gauge>,
    uptime: Gauge<f64, AtomicU64>,
    readahead_bytes: Gauge,
    readset_chunks: Gauge,
    open_fds: Gauge,
    rss: Gauge,
    initiators: Mutex<HashSet<String>>,
    sessions: dashmap::DashMap<u16, Arc<SessionInfo>>,
    client_io: dashmap::DashMap<(String, String), Arc<ClientIo>>,
    events: broadcast::Sender<Event>,
    recent: Mutex<VecDeque<Event>>,
    next_seq: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s in 16 doublings: a cached 4 KiB read to a slow flush.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

fn boot_histogram() -> Histogram {
    // 0.5 s .. ~17 min in 12 doublings: a fast VM to a slow Windows boot.
    Histogram::new(exponential_buckets(0.5, 2.0, 12))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        let commands = Family::<CmdLabels, Counter>::default();
        r.register(
            "diskless_scsi_commands",
            "SCSI commands completed, by target, initiator, LUN and kind",
            commands.clone(),
        );
        let bytes = Family::<ByteLabels, Counter>::default();
        r.register_with_unit(
            "diskless_scsi",
            "Bytes read and written by SCSI commands that completed with GOOD status",
            Unit::Bytes,
            bytes.clone(),
        );
        let latency = Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        r.register_with_unit(
            "diskless_scsi_command_duration",
            "Time from a command's delivery to its completion (reads, writes, flushes)",
            Unit::Seconds,
            latency.clone(),
        );
        let scsi_errors = Family::<SenseLabels, Counter>::default();
        r.register(
            "diskless_scsi_errors",
            "Commands that ended in CHECK CONDITION, by sense key",
            scsi_errors.clone(),
        );
        let rejects = Family::<ReasonLabels, Counter>::default();
        r.register(
            "diskless_iscsi_rejects",
            "Reject PDUs sent, by reason (RFC 7143 11.17.1)",
            rejects.clone(),
        );
        let dropped = Family::<ReasonLabels, Counter>::default();
        r.register(
            "diskless_connections_dropped",
            "Connections that ended without a Logout, by reason",
            dropped.clone(),
        );
        let logins = Family::<LoginLabels, Counter>::default();
        r.register(
            "diskless_logins",
            "Completed and failed logins, by outcome and reason",
            logins.clone(),
        );
        let resets = Family::<ResetLabels, Counter>::default();
        r.register(
            "diskless_operator_resets",
            "Client disks reset by an operator action (API or control socket), by target, client and reason",
            resets.clone(),
        );
        let sessions_open = Gauge::default();
        r.register(
            "diskless_sessions_open",
            "iSCSI sessions logged in now",
            sessions_open.clone(),
        );
        let connections_open = Gauge::default();
        r.register(
            "diskless_connections_open",
            "TCP connections open now (logged in or not)",
            connections_open.clone(),
        );
        let client_boots = Family::<ClientLabels, Counter>::default();
        r.register(
            "diskless_client_boots",
            "Boots of a client (every boot, any mode), kept across server restarts by the lifecycle state",
            client_boots.clone(),
        );
        let client_resets = Family::<ClientLabels, Counter>::default();
        r.register(
            "diskless_client_resets",
            "Client disks discarded (volatile boots, operator resets), kept across server restarts",
            client_resets.clone(),
        );
        let client_sessions = Family::<ClientLabels, Gauge>::default();
        r.register(
            "diskless_client_sessions",
            "Live sessions of a client",
            client_sessions.clone(),
        );
        let client_overlay = Family::<ClientLabels, Gauge>::default();
        r.register_with_unit(
            "diskless_client_overlay",
            "Bytes a client has written into its overlay (chunks written x chunk size)",
            Unit::Bytes,
            client_overlay.clone(),
        );
        let client_firmware = Family::<FirmwareLabels, Gauge<f64, AtomicU64>>::default();
        r.register_with_unit(
            "diskless_client_firmware",
            "How long a client has had only boot-firmware sessions (no OS session yet); absent otherwise",
            Unit::Seconds,
            client_firmware.clone(),
        );
        let boot_duration =
            Family::<BootStageLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                boot_histogram,
            );
        r.register_with_unit(
            "diskless_boot_duration",
            "Boot stages: firmware login to OS login (firmware_to_os), OS login to its first write (os_to_first_write), firmware login to the first OS write (total)",
            Unit::Seconds,
            boot_duration.clone(),
        );
        let client_boot = Family::<ClientStageLabels, Gauge<f64, AtomicU64>>::default();
        r.register_with_unit(
            "diskless_client_last_boot",
            "The stages of a client's last boot (as diskless_boot_duration_seconds)",
            Unit::Seconds,
            client_boot.clone(),
        );
        let state_free = Gauge::default();
        r.register_with_unit(
            "diskless_state_dir_free",
            "Free space of the file system holding the state directory (overlays)",
            Unit::Bytes,
            state_free.clone(),
        );
        let state_size = Gauge::default();
        r.register_with_unit(
            "diskless_state_dir_size",
            "Size of the file system holding the state directory",
            Unit::Bytes,
            state_size.clone(),
        );
        let image_size = Family::<ImageLabels, Gauge>::default();
        r.register_with_unit(
            "diskless_image_size",
            "Size of each served image (golden images and LUN images)",
            Unit::Bytes,
            image_size.clone(),
        );
        let s3_fetches = Family::<ObjectLabels, Counter>::default();
        r.register(
            "diskless_s3_chunk_fetches",
            "Chunks fetched (and verified) from the object store, per image version",
            s3_fetches.clone(),
        );
        let s3_failed = Family::<ObjectLabels, Counter>::default();
        r.register(
            "diskless_s3_failed_attempts",
            "Object store reads that failed (error, timeout, bad checksum) and were retried or given up",
            s3_failed.clone(),
        );
        let s3_checksum = Family::<ObjectLabels, Counter>::default();
        r.register(
            "diskless_s3_checksum_errors",
            "Chunks whose CRC32C or length did not match the manifest (never served)",
            s3_checksum.clone(),
        );
        let s3_read_errors = Family::<ObjectLabels, Counter>::default();
        r.register(
            "diskless_s3_read_errors",
            "Chunk reads that failed after every retry (MEDIUM ERROR to the initiator)",
            s3_read_errors.clone(),
        );
        let cache_bytes = Family::<TierLabels, Gauge>::default();
        r.register_with_unit(
            "diskless_chunk_cache",
            "Bytes held by each tier of the chunk cache",
            Unit::Bytes,
            cache_bytes.clone(),
        );
        let cache_limit = Family::<TierLabels, Gauge>::default();
        r.register_with_unit(
            "diskless_chunk_cache_limit",
            "Configured bound of each tier of the chunk cache",
            Unit::Bytes,
            cache_limit.clone(),
        );
        let cache_hits = Family::<TierLabels, Counter>::default();
        r.register(
            "diskless_chunk_cache_hits",
            "Chunk reads served by each tier of the chunk cache",
            cache_hits.clone(),
        );
        let cache_evictions = Family::<TierLabels, Counter>::default();
        r.register(
            "diskless_chunk_cache_evictions",
            "Chunks evicted from each tier of the chunk cache",
            cache_evictions.clone(),
        );
        let cache_misses = Counter::default();
        r.register(
            "diskless_chunk_cache_misses",
            "Chunk reads that missed both tiers (then fetched from the object store)",
            cache_misses.clone(),
        );
        let flat_done = Counter::default();
        r.register(
            "diskless_versions_materialized",
            "Flat copies of deep image versions completed (docs/images.md, Flat copies)",
            flat_done.clone(),
        );
        let flat_failed = Counter::default();
        r.register(
            "diskless_versions_materialize_failures",
            "Flat copies of deep image versions that failed (reads stay on the chain)",
            flat_failed.clone(),
        );
        let flat_running = Gauge::default();
        r.register(
            "diskless_versions_materializing",
            "Flat copies of deep image versions being written now",
            flat_running.clone(),
        );
        let cluster = Family::<ClusterLabels, Gauge>::default();
        r.register(
            "diskless_cluster",
            "This node in its cluster (only with a cluster section): registered (lease alive, 0/1), nodes (live), clients (owned here), draining (0/1)",
            cluster.clone(),
        );
        let readahead_bytes = Gauge::default();
        r.register(
            "diskless_boot_readahead_bytes",
            "Bytes of learned boot read sets read ahead (POSIX_FADV_WILLNEED) since the start",
            readahead_bytes.clone(),
        );
        let readset_chunks = Gauge::default();
        r.register(
            "diskless_boot_readset_chunks",
            "1 MiB chunks of boot read sets learned and saved since the start",
            readset_chunks.clone(),
        );
        let uptime = Gauge::<f64, AtomicU64>::default();
        r.register_with_unit(
            "diskless_uptime",
            "Time since the server started",
            Unit::Seconds,
            uptime.clone(),
        );
        r.register(
            "diskless_build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION").to_string())]),
        );
        let start = Gauge::<f64, AtomicU64>::default();
        start.set(unix_ms() as f64 / 1000.0);
        r.register_with_unit(
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Unit::Seconds,
            start,
        );
        let open_fds = Gauge::default();
        r.register(
            "process_open_fds",
            "Open file descriptors (sockets, images, overlay files)",
            open_fds.clone(),
        );
        let rss = Gauge::default();
        r.register_with_unit(
            "process_resident_memory",
            "Resident memory of the process",
            Unit::Bytes,
            rss.clone(),
        );
        Metrics {
            registry: r,
            scrape: Mutex::new(()),
            started: Instant::now(),
            commands,
            bytes,
            latency,
            scsi_errors,
            rejects,
            dropped,
            logins,
            resets,
            sessions_open,
            connections_open,
            client_boots,
            client_resets,
            client_sessions,
            client_overlay,
            client_firmware,
            boot_duration,
            client_boot,
            boots_in_progress: dashmap::DashMap::new(),
            state_free,
            state_size,
            image_size,
            s3_fetches,
            s3_failed,
            s3_checksum,
            s3_read_errors,
            cache_bytes,
            cache_limit,
            cache_hits,
            cache_evictions,
            cache_misses,
            flat_done,
            flat_failed,
            flat_running,
            cluster,
            uptime,
            readahead_bytes,
            readset_chunks,
            open_fds,
            rss,
            initiators: Mutex::new(HashSet::new()),
            sessions: dashmap::DashMap::new(),
            client_io: dashmap::DashMap::new(),
            events: broadcast::channel(1024).0,
            recent: Mutex::new(VecDeque::new()),
            next_seq: AtomicU64::new(1),
        }
    }

    /// How long the server has run.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The initiator label for `name` (bounded: see [`MAX_INITIATORS`]).
    fn initiator_label(&self, name: &str) -> String {
        let mut set = lock(&self.initiators);
        if set.contains(name) {
            return name.to_string();
        }
        if set.len() < MAX_INITIATORS {
            set.insert(name.to_string());
            return name.to_string();
        }
        "_other".to_string()
    }

    fn lun_io(&self, target: &str, initiator: &str, lun: u64) -> LunIo {
        let lun_label = crate::pdu::lun_to_index(lun).map_or_else(|| "?".into(), |l| l.to_string());
        let cmd = |op| {
            self.commands
                .get_or_create(&CmdLabels {
                    target: target.to_string(),
                    initiator: initiator.to_string(),
                    lun: lun_label.clone(),
                    op,
                })
                .clone()
        };
        let bytes = |direction| {
            self.bytes
                .get_or_create(&ByteLabels {
                    target: target.to_string(),
                    initiator: initiator.to_string(),
                    lun: lun_label.clone(),
                    direction,
                })
                .clone()
        };
        LunIo {
            lun,
            commands: [
                cmd(Op::read),
                cmd(Op::write),
                cmd(Op::flush),
                cmd(Op::other),
            ],
            read_bytes: bytes(Op::read),
            write_bytes: bytes(Op::write),
        }
    }

    /// A session completed its login: count it, note it for the operator and hand back the
    /// connection's counting hook. `kind` is the event to report (`boot`, `handoff`, ...).
    pub fn session_opened(
        self: &Arc<Self>,
        tsih: u16,
        initiator: &str,
        target: &str,
        isid: [u8; 6],
        peer: SocketAddr,
        kind: &'static str,
    ) -> IoRecorder {
        self.logins
            .get_or_create(&LoginLabels {
                outcome: "ok",
                reason: "success",
            })
            .inc();
        let firmware = crate::boot::is_firmware_isid(&isid);
        let session = Arc::new(SessionInfo {
            tsih,
            initiator: initiator.to_string(),
            target: target.to_string(),
            isid,
            peer,
            firmware,
            since_ms: unix_ms(),
            read_bytes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            commands: AtomicU64::new(0),
        });
        self.sessions.insert(tsih, session.clone());
        let isid_hex: String = isid.iter().map(|b| format!("{b:02x}")).collect();
        self.emit(
            kind,
            Some(initiator),
            Some(target),
            Some(peer),
            format!(
                "tsih {tsih}, isid {isid_hex} ({})",
                if firmware { "boot firmware" } else { "OS" }
            ),
        );
        let key = (target.to_ascii_lowercase(), initiator.to_ascii_lowercase());
        let awaiting_first_write = match kind {
            "boot" => {
                self.boots_in_progress.insert(
                    key,
                    BootTiming {
                        firmware: Instant::now(),
                        os_login: None,
                    },
                );
                false
            }
            "handoff" | "os_login" => self.boot_stage_done(target, initiator, true),
            _ => false,
        };
        let label = self.initiator_label(initiator);
        let latency = |op| {
            self.latency
                .get_or_create(&LatencyLabels {
                    target: target.to_string(),
                    op,
                })
                .clone()
        };
        let client = self
            .client_io
            .entry((target.to_ascii_lowercase(), label.to_ascii_lowercase()))
            .or_default()
            .clone();
        IoRecorder {
            metrics: self.clone(),
            session,
            client,
            target: target.to_string(),
            initiator: label,
            luns: Vec::new(),
            latency: [latency(Op::read), latency(Op::write), latency(Op::flush)],
            awaiting_first_write,
        }
    }

    /// A stage of a client's boot ended: its OS logged in (`os_login`), or that OS wrote
    /// for the first time. Returns whether a boot of this client is in progress.
    fn boot_stage_done(&self, target: &str, initiator: &str, os_login: bool) -> bool {
        let key = (target.to_ascii_lowercase(), initiator.to_ascii_lowercase());
        let now = Instant::now();
        let mut observed: Vec<(&'static str, f64)> = Vec::new();
        if os_login {
            let Some(mut t) = self.boots_in_progress.get_mut(&key) else {
                return false;
            };
            if t.os_login.is_some() {
                // A second OS login within the boot (reinstatement): still waiting to write.
                return true;
            }
            t.os_login = Some(now);
            observed.push(("firmware_to_os", (now - t.firmware).as_secs_f64()));
        } else {
            let Some((_, t)) = self.boots_in_progress.remove(&key) else {
                return false;
            };
            if let Some(os) = t.os_login {
                observed.push(("os_to_first_write", (now - os).as_secs_f64()));
            }
            observed.push(("total", (now - t.firmware).as_secs_f64()));
        }
        let initiator = self.initiator_label(initiator);
        for (stage, secs) in observed {
            self.boot_duration
                .get_or_create(&BootStageLabels {
                    target: target.to_string(),
                    stage,
                })
                .observe(secs);
            self.client_boot
                .get_or_create(&ClientStageLabels {
                    target: target.to_string(),
                    initiator: initiator.clone(),
                    stage,
                })
                .set(secs);
        }
        true
    }

    /// A logged-in session ended (`how`: "logout" or a [`DropReason`]).
    pub fn session_closed(&self, tsih: u16, how: Result<(), DropReason>) {
        let Some((_, s)) = self.sessions.remove(&tsih) else {
            return;
        };
        let detail = match how {
            Ok(()) => "logout".to_string(),
            Err(r) => r.label().replace('_', " "),
        };
        self.emit(
            "session_end",
            Some(&s.initiator),
            Some(&s.target),
            Some(s.peer),
            format!("tsih {tsih}: {detail}"),
        );
    }

    /// A connection ended without Logout.
    pub fn connection_dropped(&self, reason: DropReason) {
        self.dropped
            .get_or_create(&ReasonLabels {
                reason: reason.label(),
            })
            .inc();
    }

    /// A Reject PDU went out.
    pub fn reject(&self, reason: u8) {
        self.rejects
            .get_or_create(&ReasonLabels {
                reason: reject_reason_name(reason),
            })
            .inc();
    }

    /// A login failed with this status (RFC 7143 §11.13.5).
    pub fn login_failed(
        &self,
        peer: SocketAddr,
        initiator: &str,
        target: &str,
        (class, detail): (u8, u8),
    ) {
        let reason = crate::login::status::describe((class, detail));
        self.logins
            .get_or_create(&LoginLabels {
                outcome: login_outcome(class, detail),
                reason,
            })
            .inc();
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.chars().take(256).collect::<String>());
        self.emit(
            "login_failed",
            nonempty(initiator).as_deref(),
            nonempty(target).as_deref(),
            Some(peer),
            format!("{reason} ({class:02x}{detail:02x})"),
        );
    }

    /// An operator reset a client's disk.
    pub fn client_reset(&self, target: &str, initiator: &str, reason: &'static str) {
        self.resets
            .get_or_create(&ResetLabels {
                target: target.to_string(),
                initiator: self.initiator_label(initiator),
                reason,
            })
            .inc();
    }

    /// Publish an event to the feed.
    pub fn emit(
        &self,
        kind: &'static str,
        initiator: Option<&str>,
        target: Option<&str>,
        peer: Option<SocketAddr>,
        detail: String,
    ) {
        let ev = Event {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            time_ms: unix_ms(),
            kind,
            initiator: initiator.map(str::to_string),
            target: target.map(str::to_string),
            peer: peer.map(|p| p.to_string()),
            detail,
        };
        {
            let mut recent = lock(&self.recent);
            if recent.len() >= RECENT_EVENTS {
                recent.pop_front();
            }
            recent.push_back(ev.clone());
        }
        // No subscriber is fine: nobody watches the stream.
        let _ = self.events.send(ev);
    }

    /// Follow the event feed.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The last events, oldest first (at most [`RECENT_EVENTS`]).
    pub fn recent_events(&self) -> Vec<Event> {
        lock(&self.recent).iter().cloned().collect()
    }

    /// Live sessions with their peers and byte totals.
    pub fn sessions(&self) -> Vec<Arc<SessionInfo>> {
        let mut v: Vec<_> = self.sessions.iter().map(|s| s.clone()).collect();
        v.sort_by_key(|s| s.tsih);
        v
    }

    /// Totals of one client (every session, every LUN) since the server started.
    pub fn client_totals(&self, target: &str, initiator: &str) -> IoTotals {
        self.client_io
            .get(&(target.to_ascii_lowercase(), initiator.to_ascii_lowercase()))
            .map_or_else(IoTotals::default, |c| c.totals())
    }

    /// The OpenMetrics text of every metric, scrape-time values taken from `state`.
    pub fn render(&self, state: &ScrapeState) -> String {
        let _one = lock(&self.scrape);
        self.sessions_open.set(state.sessions_open as i64);
        self.connections_open.set(state.connections_open as i64);
        self.uptime.set(self.started.elapsed().as_secs_f64());
        {
            use crate::storage::readahead::{LEARNED_CHUNKS, READAHEAD_BYTES};
            use std::sync::atomic::Ordering::Relaxed;
            let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.readahead_bytes
                .set(clamp(READAHEAD_BYTES.load(Relaxed)));
            self.readset_chunks.set(clamp(LEARNED_CHUNKS.load(Relaxed)));
        }
        self.client_boots.clear();
        self.client_resets.clear();
        self.client_sessions.clear();
        self.client_overlay.clear();
        for c in &state.clients {
            let labels = ClientLabels {
                target: c.target.clone(),
                initiator: c.initiator.clone(),
                image: c.image.clone(),
                mode: c.mode.to_string(),
            };
            self.client_boots.get_or_create(&labels).inc_by(c.boots);
            self.client_resets.get_or_create(&labels).inc_by(c.resets);
            self.client_sessions
                .get_or_create(&labels)
                .set(i64::from(c.sessions));
            let written = c.overlay.as_ref().map_or(0, |o| o.bytes_written);
            self.client_overlay
                .get_or_create(&labels)
                .set(i64::try_from(written).unwrap_or(i64::MAX));
        }
        // Clients in the firmware phase: every live session of theirs is a firmware one.
        self.client_firmware.clear();
        let mut by_client: std::collections::HashMap<(String, String), (bool, u64)> =
            std::collections::HashMap::new();
        for s in self.sessions.iter() {
            let e = by_client
                .entry((s.target.clone(), s.initiator.clone()))
                .or_insert((true, u64::MAX));
            e.0 &= s.firmware;
            e.1 = e.1.min(s.since_ms);
        }
        let now = unix_ms();
        for ((target, initiator), (firmware_only, since)) in by_client {
            if firmware_only {
                self.client_firmware
                    .get_or_create(&FirmwareLabels { target, initiator })
                    .set(now.saturating_sub(since) as f64 / 1000.0);
            }
        }
        if let Some((free, size)) = state.state_dir.as_deref().and_then(fs_space) {
            self.state_free.set(i64::try_from(free).unwrap_or(i64::MAX));
            self.state_size.set(i64::try_from(size).unwrap_or(i64::MAX));
        }
        self.image_size.clear();
        for (name, path, size) in &state.images {
            self.image_size
                .get_or_create(&ImageLabels {
                    image: name.clone(),
                    path: path.clone(),
                })
                .set(i64::try_from(*size).unwrap_or(i64::MAX));
        }
        for f in [
            &self.s3_fetches,
            &self.s3_failed,
            &self.s3_checksum,
            &self.s3_read_errors,
        ] {
            f.clear();
        }
        for (version, st) in &state.object_versions {
            let l = ObjectLabels {
                version: version.clone(),
            };
            self.s3_fetches.get_or_create(&l).inc_by(st.fetches);
            self.s3_failed.get_or_create(&l).inc_by(st.failed_attempts);
            self.s3_checksum
                .get_or_create(&l)
                .inc_by(st.checksum_errors);
            self.s3_read_errors.get_or_create(&l).inc_by(st.read_errors);
        }
        if let Some(c) = &state.cluster {
            let g = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
            for (what, v) in [
                ("registered", i64::from(c.registered)),
                ("nodes", g(c.nodes)),
                ("clients", g(c.clients)),
                ("draining", i64::from(c.draining)),
            ] {
                self.cluster.get_or_create(&ClusterLabels { what }).set(v);
            }
        }
        if let Some(c) = &state.chunk_cache {
            let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            for (tier, bytes, limit, hits, evicted) in [
                (
                    "memory",
                    c.memory_bytes,
                    c.memory_limit,
                    c.memory_hits,
                    c.memory_evictions,
                ),
                (
                    "disk",
                    c.disk_bytes,
                    c.disk_limit,
                    c.disk_hits,
                    c.disk_evictions,
                ),
            ] {
                let l = TierLabels { tier };
                self.cache_bytes.get_or_create(&l).set(g(bytes));
                self.cache_limit.get_or_create(&l).set(g(limit));
                // Counters only grow: add what is new since the last scrape.
                let h = self.cache_hits.get_or_create(&l);
                h.inc_by(hits.saturating_sub(h.get()));
                let e = self.cache_evictions.get_or_create(&l);
                e.inc_by(evicted.saturating_sub(e.get()));
            }
            self.cache_misses
                .inc_by(c.misses.saturating_sub(self.cache_misses.get()));
        }
        let flat = crate::storage::versions::flat::stats();
        self.flat_done
            .inc_by(flat.materialized.saturating_sub(self.flat_done.get()));
        self.flat_failed
            .inc_by(flat.failed.saturating_sub(self.flat_failed.get()));
        self.flat_running
            .set(i64::try_from(flat.running).unwrap_or(i64::MAX));
        let (fds, rss) = process_stats();
        self.open_fds.set(fds);
        self.rss.set(rss);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
            out.push_str("# EOF\n");
        }
        out
    }
}

/// The same metrics in the classic Prometheus text format (0.0.4), for scrapers that do not
/// ask for OpenMetrics (curl, `promtool check metrics`): counter families are named with
/// their `_total` suffix, info families become `_info` gauges, `# UNIT` and `# EOF` go.
pub fn to_classic_text(openmetrics: &str) -> String {
    let mut kinds = std::collections::HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                kinds.insert(name.to_string(), kind.to_string());
            }
        }
    }
    let family = |name: &str| match kinds.get(name).map(String::as_str) {
        Some("counter") => (format!("{name}_total"), "counter"),
        Some("info") => (format!("{name}_info"), "gauge"),
        Some(k) => (
            name.to_string(),
            match k {
                "gauge" => "gauge",
                "histogram" => "histogram",
                "summary" => "summary",
                _ => "untyped",
            },
        ),
        None => (name.to_string(), "untyped"),
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", family(name).0));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_once(' ').map_or(rest, |(n, _)| n);
            let (n, k) = family(name);
            out.push_str(&format!("# TYPE {n} {k}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// (free bytes for unprivileged users, total bytes) of the file system holding `path`.
fn fs_space(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
}

/// (open file descriptors, resident bytes) of this process, from /proc (0 where unknown).
fn process_stats() -> (i64, i64) {
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as i64);
    // statm: size resident shared ... in pages.
    let rss_pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (fds, rss_pages * i64::from(page.max(0) as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_ops_sense_and_status() {
        assert_eq!(Op::of(0x28), Op::read);
        assert_eq!(Op::of(0x8a), Op::write);
        assert_eq!(Op::of(0x35), Op::flush);
        assert_eq!(Op::of(0x12), Op::other);
        assert_eq!(sense_key_of(&[0x70, 0, 0x05, 0, 0, 0, 0, 10]), Some(5));
        assert_eq!(sense_key_of(&[0x72, 0x06, 0x29, 0]), Some(6));
        assert_eq!(sense_key_of(&[0x00]), None);
        assert_eq!(sense_key_name(5), "illegal_request");
        assert_eq!(login_outcome(2, 1), "auth_failure");
        assert_eq!(login_outcome(2, 2), "refused");
        assert_eq!(login_outcome(3, 0), "error");
        assert_eq!(reject_reason_name(0x04), "protocol_error");
    }

    #[test]
    fn counts_and_renders() {
        let m = Arc::new(Metrics::new());
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut rec = m.session_opened(
            7,
            "iqn.x:c1",
            "iqn.x:t",
            [0x40, 0, 0x27, 0x23, 0, 1],
            peer,
            "boot",
        );
        let mut os = m.session_opened(
            8,
            "iqn.x:c1",
            "iqn.x:t",
            [0, 2, 0x3d, 0, 0, 1],
            peer,
            "handoff",
        );
        os.command_done(0, 0x28, 512, Duration::from_micros(50));
        os.command_done(0, 0x2a, 512, Duration::from_micros(50));
        m.session_closed(8, Ok(()));
        rec.command_done(0, 0x28, 4096, Duration::from_micros(80));
        rec.command_done(0, 0x2a, 8192, Duration::from_micros(200));
        rec.command_done(0, 0x35, 0, Duration::from_millis(2));
        rec.scsi_error(Some(&[0x70, 0, 0x05, 0, 0, 0, 0, 10]));
        m.reject(0x04);
        m.connection_dropped(DropReason::NopTimeout);
        m.login_failed(peer, "iqn.x:bad", "iqn.x:t", (2, 1));
        let totals = m.client_totals("iqn.x:t", "iqn.x:c1");
        assert_eq!(
            totals,
            IoTotals {
                read_bytes: 4096 + 512,
                write_bytes: 8192 + 512,
                commands: 5
            }
        );
        assert_eq!(m.sessions()[0].write_bytes.load(Ordering::Relaxed), 8192);
        let text = m.render(&ScrapeState {
            sessions_open: 1,
            connections_open: 2,
            clients: Vec::new(),
            images: vec![("golden".into(), "/x/golden.img".into(), 1 << 20)],
            state_dir: Some(std::env::temp_dir()),
            object_versions: vec![(
                "b/golden/v1".into(),
                crate::storage::s3::FetchStats {
                    fetches: 7,
                    ..Default::default()
                },
            )],
            chunk_cache: Some(crate::storage::s3::CacheStats {
                memory_bytes: 4096,
                misses: 7,
                ..Default::default()
            }),
            cluster: Some(ClusterState {
                registered: true,
                nodes: 3,
                clients: 12,
                draining: false,
            }),
        });
        for want in [
            "diskless_scsi_commands_total{target=\"iqn.x:t\",initiator=\"iqn.x:c1\",lun=\"0\",op=\"read\"} 2",
            "diskless_scsi_bytes_total{target=\"iqn.x:t\",initiator=\"iqn.x:c1\",lun=\"0\",direction=\"write\"} 8704",
            "diskless_scsi_command_duration_seconds_count{target=\"iqn.x:t\",op=\"flush\"} 1",
            "diskless_scsi_errors_total{target=\"iqn.x:t\",sense_key=\"illegal_request\"} 1",
            "diskless_iscsi_rejects_total{reason=\"protocol_error\"} 1",
            "diskless_s3_chunk_fetches_total{version=\"b/golden/v1\"} 7",
            "diskless_chunk_cache_bytes{tier=\"memory\"} 4096",
            "diskless_chunk_cache_misses_total 7",
            "diskless_cluster{what=\"nodes\"} 3",
            "diskless_cluster{what=\"clients\"} 12",
            "diskless_cluster{what=\"registered\"} 1",
            "diskless_connections_dropped_total{reason=\"nop_timeout\"} 1",
            "diskless_logins_total{outcome=\"auth_failure\",reason=\"authentication failure\"} 1",
            "diskless_logins_total{outcome=\"ok\",reason=\"success\"} 2",
            "diskless_boot_duration_seconds_count{target=\"iqn.x:t\",stage=\"firmware_to_os\"} 1",
            "diskless_boot_duration_seconds_count{target=\"iqn.x:t\",stage=\"os_to_first_write\"} 1",
            "diskless_boot_duration_seconds_count{target=\"iqn.x:t\",stage=\"total\"} 1",
            "diskless_client_last_boot_seconds{target=\"iqn.x:t\",initiator=\"iqn.x:c1\",stage=\"total\"}",
            "diskless_sessions_open 1",
            "diskless_connections_open 2",
            "diskless_image_size_bytes{image=\"golden\",path=\"/x/golden.img\"} 1048576",
            "diskless_build_info{version=",
            "process_open_fds ",
            "diskless_client_firmware_seconds{target=\"iqn.x:t\",initiator=\"iqn.x:c1\"}",
            "diskless_state_dir_free_bytes ",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        let classic = to_classic_text(&text);
        assert!(classic.contains("# TYPE diskless_scsi_commands_total counter\n"));
        assert!(classic.contains("# HELP diskless_scsi_commands_total SCSI"));
        assert!(classic.contains("# TYPE diskless_build_info gauge\n"));
        assert!(!classic.contains("# EOF") && !classic.contains("# UNIT"));
        let kinds: Vec<_> = m.recent_events().iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            vec!["boot", "handoff", "session_end", "login_failed"]
        );
        m.session_closed(7, Err(DropReason::PeerClosed));
        assert!(m.sessions().is_empty());
        assert_eq!(
            m.recent_events().last().map(|e| e.kind),
            Some("session_end")
        );
    }

    #[test]
    fn initiator_labels_are_bounded() {
        let m = Metrics::new();
        for i in 0..MAX_INITIATORS {
            assert_eq!(m.initiator_label(&format!("i{i}")), format!("i{i}"));
        }
        assert_eq!(m.initiator_label("one-too-many"), "_other");
        assert_eq!(m.initiator_label("i0"), "i0");
    }
}
