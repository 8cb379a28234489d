//! coordinator: certificate authority, pairing, failure detection, failover and recovery.

//!
//! The program itself is `coordinator/src/program.rs`, compiled into the library as
//! `standby::programs::coordinator` so that the three binaries share one compiled copy of the async
//! machinery (ARCHITECTURE.md, "One build for three programs").

fn main() {
    standby::programs::coordinator::main()
}
