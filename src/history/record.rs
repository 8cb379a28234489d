//! Recording a committed generation of the replica as a snapshot.
//!
//! Only files whose content the newest snapshot does not hold are read (an unchanged 256 MiB
//! file costs a hash-map lookup). A read file is chunked, each new chunk packed, and the whole
//! file's blake3 checked against the manifest as it streams by: a mismatch means a newer
//! generation changed it under us, and the record fails with nothing visible. Packs go in
//! durably as they fill; the snapshot file goes in last (ARCHITECTURE.md, "History").

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::ops::Bound;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::disk::fsx::{self, Root};
use crate::history::HistoryError;
use crate::history::chunker::{Chunk, Chunker};
use crate::history::id::{ChunkId, PackId};
use crate::history::index::PackMeta;
use crate::history::pack::PackWriter;
use crate::history::snapshot::{self, SnapPath, SnapshotInfo};
use crate::history::store::{Store, sort, unix_ms};
use crate::proto::Entry;
use crate::proto::history::SnapshotSummary;
use crate::replication::manifest::{Kind, Manifest, entry_bytes, kind_of, wire_entry};
use crate::replication::receive::edits::Edits;
use crate::types::{Generation, RelPath};

/// A pack is sealed once it holds this much; a record writes as many as it needs.
pub const PACK_TARGET: u64 = 16 << 20;

/// What one `record` did.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub info: SnapshotInfo,
    /// Files read from the replica (the others were already held).
    pub files_read: u64,
    pub bytes_read: u64,
    /// Chunks not held before.
    pub chunks_stored: u64,
    /// Runs of paths encoded (the others were the newest snapshot's, reused as they were).
    pub runs_encoded: u64,
    /// Manifest entries read by the walk (the runs no changed path falls in are skipped).
    pub entries_walked: u64,
    /// Where the time went.
    pub phases: Phases,
}

/// The time of each phase of one `record` (the benchmark prints them; ARCHITECTURE.md,
/// "History").
#[derive(Clone, Debug, Default)]
pub struct Phases {
    /// Walking the manifest: the root and each run's digest, the runs looked up, the paths of
    /// runs encoded anew built, each file's content looked up.
    pub walk: Duration,
    /// Reading, chunking and hashing the files read.
    pub chunk: Duration,
    /// Compressing new chunks and writing them into packs.
    pub pack: Duration,
    /// Sealing packs: footers, fsyncs, renames into `packs/`.
    pub seal: Duration,
    /// Encoding runs of paths and the snapshot file.
    pub encode: Duration,
    /// Writing the snapshot file durably.
    pub write: Duration,
    /// Publishing: the index, the list, the by-content map of the new snapshot.
    pub publish: Duration,
}

/// Contents the store holds whole, by blake3: their chunks, every one in the index (only a
/// prune drops chunks from it, and a prune drops from this map what it dropped).
pub(super) type Known = HashMap<[u8; 32], Vec<ChunkId>>;

/// The runs of paths of the newest snapshot this process recorded (every chunk in the index:
/// a prune empties this). A walk reuses a run whose entries have the same digest, and with
/// the paths changed since, skips the runs none of them falls in (ARCHITECTURE.md, "History",
/// "Walking only what changed").
#[derive(Default)]
pub(super) struct Runs {
    /// Their body chunks by the digest of their entries.
    by_digest: HashMap<[u8; 32], Vec<ChunkId>>,
    /// Each run in path order.
    order: Vec<RunEnd>,
    /// The generation of the manifest they were walked from.
    generation: Option<Generation>,
}

impl Runs {
    pub(super) fn clear(&mut self) {
        *self = Runs::default();
    }
}

/// Where a run ends and why, its digest, and its regular files and their bytes.
#[derive(Clone)]
struct RunEnd {
    last: RelPath,
    cut: Cut,
    digest: [u8; 32],
    files: u64,
    bytes: u64,
}

/// Why a run ends where it does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Its last path's hash ([`ends_run`]).
    Path,
    /// It reached [`RUN_MAX`] paths.
    Full,
    /// The manifest ended: with paths added after it, it ends elsewhere.
    End,
}

