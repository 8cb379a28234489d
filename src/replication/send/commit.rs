//! Committing a generation. The sender computes the manifest root the receiver must reach,
//! writes the pending record (so a crash before the acknowledgement is recognised on
//! reconnect), sends the commit and waits for the result. Only an acknowledged commit with the
//! expected generation and root reaches the index. Files the receiver could not verify are sent
//! again whole, at most twice.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Instant;

use prost::Message;

use super::content::Job;
use super::generation::Draft;
use super::session::Event;
use super::{Sender, Session, SyncError, index_error, local};
use crate::disk::crashsafe::{self, kind};
use crate::proto::state::{Change, Pending, Record};
use crate::proto::{Commit, CommitResult, sync_request};
use crate::replication::chunkmap;
use crate::replication::manifest::{Kind, Root};
use crate::replication::scan::Stat;
use crate::text::hex;
use crate::types::{Generation, RelPath};

/// Rounds of resending files the receiver could not verify before giving up.
const MAX_RETRY_ROUNDS: u32 = 2;

/// How one commit attempt ended.
enum Attempt {
    /// Durable on the receiver, with this root; the index has it.
    Committed(Root),
    /// Not committed: these paths must be sent again whole.
    Retry(Vec<Vec<u8>>),
}

impl Sender {
    /// Commits the generation and returns its root; resends what the receiver asks for.
    pub(super) async fn commit(
        &mut self,
        s: &mut Session,
        generation: Generation,
        draft: &mut Draft,
    ) -> Result<Root, SyncError> {
        let mut rounds = 0;
        loop {
            let retry = match self.try_commit(s, generation, &draft.changes).await? {
                Attempt::Committed(root) => return Ok(root),
                Attempt::Retry(paths) => paths,
            };
            rounds += 1;
            if rounds > MAX_RETRY_ROUNDS {
                return Err(SyncError::Refused(format!(
                    "{} file(s) still fail verification on the receiver after {rounds} attempts",
                    retry.len()
                )));
            }
            let again = retry_jobs(retry, &mut draft.changes)?;
            let sent = self.send_contents(s, vec![], again).await?;
            draft.record(sent);
        }
    }

    /// One commit attempt. The index keeps the changes only once the receiver acknowledged them.
    async fn try_commit(
        &mut self,
        s: &mut Session,
        generation: Generation,
        changes: &BTreeMap<RelPath, Change>,
    ) -> Result<Attempt, SyncError> {
        let (root, rec) = self.record_for(s, generation, changes)?;
        write_pending(&self.pending_path, &rec).map_err(local("writing the pending record"))?;
        let c = match ask_commit(s, generation, &root).await {
            Ok(c) => c,
            Err(e) => {
                // Keep the pending record: the receiver may have committed it.
                self.pending = Some(rec);
                return Err(e);
            }
        };
        if !c.committed {
            let _ = std::fs::remove_file(&self.pending_path);
            return Ok(Attempt::Retry(c.retry));
        }
        committed_as_sent(&c, generation, &root)?;
        let t = Instant::now();
        self.apply_local(&rec)?;
        let _ = std::fs::remove_file(&self.pending_path);
        tracing::debug!(ms = t.elapsed().as_millis() as u64, "index updated");
        self.keep_maps(&rec).await;
        Ok(Attempt::Committed(root))
    }

