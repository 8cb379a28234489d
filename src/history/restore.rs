//! Reading files back out of snapshots: one file streamed to a sink, or a whole tree (or a
//! subtree) written below a directory.
//!
//! Every chunk is verified against its id as it is read, and every file against its recorded
//! blake3 before it is renamed into place. Writing goes through `disk::fsx`: no symlink already
//! in the target is ever followed, and snapshot paths are `RelPath`s, which cannot escape.

use std::collections::HashMap;
use std::fs::{File, FileTimes, Permissions};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::disk::fsx::{self, Found, Root};
use crate::history::HistoryError;
use crate::history::id::{ChunkId, PackId, SnapshotId};
use crate::history::index::Index;
use crate::history::pack;
use crate::history::snapshot::SnapPath;
use crate::history::store::Store;
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

impl Store {
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
    /// modes and mtimes. Existing files are replaced; a path through a symlink in `to`, or a
    /// directory where a file goes (or the reverse), is refused.
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
        std::fs::create_dir_all(to).map_err(HistoryError::io("creating", to))?;
        let root = Root::open(to).map_err(HistoryError::io("opening", to))?;
        let mut w = Writer {
            root: &root,
            to,
            chunks: Chunks::new(self, &state.index),
            snapshot: id,
            done: RestoreSummary::default(),
        };
        // The directories above a prefix, with their recorded modes and mtimes where known.
        let mut above = Vec::new();
        for ancestor in prefix.iter().flat_map(|p| p.ancestors()) {
            w.dir(&ancestor)?;
            above.extend(snap.position(&ancestor).map(|i| &snap.paths[i]));
        }
        for p in &selected {
            match kind_of(&p.entry) {
                Some(Kind::Dir) => w.dir(&p.path)?,
                Some(Kind::File) => w.file(p)?,
                Some(Kind::Symlink) => w.symlink(p)?,
                // `snapshot::load` refuses these; kept as an error rather than a panic.
                None => {
                    return Err(HistoryError::BadEntry {
                        path: p.path.clone(),
                        reason: "no valid kind".into(),
                    });
                }
            }
        }
        // Directory modes and mtimes last, deepest first: writing inside a directory changes
        // its mtime, and a read-only mode would stop the writes.
        for p in selected
            .iter()
            .rev()
            .chain(above.iter().rev())
            .filter(|p| kind_of(&p.entry) == Some(Kind::Dir))
        {
            w.dir_meta(p)?;
        }
        fsx::syncfs(root.fd()).map_err(HistoryError::io("syncing", to))?;
        Ok(w.done)
    }
}

static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

fn tmp_name() -> Vec<u8> {
    let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
    format!(".standby-restore.{}.{n}", std::process::id()).into_bytes()
}

fn time_of(mtime_ns: i64) -> SystemTime {
    let d = Duration::from_nanos(mtime_ns.unsigned_abs());
    if mtime_ns >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH - d
    }
}

struct Writer<'a> {
    root: &'a Root,
    to: &'a Path,
    chunks: Chunks<'a>,
    snapshot: SnapshotId,
    done: RestoreSummary,
}

