//! An agent's heartbeat report: the figures the engine keeps of it, the metrics it feeds, and
//! the [`Report`] the pair's failover machine steps on.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::Actor;
use super::events::event;
use crate::control::failover::{Action, AgentStatus, Input, Report};
use crate::control::metrics::PairLabel;
use crate::host::unix_ms_now;
use crate::proto::state::MachineRecord;
use crate::proto::{AgentReport, Event, EventKind, HistoryReport};
use crate::types::{Epoch, Side};

/// The latest figures an agent reported.
#[derive(Clone, Debug, Default)]
pub(super) struct Figures {
    pub(super) generation: u64,
    pub(super) rpo_age_ms: u64,
    pub(super) pending_bytes: u64,
    pub(super) epoch: u64,
    pub(super) bytes_total: u64,
    pub(super) workspace_bytes: u64,
    /// A CPU standby's history and backup.
    pub(super) history: Option<HistoryReport>,
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
            history: r.history.clone(),
        }
    }
}

impl Actor {
    /// A heartbeat, handed in at `at` (when it counts as heard): from the side's accepted
    /// machine it steps the pair; from any other machine claiming the side, it only earns a
    /// fence.
    pub(super) fn on_report(
        &mut self,
        pair: &str,
        side: Side,
        conn: u64,
        r: AgentReport,
        (observed, at): (Option<IpAddr>, Instant),
    ) {
        if !self.pairs.contains_key(pair) {
            return;
        }
        self.metrics.heartbeats.inc();
        if !self.accepts(pair, side, &r.machine) {
            // Not the machine this side belongs to (an old GPU coming back after it was
            // replaced): fence it, listen to nothing it says.
            self.fence_stranger(pair, side, conn, &r);
            return;
        }
        if !self.claim(pair, side, conn) {
            return; // from a connection that was replaced
        }
        self.metrics
            .set_disk_free(pair, side.as_str(), r.disk_free_bytes);
        let figures = &mut self.pairs.get_mut(pair).expect("checked").figures[side];
        let before = std::mem::replace(figures, Figures::from(&r));
        if let Some(h) = &r.history {
            self.metrics.history(pair, before.history.as_ref(), h);
        }
        self.warn_stale_gpu(pair, side, &r);
        if side == Side::Gpu {
            self.gpu_metrics(pair, &r);
        }
        let report = detection_report(side, r, observed, at);
        let e = self.pairs.get_mut(pair).expect("checked");
        e.m.wall_ms = unix_ms_now();
        let actions = e.m.step(Input::Report(side, report), &self.timing);
        let provider_work = actions.contains(&Action::Persist);
        self.act(pair, actions);
        if provider_work {
            self.drive_provider(pair);
        }
    }

    /// The machine the pair failed over from, reporting an epoch older than the pair's, is the
    /// old primary coming back: it is (still) told to stay fenced; say so once. A new GPU (a
    /// provider's replacement, or another machine joined by hand) is not it.
    fn warn_stale_gpu(&mut self, pair: &str, side: Side, r: &AgentReport) {
        let e = self.pairs.get_mut(pair).expect("checked");
        let old = e.m.rec.gpu.as_ref().map(|m| m.machine.as_str());
        let replacement = e.m.provisioning_label() == Some(r.machine.as_str())
            || e.m
                .rec
                .gpu_owned
                .as_ref()
                .is_some_and(|o| o.label == r.machine);
        if side != Side::Gpu
            || e.m.primary() != Side::Cpu
            || r.epoch >= e.m.epoch().0
            || old != Some(r.machine.as_str())
            || replacement
        {
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
}

/// What a heartbeat handed in at `at` tells the failover machine.
fn detection_report(side: Side, r: AgentReport, observed: Option<IpAddr>, at: Instant) -> Report {
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
        at,
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

/// What the agent says it is doing, as the failover machine reads it.
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
        seeded: r
            .seed
            .as_ref()
            .filter(|s| s.done)
            .map(|s| s.snapshot.clone())
            .unwrap_or_default(),
        seed_error: r.seed.as_ref().map(|s| s.error.clone()).unwrap_or_default(),
    }
}
