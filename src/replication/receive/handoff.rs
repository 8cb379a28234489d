//! What each commit hands its watcher, the history recorder (ARCHITECTURE.md, "History",
//! "The recorder's copy of the manifest").
//!
//! The recorder needs every committed manifest, but the session holds the replica's (and the
//! replica lock) while it lasts. A whole copy is handed over only when the watcher holds none
//! that follows the commits; after that, each commit hands over just its changes, which the
//! watcher applies to its own copy. Copying a 20 000-entry manifest cost 6–8 ms a commit,
//! about as much as recording the snapshot; a few changes cost nothing. The commits are
//! chained by generation: a commit that does not follow the last one handed over (a
//! generation applied without being handed, a seed) hands over a whole copy again.

use std::sync::Arc;
use std::time::SystemTime;

use super::edits::Edits;
use crate::proto::state::Change;
use crate::replication::manifest::Manifest;
use crate::types::Generation;

/// How the watcher gets the newest committed manifest.
pub enum Update {
    /// A whole copy.
    Whole(Arc<Manifest>),
    /// The changes of the generations committed since generation `from`, the last one handed
    /// over, in order: applied to the watcher's copy of `from` they give the newest.
    Changes {
        from: Generation,
        changes: Vec<Change>,
    },
}

/// What [`super::Receiver::take_committed`] hands over: the newest committed manifest (or how
/// to get it from the last one), its generation and number of entries, when it was committed,
/// its root as the commit checked it, and what the generations since the previous take changed
/// inside files updated in place.
pub struct Handover {
    pub update: Update,
    pub generation: Generation,
    pub entries: usize,
    pub at: SystemTime,
    pub root: [u8; 32],
    pub edits: Edits,
}

/// Changes waiting for the watcher are handed over as a whole copy instead once there are more
/// of them than entries in the manifest (a record that lasts while many commits come): what
/// waits never outgrows one manifest.
fn most_changes(entries: usize) -> usize {
    entries.max(1024)
}

/// One commit, as [`Handoff::commit`] takes it.
pub(super) struct Commit<'a> {
    pub manifest: &'a Manifest,
    /// The generation the commit was applied to.
    pub before: Generation,
    pub changes: Vec<Change>,
    pub at: SystemTime,
    pub root: [u8; 32],
}

/// The newest commit not taken yet, and what the watcher holds.
#[derive(Default)]
pub(super) struct Handoff {
    newest: Option<Pending>,
    /// What the generations committed since the last take changed in place.
    pub edits: Edits,
    /// The generation the watcher's copy is at once it applies what is pending, while it keeps
    /// one that follows the commits.
    follows: Option<Generation>,
}

struct Pending {
    update: Update,
    generation: Generation,
    entries: usize,
    at: SystemTime,
    root: [u8; 32],
}

impl Handoff {
    /// Whether a commit applied to generation `before`, with `changes` changes, is handed over
    /// as a whole copy of its manifest of `entries` entries: it does not follow the last
    /// generation handed over to a watcher that keeps a copy, or the changes waiting would
    /// outnumber the entries. The caller makes the copy outside the lock.
    pub fn wants_copy(&self, before: Generation, changes: usize, entries: usize) -> bool {
        let waiting = match &self.newest {
            None => 0,
            Some(Pending {
                update: Update::Changes { changes, .. },
                ..
            }) => changes.len(),
            Some(Pending {
                update: Update::Whole(_),
                ..
            }) => return true,
        };
        self.follows != Some(before) || (waiting > 0 && waiting + changes > most_changes(entries))
    }

    /// Hands over a commit made while someone watched: its changes, or `copy` (a copy of its
    /// manifest, made when [`Handoff::wants_copy`] said so; made here if that changed since).
    pub fn commit(&mut self, c: Commit<'_>, copy: Option<Arc<Manifest>>) {
        let entries = c.manifest.len();
        let update = if self.wants_copy(c.before, c.changes.len(), entries) {
            self.follows = None;
            Update::Whole(copy.unwrap_or_else(|| Arc::new(c.manifest.clone())))
        } else {
            match self.newest.take() {
                Some(Pending {
                    update: Update::Changes { from, mut changes },
                    ..
                }) => {
                    changes.extend(c.changes);
                    Update::Changes { from, changes }
                }
                _ => Update::Changes {
                    from: c.before,
                    changes: c.changes,
                },
            }
        };
        let generation = c.manifest.generation;
        if self.follows.is_some() {
            self.follows = Some(generation);
        }
        self.newest = Some(Pending {
            update,
            generation,
            entries,
            at: c.at,
            root: c.root,
        });
    }

    /// The replica's manifest changed without a commit being handed over (nobody watched, a
    /// seed): the watcher's copy is stale, and so is anything pending.
    pub fn lose(&mut self) {
        self.follows = None;
        self.newest = None;
        self.edits.lose();
    }

    /// The newest commit not taken yet; a whole copy taken makes the watcher's copy follow the
    /// commits from it.
    pub fn take(&mut self) -> Option<Handover> {
        let p = self.newest.take()?;
        if let Update::Whole(_) = p.update {
            self.follows = Some(p.generation);
        }
        Some(Handover {
            update: p.update,
            generation: p.generation,
            entries: p.entries,
            at: p.at,
            root: p.root,
            edits: std::mem::take(&mut self.edits),
        })
    }

