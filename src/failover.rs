//! Failure detection and failover for one pair: a pure state machine.
//!
//! Events and time go in ([`Input`]), decisions come out ([`Action`]); there is no I/O here. The
//! caller (the coordinator's engine) persists the record whenever an action says so, *before*
//! acting on anything else in the same batch, and sends agents what [`PairMachine::desired`]
//! says they should be told. That second part is level-triggered: it is recomputed from the
//! persisted record and the agents' reports, so a coordinator that restarts in the middle of a
//! failover simply tells each agent again what the record says (promote the CPU at epoch N,
//! fence the GPU), and nothing depends on which step it had reached.
//!
//! Invariant 5 (no false failover) lives in [`PairMachine::tick`]: silence from the GPU agent is
//! only acted on when the CPU agent confirms it has lost the GPU too (its own probe), or the
//! provider says the machine is gone; a fatal fault reported by the GPU agent itself fails over
//! at once. Heartbeat ages never count time the coordinator itself was down.

use std::time::{Duration, Instant};

use crate::proto::state::{MachineRecord, PairRecord};
use crate::types::Epoch;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PairState {
    /// Created; waiting for both agents.
    Pending,
    /// Healthy: the GPU is primary and replicates to the CPU.
    Syncing,
    /// The GPU agent missed heartbeats.
    Suspect,
    /// The CPU is primary; the failed GPU is fenced.
    FailedOver,
    Provisioning,
    Restoring,
    CuttingOver,
    Hibernated,
    /// The CPU standby is lost; the GPU is unprotected.
    Degraded,
}

impl PairState {
    pub const ALL: [PairState; 9] = [
        PairState::Pending,
        PairState::Syncing,
        PairState::Suspect,
        PairState::FailedOver,
        PairState::Provisioning,
        PairState::Restoring,
        PairState::CuttingOver,
        PairState::Hibernated,
        PairState::Degraded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PairState::Pending => "Pending",
            PairState::Syncing => "Syncing",
            PairState::Suspect => "Suspect",
            PairState::FailedOver => "FailedOver",
            PairState::Provisioning => "Provisioning",
            PairState::Restoring => "Restoring",
            PairState::CuttingOver => "CuttingOver",
            PairState::Hibernated => "Hibernated",
            PairState::Degraded => "Degraded",
        }
    }

    pub fn parse(s: &str) -> Option<PairState> {
        PairState::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl std::fmt::Display for PairState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Gpu,
    Cpu,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Gpu => "gpu",
            Side::Cpu => "cpu",
        }
    }
}

/// Detection timing (DESIGN.md "Defaults").
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub heartbeat: Duration,
    pub suspect_after_missed: u32,
    pub failover_after: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            heartbeat: Duration::from_secs(1),
            suspect_after_missed: 2,
            failover_after: Duration::from_secs(3),
        }
    }
}

/// The CPU agent's view of the GPU, as of one of its reports.
#[derive(Clone, Copy, Debug)]
pub struct Contact {
    /// Age of the last successful probe of the GPU agent when reported; None: never succeeded.
    pub probe_ok_age: Option<Duration>,
    pub reported_at: Instant,
}

impl Contact {
    /// How long the CPU has been unable to reach the GPU, as of `now`.
    pub fn lost_for(&self, now: Instant) -> Option<Duration> {
        self.probe_ok_age
            .map(|age| age + now.saturating_duration_since(self.reported_at))
    }
}

/// What the coordinator has seen of one agent (not persisted: rebuilt from heartbeats).
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub last_seen: Option<Instant>,
    pub connected: bool,
    pub epoch: Epoch,
    pub fatal: Option<String>,
    pub contact: Option<Contact>,
}

