//! One agent's heartbeat stream, as the service sees it (ARCHITECTURE.md, "Trust"): reports go
//! to the engine only while they speak for the certificate's own machine; the coordinator's
//! revocation list is pushed when the stream opens and whenever it changes, and the stream ends
//! at once when its own certificate is revoked; a CSR in a report is answered with `Renewed`.
//!
//! A certificate that expired within the renewal grace (let through the handshake so that an
//! agent outliving a long coordinator outage is not stranded) gets a stream that does nothing
//! but renew: its reports are not listened to, only their `csr_pem`.

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status, Streaming};

use super::{Shared, side_of};
use crate::control::metrics::Refusal;
use crate::proto::{AgentReport, Command, Renewed, Revocations, command};
use crate::trust::identity::{Identity, Role};
use crate::trust::quota::Turn;
use crate::trust::tls::PeerInfo;
use crate::types::Side;

type Tx = mpsc::Sender<Result<Command, Status>>;

/// Who is on a heartbeat stream, and what it may do.
struct Stream {
    pair: String,
    role: Role,
    machine: String,
    serial: String,
    /// The engine connection (None: expired, renewal only).
    conn: Option<u64>,
    observed: Option<IpAddr>,
}

impl Stream {
    fn side(&self) -> Side {
        side_of(self.role)
    }

    fn identity(&self) -> Identity {
        Identity::Node {
            pair: self.pair.clone(),
            role: self.role,
            machine: self.machine.clone(),
        }
    }
}

