//! Leader election on the etcd store (ARCHITECTURE.md, "Highly available coordinators").
//!
//! Each coordinator holds a lease of its own (`grant`, kept alive by `keep_alive` on the
//! bridge's runtime). `campaign` puts the leader key with that lease only if no key exists;
//! the winner's term is the key's create revision (etcd revisions only grow, so a later leader
//! always has a larger term). When a leader's lease expires etcd deletes the key and the next
//! campaign wins.
//!
//! Invariant: a leader stops writing *before* its lease can expire: [`EtcdStore::leads`] is
//! false once the last renewal etcd acknowledged is older than half the lease's TTL, and the
//! guarded writes check it. Another coordinator cannot win before the whole TTL has passed
//! since that renewal, so two leaders never write in the same moment.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
};

use super::{Coordinators, EtcdStore, StoreError, etcd_err, lost};

/// Who leads, as the leader key says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    /// The key's create revision.
    pub term: i64,
    /// The address agents and admins reach it at (`--advertise`).
    pub address: String,
    pub lease: i64,
}

/// What one campaign found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// This coordinator leads, in this term.
    Won(i64),
    /// Another one does.
    Held(Leader),
}

/// This coordinator's lease and when etcd last acknowledged renewing it.
#[derive(Clone)]
pub struct Lease {
    pub id: i64,
    pub ttl: Duration,
    /// Milliseconds after `base` of the last renewal request etcd acknowledged.
    renewed_ms: Arc<AtomicU64>,
    base: Instant,
}

impl Lease {
    /// How long ago the last acknowledged renewal was *sent* (so never younger than the truth).
    pub fn since_renewal(&self) -> Duration {
        let at = self.base + Duration::from_millis(self.renewed_ms.load(Ordering::SeqCst));
        at.elapsed()
    }

    /// The leader's own deadline: half the TTL without a renewal and it must stop.
    pub fn deadline(&self) -> Duration {
        self.ttl / 2
    }

    fn renewed(&self, sent: Instant) {
        let ms = sent.duration_since(self.base).as_millis() as u64;
        self.renewed_ms.fetch_max(ms, Ordering::SeqCst);
    }
}

fn leader_of(kv: &KeyValue) -> Leader {
    Leader {
        term: kv.create_revision(),
        address: String::from_utf8_lossy(kv.value()).into_owned(),
        lease: kv.lease(),
    }
}

impl EtcdStore {
    /// Grants this coordinator's lease (`ttl`, at least 2 s) and keeps it alive on the bridge's
    /// runtime, a renewal every sixth of the TTL, until the store is dropped or etcd says the
    /// lease is gone.
    pub fn grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let secs = ttl.as_secs().max(2) as i64;
        let sent = Instant::now();
        let resp = self.call("grant lease", move |mut c| async move {
            c.lease_grant(secs, None).await
        })?;
        let lease = Lease {
            id: resp.id(),
            ttl: Duration::from_secs(resp.ttl().max(0) as u64),
            renewed_ms: Arc::new(AtomicU64::new(0)),
            base: sent,
        };
        self.bridge
            .spawn(keep_alive(self.client.clone(), lease.clone()));
        *self.lease.lock().expect("lease lock") = Some(lease.clone());
        Ok(lease)
    }

    /// Tries once to take the leader key, advertising `address`.
    pub fn campaign(&self, lease: &Lease, address: &str) -> Result<Attempt, StoreError> {
        let key = self.keys.leader();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key.clone(),
                address,
                Some(PutOptions::new().with_lease(lease.id)),
            )])
            .or_else(vec![TxnOp::get(key, None)]);
        let resp = self.call("campaign", txn_of(txn))?;
        if resp.succeeded() {
            let term = resp.header().map(|h| h.revision()).unwrap_or(0);
            return Ok(self.won(term));
        }
        let held = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(leader_of),
            _ => None,
        });
        match held {
            // Our own key, from an earlier campaign of this lease.
            Some(l) if l.lease == lease.id => Ok(self.won(l.term)),
            Some(l) => Ok(Attempt::Held(l)),
            // Deleted between the compare and the get: the next campaign decides.
            None => Ok(Attempt::Held(Leader {
                term: 0,
                address: String::new(),
                lease: 0,
            })),
        }
    }

    /// Puts this coordinator's membership record (`members/<address>`) with its lease: it
    /// lives as long as the lease, so a coordinator that died leaves the list within the TTL.
    pub fn register(&self, lease: &Lease, address: &str) -> Result<(), StoreError> {
        let key = self.keys.member(address);
        let (id, value) = (lease.id, address.to_string());
        self.call("register", move |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(id)))
                    .await
            }
        })
        .map(drop)
    }

    /// The leader key and the membership records, read at one revision.
    pub fn members(&self) -> Result<Coordinators, StoreError> {
        let prefix = self.keys.member("");
        let txn = Txn::new().and_then(vec![
            TxnOp::get(self.keys.leader(), None),
            TxnOp::get(prefix, Some(GetOptions::new().with_prefix())),
        ]);
        let resp = self.call("members", txn_of(txn))?;
        let mut gets = resp.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let leader = gets.next().and_then(|g| g.kvs().first().map(leader_of));
        let mut members: Vec<String> = gets
            .next()
            .map(|g| {
                g.kvs()
                    .iter()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        members.sort();
        let (leader, term) = leader.map(|l| (l.address, l.term)).unwrap_or_default();
        Ok(Coordinators {
            leader,
            term,
            members,
            endpoints: self.endpoints.clone(),
        })
    }

    fn won(&self, term: i64) -> Attempt {
        self.term.store(term, Ordering::SeqCst);
        Attempt::Won(term)
    }

    /// Claims etcd's state for the CA with this fingerprint, or checks that it was claimed for
    /// it: every coordinator sharing the state must be a copy of one `coordinator init`
    /// directory (the CA, the token key and the backup key are copied, never kept in etcd).
    pub fn check_ca(&self, fingerprint: &str) -> Result<(), StoreError> {
        let key = self.keys.ca();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(key.clone(), fingerprint, None)])
            .or_else(vec![TxnOp::get(key, None)]);
        let resp = self.call("check the CA", txn_of(txn))?;
        let theirs = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        match theirs {
            Some(t) if t != fingerprint => Err(StoreError::ForeignCa {
                ours: fingerprint.into(),
                theirs: t,
            }),
            _ => Ok(()),
        }
    }

    /// Whether this coordinator may act as the leader now: it won, and etcd acknowledged a
    /// renewal of its lease within the leader's deadline (half the TTL).
    pub fn leads(&self) -> bool {
        if self.term() == 0 {
            return false;
        }
        match &*self.lease.lock().expect("lease lock") {
            Some(l) => l.since_renewal() < l.deadline(),
            None => false,
        }
    }

    /// Stops leading at once without asking etcd (the leader's deadline passed: etcd is
    /// not answering): no more writes, and commands carry term 0, which agents that saw the
    /// term refuse. The lease expires on its own.
    pub fn abandon(&self) {
        self.term.store(0, Ordering::SeqCst);
        self.lease.lock().expect("lease lock").take();
    }

    /// Stops leading: no more writes, and the lease is revoked so that a follower wins at
    /// once rather than after the TTL (best effort, within the request limit).
    pub fn step_down(&self) {
        self.term.store(0, Ordering::SeqCst);
        let Some(lease) = self.lease.lock().expect("lease lock").take() else {
            return;
        };
        let id = lease.id;
        let r = self.call("revoke lease", move |mut c| async move {
            c.lease_revoke(id).await
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot revoke the leader's lease; it expires on its own");
        }
    }
}

