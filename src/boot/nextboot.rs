//! The operator's next-boot override of one client: another image and/or another mode than
//! its binding names, taken at the client's next boot, never mid-boot (docs/overlays.md,
//! "Changing a client's next boot").
//!
//! The override is sticky: once taken it stays, boot after boot, until the operator clears
//! it (as "assign image" in PVS or ggRock): a machine moved to a test image does not fall
//! back to the old one at its second boot. It lives in `STATE_DIR/clients/<target>/<client>/
//! next-boot.yaml`, written atomically (temp file, fsync, rename, directory fsync), so it
//! survives `reload`, SIGHUP and a server restart, `kill -9` included.
//!
//! The pure part: parsing a request ([`request`]), and deciding what a change of disk is
//! ([`switch`]) and whether a new boot takes it ([`taken_at_boot`]).

use crate::config::OverlayMode;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name of the override inside the client's directory.
pub const FILE: &str = "next-boot.yaml";
/// Directory (inside the client's directory) where persistent disks the client left are kept.
pub const KEPT_DIR: &str = "kept";

/// An override as stored and shown (`next_boot` in the API's client view).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextBoot {
    /// The client's initiator name (the directory name is a lossy form of it).
    pub initiator: String,
    /// `name`, `name@N` or `name:channel` (docs/images.md); None: the binding's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// None: the binding's mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<OverlayMode>,
    /// When the operator set it (ms since the Unix epoch).
    pub since_ms: u64,
    /// Who set it (the API's caller, or the control socket).
    pub by: String,
}

/// The disk a client is on (`disk:` of its boot state): the image as `name` (an `images:`
/// file) or `name@N` (a version), and the mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub image: String,
    pub mode: OverlayMode,
}

/// Why an override was refused or could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum NextBootError {
    /// The request itself is wrong (unknown mode, nothing asked, clear with values).
    #[error("{0}")]
    Invalid(String),
    /// The image (or its version, or its channel) does not exist.
    #[error("{0}")]
    UnknownImage(String),
    /// A valid request this client cannot take (direct mode on a versioned image).
    #[error("{0}")]
    Refused(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a next-boot override: {msg}")]
    Parse { path: PathBuf, msg: String },
    /// The blocking task that wrote it failed.
    #[error("{0}")]
    Internal(String),
}

/// What the operator asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Set {
        image: Option<String>,
        mode: Option<OverlayMode>,
    },
    Clear,
}

/// The modes a next boot may take (install is a binding's choice: it needs its commit).
pub fn parse_mode(s: &str) -> Result<OverlayMode, NextBootError> {
    match s {
        "volatile" => Ok(OverlayMode::Volatile),
        "persistent" => Ok(OverlayMode::Persistent),
        "readonly" => Ok(OverlayMode::Readonly),
        "direct" => Ok(OverlayMode::Direct),
        _ => Err(NextBootError::Invalid(format!(
            "unknown mode {s:?}: volatile, persistent, readonly or direct"
        ))),
    }
}

/// Check a request: at least an image or a mode, or `clear` alone.
pub fn request(
    image: Option<&str>,
    mode: Option<&str>,
    clear: bool,
) -> Result<Request, NextBootError> {
    if clear {
        if image.is_some() || mode.is_some() {
            return Err(NextBootError::Invalid(
                "clear takes no image or mode: clear the override, or set one".into(),
            ));
        }
        return Ok(Request::Clear);
    }
    if image.is_none() && mode.is_none() {
        return Err(NextBootError::Invalid(
            "give an image, a mode, or both (or clear)".into(),
        ));
    }
    let image = match image.map(str::trim) {
        Some("") => return Err(NextBootError::Invalid("empty image name".into())),
        // Resolved by the boot target: an `images:` name (any spelling the configuration
        // allows) or a versioned spec; what resolves to nothing is an unknown image.
        Some(i) if i.len() > 300 || i.chars().any(char::is_control) => {
            return Err(NextBootError::Invalid("not an image name".into()))
        }
        Some(i) => Some(i.to_string()),
        None => None,
    };
    let mode = mode.map(parse_mode).transpose()?;
    Ok(Request::Set { image, mode })
}

