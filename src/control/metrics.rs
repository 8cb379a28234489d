//! The coordinator's Prometheus metrics (OpenMetrics text on `--metrics-listen`).
//!
//! Names are a contract: dashboards and alert rules in `deploy/` use them, and a test checks that
//! every name used there is exported here.

mod leadership;

pub use leadership::{Leadership, LeadershipChange};

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::control::failover::PairState;
use crate::proto::HistoryReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PairLabel {
    pub pair: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PairStateLabel {
    pub pair: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PairSideLabel {
    pub pair: String,
    pub side: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabel {
    pub from: String,
    pub to: String,
}

/// How a provisioning attempt ended: `outcome` is "created" or "failed".
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// Which provider a machine came from ("local", "vastai", "gcp", "command").
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    pub provider: String,
}

/// Which seat of a pair a machine fills: `role` is "gpu" or "cpu" (as in [`CertLabel`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: String,
}

/// What `standby_build_info` says about the running binary.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    pub version: String,
    /// "release" or "debug".
    pub profile: String,
}

impl BuildLabel {
    /// This binary's build.
    pub fn current() -> BuildLabel {
        BuildLabel {
            version: env!("CARGO_PKG_VERSION").into(),
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .into(),
        }
    }
}

/// A certificate whose expiry is shown: `kind` (a certificate's kind, the only meaning of that
/// label name in this exposition) is "ca", "server" (the coordinator's own) or "agent" (the
/// newest live certificate of a pair's machine; pair, role and machine are empty for the
/// coordinator's own).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabel {
    pub kind: String,
    pub pair: String,
    pub role: String,
    pub machine: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// A `[[notify]]` webhook (its `name`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabel {
    pub webhook: String,
}

/// How a notice ended at a webhook: `delivered`, `rejected` (a 4xx) or `failed` (retries spent).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookOutcomeLabel {
    pub webhook: String,
    pub outcome: String,
}

/// Why the coordinator refused an agent (the `reason` of `standby_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A revoked certificate (its machine was retired).
    Revoked,
    /// A report or a join for another machine than the certificate's or the token's.
    WrongMachine,
    /// A join token already used or spent (its attempt was torn down).
    TokenSpent,
    /// A join token that does not verify (altered, expired, another CA or role).
    BadToken,
    /// An expired certificate (in the renewal grace) asked for more than a renewal.
    Expired,
    /// A renewal for a machine that no longer holds its seat.
    NotSeated,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::Revoked,
        Refusal::WrongMachine,
        Refusal::TokenSpent,
        Refusal::BadToken,
        Refusal::Expired,
        Refusal::NotSeated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Revoked => "revoked",
            Refusal::WrongMachine => "wrong_machine",
            Refusal::TokenSpent => "token_spent",
            Refusal::BadToken => "bad_token",
            Refusal::Expired => "expired",
            Refusal::NotSeated => "not_seated",
        }
    }
}

type FGauge = Gauge<f64, AtomicU64>;

/// Registers metrics and remembers the names they are exposed under (a family with no series
/// yet does not appear in the exposition at all).
struct Reg<'a> {
    r: &'a mut Registry,
    names: Vec<String>,
}

impl Reg<'_> {
    fn exposed<M: prometheus_client::metrics::TypedMetric>(name: &str) -> String {
        use prometheus_client::metrics::MetricType;
        match M::TYPE {
            MetricType::Counter => format!("{name}_total"),
            _ => name.to_string(),
        }
    }

    fn plain<M>(&mut self, name: &str, help: &str, m: M)
    where
        M: prometheus_client::registry::Metric + prometheus_client::metrics::TypedMetric,
    {
        self.names.push(Self::exposed::<M>(name));
        self.r.register(name, help, m);
    }

    fn unit<M>(&mut self, name: &str, help: &str, unit: Unit, m: M)
    where
        M: prometheus_client::registry::Metric + prometheus_client::metrics::TypedMetric,
    {
        self.names
            .push(Self::exposed::<M>(&format!("{name}_{}", unit.as_str())));
        self.r.register_with_unit(name, help, unit, m);
    }
}

