use super::*;
use crate::proto::state::Phase;

/// Some instant to start a schedule from. The machine never reads the clock itself (the lint
/// denied in the parent); a test needs one real `Instant` to add offsets to.
#[allow(clippy::disallowed_methods)]
pub(super) fn now() -> Instant {
    Instant::now()
}

pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn machine(addr: &str) -> Option<MachineRecord> {
    Some(MachineRecord {
        machine: "m".into(),
        address: addr.into(),
        workspace: "/workspace".into(),
    })
}

pub(super) fn report(at: Instant, epoch: u64) -> Report {
    Report {
        at,
        epoch: Epoch(epoch),
        fatal: None,
        probe_ok_age: None,
        machine: None,
        status: AgentStatus::default(),
    }
}

pub(super) fn cpu_report(at: Instant, probe_ok_age: Option<Duration>) -> Report {
    Report {
        probe_ok_age: Some(probe_ok_age),
        ..report(at, 1)
    }
}

/// A pair in Syncing at t0, both agents heard from.
pub(super) fn syncing() -> (PairMachine, Instant, Timing) {
    let t0 = now();
    let t = Timing::default();
    let mut m = PairMachine::resume(PairMachine::new_record("p", 0), t0);
    let a = m.step(
        Input::Report(
            Side::Gpu,
            Report {
                machine: machine("10.0.0.1:7702"),
                ..report(t0, 1)
            },
        ),
        &t,
    );
    assert_eq!(a, vec![Action::PersistSoon]);
    let a = m.step(
        Input::Report(
            Side::Cpu,
            Report {
                machine: machine("10.0.0.2:7701"),
                ..cpu_report(t0, Some(ms(100)))
            },
        ),
        &t,
    );
    assert!(a.contains(&Action::Transition {
        from: PairState::Pending,
        to: PairState::Syncing,
        reason: "both agents joined".into()
    }));
    (m, t0, t)
}

pub(super) fn transitions(a: &[Action]) -> Vec<PairState> {
    a.iter()
        .filter_map(|x| match x {
            Action::Transition { to, .. } => Some(*to),
            _ => None,
        })
        .collect()
}

#[test]
fn pending_until_both_agents_join_then_commands() {
    let t0 = now();
    let t = Timing::default();
    let mut m = PairMachine::resume(PairMachine::new_record("p", 0), t0);
    m.step(
        Input::Report(
            Side::Gpu,
            Report {
                machine: machine("g:7702"),
                ..report(t0, 1)
            },
        ),
        &t,
    );
    assert_eq!(m.state(), PairState::Pending);
    assert!(
        m.desired(Side::Gpu).is_empty(),
        "no CPU to replicate to yet"
    );
    // No failover while pending, however long the silence.
    assert!(transitions(&m.step(Input::Tick(t0 + ms(60_000)), &t)).is_empty());
    m.step(
        Input::Report(
            Side::Cpu,
            Report {
                machine: machine("c:7701"),
                ..cpu_report(t0, None)
            },
        ),
        &t,
    );
    assert_eq!(m.state(), PairState::Syncing);
    assert_eq!(
        m.desired(Side::Gpu),
        vec![Desired::SetPeer {
            url: "c:7701".into(),
            epoch: Epoch(1)
        }]
    );
    assert_eq!(
        m.desired(Side::Cpu),
        vec![
            Desired::Receive { epoch: Epoch(1) },
            Desired::Probe {
                url: "g:7702".into()
            }
        ]
    );
}

#[test]
fn suspect_after_two_missed_then_back() {
    let (mut m, t0, t) = syncing();
    assert!(transitions(&m.step(Input::Tick(t0 + ms(1900)), &t)).is_empty());
    assert_eq!(
        transitions(&m.step(Input::Tick(t0 + ms(2000)), &t)),
        vec![PairState::Suspect]
    );
    let a = m.step(Input::Report(Side::Gpu, report(t0 + ms(2100), 1)), &t);
    assert_eq!(transitions(&a), vec![PairState::Syncing]);
}

