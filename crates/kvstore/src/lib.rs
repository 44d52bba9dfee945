//! The cluster's shared state in etcd, laid out as Cilium's kvstore mode
//! lays it out (Documentation/kvstore.rst), so that the same keys mean the
//! same things:
//!
//! | key | value |
//! |---|---|
//! | `cilium/state/nodes/v1/<cluster>/<node>` | the node (`Node`, JSON) |
//! | `cilium/state/identities/v1/id/<id>` | the identity's labels (`k8s:a=b;...;`) |
//! | `cilium/state/identities/v1/value/<labels>/<node>` | the id (a node's reference) |
//! | `cilium/state/ip/v1/<cluster>/<ip>` | the address's identity and node (`IpIdentity`, JSON) |
//! | `fibril/state/policies/v1/<key>` | a policy document (Fibril's own: there is no policy API without Kubernetes) |
//!
//! Every key an agent owns (its node, its references to identities, its
//! endpoints' addresses) is tied to the agent's lease: an agent that stops
//! renewing it loses them all when it expires. Identity master keys (`id/`)
//! are shared and outlive any one agent; `gc_identities` removes the ones
//! no node references any more.

#![forbid(unsafe_code)]

pub mod identity;
pub mod keys;
pub mod server;
mod store;
pub mod types;

pub use store::{Event, Kvstore, Listing};
pub use types::{IpIdentity, NamedPort, Node};

/// Why a kvstore operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("{key}: {why}")]
    BadValue { key: String, why: String },
    #[error("no cluster-wide identity left (256-65535 are all in use)")]
    Exhausted,
    #[error("etcd did not start: {0}")]
    Start(String),
}
