//! The etcd store against a real etcd on loopback (`testing::Cluster`).

use std::time::{Duration, Instant};

use super::election::Attempt;
use super::testing::Cluster;
use super::*;
use crate::control::store::ha::EtcdTls;
use crate::proto::PairState;

fn pair(name: &str, epoch: u64) -> PairRecord {
    PairRecord {
        name: name.into(),
        epoch,
        state: PairState::Syncing.into(),
        ..Default::default()
    }
}

fn cert(serial: &str, revoked: bool) -> IssuedCert {
    IssuedCert {
        serial: serial.into(),
        pair: "a".into(),
        machine: "m1".into(),
        not_after_unix: crate::host::unix_ms_now() / 1000 + 3600,
        revoked,
        ..Default::default()
    }
}

fn store(c: &Cluster) -> EtcdStore {
    EtcdStore::connect(&EtcdConfig::new(c.endpoints())).expect("connect")
}

/// A store that won the election (the only candidate), with a lease of `ttl`.
fn leader(c: &Cluster, ttl: Duration) -> (EtcdStore, i64) {
    let s = store(c);
    let lease = s.grant(ttl).unwrap();
    match s.campaign(&lease, "127.0.0.1:1").unwrap() {
        Attempt::Won(term) => (s, term),
        other => panic!("the only candidate did not win: {other:?}"),
    }
}

/// Runs `f` with a plain client of its own (what an operator's etcdctl would do).
fn raw<T>(c: &Cluster, f: impl AsyncFnOnce(etcd_client::Client) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = etcd_client::Client::connect(c.endpoints(), None)
            .await
            .unwrap();
        f(client).await
    })
}

/// What the leader writes, a follower (another coordinator on the same etcd) loads the same;
/// the follower writes nothing.
#[test]
fn the_leader_writes_and_a_follower_loads_the_same_state() {
    let Some(c) = Cluster::start(1) else { return };
    let (a, term) = leader(&c, Duration::from_secs(6));
    a.put_pairs(&[pair("a", 3), pair("b", 1)], true).unwrap();
    a.put_pairs(&[pair("a", 4)], false).unwrap();
    a.delete_pair("b").unwrap();
    a.put_certs(&[cert("0a", false), cert("0b", false)])
        .unwrap();
    a.put_certs(&[cert("0a", true)]).unwrap();
    assert!(a.use_token("n1", u64::MAX).unwrap());
    assert!(!a.use_token("n1", u64::MAX).unwrap(), "a token replayed");

    let b = store(&c);
    let lease = b.grant(Duration::from_secs(6)).unwrap();
    let Attempt::Held(l) = b.campaign(&lease, "127.0.0.1:2").unwrap() else {
        panic!("a second leader");
    };
    assert_eq!((l.term, l.address.as_str()), (term, "127.0.0.1:1"));
    assert!(!b.leads());
    let snap = b.load().unwrap();
    assert_eq!(snap.pairs.len(), 1);
    assert_eq!(snap.pairs["a"].epoch, 4);
    assert!(snap.certs["0a"].revoked && !snap.certs["0b"].revoked);
    assert!(snap.used_tokens.contains_key("n1"));

    let e = b.put_pairs(&[pair("a", 99)], true).unwrap_err();
    assert!(matches!(e, StoreError::NotLeader), "{e}");
    assert!(matches!(
        b.use_token("n2", u64::MAX),
        Err(StoreError::NotLeader)
    ));
    assert_eq!(
        a.load().unwrap().pairs["a"].epoch,
        4,
        "the follower's write landed"
    );
}

/// A leader whose key went (its lease revoked behind its back, as when it expires) is deposed:
/// another coordinator wins a larger term, and every write of the old one fails with a clear
/// error while the new leader's data stays as it wrote it.
#[test]
fn a_deposed_leader_cannot_write() {
    let Some(c) = Cluster::start(1) else { return };
    let (old, old_term) = leader(&c, Duration::from_secs(6));
    old.put_pairs(&[pair("a", 1)], true).unwrap();
    let old_lease = old.lease.lock().unwrap().as_ref().unwrap().id;
    raw(&c, async |mut cl| cl.lease_revoke(old_lease).await.unwrap());

    let new = store(&c);
    let lease = new.grant(Duration::from_secs(6)).unwrap();
    let Attempt::Won(new_term) = new.campaign(&lease, "127.0.0.1:2").unwrap() else {
        panic!("the key was free and nobody won");
    };
    assert!(
        new_term > old_term,
        "terms go backwards: {old_term} then {new_term}"
    );
    new.put_pairs(&[pair("a", 2)], true).unwrap();

    let e = old.put_pairs(&[pair("a", 1)], true).unwrap_err();
    match &e {
        StoreError::Deposed { term, now } => assert_eq!((*term, *now), (old_term, new_term)),
        other => panic!("not deposed: {other}"),
    }
    assert!(e.to_string().contains("deposed"), "{e}");
    // Once deposed, it knows: no further write is even tried.
    assert!(matches!(old.delete_pair("a"), Err(StoreError::NotLeader)));
    assert!(old.use_token("n1", u64::MAX).is_err());
    let snap = new.load().unwrap();
    assert_eq!(
        snap.pairs["a"].epoch, 2,
        "the deposed leader's write landed"
    );
    assert!(snap.used_tokens.is_empty());
}

