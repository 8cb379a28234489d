//! Benchmark: restore throughput over a shaped link, against the link's rate.
//!
//! `cargo bench --bench restore` (release build, root: network namespaces and `tc`). Two
//! namespaces joined by a veth link whose sending side is shaped with `tc tbf` to
//! `STANDBY_BENCH_RATE_MBIT` (default 200 and 50 Mbit/s). The sender holds a workspace of
//! incompressible data (`STANDBY_BENCH_MIB`, default 192 MiB in big files plus 2000 small
//! ones) and syncs it, verified and durable, into an empty receiver: exactly what a restore
//! onto a new GPU machine does (the same sender and receiver; during a restore the CPU agent
//! sends and the new GPU agent receives). Prints wire throughput (bytes on the connection per
//! second) and payload throughput as fractions of the link rate.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::netns::Net;
use common::*;
use standby::trust::identity::Role;

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        println!("restore benchmark skipped: network namespaces and tc need root");
        return;
    }
    let mib: usize = std::env::var("STANDBY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(192);
    let rates: Vec<u64> = std::env::var("STANDBY_BENCH_RATE_MBIT")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![200, 50]);
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let mut r = rng(7);
    // Incompressible: random bytes, so the wire carries what the link is rated for.
    let big = (mib.saturating_sub(8)).max(1) << 20;
    fs::create_dir_all(src.join("ckpt")).unwrap();
    for (i, part) in [big / 2, big / 4, big / 4].into_iter().enumerate() {
        write_big(&src.join(format!("ckpt/shard-{i}.bin")), &mut r, part);
    }
    for i in 0..2000 {
        let d = src.join(format!("code/{:02}", i % 40));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(format!("f{i}.bin")), bytes(&mut r, 4096)).unwrap();
    }
    let total: u64 = walk_bytes(&src);
    println!(
        "workspace: {:.1} MiB of incompressible data ({} files)",
        total as f64 / (1u64 << 20) as f64,
        2003
    );
    let pki = Pki::new();
    let stls = pki.node("restore", Role::Gpu);
    let rtls = pki.node("restore", Role::Cpu);

    for rate in rates {
        let mut net = Net::new();
        net.host("cpu");
        net.host("gpu");
        let link = net.link("cpu", "gpu", 77);
        link.shape(&format!("{rate}mbit"));
        let dst = t.path().join(format!("dst-{rate}"));
        let rstate = t.path().join(format!("rstate-{rate}"));
        let sstate = t.path().join(format!("sstate-{rate}"));
        fs::create_dir_all(&rstate).unwrap();
        let listen = format!("{}:7701", link.ip_b);
        let log = fs::File::create(t.path().join(format!("recv-{rate}.log"))).unwrap();
        let mut recv = net.cmd("gpu", AGENT_CPU);
        recv.arg("--workspace")
            .arg(&dst)
            .arg("--state-dir")
            .arg(&rstate)
            .arg("--tls-dir")
            .arg(&rtls)
            .args(["--listen", &listen])
            .stdout(Stdio::null())
            .stderr(log);
        let receiver = Proc(recv.spawn().unwrap());
        let ok = wait_until(Duration::from_secs(30), || {
            fs::read_to_string(rstate.join("listen.addr")).is_ok_and(|a| !a.is_empty())
        });
        assert!(ok, "receiver did not start");
        let t0 = Instant::now();
        let out = net
            .cmd("cpu", AGENT_GPU)
            .arg("--workspace")
            .arg(&src)
            .arg("--state-dir")
            .arg(&sstate)
            .arg("--tls-dir")
            .arg(&stls)
            .args(["--peer", &listen, "--once"])
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let wall = t0.elapsed();
        assert!(
            out.status.success(),
            "restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_same(&src, &dst);
        let sent = rep["bytes_sent"].as_u64().unwrap();
        let link_bps = rate as f64 * 1e6;
        let wire = sent as f64 * 8.0 / wall.as_secs_f64();
        let payload = total as f64 * 8.0 / wall.as_secs_f64();
        println!(
            "link {rate:>4} Mbit/s: restored {:.1} MiB in {:.2} s (verified, durable); wire {:.1} Mbit/s = {:.3} of the link; payload {:.1} Mbit/s = {:.3} of the link",
            total as f64 / (1u64 << 20) as f64,
            wall.as_secs_f64(),
            wire / 1e6,
            wire / link_bps,
            payload / 1e6,
            payload / link_bps
        );
        drop(receiver);
        drop(net);
    }
}

fn walk_bytes(p: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in fs::read_dir(p).unwrap().flatten() {
        let m = e.metadata().unwrap();
        if m.is_dir() {
            n += walk_bytes(&e.path());
        } else {
            n += m.len();
        }
    }
    n
}
