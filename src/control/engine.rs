//! The coordinator's engine: one task owns every pair's [`PairMachine`] and the connections of
//! their agents (neon's heartbeater pattern: one owner of the liveness table).
//!
//! Everything that changes a pair goes through this task, in order: heartbeats, disconnections,
//! ticks, admin requests and provider results. For each input it steps the machine, hands the
//! record to the store's writer when the machine says so (`writer`: a thread of its own, so the
//! engine never waits on the store), records events and metrics, and sends each connected agent
//! whatever the record says it should have been told and its connection has not received yet:
//! commands are level-triggered (`ARCHITECTURE.md`, "The life of a failure"). A record that must
//! be durable before it is acted on holds the pair's commands and provider calls until the
//! writer confirms it (a failed write is tried again until it succeeds).
//!
//! Every input is stamped when it is handed in (`Inbox`): a report counts as heard then, and
//! detection's time waits for the queue (`clock`), so a slow engine does not by itself make a
//! pair Suspect or fail it over.
//!
//! [`Engine`] is the handle the gRPC service holds; [`Actor`] is the task, and
//! `Actor::handle` hands each [`Msg`] to one handler. The handlers live by what they are about:
//!
//! - `conn`: an agent's heartbeat stream, and which side's slot it holds (or why it is fenced);
//! - `reports`: a heartbeat report, turned into the machine's `Report` and the pair's metrics;
//! - `admin`: an operator's requests (create a pair, fail over, recover, hibernate, wake);
//! - `provisioning`: provider calls (create, destroy, poll, sweep) and their results;
//! - `seats`: who holds each seat, and the machines a written record retires (revoked);
//! - `tick`: time passing, the batched writes, gauges and heartbeat summaries;
//! - `actions`: what every handler ends with, carrying out the machine's actions, persist first;
//! - `writer`: the store's writes, off this task, and their confirmations (`Msg::Written`);
//! - `clock`: the time detection steps with;
//! - `commands`: the commands the record says each agent should have;
//! - `views`: what `pairs` shows;
//! - `events`: the event log.

mod actions;
mod admin;
mod clock;
mod commands;
mod conn;
mod events;
mod provisioning;
mod reports;
mod seats;
#[cfg(test)]
mod tests;
mod tick;
mod views;
mod writer;

pub use events::Events;
pub use provisioning::{Dial, Provisioning};

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::control::failover::{Input, PairMachine, PairState, Policy, Timing};
use crate::control::metrics::{Metrics, PairLabel};
use crate::control::store::Store;
use crate::control::store::certs::Registry;
use crate::proto::state::PairRecord;
use crate::proto::{ActionReply, AgentReport, Command, PairView};
use crate::types::{PerSide, Side};
use clock::Clock;
use conn::Conn;
use provisioning::Call;
use reports::Figures;
use writer::Writer;

const TICK: Duration = Duration::from_millis(200);

