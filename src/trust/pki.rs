//! The certificate authority: a CA key pair kept by the coordinator, and certificates that name
//! their holder by URI SAN. Issued certificates never inherit anything a requester asked for
//! (a CSR can ask to be a CA): every field is set here. Besides the URI identity a certificate
//! may carry DNS and IP names ([`San`]) for the addresses its holder serves, so that stock gRPC
//! clients verify host names as usual; those too are chosen here, never by a requester.

use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::str::FromStr;
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

/// A host name or address a certificate is valid for, besides its identity: what a stock client
/// (grpcurl, Python grpcio, grpc-go) checks against the host it dialled. Only the coordinator
/// chooses these (its flags, an agent's advertised address), never a certificate request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum San {
    /// A DNS name, lower case, without wildcards.
    Dns(String),
    Ip(IpAddr),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SanError {
    #[error("empty host name")]
    Empty,
    #[error("{0:?}: longer than 253 characters")]
    TooLong(String),
    #[error("{0:?}: wildcards are not allowed (name each host)")]
    Wildcard(String),
    #[error(
        "{0:?}: not an IP address, nor a DNS name (labels of 1 to 63 letters, digits or \
         '-', not starting or ending with '-', the last one not all digits)"
    )]
    Invalid(String),
}

/// The longest DNS name, in its text form without the trailing dot.
const MAX_DNS_NAME: usize = 253;
const MAX_DNS_LABEL: usize = 63;

impl FromStr for San {
    type Err = SanError;

    /// An IP address (IPv6 also in brackets) or a DNS name.
    fn from_str(s: &str) -> Result<San, SanError> {
        let s = s.trim();
        let unbracketed = s
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(San::Ip(ip));
        }
        check_dns_name(s)?;
        Ok(San::Dns(s.to_ascii_lowercase()))
    }
}

/// A DNS name as certificates carry it: no wildcards, no trailing dot, and a last label that
/// cannot be read as a number (so `10.0.0.256` is refused, not taken as a name).
fn check_dns_name(s: &str) -> Result<(), SanError> {
    if s.is_empty() {
        return Err(SanError::Empty);
    }
    if s.len() > MAX_DNS_NAME {
        return Err(SanError::TooLong(
            s.chars().take(40).collect::<String>() + "...",
        ));
    }
    if s.contains('*') {
        return Err(SanError::Wildcard(s.to_string()));
    }
    let label_ok = |l: &str| {
        (1..=MAX_DNS_LABEL).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let last_numeric = s
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    if !s.split('.').all(label_ok) || last_numeric {
        return Err(SanError::Invalid(s.to_string()));
    }
    Ok(())
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Dns(name) => f.write_str(name),
            San::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl San {
    /// The names every coordinator server certificate carries: `localhost`, both loopback
    /// addresses, and this machine's host name when it is a valid DNS name.
    pub fn defaults() -> Vec<San> {
        let mut v = vec![
            San::Dns("localhost".into()),
            San::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            San::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ];
        match crate::host::name().parse::<San>() {
            Ok(own @ San::Dns(_)) => v.push(own),
            _ => tracing::debug!("the host name is not a DNS name; not in the certificate"),
        }
        v
    }

    fn to_rcgen(&self) -> Result<SanType, PkiError> {
        Ok(match self {
            San::Dns(name) => SanType::DnsName(name.as_str().try_into()?),
            San::Ip(ip) => SanType::IpAddress(*ip),
        })
    }
}

/// [`San::defaults`] followed by `extra`, each name once.
pub fn server_sans(extra: &[San]) -> Vec<San> {
    let mut v = San::defaults();
    for s in extra {
        if !v.contains(s) {
            v.push(s.clone());
        }
    }
    v
}

/// How long a coordinator's server certificate is valid, in days.
pub const SERVER_CERT_DAYS: u32 = 3650;

/// The DNS and IP names a certificate (DER) is valid for, besides its identity.
pub fn sans_of(der: &[u8]) -> Result<Vec<San>, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Invalid(e.to_string()))?;
    let Some(ext) = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Invalid(e.to_string()))?
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for name in &ext.value.general_names {
        match name {
            GeneralName::DNSName(d) => out.push(San::Dns(d.to_string())),
            GeneralName::IPAddress(b) => match <[u8; 4]>::try_from(*b) {
                Ok(v4) => out.push(San::Ip(IpAddr::from(v4))),
                Err(_) => {
                    if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                        out.push(San::Ip(IpAddr::from(v6)));
                    }
                }
            },
            _ => {}
        }
    }
    Ok(out)
}

