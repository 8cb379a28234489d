//! One generation being received: its changes, and staging them as ops arrive.
//!
//! Ops are checked by `validate_ops` and staged here: new directories are built whole in the
//! stage (everything inside them is written at its final name there), small files go to a
//! staging batch that runs beside the session, streamed files to a stream worker each. At
//! commit, [`Gen::settle`] waits for all of them and records their outcomes. Everything a
//! generation creates in the stage is named after it, so [`Gen::abandon`] can remove it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Status;

use super::Inner;
use super::apply::STAGE_BUCKETS;
use super::batch::{Batch, BatchOut, InlineJob, Link};
use super::refusal::{bad, status_io};
use super::signature::base_at;
use super::stage::Base;
use super::stream::{FULL, Finished, NewStream, StreamHandle, StreamOutcome, open_stream};
use super::validate::{Checked, Content, Context, Copies, Streamed, Upsert, Valid, validate_ops};
use crate::disk::fsx;
use crate::proto::state::Change;
use crate::replication::manifest::{Kind, Manifest};
use crate::types::{Generation, RelPath};

/// Staging batches in flight beside a session.
const MAX_BATCHES: usize = 3;

/// Where a change stands while its generation is received.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum PState {
    Ready,
    /// In a staging batch that has not landed yet.
    Staging,
    Streaming,
    /// Its content failed verification: the sender is asked for it again, whole.
    Rejected,
}

pub(super) struct Pending {
    pub change: Change,
    pub state: PState,
}

/// Mapped bases of the files whose signature was sent, by file id, until their delta arrives.
pub(super) type Bases = Arc<Mutex<HashMap<u32, Arc<Base>>>>;

/// One generation being received.
pub(super) struct Gen {
    pub generation: Generation,
    pub changes: BTreeMap<RelPath, Pending>,
    /// Files being streamed, each written by its own worker.
    pub streams: HashMap<u32, StreamHandle>,
    /// Streams closed by the sender whose workers are finishing them.
    pub finishing: Vec<(RelPath, oneshot::Receiver<Result<Finished, Status>>)>,
    /// Staging batches running beside the session.
    pub batches: VecDeque<JoinHandle<BatchOut>>,
    pub bases: Bases,
    /// The session receiving it: a superseded session may still be discarding its own stage
    /// names after it let go of the replica, so names never collide across sessions.
    session: u64,
    seq: u64,
    /// Directories new in this generation, built whole in the stage (path inside it).
    new_dirs: HashMap<RelPath, Vec<u8>>,
    /// Every top-level item this generation created in the stage.
    created: Vec<String>,
}

impl Gen {
    pub(super) fn new(generation: Generation, session: u64) -> Gen {
        Gen {
            generation,
            session,
            changes: BTreeMap::new(),
            streams: HashMap::new(),
            bases: Arc::new(Mutex::new(HashMap::new())),
            seq: 0,
            new_dirs: HashMap::new(),
            created: Vec::new(),
            finishing: Vec::new(),
            batches: Default::default(),
        }
    }

    /// Where `p` goes inside the stage when its parent is a new directory staged whole.
    fn placed_loc(&self, p: &RelPath) -> Option<Vec<u8>> {
        let loc = self.new_dirs.get(&p.parent()?)?;
        let mut v = loc.clone();
        v.push(b'/');
        v.extend_from_slice(p.name());
        Some(v)
    }

    pub(super) fn stage_name(&mut self) -> String {
        self.seq += 1;
        let name = format!(
            "{:02x}/s{}-g{}-{}",
            self.seq % STAGE_BUCKETS,
            self.session,
            self.generation.0,
            self.seq
        );
        self.created.push(name.clone());
        name
    }

    /// Where a new directory or symlink goes: at its final name inside a staged directory
    /// (`placed`), or under a new stage name.
    fn stage_loc(&mut self, change: &mut Change, placed: Option<Vec<u8>>) -> Vec<u8> {
        match placed {
            Some(loc) => {
                change.placed = true;
                loc
            }
            None => {
                let name = self.stage_name();
                change.stage = name.clone();
                name.into_bytes()
            }
        }
    }

    /// Checks a batch of ops and stages it: directories and streams at once, the rest in a
    /// staging batch beside the session.
    pub(super) async fn receive_ops(
        &mut self,
        inner: &Arc<Inner>,
        manifest: &Manifest,
        ops: Vec<crate::proto::Op>,
    ) -> Result<(), Status> {
        let Checked { ops, refusal } = validate_ops(
            Context {
                manifest,
                changes: &self.changes,
                streaming: self.streams.keys().copied().collect(),
            },
            ops,
        );
        let mut batch = Batch::default();
        for op in ops {
            self.stage_op(inner, op, &mut batch)?;
        }
        if let Some(refusal) = refusal {
            return Err(refusal);
        }
        let pack = (!batch.inline.is_empty()).then(|| self.stage_name());
        self.batches
            .push_back(batch.spawn(inner.clone(), manifest, pack));
        // Bounded: a slow disk slows the sender down instead of piling up work here.
        while self.batches.len() > MAX_BATCHES {
            let b = self.batches.pop_front().expect("non-empty");
            let out = b.await.map_err(|e| Status::internal(e.to_string()))?;
            self.apply_batch(out)?;
        }
        Ok(())
    }

