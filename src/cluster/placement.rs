//! Placement: which node serves a client. Pure: the cluster's view (membership, load,
//! ownership, as read from etcd), this node's lease standing and `now` in; a decision out.
//! No sockets, no clock: the etcd shell (`super::etcd`) feeds it and carries decisions out.
//!
//! The rules (docs/scale-out.md):
//! - A client owned by this node is served here (sticky), even while draining: an OS whose
//!   session reconnects must find the disk it was using.
//! - A client owned by another live node is sent there (boot script portal, or login
//!   redirection, RFC 7143 §11.13.5 status 0x0101 with TargetAddress, §13.8).
//! - A client owned by nobody is claimed for the least-loaded live, non-draining node: the
//!   ownership key is created only if absent (so two nodes can never own one client) and is
//!   bound to the *chosen node's* lease, so the node the client is sent to already owns it and
//!   never sends it on (edk2 follows one redirection only).
//! - A draining node hands a client it owns over at the client's next boot (its boot script
//!   fetch with no session open here), if another node can take it.
//! - Without a current lease, this node claims nothing for itself; without etcd at all it
//!   serves only clients it owned when its lease was last known valid, until that lease
//!   would have run out at etcd (§ "A node that loses etcd" in docs/scale-out.md).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Instant;

/// A node's id (`cluster.node_id`).
pub type NodeId = String;

/// What a node publishes under `/diskless/<cluster>/nodes/<id>` (JSON), bound to its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The iSCSI portal clients are sent to (`cluster.advertise`).
    pub portal: SocketAddr,
    /// Every portal the node listens on.
    #[serde(default)]
    pub portals: Vec<SocketAddr>,
    /// Open sessions on the node.
    #[serde(default)]
    pub load: u64,
    /// The node takes no new clients (`diskless node drain`).
    #[serde(default)]
    pub draining: bool,
    /// The node's etcd lease id: other nodes bind the ownership keys of clients they place
    /// on this node to it.
    #[serde(default)]
    pub lease: i64,
    /// The node's operator API (`api.listen`; docs/operations.md, "In a cluster"): where
    /// another node's API asks for its clients' live details and forwards actions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<SocketAddr>,
}

/// One change of a key under the cluster's prefix (from a listing or a watch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// The keys of a cluster, under `/diskless/<name>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys {
            prefix: format!("/diskless/{cluster}/"),
        }
    }
    pub fn node(&self, id: &str) -> String {
        format!("{}nodes/{id}", self.prefix)
    }
    pub fn owner(&self, initiator: &str) -> String {
        format!("{}owners/{initiator}", self.prefix)
    }
    /// The operator's drain mark (no lease: it outlives restarts of the node).
    pub fn drain(&self, id: &str) -> String {
        format!("{}drain/{id}", self.prefix)
    }
    /// A client's next-boot override (JSON of `boot::nextboot::NextBoot`; no lease).
    pub fn next_boot(&self, target: &str, initiator: &str) -> String {
        format!(
            "{}clients/{}/{}/next-boot",
            self.prefix,
            target.to_ascii_lowercase(),
            initiator.to_ascii_lowercase()
        )
    }
    /// The configuration every node lays over its own (YAML; no lease).
    pub fn shared_config(&self) -> String {
        format!("{}shared/config", self.prefix)
    }
    /// Which shared record `key` is, if any.
    pub fn shared(&self, key: &str) -> Option<SharedKey> {
        let rest = key.strip_prefix(&self.prefix)?;
        if rest == "shared/config" {
            return Some(SharedKey::Config);
        }
        let rest = rest.strip_prefix("clients/")?.strip_suffix("/next-boot")?;
        let (target, initiator) = rest.split_once('/')?;
        (!target.is_empty() && !initiator.is_empty() && !initiator.contains('/')).then(|| {
            SharedKey::NextBoot {
                target: target.to_string(),
                initiator: initiator.to_string(),
            }
        })
    }
}

/// A record of the cluster's shared state (docs/scale-out.md, "Keys").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedKey {
    NextBoot { target: String, initiator: String },
    Config,
}

/// What this node knows of the cluster: a copy of the keys under its prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Initiator name → owner node.
    pub owners: BTreeMap<String, NodeId>,
    /// Nodes the operator drained.
    pub drained: BTreeSet<NodeId>,
}

