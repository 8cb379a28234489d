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

mod heartbeat;
mod history;
#[cfg(feature = "etcd")]
mod leadership;

pub use crate::control::store::ha::{EtcdConfig, EtcdTls, HaOptions};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use crate::control::engine::{Dial, Engine, Provisioning, Reporting};
use crate::control::failover::{Input, Policy, Timing};
use crate::control::metrics::{CertLabel, Metrics, Refusal};
use crate::control::notify::{Notifier, Webhook};
use crate::control::provider::ProvisionConfig;
use crate::control::store::certs::{self, Registry};
use crate::control::store::{FileStore, Store};
use crate::proto::admin_server::{Admin, AdminServer};
use crate::proto::coordinator_server::{Coordinator, CoordinatorServer};
use crate::proto::{
    ActionReply, AgentReport, BackupTarget, Command, Event, EventKind, EventsRequest, FetchItem,
    JoinReply, JoinRequest, LeadershipReply, LeadershipRequest, ListPairsReply, ListPairsRequest,
    PairFetchRequest, PairRequest, PairVersionsRequest, PairView, RecoverRequest, StoreKind,
    VersionsReply,
};
use crate::trust::identity::{CertFacts, Identity, Role};
use crate::trust::pki::Ca;
use crate::trust::quota::{Permit, Quota, Rotation};
use crate::trust::tls::{self, TlsMaterial};
use crate::trust::token::{Token, TokenError};
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

pub struct CoordinatorSvc(Arc<Shared>);
pub struct AdminSvc(Arc<Shared>);

fn side_of(role: Role) -> Side {
    match role {
        Role::Gpu => Side::Gpu,
        Role::Cpu => Side::Cpu,
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorSvc {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let addr = tls::remote_addr(&req);
        let r = req.into_inner();
        let role = match r.role() {
            crate::proto::Role::Gpu => Role::Gpu,
            crate::proto::Role::Cpu => Role::Cpu,
            crate::proto::Role::Unspecified => {
                return Err(Status::invalid_argument("join request without a role"));
            }
        };
        crate::trust::identity::check_name(&r.machine)
            .map_err(|e| Status::invalid_argument(format!("machine name: {e}")))?;
        let s = &self.0;
        let token = s.join_token(&r, role).await?;
        let id = Identity::node(&token.pair, role, &r.machine)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cert_pem = s.issue(&r.csr_pem, &id, &r.advertise).await?;
        s.engine
            .seated(&token.pair, side_of(role), &r.machine)
            .await?;
        s.engine.events.emit(Event {
            unix_ms: crate::host::unix_ms_now(),
            pair: token.pair.clone(),
            kind: EventKind::Joined.into(),
            message: format!("{} agent {} joined from {:?}", role, r.machine, addr),
            ..Default::default()
        });
        Ok(Response::new(JoinReply {
            ca_pem: s.ca.cert_pem().to_string(),
            cert_pem,
            pair: token.pair,
        }))
    }

    type HeartbeatStream = ReceiverStream<Result<Command, Status>>;

    async fn heartbeat(
        &self,
        req: Request<Streaming<AgentReport>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let peer = tls::peer_of(&req)?;
        let slot = self.0.heartbeats.take(&peer.identity.to_string());
        let observed = peer.addr.map(|a| a.ip());
        heartbeat::open(self.0.clone(), peer, observed, req.into_inner(), slot).await
    }
}

impl Shared {
    /// The join request's token, verified, bound to the joining machine, and used (durably,
    /// before any certificate is handed out).
    async fn join_token(&self, r: &JoinRequest, role: Role) -> Result<Token, Status> {
        let now = crate::host::unix_ms_now() / 1000;
        let token = Token::verify(&r.token, &self.token_key, &self.fingerprint, role, now)
            .map_err(|e| {
                let pair = Token::parse(&r.token)
                    .map(|(t, _)| t.pair)
                    .unwrap_or_default();
                self.refuse(&pair, Refusal::BadToken, format!("join refused: {e}"))
            })?;
        if let Err(e) = token.check_machine(&r.machine) {
            return Err(self.refuse(
                &token.pair,
                Refusal::WrongMachine,
                format!("join refused: {e}"),
            ));
        }
        let store = self.store.clone();
        let (nonce, exp) = (token.nonce.clone(), token.expires_unix);
        let first = tokio::task::spawn_blocking(move || store.use_token(&nonce, exp))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("recording the token: {e}")))?;
        if !first {
            let message = format!("join by {} refused: {}", r.machine, TokenError::Replayed);
            return Err(self.refuse(&token.pair, Refusal::TokenSpent, message));
        }
        Ok(token)
    }
}

