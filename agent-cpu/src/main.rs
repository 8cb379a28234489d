//! agent-cpu: the CPU standby. Receives the GPU machine's workspace generation by generation,
//! verified and crash-consistent; probes its GPU peer; becomes the primary when promoted.
//!
//! The program itself is `agent-cpu/src/program.rs`, compiled into the library as
//! `standby::programs::agent_cpu` so that the three binaries share one compiled copy of the async
//! machinery (ARCHITECTURE.md, "One build for three programs").

fn main() {
    standby::programs::agent_cpu::main()
}