enum Msg {
    Connect {
        pair: String,
        conn: u64,
        tx: mpsc::Sender<Result<Command, Status>>,
    },
    Report {
        pair: String,
        side: Side,
        conn: u64,
        report: Box<AgentReport>,
        observed: Option<IpAddr>,
    },
    Disconnect {
        pair: String,
        side: Side,
        conn: u64,
    },
    Create {
        pair: String,
        reply: oneshot::Sender<Result<PairView, Status>>,
    },
    List {
        reply: oneshot::Sender<Vec<PairView>>,
    },
    /// Failover, Recover, Hibernate or Wake asked by an operator.
    Manual {
        pair: String,
        input: Input,
        reply: oneshot::Sender<Result<ActionReply, Status>>,
    },
    /// The outcome of a provider call, as an input for the pair.
    Provider {
        pair: String,
        op: Call,
        input: Option<Input>,
    },
    /// The sweeper asks whether any pair owns `label`.
    Owned {
        label: String,
        reply: oneshot::Sender<bool>,
    },
    SweepDone {
        /// Labels destroyed, with the provider that held each.
        destroyed: Vec<(String, &'static str)>,
    },
    HeartbeatSubscribers(isize),
    /// `machine` joined `side` of `pair`: it takes the seat (retiring another holder) unless a
    /// provider fills the seat.
    Seated {
        pair: String,
        side: Side,
        machine: String,
        reply: oneshot::Sender<()>,
    },
    /// Whether `machine` holds `side` of `pair` (or is the attempt being provisioned for it).
    HoldsSeat {
        pair: String,
        side: Side,
        machine: String,
        reply: oneshot::Sender<bool>,
    },
    /// The store's writer wrote these records (`error`: none of them, and why).
    Written {
        writes: Vec<writer::Write>,
        error: Option<String>,
    },
}

/// The engine's queue: every input goes in stamped with when it was handed in (`clock`).
#[derive(Clone)]
struct Inbox(mpsc::Sender<(Instant, Msg)>);

/// The engine's queue is closed (it stopped).
#[derive(Debug)]
struct Closed;

impl Inbox {
    async fn send(&self, m: Msg) -> Result<(), Closed> {
        self.0.send((Instant::now(), m)).await.map_err(|_| Closed)
    }

    /// From a thread outside the runtime (the store's writer).
    fn blocking_send(&self, m: Msg) -> Result<(), Closed> {
        self.0
            .blocking_send((Instant::now(), m))
            .map_err(|_| Closed)
    }
}

/// A handle on the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: Inbox,
    pub events: Arc<Events>,
    pub metrics: Arc<Metrics>,
    conns: Arc<std::sync::atomic::AtomicU64>,
}

/// Where the engine reports besides its event log.
pub struct Reporting {
    pub metrics: Arc<Metrics>,
    /// `[[notify]]` webhooks (ARCHITECTURE.md, "Notifications").
    pub notifier: crate::control::notify::Notifier,
}

impl Engine {
    /// Loads every pair from `store` and starts the engine task.
    pub fn start(
        store: Arc<dyn Store>,
        timing: Timing,
        policy: Policy,
        provisioning: Option<Provisioning>,
        registry: Arc<Registry>,
        reporting: Reporting,
        shutdown: CancellationToken,
    ) -> Result<Engine, crate::control::store::StoreError> {
        let Reporting { metrics, notifier } = reporting;
        let snap = store.load()?;
        let now = Instant::now();
        let events = Arc::new(Events::new());
        let mut pairs = HashMap::new();
        for (name, rec) in snap.pairs {
            let entry = Entry::resume(&name, rec, now, &policy, &metrics);
            pairs.insert(name, entry);
        }
        metrics.pairs.set(pairs.len() as i64);
        tracing::info!(pairs = pairs.len(), "coordinator state loaded");
        let (tx, rx) = mpsc::channel(65536);
        let tx = Inbox(tx);
        let writer = Writer::start(store.clone(), tx.clone()).map_err(|e| {
            crate::control::store::StoreError::Io {
                path: "store-writer".into(),
                source: e,
            }
        })?;
        let mut actor = Actor {
            pairs,
            timing,
            policy,
            prov: provisioning.map(Arc::new),
            self_tx: tx.clone(),
            clock: Clock::default(),
            writer: Some(writer),
            seq: 0,
            replies: HashMap::new(),
            inflight: HashSet::new(),
            last_poll: now,
            last_sweep: now,
            store,
            soon: HashSet::new(),
            events: events.clone(),
            metrics: metrics.clone(),
            hb_subscribers: 0,
            last_summary: now,
            registry,
            notifier,
        };
        actor.retire_torn_down();
        tokio::spawn(actor.run(rx, shutdown));
        Ok(Engine {
            tx,
            events,
            metrics,
            conns: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    pub fn next_conn(&self) -> u64 {
        self.conns
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    async fn send(&self, m: Msg) -> Result<(), Status> {
        self.tx
            .send(m)
            .await
            .map_err(|_| Status::unavailable("coordinator shutting down"))
    }

    pub async fn connect(
        &self,
        pair: &str,
        conn: u64,
        tx: mpsc::Sender<Result<Command, Status>>,
    ) -> Result<(), Status> {
        self.send(Msg::Connect {
            pair: pair.into(),
            conn,
            tx,
        })
        .await
    }

    pub async fn report(
        &self,
        pair: &str,
        side: Side,
        conn: u64,
        report: AgentReport,
        observed: Option<IpAddr>,
    ) -> Result<(), Status> {
        self.send(Msg::Report {
            pair: pair.into(),
            side,
            conn,
            report: Box::new(report),
            observed,
        })
        .await
    }

    pub async fn disconnect(&self, pair: &str, side: Side, conn: u64) {
        let _ = self
            .send(Msg::Disconnect {
                pair: pair.into(),
                side,
                conn,
            })
            .await;
    }

    pub async fn create(&self, pair: &str) -> Result<PairView, Status> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Create {
            pair: pair.into(),
            reply,
        })
        .await?;
        rx.await
            .map_err(|_| Status::unavailable("engine stopped"))?
    }

    pub async fn list(&self) -> Result<Vec<PairView>, Status> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::List { reply }).await?;
        rx.await.map_err(|_| Status::unavailable("engine stopped"))
    }

