//! Hibernation: a GPU released on purpose after a final sync (by an operator, or after the GPU
//! has been idle for `Policy::idle_hibernate_after`), and waking, which is the same recovery path
//! as after a failover.

use std::time::{Duration, Instant};

use super::{Action, PairMachine, PairState, refuse};
use crate::proto::state::Loss;
use crate::proto::{EventKind, Role};
use crate::types::Side;

impl PairMachine {
    /// An operator (or idleness) asked to hibernate: the GPU freezes for a final sync first
    /// (`desired`), and `progress` (restore.rs) completes it once the CPU has everything.
    pub(super) fn hibernate(&mut self, out: &mut Vec<Action>) {
        if self.state() != PairState::Syncing || self.primary() != Side::Gpu {
            refuse(
                out,
                format!(
                    "hibernate refused: the pair is {}, not Syncing",
                    self.state()
                ),
            );
            return;
        }
        if !self.rec.hibernate {
            self.rec.hibernate = true;
            out.push(Action::Persist);
            out.push(Action::Warn {
                kind: EventKind::Hibernate,
                message: "hibernating: the GPU makes a final sync, then its machine is released"
                    .into(),
            });
        }
    }

    /// The frozen GPU's final sync is on the CPU: the CPU holds the workspace at a new epoch and
    /// the GPU machine is released.
    pub(super) fn hibernated(&mut self, out: &mut Vec<Action>) {
        self.rec.epoch += 1;
        self.rec.set_primary(Role::Cpu);
        self.rec.hibernate = false;
        if let Some(o) = self.rec.gpu_owned.take() {
            self.rec.teardown.push(o);
            // Released for good: `pairs` no longer lists it (its agent is fenced meanwhile).
            self.rec.gpu = None;
        }
        self.go(
            PairState::Hibernated,
            format!(
                "hibernated: final sync verified; the GPU machine is released and the CPU holds the workspace at epoch {}",
                self.rec.epoch
            ),
            out,
        );
    }

    /// An operator woke a hibernated pair: provision a GPU and restore onto it.
    pub(super) fn wake(&mut self, out: &mut Vec<Action>) {
        if self.state() == PairState::Hibernated {
            self.lost(Loss::Hibernation, Duration::ZERO);
            self.start_provision(Side::Gpu, "woken by an operator".into(), out);
        } else {
            refuse(
                out,
                format!("wake refused: the pair is {}, not Hibernated", self.state()),
            );
        }
    }

    /// Follows the GPU's reported utilisation: since when it has been idle (0 %).
    pub(super) fn track_idle(&mut self, utilization: Option<u32>, at: Instant) {
        let idle = utilization == Some(0);
        match (idle, self.idle_since) {
            (true, None) => self.idle_since = Some(at),
            (false, _) => self.idle_since = None,
            _ => {}
        }
    }

    /// Hibernates a healthy pair whose GPU has been idle for the policy's time (only with a
    /// provider, which can bring a GPU back).
    pub(super) fn hibernate_if_idle(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.state() == PairState::Syncing
            && !self.rec.hibernate
            && let (Some(after), Some(since)) = (self.policy.idle_hibernate_after, self.idle_since)
            && now.saturating_duration_since(since) >= after
            && self.policy.provider
        {
            self.idle_since = None;
            out.push(Action::Warn {
                kind: EventKind::Hibernate,
                message: format!("the GPU has been idle for {} s", after.as_secs()),
            });
            self.hibernate(out);
        }
    }
}