/// A leader cut from etcd stops writing once half its lease's TTL has passed without a
/// renewal, before the lease can expire and another coordinator can win.
#[test]
fn a_leader_that_cannot_renew_stops_before_its_lease_expires() {
    let Some(mut c) = Cluster::start(1) else {
        return;
    };
    let ttl = Duration::from_secs(4);
    let (a, term) = leader(&c, ttl);
    a.put_pairs(&[pair("a", 1)], true).unwrap();
    assert!(a.leads());
    c.members[0].kill();
    let cut = Instant::now();
    while a.leads() {
        assert!(cut.elapsed() < ttl, "still leading after the whole TTL");
        std::thread::sleep(Duration::from_millis(50));
    }
    let stopped = cut.elapsed();
    assert!(
        stopped <= ttl / 2 + Duration::from_millis(200),
        "stopped after {stopped:?}"
    );
    let e = a.put_pairs(&[pair("a", 2)], true).unwrap_err();
    assert!(
        matches!(e, StoreError::LeaseLapsed { term: t } if t == term),
        "{e}"
    );
}

/// A batch larger than one transaction may hold goes in several, and every record arrives.
#[test]
fn a_large_batch_spans_several_transactions() {
    let Some(c) = Cluster::start(1) else { return };
    let (a, _) = leader(&c, Duration::from_secs(6));
    let many: Vec<PairRecord> = (0..(MAX_TXN_OPS * 2 + 17))
        .map(|i| pair(&format!("p{i}"), i as u64))
        .collect();
    a.put_pairs(&many, true).unwrap();
    let snap = store(&c).load().unwrap();
    assert_eq!(snap.pairs.len(), many.len());
    assert_eq!(snap.pairs["p216"].epoch, 216);
}

/// Joins racing with one token (threads released together): exactly one of them uses it.
#[test]
fn a_token_used_by_many_at_once_is_used_once() {
    let Some(c) = Cluster::start(1) else { return };
    let (a, _) = leader(&c, Duration::from_secs(6));
    crate::control::store::tests::each_token_used_once(std::sync::Arc::new(a), 40);
}

