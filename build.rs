//! Compiles `proto/` with protox (pure Rust), so a fresh machine needs nothing but cargo.
//! The encoded descriptor set is also written to `OUT_DIR` for gRPC reflection.

use std::path::PathBuf;

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
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
