//! What changed in a workspace since the last durable generation.
//!
//! A scan walks the tree (or only the paths the watcher flagged, and everything below those that
//! are directories) without following symlinks, and compares each entry with the index by the
//! quick-check (kind, size, mtime, inode, mode, owner, extended attributes: the last read again
//! only when the change time moved, `attrs::fill`). The result is a [`Plan`]: deletions,
//! directories, symlinks, metadata-only changes and files whose content must be read.
//!
//! Hazards handled here:
//! - A write in the same timestamp tick as our read leaves size and mtime unchanged. Entries
//!   whose mtime is within [`RACY_WINDOW`] of the moment they were read are kept with
//!   `verify = true` and are re-hashed by the next scan ("racily clean", as git does).
//! - A directory that cannot be read is not "empty": its index subtree is kept unchanged, so an
//!   `EACCES` never deletes data on the replica.
//! - Devices, fifos and sockets are skipped with a warning; they are not replicated. One can
//!   also appear where the scan saw a regular file, before the file is read: every read of a
//!   workspace file goes through [`open_regular`], which never blocks on such a thing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::proto::Entry;
use crate::replication::manifest::{Kind, Manifest, kind_of};
use crate::types::RelPath;

/// Entries modified this close to the moment they were read are re-verified later.
pub const RACY_WINDOW_NS: i64 = 2_000_000_000;

/// Name (at the workspace root) of the staging directory a receiver uses when its state
/// directory is on another filesystem. Never replicated.
pub const STAGE_DIR_NAME: &str = ".standby-stage";

/// What `lstat` says about one path.
#[derive(Clone, Debug, PartialEq)]
pub struct Stat {
    pub kind: Kind,
    pub mode: u32,
    pub mtime_ns: i64,
    pub size: u64,
    pub ino: u64,
    pub target: Vec<u8>,
    pub uid: u32,
    pub gid: u32,
    /// The inode's change time; 0 when the extended attributes were read too close to it to be
    /// trusted (see `attrs::fill`).
    pub ctime_ns: i64,
    /// Files and directories: the extended attributes carried (`None`: not read or not
    /// carried; `attrs::fill` fills them in after the walk).
    pub xattrs: Option<crate::proto::Xattrs>,
}

