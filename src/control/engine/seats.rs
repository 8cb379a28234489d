//! Who holds each seat of a pair, and what a written record retires (ARCHITECTURE.md, "Trust").
//!
//! A seat a provider fills is held by the machine the record names (`PairMachine::accepts`);
//! any other seat by the machine that joined it last: a join by another machine retires the
//! one before. After every write of a pair's record, the machines the write retired (put on
//! the teardown list, replaced in their seat, an attempt that ended) lose their certificates,
//! and a provider attempt's join token is spent, so neither can be used any more.

use std::time::Duration;

use super::Actor;
use super::events::event;
use crate::control::failover::{Retired, retired};
use crate::control::metrics::Refusal;
use crate::control::store::certs::Retire;
use crate::host::unix_ms_now;
use crate::proto::state::PairRecord;
use crate::proto::{Event, EventKind};
use crate::trust::identity::{Identity, Role};
use crate::trust::token::Token;
use crate::types::Side;

pub(super) fn role_of(side: Side) -> Role {
    match side {
        Side::Gpu => Role::Gpu,
        Side::Cpu => Role::Cpu,
    }
}

/// How long after now an attempt's token surely expired: it was minted before its create call
/// (at most the call timeout) with the boot timeout and two minutes to run.
fn token_outlived(boot: Duration, call: Duration) -> u64 {
    unix_ms_now() / 1000 + (boot + call).as_secs() + 180
}

impl Actor {
    /// Whether reports from `machine` speak for `side` of `pair`.
    pub(super) fn accepts(&self, pair: &str, side: Side, machine: &str) -> bool {
        let Some(e) = self.pairs.get(pair) else {
            return false;
        };
        let holders = self.registry.seat(pair, role_of(side));
        e.m.accepts_holding(side, machine, &holders)
    }

    /// What a renewal needs: `machine` holds (or is being provisioned for) the seat. A pair no
    /// agent has heartbeated to yet (it joined, then its certificate expired) has only the
    /// registry to go by.
    pub(super) fn holds_seat(&self, pair: &str, side: Side, machine: &str) -> bool {
        if self.pairs.contains_key(pair) {
            return self.accepts(pair, side, machine);
        }
        self.registry.seat(pair, role_of(side)).contains(machine)
    }

    /// `machine` joined `side` of `pair`: unless a provider fills that seat, it now holds it
    /// and every other machine in it is retired.
    pub(super) fn on_seated(&mut self, pair: &str, side: Side, machine: &str) {
        if self
            .pairs
            .get(pair)
            .is_some_and(|e| e.m.provider_seat(side))
        {
            return;
        }
        let which = Retire::SeatBut {
            pair,
            role: role_of(side),
            keep: machine,
        };
        self.revoke(pair, &which, &format!("replaced in its seat by {machine}"));
    }

    /// After `written`, a record of `pair`, is written: retires what the write retired.
    pub(super) fn after_write(&mut self, pair: &str, written: PairRecord) {
        let Some(e) = self.pairs.get_mut(pair) else {
            return;
        };
        let gone = retired(&e.written, &written);
        e.written = written;
        for r in gone {
            self.retire(pair, &r);
        }
    }

    /// At start: machines waiting to be torn down are retired (again: a crash may have come
    /// between the write and the revocation; revoking twice changes nothing).
    pub(super) fn retire_torn_down(&mut self) {
        let all: Vec<(String, Retired)> = self
            .pairs
            .iter()
            .flat_map(|(name, e)| {
                e.m.rec.teardown.iter().map(move |t| {
                    let side = Side::from_record(t.role());
                    let reason = format!("{} machine {} torn down", side.as_str(), t.label);
                    let r = Retired {
                        side,
                        machine: t.label.clone(),
                        reason,
                    };
                    (name.clone(), r)
                })
            })
            .collect();
        for (pair, r) in all {
            self.retire(&pair, &r);
        }
    }

    /// Revoked certificates refused in the TLS handshake (before any service saw them): each one
    /// is counted and shown as an event of its pair.
    pub(super) fn report_refused_handshakes(&mut self) {
        for r in self.registry.take_refused() {
            let pair = Identity::parse_uri(&r.identity)
                .ok()
                .and_then(|id| id.pair().map(str::to_string))
                .unwrap_or_default();
            self.metrics.refuse(Refusal::Revoked);
            let message = format!(
                "refused (revoked): {} presented its revoked certificate {} in a TLS handshake",
                r.identity, r.serial
            );
            tracing::warn!(%pair, "{message}");
            self.events.emit(event(&pair, EventKind::Refused, message));
        }
    }

    fn retire(&mut self, pair: &str, r: &Retired) {
        let which = Retire::Machine {
            pair,
            role: role_of(r.side),
            machine: &r.machine,
        };
        self.revoke(pair, &which, &r.reason);
        if let Some(prov) = &self.prov {
            let exp = token_outlived(self.policy.boot_timeout, prov.cfg.call_timeout);
            if let Err(e) = self.store.use_token(&Token::attempt_nonce(&r.machine), exp) {
                tracing::error!(pair, machine = %r.machine, error = %e, "cannot spend the attempt's join token");
            }
        }
    }

    /// Revokes what `which` selects; an event says whose certificates.
    fn revoke(&mut self, pair: &str, which: &Retire<'_>, reason: &str) {
        match self.registry.retire(which, reason) {
            Ok(revoked) if !revoked.is_empty() => {
                let machines: std::collections::BTreeSet<&str> =
                    revoked.iter().map(|c| c.machine.as_str()).collect();
                let message = format!(
                    "revoked {} certificate(s) of {}: {reason}",
                    revoked.len(),
                    machines.into_iter().collect::<Vec<_>>().join(", ")
                );
                let epoch = self.pairs.get(pair).map_or(0, |e| e.m.epoch().0);
                self.events.emit(Event {
                    epoch,
                    ..event(pair, EventKind::Fenced, message)
                });
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(pair, error = %e, "cannot record a revocation; retrying at the next write")
            }
        }
    }
}
