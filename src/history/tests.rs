//! Store-level tests: record and restore round trips, files that move under a record, confined
//! restores, verify, missing packs, selectors, forget and repack.

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::{Rng, SeedableRng};

mod walk;

use super::*;
use crate::proto::{Entry, EntryKind};
use crate::replication::manifest::{Manifest, same_content};
use crate::replication::receive::edits::Edits;
use crate::types::{Generation, RelPath};

/// The manifest of a directory tree, as the replica's would be.
pub(super) fn manifest_of(root: &Path, generation: u64) -> Manifest {
    let mut m = Manifest::new();
    m.generation = Generation(generation);
    walk(root, root, &mut m);
    m
}

fn walk(root: &Path, dir: &Path, m: &mut Manifest) {
    use std::os::unix::ffi::OsStrExt;
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let rel = RelPath::new(path.strip_prefix(root).unwrap().as_os_str().as_bytes()).unwrap();
        let md = std::fs::symlink_metadata(&path).unwrap();
        let mut entry = Entry {
            mode: md.mode() & 0o7777,
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ..Default::default()
        };
        if md.is_dir() {
            entry.kind = EntryKind::Dir as i32;
            walk(root, &path, m);
        } else if md.is_symlink() {
            entry.kind = EntryKind::Symlink as i32;
            entry.mode = 0o777;
            entry.target = std::fs::read_link(&path)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec();
        } else {
            entry.kind = EntryKind::File as i32;
            entry.size = md.len();
            entry.blake3 = blake3::hash(&std::fs::read(&path).unwrap())
                .as_bytes()
                .to_vec();
        }
        m.insert(rel, entry);
    }
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub(super) fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

