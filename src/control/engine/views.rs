//! What `coordinator pairs` shows of each pair, and a state as the protocol carries it.

use super::{Actor, Entry};
use crate::control::failover::PairState;
use crate::proto::state::PairRecord;
use crate::proto::{MachineView, PairView, Role};
use crate::types::Side;

impl Actor {
    /// Every pair's view, by name.
    pub(super) fn views(&self) -> Vec<PairView> {
        let mut names: Vec<&String> = self.pairs.keys().collect();
        names.sort();
        names.into_iter().map(|n| self.view(n)).collect()
    }

    /// One pair as `pairs` shows it.
    pub(super) fn view(&self, name: &str) -> PairView {
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
            history: e.figures.cpu.history.clone(),
            protected: e.m.state() == PairState::Syncing,
            lag_unknown: e.conns[primary].is_none(),
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

/// A state as a proto field holds it.
pub(super) fn proto_state(s: PairState) -> i32 {
    crate::proto::PairState::from(s).into()
}
