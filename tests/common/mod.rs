//! Support for end-to-end tests: certificates ([`pki`]), the real binaries as processes
//! ([`processes`]), seeded trees and exact snapshots ([`trees`]), the test clouds ([`cloud`],
//! [`fake_gce`], [`fake_vast`]), the `local` provider ([`local`]), network faults ([`netns`]),
//! whole sites ([`site`]), etcd clusters ([`etcd`]) and highly available coordinators on them
//! ([`ha`]).
//! Everything is re-exported here, so a test says `use common::*`.
#![allow(dead_code)]

use std::time::{Duration, Instant};

mod cloud;
#[allow(dead_code)]
#[cfg(feature = "etcd")]
pub mod etcd;
#[allow(dead_code)]
pub mod fake_gce;
#[allow(dead_code)]
pub mod fake_vast;
#[allow(dead_code)]
#[cfg(feature = "etcd")]
pub mod ha;
mod local;
pub mod netns;
mod pki;
mod processes;
#[allow(dead_code)]
pub mod site;
mod trees;

// Each test binary uses a part of this support; a glob it takes nothing from is not an error.
#[allow(unused_imports)]
pub use cloud::*;
#[allow(unused_imports)]
pub use local::*;
#[allow(unused_imports)]
pub use pki::*;
#[allow(unused_imports)]
pub use processes::*;
#[allow(unused_imports)]
pub use trees::*;

/// A seed from `STANDBY_TEST_SEED` or the clock, printed so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("STANDBY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: seed {s} (replay with STANDBY_TEST_SEED={s})");
    s
}

/// Whether privileged tests (tmpfs, network namespaces) can run; in CI they must.
pub fn privileged(test: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: needs root, and CI=true requires it to run");
        }
        eprintln!(
            "{test}: skipped: needs root (run as root, or with CI=true to make this a failure)"
        );
    }
    root
}

/// Polls `f` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain HTTP GET (the metrics endpoint).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
