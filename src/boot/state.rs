//! The durable boot state of a client ([`BootState`]) in the state directory:
//! `STATE_DIR/clients/<target>/<initiator>/lifecycle.yaml`, beside the client's overlays.
//!
//! Written atomically (temp file, fsync, rename, directory fsync) after every event that
//! changes it, so a restarted server, even after `kill -9` or a power loss, decides exactly
//! like the running one did.

use super::lifecycle::BootState;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the state inside the client's directory.
pub const FILE: &str = "lifecycle.yaml";

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a {what}: {msg}")]
    Parse {
        path: PathBuf,
        what: &'static str,
        msg: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Read the state of a client; `Ok(None)` when it has none yet.
pub fn load(path: &Path) -> Result<Option<BootState>, StateError> {
    load_yaml(path, "boot state")
}

/// Replace the state atomically (see [`save_yaml`]).
pub fn save(path: &Path, state: &BootState) -> Result<(), StateError> {
    save_yaml(path, state)
}

/// Read a YAML record of the client's directory (`what` names it in errors); `Ok(None)`
/// when the file does not exist.
pub fn load_yaml<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &'static str,
) -> Result<Option<T>, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    serde_yaml::from_str(&text)
        .map(Some)
        .map_err(|e| StateError::Parse {
            path: path.to_path_buf(),
            what,
            msg: e.to_string(),
        })
}

/// Replace a YAML record atomically: `path.tmp`, fsync, rename over `path`, fsync the
/// directory (a crash leaves the old record or the new one, never a torn one).
pub fn save_yaml<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let text = serde_yaml::to_string(value).map_err(|e| StateError::Parse {
        path: path.to_path_buf(),
        what: "record",
        msg: e.to_string(),
    })?;
    let tmp = path.with_extension("yaml.tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b").join(FILE);
        assert!(load(&path).unwrap().is_none());
        let st = BootState {
            boots: 3,
            resets: 2,
            firmware_isids: vec!["400027230001".into()],
            ..BootState::default()
        };
        save(&path, &st).unwrap();
        assert_eq!(load(&path).unwrap(), Some(st));
        assert!(!path.with_extension("yaml.tmp").exists());
        std::fs::write(&path, "boots: [").unwrap();
        assert!(matches!(load(&path), Err(StateError::Parse { .. })));
    }
}
