//! The coordinator's enums as they travel and as they are stored: one conversion between each
//! Rust enum and its proto form, and how the command line spells each proto enum (README.md,
//! "A managed pair", `pairs --json`: `"state": "Syncing"`, `"primary": "gpu"`,
//! `"kind": "failover"`).
//!
//! A value this build does not know (a newer peer's) reads as UNSPECIFIED through prost's
//! accessors; it converts to no [`PairState`] and is spelled as nothing, never a panic. The
//! spellings honour width and alignment (`{:<12}`), for the command line's tables.
//!
//! [`Side`]'s conversions live beside it in `types`. Events, provisioning phases and agent modes
//! need no enum of their own: the generated ones (`proto::EventKind`, `proto::state::Phase`,
//! `proto::AgentMode`) are used directly, UNSPECIFIED meaning "not said".
//!
//! What an agent's report may carry at most is checked in `limits` ([`check_report`]).

mod limits;

use std::fmt;

use crate::control::failover::PairState;
use crate::proto;
use crate::types::Side;

pub use limits::check_report;

impl From<PairState> for proto::PairState {
    fn from(s: PairState) -> proto::PairState {
        match s {
            PairState::Pending => proto::PairState::Pending,
            PairState::Syncing => proto::PairState::Syncing,
            PairState::Suspect => proto::PairState::Suspect,
            PairState::FailedOver => proto::PairState::FailedOver,
            PairState::Provisioning => proto::PairState::Provisioning,
            PairState::Restoring => proto::PairState::Restoring,
            PairState::CuttingOver => proto::PairState::CuttingOver,
            PairState::Hibernated => proto::PairState::Hibernated,
            PairState::Degraded => proto::PairState::Degraded,
            PairState::Rebuilding => proto::PairState::Rebuilding,
        }
    }
}

/// The proto state was UNSPECIFIED (absent, or unknown to this build).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no pair state given")]
pub struct Unspecified;

impl TryFrom<proto::PairState> for PairState {
    type Error = Unspecified;

    fn try_from(s: proto::PairState) -> Result<PairState, Unspecified> {
        Ok(match s {
            proto::PairState::Unspecified => return Err(Unspecified),
            proto::PairState::Pending => PairState::Pending,
            proto::PairState::Syncing => PairState::Syncing,
            proto::PairState::Suspect => PairState::Suspect,
            proto::PairState::FailedOver => PairState::FailedOver,
            proto::PairState::Provisioning => PairState::Provisioning,
            proto::PairState::Restoring => PairState::Restoring,
            proto::PairState::CuttingOver => PairState::CuttingOver,
            proto::PairState::Hibernated => PairState::Hibernated,
            proto::PairState::Degraded => PairState::Degraded,
            proto::PairState::Rebuilding => PairState::Rebuilding,
        })
    }
}

/// "Syncing", "FailedOver", ...; UNSPECIFIED is spelled as nothing (an event that is not about
/// a state).
impl fmt::Display for proto::PairState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(PairState::try_from(*self).map_or("", PairState::as_str))
    }
}

/// "gpu" or "cpu" (nothing when unspecified).
impl fmt::Display for proto::Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            proto::Role::Unspecified => "",
            role => Side::from_record(*role).as_str(),
        })
    }
}

impl proto::EventKind {
    pub fn as_str(self) -> &'static str {
        use proto::EventKind as K;
        match self {
            K::Unspecified => "",
            K::Transition => "transition",
            K::Heartbeat => "heartbeat",
            K::Warning => "warning",
            K::Failover => "failover",
            K::Created => "created",
            K::Joined => "joined",
            K::Fenced => "fenced",
            K::Recovered => "recovered",
            K::Orphan => "orphan",
            K::Refused => "refused",
            K::Provisioning => "provisioning",
            K::Destroyed => "destroyed",
            K::Critical => "critical",
            K::Hibernate => "hibernate",
            K::Blind => "blind",
        }
    }
}

impl fmt::Display for proto::EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// "create" or "boot", as the pair's provisioning line shows it.
impl fmt::Display for proto::state::Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            proto::state::Phase::Unspecified => "",
            proto::state::Phase::Create => "create",
            proto::state::Phase::Boot => "boot",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_and_keeps_its_spelling() {
        for s in PairState::ALL {
            let p = proto::PairState::from(s);
            assert_eq!(PairState::try_from(p), Ok(s));
            assert_eq!(p.to_string(), s.as_str());
        }
        assert_eq!(
            PairState::try_from(proto::PairState::Unspecified),
            Err(Unspecified)
        );
        assert_eq!(proto::PairState::Unspecified.to_string(), "");
        assert_eq!(format!("{:<8}|", proto::PairState::Syncing), "Syncing |");
    }

    #[test]
    fn unknown_values_read_as_unspecified() {
        let rec = proto::PairView {
            state: 999,
            primary: -3,
            ..Default::default()
        };
        assert_eq!(rec.state(), proto::PairState::Unspecified);
        assert_eq!(rec.primary().to_string(), "");
        let e = proto::Event {
            kind: 77,
            ..Default::default()
        };
        assert_eq!(e.kind().to_string(), "");
    }

    #[test]
    fn sides_round_trip() {
        for side in [Side::Gpu, Side::Cpu] {
            let r = proto::Role::from(side);
            assert_eq!(Side::from_record(r), side);
            assert_eq!(r.to_string(), side.as_str());
        }
    }
}
