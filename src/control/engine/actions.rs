//! What every handler ends with: carrying out the actions the pair's machine returned. The
//! record is written first (a failed write holds the pair's commands until it succeeds), then
//! events, metrics and notifications are recorded, then the agents are told what the record
//! now says.

use super::Actor;
use super::events::event;
use super::views::proto_state;
use crate::control::failover::{Action, PairState};
use crate::control::metrics::{PairLabel, TransitionLabel};
use crate::control::notify::{Notice, NoticeKind};
use crate::proto::{Event, EventKind};

impl Actor {
    /// Carries out a machine's actions: persist first, then events, metrics and commands.
    pub(super) fn act(&mut self, pair: &str, actions: Vec<Action>) {
        let Some(e) = self.pairs.get(pair) else {
            return;
        };
        let epoch = e.m.epoch().0;
        self.persist(pair, &actions);
        for a in actions {
            self.record(pair, epoch, a);
        }
        self.sync_commands(pair);
    }

    /// Writes the record now when the actions say so (blocking the pair's commands while that
    /// fails), or with the next batch.
    fn persist(&mut self, pair: &str, actions: &[Action]) {
        let e = self.pairs.get_mut(pair).expect("checked");
        if actions.contains(&Action::Persist) {
            match self.store.put_pairs(std::slice::from_ref(&e.m.rec), true) {
                Ok(()) => {
                    e.blocked = false;
                    self.soon.remove(pair);
                    self.after_write(pair);
                }
                Err(err) => {
                    tracing::error!(pair, error = %err, "cannot persist the pair; holding its commands until it is written");
                    e.blocked = true;
                }
            }
        } else if actions.contains(&Action::PersistSoon) {
            self.soon.insert(pair.to_string());
        }
    }

    /// The events, metrics and notification of one action.
    fn record(&mut self, pair: &str, epoch: u64, a: Action) {
        if let Some(kind) = NoticeKind::of(&a) {
            self.notify(pair, epoch, kind, &a);
        }
        let l = PairLabel { pair: pair.into() };
        match a {
            Action::Persist | Action::PersistSoon | Action::AttemptFailed => {}
            Action::Transition { from, to, reason } => {
                self.transition(pair, epoch, from, to, reason)
            }
            Action::Warn { kind, message } => {
                if kind == EventKind::Blind {
                    self.metrics.blind.get_or_create(&l).inc();
                }
                self.events.emit(Event {
                    epoch,
                    ..event(pair, kind, message)
                });
            }
            Action::Detected(d) => self.metrics.detect_seconds.observe(d.as_secs_f64()),
            Action::Recovered { after, since } => {
                self.metrics.recovery_seconds.observe(after.as_secs_f64());
                let message = format!("protected again {} ms after {since}", after.as_millis());
                self.events.emit(Event {
                    epoch,
                    ..event(pair, EventKind::Recovered, message)
                });
            }
            Action::FailedOver => {
                self.metrics.failovers.get_or_create(&l).inc();
                let reason = self.pairs[pair].m.rec.reason.clone();
                self.events.emit(Event {
                    epoch,
                    to_state: proto_state(PairState::FailedOver),
                    ..event(pair, EventKind::Failover, reason)
                });
            }
        }
    }

    /// Hands the news to the webhooks' queues (ARCHITECTURE.md, "Notifications"): the text is
    /// the transition's reason, the failover's reason or the failed attempt's error.
    fn notify(&self, pair: &str, epoch: u64, kind: NoticeKind, a: &Action) {
        let rec = &self.pairs[pair].m.rec;
        let text = match a {
            Action::Transition { reason, .. } => reason.clone(),
            Action::AttemptFailed => rec
                .provision
                .as_ref()
                .map(|p| p.last_error.clone())
                .unwrap_or_default(),
            _ => rec.reason.clone(),
        };
        let now = crate::host::unix_ms_now();
        self.notifier
            .send(Notice::new(pair, kind, epoch, now, text));
    }

    /// A state change: its gauges, counter and event.
    fn transition(
        &mut self,
        pair: &str,
        epoch: u64,
        from: PairState,
        to: PairState,
        reason: String,
    ) {
        self.metrics.set_state(pair, Some(from), to);
        self.metrics
            .pair_epoch
            .get_or_create(&PairLabel { pair: pair.into() })
            .set(epoch as i64);
        self.metrics
            .transitions
            .get_or_create(&TransitionLabel {
                from: from.as_str().into(),
                to: to.as_str().into(),
            })
            .inc();
        self.events.emit(Event {
            from_state: proto_state(from),
            to_state: proto_state(to),
            epoch,
            ..event(pair, EventKind::Transition, reason)
        });
    }
}
