//! What both agents do around their main job when a coordinator is involved: the endpoint the
//! peer probes, heartbeat reports, and the operator's hooks.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::proto::{AgentReport, GpuHealth, PeerContact};
use crate::receive::Figures;
use crate::send::SenderFigures;
use crate::tls::{self, TlsMaterial};

/// Serves gRPC health on `listen` over mutual TLS (what the paired agent probes). Returns the
/// bound address; `extra` adds services (a restore receiver).
pub async fn serve_endpoint(
    listen: &str,
    material: &TlsMaterial,
    router: Option<tonic::transport::server::Router>,
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
    let router = match router {
        Some(r) => r.add_service(health),
        None => tls::server_builder().add_service(health),
    };
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

/// Free bytes on the filesystem holding `path` (0 when unknown).
pub fn disk_free(path: &Path) -> u64 {
    crate::fsx::free_bytes(path).unwrap_or(0)
}

fn ms_since(t: Option<Instant>) -> u64 {
    t.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0)
}

/// The GPU agent's heartbeat report.
pub fn gpu_report(
    machine: &str,
    workspace: &Path,
    advertise: &str,
    listen_port: u16,
    f: &SenderFigures,
    gpu: Option<GpuHealth>,
) -> AgentReport {
    let now_ms = crate::send::unix_ms(SystemTime::now());
    AgentReport {
        machine: machine.into(),
        epoch: f.epoch,
        advertise: advertise.into(),
        listen_port: listen_port as u32,
        workspace: workspace.display().to_string(),
        generation: f.last_durable_generation,
        primary: !f.fenced,
        fenced: f.fenced,
        rpo_age_ms: f
            .oldest_pending_unix_ms
            .map(|t| now_ms.saturating_sub(t))
            .unwrap_or(0),
        pending_bytes: f.pending_bytes,
        last_durable_unix_ms: f.last_durable_unix_ms,
        disk_free_bytes: disk_free(workspace),
        gpu,
        last_error: f.last_error.clone().unwrap_or_default(),
        last_sync_ms: f.last_sync_ms,
        ..Default::default()
    }
}

/// The CPU agent's heartbeat report, with its own contact with the GPU.
pub fn cpu_report(
    machine: &str,
    workspace: &Path,
    advertise: &str,
    listen_port: u16,
    f: &Figures,
    probe: &crate::probe::ProbeState,
    primary: bool,
) -> AgentReport {
    AgentReport {
        machine: machine.into(),
        epoch: f.epoch.0,
        advertise: advertise.into(),
        listen_port: listen_port as u32,
        workspace: workspace.display().to_string(),
        generation: f.generation.0,
        primary,
        disk_free_bytes: disk_free(workspace),
        bytes_total: f.bytes,
        peer: Some(PeerContact {
            probe_ok_age_ms: ms_since(probe.last_ok),
            probe_ever_ok: probe.last_ok.is_some(),
            last_data_age_ms: ms_since(f.last_data),
            probe_error: probe.last_error.clone().unwrap_or_default(),
        }),
        ..Default::default()
    }
}

/// Runs an operator hook (`on_promote`, `on_demote`) with `sh -c`, without waiting for it; its
/// outcome is logged. The environment tells it the pair, the epoch and the workspace.
pub fn run_hook(name: &str, command: &str, pair: &str, epoch: u64, workspace: &Path) {
    if command.trim().is_empty() {
        return;
    }
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env("STANDBY_HOOK", name)
        .env("STANDBY_PAIR", pair)
        .env("STANDBY_EPOCH", epoch.to_string())
        .env("STANDBY_WORKSPACE", workspace);
    let name = name.to_string();
    match cmd.spawn() {
        Ok(mut child) => {
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(600), child.wait()).await {
                    Ok(Ok(st)) if st.success() => tracing::info!(hook = %name, "hook finished"),
                    Ok(Ok(st)) => tracing::warn!(hook = %name, status = %st, "hook failed"),
                    Ok(Err(e)) => tracing::warn!(hook = %name, error = %e, "hook failed"),
                    Err(_) => tracing::warn!(hook = %name, "hook still running after 10 minutes"),
                }
            });
        }
        Err(e) => tracing::warn!(hook = %name, error = %e, "cannot start hook"),
    }
}
