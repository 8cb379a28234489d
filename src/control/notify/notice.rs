//! What a notification says: one of six kinds of news about a pair, taken from the actions
//! the pair's state machine returned (ARCHITECTURE.md, "Notifications").

use serde::{Deserialize, Serialize};

use crate::control::failover::{Action, PairState};

/// The news a webhook can subscribe to (`events = [...]` in `[[notify]]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// The CPU standby became the primary: the GPU machine failed.
    Failover,
    /// The CPU standby is lost: the GPU is unprotected.
    Degraded,
    /// The pair is protected again (cutover onto a new GPU, or a standby back or replaced).
    Recovered,
    /// The GPU machine was released on purpose; the CPU holds the workspace.
    Hibernated,
    /// A hibernated pair is getting a GPU again.
    Woken,
    /// An attempt at a replacement machine failed; the next one follows after a backoff.
    ProvisioningFailed,
}

impl NoticeKind {
    pub const ALL: [NoticeKind; 6] = [
        NoticeKind::Failover,
        NoticeKind::Degraded,
        NoticeKind::Recovered,
        NoticeKind::Hibernated,
        NoticeKind::Woken,
        NoticeKind::ProvisioningFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::Failover => "failover",
            NoticeKind::Degraded => "degraded",
            NoticeKind::Recovered => "recovered",
            NoticeKind::Hibernated => "hibernated",
            NoticeKind::Woken => "woken",
            NoticeKind::ProvisioningFailed => "provisioning_failed",
        }
    }

    /// Whether this news ends what an earlier one began (PagerDuty resolves the incident).
    pub fn resolves(self) -> bool {
        self == NoticeKind::Recovered
    }

    /// The kind of news an action of the state machine is, if any. A failover is told by
    /// `FailedOver` (not its transition, so it is told once); being protected again by the
    /// transition into Syncing from CuttingOver or Degraded (a Suspect pair whose GPU came back
    /// never stopped being protected; a new pair was never unprotected).
    pub fn of(action: &Action) -> Option<NoticeKind> {
        match action {
            Action::FailedOver => Some(NoticeKind::Failover),
            Action::AttemptFailed => Some(NoticeKind::ProvisioningFailed),
            Action::Transition { from, to, .. } => match (from, to) {
                // Both machines lost (a rebuild from the backup) is unprotected too.
                (_, PairState::Degraded | PairState::Rebuilding) => Some(NoticeKind::Degraded),
                (_, PairState::Hibernated) => Some(NoticeKind::Hibernated),
                (PairState::Hibernated, _) => Some(NoticeKind::Woken),
                (PairState::CuttingOver | PairState::Degraded, PairState::Syncing) => {
                    Some(NoticeKind::Recovered)
                }
                _ => None,
            },
            _ => None,
        }
    }
}

impl std::fmt::Display for NoticeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One piece of news about one pair, as the engine hands it over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// Random, the same for every webhook and every retry: receivers deduplicate by it.
    pub id: String,
    pub pair: String,
    pub kind: NoticeKind,
    /// The pair's epoch after the news (a failover's new epoch).
    pub epoch: u64,
    /// When the coordinator decided it (unix ms).
    pub unix_ms: u64,
    /// The event's own sentence (why it failed over, what failed).
    pub text: String,
}

impl Notice {
    pub fn new(pair: &str, kind: NoticeKind, epoch: u64, unix_ms: u64, text: String) -> Notice {
        Notice {
            id: crate::text::hex(&rand::random::<[u8; 16]>()),
            pair: pair.to_string(),
            kind,
            epoch,
            unix_ms,
            text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(from: PairState, to: PairState) -> Action {
        Action::Transition {
            from,
            to,
            reason: String::new(),
        }
    }

    #[test]
    fn actions_map_to_the_news_they_are() {
        use PairState::*;
        let cases = [
            (Action::FailedOver, Some(NoticeKind::Failover)),
            (Action::AttemptFailed, Some(NoticeKind::ProvisioningFailed)),
            (t(Syncing, Degraded), Some(NoticeKind::Degraded)),
            (t(Syncing, Hibernated), Some(NoticeKind::Hibernated)),
            (t(Hibernated, Provisioning), Some(NoticeKind::Woken)),
            (t(CuttingOver, Syncing), Some(NoticeKind::Recovered)),
            (t(Degraded, Syncing), Some(NoticeKind::Recovered)),
            // Not news: a GPU that came back before failover, a new pair, the steps between.
            (t(Suspect, Syncing), None),
            (t(Pending, Syncing), None),
            (t(Syncing, FailedOver), None),
            (t(FailedOver, Provisioning), None),
            (t(Provisioning, Restoring), None),
            (Action::Persist, None),
            (
                Action::Recovered {
                    after: std::time::Duration::from_secs(1),
                    since: "the failure",
                },
                None,
            ),
        ];
        for (a, want) in cases {
            assert_eq!(NoticeKind::of(&a), want, "{a:?}");
        }
    }

    #[test]
    fn kinds_are_spelled_as_in_the_configuration() {
        for k in NoticeKind::ALL {
            let v: NoticeKind =
                serde_json::from_value(serde_json::Value::String(k.as_str().into())).unwrap();
            assert_eq!(v, k);
        }
        assert!(serde_json::from_str::<NoticeKind>("\"failed_over\"").is_err());
    }
}
