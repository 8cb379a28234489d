//! A restore's order and budget. A restore sets [`SenderOptions::generation_budget`] so that
//! what an application needs first becomes durable first, generation by generation, instead of
//! everything at the very end.
//!
//! [`SenderOptions::generation_budget`]: super::SenderOptions::generation_budget

use super::content::Job;
use crate::types::RelPath;

/// Files over this size come after the small ones.
const SMALL: u64 = 1 << 20;

/// Files left for a later generation because this one's budget was spent.
#[derive(Default)]
pub(super) struct Deferred {
    pub(super) paths: Vec<RelPath>,
    pub(super) bytes: u64,
}

/// Keeps, in restore order, the files that fit in `budget` and defers the rest. The first file
/// always fits, so a generation makes progress even past a file larger than the budget.
pub(super) fn within_budget(mut jobs: Vec<Job>, budget: u64) -> (Vec<Job>, Deferred) {
    order_for_restore(&mut jobs);
    let mut deferred = Deferred::default();
    let mut used = 0u64;
    let mut keep = Vec::with_capacity(jobs.len());
    for j in jobs {
        if used > 0 && used + j.stat.size > budget {
            deferred.bytes += j.stat.size;
            deferred.paths.push(j.path);
        } else {
            used += j.stat.size;
            keep.push(j);
        }
    }
    (keep, deferred)
}

/// Restore order: small files first (they are most of what an application needs to start:
/// code, configuration), then the rest; within each, the most recently changed first (the
/// latest checkpoint before older ones).
fn order_for_restore(jobs: &mut [Job]) {
    jobs.sort_by(|a, b| {
        (a.stat.size > SMALL)
            .cmp(&(b.stat.size > SMALL))
            .then(b.stat.mtime_ns.cmp(&a.stat.mtime_ns))
            .then(a.path.cmp(&b.path))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::manifest::Kind;
    use crate::replication::scan::Stat;

    fn job(path: &str, size: u64, mtime_ns: i64) -> Job {
        let stat = Stat {
            kind: Kind::File,
            mode: 0o644,
            mtime_ns,
            size,
            ino: 1,
            target: vec![],
            uid: 0,
            gid: 0,
            ctime_ns: 0,
            xattrs: None,
        };
        let path = RelPath::new(path).unwrap();
        Job {
            path,
            stat,
            base: None,
        }
    }

    fn paths(jobs: &[Job]) -> Vec<String> {
        jobs.iter().map(|j| j.path.display()).collect()
    }

    #[test]
    fn small_and_recent_first_within_the_budget() {
        let jobs = vec![
            job("big-old", 4 << 20, 1),
            job("small-old", 10, 1),
            job("big-new", 4 << 20, 9),
            job("small-new", 10, 9),
        ];
        let (keep, deferred) = within_budget(jobs, (4 << 20) + 20);
        assert_eq!(paths(&keep), ["small-new", "small-old", "big-new"]);
        assert_eq!(deferred.paths, [RelPath::new("big-old").unwrap()]);
        assert_eq!(deferred.bytes, 4 << 20);
    }

    #[test]
    fn the_first_file_always_fits() {
        let (keep, deferred) = within_budget(vec![job("huge", 100, 1), job("b", 1, 1)], 10);
        assert_eq!(paths(&keep), ["b"]);
        assert_eq!(deferred.bytes, 100);
        let (keep, deferred) = within_budget(vec![job("huge", 100, 1)], 10);
        assert_eq!(paths(&keep), ["huge"]);
        assert!(deferred.paths.is_empty());
    }
}
