//! Failure detection and failover for one pair: a pure state machine (ARCHITECTURE.md, "The life
//! of a failure").
//!
//! Events and time go in ([`Input`]), decisions come out ([`Action`]); there is no I/O here and
//! no clock: every instant and wall-clock time comes from the caller (the inputs and
//! [`PairMachine::wall_ms`]), which is what lets the unit tests replay any schedule. Reading the
//! clock here is a compile error (`clippy.toml`, denied below).
//!
//! The caller (the coordinator's engine) persists the record whenever an action says so,
//! *before* acting on anything else in the same batch, and sends agents what
//! [`PairMachine::desired`] says they should be told. That second part is level-triggered: it is
//! recomputed from the persisted record and the agents' reports, so a coordinator that restarts
//! in the middle of a failover simply tells each agent again what the record says (promote the CPU
//! at epoch N, fence the GPU), and nothing depends on which step it had reached.
//!
//! Invariants kept here:
//! - Fencing (Invariant 3): every failover and cutover raises the epoch in the same persisted
//!   write as the transition, before any agent is told.
//! - No false failover (Invariant 5, `detection`): silence from the GPU agent is only acted on
//!   when the CPU agent confirms it has lost the GPU too (its own probe), or the provider says the
//!   machine is gone; a fatal fault reported by the GPU agent itself fails over at once.
//!   Heartbeat ages never count time the coordinator itself was down.
//! - No leaked spend (Invariant 6, `provisioning`): a machine being created is recorded before
//!   it is asked for, and one that is replaced or failed goes to `teardown` until the provider
//!   confirms it destroyed.
//!
//! One file per concern: `detection` (heartbeats, suspicion, confirmation, failover),
//! `provisioning` (attempts, blocklist, backoff, deadlines), `restore` (restore progress,
//! cutover, reseeding a standby), `rebuild` (a pair that lost both machines, from its backup),
//! `hibernation`, `desired` (the commands agents should hold),
//! `retirement` (which machines a transition retires, and who holds a seat).
#![deny(clippy::disallowed_methods)]

mod desired;
mod detection;
mod hibernation;
mod provisioning;
mod rebuild;
mod restore;
mod retirement;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

pub use retirement::{Retired, retired};

use crate::proto::state::{MachineRecord, OwnedMachine, PairRecord};
use crate::proto::{AgentMode, EventKind, Role};
use crate::types::{Epoch, PerSide, Side};

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
    /// Both machines were lost: a new CPU standby is seeded from the off-site backup, then a
    /// GPU follows as after a failover (`rebuild`).
    Rebuilding,
}

impl PairState {
    pub const ALL: [PairState; 10] = [
        PairState::Pending,
        PairState::Syncing,
        PairState::Suspect,
        PairState::FailedOver,
        PairState::Provisioning,
        PairState::Restoring,
        PairState::CuttingOver,
        PairState::Hibernated,
        PairState::Degraded,
        PairState::Rebuilding,
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
            PairState::Rebuilding => "Rebuilding",
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

/// Detection timing (ARCHITECTURE.md, "Defaults").
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
    /// CPU agent: the off-site backup snapshot its replica was seeded from ("" : none).
    pub seeded: String,
    /// CPU agent: why its last try at a seed failed ("" : it did not).
    pub seed_error: String,
}

/// What the coordinator has seen of one agent (not persisted: rebuilt from heartbeats).
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub last_seen: Option<Instant>,
    /// When the agent was heard again after a silence longer than a fresh report's age (None:
    /// no such silence since this coordinator first heard it).
    pub heard_since: Option<Instant>,
    pub connected: bool,
    pub epoch: Epoch,
    pub fatal: Option<String>,
    pub contact: Option<Contact>,
    pub status: AgentStatus,
}

/// How a pair heals (ARCHITECTURE.md, "The life of a failure").
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
    /// An operator asked to rebuild a pair that lost both machines from the backup snapshot
    /// `snapshot` (`latest` or an id).
    RecoverFromBackup {
        snapshot: String,
        now: Instant,
    },
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
    /// The pair is healthy again this long after it lost its protection (`since` says what:
    /// "the failure", "the wake", ...).
    Recovered {
        after: Duration,
        since: &'static str,
    },
    /// A provisioning attempt failed (counted in metrics).
    AttemptFailed,
}

/// A command an agent should have received for the current record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Desired {
    SetPeer {
        url: String,
        epoch: Epoch,
    },
    Promote {
        epoch: Epoch,
    },
    Fence {
        epoch: Epoch,
        reason: String,
    },
    Probe {
        url: String,
    },
    Receive {
        epoch: Epoch,
    },
    Freeze {
        epoch: Epoch,
    },
    /// Fill the empty replica from the off-site backup snapshot (`latest` or an id).
    Seed {
        epoch: Epoch,
        snapshot: String,
    },
}

