//! Who is who: certificate identities, the certificate authority, mutual TLS, the verifiers,
//! revocation, renewable keys, join tokens, and how much of the server one identity or address may
//! hold at once (`quota`).

pub mod identity;
pub mod keys;
pub mod pki;
pub mod quota;
pub mod revocation;
pub mod seal;
pub mod tls;
pub mod token;
pub mod verify;