impl View {
    /// Apply one change. Keys outside the prefix and malformed records are ignored (a record
    /// that does not parse is as good as absent: nobody is sent to it).
    pub fn apply(&mut self, keys: &Keys, change: &Change) {
        let key = match change {
            Change::Put { key, .. } | Change::Delete { key } => key,
        };
        let Some(rest) = key.strip_prefix(&keys.prefix) else {
            return;
        };
        let Some((kind, name)) = rest.split_once('/') else {
            return;
        };
        if name.is_empty() {
            return;
        }
        match (kind, change) {
            ("nodes", Change::Put { value, .. }) => match serde_json::from_slice(value) {
                Ok(r) => {
                    self.nodes.insert(name.to_string(), r);
                }
                Err(_) => {
                    self.nodes.remove(name);
                }
            },
            ("nodes", Change::Delete { .. }) => {
                self.nodes.remove(name);
            }
            ("owners", Change::Put { value, .. }) => {
                let owner = String::from_utf8_lossy(value).into_owned();
                self.owners.insert(name.to_string(), owner);
            }
            ("owners", Change::Delete { .. }) => {
                self.owners.remove(name);
            }
            ("drain", Change::Put { .. }) => {
                self.drained.insert(name.to_string());
            }
            ("drain", Change::Delete { .. }) => {
                self.drained.remove(name);
            }
            _ => {}
        }
    }

    /// Whether a node takes no new clients: drained by the operator or saying so itself.
    pub fn is_draining(&self, id: &str) -> bool {
        self.drained.contains(id) || self.nodes.get(id).is_some_and(|n| n.draining)
    }

    /// Clients owned per node (every live node listed, with 0 if it owns none).
    pub fn owned_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut counts: BTreeMap<NodeId, usize> =
            self.nodes.keys().map(|k| (k.clone(), 0)).collect();
        for owner in self.owners.values() {
            *counts.entry(owner.clone()).or_insert(0) += 1;
        }
        counts
    }
}

/// Why a placement is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// An iSCSI login (Normal session) reached this node.
    Login,
    /// The client fetched its boot script here: a new boot. `idle` is true when the client
    /// has no session open on this node (only then may a draining node hand it over).
    Script { idle: bool },
}

/// The inputs of one decision.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub me: &'a str,
    pub initiator: &'a str,
    pub view: &'a View,
    /// The owner read from etcd just now: `Some(owner)` (owner None: nobody), or `None`
    /// when etcd could not be read.
    pub owner: Option<Option<NodeId>>,
    pub now: Instant,
    /// Until when this node's lease is surely alive at etcd (the send time of the last
    /// answered keep-alive plus the TTL); None: no lease.
    pub lease_valid_until: Option<Instant>,
    /// Nodes not to claim for (their lease turned out to be gone).
    pub exclude: &'a [NodeId],
    pub why: Why,
}

/// Why a login or boot cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the cluster registry (etcd) is unreachable and this node does not own the client")]
    RegistryUnreachable,
    #[error("no live, non-draining node can take the client")]
    NoNode,
    #[error("the client's owner {0} has no node record")]
    OwnerUnknown(NodeId),
}

/// What to do with a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Serve it here.
    Serve,
    /// Send it to `node` at `portal`.
    Redirect {
        node: NodeId,
        portal: SocketAddr,
    },
    /// Nobody owns it: create its ownership key (only if absent) for `node`, bound to
    /// `lease`; then serve (node is this one) or redirect.
    Claim {
        node: NodeId,
        lease: i64,
    },
    /// Draining: delete this node's ownership of the client (only if still ours), then
    /// decide again (it goes to another node).
    Release,
    Refuse(Refusal),
}

