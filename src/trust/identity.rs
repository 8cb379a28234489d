//! Who holds a certificate: the URI SAN `standby://pair/<P>/<gpu|cpu>/<machine>`,
//! `standby://admin/<name>` or `standby://coordinator`. Peers are authorised by this identity,
//! never by host name. A node identity names one machine: a replaced machine's certificate names
//! it, not its successor, so it can be refused (ARCHITECTURE.md, "Trust").

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Gpu,
    Cpu,
}

impl Role {
    pub fn peer(self) -> Role {
        match self {
            Role::Gpu => Role::Cpu,
            Role::Cpu => Role::Gpu,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gpu => "gpu",
            Role::Cpu => "cpu",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Role, IdentityError> {
        match s {
            "gpu" => Ok(Role::Gpu),
            "cpu" => Ok(Role::Cpu),
            _ => Err(IdentityError::Role(s.to_string())),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// An agent: one machine in one seat (pair and role) of a pair.
    Node {
        pair: String,
        role: Role,
        machine: String,
    },
    Admin {
        name: String,
    },
    Coordinator,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("role must be gpu or cpu, not {0:?}")]
    Role(String),
    #[error("invalid name {0:?}: use 1-63 of [A-Za-z0-9._-], starting with a letter or digit")]
    Name(String),
    #[error("not a standby identity URI: {0:?}")]
    Uri(String),
    #[error(
        "{0:?} names no machine: the certificate predates per-machine identities; join the agent again with a token"
    )]
    NoMachine(String),
    #[error("certificate carries no standby identity (URI SAN standby://...)")]
    Missing,
    #[error("certificate carries more than one standby identity")]
    Ambiguous,
    #[error("unparseable certificate: {0}")]
    Certificate(String),
}

/// Validates a pair or admin name: it becomes part of URIs, labels and file names.
pub fn check_name(s: &str) -> Result<(), IdentityError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Name(s.to_string()))
    }
}

const SCHEME: &str = "standby://";

impl Identity {
    /// The identity of `machine` in the `role` seat of `pair`. The machine's name follows the
    /// same rule as a pair's (it becomes part of a URI and of labels).
    pub fn node(pair: &str, role: Role, machine: &str) -> Result<Identity, IdentityError> {
        check_name(pair)?;
        check_name(machine)?;
        Ok(Identity::Node {
            pair: pair.to_string(),
            role,
            machine: machine.to_string(),
        })
    }

    pub fn admin(name: &str) -> Result<Identity, IdentityError> {
        check_name(name)?;
        Ok(Identity::Admin {
            name: name.to_string(),
        })
    }

    pub fn uri(&self) -> String {
        match self {
            Identity::Node {
                pair,
                role,
                machine,
            } => format!("{SCHEME}pair/{pair}/{role}/{machine}"),
            Identity::Admin { name } => format!("{SCHEME}admin/{name}"),
            Identity::Coordinator => format!("{SCHEME}coordinator"),
        }
    }

    pub fn parse_uri(s: &str) -> Result<Identity, IdentityError> {
        let bad = || IdentityError::Uri(s.to_string());
        let rest = s.strip_prefix(SCHEME).ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["coordinator"] => Ok(Identity::Coordinator),
            ["admin", name] => Identity::admin(name),
            ["pair", pair, role, machine] => Identity::node(pair, role.parse()?, machine),
            ["pair", _, _] => Err(IdentityError::NoMachine(s.to_string())),
            _ => Err(bad()),
        }
    }

    /// The identity in a DER certificate's URI SANs.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, IdentityError> {
        CertFacts::from_der(der).map(|f| f.identity)
    }

    pub fn pair(&self) -> Option<&str> {
        match self {
            Identity::Node { pair, .. } => Some(pair),
            _ => None,
        }
    }

    pub fn role(&self) -> Option<Role> {
        match self {
            Identity::Node { role, .. } => Some(*role),
            _ => None,
        }
    }

    pub fn machine(&self) -> Option<&str> {
        match self {
            Identity::Node { machine, .. } => Some(machine),
            _ => None,
        }
    }

    /// Whether this is a node in the `role` seat of `pair`, whichever machine.
    pub fn in_seat(&self, pair: &str, role: Role) -> bool {
        matches!(self, Identity::Node { pair: p, role: r, .. } if p == pair && *r == role)
    }
}

