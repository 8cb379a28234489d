//! The engine with its writer: what must be durable is acted on only once the writer confirms
//! it, and a store that refuses every write (a deposed leader's) makes the engine send nothing.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::control::notify::Notifier;
use crate::control::store::{MemStore, Snapshot, StoreError};
use crate::proto::command::Cmd;
use crate::proto::state::IssuedCert;
use crate::trust::revocation::DenyList;

/// A store that refuses every write as a deposed leader's is refused, until told otherwise.
#[derive(Default)]
struct Deposable {
    inner: MemStore,
    deposed: AtomicBool,
    /// The size of each `put_pairs` that got through.
    puts: Mutex<Vec<usize>>,
    /// How long each write takes.
    slow: Duration,
    /// While set, writes wait.
    held: AtomicBool,
}

impl Store for Deposable {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }
    fn put_pairs(&self, pairs: &[PairRecord], durable: bool) -> Result<(), StoreError> {
        if self.deposed.load(Ordering::SeqCst) {
            return Err(StoreError::Deposed { term: 7, now: 9 });
        }
        while self.held.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(self.slow);
        self.puts.lock().unwrap().push(pairs.len());
        self.inner.put_pairs(pairs, durable)
    }
    fn delete_pair(&self, name: &str) -> Result<(), StoreError> {
        self.inner.delete_pair(name)
    }
    fn use_token(&self, nonce: &str, expires_unix: u64) -> Result<bool, StoreError> {
        self.inner.use_token(nonce, expires_unix)
    }
    fn put_certs(&self, certs: &[IssuedCert]) -> Result<(), StoreError> {
        self.inner.put_certs(certs)
    }
}

fn start(store: Arc<Deposable>) -> (Engine, CancellationToken) {
    let store: Arc<dyn Store> = store;
    let registry = Arc::new(Registry::load(store.clone(), DenyList::new()).unwrap());
    let reporting = Reporting {
        metrics: Arc::new(Metrics::new()),
        notifier: Notifier::none(),
    };
    let stop = CancellationToken::new();
    let engine = Engine::start(
        store,
        Timing::default(),
        Policy::default(),
        None,
        registry,
        reporting,
        stop.clone(),
    )
    .unwrap();
    (engine, stop)
}

fn report(machine: &str, port: u32) -> AgentReport {
    AgentReport {
        machine: machine.into(),
        epoch: 1,
        listen_port: port,
        ..Default::default()
    }
}

/// Both agents of pair `p` connect and report once; their command streams.
async fn both_agents(e: &Engine) -> PerSide<mpsc::Receiver<Result<Command, Status>>> {
    let mut rxs = Vec::new();
    for (side, machine, port) in [(Side::Gpu, "g1", 7702), (Side::Cpu, "c1", 7701)] {
        let (tx, rx) = mpsc::channel(16);
        let conn = e.next_conn();
        e.connect("p", conn, tx).await.unwrap();
        let ip = Some("10.0.0.1".parse().unwrap());
        e.report("p", side, conn, report(machine, port), ip)
            .await
            .unwrap();
        rxs.push(rx);
    }
    let cpu = rxs.pop().unwrap();
    PerSide {
        gpu: rxs.pop().unwrap(),
        cpu,
    }
}

/// What arrived on a command stream so far.
fn drain(rx: &mut mpsc::Receiver<Result<Command, Status>>) -> Vec<Cmd> {
    let mut out = Vec::new();
    while let Ok(Ok(c)) = rx.try_recv() {
        out.extend(c.cmd);
    }
    out
}

