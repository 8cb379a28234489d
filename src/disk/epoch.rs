//! The durable epoch of an agent (Invariant 3): persisted before it is acted on, never lowered.

use std::path::{Path, PathBuf};

use prost::Message;

use crate::disk::crashsafe::{self, kind};
use crate::proto::state::EpochState;
use crate::types::Epoch;

#[derive(Debug, thiserror::Error)]
pub enum EpochError {
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
    #[error("{path}: undecodable: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
}

pub struct EpochStore {
    path: PathBuf,
    current: Epoch,
}

impl EpochStore {
    /// Loads `<dir>/epoch`; a missing file is epoch 0.
    pub fn open(dir: &Path) -> Result<EpochStore, EpochError> {
        let path = dir.join("epoch");
        let current =
            match crashsafe::read_state(&path, kind::EPOCH).map_err(|source| EpochError::Frame {
                path: path.clone(),
                source,
            })? {
                None => Epoch(0),
                Some(b) => Epoch(
                    EpochState::decode(&b[..])
                        .map_err(|source| EpochError::Decode {
                            path: path.clone(),
                            source,
                        })?
                        .epoch,
                ),
            };
        Ok(EpochStore { path, current })
    }

    pub fn get(&self) -> Epoch {
        self.current
    }

    /// Raises the epoch to `e`, durably, before returning. Lower or equal values are no-ops.
    pub fn raise(&mut self, e: Epoch) -> Result<bool, EpochError> {
        if e <= self.current {
            return Ok(false);
        }
        let bytes = EpochState { epoch: e.0 }.encode_to_vec();
        crashsafe::write_state(&self.path, kind::EPOCH, &bytes).map_err(|source| {
            EpochError::Io {
                path: self.path.clone(),
                source,
            }
        })?;
        self.current = e;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_lowered_and_durable() {
        let d = tempfile::tempdir().unwrap();
        let mut s = EpochStore::open(d.path()).unwrap();
        assert_eq!(s.get(), Epoch(0));
        assert!(s.raise(Epoch(3)).unwrap());
        assert!(!s.raise(Epoch(2)).unwrap());
        assert_eq!(EpochStore::open(d.path()).unwrap().get(), Epoch(3));
    }
}
