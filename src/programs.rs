//! The three programs: their command lines and what each subcommand does. Each program's code
//! lives in the top-level folder named after it (`agent-gpu/src/program.rs`, ...); its binary's
//! `main.rs` only calls [`agent_gpu::main`] and the like. Compiled here, in the library, rather
//! than in each binary, because an async function is compiled in the crate that polls it: three
//! binaries polling the agent and server futures would each compile tonic, hyper and h2 again
//! (ARCHITECTURE.md, "One build for three programs"). Nothing else in the library uses this
//! module.

#[path = "../agent-cpu/src/program.rs"]
pub mod agent_cpu;
#[path = "../agent-gpu/src/program.rs"]
pub mod agent_gpu;
#[path = "../coordinator/src/program.rs"]
pub mod coordinator;
