//! The manifest: what a replica holds, path by path, and its blake3 root.
//!
//! Both ends keep one: the receiver's is the committed replica; the sender's index is its view of
//! the receiver's manifest plus local inode numbers. The root covers kind, mode, mtime, size,
//! content hash, link target, and (where carried) owner, group and extended attributes of every
//! path, in path order, and nothing local (inodes, flags, change times), so equal roots mean
//! equal replicas. An entry without owner or extended attributes (recorded before they were
//! carried) hashes exactly as it always did, so old catalogs keep their roots.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::proto::state::Change;
use crate::proto::{Entry, EntryKind};
use crate::types::{Generation, RelPath};

/// Kind of a manifest entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

impl Kind {
    pub fn from_proto(k: i32) -> Option<Kind> {
        match EntryKind::try_from(k).ok()? {
            EntryKind::File => Some(Kind::File),
            EntryKind::Dir => Some(Kind::Dir),
            EntryKind::Symlink => Some(Kind::Symlink),
            EntryKind::Unspecified => None,
        }
    }

    pub fn to_proto(self) -> i32 {
        match self {
            Kind::File => EntryKind::File as i32,
            Kind::Dir => EntryKind::Dir as i32,
            Kind::Symlink => EntryKind::Symlink as i32,
        }
    }
}

pub fn kind_of(e: &Entry) -> Option<Kind> {
    Kind::from_proto(e.kind)
}

/// A 32-byte manifest root.
pub type Root = [u8; 32];

/// Whether two entries describe the same replicated state (ignoring local fields).
pub fn same_content(a: &Entry, b: &Entry) -> bool {
    a.kind == b.kind
        && a.mode == b.mode
        && a.mtime_ns == b.mtime_ns
        && a.size == b.size
        && a.blake3 == b.blake3
        && a.target == b.target
        && same_attrs(a, b)
}

/// Whether two entries carry the same owner, group and extended attributes.
pub fn same_attrs(a: &Entry, b: &Entry) -> bool {
    a.uid == b.uid && a.gid == b.gid && a.xattrs == b.xattrs
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("invalid path in change: {0}")]
    Path(#[from] crate::types::PathError),
    #[error("entry for {0} has no valid kind")]
    Kind(RelPath),
    #[error("{0}: parent is not a directory in the manifest")]
    Orphan(RelPath),
}

/// Previous values of the paths an [`Manifest::apply_undoable`] touched, in order.
#[derive(Debug)]
pub struct Undo(Vec<(RelPath, Option<Entry>)>);

impl Undo {
    /// Every path the apply added, changed or removed (some more than once).
    pub fn paths(&self) -> impl Iterator<Item = &RelPath> {
        self.0.iter().map(|(p, _)| p)
    }
}

/// An apply of at least this many changes (and an eighth of the manifest) ends with
/// [`Manifest::make_dense`].
const DENSE_AFTER: usize = 1000;

#[derive(Clone, Debug, Default)]
pub struct Manifest {
    pub generation: Generation,
    entries: BTreeMap<RelPath, Entry>,
}

impl Manifest {
    pub fn new() -> Manifest {
        Manifest::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, p: &RelPath) -> Option<&Entry> {
        self.entries.get(p)
    }

    pub fn get_mut(&mut self, p: &RelPath) -> Option<&mut Entry> {
        self.entries.get_mut(p)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&RelPath, &Entry)> {
        self.entries.iter()
    }

    pub fn insert(&mut self, p: RelPath, e: Entry) -> Option<Entry> {
        self.entries.insert(p, e)
    }

    pub fn remove(&mut self, p: &RelPath) -> Option<Entry> {
        self.entries.remove(p)
    }

    /// Everything strictly below `p`.
    pub fn subtree(&self, p: &RelPath) -> impl Iterator<Item = (&RelPath, &Entry)> {
        let (lo, hi) = p.subtree_range();
        self.entries.range(lo..hi)
    }

