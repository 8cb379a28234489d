//! Extended attributes at the system-call level (ARCHITECTURE.md, "Ownership and extended
//! attributes"). What is carried and the limits are the replication layer's business
//! (`replication::attrs`); this module only reads and writes them.
//!
//! Reading (a sender's scan of its own workspace) goes by path with the `l*` calls, so a symlink
//! is never followed. Writing (a receiver) goes through an [`Inode`]: an open descriptor of a
//! file being staged, or one inode reached by name inside a confined directory with
//! `O_PATH | O_NOFOLLOW` and used through `/proc/self/fd` (as [`fsx::chmodat`] does), so a
//! symlink planted in the replica is refused, never followed.
//!
//! [`fsx::chmodat`]: super::fsx::chmodat

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{FileType, OFlags, XattrFlags};
use rustix::io::Errno;

/// How often a list or value that grew between its size query and its read is asked again.
const RETRIES: usize = 4;

fn cname(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

/// Splits a `listxattr` answer (names each ended by a NUL) into names.
fn split_names(buf: &[u8]) -> Vec<Vec<u8>> {
    buf.split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// Reads with a size query first; a buffer that turned out too small (`ERANGE`: the thing grew
/// in between) is sized again.
fn sized_read(
    query: impl Fn() -> rustix::io::Result<usize>,
    read: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    let mut last = Errno::RANGE;
    for _ in 0..RETRIES {
        let n = query()?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; n];
        match read(&mut buf) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf);
            }
            Err(Errno::RANGE) => last = Errno::RANGE,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// The names of `path`'s extended attributes (of a symlink itself, never its target).
/// `Ok(None)` when the filesystem keeps none (`ENOTSUP`).
pub fn list_path(path: &Path) -> io::Result<Option<Vec<Vec<u8>>>> {
    let p = cname(path.as_os_str().as_bytes())?;
    let r = sized_read(
        || rustix::fs::llistxattr_query(p.as_c_str()),
        |buf| rustix::fs::llistxattr(p.as_c_str(), buf),
    );
    match r {
        Ok(buf) => Ok(Some(split_names(&buf))),
        Err(Errno::NOTSUP) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The value of `name` on `path` (a symlink itself, never its target); `None` when it is gone.
pub fn get_path(path: &Path, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let p = cname(path.as_os_str().as_bytes())?;
    let n = cname(name)?;
    let r = sized_read(
        || rustix::fs::lgetxattr_query(p.as_c_str(), n.as_c_str()),
        |buf| rustix::fs::lgetxattr(p.as_c_str(), n.as_c_str(), buf),
    );
    match r {
        Ok(v) => Ok(Some(v)),
        Err(Errno::NODATA) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// One file or directory whose extended attributes are written.
pub enum Inode<'a> {
    /// An open descriptor (a file being staged, written from a pack).
    Fd(BorrowedFd<'a>),
    /// An inode reached by name (never a symlink), used through `/proc/self/fd`.
    Path { _fd: OwnedFd, by_fd: String },
}

impl Inode<'_> {
    /// Opens `name` inside `dir` itself (`O_PATH | O_NOFOLLOW`); a symlink there is refused
    /// (`EOPNOTSUPP`) so that nothing is written through it.
    pub fn at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Inode<'static>> {
        let n = cname(name)?;
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(dir, n.as_c_str(), flags, rustix::fs::Mode::empty())?;
        if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) == FileType::Symlink {
            return Err(Errno::OPNOTSUPP.into());
        }
        let by_fd = format!("/proc/self/fd/{}", fd.as_raw_fd());
        Ok(Inode::Path { _fd: fd, by_fd })
    }

    /// The names of its extended attributes (`None`: the filesystem keeps none).
    pub fn names(&self) -> io::Result<Option<Vec<Vec<u8>>>> {
        let r = match self {
            Inode::Fd(fd) => sized_read(
                || rustix::fs::flistxattr_query(fd),
                |buf| rustix::fs::flistxattr(fd, buf),
            ),
            Inode::Path { by_fd, .. } => sized_read(
                || rustix::fs::listxattr_query(by_fd.as_str()),
                |buf| rustix::fs::listxattr(by_fd.as_str(), buf),
            ),
        };
        match r {
            Ok(buf) => Ok(Some(split_names(&buf))),
            Err(Errno::NOTSUP) => Ok(None),
            Err(e) => Err(no_proc(e)),
        }
    }

    /// The value of `name`, `None` when absent.
    pub fn get(&self, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let n = cname(name)?;
        let r = match self {
            Inode::Fd(fd) => sized_read(
                || rustix::fs::fgetxattr_query(fd, n.as_c_str()),
                |buf| rustix::fs::fgetxattr(fd, n.as_c_str(), buf),
            ),
            Inode::Path { by_fd, .. } => sized_read(
                || rustix::fs::getxattr_query(by_fd.as_str(), n.as_c_str()),
                |buf| rustix::fs::getxattr(by_fd.as_str(), n.as_c_str(), buf),
            ),
        };
        match r {
            Ok(v) => Ok(Some(v)),
            Err(Errno::NODATA) => Ok(None),
            Err(e) => Err(no_proc(e)),
        }
    }

    pub fn set(&self, name: &[u8], value: &[u8]) -> io::Result<()> {
        let n = cname(name)?;
        let r = match self {
            Inode::Fd(fd) => rustix::fs::fsetxattr(fd, n.as_c_str(), value, XattrFlags::empty()),
            Inode::Path { by_fd, .. } => {
                rustix::fs::setxattr(by_fd.as_str(), n.as_c_str(), value, XattrFlags::empty())
            }
        };
        r.map_err(no_proc)
    }

    /// Removes `name`; one already absent is not an error.
    pub fn remove(&self, name: &[u8]) -> io::Result<()> {
        let n = cname(name)?;
        let r = match self {
            Inode::Fd(fd) => rustix::fs::fremovexattr(fd, n.as_c_str()),
            Inode::Path { by_fd, .. } => rustix::fs::removexattr(by_fd.as_str(), n.as_c_str()),
        };
        match r {
            Ok(()) | Err(Errno::NODATA) => Ok(()),
            Err(e) => Err(no_proc(e)),
        }
    }
}

/// Without `/proc` the descriptor path does not resolve: say "not supported", as glibc does.
fn no_proc(e: Errno) -> io::Error {
    if e == Errno::NOENT {
        Errno::OPNOTSUPP.into()
    } else {
        e.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// `user.*` attributes need a filesystem that keeps them (tmpfs does since Linux 6.6).
    fn supported(dir: &Path) -> bool {
        let f = dir.join(".probe");
        std::fs::write(&f, b"").unwrap();
        let root = crate::disk::fsx::Root::open(dir).unwrap();
        let ok = Inode::at(root.fd(), b".probe")
            .and_then(|i| i.set(b"user.probe", b"1"))
            .is_ok();
        std::fs::remove_file(f).unwrap();
        ok
    }

    #[test]
    fn set_list_get_remove_and_symlinks_refused() {
        let d = tempfile::tempdir().unwrap();
        if !supported(d.path()) {
            eprintln!("skipped: the temporary directory's filesystem keeps no user.* xattrs");
            return;
        }
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("t"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("t"), d.path().join("l")).unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let root = crate::disk::fsx::Root::open(d.path()).unwrap();
        assert!(Inode::at(root.fd(), b"l").is_err(), "a symlink is refused");
        let i = Inode::at(root.fd(), b"f").unwrap();
        i.set(b"user.a", b"one").unwrap();
        i.set(b"user.b", b"").unwrap();
        let mut names = list_path(&d.path().join("f")).unwrap().unwrap();
        names.sort();
        assert_eq!(names, vec![b"user.a".to_vec(), b"user.b".to_vec()]);
        assert_eq!(
            get_path(&d.path().join("f"), b"user.a").unwrap().unwrap(),
            b"one"
        );
        assert_eq!(i.get(b"user.b").unwrap().unwrap(), b"");
        i.remove(b"user.a").unwrap();
        i.remove(b"user.a").unwrap();
        assert_eq!(i.get(b"user.a").unwrap(), None);
        let f = std::fs::File::open(d.path().join("f")).unwrap();
        let by_fd = Inode::Fd(f.as_fd());
        assert_eq!(by_fd.names().unwrap().unwrap(), vec![b"user.b".to_vec()]);
        assert!(
            list_path(&outside.path().join("t"))
                .unwrap()
                .unwrap()
                .is_empty(),
            "nothing reached the symlink's target"
        );
    }
}
