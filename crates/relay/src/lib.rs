//! Hubble Relay: one `observer.Observer` for the whole cluster. It finds
//! the nodes through an agent's `peer.Peer/Notify` (`peers`), asks every
//! node and merges their streams in time order (`merge`, `service`).
#![forbid(unsafe_code)]

pub mod merge;
pub mod peers;
pub mod raw;
pub mod service;
