//! The gRPC entry points: who may replicate or read status, and one task per session.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::Inner;
use super::admission::{Expected, admit_sender};
use super::session::{Admitted, run_session};
use crate::proto::replica_server::Replica;
use crate::proto::{ReplicaStatus, StatusRequest, SyncRequest, SyncResponse};
use crate::trust::identity::Identity;
use crate::trust::tls;

pub struct ReplicaService {
    inner: Arc<Inner>,
}

impl ReplicaService {
    pub(super) fn new(inner: Arc<Inner>) -> ReplicaService {
        ReplicaService { inner }
    }

    /// Only the expected sender replicates, with a certificate not revoked (a connection made
    /// before the revocation may still be up), and only while this agent accepts it. Returns
    /// whom it admitted (the session checks it again before every commit).
    fn admit(&self, peer: &tls::PeerInfo) -> Result<Expected, Status> {
        let expected = self.inner.expected.lock().expect("expected").clone();
        if let Err(r) = admit_sender(&expected, &peer.identity) {
            tracing::warn!(peer = %peer.identity, addr = ?peer.addr, expected = %expected.sender, "replication refused: not the expected sender");
            return Err(r.into());
        }
        if self.inner.deny.contains(&peer.serial) {
            tracing::warn!(peer = %peer.identity, serial = %peer.serial, "replication refused: revoked certificate");
            return Err(Status::permission_denied(format!(
                "the certificate of {} (serial {}) is revoked",
                peer.identity, peer.serial
            )));
        }
        if !self.inner.accepting.load(Ordering::SeqCst) {
            let epoch = self.inner.figures.lock().expect("figures").epoch;
            return Err(Status::unavailable(format!(
                "this agent does not accept replication now (it is a primary, or idle) at epoch {epoch}"
            )));
        }
        Ok(expected)
    }
}

/// The sender, its pair's other side, the coordinator and admins may read the figures.
pub(super) fn may_read(inner: &Inner, identity: &Identity) -> bool {
    inner.sender.accepts(identity)
        || matches!(identity, Identity::Admin { .. } | Identity::Coordinator)
        || identity.pair().is_some() && identity.pair() == inner.sender.pair()
}

#[tonic::async_trait]
impl Replica for ReplicaService {
    type SyncStream = ReceiverStream<Result<SyncResponse, Status>>;

    async fn sync(
        &self,
        req: Request<Streaming<SyncRequest>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let peer = tls::peer_of(&req)?;
        let expected = self.admit(&peer)?;
        let stream = req.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let inner = self.inner.clone();
        let id = inner.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        let span = tracing::info_span!("session", id, peer = ?peer.addr);
        let sender = Admitted {
            expected,
            identity: peer.identity,
            serial: peer.serial,
        };
        tokio::spawn(serve_session(inner, id, sender, stream, tx).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<ReplicaStatus>, Status> {
        let peer = tls::peer_of(&req)?;
        if !may_read(&self.inner, &peer.identity) {
            return Err(Status::permission_denied(format!(
                "{} may not read this replica's status",
                peer.identity
            )));
        }
        let f = self.inner.figures.lock().expect("figures").clone();
        Ok(Response::new(ReplicaStatus {
            epoch: f.epoch.0,
            generation: f.generation.0,
            root: f.root.to_vec(),
            entries: f.entries,
            bytes: f.bytes,
            session_active: f.session_active,
            last_data_age_ms: f
                .last_data
                .map(|t| t.elapsed().as_millis() as u64)
                .unwrap_or(0),
            last_commit_unix_ms: f
                .last_commit
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }))
    }
}

/// Runs one session to its end, reports how it ended (to the sender too), and gives up the
/// session slot if it still holds it.
async fn serve_session(
    inner: Arc<Inner>,
    id: u64,
    sender: Admitted,
    stream: Streaming<SyncRequest>,
    tx: mpsc::Sender<Result<SyncResponse, Status>>,
) {
    let out = tx.clone();
    match run_session(inner.clone(), id, sender, stream, tx).await {
        Ok(()) => tracing::info!("session closed by the sender"),
        Err(st) => {
            log_end(&st);
            let _ = out.send(Err(st)).await;
        }
    }
    let mut cur = inner.session.lock().expect("session lock");
    if cur.as_ref().is_some_and(|s| s.id == id) {
        *cur = None;
        inner.figures.lock().expect("figures").session_active = false;
    }
}

fn log_end(st: &Status) {
    match st.code() {
        tonic::Code::Cancelled => tracing::info!(why = st.message(), "session ended"),
        tonic::Code::Unknown | tonic::Code::Unavailable => {
            tracing::info!(error = st.message(), "sender disconnected")
        }
        _ => tracing::warn!(code = ?st.code(), error = st.message(), "session refused"),
    }
}
