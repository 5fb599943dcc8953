//! Boot emulation: bindings from initiator names to golden images, one client disk per
//! initiator (the golden image seen through the client's own copy-on-write overlay), and the
//! rule that decides when a client "boots again" (docs/overlays.md).
//!
//! Both sessions of one boot (the firmware's, then the operating system's after the iBFT
//! hand-off) reach the same [`Client`], so the OS sees every write the firmware phase made.

pub mod http;
pub mod lifecycle;

use crate::config::{parse_mac, ConfigError, OverlayMode};
use crate::registry::lu_identity;
use crate::scsi::{LogicalUnit, LuOptions, LunTable};
use crate::storage::{BlockStore, FileStore, Overlay, OverlayOptions, OverlayStats};
use dashmap::DashMap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use lifecycle::{is_firmware_isid, IPXE_ISID_PREFIX};

/// A golden image, opened read-only once and shared by every client bound to it.
pub struct GoldenImage {
    pub name: String,
    pub path: PathBuf,
    pub block_size: u32,
    pub store: Arc<dyn BlockStore>,
    /// Identity recorded in each overlay (path, length, mtime): an overlay is never opened
    /// on top of a different image.
    pub id: String,
}

impl GoldenImage {
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
            store: Arc::new(store),
            id: format!("{}|{}|{}", path.display(), meta.len(), mtime),
        })
    }
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
}

impl BindingPlan {
    pub fn matches(&self, initiator: &str) -> bool {
        match (&self.matcher, &self.mac) {
            (Some(m), _) => m.is_match(initiator),
            (None, Some(mac)) => initiator.eq_ignore_ascii_case(&mac_initiator(mac)),
            (None, None) => false,
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
}

/// Mutable bookkeeping of one client.
#[derive(Debug, Default)]
struct ClientState {
    /// Live sessions of this client.
    sessions: u32,
    /// When the last session ended (None: never had one since the server started).
    last_end: Option<Instant>,
    /// Boots seen (resets of a volatile overlay count one each).
    boots: u64,
}

/// One client disk: a binding made concrete for one initiator.
pub struct Client {
    pub initiator: String,
    pub target: String,
    pub mode: OverlayMode,
    pub image: Arc<GoldenImage>,
    overlay: Option<Arc<Overlay>>,
    luns: Mutex<Arc<LunTable>>,
    state: Mutex<ClientState>,
    serial: String,
    naa: [u8; 16],
}

/// What `Client::info` reports (operator commands).
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub initiator: String,
    pub target: String,
    pub image: String,
    pub mode: OverlayMode,
    pub sessions: u32,
    pub boots: u64,
    pub overlay: Option<OverlayStats>,
    pub overlay_dir: Option<PathBuf>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Client {
    fn build_luns(&self) -> Arc<LunTable> {
        let store: Arc<dyn BlockStore> = match &self.overlay {
            Some(o) => o.clone(),
            None => self.image.store.clone(),
        };
        let identity = crate::scsi::LuIdentity {
            serial: self.serial.clone(),
            naa: self.naa,
            ..lu_identity(&self.target, 0, None)
        };
        let opts = LuOptions {
            max_transfer_blocks: (32 << 20) / self.image.block_size.max(512),
            ..Default::default()
        };
        let lu = LogicalUnit::with_options(store, identity, opts);
        Arc::new(LunTable::new(BTreeMap::from([(0u16, Arc::new(lu))])))
    }

    /// The LUN table sessions of this client use now.
    pub fn luns(&self) -> Arc<LunTable> {
        lock(&self.luns).clone()
    }

    /// Whether a login with `isid` starts a new boot of this client (volatile mode only):
    /// a firmware login (iPXE's ISID) when the client has had no session for `gap`, or has
    /// never had one since the server started. An iPXE reconnect within a boot comes right
    /// after its previous connection, and the OS's login after the hand-off is not a firmware
    /// login, so neither hand-off shape ever discards the disk mid-boot.
    pub fn is_new_boot(&self, isid: &[u8; 6], gap: Duration) -> bool {
        if self.mode != OverlayMode::Volatile || !is_firmware_isid(isid) {
            return false;
        }
        let st = lock(&self.state);
        st.sessions == 0 && st.last_end.is_none_or(|t| t.elapsed() >= gap)
    }

    /// Discard a volatile overlay and start with fresh SCSI state (the caller has closed the
    /// client's sessions). Persistent/readonly/direct clients are not touched.
    pub fn reset(&self) -> Result<(), String> {
        if let Some(o) = &self.overlay {
            o.reset().map_err(|e| e.to_string())?;
        }
        let fresh = self.build_luns();
        *lock(&self.luns) = fresh;
        let mut st = lock(&self.state);
        st.boots += 1;
        Ok(())
    }

    /// A session of this client began / ended.
    pub fn session_started(&self) {
        lock(&self.state).sessions += 1;
    }

    pub fn session_ended(&self) {
        let mut st = lock(&self.state);
        st.sessions = st.sessions.saturating_sub(1);
        st.last_end = Some(Instant::now());
    }

    pub fn sessions(&self) -> u32 {
        lock(&self.state).sessions
    }

    pub fn info(&self) -> ClientInfo {
        let st = lock(&self.state);
        ClientInfo {
            initiator: self.initiator.clone(),
            target: self.target.clone(),
            image: self.image.name.clone(),
            mode: self.mode,
            sessions: st.sessions,
            boots: st.boots,
            overlay: self.overlay.as_ref().map(|o| o.stats()),
            overlay_dir: self.overlay.as_ref().map(|o| o.dir().to_path_buf()),
        }
    }

    /// Write golden image + overlay into a new image file (the "update one client, publish
    /// it as the new golden image" workflow).
    pub fn commit_to(&self, path: &Path) -> Result<(), String> {
        match &self.overlay {
            Some(o) => {
                o.flush().map_err(|e| e.to_string())?;
                o.commit_to(path).map_err(|e| e.to_string())
            }
            None => Err(format!(
                "client {} has no overlay ({} mode)",
                self.initiator, self.mode
            )),
        }
    }
}

/// A boot target's bindings and clients.
pub struct BootTarget {
    pub name: String,
    pub bindings: Vec<BindingPlan>,
    pub default: Option<BindingPlan>,
    pub state_dir: PathBuf,
    clients: DashMap<String, Arc<Client>>,
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
        out.push_str(&crate::registry::default_serial(s, 0));
    }
    out
}

impl BootTarget {
    pub fn new(
        name: &str,
        bindings: Vec<BindingPlan>,
        default: Option<BindingPlan>,
        state_dir: PathBuf,
    ) -> Self {
        BootTarget {
            name: name.to_string(),
            bindings,
            default,
            state_dir,
            clients: DashMap::new(),
        }
    }

