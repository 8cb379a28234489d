//! Streamed files: one worker per file on the blocking pool writes its chunks in order
//! (literals, delta windows, maybe compressed, or copies of the replica's committed copy),
//! hashes what it wrote, and at the file's end says whether the content is verified.
//!
//! A chunk that cannot be decoded does not end the session: the file is marked corrupt, its
//! later chunks are dropped, and at its end it is rejected (sent again whole). So is a copy
//! outside the base, one in a stream not allowed to copy, and one that would make the file
//! longer than its upsert declared. Only local i/o failures and chunks over the size limit end
//! the session.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use super::Inner;
use super::apply::{Policy, set_file_meta};
use super::refusal::{bad, status_io};
use super::stage::{Base, Direct, Patch, Rebuild};
use crate::disk::fsx;
use crate::proto::state::Extent;
use crate::proto::{Chunk, Entry, FileEnd, chunk};
use crate::replication::{compress, delta};
use crate::text::hex;
use crate::types::RelPath;

/// Suffix of a streamed file's full staged copy, once its in-place patch grew too big.
pub(super) const FULL: &str = ".full";

pub(super) enum StreamMsg {
    Chunk(Chunk),
    End(FileEnd),
}

/// The session's side of a stream worker.
pub(super) struct StreamHandle {
    pub path: RelPath,
    pub tx: mpsc::Sender<StreamMsg>,
    pub done: oneshot::Receiver<Result<Finished, Status>>,
}

/// A stream the worker has finished.
pub(super) struct Finished {
    pub name: Vec<u8>,
    pub placed: bool,
    pub outcome: StreamOutcome,
}

pub(super) enum StreamOutcome {
    Aborted,
    Rejected(String),
    /// Verified; `patch` holds the extents when the file is to be updated in place.
    Verified {
        entry: Entry,
        patch: Option<Vec<Extent>>,
    },
}

/// A streamed file about to be written.
pub(super) struct NewStream {
    pub path: RelPath,
    /// Location inside the stage (a bucket file, or the final name in a staged directory).
    pub name: Vec<u8>,
    /// Inside a new directory staged whole.
    pub placed: bool,
    pub entry: Entry,
    /// The replica's committed copy, for a delta or copies.
    pub base: Option<Arc<Base>>,
    /// Inode of the replica's file, patched in place.
    pub base_ino: u64,
    /// With copies: the most bytes the stream may produce. `None`: no copies allowed.
    pub copy_limit: Option<u64>,
    /// Why the file is refused before its first chunk (its chunks are dropped).
    pub refused: Option<String>,
}

/// Where a streamed file's bytes go (see `stage`).
enum Sink {
    Direct(Direct),
    Patch(Patch),
    Rebuild(Rebuild),
    /// Transient, while a patch turns into a full copy.
    Switching,
}

/// A stream as its worker sees it.
struct OpenStream {
    path: RelPath,
    name: Vec<u8>,
    placed: bool,
    sink: Sink,
    entry: Entry,
    hasher: blake3::Hasher,
    written: u64,
    base: Option<Arc<Base>>,
    base_ino: u64,
    copy_limit: Option<u64>,
    corrupt: Option<String>,
}

/// Opens a streamed file's sink (a patch when there is a non-empty base to patch in place) and
/// starts its worker.
pub(super) fn open_stream(inner: &Arc<Inner>, n: NewStream) -> Result<StreamHandle, Status> {
    let stage = inner.stage.as_fd();
    let sink = match &n.base {
        Some(b) if !b.bytes().is_empty() && !n.placed => {
            Patch::create(stage, &n.name).map(Sink::Patch)
        }
        _ => Direct::create(stage, &n.name).map(Sink::Direct),
    }
    .map_err(|e| status_io("staging", e))?;
    let s = OpenStream {
        path: n.path,
        name: n.name,
        placed: n.placed,
        sink,
        entry: n.entry,
        hasher: blake3::Hasher::new(),
        written: 0,
        base: n.base,
        base_ino: n.base_ino,
        copy_limit: n.copy_limit,
        corrupt: n.refused,
    };
    Ok(spawn_stream(inner.clone(), s))
}

/// Writes one streamed file on a blocking thread, chunk by chunk, in order.
fn spawn_stream(inner: Arc<Inner>, mut s: OpenStream) -> StreamHandle {
    let (tx, mut rx) = mpsc::channel::<StreamMsg>(4);
    let (done_tx, done) = oneshot::channel();
    let path = s.path.clone();
    tokio::task::spawn_blocking(move || {
        let mut failed: Option<Status> = None;
        while let Some(m) = rx.blocking_recv() {
            match m {
                StreamMsg::Chunk(c) => {
                    if failed.is_none()
                        && let Err(e) = write_chunk(inner.stage.as_fd(), &mut s, c)
                    {
                        failed = Some(e);
                    }
                }
                StreamMsg::End(end) => {
                    let _ = done_tx.send(end_stream(&inner, &mut s, &end, failed.take()));
                    return;
                }
            }
        }
    });
    StreamHandle { path, tx, done }
}