/// The paths whose entries changed (added, changed, removed) since generation `since` (a
/// manifest's apply lists them: [`crate::replication::manifest::Undo::paths`]).
#[derive(Clone, Debug)]
pub struct Changed {
    pub since: Generation,
    pub paths: BTreeSet<RelPath>,
}

/// A run of paths ends after one in this many on average (about 10 KB of body)...
const RUN_AVG: u64 = 64;
/// ...or after this many.
const RUN_MAX: usize = 1024;
/// A run's encoding is stored in chunks of at most this (a run of files with long chunk lists).
const PIECE: usize = 1 << 20;

/// What the receiver knows of the generation being recorded (ARCHITECTURE.md, "History"):
/// the manifest's root (its commit checked it), the ranges commits changed in files updated in
/// place, and which generation the replica holds at any moment.
pub struct Hint<'a> {
    pub root: [u8; 32],
    pub edits: &'a Edits,
    /// The paths changed since the manifest of the store's last record, when known.
    pub changed: Option<&'a Changed>,
    pub workspace_generation: &'a (dyn Fn() -> Generation + Sync),
}

/// One record in progress.
struct Run<'a> {
    store: &'a Store,
    replica: Root,
    replica_dir: PathBuf,
    chunker: Chunker,
    pack: Option<PackWriter>,
    installed: Vec<(PackId, PackMeta)>,
    /// Chunks stored by this run (in `pack` or `installed`), not yet in the index.
    fresh: HashSet<ChunkId>,
    files_read: u64,
    bytes_read: u64,
    new_bytes: u64,
    hint: Option<&'a Hint<'a>>,
    generation: Generation,
    phases: Phases,
    /// Time spent in `file`, less its packing and sealing.
    in_files: Duration,
}

impl Store {
    /// Records `manifest`, a committed generation of the replica at `replica_root`, taken at
    /// `at`. The replica must hold exactly that generation; if a file no longer matches its
    /// entry, `Err(Moved)` and no snapshot is added (record the next generation instead).
    pub fn record(
        &self,
        replica_root: &Path,
        manifest: &Manifest,
        at: SystemTime,
    ) -> Result<Recorded, HistoryError> {
        self.record_with(replica_root, manifest, at, None)
    }

    /// [`Store::record`], reading of a file updated in place only around the ranges `hint`
    /// says changed, when the store holds the content they changed.
    pub fn record_with(
        &self,
        replica_root: &Path,
        manifest: &Manifest,
        at: SystemTime,
        hint: Option<&Hint<'_>>,
    ) -> Result<Recorded, HistoryError> {
        let mut writer = self.writer();
        if writer.known.is_none() {
            writer.known = Some(self.newest_known()?);
        }
        let writer = &mut *writer;
        let known = writer.known.as_ref().expect("just loaded");
        let replica = Root::open(replica_root)
            .map_err(HistoryError::io("opening the replica", replica_root))?;
        let mut run = Run {
            store: self,
            replica,
            replica_dir: replica_root.to_owned(),
            chunker: Chunker::default(),
            pack: None,
            installed: Vec::new(),
            fresh: HashSet::new(),
            files_read: 0,
            bytes_read: 0,
            new_bytes: 0,
            hint,
            generation: manifest.generation,
            phases: Phases::default(),
            in_files: Duration::ZERO,
        };
        let t = Instant::now();
        let changed = hint.and_then(|h| h.changed);
        let walked = run.all(manifest, known, &writer.runs, changed);
        let root = match hint {
            Some(h) => {
                debug_assert_eq!(h.root, manifest.root(), "the hint's root");
                h.root
            }
            None => manifest.root(),
        };
        let p = &mut run.phases;
        p.chunk = run.in_files;
        p.walk = [p.chunk, p.encode, p.pack, p.seal]
            .iter()
            .fold(t.elapsed(), |left, d| left.saturating_sub(*d));
        let walked = walked.and_then(|w| run.seal().map(|()| w));
        let mut phases = std::mem::take(&mut run.phases);
        // Installed packs are on disk whatever happened: the index mirrors `packs/` (a retry
        // reuses their chunks; prune removes them if nothing ever does).
        let chunks_stored = run.fresh.len() as u64;
        let (files_read, bytes_read, new_bytes) = (run.files_read, run.bytes_read, run.new_bytes);
        self.publish_packs(std::mem::take(&mut run.installed));
        drop(run);
        let mut walked = walked?;
        let runs = std::mem::take(&mut walked.runs);
        let summary = summarize(manifest, root, &walked, at, new_bytes);
        let info = self.publish_snapshot(&summary, &walked.body, &mut phases)?;
        let t = Instant::now();
        let known = writer.known.as_mut().expect("loaded above");
        known.extend(std::mem::take(&mut walked.learned));
        // Contents the newest snapshot no longer holds pile up: past an eighth more than it
        // has files, start again from it (a load of one snapshot every many records, and the
        // map stays near its size: the standby's memory with 100k files).
        if known.len() as u64 > summary.files + summary.files / 8 + 1024 {
            writer.known = None;
        }
        writer.runs = Runs {
            generation: Some(manifest.generation),
            ..runs
        };
        phases.publish += t.elapsed();
        Ok(Recorded {
            info,
            files_read,
            bytes_read,
            chunks_stored,
            runs_encoded: walked.encoded,
            entries_walked: walked.walked,
            phases,
        })
    }

