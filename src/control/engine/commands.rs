//! The commands each agent should have. They are recomputed from the pair's record every time
//! (level-triggered), a connection is sent only what it has not had yet, and nothing goes out
//! while the record is not durable. Commands that name a peer (`SetPeer`, `ProbeTarget`,
//! `Receive`) name the machine the record holds on the other side: the only one the agent may
//! talk to (ARCHITECTURE.md, "Trust"). Each carries the store's term (the leader's, on etcd).

use super::Actor;
use crate::control::failover::Desired;
use crate::proto::state::PairRecord;
use crate::proto::{Command, Fence, Freeze, ProbeTarget, Promote, Receive, Seed, SetPeer, command};
use crate::types::Side;

/// The machine the record holds on the other side of `side` ("" while none has reported).
pub(super) fn peer_machine(rec: &PairRecord, side: Side) -> String {
    let other = match side {
        Side::Gpu => &rec.cpu,
        Side::Cpu => &rec.gpu,
    };
    other
        .as_ref()
        .map(|m| m.machine.clone())
        .unwrap_or_default()
}

/// A desired command as the protocol carries it; `peer` is the machine on the other side.
pub(super) fn command_for(d: &Desired, peer: &str) -> Command {
    Command {
        cmd: Some(match d {
            Desired::SetPeer { url, epoch } => command::Cmd::SetPeer(SetPeer {
                machine: peer.to_string(),
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
                machine: peer.to_string(),
            }),
            Desired::Receive { epoch } => command::Cmd::Receive(Receive {
                epoch: epoch.0,
                peer: peer.to_string(),
            }),
            Desired::Freeze { epoch } => command::Cmd::Freeze(Freeze { epoch: epoch.0 }),
            Desired::Seed { epoch, snapshot } => command::Cmd::Seed(Seed {
                epoch: epoch.0,
                snapshot: snapshot.clone(),
            }),
        }),
        // `sync_commands` stamps the store's term.
        term: 0,
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
        let term = self.store.term();
        for side in Side::ALL {
            let peer = peer_machine(&e.m.rec, side);
            let desired = e.m.desired(side);
            let Some(c) = e.conns[side].as_mut() else {
                continue;
            };
            let mut sent = Vec::new();
            for mut cmd in desired.iter().map(|d| command_for(d, &peer)) {
                cmd.term = term;
                if c.sent.contains(&cmd) || c.tx.try_send(Ok(cmd.clone())).is_ok() {
                    sent.push(cmd);
                }
            }
            c.sent = sent;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::state::MachineRecord;
    use crate::types::Epoch;

    /// Commands that name a peer name the machine the record holds on the other side.
    #[test]
    fn peer_commands_name_the_other_sides_machine() {
        let rec = PairRecord {
            gpu: Some(MachineRecord {
                machine: "g1".into(),
                ..Default::default()
            }),
            cpu: Some(MachineRecord {
                machine: "c1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (to_gpu, to_cpu) = (peer_machine(&rec, Side::Gpu), peer_machine(&rec, Side::Cpu));
        assert_eq!((to_gpu.as_str(), to_cpu.as_str()), ("c1", "g1"));
        let set_peer = Desired::SetPeer {
            url: "c:1".into(),
            epoch: Epoch(3),
        };
        match command_for(&set_peer, &to_gpu).cmd {
            Some(command::Cmd::SetPeer(s)) => assert_eq!((s.machine.as_str(), s.epoch), ("c1", 3)),
            other => panic!("{other:?}"),
        }
        match command_for(&Desired::Receive { epoch: Epoch(3) }, &to_cpu).cmd {
            Some(command::Cmd::Receive(r)) => assert_eq!((r.peer.as_str(), r.epoch), ("g1", 3)),
            other => panic!("{other:?}"),
        }
        let probe = Desired::Probe { url: "g:2".into() };
        match command_for(&probe, &to_cpu).cmd {
            Some(command::Cmd::Probe(p)) => assert_eq!(p.machine, "g1"),
            other => panic!("{other:?}"),
        }
        assert_eq!(peer_machine(&PairRecord::default(), Side::Cpu), "");
    }
}
