//! Confined filesystem operations below a root directory (Invariant 7).
//!
//! Every operation a receiver performs on its workspace goes through a [`Root`]: the parent of a
//! target is reached by opening one component at a time with `O_NOFOLLOW | O_DIRECTORY`, so a
//! symlink anywhere on the way makes the operation fail instead of escaping the root, whatever
//! was placed in the tree before. Nothing here follows a symlink in the final component either.
//!
//! The system calls go through `rustix` (safe wrappers over the raw calls); names are turned into
//! C strings here so a NUL in a name is refused the same way by every function.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::types::RelPath;

/// What [`lstat_at`] returns: `st_mode`, `st_size`, `st_ino`, `st_mtime`, `st_mtime_nsec`, ...
pub use rustix::fs::Stat;

fn cname(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

/// `openat(dir, name)` that never follows a symlink in `name` and never leaks into a child.
fn open_at(dir: BorrowedFd<'_>, name: &[u8], flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
    let c = cname(name)?;
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::openat(
        dir,
        &c,
        flags,
        Mode::from_raw_mode(mode),
    )?)
}

/// A directory opened as the root of confined operations.
pub struct Root {
    fd: OwnedFd,
}

/// What `lstat` found at a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    Missing,
    File,
    Dir,
    Symlink,
    Other,
}

impl Found {
    pub fn from_mode(mode: u32) -> Found {
        match FileType::from_raw_mode(mode) {
            FileType::RegularFile => Found::File,
            FileType::Directory => Found::Dir,
            FileType::Symlink => Found::Symlink,
            _ => Found::Other,
        }
    }
}

/// Error for a path that would pass through a symlink or a non-directory.
pub fn through_symlink(path: &RelPath) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotADirectory,
        format!("refused: path {path} passes through a symlink or a non-directory"),
    )
}

pub fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let c = cname(path.as_os_str().as_bytes())?;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    Ok(rustix::fs::open(&c, flags, Mode::empty())?)
}

/// Opens `name` inside `dir` as a directory without following a symlink.
pub fn openat_dir(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    open_at(dir, name, OFlags::RDONLY | OFlags::DIRECTORY, 0)
}

/// Opening a FIFO or a device never waits, nor makes a terminal ours.
const NO_WAIT: OFlags = OFlags::NONBLOCK.union(OFlags::NOCTTY);