    /// The binding of `initiator`, if any (first match, then the default).
    pub fn binding(&self, initiator: &str) -> Option<&BindingPlan> {
        self.bindings
            .iter()
            .find(|b| b.matches(initiator))
            .or(self.default.as_ref())
    }

    /// Where the overlay of `initiator` on `image` lives.
    pub fn overlay_dir(&self, initiator: &str, image: &str) -> PathBuf {
        self.state_dir
            .join("clients")
            .join(dir_name(&self.name))
            .join(dir_name(initiator))
            .join(dir_name(image))
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
    pub fn adopt(&self, old: &BootTarget) {
        for c in old.clients() {
            if let Some(b) = self.binding(&c.initiator) {
                if b.image.id == c.image.id && b.mode == c.mode {
                    self.clients.insert(c.initiator.to_ascii_lowercase(), c);
                }
            }
        }
    }

    /// The client disk of `initiator`, created on first use.
    pub fn attach(&self, initiator: &str) -> Result<Arc<Client>, AttachError> {
        let key = initiator.to_ascii_lowercase();
        if let Some(c) = self.clients.get(&key) {
            return Ok(c.clone());
        }
        let binding = self
            .binding(initiator)
            .ok_or_else(|| AttachError::NoBinding(initiator.to_string()))?;
        if binding.mode == OverlayMode::Direct {
            // One writer of a golden image at a time (it is the image itself).
            if let Some(other) = self.clients.iter().find(|c| {
                c.mode == OverlayMode::Direct
                    && c.image.name == binding.image.name
                    && c.sessions() > 0
            }) {
                return Err(AttachError::DirectBusy {
                    image: binding.image.name.clone(),
                    holder: other.initiator.clone(),
                });
            }
        }
        let image = binding.image.clone();
        let overlay = match binding.mode {
            OverlayMode::Volatile | OverlayMode::Persistent => {
                let dir = self.overlay_dir(&key, &image.name);
                Some(Arc::new(open_overlay(&dir, &image, binding.mode)?))
            }
            _ => None,
        };
        let direct_store: Option<Arc<dyn BlockStore>> = if binding.mode == OverlayMode::Direct {
            Some(Arc::new(
                FileStore::open(&image.path, image.block_size, false)
                    .map_err(|e| AttachError::Storage(e.to_string()))?,
            ))
        } else {
            None
        };
        let image_for_client = match direct_store {
            Some(store) => Arc::new(GoldenImage {
                name: image.name.clone(),
                path: image.path.clone(),
                block_size: image.block_size,
                store,
                id: image.id.clone(),
            }),
            None => image,
        };
        // Per-client identity: Windows refuses two disks with one NAA id or serial, and the
        // identity must stay the same across the client's reboots.
        let who = format!("{}\0{}", self.name, key);
        let client = Client {
            initiator: key.clone(),
            target: self.name.clone(),
            mode: binding.mode,
            image: image_for_client,
            overlay,
            luns: Mutex::new(Arc::new(LunTable::new(BTreeMap::new()))),
            state: Mutex::new(ClientState::default()),
            serial: crate::registry::default_serial(&who, 0),
            naa: crate::registry::naa_identifier(&who, 0),
        };
        let fresh = client.build_luns();
        *lock(&client.luns) = fresh;
        if let Some(o) = &client.overlay {
            // A server restart in the middle of a boot must not look like a reboot: the
            // overlay's last write stands in for the session that ended with the old process.
            lock(&client.state).last_end = last_write(o.dir());
        }
        let client = Arc::new(client);
        // Two logins racing: keep whichever got in first.
        Ok(self.clients.entry(key).or_insert(client).clone())
    }
}

/// When the overlay in `dir` was last written, as an `Instant` (None if unknown or older
/// than this machine's monotonic clock reaches).
fn last_write(dir: &Path) -> Option<Instant> {
    let newest = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
        .max()?;
    let age = std::time::SystemTime::now()
        .duration_since(newest)
        .unwrap_or_default();
    Instant::now().checked_sub(age)
}

/// Open (or create) the overlay of a client. A volatile overlay that cannot be opened (made
/// for another golden image, damaged) is simply recreated; a persistent one is an error.
fn open_overlay(
    dir: &Path,
    image: &GoldenImage,
    mode: OverlayMode,
) -> Result<Overlay, AttachError> {
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
            Ok(o) => return Ok(o),
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
            chap: b.chap.as_ref().map(|c| c.credentials()),
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
        }),
        None => None,
    };
    Ok((out, default))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
