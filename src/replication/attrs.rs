//! Ownership and extended attributes: which are carried, their limits, reading them when a
//! sender scans and writing them on a replica (ARCHITECTURE.md, "Ownership and extended
//! attributes").
//!
//! As `rsync -aX` does: numeric owner and group always travel; a receiver running as root
//! (euid 0) applies them, any other leaves its own. Extended attributes travel for files and
//! directories (Linux keeps no `user.*` ones on symlinks): `user.*` always; `trusted.*` and
//! `security.*` when the side is privileged, except `security.selinux` (the receiving host's
//! policy labels its own files) and, unless setuid bits are kept (`--keep-setuid`),
//! `security.capability` (file capabilities are privileges, masked like setuid). `system.*`
//! (POSIX ACLs) is not carried: ACLs are `rsync -A`'s business and mirror the mode bits.
//!
//! Cost: owner and group come with the `lstat` the scan makes anyway. Attributes are read again
//! only when the inode or its change time differs from the index (chown, chmod, setxattr and
//! every write move the change time; mtime does not), so an unchanged tree costs no
//! `listxattr` per file on a rescan. A change time within [`RACY_WINDOW_NS`] of the read is not
//! trusted (recorded as 0: read again next time), as racily clean content is re-hashed.
//!
//! A value from the network is checked by [`check`] before anything is written: limits below,
//! names in the three namespaces, sorted and unique, no NUL, and no owner `u32::MAX` (which the
//! kernel reads as "unchanged").

use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;

use rayon::prelude::*;

use crate::disk::fsx;
use crate::disk::xattr::{self, Inode};
use crate::proto::{Entry, Xattr, Xattrs};
use crate::replication::manifest::{Kind, Manifest};
use crate::replication::scan::{RACY_WINDOW_NS, Walk};

/// Most extended attributes one entry may carry.
pub const MAX_XATTRS: usize = 64;
/// Longest name (Linux's `XATTR_NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Largest value, and largest sum of names and values of one entry (`XATTR_SIZE_MAX`).
pub const VALUE_MAX: usize = 64 << 10;

/// Namespaces that may travel at all.
const NAMESPACES: [&[u8]; 3] = [b"user.", b"trusted.", b"security."];

/// Which attributes one side reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reach {
    /// `trusted.*` and `security.*` too (euid 0).
    pub privileged: bool,
    /// `security.capability` too.
    pub capabilities: bool,
}

impl Reach {
    /// A sender's reach: what this process can read.
    pub fn sender() -> Reach {
        Reach {
            privileged: fsx::privileged(),
            capabilities: true,
        }
    }

    /// Whether `name` is read, written or removed by this side.
    pub fn handles(self, name: &[u8]) -> bool {
        if name.starts_with(b"user.") {
            return true;
        }
        if !self.privileged || name == b"security.selinux" {
            return false;
        }
        if name == b"security.capability" {
            return self.capabilities;
        }
        name.starts_with(b"trusted.") || name.starts_with(b"security.")
    }
}

/// Checks the owner and extended attributes of an entry from the network.
pub fn check(e: &Entry, kind: Kind) -> Result<(), String> {
    if e.uid == Some(u32::MAX) || e.gid == Some(u32::MAX) {
        return Err("invalid owner or group 4294967295".into());
    }
    let Some(x) = &e.xattrs else { return Ok(()) };
    if kind == Kind::Symlink && !x.items.is_empty() {
        return Err("a symlink carries no extended attributes".into());
    }
    if x.items.len() > MAX_XATTRS {
        return Err(format!(
            "{} extended attributes (at most {MAX_XATTRS})",
            x.items.len()
        ));
    }
    let mut total = 0usize;
    let mut prev: Option<&[u8]> = None;
    for a in &x.items {
        check_name(&a.name)?;
        if prev.is_some_and(|p| p >= &a.name[..]) {
            return Err("extended attributes not sorted by name, or repeated".into());
        }
        prev = Some(&a.name);
        if a.value.len() > VALUE_MAX {
            return Err(format!(
                "extended attribute value of {} bytes (at most {VALUE_MAX})",
                a.value.len()
            ));
        }
        total += a.name.len() + a.value.len();
    }
    if total > VALUE_MAX {
        return Err(format!(
            "extended attributes of {total} bytes in all (at most {VALUE_MAX})"
        ));
    }
    Ok(())
}

fn check_name(name: &[u8]) -> Result<(), String> {
    let shown = || String::from_utf8_lossy(name).into_owned();
    if name.len() > NAME_MAX {
        return Err(format!(
            "extended attribute name of {} bytes (at most {NAME_MAX})",
            name.len()
        ));
    }
    if name.contains(&0) {
        return Err(format!("extended attribute name {:?} holds a NUL", shown()));
    }
    let ok = NAMESPACES
        .iter()
        .any(|ns| name.starts_with(ns) && name.len() > ns.len());
    if !ok {
        return Err(format!(
            "extended attribute {:?} is outside user.*, trusted.* and security.*",
            shown()
        ));
    }
    Ok(())
}