    /// The entries within `bounds`, in path order.
    pub fn range<'a>(
        &'a self,
        bounds: (Bound<&'a RelPath>, Bound<&'a RelPath>),
    ) -> impl Iterator<Item = (&'a RelPath, &'a Entry)> {
        self.entries.range::<RelPath, _>(bounds)
    }

    /// Total bytes of regular files.
    pub fn total_bytes(&self) -> u64 {
        self.entries
            .values()
            .filter(|e| kind_of(e) == Some(Kind::File))
            .map(|e| e.size)
            .sum()
    }

    pub fn file_count(&self) -> usize {
        self.entries
            .values()
            .filter(|e| kind_of(e) == Some(Kind::File))
            .count()
    }

    /// The blake3 root over all entries in path order.
    pub fn root(&self) -> Root {
        let mut h = RootHasher::new();
        for (p, e) in &self.entries {
            h.push(p, e);
            h.flush_if_full();
        }
        h.finalize()
    }

    /// Applies one generation's changes (already validated for syntax). Deleting a directory
    /// removes everything below it as well.
    pub fn apply(&mut self, changes: &[Change]) -> Result<(), ManifestError> {
        self.apply_undoable(changes).map(drop)
    }

    /// Like [`Manifest::apply`], returning what [`Manifest::undo`] needs to revert it. On error
    /// the manifest is left unchanged.
    pub fn apply_undoable(&mut self, changes: &[Change]) -> Result<Undo, ManifestError> {
        let mut undo = Undo(Vec::new());
        if let Err(e) = self.apply_inner(changes, &mut undo) {
            self.undo(undo);
            return Err(e);
        }
        // Rebuilding costs the whole map; only an apply of a good part of it pays for that.
        if changes.len() >= DENSE_AFTER.max(self.entries.len() / 8) {
            self.make_dense();
        }
        Ok(undo)
    }

    /// Rebuilds the map with full B-tree nodes. Inserting in key order (a first sync, a catalog
    /// read back) splits every node in half and leaves it so: at 100k entries the nodes took
    /// 30 MiB where about 17 do (ARCHITECTURE.md, "Memory"). Rebuilding from the sorted entries
    /// fills them; it moves what is there and allocates only the nodes.
    pub fn make_dense(&mut self) {
        self.entries = std::mem::take(&mut self.entries).into_iter().collect();
    }

    /// Reverts an [`Manifest::apply_undoable`].
    pub fn undo(&mut self, undo: Undo) {
        for (p, old) in undo.0.into_iter().rev() {
            match old {
                Some(e) => self.entries.insert(p, e),
                None => self.entries.remove(&p),
            };
        }
    }

    fn remove_logged(&mut self, p: &RelPath, undo: &mut Undo) -> Option<Entry> {
        let old = self.entries.remove(p);
        if old.is_some() {
            undo.0.push((p.clone(), old.clone()));
        }
        old
    }

    fn apply_inner(&mut self, changes: &[Change], undo: &mut Undo) -> Result<(), ManifestError> {
        for c in changes {
            let p = RelPath::new(c.path.to_vec())?;
            let new_kind = match &c.entry {
                None => None,
                Some(e) => Some(kind_of(e).ok_or_else(|| ManifestError::Kind(p.clone()))?),
            };
            // A directory that is deleted or becomes something else takes its subtree with it.
            let was_dir = self.entries.get(&p).and_then(kind_of) == Some(Kind::Dir);
            if was_dir && new_kind != Some(Kind::Dir) {
                let below: Vec<RelPath> = self.subtree(&p).map(|(k, _)| k.clone()).collect();
                for k in below {
                    self.remove_logged(&k, undo);
                }
            }
            match &c.entry {
                None => {
                    self.remove_logged(&p, undo);
                }
                Some(e) => {
                    let old = self.entries.insert(p.clone(), e.clone());
                    undo.0.push((p, old));
                }
            }
        }
        Ok(())
    }

    /// Checks that every entry's parent is a directory entry (the tree is well formed).
    pub fn check_tree(&self) -> Result<(), ManifestError> {
        for p in self.entries.keys() {
            if let Some(parent) = p.parent() {
                match self.entries.get(&parent).and_then(kind_of) {
                    Some(Kind::Dir) => {}
                    _ => return Err(ManifestError::Orphan(p.clone())),
                }
            }
        }
        Ok(())
    }
}

/// The manifest root, fed every entry in path order ([`entry_bytes`]). Entries are gathered
/// in a buffer hashed about a MiB at a time: blake3 hashes large inputs on all its SIMD lanes,
/// small ones a block at a time (20k entries: 4.5 ms with an update per entry, 6400-byte updates
/// 1.8 ms, one update 0.3 ms).
struct RootHasher {
    hasher: blake3::Hasher,
    pending: Vec<u8>,
}

impl RootHasher {
    /// The pending bytes are hashed once they reach this.
    const FLUSH: usize = 1 << 20;

