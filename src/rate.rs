//! A bandwidth limit: a token bucket shared by every stream it paces (the sender's replication
//! stream, `--bwlimit`; the backup's uploads, `--backup-bandwidth`).
//!
//! Tokens are bytes, refilled at `rate` per second up to a burst of a tenth of a second's worth.
//! A caller takes what it is about to send; when that drives the bucket below zero it sleeps
//! until the debt is repaid. Callers may take more than the burst at once (a 1 MiB segment on a
//! slow link): the debt model keeps the average at `rate` however the takes are sized, and
//! concurrent uploads share the rate because they share the debt.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    /// A limit of `bytes_per_s` (at least 1).
    pub fn new(bytes_per_s: u64) -> RateLimit {
        let rate = bytes_per_s.max(1) as f64;
        let burst = (rate / 10.0).max(1.0);
        RateLimit {
            rate,
            burst,
            state: Mutex::new(State {
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    /// Waits until `bytes` may be sent.
    pub async fn take(&self, bytes: u64) {
        let wait = self.debit(bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes `bytes` from the bucket now; how long the caller must wait before sending them.
    fn debit(&self, bytes: u64) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(s.at).as_secs_f64() * self.rate;
        s.tokens = (s.tokens + refill).min(self.burst) - bytes as f64;
        s.at = now;
        if s.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_average_rate_holds_for_any_take_size() {
        for take in [1000u64, 65_536, 1 << 20, 3 << 20] {
            let l = RateLimit::new(1 << 20);
            let start = Instant::now();
            let total = 8u64 << 20;
            let mut sent = 0;
            while sent < total {
                l.take(take).await;
                sent += take;
            }
            let secs = start.elapsed().as_secs_f64();
            // Everything sent but the first burst, at 1 MiB/s.
            let expected = (sent as f64 - (1 << 20) as f64 / 10.0) / (1 << 20) as f64;
            assert!(
                (secs - expected).abs() < 0.05,
                "take {take}: {secs} s, not {expected}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_takers_share_the_rate() {
        let l = std::sync::Arc::new(RateLimit::new(1 << 20));
        let start = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move {
                    for _ in 0..4 {
                        l.take(1 << 20).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        // 16 MiB shared at 1 MiB/s.
        assert!((14.5..=16.5).contains(&secs), "{secs} s");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_limit_lends_only_its_burst() {
        let l = RateLimit::new(1 << 20);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        l.take(2 << 20).await;
        // After a minute idle, 2 MiB still costs about 1.9 s: idleness is not banked.
        assert!(
            start.elapsed() >= Duration::from_millis(1800),
            "{:?}",
            start.elapsed()
        );
    }
}
