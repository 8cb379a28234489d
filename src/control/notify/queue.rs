//! A webhook's queue: bounded, and when full the oldest notice goes, so the engine's push never
//! waits and the newest news (often a recovery) is the one kept.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::notice::Notice;

pub struct Queue {
    items: Mutex<VecDeque<Notice>>,
    cap: usize,
    ready: Notify,
}

impl Queue {
    /// A queue of at most `cap` notices (at least one).
    pub fn new(cap: usize) -> Queue {
        Queue {
            items: Mutex::new(VecDeque::new()),
            cap: cap.max(1),
            ready: Notify::new(),
        }
    }

    /// Adds `n` without waiting; returns the notice dropped to make room, if any.
    pub fn push(&self, n: Notice) -> Option<Notice> {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        let dropped = if items.len() >= self.cap {
            items.pop_front()
        } else {
            None
        };
        items.push_back(n);
        drop(items);
        self.ready.notify_one();
        dropped
    }

    /// The oldest notice, waiting for one.
    pub async fn pop(&self) -> Notice {
        loop {
            let ready = self.ready.notified();
            if let Some(n) = self
                .items
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
            {
                return n;
            }
            ready.await;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.items.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::notify::notice::NoticeKind;

    fn n(i: u64) -> Notice {
        Notice::new("p", NoticeKind::Failover, i, i, String::new())
    }

    #[tokio::test]
    async fn full_queue_drops_the_oldest_and_keeps_order() {
        let q = Queue::new(3);
        for i in 1..=3 {
            assert!(q.push(n(i)).is_none());
        }
        let dropped = q.push(n(4)).expect("full: the oldest goes");
        assert_eq!(dropped.epoch, 1);
        assert_eq!(q.len(), 3);
        for want in 2..=4 {
            assert_eq!(q.pop().await.epoch, want);
        }
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn pop_waits_for_a_push() {
        let q = std::sync::Arc::new(Queue::new(8));
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.pop().await.epoch });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        q.push(n(7));
        assert_eq!(waiter.await.unwrap(), 7);
    }
}