    fn stage_op(&mut self, inner: &Arc<Inner>, op: Valid, batch: &mut Batch) -> Result<(), Status> {
        match op {
            Valid::Delete { path, old } => {
                let change = Change {
                    path: path.as_bytes().to_vec(),
                    entry: None,
                    old_kind: old.to_proto(),
                    ..Default::default()
                };
                let state = PState::Ready;
                self.changes.insert(path, Pending { change, state });
                Ok(())
            }
            Valid::Upsert(u) => self.stage_upsert(inner, u, batch),
        }
    }

    fn stage_upsert(
        &mut self,
        inner: &Arc<Inner>,
        u: Upsert,
        batch: &mut Batch,
    ) -> Result<(), Status> {
        let Upsert {
            path,
            entry,
            replaces,
            content,
        } = u;
        let mut change = Change {
            path: path.as_bytes().to_vec(),
            entry: Some(entry.clone()),
            old_kind: replaces.map_or(0, Kind::to_proto),
            ..Default::default()
        };
        let placed = self.placed_loc(&path);
        let state = match content {
            Content::NewDir => {
                self.stage_new_dir(inner, &path, &mut change, placed)?;
                PState::Ready
            }
            Content::Dir => PState::Ready,
            Content::Symlink => {
                let loc = self.stage_loc(&mut change, placed);
                batch.symlinks.push((path.clone(), entry, loc));
                PState::Ready
            }
            Content::SameBytes => {
                change.set_meta = true;
                PState::Ready
            }
            Content::Inline { data, zstd } => {
                let job = InlineJob {
                    path: path.clone(),
                    entry,
                    data,
                    zstd,
                };
                change.placed = batch.add_inline(job, placed);
                PState::Staging
            }
            Content::CopyFrom(src) => {
                let name = self.stage_name();
                change.stage = name.clone();
                change.set_meta = true;
                batch.links.push(Link::new(path.clone(), src, entry, name));
                PState::Ready
            }
            Content::Stream(s) => {
                self.stage_stream(inner, &path, entry, placed, s)?;
                PState::Streaming
            }
        };
        self.changes.insert(path, Pending { change, state });
        Ok(())
    }

    /// A new directory is built whole in the stage and renamed into place at commit, with
    /// everything written inside it.
    fn stage_new_dir(
        &mut self,
        inner: &Inner,
        path: &RelPath,
        change: &mut Change,
        placed: Option<Vec<u8>>,
    ) -> Result<(), Status> {
        let loc = self.stage_loc(change, placed);
        fsx::mkdirat(inner.stage.as_fd(), &loc, 0o700).map_err(|e| status_io("staging", e))?;
        self.new_dirs.insert(path.clone(), loc);
        Ok(())
    }

    /// Opens the sink of a streamed file and starts its worker. A delta's base is the one
    /// mapped when its signature was sent; the base of copies is mapped now.
    fn stage_stream(
        &mut self,
        inner: &Arc<Inner>,
        path: &RelPath,
        entry: crate::proto::Entry,
        placed: Option<Vec<u8>>,
        s: Streamed,
    ) -> Result<(), Status> {
        let (mut base, mut refused, mut copy_limit) = (None, None, None);
        match s.copies {
            _ if s.delta => {
                let b = self.bases.lock().expect("bases").remove(&s.id);
                let b =
                    b.ok_or_else(|| bad(format!("{path}: delta without a signature request")))?;
                base = Some(b);
            }
            Copies::No => {}
            Copies::Refused(why) => refused = Some(why),
            Copies::From { base_size, limit } => match base_at(inner, path, base_size) {
                Ok(b) => (base, copy_limit) = (Some(Arc::new(b)), Some(limit)),
                Err(e) => refused = Some(format!("the replica's copy cannot be read: {e}")),
            },
        }
        let worker = open_stream(
            inner,
            NewStream {
                path: path.clone(),
                placed: placed.is_some(),
                name: placed.unwrap_or_else(|| self.stage_name().into_bytes()),
                entry,
                base,
                base_ino: s.base_ino,
                copy_limit,
                refused,
            },
        )?;
        self.streams.insert(s.id, worker);
        Ok(())
    }

    /// Records what a staging batch did.
    fn apply_batch(&mut self, out: BatchOut) -> Result<(), Status> {
        if let Some(e) = out.error {
            return Err(status_io("staging", e));
        }
        for (p, r) in out.results {
            let pending = self.changes.get_mut(&p).expect("staged change is pending");
            match r {
                Ok(Some(entry)) => {
                    pending.change.entry = Some(entry);
                    pending.state = PState::Ready;
                    if let (Some(name), Some(off)) = (&out.pack, out.packed.get(&p)) {
                        pending.change.pack = name.clone();
                        pending.change.pack_offset = *off;
                    }
                }
                Ok(None) => {
                    tracing::warn!(path = %p, "content failed verification; asking for it whole");
                    pending.reject();
                }
                Err(e) => return Err(status_io("staging", e)),
            }
        }
        Ok(())
    }

