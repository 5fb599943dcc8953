//! Boot emulation: bindings from initiator names to golden images, one client disk per
//! initiator (the golden image seen through the client's own copy-on-write overlay), and the
//! rule that decides when a client "boots again" (docs/overlays.md).
//!
//! Both sessions of one boot (the firmware's, then the operating system's after the iBFT
//! hand-off) reach the same [`Client`], so the OS sees every write the firmware phase made.

pub mod http;
pub mod lifecycle;
pub mod nextboot;
pub mod record;
pub mod state;

use crate::config::{
    parse_isid_prefix, parse_mac, ClientOs, ConfigError, DiskConfig, GatewayPolicy, OverlayMode,
    ResetPolicy,
};
use crate::identity::lu_identity;
use crate::scsi::{LogicalUnit, LuOptions, LunTable};
use crate::storage::versions;
use crate::storage::{BlockStore, FileStore, Overlay, OverlayOptions, OverlayStats};
use dashmap::DashMap;
use lifecycle::{Decision, End, Event, HistoryEntry, Lifecycle, Phase, Policy};
use nextboot::{DiskRecord, NextBoot, NextBootError, Switch};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub use lifecycle::{is_firmware_isid, IPXE_ISID_PREFIX};

/// A golden image, opened read-only once and shared by every client bound to it.
pub struct GoldenImage {
    pub name: String,
    pub path: PathBuf,
    pub block_size: u32,
    /// Reported physical block size (512e: 4096 over 512-byte blocks).
    pub physical_block_size: u32,
    pub store: Arc<dyn BlockStore>,
    /// Identity recorded in each overlay (path, length, mtime): an overlay is never opened
    /// on top of a different image.
    pub id: String,
    /// The version when the image is a versioned one (`STATE_DIR/images/<name>`,
    /// docs/images.md); None for a plain file from `images:`.
    pub version: Option<u64>,
    /// Opens another version of the series from the golden id a disk recorded and its
    /// version number (an object-store image following a catalogue pointer: a persistent
    /// disk made on a version the pointer has left).
    pub older: Option<Arc<OpenOlder>>,
}

/// See [`GoldenImage::older`]: (recorded golden id, version) → that version.
pub type OpenOlder = dyn Fn(&str, u64) -> Result<GoldenImage, String> + Send + Sync;

impl GoldenImage {
    /// An image behind any store (an object store version: `path` is its `s3://` name and
    /// `id` names the version, so an overlay is never opened over another one).
    pub fn from_store(
        name: &str,
        path: PathBuf,
        block_size: u32,
        store: Arc<dyn BlockStore>,
        id: String,
    ) -> GoldenImage {
        GoldenImage {
            name: name.to_string(),
            path,
            block_size,
            physical_block_size: block_size,
            store,
            id,
            version: None,
            older: None,
        }
    }

    pub fn open(name: &str, path: &Path, block_size: u32) -> Result<GoldenImage, String> {
        let store = FileStore::open(path, block_size, true)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        Ok(GoldenImage {
            name: name.to_string(),
            path: path.to_path_buf(),
            block_size,
            physical_block_size: block_size,
            store: Arc::new(store),
            id: format!("{}|{}|{}", path.display(), meta.len(), mtime),
            version: None,
            older: None,
        })
    }

    /// Open a version of a versioned image: `spec` is `name` (latest), `name@N` or
    /// `name:channel` (docs/images.md).
    pub fn open_version(state_dir: &Path, spec: &str) -> Result<GoldenImage, String> {
        let (name, sel) = versions::parse_spec(spec).map_err(|e| e.to_string())?;
        let images = versions::Images::new(state_dir);
        let log = images.log(&name).map_err(|e| e.to_string())?;
        let v = log.resolve(&sel).map_err(|e| e.to_string())?;
        Self::open_exact(&images, &log, v)
    }

    /// Open version `v` of the image `log` describes.
    pub fn open_exact(
        images: &versions::Images,
        log: &versions::ImageLog,
        v: u64,
    ) -> Result<GoldenImage, String> {
        let info = log.get(v).map_err(|e| e.to_string())?;
        let store = images.open_in(log, v).map_err(|e| e.to_string())?;
        Ok(GoldenImage {
            name: log.name.clone(),
            path: images.dir(&log.name),
            block_size: log.block_size,
            physical_block_size: log.block_size,
            store: Arc::new(store),
            id: versions::Images::version_id(log, info),
            version: Some(v),
            older: None,
        })
    }

    /// Version `v` of the series `image` belongs to, for a persistent disk made on it (in
    /// `client_dir`). An image in an object store following a catalogue pointer opens the
    /// version the disk recorded (immutable in the store) until the operator resets the
    /// disk (docs/scale-out.md, "Image catalogue").
    fn open_older(
        state_dir: &Path,
        client_dir: &Path,
        image: &GoldenImage,
        v: u64,
    ) -> Result<GoldenImage, String> {
        if image.path.to_string_lossy().starts_with("s3://") {
            let refused = |why: String| {
                format!(
                    "the persistent disk is on {}@{v}, a version the catalogue pointer has left, \
                     and it cannot be opened ({why}): reset the disk (`diskless client reset`) \
                     or pin its binding to that version",
                    image.name
                )
            };
            let disk = client_dir.join(dir_name(&format!("{}.v{v}", image.name)));
            let id = Overlay::recorded_golden_id(&disk)
                .map_err(|e| refused(e.to_string()))?
                .ok_or_else(|| refused("its disk records no image".into()))?;
            let open = image
                .older
                .as_ref()
                .ok_or_else(|| refused(format!("this node opens only {}", image.label())))?;
            let mut opened = open(&id, v).map_err(refused)?;
            opened.physical_block_size = image.physical_block_size;
            return Ok(opened);
        }
        let images = versions::Images::new(state_dir);
        images
            .log(&image.name)
            .map_err(|e| e.to_string())
            .and_then(|log| GoldenImage::open_exact(&images, &log, v))
    }

    /// The overlay directory name of a disk on this image: one per version (`NAME.vN`), so a
    /// disk moving to a new version never shares a directory with the old overlay that
    /// sessions of the previous boot may still hold.
    pub fn disk_dir_name(&self) -> String {
        match self.version {
            Some(v) => dir_name(&format!("{}.v{v}", self.name)),
            None => dir_name(&self.name),
        }
    }

    /// `name` or `name@N` for messages.
    pub fn label(&self) -> String {
        match self.version {
            Some(v) => format!("{}@{v}", self.name),
            None => self.name.clone(),
        }
    }
}

/// The disk a client uses now: the image (version) it booted, its mode and its overlay.
struct Disk {
    image: Arc<GoldenImage>,
    mode: OverlayMode,
    overlay: Option<Arc<Overlay>>,
}

/// The disk a client's next boot takes, when it is not the one it is on.
#[derive(Clone)]
struct Next {
    image: Arc<GoldenImage>,
    mode: OverlayMode,
}

fn disk_spec(image: &GoldenImage, mode: OverlayMode) -> nextboot::DiskSpec<'_> {
    nextboot::DiskSpec {
        name: &image.name,
        id: &image.id,
        version: image.version,
        mode,
    }
}

/// `image` opened for writing (direct mode: writes go to the image file itself).
fn direct_image(image: &GoldenImage) -> Result<Arc<GoldenImage>, String> {
    if image.version.is_some() {
        return Err(format!(
            "image {} is versioned: versions are immutable, use install or persistent \
             mode and `diskless client commit`",
            image.label()
        ));
    }
    let store = FileStore::open(&image.path, image.block_size, false).map_err(|e| e.to_string())?;
    Ok(Arc::new(GoldenImage {
        name: image.name.clone(),
        path: image.path.clone(),
        block_size: image.block_size,
        physical_block_size: image.physical_block_size,
        store: Arc::new(store),
        id: image.id.clone(),
        version: None,
        older: None,
    }))
}

/// A disk of a binding beyond LUN 0 (a data disk, a shared game disk).
#[derive(Clone)]
pub struct DiskPlan {
    pub lun: u16,
    pub image: Arc<GoldenImage>,
    pub mode: OverlayMode,
}

/// A client's disk beyond LUN 0: its own image, mode and overlay, in `CLIENT_DIR/LUNn`.
struct ExtraDisk {
    lun: u16,
    mode: OverlayMode,
    disk: RwLock<Disk>,
    /// The version a boot takes next (as [`Client::set_next_image`] for LUN 0).
    next_image: Mutex<Option<Arc<GoldenImage>>>,
    /// The directory of this disk's overlays (one per version, like LUN 0's).
    dir: PathBuf,
    serial: String,
    naa: [u8; 16],
    /// The RBD image of this disk when it is a shared disk (persistent or install, `rbd:`).
    shared_name: Option<String>,
}

impl ExtraDisk {
    /// What the cluster's record says of this disk.
    fn summary(&self) -> record::LunSummary {
        let d = read(&self.disk);
        record::LunSummary {
            lun: self.lun,
            image: d.image.label(),
            mode: self.mode,
            disk: lun_kind(&d, self.shared_name.as_ref()),
        }
    }

    /// Whether this disk is a shared disk (RBD) that another node fenced this node from.
    fn fenced(&self) -> bool {
        self.shared_name.is_some() && read(&self.disk).image.store.fenced()
    }
}

/// What a disk is on, for the cluster's record.
fn lun_kind(d: &Disk, shared_name: Option<&String>) -> record::Lun0 {
    match (&d.overlay, shared_name) {
        (Some(_), _) => record::Lun0::Overlay,
        (None, Some(name)) if d.mode != OverlayMode::Direct => {
            record::Lun0::Rbd { name: name.clone() }
        }
        _ => record::Lun0::Image,
    }
}

/// What a reset discards (docs/overlays.md, "Several disks per client").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetScope {
    /// A new boot: volatile disks only (readonly ones take their binding's new version).
    Boot,
    /// `diskless client reset CLIENT`: LUN 0 whatever its mode, and the volatile disks.
    Operator,
    /// `diskless client reset CLIENT --lun N`: that disk only, whatever its mode.
    Lun(u16),
}

impl ResetScope {
    fn covers(self, lun: u16, mode: OverlayMode) -> bool {
        let boot = matches!(mode, OverlayMode::Volatile | OverlayMode::Readonly);
        match self {
            ResetScope::Boot => boot,
            ResetScope::Operator => lun == 0 || boot,
            ResetScope::Lun(n) => n == lun,
        }
    }
}

/// Disks in RBD an operator's reset marked to be recreated at the client's next attach
/// ([`Client::recreate_mark`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecreateMark {
    /// Ascending.
    pub luns: Vec<u16>,
    /// The write number of the newest record of the client this node handed to the
    /// cluster's writer, if it carries every LUN of the mark; None: no such record (not
    /// in a cluster, the client not placed here through it, or its state not saved).
    pub record_seq: Option<u64>,
}

/// One disk of a client as the operator sees it (`diskless client show`, the API).
#[derive(Debug, Clone)]
pub struct DiskInfo {
    pub lun: u16,
    pub image: String,
    pub version: Option<u64>,
    pub next_version: Option<u64>,
    pub mode: OverlayMode,
    pub overlay: Option<OverlayStats>,
    pub overlay_dir: Option<PathBuf>,
}

/// The directory of a client's disk on LUN `lun` (> 0) inside its client directory:
/// upper case, which [`dir_name`] never produces, so no image's overlay directory
/// collides with it.
pub fn lun_dir_name(lun: u16) -> String {
    format!("LUN{lun}")
}

/// One binding, resolved.
#[derive(Clone)]
pub struct BindingPlan {
    /// Exact initiator name or glob; None for MAC-only bindings (name derived from the MAC).
    pub initiator: Option<String>,
    pub matcher: Option<globset::GlobMatcher>,
    pub image: Arc<GoldenImage>,
    pub mode: OverlayMode,
    pub mac: Option<String>,
    pub uuid: Option<String>,
    /// Per-client CHAP credentials (override the target's).
    pub chap: Option<crate::login::ChapCredentials>,
    pub reset: ResetPolicy,
    /// Operator-given firmware ISID (prefix).
    pub firmware_isid: Option<Vec<u8>>,
    /// Disks on LUN 1 and up, in LUN order.
    pub disks: Vec<DiskPlan>,
    /// What the boot script does for the client's OS and its gateway (docs/booting.md).
    pub os: ClientOs,
    pub gateway: GatewayPolicy,
}

impl BindingPlan {
    pub fn matches(&self, initiator: &str) -> bool {
        match (&self.matcher, &self.mac) {
            (Some(m), _) => m.is_match(initiator),
            (None, Some(mac)) => initiator.eq_ignore_ascii_case(&mac_initiator(mac)),
            (None, None) => false,
        }
    }

