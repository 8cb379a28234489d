//! The certificate registry (ARCHITECTURE.md, "Trust"): every certificate the coordinator
//! issued to an agent, by serial, with the machine that holds it and whether it was revoked.
//!
//! A certificate is recorded durably before it is handed out, and a revocation is durable
//! before anyone is told. The registry keeps the coordinator's own deny list (the one its
//! verifiers consult) equal to the revoked, unexpired serials, and lets heartbeat streams
//! watch for changes so they push the new list to agents and end streams whose certificate was
//! just revoked. Expired certificates leave the registry (and the list) at compaction.
//!
//! The selection rules are pure functions over the map (`revoke_in`, `deny_list`,
//! `seat_holders`, `newest_per_machine`), unit-tested below.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::{Store, StoreError};
use crate::proto::state::IssuedCert;
use crate::trust::identity::{CertFacts, Identity, Role};
use crate::trust::revocation::DenyList;

/// Which certificates a retirement revokes: those of one machine in a seat, or every one of a
/// seat but a machine, or every one of a pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Retire<'a> {
    Machine {
        pair: &'a str,
        role: Role,
        machine: &'a str,
    },
    SeatBut {
        pair: &'a str,
        role: Role,
        keep: &'a str,
    },
    Pair(&'a str),
}

impl Retire<'_> {
    fn selects(&self, c: &IssuedCert) -> bool {
        let seat = |pair: &str, role: Role| c.pair == pair && c.role == proto_role(role) as i32;
        match self {
            Retire::Machine {
                pair,
                role,
                machine,
            } => seat(pair, *role) && c.machine == *machine,
            Retire::SeatBut { pair, role, keep } => seat(pair, *role) && c.machine != *keep,
            Retire::Pair(pair) => c.pair == *pair,
        }
    }
}

fn proto_role(r: Role) -> crate::proto::Role {
    match r {
        Role::Gpu => crate::proto::Role::Gpu,
        Role::Cpu => crate::proto::Role::Cpu,
    }
}

/// The longest renewal grace the coordinator allows (`--renew-grace` is capped to it): how long
/// after its expiry a certificate can still reach the coordinator, so how long it is kept (and
/// can be revoked).
pub const MAX_RENEW_GRACE: std::time::Duration = std::time::Duration::from_secs(90 * 86_400);
const GRACE_KEPT: u64 = MAX_RENEW_GRACE.as_secs();

/// Whether a certificate is still worth keeping at `now_unix`: until no grace lets it in.
pub fn kept(c: &IssuedCert, now_unix: u64) -> bool {
    c.not_after_unix.saturating_add(GRACE_KEPT) > now_unix
}

/// What a certificate's facts are recorded as.
pub fn issued(facts: &CertFacts) -> Option<IssuedCert> {
    let Identity::Node {
        pair,
        role,
        machine,
    } = &facts.identity
    else {
        return None;
    };
    Some(IssuedCert {
        serial: facts.serial.clone(),
        pair: pair.clone(),
        role: proto_role(*role).into(),
        machine: machine.clone(),
        not_after_unix: facts.not_after_unix.max(0) as u64,
        revoked: false,
        revoked_reason: String::new(),
    })
}

/// The unrevoked certificates `which` selects, as revoked copies (expired ones too: they can
/// still renew within the grace).
pub fn revoke_in(
    certs: &HashMap<String, IssuedCert>,
    which: &Retire<'_>,
    reason: &str,
    now_unix: u64,
) -> Vec<IssuedCert> {
    let mut out: Vec<IssuedCert> = certs
        .values()
        .filter(|c| !c.revoked && kept(c, now_unix) && which.selects(c))
        .map(|c| IssuedCert {
            revoked: true,
            revoked_reason: reason.to_string(),
            ..c.clone()
        })
        .collect();
    out.sort_by(|a, b| a.serial.cmp(&b.serial));
    out
}

/// The revoked serials that have not expired: what every verifier must refuse.
pub fn deny_list(certs: &HashMap<String, IssuedCert>, now_unix: u64) -> BTreeSet<String> {
    certs
        .values()
        .filter(|c| c.revoked && c.not_after_unix > now_unix)
        .map(|c| c.serial.clone())
        .collect()
}

/// The machines holding an unrevoked certificate for a seat. An expired one still holds it
/// (its agent may renew within the grace) until another machine joins the seat.
pub fn seat_holders(
    certs: &HashMap<String, IssuedCert>,
    pair: &str,
    role: Role,
) -> BTreeSet<String> {
    certs
        .values()
        .filter(|c| !c.revoked && c.pair == pair && c.role == proto_role(role) as i32)
        .map(|c| c.machine.clone())
        .collect()
}

