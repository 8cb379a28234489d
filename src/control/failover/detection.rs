//! Detection: heartbeats, suspicion, the three-signal confirmation and the failover itself
//! (Invariant 5, no false failover).
//!
//! The three signals are the GPU agent's heartbeats, the CPU agent's own contact with the GPU
//! (its probe, reported in its heartbeats) and the provider's view of the machine. Silence alone
//! only makes the pair Suspect: it fails over when the CPU confirms it cannot reach the GPU
//! either, when the provider reports the machine gone, or at once on a fatal fault the GPU agent
//! reports itself. Silence is never counted from before this coordinator started.

use std::time::{Duration, Instant};

use super::{Action, Contact, PairMachine, PairState, Report, Timing};
use crate::proto::state::{Loss, MachineRecord};
use crate::proto::{EventKind, Role};
use crate::types::Side;

impl PairMachine {
    /// A heartbeat from `side`'s agent: record it, react to what it says, move recovery along.
    pub(super) fn on_report(&mut self, side: Side, r: Report, t: &Timing, out: &mut Vec<Action>) {
        let at = r.at;
        let seed_error = self.seen.cpu.status.seed_error.clone();
        self.hear(side, &r, t);
        if side == Side::Cpu {
            self.seed_trouble(&seed_error, out);
        }
        let joined_label = r.machine.as_ref().map(|m| m.machine.clone());
        let before = self.machine_mut(side).as_ref().map(|m| m.machine.clone());
        if let Some(m) = r.machine {
            self.note_machine(side, m, out);
        }
        self.react(side, r.fatal, out);
        if let Some(label) = joined_label {
            self.joined(side, &label, before.as_deref(), out);
        }
        if side == Side::Gpu {
            self.track_idle(r.status.utilization, at);
        }
        self.progress(out);
    }

    /// What the coordinator now knows of `side`'s agent.
    fn hear(&mut self, side: Side, r: &Report, t: &Timing) {
        let seen = &mut self.seen[side];
        let gap = seen.last_seen.map(|s| r.at.saturating_duration_since(s));
        if gap.is_some_and(|g| g > fresh_for(t)) {
            seen.heard_since = Some(r.at);
        }
        seen.last_seen = Some(r.at);
        seen.connected = true;
        seen.epoch = r.epoch;
        if side == Side::Gpu {
            seen.fatal = r.fatal.clone();
        }
        seen.status = r.status.clone();
        if let Some(p) = r.probe_ok_age {
            seen.contact = Some(Contact {
                probe_ok_age: p,
                reported_at: r.at,
            });
        }
    }

    /// The agent's machine (its address): worth writing, but not before anything else.
    fn note_machine(&mut self, side: Side, m: MachineRecord, out: &mut Vec<Action>) {
        let slot = self.machine_mut(side);
        if slot.as_ref() != Some(&m) {
            *slot = Some(m);
            out.push(Action::PersistSoon);
        }
    }

    /// Transitions a heartbeat causes by itself: a fatal fault, a suspect GPU heard from again, the
    /// second agent of a new pair.
    fn react(&mut self, side: Side, fatal: Option<String>, out: &mut Vec<Action>) {
        match (side, self.state()) {
            (Side::Gpu, _) if fatal.is_some() && self.primary() == Side::Gpu => {
                let why = fatal.unwrap_or_default();
                self.fail_over(
                    format!("GPU agent reported a fatal fault: {why}"),
                    Duration::ZERO,
                    out,
                );
            }
            (Side::Gpu, PairState::Suspect) => {
                self.warned_blind = false;
                self.go(PairState::Syncing, "GPU agent heard from again".into(), out);
            }
            (_, PairState::Pending) if self.rec.gpu.is_some() && self.rec.cpu.is_some() => {
                self.go(PairState::Syncing, "both agents joined".into(), out);
            }
            _ => {}
        }
    }

    /// Recovery's part of a tick: provisioning deadlines, idle hibernation, restore progress.
    fn tick_recovery(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.tick_provisioning(out) {
            return;
        }
        self.hibernate_if_idle(now, out);
        self.progress(out);
    }

