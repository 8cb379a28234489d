//! The store: a directory of packs and snapshots, its in-memory index, and the read side
//! (list, find, entries, stats). Recording, restoring, verifying and pruning live in their own
//! modules as further `impl Store` blocks.
//!
//! Concurrency: one `Store` per directory (a lock file refuses a second process). Writers
//! (`record`, `forget`) are serialised by `writer`; readers hold `state` shared for a whole
//! operation, and a writer takes it exclusively only to publish what it wrote or to delete
//! files, so a restore never sees a pack vanish under it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::disk::statedir::{self, StateLock};
use crate::history::HistoryError;
use crate::history::id::{ChunkId, PackId, SnapshotId};
use crate::history::index::{Damaged, Index};
use crate::history::snapshot::{self, Snapshot, SnapshotInfo};
use crate::proto::Entry;
use crate::types::RelPath;

pub struct Store {
    dir: PathBuf,
    _lock: StateLock,
    pub(super) writer: Mutex<Writer>,
    pub(super) state: RwLock<State>,
}

/// What only writers touch.
#[derive(Default)]
pub(super) struct Writer {
    /// Files of the newest snapshot by content (blake3 → chunks), so an unchanged file is
    /// recorded without reading it. Loaded on the first `record`; a prune drops the contents
    /// whose chunks it deleted.
    pub known: Option<crate::history::record::Known>,
    /// The body chunks of the newest snapshot this process recorded, by run (empty after open
    /// and after a prune: every run is then encoded and its files looked up anew). A reused
    /// run's chunks need no check: the index loses chunks only in a prune.
    pub runs: crate::history::record::Runs,
}

pub(super) struct State {
    pub index: Index,
    /// Oldest first.
    pub snapshots: Vec<SnapshotInfo>,
    /// Packs and snapshot files that could not be read on open.
    pub damaged: Vec<Damaged>,
}

/// Which snapshot a command means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    Latest,
    /// An id or a unique prefix of one (hex).
    Id(String),
    /// The newest snapshot taken at or before a time.
    AtOrBefore(SystemTime),
}

impl FromStr for Selector {
    type Err = String;

    /// `latest`, 1 to 16 hex digits (an id prefix), or an RFC 3339 time (`2026-12-01T20:00:00Z`,
    /// or with a space and no zone, taken as UTC).
    fn from_str(s: &str) -> Result<Selector, String> {
        let s = s.trim();
        if s == "latest" {
            return Ok(Selector::Latest);
        }
        if (1..=16).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Selector::Id(s.to_ascii_lowercase()));
        }
        humantime::parse_rfc3339_weak(s)
            .map(Selector::AtOrBefore)
            .map_err(|_| format!("{s:?} is neither `latest`, a snapshot id, nor a time (RFC 3339)"))
    }
}

/// What a store holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStats {
    pub snapshots: usize,
    /// Bytes of pack files on disk.
    pub stored_bytes: u64,
    /// Sum of the snapshots' sizes (what they would take without deduplication).
    pub logical_bytes: u64,
    pub chunks: usize,
    pub packs: usize,
    /// Packs or snapshot files that could not be read on open (see `verify`).
    pub damaged: usize,
}

