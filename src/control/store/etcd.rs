//! The coordinator's state in etcd, for highly available coordinators (ARCHITECTURE.md,
//! "Highly available coordinators").
//!
//! Keys, under a prefix (`/standby/v1` by default):
//! - `<prefix>/leader`: the leader key, put with the leader's lease (`election`); its create
//!   revision is the leader's *term*, which only grows.
//! - `<prefix>/members/<address>`: each coordinator's membership record, put with its own lease
//!   (`election`), so a dead coordinator's record goes when its lease expires.
//! - `<prefix>/ca`: the fingerprint of the CA whose coordinators own this state.
//! - `<prefix>/pairs/<name>` a `PairRecord`, `<prefix>/tokens/<nonce>` a `UsedToken`,
//!   `<prefix>/certs/<serial>` an `IssuedCert`, each protobuf-encoded.
//!
//! Invariant: every write is one transaction guarded by the leader key (its create revision must
//! equal this coordinator's term), so a deposed leader, whose lease expired or who lost etcd
//! while another won, cannot write: it gets [`StoreError::Deposed`], and one that never won gets
//! [`StoreError::NotLeader`]. Only state changes come here, never heartbeats.
//!
//! Hazard: the `Store` trait is synchronous and the engine calls it from its task; the client
//! runs on a runtime of its own thread (`bridge`).

mod bridge;
pub(crate) mod election;
/// Real etcd members for the tests: the same launcher as the end-to-end tests'.
#[cfg(test)]
#[path = "../../../tests/common/etcd.rs"]
#[allow(dead_code)] // what only the end-to-end tests use
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, TxnOp, TxnOpResponse,
};
use prometheus_client::metrics::histogram::Histogram;
use prost::Message;

use super::ha::EtcdConfig;
use super::{Coordinators, Snapshot, Store, StoreError};
use crate::proto::state::{IssuedCert, PairRecord, UsedToken};
use bridge::{Bridge, Lost};
use election::Lease;

/// At most this many operations in one transaction (etcd refuses more than `--max-txn-ops`,
/// 128 by default).
const MAX_TXN_OPS: usize = 100;
/// And at most about this many bytes (etcd's request limit is 1.5 MiB by default).
const MAX_TXN_BYTES: usize = 1 << 20;
/// The largest answer a load takes (10,000 pairs are a few MiB).
const MAX_LOAD_BYTES: usize = 256 << 20;

/// The keys of one prefix.
#[derive(Clone, Debug)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn leader(&self) -> String {
        format!("{}/leader", self.prefix)
    }
    fn member(&self, address: &str) -> String {
        format!("{}/members/{address}", self.prefix)
    }
    fn ca(&self) -> String {
        format!("{}/ca", self.prefix)
    }
    fn all(&self) -> String {
        format!("{}/", self.prefix)
    }
    fn pair(&self, name: &str) -> String {
        format!("{}/pairs/{name}", self.prefix)
    }
    fn token(&self, nonce: &str) -> String {
        format!("{}/tokens/{nonce}", self.prefix)
    }
    fn cert(&self, serial: &str) -> String {
        format!("{}/certs/{serial}", self.prefix)
    }
}

/// Whether a guarded write may be sent again after an attempt that got no answer (it may
/// have been applied): puts of whole records and deletes may, a create-if-absent may not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Replay {
    Safe,
    Unsafe,
}

/// The coordinator's state in etcd; see the module doc.
pub struct EtcdStore {
    bridge: Bridge,
    client: Client,
    keys: Keys,
    /// This coordinator's term while it leads, 0 otherwise; writes are guarded by it.
    term: Arc<AtomicI64>,
    /// The lease this coordinator campaigns with, once granted.
    lease: Mutex<Option<Lease>>,
    timeout: Duration,
    /// The client URLs it was given (`coordinator status` shows them).
    endpoints: Vec<String>,
    /// Where each request's duration goes (`standby_etcd_request_duration_seconds`).
    latency: Option<Histogram>,
}

fn etcd_err(op: &'static str) -> impl FnOnce(etcd_client::Error) -> StoreError {
    move |source| StoreError::Etcd {
        op,
        source: Box::new(source),
    }
}