/// The end of a stream: a failed one leaves nothing staged, the others are checked.
fn end_stream(
    inner: &Inner,
    s: &mut OpenStream,
    end: &FileEnd,
    failed: Option<Status>,
) -> Result<Finished, Status> {
    if let Some(e) = failed {
        let _ = fsx::unlinkat(inner.stage.as_fd(), &s.name, false);
        return Err(e);
    }
    finish_stream(inner, s, end).map(|outcome| Finished {
        name: s.name.clone(),
        placed: s.placed,
        outcome,
    })
}

fn write_chunk(stage_fd: BorrowedFd<'_>, s: &mut OpenStream, c: Chunk) -> Result<(), Status> {
    if s.corrupt.is_some() {
        return Ok(());
    }
    if let Some(chunk::Data::Copy(from)) = c.data {
        return match check_copy(s, from, c.len as u64) {
            Ok(()) => s.copy(stage_fd, from, c.len as u64),
            Err(why) => {
                s.corrupt = Some(why);
                Ok(())
            }
        };
    }
    if let Some(limit) = s.copy_limit
        && s.written + c.len as u64 > limit
    {
        s.corrupt = Some(format!("more than the {limit} bytes declared"));
        return Ok(());
    }
    let len = c.len as usize;
    if len > delta::MAX_CHUNK {
        return Err(bad(format!(
            "{}: chunk of {len} bytes exceeds the limit",
            s.path
        )));
    }
    let data = match decode(s, c.data, len) {
        Ok(d) => d,
        Err(why) => {
            s.corrupt = Some(why);
            return Ok(());
        }
    };
    s.hasher.update(&data);
    let pos = s.written;
    s.written += len as u64;
    s.write(stage_fd, pos, &data)
}

/// A chunk's new bytes, or why they cannot be had.
fn decode(s: &OpenStream, data: Option<chunk::Data>, len: usize) -> Result<Bytes, String> {
    match data {
        Some(chunk::Data::Literal(b)) => {
            if b.len() != len {
                Err(format!("literal of {} bytes declared as {len}", b.len()))
            } else {
                Ok(b)
            }
        }
        Some(chunk::Data::LiteralZstd(b)) => compress::decompress(&b, len)
            .map_err(|e| format!("undecodable compressed literal: {e}"))
            .and_then(|d| {
                if d.len() == len {
                    Ok(d.into())
                } else {
                    Err(format!("literal of {} bytes declared as {len}", d.len()))
                }
            }),
        Some(chunk::Data::Delta(d)) => apply(s, &d, len).map(Bytes::from),
        Some(chunk::Data::DeltaZstd(d)) => compress::decompress(&d, 2 * len + (1 << 20))
            .map_err(|e| format!("undecodable compressed delta: {e}"))
            .and_then(|d| apply(s, &d, len).map(Bytes::from)),
        Some(chunk::Data::Copy(_)) => Err("copy decoded as data".into()),
        None => Err("chunk without data".into()),
    }
}

/// Why a copy of `len` bytes at `from` of the base cannot be made, if it cannot: the stream
/// must be allowed to copy, the range must lie inside the base, and the file must stay within
/// the size its upsert declared.
fn check_copy(s: &OpenStream, from: u64, len: u64) -> Result<(), String> {
    let (Some(limit), Some(base)) = (s.copy_limit, &s.base) else {
        return Err("copy in a stream without a base to copy from".into());
    };
    let base_len = base.bytes().len() as u64;
    if len == 0 {
        return Err("copy of 0 bytes".into());
    }
    if from.checked_add(len).is_none_or(|end| end > base_len) {
        return Err(format!(
            "copy of {len} bytes at {from}: outside the {base_len}-byte base"
        ));
    }
    if s.written.checked_add(len).is_none_or(|end| end > limit) {
        return Err(format!("more than the {limit} bytes declared"));
    }
    Ok(())
}

fn apply(s: &OpenStream, delta: &[u8], len: usize) -> Result<Vec<u8>, String> {
    let Some(base) = &s.base else {
        return Err("delta chunk for a file sent without a base".into());
    };
    delta::apply_window(base.bytes(), delta, len).map_err(|e| e.to_string())
}