/// A place in `quota` for `key`, or RESOURCE_EXHAUSTED naming what is limited.
fn take(quota: &Quota<String>, key: String, what: &str) -> Result<Permit<String>, Status> {
    quota.try_take(&key).ok_or_else(|| {
        tracing::warn!(identity = %key, limit = quota.limit(), "refused: too many {what}");
        Status::resource_exhausted(format!("{key} already has {} {what} open", quota.limit()))
    })
}

fn admin<T>(req: &Request<T>) -> Result<String, Status> {
    let peer = tls::peer_of(req)?;
    if peer.not_after_unix <= (crate::host::unix_ms_now() / 1000) as i64 {
        // Let through the handshake for renewal only (the coordinator's grace).
        return Err(Status::permission_denied(
            "your certificate has expired; admin calls need a valid admin certificate",
        ));
    }
    match peer.identity {
        Identity::Admin { name } => Ok(name),
        other => Err(Status::permission_denied(format!(
            "admin calls need an admin certificate; you are {other}"
        ))),
    }
}

#[tonic::async_trait]
impl Admin for AdminSvc {
    async fn create_pair(&self, req: Request<PairRequest>) -> Result<Response<PairView>, Status> {
        admin(&req)?;
        Ok(Response::new(
            self.0.engine.create(&req.into_inner().pair).await?,
        ))
    }

    async fn list_pairs(
        &self,
        req: Request<ListPairsRequest>,
    ) -> Result<Response<ListPairsReply>, Status> {
        admin(&req)?;
        Ok(Response::new(ListPairsReply {
            pairs: self.0.engine.list().await?,
        }))
    }

    async fn failover(&self, req: Request<PairRequest>) -> Result<Response<ActionReply>, Status> {
        let who = admin(&req)?;
        let pair = req.into_inner().pair;
        tracing::info!(%pair, admin = %who, "manual failover requested");
        Ok(Response::new(self.0.engine.failover(&pair).await?))
    }

    async fn recover(&self, req: Request<RecoverRequest>) -> Result<Response<ActionReply>, Status> {
        let who = admin(&req)?;
        let RecoverRequest { pair, from_backup } = req.into_inner();
        let input = match from_backup {
            None => Input::Recover,
            Some(pick) => {
                self.0.check_rebuild(&pick.snapshot)?;
                tracing::warn!(%pair, admin = %who, snapshot = %pick.snapshot, "rebuild from the off-site backup requested");
                Input::RecoverFromBackup {
                    snapshot: pick.snapshot,
                    now: std::time::Instant::now(),
                }
            }
        };
        Ok(Response::new(self.0.engine.manual(&pair, input).await?))
    }

    async fn hibernate(&self, req: Request<PairRequest>) -> Result<Response<ActionReply>, Status> {
        admin(&req)?;
        let pair = req.into_inner().pair;
        Ok(Response::new(
            self.0.engine.manual(&pair, Input::Hibernate).await?,
        ))
    }

    async fn wake(&self, req: Request<PairRequest>) -> Result<Response<ActionReply>, Status> {
        admin(&req)?;
        let pair = req.into_inner().pair;
        Ok(Response::new(
            self.0.engine.manual(&pair, Input::Wake).await?,
        ))
    }

    type EventsStream = ReceiverStream<Result<Event, Status>>;

