//! The agent's heartbeat report: the mode-dependent part from the node, GPU health (GPU agent,
//! from NVML or a fault injected through the control socket) and the contact with the GPU
//! (CPU agent, from its probe).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use crate::agent::config::AgentConfig;
use crate::agent::node::{Node, NodeReport};
use crate::agent::nvml::Nvml;
use crate::agent::probe::{self, ProbeState};
use crate::agent::seed::Seeder;
use crate::agent::snapshots::{HistoryFigures, Recorder};
use crate::agent::socket::InjectedFault;
use crate::proto::{AgentMode, AgentReport, GpuHealth, HistoryReport, PeerContact};
use crate::trust::identity::Role;

/// Builds one heartbeat report per interval from the agent's live state.
pub struct Reporter {
    machine: String,
    workspace: PathBuf,
    advertise: String,
    listen_port: u16,
    role: Role,
    node: Node,
    probe: probe::Shared,
    fault: InjectedFault,
    nvml: Mutex<Option<Nvml>>,
    history: Option<Recorder>,
    /// A CPU standby's seed from the off-site backup.
    seed: Option<Seeder>,
}

impl Reporter {
    /// A GPU agent opens NVML here (absent NVML: no GPU health in the reports).
    pub fn new(
        cfg: &AgentConfig,
        listen_port: u16,
        node: Node,
        probe: probe::Shared,
        fault: InjectedFault,
        (history, seed): (Option<Recorder>, Option<Seeder>),
    ) -> Reporter {
        let nvml = if cfg.role == Role::Gpu {
            Nvml::open()
        } else {
            None
        };
        Reporter {
            machine: cfg.machine.clone(),
            workspace: cfg.workspace.clone(),
            advertise: cfg.advertise.clone(),
            listen_port,
            role: cfg.role,
            node,
            probe,
            fault,
            nvml: Mutex::new(nvml),
            history,
            seed,
        }
    }

    /// The next report.
    pub fn report(&self) -> AgentReport {
        let gpu = self.gpu_health();
        let n = self.node.report();
        let p = self.probe.lock().expect("probe").clone();
        let last_data = self.node.receiver().figures().last_data;
        self.assemble(&n, gpu, (self.role == Role::Cpu).then_some((&p, last_data)))
    }

    /// Sync payload bytes the sender has put on the connection since it started.
    pub fn bytes_sent_total(&self) -> u64 {
        self.node.report().sender.bytes_sent_total
    }

    /// NVML's sample, marked fatal when a fault was injected.
    fn gpu_health(&self) -> Option<GpuHealth> {
        let mut gpu = self.nvml.lock().expect("nvml").as_mut().map(|n| n.sample());
        if let Some(reason) = self.fault.lock().expect("fault").clone() {
            let g = gpu.get_or_insert_with(Default::default);
            g.fatal = true;
            g.fatal_reason = reason;
        }
        if let Some(g) = gpu.as_mut() {
            g.fatal_reason = report_text(std::mem::take(&mut g.fatal_reason));
        }
        gpu
    }

    fn assemble(
        &self,
        n: &NodeReport,
        gpu: Option<GpuHealth>,
        probe: Option<(&ProbeState, Option<Instant>)>,
    ) -> AgentReport {
        let now_ms = crate::replication::send::unix_ms(SystemTime::now());
        let f = &n.sender;
        let sending = n.mode == AgentMode::Send;
        AgentReport {
            machine: self.machine.clone(),
            epoch: n.epoch,
            advertise: self.advertise.clone(),
            listen_port: self.listen_port as u32,
            workspace: self.workspace.display().to_string(),
            generation: n.generation,
            primary: sending || n.mode == AgentMode::Primary,
            fenced: n.fenced,
            rpo_age_ms: if sending {
                f.oldest_pending_unix_ms
                    .map(|t| now_ms.saturating_sub(t))
                    .unwrap_or(0)
            } else {
                0
            },
            pending_bytes: if sending { f.pending_bytes } else { 0 },
            last_durable_unix_ms: f.last_durable_unix_ms,
            disk_free_bytes: disk_free(&self.workspace),
            gpu,
            last_error: report_text(n.last_error.clone()),
            bytes_total: n.bytes_total,
            last_sync_ms: f.last_sync_ms,
            peer: probe.map(|(p, last_data)| peer_contact(p, last_data)),
            mode: n.mode.into(),
            root: n.root.clone(),
            frozen_epoch: n.frozen_epoch,
            workspace_bytes: n.workspace_bytes,
            connected: n.connected,
            history: self.history.as_ref().map(|h| history_report(&h.figures())),
            seed: self.seed.as_ref().and_then(Seeder::report),
            ..Default::default()
        }
    }
}

/// The recorder's figures as a report carries them.
fn history_report(f: &HistoryFigures) -> HistoryReport {
    HistoryReport {
        snapshots: f.snapshots,
        newest_snapshot_unix_ms: f.newest_unix_ms,
        newest_snapshot_generation: f.newest_generation,
        stored_bytes: f.stored_bytes,
        logical_bytes: f.logical_bytes,
        record_failures: f.record_failures,
        dropped_for_budget: f.dropped_for_budget,
        last_error: report_text(f.last_error.clone().unwrap_or_default()),
        backup_last_error: report_text(f.backup_last_error.clone().unwrap_or_default()),
        backup_configured: f.backup_configured,
        newest_backup_unix_ms: f.newest_backup_unix_ms,
        backup_uploaded_bytes: f.backup_uploaded_bytes,
        backup_failures: f.backup_failures,
    }
}

/// The CPU's contact with its GPU peer: its own probe and the age of the last replication data.
fn peer_contact(p: &ProbeState, last_data: Option<Instant>) -> PeerContact {
    PeerContact {
        probe_ok_age_ms: ms_since(p.last_ok),
        probe_ever_ok: p.last_ok.is_some(),
        last_data_age_ms: ms_since(last_data),
        probe_error: report_text(p.last_error.clone().unwrap_or_default()),
    }
}

/// Free text cut to what the coordinator accepts in a report: a longer field would get the
/// whole report refused.
fn report_text(s: String) -> String {
    crate::text::truncate(s, crate::text::REPORT_TEXT_MAX)
}

/// Free bytes on the filesystem holding `path` (0 when unknown).
pub fn disk_free(path: &Path) -> u64 {
    crate::disk::fsx::free_bytes(path).unwrap_or(0)
}

fn ms_since(t: Option<Instant>) -> u64 {
    t.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0)
}
