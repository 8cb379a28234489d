//! The snapshot format: one immutable file per snapshot, holding everything a restore needs
//! besides the chunks.
//!
//! ```text
//! "SBYS" | version u16 LE | 0u16 | summary length u32 LE | SnapshotSummary | zstd(SnapshotBody)
//! ```
//! The summary comes first and uncompressed so that listing a store reads a few hundred bytes
//! per snapshot. The id is the first 8 bytes of the blake3 of the whole file: loading a snapshot
//! checks the file against its name, which is its checksum.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use prost::Message;

use crate::disk::crashsafe::fsync_dir;
use crate::history::HistoryError;
use crate::history::id::{ChunkId, SnapshotId};
use crate::proto::Entry;
use crate::proto::history::{SnapshotBody, SnapshotPath, SnapshotSummary};
use crate::replication::manifest::{Kind, kind_of};
use crate::types::{Generation, RelPath};

const MAGIC: [u8; 4] = *b"SBYS";
const VERSION: u16 = 1;
const HEADER: usize = 12;
const MAX_SUMMARY: usize = 64 << 10;
/// A body larger than this once decompressed is refused (about 10 million paths).
const MAX_BODY: u64 = 2 << 30;
const LEVEL: i32 = 3;

/// What `list` shows of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    /// When the generation was recorded, unix milliseconds.
    pub time_ms: u64,
    pub generation: Generation,
    /// The manifest root it was taken from.
    pub root: [u8; 32],
    /// Regular files and their total size.
    pub files: u64,
    pub bytes: u64,
    /// Bytes of packs its recording wrote.
    pub new_bytes: u64,
    /// Paths of every kind.
    pub entries: u64,
}

/// One path of a snapshot; files list their chunks in order.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapPath {
    pub path: RelPath,
    pub entry: Entry,
    pub chunks: Vec<ChunkId>,
}

/// A whole snapshot's paths, validated.
pub struct Snapshot {
    pub paths: Vec<SnapPath>,
}

impl Snapshot {
    /// The path's index, by binary search (paths are sorted).
    pub fn position(&self, p: &RelPath) -> Option<usize> {
        self.paths.binary_search_by(|x| x.path.cmp(p)).ok()
    }

    /// `p` itself and everything below it (everything when `p` is `None`), in path order.
    pub fn under<'a>(&'a self, p: Option<&'a RelPath>) -> impl Iterator<Item = &'a SnapPath> {
        let start = match p {
            Some(p) => self.paths.partition_point(|x| x.path < *p),
            None => 0,
        };
        // Paths between `p` and its subtree (`p-x` sorts before `p/`) are skipped, not an end.
        let end = p.map(|p| p.subtree_range().1);
        self.paths[start..]
            .iter()
            .take_while(move |x| end.as_ref().is_none_or(|end| x.path < *end))
            .filter(move |x| p.is_none_or(|p| x.path.starts_with(p)))
    }
}

/// The file bytes of a snapshot.
pub fn encode(summary: &SnapshotSummary, paths: &[SnapPath]) -> Result<Vec<u8>, std::io::Error> {
    let body = SnapshotBody {
        paths: paths
            .iter()
            .map(|p| SnapshotPath {
                path: p.path.as_bytes().to_vec(),
                entry: Some(p.entry.clone()),
                chunks: p.chunks.concat(),
            })
            .collect(),
    };
    let summary = summary.encode_to_vec();
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(summary.len() as u32).to_le_bytes());
    out.extend_from_slice(&summary);
    let mut z = zstd::stream::write::Encoder::new(out, LEVEL)?;
    z.write_all(&body.encode_to_vec())?;
    z.finish()
}

