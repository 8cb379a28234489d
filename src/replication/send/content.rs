//! Which file's content goes how. Small files (up to [`SenderOptions::inline_max`]) are sent
//! whole inside batches (`inline`); big ones are streamed in windows (`stream`): as copies of
//! the receiver's copy where this sender kept its chunk map (`replication::chunkmap`), else as
//! deltas against a signature of the receiver's copy when it has one. Signatures are asked for
//! ahead of need, a bounded number at a time, so their round trips overlap the streaming.
//!
//! Several big files stream at once ([`in_flight`]), each on a blocking thread of its own (their
//! chunks interleave on the wire, each file's in order); together they hold no more windows in
//! memory than one file alone did.
//!
//! [`SenderOptions::inline_max`]: super::SenderOptions::inline_max

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use tokio::sync::oneshot;

use super::inline::send_small;
use super::read::FileRead;
use super::session::{SigResult, session_closed};
use super::stream::{Basis, Streamed, stream_file};
use super::{Sender, Session, SyncError, task_error};
use crate::proto::{Entry, SigRequest, sync_request};
use crate::replication::chunkmap::{ChunkMap, MapStore};
use crate::replication::delta;
use crate::replication::scan::Stat;
use crate::types::RelPath;

/// Signatures asked for ahead of need (bounded, so their memory is bounded too).
const AHEAD: usize = 8;

/// One file's content to send.
#[derive(Clone, Debug)]
pub(super) struct Job {
    pub(super) path: RelPath,
    pub(super) stat: Stat,
    /// The receiver holds a file at this path: a delta base.
    pub(super) base: Option<Entry>,
}

impl Job {
    /// The signature block size for this file's base.
    fn block_size(&self) -> u32 {
        delta::block_size_for(self.base.as_ref().map(|b| b.size).unwrap_or(0))
    }
}

/// Each file's outcome, by path.
pub(super) type Sent = Vec<(RelPath, FileRead)>;

impl Sender {
    /// Sends small files inline (in parallel batches) and big ones streamed (deltas where the
    /// receiver has a base).
    pub(super) async fn send_contents(
        &self,
        s: &mut Session,
        small: Vec<Job>,
        big: Vec<Job>,
    ) -> Result<Sent, SyncError> {
        let mut results = self.send_inline(s, small).await?;
        if !big.is_empty() {
            results.extend(self.send_streamed(s, big).await?);
        }
        Ok(results)
    }

    async fn send_inline(&self, s: &Session, small: Vec<Job>) -> Result<Sent, SyncError> {
        if small.is_empty() {
            return Ok(Vec::new());
        }
        let t = Instant::now();
        let n = small.len();
        let ws = self.opts.workspace.clone();
        let out = s.out.clone();
        let level = self.opts.compress_level;
        let r = tokio::task::spawn_blocking(move || send_small(&ws, small, level, &out))
            .await
            .map_err(task_error)??;
        tracing::debug!(
            files = n,
            ms = t.elapsed().as_millis() as u64,
            "small files sent"
        );
        Ok(r)
    }

    /// Streams big files, [`in_flight`] at a time, each as soon as its signature (if any) is
    /// in. The chunk maps of what was read are kept in `fresh_maps` until the commit.
    async fn send_streamed(&self, s: &mut Session, big: Vec<Job>) -> Result<Sent, SyncError> {
        let mut results = Vec::with_capacity(big.len());
        let maps = self.maps.clone();
        let with_map: Vec<bool> = big.iter().map(|j| has_map(&maps, j)).collect();
        let (k, windows) = in_flight();
        let mut ahead = Ahead::default();
        let mut running = VecDeque::new();
        for (i, job) in big.iter().enumerate() {
            ahead.ask_up_to(s, &big, &with_map, i + AHEAD).await?;
            let (id, sig) = match ahead.waiting.remove(&i) {
                Some((id, rx)) => (id, signature(s, rx, job).await?),
                None => (s.file_id(), None),
            };
            let (ws, out, maps) = (self.opts.workspace.clone(), s.out.clone(), maps.clone());
            let level = self.opts.compress_level;
            let (job, map) = (job.clone(), with_map[i]);
            running.push_back(tokio::task::spawn_blocking(move || {
                let basis = basis(&maps, &job, map, sig);
                let r = stream_file(&ws, &job, (id, windows), basis, level, &out);
                (job.path, r)
            }));
            while running.len() >= k || (i + 1 == big.len() && !running.is_empty()) {
                let t = running.pop_front().expect("running");
                let (path, r) = t.await.map_err(task_error)?;
                self.keep_fresh(&mut results, path, r?);
            }
        }
        Ok(results)
    }

