//! The `Admin` service: every call needs an admin certificate that has not expired
//! (ARCHITECTURE.md, "Trust"); at most four `Events` subscriptions per admin at once.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::AdminSvc;
use crate::control::engine::Engine;
use crate::control::failover::Input;
use crate::proto::admin_server::Admin;
use crate::proto::{
    ActionReply, Event, EventKind, EventsRequest, FetchItem, LeadershipReply, LeadershipRequest,
    ListPairsReply, ListPairsRequest, PairFetchRequest, PairRequest, PairVersionsRequest, PairView,
    RecoverRequest, StoreKind, VersionsReply,
};
use crate::trust::identity::Identity;
use crate::trust::quota::{Permit, Quota};
use crate::trust::tls;

/// A place in `quota` for `key`, or RESOURCE_EXHAUSTED naming what is limited.
fn take(quota: &Quota<String>, key: String, what: &str) -> Result<Permit<String>, Status> {
    quota.try_take(&key).ok_or_else(|| {
        tracing::warn!(identity = %key, limit = quota.limit(), "refused: too many {what}");
        Status::resource_exhausted(format!("{key} already has {} {what} open", quota.limit()))
    })
}

fn admin<T>(req: &Request<T>) -> Result<String, Status> {
    let peer = tls::peer_of(req)?;
    if peer.not_after_unix <= (crate::host::unix_ms_now() / 1000) as i64 {
        // Let through the handshake for renewal only (the coordinator's grace).
        return Err(Status::permission_denied(
            "your certificate has expired; admin calls need a valid admin certificate",
        ));
    }
    match peer.identity {
        Identity::Admin { name } => Ok(name),
        other => Err(Status::permission_denied(format!(
            "admin calls need an admin certificate; you are {other}"
        ))),
    }
}

#[tonic::async_trait]
impl Admin for AdminSvc {
    async fn create_pair(&self, req: Request<PairRequest>) -> Result<Response<PairView>, Status> {
        admin(&req)?;
        let s = self.0.shared()?;
        Ok(Response::new(
            s.engine.create(&req.into_inner().pair).await?,
        ))
    }

    async fn list_pairs(
        &self,
        req: Request<ListPairsRequest>,
    ) -> Result<Response<ListPairsReply>, Status> {
        admin(&req)?;
        let s = self.0.shared()?;
        Ok(Response::new(ListPairsReply {
            pairs: s.engine.list().await?,
        }))
    }

    async fn failover(&self, req: Request<PairRequest>) -> Result<Response<ActionReply>, Status> {
        let who = admin(&req)?;
        let s = self.0.shared()?;
        let pair = req.into_inner().pair;
        tracing::info!(%pair, admin = %who, "manual failover requested");
        Ok(Response::new(s.engine.failover(&pair).await?))
    }

    async fn recover(&self, req: Request<RecoverRequest>) -> Result<Response<ActionReply>, Status> {
        let who = admin(&req)?;
        let s = self.0.shared()?;
        let RecoverRequest { pair, from_backup } = req.into_inner();
        let input = match from_backup {
            None => Input::Recover,
            Some(pick) => {
                s.check_rebuild(&pick.snapshot)?;
                tracing::warn!(%pair, admin = %who, snapshot = %pick.snapshot, "rebuild from the off-site backup requested");
                Input::RecoverFromBackup {
                    snapshot: pick.snapshot,
                    now: std::time::Instant::now(),
                }
            }
        };
        Ok(Response::new(s.engine.manual(&pair, input).await?))
    }

    async fn hibernate(&self, req: Request<PairRequest>) -> Result<Response<ActionReply>, Status> {
        admin(&req)?;
        let s = self.0.shared()?;
        let pair = req.into_inner().pair;
        Ok(Response::new(
            s.engine.manual(&pair, Input::Hibernate).await?,
        ))
    }

    async fn wake(&self, req: Request<PairRequest>) -> Result<Response<ActionReply>, Status> {
        admin(&req)?;
        let s = self.0.shared()?;
        let pair = req.into_inner().pair;
        Ok(Response::new(s.engine.manual(&pair, Input::Wake).await?))
    }

    type EventsStream = ReceiverStream<Result<Event, Status>>;

    async fn events(
        &self,
        req: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let who = admin(&req)?;
        let s = self.0.shared()?;
        let slot = take(&s.subscriptions, who, "event subscriptions")?;
        let r = req.into_inner();
        let engine = s.engine.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let _slot = slot;
            forward_events(&engine, r, tx).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn versions(
        &self,
        req: Request<PairVersionsRequest>,
    ) -> Result<Response<VersionsReply>, Status> {
        admin(&req)?;
        let s = self.0.shared()?;
        Ok(Response::new(s.versions(req.into_inner()).await?))
    }

    async fn leadership(
        &self,
        req: Request<LeadershipRequest>,
    ) -> Result<Response<LeadershipReply>, Status> {
        admin(&req)?;
        // A follower answers from the shared state; it serves no pairs.
        let (store, pairs, follower) = match self.0.following_store() {
            Some(store) => (store, 0, true),
            None => {
                let s = self.0.shared()?;
                let pairs = u32::try_from(s.engine.metrics.pairs.get()).unwrap_or(0);
                (s.store.clone(), pairs, false)
            }
        };
        let found = tokio::task::spawn_blocking(move || store.coordinators())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(format!("asking etcd who leads: {e}")))?;
        let reply = match found {
            None => LeadershipReply {
                store: StoreKind::File.into(),
                pairs,
                ..Default::default()
            },
            Some(c) => LeadershipReply {
                store: StoreKind::Etcd.into(),
                leader: c.leader,
                term: c.term.max(0) as u64,
                members: c.members,
                etcd_endpoints: c.endpoints,
                pairs,
                follower,
            },
        };
        Ok(Response::new(reply))
    }

    type FetchStream = ReceiverStream<Result<FetchItem, Status>>;

    async fn fetch(
        &self,
        req: Request<PairFetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let who = admin(&req)?;
        let s = self.0.shared()?;
        let r = req.into_inner();
        tracing::info!(pair = %r.pair, admin = %who, path = %r.path, "restore from the standby's history");
        Ok(Response::new(s.fetch(r).await?))
    }
}

/// Sends the recent events, then (following) each new one, until the subscriber goes away.
async fn forward_events(
    engine: &Engine,
    r: EventsRequest,
    tx: mpsc::Sender<Result<Event, Status>>,
) {
    let (recent, mut live) = engine.events.subscribe();
    for e in recent {
        if (r.heartbeats || e.kind() != EventKind::Heartbeat) && tx.send(Ok(e)).await.is_err() {
            return;
        }
    }
    if !r.follow {
        return;
    }
    if r.heartbeats {
        engine.heartbeat_subscribers(1).await;
    }
    loop {
        // A subscriber that left is noticed even when no event comes (its place is given back).
        let next = tokio::select! {
            _ = tx.closed() => break,
            next = live.recv() => next,
        };
        let e = match next {
            Ok(e) if !r.heartbeats && e.kind() == EventKind::Heartbeat => continue,
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => Event {
                kind: EventKind::Warning.into(),
                message: format!("{n} events dropped: the subscriber was too slow"),
                ..Default::default()
            },
            Err(_) => break,
        };
        if tx.send(Ok(e)).await.is_err() {
            break;
        }
    }
    if r.heartbeats {
        engine.heartbeat_subscribers(-1).await;
    }
}