/// The expiry of each machine's newest live certificate, by (pair, role, machine).
pub fn newest_per_machine(
    certs: &HashMap<String, IssuedCert>,
    now_unix: u64,
) -> BTreeMap<(String, crate::proto::Role, String), u64> {
    let mut out = BTreeMap::new();
    for c in certs
        .values()
        .filter(|c| !c.revoked && c.not_after_unix > now_unix)
    {
        let k = (c.pair.clone(), c.role(), c.machine.clone());
        let e = out.entry(k).or_insert(0);
        *e = (*e).max(c.not_after_unix);
    }
    out
}

/// The registry: issued certificates, durable in the store, shared by the service (joins,
/// renewals, heartbeats) and the engine (retirements).
pub struct Registry {
    store: Arc<dyn Store>,
    certs: Mutex<HashMap<String, IssuedCert>>,
    /// The coordinator's own deny list (its TLS material's): kept equal to [`deny_list`].
    deny: DenyList,
    /// Bumped whenever the deny list changes.
    changed: watch::Sender<u64>,
}

fn now_unix() -> u64 {
    crate::host::unix_ms_now() / 1000
}

impl Registry {
    /// The registry as the store holds it; `deny` is filled from it at once.
    pub fn load(store: Arc<dyn Store>, deny: DenyList) -> Result<Registry, StoreError> {
        let certs = store.load()?.certs;
        let r = Registry {
            store,
            certs: Mutex::new(certs),
            deny,
            changed: watch::Sender::new(0),
        };
        r.refresh();
        Ok(r)
    }

    /// Records a certificate about to be handed out (durably, before it is).
    pub fn record(&self, c: IssuedCert) -> Result<(), StoreError> {
        let mut g = self.certs.lock().expect("certs");
        self.store.put_certs(std::slice::from_ref(&c))?;
        g.insert(c.serial.clone(), c);
        Ok(())
    }

    /// Revokes what `which` selects, durably; returns what was revoked.
    pub fn retire(&self, which: &Retire<'_>, reason: &str) -> Result<Vec<IssuedCert>, StoreError> {
        let mut g = self.certs.lock().expect("certs");
        let revoked = revoke_in(&g, which, reason, now_unix());
        if revoked.is_empty() {
            return Ok(revoked);
        }
        self.store.put_certs(&revoked)?;
        for c in &revoked {
            tracing::warn!(serial = %c.serial, pair = %c.pair, machine = %c.machine, reason, "certificate revoked");
            g.insert(c.serial.clone(), c.clone());
        }
        drop(g);
        self.refresh();
        Ok(revoked)
    }

    /// Recomputes the deny list (expired entries leave it, and certificates no grace lets in
    /// leave the registry); tells watchers when it changed.
    pub fn refresh(&self) {
        let now = now_unix();
        let list = {
            let mut g = self.certs.lock().expect("certs");
            g.retain(|_, c| kept(c, now));
            deny_list(&g, now)
        };
        match self.deny.replace(list) {
            Ok(true) => {
                self.changed.send_modify(|v| *v += 1);
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "the deny list refused the registry's serials"),
        }
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        self.certs
            .lock()
            .expect("certs")
            .get(serial)
            .is_some_and(|c| c.revoked)
    }

    /// The revoked certificates the coordinator's own TLS verifier refused since the last call.
    pub fn take_refused(&self) -> Vec<crate::trust::revocation::Refused> {
        self.deny.take_refused()
    }

    /// The current deny list, as sent to agents.
    pub fn revoked(&self) -> Vec<String> {
        self.deny.serials().iter().cloned().collect()
    }

    /// Changes of the deny list.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The machines that hold the seat by a certificate issued here (empty: none joined).
    pub fn seat(&self, pair: &str, role: Role) -> BTreeSet<String> {
        seat_holders(&self.certs.lock().expect("certs"), pair, role)
    }

