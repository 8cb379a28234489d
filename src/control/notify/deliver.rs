//! One task per webhook: takes notices from its queue in order and posts each until it is
//! accepted, retrying with exponential backoff. A slow or dead receiver only ever delays its
//! own queue: the engine never waits on it (ARCHITECTURE.md, "Notifications").

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::body::{Origin, render};
use super::notice::Notice;
use super::queue::Queue;
use super::sign::{SIGNATURE_HEADER, TIMESTAMP_HEADER};
use super::webhook::Webhook;
use crate::control::metrics::{Metrics, WebhookOutcomeLabel};

/// How one notice ended at one webhook (the `outcome` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer.
    Delivered,
    /// A 4xx other than 408 and 429: the receiver refuses it; retrying would not help.
    Rejected,
    /// Every retry failed (connection errors, timeouts, 5xx, 408, 429).
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
        }
    }
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
enum Attempt {
    #[error("{0}")]
    Transient(String, Option<Duration>),
    #[error("{0}")]
    Permanent(String),
}

/// The wait before retry number `attempt + 1`: `base` doubled per attempt, at most `max`, less
/// up to a fifth by `jitter` (0..1) so many coordinators do not retry in step.
pub fn backoff(base: Duration, max: Duration, attempt: u32, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(20));
    exp.min(max).mul_f64(1.0 - 0.2 * jitter.clamp(0.0, 1.0))
}

/// What the delivery task needs besides its queue.
pub struct Delivery {
    pub hook: Webhook,
    pub origin: Origin,
    pub http: reqwest::Client,
    pub metrics: Arc<Metrics>,
}

impl Delivery {
    /// Delivers notices from `queue` until `shutdown` (what is queued then is not sent).
    pub async fn run(self, queue: Arc<Queue>, shutdown: CancellationToken) {
        loop {
            let n = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = queue.pop() => n,
            };
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                o = self.deliver(&n) => o,
            };
            let label = WebhookOutcomeLabel {
                webhook: self.hook.name.clone(),
                outcome: outcome.as_str().into(),
            };
            self.metrics.notifications.get_or_create(&label).inc();
        }
    }

    /// Posts `n` until it is accepted, refused, or the retries are spent.
    async fn deliver(&self, n: &Notice) -> Outcome {
        let h = &self.hook;
        let body = render(h.format, n, &self.origin, &h.routing_key);
        for attempt in 0..=h.retries {
            let err = match self.post(&body).await {
                Ok(()) => {
                    tracing::debug!(webhook = %h.name, pair = %n.pair, kind = %n.kind, attempt, "notification delivered");
                    return Outcome::Delivered;
                }
                Err(e) => e,
            };
            match err {
                Attempt::Permanent(e) => {
                    tracing::warn!(webhook = %h.name, pair = %n.pair, kind = %n.kind, "notification refused by the receiver, not retried: {e}");
                    return Outcome::Rejected;
                }
                Attempt::Transient(e, _) if attempt == h.retries => {
                    tracing::warn!(webhook = %h.name, pair = %n.pair, kind = %n.kind, attempts = attempt + 1, "notification given up: {e}");
                }
                Attempt::Transient(e, after) => {
                    let wait = backoff(h.backoff, h.backoff_max, attempt, rand::random());
                    let wait = after.map_or(wait, |a| a.clamp(wait, h.backoff_max.max(wait)));
                    tracing::info!(webhook = %h.name, pair = %n.pair, kind = %n.kind, attempt, retry_in_ms = wait.as_millis() as u64, "notification not delivered: {e}");
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Outcome::Failed
    }

    /// One POST, signed now.
    async fn post(&self, body: &[u8]) -> Result<(), Attempt> {
        let h = &self.hook;
        let mut req = self
            .http
            .post(h.url.clone())
            .timeout(h.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(secret) = &h.secret {
            let ts = crate::host::unix_ms_now() / 1000;
            req = req
                .header(TIMESTAMP_HEADER, ts.to_string())
                .header(SIGNATURE_HEADER, secret.sign(ts, body));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Attempt::Transient(crate::text::error_chain(&e), None))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let msg = format!("HTTP {status} from {}", h.url_for_logs());
        match status.as_u16() {
            408 | 429 => Err(Attempt::Transient(msg, retry_after)),
            400..=499 => Err(Attempt::Permanent(msg)),
            _ => Err(Attempt::Transient(msg, retry_after)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_only_shortens() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(1), s(60), 0, 0.0), s(1));
        assert_eq!(backoff(s(1), s(60), 1, 0.0), s(2));
        assert_eq!(backoff(s(1), s(60), 5, 0.0), s(32));
        assert_eq!(backoff(s(1), s(60), 6, 0.0), s(60));
        assert_eq!(backoff(s(1), s(60), 31, 0.0), s(60), "no overflow");
        assert_eq!(backoff(s(1), s(60), u32::MAX, 0.0), s(60));
        assert_eq!(backoff(s(10), s(60), 0, 1.0), s(8));
        for j in [0.0, 0.3, 0.99, 5.0, -1.0] {
            let d = backoff(s(1), s(60), 10, j);
            assert!(d <= s(60) && d >= s(48), "{d:?}");
        }
    }
}
