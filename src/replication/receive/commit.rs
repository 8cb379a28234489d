//! Committing a generation (ARCHITECTURE.md, "Durability"): the manifest it gives is checked
//! first; then staged data is synced, the record appended durably (the commit point), the
//! workspace changed and synced, and only then is the generation acknowledged. Any refusal
//! before the commit point leaves the committed manifest as it was and removes what was
//! staged; a failure after it leaves the record to be rolled forward.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use tonic::Status;

use super::apply::{apply_record, clear_stage, sync_applied, sync_staged};
use super::generation::Gen;
use super::refusal::{bad, status_io};
use super::session::{Admitted, Guard, Session, blocking, send};
use super::{Committed, Inner, State, handoff};
use crate::proto::state::{Change, Record};
use crate::proto::{CommitResult, sync_response};
use crate::replication::manifest::{Kind, Manifest, Undo, kind_of};
use crate::text::hex;
use crate::types::{Epoch, Generation, RelPath};

impl Session {
    /// The sender's commit: waits for the generation's staging to settle, then asks again for
    /// what failed verification, or commits it and acknowledges it.
    pub(super) async fn commit(
        &mut self,
        guard: Guard,
        c: crate::proto::Commit,
    ) -> Result<Guard, Status> {
        let mut g = self
            .cur
            .take()
            .ok_or_else(|| bad("commit outside a generation"))?;
        if let Err(e) = settle_for(&mut g, c.generation).await {
            g.abandon(&self.inner.stage).await;
            return Err(e);
        }
        let retry = g.rejected();
        if !retry.is_empty() {
            let generation = g.generation;
            self.cur = Some(g);
            let result = CommitResult {
                generation: generation.0,
                committed: false,
                retry,
                ..Default::default()
            };
            send(&self.tx, sync_response::Msg::Commit(result)).await?;
            return Ok(guard);
        }
        let started = Instant::now();
        let burst = g.changes.len() >= BURST_CHANGES;
        let (inner, epoch, want) = (self.inner.clone(), self.epoch, c.root.to_vec());
        let sender = self.sender.clone();
        let (guard, r) = blocking(guard, move |st| {
            match still_admitted(&inner, st, epoch, &sender) {
                Ok(()) => commit(&inner, st, g, epoch, &want),
                Err(e) => {
                    g.discard(&inner.stage);
                    Err(e)
                }
            }
        })
        .await?;
        let done = r?;
        let (generation, root) = (done.generation, done.root);
        let commit_ms = started.elapsed().as_millis() as u64;
        let at = self.record_commit(&guard.manifest, generation, root);
        tracing::debug!(%generation, commit_ms, "generation committed");
        let result = CommitResult {
            generation: generation.0,
            committed: true,
            root: root.to_vec(),
            retry: vec![],
            commit_ms,
        };
        let sent = send(&self.tx, sync_response::Msg::Commit(result)).await;
        // After the answer, whether it reached the sender or not: its generation ends without
        // waiting for these.
        self.hand_over(&guard.manifest, done, at);
        if burst {
            crate::host::after_burst();
        }
        sent?;
        Ok(guard)
    }

    /// The figures of a commit; returns its time.
    fn record_commit(&self, m: &Manifest, generation: Generation, root: [u8; 32]) -> SystemTime {
        let mut f = self.inner.figures.lock().expect("figures");
        f.generation = generation;
        f.root = root;
        f.entries = m.len() as u64;
        f.bytes = m.total_bytes();
        let at = SystemTime::now();
        f.last_commit = Some(at);
        at
    }

    /// Tells watchers of the commit (ARCHITECTURE.md, "History"): the history recorder is
    /// handed its changes, or a copy of the manifest when it has none that follows them.
    fn hand_over(&self, m: &Manifest, done: Done, at: SystemTime) {
        let handed = || self.inner.handed.lock().expect("handed");
        if self.inner.committed.receiver_count() > 0 {
            // A whole copy is made outside the lock: the recorder takes what waits under it.
            let copy = handed()
                .wants_copy(done.before, done.changes.len(), m.len())
                .then(|| Arc::new(m.clone()));
            let commit = handoff::Commit {
                manifest: m,
                before: done.before,
                changes: done.changes,
                at,
                root: done.root,
            };
            handed().commit(commit, copy);
        } else {
            handed().lose();
        }
        let generation = done.generation;
        self.inner
            .committed
            .send_replace(Committed { generation, at });
    }
}

