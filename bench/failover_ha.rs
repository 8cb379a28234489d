//! Failover after the death of a GPU machine, with a change of leader in the middle (issue 16):
//! three etcd members and three coordinators on loopback (`serve --store etcd`, the
//! coordinator's default timing: a 6 s lease, 1 s heartbeats, a 3 s failover delay;
//! `--provider none`, so no replacement is provisioned), a pair joined by hand with the agents
//! given all three addresses, its tree flushed to the CPU. Then kill -9 of the GPU agent and of
//! the leading coordinator at the same instant, and, from the kills:
//! - **new leader**: a follower wrote `serve.addr` (it won the election and its engine started);
//! - **failed over**: the new leader reports the pair `FailedOver`, the CPU primary, epoch + 1
//!   (`coordinator pairs --json` through it, polled every 50 ms);
//! - **CPU serves**: the CPU agent's durable epoch is the new one, i.e. it was promoted by the
//!   new leader's command and persisted it (its state directory, polled every 50 ms).
//!
//! Each run on a fresh site (etcd, coordinators, agents). `STANDBY_BENCH_RUNS` (default 10).
//! `cargo bench --features etcd --bench failover_ha` (release); needs `etcd` on the PATH.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::ha::{Group, Tuning, joined_pair};
use common::*;

fn runs() -> usize {
    std::env::var("STANDBY_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

/// Seconds from the kills to each milestone of one run.
struct Run {
    leader: f64,
    failed_over: f64,
    cpu_serves: f64,
}

fn main() {
    let n = runs();
    let t = Tuning::DEFAULTS;
    println!(
        "{n} runs: 3 etcd members, 3 coordinators (lease {}, heartbeat {}, failover after {})",
        t.lease, t.heartbeat, t.failover_after
    );
    let mut done = Vec::new();
    let mut failed = 0;
    for i in 0..n {
        match one() {
            Ok(r) => {
                println!(
                    "run {i}: new leader {:.2} s, failed over {:.2} s, CPU serves {:.2} s",
                    r.leader, r.failed_over, r.cpu_serves
                );
                done.push(r);
            }
            Err(e) => {
                println!("run {i}: FAILED: {e}");
                failed += 1;
            }
        }
    }
    report(&done, failed);
}

/// One run on a fresh site.
fn one() -> Result<Run, String> {
    let d = tempfile::tempdir().unwrap();
    let mut site = Group::start_tuned(d.path(), Tuning::DEFAULTS).ok_or("etcd is not installed")?;
    let first = site.leader(Duration::from_secs(30));
    let (cpu, mut gpu) = joined_pair(&site, first, d.path());
    let before = site.pairs(first)[0]["epoch"]
        .as_u64()
        .ok_or("no epoch before the kills")?;
    // Let the followers see the election settle and the pair run a few heartbeats.
    std::thread::sleep(Duration::from_secs(2));

    let killed = Instant::now();
    gpu.proc.kill();
    site.members[first].proc.take(); // kill -9
    let limit = Duration::from_secs(60);
    let mut next = None;
    let leader_ok = wait_until(limit, || {
        next = (0..3).find(|&m| m != first && site.members[m].serves());
        next.is_some()
    });
    let next = next
        .filter(|_| leader_ok)
        .ok_or("no new leader within 60 s")?;
    let leader = killed.elapsed().as_secs_f64();
    let (mut failed_over, mut cpu_serves) = (None, None);
    let ok = poll(limit, || {
        let at = killed.elapsed().as_secs_f64();
        if cpu_serves.is_none() {
            let e = standby::disk::epoch::EpochStore::open(&cpu.state).map(|s| s.get().0);
            if e.is_ok_and(|e| e == before + 1) {
                cpu_serves = Some(at);
            }
        }
        if failed_over.is_none() {
            let p = pair_at(&site, next);
            if p["state"] == "FailedOver"
                && p["primary"] == "cpu"
                && p["epoch"].as_u64() == Some(before + 1)
            {
                failed_over = Some(killed.elapsed().as_secs_f64());
            }
        }
        failed_over.is_some() && cpu_serves.is_some()
    });
    if !ok {
        return Err(format!(
            "failed over {failed_over:?}, CPU serves {cpu_serves:?} after 60 s:\n{}",
            site.logs()
        ));
    }
    Ok(Run {
        leader,
        failed_over: failed_over.unwrap(),
        cpu_serves: cpu_serves.unwrap(),
    })
}

/// The pair as coordinator `m` lists it (null when it does not answer yet).
fn pair_at(site: &Group, m: usize) -> serde_json::Value {
    let out = site.admin(m, &["pairs", "--json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.get(0).cloned())
        .unwrap_or_default()
}

/// Calls `f` every 50 ms until it is true or `limit` passed.
fn poll(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn report(done: &[Run], failed: usize) {
    let stat = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = done.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        let median = match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        let (min, max) = (v.first().copied(), v.last().copied());
        (median, min.unwrap_or(f64::NAN), max.unwrap_or(f64::NAN))
    };
    println!();
    println!("| from the kills to | median | min | max |");
    println!("|---|---|---|---|");
    type Measure = fn(&Run) -> f64;
    let rows: [(&str, Measure); 3] = [
        ("a new leader serves", |r| r.leader),
        (
            "the new leader reports the pair FailedOver (CPU primary, epoch + 1)",
            |r| r.failed_over,
        ),
        ("the CPU agent holds the new epoch (promoted)", |r| {
            r.cpu_serves
        }),
    ];
    for (what, f) in rows {
        let (median, min, max) = stat(f);
        println!("| {what} | {median:.2} s | {min:.2} s | {max:.2} s |");
    }
    println!(
        "({} runs completed, {failed} failed; loopback, this machine's shared cores)",
        done.len()
    );
}