    /// Takes in one streamed file: its outcome, and its new chunk map until the commit.
    fn keep_fresh(&self, results: &mut Sent, path: crate::types::RelPath, r: Streamed) {
        if let (FileRead::Done(e), Some(map)) = (&r.read, r.map) {
            self.fresh_maps
                .lock()
                .expect("fresh maps")
                .insert(e.blake3.clone(), map);
        }
        results.push((path, r.read));
    }
}

/// How many big files stream at once, and how many windows each reads at a time: together
/// about two windows per core, as one file alone read before.
fn in_flight() -> (usize, usize) {
    let cores = rayon::current_num_threads().max(1);
    let k = cores.clamp(2, 4);
    (k, (2 * cores / k).max(1))
}

/// Whether this sender kept a chunk map of the receiver's copy of the job's file.
fn has_map(maps: &MapStore, job: &Job) -> bool {
    job.base
        .as_ref()
        .is_some_and(|b| b.size > 0 && maps.has(&b.blake3))
}

/// What the stream of a job is encoded against: the chunk map of the receiver's copy (when
/// `map` and it can be read), else its signature, else nothing.
fn basis(maps: &MapStore, job: &Job, map: bool, sig: Option<fast_rsync::Signature>) -> Basis {
    let base = job.base.as_ref().filter(|_| map);
    let loaded: Option<(ChunkMap, Vec<u8>)> = base.and_then(|b| {
        let m = maps.load(&b.blake3)?;
        (m.size() == b.size).then(|| (m, b.blake3.clone()))
    });
    match (loaded, sig) {
        (Some((m, b)), _) => Basis::Map(m, b),
        (None, Some(sig)) => Basis::Signature(sig),
        (None, None) => Basis::Whole,
    }
}

/// Signature requests in flight.
#[derive(Default)]
struct Ahead {
    /// Jobs (by index) whose signature was asked for: their file id and the answer to come.
    waiting: HashMap<usize, (u32, oneshot::Receiver<SigResult>)>,
    /// Jobs considered so far.
    asked: usize,
}

impl Ahead {
    /// Asks for the signatures of the jobs before `until` that have a base without a map.
    async fn ask_up_to(
        &mut self,
        s: &mut Session,
        jobs: &[Job],
        with_map: &[bool],
        until: usize,
    ) -> Result<(), SyncError> {
        while self.asked < jobs.len() && self.asked < until {
            let j = &jobs[self.asked];
            if j.base.is_some() && !with_map[self.asked] {
                let id = s.file_id();
                let (tx, rx) = oneshot::channel();
                s.sigs.lock().expect("sigs").insert(id, tx);
                s.out
                    .send(sync_request::Msg::Sig(SigRequest {
                        file: id,
                        path: j.path.as_bytes().to_vec(),
                        block_size: j.block_size(),
                    }))
                    .await?;
                self.waiting.insert(self.asked, (id, rx));
            }
            self.asked += 1;
        }
        Ok(())
    }
}

/// Waits for a job's signature and checks it; `None`: the receiver has no base after all.
async fn signature(
    s: &mut Session,
    rx: oneshot::Receiver<SigResult>,
    job: &Job,
) -> Result<Option<fast_rsync::Signature>, SyncError> {
    let r = match rx.await {
        Ok(r) => r?,
        // The reader went away without answering: the session ended.
        Err(_) => return Err(s.event().await.err().unwrap_or_else(session_closed)),
    };
    let Some((bytes, base_size)) = r else {
        return Ok(None);
    };
    delta::check_signature(bytes, job.block_size(), base_size)
        .map(Some)
        .map_err(|e| SyncError::Refused(e.to_string()))
}
