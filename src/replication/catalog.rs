//! A durable [`Manifest`]: a snapshot file plus an append-only log of generations.
//!
//! `<name>.snap` holds the manifest as of some generation; `<name>.log` holds the records of
//! later generations, each framed and checksummed, each followed by an `applied` marker once the
//! receiver has carried it out. Appending a record and fsyncing it is the commit point of a
//! generation: at start-up the last record without its marker is returned so the caller can roll
//! it forward before serving anything. A torn record at the end of the log (a crash during the
//! append) is cut off: that generation never committed. This type is the only writer of both
//! files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::disk::crashsafe::{self, FrameError, frame, kind, read_frame};
use crate::proto::state::{Record, SnapshotHeader, SnapshotItem, SnapshotItems};
use crate::replication::manifest::Manifest;
use crate::types::{Generation, RelPath};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Frame {
        path: PathBuf,
        #[source]
        source: FrameError,
    },
    #[error("{path}: undecodable record: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
    #[error(
        "{path}: corrupt record at offset {offset} with valid data after it; refusing to guess"
    )]
    Corrupt { path: PathBuf, offset: u64 },
    #[error("{path}: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: crate::replication::manifest::ManifestError,
    },
    #[error("{path}: generations out of order ({found} after {last})")]
    Order {
        path: PathBuf,
        last: u64,
        found: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CatalogError + '_ {
    move |source| CatalogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Compact the log into a new snapshot once it is this much larger than the snapshot.
const COMPACT_MIN_LOG: u64 = 8 << 20;

pub struct Catalog {
    snap_path: PathBuf,
    log_path: PathBuf,
    log: File,
    log_len: u64,
    snap_len: u64,
}

/// What [`Catalog::peek`] found.
pub struct Peeked {
    pub manifest: Manifest,
    /// The last committed record, when its `applied` marker is not (yet) in the log.
    pub unapplied: Option<Record>,
    /// The last record in the log, applied or not (none once the log was compacted).
    pub last: Option<Record>,
}

/// What [`Catalog::open`] found.
pub struct Loaded {
    pub catalog: Catalog,
    pub manifest: Manifest,
    /// The last committed record, when its `applied` marker is missing: roll it forward.
    pub unapplied: Option<Record>,
}

impl Catalog {
    pub fn open(dir: &Path, name: &str) -> Result<Loaded, CatalogError> {
        let snap_path = dir.join(format!("{name}.snap"));
        let log_path = dir.join(format!("{name}.log"));
        let (manifest, snap_len) = read_snapshot(&snap_path)?;
        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        let mut replay = Replay {
            path: &log_path,
            manifest,
            last: None,
            last_applied: true,
            cut_torn: true,
        };
        replay.run(&mut log)?;
        let (manifest, unapplied) = replay.finish();
        let log_len = log.seek(SeekFrom::End(0)).map_err(io_err(&log_path))?;
        Ok(Loaded {
            catalog: Catalog {
                snap_path,
                log_path,
                log,
                log_len,
                snap_len,
            },
            manifest,
            unapplied,
        })
    }

    /// Reads the manifest as of the last committed generation without writing anything: a torn
    /// record at the end of the log is skipped, not cut off (that is for the owner, at its next
    /// start). For inspecting the state directory of a running receiver, which goes on owning
    /// the files (the history benchmark reads what the standby committed this way).
    pub fn peek(dir: &Path, name: &str) -> Result<Peeked, CatalogError> {
        let snap_path = dir.join(format!("{name}.snap"));
        let log_path = dir.join(format!("{name}.log"));
        let (manifest, _) = read_snapshot(&snap_path)?;
        let mut replay = Replay {
            path: &log_path,
            manifest,
            last: None,
            last_applied: true,
            cut_torn: false,
        };
        match File::open(&log_path) {
            Ok(mut log) => replay.run(&mut log)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&log_path)(e)),
        }
        let last = replay.last.clone();
        let (manifest, unapplied) = replay.finish();
        Ok(Peeked {
            manifest,
            unapplied,
            last,
        })
    }

    /// Appends a generation's record and makes it durable: the commit point.
    pub fn append(&mut self, rec: &Record) -> Result<(), CatalogError> {
        let bytes = frame(kind::RECORD, &rec.encode_to_vec());
        self.log.write_all(&bytes).map_err(io_err(&self.log_path))?;
        self.log.sync_data().map_err(io_err(&self.log_path))?;
        self.log_len += bytes.len() as u64;
        Ok(())
    }

    /// Appends a record already carried out (a sender's), with its marker, durably.
    pub fn append_applied(&mut self, rec: &Record) -> Result<(), CatalogError> {
        let mut bytes = frame(kind::RECORD, &rec.encode_to_vec());
        let marker = Record {
            generation: rec.generation,
            applied: true,
            ..Default::default()
        };
        bytes.extend(frame(kind::RECORD, &marker.encode_to_vec()));
        self.log.write_all(&bytes).map_err(io_err(&self.log_path))?;
        self.log.sync_data().map_err(io_err(&self.log_path))?;
        self.log_len += bytes.len() as u64;
        Ok(())
    }

    /// Appends the marker saying `generation` has been carried out. Not fsynced: it must not
    /// become durable before the changes it vouches for, and it is only an optimisation until
    /// the workspace is handed to an application (see [`Catalog::sync`]).
    pub fn mark_applied(&mut self, generation: Generation) -> Result<(), CatalogError> {
        let rec = Record {
            generation: generation.0,
            applied: true,
            ..Default::default()
        };
        let bytes = frame(kind::RECORD, &rec.encode_to_vec());
        self.log.write_all(&bytes).map_err(io_err(&self.log_path))?;
        self.log_len += bytes.len() as u64;
        Ok(())
    }

    /// Makes everything appended durable.
    pub fn sync(&mut self) -> Result<(), CatalogError> {
        self.log.sync_data().map_err(io_err(&self.log_path))
    }

    /// Rewrites the snapshot and empties the log when the log has grown large. Only call it with
    /// every record applied.
    pub fn maybe_compact(&mut self, m: &Manifest) -> Result<(), CatalogError> {
        if self.log_len < COMPACT_MIN_LOG.max(self.snap_len) {
            return Ok(());
        }
        self.compact(m)
    }

    pub fn compact(&mut self, m: &Manifest) -> Result<(), CatalogError> {
        self.snap_len = write_snapshot(&self.snap_path, m)?;
        // The snapshot now covers every record: an empty log replaces the old one atomically.
        crashsafe::write_atomic(&self.log_path, &[]).map_err(io_err(&self.log_path))?;
        self.log = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io_err(&self.log_path))?;
        self.log_len = 0;
        Ok(())
    }

    /// Replaces the whole catalog with `m` (used when a sender adopts a receiver's manifest).
    pub fn reset(&mut self, m: &Manifest) -> Result<(), CatalogError> {
        self.compact(m)
    }
}

