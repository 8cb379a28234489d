//! Who is who: certificate identities, the certificate authority, mutual TLS and join tokens.

pub mod identity;
pub mod pki;
pub mod tls;
pub mod token;
