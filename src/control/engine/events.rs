//! The coordinator's event log: a bounded window of recent events and a live feed of new ones
//! (what `coordinator events` shows).

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::broadcast;

use crate::host::unix_ms_now;
use crate::proto::{Event, EventKind};

const RECENT_EVENTS: usize = 2000;

/// Recent events and a live feed of new ones.
pub struct Events {
    tx: broadcast::Sender<Event>,
    recent: Mutex<VecDeque<Event>>,
}

impl Events {
    pub(super) fn new() -> Events {
        Events {
            tx: broadcast::channel(8192).0,
            recent: Mutex::new(VecDeque::new()),
        }
    }

    pub fn emit(&self, e: Event) {
        tracing::info!(pair = %e.pair, kind = %e.kind(), from = %e.from_state(), to = %e.to_state(), epoch = e.epoch, "{}", e.message);
        let mut r = self.recent.lock().expect("events");
        if r.len() == RECENT_EVENTS {
            r.pop_front();
        }
        r.push_back(e.clone());
        drop(r);
        let _ = self.tx.send(e);
    }

    /// The recent past, oldest first (the status page).
    pub fn recent(&self) -> Vec<Event> {
        self.recent
            .lock()
            .expect("events")
            .iter()
            .cloned()
            .collect()
    }

    /// The recent past, and a receiver for what comes next (no gap between the two).
    pub fn subscribe(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let r = self.recent.lock().expect("events");
        let rx = self.tx.subscribe();
        (r.iter().cloned().collect(), rx)
    }
}

/// An event about `pair` (no states, epoch 0: fill them in with struct update syntax).
pub(super) fn event(pair: &str, kind: EventKind, message: String) -> Event {
    Event {
        unix_ms: unix_ms_now(),
        pair: pair.to_string(),
        kind: kind.into(),
        message,
        ..Default::default()
    }
}
