//! Multi-host faults: the coordinator, the GPU agent and the CPU agent each on a host of its own
//! (network namespaces on one bridge). Links are cut between two hosts only, around one host,
//! or around everyone; healed; flapped; shaped with `tc tbf`. Each case asserts whether the
//! pair fails over, that no epoch ever had two primaries, and that flushed data is intact.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::site::{Agent, Site, primaries};
use common::*;

const PAIR: &str = "net";

struct Rig {
    site: Site,
    cpu: Agent,
    gpu: Agent,
    _t: tempfile::TempDir,
}

/// Coordinator (.1), CPU (.2) and GPU (.3) on 10.`subnet`.0.0/24, no provider: the pair is
/// Syncing at epoch 1 with a small tree flushed.
fn rig(subnet: u8) -> Rig {
    let t = tempfile::tempdir().unwrap();
    let mut site = Site::new(t.path(), subnet, &["--provider", "none"], &[]);
    site.lan.host("cpu", 2);
    site.lan.host("gpu", 3);
    let cpu = Agent::start(&site, "cpu", "cpu", PAIR, "cpu-a", 7701, &[]);
    let gpu = Agent::start(
        &site,
        "gpu",
        "gpu",
        PAIR,
        "gpu-a",
        7702,
        &["--debounce", "100ms"],
    );
    make_tree(&gpu.workspace, &mut rng(u64::from(subnet)), 30, &[200_000]);
    let r = Rig {
        site,
        cpu,
        gpu,
        _t: t,
    };
    r.back_to_syncing(Duration::from_secs(60), true);
    assert_same(&r.gpu.workspace, &r.cpu.workspace);
    r
}

impl Rig {
    fn logs(&self) -> String {
        format!(
            "--- coordinator\n{}\n--- gpu\n{}\n--- cpu\n{}",
            self.site.coord_log_text(),
            self.gpu.log_text(),
            self.cpu.log_text()
        )
    }

    /// Runs `f` while sampling the pair every 250 ms; returns every (state, epoch) seen, in
    /// order, without repeats. The sampler stops however `f` ends (a failed assertion in it
    /// fails the test instead of hanging it).
    fn watch(&self, f: impl FnOnce()) -> Vec<(String, u64)> {
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let seen = Mutex::new(Vec::<(String, u64)>::new());
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let _stop = Stop(&done);
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    if let Some(st) = self.site.state(PAIR) {
                        let mut v = seen.lock().unwrap();
                        if v.last() != Some(&st) {
                            v.push(st);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            });
            f();
        });
        seen.into_inner().unwrap()
    }

    /// Epoch -> primaries, from both agents' logs; asserts there is at most one per epoch.
    fn one_primary_per_epoch(&self) -> BTreeMap<u64, Vec<String>> {
        let m = primaries(&[
            ("gpu-a", self.gpu.log_text()),
            ("cpu-a", self.cpu.log_text()),
        ]);
        for (e, who) in &m {
            assert!(
                who.len() <= 1,
                "epoch {e} had primaries {who:?}\n{}",
                self.logs()
            );
        }
        m
    }

    fn write(&self, name: &str, data: &[u8]) {
        fs::write(self.gpu.workspace.join(name), data).unwrap();
    }
}

impl Rig {
    /// After a case that must not fail over: it did not (epoch 1 throughout), the replica
    /// equals the workspace, and one primary per epoch; returns epoch -> primaries.
    fn calm(&self, seen: &[(String, u64)]) -> BTreeMap<u64, Vec<String>> {
        eprintln!("states: {seen:?}");
        for (s, e) in seen {
            assert!(
                *e == 1 && s != "FailedOver",
                "unexpected failover: {seen:?}\n{}",
                self.logs()
            );
        }
        assert_same(&self.gpu.workspace, &self.cpu.workspace);
        self.one_primary_per_epoch()
    }