/// Opens regular file `name` inside `dir` for reading, without following a symlink (nor
/// blocking, should a FIFO or device have been put there: callers check the kind with `fstat`).
pub fn openat_file(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<File> {
    Ok(open_at(dir, name, OFlags::RDONLY | NO_WAIT, 0)?.into())
}

/// Opens existing regular file `name` inside `dir` for writing in place, without following a
/// symlink (nor blocking, as [`openat_file`]).
pub fn openat_write(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<File> {
    Ok(open_at(dir, name, OFlags::WRONLY | NO_WAIT, 0)?.into())
}

/// Creates or truncates regular file `name` inside `dir` for writing (never through a symlink).
pub fn create_trunc(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<File> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC;
    Ok(open_at(dir, name, flags, mode & 0o777)?.into())
}

/// Creates `name` inside `dir` exclusively, for reading and writing, mode 0600.
pub fn create_excl(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<File> {
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL;
    Ok(open_at(dir, name, flags, 0o600)?.into())
}

pub fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<Stat>> {
    let c = cname(name)?;
    match rustix::fs::statat(dir, &c, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn found_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Found> {
    Ok(match lstat_at(dir, name)? {
        None => Found::Missing,
        Some(st) => Found::from_mode(st.st_mode),
    })
}

pub fn renameat(
    from_dir: BorrowedFd<'_>,
    from: &[u8],
    to_dir: BorrowedFd<'_>,
    to: &[u8],
) -> io::Result<()> {
    let (f, t) = (cname(from)?, cname(to)?);
    Ok(rustix::fs::renameat(from_dir, &f, to_dir, &t)?)
}

pub fn linkat(
    from_dir: BorrowedFd<'_>,
    from: &[u8],
    to_dir: BorrowedFd<'_>,
    to: &[u8],
) -> io::Result<()> {
    let (f, t) = (cname(from)?, cname(to)?);
    Ok(rustix::fs::linkat(
        from_dir,
        &f,
        to_dir,
        &t,
        AtFlags::empty(),
    )?)
}

pub fn symlinkat(target: &[u8], dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let (t, n) = (cname(target)?, cname(name)?);
    Ok(rustix::fs::symlinkat(&t, dir, &n)?)
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let n = cname(name)?;
    Ok(rustix::fs::mkdirat(dir, &n, Mode::from_raw_mode(mode))?)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &[u8], is_dir: bool) -> io::Result<()> {
    let n = cname(name)?;
    let flags = if is_dir {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    Ok(rustix::fs::unlinkat(dir, &n, flags)?)
}

/// Sets permission bits of `name` inside `dir`. A symlink there is refused (`EOPNOTSUPP`), never
/// followed: a symlink planted where a file was expected must not carry the change outside the
/// root. Linux's `fchmodat` has no `AT_SYMLINK_NOFOLLOW` (rustix refuses the flag outright), so
/// this does what glibc and musl do for it: open the name itself with `O_PATH | O_NOFOLLOW`,
/// refuse a symlink, and change the mode of exactly that inode through `/proc/self/fd`.
pub fn chmodat(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let inode = open_at(dir, name, OFlags::PATH, 0)?;
    if FileType::from_raw_mode(rustix::fs::fstat(&inode)?.st_mode) == FileType::Symlink {
        return Err(Errno::OPNOTSUPP.into());
    }
    let by_fd = format!("/proc/self/fd/{}", inode.as_raw_fd());
    match rustix::fs::chmod(by_fd.as_str(), Mode::from_raw_mode(mode)) {
        // No /proc: glibc answers the same.
        Err(Errno::NOENT) => Err(Errno::OPNOTSUPP.into()),
        r => Ok(r?),
    }
}

/// Sets the numeric owner and group of `name` inside `dir` (of a symlink itself, never its
/// target: `AT_SYMLINK_NOFOLLOW`). Changing the owner clears setuid and setgid bits: callers
/// set the mode after it.
pub fn chownat(
    dir: BorrowedFd<'_>,
    name: &[u8],
    uid: Option<u32>,
    gid: Option<u32>,
) -> io::Result<()> {
    let n = cname(name)?;
    // `u32::MAX` would mean "leave unchanged" to the kernel; callers refuse it before here.
    let uid = uid
        .filter(|u| *u != u32::MAX)
        .map(rustix::fs::Uid::from_raw);
    let gid = gid
        .filter(|g| *g != u32::MAX)
        .map(rustix::fs::Gid::from_raw);
    Ok(rustix::fs::chownat(
        dir,
        &n,
        uid,
        gid,
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Sets the numeric owner and group of an open file (see [`chownat`]).
pub fn fchown(f: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let uid = uid
        .filter(|u| *u != u32::MAX)
        .map(rustix::fs::Uid::from_raw);
    let gid = gid
        .filter(|g| *g != u32::MAX)
        .map(rustix::fs::Gid::from_raw);
    Ok(rustix::fs::fchown(f, uid, gid)?)
}

/// Whether this process may give files any owner and write `trusted.*` attributes (effective
/// uid 0), as `rsync` decides whether to carry ownership.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Sets the modification time of `name` inside `dir` (of a symlink itself, never its target).
/// The access time is set to the same value.
pub fn set_mtime_at(dir: BorrowedFd<'_>, name: &[u8], mtime_ns: i64) -> io::Result<()> {
    let n = cname(name)?;
    let ts = Timespec {
        tv_sec: mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: mtime_ns.rem_euclid(1_000_000_000),
    };
    let times = Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    Ok(rustix::fs::utimensat(
        dir,
        &n,
        &times,
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Removes `name` inside `dir` and everything below it, never following a symlink.
pub fn remove_tree_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    match found_at(dir, name)? {
        Found::Missing => return Ok(()),
        Found::Dir => {}
        _ => return unlinkat(dir, name, false),
    }
    let sub = openat_dir(dir, name)?;
    for child in list_dir(sub.as_fd())? {
        remove_tree_at(sub.as_fd(), &child)?;
    }
    drop(sub);
    unlinkat(dir, name, true)
}

/// Names in a directory (without `.` and `..`).
pub fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    // A directory stream owns the descriptor it reads: hand it a duplicate, rewound, since a
    // duplicate shares its position with `dir`.
    let mut entries = rustix::fs::Dir::new(rustix::io::fcntl_dupfd_cloexec(dir, 0)?)?;
    entries.rewind();
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

/// Flushes the whole filesystem holding `fd` (data, metadata and directory entries).
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::fs::syncfs(fd)?)
}

/// Starts write-back of a byte range without waiting, so a later sync has less to do.
pub fn start_writeback(f: &File, offset: u64, len: u64) {
    // rustix has no `sync_file_range`. A hint only: its result is of no use to the caller.
    // SAFETY: a plain system call on a descriptor `f` keeps open; no memory is passed.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Copies `len` bytes at `from` in `src` to `to` in `dst` inside the kernel (`copy_file_range`):
/// no trip through user space, and on filesystems that share extents (XFS with reflink, btrfs,
/// bcachefs, NFS 4.2 server-side copy) whole aligned blocks are shared instead of written. ext4
/// copies the data (through the page cache). Where the call is not supported, the bytes are read
/// and written here.
pub fn copy_range(src: &File, mut from: u64, dst: &File, mut to: u64, len: u64) -> io::Result<()> {
    let end = from
        .checked_add(len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?;
    while from < end {
        let want = (end - from).min(1 << 30) as usize;
        match rustix::fs::copy_file_range(src, Some(&mut from), dst, Some(&mut to), want) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e) if e == rustix::io::Errno::INTR => {}
            Err(e)
                if [
                    rustix::io::Errno::XDEV,
                    rustix::io::Errno::INVAL,
                    rustix::io::Errno::NOSYS,
                    rustix::io::Errno::OPNOTSUPP,
                ]
                .contains(&e) =>
            {
                return copy_through(src, from, dst, to, end - from);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether the filesystem holding `f` can share extents between files (reflink), so that
/// `copy_range` of whole blocks at the same offset within a block writes no data: btrfs, XFS
/// (when made with reflink, the default since xfsprogs 5.1), bcachefs. Elsewhere (ext4, tmpfs)
/// the kernel copies the bytes through the page cache.
pub fn shares_extents(f: &File) -> bool {
    const BTRFS: u32 = 0x9123_683e;
    const XFS: u32 = 0x5846_5342;
    const BCACHEFS: u32 = 0xca45_1a4e;
    // The magic numbers are 32 bits; `f_type`'s own type differs between architectures.
    rustix::fs::fstatfs(f).is_ok_and(|s| [BTRFS, XFS, BCACHEFS].contains(&(s.f_type as u32)))
}

/// `copy_range` through a buffer, for where the kernel will not copy.
fn copy_through(src: &File, from: u64, dst: &File, to: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; (len as usize).min(1 << 20)];
    let mut done = 0;
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], from + done)?;
        dst.write_all_at(&buf[..n], to + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let c = cname(path.as_os_str().as_bytes())?;
    let s = rustix::fs::statvfs(c.as_c_str())?;
    Ok(s.f_bavail * s.f_frsize)
}

/// The size of the filesystem holding `path`, in bytes.
pub fn filesystem_bytes(path: &Path) -> io::Result<u64> {
    let c = cname(path.as_os_str().as_bytes())?;
    let s = rustix::fs::statvfs(c.as_c_str())?;
    Ok(s.f_blocks * s.f_frsize)
}

impl Root {
    pub fn open(path: &Path) -> io::Result<Root> {
        Ok(Root {
            fd: open_dir_path(path)?,
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens directory `rel` (every component a real directory).
    pub fn open_dir(&self, rel: &RelPath) -> io::Result<OwnedFd> {
        let mut cur = openat_dir(self.fd(), b".")?;
        for comp in rel.as_bytes().split(|b| *b == b'/') {
            cur = openat_dir(cur.as_fd(), comp).map_err(|e| match Errno::from_io_error(&e) {
                Some(Errno::LOOP | Errno::NOTDIR) => through_symlink(rel),
                _ => e,
            })?;
        }
        Ok(cur)
    }

    /// Opens the parent directory of `rel`; returns it with the last component.
    pub fn open_parent<'a>(&self, rel: &'a RelPath) -> io::Result<(OwnedFd, &'a [u8])> {
        let dir = match rel.parent() {
            Some(p) => self.open_dir(&p)?,
            None => openat_dir(self.fd(), b".")?,
        };
        Ok((dir, rel.name()))
    }

    /// What is at `rel`, or `Missing` also when a parent is missing.
    pub fn found(&self, rel: &RelPath) -> io::Result<Found> {
        match self.open_parent(rel) {
            Ok((dir, name)) => found_at(dir.as_fd(), name),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Found::Missing),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn copy_range_copies_any_range_and_refuses_what_is_not_there() {
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 249) as u8).collect();
        std::fs::write(d.path().join("src"), &data).unwrap();
        let src = File::open(d.path().join("src")).unwrap();
        let dst = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(d.path().join("dst"))
            .unwrap();
        // Unaligned both sides, as after an insertion of 100 bytes.
        copy_range(&src, 7, &dst, 107, 2_999_000).unwrap();
        copy_range(&src, 0, &dst, 0, 7).unwrap();
        let out = std::fs::read(d.path().join("dst")).unwrap();
        assert_eq!(&out[..7], &data[..7]);
        assert_eq!(&out[107..], &data[7..2_999_007]);
        assert!(
            copy_range(&src, 2_999_999, &dst, 0, 2).is_err(),
            "past the end"
        );
        assert!(copy_range(&src, u64::MAX, &dst, 0, 2).is_err(), "overflow");
        // ext4 and tmpfs, where tests run, share no extents.
        let fs = rustix::fs::fstatfs(&src).unwrap().f_type as u32;
        if [0xef53, 0x0102_1994].contains(&fs) {
            assert!(!shares_extents(&src));
        }
    }

    #[test]
    fn refuses_paths_through_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("real")).unwrap();
        symlink(outside.path(), d.path().join("link")).unwrap();
        let root = Root::open(d.path()).unwrap();
        let p = RelPath::new("link/evil").unwrap();
        let err = root.open_parent(&p).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        let ok = RelPath::new("real/file").unwrap();
        let (dir, name) = root.open_parent(&ok).unwrap();
        let mut f = create_excl(dir.as_fd(), name).unwrap();
        io::Write::write_all(&mut f, b"x").unwrap();
        assert!(d.path().join("real/file").exists());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn remove_tree_does_not_follow_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        std::fs::create_dir_all(d.path().join("t/sub")).unwrap();
        std::fs::write(d.path().join("t/sub/f"), b"x").unwrap();
        symlink(outside.path(), d.path().join("t/link")).unwrap();
        let root = Root::open(d.path()).unwrap();
        remove_tree_at(root.fd(), b"t").unwrap();
        assert!(!d.path().join("t").exists());
        assert!(outside.path().join("keep").exists());
    }

    #[test]
    fn chmod_refuses_symlinks() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("t");
        std::fs::write(&target, b"x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        symlink(&target, d.path().join("l")).unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let root = Root::open(d.path()).unwrap();
        assert!(chmodat(root.fd(), b"l", 0o777).is_err());
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&target), 0o600);
        chmodat(root.fd(), b"f", 0o640).unwrap();
        assert_eq!(mode(&d.path().join("f")), 0o640);
    }

    #[test]
    fn mtime_of_symlink_itself() {
        let d = tempfile::tempdir().unwrap();
        symlink("nowhere", d.path().join("l")).unwrap();
        let root = Root::open(d.path()).unwrap();
        set_mtime_at(root.fd(), b"l", 1_234_567_890_123_456_789).unwrap();
        let st = lstat_at(root.fd(), b"l").unwrap().unwrap();
        assert_eq!(st.st_mtime, 1_234_567_890);
        assert_eq!(st.st_mtime_nsec, 123_456_789);
    }
}
