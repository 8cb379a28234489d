//! The standby's recorder (ARCHITECTURE.md, "History"): after each committed generation it
//! records a snapshot of the replica in the store, and now and then applies the retention.
//!
//! Recording reads the replica beside replication (a session holds the replica lock for as long
//! as it lasts), from its own copy of the committed manifest, which each commit's changes keep
//! up to date ([`copy`]): a file a newer generation changed
//! under it shows as `Moved`, and the recorder records the newest committed generation instead.
//! Generations committed while a record runs are folded into the next snapshot: history is per
//! generation when the standby keeps up, and one snapshot per record's time when it does not.
//! Records and the retention run on a thread of their own at a lower CPU priority ([`worker`]),
//! so that they take what replication leaves.

mod copy;
mod worker;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::history::{Changed, Hint, HistoryError, Recorded, Retention, Store};
use crate::replication::manifest::Manifest;
use crate::replication::receive::edits::Edits;
use crate::replication::receive::{Handover, Receiver, Update};
use crate::types::Generation;
use worker::Worker;

/// A warning after this many records in a row that a newer generation overtook.
const MOVED_WARN_EVERY: u32 = 20;
/// How long a record that a newer generation overtook waits for that generation's commit.
const NEWER_WITHIN: Duration = Duration::from_secs(30);
/// How often the retention runs besides after a record that went over the budget.
const FORGET_EVERY: Duration = Duration::from_secs(600);

/// What the recorder has done, for heartbeats, status and metrics.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct HistoryFigures {
    pub snapshots: u64,
    pub newest_unix_ms: i64,
    pub newest_generation: u64,
    pub stored_bytes: u64,
    pub logical_bytes: u64,
    pub records: u64,
    pub record_failures: u64,
    pub last_record_ms: u64,
    /// Snapshots dropped to keep under the disk budget (a warning each time it grows).
    pub dropped_for_budget: u64,
    /// The recorder's last failure (None: the last record went well).
    pub last_error: Option<String>,
    /// The uploader's last failure (None: the last pass went well).
    pub backup_last_error: Option<String>,
    /// The off-site backup: configured, the newest snapshot in the bucket, bytes uploaded and
    /// failed uploads since the agent started.
    pub backup_configured: bool,
    pub newest_backup_unix_ms: i64,
    pub backup_uploaded_bytes: u64,
    pub backup_failures: u64,
}

/// The recorder's handle: its figures, and who is woken after each change of the store.
#[derive(Clone)]
pub struct Recorder {
    figures: Arc<Mutex<HistoryFigures>>,
    changed: Arc<Notify>,
}

impl Recorder {
    pub fn figures(&self) -> HistoryFigures {
        self.figures.lock().expect("history figures").clone()
    }

    /// The figures, shared (the backup adds its own to them).
    pub fn shared_figures(&self) -> Arc<Mutex<HistoryFigures>> {
        self.figures.clone()
    }

    /// Notified after each snapshot recorded and each retention pass.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }
}

/// The store, and the thread its records and retention run on.
struct History {
    store: Arc<Store>,
    worker: Worker,
}

/// Starts recording a snapshot after each generation `receiver` commits.
pub fn start(
    store: Arc<Store>,
    receiver: Receiver,
    retention: Retention,
    shutdown: CancellationToken,
) -> std::io::Result<Recorder> {
    let figures = Arc::new(Mutex::new(HistoryFigures::default()));
    let rec = Recorder {
        figures: figures.clone(),
        changed: Arc::new(Notify::new()),
    };
    refresh(&store, &figures);
    let changed = rec.changed.clone();
    let worker = Worker::start("recorder")?;
    tokio::spawn(run(
        History { store, worker },
        receiver,
        retention,
        (figures, changed),
        shutdown,
    ));
    Ok(rec)
}

