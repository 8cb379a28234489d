//! Big files, streamed: read in groups of windows of [`delta::WINDOW`] in order, each group
//! encoded in parallel, sent in order as chunks of the file's stream, closed by a `FileEnd` with
//! the hash of everything read. Never more than a group is in memory.
//!
//! How a group is encoded depends on what the sender knows of the receiver's copy ([`Basis`]):
//! - its **chunk map** (`replication::chunkmap`): the group is cut into content-defined chunks;
//!   a chunk the receiver's copy holds goes as `copy(offset, len)` of it (neighbouring copies
//!   merged), the rest as literal data. No signature, no diff.
//! - its **signature** (the fallback, when this sender kept no map of it): each window goes as
//!   a fast_rsync delta when that pays, as literal data otherwise. What the file taught so far
//!   ([`Hints`]) saves work: after two windows that found no match, a window is probed before it
//!   is diffed whole (diffing new data is slow).
//! - nothing (a new file): literal data.
//!
//! Literal data is zstd-compressed when that pays; once a window neither matched nor
//! compressed, compression is off for the rest of the file. Every file of at least
//! [`chunkmap::MIN_FILE`] bytes is cut into chunks as it is read, whatever its basis, and its
//! new map comes back with it, to be kept once the receiver committed it.
//!
//! A file that grows, shrinks, changes or cannot be read while streamed is aborted (the
//! receiver drops what it got) and waits for the next generation.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use bytes::Bytes;
use fast_rsync::IndexedSignature;
use rayon::prelude::*;

use super::SyncError;
use super::content::Job;
use super::ops::stream_op;
use super::read::{FileRead, entry_for, now_ns, open_checked, unchanged};
use super::session::Out;
use crate::proto::{Chunk, FileEnd, Ops, chunk, sync_request};
use crate::replication::chunkmap::{self, ChunkHash, ChunkMap, Cutter};
use crate::replication::{compress, delta};

/// The head of a window diffed to decide whether diffing all of it is worth it.
const PROBE: usize = 64 << 10;
/// Longest copy one chunk message asks for: neighbouring copies are merged up to this, so that
/// the receiver copies while the rest of the file is still being read.
const MAX_COPY: u64 = 16 << 20;

/// What the sender knows of the receiver's copy of a file.
pub(super) enum Basis {
    /// Nothing: literal data.
    Whole,
    /// Its signature: fast_rsync deltas.
    Signature(fast_rsync::Signature),
    /// Its chunk map (and its blake3, which the receiver checks): copies of its chunks.
    Map(ChunkMap, Vec<u8>),
}

/// A streamed file's outcome, with the chunk map of what was read (files of at least
/// [`chunkmap::MIN_FILE`] bytes read to the end).
pub(super) struct Streamed {
    pub(super) read: FileRead,
    pub(super) map: Option<ChunkMap>,
}

impl Streamed {
    fn changed() -> Streamed {
        Streamed {
            read: FileRead::Changed,
            map: None,
        }
    }
}

/// Streams one file: groups read in order, encoded in parallel, sent in order. `windows` is
/// how many windows of [`delta::WINDOW`] bytes a group holds.
pub(super) fn stream_file(
    ws: &Path,
    job: &Job,
    (id, windows): (u32, usize),
    basis: Basis,
    level: i32,
    out: &Out,
) -> Result<Streamed, SyncError> {
    let t = now_ns();
    let Some(mut f) = open(ws, job) else {
        return Ok(Streamed::changed());
    };
    let (is_delta, base_blake3) = match &basis {
        Basis::Whole => (false, Vec::new()),
        Basis::Signature(_) => (true, Vec::new()),
        Basis::Map(_, b) => (false, b.clone()),
    };
    let op = stream_op(&job.path, &job.stat.entry(), id, is_delta, base_blake3);
    out.send_blocking(sync_request::Msg::Ops(Ops { ops: vec![op] }))?;
    let cut = job.stat.size >= chunkmap::MIN_FILE || matches!(basis, Basis::Map(..));
    let mut read = Reading::new(cut);
    let sig = match &basis {
        Basis::Signature(s) => Some(s),
        _ => None,
    };
    let idx = sig.map(|s| s.index());
    let mut encoder = Encoder::new(idx.as_ref(), level, &basis);
    loop {
        let Ok(group) = read.next(&mut f, windows * delta::WINDOW) else {
            return abort(out, id);
        };
        if read.total > job.stat.size {
            return abort(out, id); // grew while read
        }
        let eof = group.eof;
        for (len, data) in encoder.encode(group) {
            send_chunk(out, id, len, data)?;
        }
        if eof {
            break;
        }
    }
    if let Some((len, data)) = encoder.finish() {
        send_chunk(out, id, len, data)?;
    }
    if read.total != job.stat.size || !unchanged(&f, &job.stat).unwrap_or(false) {
        return abort(out, id);
    }
    let hash = read.hasher.finalize();
    out.send_blocking(sync_request::Msg::End(FileEnd {
        file: id,
        aborted: false,
        blake3: hash.as_bytes().to_vec(),
        size: read.total,
    }))?;
    let map = (read.total >= chunkmap::MIN_FILE).then_some(read.map);
    Ok(Streamed {
        read: FileRead::Done(entry_for(&job.stat, hash, t)),
        map,
    })
}

