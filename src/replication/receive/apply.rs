//! Carrying out a committed generation on the workspace (the roll-forward of the journal).
//!
//! [`apply_record`] is idempotent: it may be interrupted at any instant and run again, at
//! start-up, until it completes; the result is always exactly the committed generation. It
//! relies on three facts: a staged file is renamed at most once (a missing stage file means the
//! rename happened); a removal only removes what has the kind the record says was there (so a
//! path already replaced by the new kind is left alone); and metadata is set to absolute values.
//! Every path is reached through [`fsx::Root`], so a symlink planted anywhere in the tree can
//! neither be followed nor written through.
//!
//! Modes are set through [`SetIdBits`]: by default no file or directory of the replica ever
//! gets the setuid or setgid bit, whatever the sender's mode says. Owner and extended
//! attributes go through a [`Policy`] (`replication::attrs`): the owner only when this process
//! is root; and always before the mode, since a change of owner clears setuid and setgid bits.

use std::collections::{BTreeSet, HashMap, hash_map};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;

use crate::disk::fsx::{self, Found, Root};
use crate::proto::state::{Change, Record};
use crate::replication::attrs::{self, Reach};
use crate::replication::manifest::{Kind, Manifest, kind_of};
use crate::types::RelPath;

fn found_is(found: Found, kind: Kind) -> bool {
    matches!(
        (found, kind),
        (Found::File, Kind::File) | (Found::Dir, Kind::Dir) | (Found::Symlink, Kind::Symlink)
    )
}

/// A path whose parents no longer lead to it.
fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

fn context(e: io::Error, what: &str, p: &RelPath) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {p}: {e}"))
}

/// What the replica does with the setuid and setgid bits (0o4000, 0o2000) of the sender's
/// modes. Masked by default: a file planted on a rented GPU machine must never become a setuid
/// program on the standby (or on a new GPU restored from it). `Keep` is the operator's opt-in
/// (`--keep-setuid`).
///
/// Only what is written to disk is masked: manifests and records keep the sender's mode, so both
/// peers still compute the same manifest root, and the sender's quick-check, which compares its
/// files with its index (the receiver's manifest), never sees a difference to send again. When
/// this replica later sends (a promoted standby, a restore), its own scan sees the masked mode
/// on disk and sends it once as a metadata change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SetIdBits {
    #[default]
    Mask,
    Keep,
}

impl SetIdBits {
    /// The mode to set on disk for the sender's `mode`.
    pub fn mode(self, mode: u32) -> u32 {
        match self {
            SetIdBits::Mask => mode & !0o6000,
            SetIdBits::Keep => mode,
        }
    }
}

/// What the replica applies of the sender's metadata besides content and mtime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub setid: SetIdBits,
    /// Owner, group, `trusted.*` and `security.*` attributes are applied (euid 0).
    pub privileged: bool,
}

impl Policy {
    /// The policy of this process (privileged when its effective uid is 0).
    pub fn of_process(setid: SetIdBits) -> Policy {
        Policy {
            setid,
            privileged: fsx::privileged(),
        }
    }

    /// The mode to set on disk for the sender's `mode`.
    pub fn mode(self, mode: u32) -> u32 {
        self.setid.mode(mode)
    }

    /// Which extended attributes this replica writes and removes (file capabilities only with
    /// setuid bits kept: both are privileges).
    pub fn reach(self) -> Reach {
        Reach {
            privileged: self.privileged,
            capabilities: self.setid == SetIdBits::Keep,
        }
    }
}

/// A record's changes, with their paths parsed.
type Changes<'a> = [(RelPath, &'a Change)];

