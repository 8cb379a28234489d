//! Seeding a new standby from the pair's off-site backup (`coordinator recover P --from-backup`,
//! ARCHITECTURE.md "Rebuilding from the bucket").
//!
//! The coordinator sends `Seed{epoch, snapshot}` to the new CPU agent of a pair that lost both
//! machines. The node takes the epoch durably and accepts nothing (`Mode::Seeding`); the seeder
//! then, trying again every [`RETRY`] until it succeeds:
//! 1. rebuilds the snapshot's store from the bucket into `<state>/seed-store` (resumable, every
//!    object verified: `backup::restore`);
//! 2. under the replica lock, writes the snapshot's files into the empty workspace, each
//!    verified, and takes them as the snapshot's generation (`Receiver::adopt_seed`): the
//!    catalog rewrite is the commit point;
//! 3. records `<state>/seed` as done and removes the scratch store.
//!
//! The `<state>/seed` record says which snapshot is being written before any file is: after a
//! crash the same seed goes on over its own partial files, while a workspace holding files no
//! seed wrote is refused. A replica that holds anything is never overwritten.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::agent::backups;
use crate::agent::config::BackupSettings;
use crate::backup::{Bucket, Pick};
use crate::disk::crashsafe::write_atomic;
use crate::history::{Selector, Store};
use crate::proto::{BackupTarget, SeedReport};
use crate::replication::receive::Receiver;
use crate::replication::scan::STAGE_DIR_NAME;
use crate::types::Generation;

/// Where the snapshot's store is rebuilt, in the state directory.
pub const SCRATCH: &str = "seed-store";
/// The seed's record in the state directory.
pub const RECORD: &str = "seed";
/// How long a failed try waits before the next.
pub const RETRY: Duration = Duration::from_secs(10);

/// The durable record of a seed, and what heartbeats report of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    /// What the coordinator asked for: `latest` or an id.
    asked: String,
    /// The snapshot being (or) written, once known.
    snapshot: String,
    done: bool,
    files: u64,
    bytes: u64,
}

/// A handle on the seeder; cheap to clone.
#[derive(Clone)]
pub struct Seeder {
    inner: Arc<Inner>,
}

struct Inner {
    receiver: Receiver,
    state_dir: PathBuf,
    /// The agent's own backup settings (flags, file).
    own: Option<BackupSettings>,
    /// The backup the coordinator named for this pair (preferred: it is the pair's).
    offered: Mutex<Option<BackupSettings>>,
    /// The record as known here, and the last try's error.
    status: Mutex<(Option<Record>, String)>,
    /// The seed under way (what was asked) and how to stop it.
    running: Mutex<Option<(String, CancellationToken)>>,
    shutdown: CancellationToken,
}

impl Seeder {
    /// A seeder over `receiver`; a seed recorded in `state_dir` by an earlier run is reported.
    pub fn new(
        receiver: Receiver,
        state_dir: &Path,
        own: Option<BackupSettings>,
        shutdown: CancellationToken,
    ) -> Seeder {
        let record = read_record(state_dir);
        Seeder {
            inner: Arc::new(Inner {
                receiver,
                state_dir: state_dir.to_path_buf(),
                own,
                offered: Mutex::new(None),
                status: Mutex::new((record, String::new())),
                running: Mutex::new(None),
                shutdown,
            }),
        }
    }

    /// The coordinator's backup target for this pair (unusable ones are said in the log).
    pub fn offer(&self, t: &BackupTarget) {
        if let Some(s) = backups::from_coordinator(t) {
            *self.inner.offered.lock().expect("offered") = Some(s);
        }
    }

    /// Starts seeding from the snapshot `asked` (`latest` or an id), unless that seed is done
    /// or under way.
    pub fn start(&self, asked: &str) {
        if self.done_with(asked) {
            return;
        }
        let mut running = self.inner.running.lock().expect("running");
        if let Some((what, stop)) = running.as_ref() {
            if what == asked {
                return;
            }
            stop.cancel();
        }
        let stop = self.inner.shutdown.child_token();
        *running = Some((asked.to_string(), stop.clone()));
        tracing::warn!(
            snapshot = asked,
            "seeding this standby from the off-site backup"
        );
        tokio::spawn(run(self.inner.clone(), asked.to_string(), stop));
    }