fn send_chunk(out: &Out, file: u32, len: usize, data: chunk::Data) -> Result<(), SyncError> {
    out.send_blocking(sync_request::Msg::Chunk(Chunk {
        file,
        len: len as u32,
        data: Some(data),
    }))
}

/// Opens the file the scan saw; `None`: it changed, or cannot be read (said in a log line).
fn open(ws: &Path, job: &Job) -> Option<File> {
    match open_checked(ws, &job.path, &job.stat) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %job.path, error = %e, "cannot read; will retry next generation");
            None
        }
    }
}

/// Tells the receiver to drop the stream: the file waits for the next generation.
fn abort(out: &Out, id: u32) -> Result<Streamed, SyncError> {
    out.send_blocking(sync_request::Msg::End(FileEnd {
        file: id,
        aborted: true,
        ..Default::default()
    }))?;
    Ok(Streamed::changed())
}

/// A run of the file, read in order: its bytes, cut into chunks when the file is chunked.
struct Group {
    data: Bytes,
    /// Start, length and hash of each chunk of `data` (empty when not chunked).
    chunks: Vec<(usize, usize, ChunkHash)>,
    eof: bool,
}

/// What has been read of the file so far.
struct Reading {
    hasher: blake3::Hasher,
    total: u64,
    /// Bytes read and not yet handed on: the start of a chunk not cut yet.
    carry: Vec<u8>,
    cutter: Option<Cutter>,
    /// The chunks handed on so far.
    map: ChunkMap,
}

impl Reading {
    fn new(cut: bool) -> Reading {
        Reading {
            hasher: blake3::Hasher::new(),
            total: 0,
            carry: Vec::new(),
            cutter: cut.then(Cutter::default),
            map: ChunkMap::default(),
        }
    }

    /// Reads up to `want` more bytes (hashing them) and hands on what is read, up to the last
    /// whole chunk when the file is chunked (all of it at the end of the file).
    fn next(&mut self, f: &mut File, want: usize) -> io::Result<Group> {
        let mut buf = std::mem::take(&mut self.carry);
        let carried = buf.len();
        buf.resize(carried + want, 0);
        let (n, eof) = fill(f, &mut buf[carried..])?;
        buf.truncate(carried + n);
        self.total += n as u64;
        let Some(cutter) = &self.cutter else {
            self.hasher.update_rayon(&buf[carried..]);
            return Ok(Group {
                data: Bytes::from(buf),
                chunks: Vec::new(),
                eof,
            });
        };
        let mut starts = Vec::new();
        let mut covered = 0;
        for len in cutter.cuts(&buf, eof) {
            starts.push((covered, len));
            covered += len;
        }
        let (hasher, new) = (&mut self.hasher, &buf[carried..]);
        let ((), chunks) = rayon::join(
            || {
                hasher.update_rayon(new);
            },
            || {
                starts
                    .par_iter()
                    .map(|&(s, l)| (s, l, chunkmap::chunk_hash(&buf[s..s + l])))
                    .collect::<Vec<_>>()
            },
        );
        for &(_, l, h) in &chunks {
            self.map.push(l, h);
        }
        self.carry = buf[covered..].to_vec();
        buf.truncate(covered);
        Ok(Group {
            data: Bytes::from(buf),
            chunks,
            eof,
        })
    }
}

/// Fills `buf` as far as the file goes; returns the bytes read and whether the end was reached.
fn fill(f: &mut File, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => return Ok((n, true)),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((n, false))
}

/// Per-file hints carried from window to window.
struct Hints {
    compressible: bool,
    /// Windows in a row for which a delta did not pay.
    misses: u32,
}

/// One window, encoded.
struct Encoded {
    data: chunk::Data,
    /// A delta paid off.
    delta: bool,
    /// Compression paid off.
    compressed: bool,
}

/// Encodes a file's groups, learning as it goes.
struct Encoder<'a> {
    idx: Option<&'a IndexedSignature<'a>>,
    /// The receiver's copy's chunks: where each lies in it.
    base: Option<Copies>,
    level: i32,
    hints: Hints,
}

