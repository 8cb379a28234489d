//! Highly available coordinators (ARCHITECTURE.md, "Highly available coordinators"): three
//! coordinators on a real three-member etcd on loopback, one leading; agents given all three
//! addresses. Without an `etcd` binary the tests skip (with a printed reason) unless `CI=true`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::ha::Group;
use common::*;

/// A pair joined by hand through the leader `at` (agents given all three addresses), Syncing
/// with its tree flushed to the CPU. Returns (cpu, gpu).
fn joined_pair(site: &Group, at: usize, root: &Path) -> (Managed, Managed) {
    let coords = site.addresses();
    let token = |role: &str| join_token(&site.members[at].dir, "p", role, "10m");
    let ws = root.join("gpu-ws");
    make_tree(&ws, &mut rng(seed("ha")), 20, &[1 << 20]);
    let cpu = Managed::cpu(
        &coords,
        Some(&token("cpu")),
        &root.join("cpu-ws"),
        &root.join("cpu-state"),
        &[],
    );
    let gpu = Managed::gpu(
        &coords,
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
    let Some(mut site) = Group::start(d.path()) else {
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
    let Some(mut site) = Group::start(d.path()) else {
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
    let Some(mut site) = Group::start(d.path()) else {
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
    // The record is persisted before the CPU is told: its durable epoch follows shortly.
    let mut durable = 0;
    let promoted = wait_until(Duration::from_secs(10), || {
        durable = standby::disk::epoch::EpochStore::open(&cpu.state)
            .unwrap()
            .get()
            .0;
        durable == before + 1
    });
    assert!(
        promoted,
        "the CPU's durable epoch is {durable}\n{}",
        site.logs()
    );
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
    let Some(mut site) = Group::start_with(d.path(), "6s") else {
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
    // `--server` with all three addresses, the leader's last: the first that answers is used,
    // and only the leader listens.
    let mut all = site
        .addresses()
        .split(',')
        .map(str::to_string)
        .collect::<Vec<_>>();
    all.retain(|a| *a != site.members[first].listen);
    all.push(site.members[first].listen.clone());
    let out = Command::new(COORDINATOR)
        .args(["status", "--json", "--server", &all.join(","), "--tls-dir"])
        .arg(site.members[first].dir.join("admin"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let via: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(via["answered_by"], want["leader"], "{via}");
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
