//! An agent's heartbeat stream. A connection takes its side's slot once it speaks for the
//! machine the pair accepts on that side; a connection speaking for any other machine (an old
//! GPU back from the dead) is kept aside and only ever hears a fence.

use std::time::Instant;

use tokio::sync::mpsc;
use tonic::Status;

use super::Actor;
use super::admin::Durable;
use super::commands::command_for;
use super::events::event;
use crate::control::failover::{Desired, Input};
use crate::proto::{AgentReport, Command, Event, EventKind};
use crate::types::Side;

/// One heartbeat stream, and the commands it has been sent.
pub(super) struct Conn {
    id: u64,
    pub(super) tx: mpsc::Sender<Result<Command, Status>>,
    /// What this connection has been told.
    pub(super) sent: Vec<Command>,
    pub(super) warned_stale: bool,
}

impl Conn {
    fn new(id: u64, tx: mpsc::Sender<Result<Command, Status>>) -> Conn {
        Conn {
            id,
            tx,
            sent: Vec::new(),
            warned_stale: false,
        }
    }
}

impl Actor {
    /// A new heartbeat stream. Which machine it is, is known from its first report.
    pub(super) fn on_connect(
        &mut self,
        pair: &str,
        conn: u64,
        tx: mpsc::Sender<Result<Command, Status>>,
    ) {
        if !self.pairs.contains_key(pair) {
            if let Err(e) = self.create(pair, Durable::Later) {
                let _ = tx.try_send(Err(e));
                return;
            }
            self.events.emit(event(
                pair,
                EventKind::Created,
                "pair created by its first agent".into(),
            ));
        }
        let e = self.pairs.get_mut(pair).expect("created");
        e.others.insert(conn, Conn::new(conn, tx));
    }

    /// A stream ended (handed in at `at`): if it held its side's slot, the side is disconnected
    /// for the machine.
    pub(super) fn on_disconnect(&mut self, pair: &str, side: Side, conn: u64, at: Instant) {
        let Some(e) = self.pairs.get_mut(pair) else {
            return;
        };
        e.others.remove(&conn);
        if e.conns[side].as_ref().is_some_and(|c| c.id == conn) {
            e.conns[side] = None;
            self.metrics.agents_connected.dec();
            let actions = e.m.step(Input::Disconnected(side, at), &self.timing);
            self.act(pair, actions);
        }
    }

    /// Tells a machine the pair does not accept for `side` that it is fenced (once per
    /// connection), and moves its connection out of the side's slot.
    pub(super) fn fence_stranger(&mut self, pair: &str, side: Side, conn: u64, r: &AgentReport) {
        let e = self.pairs.get_mut(pair).expect("checked");
        let c = match e.others.get_mut(&conn) {
            Some(c) => c,
            None => match e.conns[side].take_if(|c| c.id == conn) {
                Some(c) => {
                    self.metrics.agents_connected.dec();
                    e.others.entry(conn).or_insert(c)
                }
                None => return,
            },
        };
        if e.blocked {
            return; // its epoch may not be durable yet: told once it is written, at its next report
        }
        let d = Desired::Fence {
            epoch: e.m.epoch(),
            reason: format!(
                "machine {} is not this pair's {} any more",
                r.machine,
                side.as_str()
            ),
        };
        let cmd = command_for(&d, "");
        if c.sent.contains(&cmd) || c.tx.try_send(Ok(cmd.clone())).is_err() {
            return;
        }
        c.sent = vec![cmd];
        let message = format!(
            "{} ({}) reported at epoch {}; it is not the pair's {}: fenced",
            r.machine,
            side.as_str(),
            r.epoch,
            side.as_str()
        );
        self.events.emit(Event {
            epoch: e.m.epoch().0,
            ..event(pair, EventKind::Fenced, message)
        });
    }

    /// Makes `conn` the side's connection once it speaks for the accepted machine. False when
    /// it was replaced by a newer one.
    pub(super) fn claim(&mut self, pair: &str, side: Side, conn: u64) -> bool {
        let e = self.pairs.get_mut(pair).expect("checked");
        let Some(c) = e.others.remove(&conn) else {
            return e.conns[side].as_ref().is_some_and(|c| c.id == conn);
        };
        if e.conns[side].is_none() {
            self.metrics.agents_connected.inc();
        }
        e.conns[side] = Some(c);
        true
    }
}
