//! Failure detection and failover for one pair: a pure state machine.
//!
//! Events and time go in ([`Input`]), decisions come out ([`Action`]); there is no I/O here. The
//! caller (the coordinator's engine) persists the record whenever an action says so, *before*
//! acting on anything else in the same batch, and sends agents what [`PairMachine::desired`]
//! says they should be told. That second part is level-triggered: it is recomputed from the
//! persisted record and the agents' reports, so a coordinator that restarts in the middle of a
//! failover simply tells each agent again what the record says (promote the CPU at epoch N,
//! fence the GPU), and nothing depends on which step it had reached.
//!
//! Invariant 5 (no false failover) lives in [`PairMachine::tick`]: silence from the GPU agent is
//! only acted on when the CPU agent confirms it has lost the GPU too (its own probe), or the
//! provider says the machine is gone; a fatal fault reported by the GPU agent itself fails over
//! at once. Heartbeat ages never count time the coordinator itself was down.

use std::time::{Duration, Instant};

use crate::host::unix_ms_now;
use crate::proto::state::{Blocked, MachineRecord, OwnedMachine, PairRecord, Phase, Provision};
use crate::proto::{AgentMode, EventKind, Role};
use crate::types::{Epoch, Side};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PairState {
    /// Created; waiting for both agents.
    Pending,
    /// Healthy: the GPU is primary and replicates to the CPU.
    Syncing,
    /// The GPU agent missed heartbeats.
    Suspect,
    /// The CPU is primary; the failed GPU is fenced.
    FailedOver,
    Provisioning,
    Restoring,
    CuttingOver,
    Hibernated,
    /// The CPU standby is lost; the GPU is unprotected.
    Degraded,
}

impl PairState {
    pub const ALL: [PairState; 9] = [
        PairState::Pending,
        PairState::Syncing,
        PairState::Suspect,
        PairState::FailedOver,
        PairState::Provisioning,
        PairState::Restoring,
        PairState::CuttingOver,
        PairState::Hibernated,
        PairState::Degraded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PairState::Pending => "Pending",
            PairState::Syncing => "Syncing",
            PairState::Suspect => "Suspect",
            PairState::FailedOver => "FailedOver",
            PairState::Provisioning => "Provisioning",
            PairState::Restoring => "Restoring",
            PairState::CuttingOver => "CuttingOver",
            PairState::Hibernated => "Hibernated",
            PairState::Degraded => "Degraded",
        }
    }

    pub fn parse(s: &str) -> Option<PairState> {
        PairState::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl std::fmt::Display for PairState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Detection timing (DESIGN.md "Defaults").
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub heartbeat: Duration,
    pub suspect_after_missed: u32,
    pub failover_after: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            heartbeat: Duration::from_secs(1),
            suspect_after_missed: 2,
            failover_after: Duration::from_secs(3),
        }
    }
}

/// The CPU agent's view of the GPU, as of one of its reports.
#[derive(Clone, Copy, Debug)]
pub struct Contact {
    /// Age of the last successful probe of the GPU agent when reported; None: never succeeded.
    pub probe_ok_age: Option<Duration>,
    pub reported_at: Instant,
}

impl Contact {
    /// How long the CPU has been unable to reach the GPU, as of `now`.
    pub fn lost_for(&self, now: Instant) -> Option<Duration> {
        self.probe_ok_age
            .map(|age| age + now.saturating_duration_since(self.reported_at))
    }
}

/// What an agent said about its replication in its last report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentStatus {
    pub mode: AgentMode,
    /// Manifest root (hex) it last agreed with its peer.
    pub root: String,
    pub generation: u64,
    pub frozen_epoch: u64,
    pub pending_bytes: u64,
    pub rpo_age_ms: u64,
    /// While sending: its session with the peer is open.
    pub connected: bool,
    pub bytes_total: u64,
    pub workspace_bytes: u64,
    /// GPU utilisation in percent (None: no NVML).
    pub utilization: Option<u32>,
}

/// What the coordinator has seen of one agent (not persisted: rebuilt from heartbeats).
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub last_seen: Option<Instant>,
    pub connected: bool,
    pub epoch: Epoch,
    pub fatal: Option<String>,
    pub contact: Option<Contact>,
    pub status: AgentStatus,
}

/// How a pair heals (DESIGN.md "Failure and recovery").
#[derive(Clone, Debug)]
pub struct Policy {
    /// A provider can create and destroy machines (without one, replacements join by hand).
    pub provider: bool,
    /// Start provisioning a replacement GPU as soon as the pair failed over.
    pub auto_recover: bool,
    /// How long a created machine has for its agent to join.
    pub boot_timeout: Duration,
    /// How long a failed offer, host or zone is not tried again.
    pub blocklist_for: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Hibernate after the GPU has been idle (0 % utilisation) this long.
    pub idle_hibernate_after: Option<Duration>,
    /// Every machine label starts with it (`sb-<CA fingerprint>`): the sweeper's scope.
    pub label_prefix: String,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            provider: false,
            auto_recover: false,
            boot_timeout: Duration::from_secs(600),
            blocklist_for: Duration::from_secs(3600),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
            idle_hibernate_after: None,
            label_prefix: "sb".into(),
        }
    }
}

/// A report from an agent, reduced to what detection needs.
#[derive(Clone, Debug)]
pub struct Report {
    pub at: Instant,
    pub epoch: Epoch,
    /// GPU agent: a fatal GPU fault it saw (NVML Xid, uncorrectable ECC, lost device).
    pub fatal: Option<String>,
    /// CPU agent: its contact with the GPU.
    pub probe_ok_age: Option<Option<Duration>>,
    pub machine: Option<MachineRecord>,
    pub status: AgentStatus,
}

#[derive(Clone, Debug)]
pub enum Input {
    Report(Side, Report),
    Disconnected(Side, Instant),
    Tick(Instant),
    /// An operator asked for a failover.
    Manual(Instant),
    /// The provider says this side's machine is gone (terminated, preempted, destroyed).
    ProviderGone(Side, Instant),
    /// An operator asked to recover the pair now (or to retry provisioning at once).
    Recover,
    Hibernate,
    Wake,
    /// The provider created the machine labelled `label`.
    Created {
        label: String,
        id: String,
        offer: String,
        place: String,
    },
    /// Creating `label` failed and no machine carries that label; `block` lists offers, hosts or
    /// zones not to try again for a while.
    CreateFailed {
        label: String,
        error: String,
        block: Vec<String>,
    },
    /// The provider confirmed `label` is destroyed.
    Destroyed {
        label: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write the record durably before anything else in this batch is acted on.
    Persist,
    /// The record changed in a way that can be written with the next batch (a machine's
    /// address): losing it in a crash costs nothing, the agent reports it again.
    PersistSoon,
    Transition {
        from: PairState,
        to: PairState,
        reason: String,
    },
    /// A warning worth an event and a metric, but no transition.
    Warn { kind: EventKind, message: String },
    /// A failure was detected this long after the GPU was last heard from.
    Detected(Duration),
    /// A failover happened (counted in metrics).
    FailedOver,
    /// The pair is healthy again this long after it failed over (or was woken).
    Recovered(Duration),
    /// A provisioning attempt failed (counted in metrics).
    AttemptFailed,
}

/// A command an agent should have received for the current record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Desired {
    SetPeer { url: String, epoch: Epoch },
    Promote { epoch: Epoch },
    Fence { epoch: Epoch, reason: String },
    Probe { url: String },
    Receive { epoch: Epoch },
    Freeze { epoch: Epoch },
}

pub struct PairMachine {
    pub rec: PairRecord,
    pub gpu: Seen,
    pub cpu: Seen,
    /// When this coordinator started: silence is never counted from before it.
    started: Instant,
    /// Whether the "coordinator lost sight" warning was already given for this silence.
    warned_blind: bool,
    pub policy: Policy,
    /// Wall-clock now, unix ms (set by the caller before each step: provisioning deadlines are
    /// persisted, so they are wall-clock times).
    pub wall_ms: u64,
    /// Since when the GPU has reported 0 % utilisation.
    idle_since: Option<Instant>,
}

