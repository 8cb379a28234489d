//! Off-site backup against a real S3-compatible server (moto's, on loopback): the mirror, the
//! ciphertext in the bucket, disaster recovery into a fresh directory, a wrong key, tampering,
//! deletions, an outage and a crash mid-upload, the bandwidth limit, `agent-cpu restore-backup`,
//! and the throughput through a shaped link (`link`, as root).

mod agents;
#[path = "../common/mod.rs"]
mod common;
mod link;
mod rebuild;
mod server;
mod shaped;
mod store;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use standby::backup::layout::Kind;
use standby::backup::{Bucket, Figures, Mirror, Pick, RestoreError, UploadOptions, restore};
use standby::trust::seal::{BackupKey, SealError};

use server::S3;
use store::Store;

const URL: &str = "s3://standby-backup/pairs/p1";

fn opts() -> UploadOptions {
    UploadOptions {
        concurrency: 3,
        rate_limit: None,
        part_size: 5 << 20,
        multipart_above: 6 << 20,
    }
}

/// A server, a bucket on it, a store and a key.
struct Setup {
    s3: S3,
    store: Store,
    bucket: Bucket,
    key: BackupKey,
    state: tempfile::TempDir,
}

async fn setup(test: &str) -> Option<Setup> {
    let s3 = server::start(test)?;
    s3.create_bucket("standby-backup").await;
    let bucket = s3.bucket(URL);
    Some(Setup {
        s3,
        store: Store::standard(),
        bucket,
        key: BackupKey::generate(),
        state: tempfile::tempdir().unwrap(),
    })
}

impl Setup {
    fn mirror(&self, opts: UploadOptions) -> Mirror {
        let journal = self.state.path().join("backup.journal");
        Mirror::open(
            self.bucket.clone(),
            self.key.clone(),
            self.store.path(),
            &journal,
            opts,
        )
        .unwrap()
    }

    /// What a restore of `snapshot` must hold: it and every pack.
    fn expected(&self, snapshot: &str) -> BTreeMap<String, Vec<u8>> {
        self.store
            .files()
            .into_iter()
            .filter(|(n, _)| n.starts_with("packs/") || n == snapshot)
            .collect()
    }
}

/// Every object in the bucket: its key and raw bytes.
async fn raw_objects(bucket: &Bucket) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in Kind::ALL {
        for name in bucket.list(kind).await.unwrap().keys() {
            let rel = Bucket::relative(kind, name);
            let mut s = bucket.get(&rel).await.unwrap();
            let mut bytes = Vec::new();
            while let Some(c) = s.next().await {
                bytes.extend_from_slice(&c.unwrap());
            }
            out.push((rel, bytes));
        }
    }
    out
}

async fn count(bucket: &Bucket, kind: Kind) -> usize {
    bucket.list(kind).await.unwrap().len()
}

