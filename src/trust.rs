//! Who is who: certificate identities, the certificate authority, mutual TLS, the verifiers,
//! revocation, renewable keys and join tokens.

pub mod identity;
pub mod keys;
pub mod pki;
pub mod revocation;
pub mod tls;
pub mod token;
pub mod verify;