impl EtcdStore {
    /// Connects to the cluster (the first request tells whether it answers).
    pub fn connect(cfg: &EtcdConfig) -> Result<EtcdStore, StoreError> {
        if cfg.endpoints.is_empty() {
            return Err(StoreError::EtcdConfig("no etcd endpoints given".into()));
        }
        let bridge = Bridge::start().map_err(|e| StoreError::EtcdConfig(e.to_string()))?;
        let opts = connect_options(cfg)?;
        let endpoints = cfg.endpoints.clone();
        let client = bridge
            .block(cfg.timeout, async move {
                Client::connect(endpoints, Some(opts)).await
            })
            .map_err(lost("connect", cfg.timeout))?
            .map_err(etcd_err("connect"))?;
        let store = EtcdStore {
            bridge,
            client,
            keys: Keys {
                prefix: cfg.prefix.trim_end_matches('/').to_string(),
            },
            term: Arc::new(AtomicI64::new(0)),
            lease: Mutex::new(None),
            timeout: cfg.timeout,
            endpoints: cfg.endpoints.clone(),
            latency: None,
        };
        Ok(store)
    }

    /// Observes every request's duration (answered or not) in `h`.
    pub fn with_latency(mut self, h: Histogram) -> EtcdStore {
        self.latency = Some(h);
        self
    }

    /// This coordinator's term while it leads, else 0.
    pub fn term(&self) -> i64 {
        self.term.load(Ordering::SeqCst)
    }

    /// Runs `f` with a client on the bridge, waiting at most the request limit.
    fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(Client) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        self.call_within(op, self.timeout, f)
    }

    /// [`call`](Self::call), waiting at most `limit`. A request that could not even connect
    /// (the client's balancer still picks a member that is down: etcd-client does not drop
    /// it) was never sent, so it goes again at once, to whichever member the balancer picks.
    fn call_within<T, F, Fut>(
        &self,
        op: &'static str,
        limit: Duration,
        mut f: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(Client) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let started = std::time::Instant::now();
        let client = self.client.clone();
        let tries = self.endpoints.len().max(1) * 2;
        let fut = async move {
            let mut tried = 0;
            loop {
                tried += 1;
                match f(client.clone()).await {
                    Err(e) if tried < tries && never_sent(&e) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    r => return r,
                }
            }
        };
        let r = self
            .bridge
            .block(limit, fut)
            .map_err(lost(op, limit))?
            .map_err(etcd_err(op));
        let elapsed = started.elapsed();
        if let Some(h) = &self.latency {
            h.observe(elapsed.as_secs_f64());
        }
        tracing::trace!(op, ?elapsed, "etcd");
        r
    }

    /// One transaction of `ops`, applied only while this coordinator holds the leader key.
    /// True when it was applied; false when `extra` (the caller's own condition) failed while
    /// this coordinator still leads; `Deposed` when another holds the key (or none does), and
    /// `LeaseLapsed` without even asking once the leader's own deadline has passed.
    fn guarded(
        &self,
        op: &'static str,
        replay: Replay,
        extra: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<bool, StoreError> {
        let term = self.term();
        if term == 0 {
            return Err(StoreError::NotLeader);
        }
        if !self.leads() {
            return Err(StoreError::LeaseLapsed { term });
        }
        let leader = self.keys.leader();
        let mut when = vec![Compare::create_revision(
            leader.clone(),
            CompareOp::Equal,
            term,
        )];
        when.extend(extra);
        let txn = etcd_client::Txn::new()
            .when(when)
            .and_then(ops)
            .or_else(vec![TxnOp::get(leader, None)]);
        let resp = self.send_guarded(op, replay, txn)?;
        if resp.succeeded() {
            return Ok(true);
        }
        let holder = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(KeyValue::create_revision)),
            _ => None,
        });
        match holder.flatten() {
            Some(rev) if rev == term => Ok(false),
            holder => {
                // Whoever holds the key now, it is not this coordinator's term: stop writing.
                self.term.store(0, Ordering::SeqCst);
                Err(StoreError::Deposed {
                    term,
                    now: holder.unwrap_or(0),
                })
            }
        }
    }

    /// Sends a guarded transaction. One that may be replayed gets two attempts of half the
    /// request limit each: a write in flight when etcd's own leader dies is lost with it and
    /// answered only after etcd's request timeout, while the same write again goes through
    /// the next etcd leader within a second or two (`tests/ha.rs`, one etcd member lost).
    fn send_guarded(
        &self,
        op: &'static str,
        replay: Replay,
        txn: etcd_client::Txn,
    ) -> Result<etcd_client::TxnResponse, StoreError> {
        let attempts = match replay {
            Replay::Safe => 2,
            Replay::Unsafe => 1,
        };
        let limit = self.timeout / attempts;
        let mut tried = 0;
        loop {
            tried += 1;
            let t = txn.clone();
            let send = move |mut c: Client| {
                let t = t.clone();
                async move { c.txn(t).await }
            };
            match self.call_within(op, limit, send) {
                Err(e @ StoreError::EtcdTimeout { .. }) if tried < attempts => {
                    if !self.leads() {
                        return Err(e);
                    }
                    tracing::warn!(op, error = %e, "etcd did not answer; sending the write again");
                }
                r => return r,
            }
        }
    }

    /// Puts these values in as few guarded transactions as the limits allow.
    fn put_all(&self, op: &'static str, kvs: Vec<(String, Vec<u8>)>) -> Result<(), StoreError> {
        for chunk in chunks(kvs) {
            let ops = chunk
                .into_iter()
                .map(|(k, v)| TxnOp::put(k, v, None))
                .collect();
            self.guarded(op, Replay::Safe, vec![], ops)?;
        }
        Ok(())
    }

    /// Deletes expired tokens and certificates nothing can present any more (as the file
    /// store's compaction does); only the leader does, and a failure only leaves them for later.
    fn forget_expired(&self, stale: Vec<String>) {
        if stale.is_empty() || self.term() == 0 {
            return;
        }
        for chunk in stale.chunks(MAX_TXN_OPS) {
            let ops = chunk
                .iter()
                .map(|k| TxnOp::delete(k.clone(), None))
                .collect();
            if let Err(e) = self.guarded("forget expired", Replay::Safe, vec![], ops) {
                tracing::warn!(error = %e, "cannot forget expired tokens and certificates yet");
                return;
            }
        }
    }
}

