//! How an agent gets its identity: static certificates (`--tls-dir`), certificates it received
//! when it joined earlier (`<state-dir>/tls`), or joining now with a token.
//!
//! Joining generates the key pair locally (the private key never leaves the machine), sends a
//! CSR with the token, and verifies the coordinator on this very first connection against the CA
//! fingerprint the token carries. The signed certificate is kept in the state directory, so the
//! agent restarts without a token, and renews it later in place (`renewal`); a renewal a crash
//! cut short is rolled forward here, before the directory is loaded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use rustls_pki_types::pem::PemObject;

use crate::agent::config::AgentConfig;
use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::{JoinReply, JoinRequest};
use crate::trust::identity::{Identity, Role};
use crate::trust::pki::{self, NodeCert};
use crate::trust::tls::{self, TlsMaterial};
use crate::trust::token::Token;

/// Where a joined agent keeps its certificates.
pub fn joined_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("tls")
}

/// The directory the agent's certificate lives in: `--tls-dir`, or where joining put it.
pub fn cert_dir(cfg: &AgentConfig) -> PathBuf {
    match &cfg.tls_dir {
        Some(d) => d.clone(),
        None => joined_dir(&cfg.state_dir),
    }
}

/// The agent's TLS material: from `--tls-dir`, from an earlier join, or by joining now.
pub async fn identity(cfg: &AgentConfig) -> anyhow::Result<TlsMaterial> {
    let dir = cert_dir(cfg);
    if pki::finish_renewal(&dir)
        .with_context(|| format!("completing a certificate renewal in {}", dir.display()))?
    {
        tracing::info!(dir = %dir.display(), "completed a certificate renewal cut short");
    }
    let m = if dir.join(pki::CERT_FILE).exists() {
        TlsMaterial::load(&dir)
            .with_context(|| format!("loading certificates from {}", dir.display()))?
    } else if cfg.tls_dir.is_some() {
        bail!("no certificate in {}", dir.display());
    } else {
        let (Some(url), Some(token)) = (&cfg.coordinator, &cfg.join_token) else {
            bail!(
                "no certificate yet: give --tls-dir, or --coordinator with a --join-token to join"
            );
        };
        let who = Joiner {
            role: cfg.role,
            machine: &cfg.machine,
            advertise: &cfg.advertise,
        };
        join(url, token, &who, &dir).await?
    };
    match &m.identity {
        Identity::Node { role: r, .. } if *r == cfg.role => Ok(m),
        other => bail!(
            "the certificate in {} is {other}, this agent needs a {} certificate",
            dir.display(),
            cfg.role
        ),
    }
}

/// Who joins: the seat's role, the machine's name and the address others reach it at.
pub struct Joiner<'a> {
    pub role: Role,
    pub machine: &'a str,
    pub advertise: &'a str,
}

/// Joins with `token`; writes `ca.pem`, `node.pem`, `node.key` into `dir`.
pub async fn join(
    url: &str,
    token: &str,
    who: &Joiner<'_>,
    dir: &Path,
) -> anyhow::Result<TlsMaterial> {
    let role = who.role;
    let (t, _) = Token::parse(token).context("join token")?;
    if t.role != role {
        bail!(
            "the join token is for a {} agent, this is a {role} agent",
            t.role
        );
    }
    let id = Identity::node(&t.pair, role, who.machine)?;
    let (csr, key_pem) = pki::new_csr(&id)?;
    let reply = request(url, token, &t, who, csr).await?;
    // The CA we are handed must be the one the token pinned.
    let ca_der = rustls_pki_types::CertificateDer::from_pem_slice(reply.ca_pem.as_bytes())
        .context("CA certificate from the coordinator")?;
    if pki::fingerprint(&ca_der) != t.ca_fingerprint {
        bail!("the coordinator sent a CA that does not match the join token");
    }
    NodeCert {
        ca_pem: reply.ca_pem,
        cert_pem: reply.cert_pem,
        key_pem,
    }
    .write_dir(dir)?;
    let m = TlsMaterial::load(dir)?;
    if m.identity != id {
        bail!("the coordinator issued {} instead of {id}", m.identity);
    }
    tracing::info!(identity = %id, "joined");
    Ok(m)
}