    /// Whether the seed `asked` is in the replica already.
    fn done_with(&self, asked: &str) -> bool {
        let status = self.inner.status.lock().expect("seed status");
        status
            .0
            .as_ref()
            .is_some_and(|r| r.done && (asked == "latest" || r.snapshot == asked))
    }

    /// What heartbeats carry (None: never asked to seed).
    pub fn report(&self) -> Option<SeedReport> {
        let status = self.inner.status.lock().expect("seed status");
        let (record, error) = (&status.0, &status.1);
        if record.is_none() && error.is_empty() {
            return None;
        }
        let r = record.clone().unwrap_or_default();
        Some(SeedReport {
            asked: r.asked,
            snapshot: r.snapshot,
            done: r.done,
            error: crate::text::truncate(error.clone(), crate::text::REPORT_TEXT_MAX),
            files: r.files,
            bytes: r.bytes,
        })
    }
}

/// Tries the seed until it is in place, the coordinator asks for another, or the agent stops.
async fn run(inner: Arc<Inner>, asked: String, stop: CancellationToken) {
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = seed_once(&inner, &asked) => r,
        };
        match r {
            Ok(rec) => {
                tracing::warn!(snapshot = %rec.snapshot, files = rec.files, bytes = rec.bytes, "seeded from the off-site backup");
                *inner.status.lock().expect("seed status") = (Some(rec), String::new());
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "seeding from the off-site backup failed; trying again");
                inner.status.lock().expect("seed status").1 = format!("{e:#}");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// One try: the store from the bucket, the files into the replica, the record.
async fn seed_once(inner: &Inner, asked: &str) -> anyhow::Result<Record> {
    let dir = &inner.state_dir;
    if let Some(r) = read_record(dir).filter(|r| r.asked == asked)
        && let Some(done) = finished(inner, r)?
    {
        return Ok(done);
    }
    let settings = inner
        .offered
        .lock()
        .expect("offered")
        .clone()
        .or_else(|| inner.own.clone())
        .ok_or_else(|| anyhow::anyhow!("no backup to seed from: the coordinator sent none (its [backup]) and this agent has none of its own"))?;
    let pick: Pick = asked.parse()?;
    let bucket = match &settings.credentials {
        Some(c) => Bucket::open_with(&settings.bucket, c)?,
        None => Bucket::open(&settings.bucket)?,
    };
    let scratch = dir.join(SCRATCH);
    clear_finished_scratch(&scratch)?;
    let restored = crate::backup::restore(&bucket, &settings.key, &pick, &scratch, 4).await?;
    let mut rec = Record {
        asked: asked.to_string(),
        snapshot: restored.snapshot.id().to_string(),
        ..Record::default()
    };
    inner.status.lock().expect("seed status").0 = Some(rec.clone());
    let written = write_files(inner, rec.clone(), scratch.clone()).await?;
    rec.files = written.files;
    rec.bytes = written.bytes;
    rec.done = true;
    save_record(dir, &rec)?;
    std::fs::remove_dir_all(&scratch).ok();
    Ok(rec)
}

/// A seed whose files a crashed run already took into the replica (the catalog rewrite
/// committed it): done now. None when it must go on.
fn finished(inner: &Inner, mut r: Record) -> anyhow::Result<Option<Record>> {
    if r.done {
        return Ok(Some(r));
    }
    if inner.receiver.figures().entries == 0 {
        return Ok(None);
    }
    r.done = true;
    save_record(&inner.state_dir, &r)?;
    std::fs::remove_dir_all(inner.state_dir.join(SCRATCH)).ok();
    Ok(Some(r))
}

/// The rebuilt store's snapshot into the empty workspace, taken as the snapshot's generation
/// (the pair's numbering goes on from the backup).
async fn write_files(
    inner: &Inner,
    rec: Record,
    scratch: PathBuf,
) -> anyhow::Result<crate::history::RestoreSummary> {
    let state_dir = inner.state_dir.clone();
    let summary = Arc::new(Mutex::new(None));
    let out = summary.clone();
    inner
        .receiver
        .adopt_seed(move |ws| {
            let (r, generation) =
                fill(ws, &state_dir, &rec, &scratch).map_err(|e| format!("{e:#}"))?;
            *out.lock().expect("summary") = Some(r);
            Ok(generation)
        })
        .await?;
    let done = summary.lock().expect("summary").take();
    done.ok_or_else(|| anyhow::anyhow!("the seed wrote nothing"))
}

/// Writes the files (blocking): refused over files no seed of this snapshot wrote. Returns
/// what was written and the generation the snapshot recorded.
fn fill(
    ws: &Path,
    state_dir: &Path,
    rec: &Record,
    scratch: &Path,
) -> anyhow::Result<(crate::history::RestoreSummary, Generation)> {
    let ours = read_record(state_dir).is_some_and(|r| r.snapshot == rec.snapshot && !r.done);
    let others = foreign_entries(ws)?;
    if !ours && others > 0 {
        anyhow::bail!(
            "the workspace {} holds {others} entries no seed wrote, though the replica is empty: a seed does not mix with them (start the agent on an empty workspace)",
            ws.display()
        );
    }
    save_record(state_dir, rec)?;
    let store = Store::open(scratch)?;
    let snap = store.find(&Selector::Id(rec.snapshot.clone()))?;
    Ok((store.restore(snap.id, None, ws)?, snap.generation))
}

/// Entries of the workspace, leaving out the replica's stage.
fn foreign_entries(ws: &Path) -> std::io::Result<usize> {
    Ok(std::fs::read_dir(ws)?
        .flatten()
        .filter(|e| e.file_name() != STAGE_DIR_NAME)
        .count())
}

/// A scratch store a crashed try completed but did not use is rebuilt (`backup::restore` takes
/// only a new, empty or interrupted target).
fn clear_finished_scratch(scratch: &Path) -> std::io::Result<()> {
    let interrupted = scratch.join("tmp").exists();
    let empty = match std::fs::read_dir(scratch) {
        Ok(mut d) => d.next().is_none(),
        Err(_) => true,
    };
    if empty || interrupted {
        return Ok(());
    }
    std::fs::remove_dir_all(scratch)
}

fn read_record(state_dir: &Path) -> Option<Record> {
    let bytes = std::fs::read(state_dir.join(RECORD)).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "the seed record is unreadable; it is ignored");
            None
        }
    }
}

