//! Highly available coordinators (ARCHITECTURE.md, "Highly available coordinators"): three
//! coordinators on a real three-member etcd on loopback, one leading; agents given all three
//! addresses (`common::ha`). Without an `etcd` binary the tests skip (with a printed reason) unless `CI=true`.

mod common;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use common::ha::*;
use common::*;

/// kill -9 of the leader: a follower leads within the lease's TTL and a little, the pair's
/// state (epoch, machines) is what the old leader wrote, both agents heartbeat to the new
/// leader, and the pair does not fail over because of the hand-over.
/// Pair "p" as a leader lists it has heard both its agents within the last 2 s.
fn heard_both(p: &serde_json::Value) -> bool {
    let fresh = |side: &str| {
        p[side]["last_heartbeat_ms"]
            .as_u64()
            .is_some_and(|ms| ms < 2000)
    };
    p["pair"] == "p" && fresh("gpu") && fresh("cpu")
}

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
        site.pairs(next)
            .iter()
            .any(|p| heard_both(p) && p["state"] == "Syncing")
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
    // The transition is persisted before the promote command goes out: the CPU's epoch follows.
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
        "the CPU's durable epoch is {durable}, not {}:\n{}",
        before + 1,
        site.logs()
    );
    eprintln!(
        "the CPU held the new epoch {:?} after the kills",
        killed.elapsed()
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
    let Some(mut site) = Group::start(d.path()) else {
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
        site.pairs(next).iter().any(heard_both)
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
