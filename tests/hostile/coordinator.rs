//! The coordinator's doors: join tokens, reports, heartbeat streams, subscriptions, reflection.

use super::*;

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