async fn run(
    history: History,
    receiver: Receiver,
    retention: Retention,
    (figures, changed): (Arc<Mutex<HistoryFigures>>, Arc<Notify>),
    shutdown: CancellationToken,
) {
    let mut committed = receiver.committed();
    let mut forget_tick = tokio::time::interval(FORGET_EVERY);
    let mut rec = Recording {
        history: &history,
        receiver: &receiver,
        figures: &figures,
        copy: None,
        changed: None,
        last: None,
    };
    // What the replica held when this agent stopped last may not be in the store yet.
    if let Some(now) = replica_at_start(&history.store, &receiver) {
        rec.record(now).await;
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = forget_tick.tick() => forget(&history, &retention, &figures).await,
            _ = tokio::time::sleep(copy::KEEP_IDLE), if rec.copy.is_some() => {
                rec.drop_copy().await;
                continue;
            }
            r = committed.changed() => {
                if r.is_err() {
                    return;
                }
                committed.borrow_and_update();
                let Some(handed) = receiver.take_committed() else {
                    continue;
                };
                rec.record(handed).await;
                if over_budget(&figures, &retention) {
                    forget(&history, &retention, &figures).await;
                }
            }
        }
        changed.notify_one();
    }
}

/// The replica as it is at start-up, when the store's newest snapshot is not of it (the
/// replica lock is free before the first session).
fn replica_at_start(store: &Store, receiver: &Receiver) -> Option<Handover> {
    let state = receiver.state();
    let st = state.try_lock().ok()?;
    let newest = store.list().last().map(|s| s.root);
    let root = st.manifest.root();
    if st.manifest.is_empty() || newest == Some(root) {
        return None;
    }
    let at = receiver
        .figures()
        .last_commit
        .unwrap_or_else(SystemTime::now);
    Some(Handover {
        update: Update::Whole(Arc::new(st.manifest.clone())),
        generation: st.manifest.generation,
        entries: st.manifest.len(),
        at,
        root,
        edits: Edits::default(),
    })
}

/// The recorder between commits: its copy of the committed manifest and the generation it
/// recorded last.
struct Recording<'a> {
    history: &'a History,
    receiver: &'a Receiver,
    figures: &'a Arc<Mutex<HistoryFigures>>,
    copy: Option<Arc<Manifest>>,
    /// The paths changed since the last record, when known.
    changed: Option<Changed>,
    last: Option<Generation>,
}

/// Why a step on the recorder's thread recorded nothing.
enum Missed {
    /// The copy of the manifest could not be brought up to this commit.
    Stale(String),
    Record(HistoryError),
}

impl Recording<'_> {
    /// Records a committed generation; when a newer one changed a file under it, the newest
    /// committed one instead, until one holds still. A failure is said in the figures and the
    /// log, and the next commit tries again.
    async fn record(&mut self, mut handed: Handover) {
        let started = std::time::Instant::now();
        let mut moved = 0;
        let r = loop {
            let generation = handed.generation;
            match self.step(handed).await {
                // A record overtaken by this generation recorded it already.
                Ok(None) => return,
                Ok(Some(rec)) => break Ok((rec, generation)),
                Err(Missed::Record(HistoryError::Moved { path })) => {
                    // The newer generation's edits alone: what this one's said about a file
                    // is gone with it, and such a file is read whole (never wrongly in part).
                    let Some(newer) = newer_than(self.receiver, generation).await else {
                        break Err(HistoryError::Moved { path }.to_string());
                    };
                    moved += 1;
                    if moved % MOVED_WARN_EVERY == 0 {
                        tracing::warn!(%path, moved, "files keep changing while the standby records them: no snapshot yet");
                    }
                    handed = newer;
                }
                Err(Missed::Record(e)) => break Err(e.to_string()),
                Err(Missed::Stale(why)) => {
                    tracing::warn!(%why, "the recorder's copy of the manifest was dropped; the next commit hands over a whole one");
                    break Err(why);
                }
            }
        };
        let mut f = self.figures.lock().expect("figures");
        match r {
            Ok((rec, generation)) => {
                f.records += 1;
                f.last_record_ms = started.elapsed().as_millis() as u64;
                f.last_error = None;
                tracing::debug!(snapshot = %rec.info.id, generation = %rec.info.generation, ms = f.last_record_ms, files_read = rec.files_read, bytes_read = rec.bytes_read, phases = ?rec.phases, "snapshot recorded");
                drop(f);
                if started.elapsed() >= crate::host::BURST {
                    crate::host::after_burst();
                }
                refresh(&self.history.store, self.figures);
                self.last = Some(generation);
            }
            Err(e) => {
                f.record_failures += 1;
                f.last_error = Some(e.clone());
                tracing::warn!(error = %e, "recording a snapshot failed; the next generation tries again");
            }
        }
    }

    /// On the recorder's thread: brings the copy up to the handed generation, and records it
    /// unless it was recorded already.
    async fn step(&mut self, handed: Handover) -> Result<Option<Recorded>, Missed> {
        let (s, ws, rx) = (
            self.history.store.clone(),
            self.receiver.workspace().to_path_buf(),
            self.receiver.clone(),
        );
        let (base, last, changed) = (self.copy.take(), self.last, self.changed.take());
        let out = self
            .history
            .worker
            .run(move || {
                let Handover {
                    update,
                    generation,
                    entries,
                    at,
                    root,
                    edits,
                } = handed;
                let (manifest, touched) = match copy::follow(base, update, generation, entries) {
                    Ok(m) => m,
                    Err(why) => return (None, None, Err(Missed::Stale(why))),
                };
                let mut changed = copy::fold(changed, touched, &manifest);
                if Some(manifest.generation) == last {
                    return (Some(manifest), changed, Ok(None));
                }
                let holds = || rx.workspace_generation();
                let hint = Hint {
                    root,
                    edits: &edits,
                    changed: changed.as_ref(),
                    workspace_generation: &holds,
                };
                let r = s.record_with(&ws, &manifest, at, Some(&hint));
                if r.is_ok() {
                    changed = Some(Changed {
                        since: manifest.generation,
                        paths: Default::default(),
                    });
                }
                (Some(manifest), changed, r.map(Some).map_err(Missed::Record))
            })
            .await;
        let (copy, changed, r) =
            out.unwrap_or_else(|worker::Gone| (None, None, Err(Missed::Record(task_failed()))));
        (self.copy, self.changed) = (copy, changed);
        if self.copy.is_none() {
            self.receiver.unfollow();
        }
        r
    }

    /// Drops the copy of the manifest (quiet for a while), on the recorder's thread (freeing
    /// 100k entries takes a while), and gives the memory back: the next commit hands one over.
    async fn drop_copy(&mut self) {
        self.receiver.unfollow();
        let copy = self.copy.take();
        let _ = self
            .history
            .worker
            .run(move || {
                drop(copy);
                crate::host::after_burst();
            })
            .await;
    }
}

