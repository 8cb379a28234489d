//! The engine's clock for detection (ARCHITECTURE.md, "Highly available coordinators", the
//! engine's throughput): a slow engine must not by itself fail pairs over.
//!
//! Every input is stamped when it is handed to the engine (`Inbox`), and a report counts as
//! heard at its stamp, not when the engine gets to it. Time for detection (the ticks) is the
//! stamp of the newest input handled while inputs wait in the queue, and the wall clock only
//! once the queue is empty: a GPU whose reports are still queued is not silent, it is
//! unheard yet. Pure: every instant comes from the caller.

use std::time::Instant;

#[derive(Debug, Default)]
pub(super) struct Clock {
    /// The newest stamp of an input handled so far.
    handled: Option<Instant>,
    /// The last instant given to a tick: detection time never goes back.
    last: Option<Instant>,
}

impl Clock {
    /// An input stamped `at` was handled.
    pub(super) fn handled(&mut self, at: Instant) {
        self.handled = Some(self.handled.map_or(at, |h| h.max(at)));
    }

    /// The instant a tick at wall-clock `now` steps the pairs with; `backlog`: inputs are
    /// still waiting in the queue.
    pub(super) fn now(&mut self, now: Instant, backlog: bool) -> Instant {
        let t = match (backlog, self.handled) {
            (true, Some(h)) => h.min(now),
            _ => now,
        };
        let t = self.last.map_or(t, |l| l.max(t));
        self.last = Some(t);
        t
    }

    /// How far detection time is behind the wall clock at `now` (the engine's backlog).
    pub(super) fn behind(&self, now: Instant) -> std::time::Duration {
        self.last.map_or(std::time::Duration::ZERO, |l| {
            now.saturating_duration_since(l)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// With inputs waiting, ticks step with the newest stamp handled; once the queue is empty,
    /// with the wall clock; and detection time never goes back.
    #[test]
    fn time_waits_for_the_queue() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let mut c = Clock::default();
        // Nothing handled yet: the wall clock.
        assert_eq!(c.now(s(100), true), s(100));
        c.handled(s(150));
        c.handled(s(120)); // stamps raced: the newest counts
        assert_eq!(c.now(s(3_000), true), s(150));
        assert_eq!(c.behind(s(3_000)), Duration::from_millis(2_850));
        // The backlog drains: the wall clock again.
        assert_eq!(c.now(s(3_200), false), s(3_200));
        assert_eq!(c.behind(s(3_200)), Duration::ZERO);
        // A new backlog of inputs stamped before the last tick: time stands still.
        c.handled(s(3_100));
        assert_eq!(c.now(s(5_000), true), s(3_200));
        // A stamp from the future of `now` (raced) is not believed past `now`.
        c.handled(s(9_000));
        assert_eq!(c.now(s(6_000), true), s(6_000));
    }
}
