//! An agent's link to the coordinator: one long-lived heartbeat stream (reports out every
//! interval, commands in), reconnected with backoff and jitter whenever it breaks. Given several
//! coordinators (`--coordinator a,b,c`: highly available ones, ARCHITECTURE.md), it stays with
//! the one that serves. A follower refuses the stream naming the leader (`standby-leader`
//! metadata): the link goes straight there; after any other failure, or when the named leader
//! does not answer, it tries the next address of the list.

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

/// The first wait after a failure, and the wait before going to a leader a follower named.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Leaders named by followers that are followed in a row without waiting for the backoff.
const MAX_HOPS: u32 = 2;

/// Runs the link until `shutdown`, sending every command received to `commands`. The backoff
/// between rounds of the list doubles from 100 ms up to 2 s, with 0–30 % jitter; it starts
/// again from 100 ms after a stream that was open breaks. Within a round, and to a leader a
/// follower named, the next attempt follows after 100 ms ([`Dial`]).
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
    let mut dial = Dial::new(link.urls.clone());
    loop {
        let url = dial.next();
        let mut opened = false;
        let r = link.session(&url, &shutdown, &mut opened).await;
        if shutdown.is_cancelled() {
            return;
        }
        let e = match r {
            Ok(()) => return,
            Err(e) => e,
        };
        if opened {
            dial.opened();
        }
        let wait = match dial.failed(&url, &e) {
            Next::Named(leader) => {
                tracing::info!(coordinator = %url, %leader, "a follower named the leader: going there");
                FIRST_BACKOFF
            }
            Next::After(wait) => {
                tracing::warn!(coordinator = %url, error = %format!("{e:#}"), retry_in = ?wait, "coordinator link down");
                if says_revoked(&e) {
                    (opts_revoked)();
                }
                wait
            }
        };
        let jitter = rand::rng().random_range(0.0..0.3);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait.mul_f64(1.0 + jitter)) => {}
        }
    }
}

/// Where the link dials next: the list's addresses in turn, or the leader a follower named.
/// Pure (no I/O): the caller connects and reports each failure.
struct Dial {
    urls: Vec<String>,
    at: usize,
    /// The leader a follower named, dialled next.
    named: Option<String>,
    /// Named leaders followed in a row without the backoff.
    hops: u32,
    backoff: Duration,
}

/// What follows a failure.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// A follower named this leader: dial it after [`FIRST_BACKOFF`].
    Named(String),
    /// Dial the next address after this long.
    After(Duration),
}

impl Dial {
    fn new(urls: Vec<String>) -> Dial {
        Dial {
            urls,
            at: 0,
            named: None,
            hops: 0,
            backoff: FIRST_BACKOFF,
        }
    }

    fn next(&mut self) -> String {
        self.named
            .take()
            .unwrap_or_else(|| self.urls[self.at % self.urls.len()].clone())
    }

    /// A stream that was open broke (a leader that went away): start over quickly.
    fn opened(&mut self) {
        self.backoff = FIRST_BACKOFF;
        self.hops = 0;
    }

