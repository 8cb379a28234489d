//! Provisioning a replacement machine: attempts, the blocklist, backoff and boot deadlines
//! (Invariant 6, no leaked spend).
//!
//! One attempt at a time lives in `rec.provision`, with the label its machine will carry chosen
//! (and persisted) before the provider is asked, so a coordinator that restarts mid-attempt still
//! recognises the machine. A failed attempt's machine goes to `rec.teardown`, kept until the
//! provider confirms it destroyed; its offer and place are blocklisted for a while. Deadlines
//! and blocklist entries are persisted, so they are wall-clock times (`wall_ms`).

use super::{Action, PairMachine, PairState, refuse};
use crate::proto::state::{Blocked, OwnedMachine, Phase, Provision};
use crate::proto::{EventKind, Role};
use crate::types::Side;

impl PairMachine {
    /// The label of the machine being provisioned, if any.
    pub fn provisioning_label(&self) -> Option<&str> {
        self.rec
            .provision
            .as_ref()
            .and_then(|p| p.machine.as_ref())
            .map(|m| m.label.as_str())
    }

    /// Whether reports from `machine` speak for `side` of this pair: once a side's machine was
    /// created by a provider (or is being provisioned), only that machine does. Anything else
    /// claiming the side (an old GPU coming back) is fenced, not listened to.
    pub fn accepts(&self, side: Side, machine: &str) -> bool {
        if self.provisioning(side) {
            return self.provisioning_label() == Some(machine);
        }
        self.owned(side).as_ref().is_none_or(|o| o.label == machine)
    }

    /// Offers, hosts and zones not to try now.
    pub fn blocked(&self) -> Vec<String> {
        self.rec
            .blocked
            .iter()
            .filter(|b| b.until_unix_ms > self.wall_ms)
            .map(|b| b.key.clone())
            .collect()
    }

    /// Whether a machine for `side` is being provisioned.
    pub(super) fn provisioning(&self, side: Side) -> bool {
        self.rec
            .provision
            .as_ref()
            .is_some_and(|p| p.role() == Role::from(side))
    }

    /// Whether a machine for `side` was created and its agent has not joined yet.
    pub(super) fn booting(&self, side: Side) -> bool {
        self.provisioning(side)
            && self
                .rec
                .provision
                .as_ref()
                .is_some_and(|p| p.phase() == Phase::Boot)
    }

    /// The provider created `label`: watch it by its id and give its agent the boot timeout.
    pub(super) fn on_created(
        &mut self,
        label: String,
        id: String,
        offer: String,
        place: String,
        out: &mut Vec<Action>,
    ) {
        let wall = self.wall_ms;
        let boot = self.policy.boot_timeout.as_millis() as u64;
        if let Some(p) = self.rec.provision.as_mut()
            && let Some(m) = p.machine.as_mut()
            && m.label == label
        {
            m.id = id.clone();
            m.offer = offer;
            m.place = place.clone();
            if p.phase() == Phase::Create {
                p.set_phase(Phase::Boot);
                p.deadline_unix_ms = wall + boot;
            }
            out.push(Action::Persist);
            let place = if place.is_empty() {
                String::new()
            } else {
                format!(", {place}")
            };
            out.push(Action::Warn {
                kind: EventKind::Provisioning,
                message: format!("created {label} (id {id}{place}); waiting for its agent to join"),
            });
        } else if let Some(m) = [&mut self.rec.gpu_owned, &mut self.rec.cpu_owned]
            .into_iter()
            .flatten()
            .chain(self.rec.teardown.iter_mut())
            .find(|m| m.label == label && m.id.is_empty())
        {
            // Its agent joined before the create call returned (a fast boot): the
            // machine is the pair's already and still needs its id to be watched.
            m.id = id;
            m.offer = offer;
            m.place = place;
            out.push(Action::Persist);
        }
    }

    /// Creating `label` failed: block what `block` names and try again after a backoff.
    pub(super) fn on_create_failed(
        &mut self,
        label: &str,
        error: &str,
        block: Vec<String>,
        out: &mut Vec<Action>,
    ) {
        if self.provisioning_label() != Some(label) {
            return;
        }
        for k in block {
            self.block(k, error);
        }
        self.retry(format!("creating {label} failed: {error}"), out);
    }

