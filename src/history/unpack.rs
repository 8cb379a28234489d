//! Writing a snapshot's files into a directory, from the store (`Store::restore`,
//! `restore-backup`) or as they arrive over the network (`agent-gpu restore`, `coordinator
//! restore --to`): confined below the directory like a receiver's workspace (nothing is written
//! through a symlink), every file verified by blake3 before it replaces anything, and each one
//! put in place by a rename, so a restore cut short leaves whole files only (ARCHITECTURE.md,
//! "History"). Owner and extended attributes are written back as a replica writes them
//! (`replication::attrs`): the owner only when running as root, `trusted.*`/`security.*` only
//! then too, and never file capabilities (as setuid bits are never restored).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::disk::fsx::{self, Found, Root};
use crate::history::{HistoryError, RestoreSummary};
use crate::proto::Entry;
use crate::replication::attrs::{self, Reach};
use crate::replication::manifest::{Kind, kind_of};
use crate::text::hex;
use crate::types::RelPath;

/// Why a restore stopped. What was restored before stays; the file being written is dropped.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{0} exists and is not a directory; move it away to restore below it")]
    NotADir(String),
    #[error("{0} is a directory here; move it away to restore the file")]
    IsADir(String),
    #[error("{path}: content does not match the snapshot (blake3 {got}, expected {want})")]
    Mismatch {
        path: String,
        got: String,
        want: String,
    },
    #[error("{path}: {got} bytes arrived for a file of {want}")]
    Size { path: String, got: u64, want: u64 },
    #[error("content arrived with no file to put it in")]
    Stray,
    #[error("{0}: not a file, directory or symlink")]
    Kind(String),
    #[error("{path}: {why}")]
    Attrs { path: String, why: String },
}

impl UnpackError {
    /// The path it is about ("" for content with no file).
    fn path(&self) -> &str {
        match self {
            UnpackError::Io { path, .. }
            | UnpackError::Mismatch { path, .. }
            | UnpackError::Size { path, .. } => path,
            UnpackError::NotADir(p) | UnpackError::IsADir(p) | UnpackError::Kind(p) => p,
            UnpackError::Attrs { path, .. } => path,
            UnpackError::Stray => "",
        }
    }
}

impl From<UnpackError> for HistoryError {
    fn from(e: UnpackError) -> HistoryError {
        match e {
            UnpackError::Io { path, source } => HistoryError::Io {
                what: "restoring",
                path: path.into(),
                source,
            },
            other => HistoryError::Refused {
                path: other.path().to_string(),
                reason: other.to_string(),
            },
        }
    }
}

/// The file being written: its temporary name in its directory, and what it must turn out to be.
struct Open {
    path: RelPath,
    want: Entry,
    dir: OwnedFd,
    tmp: Vec<u8>,
    file: File,
    hasher: blake3::Hasher,
    written: u64,
}

/// Writes a stream of entries, each file followed by its content, below one directory.
pub struct Unpacker {
    root: Root,
    open: Option<Open>,
    done: RestoreSummary,
    /// Directories restored, whose mode and mtime are set last (writing below a directory
    /// changes its mtime).
    dirs: Vec<(RelPath, Entry)>,
}

impl Unpacker {
    /// Unpacks below `to`, which is made if missing.
    pub fn new(to: &Path) -> Result<Unpacker, UnpackError> {
        let io = |source| UnpackError::Io {
            path: to.display().to_string(),
            source,
        };
        std::fs::create_dir_all(to).map_err(io)?;
        Ok(Unpacker {
            root: Root::open(to).map_err(io)?,
            open: None,
            done: RestoreSummary::default(),
            dirs: Vec::new(),
        })
    }