/// A value that does not decode refuses the load and names its key; expired tokens are not
/// loaded, and the leader deletes them.
#[test]
fn a_corrupt_value_is_named_and_expired_tokens_are_forgotten() {
    let Some(c) = Cluster::start(1) else { return };
    let (a, _) = leader(&c, Duration::from_secs(6));
    a.put_pairs(&[pair("a", 1)], true).unwrap();
    assert!(a.use_token("old", 1).unwrap());
    assert!(a.use_token("new", u64::MAX).unwrap());
    let snap = a.load().unwrap();
    assert_eq!(snap.used_tokens.keys().collect::<Vec<_>>(), ["new"]);
    let left = raw(&c, async |mut cl| {
        cl.get("/standby/v1/tokens/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap()
            .kvs()
            .len()
    });
    assert_eq!(left, 1, "the expired token was not deleted");

    raw(&c, async |mut cl| {
        cl.put("/standby/v1/pairs/zz", vec![0xff, 0xff, 0xff], None)
            .await
            .unwrap()
    });
    let e = a.load().unwrap_err();
    assert!(e.to_string().contains("/standby/v1/pairs/zz"), "{e}");
    raw(&c, async |mut cl| {
        cl.delete("/standby/v1/pairs/zz", None).await.unwrap()
    });
    assert_eq!(
        a.load().unwrap().pairs["a"].epoch,
        1,
        "the good record was lost"
    );
}

/// With no etcd answering, connecting or loading fails within the request limit with a clear
/// error, never hangs.
#[test]
fn an_unreachable_etcd_fails_in_time() {
    let mut cfg = EtcdConfig::new(vec![format!("http://127.0.0.1:{}", testing_port())]);
    cfg.timeout = Duration::from_millis(500);
    let started = Instant::now();
    let r = EtcdStore::connect(&cfg).and_then(|s| s.load());
    let Err(e) = r else {
        panic!("no etcd, yet it answered");
    };
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(e.to_string().contains("etcd"), "{e}");
}

fn testing_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Over TLS with a client certificate (`--client-cert-auth`): the store works; without a
/// client certificate etcd refuses it, with a clear error.
#[test]
fn over_tls_with_a_client_certificate() {
    crate::trust::tls::install_default_provider();
    let d = tempfile::tempdir().unwrap();
    let ca = crate::trust::pki::Ca::generate().unwrap();
    let cert = ca.issue_server(&[]).unwrap();
    let file = |name: &str, text: &str| {
        let p = d.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let tls = testing::Tls {
        ca: file("ca.pem", ca.cert_pem()),
        cert: file("etcd.pem", &cert.cert_pem),
        key: file("etcd.key", &cert.key_pem),
    };
    let Some(c) = Cluster::start_with(1, Some(tls.clone())) else {
        return;
    };
    assert!(c.endpoints()[0].starts_with("https://"));
    let mut cfg = EtcdConfig::new(c.endpoints());
    cfg.tls = Some(EtcdTls {
        ca: tls.ca.clone(),
        cert: Some(tls.cert.clone()),
        key: Some(tls.key.clone()),
    });
    let s = EtcdStore::connect(&cfg).unwrap();
    let lease = s.grant(Duration::from_secs(6)).unwrap();
    assert!(matches!(s.campaign(&lease, "a").unwrap(), Attempt::Won(_)));
    s.put_pairs(&[pair("a", 7)], true).unwrap();
    assert_eq!(s.load().unwrap().pairs["a"].epoch, 7);

    cfg.tls = Some(EtcdTls {
        ca: tls.ca.clone(),
        cert: None,
        key: None,
    });
    cfg.timeout = Duration::from_secs(2);
    let Err(e) = EtcdStore::connect(&cfg).and_then(|s| s.load()) else {
        panic!("etcd answered a client without a certificate");
    };
    assert!(e.to_string().contains("etcd"), "{e}");
    assert_eq!(s.load().unwrap().pairs["a"].epoch, 7);
}

/// `coordinator status`'s view: the leader's address and term and every coordinator whose
/// membership record lives; a coordinator whose lease goes leaves the list, a leader that
/// steps down leaves none; every request is timed.
#[test]
fn the_members_are_the_coordinators_whose_leases_live() {
    let Some(c) = Cluster::start(1) else { return };
    let latency = Histogram::new([0.01, 0.1, 1.0]);
    let a = store(&c).with_latency(latency.clone());
    let la = a.grant(Duration::from_secs(6)).unwrap();
    a.register(&la, "127.0.0.1:1").unwrap();
    let Attempt::Won(term) = a.campaign(&la, "127.0.0.1:1").unwrap() else {
        panic!("the only candidate did not win");
    };
    let b = store(&c);
    let lb = b.grant(Duration::from_secs(6)).unwrap();
    b.register(&lb, "127.0.0.1:2").unwrap();
    assert!(matches!(
        b.campaign(&lb, "127.0.0.1:2").unwrap(),
        Attempt::Held(_)
    ));

    let seen = a.coordinators().unwrap().expect("etcd has members");
    assert_eq!(seen.leader, "127.0.0.1:1");
    assert_eq!(seen.term, term);
    assert_eq!(seen.members, ["127.0.0.1:1", "127.0.0.1:2"]);
    assert_eq!(seen.endpoints, c.endpoints());
    // A follower sees the same.
    assert_eq!(b.coordinators().unwrap(), Some(seen));

    // The follower goes (its lease revoked, as on a clean stop): its record goes with it.
    b.step_down();
    let seen = a.coordinators().unwrap().unwrap();
    assert_eq!(seen.members, ["127.0.0.1:1"]);
    assert_eq!((seen.leader.as_str(), seen.term), ("127.0.0.1:1", term));
    // The leader steps down: no leader and no member left.
    a.step_down();
    let seen = b.coordinators().unwrap().unwrap();
    assert_eq!((seen.leader.as_str(), seen.term), ("", 0));
    assert!(seen.members.is_empty(), "{seen:?}");
    // Every request of `a` was timed (grant, register, campaign, members, revoke).
    let mut text = String::new();
    let mut r = prometheus_client::registry::Registry::default();
    r.register("t", "t", latency);
    prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
    assert!(text.contains("t_count 6"), "{text}");
}

/// What a new machine is given to dial (`engine::Dial`): the creating leader first, then every
/// other coordinator whose membership record lives, so it reaches whichever leads when it
/// boots; the file store knows no other coordinator.
#[test]
fn new_machines_dial_every_member() {
    use crate::control::engine::Dial;
    let Some(c) = Cluster::start(1) else { return };
    let stores: Vec<EtcdStore> = (1..=3).map(|_| store(&c)).collect();
    for (i, s) in stores.iter().enumerate() {
        let l = s.grant(Duration::from_secs(6)).unwrap();
        s.register(&l, &format!("10.0.0.{}:7700", i + 1)).unwrap();
    }
    let mut all = stores.into_iter();
    let (a, b, _c) = (all.next().unwrap(), all.next().unwrap(), all.next());
    let dial = Dial {
        own: "10.0.0.2:7700".into(),
        group: Arc::new(b),
    };
    assert_eq!(
        dial.addresses(),
        "10.0.0.2:7700,10.0.0.1:7700,10.0.0.3:7700"
    );
    // One that stopped (its lease revoked) is no longer given.
    a.step_down();
    assert_eq!(dial.addresses(), "10.0.0.2:7700,10.0.0.3:7700");

    let d = tempfile::tempdir().unwrap();
    let file = crate::control::store::FileStore::open(d.path()).unwrap();
    let alone = Dial {
        own: "10.0.0.9:7700".into(),
        group: Arc::new(file),
    };
    assert_eq!(alone.addresses(), "10.0.0.9:7700");
}

/// The engine on etcd: pairs created together by their first agents go in a few guarded
/// transactions, not one each; and once its leader is deposed, the engine's writer is refused, so
/// a pair whose change must be durable (both agents joined: `Syncing`) is told nothing, and etcd
/// keeps the new leader's record.
#[test]
fn the_engine_batches_its_writes_and_a_deposed_one_commands_nothing() {
    use crate::control::engine::{Engine, Reporting};
    use crate::control::failover::{Policy, Timing};
    use crate::control::metrics::Metrics;
    use crate::control::store::certs::Registry;
    use crate::trust::revocation::DenyList;
    use crate::types::Side;

    let Some(c) = Cluster::start(1) else { return };
    let (old, _) = leader(&c, Duration::from_secs(6));
    let old_lease = old.lease.lock().unwrap().as_ref().unwrap().id;
    let old: Arc<dyn Store> = Arc::new(old);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let engine = rt.block_on(async {
        let registry = Arc::new(Registry::load(old.clone(), DenyList::new()).unwrap());
        let reporting = Reporting {
            metrics: Arc::new(Metrics::new()),
            notifier: crate::control::notify::Notifier::none(),
        };
        let (t, p) = (Timing::default(), Policy::default());
        Engine::start(old.clone(), t, p, None, registry, reporting, stop.clone()).unwrap()
    });
    let before = c.revision();
    let mut keep = Vec::new();
    rt.block_on(async {
        for i in 0..150 {
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            engine
                .connect(&format!("p{i}"), engine.next_conn(), tx)
                .await
                .unwrap();
            keep.push(rx);
        }
    });
    let t0 = Instant::now();
    while new_leader_view(&c).len() < 150 {
        assert!(t0.elapsed() < Duration::from_secs(20), "not all written");
        std::thread::sleep(Duration::from_millis(50));
    }
    let txns = c.revision() - before;
    assert!(txns < 75, "150 new pairs took {txns} transactions");

    // Deposed: its lease revoked behind its back, another leader wins and writes p0.
    raw(&c, async |mut cl| cl.lease_revoke(old_lease).await.unwrap());
    let (new, _) = leader(&c, Duration::from_secs(6));
    new.put_pairs(&[pair("p0", 5)], true).unwrap();
    let mut rxs = Vec::new();
    rt.block_on(async {
        for (side, machine, port) in [(Side::Gpu, "g1", 7702), (Side::Cpu, "c1", 7701)] {
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let conn = engine.next_conn();
            engine.connect("p0", conn, tx).await.unwrap();
            let r = crate::proto::AgentReport {
                machine: machine.into(),
                epoch: 1,
                listen_port: port,
                ..Default::default()
            };
            let ip = Some("10.0.0.1".parse().unwrap());
            engine.report("p0", side, conn, r, ip).await.unwrap();
            rxs.push(rx);
        }
        let view = engine.list().await.unwrap();
        let p0 = view.iter().find(|v| v.pair == "p0").unwrap();
        assert_eq!(p0.state, PairState::Syncing as i32);
        tokio::time::sleep(Duration::from_millis(2500)).await;
    });
    for mut rx in rxs {
        assert!(rx.try_recv().is_err(), "a deposed engine sent a command");
    }
    assert_eq!(new.load().unwrap().pairs["p0"].epoch, 5);
    stop.cancel();
    drop(rt);
}

/// The pairs etcd holds, as a fresh reader sees them.
fn new_leader_view(c: &Cluster) -> std::collections::HashMap<String, PairRecord> {
    store(c).load().unwrap().pairs
}