/// Applies `rec` to the workspace under `root`. `manifest` is the manifest *after* the record
/// (directory metadata is taken from it). `stage` is the stage directory. `bits` says what
/// becomes of setuid and setgid bits.
///
/// The steps run in this order, each idempotent on its own (see the module doc).
pub fn apply_record(
    root: &Root,
    stage: BorrowedFd<'_>,
    rec: &Record,
    manifest: &Manifest,
    bits: Policy,
) -> io::Result<()> {
    let changes = parse_changes(rec)?;
    remove_old(root, &changes)?;
    create_dirs(root, stage, &changes)?;
    // From here on no directory is created, removed or moved: parents can be kept open.
    let mut dirs = Dirs::new(root);
    place_staged(stage, &mut dirs, &changes)?;
    patch_in_place(stage, &mut dirs, &changes)?;
    write_packed(stage, &mut dirs, &changes, bits)?;
    set_meta(root, &changes, bits)?;
    set_dir_meta(&mut dirs, manifest, &changes, bits)
}

fn parse_changes(rec: &Record) -> io::Result<Vec<(RelPath, &Change)>> {
    let mut changes = Vec::with_capacity(rec.changes.len());
    for c in &rec.changes {
        let p = RelPath::new(c.path.to_vec())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("record: {e}")))?;
        changes.push((p, c));
    }
    Ok(changes)
}

/// 1. Removals, deepest first: deletions and the old side of a change of kind.
fn remove_old(root: &Root, changes: &Changes<'_>) -> io::Result<()> {
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
            // No directory on the way (gone, or replaced by a file in this very generation):
            // nothing of ours is left to remove there, and nothing is followed.
            Err(e) if gone(&e) => continue,
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
    Ok(())
}

/// 2. New directories, shallowest first: those staged whole are renamed into place (with
///    everything placed inside them), others created empty, private until step 5.
fn create_dirs(root: &Root, stage: BorrowedFd<'_>, changes: &Changes<'_>) -> io::Result<()> {
    let mut dirs: Vec<(&RelPath, &Change)> = changes
        .iter()
        .filter(|(_, c)| c.entry.as_ref().and_then(kind_of) == Some(Kind::Dir) && !c.placed)
        .map(|(p, c)| (p, *c))
        .collect();
    dirs.sort_by_key(|(p, _)| p.depth());
    for (p, c) in &dirs {
        let (dir, name) = root
            .open_parent(p)
            .map_err(|e| context(e, "create directory", p))?;
        let found = fsx::found_at(dir.as_fd(), name)?;
        if !c.stage.is_empty() && fsx::lstat_at(stage, c.stage.as_bytes())?.is_some() {
            if found != Found::Missing {
                return Err(io::Error::other(format!(
                    "place directory {p}: a {found:?} is in the way"
                )));
            }
            fsx::renameat(stage, c.stage.as_bytes(), dir.as_fd(), name)
                .map_err(|e| context(e, "place directory", p))?;
            continue;
        }
        match found {
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
    Ok(())
}

/// 3. Staged content into place.
fn place_staged(
    stage: BorrowedFd<'_>,
    dirs: &mut Dirs<'_>,
    changes: &Changes<'_>,
) -> io::Result<()> {
    for (p, c) in changes {
        if c.stage.is_empty() || c.entry.as_ref().and_then(kind_of) == Some(Kind::Dir) {
            continue;
        }
        if fsx::lstat_at(stage, c.stage.as_bytes())?.is_none() {
            continue; // renamed by an earlier, interrupted run
        }
        let (dir, name) = dirs.parent(p).map_err(|e| context(e, "place", p))?;
        fsx::renameat(stage, c.stage.as_bytes(), dir, name).map_err(|e| context(e, "place", p))?;
    }
    Ok(())
}

/// 3b. Files updated in place from a patch (missing patch: applied by an earlier run, whose
///     results were made durable before the patch was removed).
fn patch_in_place(
    stage: BorrowedFd<'_>,
    dirs: &mut Dirs<'_>,
    changes: &Changes<'_>,
) -> io::Result<()> {
    for (p, c) in changes {
        if c.patch.is_empty() {
            continue;
        }
        let patch = match fsx::openat_file(stage, c.patch.as_bytes()) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(context(e, "open patch for", p)),
        };
        let size = c.entry.as_ref().map(|e| e.size).unwrap_or(0);
        let (dir, name) = dirs.parent(p).map_err(|e| context(e, "patch", p))?;
        let target = fsx::openat_write(dir, name).map_err(|e| context(e, "patch", p))?;
        if !target.metadata()?.is_file() {
            return Err(io::Error::other(format!("patch {p}: not a regular file")));
        }
        crate::replication::receive::stage::apply_patch(&patch, &target, &c.extents, size)
            .map_err(|e| context(e, "patch", p))?;
    }
    Ok(())
}

/// 3c. Small files written in place from their pack (missing pack: applied by an earlier
///     run, whose results were made durable before the pack was removed).
fn write_packed(
    stage: BorrowedFd<'_>,
    dirs: &mut Dirs<'_>,
    changes: &Changes<'_>,
    bits: Policy,
) -> io::Result<()> {
    let mut packs: HashMap<&str, Option<File>> = HashMap::new();
    let mut buf = Vec::new();
    for (p, c) in changes {
        if c.pack.is_empty() {
            continue;
        }
        let pack = match packs.entry(c.pack.as_str()) {
            hash_map::Entry::Occupied(o) => o.into_mut(),
            hash_map::Entry::Vacant(v) => v.insert(open_pack(stage, &c.pack, p)?),
        };
        let (Some(pack), Some(e)) = (pack.as_ref(), c.entry.as_ref()) else {
            continue;
        };
        buf.resize(e.size as usize, 0);
        pack.read_exact_at(&mut buf, c.pack_offset)
            .map_err(|er| context(er, "read pack for", p))?;
        let (dir, name) = dirs.parent(p).map_err(|er| context(er, "write", p))?;
        let mode = bits.mode(e.mode);
        let mut f = fsx::create_trunc(dir, name, mode).map_err(|er| context(er, "write", p))?;
        f.write_all(&buf).map_err(|er| context(er, "write", p))?;
        set_file_meta(&f, e, bits).map_err(|er| context(er, "set metadata of", p))?;
    }
    Ok(())
}

/// A staged pack, or `None` when an earlier run applied it and removed it.
fn open_pack(stage: BorrowedFd<'_>, name: &str, p: &RelPath) -> io::Result<Option<File>> {
    match fsx::openat_file(stage, name.as_bytes()) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(context(e, "open pack for", p)),
    }
}

