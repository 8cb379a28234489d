//! The level-triggered commands for agents: what each agent should hold, recomputed from the
//! persisted record alone, so that resending it after any restart is always right.

use super::{Desired, PairMachine, PairState};
use crate::proto::state::MachineRecord;
use crate::types::Side;

impl PairMachine {
    /// What each agent should have been told, given the record. The engine sends whatever the
    /// agent's current connection has not received yet.
    pub fn desired(&self, side: Side) -> Vec<Desired> {
        let epoch = self.epoch();
        let url = |m: &Option<MachineRecord>| {
            m.as_ref()
                .map(|m| m.address.clone())
                .filter(|a| !a.is_empty())
        };
        let state = self.state();
        if state == PairState::Rebuilding && side == Side::Cpu {
            return vec![Desired::Seed {
                epoch,
                snapshot: self.rec.seed_snapshot.clone(),
            }];
        }
        if matches!(state, PairState::Restoring | PairState::CuttingOver) {
            // The CPU (primary) sends its workspace to the new GPU, which receives.
            return match side {
                Side::Gpu => vec![Desired::Receive { epoch }],
                Side::Cpu => {
                    let mut v: Vec<Desired> = url(&self.rec.gpu)
                        .map(|url| Desired::SetPeer { url, epoch })
                        .into_iter()
                        .collect();
                    if state == PairState::CuttingOver {
                        v.push(Desired::Freeze { epoch });
                    }
                    v
                }
            };
        }
        match (side, self.primary()) {
            (Side::Gpu, Side::Gpu) => match url(&self.rec.cpu) {
                Some(url) => {
                    let mut v = vec![Desired::SetPeer { url, epoch }];
                    if self.rec.hibernate {
                        v.push(Desired::Freeze { epoch });
                    }
                    v
                }
                None => vec![],
            },
            (Side::Gpu, Side::Cpu) => vec![Desired::Fence {
                epoch,
                reason: format!("the CPU standby is the primary since epoch {epoch}"),
            }],
            (Side::Cpu, Side::Gpu) => {
                let mut v = vec![Desired::Receive { epoch }];
                v.extend(url(&self.rec.gpu).map(|url| Desired::Probe { url }));
                v
            }
            (Side::Cpu, Side::Cpu) => vec![Desired::Promote { epoch }],
        }
    }
}
