//! How an agent gets its identity: static certificates (`--tls-dir`), certificates it received
//! when it joined earlier (`<state-dir>/tls`), or joining now with a token.
//!
//! Joining generates the key pair locally (the private key never leaves the machine), sends a
//! CSR with the token, and verifies the coordinator on this very first connection against the CA
//! fingerprint the token carries. The signed certificate is kept in the state directory, so the
//! agent restarts without a token.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rustls_pki_types::pem::PemObject;

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

/// The agent's TLS material: from `tls_dir`, from an earlier join, or by joining now.
pub async fn identity(
    role: Role,
    state_dir: &Path,
    tls_dir: Option<&Path>,
    coordinator: Option<&str>,
    join_token: Option<&str>,
    machine: &str,
) -> anyhow::Result<TlsMaterial> {
    let dir = match tls_dir {
        Some(d) => d.to_path_buf(),
        None => joined_dir(state_dir),
    };
    let m = if dir.join(pki::CERT_FILE).exists() {
        TlsMaterial::load(&dir)
            .with_context(|| format!("loading certificates from {}", dir.display()))?
    } else if tls_dir.is_some() {
        bail!("no certificate in {}", dir.display());
    } else {
        let (Some(url), Some(token)) = (coordinator, join_token) else {
            bail!(
                "no certificate yet: give --tls-dir, or --coordinator with a --join-token to join"
            );
        };
        join(url, token, role, machine, &dir).await?
    };
    match &m.identity {
        Identity::Node { role: r, .. } if *r == role => Ok(m),
        other => bail!(
            "the certificate in {} is {other}, this agent needs a {role} certificate",
            dir.display()
        ),
    }
}

/// Joins with `token`; writes `ca.pem`, `node.pem`, `node.key` into `dir`.
pub async fn join(
    url: &str,
    token: &str,
    role: Role,
    machine: &str,
    dir: &Path,
) -> anyhow::Result<TlsMaterial> {
    let (t, _) = Token::parse(token).context("join token")?;
    if t.role != role {
        bail!(
            "the join token is for a {} agent, this is a {role} agent",
            t.role
        );
    }
    let id = Identity::node(&t.pair, role, machine)?;
    let (csr, key_pem) = pki::new_csr(&id)?;
    let reply = request(url, token, &t, role, machine, csr).await?;
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
    role: Role,
    machine: &str,
    csr_pem: String,
) -> anyhow::Result<JoinReply> {
    let cfg = tls::join_client_config(&t.ca_fingerprint)?;
    let ch = tls::connect(url, cfg)
        .await
        .with_context(|| format!("joining via {url}"))?;
    let reply = CoordinatorClient::new(ch)
        .join(JoinRequest {
            token: token.trim().to_string(),
            role: match role {
                Role::Gpu => crate::proto::Role::Gpu,
                Role::Cpu => crate::proto::Role::Cpu,
            } as i32,
            csr_pem,
            machine: machine.to_string(),
            advertise: String::new(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("the coordinator refused to join us: {}", s.message()))?;
    Ok(reply.into_inner())
}