/// 4. Metadata of files and symlinks that were linked, kept or patched rather than staged.
fn set_meta(root: &Root, changes: &Changes<'_>, bits: Policy) -> io::Result<()> {
    for (p, c) in changes {
        let Some(e) = &c.entry else { continue };
        let kind = kind_of(e);
        if !c.set_meta || kind == Some(Kind::Dir) {
            continue;
        }
        let (dir, name) = root
            .open_parent(p)
            .map_err(|e| context(e, "set metadata of", p))?;
        set_attrs_at(dir.as_fd(), name, e, bits, p)?;
        if kind != Some(Kind::Symlink) {
            fsx::chmodat(dir.as_fd(), name, bits.mode(e.mode))
                .map_err(|er| context(er, "chmod", p))?;
        }
        fsx::set_mtime_at(dir.as_fd(), name, e.mtime_ns)
            .map_err(|er| context(er, "set mtime of", p))?;
    }
    Ok(())
}

/// 5. Directory metadata, deepest first: every changed directory and every parent of a
///    changed path (its mtime moved when entries were added or removed).
fn set_dir_meta(
    dirs: &mut Dirs<'_>,
    manifest: &Manifest,
    changes: &Changes<'_>,
    bits: Policy,
) -> io::Result<()> {
    let mut touched: BTreeSet<RelPath> = BTreeSet::new();
    for (p, c) in changes {
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
        let (dir, name) = match dirs.parent(p) {
            Ok(x) => x,
            Err(er) if gone(&er) => continue,
            Err(er) => return Err(context(er, "set metadata of", p)),
        };
        if fsx::found_at(dir, name)? != Found::Dir {
            continue;
        }
        set_attrs_at(dir, name, e, bits, p)?;
        fsx::chmodat(dir, name, bits.mode(e.mode)).map_err(|er| context(er, "chmod", p))?;
        fsx::set_mtime_at(dir, name, e.mtime_ns).map_err(|er| context(er, "set mtime of", p))?;
    }
    Ok(())
}