fn clean(f: &Figures) {
    assert_eq!(f.failures, 0, "{f:?}");
    assert!(f.errors.is_empty(), "{f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_goes_up_sealed_and_comes_back_byte_for_byte() {
    let Some(s) = setup("a_store_goes_up_sealed_and_comes_back_byte_for_byte").await else {
        return;
    };
    let mut m = s.mirror(opts());
    let started = Instant::now();
    let f = m.pass().await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    clean(&f);
    assert_eq!(f.objects_uploaded, 8, "{f:?}");
    let newest = Store::time(3)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    assert_eq!(f.newest_snapshot_ns, Some(newest.as_nanos() as i64));
    eprintln!(
        "upload: {} bytes in {secs:.2} s = {:.1} MiB/s (moto on loopback, 3 in flight)",
        f.bytes_uploaded,
        f.bytes_uploaded as f64 / secs / (1 << 20) as f64
    );

    // A second pass finds everything up.
    let again = m.pass().await.unwrap();
    clean(&again);
    assert_eq!(
        (again.objects_uploaded, again.objects_adopted),
        (0, 0),
        "{again:?}"
    );

    // Ciphertext only: no local name, snapshot id, pack hash or marker in any key or byte.
    let objects = raw_objects(&s.bucket).await;
    assert_eq!(objects.len(), 8);
    for (key, bytes) in &objects {
        for secret in s.store.secrets() {
            let shown = String::from_utf8_lossy(&secret).into_owned();
            assert!(!key.contains(&shown), "{key} names {shown}");
            assert!(
                memchr::memmem::find(bytes, &secret).is_none(),
                "{key} holds {shown}"
            );
        }
    }

    // Disaster recovery: the newest snapshot, then an older one by id.
    let to = tempfile::tempdir().unwrap();
    let latest = to.path().join("latest");
    let r = restore(&s.bucket, &s.key, &Pick::Latest, &latest, 3)
        .await
        .unwrap();
    let (newest_local, _) = &s.store.snapshots[2];
    assert_eq!(&r.snapshot.name.local(), newest_local);
    assert_eq!(store::files(&latest), s.expected(newest_local));
    assert!(
        store::leftovers(&latest).is_empty(),
        "{:?}",
        store::leftovers(&latest)
    );
    let mtime = std::fs::metadata(latest.join(newest_local))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(mtime, Store::time(3));

    let (first, _) = &s.store.snapshots[0];
    let id = first
        .trim_start_matches("snapshots/")
        .trim_end_matches(".snap");
    let older = to.path().join("older");
    restore(&s.bucket, &s.key, &Pick::Id(id.into()), &older, 3)
        .await
        .unwrap();
    assert_eq!(store::files(&older), s.expected(first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_refused_by_fingerprint_with_nothing_written() {
    let Some(s) = setup("a_wrong_key_is_refused_by_fingerprint_with_nothing_written").await else {
        return;
    };
    clean(&s.mirror(opts()).pass().await.unwrap());
    let wrong = BackupKey::generate();
    let to = tempfile::tempdir().unwrap();
    let target = to.path().join("restore");
    let e = restore(&s.bucket, &wrong, &Pick::Latest, &target, 3)
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, RestoreError::Seal(SealError::WrongKey { .. })),
        "{msg}"
    );
    let want = format!(
        "this backup was sealed with key {}; the key given is {}",
        s.key.fingerprint(),
        wrong.fingerprint()
    );
    assert!(msg.contains(&want), "{msg}");
    assert!(
        !target.exists(),
        "a refused restore wrote {}",
        target.display()
    );
    // The backup itself is untouched: the right key still restores it.
    restore(&s.bucket, &s.key, &Pick::Latest, &target, 3)
        .await
        .unwrap();
    assert_eq!(store::files(&target), s.expected(&s.store.snapshots[2].0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_or_swapped_objects_are_refused_and_no_snapshot_is_written() {
    let Some(s) = setup("altered_or_swapped_objects_are_refused_and_no_snapshot_is_written").await
    else {
        return;
    };
    clean(&s.mirror(opts()).pass().await.unwrap());
    let objects = raw_objects(&s.bucket).await;
    let (pack, bytes) = objects
        .iter()
        .find(|(k, b)| k.starts_with("packs/") && b.len() < 1 << 20)
        .unwrap()
        .clone();
    let mut altered = bytes.clone();
    let mid = altered.len() / 2;
    altered[mid] ^= 1;
    s.bucket.put(&pack, altered).await.unwrap();
    let to = tempfile::tempdir().unwrap();
    let target = to.path().join("restore");
    let e = restore(&s.bucket, &s.key, &Pick::Latest, &target, 1)
        .await
        .unwrap_err();
    assert!(
        matches!(e, RestoreError::Seal(SealError::Tampered { .. })),
        "{e}"
    );
    // Interrupted, visibly: no snapshot file, the marker of an unfinished restore kept.
    assert!(
        !store::files(&target)
            .keys()
            .any(|n| n.starts_with("snapshots/"))
    );
    assert!(target.join("tmp/restoring").exists());

    // Put the good bytes back: the same target resumes and completes.
    s.bucket.put(&pack, bytes).await.unwrap();
    restore(&s.bucket, &s.key, &Pick::Latest, &target, 1)
        .await
        .unwrap();
    assert_eq!(store::files(&target), s.expected(&s.store.snapshots[2].0));

    // One snapshot's object stored under another's name is refused, and left out: the others
    // still restore.
    let listing = standby::backup::snapshots(&s.bucket, &s.key).await.unwrap();
    let (newest, older) = (&listing.snapshots[2], &listing.snapshots[1]);
    let newest_bytes = &objects
        .iter()
        .find(|(k, _)| k.ends_with(&newest.object))
        .unwrap()
        .1;
    let older_key = Bucket::relative(Kind::Snapshot, &older.object);
    s.bucket
        .put(&older_key, newest_bytes.clone())
        .await
        .unwrap();
    let listing = standby::backup::snapshots(&s.bucket, &s.key).await.unwrap();
    assert_eq!(listing.snapshots.len(), 2);
    assert_eq!(listing.damaged.len(), 1);
    let e = &listing.damaged[0];
    assert!(
        matches!(e, RestoreError::Seal(SealError::Tampered { .. })),
        "{e}"
    );
    let again = to.path().join("again");
    restore(&s.bucket, &s.key, &Pick::Latest, &again, 1)
        .await
        .unwrap();
    assert_eq!(store::files(&again), s.expected(&s.store.snapshots[2].0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_mirror_the_store_and_a_fresh_store_deletes_nothing() {
    let Some(mut s) = setup("deletions_mirror_the_store_and_a_fresh_store_deletes_nothing").await
    else {
        return;
    };
    let mut m = s.mirror(opts());
    clean(&m.pass().await.unwrap());
    // The store's prune: the first snapshot, then the pack only it used.
    let (snap, packs) = s.store.snapshots.remove(0);
    s.store.remove(&snap);
    s.store.remove(&packs[0]);
    let f = m.pass().await.unwrap();
    clean(&f);
    assert_eq!((f.objects_deleted, f.objects_uploaded), (2, 0), "{f:?}");
    assert_eq!(count(&s.bucket, Kind::Snapshot).await, 2);
    assert_eq!(count(&s.bucket, Kind::Pack).await, 4);
    let to = tempfile::tempdir().unwrap();
    let target = to.path().join("r");
    restore(&s.bucket, &s.key, &Pick::Latest, &target, 3)
        .await
        .unwrap();
    assert_eq!(store::files(&target), s.expected(&s.store.snapshots[1].0));

    // A new machine with an empty store and no journal mirrors into the same bucket: the
    // backup it may be restored from stays whole.
    let empty = Store::new();
    let state = tempfile::tempdir().unwrap();
    let mut fresh = Mirror::open(
        s.bucket.clone(),
        s.key.clone(),
        empty.path(),
        &state.path().join("backup.journal"),
        opts(),
    )
    .unwrap();
    let f = fresh.pass().await.unwrap();
    clean(&f);
    assert_eq!((f.objects_deleted, f.foreign), (0, 6), "{f:?}");
    assert_eq!(count(&s.bucket, Kind::Pack).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_mid_upload_is_survived_and_nothing_is_skipped() {
    let Some(s) = setup("an_outage_mid_upload_is_survived_and_nothing_is_skipped").await else {
        return;
    };
    // 8 MiB/s: the 20.3 MiB store takes about 2.5 s, so the freeze lands mid-upload.
    let mut m = s.mirror(UploadOptions {
        rate_limit: Some(8 << 20),
        ..opts()
    });
    let freeze = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        s.s3.freeze();
    };
    let (f, ()) = tokio::join!(m.pass(), freeze);
    let f = f.unwrap();
    assert!(f.failures > 0, "the outage did not land mid-upload: {f:?}");
    eprintln!("during the outage: {f:?}");
    // The last good data: the store is untouched, and the next pass while still down fails
    // cleanly too.
    assert_eq!(s.store.files().len(), 8);
    s.s3.thaw();
    let f = m.pass().await.unwrap();
    clean(&f);
    assert_eq!(count(&s.bucket, Kind::Pack).await, 5);
    assert_eq!(count(&s.bucket, Kind::Snapshot).await, 3);
    let to = tempfile::tempdir().unwrap();
    let target = to.path().join("r");
    restore(&s.bucket, &s.key, &Pick::Latest, &target, 3)
        .await
        .unwrap();
    assert_eq!(store::files(&target), s.expected(&s.store.snapshots[2].0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_upload_resumes_where_it_stopped() {
    let Some(mut s) = setup("a_crash_mid_upload_resumes_where_it_stopped").await else {
        return;
    };
    // Twelve 300 KB packs and two snapshots, at 1 MiB/s one at a time: about 0.3 s each.
    s.store = Store::new();
    let packs: Vec<String> = (10..22)
        .map(|i| s.store.add_pack(&store::content(i, 300_000)))
        .collect();
    s.store
        .add_snapshot(1, &packs[..6].iter().collect::<Vec<_>>());
    s.store.add_snapshot(2, &packs.iter().collect::<Vec<_>>());
    let total = s.store.files().len() as u64;
    let slow = UploadOptions {
        rate_limit: Some(1 << 20),
        concurrency: 1,
        multipart_above: 64 << 20,
        ..opts()
    };
    // The pass is dropped once a few objects are recorded, as a kill would stop it.
    let journal = s.state.path().join("backup.journal");
    let recorded = || {
        standby::backup::journal::Journal::read(&journal)
            .map(|live| live.len() as u64)
            .unwrap_or(0)
    };
    let mut m = s.mirror(slow.clone());
    {
        let pass = m.pass();
        tokio::pin!(pass);
        loop {
            tokio::select! {
                r = &mut pass => panic!("the pass finished before the crash: {r:?}"),
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            if recorded() >= 3 {
                break;
            }
        }
    }
    drop(m);
    let before = recorded();
    assert!(
        before < total,
        "{before} of {total} recorded before the crash"
    );
    let f = s.mirror(slow).pass().await.unwrap();
    clean(&f);
    // Nothing recorded is sent again; everything else is.
    assert_eq!(
        f.objects_uploaded + f.objects_adopted,
        total - before,
        "{f:?}"
    );
    let to = tempfile::tempdir().unwrap();
    let target = to.path().join("r");
    restore(&s.bucket, &s.key, &Pick::Latest, &target, 3)
        .await
        .unwrap();
    assert_eq!(store::files(&target), s.expected(&s.store.snapshots[1].0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandwidth_limit_holds() {
    let Some(s) = setup("the_bandwidth_limit_holds").await else {
        return;
    };
    let rate: u64 = 4 << 20;
    let mut m = s.mirror(UploadOptions {
        rate_limit: Some(rate),
        ..opts()
    });
    let started = Instant::now();
    let f = m.pass().await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    clean(&f);
    let achieved = f.bytes_uploaded as f64 / secs;
    eprintln!(
        "limit {} B/s: {} bytes in {secs:.2} s = {achieved:.0} B/s ({:.0}% of the limit)",
        rate,
        f.bytes_uploaded,
        achieved / rate as f64 * 100.0
    );
    // Never faster than the limit allows (the first tenth of a second is a burst).
    let floor = (f.bytes_uploaded as f64 - rate as f64 / 10.0) / rate as f64;
    assert!(
        secs >= floor * 0.98,
        "{secs} s for {} bytes",
        f.bytes_uploaded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_cpu_restore_backup_rebuilds_a_store_from_the_bucket_alone() {
    let Some(s) = setup("agent_cpu_restore_backup_rebuilds_a_store_from_the_bucket_alone").await
    else {
        return;
    };
    clean(&s.mirror(opts()).pass().await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let run = |key: &BackupKey, to: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_agent-cpu"))
            .args([
                "restore-backup",
                "--url",
                URL,
                "--endpoint",
                &s.s3.endpoint(),
            ])
            .args([
                "--region",
                "us-east-1",
                "--snapshot",
                "latest",
                "--store-only",
            ])
            .arg("--store")
            .arg(to)
            .env("STANDBY_BACKUP_KEY", key.to_hex())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .output()
            .unwrap()
    };
    let wrong = BackupKey::generate();
    let refused = dir.path().join("refused");
    let out = run(&wrong, &refused);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&wrong.fingerprint().to_string()), "{err}");
    assert!(err.contains(&s.key.fingerprint().to_string()), "{err}");
    assert!(!refused.exists());

    let to = dir.path().join("history");
    let out = run(&s.key, &to);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["packs"], 5, "{report}");
    assert_eq!(store::files(&to), s.expected(&s.store.snapshots[2].0));
}

#[test]
fn the_coordinator_keeps_a_backup_key_beside_its_ca() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("coord");
    let mut c = common::Coord::start(&dir, &[]);
    let key = dir.join(standby::trust::seal::KEY_FILE);
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let first = BackupKey::load(&key).unwrap().fingerprint();
    // A restart keeps the key.
    c.restart();
    assert_eq!(BackupKey::load(&key).unwrap().fingerprint(), first);
    // A directory made before backups existed gets one when `serve` starts.
    c.kill();
    std::fs::remove_file(&key).unwrap();
    c.restart();
    let made = BackupKey::load(&key).unwrap().fingerprint();
    assert_ne!(made, first);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}