    fn new() -> RootHasher {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"standby-manifest-v1");
        RootHasher {
            hasher,
            pending: Vec::with_capacity(Self::FLUSH + (64 << 10)),
        }
    }

    /// Adds one entry, after those added before.
    fn push(&mut self, p: &RelPath, e: &Entry) {
        entry_bytes(&mut self.pending, p, e);
    }

    /// Hashes the pending bytes if there are [`Self::FLUSH`] of them.
    fn flush_if_full(&mut self) {
        if self.pending.len() >= Self::FLUSH {
            self.hasher.update(&self.pending);
            self.pending.clear();
        }
    }

    fn finalize(mut self) -> Root {
        self.hasher.update(&self.pending);
        *self.hasher.finalize().as_bytes()
    }
}

/// Appends what the root hashes of one entry: every replicated field, unambiguously (the
/// recorder's runs are named by the blake3 of these bytes too).
pub(crate) fn entry_bytes(out: &mut Vec<u8>, p: &RelPath, e: &Entry) {
    let extended = e.uid.is_some() || e.gid.is_some() || e.xattrs.is_some();
    out.extend_from_slice(&(p.as_bytes().len() as u32).to_le_bytes());
    out.extend_from_slice(p.as_bytes());
    // The high bit of the kind says the extension below follows, so an entry without one hashes
    // as before it existed and the encoding stays unambiguous.
    out.push(e.kind as u8 | if extended { 0x80 } else { 0 });
    out.extend_from_slice(&e.mode.to_le_bytes());
    out.extend_from_slice(&e.mtime_ns.to_le_bytes());
    out.extend_from_slice(&e.size.to_le_bytes());
    out.extend_from_slice(&(e.blake3.len() as u32).to_le_bytes());
    out.extend_from_slice(&e.blake3);
    out.extend_from_slice(&(e.target.len() as u32).to_le_bytes());
    out.extend_from_slice(&e.target);
    if extended {
        attrs_bytes(out, e);
    }
}

/// Owner, group and extended attributes, each with a presence flag.
fn attrs_bytes(out: &mut Vec<u8>, e: &Entry) {
    let flags = u8::from(e.uid.is_some())
        | u8::from(e.gid.is_some()) << 1
        | u8::from(e.xattrs.is_some()) << 2;
    out.push(flags);
    out.extend_from_slice(&e.uid.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&e.gid.unwrap_or(0).to_le_bytes());
    let items = e.xattrs.as_ref().map_or(&[][..], |x| &x.items[..]);
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for x in items {
        out.extend_from_slice(&(x.name.len() as u32).to_le_bytes());
        out.extend_from_slice(&x.name);
        out.extend_from_slice(&(x.value.len() as u32).to_le_bytes());
        out.extend_from_slice(&x.value);
    }
}

