//! Who may send: pairs, epochs, named machines, expired certificates.

use super::*;

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

/// Commands carry the coordinator's term: one from an older term than the newest the agent has
/// seen (a deposed leader's) is refused and changes nothing, also after the agent restarts (the
/// newest term is durable); the current term's next command is obeyed.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_from_an_older_coordinator_term_is_refused() {
    let mut s = Setup::new();
    let coord = FakeCoordinator::start(&s.pki).await;
    s.cpu.kill();
    let mut cpu = start_managed_cpu(&s, &coord.addr);
    let receive = |epoch| {
        command::Cmd::Receive(Receive {
            epoch,
            peer: "gpu".into(),
        })
    };
    let refusal = "refusing a command from an older coordinator term";
    let log = |s: &Setup| fs::read_to_string(&s.cpu.log).unwrap_or_default();
    coord.push_term(receive(2), 9);
    coord
        .wait_report(|r| r.epoch == 2, "the CPU at epoch 2")
        .await;
    // The deposed leader (term 5) asks for epoch 3: refused.
    coord.push_term(receive(3), 5);
    let refused = wait_until(std::time::Duration::from_secs(10), || {
        log(&s).contains(refusal)
    });
    assert!(refused, "{}", log(&s));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        durable_epoch(&s.cpu.state),
        2,
        "a stale term's command was obeyed"
    );
    // Restarted, it still knows term 9: the stream replays both commands, the stale one is
    // refused again.
    cpu.kill();
    let _ = fs::remove_file(&s.cpu.log);
    let _cpu = start_managed_cpu(&s, &coord.addr);
    let refused = wait_until(std::time::Duration::from_secs(15), || {
        log(&s).contains(refusal)
    });
    assert!(refused, "{}", log(&s));
    assert_eq!(durable_epoch(&s.cpu.state), 2);
    // The current leader's next command is obeyed.
    coord.push_term(receive(4), 9);
    coord
        .wait_report(|r| r.epoch == 4, "the CPU at epoch 4")
        .await;
    assert_eq!(durable_epoch(&s.cpu.state), 4);
    s.assert_intact();
}
