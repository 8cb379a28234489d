//! Reading files back out of snapshots: one file streamed to a sink, or a whole tree (or a
//! subtree) written below a directory.
//!
//! Every chunk is verified against its id as it is read, and every file against its recorded
//! blake3 before it is renamed into place. Writing goes through `disk::fsx`: no symlink already
//! in the target is ever followed, and snapshot paths are `RelPath`s, which cannot escape.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::disk::fsx::{self, Root};
use crate::history::HistoryError;
use crate::history::id::{ChunkId, PackId, SnapshotId};
use crate::history::index::Index;
use crate::history::pack;
use crate::history::snapshot::SnapPath;
use crate::history::store::Store;
use crate::history::unpack::Unpacker;
use crate::proto::Entry;
use crate::replication::manifest::{Kind, kind_of};
use crate::types::RelPath;

/// What a restore wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RestoreSummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

/// Reads chunks from packs, keeping a few packs open.
pub(super) struct Chunks<'a> {
    store: &'a Store,
    index: &'a Index,
    open: HashMap<PackId, File>,
}

const OPEN_PACKS: usize = 32;

impl<'a> Chunks<'a> {
    pub fn new(store: &'a Store, index: &'a Index) -> Chunks<'a> {
        Chunks {
            store,
            index,
            open: HashMap::new(),
        }
    }

    /// A chunk's raw bytes, verified; a missing chunk names the snapshot and path needing it.
    pub fn read(
        &mut self,
        snapshot: SnapshotId,
        path: &RelPath,
        id: &ChunkId,
    ) -> Result<Vec<u8>, HistoryError> {
        let (pack, stored) = self
            .index
            .get(id)
            .ok_or_else(|| self.store.missing(snapshot, path, id))?;
        let file_path = self.store.pack_path(&pack);
        if !self.open.contains_key(&pack) {
            if self.open.len() >= OPEN_PACKS {
                self.open.clear();
            }
            let f = File::open(&file_path).map_err(HistoryError::io("opening pack", &file_path))?;
            self.open.insert(pack, f);
        }
        pack::read_chunk(&self.open[&pack], &file_path, stored)
    }

    /// Streams a file's content to `sink`, chunk by chunk, then checks the whole file's blake3.
    pub fn stream(
        &mut self,
        snapshot: SnapshotId,
        p: &SnapPath,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
        out: &Path,
    ) -> Result<u64, HistoryError> {
        let mut hasher = blake3::Hasher::new();
        let mut len = 0u64;
        for c in &p.chunks {
            let data = self.read(snapshot, &p.path, c)?;
            hasher.update(&data);
            len += data.len() as u64;
            sink(&data).map_err(HistoryError::io("writing", out))?;
        }
        if hasher.finalize().as_bytes()[..] != p.entry.blake3[..] || len != p.entry.size {
            return Err(HistoryError::Corrupt {
                snapshot,
                path: p.path.clone(),
            });
        }
        Ok(len)
    }
}

/// One piece of a streamed snapshot ([`Store::stream_snapshot`]).
pub enum Piece<'a> {
    /// The next path; a file's content follows as `Data`, `entry.size` bytes in all.
    Entry(&'a RelPath, &'a Entry),
    Data(&'a [u8]),
}

/// What [`Store::stream_snapshot`] sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Streamed {
    pub entries: u64,
    pub bytes: u64,
}

