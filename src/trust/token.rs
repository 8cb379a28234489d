//! Join tokens: single-use, expiring, and carrying the CA's fingerprint so that an agent can
//! verify the coordinator on its very first connection (as kubeadm's discovery hash does).
//!
//! Format (one line, safe in shells and environment variables):
//! `sbj1:<pair>:<role>:<expires unix s>:<nonce, 32 hex>:<CA sha256, 64 hex>:<mac, 32 hex>`
//! where `mac` is HMAC-SHA256 (truncated to 16 bytes) of everything before it, keyed with the
//! coordinator's token key. Anyone holding a token can read its pair, role and CA fingerprint; only
//! the coordinator can mint or check one. Single use is enforced by the coordinator's store.

use std::fmt;

use crate::trust::identity::{Role, check_name};

const PREFIX: &str = "sbj1";
const MAC_LEN: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed join token")]
    Malformed,
    #[error("join token does not verify (not issued by this coordinator, or altered)")]
    BadMac,
    #[error("join token expired")]
    Expired,
    #[error("join token was already used")]
    Replayed,
    #[error("join token is for role {token}, not {wanted}")]
    WrongRole { token: Role, wanted: Role },
    #[error("join token is for another CA")]
    WrongCa,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub pair: String,
    pub role: Role,
    pub expires_unix: u64,
    pub nonce: String,
    pub ca_fingerprint: String,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Token {
    pub fn new(pair: &str, role: Role, expires_unix: u64, ca_fingerprint: &str) -> Token {
        let nonce: [u8; 16] = rand::random();
        Token {
            pair: pair.to_string(),
            role,
            expires_unix,
            nonce: crate::text::hex(&nonce),
            ca_fingerprint: ca_fingerprint.to_string(),
        }
    }

    fn body(&self) -> String {
        format!(
            "{PREFIX}:{}:{}:{}:{}:{}",
            self.pair, self.role, self.expires_unix, self.nonce, self.ca_fingerprint
        )
    }

    /// The token as a string, signed with `key`.
    pub fn sign(&self, key: &[u8]) -> String {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        let body = self.body();
        let tag = ring::hmac::sign(&k, body.as_bytes());
        format!("{body}:{}", crate::text::hex(&tag.as_ref()[..MAC_LEN]))
    }

    /// Parses the fields without checking the MAC (what an agent can do).
    pub fn parse(s: &str) -> Result<(Token, String), TokenError> {
        let s = s.trim();
        if s.len() > 512 {
            return Err(TokenError::Malformed);
        }
        let parts: Vec<&str> = s.split(':').collect();
        let [prefix, pair, role, exp, nonce, fp, mac] = parts[..] else {
            return Err(TokenError::Malformed);
        };
        if prefix != PREFIX
            || check_name(pair).is_err()
            || !is_hex(nonce, 32)
            || !is_hex(fp, 64)
            || !is_hex(mac, MAC_LEN * 2)
            || exp.is_empty()
            || exp.len() > 20
            || !exp.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(TokenError::Malformed);
        }
        let role: Role = role.parse().map_err(|_| TokenError::Malformed)?;
        let expires_unix = exp.parse().map_err(|_| TokenError::Malformed)?;
        Ok((
            Token {
                pair: pair.into(),
                role,
                expires_unix,
                nonce: nonce.into(),
                ca_fingerprint: fp.into(),
            },
            mac.to_string(),
        ))
    }

    /// Checks a token presented to the coordinator: well formed, signed with `key`, for our CA,
    /// for `role`, not expired. (Single use is the store's business.)
    pub fn verify(
        s: &str,
        key: &[u8],
        ca_fingerprint: &str,
        role: Role,
        now_unix: u64,
    ) -> Result<Token, TokenError> {
        let (t, mac) = Token::parse(s)?;
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        let full = ring::hmac::sign(&k, t.body().as_bytes());
        let want = crate::text::hex(&full.as_ref()[..MAC_LEN]);
        if !ring_eq(want.as_bytes(), mac.as_bytes()) {
            return Err(TokenError::BadMac);
        }
        if t.ca_fingerprint != ca_fingerprint {
            return Err(TokenError::WrongCa);
        }
        if t.role != role {
            return Err(TokenError::WrongRole {
                token: t.role,
                wanted: role,
            });
        }
        if now_unix >= t.expires_unix {
            return Err(TokenError::Expired);
        }
        Ok(t)
    }
}

/// Constant-time equality.
fn ring_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "join token for {}/{} (expires {})",
            self.pair, self.role, self.expires_unix
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "522d0010f223ec882803c4b498ec173cc6d7989c5a252e7ee97ca6b239f34199";

    #[test]
    fn sign_parse_verify() {
        let key = [7u8; 32];
        let t = Token::new("p1", Role::Gpu, 2_000_000_000, FP);
        let s = t.sign(&key);
        assert!(s.starts_with("sbj1:p1:gpu:2000000000:"));
        assert_eq!(Token::parse(&s).unwrap().0, t);
        assert_eq!(
            Token::verify(&s, &key, FP, Role::Gpu, 1_900_000_000).unwrap(),
            t
        );
    }

    #[test]
    fn refusals() {
        let key = [7u8; 32];
        let s = Token::new("p1", Role::Gpu, 2_000_000_000, FP).sign(&key);
        assert_eq!(
            Token::verify(&s, &[8u8; 32], FP, Role::Gpu, 0),
            Err(TokenError::BadMac)
        );
        assert_eq!(
            Token::verify(&s, &key, FP, Role::Cpu, 0),
            Err(TokenError::WrongRole {
                token: Role::Gpu,
                wanted: Role::Cpu
            })
        );
        assert_eq!(
            Token::verify(&s, &key, FP, Role::Gpu, 2_000_000_000),
            Err(TokenError::Expired)
        );
        assert_eq!(
            Token::verify(&s, &key, &"0".repeat(64), Role::Gpu, 0),
            Err(TokenError::WrongCa)
        );
        // Any altered field breaks the MAC.
        let forged = s.replacen(":gpu:", ":cpu:", 1);
        assert_eq!(
            Token::verify(&forged, &key, FP, Role::Cpu, 0),
            Err(TokenError::BadMac)
        );
        let forged = s.replacen(":p1:", ":p2:", 1);
        assert_eq!(
            Token::verify(&forged, &key, FP, Role::Gpu, 0),
            Err(TokenError::BadMac)
        );
        for bad in [
            "",
            "sbj1",
            "x:p:gpu:1:a:b:c",
            &s[..s.len() - 1],
            &format!("{s}:x"),
            &s.replace("sbj1", "sbj2"),
        ] {
            assert_eq!(
                Token::parse(bad).err(),
                Some(TokenError::Malformed),
                "{bad}"
            );
        }
        assert_eq!(
            Token::parse(&"a".repeat(600)).err(),
            Some(TokenError::Malformed)
        );
    }
}