pub struct PairMachine {
    pub rec: PairRecord,
    /// What the coordinator has seen of each agent.
    pub seen: PerSide<Seen>,
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
    /// A new pair's record, stamped with the caller's wall clock (unix ms).
    pub fn new_record(name: &str, wall_ms: u64) -> PairRecord {
        PairRecord {
            name: name.to_string(),
            state: crate::proto::PairState::from(PairState::Pending).into(),
            epoch: 1,
            primary: Role::from(Side::Gpu).into(),
            changed_unix_ms: wall_ms,
            ..Default::default()
        }
    }

    /// Resumes a persisted record (a fresh pair, or after a coordinator restart).
    pub fn resume(rec: PairRecord, now: Instant) -> PairMachine {
        PairMachine {
            rec,
            seen: PerSide::default(),
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

    /// Feeds one input to the machine and returns what the caller must do, in order.
    pub fn step(&mut self, input: Input, t: &Timing) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Report(side, r) => self.on_report(side, r, t, &mut out),
            Input::Disconnected(side, _) => self.seen[side].connected = false,
            Input::Tick(now) => self.tick(now, t, &mut out),
            Input::Manual(now) => self.on_manual(now, &mut out),
            Input::ProviderGone(side, now) => self.provider_gone(side, now, t, &mut out),
            Input::Recover => self.recover(&mut out),
            Input::RecoverFromBackup { snapshot, now } => self.rebuild(snapshot, now, t, &mut out),
            Input::Hibernate => self.hibernate(&mut out),
            Input::Wake => self.wake(&mut out),
            Input::Created {
                label,
                id,
                offer,
                place,
            } => self.on_created(label, id, offer, place, &mut out),
            Input::CreateFailed {
                label,
                error,
                block,
            } => self.on_create_failed(&label, &error, block, &mut out),
            Input::Destroyed { label } => self.on_destroyed(&label, &mut out),
        }
        out
    }

    /// Moves to `to` (nothing if already there), to be persisted before it is acted on, or
    /// with the next batch when nothing acts on it (`durable_before_acting`).
    fn go(&mut self, to: PairState, reason: String, out: &mut Vec<Action>) {
        let from = self.state();
        if from == to {
            return;
        }
        self.rec.set_state(to.into());
        self.rec.reason = reason.clone();
        self.rec.changed_unix_ms = self.wall_ms;
        out.push(match durable_before_acting(from, to) {
            true => Action::Persist,
            false => Action::PersistSoon,
        });
        out.push(Action::Transition { from, to, reason });
    }

    // The record is the protobuf `PairRecord`, whose per-side fields are separate fields rather
    // than a `PerSide`: these are the only places that choose between them.

    /// The machine `side`'s agent last reported as its own.
    fn machine_mut(&mut self, side: Side) -> &mut Option<MachineRecord> {
        match side {
            Side::Gpu => &mut self.rec.gpu,
            Side::Cpu => &mut self.rec.cpu,
        }
    }

    /// The provider-created machine that holds `side` (None: none, or one joined by hand).
    fn owned(&self, side: Side) -> &Option<OwnedMachine> {
        match side {
            Side::Gpu => &self.rec.gpu_owned,
            Side::Cpu => &self.rec.cpu_owned,
        }
    }

    fn owned_mut(&mut self, side: Side) -> &mut Option<OwnedMachine> {
        match side {
            Side::Gpu => &mut self.rec.gpu_owned,
            Side::Cpu => &mut self.rec.cpu_owned,
        }
    }
}

/// Whether a transition must be durable before anything acts on it. Every one must, but
/// `Syncing` <-> `Suspect`: the state shown to operators while the GPU is late. It sends no
/// command ([`PairMachine::desired`] is the same in both), changes no epoch, primary, machine or
/// intent, and a leader that loads it stale derives nothing from it: detection counts silence
/// from its own start in either state, and a failover from either needs the CPU agent's
/// confirmation (`detection`). Under load it is most of the writes (a late heartbeat is two
/// transitions), so it goes with the next batch.
pub fn durable_before_acting(from: PairState, to: PairState) -> bool {
    !matches!(
        (from, to),
        (PairState::Syncing, PairState::Suspect) | (PairState::Suspect, PairState::Syncing)
    )
}

fn refuse(out: &mut Vec<Action>, message: String) {
    out.push(Action::Warn {
        kind: EventKind::Refused,
        message,
    });
}