    pub async fn failover(&self, pair: &str) -> Result<ActionReply, Status> {
        self.manual(pair, Input::Manual(Instant::now())).await
    }

    /// Fail over, recover, hibernate or wake a pair (an operator's request).
    pub async fn manual(&self, pair: &str, input: Input) -> Result<ActionReply, Status> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Manual {
            pair: pair.into(),
            input,
            reply,
        })
        .await?;
        rx.await
            .map_err(|_| Status::unavailable("engine stopped"))?
    }

    pub async fn heartbeat_subscribers(&self, delta: isize) {
        let _ = self.send(Msg::HeartbeatSubscribers(delta)).await;
    }

    /// `machine` joined `side` of `pair` (its certificate is recorded): it takes the seat.
    pub async fn seated(&self, pair: &str, side: Side, machine: &str) -> Result<(), Status> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Seated {
            pair: pair.into(),
            side,
            machine: machine.into(),
            reply,
        })
        .await?;
        rx.await.map_err(|_| Status::unavailable("engine stopped"))
    }

    /// Whether `machine` still holds `side` of `pair` (what a renewal needs).
    pub async fn holds_seat(&self, pair: &str, side: Side, machine: &str) -> Result<bool, Status> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::HoldsSeat {
            pair: pair.into(),
            side,
            machine: machine.into(),
            reply,
        })
        .await?;
        rx.await.map_err(|_| Status::unavailable("engine stopped"))
    }
}

/// The engine task: the only owner of every pair, and of what its handlers share.
struct Actor {
    pairs: HashMap<String, Entry>,
    timing: Timing,
    policy: Policy,
    prov: Option<Arc<Provisioning>>,
    self_tx: Inbox,
    /// The time detection steps with.
    clock: Clock,
    /// The store's writer (None once it was told to finish).
    writer: Option<Writer>,
    /// The number of the last write handed to the writer.
    seq: u64,
    /// Operators' answers held until their pair's record is written.
    replies: HashMap<String, Vec<admin::Held>>,
    /// Provider calls under way.
    inflight: HashSet<Call>,
    last_poll: Instant,
    last_sweep: Instant,
    store: Arc<dyn Store>,
    /// Pairs to write with the next batch.
    soon: HashSet<String>,
    events: Arc<Events>,
    metrics: Arc<Metrics>,
    hb_subscribers: isize,
    last_summary: Instant,
    /// Issued certificates: who holds each seat, and what is revoked.
    registry: Arc<Registry>,
    /// `[[notify]]` webhooks: handed notices, never waited on.
    notifier: crate::control::notify::Notifier,
}