impl Stat {
    pub fn from_metadata(m: &Metadata) -> Option<Stat> {
        let ft = m.file_type();
        let kind = if ft.is_file() {
            Kind::File
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else {
            return None;
        };
        Some(Stat {
            kind,
            mode: if kind == Kind::Symlink {
                0o777
            } else {
                m.mode() & 0o7777
            },
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            size: if kind == Kind::File { m.size() } else { 0 },
            ino: m.ino(),
            target: Vec::new(),
            uid: m.uid(),
            gid: m.gid(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            xattrs: None,
        })
    }

    /// The stat an index entry describes (a file sent again whole).
    pub fn of_entry(kind: Kind, e: &Entry) -> Stat {
        Stat {
            kind,
            mode: e.mode,
            mtime_ns: e.mtime_ns,
            size: e.size,
            ino: e.ino,
            target: e.target.to_vec(),
            uid: e.uid.unwrap_or(0),
            gid: e.gid.unwrap_or(0),
            ctime_ns: e.ctime_ns,
            xattrs: e.xattrs.clone(),
        }
    }

    /// The index entry for this stat; files get their hash later.
    pub fn entry(&self) -> Entry {
        Entry {
            kind: self.kind.to_proto(),
            mode: self.mode,
            mtime_ns: self.mtime_ns,
            size: self.size,
            target: self.target.clone(),
            ino: self.ino,
            uid: Some(self.uid),
            gid: Some(self.gid),
            xattrs: self.xattrs.clone(),
            ctime_ns: self.ctime_ns,
            ..Default::default()
        }
    }

    /// Whether owner, group and extended attributes are those of the index entry.
    pub fn same_attrs(&self, e: &Entry) -> bool {
        e.uid == Some(self.uid) && e.gid == Some(self.gid) && e.xattrs == self.xattrs
    }

    /// The quick-check: does the index entry still describe this file?
    pub fn matches(&self, e: &Entry) -> bool {
        kind_of(e) == Some(self.kind)
            && e.size == self.size
            && e.mtime_ns == self.mtime_ns
            && e.ino == self.ino
            && e.mode == self.mode
            && (self.kind != Kind::Symlink || e.target[..] == self.target[..])
            && self.same_attrs(e)
    }
}

/// Opens `path` for reading only if it is a regular file, without following a symlink and
/// without blocking: `O_NONBLOCK` so that a FIFO swapped in since the scan (or a device) does
/// not wait for a writer, `O_NOCTTY` so that a terminal never becomes ours, then `fstat` on what
/// was opened. `None` (with a warning) when it is anything else, or a symlink now; `NotFound`
/// is passed on. On a regular file `O_NONBLOCK` changes nothing.
pub fn open_regular(path: &Path) -> io::Result<Option<fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let f = match opened {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
        // A socket (or a FIFO opened for writing) cannot be opened at all.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            tracing::warn!(path = %path.display(), "not a regular file any more; skipped");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let ft = f.metadata()?.file_type();
    if !ft.is_file() {
        tracing::warn!(path = %path.display(), kind = ?ft, "not a regular file any more; skipped");
        return Ok(None);
    }
    Ok(Some(f))
}

pub use super::exclude::Exclude;

/// The result of walking (part of) a tree.
#[derive(Debug, Default)]
pub struct Walk {
    pub entries: BTreeMap<RelPath, Stat>,
    /// Directories that could not be read: their index subtree must be left alone.
    pub unreadable: Vec<RelPath>,
    /// Devices, fifos, sockets, and names that are not valid paths.
    pub skipped: Vec<RelPath>,
}

fn stat_path(abs: &Path) -> io::Result<Option<Metadata>> {
    match fs::symlink_metadata(abs) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Walk {
    fn add(&mut self, root: &Path, p: RelPath, m: &Metadata, exclude: &Exclude) {
        if exclude.is_excluded_entry(&p, m.is_dir()) {
            return;
        }
        let Some(st) = self.stat(&p, m, &p.to_path(root)) else {
            return;
        };
        let is_dir = st.kind == Kind::Dir;
        self.entries.insert(p.clone(), st);
        if is_dir {
            self.walk_dir(root, Some(p), exclude);
        }
    }

    /// The stat of `p` (at `abs`) to record, with a symlink's target; `None` for what is not
    /// replicated (noted in `skipped`), what vanished, or an unreadable link (noted in
    /// `unreadable`).
    fn stat(&mut self, p: &RelPath, m: &Metadata, abs: &Path) -> Option<Stat> {
        let Some(mut st) = Stat::from_metadata(m) else {
            tracing::warn!(path = %p, "skipping a device, fifo or socket: not replicated");
            self.skipped.push(p.clone());
            return None;
        };
        if st.kind == Kind::Symlink {
            match fs::read_link(abs) {
                Ok(t) => st.target = t.as_os_str().as_bytes().to_vec(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
                Err(e) => {
                    tracing::warn!(path = %p, error = %e, "cannot read symlink; keeping the replica's copy");
                    self.unreadable.push(p.clone());
                    return None;
                }
            }
        }
        Some(st)
    }

    /// Walks everything below `dir` (the root when None).
    fn walk_dir(&mut self, root: &Path, dir: Option<RelPath>, exclude: &Exclude) {
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let abs = match &d {
                Some(d) => d.to_path(root),
                None => root.to_path_buf(),
            };
            let Some(rd) = self.read_dir(&abs, d.as_ref()) else {
                continue;
            };
            for de in rd {
                let de = match de {
                    Ok(de) => de,
                    Err(e) => {
                        tracing::warn!(path = %abs.display(), error = %e, "directory listing failed; keeping the replica's copy of it");
                        if let Some(d) = &d {
                            self.unreadable.push(d.clone());
                        }
                        break;
                    }
                };
                if let Some(sub) = self.visit(d.as_ref(), &de, exclude) {
                    stack.push(Some(sub));
                }
            }
        }
    }

    /// Opens a directory for listing. A directory that vanished is forgotten; one that cannot
    /// be read is noted in `unreadable` (the root's failure only in the log).
    fn read_dir(&mut self, abs: &Path, d: Option<&RelPath>) -> Option<fs::ReadDir> {
        match fs::read_dir(abs) {
            Ok(rd) => Some(rd),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(d) = d {
                    self.entries.remove(d);
                }
                None
            }
            Err(e) => {
                tracing::warn!(path = %abs.display(), error = %e, "cannot read directory; keeping the replica's copy of it");
                if let Some(d) = d {
                    self.unreadable.push(d.clone());
                }
                None
            }
        }
    }

    /// Records one directory entry of `d`; returns its path when it is a directory to walk.
    fn visit(
        &mut self,
        d: Option<&RelPath>,
        de: &fs::DirEntry,
        exclude: &Exclude,
    ) -> Option<RelPath> {
        let name = de.file_name();
        let p = match d {
            Some(d) => d.join(name.as_bytes()),
            None => RelPath::new(name.as_bytes().to_vec()),
        };
        let p = match p {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(name = ?name, error = %e, "skipping an unrepresentable name");
                return None;
            }
        };
        let is_dir = de.file_type().is_ok_and(|t| t.is_dir());
        if exclude.is_excluded_entry(&p, is_dir) {
            return None;
        }
        let m = match de.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %p, error = %e, "cannot stat; keeping the replica's copy");
                self.unreadable.push(p);
                return None;
            }
        };
        let st = self.stat(&p, &m, &de.path())?;
        let sub = (st.kind == Kind::Dir).then(|| p.clone());
        self.entries.insert(p, st);
        sub
    }
}

