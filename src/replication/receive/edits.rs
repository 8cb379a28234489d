//! Which byte ranges commits changed in files updated in place, kept for the history recorder
//! (ARCHITECTURE.md, "History", "Recording only what changed").
//!
//! A file changed by a patch (`Change::patch`, its extents written in place, then cut or
//! extended to its new size) differs from its content before only inside those extents and the
//! span between its old and new sizes. [`Edits`] gathers this per path over the commits between
//! two takes by the recorder, with the content the first of them started from (its blake3 and
//! size): the recorder finds that content's chunks in its store by blake3 and re-chunks only
//! around the ranges. Any other change of a path (replaced whole, linked from another path,
//! deleted, a change of kind) forgets what was gathered for it: the recorder then reads the file
//! whole, as it does for a path it finds nothing for.

use std::collections::HashMap;

use crate::proto::Entry;
use crate::proto::state::Change;
use crate::replication::manifest::{Kind, Manifest, kind_of};
use crate::types::RelPath;

/// At most this many ranges are kept over all paths; past it everything gathered is dropped
/// (the recorder reads changed files whole) until the next take.
pub const MAX_RANGES: usize = 1 << 16;

/// One file's changes since `base`: sorted, disjoint, non-adjacent half-open byte ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patched {
    /// The blake3 and size of the content these ranges were changed in.
    pub base_blake3: [u8; 32],
    pub base_size: u64,
    pub ranges: Vec<(u64, u64)>,
}

/// What commits changed in place, per path, since the last take.
#[derive(Debug, Default)]
pub struct Edits {
    files: HashMap<RelPath, Patched>,
    ranges: usize,
    /// Something was not gathered (too many ranges, a generation applied without being handed
    /// over): nothing here may be trusted until the next take.
    lost: bool,
}

impl Edits {
    /// The file's changes, if every change since its base is known.
    pub fn get(&self, p: &RelPath) -> Option<&Patched> {
        if self.lost {
            return None;
        }
        self.files.get(p)
    }

    pub fn is_empty(&self) -> bool {
        self.lost || self.files.is_empty()
    }

    /// Forgets everything: some change to the replica was not gathered.
    pub fn lose(&mut self) {
        self.files = HashMap::new();
        self.ranges = 0;
        self.lost = true;
    }

    /// Folds in one generation: `before` is the manifest it applies to, `changes` its changes.
    pub fn add(&mut self, before: &Manifest, changes: &[Change]) {
        if self.lost {
            return;
        }
        for c in changes {
            let Ok(p) = RelPath::new(c.path.to_vec()) else {
                continue;
            };
            self.change(&p, before.get(&p), c);
        }
        if self.ranges > MAX_RANGES {
            self.lose();
        }
    }

    fn change(&mut self, p: &RelPath, old: Option<&Entry>, c: &Change) {
        let new = c.entry.as_ref();
        let (Some(old), Some(new)) = (is_file(old), is_file(new)) else {
            self.forget(p);
            return;
        };
        if c.patch.is_empty() {
            // Metadata only keeps what was gathered; new content from anywhere else drops it.
            if old.blake3 != new.blake3 || old.size != new.size {
                self.forget(p);
            }
            return;
        }
        let Ok(base_blake3) = <[u8; 32]>::try_from(&old.blake3[..]) else {
            self.forget(p);
            return;
        };
        let mut add: Vec<(u64, u64)> = c
            .extents
            .iter()
            .filter(|e| e.len > 0)
            .map(|e| (e.offset, e.offset.saturating_add(e.len)))
            .collect();
        if old.size != new.size {
            add.push((old.size.min(new.size), old.size.max(new.size)));
        }
        let entry = self.files.entry(p.clone()).or_insert_with(|| Patched {
            base_blake3,
            base_size: old.size,
            ranges: Vec::new(),
        });
        self.ranges -= entry.ranges.len();
        entry.ranges.extend(add);
        entry.ranges = merged(std::mem::take(&mut entry.ranges));
        self.ranges += entry.ranges.len();
    }

    fn forget(&mut self, p: &RelPath) {
        if let Some(gone) = self.files.remove(p) {
            self.ranges -= gone.ranges.len();
        }
    }
}

