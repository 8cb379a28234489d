//! The leader cut from etcd (ARCHITECTURE.md, "Highly available coordinators"): a three-member
//! etcd on a host of its own, each of three coordinators on its own host, the pair's agents on
//! theirs (network namespaces on one bridge, `common::netns`). Blackhole routes cut the leader
//! from etcd only: agents still reach it. It must stop commanding before its lease could expire,
//! a follower must lead in a newer term, and when the old leader's link heals it follows. An old
//! leader that would command anyway — a coordinator at its address with its certificate, sending
//! Promote and Fence with its old term (the honest one steps down, so this one is scripted) — is
//! refused by both agents, which keep their roles, their epoch and their data. Needs root: runs
//! when `CI=true`, skips with a reason otherwise.

mod common;

use std::fs;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::etcd::{Cluster, enter_netns};
use common::ha::{Group, Placement, Tuning};
use common::netns::Lan;
use common::site::{Agent, Coordinators, primaries};
use common::*;
use standby::proto::command::Cmd;
use standby::proto::coordinator_server::{Coordinator, CoordinatorServer};
use standby::proto::{AgentReport, Command, Fence, JoinReply, JoinRequest, Promote};
use standby::trust::tls::{self, TlsMaterial};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

const PAIR: &str = "cut";
const LEASE: Duration = Duration::from_secs(4);

/// Coordinators c0..c2 (.1–.3), etcd (.10), the CPU (.21) and the GPU (.22) agents.
struct Rig {
    group: Group,
    cpu: Agent,
    gpu: Agent,
    lan: Lan,
    _t: tempfile::TempDir,
}

fn host(i: usize) -> String {
    format!("c{i}")
}

/// The rig with the pair Syncing at epoch 1, its tree flushed; None when etcd is missing.
fn rig(subnet: u8) -> Option<Rig> {
    let t = tempfile::tempdir().unwrap();
    let mut lan = Lan::new(subnet);
    let etcd_ip = lan.host("etcd", 10);
    let mut place = Vec::new();
    for i in 0..3 {
        let ip = lan.host(&host(i), i as u8 + 1);
        place.push((lan.ns(&host(i)), ip));
    }
    lan.host("cpu", 21);
    lan.host("gpu", 22);
    let etcd = Cluster::start_in(3, &lan.ns("etcd"), &etcd_ip)?;
    let group = Group::on(
        t.path(),
        etcd,
        Tuning::TESTS,
        &["--provider", "none"],
        Placement::Namespaces(place),
    );
    let leader = group.leader(Duration::from_secs(30));
    let token = |role| join_token(&group.members[leader].dir, PAIR, role, "10m");
    let urls = group.addresses();
    let (cpu_token, gpu_token) = (token("cpu"), token("gpu"));
    let to = |token| Coordinators {
        lan: &lan,
        dir: t.path(),
        urls: &urls,
        token,
    };
    let cpu = Agent::start_on(&to(&cpu_token), "cpu", "cpu", "cpu-a", 7701, &[]);
    let gpu = Agent::start_on(
        &to(&gpu_token),
        "gpu",
        "gpu",
        "gpu-a",
        7702,
        &["--debounce", "100ms"],
    );
    make_tree(&gpu.workspace, &mut rng(seed("ha_netns")), 30, &[300_000]);
    let r = Rig {
        group,
        cpu,
        gpu,
        lan,
        _t: t,
    };
    r.syncing_and_flushed(Duration::from_secs(60));
    Some(r)
}

impl Rig {
    fn logs(&self) -> String {
        format!(
            "{}\n--- gpu\n{}\n--- cpu\n{}",
            self.group.logs(),
            self.gpu.log_text(),
            self.cpu.log_text()
        )
    }

    /// Syncing at epoch 1, heard from both agents within 2 s, and a flush that succeeds.
    fn syncing_and_flushed(&self, within: Duration) {
        let fresh = |p: &serde_json::Value, side: &str| {
            p[side]["last_heartbeat_ms"]
                .as_u64()
                .is_some_and(|ms| ms < 2000)
        };
        let ok = wait_until(within, || {
            self.group.pair(PAIR).is_some_and(|p| {
                p["state"] == "Syncing" && p["epoch"] == 1 && fresh(&p, "gpu") && fresh(&p, "cpu")
            }) && flush(&self.gpu.state, "10s").status.success()
        });
        assert!(ok, "{:?}\n{}", self.group.pair(PAIR), self.logs());
    }

