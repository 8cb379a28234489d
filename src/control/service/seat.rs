//! What this coordinator is to its clients (ARCHITECTURE.md, "Highly available coordinators"):
//! the leader, which serves every call, or a follower, which serves `Leadership`, health and
//! metrics, and refuses every other call UNAVAILABLE naming the leader (its advertised address
//! in the message and in the `standby-leader` metadata, [`crate::proto::LEADER_METADATA`]), so
//! agents and admin clients go straight to it instead of trying each address in turn.
//!
//! A coordinator changes its seat once at most: a follower that wins leads until it stops (a
//! leader that steps down exits, and its supervisor starts it again as a follower). Health
//! follows the seat: `standby.v1.Coordinator` is SERVING on the leader only.

use std::sync::{Arc, RwLock};

use tonic::Status;
use tonic::metadata::MetadataValue;
use tonic_health::server::HealthReporter;

use super::{CoordinatorSvc, Shared};
use crate::control::store::Store;
use crate::proto::coordinator_server::CoordinatorServer;

/// The leader as a follower last saw it in the election (empty address: none yet).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pointer {
    pub address: String,
    pub term: i64,
}

#[derive(Clone)]
enum Standing {
    /// Following: the shared state (read for `Leadership`) and who leads (only on etcd).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    Following {
        store: Arc<dyn Store>,
        leader: Pointer,
    },
    Leading(Arc<Shared>),
}

/// The seat, shared by the gRPC services and whoever campaigns.
#[derive(Clone)]
pub struct Seat {
    standing: Arc<RwLock<Standing>>,
    health: HealthReporter,
}

impl Seat {
    /// The seat of a leader from the start (the file store: the only coordinator leads).
    pub async fn leading(shared: Arc<Shared>) -> Seat {
        let seat = Seat::new(Standing::Leading(shared));
        seat.health
            .set_serving::<CoordinatorServer<CoordinatorSvc>>()
            .await;
        seat
    }

    /// A follower's seat, before it has seen a leader.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub async fn following(store: Arc<dyn Store>) -> Seat {
        let seat = Seat::new(Standing::Following {
            store,
            leader: Pointer::default(),
        });
        seat.health
            .set_not_serving::<CoordinatorServer<CoordinatorSvc>>()
            .await;
        seat
    }

    fn new(standing: Standing) -> Seat {
        Seat {
            standing: Arc::new(RwLock::new(standing)),
            health: HealthReporter::new(),
        }
    }

    /// What `grpc.health.v1` answers from.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// A follower saw `leader` lead, or (its own address) won and is loading the state; a
    /// leader ignores it.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub fn follows(&self, leader: Pointer) {
        let mut s = self.standing.write().expect("seat lock");
        if let Standing::Following { leader: l, .. } = &mut *s {
            *l = leader;
        }
    }

    /// This coordinator won: from now on it serves every call.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub async fn lead(&self, shared: Arc<Shared>) {
        *self.standing.write().expect("seat lock") = Standing::Leading(shared);
        self.health
            .set_serving::<CoordinatorServer<CoordinatorSvc>>()
            .await;
    }

    /// The leader's state, or (a follower) the refusal that names the leader.
    pub fn shared(&self) -> Result<Arc<Shared>, Status> {
        match &*self.standing.read().expect("seat lock") {
            Standing::Leading(s) => Ok(s.clone()),
            Standing::Following { leader, .. } => Err(refusal(leader)),
        }
    }

    /// The follower's view of the shared state (None on the leader).
    pub fn following_store(&self) -> Option<Arc<dyn Store>> {
        match &*self.standing.read().expect("seat lock") {
            Standing::Leading(_) => None,
            Standing::Following { store, .. } => Some(store.clone()),
        }
    }
}

/// A follower's answer to a call only the leader serves: UNAVAILABLE (try again elsewhere),
/// naming the leader when one is known.
pub fn refusal(leader: &Pointer) -> Status {
    if leader.address.is_empty() {
        return Status::unavailable(
            "this coordinator follows and no leader is elected yet: try again shortly",
        );
    }
    let mut s = Status::unavailable(format!(
        "this coordinator does not serve as the leader (yet); the leader is {} (term {}): call it there",
        leader.address, leader.term
    ));
    if let Ok(v) = MetadataValue::try_from(leader.address.as_str()) {
        s.metadata_mut().insert(crate::proto::LEADER_METADATA, v);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_leader_in_its_metadata() {
        let s = refusal(&Pointer {
            address: "10.0.0.2:7700".into(),
            term: 42,
        });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().contains("10.0.0.2:7700 (term 42)"), "{s:?}");
        assert_eq!(
            crate::proto::leader_named(&s).as_deref(),
            Some("10.0.0.2:7700")
        );
    }

    #[test]
    fn without_a_leader_the_refusal_names_none() {
        let s = refusal(&Pointer::default());
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(crate::proto::leader_named(&s), None);
        // An address that cannot travel as metadata still reaches the message.
        let odd = refusal(&Pointer {
            address: "höst:7700".into(),
            term: 1,
        });
        assert_eq!(crate::proto::leader_named(&odd), None);
        assert!(odd.message().contains("höst:7700"));
    }
}
