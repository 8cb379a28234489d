//! The certificate and key a process presents, replaceable while it runs: an agent renews its
//! certificate over the heartbeat stream (ARCHITECTURE.md, "Trust"), and every TLS configuration
//! built from its material presents the new one from the next handshake on. Connections already
//! up keep the certificate they were made with.

use std::sync::{Arc, RwLock};

use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::trust::identity::CertFacts;

/// The current certificate chain, its key and what the certificate says.
#[derive(Debug)]
pub struct Keys {
    current: RwLock<(Arc<CertifiedKey>, CertFacts)>,
}

impl Keys {
    /// Checks that `key` belongs to the chain's first certificate.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Keys, rustls::Error> {
        Ok(Keys {
            current: RwLock::new(certified(chain, key)?),
        })
    }

    /// Presents `chain` and `key` from the next handshake on. The identity must not change.
    pub fn replace(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), rustls::Error> {
        let next = certified(chain, key)?;
        let mut cur = self.current.write().expect("keys");
        if next.1.identity != cur.1.identity {
            return Err(rustls::Error::General(format!(
                "a renewed certificate must name {}, not {}",
                cur.1.identity, next.1.identity
            )));
        }
        *cur = next;
        Ok(())
    }

    /// What the current certificate says.
    pub fn facts(&self) -> CertFacts {
        self.current.read().expect("keys").1.clone()
    }

    fn key(&self) -> Arc<CertifiedKey> {
        self.current.read().expect("keys").0.clone()
    }
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(Arc<CertifiedKey>, CertFacts), rustls::Error> {
    let first = chain
        .first()
        .ok_or_else(|| rustls::Error::General("an empty certificate chain".into()))?;
    let facts = CertFacts::from_der(first)
        .map_err(|e| rustls::Error::General(format!("our own certificate: {e}")))?;
    let ck = CertifiedKey::from_der(chain, key, &crate::trust::tls::provider())?;
    ck.keys_match()?;
    Ok((Arc::new(ck), facts))
}

impl ResolvesServerCert for Keys {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
}

impl ResolvesClientCert for Keys {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