    /// The next path: finishes the file before it, then makes a directory or symlink at once, or
    /// opens a file for the content that follows.
    pub fn entry(&mut self, path: RelPath, e: Entry) -> Result<(), UnpackError> {
        self.close()?;
        if let Some(k) = kind_of(&e) {
            attrs::check(&e, k).map_err(|why| UnpackError::Attrs {
                path: path.to_string(),
                why,
            })?;
        }
        match kind_of(&e) {
            Some(Kind::Dir) => {
                self.dir(&path)?;
                self.done.dirs += 1;
                self.dirs.push((path, e));
                Ok(())
            }
            Some(Kind::Symlink) => self.symlink(&path, &e),
            Some(Kind::File) => self.start(path, e),
            None => Err(UnpackError::Kind(path.to_string())),
        }
    }

    /// Content of the open file.
    pub fn data(&mut self, buf: &[u8]) -> Result<(), UnpackError> {
        let f = self.open.as_mut().ok_or(UnpackError::Stray)?;
        f.written += buf.len() as u64;
        if f.written > f.want.size {
            return Err(UnpackError::Size {
                path: f.path.to_string(),
                got: f.written,
                want: f.want.size,
            });
        }
        f.hasher.update(buf);
        f.file.write_all(buf).map_err(|e| io_err(&f.path, e))
    }

    /// Finishes the last file and gives the directories their mode and mtime, deepest first;
    /// what was restored.
    pub fn finish(mut self) -> Result<RestoreSummary, UnpackError> {
        self.close()?;
        self.dirs.sort_by(|a, b| b.0.cmp(&a.0));
        for (path, e) in &self.dirs {
            let (dir, name) = self.parent(path)?;
            let io = |er| io_err(path, er);
            attrs::chown_at(dir.as_fd(), name, e, fsx::privileged()).map_err(io)?;
            attrs::set_xattrs_at(dir.as_fd(), name, e, reach(), path).map_err(io)?;
            fsx::chmodat(dir.as_fd(), name, e.mode & 0o1777).map_err(io)?;
            fsx::set_mtime_at(dir.as_fd(), name, e.mtime_ns).map_err(io)?;
        }
        Ok(self.done.clone())
    }

    /// Makes directory `path` and any missing parents, one component at a time, never through
    /// a symlink; returns it open.
    fn dir(&self, path: &RelPath) -> Result<OwnedFd, UnpackError> {
        let mut cur = fsx::openat_dir(self.root.fd(), b".").map_err(|e| io_err(path, e))?;
        let mut so_far = Vec::new();
        for comp in path.as_bytes().split(|b| *b == b'/') {
            if !so_far.is_empty() {
                so_far.push(b'/');
            }
            so_far.extend_from_slice(comp);
            let shown = String::from_utf8_lossy(&so_far).into_owned();
            match fsx::found_at(cur.as_fd(), comp).map_err(|e| io_err(path, e))? {
                Found::Dir => {}
                Found::Missing => {
                    fsx::mkdirat(cur.as_fd(), comp, 0o755).map_err(|e| io_err(path, e))?
                }
                _ => return Err(UnpackError::NotADir(shown)),
            }
            cur = fsx::openat_dir(cur.as_fd(), comp).map_err(|e| io_err(path, e))?;
        }
        Ok(cur)
    }

