//! What the sender reports: one generation's [`Report`] (the `--once` output) and the running
//! [`SenderFigures`] the agent publishes (the RPO measurement: how old the oldest change not yet
//! durable on the receiver is).

use std::time::SystemTime;

use crate::replication::manifest::Manifest;
use crate::replication::scan::{Action, Plan};
use crate::text::hex;
use crate::types::Epoch;

/// What one generation did (the `--once` output).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    pub generation: u64,
    pub files_total: u64,
    pub files_changed: u64,
    pub bytes_total: u64,
    pub bytes_sent: u64,
    pub duration_ms: u64,
    pub root: String,
    /// Files left for the next generation because they changed while being read.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub still_changing: Vec<String>,
    /// Files left for the next generation because this one's budget was spent.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deferred: Vec<String>,
}

/// Figures the agent reports (RPO measurement).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SenderFigures {
    pub epoch: u64,
    pub last_durable_generation: u64,
    pub last_durable_unix_ms: u64,
    /// Unix ms of the oldest change not yet durable on the receiver (None: nothing pending).
    pub oldest_pending_unix_ms: Option<u64>,
    pub pending_bytes: u64,
    pub connected: bool,
    pub last_error: Option<String>,
    pub fenced: bool,
    pub generations: u64,
    pub bytes_sent_total: u64,
    pub last_sync_ms: u64,
    /// Manifest root (hex) both sides agreed on last.
    pub root: String,
    /// Bytes of the workspace as of the last scan (agreed plus still to send).
    pub workspace_bytes: u64,
}

impl SenderFigures {
    /// What a new sender knows: its epoch and its index.
    pub(super) fn index(&mut self, epoch: Epoch, index: &Manifest) {
        self.epoch = epoch.0;
        self.last_durable_generation = index.generation.0;
        self.root = hex(&index.root());
        self.workspace_bytes = index.total_bytes();
    }

    /// A generation was planned by a scan that started at `scan_start_ns`: its content is now
    /// pending, and if nothing was pending before, the oldest pending change dates from then.
    pub(super) fn planned(&mut self, plan: &Plan, scan_start_ns: i64) {
        self.pending_bytes = content_bytes(plan);
        if !plan.is_empty() && self.oldest_pending_unix_ms.is_none() {
            self.oldest_pending_unix_ms = Some((scan_start_ns / 1_000_000) as u64);
        }
    }

    /// A generation became durable on the receiver; `deferred_bytes` of content wait for the
    /// next one (files that changed while read are found again by the next scan).
    pub(super) fn durable(&mut self, report: &Report, deferred_bytes: u64) {
        self.root = report.root.clone();
        self.workspace_bytes = report.bytes_total + deferred_bytes;
        self.last_durable_generation = report.generation;
        self.last_durable_unix_ms = unix_ms(SystemTime::now());
        self.generations += 1;
        self.bytes_sent_total += report.bytes_sent;
        self.last_sync_ms = report.duration_ms;
        self.pending_bytes = deferred_bytes;
    }
}

/// Bytes of file content a plan reads (and perhaps sends).
fn content_bytes(plan: &Plan) -> u64 {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            Action::Content { stat, .. } => Some(stat.size),
            _ => None,
        })
        .sum()
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
