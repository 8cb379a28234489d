//! The newest coordinator term an agent has seen (ARCHITECTURE.md, "Highly available
//! coordinators"): persisted before a command of that term is acted on, never lowered, so a
//! deposed leader's commands stay refused across the agent's restarts.

use std::path::{Path, PathBuf};

use prost::Message;

use crate::disk::crashsafe::{self, kind};
use crate::disk::epoch::EpochError;
use crate::proto::state::TermState;

pub struct TermStore {
    path: PathBuf,
    newest: u64,
}

/// What the store says about a command's term.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// As new as the newest seen, or newer (now persisted): act on it.
    Current,
    /// Older than the newest seen: refuse it.
    Stale { newest: u64 },
}

impl TermStore {
    /// Loads `<dir>/term`; a missing file is term 0.
    pub fn open(dir: &Path) -> Result<TermStore, EpochError> {
        let path = dir.join("term");
        let newest =
            match crashsafe::read_state(&path, kind::TERM).map_err(|source| EpochError::Frame {
                path: path.clone(),
                source,
            })? {
                None => 0,
                Some(b) => {
                    TermState::decode(&b[..])
                        .map_err(|source| EpochError::Decode {
                            path: path.clone(),
                            source,
                        })?
                        .term
                }
            };
        Ok(TermStore { path, newest })
    }

    pub fn newest(&self) -> u64 {
        self.newest
    }

    /// Admits a command of `term`: stale when older than the newest seen; a newer one is
    /// persisted before it is admitted.
    pub fn admit(&mut self, term: u64) -> Result<Verdict, EpochError> {
        if term < self.newest {
            return Ok(Verdict::Stale {
                newest: self.newest,
            });
        }
        if term > self.newest {
            let bytes = TermState { term }.encode_to_vec();
            crashsafe::write_state(&self.path, kind::TERM, &bytes).map_err(|source| {
                EpochError::Io {
                    path: self.path.clone(),
                    source,
                }
            })?;
            self.newest = term;
        }
        Ok(Verdict::Current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_term_is_refused_across_restarts_and_a_failed_write_admits_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut t = TermStore::open(d.path()).unwrap();
        assert_eq!(
            t.admit(0).unwrap(),
            Verdict::Current,
            "file store coordinators"
        );
        assert_eq!(t.admit(7).unwrap(), Verdict::Current);
        assert_eq!(t.admit(7).unwrap(), Verdict::Current);
        assert_eq!(t.admit(5).unwrap(), Verdict::Stale { newest: 7 });
        let mut t = TermStore::open(d.path()).unwrap();
        assert_eq!(t.newest(), 7);
        assert_eq!(t.admit(0).unwrap(), Verdict::Stale { newest: 7 });
        assert_eq!(t.admit(9).unwrap(), Verdict::Current);

        // A directory that cannot be written: the newer term is not admitted, the old kept.
        let ro = d.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        let mut t = TermStore::open(&ro).unwrap();
        t.admit(3).unwrap();
        std::fs::remove_dir_all(&ro).unwrap();
        assert!(t.admit(4).is_err());
        assert_eq!(t.newest(), 3);
    }

    #[test]
    fn a_corrupt_term_file_is_an_error_not_zero() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("term"),
            b"garbage garbage garbage garbage garbage garbage garbage",
        )
        .unwrap();
        assert!(TermStore::open(d.path()).is_err());
    }
}
