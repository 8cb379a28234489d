//! The snapshot format: one immutable file per snapshot, holding everything a restore needs
//! besides the chunks.
//!
//! ```text
//! version 2: "SBYS" | 2u16 LE | 0u16 | summary length u32 LE | SnapshotSummary | body chunk ids
//! version 1: "SBYS" | 1u16 LE | 0u16 | summary length u32 LE | SnapshotSummary | zstd(SnapshotBody)
//! ```
//! The summary comes first and uncompressed so that listing a store reads a few hundred bytes
//! per snapshot. The id is the first 8 bytes of the blake3 of the whole file: loading a snapshot
//! checks the file against its name, which is its checksum.
//!
//! Version 2 (written now) keeps the body in the packs: the `SnapshotBody` bytes are the
//! concatenation of chunks (32-byte ids, in order, after the summary), each an encoded
//! `SnapshotBody` of a run of paths, so a generation that changed a few paths stores only the
//! chunks of the runs around them (ARCHITECTURE.md, "History"). Version 1 files (the body
//! inside) are still read.

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
/// The version written; [`VERSION_INLINE`] is still read.
const VERSION: u16 = 2;
const VERSION_INLINE: u16 = 1;
const HEADER: usize = 12;
const MAX_SUMMARY: usize = 64 << 10;
/// A body larger than this once decompressed is refused (about 10 million paths).
const MAX_BODY: u64 = 2 << 30;

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
    /// The chunks its body is made of (none for a version 1 file: the body is inside).
    pub body: Vec<ChunkId>,
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

/// The encoded `SnapshotBody` of a run of paths: body chunks are such runs, or pieces of one.
pub fn encode_paths(paths: &[SnapPath]) -> Vec<u8> {
    body_of(paths).encode_to_vec()
}

/// The file bytes of a snapshot whose body is the concatenation of the chunks `body`.
pub fn encode(summary: &SnapshotSummary, body: &[ChunkId]) -> Vec<u8> {
    let mut out = head(summary, VERSION);
    out.reserve(body.len() * 32);
    for c in body {
        out.extend_from_slice(c);
    }
    out
}

fn head(summary: &SnapshotSummary, version: u16) -> Vec<u8> {
    let summary = summary.encode_to_vec();
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(summary.len() as u32).to_le_bytes());
    out.extend_from_slice(&summary);
    out
}

fn body_of(paths: &[SnapPath]) -> SnapshotBody {
    SnapshotBody {
        paths: paths
            .iter()
            .map(|p| SnapshotPath {
                path: p.path.as_bytes().to_vec(),
                entry: Some(p.entry.clone()),
                chunks: p.chunks.concat(),
            })
            .collect(),
    }
}

/// The file bytes of a version 1 snapshot (the body inside, compressed): what stores wrote
/// before version 2, kept to test that they still load.
#[cfg(test)]
pub fn encode_inline(
    summary: &SnapshotSummary,
    paths: &[SnapPath],
) -> Result<Vec<u8>, std::io::Error> {
    let mut z = zstd::stream::write::Encoder::new(head(summary, VERSION_INLINE), 3)?;
    z.write_all(&body_of(paths).encode_to_vec())?;
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
    let (_, len) = check_header(path, &header)?;
    let mut summary = vec![0u8; len];
    f.read_exact(&mut summary)
        .map_err(|e| bad(path, format!("truncated summary: {e}")))?;
    info_of(path, id, &summary)
}

