//! Records written before the pair state, the primary, machine roles and the provisioning phase
//! were enums: they held those as strings, at field numbers now reserved. Such a record still
//! decodes, but reads as UNSPECIFIED there: a failed-over pair would read as Pending with the GPU
//! primary, and could be synced from the old GPU, losing what the CPU wrote since. So the store
//! decodes the same bytes once more into a mirror of the old fields and fills in what they said
//! (ARCHITECTURE.md, "Durable state"). A string this build does not know refuses the load: it is
//! never guessed.

use prost::Message;

use crate::control::failover::PairState;
use crate::proto::state::{OwnedMachine, PairRecord, Phase, Provision, StoreEntry, store_entry};
use crate::proto::{self, Role};
use crate::types::Side;

/// A record from before the enums that cannot be read without guessing.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(
        "pair {pair}: its record is from before the enums and holds {field} {value:?}, which this \
         build does not know (not guessing: the pair is not loaded)"
    )]
    Unknown {
        pair: String,
        field: &'static str,
        value: String,
    },
    #[error("pair {pair}: the old fields of its record do not decode")]
    Undecodable {
        pair: String,
        #[source]
        source: prost::DecodeError,
    },
}

/// A `StoreEntry` with its pair left as bytes (the oneof's `pair` is field 1).
#[derive(Clone, PartialEq, prost::Message)]
struct RawEntry {
    #[prost(bytes = "vec", optional, tag = "1")]
    pair: Option<Vec<u8>>,
}

/// The old string fields of a `PairRecord`, at their old numbers, and the messages holding more.
#[derive(Clone, PartialEq, prost::Message)]
struct OldPair {
    #[prost(string, tag = "2")]
    state: String,
    #[prost(string, tag = "4")]
    primary: String,
    #[prost(message, optional, tag = "10")]
    provision: Option<OldProvision>,
    #[prost(message, optional, tag = "12")]
    gpu_owned: Option<OldMachine>,
    #[prost(message, optional, tag = "13")]
    cpu_owned: Option<OldMachine>,
    #[prost(message, repeated, tag = "14")]
    teardown: Vec<OldMachine>,
}

/// The old string fields of a `Provision`.
#[derive(Clone, PartialEq, prost::Message)]
struct OldProvision {
    #[prost(string, tag = "1")]
    role: String,
    #[prost(string, tag = "3")]
    phase: String,
    #[prost(message, optional, tag = "4")]
    machine: Option<OldMachine>,
}

/// The old string field of an `OwnedMachine`.
#[derive(Clone, PartialEq, prost::Message)]
struct OldMachine {
    #[prost(string, tag = "3")]
    role: String,
}

/// Migrates the pair in `entry`, decoded from `bytes`, when it has an UNSPECIFIED field an old
/// string may fill. Whether anything was filled in.
pub(super) fn migrate_entry(entry: &mut StoreEntry, bytes: &[u8]) -> Result<bool, Refused> {
    let Some(store_entry::Entry::Pair(rec)) = &mut entry.entry else {
        return Ok(false);
    };
    if !has_unspecified(rec) {
        return Ok(false);
    }
    let raw = RawEntry::decode(bytes).map_err(|source| Refused::Undecodable {
        pair: rec.name.clone(),
        source,
    })?;
    migrate(rec, raw.pair.as_deref().unwrap_or_default())
}