    /// The expiry of each machine's newest live certificate (for the metrics).
    pub fn expiries(&self) -> BTreeMap<(String, crate::proto::Role, String), u64> {
        newest_per_machine(&self.certs.lock().expect("certs"), now_unix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(serial: &str, pair: &str, role: Role, machine: &str, exp: u64) -> IssuedCert {
        IssuedCert {
            serial: serial.into(),
            pair: pair.into(),
            role: proto_role(role).into(),
            machine: machine.into(),
            not_after_unix: exp,
            revoked: false,
            revoked_reason: String::new(),
        }
    }

    fn map(cs: Vec<IssuedCert>) -> HashMap<String, IssuedCert> {
        cs.into_iter().map(|c| (c.serial.clone(), c)).collect()
    }

    fn sample() -> HashMap<String, IssuedCert> {
        map(vec![
            cert("01", "p", Role::Gpu, "g1", 100),
            cert("02", "p", Role::Gpu, "g1", 200),
            cert("03", "p", Role::Gpu, "g2", 200),
            cert("04", "p", Role::Cpu, "c1", 200),
            cert("05", "q", Role::Gpu, "g1", 200),
            cert("06", "p", Role::Gpu, "g1", 50),
        ])
    }

    fn serials(v: &[IssuedCert]) -> Vec<&str> {
        v.iter().map(|c| c.serial.as_str()).collect()
    }

    #[test]
    fn retiring_a_machine_revokes_its_live_certificates_in_that_seat_only() {
        let certs = sample();
        let which = Retire::Machine {
            pair: "p",
            role: Role::Gpu,
            machine: "g1",
        };
        let r = revoke_in(&certs, &which, "failed", 60);
        // 06 expired, but could still renew within the grace: revoked too; not q's g1.
        assert_eq!(serials(&r), ["01", "02", "06"]);
        assert!(r.iter().all(|c| c.revoked && c.revoked_reason == "failed"));
        let which = Retire::SeatBut {
            pair: "p",
            role: Role::Gpu,
            keep: "g2",
        };
        assert_eq!(
            serials(&revoke_in(&certs, &which, "x", 60)),
            ["01", "02", "06"]
        );
        assert_eq!(
            serials(&revoke_in(&certs, &Retire::Pair("p"), "x", 60)),
            ["01", "02", "03", "04", "06"]
        );
    }

    #[test]
    fn the_deny_list_holds_revoked_unexpired_serials_and_seats_their_holders() {
        let mut certs = sample();
        for c in revoke_in(&certs, &Retire::Pair("p"), "deleted", 0) {
            certs.insert(c.serial.clone(), c);
        }
        assert_eq!(
            deny_list(&certs, 150).into_iter().collect::<Vec<_>>(),
            ["02", "03", "04"]
        );
        // Already revoked: nothing new to revoke.
        assert!(revoke_in(&certs, &Retire::Pair("p"), "again", 0).is_empty());
        assert!(seat_holders(&certs, "p", Role::Gpu).is_empty());
        let holders = seat_holders(&certs, "q", Role::Gpu);
        assert_eq!(holders.into_iter().collect::<Vec<_>>(), ["g1"]);
    }

    #[test]
    fn newest_certificate_per_machine() {
        let certs = sample();
        let n = newest_per_machine(&certs, 60);
        let k = ("p".to_string(), crate::proto::Role::Gpu, "g1".to_string());
        assert_eq!(n[&k], 200);
        assert_eq!(n.len(), 4);
    }

    #[test]
    fn registry_revocations_are_durable_and_reach_the_deny_list() {
        let store: Arc<dyn Store> = Arc::new(crate::control::store::MemStore::default());
        let far = now_unix() + 3600;
        let deny = DenyList::new();
        let r = Registry::load(store.clone(), deny.clone()).unwrap();
        let mut rx = r.subscribe();
        r.record(cert("0a", "p", Role::Gpu, "g1", far)).unwrap();
        r.record(cert("0b", "p", Role::Gpu, "g2", far)).unwrap();
        let which = Retire::SeatBut {
            pair: "p",
            role: Role::Gpu,
            keep: "g2",
        };
        assert_eq!(serials(&r.retire(&which, "replaced").unwrap()), ["0a"]);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert!(deny.contains("0a") && !deny.contains("0b"));
        assert!(r.is_revoked("0a"));
        assert_eq!(r.revoked(), ["0a"]);
        assert_eq!(
            r.seat("p", Role::Gpu).into_iter().collect::<Vec<_>>(),
            ["g2"]
        );
        // Nothing new: no change announced.
        assert!(r.retire(&which, "again").unwrap().is_empty());
        assert!(!rx.has_changed().unwrap());
        // A restarted coordinator finds the revocation.
        let deny2 = DenyList::new();
        Registry::load(store, deny2.clone()).unwrap();
        assert!(deny2.contains("0a"));
    }
}
