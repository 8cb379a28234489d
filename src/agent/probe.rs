//! The CPU agent's own contact with its GPU peer: a gRPC health check of the GPU agent every
//! interval, over mutual TLS, with a short deadline (a hung GPU agent must not look alive).
//! Together with the age of the last replication data this is the CPU's signal for the
//! three-signal failover decision.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

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
    peer: Expect,
    interval: Duration,
    state: Shared,
    shutdown: CancellationToken,
) {
    let cfg = match tls.client_config(peer) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the probe TLS configuration");
            return;
        }
    };
    let mut channel: Option<(String, Channel)> = None;
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
        let Some(ch) = channel_to(&mut channel, &url, &cfg, &state) else {
            continue;
        };
        let r = check(ch).await;
        record(&state, r);
    }
}

/// The channel to `url`, reused while the target stays the same (None, with the error
/// recorded, when it cannot be made).
fn channel_to(
    channel: &mut Option<(String, Channel)>,
    url: &str,
    cfg: &Arc<rustls::ClientConfig>,
    state: &Shared,
) -> Option<Channel> {
    if channel.as_ref().is_none_or(|(u, _)| u != url) {
        match tls::connect_lazy(url, cfg.clone()) {
            Ok(ch) => *channel = Some((url.to_string(), ch)),
            Err(e) => {
                state.lock().expect("probe").last_error = Some(e.to_string());
                return None;
            }
        }
        state.lock().expect("probe").target = Some(url.to_string());
    }
    channel.as_ref().map(|(_, ch)| ch.clone())
}

/// One health check, failed when it takes longer than [`PROBE_DEADLINE`].
async fn check(ch: Channel) -> Result<(), String> {
    let r = tokio::time::timeout(
        PROBE_DEADLINE,
        HealthClient::new(ch).check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await;
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.message().to_string()),
        Err(_) => Err(format!(
            "no answer within {} ms",
            PROBE_DEADLINE.as_millis()
        )),
    }
}

fn record(state: &Shared, r: Result<(), String>) {
    let mut s = state.lock().expect("probe");
    match r {
        Ok(()) => {
            s.last_ok = Some(Instant::now());
            s.last_error = None;
        }
        Err(e) => s.last_error = Some(e),
    }
}
