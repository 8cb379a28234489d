//! Trust that survives a replaced machine, from the coordinator's side, end to end: a real
//! `coordinator serve` on loopback and raw gRPC clients that join, heartbeat and renew as an
//! agent would (or lie as an agent would not): machine-bound join tokens, a heartbeat that
//! names another machine, a machine replaced in its seat (revoked at once: its open stream
//! ends, its next handshake fails), renewal over the heartbeat, and a certificate that expired
//! within the grace (it may renew, nothing else).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command as Cmd;
use std::time::Duration;

use common::*;
use standby::proto::coordinator_client::CoordinatorClient;
use standby::proto::{AgentReport, Command, JoinRequest, command};
use standby::trust::identity::{CertFacts, Identity, Role};
use standby::trust::pki::{Ca, NodeCert};
use standby::trust::tls::{self, Expect, TlsMaterial};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

/// `coordinator token`, optionally bound to a machine.
fn token(c: &Coord, pair: &str, role: &str, machine: Option<&str>) -> String {
    let mut cmd = Cmd::new(COORDINATOR);
    cmd.args(["token", "--dir"])
        .arg(&c.dir)
        .args(["--pair", pair, "--role", role, "--ttl", "10m"]);
    if let Some(m) = machine {
        cmd.args(["--machine", m]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn proto_role(role: Role) -> standby::proto::Role {
    match role {
        Role::Gpu => standby::proto::Role::Gpu,
        Role::Cpu => standby::proto::Role::Cpu,
    }
}

/// Joins as `machine` with a raw client; on success, writes the TLS directory under `t`.
async fn join(
    c: &Coord,
    t: &Path,
    tok: &str,
    role: Role,
    machine: &str,
) -> Result<PathBuf, Status> {
    let fp = Ca::load(&c.dir).unwrap().fingerprint();
    let ch = tls::connect(&c.addr, tls::join_client_config(&fp).unwrap())
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    // The CSR's subject is informative only: the coordinator names the certificate.
    let id = Identity::node("p", role, "csr").unwrap();
    let (csr, key_pem) = standby::trust::pki::new_csr(&id).unwrap();
    let r = CoordinatorClient::new(ch)
        .join(JoinRequest {
            token: tok.to_string(),
            role: proto_role(role) as i32,
            csr_pem: csr,
            machine: machine.into(),
            advertise: String::new(),
        })
        .await?
        .into_inner();
    let dir = t.join(format!("tls-{machine}"));
    NodeCert {
        ca_pem: r.ca_pem,
        cert_pem: r.cert_pem,
        key_pem,
    }
    .write_dir(&dir)
    .unwrap();
    Ok(dir)
}

fn facts(tls_dir: &Path) -> CertFacts {
    facts_pem(&std::fs::read_to_string(tls_dir.join("node.pem")).unwrap())
}

fn facts_pem(pem: &str) -> CertFacts {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    CertFacts::from_der(&der).unwrap()
}

/// An open heartbeat stream: reports go in, commands come out.
struct Beat {
    tx: mpsc::Sender<AgentReport>,
    rx: Streaming<Command>,
}

impl Beat {
    async fn open(c: &Coord, tls_dir: &Path) -> Result<Beat, Status> {
        let m = TlsMaterial::load(tls_dir).unwrap();
        let cfg = m
            .client_config(Expect::Exactly(Identity::Coordinator))
            .unwrap();
        let ch = tls::connect(&c.addr, cfg)
            .await
            .map_err(|e| Status::unavailable(format!("{e:#}")))?;
        let (tx, out) = mpsc::channel(16);
        let rx = CoordinatorClient::new(ch)
            .heartbeat(ReceiverStream::new(out))
            .await?
            .into_inner();
        Ok(Beat { tx, rx })
    }

    async fn report(&self, machine: &str, csr_pem: &str) {
        let r = AgentReport {
            machine: machine.into(),
            csr_pem: csr_pem.into(),
            ..Default::default()
        };
        let _ = self.tx.send(r).await;
    }

    /// The next command within `d` (Err: the stream ended with this status, or timed out).
    async fn next(&mut self, d: Duration) -> Result<command::Cmd, Status> {
        match tokio::time::timeout(d, self.rx.message()).await {
            Err(_) => Err(Status::deadline_exceeded("no command")),
            Ok(Err(s)) => Err(s),
            Ok(Ok(None)) => Err(Status::aborted("stream ended")),
            Ok(Ok(Some(c))) => Ok(c.cmd.unwrap()),
        }
    }

    /// Reads commands until one `f` picks (or the stream ends).
    async fn until<T>(
        &mut self,
        d: Duration,
        mut f: impl FnMut(&command::Cmd) -> Option<T>,
    ) -> Result<T, Status> {
        let end = tokio::time::Instant::now() + d;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let c = self.next(left).await?;
            if let Some(t) = f(&c) {
                return Ok(t);
            }
        }
    }
}

fn events(c: &Coord) -> String {
    String::from_utf8_lossy(&c.admin(&["events", "--json"]).stdout).to_string()
}

fn refused_count(c: &Coord, reason: &str) -> u64 {
    let m = http_get(&c.metrics, "/metrics");
    let key = format!("standby_refused_total{{reason=\"{reason}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_bound_to_one_machine_is_refused_to_another() {
    let t = tempfile::tempdir().unwrap();
    let c = Coord::start(&t.path().join("c"), &[]);
    let tok = token(&c, "p", "gpu", Some("machine-a"));
    let e = join(&c, t.path(), &tok, Role::Gpu, "machine-b")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("machine machine-a"), "{e}");
    assert_eq!(refused_count(&c, "wrong_machine"), 1);
    assert!(events(&c).contains("wrong_machine"));
    // The refusal did not spend it: machine A joins, once.
    let dir = join(&c, t.path(), &tok, Role::Gpu, "machine-a")
        .await
        .unwrap();
    assert_eq!(
        facts(&dir).identity,
        Identity::node("p", Role::Gpu, "machine-a").unwrap()
    );
    let e = join(&c, t.path(), &tok, Role::Gpu, "machine-a")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert_eq!(refused_count(&c, "token_spent"), 1);
    // A machine name that cannot be a name is refused before anything is used.
    let unbound = token(&c, "p", "gpu", None);
    let e = join(&c, t.path(), &unbound, Role::Gpu, "bad/name")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    join(&c, t.path(), &unbound, Role::Gpu, "machine-c")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_heartbeat_naming_another_machine_is_refused_with_an_event() {
    let t = tempfile::tempdir().unwrap();
    let c = Coord::start(&t.path().join("c"), &[]);
    let dir = join(&c, t.path(), &token(&c, "p", "cpu", None), Role::Cpu, "c1")
        .await
        .unwrap();
    let mut b = Beat::open(&c, &dir).await.unwrap();
    b.report("c2", "").await;
    let e = b
        .until(Duration::from_secs(10), |_| None::<()>)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("c2"), "{e}");
    assert!(events(&c).contains("wrong_machine"), "{}", events(&c));
    assert_eq!(refused_count(&c, "wrong_machine"), 1);
    // Its own name is heard.
    let b = Beat::open(&c, &dir).await.unwrap();
    b.report("c1", "").await;
    assert!(wait_until(Duration::from_secs(10), || c
        .pair("p")
        .is_some()));
}

/// A second machine joins the GPU seat: the first is retired. Its open heartbeat stream ends
/// within a heartbeat, its next handshake is refused, and the list every stream receives names
/// its serial.
#[tokio::test(flavor = "multi_thread")]
async fn a_machine_replaced_in_its_seat_is_revoked_and_cut_off() {
    let t = tempfile::tempdir().unwrap();
    let c = Coord::start(&t.path().join("c"), &[]);
    let g1 = join(&c, t.path(), &token(&c, "p", "gpu", None), Role::Gpu, "g1")
        .await
        .unwrap();
    let cpu = join(&c, t.path(), &token(&c, "p", "cpu", None), Role::Cpu, "c1")
        .await
        .unwrap();
    let old = facts(&g1).serial;
    let mut b1 = Beat::open(&c, &g1).await.unwrap();
    b1.report("g1", "").await;
    let first = b1
        .until(Duration::from_secs(10), |c| match c {
            command::Cmd::Revocations(r) => Some(r.serials.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert!(first.is_empty(), "{first:?}");
    let mut bc = Beat::open(&c, &cpu).await.unwrap();
    bc.report("c1", "").await;

    join(&c, t.path(), &token(&c, "p", "gpu", None), Role::Gpu, "g2")
        .await
        .unwrap();
    let e = b1
        .until(Duration::from_secs(2), |_| None::<()>)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(e.message().contains("revoked"), "{e}");
    let list = bc
        .until(Duration::from_secs(5), |c| match c {
            command::Cmd::Revocations(r) if !r.serials.is_empty() => Some(r.serials.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(list, vec![old.clone()]);
    // A new connection with the revoked certificate fails at the handshake.
    let e = match Beat::open(&c, &g1).await {
        Ok(mut b) => {
            b.report("g1", "").await;
            b.next(Duration::from_secs(5)).await.unwrap_err()
        }
        Err(e) => e,
    };
    assert_ne!(e.code(), Code::Ok);
    assert!(events(&c).contains("revoked"), "{}", events(&c));
    assert!(refused_count(&c, "revoked") >= 1);
    // Revocations are durable: a restarted coordinator still refuses it.
    let mut c = c;
    c.restart();
    assert!(
        Beat::open(&c, &g1).await.is_err() || {
            let mut b = Beat::open(&c, &g1).await.unwrap();
            b.report("g1", "").await;
            b.next(Duration::from_secs(5)).await.is_err()
        }
    );
}

/// `--cert-lifetime 20s`: joins get 20 s certificates (backdated by 2 s), and a CSR on the
/// heartbeat is answered with a certificate for the same identity and the new key.
#[tokio::test(flavor = "multi_thread")]
async fn renewal_over_the_heartbeat_keeps_the_identity_and_the_lifetime() {
    let t = tempfile::tempdir().unwrap();
    let c = Coord::start(&t.path().join("c"), &["--cert-lifetime", "20s"]);
    let dir = join(&c, t.path(), &token(&c, "p", "gpu", None), Role::Gpu, "g1")
        .await
        .unwrap();
    let f = facts(&dir);
    assert_eq!(f.not_after_unix - f.not_before_unix, 22, "{f:?}");
    let id = Identity::node("p", Role::Gpu, "g1").unwrap();
    let mut b = Beat::open(&c, &dir).await.unwrap();
    let (csr, _key) = standby::trust::pki::new_csr(&id).unwrap();
    b.report("g1", &csr).await;
    let pem = b
        .until(Duration::from_secs(10), |c| match c {
            command::Cmd::Renewed(r) => Some(r.cert_pem.clone()),
            _ => None,
        })
        .await
        .unwrap();
    let n = facts_pem(&pem);
    assert_eq!(n.identity, id);
    assert_ne!(n.serial, f.serial);
    assert_eq!(n.not_after_unix - n.not_before_unix, 22);
    let m = http_get(&c.metrics, "/metrics");
    assert!(
        m.contains("standby_certificate_expiry_timestamp_seconds{kind=\"server\""),
        "{m}"
    );
    assert!(m.contains("standby_certificate_lifetime_seconds 20"), "{m}");
    let agent = "kind=\"agent\",pair=\"p\",role=\"gpu\",machine=\"g1\"";
    let shown = wait_until(Duration::from_secs(5), || {
        http_get(&c.metrics, "/metrics").contains(agent)
    });
    assert!(shown, "{}", http_get(&c.metrics, "/metrics"));
}

/// A certificate that expired within the grace reaches the coordinator, may renew, and is
/// listened to for nothing else: its reports do not even create the pair.
#[tokio::test(flavor = "multi_thread")]
async fn an_expired_certificate_within_the_grace_may_only_renew() {
    let t = tempfile::tempdir().unwrap();
    let c = Coord::start(
        &t.path().join("c"),
        &["--cert-lifetime", "2s", "--renew-grace", "1h"],
    );
    let dir = join(&c, t.path(), &token(&c, "p", "cpu", None), Role::Cpu, "c1")
        .await
        .unwrap();
    let f = facts(&dir);
    let wait = f.not_after_unix + 2 - (unix_ms() / 1000) as i64;
    tokio::time::sleep(Duration::from_secs(wait.max(0) as u64)).await;
    let mut b = Beat::open(&c, &dir).await.unwrap();
    b.report("c1", "").await;
    b.report("c1", "").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        c.pair("p").is_none(),
        "an expired certificate was listened to"
    );
    let id = Identity::node("p", Role::Cpu, "c1").unwrap();
    let (csr, _key) = standby::trust::pki::new_csr(&id).unwrap();
    b.report("c1", &csr).await;
    let pem = b
        .until(Duration::from_secs(10), |c| match c {
            command::Cmd::Renewed(r) => Some(r.cert_pem.clone()),
            _ => None,
        })
        .await
        .unwrap();
    let n = facts_pem(&pem);
    assert_eq!(n.identity, id);
    assert!(n.not_after_unix > (unix_ms() / 1000) as i64);
    assert!(c.pair("p").is_none());
    // An admin certificate expired within the grace gets through the handshake, and no further.
    let ca = Ca::load(&c.dir).unwrap();
    let admin_dir = t.path().join("admin-expired");
    ca.issue(
        &Identity::admin("late").unwrap(),
        Duration::from_secs(1),
        &[],
    )
    .unwrap()
    .write_dir(&admin_dir)
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = TlsMaterial::load(&admin_dir).unwrap();
    let cfg = m
        .client_config(Expect::Exactly(Identity::Coordinator))
        .unwrap();
    let ch = tls::connect(&c.addr, cfg).await.unwrap();
    let e = standby::proto::admin_client::AdminClient::new(ch)
        .list_pairs(standby::proto::ListPairsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("expired"), "{e}");
}

/// A cloud of the `command` provider (`tests/command-cloud/`) whose GPU machines never join:
/// their "agent" only writes down the join token it was given. Wrappers give the scripts their
/// settings, so nothing changes this process's environment.
fn silent_cloud(t: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let cloud = t.join("cloud");
    let bins = t.join("bins");
    let wrappers = t.join("wrappers");
    let tokens = t.join("tokens");
    for d in [&cloud, &bins, &wrappers] {
        std::fs::create_dir_all(d).unwrap();
    }
    let exec = |p: &Path, body: String| {
        std::fs::write(p, body).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    exec(
        &bins.join("agent-gpu"),
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$STANDBY_JOIN_TOKEN\" >>'{}'\nexec sleep 600\n",
            tokens.display()
        ),
    );
    let mut toml = String::from("[command]\n");
    for op in ["create", "destroy", "list", "get", "search"] {
        exec(
            &wrappers.join(op),
            format!(
                "#!/bin/sh\nexport CLOUD_DIR='{}' CLOUD_AGENT_BIN_DIR='{}'\nexec '{}/{op}' \"$@\"\n",
                cloud.display(),
                bins.display(),
                command_cloud().display()
            ),
        );
        let v = wrappers.join(op).display().to_string();
        match op {
            "search" => toml += &format!("search = [\"{v}\"]\n"),
            _ => toml += &format!("{op} = \"{v}\"\n"),
        }
    }
    toml += "timeout = \"30s\"\n";
    let cfg = t.join("coordinator.toml");
    std::fs::write(&cfg, toml).unwrap();
    (cloud, cfg, tokens)
}

/// After a failover the coordinator provisions a new GPU. Its attempt's token is bound to the
/// attempt's label (another machine is refused), and once the attempt is torn down (its machine
/// never joined within the boot timeout) the token is spent: using it then is refused.
#[test]
fn an_attempts_token_is_bound_to_its_label_and_spent_at_teardown() {
    let t = tempfile::tempdir().unwrap();
    let (cloud, cfg, tokens) = silent_cloud(t.path());
    let _reaper = MachineReaper(cloud.clone());
    let cfg = cfg.to_str().unwrap();
    let c = Coord::start(
        &t.path().join("c"),
        &[
            "--provider",
            "command",
            "--boot-timeout",
            "3s",
            "--backoff-base",
            "200ms",
            "--config",
            cfg,
        ],
    );
    let (_cpu, gpu) = hand_joined_pair(&c, t.path(), "p", 20);
    drop(gpu);
    let read = || -> Vec<String> {
        std::fs::read_to_string(&tokens)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(60), || !read().is_empty()),
        "no attempt: {}",
        c.log_text()
    );
    let first = read()[0].clone();
    let (parsed, _) = standby::trust::token::Token::parse(&first).unwrap();
    let label = parsed
        .machine
        .clone()
        .expect("an attempt's token names its label");
    assert!(label.contains("-p-gpu-"), "{label}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let e = rt
        .block_on(join(&c, t.path(), &first, Role::Gpu, "intruder"))
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains(&label), "{e}");
    // Torn down: it never joined within the boot timeout (the cloud's one offer is then
    // blocklisted, so there may be no second attempt).
    let destroyed = format!("machine {label} destroyed");
    assert!(
        wait_until(Duration::from_secs(60), || c
            .log_text()
            .contains(&destroyed)),
        "the attempt was not torn down: {}",
        c.log_text()
    );
    let e = rt
        .block_on(join(&c, t.path(), &first, Role::Gpu, &label))
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("already used"), "{e}");
    assert!(refused_count(&c, "token_spent") >= 1);
    assert!(refused_count(&c, "wrong_machine") >= 1);
}
