//! A session: one `Sync` stream to a receiver. Opening it says hello (a receiver that has seen
//! a newer epoch fences us); from then on [`Out`] puts messages on the stream, counting their
//! bytes, and the response reader (`reader`) hands the receiver's answers back.
//!
//! Whoever notices first that the session ended records why in the shared [`Failure`]; every
//! later send or wait reports that reason, so the receiver's own error is what the caller sees.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::reader::read_responses;
use super::{Sender, SyncError};
use crate::proto::replica_client::ReplicaClient;
use crate::proto::{
    CommitResult, Hello, HelloReply, ManifestChunk, SyncRequest, SyncResponse, sync_request,
    sync_response,
};
use crate::replication::receive::{MAX_MESSAGE, PROTOCOL};
use crate::text::error_chain;
use crate::types::{Epoch, Generation};

/// Why a session ended, as first seen by the response reader.
pub(super) type Failure = Arc<Mutex<Option<SyncError>>>;

/// A serialized signature and the length of the base it covers; `None`: no base, send whole.
pub(super) type SigResult = Result<Option<(Vec<u8>, u64)>, SyncError>;

/// Files waiting for their signature, by file id.
pub(super) type SigWaiters = Arc<Mutex<HashMap<u32, oneshot::Sender<SigResult>>>>;

/// What the receiver says besides signatures.
pub(super) enum Event {
    Commit(CommitResult),
    Manifest(ManifestChunk),
}

pub(super) fn session_closed() -> SyncError {
    SyncError::Connection("session closed".into())
}

/// The recorded reason the session ended, if any.
fn recorded(f: &Failure) -> SyncError {
    f.lock()
        .expect("failure")
        .clone()
        .unwrap_or_else(session_closed)
}

