//! Refusals: each hostile or wrong input gets a clear error and leaves the replica intact.
//! A raw gRPC client (not the agent) speaks the protocol directly.

mod common;
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
        self.commands
            .lock()
            .unwrap()
            .push(Command { cmd: Some(cmd) });
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

#[tokio::test(flavor = "multi_thread")]
async fn another_pairs_certificate_is_refused() {
    let s = Setup::new();
    for tls_dir in [s.pki.node("other", Role::Gpu), s.pki.node("p", Role::Cpu)] {
        let e = raw(&s.cpu.addr, &tls_dir, 1)
            .await
            .err()
            .expect("must be refused");
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        assert!(e.message().contains("standby://pair/p/gpu"), "{e}");
    }
    // A certificate from another CA does not even get a TLS session.
    let other = Pki::new();
    let e = raw(&s.cpu.addr, &other.node("p", Role::Gpu), 1)
        .await
        .err()
        .expect("must be refused");
    assert_ne!(e.code(), Code::Ok);
    // And the real agent with another pair's certificate refuses to talk to this CPU.
    let out = once_raw(
        &s.t.path().join("src"),
        &s.t.path().join("g2"),
        &s.pki.node("other", Role::Gpu),
        &s.cpu.addr,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected standby://pair/other/cpu"), "{err}");
    s.assert_intact();
}

/// Issue 13 changed this test's premise: a hello used to raise the receiver's epoch; now epochs
/// come only from the coordinator, so a newer epoch is refused and the durable one stays.
#[tokio::test(flavor = "multi_thread")]
async fn stale_epoch_is_refused_durably() {
    let mut s = Setup::new();
    // A newer epoch in a hello is refused, and not persisted.
    let e = raw(&s.cpu.addr, &s.pki.node("p", Role::Gpu), 5)
        .await
        .err()
        .expect("ahead");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("epoch mismatch"), "{e}");
    assert_eq!(durable_epoch(&s.cpu.state), 1);
    // The coordinator raised it (as at a failover): it is durable across a restart.
    s.cpu.kill();
    raise_epoch(&s.cpu.state, 5);
    s.cpu.restart();
    let e = raw(&s.cpu.addr, &s.pki.node("p", Role::Gpu), 4)
        .await
        .err()
        .expect("stale");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("stale epoch 4 < 5"), "{e}");
    // The old primary (epoch 1) is fenced and says so, on one line.
    fs::write(
        s.t.path().join("src/new-after-failover"),
        b"must not arrive",
    )
    .unwrap();
    let out = once_raw(
        &s.t.path().join("src"),
        &s.t.path().join("gpu"),
        &s.pki.node("p", Role::Gpu),
        &s.cpu.addr,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fenced"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    fs::remove_file(s.t.path().join("src/new-after-failover")).unwrap();
    s.assert_intact();
    assert_eq!(durable_epoch(&s.cpu.state), 5);
}

/// The attack of issue 13: a former GPU, with its own valid certificate and an epoch file
/// edited to 1,000,000, connects to the CPU. Refused; the replica and its epoch unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_epoch_never_raises_the_receivers() {
    let s = Setup::new();
    let former = machine_cert(&s.pki, "p", Role::Gpu, "former-gpu");
    // The real GPU's session in progress is not interrupted by any of what follows.
    let mut real = raw(&s.cpu.addr, &s.pki.node("p", Role::Gpu), 1)
        .await
        .unwrap();
    for forged in [1_000_000, 2] {
        let e = raw(&s.cpu.addr, &former, forged)
            .await
            .err()
            .expect("ahead");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(
            e.message()
                .contains(&format!("sender is at epoch {forged}")),
            "{e}"
        );
        assert!(e.message().contains("only from the coordinator"), "{e}");
    }
    // A hello below the durable epoch is fenced.
    let e = raw(&s.cpu.addr, &former, 0).await.err().expect("stale");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("stale epoch 0 < 1"), "{e}");
    // The stock agent with an edited epoch file and a planted file.
    let src = s.t.path().join("src");
    let attacker_state = s.t.path().join("former-gpu");
    fs::create_dir_all(&attacker_state).unwrap();
    raise_epoch(&attacker_state, 1_000_000);
    fs::write(src.join("planted.txt"), b"from the former host").unwrap();
    let out = once_raw(&src, &attacker_state, &former, &s.cpu.addr);
    assert!(!out.status.success(), "the forged epoch must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("epoch mismatch"), "{err}");
    real.send(sync_request::Msg::Manifest(ManifestRequest {}))
        .await;
    match real.recv().await {
        Ok(sync_response::Msg::Manifest(m)) => assert_eq!(m.generation, real.hello.generation),
        other => panic!("the real session was disturbed: {other:?}"),
    }
    drop(real);
    assert!(!s.cpu.workspace.join("planted.txt").exists());
    fs::remove_file(src.join("planted.txt")).unwrap();
    assert_eq!(durable_epoch(&s.cpu.state), 1);
    assert_eq!(replica_status(&s.cpu.addr, &s.pki).await.epoch, 1);
    s.assert_intact();
    // The real GPU keeps replicating.
    fs::write(src.join("after.txt"), b"the real gpu").unwrap();
    once(
        &src,
        &s.t.path().join("gpu"),
        &s.pki.node("p", Role::Gpu),
        &s.cpu.addr,
    );
    assert_same(&src, &s.cpu.workspace);
}

