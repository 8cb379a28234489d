//! Who may replicate in, and at which epoch (ARCHITECTURE.md, "Trust"). Epochs come only from
//! the coordinator: a sender's hello never raises the receiver's epoch, it must carry exactly
//! the epoch the receiver already holds durably.
//!
//! - Managed (a coordinator): only the machine the last `Receive{epoch, peer}` named, at exactly
//!   that epoch (which the command made durable first).
//! - Static (no coordinator): any machine of the peer seat, at exactly the durable epoch.
//!
//! The decision is pure (expected × identity × hello epoch × durable epoch), so every case is a
//! unit test; the session makes it once at its hello and again before every commit.

use tonic::Status;

use crate::trust::identity::Identity;
use crate::trust::tls::Expect;
use crate::types::Epoch;

/// Who may replicate into this receiver now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The identities allowed to send.
    pub sender: Expect,
    /// The epoch the coordinator named (its last `Receive`); `None` in a static pair, where the
    /// durable epoch is the one.
    pub epoch: Option<Epoch>,
}

impl Expected {
    /// A static pair: the peer seat at the durable epoch.
    pub fn seat(sender: Expect) -> Expected {
        Expected {
            sender,
            epoch: None,
        }
    }
}

/// Why a sender is not admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Not the machine this receiver expects.
    NotExpected { expected: Expect, peer: Identity },
    /// An older epoch than the durable one: that sender is fenced.
    Stale { hello: Epoch, durable: Epoch },
    /// A newer epoch than the durable one: only the coordinator raises it.
    Ahead { hello: Epoch, durable: Epoch },
    /// The durable epoch is no longer the one the coordinator named (a promotion moved it).
    Moved { named: Epoch, durable: Epoch },
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        match r {
            Refusal::NotExpected { expected, peer } => Status::permission_denied(format!(
                "replication is accepted only from {expected}; you are {peer}"
            )),
            // The sender reads "fenced:" as "stop sending": it is not the primary any more.
            Refusal::Stale { hello, durable } => Status::failed_precondition(format!(
                "fenced: stale epoch {hello} < {durable}; this replica no longer accepts data from that epoch"
            )),
            Refusal::Ahead { hello, durable } => Status::failed_precondition(format!(
                "epoch mismatch: the sender is at epoch {hello}, this receiver at {durable}; a receiver takes its epoch only from the coordinator"
            )),
            Refusal::Moved { named, durable } => Status::failed_precondition(format!(
                "epoch mismatch: the coordinator named epoch {named}, this receiver is at {durable}; waiting for the coordinator"
            )),
        }
    }
}

/// Whether `peer` is the sender this receiver expects.
pub(super) fn admit_sender(expected: &Expected, peer: &Identity) -> Result<(), Refusal> {
    if expected.sender.accepts(peer) {
        Ok(())
    } else {
        Err(Refusal::NotExpected {
            expected: expected.sender.clone(),
            peer: peer.clone(),
        })
    }
}

/// The session's epoch: the hello's, which must be exactly the durable one (and the one the
/// coordinator named, when it named one).
pub(super) fn admit_epoch(
    expected: &Expected,
    hello: Epoch,
    durable: Epoch,
) -> Result<Epoch, Refusal> {
    if hello < durable {
        return Err(Refusal::Stale { hello, durable });
    }
    if let Some(named) = expected.epoch
        && named != durable
    {
        return Err(Refusal::Moved { named, durable });
    }
    if hello > durable {
        return Err(Refusal::Ahead { hello, durable });
    }
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::identity::Role;

    /// The whole decision for one sender, as the service and the session make it: identity
    /// first (at the call), then the epoch (at the hello).
    fn admit(
        expected: &Expected,
        peer: &Identity,
        hello: Epoch,
        durable: Epoch,
    ) -> Result<Epoch, Refusal> {
        admit_sender(expected, peer)?;
        admit_epoch(expected, hello, durable)
    }

    fn gpu(machine: &str) -> Identity {
        Identity::node("p", Role::Gpu, machine).unwrap()
    }

    fn seat() -> Expected {
        Expected::seat(Expect::Seat {
            pair: "p".into(),
            role: Role::Gpu,
        })
    }

    fn named(machine: &str, epoch: u64) -> Expected {
        Expected {
            sender: Expect::Exactly(gpu(machine)),
            epoch: Some(Epoch(epoch)),
        }
    }

    #[test]
    fn static_pair_takes_any_machine_of_the_seat_at_the_durable_epoch() {
        assert_eq!(admit(&seat(), &gpu("a"), Epoch(3), Epoch(3)), Ok(Epoch(3)));
        assert_eq!(admit(&seat(), &gpu("b"), Epoch(3), Epoch(3)), Ok(Epoch(3)));
        let other_pair = Identity::node("q", Role::Gpu, "a").unwrap();
        let cpu = Identity::node("p", Role::Cpu, "a").unwrap();
        for id in [other_pair, cpu, Identity::Coordinator] {
            assert!(
                matches!(
                    admit(&seat(), &id, Epoch(3), Epoch(3)),
                    Err(Refusal::NotExpected { .. })
                ),
                "{id}"
            );
        }
    }

    #[test]
    fn a_hello_never_raises_the_epoch() {
        for e in [seat(), named("a", 3)] {
            assert_eq!(
                admit(&e, &gpu("a"), Epoch(1_000_000), Epoch(3)),
                Err(Refusal::Ahead {
                    hello: Epoch(1_000_000),
                    durable: Epoch(3)
                })
            );
            assert_eq!(
                admit(&e, &gpu("a"), Epoch(2), Epoch(3)),
                Err(Refusal::Stale {
                    hello: Epoch(2),
                    durable: Epoch(3)
                })
            );
        }
    }

    #[test]
    fn managed_takes_only_the_named_machine_at_the_named_epoch() {
        let e = named("new", 4);
        assert_eq!(admit(&e, &gpu("new"), Epoch(4), Epoch(4)), Ok(Epoch(4)));
        // The former machine of the same seat, even at the right epoch.
        let r = admit(&e, &gpu("old"), Epoch(4), Epoch(4)).unwrap_err();
        assert!(matches!(r, Refusal::NotExpected { .. }));
        let st = Status::from(r);
        assert_eq!(st.code(), tonic::Code::PermissionDenied);
        assert!(st.message().contains("standby://pair/p/gpu/new"), "{st:?}");
        // A promotion moved the durable epoch past the named one: nobody is admitted.
        assert!(matches!(
            admit(&e, &gpu("new"), Epoch(5), Epoch(5)),
            Err(Refusal::Moved { .. })
        ));
        assert!(matches!(
            admit(&e, &gpu("new"), Epoch(4), Epoch(5)),
            Err(Refusal::Stale { .. })
        ));
    }

    #[test]
    fn refusals_say_what_was_wrong() {
        let stale = Status::from(Refusal::Stale {
            hello: Epoch(4),
            durable: Epoch(5),
        });
        assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
        // The sender stops on "fenced:", and retries anything else.
        assert!(stale.message().starts_with("fenced: stale epoch 4 < 5"));
        let ahead = Status::from(Refusal::Ahead {
            hello: Epoch(9),
            durable: Epoch(5),
        });
        assert_eq!(ahead.code(), tonic::Code::FailedPrecondition);
        assert!(!ahead.message().starts_with("fenced:"), "{ahead:?}");
    }
}