/// Owner and extended attributes of `name` inside `dir` (a symlink: its owner only), before its
/// mode is set.
fn set_attrs_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    e: &crate::proto::Entry,
    bits: Policy,
    p: &RelPath,
) -> io::Result<()> {
    attrs::chown_at(dir, name, e, bits.privileged).map_err(|er| context(er, "chown", p))?;
    if kind_of(e) != Some(Kind::Symlink) {
        attrs::set_xattrs_at(dir, name, e, bits.reach(), p)
            .map_err(|er| context(er, "set extended attributes of", p))?;
    }
    Ok(())
}

/// Sets a file's owner and extended attributes (as `bits` allows), then its permission bits
/// (setuid and setgid as `bits` says: after the owner, whose change clears them) and
/// modification time, through its descriptor.
pub fn set_file_meta(f: &File, e: &crate::proto::Entry, bits: Policy) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    attrs::chown_fd(f.as_fd(), e, bits.privileged)?;
    let inode = crate::disk::xattr::Inode::Fd(f.as_fd());
    attrs::set_xattrs(&inode, e, bits.reach(), &"a staged file")?;
    f.set_permissions(std::fs::Permissions::from_mode(bits.mode(e.mode)))?;
    let t = std::time::SystemTime::UNIX_EPOCH
        + std::time::Duration::from_nanos(e.mtime_ns.max(0) as u64);
    f.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t))
}

/// Up to this many files or directories are fsynced one by one; beyond it, `syncfs` flushes the
/// whole filesystem in one go (cheaper for big generations, but it also flushes unrelated dirty
/// data, which small generations should not wait for).
const FSYNC_EACH_MAX: usize = 32;