/// A generation of at least this many changes is a burst: what staging it allocated is given
/// back to the system once it is committed (ARCHITECTURE.md, "Memory").
const BURST_CHANGES: usize = 1000;

/// Checks that the commit is for the open generation, and waits for its staging.
async fn settle_for(g: &mut Gen, generation: u64) -> Result<(), Status> {
    if generation != g.generation.0 {
        return Err(bad(format!(
            "commit of generation {generation} inside generation {}",
            g.generation
        )));
    }
    g.settle().await
}

/// The hello's checks again, under the replica lock just before the commit point: the durable
/// epoch is still the session's, this agent still accepts, it still expects this sender at this
/// epoch, and the sender's certificate was not revoked meanwhile. Anything else abandons the
/// generation (the caller discards it); nothing is committed.
fn still_admitted(
    inner: &Inner,
    st: &State,
    epoch: Epoch,
    sender: &Admitted,
) -> Result<(), Status> {
    let durable = st.epoch.get();
    if durable != epoch {
        return Err(Status::failed_precondition(format!(
            "fenced: epoch moved to {durable} during the session"
        )));
    }
    if !inner.accepting.load(Ordering::SeqCst) {
        return Err(Status::unavailable(
            "this agent stopped accepting replication; the generation is not committed",
        ));
    }
    if *inner.expected.lock().expect("expected") != sender.expected {
        return Err(Status::aborted(
            "the coordinator named another sender or epoch; the generation is not committed",
        ));
    }
    if inner.deny.contains(&sender.serial) {
        return Err(Status::permission_denied(format!(
            "the certificate of {} (serial {}) was revoked; the generation is not committed",
            sender.identity, sender.serial
        )));
    }
    Ok(())
}

/// A generation committed and applied: its number and root, the one it was applied to, and
/// its changes.
struct Done {
    generation: Generation,
    root: [u8; 32],
    before: Generation,
    changes: Vec<Change>,
}

/// Makes a generation durable and applies it.
fn commit(
    inner: &Inner,
    st: &mut State,
    g: Gen,
    epoch: Epoch,
    want_root: &[u8],
) -> Result<Done, Status> {
    let generation = g.generation;
    let before = st.manifest.generation;
    let changes: Vec<Change> = g.changes.values().map(|p| p.change.clone()).collect();
    note_edits(inner, &st.manifest, &changes);
    // The manifest after this generation, checked before anything is made durable; any refusal
    // puts the committed manifest back as it was.
    let undo = match st.manifest.apply_undoable(&changes) {
        Ok(u) => u,
        Err(e) => {
            g.discard(&inner.stage);
            return Err(bad(format!("generation refused: {e}")));
        }
    };
    let root = match check_result(&st.manifest, &changes, want_root) {
        Ok(root) => root,
        Err(e) => return refuse(inner, st, g, undo, e),
    };
    let rec = Record {
        generation: generation.0,
        epoch: epoch.0,
        root: root.to_vec(),
        changes,
        applied: false,
        previous: Some(st.manifest.generation.0),
    };
    let t0 = Instant::now();
    let t_staged = match journal(inner, st, &rec, t0) {
        Ok(t) => t,
        Err(e) => return refuse(inner, st, g, undo, e),
    };
    st.manifest.generation = generation;
    let rec = apply_committed(inner, st, rec, t0, t_staged)?;
    st.catalog
        .mark_applied(generation)
        .and_then(|_| st.catalog.maybe_compact(&st.manifest))
        .map_err(|e| Status::internal(format!("catalog: {e}")))?;
    Ok(Done {
        generation,
        root,
        before,
        changes: rec.changes,
    })
}

