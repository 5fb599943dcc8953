//! The audit log: one JSON line per operator action (who, what, when, the parameters, the
//! result) appended to `STATE_DIR/audit.log` and synced, including refused attempts (wrong
//! credential, malformed request). The credential itself is never written.

use super::ApiError;
use serde_json::{json, Value};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Mutex;

/// File name inside the state directory.
pub const FILE: &str = "audit.log";
/// Entries `GET /api/v1/audit` returns at most (the newest).
const RECENT: usize = 200;
/// How much of the file's tail is read for them.
const TAIL_BYTES: u64 = 256 * 1024;

pub struct AuditLog {
    path: PathBuf,
    lock: Mutex<()>,
}

/// `1970-01-01T00:00:00.000Z` from Unix milliseconds (UTC).
pub fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

impl AuditLog {
    pub fn new(path: PathBuf) -> AuditLog {
        AuditLog {
            path,
            lock: Mutex::new(()),
        }
    }

    /// Append one entry. A failure to write is logged, never hidden and never fatal.
    pub fn record(&self, who: &str, what: &str, params: &Value, result: Result<(), &ApiError>) {
        let ms = crate::metrics::unix_ms();
        let mut entry = json!({
            "time": rfc3339(ms),
            "time_ms": ms,
            "who": who,
            "action": what,
            "params": params,
        });
        match result {
            Ok(()) => entry["result"] = json!("ok"),
            Err(e) => {
                entry["result"] = json!("refused");
                entry["status"] = json!(e.status().as_u16());
                entry["error"] = json!(e.to_string());
            }
        }
        let mut line = entry.to_string();
        line.push('\n');
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| {
                f.write_all(line.as_bytes())?;
                f.sync_data()
            });
        if let Err(e) = written {
            tracing::error!(file = %self.path.display(), error = %e, action = what, "audit log not written");
        }
    }

    /// The newest entries, oldest first.
    pub fn recent(&self) -> Value {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            let len = f.metadata().map_or(0, |m| m.len());
            let start = len.saturating_sub(TAIL_BYTES);
            if f.seek(SeekFrom::Start(start)).is_ok() {
                let _ = f.read_to_string(&mut text);
            }
            if start > 0 {
                // Drop the partial first line.
                text = text
                    .split_once('\n')
                    .map_or(String::new(), |(_, r)| r.to_string());
            }
        }
        let entries: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let skip = entries.len().saturating_sub(RECENT);
        json!({ "entries": entries[skip..] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_798_761_599_000), "2026-12-31T23:59:59.000Z");
    }

    #[test]
    fn records_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().join(FILE));
        log.record("loopback 127.0.0.1:1", "reset client x", &json!({}), Ok(()));
        log.record(
            "loopback 127.0.0.1:1",
            "reload",
            &json!({}),
            Err(&ApiError::Conflict("busy".into())),
        );
        let v = log.recent();
        let e = v["entries"].as_array().unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0]["action"], "reset client x");
        assert_eq!(e[1]["status"], 409);
    }
}
