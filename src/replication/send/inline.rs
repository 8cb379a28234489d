//! Small files, sent whole inside batches: read, hashed and compressed in parallel, 256 files
//! at a time, and sent in messages of about 1 MiB.

use std::io::{self, Read};
use std::path::Path;

use rayon::prelude::*;

use super::SyncError;
use super::content::{Job, Sent};
use super::ops::inline_op;
use super::read::{FileRead, entry_for, now_ns, open_checked, unchanged};
use super::session::Out;
use crate::proto::{Entry, Op, Ops, sync_request};
use crate::replication::compress;
use crate::types::RelPath;

/// Files read in parallel before their batch goes out.
const GROUP: usize = 256;
/// A message of inline files is sent once it carries this much.
const BATCH_BYTES: usize = 1 << 20;

/// A small file read whole.
struct Inline {
    entry: Entry,
    data: Vec<u8>,
    /// `data` is zstd-compressed.
    zstd: bool,
}

/// Reads, hashes and compresses small files in parallel; sends them in batches of ~1 MiB.
pub(super) fn send_small(
    ws: &Path,
    jobs: Vec<Job>,
    level: i32,
    out: &Out,
) -> Result<Sent, SyncError> {
    let mut results = Vec::with_capacity(jobs.len());
    for group in jobs.chunks(GROUP) {
        let read: Vec<(RelPath, io::Result<Option<Inline>>)> = group
            .par_iter()
            .map(|j| (j.path.clone(), read_inline(ws, j, level)))
            .collect();
        send_group(read, out, &mut results)?;
    }
    Ok(results)
}

/// Reads one small file whole; `None` if it changed since the scan.
fn read_inline(ws: &Path, j: &Job, level: i32) -> io::Result<Option<Inline>> {
    let t = now_ns();
    let Some(mut f) = open_checked(ws, &j.path, &j.stat)? else {
        return Ok(None);
    };
    let mut data = Vec::with_capacity(j.stat.size as usize + 1);
    (&mut f).take(j.stat.size + 1).read_to_end(&mut data)?;
    if data.len() as u64 != j.stat.size || !unchanged(&f, &j.stat)? {
        return Ok(None);
    }
    let entry = entry_for(&j.stat, blake3::hash(&data), t);
    Ok(Some(match compress::if_smaller(&data, level) {
        Some(c) => Inline {
            entry,
            data: c,
            zstd: true,
        },
        None => Inline {
            entry,
            data,
            zstd: false,
        },
    }))
}

/// Sends one group's files in order; those that changed or could not be read wait for the
/// next generation.
fn send_group(
    read: Vec<(RelPath, io::Result<Option<Inline>>)>,
    out: &Out,
    results: &mut Sent,
) -> Result<(), SyncError> {
    let mut ops: Vec<Op> = Vec::new();
    let mut size = 0;
    for (p, r) in read {
        match r {
            Ok(Some(file)) => {
                size += file.data.len() + 64;
                ops.push(inline_op(&p, &file.entry, file.data, file.zstd));
                results.push((p, FileRead::Done(file.entry)));
                if size >= BATCH_BYTES {
                    let ops = std::mem::take(&mut ops);
                    out.send_blocking(sync_request::Msg::Ops(Ops { ops }))?;
                    size = 0;
                }
            }
            Ok(None) => results.push((p, FileRead::Changed)),
            Err(e) => {
                tracing::warn!(path = %p, error = %e, "cannot read; will retry next generation");
                results.push((p, FileRead::Changed));
            }
        }
    }
    if !ops.is_empty() {
        out.send_blocking(sync_request::Msg::Ops(Ops { ops }))?;
    }
    Ok(())
}