    async fn events(
        &self,
        req: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let who = admin(&req)?;
        let slot = take(&self.0.subscriptions, who, "event subscriptions")?;
        let r = req.into_inner();
        let engine = self.0.engine.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let _slot = slot;
            forward_events(&engine, r, tx).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn versions(
        &self,
        req: Request<PairVersionsRequest>,
    ) -> Result<Response<VersionsReply>, Status> {
        admin(&req)?;
        Ok(Response::new(self.0.versions(req.into_inner()).await?))
    }

    async fn leadership(
        &self,
        req: Request<LeadershipRequest>,
    ) -> Result<Response<LeadershipReply>, Status> {
        admin(&req)?;
        let store = self.0.store.clone();
        let found = tokio::task::spawn_blocking(move || store.coordinators())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(format!("asking etcd who leads: {e}")))?;
        let pairs = u32::try_from(self.0.engine.metrics.pairs.get()).unwrap_or(0);
        let reply = match found {
            None => LeadershipReply {
                store: StoreKind::File.into(),
                pairs,
                ..Default::default()
            },
            Some(c) => LeadershipReply {
                store: StoreKind::Etcd.into(),
                leader: c.leader,
                term: c.term.max(0) as u64,
                members: c.members,
                etcd_endpoints: c.endpoints,
                pairs,
            },
        };
        Ok(Response::new(reply))
    }

    type FetchStream = ReceiverStream<Result<FetchItem, Status>>;

    async fn fetch(
        &self,
        req: Request<PairFetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let who = admin(&req)?;
        let r = req.into_inner();
        tracing::info!(pair = %r.pair, admin = %who, path = %r.path, "restore from the standby's history");
        Ok(Response::new(self.0.fetch(r).await?))
    }
}

/// Sends the recent events, then (following) each new one, until the subscriber goes away.
async fn forward_events(
    engine: &Engine,
    r: EventsRequest,
    tx: mpsc::Sender<Result<Event, Status>>,
) {
    let (recent, mut live) = engine.events.subscribe();
    for e in recent {
        if (r.heartbeats || e.kind() != EventKind::Heartbeat) && tx.send(Ok(e)).await.is_err() {
            return;
        }
    }
    if !r.follow {
        return;
    }
    if r.heartbeats {
        engine.heartbeat_subscribers(1).await;
    }
    loop {
        // A subscriber that left is noticed even when no event comes (its place is given back).
        let next = tokio::select! {
            _ = tx.closed() => break,
            next = live.recv() => next,
        };
        let e = match next {
            Ok(e) if !r.heartbeats && e.kind() == EventKind::Heartbeat => continue,
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => Event {
                kind: EventKind::Warning.into(),
                message: format!("{n} events dropped: the subscriber was too slow"),
                ..Default::default()
            },
            Err(_) => break,
        };
        if tx.send(Ok(e)).await.is_err() {
            break;
        }
    }
    if r.heartbeats {
        engine.heartbeat_subscribers(-1).await;
    }
}

/// Settings of `coordinator serve`.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub dir: PathBuf,
    pub listen: String,
    pub metrics_listen: String,
    /// The read-only status page (plain HTTP; None: not served). It shows pair names and
    /// addresses: loopback or a private network (ARCHITECTURE.md, "Status page").
    pub status_listen: Option<String>,
    pub timing: Timing,
    /// How long the certificates issued to agents live (renewed at two thirds).
    pub cert_lifetime: Duration,
    /// How long after it expired an agent's certificate may still connect, to renew only.
    pub renew_grace: Duration,
    /// Where machines come from: "local", "vastai", "gcp", "command" or "none" (replacements
    /// join by hand).
    pub provider: String,
    /// Where CPU standbys come from, when not from `provider` ("" = the same).
    pub cpu_provider: String,
    pub policy: Policy,
    pub provision: crate::control::provider::ProvisionConfig,
    /// The coordinator's address as new machines dial it ("" = the bound address).
    pub advertise: String,
    /// `local` provider: where the agent binaries are, and extra arguments for them.
    pub local_bin_dir: Option<PathBuf>,
    pub local_agent_args: Vec<String>,
    pub vastai: crate::control::provider::vastai::VastSettings,
    pub gcp: crate::control::provider::gcp::GcpSettings,
    pub command: crate::control::provider::command::CommandSettings,
    /// Serve gRPC reflection (off by default: it maps the whole API for anyone).
    pub reflection: bool,
    /// Answer `grpc.health.v1` without a client certificate (off by default: only clients with
    /// a certificate of our CA, any role, are answered).
    pub public_health: bool,
    /// Where CPU standbys back their history up (`[backup]`; None: they are not told).
    pub backup: Option<BackupPlan>,
    /// `[[notify]]` webhooks, checked (ARCHITECTURE.md, "Notifications").
    pub notify: Vec<Webhook>,
    /// The state in etcd, with leader election (`--store etcd`); None: the file store under
    /// `<dir>/state` (ARCHITECTURE.md, "Highly available coordinators").
    pub ha: Option<HaOptions>,
}

