//! Time passing. Every tick steps each pair (with detection's time, `clock`) and starts the
//! provider polls and sweeps that are due; every fifth also hands the batched records to the
//! writer (with those whose write failed), refreshes the gauges and sends heartbeat summaries.

use std::time::{Duration, Instant};

use super::Actor;
use super::events::event;
use crate::control::failover::Input;
use crate::control::metrics::CertLabel;
use crate::control::metrics::{PairLabel, PairSideLabel, RoleLabel};
use crate::host::unix_ms_now;
use crate::proto::{Event, EventKind, MachineView};
use crate::types::{PerSide, Side};

impl Actor {
    /// Time passes for every pair, up to `at` (detection's time: behind the wall clock while
    /// inputs wait in the queue); every fifth tick (`slow`) also writes the batch, refreshes the
    /// gauges and sends heartbeat summaries.
    pub(super) fn tick(&mut self, at: Instant, slow: bool) {
        let now = Instant::now();
        self.metrics
            .engine_behind
            .set(self.clock.behind(now).as_secs_f64());
        let names: Vec<String> = self.pairs.keys().cloned().collect();
        for name in &names {
            self.tick_pair(name, at);
        }
        self.tick_provider(now);
        self.report_refused_handshakes();
        if slow {
            self.flush_soon();
            self.refresh_metrics(now);
            self.summaries(&names, now);
        }
    }

    /// One pair's tick.
    fn tick_pair(&mut self, name: &str, now: Instant) {
        let e = self.pairs.get_mut(name).expect("listed");
        e.m.wall_ms = unix_ms_now();
        let actions = e.m.step(Input::Tick(now), &self.timing);
        if !actions.is_empty() {
            self.act(name, actions);
        }
        self.drive_provider(name);
    }

    /// Polls the provider and sweeps orphans, each on its own interval.
    fn tick_provider(&mut self, now: Instant) {
        let Some(p) = self.prov.clone() else {
            return;
        };
        if now.duration_since(self.last_poll) >= p.cfg.poll_interval {
            self.last_poll = now;
            self.poll_provider();
        }
        if now.duration_since(self.last_sweep) >= p.cfg.sweep_interval {
            self.last_sweep = now;
            self.sweep();
        }
    }

    /// A heartbeat summary of each pair, every 5 s while someone asked for them.
    fn summaries(&mut self, names: &[String], now: Instant) {
        if self.hb_subscribers <= 0
            || now.duration_since(self.last_summary) < Duration::from_secs(5)
        {
            return;
        }
        self.last_summary = now;
        for name in names {
            self.events.emit(self.summary(name));
        }
    }

    /// One line about a pair's heartbeats, lag and generation.
    fn summary(&self, name: &str) -> Event {
        let v = self.view(name);
        let age = |m: &Option<MachineView>| {
            m.as_ref().map_or("absent".into(), |m| {
                format!("{} ms ago", m.last_heartbeat_ms)
            })
        };
        let message = format!(
            "gpu {} cpu {} lag {} ms generation {}",
            age(&v.gpu),
            age(&v.cpu),
            v.sync_lag_ms,
            v.last_durable_generation
        );
        Event {
            epoch: v.epoch,
            to_state: v.state,
            ..event(name, EventKind::Heartbeat, message)
        }
    }

    /// Hands the records batched for later to the writer, which writes them together (a
    /// failed write puts them back in the batch: `on_written`).
    pub(super) fn flush_soon(&mut self) {
        for pair in std::mem::take(&mut self.soon) {
            if self.pairs.contains_key(&pair) {
                self.submit(&pair);
            }
        }
    }

    /// The gauges that move with time rather than with inputs.
    fn refresh_metrics(&self, now: Instant) {
        self.count_machines();
        self.cert_metrics();
        for (name, e) in &self.pairs {
            for (side, seen) in e.m.seen.iter() {
                if let Some(t) = seen.last_seen {
                    self.metrics
                        .heartbeat_age
                        .get_or_create(&PairSideLabel {
                            pair: name.clone(),
                            side: side.as_str().into(),
                        })
                        .set(now.duration_since(t).as_secs_f64());
                }
            }
            let g = &e.figures.gpu;
            let l = PairLabel { pair: name.clone() };
            let progress = match e.restore_bytes() {
                None => 0.0,
                Some((_, 0)) => 1.0,
                Some((done, total)) => (done as f64 / total as f64).min(1.0),
            };
            self.metrics
                .restore_progress
                .get_or_create(&l)
                .set(progress);
            self.metrics
                .last_durable_generation
                .get_or_create(&l)
                .set(e.figures.cpu.generation.max(g.generation) as i64);
        }
    }

    /// Provider machines owned, being created or being destroyed, by role.
    fn count_machines(&self) {
        let mut count = PerSide::<i64>::default();
        for e in self.pairs.values() {
            let r = &e.m.rec;
            count.gpu += i64::from(r.gpu_owned.is_some());
            count.cpu += i64::from(r.cpu_owned.is_some());
            for m in r
                .teardown
                .iter()
                .chain(r.provision.iter().filter_map(|p| p.machine.as_ref()))
            {
                count[Side::from_record(m.role())] += 1;
            }
        }
        for (side, &n) in count.iter() {
            self.metrics
                .machines
                .get_or_create(&RoleLabel {
                    role: side.as_str().into(),
                })
                .set(n);
        }
    }

    /// The expiry of each current machine's newest live certificate; the deny list loses
    /// what expired.
    fn cert_metrics(&self) {
        self.registry.refresh();
        let rows = self
            .registry
            .expiries()
            .into_iter()
            .map(|((pair, role, machine), not_after)| {
                let l = CertLabel {
                    kind: "agent".into(),
                    pair,
                    role: Side::from_record(role).as_str().into(),
                    machine,
                };
                (l, not_after as i64)
            })
            .collect();
        self.metrics.set_agent_expiries(rows);
    }
}