/// Replaying the log over the snapshot's manifest, at start-up.
struct Replay<'p> {
    path: &'p Path,
    manifest: Manifest,
    /// The last record folded in, and whether its `applied` marker followed.
    last: Option<Record>,
    last_applied: bool,
    /// Whether a torn tail is cut off the file (the owner) or only left unread (a peek).
    cut_torn: bool,
}

impl Replay<'_> {
    /// Folds in every record of the log; cuts off a torn tail, refuses anything else damaged.
    fn run(&mut self, log: &mut File) -> Result<(), CatalogError> {
        let file_len = log.metadata().map_err(io_err(self.path))?.len();
        let mut reader = BufReader::new(&mut *log);
        let mut offset = 0u64;
        loop {
            match read_frame(&mut reader, kind::RECORD) {
                Ok(None) => return Ok(()),
                Ok(Some(payload)) => {
                    self.fold(&payload)?;
                    offset += payload.len() as u64 + 48;
                }
                Err(FrameError::Truncated) | Err(FrameError::Checksum) | Err(FrameError::Magic)
                    if tail_is_torn(self.path, offset, file_len) =>
                {
                    if !self.cut_torn {
                        return Ok(());
                    }
                    tracing::warn!(
                        path = %self.path.display(),
                        offset,
                        "cutting off a torn record at the end of the log (a commit that never completed)"
                    );
                    drop(reader);
                    log.set_len(offset).map_err(io_err(self.path))?;
                    log.sync_all().map_err(io_err(self.path))?;
                    return Ok(());
                }
                Err(FrameError::Io(source)) => {
                    return Err(CatalogError::Io {
                        path: self.path.to_path_buf(),
                        source,
                    });
                }
                Err(_) => {
                    return Err(CatalogError::Corrupt {
                        path: self.path.to_path_buf(),
                        offset,
                    });
                }
            }
        }
    }

    /// One record: a generation to fold into the manifest, or the marker of the last one.
    fn fold(&mut self, payload: &[u8]) -> Result<(), CatalogError> {
        let rec = Record::decode(payload).map_err(|source| CatalogError::Decode {
            path: self.path.to_path_buf(),
            source,
        })?;
        if rec.generation <= self.manifest.generation.0 && !rec.applied {
            // Already folded into the snapshot by a compaction.
            return Ok(());
        }
        if rec.applied {
            if self
                .last
                .as_ref()
                .is_some_and(|l| l.generation == rec.generation)
            {
                self.last_applied = true;
            }
            return Ok(());
        }
        if !follows(&rec, self.manifest.generation) {
            return Err(CatalogError::Order {
                path: self.path.to_path_buf(),
                last: self.manifest.generation.0,
                found: rec.generation,
            });
        }
        self.manifest
            .apply(&rec.changes)
            .map_err(|source| CatalogError::Manifest {
                path: self.path.to_path_buf(),
                source,
            })?;
        self.manifest.generation = Generation(rec.generation);
        self.last = Some(rec);
        self.last_applied = false;
        Ok(())
    }

    /// The manifest, and the last record if its marker is missing.
    fn finish(self) -> (Manifest, Option<Record>) {
        let unapplied = if self.last_applied { None } else { self.last };
        (self.manifest, unapplied)
    }
}