impl PairMachine {
    pub fn new_record(name: &str) -> PairRecord {
        PairRecord {
            name: name.to_string(),
            state: crate::proto::PairState::from(PairState::Pending).into(),
            epoch: 1,
            primary: Role::from(Side::Gpu).into(),
            changed_unix_ms: unix_ms_now(),
            ..Default::default()
        }
    }

    /// Resumes a persisted record (a fresh pair, or after a coordinator restart).
    pub fn resume(rec: PairRecord, now: Instant) -> PairMachine {
        PairMachine {
            rec,
            gpu: Seen::default(),
            cpu: Seen::default(),
            started: now,
            warned_blind: false,
            policy: Policy::default(),
            wall_ms: 0,
            idle_since: None,
        }
    }

    pub fn state(&self) -> PairState {
        PairState::try_from(self.rec.state()).unwrap_or(PairState::Pending)
    }

    pub fn epoch(&self) -> Epoch {
        Epoch(self.rec.epoch)
    }

    pub fn primary(&self) -> Side {
        Side::from_record(self.rec.primary())
    }

    fn seen(&mut self, side: Side) -> &mut Seen {
        match side {
            Side::Gpu => &mut self.gpu,
            Side::Cpu => &mut self.cpu,
        }
    }

    fn go(&mut self, to: PairState, reason: String, out: &mut Vec<Action>) {
        let from = self.state();
        if from == to {
            return;
        }
        self.rec.set_state(to.into());
        self.rec.reason = reason.clone();
        self.rec.changed_unix_ms = unix_ms_now();
        out.push(Action::Persist);
        out.push(Action::Transition { from, to, reason });
    }

    /// Silence of the GPU agent as the coordinator sees it (never counting its own downtime).
    pub fn gpu_silence(&self, now: Instant) -> Duration {
        let since = self
            .gpu
            .last_seen
            .map_or(self.started, |t| t.max(self.started));
        now.saturating_duration_since(since)
    }

    fn cpu_fresh(&self, now: Instant, t: &Timing) -> bool {
        self.cpu
            .last_seen
            .is_some_and(|s| now.saturating_duration_since(s) <= t.heartbeat * 2 + t.heartbeat / 2)
    }

