//! The coordinator: pairs, failure detection and failover, provisioning, the admin and
//! agent-facing gRPC service, durable state, metrics and machine providers.
//!
//! This layer uses the foundations, `disk` and `trust`, never `replication` or `agent`.

pub(crate) mod engine;
pub mod failover;
pub mod metrics;
pub mod notify;
pub mod provider;
pub mod service;
pub mod status;
pub(crate) mod store;
pub(crate) mod wire;