/// Whether `rec` may come right after `last`: it names `last` as the generation it follows
/// (records without `previous`, from before generations were pair-wide, follow
/// `generation - 1`), and it is newer. A gap with no record naming it is out of order.
pub(crate) fn follows(rec: &Record, last: Generation) -> bool {
    let previous = rec.previous.unwrap_or(rec.generation.wrapping_sub(1));
    previous == last.0 && rec.generation > last.0
}

/// Whether a bad frame at `offset` is a torn append: the last frame of the file, whose claimed
/// extent reaches the end of the file, or a zero-filled tail (blocks allocated but never written
/// before a crash). Anything else is corruption in the middle of committed history.
fn tail_is_torn(path: &Path, offset: u64, file_len: u64) -> bool {
    use std::io::Read;
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    if f.seek(SeekFrom::Start(offset)).is_err() {
        return false;
    }
    let mut rest = Vec::new();
    if f.take(crashsafe::MAX_RECORD as u64 + 64)
        .read_to_end(&mut rest)
        .is_err()
    {
        return false;
    }
    if rest.iter().all(|b| *b == 0) {
        return true;
    }
    if rest.len() < 16 || rest[..4] != crashsafe::MAGIC {
        return rest.len() < 16 && crashsafe::MAGIC.starts_with(&rest[..rest.len().min(4)]);
    }
    let claimed = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
    offset + 16 + claimed + 32 >= file_len
}

fn read_snapshot(path: &Path) -> Result<(Manifest, u64), CatalogError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Manifest::new(), 0)),
        Err(e) => return Err(io_err(path)(e)),
    };
    let len = f.metadata().map_err(io_err(path))?.len();
    let mut r = BufReader::new(f);
    let frame_err = |source| CatalogError::Frame {
        path: path.to_path_buf(),
        source,
    };
    let decode_err = |source| CatalogError::Decode {
        path: path.to_path_buf(),
        source,
    };
    let header = read_frame(&mut r, kind::SNAPSHOT_HEADER)
        .map_err(frame_err)?
        .ok_or_else(|| frame_err(FrameError::Truncated))?;
    let header = SnapshotHeader::decode(&header[..]).map_err(decode_err)?;
    let mut m = Manifest::new();
    m.generation = Generation(header.generation);
    while (m.len() as u64) < header.entries {
        let items = read_frame(&mut r, kind::SNAPSHOT_ITEMS)
            .map_err(frame_err)?
            .ok_or_else(|| frame_err(FrameError::Truncated))?;
        let items = SnapshotItems::decode(&items[..]).map_err(decode_err)?;
        for it in items.items {
            let p = RelPath::new(it.path.to_vec()).map_err(|e| CatalogError::Manifest {
                path: path.to_path_buf(),
                source: e.into(),
            })?;
            m.insert(p, it.entry.unwrap_or_default());
        }
    }
    m.make_dense();
    if m.root()[..] != header.root[..] {
        return Err(frame_err(FrameError::Checksum));
    }
    Ok((m, len))
}

