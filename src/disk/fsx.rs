//! Confined filesystem operations below a root directory (Invariant 7).
//!
//! Every operation a receiver performs on its workspace goes through a [`Root`]: the parent of a
//! target is reached by opening one component at a time with `O_NOFOLLOW | O_DIRECTORY`, so a
//! symlink anywhere on the way makes the operation fail instead of escaping the root, whatever
//! was placed in the tree before. Nothing here follows a symlink in the final component either.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::types::RelPath;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cname(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
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
    pub fn from_mode(mode: libc::mode_t) -> Found {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Found::File,
            libc::S_IFDIR => Found::Dir,
            libc::S_IFLNK => Found::Symlink,
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
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `name` inside `dir` as a directory without following a symlink.
pub fn openat_dir(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    let c = cname(name)?;
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens regular file `name` inside `dir` for reading, without following a symlink.
pub fn openat_file(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<File> {
    let c = cname(name)?;
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Opens existing regular file `name` inside `dir` for writing in place, without following a
/// symlink.
pub fn openat_write(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<File> {
    let c = cname(name)?;
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Creates or truncates regular file `name` inside `dir` for writing (never through a symlink).
pub fn create_trunc(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<File> {
    let c = cname(name)?;
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            (mode & 0o777) as libc::c_uint,
        )
    })?;
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Creates `name` inside `dir` exclusively, for reading and writing, mode 0600.
pub fn create_excl(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<File> {
    let c = cname(name)?;
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    })?;
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<libc::stat>> {
    let c = cname(name)?;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(st))
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
    cvt(unsafe {
        libc::renameat(
            from_dir.as_raw_fd(),
            f.as_ptr(),
            to_dir.as_raw_fd(),
            t.as_ptr(),
        )
    })
    .map(drop)
}

pub fn linkat(
    from_dir: BorrowedFd<'_>,
    from: &[u8],
    to_dir: BorrowedFd<'_>,
    to: &[u8],
) -> io::Result<()> {
    let (f, t) = (cname(from)?, cname(to)?);
    cvt(unsafe {
        libc::linkat(
            from_dir.as_raw_fd(),
            f.as_ptr(),
            to_dir.as_raw_fd(),
            t.as_ptr(),
            0,
        )
    })
    .map(drop)
}

pub fn symlinkat(target: &[u8], dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let (t, n) = (cname(target)?, cname(name)?);
    cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), n.as_ptr()) }).map(drop)
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let n = cname(name)?;
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), n.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &[u8], is_dir: bool) -> io::Result<()> {
    let n = cname(name)?;
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), n.as_ptr(), flags) }).map(drop)
}

/// Sets permission bits of `name` inside `dir`. A symlink there is refused (`EOPNOTSUPP`), never
/// followed: a symlink planted where a file was expected must not carry the change outside the
/// root. (glibc and musl do this through an `O_PATH` descriptor and `/proc/self/fd`.)
pub fn chmodat(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let n = cname(name)?;
    cvt(unsafe {
        libc::fchmodat(
            dir.as_raw_fd(),
            n.as_ptr(),
            mode as libc::mode_t,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// Sets the modification time of `name` inside `dir` (of a symlink itself, never its target).
/// The access time is set to the same value.
pub fn set_mtime_at(dir: BorrowedFd<'_>, name: &[u8], mtime_ns: i64) -> io::Result<()> {
    let n = cname(name)?;
    let ts = libc::timespec {
        tv_sec: mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: mtime_ns.rem_euclid(1_000_000_000),
    };
    let times = [ts, ts];
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            n.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
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
    // fdopendir takes ownership of the descriptor it is given: hand it a duplicate.
    let dup = cvt(unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    let dp = unsafe { libc::fdopendir(dup) };
    if dp.is_null() {
        let e = io::Error::last_os_error();
        unsafe { libc::close(dup) };
        return Err(e);
    }
    unsafe { libc::rewinddir(dp) };
    let mut names = Vec::new();
    loop {
        let ent = unsafe { libc::readdir(dp) };
        if ent.is_null() {
            break;
        }
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    unsafe { libc::closedir(dp) };
    Ok(names)
}

/// Flushes the whole filesystem holding `fd` (data, metadata and directory entries).
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

/// Starts write-back of a byte range without waiting, so a later sync has less to do.
pub fn start_writeback(f: &File, offset: u64, len: u64) {
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let c = cname(path.as_os_str().as_bytes())?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::statvfs(c.as_ptr(), &mut s) })?;
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
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
            cur = openat_dir(cur.as_fd(), comp).map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::ENOTDIR) => through_symlink(rel),
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