    /// What the lifecycle model needs of this binding.
    pub fn policy(&self, reboot_gap: Duration) -> Policy {
        let mac = self.mac.as_deref().and_then(|m| {
            let bytes: Vec<u8> = m
                .split(':')
                .filter_map(|h| u8::from_str_radix(h, 16).ok())
                .collect();
            <[u8; 6]>::try_from(bytes.as_slice()).ok()
        });
        Policy {
            // A new boot discards when any disk is volatile; `Client::reset` then keeps
            // the others (ResetScope::Boot).
            discards: self.mode == OverlayMode::Volatile
                || self.disks.iter().any(|d| d.mode == OverlayMode::Volatile),
            reset: self.reset,
            firmware_isid: self.firmware_isid.clone(),
            mac,
            reboot_gap_ms: reboot_gap.as_millis() as u64,
        }
    }

    /// The initiator name a boot script sets for this binding.
    pub fn script_initiator(&self) -> Option<String> {
        match (&self.initiator, &self.mac) {
            (Some(i), _) if !i.contains(['*', '?', '[', '{']) => Some(i.to_ascii_lowercase()),
            (None, Some(mac)) => Some(mac_initiator(mac)),
            _ => None,
        }
    }
}

/// The initiator name of a client known only by its MAC address.
pub fn mac_initiator(mac: &str) -> String {
    let hex: String = parse_mac(mac)
        .unwrap_or_else(|_| mac.to_string())
        .replace(':', "");
    format!("iqn.2026-11.org.diskless:mac-{hex}")
}

/// Why a client disk could not be attached (the session layer maps it to a login status).
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("no binding for initiator {0}")]
    NoBinding(String),
    #[error("image {image} is in direct mode for {holder}")]
    DirectBusy { image: String, holder: String },
    #[error("{0}")]
    Storage(String),
    /// The client's shared disk (RBD) cannot be served here: this node cannot confirm it
    /// owns the client, or the store failed. The login is refused; the initiator may retry.
    #[error("{0}")]
    Unavailable(String),
}

/// Mutable bookkeeping of one client: its lifecycle (durable part in `lifecycle.yaml`).
#[derive(Debug)]
struct ClientState {
    lifecycle: Lifecycle,
    policy: Policy,
    /// Handles for the model's sessions (never reused within a process).
    next_session: u64,
    /// The lifecycle record last sent to the cluster, or taken from it (`record`).
    shared: Option<record::ClientRecord>,
}

/// One client disk: a binding made concrete for one initiator.
pub struct Client {
    pub initiator: String,
    pub target: String,
    /// Swapped only at a new boot (a volatile client moving to its binding's new version,
    /// a next-boot override taken).
    disk: RwLock<Disk>,
    /// The disk the binding (or the operator's override) names now, when it is not the one
    /// booted: taken at the client's next boot, never mid-boot (`nextboot::taken_at_boot`).
    next: Mutex<Option<Next>>,
    /// The client's directory (overlays of each version, boot state).
    client_dir: PathBuf,
    luns: Mutex<Arc<LunTable>>,
    state: Mutex<ClientState>,
    state_path: PathBuf,
    serial: String,
    naa: [u8; 16],
    /// LUN 1 and up.
    extra: Vec<ExtraDisk>,
    /// What the next [`Client::reset`] discards (set by the operator's reset).
    reset_scope: Mutex<Option<ResetScope>>,
    /// The RBD image of LUN 0 when it is a shared disk.
    shared_name: Option<String>,
    /// In a cluster: where changed lifecycle records go (set at the first placed login).
    sink: std::sync::OnceLock<Arc<dyn record::RecordSink>>,
    /// Replaced by a new object of the same client (its disks in RBD recreated): this one
    /// no longer saves the boot state nor resets disks (late session ends, a reset racing
    /// the new attach).
    retired: AtomicBool,
}

/// What `Client::info` reports (operator commands, the API).
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub initiator: String,
    pub target: String,
    pub image: String,
    /// The version booted (versioned images), and the one the next boot takes if different.
    pub version: Option<u64>,
    pub next_version: Option<u64>,
    pub mode: OverlayMode,
    /// The disk the next boot takes when it is another one (`name` or `name@N`, mode).
    pub next_disk: Option<(String, OverlayMode)>,
    /// The operator's next-boot override (filled by [`BootTarget::info`]).
    pub next_boot: Option<NextBoot>,
    pub reset_policy: ResetPolicy,
    pub sessions: u32,
    /// Boots seen (every mode), and discards of the disk (volatile mode, operator resets).
    pub boots: u64,
    pub resets: u64,
    pub phase: Phase,
    pub firmware_isids: Vec<String>,
    pub os_isids: Vec<String>,
    pub last_activity_ms: u64,
    pub last_reset_reason: Option<String>,
    /// LUNs whose disk in RBD an operator's reset discarded, recreated at the client's next
    /// login (ascending; empty: none pending).
    pub rbd_recreate_pending: Vec<u16>,
    pub committed: bool,
    /// Oldest first: every reset and every keep with its reason.
    pub history: Vec<HistoryEntry>,
    pub overlay: Option<OverlayStats>,
    pub overlay_dir: Option<PathBuf>,
    /// Every disk, LUN 0 first.
    pub disks: Vec<DiskInfo>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wall-clock time for the model (milliseconds since the Unix epoch): durable state is
/// compared across server restarts, so not a monotonic clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn isid_hex(isid: &[u8; 6]) -> String {
    isid.iter().map(|b| format!("{b:02x}")).collect()
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

impl Client {
    /// The image (version) this client's disk is on now.
    pub fn image(&self) -> Arc<GoldenImage> {
        read(&self.disk).image.clone()
    }

    /// The client's overlay, if its mode has one.
    pub fn overlay(&self) -> Option<Arc<Overlay>> {
        read(&self.disk).overlay.clone()
    }

    /// The mode of the disk the client is on.
    pub fn mode(&self) -> OverlayMode {
        read(&self.disk).mode
    }

    /// The binding (or override) now names `image` in `mode`: taken at the next boot if it
    /// is another disk.
    pub fn set_next(&self, image: Arc<GoldenImage>, mode: OverlayMode) {
        let same = {
            let d = read(&self.disk);
            d.image.id == image.id && d.mode == mode
        };
        *lock(&self.next) = (!same).then_some(Next { image, mode });
    }

    /// The binding now names `image` (same mode): taken at the next boot if it differs.
    pub fn set_next_image(&self, image: Arc<GoldenImage>) {
        self.set_next(image, self.mode());
    }

    /// What moving to the pending disk would be, if one is pending.
    fn pending_switch(&self) -> Option<Switch> {
        let next = lock(&self.next).clone()?;
        let d = read(&self.disk);
        Some(nextboot::switch(
            &disk_spec(&d.image, d.mode),
            &disk_spec(&next.image, next.mode),
        ))
    }

    /// A new boot takes the pending disk (`nextboot::taken_at_boot`): make the decision a
    /// reset, which moves the client to it ([`Client::reset`]).
    fn take_pending(&self, mut d: Decision) -> Decision {
        // LUN 0 is discarded at this boot when a reset is decided and it is volatile (a
        // reset decided for another volatile disk leaves a persistent LUN 0 alone).
        let discarded = d.reset && ResetScope::Boot.covers(0, self.mode());
        if d.new_boot && self.boot_takes_pending(discarded) {
            d.reset = true;
        }
        d
    }

    /// The disk record of the boot state (set once a boot took a disk other than the
    /// binding's).
    fn has_disk_record(&self) -> bool {
        lock(&self.state).lifecycle.state.disk.is_some()
    }

    /// The binding now names `disks` for LUN 1 and up: each takes its new version at the
    /// next boot (as LUN 0 does, [`Client::set_next_image`]).
    pub fn set_next_disks(&self, disks: &[DiskPlan]) {
        for x in &self.extra {
            if let Some(d) = disks.iter().find(|d| d.lun == x.lun) {
                let cur = read(&x.disk).image.clone();
                *lock(&x.next_image) = (d.image.id != cur.id).then(|| d.image.clone());
            }
        }
    }

    fn build_luns(&self) -> Arc<LunTable> {
        let mut table = BTreeMap::new();
        let d = read(&self.disk);
        table.insert(
            0u16,
            Arc::new(disk_lu(&d, &self.target, 0, &self.serial, self.naa)),
        );
        drop(d);
        for x in &self.extra {
            let d = read(&x.disk);
            table.insert(
                x.lun,
                Arc::new(disk_lu(&d, &self.target, x.lun, &x.serial, x.naa)),
            );
        }
        Arc::new(LunTable::new(table))
    }

    /// Whether LUN 0 is a shared disk (RBD): a persistent or install disk without overlay.
    fn shared_disk(&self) -> bool {
        let d = read(&self.disk);
        d.overlay.is_none() && matches!(d.mode, OverlayMode::Persistent | OverlayMode::Install)
    }

    /// Whether any of the client's shared disks (RBD, every LUN) is one another node fenced
    /// this node from: the client's disks are then all opened (and locked) again together.
    fn shared_disk_fenced(&self) -> bool {
        let lun0 = {
            let d = read(&self.disk);
            d.overlay.is_none() && d.mode != OverlayMode::Direct && d.image.store.fenced()
        };
        lun0 || self.extra.iter().any(ExtraDisk::fenced)
    }

    /// LUN numbers of this client's disks, ascending (LUN 0 first).
    pub fn lun_numbers(&self) -> Vec<u16> {
        std::iter::once(0)
            .chain(self.extra.iter().map(|x| x.lun))
            .collect()
    }

    /// The image and overlay of the disk on `lun`, if the client has one there.
    fn disk_of(&self, lun: u16) -> Option<(Arc<GoldenImage>, Option<Arc<Overlay>>, OverlayMode)> {
        if lun == 0 {
            let d = read(&self.disk);
            return Some((d.image.clone(), d.overlay.clone(), d.mode));
        }
        let x = self.extra.iter().find(|x| x.lun == lun)?;
        let d = read(&x.disk);
        Some((d.image.clone(), d.overlay.clone(), x.mode))
    }

    /// The LUN table sessions of this client use now.
    pub fn luns(&self) -> Arc<LunTable> {
        lock(&self.luns).clone()
    }

    /// Feed one event to the model, persist the state, log the decision with its evidence.
    fn event(&self, st: &mut ClientState, event: Event, now: u64) -> Decision {
        let what = event.to_string();
        let d = st.lifecycle.apply(&st.policy, event, now);
        if d.new_boot || d.reset || !d.close.is_empty() {
            tracing::info!(
                initiator = %self.initiator,
                target = %self.target,
                mode = %self.mode(),
                boot = st.lifecycle.state.boots,
                event = %what,
                verdict = d.verdict(),
                close = ?d.close.iter().map(isid_hex).collect::<Vec<_>>(),
                reason = %d.reason,
                "client lifecycle"
            );
        } else {
            tracing::debug!(initiator = %self.initiator, event = %what, reason = %d.reason, "client lifecycle");
        }
        self.persist(st);
        d
    }

    /// Save the boot state; in a cluster, then hand a changed lifecycle record to the sink
    /// (after the local durable write: the node's own state is never behind its record).
    fn persist(&self, st: &mut ClientState) {
        if self.retired.load(Ordering::SeqCst) {
            tracing::debug!(initiator = %self.initiator, "boot state of a replaced client object not saved");
            return;
        }
        let mut rec = None;
        if let Some(sink) = self.sink.get() {
            let now = now_ms();
            let r = record::ClientRecord::new(
                &self.target,
                &self.initiator,
                sink.node(),
                st.lifecycle.state.shared_seq + 1,
                now,
                self.disk_summary(),
                &st.lifecycle.state,
            );
            if r.differs(st.shared.as_ref()) {
                st.lifecycle.state.shared_seq = r.seq;
                rec = Some(r);
            }
        }
        if let Err(e) = state::save(&self.state_path, &st.lifecycle.state) {
            tracing::error!(initiator = %self.initiator, error = %e, "boot state not saved");
            return;
        }
        if let (Some(r), Some(sink)) = (rec, self.sink.get()) {
            st.shared = Some(r.clone());
            sink.send(r);
        }
    }

    /// In a cluster: send this client's lifecycle records to `sink` from now on (once; the
    /// first change, or this call if the record differs from the last one, writes).
    pub fn set_record_sink(&self, sink: Arc<dyn record::RecordSink>) {
        if self.sink.set(sink).is_ok() {
            let mut st = lock(&self.state);
            self.persist(&mut st);
        }
    }

    /// The client's disks (LUN 0, then its data disks) as the cluster's record names them.
    pub fn disk_summary(&self) -> record::DiskSummary {
        let d = read(&self.disk);
        record::DiskSummary {
            image: d.image.label(),
            version: d.image.version,
            mode: d.mode,
            lun0: lun_kind(&d, self.shared_name.as_ref()),
            luns: self.extra.iter().map(ExtraDisk::summary).collect(),
        }
    }

    /// Continue from a lifecycle state another node left (`record::taken_state`): the
    /// sessions this node still has of the client are forgotten by the model (stale: the
    /// client was served elsewhere since).
    fn take_state(&self, state: lifecycle::BootState, rec: record::ClientRecord) {
        let mut st = lock(&self.state);
        let (l, _) = Lifecycle::load(state, now_ms());
        st.lifecycle = l;
        st.shared = Some(rec);
        self.persist(&mut st);
    }