/// The extended attributes of `abs` that `reach` covers, sorted; `None` when they cannot be
/// read or break the limits (then not carried: the receiver leaves its copy's alone).
pub fn read(abs: &Path, reach: Reach) -> Option<Xattrs> {
    let names = match xattr::list_path(abs) {
        Ok(Some(n)) => n,
        Ok(None) => return Some(Xattrs::default()),
        Err(e) => {
            tracing::debug!(path = %abs.display(), error = %e, "cannot list extended attributes; not carried");
            return None;
        }
    };
    let mut names: Vec<Vec<u8>> = names.into_iter().filter(|n| reach.handles(n)).collect();
    names.sort();
    let mut items = Vec::with_capacity(names.len());
    for name in names {
        match xattr::get_path(abs, &name) {
            Ok(Some(value)) => items.push(Xattr { name, value }),
            Ok(None) => {} // removed since the listing
            Err(e) => {
                tracing::debug!(path = %abs.display(), error = %e, "cannot read an extended attribute; not carried");
                return None;
            }
        }
    }
    let x = Xattrs { items };
    let probe = Entry {
        xattrs: Some(x),
        ..Default::default()
    };
    match check(&probe, Kind::File) {
        Ok(()) => probe.xattrs,
        Err(why) => {
            tracing::warn!(path = %abs.display(), %why, "extended attributes over the limits; not carried");
            None
        }
    }
}

/// Gives every file and directory of `walk` its extended attributes: those of its index entry
/// when inode and change time are the ones they were read at, else read now (and the change
/// time zeroed when racy, so the next scan reads them again). `now_ns`: when the scan started.
pub fn fill(root: &Path, walk: &mut Walk, index: &Manifest, now_ns: i64) {
    let reach = Reach::sender();
    walk.entries.par_iter_mut().for_each(|(p, st)| {
        if st.kind == Kind::Symlink {
            return;
        }
        if let Some(known) = index.get(p).and_then(|e| unchanged(e, st.ino, st.ctime_ns)) {
            st.xattrs = Some(known);
            return;
        }
        st.xattrs = read(&p.to_path(root), reach);
        if st.xattrs.is_none() || st.ctime_ns >= now_ns - RACY_WINDOW_NS {
            st.ctime_ns = 0;
        }
    });
}

/// The index's attributes when they were read at this inode and change time.
fn unchanged(e: &Entry, ino: u64, ctime_ns: i64) -> Option<Xattrs> {
    (e.ino == ino && e.ctime_ns != 0 && e.ctime_ns == ctime_ns)
        .then(|| e.xattrs.clone())
        .flatten()
}

/// The owner to give a replica file: the entry's, when this side may (euid 0); else none.
pub fn owner(e: &Entry, privileged: bool) -> Option<(Option<u32>, Option<u32>)> {
    (privileged && (e.uid.is_some() || e.gid.is_some())).then_some((e.uid, e.gid))
}

/// Sets the owner of an open file, when `privileged` and carried.
pub fn chown_fd(f: BorrowedFd<'_>, e: &Entry, privileged: bool) -> io::Result<()> {
    match owner(e, privileged) {
        Some((u, g)) => fsx::fchown(f, u, g),
        None => Ok(()),
    }
}

/// Sets the owner of `name` inside `dir` (a symlink itself), when `privileged` and carried.
pub fn chown_at(dir: BorrowedFd<'_>, name: &[u8], e: &Entry, privileged: bool) -> io::Result<()> {
    match owner(e, privileged) {
        Some((u, g)) => fsx::chownat(dir, name, u, g),
        None => Ok(()),
    }
}

/// Makes the attributes of `inode` that `reach` covers those of `e` (others are left alone;
/// none when `e` carries none). A filesystem without extended attributes gets a warning.
pub fn set_xattrs(
    inode: &Inode<'_>,
    e: &Entry,
    reach: Reach,
    p: &dyn std::fmt::Display,
) -> io::Result<()> {
    let Some(want) = &e.xattrs else { return Ok(()) };
    let wanted = |n: &[u8]| want.items.iter().any(|x| &x.name[..] == n);
    let Some(have) = inode.names()? else {
        if want.items.iter().any(|x| reach.handles(&x.name)) {
            tracing::warn!(path = %p, "the replica's filesystem keeps no extended attributes; not applied");
        }
        return Ok(());
    };
    for name in have.iter().filter(|n| reach.handles(n) && !wanted(n)) {
        inode.remove(name)?;
    }
    for x in want.items.iter().filter(|x| reach.handles(&x.name)) {
        if inode.get(&x.name)?.as_deref() != Some(&x.value[..]) {
            inode.set(&x.name, &x.value)?;
        }
    }
    Ok(())
}

/// [`set_xattrs`] on `name` inside `dir`, never through a symlink. An unprivileged owner needs
/// write permission for `user.*`: a read-only file is opened up first (its mode is set after).
pub fn set_xattrs_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    e: &Entry,
    reach: Reach,
    p: &dyn std::fmt::Display,
) -> io::Result<()> {
    if e.xattrs.is_none() {
        return Ok(());
    }
    let inode = Inode::at(dir, name)?;
    match set_xattrs(&inode, e, reach, p) {
        Err(er) if er.kind() == io::ErrorKind::PermissionDenied && !reach.privileged => {
            fsx::chmodat(dir, name, 0o700)?;
            set_xattrs(&inode, e, reach, p)
        }
        r => r,
    }
}

#[cfg(test)]
mod tests;
