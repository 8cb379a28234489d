//! What may be sent: paths, content, roots, signatures, and a full disk.

use super::*;

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
        root: m.root().to_vec(),
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
            base_blake3: Vec::new(),
        })),
    };
    if let Some(op::Change::Upsert(u)) = &mut stream.change {
        u.entry.as_mut().unwrap().blake3 = Vec::new();
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
        blake3: blake3::hash(&new).as_bytes().to_vec(),
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
                base_blake3: Vec::new(),
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
        blake3: vec![0u8; 32],
        size: lit.len() as u64,
    }))
    .await;

    // Committing asks for all three again, whole; nothing is committed, twice over.
    for _ in 0..2 {
        r.send(sync_request::Msg::Commit(Commit {
            generation: g,
            root: vec![0u8; 32],
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
        root: vec![9u8; 32],
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
        root: vec![],
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
                            root: m.root().to_vec(),
                            entries: m.len() as u64,
                            after: 0,
                        }))
                    }
                    Some(sync_request::Msg::Manifest(_)) => {
                        reply(sync_response::Msg::Manifest(ManifestChunk {
                            generation: 1,
                            root: m.root().to_vec(),
                            items: m
                                .iter()
                                .map(|(p, e)| ManifestItem {
                                    path: p.as_bytes().to_vec(),
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

/// A stream of copies from the replica's committed `big.bin` (300,000 bytes of 3), whose
/// upsert declares `new` and names `base` as the replica's content; `chunks` follow it.
async fn copy_stream(r: &Raw, id: u32, new: &[u8], base: &[u8], chunks: Vec<chunk::Data>) {
    let op = Op {
        path: "big.bin".into(),
        change: Some(op::Change::Upsert(Upsert {
            entry: Some(file_entry(new, 0o644)),
            content: Some(upsert::Content::Stream(id)),
            zstd: false,
            delta: false,
            base_blake3: base.to_vec(),
        })),
    };
    r.send(sync_request::Msg::Ops(Ops { ops: vec![op] })).await;
    for data in chunks {
        let len = match &data {
            chunk::Data::Literal(b) => b.len() as u32,
            _ => 1000,
        };
        r.send(sync_request::Msg::Chunk(Chunk {
            file: id,
            len,
            data: Some(data),
        }))
        .await;
    }
    r.send(sync_request::Msg::End(FileEnd {
        file: id,
        aborted: false,
        blake3: blake3::hash(new).as_bytes().to_vec(),
        size: new.len() as u64,
    }))
    .await;
}

/// Commits and expects `big.bin` asked for again, whole, and nothing committed.
async fn expect_retry(r: &mut Raw, g: u64, case: &str) {
    r.send(sync_request::Msg::Commit(Commit {
        generation: g,
        root: vec![0u8; 32],
    }))
    .await;
    match r.recv().await.unwrap() {
        sync_response::Msg::Commit(c) => {
            assert!(!c.committed, "{case}");
            assert_eq!(c.retry, [b"big.bin".to_vec()], "{case}");
        }
        other => panic!("{case}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_copies_are_refused_and_never_committed() {
    let s = Setup::new();
    let gtls = s.pki.node("p", Role::Gpu);
    let base = vec![3u8; 300_000];
    let held = blake3::hash(&base).as_bytes().to_vec();
    // Each new content is 1000 bytes of 3: what one good copy of the base would produce.
    let new = vec![3u8; 1000];
    let copy = chunk::Data::Copy;
    let cases: Vec<(&str, Vec<u8>, Vec<chunk::Data>)> = vec![
        (
            "a base the replica does not hold",
            vec![9u8; 32],
            vec![copy(0)],
        ),
        (
            "a copy past the base's end",
            held.clone(),
            vec![copy(299_500)],
        ),
        (
            "an offset that overflows",
            held.clone(),
            vec![copy(u64::MAX - 10)],
        ),
        (
            "a copy in a stream that names no base",
            Vec::new(),
            vec![copy(0)],
        ),
        (
            "output past the declared size",
            held.clone(),
            vec![copy(0), copy(0)],
        ),
        (
            "a literal past the declared size",
            held.clone(),
            vec![copy(0), chunk::Data::Literal(Bytes::from_static(b"more"))],
        ),
    ];
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    let g = r.begin().await;
    for (id, (case, named, chunks)) in (40..).zip(cases) {
        copy_stream(&r, id, &new, &named, chunks).await;
        expect_retry(&mut r, g, case).await;
    }
    // The same copy, well formed, against the content the replica holds, is accepted (its
    // root is wrong on purpose: nothing may be committed here).
    copy_stream(&r, 60, &new, &held, vec![copy(0)]).await;
    r.send(sync_request::Msg::Commit(Commit {
        generation: g,
        root: vec![0u8; 32],
    }))
    .await;
    let e = r.recv().await.expect_err("root mismatch");
    assert!(e.message().contains("root mismatch"), "{e}");
    // Deltas and copies in one stream: a protocol error that ends the session.
    let mut r = raw(&s.cpu.addr, &gtls, 1).await.unwrap();
    r.begin().await;
    let op = Op {
        path: "big.bin".into(),
        change: Some(op::Change::Upsert(Upsert {
            entry: Some(file_entry(&new, 0o644)),
            content: Some(upsert::Content::Stream(1)),
            zstd: false,
            delta: true,
            base_blake3: held.clone(),
        })),
    };
    r.send(sync_request::Msg::Ops(Ops { ops: vec![op] })).await;
    let e = r.recv().await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("deltas and of copies"), "{e}");
    drop(r);
    s.assert_intact();
}