    /// A login of this client completed: the decision (reset, sessions to close) and the
    /// handle of the new session for [`Client::session_ended`].
    pub fn login(&self, isid: &[u8; 6], peer: IpAddr, keys: &[String]) -> (Decision, u64) {
        let mut st = lock(&self.state);
        st.next_session += 1;
        let session = st.next_session;
        let ev = Event::Login {
            session,
            isid: *isid,
            peer: peer.to_canonical(),
            keys: lifecycle::key_hint(keys),
        };
        let d = self.event(&mut st, ev, now_ms());
        // A pending disk (new version, override) is taken at a new boot.
        let mut d = self.take_pending(d);
        if d.new_boot
            && self
                .extra
                .iter()
                .any(|x| x.mode == OverlayMode::Readonly && lock(&x.next_image).is_some())
        {
            // An extra disk without an overlay (readonly) takes its new version at a new boot.
            d.reset = true;
        }
        if d.new_boot && self.mode() == OverlayMode::Install {
            tracing::warn!(initiator = %self.initiator, boot = st.lifecycle.state.boots,
                "install mode: the disk is kept across reboots until `diskless client commit`");
        }
        (d, session)
    }

    /// A session from [`Client::login`] ended.
    pub fn session_ended(&self, session: u64, how: End) {
        let mut st = lock(&self.state);
        self.event(&mut st, Event::SessionEnd { session, how }, now_ms());
    }

    /// Someone fetched this client's boot script from `from`.
    pub fn script_fetched(&self, from: IpAddr) -> Decision {
        let mut st = lock(&self.state);
        let from = from.to_canonical();
        let d = self.event(&mut st, Event::ScriptFetch { from }, now_ms());
        self.take_pending(d)
    }

    /// The operator discards the disk (`diskless client reset`); the caller closes the
    /// sessions named in the decision, then calls [`Client::reset`].
    pub fn operator_reset(&self) -> Decision {
        self.operator_reset_scope(ResetScope::Operator)
    }

    /// [`Client::operator_reset`] of what `scope` names (`--lun N`: one disk).
    pub fn operator_reset_scope(&self, scope: ResetScope) -> Decision {
        *lock(&self.reset_scope) = Some(scope);
        let rbd = self.shared_luns_covered(scope);
        let mut st = lock(&self.state);
        if !rbd.is_empty() {
            // Disks in RBD are recreated at the client's next attach (`recreate_pending`),
            // recorded with the reset in one durable write (and the cluster's record): a
            // restart, or another node taking the client over, applies it too.
            let r = &mut st.lifecycle.state.rbd_recreate;
            r.extend(rbd.iter().copied());
            r.sort_unstable();
            r.dedup();
            tracing::info!(initiator = %self.initiator, luns = ?rbd,
                "reset of client disks in Ceph RBD: each is removed and cloned again from its image's snapshot at the client's next login");
        }
        self.event(&mut st, Event::OperatorReset, now_ms())
    }

    /// The LUNs whose disk is in shared storage (RBD) that `scope` covers.
    fn shared_luns_covered(&self, scope: ResetScope) -> Vec<u16> {
        let lun0 =
            (self.shared_disk() && self.shared_name.is_some() && scope.covers(0, self.mode()))
                .then_some(0);
        lun0.into_iter()
            .chain(
                self.extra
                    .iter()
                    .filter(|x| x.shared_name.is_some() && scope.covers(x.lun, x.mode))
                    .map(|x| x.lun),
            )
            .collect()
    }

    /// The disks in RBD an operator's reset left to recreate (None: none), and the newest
    /// record of this client handed to the cluster's writer that carries them all.
    pub fn recreate_mark(&self) -> Option<RecreateMark> {
        let st = lock(&self.state);
        let luns = st.lifecycle.state.rbd_recreate.clone();
        if luns.is_empty() {
            return None;
        }
        // `shared` is the last record sent, or one taken from another node (not this node's
        // write: its writer never stores that number), or older than the mark when the
        // boot state could not be saved (persist sends nothing then).
        let record_seq = self
            .sink
            .get()
            .zip(st.shared.as_ref())
            .filter(|(sink, r)| {
                r.node == sink.node() && luns.iter().all(|l| r.state.rbd_recreate.contains(l))
            })
            .map(|(_, r)| r.seq);
        Some(RecreateMark { luns, record_seq })
    }

    /// Whether an operator's reset left disks in RBD to recreate (at the next attach).
    fn recreate_pending(&self) -> bool {
        !lock(&self.state).lifecycle.state.rbd_recreate.is_empty()
    }

    /// Discard the overlay and start with fresh SCSI state (the caller has closed the
    /// client's sessions). Clients without an overlay only get fresh SCSI state.
    /// A volatile client whose binding now names another version moves to it here: a new
    /// overlay on the new version replaces the old one (the old version stays readable for
    /// anyone still holding it; GC keeps versions in use).
    pub fn reset(&self) -> Result<(), String> {
        let scope = lock(&self.reset_scope).take().unwrap_or(ResetScope::Boot);
        let covered = scope.covers(0, self.mode());
        // A disk in RBD is not touched here: the operator's reset marked it to be recreated
        // at the client's next attach (`operator_reset_scope`, `BootTarget::attach_with`).
        let lun0_rbd = self.shared_disk() && self.shared_name.is_some();
        // At a new boot LUN 0 also moves when it takes a pending disk (a next-boot override,
        // or a new version where the disk has no overlay to keep).
        if (covered && !lun0_rbd) || (scope == ResetScope::Boot && self.boot_takes_pending(covered))
        {
            self.reset_lun0()?;
        }
        for x in &self.extra {
            if scope.covers(x.lun, x.mode) && x.shared_name.is_none() {
                reset_disk(
                    &self.initiator,
                    x.lun,
                    &x.disk,
                    &x.next_image,
                    &x.dir,
                    x.mode,
                )?;
            }
        }
        let fresh = self.build_luns();
        *lock(&self.luns) = fresh;
        let mut st = lock(&self.state);
        st.lifecycle.reset_done();
        self.persist(&mut st);
        Ok(())
    }

    /// Whether a new boot takes LUN 0's pending disk (`nextboot::taken_at_boot`);
    /// `discarded`: LUN 0 is discarded at this boot anyway.
    fn boot_takes_pending(&self, discarded: bool) -> bool {
        self.pending_switch()
            .is_some_and(|kind| nextboot::taken_at_boot(kind, discarded, self.overlay().is_some()))
    }

    /// LUN 0's part of a reset: move to a pending disk (another image or mode), or discard
    /// the overlay and take the pending version, if any.
    fn reset_lun0(&self) -> Result<(), String> {
        let next = lock(&self.next).take();
        if let Some(n) = next.clone() {
            if self.pending_kind(&n) == Switch::Disk {
                let res = self.switch_disk(n.clone());
                if res.is_err() {
                    // Tried again at the next reset or boot.
                    lock(&self.next).get_or_insert(n);
                }
                return res;
            }
        }
        let next = Mutex::new(next.map(|n| n.image));
        reset_disk(
            &self.initiator,
            0,
            &self.disk,
            &next,
            &self.client_dir,
            self.mode(),
        )
    }

    fn pending_kind(&self, n: &Next) -> Switch {
        let d = read(&self.disk);
        nextboot::switch(&disk_spec(&d.image, d.mode), &disk_spec(&n.image, n.mode))
    }

    /// Move to another disk (another image or mode) at a new boot: the old disk's sessions
    /// are closed. A volatile overlay is discarded as at any new boot; a persistent (or
    /// install) overlay is never discarded by a switch: it is moved, whole, to
    /// `kept/<ms>/` in the client's directory. The boot state records the new disk, so a
    /// restarted server reopens it.
    fn switch_disk(&self, n: Next) -> Result<(), String> {
        let now = now_ms();
        let mut kept = None;
        let mut restored = None;
        {
            let mut d = self.disk.write().unwrap_or_else(|p| p.into_inner());
            let from = format!("{} {}", d.image.label(), d.mode);
            if let Some(o) = d.overlay.clone() {
                let dir = o.dir().to_path_buf();
                if matches!(d.mode, OverlayMode::Persistent | OverlayMode::Install) {
                    o.flush()
                        .map_err(|e| format!("overlay {}: {e}", dir.display()))?;
                    let name = dir
                        .file_name()
                        .map_or_else(|| "disk".to_string(), |n| n.to_string_lossy().to_string());
                    let to = nextboot::kept_path(&self.client_dir, &name, now);
                    let parent = to.parent().unwrap_or(&self.client_dir).to_path_buf();
                    std::fs::create_dir_all(&parent)
                        .and_then(|()| std::fs::rename(&dir, &to))
                        .and_then(|()| nextboot::sync_dir(&parent))
                        .and_then(|()| nextboot::sync_dir(&self.client_dir))
                        .map_err(|e| {
                            format!("keeping {} at {}: {e}", dir.display(), to.display())
                        })?;
                    kept = Some(to);
                } else {
                    // Volatile: discarded, as at every new boot. A late flush of a session
                    // still holding it fails harmlessly on the missing directory.
                    o.reset().map_err(|e| e.to_string())?;
                    let _ = std::fs::remove_dir_all(&dir);
                }
                d.overlay = None;
            } else if d.mode == OverlayMode::Direct {
                d.image.store.flush().map_err(|e| e.to_string())?;
            }
            let overlay = match n.mode {
                OverlayMode::Volatile | OverlayMode::Persistent | OverlayMode::Install => {
                    let dir = self.client_dir.join(n.image.disk_dir_name());
                    if n.mode == OverlayMode::Volatile && dir.exists() {
                        std::fs::remove_dir_all(&dir).map_err(|e| e.to_string())?;
                    }
                    if n.mode != OverlayMode::Volatile {
                        restored = restore_kept(&self.client_dir, &self.initiator, &dir, &n.image);
                    }
                    let (o, _) = open_overlay(&dir, &n.image, n.mode).map_err(|e| e.to_string())?;
                    Some(Arc::new(o))
                }
                _ => None,
            };
            d.image = if n.mode == OverlayMode::Direct {
                direct_image(&n.image)?
            } else {
                n.image.clone()
            };
            d.overlay = overlay;
            d.mode = n.mode;
            tracing::info!(initiator = %self.initiator, from = %from,
                to = %format!("{} {}", n.image.label(), n.mode),
                kept = ?kept, "client moves to another disk at its new boot");
        }
        let fresh = self.build_luns();
        *lock(&self.luns) = fresh;
        let mut st = lock(&self.state);
        st.policy.discards = n.mode == OverlayMode::Volatile
            || self.extra.iter().any(|x| x.mode == OverlayMode::Volatile);
        st.lifecycle.reset_done();
        st.lifecycle.state.disk = Some(DiskRecord {
            image: n.image.label(),
            mode: n.mode,
        });
        let mut why = format!("now on {} in {} mode", n.image.label(), n.mode);
        if let Some(k) = &kept {
            why.push_str(&format!(
                " (the persistent disk is kept at {})",
                k.display()
            ));
        }
        if let Some(r) = &restored {
            why.push_str(&format!(
                " (its persistent disk kept at {} is back in use)",
                r.display()
            ));
        }
        st.lifecycle.note(now, "disk switched", &why);
        self.persist(&mut st);
        Ok(())
    }

    /// Whether the binding `b` names the disks this client has beyond LUN 0 (the same
    /// LUNs and modes, each on the same image or another version of it).
    pub fn same_disks(&self, b: &BindingPlan) -> bool {
        self.extra.len() == b.disks.len()
            && self.extra.iter().zip(&b.disks).all(|(x, d)| {
                let cur = read(&x.disk).image.clone();
                x.lun == d.lun
                    && x.mode == d.mode
                    && (cur.id == d.image.id
                        || (d.image.version.is_some() && d.image.name == cur.name))
            })
    }

    /// Live sessions of this client.
    pub fn sessions(&self) -> u32 {
        lock(&self.state).lifecycle.live_sessions() as u32
    }

    /// Change the binding's policy (configuration reload).
    pub fn set_policy(&self, policy: Policy) {
        lock(&self.state).policy = policy;
    }

