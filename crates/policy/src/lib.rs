//! Pure policy logic: YAML documents -> validated model -> per-endpoint
//! policy map entries; labels, selectors and identities. No I/O.
#![forbid(unsafe_code)]

pub mod compute;
pub mod document;
pub mod identity;
pub mod labels;
pub mod model;
pub mod selector;

pub use compute::{endpoint_policy, Direction, EndpointPolicy, EntryKey, EntryValue, Origin};
pub use document::{parse, Error, Parsed};
pub use labels::{pod_identity_labels, Label, LabelSet, PodMeta};
pub use model::{PeerRule, Policy, PolicyKind, PortRange, Protocol, Rule};
pub use selector::Selector;