    pub fn step(&mut self, input: Input, t: &Timing) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Report(side, r) => {
                let at = r.at;
                let seen = self.seen(side);
                seen.last_seen = Some(at);
                seen.connected = true;
                seen.epoch = r.epoch;
                if side == Side::Gpu {
                    seen.fatal = r.fatal.clone();
                }
                seen.status = r.status.clone();
                let joined_label = r.machine.as_ref().map(|m| m.machine.clone());
                if let Some(p) = r.probe_ok_age {
                    seen.contact = Some(Contact {
                        probe_ok_age: p,
                        reported_at: at,
                    });
                }
                if let Some(m) = r.machine {
                    let slot = match side {
                        Side::Gpu => &mut self.rec.gpu,
                        Side::Cpu => &mut self.rec.cpu,
                    };
                    if slot.as_ref() != Some(&m) {
                        *slot = Some(m);
                        out.push(Action::PersistSoon);
                    }
                }
                match (side, self.state()) {
                    (Side::Gpu, _) if r.fatal.is_some() && self.primary() == Side::Gpu => {
                        let why = r.fatal.unwrap_or_default();
                        self.fail_over(
                            format!("GPU agent reported a fatal fault: {why}"),
                            at,
                            Duration::ZERO,
                            &mut out,
                        );
                    }
                    (Side::Gpu, PairState::Suspect) => {
                        self.warned_blind = false;
                        self.go(
                            PairState::Syncing,
                            "GPU agent heard from again".into(),
                            &mut out,
                        );
                    }
                    (_, PairState::Pending) if self.rec.gpu.is_some() && self.rec.cpu.is_some() => {
                        self.go(PairState::Syncing, "both agents joined".into(), &mut out);
                    }
                    _ => {}
                }
                if let Some(label) = joined_label {
                    self.joined(side, &label, &mut out);
                }
                if side == Side::Gpu {
                    let idle = r.status.utilization == Some(0);
                    match (idle, self.idle_since) {
                        (true, None) => self.idle_since = Some(at),
                        (false, _) => self.idle_since = None,
                        _ => {}
                    }
                }
                self.progress(&mut out);
            }
            Input::Disconnected(side, _) => {
                self.seen(side).connected = false;
            }
            Input::Tick(now) => self.tick(now, t, &mut out),
            Input::Manual(now) => {
                if self.primary() == Side::Gpu {
                    let silence = self.gpu_silence(now);
                    self.fail_over(
                        "failover requested by an operator".into(),
                        now,
                        silence,
                        &mut out,
                    );
                    // A deliberate failover is not a detection.
                    out.retain(|a| !matches!(a, Action::Detected(_)));
                } else {
                    out.push(Action::Warn {
                        kind: EventKind::Refused,
                        message: "failover refused: the CPU is already the primary".into(),
                    });
                }
            }
            Input::ProviderGone(side, now) => self.provider_gone(side, now, t, &mut out),
            Input::Recover => self.recover(&mut out),
            Input::Hibernate => self.hibernate(&mut out),
            Input::Wake => {
                if self.state() == PairState::Hibernated {
                    self.start_provision(Side::Gpu, "woken by an operator".into(), &mut out);
                } else {
                    refuse(
                        &mut out,
                        format!("wake refused: the pair is {}, not Hibernated", self.state()),
                    );
                }
            }
            Input::Created {
                label,
                id,
                offer,
                place,
            } => {
                let wall = self.wall_ms;
                let boot = self.policy.boot_timeout.as_millis() as u64;
                if let Some(p) = self.rec.provision.as_mut()
                    && let Some(m) = p.machine.as_mut()
                    && m.label == label
                {
                    m.id = id.clone();
                    m.offer = offer;
                    m.place = place.clone();
                    if p.phase() == Phase::Create {
                        p.set_phase(Phase::Boot);
                        p.deadline_unix_ms = wall + boot;
                    }
                    out.push(Action::Persist);
                    out.push(Action::Warn {
                        kind: EventKind::Provisioning,
                        message: format!(
                            "created {label} (id {id}{}); waiting for its agent to join",
                            if place.is_empty() {
                                String::new()
                            } else {
                                format!(", {place}")
                            }
                        ),
                    });
                } else if let Some(m) = [&mut self.rec.gpu_owned, &mut self.rec.cpu_owned]
                    .into_iter()
                    .flatten()
                    .chain(self.rec.teardown.iter_mut())
                    .find(|m| m.label == label && m.id.is_empty())
                {
                    // Its agent joined before the create call returned (a fast boot): the
                    // machine is the pair's already and still needs its id to be watched.
                    m.id = id;
                    m.offer = offer;
                    m.place = place;
                    out.push(Action::Persist);
                }
            }
            Input::CreateFailed {
                label,
                error,
                block,
            } => {
                if self.provisioning_label().is_some_and(|l| l == label) {
                    for k in block {
                        self.block(k, &error);
                    }
                    self.retry(format!("creating {label} failed: {error}"), &mut out);
                }
            }
            Input::Destroyed { label } => {
                let before = self.rec.teardown.len();
                self.rec.teardown.retain(|m| m.label != label);
                if self.rec.teardown.len() != before {
                    out.push(Action::Persist);
                    out.push(Action::Warn {
                        kind: EventKind::Destroyed,
                        message: format!("machine {label} destroyed"),
                    });
                }
            }
        }
        out
    }

    /// The label of the machine being provisioned, if any.
    pub fn provisioning_label(&self) -> Option<&str> {
        self.rec
            .provision
            .as_ref()
            .and_then(|p| p.machine.as_ref())
            .map(|m| m.label.as_str())
    }

    /// Whether reports from `machine` speak for `side` of this pair: once a side's machine was
    /// created by a provider (or is being provisioned), only that machine does. Anything else
    /// claiming the side (an old GPU coming back) is fenced, not listened to.
    pub fn accepts(&self, side: Side, machine: &str) -> bool {
        if let Some(p) = &self.rec.provision
            && p.role() == Role::from(side)
        {
            return self.provisioning_label() == Some(machine);
        }
        let owned = match side {
            Side::Gpu => &self.rec.gpu_owned,
            Side::Cpu => &self.rec.cpu_owned,
        };
        owned.as_ref().is_none_or(|o| o.label == machine)
    }

    fn block(&mut self, key: String, why: &str) {
        if key.is_empty() {
            return;
        }
        let until = self.wall_ms + self.policy.blocklist_for.as_millis() as u64;
        self.rec.blocked.retain(|b| b.key != key);
        self.rec.blocked.push(Blocked {
            key,
            until_unix_ms: until,
            reason: why.to_string(),
        });
    }

    /// Offers, hosts and zones not to try now.
    pub fn blocked(&self) -> Vec<String> {
        self.rec
            .blocked
            .iter()
            .filter(|b| b.until_unix_ms > self.wall_ms)
            .map(|b| b.key.clone())
            .collect()
    }

    fn new_label(&mut self, role: Side) -> String {
        self.rec.provisions += 1;
        format!(
            "{}-{}-{}-{}",
            self.policy.label_prefix,
            self.rec.name,
            role.as_str(),
            self.rec.provisions
        )
    }

    fn start_provision(&mut self, role: Side, reason: String, out: &mut Vec<Action>) {
        if !self.policy.provider {
            refuse(
                out,
                format!(
                    "cannot provision a {} machine: no provider is configured (start an agent with a join token by hand)",
                    role.as_str()
                ),
            );
            return;
        }
        // The machine it replaces goes (with its disk): an intent kept until confirmed.
        let old = match role {
            Side::Gpu => self.rec.gpu_owned.take(),
            Side::Cpu => self.rec.cpu_owned.take(),
        };
        self.rec.teardown.extend(old);
        let label = self.new_label(role);
        self.rec.provision = Some(Provision {
            role: Role::from(role).into(),
            attempt: 1,
            phase: Phase::Create.into(),
            machine: Some(OwnedMachine {
                label,
                role: Role::from(role).into(),
                ..Default::default()
            }),
            next_try_unix_ms: self.wall_ms,
            ..Default::default()
        });
        let to = match role {
            Side::Gpu => PairState::Provisioning,
            Side::Cpu => PairState::Degraded,
        };
        out.push(Action::Persist);
        self.go(to, reason, out);
    }

    /// A failed attempt: its machine (if any) is destroyed and the next one tried after a
    /// backoff with jitter.
    fn retry(&mut self, why: String, out: &mut Vec<Action>) {
        let Some(mut p) = self.rec.provision.take() else {
            return;
        };
        let role = Side::from_record(p.role());
        if let Some(m) = p.machine.take()
            && (!m.id.is_empty() || p.phase() == Phase::Boot)
        {
            self.rec.teardown.push(m);
        }
        let exp = p.attempt.saturating_sub(1).min(16);
        let base = self.policy.backoff_base.saturating_mul(1 << exp);
        let backoff = base.min(self.policy.backoff_max);
        let label = self.new_label(role);
        // Jitter (0-30 %) derived from the label, so the machine stays deterministic.
        let jitter = blake3::hash(label.as_bytes()).as_bytes()[0] as f64 / 255.0 * 0.3;
        let wait = backoff.mul_f64(1.0 + jitter);
        p.attempt += 1;
        p.set_phase(Phase::Create);
        p.last_error = why.clone();
        p.deadline_unix_ms = 0;
        p.next_try_unix_ms = self.wall_ms + wait.as_millis() as u64;
        p.machine = Some(OwnedMachine {
            label,
            role: Role::from(role).into(),
            ..Default::default()
        });
        self.rec.provision = Some(p);
        out.push(Action::Persist);
        out.push(Action::AttemptFailed);
        out.push(Action::Warn {
            kind: EventKind::Provisioning,
            message: format!("{why}; next attempt in {} ms", wait.as_millis()),
        });
    }

    /// An agent reported as `label`: the machine being provisioned has joined.
    fn joined(&mut self, side: Side, label: &str, out: &mut Vec<Action>) {
        let Some(p) = &self.rec.provision else { return };
        if p.role() != Role::from(side) || self.provisioning_label() != Some(label) {
            return;
        }
        let p = self.rec.provision.take().expect("checked");
        let owned = p.machine;
        match side {
            Side::Gpu => {
                self.rec.gpu_owned = owned;
                self.rec.restore_started_unix_ms = self.wall_ms;
                self.go(
                    PairState::Restoring,
                    format!("{label} joined; restoring the workspace onto it"),
                    out,
                );
            }
            Side::Cpu => {
                self.rec.cpu_owned = owned;
                out.push(Action::Persist);
                out.push(Action::Warn {
                    kind: EventKind::Provisioning,
                    message: format!("{label} joined; seeding it from the GPU"),
                });
            }
        }
    }

    /// Moves restore, cutover, hibernation and reseeding along as the agents report.
    fn progress(&mut self, out: &mut Vec<Action>) {
        let (g, c) = (&self.gpu.status, &self.cpu.status);
        let same = !c.root.is_empty() && c.root == g.root;
        let epoch = self.rec.epoch;
        match self.state() {
            PairState::Restoring
                if same
                    && c.mode == AgentMode::Send
                    && c.connected
                    && c.pending_bytes == 0
                    && c.rpo_age_ms == 0
                    && g.mode == AgentMode::Receive =>
            {
                self.go(
                    PairState::CuttingOver,
                    "restore verified (manifest roots agree); freezing the CPU for the final catch-up".into(),
                    out,
                );
            }
            PairState::CuttingOver
                if same
                    && c.frozen_epoch >= epoch
                    && c.pending_bytes == 0
                    && g.mode == AgentMode::Receive =>
            {
                self.rec.epoch += 1;
                self.rec.set_primary(Role::Gpu);
                self.rec.restore_started_unix_ms = 0;
                let took = self.recovered(out);
                self.go(
                    PairState::Syncing,
                    format!(
                        "cutover complete: the GPU is primary again at epoch {} ({} ms after the failure)",
                        self.rec.epoch,
                        took.as_millis()
                    ),
                    out,
                );
            }
            PairState::Syncing
                if self.rec.hibernate
                    && same
                    && g.frozen_epoch >= epoch
                    && g.pending_bytes == 0
                    && c.mode == AgentMode::Receive =>
            {
                self.rec.epoch += 1;
                self.rec.set_primary(Role::Cpu);
                self.rec.hibernate = false;
                self.rec.failed_over_unix_ms = self.wall_ms;
                if let Some(o) = self.rec.gpu_owned.take() {
                    self.rec.teardown.push(o);
                }
                self.go(
                    PairState::Hibernated,
                    format!(
                        "hibernated: final sync verified; the GPU machine is released and the CPU holds the workspace at epoch {}",
                        self.rec.epoch
                    ),
                    out,
                );
            }
            PairState::Degraded
                if self.rec.provision.is_none()
                    && same
                    && g.mode == AgentMode::Send
                    && g.connected
                    && g.pending_bytes == 0
                    && c.mode == AgentMode::Receive =>
            {
                let took = self.recovered(out);
                self.go(
                    PairState::Syncing,
                    format!(
                        "the new CPU standby holds the workspace ({} ms after the old one was lost)",
                        took.as_millis()
                    ),
                    out,
                );
            }
            _ => {}
        }
    }

    fn recovered(&mut self, out: &mut Vec<Action>) -> Duration {
        let since = std::mem::take(&mut self.rec.failed_over_unix_ms);
        let took = Duration::from_millis(self.wall_ms.saturating_sub(since));
        if since > 0 {
            out.push(Action::Recovered(took));
        }
        took
    }

    fn provider_gone(&mut self, side: Side, now: Instant, t: &Timing, out: &mut Vec<Action>) {
        match side {
            Side::Gpu => {
                if self.primary() == Side::Gpu && self.rec.cpu.is_some() && !self.rec.hibernate {
                    let silence = self.gpu_silence(now);
                    self.fail_over(
                        "the provider reports the GPU machine gone".into(),
                        now,
                        silence,
                        out,
                    );
                } else if let Some(p) = &self.rec.provision
                    && p.role() == Role::Gpu
                    && p.phase() == Phase::Boot
                {
                    self.retry(
                        "the new GPU machine is gone before its agent joined".into(),
                        out,
                    );
                } else if matches!(self.state(), PairState::Restoring | PairState::CuttingOver) {
                    // The replacement died while being restored: start over with another.
                    self.start_provision(
                        Side::Gpu,
                        "the provider reports the replacement GPU gone during the restore".into(),
                        out,
                    );
                }
            }
            Side::Cpu => {
                let silent = self.cpu_silence(now) >= t.failover_after;
                if let Some(p) = &self.rec.provision
                    && p.role() == Role::Cpu
                {
                    if p.phase() == Phase::Boot {
                        self.retry(
                            "the new CPU machine is gone before its agent joined".into(),
                            out,
                        );
                    }
                } else if self.primary() == Side::Gpu
                    && matches!(
                        self.state(),
                        PairState::Syncing | PairState::Suspect | PairState::Degraded
                    )
                    && silent
                {
                    self.rec.failed_over_unix_ms = self.wall_ms;
                    self.start_provision(
                        Side::Cpu,
                        "the CPU standby is gone (the provider says so and its agent is silent): the GPU is unprotected".into(),
                        out,
                    );
                } else if self.primary() == Side::Cpu {
                    out.push(Action::Warn {
                        kind: EventKind::Critical,
                        message:
                            "the provider reports the CPU machine gone while it is the primary"
                                .into(),
                    });
                }
            }
        }
    }

    fn recover(&mut self, out: &mut Vec<Action>) {
        match self.state() {
            PairState::FailedOver | PairState::Hibernated => {
                self.start_provision(Side::Gpu, "recovery requested by an operator".into(), out)
            }
            PairState::Provisioning | PairState::Degraded if self.rec.provision.is_some() => {
                let p = self.rec.provision.as_mut().expect("checked");
                p.next_try_unix_ms = self.wall_ms;
                out.push(Action::Persist);
                out.push(Action::Warn {
                    kind: EventKind::Provisioning,
                    message: "retrying provisioning now (operator)".into(),
                });
            }
            PairState::Degraded => self.start_provision(
                Side::Cpu,
                "replacing the CPU standby (operator)".into(),
                out,
            ),
            s => refuse(
                out,
                format!("recover refused: the pair is {s}; nothing to recover"),
            ),
        }
    }

    fn hibernate(&mut self, out: &mut Vec<Action>) {
        if self.state() != PairState::Syncing || self.primary() != Side::Gpu {
            refuse(
                out,
                format!(
                    "hibernate refused: the pair is {}, not Syncing",
                    self.state()
                ),
            );
            return;
        }
        if !self.rec.hibernate {
            self.rec.hibernate = true;
            out.push(Action::Persist);
            out.push(Action::Warn {
                kind: EventKind::Hibernate,
                message: "hibernating: the GPU makes a final sync, then its machine is released"
                    .into(),
            });
        }
    }

    fn tick(&mut self, now: Instant, t: &Timing, out: &mut Vec<Action>) {
        self.tick_recovery(now, out);
        let state = self.state();
        // A Degraded pair still watches its GPU: a standby that comes back (it kept every
        // acknowledged generation) takes over if the GPU died meanwhile. Not while a new
        // standby is being provisioned or seeded: it does not hold the workspace yet.
        let watching = matches!(state, PairState::Syncing | PairState::Suspect)
            || (state == PairState::Degraded && self.rec.provision.is_none());
        if !watching || self.primary() != Side::Gpu {
            return;
        }
        let silence = self.gpu_silence(now);
        if silence < t.heartbeat * t.suspect_after_missed {
            self.check_standby(now, t, out);
            return;
        }
        if state == PairState::Syncing {
            self.go(
                PairState::Suspect,
                format!(
                    "no heartbeat from the GPU agent for {} ms",
                    silence.as_millis()
                ),
                out,
            );
        }
        if silence < t.failover_after {
            return;
        }
        let cpu_fresh = self.cpu_fresh(now, t);
        let cpu_lost_gpu = cpu_fresh
            && self
                .cpu
                .contact
                .as_ref()
                .is_some_and(|c| c.lost_for(now).is_none_or(|d| d >= t.failover_after));
        if cpu_lost_gpu {
            self.fail_over(
                format!(
                    "GPU agent silent for {} ms and the CPU agent cannot reach it either",
                    silence.as_millis()
                ),
                now,
                silence,
                out,
            );
        } else if !self.warned_blind {
            self.warned_blind = true;
            let message = if cpu_fresh {
                "the coordinator lost sight of the GPU agent, but the CPU agent still reaches it: not failing over".to_string()
            } else {
                "the GPU agent is silent but the CPU agent cannot confirm (it is silent too): not failing over".to_string()
            };
            out.push(Action::Warn {
                kind: EventKind::Blind,
                message,
            });
        }
    }

    /// How long the CPU agent has not been heard from (coordinator downtime does not count).
    fn cpu_silence(&self, now: Instant) -> Duration {
        let since = self
            .cpu
            .last_seen
            .map_or(self.started, |s| s.max(self.started));
        now.saturating_duration_since(since)
    }

    /// The GPU is healthy: is its standby? A CPU agent that is silent while the GPU cannot
    /// reach it either leaves the GPU unprotected: the pair is Degraded. A standby the provider
    /// reports gone is replaced by itself (`provider_gone`); one joined by hand (or one the
    /// provider still calls running) waits for it to come back or for `recover P`.
    fn check_standby(&mut self, now: Instant, t: &Timing, out: &mut Vec<Action>) {
        if self.state() != PairState::Syncing
            || self.rec.cpu.is_none()
            || self.rec.provision.is_some()
            || self.rec.hibernate
        {
            return;
        }
        let silent = self.cpu_silence(now) >= t.failover_after;
        if silent && !self.cpu.connected && !self.gpu.status.connected {
            self.go(
                PairState::Degraded,
                "the CPU standby's agent is silent and the GPU cannot reach it: the GPU is unprotected (`recover` provisions a new standby)".into(),
                out,
            );
        }
    }

    fn tick_recovery(&mut self, now: Instant, out: &mut Vec<Action>) {
        let state = self.state();
        if state == PairState::FailedOver && self.policy.auto_recover && self.policy.provider {
            self.start_provision(Side::Gpu, "replacing the failed GPU machine".into(), out);
            return;
        }
        if let Some(p) = &self.rec.provision
            && p.phase() == Phase::Boot
            && p.deadline_unix_ms > 0
            && self.wall_ms > p.deadline_unix_ms
        {
            let m = p.machine.clone().unwrap_or_default();
            let secs = self.policy.boot_timeout.as_secs();
            self.block(m.offer.clone(), "its machine never joined");
            self.block(m.place.clone(), "a machine there never joined");
            self.retry(format!("{} did not join within {secs} s", m.label), out);
            return;
        }
        if state == PairState::Syncing
            && !self.rec.hibernate
            && let (Some(after), Some(since)) = (self.policy.idle_hibernate_after, self.idle_since)
            && now.saturating_duration_since(since) >= after
            && self.policy.provider
        {
            self.idle_since = None;
            out.push(Action::Warn {
                kind: EventKind::Hibernate,
                message: format!("the GPU has been idle for {} s", after.as_secs()),
            });
            self.hibernate(out);
        }
        self.progress(out);
    }

    fn fail_over(
        &mut self,
        reason: String,
        _now: Instant,
        silence: Duration,
        out: &mut Vec<Action>,
    ) {
        if self.rec.cpu.is_none() {
            out.push(Action::Warn {
                kind: EventKind::Refused,
                message: format!("cannot fail over ({reason}): no CPU standby has joined"),
            });
            return;
        }
        // Epoch first: persisted with the transition, before any agent is told.
        self.rec.epoch += 1;
        self.rec.set_primary(Role::Cpu);
        self.rec.failed_over_unix_ms = self.wall_ms;
        self.rec.hibernate = false;
        self.warned_blind = false;
        self.go(PairState::FailedOver, reason, out);
        out.push(Action::Detected(silence));
        out.push(Action::FailedOver);
    }

    /// What each agent should have been told, given the record. The engine sends whatever the
    /// agent's current connection has not received yet.
    pub fn desired(&self, side: Side) -> Vec<Desired> {
        let epoch = self.epoch();
        let url = |m: &Option<MachineRecord>| {
            m.as_ref()
                .map(|m| m.address.clone())
                .filter(|a| !a.is_empty())
        };
        let state = self.state();
        if matches!(state, PairState::Restoring | PairState::CuttingOver) {
            // The CPU (primary) sends its workspace to the new GPU, which receives.
            return match side {
                Side::Gpu => vec![Desired::Receive { epoch }],
                Side::Cpu => {
                    let mut v: Vec<Desired> = url(&self.rec.gpu)
                        .map(|url| Desired::SetPeer { url, epoch })
                        .into_iter()
                        .collect();
                    if state == PairState::CuttingOver {
                        v.push(Desired::Freeze { epoch });
                    }
                    v
                }
            };
        }
        match (side, self.primary()) {
            (Side::Gpu, Side::Gpu) => match url(&self.rec.cpu) {
                Some(url) => {
                    let mut v = vec![Desired::SetPeer { url, epoch }];
                    if self.rec.hibernate {
                        v.push(Desired::Freeze { epoch });
                    }
                    v
                }
                None => vec![],
            },
            (Side::Gpu, Side::Cpu) => vec![Desired::Fence {
                epoch,
                reason: format!("the CPU standby is the primary since epoch {epoch}"),
            }],
            (Side::Cpu, Side::Gpu) => {
                let mut v = vec![Desired::Receive { epoch }];
                v.extend(url(&self.rec.gpu).map(|url| Desired::Probe { url }));
                v
            }
            (Side::Cpu, Side::Cpu) => vec![Desired::Promote { epoch }],
        }
    }
}

