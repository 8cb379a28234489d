//! The walk that takes the runs no changed path falls in as they were gives the snapshot a
//! walk over every path gives, whatever the changes (ARCHITECTURE.md, "History", "Walking only
//! what changed").

use std::collections::BTreeSet;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};

use super::{at, manifest_of};
use crate::history::record::ends_run;
use crate::history::{Changed, Hint, Store};
use crate::replication::manifest::Manifest;
use crate::replication::receive::edits::Edits;
use crate::types::{Generation, RelPath};

/// Paths added, changed or removed between two manifests.
fn changed(a: &Manifest, b: &Manifest) -> BTreeSet<RelPath> {
    let mut out: BTreeSet<RelPath> = a
        .iter()
        .filter(|(p, e)| b.get(p) != Some(*e))
        .map(|(p, _)| p.clone())
        .collect();
    out.extend(
        b.iter()
            .filter(|(p, _)| a.get(p).is_none())
            .map(|(p, _)| p.clone()),
    );
    out
}

/// Names that sort around one another and around a directory's subtree ("d", "d-x", "d.x",
/// "d/…", "d0").
fn name(rng: &mut StdRng) -> String {
    let stem = ["a", "d", "m", "z"][rng.random_range(0..4)];
    let tail = ["", "-x", ".x", "0", "_1"][rng.random_range(0..5)];
    format!("{stem}{}{tail}", rng.random_range(0..40))
}

fn write(p: &Path, rng: &mut StdRng) {
    let mut data = vec![0u8; rng.random_range(0..300)];
    rng.fill_bytes(&mut data);
    std::fs::write(p, data).unwrap();
}

/// A directory of more than `RUN_MAX` paths none of which ends a run by its hash: its runs end
/// because they are full.
fn full_dir(root: &Path) {
    let dir = root.join("full");
    std::fs::create_dir(&dir).unwrap();
    let (mut n, mut i) = (0, 0);
    while n < 1100 {
        let p = RelPath::new(format!("full/f{i}").into_bytes()).unwrap();
        if !ends_run(&p) {
            std::fs::write(dir.join(format!("f{i}")), i.to_string()).unwrap();
            n += 1;
        }
        i += 1;
    }
}

/// One random change of the tree: files added, rewritten, removed, a directory removed or
/// added, a mode changed, a path added to the full directory (shifting its cuts).
fn mutate(root: &Path, rng: &mut StdRng) {
    let dirs: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && !p.ends_with("full"))
        .collect();
    let dir = dirs[rng.random_range(0..dirs.len())].clone();
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let file = (!files.is_empty()).then(|| files[rng.random_range(0..files.len())].clone());
    match (rng.random_range(0..7), file) {
        (0, _) | (1, None) => write(&dir.join(name(rng)), rng),
        (1, Some(f)) => write(&f, rng),
        (2, Some(f)) => std::fs::remove_file(f).unwrap(),
        (3, _) if dirs.len() > 3 => std::fs::remove_dir_all(&dir).unwrap(),
        (4, _) => {
            let d = root.join(name(rng));
            if !d.exists() {
                std::fs::create_dir(&d).unwrap();
                write(&d.join(name(rng)), rng);
            }
        }
        (5, Some(f)) => {
            use std::os::unix::fs::PermissionsExt;
            let mode = [0o600, 0o644, 0o755][rng.random_range(0..3)];
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        _ => std::fs::write(
            root.join("full")
                .join(format!("g{}", rng.random_range(0..50))),
            b"g",
        )
        .unwrap(),
    }
}

#[test]
fn skipping_unchanged_runs_gives_the_snapshot_a_full_walk_gives() {
    let (replica, da, db) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let root = replica.path();
    let mut rng = StdRng::seed_from_u64(31);
    for _ in 0..40 {
        let d = root.join(name(&mut rng));
        std::fs::create_dir_all(&d).unwrap();
        for _ in 0..60 {
            write(&d.join(name(&mut rng)), &mut rng);
        }
    }
    full_dir(root);
    let (skips, walks) = (
        Store::open(da.path()).unwrap(),
        Store::open(db.path()).unwrap(),
    );
    let mut m = manifest_of(root, 1);
    skips.record(root, &m, at(1)).unwrap();
    walks.record(root, &m, at(1)).unwrap();
    let (mut skipped, mut walked) = (0, 0);
    for g in 2..40u64 {
        for _ in 0..rng.random_range(1..4) {
            mutate(root, &mut rng);
        }
        if g % 5 == 0 {
            // After the last path: the run the manifest's end cut goes on.
            std::fs::write(root.join(format!("zz{g}")), b"last").unwrap();
        }
        let next = manifest_of(root, g);
        let changes = Changed {
            since: m.generation,
            paths: changed(&m, &next),
        };
        let holds = move || Generation(g);
        let hint = Hint {
            root: next.root(),
            edits: &Edits::default(),
            changed: Some(&changes),
            workspace_generation: &holds,
        };
        let a = skips.record_with(root, &next, at(g), Some(&hint)).unwrap();
        let b = walks.record(root, &next, at(g)).unwrap();
        assert_eq!(a.info.id, b.info.id, "generation {g}: {changes:?}");
        (skipped, walked) = (skipped + a.entries_walked, walked + b.entries_walked);
        m = next;
    }
    assert!(
        skipped * 3 < walked,
        "the skipping walk read {skipped} entries, the full one {walked}"
    );
    // Changes not known (None), or known since another generation: every path is walked.
    let g = 40;
    mutate(root, &mut rng);
    let next = manifest_of(root, g);
    let stale = Changed {
        since: Generation(7),
        paths: BTreeSet::new(),
    };
    let holds = move || Generation(g);
    let hint = Hint {
        root: next.root(),
        edits: &Edits::default(),
        changed: Some(&stale),
        workspace_generation: &holds,
    };
    let a = skips.record_with(root, &next, at(g), Some(&hint)).unwrap();
    assert_eq!(a.entries_walked, next.len() as u64);
    assert_eq!(a.info.id, walks.record(root, &next, at(g)).unwrap().info.id);
    assert!(skips.verify().unwrap().problems.is_empty());
}
