//! `coordinator versions` and `coordinator restore`: the coordinator asks the pair's CPU standby
//! for its history with its own certificate, and relays the answer (ARCHITECTURE.md, "History").
//! The standby checks the coordinator's identity like any reader's.

use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use super::Shared;
use crate::proto::history_client::HistoryClient;
use crate::proto::{FetchItem, FetchRequest, PairFetchRequest, PairVersionsRequest, VersionsReply};
use crate::trust::identity::Role;
use crate::trust::tls::{self, Expect};

/// Largest message relayed from a standby (its own limit).
const MAX_RELAYED: usize = 16 << 20;

impl Shared {
    /// A channel to `pair`'s CPU standby, which must be the machine the coordinator knows.
    async fn standby(&self, pair: &str) -> Result<HistoryClient<Channel>, Status> {
        let view = self
            .engine
            .list()
            .await?
            .into_iter()
            .find(|p| p.pair == pair)
            .ok_or_else(|| Status::not_found(format!("no pair {pair:?}")))?;
        let cpu = view.cpu.filter(|c| !c.address.is_empty()).ok_or_else(|| {
            Status::failed_precondition(format!(
                "pair {pair} has no CPU standby reporting an address now"
            ))
        })?;
        let expect = Expect::Exactly(crate::trust::identity::Identity::Node {
            pair: pair.to_string(),
            role: Role::Cpu,
            machine: cpu.machine.clone(),
        });
        let cfg = self
            .material
            .client_config(expect)
            .map_err(|e| Status::internal(e.to_string()))?;
        let channel = tls::connect(&cpu.address, cfg).await.map_err(|e| {
            Status::unavailable(format!(
                "the CPU standby {} at {} cannot be reached: {e:#}",
                cpu.machine, cpu.address
            ))
        })?;
        Ok(HistoryClient::new(channel).max_decoding_message_size(MAX_RELAYED))
    }

    pub(super) async fn versions(&self, r: PairVersionsRequest) -> Result<VersionsReply, Status> {
        let mut c = self.standby(&r.pair).await?;
        let req = crate::proto::VersionsRequest { path: r.path };
        Ok(c.versions(req).await?.into_inner())
    }

    pub(super) async fn fetch(
        &self,
        r: PairFetchRequest,
    ) -> Result<ReceiverStream<Result<FetchItem, Status>>, Status> {
        let mut c = self.standby(&r.pair).await?;
        let req = FetchRequest {
            snapshot: r.snapshot,
            path: r.path,
        };
        let upstream = c.fetch(req).await?.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(relay(upstream, tx));
        Ok(ReceiverStream::new(rx))
    }
}

/// Passes the standby's items on until either side ends.
async fn relay(
    mut upstream: Streaming<FetchItem>,
    tx: tokio::sync::mpsc::Sender<Result<FetchItem, Status>>,
) {
    loop {
        let item = upstream.message().await;
        let end = !matches!(item, Ok(Some(_)));
        let out = match item {
            Ok(Some(i)) => Ok(i),
            Ok(None) => return,
            Err(st) => Err(st),
        };
        if tx.send(out).await.is_err() || end {
            return;
        }
    }
}
