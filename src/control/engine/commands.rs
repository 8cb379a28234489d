//! The commands each agent should have. They are recomputed from the pair's record every time
//! (level-triggered), a connection is sent only what it has not had yet, and nothing goes out
//! while the record is not durable.

use super::Actor;
use crate::control::failover::Desired;
use crate::proto::{Command, Fence, Freeze, ProbeTarget, Promote, Receive, SetPeer, command};
use crate::types::Side;

/// A desired command as the protocol carries it.
pub(super) fn command_for(d: &Desired) -> Command {
    Command {
        cmd: Some(match d {
            Desired::SetPeer { url, epoch } => command::Cmd::SetPeer(SetPeer {
                machine: String::new(),
                url: url.clone(),
                epoch: epoch.0,
            }),
            Desired::Promote { epoch } => command::Cmd::Promote(Promote { epoch: epoch.0 }),
            Desired::Fence { epoch, reason } => command::Cmd::Fence(Fence {
                epoch: epoch.0,
                reason: reason.clone(),
            }),
            Desired::Probe { url } => command::Cmd::Probe(ProbeTarget {
                url: url.clone(),
                machine: String::new(),
            }),
            Desired::Receive { epoch } => command::Cmd::Receive(Receive {
                epoch: epoch.0,
                peer: String::new(),
            }),
            Desired::Freeze { epoch } => command::Cmd::Freeze(Freeze { epoch: epoch.0 }),
        }),
    }
}

impl Actor {
    /// Sends each connected agent what it should have been told and has not been.
    pub(super) fn sync_commands(&mut self, pair: &str) {
        let Some(e) = self.pairs.get_mut(pair) else {
            return;
        };
        if e.blocked {
            return;
        }
        for side in Side::ALL {
            let desired = e.m.desired(side);
            let Some(c) = e.conns[side].as_mut() else {
                continue;
            };
            let mut sent = Vec::new();
            for d in &desired {
                if c.sent.contains(d) || c.tx.try_send(Ok(command_for(d))).is_ok() {
                    sent.push(d.clone());
                }
            }
            c.sent = sent;
        }
    }
}