/// Which part of the tree a scan covers.
#[derive(Clone, Debug)]
pub enum Scope {
    Full,
    /// These paths (and their parents, whose mtimes change with them; and everything below
    /// those that are directories).
    Paths(BTreeSet<RelPath>),
}

/// Walks the scope. Also returns the set of "roots" covered: index entries at or below a
/// covered root that the walk did not find are deletions.
pub fn walk(root: &Path, scope: &Scope, exclude: &Exclude) -> (Walk, Vec<Option<RelPath>>) {
    match scope {
        Scope::Full => {
            let mut w = Walk::default();
            w.walk_dir(root, None, exclude);
            (w, vec![None])
        }
        Scope::Paths(paths) => {
            let w = walk_paths(root, paths, exclude);
            // Deletions are only inferred at and below the flagged paths themselves.
            let roots = paths
                .iter()
                .filter(|p| !exclude.is_excluded(p))
                .cloned()
                .map(Some)
                .collect();
            (w, roots)
        }
    }
}

/// Walks the flagged paths (directories with their subtrees) and the parents of each (their
/// own metadata only).
fn walk_paths(root: &Path, paths: &BTreeSet<RelPath>, exclude: &Exclude) -> Walk {
    let mut w = Walk::default();
    let parents: BTreeSet<RelPath> = paths.iter().filter_map(RelPath::parent).collect();
    let all: BTreeSet<RelPath> = paths.iter().cloned().chain(parents).collect();
    // Paths below another listed directory path are skipped: the parent's walk covers them.
    let mut covered: Vec<RelPath> = Vec::new();
    for p in &all {
        if exclude.is_excluded(p) {
            continue;
        }
        if covered
            .iter()
            .any(|c| p.starts_with(c) && p != c && paths.contains(c))
        {
            continue;
        }
        match stat_path(&p.to_path(root)) {
            Ok(Some(m)) => {
                if paths.contains(p) {
                    w.add(root, p.clone(), &m, exclude);
                } else if let Some(st) = Stat::from_metadata(&m) {
                    // A parent only: its own metadata, not its subtree.
                    w.entries.insert(p.clone(), st);
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(path = %p, error = %e, "cannot stat; keeping the replica's copy");
                w.unreadable.push(p.clone());
            }
        }
        covered.push(p.clone());
    }
    w
}

/// One thing to do for a path in the next generation.
#[derive(Clone, Debug)]
pub enum Action {
    /// Remove the path; `old` is the kind the replica holds there.
    Delete { path: RelPath, old: Kind },
    /// Create or update a directory or symlink (no content).
    Node { path: RelPath, stat: Stat },
    /// Same bytes, new mode (or mtime) only.
    Meta {
        path: RelPath,
        stat: Stat,
        old: Entry,
    },
    /// Content must be read (and maybe sent). `base` is the replica's current file at this
    /// path (a delta base), `renamed_from` a deleted path that held this inode.
    Content {
        path: RelPath,
        stat: Stat,
        base: Option<Entry>,
        renamed_from: Option<(RelPath, Entry)>,
        /// The stat matches the index but the entry asked to be re-verified: hash first, and
        /// send nothing if the bytes are what the replica holds.
        verify_only: bool,
    },
}

#[cfg(test)]
impl Action {
    pub fn path(&self) -> &RelPath {
        match self {
            Action::Delete { path, .. }
            | Action::Node { path, .. }
            | Action::Meta { path, .. }
            | Action::Content { path, .. } => path,
        }
    }
}

#[derive(Debug, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Unchanged paths whose extended attributes were read again (their change time moved, or
    /// was racy): the change time to record in the index, which needs no generation.
    pub local: Vec<(RelPath, i64)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }
}

