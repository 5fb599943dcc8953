//! Several diskless nodes as one cluster, registered in etcd (docs/scale-out.md).
//!
//! - [`placement`]: the pure core. Membership, load and ownership in, a decision out (serve,
//!   redirect, claim, release, refuse); no sockets, time passed in.
//! - [`etcd`]: the shell. The node's lease and record, the ownership keys ("create if
//!   absent", bound to the owner's lease), a watched copy of the cluster's keys, and the
//!   operator commands (`diskless cluster status`, `diskless node drain`).
//! - [`catalogue`]: the image catalogue (versions, `latest` and channels) shared by all nodes.
//! - [`clients`]: the clients' lifecycle records (written by the owner only), so that any
//!   node can take a client over.
//!
//! Imports only `config` (and nothing above it): the session layer and the boot script
//! endpoint ask [`etcd::Cluster::admit`] and act on the answer.

pub mod catalogue;
pub mod clients;
pub mod etcd;
pub mod placement;

pub use etcd::{Admission, Cluster, ClusterError, Shared};
pub use placement::{Decision, NodeId, NodeRecord, Refusal, View, Why};