    fn term(&self, i: usize) -> u64 {
        self.group.status(i)["term"].as_u64().unwrap()
    }
}

/// When a coordinator's log says it stepped down: the timestamp that starts the line.
fn stepped_down_at(log: &str) -> Option<SystemTime> {
    let line = log.lines().find(|l| l.contains("stepping down"))?;
    humantime::parse_rfc3339(line.split_whitespace().next()?).ok()
}

#[test]
fn a_leader_cut_from_etcd_stops_commanding_and_its_old_term_is_refused() {
    let test = "a_leader_cut_from_etcd_stops_commanding_and_its_old_term_is_refused";
    if !privileged(test) {
        return;
    }
    let Some(mut r) = rig(93) else {
        return;
    };
    let old = r.group.leader(Duration::from_secs(5));
    let old_term = r.term(old);
    assert!(
        r.group
            .metrics(old)
            .contains("standby_coordinator_leader 1")
    );

    // Cut the leader from etcd only: the agents still reach it.
    r.lan.cut(&host(old), "etcd", true);
    let (cut, cut_at) = (Instant::now(), SystemTime::now());
    let mut status = None;
    let exited = wait_until(2 * LEASE, || {
        status = r.group.members[old].exited();
        status.is_some()
    });
    let stopped = cut.elapsed();
    assert!(exited, "the cut leader kept serving:\n{}", r.logs());
    assert!(!status.unwrap().success(), "{status:?}");
    // It stops commanding when it steps down (its term goes to 0); leaving the process can take
    // longer on a loaded machine, and only has to happen.
    let log = r.group.members[old].log();
    let stepped = stepped_down_at(&log).unwrap_or_else(|| panic!("no 'stepping down':\n{log}"));
    let stepped = stepped.duration_since(cut_at).unwrap_or_default();
    eprintln!(
        "the cut leader stepped down after {stepped:?}, exited after {stopped:?} (lease {LEASE:?})"
    );
    assert!(stepped < LEASE, "it led past its lease: {stepped:?}");
    r.group.members[old].kill(); // reaped: it no longer counts as serving

    // A follower leads, in a newer term, and the pair is served without a failover.
    let new = r.group.leader(Duration::from_secs(20));
    let took = cut.elapsed();
    assert_ne!(new, old);
    let new_term = r.term(new);
    eprintln!("coordinator {new} leads after {took:?}, term {old_term} -> {new_term}");
    assert!(new_term > old_term);
    r.syncing_and_flushed(Duration::from_secs(30));

    // The link heals and the old leader starts again (its supervisor): it follows.
    r.lan.cut(&host(old), "etcd", false);
    r.group.restart(old);
    let ok = wait_until(Duration::from_secs(10), || {
        r.group.members[old].try_metrics().is_some_and(|m| {
            m.contains("standby_coordinator_leader 0")
                && m.contains(&format!("standby_coordinator_term {new_term}"))
        })
    });
    assert!(ok, "the old leader does not follow:\n{}", r.logs());
    assert!(!r.group.members[old].serves());
    assert_eq!(r.group.leader(Duration::from_secs(1)), new);

    refused_from_the_old_address(&mut r, old, old_term, new);
}

