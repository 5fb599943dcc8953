//! A client's lifecycle record as the cluster shares it (docs/scale-out.md, "Keys"): the
//! durable part of [`BootState`] plus the disk the client is on and the node that served it,
//! so that any node can take a client over and continue its lifecycle (boot count, phase,
//! a pending reset, the disk of an override) instead of starting afresh.
//!
//! Pure: records are built from a state and compared here; the cluster layer stores them
//! (JSON, `/diskless/<cluster>/clients/<target>/<initiator>/lifecycle`) and writes only while
//! the writer owns the client (src/cluster/clients.rs).

use super::lifecycle::BootState;
use crate::config::OverlayMode;
use serde::{Deserialize, Serialize};

/// What one LUN of the client is on (named for LUN 0, the only one records had first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Lun0 {
    /// A copy-on-write overlay on the serving node's disk (lost with the node).
    Overlay,
    /// An RBD clone, the same on every node (docs/scale-out.md, "Ceph RBD client disks").
    Rbd { name: String },
    /// The golden image itself, no overlay (readonly, direct).
    Image,
}

/// The disk of the client (LUN 0), and its data disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSummary {
    /// `name` or `name@N`.
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    pub mode: OverlayMode,
    pub lun0: Lun0,
    /// LUN 1 and up (a binding's `disks:`), ascending; absent in records written before
    /// data disks were listed (read as none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub luns: Vec<LunSummary>,
}

/// One data disk of the client (LUN 1 and up).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LunSummary {
    pub lun: u16,
    /// `name` or `name@N`.
    pub image: String,
    pub mode: OverlayMode,
    pub disk: Lun0,
}

/// One client's record in etcd (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub target: String,
    pub initiator: String,
    /// The node that wrote it: the one serving the client then (its owner).
    pub node: String,
    /// Grows by one at every write, whichever node writes (a node continues from the record
    /// it took over).
    pub seq: u64,
    /// When it was written (ms since the Unix epoch, the writer's clock).
    pub updated_ms: u64,
    pub disk: DiskSummary,
    /// When the current boot began (ms), if the history still says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_boot_ms: Option<u64>,
    /// The durable lifecycle state, without its history (which stays on each node).
    pub state: BootState,
}

impl ClientRecord {
    /// The record of `state` on `disk`, written by `node` as its write number `seq`.
    pub fn new(
        target: &str,
        initiator: &str,
        node: &str,
        seq: u64,
        now_ms: u64,
        disk: DiskSummary,
        state: &BootState,
    ) -> ClientRecord {
        let last_boot_ms = state
            .history
            .iter()
            .find(|h| h.boot == state.boots && state.boots > 0)
            .map(|h| h.at_ms);
        let mut state = state.clone();
        state.history.clear();
        ClientRecord {
            target: target.to_string(),
            initiator: initiator.to_string(),
            node: node.to_string(),
            seq,
            updated_ms: now_ms,
            disk,
            last_boot_ms,
            state,
        }
    }

    /// Whether `self` says something `prev` did not: another node, disk, boot count,
    /// phase, pending reset, ISIDs... A record is written when the lifecycle changes, not at
    /// every event, so these do not count: the write bookkeeping (seq, time), the last
    /// activity time, the live session count and the "interrupted" mark (every login and
    /// session end moves them; a stale count in a taken record only marks the sessions as
    /// interrupted, which keeps the disk in doubt), and a boot script fetch (the login
    /// that follows it goes to the node that served the script, which has it).
    pub fn differs(&self, prev: Option<&ClientRecord>) -> bool {
        let Some(prev) = prev else { return true };
        let strip = |r: &ClientRecord| {
            let mut r = r.clone();
            r.seq = 0;
            r.updated_ms = 0;
            r.state.last_activity_ms = 0;
            r.state.live_sessions = 0;
            r.state.interrupted = false;
            r.state.script_at_ms = None;
            r.state.shared_seq = 0;
            r.state.taken = None;
            r
        };
        strip(self) != strip(prev)
    }
}

/// Whether a node (`me`) that is about to serve a client takes the cluster's record over its
/// own state (`local`: its in-memory or file state, None when it has none):
/// - no local state: take it (a new node, or a node that lost its state directory);
/// - the record is this node's own write: the local state is at least as new (it is
///   written to disk before the record is sent);
/// - another node's record this node already took: keep (its own later changes may not
///   have reached etcd yet);
/// - another node's record otherwise: that node served the client since: take it.
pub fn should_take(rec: &ClientRecord, me: &str, local: Option<&BootState>) -> bool {
    let Some(local) = local else { return true };
    if rec.node == me {
        return false;
    }
    local.taken.as_ref() != Some(&(rec.node.clone(), rec.seq))
}

/// The state a node continues from when it takes `rec` over: the record's state, the
/// node's own history (plus a line saying so), and the mark of what it took.
pub fn taken_state(rec: &ClientRecord, local: Option<&BootState>, now_ms: u64) -> BootState {
    let mut st = rec.state.clone();
    st.history = local.map(|l| l.history.clone()).unwrap_or_default();
    st.history.push_back(super::lifecycle::HistoryEntry {
        at_ms: now_ms,
        boot: st.boots,
        verdict: "taken over".into(),
        reason: format!(
            "lifecycle continued from node {}'s record (write {}, boot {}, phase {})",
            rec.node, rec.seq, st.boots, st.phase
        ),
    });
    while st.history.len() > super::lifecycle::HISTORY {
        st.history.pop_front();
    }
    st.shared_seq = rec.seq;
    st.taken = Some((rec.node.clone(), rec.seq));
    st
}