    /// An operator asked for a failover: the same failover, but not counted as a detection.
    pub(super) fn on_manual(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.primary() != Side::Gpu {
            out.push(Action::Warn {
                kind: EventKind::Refused,
                message: "failover refused: the CPU is already the primary".into(),
            });
            return;
        }
        let silence = self.gpu_silence(now);
        self.fail_over("failover requested by an operator".into(), silence, out);
        // A deliberate failover is not a detection.
        out.retain(|a| !matches!(a, Action::Detected(_)));
    }

    /// The periodic step: recovery first, then the watch over a GPU primary and its standby.
    pub(super) fn tick(&mut self, now: Instant, t: &Timing, out: &mut Vec<Action>) {
        self.tick_recovery(now, out);
        let state = self.state();
        // A Degraded pair still watches its GPU: a standby that comes back (it kept every
        // acknowledged generation) takes over if the GPU died meanwhile. Not while a new
        // standby is being provisioned or seeded: it does not hold the workspace yet.
        let watching = matches!(state, PairState::Syncing | PairState::Suspect)
            || (state == PairState::Degraded && self.rec.provision.is_none());
        if !watching || self.primary() != Side::Gpu {
            return;
        }
        let silence = self.gpu_silence(now);
        if silence < t.heartbeat * t.suspect_after_missed {
            self.check_standby(now, t, out);
            return;
        }
        if state == PairState::Syncing {
            let why = format!(
                "no heartbeat from the GPU agent for {} ms",
                silence.as_millis()
            );
            self.go(PairState::Suspect, why, out);
        }
        if silence >= t.failover_after {
            self.confirm(now, silence, t, out);
        }
    }

    /// The GPU has been silent long enough to fail over: only if the CPU agent confirms it has
    /// lost the GPU too. Otherwise say once why not.
    ///
    /// A CPU agent heard again after a silence confirms only once it has been heard for
    /// `failover_after`: when a network that cut both agents heals, the CPU's first reports
    /// still carry what it saw during the cut (no contact with the GPU), while the GPU, just as
    /// alive, may still be waiting out its reconnection backoff (up to 2.6 s). Without the wait
    /// such a heal failed over a healthy GPU (`tests/netfaults.rs`, everything cut).
    fn confirm(&mut self, now: Instant, silence: Duration, t: &Timing, out: &mut Vec<Action>) {
        let cpu_fresh = self.cpu_fresh(now, t);
        let cpu_settled = self
            .seen
            .cpu
            .heard_since
            .is_none_or(|since| now.saturating_duration_since(since) >= t.failover_after);
        let cpu_lost_gpu = cpu_fresh
            && self
                .seen
                .cpu
                .contact
                .as_ref()
                .is_some_and(|c| c.lost_for(now).is_none_or(|d| d >= t.failover_after));
        if cpu_lost_gpu && cpu_settled {
            let why = format!(
                "GPU agent silent for {} ms and the CPU agent cannot reach it either",
                silence.as_millis()
            );
            self.fail_over(why, silence, out);
        } else if cpu_lost_gpu {
            // The CPU agent just came back: its word counts in a moment, nothing to say yet.
        } else if !self.warned_blind {
            self.warned_blind = true;
            let message = if cpu_fresh {
                "the coordinator lost sight of the GPU agent, but the CPU agent still reaches it: not failing over".to_string()
            } else {
                "the GPU agent is silent but the CPU agent cannot confirm (it is silent too): not failing over".to_string()
            };
            out.push(Action::Warn {
                kind: EventKind::Blind,
                message,
            });
        }
    }

    /// Silence of the GPU agent as the coordinator sees it (never counting its own downtime).
    pub fn gpu_silence(&self, now: Instant) -> Duration {
        self.silence(Side::Gpu, now)
    }

    /// How long `side`'s agent has not been heard from (coordinator downtime does not count).
    fn silence(&self, side: Side, now: Instant) -> Duration {
        let since = self.seen[side]
            .last_seen
            .map_or(self.started, |t| t.max(self.started));
        now.saturating_duration_since(since)
    }

    /// Whether the CPU agent's last report is recent enough to speak for the GPU.
    fn cpu_fresh(&self, now: Instant, t: &Timing) -> bool {
        self.seen
            .cpu
            .last_seen
            .is_some_and(|s| now.saturating_duration_since(s) <= fresh_for(t))
    }

