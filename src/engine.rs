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

use crate::failover::{
    Action, Desired, Input, PairMachine, PairState, Report, Side, Timing, unix_ms_now,
};
use crate::metrics::{Metrics, PairLabel, PairSideLabel, TransitionLabel};
use crate::proto::state::{MachineRecord, PairRecord};
use crate::proto::{
    ActionReply, AgentReport, Command, Event, Fence, MachineView, PairView, ProbeTarget, Promote,
    SetPeer, command,
};
use crate::store::Store;
use crate::types::Epoch;

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
        tracing::info!(pair = %e.pair, kind = %e.kind, from = %e.from_state, to = %e.to_state, epoch = e.epoch, "{}", e.message);
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

fn event(pair: &str, kind: &str, message: String) -> Event {
    Event {
        unix_ms: unix_ms_now(),
        pair: pair.to_string(),
        kind: kind.to_string(),
        message,
        ..Default::default()
    }
}

enum Msg {
    Connect {
        pair: String,
        side: Side,
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
    Failover {
        pair: String,
        reply: oneshot::Sender<Result<ActionReply, Status>>,
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
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Engine, crate::store::StoreError> {
        let snap = store.load()?;
        let now = Instant::now();
        let events = Arc::new(Events::new());
        let mut pairs = HashMap::new();
        for (name, rec) in snap.pairs {
            let m = PairMachine::resume(rec, now);
            metrics.set_state(&name, None, m.state().as_str());
            metrics
                .pair_epoch
                .get_or_create(&PairLabel { pair: name.clone() })
                .set(m.epoch().0 as i64);
            pairs.insert(
                name,
                Entry {
                    m,
                    conns: [None, None],
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
        side: Side,
        conn: u64,
        tx: mpsc::Sender<Result<Command, Status>>,
    ) -> Result<(), Status> {
        self.send(Msg::Connect {
            pair: pair.into(),
            side,
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
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Failover {
            pair: pair.into(),
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
}

struct Entry {
    m: PairMachine,
    conns: [Option<Conn>; 2],
    figures: [Figures; 2],
    /// A durable write failed: no command goes out until the record is on disk.
    blocked: bool,
}

fn idx(side: Side) -> usize {
    match side {
        Side::Gpu => 0,
        Side::Cpu => 1,
    }
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
        }),
    }
}

struct Actor {
    pairs: HashMap<String, Entry>,
    timing: Timing,
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
            Msg::Connect {
                pair,
                side,
                conn,
                tx,
            } => {
                if !self.pairs.contains_key(&pair) {
                    if let Err(e) = self.create(&pair) {
                        let _ = tx.try_send(Err(e));
                        return;
                    }
                    self.events.emit(event(
                        &pair,
                        "created",
                        "pair created by its first agent".into(),
                    ));
                }
                let e = self.pairs.get_mut(&pair).expect("created");
                if e.conns[idx(side)].is_none() {
                    self.metrics.agents_connected.inc();
                }
                e.conns[idx(side)] = Some(Conn {
                    id: conn,
                    tx,
                    sent: Vec::new(),
                    warned_stale: false,
                });
                self.sync_commands(&pair);
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
                            .emit(event(&pair, "created", "pair created".into()));
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
            Msg::Failover { pair, reply } => {
                let Some(e) = self.pairs.get_mut(&pair) else {
                    let _ = reply.send(Err(Status::not_found(format!("no pair {pair}"))));
                    return;
                };
                let before = e.m.epoch();
                let actions = e.m.step(Input::Manual(Instant::now()), &self.timing);
                let refused = actions.iter().find_map(|a| match a {
                    Action::Warn {
                        kind: "refused",
                        message,
                    } => Some(message.clone()),
                    _ => None,
                });
                self.act(&pair, actions);
                let e = &self.pairs[&pair];
                let r = match refused {
                    Some(msg) if e.m.epoch() == before => Err(Status::failed_precondition(msg)),
                    _ => Ok(ActionReply {
                        pair: pair.clone(),
                        state: e.m.state().as_str().into(),
                        epoch: e.m.epoch().0,
                        message: e.m.rec.reason.clone(),
                    }),
                };
                let _ = reply.send(r);
            }
            Msg::HeartbeatSubscribers(d) => self.hb_subscribers += d,
        }
    }

    fn create(&mut self, pair: &str) -> Result<(), Status> {
        crate::identity::check_name(pair).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let rec = PairMachine::new_record(pair);
        self.store
            .put_pairs(std::slice::from_ref(&rec), true)
            .map_err(|e| Status::internal(format!("persisting the new pair: {e}")))?;
        let m = PairMachine::resume(rec, Instant::now());
        self.metrics.set_state(pair, None, m.state().as_str());
        self.metrics
            .pair_epoch
            .get_or_create(&PairLabel { pair: pair.into() })
            .set(m.epoch().0 as i64);
        self.pairs.insert(
            pair.to_string(),
            Entry {
                m,
                conns: [None, None],
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
        if e.conns[idx(side)].as_ref().is_none_or(|c| c.id != conn) {
            return; // from a connection that was replaced
        }
        self.metrics.heartbeats.inc();
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
                        "fenced",
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
        };
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
        self.act(pair, actions);
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
                    self.metrics
                        .set_state(pair, Some(from.as_str()), to.as_str());
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
                        from_state: from.as_str().into(),
                        to_state: to.as_str().into(),
                        epoch,
                        ..event(pair, "transition", reason)
                    });
                }
                Action::Warn { kind, message } => {
                    if kind == "blind" {
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
                Action::FailedOver => {
                    self.metrics
                        .failovers
                        .get_or_create(&PairLabel { pair: pair.into() })
                        .inc();
                    self.events.emit(Event {
                        epoch,
                        to_state: PairState::FailedOver.as_str().into(),
                        ..event(pair, "failover", e.m.rec.reason.clone())
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
            let actions = e.m.step(Input::Tick(now), &self.timing);
            if !actions.is_empty() {
                self.act(name, actions);
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
                        to_state: v.state.clone(),
                        ..event(
                            name,
                            "heartbeat",
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
            state: e.m.state().as_str().into(),
            epoch: e.m.epoch().0,
            primary: primary.as_str().into(),
            last_durable_generation: e.figures[1].generation.max(e.figures[0].generation),
            sync_lag_ms: e.figures[0].rpo_age_ms,
            active_endpoint: active,
            gpu: mv(Side::Gpu, &e.m.rec.gpu),
            cpu: mv(Side::Cpu, &e.m.rec.cpu),
            reason: e.m.rec.reason.clone(),
            pending_bytes: e.figures[0].pending_bytes,
        }
    }
}