pub(super) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) the store in `dir`: takes its lock, clears `tmp/`, and
    /// rebuilds the chunk index from the pack footers.
    pub fn open(dir: &Path) -> Result<Store, HistoryError> {
        let lock = statedir::lock(dir).map_err(|source| HistoryError::Locked {
            dir: dir.to_owned(),
            source,
        })?;
        let store = Store {
            dir: dir.to_owned(),
            _lock: lock,
            writer: Mutex::new(Writer::default()),
            state: RwLock::new(State {
                index: Index::default(),
                snapshots: Vec::new(),
                damaged: Vec::new(),
            }),
        };
        for d in [store.packs_dir(), store.snapshots_dir()] {
            std::fs::create_dir_all(&d).map_err(HistoryError::io("creating", &d))?;
        }
        let tmp = store.tmp_dir();
        match std::fs::remove_dir_all(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(HistoryError::io("clearing", &tmp)(e));
            }
            _ => {}
        }
        std::fs::create_dir_all(&tmp).map_err(HistoryError::io("creating", &tmp))?;
        let (index, mut damaged) = Index::load(&store.packs_dir())?;
        let snapshots = store.read_infos(&mut damaged)?;
        *store.state_mut() = State {
            index,
            snapshots,
            damaged,
        };
        Ok(store)
    }

    fn read_infos(&self, damaged: &mut Vec<Damaged>) -> Result<Vec<SnapshotInfo>, HistoryError> {
        let dir = self.snapshots_dir();
        let mut infos = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(HistoryError::io("listing", &dir))? {
            let e = e.map_err(HistoryError::io("listing", &dir))?;
            let Some(id) = e.file_name().to_str().and_then(SnapshotId::from_file_name) else {
                tracing::warn!(file = %e.path().display(), "not a snapshot name: ignored");
                continue;
            };
            match snapshot::read_info(&e.path(), id) {
                Ok(info) => infos.push(info),
                Err(err) => damaged.push((e.path(), err.to_string())),
            }
        }
        sort(&mut infos);
        Ok(infos)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn packs_dir(&self) -> PathBuf {
        self.dir.join("packs")
    }

    pub(super) fn snapshots_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    pub(super) fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    pub(super) fn pack_path(&self, id: &PackId) -> PathBuf {
        self.packs_dir().join(id.file_name())
    }

    pub(super) fn snapshot_path(&self, id: &SnapshotId) -> PathBuf {
        self.snapshots_dir().join(id.file_name())
    }

    // A panic while holding a lock leaves nothing half-done in memory that a later caller
    // could misread (state is replaced whole), so a poisoned lock is simply taken over.
    pub(super) fn state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn state_mut(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every snapshot, oldest first.
    pub fn list(&self) -> Vec<SnapshotInfo> {
        self.state().snapshots.clone()
    }

    pub fn find(&self, sel: &Selector) -> Result<SnapshotInfo, HistoryError> {
        let state = self.state();
        let all = &state.snapshots;
        let none = |what: String| HistoryError::NoSnapshot(what);
        match sel {
            Selector::Latest => all
                .last()
                .cloned()
                .ok_or_else(|| none("latest (the store is empty)".into())),
            Selector::AtOrBefore(t) => {
                let ms = unix_ms(*t);
                let at = humantime::format_rfc3339_millis(*t);
                all.iter()
                    .rev()
                    .find(|s| s.time_ms <= ms)
                    .cloned()
                    .ok_or_else(|| none(format!("at or before {at}")))
            }
            Selector::Id(prefix) => {
                let hits: Vec<&SnapshotInfo> = all
                    .iter()
                    .filter(|s| s.id.to_string().starts_with(prefix.as_str()))
                    .collect();
                match hits[..] {
                    [one] => Ok(one.clone()),
                    [] => Err(none(format!("id {prefix}"))),
                    _ => Err(HistoryError::Ambiguous {
                        prefix: prefix.clone(),
                        matches: hits
                            .iter()
                            .map(|s| s.id.to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                    }),
                }
            }
        }
    }

    /// Loads a snapshot the store lists.
    pub(super) fn load(&self, state: &State, id: SnapshotId) -> Result<Snapshot, HistoryError> {
        if !state.snapshots.iter().any(|s| s.id == id) {
            return Err(HistoryError::NoSnapshot(format!("id {id}")));
        }
        let mut open: HashMap<PackId, std::fs::File> = HashMap::new();
        let mut chunk = |c: &ChunkId| {
            let (pack, stored) = self.body_chunk(state, id, c)?;
            let path = self.pack_path(&pack);
            let file = match open.entry(pack) {
                std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(
                    std::fs::File::open(&path).map_err(HistoryError::io("opening pack", &path))?,
                ),
            };
            crate::history::pack::read_chunk(file, &path, stored)
        };
        snapshot::load(&self.snapshot_path(&id), id, &mut chunk)
    }

    /// The paths of a snapshot (under `prefix`, itself included), in path order.
    pub fn entries(
        &self,
        id: SnapshotId,
        prefix: Option<&RelPath>,
    ) -> Result<Vec<(RelPath, Entry)>, HistoryError> {
        let snap = self.load(&self.state(), id)?;
        Ok(snap
            .under(prefix)
            .map(|p| (p.path.clone(), p.entry.clone()))
            .collect())
    }

    /// The packs holding a snapshot's chunks now, those of its path list included (a backup
    /// uploads them with the snapshot).
    /// A chunk in no pack is an error naming it.
    pub fn packs_for(&self, id: SnapshotId) -> Result<Vec<PackId>, HistoryError> {
        let state = self.state();
        let snap = self.load(&state, id)?;
        let mut packs = std::collections::BTreeSet::new();
        for c in &snap.body {
            packs.insert(self.body_chunk(&state, id, c)?.0);
        }
        for p in &snap.paths {
            for c in &p.chunks {
                let (pack, _) = state
                    .index
                    .get(c)
                    .ok_or_else(|| self.missing(id, &p.path, c))?;
                packs.insert(pack);
            }
        }
        Ok(packs.into_iter().collect())
    }

    /// Where a chunk of snapshot `id`'s path list is stored; one in no pack is an error naming it.
    fn body_chunk<'s>(
        &self,
        state: &'s State,
        id: SnapshotId,
        c: &ChunkId,
    ) -> Result<(PackId, &'s crate::history::pack::Stored), HistoryError> {
        state.index.get(c).ok_or_else(|| HistoryError::MissingBody {
            snapshot: id,
            chunk: crate::text::hex(c),
            dir: self.packs_dir(),
        })
    }

    pub(super) fn missing(
        &self,
        snapshot: SnapshotId,
        path: &RelPath,
        chunk: &ChunkId,
    ) -> HistoryError {
        HistoryError::MissingChunk {
            snapshot,
            path: path.clone(),
            chunk: crate::text::hex(chunk),
            dir: self.packs_dir(),
        }
    }

    pub fn stats(&self) -> StoreStats {
        let state = self.state();
        StoreStats {
            snapshots: state.snapshots.len(),
            stored_bytes: state.index.stored_bytes(),
            logical_bytes: state.snapshots.iter().map(|s| s.bytes).sum(),
            chunks: state.index.chunk_count(),
            packs: state.index.pack_count(),
            damaged: state.damaged.len(),
        }
    }
}

/// Oldest first; ties (same millisecond) by generation, then id.
pub(super) fn sort(infos: &mut [SnapshotInfo]) {
    infos.sort_by_key(|s| (s.time_ms, s.generation, s.id));
}
