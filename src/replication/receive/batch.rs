//! Staging batches: the small files, symlinks and renames of one `ops` message, verified and
//! written into the stage on the blocking pool while the session reads on.
//!
//! Small files are verified in parallel; those outside a new directory are written one after
//! the other into one pack (one file instead of thousands), those inside one at their final
//! name there. A file whose content does not match its hash comes back as `None`: the sender
//! is asked for it again, whole.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use bytes::Bytes;
use rayon::prelude::*;
use tokio::task::JoinHandle;

use super::Inner;
use super::apply::set_file_meta;
use crate::disk::fsx;
use crate::proto::Entry;
use crate::replication::attrs;
use crate::replication::manifest::{Kind, Manifest, kind_of};
use crate::types::RelPath;

/// An inline file to verify and pack.
pub(super) struct InlineJob {
    pub path: RelPath,
    pub entry: Entry,
    pub data: Bytes,
    pub zstd: bool,
}

/// A rename: `path` gets the bytes of the committed file `src`, staged as `name`.
pub(super) struct Link {
    path: RelPath,
    src: RelPath,
    entry: Entry,
    name: String,
}

impl Link {
    pub(super) fn new(path: RelPath, src: RelPath, entry: Entry, name: String) -> Link {
        Link {
            path,
            src,
            entry,
            name,
        }
    }
}

/// What one `ops` message leaves to stage off the async threads.
#[derive(Default)]
pub(super) struct Batch {
    pub inline: Vec<InlineJob>,
    /// Inline files inside a new directory, with their place in the stage.
    pub placed_inline: Vec<(InlineJob, Vec<u8>)>,
    pub links: Vec<Link>,
    /// Symlinks, with their place in the stage.
    pub symlinks: Vec<(RelPath, Entry, Vec<u8>)>,
}

/// What a staging batch did: per path, the entry staged, `None` when the content did not
/// match its hash, or the error.
pub(super) struct BatchOut {
    pub results: Vec<(RelPath, Result<Option<Entry>, io::Error>)>,
    /// Offsets in the pack of the files written into it.
    pub packed: HashMap<RelPath, u64>,
    /// The pack's name in the stage.
    pub pack: Option<String>,
    /// A failure that spoils the whole batch.
    pub error: Option<io::Error>,
}

impl Batch {
    /// Adds an inline file; `placed` is its place inside a new directory, if it is in one.
    /// Returns whether it is placed there.
    pub(super) fn add_inline(&mut self, job: InlineJob, placed: Option<Vec<u8>>) -> bool {
        match placed {
            Some(loc) => {
                self.placed_inline.push((job, loc));
                true
            }
            None => {
                self.inline.push(job);
                false
            }
        }
    }

    /// Starts staging on the blocking pool; the pack, if any, is staged as `pack`. Renames
    /// take their source's committed entry from `manifest`.
    pub(super) fn spawn(
        self,
        inner: Arc<Inner>,
        manifest: &Manifest,
        pack: Option<String>,
    ) -> JoinHandle<BatchOut> {
        let links: Vec<(Link, Option<Entry>)> = self
            .links
            .into_iter()
            .map(|l| {
                let src = manifest.get(&l.src).cloned();
                (l, src)
            })
            .collect();
        let (inline, placed_inline, symlinks) = (self.inline, self.placed_inline, self.symlinks);
        tokio::task::spawn_blocking(move || {
            let mut out = BatchOut {
                results: Vec::new(),
                packed: HashMap::new(),
                pack: pack.clone(),
                error: None,
            };
            if let Some(name) = &pack
                && let Err(e) = stage_pack_into(&inner, name, inline, &mut out)
            {
                out.error = Some(e);
                return out;
            }
            stage_rest(&inner, placed_inline, symlinks, links, &mut out);
            out
        })
    }
}

/// Packs the inline files, recording each one's outcome and offset.
fn stage_pack_into(
    inner: &Inner,
    name: &str,
    inline: Vec<InlineJob>,
    out: &mut BatchOut,
) -> io::Result<()> {
    for (p, e) in stage_pack(inner, name, inline)? {
        if let Some((_, off)) = &e {
            out.packed.insert(p.clone(), *off);
        }
        out.results.push((p, Ok(e.map(|(e, _)| e))));
    }
    Ok(())
}

