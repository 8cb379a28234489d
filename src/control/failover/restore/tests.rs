//! What recoveries say about how long they took: measured from the loss, named for it.

use super::super::tests::{ms, report, status, syncing, transitions};
use super::super::*;
use crate::proto::state::Loss;

/// The `Recovered` action of a batch and the transition's reason.
fn said(a: &[Action]) -> (Option<(Duration, &'static str)>, String) {
    let recovered = a.iter().find_map(|x| match x {
        Action::Recovered { after, since } => Some((*after, *since)),
        _ => None,
    });
    let reason = a
        .iter()
        .find_map(|x| match x {
            Action::Transition { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or_default();
    (recovered, reason)
}

/// A lost standby that comes back: the time counts from its last heartbeat, and the text says
/// so (it once said a Unix timestamp).
#[test]
fn a_standby_back_counts_from_when_it_was_last_heard() {
    let (mut m, t0, t) = syncing();
    m.wall_ms = 1_000_000;
    m.step(Input::Disconnected(Side::Cpu, t0 + ms(100)), &t);
    let gpu = |m: &mut PairMachine, at: u64, connected: bool| {
        m.step(
            Input::Report(
                Side::Gpu,
                Report {
                    status: AgentStatus {
                        connected,
                        ..status(AgentMode::Send, "dd")
                    },
                    ..report(t0 + ms(at), 1)
                },
            ),
            &t,
        )
    };
    gpu(&mut m, 4500, false);
    let a = m.step(Input::Tick(t0 + ms(4500)), &t);
    assert_eq!(transitions(&a), vec![PairState::Degraded]);
    // Heard last at t0 (its report in `syncing`): lost 4.5 s before this tick.
    assert_eq!(m.rec.failed_over_unix_ms, 1_000_000 - 4500);
    m.wall_ms += 2000;
    m.step(
        Input::Report(
            Side::Cpu,
            Report {
                status: status(AgentMode::Receive, "dd"),
                probe_ok_age: Some(Some(ms(10))),
                ..report(t0 + ms(6500), 1)
            },
        ),
        &t,
    );
    let (recovered, reason) = said(&gpu(&mut m, 6600, true));
    assert_eq!(recovered, Some((ms(6500), "the standby was lost")));
    assert!(
        reason.ends_with("(6500 ms after the standby was lost)"),
        "{reason}"
    );
}

/// A failover counts from the GPU's last heartbeat, not from the decision; a wake counts from
/// the wake, not from the hibernation hours before.
#[test]
fn a_failover_counts_from_the_failure_and_a_wake_from_the_wake() {
    let (mut m, t0, t) = syncing();
    m.wall_ms = 1_000_000;
    m.step(Input::Manual(t0 + ms(700)), &t);
    assert_eq!(m.rec.failed_over_unix_ms, 1_000_000 - 700);
    assert_eq!(m.rec.loss(), Loss::Gpu);

    let (mut m, t0, t) = syncing();
    m.policy.provider = true;
    m.wall_ms = 1_000_000;
    m.step(Input::Hibernate, &t);
    m.seen.cpu.status = status(AgentMode::Receive, "cc");
    m.step(
        Input::Report(
            Side::Gpu,
            Report {
                status: AgentStatus {
                    frozen_epoch: 1,
                    ..status(AgentMode::Send, "cc")
                },
                ..report(t0, 1)
            },
        ),
        &t,
    );
    assert_eq!(m.state(), PairState::Hibernated);
    assert_eq!(
        m.rec.failed_over_unix_ms, 0,
        "hibernated is not unprotected"
    );
    m.wall_ms = 9_000_000;
    m.step(Input::Wake, &t);
    assert_eq!(
        (m.rec.failed_over_unix_ms, m.rec.loss()),
        (9_000_000, Loss::Hibernation)
    );
}

/// Without a provider, the operator joins a replacement GPU by hand after a failover: it is
/// restored onto like a provider's (it once stayed FailedOver for good). The machine failed over
/// from reporting again is not a replacement.
#[test]
fn a_gpu_joined_by_hand_after_a_failover_is_restored_onto() {
    let (mut m, t0, t) = syncing();
    m.wall_ms = 1_000_000;
    m.step(Input::Manual(t0 + ms(100)), &t);
    assert_eq!(m.state(), PairState::FailedOver);
    let gpu = |m: &mut PairMachine, name: &str, at: u64| {
        m.step(
            Input::Report(
                Side::Gpu,
                Report {
                    machine: Some(MachineRecord {
                        machine: name.into(),
                        address: "10.0.0.7:7702".into(),
                        workspace: "/workspace".into(),
                    }),
                    status: status(AgentMode::Fenced, ""),
                    ..report(t0 + ms(at), 1)
                },
            ),
            &t,
        )
    };
    assert!(
        transitions(&gpu(&mut m, "m", 500)).is_empty(),
        "the old GPU is no replacement"
    );
    let a = gpu(&mut m, "gpu-2", 900);
    assert_eq!(transitions(&a), vec![PairState::Restoring]);
    assert_eq!(
        m.desired(Side::Cpu),
        vec![Desired::SetPeer {
            url: "10.0.0.7:7702".into(),
            epoch: Epoch(2)
        }]
    );
}
