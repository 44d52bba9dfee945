//! Generated code for Fibril's Hubble-compatible gRPC API. The `.proto` files
//! in `proto/` are the contract; nothing but generated code lives here.
#![allow(clippy::all, missing_docs)]
#![forbid(unsafe_code)]

pub mod flow {
    tonic::include_proto!("flow");
}
pub mod relay {
    tonic::include_proto!("relay");
}
pub mod observer {
    tonic::include_proto!("observer");
}
pub mod peer {
    tonic::include_proto!("peer");
}

/// The encoded `FileDescriptorSet` of proto/ (field names and numbers).
pub const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
