//! Compiles proto/ with protox (pure Rust, no protoc binary) and generates
//! prost messages and tonic clients and servers.
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../proto");
    let files = ["observer/observer.proto", "peer/peer.proto"].map(|f| root.join(f));
    println!("cargo:rerun-if-changed={}", root.display());
    let fds =
        protox::compile(files, [&root]).unwrap_or_else(|e| panic!("proto/ does not compile: {e}"));
    // The descriptors too, for what needs field names at run time (Hubble's
    // field masks).
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&fds),
    )
    .unwrap_or_else(|e| panic!("writing the descriptors: {e}"));
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating gRPC code: {e}"));
}