/// The coordinator's `[backup]`: one bucket for the fleet, each pair below its own prefix
/// (`<url>/<pair>`). The key is the coordinator's `backup.key`; the bucket's access key comes
/// from the coordinator's environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`). ARCHITECTURE.md, "Off-site backup".
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupPlan {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    #[serde(default)]
    pub endpoint: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub virtual_hosted: bool,
    /// Upload bandwidth per CPU standby (`20MB`: per second); none: no limit.
    #[serde(default)]
    pub bandwidth: Option<String>,
}

impl BackupPlan {
    /// The target pairs' CPU agents are sent (each gets its pair's prefix and key), with the
    /// access key.
    fn target(&self) -> anyhow::Result<BackupTarget> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
        else {
            anyhow::bail!(
                "[backup] needs the bucket's access key in AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY (the coordinator's environment)"
            );
        };
        let bandwidth = match &self.bandwidth {
            Some(b) => {
                crate::cli::parse_size(b).map_err(|e| anyhow::anyhow!("[backup] bandwidth: {e}"))?
            }
            None => 0,
        };
        if !self.url.starts_with("s3://") {
            anyhow::bail!("[backup] url {:?} must start with s3://", self.url);
        }
        Ok(BackupTarget {
            url: self.url.trim_end_matches('/').to_string(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            virtual_hosted: self.virtual_hosted,
            access_key_id: id,
            secret_access_key: secret,
            session_token: env("AWS_SESSION_TOKEN").unwrap_or_default(),
            key_hex: String::new(),
            bandwidth,
        })
    }
}

/// The coordinator's own TLS directory, under its directory.
pub const SERVER_TLS_DIR: &str = "server";

/// The coordinator's own TLS directory (identity `standby://coordinator`, the default host
/// names), issued on demand.
pub fn server_tls(dir: &Path, ca: &Ca) -> anyhow::Result<TlsMaterial> {
    let d = dir.join(SERVER_TLS_DIR);
    if !d.join(crate::trust::pki::CERT_FILE).exists() {
        ca.issue_server(&[])?.write_dir(&d)?;
    }
    Ok(TlsMaterial::load(&d)?)
}

