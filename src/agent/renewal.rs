//! Certificate renewal over the heartbeat stream (ARCHITECTURE.md, "Trust"). Past two thirds of
//! its life, or expired, the agent makes a new key pair and puts a CSR for it in its reports (at
//! most every [`RESEND`] until answered). The coordinator answers `Renewed`; the certificate is
//! checked (our identity, our new key, not older than the one it replaces), written crash-safely
//! into the directory the agent loaded its certificate from (`pki::write_renewal`; a start rolls
//! a half-done one forward), and presented from the next handshake on. Connections already up
//! keep the certificate they were made with.
//!
//! An expired agent still dials the coordinator, which lets such a connection renew and nothing
//! else; connections between agents stay strict.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::trust::identity::{CertFacts, Identity};
use crate::trust::keys::Keys;
use crate::trust::pki;
use crate::trust::tls::TlsMaterial;

/// The part of its life after which a certificate is renewed.
pub const DUE_AT: f64 = 2.0 / 3.0;
/// How often an unanswered CSR is sent again.
pub const RESEND: Duration = Duration::from_secs(5);

/// Why a `Renewed` certificate was not taken (the agent keeps asking).
#[derive(Debug, thiserror::Error)]
pub enum RenewalError {
    #[error("a renewed certificate arrived, but none was asked for")]
    Unasked,
    #[error("the renewed certificate is unreadable: {0}")]
    Unreadable(String),
    #[error("the renewed certificate names {got}, this agent is {want}")]
    WrongIdentity { got: Identity, want: Identity },
    #[error("the renewed certificate is not for the key this agent asked with: {0}")]
    WrongKey(String),
    #[error("the renewed certificate expires before the current one")]
    Older,
    #[error("saving the renewed certificate: {0}")]
    Save(#[from] pki::PkiError),
}

/// A CSR not answered yet: the key it is for, and when it was last sent.
struct Pending {
    key_pem: String,
    csr_pem: String,
    sent: Option<Instant>,
}

/// An agent's renewal: what it presents now, where that lives on disk, and the request in flight.
pub struct Renewal {
    dir: PathBuf,
    identity: Identity,
    keys: Arc<Keys>,
    pending: Mutex<Option<Pending>>,
}

impl Renewal {
    /// Renews the certificate `material` presents, kept in `dir`.
    pub fn new(dir: PathBuf, material: &TlsMaterial) -> Renewal {
        Renewal {
            dir,
            identity: material.identity.clone(),
            keys: material.keys.clone(),
            pending: Mutex::new(None),
        }
    }