/// The reason a session failed: the receiver's own error when it gave one (it may arrive a
/// moment after our side of the stream noticed).
fn failure_of(f: &Failure) -> SyncError {
    for _ in 0..20 {
        if let Some(e) = f.lock().expect("failure").clone() {
            return e;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    session_closed()
}

/// Messages out, counting the bytes put on the connection.
#[derive(Clone)]
pub(super) struct Out {
    tx: mpsc::Sender<SyncRequest>,
    sent: Arc<AtomicU64>,
    failure: Failure,
}

impl Out {
    /// The outgoing side and the request stream it feeds.
    fn new(failure: Failure) -> (Out, mpsc::Receiver<SyncRequest>) {
        let (tx, rx) = mpsc::channel::<SyncRequest>(16);
        let sent = Arc::new(AtomicU64::new(0));
        (Out { tx, sent, failure }, rx)
    }

    /// Wraps and counts one message.
    fn wrap(&self, msg: sync_request::Msg) -> SyncRequest {
        let m = SyncRequest { msg: Some(msg) };
        self.sent
            .fetch_add(m.encoded_len() as u64, Ordering::Relaxed);
        m
    }

    pub(super) async fn send(&self, msg: sync_request::Msg) -> Result<(), SyncError> {
        let m = self.wrap(msg);
        if self.tx.send(m).await.is_err() {
            let f = self.failure.clone();
            return Err(tokio::task::spawn_blocking(move || failure_of(&f))
                .await
                .unwrap_or_else(|_| session_closed()));
        }
        Ok(())
    }

    /// For the blocking tasks that read files.
    pub(super) fn send_blocking(&self, msg: sync_request::Msg) -> Result<(), SyncError> {
        let m = self.wrap(msg);
        self.tx
            .blocking_send(m)
            .map_err(|_| failure_of(&self.failure))
    }
}

/// A live replication session with a receiver.
pub struct Session {
    pub(super) out: Out,
    pub(super) sigs: SigWaiters,
    events: mpsc::Receiver<Result<Event, SyncError>>,
    reader: tokio::task::JoinHandle<()>,
    /// The receiver's committed generation (at the hello, then after each commit).
    pub receiver_generation: Generation,
    /// The generation the next one follows: the receiver's, or the pair's newer one that this
    /// receiver joins (ARCHITECTURE.md, "Generations").
    pub after: Generation,
    pub receiver_root: [u8; 32],
    pub epoch: Epoch,
    /// The last file id handed out (ids match signatures and chunks to their file).
    pub(super) next_file: u32,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Session {
    /// A session whose hello was answered: starts the response reader.
    fn start(
        out: Out,
        inbound: tonic::Streaming<SyncResponse>,
        hello: &HelloReply,
        epoch: Epoch,
    ) -> Session {
        let sigs = Arc::new(Mutex::new(HashMap::new()));
        let (etx, erx) = mpsc::channel(16);
        let failure = out.failure.clone();
        let reader = tokio::spawn(read_responses(inbound, sigs.clone(), etx, failure));
        let mut root = [0u8; 32];
        if hello.root.len() == 32 {
            root.copy_from_slice(&hello.root);
        }
        Session {
            out,
            sigs,
            events: erx,
            reader,
            receiver_generation: Generation(hello.generation),
            after: Generation(hello.generation.max(hello.after)),
            receiver_root: root,
            epoch,
            next_file: 0,
        }
    }

    /// The next commit result or manifest chunk, or why the session ended.
    pub(super) async fn event(&mut self) -> Result<Event, SyncError> {
        match self.events.recv().await {
            Some(r) => r,
            None => Err(recorded(&self.out.failure)),
        }
    }

    /// A new file id.
    pub(super) fn file_id(&mut self) -> u32 {
        self.next_file += 1;
        self.next_file
    }

    /// Resolves when the receiver's side of the session has ended (it died, closed it, or the
    /// connection broke): an idle sender learns at once that it has no standby.
    pub async fn lost(&mut self) -> SyncError {
        if !self.reader.is_finished() {
            let _ = (&mut self.reader).await;
        }
        recorded(&self.out.failure)
    }

    pub fn bytes_sent(&self) -> u64 {
        self.out.sent.load(Ordering::Relaxed)
    }

    /// Ends the session cleanly: closes our side and waits (briefly) for the receiver's.
    pub async fn close(mut self) {
        let (closed, _) = mpsc::channel(1);
        self.out.tx = closed; // drops the live sender: the request stream ends
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), &mut self.reader).await;
    }
}

impl Sender {
    /// Opens a session and brings the index in line with the receiver's manifest.
    pub async fn open_session(&mut self, channel: Channel) -> Result<Session, SyncError> {
        if self.st.epoch.get() == Epoch(0) {
            self.raise_epoch(Epoch(1))?;
        }
        let (out, requests) = Out::new(Arc::new(Mutex::new(None)));
        out.send(sync_request::Msg::Hello(Hello {
            protocol: PROTOCOL,
            epoch: self.st.epoch.get().0,
            sender: self.opts.machine.clone(),
            generation: self.newest_generation().0,
        }))
        .await?;
        let (inbound, hello) =
            exchange_hello(channel, requests, self.opts.bandwidth.clone()).await?;
        not_fenced(&hello, self.st.epoch.get())?;
        let mut session = Session::start(out, inbound, &hello, self.st.epoch.get());
        self.reconcile(&mut session).await?;
        let mut f = self.figures.lock().expect("figures");
        f.connected = true;
        f.last_error = None;
        Ok(session)
    }
}

impl Sender {
    /// The newest generation this sender knows the pair reached: its index's, or the commit it
    /// sent and never saw acknowledged (a receiver since replaced may hold it). A new receiver
    /// numbers after it, so no number names two different states of the workspace.
    fn newest_generation(&self) -> Generation {
        let pending = self.pending.as_ref().map_or(0, |p| p.generation);
        Generation(self.st.manifest.generation.0.max(pending))
    }
}

/// Starts the stream (our hello is already queued on it) and reads the receiver's hello.
async fn exchange_hello(
    channel: Channel,
    requests: mpsc::Receiver<SyncRequest>,
    bandwidth: Option<Arc<crate::rate::RateLimit>>,
) -> Result<(tonic::Streaming<SyncResponse>, HelloReply), SyncError> {
    let mut client = ReplicaClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    // Each message waits for its bytes from the limit before it goes on the wire.
    let paced = ReceiverStream::new(requests).then(move |m| {
        let limit = bandwidth.clone();
        async move {
            if let Some(l) = limit {
                l.take(m.encoded_len() as u64).await;
            }
            m
        }
    });
    let resp = client
        .sync(paced)
        .await
        .map_err(|s| SyncError::from_status(&s))?;
    let mut inbound = resp.into_inner();
    match inbound.message().await {
        Ok(Some(SyncResponse {
            msg: Some(sync_response::Msg::Hello(h)),
        })) => Ok((inbound, h)),
        Ok(_) => Err(SyncError::Refused("receiver did not answer hello".into())),
        Err(s) => Err(SyncError::from_status(&s)),
    }
}

/// A receiver that has seen a newer epoch than ours: we are not the primary any more.
fn not_fenced(hello: &HelloReply, ours: Epoch) -> Result<(), SyncError> {
    if hello.epoch > ours.0 {
        return Err(SyncError::Fenced(format!(
            "receiver is at epoch {}, this sender at {ours}",
            hello.epoch
        )));
    }
    Ok(())
}

/// Connection helper: retries are the caller's business.
pub async fn connect(
    url: &str,
    tls: &crate::trust::tls::TlsMaterial,
    peer: crate::trust::tls::Expect,
) -> Result<Channel, SyncError> {
    let cfg = tls
        .client_config(peer)
        .map_err(|e| SyncError::Local(e.to_string()))?;
    crate::trust::tls::connect(url, cfg)
        .await
        .map_err(|e| SyncError::Connection(format!("{url}: {}", error_chain(&*e))))
}