/// The key that signs join tokens (created on first use, mode 0600).
pub fn token_key(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let p = dir.join("token.key");
    match std::fs::read(&p) {
        Ok(k) if k.len() == 32 => Ok(k),
        Ok(_) => anyhow::bail!("{} is not a 32-byte key", p.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k: [u8; 32] = rand::random();
            crate::trust::pki::write_private(&p, &k)?;
            Ok(k.to_vec())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Mints a join token for `pair`/`role` valid for `ttl`.
/// Mints a join token for `pair`/`role` valid for `ttl`, bound to `machine` when given
/// (otherwise to whichever machine joins with it first).
pub fn mint_token(
    dir: &Path,
    pair: &str,
    role: Role,
    machine: Option<&str>,
    ttl: Duration,
) -> anyhow::Result<String> {
    crate::trust::identity::check_name(pair)?;
    if let Some(m) = machine {
        crate::trust::identity::check_name(m)?;
    }
    let ca = Ca::load(dir)?;
    let key = token_key(dir)?;
    let exp = crate::host::unix_ms_now() / 1000 + ttl.as_secs().max(1);
    let t = Token::new(pair, role, exp, &ca.fingerprint());
    let t = match machine {
        Some(m) => t.bound_to(m),
        None => t,
    };
    Ok(t.sign(&key))
}

type DynProvider = Arc<dyn crate::control::provider::Provider>;

/// The provider called `name`, built from the options (None for "none").
fn make_provider(name: &str, opts: &ServeOptions) -> anyhow::Result<Option<DynProvider>> {
    let dir = &opts.dir;
    Ok(match name {
        "none" | "" => None,
        "local" => {
            let mut l = crate::control::provider::local::Local::new(
                dir.join("machines"),
                opts.local_bin_dir
                    .clone()
                    .unwrap_or_else(crate::control::provider::local::Local::default_bin_dir),
                opts.timing.heartbeat,
            );
            l.extra_args = opts.local_agent_args.clone();
            Some(Arc::new(l))
        }
        "vastai" => {
            let p = crate::control::provider::vastai::VastAi::new(opts.vastai.clone())?;
            Some(Arc::new(p))
        }
        "gcp" => {
            let creds = crate::control::provider::gcp::Gcp::credentials_path(&opts.gcp)?;
            Some(Arc::new(crate::control::provider::gcp::Gcp::new(
                opts.gcp.clone(),
                &creds,
            )?))
        }
        "command" => Some(Arc::new(
            crate::control::provider::command::CommandProvider::new(opts.command.clone())?,
        )),
        other => anyhow::bail!("unknown provider {other:?} (local, vastai, gcp, command, none)"),
    })
}

/// What a build without the `etcd` feature says to `--store etcd`.
pub const NO_ETCD: &str = "this coordinator was built without etcd support: build it with \
     `cargo build --release --features etcd` (needs protoc) for --store etcd";

/// Runs the coordinator until `shutdown`. Writes the bound addresses to `<dir>/serve.addr`,
/// `<dir>/metrics.addr` and (with a status page) `<dir>/status.addr`; tells systemd it is ready
/// once they are bound.
pub async fn serve(opts: ServeOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let dir = &opts.dir;
    let ca = Ca::load(dir).with_context(|| {
        format!(
            "loading the CA from {} (run `coordinator init`)",
            dir.display()
        )
    })?;
    // Metrics first: a follower serves them too (ARCHITECTURE.md, "Metrics and alerts").
    let metrics = Arc::new(Metrics::new());
    let exporting = shutdown.child_token();
    let exporter = export_metrics(&opts, metrics.clone(), &exporting).await?;
    let served = match opts.ha.clone() {
        None => match FileStore::open(&dir.join("state")) {
            Ok(store) => {
                // The only coordinator of its state leads, always.
                metrics.leadership.leader.set(1);
                serve_with(opts, ca, Arc::new(store), metrics, shutdown).await
            }
            Err(e) => Err(e.into()),
        },
        Some(ha) => serve_ha(opts, ca, ha, metrics, shutdown).await,
    };
    exporting.cancel();
    let _ = exporter.await;
    served
}

/// Binds `--metrics-listen`, writes its address to `<dir>/metrics.addr` and serves `/metrics`
/// until `shutdown`.
async fn export_metrics(
    opts: &ServeOptions,
    metrics: Arc<Metrics>,
    shutdown: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let listener = bind(&opts.metrics_listen).await?;
    let addr = listener.local_addr()?;
    crate::disk::crashsafe::write_atomic(
        &opts.dir.join("metrics.addr"),
        addr.to_string().as_bytes(),
    )?;
    tracing::info!(metrics = %addr, "metrics");
    Ok(tokio::spawn(crate::control::metrics::serve(
        listener,
        metrics,
        shutdown.clone(),
    )))
}

/// `serve` on etcd: follow until this coordinator leads, serve while it leads.
#[cfg(feature = "etcd")]
async fn serve_ha(
    opts: ServeOptions,
    ca: Ca,
    ha: HaOptions,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let address = match opts.advertise.as_str() {
        "" => opts.listen.replace("0.0.0.0:", "127.0.0.1:"),
        a => a.to_string(),
    };
    let fingerprint = ca.fingerprint();
    let campaign = leadership::Campaign {
        ha: &ha,
        address: &address,
        fingerprint: &fingerprint,
        metrics: &metrics,
    };
    let Some(store) = leadership::follow(campaign, &shutdown).await? else {
        return Ok(());
    };
    let serving = shutdown.child_token();
    let watchdog = leadership::watch(store.clone(), metrics.clone(), serving.clone());
    let served = serve_with(opts, ca, store, metrics, serving.clone()).await;
    serving.cancel();
    let _ = watchdog.await;
    served?;
    if !shutdown.is_cancelled() {
        anyhow::bail!(
            "stepped down: the leader's lease was not renewed within its deadline (start again to follow)"
        );
    }
    Ok(())
}

/// Without the `etcd` feature there is no etcd client in this build.
#[cfg(not(feature = "etcd"))]
async fn serve_ha(
    _: ServeOptions,
    _: Ca,
    _: HaOptions,
    _: Arc<Metrics>,
    _: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::bail!(NO_ETCD)
}

/// `serve` once the store is open (and, on etcd, this coordinator leads).
async fn serve_with(
    opts: ServeOptions,
    ca: Ca,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let dir = &opts.dir;
    let mut material = server_tls(dir, &ca)?;
    material.expired_grace = Some(renew_grace(opts.renew_grace));
    let token_key = token_key(dir)?;
    // A directory made before backups existed gets its backup key now (ARCHITECTURE.md,
    // "Off-site backup").
    let backup_key = crate::trust::seal::BackupKey::load_or_create(dir)?;
    tracing::info!(fingerprint = %backup_key.fingerprint(), "backup key");
    let backup = match &opts.backup {
        Some(plan) => Some((plan.target()?, backup_key)),
        None => None,
    };
    let registry = Arc::new(Registry::load(store.clone(), material.deny.clone())?);
    own_expiries(&metrics, &ca, &material, opts.cert_lifetime);
    let listener = bind(&opts.listen).await?;
    let addr = listener.local_addr()?;
    let mut policy = opts.policy.clone();
    policy.label_prefix = format!("sb-{}", &ca.fingerprint()[..8]);
    let provisioning = provisioning(&opts, addr, &store, &ca, &token_key)?;
    policy.provider = provisioning.is_some();
    let origin = crate::control::notify::Origin::here(&policy.label_prefix);
    let notifier = Notifier::start(opts.notify.clone(), origin, &metrics, &shutdown)?;
    let engine = Engine::start(
        store.clone(),
        opts.timing,
        policy,
        provisioning,
        registry.clone(),
        Reporting {
            metrics: metrics.clone(),
            notifier,
        },
        shutdown.clone(),
    )?;
    let shared = Arc::new(Shared {
        engine,
        fingerprint: ca.fingerprint(),
        ca,
        token_key,
        store,
        registry,
        cert_lifetime: opts.cert_lifetime,
        heartbeats: Rotation::new(crate::cli::defaults::HEARTBEATS_PER_IDENTITY),
        subscriptions: Quota::new(crate::cli::defaults::EVENTS_PER_ADMIN),
        material: material.clone(),
        backup,
    });

    let page = status_page(&opts, dir, &shared.engine, &shutdown).await?;
    // Replaced atomically, `serve.addr` last (`metrics.addr` was written before): whoever
    // waits for it finds the others complete.
    crate::disk::crashsafe::write_atomic(&dir.join("serve.addr"), addr.to_string().as_bytes())?;
    tracing::info!(%addr, "coordinator serving");
    crate::systemd::ready_until(&shutdown);
    let public = Public {
        reflection: opts.reflection,
        health: opts.public_health,
    };
    serve_grpc(listener, &material, shared, public, shutdown).await?;
    if let Some(p) = page {
        let _ = p.await;
    }
    Ok(())
}

/// Binds and starts the status page when asked for (`--status-listen`), writing its address to
/// `<dir>/status.addr`.
async fn status_page(
    opts: &ServeOptions,
    dir: &Path,
    engine: &Engine,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>> {
    let Some(at) = &opts.status_listen else {
        return Ok(None);
    };
    let listener = bind(at).await?;
    let saddr = listener.local_addr()?;
    crate::disk::crashsafe::write_atomic(&dir.join("status.addr"), saddr.to_string().as_bytes())?;
    tracing::info!(status = %saddr, "status page (read-only, no authentication)");
    Ok(Some(tokio::spawn(crate::control::status::serve(
        listener,
        engine.clone(),
        shutdown.clone(),
    ))))
}

/// The renewal grace, capped to how long the registry keeps expired certificates (a longer
/// one would let in certificates it could no longer tell revoked).
fn renew_grace(asked: Duration) -> Duration {
    if asked > certs::MAX_RENEW_GRACE {
        tracing::warn!(
            asked = ?asked,
            max = ?certs::MAX_RENEW_GRACE,
            "--renew-grace is capped"
        );
    }
    asked.min(certs::MAX_RENEW_GRACE)
}

/// The expiry of the CA's and the server's certificates, and the agents' lifetime.
fn own_expiries(metrics: &Metrics, ca: &Ca, material: &TlsMaterial, lifetime: Duration) {
    use rustls_pki_types::pem::PemObject;
    let ca_der = rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).ok();
    let ders = [("ca", ca_der), ("server", material.chain.first().cloned())];
    for (kind, der) in ders {
        let Some(not_after) = der.as_deref().and_then(not_after_of) else {
            continue;
        };
        let l = CertLabel {
            kind: kind.into(),
            pair: String::new(),
            role: String::new(),
            machine: String::new(),
        };
        metrics.cert_expiry.get_or_create(&l).set(not_after);
    }
    metrics.cert_lifetime.set(lifetime.as_secs() as i64);
}

/// When a certificate expires (unix s), whatever it names.
fn not_after_of(der: &[u8]) -> Option<i64> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))
}