/// Fills in each UNSPECIFIED field of `rec` whose old string (in `bytes`, the record's own
/// encoding) carried a value. Whether anything was filled in.
pub(super) fn migrate(rec: &mut PairRecord, bytes: &[u8]) -> Result<bool, Refused> {
    let old = OldPair::decode(bytes).map_err(|source| Refused::Undecodable {
        pair: rec.name.clone(),
        source,
    })?;
    let mut fill = Fill {
        pair: rec.name.clone(),
        filled: false,
    };
    if let Some(s) = fill.field("state", rec.state(), &old.state, state)? {
        rec.set_state(s);
    }
    if let Some(r) = fill.field("primary", rec.primary(), &old.primary, role)? {
        rec.set_primary(r);
    }
    if let (Some(p), Some(o)) = (&mut rec.provision, &old.provision) {
        fill.provision(p, o)?;
    }
    fill.machine(&mut rec.gpu_owned, old.gpu_owned.as_ref())?;
    fill.machine(&mut rec.cpu_owned, old.cpu_owned.as_ref())?;
    // Old and new encodings list the same machines in the same order.
    for (m, o) in rec.teardown.iter_mut().zip(&old.teardown) {
        fill.role(m, o)?;
    }
    Ok(fill.filled)
}

/// Whether `rec` has a field an old string may have held that reads as UNSPECIFIED.
fn has_unspecified(rec: &PairRecord) -> bool {
    let machine = |m: &OwnedMachine| m.role() == Role::Unspecified;
    rec.state() == proto::PairState::Unspecified
        || rec.primary() == Role::Unspecified
        || rec.provision.as_ref().is_some_and(|p| {
            p.role() == Role::Unspecified
                || p.phase() == Phase::Unspecified
                || p.machine.as_ref().is_some_and(machine)
        })
        || rec.gpu_owned.as_ref().is_some_and(machine)
        || rec.cpu_owned.as_ref().is_some_and(machine)
        || rec.teardown.iter().any(machine)
}

/// Filling in one pair's record: which pair (for a refusal), and whether anything changed.
struct Fill {
    pair: String,
    filled: bool,
}

impl Fill {
    /// The value `old` names for a field that reads `now`, when `now` is UNSPECIFIED (the
    /// default) and `old` is not empty; an `old` that `parse` does not know is refused.
    fn field<T: Default + PartialEq>(
        &mut self,
        name: &'static str,
        now: T,
        old: &str,
        parse: fn(&str) -> Option<T>,
    ) -> Result<Option<T>, Refused> {
        if now != T::default() || old.is_empty() {
            return Ok(None);
        }
        let value = parse(old).ok_or_else(|| Refused::Unknown {
            pair: self.pair.clone(),
            field: name,
            value: old.to_string(),
        })?;
        self.filled = true;
        Ok(Some(value))
    }

    fn provision(&mut self, p: &mut Provision, old: &OldProvision) -> Result<(), Refused> {
        if let Some(r) = self.field("provision role", p.role(), &old.role, role)? {
            p.set_role(r);
        }
        if let Some(ph) = self.field("provision phase", p.phase(), &old.phase, phase)? {
            p.set_phase(ph);
        }
        self.machine(&mut p.machine, old.machine.as_ref())
    }

    fn machine(
        &mut self,
        m: &mut Option<OwnedMachine>,
        old: Option<&OldMachine>,
    ) -> Result<(), Refused> {
        match (m, old) {
            (Some(m), Some(o)) => self.role(m, o),
            _ => Ok(()),
        }
    }

    fn role(&mut self, m: &mut OwnedMachine, old: &OldMachine) -> Result<(), Refused> {
        if let Some(r) = self.field("machine role", m.role(), &old.role, role)? {
            m.set_role(r);
        }
        Ok(())
    }
}

/// "Syncing", "FailedOver", ...: as `PairState::as_str` wrote them.
fn state(s: &str) -> Option<proto::PairState> {
    PairState::parse(s).map(proto::PairState::from)
}

/// "gpu" or "cpu": as `Side::as_str` wrote them.
fn role(s: &str) -> Option<Role> {
    Side::ALL
        .into_iter()
        .find(|side| side.as_str() == s)
        .map(Role::from)
}

/// "create" or "boot".
fn phase(s: &str) -> Option<Phase> {
    match s {
        "create" => Some(Phase::Create),
        "boot" => Some(Phase::Boot),
        _ => None,
    }
}