    /// Files of the newest snapshot by content, those whose chunks the index holds (a file
    /// in a pack found damaged on open is read again).
    fn newest_known(&self) -> Result<Known, HistoryError> {
        let state = self.state();
        let mut known = match state.snapshots.last() {
            None => Known::new(),
            Some(s) => known_of(&self.load(&state, s.id)?.paths),
        };
        known.retain(|_, chunks| chunks.iter().all(|c| state.index.contains(c)));
        Ok(known)
    }

    fn publish_packs(&self, packs: Vec<(PackId, PackMeta)>) {
        if packs.is_empty() {
            return;
        }
        let mut state = self.state_mut();
        for (id, meta) in packs {
            state.index.add(id, meta);
        }
    }

    fn publish_snapshot(
        &self,
        summary: &SnapshotSummary,
        body: &[ChunkId],
        phases: &mut Phases,
    ) -> Result<SnapshotInfo, HistoryError> {
        let t = Instant::now();
        let bytes = snapshot::encode(summary, body);
        phases.encode += t.elapsed();
        let t = Instant::now();
        let id = snapshot::write(&bytes, &self.tmp_dir(), &self.snapshots_dir())?;
        phases.write = t.elapsed();
        let t = Instant::now();
        let info = snapshot::read_info(&self.snapshot_path(&id), id)?;
        let mut state = self.state_mut();
        if !state.snapshots.iter().any(|s| s.id == id) {
            state.snapshots.push(info.clone());
            sort(&mut state.snapshots);
        }
        phases.publish = t.elapsed();
        Ok(info)
    }
}

fn known_of(paths: &[SnapPath]) -> Known {
    paths
        .iter()
        .filter(|p| kind_of(&p.entry) == Some(Kind::File))
        .filter_map(|p| Some((p.entry.blake3[..].try_into().ok()?, p.chunks.clone())))
        .collect()
}

fn summarize(
    manifest: &Manifest,
    root: [u8; 32],
    walked: &Walked,
    at: SystemTime,
    new_bytes: u64,
) -> SnapshotSummary {
    SnapshotSummary {
        time_ms: unix_ms(at),
        generation: manifest.generation.0,
        root: root.to_vec(),
        files: walked.files,
        bytes: walked.bytes,
        new_bytes,
        entries: manifest.len() as u64,
    }
}

/// Whether an error opening a replica file means the file is no longer what the manifest says
/// (deleted, replaced by a symlink or a directory): a newer generation got there first.
fn moved(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    ) || e.raw_os_error() == Some(libc::ELOOP)
}

/// Whether a run of paths ends after `p`: its FNV-1a hash is 0 modulo [`RUN_AVG`]. Cuts that
/// depend on the path alone keep every run that no change touched the same from snapshot to
/// snapshot, so its chunk is stored once (ARCHITECTURE.md, "History").
pub(super) fn ends_run(p: &RelPath) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in p.as_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h.is_multiple_of(RUN_AVG)
}

