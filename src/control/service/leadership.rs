//! `serve` on the etcd store: follow until this coordinator wins the election, then lead until
//! it must step down (ARCHITECTURE.md, "Highly available coordinators").
//!
//! A follower connects, checks that etcd's state belongs to its CA, and campaigns once a
//! second; it serves nothing meanwhile. The winner loads the state and serves exactly as a
//! single coordinator does (the engine starts its detection timers from that moment, so
//! heartbeats missed during the hand-over do not fail a pair over). A watchdog checks the
//! leader's own deadline (`EtcdStore::leads`, half the lease's TTL without a renewal): when
//! it passes, the leader stops serving at once and `serve` returns an error, so the process
//! exits non-zero and its supervisor (systemd `Restart=always`) starts it again as a follower.
//! Stepping down cleanly (SIGTERM) revokes the lease, so a follower wins within a second.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::control::store::StoreError;
use crate::control::store::etcd::EtcdStore;
use crate::control::store::etcd::election::{Attempt, Lease};
use crate::control::store::ha::HaOptions;

/// How often a follower campaigns, and the watchdog checks the leader's deadline.
const CAMPAIGN_EVERY: Duration = Duration::from_secs(1);
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// Waits (a follower) until this coordinator leads; None when `shutdown` came first.
pub(super) async fn follow(
    ha: &HaOptions,
    address: &str,
    fingerprint: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Arc<EtcdStore>>> {
    let cfg = ha.etcd.clone();
    let store = tokio::task::spawn_blocking(move || EtcdStore::connect(&cfg)).await??;
    let store = Arc::new(store);
    store.check_ca(fingerprint)?;
    let mut lease: Option<Lease> = None;
    let mut following = None;
    loop {
        match campaign(&store, &mut lease, ha.lease, address) {
            Ok(Attempt::Won(term)) => {
                tracing::info!(term, "won the election: leading");
                return Ok(Some(store));
            }
            Ok(Attempt::Held(l)) if following.as_ref() != Some(&l) => {
                tracing::info!(leader = %l.address, term = l.term, "following");
                following = Some(l);
            }
            Ok(Attempt::Held(_)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot campaign; trying again");
                lease = None;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(CAMPAIGN_EVERY) => {}
        }
    }
}

/// One campaign, with a lease granted first when there is none (or the last one failed).
fn campaign(
    store: &EtcdStore,
    lease: &mut Option<Lease>,
    ttl: Duration,
    address: &str,
) -> Result<Attempt, StoreError> {
    let l = match lease {
        Some(l) => l.clone(),
        None => lease.insert(store.grant(ttl)?).clone(),
    };
    store.campaign(&l, address)
}

/// The watchdog of a leader: once the leader's deadline passed it abandons the leadership
/// (without waiting for etcd) and cancels `serving`; when `serving` ends otherwise (a clean
/// stop) it steps down, revoking the lease. Await it before exiting.
pub(super) fn watch(
    store: Arc<EtcdStore>,
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
                serving.cancel();
                return;
            }
        }
        tokio::task::spawn_blocking(move || store.step_down())
            .await
            .ok();
    })
}