    /// Waits for Syncing at epoch 1 (and, with `flushed`, a flush that succeeds).
    fn back_to_syncing(&self, within: Duration, flushed: bool) {
        let ok = wait_until(within, || {
            self.site.state(PAIR) == Some(("Syncing".into(), 1))
                && (!flushed || flush(&self.gpu.state, "10s").status.success())
        });
        assert!(ok, "{:?}\n{}", self.site.state(PAIR), self.logs());
    }
}

/// Cuts the coordinator from `host` only for `hold`, with a flush during the cut (replication
/// goes on over the GPU-CPU path), then heals; returns the rig and the states seen.
fn coordinator_link_cut(subnet: u8, host: &str, hold: Duration) -> (Rig, Vec<(String, u64)>) {
    let r = rig(subnet);
    let seen = r.watch(|| {
        r.site.lan.cut("coord", host, true);
        std::thread::sleep(hold);
        r.write("during-cut.txt", b"replicated anyway");
        let out = flush(&r.gpu.state, "20s");
        assert!(out.status.success(), "{}", r.logs());
        r.site.lan.cut("coord", host, false);
        r.back_to_syncing(Duration::from_secs(30), false);
    });
    (r, seen)
}

#[test]
fn gpu_cpu_link_cut_only_no_failover_and_flush_waits() {
    if !privileged("gpu_cpu_link_cut_only_no_failover_and_flush_waits") {
        return;
    }
    let r = rig(81);
    let seen = r.watch(|| {
        r.site.lan.cut("gpu", "cpu", true);
        std::thread::sleep(Duration::from_secs(2));
        r.write("during-cut.txt", b"not durable until the link heals");
        // The barrier must not claim durability it does not have.
        let out = flush(&r.gpu.state, "4s");
        assert!(
            !out.status.success(),
            "flush succeeded with the GPU-CPU link cut\n{}",
            r.logs()
        );
        assert!(!r.cpu.workspace.join("during-cut.txt").exists());
        std::thread::sleep(Duration::from_secs(4));
        r.site.lan.cut("gpu", "cpu", false);
        let ok = wait_until(Duration::from_secs(60), || {
            flush(&r.gpu.state, "10s").status.success()
        });
        assert!(ok, "no flush after the link healed\n{}", r.logs());
    });
    assert_eq!(
        r.calm(&seen),
        BTreeMap::from([(1, vec!["gpu-a".to_string()])])
    );
}

#[test]
fn coordinator_gpu_link_cut_only_no_failover() {
    if !privileged("coordinator_gpu_link_cut_only_no_failover") {
        return;
    }
    let (r, seen) = coordinator_link_cut(82, "gpu", Duration::from_secs(10));
    r.calm(&seen);
    assert!(
        seen.iter().any(|(s, _)| s == "Suspect"),
        "the coordinator should have noticed the silence: {seen:?}"
    );
    assert!(
        r.site.coord_log_text().contains("still reaches it"),
        "{}",
        r.logs()
    );
}

#[test]
fn coordinator_cpu_link_cut_only_no_failover() {
    if !privileged("coordinator_cpu_link_cut_only_no_failover") {
        return;
    }
    let (r, seen) = coordinator_link_cut(83, "cpu", Duration::from_secs(8));
    r.calm(&seen);
}

