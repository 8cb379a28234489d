//! The agent's network endpoint: gRPC health over mutual TLS (what the paired agent probes),
//! plus replication into this agent when it receives.

use std::net::SocketAddr;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::trust::tls::{self, TlsMaterial};

/// Serves gRPC health, beside the services already in `router` (the replication receiver), on
/// `listen` over mutual TLS until `shutdown`. Returns the bound address.
pub async fn serve(
    listen: &str,
    material: &TlsMaterial,
    router: tonic::transport::server::Router,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let incoming = tls::incoming(listener, material.server_config()?, shutdown.clone());
    let router = router.add_service(health);
    let h = tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
            .await
        {
            tracing::error!(error = %e, "endpoint stopped");
        }
    });
    Ok((addr, h))
}