pub struct Metrics {
    registry: Mutex<Registry>,
    names: Vec<String>,
    pub pair_state: Family<PairStateLabel, Gauge>,
    pub pair_epoch: Family<PairLabel, Gauge>,
    pub pair_protected: Family<PairLabel, Gauge>,
    pub replication_lag: Family<PairLabel, FGauge>,
    pub rpo_age: Family<PairLabel, FGauge>,
    pub pending_bytes: Family<PairLabel, Gauge>,
    pub last_durable_generation: Family<PairLabel, Gauge>,
    pub heartbeat_age: Family<PairSideLabel, FGauge>,
    pub failovers: Family<PairLabel, Counter>,
    pub detect_seconds: Histogram,
    pub blind: Family<PairLabel, Counter>,
    pub transitions: Family<TransitionLabel, Counter>,
    pub agents_connected: Gauge,
    pub heartbeats: Counter,
    /// How far the engine's detection time is behind the wall clock (its queue).
    pub engine_behind: FGauge,
    pub pairs: Gauge,
    pub restore_progress: Family<PairLabel, FGauge>,
    pub disk_free: Family<PairSideLabel, Gauge>,
    pub build_info: Family<BuildLabel, Gauge>,
    pub provisioning_attempts: Family<OutcomeLabel, Counter>,
    pub orphans_destroyed: Family<ProviderLabel, Counter>,
    pub machines: Family<RoleLabel, Gauge>,
    pub recovery_seconds: Histogram,
    pub cert_expiry: Family<CertLabel, Gauge>,
    /// The agent series last set (a machine no longer listed loses its series).
    agent_certs: Mutex<Vec<CertLabel>>,
    pub cert_lifetime: Gauge,
    pub refused: Family<ReasonLabel, Counter>,
    pub history_snapshots: Family<PairLabel, Gauge>,
    pub history_stored: Family<PairLabel, Gauge>,
    pub history_logical: Family<PairLabel, Gauge>,
    pub history_newest: Family<PairLabel, Gauge>,
    pub history_record_failures: Family<PairLabel, Counter>,
    pub backup_newest: Family<PairLabel, Gauge>,
    pub backup_uploaded: Family<PairLabel, Counter>,
    pub backup_failures: Family<PairLabel, Counter>,
    pub notifications: Family<WebhookOutcomeLabel, Counter>,
    pub notifications_dropped: Family<WebhookLabel, Counter>,
    /// Leadership and etcd (`serve --store etcd`).
    pub leadership: Leadership,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            pair_state: Family::default(),
            pair_epoch: Family::default(),
            pair_protected: Family::default(),
            replication_lag: Family::default(),
            rpo_age: Family::default(),
            pending_bytes: Family::default(),
            last_durable_generation: Family::default(),
            heartbeat_age: Family::default(),
            failovers: Family::default(),
            detect_seconds: Histogram::new([0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0, 60.0]),
            blind: Family::default(),
            transitions: Family::default(),
            agents_connected: Gauge::default(),
            heartbeats: Counter::default(),
            engine_behind: FGauge::default(),
            pairs: Gauge::default(),
            restore_progress: Family::default(),
            disk_free: Family::default(),
            build_info: Family::default(),
            provisioning_attempts: Family::default(),
            orphans_destroyed: Family::default(),
            machines: Family::default(),
            recovery_seconds: Histogram::new([
                10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0,
            ]),
            cert_expiry: Family::default(),
            agent_certs: Mutex::new(Vec::new()),
            cert_lifetime: Gauge::default(),
            refused: Family::default(),
            history_snapshots: Family::default(),
            history_stored: Family::default(),
            history_logical: Family::default(),
            history_newest: Family::default(),
            history_record_failures: Family::default(),
            backup_newest: Family::default(),
            backup_uploaded: Family::default(),
            backup_failures: Family::default(),
            notifications: Family::default(),
            notifications_dropped: Family::default(),
            leadership: Leadership::new(),
            registry: Mutex::new(Registry::default()),
            names: Vec::new(),
        };
        let mut r = Registry::default();
        let mut reg = Reg {
            r: &mut r,
            names: Vec::new(),
        };
        m.register_pairs(&mut reg);
        m.register_failover(&mut reg);
        m.register_fleet(&mut reg);
        m.register_trust(&mut reg);
        m.register_history(&mut reg);
        m.register_notify(&mut reg);
        m.leadership.register(&mut reg);
        m.names = reg.names;
        *m.registry.get_mut().expect("registry") = r;
        m.build_info.get_or_create(&BuildLabel::current()).set(1);
        // Every reason exists at 0, so a first refusal is a rise `increase()` sees.
        for why in Refusal::ALL {
            let _ = m.refused.get_or_create(&ReasonLabel {
                reason: why.as_str().into(),
            });
        }
        m
    }

    /// Per pair: its state, epoch, protection and replication figures.
    fn register_pairs(&self, reg: &mut Reg<'_>) {
        reg.plain(
            "standby_pair_state",
            "1 for the pair's current state (Syncing, Suspect, FailedOver, ...)",
            self.pair_state.clone(),
        );
        reg.plain(
            "standby_pair_epoch",
            "The pair's fencing epoch",
            self.pair_epoch.clone(),
        );
        reg.plain(
            "standby_pair_protected",
            "1 when a durable, verified copy of the primary exists on the other machine (Syncing)",
            self.pair_protected.clone(),
        );
        reg.unit(
            "standby_pair_replication_lag",
            "Duration of the GPU agent's last generation (change seen to durable on the CPU)",
            Unit::Seconds,
            self.replication_lag.clone(),
        );
        reg.unit(
            "standby_pair_rpo_age",
            "Age of the oldest change not yet durable on the CPU (0: nothing pending)",
            Unit::Seconds,
            self.rpo_age.clone(),
        );
        reg.unit(
            "standby_pair_pending",
            "Bytes of changed files not yet durable on the CPU",
            Unit::Bytes,
            self.pending_bytes.clone(),
        );
        reg.plain(
            "standby_pair_last_durable_generation",
            "Last generation acknowledged durable by the CPU",
            self.last_durable_generation.clone(),
        );
        reg.unit(
            "standby_pair_heartbeat_age",
            "Time since the coordinator last heard from the agent",
            Unit::Seconds,
            self.heartbeat_age.clone(),
        );
        reg.unit(
            "standby_pair_disk_free",
            "Free bytes on the filesystem of the agent's workspace, as it last reported",
            Unit::Bytes,
            self.disk_free.clone(),
        );
    }

    /// Failovers and what led to them.
    fn register_failover(&self, reg: &mut Reg<'_>) {
        reg.plain(
            "standby_failovers",
            "Failovers performed",
            self.failovers.clone(),
        );
        reg.unit(
            "standby_time_to_detect",
            "From the GPU agent's last heartbeat to the failover decision",
            Unit::Seconds,
            self.detect_seconds.clone(),
        );
        reg.plain(
            "standby_coordinator_blind",
            "Times the coordinator lost sight of a GPU agent that its CPU agent still reached",
            self.blind.clone(),
        );
        reg.plain(
            "standby_pair_transitions",
            "State transitions",
            self.transitions.clone(),
        );
    }

    /// `[[notify]]` webhooks (ARCHITECTURE.md, "Notifications").
    fn register_notify(&self, reg: &mut Reg<'_>) {
        reg.plain(
            "standby_notifications",
            "Notices that reached an end at a webhook, by outcome (delivered, rejected, failed)",
            self.notifications.clone(),
        );
        reg.plain(
            "standby_notifications_dropped",
            "Notices dropped unsent because the webhook's queue was full",
            self.notifications_dropped.clone(),
        );
    }

    /// The standbys' history and backups (ARCHITECTURE.md, "History").
    fn register_history(&self, reg: &mut Reg<'_>) {
        reg.plain(
            "standby_history_snapshots",
            "Snapshots the CPU standby keeps",
            self.history_snapshots.clone(),
        );
        reg.unit(
            "standby_history_stored",
            "Bytes of the standby's snapshot store on disk (after deduplication and compression)",
            Unit::Bytes,
            self.history_stored.clone(),
        );
        reg.unit(
            "standby_history_logical",
            "Bytes of the snapshots kept, counted in full (logical / stored is the dedup ratio)",
            Unit::Bytes,
            self.history_logical.clone(),
        );
        reg.plain(
            "standby_history_newest_snapshot_timestamp_seconds",
            "When the newest snapshot on the standby was taken (unix seconds)",
            self.history_newest.clone(),
        );
        reg.plain(
            "standby_history_record_failures",
            "Snapshots the standby failed to record",
            self.history_record_failures.clone(),
        );
        reg.plain(
            "standby_backup_newest_snapshot_timestamp_seconds",
            "When the newest snapshot in the off-site bucket was taken (unix seconds); only for pairs with a backup",
            self.backup_newest.clone(),
        );
        reg.unit(
            "standby_backup_uploaded",
            "Bytes uploaded to the off-site bucket",
            Unit::Bytes,
            self.backup_uploaded.clone(),
        );
        reg.plain(
            "standby_backup_failures",
            "Failed uploads to the off-site bucket",
            self.backup_failures.clone(),
        );
    }

    /// A standby's history report; the counters grow by what grew since the previous report
    /// (all of it after an agent restart, whose own counts start again at zero).
    pub fn history(&self, pair: &str, before: Option<&HistoryReport>, h: &HistoryReport) {
        let l = PairLabel { pair: pair.into() };
        self.history_snapshots
            .get_or_create(&l)
            .set(h.snapshots as i64);
        self.history_stored
            .get_or_create(&l)
            .set(h.stored_bytes as i64);
        self.history_logical
            .get_or_create(&l)
            .set(h.logical_bytes as i64);
        self.history_newest
            .get_or_create(&l)
            .set(h.newest_snapshot_unix_ms / 1000);
        let grew = |now: u64, was: Option<u64>| match was {
            Some(w) if w <= now => now - w,
            _ => now,
        };
        let b = before;
        self.history_record_failures
            .get_or_create(&l)
            .inc_by(grew(h.record_failures, b.map(|b| b.record_failures)));
        if h.backup_configured {
            self.backup_newest
                .get_or_create(&l)
                .set(h.newest_backup_unix_ms / 1000);
            self.backup_uploaded.get_or_create(&l).inc_by(grew(
                h.backup_uploaded_bytes,
                b.map(|b| b.backup_uploaded_bytes),
            ));
            self.backup_failures
                .get_or_create(&l)
                .inc_by(grew(h.backup_failures, b.map(|b| b.backup_failures)));
        } else {
            // A standby whose backup was turned off: its last bucket time would otherwise stay
            // and look like a backup falling further behind (StandbyBackupLagging).
            self.backup_newest.remove(&l);
        }
    }

    /// Certificates and refusals (ARCHITECTURE.md, "Trust").
    fn register_trust(&self, reg: &mut Reg<'_>) {
        reg.plain(
            "standby_certificate_expiry_timestamp_seconds",
            "When a certificate expires (unix seconds): the CA's, the server's, and each machine's newest",
            self.cert_expiry.clone(),
        );
        reg.unit(
            "standby_certificate_lifetime",
            "The lifetime of the certificates issued to agents (--cert-lifetime)",
            Unit::Seconds,
            self.cert_lifetime.clone(),
        );
        reg.plain(
            "standby_refused",
            "Agents refused, by reason (revoked, wrong_machine, token_spent, ...)",
            self.refused.clone(),
        );
    }

    /// The agents' certificate expiries: exactly these series (kind "agent").
    pub fn set_agent_expiries(&self, rows: Vec<(CertLabel, i64)>) {
        let mut last = self.agent_certs.lock().expect("agent certs");
        for l in last.iter() {
            if !rows.iter().any(|(r, _)| r == l) {
                self.cert_expiry.remove(l);
            }
        }
        for (l, v) in &rows {
            self.cert_expiry.get_or_create(l).set(*v);
        }
        *last = rows.into_iter().map(|(l, _)| l).collect();
    }

    /// Counts one refusal.
    pub fn refuse(&self, why: Refusal) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: why.as_str().into(),
            })
            .inc();
    }

    /// The coordinator's agents, pairs and provider machines.
    fn register_fleet(&self, reg: &mut Reg<'_>) {
        reg.plain(
            "standby_agents_connected",
            "Agents with an open heartbeat stream",
            self.agents_connected.clone(),
        );
        reg.plain(
            "standby_heartbeats",
            "Heartbeats received",
            self.heartbeats.clone(),
        );
        reg.plain(
            "standby_pairs",
            "Pairs known to the coordinator",
            self.pairs.clone(),
        );
        reg.unit(
            "standby_engine_behind",
            "How far the engine's detection time is behind the clock: inputs waiting in its queue",
            Unit::Seconds,
            self.engine_behind.clone(),
        );
        reg.unit(
            "standby_pair_restore_progress",
            "Fraction of the replica restored to a new GPU (0 to 1)",
            Unit::Other("ratio".into()),
            self.restore_progress.clone(),
        );
        reg.plain(
            "standby_build_info",
            "Always 1; the labels say which coordinator build is running",
            self.build_info.clone(),
        );
        reg.plain(
            "standby_provisioning_attempts",
            "Machine creations attempted, by outcome (created, failed)",
            self.provisioning_attempts.clone(),
        );
        reg.plain(
            "standby_orphans_destroyed",
            "Machines destroyed because no pair owned them, by provider",
            self.orphans_destroyed.clone(),
        );
        reg.plain(
            "standby_machines",
            "Provider machines the coordinator owns or is creating or destroying, by role (gpu, cpu)",
            self.machines.clone(),
        );
        reg.unit(
            "standby_recovery",
            "From a failover (or hibernation, or a lost CPU) to the pair being protected again",
            Unit::Seconds,
            self.recovery_seconds.clone(),
        );
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().expect("registry");
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }

    /// A pair the coordinator knows (created, or loaded at start-up): its counters exist from
    /// now on at 0, so the first failover is a rise from 0 that `increase()` sees, rather than
    /// a series born at 1 (ARCHITECTURE.md, "Metrics and alerts").
    pub fn pair_known(&self, pair: &str) {
        let l = PairLabel { pair: pair.into() };
        let _ = self.failovers.get_or_create(&l);
    }

    /// The free bytes an agent reported for its workspace's filesystem.
    pub fn set_disk_free(&self, pair: &str, side: &str, bytes: u64) {
        let l = PairSideLabel {
            pair: pair.into(),
            side: side.into(),
        };
        self.disk_free
            .get_or_create(&l)
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Marks `state` as the pair's current state (and clears the previous one).
    pub fn set_state(&self, pair: &str, prev: Option<PairState>, state: PairState) {
        if let Some(p) = prev {
            self.pair_state.remove(&PairStateLabel {
                pair: pair.into(),
                state: p.as_str().into(),
            });
        }
        self.pair_state
            .get_or_create(&PairStateLabel {
                pair: pair.into(),
                state: state.as_str().into(),
            })
            .set(1);
        self.pair_protected
            .get_or_create(&PairLabel { pair: pair.into() })
            .set((state == PairState::Syncing) as i64);
    }

    /// Every metric name this exports, as it appears in the exposition (histograms also
    /// export `_bucket`, `_sum` and `_count` series).
    pub fn names() -> Vec<String> {
        Metrics::new().names
    }
}

