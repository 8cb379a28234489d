//! Hostile input from a raw gRPC client (not the agent): messages far over the limit,
//! generations out of order or committed twice, streams and TCP connections cut in the middle of
//! a generation, frames that are not protobuf or whose length prefix lies, and join tokens that
//! are expired, replayed, altered or for another role. Each is refused with a clear status; the
//! agent keeps serving and never panics, and the replica stays exactly the last committed
//! generation with nothing left staged.
//!
//! Hostile files and strings (issue 13): setuid programs and a FIFO in the GPU workspace;
//! reports with oversized strings, a third heartbeat stream and a fifth events subscription
//! from raw clients holding genuine certificates; reflection and anonymous health, off by
//! default.

#[path = "../common/mod.rs"]
mod common;
mod coordinator;
mod files;
mod frames;
#[path = "../raw/mod.rs"]
mod raw;
mod receiver;

use std::fs;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::*;
use hyper_util::rt::TokioIo;
use prost::Message;
use raw::*;
use rustls_pki_types::pem::PemObject;
use standby::proto::coordinator_client::CoordinatorClient;
use standby::proto::*;
use standby::replication::manifest::Manifest;
use standby::trust::identity::{Identity, Role};
use standby::trust::tls::{self, Expect, TlsMaterial};
use standby::trust::token::Token;
use standby::types::RelPath;
use tokio::net::TcpStream;
use tonic::codegen::http;
use tonic::transport::{Channel, Uri};
use tonic::{Code, Status};

/// Nothing in the agent's log says it panicked.
fn assert_no_panic(log: &str) {
    assert!(!log.contains("panicked"), "the agent panicked:\n{log}");
}

/// The agent did not panic and still serves: a new session is greeted at `generation`.
async fn assert_serving(s: &Setup, generation: u64) {
    assert_no_panic(&s.cpu.log_text());
    let r = raw(&s.cpu.addr, &s.pki.node("p", Role::Gpu), 1)
        .await
        .expect("the agent must still serve");
    assert_eq!(r.hello.generation, generation, "the committed generation");
}

/// After an attack: the agent serves at `generation`, the replica is intact, a normal sync
/// follows, and nothing panicked on the way.
async fn survived(s: &Setup, generation: u64) {
    assert_serving(s, generation).await;
    s.assert_intact();
    sync_goes_on(s);
    assert_no_panic(&s.cpu.log_text());
}

/// A normal sync of a new file by the real agent-gpu succeeds, and the replica follows.
fn sync_goes_on(s: &Setup) {
    fs::write(s.src().join("after.txt"), b"replication goes on").unwrap();
    once(
        &s.src(),
        &s.t.path().join("gpu"),
        &s.pki.node("p", Role::Gpu),
        &s.cpu.addr,
    );
    assert_same(&s.src(), &s.cpu.workspace);
}

/// Polls (asynchronously) until `f` holds; panics with `what` after a generous minute.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Names of everything staged (below the stage's bucket directories).
fn staged_names(stage: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(stage).unwrap().flatten() {
        match fs::read_dir(e.path()) {
            Ok(d) => out.extend(d.flatten().map(|f| f.path().display().to_string())),
            Err(_) => out.push(e.path().display().to_string()),
        }
    }
    out
}

/// The receiver's committed manifest, asked for between generations.
async fn manifest(r: &mut Raw) -> Manifest {
    r.send(sync_request::Msg::Manifest(ManifestRequest {}))
        .await;
    let mut m = Manifest::new();
    loop {
        match r.recv().await.unwrap() {
            sync_response::Msg::Manifest(c) => {
                for it in c.items {
                    m.insert(RelPath::new(it.path.to_vec()).unwrap(), it.entry.unwrap());
                }
                if c.last {
                    return m;
                }
            }
            other => panic!("{other:?}"),
        }
    }
}

/// The root the replica would have with `ops` (inline upserts) applied.
async fn root_with(r: &mut Raw, ops: &[Op]) -> Vec<u8> {
    let mut m = manifest(r).await;
    for o in ops {
        let Some(op::Change::Upsert(u)) = &o.change else {
            panic!("upserts only")
        };
        m.insert(
            RelPath::new(o.path.to_vec()).unwrap(),
            u.entry.clone().unwrap(),
        );
    }
    m.root().to_vec()
}

fn commit(generation: u64, root: Vec<u8>) -> sync_request::Msg {
    sync_request::Msg::Commit(Commit { generation, root })
}

fn ops(ops: Vec<Op>) -> sync_request::Msg {
    sync_request::Msg::Ops(Ops { ops })
}
