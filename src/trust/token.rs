//! Join tokens: single-use, expiring, and carrying the CA's fingerprint so that an agent can
//! verify the coordinator on its very first connection (as kubeadm's discovery hash does).
//!
//! Format (one line, safe in shells and environment variables):
//! `sbj2:<pair>:<role>:<machine or empty>:<expires unix s>:<nonce, 32 hex>:<CA sha256, 64 hex>:<mac, 32 hex>`
//! where `mac` is HMAC-SHA256 (truncated to 16 bytes) of everything before it, keyed with the
//! coordinator's token key. Anyone holding a token can read its pair, role, machine and CA
//! fingerprint; only the coordinator can mint or check one. Single use is enforced by the
//! coordinator's store. A token bound to a machine (a provider's attempt label, or
//! `coordinator token --machine`) is only good for a join by that machine (ARCHITECTURE.md,
//! "Trust"). Tokens of the first format (`sbj1:`, without the machine field) still parse, as
//! unbound tokens, so those handed out before the upgrade work until they expire.

use std::fmt;

use crate::trust::identity::{Role, check_name};

/// The current format, and the first one (no machine field).
const PREFIX: &str = "sbj2";
const PREFIX_V1: &str = "sbj1";
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
    #[error("join token is for machine {token}, not {wanted}")]
    WrongMachine { token: String, wanted: String },
}

/// Which format a token was written in (a re-signed token keeps its format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `sbj1`: no machine field; always unbound.
    V1,
    V2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub pair: String,
    pub role: Role,
    pub expires_unix: u64,
    pub nonce: String,
    pub ca_fingerprint: String,
    /// The only machine that may join with it (None: whichever joins first).
    pub machine: Option<String>,
    pub format: Format,
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
            machine: None,
            format: Format::V2,
        }
    }

    /// The same token bound to `machine`.
    pub fn bound_to(self, machine: &str) -> Token {
        Token {
            machine: Some(machine.to_string()),
            format: Format::V2,
            ..self
        }
    }

    /// The nonce of the token minted for the provider attempt labelled `label`: derived from the
    /// label, so the coordinator can spend the token when the attempt is torn down without
    /// keeping it.
    pub fn attempt_nonce(label: &str) -> String {
        let d = ring::digest::digest(
            &ring::digest::SHA256,
            format!("standby attempt token {label}").as_bytes(),
        );
        crate::text::hex(&d.as_ref()[..16])
    }

    fn body(&self) -> String {
        match self.format {
            Format::V1 => format!(
                "{PREFIX_V1}:{}:{}:{}:{}:{}",
                self.pair, self.role, self.expires_unix, self.nonce, self.ca_fingerprint
            ),
            Format::V2 => format!(
                "{PREFIX}:{}:{}:{}:{}:{}:{}",
                self.pair,
                self.role,
                self.machine.as_deref().unwrap_or(""),
                self.expires_unix,
                self.nonce,
                self.ca_fingerprint
            ),
        }
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
        let (format, fields) = match parts[..] {
            [PREFIX, pair, role, machine, exp, nonce, fp, mac] => {
                let machine = (!machine.is_empty()).then_some(machine);
                if machine.is_some_and(|m| check_name(m).is_err()) {
                    return Err(TokenError::Malformed);
                }
                (
                    Format::V2,
                    [pair, role, exp, nonce, fp, mac, machine.unwrap_or("")],
                )
            }
            [PREFIX_V1, pair, role, exp, nonce, fp, mac] => {
                (Format::V1, [pair, role, exp, nonce, fp, mac, ""])
            }
            _ => return Err(TokenError::Malformed),
        };
        let [pair, role, exp, nonce, fp, mac, machine] = fields;
        if check_name(pair).is_err()
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
                machine: (!machine.is_empty()).then(|| machine.to_string()),
                format,
            },
            mac.to_string(),
        ))
    }

    /// Refuses a join by `machine` with a token bound to another machine.
    pub fn check_machine(&self, machine: &str) -> Result<(), TokenError> {
        match &self.machine {
            Some(m) if m != machine => Err(TokenError::WrongMachine {
                token: m.clone(),
                wanted: machine.to_string(),
            }),
            _ => Ok(()),
        }
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
        write!(f, "join token for {}/{}", self.pair, self.role)?;
        if let Some(m) = &self.machine {
            write!(f, " machine {m}")?;
        }
        write!(f, " (expires {})", self.expires_unix)
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
        assert!(s.starts_with("sbj2:p1:gpu::2000000000:"));
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
            &s.replace("sbj2", "sbj3"),
            &s.replacen("sbj2:", "sbj1:", 1),
            &s.replacen(":gpu::", ":gpu:bad/name:", 1),
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

    #[test]
    fn a_bound_token_names_its_machine_and_only_it_may_use_it() {
        let key = [7u8; 32];
        let t = Token::new("p1", Role::Gpu, 2_000_000_000, FP).bound_to("sb-x-p1-gpu-3");
        let s = t.sign(&key);
        assert!(
            s.starts_with("sbj2:p1:gpu:sb-x-p1-gpu-3:2000000000:"),
            "{s}"
        );
        let back = Token::verify(&s, &key, FP, Role::Gpu, 0).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.check_machine("sb-x-p1-gpu-3"), Ok(()));
        assert_eq!(
            back.check_machine("other"),
            Err(TokenError::WrongMachine {
                token: "sb-x-p1-gpu-3".into(),
                wanted: "other".into()
            })
        );
        // The binding is under the MAC: dropping or changing it does not verify.
        for forged in [
            s.replacen(":sb-x-p1-gpu-3:", "::", 1),
            s.replacen(":sb-x-p1-gpu-3:", ":other:", 1),
        ] {
            assert_eq!(
                Token::verify(&forged, &key, FP, Role::Gpu, 0),
                Err(TokenError::BadMac)
            );
        }
        // An unbound token binds to whoever uses it first (the store records the use).
        let unbound = Token::new("p1", Role::Gpu, 2_000_000_000, FP);
        assert_eq!(unbound.check_machine("anything"), Ok(()));
    }

    /// A token minted before the machine field (`sbj1`) still verifies, as an unbound token,
    /// and re-signs in its own format.
    #[test]
    fn a_first_format_token_still_verifies_unbound() {
        let key = [7u8; 32];
        let nonce = "0123456789abcdef0123456789abcdef";
        let body = format!("sbj1:p1:cpu:2000000000:{nonce}:{FP}");
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
        let tag = ring::hmac::sign(&k, body.as_bytes());
        let s = format!("{body}:{}", crate::text::hex(&tag.as_ref()[..MAC_LEN]));
        let t = Token::verify(&s, &key, FP, Role::Cpu, 0).unwrap();
        assert_eq!((t.machine.as_deref(), t.format), (None, Format::V1));
        assert_eq!(t.nonce, nonce);
        assert_eq!(t.sign(&key), s);
    }

    #[test]
    fn attempt_nonces_are_per_label_and_well_formed() {
        let a = Token::attempt_nonce("sb-1-p-gpu-1");
        assert!(is_hex(&a, 32));
        assert_eq!(a, Token::attempt_nonce("sb-1-p-gpu-1"));
        assert_ne!(a, Token::attempt_nonce("sb-1-p-gpu-2"));
    }
}