/// Whether the request failed before it was sent: the connection to the member was refused
/// (the member is down).
fn never_sent(e: &etcd_client::Error) -> bool {
    // etcd-client's own error names no source: start from what it wraps.
    let mut source: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(s) => Some(s),
        etcd_client::Error::TransportError(t) => Some(t),
        _ => None,
    };
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = s.source();
    }
    false
}

fn lost(op: &'static str, after: Duration) -> impl FnOnce(Lost) -> StoreError {
    move |l| match l {
        Lost::Timeout => StoreError::EtcdTimeout { op, after },
        Lost::Gone => StoreError::EtcdConfig("the etcd client's runtime thread ended".into()),
    }
}

/// Splits puts into transactions under etcd's limits (a value larger than the byte limit goes
/// alone, and etcd says if it is too large).
fn chunks(kvs: Vec<(String, Vec<u8>)>) -> Vec<Vec<(String, Vec<u8>)>> {
    let mut out: Vec<Vec<(String, Vec<u8>)>> = Vec::new();
    let mut bytes = 0;
    for kv in kvs {
        let size = kv.0.len() + kv.1.len();
        match out.last_mut() {
            Some(c) if c.len() < MAX_TXN_OPS && bytes + size <= MAX_TXN_BYTES => {
                bytes += size;
                c.push(kv);
            }
            _ => {
                bytes = size;
                out.push(vec![kv]);
            }
        }
    }
    out
}

fn connect_options(cfg: &EtcdConfig) -> Result<ConnectOptions, StoreError> {
    let mut o = ConnectOptions::new()
        .with_connect_timeout(cfg.timeout)
        .with_timeout(cfg.timeout)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    if let Some(t) = &cfg.tls {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| StoreError::EtcdConfig(format!("{}: {e}", p.display())))
        };
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca)?));
        match (&t.cert, &t.key) {
            (Some(c), Some(k)) => {
                tls = tls.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
            }
            (None, None) => {}
            _ => {
                return Err(StoreError::EtcdConfig(
                    "--etcd-cert and --etcd-key go together".into(),
                ));
            }
        }
        o = o.with_tls(tls);
    }
    Ok(o)
}