/// A disk as the switch rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct DiskSpec<'a> {
    pub name: &'a str,
    /// Identity of the image (version): path+size+mtime, or the version's id.
    pub id: &'a str,
    pub version: Option<u64>,
    pub mode: OverlayMode,
}

/// What moving from one disk to another is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// The same disk.
    Same,
    /// Another version of the same versioned image, same mode (a binding following
    /// `latest` or a channel).
    Version,
    /// Another image or another mode: a new disk.
    Disk,
}

/// Classify the move from `cur` to `next`.
pub fn switch(cur: &DiskSpec<'_>, next: &DiskSpec<'_>) -> Switch {
    if cur.mode != next.mode || cur.name != next.name {
        return Switch::Disk;
    }
    if cur.id == next.id {
        return Switch::Same;
    }
    match (cur.version, next.version) {
        (Some(_), Some(_)) => Switch::Version,
        // A plain image file that changed under the same name: its overlays do not fit.
        _ => Switch::Disk,
    }
}

/// Whether a new boot takes the pending disk: a new disk always; another version when the
/// disk is discarded anyway (`reset_decided`: volatile) or has no overlay (readonly, direct);
/// a persistent disk stays on the version it was made on (its writes are against it).
pub fn taken_at_boot(kind: Switch, reset_decided: bool, has_overlay: bool) -> bool {
    match kind {
        Switch::Same => false,
        Switch::Version => reset_decided || !has_overlay,
        Switch::Disk => true,
    }
}

/// Where a persistent disk the client leaves is kept: `kept/<ms>/<disk directory>` in the
/// client's directory (never in the way of a new disk, never taken for garbage by the
/// volatile-disk cleanup; image GC still counts its version as in use).
pub fn kept_path(client_dir: &Path, disk_dir: &str, now_ms: u64) -> PathBuf {
    client_dir
        .join(KEPT_DIR)
        .join(now_ms.to_string())
        .join(disk_dir)
}

/// The newest kept disk named `disk_dir` (`kept/<ms>/<disk_dir>` with a snapshot), if any.
pub fn newest_kept(client_dir: &Path, disk_dir: &str) -> Option<PathBuf> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(client_dir.join(KEPT_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let ms = e.file_name().to_str()?.parse::<u64>().ok()?;
            let p = e.path().join(disk_dir);
            p.join("overlay.meta").exists().then_some((ms, p))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NextBootError + '_ {
    move |source| NextBootError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// fsync a directory (after a rename or unlink in it).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

/// Read an override; `Ok(None)` when the client has none.
pub fn load(path: &Path) -> Result<Option<NextBoot>, NextBootError> {
    Ok(super::state::load_yaml(path, "next-boot override")?)
}

/// Replace the override atomically (temp file, fsync, rename, directory fsync).
pub fn save(path: &Path, nb: &NextBoot) -> Result<(), NextBootError> {
    Ok(super::state::save_yaml(path, nb)?)
}

impl From<super::state::StateError> for NextBootError {
    fn from(e: super::state::StateError) -> Self {
        match e {
            super::state::StateError::Io { path, source } => NextBootError::Io { path, source },
            super::state::StateError::Parse { path, msg, .. } => NextBootError::Parse { path, msg },
        }
    }
}

/// Remove the override durably (unlink, fsync the directory); no override is fine.
pub fn remove(path: &Path) -> Result<(), NextBootError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(path)(e)),
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    sync_dir(dir).map_err(io(dir))
}