/// Stages the inline files of new directories, the symlinks and the renames.
fn stage_rest(
    inner: &Inner,
    placed_inline: Vec<(InlineJob, Vec<u8>)>,
    symlinks: Vec<(RelPath, Entry, Vec<u8>)>,
    links: Vec<(Link, Option<Entry>)>,
    out: &mut BatchOut,
) {
    let placed: Vec<(RelPath, Result<Option<Entry>, io::Error>)> = placed_inline
        .into_par_iter()
        .map(|(j, loc)| {
            let p = j.path.clone();
            (p, stage_placed(inner, j, &loc))
        })
        .collect();
    out.results.extend(placed);
    for (p, e, n) in symlinks {
        let r = fsx::symlinkat(&e.target, inner.stage.as_fd(), &n)
            .and_then(|_| attrs::chown_at(inner.stage.as_fd(), &n, &e, inner.setid.privileged))
            .and_then(|_| fsx::set_mtime_at(inner.stage.as_fd(), &n, e.mtime_ns))
            .map(|_| Some(e));
        out.results.push((p, r));
    }
    for (l, src_entry) in links {
        let r = stage_link(inner, &l.src, l.entry, &l.name, src_entry);
        out.results.push((l.path, r));
    }
}

/// Verifies a small file and writes it at its final name inside a staged directory.
fn stage_placed(inner: &Inner, j: InlineJob, loc: &[u8]) -> io::Result<Option<Entry>> {
    let Some(data) = verify_inline(&j) else {
        return Ok(None);
    };
    let mut f = fsx::create_excl(inner.stage.as_fd(), loc)?;
    f.write_all(&data)?;
    set_file_meta(&f, &j.entry, inner.setid)?;
    let mut e = j.entry;
    e.ino = f.metadata()?.ino();
    Ok(Some(e))
}

/// The content of an inline file when it matches its declared size and hash.
fn verify_inline(j: &InlineJob) -> Option<Vec<u8>> {
    let data = if j.zstd {
        crate::replication::compress::decompress(&j.data, j.entry.size as usize).ok()
    } else {
        Some(j.data.to_vec())
    };
    data.filter(|d| {
        d.len() as u64 == j.entry.size && blake3::hash(d).as_bytes()[..] == j.entry.blake3[..]
    })
}

/// Each packed file's entry and offset in the pack, or `None` when its content does not match
/// its hash.
type Packed = Vec<(RelPath, Option<(Entry, u64)>)>;

/// Verifies small files (in parallel) and writes those that match their hash, one after the
/// other, into one staged pack.
fn stage_pack(inner: &Inner, name: &str, jobs: Vec<InlineJob>) -> io::Result<Packed> {
    let verified: Vec<(RelPath, Entry, Option<Vec<u8>>)> = jobs
        .into_par_iter()
        .map(|j| {
            let ok = verify_inline(&j);
            (j.path, j.entry, ok)
        })
        .collect();
    let total: usize = verified
        .iter()
        .map(|(_, _, d)| d.as_ref().map_or(0, Vec::len))
        .sum();
    let mut buf = Vec::with_capacity(total);
    let mut out = Vec::with_capacity(verified.len());
    for (p, mut e, data) in verified {
        match data {
            Some(d) => {
                let off = buf.len() as u64;
                buf.extend_from_slice(&d);
                e.ino = 0; // known once written in place
                out.push((p, Some((e, off))));
            }
            None => out.push((p, None)),
        }
    }
    let mut f = fsx::create_excl(inner.stage.as_fd(), name.as_bytes())?;
    f.write_all(&buf)?;
    Ok(out)
}

/// Stages a rename: a hard link to the committed source, if it holds the declared content.
fn stage_link(
    inner: &Inner,
    src: &RelPath,
    e: Entry,
    name: &str,
    src_entry: Option<Entry>,
) -> io::Result<Option<Entry>> {
    let Some(s) = src_entry
        .filter(|s| kind_of(s) == Some(Kind::File) && s.blake3 == e.blake3 && s.size == e.size)
    else {
        return Ok(None);
    };
    let (dir, sname) = match inner.root.open_parent(src) {
        Ok(x) => x,
        Err(_) => return Ok(None),
    };
    match fsx::linkat(dir.as_fd(), sname, inner.stage.as_fd(), name.as_bytes()) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => return Err(err),
        Err(_) => return Ok(None),
    }
    let st = fsx::lstat_at(inner.stage.as_fd(), name.as_bytes())?;
    match st {
        Some(st) if st.st_size as u64 == s.size => Ok(Some(Entry {
            ino: st.st_ino,
            ..e
        })),
        _ => {
            let _ = fsx::unlinkat(inner.stage.as_fd(), name.as_bytes(), false);
            Ok(None)
        }
    }
}