/// The next committed generation after `generation` (the one that moved a file is being
/// applied, or is applied already); None when none comes within a while.
async fn newer_than(receiver: &Receiver, generation: Generation) -> Option<Handover> {
    let mut w = receiver.committed();
    let wait = w.wait_for(|c| c.generation != generation);
    tokio::time::timeout(NEWER_WITHIN, wait).await.ok()?.ok()?;
    receiver
        .take_committed()
        .filter(|h| h.generation != generation)
}

fn task_failed() -> HistoryError {
    HistoryError::Io {
        what: "the recording task",
        path: std::path::PathBuf::new(),
        source: std::io::Error::other("it panicked"),
    }
}

/// Over the disk budget with an older snapshot to drop: when the newest alone is over it,
/// nothing can be dropped, and a prune after every commit would only cost.
fn over_budget(figures: &Mutex<HistoryFigures>, retention: &Retention) -> bool {
    let f = figures.lock().expect("figures");
    retention.budget_bytes > 0 && f.stored_bytes > retention.budget_bytes && f.snapshots > 1
}

/// Applies the retention; a drop for the budget is a warning.
async fn forget(history: &History, retention: &Retention, figures: &Arc<Mutex<HistoryFigures>>) {
    let (s, r) = (history.store.clone(), retention.clone());
    let out = history
        .worker
        .run(move || s.forget(&r, SystemTime::now()))
        .await;
    match out {
        Ok(Ok(p)) => {
            if !p.for_budget.is_empty() {
                tracing::warn!(
                    dropped = p.for_budget.len(),
                    budget = retention.budget_bytes,
                    "the history is over its disk budget: the oldest snapshots were dropped"
                );
                figures.lock().expect("figures").dropped_for_budget += p.for_budget.len() as u64;
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "applying the retention failed"),
        Err(worker::Gone) => tracing::warn!("applying the retention failed: it panicked"),
    }
    refresh(&history.store, figures);
}

/// The store's figures into the recorder's.
fn refresh(store: &Store, figures: &Mutex<HistoryFigures>) {
    let stats = store.stats();
    let newest = store.list().last().cloned();
    let mut f = figures.lock().expect("figures");
    f.snapshots = stats.snapshots as u64;
    f.stored_bytes = stats.stored_bytes;
    f.logical_bytes = stats.logical_bytes;
    if let Some(n) = newest {
        f.newest_unix_ms = n.time_ms as i64;
        f.newest_generation = n.generation.0;
    }
}