/// Opens a heartbeat stream for `peer`.
pub(super) async fn open(
    s: Arc<Shared>,
    peer: PeerInfo,
    observed: Option<IpAddr>,
    inbound: Streaming<AgentReport>,
    slot: Turn<String>,
) -> Result<Response<ReceiverStream<Result<Command, Status>>>, Status> {
    let Identity::Node {
        pair,
        role,
        machine,
    } = peer.identity.clone()
    else {
        return Err(Status::permission_denied(
            "heartbeats need a pair certificate",
        ));
    };
    if s.registry.is_revoked(&peer.serial) {
        // Revoked after this connection's handshake: its streams end, new ones are refused.
        let message = format!(
            "certificate {} of {} is revoked",
            peer.serial, peer.identity
        );
        return Err(s.refuse(&pair, Refusal::Revoked, message));
    }
    let expired = peer.not_after_unix <= (crate::host::unix_ms_now() / 1000) as i64;
    let (tx, rx) = mpsc::channel(16);
    let mut st = Stream {
        pair,
        role,
        machine,
        serial: peer.serial,
        conn: None,
        observed,
    };
    if !expired {
        let conn = s.engine.next_conn();
        s.engine.connect(&st.pair, conn, tx.clone()).await?;
        st.conn = Some(conn);
        offer_backup(&s, &st, &tx);
    } else {
        tracing::info!(identity = %st.identity(), "an expired certificate connected: renewal only");
    }
    // While the engine holds the stream, it alone keeps it open (a connection it replaced ends);
    // a renewal-only stream is kept open here.
    let keep = st.conn.is_none().then(|| tx.clone());
    tokio::spawn(run(s, st, inbound, tx.downgrade(), (keep, slot)));
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// The stream until the agent goes, its report names another machine, or its certificate is
/// revoked.
async fn run(
    s: Arc<Shared>,
    st: Stream,
    mut inbound: Streaming<AgentReport>,
    weak: mpsc::WeakSender<Result<Command, Status>>,
    // The sender kept for a renewal-only stream, and the stream's place among its identity's
    // streams: both held until the stream ends.
    held: (Option<Tx>, Turn<String>),
) {
    let mut revs = s.registry.subscribe();
    revs.mark_changed(); // the list goes out as the stream opens
    loop {
        tokio::select! {
            m = inbound.message() => {
                let Ok(Some(r)) = m else { break };
                let Some(tx) = weak.upgrade() else { break };
                if let Err(e) = on_report(&s, &st, r, &tx).await {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            }
            changed = revs.changed() => {
                let Some(tx) = weak.upgrade() else { break };
                if changed.is_err() || !push_revocations(&s, &st, &mut revs, &tx).await {
                    break;
                }
            }
            _ = held.1.ended() => {
                tracing::info!(identity = %st.identity(), "a newer heartbeat stream of the same certificate ended this one");
                if let Some(tx) = weak.upgrade() {
                    let _ = tx.send(Err(Status::resource_exhausted(
                        "ended: a newer heartbeat stream of the same certificate took its place",
                    ))).await;
                }
                break;
            }
        }
    }
    if let Some(conn) = st.conn {
        s.engine.disconnect(&st.pair, st.side(), conn).await;
    }
}

/// One report: a renewal request is answered; the rest goes to the engine (not from an expired
/// certificate). An error ends the stream with it.
async fn on_report(s: &Shared, st: &Stream, r: AgentReport, tx: &Tx) -> Result<(), Status> {
    // Nothing of a report over its limits is stored or used; the stream ends.
    if let Err(e) = crate::control::wire::check_report(&r) {
        tracing::warn!(pair = %st.pair, side = st.side().as_str(), error = %e, "report refused");
        return Err(Status::invalid_argument(e.to_string()));
    }
    if r.machine != st.machine {
        let message = format!(
            "a heartbeat from {} says it is machine {:?}",
            st.identity(),
            r.machine
        );
        return Err(s.refuse(&st.pair, Refusal::WrongMachine, message));
    }
    if !r.csr_pem.is_empty() {
        renew(s, st, &r.csr_pem, &r.advertise, tx).await?;
    }
    let Some(conn) = st.conn else {
        return Ok(()); // renewal only
    };
    s.engine
        .report(&st.pair, st.side(), conn, r, st.observed)
        .await
}

/// Tells a CPU standby where its pair's history is backed up (its own prefix in the fleet's
/// bucket), with its pair's own key (derived from the coordinator's: another pair's objects stay
/// sealed to it) and the bucket's access key: only ever on a CPU certificate's stream.
fn offer_backup(s: &Shared, st: &Stream, tx: &Tx) {
    let (Some((b, key)), Role::Cpu) = (&s.backup, st.role) else {
        return;
    };
    let mut target = b.clone();
    target.url = format!("{}/{}", target.url, st.pair);
    target.key_hex = key.for_pair(&st.pair).to_hex();
    let cmd = Command {
        cmd: Some(command::Cmd::Backup(target)),
        term: s.store.term(),
    };
    if tx.try_send(Ok(cmd)).is_err() {
        tracing::warn!(pair = %st.pair, "the backup target could not be queued for the standby");
    }
}

/// Sends the current revocation list; false (after telling the agent why) when this stream's
/// own certificate is on it.
async fn push_revocations(
    s: &Shared,
    st: &Stream,
    revs: &mut watch::Receiver<u64>,
    tx: &Tx,
) -> bool {
    revs.mark_unchanged();
    if s.registry.is_revoked(&st.serial) {
        let message = format!("certificate {} of {} was revoked", st.serial, st.identity());
        let _ = tx
            .send(Err(s.refuse(&st.pair, Refusal::Revoked, message)))
            .await;
        return false;
    }
    let serials = s.registry.revoked();
    let cmd = Command {
        cmd: Some(command::Cmd::Revocations(Revocations { serials })),
        term: s.store.term(),
    };
    tx.send(Ok(cmd)).await.is_ok()
}

/// Signs a renewal for the same identity if the certificate is not revoked and its machine
/// still holds its seat (or is the attempt being provisioned for it).
async fn renew(
    s: &Shared,
    st: &Stream,
    csr_pem: &str,
    advertise: &str,
    tx: &Tx,
) -> Result<(), Status> {
    if s.registry.is_revoked(&st.serial) {
        let message = format!("renewal refused: certificate {} is revoked", st.serial);
        return Err(s.refuse(&st.pair, Refusal::Revoked, message));
    }
    if !s
        .engine
        .holds_seat(&st.pair, st.side(), &st.machine)
        .await?
    {
        let message = format!(
            "renewal refused: {} does not hold its seat any more",
            st.identity()
        );
        return Err(s.refuse(&st.pair, Refusal::NotSeated, message));
    }
    let cert_pem = s.issue(csr_pem, &st.identity(), advertise).await?;
    tracing::info!(identity = %st.identity(), "certificate renewed");
    let cmd = Command {
        cmd: Some(command::Cmd::Renewed(Renewed { cert_pem })),
        term: s.store.term(),
    };
    tx.send(Ok(cmd))
        .await
        .map_err(|_| Status::cancelled("the stream closed"))
}
