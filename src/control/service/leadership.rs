//! `serve` on the etcd store: follow until this coordinator wins the election, then lead until
//! it must step down (ARCHITECTURE.md, "Highly available coordinators").
//!
//! A follower connects, checks that etcd's state belongs to its CA, and campaigns once a
//! second; meanwhile it listens and points its clients to the leader the campaign saw
//! (`super::seat`). The winner loads the state and serves exactly as a
//! single coordinator does (the engine starts its detection timers from that moment, so
//! heartbeats missed during the hand-over do not fail a pair over). A watchdog checks the
//! leader's own deadline (`EtcdStore::leads`, half the lease's TTL without a renewal): when
//! it passes, the leader stops serving at once and `serve` returns an error, so the process
//! exits non-zero and its supervisor (systemd `Restart=always`) starts it again as a follower.
//! Stepping down cleanly (SIGTERM) revokes the lease, so a follower wins within a second.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::seat::{Pointer, Seat};
use crate::control::metrics::{LeadershipChange, Metrics};
use crate::control::store::StoreError;
use crate::control::store::etcd::EtcdStore;
use crate::control::store::etcd::election::{Attempt, Lease};
use crate::control::store::ha::HaOptions;

/// How often a follower campaigns, and the watchdog checks the leader's deadline.
const CAMPAIGN_EVERY: Duration = Duration::from_secs(1);
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// Who campaigns: the etcd side of `serve`, the address this coordinator advertises, where
/// leadership changes are counted, and the seat that tells clients who leads.
pub(super) struct Campaign<'a> {
    pub ha: &'a HaOptions,
    pub address: &'a str,
    pub metrics: &'a Metrics,
    pub seat: &'a Seat,
}

/// Connects to etcd and checks that its state belongs to the CA with this fingerprint.
pub(super) async fn connect(
    ha: &HaOptions,
    fingerprint: &str,
    metrics: &Metrics,
) -> anyhow::Result<Arc<EtcdStore>> {
    let cfg = ha.etcd.clone();
    let latency = metrics.leadership.etcd_latency.clone();
    let store = tokio::task::spawn_blocking(move || {
        EtcdStore::connect(&cfg).map(|s| s.with_latency(latency))
    })
    .await??;
    store.check_ca(fingerprint)?;
    Ok(Arc::new(store))
}

/// Follows until this coordinator leads (true), or until `shutdown` (false).
pub(super) async fn follow(
    c: Campaign<'_>,
    store: &EtcdStore,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut lease: Option<Lease> = None;
    let mut following = None;
    loop {
        match campaign(store, &mut lease, c.ha.lease, c.address) {
            Ok(Attempt::Won(term)) => {
                tracing::info!(term, "won the election: leading");
                c.metrics.leadership.changed(LeadershipChange::Won, term);
                // Until the engine has loaded the state, callers are told to come back here.
                c.seat.follows(Pointer {
                    address: c.address.to_string(),
                    term,
                });
                return Ok(true);
            }
            Ok(Attempt::Held(l)) if following.as_ref() != Some(&l) => {
                tracing::info!(leader = %l.address, term = l.term, "following");
                if l.term != 0 {
                    c.metrics
                        .leadership
                        .changed(LeadershipChange::Followed, l.term);
                }
                c.seat.follows(Pointer {
                    address: l.address.clone(),
                    term: l.term,
                });
                following = Some(l);
            }
            Ok(Attempt::Held(_)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot campaign; trying again");
                lease = None;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(CAMPAIGN_EVERY) => {}
        }
    }
}

/// One campaign, with a lease granted first when there is none (or the last one failed),
/// and this coordinator's membership record put with it (`coordinator status` lists it).
fn campaign(
    store: &EtcdStore,
    lease: &mut Option<Lease>,
    ttl: Duration,
    address: &str,
) -> Result<Attempt, StoreError> {
    let l = match lease {
        Some(l) => l.clone(),
        None => {
            let l = store.grant(ttl)?;
            store.register(&l, address)?;
            lease.insert(l).clone()
        }
    };
    store.campaign(&l, address)
}

/// The watchdog of a leader: once the leader's deadline passed it abandons the leadership
/// (without waiting for etcd) and cancels `serving`; when `serving` ends otherwise (a clean
/// stop) it steps down, revoking the lease. Await it before exiting.
pub(super) fn watch(
    store: Arc<EtcdStore>,
    metrics: Arc<Metrics>,
    serving: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = serving.cancelled() => break,
                _ = tokio::time::sleep(WATCH_EVERY) => {}
            }
            if !store.leads() {
                tracing::error!(
                    term = store.term(),
                    "the leader's lease was not renewed within its deadline: stepping down"
                );
                store.abandon();
                metrics.leadership.changed(LeadershipChange::SteppedDown, 0);
                serving.cancel();
                return;
            }
        }
        tokio::task::spawn_blocking(move || store.step_down())
            .await
            .ok();
        metrics.leadership.changed(LeadershipChange::SteppedDown, 0);
    })
}