/// Makes the staged content of `rec` durable (before its record is written).
pub fn sync_staged(stage: BorrowedFd<'_>, rec: &Record) -> io::Result<()> {
    let staged: BTreeSet<&str> = rec
        .changes
        .iter()
        .flat_map(|c| [c.stage.as_str(), c.patch.as_str(), c.pack.as_str()])
        .filter(|n| !n.is_empty())
        .collect();
    // A directory staged whole holds files that are in no list: flush everything.
    let whole_dirs = rec.changes.iter().any(|c| {
        c.placed || (!c.stage.is_empty() && c.entry.as_ref().and_then(kind_of) == Some(Kind::Dir))
    });
    if staged.len() > FSYNC_EACH_MAX || whole_dirs {
        return fsx::syncfs(stage);
    }
    let mut buckets = BTreeSet::new();
    for name in staged {
        match fsx::openat_file(stage, name.as_bytes()) {
            Ok(f) => f.sync_all()?,
            // A staged symlink cannot be opened; its directory entry is synced below.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {}
            Err(e) => return Err(e),
        }
        buckets.insert(name.rsplit_once('/').map(|(b, _)| b).unwrap_or("."));
    }
    for b in buckets {
        File::from(fsx::openat_dir(stage, b.as_bytes())?).sync_all()?;
    }
    Ok(())
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
    // Files written in place (patched, or from a pack): their data too.
    let patched: Vec<RelPath> = rec
        .changes
        .iter()
        .filter(|c| !c.patch.is_empty() || !c.pack.is_empty())
        .filter_map(|c| RelPath::new(c.path.to_vec()).ok())
        .collect();
    if dirs.len() + patched.len() > FSYNC_EACH_MAX {
        return fsx::syncfs(root.fd());
    }
    for p in &patched {
        let (dir, name) = root.open_parent(p)?;
        fsx::openat_file(dir.as_fd(), name)?.sync_all()?;
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

/// Staged files are spread over this many subdirectories of the stage directory: creating
/// thousands of files in one directory serialises on its lock.
pub const STAGE_BUCKETS: u64 = 16;

/// The bucket directory names, `00` to `0f`.
pub fn stage_buckets() -> impl Iterator<Item = String> {
    (0..STAGE_BUCKETS).map(|b| format!("{b:02x}"))
}

/// Creates the bucket directories if needed.
pub fn prepare_stage(stage: BorrowedFd<'_>) -> io::Result<()> {
    for b in stage_buckets() {
        match fsx::mkdirat(stage, b.as_bytes(), 0o700) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Removes everything staged (leftovers of generations that never committed, and patches of
/// applied ones), keeping the bucket directories. Returns how many entries were removed.
pub fn clear_stage(stage: BorrowedFd<'_>) -> io::Result<usize> {
    let buckets: BTreeSet<Vec<u8>> = stage_buckets().map(String::into_bytes).collect();
    let mut removed = 0;
    for n in fsx::list_dir(stage)? {
        if buckets.contains(&n) && fsx::found_at(stage, &n)? == Found::Dir {
            let dir = fsx::openat_dir(stage, &n)?;
            for child in fsx::list_dir(dir.as_fd())? {
                fsx::remove_tree_at(dir.as_fd(), &child)?;
                removed += 1;
            }
        } else {
            fsx::remove_tree_at(stage, &n)?;
            removed += 1;
        }
    }
    prepare_stage(stage)?;
    Ok(removed)
}

/// Open parent directories, reused across the steps of an apply that no longer move
/// directories (after removals and creations).
struct Dirs<'r> {
    root: &'r Root,
    open: HashMap<Option<RelPath>, std::os::fd::OwnedFd>,
}

impl<'r> Dirs<'r> {
    fn new(root: &'r Root) -> Dirs<'r> {
        Dirs {
            root,
            open: HashMap::new(),
        }
    }

    fn parent<'p>(&mut self, p: &'p RelPath) -> io::Result<(BorrowedFd<'_>, &'p [u8])> {
        let key = p.parent();
        if !self.open.contains_key(&key) {
            let fd = match &key {
                Some(d) => self.root.open_dir(d)?,
                None => fsx::openat_dir(self.root.fd(), b".")?,
            };
            self.open.insert(key.clone(), fd);
        }
        Ok((self.open[&key].as_fd(), p.name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Modes only: owner and the privileged attributes are left alone.
    impl From<SetIdBits> for Policy {
        fn from(setid: SetIdBits) -> Policy {
            Policy {
                setid,
                privileged: false,
            }
        }
    }
    use crate::proto::state::Change;
    use crate::replication::manifest::tests::{dir, file};
    use std::os::fd::AsFd;

    fn ch(p: &str, entry: Option<crate::proto::Entry>, old: Option<Kind>) -> Change {
        Change {
            path: p.as_bytes().to_vec(),
            entry,
            old_kind: old.map(Kind::to_proto).unwrap_or(0),
            ..Default::default()
        }
    }

    /// Replaying a fully applied record (a crash right after applying it) changes nothing and
    /// does not fail, even when a directory became a file.
    #[test]
    fn replay_is_idempotent_across_kind_changes() {
        let ws = tempfile::tempdir().unwrap();
        let st = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(ws.path().join("deep/a/b")).unwrap();
        std::fs::write(ws.path().join("deep/a/b/f"), b"old").unwrap();
        std::fs::write(ws.path().join("file-to-dir"), b"old").unwrap();
        let root = Root::open(ws.path()).unwrap();
        let stage = fsx::open_dir_path(st.path()).unwrap();
        prepare_stage(stage.as_fd()).unwrap();
        std::fs::write(st.path().join("00/new-deep"), b"now a file").unwrap();
        let mut f = file(10, 1_000_000_000, 1);
        f.mode = 0o640;
        let rec = Record {
            generation: 2,
            changes: vec![
                ch("deep/a/b/f", None, Some(Kind::File)),
                ch("deep/a/b", None, Some(Kind::Dir)),
                ch("deep/a", None, Some(Kind::Dir)),
                Change {
                    stage: "00/new-deep".into(),
                    ..ch("deep", Some(f.clone()), Some(Kind::Dir))
                },
                ch("file-to-dir", Some(dir()), Some(Kind::File)),
            ],
            ..Default::default()
        };
        let mut m = Manifest::new();
        m.insert(RelPath::new("deep").unwrap(), f);
        m.insert(RelPath::new("file-to-dir").unwrap(), dir());
        apply_record(&root, stage.as_fd(), &rec, &m, SetIdBits::Mask.into()).unwrap();
        let check = || {
            assert_eq!(
                std::fs::read(ws.path().join("deep")).unwrap(),
                b"now a file"
            );
            assert!(ws.path().join("file-to-dir").is_dir());
        };
        check();
        apply_record(&root, stage.as_fd(), &rec, &m, SetIdBits::Mask.into()).unwrap();
        check();
        sync_applied(&root, &rec, &m).unwrap();
    }

    /// A symlink planted where the manifest has a file: setting the file's metadata must not
    /// change the symlink's target outside the workspace (found with the `apply_record` fuzz
    /// target; `fuzz/seeds/apply_record/chmod-through-planted-symlink`).
    #[test]
    fn set_meta_does_not_follow_a_planted_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let ws = tempfile::tempdir().unwrap();
        let st = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret");
        std::fs::write(&secret, b"x").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&secret, ws.path().join("f")).unwrap();
        let root = Root::open(ws.path()).unwrap();
        let stage = fsx::open_dir_path(st.path()).unwrap();
        let mut f = file(1, 1_000_000_000, 1);
        f.mode = 0o777;
        let rec = Record {
            generation: 2,
            changes: vec![Change {
                set_meta: true,
                ..ch("f", Some(f.clone()), None)
            }],
            ..Default::default()
        };
        let mut m = Manifest::new();
        m.insert(RelPath::new("f").unwrap(), f);
        assert!(apply_record(&root, stage.as_fd(), &rec, &m, SetIdBits::Mask.into()).is_err());
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600, "chmod went through the symlink");
    }

    /// Applies a record with a setuid file written from a pack, a setgid directory and the
    /// metadata of an existing file set to setuid+setgid; returns the modes found on disk.
    fn modes_after(bits: SetIdBits) -> [u32; 3] {
        use std::os::unix::fs::PermissionsExt;
        let ws = tempfile::tempdir().unwrap();
        let st = tempfile::tempdir().unwrap();
        std::fs::write(ws.path().join("kept"), b"kept").unwrap();
        let root = Root::open(ws.path()).unwrap();
        let stage = fsx::open_dir_path(st.path()).unwrap();
        prepare_stage(stage.as_fd()).unwrap();
        std::fs::write(st.path().join("00/pack"), b"#!/bin/sh\n").unwrap();
        let mut packed = file(10, 1_000_000_000, 1);
        packed.mode = 0o4755;
        let mut d = dir();
        d.mode = 0o2775;
        let mut kept = file(4, 1_000_000_000, 2);
        kept.mode = 0o6755;
        let rec = Record {
            generation: 2,
            changes: vec![
                Change {
                    pack: "00/pack".into(),
                    ..ch("suid", Some(packed.clone()), None)
                },
                ch("sgid", Some(d.clone()), None),
                Change {
                    set_meta: true,
                    ..ch("kept", Some(kept.clone()), Some(Kind::File))
                },
            ],
            ..Default::default()
        };
        let mut m = Manifest::new();
        for (p, e) in [("suid", packed), ("sgid", d), ("kept", kept)] {
            m.insert(RelPath::new(p).unwrap(), e);
        }
        apply_record(&root, stage.as_fd(), &rec, &m, bits.into()).unwrap();
        assert_eq!(
            std::fs::read(ws.path().join("suid")).unwrap(),
            b"#!/bin/sh\n",
            "content intact"
        );
        ["suid", "sgid", "kept"].map(|n| {
            std::fs::metadata(ws.path().join(n))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        })
    }

    #[test]
    fn setuid_and_setgid_are_masked_unless_kept() {
        assert_eq!(modes_after(SetIdBits::Mask), [0o755, 0o775, 0o755]);
        assert_eq!(modes_after(SetIdBits::Keep), [0o4755, 0o2775, 0o6755]);
    }

    /// Sets the metadata of existing file `name` (and nothing else) as `e`, under `policy`.
    fn set_meta_of(
        ws: &std::path::Path,
        name: &str,
        e: &crate::proto::Entry,
        policy: Policy,
    ) -> io::Result<()> {
        let st = tempfile::tempdir().unwrap();
        let root = Root::open(ws).unwrap();
        let stage = fsx::open_dir_path(st.path()).unwrap();
        let rec = Record {
            generation: 2,
            changes: vec![Change {
                set_meta: true,
                ..ch(name, Some(e.clone()), Some(Kind::File))
            }],
            ..Default::default()
        };
        let mut m = Manifest::new();
        m.insert(RelPath::new(name).unwrap(), e.clone());
        apply_record(&root, stage.as_fd(), &rec, &m, policy)
    }

    /// As root: owner and group are set before the mode (a chown clears the setuid bit, which
    /// comes back), attributes too; unprivileged, the owner is left alone; and a symlink planted
    /// where a file was expected is refused, its target's owner untouched.
    #[test]
    fn owner_before_mode_only_as_root_and_never_through_a_symlink() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if !fsx::privileged() {
            eprintln!("skipped: giving files another owner needs root");
            return;
        }
        let ws = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret");
        std::fs::write(&secret, b"x").unwrap();
        std::os::unix::fs::symlink(&secret, ws.path().join("planted")).unwrap();
        std::fs::write(ws.path().join("kept"), b"kept").unwrap();
        let mut e = file(4, 1_000_000_000, 2);
        e.mode = 0o4755;
        e.uid = Some(1234);
        e.gid = Some(5678);
        e.xattrs = Some(crate::replication::manifest::tests::xattrs(&[(
            "trusted.t",
            "v",
        )]));
        let unprivileged = Policy {
            setid: SetIdBits::Keep,
            privileged: false,
        };
        set_meta_of(ws.path(), "kept", &e, unprivileged).unwrap();
        let md = std::fs::metadata(ws.path().join("kept")).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (0, 0),
            "unprivileged: the owner stays"
        );
        let root = Policy {
            setid: SetIdBits::Keep,
            privileged: true,
        };
        set_meta_of(ws.path(), "kept", &e, root).unwrap();
        let md = std::fs::metadata(ws.path().join("kept")).unwrap();
        assert_eq!((md.uid(), md.gid()), (1234, 5678));
        assert_eq!(
            md.permissions().mode() & 0o7777,
            0o4755,
            "setuid set after the chown"
        );
        let t = crate::disk::xattr::get_path(&ws.path().join("kept"), b"trusted.t").unwrap();
        assert_eq!(t.as_deref(), Some(&b"v"[..]));
        assert!(set_meta_of(ws.path(), "planted", &e, root).is_err());
        let md = std::fs::metadata(&secret).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (0, 0),
            "chown went through the symlink"
        );
        assert!(
            crate::disk::xattr::list_path(&secret)
                .unwrap()
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn staged_files_are_masked_too() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let f = File::create(d.path().join("f")).unwrap();
        let mut e = file(0, 1_000_000_000, 1);
        e.mode = 0o6711;
        set_file_meta(&f, &e, SetIdBits::Mask.into()).unwrap();
        let mode = |f: &File| f.metadata().unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&f), 0o711);
        set_file_meta(&f, &e, SetIdBits::Keep.into()).unwrap();
        assert_eq!(mode(&f), 0o6711);
        assert_eq!(e.mode, 0o6711, "the entry keeps the sender's mode");
    }
}