/// Syncing <-> Suspect goes with the next batch (nothing acts on it); every other transition,
/// and a failover from Suspect, is durable before it is acted on.
#[test]
fn suspect_and_back_are_written_with_the_batch() {
    let (mut m, t0, t) = syncing();
    let a = m.step(Input::Tick(t0 + ms(2000)), &t);
    assert_eq!(transitions(&a), vec![PairState::Suspect]);
    assert!(a.contains(&Action::PersistSoon) && !a.contains(&Action::Persist));
    let (gpu, cpu) = (m.desired(Side::Gpu), m.desired(Side::Cpu));
    let a = m.step(Input::Report(Side::Gpu, report(t0 + ms(2100), 1)), &t);
    assert_eq!(transitions(&a), vec![PairState::Syncing]);
    assert!(a.contains(&Action::PersistSoon) && !a.contains(&Action::Persist));
    assert_eq!((m.desired(Side::Gpu), m.desired(Side::Cpu)), (gpu, cpu));
    // Suspect again, then the CPU (reporting all along) confirms: the failover is durable
    // first.
    for (at, ok_age) in [(2400, 100), (4800, 2800)] {
        m.step(
            Input::Report(Side::Cpu, cpu_report(t0 + ms(at), Some(ms(ok_age)))),
            &t,
        );
    }
    m.step(Input::Tick(t0 + ms(4200)), &t);
    m.step(
        Input::Report(Side::Cpu, cpu_report(t0 + ms(5100), Some(ms(3100)))),
        &t,
    );
    let a = m.step(Input::Tick(t0 + ms(5200)), &t);
    assert_eq!(transitions(&a), vec![PairState::FailedOver]);
    assert!(a.contains(&Action::Persist));
    for (from, to) in [
        (PairState::Pending, PairState::Syncing),
        (PairState::Suspect, PairState::FailedOver),
        (PairState::Syncing, PairState::Degraded),
        (PairState::Syncing, PairState::FailedOver),
    ] {
        assert!(durable_before_acting(from, to), "{from} -> {to}");
    }
}

/// A new leader loads a record that lags behind (the batch with Syncing <-> Suspect was not
/// written when the old one died): a stale Suspect fails nothing over sooner, a stale Syncing
/// nothing later, and the epoch is the record's.
#[test]
fn a_lagging_suspect_in_the_record_changes_nothing_for_a_new_leader() {
    let t = Timing::default();
    let (m0, t0, _) = syncing();
    let t1 = t0 + ms(60_000);
    for stale in [PairState::Suspect, PairState::Syncing] {
        let mut rec = m0.rec.clone();
        rec.set_state(stale.into());
        let mut m = PairMachine::resume(rec, t1);
        // The CPU says it lost the GPU long ago: still no failover before the failover delay
        // counted from this leader's start.
        m.step(
            Input::Report(Side::Cpu, cpu_report(t1 + ms(1000), None)),
            &t,
        );
        m.step(
            Input::Report(Side::Cpu, cpu_report(t1 + ms(2000), None)),
            &t,
        );
        let a = m.step(Input::Tick(t1 + ms(2900)), &t);
        assert!(!transitions(&a).contains(&PairState::FailedOver), "{stale}");
        assert_eq!(m.state(), PairState::Suspect, "{stale}");
        m.step(
            Input::Report(Side::Cpu, cpu_report(t1 + ms(2950), None)),
            &t,
        );
        let a = m.step(Input::Tick(t1 + ms(3000)), &t);
        assert_eq!(transitions(&a), vec![PairState::FailedOver], "{stale}");
        assert_eq!(m.epoch(), Epoch(2));
        // And a GPU heard from at once makes either Syncing, at the record's epoch.
        let mut rec = m0.rec.clone();
        rec.set_state(stale.into());
        let mut m = PairMachine::resume(rec, t1);
        m.step(Input::Report(Side::Gpu, report(t1 + ms(100), 1)), &t);
        assert!(transitions(&m.step(Input::Tick(t1 + ms(1500)), &t)).is_empty());
        assert_eq!((m.state(), m.epoch()), (PairState::Syncing, Epoch(1)));
    }
}

#[test]
fn fails_over_when_the_cpu_confirms() {
    let (mut m, t0, t) = syncing();
    // The CPU keeps reporting; its probe last succeeded at t0.
    for k in 1..=3 {
        m.step(
            Input::Report(Side::Cpu, cpu_report(t0 + ms(1000 * k), Some(ms(1000 * k)))),
            &t,
        );
    }
    let a = m.step(Input::Tick(t0 + ms(3000)), &t);
    assert_eq!(
        transitions(&a),
        vec![PairState::Suspect, PairState::FailedOver]
    );
    // The failover must be durable before anything is acted on (the engine writes first when
    // any action says so), with the epoch already raised; Suspect alone could wait.
    assert!(a.contains(&Action::Persist));
    assert!(a.contains(&Action::Detected(ms(3000))));
    assert_eq!(m.epoch(), Epoch(2));
    assert_eq!(m.primary(), Side::Cpu);
    assert_eq!(
        m.desired(Side::Cpu),
        vec![Desired::Promote { epoch: Epoch(2) }]
    );
    assert!(matches!(
        m.desired(Side::Gpu)[..],
        [Desired::Fence {
            epoch: Epoch(2),
            ..
        }]
    ));
    // A returning GPU changes nothing: it is told to stay fenced.
    let a = m.step(Input::Report(Side::Gpu, report(t0 + ms(9000), 1)), &t);
    assert!(transitions(&a).is_empty());
    assert_eq!(m.state(), PairState::FailedOver);
}