    pub fn info(&self) -> ClientInfo {
        let next = lock(&self.next).clone();
        // Before the state lock below (disk_infos takes the disks' locks).
        let disks = self.disk_infos();
        let st = lock(&self.state);
        let b = &st.lifecycle.state;
        let image = self.image();
        ClientInfo {
            initiator: self.initiator.clone(),
            target: self.target.clone(),
            image: image.name.clone(),
            version: image.version,
            next_version: next
                .as_ref()
                .filter(|n| n.image.name == image.name)
                .and_then(|n| n.image.version),
            mode: self.mode(),
            // Only what a new boot takes (a persistent disk stays on its version).
            next_disk: next
                .filter(|n| {
                    let kind = nextboot::switch(
                        &disk_spec(&image, self.mode()),
                        &disk_spec(&n.image, n.mode),
                    );
                    nextboot::taken_at_boot(
                        kind,
                        self.mode() == OverlayMode::Volatile,
                        self.overlay().is_some(),
                    )
                })
                .map(|n| (n.image.label(), n.mode)),
            next_boot: None,
            reset_policy: st.policy.reset,
            sessions: st.lifecycle.live_sessions() as u32,
            boots: b.boots,
            resets: b.resets,
            phase: b.phase,
            firmware_isids: b.firmware_isids.clone(),
            os_isids: b.os_isids.clone(),
            last_activity_ms: b.last_activity_ms,
            last_reset_reason: b.last_reset_reason.clone(),
            rbd_recreate_pending: b.rbd_recreate.clone(),
            committed: b.committed,
            history: b.history.iter().cloned().collect(),
            overlay: self.overlay().map(|o| o.stats()),
            overlay_dir: self.overlay().map(|o| o.dir().to_path_buf()),
            disks,
        }
    }

    /// Every disk of this client, LUN 0 first.
    pub fn disk_infos(&self) -> Vec<DiskInfo> {
        let one = |lun: u16, d: &RwLock<Disk>, next_version: Option<u64>, mode| {
            let d = read(d);
            DiskInfo {
                lun,
                image: d.image.name.clone(),
                version: d.image.version,
                next_version,
                mode,
                overlay: d.overlay.as_ref().map(|o| o.stats()),
                overlay_dir: d.overlay.as_ref().map(|o| o.dir().to_path_buf()),
            }
        };
        let next0 = lock(&self.next).as_ref().and_then(|n| n.image.version);
        std::iter::once(one(0, &self.disk, next0, self.mode()))
            .chain(self.extra.iter().map(|x| {
                let next = lock(&x.next_image).as_ref().and_then(|i| i.version);
                one(x.lun, &x.disk, next, x.mode)
            }))
            .collect()
    }

    /// Write golden image + overlay into a new image file (the "update one client, publish
    /// it as the new golden image" workflow; the end of an `install`).
    pub fn commit_to(&self, path: &Path) -> Result<(), String> {
        self.commit_lun_to(0, path)
    }

    /// The RBD image of the disk on `lun` when it is a shared disk.
    fn shared_name_of(&self, lun: u16) -> Option<&str> {
        if lun == 0 {
            return self
                .shared_disk()
                .then_some(self.shared_name.as_deref())
                .flatten();
        }
        self.extra
            .iter()
            .find(|x| x.lun == lun)
            .and_then(|x| x.shared_name.as_deref())
    }

    /// Record a commit (or publish) of one of the client's disks in its lifecycle.
    fn note_committed(&self) {
        let mut st = lock(&self.state);
        self.event(&mut st, Event::Committed, now_ms());
    }

    /// For the disk on `lun` when it is in RBD: a read-only view of it as of now (an RBD
    /// snapshot, removed when the view is dropped), which a commit copies while the client
    /// keeps running. Ok(None): the disk is not in RBD.
    fn rbd_snapshot_of(&self, lun: u16) -> Result<Option<Box<dyn BlockStore>>, String> {
        let Some(name) = self.shared_name_of(lun) else {
            return Ok(None);
        };
        let (image, _, _) = self
            .disk_of(lun)
            .ok_or_else(|| format!("client {} has no LUN {lun}", self.initiator))?;
        if image.store.fenced() {
            return Err(format!(
                "client {}'s LUN {lun} is the RBD clone {name}, and this node cannot confirm it holds its lock (another node took the disk over, or Ceph is unreachable): commit it on the node that serves the client, with Ceph up",
                self.initiator
            ));
        }
        match image.store.snapshot() {
            Ok(Some(view)) => Ok(Some(view)),
            Ok(None) => Err(format!("the RBD clone {name} cannot be snapshotted")),
            Err(e) => Err(format!("snapshot of the RBD clone {name}: {e}")),
        }
    }

    /// [`Client::commit_to`] of the disk on `lun`.
    pub fn commit_lun_to(&self, lun: u16, path: &Path) -> Result<(), String> {
        if let Some(view) = self.rbd_snapshot_of(lun)? {
            crate::storage::copy_to_new_file(view.as_ref(), path).map_err(|e| e.to_string())?;
            drop(view);
            self.note_committed();
            return Ok(());
        }
        let (_, overlay, mode) = self
            .disk_of(lun)
            .ok_or_else(|| format!("client {} has no LUN {lun}", self.initiator))?;
        match &overlay {
            Some(o) => {
                o.flush().map_err(|e| e.to_string())?;
                o.commit_to(path).map_err(|e| e.to_string())?;
                self.note_committed();
                Ok(())
            }
            None => Err(format!(
                "client {} has no overlay on LUN {lun} ({mode} mode)",
                self.initiator
            )),
        }
    }
}

impl Client {
    /// Publish this client's disk as the next version of `image` (`diskless client commit
    /// CLIENT IMAGE`, docs/images.md): when the client is on a version of `image`, its
    /// overlay is frozen (one point in time, only the changed chunks copied) as a layer on
    /// that version; when `image` does not exist yet, the whole disk becomes its version 1.
    /// The client keeps running on its overlay.
    pub fn publish(
        &self,
        state_dir: &Path,
        image: &str,
        stamp: &versions::Stamp,
    ) -> Result<u64, String> {
        self.publish_lun(0, state_dir, image, stamp)
    }

    /// [`Client::publish`] of the disk on `lun`.
    pub fn publish_lun(
        &self,
        lun: u16,
        state_dir: &Path,
        image: &str,
        stamp: &versions::Stamp,
    ) -> Result<u64, String> {
        let images = versions::Images::new(state_dir);
        if let Some(view) = self.rbd_snapshot_of(lun)? {
            // An RBD disk is a clone of an image's snapshot, not a layer on one of this
            // node's versions: it can only become version 1 of a new image.
            if images.exists(image) {
                return Err(format!(
                    "client {}'s LUN {lun} is in RBD, not on a version of {image}: publish it under a new image name",
                    self.initiator
                ));
            }
            return self.publish_new(lun, &images, image, stamp, |to| {
                crate::storage::copy_to_new_file(view.as_ref(), to).map_err(|e| e.to_string())
            });
        }
        let (cur, overlay, mode) = self
            .disk_of(lun)
            .ok_or_else(|| format!("client {} has no LUN {lun}", self.initiator))?;
        let overlay = overlay.ok_or_else(|| {
            format!(
                "client {} has no overlay on LUN {lun} ({mode} mode)",
                self.initiator
            )
        })?;
        let v = if images.exists(image) {
            let parent = match cur.version {
                Some(v) if cur.name == image => v,
                _ => {
                    return Err(format!(
                        "client {} is on {}, not on a version of {image}: publish it under a \
                         new image name",
                        self.initiator,
                        cur.label()
                    ))
                }
            };
            images
                .commit_layer(image, parent, stamp, |w| overlay.freeze_into(w).map(|_| ()))
                .map_err(|e| e.to_string())?
        } else {
            overlay.flush().map_err(|e| e.to_string())?;
            return self.publish_new(lun, &images, image, stamp, |to| {
                overlay.commit_to(to).map_err(|e| e.to_string())
            });
        };
        self.note_committed();
        Ok(v)
    }

    /// Publish the whole disk on LUN `lun` as version 1 of the new image `image`; `copy`
    /// writes it, as of one point in time, into a new file.
    fn publish_new(
        &self,
        lun: u16,
        images: &versions::Images,
        image: &str,
        stamp: &versions::Stamp,
        copy: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<u64, String> {
        if !versions::valid_name(image) {
            return Err(format!(
                "{image:?} is not a valid image name (a-z 0-9 - _ .)"
            ));
        }
        let (cur, _, _) = self
            .disk_of(lun)
            .ok_or_else(|| format!("client {} has no LUN {lun}", self.initiator))?;
        let staging = images.staging_path(image).map_err(|e| e.to_string())?;
        let staged = staging.path.clone();
        let res = copy(&staged).and_then(|()| {
            images
                .create_from_file(image, &staged, cur.block_size, stamp)
                .map_err(|e| e.to_string())
        });
        let _ = std::fs::remove_file(&staged);
        res?;
        self.note_committed();
        Ok(1)
    }
}

/// The logical unit of one client disk: its overlay (or the shared image itself, readonly
/// and direct), identity stable per client and LUN.
fn disk_lu(d: &Disk, target: &str, lun: u16, serial: &str, naa: [u8; 16]) -> LogicalUnit {
    let store: Arc<dyn BlockStore> = match &d.overlay {
        Some(o) => o.clone(),
        None => d.image.store.clone(),
    };
    let identity = crate::scsi::LuIdentity {
        serial: serial.to_string(),
        naa,
        ..lu_identity(target, lun, None)
    };
    let opts = LuOptions {
        max_transfer_blocks: (32 << 20) / d.image.block_size.max(512),
        physical_block_exponent: crate::scsi::physical_exponent(
            d.image.block_size,
            d.image.physical_block_size,
        ),
        ..Default::default()
    };
    LogicalUnit::with_options(store, identity, opts)
}

/// Discard one disk's overlay (the caller has closed the client's sessions); a disk whose
/// binding now names another version moves to it: a new overlay on the new version
/// replaces the old one (the old version stays readable for anyone still holding it; GC
/// keeps versions in use). `dir` holds the disk's overlay directories.
fn reset_disk(
    initiator: &str,
    lun: u16,
    disk: &RwLock<Disk>,
    next_image: &Mutex<Option<Arc<GoldenImage>>>,
    dir: &Path,
    mode: OverlayMode,
) -> Result<(), String> {
    let next = lock(next_image).take();
    let old = read(disk).overlay.clone();
    if let Some(o) = &old {
        o.reset().map_err(|e| e.to_string())?;
    }
    if let Some(image) = next {
        // The disk is fresh: it moves to the version its binding names now (a volatile
        // client's new boot, an operator's reset of a persistent disk).
        let mut d = disk.write().unwrap_or_else(|p| p.into_inner());
        tracing::info!(initiator = %initiator, lun, from = %d.image.label(),
            to = %image.label(), "client disk moves to the version its binding names");
        if old.is_some() {
            // Sessions still hold the old LUN table (and so the old overlay) until they
            // end; the new overlay gets its own directory name.
            let old_dir = old.as_ref().map(|o| o.dir().to_path_buf());
            drop(old);
            d.overlay = None;
            let new_dir = dir.join(image.disk_dir_name());
            if let Some(od) = old_dir.filter(|od| *od != new_dir) {
                // The old overlay was reset (empty): remove it first, so a crash before
                // the new one exists leaves no disk, which the next attach creates on
                // the binding's version. A late flush of a session still holding the old
                // overlay fails harmlessly on the missing directory.
                let _ = std::fs::remove_dir_all(od);
            }
            let (o, _) = open_overlay(&new_dir, &image, mode).map_err(|e| e.to_string())?;
            d.overlay = Some(Arc::new(o));
        }
        d.image = image;
    }
    Ok(())
}

/// Open (or create) one disk of a client for its binding: `dir` holds the disk's overlay
/// directories. A persistent disk stays on the version it was made on (the binding's
/// version becomes its next one); volatile overlays of other versions are removed.
/// Returns the disk, its next image, and whether its overlay was created now.
fn open_disk(
    state_dir: &Path,
    initiator: &str,
    dir: &Path,
    binding_image: &Arc<GoldenImage>,
    mode: OverlayMode,
) -> Result<(Disk, Option<Arc<GoldenImage>>, bool), AttachError> {
    let mut image = binding_image.clone();
    let mut next_image = None;
    if matches!(mode, OverlayMode::Persistent | OverlayMode::Install) && image.version.is_some() {
        // A persistent disk stays on the version it was created on (docs/images.md).
        if let Some(v) = disk_version(dir, &image.name) {
            if Some(v) != image.version {
                let opened = GoldenImage::open_older(state_dir, dir, &image, v)
                    .map_err(AttachError::Storage)?;
                tracing::info!(initiator = %initiator, on = %opened.label(), binding = %image.label(),
                    "persistent disk stays on the version it was made on");
                next_image = Some(image);
                image = Arc::new(opened);
            }
        }
    }
    if image.version.is_some() && mode == OverlayMode::Volatile {
        // Volatile disks of other versions (left by a crash mid-switch) are garbage.
        for v in disk_versions(dir, &image.name) {
            if Some(v) != image.version {
                let _ =
                    std::fs::remove_dir_all(dir.join(dir_name(&format!("{}.v{v}", image.name))));
            }
        }
    }
    let mut created = false;
    let overlay = match mode {
        OverlayMode::Volatile | OverlayMode::Persistent | OverlayMode::Install => {
            let (o, new) = open_overlay(&dir.join(image.disk_dir_name()), &image, mode)?;
            created = new;
            Some(Arc::new(o))
        }
        _ => None,
    };
    Ok((
        Disk {
            image,
            mode,
            overlay,
        },
        next_image,
        created,
    ))
}

/// Versions of `image` that overlays in `STATE_DIR/clients` sit on (any mode: a volatile
/// client boots on it now, a persistent one stays on it). GC never removes these.
pub fn versions_in_use(state_dir: &Path, image: &str) -> BTreeMap<u64, u32> {
    let mut out = BTreeMap::new();
    let clients = state_dir.join("clients");
    for target in std::fs::read_dir(clients).into_iter().flatten().flatten() {
        for client in std::fs::read_dir(target.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            for v in disk_versions(&client.path(), image) {
                *out.entry(v).or_insert(0) += 1;
            }
            // Persistent disks kept by a next-boot switch still read through their version.
            let kept = client.path().join(nextboot::KEPT_DIR);
            for at in std::fs::read_dir(kept).into_iter().flatten().flatten() {
                for v in disk_versions(&at.path(), image) {
                    *out.entry(v).or_insert(0) += 1;
                }
            }
            // The client's other disks (LUN1, LUN2, ...).
            for sub in std::fs::read_dir(client.path())
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("LUN")))
            {
                for v in disk_versions(&sub.path(), image) {
                    *out.entry(v).or_insert(0) += 1;
                }
            }
        }
    }
    out
}

