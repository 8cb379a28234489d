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

/// What to probe: the GPU agent's address and who must answer there (the machine the
/// coordinator names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeTarget {
    pub url: String,
    pub expect: Expect,
}

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
    mut target: watch::Receiver<Option<ProbeTarget>>,
    tls: TlsMaterial,
    interval: Duration,
    state: Shared,
    shutdown: CancellationToken,
) {
    let mut channel: Option<(ProbeTarget, Channel)> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether a new target may still come: once the dispatcher is gone, `changed` would return
    // at once on every turn (a busy loop); the last target is then probed on the tick only.
    let mut open = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            r = target.changed(), if open => open = r.is_ok(),
        }
        let Some(t) = target.borrow().clone() else {
            continue;
        };
        let Some(ch) = channel_to(&mut channel, &t, &tls, &state) else {
            continue;
        };
        let r = check(ch).await;
        record(&state, r);
    }
}

/// The channel to the target, reused while it stays the same (None, with the error recorded,
/// when it cannot be made).
fn channel_to(
    channel: &mut Option<(ProbeTarget, Channel)>,
    t: &ProbeTarget,
    tls: &TlsMaterial,
    state: &Shared,
) -> Option<Channel> {
    if channel.as_ref().is_none_or(|(cur, _)| cur != t) {
        let made = tls
            .client_config(t.expect.clone())
            .map_err(|e| e.to_string())
            .and_then(|cfg| tls::connect_lazy(&t.url, cfg).map_err(|e| e.to_string()));
        match made {
            Ok(ch) => *channel = Some((t.clone(), ch)),
            Err(e) => {
                state.lock().expect("probe").last_error = Some(e);
                return None;
            }
        }
        state.lock().expect("probe").target = Some(t.url.clone());
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