    /// Keeps the chunk maps of the big files' content this generation committed, and drops the
    /// maps no entry of the index references any more. A map that cannot be written costs only
    /// speed (the next change of that file goes by signature), so failures are logged.
    async fn keep_maps(&self, rec: &Record) {
        let mut fresh = std::mem::take(&mut *self.fresh_maps.lock().expect("fresh maps"));
        let mut keep = Vec::new();
        let mut big_moved = false;
        for c in &rec.changes {
            match &c.entry {
                Some(e) if e.size >= chunkmap::MIN_FILE => {
                    big_moved = true;
                    if let Some(m) = fresh.remove(&e.blake3) {
                        keep.push((e.blake3.clone(), m));
                    }
                }
                Some(_) => {}
                None => big_moved = true,
            }
        }
        if !big_moved {
            return;
        }
        let referenced: HashSet<Vec<u8>> = self
            .st
            .manifest
            .iter()
            .filter(|(_, e)| e.size >= chunkmap::MIN_FILE)
            .map(|(_, e)| e.blake3.clone())
            .collect();
        let maps = self.maps.clone();
        let r = tokio::task::spawn_blocking(move || {
            for (content, m) in &keep {
                maps.save(content, m)?;
            }
            maps.keep_only(&referenced)
        })
        .await;
        match r {
            Ok(Ok(removed)) => tracing::debug!(removed, "chunk maps kept"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot keep chunk maps"),
            Err(e) => tracing::warn!(error = %e, "cannot keep chunk maps"),
        }
    }
}

impl Sender {
    /// The record of this generation, and the root the index will have with its changes. The
    /// index takes the changes only long enough to compute that root.
    fn record_for(
        &mut self,
        s: &Session,
        generation: Generation,
        changes: &BTreeMap<RelPath, Change>,
    ) -> Result<(Root, Record), SyncError> {
        let list: Vec<Change> = changes.values().cloned().collect();
        let undo = self
            .st
            .manifest
            .apply_undoable(&list)
            .map_err(index_error)?;
        let root = self.st.manifest.root();
        self.st.manifest.undo(undo);
        let rec = Record {
            generation: generation.0,
            epoch: s.epoch.0,
            root: root.to_vec(),
            changes: list,
            applied: false,
            previous: Some(self.st.manifest.generation.0),
        };
        Ok((root, rec))
    }
}

/// A receiver that committed something else than what we sent is refused.
fn committed_as_sent(
    c: &CommitResult,
    generation: Generation,
    root: &Root,
) -> Result<(), SyncError> {
    if c.root[..] != root[..] || c.generation != generation.0 {
        return Err(SyncError::Refused(format!(
            "receiver committed generation {} with root {}, expected {generation} with {}",
            c.generation,
            hex(&c.root),
            hex(root)
        )));
    }
    Ok(())
}

/// Sends the commit and waits for its result.
async fn ask_commit(
    s: &mut Session,
    generation: Generation,
    root: &Root,
) -> Result<CommitResult, SyncError> {
    s.out
        .send(sync_request::Msg::Commit(Commit {
            generation: generation.0,
            root: root.to_vec(),
        }))
        .await?;
    loop {
        match s.event().await? {
            Event::Commit(c) => return Ok(c),
            Event::Manifest(_) => continue,
        }
    }
}

/// The files to send again whole (no delta base), taken out of the generation's changes.
fn retry_jobs(
    retry: Vec<Vec<u8>>,
    changes: &mut BTreeMap<RelPath, Change>,
) -> Result<Vec<Job>, SyncError> {
    let mut again = Vec::new();
    for p in retry {
        let p = RelPath::new(p).map_err(|e| SyncError::Refused(format!("retry path: {e}")))?;
        tracing::warn!(path = %p, "receiver could not verify a file; sending it whole");
        let Some(ch) = changes.remove(&p) else {
            return Err(SyncError::Refused(format!(
                "receiver asked to retry {p}, which we did not send"
            )));
        };
        let stat = ch
            .entry
            .as_ref()
            .map(|e| Stat::of_entry(Kind::File, e))
            .ok_or_else(|| SyncError::Refused(format!("retry of deleted {p}")))?;
        again.push(Job {
            path: p,
            stat,
            base: None,
        });
    }
    Ok(again)
}

/// The pending record left by the last run, if any (an unreadable one is ignored).
pub(super) fn read_pending(path: &Path) -> Option<Record> {
    match crashsafe::read_state(path, kind::PENDING) {
        Ok(Some(b)) => Pending::decode(&b[..]).ok().and_then(|p| p.record),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an unreadable pending record");
            None
        }
    }
}

fn write_pending(path: &Path, rec: &Record) -> std::io::Result<()> {
    let pending = Pending {
        record: Some(rec.clone()),
    }
    .encode_to_vec();
    crashsafe::write_state(path, kind::PENDING, &pending)
}