/// A boot target's bindings and clients.
pub struct BootTarget {
    pub name: String,
    pub bindings: Vec<BindingPlan>,
    pub default: Option<BindingPlan>,
    pub state_dir: PathBuf,
    /// Tie-breaker of the lifecycle model (`settings.reboot_gap_secs`).
    pub reboot_gap: Duration,
    /// The form of the client disks' NAA identifiers (`identity:` of the target).
    pub identity: crate::config::IdentityFormat,
    clients: DashMap<String, Arc<Client>>,
    /// The configuration's images (and the versions the bindings named at load), by name:
    /// what a next-boot override may name besides any versioned image.
    images: BTreeMap<String, Arc<GoldenImage>>,
    /// The operators' next-boot overrides, by lowercased initiator (from `next-boot.yaml`
    /// files at load, so they survive reloads and restarts).
    overrides: DashMap<String, Override>,
    /// One override change at a time per target (file and memory agree).
    override_lock: Mutex<()>,
    /// Where persistent and install disks of some images live outside the node (RBD).
    shared: Option<Arc<dyn crate::storage::SharedDisks>>,
    /// One attach at a time per client when disks may be shared: two opens of one RBD disk
    /// would fence each other (a login racing its boot script fetch).
    opening: DashMap<String, Arc<Mutex<()>>>,
}

/// An override and the image it names, resolved when it was set or loaded (None: the
/// binding's image, or an image that no longer exists).
#[derive(Clone)]
struct Override {
    nb: NextBoot,
    image: Option<Arc<GoldenImage>>,
}

/// A name safe as one directory component: initiator names come from the network, so no
/// separators, no "." or "..", and bounded length (a hash keeps long names distinct).
fn dir_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.') {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.chars().all(|c| c == '.') {
        out = format!("_{out}");
    }
    if out.len() > 120 {
        out.truncate(100);
        out.push('-');
        out.push_str(&crate::identity::default_serial(s, 0));
    }
    out
}

impl BootTarget {
    pub fn new(
        name: &str,
        bindings: Vec<BindingPlan>,
        default: Option<BindingPlan>,
        state_dir: PathBuf,
        reboot_gap: Duration,
    ) -> Self {
        BootTarget {
            name: name.to_string(),
            bindings,
            default,
            state_dir,
            reboot_gap,
            identity: crate::config::IdentityFormat::default(),
            clients: DashMap::new(),
            images: BTreeMap::new(),
            overrides: DashMap::new(),
            override_lock: Mutex::new(()),
            shared: None,
            opening: DashMap::new(),
        }
    }

    /// Persistent and install disks of the images `shared` holds live there (RBD).
    pub fn with_shared_disks(
        mut self,
        shared: Option<Arc<dyn crate::storage::SharedDisks>>,
    ) -> Self {
        self.shared = shared;
        self
    }

    /// The images a next-boot override may name (besides versioned images), and the
    /// overrides stored in the state directory.
    pub fn with_images(mut self, images: BTreeMap<String, Arc<GoldenImage>>) -> Self {
        self.images = images;
        let dir = self.state_dir.join("clients").join(dir_name(&self.name));
        let (all, bad) = nextboot::load_all(&dir);
        for e in bad {
            tracing::warn!(target = %self.name, error = %e, "next-boot override unreadable: ignored");
        }
        for nb in all {
            let image = match nb.image.as_deref().map(|s| self.resolve_image(s)) {
                Some(Ok(i)) => Some(i),
                Some(Err(e)) => {
                    tracing::warn!(initiator = %nb.initiator, error = %e,
                        "next-boot override names an image that cannot be opened: the binding's image is used");
                    None
                }
                None => None,
            };
            self.overrides
                .insert(nb.initiator.to_ascii_lowercase(), Override { nb, image });
        }
        self
    }

    /// An image by `name` (configured) or versioned spec (`name`, `name@N`, `name:channel`).
    pub fn resolve_image(&self, spec: &str) -> Result<Arc<GoldenImage>, NextBootError> {
        if let Some(i) = self.images.get(spec) {
            return Ok(i.clone());
        }
        GoldenImage::open_version(&self.state_dir, spec)
            .map(Arc::new)
            .map_err(|m| {
                NextBootError::UnknownImage(format!(
                    "image {spec:?} is neither in images: nor a versioned image: {m}"
                ))
            })
    }

    /// The operator's next-boot override of `initiator`, if any.
    pub fn next_boot(&self, initiator: &str) -> Option<NextBoot> {
        self.overrides
            .get(&initiator.to_ascii_lowercase())
            .map(|o| o.nb.clone())
    }

    /// Images the overrides name (image GC keeps them).
    pub fn override_images(&self) -> Vec<Arc<GoldenImage>> {
        self.overrides
            .iter()
            .filter_map(|o| o.image.clone())
            .collect()
    }

    /// The disk `initiator`'s next boot takes: its binding, with the override's image
    /// and mode in place of the binding's.
    pub fn effective(&self, initiator: &str) -> Option<(Arc<GoldenImage>, OverlayMode)> {
        let b = self.binding(initiator)?;
        let o = self.overrides.get(&initiator.to_ascii_lowercase());
        let image = o
            .as_ref()
            .and_then(|o| o.image.clone())
            .unwrap_or_else(|| b.image.clone());
        let mode = o.as_ref().and_then(|o| o.nb.mode).unwrap_or(b.mode);
        Some((image, mode))
    }

    /// A client's info with its override.
    pub fn info(&self, c: &Client) -> ClientInfo {
        let mut i = c.info();
        i.next_boot = self.next_boot(&c.initiator);
        i
    }

    /// Set or clear `initiator`'s next-boot override (stored durably first), then tell its
    /// disk, if open, what its next boot takes. Refused requests change nothing.
    pub fn set_next_boot(
        &self,
        initiator: &str,
        req: nextboot::Request,
        by: &str,
        now_ms: u64,
    ) -> Result<Option<NextBoot>, NextBootError> {
        let key = initiator.to_ascii_lowercase();
        let binding = self.binding(&key).ok_or_else(|| {
            NextBootError::Invalid(format!("no binding of {} covers {initiator}", self.name))
        })?;
        let path = self.client_dir(&key).join(nextboot::FILE);
        let _one = lock(&self.override_lock);
        match req {
            nextboot::Request::Clear => {
                nextboot::remove(&path)?;
                self.overrides.remove(&key);
            }
            nextboot::Request::Set { image, mode } => {
                let resolved = image
                    .as_deref()
                    .map(|s| self.resolve_image(s))
                    .transpose()?;
                let eff_image = resolved.clone().unwrap_or_else(|| binding.image.clone());
                let eff_mode = mode.unwrap_or(binding.mode);
                if eff_mode == OverlayMode::Direct {
                    if eff_image.version.is_some() {
                        return Err(NextBootError::Refused(format!(
                            "image {} is versioned: versions are immutable, direct mode \
                             writes the image itself (use persistent and `diskless client commit`)",
                            eff_image.label()
                        )));
                    }
                    // One writer of a golden image at a time.
                    let holder = self.clients().into_iter().find(|c| {
                        c.initiator != key
                            && c.mode() == OverlayMode::Direct
                            && c.image().name == eff_image.name
                    });
                    if let Some(h) = holder {
                        return Err(NextBootError::Refused(format!(
                            "image {} is in direct mode for {}",
                            eff_image.name, h.initiator
                        )));
                    }
                }
                let nb = NextBoot {
                    initiator: key.clone(),
                    image,
                    mode,
                    since_ms: now_ms,
                    by: by.to_string(),
                };
                nextboot::save(&path, &nb)?;
                self.overrides.insert(
                    key.clone(),
                    Override {
                        nb,
                        image: resolved,
                    },
                );
            }
        }
        if let (Some(c), Some((image, mode))) = (self.client(&key), self.effective(&key)) {
            c.set_next(image, mode);
        }
        Ok(self.next_boot(&key))
    }

    /// The binding of `initiator`, if any (first match, then the default).
    pub fn binding(&self, initiator: &str) -> Option<&BindingPlan> {
        self.bindings
            .iter()
            .find(|b| b.matches(initiator))
            .or(self.default.as_ref())
    }

    /// The directory of `initiator`'s disks and boot state.
    pub fn client_dir(&self, initiator: &str) -> PathBuf {
        self.state_dir
            .join("clients")
            .join(dir_name(&self.name))
            .join(dir_name(initiator))
    }

    /// Where the overlay of `initiator` on `image` lives.
    pub fn overlay_dir(&self, initiator: &str, image: &str) -> PathBuf {
        self.client_dir(initiator).join(dir_name(image))
    }

    /// Existing client, if any.
    pub fn client(&self, initiator: &str) -> Option<Arc<Client>> {
        self.clients
            .get(&initiator.to_ascii_lowercase())
            .map(|c| c.clone())
    }

    pub fn clients(&self) -> Vec<Arc<Client>> {
        let mut v: Vec<_> = self.clients.iter().map(|c| c.clone()).collect();
        v.sort_by(|a, b| a.initiator.cmp(&b.initiator));
        v
    }

    /// Keep a client built by an earlier registry (configuration reload) if its binding is
    /// unchanged: its overlay is open and its sessions are live.
    /// A client whose disk came from (or will change by) a next-boot override is always
    /// kept: it stays on its disk until its next boot, which takes the override (or, once
    /// cleared, the binding).
    pub fn adopt(&self, old: &BootTarget) {
        for c in old.clients() {
            let (Some(b), Some((image, mode))) =
                (self.binding(&c.initiator), self.effective(&c.initiator))
            else {
                continue;
            };
            let cur = c.image();
            let cur_mode = c.mode();
            let fits = |i: &GoldenImage, m: OverlayMode| {
                let same_series = i.version.is_some() && i.name == cur.name;
                (i.id == cur.id || same_series) && m == cur_mode
            };
            let overridden = self.overrides.contains_key(&c.initiator) || c.has_disk_record();
            if (fits(&b.image, b.mode) || fits(&image, mode) || overridden) && c.same_disks(b) {
                // Same image, maybe another version: the client keeps the version it
                // booted until its next boot.
                let mut policy = b.policy(self.reboot_gap);
                policy.discards = cur_mode == OverlayMode::Volatile
                    || b.disks.iter().any(|d| d.mode == OverlayMode::Volatile);
                c.set_policy(policy);
                c.set_next(image, mode);
                c.set_next_disks(&b.disks);
                self.clients.insert(c.initiator.to_ascii_lowercase(), c);
            }
        }
    }

