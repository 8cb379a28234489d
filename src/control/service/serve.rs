//! `coordinator serve` from start to stop: metrics first, then the store (a file, or etcd with
//! an election), the engine, the status page and the gRPC server (ARCHITECTURE.md, "Highly
//! available coordinators", "Readiness under systemd").

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};

#[cfg(feature = "etcd")]
use super::leadership;
use super::provisioning::provisioning;
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
    let provisioning = provisioning(&opts, addr, &ca, &token_key)?;
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
