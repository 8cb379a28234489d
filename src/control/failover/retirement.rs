//! Which machines a persisted transition retires (ARCHITECTURE.md, "Trust"): the GPU a pair
//! fails over from (fenced for good: recovery always brings a new machine), a machine put on
//! the teardown list (a failed GPU, a failed attempt, a hibernated GPU), or one replaced in its
//! seat by another — whether a provider created it or it joined by hand — loses its
//! certificates; a provider attempt that ended without its machine holding the seat has its
//! join token spent. Worked out from the record before and after the
//! write, so a coordinator that restarts between the two loses nothing: the engine compares
//! with the last record it wrote.

use super::PairMachine;
use crate::proto::PairState;
use crate::proto::state::{OwnedMachine, PairRecord};
use crate::types::Side;

/// One machine that no longer belongs to the pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retired {
    pub side: Side,
    /// The machine's name (a provider's label).
    pub machine: String,
    pub reason: String,
}

fn owned(rec: &PairRecord, side: Side) -> Option<&OwnedMachine> {
    match side {
        Side::Gpu => rec.gpu_owned.as_ref(),
        Side::Cpu => rec.cpu_owned.as_ref(),
    }
}

/// The machine holding `side`: the one a provider created, else the one that reported for it.
fn seat_machine(rec: &PairRecord, side: Side) -> Option<&str> {
    let reported = match side {
        Side::Gpu => rec.gpu.as_ref(),
        Side::Cpu => rec.cpu.as_ref(),
    };
    owned(rec, side)
        .map(|o| o.label.as_str())
        .or(reported.map(|m| m.machine.as_str()))
        .filter(|m| !m.is_empty())
}

/// Whether the write is the failover itself (the GPU lost the primary role for good).
fn fails_over(before: &PairRecord, after: &PairRecord) -> bool {
    before.state() != PairState::FailedOver && after.state() == PairState::FailedOver
}

/// Whether the write starts a rebuild from the backup (both machines lost for good).
fn starts_rebuild(before: &PairRecord, after: &PairRecord) -> bool {
    before.state() != PairState::Rebuilding && after.state() == PairState::Rebuilding
}

fn attempt_label(rec: &PairRecord) -> Option<(Side, &str)> {
    let p = rec.provision.as_ref()?;
    let m = p.machine.as_ref()?;
    Some((Side::from_record(p.role()), m.label.as_str()))
}

/// The machines retired between `before` and `after` (each once, in a stable order).
pub fn retired(before: &PairRecord, after: &PairRecord) -> Vec<Retired> {
    let mut out: Vec<Retired> = Vec::new();
    let mut add = |side: Side, machine: &str, reason: String| {
        if !out.iter().any(|r| r.machine == machine && r.side == side) {
            out.push(Retired {
                side,
                machine: machine.to_string(),
                reason,
            });
        }
    };
    for t in &after.teardown {
        if !before.teardown.iter().any(|b| b.label == t.label) {
            let side = Side::from_record(t.role());
            add(
                side,
                &t.label,
                format!("{} machine {} torn down", side.as_str(), t.label),
            );
        }
    }
    if fails_over(before, after)
        && let Some(gpu) = seat_machine(before, Side::Gpu)
    {
        add(
            Side::Gpu,
            gpu,
            format!("gpu machine {gpu} failed over from"),
        );
    }
    if starts_rebuild(before, after) {
        for side in Side::ALL {
            if let Some(m) = seat_machine(before, side) {
                add(
                    side,
                    m,
                    format!(
                        "{} machine {m} lost with its pair (rebuilt from the backup)",
                        side.as_str()
                    ),
                );
            }
        }
    }
    for side in Side::ALL {
        if let (Some(b), Some(a)) = (seat_machine(before, side), seat_machine(after, side))
            && b != a
        {
            add(side, b, format!("replaced in its seat by {a}"));
        }
    }
    if let Some((side, label)) = attempt_label(before) {
        let still = attempt_label(after) == Some((side, label))
            || owned(after, side).is_some_and(|o| o.label == label);
        if !still {
            add(side, label, format!("provisioning attempt {label} ended"));
        }
    }
    out
}

impl PairMachine {
    /// Whether `side` is held by a machine a provider created (or is being provisioned): then
    /// the record alone names the machine; otherwise the seat is held by the machine that
    /// joined it last ([`PairMachine::accepts_holding`]).
    pub fn provider_seat(&self, side: Side) -> bool {
        self.provisioning(side) || self.owned(side).is_some()
    }