#[test]
fn no_failover_when_only_the_coordinator_lost_the_gpu() {
    let (mut m, t0, t) = syncing();
    let mut warned = 0;
    for k in 1..=30u64 {
        // The CPU still reaches the GPU: its probe succeeded 200 ms before each report.
        m.step(
            Input::Report(Side::Cpu, cpu_report(t0 + ms(1000 * k), Some(ms(200)))),
            &t,
        );
        let a = m.step(Input::Tick(t0 + ms(1000 * k + 50)), &t);
        assert!(
            !transitions(&a).contains(&PairState::FailedOver),
            "false failover at {k}s"
        );
        warned += a
            .iter()
            .filter(|x| {
                matches!(
                    x,
                    Action::Warn {
                        kind: EventKind::Blind,
                        ..
                    }
                )
            })
            .count();
    }
    assert_eq!(m.state(), PairState::Suspect);
    assert_eq!(warned, 1, "one warning per silence, not one per tick");
    assert_eq!(m.epoch(), Epoch(1));
}

#[test]
fn no_failover_when_the_cpu_is_silent_too() {
    let (mut m, t0, t) = syncing();
    let a = m.step(Input::Tick(t0 + ms(10_000)), &t);
    assert!(!transitions(&a).contains(&PairState::FailedOver));
    assert!(a.iter().any(|x| matches!(x, Action::Warn { kind: EventKind::Blind, message } if message.contains("cannot confirm"))));
}

#[test]
fn fatal_fault_fails_over_at_once() {
    let (mut m, t0, t) = syncing();
    let a = m.step(
        Input::Report(
            Side::Gpu,
            Report {
                fatal: Some("Xid 79: GPU has fallen off the bus".into()),
                ..report(t0 + ms(500), 1)
            },
        ),
        &t,
    );
    assert_eq!(transitions(&a), vec![PairState::FailedOver]);
    assert!(m.rec.reason.contains("Xid 79"));
    assert_eq!(m.epoch(), Epoch(2));
}

#[test]
fn provider_gone_fails_over_without_waiting_for_the_cpu() {
    let (mut m, t0, t) = syncing();
    let a = m.step(Input::ProviderGone(Side::Gpu, t0 + ms(100)), &t);
    assert_eq!(transitions(&a), vec![PairState::FailedOver]);
}

#[test]
fn manual_failover_and_refusal_when_already_failed_over() {
    let (mut m, t0, t) = syncing();
    let a = m.step(Input::Manual(t0 + ms(10)), &t);
    assert_eq!(transitions(&a), vec![PairState::FailedOver]);
    assert!(!a.iter().any(|x| matches!(x, Action::Detected(_))));
    let a = m.step(Input::Manual(t0 + ms(20)), &t);
    assert!(transitions(&a).is_empty());
    assert_eq!(
        m.epoch(),
        Epoch(2),
        "a second request must not bump the epoch again"
    );
}

#[test]
fn no_failover_without_a_cpu_standby() {
    let t0 = now();
    let t = Timing::default();
    let mut rec = PairMachine::new_record("p", 0);
    rec.set_state(PairState::Syncing.into());
    rec.gpu = machine("g:7702");
    let mut m = PairMachine::resume(rec, t0);
    let a = m.step(Input::Manual(t0), &t);
    assert!(transitions(&a).is_empty());
    assert_eq!(m.epoch(), Epoch(1));
}

#[test]
fn coordinator_downtime_is_not_silence() {
    // Persisted as Syncing; the coordinator restarts much later.
    let (m, _, t) = syncing();
    let t1 = now() + ms(3_600_000);
    let mut m = PairMachine::resume(m.rec, t1);
    assert!(transitions(&m.step(Input::Tick(t1 + ms(500)), &t)).is_empty());
    // Agents reconnect within the window: nothing happens.
    m.step(Input::Report(Side::Gpu, report(t1 + ms(900), 1)), &t);
    m.step(
        Input::Report(Side::Cpu, cpu_report(t1 + ms(900), Some(ms(100)))),
        &t,
    );
    assert!(transitions(&m.step(Input::Tick(t1 + ms(1500)), &t)).is_empty());
    assert_eq!(m.state(), PairState::Syncing);
}