/// Compares a walk with the index and decides what to send.
pub fn plan(index: &Manifest, walk: &Walk, roots: &[Option<RelPath>]) -> Plan {
    let gone = vanished(index, walk, roots);
    let mut by_ino = vanished_inodes(&gone);
    let mut actions = deletions(&gone);
    let mut local = Vec::new();
    for (p, st) in &walk.entries {
        let old = index.get(p);
        match compare(p, st, old, &mut by_ino) {
            Some(a) => actions.push(a),
            None if old.is_some_and(|o| o.ctime_ns != st.ctime_ns) => {
                local.push((p.clone(), st.ctime_ns));
            }
            None => {}
        }
    }
    Plan { actions, local }
}

/// Index entries that vanished within the covered roots (those under an unreadable directory
/// are kept, not vanished).
fn vanished(index: &Manifest, walk: &Walk, roots: &[Option<RelPath>]) -> BTreeMap<RelPath, Entry> {
    let kept = |p: &RelPath| walk.unreadable.iter().any(|k| p.starts_with(k));
    let mut gone: BTreeMap<RelPath, Entry> = BTreeMap::new();
    for r in roots {
        let candidates: Box<dyn Iterator<Item = (&RelPath, &Entry)>> = match r {
            None => Box::new(index.iter()),
            Some(r) => Box::new(
                index
                    .get(r)
                    .map(|e| (r, e))
                    .into_iter()
                    .chain(index.subtree(r)),
            ),
        };
        for (p, e) in candidates {
            if !walk.entries.contains_key(p) && !kept(p) {
                gone.insert(p.clone(), e.clone());
            }
        }
    }
    gone
}

/// Inodes of vanished files, for rename detection.
fn vanished_inodes(gone: &BTreeMap<RelPath, Entry>) -> HashMap<u64, (RelPath, Entry)> {
    let mut by_ino = HashMap::new();
    for (p, e) in gone {
        if kind_of(e) == Some(Kind::File) && e.ino != 0 {
            by_ino.insert(e.ino, (p.clone(), e.clone()));
        }
    }
    by_ino
}

/// A deleted directory removes its subtree on the replica: only the top needs an action.
fn deletions(gone: &BTreeMap<RelPath, Entry>) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut deleted_dirs: Vec<RelPath> = Vec::new();
    for (p, e) in gone {
        if deleted_dirs.iter().any(|d| p.starts_with(d)) {
            continue;
        }
        let Some(k) = kind_of(e) else { continue };
        if k == Kind::Dir {
            deleted_dirs.push(p.clone());
        }
        actions.push(Action::Delete {
            path: p.clone(),
            old: k,
        });
    }
    actions
}

/// What to do about one path found by the walk, given its index entry.
fn compare(
    p: &RelPath,
    st: &Stat,
    old: Option<&Entry>,
    by_ino: &mut HashMap<u64, (RelPath, Entry)>,
) -> Option<Action> {
    match (old, st.kind) {
        // A change of kind is one upsert: the receiver removes what was there (a directory
        // with its subtree) before placing the new kind.
        (Some(o), _) if kind_of(o) != Some(st.kind) => Some(new_action(p, st, None, by_ino)),
        (Some(o), Kind::File) => compare_file(p, st, o),
        (Some(o), _) => compare_node(p, st, o),
        (None, _) => Some(new_action(p, st, None, by_ino)),
    }
}

/// A file the index holds: unchanged (maybe to re-verify), new metadata only, or new content.
fn compare_file(p: &RelPath, st: &Stat, o: &Entry) -> Option<Action> {
    let content = |verify_only| Action::Content {
        path: p.clone(),
        stat: st.clone(),
        base: Some(o.clone()),
        renamed_from: None,
        verify_only,
    };
    if st.matches(o) {
        o.verify.then(|| content(true))
    } else if o.size == st.size && o.mtime_ns == st.mtime_ns && o.ino == st.ino && !o.verify {
        Some(Action::Meta {
            path: p.clone(),
            stat: st.clone(),
            old: o.clone(),
        })
    } else {
        Some(content(false))
    }
}