/// What a coordinator at `old`'s address, with its certificate, would have the agents do at
/// its `term`: the CPU promoted and the GPU fenced at the next epoch. The agents reach it once
/// the leader `new` is gone; both must refuse, and the pair goes on at epoch 1 with the GPU
/// primary once a coordinator leads again.
fn refused_from_the_old_address(r: &mut Rig, old: usize, term: u64, new: usize) {
    r.group.members[old].kill();
    let m = &r.group.members[old];
    let material = TlsMaterial::load(&m.dir.join("server")).unwrap();
    let stale = StaleLeader::serve(m.ns.clone().unwrap(), &m.listen, material, term);
    let cpu_term = standby::disk::term::TermStore::open(&r.cpu.state)
        .unwrap()
        .newest();
    assert!(cpu_term > term, "the CPU saw term {cpu_term}");
    // The agents leave the leader when it dies, and try the others in turn.
    r.group.members[new].kill();
    let ok = wait_until(Duration::from_secs(20), || {
        let seen = stale.seen.lock().unwrap();
        seen.iter().any(|s| s.contains("/cpu/")) && seen.iter().any(|s| s.contains("/gpu/"))
    });
    assert!(
        ok,
        "the agents never reached the old address: {:?}\n{}",
        stale.seen.lock().unwrap(),
        r.logs()
    );
    let refusal = format!("term={term}");
    let ok = wait_until(Duration::from_secs(10), || {
        [r.cpu.log_text(), r.gpu.log_text()].iter().all(|l| {
            l.lines()
                .filter(|l| l.contains("refusing a command from an older coordinator term"))
                .filter(|l| l.split_whitespace().any(|f| f == refusal))
                .count()
                >= 2
        })
    });
    assert!(ok, "no refusal of term {term}:\n{}", r.logs());
    stale.stop();
    // A coordinator leads again; nothing of the stale commands took effect.
    r.group.restart(new);
    r.syncing_and_flushed(Duration::from_secs(40));
    let epoch = standby::disk::epoch::EpochStore::open(&r.cpu.state)
        .unwrap()
        .get();
    assert_eq!(epoch.0, 1, "the CPU's durable epoch");
    assert!(
        !r.cpu
            .log_text()
            .contains("promoted: this machine is the primary now"),
        "{}",
        r.logs()
    );
    let by_epoch = primaries(&[("gpu-a", r.gpu.log_text()), ("cpu-a", r.cpu.log_text())]);
    assert!(
        by_epoch.iter().all(|(e, who)| *e == 1 && *who == ["gpu-a"]),
        "{by_epoch:?}"
    );
    fs::write(r.gpu.workspace.join("after.txt"), b"after the stale leader").unwrap();
    assert!(flush(&r.gpu.state, "20s").status.success(), "{}", r.logs());
    assert_same(&r.gpu.workspace, &r.cpu.workspace);
}

/// A deposed leader that commands anyway: the Heartbeat service at a coordinator's address
/// with its certificate, answering every agent's stream with Promote and Fence at epoch 2 and
/// the given term, then keeping the stream open. Runs on a thread inside that coordinator's
/// namespace until stopped.
struct StaleLeader {
    /// The identity of each agent that opened a stream.
    seen: Arc<Mutex<Vec<String>>>,
    stop: tokio_util::sync::CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct StaleSvc {
    term: u64,
    seen: Arc<Mutex<Vec<String>>>,
    stop: tokio_util::sync::CancellationToken,
}

impl StaleLeader {
    fn serve(ns: String, listen: &str, material: TlsMaterial, term: u64) -> StaleLeader {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (svc, token, addr) = (
            StaleSvc {
                term,
                seen: seen.clone(),
                stop: stop.clone(),
            },
            stop.clone(),
            listen.to_string(),
        );
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter_netns(&ns);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                tls::install_default_provider();
                let l = tokio::net::TcpListener::bind(&addr).await.unwrap();
                ready_tx.send(()).unwrap();
                let cfg = material.server_config().unwrap();
                let incoming = tls::incoming(l, cfg, token.clone());
                tls::server_builder()
                    .add_service(CoordinatorServer::new(svc))
                    .serve_with_incoming_shutdown(incoming, token.cancelled())
                    .await
                    .unwrap();
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the stale leader listens");
        StaleLeader {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for StaleLeader {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tonic::async_trait]
impl Coordinator for StaleSvc {
    async fn join(&self, _: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        Err(Status::unavailable("a deposed leader"))
    }

    type HeartbeatStream = ReceiverStream<Result<Command, Status>>;

    async fn heartbeat(
        &self,
        req: Request<Streaming<AgentReport>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let who = tls::peer_of(&req)?.identity.to_string();
        let (tx, rx) = mpsc::channel(4);
        let term = self.term;
        let stale = [
            Cmd::Promote(Promote { epoch: 2 }),
            Cmd::Fence(Fence {
                epoch: 2,
                reason: "a deposed leader's command".into(),
            }),
        ];
        for cmd in stale {
            let c = Command {
                cmd: Some(cmd),
                term,
            };
            tx.send(Ok(c)).await.ok();
        }
        self.seen.lock().unwrap().push(who);
        // Keeps the stream open while the agent reports, until stopped.
        let (mut reports, stop) = (req.into_inner(), self.stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    m = reports.message() => if !matches!(m, Ok(Some(_))) { break },
                }
            }
            drop(tx);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