#[test]
fn restart_mid_failover_resumes_from_the_record() {
    let (mut m, t0, t) = syncing();
    m.step(
        Input::Report(Side::Cpu, cpu_report(t0 + ms(1500), Some(ms(1500)))),
        &t,
    );
    m.step(
        Input::Report(Side::Cpu, cpu_report(t0 + ms(3000), Some(ms(3000)))),
        &t,
    );
    m.step(Input::Tick(t0 + ms(3000)), &t);
    assert_eq!(m.state(), PairState::FailedOver);
    // The coordinator dies right after persisting; a new one resumes the record.
    let t1 = t0 + ms(60_000);
    let mut m2 = PairMachine::resume(m.rec.clone(), t1);
    assert_eq!(m2.epoch(), Epoch(2));
    // The CPU reports the old epoch: it must (still) be promoted; the GPU fenced.
    m2.step(Input::Report(Side::Cpu, cpu_report(t1, None)), &t);
    assert_eq!(
        m2.desired(Side::Cpu),
        vec![Desired::Promote { epoch: Epoch(2) }]
    );
    assert!(matches!(m2.desired(Side::Gpu)[..], [Desired::Fence { .. }]));
    // No second failover and no epoch bump however long things stay quiet.
    for k in 0..10 {
        assert!(transitions(&m2.step(Input::Tick(t1 + ms(k * 1000)), &t)).is_empty());
    }
    assert_eq!(m2.epoch(), Epoch(2));
}

#[test]
fn restart_before_the_transition_was_persisted_decides_again() {
    // The record still says Syncing (the crash came before the write): the new coordinator
    // sees the silence and the CPU's confirmation anew and fails over once.
    let (m, t0, t) = syncing();
    let t1 = t0 + ms(10_000);
    let mut m2 = PairMachine::resume(m.rec, t1);
    m2.step(
        Input::Report(Side::Cpu, cpu_report(t1 + ms(500), Some(ms(9000)))),
        &t,
    );
    for k in 1..=4 {
        m2.step(
            Input::Report(
                Side::Cpu,
                cpu_report(t1 + ms(1000 * k), Some(ms(9000 + 1000 * k))),
            ),
            &t,
        );
    }
    let a = m2.step(Input::Tick(t1 + ms(3100)), &t);
    assert!(transitions(&a).contains(&PairState::FailedOver));
    assert_eq!(m2.epoch(), Epoch(2));
}

#[test]
fn states_roundtrip_by_name() {
    for s in PairState::ALL {
        assert_eq!(PairState::parse(s.as_str()), Some(s));
    }
}

pub(super) fn with_provider(m: &mut PairMachine) {
    m.policy = Policy {
        provider: true,
        auto_recover: true,
        boot_timeout: Duration::from_secs(60),
        backoff_base: Duration::from_secs(5),
        label_prefix: "sb-test".into(),
        ..Policy::default()
    };
    m.wall_ms = 1_000_000;
}

pub(super) fn status(mode: AgentMode, root: &str) -> AgentStatus {
    AgentStatus {
        mode,
        root: root.into(),
        connected: true,
        ..Default::default()
    }
}

pub(super) fn named(label: &str, addr: &str) -> Option<MachineRecord> {
    Some(MachineRecord {
        machine: label.into(),
        address: addr.into(),
        workspace: "/workspace".into(),
    })
}

/// Found by tests/chaos.rs (seed 3): a new GPU whose agent joined before the create call
/// returned was owned with no id, so nobody watched it; when it died during the restore the
/// pair stayed Restoring for good.
#[test]
fn a_machine_that_joins_before_its_create_returns_gets_its_id() {
    let (mut m, t0, t) = syncing();
    with_provider(&mut m);
    m.step(Input::Manual(t0), &t);
    m.step(Input::Tick(t0 + ms(200)), &t);
    let label = m.provisioning_label().unwrap().to_string();
    let a = m.step(
        Input::Report(
            Side::Gpu,
            Report {
                machine: named(&label, "10.0.0.9:7702"),
                status: status(AgentMode::Idle, ""),
                ..report(t0 + ms(300), 1)
            },
        ),
        &t,
    );
    assert_eq!(transitions(&a), vec![PairState::Restoring]);
    assert_eq!(m.rec.gpu_owned.as_ref().unwrap().id, "");
    let a = m.step(
        Input::Created {
            label: label.clone(),
            id: "42".into(),
            offer: "o1".into(),
            place: "host-1".into(),
        },
        &t,
    );
    assert_eq!(a, vec![Action::Persist]);
    let owned = m.rec.gpu_owned.as_ref().unwrap();
    assert_eq!((owned.id.as_str(), owned.offer.as_str()), ("42", "o1"));
    // It dies during the restore: another one is provisioned.
    let a = m.step(Input::ProviderGone(Side::Gpu, t0 + ms(900)), &t);
    assert_eq!(transitions(&a), vec![PairState::Provisioning]);
}

