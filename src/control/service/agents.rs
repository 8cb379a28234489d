//! The `Coordinator` service, the agents' side: `Join` (a single-use token for a certificate)
//! and `Heartbeat` (one stream per agent, [`super::heartbeat`]). ARCHITECTURE.md, "Trust".

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{CoordinatorSvc, Shared, heartbeat, side_of};
use crate::control::metrics::Refusal;
use crate::proto::coordinator_server::Coordinator;
use crate::proto::{AgentReport, Command, Event, EventKind, JoinReply, JoinRequest};
use crate::trust::identity::{Identity, Role};
use crate::trust::tls;
use crate::trust::token::{Token, TokenError};

#[tonic::async_trait]
impl Coordinator for CoordinatorSvc {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let addr = tls::remote_addr(&req);
        let r = req.into_inner();
        let role = match r.role() {
            crate::proto::Role::Gpu => Role::Gpu,
            crate::proto::Role::Cpu => Role::Cpu,
            crate::proto::Role::Unspecified => {
                return Err(Status::invalid_argument("join request without a role"));
            }
        };
        crate::trust::identity::check_name(&r.machine)
            .map_err(|e| Status::invalid_argument(format!("machine name: {e}")))?;
        let s = self.0.shared()?;
        let token = s.join_token(&r, role).await?;
        let id = Identity::node(&token.pair, role, &r.machine)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cert_pem = s.issue(&r.csr_pem, &id, &r.advertise).await?;
        s.engine
            .seated(&token.pair, side_of(role), &r.machine)
            .await?;
        s.engine.events.emit(Event {
            unix_ms: crate::host::unix_ms_now(),
            pair: token.pair.clone(),
            kind: EventKind::Joined.into(),
            message: format!("{} agent {} joined from {:?}", role, r.machine, addr),
            ..Default::default()
        });
        Ok(Response::new(JoinReply {
            ca_pem: s.ca.cert_pem().to_string(),
            cert_pem,
            pair: token.pair,
        }))
    }

    type HeartbeatStream = ReceiverStream<Result<Command, Status>>;

    async fn heartbeat(
        &self,
        req: Request<Streaming<AgentReport>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let peer = tls::peer_of(&req)?;
        let s = self.0.shared()?;
        let slot = s.heartbeats.take(&peer.identity.to_string());
        let observed = peer.addr.map(|a| a.ip());
        heartbeat::open(s, peer, observed, req.into_inner(), slot).await
    }
}

impl Shared {
    /// The join request's token, verified, bound to the joining machine, and used (durably,
    /// before any certificate is handed out).
    async fn join_token(&self, r: &JoinRequest, role: Role) -> Result<Token, Status> {
        let now = crate::host::unix_ms_now() / 1000;
        let token = Token::verify(&r.token, &self.token_key, &self.fingerprint, role, now)
            .map_err(|e| {
                let pair = Token::parse(&r.token)
                    .map(|(t, _)| t.pair)
                    .unwrap_or_default();
                self.refuse(&pair, Refusal::BadToken, format!("join refused: {e}"))
            })?;
        if let Err(e) = token.check_machine(&r.machine) {
            return Err(self.refuse(
                &token.pair,
                Refusal::WrongMachine,
                format!("join refused: {e}"),
            ));
        }
        let store = self.store.clone();
        let (nonce, exp) = (token.nonce.clone(), token.expires_unix);
        let first = tokio::task::spawn_blocking(move || store.use_token(&nonce, exp))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("recording the token: {e}")))?;
        if !first {
            let message = format!("join by {} refused: {}", r.machine, TokenError::Replayed);
            return Err(self.refuse(&token.pair, Refusal::TokenSpent, message));
        }
        Ok(token)
    }
}