/// Writes snapshot file bytes durably (temp file, fsync, rename, fsync the directory).
pub fn write(bytes: &[u8], tmp: &Path, snapshots: &Path) -> Result<SnapshotId, HistoryError> {
    let id = SnapshotId::of(bytes);
    let t = tmp.join(format!("{}.tmp", id.file_name()));
    let to = snapshots.join(id.file_name());
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&t)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(HistoryError::io("writing", &t))?;
    std::fs::rename(&t, &to).map_err(HistoryError::io("installing", &to))?;
    fsync_dir(snapshots).map_err(HistoryError::io("syncing", snapshots))?;
    Ok(id)
}

fn bad(path: &Path, reason: impl Into<String>) -> HistoryError {
    HistoryError::BadSnapshot {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Reads only the header and summary of a snapshot file.
pub fn read_info(path: &Path, id: SnapshotId) -> Result<SnapshotInfo, HistoryError> {
    let mut f = File::open(path).map_err(HistoryError::io("opening", path))?;
    let mut header = [0u8; HEADER];
    f.read_exact(&mut header)
        .map_err(|e| bad(path, format!("no header: {e}")))?;
    let len = check_header(path, &header)?;
    let mut summary = vec![0u8; len];
    f.read_exact(&mut summary)
        .map_err(|e| bad(path, format!("truncated summary: {e}")))?;
    info_of(path, id, &summary)
}

fn check_header(path: &Path, header: &[u8]) -> Result<usize, HistoryError> {
    if header[..4] != MAGIC {
        return Err(bad(path, "not a snapshot (bad magic)"));
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != VERSION {
        return Err(bad(
            path,
            format!("unsupported snapshot format version {version}"),
        ));
    }
    let len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
    if len > MAX_SUMMARY {
        return Err(bad(path, format!("summary length {len} out of bounds")));
    }
    Ok(len)
}

fn info_of(path: &Path, id: SnapshotId, summary: &[u8]) -> Result<SnapshotInfo, HistoryError> {
    let s = SnapshotSummary::decode(summary)
        .map_err(|e| bad(path, format!("summary does not decode: {e}")))?;
    let root = s.root[..]
        .try_into()
        .map_err(|_| bad(path, format!("a root of {} bytes", s.root.len())))?;
    Ok(SnapshotInfo {
        id,
        time_ms: s.time_ms,
        generation: Generation(s.generation),
        root,
        files: s.files,
        bytes: s.bytes,
        new_bytes: s.new_bytes,
        entries: s.entries,
    })
}

/// Reads a whole snapshot file and validates it: its hash must match its id, every path must
/// be valid and in strictly increasing order, every entry of a known kind.
pub fn load(path: &Path, id: SnapshotId) -> Result<Snapshot, HistoryError> {
    let bytes = std::fs::read(path).map_err(HistoryError::io("reading", path))?;
    if SnapshotId::of(&bytes) != id {
        return Err(bad(
            path,
            "content does not match its name (damaged or torn)",
        ));
    }
    if bytes.len() < HEADER {
        return Err(bad(path, "no header"));
    }
    let len = check_header(path, &bytes[..HEADER])?;
    let summary = bytes
        .get(HEADER..HEADER + len)
        .ok_or_else(|| bad(path, "truncated summary"))?;
    info_of(path, id, summary)?;
    let mut body = Vec::new();
    zstd::stream::read::Decoder::new(&bytes[HEADER + len..])
        .and_then(|d| d.take(MAX_BODY + 1).read_to_end(&mut body))
        .map_err(|e| bad(path, format!("body does not decompress: {e}")))?;
    if body.len() as u64 > MAX_BODY {
        return Err(bad(path, "body too large"));
    }
    let body = SnapshotBody::decode(&body[..])
        .map_err(|e| bad(path, format!("body does not decode: {e}")))?;
    let paths = validate(path, body)?;
    Ok(Snapshot { paths })
}

fn validate(file: &Path, body: SnapshotBody) -> Result<Vec<SnapPath>, HistoryError> {
    let mut out: Vec<SnapPath> = Vec::with_capacity(body.paths.len());
    for p in body.paths {
        let path = RelPath::new(p.path.to_vec()).map_err(|e| {
            bad(
                file,
                format!("path {:?}: {e}", String::from_utf8_lossy(&p.path)),
            )
        })?;
        if out.last().is_some_and(|last| last.path >= path) {
            return Err(bad(file, format!("path {path} out of order")));
        }
        let entry = p
            .entry
            .ok_or_else(|| bad(file, format!("{path} has no entry")))?;
        let kind = kind_of(&entry).ok_or_else(|| bad(file, format!("{path} has no valid kind")))?;
        let well_formed = match kind {
            Kind::File => entry.blake3.len() == 32 && p.chunks.len() % 32 == 0,
            Kind::Dir | Kind::Symlink => p.chunks.is_empty(),
        };
        if !well_formed {
            return Err(bad(file, format!("{path}: malformed entry")));
        }
        let chunks = p
            .chunks
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect();
        out.push(SnapPath {
            path,
            entry,
            chunks,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::manifest::tests::{dir, file};

    fn summary() -> SnapshotSummary {
        SnapshotSummary {
            time_ms: 1_700_000_000_000,
            generation: 7,
            root: vec![9; 32],
            files: 1,
            bytes: 3,
            new_bytes: 100,
            entries: 2,
        }
    }

    fn paths() -> Vec<SnapPath> {
        vec![
            SnapPath {
                path: RelPath::new("d").unwrap(),
                entry: dir(),
                chunks: vec![],
            },
            SnapPath {
                path: RelPath::new("d/f").unwrap(),
                entry: file(3, 5, 1),
                chunks: vec![[1; 32], [2; 32]],
            },
        ]
    }

    #[test]
    fn round_trip_and_damage_detected() {
        let d = tempfile::tempdir().unwrap();
        let bytes = encode(&summary(), &paths()).unwrap();
        let id = write(&bytes, d.path(), d.path()).unwrap();
        let path = d.path().join(id.file_name());
        let info = read_info(&path, id).unwrap();
        assert_eq!((info.generation, info.new_bytes), (Generation(7), 100));
        let s = load(&path, id).unwrap();
        assert_eq!(s.paths, paths());

        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let e = load(&path, id).err().unwrap().to_string();
        assert!(
            e.contains("does not match its name") && e.contains(&id.to_string()),
            "{e}"
        );
    }

    #[test]
    fn escaping_or_unordered_paths_are_refused() {
        let d = tempfile::tempdir().unwrap();
        for (bad_path, expect) in [
            (b"../evil".to_vec(), "'..'"),
            (b"/etc/x".to_vec(), "absolute"),
        ] {
            let body = SnapshotBody {
                paths: vec![SnapshotPath {
                    path: bad_path,
                    entry: Some(dir()),
                    chunks: Default::default(),
                }],
            };
            let e = validate(d.path(), body).err().unwrap().to_string();
            assert!(e.contains(expect), "{e}");
        }
        let mut ps = paths();
        ps.reverse();
        let bytes = encode(&summary(), &ps).unwrap();
        let id = write(&bytes, d.path(), d.path()).unwrap();
        let e = load(&d.path().join(id.file_name()), id)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("out of order"), "{e}");
    }

    #[test]
    fn under_selects_a_subtree() {
        let mut ps = paths();
        for p in ["d-x", "d/g", "e"] {
            ps.push(SnapPath {
                path: RelPath::new(p).unwrap(),
                entry: dir(),
                chunks: vec![],
            });
        }
        ps.sort_by(|a, b| a.path.cmp(&b.path));
        let s = Snapshot { paths: ps };
        let d = RelPath::new("d").unwrap();
        let names: Vec<String> = s.under(Some(&d)).map(|p| p.path.to_string()).collect();
        assert_eq!(names, ["d", "d/f", "d/g"]);
        assert_eq!(s.under(None).count(), 5);
    }
}