    /// In a cluster, before a login or boot script fetch placed on this node is served:
    /// continue `initiator`'s lifecycle from the cluster's record if another node served it
    /// since (`record::should_take`): its boot count, phase, pending reset and the disk an
    /// override put it on go on here instead of starting afresh. Returns whether the record
    /// was taken.
    pub fn take_over(&self, initiator: &str, rec: record::ClientRecord, me: &str) -> bool {
        let key = initiator.to_ascii_lowercase();
        let path = self.client_dir(&key).join(state::FILE);
        let client = self.clients.get(&key).map(|c| c.clone());
        let local = match &client {
            Some(c) => Some(lock(&c.state).lifecycle.state.clone()),
            None => match state::load(&path) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(initiator = %key, error = %e, "boot state unreadable: the cluster's record is taken");
                    None
                }
            },
        };
        if !record::should_take(&rec, me, local.as_ref()) {
            return false;
        }
        let now = now_ms();
        let st = record::taken_state(&rec, local.as_ref(), now);
        tracing::info!(initiator = %key, target = %self.name, from = %rec.node, seq = rec.seq,
            boots = st.boots, phase = %st.phase, reset_pending = st.reset_pending,
            disk = %rec.disk.image, "client lifecycle taken over from the cluster's record");
        match client {
            // Sessions open here (a node that was paused while the client moved on), or the
            // disk the record names is the one open here: the disk stays (a shared disk
            // another node fenced is opened again by the attach), the lifecycle continues
            // from the record.
            Some(c)
                if c.sessions() > 0 || {
                    let d = c.disk_summary();
                    d.image == rec.disk.image && d.mode == rec.disk.mode
                } =>
            {
                c.take_state(st, rec)
            }
            Some(c) => {
                // Reopened from the state below, on the disk the record names.
                self.clients.remove_if(&key, |_, v| Arc::ptr_eq(v, &c));
                if let Err(e) = state::save(&path, &st) {
                    tracing::error!(initiator = %key, error = %e, "boot state not saved");
                }
            }
            None => {
                if let Err(e) = state::save(&path, &st) {
                    tracing::error!(initiator = %key, error = %e, "boot state not saved");
                }
            }
        }
        true
    }

    /// Apply the reset `client`'s lifecycle decided ([`Client::reset`]), one at a time with
    /// the client's attaches: a client object an attach replaced meanwhile (its disks in
    /// RBD recreated) is skipped, the new one applied the pending reset when it opened.
    pub fn reset_client(&self, client: &Client) -> Result<(), String> {
        let key = client.initiator.to_ascii_lowercase();
        let one = self
            .shared
            .as_ref()
            .map(|_| self.opening.entry(key.clone()).or_default().clone());
        let _one = one.as_deref().map(lock);
        if client.retired.load(Ordering::SeqCst) {
            tracing::info!(initiator = %key, "reset already applied by the client's new attach");
            return Ok(());
        }
        client.reset()
    }

    /// The client disk of `initiator`, created on first use. A shared disk (RBD) is not
    /// opened here (see [`BootTarget::attach_with`]).
    pub fn attach(&self, initiator: &str) -> Result<Arc<Client>, AttachError> {
        self.attach_with(initiator, &|| {
            Err("a shared disk is opened only by a login or boot script fetch placed on the client's owner node".to_string())
        })
    }

    /// As [`BootTarget::attach`], for a login: `may_lock` says whether this node may open
    /// and lock the client's shared disk, fencing its previous holder (it owns the client).
    pub fn attach_with(
        &self,
        initiator: &str,
        may_lock: crate::storage::LockGuard<'_>,
    ) -> Result<Arc<Client>, AttachError> {
        let key = initiator.to_ascii_lowercase();
        let one = self
            .shared
            .as_ref()
            .map(|_| self.opening.entry(key.clone()).or_default().clone());
        let _one = one.as_deref().map(lock);
        if let Some(c) = self.clients.get(&key).map(|c| c.clone()) {
            if c.recreate_pending() {
                // Only the client's owner recreates (and an operator command's attach of a
                // client not open here never does): the client stays as it is otherwise.
                may_lock().map_err(|why| {
                    AttachError::Unavailable(format!(
                        "client {key}'s disks in RBD are to be recreated (an operator's reset) \
                         and this node cannot confirm it owns the client: {why}"
                    ))
                })?;
                // An operator's reset of its disks in RBD: they are recreated below, and the
                // client opened anew from its boot state; this object is done with.
                tracing::info!(initiator = %key, "the client's disks in RBD are recreated (an operator's reset): opening them again");
                c.retired.store(true, Ordering::SeqCst);
                self.clients.remove_if(&key, |_, v| Arc::ptr_eq(v, &c));
            } else if !c.shared_disk_fenced() {
                return Ok(c);
            } else {
                // This node lost the lock of the client's shared disk (RBD): another node
                // fenced it, or Ceph was unreachable long enough for librbd to drop it. Its
                // sessions here can only fail; the disk is opened (and locked) again.
                tracing::warn!(initiator = %key, "the client's shared disk lost its lock (fenced by another node, or Ceph unreachable): opening it again");
                self.clients.remove_if(&key, |_, v| Arc::ptr_eq(v, &c));
            }
        }
        let binding = self
            .binding(initiator)
            .ok_or_else(|| AttachError::NoBinding(initiator.to_string()))?;
        // The durable boot state: a restarted server decides exactly like the running one.
        let state_path = self.client_dir(&key).join(state::FILE);
        let saved = match state::load(&state_path) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(initiator = %key, error = %e, "boot state unreadable: starting a new one");
                None
            }
        };
        // The disk a boot took other than the binding's (a next-boot override): the client
        // is on it until its next boot, across restarts.
        let mut image = binding.image.clone();
        let mut mode = binding.mode;
        let mut recorded = false;
        if let Some(r) = saved.as_ref().and_then(|s| s.disk.as_ref()) {
            match self.resolve_image(&r.image) {
                Ok(i) => {
                    image = i;
                    mode = r.mode;
                    recorded = true;
                }
                Err(e) => tracing::warn!(initiator = %key, error = %e,
                    "the disk this client was on cannot be opened: back to its binding"),
            }
        }
        if mode == OverlayMode::Direct {
            // One writer of a golden image at a time (it is the image itself).
            if let Some(other) = self.clients.iter().find(|c| {
                c.mode() == OverlayMode::Direct && c.image().name == image.name && c.sessions() > 0
            }) {
                return Err(AttachError::DirectBusy {
                    image: image.name.clone(),
                    holder: other.initiator.clone(),
                });
            }
        }
        if mode == OverlayMode::Direct && image.version.is_some() {
            return Err(AttachError::Storage(format!(
                "image {} is versioned: versions are immutable, use install or persistent \
                 mode and `diskless client commit`",
                image.label()
            )));
        }
        let client_dir = self.client_dir(&key);
        let mut next_image = None;
        if !recorded
            && matches!(mode, OverlayMode::Persistent | OverlayMode::Install)
            && image.version.is_some()
        {
            // A persistent disk stays on the version it was created on (docs/images.md).
            if let Some(v) = disk_version(&client_dir, &image.name) {
                if Some(v) != image.version {
                    let opened = GoldenImage::open_older(&self.state_dir, &client_dir, &image, v)
                        .map_err(AttachError::Storage)?;
                    tracing::info!(initiator = %key, on = %opened.label(), binding = %image.label(),
                        "persistent disk stays on the version it was made on");
                    next_image = Some(image);
                    image = Arc::new(opened);
                }
            }
        }
        let dir = client_dir.join(image.disk_dir_name());
        if image.version.is_some() && mode == OverlayMode::Volatile {
            // Volatile disks of other versions (left by a crash mid-switch) are garbage.
            for v in disk_versions(&client_dir, &image.name) {
                if Some(v) != image.version {
                    let _ = std::fs::remove_dir_all(
                        client_dir.join(dir_name(&format!("{}.v{v}", image.name))),
                    );
                }
            }
        }
        // Disks in RBD an operator's reset discarded: removed now, before they are opened
        // (cloned again). A failure refuses the attach (the disk stays as it was); the next
        // attach tries again.
        let recreate: Vec<u16> = saved
            .as_ref()
            .map(|s| s.rbd_recreate.clone())
            .unwrap_or_default();
        let recreate_disk = |sh: &Arc<dyn crate::storage::SharedDisks>, lun: u16, image: &str| {
            if !recreate.contains(&lun) {
                return Ok(());
            }
            sh.recreate(&self.name, &key, lun, image, may_lock)
                .map(drop)
                .map_err(|e| {
                    if !matches!(e, crate::storage::SharedDiskError::NotOwner { .. }) {
                        tracing::warn!(initiator = %key, lun, error = %e,
                            "the operator's reset of the client disk in RBD failed: the disk is left as it was, the login refused; tried again at the next one");
                    }
                    AttachError::Unavailable(e.to_string())
                })
        };
        let mut created = false;
        let mut shared_name = None;
        // A persistent or install disk in shared storage (RBD): the whole client disk is
        // there, locked by this node; no overlay on the node's disk.
        let shared = match &self.shared {
            Some(sh)
                if matches!(mode, OverlayMode::Persistent | OverlayMode::Install)
                    && sh.holds(&image.name) =>
            {
                shared_name = sh.disk_name(&self.name, &key, 0);
                recreate_disk(sh, 0, &image.name)?;
                let (store, new) = sh
                    .open(
                        &self.name,
                        &key,
                        0,
                        &image.name,
                        image.store.size(),
                        image.block_size,
                        may_lock,
                    )
                    .map_err(|e| AttachError::Unavailable(e.to_string()))?;
                created = new;
                Some(store)
            }
            _ => None,
        };
        let in_shared = shared.is_some();
        if let Some(store) = shared {
            image = on_store(&image, store);
        } else if matches!(mode, OverlayMode::Persistent | OverlayMode::Install) {
            // Its disk was kept by a switch that a crash interrupted before the new disk
            // existed: back in place (the next boot switches again).
            restore_kept(&client_dir, &key, &dir, &image);
        }
        let overlay = match mode {
            _ if in_shared => None,
            OverlayMode::Volatile | OverlayMode::Persistent | OverlayMode::Install => {
                let (o, new) = open_overlay(&dir, &image, mode)?;
                created = new;
                Some(Arc::new(o))
            }
            _ => None,
        };
        // Per-client identity: Windows refuses two disks with one NAA id or serial, and the
        // identity must stay the same across the client's reboots (per LUN).
        let who = format!("{}\0{}", self.name, key);
        let mut extra = Vec::with_capacity(binding.disks.len());
        for d in &binding.disks {
            let dir = client_dir.join(lun_dir_name(d.lun));
            let mut lun_shared = None;
            let (disk, next, new) = match &self.shared {
                // A persistent or install data disk in shared storage (RBD): its own clone,
                // opened and locked with LUN 0's (a take-over fences them all).
                Some(sh)
                    if matches!(d.mode, OverlayMode::Persistent | OverlayMode::Install)
                        && sh.holds(&d.image.name) =>
                {
                    lun_shared = sh.disk_name(&self.name, &key, d.lun);
                    recreate_disk(sh, d.lun, &d.image.name)?;
                    let (store, new) = sh
                        .open(
                            &self.name,
                            &key,
                            d.lun,
                            &d.image.name,
                            d.image.store.size(),
                            d.image.block_size,
                            may_lock,
                        )
                        .map_err(|e| AttachError::Unavailable(e.to_string()))?;
                    let disk = Disk {
                        image: on_store(&d.image, store),
                        mode: d.mode,
                        overlay: None,
                    };
                    (disk, None, new)
                }
                _ => open_disk(&self.state_dir, &key, &dir, &d.image, d.mode)?,
            };
            // The first boot has nothing to discard only when every overlay is new.
            created &= new || disk.overlay.is_none();
            extra.push(ExtraDisk {
                lun: d.lun,
                mode: d.mode,
                disk: RwLock::new(disk),
                next_image: Mutex::new(next),
                dir,
                serial: crate::identity::default_serial(&who, d.lun),
                naa: crate::identity::naa_in(self.identity, &who, d.lun),
                shared_name: lun_shared,
            });
        }
        let fresh_state = saved.is_none();
        let mut boot_state = saved.unwrap_or_default();
        if created {
            // A new overlay is the golden image: the first boot has nothing to discard.
            boot_state.fresh = true;
        }
        let (lifecycle, _) = Lifecycle::load(boot_state, now_ms());
        let image_for_client = if mode == OverlayMode::Direct {
            direct_image(&image).map_err(AttachError::Storage)?
        } else {
            image
        };
        let mut policy = binding.policy(self.reboot_gap);
        policy.discards = mode == OverlayMode::Volatile
            || binding
                .disks
                .iter()
                .any(|d| d.mode == OverlayMode::Volatile);
        let client = Client {
            initiator: key.clone(),
            target: self.name.clone(),
            disk: RwLock::new(Disk {
                image: image_for_client,
                mode,
                overlay,
            }),
            next: Mutex::new(None),
            client_dir,
            luns: Mutex::new(Arc::new(LunTable::new(BTreeMap::new()))),
            state: Mutex::new(ClientState {
                lifecycle,
                policy,
                next_session: 0,
                shared: None,
            }),
            state_path,
            serial: crate::identity::default_serial(&who, 0),
            naa: crate::identity::naa_in(self.identity, &who, 0),
            extra,
            reset_scope: Mutex::new(None),
            shared_name,
            sink: std::sync::OnceLock::new(),
            retired: AtomicBool::new(false),
        };
        let fresh = client.build_luns();
        *lock(&client.luns) = fresh;
        // What the next boot takes: the binding with the operator's override, or the
        // binding's version a persistent disk did not move to.
        match self.effective(&key) {
            Some((i, m)) => client.set_next(i, m),
            None => {
                if let Some(i) = next_image {
                    client.set_next(i, mode);
                }
            }
        }
        if !recreate.is_empty() {
            // Done (a LUN whose disk is no longer in RBD has nothing to recreate).
            let mut st = lock(&client.state);
            st.lifecycle.state.rbd_recreate.clear();
            client.persist(&mut st);
        }
        {
            let pending = lock(&client.state).lifecycle.state.reset_pending;
            if pending {
                // Decided before a crash, not yet applied: no session can have seen the disk
                // since (the new boot's login was never answered).
                tracing::info!(initiator = %key, "applying a reset decided before the server stopped");
                // Without volatile disks only the operator resets: LUN 0 as before. With
                // some, the reset may have been a boot's: discard only what a boot does.
                let discards = lock(&client.state).policy.discards;
                let scope = if discards {
                    ResetScope::Boot
                } else {
                    ResetScope::Operator
                };
                *lock(&client.reset_scope) = Some(scope);
                client.reset().map_err(AttachError::Storage)?;
            } else {
                let mut st = lock(&client.state);
                if fresh_state || st.lifecycle.state.interrupted {
                    client.persist(&mut st);
                }
            }
        }
        let client = Arc::new(client);
        // Two logins racing: keep whichever got in first.
        Ok(self.clients.entry(key).or_insert(client).clone())
    }
}