/// The entry fields that travel on the wire (local ones cleared).
pub fn wire_entry(e: &Entry) -> Entry {
    Entry {
        ino: 0,
        verify: false,
        ctime_ns: 0,
        ..e.clone()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn file(size: u64, mtime: i64, hash: u8) -> Entry {
        Entry {
            kind: Kind::File.to_proto(),
            mode: 0o644,
            mtime_ns: mtime,
            size,
            blake3: vec![hash; 32],
            ..Default::default()
        }
    }

    pub fn dir() -> Entry {
        Entry {
            kind: Kind::Dir.to_proto(),
            mode: 0o755,
            ..Default::default()
        }
    }

    pub fn xattrs(items: &[(&str, &str)]) -> crate::proto::Xattrs {
        crate::proto::Xattrs {
            items: items
                .iter()
                .map(|(n, v)| crate::proto::Xattr {
                    name: n.as_bytes().to_vec(),
                    value: v.as_bytes().to_vec(),
                })
                .collect(),
        }
    }

    /// A large apply rebuilds the map densely: the same entries and root as small applies give,
    /// and its undo still puts the manifest back exactly.
    #[test]
    fn a_large_apply_is_made_dense_and_still_undoes() {
        let mut changes = vec![upsert("d", dir())];
        changes
            .extend((0..DENSE_AFTER as u64).map(|i| upsert(&format!("d/f{i:05}"), file(i, 1, 7))));
        let mut big = Manifest::new();
        let mut small = Manifest::new();
        big.apply(&[upsert("keep", file(1, 1, 1))]).unwrap();
        small.apply(&[upsert("keep", file(1, 1, 1))]).unwrap();
        let before = big.root();
        let undo = big.apply_undoable(&changes).unwrap();
        for c in changes.chunks(10) {
            small.apply(c).unwrap();
        }
        assert_eq!(big.len(), DENSE_AFTER + 2);
        assert_eq!(big.root(), small.root());
        assert!(big.iter().map(|(p, _)| p).is_sorted());
        big.undo(undo);
        assert_eq!(big.len(), 1);
        assert_eq!(big.root(), before);
    }

    /// An entry without owner or extended attributes hashes as it did before they were carried
    /// (catalogs written then keep their roots); the same attributes in another entry differ.
    #[test]
    fn old_entries_keep_their_root_and_attrs_are_unambiguous() {
        let mut m = Manifest::new();
        m.apply(&[upsert("f", file(3, 1, 1))]).unwrap();
        let mut h = blake3::Hasher::new();
        h.update(b"standby-manifest-v1");
        h.update(&1u32.to_le_bytes());
        h.update(b"f");
        h.update(&[Kind::File.to_proto() as u8]);
        h.update(&0o644u32.to_le_bytes());
        h.update(&1i64.to_le_bytes());
        h.update(&3u64.to_le_bytes());
        h.update(&32u32.to_le_bytes());
        h.update(&[1; 32]);
        h.update(&0u32.to_le_bytes());
        assert_eq!(
            m.root(),
            *h.finalize().as_bytes(),
            "the v1 encoding, unchanged"
        );
        let with = |uid, gid| {
            let mut m = Manifest::new();
            let e = Entry {
                uid,
                gid,
                ..file(3, 1, 1)
            };
            m.apply(&[upsert("f", e)]).unwrap();
            m.root()
        };
        assert_ne!(with(Some(5), None), with(None, Some(5)));
        assert_ne!(with(Some(0), None), m.root(), "uid 0 is not 'not carried'");
    }

    fn upsert(p: &str, e: Entry) -> Change {
        Change {
            path: p.as_bytes().to_vec(),
            entry: Some(e),
            ..Default::default()
        }
    }

    fn delete(p: &str) -> Change {
        Change {
            path: p.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn root_changes_with_any_replicated_field_only() {
        let mut m = Manifest::new();
        m.apply(&[upsert("d", dir()), upsert("d/f", file(3, 1, 1))])
            .unwrap();
        let r0 = m.root();
        m.get_mut(&RelPath::new("d/f").unwrap()).unwrap().ino = 99;
        assert_eq!(m.root(), r0, "inode is local");
        m.get_mut(&RelPath::new("d/f").unwrap()).unwrap().ctime_ns = 7;
        assert_eq!(m.root(), r0, "change time is local");
        for change in [
            file(4, 1, 1),
            file(3, 2, 1),
            file(3, 1, 2),
            Entry {
                mode: 0o600,
                ..file(3, 1, 1)
            },
            Entry {
                uid: Some(1234),
                ..file(3, 1, 1)
            },
            Entry {
                gid: Some(0),
                ..file(3, 1, 1)
            },
            Entry {
                xattrs: Some(Default::default()),
                ..file(3, 1, 1)
            },
            Entry {
                xattrs: Some(xattrs(&[("user.a", "1")])),
                ..file(3, 1, 1)
            },
        ] {
            let mut m2 = m.clone();
            m2.apply(&[upsert("d/f", change)]).unwrap();
            assert_ne!(m2.root(), r0);
        }
    }

    #[test]
    fn deleting_a_dir_deletes_below_and_type_change() {
        let mut m = Manifest::new();
        m.apply(&[
            upsert("d", dir()),
            upsert("d/a", file(1, 1, 1)),
            upsert("d/s", dir()),
            upsert("d/s/b", file(1, 1, 1)),
            upsert("d0", file(1, 1, 1)),
        ])
        .unwrap();
        m.check_tree().unwrap();
        let mut m2 = m.clone();
        m2.apply(&[delete("d")]).unwrap();
        assert_eq!(m2.len(), 1);
        m.apply(&[upsert("d", file(1, 1, 1))]).unwrap();
        assert_eq!(m.len(), 2);
        m.check_tree().unwrap();
    }

    #[test]
    fn undo_restores_exactly() {
        let mut m = Manifest::new();
        m.apply(&[
            upsert("d", dir()),
            upsert("d/a", file(1, 1, 1)),
            upsert("x", file(2, 2, 2)),
        ])
        .unwrap();
        let before = m.clone();
        let u = m
            .apply_undoable(&[
                delete("d"),
                upsert("x", file(3, 3, 3)),
                upsert("d", file(4, 4, 4)),
                upsert("new", dir()),
            ])
            .unwrap();
        assert_ne!(m.root(), before.root());
        m.undo(u);
        assert_eq!(m.root(), before.root());
        assert_eq!(m.len(), before.len());
    }

    #[test]
    fn orphan_detected() {
        let mut m = Manifest::new();
        m.apply(&[upsert("x/y", file(1, 1, 1))]).unwrap();
        assert!(m.check_tree().is_err());
    }
}
