//! Compiles `proto/` with protox (pure Rust), so a fresh machine needs nothing but cargo.
//! The encoded descriptor set is also written to `OUT_DIR` for gRPC reflection.

use std::path::PathBuf;

/// The fields that carry file content or signatures: read once, passed on, dropped.
const BULK_PAYLOADS: [&str; 4] = [
    ".standby.v1.Upsert.inline",
    ".standby.v1.Chunk",
    ".standby.v1.Signature.data",
    ".standby.v1.FetchItem.data",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let protos = [
        "proto/standby/v1/replication.proto",
        "proto/standby/v1/state.proto",
        "proto/standby/v1/coordinator.proto",
        "proto/standby/v1/history.proto",
    ];
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("standby_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Only bulk payloads decode as `Bytes` (a zero-copy slice of the received message). A small
    // field kept for long — a manifest entry's hash or link target, a path — would pin the
    // whole message buffer it arrived in for as long as the manifest holds it (ARCHITECTURE.md,
    // "Memory"), so those decode as their own `Vec<u8>`.
    BULK_PAYLOADS
        .into_iter()
        .fold(tonic_prost_build::configure(), |b, path| b.bytes(path))
        .compile_fds(fds)?;
    Ok(())
}
