//! Pure policy logic: YAML documents -> validated model -> per-endpoint
//! policy map entries; labels, selectors and identities. No I/O.
#![forbid(unsafe_code)]

pub mod cidr;
pub mod compute;
pub mod document;
pub mod engine;
pub mod identity;
mod knp;
pub mod labels;
pub mod model;
pub mod selector;

pub use compute::{
    endpoint_policy, Context, Decision, Direction, EndpointPolicy, EntryKey, EntryValue, Origin,
};
pub use document::{parse, parse_object, Error, Parsed, Warning};
pub use engine::Engine;
pub use labels::{pod_identity_labels, Label, LabelSet, PodMeta};
pub use model::{
    kafka_api_key, HeaderMatch, HttpRule, KafkaRule, NamedPort, Peer, PeerRule, Policy, PolicyKind,
    Port, PortRule, PortSpec, Protocol, Rule, KAFKA_API_KEYS, L7,
};
pub use selector::Selector;
