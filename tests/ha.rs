//! Highly available coordinators (ARCHITECTURE.md, "Highly available coordinators"): three
//! coordinators on a real three-member etcd on loopback, one leading; agents given all three
//! addresses. Without an `etcd` binary the tests skip (with a printed reason) unless `CI=true`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::etcd::Cluster;
use common::*;

/// One of the coordinators: its directory (a copy of the first's `init`) and fixed port.
struct Member {
    dir: PathBuf,
    listen: String,
    proc: Option<Proc>,
    /// `--leader-lease`.
    lease: &'static str,
}

impl Member {
    fn start(&mut self, etcd: &[String]) {
        let _ = fs::remove_file(self.dir.join("serve.addr"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("coordinator.log"))
            .unwrap();
        let child = Command::new(COORDINATOR)
            .args(["serve", "--dir"])
            .arg(&self.dir)
            .args(["--listen", &self.listen, "--metrics-listen", "127.0.0.1:0"])
            .args([
                "--provider",
                "none",
                "--store",
                "etcd",
                "--etcd",
                &etcd.join(","),
            ])
            .args([
                "--leader-lease",
                self.lease,
                "--heartbeat-interval",
                "500ms",
            ])
            .args(["--failover-after", "3s"])
            .env("STANDBY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.proc = Some(Proc(child));
    }

    /// Whether it leads (followers listen too, but only the leader writes `serve.addr`).
    fn serves(&self) -> bool {
        self.proc.is_some() && self.dir.join("serve.addr").exists()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("coordinator.log")).unwrap_or_default()
    }
}

struct Site {
    members: Vec<Member>,
    etcd: Cluster,
}

impl Site {
    /// `coordinator init` once, copied to three directories (the CA, token and backup keys are
    /// shared by copying), and three coordinators started on the etcd cluster.
    fn start(root: &Path) -> Option<Site> {
        Self::start_with(root, "4s")
    }

    /// The same with this `--leader-lease`.
    fn start_with(root: &Path, lease: &'static str) -> Option<Site> {
        let etcd = Cluster::start(3)?;
        let first = root.join("c0");
        let st = Command::new(COORDINATOR)
            .args(["init", "--dir"])
            .arg(&first)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        let mut members = Vec::new();
        for i in 0..3 {
            let dir = root.join(format!("c{i}"));
            if i > 0 {
                let st = Command::new("cp")
                    .arg("-a")
                    .arg(&first)
                    .arg(&dir)
                    .status()
                    .unwrap();
                assert!(st.success());
            }
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            members.push(Member {
                dir,
                listen: format!("127.0.0.1:{port}"),
                proc: None,
                lease,
            });
        }
        let mut site = Site { members, etcd };
        let eps = site.etcd.endpoints();
        for m in &mut site.members {
            m.start(&eps);
        }
        Some(site)
    }

    fn addresses(&self) -> String {
        let all: Vec<&str> = self.members.iter().map(|m| m.listen.as_str()).collect();
        all.join(",")
    }

    /// The one member that serves, once exactly one does.
    fn leader(&self, within: Duration) -> usize {
        let mut found = None;
        let ok = wait_until(within, || {
            let serving: Vec<usize> = (0..self.members.len())
                .filter(|&i| self.members[i].serves())
                .collect();
            found = (serving.len() == 1).then(|| serving[0]);
            found.is_some()
        });
        assert!(ok, "no single leader:\n{}", self.logs());
        found.unwrap()
    }

    fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("--- {}\n{}", m.dir.display(), m.log()))
            .collect()
    }

    /// `coordinator pairs --json` through member `i`.
    fn pairs(&self, i: usize) -> Vec<serde_json::Value> {
        let m = &self.members[i];
        let out = Command::new(COORDINATOR)
            .args(["pairs", "--json", "--server", &m.listen, "--tls-dir"])
            .arg(m.dir.join("admin"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Site {
    /// An admin verb through member `i`.
    fn admin(&self, i: usize, args: &[&str]) -> std::process::Output {
        let m = &self.members[i];
        Command::new(COORDINATOR)
            .args(args)
            .args(["--server", &m.listen, "--tls-dir"])
            .arg(m.dir.join("admin"))
            .output()
            .unwrap()
    }

    /// `coordinator status --json` through member `i`.
    fn status(&self, i: usize) -> serde_json::Value {
        let out = self.admin(i, &["status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Member `i`'s `/metrics` (followers serve them too).
    fn metrics(&self, i: usize) -> String {
        let addr = fs::read_to_string(self.members[i].dir.join("metrics.addr")).unwrap();
        http_get(addr.trim(), "/metrics")
    }
}

/// A pair joined by hand through the leader `at` (agents given all three addresses), Syncing
/// with its tree flushed to the CPU. Returns (cpu, gpu).
fn joined_pair(site: &Site, at: usize, root: &Path) -> (Managed, Managed) {
    joined_pair_via(site, at, &site.addresses(), root)
}

/// The same with the agents given `coords` only.
fn joined_pair_via(site: &Site, at: usize, coords: &str, root: &Path) -> (Managed, Managed) {
    let token = |role: &str| join_token(&site.members[at].dir, "p", role, "10m");
    let ws = root.join("gpu-ws");
    make_tree(&ws, &mut rng(seed("ha")), 20, &[1 << 20]);
    let cpu = Managed::cpu(
        coords,
        Some(&token("cpu")),
        &root.join("cpu-ws"),
        &root.join("cpu-state"),
        &[],
    );
    let gpu = Managed::gpu(
        coords,
        Some(&token("gpu")),
        &ws,
        &root.join("gpu-state"),
        &["--debounce", "100ms"],
        &[],
    );
    let ok = wait_until(Duration::from_secs(60), || {
        site.pairs(at)
            .iter()
            .any(|p| p["pair"] == "p" && p["state"] == "Syncing")
            && flush(&gpu.state, "20s").status.success()
    });
    assert!(ok, "{}", site.logs());
    (cpu, gpu)
}

/// kill -9 of the leader: a follower leads within the lease's TTL and a little, the pair's
/// state (epoch, machines) is what the old leader wrote, both agents heartbeat to the new
/// leader, and the pair does not fail over because of the hand-over.
#[test]
fn a_follower_leads_after_the_leader_is_killed_and_the_pair_is_served() {
    let d = tempfile::tempdir().unwrap();
    let Some(mut site) = Site::start(d.path()) else {
        return;
    };
    let first = site.leader(Duration::from_secs(30));
    let (_cpu, gpu) = joined_pair(&site, first, d.path());
    let before = site.pairs(first)[0].clone();

    let killed = Instant::now();
    site.members[first].proc.take(); // kill -9
    let next = site.leader(Duration::from_secs(20));
    assert_ne!(next, first);
    let took = killed.elapsed();
    eprintln!("new leader after {took:?}");
    assert!(took < Duration::from_secs(12), "took {took:?}");
    assert!(site.members[next].log().contains("won the election"));

    // Both agents come back to the new leader, and no failover happens meanwhile.
    let ok = wait_until(Duration::from_secs(30), || {
        site.pairs(next).iter().any(|p| {
            p["pair"] == "p"
                && p["state"] == "Syncing"
                && p["gpu"]["last_heartbeat_ms"]
                    .as_u64()
                    .is_some_and(|ms| ms < 2000)
                && p["cpu"]["last_heartbeat_ms"]
                    .as_u64()
                    .is_some_and(|ms| ms < 2000)
        })
    });
    assert!(
        ok,
        "the agents did not come to the new leader:\n{}",
        site.logs()
    );
    // Heartbeats are never written to etcd: once the agents settled (the record takes their
    // reconnection in the first seconds), 4 s of two agents at 2 Hz (16 heartbeats) with no
    // state change leave etcd's revision where it was (one incidental write allowed).
    let rev0 = site.etcd.revision();
    std::thread::sleep(Duration::from_secs(4));
    let rev = site.etcd.revision();
    eprintln!(
        "etcd writes in the 4 s after the agents came back: {}",
        rev - rev0
    );
    std::thread::sleep(Duration::from_secs(4));
    let writes = site.etcd.revision() - rev;
    let which = site.etcd.written_since(rev);
    eprintln!("etcd writes during 16 heartbeats: {writes} {which:?}");
    assert!(
        writes <= 2,
        "{writes} etcd writes while nothing changed: {which:?}"
    );
    let after = site.pairs(next)[0].clone();
    assert_eq!(after["state"], "Syncing", "{after}");
    assert_eq!(
        after["epoch"], before["epoch"],
        "failed over during the hand-over"
    );
    assert_eq!(after["gpu"]["machine"], before["gpu"]["machine"]);
    assert_eq!(after["cpu"]["machine"], before["cpu"]["machine"]);
    assert!(flush(&gpu.state, "20s").status.success());
}

/// etcd loses its quorum (two of three members killed): the leader stops serving before its
/// lease could expire and exits non-zero (its supervisor restarts it as a follower), and no
/// follower leads meanwhile; when etcd heals, one coordinator leads again.
#[test]
fn without_an_etcd_quorum_nobody_leads_until_it_heals() {
    let d = tempfile::tempdir().unwrap();
    let Some(mut site) = Site::start(d.path()) else {
        return;
    };
    let first = site.leader(Duration::from_secs(30));
    site.etcd.members[0].kill();
    site.etcd.members[1].kill();
    let cut = Instant::now();
    let mut status = None;
    let exited = wait_until(Duration::from_secs(10), || {
        status = site.members[first]
            .proc
            .as_mut()
            .unwrap()
            .0
            .try_wait()
            .unwrap();
        status.is_some()
    });
    let took = cut.elapsed();
    assert!(
        exited,
        "the leader kept serving without etcd:\n{}",
        site.logs()
    );
    eprintln!("the leader stepped down {took:?} after etcd lost its quorum");
    // Its lease is 4 s: it must stop before another could win.
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(!status.unwrap().success());
    assert!(
        site.members[first].log().contains("stepped down"),
        "{}",
        site.logs()
    );
    site.members[first].proc.take();
    // Nobody leads while etcd has no quorum.
    std::thread::sleep(Duration::from_secs(5));
    assert!(site.members.iter().all(|m| !m.serves()), "{}", site.logs());
    // etcd heals: a coordinator leads again (the old leader restarted as its supervisor would).
    site.etcd.members[0].restart();
    site.etcd.members[1].restart();
    let eps = site.etcd.endpoints();
    site.members[first].start(&eps);
    let next = site.leader(Duration::from_secs(40));
    eprintln!("leader {next} after etcd healed");
}

/// kill -9 of the leader while the GPU agent is killed: the failover completes under the new
/// leader, once: the CPU is the primary at the next epoch (its durable epoch says so), and no
/// second failover follows.
#[test]
fn a_failover_completes_under_the_new_leader() {
    let d = tempfile::tempdir().unwrap();
    let Some(mut site) = Site::start(d.path()) else {
        return;
    };
    let first = site.leader(Duration::from_secs(30));
    let (cpu, mut gpu) = joined_pair(&site, first, d.path());
    let before = site.pairs(first)[0]["epoch"].as_u64().unwrap();
    let killed = Instant::now();
    gpu.proc.kill();
    site.members[first].proc.take(); // kill -9
    let next = site.leader(Duration::from_secs(20));
    let mut seen = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(40), || {
        seen = site.pairs(next)[0].clone();
        seen["state"] == "FailedOver"
    });
    assert!(ok, "{seen}\n{}", site.logs());
    eprintln!(
        "failed over under the new leader {:?} after the kills",
        killed.elapsed()
    );
    assert_eq!(seen["epoch"].as_u64(), Some(before + 1), "{seen}");
    assert_eq!(seen["primary"], "cpu", "{seen}");
    let durable = standby::disk::epoch::EpochStore::open(&cpu.state)
        .unwrap()
        .get();
    assert_eq!(durable.0, before + 1, "the CPU's durable epoch");
    // One failover, one epoch: nothing moves on afterwards.
    std::thread::sleep(Duration::from_secs(4));
    let after = site.pairs(next)[0].clone();
    assert_eq!(after["epoch"].as_u64(), Some(before + 1), "{after}");
    assert_eq!(after["state"], "FailedOver", "{after}");
}

/// One etcd member of three lost (kill -9 of the one raft elected leader, the harshest pick):
/// no effect. The coordinator that leads keeps leading (the same process, the same term), a
/// state change goes through (`pair create`), and `coordinator status` shows the leader, the
/// term, the three coordinators and the etcd endpoints before and after; followers export
/// `standby_coordinator_leader 0` and the leader's term, the leader 1.
#[test]
fn one_etcd_member_lost_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    // The default lease (6 s): with 4 s the leader's deadline (2 s) is about as long as etcd
    // takes to elect its next leader, and the leader stepped down in one run of three.
    let Some(mut site) = Site::start_with(d.path(), "6s") else {
        return;
    };
    let first = site.leader(Duration::from_secs(30));
    // Each coordinator puts its membership record when it first campaigns.
    let mut st = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(10), || {
        st = site.status(first);
        st["members"].as_array().map(Vec::len) == Some(3)
    });
    assert!(ok, "{st}\n{}", site.logs());
    let term = st["term"].as_u64().unwrap();
    assert!(term > 0, "{st}");
    let mut all: Vec<String> = site.members.iter().map(|m| m.listen.clone()).collect();
    all.sort();
    let want = serde_json::json!({
        "store": "etcd",
        "answered_by": site.members[first].listen,
        "follower": false,
        "leader": site.members[first].listen,
        "term": term,
        "members": all,
        "etcd_endpoints": site.etcd.endpoints(),
        "pairs": 0,
    });
    assert_eq!(st, want);
    for i in 0..3 {
        let m = site.metrics(i);
        let lead = (i == first) as u8;
        for line in [
            format!("standby_coordinator_leader {lead}"),
            format!("standby_coordinator_term {term}"),
        ] {
            assert!(m.contains(&line), "member {i}: no `{line}`:\n{m}");
        }
    }

    let lost = site.etcd.leader_index().expect("etcd has a leader");
    site.etcd.members[lost].kill();
    let cut = Instant::now();
    let out = site.admin(first, &["pair", "create", "q"]);
    let took = cut.elapsed();
    assert!(
        out.status.success(),
        "pair create after etcd member {lost} was lost: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        site.logs()
    );
    eprintln!("etcd member {lost} (raft's leader) killed; pair create answered after {took:?}");
    // Longer than a lease and a half: a leader that was going to step down would have by now.
    std::thread::sleep(Duration::from_secs(9));
    let proc = &mut site.members[first].proc.as_mut().unwrap().0;
    assert!(
        proc.try_wait().unwrap().is_none(),
        "the leader exited:\n{}",
        site.logs()
    );
    assert!(
        !site.members[first].log().contains("stepped down"),
        "{}",
        site.logs()
    );
    assert_eq!(site.leader(Duration::from_secs(1)), first);
    let after = site.status(first);
    assert_eq!(after["term"].as_u64(), Some(term), "{after}");
    assert_eq!(after["leader"], want["leader"], "{after}");
    assert_eq!(after["members"], want["members"], "{after}");
    assert_eq!(after["pairs"], 1, "{after}");
    assert!(site.pairs(first).iter().any(|p| p["pair"] == "q"));
    // `--server` with all three addresses, the leader's last: `status` is answered by the
    // first (a follower, which names the leader); `pairs` goes on to the leader it names.
    let mut all = site
        .addresses()
        .split(',')
        .map(str::to_string)
        .collect::<Vec<_>>();
    all.retain(|a| *a != site.members[first].listen);
    all.push(site.members[first].listen.clone());
    let via_all = |verb: &[&str]| {
        let out = Command::new(COORDINATOR)
            .args(verb)
            .args(["--json", "--server", &all.join(","), "--tls-dir"])
            .arg(site.members[first].dir.join("admin"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let via = via_all(&["status"]);
    assert_eq!(via["answered_by"].as_str(), Some(all[0].as_str()), "{via}");
    assert_eq!(via["follower"], true, "{via}");
    assert_eq!(via["leader"], want["leader"], "{via}");
    assert_eq!(via["term"].as_u64(), Some(term), "{via}");
    assert_eq!(via["pairs"], serde_json::Value::Null, "{via}");
    let pairs = via_all(&["pairs"]);
    assert!(
        pairs.as_array().unwrap().iter().any(|p| p["pair"] == "q"),
        "{pairs}"
    );
    let m = site.metrics(first);
    assert!(
        m.contains("standby_coordinator_leadership_changes_total{change=\"stepped_down\"} 0"),
        "{m}"
    );
    assert!(
        !m.contains("standby_etcd_request_duration_seconds_count 0"),
        "{m}"
    );
}

/// Followers listen and point to the leader: agents given only a follower's address join and
/// heartbeat to the leader; `coordinator status --server FOLLOWER` names the leader, and an admin
/// verb through a follower reaches the leader. When that leader is killed, the agents (still knowing one follower only)
/// come to the next leader without a failover: the hand-over's missed heartbeats do not count.
#[test]
fn followers_point_agents_and_admins_to_the_leader() {
    let d = tempfile::tempdir().unwrap();
    let Some(mut site) = Site::start(d.path()) else {
        return;
    };
    let first = site.leader(Duration::from_secs(30));
    let follower = (first + 1) % 3;
    let other = (first + 2) % 3;
    let leader_at = site.members[first].listen.clone();
    // A follower names the leader once it has seen the election.
    let mut st = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(10), || {
        st = site.status(follower);
        st["leader"] == leader_at.as_str()
    });
    assert!(ok, "{st}\n{}", site.logs());
    assert_eq!(st["follower"], true, "{st}");
    assert_eq!(
        st["answered_by"],
        site.members[follower].listen.as_str(),
        "{st}"
    );
    assert_eq!(st["store"], "etcd", "{st}");
    assert_eq!(st["pairs"], serde_json::Value::Null, "{st}");
    let text = site.admin(follower, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains(&format!(
            "leader    {leader_at} (answered by {}, a follower)",
            site.members[follower].listen
        )),
        "{text}"
    );

    // Agents given one follower's address only.
    let coords = site.members[follower].listen.clone();
    let (cpu, gpu) = joined_pair_via(&site, first, &coords, d.path());
    // ... reached the leader (it serves the pair) through the follower's pointer.
    for agent in [&cpu, &gpu] {
        let log = fs::read_to_string(&agent.log).unwrap_or_default();
        assert!(log.contains("a follower named the leader"), "{log}");
    }
    // An admin verb through the follower reaches the leader.
    let listed = site.pairs(follower);
    assert!(listed.iter().any(|p| p["pair"] == "p"), "{listed:?}");
    let before = site.pairs(first)[0].clone();

    // The leader goes: the agents, still given the one follower, come to the next leader.
    let killed = Instant::now();
    site.members[first].proc.take(); // kill -9
    let next = site.leader(Duration::from_secs(20));
    assert!(next == follower || next == other);
    let ok = wait_until(Duration::from_secs(30), || {
        site.pairs(next).iter().any(|p| {
            p["pair"] == "p"
                && p["gpu"]["last_heartbeat_ms"]
                    .as_u64()
                    .is_some_and(|ms| ms < 2000)
                && p["cpu"]["last_heartbeat_ms"]
                    .as_u64()
                    .is_some_and(|ms| ms < 2000)
        })
    });
    assert!(
        ok,
        "the agents did not come to the new leader:\n{}",
        site.logs()
    );
    eprintln!(
        "leader {first} killed; both agents heartbeat to leader {next} after {:?}",
        killed.elapsed()
    );
    // No failover because of the hand-over (3 s failover delay, 4 s lease: the agents were
    // silent to every leader for longer than the delay).
    std::thread::sleep(Duration::from_secs(4));
    let after = site.pairs(next)[0].clone();
    assert_eq!(after["state"], "Syncing", "{after}");
    assert_eq!(
        after["epoch"], before["epoch"],
        "failed over during the hand-over"
    );
    assert!(flush(&gpu.state, "20s").status.success());
}
