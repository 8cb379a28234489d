//! Big files, streamed: read in windows of [`delta::WINDOW`] in order, a group of windows encoded
//! in parallel, sent in order as chunks of the file's stream, closed by a `FileEnd` with the
//! hash of everything read. Never more than a group of windows is in memory.
//!
//! Each window goes as a delta against the receiver's signature when that pays, as literal
//! data otherwise, zstd-compressed when that pays. What the file taught so far ([`Hints`])
//! saves work: after two windows that found no match, a window is probed before it is diffed
//! whole (diffing new data is slow), and once a window neither matched nor compressed,
//! compression is off for the rest of the file.
//!
//! A file that grows, shrinks, changes or cannot be read while streamed is aborted (the
//! receiver drops what it got) and waits for the next generation.

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
use crate::replication::{compress, delta};

/// The head of a window diffed to decide whether diffing all of it is worth it.
const PROBE: usize = 64 << 10;

/// Streams one file: windows read in order, encoded in parallel, sent in order.
pub(super) fn stream_file(
    ws: &Path,
    job: &Job,
    id: u32,
    sig: Option<fast_rsync::Signature>,
    level: i32,
    out: &Out,
) -> Result<FileRead, SyncError> {
    let t = now_ns();
    let Some(mut f) = open(ws, job) else {
        return Ok(FileRead::Changed);
    };
    let op = stream_op(&job.path, &job.stat.entry(), id, sig.is_some());
    out.send_blocking(sync_request::Msg::Ops(Ops { ops: vec![op] }))?;
    let idx = sig.as_ref().map(|s| s.index());
    let mut encoder = Encoder::new(idx.as_ref(), level);
    let mut read = Reading::default();
    let group = 2 * rayon::current_num_threads().max(1);
    loop {
        let Ok((windows, eof)) = read.windows(&mut f, group) else {
            return abort(out, id);
        };
        if read.total > job.stat.size {
            return abort(out, id); // grew while read
        }
        for (len, data) in encoder.encode(windows) {
            let len = len as u32;
            let data = Some(data);
            out.send_blocking(sync_request::Msg::Chunk(Chunk {
                file: id,
                len,
                data,
            }))?;
        }
        if eof {
            break;
        }
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
    Ok(FileRead::Done(entry_for(&job.stat, hash, t)))
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
fn abort(out: &Out, id: u32) -> Result<FileRead, SyncError> {
    out.send_blocking(sync_request::Msg::End(FileEnd {
        file: id,
        aborted: true,
        ..Default::default()
    }))?;
    Ok(FileRead::Changed)
}

/// What has been read of the file so far.
#[derive(Default)]
struct Reading {
    hasher: blake3::Hasher,
    total: u64,
}

impl Reading {
    /// Reads up to `n` windows (hashing them); says whether the end of the file was reached.
    fn windows(&mut self, f: &mut File, n: usize) -> io::Result<(Vec<Vec<u8>>, bool)> {
        let mut windows = Vec::with_capacity(n);
        for _ in 0..n {
            let (w, eof) = read_window(f)?;
            if !w.is_empty() {
                self.hasher.update(&w);
                self.total += w.len() as u64;
                windows.push(w);
            }
            if eof {
                return Ok((windows, true));
            }
        }
        Ok((windows, false))
    }
}

/// Fills one window; says whether the end of the file was reached.
fn read_window(f: &mut File) -> io::Result<(Vec<u8>, bool)> {
    let mut w = vec![0u8; delta::WINDOW];
    let mut n = 0;
    let mut eof = false;
    while n < w.len() {
        match f.read(&mut w[n..]) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    w.truncate(n);
    Ok((w, eof))
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

/// Encodes a file's windows, learning as it goes.
struct Encoder<'a> {
    idx: Option<&'a IndexedSignature<'a>>,
    level: i32,
    hints: Hints,
}

impl<'a> Encoder<'a> {
    fn new(idx: Option<&'a IndexedSignature<'a>>, level: i32) -> Encoder<'a> {
        let hints = Hints {
            compressible: level > 0,
            misses: 0,
        };
        Encoder { idx, level, hints }
    }

    /// Encodes a group of windows in parallel (all with the hints as they stood before the
    /// group), then learns from them in order. Returns each window's length and chunk data.
    fn encode(&mut self, windows: Vec<Vec<u8>>) -> Vec<(usize, chunk::Data)> {
        let lens: Vec<usize> = windows.iter().map(Vec::len).collect();
        let (idx, level, hints) = (self.idx, self.level, &self.hints);
        let encoded: Vec<Encoded> = windows
            .into_par_iter()
            .map(|w| encode_window(w, idx, level, hints))
            .collect();
        lens.into_iter()
            .zip(encoded)
            .map(|(len, e)| {
                self.learn(&e);
                (len, e.data)
            })
            .collect()
    }

    fn learn(&mut self, e: &Encoded) {
        if self.idx.is_some() {
            self.hints.misses = if e.delta { 0 } else { self.hints.misses + 1 };
        }
        if !e.compressed && !e.delta {
            self.hints.compressible = false;
        }
    }
}

/// Encodes one window: a delta when it pays, literal (compressed when that pays) otherwise.
/// Takes the window by value so that literal data goes out without another copy.
fn encode_window(
    window: Vec<u8>,
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
            data: chunk::Data::Literal(Bytes::from(window)),
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
