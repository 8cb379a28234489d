//! Notifications: `[[notify]]` webhooks told of failovers, lost standbys, recoveries,
//! hibernation, waking and failed provisioning attempts (ARCHITECTURE.md, "Notifications").
//!
//! The engine hands each notice to [`Notifier::send`], which only pushes it onto each
//! interested webhook's bounded queue (dropping that queue's oldest when full, counted) and
//! returns: the engine never waits on a receiver. One task per webhook ([`deliver`]) posts
//! notices in order, signed ([`sign`]), retrying with backoff.
//!
//! - `notice`: what the news is, and which actions of the state machine are news.
//! - `body`: generic JSON, Slack and PagerDuty bodies. `sign`: the HMAC header.
//! - `webhook`: `[[notify]]` as written and as checked. `queue`: the drop-oldest queue.
//! - `deliver`: the task, its retries and backoff.

mod body;
mod deliver;
mod notice;
mod queue;
mod sign;
mod webhook;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use body::{Format, Origin, render};
pub use deliver::{Outcome, backoff};
pub use notice::{Notice, NoticeKind};
pub use sign::{SIGNATURE_HEADER, Secret, TIMESTAMP_HEADER};
pub use webhook::{Webhook, WebhookConfig, WebhookError};

use crate::control::metrics::{Metrics, WebhookLabel};
use queue::Queue;

/// The engine's handle: cheap to clone; [`Notifier::none`] when nothing is configured.
#[derive(Clone, Default)]
pub struct Notifier {
    hooks: Arc<Vec<Hooked>>,
    metrics: Option<Arc<Metrics>>,
}

struct Hooked {
    name: String,
    events: Vec<NoticeKind>,
    queue: Arc<Queue>,
}

impl Notifier {
    /// Tells nobody.
    pub fn none() -> Notifier {
        Notifier::default()
    }

    /// Starts one delivery task per webhook; they stop at `shutdown`.
    pub fn start(
        hooks: Vec<Webhook>,
        origin: Origin,
        metrics: &Arc<Metrics>,
        shutdown: &CancellationToken,
    ) -> Result<Notifier, reqwest::Error> {
        // reqwest is built without a provider of its own: the process has one (ring).
        crate::trust::tls::install_default_provider();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("standby-coordinator/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut hooked = Vec::new();
        for hook in hooks {
            let queue = Arc::new(Queue::new(hook.queue));
            hooked.push(Hooked {
                name: hook.name.clone(),
                events: hook.events.clone(),
                queue: queue.clone(),
            });
            tracing::info!(webhook = %hook.name, url = %hook.url_for_logs(), format = ?hook.format, "notifications on");
            let d = deliver::Delivery {
                hook,
                origin: origin.clone(),
                http: http.clone(),
                metrics: metrics.clone(),
            };
            tokio::spawn(d.run(queue, shutdown.clone()));
        }
        Ok(Notifier {
            hooks: Arc::new(hooked),
            metrics: Some(metrics.clone()),
        })
    }

    /// Queues `n` for every webhook that wants its kind; never waits.
    pub fn send(&self, n: Notice) {
        for h in self.hooks.iter().filter(|h| h.events.contains(&n.kind)) {
            let Some(old) = h.queue.push(n.clone()) else {
                continue;
            };
            tracing::warn!(webhook = %h.name, pair = %old.pair, kind = %old.kind, "notification queue full: dropped the oldest notice");
            if let Some(m) = &self.metrics {
                let l = WebhookLabel {
                    webhook: h.name.clone(),
                };
                m.notifications_dropped.get_or_create(&l).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests;
