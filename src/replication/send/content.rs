//! Which file's content goes how. Small files (up to [`SenderOptions::inline_max`]) are sent
//! whole inside batches (`inline`); big ones are streamed in windows (`stream`), as deltas
//! against a signature of the receiver's copy when it has one. Signatures are asked for ahead
//! of need, a bounded number at a time, so their round trips overlap the streaming.
//!
//! [`SenderOptions::inline_max`]: super::SenderOptions::inline_max

use std::collections::HashMap;
use std::time::Instant;

use tokio::sync::oneshot;

use super::inline::send_small;
use super::read::FileRead;
use super::session::{SigResult, session_closed};
use super::stream::stream_file;
use super::{Sender, Session, SyncError, task_error};
use crate::proto::{Entry, SigRequest, sync_request};
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

    /// Streams big files one after the other, each as soon as its signature (if any) is in.
    async fn send_streamed(&self, s: &mut Session, big: Vec<Job>) -> Result<Sent, SyncError> {
        let mut results = Vec::with_capacity(big.len());
        let mut ahead = Ahead::default();
        for (i, job) in big.iter().enumerate() {
            ahead.ask_up_to(s, &big, i + AHEAD).await?;
            let (id, sig) = match ahead.waiting.remove(&i) {
                Some((id, rx)) => (id, signature(s, rx, job).await?),
                None => (s.file_id(), None),
            };
            let ws = self.opts.workspace.clone();
            let out = s.out.clone();
            let level = self.opts.compress_level;
            let job = job.clone();
            let path = job.path.clone();
            let r =
                tokio::task::spawn_blocking(move || stream_file(&ws, &job, id, sig, level, &out))
                    .await
                    .map_err(task_error)??;
            results.push((path, r));
        }
        Ok(results)
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
    /// Asks for the signatures of the jobs before `until` that have a base.
    async fn ask_up_to(
        &mut self,
        s: &mut Session,
        jobs: &[Job],
        until: usize,
    ) -> Result<(), SyncError> {
        while self.asked < jobs.len() && self.asked < until {
            let j = &jobs[self.asked];
            if j.base.is_some() {
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
