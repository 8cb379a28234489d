//! An agent's link to the coordinator: one long-lived heartbeat stream (reports out every
//! interval, commands in), reconnected with backoff and jitter whenever it breaks.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::{AgentReport, Command};
use crate::trust::identity::Identity;
use crate::trust::tls::{self, Expect, TlsMaterial};

/// Builds the next report (called once per interval).
pub type ReportFn = Arc<dyn Fn() -> AgentReport + Send + Sync>;

#[derive(Clone)]
pub struct LinkOptions {
    pub url: String,
    pub tls: TlsMaterial,
    pub interval: Duration,
}

/// Fault injection for tests and drills: `STANDBY_FAULT_DROP_HEARTBEATS=0.3` skips that fraction
/// of heartbeats at random (the stream stays up).
fn drop_fraction() -> f64 {
    std::env::var("STANDBY_FAULT_DROP_HEARTBEATS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map(|f| f.clamp(0.0, 1.0))
        .unwrap_or(0.0)
}

/// Runs the link until `shutdown`, sending every command received to `commands`.
pub async fn run(
    opts: LinkOptions,
    report: ReportFn,
    commands: mpsc::Sender<Command>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let drop = drop_fraction();
    let cfg = match opts
        .tls
        .client_config(Expect::Exactly(Identity::Coordinator))
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the coordinator TLS configuration");
            return;
        }
    };
    loop {
        let session = async {
            let ch = tls::connect(&opts.url, cfg.clone()).await?;
            let (tx, rx) = mpsc::channel::<AgentReport>(4);
            let mut client = CoordinatorClient::new(ch);
            let mut seq = 0u64;
            let mut first = report();
            first.seq = seq;
            tx.send(first).await.ok();
            let mut inbound = client
                .heartbeat(ReceiverStream::new(rx))
                .await?
                .into_inner();
            tracing::info!(coordinator = %opts.url, "heartbeat stream open");
            let mut tick = tokio::time::interval(opts.interval);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tick.tick() => {
                        seq += 1;
                        if drop > 0.0 && rand::rng().random_bool(drop) {
                            continue;
                        }
                        let mut r = report();
                        r.seq = seq;
                        if tx.send(r).await.is_err() {
                            anyhow::bail!("heartbeat stream closed");
                        }
                    }
                    c = inbound.message() => match c? {
                        Some(c) => {
                            if commands.send(c).await.is_err() {
                                return Ok(());
                            }
                        }
                        None => anyhow::bail!("the coordinator closed the heartbeat stream"),
                    },
                }
            }
        };
        let r: anyhow::Result<()> = session.await;
        if shutdown.is_cancelled() {
            return;
        }
        match r {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "coordinator link down");
            }
        }
        let jitter = rand::rng().random_range(0.0..0.3);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.mul_f64(1.0 + jitter)) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
