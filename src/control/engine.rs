//! The coordinator's engine: one task owns every pair's [`PairMachine`] and the connections of
//! their agents (neon's heartbeater pattern: one owner of the liveness table).
//!
//! Everything that changes a pair goes through this task, in order: heartbeats, disconnections,
//! ticks, and admin requests. For each input it steps the machine, persists the record when the
//! machine says so *before* telling any agent anything (a failed write blocks the pair's commands
//! until it succeeds), records events and metrics, and then sends each connected agent whatever
//! the record says it should have been told and its connection has not received yet.
//!
//! [`Engine`] is the handle the gRPC service holds; [`Actor`] is the task, with one handler per
//! [`Msg`]. Provider calls live in `provisioning`, the event log in `events`.

mod events;
mod provisioning;

pub use events::Events;
pub use provisioning::Provisioning;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::control::failover::{
    Action, AgentStatus, Desired, Input, PairMachine, PairState, Policy, Report, Timing,
};
use crate::control::metrics::{KindLabel, Metrics, PairLabel, PairSideLabel, TransitionLabel};
use crate::control::store::Store;
use crate::host::unix_ms_now;
use crate::proto::state::{MachineRecord, PairRecord};
use crate::proto::{
    ActionReply, AgentReport, Command, Event, EventKind, Fence, Freeze, MachineView, PairView,
    ProbeTarget, Promote, Receive, Role, SetPeer, command,
};
use crate::types::{Epoch, PerSide, Side};
use events::event;
use provisioning::Call;

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
}

/// A handle on the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Msg>,
    pub events: Arc<Events>,
    pub metrics: Arc<Metrics>,
    conns: Arc<std::sync::atomic::AtomicU64>,
}

