//! Checking that every kept snapshot can be restored: every chunk it needs is in a pack and
//! hashes to its id, and every file's chunks add up to its size.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use crate::history::HistoryError;
use crate::history::id::{ChunkId, SnapshotId};
use crate::history::restore::Chunks;
use crate::history::store::Store;
use crate::types::RelPath;

/// One thing wrong with a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A pack or snapshot file that cannot be read at all.
    Damaged { file: PathBuf, reason: String },
    /// A chunk a snapshot needs that is in no pack, or is in one but does not read back right.
    Chunk {
        snapshot: SnapshotId,
        path: RelPath,
        reason: String,
    },
    /// A file whose chunks do not add up to its recorded size.
    Size { snapshot: SnapshotId, path: RelPath },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Damaged { file, reason } => write!(f, "{}: {reason}", file.display()),
            Problem::Chunk {
                snapshot,
                path,
                reason,
            } => write!(f, "snapshot {snapshot}, {path}: {reason}"),
            Problem::Size { snapshot, path } => {
                write!(
                    f,
                    "snapshot {snapshot}, {path}: chunks do not add up to the file's size"
                )
            }
        }
    }
}

/// What `verify` checked and found.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub snapshots: usize,
    /// Distinct chunks read and hashed, and their raw bytes.
    pub chunks: u64,
    pub bytes: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Store {
    /// Reads back every chunk every kept snapshot needs (each chunk once) and checks it. Problems
    /// are reported, not returned as errors, so one damaged pack does not hide the others.
    pub fn verify(&self) -> Result<VerifyReport, HistoryError> {
        let state = self.state();
        let mut report = VerifyReport {
            problems: state
                .damaged
                .iter()
                .map(|(file, reason)| Problem::Damaged {
                    file: file.clone(),
                    reason: reason.clone(),
                })
                .collect(),
            ..Default::default()
        };
        let mut chunks = Chunks::new(self, &state.index);
        // Each chunk's verdict: its length, or why it is unusable.
        let mut seen: HashMap<ChunkId, Result<u64, String>> = HashMap::new();
        for info in &state.snapshots {
            let snap = match self.load(&state, info.id) {
                Ok(s) => s,
                Err(e) => {
                    report.problems.push(Problem::Damaged {
                        file: self.snapshot_path(&info.id),
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            report.snapshots += 1;
            for p in &snap.paths {
                let mut size = 0u64;
                let mut whole = true;
                for c in &p.chunks {
                    let verdict = seen.entry(*c).or_insert_with(|| {
                        let r = chunks.read(info.id, &p.path, c);
                        r.map(|data| data.len() as u64).map_err(|e| e.to_string())
                    });
                    match verdict {
                        Ok(n) => size += *n,
                        Err(reason) => {
                            whole = false;
                            report.problems.push(Problem::Chunk {
                                snapshot: info.id,
                                path: p.path.clone(),
                                reason: reason.clone(),
                            });
                        }
                    }
                }
                if whole && size != p.entry.size {
                    report.problems.push(Problem::Size {
                        snapshot: info.id,
                        path: p.path.clone(),
                    });
                }
            }
        }
        for v in seen.values().flatten() {
            report.chunks += 1;
            report.bytes += v;
        }
        Ok(report)
    }
}
