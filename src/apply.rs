//! Carrying out a committed generation on the workspace (the roll-forward of the journal).
//!
//! [`apply_record`] is idempotent: it may be interrupted at any instant and run again, at
//! start-up, until it completes; the result is always exactly the committed generation. It
//! relies on three facts: a staged file is renamed at most once (a missing stage file means the
//! rename happened); a removal only removes what has the kind the record says was there (so a
//! path already replaced by the new kind is left alone); and metadata is set to absolute values.
//! Every path is reached through [`fsx::Root`], so a symlink planted anywhere in the tree can
//! neither be followed nor written through.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use crate::fsx::{self, Found, Root};
use crate::manifest::{Kind, Manifest, kind_of};
use crate::proto::state::Record;
use crate::types::RelPath;

fn found_is(found: Found, kind: Kind) -> bool {
    matches!(
        (found, kind),
        (Found::File, Kind::File) | (Found::Dir, Kind::Dir) | (Found::Symlink, Kind::Symlink)
    )
}

fn context(e: io::Error, what: &str, p: &RelPath) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {p}: {e}"))
}

/// Applies `rec` to the workspace under `root`. `manifest` is the manifest *after* the record
/// (directory metadata is taken from it). `stage` is the stage directory.
pub fn apply_record(
    root: &Root,
    stage: BorrowedFd<'_>,
    rec: &Record,
    manifest: &Manifest,
) -> io::Result<()> {
    let mut changes = Vec::with_capacity(rec.changes.len());
    for c in &rec.changes {
        let p = RelPath::new(c.path.to_vec())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("record: {e}")))?;
        changes.push((p, c));
    }

    // 1. Removals, deepest first: deletions and the old side of a change of kind.
    let mut removals: Vec<(&RelPath, Kind)> = changes
        .iter()
        .filter_map(|(p, c)| {
            let old = Kind::from_proto(c.old_kind)?;
            let new = c.entry.as_ref().and_then(kind_of);
            (new != Some(old)).then_some((p, old))
        })
        .collect();
    removals.sort_by_key(|(p, _)| std::cmp::Reverse(p.depth()));
    for (p, old) in removals {
        let (dir, name) = match root.open_parent(p) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(context(e, "remove", p)),
        };
        if found_is(fsx::found_at(dir.as_fd(), name)?, old) {
            let r = if old == Kind::Dir {
                fsx::remove_tree_at(dir.as_fd(), name)
            } else {
                fsx::unlinkat(dir.as_fd(), name, false)
            };
            r.map_err(|e| context(e, "remove", p))?;
        }
    }

    // 2. New directories, shallowest first (private until their metadata is set in step 5).
    let mut dirs: Vec<&RelPath> = changes
        .iter()
        .filter(|(_, c)| c.entry.as_ref().and_then(kind_of) == Some(Kind::Dir))
        .map(|(p, _)| p)
        .collect();
    dirs.sort_by_key(|p| p.depth());
    for p in &dirs {
        let (dir, name) = root
            .open_parent(p)
            .map_err(|e| context(e, "create directory", p))?;
        match fsx::found_at(dir.as_fd(), name)? {
            Found::Dir => {}
            Found::Missing => fsx::mkdirat(dir.as_fd(), name, 0o700)
                .map_err(|e| context(e, "create directory", p))?,
            other => {
                return Err(io::Error::other(format!(
                    "create directory {p}: a {other:?} is in the way"
                )));
            }
        }
    }

    // 3. Staged content into place.
    for (p, c) in &changes {
        if c.stage.is_empty() {
            continue;
        }
        if fsx::lstat_at(stage, c.stage.as_bytes())?.is_none() {
            continue; // renamed by an earlier, interrupted run
        }
        let (dir, name) = root.open_parent(p).map_err(|e| context(e, "place", p))?;
        fsx::renameat(stage, c.stage.as_bytes(), dir.as_fd(), name)
            .map_err(|e| context(e, "place", p))?;
    }

    // 4. Metadata of files and symlinks that were linked or kept rather than staged fresh.
    for (p, c) in &changes {
        let Some(e) = &c.entry else { continue };
        let kind = kind_of(e);
        if !c.set_meta || kind == Some(Kind::Dir) {
            continue;
        }
        let (dir, name) = root
            .open_parent(p)
            .map_err(|e| context(e, "set metadata of", p))?;
        if kind != Some(Kind::Symlink) {
            fsx::chmodat(dir.as_fd(), name, e.mode).map_err(|er| context(er, "chmod", p))?;
        }
        fsx::set_mtime_at(dir.as_fd(), name, e.mtime_ns)
            .map_err(|er| context(er, "set mtime of", p))?;
    }

    // 5. Directory metadata, deepest first: every changed directory and every parent of a
    //    changed path (its mtime moved when entries were added or removed).
    let mut touched: BTreeSet<RelPath> = BTreeSet::new();
    for (p, c) in &changes {
        if c.entry.as_ref().and_then(kind_of) == Some(Kind::Dir) {
            touched.insert(p.clone());
        }
        if let Some(parent) = p.parent() {
            touched.insert(parent);
        }
    }
    let mut touched: Vec<RelPath> = touched.into_iter().collect();
    touched.sort_by_key(|p| std::cmp::Reverse(p.depth()));
    for p in &touched {
        let Some(e) = manifest.get(p) else { continue };
        if kind_of(e) != Some(Kind::Dir) {
            continue;
        }
        let (dir, name) = match root.open_parent(p) {
            Ok(x) => x,
            Err(er) if er.kind() == io::ErrorKind::NotFound => continue,
            Err(er) => return Err(context(er, "set metadata of", p)),
        };
        if fsx::found_at(dir.as_fd(), name)? != Found::Dir {
            continue;
        }
        fsx::chmodat(dir.as_fd(), name, e.mode).map_err(|er| context(er, "chmod", p))?;
        fsx::set_mtime_at(dir.as_fd(), name, e.mtime_ns)
            .map_err(|er| context(er, "set mtime of", p))?;
    }
    Ok(())
}