impl Engine {
    /// Loads every pair from `store` and starts the engine task.
    pub fn start(
        store: Arc<dyn Store>,
        timing: Timing,
        policy: Policy,
        provisioning: Option<Provisioning>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Engine, crate::control::store::StoreError> {
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
        let actor = Actor {
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
        };
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
}

struct Conn {
    id: u64,
    tx: mpsc::Sender<Result<Command, Status>>,
    /// What this connection has been told.
    sent: Vec<Desired>,
    warned_stale: bool,
}

impl Conn {
    fn new(id: u64, tx: mpsc::Sender<Result<Command, Status>>) -> Conn {
        Conn {
            id,
            tx,
            sent: Vec::new(),
            warned_stale: false,
        }
    }
}

/// The latest figures an agent reported.
#[derive(Clone, Debug, Default)]
struct Figures {
    generation: u64,
    rpo_age_ms: u64,
    pending_bytes: u64,
    epoch: u64,
    bytes_total: u64,
    workspace_bytes: u64,
}

impl From<&AgentReport> for Figures {
    fn from(r: &AgentReport) -> Figures {
        Figures {
            generation: r.generation,
            rpo_age_ms: r.rpo_age_ms,
            pending_bytes: r.pending_bytes,
            epoch: r.epoch,
            bytes_total: r.bytes_total,
            workspace_bytes: r.workspace_bytes,
        }
    }
}

struct Entry {
    m: PairMachine,
    conns: PerSide<Option<Conn>>,
    /// Connections claiming a side for a machine the pair does not accept (an old GPU).
    others: HashMap<u64, Conn>,
    figures: PerSide<Figures>,
    /// A durable write failed: no command goes out until the record is on disk.
    blocked: bool,
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
        let mut m = PairMachine::resume(rec, now);
        m.policy = policy.clone();
        metrics.set_state(name, None, m.state());
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

/// A state as a proto field holds it.
fn proto_state(s: PairState) -> i32 {
    crate::proto::PairState::from(s).into()
}

fn command_for(d: &Desired) -> Command {
    Command {
        cmd: Some(match d {
            Desired::SetPeer { url, epoch } => command::Cmd::SetPeer(SetPeer {
                url: url.clone(),
                epoch: epoch.0,
            }),
            Desired::Promote { epoch } => command::Cmd::Promote(Promote { epoch: epoch.0 }),
            Desired::Fence { epoch, reason } => command::Cmd::Fence(Fence {
                epoch: epoch.0,
                reason: reason.clone(),
            }),
            Desired::Probe { url } => command::Cmd::Probe(ProbeTarget { url: url.clone() }),
            Desired::Receive { epoch } => command::Cmd::Receive(Receive { epoch: epoch.0 }),
            Desired::Freeze { epoch } => command::Cmd::Freeze(Freeze { epoch: epoch.0 }),
        }),
    }
}

/// What a heartbeat tells the failover machine.
fn detection_report(side: Side, r: AgentReport, observed: Option<IpAddr>) -> Report {
    let fatal = r
        .gpu
        .as_ref()
        .filter(|g| g.fatal)
        .map(|g| g.fatal_reason.clone());
    let probe = match (side, &r.peer) {
        (Side::Cpu, Some(p)) => Some(
            p.probe_ever_ok
                .then(|| Duration::from_millis(p.probe_ok_age_ms)),
        ),
        (Side::Cpu, None) => Some(None),
        _ => None,
    };
    let status = agent_status(&r);
    Report {
        at: Instant::now(),
        epoch: Epoch(r.epoch),
        fatal,
        probe_ok_age: probe,
        machine: Some(MachineRecord {
            address: address_of(&r, observed),
            machine: r.machine,
            workspace: r.workspace,
        }),
        status,
    }
}

/// Where others reach the agent: what it advertises, else the address it was seen at with its
/// listen port ("" when neither is known).
fn address_of(r: &AgentReport, observed: Option<IpAddr>) -> String {
    if !r.advertise.is_empty() {
        return r.advertise.clone();
    }
    match (observed, r.listen_port) {
        (Some(ip), port) if port != 0 => SocketAddr::new(ip, port as u16).to_string(),
        _ => String::new(),
    }
}

fn agent_status(r: &AgentReport) -> AgentStatus {
    AgentStatus {
        mode: r.mode(),
        root: r.root.clone(),
        generation: r.generation,
        frozen_epoch: r.frozen_epoch,
        pending_bytes: r.pending_bytes,
        rpo_age_ms: r.rpo_age_ms,
        connected: r.connected,
        bytes_total: r.bytes_total,
        workspace_bytes: r.workspace_bytes,
        utilization: r
            .gpu
            .as_ref()
            .filter(|g| g.count > 0)
            .map(|g| g.utilization),
    }
}

/// Why the machine refused an operator's request, if it did.
fn refusal(actions: &[Action]) -> Option<String> {
    actions.iter().find_map(|a| match a {
        Action::Warn {
            kind: EventKind::Refused,
            message,
        } => Some(message.clone()),
        _ => None,
    })
}

/// The last thing the machine said about a request (a transition's reason or a warning).
fn last_word(actions: &[Action]) -> Option<String> {
    actions.iter().rev().find_map(|a| match a {
        Action::Transition { reason, .. } => Some(reason.clone()),
        Action::Warn { message, .. } => Some(message.clone()),
        _ => None,
    })
}

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

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Connect { pair, conn, tx } => self.on_connect(&pair, conn, tx),
            Msg::Report {
                pair,
                side,
                conn,
                report,
                observed,
            } => self.report(&pair, side, conn, *report, observed),
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
        }
    }

    /// A new heartbeat stream. Which machine it is, is known from its first report.
    fn on_connect(&mut self, pair: &str, conn: u64, tx: mpsc::Sender<Result<Command, Status>>) {
        if !self.pairs.contains_key(pair) {
            if let Err(e) = self.create(pair) {
                let _ = tx.try_send(Err(e));
                return;
            }
            self.events.emit(event(
                pair,
                EventKind::Created,
                "pair created by its first agent".into(),
            ));
        }
        let e = self.pairs.get_mut(pair).expect("created");
        e.others.insert(conn, Conn::new(conn, tx));
    }

    fn on_disconnect(&mut self, pair: &str, side: Side, conn: u64) {
        let Some(e) = self.pairs.get_mut(pair) else {
            return;
        };
        e.others.remove(&conn);
        if e.conns[side].as_ref().is_some_and(|c| c.id == conn) {
            e.conns[side] = None;
            self.metrics.agents_connected.dec();
            let actions =
                e.m.step(Input::Disconnected(side, Instant::now()), &self.timing);
            self.act(pair, actions);
        }
    }

    fn on_create(&mut self, pair: &str) -> Result<PairView, Status> {
        if self.pairs.contains_key(pair) {
            return Err(Status::already_exists(format!(
                "pair {pair} already exists"
            )));
        }
        self.create(pair)?;
        self.events
            .emit(event(pair, EventKind::Created, "pair created".into()));
        Ok(self.view(pair))
    }

    /// Every pair's view, by name.
    fn views(&self) -> Vec<PairView> {
        let mut names: Vec<&String> = self.pairs.keys().collect();
        names.sort();
        names.into_iter().map(|n| self.view(n)).collect()
    }