/// What the engine needs to create machines (None with the provider `none`: replacements join
/// by hand).
fn provisioning(
    opts: &ServeOptions,
    addr: SocketAddr,
    store: &Arc<dyn Store>,
    ca: &Ca,
    token_key: &[u8],
) -> anyhow::Result<Option<Provisioning>> {
    let Some((gpu, cpu)) = providers(opts)? else {
        return Ok(None);
    };
    Ok(Some(Provisioning {
        gpu,
        cpu,
        cfg: provision_config(opts),
        dial: Dial {
            own: coordinator_url(opts, addr),
            group: store.clone(),
        },
        token_key: token_key.to_vec(),
        fingerprint: ca.fingerprint(),
    }))
}

/// The GPU and the CPU providers: both or neither.
fn providers(opts: &ServeOptions) -> anyhow::Result<Option<(DynProvider, DynProvider)>> {
    let gpu = make_provider(&opts.provider, opts)?;
    let cpu = match opts.cpu_provider.as_str() {
        "" => gpu.clone(),
        name if name == opts.provider => gpu.clone(),
        name => make_provider(name, opts)?,
    };
    match (gpu, cpu) {
        (Some(gpu), Some(cpu)) => Ok(Some((gpu, cpu))),
        (None, None) => Ok(None),
        _ => anyhow::bail!(
            "--provider none and --cpu-provider must go together (a pair provisions both roles or neither)"
        ),
    }
}