/// Renews the certificate in `dir` (`coordinator cert --renew`): the same identity and names,
/// a new key, valid for `lifetime`; written crash-safely over the old pair.
pub fn renew_dir(ca: &Ca, dir: &Path, lifetime: Duration) -> Result<Identity, PkiError> {
    finish_renewal(dir)?;
    let path = dir.join(CERT_FILE);
    let pem = fs::read(&path).map_err(io_at(&path))?;
    let der = CertificateDer::from_pem_slice(&pem)
        .map_err(|e| PkiError::Invalid(format!("{}: {e}", path.display())))?;
    let id = Identity::from_cert_der(&der)
        .map_err(|e| PkiError::Invalid(format!("{}: {e}", path.display())))?;
    let next = ca.issue(&id, lifetime, &sans_of(&der)?)?;
    write_private(&dir.join(CA_FILE), next.ca_pem.as_bytes())?;
    write_renewal(dir, &next.cert_pem, &next.key_pem)?;
    Ok(id)
}

/// Where a renewal puts the new key and certificate before they replace the old ones.
const KEY_NEXT: &str = "node.key.next";
const CERT_NEXT: &str = "node.pem.next";

/// Replaces the key and certificate in `dir` crash-safely: both are written beside the old ones
/// (`node.key.next`, then `node.pem.next`), then the key is renamed into place, then the
/// certificate. A crash leaves either the old pair, or `node.pem.next` for
/// [`finish_renewal`] to roll forward.
pub fn write_renewal(dir: &Path, cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
    write_private(&dir.join(KEY_NEXT), key_pem.as_bytes())?;
    write_private(&dir.join(CERT_NEXT), cert_pem.as_bytes())?;
    finish_renewal(dir).map(drop)
}