impl OpenStream {
    /// Copies `len` bytes at `from` of the base (checked by `check_copy`) to the end of the
    /// new file: nothing to do in a patch when they stay at their offset, the kernel copies
    /// them into a rebuilt file otherwise.
    fn copy(&mut self, stage_fd: BorrowedFd<'_>, from: u64, len: u64) -> Result<(), Status> {
        let io = |e| status_io("writing staged data", e);
        let base = self.base.clone().expect("checked: a copy has a base");
        let bytes = &base.bytes()[from as usize..(from + len) as usize];
        if bytes.len() >= 1 << 20 {
            self.hasher.update_rayon(bytes);
        } else {
            self.hasher.update(bytes);
        }
        let pos = self.written;
        if matches!(self.sink, Sink::Patch(_)) && from != pos {
            // Moved data: a full copy. Where the kernel's copy would share extents, it makes
            // it; on ext4 it would write the same bytes through the page cache, slower than
            // direct I/O (stage.rs), so the bytes go through `Direct` instead.
            if fsx::shares_extents(base.file()) {
                self.switch_to_rebuild(stage_fd, pos).map_err(io)?;
            } else {
                self.switch_to_full(stage_fd).map_err(io)?;
            }
        }
        match &mut self.sink {
            Sink::Patch(_) => {}
            Sink::Rebuild(r) => r.copy(base.file(), from, pos, len).map_err(io)?,
            Sink::Direct(w) => w.write(bytes).map_err(io)?,
            Sink::Switching => return Err(Status::internal("stream in an inconsistent state")),
        }
        self.written += len;
        Ok(())
    }

    /// Turns the patch into a rebuilt full copy staged as `<name>.full`, holding the first
    /// `upto` bytes of the new file.
    fn switch_to_rebuild(&mut self, stage_fd: BorrowedFd<'_>, upto: u64) -> std::io::Result<()> {
        let Sink::Patch(p) = std::mem::replace(&mut self.sink, Sink::Switching) else {
            unreachable!()
        };
        let base = self.base.clone().expect("a patch has a base");
        let full = self.full_name();
        let r = p.into_rebuild(&base, upto, Rebuild::create(stage_fd, &full)?)?;
        let _ = fsx::unlinkat(stage_fd, &self.name, false);
        self.name = full;
        self.sink = Sink::Rebuild(r);
        Ok(())
    }

    fn full_name(&self) -> Vec<u8> {
        let mut full = self.name.clone();
        full.extend_from_slice(FULL.as_bytes());
        full
    }

    /// Writes `data`, found at `pos` in the new file, to the sink.
    fn write(&mut self, stage_fd: BorrowedFd<'_>, pos: u64, data: &[u8]) -> Result<(), Status> {
        let io = |e| status_io("writing staged data", e);
        match &mut self.sink {
            Sink::Direct(w) => w.write(data).map_err(io)?,
            Sink::Patch(p) => {
                let base = self.base.as_ref().map(|b| b.bytes()).unwrap_or(&[]);
                p.add(base, pos, data).map_err(io)?;
                if p.too_big(self.written) {
                    // Most of the file changed: a full copy is cheaper than patching in place.
                    self.switch_to_full(stage_fd).map_err(io)?;
                }
            }
            Sink::Rebuild(r) => r.write(pos, data).map_err(io)?,
            Sink::Switching => return Err(Status::internal("stream in an inconsistent state")),
        }
        Ok(())
    }

    /// Turns the patch into a full copy staged as `<name>.full`.
    fn switch_to_full(&mut self, stage_fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let Sink::Patch(p) = std::mem::replace(&mut self.sink, Sink::Switching) else {
            unreachable!()
        };
        let base = self.base.as_ref().map(|b| b.bytes()).unwrap_or(&[]);
        let full = self.full_name();
        let w = Direct::create(stage_fd, &full)?;
        let w = p.into_direct(base, self.written, w)?;
        let _ = fsx::unlinkat(stage_fd, &self.name, false);
        self.name = full;
        self.sink = Sink::Direct(w);
        Ok(())
    }
}

/// Why a finished stream's content cannot be committed, if it cannot.
fn rejection(s: &OpenStream, end: &FileEnd) -> Option<String> {
    if let Some(c) = &s.corrupt {
        Some(c.clone())
    } else if s.written != end.size {
        Some(format!(
            "{} bytes received, {} declared",
            s.written, end.size
        ))
    } else if s.hasher.finalize().as_bytes()[..] != end.blake3[..] {
        Some(format!(
            "blake3 mismatch: received {}, declared {}",
            s.hasher.finalize().to_hex(),
            hex(&end.blake3)
        ))
    } else {
        None
    }
}