/// A request that sends `txn` (again on each call).
fn txn_of(
    txn: Txn,
) -> impl FnMut(
    etcd_client::Client,
) -> std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<etcd_client::TxnResponse, etcd_client::Error>>
            + Send,
    >,
> + Send
+ 'static {
    move |mut c| {
        let t = txn.clone();
        Box::pin(async move { c.txn(t).await })
    }
}

/// How soon a failed renewal is tried again (at most a renewal period).
const RETRY_RENEWAL: Duration = Duration::from_millis(100);

/// Renews `lease` every sixth of its TTL until etcd says it is gone (a renewal that fails is
/// retried on a fresh stream; the leader's deadline does the rest).
async fn keep_alive(client: etcd_client::Client, lease: Lease) {
    // Two renewals fit in the leader's deadline (half the TTL): one slow answer alone does
    // not make it step down.
    let every = (lease.ttl / 6).max(Duration::from_millis(300));
    let mut stream = None;
    let mut failing = false;
    loop {
        let sent = Instant::now();
        let next = match renew(&client, &lease, &mut stream, every).await {
            Ok(ttl) if ttl > 0 => {
                lease.renewed(sent);
                failing = false;
                sent + every
            }
            Ok(_) => {
                tracing::warn!(
                    lease = lease.id,
                    "etcd says the coordinator's lease expired"
                );
                return;
            }
            Err(e) => {
                // The first failure of a run is worth a warning; the retries are not.
                match failing {
                    false => {
                        tracing::warn!(lease = lease.id, error = %e, "cannot renew the coordinator's lease")
                    }
                    true => {
                        tracing::debug!(lease = lease.id, error = %e, "cannot renew the coordinator's lease")
                    }
                }
                failing = true;
                stream = None;
                // Tried again soon rather than a period later: a member that refuses the
                // connection (one etcd member lost) answers at once, and only two periods fit
                // in the leader's deadline.
                (Instant::now() + RETRY_RENEWAL).min(sent + every)
            }
        };
        tokio::time::sleep_until(next.into()).await;
    }
}

type KeepAlive = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// One renewal, on the open stream or a new one; the TTL etcd answered (0: the lease is gone).
async fn renew(
    client: &etcd_client::Client,
    lease: &Lease,
    stream: &mut Option<KeepAlive>,
    limit: Duration,
) -> Result<i64, StoreError> {
    let once = async {
        if stream.is_none() {
            *stream = Some(client.lease_client().keep_alive(lease.id).await?);
        }
        let (keeper, responses) = stream.as_mut().expect("opened");
        keeper.keep_alive().await?;
        match responses.message().await? {
            Some(r) => Ok(r.ttl()),
            None => Err(etcd_client::Error::LeaseKeepAliveError(
                "the keep-alive stream ended".into(),
            )),
        }
    };
    match tokio::time::timeout(limit, once).await {
        Ok(r) => r.map_err(etcd_err("renew lease")),
        Err(_) => Err(lost("renew lease", limit)(super::Lost::Timeout)),
    }
}