    /// [`PairMachine::accepts`], and for a seat no provider fills: `machine` is one of the
    /// `holders` (the machines holding a live certificate the coordinator issued for the seat;
    /// none recorded: a pair with static certificates, any machine in the seat).
    pub fn accepts_holding(
        &self,
        side: Side,
        machine: &str,
        holders: &std::collections::BTreeSet<String>,
    ) -> bool {
        if !self.accepts(side, machine) {
            return false;
        }
        self.provider_seat(side) || holders.is_empty() || holders.contains(machine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Role;
    use crate::proto::state::Provision;

    fn m(label: &str, role: Role) -> OwnedMachine {
        OwnedMachine {
            label: label.into(),
            role: role.into(),
            ..Default::default()
        }
    }

    fn attempt(label: &str) -> Option<Provision> {
        Some(Provision {
            role: Role::Gpu.into(),
            machine: Some(m(label, Role::Gpu)),
            ..Default::default()
        })
    }

    /// Some instant to resume a machine at (the parent denies reading the clock).
    #[allow(clippy::disallowed_methods)]
    fn now() -> std::time::Instant {
        std::time::Instant::now()
    }

    fn machines(r: &[Retired]) -> Vec<(&str, Side)> {
        r.iter().map(|r| (r.machine.as_str(), r.side)).collect()
    }

    #[test]
    fn a_failed_gpu_put_on_teardown_is_retired_once() {
        let before = PairRecord {
            gpu_owned: Some(m("g1", Role::Gpu)),
            cpu_owned: Some(m("c1", Role::Cpu)),
            ..Default::default()
        };
        let after = PairRecord {
            cpu_owned: Some(m("c1", Role::Cpu)),
            teardown: vec![m("g1", Role::Gpu)],
            provision: attempt("g2"),
            ..Default::default()
        };
        assert_eq!(machines(&retired(&before, &after)), [("g1", Side::Gpu)]);
        // Written again unchanged: nothing new.
        assert!(retired(&after, &after).is_empty());
    }

    #[test]
    fn a_replaced_seat_and_an_abandoned_attempt_are_retired() {
        let before = PairRecord {
            cpu_owned: Some(m("c1", Role::Cpu)),
            provision: attempt("g2"),
            ..Default::default()
        };
        // The attempt failed before its machine existed: no teardown, but its token is spent.
        let after = PairRecord {
            cpu_owned: Some(m("c2", Role::Cpu)),
            provision: attempt("g3"),
            ..Default::default()
        };
        assert_eq!(
            machines(&retired(&before, &after)),
            [("c1", Side::Cpu), ("g2", Side::Gpu)]
        );
        // The attempt joined and holds the seat: not retired.
        let joined = PairRecord {
            gpu_owned: Some(m("g3", Role::Gpu)),
            cpu_owned: Some(m("c2", Role::Cpu)),
            ..Default::default()
        };
        assert!(retired(&after, &joined).is_empty());
    }

    fn reported(machine: &str) -> Option<crate::proto::state::MachineRecord> {
        Some(crate::proto::state::MachineRecord {
            machine: machine.into(),
            ..Default::default()
        })
    }

    #[test]
    fn the_gpu_failed_over_from_is_retired_even_when_it_joined_by_hand() {
        let before = PairRecord {
            state: PairState::Suspect.into(),
            gpu: reported("vm"),
            cpu: reported("cpu-1"),
            ..Default::default()
        };
        let after = PairRecord {
            state: PairState::FailedOver.into(),
            ..before.clone()
        };
        assert_eq!(machines(&retired(&before, &after)), [("vm", Side::Gpu)]);
        // Provisioning and seating the replacement retire nothing more (vm is gone already,
        // and retiring twice is harmless); the CPU stays.
        let seated = PairRecord {
            state: PairState::Restoring.into(),
            gpu_owned: Some(m("g2", Role::Gpu)),
            ..after.clone()
        };
        assert_eq!(machines(&retired(&after, &seated)), [("vm", Side::Gpu)]);
    }

    #[test]
    fn seats_no_provider_fills_are_held_by_their_holders() {
        let pm = PairMachine::resume(PairRecord::default(), now());
        let none = Default::default();
        let holders: std::collections::BTreeSet<String> = ["g1".to_string()].into();
        assert!(pm.accepts_holding(Side::Gpu, "anything", &none));
        assert!(pm.accepts_holding(Side::Gpu, "g1", &holders));
        assert!(!pm.accepts_holding(Side::Gpu, "g2", &holders));
        let owned = PairMachine::resume(
            PairRecord {
                gpu_owned: Some(m("g9", Role::Gpu)),
                ..Default::default()
            },
            now(),
        );
        assert!(owned.accepts_holding(Side::Gpu, "g9", &holders));
        assert!(!owned.accepts_holding(Side::Gpu, "g1", &holders));
    }
}
