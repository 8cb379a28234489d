//! An agent's link to the coordinator: one long-lived heartbeat stream (reports out every
//! interval, commands in), reconnected with backoff and jitter whenever it breaks. Given several
//! coordinators (`--coordinator a,b,c`: highly available ones, ARCHITECTURE.md), it stays with
//! the one that serves and tries the next after a failure: only the leader serves.

use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
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
    /// Called when the coordinator says this machine's certificate is revoked.
    pub on_revoked: Arc<dyn Fn() + Send + Sync>,
}

/// Whether a link error says our certificate was revoked: the coordinator answers a revoked
/// certificate's stream UNAUTHENTICATED, and refuses a new handshake with the TLS alert
/// `CertificateRevoked`.
fn says_revoked(e: &anyhow::Error) -> bool {
    let by_status = e.downcast_ref::<tonic::Status>().is_some_and(|s| {
        s.code() == tonic::Code::Unauthenticated && s.message().contains("revoked")
    });
    by_status || format!("{e:#}").contains("CertificateRevoked")
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

/// Runs the link until `shutdown`, sending every command received to `commands`. The backoff
/// between attempts doubles from 100 ms up to 2 s, with 0–30 % jitter.
pub async fn run(
    opts: LinkOptions,
    report: ReportFn,
    commands: mpsc::Sender<Command>,
    shutdown: CancellationToken,
) {
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
    let opts_revoked = opts.on_revoked.clone();
    let link = Link {
        urls: addresses(&opts.url),
        interval: opts.interval,
        cfg,
        report,
        commands,
        drop: drop_fraction(),
    };
    let mut backoff = Duration::from_millis(100);
    let mut at = 0;
    loop {
        let url = &link.urls[at % link.urls.len()];
        let r = link.session(url, &shutdown).await;
        if shutdown.is_cancelled() {
            return;
        }
        match r {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(coordinator = %url, error = %format!("{e:#}"), retry_in = ?backoff, "coordinator link down");
                if says_revoked(&e) {
                    (opts_revoked)();
                }
                at += 1;
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

/// The coordinators of a comma-separated list, in order (one when there is no comma).
pub fn addresses(list: &str) -> Vec<String> {
    let all: Vec<String> = list
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    if all.is_empty() {
        vec![list.to_string()]
    } else {
        all
    }
}

struct Link {
    /// The coordinators to try, in turn.
    urls: Vec<String>,
    interval: Duration,
    cfg: Arc<rustls::ClientConfig>,
    report: ReportFn,
    commands: mpsc::Sender<Command>,
    /// The fraction of heartbeats skipped on purpose (see [`drop_fraction`]).
    drop: f64,
}

impl Link {
    /// One heartbeat stream, from connecting until it breaks (an error) or the agent stops or
    /// stops listening to commands (Ok).
    async fn session(&self, url: &str, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let ch = tls::connect(url, self.cfg.clone()).await?;
        let (tx, rx) = mpsc::channel::<AgentReport>(4);
        let mut client = CoordinatorClient::new(ch);
        let mut first = (self.report)();
        first.seq = 0;
        tx.send(first).await.ok();
        let inbound = client
            .heartbeat(ReceiverStream::new(rx))
            .await?
            .into_inner();
        tracing::info!(coordinator = %url, "heartbeat stream open");
        self.pump(tx, inbound, shutdown).await
    }

    /// Sends a report every interval and passes each command on.
    async fn pump(
        &self,
        tx: mpsc::Sender<AgentReport>,
        mut inbound: tonic::Streaming<Command>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(self.interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    seq += 1;
                    if self.drop > 0.0 && rand::rng().random_bool(self.drop) {
                        continue;
                    }
                    let mut r = (self.report)();
                    r.seq = seq;
                    if tx.send(r).await.is_err() {
                        anyhow::bail!("heartbeat stream closed");
                    }
                }
                c = inbound.message() => match c? {
                    Some(c) => {
                        if self.commands.send(c).await.is_err() {
                            return Ok(());
                        }
                    }
                    None => anyhow::bail!("the coordinator closed the heartbeat stream"),
                },
            }
        }
    }
}