/// Decide where a client goes.
pub fn decide(input: &Input) -> Decision {
    let me = input.me;
    let lease_ok = input.lease_valid_until.is_some_and(|t| input.now < t);
    let owner = match &input.owner {
        Some(o) => o.clone(),
        // etcd unreadable: only a client this node owned (as last seen) while the lease that
        // binds the ownership key is surely alive.
        None => {
            return if lease_ok
                && input.view.owners.get(input.initiator).map(String::as_str) == Some(me)
            {
                Decision::Serve
            } else {
                Decision::Refuse(Refusal::RegistryUnreachable)
            };
        }
    };
    match owner {
        Some(o) if o == me => {
            let handover = matches!(input.why, Why::Script { idle: true })
                && input.view.is_draining(me)
                && pick(input, lease_ok, true).is_some();
            if handover {
                Decision::Release
            } else {
                Decision::Serve
            }
        }
        Some(o) => match input.view.nodes.get(&o) {
            Some(n) => Decision::Redirect {
                node: o,
                portal: n.portal,
            },
            None => Decision::Refuse(Refusal::OwnerUnknown(o)),
        },
        None => match pick(input, lease_ok, false) {
            Some((node, lease)) => Decision::Claim { node, lease },
            None => Decision::Refuse(Refusal::NoNode),
        },
    }
}

/// The least-loaded live, non-draining node (clients owned, then open sessions, then id),
/// and its lease. This node counts only with a valid lease; `others_only` leaves it out.
fn pick(input: &Input, lease_ok: bool, others_only: bool) -> Option<(NodeId, i64)> {
    let counts = input.view.owned_counts();
    input
        .view
        .nodes
        .iter()
        .filter(|(id, _)| !input.view.is_draining(id))
        .filter(|(id, _)| !input.exclude.contains(id))
        .filter(|(id, _)| {
            if id.as_str() == input.me {
                lease_ok && !others_only
            } else {
                true
            }
        })
        .min_by_key(|(id, n)| (counts.get(*id).copied().unwrap_or(0), n.load, (*id).clone()))
        .map(|(id, n)| (id.clone(), n.lease))
}

/// One node's line in `diskless cluster status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub portal: SocketAddr,
    pub draining: bool,
    /// Open sessions, as the node last published.
    pub load: u64,
    /// Clients it owns.
    pub clients: usize,
}

/// The cluster as `diskless cluster status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub nodes: Vec<NodeStatus>,
    /// Ownership keys naming a node with no record (should be none: keys share the lease).
    pub orphans: usize,
    /// Nodes the operator drained that are not live.
    pub drained_absent: Vec<NodeId>,
}