/// A CPU managed by a (fake) coordinator: only the machine its last `Receive` named, at that
/// epoch; a stale command is refused and reported; a revocation ends the session at once.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_machine_the_coordinator_named_may_send() {
    let mut s = Setup::new();
    let coord = FakeCoordinator::start(&s.pki).await;
    s.cpu.kill();
    let _cpu = start_managed_cpu(&s, &coord.addr);
    coord.push(command::Cmd::Receive(Receive {
        epoch: 2,
        peer: "gpu-new".into(),
    }));
    coord
        .wait_report(|r| r.epoch == 2, "the CPU at epoch 2")
        .await;
    let addr = wait_listening(&s.cpu.state);
    // The former GPU (machine "gpu", the seat's old certificate) is refused at any epoch.
    for epoch in [1, 2, 3] {
        let e = raw(&addr, &s.pki.node("p", Role::Gpu), epoch)
            .await
            .err()
            .expect("another machine of the seat");
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        assert!(e.message().contains("standby://pair/p/gpu/gpu-new"), "{e}");
    }
    // The named machine, at the named epoch only.
    let new = machine_cert(&s.pki, "p", Role::Gpu, "gpu-new");
    let e = raw(&addr, &new, 3).await.err().expect("ahead");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let mut r = raw(&addr, &new, 2).await.unwrap();
    assert_eq!(r.hello.epoch, 2);
    // A command from before a failover is refused, reported, and changes nothing.
    coord.push(command::Cmd::Receive(Receive {
        epoch: 1,
        peer: "gpu".into(),
    }));
    coord
        .wait_report(
            |rep| {
                rep.last_error
                    .contains("refused Receive at epoch 1: this agent is at epoch 2")
            },
            "the stale command reported",
        )
        .await;
    // Revoked mid-session: the session ends, and no new one opens.
    coord.push(command::Cmd::Revocations(Revocations {
        serials: vec![TlsMaterial::load(&new).unwrap().facts().serial],
    }));
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), r.recv())
        .await
        .expect("a revoked sender's session must end within a heartbeat");
    assert!(ended.is_err(), "{ended:?}");
    assert!(raw(&addr, &new, 2).await.is_err());
    let saved = standby::trust::revocation::DenyList::load(&s.cpu.state.join("revoked")).unwrap();
    assert_eq!(saved.serials().len(), 1);
    assert_eq!(durable_epoch(&s.cpu.state), 2);
    s.assert_intact();
}

