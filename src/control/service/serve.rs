//! `coordinator serve` from start to stop: metrics first, then the store (a file, or etcd with
//! an election), the engine, the status page and the gRPC server (ARCHITECTURE.md, "Highly
//! available coordinators", "Readiness under systemd").

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};

#[cfg(feature = "etcd")]
use super::leadership;
#[cfg(feature = "etcd")]
use super::provisioning::coordinator_url;
use super::provisioning::provisioning;
use super::seat::Seat;
use super::{
    AdminSvc, CoordinatorSvc, HaOptions, MAX_MESSAGE, ServeOptions, Shared, server_tls, token_key,
};
use crate::control::engine::{Engine, Reporting};
use crate::control::metrics::{CertLabel, Metrics};
use crate::control::notify::Notifier;
use crate::control::store::certs::{self, Registry};
use crate::control::store::{FileStore, Store};
use crate::proto::admin_server::AdminServer;
use crate::proto::coordinator_server::CoordinatorServer;
use crate::trust::pki::Ca;
use crate::trust::quota::{Quota, Rotation};
use crate::trust::tls::{self, TlsMaterial};

/// What a build without the `etcd` feature says to `--store etcd`.
pub const NO_ETCD: &str = "this coordinator was built without etcd support: build it with \
     `cargo build --release --features etcd` (needs protoc) for --store etcd";

/// Runs the coordinator until `shutdown`. Writes the bound addresses to `<dir>/metrics.addr`,
/// (with a status page) `<dir>/status.addr` and, once it leads, `<dir>/serve.addr`; tells
/// systemd it is ready once it listens (a follower too: it answers, pointing to the leader).
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
            Ok(store) => serve_alone(opts, ca, Arc::new(store), metrics, shutdown).await,
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

/// The gRPC listener, bound, and the server's TLS material.
struct Front {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    material: TlsMaterial,
}

impl Front {
    async fn bind(opts: &ServeOptions, ca: &Ca) -> anyhow::Result<Front> {
        let mut material = server_tls(&opts.dir, ca)?;
        material.expired_grace = Some(renew_grace(opts.renew_grace));
        let listener = bind(&opts.listen).await?;
        let addr = listener.local_addr()?;
        Ok(Front {
            listener,
            addr,
            material,
        })
    }
}

/// `serve` on the file store: the only coordinator of its state leads, always.
async fn serve_alone(
    opts: ServeOptions,
    ca: Ca,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    metrics.leadership.leader.set(1);
    let front = Front::bind(&opts, &ca).await?;
    let at = (&front.material, front.addr);
    let led = lead(&opts, ca, store, &metrics, at, &shutdown).await?;
    announce(&opts.dir, front.addr)?;
    crate::systemd::ready_until(&shutdown);
    let seat = Seat::leading(led.shared).await;
    let Front {
        listener, material, ..
    } = front;
    serve_grpc(listener, material, seat, public(&opts), shutdown).await?;
    if let Some(p) = led.page {
        let _ = p.await;
    }
    Ok(())
}

/// `serve` on etcd: listen at once as a follower (pointing clients to the leader), campaign
/// until this coordinator leads, then serve everything while it leads.
#[cfg(feature = "etcd")]
async fn serve_ha(
    opts: ServeOptions,
    ca: Ca,
    ha: HaOptions,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = leadership::connect(&ha, &ca.fingerprint(), &metrics).await?;
    let front = Front::bind(&opts, &ca).await?;
    // The leader key's value: what followers name to clients.
    let address = coordinator_url(&opts, front.addr);
    let seat = Seat::following(store.clone()).await;
    let serving = shutdown.child_token();
    let grpc = serve_grpc(
        front.listener,
        front.material.clone(),
        seat.clone(),
        public(&opts),
        serving.clone(),
    );
    // A server that ends (an error) ends the campaign too: never lead without listening.
    let ended = serving.clone();
    let server = tokio::spawn(async move {
        let r = grpc.await;
        ended.cancel();
        r
    });
    tracing::info!(addr = %front.addr, advertise = %address, "following: answering with the leader's address");
    crate::systemd::ready_until(&shutdown);
    let campaign = leadership::Campaign {
        ha: &ha,
        address: &address,
        metrics: &metrics,
        seat: &seat,
    };
    let won = leadership::follow(campaign, &store, &serving).await;
    let led_at_all = matches!(won, Ok(true));
    let led = match won {
        Ok(true) => {
            let at = (front.material, front.addr);
            lead_on_etcd(&opts, ca, store, &metrics, at, &seat, &serving).await
        }
        Ok(false) => Ok(()),
        Err(e) => Err(e),
    };
    serving.cancel();
    let served = server.await;
    led?;
    served??;
    if led_at_all && !shutdown.is_cancelled() {
        anyhow::bail!(
            "stepped down: the leader's lease was not renewed within its deadline (start again to follow)"
        );
    }
    Ok(())
}

