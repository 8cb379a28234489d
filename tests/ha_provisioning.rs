//! kill -9 of the leading coordinator mid-provisioning (ARCHITECTURE.md, "Highly available
//! coordinators"): three coordinators on a three-member etcd provision a replacement GPU from
//! the stateful fake of Vast.ai (`common::fake_vast`, instances that run the real on-start
//! script and agent), and the leader is killed at seeded points of one provisioning: with the
//! intent written and the offer search unanswered, with the create call made (the instance
//! exists, labelled: Vast.ai takes the label in the create) and its answer lost or just
//! delivered, and during the restore. Each time the killed coordinator is started again (its
//! supervisor) and the next leader finishes the work. Instances boot a second after the create,
//! so the new machine's agent starts while no coordinator leads and must wait to join.
//! Afterwards: the fake holds exactly the pair's machine, created once, none destroyed; one
//! primary per epoch; the replica and the new GPU hold the source's tree. `STANDBY_SOAK=1` runs
//! five seeds instead of one.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::etcd::Cluster;
use common::fake_vast::{self, Faults, Held, Hold, VastState};
use common::ha::{Group, Placement, Tuning};
use common::site::primaries;
use common::*;
use rand::RngExt;
use serde_json::json;

const PAIR: &str = "prov";

fn offer(id: u64, machine: u64, price: f64) -> serde_json::Value {
    json!({
        "id": id, "machine_id": machine, "host_id": machine * 10, "gpu_name": "RTX 4090",
        "num_gpus": 1, "gpu_ram": 24564, "dph_total": price, "reliability2": 0.99,
        "inet_down": 800.0, "disk_space": 200.0, "geolocation": "Oregon, US",
        "verified": true, "rentable": true,
    })
}

/// Where the leader is killed, with the pause after reaching the point (seeded).
#[derive(Clone, Copy, Debug)]
enum Point {
    /// The intent is durable, the offer search unanswered: nothing created.
    Search,
    /// The create call made and its instance booting; `answered`: the answer was delivered
    /// before the kill, otherwise it is lost with the leader.
    Create { answered: bool },
    /// The pair is Restoring (the CPU sends to the new GPU at 1 MB/s).
    Restore,
}

/// The chain of kills for `seed`: one of each point, in the order provisioning passes them,
/// each with a pause of 0–400 ms after the point is reached.
fn chain(seed: u64) -> Vec<(Point, Duration)> {
    let mut r = rng(seed);
    let mut pause = || Duration::from_millis(r.random_range(0..400));
    let answered = rng(seed ^ 0x5eed).random_bool(0.5);
    vec![
        (Point::Search, pause()),
        (Point::Create { answered }, pause()),
        (Point::Restore, pause()),
    ]
}

struct Rig {
    group: Group,
    vast: fake_vast::Shared,
    cpu: Managed,
    gpu: Option<Managed>,
    gpu_log: std::path::PathBuf,
    source: std::path::PathBuf,
    _reaper: fake_vast::Reaper,
}