/// What verifiers and the coordinator need to know of a certificate: whose it is, its serial
/// number (what revocation names) and when it stops being valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFacts {
    pub identity: Identity,
    /// The serial number, lower-case hex without leading zero bytes.
    pub serial: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

impl CertFacts {
    pub fn from_der(der: &[u8]) -> Result<CertFacts, IdentityError> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::Certificate(e.to_string()))?
            .ok_or(IdentityError::Missing)?;
        let mut found = None;
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name
                && u.starts_with(SCHEME)
            {
                if found.is_some() {
                    return Err(IdentityError::Ambiguous);
                }
                found = Some(Identity::parse_uri(u)?);
            }
        }
        let validity = cert.validity();
        Ok(CertFacts {
            identity: found.ok_or(IdentityError::Missing)?,
            serial: serial_hex(cert.raw_serial()),
            not_before_unix: validity.not_before.timestamp(),
            not_after_unix: validity.not_after.timestamp(),
        })
    }

    /// Seconds of validity left at `now_unix` (negative once expired).
    pub fn remaining(&self, now_unix: i64) -> i64 {
        self.not_after_unix - now_unix
    }

    /// Whether the certificate is past `fraction` of its life at `now_unix` (renewal is due at
    /// two thirds).
    pub fn past(&self, fraction: f64, now_unix: i64) -> bool {
        let life = (self.not_after_unix - self.not_before_unix).max(1) as f64;
        (now_unix - self.not_before_unix) as f64 >= life * fraction
    }
}

/// A serial number as revocation lists spell it: lower-case hex, leading zero bytes dropped.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    crate::text::hex(&raw[start..])
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_roundtrip() {
        for id in [
            Identity::node("p-1", Role::Gpu, "C.123").unwrap(),
            Identity::node("p.2", Role::Cpu, "standby-p.2-cpu-3").unwrap(),
            Identity::admin("ops").unwrap(),
            Identity::Coordinator,
        ] {
            assert_eq!(Identity::parse_uri(&id.uri()).unwrap(), id);
        }
    }

    #[test]
    fn refuses_bad_names_and_uris() {
        for n in ["", "-x", "a/b", "a b", &"x".repeat(64), "ü"] {
            assert!(check_name(n).is_err(), "{n}");
        }
        for u in [
            "standby://pair/p/root",
            "standby://pair/p",
            "standby://pair/../gpu",
            "http://pair/p/gpu",
            "standby://pair/p/gpu/x/y",
            "standby://pair/p/gpu/",
            "standby://pair/p/gpu/../x",
        ] {
            assert!(Identity::parse_uri(u).is_err(), "{u}");
        }
    }

    #[test]
    fn machineless_identities_are_refused_with_advice() {
        let e = Identity::parse_uri("standby://pair/p/gpu").unwrap_err();
        assert!(matches!(e, IdentityError::NoMachine(_)));
        assert!(e.to_string().contains("join the agent again"), "{e}");
    }

    #[test]
    fn seats_ignore_the_machine() {
        let a = Identity::node("p", Role::Gpu, "m1").unwrap();
        assert!(a.in_seat("p", Role::Gpu));
        assert!(!a.in_seat("p", Role::Cpu));
        assert!(!a.in_seat("q", Role::Gpu));
        assert_eq!(a.machine(), Some("m1"));
        assert!(!Identity::admin("ops").unwrap().in_seat("p", Role::Gpu));
    }
}