    /// The GPU is healthy: is its standby? A CPU agent that is silent while the GPU cannot
    /// reach it either leaves the GPU unprotected: the pair is Degraded. A standby the provider
    /// reports gone is replaced by itself (`provider_gone`); one joined by hand (or one the
    /// provider still calls running) waits for it to come back or for `recover P`.
    fn check_standby(&mut self, now: Instant, t: &Timing, out: &mut Vec<Action>) {
        if self.state() != PairState::Syncing
            || self.rec.cpu.is_none()
            || self.rec.provision.is_some()
            || self.rec.hibernate
        {
            return;
        }
        let silence = self.silence(Side::Cpu, now);
        if silence >= t.failover_after
            && !self.seen.cpu.connected
            && !self.seen.gpu.status.connected
        {
            self.lost(Loss::Standby, silence);
            self.go(
                PairState::Degraded,
                "the CPU standby's agent is silent and the GPU cannot reach it: the GPU is unprotected (`recover` provisions a new standby)".into(),
                out,
            );
        }
    }

    /// The provider's signal: a machine of this pair is gone.
    pub(super) fn provider_gone(
        &mut self,
        side: Side,
        now: Instant,
        t: &Timing,
        out: &mut Vec<Action>,
    ) {
        match side {
            Side::Gpu => self.gpu_gone(now, out),
            Side::Cpu => {
                let silence = self.silence(Side::Cpu, now);
                self.cpu_gone(silence, silence >= t.failover_after, out);
            }
        }
    }

    /// The GPU machine is gone: fail over from a primary, retry a booting replacement, or start
    /// over with another when the replacement dies during its restore.
    fn gpu_gone(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.primary() == Side::Gpu && self.rec.cpu.is_some() && !self.rec.hibernate {
            let silence = self.gpu_silence(now);
            self.fail_over(
                "the provider reports the GPU machine gone".into(),
                silence,
                out,
            );
        } else if self.booting(Side::Gpu) {
            self.retry(
                "the new GPU machine is gone before its agent joined".into(),
                out,
            );
        } else if matches!(self.state(), PairState::Restoring | PairState::CuttingOver) {
            self.start_provision(
                Side::Gpu,
                "the provider reports the replacement GPU gone during the restore".into(),
                out,
            );
        }
    }

    /// The CPU machine is gone (`silent`: and its agent too): retry a booting replacement, or
    /// replace a standby that leaves a GPU primary unprotected.
    fn cpu_gone(&mut self, silence: Duration, silent: bool, out: &mut Vec<Action>) {
        if self.provisioning(Side::Cpu) {
            if self.booting(Side::Cpu) {
                self.retry(
                    "the new CPU machine is gone before its agent joined".into(),
                    out,
                );
            }
        } else if self.primary() == Side::Gpu
            && matches!(
                self.state(),
                PairState::Syncing | PairState::Suspect | PairState::Degraded
            )
            && silent
        {
            self.lost(Loss::Standby, silence);
            self.start_provision(
                Side::Cpu,
                "the CPU standby is gone (the provider says so and its agent is silent): the GPU is unprotected".into(),
                out,
            );
        } else if self.primary() == Side::Cpu {
            out.push(Action::Warn {
                kind: EventKind::Critical,
                message: "the provider reports the CPU machine gone while it is the primary".into(),
            });
        }
    }

    /// The CPU becomes the primary. The raised epoch is persisted with the transition, before
    /// any agent is told (Invariant 3).
    pub(super) fn fail_over(&mut self, reason: String, silence: Duration, out: &mut Vec<Action>) {
        if self.rec.cpu.is_none() {
            out.push(Action::Warn {
                kind: EventKind::Refused,
                message: format!("cannot fail over ({reason}): no CPU standby has joined"),
            });
            return;
        }
        self.rec.epoch += 1;
        self.rec.set_primary(Role::Cpu);
        self.lost(Loss::Gpu, silence);
        self.rec.hibernate = false;
        self.warned_blind = false;
        self.go(PairState::FailedOver, reason, out);
        out.push(Action::Detected(silence));
        out.push(Action::FailedOver);
    }
}

/// How old an agent's last report may be and still speak for it: two and a half heartbeats.
fn fresh_for(t: &Timing) -> Duration {
    t.heartbeat * 2 + t.heartbeat / 2
}
