//! The runtime both agents share: what a machine in a pair runs besides replication itself.
//!
//! From the command line in: [`args`] resolves flags, environment and file into an
//! [`config::AgentConfig`]; [`runtime`] opens the identity (`join`) and the replica and runs
//! the agent: its `endpoint`, its local control [`socket`], the `node` that replicates in
//! whichever direction its mode says (running the operator's `hooks` when the role changes),
//! and, when a coordinator manages it, the `managed` tasks: the heartbeat `link` carrying
//! each `report`, the CPU's `probe` of its GPU peer, GPU health from `nvml`, certificate
//! `renewal` and the coordinator's `revocations`. A CPU standby keeps point-in-time history
//! (`snapshots`, served by [`versions`]), backs it up off-site (`backups`), and a new standby of a
//! pair rebuilt from its backup is filled from the bucket (`seed`).

pub mod args;
pub(crate) mod backups;
pub mod config;
pub(crate) mod endpoint;
pub(crate) mod hooks;
pub(crate) mod join;
pub(crate) mod link;
pub(crate) mod managed;
pub mod metrics;
pub(crate) mod node;
pub(crate) mod nvml;
pub(crate) mod probe;
pub(crate) mod renewal;
pub(crate) mod report;
pub(crate) mod revocations;
pub mod runtime;
pub(crate) mod seed;
pub(crate) mod snapshots;
pub mod socket;
pub mod versions;