/// Leads on etcd until `serving` ends: the engine starts, the seat turns to the leader's, and
/// the watchdog ends `serving` once the leader's deadline passed.
#[cfg(feature = "etcd")]
async fn lead_on_etcd(
    opts: &ServeOptions,
    ca: Ca,
    store: Arc<crate::control::store::etcd::EtcdStore>,
    metrics: &Arc<Metrics>,
    (material, addr): (TlsMaterial, SocketAddr),
    seat: &Seat,
    serving: &CancellationToken,
) -> anyhow::Result<()> {
    let watchdog = leadership::watch(store.clone(), metrics.clone(), serving.clone());
    let mut led = lead(opts, ca, store, metrics, (&material, addr), serving).await;
    if let Ok(l) = &led {
        seat.lead(l.shared.clone()).await;
        match announce(&opts.dir, addr) {
            Ok(()) => serving.cancelled().await,
            Err(e) => led = Err(e),
        }
    }
    serving.cancel();
    let _ = watchdog.await;
    if let Some(p) = led?.page {
        let _ = p.await;
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

/// What a leader runs beside the gRPC server: the engine (in `shared`) and the status page.
struct Led {
    shared: Arc<Shared>,
    page: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Starts leading on `store`: the engine loads the state (its detection timers start now, so
/// silence before this moment is never counted) and the status page starts.
async fn lead(
    opts: &ServeOptions,
    ca: Ca,
    store: Arc<dyn Store>,
    metrics: &Arc<Metrics>,
    (material, addr): (&TlsMaterial, SocketAddr),
    shutdown: &CancellationToken,
) -> anyhow::Result<Led> {
    let dir = &opts.dir;
    let token_key = token_key(dir)?;
    let backup = backup(opts)?;
    let registry = Arc::new(Registry::load(store.clone(), material.deny.clone())?);
    own_expiries(metrics, &ca, material, opts.cert_lifetime);
    let mut policy = opts.policy.clone();
    policy.label_prefix = format!("sb-{}", &ca.fingerprint()[..8]);
    let provisioning = provisioning(opts, addr, &store, &ca, &token_key)?;
    policy.provider = provisioning.is_some();
    let origin = crate::control::notify::Origin::here(&policy.label_prefix);
    let notifier = Notifier::start(opts.notify.clone(), origin, metrics, shutdown)?;
    let reporting = Reporting {
        metrics: metrics.clone(),
        notifier,
    };
    let engine = Engine::start(
        store.clone(),
        opts.timing,
        policy,
        provisioning,
        registry.clone(),
        reporting,
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
    let page = status_page(opts, dir, &shared.engine, shutdown).await?;
    Ok(Led { shared, page })
}

/// Writes `serve.addr` once this coordinator serves as the leader: replaced atomically, last
/// (`metrics.addr` and `status.addr` were written before), so whoever waits for it finds the
/// others complete.
fn announce(dir: &Path, addr: SocketAddr) -> anyhow::Result<()> {
    crate::disk::crashsafe::write_atomic(&dir.join("serve.addr"), addr.to_string().as_bytes())?;
    tracing::info!(%addr, "coordinator serving");
    Ok(())
}

/// What CPU standbys are told of the off-site backup, and the key (ARCHITECTURE.md, "Off-site
/// backup"). A directory made before backups existed gets its backup key now.
fn backup(
    opts: &ServeOptions,
) -> anyhow::Result<Option<(crate::proto::BackupTarget, crate::trust::seal::BackupKey)>> {
    let backup_key = crate::trust::seal::BackupKey::load_or_create(&opts.dir)?;
    tracing::info!(fingerprint = %backup_key.fingerprint(), "backup key");
    Ok(match &opts.backup {
        Some(plan) => Some((plan.target()?, backup_key)),
        None => None,
    })
}

fn public(opts: &ServeOptions) -> Public {
    Public {
        reflection: opts.reflection,
        health: opts.public_health,
    }
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

/// What the public listener serves beyond the coordinator and admin services.
struct Public {
    reflection: bool,
    /// Health for clients without a certificate.
    health: bool,
}

/// The gRPC server (coordinator, admin, health, and reflection when asked) until `shutdown`,
/// answering from `seat` (the leader's state, or a follower's refusals).
async fn serve_grpc(
    listener: tokio::net::TcpListener,
    material: TlsMaterial,
    seat: Seat,
    public: Public,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(seat.health()),
    );
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
            CoordinatorServer::new(CoordinatorSvc(seat.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(AdminServer::new(AdminSvc(seat)).max_decoding_message_size(MAX_MESSAGE))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await?;
    Ok(())
}

/// Lets through only requests whose client presented a certificate of our CA.
fn certified(req: Request<()>) -> Result<Request<()>, Status> {
    tls::peer_of(&req)?;
    Ok(req)
}