/// An agent whose certificate expired while the coordinator was away: it still dials the
/// coordinator (which lets such a connection renew), asks with a new key, refuses a certificate
/// for another machine, takes its own (written where it was loaded from) and serves with it.
#[tokio::test(flavor = "multi_thread")]
async fn an_expired_certificate_is_renewed_over_the_heartbeat_stream() {
    let mut s = Setup::new();
    let coord = FakeCoordinator {
        expired_grace: Some(std::time::Duration::from_secs(30 * 86_400)),
        ..Default::default()
    }
    .serve(&s.pki)
    .await;
    let id = Identity::node("p", Role::Cpu, "cpu").unwrap();
    let dir = s.t.path().join("expired-tls");
    cert_with_validity(&s.pki, &id, -7200, -60, &dir);
    let expired = TlsMaterial::load(&dir).unwrap().facts();
    s.cpu.kill();
    s.cpu.tls = dir.clone();
    let _cpu = start_managed_cpu(&s, &coord.addr);
    let addr = wait_listening(&s.cpu.state);
    let gtls = s.pki.node("p", Role::Gpu);
    // Agent to agent stays strict: nobody takes the expired certificate.
    assert!(raw(&addr, &gtls, 1).await.is_err());
    let csr = coord.next_csr(0).await;
    // A certificate for another machine is refused; the agent asks again.
    let other = Identity::node("p", Role::Cpu, "someone-else").unwrap();
    coord.push(command::Cmd::Renewed(Renewed {
        cert_pem: s
            .pki
            .ca
            .sign_csr(&csr, &other, standby::trust::pki::days(30), &[])
            .unwrap(),
    }));
    let csr = coord.next_csr(1).await;
    assert_eq!(TlsMaterial::load(&dir).unwrap().facts(), expired);
    let good = s
        .pki
        .ca
        .sign_csr(&csr, &id, standby::trust::pki::days(30), &[])
        .unwrap();
    coord.push(command::Cmd::Renewed(Renewed {
        cert_pem: good.clone(),
    }));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while fs::read_to_string(dir.join("node.pem")).unwrap() != good {
        assert!(std::time::Instant::now() < deadline, "not renewed on disk");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!dir.join("node.pem.next").exists() && !dir.join("node.key.next").exists());
    // Served with the new certificate from the next handshake on.
    let r = raw(&addr, &gtls, 1)
        .await
        .expect("the renewed certificate is presented");
    assert_eq!(r.hello.epoch, 1);
    drop(r);
    s.assert_intact();
}