/// `image` served from `store` (a client's disk in shared storage) under the same name and id.
fn on_store(image: &GoldenImage, store: Arc<dyn crate::storage::BlockStore>) -> Arc<GoldenImage> {
    Arc::new(GoldenImage {
        name: image.name.clone(),
        path: image.path.clone(),
        block_size: image.block_size,
        physical_block_size: image.physical_block_size,
        store,
        id: image.id.clone(),
        version: image.version,
        older: image.older.clone(),
    })
}

/// Coming back to a persistent disk this client left: the newest kept one of `image`
/// goes back in place (`dir`), unless a disk is there already or it no longer fits the
/// image (its golden image changed: it stays kept, a new disk is made). Returns where
/// it was kept.
fn restore_kept(
    client_dir: &Path,
    initiator: &str,
    dir: &Path,
    image: &GoldenImage,
) -> Option<PathBuf> {
    if dir.join("overlay.meta").exists() {
        return None;
    }
    let name = dir.file_name()?.to_str()?.to_string();
    let from = nextboot::newest_kept(client_dir, &name)?;
    if let Err(e) = Overlay::check_golden_id(&from, &image.id) {
        tracing::warn!(initiator = %initiator, kept = %from.display(), error = %e,
            "a kept persistent disk does not fit its image any more: it stays kept");
        return None;
    }
    if dir.exists() {
        // A create that crashed before its snapshot: nothing acknowledged in it.
        std::fs::remove_dir_all(dir).ok()?;
    }
    let moved = std::fs::rename(&from, dir)
        .and_then(|()| nextboot::sync_dir(client_dir))
        .and_then(|()| from.parent().map_or(Ok(()), nextboot::sync_dir));
    match moved {
        Ok(()) => {
            if let Some(p) = from.parent() {
                // The now empty kept/<ms>/ directory.
                let _ = std::fs::remove_dir(p);
            }
            tracing::info!(initiator = %initiator, kept = %from.display(),
                "the persistent disk this client left is back in use");
            Some(from)
        }
        Err(e) => {
            tracing::warn!(initiator = %initiator, kept = %from.display(), error = %e,
                "a kept persistent disk could not be put back: a new disk is made");
            None
        }
    }
}

/// Versions of `image` that have an overlay directory (`NAME.vN` with a snapshot) in a
/// client's directory, ascending.
pub fn disk_versions(client_dir: &Path, image: &str) -> Vec<u64> {
    let prefix = format!("{}.v", dir_name(image));
    let mut out: Vec<u64> = std::fs::read_dir(client_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("overlay.meta").exists())
        .filter_map(|e| {
            let n = e.file_name().to_str()?.to_string();
            n.strip_prefix(&prefix)?.parse().ok()
        })
        .collect();
    out.sort_unstable();
    out
}

/// The version a persistent disk of `image` sits on (the newest if several).
pub fn disk_version(client_dir: &Path, image: &str) -> Option<u64> {
    disk_versions(client_dir, image).last().copied()
}

/// Open (or create) the overlay of a client; true when it was created. A volatile overlay
/// that cannot be opened (made for another golden image, damaged) is simply recreated; a
/// persistent (or install) one is an error.
fn open_overlay(
    dir: &Path,
    image: &GoldenImage,
    mode: OverlayMode,
) -> Result<(Overlay, bool), AttachError> {
    let opts = || OverlayOptions {
        golden_id: Some(image.id.clone()),
        ..OverlayOptions::default()
    };
    // No snapshot: at most a create that crashed before its commit point; nothing in it was
    // ever acknowledged (writes start after the snapshot exists), so start over.
    if !dir.join("overlay.meta").exists() && dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| AttachError::Storage(e.to_string()))?;
    }
    if dir.join("overlay.meta").exists() {
        match Overlay::open_with_id(dir, image.store.clone(), Some(&image.id)) {
            Ok(o) => return Ok((o, false)),
            Err(e) if mode == OverlayMode::Volatile => {
                tracing::warn!(dir = %dir.display(), error = %e, "volatile overlay unusable: recreating");
                std::fs::remove_dir_all(dir).map_err(|e| AttachError::Storage(e.to_string()))?;
            }
            Err(e) => {
                return Err(AttachError::Storage(format!(
                    "overlay {}: {e}",
                    dir.display()
                )))
            }
        }
    }
    Overlay::create(dir, image.store.clone(), opts())
        .map(|o| (o, true))
        .map_err(|e| AttachError::Storage(format!("overlay {}: {e}", dir.display())))
}