/// Failed over, auto-recovery on: the machine provisions, restores, cuts over.
#[test]
fn recovery_provisions_restores_and_cuts_over() {
    let (mut m, t0, t) = syncing();
    with_provider(&mut m);
    m.step(Input::Manual(t0), &t);
    assert_eq!(m.state(), PairState::FailedOver);
    let a = m.step(Input::Tick(t0 + ms(200)), &t);
    assert_eq!(transitions(&a), vec![PairState::Provisioning]);
    assert_eq!(
        a[0],
        Action::Persist,
        "the intent is durable before anything else"
    );
    let label = m.provisioning_label().unwrap().to_string();
    assert_eq!(label, "sb-test-p-gpu-1");
    // Another machine claiming to be the GPU is not listened to; the new one is.
    assert!(!m.accepts(Side::Gpu, "m"));
    assert!(m.accepts(Side::Gpu, &label));
    m.step(
        Input::Created {
            label: label.clone(),
            id: "42".into(),
            offer: "o1".into(),
            place: "host-1".into(),
        },
        &t,
    );
    assert_eq!(m.rec.provision.as_ref().unwrap().phase(), Phase::Boot);
    let a = m.step(
        Input::Report(
            Side::Gpu,
            Report {
                machine: named(&label, "10.0.0.9:7702"),
                status: status(AgentMode::Idle, ""),
                ..report(t0 + ms(1000), 1)
            },
        ),
        &t,
    );
    assert_eq!(transitions(&a), vec![PairState::Restoring]);
    assert_eq!(m.rec.gpu_owned.as_ref().unwrap().id, "42");
    assert_eq!(
        m.desired(Side::Gpu),
        vec![Desired::Receive { epoch: Epoch(2) }]
    );
    assert_eq!(
        m.desired(Side::Cpu),
        vec![Desired::SetPeer {
            url: "10.0.0.9:7702".into(),
            epoch: Epoch(2)
        }]
    );
    // Roots differ: still restoring.
    m.seen.gpu.status = status(AgentMode::Receive, "aa");
    let a = m.step(
        Input::Report(
            Side::Cpu,
            Report {
                status: status(AgentMode::Send, "bb"),
                ..cpu_report(t0 + ms(1500), None)
            },
        ),
        &t,
    );
    assert!(transitions(&a).is_empty());
    // Roots agree: cut over; the CPU is told to freeze.
    let a = m.step(
        Input::Report(
            Side::Gpu,
            Report {
                machine: named(&label, "10.0.0.9:7702"),
                status: status(AgentMode::Receive, "bb"),
                ..report(t0 + ms(2000), 2)
            },
        ),
        &t,
    );
    assert_eq!(transitions(&a), vec![PairState::CuttingOver]);
    assert!(
        m.desired(Side::Cpu)
            .contains(&Desired::Freeze { epoch: Epoch(2) })
    );
    // Frozen at the same root: epoch 3, the GPU is primary again.
    m.wall_ms += 30_000;
    let a = m.step(
        Input::Report(
            Side::Cpu,
            Report {
                status: AgentStatus {
                    frozen_epoch: 2,
                    ..status(AgentMode::Send, "bb")
                },
                ..cpu_report(t0 + ms(2500), None)
            },
        ),
        &t,
    );
    assert_eq!(transitions(&a), vec![PairState::Syncing]);
    assert!(a.contains(&Action::Recovered {
        after: Duration::from_secs(30),
        since: "the failure"
    }));
    assert_eq!(m.epoch(), Epoch(3));
    assert_eq!(m.primary(), Side::Gpu);
    assert_eq!(
        m.desired(Side::Gpu),
        vec![Desired::SetPeer {
            url: "10.0.0.2:7701".into(),
            epoch: Epoch(3)
        }]
    );
    assert_eq!(
        m.desired(Side::Cpu)[0],
        Desired::Receive { epoch: Epoch(3) }
    );
}