#[tokio::test(flavor = "multi_thread")]
async fn traversal_and_absolute_paths_are_refused() {
    let s = Setup::new();
    let gtls = s.pki.node("p", Role::Gpu);
    let escape = format!("{}/x", s.outside.display());
    let bad: Vec<Vec<u8>> = vec![
        b"../x".to_vec(),
        b"d/../../x".to_vec(),
        escape.as_bytes().to_vec(),
        b"d/\0x".to_vec(),
        b"".to_vec(),
        b"d//x".to_vec(),
        b".standby-stage/x".to_vec(),
    ];
    for p in bad {
        let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
        r.begin().await;
        r.send(sync_request::Msg::Ops(Ops {
            ops: vec![inline(&p, b"evil")],
        }))
        .await;
        let e = r.recv().await.expect_err("refused");
        assert_eq!(
            e.code(),
            Code::InvalidArgument,
            "{:?}: {e}",
            String::from_utf8_lossy(&p)
        );
        assert!(e.message().contains("refused"), "{e}");
    }
    // Through a committed symlink that points outside: refused at commit, nothing written.
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    let g = r.begin().await;
    r.send(sync_request::Msg::Ops(Ops {
        ops: vec![inline(b"escape/evil", b"evil")],
    }))
    .await;
    let mut m = Manifest::new();
    m.insert(
        RelPath::new("escape/evil").unwrap(),
        file_entry(b"evil", 0o644),
    );
    r.send(sync_request::Msg::Commit(Commit {
        generation: g,
        root: m.root().to_vec().into(),
    }))
    .await;
    let e = r.recv().await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("not a directory"), "{e}");
    drop(r);
    s.assert_intact();
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupted_content_is_caught_and_never_committed() {
    let s = Setup::new();
    let gtls = s.pki.node("p", Role::Gpu);
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    let g = r.begin().await;
    // 1. Inline content that does not match its declared blake3.
    let mut op = inline(b"d/f.txt", b"new content");
    if let Some(op::Change::Upsert(u)) = &mut op.change {
        u.content = Some(upsert::Content::Inline(Bytes::from_static(b"NEW CONTENT")));
    }
    // 2. A delta whose bytes were corrupted in flight.
    r.send(sync_request::Msg::Sig(SigRequest {
        file: 7,
        path: "big.bin".into(),
        block_size: 4096,
    }))
    .await;
    loop {
        match r.recv().await.unwrap() {
            sync_response::Msg::Signature(sig) if sig.last => break,
            sync_response::Msg::Signature(_) => {}
            other => panic!("{other:?}"),
        }
    }
    let new = vec![4u8; 300_000];
    let mut stream = Op {
        path: "big.bin".into(),
        change: Some(op::Change::Upsert(Upsert {
            entry: Some(file_entry(&new, 0o644)),
            content: Some(upsert::Content::Stream(7)),
            zstd: false,
            delta: true,
        })),
    };
    if let Some(op::Change::Upsert(u)) = &mut stream.change {
        u.entry.as_mut().unwrap().blake3 = Bytes::new();
    }
    r.send(sync_request::Msg::Ops(Ops {
        ops: vec![op, stream],
    }))
    .await;
    r.send(sync_request::Msg::Chunk(Chunk {
        file: 7,
        len: new.len() as u32,
        data: Some(chunk::Data::Delta(Bytes::from_static(
            b"\x72\x73\x02\x36garbage-delta",
        ))),
    }))
    .await;
    r.send(sync_request::Msg::End(FileEnd {
        file: 7,
        aborted: false,
        blake3: blake3::hash(&new).as_bytes().to_vec().into(),
        size: new.len() as u64,
    }))
    .await;
    // 3. A literal stream whose declared hash is wrong.
    let lit = b"streamed but wrong".to_vec();
    r.send(sync_request::Msg::Ops(Ops {
        ops: vec![Op {
            path: "d/streamed".into(),
            change: Some(op::Change::Upsert(Upsert {
                entry: Some(file_entry(&lit, 0o600)),
                content: Some(upsert::Content::Stream(8)),
                zstd: false,
                delta: false,
            })),
        }],
    }))
    .await;
    r.send(sync_request::Msg::Chunk(Chunk {
        file: 8,
        len: lit.len() as u32,
        data: Some(chunk::Data::Literal(lit.clone().into())),
    }))
    .await;
    r.send(sync_request::Msg::End(FileEnd {
        file: 8,
        aborted: false,
        blake3: vec![0u8; 32].into(),
        size: lit.len() as u64,
    }))
    .await;

    // Committing asks for all three again, whole; nothing is committed, twice over.
    for _ in 0..2 {
        r.send(sync_request::Msg::Commit(Commit {
            generation: g,
            root: vec![0u8; 32].into(),
        }))
        .await;
        match r.recv().await.unwrap() {
            sync_response::Msg::Commit(c) => {
                assert!(!c.committed);
                let mut retry: Vec<String> = c
                    .retry
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
                retry.sort();
                assert_eq!(retry, ["big.bin", "d/f.txt", "d/streamed"]);
            }
            other => panic!("{other:?}"),
        }
    }
    drop(r);
    s.assert_intact();
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_root_and_bad_signature_requests_are_refused() {
    let s = Setup::new();
    let gtls = s.pki.node("p", Role::Gpu);
    // A valid change committed under a root that does not match what it would produce.
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    let g = r.begin().await;
    r.send(sync_request::Msg::Ops(Ops {
        ops: vec![inline(b"d/new", b"fine")],
    }))
    .await;
    r.send(sync_request::Msg::Commit(Commit {
        generation: g,
        root: vec![9u8; 32].into(),
    }))
    .await;
    let e = r.recv().await.expect_err("refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("root mismatch"), "{e}");
    // A signature request with block size 0 (fast_rsync would panic on it).
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    r.begin().await;
    r.send(sync_request::Msg::Sig(SigRequest {
        file: 1,
        path: "big.bin".into(),
        block_size: 0,
    }))
    .await;
    let e = r.recv().await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("block size 0"), "{e}");
    // Out of order: a commit with no generation, a generation that skips one.
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    r.send(sync_request::Msg::Commit(Commit {
        generation: 9,
        root: vec![].into(),
    }))
    .await;
    assert_eq!(r.recv().await.err().unwrap().code(), Code::InvalidArgument);
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    let next = r.hello.generation + 2;
    r.send(sync_request::Msg::Begin(Begin { generation: next }))
        .await;
    assert_eq!(
        r.recv().await.err().unwrap().code(),
        Code::FailedPrecondition
    );
    drop(r);
    s.assert_intact();
    // The receiver is still healthy: the real sender goes on.
    fs::write(s.t.path().join("src/after.txt"), b"still works").unwrap();
    once(
        &s.t.path().join("src"),
        &s.t.path().join("gpu"),
        &gtls,
        &s.cpu.addr,
    );
    assert_same(&s.t.path().join("src"), &s.cpu.workspace);
}

/// A receiver that answers every signature request with a block size of 0.
struct EvilReceiver {
    manifest: Manifest,
}

#[tonic::async_trait]
impl Replica for EvilReceiver {
    type SyncStream = ReceiverStream<Result<SyncResponse, Status>>;
    async fn sync(
        &self,
        req: Request<Streaming<SyncRequest>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let mut input = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let m = self.manifest.clone();
        tokio::spawn(async move {
            let reply = |msg| Ok(SyncResponse { msg: Some(msg) });
            while let Ok(Some(req)) = input.message().await {
                let out = match req.msg {
                    Some(sync_request::Msg::Hello(_)) => {
                        reply(sync_response::Msg::Hello(HelloReply {
                            protocol: standby::replication::receive::PROTOCOL,
                            epoch: 1,
                            generation: 1,
                            root: m.root().to_vec().into(),
                            entries: m.len() as u64,
                        }))
                    }
                    Some(sync_request::Msg::Manifest(_)) => {
                        reply(sync_response::Msg::Manifest(ManifestChunk {
                            generation: 1,
                            root: m.root().to_vec().into(),
                            items: m
                                .iter()
                                .map(|(p, e)| ManifestItem {
                                    path: p.as_bytes().to_vec().into(),
                                    entry: Some(e.clone()),
                                })
                                .collect(),
                            last: true,
                        }))
                    }
                    Some(sync_request::Msg::Sig(s)) => {
                        let mut sig = Vec::new();
                        sig.extend_from_slice(&0x7273_0136u32.to_be_bytes());
                        sig.extend_from_slice(&0u32.to_be_bytes()); // block size 0
                        sig.extend_from_slice(&16u32.to_be_bytes());
                        sig.extend_from_slice(&[0u8; 20]);
                        reply(sync_response::Msg::Signature(Signature {
                            file: s.file,
                            base_size: 600_000,
                            data: sig.into(),
                            last: true,
                            missing: false,
                        }))
                    }
                    _ => continue,
                };
                if tx.send(out).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<ReplicaStatus>, Status> {
        Err(Status::unimplemented("evil"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sender_refuses_a_signature_with_block_size_zero() {
    let pki = Pki::new();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("big.bin"), vec![1u8; 600_000]).unwrap();
    // The evil receiver claims to hold an older big.bin, so the sender asks for its signature.
    let mut m = Manifest::new();
    m.insert(
        RelPath::new("big.bin").unwrap(),
        file_entry(&vec![2u8; 600_000], 0o644),
    );
    let material = TlsMaterial::load(&pki.node("p", Role::Cpu)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let token = tokio_util::sync::CancellationToken::new();
    let incoming = tls::incoming(listener, material.server_config().unwrap(), token.clone());
    let server = tokio::spawn(
        tls::server_builder()
            .add_service(ReplicaServer::new(EvilReceiver { manifest: m }))
            .serve_with_incoming_shutdown(incoming, token.clone().cancelled_owned()),
    );
    let gtls = pki.node("p", Role::Gpu);
    let gst = t.path().join("gpu");
    let out = tokio::task::spawn_blocking(move || once_raw(&src, &gst, &gtls, &addr))
        .await
        .unwrap();
    token.cancel();
    let _ = server.await;
    assert_eq!(out.status.code(), Some(1), "must fail cleanly, not crash");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("signature refused: block size 0"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn full_disk_fails_the_generation_and_keeps_the_last_one() {
    if !privileged("full_disk_fails_the_generation_and_keeps_the_last_one") {
        return;
    }
    let pki = Pki::new();
    let t = tempfile::tempdir().unwrap();
    let fsdir = t.path().join("small-fs");
    fs::create_dir(&fsdir).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&fsdir)
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs failed");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(fsdir.clone());
    let src = t.path().join("src");
    let mut rng = rng(seed("full_disk"));
    make_tree(&src, &mut rng, 200, &[4 << 20]);
    let mut cpu = Cpu::start(
        &fsdir.join("replica"),
        &fsdir.join("cpu"),
        &pki.node("p", Role::Cpu),
    );
    let gtls = pki.node("p", Role::Gpu);
    let gst = t.path().join("gpu");
    once(&src, &gst, &gtls, &cpu.addr);
    let before = snapshot(&cpu.workspace);

    write_big(&src.join("data/huge.bin"), &mut rng, 40 << 20);
    fs::write(src.join("also-new.txt"), b"part of the failed generation").unwrap();
    let out = once_raw(&src, &gst, &gtls, &cpu.addr);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("disk full"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        diff(&before, &snapshot(&cpu.workspace)).is_empty(),
        "the last generation must stay intact"
    );
    // After a restart the replica is still the last good generation, and the stage is empty.
    cpu.restart();
    assert!(diff(&before, &snapshot(&cpu.workspace)).is_empty());
    assert_eq!(staged_files(&cpu.state.join("stage")), 0);
    // Once there is room again, replication goes on.
    fs::remove_file(src.join("data/huge.bin")).unwrap();
    once(&src, &gst, &gtls, &cpu.addr);
    assert_same(&src, &cpu.workspace);
}
