//! An operator's requests: creating a pair, and failing over, recovering, hibernating or waking
//! one. The reply carries what the machine said, or why it refused, and goes once what it says
//! is written (`Held`).

use std::time::Instant;

use tokio::sync::oneshot;
use tonic::Status;

use super::events::event;
use super::views::proto_state;
use super::{Actor, Entry};
use crate::control::failover::{Action, Input, PairMachine};
use crate::host::unix_ms_now;
use crate::proto::{ActionReply, EventKind, PairView};

impl Actor {
    /// An operator creates a pair; it must not exist yet.
    pub(super) fn on_create(&mut self, pair: &str) -> Result<PairView, Status> {
        if self.pairs.contains_key(pair) {
            return Err(Status::already_exists(format!(
                "pair {pair} already exists"
            )));
        }
        self.create(pair, Durable::Now)?;
        self.events
            .emit(event(pair, EventKind::Created, "pair created".into()));
        Ok(self.view(pair))
    }

    /// An operator's request: the reply carries what the machine said, or its refusal.
    pub(super) fn on_manual(&mut self, pair: &str, input: Input) -> Result<ActionReply, Status> {
        let Some(e) = self.pairs.get_mut(pair) else {
            return Err(Status::not_found(format!("no pair {pair}")));
        };
        e.m.wall_ms = unix_ms_now();
        let actions = e.m.step(input, &self.timing);
        let (refused, said) = (refusal(&actions), last_word(&actions));
        self.act(pair, actions);
        self.drive_provider(pair);
        if let Some(msg) = refused {
            return Err(Status::failed_precondition(msg));
        }
        let e = &self.pairs[pair];
        Ok(ActionReply {
            pair: pair.to_string(),
            state: proto_state(e.m.state()),
            epoch: e.m.epoch().0,
            message: said.unwrap_or_else(|| e.m.rec.reason.clone()),
        })
    }

    /// A new pair, its name checked. `Now`: its record is written before it exists here (an
    /// operator is told it was created); `Later`: it is handed to the writer, and the pair's
    /// commands are held until it is written (a pair its first agent creates).
    pub(super) fn create(&mut self, pair: &str, durable: Durable) -> Result<(), Status> {
        crate::trust::identity::check_name(pair)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let rec = PairMachine::new_record(pair, unix_ms_now());
        if durable == Durable::Now {
            // No write of this pair can be with the writer: it did not exist.
            self.store
                .put_pairs(std::slice::from_ref(&rec), true)
                .map_err(|e| Status::internal(format!("persisting the new pair: {e}")))?;
        }
        let entry = Entry::resume(pair, rec, Instant::now(), &self.policy, &self.metrics);
        self.pairs.insert(pair.to_string(), entry);
        self.metrics.pairs.set(self.pairs.len() as i64);
        if durable == Durable::Later {
            self.write_now(pair);
        }
        Ok(())
    }

    /// Sends an operator's answer about `pair` once the pair's record is written (at once when
    /// nothing about it waits for the writer).
    pub(super) fn answer_when_written(
        &mut self,
        pair: &str,
        reply: oneshot::Sender<Result<ActionReply, Status>>,
        answer: Result<ActionReply, Status>,
    ) {
        if self.pairs.get(pair).is_some_and(|e| e.blocked) {
            self.replies
                .entry(pair.to_string())
                .or_default()
                .push(Held { reply, answer });
        } else {
            let _ = reply.send(answer);
        }
    }

    /// The answers held for `pair`, now that its record is written.
    pub(super) fn release_answers(&mut self, pair: &str) {
        for h in self.replies.remove(pair).unwrap_or_default() {
            let _ = h.reply.send(h.answer);
        }
    }
}

/// When a new pair's record must be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Durable {
    Now,
    Later,
}

/// An operator's answer, held until its pair's record is written.
pub(super) struct Held {
    reply: oneshot::Sender<Result<ActionReply, Status>>,
    answer: Result<ActionReply, Status>,
}

/// Why the machine refused an operator's request, if it did.
fn refusal(actions: &[Action]) -> Option<String> {
    actions.iter().find_map(|a| match a {
        Action::Warn {
            kind: EventKind::Refused,
            message,
        } => Some(message.clone()),
        _ => None,
    })
}

/// The last thing the machine said about a request (a transition's reason or a warning).
fn last_word(actions: &[Action]) -> Option<String> {
    actions.iter().rev().find_map(|a| match a {
        Action::Transition { reason, .. } => Some(reason.clone()),
        Action::Warn { message, .. } => Some(message.clone()),
        _ => None,
    })
}
