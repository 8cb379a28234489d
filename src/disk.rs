//! Durable local state: crash-safe files, confined filesystem calls, state directories and
//! the agent's durable epoch and the newest coordinator term it has seen. Nothing here knows about the network.

pub(crate) mod crashsafe;
pub mod epoch;
pub mod fsx;
pub(crate) mod statedir;
pub mod term;
pub mod xattr;
