//! The history store (`standby::history`) at the sizes it is meant for, and killed mid-prune:
//! - dedup: ten generations of a 64 MiB file of random data, 1 MiB changed each time (once as an
//!   insertion that shifts the rest), cost less than twice the file, and every one restores;
//! - many small files: 20 000 files make a few dozen packs; a changed file costs about its size;
//! - prune under kill -9: the test re-runs its own binary (`child_prune_then_die`), which prunes
//!   and SIGKILLs itself after step N, for every N; the store then verifies, every kept
//!   snapshot restores, and a second prune finishes the job.
//!
//! The record times printed (with `--nocapture`) are figures for the report, not asserted.
//! `STANDBY_TEST_SEED` replays the random choices.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use standby::history::{Retention, SnapshotId, Step, Store};
use standby::proto::{Entry, EntryKind};
use standby::replication::manifest::Manifest;
use standby::types::{Generation, RelPath};

const MIB: usize = 1 << 20;

fn seed() -> u64 {
    let seed = std::env::var("STANDBY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("STANDBY_TEST_SEED={seed}");
    seed
}

/// The manifest of a directory tree, as the replica's catalog would hold it.
fn manifest_of(root: &Path, generation: u64) -> Manifest {
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

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

fn random(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Restores `id` into a fresh directory and returns the blake3 of each file.
fn restored(store: &Store, id: SnapshotId) -> BTreeMap<String, [u8; 32]> {
    let out = tempfile::tempdir().unwrap();
    store.restore(id, None, out.path()).unwrap();
    let m = manifest_of(out.path(), 0);
    m.iter()
        .filter(|(_, e)| e.kind == EntryKind::File as i32)
        .map(|(p, e)| (p.to_string(), e.blake3[..].try_into().unwrap()))
        .collect()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

#[test]
fn ten_generations_of_a_large_file_cost_less_than_twice_it() {
    let mut rng = StdRng::seed_from_u64(seed());
    let (replica, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = Store::open(dir.path()).unwrap();
    let file = replica.path().join("checkpoint.bin");
    let mut data = random(&mut rng, 64 * MIB);
    let mut expected = Vec::new();
    for g in 0..10u64 {
        if g == 5 {
            let at = rng.random_range(0..data.len());
            data.splice(at..at, random(&mut rng, MIB));
        } else if g > 0 {
            let at = rng.random_range(0..data.len() - MIB);
            data[at..at + MIB].copy_from_slice(&random(&mut rng, MIB));
        }
        std::fs::write(&file, &data).unwrap();
        let m = manifest_of(replica.path(), g);
        let t = Instant::now();
        let r = store.record(replica.path(), &m, at(g * 60)).unwrap();
        println!(
            "generation {g}: recorded {:.1} MiB in {:?}, stored {:.2} MiB new",
            mib(r.bytes_read),
            t.elapsed(),
            mib(r.info.new_bytes)
        );
        expected.push((r.info.id, *blake3::hash(&data).as_bytes()));
    }
    let stats = store.stats();
    println!(
        "dedup: {} snapshots of {:.0} MiB each: store {:.1} MiB in {} packs ({} chunks), logical {:.0} MiB",
        stats.snapshots,
        mib(data.len() as u64),
        mib(stats.stored_bytes),
        stats.packs,
        stats.chunks,
        mib(stats.logical_bytes)
    );
    assert!(stats.stored_bytes < 2 * 64 * MIB as u64, "{stats:?}");
    for (id, hash) in expected {
        assert_eq!(
            restored(&store, id)["checkpoint.bin"],
            hash,
            "snapshot {id}"
        );
    }
}

#[test]
fn a_large_file_with_one_percent_changed_figures() {
    let mut rng = StdRng::seed_from_u64(seed());
    let (replica, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = Store::open(dir.path()).unwrap();
    let file = replica.path().join("big.bin");
    let mut data = random(&mut rng, 256 * MIB);
    std::fs::write(&file, &data).unwrap();
    let t = Instant::now();
    store
        .record(replica.path(), &manifest_of(replica.path(), 1), at(0))
        .unwrap();
    println!("256 MiB first record: {:?}", t.elapsed());
    let one_percent = 256 * MIB / 100;
    // 1 % of it in one place, then 1 % in 64 KiB pieces at random offsets (each piece dirties
    // a whole chunk of about 1 MiB: the worst case for content-defined chunks).
    for (g, pieces) in [(2u64, 1), (3, one_percent / (64 << 10))] {
        let len = one_percent / pieces;
        for _ in 0..pieces {
            let at = rng.random_range(0..data.len() - len);
            data[at..at + len].copy_from_slice(&random(&mut rng, len));
        }
        std::fs::write(&file, &data).unwrap();
        let m = manifest_of(replica.path(), g);
        let t = Instant::now();
        let r = store.record(replica.path(), &m, at(g * 60)).unwrap();
        println!(
            "256 MiB with 1 % changed in {pieces} piece(s): recorded in {:?}, stored {:.1} MiB new",
            t.elapsed(),
            mib(r.info.new_bytes)
        );
        assert_eq!(
            restored(&store, r.info.id)["big.bin"],
            *blake3::hash(&data).as_bytes()
        );
    }
}

#[test]
fn twenty_thousand_small_files_make_a_few_dozen_packs() {
    let mut rng = StdRng::seed_from_u64(seed());
    let (replica, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = Store::open(dir.path()).unwrap();
    let mut names = Vec::new();
    for d in 0..200 {
        std::fs::create_dir(replica.path().join(format!("d{d:03}"))).unwrap();
        for f in 0..100 {
            let name = format!("d{d:03}/f{f:03}");
            let len = rng.random_range(1..16 << 10);
            std::fs::write(replica.path().join(&name), random(&mut rng, len)).unwrap();
            names.push(name);
        }
    }
    let m = manifest_of(replica.path(), 1);
    let t = Instant::now();
    let first = store.record(replica.path(), &m, at(0)).unwrap();
    let stats = store.stats();
    println!(
        "20k files ({:.0} MiB): first record {:?}, {} packs",
        mib(first.info.bytes),
        t.elapsed(),
        stats.packs
    );
    assert!((3..=60).contains(&stats.packs), "{stats:?}");

    // One changed file costs about its size, plus a pack's header and footer and the run of the
    // path list it is in (about 64 paths on average, at most 1024 of about 150 bytes here).
    let one = &names[rng.random_range(0..names.len())];
    std::fs::write(replica.path().join(one), random(&mut rng, 10_000)).unwrap();
    let r = store
        .record(replica.path(), &manifest_of(replica.path(), 2), at(60))
        .unwrap();
    println!(
        "one changed file of 10000 bytes: stored {} bytes new",
        r.info.new_bytes
    );
    assert_eq!(r.files_read, 1);
    assert!(
        r.info.new_bytes < 10_000 + 1024 + (160 << 10),
        "{}",
        r.info.new_bytes
    );

    // Twenty changed files: the figure for the report.
    for _ in 0..20 {
        let name = &names[rng.random_range(0..names.len())];
        std::fs::write(replica.path().join(name), random(&mut rng, 8192)).unwrap();
    }
    let m3 = manifest_of(replica.path(), 3);
    let t = Instant::now();
    let r = store.record(replica.path(), &m3, at(120)).unwrap();
    println!(
        "20k files with 20 changed: recorded in {:?}, {} files read, {} bytes new",
        t.elapsed(),
        r.files_read,
        r.info.new_bytes
    );
    let snapshot_bytes: Vec<u64> = std::fs::read_dir(dir.path().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    println!("snapshot files of 20k paths: {snapshot_bytes:?} bytes");
    // The path list lives in the packs: a snapshot file lists its runs' chunks (about 312 here).
    assert!(
        snapshot_bytes.iter().all(|b| *b < 20_000),
        "{snapshot_bytes:?}"
    );
    let got = restored(&store, r.info.id);
    assert_eq!(got.len(), names.len());
    for (p, e) in m3.iter().filter(|(_, e)| e.kind == EntryKind::File as i32) {
        assert_eq!(got[&p.to_string()][..], e.blake3[..], "{p}");
    }
}

// --- prune under kill -9 ---------------------------------------------------------------------

const CHILD_DIR: &str = "STANDBY_HISTORY_TEST_PRUNE_DIR";
const CHILD_KILL_AT: &str = "STANDBY_HISTORY_TEST_KILL_AT";
const DAY: u64 = 86_400;
/// When the prune runs: generations are a day apart, so the default retention keeps the newest
/// of each day for 14 days and forgets the older ones.
const NOW: u64 = 30 * DAY;

/// Six generations, one every 5 days. Each adds a small file that stays and replaces a 600 KB
/// one: the older packs end up mostly dead (repacked) once their snapshots are forgotten.
fn prune_fixture(dir: &Path) -> Vec<(SnapshotId, BTreeMap<String, [u8; 32]>)> {
    let mut rng = StdRng::seed_from_u64(7);
    let replica = tempfile::tempdir().unwrap();
    let store = Store::open(dir).unwrap();
    let mut snaps = Vec::new();
    for g in 0..6u64 {
        std::fs::write(
            replica.path().join(format!("keep{g}")),
            random(&mut rng, 30_000),
        )
        .unwrap();
        std::fs::write(replica.path().join("own"), random(&mut rng, 600_000)).unwrap();
        let m = manifest_of(replica.path(), g);
        let id = store
            .record(replica.path(), &m, at(g * 5 * DAY))
            .unwrap()
            .info
            .id;
        let files = m
            .iter()
            .map(|(p, e)| (p.to_string(), e.blake3[..].try_into().unwrap()))
            .collect();
        snaps.push((id, files));
    }
    snaps
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Runs in a child process only (the parent sets the environment): prunes the store and
/// SIGKILLs itself right after step N. Without the environment it has nothing to do.
#[test]
fn child_prune_then_die() {
    let (Ok(dir), Ok(kill_at)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_KILL_AT)) else {
        return;
    };
    let kill_at: usize = kill_at.parse().unwrap();
    let store = Store::open(Path::new(&dir)).unwrap();
    let mut steps = 0;
    store
        .forget_with(&Retention::default(), at(NOW), &mut |step: &Step| {
            steps += 1;
            if steps == kill_at {
                eprintln!("killing myself after step {steps}: {step:?}");
                // SAFETY: a plain system call; the process ends here.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
        })
        .unwrap();
}

#[test]
fn prune_killed_at_every_step_loses_nothing_kept() {
    let pristine = tempfile::tempdir().unwrap();
    let snaps = prune_fixture(pristine.path());

    // A clean run on a copy: how many steps, and where it ends.
    let clean = tempfile::tempdir().unwrap();
    copy_dir(pristine.path(), clean.path());
    let mut steps = Vec::new();
    let (done, end) = {
        let store = Store::open(clean.path()).unwrap();
        let done = store
            .forget_with(&Retention::default(), at(NOW), &mut |s| {
                steps.push(s.clone())
            })
            .unwrap();
        (done, store.stats())
    };
    println!("clean prune: {done:?}\nsteps: {steps:?}");
    assert!(
        done.packs_written >= 1 && done.packs_deleted >= 2,
        "the fixture must repack: {done:?}"
    );
    let kept: Vec<SnapshotId> = snaps
        .iter()
        .map(|s| s.0)
        .filter(|id| !done.forgotten.contains(id))
        .collect();
    assert!(steps.iter().any(|s| matches!(s, Step::PackSealed(_))));

    for kill_at in 1..=steps.len() + 1 {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(pristine.path(), dir.path());
        let status = Command::new(std::env::current_exe().unwrap())
            .args([
                "child_prune_then_die",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_KILL_AT, kill_at.to_string())
            .status()
            .unwrap();
        if kill_at <= steps.len() {
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "step {kill_at}: {status:?}"
            );
        } else {
            assert!(status.success(), "{status:?}");
        }

        let store = Store::open(dir.path()).unwrap();
        let report = store.verify().unwrap();
        assert!(
            report.is_ok(),
            "after a kill at step {kill_at}: {:?}",
            report.problems
        );
        let listed: Vec<SnapshotId> = store.list().iter().map(|s| s.id).collect();
        for (id, files) in snaps.iter().filter(|s| kept.contains(&s.0)) {
            assert!(
                listed.contains(id),
                "kept snapshot {id} gone after step {kill_at}"
            );
            assert_eq!(
                &restored(&store, *id),
                files,
                "snapshot {id} after a kill at step {kill_at}"
            );
        }
        store.forget(&Retention::default(), at(NOW)).unwrap();
        assert_eq!(store.list().iter().map(|s| s.id).collect::<Vec<_>>(), kept);
        let stats = store.stats();
        assert_eq!(
            (stats.packs, stats.stored_bytes),
            (end.packs, end.stored_bytes),
            "after step {kill_at}"
        );
        assert!(
            std::fs::read_dir(dir.path().join("tmp"))
                .unwrap()
                .next()
                .is_none()
        );
    }
}