impl Store {
    /// Streams the entries of snapshot `id` below `prefix` (all of them when None) to `sink`,
    /// each file's content after its entry, every chunk verified and each whole file at its end.
    /// The store's lock is held only while a chunk is looked up and its pack opened, never while
    /// `sink` runs: a slow or stalled reader holds up neither recording nor pruning. A pack a
    /// prune removes after it was opened is still read; a chunk pruned before it was looked up
    /// ends the stream with an error, never a silent gap.
    pub fn stream_snapshot(
        &self,
        id: SnapshotId,
        prefix: Option<&RelPath>,
        mut sink: impl FnMut(Piece<'_>) -> io::Result<()>,
    ) -> Result<Streamed, HistoryError> {
        let snap = {
            let state = self.state();
            self.load(&state, id)?
        };
        let out = PathBuf::from(format!("the reader of snapshot {id}"));
        let mut packs = HashMap::new();
        let mut sent = Streamed::default();
        for p in snap.under(prefix) {
            sink(Piece::Entry(&p.path, &p.entry)).map_err(HistoryError::io("sending", &out))?;
            sent.entries += 1;
            if kind_of(&p.entry) != Some(Kind::File) {
                continue;
            }
            let mut hasher = blake3::Hasher::new();
            let mut len = 0u64;
            for c in &p.chunks {
                let data = self.read_unlocked(&mut packs, id, &p.path, c)?;
                hasher.update(&data);
                len += data.len() as u64;
                sink(Piece::Data(&data)).map_err(HistoryError::io("sending", &out))?;
            }
            if hasher.finalize().as_bytes()[..] != p.entry.blake3[..] || len != p.entry.size {
                return Err(HistoryError::Corrupt {
                    snapshot: id,
                    path: p.path.clone(),
                });
            }
            sent.bytes += len;
        }
        Ok(sent)
    }

    /// A chunk, the lock held only to find it and open its pack (kept open in `packs`).
    fn read_unlocked(
        &self,
        packs: &mut HashMap<PackId, (File, PathBuf)>,
        snapshot: SnapshotId,
        path: &RelPath,
        id: &ChunkId,
    ) -> Result<Vec<u8>, HistoryError> {
        let (pack, stored) = {
            let state = self.state();
            let (pack, stored) = state
                .index
                .get(id)
                .ok_or_else(|| self.missing(snapshot, path, id))?;
            if !packs.contains_key(&pack) {
                if packs.len() >= OPEN_PACKS {
                    packs.clear();
                }
                let file_path = self.pack_path(&pack);
                let f =
                    File::open(&file_path).map_err(HistoryError::io("opening pack", &file_path))?;
                packs.insert(pack, (f, file_path));
            }
            (pack, stored.clone())
        };
        let (f, file_path) = &packs[&pack];
        pack::read_chunk(f, file_path, &stored)
    }

    /// Streams one file of a snapshot to `sink`, every chunk verified as it goes and the whole
    /// file at the end (an error then means: discard what the sink received).
    pub fn read_file(
        &self,
        id: SnapshotId,
        path: &RelPath,
        mut sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), HistoryError> {
        let state = self.state();
        let snap = self.load(&state, id)?;
        let i = snap.position(path).ok_or_else(|| HistoryError::NoPath {
            snapshot: id,
            path: path.clone(),
        })?;
        let p = &snap.paths[i];
        if kind_of(&p.entry) != Some(Kind::File) {
            return Err(HistoryError::NotFile {
                snapshot: id,
                path: path.clone(),
            });
        }
        let out = PathBuf::from(format!("the reader of {path}"));
        Chunks::new(self, &state.index).stream(id, p, &mut sink, &out)?;
        Ok(())
    }

    /// Restores a snapshot (or the subtree at `prefix`) below `to`, at the same relative paths:
    /// directories, files (written to a temporary name, verified, then renamed), symlinks,
    /// modes (never setuid or setgid) and mtimes, through [`Unpacker`]. Existing files are
    /// replaced; a path through a symlink in `to`, or a directory where a file goes (or the
    /// reverse), is refused.
    pub fn restore(
        &self,
        id: SnapshotId,
        prefix: Option<&RelPath>,
        to: &Path,
    ) -> Result<RestoreSummary, HistoryError> {
        let state = self.state();
        let snap = self.load(&state, id)?;
        let selected: Vec<&SnapPath> = snap.under(prefix).collect();
        if let (Some(p), true) = (prefix, selected.is_empty()) {
            return Err(HistoryError::NoPath {
                snapshot: id,
                path: p.clone(),
            });
        }
        let mut u = Unpacker::new(to)?;
        // The directories above a prefix, with their recorded modes and mtimes.
        let above = prefix.iter().flat_map(|p| p.ancestors());
        for p in above.filter_map(|a| snap.position(&a).map(|i| &snap.paths[i])) {
            u.entry(p.path.clone(), p.entry.clone())?;
        }
        let mut chunks = Chunks::new(self, &state.index);
        for p in &selected {
            u.entry(p.path.clone(), p.entry.clone())?;
            if kind_of(&p.entry) == Some(Kind::File) {
                let out = p.path.to_path(to);
                let mut sink = |data: &[u8]| u.data(data).map_err(io::Error::other);
                chunks.stream(id, p, &mut sink, &out)?;
            }
        }
        let done = u.finish()?;
        let root = Root::open(to).map_err(HistoryError::io("opening", to))?;
        fsx::syncfs(root.fd()).map_err(HistoryError::io("syncing", to))?;
        Ok(done)
    }
}