/// Completes a renewal a crash cut short (before the directory is loaded): with `node.pem.next`
/// present both new files were complete, so the renames are carried out; a lone
/// `node.key.next` is a renewal that never finished writing and is removed. True when a
/// renewal was rolled forward.
pub fn finish_renewal(dir: &Path) -> Result<bool, PkiError> {
    let (key_next, cert_next) = (dir.join(KEY_NEXT), dir.join(CERT_NEXT));
    if !cert_next.exists() {
        if key_next.exists() {
            fs::remove_file(&key_next).map_err(io_at(&key_next))?;
        }
        return Ok(false);
    }
    if key_next.exists() {
        fs::rename(&key_next, dir.join(KEY_FILE)).map_err(io_at(&key_next))?;
    }
    fs::rename(&cert_next, dir.join(CERT_FILE)).map_err(io_at(&cert_next))?;
    crate::disk::crashsafe::fsync_dir(dir).map_err(io_at(dir))?;
    Ok(true)
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

    fn params_for(
        id: &Identity,
        lifetime: Duration,
        sans: &[San],
    ) -> Result<CertificateParams, PkiError> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id.uri());
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::URI(id.uri().try_into()?)];
        for san in sans {
            p.subject_alt_names.push(san.to_rcgen()?);
        }
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
        sans: &[San],
        public: &impl PublicKeyData,
    ) -> Result<String, PkiError> {
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        Ok(Self::params_for(id, lifetime, sans)?
            .signed_by(public, &issuer)?
            .pem())
    }

    /// A certificate for `id` with a fresh key pair, valid for `lifetime` (see [`validity`]),
    /// also valid for the host names `sans`.
    pub fn issue(
        &self,
        id: &Identity,
        lifetime: Duration,
        sans: &[San],
    ) -> Result<NodeCert, PkiError> {
        let key = KeyPair::generate()?;
        Ok(NodeCert {
            ca_pem: self.cert_pem.clone(),
            cert_pem: self.sign(id, lifetime, sans, &key)?,
            key_pem: key.serialize_pem(),
        })
    }

    /// The coordinator's server certificate: [`server_sans`] of `extra`, for
    /// [`SERVER_CERT_DAYS`].
    pub fn issue_server(&self, extra: &[San]) -> Result<NodeCert, PkiError> {
        self.issue(
            &Identity::Coordinator,
            days(SERVER_CERT_DAYS),
            &server_sans(extra),
        )
    }

    /// Signs a CSR's public key as `id`, also valid for the host names `sans`. Nothing but the
    /// key is taken from the request (whatever names it asks for are ignored).
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &Identity,
        lifetime: Duration,
        sans: &[San],
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        self.sign(id, lifetime, sans, &csr.public_key)
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
        let n = ca.issue(&id, days(30), &[]).unwrap();
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
        let pem = ca.sign_csr(&csr, &id, days(1), &[]).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(Identity::from_cert_der(&der).unwrap(), id);
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!x.is_ca());
        assert_eq!(names_of(&pem), Vec::<String>::new(), "no name from the CSR");
        // The names are the coordinator's, whatever the request asked for.
        let pem = ca
            .sign_csr(&csr, &id, days(1), &["gpu-7.example".parse().unwrap()])
            .unwrap();
        assert_eq!(names_of(&pem), ["gpu-7.example"]);
    }

    /// The DNS and IP names of a certificate, as text.
    #[test]
    fn renewing_a_directory_keeps_identity_and_names_with_a_new_key() {
        let ca = Ca::generate().unwrap();
        let id = Identity::admin("ops").unwrap();
        let d = tempfile::tempdir().unwrap();
        let names = ["ops.example".parse().unwrap(), "10.1.2.3".parse().unwrap()];
        ca.issue(&id, days(1), &names)
            .unwrap()
            .write_dir(d.path())
            .unwrap();
        let old_key = fs::read(d.path().join(KEY_FILE)).unwrap();
        assert_eq!(renew_dir(&ca, d.path(), days(30)).unwrap(), id);
        assert_ne!(fs::read(d.path().join(KEY_FILE)).unwrap(), old_key);
        let pem = fs::read(d.path().join(CERT_FILE)).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(Identity::from_cert_der(&der).unwrap(), id);
        assert_eq!(sans_of(&der).unwrap(), names);
        let facts = crate::trust::identity::CertFacts::from_der(&der).unwrap();
        assert!(facts.not_after_unix - facts.not_before_unix > 29 * 86_400);
        crate::trust::tls::TlsMaterial::load(d.path()).expect("key and certificate match");
        assert!(!d.path().join("node.pem.next").exists());
    }

    fn names_of(pem: &str) -> Vec<String> {
        use x509_parser::extensions::GeneralName;
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = x.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                GeneralName::IPAddress(b) => Some(match <[u8; 4]>::try_from(*b) {
                    Ok(v4) => IpAddr::from(v4).to_string(),
                    Err(_) => IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()).to_string(),
                }),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn san_parses_addresses_and_names() {
        let ok = [
            ("127.0.0.1", San::Ip("127.0.0.1".parse().unwrap())),
            ("[::1]", San::Ip("::1".parse().unwrap())),
            ("2001:db8::7", San::Ip("2001:db8::7".parse().unwrap())),
            ("Coord.Example.COM", San::Dns("coord.example.com".into())),
            ("gpu-7", San::Dns("gpu-7".into())),
            ("a1.b2.c3d", San::Dns("a1.b2.c3d".into())),
        ];
        for (text, want) in ok {
            assert_eq!(text.parse::<San>(), Ok(want), "{text}");
        }
        let long_label = format!("{}.example", "a".repeat(64));
        let long_name = ["abcdefghi"; 26].join(".");
        assert_eq!("".parse::<San>(), Err(SanError::Empty));
        assert!(matches!(
            long_name.parse::<San>(),
            Err(SanError::TooLong(_))
        ));
        assert!(matches!(
            "*.example.com".parse::<San>(),
            Err(SanError::Wildcard(_))
        ));
        for bad in [
            "a_b.example",
            "-a.example",
            "a-.example",
            "a..example",
            "example.",
            "10.0.0.256",
            "1.2.3",
            "host:7700",
            "http://x",
            "ex ample",
            long_label.as_str(),
        ] {
            assert!(
                matches!(bad.parse::<San>(), Err(SanError::Invalid(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn server_certificate_names_its_addresses_and_keeps_its_identity() {
        let ca = Ca::generate().unwrap();
        let extra: Vec<San> = ["coord.example", "10.1.2.3", "localhost"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let n = ca.issue_server(&extra).unwrap();
        let der = CertificateDer::from_pem_slice(n.cert_pem.as_bytes()).unwrap();
        assert_eq!(
            Identity::from_cert_der(&der).unwrap(),
            Identity::Coordinator
        );
        let names = names_of(&n.cert_pem);
        for want in ["localhost", "127.0.0.1", "::1", "coord.example", "10.1.2.3"] {
            assert_eq!(
                names.iter().filter(|n| *n == want).count(),
                1,
                "{want} in {names:?}"
            );
        }
        // A stock verifier (webpki, with host name checks) accepts exactly those names.
        let verify = |host: &str| server_name_check(&ca, &n, host);
        for host in ["localhost", "127.0.0.1", "::1", "coord.example", "10.1.2.3"] {
            assert!(verify(host), "{host} refused");
        }
        for host in ["other.example", "127.0.0.2", "coord.example.evil"] {
            assert!(!verify(host), "{host} accepted");
        }
    }

    /// Whether rustls' ordinary web PKI verifier accepts `n` for the host `host`.
    fn server_name_check(ca: &Ca, n: &NodeCert, host: &str) -> bool {
        use rustls::client::WebPkiServerVerifier;
        use rustls::client::danger::ServerCertVerifier;
        use rustls_pki_types::{ServerName, UnixTime};
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der.clone()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let v = WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap();
        let leaf = CertificateDer::from_pem_slice(n.cert_pem.as_bytes()).unwrap();
        let name = ServerName::try_from(host.to_string()).unwrap();
        v.verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
            .is_ok()
    }

    #[test]
    fn a_renewal_cut_short_is_rolled_forward_or_dropped() {
        let ca = Ca::generate().unwrap();
        let id = Identity::node("p1", Role::Gpu, "m1").unwrap();
        let (old, new) = (
            ca.issue(&id, days(1), &[]).unwrap(),
            ca.issue(&id, days(2), &[]).unwrap(),
        );
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        // Crashed after both new files were written, before or between the renames.
        for renamed_key in [false, true] {
            old.write_dir(dir).unwrap();
            write_private(&dir.join(KEY_NEXT), new.key_pem.as_bytes()).unwrap();
            write_private(&dir.join(CERT_NEXT), new.cert_pem.as_bytes()).unwrap();
            if renamed_key {
                fs::rename(dir.join(KEY_NEXT), dir.join(KEY_FILE)).unwrap();
            }
            assert!(finish_renewal(dir).unwrap());
            assert_eq!(
                (read(KEY_FILE), read(CERT_FILE)),
                (new.key_pem.clone(), new.cert_pem.clone())
            );
            assert!(!dir.join(KEY_NEXT).exists() && !dir.join(CERT_NEXT).exists());
            assert!(!finish_renewal(dir).unwrap(), "nothing left to do");
        }
        // Crashed while writing: only the new key; the old pair stays.
        old.write_dir(dir).unwrap();
        write_private(&dir.join(KEY_NEXT), new.key_pem.as_bytes()).unwrap();
        assert!(!finish_renewal(dir).unwrap());
        assert_eq!(
            (read(KEY_FILE), read(CERT_FILE)),
            (old.key_pem.clone(), old.cert_pem.clone())
        );
        assert!(!dir.join(KEY_NEXT).exists());
        // The whole renewal, and a key that stays private.
        write_renewal(dir, &new.cert_pem, &new.key_pem).unwrap();
        assert_eq!(
            (read(KEY_FILE), read(CERT_FILE)),
            (new.key_pem, new.cert_pem)
        );
        let m = fs::metadata(dir.join(KEY_FILE)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
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
        let n = ca.issue(&id, Duration::from_secs(20), &[]).unwrap();
        let der = CertificateDer::from_pem_slice(n.cert_pem.as_bytes()).unwrap();
        let f = crate::trust::identity::CertFacts::from_der(&der).unwrap();
        assert_eq!(f.not_after_unix - f.not_before_unix, 22);
    }
}