/// Serves `/metrics` until `shutdown` (OpenMetrics to Prometheus, the 0.0.4 text format to
/// other clients: `crate::exposition`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    crate::exposition::serve(listener, move || metrics.encode(), shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_pair_counts_zero_failovers_and_every_refusal_reason_exists() {
        let m = Metrics::new();
        m.pair_known("p");
        let text = m.encode();
        assert!(
            text.contains("standby_failovers_total{pair=\"p\"} 0\n"),
            "{text}"
        );
        for why in Refusal::ALL {
            let line = format!("standby_refused_total{{reason=\"{}\"}} 0\n", why.as_str());
            assert!(text.contains(&line), "{text}");
        }
        assert!(text.contains("standby_build_info{version=\""), "{text}");
    }

    #[test]
    fn a_standby_that_turns_its_backup_off_loses_its_bucket_gauge() {
        let m = Metrics::new();
        let on = HistoryReport {
            newest_snapshot_unix_ms: 2_000_000,
            backup_configured: true,
            newest_backup_unix_ms: 1_000_000,
            ..Default::default()
        };
        m.history("p", None, &on);
        assert!(
            m.encode()
                .contains("standby_backup_newest_snapshot_timestamp_seconds{pair=\"p\"} 1000")
        );
        let off = HistoryReport {
            backup_configured: false,
            ..on.clone()
        };
        m.history("p", Some(&on), &off);
        let text = m.encode();
        assert!(
            !text.contains("standby_backup_newest_snapshot_timestamp_seconds{"),
            "{text}"
        );
        // The standby's own figures stay.
        assert!(
            text.contains("standby_history_newest_snapshot_timestamp_seconds{pair=\"p\"} 2000"),
            "{text}"
        );
    }

    #[test]
    fn kind_is_only_a_certificates_kind() {
        let m = Metrics::new();
        let _ = m.machines.get_or_create(&RoleLabel { role: "gpu".into() });
        let _ = m.provisioning_attempts.get_or_create(&OutcomeLabel {
            outcome: "created".into(),
        });
        let _ = m.orphans_destroyed.get_or_create(&ProviderLabel {
            provider: "local".into(),
        });
        m.set_disk_free("p", "cpu", 5);
        let text = m.encode();
        for line in text.lines().filter(|l| l.contains("kind=")) {
            assert!(
                line.starts_with("standby_certificate_expiry_timestamp_seconds{"),
                "{line}"
            );
        }
        assert!(
            text.contains("standby_pair_disk_free_bytes{pair=\"p\",side=\"cpu\"} 5"),
            "{text}"
        );
    }

    #[test]
    fn exposition_has_the_contract_names() {
        let m = Metrics::new();
        m.set_state("p", None, PairState::Syncing);
        m.set_state("p", Some(PairState::Syncing), PairState::FailedOver);
        m.failovers
            .get_or_create(&PairLabel { pair: "p".into() })
            .inc();
        m.detect_seconds.observe(3.2);
        let text = m.encode();
        assert!(
            text.contains("standby_pair_state{pair=\"p\",state=\"FailedOver\"} 1"),
            "{text}"
        );
        assert!(!text.contains("state=\"Syncing\""), "{text}");
        assert!(
            text.contains("standby_failovers_total{pair=\"p\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("standby_time_to_detect_seconds_bucket"),
            "{text}"
        );
        let names = Metrics::names();
        for n in [
            "standby_pair_restore_progress_ratio",
            "standby_pair_disk_free_bytes",
            "standby_build_info",
            "standby_pair_rpo_age_seconds",
            "standby_pair_heartbeat_age_seconds",
            "standby_failovers_total",
            "standby_pair_pending_bytes",
            "standby_time_to_detect_seconds",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} not in {names:?}");
        }
    }
}