/// The first of the coordinators that accepts a connection, and its address. One that answers
/// but fails verification ends it, but when none answers, joining waits and tries again until
/// the token expires: a machine created just before its leader died
/// boots while the next one is being elected (ARCHITECTURE.md, "Highly available
/// coordinators"), and an agent that gave up would leave a machine that never joins.
async fn reach(
    url: &str,
    cfg: &std::sync::Arc<rustls::ClientConfig>,
    expires_unix: u64,
) -> anyhow::Result<(tonic::transport::Channel, String)> {
    let mut wait = JOIN_RETRY_FIRST;
    loop {
        let (mut failed, mut refused) = (Vec::new(), false);
        for a in crate::agent::link::addresses(url) {
            match tls::connect(&a, cfg.clone()).await {
                Ok(ch) => return Ok((ch, a)),
                Err(e) => {
                    refused |= !unanswered(&e);
                    failed.push(format!("{a}: {e:#}"));
                }
            }
        }
        if refused {
            bail!("joining via {url}: {}", failed.join("; "));
        }
        let now = crate::host::unix_ms_now() / 1000;
        let Some(next) = retry_wait(now, expires_unix, wait) else {
            bail!(
                "joining via {url}: no coordinator answered before the join token expired ({})",
                failed.join("; ")
            );
        };
        tracing::warn!(coordinator = %url, retry_in = ?next, errors = %failed.join("; "), "no coordinator answered the join; joining again until the token expires");
        tokio::time::sleep(next).await;
        wait = (wait * 2).min(JOIN_RETRY_MAX);
    }
}

/// Whether connecting failed because nothing answered (nothing listens, no route, no answer in
/// time), not because what answered failed verification (another CA: final).
fn unanswered(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::*;
    let by_kind = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | TimedOut
                    | HostUnreachable
                    | NetworkUnreachable
                    | AddrNotAvailable
                    | NotConnected
            )
        })
    });
    by_kind || format!("{e:#}").contains("timed out")
}

/// The first and the longest wait between two rounds of joining.
const JOIN_RETRY_FIRST: Duration = Duration::from_millis(250);
const JOIN_RETRY_MAX: Duration = Duration::from_secs(4);

/// How long to wait before the next round of joining, at `now_unix` with a token that expires
/// at `expires_unix`: `wait`, shortened to the token's last second; None once it expired.
fn retry_wait(now_unix: u64, expires_unix: u64, wait: Duration) -> Option<Duration> {
    let left = expires_unix.checked_sub(now_unix).filter(|l| *l > 0)?;
    Some(wait.min(Duration::from_secs(left)))
}

/// Sends the CSR with the token, trusting only the CA whose fingerprint the token carries.
async fn request(
    url: &str,
    token: &str,
    t: &Token,
    who: &Joiner<'_>,
    csr_pem: String,
) -> anyhow::Result<JoinReply> {
    let cfg = tls::join_client_config(&t.ca_fingerprint)?;
    // Several coordinators (highly available): the first that answers (waiting while none
    // does: `reach`); a follower refuses naming the leader (before it looks at the token), and
    // the request goes there once. Any other refusal is final.
    let req = JoinRequest {
        token: token.trim().to_string(),
        role: match who.role {
            Role::Gpu => crate::proto::Role::Gpu,
            Role::Cpu => crate::proto::Role::Cpu,
        } as i32,
        csr_pem,
        machine: who.machine.to_string(),
        advertise: who.advertise.to_string(),
    };
    let mut wait = JOIN_RETRY_FIRST;
    loop {
        let (ch, at) = reach(url, &cfg, t.expires_unix).await?;
        let e = match join_at(ch, &at, &req, &cfg).await {
            Ok(reply) => return Ok(reply),
            Err(Refusal::Final(e)) => return Err(e),
            Err(Refusal::NoLeader(e)) => e,
        };
        let now = crate::host::unix_ms_now() / 1000;
        let Some(next) = retry_wait(now, t.expires_unix, wait) else {
            return Err(e.context("no coordinator led before the join token expired"));
        };
        tracing::warn!(coordinator = %at, retry_in = ?next, error = %format!("{e:#}"), "no coordinator leads just now (a hand-over); joining again until the token expires");
        tokio::time::sleep(next).await;
        wait = (wait * 2).min(JOIN_RETRY_MAX);
    }
}

/// Why a join was not answered: for good, or because no coordinator leads just now (a follower
/// refused it and the leader it named does not answer, or does not lead either).
enum Refusal {
    Final(anyhow::Error),
    NoLeader(anyhow::Error),
}