fn check_header(path: &Path, header: &[u8]) -> Result<(u16, usize), HistoryError> {
    if header[..4] != MAGIC {
        return Err(bad(path, "not a snapshot (bad magic)"));
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != VERSION && version != VERSION_INLINE {
        return Err(bad(
            path,
            format!("unsupported snapshot format version {version}"),
        ));
    }
    let len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
    if len > MAX_SUMMARY {
        return Err(bad(path, format!("summary length {len} out of bounds")));
    }
    Ok((version, len))
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
/// be valid and in strictly increasing order, every entry of a known kind. `chunk` reads a
/// body chunk (verified against its id) of a version 2 file.
pub fn load(
    path: &Path,
    id: SnapshotId,
    chunk: &mut dyn FnMut(&ChunkId) -> Result<Vec<u8>, HistoryError>,
) -> Result<Snapshot, HistoryError> {
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
    let (version, len) = check_header(path, &bytes[..HEADER])?;
    let summary = bytes
        .get(HEADER..HEADER + len)
        .ok_or_else(|| bad(path, "truncated summary"))?;
    info_of(path, id, summary)?;
    let rest = &bytes[HEADER + len..];
    let (body, ids) = if version == VERSION_INLINE {
        (inline_body(path, rest)?, Vec::new())
    } else {
        chunked_body(path, rest, chunk)?
    };
    let body = SnapshotBody::decode(&body[..])
        .map_err(|e| bad(path, format!("body does not decode: {e}")))?;
    let paths = validate(path, body)?;
    Ok(Snapshot { paths, body: ids })
}

fn inline_body(path: &Path, z: &[u8]) -> Result<Vec<u8>, HistoryError> {
    let mut body = Vec::new();
    zstd::stream::read::Decoder::new(z)
        .and_then(|d| d.take(MAX_BODY + 1).read_to_end(&mut body))
        .map_err(|e| bad(path, format!("body does not decompress: {e}")))?;
    if body.len() as u64 > MAX_BODY {
        return Err(bad(path, "body too large"));
    }
    Ok(body)
}

/// The body of a version 2 file: its chunks, read and concatenated.
fn chunked_body(
    path: &Path,
    ids: &[u8],
    chunk: &mut dyn FnMut(&ChunkId) -> Result<Vec<u8>, HistoryError>,
) -> Result<(Vec<u8>, Vec<ChunkId>), HistoryError> {
    if !ids.len().is_multiple_of(32) {
        return Err(bad(path, "a body chunk id cut short"));
    }
    let ids: Vec<ChunkId> = ids
        .chunks_exact(32)
        .map(|c| c.try_into().expect("32 bytes"))
        .collect();
    let mut body = Vec::new();
    for c in &ids {
        body.extend_from_slice(&chunk(c)?);
        if body.len() as u64 > MAX_BODY {
            return Err(bad(path, "body too large"));
        }
    }
    Ok((body, ids))
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
    use std::collections::HashMap;

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

    /// Body chunks kept in memory: one per path, as the recorder cuts runs of paths.
    fn chunked(paths: &[SnapPath]) -> (Vec<ChunkId>, HashMap<ChunkId, Vec<u8>>) {
        let mut held = HashMap::new();
        let ids = paths
            .iter()
            .map(|p| {
                let bytes = encode_paths(std::slice::from_ref(p));
                let id = *blake3::hash(&bytes).as_bytes();
                held.insert(id, bytes);
                id
            })
            .collect();
        (ids, held)
    }

    fn reader(
        held: &HashMap<ChunkId, Vec<u8>>,
    ) -> impl FnMut(&ChunkId) -> Result<Vec<u8>, HistoryError> + '_ {
        |c| {
            held.get(c)
                .cloned()
                .ok_or_else(|| HistoryError::BadSnapshot {
                    path: "memory".into(),
                    reason: "no such chunk".into(),
                })
        }
    }

    #[test]
    fn round_trip_and_damage_detected() {
        let d = tempfile::tempdir().unwrap();
        let (ids, held) = chunked(&paths());
        let bytes = encode(&summary(), &ids);
        let id = write(&bytes, d.path(), d.path()).unwrap();
        let path = d.path().join(id.file_name());
        let info = read_info(&path, id).unwrap();
        assert_eq!((info.generation, info.new_bytes), (Generation(7), 100));
        let s = load(&path, id, &mut reader(&held)).unwrap();
        assert_eq!(s.paths, paths());
        assert_eq!(s.body, ids);
        let e = load(&path, id, &mut reader(&HashMap::new())).err().unwrap();
        assert!(e.to_string().contains("no such chunk"), "{e}");

        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let e = load(&path, id, &mut reader(&held))
            .err()
            .unwrap()
            .to_string();
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
        let (ids, held) = chunked(&ps);
        let bytes = encode(&summary(), &ids);
        let id = write(&bytes, d.path(), d.path()).unwrap();
        let e = load(&d.path().join(id.file_name()), id, &mut reader(&held))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("out of order"), "{e}");
    }

    #[test]
    fn version_1_files_with_the_body_inside_still_load() {
        let d = tempfile::tempdir().unwrap();
        let bytes = encode_inline(&summary(), &paths()).unwrap();
        let id = write(&bytes, d.path(), d.path()).unwrap();
        let path = d.path().join(id.file_name());
        assert_eq!(read_info(&path, id).unwrap().generation, Generation(7));
        let s = load(&path, id, &mut reader(&HashMap::new())).unwrap();
        assert_eq!(s.paths, paths());
        assert!(s.body.is_empty());
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
        let s = Snapshot {
            paths: ps,
            body: Vec::new(),
        };
        let d = RelPath::new("d").unwrap();
        let names: Vec<String> = s.under(Some(&d)).map(|p| p.path.to_string()).collect();
        assert_eq!(names, ["d", "d/f", "d/g"]);
        assert_eq!(s.under(None).count(), 5);
    }
}
