//! What the status page shows, built from what the engine already keeps: every pair's view (as
//! `coordinator pairs` shows it) and the event log's recent window. Pure: views, events and the
//! time in, a [`Status`] out; the HTML and the JSON are two renderings of it.

use serde::Serialize;

use crate::proto::{Event, EventKind, MachineView, PairState, PairView};

/// How many recent events the page lists (newest first).
pub const RECENT: usize = 50;

/// The whole page.
#[derive(Debug, Serialize)]
pub struct Status {
    pub generated_unix_ms: u64,
    pub pairs: Vec<PairStatus>,
    /// Newest first, heartbeat summaries left out.
    pub events: Vec<EventLine>,
}

/// One pair.
#[derive(Debug, Serialize)]
pub struct PairStatus {
    pub pair: String,
    pub state: String,
    pub epoch: u64,
    /// "gpu" or "cpu".
    pub primary: String,
    /// Replication lag: how old the newest data durable on the standby is (`sync_lag_ms`).
    pub rpo_ms: u64,
    pub pending_bytes: u64,
    /// Syncing: the GPU replicates to a live standby (the `standby_pair_protected` metric).
    pub protected: bool,
    pub reason: String,
    pub provisioning: String,
    pub active_endpoint: String,
    pub machines: Vec<MachineStatus>,
    /// The last failover the event window still holds.
    pub last_failover: Option<Failover>,
}

#[derive(Debug, Serialize)]
pub struct MachineStatus {
    pub role: &'static str,
    pub machine: String,
    pub address: String,
    pub connected: bool,
    /// None until its agent sent a heartbeat.
    pub last_heartbeat_ms: Option<u64>,
    pub epoch: u64,
}

/// A failover's phases, in the order the pair entered them.
#[derive(Debug, Serialize)]
pub struct Failover {
    pub phases: Vec<Phase>,
    /// From the first phase to Syncing again; None while it is still under way.
    pub total_ms: Option<u64>,
}

/// One state the pair went through during a failover.
#[derive(Debug, Serialize)]
pub struct Phase {
    /// "failure" (Suspect), "failover", "provisioning", "restore", "cutover", "synced", or the
    /// state's name for any other.
    pub name: &'static str,
    pub state: String,
    pub unix_ms: u64,
    /// Until the next phase began; None for the last one.
    pub lasted_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct EventLine {
    pub unix_ms: u64,
    pub pair: String,
    pub kind: &'static str,
    pub epoch: u64,
    pub message: String,
}

impl Status {
    /// The page for `views` (sorted by name, as the engine gives them) and the event window
    /// `events` (oldest first, as the log keeps it).
    pub fn build(views: Vec<PairView>, events: &[Event], now_unix_ms: u64) -> Status {
        let pairs = views
            .into_iter()
            .map(|v| {
                let last = last_failover(&v.pair, events);
                pair_status(v, last)
            })
            .collect();
        let events = events
            .iter()
            .rev()
            .filter(|e| e.kind() != EventKind::Heartbeat)
            .take(RECENT)
            .map(event_line)
            .collect();
        Status {
            generated_unix_ms: now_unix_ms,
            pairs,
            events,
        }
    }
}

fn pair_status(v: PairView, last_failover: Option<Failover>) -> PairStatus {
    let machines = [("gpu", &v.gpu), ("cpu", &v.cpu)]
        .into_iter()
        .filter_map(|(role, m)| m.as_ref().map(|m| machine_status(role, m)))
        .collect();
    PairStatus {
        state: v.state().to_string(),
        epoch: v.epoch,
        primary: v.primary().to_string(),
        rpo_ms: v.sync_lag_ms,
        pending_bytes: v.pending_bytes,
        protected: v.state() == PairState::Syncing,
        machines,
        last_failover,
        pair: v.pair,
        reason: v.reason,
        provisioning: v.provisioning,
        active_endpoint: v.active_endpoint,
    }
}

fn machine_status(role: &'static str, m: &MachineView) -> MachineStatus {
    MachineStatus {
        role,
        machine: m.machine.clone(),
        address: m.address.clone(),
        connected: m.connected,
        last_heartbeat_ms: (m.last_heartbeat_ms != u64::MAX).then_some(m.last_heartbeat_ms),
        epoch: m.epoch,
    }
}

fn event_line(e: &Event) -> EventLine {
    EventLine {
        unix_ms: e.unix_ms,
        pair: e.pair.clone(),
        kind: e.kind().as_str(),
        epoch: e.epoch,
        message: e.message.clone(),
    }
}

/// The last failover of `pair` in `events`: from the Suspect state that led to the last
/// FailedOver (when the window still holds it) through every state entered after, up to and
/// including Syncing again, from transition events only. The event window lives in memory
/// (2000 events): after a coordinator restart, or on a busy fleet, an older failover is gone.
pub fn last_failover(pair: &str, events: &[Event]) -> Option<Failover> {
    let moves: Vec<&Event> = events
        .iter()
        .filter(|e| e.pair == pair && e.kind() == EventKind::Transition)
        .collect();
    let at = moves
        .iter()
        .rposition(|e| e.to_state() == PairState::FailedOver)?;
    let start = match at.checked_sub(1) {
        Some(i) if moves[i].to_state() == PairState::Suspect => i,
        _ => at,
    };
    let mut steps = Vec::new();
    for e in &moves[start..] {
        steps.push(*e);
        if e.to_state() == PairState::Syncing {
            break;
        }
    }
    Some(timeline(&steps))
}

fn timeline(steps: &[&Event]) -> Failover {
    let phases: Vec<Phase> = steps
        .iter()
        .enumerate()
        .map(|(i, e)| Phase {
            name: phase_name(e.to_state()),
            state: e.to_state().to_string(),
            unix_ms: e.unix_ms,
            lasted_ms: steps
                .get(i + 1)
                .map(|next| next.unix_ms.saturating_sub(e.unix_ms)),
        })
        .collect();
    let done = steps
        .last()
        .is_some_and(|e| e.to_state() == PairState::Syncing);
    let total_ms = match (steps.first(), steps.last()) {
        (Some(a), Some(b)) if done => Some(b.unix_ms.saturating_sub(a.unix_ms)),
        _ => None,
    };
    Failover { phases, total_ms }
}

fn phase_name(s: PairState) -> &'static str {
    match s {
        PairState::Suspect => "failure",
        PairState::FailedOver => "failover",
        PairState::Provisioning => "provisioning",
        PairState::Restoring => "restore",
        PairState::CuttingOver => "cutover",
        PairState::Syncing => "synced",
        PairState::Degraded => "degraded",
        PairState::Rebuilding => "rebuilding",
        PairState::Hibernated => "hibernated",
        PairState::Pending => "pending",
        PairState::Unspecified => "unknown",
    }
}
