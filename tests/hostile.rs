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

mod common;
mod raw;

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
async fn root_with(r: &mut Raw, ops: &[Op]) -> Bytes {
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
    m.root().to_vec().into()
}

fn commit(generation: u64, root: Bytes) -> sync_request::Msg {
    sync_request::Msg::Commit(Commit { generation, root })
}

fn ops(ops: Vec<Op>) -> sync_request::Msg {
    sync_request::Msg::Ops(Ops { ops })
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_messages_are_refused_and_the_agent_keeps_serving() {
    let s = Setup::new();
    let gtls = s.pki.node("p", Role::Gpu);
    let g0 = raw(&s.cpu.addr, &gtls, 1).await.unwrap().hello.generation;

    // 64 MiB of inline content in one message: four times the receiver's message limit.
    let huge = vec![7u8; 64 << 20];
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    r.begin().await;
    r.send(ops(vec![inline(b"d/huge", &huge)])).await;
    let e = r.recv().await.expect_err("refused");
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    assert!(e.message().contains("too large"), "{e}");
    drop((r, huge));
    assert_serving(&s, g0).await;

    // Inline entries declaring a terabyte for five bytes, plain and compressed.
    let small = b"small";
    for zstd in [false, true] {
        let mut op = inline(b"d/liar", small);
        if let Some(op::Change::Upsert(u)) = &mut op.change {
            u.entry.as_mut().unwrap().size = 1 << 40;
            u.zstd = zstd;
            if zstd {
                let z = zstd::bulk::compress(small, 1).unwrap();
                u.content = Some(upsert::Content::Inline(z.into()));
            }
        }
        let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
        r.begin().await;
        r.send(ops(vec![op])).await;
        let e = r.recv().await.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "zstd {zstd}: {e}");
        assert!(e.message().contains("inline file too large"), "{e}");
    }
    assert_serving(&s, g0).await;

    // A streamed file whose chunk declares 4 GiB for five literal bytes: refused at commit.
    let streamed = |id| Op {
        path: "d/streamed".into(),
        change: Some(op::Change::Upsert(Upsert {
            entry: Some(Entry {
                size: 1 << 40,
                blake3: Bytes::new(),
                ..file_entry(small, 0o644)
            }),
            content: Some(upsert::Content::Stream(id)),
            zstd: false,
            delta: false,
        })),
    };
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    let g = r.begin().await;
    r.send(ops(vec![streamed(1)])).await;
    r.send(sync_request::Msg::Chunk(Chunk {
        file: 1,
        len: u32::MAX,
        data: Some(chunk::Data::Literal(Bytes::from_static(small))),
    }))
    .await;
    r.send(sync_request::Msg::End(FileEnd {
        file: 1,
        aborted: false,
        blake3: blake3::hash(small).as_bytes().to_vec().into(),
        size: 1 << 40,
    }))
    .await;
    r.send(commit(g, vec![0u8; 32].into())).await;
    let e = r.recv().await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("exceeds the limit"), "{e}");
    drop(r);

    // Honest chunks but an end declaring a terabyte; and a compressed chunk that inflates to far
    // more than it declares (a zstd bomb): neither is committed, both are asked for again.
    let bomb = zstd::bulk::compress(&vec![0u8; 32 << 20], 19).unwrap();
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    let g = r.begin().await;
    let mut bombed = inline(b"d/bomb", &[0u8; 4096]);
    if let Some(op::Change::Upsert(u)) = &mut bombed.change {
        u.content = Some(upsert::Content::Stream(2));
    }
    r.send(ops(vec![streamed(1), bombed])).await;
    r.send(sync_request::Msg::Chunk(Chunk {
        file: 1,
        len: small.len() as u32,
        data: Some(chunk::Data::Literal(Bytes::from_static(small))),
    }))
    .await;
    r.send(sync_request::Msg::End(FileEnd {
        file: 1,
        aborted: false,
        blake3: blake3::hash(small).as_bytes().to_vec().into(),
        size: 1 << 40,
    }))
    .await;
    r.send(sync_request::Msg::Chunk(Chunk {
        file: 2,
        len: 4096,
        data: Some(chunk::Data::LiteralZstd(bomb.into())),
    }))
    .await;
    r.send(sync_request::Msg::End(FileEnd {
        file: 2,
        aborted: false,
        blake3: blake3::hash(&[0u8; 4096]).as_bytes().to_vec().into(),
        size: 4096,
    }))
    .await;
    r.send(commit(g, vec![0u8; 32].into())).await;
    match r.recv().await.unwrap() {
        sync_response::Msg::Commit(c) => {
            assert!(!c.committed);
            let mut retry: Vec<_> = c.retry.iter().map(|p| p.to_vec()).collect();
            retry.sort();
            assert_eq!(retry, [b"d/bomb".to_vec(), b"d/streamed".to_vec()]);
        }
        other => panic!("{other:?}"),
    }
    drop(r);

    survived(&s, g0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn too_many_files_streaming_at_once_are_refused_without_wedging_the_receiver() {
    let s = Setup::new();
    let gtls = s.pki.node("p", Role::Gpu);
    let g0 = raw(&s.cpu.addr, &gtls, 1).await.unwrap().hello.generation;
    // More streams than the receiver's blocking pool has threads (512), then more chunks for
    // the last one than its writer's queue holds, then the client is gone. A receiver that
    // gave every stream a writer would wait forever for that last one, holding the replica.
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    r.begin().await;
    let n = 600u32;
    let streams: Vec<Op> = (0..n)
        .map(|i| {
            let mut o = inline(format!("d/s{i}").as_bytes(), b"x");
            if let Some(op::Change::Upsert(u)) = &mut o.change {
                u.content = Some(upsert::Content::Stream(i));
            }
            o
        })
        .collect();
    r.send(ops(streams)).await;
    for _ in 0..8 {
        r.send(sync_request::Msg::Chunk(Chunk {
            file: n - 1,
            len: 1,
            data: Some(chunk::Data::Literal(Bytes::from_static(b"x"))),
        }))
        .await;
    }
    let e = tokio::time::timeout(Duration::from_secs(60), r.recv())
        .await
        .expect("the receiver never answered")
        .expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("files streaming at once"), "{e}");
    drop(r);
    survived(&s, g0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn signature_requests_never_delivered_on_keep_a_bounded_number_of_files_open() {
    let s = Setup::new();
    let gtls = s.pki.node("p", Role::Gpu);
    let g0 = raw(&s.cpu.addr, &gtls, 1).await.unwrap().hello.generation;
    // 200 signature requests for the same committed file, no delta ever: each would keep the
    // file open and mapped until the generation ends. Past the cap the answer is "missing"
    // (send it whole).
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    r.begin().await;
    let n = 200u32;
    for file in 1..=n {
        r.send(sync_request::Msg::Sig(SigRequest {
            file,
            path: "big.bin".into(),
            block_size: 4096,
        }))
        .await;
    }
    let (mut served, mut missing) = (0, 0);
    while served + missing < n {
        match tokio::time::timeout(Duration::from_secs(60), r.recv())
            .await
            .expect("the receiver never answered")
            .unwrap()
        {
            sync_response::Msg::Signature(sig) if sig.last && sig.missing => missing += 1,
            sync_response::Msg::Signature(sig) if sig.last => served += 1,
            sync_response::Msg::Signature(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((served, missing), (64, n - 64));
    drop(r);
    survived(&s, g0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_order_and_duplicate_commits_are_refused() {
    let s = Setup::new();
    let gtls = s.pki.node("p", Role::Gpu);
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    let g0 = r.hello.generation;

    // Commit before Begin.
    r.send(commit(g0 + 1, r.hello.root.clone())).await;
    let e = r.recv().await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("commit outside a generation"), "{e}");

    // A Begin that repeats the committed generation, and one that skips the next.
    for g in [g0, g0 + 2] {
        let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
        r.send(sync_request::Msg::Begin(Begin { generation: g }))
            .await;
        let e = r.recv().await.expect_err("refused");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        let want = format!("generation {g} cannot follow committed generation {g0}");
        assert!(e.message().contains(&want), "{e}");
    }

    // A second Begin before Commit: refused, and what the first one staged is discarded.
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    let g = r.begin().await;
    r.send(ops(vec![inline(b"d/one", b"first generation")]))
        .await;
    r.send(sync_request::Msg::Begin(Begin { generation: g }))
        .await;
    let e = r.recv().await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("begin inside a generation"), "{e}");
    drop(r);
    s.assert_intact();

    // A Commit naming another generation than the one begun (with the right root otherwise):
    // refused, and what was staged is discarded.
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    let two = vec![inline(b"d/two", b"never committed")];
    let root = root_with(&mut r, &two).await;
    let g = r.begin().await;
    r.send(ops(two)).await;
    r.send(commit(g + 1, root)).await;
    let e = r.recv().await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(
        e.message().contains(&format!(
            "commit of generation {} inside generation {g}",
            g + 1
        )),
        "{e}"
    );
    drop(r);
    s.assert_intact();
    assert_serving(&s, g0).await;

    // One generation committed, then the same Commit again in the same session: refused, and
    // no second generation appears.
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    let dup = vec![inline(b"dup.txt", b"committed once")];
    let root = root_with(&mut r, &dup).await;
    let g = r.begin().await;
    r.send(ops(dup)).await;
    r.send(commit(g, root.clone())).await;
    match r.recv().await.unwrap() {
        sync_response::Msg::Commit(c) => {
            assert!(c.committed, "{c:?}");
            assert_eq!(c.generation, g);
            assert_eq!(c.root, root);
        }
        other => panic!("{other:?}"),
    }
    // The source side gets the same file, so the replica can be compared with it.
    let src_dup = s.src().join("dup.txt");
    fs::write(&src_dup, b"committed once").unwrap();
    fs::set_permissions(&src_dup, fs::Permissions::from_mode(0o644)).unwrap();
    set_mtime(&src_dup, 1_700_000_000, 0);
    let committed = snapshot(&s.cpu.workspace);
    r.send(commit(g, root.clone())).await;
    let e = r.recv().await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("commit outside a generation"), "{e}");

    // Ops right after a Commit (of an empty generation here), in the same session.
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    assert_eq!((r.hello.generation, &r.hello.root), (g, &root));
    let g2 = r.begin().await;
    r.send(commit(g2, root.clone())).await;
    match r.recv().await.unwrap() {
        sync_response::Msg::Commit(c) => assert!(c.committed && c.generation == g2, "{c:?}"),
        other => panic!("{other:?}"),
    }
    r.send(ops(vec![inline(b"late.txt", b"after the commit")]))
        .await;
    let e = r.recv().await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("ops outside a generation"), "{e}");

    // The first Commit replayed in a new session (as by a sender that reconnected).
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    assert_eq!(r.hello.generation, g2);
    r.send(commit(g, root.clone())).await;
    let e = r.recv().await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("commit outside a generation"), "{e}");
    drop(r);

    assert!(diff(&committed, &snapshot(&s.cpu.workspace)).is_empty());
    survived(&s, g2).await;
}

/// A file descriptor of a client's TCP connection, to cut it under the client's feet.
#[derive(Clone, Default)]
struct Cut(Arc<Mutex<Option<RawFd>>>);

impl Cut {
    /// Shuts the connection down both ways, as a dying peer or a network cut would.
    fn cut(&self) {
        let fd = self.0.lock().unwrap().expect("connected");
        // SAFETY: the channel holding the socket is alive; shutdown(2) does not close the fd.
        assert_eq!(unsafe { libc::shutdown(fd, libc::SHUT_RDWR) }, 0);
    }
}

/// Connects like the agent (mTLS, same HTTP/2 settings) and remembers the socket in `Cut`.
#[derive(Clone)]
struct CuttableConnector {
    cfg: Arc<rustls::ClientConfig>,
    cut: Cut,
}

type Io = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<Uri> for CuttableConnector {
    type Response = Io;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Io>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (cfg, cut) = (self.cfg.clone(), self.cut.clone());
        Box::pin(async move {
            let tcp = TcpStream::connect((uri.host().unwrap(), uri.port_u16().unwrap())).await?;
            *cut.0.lock().unwrap() = Some(tcp.as_raw_fd());
            let name = rustls_pki_types::ServerName::try_from("standby.peer").unwrap();
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

async fn cuttable(addr: &str, tls_dir: &Path) -> (Channel, Cut) {
    let m = TlsMaterial::load(tls_dir).unwrap();
    let cut = Cut::default();
    let ch = tls::endpoint(tls::endpoint_uri(addr).unwrap())
        .connect_with_connector(CuttableConnector {
            cfg: m.client_config(Expect::AnyIdentity).unwrap(),
            cut: cut.clone(),
        })
        .await
        .unwrap();
    (ch, cut)
}

const MIB: usize = 1 << 20;

/// Begins a generation with small files staged (one new, one changed).
async fn begin_with_ops(r: &mut Raw, stage: &Path) {
    r.begin().await;
    r.send(ops(vec![
        inline(b"d/new", b"part of a generation that never commits"),
        inline(b"d/f.txt", b"changed, never committed"),
    ]))
    .await;
    eventually("small files staged", || !staged_names(stage).is_empty()).await;
}

/// Begins a generation and streams half of `big.bin` as a delta against the replica's copy,
/// until the receiver has turned its in-place patch into a full staged copy.
async fn begin_mid_file(r: &mut Raw, stage: &Path) {
    begin_with_ops(r, stage).await;
    r.send(sync_request::Msg::Sig(SigRequest {
        file: 1,
        path: "big.bin".into(),
        block_size: 4096,
    }))
    .await;
    loop {
        match r.recv().await.unwrap() {
            sync_response::Msg::Signature(sig) if sig.last => {
                assert!(!sig.missing);
                break;
            }
            sync_response::Msg::Signature(_) => {}
            other => panic!("{other:?}"),
        }
    }
    r.send(ops(vec![Op {
        path: "big.bin".into(),
        change: Some(op::Change::Upsert(Upsert {
            entry: Some(Entry {
                blake3: Bytes::new(),
                ..file_entry(&[], 0o644)
            }),
            content: Some(upsert::Content::Stream(1)),
            zstd: false,
            delta: true,
        })),
    }]))
    .await;
    for _ in 0..6 {
        r.send(sync_request::Msg::Chunk(Chunk {
            file: 1,
            len: MIB as u32,
            data: Some(chunk::Data::Literal(vec![5u8; MIB].into())),
        }))
        .await;
    }
    eventually("big.bin staged as a full copy", || {
        staged_names(stage).iter().any(|n| n.ends_with(".full"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_generation_cut_short_leaves_nothing_behind() {
    // big.bin is large enough for a delta to turn into a full staged copy mid-stream.
    let s = Setup::with_big(12 * MIB);
    let gtls = s.pki.node("p", Role::Gpu);
    let stage = s.cpu.state.join("stage");
    let g0 = raw(&s.cpu.addr, &gtls, 1).await.unwrap().hello.generation;

    // The client drops the stream after ops, before Commit.
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    begin_with_ops(&mut r, &stage).await;
    drop(r);
    s.assert_intact();

    // The client drops the stream in the middle of a large file's chunks.
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    begin_mid_file(&mut r, &stage).await;
    drop(r);
    s.assert_intact();

    // The TCP connection is cut after ops, and in the middle of a large file's chunks.
    for mid_file in [false, true] {
        let (ch, cut) = cuttable(&s.cpu.addr, &gtls).await;
        let mut r = raw_on(ch, 1).await.unwrap();
        if mid_file {
            begin_mid_file(&mut r, &stage).await;
        } else {
            begin_with_ops(&mut r, &stage).await;
        }
        cut.cut();
        assert!(r.recv().await.is_err(), "the connection is gone");
        s.assert_intact();
    }

    // The sender goes silent mid-file and a new session (a reconnect) takes over.
    let mut silent = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    begin_mid_file(&mut silent, &stage).await;
    let r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    assert_eq!(r.hello.generation, g0);
    let e = silent.recv().await.expect_err("superseded");
    assert_eq!(e.code(), Code::Cancelled, "{e}");
    s.assert_intact();
    drop((r, silent));

    assert_serving(&s, g0).await;
    sync_goes_on(&s);
    assert_no_panic(&s.cpu.log_text());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_killed_mid_generation_discards_it_on_restart() {
    let mut s = Setup::with_big(12 * MIB);
    let gtls = s.pki.node("p", Role::Gpu);
    let stage = s.cpu.state.join("stage");
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    let g0 = r.hello.generation;
    begin_mid_file(&mut r, &stage).await;
    s.cpu.kill();
    drop(r);
    assert!(!staged_names(&stage).is_empty());
    s.cpu.restart();
    // Cleared before the restarted agent serves anything.
    assert_eq!(staged_names(&stage), Vec::<String>::new());
    s.assert_intact();
    assert_serving(&s, g0).await;
    sync_goes_on(&s);
    assert_no_panic(&s.cpu.log_text());
}

/// A gRPC frame: compression flag, length prefix (which may lie), payload.
fn frame(flag: u8, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(flag);
    b.put_u32(len);
    b.put_slice(payload);
    b.to_vec()
}

fn msg_frame(m: sync_request::Msg) -> Vec<u8> {
    let p = SyncRequest { msg: Some(m) }.encode_to_vec();
    frame(0, p.len() as u32, &p)
}

fn hello_frame() -> Vec<u8> {
    msg_frame(sync_request::Msg::Hello(Hello {
        protocol: standby::replication::receive::PROTOCOL,
        epoch: 1,
        sender: "raw".into(),
    }))
}

/// A channel whose every request carries `body` as its HTTP/2 body, byte for byte, in place of
/// what tonic would have encoded.
#[derive(Clone)]
struct RawBody {
    ch: Channel,
    body: Bytes,
}

impl tower::Service<http::Request<tonic::body::Body>> for RawBody {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.ch, cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let (parts, _) = req.into_parts();
        let body = tonic::body::Body::new(axum::body::Body::from(self.body.clone()));
        self.ch.call(http::Request::from_parts(parts, body))
    }
}

/// A `Sync` call whose request body is exactly `body`; the replies, then how the call ended.
async fn sync_raw_body(
    addr: &str,
    tls_dir: &Path,
    body: Vec<u8>,
) -> (Vec<sync_response::Msg>, Result<(), Status>) {
    let m = TlsMaterial::load(tls_dir).unwrap();
    let ch = tls::connect(addr, m.client_config(Expect::AnyIdentity).unwrap())
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(RawBody {
        ch,
        body: body.into(),
    });
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<SyncRequest, SyncResponse>::default();
    let call = grpc
        .streaming(
            tonic::Request::new(tokio_stream::empty::<SyncRequest>()),
            http::uri::PathAndQuery::from_static("/standby.v1.Replica/Sync"),
            codec,
        )
        .await;
    let mut stream = match call {
        Ok(s) => s.into_inner(),
        Err(e) => return (vec![], Err(e)),
    };
    let mut got = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match stream.message().await {
                Ok(Some(SyncResponse { msg: Some(m) })) => got.push(m),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the agent answers");
    (got, end)
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_frames_are_refused_without_a_panic() {
    let s = Setup::new();
    let gtls = s.pki.node("p", Role::Gpu);
    let g0 = raw(&s.cpu.addr, &gtls, 1).await.unwrap().hello.generation;
    let garbage = [0xffu8; 16];
    // A protobuf Begin whose inner length (100) runs past the end of its message.
    let torn_begin = [0x12, 100, 0x08, 0x01];
    // Field 3 (ops, a message) sent as a varint.
    let wrong_wire_type = [0x18, 0x01];
    let begin = msg_frame(sync_request::Msg::Begin(Begin { generation: g0 + 1 }));
    let cases: Vec<(&str, Vec<u8>, Code, &str)> = vec![
        (
            "not protobuf, first",
            frame(0, 16, &garbage),
            Code::Internal,
            "decode",
        ),
        (
            "not protobuf, after hello",
            [hello_frame(), frame(0, 16, &garbage)].concat(),
            Code::Internal,
            "decode",
        ),
        (
            "a field's length runs past its message",
            [hello_frame(), frame(0, 4, &torn_begin)].concat(),
            Code::Internal,
            "decode",
        ),
        (
            "a field with the wrong wire type",
            [hello_frame(), begin.clone(), frame(0, 2, &wrong_wire_type)].concat(),
            Code::Internal,
            "decode",
        ),
        (
            "a message with no known field",
            [hello_frame(), frame(0, 2, &[0x78, 0x01])].concat(),
            Code::InvalidArgument,
            "empty message",
        ),
        (
            "a length prefix longer than the body",
            [hello_frame(), begin.clone(), frame(0, 1000, &[0x12, 0x02])].concat(),
            Code::Internal,
            "EOF",
        ),
        (
            "a length prefix of 4 GiB",
            [hello_frame(), frame(0, u32::MAX, &garbage)].concat(),
            Code::OutOfRange,
            "too large",
        ),
        (
            "a length prefix shorter than its message",
            [hello_frame(), frame(0, 3, &begin[5..])].concat(),
            Code::Internal,
            "decode",
        ),
        (
            "the compressed flag without an encoding",
            [hello_frame(), frame(1, 16, &garbage)].concat(),
            Code::Internal,
            "compressed-flag",
        ),
        (
            "an undefined flag",
            [hello_frame(), frame(7, 16, &garbage)].concat(),
            Code::Internal,
            "compression flag",
        ),
    ];
    for (what, body, code, text) in cases {
        let (got, end) = sync_raw_body(&s.cpu.addr, &gtls, body.clone()).await;
        let e = end.expect_err(what);
        assert_eq!(e.code(), code, "{what}: {e}");
        assert!(e.message().contains(text), "{what}: {e}");
        // Whatever came before the bad frame was answered normally.
        if body.starts_with(&hello_frame()) {
            assert!(
                matches!(got.first(), Some(sync_response::Msg::Hello(h)) if h.generation == g0),
                "{what}: {got:?}"
            );
        }
        assert_serving(&s, g0).await;
    }
    s.assert_intact();
    sync_goes_on(&s);
    assert_no_panic(&s.cpu.log_text());
}

/// Joins through a raw client of the coordinator's `Join` (no agent involved).
async fn join(
    addr: &str,
    fp: &str,
    token: &str,
    role: standby::proto::Role,
) -> Result<JoinReply, Status> {
    let ch = tls::connect(addr, tls::join_client_config(fp).unwrap())
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let id_role = match role {
        standby::proto::Role::Cpu => Role::Cpu,
        _ => Role::Gpu,
    };
    let (csr, _key) =
        standby::trust::pki::new_csr(&Identity::node("p", id_role, "raw").unwrap()).unwrap();
    CoordinatorClient::new(ch)
        .join(JoinRequest {
            token: token.to_string(),
            role: role as i32,
            csr_pem: csr,
            machine: "raw".into(),
            advertise: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

fn joined_events(c: &Coord) -> usize {
    let out = c.admin(&["events", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"] == "joined")
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn join_tokens_from_a_raw_client_are_refused_unless_fresh_genuine_and_for_the_role() {
    use standby::proto::Role as Wire;
    standby::trust::tls::install_default_provider();
    let t = tempfile::tempdir().unwrap();
    let mut c = Coord::start(&t.path().join("coord"), &[]);
    let key = standby::control::service::token_key(&c.dir).unwrap();
    let fp = standby::trust::pki::Ca::load(&c.dir).unwrap().fingerprint();
    let now = unix_ms() / 1000;
    let good = c.token("p", "gpu", "10m");
    let refused = |e: Status, code: Code, text: &str| {
        assert_eq!(e.code(), code, "{e}");
        assert!(e.message().contains(text), "{e}");
    };

    // Expired (minted with the coordinator's own key, a minute ago).
    let expired = Token::new("p", Role::Gpu, now - 60, &fp).sign(&key);
    let e = join(&c.addr, &fp, &expired, Wire::Gpu)
        .await
        .expect_err("expired");
    refused(e, Code::PermissionDenied, "expired");
    // A tampered signature, a tampered field, another key.
    let mut tampered = good.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == '0' { '1' } else { '0' });
    let e = join(&c.addr, &fp, &tampered, Wire::Gpu)
        .await
        .expect_err("mac");
    refused(e, Code::PermissionDenied, "does not verify");
    let other_pair = good.replacen(":p:", ":q:", 1);
    let e = join(&c.addr, &fp, &other_pair, Wire::Gpu)
        .await
        .expect_err("field");
    refused(e, Code::PermissionDenied, "does not verify");
    let foreign = Token::new("p", Role::Gpu, now + 600, &fp).sign(&[9u8; 32]);
    let e = join(&c.addr, &fp, &foreign, Wire::Gpu)
        .await
        .expect_err("key");
    refused(e, Code::PermissionDenied, "does not verify");
    // For another role, or for none.
    let e = join(&c.addr, &fp, &good, Wire::Cpu)
        .await
        .expect_err("role");
    refused(e, Code::PermissionDenied, "for role gpu, not cpu");
    let e = join(&c.addr, &fp, &good, Wire::Unspecified)
        .await
        .expect_err("no role");
    refused(e, Code::InvalidArgument, "without a role");
    let e = join(&c.addr, &fp, "sbj1:p:gpu:1", Wire::Gpu)
        .await
        .expect_err("malformed");
    refused(e, Code::PermissionDenied, "malformed");
    assert_eq!(joined_events(&c), 0, "nothing issued");

    // None of that used the good token up: it joins once, as what it says.
    let reply = join(&c.addr, &fp, &good, Wire::Gpu)
        .await
        .expect("a fresh genuine token");
    let cert = rustls_pki_types::CertificateDer::from_pem_slice(reply.cert_pem.as_bytes()).unwrap();
    assert_eq!(
        Identity::from_cert_der(&cert).unwrap(),
        Identity::node("p", Role::Gpu, "raw").unwrap()
    );
    // Then never again: replayed one after the other, or many at once.
    let e = join(&c.addr, &fp, &good, Wire::Gpu)
        .await
        .expect_err("replay");
    refused(e, Code::PermissionDenied, "already used");
    let racing = c.token("p", "cpu", "10m");
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (addr, fp, tok, b) = (c.addr.clone(), fp.clone(), racing.clone(), barrier.clone());
            tokio::spawn(async move {
                let ch = tls::connect(&addr, tls::join_client_config(&fp).unwrap())
                    .await
                    .unwrap();
                let (csr, _) =
                    standby::trust::pki::new_csr(&Identity::node("p", Role::Cpu, "raw").unwrap())
                        .unwrap();
                let mut client = CoordinatorClient::new(ch);
                b.wait().await;
                client
                    .join(JoinRequest {
                        token: tok,
                        role: Wire::Cpu as i32,
                        csr_pem: csr,
                        machine: "raw".into(),
                        advertise: String::new(),
                    })
                    .await
            })
        })
        .collect();
    let mut issued = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => issued += 1,
            Err(e) => refused(e, Code::PermissionDenied, "already used"),
        }
    }
    assert_eq!(issued, 1, "a token used by many at once is good for one");
    assert_eq!(joined_events(&c), 2, "one certificate per token");
    // And not after a restart either: use is recorded durably.
    c.restart();
    for (tok, role) in [(&good, Wire::Gpu), (&racing, Wire::Cpu)] {
        let e = join(&c.addr, &fp, tok, role)
            .await
            .expect_err("replay after restart");
        refused(e, Code::PermissionDenied, "already used");
    }
    assert_no_panic(&c.log_text());
}

// ---- Hostile files in the workspace --------------------------------------------------------

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Sets a path's mtime an hour back, so no entry is "racily clean" (re-hashed next time).
fn age_an_hour(p: &Path) {
    let t = std::time::SystemTime::now() - Duration::from_secs(3600);
    fs::File::open(p)
        .unwrap()
        .set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

/// `agent-gpu --once`, failing the test (rather than hanging it) should it never end.
fn once_within_a_minute(src: &Path, state: &Path, tls: &Path, peer: &str) -> serde_json::Value {
    let (tx, rx) = std::sync::mpsc::channel();
    let (src, state, tls, peer) = (
        src.to_owned(),
        state.to_owned(),
        tls.to_owned(),
        peer.to_owned(),
    );
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(|| once(&src, &state, &tls, &peer)));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(report)) => report,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("agent-gpu --once did not finish: stalled on something in the workspace"),
    }
}

/// A setuid and a setgid program and a setgid directory on the GPU reach the replica with their
/// content but without those bits; a FIFO beside them (which would block a reader forever) is
/// skipped and the rest replicates. Sending again sends nothing: the sender's index keeps the
/// sender's modes, so the masked replica never looks out of date.
#[test]
fn setuid_bits_are_masked_on_the_replica_and_a_fifo_does_not_stall_the_sender() {
    let pki = Pki::new();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("bin")).unwrap();
    let files: [(&str, &[u8], u32); 3] = [
        ("bin/suid", b"#!/bin/sh\nid\n", 0o4755),
        ("bin/sgid", b"#!/bin/sh\nid -g\n", 0o2711),
        ("data.txt", b"plain data", 0o640),
    ];
    for (p, data, mode) in files {
        fs::write(src.join(p), data).unwrap();
        fs::set_permissions(src.join(p), fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::set_permissions(src.join("bin"), fs::Permissions::from_mode(0o2775)).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        src.join("bin/pipe"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    for p in ["bin/suid", "bin/sgid", "data.txt", "bin"] {
        age_an_hour(&src.join(p));
    }
    let replica = t.path().join("replica");
    let cpu = Cpu::start(&replica, &t.path().join("cpu"), &pki.node("p", Role::Cpu));
    let (state, tls) = (t.path().join("gpu"), pki.node("p", Role::Gpu));

    let first = once_within_a_minute(&src, &state, &tls, &cpu.addr);
    assert_eq!(
        first["files_total"], 3,
        "the FIFO is no file to send: {first}"
    );
    for (p, data, mode) in files {
        assert_eq!(fs::read(replica.join(p)).unwrap(), data, "{p}: content");
        assert_eq!(mode_of(&replica.join(p)), mode & !0o6000, "{p}: mode");
    }
    assert_eq!(mode_of(&replica.join("bin")), 0o775, "bin: mode");
    assert!(
        !replica.join("bin/pipe").exists(),
        "a FIFO is not replicated"
    );
    // The sender's own files are untouched.
    assert_eq!(mode_of(&src.join("bin/suid")), 0o4755);

    let again = once_within_a_minute(&src, &state, &tls, &cpu.addr);
    assert_eq!(again["files_changed"], 0, "nothing is sent again: {again}");
    assert_eq!(again["root"], first["root"]);
    assert_eq!(mode_of(&replica.join("bin/suid")), 0o755);
    assert_no_panic(&cpu.log_text());
}

// ---- Hostile agents and admins at the coordinator -------------------------------------------

/// A certificate for `pair`/`role` from the coordinator's own CA, as a raw client holds it (for
/// machine `raw-gpu`, the name `honest_report` gives).
fn agent_material(c: &Coord, pair: &str, role: Role) -> TlsMaterial {
    let ca = standby::trust::pki::Ca::load(&c.dir).unwrap();
    let cert = ca
        .issue(
            &Identity::node(pair, role, "raw-gpu").unwrap(),
            standby::trust::pki::days(1),
            &[],
        )
        .unwrap();
    TlsMaterial::from_node_cert(&cert).unwrap()
}

async fn coordinator_channel(c: &Coord, m: &TlsMaterial) -> Channel {
    let cfg = m
        .client_config(Expect::Exactly(Identity::Coordinator))
        .unwrap();
    tls::connect(&c.addr, cfg).await.unwrap()
}

/// A raw heartbeat stream: the reports to send, and the commands (or the refusal).
struct Beat {
    tx: tokio::sync::mpsc::Sender<AgentReport>,
    rx: Result<tonic::Streaming<Command>, Status>,
}

async fn beat(c: &Coord, m: &TlsMaterial) -> Beat {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let rx = CoordinatorClient::new(coordinator_channel(c, m).await)
        .heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(|r| r.into_inner());
    Beat { tx, rx }
}

fn honest_report() -> AgentReport {
    AgentReport {
        seq: 1,
        machine: "raw-gpu".into(),
        workspace: "/workspace".into(),
        ..Default::default()
    }
}

/// The stream's end: the status it ended with (commands before it are skipped).
async fn end_of(b: &mut Beat) -> Status {
    let rx = b.rx.as_mut().expect("the stream was accepted");
    loop {
        match tokio::time::timeout(Duration::from_secs(60), rx.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => return Status::ok("ended"),
            Ok(Err(e)) => return e,
            Err(_) => panic!("the stream never ended"),
        }
    }
}

async fn pair_view(admin: &TlsMaterial, c: &Coord, pair: &str) -> Option<PairView> {
    let mut client =
        standby::proto::admin_client::AdminClient::new(coordinator_channel(c, admin).await);
    let pairs = client
        .list_pairs(ListPairsRequest {})
        .await
        .unwrap()
        .into_inner();
    pairs.pairs.into_iter().find(|p| p.pair == pair)
}

/// Reports whose strings break their limits, from a raw client holding a genuine agent
/// certificate: each is refused with INVALID_ARGUMENT naming the field, the stream ends, and
/// nothing of it is stored or acted on (a fatal GPU fault with an oversized reason fails
/// nothing over). An honest report is taken as before.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_report_strings_are_refused_and_nothing_of_them_is_used() {
    standby::trust::tls::install_default_provider();
    let t = tempfile::tempdir().unwrap();
    let c = Coord::start(&t.path().join("coord"), &[]);
    let gpu = agent_material(&c, "p", Role::Gpu);
    let admin = TlsMaterial::load(&c.dir.join("admin")).unwrap();
    let long = |n: usize| "x".repeat(n);
    let cases: Vec<(&str, AgentReport)> = vec![
        (
            "machine",
            AgentReport {
                machine: long(64),
                ..honest_report()
            },
        ),
        (
            "machine",
            AgentReport {
                machine: "gpu\n1".into(),
                ..honest_report()
            },
        ),
        (
            "advertise",
            AgentReport {
                advertise: long(256),
                ..honest_report()
            },
        ),
        (
            "workspace",
            AgentReport {
                workspace: long(4097),
                ..honest_report()
            },
        ),
        (
            "last_error",
            AgentReport {
                last_error: long(1025),
                ..honest_report()
            },
        ),
        (
            "gpu.fatal_reason",
            AgentReport {
                gpu: Some(GpuHealth {
                    count: 1,
                    fatal: true,
                    fatal_reason: long(1025),
                    ..Default::default()
                }),
                ..honest_report()
            },
        ),
        (
            "peer.probe_error",
            AgentReport {
                peer: Some(PeerContact {
                    probe_error: long(1025),
                    ..Default::default()
                }),
                ..honest_report()
            },
        ),
    ];
    for (field, report) in cases {
        let mut b = beat(&c, &gpu).await;
        b.tx.send(report).await.unwrap();
        let e = end_of(&mut b).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {e:?}");
    }
    let view = pair_view(&admin, &c, "p").await.expect("the pair exists");
    let gpu_view = view.gpu.clone().unwrap_or_default();
    assert_eq!(
        gpu_view.machine, "",
        "no refused report was stored: {view:?}"
    );
    assert_ne!(view.state(), standby::proto::PairState::FailedOver);
    let events = c.admin(&["events", "--json"]);
    assert!(!String::from_utf8_lossy(&events.stdout).contains(&long(64)));

    // An honest agent goes on as before.
    let b = beat(&c, &gpu).await;
    b.tx.send(honest_report()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let v = pair_view(&admin, &c, "p").await;
        if v.as_ref()
            .and_then(|v| v.gpu.as_ref())
            .is_some_and(|g| g.machine == "raw-gpu")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the honest report was never taken: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(b);
    assert!(!c.log_text().contains("panicked"));
}

/// Two heartbeat streams per agent certificate at most: a third ends the oldest (with
/// RESOURCE_EXHAUSTED), so a reconnecting agent never waits for its dead stream to time out,
/// and however many a client opens, only two are ever held. Another certificate has places of
/// its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_third_heartbeat_stream_per_certificate_ends_the_oldest() {
    standby::trust::tls::install_default_provider();
    let t = tempfile::tempdir().unwrap();
    let c = Coord::start(&t.path().join("coord"), &[]);
    let gpu = agent_material(&c, "p", Role::Gpu);
    let mut one = beat(&c, &gpu).await;
    one.rx.as_ref().expect("first");
    let mut two = beat(&c, &gpu).await;
    two.rx.as_ref().expect("second");
    let mut three = beat(&c, &gpu).await;
    three.rx.as_ref().expect("a third is taken");
    let e = end_of(&mut one).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("newer heartbeat stream"), "{e:?}");
    let cpu = agent_material(&c, "p", Role::Cpu);
    beat(&c, &cpu)
        .await
        .rx
        .expect("the CPU's certificate has its own places");
    // A flood of streams: each new one ends the oldest; the last two are the ones alive.
    let mut flood = Vec::new();
    for _ in 0..8 {
        flood.push(beat(&c, &gpu).await);
    }
    for b in [&mut two, &mut three] {
        assert_eq!(end_of(b).await.code(), Code::ResourceExhausted);
    }
    for b in flood.iter_mut().take(6) {
        assert_eq!(end_of(b).await.code(), Code::ResourceExhausted);
    }
    let last = flood.pop().unwrap();
    last.tx.send(honest_report()).await.unwrap();
    assert!(!c.log_text().contains("panicked"));
}

async fn subscribe(c: &Coord, admin: &TlsMaterial) -> Result<tonic::Streaming<Event>, Status> {
    standby::proto::admin_client::AdminClient::new(coordinator_channel(c, admin).await)
        .events(EventsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// Four following `Events` subscriptions per admin at most: the fifth is refused with
/// RESOURCE_EXHAUSTED, and a place comes back when a subscriber goes away, even while no event
/// is flowing.
#[tokio::test(flavor = "multi_thread")]
async fn a_fifth_events_subscription_per_admin_is_refused() {
    standby::trust::tls::install_default_provider();
    let t = tempfile::tempdir().unwrap();
    let c = Coord::start(&t.path().join("coord"), &[]);
    let admin = TlsMaterial::load(&c.dir.join("admin")).unwrap();
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(
            subscribe(&c, &admin)
                .await
                .unwrap_or_else(|e| panic!("{i}: {e:?}")),
        );
    }
    let e = subscribe(&c, &admin).await.expect_err("a fifth");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("event subscriptions"), "{e:?}");
    // The admin's other calls are not limited by it.
    assert!(pair_view(&admin, &c, "none").await.is_none());
    held.pop();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match subscribe(&c, &admin).await {
            Ok(s) => {
                held.push(s);
                break;
            }
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!c.log_text().contains("panicked"));
}

/// Reflection is off unless `--reflection`; health answers only clients with a certificate of
/// the CA unless `--public-health`.
#[tokio::test(flavor = "multi_thread")]
async fn reflection_and_unauthenticated_health_are_off_by_default() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_request};
    standby::trust::tls::install_default_provider();
    let t = tempfile::tempdir().unwrap();
    let mut c = Coord::start(&t.path().join("coord"), &[]);
    let fp = standby::trust::pki::Ca::load(&c.dir).unwrap().fingerprint();
    let agent = agent_material(&c, "p", Role::Cpu);

    let reflect = |ch: Channel| async move {
        let req = ServerReflectionRequest {
            message_request: Some(server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
            ..Default::default()
        };
        let mut stream = ServerReflectionClient::new(ch)
            .server_reflection_info(tokio_stream::iter([req]))
            .await?
            .into_inner();
        stream.message().await.map(|m| m.is_some())
    };
    let health = |ch: Channel| async move {
        HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status)
    };
    let anonymous = || async {
        tls::connect(&c.addr, tls::join_client_config(&fp).unwrap())
            .await
            .unwrap()
    };

    let e = reflect(coordinator_channel(&c, &agent).await)
        .await
        .expect_err("reflection is off");
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    health(coordinator_channel(&c, &agent).await)
        .await
        .expect("health with a certificate");
    let e = health(anonymous().await)
        .await
        .expect_err("health without a certificate");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    c.args_push(&["--reflection", "--public-health"]);
    c.restart();
    let anonymous = || async {
        tls::connect(&c.addr, tls::join_client_config(&fp).unwrap())
            .await
            .unwrap()
    };
    assert!(
        reflect(coordinator_channel(&c, &agent).await)
            .await
            .expect("reflection on")
    );
    health(anonymous().await).await.expect("public health");
    assert!(!c.log_text().contains("panicked"));
}