impl Run<'_> {
    /// Walks the manifest in runs of paths, storing the body chunks of runs `prev` (from the
    /// newest snapshot this process recorded) does not hold, and the files they need. With
    /// the paths changed since `prev`'s manifest, a run of `prev` that none of them falls in is
    /// taken as it is, without reading its entries.
    fn all(
        &mut self,
        manifest: &Manifest,
        known: &Known,
        prev: &Runs,
        changed: Option<&Changed>,
    ) -> Result<Walked, HistoryError> {
        let dirty = changed
            .filter(|c| prev.generation == Some(c.since))
            .map(|c| &c.paths);
        let mut w = Walked::default();
        let mut walk = RunWalk::default();
        let mut start: Bound<RelPath> = Bound::Unbounded;
        // The next run of `prev`, and whether the walk's next run starts where it does.
        let (mut next, mut aligned) = (0, true);
        loop {
            if let (Some(dirty), true, Some(r)) = (dirty, aligned, prev.order.get(next))
                && r.cut != Cut::End
                && dirty
                    .range((start.as_ref(), Bound::Included(&r.last)))
                    .next()
                    .is_none()
            {
                let ids = &prev.by_digest[&r.digest];
                w.add(r.clone(), ids);
                start = Bound::Excluded(r.last.clone());
                next += 1;
                continue;
            }
            let entries = manifest.range((start.as_ref(), Bound::Unbounded));
            let Some((end, ids)) = walk.next(self, entries, known, prev, &mut w)? else {
                return Ok(w);
            };
            // Realigned when this run ends where one of `prev` ended.
            while prev.order.get(next).is_some_and(|r| r.last < end.last) {
                next += 1;
            }
            aligned = prev.order.get(next).is_some_and(|r| r.last == end.last);
            next += usize::from(aligned);
            start = Bound::Excluded(end.last.clone());
            w.add(end, &ids);
        }
    }

    /// One run of paths: its chunks as the newest snapshot stored them when its entries are
    /// the same (`digest`, over their bytes as the root hashes them), else encoded and stored
    /// anew.
    fn run(
        &mut self,
        run: &[(&RelPath, &Entry)],
        digest: [u8; 32],
        known: &Known,
        prev: &Runs,
        w: &mut Walked,
    ) -> Result<Vec<ChunkId>, HistoryError> {
        if let Some(ids) = prev.by_digest.get(&digest) {
            return Ok(ids.clone());
        }
        let mut paths = Vec::with_capacity(run.len());
        for &(rel, e) in run {
            let kind = kind_of(e).ok_or_else(|| HistoryError::BadEntry {
                path: rel.clone(),
                reason: "no valid kind".into(),
            })?;
            let chunks = match kind {
                Kind::File => {
                    let (t, packing) = (Instant::now(), self.phases.pack + self.phases.seal);
                    let chunks = self.file(rel, e, known);
                    let packed = (self.phases.pack + self.phases.seal).saturating_sub(packing);
                    self.in_files += t.elapsed().saturating_sub(packed);
                    let (chunks, read) = chunks?;
                    if read && let Ok(hash) = e.blake3[..].try_into() {
                        w.learned.push((hash, chunks.clone()));
                    }
                    chunks
                }
                Kind::Dir | Kind::Symlink => Vec::new(),
            };
            paths.push(SnapPath {
                path: rel.clone(),
                entry: wire_entry(e),
                chunks,
            });
        }
        let t = Instant::now();
        w.encoded += 1;
        let bytes = snapshot::encode_paths(&paths);
        let pieces: Vec<(ChunkId, &[u8])> = bytes
            .chunks(PIECE)
            .map(|data| (*blake3::hash(data).as_bytes(), data))
            .collect();
        self.phases.encode += t.elapsed();
        let mut ids = Vec::with_capacity(pieces.len());
        for (id, data) in pieces {
            self.store_chunk(Chunk { id, data })?;
            ids.push(id);
        }
        Ok(ids)
    }

    /// A file's chunks, and whether they were read from the replica (false: the store held
    /// its content).
    fn file(
        &mut self,
        rel: &RelPath,
        e: &Entry,
        known: &Known,
    ) -> Result<(Vec<ChunkId>, bool), HistoryError> {
        let hash: [u8; 32] = e.blake3[..]
            .try_into()
            .map_err(|_| HistoryError::BadEntry {
                path: rel.clone(),
                reason: format!("a blake3 of {} bytes", e.blake3.len()),
            })?;
        if let Some(chunks) = known.get(&hash) {
            return Ok((chunks.clone(), false));
        }
        let chunks = match self.base_of(rel, known) {
            Some(old) => self.patched(rel, e, old)?,
            None => self.read(rel, e, hash)?,
        };
        Ok((chunks, true))
    }

    /// The chunks and their lengths of the content a file was changed from in place, when
    /// the hint knows the ranges and the store holds that content whole.
    fn base_of(&self, rel: &RelPath, known: &Known) -> Option<Based> {
        let p = self.hint?.edits.get(rel)?;
        let chunks = known.get(&p.base_blake3)?;
        let state = self.store.state();
        let old = chunks
            .iter()
            .map(|c| Some((*c, u64::from(state.index.get(c)?.1.raw_len))))
            .collect::<Option<Vec<_>>>()?;
        let len: u64 = old.iter().map(|c| c.1).sum();
        (len == p.base_size).then(|| Based {
            old,
            ranges: p.ranges.clone(),
        })
    }

    /// Re-chunks a file around the ranges changed since its base (`Chunker::rechunk`). The
    /// whole file is not hashed: the receiver verified it against the manifest before it
    /// committed, and outside the ranges it is the base, whose chunks the store holds by hash
    /// (ARCHITECTURE.md, "History"). The replica must hold this generation before and after.
    fn patched(
        &mut self,
        rel: &RelPath,
        e: &Entry,
        base: Based,
    ) -> Result<Vec<ChunkId>, HistoryError> {
        let still = |run: &Self| {
            let h = run.hint.expect("a hint");
            (h.workspace_generation)() == run.generation
        };
        if !still(self) {
            return Err(HistoryError::Moved { path: rel.clone() });
        }
        let (file, path) = self.open(rel)?;
        let mut chunker = std::mem::take(&mut self.chunker);
        let r = chunker.rechunk(&file, e.size, &base.old, &base.ranges, |c: Chunk<'_>| {
            self.store_chunk(c).map_err(ReadError::Store)
        });
        self.chunker = chunker;
        if !still(self) {
            return Err(HistoryError::Moved { path: rel.clone() });
        }
        let r = r.map_err(|err| err.at(&path))?;
        self.files_read += 1;
        self.bytes_read += r.read;
        Ok(r.ids)
    }

    fn have(&self, c: &ChunkId) -> bool {
        self.fresh.contains(c) || self.store.state().index.contains(c)
    }

    /// Reads, chunks and stores one replica file, checking it against its entry.
    fn read(
        &mut self,
        rel: &RelPath,
        e: &Entry,
        hash: [u8; 32],
    ) -> Result<Vec<ChunkId>, HistoryError> {
        let (file, path) = self.open(rel)?;
        let mut ids = Vec::new();
        // The chunker is lent out of `self` while its chunks are stored through `self`.
        let mut chunker = std::mem::take(&mut self.chunker);
        let whole = chunker.chunks(&file, |c: Chunk<'_>| {
            ids.push(c.id);
            self.store_chunk(c).map_err(ReadError::Store)
        });
        self.chunker = chunker;
        let whole = whole.map_err(|err| err.at(&path))?;
        self.files_read += 1;
        self.bytes_read += whole.len;
        if whole.blake3 != hash || whole.len != e.size {
            return Err(HistoryError::Moved { path: rel.clone() });
        }
        Ok(ids)
    }

    /// Opens a replica file (a regular file, every component without following symlinks).
    fn open(&self, rel: &RelPath) -> Result<(std::fs::File, PathBuf), HistoryError> {
        let path = rel.to_path(&self.replica_dir);
        let open = self
            .replica
            .open_parent(rel)
            .and_then(|(dir, name)| fsx::openat_file(dir.as_fd(), name));
        let file = match open {
            Ok(f) => f,
            Err(err) if moved(&err) => return Err(HistoryError::Moved { path: rel.clone() }),
            Err(err) => return Err(HistoryError::io("opening replica file", path)(err)),
        };
        let meta = file
            .metadata()
            .map_err(HistoryError::io("reading replica file", &path))?;
        if !meta.file_type().is_file() {
            return Err(HistoryError::Moved { path: rel.clone() });
        }
        Ok((file, path))
    }

    fn store_chunk(&mut self, c: Chunk<'_>) -> Result<(), HistoryError> {
        if self.have(&c.id) {
            return Ok(());
        }
        if self.pack.is_none() {
            self.pack = Some(PackWriter::create(&self.store.tmp_dir())?);
        }
        let pack = self.pack.as_mut().expect("just created");
        let t = Instant::now();
        pack.add(c.id, c.data)?;
        self.phases.pack += t.elapsed();
        self.fresh.insert(c.id);
        if pack.len() >= PACK_TARGET {
            self.seal()?;
        }
        Ok(())
    }

    /// Seals and installs the pack being filled, if any.
    fn seal(&mut self) -> Result<(), HistoryError> {
        let Some(pack) = self.pack.take().filter(|p| !p.is_empty()) else {
            return Ok(());
        };
        let t = Instant::now();
        let sealed = pack.seal()?;
        sealed.install(&self.store.packs_dir())?;
        self.phases.seal += t.elapsed();
        self.new_bytes += sealed.size;
        self.installed.push((
            sealed.id,
            PackMeta {
                size: sealed.size,
                chunks: sealed.chunks,
            },
        ));
        Ok(())
    }
}

