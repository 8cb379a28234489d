//! Frames that are not protobuf or whose length prefix lies.

use super::*;

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
        generation: 0,
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