fn save_record(state_dir: &Path, r: &Record) -> anyhow::Result<()> {
    let path = state_dir.join(RECORD);
    write_atomic(&path, &serde_json::to_vec(r)?)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_store_is_cleared_only_when_complete() {
        let t = tempfile::tempdir().unwrap();
        let s = t.path().join("s");
        clear_finished_scratch(&s).unwrap();
        std::fs::create_dir_all(s.join("tmp")).unwrap();
        std::fs::write(s.join("tmp/restoring"), b"").unwrap();
        clear_finished_scratch(&s).unwrap();
        assert!(
            s.join("tmp/restoring").exists(),
            "an interrupted restore goes on"
        );
        std::fs::remove_dir_all(s.join("tmp")).unwrap();
        std::fs::create_dir_all(s.join("packs")).unwrap();
        clear_finished_scratch(&s).unwrap();
        assert!(!s.exists(), "a complete, unused one is rebuilt");
    }

    #[test]
    fn only_the_stage_is_not_foreign() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join(STAGE_DIR_NAME)).unwrap();
        assert_eq!(foreign_entries(t.path()).unwrap(), 0);
        std::fs::write(t.path().join("x"), b"1").unwrap();
        assert_eq!(foreign_entries(t.path()).unwrap(), 1);
    }

    #[test]
    fn records_round_trip_and_a_damaged_one_is_ignored() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(read_record(t.path()), None);
        let r = Record {
            asked: "latest".into(),
            snapshot: "0123456789abcdef".into(),
            done: true,
            files: 3,
            bytes: 10,
        };
        save_record(t.path(), &r).unwrap();
        assert_eq!(read_record(t.path()), Some(r));
        std::fs::write(t.path().join(RECORD), b"{not json").unwrap();
        assert_eq!(read_record(t.path()), None);
    }
}