impl Writer<'_> {
    fn target(&self, rel: &RelPath) -> PathBuf {
        rel.to_path(self.to)
    }

    fn refused(&self, rel: &RelPath, reason: impl Into<String>) -> HistoryError {
        HistoryError::Refused {
            path: self.target(rel).display().to_string(),
            reason: reason.into(),
        }
    }

    /// The directory holding `rel`, reached without following any symlink.
    fn parent(&self, rel: &RelPath) -> Result<std::os::fd::OwnedFd, HistoryError> {
        self.root
            .open_parent(rel)
            .map(|(d, _)| d)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotADirectory => self.refused(rel, e.to_string()),
                _ => HistoryError::io("opening the directory of", self.target(rel))(e),
            })
    }

    /// What is at `name` in `dir`; refuses a directory where something else must go.
    fn occupant(&self, dir: BorrowedFd<'_>, rel: &RelPath) -> Result<Found, HistoryError> {
        fsx::found_at(dir, rel.name()).map_err(HistoryError::io("inspecting", self.target(rel)))
    }

    fn dir(&mut self, rel: &RelPath) -> Result<(), HistoryError> {
        let dir = self.parent(rel)?;
        match self.occupant(dir.as_fd(), rel)? {
            Found::Dir => return Ok(()),
            Found::Missing => {}
            _ => return Err(self.refused(rel, "exists and is not a directory")),
        }
        fsx::mkdirat(dir.as_fd(), rel.name(), 0o700)
            .map_err(HistoryError::io("creating", self.target(rel)))?;
        self.done.dirs += 1;
        Ok(())
    }

    fn dir_meta(&self, p: &SnapPath) -> Result<(), HistoryError> {
        let dir = self.parent(&p.path)?;
        let set = fsx::chmodat(dir.as_fd(), p.path.name(), p.entry.mode & 0o7777)
            .and_then(|()| fsx::set_mtime_at(dir.as_fd(), p.path.name(), p.entry.mtime_ns));
        set.map_err(HistoryError::io(
            "setting mode and mtime of",
            self.target(&p.path),
        ))
    }

    fn file(&mut self, p: &SnapPath) -> Result<(), HistoryError> {
        let dir = self.parent(&p.path)?;
        if self.occupant(dir.as_fd(), &p.path)? == Found::Dir {
            return Err(self.refused(&p.path, "a directory is where the file goes"));
        }
        let tmp = tmp_name();
        let f = fsx::create_excl(dir.as_fd(), &tmp)
            .map_err(HistoryError::io("creating a file in", self.target(&p.path)))?;
        let written = self.fill(&f, p);
        let placed = written.and_then(|n| {
            fsx::renameat(dir.as_fd(), &tmp, dir.as_fd(), p.path.name()).map_err(
                HistoryError::io("renaming into place", self.target(&p.path)),
            )?;
            Ok(n)
        });
        match placed {
            Ok(n) => {
                self.done.files += 1;
                self.done.bytes += n;
                Ok(())
            }
            Err(e) => {
                let _ = fsx::unlinkat(dir.as_fd(), &tmp, false);
                Err(e)
            }
        }
    }

    /// Writes a file's verified content, mode and mtime to the open temporary file.
    fn fill(&mut self, mut f: &File, p: &SnapPath) -> Result<u64, HistoryError> {
        let out = self.target(&p.path);
        let n = self
            .chunks
            .stream(self.snapshot, p, &mut |data| f.write_all(data), &out)?;
        let meta = f
            .set_permissions(Permissions::from_mode(p.entry.mode & 0o7777))
            .and_then(|()| f.set_times(FileTimes::new().set_modified(time_of(p.entry.mtime_ns))));
        meta.map_err(HistoryError::io("setting mode and mtime of", &out))?;
        Ok(n)
    }

    fn symlink(&mut self, p: &SnapPath) -> Result<(), HistoryError> {
        let dir = self.parent(&p.path)?;
        if self.occupant(dir.as_fd(), &p.path)? == Found::Dir {
            return Err(self.refused(&p.path, "a directory is where the symlink goes"));
        }
        let tmp = tmp_name();
        let made = fsx::symlinkat(&p.entry.target, dir.as_fd(), &tmp)
            .and_then(|()| fsx::set_mtime_at(dir.as_fd(), &tmp, p.entry.mtime_ns))
            .and_then(|()| fsx::renameat(dir.as_fd(), &tmp, dir.as_fd(), p.path.name()));
        if let Err(e) = made {
            let _ = fsx::unlinkat(dir.as_fd(), &tmp, false);
            return Err(HistoryError::io("creating symlink", self.target(&p.path))(
                e,
            ));
        }
        self.done.symlinks += 1;
        Ok(())
    }
}
