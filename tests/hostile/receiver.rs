//! Sessions out of order, messages over the limit, generations cut short or killed.

use super::*;

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
                blake3: Vec::new(),
                ..file_entry(small, 0o644)
            }),
            content: Some(upsert::Content::Stream(id)),
            zstd: false,
            delta: false,
            base_blake3: Vec::new(),
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
        blake3: blake3::hash(small).as_bytes().to_vec(),
        size: 1 << 40,
    }))
    .await;
    r.send(commit(g, vec![0u8; 32])).await;
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
        blake3: blake3::hash(small).as_bytes().to_vec(),
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
        blake3: blake3::hash(&[0u8; 4096]).as_bytes().to_vec(),
        size: 4096,
    }))
    .await;
    r.send(commit(g, vec![0u8; 32])).await;
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

/// Generations are numbered pair-wide (ARCHITECTURE.md, "Generations"): a sender whose hello
/// says the pair is at a newer generation than this replica (as the CPU restoring a new GPU
/// does) gets its sessions numbered after it. Only exactly that number begins; afterwards a
/// replayed or older generation is refused as before, a hello with no number left after it
/// is refused, and the jump survives a restart of the receiver (its catalog replays it).
#[tokio::test(flavor = "multi_thread")]
async fn a_sender_ahead_of_the_replica_continues_the_pairs_numbering() {
    let mut s = Setup::new();
    let gtls = s.pki.node("p", Role::Gpu);
    let g0 = raw(&s.cpu.addr, &gtls, 1).await.unwrap().hello.generation;
    let pair = g0 + 40;

    // The receiver's own next number is refused: the session follows the sender's.
    let r = raw_from(&s.cpu.addr, &gtls, 1, pair).await.unwrap();
    assert_eq!((r.hello.generation, r.hello.after), (g0, pair));
    let mut r = r;
    r.send(sync_request::Msg::Begin(Begin { generation: g0 + 1 }))
        .await;
    let e = r.recv().await.expect_err("refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(
        e.message().contains(&format!("expected {}", pair + 1)),
        "{e}"
    );
    drop(r);
    s.assert_intact();

    // A sender that knows no number (0, or an old one) changes nothing.
    let r = raw_from(&s.cpu.addr, &gtls, 1, g0 - 1).await.unwrap();
    assert_eq!((r.hello.generation, r.hello.after), (g0, g0));
    drop(r);

    // Exactly the next number after the pair's: committed as that generation.
    let mut r = raw_from(&s.cpu.addr, &gtls, 1, pair).await.unwrap();
    let file = vec![inline(b"jumped.txt", b"the pair's numbering")];
    let root = root_with(&mut r, &file).await;
    let g = r.begin().await;
    assert_eq!(g, pair + 1);
    r.send(ops(file)).await;
    r.send(commit(g, root.clone())).await;
    match r.recv().await.unwrap() {
        sync_response::Msg::Commit(c) => assert!(c.committed && c.generation == g, "{c:?}"),
        other => panic!("{other:?}"),
    }
    drop(r);
    let src_file = s.src().join("jumped.txt");
    fs::write(&src_file, b"the pair's numbering").unwrap();
    fs::set_permissions(&src_file, fs::Permissions::from_mode(0o644)).unwrap();
    set_mtime(&src_file, 1_700_000_000, 0);

    // Replayed or older: refused, in a session that knows the old number too.
    for (hello, begin) in [(0, g), (pair, g), (0, g0 + 1), (pair, pair)] {
        let mut r = raw_from(&s.cpu.addr, &gtls, 1, hello).await.unwrap();
        assert_eq!((r.hello.generation, r.hello.after), (g, g));
        r.send(sync_request::Msg::Begin(Begin { generation: begin }))
            .await;
        let e = r.recv().await.expect_err("refused");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    }
    let e = raw_from(&s.cpu.addr, &gtls, 1, u64::MAX)
        .await
        .map(|_| ())
        .expect_err("no generation can follow u64::MAX");
    assert!(e.message().contains("no number to follow"), "{e}");

    // The receiver restarted: its catalog replays the jump, the replica is what it committed.
    s.cpu.restart();
    assert_serving(&s, g).await;
    survived(&s, g).await;
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
                blake3: Vec::new(),
                ..file_entry(&[], 0o644)
            }),
            content: Some(upsert::Content::Stream(1)),
            zstd: false,
            delta: true,
            base_blake3: Vec::new(),
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