impl<'a> Encoder<'a> {
    fn new(idx: Option<&'a IndexedSignature<'a>>, level: i32, basis: &Basis) -> Encoder<'a> {
        let hints = Hints {
            compressible: level > 0,
            misses: 0,
        };
        let base = match basis {
            Basis::Map(m, _) => Some(Copies::new(m)),
            _ => None,
        };
        Encoder {
            idx,
            base,
            level,
            hints,
        }
    }

    /// Encodes a group: its pieces (windows, or literal runs and copies) in parallel (all with
    /// the hints as they stood before the group), then learns from them in order. Returns each
    /// piece's length and chunk data, in file order.
    fn encode(&mut self, g: Group) -> Vec<(usize, chunk::Data)> {
        let pieces = match &mut self.base {
            Some(c) => c.pieces(&g),
            None => windows(&g.data),
        };
        let (idx, level, hints) = (self.idx, self.level, &self.hints);
        let encoded: Vec<(usize, Encoded)> = pieces
            .into_par_iter()
            .map(|p| match p {
                Piece::Copy { offset, len } => (len as usize, copied(offset)),
                Piece::Literal(w) => (w.len(), encode_window(w, idx, level, hints)),
            })
            .collect();
        encoded
            .into_iter()
            .map(|(len, e)| {
                self.learn(&e);
                (len, e.data)
            })
            .collect()
    }

    /// The copy still open at the end of the file, if any.
    fn finish(&mut self) -> Option<(usize, chunk::Data)> {
        let (offset, len) = self.base.as_mut()?.open.take()?;
        Some((len as usize, chunk::Data::Copy(offset)))
    }

    fn learn(&mut self, e: &Encoded) {
        if matches!(e.data, chunk::Data::Copy(_)) {
            return;
        }
        if self.idx.is_some() {
            self.hints.misses = if e.delta { 0 } else { self.hints.misses + 1 };
        }
        if !e.compressed && !e.delta {
            self.hints.compressible = false;
        }
    }
}

/// A piece of a group to send.
enum Piece {
    Literal(Bytes),
    /// `len` bytes at `offset` of the receiver's copy.
    Copy {
        offset: u64,
        len: u64,
    },
}

/// A group cut into windows of at most [`delta::WINDOW`] bytes (slices, not copies).
fn windows(data: &Bytes) -> Vec<Piece> {
    (0..data.len())
        .step_by(delta::WINDOW)
        .map(|s| Piece::Literal(data.slice(s..(s + delta::WINDOW).min(data.len()))))
        .collect()
}

fn copied(offset: u64) -> Encoded {
    Encoded {
        data: chunk::Data::Copy(offset),
        delta: false,
        compressed: false,
    }
}

/// Turns chunks into copies of the receiver's copy where it holds them.
struct Copies {
    /// Where each chunk of the receiver's copy lies in it.
    at: HashMap<ChunkHash, u64>,
    /// The copy being extended: offset in the base and length. It is sent once the next chunk
    /// does not continue it, so that neighbouring chunks become one copy.
    open: Option<(u64, u64)>,
}

impl Copies {
    fn new(base: &ChunkMap) -> Copies {
        Copies {
            at: base.offsets(),
            open: None,
        }
    }

    /// The group's pieces in order: runs of literal chunks (each at most a window) and copies.
    fn pieces(&mut self, g: &Group) -> Vec<Piece> {
        let mut out = Vec::new();
        // The literal run being gathered: start and end in the group.
        let mut lit: Option<(usize, usize)> = None;
        for &(start, len, h) in &g.chunks {
            match self.at.get(&h) {
                Some(&offset) => {
                    if let Some((s, e)) = lit.take() {
                        out.push(Piece::Literal(g.data.slice(s..e)));
                    }
                    self.extend(offset, len as u64, &mut out);
                }
                None => {
                    if let Some((offset, len)) = self.open.take() {
                        out.push(Piece::Copy { offset, len });
                    }
                    lit = match lit {
                        Some((s, e)) if e + len - s <= delta::WINDOW => Some((s, e + len)),
                        Some((s, e)) => {
                            out.push(Piece::Literal(g.data.slice(s..e)));
                            Some((start, start + len))
                        }
                        None => Some((start, start + len)),
                    };
                }
            }
        }
        if let Some((s, e)) = lit {
            out.push(Piece::Literal(g.data.slice(s..e)));
        }
        out
    }

    /// Adds a chunk found at `offset` of the base to the open copy, or opens a new one.
    fn extend(&mut self, offset: u64, len: u64, out: &mut Vec<Piece>) {
        match &mut self.open {
            Some((o, l)) if *o + *l == offset && *l + len <= MAX_COPY => *l += len,
            open => {
                if let Some((offset, len)) = open.take() {
                    out.push(Piece::Copy { offset, len });
                }
                *open = Some((offset, len));
            }
        }
    }
}