fn is_file(e: Option<&Entry>) -> Option<&Entry> {
    e.filter(|e| kind_of(e) == Some(Kind::File))
}

/// Sorted, disjoint and non-adjacent; empty ranges dropped.
pub fn merged(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.retain(|(a, b)| a < b);
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (a, b) in r {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::state::Extent;
    use crate::replication::manifest::tests::{dir, file};

    fn patch(path: &str, entry: Entry, extents: &[(u64, u64)]) -> Change {
        Change {
            path: path.as_bytes().to_vec(),
            entry: Some(entry),
            patch: "p".into(),
            extents: extents
                .iter()
                .map(|&(offset, len)| Extent { offset, len, at: 0 })
                .collect(),
            ..Default::default()
        }
    }

    fn manifest(entries: &[(&str, Entry)]) -> Manifest {
        let mut m = Manifest::default();
        for (p, e) in entries {
            m.insert(RelPath::new(*p).unwrap(), e.clone());
        }
        m
    }

    #[test]
    fn patches_gather_ranges_over_generations_from_the_first_base() {
        let (v1, v2, v3) = (file(100, 1, 1), file(120, 2, 2), file(120, 3, 3));
        let mut e = Edits::default();
        e.add(
            &manifest(&[("f", v1.clone())]),
            &[patch("f", v2.clone(), &[(10, 5)])],
        );
        e.add(
            &manifest(&[("f", v2)]),
            &[patch("f", v3, &[(12, 8), (50, 4)])],
        );
        let p = e.get(&RelPath::new("f").unwrap()).unwrap();
        assert_eq!(p.base_blake3[..], v1.blake3[..]);
        assert_eq!(p.base_size, 100);
        assert_eq!(p.ranges, [(10, 20), (50, 54), (100, 120)]);
    }

    #[test]
    fn any_other_change_forgets_the_path_and_metadata_keeps_it() {
        let (v1, v2) = (file(100, 1, 1), file(100, 2, 2));
        let f = RelPath::new("f").unwrap();
        let mut e = Edits::default();
        e.add(
            &manifest(&[("f", v1.clone())]),
            &[patch("f", v2.clone(), &[(0, 4)])],
        );
        let mut touched = v2.clone();
        touched.mtime_ns += 1;
        let meta = Change {
            path: b"f".to_vec(),
            entry: Some(touched.clone()),
            set_meta: true,
            ..Default::default()
        };
        e.add(&manifest(&[("f", v2.clone())]), &[meta]);
        assert!(e.get(&f).is_some(), "a metadata change keeps the ranges");
        let replaced = Change {
            path: b"f".to_vec(),
            entry: Some(file(100, 9, 9)),
            stage: "s".into(),
            ..Default::default()
        };
        e.add(&manifest(&[("f", touched.clone())]), &[replaced]);
        assert!(e.get(&f).is_none(), "replaced whole");
        e.add(
            &manifest(&[("f", v1.clone())]),
            &[patch("f", v2.clone(), &[(0, 4)])],
        );
        let to_dir = Change {
            path: b"f".to_vec(),
            entry: Some(dir()),
            ..Default::default()
        };
        e.add(&manifest(&[("f", v2)]), &[to_dir]);
        assert!(e.get(&f).is_none(), "a change of kind");
    }

    #[test]
    fn too_many_ranges_or_a_loss_drop_everything() {
        let (v1, v2) = (file(1 << 30, 1, 1), file(1 << 30, 2, 2));
        let many: Vec<(u64, u64)> = (0..=MAX_RANGES as u64).map(|i| (i * 10, 1)).collect();
        let mut e = Edits::default();
        e.add(
            &manifest(&[("f", v1.clone())]),
            &[patch("f", v2.clone(), &many)],
        );
        assert!(e.is_empty() && e.get(&RelPath::new("f").unwrap()).is_none());
        e.add(&manifest(&[("f", v1)]), &[patch("f", v2, &[(0, 1)])]);
        assert!(e.is_empty(), "lost until taken");
    }

    #[test]
    fn merged_joins_overlapping_and_adjacent_ranges() {
        assert_eq!(
            merged(vec![(5, 9), (0, 2), (2, 3), (8, 12), (20, 20)]),
            [(0, 3), (5, 12)]
        );
    }
}