/// A directory or symlink the index holds: an update when its state or (recreated) its inode
/// changed.
fn compare_node(p: &RelPath, st: &Stat, o: &Entry) -> Option<Action> {
    let same_state = o.mode == st.mode
        && o.mtime_ns == st.mtime_ns
        && o.target[..] == st.target[..]
        && st.same_attrs(o);
    // Same state, new inode (recreated): record the inode only.
    (!same_state || o.ino != st.ino).then(|| Action::Node {
        path: p.clone(),
        stat: st.clone(),
    })
}

fn new_action(
    p: &RelPath,
    st: &Stat,
    base: Option<Entry>,
    by_ino: &mut HashMap<u64, (RelPath, Entry)>,
) -> Action {
    if st.kind != Kind::File {
        return Action::Node {
            path: p.clone(),
            stat: st.clone(),
        };
    }
    let renamed_from = by_ino
        .get(&st.ino)
        .filter(|(_, e)| e.size == st.size && e.mtime_ns == st.mtime_ns)
        .cloned();
    if renamed_from.is_some() {
        by_ino.remove(&st.ino);
    }
    Action::Content {
        path: p.clone(),
        stat: st.clone(),
        base,
        renamed_from,
        verify_only: false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn index_from(walk: &Walk) -> Manifest {
        let mut m = Manifest::new();
        for (p, st) in &walk.entries {
            let mut e = st.entry();
            if st.kind == Kind::File {
                e.blake3 = vec![0; 32];
            }
            m.insert(p.clone(), e);
        }
        m
    }

    fn rp(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn full(root: &Path) -> (Walk, Vec<Option<RelPath>>) {
        walk(root, &Scope::Full, &Exclude::default())
    }

    #[test]
    fn detects_each_kind_of_change() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        fs::create_dir(r.join("gone")).unwrap();
        fs::write(r.join("gone/x"), b"x").unwrap();
        fs::write(r.join("a/f"), b"hello").unwrap();
        fs::write(r.join("a/b/big"), vec![7u8; 1000]).unwrap();
        fs::write(r.join("chmod"), b"c").unwrap();
        symlink("a/f", r.join("link")).unwrap();
        let (w, roots) = full(r);
        let index = index_from(&w);
        assert!(plan(&index, &w, &roots).is_empty());

        fs::remove_dir_all(r.join("gone")).unwrap();
        fs::rename(r.join("a/b/big"), r.join("a/moved")).unwrap();
        fs::set_permissions(r.join("chmod"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::remove_file(r.join("link")).unwrap();
        symlink("elsewhere", r.join("link")).unwrap();
        fs::write(r.join("a/f"), b"hello world").unwrap();
        fs::create_dir(r.join("empty")).unwrap();
        let (w, roots) = full(r);
        let p = plan(&index, &w, &roots);
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for a in &p.actions {
            let what = match a {
                Action::Delete { .. } => "delete".to_string(),
                Action::Node { .. } => "node".to_string(),
                Action::Meta { .. } => "meta".to_string(),
                Action::Content {
                    renamed_from: Some((f, _)),
                    ..
                } => format!("rename from {f}"),
                Action::Content { base: Some(_), .. } => "delta".to_string(),
                Action::Content { .. } => "new".to_string(),
            };
            seen.insert(a.path().display(), what);
        }
        assert_eq!(seen["gone"], "delete");
        assert!(!seen.contains_key("gone/x"), "subtree deletion is implied");
        assert_eq!(seen["a/moved"], "rename from a/b/big");
        assert_eq!(seen["a/b/big"], "delete");
        assert_eq!(seen["chmod"], "meta");
        assert_eq!(seen["link"], "node");
        assert_eq!(seen["a/f"], "delta");
        assert_eq!(seen["empty"], "node");
    }

    #[test]
    fn unreadable_directory_is_not_deleted() {
        if unsafe { libc::geteuid() } == 0 {
            // root reads everything; simulate by listing a kept path directly.
            let mut w = Walk::default();
            w.unreadable.push(rp("secret"));
            let mut index = Manifest::new();
            index.insert(
                rp("secret"),
                Stat {
                    kind: Kind::Dir,
                    mode: 0o700,
                    mtime_ns: 1,
                    size: 0,
                    ino: 1,
                    target: vec![],
                    uid: 0,
                    gid: 0,
                    ctime_ns: 0,
                    xattrs: None,
                }
                .entry(),
            );
            index.insert(
                rp("secret/f"),
                Stat {
                    kind: Kind::File,
                    mode: 0o600,
                    mtime_ns: 1,
                    size: 1,
                    ino: 2,
                    target: vec![],
                    uid: 0,
                    gid: 0,
                    ctime_ns: 0,
                    xattrs: None,
                }
                .entry(),
            );
            let p = plan(&index, &w, &[None]);
            assert!(p.is_empty(), "{:?}", p.actions);
            return;
        }
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("secret")).unwrap();
        fs::write(d.path().join("secret/f"), b"x").unwrap();
        let (w, roots) = full(d.path());
        let index = index_from(&w);
        fs::set_permissions(d.path().join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
        let (w, roots2) = full(d.path());
        assert!(plan(&index, &w, &roots2).is_empty());
        let _ = roots;
        fs::set_permissions(d.path().join("secret"), fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn partial_scope_sees_new_subtree_and_deletions() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir(r.join("keep")).unwrap();
        fs::write(r.join("keep/k"), b"k").unwrap();
        fs::write(r.join("old"), b"o").unwrap();
        let (w, _) = full(r);
        let index = index_from(&w);
        fs::remove_file(r.join("old")).unwrap();
        fs::create_dir_all(r.join("new/deep")).unwrap();
        fs::write(r.join("new/deep/f"), b"f").unwrap();
        let scope = Scope::Paths([rp("old"), rp("new")].into_iter().collect());
        let (w, roots) = walk(r, &scope, &Exclude::default());
        let p = plan(&index, &w, &roots);
        let paths: BTreeSet<String> = p.actions.iter().map(|a| a.path().display()).collect();
        assert!(paths.contains("old"));
        assert!(paths.contains("new/deep/f"));
        assert!(!paths.contains("keep/k"));
    }

    #[test]
    fn racy_entry_is_reverified() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("f"), b"abc").unwrap();
        let (w, roots) = full(d.path());
        let mut index = index_from(&w);
        index.get_mut(&rp("f")).unwrap().verify = true;
        let p = plan(&index, &w, &roots);
        assert!(matches!(
            p.actions[..],
            [Action::Content {
                verify_only: true,
                ..
            }]
        ));
    }

    #[test]
    fn stage_dir_is_excluded() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join(STAGE_DIR_NAME)).unwrap();
        fs::write(d.path().join(STAGE_DIR_NAME).join("x"), b"x").unwrap();
        let ex = Exclude::new(d.path(), &d.path().join("nowhere"));
        let (w, _) = walk(d.path(), &Scope::Full, &ex);
        assert!(w.entries.is_empty());
    }

    /// A FIFO at `p` (created without `unsafe`).
    pub(crate) fn mkfifo(p: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
    }

    /// Runs `f` on another thread; a call that blocks fails the test instead of hanging it.
    pub(crate) fn must_not_block<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .expect("blocked on a non-regular file")
    }

    #[test]
    fn fifos_and_sockets_are_skipped_and_never_opened_blocking() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().to_path_buf();
        fs::write(r.join("f"), b"data").unwrap();
        fs::write(r.join("swapped"), b"was a file").unwrap();
        mkfifo(&r.join("fifo"));
        let _sock = std::os::unix::net::UnixListener::bind(r.join("sock")).unwrap();
        let (w, _) = full(&r);
        let names: BTreeSet<String> = w.entries.keys().map(|p| p.to_string()).collect();
        assert_eq!(names, BTreeSet::from(["f".into(), "swapped".into()]));
        // Swapped for a FIFO after the scan saw a regular file: skipped, not waited on.
        fs::remove_file(r.join("swapped")).unwrap();
        mkfifo(&r.join("swapped"));
        let opened = must_not_block(move || {
            ["swapped", "fifo", "sock", "f"].map(|n| open_regular(&r.join(n)).unwrap().is_some())
        });
        assert_eq!(opened, [false, false, false, true]);
        let mut data = String::new();
        io::Read::read_to_string(
            &mut open_regular(&d.path().join("f")).unwrap().unwrap(),
            &mut data,
        )
        .unwrap();
        assert_eq!(data, "data", "a regular file reads normally");
    }
}