fn write_snapshot(path: &Path, m: &Manifest) -> Result<u64, CatalogError> {
    let tmp = path.with_extension("snap.tmp");
    let mut w = BufWriter::new(File::create(&tmp).map_err(io_err(&tmp))?);
    let header = SnapshotHeader {
        generation: m.generation.0,
        root: m.root().to_vec(),
        entries: m.len() as u64,
    };
    let mut written = 0u64;
    let mut put = |w: &mut BufWriter<File>, k, bytes: &[u8]| -> Result<(), CatalogError> {
        let f = frame(k, bytes);
        written += f.len() as u64;
        w.write_all(&f).map_err(io_err(&tmp))
    };
    put(&mut w, kind::SNAPSHOT_HEADER, &header.encode_to_vec())?;
    let mut batch = SnapshotItems::default();
    for (p, e) in m.iter() {
        batch.items.push(SnapshotItem {
            path: p.as_bytes().to_vec(),
            entry: Some(e.clone()),
        });
        if batch.items.len() == 4096 {
            put(&mut w, kind::SNAPSHOT_ITEMS, &batch.encode_to_vec())?;
            batch.items.clear();
        }
    }
    if !batch.items.is_empty() {
        put(&mut w, kind::SNAPSHOT_ITEMS, &batch.encode_to_vec())?;
    }
    let f = w.into_inner().map_err(|e| io_err(&tmp)(e.into_error()))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    crashsafe::fsync_dir(path.parent().unwrap_or(Path::new("."))).map_err(io_err(path))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::state::Change;
    use crate::replication::manifest::tests::{dir, file};

    fn rec(g: u64, changes: Vec<(&str, Option<crate::proto::Entry>)>) -> Record {
        Record {
            generation: g,
            changes: changes
                .into_iter()
                .map(|(p, e)| Change {
                    path: p.as_bytes().to_vec(),
                    entry: e,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn log_replay_and_unapplied_record() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut l = Catalog::open(d.path(), "m").unwrap();
            assert!(l.manifest.is_empty());
            l.catalog
                .append(&rec(
                    1,
                    vec![("a", Some(dir())), ("a/f", Some(file(1, 1, 1)))],
                ))
                .unwrap();
            l.catalog.mark_applied(Generation(1)).unwrap();
            l.catalog.append(&rec(2, vec![("a/f", None)])).unwrap();
        }
        let l = Catalog::open(d.path(), "m").unwrap();
        assert_eq!(l.manifest.generation, Generation(2));
        assert_eq!(l.manifest.len(), 1);
        assert_eq!(l.unapplied.unwrap().generation, 2);
    }

    #[test]
    fn torn_tail_is_cut_off() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut l = Catalog::open(d.path(), "m").unwrap();
            l.catalog.append(&rec(1, vec![("a", Some(dir()))])).unwrap();
            l.catalog.mark_applied(Generation(1)).unwrap();
        }
        let log = d.path().join("m.log");
        let good = fs::metadata(&log).unwrap().len();
        let torn = frame(
            kind::RECORD,
            &rec(2, vec![("b", Some(dir()))]).encode_to_vec(),
        );
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&torn[..torn.len() - 5]).unwrap();
        drop(f);
        let l = Catalog::open(d.path(), "m").unwrap();
        assert_eq!(l.manifest.generation, Generation(1));
        assert!(l.unapplied.is_none());
        assert_eq!(fs::metadata(&log).unwrap().len(), good);
    }

    #[test]
    fn peek_reads_committed_state_and_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        assert!(Catalog::peek(d.path(), "m").unwrap().manifest.is_empty());
        assert!(!d.path().join("m.log").exists(), "a peek creates no log");
        {
            let mut l = Catalog::open(d.path(), "m").unwrap();
            l.catalog.append(&rec(1, vec![("a", Some(dir()))])).unwrap();
            l.catalog.mark_applied(Generation(1)).unwrap();
            l.catalog.append(&rec(2, vec![("b", Some(dir()))])).unwrap();
        }
        let p = Catalog::peek(d.path(), "m").unwrap();
        assert_eq!(p.manifest.generation, Generation(2));
        assert_eq!(p.unapplied.unwrap().generation, 2);
        // A torn append after it: skipped, and left in the file for the owner to cut off.
        let log = d.path().join("m.log");
        let torn = frame(
            kind::RECORD,
            &rec(3, vec![("c", Some(dir()))]).encode_to_vec(),
        );
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&torn[..torn.len() - 5]).unwrap();
        drop(f);
        let torn_len = fs::metadata(&log).unwrap().len();
        let p = Catalog::peek(d.path(), "m").unwrap();
        assert_eq!(p.manifest.generation, Generation(2));
        assert_eq!(p.manifest.len(), 2);
        assert_eq!(fs::metadata(&log).unwrap().len(), torn_len);
        // The owner still opens it, and cuts the torn record off.
        let l = Catalog::open(d.path(), "m").unwrap();
        assert_eq!(l.manifest.generation, Generation(2));
        assert!(fs::metadata(&log).unwrap().len() < torn_len);
    }

    #[test]
    fn compaction_keeps_state() {
        let d = tempfile::tempdir().unwrap();
        let root;
        {
            let mut l = Catalog::open(d.path(), "m").unwrap();
            let mut m = l.manifest;
            for g in 1..=5u64 {
                let r = rec(
                    g,
                    vec![(
                        ["a", "b", "c", "d", "e"][g as usize - 1],
                        Some(file(g, 1, 1)),
                    )],
                );
                l.catalog.append(&r).unwrap();
                m.apply(&r.changes).unwrap();
                m.generation = Generation(g);
                l.catalog.mark_applied(Generation(g)).unwrap();
            }
            l.catalog.compact(&m).unwrap();
            let r = rec(6, vec![("a", None)]);
            l.catalog.append(&r).unwrap();
            m.apply(&r.changes).unwrap();
            root = m.root();
        }
        let l = Catalog::open(d.path(), "m").unwrap();
        assert_eq!(l.manifest.generation, Generation(6));
        assert_eq!(l.manifest.root(), root);
        assert_eq!(l.manifest.len(), 4);
    }

    /// A receiver that joined the pair's numbering: its first record follows generation 0 but
    /// carries the pair's next number (ARCHITECTURE.md, "Generations"). Replayed as such; a
    /// gap no record names, a record naming another predecessor, or an older number is not.
    #[test]
    fn a_record_that_names_its_predecessor_may_jump_ahead() {
        let d = tempfile::tempdir().unwrap();
        let with_previous = |g, previous, path| Record {
            previous: Some(previous),
            ..rec(g, vec![(path, Some(dir()))])
        };
        {
            let mut l = Catalog::open(d.path(), "m").unwrap();
            l.catalog.append(&with_previous(41, 0, "a")).unwrap();
            l.catalog.mark_applied(Generation(41)).unwrap();
            l.catalog.append(&with_previous(42, 41, "b")).unwrap();
        }
        let l = Catalog::open(d.path(), "m").unwrap();
        assert_eq!(l.manifest.generation, Generation(42));
        assert_eq!(l.manifest.len(), 2);
        assert_eq!(l.unapplied.unwrap().generation, 42);

        let at = |g| Generation(g);
        assert!(
            follows(&rec(8, vec![]), at(7)),
            "an old record: generation - 1"
        );
        assert!(!follows(&rec(9, vec![]), at(7)), "a gap no record names");
        assert!(follows(&with_previous(9, 7, "x"), at(7)));
        assert!(
            !follows(&with_previous(9, 6, "x"), at(7)),
            "another predecessor"
        );
        assert!(!follows(&with_previous(7, 7, "x"), at(7)), "not newer");
        assert!(!follows(&with_previous(3, 7, "x"), at(7)), "older");

        let e = tempfile::tempdir().unwrap();
        {
            let mut l = Catalog::open(e.path(), "m").unwrap();
            l.catalog.append(&rec(1, vec![("a", Some(dir()))])).unwrap();
            l.catalog.append(&with_previous(5, 2, "b")).unwrap();
        }
        assert!(matches!(
            Catalog::open(e.path(), "m"),
            Err(CatalogError::Order {
                last: 1,
                found: 5,
                ..
            })
        ));
    }

    #[test]
    fn corrupt_middle_is_refused() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut l = Catalog::open(d.path(), "m").unwrap();
            l.catalog.append(&rec(1, vec![("a", Some(dir()))])).unwrap();
            l.catalog.append(&rec(2, vec![("b", Some(dir()))])).unwrap();
        }
        let log = d.path().join("m.log");
        let mut bytes = fs::read(&log).unwrap();
        // Damage the first record: a valid one follows, so this cannot be a torn append.
        bytes[20] ^= 0xff;
        fs::write(&log, &bytes).unwrap();
        assert!(matches!(
            Catalog::open(d.path(), "m"),
            Err(CatalogError::Corrupt { .. })
        ));
    }
}
