//! Leadership among highly available coordinators, and etcd's latency (ARCHITECTURE.md,
//! "Highly available coordinators" and "Metrics and alerts").
//!
//! A follower serves these too (its `/metrics` is up before it campaigns), so "no leader" is
//! `max(standby_coordinator_leader) < 1` over the coordinators Prometheus scrapes, not only the
//! absence of the leader's series. The file store's single coordinator always leads (term 0).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;

use super::Reg;

/// How leadership changed, as this coordinator saw it (`change`, the only meaning of that label
/// name in this exposition).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeadershipChange {
    /// This coordinator won an election and leads.
    Won,
    /// A follower saw a new leader (another coordinator, a new term).
    Followed,
    /// This coordinator stopped leading: its deadline passed, it was deposed, or it was stopped.
    SteppedDown,
}

impl LeadershipChange {
    pub const ALL: [LeadershipChange; 3] = [
        LeadershipChange::Won,
        LeadershipChange::Followed,
        LeadershipChange::SteppedDown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LeadershipChange::Won => "won",
            LeadershipChange::Followed => "followed",
            LeadershipChange::SteppedDown => "stepped_down",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabel {
    pub change: String,
}

pub struct Leadership {
    pub changes: Family<ChangeLabel, Counter>,
    /// 1 while this coordinator leads.
    pub leader: Gauge,
    /// The term of the leader this coordinator knows (its own while it leads).
    pub term: Gauge,
    /// Each request the etcd store makes, answered or not (not the lease's renewals).
    pub etcd_latency: Histogram,
}

impl Leadership {
    pub(super) fn new() -> Leadership {
        let l = Leadership {
            changes: Family::default(),
            leader: Gauge::default(),
            term: Gauge::default(),
            etcd_latency: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        };
        // Born at 0, so the first change is a rise `increase()` sees.
        for c in LeadershipChange::ALL {
            let _ = l.changes.get_or_create(&ChangeLabel {
                change: c.as_str().into(),
            });
        }
        l
    }

    pub(super) fn register(&self, reg: &mut Reg<'_>) {
        reg.plain(
            "standby_coordinator_leader",
            "1 while this coordinator leads (the file store's coordinator always does)",
            self.leader.clone(),
        );
        reg.plain(
            "standby_coordinator_term",
            "The term of the leader this coordinator knows (its own while it leads; 0: none, or the file store)",
            self.term.clone(),
        );
        reg.plain(
            "standby_coordinator_leadership_changes",
            "Leadership changes this coordinator saw, by change (won, followed, stepped_down)",
            self.changes.clone(),
        );
        reg.unit(
            "standby_etcd_request_duration",
            "Duration of each request of the etcd store (reads, guarded writes, campaigns)",
            Unit::Seconds,
            self.etcd_latency.clone(),
        );
    }

    /// Counts a change and sets the gauges: leading in `term`, or following the leader of
    /// `term` (0: none known).
    pub fn changed(&self, change: LeadershipChange, term: i64) {
        self.changes
            .get_or_create(&ChangeLabel {
                change: change.as_str().into(),
            })
            .inc();
        self.leader.set((change == LeadershipChange::Won) as i64);
        self.term.set(term);
    }
}

#[cfg(test)]
mod tests {
    use super::super::Metrics;
    use super::*;

    /// A follower exports 0 and the followed term, the winner 1 and its own, a leader that
    /// stepped down 0 again; every change is counted under its own label, each born at 0.
    #[test]
    fn changes_set_the_gauges_and_count_under_their_label() {
        let m = Metrics::new();
        let text = m.encode();
        for c in LeadershipChange::ALL {
            let line = format!(
                "standby_coordinator_leadership_changes_total{{change=\"{}\"}} 0",
                c.as_str()
            );
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
        let l = &m.leadership;
        l.changed(LeadershipChange::Followed, 7);
        assert_eq!((l.leader.get(), l.term.get()), (0, 7));
        l.changed(LeadershipChange::Won, 12);
        assert_eq!((l.leader.get(), l.term.get()), (1, 12));
        l.changed(LeadershipChange::SteppedDown, 0);
        assert_eq!((l.leader.get(), l.term.get()), (0, 0));
        let text = m.encode();
        for (c, n) in [("won", 1), ("followed", 1), ("stepped_down", 1)] {
            let line =
                format!("standby_coordinator_leadership_changes_total{{change=\"{c}\"}} {n}");
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
        assert!(text.contains("standby_coordinator_leader 0"), "{text}");
        assert!(
            text.contains("standby_etcd_request_duration_seconds_count 0"),
            "{text}"
        );
        assert!(Metrics::names().contains(&"standby_coordinator_leader".to_string()));
    }
}