#[test]
fn gpu_cut_from_everything_fails_over_once_and_stays_fenced() {
    if !privileged("gpu_cut_from_everything_fails_over_once_and_stays_fenced") {
        return;
    }
    let mut r = rig(84);
    r.write("flushed.txt", b"flushed before the cut");
    assert!(flush(&r.gpu.state, "20s").status.success());
    let flushed = snapshot(&r.gpu.workspace);
    let seen = r.watch(|| {
        r.site.lan.isolate("gpu", true);
        let ok = wait_until(Duration::from_secs(30), || {
            r.site
                .state(PAIR)
                .is_some_and(|(s, e)| s == "FailedOver" && e == 2)
        });
        assert!(ok, "no failover\n{}", r.logs());
        // The cut-off GPU goes on writing; the promoted CPU does too.
        r.write("after-cut.txt", b"written on the fenced GPU");
        fs::write(
            r.cpu.workspace.join("on-cpu.txt"),
            b"written on the new primary",
        )
        .unwrap();
        r.site.lan.isolate("gpu", false);
        // Back on the LAN, the old GPU learns the new epoch and stops.
        let ok = wait_until(Duration::from_secs(30), || {
            r.gpu.log_text().contains("fenced")
        });
        assert!(ok, "the old GPU was not fenced\n{}", r.logs());
        std::thread::sleep(Duration::from_secs(3));
    });
    eprintln!("states: {seen:?}");
    let failovers = seen.iter().filter(|(s, _)| s == "FailedOver").count();
    assert_eq!(failovers, 1, "{seen:?}");
    assert!(seen.iter().all(|(_, e)| *e <= 2), "{seen:?}");
    // The old GPU never overwrote the promoted CPU's data.
    assert!(!r.cpu.workspace.join("after-cut.txt").exists());
    assert_eq!(
        fs::read(r.cpu.workspace.join("on-cpu.txt")).unwrap(),
        b"written on the new primary"
    );
    fs::remove_file(r.cpu.workspace.join("on-cpu.txt")).unwrap();
    assert_eq!(diff(&flushed, &snapshot(&r.cpu.workspace)), "");
    let m = r.one_primary_per_epoch();
    assert_eq!(m.get(&2), Some(&vec!["cpu-a".to_string()]), "{m:?}");
    // The GPU is fenced, not dead: a flush is refused rather than claimed.
    assert!(!flush(&r.gpu.state, "3s").status.success());
    r.gpu.kill();
}

#[test]
fn everything_cut_no_failover_then_heals() {
    if !privileged("everything_cut_no_failover_then_heals") {
        return;
    }
    let r = rig(85);
    let seen = r.watch(|| {
        for h in ["coord", "gpu", "cpu"] {
            r.site.lan.isolate(h, true);
        }
        r.write("during-cut.txt", b"written while everything is cut");
        std::thread::sleep(Duration::from_secs(10));
        for h in ["coord", "gpu", "cpu"] {
            r.site.lan.isolate(h, false);
        }
        r.back_to_syncing(Duration::from_secs(60), true);
    });
    // Nobody confirmed the GPU's death: the CPU was out of reach too.
    r.calm(&seen);
}

#[test]
fn flapping_gpu_link_no_failover_nothing_lost() {
    if !privileged("flapping_gpu_link_no_failover_nothing_lost") {
        return;
    }
    let r = rig(86);
    let seen = r.watch(|| {
        for i in 0..10 {
            r.write(&format!("flap-{i}.txt"), format!("cycle {i}").as_bytes());
            r.site.lan.isolate("gpu", true);
            std::thread::sleep(Duration::from_millis(500));
            r.site.lan.isolate("gpu", false);
            std::thread::sleep(Duration::from_millis(1500));
        }
        let ok = wait_until(Duration::from_secs(60), || {
            flush(&r.gpu.state, "10s").status.success()
        });
        assert!(ok, "{}", r.logs());
    });
    r.calm(&seen);
}

#[test]
fn shaped_link_carries_a_big_file_without_false_failover() {
    if !privileged("shaped_link_carries_a_big_file_without_false_failover") {
        return;
    }
    let r = rig(87);
    r.site.lan.shape("gpu", Some("8mbit"));
    let seen = r.watch(|| {
        write_big(
            &r.gpu.workspace.join("checkpoint.bin"),
            &mut rng(87),
            6 << 20,
        );
        let t = Instant::now();
        let out = flush(&r.gpu.state, "120s");
        assert!(out.status.success(), "{}", r.logs());
        eprintln!(
            "6 MiB through an 8 Mbit/s tbf link: flushed in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    });
    r.site.lan.shape("gpu", None);
    r.calm(&seen);
}