    /// The directory holding `path` (made if missing) and the name in it.
    fn parent<'a>(&self, path: &'a RelPath) -> Result<(OwnedFd, &'a [u8]), UnpackError> {
        let dir = match path.parent() {
            Some(p) => self.dir(&p)?,
            None => fsx::openat_dir(self.root.fd(), b".").map_err(|e| io_err(path, e))?,
        };
        Ok((dir, path.name()))
    }

    fn symlink(&mut self, path: &RelPath, e: &Entry) -> Result<(), UnpackError> {
        let (dir, name) = self.parent(path)?;
        refuse_dir(&dir, name, path)?;
        let tmp = tmp_name(name);
        let _ = fsx::unlinkat(dir.as_fd(), &tmp, false);
        fsx::symlinkat(&e.target, dir.as_fd(), &tmp).map_err(|er| io_err(path, er))?;
        attrs::chown_at(dir.as_fd(), &tmp, e, fsx::privileged()).map_err(|er| io_err(path, er))?;
        fsx::set_mtime_at(dir.as_fd(), &tmp, e.mtime_ns).map_err(|er| io_err(path, er))?;
        fsx::renameat(dir.as_fd(), &tmp, dir.as_fd(), name).map_err(|er| io_err(path, er))?;
        self.done.symlinks += 1;
        Ok(())
    }

    fn start(&mut self, path: RelPath, want: Entry) -> Result<(), UnpackError> {
        let (dir, name) = self.parent(&path)?;
        refuse_dir(&dir, name, &path)?;
        let tmp = tmp_name(name);
        let _ = fsx::unlinkat(dir.as_fd(), &tmp, false);
        let file = fsx::create_excl(dir.as_fd(), &tmp).map_err(|e| io_err(&path, e))?;
        self.open = Some(Open {
            path,
            want,
            dir,
            tmp,
            file,
            hasher: blake3::Hasher::new(),
            written: 0,
        });
        Ok(())
    }

    /// Finishes the open file: complete, verified and durable, it replaces what was there.
    fn close(&mut self) -> Result<(), UnpackError> {
        let Some(f) = self.open.take() else {
            return Ok(());
        };
        let r = finish_file(&f);
        match &r {
            Ok(()) => {
                self.done.files += 1;
                self.done.bytes += f.written;
            }
            Err(_) => {
                let _ = fsx::unlinkat(f.dir.as_fd(), &f.tmp, false);
            }
        }
        r
    }
}

fn finish_file(f: &Open) -> Result<(), UnpackError> {
    if f.written != f.want.size {
        return Err(UnpackError::Size {
            path: f.path.to_string(),
            got: f.written,
            want: f.want.size,
        });
    }
    let got = f.hasher.finalize();
    if got.as_bytes()[..] != f.want.blake3[..] {
        return Err(UnpackError::Mismatch {
            path: f.path.to_string(),
            got: got.to_hex().to_string(),
            want: hex(&f.want.blake3),
        });
    }
    let io = |e| io_err(&f.path, e);
    // Owner first: changing it clears setuid and setgid bits, so the mode comes after.
    attrs::chown_fd(f.file.as_fd(), &f.want, fsx::privileged()).map_err(io)?;
    let inode = crate::disk::xattr::Inode::Fd(f.file.as_fd());
    attrs::set_xattrs(&inode, &f.want, reach(), &f.path).map_err(io)?;
    // RestoreSummary files never regain setuid or setgid bits (they may come from a former host).
    let mode = f.want.mode & 0o1777;
    f.file
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    f.file.sync_all().map_err(io)?;
    fsx::set_mtime_at(f.dir.as_fd(), &f.tmp, f.want.mtime_ns).map_err(io)?;
    fsx::renameat(f.dir.as_fd(), &f.tmp, f.dir.as_fd(), f.path.name()).map_err(io)
}

/// The attributes a restore writes: never file capabilities (setuid bits are never restored
/// either).
fn reach() -> Reach {
    Reach {
        privileged: fsx::privileged(),
        capabilities: false,
    }
}

impl Drop for Unpacker {
    /// A restore cut short (an error, a dropped stream) leaves no temporary file behind.
    fn drop(&mut self) {
        if let Some(f) = self.open.take() {
            let _ = fsx::unlinkat(f.dir.as_fd(), &f.tmp, false);
        }
    }
}

/// A directory where a file or symlink is to go is left alone: the operator moves it.
fn refuse_dir(dir: &OwnedFd, name: &[u8], path: &RelPath) -> Result<(), UnpackError> {
    match fsx::found_at(dir.as_fd(), name).map_err(|e| io_err(path, e))? {
        Found::Dir => Err(UnpackError::IsADir(path.to_string())),
        _ => Ok(()),
    }
}

/// A temporary name beside `name`, short whatever the name's length.
fn tmp_name(name: &[u8]) -> Vec<u8> {
    let h = blake3::hash(name);
    format!(".standby-restore-{}", hex(&h.as_bytes()[..8])).into_bytes()
}

fn io_err(path: &RelPath, source: io::Error) -> UnpackError {
    UnpackError::Io {
        path: path.to_string(),
        source,
    }
}

#[cfg(test)]
mod tests;