/// A report from an agent, reduced to what detection needs.
#[derive(Clone, Debug)]
pub struct Report {
    pub at: Instant,
    pub epoch: Epoch,
    /// GPU agent: a fatal GPU fault it saw (NVML Xid, uncorrectable ECC, lost device).
    pub fatal: Option<String>,
    /// CPU agent: its contact with the GPU.
    pub probe_ok_age: Option<Option<Duration>>,
    pub machine: Option<MachineRecord>,
}

#[derive(Clone, Debug)]
pub enum Input {
    Report(Side, Report),
    Disconnected(Side, Instant),
    Tick(Instant),
    /// An operator asked for a failover.
    Manual(Instant),
    /// The provider says this side's machine is gone (terminated, preempted, destroyed).
    ProviderGone(Side, Instant),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write the record durably before anything else in this batch is acted on.
    Persist,
    /// The record changed in a way that can be written with the next batch (a machine's
    /// address): losing it in a crash costs nothing, the agent reports it again.
    PersistSoon,
    Transition {
        from: PairState,
        to: PairState,
        reason: String,
    },
    /// A warning worth an event and a metric, but no transition.
    Warn { kind: &'static str, message: String },
    /// A failure was detected this long after the GPU was last heard from.
    Detected(Duration),
    /// A failover happened (counted in metrics).
    FailedOver,
}

/// A command an agent should have received for the current record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Desired {
    SetPeer { url: String, epoch: Epoch },
    Promote { epoch: Epoch },
    Fence { epoch: Epoch, reason: String },
    Probe { url: String },
}

pub struct PairMachine {
    pub rec: PairRecord,
    pub gpu: Seen,
    pub cpu: Seen,
    /// When this coordinator started: silence is never counted from before it.
    started: Instant,
    /// Whether the "coordinator lost sight" warning was already given for this silence.
    warned_blind: bool,
}

pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl PairMachine {
    pub fn new_record(name: &str) -> PairRecord {
        PairRecord {
            name: name.to_string(),
            state: PairState::Pending.as_str().into(),
            epoch: 1,
            primary: Side::Gpu.as_str().into(),
            changed_unix_ms: unix_ms_now(),
            ..Default::default()
        }
    }

    /// Resumes a persisted record (a fresh pair, or after a coordinator restart).
    pub fn resume(rec: PairRecord, now: Instant) -> PairMachine {
        PairMachine {
            rec,
            gpu: Seen::default(),
            cpu: Seen::default(),
            started: now,
            warned_blind: false,
        }
    }

    pub fn state(&self) -> PairState {
        PairState::parse(&self.rec.state).unwrap_or(PairState::Pending)
    }

    pub fn epoch(&self) -> Epoch {
        Epoch(self.rec.epoch)
    }

    pub fn primary(&self) -> Side {
        if self.rec.primary == "cpu" {
            Side::Cpu
        } else {
            Side::Gpu
        }
    }

    fn seen(&mut self, side: Side) -> &mut Seen {
        match side {
            Side::Gpu => &mut self.gpu,
            Side::Cpu => &mut self.cpu,
        }
    }

    fn go(&mut self, to: PairState, reason: String, out: &mut Vec<Action>) {
        let from = self.state();
        if from == to {
            return;
        }
        self.rec.state = to.as_str().into();
        self.rec.reason = reason.clone();
        self.rec.changed_unix_ms = unix_ms_now();
        out.push(Action::Persist);
        out.push(Action::Transition { from, to, reason });
    }

    /// Silence of the GPU agent as the coordinator sees it (never counting its own downtime).
    pub fn gpu_silence(&self, now: Instant) -> Duration {
        let since = self
            .gpu
            .last_seen
            .map_or(self.started, |t| t.max(self.started));
        now.saturating_duration_since(since)
    }

    fn cpu_fresh(&self, now: Instant, t: &Timing) -> bool {
        self.cpu
            .last_seen
            .is_some_and(|s| now.saturating_duration_since(s) <= t.heartbeat * 2 + t.heartbeat / 2)
    }

    pub fn step(&mut self, input: Input, t: &Timing) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Report(side, r) => {
                let at = r.at;
                let seen = self.seen(side);
                seen.last_seen = Some(at);
                seen.connected = true;
                seen.epoch = r.epoch;
                if side == Side::Gpu {
                    seen.fatal = r.fatal.clone();
                }
                if let Some(p) = r.probe_ok_age {
                    seen.contact = Some(Contact {
                        probe_ok_age: p,
                        reported_at: at,
                    });
                }
                if let Some(m) = r.machine {
                    let slot = match side {
                        Side::Gpu => &mut self.rec.gpu,
                        Side::Cpu => &mut self.rec.cpu,
                    };
                    if slot.as_ref() != Some(&m) {
                        *slot = Some(m);
                        out.push(Action::PersistSoon);
                    }
                }
                match (side, self.state()) {
                    (Side::Gpu, _) if r.fatal.is_some() && self.primary() == Side::Gpu => {
                        let why = r.fatal.unwrap_or_default();
                        self.fail_over(
                            format!("GPU agent reported a fatal fault: {why}"),
                            at,
                            Duration::ZERO,
                            &mut out,
                        );
                    }
                    (Side::Gpu, PairState::Suspect) => {
                        self.warned_blind = false;
                        self.go(
                            PairState::Syncing,
                            "GPU agent heard from again".into(),
                            &mut out,
                        );
                    }
                    (_, PairState::Pending) if self.rec.gpu.is_some() && self.rec.cpu.is_some() => {
                        self.go(PairState::Syncing, "both agents joined".into(), &mut out);
                    }
                    _ => {}
                }
            }
            Input::Disconnected(side, _) => {
                self.seen(side).connected = false;
            }
            Input::Tick(now) => self.tick(now, t, &mut out),
            Input::Manual(now) => {
                if self.primary() == Side::Gpu {
                    let silence = self.gpu_silence(now);
                    self.fail_over(
                        "failover requested by an operator".into(),
                        now,
                        silence,
                        &mut out,
                    );
                    // A deliberate failover is not a detection.
                    out.retain(|a| !matches!(a, Action::Detected(_)));
                } else {
                    out.push(Action::Warn {
                        kind: "refused",
                        message: "failover refused: the CPU is already the primary".into(),
                    });
                }
            }
            Input::ProviderGone(side, now) => {
                if side == Side::Gpu && self.primary() == Side::Gpu && self.rec.cpu.is_some() {
                    let silence = self.gpu_silence(now);
                    self.fail_over(
                        "the provider reports the GPU machine gone".into(),
                        now,
                        silence,
                        &mut out,
                    );
                }
            }
        }
        out
    }

    fn tick(&mut self, now: Instant, t: &Timing, out: &mut Vec<Action>) {
        let state = self.state();
        if !matches!(state, PairState::Syncing | PairState::Suspect) || self.primary() != Side::Gpu
        {
            return;
        }
        let silence = self.gpu_silence(now);
        if silence < t.heartbeat * t.suspect_after_missed {
            return;
        }
        if state == PairState::Syncing {
            self.go(
                PairState::Suspect,
                format!(
                    "no heartbeat from the GPU agent for {} ms",
                    silence.as_millis()
                ),
                out,
            );
        }
        if silence < t.failover_after {
            return;
        }
        let cpu_fresh = self.cpu_fresh(now, t);
        let cpu_lost_gpu = cpu_fresh
            && self
                .cpu
                .contact
                .as_ref()
                .is_some_and(|c| c.lost_for(now).is_none_or(|d| d >= t.failover_after));
        if cpu_lost_gpu {
            self.fail_over(
                format!(
                    "GPU agent silent for {} ms and the CPU agent cannot reach it either",
                    silence.as_millis()
                ),
                now,
                silence,
                out,
            );
        } else if !self.warned_blind {
            self.warned_blind = true;
            let message = if cpu_fresh {
                "the coordinator lost sight of the GPU agent, but the CPU agent still reaches it: not failing over".to_string()
            } else {
                "the GPU agent is silent but the CPU agent cannot confirm (it is silent too): not failing over".to_string()
            };
            out.push(Action::Warn {
                kind: "blind",
                message,
            });
        }
    }

    fn fail_over(
        &mut self,
        reason: String,
        _now: Instant,
        silence: Duration,
        out: &mut Vec<Action>,
    ) {
        if self.rec.cpu.is_none() {
            out.push(Action::Warn {
                kind: "refused",
                message: format!("cannot fail over ({reason}): no CPU standby has joined"),
            });
            return;
        }
        // Epoch first: persisted with the transition, before any agent is told.
        self.rec.epoch += 1;
        self.rec.primary = Side::Cpu.as_str().into();
        self.warned_blind = false;
        self.go(PairState::FailedOver, reason, out);
        out.push(Action::Detected(silence));
        out.push(Action::FailedOver);
    }

    /// What each agent should have been told, given the record. The engine sends whatever the
    /// agent's current connection has not received yet.
    pub fn desired(&self, side: Side) -> Vec<Desired> {
        let epoch = self.epoch();
        let url = |m: &Option<MachineRecord>| {
            m.as_ref()
                .map(|m| m.address.clone())
                .filter(|a| !a.is_empty())
        };
        match (side, self.primary()) {
            (Side::Gpu, Side::Gpu) => match url(&self.rec.cpu) {
                Some(url) => vec![Desired::SetPeer { url, epoch }],
                None => vec![],
            },
            (Side::Gpu, Side::Cpu) => vec![Desired::Fence {
                epoch,
                reason: format!("the CPU standby is the primary since epoch {epoch}"),
            }],
            (Side::Cpu, Side::Gpu) => match url(&self.rec.gpu) {
                Some(url) => vec![Desired::Probe { url }],
                None => vec![],
            },
            (Side::Cpu, Side::Cpu) => vec![Desired::Promote { epoch }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn machine(addr: &str) -> Option<MachineRecord> {
        Some(MachineRecord {
            machine: "m".into(),
            address: addr.into(),
            workspace: "/workspace".into(),
        })
    }

    fn report(at: Instant, epoch: u64) -> Report {
        Report {
            at,
            epoch: Epoch(epoch),
            fatal: None,
            probe_ok_age: None,
            machine: None,
        }
    }

    fn cpu_report(at: Instant, probe_ok_age: Option<Duration>) -> Report {
        Report {
            probe_ok_age: Some(probe_ok_age),
            ..report(at, 1)
        }
    }

    /// A pair in Syncing at t0, both agents heard from.
    fn syncing() -> (PairMachine, Instant, Timing) {
        let t0 = Instant::now();
        let t = Timing::default();
        let mut m = PairMachine::resume(PairMachine::new_record("p"), t0);
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

    fn transitions(a: &[Action]) -> Vec<PairState> {
        a.iter()
            .filter_map(|x| match x {
                Action::Transition { to, .. } => Some(*to),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn pending_until_both_agents_join_then_commands() {
        let t0 = Instant::now();
        let t = Timing::default();
        let mut m = PairMachine::resume(PairMachine::new_record("p"), t0);
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
            vec![Desired::Probe {
                url: "g:7702".into()
            }]
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
        // Persist comes before anything else is acted on, with the epoch already raised.
        assert_eq!(a[0], Action::Persist);
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
                .filter(|x| matches!(x, Action::Warn { kind: "blind", .. }))
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
        assert!(a.iter().any(|x| matches!(x, Action::Warn { kind: "blind", message } if message.contains("cannot confirm"))));
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
        let t0 = Instant::now();
        let t = Timing::default();
        let mut rec = PairMachine::new_record("p");
        rec.state = PairState::Syncing.as_str().into();
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
        let t1 = Instant::now() + ms(3_600_000);
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
}