pub fn status(view: &View) -> Status {
    let counts = view.owned_counts();
    let nodes = view
        .nodes
        .iter()
        .map(|(id, n)| NodeStatus {
            id: id.clone(),
            portal: n.portal,
            draining: view.is_draining(id),
            load: n.load,
            clients: counts.get(id).copied().unwrap_or(0),
        })
        .collect();
    let orphans = view
        .owners
        .values()
        .filter(|o| !view.nodes.contains_key(*o))
        .count();
    let drained_absent = view
        .drained
        .iter()
        .filter(|d| !view.nodes.contains_key(*d))
        .cloned()
        .collect();
    Status {
        nodes,
        orphans,
        drained_absent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rec(port: u16, lease: i64) -> NodeRecord {
        NodeRecord {
            portal: SocketAddr::from(([127, 0, 0, 1], port)),
            portals: vec![],
            load: 0,
            draining: false,
            lease,
            api: None,
        }
    }

    fn view3() -> View {
        let mut v = View::default();
        v.nodes.insert("a".into(), rec(3261, 1));
        v.nodes.insert("b".into(), rec(3262, 2));
        v.nodes.insert("c".into(), rec(3263, 3));
        v
    }

    struct T {
        now: Instant,
        view: View,
    }

    impl T {
        fn new() -> T {
            T {
                now: Instant::now(),
                view: view3(),
            }
        }
        fn input<'a>(
            &'a self,
            me: &'a str,
            who: &'a str,
            owner: Option<Option<&str>>,
        ) -> Input<'a> {
            Input {
                me,
                initiator: who,
                view: &self.view,
                owner: owner.map(|o| o.map(String::from)),
                now: self.now,
                lease_valid_until: Some(self.now + Duration::from_secs(2)),
                exclude: &[],
                why: Why::Login,
            }
        }
    }

    #[test]
    fn owned_here_is_served_elsewhere_redirected() {
        let t = T::new();
        assert_eq!(decide(&t.input("a", "x", Some(Some("a")))), Decision::Serve);
        assert_eq!(
            decide(&t.input("a", "x", Some(Some("b")))),
            Decision::Redirect {
                node: "b".into(),
                portal: "127.0.0.1:3262".parse().unwrap()
            }
        );
        assert_eq!(
            decide(&t.input("a", "x", Some(Some("gone")))),
            Decision::Refuse(Refusal::OwnerUnknown("gone".into()))
        );
    }

    #[test]
    fn new_client_goes_to_least_loaded_on_its_lease() {
        let mut t = T::new();
        // Equal: the smallest id wins (deterministic).
        assert_eq!(
            decide(&t.input("b", "x", Some(None))),
            Decision::Claim {
                node: "a".into(),
                lease: 1
            }
        );
        t.view.owners.insert("p".into(), "a".into());
        t.view.owners.insert("q".into(), "b".into());
        assert_eq!(
            decide(&t.input("a", "x", Some(None))),
            Decision::Claim {
                node: "c".into(),
                lease: 3
            }
        );
        // Equal clients: fewer open sessions wins.
        t.view.owners.insert("r".into(), "c".into());
        t.view.nodes.get_mut("a").unwrap().load = 5;
        t.view.nodes.get_mut("b").unwrap().load = 1;
        t.view.nodes.get_mut("c").unwrap().load = 3;
        assert_eq!(
            decide(&t.input("a", "x", Some(None))),
            Decision::Claim {
                node: "b".into(),
                lease: 2
            }
        );
    }

    #[test]
    fn draining_and_excluded_nodes_take_no_new_clients() {
        let mut t = T::new();
        t.view.drained.insert("a".into());
        t.view.nodes.get_mut("b").unwrap().draining = true;
        assert_eq!(
            decide(&t.input("a", "x", Some(None))),
            Decision::Claim {
                node: "c".into(),
                lease: 3
            }
        );
        let mut i = t.input("a", "x", Some(None));
        let ex = vec!["c".to_string()];
        i.exclude = &ex;
        assert_eq!(decide(&i), Decision::Refuse(Refusal::NoNode));
        // A drained node still serves what it owns at login (a running OS reconnecting).
        assert_eq!(decide(&t.input("a", "x", Some(Some("a")))), Decision::Serve);
    }

    #[test]
    fn draining_hands_over_at_next_boot_only() {
        let mut t = T::new();
        t.view.drained.insert("a".into());
        let mut i = t.input("a", "x", Some(Some("a")));
        i.why = Why::Script { idle: true };
        assert_eq!(decide(&i), Decision::Release);
        // A session is open here: the fetch is not a new boot we can act on.
        i.why = Why::Script { idle: false };
        assert_eq!(decide(&i), Decision::Serve);
        // Nobody else to take it: it stays.
        t.view.nodes.remove("b");
        t.view.nodes.remove("c");
        let mut i = t.input("a", "x", Some(Some("a")));
        i.why = Why::Script { idle: true };
        assert_eq!(decide(&i), Decision::Serve);
        // Not draining: a boot script fetch keeps the client where it is (sticky).
        let t = T::new();
        let mut i = t.input("a", "x", Some(Some("a")));
        i.why = Why::Script { idle: true };
        assert_eq!(decide(&i), Decision::Serve);
    }

    #[test]
    fn without_a_lease_this_node_claims_nothing_for_itself() {
        let mut t = T::new();
        t.view.nodes.remove("b");
        t.view.nodes.remove("c");
        let mut i = t.input("a", "x", Some(None));
        i.lease_valid_until = Some(t.now - Duration::from_millis(1));
        assert_eq!(decide(&i), Decision::Refuse(Refusal::NoNode));
        i.lease_valid_until = None;
        assert_eq!(decide(&i), Decision::Refuse(Refusal::NoNode));
        // But it can still place on others.
        let t = T::new();
        let mut i = t.input("a", "x", Some(None));
        i.lease_valid_until = None;
        assert_eq!(
            decide(&i),
            Decision::Claim {
                node: "b".into(),
                lease: 2
            }
        );
    }

    #[test]
    fn etcd_unreachable_serves_only_own_clients_within_the_lease() {
        let mut t = T::new();
        t.view.owners.insert("mine".into(), "a".into());
        t.view.owners.insert("theirs".into(), "b".into());
        assert_eq!(decide(&t.input("a", "mine", None)), Decision::Serve);
        assert_eq!(
            decide(&t.input("a", "theirs", None)),
            Decision::Refuse(Refusal::RegistryUnreachable)
        );
        assert_eq!(
            decide(&t.input("a", "new", None)),
            Decision::Refuse(Refusal::RegistryUnreachable)
        );
        // Past the lease: our keys may be gone at etcd and another node may own the client.
        let mut i = t.input("a", "mine", None);
        i.now += Duration::from_secs(2);
        assert_eq!(decide(&i), Decision::Refuse(Refusal::RegistryUnreachable));
    }

    #[test]
    fn view_follows_changes_and_ignores_junk() {
        let keys = Keys::new("lab");
        let mut v = View::default();
        let put = |k: String, v: &[u8]| Change::Put {
            key: k,
            value: v.to_vec(),
        };
        let r = serde_json::to_vec(&rec(3261, 7)).unwrap();
        v.apply(&keys, &put(keys.node("a"), &r));
        v.apply(&keys, &put(keys.owner("iqn.x:1"), b"a"));
        v.apply(&keys, &put(keys.drain("a"), b""));
        v.apply(&keys, &put("/diskless/other/nodes/z".into(), &r));
        v.apply(&keys, &put(keys.node("bad"), b"{not json"));
        v.apply(&keys, &put(format!("{}nodes/", keys.prefix), &r));
        assert_eq!(v.nodes.len(), 1);
        assert_eq!(v.nodes["a"].lease, 7);
        assert_eq!(v.owners["iqn.x:1"], "a");
        assert!(v.is_draining("a"));
        let s = status(&v);
        assert_eq!(s.nodes.len(), 1);
        assert_eq!(s.nodes[0].clients, 1);
        assert!(s.nodes[0].draining);
        v.apply(
            &keys,
            &Change::Delete {
                key: keys.node("a"),
            },
        );
        v.apply(
            &keys,
            &Change::Delete {
                key: keys.drain("a"),
            },
        );
        assert!(v.nodes.is_empty());
        assert!(!v.is_draining("a"));
        assert_eq!(status(&v).orphans, 1);
    }

    proptest::proptest! {
        /// Whatever the view, a decision never claims for a draining, excluded or unknown
        /// node, never claims for this node without a lease, and a client with an owner is
        /// never claimed again.
        #[test]
        fn decisions_are_safe(
            nodes in proptest::collection::btree_map("[a-d]", (0u64..5, proptest::bool::ANY), 0..4),
            owners in proptest::collection::btree_map("[p-s]", "[a-e]", 0..4),
            drained in proptest::collection::btree_set("[a-d]", 0..2),
            owner in proptest::option::of(proptest::option::of("[a-e]")),
            lease_ok in proptest::bool::ANY,
            script in proptest::bool::ANY,
        ) {
            let mut view = View::default();
            for (i, (id, (load, draining))) in nodes.iter().enumerate() {
                let mut r = rec(3260 + i as u16, i as i64 + 1);
                r.load = *load;
                r.draining = *draining;
                view.nodes.insert(id.clone(), r);
            }
            view.owners = owners.into_iter().collect();
            view.drained = drained;
            let now = Instant::now();
            let input = Input {
                me: "a",
                initiator: "p",
                view: &view,
                owner: owner.clone(),
                now,
                lease_valid_until: lease_ok.then(|| now + Duration::from_secs(1)),
                exclude: &[],
                why: if script { Why::Script { idle: true } } else { Why::Login },
            };
            match decide(&input) {
                Decision::Claim { node, .. } => {
                    proptest::prop_assert!(matches!(owner, Some(None)));
                    proptest::prop_assert!(view.nodes.contains_key(&node));
                    proptest::prop_assert!(!view.is_draining(&node));
                    proptest::prop_assert!(node != "a" || lease_ok);
                }
                Decision::Serve => {
                    let ours = match &owner {
                        Some(o) => o.as_deref() == Some("a"),
                        None => lease_ok && view.owners.get("p").map(String::as_str) == Some("a"),
                    };
                    proptest::prop_assert!(ours);
                }
                Decision::Release => {
                    proptest::prop_assert!(script && view.is_draining("a"));
                }
                Decision::Redirect { node, .. } => {
                    proptest::prop_assert!(node != "a");
                }
                Decision::Refuse(_) => {}
            }
        }
    }
}