/// A file of a snapshot, read whole through `read_file`.
fn read(store: &Store, id: SnapshotId, path: &str) -> Vec<u8> {
    let mut got = Vec::new();
    store
        .read_file(id, &rel(path), |b| {
            got.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
    got
}

fn rel(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

/// A small tree with every kind of entry.
fn tree(root: &Path) {
    std::fs::create_dir_all(root.join("d/sub")).unwrap();
    std::fs::create_dir(root.join("empty")).unwrap();
    std::fs::write(root.join("d/small"), b"hello").unwrap();
    std::fs::write(root.join("d/sub/zero"), b"").unwrap();
    std::fs::write(root.join("big"), random(3 << 20, 1)).unwrap();
    symlink("d/small", root.join("link")).unwrap();
    std::fs::set_permissions(root.join("d/small"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(root.join("empty"), std::fs::Permissions::from_mode(0o750)).unwrap();
}

fn assert_same(a: &Manifest, b: &Manifest) {
    assert_eq!(a.len(), b.len());
    for ((pa, ea), (pb, eb)) in a.iter().zip(b.iter()) {
        assert_eq!(pa, pb);
        assert!(same_content(ea, eb), "{pa}: {ea:?} != {eb:?}");
    }
}

#[test]
fn record_and_restore_round_trip() {
    let (replica, dir, out) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    tree(replica.path());
    let m = manifest_of(replica.path(), 1);
    let store = Store::open(dir.path()).unwrap();
    let r = store.record(replica.path(), &m, at(0)).unwrap();
    assert_eq!(
        (r.files_read, r.info.files, r.info.bytes),
        (3, 3, (3 << 20) + 5)
    );
    assert_eq!((r.info.generation, r.info.root), (Generation(1), m.root()));
    assert!(r.info.new_bytes > 3 << 20);

    let done = store.restore(r.info.id, None, out.path()).unwrap();
    assert_eq!(
        (done.files, done.symlinks, done.bytes),
        (3, 1, (3 << 20) + 5)
    );
    assert_same(&manifest_of(out.path(), 1), &m);

    // An unchanged tree with one file changed: only that file is read, only it costs.
    std::fs::write(replica.path().join("d/small"), b"changed").unwrap();
    let m2 = manifest_of(replica.path(), 2);
    let r2 = store.record(replica.path(), &m2, at(60)).unwrap();
    assert_eq!(r2.files_read, 1);
    assert!(r2.info.new_bytes < 4096, "{}", r2.info.new_bytes);

    assert_eq!(read(&store, r2.info.id, "d/small"), b"changed");
    assert_eq!(read(&store, r.info.id, "d/small"), b"hello");
    assert!(matches!(
        store.read_file(r.info.id, &rel("d"), |_| Ok(())),
        Err(HistoryError::NotFile { .. })
    ));
    let names: Vec<String> = store
        .entries(r.info.id, Some(&rel("d")))
        .unwrap()
        .iter()
        .map(|(p, _)| p.to_string())
        .collect();
    assert_eq!(names, ["d", "d/small", "d/sub", "d/sub/zero"]);

    // Reopened, the index comes back from the footers alone.
    let stats = store.stats();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.stats(), stats);
    assert_eq!(store.list().len(), 2);
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn a_file_that_moved_under_the_record_records_nothing() {
    let (replica, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tree(replica.path());
    let store = Store::open(dir.path()).unwrap();
    let good = store
        .record(replica.path(), &manifest_of(replica.path(), 1), at(0))
        .unwrap();

    std::fs::write(replica.path().join("d/small"), b"generation 2").unwrap();
    let m2 = manifest_of(replica.path(), 2);
    std::fs::write(replica.path().join("d/small"), b"generation 3!").unwrap();
    let e = store.record(replica.path(), &m2, at(1)).unwrap_err();
    assert!(
        matches!(&e, HistoryError::Moved { path } if *path == rel("d/small")),
        "{e}"
    );

    // Replaced by a symlink, or deleted: moved as well, never followed.
    std::fs::remove_file(replica.path().join("d/small")).unwrap();
    symlink("/etc/passwd", replica.path().join("d/small")).unwrap();
    assert!(matches!(
        store.record(replica.path(), &m2, at(2)),
        Err(HistoryError::Moved { .. })
    ));
    std::fs::remove_file(replica.path().join("d/small")).unwrap();
    assert!(matches!(
        store.record(replica.path(), &m2, at(3)),
        Err(HistoryError::Moved { .. })
    ));

    // The last good snapshot is intact and the only one.
    assert_eq!(store.list(), std::slice::from_ref(&good.info));
    let out = tempfile::tempdir().unwrap();
    store.restore(good.info.id, None, out.path()).unwrap();
    assert_eq!(std::fs::read(out.path().join("d/small")).unwrap(), b"hello");
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn restore_never_follows_a_symlink_in_the_target() {
    let (replica, dir, out, outside) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    tree(replica.path());
    let store = Store::open(dir.path()).unwrap();
    let id = store
        .record(replica.path(), &manifest_of(replica.path(), 1), at(0))
        .unwrap()
        .info
        .id;
    symlink(outside.path(), out.path().join("d")).unwrap();
    let e = store.restore(id, None, out.path()).unwrap_err();
    assert!(matches!(e, HistoryError::Refused { .. }), "{e}");
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "nothing written outside"
    );

    // A directory where a file goes is refused too; a symlink where a file goes is replaced,
    // not followed.
    let out2 = tempfile::tempdir().unwrap();
    std::fs::create_dir(out2.path().join("big")).unwrap();
    assert!(matches!(
        store.restore(id, None, out2.path()),
        Err(HistoryError::Refused { .. })
    ));
    let out3 = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("victim"), b"keep").unwrap();
    symlink(outside.path().join("victim"), out3.path().join("big")).unwrap();
    store.restore(id, None, out3.path()).unwrap();
    assert_eq!(
        std::fs::read(outside.path().join("victim")).unwrap(),
        b"keep"
    );
    assert_eq!(
        std::fs::read(out3.path().join("big")).unwrap(),
        random(3 << 20, 1)
    );
}

#[test]
fn restore_of_a_prefix() {
    let (replica, dir, out) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    tree(replica.path());
    let store = Store::open(dir.path()).unwrap();
    let id = store
        .record(replica.path(), &manifest_of(replica.path(), 1), at(0))
        .unwrap()
        .info
        .id;
    let done = store.restore(id, Some(&rel("d/sub")), out.path()).unwrap();
    assert_eq!(done.files, 1);
    assert!(out.path().join("d/sub/zero").is_file());
    assert!(!out.path().join("d/small").exists() && !out.path().join("big").exists());
    let e = store
        .restore(id, Some(&rel("nothing")), out.path())
        .unwrap_err();
    assert!(matches!(e, HistoryError::NoPath { .. }), "{e}");
}

/// The pack file holding a chunk of `path` in snapshot `id`.
fn pack_of(store: &Store, id: SnapshotId, path: &str) -> (std::path::PathBuf, u64) {
    let state = store.state();
    let snap = store.load(&state, id).unwrap();
    let p = &snap.paths[snap.position(&rel(path)).unwrap()];
    let (pack, stored) = state.index.get(&p.chunks[0]).unwrap();
    (
        store.pack_path(&pack),
        stored.offset + u64::from(stored.stored_len) / 2,
    )
}

#[test]
fn verify_catches_a_flipped_byte_and_names_what_it_breaks() {
    let (replica, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(replica.path().join("a"), random(100_000, 1)).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s1 = store
        .record(replica.path(), &manifest_of(replica.path(), 1), at(0))
        .unwrap()
        .info
        .id;
    std::fs::write(replica.path().join("b"), random(100_000, 2)).unwrap();
    let s2 = store
        .record(replica.path(), &manifest_of(replica.path(), 2), at(1))
        .unwrap()
        .info
        .id;
    assert!(store.verify().unwrap().is_ok());

    let (pack, offset) = pack_of(&store, s2, "b");
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[offset as usize] ^= 0x40;
    std::fs::write(&pack, &bytes).unwrap();

    let report = store.verify().unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let line = report.problems[0].to_string();
    assert!(
        line.contains(&s2.to_string()) && line.contains(" b:") && line.contains("does not match"),
        "{line}"
    );
    let out = tempfile::tempdir().unwrap();
    assert!(matches!(
        store.restore(s2, None, out.path()),
        Err(HistoryError::BadChunk { .. })
    ));
    assert!(
        !out.path().join("b").exists(),
        "a file that fails verification is never renamed in"
    );
    // What the damage does not touch still restores.
    let out = tempfile::tempdir().unwrap();
    store.restore(s1, None, out.path()).unwrap();
    assert_eq!(
        std::fs::read(out.path().join("a")).unwrap(),
        random(100_000, 1)
    );
}

#[test]
fn a_directory_with_only_the_packs_a_snapshot_needs_restores_it() {
    let (replica, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Files under the chunker's minimum: one chunk each.
    std::fs::write(replica.path().join("a"), random(30_000, 1)).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s1 = store
        .record(replica.path(), &manifest_of(replica.path(), 1), at(0))
        .unwrap()
        .info
        .id;
    std::fs::write(replica.path().join("b"), random(30_000, 2)).unwrap();
    let s2 = store
        .record(replica.path(), &manifest_of(replica.path(), 2), at(1))
        .unwrap()
        .info
        .id;
    assert_eq!(store.packs_for(s1).unwrap().len(), 1);
    assert_eq!(store.packs_for(s2).unwrap().len(), 2);

    // A copy with s1 and its pack only (as a bucket download would make it).
    let copy = tempfile::tempdir().unwrap();
    for sub in ["packs", "snapshots"] {
        std::fs::create_dir(copy.path().join(sub)).unwrap();
    }
    std::fs::copy(
        store.snapshot_path(&s1),
        copy.path().join("snapshots").join(s1.file_name()),
    )
    .unwrap();
    for p in store.packs_for(s1).unwrap() {
        std::fs::copy(
            store.pack_path(&p),
            copy.path().join("packs").join(p.file_name()),
        )
        .unwrap();
    }
    let partial = Store::open(copy.path()).unwrap();
    assert!(partial.verify().unwrap().is_ok());
    let out = tempfile::tempdir().unwrap();
    partial.restore(s1, None, out.path()).unwrap();
    assert_eq!(
        std::fs::read(out.path().join("a")).unwrap(),
        random(30_000, 1)
    );

    // Add s2 without its second pack (its path list and b): the error names the chunk, the
    // snapshot and where to look.
    drop(partial);
    std::fs::copy(
        store.snapshot_path(&s2),
        copy.path().join("snapshots").join(s2.file_name()),
    )
    .unwrap();
    let partial = Store::open(copy.path()).unwrap();
    let e = partial
        .restore(s2, None, tempfile::tempdir().unwrap().path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("chunk ")
            && e.contains("path list")
            && e.contains(&s2.to_string())
            && e.contains("missing")
            && e.contains("packs"),
        "{e}"
    );
    assert_eq!(partial.verify().unwrap().problems.len(), 1);
    assert_eq!(
        read(&partial, s1, "a"),
        random(30_000, 1),
        "s1 is still whole"
    );
}

#[test]
fn selectors_find_snapshots() {
    let (replica, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(replica.path().join("a"), b"1").unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert!(matches!(
        store.find(&Selector::Latest),
        Err(HistoryError::NoSnapshot(_))
    ));
    let mut ids = Vec::new();
    for g in 0..3u64 {
        std::fs::write(replica.path().join("a"), g.to_string()).unwrap();
        ids.push(
            store
                .record(replica.path(), &manifest_of(replica.path(), g), at(g * 100))
                .unwrap()
                .info
                .id,
        );
    }
    assert_eq!(store.find(&"latest".parse().unwrap()).unwrap().id, ids[2]);
    assert_eq!(
        store.find(&Selector::AtOrBefore(at(150))).unwrap().id,
        ids[1]
    );
    assert_eq!(
        store.find(&Selector::AtOrBefore(at(100))).unwrap().id,
        ids[1]
    );
    assert!(
        store
            .find(&Selector::AtOrBefore(at(0) - Duration::from_secs(1)))
            .is_err()
    );
    let full = ids[0].to_string();
    assert_eq!(store.find(&full[..10].parse().unwrap()).unwrap().id, ids[0]);
    assert!(
        store.find(&Selector::Id("".into())).is_err(),
        "an empty prefix matches all three"
    );
    assert!(matches!(
        "2026-12-01T20:00:00Z".parse(),
        Ok(Selector::AtOrBefore(_))
    ));
    assert!("yesterday-ish".parse::<Selector>().is_err());
}

#[test]
fn forget_keeps_the_newest_and_frees_what_only_old_snapshots_needed() {
    let (replica, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = Store::open(dir.path()).unwrap();
    // Three generations a day apart, each with its own 1 MiB file plus a shared one.
    std::fs::write(replica.path().join("shared"), random(300_000, 9)).unwrap();
    let mut ids = Vec::new();
    for g in 0..3u64 {
        std::fs::write(replica.path().join("own"), random(1 << 20, g)).unwrap();
        let day = 86_400 * 30;
        ids.push(
            store
                .record(replica.path(), &manifest_of(replica.path(), g), at(g * day))
                .unwrap()
                .info
                .id,
        );
    }
    let before = store.stats();
    let now = at(2 * 86_400 * 30 + 10);
    let pruned = store.forget(&Retention::default(), now).unwrap();
    assert_eq!(pruned.forgotten, ids[..2]);
    assert_eq!(pruned.kept, 1);
    assert!(
        pruned.bytes_after < before.stored_bytes - (2 << 20) + 100_000,
        "{pruned:?}"
    );
    assert_eq!(store.stats().stored_bytes, pruned.bytes_after);
    assert!(store.verify().unwrap().is_ok());
    let out = tempfile::tempdir().unwrap();
    store.restore(ids[2], None, out.path()).unwrap();
    assert_eq!(
        std::fs::read(out.path().join("shared")).unwrap(),
        random(300_000, 9)
    );
    // Nothing more to do the second time.
    let again = store.forget(&Retention::default(), now).unwrap();
    assert_eq!(
        (again.packs_deleted, again.packs_written, again.bytes_after),
        (0, 0, pruned.bytes_after)
    );
}

#[test]
fn content_a_prune_freed_is_read_again_when_it_comes_back() {
    let (replica, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = Store::open(dir.path()).unwrap();
    let file = replica.path().join("ckpt");
    let day = 86_400 * 30;
    let record = |content: &[u8], g: u64| {
        std::fs::write(&file, content).unwrap();
        store
            .record(replica.path(), &manifest_of(replica.path(), g), at(g * day))
            .unwrap()
    };
    let (old, new) = (random(1 << 20, 1), random(1 << 20, 2));
    record(&old, 0);
    record(&new, 1);
    // Only the newest is kept: the old content's chunks are deleted.
    let pruned = store.forget(&Retention::default(), at(day + 10)).unwrap();
    assert_eq!(pruned.kept, 1);
    let back = record(&old, 2);
    assert_eq!(back.files_read, 1, "the freed content was read again");
    assert!(store.verify().unwrap().is_ok());
    assert_eq!(read(&store, back.info.id, "ckpt"), old);
}

#[test]
fn mostly_dead_packs_are_repacked_and_a_budget_drops_the_oldest() {
    let (replica, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = Store::open(dir.path()).unwrap();
    // One pack holding a big file that goes away and a small one that stays.
    std::fs::write(replica.path().join("big"), random(2 << 20, 1)).unwrap();
    std::fs::write(replica.path().join("small"), random(50_000, 2)).unwrap();
    let s1 = store
        .record(replica.path(), &manifest_of(replica.path(), 1), at(0))
        .unwrap()
        .info
        .id;
    std::fs::remove_file(replica.path().join("big")).unwrap();
    let s2 = store
        .record(replica.path(), &manifest_of(replica.path(), 2), at(1))
        .unwrap()
        .info
        .id;
    let everything = Retention::default();
    assert_eq!(
        store.forget(&everything, at(2)).unwrap().packs_deleted,
        0,
        "both kept"
    );

    let budget = Retention {
        budget_bytes: 1 << 20,
        ..Retention::default()
    };
    let pruned = store.forget(&budget, at(2)).unwrap();
    assert_eq!(
        (pruned.for_budget.as_slice(), pruned.forgotten.len()),
        ([s1].as_slice(), 0)
    );
    assert_eq!(
        (pruned.packs_written, pruned.packs_deleted),
        (1, 1),
        "{pruned:?}"
    );
    assert!(pruned.bytes_after < 60_000, "{pruned:?}");
    assert!(store.verify().unwrap().is_ok());
    assert_eq!(read(&store, s2, "small"), random(50_000, 2));
}

#[test]
fn a_store_is_shared_between_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Store>();
}

/// A reader that stops reading mid-stream (a client that went quiet) holds up neither a record
/// nor a prune: the store is locked only while a chunk is looked up. When it reads on, it gets
/// the rest or a clear error for what the prune removed, never a silent gap.
#[test]
fn a_stalled_reader_holds_up_neither_recording_nor_pruning() {
    let (replica, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
    tree(replica.path());
    let old = store
        .record(replica.path(), &manifest_of(replica.path(), 1), at(0))
        .unwrap()
        .info
        .id;
    let (started, wait) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
    let (started_tx, go_rx) = (started.0, wait.1);
    let reader = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut first = true;
            let mut bytes = 0u64;
            let r = store.stream_snapshot(old, None, |piece| {
                if let Piece::Data(d) = piece {
                    if first {
                        first = false;
                        started_tx.send(()).unwrap();
                        go_rx.recv().unwrap();
                    }
                    bytes += d.len() as u64;
                }
                Ok(())
            });
            r.map(|s| (s, bytes))
        })
    };
    started.1.recv().unwrap();
    // Meanwhile: a new generation is recorded and the old snapshot forgotten, in time.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let writer = {
        let (store, root) = (store.clone(), replica.path().to_path_buf());
        std::thread::spawn(move || {
            std::fs::write(root.join("big"), random(1 << 20, 7)).unwrap();
            let m = manifest_of(&root, 2);
            store.record(&root, &m, at(86_400 * 90)).unwrap();
            let pruned = store
                .forget(&Retention::default(), at(86_400 * 90 + 10))
                .unwrap();
            done_tx.send(pruned.forgotten).unwrap();
        })
    };
    let forgotten = done_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("record and prune wait for a stalled reader");
    assert_eq!(forgotten, [old]);
    writer.join().unwrap();
    wait.0.send(()).unwrap();
    match reader.join().unwrap() {
        Ok((sent, bytes)) => assert_eq!((sent.bytes, sent.entries), (bytes, 7)),
        Err(e) => assert!(matches!(e, HistoryError::MissingChunk { .. }), "{e}"),
    }
    assert!(store.verify().unwrap().is_ok());
}

/// What the receiver gathers for `path` patched at `pieces` (offset, length) between `before`
/// and `after`.
fn patched(before: &Manifest, after: &Manifest, path: &str, pieces: &[(u64, u64)]) -> Edits {
    let change = crate::proto::state::Change {
        path: path.as_bytes().to_vec(),
        entry: after.get(&rel(path)).cloned(),
        patch: "p".into(),
        extents: pieces
            .iter()
            .map(|&(offset, len)| crate::proto::state::Extent { offset, len, at: 0 })
            .collect(),
        ..Default::default()
    };
    let mut e = Edits::default();
    e.add(before, &[change]);
    e
}

#[test]
fn a_file_patched_in_place_is_read_only_around_its_ranges() {
    let (replica, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let f = replica.path().join("ckpt");
    let mut data = random(24 << 20, 11);
    std::fs::write(&f, &data).unwrap();
    let m1 = manifest_of(replica.path(), 1);
    let store = Store::open(dir.path()).unwrap();
    store.record(replica.path(), &m1, at(0)).unwrap();
    // A second store records the same generations reading files whole.
    let (dir2, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let whole = Store::open(dir2.path()).unwrap();
    whole.record(replica.path(), &m1, at(0)).unwrap();

    let mut pieces = Vec::new();
    for (i, off) in [(1u64, 100_000u64), (2, 9 << 20), (3, (20 << 20) + 7)] {
        data[off as usize..off as usize + 65536].copy_from_slice(&random(65536, 20 + i));
        pieces.push((off, 65536));
    }
    std::fs::write(&f, &data).unwrap();
    let m2 = manifest_of(replica.path(), 2);
    let edits = patched(&m1, &m2, "ckpt", &pieces);
    let holds = |g: u64| move || Generation(g);

    // The replica moved on to a newer generation: nothing is recorded.
    let newer = holds(3);
    let hint = Hint {
        root: m2.root(),
        edits: &edits,
        changed: None,
        workspace_generation: &newer,
    };
    let e = store.record_with(replica.path(), &m2, at(60), Some(&hint));
    assert!(
        matches!(e, Err(HistoryError::Moved { .. })),
        "{:?}",
        e.err()
    );
    assert_eq!(store.list().len(), 1);

    let same = holds(2);
    let hint = Hint {
        root: m2.root(),
        edits: &edits,
        changed: None,
        workspace_generation: &same,
    };
    let r = store
        .record_with(replica.path(), &m2, at(60), Some(&hint))
        .unwrap();
    assert_eq!(r.files_read, 1);
    assert!(r.bytes_read < 12 << 20, "read {} of 24 MiB", r.bytes_read);
    assert_eq!(read(&store, r.info.id, "ckpt"), data);
    assert!(store.verify().unwrap().problems.is_empty());

    // The same snapshot content as a record that reads the file whole, chunk for chunk.
    let w = whole.record(replica.path(), &m2, at(60)).unwrap();
    assert_eq!(w.bytes_read, 24 << 20);
    assert_eq!(w.info.new_bytes, r.info.new_bytes);
    store.restore(r.info.id, None, out.path()).unwrap();
    assert_eq!(std::fs::read(out.path().join("ckpt")).unwrap(), data);

    // A store that does not hold the base reads the file whole.
    let dir3 = tempfile::tempdir().unwrap();
    let fresh = Store::open(dir3.path()).unwrap();
    let r3 = fresh
        .record_with(replica.path(), &m2, at(60), Some(&hint))
        .unwrap();
    assert_eq!(r3.bytes_read, 24 << 20);
}

#[test]
fn a_few_changed_paths_store_a_few_runs_and_every_snapshot_restores() {
    let (replica, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for i in 0..3000 {
        let d = replica.path().join(format!("d{}", i % 30));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("f{i}")), format!("file {i}")).unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let m1 = manifest_of(replica.path(), 1);
    let s1 = store.record(replica.path(), &m1, at(0)).unwrap().info.id;
    let snap_len = |id: SnapshotId| std::fs::metadata(store.snapshot_path(&id)).unwrap().len();
    // 3030 paths in runs of about 64: the file lists about 50 chunk ids.
    assert!(snap_len(s1) < 4096, "{} bytes", snap_len(s1));

    // Two files changed, one added, one deleted: a handful of runs are stored again.
    std::fs::write(replica.path().join("d1/f1"), "changed").unwrap();
    std::fs::write(replica.path().join("d2/f2002"), "changed too").unwrap();
    std::fs::write(replica.path().join("d3/new"), "new").unwrap();
    std::fs::remove_file(replica.path().join("d4/f4")).unwrap();
    let m2 = manifest_of(replica.path(), 2);
    let r2 = store.record(replica.path(), &m2, at(1)).unwrap();
    assert_eq!(r2.files_read, 3);
    // Four files and two directories (d3, d4: an entry added, one removed) changed.
    assert!(r2.runs_encoded <= 6, "{} runs encoded", r2.runs_encoded);
    assert!(
        r2.chunks_stored <= 3 + 8,
        "{} chunks stored",
        r2.chunks_stored
    );
    let s2 = r2.info.id;

    // Reopened: no runs in memory, every run is encoded again and deduplicates.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    std::fs::write(replica.path().join("d5/f5"), "after a restart").unwrap();
    let m3 = manifest_of(replica.path(), 3);
    let r3 = store.record(replica.path(), &m3, at(2)).unwrap();
    assert!(
        r3.chunks_stored <= 1 + 4,
        "{} chunks stored",
        r3.chunks_stored
    );
    assert!(store.verify().unwrap().is_ok());
    for (id, m) in [(s1, &m1), (s2, &m2), (r3.info.id, &m3)] {
        let out = tempfile::tempdir().unwrap();
        store.restore(id, None, out.path()).unwrap();
        assert_same(&manifest_of(out.path(), m.generation.0), m);
    }
}