/// Every override under a target's directory (`STATE_DIR/clients/<target>`), with the
/// files that could not be read.
pub fn load_all(target_dir: &Path) -> (Vec<NextBoot>, Vec<NextBootError>) {
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    for e in std::fs::read_dir(target_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        match load(&e.path().join(FILE)) {
            Ok(Some(nb)) => ok.push(nb),
            Ok(None) => {}
            Err(err) => bad.push(err),
        }
    }
    ok.sort_by(|a, b| a.initiator.cmp(&b.initiator));
    (ok, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use OverlayMode::*;

    fn spec<'a>(
        name: &'a str,
        id: &'a str,
        version: Option<u64>,
        mode: OverlayMode,
    ) -> DiskSpec<'a> {
        DiskSpec {
            name,
            id,
            version,
            mode,
        }
    }

    #[test]
    fn requests() {
        assert_eq!(request(None, None, true).unwrap(), Request::Clear);
        assert_eq!(
            request(Some("win@2"), Some("persistent"), false).unwrap(),
            Request::Set {
                image: Some("win@2".into()),
                mode: Some(Persistent)
            }
        );
        assert_eq!(
            request(None, Some("readonly"), false).unwrap(),
            Request::Set {
                image: None,
                mode: Some(Readonly)
            }
        );
        assert!(matches!(
            request(None, None, false),
            Err(NextBootError::Invalid(_))
        ));
        assert!(matches!(
            request(Some("a"), None, true),
            Err(NextBootError::Invalid(_))
        ));
        assert!(matches!(
            request(None, Some("install"), false),
            Err(NextBootError::Invalid(_))
        ));
        assert!(matches!(
            request(None, Some("Volatile"), false),
            Err(NextBootError::Invalid(_))
        ));
        assert!(matches!(
            request(Some(""), None, false),
            Err(NextBootError::Invalid(_))
        ));
        assert!(matches!(
            request(Some("a\nb"), None, false),
            Err(NextBootError::Invalid(_))
        ));
        // Names are resolved by the boot target (an unknown one is UnknownImage there).
        assert!(request(Some("Win 11@x"), None, false).is_ok());
    }

    #[test]
    fn switches() {
        let a1 = spec("a", "a|1", Some(1), Volatile);
        assert_eq!(switch(&a1, &a1), Switch::Same);
        assert_eq!(
            switch(&a1, &spec("a", "a|2", Some(2), Volatile)),
            Switch::Version
        );
        assert_eq!(
            switch(&a1, &spec("a", "a|1", Some(1), Persistent)),
            Switch::Disk
        );
        assert_eq!(
            switch(&a1, &spec("b", "b|1", Some(1), Volatile)),
            Switch::Disk
        );
        let f = spec("f", "/f|10|5", None, Persistent);
        assert_eq!(
            switch(&f, &spec("f", "/f|10|6", None, Persistent)),
            Switch::Disk
        );
        // A new disk is always taken; a new version only when the disk goes anyway.
        assert!(taken_at_boot(Switch::Disk, false, true));
        assert!(!taken_at_boot(Switch::Version, false, true));
        assert!(taken_at_boot(Switch::Version, true, true));
        assert!(taken_at_boot(Switch::Version, false, false));
        assert!(!taken_at_boot(Switch::Same, true, false));
    }

    #[test]
    fn store_round_trip_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t/c").join(FILE);
        assert!(load(&path).unwrap().is_none());
        let nb = NextBoot {
            initiator: "iqn.2026-11.test:pc1".into(),
            image: Some("win:test".into()),
            mode: Some(Persistent),
            since_ms: 5,
            by: "loopback 127.0.0.1:5".into(),
        };
        save(&path, &nb).unwrap();
        assert_eq!(load(&path).unwrap(), Some(nb.clone()));
        assert!(!path.with_extension("yaml.tmp").exists());
        let (all, bad) = load_all(&dir.path().join("t"));
        assert_eq!((all, bad.len()), (vec![nb], 0));
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert!(load(&path).unwrap().is_none());
        std::fs::write(&path, "mode: [").unwrap();
        assert!(matches!(load(&path), Err(NextBootError::Parse { .. })));
        assert_eq!(
            kept_path(Path::new("/s/c"), "win.v1", 7),
            PathBuf::from("/s/c/kept/7/win.v1")
        );
        let c = dir.path().join("c");
        assert_eq!(newest_kept(&c, "win.v1"), None);
        for ms in [7u64, 12, 9] {
            let k = kept_path(&c, "win.v1", ms);
            std::fs::create_dir_all(&k).unwrap();
            std::fs::write(k.join("overlay.meta"), "x").unwrap();
        }
        std::fs::create_dir_all(kept_path(&c, "win.v1", 20)).unwrap(); // no snapshot
        assert_eq!(newest_kept(&c, "win.v1"), Some(kept_path(&c, "win.v1", 12)));
        assert_eq!(newest_kept(&c, "win.v2"), None);
    }
}
