//! The certificate authority: a CA key pair kept by the coordinator, and certificates that name
//! their holder by URI SAN. Issued certificates never inherit anything a requester asked for
//! (a CSR can ask to be a CA): every field is set here.

use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::trust::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Files of a node's TLS directory.
pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "node.pem";
pub const KEY_FILE: &str = "node.key";

/// Writes `bytes` to `path` with mode 0600 (also when the file already existed).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        io::Write::write_all(&mut f, bytes).map_err(io_at(&tmp))?;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_at(&tmp))?;
        f.sync_all().map_err(io_at(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_at(path))?;
    crate::disk::crashsafe::fsync_dir(path.parent().unwrap_or(Path::new("."))).map_err(io_at(path))
}

pub fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_at(dir))
}

/// A certificate with its private key and the CA that issued it.
pub struct NodeCert {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl NodeCert {
    /// Writes `ca.pem`, `node.pem` and `node.key`, each mode 0600, into `dir` (mode 0700).
    pub fn write_dir(&self, dir: &Path) -> Result<(), PkiError> {
        create_private_dir(dir)?;
        // The certificate last: a directory with `node.pem` is complete (an agent that joined
        // and crashed half-way must not find a certificate without its key).
        write_private(&dir.join(CA_FILE), self.ca_pem.as_bytes())?;
        write_private(&dir.join(KEY_FILE), self.key_pem.as_bytes())?;
        write_private(&dir.join(CERT_FILE), self.cert_pem.as_bytes())
    }
}

pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
}

fn serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and without a leading zero byte
    SerialNumber::from_slice(&b)
}

impl Ca {
    /// A new CA (ECDSA P-256), valid for 20 years.
    pub fn generate() -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let tag: [u8; 4] = rand::random();
        dn.push(
            DnType::CommonName,
            format!("Standby CA {}", crate::text::hex(&tag)),
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(365 * 20);
        p.serial_number = Some(serial());
        let cert = p.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key,
        })
    }

    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let cp = dir.join("ca.pem");
        let kp = dir.join("ca.key");
        let cert_pem = fs::read_to_string(&cp).map_err(io_at(&cp))?;
        let key_pem = fs::read_to_string(&kp).map_err(io_at(&kp))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PkiError::Invalid(format!("{}: {e}", cp.display())))?;
        Ok(Ca {
            cert_pem,
            cert_der,
            key,
        })
    }

    /// Writes `ca.pem` (0644) and `ca.key` (0600) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        create_private_dir(dir)?;
        write_private(&dir.join("ca.key"), self.key.serialize_pem().as_bytes())?;
        let cp = dir.join("ca.pem");
        crate::disk::crashsafe::write_atomic(&cp, self.cert_pem.as_bytes()).map_err(io_at(&cp))?;
        fs::set_permissions(&cp, fs::Permissions::from_mode(0o644)).map_err(io_at(&cp))
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the CA certificate (DER), hex: what a join token pins.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    fn params_for(id: &Identity, lifetime: Duration) -> Result<CertificateParams, PkiError> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id.uri());
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::URI(id.uri().try_into()?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let (not_before, not_after) = validity(time::OffsetDateTime::now_utc(), lifetime);
        p.not_before = not_before;
        p.not_after = not_after;
        p.serial_number = Some(serial());
        p.use_authority_key_identifier_extension = true;
        Ok(p)
    }

    fn sign(
        &self,
        id: &Identity,
        lifetime: Duration,
        public: &impl PublicKeyData,
    ) -> Result<String, PkiError> {
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        Ok(Self::params_for(id, lifetime)?
            .signed_by(public, &issuer)?
            .pem())
    }

    /// A certificate for `id` with a fresh key pair, valid for `lifetime` (see [`validity`]).
    pub fn issue(&self, id: &Identity, lifetime: Duration) -> Result<NodeCert, PkiError> {
        let key = KeyPair::generate()?;
        Ok(NodeCert {
            ca_pem: self.cert_pem.clone(),
            cert_pem: self.sign(id, lifetime, &key)?,
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a CSR's public key as `id`. Nothing but the key is taken from the request.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &Identity,
        lifetime: Duration,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        self.sign(id, lifetime, &csr.public_key)
    }
}

/// `n` days, as a certificate lifetime.
pub fn days(n: u32) -> Duration {
    Duration::from_secs(u64::from(n.max(1)) * 86_400)
}

/// A certificate issued at `now` for `lifetime` (at least one second): valid from a little
/// before `now`, so a peer whose clock is slightly behind accepts it at once, by
/// min(5 minutes, lifetime / 10); until `now + lifetime`.
pub fn validity(
    now: time::OffsetDateTime,
    lifetime: Duration,
) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let lifetime = lifetime.max(Duration::from_secs(1));
    let back = (lifetime / 10).min(Duration::from_secs(300));
    (now - back, now + lifetime)
}

pub fn fingerprint(der: &[u8]) -> String {
    crate::text::hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// A fresh key pair and a CSR for it (the subject is informative only).
pub fn new_csr(id: &Identity) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id.uri());
    p.distinguished_name = dn;
    let csr = p.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::identity::Role;

    #[test]
    fn issue_and_read_back_identity() {
        let ca = Ca::generate().unwrap();
        let id = Identity::node("p1", Role::Cpu, "m1").unwrap();
        let n = ca.issue(&id, days(30)).unwrap();
        let der = CertificateDer::from_pem_slice(n.cert_pem.as_bytes()).unwrap();
        assert_eq!(Identity::from_cert_der(&der).unwrap(), id);
        let d = tempfile::tempdir().unwrap();
        n.write_dir(&d.path().join("o")).unwrap();
        for f in [CA_FILE, CERT_FILE, KEY_FILE] {
            let m = fs::metadata(d.path().join("o").join(f)).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}");
        }
    }

    #[test]
    fn csr_cannot_choose_identity_or_ca() {
        let ca = Ca::generate().unwrap();
        // The requester asks to be a CA for another pair; only its key is used.
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let id = Identity::node("mine", Role::Gpu, "m2").unwrap();
        let pem = ca.sign_csr(&csr, &id, days(1)).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(Identity::from_cert_der(&der).unwrap(), id);
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!x.is_ca());
    }

    #[test]
    fn ca_save_load() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::generate().unwrap();
        ca.save(d.path()).unwrap();
        let back = Ca::load(d.path()).unwrap();
        assert_eq!(back.fingerprint(), ca.fingerprint());
        let m = fs::metadata(d.path().join("ca.key")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
    }

    /// Short lifetimes are backdated by a tenth of their life, long ones by five minutes; the
    /// certificate ends exactly `lifetime` after issue.
    #[test]
    fn validity_backdates_by_a_tenth_up_to_five_minutes() {
        let now = time::OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        let (nb, na) = validity(now, Duration::from_secs(20));
        assert_eq!(
            (nb.unix_timestamp(), na.unix_timestamp()),
            (999_998, 1_000_020)
        );
        let (nb, na) = validity(now, days(1));
        assert_eq!(
            (nb.unix_timestamp(), na.unix_timestamp()),
            (1_000_000 - 300, 1_000_000 + 86_400)
        );
        let ca = Ca::generate().unwrap();
        let id = Identity::node("p", Role::Gpu, "m").unwrap();
        let n = ca.issue(&id, Duration::from_secs(20)).unwrap();
        let der = CertificateDer::from_pem_slice(n.cert_pem.as_bytes()).unwrap();
        let f = crate::trust::identity::CertFacts::from_der(&der).unwrap();
        assert_eq!(f.not_after_unix - f.not_before_unix, 22);
    }
}