/// The pair goes Syncing when both agents joined: a durable write. While the store refuses it
/// (deposed), neither agent is told anything and nothing is written; once writes go through,
/// the write is tried again, and only then do the commands go out.
#[tokio::test]
async fn a_refused_write_holds_the_commands_until_it_is_written() {
    let store = Arc::new(Deposable::default());
    store.deposed.store(true, Ordering::SeqCst);
    let (e, stop) = start(store.clone());
    let mut rx = both_agents(&e).await;
    let view = e.list().await.unwrap();
    assert_eq!(view[0].state, crate::proto::PairState::Syncing as i32);
    // Several batches' worth of retries (the GPU, silent since, goes Suspect meanwhile).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(drain(&mut rx.gpu), vec![], "a command before the write");
    assert_eq!(drain(&mut rx.cpu), vec![]);
    assert!(store.inner.restart().load().unwrap().pairs.is_empty());

    store.deposed.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let to_gpu = drain(&mut rx.gpu);
    assert!(
        matches!(&to_gpu[..], [Cmd::SetPeer(s)] if s.machine == "c1" && s.epoch == 1),
        "{to_gpu:?}"
    );
    assert!(matches!(
        drain(&mut rx.cpu)[..],
        [Cmd::Receive(_), Cmd::Probe(_)]
    ));
    let durable = store.inner.restart().load().unwrap();
    let view = e.list().await.unwrap();
    assert_eq!(durable.pairs["p"].state() as i32, view[0].state);
    assert_eq!(durable.pairs["p"].epoch, 1);
    stop.cancel();
}

/// The engine does not wait for its writes (here held back until every pair is created), and
/// records handed to the writer while it is busy (each write takes 20 ms here) go in one
/// `put_pairs`: pairs created at once by their first agents take far fewer writes than pairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_queued_together_are_written_together() {
    let store = Arc::new(Deposable {
        slow: Duration::from_millis(20),
        held: AtomicBool::new(true),
        ..Default::default()
    });
    let (e, stop) = start(store.clone());
    for i in 0..300 {
        let (tx, _rx) = mpsc::channel(1);
        let conn = e.next_conn();
        e.connect(&format!("p{i}"), conn, tx).await.unwrap();
    }
    assert_eq!(e.list().await.unwrap().len(), 300);
    assert!(store.puts.lock().unwrap().is_empty(), "a write got through");
    store.held.store(false, Ordering::SeqCst);
    let t0 = std::time::Instant::now();
    while store.inner.restart().load().unwrap().pairs.len() < 300 {
        assert!(t0.elapsed() < Duration::from_secs(20), "not all written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let puts = store.puts.lock().unwrap().clone();
    assert_eq!(puts.iter().sum::<usize>(), 300, "{puts:?}");
    assert!(puts.len() < 300, "one write per pair: {puts:?}");
    stop.cancel();
}

/// An engine held up (here by an operator's `pair create` on a store that takes 4 s to write)
/// while both agents go on reporting every second: once it gets to its queue, the reports count
/// from when they arrived and detection's time waits for them, so the pair never goes Suspect.
/// With the wall clock instead, the first tick after the hold-up would see the GPU silent for
/// 4 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_up_engine_makes_no_pair_suspect() {
    let store = Arc::new(Deposable {
        slow: Duration::from_secs(4),
        ..Default::default()
    });
    let (e, stop) = start(store.clone());
    let mut conns = Vec::new();
    for (side, machine, port) in [(Side::Gpu, "g1", 7702), (Side::Cpu, "c1", 7701)] {
        let (tx, rx) = mpsc::channel(16);
        let conn = e.next_conn();
        e.connect("p", conn, tx).await.unwrap();
        conns.push((side, machine, port, conn, rx));
    }
    let reporter = {
        let e = e.clone();
        let agents: Vec<_> = conns.iter().map(|c| (c.0, c.1, c.2, c.3)).collect();
        tokio::spawn(async move {
            for _ in 0..8 {
                for (side, machine, port, conn) in &agents {
                    let ip = Some("10.0.0.1".parse().unwrap());
                    let r = report(machine, *port);
                    e.report("p", *side, *conn, r, ip).await.unwrap();
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = std::time::Instant::now();
    e.create("q").await.unwrap();
    assert!(held.elapsed() >= Duration::from_secs(4));
    reporter.await.unwrap();
    let suspect = e
        .metrics
        .transitions
        .get_or_create(&crate::control::metrics::TransitionLabel {
            from: "Syncing".into(),
            to: "Suspect".into(),
        })
        .get();
    assert_eq!(suspect, 0, "the held-up engine made the pair Suspect");
    let view = e.list().await.unwrap();
    let p = view.iter().find(|v| v.pair == "p").unwrap();
    assert_eq!(p.state, crate::proto::PairState::Syncing as i32);
    stop.cancel();
}
