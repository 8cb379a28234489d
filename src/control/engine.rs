//! The coordinator's engine: one task owns every pair's [`PairMachine`] and the connections of
//! their agents (neon's heartbeater pattern: one owner of the liveness table).
//!
//! Everything that changes a pair goes through this task, in order: heartbeats, disconnections,
//! ticks, and admin requests. For each input it steps the machine, persists the record when the
//! machine says so *before* telling any agent anything (a failed write blocks the pair's commands
//! until it succeeds), records events and metrics, and then sends each connected agent whatever
//! the record says it should have been told and its connection has not received yet.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::control::failover::{
    Action, AgentStatus, Desired, Input, PairMachine, PairState, Policy, Report, Timing,
};
use crate::control::metrics::{KindLabel, Metrics, PairLabel, PairSideLabel, TransitionLabel};
use crate::control::provider::{MachineState, Provider, ProviderError, ProvisionConfig, Startup};
use crate::control::store::Store;
use crate::host::unix_ms_now;
use crate::proto::state::{MachineRecord, PairRecord, Phase};
use crate::proto::{
    ActionReply, AgentReport, Command, Event, EventKind, Fence, Freeze, MachineView, PairView,
    ProbeTarget, Promote, Receive, Role, SetPeer, command,
};
use crate::types::Epoch;
use crate::types::Side;

const RECENT_EVENTS: usize = 2000;
const TICK: Duration = Duration::from_millis(200);

/// Recent events and a live feed of new ones.
pub struct Events {
    tx: broadcast::Sender<Event>,
    recent: Mutex<VecDeque<Event>>,
}

impl Events {
    fn new() -> Events {
        Events {
            tx: broadcast::channel(8192).0,
            recent: Mutex::new(VecDeque::new()),
        }
    }

    pub fn emit(&self, e: Event) {
        tracing::info!(pair = %e.pair, kind = %e.kind(), from = %e.from_state(), to = %e.to_state(), epoch = e.epoch, "{}", e.message);
        let mut r = self.recent.lock().expect("events");
        if r.len() == RECENT_EVENTS {
            r.pop_front();
        }
        r.push_back(e.clone());
        drop(r);
        let _ = self.tx.send(e);
    }

    /// The recent past, and a receiver for what comes next (no gap between the two).
    pub fn subscribe(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let r = self.recent.lock().expect("events");
        let rx = self.tx.subscribe();
        (r.iter().cloned().collect(), rx)
    }
}

fn event(pair: &str, kind: EventKind, message: String) -> Event {
    Event {
        unix_ms: unix_ms_now(),
        pair: pair.to_string(),
        kind: kind.into(),
        message,
        ..Default::default()
    }
}

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
        op: String,
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

/// What the engine needs to create and destroy machines.
pub struct Provisioning {
    /// Where GPU machines come from.
    pub gpu: Arc<dyn Provider>,
    /// Where CPU standbys come from (often the same provider as `gpu`).
    pub cpu: Arc<dyn Provider>,
    pub cfg: ProvisionConfig,
    /// The coordinator as new machines dial it.
    pub coordinator_url: String,
    pub token_key: Vec<u8>,
    pub fingerprint: String,
}

impl Provisioning {
    pub fn provider(&self, side: Side) -> &Arc<dyn Provider> {
        match side {
            Side::Gpu => &self.gpu,
            Side::Cpu => &self.cpu,
        }
    }

