//! The store's pair writes, off the engine's task (ARCHITECTURE.md, "Highly available
//! coordinators", the engine's throughput).
//!
//! A thread of its own takes the records the engine hands it and writes whatever queued up
//! while it was busy in one `put_pairs` (on etcd: one guarded transaction per 100 records; on
//! the file store: one fsync), the newest record of each pair only; then it hands the engine
//! back which records are written, or why none were (`Msg::Written`). Every write is numbered
//! (`seq`, growing): a pair waiting for a durable write holds its commands and provider calls
//! until a write of its record numbered at least as high is confirmed (`Actor::on_written`).
//! One write at a time, in order, so an older record never lands after a newer one.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Inbox, Msg};
use crate::control::store::Store;
use crate::proto::state::PairRecord;

/// One record to write, numbered.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Write {
    pub(super) seq: u64,
    pub(super) rec: PairRecord,
}

/// The writer thread, and the queue to it.
pub(super) struct Writer {
    tx: mpsc::UnboundedSender<Write>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    /// Starts the thread; its answers go to `inbox`.
    pub(super) fn start(store: Arc<dyn Store>, inbox: Inbox) -> std::io::Result<Writer> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Write>();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut queued = vec![first];
                    while let Ok(w) = rx.try_recv() {
                        queued.push(w);
                    }
                    let writes = newest(queued);
                    let recs: Vec<PairRecord> = writes.iter().map(|w| w.rec.clone()).collect();
                    let error = store.put_pairs(&recs, true).err().map(|e| e.to_string());
                    // Gone once the engine stopped: what is left is still written, unanswered.
                    let _ = inbox.blocking_send(Msg::Written { writes, error });
                }
            })?;
        Ok(Writer { tx, thread })
    }

    /// Queues `rec`, numbered `seq`; never waits.
    pub(super) fn submit(&self, seq: u64, rec: PairRecord) {
        if self.tx.send(Write { seq, rec }).is_err() {
            tracing::error!("the store writer stopped; a pair record was not written");
        }
    }

    /// Writes what is queued and stops (the engine's last act).
    pub(super) async fn finish(self) {
        let Writer { tx, thread } = self;
        drop(tx);
        if tokio::task::spawn_blocking(move || thread.join())
            .await
            .is_err()
        {
            tracing::error!("the store writer did not stop cleanly");
        }
    }
}

/// The newest write of each pair among `queued` (in the order they were queued), in the order
/// of their numbers.
fn newest(queued: Vec<Write>) -> Vec<Write> {
    let mut by_pair: HashMap<String, Write> = HashMap::new();
    for w in queued {
        match by_pair.get(&w.rec.name) {
            Some(had) if had.seq > w.seq => {}
            _ => {
                by_pair.insert(w.rec.name.clone(), w);
            }
        }
    }
    let mut out: Vec<Write> = by_pair.into_values().collect();
    out.sort_by_key(|w| w.seq);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(seq: u64, name: &str, epoch: u64) -> Write {
        Write {
            seq,
            rec: PairRecord {
                name: name.into(),
                epoch,
                ..Default::default()
            },
        }
    }

    /// Of several records of one pair queued together, only the newest is written.
    #[test]
    fn only_the_newest_record_of_a_pair_is_written() {
        let got = newest(vec![
            write(1, "a", 1),
            write(2, "b", 1),
            write(3, "a", 2),
            write(5, "c", 1),
            write(4, "a", 3),
        ]);
        let seqs: Vec<(u64, &str, u64)> = got
            .iter()
            .map(|w| (w.seq, w.rec.name.as_str(), w.rec.epoch))
            .collect();
        // "a" as numbered 4, its newest; the rest in the order of their numbers.
        assert_eq!(seqs, vec![(2, "b", 1), (4, "a", 3), (5, "c", 1)]);
    }
}