/// The coordinator as new machines dial it: `--advertise`, else the bound address (loopback
/// when bound to all interfaces).
fn coordinator_url(opts: &ServeOptions, addr: SocketAddr) -> String {
    if !opts.advertise.is_empty() {
        opts.advertise.clone()
    } else if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

fn provision_config(opts: &ServeOptions) -> ProvisionConfig {
    let mut cfg = opts.provision.clone();
    if [opts.provider.as_str(), opts.cpu_provider.as_str()].contains(&"command") {
        // The scripts' own limit answers first, with their output in the error.
        let own = opts
            .command
            .timeout
            .unwrap_or(crate::control::provider::command::DEFAULT_TIMEOUT);
        cfg.call_timeout = cfg.call_timeout.max(own + Duration::from_secs(15));
    }
    cfg
}

/// What the public listener serves beyond the coordinator and admin services.
struct Public {
    reflection: bool,
    /// Health for clients without a certificate.
    health: bool,
}

/// The gRPC server (coordinator, admin, health, and reflection when asked) until `shutdown`.
async fn serve_grpc(
    listener: tokio::net::TcpListener,
    material: &TlsMaterial,
    shared: Arc<Shared>,
    public: Public,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServer<CoordinatorSvc>>()
        .await;
    let reflection = match public.reflection {
        true => Some(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .build_v1()?,
        ),
        false => None,
    };
    // Health answers only a client with a certificate of our CA (any role), unless public.
    let (open_health, checked_health) = match public.health {
        true => (Some(health), None),
        false => (None, Some(InterceptedService::new(health, certified))),
    };
    let incoming = tls::incoming(listener, material.server_config_join()?, shutdown.clone());
    tls::server_builder()
        .add_optional_service(open_health)
        .add_optional_service(checked_health)
        .add_optional_service(reflection)
        .add_service(
            CoordinatorServer::new(CoordinatorSvc(shared.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(AdminServer::new(AdminSvc(shared)).max_decoding_message_size(MAX_MESSAGE))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await?;
    Ok(())
}

/// Lets through only requests whose client presented a certificate of our CA.
fn certified(req: Request<()>) -> Result<Request<()>, Status> {
    tls::peer_of(&req)?;
    Ok(req)
}