#[test]
fn failed_boots_are_destroyed_blocklisted_and_retried_with_backoff() {
    let (mut m, t0, t) = syncing();
    with_provider(&mut m);
    m.step(Input::Manual(t0), &t);
    m.step(Input::Tick(t0), &t);
    let first = m.provisioning_label().unwrap().to_string();
    m.step(
        Input::Created {
            label: first.clone(),
            id: "7".into(),
            offer: "o7".into(),
            place: "host-7".into(),
        },
        &t,
    );
    // The boot deadline passes without the agent joining.
    m.wall_ms += 61_000;
    let a = m.step(Input::Tick(t0 + ms(61_000)), &t);
    assert!(a.contains(&Action::AttemptFailed));
    assert_eq!(
        m.rec.teardown.len(),
        1,
        "the failed machine is to be destroyed"
    );
    assert_eq!(m.rec.teardown[0].id, "7");
    let mut blocked = m.blocked();
    blocked.sort();
    assert_eq!(blocked, vec!["host-7", "o7"]);
    let p = m.rec.provision.clone().unwrap();
    assert_eq!(p.attempt, 2);
    assert_ne!(m.provisioning_label().unwrap(), first, "a fresh label");
    let wait = p.next_try_unix_ms - m.wall_ms;
    assert!(
        (5_000..=6_500).contains(&wait),
        "backoff with jitter: {wait}"
    );
    // The old label is no longer accepted as the GPU.
    assert!(!m.accepts(Side::Gpu, &first));
    m.step(Input::Destroyed { label: first }, &t);
    assert!(m.rec.teardown.is_empty());
    // A rejected create blocklists the offer and backs off further.
    let second = m.provisioning_label().unwrap().to_string();
    m.step(
        Input::CreateFailed {
            label: second,
            error: "no_such_ask".into(),
            block: vec!["o8".into()],
        },
        &t,
    );
    let p = m.rec.provision.clone().unwrap();
    assert_eq!(p.attempt, 3);
    assert!(p.next_try_unix_ms - m.wall_ms >= 10_000);
    assert!(m.blocked().contains(&"o8".to_string()));
    // Blocks expire.
    m.wall_ms += 2 * 3_600_000;
    assert!(m.blocked().is_empty());
    // A result for a label given up on is ignored.
    let before = m.rec.clone();
    m.step(
        Input::Created {
            label: "sb-test-p-gpu-1".into(),
            id: "99".into(),
            offer: String::new(),
            place: String::new(),
        },
        &t,
    );
    assert_eq!(m.rec, before);
}

