//! agent-gpu: runs on each GPU machine. Watches the workspace and streams verified block deltas
//! of every change straight to its paired agent-cpu; heartbeats its health to the coordinator.
//!
//! The program itself is `agent-gpu/src/program.rs`, compiled into the library as
//! `standby::programs::agent_gpu` so that the three binaries share one compiled copy of the async
//! machinery (ARCHITECTURE.md, "One build for three programs").

fn main() {
    standby::programs::agent_gpu::main()
}
