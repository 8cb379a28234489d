//! How an agent gets its identity: static certificates (`--tls-dir`), certificates it received
//! when it joined earlier (`<state-dir>/tls`), or joining now with a token.
//!
//! Joining generates the key pair locally (the private key never leaves the machine), sends a
//! CSR with the token, and verifies the coordinator on this very first connection against the CA
//! fingerprint the token carries. The signed certificate is kept in the state directory, so the
//! agent restarts without a token, and renews it later in place (`renewal`); a renewal a crash
//! cut short is rolled forward here, before the directory is loaded.

use std::path::{Path, PathBuf};

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

/// Sends the CSR with the token, trusting only the CA whose fingerprint the token carries.
async fn request(
    url: &str,
    token: &str,
    t: &Token,
    who: &Joiner<'_>,
    csr_pem: String,
) -> anyhow::Result<JoinReply> {
    let cfg = tls::join_client_config(&t.ca_fingerprint)?;
    // Several coordinators (highly available): the first that answers; a follower refuses
    // naming the leader (before it looks at the token), and the request goes there once. Any
    // other refusal is final; only an unreachable coordinator is skipped.
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
    let (ch, at) = first_answering(&crate::agent::link::addresses(url), &cfg)
        .await
        .map_err(|failed| {
            anyhow::anyhow!("joining via {url}: no coordinator answered ({failed})")
        })?;
    let refused =
        |s: tonic::Status| anyhow::anyhow!("the coordinator refused to join us: {}", s.message());
    let reply = match CoordinatorClient::new(ch).join(req.clone()).await {
        Ok(r) => r,
        Err(s) => match crate::proto::leader_named(&s).filter(|l| *l != at) {
            Some(leader) => {
                tracing::info!(follower = %at, %leader, "a follower named the leader: joining there");
                let ch = tls::connect(&leader, cfg.clone())
                    .await
                    .with_context(|| format!("joining via the leader {leader} that {at} named"))?;
                CoordinatorClient::new(ch)
                    .join(req)
                    .await
                    .map_err(refused)?
            }
            None => return Err(refused(s)),
        },
    };
    Ok(reply.into_inner())
}

/// A channel to the first of `addrs` that accepts a connection, and its address; or what each
/// one said.
async fn first_answering(
    addrs: &[String],
    cfg: &std::sync::Arc<rustls::ClientConfig>,
) -> Result<(tonic::transport::Channel, String), String> {
    let mut failed = Vec::new();
    for a in addrs {
        match tls::connect(a, cfg.clone()).await {
            Ok(ch) => return Ok((ch, a.clone())),
            Err(e) => failed.push(format!("{a}: {e:#}")),
        }
    }
    Err(failed.join("; "))
}