    /// `url` failed with `e`. A follower's refusal that names another leader sends the link
    /// there at once, unless followers keep naming one another (an election under way): then
    /// at the backoff's pace. Any other failure moves on to the list's next address: at once
    /// (100 ms) within a round of the list, after the backoff once the whole list failed (as
    /// gRPC's own reconnection does), so a coordinator that is down costs no backoff while
    /// another on the list answers.
    fn failed(&mut self, url: &str, e: &anyhow::Error) -> Next {
        let leader = e
            .downcast_ref::<tonic::Status>()
            .and_then(crate::proto::leader_named)
            .filter(|l| l != url);
        match leader {
            Some(l) if self.hops < MAX_HOPS => {
                self.hops += 1;
                self.named = Some(l.clone());
                return Next::Named(l);
            }
            Some(l) => self.named = Some(l),
            None => {
                self.hops = 0;
                self.at += 1;
                if !self.at.is_multiple_of(self.urls.len()) {
                    return Next::After(FIRST_BACKOFF);
                }
            }
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Next::After(wait)
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
    /// stops listening to commands (Ok). `opened` tells whether the stream was accepted.
    async fn session(
        &self,
        url: &str,
        shutdown: &CancellationToken,
        opened: &mut bool,
    ) -> anyhow::Result<()> {
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
        *opened = true;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refused_by_follower(leader: &str) -> anyhow::Error {
        let mut s = tonic::Status::unavailable("this coordinator follows");
        s.metadata_mut().insert(
            crate::proto::LEADER_METADATA,
            leader.parse().expect("ascii"),
        );
        s.into()
    }

    fn dial() -> Dial {
        Dial::new(addresses("a:1,b:1,c:1"))
    }

    #[test]
    fn a_named_leader_is_dialled_next_then_the_list_goes_on() {
        let mut d = dial();
        assert_eq!(d.next(), "a:1");
        let named = d.failed("a:1", &refused_by_follower("c:1"));
        assert_eq!(named, Next::Named("c:1".into()));
        assert_eq!(d.next(), "c:1");
        // The named leader does not answer either: the list's next address, at once.
        let next = d.failed("c:1", &anyhow::anyhow!("connection refused"));
        assert_eq!(next, Next::After(FIRST_BACKOFF));
        assert_eq!(d.next(), "b:1");
        let next = d.failed("b:1", &anyhow::anyhow!("connection refused"));
        assert_eq!(next, Next::After(FIRST_BACKOFF));
        assert_eq!(d.next(), "c:1");
        // The round ends: the backoff.
        let next = d.failed("c:1", &anyhow::anyhow!("connection refused"));
        assert_eq!(next, Next::After(FIRST_BACKOFF));
        assert_eq!(d.next(), "a:1");
        let next = d.failed("a:1", &anyhow::anyhow!("connection refused"));
        assert_eq!(next, Next::After(FIRST_BACKOFF));
    }

    #[test]
    fn followers_naming_one_another_are_followed_at_the_backoff_pace() {
        let mut d = dial();
        assert_eq!(
            d.failed("a:1", &refused_by_follower("b:1")),
            Next::Named("b:1".into())
        );
        assert_eq!(
            d.failed("b:1", &refused_by_follower("a:1")),
            Next::Named("a:1".into())
        );
        // The third in a row waits, but still goes where it was told.
        assert_eq!(
            d.failed("a:1", &refused_by_follower("b:1")),
            Next::After(FIRST_BACKOFF)
        );
        assert_eq!(d.next(), "b:1");
        assert_eq!(
            d.failed("b:1", &refused_by_follower("a:1")),
            Next::After(FIRST_BACKOFF * 2)
        );
        // A stream that opened starts over: named leaders are followed at once again.
        d.opened();
        assert_eq!(
            d.failed("a:1", &refused_by_follower("b:1")),
            Next::Named("b:1".into())
        );
    }

    #[test]
    fn a_refusal_naming_the_address_itself_moves_on() {
        let mut d = dial();
        let next = d.failed("a:1", &refused_by_follower("a:1"));
        assert_eq!(next, Next::After(FIRST_BACKOFF));
        assert_eq!(d.next(), "b:1");
    }

    #[test]
    fn the_backoff_doubles_per_round_up_to_two_seconds_and_restarts_after_an_open_stream() {
        let mut d = dial();
        let mut waits = Vec::new();
        for _ in 0..21 {
            let url = d.next();
            match d.failed(&url, &anyhow::anyhow!("refused")) {
                Next::After(w) => waits.push(w.as_millis()),
                other => panic!("{other:?}"),
            }
        }
        // Three addresses: two at once, then the round's backoff.
        let rounds: Vec<u128> = waits.chunks(3).map(|r| r[2]).collect();
        assert!(
            waits.chunks(3).all(|r| r[0] == 100 && r[1] == 100),
            "{waits:?}"
        );
        assert_eq!(rounds, [100, 200, 400, 800, 1600, 2000, 2000]);
        d.opened();
        let url = d.next();
        assert_eq!(
            d.failed(&url, &anyhow::anyhow!("refused")),
            Next::After(FIRST_BACKOFF)
        );
        // One address: every failure ends a round.
        let mut one = Dial::new(addresses("a:1"));
        let waits: Vec<Next> = (0..3)
            .map(|_| one.failed("a:1", &anyhow::anyhow!("refused")))
            .collect();
        assert_eq!(
            waits,
            [100, 200, 400].map(|ms| Next::After(Duration::from_millis(ms)))
        );
    }
}