fn finish_stream(
    inner: &Inner,
    s: &mut OpenStream,
    end: &FileEnd,
) -> Result<StreamOutcome, Status> {
    let sink = std::mem::replace(&mut s.sink, Sink::Switching);
    let unlink = |s: &OpenStream, sink: Sink| {
        drop(sink);
        let _ = fsx::unlinkat(inner.stage.as_fd(), &s.name, false);
    };
    if end.aborted {
        unlink(s, sink);
        return Ok(StreamOutcome::Aborted);
    }
    if let Some(why) = rejection(s, end) {
        unlink(s, sink);
        return Ok(StreamOutcome::Rejected(why));
    }
    let mut e = s.entry.clone();
    e.size = end.size;
    e.blake3 = end.blake3.clone();
    seal(sink, e, (end.size, s.base_ino), inner.setid)
}

/// A staged copy at least this big is made durable as soon as it is verified, on its stream's
/// thread: its write-back then overlaps the rest of the generation instead of adding to the
/// commit's wait (ARCHITECTURE.md, "The life of one write", step 5). Smaller ones wait for the
/// commit's one flush: a flush each would cost a journal commit apiece.
const SYNC_AT_END_MIN: u64 = 16 << 20;

/// Closes a verified stream's sink: a full copy gets the entry's metadata, a patch keeps the
/// replica file's inode.
fn seal(
    sink: Sink,
    mut e: Entry,
    (size, base_ino): (u64, u64),
    bits: Policy,
) -> Result<StreamOutcome, Status> {
    let io = |er| status_io("staging", er);
    match sink {
        Sink::Direct(_) | Sink::Rebuild(_) => {
            let f = match sink {
                Sink::Direct(w) => w.finish(size),
                Sink::Rebuild(r) => r.finish(size),
                _ => unreachable!(),
            }
            .map_err(io)?;
            set_file_meta(&f, &e, bits).map_err(io)?;
            if size >= SYNC_AT_END_MIN {
                f.sync_data().map_err(io)?;
            }
            e.ino = f.metadata().map_err(io)?.ino();
            Ok(StreamOutcome::Verified {
                entry: e,
                patch: None,
            })
        }
        Sink::Patch(p) => {
            let extents = p.extents.clone();
            p.finish().map_err(io)?;
            e.ino = base_ino;
            Ok(StreamOutcome::Verified {
                entry: e,
                patch: Some(extents),
            })
        }
        Sink::Switching => Err(Status::internal("stream in an inconsistent state")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream over a 10,000-byte base that may produce `limit` bytes, `written` so far.
    fn stream(base: Option<Arc<Base>>, limit: Option<u64>, written: u64) -> OpenStream {
        OpenStream {
            path: RelPath::new("f").unwrap(),
            name: b"s".to_vec(),
            placed: false,
            sink: Sink::Switching,
            entry: Entry::default(),
            hasher: blake3::Hasher::new(),
            written,
            base,
            base_ino: 0,
            copy_limit: limit,
            corrupt: None,
        }
    }

    #[test]
    fn copies_must_lie_inside_the_base_and_the_declared_size() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("b"), vec![1u8; 10_000]).unwrap();
        let f = std::fs::File::open(d.path().join("b")).unwrap();
        let base = Some(Arc::new(Base::new(f).unwrap()));
        let s = stream(base.clone(), Some(20_000), 0);
        assert!(check_copy(&s, 0, 10_000).is_ok());
        assert!(check_copy(&s, 9_999, 1).is_ok());
        assert!(check_copy(&s, 9_999, 2).unwrap_err().contains("outside"));
        assert!(check_copy(&s, 10_000, 1).is_err());
        assert!(check_copy(&s, u64::MAX, 2).unwrap_err().contains("outside"));
        assert!(check_copy(&s, 0, 0).unwrap_err().contains("0 bytes"));
        // Within the base, but past the size the upsert declared.
        let s = stream(base.clone(), Some(20_000), 15_000);
        assert!(check_copy(&s, 0, 5_000).is_ok());
        assert!(check_copy(&s, 0, 5_001).unwrap_err().contains("declared"));
        let s = stream(base.clone(), Some(u64::MAX), u64::MAX - 1);
        assert!(check_copy(&s, 0, 2).unwrap_err().contains("declared"));
        // A stream not allowed to copy, or without a base.
        assert!(check_copy(&stream(base, None, 0), 0, 1).is_err());
        assert!(check_copy(&stream(None, Some(10), 0), 0, 1).is_err());
    }
}