/// Where a client's changed records go (the cluster's etcd writer). Called after the local
/// durable write, from whatever thread changed the state; must not block.
pub trait RecordSink: Send + Sync {
    /// This node's id.
    fn node(&self) -> &str;
    /// Store `rec` in the cluster if this node still owns the client.
    fn send(&self, rec: ClientRecord);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::lifecycle::{HistoryEntry, Phase};

    fn disk() -> DiskSummary {
        DiskSummary {
            image: "base".into(),
            version: None,
            mode: OverlayMode::Volatile,
            lun0: Lun0::Overlay,
            luns: Vec::new(),
        }
    }

    #[test]
    fn data_disks_listed_and_old_records_read() {
        let mut d = disk();
        d.luns.push(LunSummary {
            lun: 1,
            image: "data".into(),
            mode: OverlayMode::Persistent,
            disk: Lun0::Rbd {
                name: "rbd/x.lun1".into(),
            },
        });
        let r = ClientRecord::new("t", "i", "n1", 1, 9, d, &state(1));
        let text = serde_json::to_string(&r).unwrap();
        assert!(
            text.contains(
                "\"luns\":[{\"lun\":1,\"image\":\"data\",\"mode\":\"persistent\",\"disk\":{\"kind\":\"rbd\",\"name\":\"rbd/x.lun1\"}}]"
            ),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<ClientRecord>(&text).unwrap(), r);
        // A record of a node that knew only LUN 0.
        let old = ClientRecord::new("t", "i", "n1", 1, 9, disk(), &state(1));
        let text = serde_json::to_string(&old).unwrap();
        assert!(!text.contains("luns"), "{text}");
        let read: ClientRecord = serde_json::from_str(&text).unwrap();
        assert!(read.disk.luns.is_empty());
    }

    fn state(boots: u64) -> BootState {
        let mut st = BootState {
            boots,
            phase: Phase::Os,
            ..BootState::default()
        };
        for b in 1..=boots {
            st.history.push_back(HistoryEntry {
                at_ms: 1000 * b,
                boot: b,
                verdict: "reset".into(),
                reason: "x".into(),
            });
            st.history.push_back(HistoryEntry {
                at_ms: 1000 * b + 5,
                boot: b,
                verdict: "keep".into(),
                reason: "y".into(),
            });
        }
        st
    }

    #[test]
    fn record_drops_history_and_finds_the_boot_time() {
        let r = ClientRecord::new("t", "i", "n1", 3, 9, disk(), &state(2));
        assert!(r.state.history.is_empty());
        assert_eq!(r.last_boot_ms, Some(2000));
        assert_eq!(r.state.boots, 2);
        let none = ClientRecord::new("t", "i", "n1", 1, 9, disk(), &BootState::default());
        assert_eq!(none.last_boot_ms, None);
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"lun0\":{\"kind\":\"overlay\"}"), "{text}");
        assert_eq!(serde_json::from_str::<ClientRecord>(&text).unwrap(), r);
    }

    #[test]
    fn only_lifecycle_changes_differ() {
        let a = ClientRecord::new("t", "i", "n1", 1, 10, disk(), &state(1));
        assert!(a.differs(None));
        let mut st = state(1);
        st.last_activity_ms = 12345;
        st.live_sessions = 2;
        st.script_at_ms = Some(5);
        let b = ClientRecord::new("t", "i", "n1", 2, 20, disk(), &st);
        assert!(
            !b.differs(Some(&a)),
            "activity, sessions, script fetch and write bookkeeping only"
        );
        let c = ClientRecord::new("t", "i", "n2", 2, 20, disk(), &st);
        assert!(c.differs(Some(&a)), "another node");
        st.phase = Phase::OsEnded;
        let d = ClientRecord::new("t", "i", "n1", 2, 20, disk(), &st);
        assert!(d.differs(Some(&a)), "phase");
        let mut other = disk();
        other.lun0 = Lun0::Rbd { name: "x".into() };
        let e = ClientRecord::new("t", "i", "n1", 2, 20, other, &state(1));
        assert!(e.differs(Some(&a)), "disk");
    }

    #[test]
    fn take_over_rules() {
        let rec = ClientRecord::new("t", "i", "n1", 4, 10, disk(), &state(3));
        // A node that never saw the client takes it; so does one that lost its state.
        assert!(should_take(&rec, "n2", None));
        assert!(should_take(&rec, "n1", None));
        // Its own record: the local state is newer or the same.
        assert!(!should_take(&rec, "n1", Some(&state(5))));
        // Another node's record: taken once, then the local state goes on.
        let local = state(1);
        assert!(should_take(&rec, "n2", Some(&local)));
        let taken = taken_state(&rec, Some(&local), 50);
        assert_eq!(taken.boots, 3);
        assert_eq!(taken.shared_seq, 4);
        assert_eq!(taken.history.len(), local.history.len() + 1);
        assert_eq!(
            taken.history.back().map(|h| h.verdict.as_str()),
            Some("taken over")
        );
        assert!(!should_take(&rec, "n2", Some(&taken)));
        // A later write of n1 (the client went back there meanwhile) is taken again.
        let later = ClientRecord::new("t", "i", "n1", 6, 10, disk(), &state(4));
        assert!(should_take(&later, "n2", Some(&taken)));
    }
}
