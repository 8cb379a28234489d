//! An agent's own Prometheus metrics (`--metrics-listen`; ARCHITECTURE.md, "Metrics and
//! alerts"): the figures of each heartbeat report, so a scrape of the agent and the coordinator's
//! per-pair series say the same thing, plus what only the agent knows (bytes sent, the expiry of
//! the certificate it presents now). Updated once per heartbeat, by the link's report.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::proto::AgentReport;

type FGauge = Gauge<f64, AtomicU64>;

/// Who this agent is (`standby_agent_info`, always 1).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabel {
    pub pair: String,
    /// "gpu" or "cpu".
    pub role: String,
    pub machine: String,
    pub version: String,
}

pub struct AgentMetrics {
    registry: Registry,
    info: Family<AgentLabel, Gauge>,
    rpo_age: FGauge,
    pending_bytes: Gauge,
    last_sync: FGauge,
    generation: Gauge,
    epoch: Gauge,
    disk_free: Gauge,
    bytes_sent: Counter,
    /// The sender's own total at the last report: the counter grows by the difference (all of
    /// it when a new sender started again from 0).
    sent_before: Mutex<u64>,
    cert_expiry: Gauge,
}

impl AgentMetrics {
    pub fn new(who: AgentLabel) -> AgentMetrics {
        let mut m = AgentMetrics {
            registry: Registry::default(),
            info: Family::default(),
            rpo_age: FGauge::default(),
            pending_bytes: Gauge::default(),
            last_sync: FGauge::default(),
            generation: Gauge::default(),
            epoch: Gauge::default(),
            disk_free: Gauge::default(),
            bytes_sent: Counter::default(),
            sent_before: Mutex::new(0),
            cert_expiry: Gauge::default(),
        };
        m.info.get_or_create(&who).set(1);
        m.register();
        m
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "standby_agent_info",
            "Always 1; the labels say which pair, role, machine and build this agent is",
            self.info.clone(),
        );
        r.register_with_unit(
            "standby_agent_rpo_age",
            "Age of the oldest change not yet durable on the CPU (0: nothing pending; GPU agent)",
            Unit::Seconds,
            self.rpo_age.clone(),
        );
        r.register_with_unit(
            "standby_agent_pending",
            "Bytes of changed files not yet durable on the CPU (GPU agent)",
            Unit::Bytes,
            self.pending_bytes.clone(),
        );
        r.register_with_unit(
            "standby_agent_last_generation",
            "Duration of the last generation, change seen to durable on the CPU (GPU agent)",
            Unit::Seconds,
            self.last_sync.clone(),
        );
        r.register(
            "standby_agent_generation",
            "The last durable generation this agent holds",
            self.generation.clone(),
        );
        r.register(
            "standby_agent_epoch",
            "The pair's fencing epoch as this agent holds it",
            self.epoch.clone(),
        );
        r.register_with_unit(
            "standby_agent_disk_free",
            "Free bytes on the filesystem of the workspace",
            Unit::Bytes,
            self.disk_free.clone(),
        );
        r.register_with_unit(
            "standby_agent_sent",
            "Sync payload bytes put on the connection to the peer, after compression",
            Unit::Bytes,
            self.bytes_sent.clone(),
        );
        r.register(
            "standby_agent_certificate_expiry_timestamp_seconds",
            "When the certificate this agent presents expires (unix seconds)",
            self.cert_expiry.clone(),
        );
    }

    /// One heartbeat's figures, the sender's running total of bytes sent and the certificate's
    /// expiry.
    pub fn observe(&self, r: &AgentReport, bytes_sent_total: u64, cert_not_after: i64) {
        self.rpo_age.set(r.rpo_age_ms as f64 / 1000.0);
        self.pending_bytes.set(saturate(r.pending_bytes));
        self.last_sync.set(r.last_sync_ms as f64 / 1000.0);
        self.generation.set(saturate(r.generation));
        self.epoch.set(saturate(r.epoch));
        self.disk_free.set(saturate(r.disk_free_bytes));
        self.cert_expiry.set(cert_not_after);
        let mut before = self.sent_before.lock().expect("bytes sent");
        let grew = match bytes_sent_total.checked_sub(*before) {
            Some(d) => d,
            None => bytes_sent_total,
        };
        self.bytes_sent.inc_by(grew);
        *before = bytes_sent_total;
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn saturate(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> AgentLabel {
        AgentLabel {
            pair: "p".into(),
            role: "gpu".into(),
            machine: "m".into(),
            version: "1".into(),
        }
    }

    #[test]
    fn a_report_becomes_gauges_and_bytes_sent_only_grows() {
        let m = AgentMetrics::new(who());
        let r = AgentReport {
            rpo_age_ms: 1500,
            pending_bytes: 4096,
            generation: 7,
            epoch: 2,
            last_sync_ms: 250,
            disk_free_bytes: 1 << 30,
            ..Default::default()
        };
        m.observe(&r, 1000, 1_900_000_000);
        m.observe(&r, 1600, 1_900_000_000);
        // A new sender starts its total again: what it sent still adds up.
        m.observe(&r, 100, 1_900_000_000);
        let text = m.encode();
        for line in [
            "standby_agent_rpo_age_seconds 1.5",
            "standby_agent_pending_bytes 4096",
            "standby_agent_last_generation_seconds 0.25",
            "standby_agent_generation 7",
            "standby_agent_epoch 2",
            "standby_agent_disk_free_bytes 1073741824",
            "standby_agent_sent_bytes_total 1700",
            "standby_agent_certificate_expiry_timestamp_seconds 1900000000",
            "standby_agent_info{pair=\"p\",role=\"gpu\",machine=\"m\",version=\"1\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