/// Resolve the bindings of a boot target from the configuration.
pub fn plan_bindings(
    file: &str,
    path: &str,
    boot: &crate::config::BootConfig,
    images: &BTreeMap<String, Arc<GoldenImage>>,
) -> Result<(Vec<BindingPlan>, Option<BindingPlan>), ConfigError> {
    let image = |name: &str, p: String| {
        images.get(name).cloned().ok_or_else(|| {
            ConfigError::invalid(file, p, format!("image {name:?} is not in images:"))
        })
    };
    let disks = |list: &[DiskConfig], p: &str| -> Result<Vec<DiskPlan>, ConfigError> {
        list.iter()
            .map(|d| {
                Ok(DiskPlan {
                    lun: d.lun,
                    image: image(&d.image, format!("{p}.disks[lun {}].image", d.lun))?,
                    mode: d.mode,
                })
            })
            .collect()
    };
    let mut out = Vec::new();
    for (i, b) in boot.bindings.iter().enumerate() {
        let bp = format!("{path}.bindings[{i}]");
        let matcher = match &b.initiator {
            Some(p) => Some(
                globset::GlobBuilder::new(p)
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| {
                        ConfigError::invalid(file, format!("{bp}.initiator"), e.to_string())
                    })?
                    .compile_matcher(),
            ),
            None => None,
        };
        out.push(BindingPlan {
            initiator: b.initiator.clone(),
            matcher,
            image: image(&b.image, format!("{bp}.image"))?,
            mode: b.mode,
            mac: b
                .mac
                .as_deref()
                .map(|m| parse_mac(m).unwrap_or_else(|_| m.to_string())),
            uuid: b.uuid.as_ref().map(|u| u.to_ascii_lowercase()),
            chap: b.chap.as_ref().map(crate::login::ChapCredentials::from),
            reset: b.reset,
            firmware_isid: match &b.firmware_isid {
                Some(f) => {
                    Some(parse_isid_prefix(f).map_err(|m| {
                        ConfigError::invalid(file, format!("{bp}.firmware_isid"), m)
                    })?)
                }
                None => None,
            },
            disks: disks(&b.disks, &bp)?,
            os: b.os,
            gateway: b.gateway,
        });
    }
    let default = match &boot.default {
        Some(d) => Some(BindingPlan {
            initiator: Some("*".into()),
            matcher: None,
            image: image(&d.image, format!("{path}.default.image"))?,
            mode: d.mode,
            mac: None,
            uuid: None,
            chap: None,
            reset: d.reset,
            firmware_isid: None,
            disks: disks(&d.disks, &format!("{path}.default"))?,
            os: d.os,
            gateway: d.gateway,
        }),
        None => None,
    };
    Ok((out, default))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn firmware_isid() {
        assert!(is_firmware_isid(&[0x40, 0x00, 0x27, 0x23, 0x12, 0x34]));
        // open-iscsi: OUI format, 00:02:3d.
        assert!(!is_firmware_isid(&[0x00, 0x02, 0x3d, 0x00, 0x00, 0x01]));
    }

    #[test]
    fn mac_names() {
        assert_eq!(
            mac_initiator("52:54:00:AB:CD:EF"),
            "iqn.2026-11.org.diskless:mac-525400abcdef"
        );
        assert_eq!(
            dir_name("iqn.2010-04.org.ipxe:abc/.."),
            "iqn.2010-04.org.ipxe_abc_.."
        );
        assert_eq!(dir_name(".."), "_..");
        assert_eq!(dir_name(""), "_");
        assert!(dir_name(&"x".repeat(500)).len() <= 120);
    }

    /// Collects the records a client sends (the cluster's writer in a node).
    struct Sink(String, Mutex<Vec<record::ClientRecord>>);

    impl record::RecordSink for Sink {
        fn node(&self) -> &str {
            &self.0
        }
        fn send(&self, rec: record::ClientRecord) {
            lock(&self.1).push(rec);
        }
    }

    /// A shared disk in memory that a test can fence.
    struct FakeDisk(Arc<crate::storage::MemStore>, AtomicBool);

    impl crate::storage::BlockStore for FakeDisk {
        fn block_size(&self) -> u32 {
            self.0.block_size()
        }
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), crate::storage::StorageError> {
            self.0.read_at(buf, offset)
        }
        fn write_at(
            &self,
            data: &[u8],
            offset: u64,
            fua: bool,
        ) -> Result<(), crate::storage::StorageError> {
            self.0.write_at(data, offset, fua)
        }
        fn flush(&self) -> Result<(), crate::storage::StorageError> {
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), crate::storage::StorageError> {
            self.0.discard(offset, len)
        }
        fn thin_provisioned(&self) -> bool {
            false
        }
        fn allocation(&self, offset: u64) -> Result<(bool, u64), crate::storage::StorageError> {
            self.0.allocation(offset)
        }
        fn fenced(&self) -> bool {
            self.1.load(Ordering::SeqCst)
        }
        fn snapshot(
            &self,
        ) -> Result<Option<Box<dyn crate::storage::BlockStore>>, crate::storage::StorageError>
        {
            crate::storage::BlockStore::snapshot(self.0.as_ref())
        }
    }

    /// Shared disks (as RBD's) in memory: the opens per LUN, the disk last opened per LUN;
    /// each LUN's bytes stay across opens until a recreate removes them (zeroes again).
    #[derive(Default)]
    struct FakeShared(
        Mutex<Vec<(u16, Arc<FakeDisk>)>>,
        Mutex<BTreeMap<u16, Arc<crate::storage::MemStore>>>,
        /// The LUNs recreated, in order; and whether a recreate fails (the store refuses).
        Mutex<Vec<u16>>,
        AtomicBool,
    );

    impl crate::storage::SharedDisks for FakeShared {
        fn holds(&self, _image: &str) -> bool {
            true
        }
        fn disk_name(&self, _target: &str, initiator: &str, lun: u16) -> Option<String> {
            Some(format!("pool/{initiator}.lun{lun}"))
        }
        fn recreate(
            &self,
            _target: &str,
            _initiator: &str,
            lun: u16,
            _image: &str,
            may_lock: crate::storage::LockGuard<'_>,
        ) -> Result<bool, crate::storage::SharedDiskError> {
            may_lock().map_err(|why| crate::storage::SharedDiskError::NotOwner {
                disk: lun.to_string(),
                why,
            })?;
            if self.3.load(Ordering::SeqCst) {
                return Err(crate::storage::SharedDiskError::Failed {
                    disk: lun.to_string(),
                    reason: "not recreated: rbd_remove: busy".into(),
                });
            }
            lock(&self.2).push(lun);
            Ok(lock(&self.1).remove(&lun).is_some())
        }
        fn open(
            &self,
            _target: &str,
            _initiator: &str,
            lun: u16,
            _image: &str,
            size: u64,
            block_size: u32,
            may_lock: crate::storage::LockGuard<'_>,
        ) -> Result<(Arc<dyn crate::storage::BlockStore>, bool), crate::storage::SharedDiskError>
        {
            may_lock().map_err(|why| crate::storage::SharedDiskError::NotOwner {
                disk: lun.to_string(),
                why,
            })?;
            let mut stores = lock(&self.1);
            let new = !stores.contains_key(&lun);
            let store = stores
                .entry(lun)
                .or_insert_with(|| Arc::new(crate::storage::MemStore::new(size, block_size, false)))
                .clone();
            let d = Arc::new(FakeDisk(store, AtomicBool::new(false)));
            lock(&self.0).push((lun, d.clone()));
            Ok((d, new))
        }
    }

    #[test]
    fn shared_data_disks_are_opened_fenced_and_recorded_per_lun() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(FakeShared::default());
        let t = shared_target(dir.path(), "n", &shared);
        let who = "iqn.x:c1";
        let owner = || Ok(());
        assert!(t.attach(who).is_err(), "not opened without the owner check");
        let c = t.attach_with(who, &owner).unwrap();
        let luns: Vec<u16> = lock(&shared.0).iter().map(|(l, _)| *l).collect();
        assert_eq!(luns, vec![0, 1], "one shared disk per LUN");
        assert!(c.overlay().is_none());
        let sum = c.disk_summary();
        assert_eq!(
            sum.lun0,
            record::Lun0::Rbd {
                name: "pool/iqn.x:c1.lun0".into()
            }
        );
        assert_eq!(sum.luns.len(), 1);
        assert_eq!(sum.luns[0].lun, 1);
        assert_eq!(
            sum.luns[0].disk,
            record::Lun0::Rbd {
                name: "pool/iqn.x:c1.lun1".into()
            }
        );
        // Still held: the same client, nothing opened again.
        assert!(Arc::ptr_eq(&c, &t.attach_with(who, &owner).unwrap()));
        assert_eq!(lock(&shared.0).len(), 2);
        // LUN 1 alone fenced by another node: both disks are opened (and locked) again.
        lock(&shared.0)[1].1 .1.store(true, Ordering::SeqCst);
        let c2 = t.attach_with(who, &owner).unwrap();
        assert!(!Arc::ptr_eq(&c, &c2));
        let luns: Vec<u16> = lock(&shared.0).iter().map(|(l, _)| *l).collect();
        assert_eq!(luns, vec![0, 1, 0, 1]);
        // Commit of a disk in RBD copies a snapshot of it (the client keeps running); not
        // over an existing file, and not from a node whose lock was broken.
        write_lun(&c2, 1, 0x5a);
        let out = dir.path().join("x.img");
        c2.commit_lun_to(1, &out).unwrap();
        let copied = std::fs::read(&out).unwrap();
        assert_eq!(copied.len() as u64, 1 << 20);
        assert_eq!(copied[0], 0x5a);
        let e = c2.commit_lun_to(1, &out).unwrap_err();
        assert!(e.contains("exists already"), "{e}");
        lock(&shared.0)[3].1 .1.store(true, Ordering::SeqCst);
        let e = c2.commit_lun_to(1, &dir.path().join("y.img")).unwrap_err();
        assert!(
            e.contains(
                "RBD clone pool/iqn.x:c1.lun1, and this node cannot confirm it holds its lock"
            ),
            "{e}"
        );
    }

    /// A target (state in `dir/sub`) whose default binding puts LUN 0 and a persistent data
    /// disk (LUN 1) in `shared`.
    fn shared_target(dir: &Path, sub: &str, shared: &Arc<FakeShared>) -> BootTarget {
        let img = dir.join("base.img");
        std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
        let golden = Arc::new(GoldenImage::open("base", &img, 512).unwrap());
        let data = dir.join("data.img");
        std::fs::write(&data, vec![9u8; 1 << 20]).unwrap();
        let data = Arc::new(GoldenImage::open("data", &data, 512).unwrap());
        let plan = BindingPlan {
            initiator: None,
            matcher: None,
            image: golden,
            mode: OverlayMode::Persistent,
            mac: None,
            uuid: None,
            chap: None,
            reset: ResetPolicy::default(),
            firmware_isid: None,
            disks: vec![DiskPlan {
                lun: 1,
                image: data,
                mode: OverlayMode::Persistent,
            }],
            os: ClientOs::default(),
            gateway: GatewayPolicy::default(),
        };
        BootTarget::new(
            "iqn.t:boot",
            Vec::new(),
            Some(plan),
            dir.join(sub),
            Duration::from_secs(600),
        )
        .with_shared_disks(Some(shared.clone()))
    }

    fn write_lun(c: &Client, lun: u16, byte: u8) {
        let (image, _, _) = c.disk_of(lun).unwrap();
        image.store.write_at(&[byte; 512], 0, true).unwrap();
    }

    fn read_lun(c: &Client, lun: u16) -> u8 {
        let (image, _, _) = c.disk_of(lun).unwrap();
        let mut b = [0u8; 512];
        image.store.read_at(&mut b, 0).unwrap();
        b[0]
    }

    fn saved(c: &Client) -> lifecycle::BootState {
        state::load(&c.state_path).unwrap().unwrap()
    }

    #[test]
    fn reset_of_rbd_disks_recreates_them_at_the_next_attach() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(FakeShared::default());
        let t = shared_target(dir.path(), "a", &shared);
        let who = "iqn.x:c1";
        let owner = || Ok(());
        let not_owner = || Err("the lease ran out".to_string());
        let c = t.attach_with(who, &owner).unwrap();
        let sink = Arc::new(Sink("A".into(), Mutex::new(Vec::new())));
        c.set_record_sink(sink.clone());
        write_lun(&c, 0, 1);
        write_lun(&c, 1, 2);

        // `--lun 1`: marked to be recreated (boot state and record), nothing removed yet.
        let d = c.operator_reset_scope(ResetScope::Lun(1));
        assert!(d.reset);
        t.reset_client(&c).unwrap();
        assert!(lock(&shared.2).is_empty());
        assert_eq!(read_lun(&c, 1), 2, "the open disk is not touched");
        let st = saved(&c);
        assert_eq!(
            (st.rbd_recreate.clone(), st.reset_pending),
            (vec![1], false)
        );
        let rec = lock(&sink.1).last().cloned().unwrap();
        assert_eq!(
            rec.state.rbd_recreate,
            vec![1],
            "in the cluster's record too"
        );
        // What the reset waits for (the newest record sent carries the mark), and what
        // `client show` and the API show.
        assert_eq!(
            c.recreate_mark(),
            Some(RecreateMark {
                luns: vec![1],
                record_seq: Some(rec.seq)
            })
        );
        assert_eq!(c.info().rbd_recreate_pending, vec![1]);

        // Not the owner (any more): nothing removed, the login refused, the client as it was.
        let e = t.attach_with(who, &not_owner).err().unwrap();
        assert!(matches!(e, AttachError::Unavailable(_)), "{e}");
        assert!(lock(&shared.2).is_empty());
        assert!(Arc::ptr_eq(&c, &t.client(who).unwrap()));
        // The store refuses the remove: refused too, the disk as it was, still pending.
        shared.3.store(true, Ordering::SeqCst);
        let e = t.attach_with(who, &owner).err().unwrap();
        assert!(e.to_string().contains("busy"), "{e}");
        assert!(lock(&shared.2).is_empty());
        assert_eq!(saved(&c).rbd_recreate, vec![1]);
        shared.3.store(false, Ordering::SeqCst);

        // The next attach: LUN 1 removed and created again (the image's bytes: zeroes in the
        // fake), LUN 0 kept; the mark is cleared.
        let c2 = t.attach_with(who, &owner).unwrap();
        assert!(!Arc::ptr_eq(&c, &c2));
        assert_eq!(*lock(&shared.2), vec![1]);
        assert_eq!((read_lun(&c2, 0), read_lun(&c2, 1)), (1, 0));
        assert!(saved(&c2).rbd_recreate.is_empty());
        assert_eq!(c2.recreate_mark(), None);
        assert!(c2.info().rbd_recreate_pending.is_empty());
        // The replaced object saves nothing any more (a late session end), resets nothing.
        {
            let mut st = lock(&c.state);
            c.persist(&mut st);
        }
        assert!(saved(&c2).rbd_recreate.is_empty());
        t.reset_client(&c).unwrap();
        // Held: the same client, nothing recreated again.
        assert!(Arc::ptr_eq(&c2, &t.attach_with(who, &owner).unwrap()));
        assert_eq!(lock(&shared.2).len(), 1);

        // `diskless client reset` (LUN 0), and the server stops before applying it: the
        // reset and the LUN were saved in one write; the next start recreates LUN 0 alone.
        write_lun(&c2, 0, 3);
        write_lun(&c2, 1, 4);
        c2.operator_reset();
        let st = saved(&c2);
        assert_eq!((st.rbd_recreate.clone(), st.reset_pending), (vec![0], true));
        // No record sink (this object was never given one): no record carries the mark,
        // so a reset in a cluster cannot be reported durable.
        assert_eq!(
            c2.recreate_mark(),
            Some(RecreateMark {
                luns: vec![0],
                record_seq: None
            })
        );
        drop((c, c2, t));
        let t = shared_target(dir.path(), "a", &shared);
        let c3 = t.attach_with(who, &owner).unwrap();
        assert_eq!(*lock(&shared.2), vec![1, 0]);
        assert_eq!((read_lun(&c3, 0), read_lun(&c3, 1)), (0, 4));
        let st = saved(&c3);
        assert!(st.rbd_recreate.is_empty() && !st.reset_pending, "{st:?}");

        // A reset another node decided (its record) is applied by the node taking over.
        let sink = Arc::new(Sink("A".into(), Mutex::new(Vec::new())));
        c3.set_record_sink(sink.clone());
        write_lun(&c3, 1, 5);
        c3.operator_reset_scope(ResetScope::Lun(1));
        t.reset_client(&c3).unwrap();
        let rec = lock(&sink.1).last().cloned().unwrap();
        assert_eq!(c3.recreate_mark().and_then(|m| m.record_seq), Some(rec.seq));
        // A record another node wrote (taken over, not yet written again by this node) is
        // not one this node's writer stores: no write number to wait for.
        lock(&c3.state).shared.as_mut().unwrap().node = "B".into();
        assert_eq!(c3.recreate_mark().and_then(|m| m.record_seq), None);
        let b = shared_target(dir.path(), "b", &shared);
        assert!(b.take_over(who, rec, "B"));
        let cb = b.attach_with(who, &owner).unwrap();
        assert_eq!(*lock(&shared.2), vec![1, 0, 1]);
        assert_eq!(read_lun(&cb, 1), 0);
        assert!(saved(&cb).rbd_recreate.is_empty());
        // Commit copies the recreated disk.
        cb.commit_lun_to(1, &dir.path().join("x.img")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("x.img")).unwrap()[0], 0);
    }

    const IPXE: [u8; 6] = [0x40, 0x00, 0x27, 0x23, 0x00, 0x01];
    const OS: [u8; 6] = [0x00, 0x02, 0x3d, 0x00, 0x00, 0x01];

    #[test]
    fn take_over_continues_the_boot_count_and_a_pending_reset() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("base.img");
        std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
        let golden = Arc::new(GoldenImage::open("base", &img, 512).unwrap());
        let plan = BindingPlan {
            initiator: None,
            matcher: None,
            image: golden,
            mode: OverlayMode::Volatile,
            mac: None,
            uuid: None,
            chap: None,
            reset: ResetPolicy::default(),
            firmware_isid: None,
            disks: Vec::new(),
            os: ClientOs::default(),
            gateway: GatewayPolicy::default(),
        };
        let node = |sub: &str| {
            BootTarget::new(
                "iqn.t:boot",
                Vec::new(),
                Some(plan.clone()),
                dir.path().join(sub),
                Duration::from_secs(600),
            )
        };
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        let who = "iqn.x:c1";

        // Node A: a boot (iPXE, then the OS); every change goes to the sink.
        let a = node("a");
        let sink_a = Arc::new(Sink("A".into(), Mutex::new(Vec::new())));
        let c = a.attach(who).unwrap();
        c.set_record_sink(sink_a.clone());
        c.login(&IPXE, peer, &[]);
        c.login(&OS, peer, &[]);
        let mut rec = lock(&sink_a.1).last().cloned().unwrap();
        assert_eq!((rec.node.as_str(), rec.state.boots), ("A", 1));
        assert_eq!(rec.state.phase, Phase::Os);
        assert_eq!(rec.disk.lun0, record::Lun0::Overlay);
        let seqs: Vec<u64> = lock(&sink_a.1).iter().map(|r| r.seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        // A decided a reset and died before applying it.
        rec.state.reset_pending = true;

        // Node B never saw the client: it takes the record, applies the reset at the attach
        // and goes on counting; a firmware login after the OS phase is boot 2.
        let b = node("b");
        assert!(b.take_over(who, rec.clone(), "B"));
        let c = b.attach(who).unwrap();
        let sink_b = Arc::new(Sink("B".into(), Mutex::new(Vec::new())));
        c.set_record_sink(sink_b.clone());
        let i = c.info();
        assert_eq!((i.boots, i.phase), (1, Phase::Os));
        assert!(
            i.history.iter().any(|h| h.verdict == "taken over"),
            "{:?}",
            i.history
        );
        let first = lock(&sink_b.1).last().cloned().unwrap();
        assert!(!first.state.reset_pending, "the pending reset was applied");
        assert_eq!(first.node, "B");
        assert!(first.seq > rec.seq, "B continues A's write numbers");
        let (d, _) = c.login(&[0x40, 0x00, 0x27, 0x23, 0x00, 0x02], peer, &[]);
        assert!(d.new_boot);
        assert_eq!(c.info().boots, 2);
        // The same record again: B's own state goes on.
        assert!(!b.take_over(who, rec.clone(), "B"));
        // Its own record: never taken over its state.
        let own = lock(&sink_b.1).last().cloned().unwrap();
        assert!(!b.take_over(who, own.clone(), "B"));
        // A, once the client went back there, takes B's record over its stale state.
        assert!(a.take_over(who, own, "A"));
        assert_eq!(a.attach(who).unwrap().info().boots, 2);
    }
}
