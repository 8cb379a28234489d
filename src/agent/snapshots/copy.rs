//! The recorder's copy of the committed manifest (ARCHITECTURE.md, "The recorder's copy of
//! the manifest"): taken whole once, then kept up to date by applying the changes each commit
//! hands over, and dropped after a quiet while so that only the replica's manifest stays
//! resident at rest.

use std::sync::Arc;
use std::time::Duration;

use crate::history::Changed;
use crate::replication::manifest::Manifest;
use crate::replication::receive::Update;
use crate::types::{Generation, RelPath};

/// The copy is dropped after this long without a commit; the next commit hands over a whole
/// one again (a copy of a 100k-file manifest is tens of MiB).
pub const KEEP_IDLE: Duration = Duration::from_secs(10);

/// The manifest of generation `generation` with `entries` entries that a handover's `update`
/// gives, from the copy the recorder holds (None: it holds none), and the paths its changes
/// touched (None: a whole copy, they are not known). Changes are applied
/// to the copy itself when nothing else holds it. An error says why the copy cannot be brought
/// up to date: the recorder drops it and asks for a whole one.
pub fn follow(
    copy: Option<Arc<Manifest>>,
    update: Update,
    generation: Generation,
    entries: usize,
) -> Result<(Arc<Manifest>, Option<Vec<RelPath>>), String> {
    let (m, touched) = match update {
        Update::Whole(m) => (m, None),
        Update::Changes { from, changes } => {
            let mut m = copy.ok_or("changes handed over without a copy to apply them to")?;
            if m.generation != from {
                return Err(format!(
                    "changes from generation {from} handed over for a copy of generation {}",
                    m.generation
                ));
            }
            let inner = Arc::make_mut(&mut m);
            let undo = inner
                .apply_undoable(&changes)
                .map_err(|e| format!("applying the changes handed over: {e}"))?;
            inner.generation = generation;
            (m, Some(undo.paths().cloned().collect()))
        }
    };
    if m.generation != generation || m.len() != entries {
        return Err(format!(
            "the copy has generation {} and {} entries; the commit has {generation} and {entries}",
            m.generation,
            m.len(),
        ));
    }
    Ok((m, touched))
}

/// Folds the paths a handover touched into those changed since the last record (None: not
/// known, the next record walks every path; so also when they are many).
pub fn fold(
    changed: Option<Changed>,
    touched: Option<Vec<RelPath>>,
    m: &Manifest,
) -> Option<Changed> {
    let (mut changed, touched) = (changed?, touched?);
    changed.paths.extend(touched);
    (changed.paths.len() <= m.len() / 4 + 64).then_some(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::state::Change;
    use crate::replication::manifest::tests::file;

    fn follow_to(
        copy: Option<Arc<Manifest>>,
        update: Update,
        generation: u64,
        entries: usize,
    ) -> Result<(Arc<Manifest>, Option<Vec<RelPath>>), String> {
        follow(copy, update, Generation(generation), entries)
    }

    fn upsert(p: &str) -> Change {
        Change {
            path: p.as_bytes().to_vec(),
            entry: Some(file(1, 1, 1)),
            ..Default::default()
        }
    }

    fn manifest(generation: u64, paths: &[&str]) -> Arc<Manifest> {
        let mut m = Manifest::new();
        m.apply(&paths.iter().map(|p| upsert(p)).collect::<Vec<_>>())
            .unwrap();
        m.generation = Generation(generation);
        Arc::new(m)
    }

    #[test]
    fn changes_bring_the_copy_up_to_date_in_place() {
        let copy = manifest(3, &["a"]);
        let at = Arc::as_ptr(&copy);
        let changes = Update::Changes {
            from: Generation(3),
            changes: vec![upsert("b")],
        };
        let (m, touched) = follow_to(Some(copy), changes, 5, 2).unwrap();
        assert_eq!(touched, Some(vec![RelPath::new(b"b".to_vec()).unwrap()]));
        assert_eq!(m.root(), manifest(5, &["a", "b"]).root());
        assert_eq!(m.generation, Generation(5));
        assert_eq!(
            Arc::as_ptr(&m),
            at,
            "applied to the copy, not to a clone of it"
        );
    }

    #[test]
    fn a_copy_that_cannot_follow_is_refused() {
        let changes = |from| Update::Changes {
            from: Generation(from),
            changes: vec![upsert("b")],
        };
        // No copy; a copy of another generation; counts that disagree.
        assert!(follow_to(None, changes(3), 4, 2).is_err());
        assert!(follow_to(Some(manifest(2, &["a"])), changes(3), 4, 2).is_err());
        assert!(follow_to(Some(manifest(3, &["a"])), changes(3), 4, 3).is_err());
        // Changes the manifest refuses: reported, not a panic.
        let mut bad = upsert("b");
        bad.entry.as_mut().unwrap().kind = 99;
        let bad = Update::Changes {
            from: Generation(3),
            changes: vec![bad],
        };
        let err = follow_to(Some(manifest(3, &["a"])), bad, 4, 2).unwrap_err();
        assert!(err.contains("applying the changes"), "{err}");
        // A whole copy needs no copy before it.
        let whole = Update::Whole(manifest(7, &["a", "b"]));
        assert!(follow_to(None, whole, 7, 2).is_ok());
    }
}
