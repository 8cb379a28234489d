//! Moving a recovery along as the agents report: restore onto a new GPU, cutover, hibernation's
//! final sync, the seeding of a new CPU standby, and a rebuild's seed from the backup.
//!
//! Each step is decided only on what both agents report about the same manifest root: a
//! transition never rests on one side's word. Cutover raises the epoch (Invariant 3) in the
//! same persisted write that makes the GPU primary again.

use std::time::Duration;

use super::{Action, PairMachine, PairState};
use crate::proto::{AgentMode, Role};

impl PairMachine {
    /// Moves restore, cutover, hibernation and reseeding along as the agents report.
    pub(super) fn progress(&mut self, out: &mut Vec<Action>) {
        let (g, c) = (&self.seen.gpu.status, &self.seen.cpu.status);
        let same = !c.root.is_empty() && c.root == g.root;
        let epoch = self.rec.epoch;
        match self.state() {
            PairState::Restoring
                if same
                    && c.mode == AgentMode::Send
                    && c.connected
                    && c.pending_bytes == 0
                    && c.rpo_age_ms == 0
                    && g.mode == AgentMode::Receive =>
            {
                self.go(
                    PairState::CuttingOver,
                    "restore verified (manifest roots agree); freezing the CPU for the final catch-up".into(),
                    out,
                );
            }
            PairState::CuttingOver
                if same
                    && c.frozen_epoch >= epoch
                    && c.pending_bytes == 0
                    && g.mode == AgentMode::Receive =>
            {
                self.cut_over(out)
            }
            PairState::Syncing
                if self.rec.hibernate
                    && same
                    && g.frozen_epoch >= epoch
                    && g.pending_bytes == 0
                    && c.mode == AgentMode::Receive =>
            {
                self.hibernated(out)
            }
            PairState::Degraded
                if self.rec.provision.is_none()
                    && same
                    && g.mode == AgentMode::Send
                    && g.connected
                    && g.pending_bytes == 0
                    && c.mode == AgentMode::Receive =>
            {
                self.reseeded(out)
            }
            PairState::Rebuilding if self.seed_in_place() => self.seeded(out),
            _ => {}
        }
    }

    /// The frozen CPU's last changes are on the new GPU: it becomes the primary at a new epoch.
    fn cut_over(&mut self, out: &mut Vec<Action>) {
        self.rec.epoch += 1;
        self.rec.set_primary(Role::Gpu);
        self.rec.restore_started_unix_ms = 0;
        let took = self.recovered(out);
        self.go(
            PairState::Syncing,
            format!(
                "cutover complete: the GPU is primary again at epoch {} ({} ms after the failure)",
                self.rec.epoch,
                took.as_millis()
            ),
            out,
        );
    }

    /// A new CPU standby has caught up with the GPU: the pair is protected again.
    fn reseeded(&mut self, out: &mut Vec<Action>) {
        let took = self.recovered(out);
        self.go(
            PairState::Syncing,
            format!(
                "the new CPU standby holds the workspace ({} ms after the old one was lost)",
                took.as_millis()
            ),
            out,
        );
    }

    /// How long the pair was unprotected (counted in metrics when it had failed over).
    fn recovered(&mut self, out: &mut Vec<Action>) -> Duration {
        let since = std::mem::take(&mut self.rec.failed_over_unix_ms);
        let took = Duration::from_millis(self.wall_ms.saturating_sub(since));
        if since > 0 {
            out.push(Action::Recovered(took));
        }
        took
    }
}
