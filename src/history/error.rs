//! The history's errors: each names the file or object at fault and what to do about it.

use std::io;
use std::path::PathBuf;

use crate::history::id::SnapshotId;
use crate::types::RelPath;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("history store {}: {source}", dir.display())]
    Locked { dir: PathBuf, source: io::Error },
    #[error(
        "{path} changed while it was recorded (a newer generation is under way): nothing was \
         recorded; record the next generation"
    )]
    Moved { path: RelPath },
    #[error("the manifest entry of {path} is unusable: {reason}")]
    BadEntry { path: RelPath, reason: String },
    #[error("pack {}: {reason}; the pack is damaged: run verify and replace it from a copy", path.display())]
    BadPack { path: PathBuf, reason: String },
    #[error("snapshot {}: {reason}; the snapshot file is damaged: replace it from a copy", path.display())]
    BadSnapshot { path: PathBuf, reason: String },
    #[error(
        "chunk {chunk} of {path} (snapshot {snapshot}) is in no pack under {}: a pack this \
         snapshot needs is missing; copy every pack of the store (or those `packs_for` names)",
        dir.display()
    )]
    MissingChunk {
        snapshot: SnapshotId,
        path: RelPath,
        chunk: String,
        dir: PathBuf,
    },
    #[error(
        "chunk {chunk} of the path list of snapshot {snapshot} is in no pack under {}: a pack \
         this snapshot needs is missing; copy every pack of the store (or those `packs_for` names)",
        dir.display()
    )]
    MissingBody {
        snapshot: SnapshotId,
        chunk: String,
        dir: PathBuf,
    },
    #[error("chunk {chunk} in pack {}: {reason}; run verify and replace the pack from a copy", pack.display())]
    BadChunk {
        chunk: String,
        pack: PathBuf,
        reason: String,
    },
    #[error(
        "{path} from snapshot {snapshot} does not hash to its recorded blake3: the store is damaged, run verify"
    )]
    Corrupt { snapshot: SnapshotId, path: RelPath },
    #[error("no snapshot matches {0}")]
    NoSnapshot(String),
    #[error("snapshot id prefix {prefix} is ambiguous: it matches {matches}; give more digits")]
    Ambiguous { prefix: String, matches: String },
    #[error("{path} is not in snapshot {snapshot}")]
    NoPath { snapshot: SnapshotId, path: RelPath },
    #[error("{path} is not a regular file in snapshot {snapshot}")]
    NotFile { snapshot: SnapshotId, path: RelPath },
    #[error("restore refused at {path}: {reason}")]
    Refused { path: String, reason: String },
}

impl HistoryError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> HistoryError {
        let path = path.into();
        move |source| HistoryError::Io { what, path, source }
    }
}
