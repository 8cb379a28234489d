//! The chunk index: which pack holds each chunk, rebuilt from pack footers on open and kept in
//! step with `packs/` by the store (the only writer of that directory).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::history::HistoryError;
use crate::history::id::{ChunkId, PackId};
use crate::history::pack::{self, Stored};

/// One pack as its footer describes it.
pub struct PackMeta {
    pub size: u64,
    pub chunks: Vec<Stored>,
}

#[derive(Default)]
pub struct Index {
    packs: BTreeMap<PackId, PackMeta>,
    /// A chunk found in several packs (after an interrupted repack) maps to one of them.
    chunks: HashMap<ChunkId, (PackId, usize)>,
}

/// A pack that could not be indexed, and why.
pub type Damaged = (PathBuf, String);

impl Index {
    /// Reads the footer of every `<64 hex>.pack` in `dir`. Packs whose footer is unreadable are
    /// returned as damaged instead of failing the whole store: snapshots that do not need them
    /// still restore.
    pub fn load(dir: &Path) -> Result<(Index, Vec<Damaged>), HistoryError> {
        let mut index = Index::default();
        let mut damaged = Vec::new();
        for e in std::fs::read_dir(dir).map_err(HistoryError::io("listing", dir))? {
            let e = e.map_err(HistoryError::io("listing", dir))?;
            let Some(id) = e.file_name().to_str().and_then(PackId::from_file_name) else {
                tracing::warn!(file = %e.path().display(), "not a pack name: ignored");
                continue;
            };
            match pack::read_footer(&e.path()) {
                Ok((chunks, size)) => index.add(id, PackMeta { size, chunks }),
                Err(err) => {
                    tracing::warn!(error = %err, "pack not indexed");
                    damaged.push((e.path(), err.to_string()));
                }
            }
        }
        Ok((index, damaged))
    }

    pub fn add(&mut self, id: PackId, meta: PackMeta) {
        for (i, c) in meta.chunks.iter().enumerate() {
            self.chunks.entry(c.id).or_insert((id, i));
        }
        self.packs.insert(id, meta);
    }

    /// Forgets packs (deleted from disk); chunks they held map to another pack holding them,
    /// if any.
    pub fn remove(&mut self, gone: &[PackId]) {
        for id in gone {
            self.packs.remove(id);
        }
        self.chunks.clear();
        for (id, meta) in &self.packs {
            for (i, c) in meta.chunks.iter().enumerate() {
                self.chunks.entry(c.id).or_insert((*id, i));
            }
        }
    }

    pub fn get(&self, chunk: &ChunkId) -> Option<(PackId, &Stored)> {
        let (pack, i) = self.chunks.get(chunk)?;
        Some((*pack, &self.packs[pack].chunks[*i]))
    }

    pub fn contains(&self, chunk: &ChunkId) -> bool {
        self.chunks.contains_key(chunk)
    }

    pub fn packs(&self) -> impl Iterator<Item = (&PackId, &PackMeta)> {
        self.packs.iter()
    }

    pub fn pack_count(&self) -> usize {
        self.packs.len()
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Bytes of all pack files.
    pub fn stored_bytes(&self) -> u64 {
        self.packs.values().map(|p| p.size).sum()
    }
}
