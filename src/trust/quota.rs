//! Counted permits: at most `limit` things at once per key (a source address, a certificate
//! identity). Taking one gives a [`Permit`] that gives it back when dropped, so a permit held by
//! a connection or a stream's task is released however that ends.
//!
//! A [`Rotation`] bounds holders the other way round: the newest wins, and taking a place
//! beyond the limit cancels the oldest holder. Heartbeat streams use it: an agent reconnecting
//! after a network cut must not wait for its dead stream to time out.
//!
//! Used by `tls::incoming` (TCP connections per source address) and by the coordinator's
//! service (event subscriptions per admin; heartbeat streams per agent certificate).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// A limit on concurrent holders per key.
pub struct Quota<K: Eq + Hash> {
    limit: usize,
    held: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Eq + Hash> Clone for Quota<K> {
    fn clone(&self) -> Self {
        Quota {
            limit: self.limit,
            held: self.held.clone(),
        }
    }
}

/// One of a key's places; given back on drop.
#[must_use = "the place is given back as soon as the permit is dropped"]
pub struct Permit<K: Eq + Hash> {
    key: Option<K>,
    held: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Eq + Hash + Clone> Quota<K> {
    pub fn new(limit: usize) -> Quota<K> {
        Quota {
            limit,
            held: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A place for `key`, or `None` when `limit` are already held.
    pub fn try_take(&self, key: &K) -> Option<Permit<K>> {
        let mut held = self.held.lock().expect("quota");
        let n = held.entry(key.clone()).or_insert(0);
        if *n >= self.limit {
            if *n == 0 {
                held.remove(key);
            }
            return None;
        }
        *n += 1;
        Some(Permit {
            key: Some(key.clone()),
            held: self.held.clone(),
        })
    }

    /// How many places `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        self.held
            .lock()
            .expect("quota")
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// How many keys hold a place (keys are forgotten once they hold none).
    pub fn keys(&self) -> usize {
        self.held.lock().expect("quota").len()
    }
}

impl<K: Eq + Hash> Drop for Permit<K> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut held = self.held.lock().expect("quota");
        if let Some(n) = held.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&key);
            }
        }
    }
}

type Holders<K> = Arc<Mutex<HashMap<K, VecDeque<(u64, CancellationToken)>>>>;

/// At most `limit` holders per key, the newest winning (see the module documentation).
pub struct Rotation<K: Eq + Hash> {
    limit: usize,
    held: Holders<K>,
    next: Arc<AtomicU64>,
}

/// A place in a [`Rotation`]: [`Turn::ended`] fires when a newer holder took it over; the
/// place is given back on drop.
#[must_use = "the place is given back as soon as the turn is dropped"]
pub struct Turn<K: Eq + Hash> {
    key: Option<K>,
    id: u64,
    token: CancellationToken,
    held: Holders<K>,
}

impl<K: Eq + Hash + Clone> Rotation<K> {
    pub fn new(limit: usize) -> Rotation<K> {
        Rotation {
            limit: limit.max(1),
            held: Arc::new(Mutex::new(HashMap::new())),
            next: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A place for `key`; the oldest holders beyond the limit are told to end.
    pub fn take(&self, key: &K) -> Turn<K> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let mut held = self.held.lock().expect("rotation");
        let q = held.entry(key.clone()).or_default();
        q.push_back((id, token.clone()));
        while q.len() > self.limit {
            if let Some((_, oldest)) = q.pop_front() {
                oldest.cancel();
            }
        }
        Turn {
            key: Some(key.clone()),
            id,
            token,
            held: self.held.clone(),
        }
    }

    /// How many places `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        self.held
            .lock()
            .expect("rotation")
            .get(key)
            .map_or(0, VecDeque::len)
    }
}

impl<K: Eq + Hash> Turn<K> {
    /// Resolves once a newer holder took this place over.
    pub async fn ended(&self) {
        self.token.cancelled().await
    }
}

impl<K: Eq + Hash> Drop for Turn<K> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut held = self.held.lock().expect("rotation");
        if let Some(q) = held.get_mut(&key) {
            q.retain(|(id, _)| *id != self.id);
            if q.is_empty() {
                held.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_newest_turns_win_and_dropping_gives_back() {
        let r: Rotation<&str> = Rotation::new(2);
        let t1 = r.take(&"a");
        let t2 = r.take(&"a");
        let other = r.take(&"b");
        assert_eq!(r.held(&"a"), 2);
        let t3 = r.take(&"a");
        // The oldest was told to end and no longer counts; the others carry on.
        tokio::time::timeout(std::time::Duration::from_secs(1), t1.ended())
            .await
            .expect("the oldest ends");
        assert!(!t2.token.is_cancelled() && !t3.token.is_cancelled());
        assert_eq!(r.held(&"a"), 2);
        drop(t1);
        assert_eq!(r.held(&"a"), 2, "an ended turn gave its place back already");
        drop((t2, t3));
        assert_eq!(r.held(&"a"), 0);
        assert!(!other.token.is_cancelled());
    }

    #[test]
    fn at_most_limit_per_key_and_dropping_gives_back() {
        let q: Quota<String> = Quota::new(2);
        let a = "a".to_string();
        let b = "b".to_string();
        let p1 = q.try_take(&a).unwrap();
        let p2 = q.try_take(&a).unwrap();
        assert!(q.try_take(&a).is_none(), "a third for the same key");
        assert_eq!(q.held(&a), 2);
        let other = q.try_take(&b).expect("another key has its own places");
        drop(p1);
        assert_eq!(q.held(&a), 1);
        let p3 = q.try_take(&a).expect("a place was given back");
        assert!(q.try_take(&a).is_none());
        drop((p2, p3, other));
        assert_eq!((q.held(&a), q.held(&b)), (0, 0));
        assert_eq!(q.keys(), 0, "keys holding nothing are forgotten");
    }

    #[test]
    fn a_zero_limit_refuses_everything_and_keeps_nothing() {
        let q: Quota<u8> = Quota::new(0);
        assert!(q.try_take(&1).is_none());
        assert_eq!(q.keys(), 0);
    }

    #[test]
    fn permits_move_across_threads_and_clones_share_the_count() {
        let q: Quota<u8> = Quota::new(3);
        let q2 = q.clone();
        let permits: Vec<_> = (0..3).map(|_| q.try_take(&7).unwrap()).collect();
        assert!(q2.try_take(&7).is_none());
        std::thread::spawn(move || drop(permits)).join().unwrap();
        assert_eq!(q2.held(&7), 0);
    }
}
