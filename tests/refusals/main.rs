//! Refusals: each hostile or wrong input gets a clear error and leaves the replica intact.
//! A raw gRPC client (not the agent) speaks the protocol directly.

mod attrs;
#[path = "../common/mod.rs"]
mod common;
mod content;
mod identity;
#[path = "../raw/mod.rs"]
mod raw;

use std::fs;

use bytes::Bytes;
use common::*;
use raw::*;
use standby::proto::replica_server::{Replica, ReplicaServer};
use standby::proto::*;
use standby::replication::manifest::Manifest;
use standby::trust::identity::Role;
use standby::trust::tls::{self, TlsMaterial};
use standby::types::RelPath;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use standby::disk::epoch::EpochStore;
use standby::proto::coordinator_server::{Coordinator, CoordinatorServer};
use standby::trust::identity::Identity;
use standby::types::Epoch;

/// The durable epoch in an agent's state directory.
fn durable_epoch(state: &std::path::Path) -> u64 {
    EpochStore::open(state).unwrap().get().0
}

/// Raises the durable epoch in a state directory (as a coordinator's command would, or as an
/// attacker editing the file).
fn raise_epoch(state: &std::path::Path, e: u64) {
    EpochStore::open(state).unwrap().raise(Epoch(e)).unwrap();
}

/// A certificate for `machine` in the `pair`/`role` seat; returns its TLS directory.
fn machine_cert(pki: &Pki, pair: &str, role: Role, machine: &str) -> std::path::PathBuf {
    let out = pki.dir.path().join(format!("{pair}-{role}-{machine}"));
    if !out.exists() {
        let id = Identity::node(pair, role, machine).unwrap();
        pki.ca
            .issue(&id, standby::trust::pki::days(30), &[])
            .unwrap()
            .write_dir(&out)
            .unwrap();
    }
    out
}

/// The replica's status, read with the CPU's own certificate.
async fn replica_status(addr: &str, pki: &Pki) -> ReplicaStatus {
    let m = TlsMaterial::load(&pki.node("p", Role::Cpu)).unwrap();
    let cfg = m.client_config(tls::Expect::AnyIdentity).unwrap();
    let ch = tls::connect(addr, cfg).await.unwrap();
    replica_client::ReplicaClient::new(ch)
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// agent-cpu over the setup's replica, managed by the coordinator at `coord`.
fn start_managed_cpu(s: &Setup, coord: &str) -> Proc {
    let _ = fs::remove_file(s.cpu.state.join("listen.addr"));
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&s.cpu.log)
        .unwrap();
    let child = std::process::Command::new(AGENT_CPU)
        .arg("--workspace")
        .arg(&s.cpu.workspace)
        .arg("--state-dir")
        .arg(&s.cpu.state)
        .arg("--tls-dir")
        .arg(&s.cpu.tls)
        .args(["--listen", "127.0.0.1:0", "--coordinator", coord])
        .args(["--heartbeat-interval", "200ms"])
        .env("STANDBY_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

fn wait_listening(state: &std::path::Path) -> String {
    let f = state.join("listen.addr");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(a) = fs::read_to_string(&f)
            && !a.is_empty()
        {
            return a;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent-cpu did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A certificate for `id` valid from `from` to `to` seconds from now, into `out`.
fn cert_with_validity(pki: &Pki, id: &Identity, from: i64, to: i64, out: &std::path::Path) {
    let ca_pem = fs::read_to_string(pki.dir.path().join("ca/ca.pem")).unwrap();
    let ca_key = fs::read_to_string(pki.dir.path().join("ca/ca.key")).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.uri().try_into().unwrap())];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::seconds(from);
    p.not_after = now + time::Duration::seconds(to);
    p.use_authority_key_identifier_extension = true;
    let cert = p.signed_by(&key, &issuer).unwrap();
    standby::trust::pki::NodeCert {
        ca_pem,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
    .write_dir(out)
    .unwrap();
}

/// A coordinator that sends scripted commands on every heartbeat stream and keeps the reports.
#[derive(Clone, Default)]
struct FakeCoordinator {
    addr: String,
    commands: std::sync::Arc<std::sync::Mutex<Vec<Command>>>,
    reports: std::sync::Arc<std::sync::Mutex<Vec<AgentReport>>>,
    /// Lets client certificates expired this long ago through (as the coordinator does).
    expired_grace: Option<std::time::Duration>,
}

impl FakeCoordinator {
    async fn start(pki: &Pki) -> FakeCoordinator {
        FakeCoordinator::default().serve(pki).await
    }

    async fn serve(mut self, pki: &Pki) -> FakeCoordinator {
        let cert = pki
            .ca
            .issue(&Identity::Coordinator, standby::trust::pki::days(30), &[])
            .unwrap();
        let mut material = TlsMaterial::from_node_cert(&cert).unwrap();
        material.expired_grace = self.expired_grace;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.addr = listener.local_addr().unwrap().to_string();
        let fake = self;
        let token = tokio_util::sync::CancellationToken::new();
        let incoming = tls::incoming(listener, material.server_config().unwrap(), token);
        tokio::spawn(
            tls::server_builder()
                .add_service(CoordinatorServer::new(fake.clone()))
                .serve_with_incoming(incoming),
        );
        fake
    }

    fn push(&self, cmd: command::Cmd) {
        self.push_term(cmd, 0);
    }

    /// A command as a coordinator of `term` sends it (a highly available one's leader).
    fn push_term(&self, cmd: command::Cmd, term: u64) {
        self.commands.lock().unwrap().push(Command {
            cmd: Some(cmd),
            term,
        });
    }

    /// The CSR of the agent's renewal request number `n` (counting reports that carry one).
    async fn next_csr(&self, n: usize) -> String {
        let csrs = |reports: &Vec<AgentReport>| -> Vec<String> {
            reports
                .iter()
                .filter(|r| !r.csr_pem.is_empty())
                .map(|r| r.csr_pem.clone())
                .collect()
        };
        let what = format!("renewal request {n}");
        self.wait_report(|_| true, &what).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(c) = csrs(&self.reports.lock().unwrap()).get(n) {
                return c.clone();
            }
            assert!(std::time::Instant::now() < deadline, "{what} never came");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to 30 s) for a report that satisfies `ok`.
    async fn wait_report(&self, ok: impl Fn(&AgentReport) -> bool, what: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if self.reports.lock().unwrap().iter().any(&ok) {
                return;
            }
            let last = self.reports.lock().unwrap().last().cloned();
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: last report {last:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

#[tonic::async_trait]
impl Coordinator for FakeCoordinator {
    type HeartbeatStream = ReceiverStream<Result<Command, Status>>;

    async fn join(&self, _: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn heartbeat(
        &self,
        req: Request<Streaming<AgentReport>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let mut input = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let fake = self.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            loop {
                let next: Vec<Command> = fake.commands.lock().unwrap()[sent..].to_vec();
                for c in next {
                    if tx.send(Ok(c)).await.is_err() {
                        return;
                    }
                    sent += 1;
                }
                match tokio::time::timeout(std::time::Duration::from_millis(50), input.message())
                    .await
                {
                    Ok(Ok(Some(r))) => fake.reports.lock().unwrap().push(r),
                    Ok(_) => return,
                    Err(_) => {}
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
