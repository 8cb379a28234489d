//! One replication session: the hello, taking the replica over from an older session, the
//! epoch check (`admission`: exactly the durable epoch, never raised by a hello), then one
//! handler per message until the sender closes the stream.
//!
//! The session holds the replica's lock from its hello to its end; a newer session of the same
//! sender cancels it (see `take_over`). Whatever generation is still open when the session ends
//! is abandoned: nothing of it was committed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedMutexGuard, mpsc};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use super::admission::{Expected, admit_epoch};
use super::generation::Gen;
use super::refusal::bad;
use super::signature::{SigJob, sig_worker};
use super::stream::StreamMsg;
use super::validate::rel;
use super::{Inner, PROTOCOL, Slot, State};
use crate::proto::{
    Begin, Chunk, FileEnd, Hello, HelloReply, ManifestChunk, ManifestItem, SigRequest, SyncRequest,
    SyncResponse, sync_request, sync_response,
};
use crate::replication::delta;
use crate::replication::manifest::{Kind, Manifest, kind_of};
use crate::trust::identity::Identity;
use crate::types::{Epoch, Generation};

/// Where replies to the sender go.
pub(super) type Replies = mpsc::Sender<Result<SyncResponse, Status>>;
/// The replica, held by the session.
pub(super) type Guard = OwnedMutexGuard<State>;

/// The sender a session was admitted as: checked again before every commit.
#[derive(Clone, Debug)]
pub(super) struct Admitted {
    /// Whom the receiver expected when the session was admitted.
    pub expected: Expected,
    pub identity: Identity,
    /// Its certificate's serial (lower-case hex).
    pub serial: String,
}

/// A session past its hello.
pub(super) struct Session {
    pub inner: Arc<Inner>,
    /// The session's epoch (the hello's, equal to the durable one).
    pub epoch: Epoch,
    pub sender: Admitted,
    pub tx: Replies,
    sig_tx: mpsc::Sender<SigJob>,
    /// This session's number, part of every stage name it creates (see `Gen::stage_name`).
    id: u64,
    /// The generation the session's first one follows: the committed one, or the sender's
    /// newer one when this replica is behind the pair's numbering (see [`session_after`]).
    after: Generation,
    /// The generation being received, from its begin to its commit.
    pub cur: Option<Gen>,
}

/// Runs a session from its hello to its end.
pub(super) async fn run_session(
    inner: Arc<Inner>,
    id: u64,
    sender: Admitted,
    mut stream: Streaming<SyncRequest>,
    tx: Replies,
) -> Result<(), Status> {
    let Some(hello) = read_hello(&mut stream).await? else {
        return Ok(());
    };
    // Checked against the figures first, so a sender at the wrong epoch cannot end the session
    // in progress; checked again under the replica lock below, where it counts.
    let durable = inner.figures.lock().expect("figures").epoch;
    enter_epoch(&sender, durable, Epoch(hello.epoch))?;
    let token = take_over(&inner, id, &sender.serial);
    let mut guard = lock_replica(&inner, &token).await?;
    // Roll forward a commit whose application failed earlier, before anything else.
    if let Some(rec) = guard.unapplied.take() {
        let inner2 = inner.clone();
        let (g, r) = blocking(guard, move |st| {
            super::commit::retry_apply(&inner2, st, rec)
        })
        .await?;
        guard = g;
        r?;
    }
    let epoch = enter_epoch(&sender, guard.epoch.get(), Epoch(hello.epoch))?;
    let after = session_after(guard.manifest.generation, Generation(hello.generation))?;
    inner.figures.lock().expect("figures").session_active = true;
    tracing::info!(sender = %hello.sender, identity = %sender.identity, epoch = %epoch, generation = %guard.manifest.generation, "session started");
    send(
        &tx,
        sync_response::Msg::Hello(hello_reply(&guard.manifest, epoch, after)),
    )
    .await?;

    let (sig_tx, sig_rx) = mpsc::channel::<SigJob>(64);
    let sig_worker = tokio::spawn(sig_worker(inner.clone(), sig_rx, tx.clone()));
    let mut s = Session {
        inner: inner.clone(),
        epoch,
        sender,
        tx,
        sig_tx,
        id,
        after,
        cur: None,
    };
    // The loop owns the replica's lock: it is released when the loop ends, which can be before
    // this session's open generation is discarded below. A newer session may be staging by
    // then; stage names carry the session's number, so nothing of it is among what is removed.
    let result = s.serve(guard, &mut stream, &token).await;
    sig_worker.abort();
    if let Some(g) = s.cur.take() {
        g.abandon(&inner.stage).await;
    }
    result
}

/// The session's first message, which must be a hello in our protocol; `None` when the sender
/// closed the stream before saying anything.
async fn read_hello(stream: &mut Streaming<SyncRequest>) -> Result<Option<Hello>, Status> {
    let first = match stream.next().await {
        Some(Ok(m)) => m,
        Some(Err(e)) => return Err(e),
        None => return Ok(None),
    };
    let Some(sync_request::Msg::Hello(hello)) = first.msg else {
        return Err(bad("the first message of a session must be hello"));
    };
    if hello.protocol != PROTOCOL {
        return Err(Status::failed_precondition(format!(
            "protocol {} not supported (this receiver speaks {PROTOCOL})",
            hello.protocol
        )));
    }
    Ok(Some(hello))
}