    /// An operator's request: the reply carries what the machine said, or its refusal.
    fn on_manual(&mut self, pair: &str, input: Input) -> Result<ActionReply, Status> {
        let Some(e) = self.pairs.get_mut(pair) else {
            return Err(Status::not_found(format!("no pair {pair}")));
        };
        e.m.wall_ms = unix_ms_now();
        let actions = e.m.step(input, &self.timing);
        let (refused, said) = (refusal(&actions), last_word(&actions));
        self.act(pair, actions);
        self.drive_provider(pair);
        if let Some(msg) = refused {
            return Err(Status::failed_precondition(msg));
        }
        let e = &self.pairs[pair];
        Ok(ActionReply {
            pair: pair.to_string(),
            state: proto_state(e.m.state()),
            epoch: e.m.epoch().0,
            message: said.unwrap_or_else(|| e.m.rec.reason.clone()),
        })
    }

    fn on_provider(&mut self, pair: &str, op: &Call, input: Option<Input>) {
        self.inflight.remove(op);
        if let Some(input) = input
            && let Some(e) = self.pairs.get_mut(pair)
        {
            e.m.wall_ms = unix_ms_now();
            let actions = e.m.step(input, &self.timing);
            self.act(pair, actions);
            self.drive_provider(pair);
        }
    }