fn refuse(out: &mut Vec<Action>, message: String) {
    out.push(Action::Warn {
        kind: EventKind::Refused,
        message,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn machine(addr: &str) -> Option<MachineRecord> {
        Some(MachineRecord {
            machine: "m".into(),
            address: addr.into(),
            workspace: "/workspace".into(),
        })
    }

    fn report(at: Instant, epoch: u64) -> Report {
        Report {
            at,
            epoch: Epoch(epoch),
            fatal: None,
            probe_ok_age: None,
            machine: None,
            status: AgentStatus::default(),
        }
    }

    fn cpu_report(at: Instant, probe_ok_age: Option<Duration>) -> Report {
        Report {
            probe_ok_age: Some(probe_ok_age),
            ..report(at, 1)
        }
    }

    /// A pair in Syncing at t0, both agents heard from.
    fn syncing() -> (PairMachine, Instant, Timing) {
        let t0 = Instant::now();
        let t = Timing::default();
        let mut m = PairMachine::resume(PairMachine::new_record("p"), t0);
        let a = m.step(
            Input::Report(
                Side::Gpu,
                Report {
                    machine: machine("10.0.0.1:7702"),
                    ..report(t0, 1)
                },
            ),
            &t,
        );
        assert_eq!(a, vec![Action::PersistSoon]);
        let a = m.step(
            Input::Report(
                Side::Cpu,
                Report {
                    machine: machine("10.0.0.2:7701"),
                    ..cpu_report(t0, Some(ms(100)))
                },
            ),
            &t,
        );
        assert!(a.contains(&Action::Transition {
            from: PairState::Pending,
            to: PairState::Syncing,
            reason: "both agents joined".into()
        }));
        (m, t0, t)
    }

    fn transitions(a: &[Action]) -> Vec<PairState> {
        a.iter()
            .filter_map(|x| match x {
                Action::Transition { to, .. } => Some(*to),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn pending_until_both_agents_join_then_commands() {
        let t0 = Instant::now();
        let t = Timing::default();
        let mut m = PairMachine::resume(PairMachine::new_record("p"), t0);
        m.step(
            Input::Report(
                Side::Gpu,
                Report {
                    machine: machine("g:7702"),
                    ..report(t0, 1)
                },
            ),
            &t,
        );
        assert_eq!(m.state(), PairState::Pending);
        assert!(
            m.desired(Side::Gpu).is_empty(),
            "no CPU to replicate to yet"
        );
        // No failover while pending, however long the silence.
        assert!(transitions(&m.step(Input::Tick(t0 + ms(60_000)), &t)).is_empty());
        m.step(
            Input::Report(
                Side::Cpu,
                Report {
                    machine: machine("c:7701"),
                    ..cpu_report(t0, None)
                },
            ),
            &t,
        );
        assert_eq!(m.state(), PairState::Syncing);
        assert_eq!(
            m.desired(Side::Gpu),
            vec![Desired::SetPeer {
                url: "c:7701".into(),
                epoch: Epoch(1)
            }]
        );
        assert_eq!(
            m.desired(Side::Cpu),
            vec![
                Desired::Receive { epoch: Epoch(1) },
                Desired::Probe {
                    url: "g:7702".into()
                }
            ]
        );
    }

    #[test]
    fn suspect_after_two_missed_then_back() {
        let (mut m, t0, t) = syncing();
        assert!(transitions(&m.step(Input::Tick(t0 + ms(1900)), &t)).is_empty());
        assert_eq!(
            transitions(&m.step(Input::Tick(t0 + ms(2000)), &t)),
            vec![PairState::Suspect]
        );
        let a = m.step(Input::Report(Side::Gpu, report(t0 + ms(2100), 1)), &t);
        assert_eq!(transitions(&a), vec![PairState::Syncing]);
    }

    #[test]
    fn fails_over_when_the_cpu_confirms() {
        let (mut m, t0, t) = syncing();
        // The CPU keeps reporting; its probe last succeeded at t0.
        for k in 1..=3 {
            m.step(
                Input::Report(Side::Cpu, cpu_report(t0 + ms(1000 * k), Some(ms(1000 * k)))),
                &t,
            );
        }
        let a = m.step(Input::Tick(t0 + ms(3000)), &t);
        assert_eq!(
            transitions(&a),
            vec![PairState::Suspect, PairState::FailedOver]
        );
        // Persist comes before anything else is acted on, with the epoch already raised.
        assert_eq!(a[0], Action::Persist);
        assert!(a.contains(&Action::Detected(ms(3000))));
        assert_eq!(m.epoch(), Epoch(2));
        assert_eq!(m.primary(), Side::Cpu);
        assert_eq!(
            m.desired(Side::Cpu),
            vec![Desired::Promote { epoch: Epoch(2) }]
        );
        assert!(matches!(
            m.desired(Side::Gpu)[..],
            [Desired::Fence {
                epoch: Epoch(2),
                ..
            }]
        ));
        // A returning GPU changes nothing: it is told to stay fenced.
        let a = m.step(Input::Report(Side::Gpu, report(t0 + ms(9000), 1)), &t);
        assert!(transitions(&a).is_empty());
        assert_eq!(m.state(), PairState::FailedOver);
    }

    #[test]
    fn no_failover_when_only_the_coordinator_lost_the_gpu() {
        let (mut m, t0, t) = syncing();
        let mut warned = 0;
        for k in 1..=30u64 {
            // The CPU still reaches the GPU: its probe succeeded 200 ms before each report.
            m.step(
                Input::Report(Side::Cpu, cpu_report(t0 + ms(1000 * k), Some(ms(200)))),
                &t,
            );
            let a = m.step(Input::Tick(t0 + ms(1000 * k + 50)), &t);
            assert!(
                !transitions(&a).contains(&PairState::FailedOver),
                "false failover at {k}s"
            );
            warned += a
                .iter()
                .filter(|x| {
                    matches!(
                        x,
                        Action::Warn {
                            kind: EventKind::Blind,
                            ..
                        }
                    )
                })
                .count();
        }
        assert_eq!(m.state(), PairState::Suspect);
        assert_eq!(warned, 1, "one warning per silence, not one per tick");
        assert_eq!(m.epoch(), Epoch(1));
    }

    #[test]
    fn no_failover_when_the_cpu_is_silent_too() {
        let (mut m, t0, t) = syncing();
        let a = m.step(Input::Tick(t0 + ms(10_000)), &t);
        assert!(!transitions(&a).contains(&PairState::FailedOver));
        assert!(a.iter().any(|x| matches!(x, Action::Warn { kind: EventKind::Blind, message } if message.contains("cannot confirm"))));
    }

    #[test]
    fn fatal_fault_fails_over_at_once() {
        let (mut m, t0, t) = syncing();
        let a = m.step(
            Input::Report(
                Side::Gpu,
                Report {
                    fatal: Some("Xid 79: GPU has fallen off the bus".into()),
                    ..report(t0 + ms(500), 1)
                },
            ),
            &t,
        );
        assert_eq!(transitions(&a), vec![PairState::FailedOver]);
        assert!(m.rec.reason.contains("Xid 79"));
        assert_eq!(m.epoch(), Epoch(2));
    }

    #[test]
    fn provider_gone_fails_over_without_waiting_for_the_cpu() {
        let (mut m, t0, t) = syncing();
        let a = m.step(Input::ProviderGone(Side::Gpu, t0 + ms(100)), &t);
        assert_eq!(transitions(&a), vec![PairState::FailedOver]);
    }

    #[test]
    fn manual_failover_and_refusal_when_already_failed_over() {
        let (mut m, t0, t) = syncing();
        let a = m.step(Input::Manual(t0 + ms(10)), &t);
        assert_eq!(transitions(&a), vec![PairState::FailedOver]);
        assert!(!a.iter().any(|x| matches!(x, Action::Detected(_))));
        let a = m.step(Input::Manual(t0 + ms(20)), &t);
        assert!(transitions(&a).is_empty());
        assert_eq!(
            m.epoch(),
            Epoch(2),
            "a second request must not bump the epoch again"
        );
    }

    #[test]
    fn no_failover_without_a_cpu_standby() {
        let t0 = Instant::now();
        let t = Timing::default();
        let mut rec = PairMachine::new_record("p");
        rec.set_state(PairState::Syncing.into());
        rec.gpu = machine("g:7702");
        let mut m = PairMachine::resume(rec, t0);
        let a = m.step(Input::Manual(t0), &t);
        assert!(transitions(&a).is_empty());
        assert_eq!(m.epoch(), Epoch(1));
    }

    #[test]
    fn coordinator_downtime_is_not_silence() {
        // Persisted as Syncing; the coordinator restarts much later.
        let (m, _, t) = syncing();
        let t1 = Instant::now() + ms(3_600_000);
        let mut m = PairMachine::resume(m.rec, t1);
        assert!(transitions(&m.step(Input::Tick(t1 + ms(500)), &t)).is_empty());
        // Agents reconnect within the window: nothing happens.
        m.step(Input::Report(Side::Gpu, report(t1 + ms(900), 1)), &t);
        m.step(
            Input::Report(Side::Cpu, cpu_report(t1 + ms(900), Some(ms(100)))),
            &t,
        );
        assert!(transitions(&m.step(Input::Tick(t1 + ms(1500)), &t)).is_empty());
        assert_eq!(m.state(), PairState::Syncing);
    }

    #[test]
    fn restart_mid_failover_resumes_from_the_record() {
        let (mut m, t0, t) = syncing();
        m.step(
            Input::Report(Side::Cpu, cpu_report(t0 + ms(3000), Some(ms(3000)))),
            &t,
        );
        m.step(Input::Tick(t0 + ms(3000)), &t);
        assert_eq!(m.state(), PairState::FailedOver);
        // The coordinator dies right after persisting; a new one resumes the record.
        let t1 = t0 + ms(60_000);
        let mut m2 = PairMachine::resume(m.rec.clone(), t1);
        assert_eq!(m2.epoch(), Epoch(2));
        // The CPU reports the old epoch: it must (still) be promoted; the GPU fenced.
        m2.step(Input::Report(Side::Cpu, cpu_report(t1, None)), &t);
        assert_eq!(
            m2.desired(Side::Cpu),
            vec![Desired::Promote { epoch: Epoch(2) }]
        );
        assert!(matches!(m2.desired(Side::Gpu)[..], [Desired::Fence { .. }]));
        // No second failover and no epoch bump however long things stay quiet.
        for k in 0..10 {
            assert!(transitions(&m2.step(Input::Tick(t1 + ms(k * 1000)), &t)).is_empty());
        }
        assert_eq!(m2.epoch(), Epoch(2));
    }

    #[test]
    fn restart_before_the_transition_was_persisted_decides_again() {
        // The record still says Syncing (the crash came before the write): the new coordinator
        // sees the silence and the CPU's confirmation anew and fails over once.
        let (m, t0, t) = syncing();
        let t1 = t0 + ms(10_000);
        let mut m2 = PairMachine::resume(m.rec, t1);
        m2.step(
            Input::Report(Side::Cpu, cpu_report(t1 + ms(500), Some(ms(9000)))),
            &t,
        );
        for k in 1..=4 {
            m2.step(
                Input::Report(
                    Side::Cpu,
                    cpu_report(t1 + ms(1000 * k), Some(ms(9000 + 1000 * k))),
                ),
                &t,
            );
        }
        let a = m2.step(Input::Tick(t1 + ms(3100)), &t);
        assert!(transitions(&a).contains(&PairState::FailedOver));
        assert_eq!(m2.epoch(), Epoch(2));
    }

    #[test]
    fn states_roundtrip_by_name() {
        for s in PairState::ALL {
            assert_eq!(PairState::parse(s.as_str()), Some(s));
        }
    }

    fn with_provider(m: &mut PairMachine) {
        m.policy = Policy {
            provider: true,
            auto_recover: true,
            boot_timeout: Duration::from_secs(60),
            backoff_base: Duration::from_secs(5),
            label_prefix: "sb-test".into(),
            ..Policy::default()
        };
        m.wall_ms = 1_000_000;
    }

    fn status(mode: AgentMode, root: &str) -> AgentStatus {
        AgentStatus {
            mode,
            root: root.into(),
            connected: true,
            ..Default::default()
        }
    }

    fn named(label: &str, addr: &str) -> Option<MachineRecord> {
        Some(MachineRecord {
            machine: label.into(),
            address: addr.into(),
            workspace: "/workspace".into(),
        })
    }

    /// Found by tests/chaos.rs (seed 3): a new GPU whose agent joined before the create call
    /// returned was owned with no id, so nobody watched it; when it died during the restore the
    /// pair stayed Restoring for good.
    #[test]
    fn a_machine_that_joins_before_its_create_returns_gets_its_id() {
        let (mut m, t0, t) = syncing();
        with_provider(&mut m);
        m.step(Input::Manual(t0), &t);
        m.step(Input::Tick(t0 + ms(200)), &t);
        let label = m.provisioning_label().unwrap().to_string();
        let a = m.step(
            Input::Report(
                Side::Gpu,
                Report {
                    machine: named(&label, "10.0.0.9:7702"),
                    status: status(AgentMode::Idle, ""),
                    ..report(t0 + ms(300), 1)
                },
            ),
            &t,
        );
        assert_eq!(transitions(&a), vec![PairState::Restoring]);
        assert_eq!(m.rec.gpu_owned.as_ref().unwrap().id, "");
        let a = m.step(
            Input::Created {
                label: label.clone(),
                id: "42".into(),
                offer: "o1".into(),
                place: "host-1".into(),
            },
            &t,
        );
        assert_eq!(a, vec![Action::Persist]);
        let owned = m.rec.gpu_owned.as_ref().unwrap();
        assert_eq!((owned.id.as_str(), owned.offer.as_str()), ("42", "o1"));
        // It dies during the restore: another one is provisioned.
        let a = m.step(Input::ProviderGone(Side::Gpu, t0 + ms(900)), &t);
        assert_eq!(transitions(&a), vec![PairState::Provisioning]);
    }

    /// Failed over, auto-recovery on: the machine provisions, restores, cuts over.
    #[test]
    fn recovery_provisions_restores_and_cuts_over() {
        let (mut m, t0, t) = syncing();
        with_provider(&mut m);
        m.step(Input::Manual(t0), &t);
        assert_eq!(m.state(), PairState::FailedOver);
        let a = m.step(Input::Tick(t0 + ms(200)), &t);
        assert_eq!(transitions(&a), vec![PairState::Provisioning]);
        assert_eq!(
            a[0],
            Action::Persist,
            "the intent is durable before anything else"
        );
        let label = m.provisioning_label().unwrap().to_string();
        assert_eq!(label, "sb-test-p-gpu-1");
        // Another machine claiming to be the GPU is not listened to; the new one is.
        assert!(!m.accepts(Side::Gpu, "m"));
        assert!(m.accepts(Side::Gpu, &label));
        m.step(
            Input::Created {
                label: label.clone(),
                id: "42".into(),
                offer: "o1".into(),
                place: "host-1".into(),
            },
            &t,
        );
        assert_eq!(m.rec.provision.as_ref().unwrap().phase(), Phase::Boot);
        let a = m.step(
            Input::Report(
                Side::Gpu,
                Report {
                    machine: named(&label, "10.0.0.9:7702"),
                    status: status(AgentMode::Idle, ""),
                    ..report(t0 + ms(1000), 1)
                },
            ),
            &t,
        );
        assert_eq!(transitions(&a), vec![PairState::Restoring]);
        assert_eq!(m.rec.gpu_owned.as_ref().unwrap().id, "42");
        assert_eq!(
            m.desired(Side::Gpu),
            vec![Desired::Receive { epoch: Epoch(2) }]
        );
        assert_eq!(
            m.desired(Side::Cpu),
            vec![Desired::SetPeer {
                url: "10.0.0.9:7702".into(),
                epoch: Epoch(2)
            }]
        );
        // Roots differ: still restoring.
        m.gpu.status = status(AgentMode::Receive, "aa");
        let a = m.step(
            Input::Report(
                Side::Cpu,
                Report {
                    status: status(AgentMode::Send, "bb"),
                    ..cpu_report(t0 + ms(1500), None)
                },
            ),
            &t,
        );
        assert!(transitions(&a).is_empty());
        // Roots agree: cut over; the CPU is told to freeze.
        let a = m.step(
            Input::Report(
                Side::Gpu,
                Report {
                    machine: named(&label, "10.0.0.9:7702"),
                    status: status(AgentMode::Receive, "bb"),
                    ..report(t0 + ms(2000), 2)
                },
            ),
            &t,
        );
        assert_eq!(transitions(&a), vec![PairState::CuttingOver]);
        assert!(
            m.desired(Side::Cpu)
                .contains(&Desired::Freeze { epoch: Epoch(2) })
        );
        // Frozen at the same root: epoch 3, the GPU is primary again.
        m.wall_ms += 30_000;
        let a = m.step(
            Input::Report(
                Side::Cpu,
                Report {
                    status: AgentStatus {
                        frozen_epoch: 2,
                        ..status(AgentMode::Send, "bb")
                    },
                    ..cpu_report(t0 + ms(2500), None)
                },
            ),
            &t,
        );
        assert_eq!(transitions(&a), vec![PairState::Syncing]);
        assert!(a.contains(&Action::Recovered(Duration::from_secs(30))));
        assert_eq!(m.epoch(), Epoch(3));
        assert_eq!(m.primary(), Side::Gpu);
        assert_eq!(
            m.desired(Side::Gpu),
            vec![Desired::SetPeer {
                url: "10.0.0.2:7701".into(),
                epoch: Epoch(3)
            }]
        );
        assert_eq!(
            m.desired(Side::Cpu)[0],
            Desired::Receive { epoch: Epoch(3) }
        );
    }

    #[test]
    fn failed_boots_are_destroyed_blocklisted_and_retried_with_backoff() {
        let (mut m, t0, t) = syncing();
        with_provider(&mut m);
        m.step(Input::Manual(t0), &t);
        m.step(Input::Tick(t0), &t);
        let first = m.provisioning_label().unwrap().to_string();
        m.step(
            Input::Created {
                label: first.clone(),
                id: "7".into(),
                offer: "o7".into(),
                place: "host-7".into(),
            },
            &t,
        );
        // The boot deadline passes without the agent joining.
        m.wall_ms += 61_000;
        let a = m.step(Input::Tick(t0 + ms(61_000)), &t);
        assert!(a.contains(&Action::AttemptFailed));
        assert_eq!(
            m.rec.teardown.len(),
            1,
            "the failed machine is to be destroyed"
        );
        assert_eq!(m.rec.teardown[0].id, "7");
        let mut blocked = m.blocked();
        blocked.sort();
        assert_eq!(blocked, vec!["host-7", "o7"]);
        let p = m.rec.provision.clone().unwrap();
        assert_eq!(p.attempt, 2);
        assert_ne!(m.provisioning_label().unwrap(), first, "a fresh label");
        let wait = p.next_try_unix_ms - m.wall_ms;
        assert!(
            (5_000..=6_500).contains(&wait),
            "backoff with jitter: {wait}"
        );
        // The old label is no longer accepted as the GPU.
        assert!(!m.accepts(Side::Gpu, &first));
        m.step(Input::Destroyed { label: first }, &t);
        assert!(m.rec.teardown.is_empty());
        // A rejected create blocklists the offer and backs off further.
        let second = m.provisioning_label().unwrap().to_string();
        m.step(
            Input::CreateFailed {
                label: second,
                error: "no_such_ask".into(),
                block: vec!["o8".into()],
            },
            &t,
        );
        let p = m.rec.provision.clone().unwrap();
        assert_eq!(p.attempt, 3);
        assert!(p.next_try_unix_ms - m.wall_ms >= 10_000);
        assert!(m.blocked().contains(&"o8".to_string()));
        // Blocks expire.
        m.wall_ms += 2 * 3_600_000;
        assert!(m.blocked().is_empty());
        // A result for a label given up on is ignored.
        let before = m.rec.clone();
        m.step(
            Input::Created {
                label: "sb-test-p-gpu-1".into(),
                id: "99".into(),
                offer: String::new(),
                place: String::new(),
            },
            &t,
        );
        assert_eq!(m.rec, before);
    }

    #[test]
    fn hibernate_then_wake() {
        let (mut m, t0, t) = syncing();
        with_provider(&mut m);
        m.rec.gpu_owned = Some(OwnedMachine {
            label: "m".into(),
            id: "g1".into(),
            ..Default::default()
        });
        let a = m.step(Input::Hibernate, &t);
        assert!(a.contains(&Action::Persist));
        assert!(
            m.desired(Side::Gpu)
                .contains(&Desired::Freeze { epoch: Epoch(1) })
        );
        m.cpu.status = status(AgentMode::Receive, "cc");
        let a = m.step(
            Input::Report(
                Side::Gpu,
                Report {
                    status: AgentStatus {
                        frozen_epoch: 1,
                        ..status(AgentMode::Send, "cc")
                    },
                    ..report(t0, 1)
                },
            ),
            &t,
        );
        assert_eq!(transitions(&a), vec![PairState::Hibernated]);
        assert_eq!(m.epoch(), Epoch(2));
        assert_eq!(m.primary(), Side::Cpu);
        assert_eq!(m.rec.teardown[0].id, "g1", "the GPU machine is released");
        assert!(matches!(m.desired(Side::Gpu)[0], Desired::Fence { .. }));
        // Not a failover: no detection, nothing else happens by itself.
        assert!(transitions(&m.step(Input::Tick(t0 + ms(60_000)), &t)).is_empty());
        let a = m.step(Input::Wake, &t);
        assert_eq!(transitions(&a), vec![PairState::Provisioning]);
        // Hibernating a pair that is not Syncing is refused.
        let a = m.step(Input::Hibernate, &t);
        assert!(matches!(
            &a[0],
            Action::Warn {
                kind: EventKind::Refused,
                ..
            }
        ));
    }

    #[test]
    fn a_lost_cpu_standby_is_replaced_and_seeded() {
        let (mut m, t0, t) = syncing();
        with_provider(&mut m);
        // The provider says the CPU is gone, but its agent was heard from just now: wait.
        let a = m.step(Input::ProviderGone(Side::Cpu, t0 + ms(500)), &t);
        assert!(transitions(&a).is_empty());
        // Silent for longer than the failover delay too: Degraded, a new CPU provisioned.
        let a = m.step(Input::ProviderGone(Side::Cpu, t0 + ms(5000)), &t);
        assert_eq!(transitions(&a), vec![PairState::Degraded]);
        let label = m.provisioning_label().unwrap().to_string();
        assert!(label.contains("-cpu-"));
        m.step(
            Input::Report(
                Side::Cpu,
                Report {
                    machine: named(&label, "10.0.0.3:7701"),
                    status: status(AgentMode::Receive, ""),
                    ..cpu_report(t0 + ms(6000), None)
                },
            ),
            &t,
        );
        assert!(m.rec.provision.is_none());
        assert_eq!(
            m.desired(Side::Gpu),
            vec![Desired::SetPeer {
                url: "10.0.0.3:7701".into(),
                epoch: Epoch(1)
            }]
        );
        m.cpu.status = status(AgentMode::Receive, "dd");
        let a = m.step(
            Input::Report(
                Side::Gpu,
                Report {
                    status: status(AgentMode::Send, "dd"),
                    ..report(t0 + ms(7000), 1)
                },
            ),
            &t,
        );
        assert_eq!(transitions(&a), vec![PairState::Syncing]);
        assert_eq!(
            m.epoch(),
            Epoch(1),
            "no epoch change: the GPU stayed primary"
        );
    }

    /// The GPU agent reports as the sender, reaching its standby (`connected`) or not.
    fn gpu_sends(m: &mut PairMachine, at: Instant, connected: bool, t: &Timing) -> Vec<Action> {
        let st = AgentStatus {
            connected,
            ..status(AgentMode::Send, "dd")
        };
        m.step(
            Input::Report(
                Side::Gpu,
                Report {
                    status: st,
                    ..report(at, 1)
                },
            ),
            t,
        )
    }

    /// The CPU agent reports again, receiving; it last reached the GPU `probe_ok_age` ago
    /// (None: not since it came back).
    fn cpu_back(
        m: &mut PairMachine,
        at: Instant,
        probe_ok_age: Option<Duration>,
        t: &Timing,
    ) -> Vec<Action> {
        m.step(
            Input::Report(
                Side::Cpu,
                Report {
                    machine: machine("10.0.0.2:7701"),
                    status: status(AgentMode::Receive, "dd"),
                    ..cpu_report(at, probe_ok_age)
                },
            ),
            t,
        )
    }

    /// Syncing, then the CPU is lost to the coordinator (t0 + 100 ms) and to the GPU: Degraded
    /// at t0 + 4.5 s, nothing provisioned, epoch 1.
    fn degraded() -> (PairMachine, Instant, Timing) {
        let (mut m, t0, t) = syncing();
        m.step(Input::Disconnected(Side::Cpu, t0 + ms(100)), &t);
        gpu_sends(&mut m, t0 + ms(4500), false, &t);
        let a = m.step(Input::Tick(t0 + ms(4500)), &t);
        assert_eq!(transitions(&a), vec![PairState::Degraded]);
        assert!(m.rec.provision.is_none());
        assert_eq!(m.epoch(), Epoch(1));
        (m, t0, t)
    }

    #[test]
    fn a_silent_standby_the_gpu_cannot_reach_degrades_the_pair() {
        let (mut m, t0, t) = syncing();
        m.step(Input::Disconnected(Side::Cpu, t0 + ms(100)), &t);
        // The GPU still reaches its standby (only the coordinator lost it): no change.
        gpu_sends(&mut m, t0 + ms(4000), true, &t);
        assert!(transitions(&m.step(Input::Tick(t0 + ms(4000)), &t)).is_empty());
        // Neither the coordinator nor the GPU hears the CPU: Degraded, nothing provisioned
        // (no provider is configured, and a hand-joined standby is not ours to replace).
        gpu_sends(&mut m, t0 + ms(4500), false, &t);
        let a = m.step(Input::Tick(t0 + ms(4500)), &t);
        assert_eq!(transitions(&a), vec![PairState::Degraded]);
        assert!(m.rec.provision.is_none());
        assert_eq!(m.epoch(), Epoch(1));
        // It comes back and catches up: Syncing again.
        cpu_back(&mut m, t0 + ms(5000), Some(ms(10)), &t);
        let a = gpu_sends(&mut m, t0 + ms(5100), true, &t);
        assert_eq!(transitions(&a), vec![PairState::Syncing]);
    }

    #[test]
    fn a_degraded_pair_fails_over_when_its_standby_returns_and_the_gpu_is_gone() {
        // Found by tests/chaos.rs (seed 2): the standby was cut off (Degraded), the GPU died
        // meanwhile, the standby came back: the pair stayed Degraded for good, nobody primary.
        let (mut m, t0, t) = degraded();
        // The GPU is never heard from again; the CPU comes back and cannot reach it either.
        let a = cpu_back(&mut m, t0 + ms(9000), None, &t);
        assert!(transitions(&a).is_empty());
        let a = m.step(Input::Tick(t0 + ms(9100)), &t);
        assert_eq!(transitions(&a), vec![PairState::FailedOver]);
        assert_eq!(m.epoch(), Epoch(2));
        assert_eq!(m.primary(), Side::Cpu);
    }

    #[test]
    fn a_degraded_pair_whose_gpu_lives_does_not_fail_over() {
        let (mut m, t0, t) = degraded();
        // The CPU is back but still cut from the GPU, which the coordinator hears: no failover.
        cpu_back(&mut m, t0 + ms(9000), None, &t);
        gpu_sends(&mut m, t0 + ms(9000), false, &t);
        let a = m.step(Input::Tick(t0 + ms(9100)), &t);
        assert!(transitions(&a).is_empty(), "{a:?}");
        assert_eq!(m.state(), PairState::Degraded);
        assert_eq!(m.epoch(), Epoch(1));
    }

    #[test]
    fn without_a_provider_recovery_is_refused_with_a_reason() {
        let (mut m, t0, t) = syncing();
        m.step(Input::Manual(t0), &t);
        let a = m.step(Input::Tick(t0), &t);
        assert!(
            transitions(&a).is_empty(),
            "no auto-recovery without a provider"
        );
        let a = m.step(Input::Recover, &t);
        assert!(
            matches!(&a[0], Action::Warn { kind: EventKind::Refused, message } if message.contains("no provider"))
        );
        assert_eq!(m.state(), PairState::FailedOver);
    }
}