/// Up to this many files or directories are fsynced one by one; beyond it, `syncfs` flushes the
/// whole filesystem in one go (cheaper for big generations, but it also flushes unrelated dirty
/// data, which small generations should not wait for).
const FSYNC_EACH_MAX: usize = 32;

/// Makes the staged content of `rec` durable (before its record is written).
pub fn sync_staged(stage: BorrowedFd<'_>, rec: &Record) -> io::Result<()> {
    let staged: Vec<&str> = rec
        .changes
        .iter()
        .filter(|c| !c.stage.is_empty())
        .map(|c| c.stage.as_str())
        .collect();
    if staged.len() > FSYNC_EACH_MAX {
        return fsx::syncfs(stage);
    }
    for name in staged {
        match fsx::openat_file(stage, name.as_bytes()) {
            Ok(f) => f.sync_all()?,
            // A staged symlink cannot be opened; its directory entry is synced below.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {}
            Err(e) => return Err(e),
        }
    }
    File::from(fsx::openat_dir(stage, b".")?).sync_all()
}

/// Makes an applied record durable: every directory it touched that still exists (as a
/// directory in `manifest`, the manifest after the record), and the workspace root.
pub fn sync_applied(root: &Root, rec: &Record, manifest: &Manifest) -> io::Result<()> {
    let mut dirs: BTreeSet<Option<RelPath>> = BTreeSet::new();
    for c in &rec.changes {
        let Ok(p) = RelPath::new(c.path.to_vec()) else {
            continue;
        };
        if c.entry.as_ref().and_then(kind_of) == Some(Kind::Dir) {
            dirs.insert(Some(p.clone()));
        }
        dirs.insert(p.parent());
        if dirs.len() > FSYNC_EACH_MAX {
            return fsx::syncfs(root.fd());
        }
    }
    for d in dirs {
        let fd = match &d {
            None => fsx::openat_dir(root.fd(), b".")?,
            Some(p) if manifest.get(p).and_then(kind_of) == Some(Kind::Dir) => root.open_dir(p)?,
            Some(_) => continue, // removed, or no longer a directory
        };
        File::from(fd).sync_all()?;
    }
    Ok(())
}

/// Removes everything in the stage directory (leftovers of generations that never committed).
pub fn clear_stage(stage: BorrowedFd<'_>) -> io::Result<usize> {
    let names = fsx::list_dir(stage)?;
    for n in &names {
        fsx::remove_tree_at(stage, n)?;
    }
    Ok(names.len())
}
