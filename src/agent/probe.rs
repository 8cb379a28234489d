//! The CPU agent's own contact with its GPU peer: a gRPC health check of the GPU agent every
//! interval, over mutual TLS, with a short deadline (a hung GPU agent must not look alive).
//! Together with the age of the last replication data this is the CPU's signal for the
//! three-signal failover decision.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::trust::identity::Identity;
use crate::trust::tls::{self, Expect, TlsMaterial};

/// How long one probe may take before it counts as a failure.
pub const PROBE_DEADLINE: Duration = Duration::from_millis(800);

#[derive(Clone, Debug, Default)]
pub struct ProbeState {
    pub last_ok: Option<Instant>,
    pub last_error: Option<String>,
    pub target: Option<String>,
}

pub type Shared = Arc<Mutex<ProbeState>>;

/// Probes `target` (when set) every `interval` until `shutdown`.
pub async fn run(
    mut target: watch::Receiver<Option<String>>,
    tls: TlsMaterial,
    peer: Identity,
    interval: Duration,
    state: Shared,
    shutdown: CancellationToken,
) {
    let cfg = match tls.client_config(Expect::Exactly(peer)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the probe TLS configuration");
            return;
        }
    };
    let mut channel: Option<(String, tonic::transport::Channel)> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            _ = target.changed() => {}
        }
        let Some(url) = target.borrow().clone() else {
            continue;
        };
        if channel.as_ref().is_none_or(|(u, _)| *u != url) {
            match tls::connect_lazy(&url, cfg.clone()) {
                Ok(ch) => channel = Some((url.clone(), ch)),
                Err(e) => {
                    state.lock().expect("probe").last_error = Some(e.to_string());
                    continue;
                }
            }
            state.lock().expect("probe").target = Some(url.clone());
        }
        let ch = channel.as_ref().expect("set").1.clone();
        let r = tokio::time::timeout(
            PROBE_DEADLINE,
            HealthClient::new(ch).check(HealthCheckRequest {
                service: String::new(),
            }),
        )
        .await;
        let mut s = state.lock().expect("probe");
        match r {
            Ok(Ok(_)) => {
                s.last_ok = Some(Instant::now());
                s.last_error = None;
            }
            Ok(Err(e)) => s.last_error = Some(e.message().to_string()),
            Err(_) => {
                s.last_error = Some(format!(
                    "no answer within {} ms",
                    PROBE_DEADLINE.as_millis()
                ))
            }
        }
    }
}