/// Encodes one window: a delta when it pays, literal (compressed when that pays) otherwise.
/// Takes the window by value so that literal data goes out without another copy.
fn encode_window(
    window: Bytes,
    sig: Option<&IndexedSignature<'_>>,
    level: i32,
    hints: &Hints,
) -> Encoded {
    let level = if hints.compressible { level } else { 0 };
    if let Some(idx) = sig
        && let Some(e) = try_delta(&window, idx, level, hints)
    {
        return e;
    }
    match compress::if_smaller(&window, level) {
        Some(c) => Encoded {
            data: chunk::Data::LiteralZstd(c.into()),
            delta: false,
            compressed: true,
        },
        None => Encoded {
            data: chunk::Data::Literal(window),
            delta: false,
            compressed: false,
        },
    }
}

/// The window as a delta, if one pays (under 9/10 of the window). After misses, the window's
/// head is probed first and a poor probe skips the full diff.
fn try_delta(
    data: &[u8],
    idx: &IndexedSignature<'_>,
    level: i32,
    hints: &Hints,
) -> Option<Encoded> {
    let skip = hints.misses >= 2 && data.len() > PROBE && {
        let mut d = Vec::new();
        fast_rsync::diff(idx, &data[..PROBE], &mut d).is_err() || d.len() > PROBE * 9 / 10
    };
    if skip {
        return None;
    }
    let mut d = Vec::with_capacity(data.len() / 8);
    if fast_rsync::diff(idx, data, &mut d).is_err() || d.len() >= data.len() * 9 / 10 {
        return None;
    }
    Some(match compress::if_smaller(&d, level) {
        Some(c) => Encoded {
            data: chunk::Data::DeltaZstd(c.into()),
            delta: true,
            compressed: true,
        },
        None => Encoded {
            data: chunk::Data::Delta(d.into()),
            delta: true,
            compressed: false,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::chunkmap::chunk_hash;

    /// A group holding `chunks` one after the other.
    fn group(chunks: &[&[u8]]) -> Group {
        let mut data = Vec::new();
        let mut at = Vec::new();
        for c in chunks {
            at.push((data.len(), c.len(), chunk_hash(c)));
            data.extend_from_slice(c);
        }
        Group {
            data: Bytes::from(data),
            chunks: at,
            eof: false,
        }
    }

    fn shape(pieces: &[Piece]) -> Vec<(char, u64, u64)> {
        pieces
            .iter()
            .map(|p| match p {
                Piece::Copy { offset, len } => ('c', *offset, *len),
                Piece::Literal(b) => ('l', 0, b.len() as u64),
            })
            .collect()
    }

    #[test]
    fn chunks_the_base_holds_become_merged_copies() {
        let (a, b, c, x) = (
            vec![1u8; 5000],
            vec![2u8; 6000],
            vec![3u8; 7000],
            vec![9u8; 100],
        );
        let mut base = ChunkMap::default();
        for ch in [&a, &b, &c] {
            base.push(ch.len(), chunk_hash(ch));
        }
        let mut copies = Copies::new(&base);
        // An insertion between a and b: copy a, literal x, then b and c as one copy (neighbours
        // merged), left open for the next group to extend.
        let p = copies.pieces(&group(&[&a, &x, &b, &c]));
        assert_eq!(shape(&p), [('c', 0, 5000), ('l', 0, 100)]);
        assert_eq!(copies.open, Some((5000, 13_000)));
        // The next group starts with a new chunk: the open copy goes first.
        let p = copies.pieces(&group(&[&x, &x, &a]));
        assert_eq!(
            shape(&p),
            [('c', 5000, 13_000), ('l', 0, 200)],
            "literal neighbours are one piece"
        );
        assert_eq!(copies.open, Some((0, 5000)));
    }

    #[test]
    fn copies_stop_growing_at_the_largest_copy() {
        let a = vec![5u8; 4096];
        let mut base = ChunkMap::default();
        let n = (MAX_COPY / 4096) as usize + 3;
        for _ in 0..n {
            base.push(a.len(), chunk_hash(&a));
        }
        // Every chunk is the same: each is found at offset 0, never contiguous with the last.
        let mut copies = Copies::new(&base);
        let p = copies.pieces(&group(&[&a, &a, &a]));
        assert_eq!(shape(&p), [('c', 0, 4096), ('c', 0, 4096)]);
        // Contiguous chunks are merged up to MAX_COPY.
        let mut out = Vec::new();
        let mut c = Copies {
            at: HashMap::new(),
            open: None,
        };
        for i in 0..n as u64 {
            c.extend(i * 4096, 4096, &mut out);
        }
        assert_eq!(shape(&out), [('c', 0, MAX_COPY)]);
        assert_eq!(c.open, Some((MAX_COPY, 3 * 4096)));
    }
}
