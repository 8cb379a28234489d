//! The coordinator's engine: one task owns every pair's [`PairMachine`] and the connections of
//! their agents (neon's heartbeater pattern: one owner of the liveness table).
//!
//! Everything that changes a pair goes through this task, in order: heartbeats, disconnections,
//! ticks, admin requests and provider results. For each input it steps the machine, persists the
//! record when the machine says so *before* telling any agent anything (a failed write blocks the
//! pair's commands until it succeeds), records events and metrics, and then sends each connected
//! agent whatever the record says it should have been told and its connection has not received
//! yet: commands are level-triggered (`ARCHITECTURE.md`, "The life of a failure").
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
//! - `commands`: the commands the record says each agent should have;
//! - `views`: what `pairs` shows;
//! - `events`: the event log.

mod actions;
mod admin;
mod commands;
mod conn;
mod events;
mod provisioning;
mod reports;
mod seats;
mod tick;
mod views;

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
use conn::Conn;
use provisioning::Call;
use reports::Figures;

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
}

/// A handle on the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Msg>,
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
        let mut actor = Actor {
            pairs,
            timing,
            policy,
            prov: provisioning.map(Arc::new),
            self_tx: tx.clone(),
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
    self_tx: mpsc::Sender<Msg>,
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
    /// A durable write failed: no command goes out until the record is on disk.
    blocked: bool,
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
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                m = rx.recv() => match m {
                    Some(m) => self.handle(m),
                    None => break,
                },
                _ = tick.tick() => {
                    n += 1;
                    self.tick(n.is_multiple_of(5));
                }
            }
        }
        self.flush_soon();
    }

    /// One handler per input.
    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Connect { pair, conn, tx } => self.on_connect(&pair, conn, tx),
            Msg::Report {
                pair,
                side,
                conn,
                report,
                observed,
            } => self.on_report(&pair, side, conn, *report, observed),
            Msg::Disconnect { pair, side, conn } => self.on_disconnect(&pair, side, conn),
            Msg::Create { pair, reply } => {
                let _ = reply.send(self.on_create(&pair));
            }
            Msg::List { reply } => {
                let _ = reply.send(self.views());
            }
            Msg::Manual { pair, input, reply } => {
                let _ = reply.send(self.on_manual(&pair, input));
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
        }
    }
}
