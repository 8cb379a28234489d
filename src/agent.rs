//! The runtime both agents share: what a machine in a pair runs besides replication itself.

pub mod join;
pub mod link;
pub mod node;
pub mod nvml;
pub mod probe;
pub mod runtime;
pub mod socket;