/// Gathers what the generation changes in place for the history recorder, when one watches
/// (ARCHITECTURE.md, "History"). Before the commit point: a generation refused later only adds
/// ranges that did not change, which costs the recorder a re-read and is never wrong.
fn note_edits(inner: &Inner, before: &Manifest, changes: &[Change]) {
    let mut h = inner.handed.lock().expect("handed");
    if inner.committed.receiver_count() > 0 {
        h.edits.add(before, changes);
    } else {
        h.lose();
    }
}

/// Refuses a generation before its commit point: the committed manifest is put back and what
/// was staged removed.
fn refuse<T>(inner: &Inner, st: &mut State, g: Gen, undo: Undo, err: Status) -> Result<T, Status> {
    st.manifest.undo(undo);
    g.discard(&inner.stage);
    Err(err)
}

/// Checks the manifest a generation gives (`m`, after `changes`): every new entry's parent is
/// a directory in it (confinement), and its root is the one the sender expects.
fn check_result(m: &Manifest, changes: &[Change], want_root: &[u8]) -> Result<[u8; 32], Status> {
    for c in changes {
        if c.entry.is_none() {
            continue;
        }
        let p = RelPath::new(c.path.to_vec()).expect("validated");
        if let Some(parent) = p.parent()
            && m.get(&parent).and_then(kind_of) != Some(Kind::Dir)
        {
            return Err(bad(format!(
                "refused {p}: its parent is not a directory in this generation (paths through symlinks or files are refused)"
            )));
        }
    }
    let root = m.root();
    if root[..] != want_root[..] {
        return Err(Status::failed_precondition(format!(
            "manifest root mismatch: the sender expects {}, this generation would give {}; nothing committed",
            hex(want_root),
            hex(&root)
        )));
    }
    Ok(root)
}

/// Staged data first, then the record: the commit point. Returns how long syncing the staged
/// data took since `t0`.
fn journal(inner: &Inner, st: &mut State, rec: &Record, t0: Instant) -> Result<Duration, Status> {
    sync_staged(inner.stage.as_fd(), rec).map_err(|e| status_io("syncing staged data", e))?;
    let t_staged = t0.elapsed();
    st.catalog
        .append(rec)
        .map_err(|e| Status::internal(format!("writing the commit record: {e}")))?;
    Ok(t_staged)
}

/// Applies a committed record to the workspace and syncs it; on failure the record is kept to
/// be rolled forward before anything else.
fn apply_committed(
    inner: &Inner,
    st: &mut State,
    rec: Record,
    t0: Instant,
    t_staged: Duration,
) -> Result<Record, Status> {
    let generation = st.manifest.generation;
    inner.applying.store(generation.0, Ordering::SeqCst);
    if let Err(e) = apply_record(
        &inner.root,
        inner.stage.as_fd(),
        &rec,
        &st.manifest,
        inner.setid,
    )
    .and_then(|_| sync_applied(&inner.root, &rec, &st.manifest))
    .and_then(|_| clear_stage(inner.stage.as_fd()).map(drop))
    {
        tracing::error!(error = %e, %generation, "applying a committed generation failed; it will be rolled forward");
        st.unapplied = Some(rec);
        return Err(status_io("applying a committed generation", e));
    }
    tracing::debug!(
        %generation,
        changes = rec.changes.len(),
        sync_staged_ms = t_staged.as_millis() as u64,
        record_apply_sync_ms = (t0.elapsed() - t_staged).as_millis() as u64,
        "commit timings"
    );
    Ok(rec)
}

/// Rolls forward a committed record whose application failed earlier in this process.
pub(super) fn retry_apply(inner: &Inner, st: &mut State, rec: Record) -> Result<(), Status> {
    inner.applying.store(rec.generation, Ordering::SeqCst);
    let r = apply_record(
        &inner.root,
        inner.stage.as_fd(),
        &rec,
        &st.manifest,
        inner.setid,
    )
    .and_then(|_| sync_applied(&inner.root, &rec, &st.manifest));
    match r {
        Ok(()) => {
            let _ = st.catalog.mark_applied(Generation(rec.generation));
            let _ = clear_stage(inner.stage.as_fd());
            Ok(())
        }
        Err(e) => {
            st.unapplied = Some(rec);
            Err(status_io(
                "rolling forward the last committed generation",
                e,
            ))
        }
    }
}