    /// Each distinct provider once (the sweeper lists every one).
    pub fn providers(&self) -> Vec<Arc<dyn Provider>> {
        let mut v = vec![self.gpu.clone()];
        if !Arc::ptr_eq(&self.gpu, &self.cpu) {
            v.push(self.cpu.clone());
        }
        v
    }
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
            let mut m = PairMachine::resume(rec, now);
            m.policy = policy.clone();
            metrics.set_state(&name, None, m.state());
            metrics
                .pair_epoch
                .get_or_create(&PairLabel { pair: name.clone() })
                .set(m.epoch().0 as i64);
            pairs.insert(
                name,
                Entry {
                    m,
                    conns: [None, None],
                    others: HashMap::new(),
                    figures: [Figures::default(), Figures::default()],
                    blocked: false,
                },
            );
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

struct Entry {
    m: PairMachine,
    conns: [Option<Conn>; 2],
    /// Connections claiming a side for a machine the pair does not accept (an old GPU).
    others: HashMap<u64, Conn>,
    figures: [Figures; 2],
    /// A durable write failed: no command goes out until the record is on disk.
    blocked: bool,
}

impl Entry {
    /// While a restore runs: bytes on the new GPU and bytes of the CPU's workspace.
    fn restore_bytes(&self) -> Option<(u64, u64)> {
        matches!(
            self.m.state(),
            PairState::Restoring | PairState::CuttingOver
        )
        .then(|| (self.figures[0].bytes_total, self.figures[1].workspace_bytes))
    }
}

fn idx(side: Side) -> usize {
    match side {
        Side::Gpu => 0,
        Side::Cpu => 1,
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

struct Actor {
    pairs: HashMap<String, Entry>,
    timing: Timing,
    policy: Policy,
    prov: Option<Arc<Provisioning>>,
    self_tx: mpsc::Sender<Msg>,
    /// Provider calls under way, by "<op>:<label>".
    inflight: HashSet<String>,
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
            Msg::Connect { pair, conn, tx } => {
                if !self.pairs.contains_key(&pair) {
                    if let Err(e) = self.create(&pair) {
                        let _ = tx.try_send(Err(e));
                        return;
                    }
                    self.events.emit(event(
                        &pair,
                        EventKind::Created,
                        "pair created by its first agent".into(),
                    ));
                }
                let e = self.pairs.get_mut(&pair).expect("created");
                // Which machine this is, is known from its first report.
                e.others.insert(
                    conn,
                    Conn {
                        id: conn,
                        tx,
                        sent: Vec::new(),
                        warned_stale: false,
                    },
                );
            }
            Msg::Report {
                pair,
                side,
                conn,
                report,
                observed,
            } => self.report(&pair, side, conn, *report, observed),
            Msg::Disconnect { pair, side, conn } => {
                let Some(e) = self.pairs.get_mut(&pair) else {
                    return;
                };
                e.others.remove(&conn);
                if e.conns[idx(side)].as_ref().is_some_and(|c| c.id == conn) {
                    e.conns[idx(side)] = None;
                    self.metrics.agents_connected.dec();
                    let actions =
                        e.m.step(Input::Disconnected(side, Instant::now()), &self.timing);
                    self.act(&pair, actions);
                }
            }
            Msg::Create { pair, reply } => {
                let r = if self.pairs.contains_key(&pair) {
                    Err(Status::already_exists(format!(
                        "pair {pair} already exists"
                    )))
                } else {
                    self.create(&pair).map(|_| {
                        self.events
                            .emit(event(&pair, EventKind::Created, "pair created".into()));
                        self.view(&pair)
                    })
                };
                let _ = reply.send(r);
            }
            Msg::List { reply } => {
                let mut names: Vec<&String> = self.pairs.keys().collect();
                names.sort();
                let views = names.into_iter().map(|n| self.view(n)).collect();
                let _ = reply.send(views);
            }
            Msg::Manual { pair, input, reply } => {
                let Some(e) = self.pairs.get_mut(&pair) else {
                    let _ = reply.send(Err(Status::not_found(format!("no pair {pair}"))));
                    return;
                };
                e.m.wall_ms = unix_ms_now();
                let actions = e.m.step(input, &self.timing);
                let refused = actions.iter().find_map(|a| match a {
                    Action::Warn {
                        kind: EventKind::Refused,
                        message,
                    } => Some(message.clone()),
                    _ => None,
                });
                let said = actions.iter().rev().find_map(|a| match a {
                    Action::Transition { reason, .. } => Some(reason.clone()),
                    Action::Warn { message, .. } => Some(message.clone()),
                    _ => None,
                });
                self.act(&pair, actions);
                self.drive_provider(&pair);
                let e = &self.pairs[&pair];
                let r = match refused {
                    Some(msg) => Err(Status::failed_precondition(msg)),
                    None => Ok(ActionReply {
                        pair: pair.clone(),
                        state: proto_state(e.m.state()),
                        epoch: e.m.epoch().0,
                        message: said.unwrap_or_else(|| e.m.rec.reason.clone()),
                    }),
                };
                let _ = reply.send(r);
            }
            Msg::Provider { pair, op, input } => {
                self.inflight.remove(&op);
                if let Some(input) = input
                    && let Some(e) = self.pairs.get_mut(&pair)
                {
                    e.m.wall_ms = unix_ms_now();
                    let actions = e.m.step(input, &self.timing);
                    self.act(&pair, actions);
                    self.drive_provider(&pair);
                }
            }
            Msg::Owned { label, reply } => {
                let owned = self.pairs.values().any(|e| {
                    let r = &e.m.rec;
                    [&r.gpu_owned, &r.cpu_owned]
                        .into_iter()
                        .flatten()
                        .chain(r.teardown.iter())
                        .chain(r.provision.iter().filter_map(|p| p.machine.as_ref()))
                        .any(|m| m.label == label)
                });
                let _ = reply.send(owned);
            }
            Msg::SweepDone { destroyed } => {
                self.inflight.remove("sweep");
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
                        format!(
                            "destroyed machine {label}: it carries our label but no pair owns it"
                        ),
                    ));
                }
            }
            Msg::HeartbeatSubscribers(d) => self.hb_subscribers += d,
        }
    }

    /// Starts the provider calls the pair's record asks for and that are not under way:
    /// creating the machine being provisioned (when its next try is due) and destroying
    /// machines on the teardown list.
    fn drive_provider(&mut self, pair: &str) {
        let Some(prov) = self.prov.clone() else {
            return;
        };
        let Some(e) = self.pairs.get(pair) else {
            return;
        };
        if e.blocked {
            return; // the intent is not durable yet
        }
        let now = unix_ms_now();
        let rec = &e.m.rec;
        // A failed machine is torn down before the next is tried (never two at once).
        if let Some(p) = &rec.provision
            && p.phase() == Phase::Create
            && p.next_try_unix_ms <= now
            && !rec.teardown.iter().any(|t| t.role == p.role)
            && let Some(m) = &p.machine
        {
            let op = format!("create:{}", m.label);
            if self.inflight.insert(op.clone()) {
                let role = Side::from_record(p.role());
                let blocked = e.m.blocked();
                let label = m.label.clone();
                let tx = self.self_tx.clone();
                let pair = pair.to_string();
                let metrics = self.metrics.clone();
                let prov = prov.clone();
                tokio::spawn(async move {
                    let input = create_machine(&prov, &pair, role, &label, &blocked).await;
                    let outcome = match &input {
                        Input::Created { .. } => "created",
                        _ => "failed",
                    };
                    metrics
                        .provisioning_attempts
                        .get_or_create(&KindLabel {
                            kind: outcome.into(),
                        })
                        .inc();
                    let _ = tx
                        .send(Msg::Provider {
                            pair,
                            op,
                            input: Some(input),
                        })
                        .await;
                });
            }
        }
        for m in rec.teardown.clone() {
            let op = format!("destroy:{}", m.label);
            if !self.inflight.insert(op.clone()) {
                continue;
            }
            let (prov, tx, pair) = (prov.clone(), self.self_tx.clone(), pair.to_string());
            tokio::spawn(async move {
                let r = destroy_machine(&prov, Side::from_record(m.role()), &m.label, &m.id).await;
                let input = match r {
                    Ok(()) => Some(Input::Destroyed { label: m.label }),
                    Err(e) => {
                        tracing::warn!(label = %m.label, error = %e, "destroying a machine failed; will retry");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        None
                    }
                };
                let _ = tx.send(Msg::Provider { pair, op, input }).await;
            });
        }
    }

    /// Asks the provider about every machine a pair owns; one that is gone becomes an input.
    fn poll_provider(&mut self) {
        let Some(prov) = self.prov.clone() else {
            return;
        };
        for (name, e) in &self.pairs {
            let r = &e.m.rec;
            let mut watch: Vec<(Side, String, String)> = Vec::new();
            for (side, o) in [(Side::Gpu, &r.gpu_owned), (Side::Cpu, &r.cpu_owned)] {
                if let Some(o) = o {
                    watch.push((side, o.label.clone(), o.id.clone()));
                }
            }
            if let Some(p) = &r.provision
                && p.phase() == Phase::Boot
                && let Some(m) = &p.machine
            {
                watch.push((Side::from_record(p.role()), m.label.clone(), m.id.clone()));
            }
            for (side, label, id) in watch {
                let op = format!("get:{label}");
                if !self.inflight.insert(op.clone()) {
                    continue;
                }
                let (prov, tx, pair) = (prov.clone(), self.self_tx.clone(), name.clone());
                let limit = prov.cfg.call_timeout;
                tokio::spawn(async move {
                    let p = prov.provider(side);
                    let r = if id.is_empty() {
                        // Its id is not known (the agent joined before the create returned, or
                        // the coordinator restarted in between): find it by its label.
                        tokio::time::timeout(limit, async {
                            p.list(&label)
                                .await
                                .map(|ms| ms.into_iter().find(|m| m.label == label))
                        })
                        .await
                    } else {
                        tokio::time::timeout(limit, p.get(&id)).await
                    };
                    let gone = match r {
                        Ok(Ok(None)) => Some("gone".to_string()),
                        Ok(Ok(Some(m))) if m.state == MachineState::Stopped => {
                            Some("stopped".to_string())
                        }
                        _ => None,
                    };
                    let input = gone.map(|how| {
                        tracing::warn!(%pair, %label, how, "the provider reports a machine not running");
                        Input::ProviderGone(side, Instant::now())
                    });
                    let _ = tx.send(Msg::Provider { pair, op, input }).await;
                });
            }
        }
    }

    /// Destroys machines that carry our label prefix but that no pair owns (a create that
    /// succeeded after it was given up, a coordinator that died between create and persist).
    fn sweep(&mut self) {
        let Some(prov) = self.prov.clone() else {
            return;
        };
        if !self.inflight.insert("sweep".into()) {
            return;
        }
        let tx = self.self_tx.clone();
        let prefix = format!("{}-", self.policy.label_prefix);
        tokio::spawn(async move {
            let mut destroyed = Vec::new();
            for provider in prov.providers() {
                match tokio::time::timeout(prov.cfg.call_timeout, provider.list(&prefix)).await {
                    Ok(Ok(machines)) => {
                        for m in machines {
                            let (reply, rx) = oneshot::channel();
                            if tx
                                .send(Msg::Owned {
                                    label: m.label.clone(),
                                    reply,
                                })
                                .await
                                .is_err()
                            {
                                return;
                            }
                            if rx.await.unwrap_or(true) {
                                continue;
                            }
                            match destroy_with(&provider, prov.cfg.call_timeout, &m.label, &m.id)
                                .await
                            {
                                Ok(()) => destroyed.push((m.label, provider.name())),
                                Err(e) => {
                                    tracing::warn!(label = %m.label, error = %e, "cannot destroy an orphan")
                                }
                            }
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(provider = provider.name(), error = %e, "sweeper: listing machines failed")
                    }
                    Err(_) => tracing::warn!(
                        provider = provider.name(),
                        "sweeper: listing machines timed out"
                    ),
                }
            }
            let _ = tx.send(Msg::SweepDone { destroyed }).await;
        });
    }

    fn create(&mut self, pair: &str) -> Result<(), Status> {
        crate::trust::identity::check_name(pair)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let rec = PairMachine::new_record(pair);
        self.store
            .put_pairs(std::slice::from_ref(&rec), true)
            .map_err(|e| Status::internal(format!("persisting the new pair: {e}")))?;
        let mut m = PairMachine::resume(rec, Instant::now());
        m.policy = self.policy.clone();
        self.metrics.set_state(pair, None, m.state());
        self.metrics
            .pair_epoch
            .get_or_create(&PairLabel { pair: pair.into() })
            .set(m.epoch().0 as i64);
        self.pairs.insert(
            pair.to_string(),
            Entry {
                m,
                conns: [None, None],
                others: HashMap::new(),
                figures: [Figures::default(), Figures::default()],
                blocked: false,
            },
        );
        self.metrics.pairs.set(self.pairs.len() as i64);
        Ok(())
    }

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
            let c = match e.others.get_mut(&conn) {
                Some(c) => c,
                None => match e.conns[idx(side)].take_if(|c| c.id == conn) {
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
            if !c.sent.contains(&d) && c.tx.try_send(Ok(command_for(&d))).is_ok() {
                c.sent = vec![d];
                self.events.emit(Event {
                    epoch: e.m.epoch().0,
                    ..event(
                        pair,
                        EventKind::Fenced,
                        format!(
                            "{} ({}) reported at epoch {}; it is not the pair's {}: fenced",
                            r.machine,
                            side.as_str(),
                            r.epoch,
                            side.as_str()
                        ),
                    )
                });
            }
            return;
        }
        if let Some(c) = e.others.remove(&conn) {
            if e.conns[idx(side)].is_none() {
                self.metrics.agents_connected.inc();
            }
            e.conns[idx(side)] = Some(c);
        } else if e.conns[idx(side)].as_ref().is_none_or(|c| c.id != conn) {
            return; // from a connection that was replaced
        }
        let address = if !r.advertise.is_empty() {
            r.advertise.clone()
        } else {
            match (observed, r.listen_port) {
                (Some(ip), port) if port != 0 => SocketAddr::new(ip, port as u16).to_string(),
                _ => String::new(),
            }
        };
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
        e.figures[idx(side)] = Figures {
            generation: r.generation,
            rpo_age_ms: r.rpo_age_ms,
            pending_bytes: r.pending_bytes,
            epoch: r.epoch,
            bytes_total: r.bytes_total,
            workspace_bytes: r.workspace_bytes,
        };
        let status = AgentStatus {
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
        };
        // A machine that reports an epoch older than the pair's after a failover is the old
        // primary coming back: it is (still) told to stay fenced; say so once.
        if side == Side::Gpu && e.m.primary() == Side::Cpu && r.epoch < e.m.epoch().0 {
            let c = e.conns[idx(side)].as_mut().expect("checked");
            if !c.warned_stale {
                c.warned_stale = true;
                self.events.emit(Event {
                    epoch: e.m.epoch().0,
                    ..event(
                        pair,
                        EventKind::Fenced,
                        format!(
                            "the old GPU ({}) came back at epoch {}; it is fenced: the CPU is primary at epoch {}",
                            r.machine,
                            r.epoch,
                            e.m.epoch()
                        ),
                    )
                });
            }
        }
        let report = Report {
            at: Instant::now(),
            epoch: Epoch(r.epoch),
            fatal,
            probe_ok_age: probe,
            machine: Some(MachineRecord {
                machine: r.machine,
                address,
                workspace: r.workspace,
            }),
            status,
        };
        e.m.wall_ms = unix_ms_now();
        let actions = e.m.step(Input::Report(side, report), &self.timing);
        if side == Side::Gpu {
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
        let provider_work = actions.contains(&Action::Persist);
        self.act(pair, actions);
        if provider_work {
            self.drive_provider(pair);
        }
    }

    /// Carries out a machine's actions: persist first, then events, metrics and commands.
    fn act(&mut self, pair: &str, actions: Vec<Action>) {
        let Some(e) = self.pairs.get_mut(pair) else {
            return;
        };
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
        let epoch = e.m.epoch().0;
        for a in actions {
            match a {
                Action::Persist | Action::PersistSoon => {}
                Action::Transition { from, to, reason } => {
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
                Action::Warn { kind, message } => {
                    if kind == EventKind::Blind {
                        self.metrics
                            .blind
                            .get_or_create(&PairLabel { pair: pair.into() })
                            .inc();
                    }
                    self.events.emit(Event {
                        epoch,
                        ..event(pair, kind, message)
                    });
                }
                Action::Detected(d) => self.metrics.detect_seconds.observe(d.as_secs_f64()),
                Action::Recovered(d) => {
                    self.metrics.recovery_seconds.observe(d.as_secs_f64());
                    self.events.emit(Event {
                        epoch,
                        ..event(
                            pair,
                            EventKind::Recovered,
                            format!("protected again {} ms after the failure", d.as_millis()),
                        )
                    });
                }
                Action::AttemptFailed => {}
                Action::FailedOver => {
                    self.metrics
                        .failovers
                        .get_or_create(&PairLabel { pair: pair.into() })
                        .inc();
                    self.events.emit(Event {
                        epoch,
                        to_state: proto_state(PairState::FailedOver),
                        ..event(pair, EventKind::Failover, e.m.rec.reason.clone())
                    });
                }
            }
        }
        self.sync_commands(pair);
    }

    /// Sends each connected agent what it should have been told and has not been.
    fn sync_commands(&mut self, pair: &str) {
        let Some(e) = self.pairs.get_mut(pair) else {
            return;
        };
        if e.blocked {
            return;
        }
        for side in [Side::Gpu, Side::Cpu] {
            let desired = e.m.desired(side);
            let Some(c) = e.conns[idx(side)].as_mut() else {
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

    fn tick(&mut self, slow: bool) {
        let now = Instant::now();
        let names: Vec<String> = self.pairs.keys().cloned().collect();
        for name in &names {
            let e = self.pairs.get_mut(name).expect("listed");
            if e.blocked {
                // Retry the write that blocked this pair.
                if self
                    .store
                    .put_pairs(std::slice::from_ref(&e.m.rec), true)
                    .is_ok()
                {
                    e.blocked = false;
                } else {
                    continue;
                }
            }
            e.m.wall_ms = unix_ms_now();
            let actions = e.m.step(Input::Tick(now), &self.timing);
            if !actions.is_empty() {
                self.act(name, actions);
            }
            self.drive_provider(name);
        }
        if let Some(p) = self.prov.clone() {
            if now.duration_since(self.last_poll) >= p.cfg.poll_interval {
                self.last_poll = now;
                self.poll_provider();
            }
            if now.duration_since(self.last_sweep) >= p.cfg.sweep_interval {
                self.last_sweep = now;
                self.sweep();
            }
        }
        if slow {
            self.flush_soon();
            self.refresh_metrics(now);
            if self.hb_subscribers > 0
                && now.duration_since(self.last_summary) >= Duration::from_secs(5)
            {
                self.last_summary = now;
                for name in &names {
                    let v = self.view(name);
                    self.events.emit(Event {
                        epoch: v.epoch,
                        to_state: v.state,
                        ..event(
                            name,
                            EventKind::Heartbeat,
                            format!(
                                "gpu {} cpu {} lag {} ms generation {}",
                                v.gpu.as_ref().map_or("absent".into(), |m| format!(
                                    "{} ms ago",
                                    m.last_heartbeat_ms
                                )),
                                v.cpu.as_ref().map_or("absent".into(), |m| format!(
                                    "{} ms ago",
                                    m.last_heartbeat_ms
                                )),
                                v.sync_lag_ms,
                                v.last_durable_generation
                            ),
                        )
                    });
                }
            }
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
        let (mut gpus, mut cpus) = (0i64, 0i64);
        for e in self.pairs.values() {
            let r = &e.m.rec;
            gpus += i64::from(r.gpu_owned.is_some());
            cpus += i64::from(r.cpu_owned.is_some());
            for m in r
                .teardown
                .iter()
                .chain(r.provision.iter().filter_map(|p| p.machine.as_ref()))
            {
                match Side::from_record(m.role()) {
                    Side::Cpu => cpus += 1,
                    Side::Gpu => gpus += 1,
                }
            }
        }
        for (side, n) in [(Side::Gpu, gpus), (Side::Cpu, cpus)] {
            self.metrics
                .machines
                .get_or_create(&KindLabel {
                    kind: side.as_str().into(),
                })
                .set(n);
        }
        for (name, e) in &self.pairs {
            for (side, seen) in [(Side::Gpu, &e.m.gpu), (Side::Cpu, &e.m.cpu)] {
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
            let g = &e.figures[0];
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
                .set(e.figures[1].generation.max(g.generation) as i64);
        }
    }

    fn view(&self, name: &str) -> PairView {
        let e = &self.pairs[name];
        let now = Instant::now();
        let mv = |side: Side, rec: &Option<MachineRecord>| {
            rec.as_ref().map(|m| {
                let seen = match side {
                    Side::Gpu => &e.m.gpu,
                    Side::Cpu => &e.m.cpu,
                };
                MachineView {
                    machine: m.machine.clone(),
                    address: m.address.clone(),
                    workspace: m.workspace.clone(),
                    last_heartbeat_ms: seen
                        .last_seen
                        .map(|t| now.duration_since(t).as_millis() as u64)
                        .unwrap_or(u64::MAX),
                    connected: e.conns[idx(side)].is_some(),
                    epoch: e.figures[idx(side)].epoch,
                }
            })
        };
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
            last_durable_generation: e.figures[1].generation.max(e.figures[0].generation),
            sync_lag_ms: e.figures[0].rpo_age_ms,
            active_endpoint: active,
            gpu: mv(Side::Gpu, &e.m.rec.gpu),
            cpu: mv(Side::Cpu, &e.m.rec.cpu),
            reason: e.m.rec.reason.clone(),
            pending_bytes: e.figures[0].pending_bytes,
            restore_done_bytes: e.restore_bytes().map_or(0, |r| r.0),
            restore_total_bytes: e.restore_bytes().map_or(0, |r| r.1),
            provisioning: e
                .m
                .rec
                .provision
                .as_ref()
                .map(|p| {
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
                })
                .unwrap_or_default(),
        }
    }
}

/// One provisioning attempt: settle what a previous attempt with this label left (by listing
/// the label), otherwise choose the best offer and create. An ambiguous failure is settled by
/// listing the label again, never by creating twice.
async fn create_machine(
    prov: &Provisioning,
    pair: &str,
    role: Side,
    label: &str,
    blocked: &[String],
) -> Input {
    let limit = prov.cfg.call_timeout;
    let p = prov.provider(role);
    let failed = |error: String, block: Vec<String>| Input::CreateFailed {
        label: label.to_string(),
        error,
        block,
    };
    let find = || async {
        match tokio::time::timeout(limit, p.list(label)).await {
            Ok(Ok(ms)) => Ok(ms.into_iter().find(|m| m.label == label)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("listing machines timed out".to_string()),
        }
    };
    match find().await {
        Ok(Some(m)) => {
            return Input::Created {
                label: label.to_string(),
                id: m.id,
                offer: String::new(),
                place: m.place,
            };
        }
        Ok(None) => {}
        Err(e) => return failed(format!("cannot list machines: {e}"), vec![]),
    }
    let filter = match role {
        Side::Gpu => &prov.cfg.gpu,
        Side::Cpu => &prov.cfg.cpu,
    };
    let offers = match tokio::time::timeout(limit, p.search(role)).await {
        Ok(Ok(o)) => filter.rank(o, blocked),
        Ok(Err(e)) => return failed(format!("searching offers: {e}"), vec![]),
        Err(_) => return failed("searching offers timed out".into(), vec![]),
    };
    let Some(offer) = offers.into_iter().next() else {
        return failed(
            "no offer matches the configured filter (or all are blocklisted)".into(),
            vec![],
        );
    };
    let role_id = match role {
        Side::Gpu => crate::trust::identity::Role::Gpu,
        Side::Cpu => crate::trust::identity::Role::Cpu,
    };
    let exp = unix_ms_now() / 1000 + prov.cfg.token_ttl.as_secs().max(60);
    let token = crate::trust::token::Token::new(pair, role_id, exp, &prov.fingerprint)
        .sign(&prov.token_key);
    let startup = Startup {
        pair: pair.to_string(),
        role,
        coordinator: prov.coordinator_url.clone(),
        join_token: token,
        label: label.to_string(),
    };
    tracing::info!(%pair, %label, offer = %offer.id, price = offer.price_per_hour, "creating a machine");
    let r = tokio::time::timeout(limit, p.create(&offer, &startup)).await;
    let created = |id: String, place: String| Input::Created {
        label: label.to_string(),
        id,
        offer: offer.id.clone(),
        place: if place.is_empty() {
            offer.place.clone()
        } else {
            place
        },
    };
    match r {
        Ok(Ok(m)) => created(m.id, m.place),
        Ok(Err(ProviderError::Rejected(e))) => failed(e, vec![offer.id.clone()]),
        Ok(Err(ProviderError::Unavailable { place, message })) => {
            failed(message, vec![offer.id.clone(), place])
        }
        Ok(Err(e @ (ProviderError::Transient(_) | ProviderError::Conflict(_)))) => {
            match find().await {
                Ok(Some(m)) => created(m.id, m.place),
                _ => failed(
                    format!("create failed ({e}); no machine carries the label"),
                    vec![],
                ),
            }
        }
        Err(_) => match find().await {
            Ok(Some(m)) => created(m.id, m.place),
            _ => failed(
                "create timed out; no machine carries the label".into(),
                vec![],
            ),
        },
    }
}

/// Destroys a machine by id, or finds it by label first when its id was never learnt.
async fn destroy_machine(
    prov: &Provisioning,
    side: Side,
    label: &str,
    id: &str,
) -> Result<(), String> {
    destroy_with(prov.provider(side), prov.cfg.call_timeout, label, id).await
}

async fn destroy_with(
    p: &Arc<dyn Provider>,
    limit: Duration,
    label: &str,
    id: &str,
) -> Result<(), String> {
    let ids: Vec<String> = if id.is_empty() {
        match tokio::time::timeout(limit, p.list(label)).await {
            Ok(Ok(ms)) => ms
                .into_iter()
                .filter(|m| m.label == label)
                .map(|m| m.id)
                .collect(),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("listing machines timed out".into()),
        }
    } else {
        vec![id.to_string()]
    };
    for id in ids {
        match tokio::time::timeout(limit, p.destroy(&id)).await {
            Ok(Ok(())) => tracing::info!(%label, %id, "machine destroyed"),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("destroy timed out".into()),
        }
    }
    Ok(())
}
