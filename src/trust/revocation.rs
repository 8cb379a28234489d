//! Revoked certificates: the serial numbers no verifier of this process accepts. The coordinator
//! keeps the authoritative list (ARCHITECTURE.md, "Trust"); agents hold the copy it pushes on the
//! heartbeat stream and keep it on disk, so a restarted agent refuses a replaced machine before
//! it hears from the coordinator again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::disk::crashsafe::{self, kind};

/// Serial numbers (lower-case hex, as [`crate::trust::identity::serial_hex`] spells them)
/// shared by every verifier built from the same material; replaced whole when a new list
/// arrives. Cheap to clone. Verifiers note whom they refused, for the owner to report as
/// events and metrics ([`DenyList::take_refused`]).
#[derive(Clone, Debug, Default)]
pub struct DenyList {
    serials: Arc<RwLock<Arc<BTreeSet<String>>>>,
    refused: Arc<Mutex<Vec<Refused>>>,
}

/// A revoked certificate a verifier refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Its identity URI.
    pub identity: String,
    pub serial: String,
}

/// Refusals kept until taken (more are counted in the log only).
const MAX_REFUSED: usize = 256;

/// Largest list an agent accepts (entries leave the list once their certificates expire).
pub const MAX_SERIALS: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Frame {
        path: PathBuf,
        #[source]
        source: crashsafe::FrameError,
    },
    #[error("revocation list: {0}")]
    Invalid(String),
}

impl DenyList {
    pub fn new() -> DenyList {
        DenyList::default()
    }

    pub fn contains(&self, serial: &str) -> bool {
        self.serials.read().expect("deny list").contains(serial)
    }

    /// The current list.
    pub fn serials(&self) -> Arc<BTreeSet<String>> {
        self.serials.read().expect("deny list").clone()
    }

    /// Notes a refusal (verifiers call this).
    pub fn note_refused(&self, r: Refused) {
        let mut v = self.refused.lock().expect("refusals");
        if v.len() < MAX_REFUSED {
            v.push(r);
        }
    }

    /// The refusals noted since the last call.
    pub fn take_refused(&self) -> Vec<Refused> {
        std::mem::take(&mut *self.refused.lock().expect("refusals"))
    }

    /// Replaces the list; true when it changed. Malformed serials are refused (the whole list).
    pub fn replace(
        &self,
        serials: impl IntoIterator<Item = String>,
    ) -> Result<bool, RevocationError> {
        let new = checked(serials)?;
        let mut cur = self.serials.write().expect("deny list");
        if **cur == new {
            return Ok(false);
        }
        *cur = Arc::new(new);
        Ok(true)
    }

    /// Reads a list saved by [`DenyList::save`]; an absent file is an empty list.
    pub fn load(path: &Path) -> Result<DenyList, RevocationError> {
        let list = DenyList::new();
        let bytes = crashsafe::read_state(path, kind::REVOCATIONS).map_err(|source| {
            RevocationError::Frame {
                path: path.to_path_buf(),
                source,
            }
        })?;
        if let Some(b) = bytes {
            let text = String::from_utf8(b)
                .map_err(|_| RevocationError::Invalid(format!("{}: not text", path.display())))?;
            list.replace(text.lines().map(str::to_string))?;
        }
        Ok(list)
    }

    /// Writes the list crash-safely.
    pub fn save(&self, path: &Path) -> Result<(), RevocationError> {
        let serials = self.serials();
        let text: Vec<&str> = serials.iter().map(String::as_str).collect();
        crashsafe::write_state(path, kind::REVOCATIONS, text.join("\n").as_bytes()).map_err(
            |source| RevocationError::Io {
                path: path.to_path_buf(),
                source,
            },
        )
    }
}

fn checked(serials: impl IntoIterator<Item = String>) -> Result<BTreeSet<String>, RevocationError> {
    let mut set = BTreeSet::new();
    for s in serials {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(RevocationError::Invalid(format!(
                "{:?} is not a serial number in lower-case hex",
                s.chars().take(80).collect::<String>()
            )));
        }
        set.insert(s);
        if set.len() > MAX_SERIALS {
            return Err(RevocationError::Invalid(format!(
                "more than {MAX_SERIALS} serial numbers"
            )));
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_contains_and_survive_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("revoked");
        assert!(DenyList::load(&p).unwrap().serials().is_empty());
        let l = DenyList::new();
        let shared = l.clone();
        assert!(l.replace(["0a1b".to_string(), "ff".to_string()]).unwrap());
        assert!(!l.replace(["ff".to_string(), "0a1b".to_string()]).unwrap());
        assert!(shared.contains("0a1b") && !shared.contains("0a1c"));
        shared.note_refused(Refused {
            identity: "standby://pair/p/gpu/m".into(),
            serial: "0a1b".into(),
        });
        assert_eq!(l.take_refused().len(), 1);
        assert!(l.take_refused().is_empty());
        l.save(&p).unwrap();
        let back = DenyList::load(&p).unwrap();
        assert_eq!(*back.serials(), *l.serials());
    }

    #[test]
    fn malformed_lists_are_refused_whole() {
        let l = DenyList::new();
        l.replace(["aa".to_string()]).unwrap();
        for bad in ["", "AB", "xyz", &"a".repeat(65)] {
            assert!(
                l.replace(["bb".to_string(), bad.to_string()]).is_err(),
                "{bad:?}"
            );
        }
        assert!(l.contains("aa") && !l.contains("bb"));
    }
}
