//! Standby: the shared engine of `agent-gpu`, `agent-cpu` and `coordinator`.
//!
//! The crate is layered; each layer uses only the layers above it in this list
//! (ARCHITECTURE.md, "Layers"):
//!
//! 1. Foundations: [`types`] (epochs, generations, confined paths, pair sides), [`text`]
//!    (hex, error chains), [`host`] (this machine's name and wall clock), [`cli`] (program
//!    plumbing shared by the three binaries), [`proto`] (generated gRPC and record types).
//! 2. [`disk`]: crash-safe state files, confined filesystem calls, state directories,
//!    durable epochs.
//! 3. [`trust`]: certificate identities, the CA, mutual TLS, join tokens.
//! 4. [`replication`]: manifests, scanning and watching a workspace, deltas, the sender,
//!    the receiver and the continuous loop.
//! 5. [`agent`]: the runtime both agents share (node, coordinator link, hooks, probe, NVML,
//!    join, control socket).
//! 6. [`control`]: the coordinator: the failover state machine, the engine, the gRPC service,
//!    the store, metrics and providers.
//!
//! The dependency rule: `types ← disk ← trust ← replication ← agent`. `control` uses the
//! foundations, `disk` and `trust` only: never `replication` or `agent`.

pub mod agent;
pub mod cli;
pub mod control;
pub mod disk;
pub mod host;
pub mod replication;
pub mod text;
pub mod trust;
pub mod types;

pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("standby.v1");

    pub mod state {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("standby.v1.state");
    }

    /// The encoded descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("standby_descriptor");
}
