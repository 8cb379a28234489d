//! What every handler ends with: carrying out the actions the pair's machine returned. The
//! record goes to the store's writer first (one that must be durable holds the pair's commands
//! and provider calls until the writer confirms it; a failed write goes again), then events,
//! metrics and notifications are recorded, then the agents are told what the record now says
//! (nothing while it is held). The writer's answers come back here (`on_written`).

use super::Actor;
use super::events::event;
use super::views::proto_state;
use super::writer::Write;
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

    /// Hands the record to the writer now when the actions say so, holding the pair's commands
    /// until it is written, or with the next batch.
    fn persist(&mut self, pair: &str, actions: &[Action]) {
        if actions.contains(&Action::Persist) {
            self.write_now(pair);
        } else if actions.contains(&Action::PersistSoon) {
            self.soon.insert(pair.to_string());
        }
    }

    /// Hands `pair`'s record to the writer; its commands are held until it is written.
    pub(super) fn write_now(&mut self, pair: &str) {
        let seq = self.submit(pair);
        let e = self.pairs.get_mut(pair).expect("checked");
        e.blocked = true;
        e.want = seq;
        self.soon.remove(pair);
    }

    /// Hands `pair`'s record as it is now to the writer; the write's number.
    pub(super) fn submit(&mut self, pair: &str) -> u64 {
        self.seq += 1;
        let rec = self.pairs[pair].m.rec.clone();
        match &self.writer {
            Some(w) => w.submit(self.seq, rec),
            None => tracing::error!(pair, "the store writer stopped; the record was not written"),
        }
        self.seq
    }

    /// The writer's answer. Written: what each record retired is retired, and a pair waiting
    /// for this write (or an older one) is released: its commands, provider calls and held
    /// answers go out. Not written: each pair goes with the next batch, and one that was held
    /// stays held.
    pub(super) fn on_written(&mut self, writes: Vec<Write>, error: Option<String>) {
        if let Some(err) = error {
            tracing::error!(records = writes.len(), error = %err, "cannot persist pair records; holding the commands of those that must be durable, writing again");
            for w in writes {
                if self.pairs.contains_key(&w.rec.name) {
                    self.soon.insert(w.rec.name);
                }
            }
            return;
        }
        for w in writes {
            let pair = w.rec.name.clone();
            let Some(e) = self.pairs.get_mut(&pair) else {
                continue;
            };
            let released = e.blocked && w.seq >= e.want;
            if released {
                e.blocked = false;
            }
            self.after_write(&pair, w.rec);
            if released {
                self.sync_commands(&pair);
                self.drive_provider(&pair);
                self.release_answers(&pair);
            }
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