/// The buffers of walking runs of entries one by one.
#[derive(Default)]
struct RunWalk {
    /// A run's digest is over its entries' bytes as the manifest root hashes them.
    bytes: Vec<u8>,
}

impl RunWalk {
    /// Walks the next run of `entries`: where it ends and its chunks (None: no entries left).
    fn next<'m>(
        &mut self,
        run: &mut Run<'_>,
        entries: impl Iterator<Item = (&'m RelPath, &'m Entry)>,
        known: &Known,
        prev: &Runs,
        w: &mut Walked,
    ) -> Result<Option<(RunEnd, Vec<ChunkId>)>, HistoryError> {
        let mut paths: Vec<(&RelPath, &Entry)> = Vec::new();
        let (mut files, mut bytes) = (0, 0);
        self.bytes.clear();
        let mut entries = entries.peekable();
        while let Some((rel, e)) = entries.next() {
            entry_bytes(&mut self.bytes, rel, e);
            paths.push((rel, e));
            w.walked += 1;
            if kind_of(e) == Some(Kind::File) {
                (files, bytes) = (files + 1, bytes + e.size);
            }
            let cut = if paths.len() >= RUN_MAX {
                Cut::Full
            } else if ends_run(rel) {
                Cut::Path
            } else if entries.peek().is_none() {
                Cut::End
            } else {
                continue;
            };
            let digest = *blake3::hash(&self.bytes).as_bytes();
            let ids = run.run(&paths, digest, known, prev, w)?;
            let end = RunEnd {
                last: rel.clone(),
                cut,
                digest,
                files,
                bytes,
            };
            return Ok(Some((end, ids)));
        }
        Ok(None)
    }
}

