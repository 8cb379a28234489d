//! One generation, top to bottom: scan and plan, begin, send what changed (metadata first, then
//! renames and re-verified files that may need no bytes, then content), commit, record.
//! The messages go out in exactly that order; the receiver stages them until the commit.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::content::{Job, Sent};
use super::figures::Report;
use super::ops::{batches, change, delete_change, delete_op, upsert_op};
use super::read::{FileRead, hash_file, now_ns};
use super::restore::{Deferred, within_budget};
use super::{Sender, Session, SyncError, task_error};
use crate::proto::state::Change;
use crate::proto::{Begin, Entry, Op, Ops, sync_request, upsert};
use crate::replication::attrs;
use crate::replication::manifest::{Root, same_attrs};
use crate::replication::scan::{self, Action, Plan, Scope};
use crate::text::hex;
use crate::types::{Generation, RelPath};

/// A generation being built: the index changes it will commit, and what waits for the next.
#[derive(Default)]
pub(super) struct Draft {
    /// Index changes to commit, by path.
    pub(super) changes: BTreeMap<RelPath, Change>,
    /// Files that changed while read.
    still_changing: Vec<RelPath>,
    /// Changes of local fields only (inode, re-verification): nothing on the replica moves.
    local_only: usize,
}

impl Draft {
    /// Takes in the outcome of sending files.
    pub(super) fn record(&mut self, sent: Sent) {
        for (p, r) in sent {
            match r {
                FileRead::Changed => self.still_changing.push(p),
                FileRead::Done(e) => {
                    self.changes.insert(p.clone(), change(&p, e));
                }
            }
        }
    }
}

/// A file that may not need its bytes sent (a re-verified file, or a rename from `from`).
type HashFirst = (Job, Option<(RelPath, Entry)>);

/// A plan's actions, sorted by what they need.
#[derive(Default)]
struct Sorted {
    /// Deletions, directories, symlinks, mode changes: no content.
    meta_ops: Vec<Op>,
    /// Files whose content is read and sent.
    contents: Vec<Job>,
    /// Files hashed first: their bytes may already be on the receiver.
    hash_first: Vec<HashFirst>,
}

/// Where the time of a generation went (a debug log line).
struct Timings {
    scanned: Duration,
    small: usize,
    big: usize,
    content: Duration,
    /// When the content was out (committing starts).
    commit: Instant,
}

impl Sender {
    /// Scans `scope`, sends what changed as the next generation and waits until it is durable
    /// on the receiver. With nothing to send, returns `None` unless `force` (which commits an
    /// empty generation: a barrier that also checks the roots agree).
    pub async fn sync_generation(
        &mut self,
        s: &mut Session,
        scope: Scope,
        force: bool,
    ) -> Result<Option<Report>, SyncError> {
        let started = Instant::now();
        let sent0 = s.bytes_sent();
        let scan_start_ns = now_ns();
        let plan = self.plan(scope).await?;
        let mut timings = Timings::scanned(started.elapsed());
        if plan.is_empty() && !force {
            return Ok(None);
        }
        self.figures
            .lock()
            .expect("figures")
            .planned(&plan, scan_start_ns);
        let generation = s.after.next();
        let begin = Begin {
            generation: generation.0,
        };
        s.out.send(sync_request::Msg::Begin(begin)).await?;
        let mut draft = Draft::default();
        self.fresh_maps.lock().expect("fresh maps").clear();
        let sorted = sort_actions(plan.actions, &mut draft);
        send_ops(s, sorted.meta_ops).await?;
        let mut contents = sorted.contents;
        self.hash_first(s, sorted.hash_first, &mut draft, &mut contents)
            .await?;
        let (contents, deferred) = match self.opts.generation_budget {
            Some(budget) => within_budget(contents, budget),
            None => (contents, Deferred::default()),
        };
        self.send_new_content(s, contents, &mut draft, &mut timings)
            .await?;
        let root = self.commit(s, generation, &mut draft).await?;
        timings.log(generation);
        s.receiver_generation = generation;
        s.after = generation;
        s.receiver_root = root;
        let bytes_sent = s.bytes_sent() - sent0;
        let report = self.report(generation, &root, &draft, &deferred, bytes_sent, started);
        self.figures
            .lock()
            .expect("figures")
            .durable(&report, deferred.bytes);
        Ok(Some(report))
    }

    /// What is pending without a receiver: `scope` planned against the index (the last durable
    /// generation) for the figures, while the standby cannot be reached. Sends nothing.
    pub async fn estimate(&mut self, scope: Scope) -> Result<(), SyncError> {
        let scan_start_ns = now_ns();
        let plan = self.plan(scope).await?;
        self.figures
            .lock()
            .expect("figures")
            .planned(&plan, scan_start_ns);
        Ok(())
    }