/// A group on the fake cloud with a pair Syncing (its tree flushed to the CPU); None when etcd
/// is missing.
fn rig(t: &Path, seed: u64) -> Option<Rig> {
    let etcd = Cluster::start(3)?;
    let vast = Arc::new(Mutex::new(VastState {
        key: "sekrit-key".into(),
        offers: vec![offer(201, 1, 0.30), offer(202, 2, 0.40)],
        // Machines boot a second after the create: their agent joins during the hand-over.
        faults: Faults {
            boot_after: Duration::from_secs(1),
            ..Faults::default()
        },
        instances: BTreeMap::new(),
        next_id: 7000,
        dir: t.join("vast"),
        agent_bin: Path::new(AGENT_GPU).to_path_buf(),
        script: Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/vastai-onstart.sh"),
        log: Vec::new(),
        hold: None,
    }));
    let url = fake_vast::serve(vast.clone());
    let reaper = fake_vast::Reaper(vast.clone());
    let keyfile = t.join("vast.key");
    fs::write(&keyfile, "sekrit-key\n").unwrap();
    let toml = t.join("provision.toml");
    fs::write(&toml, "[provision.gpu]\ngpu_name = \"4090\"\n").unwrap();
    let extra = [
        "--provider",
        "vastai",
        "--vastai-url",
        &url,
        "--vastai-api-key-file",
        keyfile.to_str().unwrap(),
        "--boot-timeout",
        "60s",
        "--backoff-base",
        "200ms",
        "--config",
        toml.to_str().unwrap(),
    ];
    let group = Group::on(t, etcd, Tuning::TESTS, &extra, Placement::Loopback);
    let leader = group.leader(Duration::from_secs(30));
    let source = t.join("gpu-ws");
    // Two 4 MiB files: the restore at 1 MB/s takes about 8 s, long enough to kill in.
    make_tree(&source, &mut rng(seed), 20, &[4 << 20, 4 << 20]);
    let coords = group.addresses();
    let token = |role: &str| join_token(&group.members[leader].dir, PAIR, role, "10m");
    let cpu = Managed::cpu(
        &coords,
        Some(&token("cpu")),
        &t.join("cpu-ws"),
        &t.join("cpu-state"),
        &["--bwlimit", "1MB", "--machine", "cpu-a"],
    );
    let gpu = Managed::gpu(
        &coords,
        Some(&token("gpu")),
        &source,
        &t.join("gpu-state"),
        &["--debounce", "100ms", "--machine", "gpu-a"],
        &[],
    );
    let ok = wait_until(Duration::from_secs(60), || {
        group
            .pair(PAIR)
            .is_some_and(|p| p["state"] == "Syncing" && p["epoch"] == 1)
            && flush(&gpu.state, "20s").status.success()
    });
    assert!(ok, "{}", group.logs());
    Some(Rig {
        group,
        vast,
        cpu,
        gpu_log: gpu.log.clone(),
        gpu: Some(gpu),
        source,
        _reaper: reaper,
    })
}

impl Rig {
    /// kill -9 of the leader, then (as its supervisor would) it starts again as a follower;
    /// returns when another coordinator leads.
    fn kill_leader(&mut self, why: &str) {
        let leader = self.group.leader(Duration::from_secs(30));
        self.group.members[leader].kill();
        let killed = Instant::now();
        self.group.restart(leader);
        let next = self.group.leader(Duration::from_secs(30));
        eprintln!(
            "{why}: killed leader {leader}; {next} leads after {:?}",
            killed.elapsed()
        );
    }

    fn hold(&self, at: Held) -> Arc<Hold> {
        let h = Hold::new(at);
        self.vast.lock().unwrap().hold = Some(h.clone());
        h
    }

    fn reach(&self, h: &Hold, what: &str) {
        let ok = wait_until(Duration::from_secs(90), || h.reached());
        assert!(ok, "{what} never came:\n{}", self.group.logs());
    }

    /// The kill at `point`, after `pause`.
    fn kill_at(&mut self, point: Point, pause: Duration, next: Option<&Arc<Hold>>) {
        match point {
            Point::Search => {
                let h = self.hold(Held::Search);
                if self.gpu.take().is_some() {
                    eprintln!("GPU agent killed");
                }
                self.reach(&h, "the offer search");
                if let Some(n) = next {
                    self.vast.lock().unwrap().hold = Some(n.clone());
                }
                std::thread::sleep(pause);
                self.kill_leader("intent written, search unanswered");
                h.release();
            }
            Point::Create { answered } => {
                let h = next.expect("the create hold").clone();
                self.reach(&h, "the create call");
                if answered {
                    h.release();
                }
                std::thread::sleep(pause);
                self.kill_leader(if answered {
                    "create answered"
                } else {
                    "instance created, answer lost"
                });
                h.release();
            }
            Point::Restore => {
                let ok = wait_until(Duration::from_secs(90), || {
                    self.group
                        .pair(PAIR)
                        .is_some_and(|p| p["state"] == "Restoring")
                });
                assert!(ok, "never Restoring:\n{}", self.group.logs());
                std::thread::sleep(pause);
                self.kill_leader("during the restore");
            }
        }
    }
}

