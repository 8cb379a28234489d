//! The certificate verifiers every connection goes through (Invariant 7; ARCHITECTURE.md,
//! "Trust"):
//! - [`PeerVerifier`] (client side): the server's chain leads to our CA, its certificate is not
//!   revoked, and it names the identity the caller expects — never a host name, since machines
//!   are reached by IP address, often through NAT port mappings.
//! - [`ClientVerifier`] (server side): rustls' WebPKI client verifier, then the deny list; on the
//!   coordinator, a certificate that expired at most `expired_grace` ago is let through so the
//!   agent can renew it after a long coordinator outage (the service allows such a connection
//!   nothing but renewal).
//! - [`PinnedVerifier`] (joining): the coordinator's CA must have the fingerprint the join token
//!   carries.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::trust::identity::{CertFacts, Identity, Role};
use crate::trust::revocation::{DenyList, Refused};

/// Which server identities a client accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    Exactly(Identity),
    /// Any machine in this seat of the pair (a static pair, where nobody names the machine).
    Seat {
        pair: String,
        role: Role,
    },
    /// Any certificate of the CA (the identity is still required to be well formed).
    AnyIdentity,
}

impl Expect {
    /// The pair the expected identity belongs to, if any.
    pub fn pair(&self) -> Option<&str> {
        match self {
            Expect::Exactly(id) => id.pair(),
            Expect::Seat { pair, .. } => Some(pair),
            Expect::AnyIdentity => None,
        }
    }

    pub fn accepts(&self, id: &Identity) -> bool {
        match self {
            Expect::Exactly(want) => want == id,
            Expect::Seat { pair, role } => id.in_seat(pair, *role),
            Expect::AnyIdentity => true,
        }
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Exactly(id) => write!(f, "{id}"),
            // Spelled as certificates name it, so a refusal shows which URI would have passed.
            Expect::Seat { pair, role } => write!(f, "standby://pair/{pair}/{role}/<any machine>"),
            Expect::AnyIdentity => f.write_str("any identity"),
        }
    }
}

fn general(msg: String) -> rustls::Error {
    rustls::Error::General(msg)
}

/// Refuses a revoked certificate; returns what it says otherwise.
fn not_revoked(
    end_entity: &CertificateDer<'_>,
    deny: &DenyList,
) -> Result<CertFacts, rustls::Error> {
    let facts =
        CertFacts::from_der(end_entity).map_err(|e| general(format!("peer certificate: {e}")))?;
    if deny.contains(&facts.serial) {
        tracing::warn!(identity = %facts.identity, serial = %facts.serial, "refused a revoked certificate");
        deny.note_refused(Refused {
            identity: facts.identity.uri(),
            serial: facts.serial,
        });
        return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
    }
    Ok(facts)
}

#[derive(Debug)]
pub(crate) struct PinnedVerifier {
    pub(crate) fingerprint: String,
    pub(crate) algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| crate::trust::pki::fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                general("the coordinator's CA does not match the join token's fingerprint".into())
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots,
            &[],
            now,
            self.algs.all,
        )?;
        match Identity::from_cert_der(end_entity) {
            Ok(Identity::Coordinator) => Ok(ServerCertVerified::assertion()),
            Ok(other) => Err(general(format!(
                "peer is {other}, expected {}",
                Identity::Coordinator
            ))),
            Err(e) => Err(general(format!("peer certificate: {e}"))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[derive(Debug)]
pub(crate) struct PeerVerifier {
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) algs: WebPkiSupportedAlgorithms,
    pub(crate) expect: Expect,
    pub(crate) deny: DenyList,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let id = not_revoked(end_entity, &self.deny)?.identity;
        if !self.expect.accepts(&id) {
            return Err(general(format!("peer is {id}, expected {}", self.expect)));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// rustls' client verifier, then revocation; with `expired_grace`, lately expired certificates
/// pass (see the module documentation).
#[derive(Debug)]
pub(crate) struct ClientVerifier {
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    pub(crate) deny: DenyList,
    pub(crate) expired_grace: Option<Duration>,
}

impl ClientVerifier {
    /// Verifies as of the certificate's last valid second when it expired less than the grace
    /// ago; the signature and chain checks are the same.
    fn verify_lately_expired(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let expired = rustls::Error::InvalidCertificate(CertificateError::Expired);
        let (Some(grace), Ok(facts)) = (self.expired_grace, CertFacts::from_der(end_entity)) else {
            return Err(expired);
        };
        let not_after = u64::try_from(facts.not_after_unix).map_err(|_| expired.clone())?;
        if now.as_secs() > not_after.saturating_add(grace.as_secs()) {
            return Err(expired);
        }
        let at = UnixTime::since_unix_epoch(Duration::from_secs(not_after));
        self.inner.verify_client_cert(end_entity, intermediates, at)
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) => self.verify_lately_expired(end_entity, intermediates, now)?,
            other => other?,
        };
        not_revoked(end_entity, &self.deny)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