    /// The provider confirmed `label` destroyed: the teardown intent is done.
    pub(super) fn on_destroyed(&mut self, label: &str, out: &mut Vec<Action>) {
        let before = self.rec.teardown.len();
        self.rec.teardown.retain(|m| m.label != label);
        if self.rec.teardown.len() != before {
            out.push(Action::Persist);
            out.push(Action::Warn {
                kind: EventKind::Destroyed,
                message: format!("machine {label} destroyed"),
            });
        }
    }

    /// An operator asked to recover: provision what is missing, or retry the attempt now.
    pub(super) fn recover(&mut self, out: &mut Vec<Action>) {
        match self.state() {
            PairState::FailedOver | PairState::Hibernated => {
                self.start_provision(Side::Gpu, "recovery requested by an operator".into(), out)
            }
            PairState::Provisioning | PairState::Degraded | PairState::Rebuilding
                if self.rec.provision.is_some() =>
            {
                let p = self.rec.provision.as_mut().expect("checked");
                p.next_try_unix_ms = self.wall_ms;
                out.push(Action::Persist);
                out.push(Action::Warn {
                    kind: EventKind::Provisioning,
                    message: "retrying provisioning now (operator)".into(),
                });
            }
            PairState::Degraded => self.start_provision(
                Side::Cpu,
                "replacing the CPU standby (operator)".into(),
                out,
            ),
            s => refuse(
                out,
                format!("recover refused: the pair is {s}; nothing to recover"),
            ),
        }
    }

    /// Provisioning's part of a tick: start replacing a failed GPU (auto-recover), or give up on a
    /// machine whose agent missed its boot deadline. Returns whether it acted (then nothing
    /// else is decided on this tick).
    pub(super) fn tick_provisioning(&mut self, out: &mut Vec<Action>) -> bool {
        if self.state() == PairState::FailedOver && self.policy.auto_recover && self.policy.provider
        {
            self.start_provision(Side::Gpu, "replacing the failed GPU machine".into(), out);
            return true;
        }
        if let Some(p) = &self.rec.provision
            && p.phase() == Phase::Boot
            && p.deadline_unix_ms > 0
            && self.wall_ms > p.deadline_unix_ms
        {
            let m = p.machine.clone().unwrap_or_default();
            let secs = self.policy.boot_timeout.as_secs();
            self.block(m.offer.clone(), "its machine never joined");
            self.block(m.place.clone(), "a machine there never joined");
            self.retry(format!("{} did not join within {secs} s", m.label), out);
            return true;
        }
        false
    }

    fn block(&mut self, key: String, why: &str) {
        if key.is_empty() {
            return;
        }
        let until = self.wall_ms + self.policy.blocklist_for.as_millis() as u64;
        self.rec.blocked.retain(|b| b.key != key);
        self.rec.blocked.push(Blocked {
            key,
            until_unix_ms: until,
            reason: why.to_string(),
        });
    }

    fn new_label(&mut self, role: Side) -> String {
        self.rec.provisions += 1;
        machine_label(
            &self.policy.label_prefix,
            &self.rec.name,
            role,
            self.rec.provisions,
        )
    }

    /// Starts the first attempt at a machine for `role`: Provisioning for a GPU, Degraded (the
    /// GPU unprotected meanwhile) for a CPU standby.
    pub(super) fn start_provision(&mut self, role: Side, reason: String, out: &mut Vec<Action>) {
        if !self.policy.provider {
            refuse(
                out,
                format!(
                    "cannot provision a {} machine: no provider is configured (start an agent with a join token by hand)",
                    role.as_str()
                ),
            );
            return;
        }
        // The machine it replaces goes (with its disk): an intent kept until confirmed.
        let old = self.owned_mut(role).take();
        self.rec.teardown.extend(old);
        let label = self.new_label(role);
        self.rec.provision = Some(Provision {
            role: Role::from(role).into(),
            attempt: 1,
            phase: Phase::Create.into(),
            machine: Some(OwnedMachine {
                label,
                role: Role::from(role).into(),
                ..Default::default()
            }),
            next_try_unix_ms: self.wall_ms,
            ..Default::default()
        });
        let to = match (role, self.rec.seed_snapshot.is_empty()) {
            (Side::Gpu, _) => PairState::Provisioning,
            (Side::Cpu, true) => PairState::Degraded,
            (Side::Cpu, false) => PairState::Rebuilding,
        };
        out.push(Action::Persist);
        self.go(to, reason, out);
    }