    /// Walks `scope` (off the async threads) and plans it against the index.
    async fn plan(&mut self, scope: Scope) -> Result<Plan, SyncError> {
        // New ignore rules may let back in files anywhere: look everywhere then.
        let scope = if self.exclude.refresh() {
            Scope::Full
        } else {
            scope
        };
        let index = std::mem::take(&mut self.st.manifest);
        let ws = self.opts.workspace.clone();
        let exclude = self.exclude.clone();
        let (mut index, mut plan) = tokio::task::spawn_blocking(move || {
            let started_ns = now_ns();
            let (mut w, roots) = scan::walk(&ws, &scope, &exclude);
            attrs::fill(&ws, &mut w, &index, started_ns);
            let p = scan::plan(&index, &w, &roots);
            (index, p)
        })
        .await
        .map_err(task_error)?;
        // Attributes read again and found unchanged: only the index's change time moves (kept
        // in memory; lost on a restart, it costs one more read).
        for (p, ctime_ns) in std::mem::take(&mut plan.local) {
            if let Some(e) = index.get_mut(&p) {
                e.ctime_ns = ctime_ns;
            }
        }
        self.st.manifest = index;
        Ok(plan)
    }

    /// Hashes renamed and re-verified files: a rename whose bytes match its source becomes a
    /// copy on the receiver, a re-verified file that still matches moves only in the index,
    /// anything else joins `contents`.
    async fn hash_first(
        &self,
        s: &mut Session,
        files: Vec<HashFirst>,
        draft: &mut Draft,
        contents: &mut Vec<Job>,
    ) -> Result<(), SyncError> {
        if files.is_empty() {
            return Ok(());
        }
        let ws = self.opts.workspace.clone();
        let hashed = tokio::task::spawn_blocking(move || {
            files
                .into_par_iter()
                .map(|(job, from)| {
                    let r = hash_file(&ws, &job.path, &job.stat);
                    (job, from, r)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(task_error)?;
        let mut link_ops = Vec::new();
        for (job, from, r) in hashed {
            let FileRead::Done(entry) = r else {
                draft.still_changing.push(job.path);
                continue;
            };
            match needs(&job, from.as_ref(), &entry) {
                Needs::Bytes => {
                    contents.push(job);
                    continue;
                }
                Needs::Op(op) => link_ops.push(*op),
                Needs::Nothing => draft.local_only += 1,
            }
            draft
                .changes
                .insert(job.path.clone(), change(&job.path, entry));
        }
        send_ops(s, link_ops).await
    }

    /// Splits content into small and big files and sends it.
    async fn send_new_content(
        &self,
        s: &mut Session,
        contents: Vec<Job>,
        draft: &mut Draft,
        timings: &mut Timings,
    ) -> Result<(), SyncError> {
        let (small, big): (Vec<Job>, Vec<Job>) = contents
            .into_iter()
            .partition(|j| j.stat.size <= self.opts.inline_max);
        (timings.small, timings.big) = (small.len(), big.len());
        let t_content = Instant::now();
        let sent = self.send_contents(s, small, big).await?;
        timings.content = t_content.elapsed();
        timings.commit = Instant::now();
        draft.record(sent);
        Ok(())
    }

    /// What the generation did, with the index as it now stands.
    fn report(
        &self,
        generation: Generation,
        root: &Root,
        draft: &Draft,
        deferred: &Deferred,
        bytes_sent: u64,
        started: Instant,
    ) -> Report {
        let replica_changes = draft.changes.len() - draft.local_only;
        Report {
            generation: generation.0,
            files_total: self.st.manifest.file_count() as u64,
            files_changed: replica_changes as u64,
            bytes_total: self.st.manifest.total_bytes(),
            bytes_sent,
            duration_ms: started.elapsed().as_millis() as u64,
            root: hex(root),
            still_changing: draft.still_changing.iter().map(|p| p.display()).collect(),
            deferred: deferred.paths.iter().map(|p| p.display()).collect(),
        }
    }
}

/// Sorts the plan's actions: metadata becomes ops (and index changes) at once, content waits.
fn sort_actions(actions: Vec<Action>, draft: &mut Draft) -> Sorted {
    let mut sorted = Sorted::default();
    for a in actions {
        match a {
            Action::Delete { path, old } => {
                sorted.meta_ops.push(delete_op(&path, old));
                draft.changes.insert(path.clone(), delete_change(path, old));
            }
            Action::Node { path, stat } => {
                let e = stat.entry();
                sorted
                    .meta_ops
                    .push(upsert_op(&path, &e, upsert::Content::Keep(true)));
                draft.changes.insert(path.clone(), change(&path, e));
            }
            Action::Meta { path, stat, old } => {
                let e = Entry {
                    mode: stat.mode,
                    mtime_ns: stat.mtime_ns,
                    ino: stat.ino,
                    uid: Some(stat.uid),
                    gid: Some(stat.gid),
                    xattrs: stat.xattrs,
                    ctime_ns: stat.ctime_ns,
                    ..old
                };
                sorted
                    .meta_ops
                    .push(upsert_op(&path, &e, upsert::Content::Keep(true)));
                draft.changes.insert(path.clone(), change(&path, e));
            }
            Action::Content {
                path,
                stat,
                base,
                renamed_from,
                verify_only,
            } => {
                let job = Job { path, stat, base };
                if verify_only || renamed_from.is_some() {
                    sorted.hash_first.push((job, renamed_from));
                } else {
                    sorted.contents.push(job);
                }
            }
        }
    }
    sorted
}

/// What a hashed file needs.
enum Needs {
    /// Its bytes: the receiver does not have them.
    Bytes,
    /// This op only: a copy from the rename's source, or new metadata over the same bytes.
    Op(Box<Op>),
    /// Nothing on the replica: only the local index entry moves (inode, flag).
    Nothing,
}

/// What a hashed file needs, given the rename source or the replica's copy it was checked against.
fn needs(job: &Job, from: Option<&(RelPath, Entry)>, entry: &Entry) -> Needs {
    if let Some((src, src_entry)) = from {
        if src_entry.blake3 != entry.blake3 {
            return Needs::Bytes;
        }
        let from = upsert::Content::CopyFrom(src.as_bytes().to_vec());
        return Needs::Op(Box::new(upsert_op(&job.path, entry, from)));
    }
    match &job.base {
        Some(b) if b.blake3 == entry.blake3 => {
            // Verified unchanged: the replica's bytes stand.
            if b.mode != entry.mode || b.mtime_ns != entry.mtime_ns || !same_attrs(b, entry) {
                Needs::Op(Box::new(upsert_op(
                    &job.path,
                    entry,
                    upsert::Content::Keep(true),
                )))
            } else {
                Needs::Nothing
            }
        }
        _ => Needs::Bytes,
    }
}

/// Sends ops in messages of at most ~1 MiB.
async fn send_ops(s: &Session, ops: Vec<Op>) -> Result<(), SyncError> {
    for batch in batches(ops) {
        s.out
            .send(sync_request::Msg::Ops(Ops { ops: batch }))
            .await?;
    }
    Ok(())
}

impl Timings {
    fn scanned(scanned: Duration) -> Timings {
        Timings {
            scanned,
            small: 0,
            big: 0,
            content: Duration::ZERO,
            commit: Instant::now(),
        }
    }

    fn log(&self, generation: Generation) {
        tracing::debug!(
            %generation,
            scan_ms = self.scanned.as_millis() as u64,
            small = self.small,
            big = self.big,
            content_ms = self.content.as_millis() as u64,
            commit_ms = self.commit.elapsed().as_millis() as u64,
            "generation timings"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::manifest::tests::file;
    use crate::replication::scan::Stat;

    fn job(base: Option<Entry>) -> Job {
        let stat = Stat {
            kind: crate::replication::manifest::Kind::File,
            mode: 0o644,
            mtime_ns: 5,
            size: 3,
            ino: 7,
            target: vec![],
            uid: 0,
            gid: 0,
            ctime_ns: 0,
            xattrs: None,
        };
        let path = RelPath::new("a").unwrap();
        Job { path, stat, base }
    }

    fn content(n: &Needs) -> Option<upsert::Content> {
        let Needs::Op(op) = n else { return None };
        match &op.change {
            Some(crate::proto::op::Change::Upsert(u)) => u.content.clone(),
            _ => None,
        }
    }

    #[test]
    fn a_rename_with_the_same_bytes_is_a_copy() {
        let src = (RelPath::new("old").unwrap(), file(3, 1, 9));
        let n = needs(&job(None), Some(&src), &file(3, 5, 9));
        let from = upsert::Content::CopyFrom(b"old".to_vec());
        assert_eq!(content(&n), Some(from));
        let n = needs(&job(None), Some(&src), &file(3, 5, 8));
        assert!(matches!(n, Needs::Bytes));
    }

    #[test]
    fn a_reverified_file_moves_only_what_changed() {
        let same = needs(&job(Some(file(3, 5, 9))), None, &file(3, 5, 9));
        assert!(matches!(same, Needs::Nothing));
        let touched = needs(&job(Some(file(3, 1, 9))), None, &file(3, 5, 9));
        assert_eq!(content(&touched), Some(upsert::Content::Keep(true)));
        let edited = needs(&job(Some(file(3, 5, 8))), None, &file(3, 5, 9));
        assert!(matches!(edited, Needs::Bytes));
        assert!(matches!(
            needs(&job(None), None, &file(3, 5, 9)),
            Needs::Bytes
        ));
    }
}
