//! Standby: the shared engine of `agent-gpu`, `agent-cpu` and `coordinator`.
//!
//! Modules, from the bottom layer up:
//! - [`types`]: `Epoch`, `Generation` and `RelPath` (the confinement boundary for paths).
//! - [`crashsafe`]: framed, checksummed, atomically replaced state files and records.
//! - [`fsx`]: confined filesystem operations below a root (no symlink is ever followed).
//! - [`manifest`]: what a replica holds and its blake3 root; [`catalog`] keeps one durably.
//! - [`epoch`]: the durable fencing epoch of an agent; [`statedir`]: one agent per state dir.
//! - [`scan`]: what changed in a workspace; [`delta`]: rsync deltas made safe for the network.
//! - [`stage`]: staging streamed content (direct I/O copies, in-place patches);
//!   [`apply`]: rolling a committed generation forward; [`receive`]: the receiving service.
//! - [`send`]: the sending side of a session; [`watch`]: inotify and the debounced dirty set;
//!   [`replicate`]: the continuous loop (reconnects, flush barriers, RPO figures).
//! - [`control`]: the agent's local control socket; [`cli`]: shared command-line plumbing.
//! - [`identity`], [`pki`], [`tls`]: certificate identities, the CA, mutual TLS.
//! - [`proto`]: generated gRPC and record types.

pub mod agent;
pub mod apply;
pub mod catalog;
pub mod cli;
pub mod control;
pub mod coordinator;
pub mod crashsafe;
pub mod delta;
pub mod engine;
pub mod epoch;
pub mod failover;
pub mod fsx;
pub mod identity;
pub mod join;
pub mod link;
pub mod manifest;
pub mod metrics;
pub mod node;
pub mod nvml;
pub mod pki;
pub mod probe;
pub mod provider;
pub mod receive;
pub mod replicate;
pub mod scan;
pub mod send;
pub mod stage;
pub mod statedir;
pub mod store;
pub mod tls;
pub mod token;
pub mod types;
pub mod watch;
pub mod zstdx;

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