/// Takes over from an older session of the same sender, which is cancelled.
fn take_over(inner: &Inner, id: u64, serial: &str) -> CancellationToken {
    let token = CancellationToken::new();
    let slot = Slot {
        id,
        token: token.clone(),
        serial: serial.to_string(),
    };
    if let Some(old) = inner.session.lock().expect("session lock").replace(slot) {
        old.token.cancel();
    }
    token
}

/// Waits for the replica, as long as this session is not superseded, for at most a minute.
async fn lock_replica(inner: &Inner, token: &CancellationToken) -> Result<Guard, Status> {
    tokio::select! {
        g = inner.state.clone().lock_owned() => Ok(g),
        _ = token.cancelled() => Err(Status::cancelled("superseded by a newer session")),
        _ = tokio::time::sleep(Duration::from_secs(60)) => Err(Status::unavailable("replica busy")),
    }
}

/// The session's epoch: exactly the durable one. A stale sender is fenced; a sender ahead of
/// this receiver is refused, never followed (epochs come only from the coordinator).
fn enter_epoch(sender: &Admitted, durable: Epoch, hello_epoch: Epoch) -> Result<Epoch, Status> {
    admit_epoch(&sender.expected, hello_epoch, durable).map_err(|r| {
        tracing::warn!(identity = %sender.identity, hello = %hello_epoch, %durable, "session refused: epoch");
        Status::from(r)
    })
}

/// The generation a session's first one follows (ARCHITECTURE.md, "Generations"): the larger
/// of the committed one and the sender's. Generations are numbered pair-wide, so a replica that
/// is behind (a new machine being restored or seeded, the CPU after it sent to one) continues
/// from the pair's newest number instead of its own. Every later one is exactly +1, and
/// nothing at or below the committed generation is ever taken again.
fn session_after(committed: Generation, sender: Generation) -> Result<Generation, Status> {
    if sender.0 == u64::MAX {
        return Err(bad("the hello's generation leaves no number to follow it"));
    }
    Ok(committed.max(sender))
}

/// The only generation a begin may carry: the one after the committed generation, or after
/// the session's `after` while the replica has not reached it.
fn next_after(committed: Generation, after: Generation) -> Result<Generation, Status> {
    let last = committed.max(after);
    if last.0 == u64::MAX {
        return Err(bad("no generation can follow the last one"));
    }
    Ok(last.next())
}

fn hello_reply(m: &Manifest, epoch: Epoch, after: Generation) -> HelloReply {
    HelloReply {
        protocol: PROTOCOL,
        epoch: epoch.0,
        generation: m.generation.0,
        root: m.root().to_vec(),
        entries: m.len() as u64,
        after: after.0,
    }
}