/// What walking a manifest gave.
#[derive(Default)]
struct Walked {
    /// The snapshot's body chunks, in order.
    body: Vec<ChunkId>,
    /// Its regular files, and their bytes.
    files: u64,
    bytes: u64,
    /// Runs encoded anew.
    encoded: u64,
    /// Entries walked.
    walked: u64,
    /// Its runs, for the next record.
    runs: Runs,
    /// Files read anew, by content.
    learned: Vec<([u8; 32], Vec<ChunkId>)>,
}

impl Walked {
    /// A run walked or taken as it was.
    fn add(&mut self, end: RunEnd, ids: &[ChunkId]) {
        self.body.extend_from_slice(ids);
        (self.files, self.bytes) = (self.files + end.files, self.bytes + end.bytes);
        self.runs.by_digest.insert(end.digest, ids.to_vec());
        self.runs.order.push(end);
    }
}

/// A file's base content as the store holds it, and the ranges changed since.
struct Based {
    old: Vec<(ChunkId, u64)>,
    ranges: Vec<(u64, u64)>,
}

/// What can stop the chunking of one file: reading it, or storing its chunks.
enum ReadError {
    Read(io::Error),
    Store(HistoryError),
}

impl ReadError {
    /// The error of a record that was reading the replica file at `path`.
    fn at(self, path: &Path) -> HistoryError {
        match self {
            ReadError::Read(e) => HistoryError::io("reading replica file", path)(e),
            ReadError::Store(e) => e,
        }
    }
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> ReadError {
        ReadError::Read(e)
    }
}
