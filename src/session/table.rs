//! The table of live sessions: TSIH allocation, lookup by (InitiatorName, ISID) for session
//! reinstatement (RFC 7143 §6.3.5), and signals to close a session.

use dashmap::DashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{oneshot, watch, Notify};

/// Another nexus's PERSISTENT RESERVE OUT / PREEMPT AND ABORT asks this session to abort its
/// tasks on `lu` (SPC-4 §5.13.11.2.6). The session answers on `done` once they have ended:
/// true if it had any (they then get COMMANDS CLEARED BY ANOTHER INITIATOR).
pub struct AbortRequest {
    pub lu: Arc<crate::scsi::LogicalUnit>,
    pub done: oneshot::Sender<bool>,
}

impl std::fmt::Debug for AbortRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AbortRequest")
    }
}

/// What the rest of the server may know and do about one session.
#[derive(Debug)]
pub struct SessionHandle {
    pub tsih: u16,
    pub initiator: String,
    pub isid: [u8; 6],
    pub target: String,
    pub nexus_id: u64,
    /// When the session last received a PDU (ms on the process's monotonic clock).
    pub last_rx_ms: std::sync::atomic::AtomicU64,
    /// Ask the session to close (reinstatement, target cold reset).
    pub kill: Notify,
    /// Ask the session to log out (RFC 7143 §11.9.1 AsyncEvent 1) and close it if the
    /// initiator has not within a few seconds (a reload fencing a changed LUN).
    pub logout: Notify,
    /// Becomes true once the session has released everything.
    pub closed: watch::Sender<bool>,
    /// Abort requests from other sessions, taken by this session's loop when `abort` fires.
    pub aborts: std::sync::Mutex<Vec<AbortRequest>>,
    pub abort: Notify,
}

/// Milliseconds since the process started, on a monotonic clock.
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

impl SessionHandle {
    /// Note that a PDU arrived.
    pub fn touch(&self) {
        self.last_rx_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// How long the session has been silent.
    pub fn silent_for(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            now_ms().saturating_sub(self.last_rx_ms.load(Ordering::Relaxed)),
        )
    }

    /// Ask the initiator to log out (it logs in again, to what the registry then holds);
    /// does not wait.
    pub fn request_logout(&self) {
        self.logout.notify_one();
    }

    /// Ask the session to abort its tasks on `lu` (a PREEMPT AND ABORT of another nexus);
    /// the answer comes once they have ended (or never, if the session closes first).
    pub fn request_abort(&self, lu: Arc<crate::scsi::LogicalUnit>) -> oneshot::Receiver<bool> {
        let (done, rx) = oneshot::channel();
        self.aborts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(AbortRequest { lu, done });
        self.abort.notify_one();
        rx
    }