/// The join sent to the coordinator at `at`; when it is a follower naming another leader, once
/// more to that one.
async fn join_at(
    ch: tonic::transport::Channel,
    at: &str,
    req: &JoinRequest,
    cfg: &std::sync::Arc<rustls::ClientConfig>,
) -> Result<JoinReply, Refusal> {
    let s = match CoordinatorClient::new(ch).join(req.clone()).await {
        Ok(r) => return Ok(r.into_inner()),
        Err(s) => s,
    };
    let Some(leader) = crate::proto::leader_named(&s).filter(|l| l != at) else {
        return Err(refusal(s));
    };
    tracing::info!(follower = %at, %leader, "a follower named the leader: joining there");
    let ch = tls::connect(&leader, cfg.clone()).await.map_err(|e| {
        let e = e.context(format!("joining via the leader {leader} that {at} named"));
        if unanswered(&e) {
            Refusal::NoLeader(e)
        } else {
            Refusal::Final(e)
        }
    })?;
    CoordinatorClient::new(ch)
        .join(req.clone())
        .await
        .map(|r| r.into_inner())
        .map_err(refusal)
}

/// A refusal is final unless it says the coordinator cannot serve just now (`UNAVAILABLE`: a
/// follower, or a leader whose engine is still loading).
fn refusal(s: tonic::Status) -> Refusal {
    let e = anyhow::anyhow!("the coordinator refused to join us: {}", s.message());
    if s.code() == tonic::Code::Unavailable {
        Refusal::NoLeader(e)
    } else {
        Refusal::Final(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joining_waits_for_a_coordinator_until_the_token_expires() {
        let w = Duration::from_secs(2);
        assert_eq!(retry_wait(100, 200, w), Some(w));
        assert_eq!(retry_wait(199, 200, w), Some(Duration::from_secs(1)));
        assert_eq!(retry_wait(200, 200, w), None);
        assert_eq!(retry_wait(300, 200, w), None);
    }

    /// A follower's (or a loading leader's) UNAVAILABLE means "no leader just now": joining
    /// waits; any other refusal ends it.
    #[test]
    fn only_an_unavailable_coordinator_makes_joining_wait() {
        let wait = |s| matches!(refusal(s), Refusal::NoLeader(_));
        assert!(wait(tonic::Status::unavailable(
            "this coordinator does not serve as the leader"
        )));
        assert!(!wait(tonic::Status::permission_denied("token used")));
        assert!(!wait(tonic::Status::invalid_argument("machine name")));
    }

    /// Nothing listens: joining waits while the token is valid.
    #[tokio::test]
    async fn joining_waits_while_nothing_answers() {
        crate::trust::tls::install_default_provider();
        let url = format!("127.0.0.1:{}", free_port());
        let cfg = tls::join_client_config(&"0".repeat(64)).unwrap();
        let later = crate::host::unix_ms_now() / 1000 + 3600;
        let r = tokio::time::timeout(Duration::from_secs(1), reach(&url, &cfg, later)).await;
        assert!(r.is_err(), "it gave up while the token is valid");
    }

    /// Something answers that is not a coordinator of the token's CA (here: no TLS at all):
    /// joining ends at once, it does not wait for the token to expire.
    #[tokio::test]
    async fn what_answers_wrongly_ends_the_join_at_once() {
        crate::trust::tls::install_default_provider();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let cfg = tls::join_client_config(&"0".repeat(64)).unwrap();
        let later = crate::host::unix_ms_now() / 1000 + 3600;
        let r = tokio::time::timeout(Duration::from_secs(5), reach(&url, &cfg, later)).await;
        let e = r.expect("it waited").unwrap_err();
        assert!(format!("{e:#}").contains(&url), "{e:#}");
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Nothing listens and the token has expired: one round, then a clear error naming the
    /// address, not a wait.
    #[tokio::test]
    async fn an_expired_token_stops_the_wait_with_the_addresses_tried() {
        crate::trust::tls::install_default_provider();
        let url = format!("127.0.0.1:{}", free_port());
        let cfg = tls::join_client_config(&"0".repeat(64)).unwrap();
        let e = reach(&url, &cfg, 1).await.unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("before the join token expired"), "{text}");
        assert!(text.contains(&url), "{text}");
    }
}
