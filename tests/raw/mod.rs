//! A raw client of the replication protocol (not the agent), and a replica to aim it at: a real
//! agent-cpu on loopback holding a small committed tree, spoken to over mTLS.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use standby::proto::replica_client::ReplicaClient;
use standby::proto::*;
use standby::replication::manifest::Kind;
use standby::trust::identity::Role;
use standby::trust::tls::{self, Expect, TlsMaterial};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::common::*;

pub struct Raw {
    pub tx: mpsc::Sender<SyncRequest>,
    pub rx: Streaming<SyncResponse>,
    pub hello: HelloReply,
}

impl Raw {
    pub async fn send(&self, m: sync_request::Msg) {
        let _ = self.tx.send(SyncRequest { msg: Some(m) }).await;
    }
    pub async fn recv(&mut self) -> Result<sync_response::Msg, Status> {
        match self.rx.message().await? {
            Some(SyncResponse { msg: Some(m) }) => Ok(m),
            _ => Err(Status::unknown("stream ended")),
        }
    }
    /// Begins the generation the receiver expects (after the one its hello says the session
    /// follows).
    pub async fn begin(&self) -> u64 {
        let g = self.hello.generation.max(self.hello.after) + 1;
        self.send(sync_request::Msg::Begin(Begin { generation: g }))
            .await;
        g
    }
}

pub async fn raw(addr: &str, tls_dir: &Path, epoch: u64) -> Result<Raw, Status> {
    raw_from(addr, tls_dir, epoch, 0).await
}

/// A session whose hello says the sender knows the pair at `generation`.
pub async fn raw_from(
    addr: &str,
    tls_dir: &Path,
    epoch: u64,
    generation: u64,
) -> Result<Raw, Status> {
    let m = TlsMaterial::load(tls_dir).unwrap();
    let ch = tls::connect(addr, m.client_config(Expect::AnyIdentity).unwrap())
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    raw_on_from(ch, epoch, generation).await
}

/// A session on a channel the caller built (and may cut).
pub async fn raw_on(ch: tonic::transport::Channel, epoch: u64) -> Result<Raw, Status> {
    raw_on_from(ch, epoch, 0).await
}

async fn raw_on_from(
    ch: tonic::transport::Channel,
    epoch: u64,
    generation: u64,
) -> Result<Raw, Status> {
    let mut c = ReplicaClient::new(ch);
    let (tx, rx) = mpsc::channel(16);
    tx.send(SyncRequest {
        msg: Some(sync_request::Msg::Hello(Hello {
            protocol: standby::replication::receive::PROTOCOL,
            epoch,
            sender: "raw".into(),
            generation,
        })),
    })
    .await
    .unwrap();
    let mut rx = c.sync(ReceiverStream::new(rx)).await?.into_inner();
    let hello = match rx.message().await? {
        Some(SyncResponse {
            msg: Some(sync_response::Msg::Hello(h)),
        }) => h,
        other => panic!("no hello: {other:?}"),
    };
    Ok(Raw { tx, rx, hello })
}

pub fn file_entry(data: &[u8], mode: u32) -> Entry {
    Entry {
        kind: Kind::File.to_proto(),
        mode,
        mtime_ns: 1_700_000_000_000_000_000,
        size: data.len() as u64,
        blake3: blake3::hash(data).as_bytes().to_vec(),
        ..Default::default()
    }
}

pub fn inline(path: &[u8], data: &[u8]) -> Op {
    Op {
        path: path.to_vec(),
        change: Some(op::Change::Upsert(Upsert {
            entry: Some(file_entry(data, 0o644)),
            content: Some(upsert::Content::Inline(Bytes::copy_from_slice(data))),
            zstd: false,
            delta: false,
            base_blake3: Vec::new(),
        })),
    }
}

/// A pair with a replica holding a small tree, and a directory outside it that must stay empty.
pub struct Setup {
    pub pki: Pki,
    pub t: tempfile::TempDir,
    pub cpu: Cpu,
    pub outside: PathBuf,
}

impl Setup {
    pub fn new() -> Setup {
        Self::with_big(300_000)
    }

    /// The same tree with `big.bin` of `big` bytes.
    pub fn with_big(big: usize) -> Setup {
        let pki = Pki::new();
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("d")).unwrap();
        fs::write(src.join("d/f.txt"), b"committed content").unwrap();
        fs::write(src.join("big.bin"), vec![3u8; big]).unwrap();
        std::os::unix::fs::symlink(&outside, src.join("escape")).unwrap();
        let cpu = Cpu::start(
            &t.path().join("replica"),
            &t.path().join("cpu"),
            &pki.node("p", Role::Cpu),
        );
        once(
            &src,
            &t.path().join("gpu"),
            &pki.node("p", Role::Gpu),
            &cpu.addr,
        );
        assert_same(&src, &cpu.workspace);
        Setup {
            pki,
            t,
            cpu,
            outside,
        }
    }

    pub fn src(&self) -> PathBuf {
        self.t.path().join("src")
    }

    /// The replica is still exactly the committed tree, nothing leaked outside, nothing staged.
    pub fn assert_intact(&self) {
        assert_same(&self.src(), &self.cpu.workspace);
        assert_eq!(
            fs::read_dir(&self.outside).unwrap().count(),
            0,
            "something was written outside"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while staged_files(&self.cpu.state.join("stage")) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "staged files were not discarded"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
