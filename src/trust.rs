//! Who is who: certificate identities, the certificate authority, mutual TLS, join tokens, and
//! how much of the server one identity or address may hold at once (`quota`).

pub mod identity;
pub mod pki;
pub mod quota;
pub mod tls;
pub mod token;