impl Session {
    /// Handles messages until the sender closes the stream, an error, or a newer session.
    async fn serve(
        &mut self,
        mut guard: Guard,
        stream: &mut Streaming<SyncRequest>,
        token: &CancellationToken,
    ) -> Result<(), Status> {
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = token.cancelled() => return Err(Status::cancelled("superseded by a newer session")),
            };
            let msg = match msg {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            };
            self.inner.figures.lock().expect("figures").last_data = Some(Instant::now());
            let Some(msg) = msg.msg else {
                return Err(bad("empty message"));
            };
            guard = self.handle(guard, msg).await?;
        }
    }

    /// One message; the replica's lock passes through (a commit works on it off this thread).
    async fn handle(&mut self, guard: Guard, msg: sync_request::Msg) -> Result<Guard, Status> {
        use sync_request::Msg;
        match msg {
            Msg::Hello(_) => return Err(bad("hello sent twice")),
            Msg::Manifest(_) => self.send_manifest(&guard.manifest).await?,
            Msg::Begin(b) => self.begin(&guard.manifest, b)?,
            Msg::Ops(ops) => self.ops(&guard.manifest, ops.ops).await?,
            Msg::Sig(s) => self.sig(&guard.manifest, s).await?,
            Msg::Chunk(c) => self.chunk(c).await?,
            Msg::End(end) => self.end(end).await?,
            Msg::Commit(c) => return self.commit(guard, c).await,
        }
        Ok(guard)
    }

    /// The current generation, or why `what` cannot come now.
    fn current(&mut self, what: &str) -> Result<&mut Gen, Status> {
        self.cur
            .as_mut()
            .ok_or_else(|| bad(format!("{what} outside a generation")))
    }

    async fn send_manifest(&self, m: &Manifest) -> Result<(), Status> {
        if self.cur.is_some() {
            return Err(bad("manifest asked for in the middle of a generation"));
        }
        send_manifest(m, &self.tx).await
    }

    fn begin(&mut self, m: &Manifest, b: Begin) -> Result<(), Status> {
        if self.cur.is_some() {
            return Err(bad("begin inside a generation"));
        }
        let expected = next_after(m.generation, self.after)?;
        if b.generation != expected.0 {
            return Err(Status::failed_precondition(format!(
                "generation {} cannot follow committed generation {} (expected {expected})",
                b.generation, m.generation
            )));
        }
        self.cur = Some(Gen::new(expected, self.id));
        Ok(())
    }

    async fn ops(&mut self, m: &Manifest, ops: Vec<crate::proto::Op>) -> Result<(), Status> {
        let inner = self.inner.clone();
        self.current("ops")?.receive_ops(&inner, m, ops).await
    }

    /// Queues a signature request for the signature worker.
    async fn sig(&mut self, m: &Manifest, s: SigRequest) -> Result<(), Status> {
        let bases = self.current("signature request")?.bases.clone();
        delta::check_block_size(s.block_size).map_err(|e| bad(e.to_string()))?;
        let path = rel(&s.path)?;
        let expect = m
            .get(&path)
            .filter(|e| kind_of(e) == Some(Kind::File))
            .cloned();
        let job = SigJob {
            file: s.file,
            path,
            block_size: s.block_size,
            expect,
            bases,
        };
        self.sig_tx
            .send(job)
            .await
            .map_err(|_| Status::internal("signature worker stopped"))
    }

    async fn chunk(&mut self, c: Chunk) -> Result<(), Status> {
        let g = self.current("chunk")?;
        let h = g
            .streams
            .get(&c.file)
            .ok_or_else(|| bad(format!("chunk for unknown file {}", c.file)))?;
        h.tx.send(StreamMsg::Chunk(c))
            .await
            .map_err(|_| Status::internal("stream writer stopped"))
    }

    async fn end(&mut self, end: FileEnd) -> Result<(), Status> {
        let g = self.current("file end")?;
        let h = g
            .streams
            .remove(&end.file)
            .ok_or_else(|| bad(format!("end of unknown file {}", end.file)))?;
        h.tx.send(StreamMsg::End(end))
            .await
            .map_err(|_| Status::internal("stream writer stopped"))?;
        g.finishing.push((h.path, h.done));
        Ok(())
    }
}

pub(super) async fn send(tx: &Replies, msg: sync_response::Msg) -> Result<(), Status> {
    tx.send(Ok(SyncResponse { msg: Some(msg) }))
        .await
        .map_err(|_| Status::cancelled("sender went away"))
}

/// Runs `f` on the blocking pool with the replica state, and hands the state back.
pub(super) async fn blocking<T: Send + 'static>(
    mut guard: Guard,
    f: impl FnOnce(&mut State) -> T + Send + 'static,
) -> Result<(Guard, T), Status> {
    tokio::task::spawn_blocking(move || {
        let r = f(&mut guard);
        (guard, r)
    })
    .await
    .map_err(|e| Status::internal(format!("worker failed: {e}")))
}

/// Sends the committed manifest in chunks of about 1 MiB.
async fn send_manifest(m: &Manifest, tx: &Replies) -> Result<(), Status> {
    let root = m.root().to_vec();
    let chunk = |items, last| {
        sync_response::Msg::Manifest(ManifestChunk {
            generation: m.generation.0,
            root: root.clone(),
            items,
            last,
        })
    };
    let mut items = Vec::new();
    let mut size = 0usize;
    let mut iter = m.iter().peekable();
    while let Some((p, e)) = iter.next() {
        size += p.as_bytes().len() + 64 + e.target.len();
        items.push(ManifestItem {
            path: p.as_bytes().to_vec(),
            entry: Some(e.clone()),
        });
        if size > (1 << 20) || iter.peek().is_none() {
            let last = iter.peek().is_none();
            send(tx, chunk(std::mem::take(&mut items), last)).await?;
            size = 0;
        }
    }
    if m.is_empty() {
        send(tx, chunk(vec![], true)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_follows_the_newer_of_the_replica_and_the_sender() {
        let g = Generation;
        // A new machine (0) joins a pair at 41; the CPU at 41 hears a sender that knows 41.
        assert_eq!(session_after(g(0), g(41)).unwrap(), g(41));
        assert_eq!(session_after(g(41), g(41)).unwrap(), g(41));
        // A sender behind the replica (or one that predates the field) changes nothing.
        assert_eq!(session_after(g(41), g(3)).unwrap(), g(41));
        assert_eq!(session_after(g(41), g(0)).unwrap(), g(41));
        assert!(session_after(g(0), g(u64::MAX)).is_err());
    }

    #[test]
    fn only_the_one_number_after_both_may_begin() {
        let g = Generation;
        assert_eq!(next_after(g(0), g(41)).unwrap(), g(42));
        // Once the replica committed past `after`, exactly +1 as always.
        assert_eq!(next_after(g(42), g(41)).unwrap(), g(43));
        assert_eq!(next_after(g(7), g(0)).unwrap(), g(8));
        assert!(next_after(g(u64::MAX), g(0)).is_err());
    }
}