    /// Waits for every staging batch and stream of the generation, and records their outcomes.
    pub(super) async fn settle(&mut self) -> Result<(), Status> {
        if !self.streams.is_empty() {
            return Err(bad("commit with files still streaming"));
        }
        while let Some(b) = self.batches.pop_front() {
            let out = b.await.map_err(|e| Status::internal(e.to_string()))?;
            self.apply_batch(out)?;
        }
        for (path, rx) in std::mem::take(&mut self.finishing) {
            let f = rx
                .await
                .map_err(|_| Status::internal("stream writer stopped"))??;
            self.finish_stream(&path, f)?;
        }
        Ok(())
    }

    /// Records how a stream ended.
    fn finish_stream(&mut self, path: &RelPath, f: Finished) -> Result<(), Status> {
        let Some(p) = self.changes.get_mut(path) else {
            return Err(Status::internal("stream without a change"));
        };
        match f.outcome {
            StreamOutcome::Aborted => {
                self.changes.remove(path);
            }
            StreamOutcome::Rejected(why) => {
                tracing::warn!(path = %path, why, "file failed verification; asking for it whole");
                p.reject();
            }
            StreamOutcome::Verified { entry, patch } => {
                p.change.entry = Some(entry);
                let name = String::from_utf8_lossy(&f.name).into_owned();
                match patch {
                    None if f.placed => p.change.placed = true,
                    None => p.change.stage = name,
                    Some(extents) => {
                        p.change.patch = name;
                        p.change.extents = extents;
                        p.change.set_meta = true;
                    }
                }
                p.state = PState::Ready;
            }
        }
        Ok(())
    }

    /// The paths whose content failed verification, for the sender to send again whole.
    pub(super) fn rejected(&self) -> Vec<Vec<u8>> {
        self.changes
            .iter()
            .filter(|(_, p)| p.state == PState::Rejected)
            .map(|(k, _)| k.as_bytes().to_vec())
            .collect()
    }

    /// Removes everything this generation staged, once nothing of it is still being written.
    /// A stream worker drains the chunks it was handed before it sees its channel close, and a
    /// staging batch cannot be stopped once it runs: either could otherwise create a file after
    /// the removal (left behind), or after the replica's lock went to the next session, whose
    /// stage names are the same.
    pub(super) async fn abandon(mut self, stage: &OwnedFd) {
        for (_, h) in std::mem::take(&mut self.streams) {
            drop(h.tx);
            let _ = h.done.await;
        }
        for (_, done) in std::mem::take(&mut self.finishing) {
            let _ = done.await;
        }
        while let Some(b) = self.batches.pop_front() {
            let _ = b.await;
        }
        self.discard(stage);
    }

    /// Removes everything this generation staged (no worker of it may still be running: see
    /// `abandon`). A streamed patch that became a full copy is staged as `<name>.full`.
    pub(super) fn discard(self, stage: &OwnedFd) {
        for b in &self.batches {
            b.abort();
        }
        for name in self.created {
            let _ = fsx::remove_tree_at(stage.as_fd(), name.as_bytes());
            let _ = fsx::remove_tree_at(stage.as_fd(), format!("{name}{FULL}").as_bytes());
        }
    }
}

impl Pending {
    /// Its content failed verification: nothing of it is staged any more.
    fn reject(&mut self) {
        self.state = PState::Rejected;
        self.change.stage.clear();
        self.change.placed = false;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn sessions_never_share_a_stage_name() {
        // A superseded session discards its names after the next one may have begun the same
        // generation: the two must never name the same staged file.
        let mut old = Gen::new(Generation(7), 1);
        let mut new = Gen::new(Generation(7), 2);
        let olds: Vec<String> = (0..300).map(|_| old.stage_name()).collect();
        let news: Vec<String> = (0..300).map(|_| new.stage_name()).collect();
        assert!(olds.iter().all(|n| !news.contains(n)));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_abandoned_generation_leaves_nothing_staged() {
        let d = tempfile::tempdir().unwrap();
        let stage = fsx::open_dir_path(d.path()).unwrap();
        crate::replication::receive::apply::prepare_stage(stage.as_fd()).unwrap();
        let mut g = Gen::new(Generation(2), 1);
        // A streamed file whose patch became a full copy.
        let streamed = g.stage_name();
        std::fs::write(d.path().join(format!("{streamed}{FULL}")), b"full copy").unwrap();
        // A staging batch still writing when the generation is given up.
        let packed = d.path().join(g.stage_name());
        g.batches.push_back(tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(200));
            std::fs::write(packed, b"pack").unwrap();
            BatchOut {
                results: Vec::new(),
                packed: HashMap::new(),
                pack: None,
                error: None,
            }
        }));
        g.abandon(&stage).await;
        assert_eq!(
            crate::replication::receive::apply::clear_stage(stage.as_fd()).unwrap(),
            0
        );
    }
}
