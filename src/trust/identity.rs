//! Who holds a certificate: the URI SAN `standby://pair/<P>/<gpu|cpu>`, `standby://admin/<name>`
//! or `standby://coordinator`. Peers are authorised by this identity, never by host name.

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
    Node { pair: String, role: Role },
    Admin { name: String },
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
    pub fn node(pair: &str, role: Role) -> Result<Identity, IdentityError> {
        check_name(pair)?;
        Ok(Identity::Node {
            pair: pair.to_string(),
            role,
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
            Identity::Node { pair, role } => format!("{SCHEME}pair/{pair}/{role}"),
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
            ["pair", pair, role] => Identity::node(pair, role.parse()?),
            _ => Err(bad()),
        }
    }

    /// The identity in a DER certificate's URI SANs.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, IdentityError> {
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
        found.ok_or(IdentityError::Missing)
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
            Identity::node("p-1", Role::Gpu).unwrap(),
            Identity::node("p.2", Role::Cpu).unwrap(),
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
            "standby://pair/p/gpu/x",
        ] {
            assert!(Identity::parse_uri(u).is_err(), "{u}");
        }
    }
}