#[test]
fn the_next_leader_finishes_a_provisioning_its_leader_died_in() {
    let soak = std::env::var("STANDBY_SOAK").as_deref() == Ok("1");
    let first = seed("ha_provisioning");
    let seeds: Vec<u64> = if soak {
        (0..5).map(|i| first.wrapping_add(i)).collect()
    } else {
        vec![first]
    };
    for s in seeds {
        let t = tempfile::tempdir().unwrap();
        if !one_provisioning(t.path(), s) {
            return;
        }
    }
}

/// One provisioning with the chain of kills of `seed`; false when etcd is missing (skipped).
fn one_provisioning(t: &Path, seed: u64) -> bool {
    let points = chain(seed);
    eprintln!("seed {seed}: {points:?}");
    let Some(mut r) = rig(t, seed) else {
        return false;
    };
    let create = Hold::new(Held::Create);
    for (point, pause) in points {
        r.kill_at(point, pause, Some(&create));
    }
    let ok = wait_until(Duration::from_secs(120), || {
        r.group
            .pair(PAIR)
            .is_some_and(|p| p["state"] == "Syncing" && p["epoch"] == 3)
    });
    let st = r.vast.lock().unwrap();
    assert!(
        ok,
        "not recovered: {:?}\n{}\nrequests: {:?}",
        r.group.pair(PAIR),
        r.group.logs(),
        st.log
    );
    // No machine leaked, none made twice: the one instance is the pair's, created once.
    let creates = st.log.iter().filter(|l| l.starts_with("PUT /api/v0/asks/"));
    assert_eq!(creates.count(), 1, "requests: {:?}", st.log);
    assert!(
        !st.log.iter().any(|l| l.starts_with("DELETE ")),
        "requests: {:?}",
        st.log
    );
    assert_eq!(st.instances.len(), 1, "requests: {:?}", st.log);
    let inst = st.instances.values().next().unwrap();
    let p = r.group.pair(PAIR).unwrap();
    assert_eq!(p["gpu"]["machine"], inst.label.as_str(), "{p}");
    // One primary per epoch, from every agent's log.
    let logs = [
        ("gpu-a", fs::read_to_string(&r.gpu_log).unwrap_or_default()),
        ("cpu-a", r.cpu.log_text()),
        (
            inst.label.as_str(),
            fs::read_to_string(inst.state_dir.join("agent.log")).unwrap_or_default(),
        ),
    ];
    // It booted while no coordinator led, and waited for the next leader to join (no
    // coordinator answered, or one answered as a follower while none led).
    let waited = logs[2].1.contains("joining again until the token expires");
    assert!(
        waited,
        "the new machine did not wait to join:\n{}",
        logs[2].1
    );
    let by_epoch = primaries(&logs);
    eprintln!("primaries by epoch: {by_epoch:?}");
    for (e, who) in &by_epoch {
        assert!(who.len() <= 1, "epoch {e} had primaries {who:?}");
    }
    // The data: the replica is the source's tree, and so is the new GPU's workspace.
    assert_same(&r.source, &r.cpu.workspace);
    assert_same(&r.cpu.workspace, &inst.workspace);
    let out = flush(&inst.state_dir, "20s");
    assert!(
        out.status.success(),
        "the new GPU cannot flush: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let won = r
        .group
        .members
        .iter()
        .map(|m| m.log().matches("won the election").count())
        .sum::<usize>();
    eprintln!(
        "seed {seed}: recovered on {} after {won} elections",
        inst.label
    );
    assert!(won >= 4, "three kills, four leaders at least: {won}");
    true
}
