use super::super::tests::{
    cpu_report, ms, named, now, report, status, syncing, transitions, with_provider,
};
use super::super::*;
use crate::proto::state::OwnedMachine;

fn owned(label: &str, role: Role) -> Option<OwnedMachine> {
    Some(OwnedMachine {
        label: label.into(),
        id: format!("id-{label}"),
        role: role.into(),
        ..Default::default()
    })
}

fn refusal(a: &[Action]) -> String {
    a.iter()
        .find_map(|x| match x {
            Action::Warn {
                kind: EventKind::Refused,
                message,
            } => Some(message.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn rebuild(snapshot: &str, at: Instant) -> Input {
    Input::RecoverFromBackup {
        snapshot: snapshot.into(),
        now: at,
    }
}

/// A provider's pair (machines g1 and c1) whose two agents fell silent at t0 + 100 ms.
fn both_lost() -> (PairMachine, Instant, Timing) {
    let (mut m, t0, t) = syncing();
    with_provider(&mut m);
    m.rec.gpu_owned = owned("g1", Role::Gpu);
    m.rec.cpu_owned = owned("c1", Role::Cpu);
    m.step(Input::Disconnected(Side::Gpu, t0 + ms(100)), &t);
    m.step(Input::Disconnected(Side::Cpu, t0 + ms(100)), &t);
    (m, t0, t)
}

#[test]
fn refused_while_an_agent_was_heard_from_lately_or_without_a_provider() {
    let (mut m, t0, t) = both_lost();
    let a = m.step(rebuild("latest", t0 + ms(1000)), &t);
    assert!(refusal(&a).contains("heard from"), "{a:?}");
    assert_eq!((m.state(), m.epoch()), (PairState::Syncing, Epoch(1)));
    // A connected CPU is refused however old its last report: it holds the newest data.
    m.seen.cpu.connected = true;
    let a = m.step(rebuild("latest", t0 + ms(60_000)), &t);
    assert!(refusal(&a).contains("without --from-backup"), "{a:?}");
    m.seen.cpu.connected = false;
    m.policy.provider = false;
    let a = m.step(rebuild("latest", t0 + ms(60_000)), &t);
    assert!(refusal(&a).contains("no provider"), "{a:?}");
    assert_eq!((m.state(), m.epoch()), (PairState::Syncing, Epoch(1)));
}

#[test]
fn both_old_machines_are_retired_and_a_cpu_is_provisioned_at_a_new_epoch() {
    let (mut m, t0, t) = both_lost();
    let before = m.rec.clone();
    let a = m.step(rebuild("latest", t0 + ms(5000)), &t);
    assert_eq!(transitions(&a), vec![PairState::Rebuilding]);
    assert_eq!(a[0], Action::Persist, "durable before anything is asked");
    assert_eq!((m.epoch(), m.primary()), (Epoch(2), Side::Cpu));
    let torn: Vec<&str> = m.rec.teardown.iter().map(|o| o.label.as_str()).collect();
    assert_eq!(torn, ["g1", "c1"]);
    let label = m.provisioning_label().unwrap().to_string();
    assert!(label.contains("-cpu-"), "{label}");
    let gone: Vec<String> = retired(&before, &m.rec)
        .into_iter()
        .map(|r| r.machine)
        .collect();
    assert!(
        gone.contains(&"g1".into()) && gone.contains(&"c1".into()),
        "{gone:?}"
    );
    assert!(
        !m.accepts(Side::Cpu, "c1"),
        "the old standby never speaks again"
    );
    let a = m.step(rebuild("latest", t0 + ms(6000)), &t);
    assert!(refusal(&a).contains("already rebuilding"), "{a:?}");
}

#[test]
fn machines_joined_by_hand_are_retired_too() {
    let (mut m, t0, t) = syncing();
    with_provider(&mut m);
    m.rec.gpu = named("gpu-box", "10.0.0.1:7702");
    m.rec.cpu = named("cpu-box", "10.0.0.2:7701");
    m.step(Input::Disconnected(Side::Gpu, t0), &t);
    m.step(Input::Disconnected(Side::Cpu, t0), &t);
    let before = m.rec.clone();
    m.step(rebuild("latest", t0 + ms(9000)), &t);
    let gone: Vec<(String, Side)> = retired(&before, &m.rec)
        .into_iter()
        .map(|r| (r.machine, r.side))
        .collect();
    assert!(gone.contains(&("gpu-box".into(), Side::Gpu)), "{gone:?}");
    assert!(gone.contains(&("cpu-box".into(), Side::Cpu)), "{gone:?}");
}

/// The new CPU joins and is told to seed; its errors are said once; once it holds the
/// snapshot, a GPU is provisioned and the pair goes on as after a failover.
#[test]
fn the_new_standby_seeds_then_a_gpu_follows() {
    let (mut m, t0, t) = both_lost();
    m.step(rebuild("0123456789abcdef", t0 + ms(5000)), &t);
    let label = m.provisioning_label().unwrap().to_string();
    let cpu = |m: &mut PairMachine, at: u64, st: AgentStatus| {
        m.step(
            Input::Report(
                Side::Cpu,
                Report {
                    machine: named(&label, "10.0.0.5:7701"),
                    status: st,
                    ..cpu_report(t0 + ms(at), None)
                },
            ),
            &t,
        )
    };
    let a = cpu(&mut m, 6000, status(AgentMode::Idle, ""));
    assert!(transitions(&a).is_empty());
    assert!(m.rec.provision.is_none(), "joined");
    let seed = Desired::Seed {
        epoch: Epoch(2),
        snapshot: "0123456789abcdef".into(),
    };
    assert_eq!(m.desired(Side::Cpu), vec![seed]);
    assert!(matches!(m.desired(Side::Gpu)[..], [Desired::Fence { .. }]));
    let failing = AgentStatus {
        seed_error: "bucket unreachable".into(),
        ..status(AgentMode::Seeding, "")
    };
    let said = |a: &[Action]| {
        a.iter()
            .filter(|x| {
                matches!(
                    x,
                    Action::Warn {
                        kind: EventKind::Critical,
                        ..
                    }
                )
            })
            .count()
    };
    assert_eq!(said(&cpu(&mut m, 7000, failing.clone())), 1);
    assert_eq!(said(&cpu(&mut m, 8000, failing)), 0, "said once");
    // Another snapshot than asked does not count.
    let other = AgentStatus {
        seeded: "ffffffffffffffff".into(),
        ..status(AgentMode::Seeding, "aa")
    };
    assert!(transitions(&cpu(&mut m, 8500, other)).is_empty());
    let done = AgentStatus {
        seeded: "0123456789abcdef".into(),
        ..status(AgentMode::Seeding, "aa")
    };
    let a = cpu(&mut m, 9000, done);
    assert_eq!(transitions(&a), vec![PairState::Provisioning]);
    assert!(m.rec.seed_snapshot.is_empty());
    assert!(m.provisioning_label().unwrap().contains("-gpu-"));
    assert_eq!(
        m.desired(Side::Cpu),
        vec![Desired::Promote { epoch: Epoch(2) }]
    );
    // The new GPU joins: restored onto from the seeded standby, as after a failover.
    let gpu = m.provisioning_label().unwrap().to_string();
    let a = m.step(
        Input::Report(
            Side::Gpu,
            Report {
                machine: named(&gpu, "10.0.0.6:7702"),
                status: status(AgentMode::Idle, ""),
                ..report(t0 + ms(10_000), 1)
            },
        ),
        &t,
    );
    assert_eq!(transitions(&a), vec![PairState::Restoring]);
    assert_eq!(
        m.desired(Side::Cpu),
        vec![Desired::SetPeer {
            url: "10.0.0.6:7702".into(),
            epoch: Epoch(2)
        }]
    );
}

#[test]
fn a_rebuild_survives_a_coordinator_restart_from_its_record() {
    let (mut m, t0, t) = both_lost();
    m.step(rebuild("latest", t0 + ms(5000)), &t);
    let resumed = PairMachine::resume(m.rec.clone(), now());
    assert_eq!(resumed.state(), PairState::Rebuilding);
    assert_eq!(
        resumed.desired(Side::Cpu),
        vec![Desired::Seed {
            epoch: Epoch(2),
            snapshot: "latest".into()
        }]
    );
}