    /// Abort requests waiting for the session's loop.
    pub fn take_aborts(&self) -> Vec<AbortRequest> {
        std::mem::take(&mut *self.aborts.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Ask the session to close and wait (bounded) until it has; false if it had not by then
    /// (logged: a session that ignores its kill signal is a bug worth seeing).
    pub async fn close(&self, wait: std::time::Duration) -> bool {
        self.kill.notify_one();
        let mut rx = self.closed.subscribe();
        let closed = tokio::time::timeout(wait, rx.wait_for(|c| *c))
            .await
            .is_ok();
        if !closed {
            tracing::warn!(
                tsih = self.tsih,
                ?wait,
                "session did not close within the wait"
            );
        }
        closed
    }
}

#[derive(Debug, Default)]
pub struct SessionTable {
    sessions: DashMap<u16, Arc<SessionHandle>>,
    next_tsih: AtomicU16,
    next_nexus: AtomicU64,
    /// Serialises [`SessionTable::insert`]: allocating the nexus id, entering the session and
    /// looking for its same-port twins must be one step, or two racing logins with one ISID
    /// can each miss the other and both stay (§6.3.5 allows one I_T nexus per initiator port).
    register: std::sync::Mutex<()>,
}

/// An initiator port is InitiatorName + ISID (RFC 7143 §4.4.1); iSCSI names compare without
/// regard to case (RFC 3722 folds them to lower case).
fn same_port(s: &SessionHandle, initiator: &str, isid: &[u8; 6], target: &str) -> bool {
    s.initiator.eq_ignore_ascii_case(initiator)
        && &s.isid == isid
        && s.target.eq_ignore_ascii_case(target)
}

impl SessionTable {
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    pub fn get(&self, tsih: u16) -> Option<Arc<SessionHandle>> {
        self.sessions.get(&tsih).map(|s| s.clone())
    }

    /// The session this initiator port (InitiatorName + ISID) already has, if any.
    pub fn find(
        &self,
        initiator: &str,
        isid: &[u8; 6],
        target: &str,
    ) -> Option<Arc<SessionHandle>> {
        self.sessions
            .iter()
            .find(|s| same_port(s, initiator, isid, target))
            .map(|s| s.clone())
    }

    pub fn all(&self) -> Vec<Arc<SessionHandle>> {
        self.sessions.iter().map(|s| s.clone()).collect()
    }

    /// Register a new session with a fresh, non-zero TSIH not in use (§11.12.6: 0 is reserved).
    /// Also returns the sessions already registered for the same initiator port and target: the
    /// twins of a login that raced past the reinstatement check, which the caller must close.
    pub fn insert(
        &self,
        initiator: &str,
        isid: [u8; 6],
        target: &str,
    ) -> (Arc<SessionHandle>, Vec<Arc<SessionHandle>>) {
        // The guard protects no data of its own: a poisoned lock is still a valid lock.
        let _one_at_a_time = self
            .register
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let twins: Vec<_> = self
            .sessions
            .iter()
            .filter(|s| same_port(s, initiator, &isid, target))
            .map(|s| s.clone())
            .collect();
        loop {
            let tsih = self
                .next_tsih
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if tsih == 0 || self.sessions.contains_key(&tsih) {
                continue;
            }
            let handle = Arc::new(SessionHandle {
                tsih,
                initiator: initiator.to_string(),
                isid,
                target: target.to_string(),
                nexus_id: self.next_nexus.fetch_add(1, Ordering::Relaxed) + 1,
                last_rx_ms: AtomicU64::new(now_ms()),
                kill: Notify::new(),
                logout: Notify::new(),
                closed: watch::Sender::new(false),
                aborts: std::sync::Mutex::new(Vec::new()),
                abort: Notify::new(),
            });
            match self.sessions.entry(tsih) {
                dashmap::mapref::entry::Entry::Occupied(_) => continue,
                dashmap::mapref::entry::Entry::Vacant(v) => {
                    v.insert(handle.clone());
                    return (handle, twins);
                }
            }
        }
    }

    pub fn remove(&self, tsih: u16) {
        self.sessions.remove(&tsih);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsih_unique_and_nonzero() {
        let t = SessionTable::default();
        t.next_tsih.store(u16::MAX - 1, Ordering::Relaxed);
        let (a, _) = t.insert("i", [0; 6], "t");
        let (b, _) = t.insert("i", [1; 6], "t");
        assert_ne!(a.tsih, 0);
        assert_ne!(b.tsih, 0);
        assert_ne!(a.tsih, b.tsih);
        assert_eq!(t.find("i", &[1; 6], "t").map(|s| s.tsih), Some(b.tsih));
        assert!(t.find("i", &[2; 6], "t").is_none());
        assert_eq!(t.find("I", &[1; 6], "T").map(|s| s.tsih), Some(b.tsih));
    }

    #[test]
    fn racing_inserts_of_one_port_always_see_each_other() {
        // Whatever the interleaving, of N racing registrations of one initiator port every
        // one but the first sees an older twin, so the newest can close the others.
        for _ in 0..200 {
            let t = Arc::new(SessionTable::default());
            let seen: Vec<_> = (0..4)
                .map(|_| {
                    let t = t.clone();
                    std::thread::spawn(move || t.insert("iqn.x", [7; 6], "iqn.t").1.len())
                })
                .collect();
            let mut counts: Vec<usize> = seen.into_iter().map(|h| h.join().unwrap()).collect();
            counts.sort_unstable();
            assert_eq!(counts, vec![0, 1, 2, 3]);
        }
    }
}
