//! The Hubble-compatible observer API: Fibril flows as `flow.Flow`
//! messages, Hubble's `FlowFilter` semantics, and (in `server`) the gRPC
//! services the `hubble` CLI and Hubble Relay talk to.
#![forbid(unsafe_code)]

pub mod convert;
pub mod entry;
pub mod field_mask;
pub mod filter;
pub mod json;
pub mod limits;
pub mod server;
pub mod unix_authority;