    /// The watcher dropped its copy: the next commit hands over a whole one.
    pub fn unfollow(&mut self) {
        self.follows = None;
        if let Some(Pending {
            update: Update::Changes { .. },
            ..
        }) = self.newest
        {
            self.newest = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::manifest::tests::file;

    fn upsert(p: &str, size: u64) -> Change {
        Change {
            path: p.as_bytes().to_vec(),
            entry: Some(file(size, 1, 7)),
            ..Default::default()
        }
    }

    /// Commits `changes` to `m` and hands the commit over.
    fn commit(h: &mut Handoff, m: &mut Manifest, changes: Vec<Change>) {
        let before = m.generation;
        m.apply(&changes).unwrap();
        m.generation = before.next();
        let copy = h
            .wants_copy(before, changes.len(), m.len())
            .then(|| Arc::new(m.clone()));
        h.commit(
            Commit {
                manifest: m,
                before,
                changes,
                at: SystemTime::UNIX_EPOCH,
                root: m.root(),
            },
            copy,
        );
    }

    /// What the watcher's copy becomes from a handover.
    fn follow(copy: &mut Option<Manifest>, h: Handover) {
        match h.update {
            Update::Whole(m) => *copy = Some((*m).clone()),
            Update::Changes { from, changes } => {
                let c = copy.as_mut().expect("a copy to apply changes to");
                assert_eq!(c.generation, from);
                c.apply(&changes).unwrap();
                c.generation = h.generation;
            }
        }
        assert_eq!(copy.as_ref().unwrap().len(), h.entries);
    }

    #[test]
    fn a_copy_first_then_changes_that_keep_it_equal() {
        let (mut h, mut m, mut copy) = (Handoff::default(), Manifest::new(), None);
        commit(&mut h, &mut m, vec![upsert("a", 1)]);
        let first = h.take().unwrap();
        assert!(matches!(first.update, Update::Whole(_)));
        follow(&mut copy, first);
        // Two commits before the next take: their changes together, in order.
        commit(&mut h, &mut m, vec![upsert("b", 2)]);
        commit(&mut h, &mut m, vec![upsert("b", 3), upsert("c", 4)]);
        let next = h.take().unwrap();
        assert!(matches!(next.update, Update::Changes { ref changes, .. } if changes.len() == 3));
        follow(&mut copy, next);
        assert_eq!(copy.as_ref().unwrap().root(), m.root());
        assert!(h.take().is_none(), "taken once");
    }

    #[test]
    fn a_gap_or_a_dropped_copy_hands_over_a_whole_one() {
        let (mut h, mut m, mut copy) = (Handoff::default(), Manifest::new(), None);
        commit(&mut h, &mut m, vec![upsert("a", 1)]);
        follow(&mut copy, h.take().unwrap());
        // A generation applied without being handed over.
        m.apply(&[upsert("gap", 9)]).unwrap();
        m.generation = m.generation.next();
        commit(&mut h, &mut m, vec![upsert("b", 2)]);
        let after_gap = h.take().unwrap();
        assert!(matches!(after_gap.update, Update::Whole(_)));
        follow(&mut copy, after_gap);
        assert_eq!(copy.as_ref().unwrap().root(), m.root());
        // The watcher drops its copy with changes pending: they go, a copy comes next.
        commit(&mut h, &mut m, vec![upsert("c", 3)]);
        h.unfollow();
        assert!(h.take().is_none());
        commit(&mut h, &mut m, vec![upsert("d", 4)]);
        assert!(matches!(h.take().unwrap().update, Update::Whole(_)));
        // Lost: nothing pending, and a copy again.
        commit(&mut h, &mut m, vec![upsert("e", 5)]);
        h.lose();
        assert!(h.take().is_none());
        commit(&mut h, &mut m, vec![upsert("f", 6)]);
        assert!(matches!(h.take().unwrap().update, Update::Whole(_)));
    }

    #[test]
    fn changes_that_pile_up_past_the_manifest_become_a_copy() {
        let (mut h, mut m, mut copy) = (Handoff::default(), Manifest::new(), None);
        commit(&mut h, &mut m, vec![upsert("a", 1)]);
        follow(&mut copy, h.take().unwrap());
        // The watcher does not take while 1100 commits rewrite the same path.
        for i in 0..1100 {
            commit(&mut h, &mut m, vec![upsert("a", i)]);
        }
        let taken = h.take().unwrap();
        assert!(
            matches!(taken.update, Update::Whole(_)),
            "a copy, not 1100 changes"
        );
        follow(&mut copy, taken);
        assert_eq!(copy.as_ref().unwrap().root(), m.root());
        // It follows the commits from that copy again.
        commit(&mut h, &mut m, vec![upsert("b", 2)]);
        assert!(matches!(h.take().unwrap().update, Update::Changes { .. }));
    }

    #[test]
    fn an_untaken_copy_is_replaced_by_a_newer_copy() {
        let (mut h, mut m) = (Handoff::default(), Manifest::new());
        commit(&mut h, &mut m, vec![upsert("a", 1)]);
        commit(&mut h, &mut m, vec![upsert("b", 2)]);
        let taken = h.take().unwrap();
        let Update::Whole(copy) = taken.update else {
            panic!("a copy, not changes to a copy the watcher never had");
        };
        assert_eq!(copy.root(), m.root());
        assert_eq!(taken.generation, m.generation);
    }
}