    /// A failed attempt: its machine (if any) is destroyed and the next one tried after a
    /// backoff with jitter.
    pub(super) fn retry(&mut self, why: String, out: &mut Vec<Action>) {
        let Some(mut p) = self.rec.provision.take() else {
            return;
        };
        let role = Side::from_record(p.role());
        if let Some(m) = p.machine.take()
            && (!m.id.is_empty() || p.phase() == Phase::Boot)
        {
            self.rec.teardown.push(m);
        }
        let label = self.new_label(role);
        let wait = self.backoff(p.attempt, &label);
        p.attempt += 1;
        p.set_phase(Phase::Create);
        p.last_error = why.clone();
        p.deadline_unix_ms = 0;
        p.next_try_unix_ms = self.wall_ms + wait.as_millis() as u64;
        p.machine = Some(OwnedMachine {
            label,
            role: Role::from(role).into(),
            ..Default::default()
        });
        self.rec.provision = Some(p);
        out.push(Action::Persist);
        out.push(Action::AttemptFailed);
        out.push(Action::Warn {
            kind: EventKind::Provisioning,
            message: format!("{why}; next attempt in {} ms", wait.as_millis()),
        });
    }

    /// How long to wait after failed attempt number `attempt` before trying `next_label`:
    /// exponential, capped, plus 0-30 % jitter derived from the label, so the machine stays
    /// deterministic.
    fn backoff(&self, attempt: u32, next_label: &str) -> std::time::Duration {
        let exp = attempt.saturating_sub(1).min(16);
        let base = self.policy.backoff_base.saturating_mul(1 << exp);
        let backoff = base.min(self.policy.backoff_max);
        let jitter = blake3::hash(next_label.as_bytes()).as_bytes()[0] as f64 / 255.0 * 0.3;
        backoff.mul_f64(1.0 + jitter)
    }

    /// An agent reported as `label` (the seat's machine was `before`): the machine being
    /// provisioned has joined, or a GPU an operator joined by hand after a failover. A new GPU
    /// is restored onto; a new CPU standby is seeded from the GPU (or, rebuilding, from the
    /// backup).
    pub(super) fn joined(
        &mut self,
        side: Side,
        label: &str,
        before: Option<&str>,
        out: &mut Vec<Action>,
    ) {
        if side == Side::Gpu
            && self.state() == PairState::FailedOver
            && !self.provider_seat(Side::Gpu)
            && before != Some(label)
        {
            // No provider fills the seat: the operator brought this machine with a token (the
            // machine failed over from is revoked, it cannot report).
            self.rec.restore_started_unix_ms = self.wall_ms;
            self.go(
                PairState::Restoring,
                format!("{label} joined by hand; restoring the workspace onto it"),
                out,
            );
            return;
        }
        if !self.provisioning(side) || self.provisioning_label() != Some(label) {
            return;
        }
        let p = self.rec.provision.take().expect("checked");
        *self.owned_mut(side) = p.machine;
        match side {
            Side::Gpu => {
                self.rec.restore_started_unix_ms = self.wall_ms;
                self.go(
                    PairState::Restoring,
                    format!("{label} joined; restoring the workspace onto it"),
                    out,
                );
            }
            Side::Cpu => {
                let from = if self.rec.seed_snapshot.is_empty() {
                    "the GPU".to_string()
                } else {
                    format!("backup snapshot {}", self.rec.seed_snapshot)
                };
                out.push(Action::Persist);
                out.push(Action::Warn {
                    kind: EventKind::Provisioning,
                    message: format!("{label} joined; seeding it from {from}"),
                });
            }
        }
    }
}

/// Longest machine name a certificate can carry (`trust::identity::check_name`).
const MAX_LABEL: usize = 63;

/// `<prefix>-<pair>-<role>-<n>`, the unique label (and machine name) of a provisioned machine.
/// A pair name too long to fit is cut and followed by a hash of the whole name, so labels stay
/// valid machine names and distinct pairs never share one.
pub(crate) fn machine_label(prefix: &str, pair: &str, role: Side, n: u64) -> String {
    let tail = format!("-{}-{n}", role.as_str());
    let room = MAX_LABEL.saturating_sub(prefix.len() + 1 + tail.len());
    if pair.len() <= room {
        return format!("{prefix}-{pair}{tail}");
    }
    let hash = crate::text::hex(&blake3::hash(pair.as_bytes()).as_bytes()[..3]);
    let keep = room.saturating_sub(hash.len() + 1);
    // Pair names are ASCII (`check_name`), so any byte index is a character boundary.
    let cut = pair[..keep.min(pair.len())].trim_end_matches(['-', '.', '_']);
    format!("{prefix}-{cut}-{hash}{tail}")
}