/// One pair: its machine, its agents' connections and what they last reported.
struct Entry {
    m: PairMachine,
    conns: PerSide<Option<Conn>>,
    /// Connections claiming a side for a machine the pair does not accept (an old GPU).
    others: HashMap<u64, Conn>,
    figures: PerSide<Figures>,
    /// A durable write is asked for and not confirmed yet (or it failed and goes again): no
    /// command goes out and no provider call starts until it is.
    blocked: bool,
    /// The number of the durable write that unblocks the pair (`writer`).
    want: u64,
    /// The record as last written: what the next write is compared with (`seats`).
    written: PairRecord,
}

impl Entry {
    /// A pair's entry from its record (a new pair, or one loaded at start-up), with its state
    /// and epoch shown in the metrics.
    fn resume(
        name: &str,
        rec: PairRecord,
        now: Instant,
        policy: &Policy,
        metrics: &Metrics,
    ) -> Entry {
        let written = rec.clone();
        let mut m = PairMachine::resume(rec, now);
        m.policy = policy.clone();
        metrics.set_state(name, None, m.state());
        metrics.pair_known(name);
        metrics
            .pair_epoch
            .get_or_create(&PairLabel { pair: name.into() })
            .set(m.epoch().0 as i64);
        Entry {
            m,
            conns: PerSide::default(),
            others: HashMap::new(),
            figures: PerSide::default(),
            blocked: false,
            want: 0,
            written,
        }
    }

    /// While a restore runs: bytes on the new GPU and bytes of the CPU's workspace.
    fn restore_bytes(&self) -> Option<(u64, u64)> {
        matches!(
            self.m.state(),
            PairState::Restoring | PairState::CuttingOver
        )
        .then(|| {
            (
                self.figures.gpu.bytes_total,
                self.figures.cpu.workspace_bytes,
            )
        })
    }
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<(Instant, Msg)>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                m = rx.recv() => match m {
                    Some((at, m)) => {
                        self.clock.handled(at);
                        self.handle(m, at);
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    n += 1;
                    let now = self.clock.now(Instant::now(), !rx.is_empty());
                    self.tick(now, n.is_multiple_of(5));
                }
            }
        }
        // The batch goes to the writer, which writes what it holds and stops; its answers are
        // not waited for (the queue closes first).
        self.flush_soon();
        drop(rx);
        if let Some(w) = self.writer.take() {
            w.finish().await;
        }
    }

    /// One handler per input.
    fn handle(&mut self, m: Msg, at: Instant) {
        match m {
            Msg::Connect { pair, conn, tx } => self.on_connect(&pair, conn, tx),
            Msg::Report {
                pair,
                side,
                conn,
                report,
                observed,
            } => self.on_report(&pair, side, conn, *report, (observed, at)),
            Msg::Disconnect { pair, side, conn } => self.on_disconnect(&pair, side, conn, at),
            Msg::Create { pair, reply } => {
                let _ = reply.send(self.on_create(&pair));
            }
            Msg::List { reply } => {
                let _ = reply.send(self.views());
            }
            Msg::Manual { pair, input, reply } => {
                let answer = self.on_manual(&pair, input);
                self.answer_when_written(&pair, reply, answer);
            }
            Msg::Provider { pair, op, input } => self.on_provider(&pair, &op, input),
            Msg::Owned { label, reply } => {
                let _ = reply.send(self.owns(&label));
            }
            Msg::SweepDone { destroyed } => self.on_sweep_done(destroyed),
            Msg::HeartbeatSubscribers(d) => self.hb_subscribers += d,
            Msg::Seated {
                pair,
                side,
                machine,
                reply,
            } => {
                self.on_seated(&pair, side, &machine);
                let _ = reply.send(());
            }
            Msg::HoldsSeat {
                pair,
                side,
                machine,
                reply,
            } => {
                let _ = reply.send(self.holds_seat(&pair, side, &machine));
            }
            Msg::Written { writes, error } => self.on_written(writes, error),
        }
    }
}