/// Decodes one value, naming its key when it is not what it should be.
fn decode<M: Message + Default>(kv: &KeyValue) -> Result<M, StoreError> {
    M::decode(kv.value()).map_err(|_| StoreError::EtcdCorrupt {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
    })
}

impl Store for EtcdStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        // One range over the whole prefix: every value read at one revision.
        let all = self.keys.all();
        let resp = self.call("load", move |c| {
            let all = all.clone();
            async move {
                c.kv_client()
                    .max_decoding_message_size(MAX_LOAD_BYTES)
                    .get(all, Some(GetOptions::new().with_prefix()))
                    .await
            }
        })?;
        let mut snap = Snapshot::default();
        let (pairs, tokens, certs) = (self.keys.pair(""), self.keys.token(""), self.keys.cert(""));
        for kv in resp.kvs() {
            let key = kv.key();
            if key.starts_with(pairs.as_bytes()) {
                let p: PairRecord = decode(kv)?;
                snap.pairs.insert(p.name.clone(), p);
            } else if key.starts_with(tokens.as_bytes()) {
                let t: UsedToken = decode(kv)?;
                snap.used_tokens.insert(t.nonce, t.expires_unix);
            } else if key.starts_with(certs.as_bytes()) {
                let c: IssuedCert = decode(kv)?;
                snap.certs.insert(c.serial.clone(), c);
            }
        }
        let before: Vec<(String, bool)> = snap
            .used_tokens
            .keys()
            .map(|n| (n.clone(), true))
            .chain(snap.certs.keys().map(|s| (s.clone(), false)))
            .collect();
        snap.prune(crate::host::unix_ms_now() / 1000);
        let stale = before
            .into_iter()
            .filter(|(k, token)| match token {
                true => !snap.used_tokens.contains_key(k),
                false => !snap.certs.contains_key(k),
            })
            .map(|(k, token)| match token {
                true => self.keys.token(&k),
                false => self.keys.cert(&k),
            })
            .collect();
        self.forget_expired(stale);
        Ok(snap)
    }

    /// Every etcd write is durable (committed by a quorum): `durable` changes nothing.
    fn put_pairs(&self, pairs: &[PairRecord], _durable: bool) -> Result<(), StoreError> {
        let kvs = pairs
            .iter()
            .map(|p| (self.keys.pair(&p.name), p.encode_to_vec()))
            .collect();
        self.put_all("put pairs", kvs)
    }

    fn delete_pair(&self, name: &str) -> Result<(), StoreError> {
        let op = TxnOp::delete(self.keys.pair(name), None);
        self.guarded("delete pair", Replay::Safe, vec![], vec![op])
            .map(drop)
    }

    fn use_token(&self, nonce: &str, expires_unix: u64) -> Result<bool, StoreError> {
        // The token's key must not exist yet: of many joins racing with one token (even on
        // different coordinators, were one deposed mid-way), one transaction wins.
        let key = self.keys.token(nonce);
        let t = UsedToken {
            nonce: nonce.to_string(),
            expires_unix,
        };
        let fresh = Compare::create_revision(key.clone(), CompareOp::Equal, 0);
        let put = TxnOp::put(key, t.encode_to_vec(), None);
        // Never sent twice: a first attempt applied but unanswered would make the second
        // find the token used, and refuse a legitimate join as a replay.
        self.guarded("use token", Replay::Unsafe, vec![fresh], vec![put])
    }

    fn term(&self) -> u64 {
        self.term().max(0) as u64
    }

    fn coordinators(&self) -> Result<Option<Coordinators>, StoreError> {
        self.members().map(Some)
    }

    fn put_certs(&self, certs: &[IssuedCert]) -> Result<(), StoreError> {
        let kvs = certs
            .iter()
            .map(|c| (self.keys.cert(&c.serial), c.encode_to_vec()))
            .collect();
        self.put_all("put certs", kvs)
    }
}
