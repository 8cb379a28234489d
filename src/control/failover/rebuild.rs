//! Rebuilding a pair that lost both machines from its off-site backup (`recover P
//! --from-backup`, ARCHITECTURE.md "Rebuilding from the bucket").
//!
//! The operator's request raises the epoch and makes the CPU side the primary in one persisted
//! write, so neither old machine can ever speak for the pair again (their certificates are
//! revoked as the write retires them). A new CPU standby is provisioned; once it joined it is
//! told to `Seed` its empty replica from the backup at that epoch. When it reports the snapshot
//! in place, a GPU is provisioned and restored onto exactly as after a failover.
//!
//! It is refused while either agent was heard from lately: a live CPU holds newer data than
//! any backup (`recover` without `--from-backup` is the way then), and a live GPU is still the
//! primary.

use std::time::{Duration, Instant};

use super::{Action, PairMachine, PairState, Timing, refuse};
use crate::proto::state::{Loss, Phase};
use crate::proto::{EventKind, Role};
use crate::types::Side;

impl PairMachine {
    /// An operator asked to rebuild the pair from the backup snapshot `snapshot` (`latest` or
    /// an id, checked by the caller).
    pub(super) fn rebuild(
        &mut self,
        snapshot: String,
        now: Instant,
        t: &Timing,
        out: &mut Vec<Action>,
    ) {
        if let Some(why) = self.why_not_rebuild(now, t) {
            refuse(out, format!("recover --from-backup refused: {why}"));
            return;
        }
        self.abandon_attempt();
        self.rec.epoch += 1;
        self.rec.set_primary(Role::Cpu);
        self.rec.hibernate = false;
        self.rec.restore_started_unix_ms = 0;
        self.rec.failed_over_unix_ms = 0;
        self.lost(Loss::Both, Duration::ZERO);
        self.rec.seed_snapshot = snapshot.clone();
        if let Some(gpu) = self.rec.gpu_owned.take() {
            self.rec.teardown.push(gpu);
        }
        self.start_provision(
            Side::Cpu,
            format!(
                "rebuilding from the off-site backup (snapshot {snapshot}) at epoch {}: provisioning a CPU standby to seed",
                self.rec.epoch
            ),
            out,
        );
    }

    /// Why the pair may not be rebuilt now, if it may not.
    fn why_not_rebuild(&self, now: Instant, t: &Timing) -> Option<String> {
        if !self.policy.provider {
            return Some(
                "no provider is configured; restore by hand with `agent-cpu restore-backup` and join the machines with tokens".into(),
            );
        }
        if self.state() == PairState::Rebuilding {
            return Some(
                "the pair is already rebuilding (`recover P` retries a failed attempt now)".into(),
            );
        }
        for side in Side::ALL {
            let heard = self.seen[side]
                .last_seen
                .map(|at| now.saturating_duration_since(at));
            if self.seen[side].connected || heard.is_some_and(|d| d < t.failover_after) {
                let what = match side {
                    Side::Cpu => {
                        "it holds newer data than any backup: use `recover` without --from-backup"
                    }
                    Side::Gpu => "it is alive",
                };
                return Some(format!(
                    "the {} agent was heard from {} ms ago; {what}",
                    side.as_str(),
                    heard.unwrap_or_default().as_millis()
                ));
            }
        }
        None
    }

    /// Ends a provisioning attempt under way without trying again: its machine, if one was
    /// made, goes to the teardown list.
    fn abandon_attempt(&mut self) {
        if let Some(mut p) = self.rec.provision.take()
            && let Some(m) = p.machine.take()
            && (!m.id.is_empty() || p.phase() == Phase::Boot)
        {
            self.rec.teardown.push(m);
        }
    }

    /// The new CPU standby reports the backup snapshot in its replica: it holds the workspace
    /// as the primary, and a GPU is provisioned as after a failover.
    pub(super) fn seeded(&mut self, out: &mut Vec<Action>) {
        let snapshot = self.seen.cpu.status.seeded.clone();
        self.rec.seed_snapshot.clear();
        out.push(Action::Warn {
            kind: EventKind::Provisioning,
            message: format!(
                "the new CPU standby holds backup snapshot {snapshot}; provisioning a GPU"
            ),
        });
        self.start_provision(
            Side::Gpu,
            "rebuilt from the off-site backup: provisioning a GPU".into(),
            out,
        );
    }

    /// Whether the CPU agent reports the seed this rebuild asked for.
    pub(super) fn seed_in_place(&self) -> bool {
        let asked = self.rec.seed_snapshot.as_str();
        let got = self.seen.cpu.status.seeded.as_str();
        self.rec.provision.is_none() && !got.is_empty() && (asked == "latest" || asked == got)
    }

    /// A seed error the CPU agent reports for the first time: worth an event (it retries).
    pub(super) fn seed_trouble(&self, before: &str, out: &mut Vec<Action>) {
        let now = self.seen.cpu.status.seed_error.as_str();
        if self.state() == PairState::Rebuilding && !now.is_empty() && now != before {
            out.push(Action::Warn {
                kind: EventKind::Critical,
                message: format!(
                    "seeding the new CPU standby from the backup failed (it retries): {now}"
                ),
            });
        }
    }
}

#[cfg(test)]
mod tests;