    fn on_sweep_done(&mut self, destroyed: Vec<(String, &'static str)>) {
        self.inflight.remove(&Call::Sweep);
        for (label, provider) in destroyed {
            self.metrics
                .orphans_destroyed
                .get_or_create(&KindLabel {
                    kind: provider.into(),
                })
                .inc();
            self.events.emit(event(
                "",
                EventKind::Orphan,
                format!("destroyed machine {label}: it carries our label but no pair owns it"),
            ));
        }
    }

    fn create(&mut self, pair: &str) -> Result<(), Status> {
        crate::trust::identity::check_name(pair)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let rec = PairMachine::new_record(pair, unix_ms_now());
        self.store
            .put_pairs(std::slice::from_ref(&rec), true)
            .map_err(|e| Status::internal(format!("persisting the new pair: {e}")))?;
        let entry = Entry::resume(pair, rec, Instant::now(), &self.policy, &self.metrics);
        self.pairs.insert(pair.to_string(), entry);
        self.metrics.pairs.set(self.pairs.len() as i64);
        Ok(())
    }

    /// A heartbeat: from the side's accepted machine it steps the pair; from any other machine
    /// claiming the side, it only earns a fence.
    fn report(
        &mut self,
        pair: &str,
        side: Side,
        conn: u64,
        r: AgentReport,
        observed: Option<IpAddr>,
    ) {
        let Some(e) = self.pairs.get_mut(pair) else {
            return;
        };
        self.metrics.heartbeats.inc();
        if !e.m.accepts(side, &r.machine) {
            // Not the machine this side belongs to (an old GPU coming back after it was
            // replaced): fence it, listen to nothing it says.
            self.fence_stranger(pair, side, conn, &r);
            return;
        }
        if !self.claim(pair, side, conn) {
            return; // from a connection that was replaced
        }
        self.pairs.get_mut(pair).expect("checked").figures[side] = Figures::from(&r);
        self.warn_stale_gpu(pair, side, &r);
        if side == Side::Gpu {
            self.gpu_metrics(pair, &r);
        }
        let report = detection_report(side, r, observed);
        let e = self.pairs.get_mut(pair).expect("checked");
        e.m.wall_ms = unix_ms_now();
        let actions = e.m.step(Input::Report(side, report), &self.timing);
        let provider_work = actions.contains(&Action::Persist);
        self.act(pair, actions);
        if provider_work {
            self.drive_provider(pair);
        }
    }

    /// Tells a machine the pair does not accept for `side` that it is fenced (once per
    /// connection), and moves its connection out of the side's slot.
    fn fence_stranger(&mut self, pair: &str, side: Side, conn: u64, r: &AgentReport) {
        let e = self.pairs.get_mut(pair).expect("checked");
        let c = match e.others.get_mut(&conn) {
            Some(c) => c,
            None => match e.conns[side].take_if(|c| c.id == conn) {
                Some(c) => {
                    self.metrics.agents_connected.dec();
                    e.others.entry(conn).or_insert(c)
                }
                None => return,
            },
        };
        let d = Desired::Fence {
            epoch: e.m.epoch(),
            reason: format!(
                "machine {} is not this pair's {} any more",
                r.machine,
                side.as_str()
            ),
        };
        if c.sent.contains(&d) || c.tx.try_send(Ok(command_for(&d))).is_err() {
            return;
        }
        c.sent = vec![d];
        let message = format!(
            "{} ({}) reported at epoch {}; it is not the pair's {}: fenced",
            r.machine,
            side.as_str(),
            r.epoch,
            side.as_str()
        );
        self.events.emit(Event {
            epoch: e.m.epoch().0,
            ..event(pair, EventKind::Fenced, message)
        });
    }

    /// Makes `conn` the side's connection once it speaks for the accepted machine. False when
    /// it was replaced by a newer one.
    fn claim(&mut self, pair: &str, side: Side, conn: u64) -> bool {
        let e = self.pairs.get_mut(pair).expect("checked");
        let Some(c) = e.others.remove(&conn) else {
            return e.conns[side].as_ref().is_some_and(|c| c.id == conn);
        };
        if e.conns[side].is_none() {
            self.metrics.agents_connected.inc();
        }
        e.conns[side] = Some(c);
        true
    }

    /// A machine that reports an epoch older than the pair's after a failover is the old
    /// primary coming back: it is (still) told to stay fenced; say so once.
    fn warn_stale_gpu(&mut self, pair: &str, side: Side, r: &AgentReport) {
        let e = self.pairs.get_mut(pair).expect("checked");
        if side != Side::Gpu || e.m.primary() != Side::Cpu || r.epoch >= e.m.epoch().0 {
            return;
        }
        let c = e.conns[side].as_mut().expect("claimed");
        if c.warned_stale {
            return;
        }
        c.warned_stale = true;
        let message = format!(
            "the old GPU ({}) came back at epoch {}; it is fenced: the CPU is primary at epoch {}",
            r.machine,
            r.epoch,
            e.m.epoch()
        );
        self.events.emit(Event {
            epoch: e.m.epoch().0,
            ..event(pair, EventKind::Fenced, message)
        });
    }

    /// The GPU agent's replication figures.
    fn gpu_metrics(&self, pair: &str, r: &AgentReport) {
        let l = PairLabel { pair: pair.into() };
        self.metrics
            .rpo_age
            .get_or_create(&l)
            .set(r.rpo_age_ms as f64 / 1000.0);
        self.metrics
            .pending_bytes
            .get_or_create(&l)
            .set(r.pending_bytes as i64);
        self.metrics
            .replication_lag
            .get_or_create(&l)
            .set(r.last_sync_ms as f64 / 1000.0);
    }

    /// Carries out a machine's actions: persist first, then events, metrics and commands.
    fn act(&mut self, pair: &str, actions: Vec<Action>) {
        let Some(e) = self.pairs.get(pair) else {
            return;
        };
        let epoch = e.m.epoch().0;
        self.persist(pair, &actions);
        for a in actions {
            self.record(pair, epoch, a);
        }
        self.sync_commands(pair);
    }

    /// Writes the record now when the actions say so (blocking the pair's commands while that
    /// fails), or with the next batch.
    fn persist(&mut self, pair: &str, actions: &[Action]) {
        let e = self.pairs.get_mut(pair).expect("checked");
        if actions.contains(&Action::Persist) {
            match self.store.put_pairs(std::slice::from_ref(&e.m.rec), true) {
                Ok(()) => {
                    e.blocked = false;
                    self.soon.remove(pair);
                }
                Err(err) => {
                    tracing::error!(pair, error = %err, "cannot persist the pair; holding its commands until it is written");
                    e.blocked = true;
                }
            }
        } else if actions.contains(&Action::PersistSoon) {
            self.soon.insert(pair.to_string());
        }
    }

    /// The events and metrics of one action.
    fn record(&mut self, pair: &str, epoch: u64, a: Action) {
        let l = PairLabel { pair: pair.into() };
        match a {
            Action::Persist | Action::PersistSoon | Action::AttemptFailed => {}
            Action::Transition { from, to, reason } => {
                self.transition(pair, epoch, from, to, reason)
            }
            Action::Warn { kind, message } => {
                if kind == EventKind::Blind {
                    self.metrics.blind.get_or_create(&l).inc();
                }
                self.events.emit(Event {
                    epoch,
                    ..event(pair, kind, message)
                });
            }
            Action::Detected(d) => self.metrics.detect_seconds.observe(d.as_secs_f64()),
            Action::Recovered(d) => {
                self.metrics.recovery_seconds.observe(d.as_secs_f64());
                let message = format!("protected again {} ms after the failure", d.as_millis());
                self.events.emit(Event {
                    epoch,
                    ..event(pair, EventKind::Recovered, message)
                });
            }
            Action::FailedOver => {
                self.metrics.failovers.get_or_create(&l).inc();
                let reason = self.pairs[pair].m.rec.reason.clone();
                self.events.emit(Event {
                    epoch,
                    to_state: proto_state(PairState::FailedOver),
                    ..event(pair, EventKind::Failover, reason)
                });
            }
        }
    }

    fn transition(
        &mut self,
        pair: &str,
        epoch: u64,
        from: PairState,
        to: PairState,
        reason: String,
    ) {
        self.metrics.set_state(pair, Some(from), to);
        self.metrics
            .pair_epoch
            .get_or_create(&PairLabel { pair: pair.into() })
            .set(epoch as i64);
        self.metrics
            .transitions
            .get_or_create(&TransitionLabel {
                from: from.as_str().into(),
                to: to.as_str().into(),
            })
            .inc();
        self.events.emit(Event {
            from_state: proto_state(from),
            to_state: proto_state(to),
            epoch,
            ..event(pair, EventKind::Transition, reason)
        });
    }

    /// Sends each connected agent what it should have been told and has not been.
    fn sync_commands(&mut self, pair: &str) {
        let Some(e) = self.pairs.get_mut(pair) else {
            return;
        };
        if e.blocked {
            return;
        }
        for side in Side::ALL {
            let desired = e.m.desired(side);
            let Some(c) = e.conns[side].as_mut() else {
                continue;
            };
            let mut sent = Vec::new();
            for d in &desired {
                if c.sent.contains(d) || c.tx.try_send(Ok(command_for(d))).is_ok() {
                    sent.push(d.clone());
                }
            }
            c.sent = sent;
        }
    }

    /// Time passes for every pair; every fifth tick (`slow`) also writes the batch, refreshes
    /// the gauges and sends heartbeat summaries.
    fn tick(&mut self, slow: bool) {
        let now = Instant::now();
        let names: Vec<String> = self.pairs.keys().cloned().collect();
        for name in &names {
            self.tick_pair(name, now);
        }
        self.tick_provider(now);
        if slow {
            self.flush_soon();
            self.refresh_metrics(now);
            self.summaries(&names, now);
        }
    }

    fn tick_pair(&mut self, name: &str, now: Instant) {
        let e = self.pairs.get_mut(name).expect("listed");
        if e.blocked {
            // Retry the write that blocked this pair.
            if self
                .store
                .put_pairs(std::slice::from_ref(&e.m.rec), true)
                .is_err()
            {
                return;
            }
            e.blocked = false;
        }
        e.m.wall_ms = unix_ms_now();
        let actions = e.m.step(Input::Tick(now), &self.timing);
        if !actions.is_empty() {
            self.act(name, actions);
        }
        self.drive_provider(name);
    }

    /// Polls the provider and sweeps orphans, each on its own interval.
    fn tick_provider(&mut self, now: Instant) {
        let Some(p) = self.prov.clone() else {
            return;
        };
        if now.duration_since(self.last_poll) >= p.cfg.poll_interval {
            self.last_poll = now;
            self.poll_provider();
        }
        if now.duration_since(self.last_sweep) >= p.cfg.sweep_interval {
            self.last_sweep = now;
            self.sweep();
        }
    }

    /// A heartbeat summary of each pair, every 5 s while someone asked for them.
    fn summaries(&mut self, names: &[String], now: Instant) {
        if self.hb_subscribers <= 0
            || now.duration_since(self.last_summary) < Duration::from_secs(5)
        {
            return;
        }
        self.last_summary = now;
        for name in names {
            self.events.emit(self.summary(name));
        }
    }

    fn summary(&self, name: &str) -> Event {
        let v = self.view(name);
        let age = |m: &Option<MachineView>| {
            m.as_ref().map_or("absent".into(), |m| {
                format!("{} ms ago", m.last_heartbeat_ms)
            })
        };
        let message = format!(
            "gpu {} cpu {} lag {} ms generation {}",
            age(&v.gpu),
            age(&v.cpu),
            v.sync_lag_ms,
            v.last_durable_generation
        );
        Event {
            epoch: v.epoch,
            to_state: v.state,
            ..event(name, EventKind::Heartbeat, message)
        }
    }

    fn flush_soon(&mut self) {
        if self.soon.is_empty() {
            return;
        }
        let recs: Vec<PairRecord> = self
            .soon
            .iter()
            .filter_map(|n| self.pairs.get(n).map(|e| e.m.rec.clone()))
            .collect();
        match self.store.put_pairs(&recs, true) {
            Ok(()) => self.soon.clear(),
            Err(e) => tracing::warn!(error = %e, "cannot persist machine records; will retry"),
        }
    }

    fn refresh_metrics(&self, now: Instant) {
        self.count_machines();
        for (name, e) in &self.pairs {
            for (side, seen) in e.m.seen.iter() {
                if let Some(t) = seen.last_seen {
                    self.metrics
                        .heartbeat_age
                        .get_or_create(&PairSideLabel {
                            pair: name.clone(),
                            side: side.as_str().into(),
                        })
                        .set(now.duration_since(t).as_secs_f64());
                }
            }
            let g = &e.figures.gpu;
            let l = PairLabel { pair: name.clone() };
            let progress = match e.restore_bytes() {
                None => 0.0,
                Some((_, 0)) => 1.0,
                Some((done, total)) => (done as f64 / total as f64).min(1.0),
            };
            self.metrics
                .restore_progress
                .get_or_create(&l)
                .set(progress);
            self.metrics
                .last_durable_generation
                .get_or_create(&l)
                .set(e.figures.cpu.generation.max(g.generation) as i64);
        }
    }

    /// Provider machines owned, being created or being destroyed, by role.
    fn count_machines(&self) {
        let mut count = PerSide::<i64>::default();
        for e in self.pairs.values() {
            let r = &e.m.rec;
            count.gpu += i64::from(r.gpu_owned.is_some());
            count.cpu += i64::from(r.cpu_owned.is_some());
            for m in r
                .teardown
                .iter()
                .chain(r.provision.iter().filter_map(|p| p.machine.as_ref()))
            {
                count[Side::from_record(m.role())] += 1;
            }
        }
        for (side, &n) in count.iter() {
            self.metrics
                .machines
                .get_or_create(&KindLabel {
                    kind: side.as_str().into(),
                })
                .set(n);
        }
    }

    fn view(&self, name: &str) -> PairView {
        let e = &self.pairs[name];
        let primary = e.m.primary();
        let active = match primary {
            Side::Gpu => e.m.rec.gpu.as_ref(),
            Side::Cpu => e.m.rec.cpu.as_ref(),
        }
        .map(|m| m.address.clone())
        .unwrap_or_default();
        PairView {
            pair: name.to_string(),
            state: proto_state(e.m.state()),
            epoch: e.m.epoch().0,
            primary: Role::from(primary).into(),
            last_durable_generation: e.figures.cpu.generation.max(e.figures.gpu.generation),
            sync_lag_ms: e.figures.gpu.rpo_age_ms,
            active_endpoint: active,
            gpu: machine_view(e, Side::Gpu),
            cpu: machine_view(e, Side::Cpu),
            reason: e.m.rec.reason.clone(),
            pending_bytes: e.figures.gpu.pending_bytes,
            restore_done_bytes: e.restore_bytes().map_or(0, |r| r.0),
            restore_total_bytes: e.restore_bytes().map_or(0, |r| r.1),
            provisioning: provisioning_line(&e.m.rec),
        }
    }
}

/// One machine of a pair as `pairs` shows it (None until its agent reported).
fn machine_view(e: &Entry, side: Side) -> Option<MachineView> {
    let rec = match side {
        Side::Gpu => &e.m.rec.gpu,
        Side::Cpu => &e.m.rec.cpu,
    };
    let seen = &e.m.seen[side];
    let m = rec.as_ref()?;
    Some(MachineView {
        machine: m.machine.clone(),
        address: m.address.clone(),
        workspace: m.workspace.clone(),
        last_heartbeat_ms: seen
            .last_seen
            .map(|t| t.elapsed().as_millis() as u64)
            .unwrap_or(u64::MAX),
        connected: e.conns[side].is_some(),
        epoch: e.figures[side].epoch,
    })
}

/// "gpu attempt 2 (boot): <label>; last error: ..." ("" when nothing is being provisioned).
fn provisioning_line(rec: &PairRecord) -> String {
    let Some(p) = &rec.provision else {
        return String::new();
    };
    let m = p.machine.clone().unwrap_or_default();
    let mut s = format!(
        "{} attempt {} ({}): {}",
        p.role(),
        p.attempt,
        p.phase(),
        m.label
    );
    if !p.last_error.is_empty() {
        s.push_str(&format!("; last error: {}", p.last_error));
    }
    s
}
