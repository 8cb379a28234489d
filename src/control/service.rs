//! The coordinator service: join, heartbeats, administration, health, reflection and metrics.
//!
//! Authorisation (Invariant 7): `Join` is the only call accepted without a client certificate
//! and is authenticated by a single-use token (bound to one machine when minted so); heartbeats
//! need a pair certificate (`gpu` or `cpu`), not revoked, and they speak for exactly that pair,
//! role and machine; every `Admin` call needs an admin certificate that has not expired. A
//! certificate that expired within the renewal grace may only renew (`heartbeat`).
//! ARCHITECTURE.md, "Trust".
//!
//! Bounded per identity: at most two heartbeat streams per agent certificate (a newer one ends
//! the oldest, so a reconnecting agent never waits for its dead stream to time out) and four
//! `Events` subscriptions per admin at once (RESOURCE_EXHAUSTED beyond); a report whose strings break
//! their limits (`wire::check_report`) ends its stream with INVALID_ARGUMENT. Reflection, and
//! health for clients without a certificate, are served only when asked for (`--reflection`,
//! `--public-health`).
//!
//! Files: `serve` (start-up and the gRPC server), `leadership` (follow, then lead, on etcd),
//! `seat` (leader or follower: what the calls are answered from; a follower names the leader),
//! `agents` (`Join`, `Heartbeat`) with `heartbeat` (one agent's stream), `admin` (the `Admin`
//! calls) with `history` (their relay to a standby), `options` (`ServeOptions`), `keys` (the
//! server certificate and the token key) and `provisioning` (the providers).

mod admin;
mod agents;
mod heartbeat;
mod history;
mod keys;
#[cfg(feature = "etcd")]
mod leadership;
mod options;
mod provisioning;
mod seat;
mod serve;

pub use crate::control::store::ha::{EtcdConfig, EtcdTls, HaOptions};
pub use keys::{SERVER_TLS_DIR, mint_token, server_tls, token_key};
pub use options::{BackupPlan, ServeOptions};
pub use serve::{NO_ETCD, serve};

use seat::Seat;

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use crate::control::engine::Engine;
use crate::control::metrics::Refusal;
use crate::control::store::Store;
use crate::control::store::certs::{self, Registry};
use crate::proto::{BackupTarget, Event, EventKind};
use crate::trust::identity::{CertFacts, Identity, Role};
use crate::trust::pki::Ca;
use crate::trust::quota::{Quota, Rotation};
use crate::trust::tls::{self, TlsMaterial};
use crate::types::Side;

/// Largest message the coordinator accepts.
const MAX_MESSAGE: usize = 4 << 20;

pub struct Shared {
    pub engine: Engine,
    ca: Ca,
    token_key: Vec<u8>,
    fingerprint: String,
    store: Arc<dyn Store>,
    /// Heartbeat streams per agent certificate (its URI).
    heartbeats: Rotation<String>,
    /// `Events` subscriptions per admin name.
    subscriptions: Quota<String>,
    registry: Arc<Registry>,
    /// How long the certificates issued to agents live.
    cert_lifetime: Duration,
    /// The coordinator's own certificate, as a client of the standbys (their history).
    material: TlsMaterial,
    /// What CPU standbys are told of the off-site backup (the url without the pair, no key), and
    /// the key each pair's is derived from.
    backup: Option<(BackupTarget, crate::trust::seal::BackupKey)>,
}

impl Shared {
    /// A rebuild from the backup needs `[backup]` here and a snapshot named as the bucket names
    /// them.
    fn check_rebuild(&self, snapshot: &str) -> Result<(), Status> {
        if self.backup.is_none() {
            return Err(Status::failed_precondition(
                "recover --from-backup needs the coordinator's [backup] (coordinator.toml): it names the bucket the pair's standby backed up to",
            ));
        }
        let id = snapshot.len() == 16 && snapshot.bytes().all(|b| b.is_ascii_hexdigit());
        if snapshot != "latest" && !id {
            return Err(Status::invalid_argument(format!(
                "--snapshot takes `latest` or a snapshot id (16 hex digits), not {:?}",
                crate::text::truncate(snapshot.to_string(), 40)
            )));
        }
        Ok(())
    }

    /// A refusal: counted, shown as an event, and answered PERMISSION_DENIED, or UNAUTHENTICATED
    /// for a revoked certificate (an agent that hears it knows it was retired, and fences
    /// itself).
    fn refuse(&self, pair: &str, why: Refusal, message: String) -> Status {
        tracing::warn!(pair, reason = why.as_str(), "{message}");
        self.engine.metrics.refuse(why);
        self.engine.events.emit(Event {
            unix_ms: crate::host::unix_ms_now(),
            pair: pair.to_string(),
            kind: EventKind::Refused.into(),
            message: format!("refused ({}): {message}", why.as_str()),
            ..Default::default()
        });
        match why {
            Refusal::Revoked => Status::unauthenticated(message),
            _ => Status::permission_denied(message),
        }
    }

    /// Signs `csr_pem` as `id`, also valid for the host of `advertise` (so stock clients dial
    /// the agent by name), and records the certificate (durably) before it is returned.
    async fn issue(&self, csr_pem: &str, id: &Identity, advertise: &str) -> Result<String, Status> {
        let cert_pem = self
            .ca
            .sign_csr(csr_pem, id, self.cert_lifetime, &advertised_san(advertise))
            .map_err(|e| Status::invalid_argument(format!("certificate request: {e}")))?;
        let facts = facts_of(&cert_pem).map_err(Status::internal)?;
        let rec = certs::issued(&facts)
            .ok_or_else(|| Status::internal("issued a certificate for no machine"))?;
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || registry.record(rec))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("recording the certificate: {e}")))?;
        Ok(cert_pem)
    }
}

/// The host of an agent's `--advertise` address as a certificate name; none when it has no
/// usable host (the agent's own start-up check already refused a malformed one).
fn advertised_san(advertise: &str) -> Vec<crate::trust::pki::San> {
    if advertise.is_empty() {
        return Vec::new();
    }
    let host = tls::endpoint_uri(advertise)
        .ok()
        .and_then(|u| u.host().map(str::to_string));
    host.and_then(|h| h.parse().ok()).into_iter().collect()
}

/// The facts of a PEM certificate.
fn facts_of(cert_pem: &str) -> Result<CertFacts, String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| format!("issued certificate: {e}"))?;
    CertFacts::from_der(&der).map_err(|e| format!("issued certificate: {e}"))
}

pub struct CoordinatorSvc(Seat);
pub struct AdminSvc(Seat);

fn side_of(role: Role) -> Side {
    match role {
        Role::Gpu => Side::Gpu,
        Role::Cpu => Side::Cpu,
    }
}
