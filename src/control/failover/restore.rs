//! Moving a recovery along as the agents report: restore onto a new GPU, cutover, hibernation's
//! final sync, the seeding of a new CPU standby, and a rebuild's seed from the backup.
//!
//! Each step is decided only on what both agents report about the same manifest root: a
//! transition never rests on one side's word. Cutover raises the epoch (Invariant 3) in the
//! same persisted write that makes the GPU primary again.

use std::time::Duration;

use super::{Action, PairMachine, PairState};
use crate::proto::state::Loss;
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
                "cutover complete: the GPU is primary again at epoch {}{took}",
                self.rec.epoch
            ),
            out,
        );
    }

    /// A new CPU standby has caught up with the GPU: the pair is protected again.
    fn reseeded(&mut self, out: &mut Vec<Action>) {
        let took = self.recovered(out);
        self.go(
            PairState::Syncing,
            format!("the new CPU standby holds the workspace{took}"),
            out,
        );
    }

    /// The pair is protected again: how long it was not, counted in metrics, and said as
    /// " (N ms after the failure)" ("" when the loss was never timed).
    fn recovered(&mut self, out: &mut Vec<Action>) -> String {
        let at = std::mem::take(&mut self.rec.failed_over_unix_ms);
        let loss = self.rec.loss();
        self.rec.set_loss(Loss::Unspecified);
        if at == 0 {
            return String::new();
        }
        let after = Duration::from_millis(self.wall_ms.saturating_sub(at));
        let since = match loss {
            Loss::Gpu | Loss::Unspecified => "the failure",
            Loss::Standby => "the standby was lost",
            Loss::Hibernation => "the wake",
            Loss::Both => "the rebuild was asked for",
        };
        out.push(Action::Recovered { after, since });
        format!(" ({} ms after {since})", after.as_millis())
    }

    /// The pair lost its protection `ago` before now (the last heartbeat of what failed).
    pub(super) fn lost(&mut self, loss: Loss, ago: Duration) {
        if self.rec.failed_over_unix_ms == 0 {
            self.rec.failed_over_unix_ms = self.wall_ms.saturating_sub(ago.as_millis() as u64);
            self.rec.set_loss(loss);
        }
    }
}

#[cfg(test)]
mod tests;