    /// The CSR for the next report ("" when none is due): a new key is made once per renewal,
    /// and its request repeated every [`RESEND`] until the coordinator answers.
    pub fn csr(&self, now_unix: i64) -> String {
        if !self.keys.facts().past(DUE_AT, now_unix) {
            return String::new();
        }
        let mut pending = self.pending.lock().expect("renewal");
        if pending.is_none() {
            match pki::new_csr(&self.identity) {
                Ok((csr_pem, key_pem)) => {
                    tracing::info!(identity = %self.identity, "certificate due for renewal; asking the coordinator");
                    *pending = Some(Pending {
                        key_pem,
                        csr_pem,
                        sent: None,
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot make a key for renewal");
                    return String::new();
                }
            }
        }
        let p = pending.as_mut().expect("just set");
        if p.sent.is_some_and(|t| t.elapsed() < RESEND) {
            return String::new();
        }
        p.sent = Some(Instant::now());
        p.csr_pem.clone()
    }

    /// Takes the coordinator's answer: checks it, saves it, then presents it.
    pub fn renewed(&self, cert_pem: &str) -> Result<CertFacts, RenewalError> {
        let mut pending = self.pending.lock().expect("renewal");
        let key_pem = pending
            .as_ref()
            .map(|p| p.key_pem.clone())
            .ok_or(RenewalError::Unasked)?;
        let (chain, key, facts) = self.check(cert_pem, &key_pem)?;
        pki::write_renewal(&self.dir, cert_pem, &key_pem)?;
        self.keys
            .replace(chain, key)
            .map_err(|e| RenewalError::WrongKey(e.to_string()))?;
        *pending = None;
        tracing::info!(serial = %facts.serial, not_after = facts.not_after_unix, "certificate renewed");
        Ok(facts)
    }

    /// The chain and key a renewed certificate gives, when it is ours: our identity, the key we
    /// asked with, and not older than what we present now.
    fn check(
        &self,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
            CertFacts,
        ),
        RenewalError,
    > {
        let unreadable = |e: String| RenewalError::Unreadable(e);
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| unreadable(e.to_string()))?;
        let first = chain
            .first()
            .ok_or_else(|| unreadable("no certificate".into()))?;
        let facts = CertFacts::from_der(first).map_err(|e| unreadable(e.to_string()))?;
        if facts.identity != self.identity {
            return Err(RenewalError::WrongIdentity {
                got: facts.identity,
                want: self.identity.clone(),
            });
        }
        if facts.not_after_unix < self.keys.facts().not_after_unix {
            return Err(RenewalError::Older);
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| RenewalError::WrongKey(e.to_string()))?;
        // Refuses a certificate for another key before anything is written.
        Keys::new(chain.clone(), key.clone_key())
            .map_err(|e| RenewalError::WrongKey(e.to_string()))?;
        Ok((chain, key, facts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::identity::Role;
    use crate::trust::pki::{CERT_FILE, Ca, KEY_FILE};

    /// A renewal over a fresh directory holding a certificate of `days` for `id`.
    fn setup(ca: &Ca, id: &Identity, days: u32) -> (tempfile::TempDir, TlsMaterial, Renewal) {
        let d = tempfile::tempdir().unwrap();
        ca.issue(id, crate::trust::pki::days(days), &[])
            .unwrap()
            .write_dir(d.path())
            .unwrap();
        let m = TlsMaterial::load(d.path()).unwrap();
        let r = Renewal::new(d.path().to_path_buf(), &m);
        (d, m, r)
    }

    #[test]
    fn asks_past_two_thirds_and_takes_only_its_own_certificate() {
        let ca = Ca::generate().unwrap();
        let id = Identity::node("p", Role::Gpu, "m1").unwrap();
        let (d, m, r) = setup(&ca, &id, 3);
        let f = m.facts();
        let life = f.not_after_unix - f.not_before_unix;
        assert_eq!(r.csr(f.not_before_unix + life / 2), "", "not due yet");
        assert!(matches!(r.renewed("x"), Err(RenewalError::Unasked)));
        let due = f.not_before_unix + life * 3 / 4;
        let csr = r.csr(due);
        assert!(csr.contains("CERTIFICATE REQUEST"), "{csr}");
        assert_eq!(r.csr(due), "", "at most every RESEND");
        // Another identity, another key, garbage: refused, nothing changes.
        let other = Identity::node("p", Role::Gpu, "m2").unwrap();
        let wrong_id = ca
            .sign_csr(&csr, &other, crate::trust::pki::days(30), &[])
            .unwrap();
        assert!(matches!(
            r.renewed(&wrong_id),
            Err(RenewalError::WrongIdentity { .. })
        ));
        let (other_csr, _) = pki::new_csr(&id).unwrap();
        let wrong_key = ca
            .sign_csr(&other_csr, &id, crate::trust::pki::days(30), &[])
            .unwrap();
        assert!(matches!(
            r.renewed(&wrong_key),
            Err(RenewalError::WrongKey(_))
        ));
        assert!(matches!(
            r.renewed("garbage"),
            Err(RenewalError::Unreadable(_))
        ));
        assert_eq!(m.facts(), f);
        // Our own: saved, then presented by every clone of the material.
        let good = ca
            .sign_csr(&csr, &id, crate::trust::pki::days(30), &[])
            .unwrap();
        let facts = r.renewed(&good).unwrap();
        assert_ne!(facts.serial, f.serial);
        assert_eq!(m.clone().facts(), facts);
        assert_eq!(fs_read(&d, CERT_FILE), good);
        let back = TlsMaterial::load(d.path()).unwrap();
        assert_eq!(back.facts(), facts);
        assert!(fs_read(&d, KEY_FILE).contains("PRIVATE KEY"));
        assert_eq!(r.csr(due), "", "renewed: not due any more");
    }

    fn fs_read(d: &tempfile::TempDir, f: &str) -> String {
        std::fs::read_to_string(d.path().join(f)).unwrap()
    }
}