#[test]
fn hibernate_then_wake() {
    let (mut m, t0, t) = syncing();
    with_provider(&mut m);
    m.rec.gpu_owned = Some(OwnedMachine {
        label: "m".into(),
        id: "g1".into(),
        ..Default::default()
    });
    let a = m.step(Input::Hibernate, &t);
    assert!(a.contains(&Action::Persist));
    assert!(
        m.desired(Side::Gpu)
            .contains(&Desired::Freeze { epoch: Epoch(1) })
    );
    m.seen.cpu.status = status(AgentMode::Receive, "cc");
    let a = m.step(
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
    assert_eq!(transitions(&a), vec![PairState::Hibernated]);
    assert_eq!(m.epoch(), Epoch(2));
    assert_eq!(m.primary(), Side::Cpu);
    assert_eq!(m.rec.teardown[0].id, "g1", "the GPU machine is released");
    assert!(matches!(m.desired(Side::Gpu)[0], Desired::Fence { .. }));
    // Not a failover: no detection, nothing else happens by itself.
    assert!(transitions(&m.step(Input::Tick(t0 + ms(60_000)), &t)).is_empty());
    let a = m.step(Input::Wake, &t);
    assert_eq!(transitions(&a), vec![PairState::Provisioning]);
    // Hibernating a pair that is not Syncing is refused.
    let a = m.step(Input::Hibernate, &t);
    assert!(matches!(
        &a[0],
        Action::Warn {
            kind: EventKind::Refused,
            ..
        }
    ));
}

#[test]
fn a_lost_cpu_standby_is_replaced_and_seeded() {
    let (mut m, t0, t) = syncing();
    with_provider(&mut m);
    // The provider says the CPU is gone, but its agent was heard from just now: wait.
    let a = m.step(Input::ProviderGone(Side::Cpu, t0 + ms(500)), &t);
    assert!(transitions(&a).is_empty());
    // Silent for longer than the failover delay too: Degraded, a new CPU provisioned.
    let a = m.step(Input::ProviderGone(Side::Cpu, t0 + ms(5000)), &t);
    assert_eq!(transitions(&a), vec![PairState::Degraded]);
    let label = m.provisioning_label().unwrap().to_string();
    assert!(label.contains("-cpu-"));
    m.step(
        Input::Report(
            Side::Cpu,
            Report {
                machine: named(&label, "10.0.0.3:7701"),
                status: status(AgentMode::Receive, ""),
                ..cpu_report(t0 + ms(6000), None)
            },
        ),
        &t,
    );
    assert!(m.rec.provision.is_none());
    assert_eq!(
        m.desired(Side::Gpu),
        vec![Desired::SetPeer {
            url: "10.0.0.3:7701".into(),
            epoch: Epoch(1)
        }]
    );
    m.seen.cpu.status = status(AgentMode::Receive, "dd");
    let a = m.step(
        Input::Report(
            Side::Gpu,
            Report {
                status: status(AgentMode::Send, "dd"),
                ..report(t0 + ms(7000), 1)
            },
        ),
        &t,
    );
    assert_eq!(transitions(&a), vec![PairState::Syncing]);
    assert_eq!(
        m.epoch(),
        Epoch(1),
        "no epoch change: the GPU stayed primary"
    );
}

/// The GPU agent reports as the sender, reaching its standby (`connected`) or not.
fn gpu_sends(m: &mut PairMachine, at: Instant, connected: bool, t: &Timing) -> Vec<Action> {
    let st = AgentStatus {
        connected,
        ..status(AgentMode::Send, "dd")
    };
    m.step(
        Input::Report(
            Side::Gpu,
            Report {
                status: st,
                ..report(at, 1)
            },
        ),
        t,
    )
}

/// The CPU agent reports again, receiving; it last reached the GPU `probe_ok_age` ago
/// (None: not since it came back).
fn cpu_back(
    m: &mut PairMachine,
    at: Instant,
    probe_ok_age: Option<Duration>,
    t: &Timing,
) -> Vec<Action> {
    m.step(
        Input::Report(
            Side::Cpu,
            Report {
                machine: machine("10.0.0.2:7701"),
                status: status(AgentMode::Receive, "dd"),
                ..cpu_report(at, probe_ok_age)
            },
        ),
        t,
    )
}

/// Syncing, then the CPU is lost to the coordinator (t0 + 100 ms) and to the GPU: Degraded
/// at t0 + 4.5 s, nothing provisioned, epoch 1.
fn degraded() -> (PairMachine, Instant, Timing) {
    let (mut m, t0, t) = syncing();
    m.step(Input::Disconnected(Side::Cpu, t0 + ms(100)), &t);
    gpu_sends(&mut m, t0 + ms(4500), false, &t);
    let a = m.step(Input::Tick(t0 + ms(4500)), &t);
    assert_eq!(transitions(&a), vec![PairState::Degraded]);
    assert!(m.rec.provision.is_none());
    assert_eq!(m.epoch(), Epoch(1));
    (m, t0, t)
}

#[test]
fn a_silent_standby_the_gpu_cannot_reach_degrades_the_pair() {
    let (mut m, t0, t) = syncing();
    m.step(Input::Disconnected(Side::Cpu, t0 + ms(100)), &t);
    // The GPU still reaches its standby (only the coordinator lost it): no change.
    gpu_sends(&mut m, t0 + ms(4000), true, &t);
    assert!(transitions(&m.step(Input::Tick(t0 + ms(4000)), &t)).is_empty());
    // Neither the coordinator nor the GPU hears the CPU: Degraded, nothing provisioned
    // (no provider is configured, and a hand-joined standby is not ours to replace).
    gpu_sends(&mut m, t0 + ms(4500), false, &t);
    let a = m.step(Input::Tick(t0 + ms(4500)), &t);
    assert_eq!(transitions(&a), vec![PairState::Degraded]);
    assert!(m.rec.provision.is_none());
    assert_eq!(m.epoch(), Epoch(1));
    // It comes back and catches up: Syncing again.
    cpu_back(&mut m, t0 + ms(5000), Some(ms(10)), &t);
    let a = gpu_sends(&mut m, t0 + ms(5100), true, &t);
    assert_eq!(transitions(&a), vec![PairState::Syncing]);
}

#[test]
fn a_degraded_pair_fails_over_when_its_standby_returns_and_the_gpu_is_gone() {
    // Found by tests/chaos.rs (seed 2): the standby was cut off (Degraded), the GPU died
    // meanwhile, the standby came back: the pair stayed Degraded for good, nobody primary.
    let (mut m, t0, t) = degraded();
    // The GPU is never heard from again; the CPU comes back and cannot reach it either. Its
    // word counts once it has been back for `failover_after` (the GPU could have been cut off
    // by the same fault and be on its way back too).
    let a = cpu_back(&mut m, t0 + ms(9000), None, &t);
    assert!(transitions(&a).is_empty());
    let a = m.step(Input::Tick(t0 + ms(9100)), &t);
    assert!(transitions(&a).is_empty());
    // Not told that the CPU still reaches the GPU: it does not.
    assert!(
        !a.iter().any(
            |x| matches!(x, Action::Warn { message, .. } if message.contains("still reaches"))
        ),
        "{a:?}"
    );
    cpu_back(&mut m, t0 + ms(11_000), None, &t);
    assert!(transitions(&m.step(Input::Tick(t0 + ms(11_900)), &t)).is_empty());
    let a = m.step(Input::Tick(t0 + ms(12_000)), &t);
    assert_eq!(transitions(&a), vec![PairState::FailedOver]);
    assert_eq!(m.epoch(), Epoch(2));
    assert_eq!(m.primary(), Side::Cpu);
}

/// Found by tests/netfaults.rs (everything cut for 10 s, then healed): the CPU agent came
/// back first, still reporting that it had not reached the GPU for 10 s, and the coordinator
/// failed over a GPU that was only waiting out its reconnection backoff.
#[test]
fn a_heal_that_brings_the_cpu_back_first_does_not_fail_over() {
    let (mut m, t0, t) = syncing();
    // Everything cut at t0 + 100 ms: both agents silent, the pair Suspect, nobody to confirm.
    let a = m.step(Input::Tick(t0 + ms(2000)), &t);
    assert_eq!(transitions(&a), vec![PairState::Suspect]);
    for k in 3..=10 {
        assert!(transitions(&m.step(Input::Tick(t0 + ms(k * 1000)), &t)).is_empty());
    }
    // Healed at t0 + 10 s: the CPU is heard first, with what it saw during the cut.
    cpu_back(&mut m, t0 + ms(10_200), Some(ms(10_100)), &t);
    for at in [10_300, 11_000, 12_000] {
        assert!(transitions(&m.step(Input::Tick(t0 + ms(at)), &t)).is_empty());
    }
    cpu_back(&mut m, t0 + ms(11_200), Some(ms(11_100)), &t);
    // The GPU's backoff ends (up to 2.6 s after the heal): it is heard again.
    let a = gpu_sends(&mut m, t0 + ms(12_500), true, &t);
    assert_eq!(transitions(&a), vec![PairState::Syncing]);
    assert!(transitions(&m.step(Input::Tick(t0 + ms(13_500)), &t)).is_empty());
    assert_eq!(m.epoch(), Epoch(1));
}

#[test]
fn a_degraded_pair_whose_gpu_lives_does_not_fail_over() {
    let (mut m, t0, t) = degraded();
    // The CPU is back but still cut from the GPU, which the coordinator hears: no failover.
    cpu_back(&mut m, t0 + ms(9000), None, &t);
    gpu_sends(&mut m, t0 + ms(9000), false, &t);
    let a = m.step(Input::Tick(t0 + ms(9100)), &t);
    assert!(transitions(&a).is_empty(), "{a:?}");
    assert_eq!(m.state(), PairState::Degraded);
    assert_eq!(m.epoch(), Epoch(1));
}

#[test]
fn without_a_provider_recovery_is_refused_with_a_reason() {
    let (mut m, t0, t) = syncing();
    m.step(Input::Manual(t0), &t);
    let a = m.step(Input::Tick(t0), &t);
    assert!(
        transitions(&a).is_empty(),
        "no auto-recovery without a provider"
    );
    let a = m.step(Input::Recover, &t);
    assert!(
        matches!(&a[0], Action::Warn { kind: EventKind::Refused, message } if message.contains("no provider"))
    );
    assert_eq!(m.state(), PairState::FailedOver);
}

#[test]
fn machine_labels_are_valid_machine_names_for_any_pair_name() {
    use super::provisioning::machine_label;
    use crate::trust::identity::check_name;
    let prefix = "sb-0123abcd";
    assert_eq!(
        machine_label(prefix, "p1", Side::Gpu, 7),
        "sb-0123abcd-p1-gpu-7"
    );
    let long_a = format!("{}a", "x".repeat(62));
    let long_b = format!("{}b", "x".repeat(62));
    let a = machine_label(prefix, &long_a, Side::Cpu, 123_456);
    let b = machine_label(prefix, &long_b, Side::Cpu, 123_456);
    for l in [&a, &b] {
        assert!(check_name(l).is_ok(), "{l}");
        assert!(
            l.starts_with("sb-0123abcd-xxx") && l.ends_with("-cpu-123456"),
            "{l}"
        );
    }
    assert_ne!(a, b, "two long names sharing a prefix get distinct labels");
    // A cut that ends on a separator does not leave two in a row.
    let dashed = format!("{}-{}", "y".repeat(30), "z".repeat(32));
    let l = machine_label(prefix, &dashed, Side::Gpu, 1);
    assert!(check_name(&l).is_ok() && !l.contains("--"), "{l}");
}
